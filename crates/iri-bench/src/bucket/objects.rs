// SPDX-License-Identifier: Apache-2.0
//! PUT and GET of whole objects through the provider's S3 server against the same writes and
//! reads on the filesystem directly, at a few object sizes and concurrency levels.
//!
//! * The S3 side: PutObject and GetObject with [`S3Client`] (SigV4, HTTP/1.1 keep-alive, one
//!   connection per request in flight), into a bucket of a class without limits.
//! * The file side does per PUT what the provider's storage does (see `bucket-provider`'s
//!   `backend/embedded/storage.rs`): create a new temporary file (`O_EXCL`, mode 0600), write
//!   the data, fsync it, rename it into the objects directory, fsync that directory. Per GET it
//!   reads the whole file. Its directories sit next to the provider's data directory, on the same
//!   filesystem. What the provider adds on top (HTTP, SigV4 verification, SHA-256 and MD5 of the
//!   body, the metadata trailer, the index) is what the ratio measures.
//! * One cell = one operation, size and concurrency, on one side: `concurrency` tokio tasks take
//!   object numbers from a shared counter until the cell's time budget is spent (at least
//!   `2 x concurrency` operations, at most `max bytes / size` PUTs so that disk use is bounded).
//!   PUTs write distinct keys; the GETs of the cell that follows read those objects round-robin.
//!   The two sides of a cell run back to back, the order alternating from cell to cell.
//! * Every GET's length is checked, and the content of the first GET of every cell, so a
//!   server that answers quickly with the wrong data cannot produce a number. Any failed
//!   request (non-2xx included) fails the benchmark.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use serde::Serialize;
use tokio::task::JoinSet;

use super::s3::{Body, S3Client};
use crate::{
    stats::{Summary, Table, fmt_num, fmt_ratio, mb_per_s, ops_per_s, ratio},
    units::fmt_size,
};

/// An operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// PutObject / write, fsync, rename, fsync the directory.
    Put,
    /// GetObject / read the whole file.
    Get,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "PUT",
            Op::Get => "GET",
        }
    }
}

/// Where objects go: the S3 server or the filesystem directly.
#[derive(Debug, Clone)]
pub enum Store {
    /// Through the provider's S3 server.
    S3(Arc<S3Client>),
    /// The baseline.
    File(Arc<FileStore>),
}

/// The baseline: objects as files, written the way the provider's storage writes them.
#[derive(Debug)]
pub struct FileStore {
    tmp: PathBuf,
    objects: PathBuf,
}

impl FileStore {
    /// Creates `dir/tmp` and `dir/objects`.
    pub fn create(dir: &Path) -> Result<FileStore> {
        let store = FileStore {
            tmp: dir.join("tmp"),
            objects: dir.join("objects"),
        };
        for d in [&store.tmp, &store.objects] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(store)
    }

    fn file_name(key: &str) -> String {
        key.replace('/', "-")
    }
}

impl Store {
    /// Stores `body` as `key`.
    pub async fn put(&self, key: &str, body: &Body) -> Result<()> {
        match self {
            Store::S3(client) => client.put(key, body).await,
            Store::File(store) => {
                let name = FileStore::file_name(key);
                let tmp = store.tmp.join(&name);
                let target = store.objects.join(&name);
                let objects = store.objects.clone();
                let data = body.data.clone();
                tokio::task::spawn_blocking(move || {
                    let mut file = OpenOptions::new()
                        .write(true)
                        .read(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    file.write_all(&data)?;
                    file.sync_all()?;
                    drop(file);
                    fs::rename(&tmp, &target)?;
                    File::open(&objects)?.sync_all()
                })
                .await
                .context("the writing thread")?
                .with_context(|| format!("writing {key} as a file"))
            }
        }
    }

    /// The bytes of `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        match self {
            Store::S3(client) => client.get(key).await,
            Store::File(store) => {
                let path = store.objects.join(FileStore::file_name(key));
                tokio::task::spawn_blocking(move || fs::read(path))
                    .await
                    .context("the reading thread")?
                    .map(Bytes::from)
                    .with_context(|| format!("reading {key} as a file"))
            }
        }
    }
}

