// SPDX-License-Identifier: Apache-2.0
//! Acceptance: killing a process that uses the store in the middle of a write loop and
//! reopening the file loses no committed object.
//!
//! The test binary re-executes itself as the writer. The child acknowledges each write on stdout
//! only after the store call returned Ok; the parent SIGKILLs it at an arbitrary point, reopens
//! the file and checks every acknowledged write against it. Several rounds run on the same file,
//! so later rounds also recover from earlier crashes.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iri_api::machine::v1alpha1::{Machine, MachineSpec};
use iri_api::meta::v1alpha1::ObjectMetadata;
use iri_runtime::store::{Store, StoreOptions};
use iri_runtime::{Object, ObjectFilter};

const TEST_NAME: &str = "killed_writer_loses_no_committed_object";
const CHILD_ENV: &str = "IRI_STORE_CRASH_CHILD";
const ROUND_ENV: &str = "IRI_STORE_CRASH_ROUND";
const PREFIX: &str = "IRI-CRASH";
const ROUNDS: usize = 8;

/// Content that depends on `seq`, a few KiB so that writes span several pages.
fn payload(seq: &str) -> Vec<u8> {
    let size = 1024 + seq.len() * 373 % 7000;
    seq.bytes().cycle().take(size).collect()
}

fn seq_of(m: &Machine) -> &str {
    m.metadata()
        .and_then(|md| md.annotations.get("seq"))
        .map_or("", String::as_str)
}

fn assert_consistent(id: &str, m: &Machine) {
    let ignition = &m.spec.as_ref().expect("spec").ignition_data;
    assert!(
        *ignition == payload(seq_of(m)),
        "{id}: ignition data does not match seq {}",
        seq_of(m)
    );
}

#[test]
fn killed_writer_loses_no_committed_object() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        let round = std::env::var(ROUND_ENV).unwrap_or_default();
        writer(Path::new(&path), &round);
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    // Acknowledged state: live objects with their last acknowledged seq, and removed ids.
    let mut live: HashMap<String, String> = HashMap::new();
    let mut removed: HashSet<String> = HashSet::new();
    let mut acked_revision = 0u64;

    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .env(ROUND_ENV, round.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut pending: Option<(String, String, String)> = None;
        let mut process = |line: &str, pending: &mut Option<(String, String, String)>| -> bool {
            // A line cut short by the kill has no newline; it was never fully acknowledged.
            let Some(line) = line.strip_suffix('\n') else {
                return false;
            };
            let fields: Vec<&str> = line.split(' ').collect();
            let [PREFIX, phase, op, id, seq, rest @ ..] = fields.as_slice() else {
                return false;
            };
            match *phase {
                "begin" => *pending = Some((op.to_string(), id.to_string(), seq.to_string())),
                "ok" => {
                    *pending = None;
                    let revision: u64 = rest[0].parse().unwrap();
                    assert!(revision > acked_revision, "revisions increase");
                    acked_revision = revision;
                    match *op {
                        "create" | "update" => {
                            live.insert(id.to_string(), seq.to_string());
                        }
                        "remove" => {
                            live.remove(*id);
                            removed.insert(id.to_string());
                        }
                        other => panic!("unknown op {other}"),
                    }
                    return true;
                }
                other => panic!("unknown phase {other}"),
            }
            false
        };

        // Let the child get well into its loop; vary the point so the kill lands in different
        // places of a write.
        let target = 200 + round * 37;
        let mut acked = 0;
        let mut line = String::new();
        while acked < target {
            line.clear();
            let n = out.read_line(&mut line).unwrap();
            assert!(n > 0, "writer exited early: {:?}", child.wait());
            if process(&line, &mut pending) {
                acked += 1;
            }
        }
        // The parent wakes right after an acknowledgement, so killing now would mostly hit the
        // gap between two writes. A varying pause decouples the kill from the child's rhythm.
        let jitter = (iri_runtime::id::now_nanos().unsigned_abs() ^ (round as u64 * 7919)) % 3000;
        std::thread::sleep(Duration::from_micros(jitter));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "the writer was killed, not finished: {status:?}"
        );
        // Everything the child printed before dying is still in the pipe.
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            if process(&line, &mut pending) {
                acked += 1;
            }
        }

        let store = Store::open(&path, StoreOptions::default()).expect("store opens cleanly after a crash");
        assert!(
            store.revision() >= acked_revision,
            "revision went back: {} < {acked_revision}",
            store.revision()
        );
        for id in &removed {
            assert!(
                store.get::<Machine>(id).unwrap_err().is_not_found(),
                "removed {id} came back"
            );
        }
        // At most one write was in flight; it may or may not have committed.
        let (in_flight_op, in_flight_id, in_flight_seq) = pending.clone().unwrap_or_default();
        for (id, seq) in live.clone() {
            match store.get::<Machine>(&id) {
                Ok(stored) => {
                    assert_consistent(&id, &stored.object);
                    let got = seq_of(&stored.object).to_string();
                    let in_flight_update =
                        in_flight_op == "update" && in_flight_id == id && got == in_flight_seq;
                    assert!(
                        got == seq || in_flight_update,
                        "{id}: acknowledged seq {seq}, stored {got}"
                    );
                    live.insert(id, got);
                }
                Err(e) if e.is_not_found() && in_flight_op == "remove" && in_flight_id == id => {
                    live.remove(&id);
                    removed.insert(id);
                }
                Err(e) => panic!("acknowledged object {id} lost: {e}"),
            }
        }
        for stored in store.list::<Machine>(&ObjectFilter::default()) {
            let id = stored.object.id().to_string();
            if let std::collections::hash_map::Entry::Vacant(slot) = live.entry(id) {
                let id = slot.key();
                assert_eq!(in_flight_op, "create", "unexpected object {id}");
                assert_eq!(seq_of(&stored.object), in_flight_seq);
                assert_consistent(id, &stored.object);
                slot.insert(in_flight_seq.clone());
            }
        }
        assert_eq!(store.count::<Machine>(), live.len());
        eprintln!(
            "round {round}: {} acknowledged writes, {} live objects, {} removed, in flight: {pending:?}",
            acked,
            live.len(),
            removed.len()
        );
        drop(store);

        let conn = rusqlite::Connection::open(&path).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
    assert!(
        live.len() >= 200,
        "the rounds did real work: {} live objects",
        live.len()
    );
}

