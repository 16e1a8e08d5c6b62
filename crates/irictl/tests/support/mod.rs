// SPDX-License-Identifier: Apache-2.0
//! Running the real `irictl` binary against the in-memory reference runtimes over a unix socket.

#![allow(dead_code)]

use std::{path::PathBuf, process::Stdio};

use iri_testing::{
    BucketRuntime, MachineRuntime, Served, VolumeRuntime, serve_bucket_unix, serve_machine_unix,
    serve_volume_unix,
};
use tempfile::TempDir;
use tokio::{io::AsyncWriteExt, process::Command};

/// The path of a file in the repository's `examples/`.
pub fn example(name: &str) -> String {
    format!("{}/../../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The text of a file in `examples/`.
pub fn example_text(name: &str) -> String {
    std::fs::read_to_string(example(name)).unwrap()
}

/// What one irictl run produced.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Asserts success and returns stdout.
    pub fn ok(self) -> String {
        assert_eq!(self.code, Some(0), "irictl failed: {self:#?}");
        assert!(self.stderr.is_empty(), "unexpected stderr: {self:#?}");
        self.stdout
    }

    /// Asserts failure with exactly one `error: ` line on stderr and returns that line.
    pub fn error(self) -> String {
        assert_ne!(self.code, Some(0), "irictl succeeded unexpectedly: {self:#?}");
        assert!(self.code.is_some(), "irictl was killed: {self:#?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one stderr line: {self:#?}");
        assert!(
            lines[0].starts_with("error: "),
            "expected an error line: {self:#?}"
        );
        lines[0].to_string()
    }

    /// Parses stdout as JSON.
    pub fn json(self) -> serde_json::Value {
        let stdout = self.ok();
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
    }
}

/// Runs irictl with `args` (no `--address` added) and optional stdin and environment.
pub async fn irictl_raw(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_irictl"));
    command
        .args(args)
        .env_remove("IRI_MACHINE_RUNTIME_ENDPOINT")
        .env_remove("IRI_VOLUME_RUNTIME_ENDPOINT")
        .env_remove("IRI_BUCKET_RUNTIME_ENDPOINT")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("spawn irictl");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("irictl hung")
        .unwrap();
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// A reference runtime served on a socket in a temporary directory.
pub struct Session {
    /// `unix://<socket>`.
    pub address: String,
    /// The socket path.
    pub socket: PathBuf,
    /// Where tests may write input files.
    pub dir: TempDir,
    _served: Served,
}

impl Session {
    fn with(dir: TempDir, socket: PathBuf, served: Served) -> Self {
        Session {
            address: format!("unix://{}", socket.display()),
            socket,
            dir,
            _served: served,
        }
    }

    fn socket() -> (TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("runtime.sock");
        (dir, socket)
    }

    /// Serves a machine runtime.
    pub async fn machine(runtime: MachineRuntime) -> Self {
        let (dir, socket) = Self::socket();
        let served = serve_machine_unix(runtime, &socket)
            .await
            .expect("serve machine runtime");
        Self::with(dir, socket, served)
    }

    /// Serves a volume runtime.
    pub async fn volume(runtime: VolumeRuntime) -> Self {
        let (dir, socket) = Self::socket();
        let served = serve_volume_unix(runtime, &socket)
            .await
            .expect("serve volume runtime");
        Self::with(dir, socket, served)
    }

    /// Serves a bucket runtime.
    pub async fn bucket(runtime: BucketRuntime) -> Self {
        let (dir, socket) = Self::socket();
        let served = serve_bucket_unix(runtime, &socket)
            .await
            .expect("serve bucket runtime");
        Self::with(dir, socket, served)
    }

    /// Runs `irictl --address <socket> <args>`.
    pub async fn run(&self, args: &[&str]) -> Run {
        self.run_with_stdin(args, None).await
    }

    /// Runs irictl against the runtime with `stdin`.
    pub async fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Run {
        let mut all = vec!["--address", self.address.as_str()];
        all.extend_from_slice(args);
        irictl_raw(&all, stdin, &[]).await
    }

    /// Runs irictl and returns stdout, asserting success.
    pub async fn ok(&self, args: &[&str]) -> String {
        self.run(args).await.ok()
    }

    /// Runs irictl with `-o json` appended and parses the output.
    pub async fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json"]);
        self.run(&all).await.json()
    }

    /// Writes `text` to a file in the session's directory and returns its path.
    pub fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

/// The id in `Created <kind> <id>`.
pub fn created_id(stdout: &str, kind: &str) -> String {
    let id = stdout
        .strip_prefix(&format!("Created {kind} "))
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("unexpected create output: {stdout:?}"));
    assert!(!id.is_empty() && !id.contains(char::is_whitespace), "{stdout:?}");
    id.to_string()
}
