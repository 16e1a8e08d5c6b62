// SPDX-License-Identifier: Apache-2.0
//! `iri up` as a user runs it: the real binary on a fresh data directory brings up the three
//! providers, reports each healthy, serves them on private sockets, and stops on Ctrl-C.

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::{FileTypeExt, PermissionsExt},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};

mod support;

#[test]
fn up_serves_machines_volumes_and_buckets_and_stops_on_ctrl_c() {
    // Short: a machine's sockets live at <data>/machine/machines/<63-character id>/, and a unix
    // socket path holds at most 107 bytes (the machine provider refuses deeper directories).
    let dir = tempfile::Builder::new().prefix("i").tempdir_in("/tmp").unwrap();
    let data = dir.path().to_path_buf();
    // Print the configuration first: every default written out, the wiring included.
    let printed = Command::new(env!("CARGO_BIN_EXE_iri"))
        .args(["up", "--print-config", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let config = String::from_utf8(printed.stdout).unwrap();
    for table in [
        "[machine]",
        "[volume]",
        "[bucket]",
        "[machine.server]",
        "[volume.local]",
    ] {
        assert!(config.contains(table), "{table} missing from:\n{config}");
    }
    let volume_daemon = data.join("volume/local/daemon");
    assert!(
        config.contains(&format!(
            "nbd_socket_dirs = [{:?}]",
            volume_daemon.display().to_string()
        )),
        "machines may attach this node's volumes:\n{config}"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_iri"))
        .args(["up", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, received) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut seen = Vec::new();
    let healthy =
        |seen: &[String], kind: &str| seen.iter().any(|l| l.starts_with(kind) && l.contains(" ok "));
    while !["machine", "volume", "bucket"].iter().all(|k| healthy(&seen, k)) {
        match received.recv_timeout(Duration::from_secs(90)) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let err = child
                    .wait_with_output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).to_string());
                panic!("not all providers healthy:\n{}\nstderr: {err:?}", seen.join("\n"));
            }
        }
    }
    for kind in ["machine", "volume", "bucket"] {
        let socket = data.join(format!("{kind}.sock"));
        let meta = std::fs::metadata(&socket).unwrap();
        assert!(meta.file_type().is_socket(), "{}", socket.display());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", socket.display());
    }

    nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "iri up exited with {status} after Ctrl-C");
    // The storage daemon outlives the node by design (volumes stay served); this test's goes.
    if let Ok(pid) = std::fs::read_to_string(volume_daemon.join("pid"))
        && let Ok(pid) = pid.trim().parse::<i32>()
    {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// `iri up --stop-machines`: Ctrl-C powers the running machines off (ACPI, forced after the
/// grace period) instead of leaving them for the next start; their power stays on in the
/// store, so the next start boots them again.
#[test]
fn stop_machines_stops_running_machines_on_ctrl_c() {
    if let Some(reason) = support::skip_reason(&[]) {
        eprintln!("SKIP stop_machines_stops_running_machines_on_ctrl_c: {reason}");
        return;
    }
    let printed = Command::new(env!("CARGO_BIN_EXE_iri"))
        .args([
            "up",
            "--print-config",
            "--stop-machines",
            "--data-dir",
            "/tmp/unused",
        ])
        .output()
        .unwrap();
    let config = String::from_utf8_lossy(&printed.stdout);
    assert!(
        config.contains("stop_machines_on_exit = true"),
        "--stop-machines sets [machine] stop_machines_on_exit:\n{config}"
    );
    let mut node = support::Node::start(
        "s",
        &support::Settings {
            args: &["--stop-machines"],
            ..Default::default()
        },
    );
    let notice = node.notice();
    assert!(
        notice.contains("stops the providers and the running machines"),
        "{notice}"
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let image = node.data.join("images/test-guest");
    let id = runtime.block_on(support::iri::create_machine(
        &node.socket("machine"),
        &image,
        None,
    ));
    support::wait_console(&node.data, &id, "IRI-TEST-GUEST READY", Duration::from_secs(120));
    let pids = node.qemu_pids();
    assert_eq!(pids.len(), 1, "one QEMU: {pids:?}");

    let stopping = std::time::Instant::now();
    node.interrupt();
    // iri up returns once the machines are down: ACPI within the grace period (10 s), or
    // forced.
    assert!(
        !support::alive(pids[0]),
        "QEMU {} still runs after iri up --stop-machines exited; log:\n{}",
        pids[0],
        node.log()
    );
    eprintln!("machines stopped and iri up exited in {:?}", stopping.elapsed());

    // Its power is still on: the next start boots it again (a new QEMU).
    std::fs::remove_file(node.data.join("machine/machines").join(&id).join("console.log")).ok();
    node.restart();
    support::wait_console(&node.data, &id, "IRI-TEST-GUEST READY", Duration::from_secs(120));
    let again = node.qemu_pids();
    assert_eq!(again.len(), 1, "one QEMU: {again:?}");
    assert_ne!(again, pids, "a new QEMU after the restart");
    node.stop();
}
