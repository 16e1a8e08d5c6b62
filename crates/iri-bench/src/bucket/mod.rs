// SPDX-License-Identifier: Apache-2.0
//! `iri-bench bucket`: the bucket provider (`iri-bucket-provider`), started as a black box on a
//! fresh data directory with one class without limits and its S3 server on a free loopback
//! port. One bucket is created over IRI as a bucketpoollet would; its `status.access` (endpoint
//! and keys) is all the S3 client gets.
//!
//! [`objects`]: PUT and GET of 4 KiB, 64 KiB and 4 MiB objects at concurrency 1 and 16 through
//! the S3 server ([`s3`]: a SigV4 client written for this), against the same writes (write,
//! fsync, rename, fsync the directory, as the provider's storage does) and reads on the
//! filesystem directly, in the same run and on the same filesystem.
//!
//! The provider is stopped at the end, also on errors and Ctrl-C, and the directory is removed.

pub mod objects;
pub mod provider;
pub mod s3;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::{
    system::{FsInfo, MachineInfo},
    units::{GIB, KIB, MIB, fmt_size_approx, parse_size},
};

/// Arguments of `iri-bench bucket`.
#[derive(Debug, Clone, clap::Args)]
pub struct BucketArgs {
    /// The `iri-bucket-provider` binary [default: $IRI_BUCKET_PROVIDER_BIN, else next to this
    /// binary, else target/release or target/debug, else on the PATH].
    #[arg(long, value_name = "PATH")]
    pub provider_bin: Option<PathBuf>,
    /// Where to create the run's directory (the provider's data directory and the baseline's
    /// files, so both on the same filesystem); removed afterwards [default: the system's temp
    /// directory].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Object sizes (comma-separated).
    #[arg(long, default_value = "4KiB,64KiB,4MiB", value_delimiter = ',', value_parser = parse_size, value_name = "SIZE,...")]
    pub sizes: Vec<u64>,
    /// Requests in flight (comma-separated).
    #[arg(long, default_value = "1,16", value_delimiter = ',', value_name = "N,...")]
    pub concurrency: Vec<usize>,
    /// Seconds per cell (one operation, size and concurrency) and side; 24 cells by default.
    #[arg(long, default_value_t = 2.5, value_name = "S")]
    pub seconds: f64,
    /// Most object bytes one PUT cell writes (bounds the disk space used: about 4x this).
    #[arg(long, default_value = "1GiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_cell_bytes: u64,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Appended to the report's heading (to tell runs apart in one document).
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BucketReport {
    /// The machine.
    pub machine: MachineInfo,
    /// The filesystem of the run's directory.
    pub filesystem: FsInfo,
    /// The provider binary.
    pub provider_bin: String,
    /// `--label`.
    pub label: Option<String>,
    /// PUT and GET through S3 vs. the filesystem.
    pub objects: objects::ObjectsReport,
}

/// Runs the benchmark.
pub async fn run(args: &BucketArgs) -> Result<BucketReport> {
    if args.sizes.is_empty() || args.sizes.iter().any(|&s| s == 0 || s > GIB) {
        bail!("--sizes must be between 1 byte and 1 GiB");
    }
    if args.concurrency.is_empty() || args.concurrency.iter().any(|&c| c == 0 || c > 1024) {
        bail!("--concurrency must be between 1 and 1024");
    }
    if !(args.seconds.is_finite() && args.seconds >= 0.0) {
        bail!("--seconds must be a number >= 0");
    }
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
    let machine = MachineInfo::collect(std::path::Path::new("qemu-img"));
    let filesystem = FsInfo::of(&root);
    // PUT cells of both sides at every concurrency level, each up to the cap (or its minimum
    // of 2 x concurrency objects), plus room for the rest.
    let largest = args.sizes.iter().copied().max().unwrap_or(4 * KIB);
    let needed: u64 = args
        .concurrency
        .iter()
        .map(|&c| 2 * args.max_cell_bytes.max(2 * c as u64 * largest))
        .sum::<u64>()
        + 256 * MIB;
    if filesystem.free_bytes > 0 && filesystem.free_bytes < needed {
        bail!(
            "{} has {} free, the run may write {}: lower --max-cell-bytes or pass --data-dir",
            root.display(),
            fmt_size_approx(filesystem.free_bytes),
            fmt_size_approx(needed)
        );
    }
    eprintln!(
        "bucket: provider {}, directory {} ({}, {} free)",
        binary.display(),
        root.display(),
        filesystem.fstype,
        fmt_size_approx(filesystem.free_bytes)
    );
    // Declared after `work`, so dropped (stopped) before the directory is removed.
    let (mut provider, mut client) = provider::Provider::start(&binary, &root).await?;
    let result = async {
        let (id, access) = provider::create_bucket(&mut client).await?;
        eprintln!("bucket: bucket {id} at {}", access.endpoint);
        let s3 = objects::Store::S3(Arc::new(s3::S3Client::new(access)?));
        let file = objects::Store::File(Arc::new(objects::FileStore::create(&root.join("baseline"))?));
        let max_concurrency = args.concurrency.iter().copied().max().unwrap_or(1);
        objects::warm_up(&s3, &file, max_concurrency)
            .await
            .context("warm-up (unmeasured PUT and GET of 4 KiB)")?;
        objects::run(
            &s3,
            &file,
            &args.sizes,
            &args.concurrency,
            objects::Budget {
                time: Duration::from_secs_f64(args.seconds),
                max_bytes: args.max_cell_bytes,
            },
        )
        .await
    }
    .await;
    let objects = match result {
        Ok(objects) => objects,
        Err(err) => {
            let log = provider.log_tail();
            provider.stop();
            return Err(err.context(format!("provider log (last lines):\n{log}")));
        }
    };
    provider.stop();
    let report = BucketReport {
        machine,
        filesystem,
        provider_bin: binary.display().to_string(),
        label: args.label.clone(),
        objects,
    };
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

impl BucketReport {
    /// The report as Markdown.
    pub fn render(&self) -> String {
        let mut out = String::from("## Bucket provider (`iri-bench bucket`)");
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
        out.push_str(&self.objects.render());
        out
    }
}
