// SPDX-License-Identifier: Apache-2.0
//! `iri-bench machine`: the machine provider (`iri-machine-provider`, a black box binary) on a
//! fresh data directory, booting the test guest (`scripts/test-guest`) under TCG.
//!
//! 1. [`boot`]: CreateMachine to the guest's console marker read through Exec, against a bare
//!    `qemu-system-x86_64` start of the same guest with the same machine options; and
//!    CreateMachine to RUNNING alone.
//! 2. [`scale`]: machines started per minute at a few concurrency levels; the provider's memory
//!    idle and with 50 machines defined, and QEMU's per machine.
//!
//! At the end (also on errors and Ctrl-C) every machine is deleted through IRI, the provider is
//! stopped, any QEMU of the run's directory still alive is killed (and the report says so), and
//! the directory is removed.

pub mod boot;
pub mod provider;
pub mod rpc;
pub mod scale;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::{
    system::MachineInfo,
    units::{MIB, parse_size},
};

/// Arguments of `iri-bench machine`.
#[derive(Debug, Clone, clap::Args)]
pub struct MachineArgs {
    /// The `iri-machine-provider` binary [default: $IRI_MACHINE_PROVIDER_BIN, else next to this
    /// binary, else target/release or target/debug, else on the PATH].
    #[arg(long, value_name = "PATH")]
    pub provider_bin: Option<PathBuf>,
    /// The test guest's directory (vmlinuz, initramfs, cmdline), built with scripts/test-guest
    /// when missing [default: target/test-guest of the repository].
    #[arg(long, value_name = "DIR")]
    pub guest: Option<PathBuf>,
    /// Where to create the run's directory (the provider's data directory); removed afterwards
    /// [default: the system's temp directory].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Measured boot iterations per side (bare QEMU and provider, alternating).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub iterations: usize,
    /// Skip the unmeasured boot of each side before the measured ones.
    #[arg(long)]
    pub no_warmup: bool,
    /// Guest memory of the boot and throughput machines.
    #[arg(long, default_value = "256MiB", value_parser = parse_size, value_name = "SIZE")]
    pub memory: u64,
    /// Concurrency levels of the machines-per-minute measurement (comma-separated).
    #[arg(long, default_value = "1,2,4", value_delimiter = ',', value_name = "N,...")]
    pub concurrency: Vec<usize>,
    /// Rounds per concurrency level (the median is reported).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub rounds: usize,
    /// Machines defined (created powered off) for the provider's memory.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub machines: usize,
    /// Of those, how many are powered on to measure QEMU's memory per machine (0: none).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub running: usize,
    /// Guest memory of the memory measurement's machines.
    #[arg(long, default_value = "64MiB", value_parser = parse_size, value_name = "SIZE")]
    pub small_memory: u64,
    /// Seconds between RUNNING and reading QEMU's memory.
    #[arg(long, default_value_t = 10, value_name = "S")]
    pub settle: u64,
    /// Skip the boot measurement.
    #[arg(long)]
    pub no_boot: bool,
    /// Skip the machines-per-minute measurement.
    #[arg(long)]
    pub no_throughput: bool,
    /// Skip the memory measurement.
    #[arg(long)]
    pub no_memory: bool,
    /// The qemu-system-x86_64 binary (for the provider and the bare baseline).
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    pub qemu: PathBuf,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct MachineReport {
    /// The machine.
    pub machine: MachineInfo,
    /// First line of `qemu-system-x86_64 --version`.
    pub qemu_system: String,
    /// The provider binary.
    pub provider_bin: String,
    /// The test guest's directory.
    pub guest: String,
    /// The provider's configuration.
    pub config: String,
    /// Boot times.
    pub boot: Option<boot::BootReport>,
    /// Machines per minute.
    pub throughput: Option<scale::ThroughputReport>,
    /// Memory.
    pub memory: Option<scale::MemoryReport>,
    /// QEMU processes of the run still alive after every machine was deleted and the provider
    /// stopped (killed then; 0 when deletion through IRI cleaned up everything).
    pub leftover_qemus: usize,
}

/// The repository's root, as compiled in (crates/iri-bench/../..).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The test guest: `explicit` or the repository's target/test-guest, built when it has no
/// kernel yet.
fn test_guest(explicit: Option<&Path>) -> Result<PathBuf> {
    let dir = match explicit {
        Some(dir) => dir.to_path_buf(),
        None => repo().join("target/test-guest"),
    };
    if !dir.join("vmlinuz").is_file() {
        let script = repo().join("scripts/test-guest");
        eprintln!(
            "machine: building the test guest in {} ({})",
            dir.display(),
            script.display()
        );
        let status = Command::new(&script)
            .arg(&dir)
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!("{} {} failed ({status})", script.display(), dir.display());
        }
    }
    std::path::absolute(&dir)
        .and_then(|d| d.canonicalize())
        .with_context(|| format!("the test guest {}", dir.display()))
}

