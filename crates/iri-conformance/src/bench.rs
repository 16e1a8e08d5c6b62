// SPDX-License-Identifier: Apache-2.0
//! Benchmark mode: per-RPC latency (p50/p90/p99/max) and throughput of a runtime at one or more
//! concurrency levels, with the raw datapoints in the JSON schema of critest's benchmarks.
//!
//! Each kind has a *lifecycle*, a fixed sequence of operations run once per sample:
//!
//! * machine: `CreateMachine`, `ListMachines(id)`, `DeleteMachine`, `WaitMachineGone` (polls
//!   `ListMachines(id)` until the machine is no longer listed), `ListMachines(all)`, `Status`,
//!   `Version`;
//! * volume: `CreateVolume`, `ListVolumes(id)`, `CreateVolumeSnapshot`, `DeleteVolumeSnapshot`,
//!   `DeleteVolume`, `Status` (the two snapshot operations are dropped when the runtime answers
//!   `CreateVolumeSnapshot` with UNIMPLEMENTED);
//! * bucket: `CreateBucket`, `ListBuckets(id)`, `DeleteBucket`, `ListBucketClasses`.
//!
//! A level with concurrency `C` runs `iterations` samples on `C` workers that share one
//! connection (as a poollet does). One unmeasured warm-up sample comes first; it also finds out
//! whether snapshots are supported and fails the benchmark early when the lifecycle cannot work
//! at all (an unknown class, say). Every object carries the [`BENCH_LABEL`] label with the run id
//! and is deleted at the end of its sample, also when the sample fails; a final sweep deletes
//! whatever is still listed with the label (after an interrupt, too).

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::FutureExt;
use iri_api::{
    Endpoint, RuntimeKind, bucket::v1alpha1 as bucket, endpoint::clients, machine::v1alpha1 as machine,
    meta::v1alpha1::ObjectMetadata, volume::v1alpha1 as volume,
};
use serde::{Deserialize, Serialize, Serializer};
use tonic::{Code, Status, transport::Channel};

use crate::{Config, config::Timeouts};

/// Label on every object the benchmark creates; its value is the run id
/// ([`BenchReport::run_id`]), so a run's objects can be listed and cleaned up.
pub const BENCH_LABEL: &str = "conformance.iri.ironcore.dev/bench";
/// Label with the sample index (`warmup` for the warm-up sample), for debugging a runtime.
pub const SAMPLE_LABEL: &str = "conformance.iri.ironcore.dev/bench-sample";

const MACHINE_OPERATIONS: &[&str] = &[
    "CreateMachine",
    "ListMachines(id)",
    "DeleteMachine",
    "WaitMachineGone",
    "ListMachines(all)",
    "Status",
    "Version",
];
const VOLUME_OPERATIONS: &[&str] = &[
    "CreateVolume",
    "ListVolumes(id)",
    "CreateVolumeSnapshot",
    "DeleteVolumeSnapshot",
    "DeleteVolume",
    "Status",
];
const SNAPSHOT_OPERATIONS: &[&str] = &["CreateVolumeSnapshot", "DeleteVolumeSnapshot"];
const BUCKET_OPERATIONS: &[&str] = &[
    "CreateBucket",
    "ListBuckets(id)",
    "DeleteBucket",
    "ListBucketClasses",
];

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The runtime kind to benchmark.
    pub kind: RuntimeKind,
    /// Concurrency levels, measured one after the other.
    pub concurrency: Vec<usize>,
    /// Lifecycle samples per concurrency level.
    pub iterations: usize,
    /// Classes, sizes, image and timeouts.
    pub config: Config,
    /// Set it (e.g. on Ctrl-C) to start no further samples: the samples in flight finish, the
    /// sweep runs, and the report says it was interrupted.
    pub interrupt: Arc<AtomicBool>,
}

impl BenchOptions {
    /// Defaults for `kind`: concurrency 1, 100 iterations, default config.
    pub fn new(kind: RuntimeKind) -> Self {
        BenchOptions {
            kind,
            concurrency: vec![1],
            iterations: 100,
            config: Config::default(),
            interrupt: Arc::default(),
        }
    }
}

/// One lifecycle datapoint, exactly critest's `LifecycleBenchmarkDatapoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Datapoint {
    /// Index of the sample within its concurrency level.
    pub sample_index: usize,
    /// When the sample started, Unix nanoseconds.
    pub start_time: i64,
    /// When the sample ended, Unix nanoseconds.
    pub end_time: i64,
    /// Duration of each operation in nanoseconds, in the order of
    /// [`LifecycleResults::operations_names`].
    pub operations_durations_ns: Vec<i64>,
    /// `kind`, `id` (of the object created), `class`, `runId`.
    pub meta_info: BTreeMap<String, String>,
}

/// The raw results of one concurrency level, exactly critest's
/// `LifecycleBenchmarksResultsSet`: what `--json` writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleResults {
    /// The operations of one lifecycle, in order.
    pub operations_names: Vec<String>,
    /// The concurrency of the level (critest: "anything <= 1 is sequential").
    pub num_parallel: usize,
    /// One datapoint per sample that completed every operation (failed samples are counted in
    /// [`LevelReport`] instead, as critest has no place for them).
    pub datapoints: Vec<Datapoint>,
}

