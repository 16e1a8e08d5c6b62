// SPDX-License-Identifier: Apache-2.0
//! `iri-bench machine` end to end with one iteration and few machines: it starts the real
//! provider, boots the test guest under TCG both bare and through the provider, prints every
//! table, writes JSON, and leaves no process and no file behind. Needs qemu-system-x86,
//! qemu-utils, the test guest (`scripts/test-guest`, built by the benchmark when missing) and
//! the `iri-machine-provider` binary next to `iri-bench` (built here when missing).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

/// The provider binary of this build profile, built when missing.
fn provider_binary() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_iri-bench"));
    let provider = bench.with_file_name("iri-machine-provider");
    if !provider.is_file() {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "machine-provider", "--bin", "iri-machine-provider"]);
        if bench.parent().is_some_and(|d| d.ends_with("release")) {
            build.arg("--release");
        }
        let mut child = build.spawn().expect("run cargo build -p machine-provider");
        let deadline = Instant::now() + Duration::from_secs(600);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for cargo") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("cargo build -p machine-provider took more than 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(status.success(), "cargo build -p machine-provider failed");
    }
    assert!(provider.is_file(), "{} missing", provider.display());
    provider
}

/// Pids of live processes whose command line mentions `path`.
fn processes_mentioning(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            !zombie
                && std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn machine_benchmark_runs_end_to_end() {
    let provider = provider_binary();
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("result.json");
    let started = Instant::now();
    // The run's directory stays the default (/tmp/ib-XXXXXX): QEMU's socket paths under a
    // deeper one would exceed the 107 bytes of a unix socket path.
    let output = Command::new(env!("CARGO_BIN_EXE_iri-bench"))
        .args([
            "machine",
            "--iterations",
            "1",
            "--no-warmup",
            "--concurrency",
            "1",
        ])
        .args(["--machines", "3", "--running", "1", "--settle", "1"])
        .arg("--provider-bin")
        .arg(&provider)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run iri-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "iri-bench failed:\n{stdout}\n{stderr}");
    eprintln!("iri-bench machine took {:?}", started.elapsed());

    for expected in [
        "| bare QEMU start to marker ",
        "| CreateMachine to marker (Exec) ",
        "| CreateMachine to RUNNING (QEMU started) ",
        "| 1                ",
        "3 machines defined, powered off",
        "QEMU, per machine",
        "-machine q35 -accel tcg -smp 1 -m 256M",
        "QEMU processes of the run left after that: 0.",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing in:\n{stdout}");
    }

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let boot = &report["boot"];
    for key in ["bare", "provider_marker", "provider_running"] {
        assert!(boot[key]["p50"].as_f64().unwrap() > 0.0, "{key}: {boot}");
    }
    assert!(boot["ratio_p50"].as_f64().unwrap() > 0.0, "{boot}");
    // RUNNING comes before the guest prints its marker.
    assert!(boot["provider_running"]["p50"].as_f64() < boot["provider_marker"]["p50"].as_f64());
    let level = &report["throughput"]["levels"][0];
    assert_eq!(level["concurrency"], 1);
    assert!(level["per_minute"].as_f64().unwrap() > 0.0, "{level}");
    let memory = &report["memory"];
    for key in ["idle_bytes", "defined_off_bytes", "with_running_bytes"] {
        assert!(memory[key].as_u64().unwrap() > 1 << 20, "{key}: {memory}");
    }
    assert_eq!(memory["qemu_rss_bytes"].as_array().unwrap().len(), 1, "{memory}");
    assert_eq!(report["leftover_qemus"], 0);

    // Nothing left: no process mentions the run's directory, and the directory is gone.
    let dir = stderr
        .lines()
        .find_map(|l| l.split_once(", directory ").map(|(_, d)| PathBuf::from(d.trim())))
        .expect("the run's directory on stderr");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_mentioning(&dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_mentioning(&dir), Vec::<String>::new(), "processes left");
    assert!(!dir.exists(), "{} left", dir.display());
}
