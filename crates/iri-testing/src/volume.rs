// SPDX-License-Identifier: Apache-2.0
//! The in-memory reference `VolumeRuntime` (a test double, see the crate docs).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use iri_api::{
    event::v1alpha1::Event,
    volume::v1alpha1::{
        CreateVolumeRequest, CreateVolumeResponse, CreateVolumeSnapshotRequest, CreateVolumeSnapshotResponse,
        DeleteVolumeRequest, DeleteVolumeResponse, DeleteVolumeSnapshotRequest, DeleteVolumeSnapshotResponse,
        ExpandVolumeRequest, ExpandVolumeResponse, ListEventsRequest, ListEventsResponse,
        ListVolumeSnapshotsRequest, ListVolumeSnapshotsResponse, ListVolumesRequest, ListVolumesResponse,
        StatusRequest, StatusResponse, VersionRequest, VersionResponse, Volume, VolumeAccess, VolumeClass,
        VolumeClassCapabilities, VolumeClassStatus, VolumeResources, VolumeSnapshot, VolumeSnapshotState,
        VolumeSnapshotStatus, VolumeSpec, VolumeState, VolumeStatus, volume_runtime_server,
    },
};
use iri_runtime::{Error, EventFilter, ObjectFilter};
use tonic::{Request, Response, Status};

use crate::common::{
    Clock, DEFAULT_MAX_EVENTS, EventLog, after, bump_generation, list_objects, lock, new_metadata, reply,
};

/// `VersionResponse.runtime_name` of the reference volume runtime.
pub const VOLUME_RUNTIME_NAME: &str = "iri-reference-volume";

/// `status.access.driver` of every available volume. The access data is deliberately fake: no
/// machine runtime can actually connect to it.
pub const VOLUME_ACCESS_DRIVER: &str = "nbd";

/// How the reference [`VolumeRuntime`] behaves.
///
/// Build with struct update syntax: `VolumeConfig { capacity_bytes: .., ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// Supported volume classes: `(name, tps, iops)` (tps in bytes per second).
    pub classes: Vec<(String, i64, i64)>,
    /// Storage shared by all classes, in bytes. `Status` reports, per class, this minus the sum
    /// of `spec.resources.storage_bytes` of all volumes (a byte quantity, iri-contract §2.3);
    /// creates and expansions beyond it fail with RESOURCE_EXHAUSTED. Snapshots do not count.
    pub capacity_bytes: i64,
    /// How long the simulated backend takes to act: volumes are `VOLUME_PENDING` and snapshots
    /// `VOLUME_SNAPSHOT_PENDING` until then, and an expansion shows in
    /// `status.resources.storage_bytes` after it. Zero means "at the next read".
    pub ready_delay: Duration,
    /// How many events are kept (oldest dropped first).
    pub max_events: usize,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        const MI: i64 = 1024 * 1024;
        VolumeConfig {
            classes: vec![
                ("fast".to_string(), 100 * MI, 10_000),
                ("slow".to_string(), 10 * MI, 1_000),
            ],
            capacity_bytes: 1024 * 1024 * MI, // 1 TiB
            ready_delay: Duration::ZERO,
            max_events: DEFAULT_MAX_EVENTS,
        }
    }
}

/// An in-memory `volume.v1alpha1.VolumeRuntime` that behaves like a correct provider, for tests
/// of clients. **A test double**: no storage is allocated, state is lost on drop.
///
/// Cloning is cheap and clones share state.
///
/// Behaviour beyond the crate-level rules:
/// * A new volume is `VOLUME_PENDING`, then `VOLUME_AVAILABLE` with a deliberately fake
///   `status.access` (driver [`VOLUME_ACCESS_DRIVER`], handle = id, a `uri` attribute pointing
///   nowhere). `status.resources.storage_bytes` is always set and follows the spec once the
///   backend has acted.
/// * `spec` is validated: known class, `resources.storage_bytes > 0`, at most one data source
///   (with its `image`/`snapshot_id` set), non-empty `encryption.secret_data` when
///   `encryption` is present. An unknown `snapshot_id` is NOT_FOUND; a volume smaller than its
///   source snapshot is INVALID_ARGUMENT.
/// * `ExpandVolume` never shrinks (INVALID_ARGUMENT on `resources.storage_bytes`); the same
///   size is a no-op.
/// * Snapshots record the source volume's size when taken, become `VOLUME_SNAPSHOT_READY`, echo
///   their `spec`, survive deletion of their volume and can seed new volumes afterwards.
#[derive(Clone)]
pub struct VolumeRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    config: VolumeConfig,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    volumes: HashMap<String, VolumeRecord>,
    snapshots: HashMap<String, SnapshotRecord>,
    events: EventLog,
    clock: Clock,
}