/// Latency and throughput of one operation at one concurrency level.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationStats {
    /// The operation, e.g. `CreateMachine`.
    pub name: String,
    /// Successful calls measured.
    pub count: usize,
    /// Calls that failed or answered wrongly (not in the latencies).
    pub errors: usize,
    /// Median latency (nearest rank).
    #[serde(rename = "p50Ns", serialize_with = "nanos")]
    pub p50: Duration,
    /// 90th percentile latency.
    #[serde(rename = "p90Ns", serialize_with = "nanos")]
    pub p90: Duration,
    /// 99th percentile latency.
    #[serde(rename = "p99Ns", serialize_with = "nanos")]
    pub p99: Duration,
    /// Slowest call.
    #[serde(rename = "maxNs", serialize_with = "nanos")]
    pub max: Duration,
    /// Mean latency.
    #[serde(rename = "meanNs", serialize_with = "nanos")]
    pub mean: Duration,
    /// Throughput in operations per second: concurrency divided by the mean latency (Little's
    /// law), i.e. the rate that many clients issuing only this RPC back to back would reach at
    /// the latencies measured. Zero without successful calls.
    pub ops_per_second: f64,
}

/// How often one error message occurred.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorCount {
    /// `<operation>: <code>: <message>`.
    pub message: String,
    /// How many samples failed with it.
    pub count: usize,
}

/// One concurrency level.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LevelReport {
    /// Lifecycles in flight at once.
    pub concurrency: usize,
    /// Samples started.
    pub samples: usize,
    /// Samples that failed at some operation.
    pub failed_samples: usize,
    /// Wall time of the level.
    #[serde(rename = "wallNs", serialize_with = "nanos")]
    pub wall: Duration,
    /// Completed lifecycles per second of wall time.
    pub lifecycles_per_second: f64,
    /// Per operation, in lifecycle order.
    pub operations: Vec<OperationStats>,
    /// Distinct failures, most frequent first.
    pub errors: Vec<ErrorCount>,
    /// The raw datapoints (written by `--json`, not part of the summary).
    #[serde(skip)]
    pub results: LifecycleResults,
}

/// An operation left out of the lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedOperation {
    /// The operation.
    pub operation: String,
    /// Why (the runtime's answer).
    pub reason: String,
}

/// The result of a benchmark run (what `--summary-json` writes).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    /// The runtime kind.
    pub kind: String,
    /// The endpoint measured.
    pub endpoint: String,
    /// `runtime_name runtime_version` as the runtime reported it.
    pub runtime: String,
    /// Value of [`BENCH_LABEL`] on this run's objects.
    pub run_id: String,
    /// The class objects were created with (empty when none could be chosen).
    pub class: String,
    /// Samples per level.
    pub iterations: usize,
    /// The operations of one lifecycle, in order.
    pub operations: Vec<String>,
    /// Operations left out because the runtime does not support them.
    pub skipped_operations: Vec<SkippedOperation>,
    /// Why nothing was measured (no class, or the warm-up lifecycle failed).
    pub aborted: Option<String>,
    /// Whether the run was interrupted before every level completed.
    pub interrupted: bool,
    /// The levels measured, in the order given.
    pub levels: Vec<LevelReport>,
    /// Objects the final sweep could not delete (`machine <id>: <why>`).
    pub leftovers: Vec<String>,
}

impl BenchReport {
    /// Samples that failed, over all levels.
    pub fn failed_samples(&self) -> usize {
        self.levels.iter().map(|l| l.failed_samples).sum()
    }

    /// Whether the run measured everything it was asked to without a failure and left nothing
    /// behind.
    pub fn is_clean(&self) -> bool {
        self.aborted.is_none() && !self.interrupted && self.failed_samples() == 0 && self.leftovers.is_empty()
    }
}

/// Where the raw results of the level with `concurrency` go when `--json` is `path` and
/// `levels` levels are measured: `path` itself for a single level, else `path` with `.c<N>`
/// before the extension (`bench.json` → `bench.c4.json`), one critest document per file, so
/// critest tooling can read each as is.
pub fn results_path(path: &Path, concurrency: usize, levels: usize) -> PathBuf {
    if levels <= 1 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.c{concurrency}.{}", ext.to_string_lossy()),
        None => format!("{stem}.c{concurrency}"),
    };
    path.with_file_name(name)
}

