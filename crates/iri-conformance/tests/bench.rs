// SPDX-License-Identifier: Apache-2.0
//! Benchmark mode against the in-memory reference runtimes: the library API and the binary.
//! The raw JSON must be critest's schema, the percentiles ordered, and nothing may be left
//! behind.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use iri_api::{
    Endpoint, RuntimeKind,
    endpoint::clients,
    machine::v1alpha1 as machine,
    volume::v1alpha1::{self as volume, volume_runtime_server::VolumeRuntime as VolumeService},
};
use iri_conformance::bench::{self, BENCH_LABEL, BenchOptions, BenchReport, LifecycleResults};
use iri_runtime::{
    metrics::Metrics,
    server::{ListenAddress, RuntimeServer, ServeOptions},
};
use tonic::{Request, Response, Status};

fn options(kind: RuntimeKind) -> BenchOptions {
    let mut options = BenchOptions::new(kind);
    options.concurrency = vec![1, 4];
    options.iterations = 5;
    options.config.timeouts.delete_seconds = 5;
    options
}

/// Checks what every clean report must satisfy.
fn check_report(report: &BenchReport, operations: &[&str]) {
    assert!(report.is_clean(), "{}", bench::table(report));
    assert_eq!(report.operations, operations);
    assert_eq!(report.levels.len(), 2);
    for (level, concurrency) in report.levels.iter().zip([1, 4]) {
        assert_eq!(level.concurrency, concurrency);
        assert_eq!((level.samples, level.failed_samples), (5, 0));
        assert!(level.lifecycles_per_second > 0.0);
        check_results(&level.results, operations, concurrency, 5);
        let names: Vec<&str> = level.operations.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, operations);
        for op in &level.operations {
            assert_eq!((op.count, op.errors), (5, 0), "{}", op.name);
            assert!(
                op.p50 <= op.p90 && op.p90 <= op.p99 && op.p99 <= op.max,
                "{} percentiles out of order: {op:?}",
                op.name
            );
            assert!(!op.max.is_zero() && op.ops_per_second > 0.0, "{op:?}");
        }
    }
}

fn check_results(results: &LifecycleResults, operations: &[&str], concurrency: usize, samples: usize) {
    assert_eq!(results.operations_names, operations);
    assert_eq!(results.num_parallel, concurrency);
    assert_eq!(results.datapoints.len(), samples);
    let mut indices: Vec<usize> = results.datapoints.iter().map(|d| d.sample_index).collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..samples).collect::<Vec<_>>());
    for point in &results.datapoints {
        assert_eq!(point.operations_durations_ns.len(), operations.len());
        assert!(point.operations_durations_ns.iter().all(|&ns| ns > 0));
        assert!(point.start_time > 0 && point.start_time <= point.end_time);
        // The operations ran inside the sample's time span.
        let sum: i64 = point.operations_durations_ns.iter().sum();
        assert!(sum <= point.end_time - point.start_time, "{point:?}");
        assert!(!point.meta_info["id"].is_empty());
    }
}

