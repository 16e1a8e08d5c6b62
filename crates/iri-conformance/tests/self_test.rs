// SPDX-License-Identifier: Apache-2.0
//! The suite tests itself: it passes against the in-memory reference runtimes, and it catches
//! deliberately broken variants of them, each by at least one named test with a clear reason.
//!
//! The broken variants wrap a reference runtime and break exactly one contract rule each, the
//! way real providers have broken them (see the upstream bugs in iri-contract.md and
//! ceph-provider.md).

use std::{
    collections::{BTreeSet, HashSet},
    path::Path,
    sync::{Arc, Mutex},
};

use iri_api::{
    Endpoint, RuntimeKind,
    bucket::v1alpha1::{self as bucket, bucket_runtime_server::BucketRuntime},
    machine::v1alpha1::{self as machine, machine_runtime_server::MachineRuntime},
    volume::v1alpha1::{self as volume, volume_runtime_server::VolumeRuntime},
};
use iri_conformance::{Config, Outcome, Profile, Report, RunOptions};
use iri_runtime::{
    metrics::Metrics,
    server::{ListenAddress, RuntimeServer, ServeOptions},
};
use tonic::{Request, Response, Status};

/// Serves any IRI service on a unix socket until the returned sender is dropped.
async fn serve<S>(service: S, path: &Path) -> tokio::sync::oneshot::Sender<()>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let bound = RuntimeServer::new(
        ServeOptions::new(ListenAddress::Unix(path.to_path_buf())),
        Arc::new(Metrics::new()),
    )
    .add_service(service)
    .bind()
    .await
    .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(bound.serve(async move {
        let _ = rx.await;
    }));
    tx
}

/// Short timeouts: the reference runtimes answer at once, and a broken variant that never
/// converges should fail fast.
fn quick_config() -> Config {
    let mut config = Config::default();
    config.timeouts.ready_seconds = 5;
    config.timeouts.delete_seconds = 3;
    config.scale.objects = 30;
    config
}

async fn run_suite(kind: RuntimeKind, path: &Path, profiles: &[Profile]) -> Report {
    let mut options = RunOptions::new(kind);
    options.profiles = profiles.iter().copied().collect::<BTreeSet<_>>();
    options.config = quick_config();
    iri_conformance::run(&Endpoint::Unix(path.to_path_buf()), options)
        .await
        .unwrap()
}

fn failures(report: &Report) -> Vec<(String, String)> {
    report
        .tests
        .iter()
        .filter_map(|t| match &t.outcome {
            Outcome::Failed(f) => Some((t.name.clone(), f.reason.clone())),
            _ => None,
        })
        .collect()
}

/// Asserts the report has failures, that every named test is among them, and prints them.
fn assert_caught(report: &Report, by: &[&str]) {
    let failed = failures(report);
    eprintln!("{}\n{}", report.verdict(), report.summary_line());
    for (name, reason) in &failed {
        eprintln!("FAIL {name}: {reason}");
    }
    assert!(!failed.is_empty(), "the broken variant passed the whole suite");
    let names: HashSet<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
    for test in by {
        assert!(
            names.contains(test),
            "{test} did not catch the broken variant; failures: {failed:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The reference runtimes pass.

#[tokio::test]
async fn reference_machine_runtime_passes_core_and_hotplug() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("machine.sock");
    let _served = iri_testing::serve_machine_unix(iri_testing::MachineRuntime::default(), &path)
        .await
        .unwrap();
    let report = run_suite(RuntimeKind::Machine, &path, &[Profile::Core, Profile::Hotplug]).await;
    assert!(failures(&report).is_empty(), "{:#?}", failures(&report));
    assert!(report.passed() > 10, "{}", report.summary_line());
    assert_eq!(report.passed_profiles(), [Profile::Core, Profile::Hotplug]);
}

#[tokio::test]
async fn reference_volume_runtime_passes_core_expand_snapshots_encryption() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volume.sock");
    let _served = iri_testing::serve_volume_unix(iri_testing::VolumeRuntime::default(), &path)
        .await
        .unwrap();
    let profiles = [
        Profile::Core,
        Profile::Snapshots,
        Profile::Encryption,
        Profile::Expand,
    ];
    let report = run_suite(RuntimeKind::Volume, &path, &profiles).await;
    assert!(failures(&report).is_empty(), "{:#?}", failures(&report));
    assert_eq!(report.passed_profiles(), profiles);
}

#[tokio::test]
async fn reference_bucket_runtime_passes_core() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bucket.sock");
    let _served = iri_testing::serve_bucket_unix(iri_testing::BucketRuntime::default(), &path)
        .await
        .unwrap();
    let report = run_suite(RuntimeKind::Bucket, &path, &[Profile::Core]).await;
    assert!(failures(&report).is_empty(), "{:#?}", failures(&report));
    assert_eq!(report.passed_profiles(), [Profile::Core]);
}