/// Runs the benchmark against `endpoint`. Errors only for invalid options or when the runtime
/// cannot be reached; everything else (including an aborted run) is in the report.
pub async fn run(endpoint: &Endpoint, options: BenchOptions) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(options.iterations > 0, "iterations must be at least 1");
    anyhow::ensure!(
        !options.concurrency.is_empty() && options.concurrency.iter().all(|&c| c > 0),
        "every concurrency level must be at least 1"
    );
    let timeouts = options.config.timeouts.clone();
    let channel = endpoint
        .connect(timeouts.rpc())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtime = runtime_version(options.kind, channel.clone(), timeouts.rpc()).await;
    let run_id = format!(
        "{:x}-{}",
        iri_runtime::id::now_nanos(),
        &iri_runtime::id::new_id()[..8]
    );
    let mut report = BenchReport {
        kind: options.kind.to_string(),
        endpoint: endpoint.to_string(),
        runtime,
        run_id: run_id.clone(),
        class: String::new(),
        iterations: options.iterations,
        operations: Vec::new(),
        skipped_operations: Vec::new(),
        aborted: None,
        interrupted: false,
        levels: Vec::new(),
        leftovers: Vec::new(),
    };
    let most = options.concurrency.iter().copied().max().unwrap_or(1);
    let class = match pick_class(options.kind, &channel, &options.config, most).await {
        Ok(class) => class,
        Err(reason) => {
            report.aborted = Some(reason);
            return Ok(report);
        }
    };
    report.class = class.clone();
    let mut lifecycle = Lifecycle {
        kind: options.kind,
        channel,
        timeouts,
        run_id,
        class,
        machine_image: options.config.machine.image.clone(),
        volume_size: options.config.volume.size_bytes,
        snapshots: options.kind == RuntimeKind::Volume,
    };

    // The warm-up opens the connection and finds out what works before anything is measured.
    let mut warmup = lifecycle.sample(0, "warmup").await;
    if let Some(error) = &warmup.error
        && error.operation == "CreateVolumeSnapshot"
        && error.code == Some(Code::Unimplemented)
    {
        for operation in SNAPSHOT_OPERATIONS {
            report.skipped_operations.push(SkippedOperation {
                operation: operation.to_string(),
                reason: error.message.clone(),
            });
        }
        lifecycle.snapshots = false;
        warmup = lifecycle.sample(0, "warmup").await;
    }
    report.operations = lifecycle.operations().iter().map(|o| o.to_string()).collect();
    if let Some(error) = warmup.error {
        report.aborted = Some(format!("the warm-up lifecycle failed: {error}"));
    } else {
        for &concurrency in &options.concurrency {
            if options.interrupt.load(Ordering::Relaxed) {
                break;
            }
            let level = run_level(&lifecycle, concurrency, options.iterations, &options.interrupt).await;
            report.levels.push(level);
        }
        report.interrupted = options.interrupt.load(Ordering::Relaxed);
    }
    report.leftovers = lifecycle.sweep().await;
    Ok(report)
}

/// The class objects are created with: the configured one, else the first class the runtime
/// reports, preferring one with room for `concurrency` objects at once.
async fn pick_class(
    kind: RuntimeKind,
    channel: &Channel,
    config: &Config,
    concurrency: usize,
) -> Result<String, String> {
    let configured = match kind {
        RuntimeKind::Machine => &config.machine.class,
        RuntimeKind::Volume => &config.volume.class,
        RuntimeKind::Bucket => &config.bucket.class,
    };
    if !configured.is_empty() {
        return Ok(configured.clone());
    }
    let timeout = config.timeouts.rpc();
    let failed = |what: &str, status: Status| format!("{what}: {:?}: {}", status.code(), status.message());
    let concurrency = i64::try_from(concurrency).unwrap_or(i64::MAX);
    // (name, room for the objects in flight)
    let classes: Vec<(String, bool)> = match kind {
        RuntimeKind::Machine => clients::machine(channel.clone())
            .status(with_timeout(machine::StatusRequest {}, timeout))
            .await
            .map_err(|s| failed("Status", s))?
            .into_inner()
            .machine_class_status
            .into_iter()
            .filter_map(|s| Some((s.machine_class?.name, s.quantity >= concurrency)))
            .collect(),
        RuntimeKind::Volume => clients::volume(channel.clone())
            .status(with_timeout(volume::StatusRequest {}, timeout))
            .await
            .map_err(|s| failed("Status", s))?
            .into_inner()
            .volume_class_status
            .into_iter()
            // A volume class quantity is bytes (iri-contract §2.3).
            .filter_map(|s| {
                let room = s.quantity / config.volume.size_bytes.max(1) >= concurrency;
                Some((s.volume_class?.name, room))
            })
            .collect(),
        RuntimeKind::Bucket => clients::bucket(channel.clone())
            .list_bucket_classes(with_timeout(bucket::ListBucketClassesRequest {}, timeout))
            .await
            .map_err(|s| failed("ListBucketClasses", s))?
            .into_inner()
            .bucket_classes
            .into_iter()
            .map(|c| (c.name, true))
            .collect(),
    };
    let classes: Vec<_> = classes.into_iter().filter(|(name, _)| !name.is_empty()).collect();
    classes
        .iter()
        .find(|(_, room)| *room)
        .or(classes.first())
        .map(|(name, _)| name.clone())
        .ok_or_else(|| format!("the runtime reports no {kind} class; set [{kind}] class in the config"))
}

async fn runtime_version(kind: RuntimeKind, channel: Channel, timeout: Duration) -> String {
    let answer = match kind {
        RuntimeKind::Machine => clients::machine(channel)
            .version(with_timeout(machine::VersionRequest::default(), timeout))
            .await
            .map(|r| r.into_inner())
            .map(|v| (v.runtime_name, v.runtime_version)),
        RuntimeKind::Volume => clients::volume(channel)
            .version(with_timeout(volume::VersionRequest::default(), timeout))
            .await
            .map(|r| r.into_inner())
            .map(|v| (v.runtime_name, v.runtime_version)),
        RuntimeKind::Bucket => clients::bucket(channel)
            .version(with_timeout(bucket::VersionRequest::default(), timeout))
            .await
            .map(|r| r.into_inner())
            .map(|v| (v.runtime_name, v.runtime_version)),
    };
    match answer {
        Ok((name, version)) => format!("{name} {version}"),
        Err(status) => format!("unknown (Version failed: {:?})", status.code()),
    }
}

