// SPDX-License-Identifier: Apache-2.0
//! The IRI conformance suite against the real `iri-volume-provider` binary: profiles core, data-plane,
//! expand, snapshots and encryption must pass without a single failure. Needs qemu-utils.
//!
//! Volumes from images use a raw file in an image directory the provider is configured with.
//! Not run here: restart
//! (covered by `tests/provider.rs`, which can restart the process itself), scale.

use std::{
    collections::BTreeSet,
    fs::File,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use iri_api::{Endpoint, RuntimeKind, volume::v1alpha1::VersionRequest};
use iri_conformance::{Config, Outcome, Profile, RunOptions};
use nix::{sys::signal::Signal, unistd::Pid};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_core_expand_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let socket = dir.path().join("volume.sock");
    let log = dir.path().join("provider.log");
    // An image for the create-from-image test, in a directory the provider may read images from.
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).expect("image dir");
    std::fs::write(images.join("os.raw"), vec![0x42u8; 1 << 20]).expect("image");
    let provider_config = dir.path().join("provider.toml");
    std::fs::write(
        &provider_config,
        format!("[local]\nimage_dirs = [{:?}]\n", images.display().to_string()),
    )
    .expect("provider config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_iri-volume-provider"))
        .arg("--config")
        .arg(&provider_config)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--address")
        .arg(&socket)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("log file"))
        .spawn()
        .expect("start iri-volume-provider");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    let endpoint = Endpoint::Unix(socket.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("provider exited with {status}:\n{}", logs());
        }
        if let Ok(channel) = endpoint.connect(Duration::from_secs(2)).await
            && iri_api::endpoint::clients::volume(channel)
                .version(VersionRequest::default())
                .await
                .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "provider not serving:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut config = Config::default();
    config.timeouts.rpc_seconds = 10;
    config.timeouts.ready_seconds = 60;
    config.timeouts.delete_seconds = 60;
    config.volume.size_bytes = 64 << 20;
    config.volume.image = format!("file://{}", images.join("os.raw").display());
    let profiles = [
        Profile::Core,
        Profile::Expand,
        Profile::Snapshots,
        Profile::DataPlane,
        Profile::Encryption,
    ];
    let options = RunOptions {
        profiles: profiles.iter().copied().collect::<BTreeSet<_>>(),
        config,
        ..RunOptions::new(RuntimeKind::Volume)
    };
    let report = iri_conformance::run(&endpoint, options)
        .await
        .expect("runtime reachable");

    let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let _ = child.wait();
    // The storage daemon outlives the provider by design; the test's daemon goes with the test.
    if let Ok(pid) = std::fs::read_to_string(data_dir.join("local/daemon/pid"))
        && let Ok(pid) = pid.trim().parse::<i32>()
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*data_dir.to_string_lossy()))
    {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }

    let mut problems = Vec::new();
    for test in report.tests.iter().filter(|t| profiles.contains(&t.profile)) {
        match &test.outcome {
            Outcome::Passed => println!("passed  {} ({:?})", test.name, test.duration),
            Outcome::Skipped { reason } => println!("skipped {}: {reason}", test.name),
            Outcome::Failed(failure) => problems.push(format!(
                "FAILED {}: {}\n    {:#?}",
                test.name, failure.reason, failure.exchange
            )),
        }
    }
    assert!(
        report
            .tests
            .iter()
            .any(|t| t.name.ends_with("volume_from_image") && t.outcome == Outcome::Passed),
        "the create-from-image test must run and pass"
    );
    assert!(
        problems.is_empty(),
        "{}\n\nprovider log:\n{}",
        problems.join("\n"),
        logs()
    );
    println!("{}", report.verdict());
}