#[derive(Debug)]
struct VolumeRecord {
    volume: Volume,
    /// When the simulated backend applies the current spec; `None` when it has.
    apply_at: Option<Instant>,
}

#[derive(Debug)]
struct SnapshotRecord {
    snapshot: VolumeSnapshot,
    /// The source volume's size when the snapshot was taken (the source may be gone since).
    size: i64,
    apply_at: Option<Instant>,
}

impl Default for VolumeRuntime {
    fn default() -> Self {
        VolumeRuntime::new(VolumeConfig::default())
    }
}

impl VolumeRuntime {
    /// A runtime with no volumes.
    pub fn new(config: VolumeConfig) -> Self {
        let events = EventLog::new(config.max_events);
        VolumeRuntime {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State {
                    volumes: HashMap::new(),
                    snapshots: HashMap::new(),
                    events,
                    clock: Clock::default(),
                }),
            }),
        }
    }

    /// The configuration this runtime was built with.
    pub fn config(&self) -> &VolumeConfig {
        &self.inner.config
    }

    /// All volumes as `ListVolumes` without filter would return them now.
    pub fn volumes(&self) -> Vec<Volume> {
        list_objects(self.state().volumes.values().map(|r| &r.volume), None)
    }

    /// All volume snapshots as `ListVolumeSnapshots` without filter would return them now.
    pub fn volume_snapshots(&self) -> Vec<VolumeSnapshot> {
        list_objects(self.state().snapshots.values().map(|r| &r.snapshot), None)
    }

    /// All recorded events, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.state().events.list(None)
    }

    /// The locked state, with every change whose delay has passed applied.
    fn state(&self) -> MutexGuard<'_, State> {
        let mut state = lock(&self.inner.state);
        state.reconcile();
        state
    }

    fn insert_volume(&self, req: CreateVolumeRequest) -> Result<Volume, Error> {
        let volume = req.volume.ok_or_else(|| Error::required("volume"))?;
        let spec = volume.spec.ok_or_else(|| Error::required("volume.spec"))?;
        let size = self.validate_spec(&spec)?;

        let mut state = self.state();
        // Everything about the request itself is checked before anything that depends on state.
        let metadata = new_metadata("volume", volume.metadata, &mut state.clock)?;
        if let Some(source) = spec
            .volume_data_source
            .as_ref()
            .and_then(|d| d.snapshot_data_source.as_ref())
        {
            // A dangling reference is a state problem, not a malformed request: NOT_FOUND,
            // like every other unknown id (see the crate docs).
            let snapshot = state.snapshots.get(&source.snapshot_id).ok_or_else(|| {
                Error::not_found(
                    "volume snapshot (volume.spec.volume_data_source.snapshot_data_source.snapshot_id)",
                    &source.snapshot_id,
                )
            })?;
            if size < snapshot.size {
                return Err(Error::invalid(
                    "volume.spec.resources.storage_bytes",
                    format!(
                        "{size} bytes is smaller than snapshot {:?} ({} bytes)",
                        source.snapshot_id, snapshot.size
                    ),
                ));
            }
        }
        state.reserve(self.inner.config.capacity_bytes, 0, size)?;
        let volume = Volume {
            metadata: Some(metadata.clone()),
            status: Some(VolumeStatus {
                state: VolumeState::VolumePending as i32,
                access: None,
                // Always present (iri-contract §2.3): the status size, else the spec size.
                resources: Some(VolumeResources { storage_bytes: size }),
            }),
            spec: Some(spec),
        };
        state.events.record(
            &metadata,
            "Created",
            "Create",
            format!("Created volume of {size} bytes"),
        );
        state.volumes.insert(
            metadata.id,
            VolumeRecord {
                volume: volume.clone(),
                apply_at: Some(after(self.inner.config.ready_delay)),
            },
        );
        Ok(volume)
    }

    /// Checks what can be checked without state; returns the requested size.
    fn validate_spec(&self, spec: &VolumeSpec) -> Result<i64, Error> {
        if spec.class.is_empty() {
            return Err(Error::required("volume.spec.class"));
        }
        if !self.inner.config.classes.iter().any(|c| c.0 == spec.class) {
            let known: Vec<&str> = self.inner.config.classes.iter().map(|c| c.0.as_str()).collect();
            return Err(Error::invalid(
                "volume.spec.class",
                format!(
                    "unknown volume class {:?} (known: {})",
                    spec.class,
                    known.join(", ")
                ),
            ));
        }
        let resources = spec
            .resources
            .as_ref()
            .ok_or_else(|| Error::required("volume.spec.resources"))?;
        if resources.storage_bytes <= 0 {
            return Err(Error::invalid(
                "volume.spec.resources.storage_bytes",
                format!("must be > 0, got {}", resources.storage_bytes),
            ));
        }
        if let Some(encryption) = &spec.encryption
            && encryption.secret_data.is_empty()
        {
            // An encryption section without a key cannot be honoured; silently creating an
            // unencrypted volume would be worse than refusing.
            return Err(Error::required("volume.spec.encryption.secret_data"));
        }
        if let Some(source) = &spec.volume_data_source {
            match (&source.image_data_source, &source.snapshot_data_source) {
                (Some(_), Some(_)) => {
                    return Err(Error::invalid(
                        "volume.spec.volume_data_source",
                        "at most one of image_data_source and snapshot_data_source may be set",
                    ));
                }
                (Some(image), None) if image.image.is_empty() => {
                    return Err(Error::required(
                        "volume.spec.volume_data_source.image_data_source.image",
                    ));
                }
                (None, Some(snapshot)) if snapshot.snapshot_id.is_empty() => {
                    return Err(Error::required(
                        "volume.spec.volume_data_source.snapshot_data_source.snapshot_id",
                    ));
                }
                _ => {}
            }
        }
        Ok(resources.storage_bytes)
    }

    fn grow_volume(&self, req: ExpandVolumeRequest) -> Result<(), Error> {
        let resources = req.resources.ok_or_else(|| Error::required("resources"))?;
        let size = resources.storage_bytes;
        if size <= 0 {
            return Err(Error::invalid(
                "resources.storage_bytes",
                format!("must be > 0, got {size}"),
            ));
        }
        let capacity = self.inner.config.capacity_bytes;
        let delay = self.inner.config.ready_delay;
        let mut state = self.state();
        let current = state
            .volumes
            .get(&req.volume_id)
            .ok_or_else(|| Error::not_found("volume", &req.volume_id))?
            .size();
        if size < current {
            return Err(Error::invalid(
                "resources.storage_bytes",
                format!(
                    "volume_id {:?} cannot shrink from {current} to {size} bytes",
                    req.volume_id
                ),
            ));
        }
        if size == current {
            return Ok(());
        }
        state.reserve(capacity, current, size)?;
        let State { volumes, events, .. } = &mut *state;
        let Some(record) = volumes.get_mut(&req.volume_id) else {
            return Err(Error::not_found("volume", &req.volume_id));
        };
        let volume = &mut record.volume;
        volume
            .spec
            .get_or_insert_with(Default::default)
            .resources
            .get_or_insert_with(Default::default)
            .storage_bytes = size;
        bump_generation(&mut volume.metadata);
        record.apply_at = Some(after(delay));
        events.record(
            volume.metadata.as_ref().unwrap_or(&Default::default()),
            "Expanded",
            "Expand",
            format!("Expanding volume from {current} to {size} bytes"),
        );
        Ok(())
    }

    fn remove_volume(&self, id: &str) -> Result<(), Error> {
        let mut state = self.state();
        let record = state
            .volumes
            .remove(id)
            .ok_or_else(|| Error::not_found("volume", id))?;
        // Snapshots of the volume stay: they are independent objects (and can seed new volumes).
        state
            .events
            .record_deleted(record.volume.metadata, "Deleted volume");
        Ok(())
    }

    fn insert_snapshot(&self, req: CreateVolumeSnapshotRequest) -> Result<VolumeSnapshot, Error> {
        let snapshot = req
            .volume_snapshot
            .ok_or_else(|| Error::required("volume_snapshot"))?;
        let spec = snapshot
            .spec
            .ok_or_else(|| Error::required("volume_snapshot.spec"))?;
        if spec.volume_id.is_empty() {
            return Err(Error::required("volume_snapshot.spec.volume_id"));
        }
        let mut state = self.state();
        let metadata = new_metadata("volume_snapshot", snapshot.metadata, &mut state.clock)?;
        let size = state
            .volumes
            .get(&spec.volume_id)
            .ok_or_else(|| Error::not_found("volume (volume_snapshot.spec.volume_id)", &spec.volume_id))?
            .size();
        let message = format!("Created snapshot of volume {:?}", spec.volume_id);
        let snapshot = VolumeSnapshot {
            metadata: Some(metadata.clone()),
            // Echoed back, unlike upstream's volumebroker (iri-contract §2.3).
            spec: Some(spec),
            status: Some(VolumeSnapshotStatus {
                state: VolumeSnapshotState::VolumeSnapshotPending as i32,
                size: 0,
            }),
        };
        state.events.record(&metadata, "Created", "Create", message);
        state.snapshots.insert(
            metadata.id,
            SnapshotRecord {
                snapshot: snapshot.clone(),
                size,
                apply_at: Some(after(self.inner.config.ready_delay)),
            },
        );
        Ok(snapshot)
    }

    fn remove_snapshot(&self, id: &str) -> Result<(), Error> {
        let mut state = self.state();
        let record = state
            .snapshots
            .remove(id)
            .ok_or_else(|| Error::not_found("volume snapshot", id))?;
        state
            .events
            .record_deleted(record.snapshot.metadata, "Deleted volume snapshot");
        Ok(())
    }

    fn class_status(&self) -> Vec<VolumeClassStatus> {
        let config = &self.inner.config;
        let free = config.capacity_bytes.saturating_sub(self.state().used()).max(0);
        config
            .classes
            .iter()
            .map(|(name, tps, iops)| VolumeClassStatus {
                volume_class: Some(VolumeClass {
                    name: name.clone(),
                    capabilities: Some(VolumeClassCapabilities {
                        tps: *tps,
                        iops: *iops,
                    }),
                }),
                quantity: free,
            })
            .collect()
    }
}