/// `message` as a request with a deadline.
fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// A failed operation of a sample.
#[derive(Debug, Clone)]
struct OpError {
    operation: &'static str,
    /// The gRPC code, when the runtime answered with an error (not for wrong answers).
    code: Option<Code>,
    message: String,
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.operation, self.message)
    }
}

/// Times the operations of one sample, in lifecycle order.
struct Recorder<'a> {
    names: &'a [&'static str],
    durations: Vec<Duration>,
}

impl Recorder<'_> {
    fn current(&self) -> &'static str {
        self.names.get(self.durations.len()).copied().unwrap_or("?")
    }

    /// Times the next operation, giving up after `timeout`.
    async fn measure<T>(
        &mut self,
        timeout: Duration,
        operation: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, OpError> {
        let name = self.current();
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, operation).await;
        let elapsed = started.elapsed();
        match result {
            Ok(Ok(value)) => {
                self.durations.push(elapsed);
                Ok(value)
            }
            Ok(Err(status)) => Err(OpError {
                operation: name,
                code: Some(status.code()),
                message: format!("{:?}: {}", status.code(), status.message()),
            }),
            Err(_) => Err(OpError {
                operation: name,
                code: Some(Code::DeadlineExceeded),
                message: format!("DeadlineExceeded: not done within {timeout:?}"),
            }),
        }
    }

    /// Times the next operation, an RPC.
    async fn call<T>(
        &mut self,
        timeout: Duration,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, OpError> {
        self.measure(timeout, call.map(|r| r.map(tonic::Response::into_inner)))
            .await
    }

    /// Fails the operation just measured because its answer was wrong; its latency is dropped,
    /// as for any failed call.
    fn reject(&mut self, message: String) -> OpError {
        self.durations.pop();
        OpError {
            operation: self.current(),
            code: None,
            message,
        }
    }
}

/// An object a sample created and has not deleted yet.
#[derive(Debug, Clone)]
enum Created {
    Machine(String),
    Volume(String),
    Snapshot(String),
    Bucket(String),
}

/// One finished sample.
struct Sample {
    index: usize,
    start_ns: i64,
    end_ns: i64,
    durations: Vec<Duration>,
    object_id: String,
    error: Option<OpError>,
}

/// The lifecycle of one kind, bound to a runtime.
struct Lifecycle {
    kind: RuntimeKind,
    channel: Channel,
    timeouts: Timeouts,
    run_id: String,
    class: String,
    machine_image: String,
    volume_size: i64,
    snapshots: bool,
}

impl Lifecycle {
    fn operations(&self) -> Vec<&'static str> {
        match self.kind {
            RuntimeKind::Machine => MACHINE_OPERATIONS.to_vec(),
            RuntimeKind::Volume if self.snapshots => VOLUME_OPERATIONS.to_vec(),
            RuntimeKind::Volume => VOLUME_OPERATIONS
                .iter()
                .filter(|o| !SNAPSHOT_OPERATIONS.contains(o))
                .copied()
                .collect(),
            RuntimeKind::Bucket => BUCKET_OPERATIONS.to_vec(),
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        with_timeout(message, self.timeouts.rpc())
    }