fn first_line(command: &mut Command) -> String {
    command
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Runs the benchmark.
pub async fn run(args: &MachineArgs) -> Result<MachineReport> {
    anyhow::ensure!(args.iterations > 0, "--iterations must be at least 1");
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(args.running <= args.machines, "--running above --machines");
    anyhow::ensure!(
        args.memory >= 32 * MIB && args.small_memory >= 32 * MIB,
        "guests need 32 MiB at least"
    );
    let binary = provider::find_binary(args.provider_bin.as_deref())?;
    let guest = test_guest(args.guest.as_deref())?;
    let work = match &args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            tempfile::Builder::new().prefix("ib-").tempdir_in(dir)
        }
        None => tempfile::Builder::new().prefix("ib-").tempdir(),
    }
    .context("creating the run's directory")?;
    let root = std::path::absolute(work.path())?;
    // QEMU's sockets live in <data dir>/machines/<64-character id>/; a unix socket path has at
    // most 107 bytes, so the directory must be short (hence the short names).
    let longest = provider::data_dir(&root)
        .join("machines")
        .join("x".repeat(64))
        .join("console.sock");
    if longest.as_os_str().len() > 107 {
        bail!(
            "--data-dir {} is too long: the provider's QEMU sockets ({}) would exceed the 107 bytes of \
             a unix socket path; use a shorter directory",
            root.display(),
            longest.display()
        );
    }
    let machine = MachineInfo::collect(Path::new("qemu-img"));
    let qemu_system = first_line(Command::new(&args.qemu).arg("--version"));
    let max_machines = args
        .machines
        .max(args.concurrency.iter().copied().max().unwrap_or(1));
    let config = provider::config(&guest, args.memory, args.small_memory, max_machines, &args.qemu);
    eprintln!(
        "machine: provider {}, guest {}, directory {}",
        binary.display(),
        guest.display(),
        root.display()
    );
    // Declared after `work`, so dropped (stopped, QEMUs killed) before the directory is removed.
    let (mut provider, mut client) = provider::Provider::start(&binary, &root, &config).await?;
    let idle = scale::rss(provider.pid());
    let result = async {
        let boot = if args.no_boot {
            None
        } else {
            let bare = boot::Bare {
                qemu: args.qemu.clone(),
                guest: guest.clone(),
                memory: args.memory,
                hotplug_ports: 4,
            };
            Some(boot::run(&mut client, &bare, args.iterations, !args.no_warmup).await?)
        };
        let throughput = if args.no_throughput || args.concurrency.is_empty() {
            None
        } else {
            Some(scale::throughput(&mut client, &guest, &args.concurrency, args.rounds, args.memory).await?)
        };
        let memory = if args.no_memory {
            None
        } else {
            Some(
                scale::memory(
                    &mut client,
                    &provider,
                    &guest,
                    idle,
                    scale::MemoryPlan {
                        machines: args.machines,
                        running: args.running,
                        small_memory_bytes: args.small_memory,
                        settle: Duration::from_secs(args.settle),
                    },
                )
                .await?,
            )
        };
        anyhow::Ok((boot, throughput, memory))
    }
    .await;
    // Machines outlive the provider: delete every one through IRI first, then stop.
    let cleaned = rpc::delete_everything(&mut client).await;
    let leftover_qemus = provider.stop();
    let (boot, throughput, memory) = match (result, cleaned) {
        (Ok(parts), Ok(())) => parts,
        (Err(err), _) | (Ok(_), Err(err)) => {
            return Err(err.context(format!("provider log (last lines):\n{}", provider.log_tail())));
        }
    };
    if leftover_qemus > 0 {
        eprintln!(
            "machine: {leftover_qemus} QEMU process(es) were left after deleting every machine: killed"
        );
    }
    let report = MachineReport {
        machine,
        qemu_system,
        provider_bin: binary.display().to_string(),
        guest: guest.display().to_string(),
        config,
        boot,
        throughput,
        memory,
        leftover_qemus,
    };
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

impl MachineReport {
    /// The report as Markdown.
    pub fn render(&self) -> String {
        let mut out = String::from("## Machine provider (`iri-bench machine`)\n\n");
        out.push_str(&self.machine.render());
        out.push_str(&format!(
            "- QEMU system emulator: {} (TCG: no usable KVM here)\n- test guest: `scripts/test-guest` \
             (Debian kernel, busybox initramfs), direct kernel boot\n\n",
            self.qemu_system
        ));
        if let Some(boot) = &self.boot {
            out.push_str(&boot.render(Path::new("qemu-system-x86_64")));
            out.push('\n');
        }
        if let Some(t) = &self.throughput {
            out.push_str(&t.render());
            out.push('\n');
        }
        if let Some(m) = &self.memory {
            out.push_str(&m.render());
            out.push('\n');
        }
        out.push_str(&format!(
            "Cleanup: every machine deleted through IRI, then the provider stopped; QEMU processes of the \
             run left after that: {}.\n",
            self.leftover_qemus
        ));
        out.push_str(&format!(
            "\n<details><summary>Provider configuration</summary>\n\n```toml\n{}```\n\n</details>\n",
            self.config
        ));
        out
    }
}
