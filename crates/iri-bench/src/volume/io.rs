// SPDX-License-Identifier: Apache-2.0
//! Read and write throughput through a volume's NBD export against the same I/O on a qcow2 file
//! opened directly, both with `qemu-img bench`: the same tool and the same QEMU block layer on
//! both sides, so the ratio is the cost of the export path (NBD over the unix socket, the
//! storage daemon, its throttle node) and nothing else.
//!
//! * The export side opens the volume's `nbd+unix://` URI (format `raw`: the export presents
//!   raw data). The volume is in a class without limits.
//! * The file side opens a fresh qcow2 of the same size and options (`preallocation=off`,
//!   default cluster size) created in the benchmark's directory, on the same filesystem as the
//!   provider's data directory, with the cache mode the storage daemon uses for its files
//!   (`cache=writeback`: the host page cache, `aio=threads`). Nothing of the provider is touched.
//! * Both images are written in full first (1 MiB sequential writes, reported as the first
//!   write, which allocates clusters), so reads read data and writes overwrite allocated
//!   clusters on both sides.
//! * `qemu-img bench` issues requests at a fixed step from offset 0, wrapping at the end of the
//!   image. Sequential: step = block size, two passes over the image. Random: the step is the
//!   block size times an odd number near 0.618 x the number of blocks, coprime with it, so one
//!   pass visits every block exactly once with consecutive requests far apart (a deterministic
//!   permutation, the same on both sides).
//! * Each test runs `runs` times per side, sides alternating which goes first; the median time
//!   is reported.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use tokio::process::Command;

use super::rpc::{self, Client};
use crate::{
    stats::{Table, fmt_num, fmt_ratio, mb_per_s, median, ops_per_s, ratio},
    units::{KIB, MIB, fmt_size},
};

/// The byte pattern written (not zero, so that no layer can mistake it for a hole).
const PATTERN: &str = "0xa5";
/// Random tests issue at most this many requests per run.
const RANDOM_MAX_REQUESTS: u64 = 262_144;

/// One I/O test.
#[derive(Debug, Clone, Copy)]
struct Test {
    name: &'static str,
    write: bool,
    random: bool,
    block: u64,
    depth: u32,
}

const TESTS: &[Test] = &[
    Test {
        name: "seq read",
        write: false,
        random: false,
        block: MIB,
        depth: 8,
    },
    Test {
        name: "seq write",
        write: true,
        random: false,
        block: MIB,
        depth: 8,
    },
    Test {
        name: "rand read",
        write: false,
        random: true,
        block: 4 * KIB,
        depth: 16,
    },
    Test {
        name: "rand write",
        write: true,
        random: true,
        block: 4 * KIB,
        depth: 16,
    },
    Test {
        name: "rand read",
        write: false,
        random: true,
        block: 4 * KIB,
        depth: 1,
    },
    Test {
        name: "rand write",
        write: true,
        random: true,
        block: 4 * KIB,
        depth: 1,
    },
];

/// What `qemu-img bench` opens.
#[derive(Debug, Clone)]
enum Target {
    /// A qcow2 file.
    File(PathBuf),
    /// An NBD URI presenting raw data.
    Export(String),
}

/// One side of a test.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// Seconds per run, as `qemu-img bench` reports them.
    pub seconds: Vec<f64>,
    /// MB/s (10^6 B/s) at the median time.
    pub mb_per_s: f64,
    /// Requests per second at the median time.
    pub iops: f64,
}

/// One test's result.
#[derive(Debug, Clone, Serialize)]
pub struct IoResult {
    /// `seq read`, `rand write`, ...
    pub name: String,
    /// Whether it writes.
    pub write: bool,
    /// Request size in bytes.
    pub block_bytes: u64,
    /// Requests in flight.
    pub depth: u32,
    /// Offset step between requests, in bytes.
    pub step_bytes: u64,
    /// Requests per run.
    pub requests: u64,
    /// The qcow2 file opened directly.
    pub file: Side,
    /// The volume's NBD export.
    pub export: Side,
    /// export MB/s / file MB/s.
    pub ratio: Option<f64>,
}

