// SPDX-License-Identifier: Apache-2.0
//! The object store against real SQLite files.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use iri_api::machine::v1alpha1::{Machine, MachineSpec, MachineState, MachineStatus, Power};
use iri_api::meta::v1alpha1::ObjectMetadata;
use iri_api::volume::v1alpha1::{Volume, VolumeSpec};
use iri_runtime::id::{is_valid_id, now_nanos};
use iri_runtime::store::{Change, SCHEMA_VERSION, Store, StoreOptions};
use iri_runtime::{Error, Object, ObjectFilter};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn machine(class: &str, label_pairs: &[(&str, &str)]) -> Machine {
    Machine {
        metadata: Some(ObjectMetadata {
            labels: labels(label_pairs),
            annotations: labels(&[("note", "hello")]),
            ..Default::default()
        }),
        spec: Some(MachineSpec {
            class: class.to_string(),
            power: Power::On as i32,
            ignition_data: b"{\"ignition\":{}}".to_vec(),
            ..Default::default()
        }),
        status: None,
    }
}

fn volume(class: &str) -> Volume {
    Volume {
        metadata: Some(ObjectMetadata::default()),
        spec: Some(VolumeSpec {
            class: class.to_string(),
            ..Default::default()
        }),
        status: None,
    }
}

fn meta<T: Object>(object: &T) -> &ObjectMetadata {
    object.metadata().expect("stored objects have metadata")
}

fn new_store() -> (tempfile::TempDir, PathBuf, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    (dir, path, store)
}

fn reopen(store: Store, path: &Path) -> Store {
    drop(store);
    Store::open(path, StoreOptions::default()).unwrap()
}

fn ids<T: Object>(list: &[iri_runtime::store::Stored<T>]) -> Vec<String> {
    list.iter().map(|s| s.object.id().to_string()).collect()
}

#[test]
fn create_assigns_server_owned_metadata() {
    let (_dir, _path, store) = new_store();
    assert_eq!(store.revision(), 0);
    let mut m = machine("small", &[("app", "web")]);
    let meta_in = m.metadata.as_mut().unwrap();
    meta_in.id = "client-chosen".into();
    meta_in.generation = 42;
    meta_in.created_at = 7;
    meta_in.deleted_at = 9;

    let before = now_nanos();
    let stored = store.create(m.clone()).unwrap();
    let after = now_nanos();
    let md = meta(&stored.object);
    assert!(is_valid_id(&md.id), "{}", md.id);
    assert_ne!(md.id, "client-chosen");
    assert!(before <= md.created_at && md.created_at <= after);
    assert_eq!(md.generation, 1);
    assert_eq!(md.deleted_at, 0);
    assert_eq!(md.labels, m.metadata.as_ref().unwrap().labels);
    assert_eq!(stored.object.spec, m.spec);
    assert_eq!(stored.revision, 1);
    assert_eq!(store.revision(), 1);

    let got = store.get::<Machine>(&md.id).unwrap();
    assert_eq!(got, stored);
    assert_eq!(store.count::<Machine>(), 1);

    let second = store.create(machine("small", &[])).unwrap();
    assert_ne!(second.object.id(), stored.object.id());
    assert_eq!(second.revision, 2);
}

#[test]
fn unknown_ids_are_not_found_with_the_right_kind() {
    let (_dir, _path, store) = new_store();
    let m = store.create(machine("small", &[])).unwrap();
    let id = m.object.id().to_string();

    for err in [
        store.get::<Machine>("nope").unwrap_err(),
        store.update::<Machine>("nope", |_| Ok(())).unwrap_err(),
        store.compare_and_swap("nope", 1, Machine::default()).unwrap_err(),
        store.mark_deleted::<Machine>("nope").unwrap_err(),
        store.remove::<Machine>("nope").unwrap_err(),
    ] {
        assert!(
            matches!(&err, Error::NotFound { kind: "machine", id } if id == "nope"),
            "{err:?}"
        );
    }
    // Kinds are separate namespaces: a machine id is not a volume.
    let err = store.get::<Volume>(&id).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { kind: "volume", id: got } if *got == id),
        "{err:?}"
    );
    assert!(store.remove::<Volume>(&id).unwrap_err().is_not_found());
    assert_eq!(store.count::<Volume>(), 0);
    assert_eq!(store.revision(), 1, "failed operations must not write");
}

