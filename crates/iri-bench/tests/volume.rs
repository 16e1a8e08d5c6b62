// SPDX-License-Identifier: Apache-2.0
//! `iri-bench volume` end to end with small sizes: it starts the real provider, prints both
//! tables, writes JSON, and leaves no process and no file behind. Needs qemu-utils and the
//! `iri-volume-provider` binary next to `iri-bench` (built here when missing).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

/// The provider binary of this build profile, built when missing.
fn provider_binary() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_iri-bench"));
    let provider = bench.with_file_name("iri-volume-provider");
    if !provider.is_file() {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "volume-provider", "--bin", "iri-volume-provider"]);
        if bench.parent().is_some_and(|d| d.ends_with("release")) {
            build.arg("--release");
        }
        // Cargo releases the target directory's lock before it runs tests, so this does not wait
        // on our own `cargo test`; the timeout guards against waiting forever on anything else.
        let mut child = build.spawn().expect("run cargo build -p volume-provider");
        let deadline = Instant::now() + Duration::from_secs(600);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for cargo") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("cargo build -p volume-provider took more than 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(status.success(), "cargo build -p volume-provider failed");
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
fn volume_benchmark_runs_end_to_end() {
    let provider = provider_binary();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("result.json");
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_iri-bench"))
        .args([
            "volume",
            "--iterations",
            "1",
            "--small-size",
            "16MiB",
            "--large-size",
            "64MiB",
        ])
        .args(["--io-size", "16MiB", "--io-runs", "1"])
        .arg("--provider-bin")
        .arg(&provider)
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run iri-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "iri-bench failed:\n{stdout}\n{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );

    for expected in [
        "| create    | 16 MiB |",
        "| clone     | 64 MiB |",
        "| seq read    | 1 MiB |",
        "| rand write  | 4 KiB |",
        "export/file",
        "QEMU: qemu-img version",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing in:\n{stdout}");
    }
    assert!(!stdout.contains("was not measured"), "{stdout}");

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let lifecycle = &report["lifecycle"];
    assert_eq!(lifecycle["sizes"]["large_bytes"], 64 << 20);
    let operations = lifecycle["operations"].as_array().unwrap();
    assert_eq!(operations.len(), 3);
    for op in operations {
        assert!(op["small"]["summary"]["p50"].as_f64().unwrap() > 0.0, "{op}");
        assert!(op["ratio_p50"].as_f64().unwrap() > 0.0, "{op}");
    }
    let tests = report["io"]["tests"].as_array().unwrap();
    assert_eq!(tests.len(), 6);
    for test in tests {
        for side in ["file", "export"] {
            assert!(test[side]["mb_per_s"].as_f64().unwrap() > 0.0, "{test}");
        }
        assert!(test["ratio"].as_f64().unwrap() > 0.0, "{test}");
    }

    // Nothing left: the provider and its storage daemon are gone, and so is the run's directory.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_mentioning(dir.path()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        processes_mentioning(dir.path()),
        Vec::<String>::new(),
        "processes left"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "result.json")
        .collect();
    assert!(left.is_empty(), "files left: {left:?}");
}
