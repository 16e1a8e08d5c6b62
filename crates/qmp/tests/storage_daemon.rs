// SPDX-License-Identifier: Apache-2.0
//! QMP against a real qemu-storage-daemon: negotiate, build a block graph, export it over NBD,
//! read the export back with qemu-io, errors, events and disconnects.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use qmp::{Error, Qmp};
use serde_json::{Value, json};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(dir: &Path) -> Daemon {
    let socket = dir.join("qmp.sock");
    let child = Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            socket.display()
        ))
        .args(["--monitor", "chardev=qmp0"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-storage-daemon is installed (Debian package qemu-utils)");
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

#[tokio::test]
async fn drives_a_storage_daemon_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = start_daemon(dir.path());
    let qmp = Qmp::connect(&dir.path().join("qmp.sock")).await.unwrap();

    let version: Value = qmp.execute("query-version", Value::Null).await.unwrap();
    assert!(version["qemu"]["major"].as_u64().unwrap() >= 7, "{version}");

    // A 64 MiB qcow2 image, opened and exported read-write over NBD on a unix socket.
    let image = dir.path().join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M")
        .status()
        .unwrap();
    assert!(status.success());
    qmp.execute_value(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "disk0",
               "file": {"driver": "file", "filename": image.display().to_string()}}),
    )
    .await
    .unwrap();
    let nbd = dir.path().join("nbd.sock");
    qmp.execute_value(
        "nbd-server-start",
        // nbd-server-start still takes the legacy address form, with a "data" wrapper.
        json!({"addr": {"type": "unix", "data": {"path": nbd.display().to_string()}}}),
    )
    .await
    .unwrap();
    qmp.execute_value(
        "block-export-add",
        json!({"type": "nbd", "id": "export0", "node-name": "disk0", "name": "disk0", "writable": true}),
    )
    .await
    .unwrap();

    let uri = format!("nbd+unix:///disk0?socket={}", nbd.display());
    let io = |command: &str| {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", command, &uri])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    io("write -P 0xab 1M 64k");
    let read = io("read -P 0xab 1M 64k");
    assert!(read.contains("read 65536/65536 bytes"), "{read}");

    // Errors carry QEMU's class and description.
    let err = qmp
        .execute_value(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "disk0", "file": "nope"}),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Command { ref command, .. } if command == "blockdev-add"),
        "{err}"
    );

    // Concurrent commands each get their own answer.
    let answers = futures_join(&qmp).await;
    assert_eq!(answers, 8);

    // An event, then the peer going away fails every later command.
    let mut events = qmp.events();
    qmp.execute_value("block-export-del", json!({"id": "export0"}))
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.event, "BLOCK_EXPORT_DELETED");
    assert_eq!(event.data["id"], "export0");

    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    let err = qmp.execute_value("query-version", Value::Null).await.unwrap_err();
    assert!(matches!(err, Error::Disconnected(_) | Error::Io { .. }), "{err}");
    assert!(!qmp.is_connected() || matches!(err, Error::Io { .. }));
}

async fn futures_join(qmp: &Qmp) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let qmp = qmp.clone();
        tasks.spawn(async move {
            qmp.execute::<Value>("query-block-exports", Value::Null)
                .await
                .unwrap()
        });
    }
    let mut n = 0;
    while let Some(answer) = tasks.join_next().await {
        assert!(answer.unwrap().is_array());
        n += 1;
    }
    n
}

#[tokio::test]
async fn refuses_a_socket_that_is_not_qmp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-qmp.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"{\"hello\": 1}\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let err = Qmp::connect(&path).await.unwrap_err();
    assert!(err.to_string().contains("not a QMP greeting"), "{err}");
}