/// One side of a cell.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// Operations done.
    pub ops: u64,
    /// Wall time of the cell, first operation started to last one finished.
    pub seconds: f64,
    /// Operations per second.
    pub ops_per_s: f64,
    /// Object bytes per second, 10^6 B/s.
    pub mb_per_s: f64,
    /// Per-operation latency in milliseconds (request sent to answer or body fully received).
    pub latency_ms: Summary,
}

/// One operation at one size and concurrency, on both sides.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// PUT or GET.
    pub op: Op,
    /// Object size in bytes.
    pub size_bytes: u64,
    /// Requests in flight.
    pub concurrency: usize,
    /// Through the S3 server.
    pub s3: Side,
    /// On the filesystem directly.
    pub file: Side,
    /// S3 ops/s / file ops/s (the same as the MB/s ratio).
    pub ratio: Option<f64>,
}

/// What one cell may do.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Time per cell and side.
    pub time: Duration,
    /// Most bytes one PUT cell writes.
    pub max_bytes: u64,
}

/// The object measurements.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectsReport {
    /// Seconds per cell and side.
    pub seconds_per_cell: f64,
    /// Most bytes one PUT cell writes.
    pub max_cell_bytes: u64,
    /// PUT then GET per size and concurrency.
    pub cells: Vec<Cell>,
}

