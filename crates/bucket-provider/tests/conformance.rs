// SPDX-License-Identifier: Apache-2.0
//! The IRI conformance suite against the real `iri-bucket-provider` binary: profiles core,
//! data-plane (boto3 through the returned access), restart and scale must pass without a
//! single failure or skip. Needs python3 with boto3.
//!
//! The restart hook asks this test to restart the provider (through a request file, since the
//! test owns the process), and the test restarts it the hard way: kill -9, then start again.

mod common;

use std::{collections::BTreeSet, time::Duration};

use iri_api::{Endpoint, RuntimeKind};
use iri_conformance::{Config, Outcome, Profile, RunOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_core_data_plane_restart_scale() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut provider = common::Provider::start(dir.path(), "");
    provider.client().await;
    let socket = provider.socket.clone();

    // Restarts on request of the hook, until told to stop; hands the provider back.
    let request = dir.path().join("restart.request");
    let done = dir.path().join("restart.done");
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let restarter = {
        let (request, done) = (request.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                if stopped.try_recv().is_ok() {
                    return provider;
                }
                if std::fs::remove_file(&request).is_ok() {
                    provider.kill();
                    provider.spawn();
                    provider.client().await;
                    std::fs::write(&done, b"").expect("write restart.done");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let mut config = Config::default();
    config.hooks.restart = format!(
        "touch '{}' && while [ ! -e '{}' ]; do sleep 0.05; done && rm -f '{}'",
        request.display(),
        done.display(),
        done.display()
    );
    config.timeouts.rpc_seconds = 10;
    config.timeouts.ready_seconds = 30;
    config.timeouts.delete_seconds = 30;
    let profiles = [
        Profile::Core,
        Profile::DataPlane,
        Profile::Restart,
        Profile::Scale,
    ];
    let options = RunOptions {
        profiles: profiles.iter().copied().collect::<BTreeSet<_>>(),
        config,
        ..RunOptions::new(RuntimeKind::Bucket)
    };
    let report = iri_conformance::run(&Endpoint::Unix(socket), options)
        .await
        .expect("runtime reachable");
    let _ = stop.send(());
    let mut provider = restarter.await.expect("restarter");
    provider.stop();

    let mut problems = Vec::new();
    let mut data_plane = 0;
    let mut restarts = 0;
    for test in report.tests.iter().filter(|t| profiles.contains(&t.profile)) {
        match &test.outcome {
            Outcome::Passed => {
                println!("passed  {} ({:?})", test.name, test.duration);
                data_plane += usize::from(test.profile == Profile::DataPlane);
                restarts += usize::from(test.profile == Profile::Restart);
            }
            // A skipped data-plane check (no boto3) would hide exactly what this test is for.
            Outcome::Skipped { reason } => problems.push(format!("SKIPPED {}: {reason}", test.name)),
            Outcome::Failed(failure) => problems.push(format!(
                "FAILED {}: {}\n    {:#?}",
                test.name, failure.reason, failure.exchange
            )),
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\nprovider log:\n{}",
        problems.join("\n"),
        provider.logs()
    );
    assert_eq!(data_plane, 3, "the three bucket data-plane tests must run");
    assert_eq!(restarts, 1, "the bucket restart test must run");
    println!("{}", report.verdict());
}