    fn metadata(&self, sample: &str) -> ObjectMetadata {
        ObjectMetadata {
            labels: [
                (BENCH_LABEL.to_string(), self.run_id.clone()),
                (SAMPLE_LABEL.to_string(), sample.to_string()),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        }
    }

    fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(BENCH_LABEL.to_string(), self.run_id.clone())])
    }

    /// Runs one lifecycle; whatever it created and did not delete is deleted before it returns.
    async fn sample(&self, index: usize, tag: &str) -> Sample {
        let names = self.operations();
        let mut recorder = Recorder {
            names: &names,
            durations: Vec::new(),
        };
        let mut created = Vec::new();
        let start_ns = iri_runtime::id::now_nanos();
        let result = match self.kind {
            RuntimeKind::Machine => self.machine_sample(&mut recorder, &mut created, tag).await,
            RuntimeKind::Volume => self.volume_sample(&mut recorder, &mut created, tag).await,
            RuntimeKind::Bucket => self.bucket_sample(&mut recorder, &mut created, tag).await,
        };
        let end_ns = iri_runtime::id::now_nanos();
        // Newest first: a snapshot goes before its volume.
        for object in created.iter().rev() {
            let _ = self.delete(object).await;
        }
        let (object_id, error) = match result {
            Ok(id) => (id, None),
            Err(error) => (String::new(), Some(error)),
        };
        Sample {
            index,
            start_ns,
            end_ns,
            durations: recorder.durations,
            object_id,
            error,
        }
    }

    async fn machine_sample(
        &self,
        recorder: &mut Recorder<'_>,
        created: &mut Vec<Created>,
        tag: &str,
    ) -> Result<String, OpError> {
        let rpc = self.timeouts.rpc();
        let mut client = clients::machine(self.channel.clone());
        // A boot disk only when the config names an image: runtimes that need one say so.
        let volumes = if self.machine_image.is_empty() {
            Vec::new()
        } else {
            vec![machine::Volume {
                name: "root".into(),
                // The device name the suite's machines use (upstream poollets' first disk).
                device: "oda".into(),
                local_disk: Some(machine::LocalDisk {
                    size_bytes: 0,
                    image: Some(machine::ImageSpec {
                        image: self.machine_image.clone(),
                    }),
                }),
                ..Default::default()
            }]
        };
        let new = machine::Machine {
            metadata: Some(self.metadata(tag)),
            spec: Some(machine::MachineSpec {
                power: machine::Power::On as i32,
                class: self.class.clone(),
                volumes,
                ..Default::default()
            }),
            status: None,
        };
        let response = recorder
            .call(
                rpc,
                client.create_machine(self.request(machine::CreateMachineRequest { machine: Some(new) })),
            )
            .await?;
        let id = response
            .machine
            .and_then(|m| m.metadata)
            .map(|m| m.id)
            .unwrap_or_default();
        if id.is_empty() {
            return Err(recorder.reject("no machine id in the response".into()));
        }
        created.push(Created::Machine(id.clone()));
        let by_id = || machine::ListMachinesRequest {
            filter: Some(machine::MachineFilter {
                id: id.clone(),
                ..Default::default()
            }),
        };
        let listed = recorder
            .call(rpc, client.list_machines(self.request(by_id())))
            .await?;
        if listed.machines.len() != 1 {
            return Err(recorder.reject(format!("listed {} machines, want 1", listed.machines.len())));
        }
        recorder
            .call(
                rpc,
                client.delete_machine(self.request(machine::DeleteMachineRequest {
                    machine_id: id.clone(),
                })),
            )
            .await?;
        let gone = poll_until_gone(|| {
            let mut client = client.clone();
            let request = self.request(by_id());
            async move {
                Ok(!client
                    .list_machines(request)
                    .await?
                    .into_inner()
                    .machines
                    .is_empty())
            }
        });
        recorder.measure(self.timeouts.delete(), gone).await?;
        created.clear();
        recorder
            .call(
                rpc,
                client.list_machines(self.request(machine::ListMachinesRequest::default())),
            )
            .await?;
        recorder
            .call(rpc, client.status(self.request(machine::StatusRequest {})))
            .await?;
        recorder
            .call(
                rpc,
                client.version(self.request(machine::VersionRequest::default())),
            )
            .await?;
        Ok(id)
    }

    async fn volume_sample(
        &self,
        recorder: &mut Recorder<'_>,
        created: &mut Vec<Created>,
        tag: &str,
    ) -> Result<String, OpError> {
        let rpc = self.timeouts.rpc();
        let mut client = clients::volume(self.channel.clone());
        let new = volume::Volume {
            metadata: Some(self.metadata(tag)),
            spec: Some(volume::VolumeSpec {
                class: self.class.clone(),
                resources: Some(volume::VolumeResources {
                    storage_bytes: self.volume_size,
                }),
                ..Default::default()
            }),
            status: None,
        };
        let response = recorder
            .call(
                rpc,
                client.create_volume(self.request(volume::CreateVolumeRequest { volume: Some(new) })),
            )
            .await?;
        let id = response
            .volume
            .and_then(|v| v.metadata)
            .map(|m| m.id)
            .unwrap_or_default();
        if id.is_empty() {
            return Err(recorder.reject("no volume id in the response".into()));
        }
        created.push(Created::Volume(id.clone()));
        let listed = recorder
            .call(
                rpc,
                client.list_volumes(self.request(volume::ListVolumesRequest {
                    filter: Some(volume::VolumeFilter {
                        id: id.clone(),
                        ..Default::default()
                    }),
                })),
            )
            .await?;
        if listed.volumes.len() != 1 {
            return Err(recorder.reject(format!("listed {} volumes, want 1", listed.volumes.len())));
        }
        if self.snapshots {
            let snapshot = volume::VolumeSnapshot {
                metadata: Some(self.metadata(tag)),
                spec: Some(volume::VolumeSnapshotSpec {
                    volume_id: id.clone(),
                }),
                status: None,
            };
            let response = recorder
                .call(
                    rpc,
                    client.create_volume_snapshot(self.request(volume::CreateVolumeSnapshotRequest {
                        volume_snapshot: Some(snapshot),
                    })),
                )
                .await?;
            let snapshot_id = response
                .volume_snapshot
                .and_then(|s| s.metadata)
                .map(|m| m.id)
                .unwrap_or_default();
            if snapshot_id.is_empty() {
                return Err(recorder.reject("no volume snapshot id in the response".into()));
            }
            created.push(Created::Snapshot(snapshot_id.clone()));
            recorder
                .call(
                    rpc,
                    client.delete_volume_snapshot(self.request(volume::DeleteVolumeSnapshotRequest {
                        volume_snapshot_id: snapshot_id,
                    })),
                )
                .await?;
            created.pop();
        }
        recorder
            .call(
                rpc,
                client.delete_volume(self.request(volume::DeleteVolumeRequest {
                    volume_id: id.clone(),
                })),
            )
            .await?;
        created.clear();
        recorder
            .call(rpc, client.status(self.request(volume::StatusRequest {})))
            .await?;
        Ok(id)
    }

    async fn bucket_sample(
        &self,
        recorder: &mut Recorder<'_>,
        created: &mut Vec<Created>,
        tag: &str,
    ) -> Result<String, OpError> {
        let rpc = self.timeouts.rpc();
        let mut client = clients::bucket(self.channel.clone());
        let new = bucket::Bucket {
            metadata: Some(self.metadata(tag)),
            spec: Some(bucket::BucketSpec {
                class: self.class.clone(),
            }),
            status: None,
        };
        let response = recorder
            .call(
                rpc,
                client.create_bucket(self.request(bucket::CreateBucketRequest { bucket: Some(new) })),
            )
            .await?;
        let id = response
            .bucket
            .and_then(|b| b.metadata)
            .map(|m| m.id)
            .unwrap_or_default();
        if id.is_empty() {
            return Err(recorder.reject("no bucket id in the response".into()));
        }
        created.push(Created::Bucket(id.clone()));
        let listed = recorder
            .call(
                rpc,
                client.list_buckets(self.request(bucket::ListBucketsRequest {
                    filter: Some(bucket::BucketFilter {
                        id: id.clone(),
                        ..Default::default()
                    }),
                })),
            )
            .await?;
        if listed.buckets.len() != 1 {
            return Err(recorder.reject(format!("listed {} buckets, want 1", listed.buckets.len())));
        }
        recorder
            .call(
                rpc,
                client.delete_bucket(self.request(bucket::DeleteBucketRequest {
                    bucket_id: id.clone(),
                })),
            )
            .await?;
        created.clear();
        recorder
            .call(
                rpc,
                client.list_bucket_classes(self.request(bucket::ListBucketClassesRequest {})),
            )
            .await?;
        Ok(id)
    }

    /// Deletes `object`; NOT_FOUND counts as deleted.
    async fn delete(&self, object: &Created) -> Result<(), Status> {
        let result = match object {
            Created::Machine(id) => clients::machine(self.channel.clone())
                .delete_machine(self.request(machine::DeleteMachineRequest {
                    machine_id: id.clone(),
                }))
                .await
                .map(drop),
            Created::Volume(id) => clients::volume(self.channel.clone())
                .delete_volume(self.request(volume::DeleteVolumeRequest {
                    volume_id: id.clone(),
                }))
                .await
                .map(drop),
            Created::Snapshot(id) => clients::volume(self.channel.clone())
                .delete_volume_snapshot(self.request(volume::DeleteVolumeSnapshotRequest {
                    volume_snapshot_id: id.clone(),
                }))
                .await
                .map(drop),
            Created::Bucket(id) => clients::bucket(self.channel.clone())
                .delete_bucket(self.request(bucket::DeleteBucketRequest {
                    bucket_id: id.clone(),
                }))
                .await
                .map(drop),
        };
        match result {
            Err(status) if status.code() == Code::NotFound => Ok(()),
            other => other,
        }
    }

    /// This run's objects still listed, snapshots before volumes.
    async fn listed(&self) -> Result<Vec<Created>, Status> {
        let selector = self.selector();
        Ok(match self.kind {
            RuntimeKind::Machine => clients::machine(self.channel.clone())
                .list_machines(self.request(machine::ListMachinesRequest {
                    filter: Some(machine::MachineFilter {
                        label_selector: selector,
                        ..Default::default()
                    }),
                }))
                .await?
                .into_inner()
                .machines
                .into_iter()
                .filter_map(|m| m.metadata)
                .map(|m| Created::Machine(m.id))
                .collect(),
            RuntimeKind::Volume => {
                let mut client = clients::volume(self.channel.clone());
                // A runtime without snapshots may not list them either.
                let snapshots = match client
                    .list_volume_snapshots(self.request(volume::ListVolumeSnapshotsRequest {
                        filter: Some(volume::VolumeSnapshotFilter {
                            label_selector: selector.clone(),
                            ..Default::default()
                        }),
                    }))
                    .await
                {
                    Ok(response) => response.into_inner().volume_snapshots,
                    Err(status) if status.code() == Code::Unimplemented => Vec::new(),
                    Err(status) => return Err(status),
                };
                let volumes = client
                    .list_volumes(self.request(volume::ListVolumesRequest {
                        filter: Some(volume::VolumeFilter {
                            label_selector: selector,
                            ..Default::default()
                        }),
                    }))
                    .await?
                    .into_inner()
                    .volumes;
                snapshots
                    .into_iter()
                    .filter_map(|s| s.metadata)
                    .map(|m| Created::Snapshot(m.id))
                    .chain(
                        volumes
                            .into_iter()
                            .filter_map(|v| v.metadata)
                            .map(|m| Created::Volume(m.id)),
                    )
                    .collect()
            }
            RuntimeKind::Bucket => clients::bucket(self.channel.clone())
                .list_buckets(self.request(bucket::ListBucketsRequest {
                    filter: Some(bucket::BucketFilter {
                        label_selector: selector,
                        ..Default::default()
                    }),
                }))
                .await?
                .into_inner()
                .buckets
                .into_iter()
                .filter_map(|b| b.metadata)
                .map(|m| Created::Bucket(m.id))
                .collect(),
        })
    }

    /// Deletes every object of this run that is still listed and waits until none is; returns
    /// what is left (`<kind> <id>`, or why listing failed).
    async fn sweep(&self) -> Vec<String> {
        let deadline = Instant::now() + self.timeouts.delete();
        let mut deleted_once = false;
        loop {
            let objects = match self.listed().await {
                Ok(objects) => objects,
                Err(status) => {
                    return vec![format!(
                        "cannot list this run's objects ({BENCH_LABEL}={}): {:?}: {}",
                        self.run_id,
                        status.code(),
                        status.message()
                    )];
                }
            };
            if objects.is_empty() {
                return Vec::new();
            }
            if Instant::now() >= deadline {
                return objects
                    .iter()
                    .map(|o| {
                        format!(
                            "{} (still listed after {:?})",
                            describe(o),
                            self.timeouts.delete()
                        )
                    })
                    .collect();
            }
            // Delete once; a runtime that deletes asynchronously only needs time after that.
            if !deleted_once {
                for object in &objects {
                    let _ = self.delete(object).await;
                }
                deleted_once = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn describe(object: &Created) -> String {
    match object {
        Created::Machine(id) => format!("machine {id}"),
        Created::Volume(id) => format!("volume {id}"),
        Created::Snapshot(id) => format!("volume snapshot {id}"),
        Created::Bucket(id) => format!("bucket {id}"),
    }
}

/// Polls `listed` (true while the object is still listed) with a growing interval until it
/// answers false. The caller bounds the time.
async fn poll_until_gone<F, Fut>(mut listed: F) -> Result<(), Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, Status>>,
{
    // Start fast so a synchronous delete is measured precisely, back off so a slow one is not
    // flooded with List calls.
    let mut interval = Duration::from_millis(2);
    while listed().await? {
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(250));
    }
    Ok(())
}

/// Runs one concurrency level: `iterations` samples on `concurrency` workers.
async fn run_level(
    lifecycle: &Lifecycle,
    concurrency: usize,
    iterations: usize,
    interrupt: &AtomicBool,
) -> LevelReport {
    let names = lifecycle.operations();
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let worker = || async {
        let mut samples = Vec::new();
        while !interrupt.load(Ordering::Relaxed) {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= iterations {
                break;
            }
            samples.push(lifecycle.sample(index, &index.to_string()).await);
        }
        samples
    };
    let mut samples: Vec<Sample> = futures::future::join_all((0..concurrency).map(|_| worker()))
        .await
        .into_iter()
        .flatten()
        .collect();
    let wall = started.elapsed();
    samples.sort_by_key(|s| s.index);

    let mut latencies: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    let mut op_errors = vec![0usize; names.len()];
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut datapoints = Vec::new();
    for sample in &samples {
        // Every successful call counts, also those of a sample that failed later.
        for (op, duration) in sample.durations.iter().enumerate() {
            latencies[op].push(*duration);
        }
        match &sample.error {
            Some(error) => {
                if let Some(op) = names.iter().position(|n| *n == error.operation) {
                    op_errors[op] += 1;
                }
                *errors.entry(error.to_string()).or_default() += 1;
            }
            None => datapoints.push(Datapoint {
                sample_index: sample.index,
                start_time: sample.start_ns,
                end_time: sample.end_ns,
                operations_durations_ns: sample.durations.iter().map(|d| as_nanos(*d)).collect(),
                meta_info: BTreeMap::from([
                    ("kind".to_string(), lifecycle.kind.to_string()),
                    ("id".to_string(), sample.object_id.clone()),
                    ("class".to_string(), lifecycle.class.clone()),
                    ("runId".to_string(), lifecycle.run_id.clone()),
                ]),
            }),
        }
    }
    let operations = names
        .iter()
        .zip(latencies)
        .zip(op_errors)
        .map(|((name, latencies), errors)| stats(name, latencies, errors, concurrency))
        .collect();
    let mut errors: Vec<ErrorCount> = errors
        .into_iter()
        .map(|(message, count)| ErrorCount { message, count })
        .collect();
    errors.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.message.cmp(&b.message)));
    let completed = datapoints.len();
    LevelReport {
        concurrency,
        samples: samples.len(),
        failed_samples: samples.len() - completed,
        wall,
        lifecycles_per_second: per_second(completed as f64, wall),
        operations,
        errors,
        results: LifecycleResults {
            operations_names: names.iter().map(|n| n.to_string()).collect(),
            num_parallel: concurrency,
            datapoints,
        },
    }
}

