// SPDX-License-Identifier: Apache-2.0
//! Self-tests of the volume and bucket catalogs.
//!
//! The in-memory reference runtimes (`iri-testing`) must pass every profile they implement;
//! and each "mutant" (a reference runtime with one known upstream bug put back in) must fail
//! the test written to catch that bug, which shows the test can fail at all.

use std::{collections::BTreeSet, path::Path, sync::Arc};

use iri_api::{
    Endpoint, RuntimeKind,
    bucket::v1alpha1::{
        self as bucket, bucket_runtime_server::BucketRuntime as BucketService,
        bucket_runtime_server::BucketRuntimeServer,
    },
    volume::v1alpha1::{
        self as volume, volume_runtime_server::VolumeRuntime as VolumeService,
        volume_runtime_server::VolumeRuntimeServer,
    },
};
use iri_runtime::{
    metrics::Metrics,
    server::{ListenAddress, RuntimeServer, ServeOptions},
};
use tonic::{Code, Request, Response, Status};

use crate::{Config, Outcome, Profile, Report, RunOptions};

/// A config for fast in-memory runtimes: short timeouts, 50 objects at scale, and a restart
/// hook that does nothing (an in-memory runtime cannot survive a real restart; a no-op restart
/// still exercises the hook and the before/after comparison).
fn config() -> Config {
    let mut config = Config::default();
    config.timeouts.rpc_seconds = 10;
    config.timeouts.ready_seconds = 10;
    config.timeouts.delete_seconds = 10;
    config.scale.objects = 50;
    config.hooks.restart = "true".to_string();
    // The reference runtime takes any image reference.
    config.volume.image = "registry.example/os-images/test:1".to_string();
    config
}

async fn run(kind: RuntimeKind, socket: &Path, profiles: &[Profile], focus: Option<&str>) -> Report {
    let mut config = config();
    if focus.is_some() {
        // Mutant runs: a test waiting for something that never happens should give up soon.
        config.timeouts.ready_seconds = 2;
        config.timeouts.delete_seconds = 2;
    }
    let options = RunOptions {
        profiles: profiles.iter().copied().collect(),
        focus: focus.map(|f| regex::Regex::new(f).expect("valid focus regex")),
        config,
        ..RunOptions::new(kind)
    };
    crate::run(&Endpoint::Unix(socket.to_path_buf()), options)
        .await
        .expect("runtime reachable")
}

