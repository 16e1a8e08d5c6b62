// SPDX-License-Identifier: Apache-2.0
//! The IRI conformance suite against the real `iri-machine-provider` binary booting the test
//! guest (`scripts/test-guest`) under QEMU/TCG: profiles core, exec, hotplug and data-plane must pass
//! without a single failure.
//!
//! Not run here: restart (covered by `tests/provider.rs`, which kills the provider itself),
//! scale, and the volume/bucket profiles.

mod common;

use std::{collections::BTreeSet, time::Instant};

use common::{Provider, qemus_under, test_guest};
use iri_api::RuntimeKind;
use iri_conformance::{Config, Outcome, Profile, RunOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_core_exec_hotplug() {
    let guest = test_guest();
    let dir = tempfile::tempdir().expect("tempdir");
    // Room for the 10 parallel creates of the suite; machines are small because TCG boots
    // them all on the test machine's few cores. A short grace period: guests still booting
    // ignore the ACPI power button and are forced off.
    let config = format!(
        r#"
image_dirs = ["{}"]
power_off_grace_seconds = 3
resync_seconds = 2
[[classes]]
name = "tiny"
resources = {{ cpu = 1, memory = 134217728 }}
[capacity]
cpu = 16
memory = 17179869184
[reserve]
memory = 0
[exec]
address = "127.0.0.1:0"
[qemu]
accel = ["tcg"]
"#,
        guest.parent().unwrap().display()
    );
    let mut provider = Provider::start(dir.path(), &config).await;

    let mut suite = Config::default();
    suite.machine.image = format!("file://{}", guest.display());
    suite.machine.console_marker = "IRI-TEST-GUEST READY".into();
    suite.timeouts.rpc_seconds = 10;
    suite.timeouts.ready_seconds = 60;
    suite.timeouts.delete_seconds = 60;
    let profiles = [Profile::Core, Profile::Exec, Profile::Hotplug, Profile::DataPlane];
    let options = RunOptions {
        profiles: profiles.iter().copied().collect::<BTreeSet<_>>(),
        config: suite,
        ..RunOptions::new(RuntimeKind::Machine)
    };
    let started = Instant::now();
    let report = iri_conformance::run(&provider.endpoint(), options)
        .await
        .expect("runtime reachable");
    println!("suite took {:?}", started.elapsed());

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
    provider.stop();
    let left = qemus_under(dir.path());
    assert!(
        problems.is_empty(),
        "{}\n\nprovider log:\n{}",
        problems.join("\n"),
        provider.logs()
    );
    // The suite deletes what it creates: nothing may keep running.
    assert!(left.is_empty(), "QEMU processes left after the suite: {left:?}");
    println!("{}", report.verdict());
}
