// SPDX-License-Identifier: Apache-2.0
//! Every machine test can fail: the reference runtime with one contract rule broken at a time
//! (a "mutant") must be caught by the tests named for that bug, and together the mutants make
//! every test of the catalog fail at least once. A test no mutant catches would be a test that
//! cannot fail.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::Path,
    sync::{Arc, Mutex},
};

use iri_api::{
    Endpoint, RuntimeKind,
    machine::v1alpha1::{
        self as api, ListMachinesRequest, MachineFilter, Power, VolumeState,
        machine_runtime_server::{MachineRuntime as Api, MachineRuntimeServer},
    },
};
use iri_runtime::{
    metrics::Metrics,
    server::{ListenAddress, RuntimeServer, ServeOptions},
};
use iri_testing::{MachineConfig, MachineRuntime};
use tonic::{Code, Request, Response, Status};

use super::fixtures::POOLLET_IRIMACHINE_GENERATION;
use crate::{Outcome, Profile, RunOptions};

/// One broken rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Bug {
    VersionNotSemver,
    StatusWithoutCapabilities,
    QuantityNeverChanges,
    InvalidArgumentAsUnknown,
    DeleteUnknownOk,
    ListUnknownIdNotFound,
    CreatedAtInSeconds,
    PowerOffKeepsRunning,
    DropsIriGenerationAnnotation,
    DropsEncryptionData,
    AnnotationsMerged,
    AnnotationsBumpGeneration,
    EmptySelectorValuesIgnored,
    ObservedGenerationStuck,
    DuplicateAttachOk,
    StatusLiesAfterFailedDetach,
    DetachUnknownOk,
    UpdateVolumeIgnored,
    AttachmentsNeverAttached,
    EventTimeInMillis,
    EventFilterIgnored,
    ExecUnknownOk,
    ExecRelativeUrl,
    ListCappedAtFive,
}

impl Bug {
    /// The tests that must catch this bug (names without the `machine/<category>/` prefix).
    fn caught_by(self) -> &'static [&'static str] {
        match self {
            Bug::VersionNotSemver => &["version_is_set_and_semver"],
            Bug::StatusWithoutCapabilities => &["status_reports_classes"],
            Bug::QuantityNeverChanges => &["quantity_tracks_creates_and_deletes"],
            Bug::InvalidArgumentAsUnknown => &[
                "create_rejects_malformed_machines",
                "power_rejects_unknown_value",
                "attach_rejects_malformed_requests",
            ],
            Bug::DeleteUnknownOk => &[
                "unknown_machine_is_not_found",
                "create_list_run_delete",
                "repeated_delete_ends_in_not_found",
            ],
            Bug::ListUnknownIdNotFound => &["list_unknown_id_is_empty", "create_list_run_delete"],
            Bug::CreatedAtInSeconds => &["create_list_run_delete"],
            Bug::PowerOffKeepsRunning => &["power_off_and_on"],
            Bug::DropsIriGenerationAnnotation => &[
                "labels_and_annotations_round_trip",
                "update_annotations_replaces_map",
            ],
            Bug::DropsEncryptionData => &["spec_round_trips_exactly", "update_volume_resizes"],
            Bug::AnnotationsMerged => &["update_annotations_replaces_map"],
            Bug::AnnotationsBumpGeneration => &["generation_follows_power_changes"],
            Bug::EmptySelectorValuesIgnored => &["label_selectors_match_exactly"],
            Bug::ObservedGenerationStuck => &[
                "generation_follows_power_changes",
                "generation_follows_attachments",
            ],
            Bug::DuplicateAttachOk => &["double_attach_is_already_exists"],
            Bug::StatusLiesAfterFailedDetach => &["failed_detach_keeps_status"],
            Bug::DetachUnknownOk => &[
                "unknown_machine_is_not_found",
                "detach_unknown_name_is_not_found",
                "attach_and_detach",
                "failed_detach_keeps_status",
            ],
            Bug::UpdateVolumeIgnored => &["update_volume_resizes"],
            Bug::AttachmentsNeverAttached => &["attach_and_detach", "failed_detach_keeps_status"],
            Bug::EventTimeInMillis | Bug::EventFilterIgnored => &["events_describe_machine"],
            Bug::ExecUnknownOk => &["exec_unknown_machine_is_not_found"],
            Bug::ExecRelativeUrl => &["exec_returns_url", "exec_url_accepts_websocket"],
            Bug::ListCappedAtFive => &["parallel_creates_and_deletes", "list_at_scale"],
        }
    }

    const ALL: [Bug; 24] = [
        Bug::VersionNotSemver,
        Bug::StatusWithoutCapabilities,
        Bug::QuantityNeverChanges,
        Bug::InvalidArgumentAsUnknown,
        Bug::DeleteUnknownOk,
        Bug::ListUnknownIdNotFound,
        Bug::CreatedAtInSeconds,
        Bug::PowerOffKeepsRunning,
        Bug::DropsIriGenerationAnnotation,
        Bug::DropsEncryptionData,
        Bug::AnnotationsMerged,
        Bug::AnnotationsBumpGeneration,
        Bug::EmptySelectorValuesIgnored,
        Bug::ObservedGenerationStuck,
        Bug::DuplicateAttachOk,
        Bug::StatusLiesAfterFailedDetach,
        Bug::DetachUnknownOk,
        Bug::UpdateVolumeIgnored,
        Bug::AttachmentsNeverAttached,
        Bug::EventTimeInMillis,
        Bug::EventFilterIgnored,
        Bug::ExecUnknownOk,
        Bug::ExecRelativeUrl,
        Bug::ListCappedAtFive,
    ];
}

