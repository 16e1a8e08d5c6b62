// SPDX-License-Identifier: Apache-2.0
//! A data directory too deep for the machines' unix sockets is refused at start, saying why,
//! instead of leaving every machine PENDING.

use std::process::Command;

#[test]
fn a_data_directory_too_long_for_machine_sockets_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("d".repeat(60)).join("e".repeat(40));
    let output = Command::new(env!("CARGO_BIN_EXE_iri-machine-provider"))
        .arg("--data-dir")
        .arg(&deep)
        .arg("--address")
        .arg(dir.path().join("machine.sock"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("too long"), "{stderr}");
    assert!(!deep.exists(), "nothing is created in a refused directory");
}