/// Deterministic, incompressible-looking bytes (xorshift64*), different per `seed`: not zeros,
/// so that no layer can take a shortcut.
pub fn pattern(size: u64, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = Vec::with_capacity(size as usize + 8);
    while (data.len() as u64) < size {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        data.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    data.truncate(size as usize);
    Bytes::from(data)
}

/// The key of object `n` of a cell.
fn key(size: u64, concurrency: usize, n: u64) -> String {
    format!("{}/c{concurrency}/{n:06}", fmt_size(size).replace(' ', ""))
}

/// Unmeasured: `concurrency` PUTs and GETs of a small object on each side, so that credentials
/// are checked before anything is measured and the connections of the S3 client are open.
pub async fn warm_up(s3: &Store, file: &Store, concurrency: usize) -> Result<()> {
    let body = Body::new(pattern(4096, 0));
    for store in [s3, file] {
        let mut set = JoinSet::new();
        for n in 0..concurrency {
            let (store, body) = (store.clone(), body.clone());
            set.spawn(async move {
                let key = format!("warmup/{n:06}");
                store.put(&key, &body).await?;
                let got = store.get(&key).await?;
                if got != body.data {
                    bail!("GET {key} returned other data than was PUT");
                }
                anyhow::Ok(())
            });
        }
        while let Some(joined) = set.join_next().await {
            joined.context("a warm-up task")??;
        }
    }
    Ok(())
}

/// Runs every cell: for each size and concurrency, PUT on both sides, then GET on both sides.
pub async fn run(
    s3: &Store,
    file: &Store,
    sizes: &[u64],
    concurrencies: &[usize],
    budget: Budget,
) -> Result<ObjectsReport> {
    let mut cells = Vec::new();
    let mut turn = 0usize;
    for (i, &size) in sizes.iter().enumerate() {
        let body = Body::new(pattern(size, i as u64 + 1));
        for &concurrency in concurrencies {
            let max_puts = (budget.max_bytes / size).max(2 * concurrency as u64);
            let mut written = [0u64; 2];
            for op in [Op::Put, Op::Get] {
                eprintln!(
                    "bucket: {} {} at concurrency {concurrency}",
                    op.name(),
                    fmt_size(size)
                );
                let mut sides: [Option<Side>; 2] = [None, None];
                // Alternate which side goes first, so that neither always runs on a disk the
                // other has just filled with writeback.
                let order = if turn.is_multiple_of(2) { [1, 0] } else { [0, 1] };
                turn += 1;
                for s in order {
                    let store = if s == 0 { s3 } else { file };
                    let (max_ops, objects) = match op {
                        Op::Put => (max_puts, 0),
                        Op::Get => (u64::MAX, written[s]),
                    };
                    let side = measure(store, op, &body, size, concurrency, budget.time, max_ops, objects)
                        .await
                        .with_context(|| {
                            format!(
                                "{} {} at concurrency {concurrency} {}",
                                op.name(),
                                fmt_size(size),
                                if s == 0 { "through S3" } else { "on the filesystem" }
                            )
                        })?;
                    if op == Op::Put {
                        written[s] = side.ops;
                    }
                    sides[s] = Some(side);
                }
                let [Some(s3_side), Some(file_side)] = sides else {
                    bail!("a side was not measured");
                };
                cells.push(Cell {
                    op,
                    size_bytes: size,
                    concurrency,
                    ratio: ratio(s3_side.ops_per_s, file_side.ops_per_s),
                    s3: s3_side,
                    file: file_side,
                });
            }
        }
    }
    Ok(ObjectsReport {
        seconds_per_cell: budget.time.as_secs_f64(),
        max_cell_bytes: budget.max_bytes,
        cells,
    })
}

/// One cell on one side. PUTs write objects `0..n`; GETs read objects `0..objects`
/// round-robin.
#[allow(clippy::too_many_arguments)] // one cell's whole description, each used once
async fn measure(
    store: &Store,
    op: Op,
    body: &Body,
    size: u64,
    concurrency: usize,
    time: Duration,
    max_ops: u64,
    objects: u64,
) -> Result<Side> {
    if op == Op::Get && objects == 0 {
        bail!("nothing was written to read");
    }
    let min_ops = 2 * concurrency as u64;
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + time;
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let (store, body, next, failed) = (store.clone(), body.clone(), next.clone(), failed.clone());
        set.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                // Numbers are taken in time order and, past the minimum, only before the
                // deadline, so the PUTs done are exactly objects 0..n.
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= max_ops || (n >= min_ops && Instant::now() >= deadline) {
                    break;
                }
                let result = match op {
                    Op::Put => {
                        let key = key(size, concurrency, n);
                        let t = Instant::now();
                        store.put(&key, &body).await.map(|()| t.elapsed())
                    }
                    Op::Get => {
                        let key = key(size, concurrency, n % objects);
                        let t = Instant::now();
                        match store.get(&key).await {
                            Ok(data) => {
                                let elapsed = t.elapsed();
                                verify(&key, &data, &body, n == 0).map(|()| elapsed)
                            }
                            Err(err) => Err(err),
                        }
                    }
                };
                match result {
                    Ok(elapsed) => latencies.push(elapsed.as_secs_f64() * 1000.0),
                    Err(err) => {
                        failed.store(true, Ordering::Relaxed);
                        return Err(err);
                    }
                }
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(mut l)) => latencies.append(&mut l),
            Ok(Err(err)) => errors.push(err),
            Err(err) => errors.push(anyhow!("a task failed: {err}")),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let failures = errors.len();
    if let Some(err) = errors.into_iter().next() {
        return Err(err.context(format!(
            "{failures} request(s) failed and stopped the cell; the first error"
        )));
    }
    let ops = latencies.len() as u64;
    let latency_ms = Summary::of(&latencies).ok_or_else(|| anyhow!("no operation was measured"))?;
    Ok(Side {
        ops,
        seconds,
        ops_per_s: ops_per_s(ops, seconds),
        mb_per_s: mb_per_s(ops * size, seconds),
        latency_ms,
    })
}

/// Checks a GET's length always, and its content when `content` is set.
fn verify(key: &str, data: &Bytes, body: &Body, content: bool) -> Result<()> {
    if data.len() != body.data.len() {
        bail!(
            "GET {key}: {} bytes, {} were written",
            data.len(),
            body.data.len()
        );
    }
    if content && *data != body.data {
        bail!("GET {key}: the data differs from what was written");
    }
    Ok(())
}