/// The reference runtime with `bug`.
#[derive(Clone)]
struct Mutant {
    inner: MachineRuntime,
    bug: Bug,
    /// Machines on which a detach failed (for [`Bug::StatusLiesAfterFailedDetach`]).
    failed_detach: Arc<Mutex<HashSet<String>>>,
}

impl Mutant {
    fn is(&self, bug: Bug) -> bool {
        self.bug == bug
    }

    /// INVALID_ARGUMENT reported as UNKNOWN, for [`Bug::InvalidArgumentAsUnknown`].
    fn codes<T>(&self, result: Result<T, Status>) -> Result<T, Status> {
        match result {
            Err(s) if self.is(Bug::InvalidArgumentAsUnknown) && s.code() == Code::InvalidArgument => {
                Err(Status::unknown(s.message().to_string()))
            }
            other => other,
        }
    }

    /// A NOT_FOUND (or ALREADY_EXISTS) swallowed into OK when `bug` is active.
    fn swallow<T: Default>(
        &self,
        bug: Bug,
        code: Code,
        result: Result<Response<T>, Status>,
    ) -> Result<Response<T>, Status> {
        match result {
            Err(s) if self.is(bug) && s.code() == code => Ok(Response::new(T::default())),
            other => other,
        }
    }

    async fn current(&self, id: &str) -> Option<api::Machine> {
        let request = Request::new(ListMachinesRequest {
            filter: Some(MachineFilter {
                id: id.into(),
                ..Default::default()
            }),
        });
        self.inner
            .list_machines(request)
            .await
            .ok()?
            .into_inner()
            .machines
            .pop()
    }
}

fn seconds(meta: &mut Option<iri_api::meta::v1alpha1::ObjectMetadata>) {
    if let Some(meta) = meta {
        meta.created_at /= 1_000_000_000;
    }
}

#[tonic::async_trait]
impl Api for Mutant {
    async fn version(
        &self,
        r: Request<api::VersionRequest>,
    ) -> Result<Response<api::VersionResponse>, Status> {
        let mut response = self.inner.version(r).await?;
        if self.is(Bug::VersionNotSemver) {
            response.get_mut().runtime_version = "1.2".into();
        }
        Ok(response)
    }

    async fn list_events(
        &self,
        mut r: Request<api::ListEventsRequest>,
    ) -> Result<Response<api::ListEventsResponse>, Status> {
        if self.is(Bug::EventFilterIgnored) {
            r.get_mut().filter = None;
        }
        let mut response = self.inner.list_events(r).await?;
        if self.is(Bug::EventTimeInMillis) {
            for spec in response
                .get_mut()
                .events
                .iter_mut()
                .filter_map(|e| e.spec.as_mut())
            {
                spec.event_time *= 1000;
            }
        }
        Ok(response)
    }

