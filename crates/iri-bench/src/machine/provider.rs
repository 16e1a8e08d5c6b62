// SPDX-License-Identifier: Apache-2.0
//! The `iri-machine-provider` under test: a black box started as a binary on a fresh data
//! directory with a configuration written by the benchmark (TCG only, the test guest's
//! directory as the one image directory), and stopped afterwards. Machines outlive the provider
//! by design: the benchmark deletes them through IRI before it stops the provider, and then
//! kills any QEMU still named by a pid file under the data directory (or mentioning the run's
//! directory on its command line).

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use iri_api::{Endpoint, endpoint::clients, machine::v1alpha1::VersionRequest};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::rpc::Client;

/// The class of the boot and throughput measurements.
pub const CLASS: &str = "bench";
/// The class of the machines of the memory measurement.
pub const SMALL_CLASS: &str = "bench-small";

/// How long the provider may take to serve.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the provider may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running provider. Dropping it stops the provider and kills every QEMU of its data
/// directory (delete the machines through IRI first: that is the clean way).
pub struct Provider {
    child: Option<Child>,
    /// The run's directory.
    pub root: PathBuf,
    /// The provider's data directory.
    pub data_dir: PathBuf,
    /// The IRI socket.
    pub socket: PathBuf,
    /// The provider's log (stderr).
    pub log: PathBuf,
}

/// Where to find `iri-machine-provider`: see [`crate::binary::find`] (`$IRI_MACHINE_PROVIDER_BIN`).
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    crate::binary::find(
        "iri-machine-provider",
        "machine-provider",
        "IRI_MACHINE_PROVIDER_BIN",
        explicit,
    )
}

/// The provider's configuration: two classes of one vCPU (`memory` and `small_memory` bytes),
/// capacity for `machines` of the larger one, TCG only, the guest's parent as image directory.
pub fn config(guest: &Path, memory: u64, small_memory: u64, machines: usize, qemu: &Path) -> String {
    let image_dir = guest.parent().unwrap_or(guest);
    let capacity_memory = memory.max(small_memory) * (machines as u64 + 1);
    format!(
        r#"image_dirs = ["{}"]
power_off_grace_seconds = 5
[[classes]]
name = "{CLASS}"
resources = {{ cpu = 1, memory = {memory} }}
[[classes]]
name = "{SMALL_CLASS}"
resources = {{ cpu = 1, memory = {small_memory} }}
[capacity]
cpu = {}
memory = {capacity_memory}
[reserve]
cpu = 0
memory = 0
[exec]
address = "127.0.0.1:0"
[qemu]
binary = "{}"
# /dev/kvm may exist without working (nested virtualization): TCG for every run.
accel = ["tcg"]
"#,
        image_dir.display(),
        machines + 1,
        qemu.display()
    )
}

/// The provider's data directory in the run's directory `root` (short: QEMU's socket paths
/// under it must stay below 108 bytes).
pub fn data_dir(root: &Path) -> PathBuf {
    root.join("d")
}

impl Provider {
    /// Starts `binary` on `root/d` with `config`, serving `root/machine.sock`, and waits
    /// until it answers Version.
    pub async fn start(binary: &Path, root: &Path, config: &str) -> Result<(Provider, Client)> {
        let config_path = root.join("provider.toml");
        std::fs::write(&config_path, config).context("writing the provider config")?;
        let mut provider = Provider {
            child: None,
            root: root.to_path_buf(),
            data_dir: data_dir(root),
            socket: root.join("machine.sock"),
            log: root.join("provider.log"),
        };
        let log = File::create(&provider.log).context("creating the provider log")?;
        let child = Command::new(binary)
            .arg("--data-dir")
            .arg(&provider.data_dir)
            .arg("--address")
            .arg(&provider.socket)
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        provider.child = Some(child);
        let client = provider.connect().await?;
        Ok((provider, client))
    }

    async fn connect(&mut self) -> Result<Client> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("the provider exited with {status}:\n{}", self.log_tail());
            }
            if let Ok(channel) = Endpoint::Unix(self.socket.clone())
                .connect(Duration::from_secs(2))
                .await
            {
                let mut client = clients::machine(channel);
                if client.version(VersionRequest::default()).await.is_ok() {
                    return Ok(client);
                }
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

    /// The provider's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    /// The last lines of the provider's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Pids of the live QEMU processes of this run: those named by a pid file under the data
    /// directory whose command line mentions the directory, and any other process whose command
    /// line names `qemu-system` and mentions the run's directory.
    pub fn qemu_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        if let Ok(machines) = std::fs::read_dir(self.data_dir.join("machines")) {
            for machine in machines.flatten() {
                if let Some(pid) = std::fs::read_to_string(machine.path().join("pid"))
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok())
                    && cmdline(pid).is_some_and(|c| c.contains(&*self.root.to_string_lossy()))
                    && alive(pid)
                {
                    pids.push(pid);
                }
            }
        }
        for pid in processes_mentioning(&self.root) {
            if cmdline(pid).is_some_and(|c| c.contains("qemu-system")) && !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Stops the provider (SIGTERM, SIGKILL after a timeout), then kills every QEMU left of
    /// this run. Returns how many QEMU processes had to be killed. Idempotent.
    pub fn stop(&mut self) -> usize {
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
        let leftovers = self.qemu_pids();
        for &pid in &leftovers {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while leftovers.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        leftovers.len()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The command line of `pid`, arguments separated by spaces.
fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        String::from_utf8_lossy(&raw)
            .replace('\0', " ")
            .trim()
            .to_string(),
    )
}

/// Live processes whose command line mentions `path`.
pub fn processes_mentioning(path: &Path) -> Vec<i32> {
    let needle = path.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| alive(pid) && cmdline(pid).is_some_and(|c| c.contains(&needle)))
        .collect()
}

/// Whether `pid` is a process that has not exited (a zombie has).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}