/// Every test of `profiles` passed (none skipped, none failed); prints the failures otherwise.
fn assert_all_passed(report: &Report, profiles: &[Profile]) {
    let mut problems = Vec::new();
    for test in report.tests.iter().filter(|t| profiles.contains(&t.profile)) {
        match &test.outcome {
            Outcome::Passed => {}
            Outcome::Failed(failure) => problems.push(format!(
                "FAILED {}: {}\n    {:#?}",
                test.name, failure.reason, failure.exchange
            )),
            Outcome::Skipped { reason } => problems.push(format!("SKIPPED {}: {reason}", test.name)),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for profile in profiles {
        assert!(
            report.passed_profiles().contains(profile),
            "profile {profile} not passed: {}",
            report.verdict()
        );
    }
}

/// The tests named `names` ran and failed.
fn assert_failed(report: &Report, names: &[&str]) {
    for name in names {
        let test = report
            .tests
            .iter()
            .find(|t| t.name.ends_with(&format!("/{name}")))
            .unwrap_or_else(|| panic!("no test {name}"));
        assert!(
            matches!(test.outcome, Outcome::Failed(_)),
            "{} should have failed against the mutant, but: {:?}",
            test.name,
            test.outcome
        );
    }
}

fn failure_reason(report: &Report, name: &str) -> String {
    report
        .tests
        .iter()
        .find(|t| t.name.ends_with(&format!("/{name}")))
        .and_then(|t| match &t.outcome {
            Outcome::Failed(f) => Some(f.reason.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

const VOLUME_PROFILES: [Profile; 6] = [
    Profile::Core,
    Profile::Expand,
    Profile::Snapshots,
    Profile::Encryption,
    Profile::Restart,
    Profile::Scale,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reference_volume_runtime_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("volume.sock");
    let served = iri_testing::serve_volume_unix(iri_testing::VolumeRuntime::default(), &socket)
        .await
        .expect("serve");
    let report = run(RuntimeKind::Volume, &socket, &VOLUME_PROFILES, None).await;
    served.shutdown().await;
    assert!(
        report.tests.len() >= 20,
        "only {} volume tests",
        report.tests.len()
    );
    assert_all_passed(&report, &VOLUME_PROFILES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reference_volume_runtime_with_delays_passes() {
    // Real runtimes converge asynchronously: PENDING first, AVAILABLE/READY later.
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("volume.sock");
    let runtime = iri_testing::VolumeRuntime::new(iri_testing::VolumeConfig {
        ready_delay: std::time::Duration::from_millis(300),
        ..Default::default()
    });
    let served = iri_testing::serve_volume_unix(runtime, &socket)
        .await
        .expect("serve");
    let profiles = [
        Profile::Core,
        Profile::Expand,
        Profile::Snapshots,
        Profile::Encryption,
    ];
    let report = run(RuntimeKind::Volume, &socket, &profiles, None).await;
    served.shutdown().await;
    assert_all_passed(&report, &profiles);
}

const BUCKET_PROFILES: [Profile; 3] = [Profile::Core, Profile::Restart, Profile::Scale];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reference_bucket_runtime_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("bucket.sock");
    let served = iri_testing::serve_bucket_unix(iri_testing::BucketRuntime::default(), &socket)
        .await
        .expect("serve");
    let report = run(RuntimeKind::Bucket, &socket, &BUCKET_PROFILES, None).await;
    served.shutdown().await;
    assert!(
        report.tests.len() >= 10,
        "only {} bucket tests",
        report.tests.len()
    );
    assert_all_passed(&report, &BUCKET_PROFILES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reference_bucket_runtime_with_delays_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("bucket.sock");
    let runtime = iri_testing::BucketRuntime::new(iri_testing::BucketConfig {
        ready_delay: std::time::Duration::from_millis(300),
        ..Default::default()
    });
    let served = iri_testing::serve_bucket_unix(runtime, &socket)
        .await
        .expect("serve");
    let report = run(RuntimeKind::Bucket, &socket, &[Profile::Core], None).await;
    served.shutdown().await;
    assert_all_passed(&report, &[Profile::Core]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_fails_when_the_hook_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("volume.sock");
    let served = iri_testing::serve_volume_unix(iri_testing::VolumeRuntime::default(), &socket)
        .await
        .expect("serve");
    let mut options = RunOptions {
        profiles: BTreeSet::from([Profile::Restart]),
        config: config(),
        ..RunOptions::new(RuntimeKind::Volume)
    };
    options.config.hooks.restart = "echo cannot restart >&2; exit 3".to_string();
    let failing = crate::run(&Endpoint::Unix(socket.clone()), options.clone())
        .await
        .expect("reachable");
    assert_failed(&failing, &["restart"]);
    assert!(
        failure_reason(&failing, "restart").contains("cannot restart"),
        "{}",
        failure_reason(&failing, "restart")
    );
    options.config.hooks.restart = String::new();
    let skipped = crate::run(&Endpoint::Unix(socket), options)
        .await
        .expect("reachable");
    served.shutdown().await;
    let test = skipped
        .tests
        .iter()
        .find(|t| t.name.ends_with("/restart"))
        .expect("restart test");
    assert!(
        matches!(test.outcome, Outcome::Skipped { .. }),
        "{:?}",
        test.outcome
    );
}

// ---------------------------------------------------------------------------------------------
// Mutants
// ---------------------------------------------------------------------------------------------

/// Serves the `RuntimeServer` on `socket` until the returned sender is dropped.
async fn serve(server: RuntimeServer) -> tokio::sync::oneshot::Sender<()> {
    let bound = server.bind().await.expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    stop
}

fn server(socket: &Path) -> RuntimeServer {
    RuntimeServer::new(
        ServeOptions::new(ListenAddress::Unix(socket.to_path_buf())),
        Arc::new(Metrics::new()),
    )
}

/// A known upstream volume-runtime bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VolumeBug {
    /// ceph-provider: DeleteVolume of an unknown id is Internal.
    DeleteUnknownIsInternal,
    /// volumebroker: CreateVolumeSnapshot returns no spec.
    SnapshotSpecDropped,
    /// Everyone upstream: shrinking is accepted (here: silently ignored).
    ShrinkAccepted,
    /// The upstream fakes: ListEvents ignores the filter.
    EventFilterIgnored,
    /// ceph-provider: Status reports the pool's total size, which never moves.
    ConstantQuantity,
    /// Annotations lost on the way through storage.
    AnnotationsDropped,
    /// Event times in nanoseconds.
    EventTimeInNanos,
}

#[derive(Clone)]
struct VolumeMutant {
    inner: iri_testing::VolumeRuntime,
    bug: VolumeBug,
}

#[tonic::async_trait]
impl VolumeService for VolumeMutant {
    async fn version(
        &self,
        request: Request<volume::VersionRequest>,
    ) -> Result<Response<volume::VersionResponse>, Status> {
        self.inner.version(request).await
    }

    async fn list_events(
        &self,
        request: Request<volume::ListEventsRequest>,
    ) -> Result<Response<volume::ListEventsResponse>, Status> {
        let request = match self.bug {
            VolumeBug::EventFilterIgnored => Request::new(volume::ListEventsRequest { filter: None }),
            _ => request,
        };
        let mut response = self.inner.list_events(request).await?;
        if self.bug == VolumeBug::EventTimeInNanos {
            for spec in response
                .get_mut()
                .events
                .iter_mut()
                .filter_map(|e| e.spec.as_mut())
            {
                spec.event_time *= 1_000_000_000;
            }
        }
        Ok(response)
    }

    async fn list_volumes(
        &self,
        request: Request<volume::ListVolumesRequest>,
    ) -> Result<Response<volume::ListVolumesResponse>, Status> {
        let mut response = self.inner.list_volumes(request).await?;
        if self.bug == VolumeBug::AnnotationsDropped {
            for metadata in response
                .get_mut()
                .volumes
                .iter_mut()
                .filter_map(|v| v.metadata.as_mut())
            {
                metadata.annotations.clear();
            }
        }
        Ok(response)
    }

    async fn create_volume(
        &self,
        request: Request<volume::CreateVolumeRequest>,
    ) -> Result<Response<volume::CreateVolumeResponse>, Status> {
        self.inner.create_volume(request).await
    }

    async fn expand_volume(
        &self,
        request: Request<volume::ExpandVolumeRequest>,
    ) -> Result<Response<volume::ExpandVolumeResponse>, Status> {
        match self.inner.expand_volume(request).await {
            Err(status)
                if self.bug == VolumeBug::ShrinkAccepted && status.code() == Code::InvalidArgument =>
            {
                Ok(Response::new(volume::ExpandVolumeResponse {}))
            }
            other => other,
        }
    }

    async fn delete_volume(
        &self,
        request: Request<volume::DeleteVolumeRequest>,
    ) -> Result<Response<volume::DeleteVolumeResponse>, Status> {
        match self.inner.delete_volume(request).await {
            Err(status)
                if self.bug == VolumeBug::DeleteUnknownIsInternal && status.code() == Code::NotFound =>
            {
                Err(Status::internal(format!("{}: not found", status.message())))
            }
            other => other,
        }
    }

    async fn create_volume_snapshot(
        &self,
        request: Request<volume::CreateVolumeSnapshotRequest>,
    ) -> Result<Response<volume::CreateVolumeSnapshotResponse>, Status> {
        let mut response = self.inner.create_volume_snapshot(request).await?;
        if self.bug == VolumeBug::SnapshotSpecDropped
            && let Some(snapshot) = response.get_mut().volume_snapshot.as_mut()
        {
            snapshot.spec = None;
        }
        Ok(response)
    }

    async fn delete_volume_snapshot(
        &self,
        request: Request<volume::DeleteVolumeSnapshotRequest>,
    ) -> Result<Response<volume::DeleteVolumeSnapshotResponse>, Status> {
        self.inner.delete_volume_snapshot(request).await
    }

    async fn list_volume_snapshots(
        &self,
        request: Request<volume::ListVolumeSnapshotsRequest>,
    ) -> Result<Response<volume::ListVolumeSnapshotsResponse>, Status> {
        self.inner.list_volume_snapshots(request).await
    }

    async fn status(
        &self,
        request: Request<volume::StatusRequest>,
    ) -> Result<Response<volume::StatusResponse>, Status> {
        let mut response = self.inner.status(request).await?;
        if self.bug == VolumeBug::ConstantQuantity {
            let total = self.inner.config().capacity_bytes;
            for class in &mut response.get_mut().volume_class_status {
                class.quantity = total;
            }
        }
        Ok(response)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volume_mutants_fail_their_tests() {
    let cases: [(VolumeBug, &[&str]); 7] = [
        (
            VolumeBug::DeleteUnknownIsInternal,
            &["invalid_requests", "lifecycle", "repeated_delete"],
        ),
        (VolumeBug::SnapshotSpecDropped, &["snapshot_lifecycle"]),
        (VolumeBug::ShrinkAccepted, &["expand_rejects_shrink"]),
        (VolumeBug::EventFilterIgnored, &["events"]),
        (VolumeBug::ConstantQuantity, &["quantity_follows_volumes"]),
        (VolumeBug::AnnotationsDropped, &["metadata_round_trip"]),
        (VolumeBug::EventTimeInNanos, &["events"]),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (bug, tests)) in cases.into_iter().enumerate() {
        let socket = dir.path().join(format!("volume-{i}.sock"));
        let mutant = VolumeMutant {
            inner: iri_testing::VolumeRuntime::default(),
            bug,
        };
        let _stop = serve(server(&socket).add_service(VolumeRuntimeServer::new(mutant))).await;
        let focus = format!("/({})$", tests.join("|"));
        let report = run(
            RuntimeKind::Volume,
            &socket,
            &[Profile::Core, Profile::Expand, Profile::Snapshots],
            Some(&focus),
        )
        .await;
        assert_failed(&report, tests);
        eprintln!("{bug:?}: {}", failure_reason(&report, tests[0]));
    }
}

/// A known upstream bucket-runtime bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BucketBug {
    /// ceph-provider: DeleteBucket of an unknown id is InvalidArgument.
    DeleteUnknownIsInvalid,
    /// ceph-provider: the endpoint is `<bucket>.<rgw host>` without a scheme.
    EndpointWithoutScheme,
    /// One access key for every bucket.
    SharedAccessKey,
    /// ceph-provider: ListEvents always returns nothing.
    NoEvents,
    /// The broker-style selector divergence: labels are not matched against IRI labels.
    SelectorIgnored,
}

#[derive(Clone)]
struct BucketMutant {
    inner: iri_testing::BucketRuntime,
    bug: BucketBug,
}

impl BucketMutant {
    fn mutate(&self, bucket: &mut bucket::Bucket) {
        let Some(access) = bucket.status.as_mut().and_then(|s| s.access.as_mut()) else {
            return;
        };
        match self.bug {
            BucketBug::EndpointWithoutScheme => {
                access.endpoint = format!(
                    "{}.rgw.example.com",
                    bucket.metadata.as_ref().map(|m| m.id.as_str()).unwrap_or("")
                );
            }
            BucketBug::SharedAccessKey => {
                access.secret_data.insert(
                    super::super::bucket::ACCESS_KEY_ID.to_string(),
                    b"SHARED".to_vec(),
                );
            }
            _ => {}
        }
    }
}

#[tonic::async_trait]
impl BucketService for BucketMutant {
    async fn version(
        &self,
        request: Request<bucket::VersionRequest>,
    ) -> Result<Response<bucket::VersionResponse>, Status> {
        self.inner.version(request).await
    }

    async fn list_events(
        &self,
        request: Request<bucket::ListEventsRequest>,
    ) -> Result<Response<bucket::ListEventsResponse>, Status> {
        if self.bug == BucketBug::NoEvents {
            return Ok(Response::new(bucket::ListEventsResponse { events: Vec::new() }));
        }
        self.inner.list_events(request).await
    }

    async fn list_buckets(
        &self,
        mut request: Request<bucket::ListBucketsRequest>,
    ) -> Result<Response<bucket::ListBucketsResponse>, Status> {
        if self.bug == BucketBug::SelectorIgnored
            && let Some(filter) = request.get_mut().filter.as_mut()
        {
            filter.label_selector.clear();
        }
        let mut response = self.inner.list_buckets(request).await?;
        for bucket in &mut response.get_mut().buckets {
            self.mutate(bucket);
        }
        Ok(response)
    }

    async fn create_bucket(
        &self,
        request: Request<bucket::CreateBucketRequest>,
    ) -> Result<Response<bucket::CreateBucketResponse>, Status> {
        self.inner.create_bucket(request).await
    }

    async fn delete_bucket(
        &self,
        request: Request<bucket::DeleteBucketRequest>,
    ) -> Result<Response<bucket::DeleteBucketResponse>, Status> {
        match self.inner.delete_bucket(request).await {
            Err(status)
                if self.bug == BucketBug::DeleteUnknownIsInvalid && status.code() == Code::NotFound =>
            {
                Err(Status::invalid_argument("bucket isn't managed"))
            }
            other => other,
        }
    }

    async fn list_bucket_classes(
        &self,
        request: Request<bucket::ListBucketClassesRequest>,
    ) -> Result<Response<bucket::ListBucketClassesResponse>, Status> {
        self.inner.list_bucket_classes(request).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bucket_mutants_fail_their_tests() {
    let cases: [(BucketBug, &[&str]); 5] = [
        (
            BucketBug::DeleteUnknownIsInvalid,
            &["invalid_requests", "lifecycle"],
        ),
        (BucketBug::EndpointWithoutScheme, &["lifecycle"]),
        (BucketBug::SharedAccessKey, &["credentials_are_per_bucket"]),
        (BucketBug::NoEvents, &["events"]),
        (BucketBug::SelectorIgnored, &["label_selector"]),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (bug, tests)) in cases.into_iter().enumerate() {
        let socket = dir.path().join(format!("bucket-{i}.sock"));
        let mutant = BucketMutant {
            inner: iri_testing::BucketRuntime::default(),
            bug,
        };
        let _stop = serve(server(&socket).add_service(BucketRuntimeServer::new(mutant))).await;
        let focus = format!("/({})$", tests.join("|"));
        let report = run(RuntimeKind::Bucket, &socket, &[Profile::Core], Some(&focus)).await;
        assert_failed(&report, tests);
        eprintln!("{bug:?}: {}", failure_reason(&report, tests[0]));
    }
}