// ---------------------------------------------------------------------------------------------
// Broken variant 1: DeleteBucket of an unknown id answers InvalidArgument instead of NotFound
// (upstream bucketbroker's bug; poollets then never finish deleting).

#[derive(Clone)]
struct WrongDeleteCode(iri_testing::BucketRuntime);

#[tonic::async_trait]
impl BucketRuntime for WrongDeleteCode {
    async fn version(
        &self,
        r: Request<bucket::VersionRequest>,
    ) -> Result<Response<bucket::VersionResponse>, Status> {
        self.0.version(r).await
    }
    async fn list_events(
        &self,
        r: Request<bucket::ListEventsRequest>,
    ) -> Result<Response<bucket::ListEventsResponse>, Status> {
        self.0.list_events(r).await
    }
    async fn list_buckets(
        &self,
        r: Request<bucket::ListBucketsRequest>,
    ) -> Result<Response<bucket::ListBucketsResponse>, Status> {
        self.0.list_buckets(r).await
    }
    async fn create_bucket(
        &self,
        r: Request<bucket::CreateBucketRequest>,
    ) -> Result<Response<bucket::CreateBucketResponse>, Status> {
        self.0.create_bucket(r).await
    }
    async fn delete_bucket(
        &self,
        r: Request<bucket::DeleteBucketRequest>,
    ) -> Result<Response<bucket::DeleteBucketResponse>, Status> {
        match self.0.delete_bucket(r).await {
            Err(status) if status.code() == tonic::Code::NotFound => Err(Status::invalid_argument(format!(
                "bucket not managed: {}",
                status.message()
            ))),
            other => other,
        }
    }
    async fn list_bucket_classes(
        &self,
        r: Request<bucket::ListBucketClassesRequest>,
    ) -> Result<Response<bucket::ListBucketClassesResponse>, Status> {
        self.0.list_bucket_classes(r).await
    }
}

#[tokio::test]
async fn catches_a_wrong_error_code_on_delete_of_an_unknown_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bucket.sock");
    let service = bucket::bucket_runtime_server::BucketRuntimeServer::new(WrongDeleteCode(
        iri_testing::BucketRuntime::default(),
    ));
    let _stop = serve(service, &path).await;
    let report = run_suite(RuntimeKind::Bucket, &path, &[Profile::Core]).await;
    assert_caught(&report, WRONG_DELETE_CODE_CAUGHT_BY);
}

// ---------------------------------------------------------------------------------------------
// Broken variants 2 and 3 on the machine runtime: a label dropped on list, and a status that
// lies after a failed detach.

#[derive(Clone)]
struct BrokenMachines {
    inner: iri_testing::MachineRuntime,
    /// Drop this label key from every listed machine.
    drop_label: Option<&'static str>,
    /// Machines on which a detach failed; their listed status then pretends no volume is
    /// attached, while the spec still has them.
    lie_after_failed_detach: bool,
    failed_detach: Arc<Mutex<HashSet<String>>>,
}

impl BrokenMachines {
    fn new(drop_label: Option<&'static str>, lie_after_failed_detach: bool) -> Self {
        BrokenMachines {
            inner: iri_testing::MachineRuntime::default(),
            drop_label,
            lie_after_failed_detach,
            failed_detach: Arc::default(),
        }
    }
}

