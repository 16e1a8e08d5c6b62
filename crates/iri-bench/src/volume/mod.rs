// SPDX-License-Identifier: Apache-2.0
//! `iri-bench volume`: the volume provider (`iri-volume-provider`), started as a black box on a
//! fresh data directory with one class without limits, driven over gRPC.
//!
//! 1. [`lifecycle`]: time to create, snapshot and clone a small and a large volume (1 GiB and
//!    1 TiB by default; the large size shrinks to the largest the provider admits, and the
//!    report says why).
//! 2. [`io`]: sequential and random read/write throughput through a volume's NBD export
//!    against the same I/O on a qcow2 file directly.
//!
//! The provider and the qemu-storage-daemon it leaves running are stopped at the end, also on
//! errors and Ctrl-C, and the directory is removed.

pub mod io;
pub mod lifecycle;
pub mod provider;
pub mod rpc;

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{
    system::{FsInfo, MachineInfo},
    units::{TIB, fmt_size_approx, parse_size},
};

/// Arguments of `iri-bench volume`.
#[derive(Debug, Clone, clap::Args)]
pub struct VolumeArgs {
    /// The `iri-volume-provider` binary [default: $IRI_VOLUME_PROVIDER_BIN, else next to this
    /// binary, else target/release or target/debug, else on the PATH].
    #[arg(long, value_name = "PATH")]
    pub provider_bin: Option<PathBuf>,
    /// Where to create the run's directory (the provider's data directory and the baseline qcow2
    /// file, so both on the same filesystem); removed afterwards [default: the system's temp
    /// directory].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Measured create/snapshot/clone iterations per size.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub iterations: usize,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// The small volume size (the baseline of the constant-time ratio).
    #[arg(long, default_value = "1GiB", value_parser = parse_size, value_name = "SIZE")]
    pub small_size: u64,
    /// The large volume size; when the provider cannot admit it, the largest size it can is
    /// measured and the report says why.
    #[arg(long, default_value = "1TiB", value_parser = parse_size, value_name = "SIZE")]
    pub large_size: u64,
    /// Size of the volume and of the qcow2 file of the throughput tests.
    #[arg(long, default_value = "1GiB", value_parser = parse_size, value_name = "SIZE")]
    pub io_size: u64,
    /// Runs per throughput test and side (the median is reported).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub io_runs: usize,
    /// Skip the throughput tests.
    #[arg(long)]
    pub no_io: bool,
    /// Skip the create/snapshot/clone timings.
    #[arg(long)]
    pub no_lifecycle: bool,
    /// The qemu-img binary.
    #[arg(long, default_value = "qemu-img", value_name = "PATH")]
    pub qemu_img: PathBuf,
    /// Appended to the report's heading (to tell runs apart in one document).
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeReport {
    /// The machine.
    pub machine: MachineInfo,
    /// The filesystem of the run's directory.
    pub filesystem: FsInfo,
    /// The provider binary.
    pub provider_bin: String,
    /// `--label`.
    pub label: Option<String>,
    /// Create, snapshot and clone times.
    pub lifecycle: Option<lifecycle::LifecycleReport>,
    /// Throughput through the export vs. the file.
    pub io: Option<io::IoReport>,
}

/// Runs the benchmark.
pub async fn run(args: &VolumeArgs) -> Result<VolumeReport> {
    anyhow::ensure!(args.iterations > 0, "--iterations must be at least 1");
    anyhow::ensure!(args.io_runs > 0, "--io-runs must be at least 1");
    anyhow::ensure!(args.large_size <= 64 * TIB, "--large-size above 64 TiB");
    let binary = provider::find_binary(args.provider_bin.as_deref())?;
    let work = match &args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            tempfile::Builder::new().prefix("iri-bench-").tempdir_in(dir)
        }
        None => tempfile::Builder::new().prefix("iri-bench-").tempdir(),
    }
    .context("creating the run's directory")?;
    let root = std::path::absolute(work.path())?;
    let machine = MachineInfo::collect(&args.qemu_img);
    let filesystem = FsInfo::of(&root);
    eprintln!(
        "volume: provider {}, directory {} ({}, {} free)",
        binary.display(),
        root.display(),
        filesystem.fstype,
        fmt_size_approx(filesystem.free_bytes)
    );
    // Declared after `work`, so dropped (stopped) before the directory is removed.
    let (mut provider, mut client) = provider::Provider::start(&binary, &root).await?;
    let result = async {
        let lifecycle = if args.no_lifecycle {
            None
        } else {
            let sizes = lifecycle::choose_sizes(&mut client, args.small_size, args.large_size).await?;
            if let Some(why) = &sizes.admission {
                eprintln!("volume: large size reduced: {why}");
            }
            Some(lifecycle::run(&mut client, sizes, args.iterations).await?)
        };
        let io = if args.no_io {
            None
        } else {
            Some(io::run(&mut client, &args.qemu_img, &root, args.io_size, args.io_runs).await?)
        };
        anyhow::Ok((lifecycle, io))
    }
    .await;
    let (lifecycle, io) = match result {
        Ok(parts) => parts,
        Err(err) => {
            let log = provider.log_tail();
            provider.stop();
            return Err(err.context(format!("provider log (last lines):\n{log}")));
        }
    };
    provider.stop();
    let report = VolumeReport {
        machine,
        filesystem,
        provider_bin: binary.display().to_string(),
        label: args.label.clone(),
        lifecycle,
        io,
    };
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

impl VolumeReport {
    /// The report as Markdown.
    pub fn render(&self) -> String {
        let mut out = String::from("## Volume provider (`iri-bench volume`)");
        if let Some(label) = &self.label {
            out.push_str(&format!(": {label}"));
        }
        out.push_str("\n\n");
        out.push_str(&self.machine.render());
        out.push_str(&format!(
            "- data directory: {} ({}, {} free at the start)\n\n",
            self.filesystem.path,
            self.filesystem.fstype,
            fmt_size_approx(self.filesystem.free_bytes)
        ));
        if let Some(lifecycle) = &self.lifecycle {
            out.push_str(&lifecycle.render());
            out.push('\n');
        }
        if let Some(io) = &self.io {
            out.push_str(&io.render());
        }
        out
    }
}
