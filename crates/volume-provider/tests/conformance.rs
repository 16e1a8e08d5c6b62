// SPDX-License-Identifier: Apache-2.0
//! The IRI conformance suite against the real `iri-volume-provider` binary: profiles core, data-plane,
//! expand, snapshots, encryption and restart must pass without a single failure. Needs qemu-utils.
//!
//! Volumes from images use a raw file in an image directory the provider is configured with;
//! the restart hook stops the provider with SIGTERM and starts it again. Not run here: scale
//! (1,000 objects: a benchmark's job, not CI's).

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use iri_api::{Endpoint, RuntimeKind, volume::v1alpha1::VersionRequest};
use iri_conformance::{Config, Outcome, Profile, RunOptions};
use nix::{sys::signal::Signal, unistd::Pid};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_every_profile_that_applies() {
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
    // The provider runs under a small control script, so that the suite's restart hook can stop
    // it (SIGTERM, as an operator would) and start it again on the same data directory.
    let control = dir.path().join("provider.sh");
    std::fs::write(
        &control,
        format!(
            r#"#!/bin/sh
set -eu
pidfile={pidfile:?}
alive() {{ [ -e "/proc/$1" ] && ! grep -q '^[0-9]* (.*) Z' "/proc/$1/stat" 2>/dev/null; }}
stop() {{
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  while alive "$pid"; do sleep 0.05; done
  rm -f "$pidfile"
}}
start() {{
  RUST_LOG="${{RUST_LOG:-info}}" setsid {bin:?} --config {config:?} --data-dir {data:?} --address {socket:?} \
    >>{log:?} 2>&1 </dev/null &
  echo $! >"$pidfile"
}}
case "$1" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
esac
"#,
            pidfile = dir.path().join("provider.pid"),
            bin = env!("CARGO_BIN_EXE_iri-volume-provider"),
            config = provider_config,
            data = data_dir,
            socket = socket,
            log = log,
        ),
    )
    .expect("control script");
    let control_cmd = |action: &str| {
        let status = Command::new("sh")
            .arg(&control)
            .arg(action)
            .status()
            .expect("run provider.sh");
        assert!(status.success(), "provider.sh {action}: {status}");
    };
    control_cmd("start");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    let endpoint = Endpoint::Unix(socket.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
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
    config.hooks.restart = format!("sh {} restart", control.display());
    let profiles = [
        Profile::Core,
        Profile::Expand,
        Profile::Snapshots,
        Profile::DataPlane,
        Profile::Encryption,
        Profile::Restart,
    ];
    let options = RunOptions {
        profiles: profiles.iter().copied().collect::<BTreeSet<_>>(),
        config,
        ..RunOptions::new(RuntimeKind::Volume)
    };
    let report = iri_conformance::run(&endpoint, options)
        .await
        .expect("runtime reachable");

    control_cmd("stop");
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
    for name in ["volume_from_image", "restart"] {
        assert!(
            report
                .tests
                .iter()
                .any(|t| t.name.contains(name) && t.outcome == Outcome::Passed),
            "a {name} test must run and pass"
        );
    }
    assert!(
        problems.is_empty(),
        "{}\n\nprovider log:\n{}",
        problems.join("\n"),
        logs()
    );
    println!("{}", report.verdict());
}