    async fn list_machines(
        &self,
        mut r: Request<api::ListMachinesRequest>,
    ) -> Result<Response<api::ListMachinesResponse>, Status> {
        let by_id = r.get_ref().filter.as_ref().is_some_and(|f| !f.id.is_empty());
        if self.is(Bug::EmptySelectorValuesIgnored)
            && let Some(filter) = r.get_mut().filter.as_mut()
        {
            filter.label_selector.retain(|_, v| !v.is_empty());
        }
        let mut response = self.inner.list_machines(r).await?;
        let machines = &mut response.get_mut().machines;
        if self.is(Bug::ListUnknownIdNotFound) && by_id && machines.is_empty() {
            return Err(Status::not_found("no such machine"));
        }
        if self.is(Bug::ListCappedAtFive) {
            machines.truncate(5);
        }
        let lying = self
            .failed_detach
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for machine in machines.iter_mut() {
            let id = machine
                .metadata
                .as_ref()
                .map(|m| m.id.clone())
                .unwrap_or_default();
            let power = machine.spec.as_ref().map(|s| s.power).unwrap_or_default();
            if self.is(Bug::CreatedAtInSeconds) {
                seconds(&mut machine.metadata);
            }
            if self.is(Bug::DropsIriGenerationAnnotation)
                && let Some(meta) = machine.metadata.as_mut()
            {
                meta.annotations.remove(POOLLET_IRIMACHINE_GENERATION);
            }
            if self.is(Bug::DropsEncryptionData)
                && let Some(spec) = machine.spec.as_mut()
            {
                for connection in spec.volumes.iter_mut().filter_map(|v| v.connection.as_mut()) {
                    connection.encryption_data.clear();
                }
            }
            let Some(status) = machine.status.as_mut() else {
                continue;
            };
            if self.is(Bug::PowerOffKeepsRunning) && power == Power::Off as i32 {
                status.state = api::MachineState::MachineRunning as i32;
            }
            if self.is(Bug::ObservedGenerationStuck) {
                status.observed_generation = status.observed_generation.min(1);
            }
            if self.is(Bug::AttachmentsNeverAttached) {
                for volume in &mut status.volumes {
                    volume.state = VolumeState::VolumePending as i32;
                }
            }
            if lying.contains(&id) {
                status.volumes.clear();
                status.network_interfaces.clear();
            }
        }
        Ok(response)
    }

    async fn create_machine(
        &self,
        r: Request<api::CreateMachineRequest>,
    ) -> Result<Response<api::CreateMachineResponse>, Status> {
        let mut response = self.codes(self.inner.create_machine(r).await)?;
        if self.is(Bug::CreatedAtInSeconds)
            && let Some(machine) = response.get_mut().machine.as_mut()
        {
            seconds(&mut machine.metadata);
        }
        Ok(response)
    }

    async fn delete_machine(
        &self,
        r: Request<api::DeleteMachineRequest>,
    ) -> Result<Response<api::DeleteMachineResponse>, Status> {
        self.swallow(
            Bug::DeleteUnknownOk,
            Code::NotFound,
            self.inner.delete_machine(r).await,
        )
    }

    async fn update_machine_annotations(
        &self,
        mut r: Request<api::UpdateMachineAnnotationsRequest>,
    ) -> Result<Response<api::UpdateMachineAnnotationsResponse>, Status> {
        let id = r.get_ref().machine_id.clone();
        let current = self.current(&id).await;
        if self.is(Bug::AnnotationsMerged)
            && let Some(meta) = current.as_ref().and_then(|m| m.metadata.as_ref())
        {
            let mut merged: BTreeMap<String, String> = meta.annotations.clone();
            merged.extend(std::mem::take(&mut r.get_mut().annotations));
            r.get_mut().annotations = merged;
        }
        let response = self.inner.update_machine_annotations(r).await?;
        if self.is(Bug::AnnotationsBumpGeneration)
            && let Some(power) = current.as_ref().and_then(|m| m.spec.as_ref()).map(|s| s.power)
        {
            // Two power flips: the spec ends as it was, the generation does not.
            for power in [1 - power, power] {
                let request = Request::new(api::UpdateMachinePowerRequest {
                    machine_id: id.clone(),
                    power,
                });
                self.inner.update_machine_power(request).await?;
            }
        }
        Ok(response)
    }

    async fn update_machine_power(
        &self,
        r: Request<api::UpdateMachinePowerRequest>,
    ) -> Result<Response<api::UpdateMachinePowerResponse>, Status> {
        self.codes(self.inner.update_machine_power(r).await)
    }

    async fn attach_volume(
        &self,
        r: Request<api::AttachVolumeRequest>,
    ) -> Result<Response<api::AttachVolumeResponse>, Status> {
        let result = self.codes(self.inner.attach_volume(r).await);
        self.swallow(Bug::DuplicateAttachOk, Code::AlreadyExists, result)
    }