/// The I/O part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct IoReport {
    /// Size of the volume and of the qcow2 file (the whole image is the measured region).
    pub size_bytes: u64,
    /// Runs per test and side.
    pub runs: usize,
    /// The first write of the whole image (allocating), once per side.
    pub first_write: IoResult,
    /// The tests.
    pub tests: Vec<IoResult>,
}

/// Creates a volume of `size` and a qcow2 file of `size` in `work_dir`, fills both, runs every
/// test, and deletes both.
pub async fn run(
    client: &mut Client,
    qemu_img: &Path,
    work_dir: &Path,
    size: u64,
    runs: usize,
) -> Result<IoReport> {
    if size < MIB || !size.is_multiple_of(MIB) {
        bail!("--io-size must be a multiple of 1 MiB");
    }
    let id = rpc::create_volume(client, size, None)
        .await
        .map_err(|s| anyhow!("CreateVolume of {}: {s}", fmt_size(size)))?;
    let volume = rpc::wait_available(client, &id).await?;
    let export = Target::Export(rpc::export_uri(&volume)?);
    let path = work_dir.join("baseline.qcow2");
    let output = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-o", "preallocation=off"])
        .arg(&path)
        .arg(size.to_string())
        .output()
        .await
        .with_context(|| format!("running {}", qemu_img.display()))?;
    if !output.status.success() {
        bail!(
            "qemu-img create: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let file = Target::File(path.clone());

    let fill = Test {
        name: "first write",
        write: true,
        random: false,
        block: MIB,
        depth: 8,
    };
    eprintln!("io: writing both images in full ({})", fmt_size(size));
    let first_write = measure(qemu_img, &file, &export, fill, size, 1, size / MIB).await?;
    let mut tests = Vec::new();
    for test in TESTS {
        eprintln!(
            "io: {} {} QD{} ({runs} runs per side)",
            test.name,
            fmt_size(test.block),
            test.depth
        );
        let requests = if test.random {
            (size / test.block).min(RANDOM_MAX_REQUESTS)
        } else {
            2 * size / test.block
        };
        tests.push(measure(qemu_img, &file, &export, *test, size, runs, requests).await?);
    }
    rpc::delete_volume(client, &id).await?;
    let _ = std::fs::remove_file(&path);
    Ok(IoReport {
        size_bytes: size,
        runs,
        first_write,
        tests,
    })
}

/// Runs `test` `runs` times on each side, alternating which side goes first.
async fn measure(
    qemu_img: &Path,
    file: &Target,
    export: &Target,
    test: Test,
    size: u64,
    runs: usize,
    requests: u64,
) -> Result<IoResult> {
    let step = step(test, size);
    let mut file_secs = Vec::new();
    let mut export_secs = Vec::new();
    for run in 0..runs {
        let file_first = run % 2 == 0;
        for side in 0..2 {
            if (side == 0) == file_first {
                file_secs.push(bench(qemu_img, file, test, step, requests).await?);
            } else {
                export_secs.push(bench(qemu_img, export, test, step, requests).await?);
            }
        }
    }
    let side = |seconds: Vec<f64>| {
        let secs = median(&seconds).unwrap_or(f64::NAN);
        Side {
            mb_per_s: mb_per_s(requests * test.block, secs),
            iops: ops_per_s(requests, secs),
            seconds,
        }
    };
    let file = side(file_secs);
    let export = side(export_secs);
    Ok(IoResult {
        name: test.name.to_string(),
        write: test.write,
        block_bytes: test.block,
        depth: test.depth,
        step_bytes: step,
        requests,
        ratio: ratio(export.mb_per_s, file.mb_per_s),
        file,
        export,
    })
}

/// The offset step of `test` on an image of `size` bytes (see the module docs).
fn step(test: Test, size: u64) -> u64 {
    let blocks = size / test.block;
    if !test.random || blocks <= 2 {
        return test.block;
    }
    let mut stride = ((blocks as f64 * 0.618) as u64) | 1;
    while gcd(stride, blocks) != 1 {
        stride += 2;
    }
    stride * test.block
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One `qemu-img bench` run; returns the seconds it reports.
async fn bench(qemu_img: &Path, target: &Target, test: Test, step: u64, requests: u64) -> Result<f64> {
    let mut command = Command::new(qemu_img);
    command.kill_on_drop(true);
    command.args([
        "bench",
        "-t",
        "writeback",
        "-c",
        &requests.to_string(),
        "-d",
        &test.depth.to_string(),
        "-s",
        &test.block.to_string(),
        "-S",
        &step.to_string(),
    ]);
    if test.write {
        command.args(["-w", &format!("--pattern={PATTERN}")]);
    }
    match target {
        Target::File(path) => command.args(["-f", "qcow2"]).arg(path),
        Target::Export(uri) => command.args(["-f", "raw", uri]),
    };
    let output = command
        .output()
        .await
        .with_context(|| format!("running {}", qemu_img.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "qemu-img bench on {target:?} failed: {}{}",
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_seconds(&stdout).ok_or_else(|| anyhow!("unexpected qemu-img bench output: {stdout}"))
}

/// The time in `Run completed in 0.114 seconds.`
fn parse_seconds(output: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Run completed in "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

impl IoReport {
    /// The section as Markdown.
    pub fn render(&self) -> String {
        let mut out = String::from("### Throughput: through the NBD export vs. the qcow2 file directly\n\n");
        out.push_str(&format!(
            "`qemu-img bench` on both sides: the volume's `nbd+unix://` export (format raw; its class has no limits, so nothing is throttled) and a fresh \
             qcow2 file of the same size and options opened directly with the storage daemon's cache mode \
             (writeback, host page cache, aio=threads). Image size **{}**, written in full first; median \
             of {} runs per side, sides alternating. Random: a fixed stride that visits every 4 KiB block \
             once. MB/s = 10^6 B/s.\n\n",
            fmt_size(self.size_bytes),
            self.runs
        ));
        let mut table = Table::new([
            "test",
            "block",
            "QD",
            "file MB/s",
            "export MB/s",
            "file IOPS",
            "export IOPS",
            "export/file",
        ]);
        for r in std::iter::once(&self.first_write).chain(&self.tests) {
            table.row([
                r.name.clone(),
                fmt_size(r.block_bytes),
                r.depth.to_string(),
                fmt_num(r.file.mb_per_s),
                fmt_num(r.export.mb_per_s),
                fmt_num(r.file.iops),
                fmt_num(r.export.iops),
                fmt_ratio(r.ratio),
            ]);
        }
        out.push_str(&table.render());
        out.push_str(
            "\n`first write` allocates the clusters (one run); every other write overwrites allocated \
             clusters. Both sides go through the host page cache, as the storage daemon does, so these \
             figures are the cost of the I/O path, not of the disk.\n",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_steps_visit_every_block_once() {
        let test = TESTS[2];
        let size = 64 * MIB;
        let blocks = size / test.block;
        let step = step(test, size);
        assert_eq!(step % test.block, 0);
        assert!(step > size / 2, "consecutive requests are far apart");
        let mut seen = vec![false; blocks as usize];
        let mut offset = 0;
        for _ in 0..blocks {
            let block = (offset / test.block) as usize;
            assert!(!seen[block], "block {block} visited twice");
            seen[block] = true;
            offset = (offset + step) % size;
        }
        assert_eq!(super::step(TESTS[0], size), MIB);
    }

    #[test]
    fn parses_qemu_img_bench() {
        let out = "Sending 256 write requests, 1048576 bytes each, 4 in parallel\nRun completed in 0.114 seconds.\n";
        assert_eq!(parse_seconds(out), Some(0.114));
        assert_eq!(parse_seconds("nothing"), None);
    }
}