#[test]
fn list_filters_by_id_and_labels_in_creation_order() {
    let (_dir, _path, store) = new_store();
    let a = store
        .create(machine("a", &[("app", "web"), ("tier", "front")]))
        .unwrap();
    let b = store
        .create(machine("b", &[("app", "web"), ("tier", "")]))
        .unwrap();
    let c = store.create(machine("c", &[("app", "db")])).unwrap();
    store.create(volume("fast")).unwrap();
    let (a, b, c) = (
        a.object.id().to_string(),
        b.object.id().to_string(),
        c.object.id().to_string(),
    );

    let all = store.list::<Machine>(&ObjectFilter::default());
    assert_eq!(ids(&all), [a.clone(), b.clone(), c.clone()], "creation order");
    assert_eq!(all[0].revision, 1);
    assert_eq!(store.list::<Volume>(&ObjectFilter::default()).len(), 1);

    let by = |id: &str, sel: &[(&str, &str)]| {
        ids(&store.list::<Machine>(&ObjectFilter {
            id: id.to_string(),
            label_selector: labels(sel),
        }))
    };
    assert_eq!(by(&b, &[]), [b.as_str()]);
    assert_eq!(
        by("unknown", &[]),
        Vec::<String>::new(),
        "unknown id lists empty, not NotFound"
    );
    assert_eq!(by("", &[("app", "web")]), [a.clone(), b.clone()]);
    assert_eq!(by("", &[("app", "web"), ("tier", "front")]), [a.as_str()]);
    assert_eq!(
        by("", &[("tier", "")]),
        [b.as_str()],
        "empty value still requires the key with that value"
    );
    assert_eq!(by("", &[("app", "cache")]), Vec::<String>::new());
    assert_eq!(by(&c, &[("app", "db")]), [c.as_str()]);
    assert_eq!(
        by(&c, &[("app", "web")]),
        Vec::<String>::new(),
        "id and selector both apply"
    );

    // Order is by creation time, not by last write.
    store
        .update::<Machine>(&a, |m| {
            m.spec.as_mut().unwrap().class = "a2".into();
            Ok(())
        })
        .unwrap();
    assert_eq!(ids(&store.list::<Machine>(&ObjectFilter::default())), [a, b, c]);
}

#[test]
fn update_bumps_generation_only_on_spec_change() {
    let (_dir, _path, store) = new_store();
    let id = store
        .create(machine("small", &[]))
        .unwrap()
        .object
        .id()
        .to_string();

    let s = store
        .update::<Machine>(&id, |m| {
            m.metadata_mut().annotations.insert("x".into(), "y".into());
            Ok(())
        })
        .unwrap();
    assert_eq!(meta(&s.object).generation, 1, "annotations are not spec");
    assert_eq!(meta(&s.object).annotations["x"], "y");
    assert_eq!(s.revision, 2);

    let s = store
        .update::<Machine>(&id, |m| {
            m.status = Some(MachineStatus {
                state: MachineState::MachineRunning as i32,
                observed_generation: 1,
                ..Default::default()
            });
            Ok(())
        })
        .unwrap();
    assert_eq!(meta(&s.object).generation, 1, "status is not spec");
    assert_eq!(s.revision, 3);

    let s = store
        .update::<Machine>(&id, |m| {
            m.spec.as_mut().unwrap().power = Power::Off as i32;
            Ok(())
        })
        .unwrap();
    assert_eq!(meta(&s.object).generation, 2);
    assert_eq!(s.revision, 4);
    assert_eq!(store.get::<Machine>(&id).unwrap(), s);
    assert_eq!(store.revision(), 4);
}

