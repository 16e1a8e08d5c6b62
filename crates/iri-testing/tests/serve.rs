// SPDX-License-Identifier: Apache-2.0
//! Serving on unix sockets, and the `iri-reference-runtime` binary.

mod common;

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use iri_api::{
    bucket::v1alpha1::VersionRequest as BucketVersion, machine::v1alpha1::VersionRequest as MachineVersion,
    volume::v1alpha1::VersionRequest as VolumeVersion,
};
use iri_testing::{MachineRuntime, VolumeRuntime, serve_machine_unix, serve_volume_unix};

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[tokio::test]
async fn socket_is_private_and_removed_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock");
    let served = serve_machine_unix(MachineRuntime::default(), &path)
        .await
        .unwrap();
    assert_eq!(served.path, path);
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let mut client = iri_api::endpoint::clients::machine(common::connect(&path).await);
    client.version(MachineVersion::default()).await.unwrap();
    drop(served);
    assert!(!path.exists(), "socket removed on drop");
    // Connected clients are sent away gracefully; they fail soon after.
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.version(MachineVersion::default()).await.is_ok() {
        assert!(Instant::now() < deadline, "server still answering after drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn shutdown_waits_briefly_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let served = serve_volume_unix(VolumeRuntime::default(), &path).await.unwrap();
    // A connected client must not keep shutdown hanging.
    let mut client = iri_api::endpoint::clients::volume(common::connect(&path).await);
    client.version(VolumeVersion::default()).await.unwrap();
    let started = Instant::now();
    served.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(!path.exists());
}

#[tokio::test]
async fn stale_sockets_are_replaced_but_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(is_socket(&path));
    let served = serve_machine_unix(MachineRuntime::default(), &path)
        .await
        .unwrap();
    common::connect(&path).await;

    // A second server on the same path while the first is alive is refused: two runtimes must
    // never fight over one socket.
    let err = serve_machine_unix(MachineRuntime::default(), &path)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    let mut client = iri_api::endpoint::clients::machine(common::connect(&path).await);
    client.version(MachineVersion::default()).await.unwrap();
    drop(served);
    assert!(!path.exists());

    let file = dir.path().join("regular");
    std::fs::write(&file, b"keep me").unwrap();
    let err = serve_machine_unix(MachineRuntime::default(), &file)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn binary_help_says_it_is_a_test_double() {
    let out = Command::new(env!("CARGO_BIN_EXE_iri-reference-runtime"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "TEST DOUBLE",
        "--machine-address",
        "--volume-address",
        "--bucket-address",
        "--dir",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}

#[tokio::test]
async fn binary_serves_all_three_until_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let bucket_path = dir.path().join("custom-bucket.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_iri-reference-runtime"))
        .arg("--dir")
        .arg(dir.path().join("sockets"))
        .arg("--bucket-address")
        .arg(format!("unix://{}", bucket_path.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let machine_path = dir.path().join("sockets/machine.sock");
    let volume_path = dir.path().join("sockets/volume.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(is_socket(&machine_path) && is_socket(&volume_path) && is_socket(&bucket_path)) {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("sockets did not appear: {}", String::from_utf8_lossy(&out.stderr));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut machine = iri_api::endpoint::clients::machine(common::connect(&machine_path).await);
    let mut volume = iri_api::endpoint::clients::volume(common::connect(&volume_path).await);
    let mut bucket = iri_api::endpoint::clients::bucket(common::connect(&bucket_path).await);
    assert_eq!(
        machine
            .version(MachineVersion::default())
            .await
            .unwrap()
            .into_inner()
            .runtime_name,
        "iri-reference-machine"
    );
    assert_eq!(
        volume
            .version(VolumeVersion::default())
            .await
            .unwrap()
            .into_inner()
            .runtime_name,
        "iri-reference-volume"
    );
    assert_eq!(
        bucket
            .version(BucketVersion::default())
            .await
            .unwrap()
            .into_inner()
            .runtime_name,
        "iri-reference-bucket"
    );
    drop((machine, volume, bucket));

    // Ctrl-C.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not stop on SIGINT");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.success(),
        "exit {status:?}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("TEST DOUBLE"), "{stdout}");
    assert!(
        stdout.contains(&format!("unix://{}", machine_path.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("unix://{}", bucket_path.display())),
        "{stdout}"
    );
    assert!(!machine_path.exists() && !volume_path.exists() && !bucket_path.exists());
}