fn stats(name: &str, mut latencies: Vec<Duration>, errors: usize, concurrency: usize) -> OperationStats {
    latencies.sort_unstable();
    let count = latencies.len();
    let mean = if count == 0 {
        Duration::ZERO
    } else {
        latencies.iter().sum::<Duration>() / u32::try_from(count).unwrap_or(u32::MAX)
    };
    OperationStats {
        name: name.to_string(),
        count,
        errors,
        p50: percentile(&latencies, 50.0),
        p90: percentile(&latencies, 90.0),
        p99: percentile(&latencies, 99.0),
        max: latencies.last().copied().unwrap_or_default(),
        mean,
        ops_per_second: if count == 0 {
            0.0
        } else {
            per_second(concurrency as f64, mean)
        },
    }
}

/// The nearest-rank percentile of `sorted` (zero when empty): always one of the samples, so
/// p50 <= p90 <= p99 <= max holds by construction.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn per_second(count: f64, over: Duration) -> f64 {
    if over.is_zero() {
        0.0
    } else {
        count / over.as_secs_f64()
    }
}

fn as_nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

fn nanos<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_i64(as_nanos(*duration))
}

/// A latency for people: `850µs`, `12.3ms`, `1.52s`.
pub fn human(duration: Duration) -> String {
    let micros = duration.as_secs_f64() * 1e6;
    if micros < 1000.0 {
        format!("{micros:.0}µs")
    } else if micros < 1e6 {
        format!("{:.1}ms", micros / 1e3)
    } else {
        format!("{:.2}s", micros / 1e6)
    }
}