#[test]
fn update_without_change_writes_nothing() {
    let (_dir, path, store) = new_store();
    let created = store.create(machine("small", &[("a", "b")])).unwrap();
    let id = created.object.id().to_string();
    let mut feed = store.subscribe();

    let s = store.update::<Machine>(&id, |_| Ok(())).unwrap();
    assert_eq!(s, created);
    // Setting a field to the value it already has is no change either.
    let s = store
        .update::<Machine>(&id, |m| {
            m.spec.as_mut().unwrap().class = "small".into();
            Ok(())
        })
        .unwrap();
    assert_eq!(s, created);
    let s = store.compare_and_swap(&id, 1, created.object.clone()).unwrap();
    assert_eq!(s, created);
    assert_eq!(store.revision(), 1);
    assert!(feed.try_recv().is_err(), "no change announced");

    let store = reopen(store, &path);
    assert_eq!(store.revision(), 1);
    assert_eq!(store.get::<Machine>(&id).unwrap(), created);
}

#[test]
fn update_cannot_change_identity_or_deletion() {
    let (_dir, _path, store) = new_store();
    let created = store.create(machine("small", &[])).unwrap();
    let id = created.object.id().to_string();
    let original = meta(&created.object).clone();

    let s = store
        .update::<Machine>(&id, |m| {
            let md = m.metadata_mut();
            md.id = "other".into();
            md.created_at = 1;
            md.generation = 100;
            md.deleted_at = 5;
            md.labels.insert("new".into(), "label".into());
            Ok(())
        })
        .unwrap();
    let md = meta(&s.object);
    assert_eq!(md.id, original.id);
    assert_eq!(md.created_at, original.created_at);
    assert_eq!(md.generation, 1, "generation is server-owned");
    assert_eq!(md.deleted_at, 0, "only mark_deleted sets deleted_at");
    assert_eq!(md.labels["new"], "label");
    assert!(store.get::<Machine>("other").unwrap_err().is_not_found());

    // The same rules apply to compare_and_swap, even with metadata missing entirely.
    let mut replacement = machine("large", &[]);
    replacement.metadata = None;
    let s = store.compare_and_swap(&id, s.revision, replacement).unwrap();
    let md = meta(&s.object);
    assert_eq!(
        (md.id.as_str(), md.created_at, md.generation),
        (original.id.as_str(), original.created_at, 2)
    );
    assert_eq!(store.get::<Machine>(&id).unwrap(), s);
}

#[test]
fn update_error_writes_nothing() {
    let (_dir, _path, store) = new_store();
    let created = store.create(machine("small", &[])).unwrap();
    let id = created.object.id().to_string();
    let mut feed = store.subscribe();

    let err = store
        .update::<Machine>(&id, |m| {
            m.spec.as_mut().unwrap().class = "changed".into();
            Err(Error::FailedPrecondition("machine is busy".into()))
        })
        .unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(msg) if msg == "machine is busy"),
        "{err:?}"
    );
    assert_eq!(store.get::<Machine>(&id).unwrap(), created);
    assert_eq!(store.revision(), 1);
    assert!(feed.try_recv().is_err());
}

#[test]
fn compare_and_swap_detects_conflicts() {
    let (_dir, _path, store) = new_store();
    let created = store.create(machine("small", &[])).unwrap();
    let id = created.object.id().to_string();

    // Someone else writes in between.
    store
        .update::<Machine>(&id, |m| {
            m.metadata_mut().annotations.insert("by".into(), "other".into());
            Ok(())
        })
        .unwrap();

    let mut mine = created.object.clone();
    mine.spec.as_mut().unwrap().class = "large".into();
    let err = store
        .compare_and_swap(&id, created.revision, mine.clone())
        .unwrap_err();
    assert!(
        matches!(&err, Error::Conflict { kind: "machine", id: got, expected: 1, found: 2 } if *got == id),
        "{err:?}"
    );
    assert_eq!(err.code(), tonic::Code::Aborted);
    assert_eq!(store.revision(), 2);

    let current = store.get::<Machine>(&id).unwrap();
    let mut mine = current.object.clone();
    mine.spec.as_mut().unwrap().class = "large".into();
    let s = store.compare_and_swap(&id, current.revision, mine).unwrap();
    assert_eq!(s.revision, 3);
    assert_eq!(meta(&s.object).generation, 2);
    assert_eq!(s.object.spec.as_ref().unwrap().class, "large");
    assert_eq!(meta(&s.object).annotations["by"], "other");
}

