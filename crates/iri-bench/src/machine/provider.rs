// SPDX-License-Identifier: Apache-2.0
//! The `iri-machine-provider` under test: a black box started as a binary on a fresh data
//! directory with a configuration written by the benchmark (TCG only, the test guest's
//! directory as the one image directory), and stopped afterwards. Machines outlive the provider
//! by design: the benchmark deletes them through IRI before it stops the provider, and then
//! kills any QEMU still named by a pid file under the data directory (or mentioning the run's
//! directory on its command line).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use iri_api::{endpoint::clients, machine::v1alpha1::VersionRequest};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::rpc::Client;

/// The class of the boot and throughput measurements.
pub const CLASS: &str = "bench";
/// The class of the machines of the memory measurement.
pub const SMALL_CLASS: &str = "bench-small";

/// How long the provider may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running provider. Dropping it stops the provider and kills every QEMU of its data
/// directory (delete the machines through IRI first: that is the clean way).
pub struct Provider {
    process: crate::binary::Process,
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
        let socket = root.join("machine.sock");
        let log = root.join("provider.log");
        let dir = data_dir(root);
        let process = crate::binary::Process::spawn(binary, &dir, &socket, &config_path, &log)?;
        let mut provider = Provider {
            process,
            root: root.to_path_buf(),
            data_dir: dir,
            socket,
            log,
        };
        let client = provider.connect().await?;
        Ok((provider, client))
    }

    async fn connect(&mut self) -> Result<Client> {
        self.process
            .wait_serving(&self.socket, |channel| async move {
                let mut client = clients::machine(channel);
                client
                    .version(VersionRequest::default())
                    .await
                    .ok()
                    .map(|_| client)
            })
            .await
    }

    /// The provider's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.process.pid()
    }

    /// The last lines of the provider's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
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
        self.process.stop();
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