fn bench_selector(report: &BenchReport) -> BTreeMap<String, String> {
    BTreeMap::from([(BENCH_LABEL.to_string(), report.run_id.clone())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_bench_measures_every_operation_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("machine.sock");
    let runtime = iri_testing::MachineRuntime::default();
    let _served = iri_testing::serve_machine_unix(runtime.clone(), &path)
        .await
        .unwrap();
    let endpoint = Endpoint::Unix(path.clone());
    let report = bench::run(&endpoint, options(RuntimeKind::Machine))
        .await
        .unwrap();
    check_report(
        &report,
        &[
            "CreateMachine",
            "ListMachines(id)",
            "DeleteMachine",
            "WaitMachineGone",
            "ListMachines(all)",
            "Status",
            "Version",
        ],
    );
    // The first class the reference runtime reports, with room for 4 machines at once.
    assert_eq!(report.class, "x3-small");
    assert!(runtime.machines().is_empty());
    let channel = endpoint.connect(std::time::Duration::from_secs(5)).await.unwrap();
    let listed = clients::machine(channel)
        .list_machines(machine::ListMachinesRequest {
            filter: Some(machine::MachineFilter {
                label_selector: bench_selector(&report),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.machines.is_empty());
    let table = bench::table(&report);
    assert!(
        table.contains("concurrency 4: 5 lifecycles (0 failed)"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_bench_includes_snapshots_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volume.sock");
    let runtime = iri_testing::VolumeRuntime::default();
    let _served = iri_testing::serve_volume_unix(runtime.clone(), &path)
        .await
        .unwrap();
    let report = bench::run(&Endpoint::Unix(path), options(RuntimeKind::Volume))
        .await
        .unwrap();
    check_report(
        &report,
        &[
            "CreateVolume",
            "ListVolumes(id)",
            "CreateVolumeSnapshot",
            "DeleteVolumeSnapshot",
            "DeleteVolume",
            "Status",
        ],
    );
    assert!(report.skipped_operations.is_empty());
    assert!(runtime.volumes().is_empty() && runtime.volume_snapshots().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_bench_uses_the_configured_class() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bucket.sock");
    let runtime = iri_testing::BucketRuntime::default();
    let _served = iri_testing::serve_bucket_unix(runtime.clone(), &path)
        .await
        .unwrap();
    let mut options = options(RuntimeKind::Bucket);
    options.config.bucket.class = "slow".into();
    let report = bench::run(&Endpoint::Unix(path), options).await.unwrap();
    check_report(
        &report,
        &[
            "CreateBucket",
            "ListBuckets(id)",
            "DeleteBucket",
            "ListBucketClasses",
        ],
    );
    assert_eq!(report.class, "slow");
    assert!(
        report.levels[0]
            .results
            .datapoints
            .iter()
            .all(|d| d.meta_info["class"] == "slow")
    );
    assert!(runtime.buckets().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_class_aborts_after_the_warmup_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("machine.sock");
    let runtime = iri_testing::MachineRuntime::default();
    let _served = iri_testing::serve_machine_unix(runtime.clone(), &path)
        .await
        .unwrap();
    let mut options = options(RuntimeKind::Machine);
    options.config.machine.class = "no-such-class".into();
    let report = bench::run(&Endpoint::Unix(path), options).await.unwrap();
    assert!(!report.is_clean());
    assert!(report.levels.is_empty());
    let aborted = report.aborted.clone().unwrap();
    assert!(aborted.contains("CreateMachine"), "{aborted}");
    assert!(bench::table(&report).contains("aborted: the warm-up lifecycle failed: CreateMachine"));
    assert!(runtime.machines().is_empty());
}

/// The reference volume runtime without snapshot support.
#[derive(Clone)]
struct NoSnapshots(iri_testing::VolumeRuntime);

#[tonic::async_trait]
impl VolumeService for NoSnapshots {
    async fn version(
        &self,
        r: Request<volume::VersionRequest>,
    ) -> Result<Response<volume::VersionResponse>, Status> {
        self.0.version(r).await
    }
    async fn list_events(
        &self,
        r: Request<volume::ListEventsRequest>,
    ) -> Result<Response<volume::ListEventsResponse>, Status> {
        self.0.list_events(r).await
    }
    async fn list_volumes(
        &self,
        r: Request<volume::ListVolumesRequest>,
    ) -> Result<Response<volume::ListVolumesResponse>, Status> {
        self.0.list_volumes(r).await
    }
    async fn create_volume(
        &self,
        r: Request<volume::CreateVolumeRequest>,
    ) -> Result<Response<volume::CreateVolumeResponse>, Status> {
        self.0.create_volume(r).await
    }
    async fn expand_volume(
        &self,
        r: Request<volume::ExpandVolumeRequest>,
    ) -> Result<Response<volume::ExpandVolumeResponse>, Status> {
        self.0.expand_volume(r).await
    }
    async fn delete_volume(
        &self,
        r: Request<volume::DeleteVolumeRequest>,
    ) -> Result<Response<volume::DeleteVolumeResponse>, Status> {
        self.0.delete_volume(r).await
    }
    async fn create_volume_snapshot(
        &self,
        _: Request<volume::CreateVolumeSnapshotRequest>,
    ) -> Result<Response<volume::CreateVolumeSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported"))
    }
    async fn delete_volume_snapshot(
        &self,
        _: Request<volume::DeleteVolumeSnapshotRequest>,
    ) -> Result<Response<volume::DeleteVolumeSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported"))
    }
    async fn list_volume_snapshots(
        &self,
        _: Request<volume::ListVolumeSnapshotsRequest>,
    ) -> Result<Response<volume::ListVolumeSnapshotsResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported"))
    }
    async fn status(
        &self,
        r: Request<volume::StatusRequest>,
    ) -> Result<Response<volume::StatusResponse>, Status> {
        self.0.status(r).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unimplemented_snapshots_are_skipped_not_failed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volume.sock");
    let runtime = iri_testing::VolumeRuntime::default();
    let service = volume::volume_runtime_server::VolumeRuntimeServer::new(NoSnapshots(runtime.clone()));
    let bound = RuntimeServer::new(
        ServeOptions::new(ListenAddress::Unix(path.clone())),
        Arc::new(Metrics::new()),
    )
    .add_service(service)
    .bind()
    .await
    .unwrap();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));

    let report = bench::run(&Endpoint::Unix(path), options(RuntimeKind::Volume))
        .await
        .unwrap();
    check_report(
        &report,
        &["CreateVolume", "ListVolumes(id)", "DeleteVolume", "Status"],
    );
    let skipped: Vec<&str> = report
        .skipped_operations
        .iter()
        .map(|s| s.operation.as_str())
        .collect();
    assert_eq!(skipped, ["CreateVolumeSnapshot", "DeleteVolumeSnapshot"]);
    assert!(report.skipped_operations[0].reason.starts_with("Unimplemented"));
    assert!(runtime.volumes().is_empty());
}

/// The keys of a JSON object, sorted.
fn keys(value: &serde_json::Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// Checks a file against critest's `LifecycleBenchmarksResultsSet` schema, key by key.
fn check_critest_file(path: &Path, concurrency: u64, samples: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(keys(&value), ["datapoints", "numParallel", "operationsNames"]);
    assert_eq!(value["numParallel"], concurrency);
    let names = value["operationsNames"].as_array().unwrap();
    assert!(names.iter().all(|n| n.is_string()));
    let points = value["datapoints"].as_array().unwrap();
    assert_eq!(points.len(), samples);
    for point in points {
        assert_eq!(
            keys(point),
            [
                "endTime",
                "metaInfo",
                "operationsDurationsNs",
                "sampleIndex",
                "startTime"
            ]
        );
        assert!(point["sampleIndex"].is_u64() && point["startTime"].is_i64() && point["endTime"].is_i64());
        let durations = point["operationsDurationsNs"].as_array().unwrap();
        assert_eq!(durations.len(), names.len());
        assert!(durations.iter().all(|d| d.is_i64()));
        assert!(
            point["metaInfo"]
                .as_object()
                .unwrap()
                .values()
                .all(|v| v.is_string())
        );
    }
    // And it reads back into our typed model.
    serde_json::from_str::<LifecycleResults>(&text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_writes_critest_json_per_level_and_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volume.sock");
    let runtime = iri_testing::VolumeRuntime::default();
    let _served = iri_testing::serve_volume_unix(runtime.clone(), &path)
        .await
        .unwrap();
    let raw = dir.path().join("raw.json");
    let summary = dir.path().join("summary.json");
    let config = dir.path().join("bench.toml");
    std::fs::write(&config, "[volume]\nsize_bytes = 1048576\n").unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_iri-conformance"))
        .args(["bench", "volume", "--address"])
        .arg(format!("unix://{}", path.display()))
        .arg("--config")
        .arg(&config)
        .args(["--concurrency", "1,4", "--iterations", "5", "--json"])
        .arg(&raw)
        .arg("--summary-json")
        .arg(&summary)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // One aligned table per level.
    assert_eq!(stdout.matches("OPERATION").count(), 2, "{stdout}");
    for line in stdout.lines().filter(|l| l.starts_with("CreateVolume ")) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells.len(), 8, "{line}");
        assert_eq!(cells[1..3], ["5", "0"], "{line}");
    }
    assert!(!raw.exists(), "with two levels, each gets its own file");
    check_critest_file(&dir.path().join("raw.c1.json"), 1, 5);
    check_critest_file(&dir.path().join("raw.c4.json"), 4, 5);

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(summary["kind"], "volume");
    assert_eq!(summary["levels"].as_array().unwrap().len(), 2);
    for level in summary["levels"].as_array().unwrap() {
        for op in level["operations"].as_array().unwrap() {
            let ns = |k: &str| op[k].as_u64().unwrap();
            assert!(ns("p50Ns") <= ns("p90Ns") && ns("p90Ns") <= ns("p99Ns") && ns("p99Ns") <= ns("maxNs"));
            assert_eq!(op["count"], 5);
        }
    }
    assert!(summary["leftovers"].as_array().unwrap().is_empty());
    assert!(runtime.volumes().is_empty() && runtime.volume_snapshots().is_empty());
}