#[test]
fn concurrent_updates_lose_nothing() {
    let (_dir, path, store) = new_store();
    let id = store
        .create(machine("small", &[]))
        .unwrap()
        .object
        .id()
        .to_string();
    let threads = 8;
    let per_thread = 40;
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let store = store.clone();
            let id = id.clone();
            scope.spawn(move || {
                for _ in 0..per_thread {
                    store
                        .update::<Machine>(&id, |m| {
                            let annotations = &mut m.metadata_mut().annotations;
                            let n: u32 = annotations.get("n").map_or(0, |v| v.parse().unwrap());
                            annotations.insert("n".into(), (n + 1).to_string());
                            Ok(())
                        })
                        .unwrap();
                }
            });
        }
    });
    let expected = (threads * per_thread).to_string();
    let total = 1 + u64::try_from(threads * per_thread).unwrap();
    let s = store.get::<Machine>(&id).unwrap();
    assert_eq!(meta(&s.object).annotations["n"], expected);
    assert_eq!(s.revision, total);
    assert_eq!(store.revision(), total);
    let store = reopen(store, &path);
    assert_eq!(
        meta(&store.get::<Machine>(&id).unwrap().object).annotations["n"],
        expected
    );
}

#[test]
fn mark_deleted_is_idempotent_and_sticky() {
    let (_dir, _path, store) = new_store();
    let id = store
        .create(machine("small", &[]))
        .unwrap()
        .object
        .id()
        .to_string();

    let before = now_nanos();
    let first = store.mark_deleted::<Machine>(&id).unwrap();
    let deleted_at = meta(&first.object).deleted_at;
    assert!(deleted_at >= before);
    assert_eq!(first.revision, 2);
    assert_eq!(meta(&first.object).generation, 1, "deletion is not a spec change");

    std::thread::sleep(Duration::from_millis(2));
    let again = store.mark_deleted::<Machine>(&id).unwrap();
    assert_eq!(again, first, "keeps the first timestamp, writes nothing");
    assert_eq!(store.revision(), 2);

    // Status updates keep flowing while deleting, and cannot clear the mark.
    let s = store
        .update::<Machine>(&id, |m| {
            m.status = Some(MachineStatus {
                state: MachineState::MachineTerminating as i32,
                ..Default::default()
            });
            m.metadata_mut().deleted_at = 0;
            Ok(())
        })
        .unwrap();
    assert_eq!(meta(&s.object).deleted_at, deleted_at);
    assert_eq!(store.get::<Machine>(&id).unwrap().object, s.object);
}

#[test]
fn remove_deletes_the_row() {
    let (_dir, path, store) = new_store();
    let keep = store
        .create(machine("keep", &[]))
        .unwrap()
        .object
        .id()
        .to_string();
    let gone = store
        .create(machine("gone", &[]))
        .unwrap()
        .object
        .id()
        .to_string();
    let mut feed = store.subscribe();

    store.mark_deleted::<Machine>(&gone).unwrap();
    store.remove::<Machine>(&gone).unwrap();
    assert_eq!(store.revision(), 4);
    assert!(store.get::<Machine>(&gone).unwrap_err().is_not_found());
    assert!(store.remove::<Machine>(&gone).unwrap_err().is_not_found());
    assert_eq!(
        ids(&store.list::<Machine>(&ObjectFilter::default())),
        [keep.as_str()]
    );
    assert_eq!(store.count::<Machine>(), 1);
    assert_eq!(
        feed.try_recv().unwrap(),
        Change {
            kind: "machine",
            id: gone.clone(),
            revision: 3,
            removed: false
        }
    );
    assert_eq!(
        feed.try_recv().unwrap(),
        Change {
            kind: "machine",
            id: gone.clone(),
            revision: 4,
            removed: true
        }
    );

    let store = reopen(store, &path);
    assert!(store.get::<Machine>(&gone).unwrap_err().is_not_found());
    assert_eq!(store.count::<Machine>(), 1);
    assert_eq!(store.revision(), 4);
}