#[tonic::async_trait]
impl MachineRuntime for BrokenMachines {
    async fn version(
        &self,
        r: Request<machine::VersionRequest>,
    ) -> Result<Response<machine::VersionResponse>, Status> {
        self.inner.version(r).await
    }
    async fn list_events(
        &self,
        r: Request<machine::ListEventsRequest>,
    ) -> Result<Response<machine::ListEventsResponse>, Status> {
        self.inner.list_events(r).await
    }
    async fn list_machines(
        &self,
        r: Request<machine::ListMachinesRequest>,
    ) -> Result<Response<machine::ListMachinesResponse>, Status> {
        let mut response = self.inner.list_machines(r).await?;
        let lying = self.failed_detach.lock().unwrap().clone();
        for m in &mut response.get_mut().machines {
            if let (Some(key), Some(meta)) = (self.drop_label, m.metadata.as_mut()) {
                meta.labels.remove(key);
            }
            let id = m
                .metadata
                .as_ref()
                .map(|meta| meta.id.clone())
                .unwrap_or_default();
            if lying.contains(&id)
                && let Some(status) = m.status.as_mut()
            {
                status.volumes.clear();
            }
        }
        Ok(response)
    }
    async fn create_machine(
        &self,
        r: Request<machine::CreateMachineRequest>,
    ) -> Result<Response<machine::CreateMachineResponse>, Status> {
        self.inner.create_machine(r).await
    }
    async fn delete_machine(
        &self,
        r: Request<machine::DeleteMachineRequest>,
    ) -> Result<Response<machine::DeleteMachineResponse>, Status> {
        self.inner.delete_machine(r).await
    }
    async fn update_machine_annotations(
        &self,
        r: Request<machine::UpdateMachineAnnotationsRequest>,
    ) -> Result<Response<machine::UpdateMachineAnnotationsResponse>, Status> {
        self.inner.update_machine_annotations(r).await
    }
    async fn update_machine_power(
        &self,
        r: Request<machine::UpdateMachinePowerRequest>,
    ) -> Result<Response<machine::UpdateMachinePowerResponse>, Status> {
        self.inner.update_machine_power(r).await
    }
    async fn attach_volume(
        &self,
        r: Request<machine::AttachVolumeRequest>,
    ) -> Result<Response<machine::AttachVolumeResponse>, Status> {
        self.inner.attach_volume(r).await
    }
    async fn detach_volume(
        &self,
        r: Request<machine::DetachVolumeRequest>,
    ) -> Result<Response<machine::DetachVolumeResponse>, Status> {
        let machine_id = r.get_ref().machine_id.clone();
        let result = self.inner.detach_volume(r).await;
        if self.lie_after_failed_detach && result.is_err() {
            self.failed_detach.lock().unwrap().insert(machine_id);
        }
        result
    }
    async fn update_volume(
        &self,
        r: Request<machine::UpdateVolumeRequest>,
    ) -> Result<Response<machine::UpdateVolumeResponse>, Status> {
        self.inner.update_volume(r).await
    }
    async fn attach_network_interface(
        &self,
        r: Request<machine::AttachNetworkInterfaceRequest>,
    ) -> Result<Response<machine::AttachNetworkInterfaceResponse>, Status> {
        self.inner.attach_network_interface(r).await
    }
    async fn detach_network_interface(
        &self,
        r: Request<machine::DetachNetworkInterfaceRequest>,
    ) -> Result<Response<machine::DetachNetworkInterfaceResponse>, Status> {
        self.inner.detach_network_interface(r).await
    }
    async fn status(
        &self,
        r: Request<machine::StatusRequest>,
    ) -> Result<Response<machine::StatusResponse>, Status> {
        self.inner.status(r).await
    }
    async fn exec(
        &self,
        r: Request<machine::ExecRequest>,
    ) -> Result<Response<machine::ExecResponse>, Status> {
        self.inner.exec(r).await
    }
}