/// The readable report: a header, one aligned table per concurrency level, failures, skipped
/// operations and leftovers.
pub fn table(report: &BenchReport) -> String {
    let mut out = format!(
        "{} runtime at {} ({}), class {}, {} iterations per level, run {}\n",
        report.kind,
        report.endpoint,
        report.runtime,
        if report.class.is_empty() {
            "-"
        } else {
            &report.class
        },
        report.iterations,
        report.run_id
    );
    for skipped in &report.skipped_operations {
        out.push_str(&format!(
            "skipped {}: {}\n",
            skipped.operation,
            one_line(&skipped.reason)
        ));
    }
    if let Some(reason) = &report.aborted {
        out.push_str(&format!("aborted: {}\n", one_line(reason)));
    }
    for level in &report.levels {
        out.push('\n');
        out.push_str(&format!(
            "concurrency {}: {} lifecycles ({} failed) in {}, {:.1} lifecycles/s\n",
            level.concurrency,
            level.samples,
            level.failed_samples,
            human(level.wall),
            level.lifecycles_per_second
        ));
        let header = [
            "OPERATION",
            "CALLS",
            "ERRORS",
            "P50",
            "P90",
            "P99",
            "MAX",
            "OPS/S",
        ]
        .map(String::from);
        let rows: Vec<[String; 8]> = level
            .operations
            .iter()
            .map(|op| {
                [
                    op.name.clone(),
                    op.count.to_string(),
                    op.errors.to_string(),
                    human(op.p50),
                    human(op.p90),
                    human(op.p99),
                    human(op.max),
                    format!("{:.1}", op.ops_per_second),
                ]
            })
            .collect();
        out.push_str(&align(&header, &rows));
        for error in &level.errors {
            out.push_str(&format!("  {}x {}\n", error.count, one_line(&error.message)));
        }
    }
    if report.interrupted {
        out.push_str("\ninterrupted: not every level was measured\n");
    }
    for leftover in &report.leftovers {
        out.push_str(&format!("left behind: {}\n", one_line(leftover)));
    }
    out
}