#[test]
fn revision_is_monotonic_across_reopen() {
    let (_dir, path, mut store) = new_store();
    let mut last = store.revision();
    for round in 0..3 {
        let id = store
            .create(machine("small", &[]))
            .unwrap()
            .object
            .id()
            .to_string();
        assert_eq!(store.revision(), last + 1);
        store
            .update::<Machine>(&id, |m| {
                m.spec.as_mut().unwrap().class = format!("round-{round}");
                Ok(())
            })
            .unwrap();
        store.mark_deleted::<Machine>(&id).unwrap();
        store.remove::<Machine>(&id).unwrap();
        assert_eq!(store.revision(), last + 4, "each write bumps by exactly one");
        last = store.revision();
        // Even with every object removed, the revision must not restart.
        store = reopen(store, &path);
        assert_eq!(store.revision(), last);
        assert_eq!(store.count::<Machine>(), 0);
    }
    let s = store.create(volume("fast")).unwrap();
    assert_eq!(s.revision, last + 1);
}

#[test]
fn reopen_keeps_everything() {
    let (_dir, path, store) = new_store();
    let mut m = machine("big", &[("uid", "1234")]);
    m.spec.as_mut().unwrap().ignition_data = (0..=255u8).cycle().take(64 * 1024).collect();
    let m = store.create(m).unwrap();
    let m = store
        .update::<Machine>(m.object.id(), |m| {
            m.status = Some(MachineStatus {
                state: MachineState::MachineRunning as i32,
                image_ref: "img@sha256:abc".into(),
                observed_generation: 1,
                ..Default::default()
            });
            Ok(())
        })
        .unwrap();
    let deleting = store.create(machine("small", &[])).unwrap();
    let deleting = store.mark_deleted::<Machine>(deleting.object.id()).unwrap();
    let v = store.create(volume("fast")).unwrap();
    let machines = store.list::<Machine>(&ObjectFilter::default());
    let revision = store.revision();

    let store = reopen(store, &path);
    assert_eq!(store.revision(), revision);
    assert_eq!(store.list::<Machine>(&ObjectFilter::default()), machines);
    assert_eq!(store.get::<Machine>(m.object.id()).unwrap(), m);
    assert_eq!(store.get::<Machine>(deleting.object.id()).unwrap(), deleting);
    assert_eq!(store.get::<Volume>(v.object.id()).unwrap(), v);
    assert_eq!(store.count::<Volume>(), 1);

    // Writes after reopen continue from the loaded state (generation, CAS revision).
    let s = store
        .compare_and_swap(m.object.id(), m.revision, {
            let mut next = m.object.clone();
            next.spec.as_mut().unwrap().class = "bigger".into();
            next
        })
        .unwrap();
    assert_eq!(meta(&s.object).generation, 2);
    assert_eq!(s.revision, revision + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_feed_delivers_after_commit() {
    let (_dir, _path, store) = new_store();
    let mut feed = store.subscribe();
    let reader = store.clone();
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < 5 {
            let change = feed.recv().await.unwrap();
            // Whoever is woken must already see the write.
            assert!(reader.revision() >= change.revision);
            let got = match change.kind {
                "machine" => reader.get::<Machine>(&change.id).map(|s| s.revision),
                _ => reader.get::<Volume>(&change.id).map(|s| s.revision),
            };
            match got {
                Ok(revision) => {
                    assert!(!change.removed, "{change:?}");
                    assert!(revision >= change.revision);
                }
                Err(e) => assert!(e.is_not_found() && change.removed, "{change:?}: {e}"),
            }
            seen.push(change);
        }
        seen
    });

    let writer = store.clone();
    let id = tokio::task::spawn_blocking(move || {
        let id = writer
            .create(machine("small", &[]))
            .unwrap()
            .object
            .id()
            .to_string();
        writer
            .update::<Machine>(&id, |m| {
                m.spec.as_mut().unwrap().class = "large".into();
                Ok(())
            })
            .unwrap();
        writer.update::<Machine>(&id, |_| Ok(())).unwrap(); // no change, no event
        writer.mark_deleted::<Machine>(&id).unwrap();
        writer.mark_deleted::<Machine>(&id).unwrap(); // no change, no event
        writer.remove::<Machine>(&id).unwrap();
        writer.create(volume("fast")).unwrap();
        id
    })
    .await
    .unwrap();

    let seen = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .unwrap()
        .unwrap();
    let summary: Vec<_> = seen.iter().map(|c| (c.kind, c.revision, c.removed)).collect();
    assert_eq!(
        summary,
        [
            ("machine", 1, false),
            ("machine", 2, false),
            ("machine", 3, false),
            ("machine", 4, true),
            ("volume", 5, false)
        ]
    );
    assert!(seen[..4].iter().all(|c| c.id == id));
}

