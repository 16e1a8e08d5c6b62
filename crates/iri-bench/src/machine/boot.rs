// SPDX-License-Identifier: Apache-2.0
//! Boot time: from CreateMachine to the guest's console marker read through Exec, against a
//! bare `qemu-system-x86_64` start of the same guest with the same machine options, its serial
//! console on stdout. Bare and provider runs alternate, after one unmeasured run of each (page
//! cache, first QEMU start), so drift over the run hits both alike. Each provider iteration also
//! records the time from CreateMachine until ListMachines shows the machine RUNNING (QEMU
//! started), and deletes its machine.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::io::AsyncReadExt;

use super::{
    provider::CLASS,
    rpc::{self, Client, MARKER},
};
use crate::stats::{Summary, Table, fmt_num, fmt_ratio, ratio};

/// What the bare QEMU needs to boot the guest as the provider would.
#[derive(Debug, Clone)]
pub struct Bare {
    /// The `qemu-system-x86_64` binary.
    pub qemu: PathBuf,
    /// The test guest's directory.
    pub guest: PathBuf,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Empty PCIe root ports (the provider's `qemu.hotplug_ports`, default 4).
    pub hotplug_ports: u32,
}

impl Bare {
    /// The command line, mirroring the provider's (crates/machine-provider/src/qemu.rs) for a
    /// machine of one vCPU booting a kernel image without disks or NICs: `-machine q35`, TCG,
    /// `-nodefaults -no-user-config -display none`, the same kernel, initramfs and kernel command
    /// line, and the same empty PCIe root ports. What differs: no `-daemonize`, no pid file, no
    /// QMP monitor, and the serial console on stdio instead of a unix socket.
    pub fn args(&self) -> Vec<String> {
        let extra = std::fs::read_to_string(self.guest.join("cmdline")).unwrap_or_default();
        let mut append = String::from("console=ttyS0");
        if !extra.trim().is_empty() {
            append.push(' ');
            append.push_str(extra.trim());
        }
        let initramfs = ["initramfs", "initramfs.cpio.gz"]
            .iter()
            .map(|n| self.guest.join(n))
            .find(|p| p.is_file())
            .unwrap_or_else(|| self.guest.join("initramfs.cpio.gz"));
        let mut args: Vec<String> = [
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-smp",
            "1",
            "-m",
            &format!("{}M", self.memory.div_ceil(1 << 20)),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-kernel",
            &self.guest.join("vmlinuz").display().to_string(),
            "-initrd",
            &initramfs.display().to_string(),
            "-append",
            &append,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for port in 0..self.hotplug_ports {
            args.push("-device".into());
            args.push(format!(
                "pcie-root-port,id=rp{port},bus=pcie.0,chassis={},slot={}",
                port + 1,
                port + 1
            ));
        }
        args
    }

    /// One bare boot: milliseconds from spawning QEMU until the marker is on its stdout. QEMU
    /// is killed afterwards.
    pub async fn boot(&self) -> Result<f64> {
        let start = Instant::now();
        let mut child = tokio::process::Command::new(&self.qemu)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.qemu.display()))?;
        let mut stdout = child.stdout.take().context("QEMU's stdout")?;
        let mut output = Vec::new();
        let mut buf = [0u8; 4096];
        let found = tokio::time::timeout(rpc::CONVERGE, async {
            loop {
                let n = stdout.read(&mut buf).await?;
                if n == 0 {
                    return anyhow::Ok(false);
                }
                output.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&output).contains(MARKER) {
                    return Ok(true);
                }
            }
        })
        .await;
        let elapsed = ms(start);
        let _ = child.kill().await;
        match found {
            Ok(Ok(true)) => Ok(elapsed),
            Ok(Ok(false)) => bail!(
                "bare QEMU exited before the marker; output:\n{}",
                String::from_utf8_lossy(&output)
            ),
            Ok(Err(e)) => Err(e.context("reading bare QEMU's output")),
            Err(_) => bail!("no marker from bare QEMU within {:?}", rpc::CONVERGE),
        }
    }
}

/// One provider boot: CreateMachine, poll ListMachines until RUNNING, Exec and read the
/// console until the marker; then delete the machine. Returns (ms to RUNNING, ms to marker).
pub async fn provider_boot(client: &mut Client, guest: &Path) -> Result<(f64, f64)> {
    let start = Instant::now();
    let id = rpc::create(client, CLASS, guest, true).await?;
    let ids = [id.clone()];
    let result = async {
        rpc::wait_running(client, &ids).await?;
        let running = ms(start);
        rpc::read_marker(client, &id).await?;
        anyhow::Ok((running, ms(start)))
    }
    .await;
    rpc::delete_all(client, &ids).await?;
    result
}

/// The boot part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    /// Measured iterations per side.
    pub iterations: usize,
    /// Whether one unmeasured boot of each side came first.
    pub warmup: bool,
    /// The bare QEMU's arguments.
    pub bare_command: Vec<String>,
    /// Bare QEMU start to marker, ms.
    pub bare_ms: Vec<f64>,
    /// CreateMachine to marker through Exec, ms.
    pub provider_marker_ms: Vec<f64>,
    /// CreateMachine to RUNNING, ms.
    pub provider_running_ms: Vec<f64>,
    /// Percentiles of `bare_ms`.
    pub bare: Option<Summary>,
    /// Percentiles of `provider_marker_ms`.
    pub provider_marker: Option<Summary>,
    /// Percentiles of `provider_running_ms`.
    pub provider_running: Option<Summary>,
    /// Provider p50 to marker / bare p50.
    pub ratio_p50: Option<f64>,
}