/// The child: writes until killed, acknowledging each write after it returned Ok.
fn writer(path: &Path, round: &str) {
    let store = Store::open(path, StoreOptions::default()).expect("writer opens the store");
    let mut live: Vec<String> = store
        .list::<Machine>(&ObjectFilter::default())
        .into_iter()
        .map(|s| s.object.id().to_string())
        .collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut say = |line: String| {
        // Written directly (bypassing the test harness' capture) and flushed, so that the line
        // is in the pipe before the next write starts.
        out.write_all(format!("{PREFIX} {line}\n").as_bytes()).unwrap();
        out.flush().unwrap();
    };
    // A safety net in case the parent is gone; normally the parent kills us long before.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut n = 0usize;
    while Instant::now() < deadline {
        n += 1;
        let seq = format!("{round}.{n}");
        if n.is_multiple_of(13) && !live.is_empty() {
            let id = live.swap_remove(n * 7 % live.len());
            say(format!("begin remove {id} -"));
            store.remove::<Machine>(&id).unwrap();
            say(format!("ok remove {id} - {}", store.revision()));
        } else if n.is_multiple_of(3) && !live.is_empty() {
            let id = live[n * 31 % live.len()].clone();
            say(format!("begin update {id} {seq}"));
            let stored = store
                .update::<Machine>(&id, |m| {
                    m.metadata_mut().annotations.insert("seq".into(), seq.clone());
                    m.spec.get_or_insert_with(Default::default).ignition_data = payload(&seq);
                    Ok(())
                })
                .unwrap();
            say(format!("ok update {id} {seq} {}", stored.revision));
        } else {
            say(format!("begin create - {seq}"));
            let stored = store
                .create(Machine {
                    metadata: Some(ObjectMetadata {
                        labels: [("test".to_string(), "crash".to_string())].into(),
                        annotations: [("seq".to_string(), seq.clone())].into(),
                        ..Default::default()
                    }),
                    spec: Some(MachineSpec {
                        class: "crash".into(),
                        ignition_data: payload(&seq),
                        ..Default::default()
                    }),
                    status: None,
                })
                .unwrap();
            let id = stored.object.id().to_string();
            say(format!("ok create {id} {seq} {}", stored.revision));
            live.push(id);
        }
    }
}