#[test]
fn file_is_private() {
    let (dir, path, store) = new_store();
    store.create(machine("small", &[])).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", entry.path().display());
    }
    drop(store);

    // A file created by someone else with a loose mode is tightened.
    let loose = dir.path().join("loose.db");
    std::fs::write(&loose, b"").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = Store::open(&loose, StoreOptions::default()).unwrap();
    assert_eq!(
        std::fs::metadata(&loose).unwrap().permissions().mode() & 0o777,
        0o600
    );
    store.create(machine("small", &[])).unwrap();
}

#[test]
fn second_open_of_an_open_file_fails() {
    let (_dir, path, store) = new_store();
    store.create(machine("small", &[])).unwrap();
    let err = Store::open(&path, StoreOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("another process"), "{err}");
    // The first instance is unaffected.
    store.create(machine("small", &[])).unwrap();
    assert_eq!(store.count::<Machine>(), 2);
    let store = reopen(store, &path);
    assert_eq!(store.count::<Machine>(), 2);
}

#[test]
fn refuses_newer_schema_versions() {
    let (_dir, path, store) = new_store();
    let id = store
        .create(machine("small", &[]))
        .unwrap()
        .object
        .id()
        .to_string();
    drop(store);
    let newer = i64::try_from(SCHEMA_VERSION).unwrap() + 1;
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", newer)
        .unwrap();

    let err = Store::open(&path, StoreOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("newer") && msg.contains(&newer.to_string()), "{msg}");

    // Nothing was touched: back at the known version, the data is all there.
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", newer - 1)
        .unwrap();
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    assert!(store.get::<Machine>(&id).is_ok());
}

#[test]
fn refuses_foreign_sqlite_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE things (x INTEGER); INSERT INTO things VALUES (1);")
        .unwrap();
    drop(conn);
    let err = Store::open(&path, StoreOptions::default()).unwrap_err();
    assert!(err.to_string().contains("not an IRI store"), "{err}");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM things", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x42; 8192]).unwrap();
    assert!(Store::open(&garbage, StoreOptions::default()).is_err());
}

#[test]
fn undecodable_row_is_reported_not_fatal() {
    let (_dir, path, store) = new_store();
    let good = store.create(machine("good", &[])).unwrap();
    let bad = store.create(machine("bad", &[])).unwrap().object.id().to_string();
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    // A truncated length-delimited field: not a valid Machine.
    conn.execute("UPDATE objects SET data = x'0aff' WHERE id = ?1", [&bad])
        .unwrap();
    drop(conn);

    let store = Store::open(&path, StoreOptions::default()).unwrap();
    let err = store.get::<Machine>(&bad).unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("machine") && msg.contains(&bad), "{msg}");
    assert!(store.update::<Machine>(&bad, |_| Ok(())).is_err());
    assert!(store.mark_deleted::<Machine>(&bad).is_err());

    // Everything else works.
    assert_eq!(store.get::<Machine>(good.object.id()).unwrap(), good);
    assert_eq!(
        store.list::<Machine>(&ObjectFilter::default()),
        vec![good.clone()]
    );
    store.create(machine("new", &[])).unwrap();
    // And the bad row can be removed.
    store.remove::<Machine>(&bad).unwrap();
    assert_eq!(store.count::<Machine>(), 2);
}
