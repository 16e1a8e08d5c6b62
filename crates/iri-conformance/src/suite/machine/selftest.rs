// SPDX-License-Identifier: Apache-2.0
//! The machine catalog against the in-memory reference runtime: it must pass core and hotplug,
//! and exec fails only where the reference has nothing behind its URL.

use std::{collections::BTreeMap, path::Path, time::Duration};

use iri_api::{Endpoint, RuntimeKind};
use iri_testing::{MachineConfig, MachineRuntime, serve_machine_unix};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::exec::WEBSOCKET_ACCEPT;
use crate::{Outcome, Profile, Report, RunOptions};

fn options(profiles: &[Profile]) -> RunOptions {
    let mut options = RunOptions::new(RuntimeKind::Machine);
    options.profiles = profiles.iter().copied().collect();
    options.config.machine.image = "ghcr.io/ironcore-dev/os-images/gardenlinux:latest".into();
    options.config.timeouts.rpc_seconds = 10;
    options.config.timeouts.ready_seconds = 10;
    options.config.timeouts.delete_seconds = 10;
    // The reference's roomiest class holds 10 machines.
    options.config.scale.objects = 8;
    options
}

async fn run(runtime: MachineRuntime, path: &Path, options: RunOptions) -> Report {
    let _served = serve_machine_unix(runtime, path).await.unwrap();
    let report = crate::run(&Endpoint::Unix(path.to_path_buf()), options)
        .await
        .unwrap();
    for test in &report.tests {
        match &test.outcome {
            Outcome::Passed => eprintln!("PASS {}", test.name),
            Outcome::Skipped { reason } => eprintln!("SKIP {}: {reason}", test.name),
            Outcome::Failed(failure) => {
                eprintln!("FAIL {}: {}", test.name, failure.reason);
                for exchange in &failure.exchange {
                    eprintln!(
                        "    {} {} -> {}",
                        exchange.method, exchange.request, exchange.response
                    );
                }
            }
        }
    }
    report
}

fn outcomes(report: &Report) -> BTreeMap<String, &Outcome> {
    report
        .tests
        .iter()
        .map(|t| (t.name.clone(), &t.outcome))
        .collect()
}

/// A local port nothing listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread")]
async fn reference_passes_core_and_hotplug() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = MachineRuntime::new(MachineConfig {
        // Nothing listens behind the exec URL, as with the default config.
        exec_base_url: format!("http://127.0.0.1:{}", closed_port().await),
        ..Default::default()
    });
    let report = run(
        runtime,
        &dir.path().join("machine.sock"),
        options(&[
            Profile::Core,
            Profile::Hotplug,
            Profile::Exec,
            Profile::Restart,
            Profile::Scale,
        ]),
    )
    .await;
    assert!(report.tests.len() >= 29, "{} tests", report.tests.len());
    for test in &report.tests {
        match test.profile {
            Profile::Core | Profile::Hotplug | Profile::Scale => {
                assert_eq!(test.outcome, Outcome::Passed, "{}", test.name)
            }
            Profile::Restart => assert!(
                matches!(&test.outcome, Outcome::Skipped { reason } if reason.contains("restart hook")),
                "{}: {:?}",
                test.name,
                test.outcome
            ),
            // Not selected: a console needs a real guest, which the reference has not.
            Profile::DataPlane => assert!(
                matches!(&test.outcome, Outcome::Skipped { reason } if reason.contains("not selected")),
                "{}: {:?}",
                test.name,
                test.outcome
            ),
            Profile::Exec if test.name.ends_with("exec_url_accepts_websocket") => assert!(
                matches!(&test.outcome, Outcome::Failed(f) if f.reason.contains("cannot connect")),
                "{}: {:?}",
                test.name,
                test.outcome
            ),
            _ => assert_eq!(test.outcome, Outcome::Passed, "{}", test.name),
        }
    }
}

/// With a streaming server behind the URL (played by this test, redeeming the reference's exec
/// tokens), the exec profile passes: the WebSocket check can pass, not only fail.
#[tokio::test(flavor = "multi_thread")]
async fn exec_passes_with_a_streaming_server() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let runtime = MachineRuntime::new(MachineConfig {
        exec_base_url: format!("http://{}", listener.local_addr().unwrap()),
        ..Default::default()
    });
    let tokens = runtime.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut head = vec![0u8; 4096];
            let n = socket.read(&mut head).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&head[..n]).into_owned();
            let path = head.split(' ').nth(1).unwrap_or("");
            let answer = if tokens.take_exec_session(path).is_some() {
                format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: {WEBSOCKET_ACCEPT}\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
            };
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    let mut options = options(&[Profile::Exec]);
    options.focus = Some(regex::Regex::new("^machine/exec/").unwrap());
    let report = run(runtime, &dir.path().join("machine.sock"), options).await;
    let outcomes = outcomes(&report);
    for name in [
        "machine/exec/exec_returns_url",
        "machine/exec/exec_unknown_machine_is_not_found",
        "machine/exec/exec_url_accepts_websocket",
    ] {
        assert_eq!(outcomes.get(name), Some(&&Outcome::Passed), "{name}");
    }
}

/// The scale test with a runtime roomy enough for a few hundred machines.
#[tokio::test(flavor = "multi_thread")]
async fn list_at_scale_with_room() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = MachineRuntime::new(MachineConfig {
        classes: vec![(
            "roomy".into(),
            BTreeMap::from([("cpu".into(), 1), ("memory".into(), 1 << 30)]),
            500,
        )],
        ..Default::default()
    });
    let mut options = options(&[Profile::Scale]);
    options.config.scale.objects = 300;
    options.config.timeouts.delete_seconds = 30;
    let report = run(runtime, &dir.path().join("machine.sock"), options).await;
    assert_eq!(
        outcomes(&report).get("machine/scale/list_at_scale"),
        Some(&&Outcome::Passed)
    );
    // The reference is in memory: anything slow here is the suite's own overhead.
    assert!(report.duration < Duration::from_secs(60), "{:?}", report.duration);
}

/// The restart test runs the hook: a hook that succeeds without restarting anything passes
/// against the reference (its state is untouched), a failing hook fails the test with its
/// output.
#[tokio::test(flavor = "multi_thread")]
async fn restart_runs_the_hook() {
    for (hook, passes) in [("true", true), ("echo restart broke >&2; exit 3", false)] {
        let dir = tempfile::tempdir().unwrap();
        let mut options = options(&[Profile::Restart]);
        options.config.hooks.restart = hook.into();
        let report = run(
            MachineRuntime::default(),
            &dir.path().join("machine.sock"),
            options,
        )
        .await;
        let outcome = outcomes(&report)
            .get("machine/restart/objects_survive_restart")
            .cloned()
            .cloned();
        match outcome {
            Some(Outcome::Passed) => assert!(passes, "{hook}"),
            Some(Outcome::Failed(f)) => {
                assert!(!passes && f.reason.contains("restart broke"), "{hook}: {f:?}")
            }
            other => panic!("{hook}: {other:?}"),
        }
    }
}