/// Runs `iterations` alternating bare and provider boots, after one unmeasured boot of each if
/// `warmup`.
pub async fn run(client: &mut Client, bare: &Bare, iterations: usize, warmup: bool) -> Result<BootReport> {
    if warmup {
        eprintln!("boot: warm-up (bare, then provider)");
        bare.boot().await?;
        provider_boot(client, &bare.guest).await?;
    }
    let (mut bare_ms, mut marker_ms, mut running_ms) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iterations {
        let b = bare.boot().await?;
        let (r, m) = provider_boot(client, &bare.guest).await?;
        eprintln!(
            "boot: iteration {}/{iterations}: bare {b:.0} ms, provider {m:.0} ms (RUNNING after {r:.0} ms)",
            i + 1
        );
        bare_ms.push(b);
        marker_ms.push(m);
        running_ms.push(r);
    }
    let (bare_s, marker_s) = (Summary::of(&bare_ms), Summary::of(&marker_ms));
    let ratio_p50 = match (&bare_s, &marker_s) {
        (Some(b), Some(m)) => ratio(m.p50, b.p50),
        _ => None,
    };
    Ok(BootReport {
        iterations,
        warmup,
        bare_command: bare.args(),
        provider_running: Summary::of(&running_ms),
        bare_ms,
        provider_marker_ms: marker_ms,
        provider_running_ms: running_ms,
        bare: bare_s,
        provider_marker: marker_s,
        ratio_p50,
    })
}

pub(crate) fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// A summary's cells: p50, p90, max.
fn cells(summary: Option<&Summary>) -> [String; 3] {
    summary.map_or_else(
        || ["n/a".into(), "n/a".into(), "n/a".into()],
        |s| [fmt_num(s.p50), fmt_num(s.p90), fmt_num(s.max)],
    )
}

impl BootReport {
    /// The section as Markdown.
    pub fn render(&self, qemu: &Path) -> String {
        let mut out =
            String::from("### Boot: CreateMachine to the guest's console marker, against bare QEMU\n\n");
        out.push_str(&format!(
            "{} iteration(s) per side{}, bare and provider alternating. \
             Provider: time from CreateMachine until `{MARKER}` is read through Exec (the \
             remote-command WebSocket, stdout channel); the console is opened once ListMachines \
             (polled every {} ms) shows RUNNING, and a session first replays the recent console \
             output. Bare: time from spawning `{}` until the marker is on its stdout. Each \
             provider iteration deletes its machine.\n\n",
            self.iterations,
            if self.warmup {
                " after one unmeasured boot of each"
            } else {
                " (no warm-up)"
            },
            rpc::POLL.as_millis(),
            qemu.display()
        ));
        let mut table = Table::new(["measurement", "p50 ms", "p90 ms", "max ms", "p50 / bare p50"]);
        let [a, b, c] = cells(self.bare.as_ref());
        table.row(["bare QEMU start to marker".to_string(), a, b, c, "1.00x".into()]);
        let [a, b, c] = cells(self.provider_marker.as_ref());
        table.row([
            "CreateMachine to marker (Exec)".to_string(),
            a,
            b,
            c,
            fmt_ratio(self.ratio_p50),
        ]);
        let [a, b, c] = cells(self.provider_running.as_ref());
        table.row([
            "CreateMachine to RUNNING (QEMU started)".to_string(),
            a,
            b,
            c,
            String::new(),
        ]);
        out.push_str(&table.render());
        let overhead = match (&self.provider_marker, &self.bare) {
            (Some(m), Some(b)) => fmt_num(m.p50 - b.p50),
            _ => "n/a".into(),
        };
        out.push_str(&format!(
            "\nThe provider's overhead on a boot (p50 difference): {overhead} ms. Bare command line:\n\n```sh\n{} {}\n```\n",
            qemu.display(),
            self.bare_command
                .iter()
                .map(|a| if a.contains(' ') { format!("'{a}'") } else { a.clone() })
                .collect::<Vec<_>>()
                .join(" ")
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_command_mirrors_the_providers_machine() {
        let guest = tempfile::tempdir().unwrap();
        std::fs::write(guest.path().join("cmdline"), "quiet\n").unwrap();
        std::fs::write(guest.path().join("initramfs.cpio.gz"), b"").unwrap();
        let bare = Bare {
            qemu: "qemu-system-x86_64".into(),
            guest: guest.path().to_path_buf(),
            memory: 256 << 20,
            hotplug_ports: 2,
        };
        let args = bare.args();
        let joined = args.join(" ");
        for expected in [
            "-machine q35 -accel tcg -smp 1 -m 256M -nodefaults -no-user-config -display none",
            "-serial stdio",
            "initramfs.cpio.gz -append",
            "-device pcie-root-port,id=rp1,bus=pcie.0,chassis=2,slot=2",
        ] {
            assert!(joined.contains(expected), "{expected:?} missing in {joined}");
        }
        let append = args.iter().position(|a| a == "-append").unwrap();
        assert_eq!(args[append + 1], "console=ttyS0 quiet");
        assert!(!joined.contains("rp2"));
        // Memory rounds up to whole MiB, as the provider's does.
        let odd = Bare {
            memory: (64 << 20) + 1,
            ..bare
        };
        assert!(odd.args().join(" ").contains("-m 65M"));
    }
}