/// Aligns a table: the first column left-aligned, the numbers right-aligned.
fn align<const N: usize>(header: &[String; N], rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in std::iter::once(header).chain(rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let mut line = String::new();
        for (column, (cell, width)) in row.iter().zip(widths).enumerate() {
            let pad = " ".repeat(width - cell.chars().count());
            if column == 0 {
                line.push_str(cell);
                line.push_str(&pad);
            } else {
                line.push_str("  ");
                line.push_str(&pad);
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let ms = |n: u64| Duration::from_millis(n);
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&sorted, 50.0), ms(50));
        assert_eq!(percentile(&sorted, 90.0), ms(90));
        assert_eq!(percentile(&sorted, 99.0), ms(99));
        assert_eq!(percentile(&sorted, 100.0), ms(100));
        assert_eq!(percentile(&[ms(7)], 50.0), ms(7));
        assert_eq!(percentile(&[ms(1), ms(2)], 50.0), ms(1));
        assert_eq!(percentile(&[ms(1), ms(2)], 99.0), ms(2));
        assert_eq!(percentile(&[], 99.0), Duration::ZERO);
    }

    #[test]
    fn stats_are_ordered_and_throughput_follows_littles_law() {
        let latencies: Vec<Duration> = [5, 1, 3, 2, 4].map(Duration::from_millis).into();
        let s = stats("X", latencies, 1, 4);
        assert_eq!((s.count, s.errors), (5, 1));
        assert!(s.p50 <= s.p90 && s.p90 <= s.p99 && s.p99 <= s.max);
        assert_eq!(s.max, Duration::from_millis(5));
        assert_eq!(s.mean, Duration::from_millis(3));
        assert!((s.ops_per_second - 4.0 / 0.003).abs() < 1e-6);
        let empty = stats("Y", Vec::new(), 3, 1);
        assert_eq!((empty.count, empty.ops_per_second), (0, 0.0));
    }

    #[test]
    fn results_paths_get_one_file_per_level() {
        let path = Path::new("/tmp/out/bench.json");
        assert_eq!(results_path(path, 4, 1), path);
        assert_eq!(results_path(path, 4, 3), Path::new("/tmp/out/bench.c4.json"));
        assert_eq!(results_path(Path::new("raw"), 16, 2), Path::new("raw.c16"));
    }

    #[test]
    fn datapoints_serialize_in_critests_schema() {
        let results = LifecycleResults {
            operations_names: vec!["CreateBucket".into()],
            num_parallel: 2,
            datapoints: vec![Datapoint {
                sample_index: 0,
                start_time: 1,
                end_time: 2,
                operations_durations_ns: vec![1],
                meta_info: BTreeMap::new(),
            }],
        };
        let json = serde_json::to_value(&results).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "operationsNames": ["CreateBucket"],
                "numParallel": 2,
                "datapoints": [{
                    "sampleIndex": 0, "startTime": 1, "endTime": 2,
                    "operationsDurationsNs": [1], "metaInfo": {}
                }]
            })
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_micros(850)), "850µs");
        assert_eq!(human(Duration::from_micros(12_340)), "12.3ms");
        assert_eq!(human(Duration::from_millis(1520)), "1.52s");
    }
}
