// SPDX-License-Identifier: Apache-2.0
//! The `iri-volume-provider` under test: a black box started as a binary on a fresh data
//! directory, with a configuration written by the benchmark, and stopped afterwards together
//! with the qemu-storage-daemon it leaves running by design (found through its pid file,
//! `<data-dir>/local/daemon/pid`).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use iri_api::{
    endpoint::clients,
    volume::v1alpha1::{VersionRequest, volume_runtime_client::VolumeRuntimeClient},
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tonic::transport::Channel;

/// The one volume class the benchmark configures: no limits, so that the I/O measures the
/// export path and not a throttle.
pub const CLASS: &str = "bench";

/// How long a process may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running provider. Dropping it stops the provider and its storage daemon.
pub struct Provider {
    process: crate::binary::Process,
    /// The provider's data directory.
    pub data_dir: PathBuf,
    /// The IRI socket.
    pub socket: PathBuf,
    /// The provider's log (stderr).
    pub log: PathBuf,
}

/// Where to find `iri-volume-provider`: see [`crate::binary::find`] (`$IRI_VOLUME_PROVIDER_BIN`).
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    crate::binary::find(
        "iri-volume-provider",
        "volume-provider",
        "IRI_VOLUME_PROVIDER_BIN",
        explicit,
    )
}

impl Provider {
    /// Starts `binary` on `root/provider` (a new directory), serving `root/volume.sock`, and
    /// waits until it answers Version. Its log goes to `root/provider.log`.
    pub async fn start(binary: &Path, root: &Path) -> Result<(Provider, VolumeRuntimeClient<Channel>)> {
        let data_dir = root.join("provider");
        let config = root.join("provider.toml");
        std::fs::write(
            &config,
            format!("[[classes]]\nname = \"{CLASS}\"\ntps = 0\niops = 0\n"),
        )
        .context("writing the provider config")?;
        let socket = root.join("volume.sock");
        let log = root.join("provider.log");
        let process = crate::binary::Process::spawn(binary, &data_dir, &socket, &config, &log)?;
        let mut provider = Provider {
            process,
            data_dir,
            socket,
            log,
        };
        let client = provider.connect().await?;
        Ok((provider, client))
    }

    async fn connect(&mut self) -> Result<VolumeRuntimeClient<Channel>> {
        self.process
            .wait_serving(&self.socket, |channel| async move {
                let mut client = clients::volume(channel);
                client
                    .version(VersionRequest::default())
                    .await
                    .ok()
                    .map(|_| client)
            })
            .await
    }

    /// The last lines of the provider's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Stops the provider (SIGTERM, SIGKILL after a timeout), then the storage daemon of its data
    /// directory. Idempotent.
    pub fn stop(&mut self) {
        self.process.stop();
        if let Some(pid) = self.daemon_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if alive(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// The storage daemon of this data directory: the pid its pid file names, if that process's
    /// command line mentions the data directory (so a recycled pid is never touched).
    fn daemon_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir.join("local/daemon/pid")).ok()?;
        let pid = text.trim().parse::<i32>().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(&*self.data_dir.to_string_lossy())
            .then_some(pid)
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether `pid` is a process that has not exited (a zombie has).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}