impl ObjectsReport {
    /// The section as Markdown.
    pub fn render(&self) -> String {
        let mut out = String::from("### PUT and GET: through the S3 server vs. the filesystem directly\n\n");
        out.push_str(&format!(
            "S3: PutObject/GetObject of whole objects, path-style, SigV4-signed \
             (`x-amz-content-sha256` = the body's SHA-256), HTTP/1.1 keep-alive, into a bucket of a \
             class without limits. File: per PUT what the provider's storage does (new temporary \
             file, write, fsync, rename into the objects directory, fsync the directory), per GET a \
             read of the whole file, on the same filesystem. `conc` requests in flight (tokio tasks, \
             distinct keys); each cell runs about {} s per side (at most {} written per PUT cell), \
             GETs read the cell's PUT objects round-robin (from the page cache on both sides). \
             Latency is per request, p50/p99 by nearest rank. MB/s = 10^6 B/s of object data. \
             `S3/file` = S3 ops/s / file ops/s.\n\n",
            fmt_num(self.seconds_per_cell),
            fmt_size(self.max_cell_bytes)
        ));
        let mut table = Table::new([
            "op",
            "size",
            "conc",
            "S3 ops/s",
            "S3 MB/s",
            "S3 p50 ms",
            "S3 p99 ms",
            "file ops/s",
            "file MB/s",
            "file p50 ms",
            "file p99 ms",
            "S3/file",
            "ops (S3/file)",
        ]);
        for c in &self.cells {
            table.row([
                c.op.name().to_string(),
                fmt_size(c.size_bytes),
                c.concurrency.to_string(),
                fmt_num(c.s3.ops_per_s),
                fmt_num(c.s3.mb_per_s),
                fmt_num(c.s3.latency_ms.p50),
                fmt_num(c.s3.latency_ms.p99),
                fmt_num(c.file.ops_per_s),
                fmt_num(c.file.mb_per_s),
                fmt_num(c.file.latency_ms.p50),
                fmt_num(c.file.latency_ms.p99),
                fmt_ratio(c.ratio),
                format!("{}/{}", c.s3.ops, c.file.ops),
            ]);
        }
        out.push_str(&table.render());
        out.push_str(
            "\nThe S3 client (this benchmark: HTTP, SigV4) shares the cores with the server; the \
             file side has no client or protocol, so for small objects the ratio is mostly the \
             cost of an HTTP request against a syscall. Every object of a size carries the same \
             pseudo-random bytes, hashed once by the client (the server hashes every body). Every \
             GET's length is checked and the first GET of each cell is compared with the data \
             written; any failed request fails the run.\n",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_deterministic_and_not_zero() {
        let a = pattern(4096, 1);
        assert_eq!(a.len(), 4096);
        assert_eq!(a, pattern(4096, 1));
        assert_ne!(a, pattern(4096, 2));
        assert!(a.iter().filter(|&&b| b == 0).count() < 64);
        assert_eq!(pattern(5, 1).len(), 5);
        assert_eq!(key(4096, 16, 12), "4KiB/c16/000012");
    }

    #[tokio::test]
    async fn file_store_writes_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::File(Arc::new(FileStore::create(dir.path()).unwrap()));
        let body = Body::new(pattern(65536, 3));
        store.put("64KiB/c1/000000", &body).await.unwrap();
        assert_eq!(store.get("64KiB/c1/000000").await.unwrap(), body.data);
        assert!(store.get("64KiB/c1/000001").await.is_err());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let side = measure(&store, Op::Put, &body, 65536, 2, Duration::ZERO, u64::MAX, 0)
            .await
            .unwrap();
        assert_eq!(side.ops, 4, "the minimum of 2 x concurrency");
        let side = measure(&store, Op::Get, &body, 65536, 2, Duration::ZERO, u64::MAX, 4)
            .await
            .unwrap();
        assert_eq!(side.ops, 4);
        assert_eq!(side.latency_ms.count, 4);
    }
}