impl VolumeRecord {
    /// The requested size (what capacity accounting and shrink checks go by).
    fn size(&self) -> i64 {
        spec_size(&self.volume)
    }
}

fn spec_size(volume: &Volume) -> i64 {
    volume
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .map(|r| r.storage_bytes)
        .unwrap_or(0)
}

impl State {
    /// Bytes reserved by all volumes.
    fn used(&self) -> i64 {
        self.volumes
            .values()
            .fold(0i64, |sum, r| sum.saturating_add(r.size().max(0)))
    }

    /// Fails unless growing a volume from `from` to `to` bytes fits into `capacity`.
    fn reserve(&self, capacity: i64, from: i64, to: i64) -> Result<(), Error> {
        let free = capacity.saturating_sub(self.used());
        let needed = to.saturating_sub(from);
        if needed > free {
            return Err(Error::ResourceExhausted(format!(
                "not enough storage: {needed} more bytes requested, {} of {capacity} free",
                free.max(0)
            )));
        }
        Ok(())
    }

    /// Lets the simulated backend act on every object whose change is due.
    fn reconcile(&mut self) {
        let now = Instant::now();
        let due = |at: &Option<Instant>| at.is_some_and(|at| at <= now);
        for record in self.volumes.values_mut() {
            if !due(&record.apply_at) {
                continue;
            }
            record.apply_at = None;
            let volume = &mut record.volume;
            let metadata = volume.metadata.clone().unwrap_or_default();
            let size = spec_size(volume);
            let status = volume.status.get_or_insert_with(Default::default);
            status.resources = Some(VolumeResources { storage_bytes: size });
            status.access = Some(VolumeAccess {
                driver: VOLUME_ACCESS_DRIVER.to_string(),
                handle: metadata.id.clone(),
                attributes: BTreeMap::from([(
                    "uri".to_string(),
                    // Points at nothing on purpose: this is a test double.
                    format!("nbd+unix:///{}?socket=/dev/null", metadata.id),
                )]),
                secret_data: BTreeMap::new(),
            });
            if status.state != VolumeState::VolumeAvailable as i32 {
                status.state = VolumeState::VolumeAvailable as i32;
                self.events
                    .record_state_change(&metadata, "Volume is VOLUME_AVAILABLE".into());
            }
        }
        for record in self.snapshots.values_mut() {
            if !due(&record.apply_at) {
                continue;
            }
            record.apply_at = None;
            let snapshot = &mut record.snapshot;
            snapshot.status = Some(VolumeSnapshotStatus {
                state: VolumeSnapshotState::VolumeSnapshotReady as i32,
                size: record.size,
            });
            self.events.record_state_change(
                snapshot.metadata.as_ref().unwrap_or(&Default::default()),
                "Volume snapshot is VOLUME_SNAPSHOT_READY".into(),
            );
        }
    }
}

