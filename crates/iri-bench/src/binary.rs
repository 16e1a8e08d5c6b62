// SPDX-License-Identifier: Apache-2.0
//! The provider binaries a benchmark starts: where they are found, and the processes.

use std::{
    fs::File,
    future::Future,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use iri_api::Endpoint;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tonic::transport::Channel;

/// The binary `name` (e.g. `iri-volume-provider`, of crate `package`): `explicit`
/// (`--provider-bin`), else the environment variable `env` (e.g. `IRI_VOLUME_PROVIDER_BIN`),
/// else next to this executable (`target/<profile>/`, also from `target/<profile>/deps` where
/// test executables live), else `target/release/` and `target/debug/` under the current
/// directory, else on the PATH.
pub fn find(name: &str, package: &str, env: &str, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--provider-bin {}: no such file", path.display());
        }
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(name));
        if let Some(parent) = dir.parent() {
            candidates.push(parent.join(name));
        }
    }
    candidates.push(PathBuf::from("target/release").join(name));
    candidates.push(PathBuf::from("target/debug").join(name));
    if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
        return Ok(std::path::absolute(&found).unwrap_or(found));
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .with_context(|| {
            format!("{name} not found: build it (cargo build --release -p {package}) or pass --provider-bin")
        })
}

/// How long a provider may take to serve.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a provider may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A provider process a benchmark started: `--data-dir`, `--address`, `--config`, its stderr
/// in a log file. Dropping it stops it.
pub struct Process {
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `binary` on `data_dir`, serving IRI on `socket`, with `config`; stderr to `log`.
    pub fn spawn(
        binary: &Path,
        data_dir: &Path,
        socket: &Path,
        config: &Path,
        log: &Path,
    ) -> Result<Process> {
        let file = File::create(log).context("creating the provider log")?;
        let child = Command::new(binary)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--address")
            .arg(socket)
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Process {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Waits until the provider serves on `socket`: `client` makes the runtime's client of a
    /// channel and returns it once Version answers.
    pub async fn wait_serving<C, F, Fut>(&mut self, socket: &Path, client: F) -> Result<C>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Option<C>>,
    {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("the provider exited with {status}:\n{}", self.log_tail());
            }
            if let Ok(channel) = Endpoint::Unix(socket.to_path_buf())
                .connect(Duration::from_secs(2))
                .await
                && let Some(client) = client(channel).await
            {
                return Ok(client);
            }
            if Instant::now() > deadline {
                bail!(
                    "the provider does not serve after {START_TIMEOUT:?}:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops it: SIGTERM, SIGKILL after a timeout. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}