    async fn detach_volume(
        &self,
        r: Request<api::DetachVolumeRequest>,
    ) -> Result<Response<api::DetachVolumeResponse>, Status> {
        let id = r.get_ref().machine_id.clone();
        let result = self.inner.detach_volume(r).await;
        if self.is(Bug::StatusLiesAfterFailedDetach) && result.is_err() {
            self.failed_detach
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id);
        }
        self.swallow(Bug::DetachUnknownOk, Code::NotFound, result)
    }

    async fn update_volume(
        &self,
        r: Request<api::UpdateVolumeRequest>,
    ) -> Result<Response<api::UpdateVolumeResponse>, Status> {
        if self.is(Bug::UpdateVolumeIgnored) {
            return Ok(Response::new(api::UpdateVolumeResponse {}));
        }
        self.codes(self.inner.update_volume(r).await)
    }

    async fn attach_network_interface(
        &self,
        r: Request<api::AttachNetworkInterfaceRequest>,
    ) -> Result<Response<api::AttachNetworkInterfaceResponse>, Status> {
        let result = self.codes(self.inner.attach_network_interface(r).await);
        self.swallow(Bug::DuplicateAttachOk, Code::AlreadyExists, result)
    }

    async fn detach_network_interface(
        &self,
        r: Request<api::DetachNetworkInterfaceRequest>,
    ) -> Result<Response<api::DetachNetworkInterfaceResponse>, Status> {
        let id = r.get_ref().machine_id.clone();
        let result = self.inner.detach_network_interface(r).await;
        if self.is(Bug::StatusLiesAfterFailedDetach) && result.is_err() {
            self.failed_detach
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id);
        }
        self.swallow(Bug::DetachUnknownOk, Code::NotFound, result)
    }

    async fn status(&self, r: Request<api::StatusRequest>) -> Result<Response<api::StatusResponse>, Status> {
        let mut response = self.inner.status(r).await?;
        for class in &mut response.get_mut().machine_class_status {
            if self.is(Bug::StatusWithoutCapabilities)
                && let Some(class) = class.machine_class.as_mut()
            {
                class.capabilities = None;
            }
            if self.is(Bug::QuantityNeverChanges) {
                class.quantity = 10;
            }
        }
        Ok(response)
    }

    async fn exec(&self, r: Request<api::ExecRequest>) -> Result<Response<api::ExecResponse>, Status> {
        if self.is(Bug::ExecRelativeUrl) {
            return Ok(Response::new(api::ExecResponse {
                url: "/exec/token".into(),
            }));
        }
        let result = self.inner.exec(r).await;
        match result {
            Err(s) if self.is(Bug::ExecUnknownOk) && s.code() == Code::NotFound => {
                Ok(Response::new(api::ExecResponse {
                    url: "http://127.0.0.1:1/exec/token".into(),
                }))
            }
            other => other,
        }
    }
}

/// Runs the machine catalog against `mutant`; returns the short names of the failed tests.
async fn failures(mutant: Mutant, path: &Path) -> BTreeSet<String> {
    let service = MachineRuntimeServer::new(mutant);
    let bound = RuntimeServer::new(
        ServeOptions::new(ListenAddress::Unix(path.to_path_buf())),
        Arc::new(Metrics::new()),
    )
    .add_service(service)
    .bind()
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    let mut options = RunOptions::new(RuntimeKind::Machine);
    options.profiles = [Profile::Core, Profile::Hotplug, Profile::Exec, Profile::Scale].into();
    options.config.machine.image = "conformance/image".into();
    // Short: a mutant that never converges should fail fast.
    options.config.timeouts.rpc_seconds = 5;
    options.config.timeouts.ready_seconds = 2;
    options.config.timeouts.delete_seconds = 2;
    options.config.scale.objects = 8;
    let report = crate::run(&Endpoint::Unix(path.to_path_buf()), options)
        .await
        .unwrap();
    drop(stop);
    report
        .tests
        .iter()
        .filter(|t| matches!(t.outcome, Outcome::Failed(_)))
        .map(|t| t.name.rsplit('/').next().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_test_catches_a_mutant() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Bug::ALL.iter().map(|&bug| {
        let mutant = Mutant {
            inner: MachineRuntime::new(MachineConfig::default()),
            bug,
            failed_detach: Arc::default(),
        };
        let path = dir.path().join(format!("{bug:?}.sock"));
        async move { (bug, failures(mutant, &path).await) }
    });
    let results = futures::future::join_all(runs).await;

    let mut missed = Vec::new();
    let mut caught = BTreeSet::new();
    for (bug, failed) in &results {
        eprintln!("{bug:?} caught by {failed:?}");
        caught.extend(failed.iter().cloned());
        for test in bug.caught_by() {
            if !failed.contains(*test) {
                missed.push(format!("{bug:?} not caught by {test}"));
            }
        }
    }
    assert!(missed.is_empty(), "{missed:#?}");

    let never: Vec<&str> = super::cases()
        .iter()
        // Restart needs a hook; data-plane needs a real guest (machine-provider's conformance
        // test runs it against the test guest).
        .filter(|c| !matches!(c.profile, Profile::Restart | Profile::DataPlane))
        .map(|c| c.name)
        .filter(|name| !caught.contains(*name))
        .collect();
    assert!(never.is_empty(), "tests no mutant makes fail: {never:?}");
}