#[tokio::test]
async fn catches_a_label_dropped_on_list() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("machine.sock");
    // A label the poollet relies on to find its machine again.
    let broken = BrokenMachines::new(Some("machinepoollet.ironcore.dev/machine-uid"), false);
    let _stop = serve(
        machine::machine_runtime_server::MachineRuntimeServer::new(broken),
        &path,
    )
    .await;
    let report = run_suite(RuntimeKind::Machine, &path, &[Profile::Core]).await;
    assert_caught(&report, LABEL_DROPPED_CAUGHT_BY);
}

#[tokio::test]
async fn catches_a_status_that_lies_after_a_failed_detach() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("machine.sock");
    let broken = BrokenMachines::new(None, true);
    let _stop = serve(
        machine::machine_runtime_server::MachineRuntimeServer::new(broken),
        &path,
    )
    .await;
    let report = run_suite(RuntimeKind::Machine, &path, &[Profile::Core, Profile::Hotplug]).await;
    assert_caught(&report, LYING_STATUS_CAUGHT_BY);
}

// ---------------------------------------------------------------------------------------------
// Broken variant 4: DeleteVolume answers OK but the volume stays forever (a leak).

#[derive(Clone)]
struct LeakyVolumes(iri_testing::VolumeRuntime);

#[tonic::async_trait]
impl VolumeRuntime for LeakyVolumes {
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
        // Answers like an asynchronous delete that never finishes, and never reports NotFound.
        let id = r.into_inner().volume_id;
        let listed = self
            .0
            .list_volumes(Request::new(volume::ListVolumesRequest {
                filter: Some(volume::VolumeFilter {
                    id: id.clone(),
                    ..Default::default()
                }),
            }))
            .await?
            .into_inner()
            .volumes;
        if listed.is_empty() {
            return Err(Status::not_found(format!("volume {id} not found")));
        }
        Ok(Response::new(volume::DeleteVolumeResponse {}))
    }
    async fn create_volume_snapshot(
        &self,
        r: Request<volume::CreateVolumeSnapshotRequest>,
    ) -> Result<Response<volume::CreateVolumeSnapshotResponse>, Status> {
        self.0.create_volume_snapshot(r).await
    }
    async fn delete_volume_snapshot(
        &self,
        r: Request<volume::DeleteVolumeSnapshotRequest>,
    ) -> Result<Response<volume::DeleteVolumeSnapshotResponse>, Status> {
        self.0.delete_volume_snapshot(r).await
    }
    async fn list_volume_snapshots(
        &self,
        r: Request<volume::ListVolumeSnapshotsRequest>,
    ) -> Result<Response<volume::ListVolumeSnapshotsResponse>, Status> {
        self.0.list_volume_snapshots(r).await
    }
    async fn status(
        &self,
        r: Request<volume::StatusRequest>,
    ) -> Result<Response<volume::StatusResponse>, Status> {
        self.0.status(r).await
    }
}

#[tokio::test]
async fn catches_an_object_leaked_after_delete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volume.sock");
    let leaky = LeakyVolumes(iri_testing::VolumeRuntime::default());
    let _stop = serve(
        volume::volume_runtime_server::VolumeRuntimeServer::new(leaky),
        &path,
    )
    .await;
    let report = run_suite(RuntimeKind::Volume, &path, &[Profile::Core]).await;
    assert_caught(&report, LEAK_CAUGHT_BY);
}

// The named tests expected to catch each variant (full names: kind/category/name).
const WRONG_DELETE_CODE_CAUGHT_BY: &[&str] = &[
    "bucket/validation/invalid_requests",
    "bucket/idempotence/repeated_delete",
];
const LABEL_DROPPED_CAUGHT_BY: &[&str] = &["machine/metadata/labels_and_annotations_round_trip"];
const LYING_STATUS_CAUGHT_BY: &[&str] = &["machine/attachments/failed_detach_keeps_status"];
const LEAK_CAUGHT_BY: &[&str] = &["volume/lifecycle/lifecycle", "volume/idempotence/repeated_delete"];