#[tonic::async_trait]
impl volume_runtime_server::VolumeRuntime for VolumeRuntime {
    async fn version(&self, _: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            runtime_name: VOLUME_RUNTIME_NAME.to_string(),
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let filter = request.into_inner().filter.map(EventFilter::from);
        let events = self.state().events.list(filter);
        Ok(Response::new(ListEventsResponse { events }))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let filter = request.into_inner().filter.map(ObjectFilter::from);
        let volumes = list_objects(self.state().volumes.values().map(|r| &r.volume), filter);
        Ok(Response::new(ListVolumesResponse { volumes }))
    }

    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        reply(self.insert_volume(request.into_inner()), |volume| {
            CreateVolumeResponse { volume: Some(volume) }
        })
    }

    async fn expand_volume(
        &self,
        request: Request<ExpandVolumeRequest>,
    ) -> Result<Response<ExpandVolumeResponse>, Status> {
        reply(self.grow_volume(request.into_inner()), |()| {
            ExpandVolumeResponse {}
        })
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        reply(self.remove_volume(&request.into_inner().volume_id), |()| {
            DeleteVolumeResponse {}
        })
    }

    async fn create_volume_snapshot(
        &self,
        request: Request<CreateVolumeSnapshotRequest>,
    ) -> Result<Response<CreateVolumeSnapshotResponse>, Status> {
        reply(self.insert_snapshot(request.into_inner()), |snapshot| {
            CreateVolumeSnapshotResponse {
                volume_snapshot: Some(snapshot),
            }
        })
    }

    async fn delete_volume_snapshot(
        &self,
        request: Request<DeleteVolumeSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeSnapshotResponse>, Status> {
        reply(
            self.remove_snapshot(&request.into_inner().volume_snapshot_id),
            |()| DeleteVolumeSnapshotResponse {},
        )
    }

    async fn list_volume_snapshots(
        &self,
        request: Request<ListVolumeSnapshotsRequest>,
    ) -> Result<Response<ListVolumeSnapshotsResponse>, Status> {
        let filter = request.into_inner().filter.map(ObjectFilter::from);
        let volume_snapshots = list_objects(self.state().snapshots.values().map(|r| &r.snapshot), filter);
        Ok(Response::new(ListVolumeSnapshotsResponse { volume_snapshots }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            volume_class_status: self.class_status(),
        }))
    }
}
