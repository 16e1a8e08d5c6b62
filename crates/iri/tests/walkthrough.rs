// SPDX-License-Identifier: Apache-2.0
//! The README's walk-through, run as written: every ```sh block between `<!-- walkthrough -->`
//! and `<!-- /walkthrough -->` in one bash (`set -euo pipefail`), as a newcomer types them into
//! one shell, against a fresh `iri up` (the built binary) whose data directory is `IRI_DATA`.
//! Each block's output must show what the README promises: the guest's console marker and
//! its view of the volume it booted from (made from the disk image, UEFI), a ready snapshot, a clone holding the data the guest wrote, an S3
//! object read back.

mod support;

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::{Node, Settings, skip_reason, workspace};

/// Per block (found by a command it contains): what its output must contain.
const EXPECTED: &[(&str, &[&str])] = &[
    ("irictl machine get status", &["small", "Quantity"]),
    ("scripts/test-guest", &["test guest:"]),
    (
        "irictl machine create machine",
        &["VOLUME_AVAILABLE", "nbd+unix:///", "MACHINE_"],
    ),
    (
        "irictl machine exec",
        &[
            "IRI-TEST-GUEST READY",
            "IRI-REPORT hostname demo",
            "IRI-REPORT firmware uefi",
            "IRI-REPORT disk vda 1073741824 ",
        ],
    ),
    (
        "create volumesnapshot",
        &["VOLUME_SNAPSHOT_READY", " 2Gi ", "hello.from.the.g"],
    ),
    (
        "irictl bucket create",
        &[
            "BUCKET_AVAILABLE",
            "BUCKET_NAME=",
            "hello.txt 17",
            "hello from boto3",
        ],
    ),
    ("irictl machine delete", &["deleted"]),
];

/// The whole walk-through may take this long (a cold `cargo build -p irictl` included).
const TIMEOUT: Duration = Duration::from_secs(420);

const MARKER: &str = "@@ walkthrough block ";

#[test]
fn readme_walkthrough_runs_as_written() {
    let boto3 = Command::new("python3")
        .args(["-c", "import boto3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let reason = skip_reason(&["qemu-io"])
        .or_else(|| (!boto3).then(|| "python3 has no boto3 (scripts/test installs it)".to_string()));
    if let Some(reason) = reason {
        eprintln!("SKIP readme_walkthrough_runs_as_written: {reason}");
        return;
    }
    let root = workspace();
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = walkthrough_blocks(&readme);
    assert!(
        blocks.len() >= EXPECTED.len(),
        "{} blocks in the walk-through",
        blocks.len()
    );
    for (command, _) in EXPECTED {
        let n = blocks.iter().filter(|b| b.contains(command)).count();
        assert_eq!(n, 1, "{n} walk-through blocks contain {command:?}");
    }

    let node = Node::start("w", &Settings::default());
    let notice = node.notice();
    assert!(
        notice.contains("running machines keep running"),
        "without --stop-machines Ctrl-C leaves machines running: {notice}"
    );

    let mut script = String::from("set -euo pipefail\n");
    for (i, block) in blocks.iter().enumerate() {
        script.push_str(&format!("echo \"{MARKER}{i} at ${{SECONDS}}s\"\n{block}\n"));
    }
    script.push_str(&format!("echo \"{MARKER}end at ${{SECONDS}}s\"\n"));
    let script_path = node.data.join("walkthrough.sh");
    fs::write(&script_path, script).unwrap();
    let output_path = node.data.join("walkthrough.out");
    let started = Instant::now();
    let status = run_bash(&root, &script_path, &output_path, &node.data);
    let output = fs::read_to_string(&output_path).unwrap_or_default();
    let sections = split_output(&output);
    let ran = sections.len();
    match status {
        Some(status) if status.success() && output.contains(&format!("{MARKER}end")) => {}
        other => {
            let failed = ran.saturating_sub(1);
            panic!(
                "walk-through block {failed} failed ({}) after {:?}:\n--- block ---\n{}\n--- output ---\n{}",
                other.map_or("timed out".to_string(), |s| s.to_string()),
                started.elapsed(),
                blocks.get(failed).map_or("", String::as_str),
                output
            );
        }
    }
    eprintln!("walk-through ran in {:?}", started.elapsed());
    for (command, expected) in EXPECTED {
        let i = blocks.iter().position(|b| b.contains(command)).unwrap();
        let shown = sections.get(i).map_or("", String::as_str);
        for text in *expected {
            assert!(
                shown.contains(text),
                "block {i} ({command}) does not show {text:?}:\n{shown}"
            );
        }
    }
    node.stop();
}

/// The ```sh blocks of the walk-through region, in order.
fn walkthrough_blocks(readme: &str) -> Vec<String> {
    let start = readme
        .find("<!-- walkthrough -->")
        .expect("README.md has a <!-- walkthrough --> region");
    let end = readme[start..]
        .find("<!-- /walkthrough -->")
        .map(|e| start + e)
        .expect("the walk-through region ends with <!-- /walkthrough -->");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme[start..end].lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(
        current.is_none(),
        "an unterminated ```sh block in the walk-through"
    );
    blocks
}

/// The output of each block, by the markers echoed before them (a block's output need not end
/// with a newline: the console's does not).
fn split_output(output: &str) -> Vec<String> {
    let mut sections: Vec<String> = Vec::new();
    for line in output.lines() {
        let (text, marker) = match line.find(MARKER) {
            Some(at) => (&line[..at], Some(&line[at + MARKER.len()..])),
            None => (line, None),
        };
        if let Some(section) = sections.last_mut() {
            section.push_str(text);
            section.push('\n');
        }
        if let Some(marker) = marker {
            eprintln!("walk-through block {marker}");
        }
        if marker.is_some_and(|m| !m.starts_with("end")) {
            sections.push(String::new());
        }
    }
    sections
}

/// Runs the script from the repository's top, as the README says, with the environment a
/// reader has: cargo in PATH, no endpoints set, `IRI_DATA` naming the node. None: timed out.
fn run_bash(root: &Path, script: &Path, output: &Path, data: &Path) -> Option<std::process::ExitStatus> {
    use std::os::unix::process::CommandExt;
    let out = fs::File::create(output).unwrap();
    let mut command = Command::new("bash");
    command
        .arg(script)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .env("IRI_DATA", data)
        .env("PATH", support::path_with_cargo())
        .process_group(0);
    // The test's own cargo variables would make the README's `cargo build` see another package.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("IRI_")
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || ["CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR"].contains(&key.as_ref())
        {
            command.env_remove(key.as_ref());
        }
    }
    command.env("IRI_DATA", data);
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
