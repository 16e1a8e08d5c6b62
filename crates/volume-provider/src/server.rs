// SPDX-License-Identifier: Apache-2.0
//! The gRPC adapter: `volume.v1alpha1.VolumeRuntime`.
//!
//! Every handler validates the request (InvalidArgument naming the field, NotFound for unknown
//! ids, also when the id is a reference inside a create request), turns it into one store
//! write, and returns. Nothing here waits for the backend: the store's change feed wakes the
//! reconciler, which does the work and writes the status. Lists are served from the store's
//! in-memory cache. Errors become gRPC codes in exactly one place, `iri_runtime::Error`.
//!
//! Validation mirrors the reference runtime (`iri-testing`), which the conformance suite
//! holds every runtime to. Differences, all deliberate:
//! * image references must be ones the backend can fetch (`file://` inside `local.image_dirs`,
//!   `http(s)://`, OCI references); others are InvalidArgument rather than a volume that fails
//!   later;
//! * an encrypted volume's passphrase (`spec.encryption.secret_data["encryptionKey"]`, required)
//!   is stored wrapped with the provider's key-encryption key and never returned: the spec
//!   comes back with `encryption` present and its `secret_data` empty, as upstream omits it;
//! * a snapshot that is FAILED or being deleted cannot seed a volume (FailedPrecondition); nor
//!   can a volume that is being deleted or in VOLUME_ERROR be snapshotted or expanded;
//! * deletes are two-phase: OK while the backend releases the volume, NotFound once it is gone.
//!
//! # Capacity
//!
//! `Status` reports per class (all classes share the data directory) the bytes that new
//! volumes can still be promised, and creates, expansions and snapshots beyond that fail with
//! RESOURCE_EXHAUSTED. Volumes are thin (sparse qcow2), so free space alone would not move when
//! a volume is created and would over-promise once volumes fill up. The provider therefore
//! accounts thick: `quantity = free space of the data directory's filesystem + what the data
//! directory itself occupies − reserve_bytes − what every volume and snapshot may come to
//! occupy` (a volume its size, a snapshot the size of what it froze). Written data moves bytes
//! from "free" to "occupied" and leaves the quantity alone; a create lowers it by exactly the
//! volume's size and the delete gives it back. Activity of others on the filesystem is
//! followed in steps of [`CAPACITY_STEP`], so that the number stays put while nothing of ours
//! changes; `reserve_bytes` absorbs the difference.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use iri_api::volume::v1alpha1::{
    CreateVolumeRequest, CreateVolumeResponse, CreateVolumeSnapshotRequest, CreateVolumeSnapshotResponse,
    DeleteVolumeRequest, DeleteVolumeResponse, DeleteVolumeSnapshotRequest, DeleteVolumeSnapshotResponse,
    ExpandVolumeRequest, ExpandVolumeResponse, ListEventsRequest, ListEventsResponse,
    ListVolumeSnapshotsRequest, ListVolumeSnapshotsResponse, ListVolumesRequest, ListVolumesResponse,
    StatusRequest, StatusResponse, VersionRequest, VersionResponse, Volume, VolumeClass as IriVolumeClass,
    VolumeClassCapabilities, VolumeClassStatus, VolumeResources, VolumeSnapshot, VolumeSnapshotState,
    VolumeSnapshotStatus, VolumeSpec, VolumeState, VolumeStatus, volume_runtime_server,
};
use iri_runtime::{
    Error, EventType, ObjectFilter, Result, Store,
    error::reply,
    handler::{self, blocking, is_deleting, record_event},
    validate::{client_metadata, shorten},
};
use tonic::{Request, Response, Status};

use crate::{
    backend::{Backend, local::check_image_reference},
    config::{Config, VolumeClass},
    keys::{Kek, Passphrase},
    record::{VolumeRecord, snapshot_size, snapshot_state, snapshot_volume_id},
};

/// The key of the passphrase in `spec.encryption.secret_data` (upstream's name).
pub const ENCRYPTION_KEY: &str = "encryptionKey";

/// `VersionResponse.runtime_name`: what poollets put in front of ids (`<name>://<id>`).
pub const RUNTIME_NAME: &str = "iri-volume-provider";

/// Changes of the filesystem's free space caused by others are followed in steps of this size
/// (see the module docs): small enough to track a filling disk, big enough that the quantity
/// stays put while only our own volumes change.
pub const CAPACITY_STEP: u64 = 1 << 30;
/// How long a capacity measurement is reused.
const CAPACITY_FRESH: Duration = Duration::from_secs(1);
/// Status must answer within the poollet's 5 s heartbeat deadline even if the disk is stuck;
/// past this, the last measurement is used.
const CAPACITY_TIMEOUT: Duration = Duration::from_secs(2);

/// The `VolumeRuntime` service.
pub struct VolumeService {
    store: Store,
    /// Wraps encryption passphrases before they are stored.
    kek: Arc<Kek>,
    /// Where `file://` images may come from.
    image_dirs: Vec<PathBuf>,
    classes: Vec<VolumeClass>,
    capacity: Capacity,
    /// Serializes "is there room?" with the store write that takes the room, so concurrent
    /// creates cannot together promise more than there is.
    admission: tokio::sync::Mutex<()>,
}

impl VolumeService {
    /// A service over `store`, reporting and admitting against the capacity of `data_dir`
    /// (whose filesystem `backend` reports free space of).
    pub fn new(store: Store, backend: Arc<dyn Backend>, kek: Arc<Kek>, config: &Config) -> Self {
        VolumeService {
            store,
            kek,
            image_dirs: config.local.image_dirs.clone(),
            classes: config.classes.clone(),
            capacity: Capacity {
                backend,
                data_dir: config.server.data_dir.clone(),
                reserve: config.reserve_bytes,
                sample: Mutex::new(None),
            },
            admission: tokio::sync::Mutex::new(()),
        }
    }

    async fn insert_volume(&self, request: CreateVolumeRequest) -> Result<Volume> {
        let volume = request.volume.ok_or_else(|| Error::required("volume"))?;
        let mut spec = volume.spec.ok_or_else(|| Error::required("volume.spec"))?;
        let size = self.validate_volume_spec(&spec)?;
        // The passphrase is wrapped before anything is stored, and the rest of the secret
        // (the poollet copies the whole Secret) is dropped: nothing else in it is used.
        let encryption_key = match spec.encryption.as_mut() {
            Some(encryption) => {
                let key = encryption
                    .secret_data
                    .remove(ENCRYPTION_KEY)
                    .map(Passphrase::new)
                    .unwrap_or_else(|| Passphrase::new(Vec::new()));
                encryption.secret_data.clear();
                self.kek.wrap(&key).as_bytes().to_vec()
            }
            None => Vec::new(),
        };
        let metadata = client_metadata("volume", volume.metadata)?;
        // What depends on state comes after everything about the request itself.
        if let Some(source) = spec
            .volume_data_source
            .as_ref()
            .and_then(|d| d.snapshot_data_source.as_ref())
        {
            self.check_restore_source(&source.snapshot_id, size)?;
        }

        let admission = self.admission.lock().await;
        self.admit(size).await?;
        let record = VolumeRecord {
            metadata: Some(metadata),
            spec: Some(spec),
            status: Some(VolumeStatus {
                state: VolumeState::VolumePending as i32,
                access: None,
                // Nothing is served yet: the status says so rather than echo the request.
                resources: Some(VolumeResources { storage_bytes: 0 }),
            }),
            failed_generation: 0,
            failure: String::new(),
            encryption_key,
        };
        let store = self.store.clone();
        let stored = blocking(move || store.create(record)).await?.object;
        drop(admission);

        tracing::info!(
            id = %stored.metadata.as_ref().map_or("", |m| m.id.as_str()),
            size,
            "volume created"
        );
        record_event(
            &self.store,
            stored.metadata.as_ref(),
            EventType::Normal,
            "Created",
            "Create",
            format!(
                "Created volume of {size} bytes in class {:?}{}",
                stored.spec.as_ref().map_or("", |s| s.class.as_str()),
                stored
                    .source_snapshot()
                    .map(|s| format!(" from snapshot {s}"))
                    .unwrap_or_default()
            ),
        )
        .await;
        Ok(stored.into_volume())
    }

    /// Checks what can be checked without state; returns the requested size.
    fn validate_volume_spec(&self, spec: &VolumeSpec) -> Result<i64> {
        if spec.class.is_empty() {
            return Err(Error::required("volume.spec.class"));
        }
        if !self.classes.iter().any(|c| c.name == spec.class) {
            let known: Vec<&str> = self.classes.iter().map(|c| c.name.as_str()).collect();
            return Err(Error::invalid(
                "volume.spec.class",
                format!(
                    "unknown volume class {:?} (known: {})",
                    shorten(&spec.class),
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
                (Some(image), None) => {
                    check_image_reference(&image.image, &self.image_dirs).map_err(|reason| {
                        Error::invalid("volume.spec.volume_data_source.image_data_source.image", reason)
                    })?;
                }
                (None, Some(snapshot)) if snapshot.snapshot_id.is_empty() => {
                    return Err(Error::required(
                        "volume.spec.volume_data_source.snapshot_data_source.snapshot_id",
                    ));
                }
                _ => {}
            }
        }
        if let Some(encryption) = &spec.encryption {
            match encryption.secret_data.get(ENCRYPTION_KEY) {
                None => {
                    return Err(Error::required(
                        "volume.spec.encryption.secret_data[\"encryptionKey\"]",
                    ));
                }
                Some(key) if key.is_empty() => {
                    return Err(Error::invalid(
                        "volume.spec.encryption.secret_data[\"encryptionKey\"]",
                        "an empty passphrase protects nothing",
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(resources.storage_bytes)
    }

    /// A volume restored from `snapshot_id` needs the snapshot to exist, to be (or become)
    /// READY, and to fit into the volume.
    fn check_restore_source(&self, snapshot_id: &str, size: i64) -> Result<()> {
        const FIELD: &str = "volume.spec.volume_data_source.snapshot_data_source.snapshot_id";
        let snapshot = self
            .store
            .get::<VolumeSnapshot>(snapshot_id)
            .map_err(|e| match e {
                // A dangling reference depends on state, not on the request's shape: NotFound,
                // like every other unknown id.
                Error::NotFound { .. } => Error::not_found(
                    "volume snapshot (volume.spec.volume_data_source.snapshot_data_source.snapshot_id)",
                    snapshot_id,
                ),
                other => other,
            })?
            .object;
        if is_deleting(&snapshot) {
            return Err(Error::FailedPrecondition(format!(
                "{FIELD}: volume snapshot {snapshot_id:?} is being deleted"
            )));
        }
        if snapshot_state(&snapshot) == VolumeSnapshotState::VolumeSnapshotFailed {
            return Err(Error::FailedPrecondition(format!(
                "{FIELD}: volume snapshot {snapshot_id:?} is VOLUME_SNAPSHOT_FAILED and holds no data"
            )));
        }
        // A pending snapshot's size is not known yet; the reconciler checks it once it is.
        let snapshot_bytes = snapshot_size(&snapshot);
        if size < snapshot_bytes {
            return Err(Error::invalid(
                "volume.spec.resources.storage_bytes",
                format!("{size} bytes is smaller than snapshot {snapshot_id:?} ({snapshot_bytes} bytes)"),
            ));
        }
        Ok(())
    }

    async fn grow_volume(&self, request: ExpandVolumeRequest) -> Result<()> {
        let resources = request.resources.ok_or_else(|| Error::required("resources"))?;
        let size = resources.storage_bytes;
        if size <= 0 {
            return Err(Error::invalid(
                "resources.storage_bytes",
                format!("must be > 0, got {size}"),
            ));
        }
        let id = request.volume_id;
        let current = self.store.get::<VolumeRecord>(&id)?.object;
        let check = move |record: &VolumeRecord| -> Result<i64> {
            if record.is_deleting() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id:?} is being deleted"
                )));
            }
            let current = record.spec_bytes();
            if size < current {
                return Err(Error::invalid(
                    "resources.storage_bytes",
                    format!("volume_id {id:?} cannot shrink from {current} to {size} bytes"),
                ));
            }
            Ok(current)
        };
        let before = check(&current)?;
        if size == before {
            return Ok(());
        }

        let admission = self.admission.lock().await;
        self.admit(size - before).await?;
        let store = self.store.clone();
        let id = current
            .metadata
            .as_ref()
            .map(|m| m.id.clone())
            .unwrap_or_default();
        let stored = {
            let id = id.clone();
            blocking(move || {
                store.update::<VolumeRecord>(&id, |record| {
                    check(record)?;
                    record
                        .spec
                        .get_or_insert_with(Default::default)
                        .resources
                        .get_or_insert_with(Default::default)
                        .storage_bytes = size;
                    Ok(())
                })
            })
            .await?
            .object
        };
        drop(admission);

        tracing::info!(id = %id, from = before, to = size, "volume expansion requested");
        record_event(
            &self.store,
            stored.metadata.as_ref(),
            EventType::Normal,
            "Expanding",
            "Expand",
            format!("Expanding volume from {before} to {size} bytes"),
        )
        .await;
        Ok(())
    }

    /// DeleteVolume: the reconciler releases the volume in the backend and removes the record.
    async fn request_volume_deletion(&self, id: String) -> Result<()> {
        handler::request_deletion::<VolumeRecord>(&self.store, id, "volume", "Deleting volume").await
    }

    async fn insert_snapshot(&self, request: CreateVolumeSnapshotRequest) -> Result<VolumeSnapshot> {
        let snapshot = request
            .volume_snapshot
            .ok_or_else(|| Error::required("volume_snapshot"))?;
        let spec = snapshot
            .spec
            .ok_or_else(|| Error::required("volume_snapshot.spec"))?;
        if spec.volume_id.is_empty() {
            return Err(Error::required("volume_snapshot.spec.volume_id"));
        }
        let metadata = client_metadata("volume_snapshot", snapshot.metadata)?;
        let volume = self
            .store
            .get::<VolumeRecord>(&spec.volume_id)
            .map_err(|e| match e {
                Error::NotFound { .. } => {
                    Error::not_found("volume (volume_snapshot.spec.volume_id)", &spec.volume_id)
                }
                other => other,
            })?
            .object;
        if volume.is_deleting() {
            return Err(Error::FailedPrecondition(format!(
                "volume_snapshot.spec.volume_id: volume {:?} is being deleted",
                spec.volume_id
            )));
        }
        if volume.state() == VolumeState::VolumeError {
            return Err(Error::FailedPrecondition(format!(
                "volume_snapshot.spec.volume_id: volume {:?} is VOLUME_ERROR",
                spec.volume_id
            )));
        }

        let admission = self.admission.lock().await;
        // The snapshot freezes what the volume holds, and the volume can fill up again.
        self.admit(volume.committed_bytes()).await?;
        let message = format!("Created snapshot of volume {:?}", spec.volume_id);
        let snapshot = VolumeSnapshot {
            metadata: Some(metadata),
            // Echoed back, unlike upstream's volumebroker (iri-contract §2.3).
            spec: Some(spec),
            status: Some(VolumeSnapshotStatus {
                state: VolumeSnapshotState::VolumeSnapshotPending as i32,
                size: 0,
            }),
        };
        let store = self.store.clone();
        let stored = blocking(move || store.create(snapshot)).await?.object;
        drop(admission);

        tracing::info!(
            id = %stored.metadata.as_ref().map_or("", |m| m.id.as_str()),
            volume = %snapshot_volume_id(&stored),
            "volume snapshot created"
        );
        record_event(
            &self.store,
            stored.metadata.as_ref(),
            EventType::Normal,
            "Created",
            "Create",
            message,
        )
        .await;
        Ok(stored)
    }

    /// DeleteVolumeSnapshot: the reconciler removes the snapshot's data and then the record.
    async fn request_snapshot_deletion(&self, id: String) -> Result<()> {
        handler::request_deletion::<VolumeSnapshot>(
            &self.store,
            id,
            "volume snapshot",
            "Deleting volume snapshot",
        )
        .await
    }

    async fn class_status(&self) -> Vec<VolumeClassStatus> {
        let quantity = match self.quantity().await {
            Ok(quantity) => quantity,
            Err(err) => {
                // Status must answer (it is the poollet's liveness probe); "no room" is the
                // answer that promises nothing we cannot keep.
                tracing::warn!(%err, "cannot measure capacity; reporting quantity 0");
                0
            }
        };
        self.classes
            .iter()
            .map(|class| VolumeClassStatus {
                volume_class: Some(IriVolumeClass {
                    name: class.name.clone(),
                    capabilities: Some(VolumeClassCapabilities {
                        tps: class.tps,
                        iops: class.iops,
                    }),
                }),
                quantity,
            })
            .collect()
    }

    /// Bytes new volumes can still be promised (see the module docs), floored at 0.
    async fn quantity(&self) -> Result<i64> {
        let capacity = i64::try_from(self.capacity.bytes().await?).unwrap_or(i64::MAX);
        Ok(capacity.saturating_sub(self.committed()).max(0))
    }

    /// Fails with ResourceExhausted unless `bytes` more can be promised.
    async fn admit(&self, bytes: i64) -> Result<()> {
        let available = self.quantity().await?;
        if bytes > available {
            return Err(Error::ResourceExhausted(format!(
                "not enough storage: {bytes} bytes requested, {available} bytes can still be promised \
                 (free space minus reserve_bytes minus what existing volumes and snapshots may fill)"
            )));
        }
        Ok(())
    }

    /// Bytes the stored volumes and snapshots may come to occupy.
    fn committed(&self) -> i64 {
        let all = ObjectFilter::default();
        let volumes = self.store.list::<VolumeRecord>(&all);
        let sizes: BTreeMap<&str, i64> = volumes
            .iter()
            .map(|v| {
                (
                    v.object.metadata.as_ref().map_or("", |m| m.id.as_str()),
                    v.object.committed_bytes(),
                )
            })
            .collect();
        let volume_bytes = sizes.values().fold(0i64, |sum, b| sum.saturating_add(*b));
        let snapshot_bytes = self
            .store
            .list::<VolumeSnapshot>(&all)
            .iter()
            .map(|s| match snapshot_state(&s.object) {
                VolumeSnapshotState::VolumeSnapshotReady => snapshot_size(&s.object).max(0),
                // About to freeze its whole volume.
                VolumeSnapshotState::VolumeSnapshotPending => {
                    sizes.get(snapshot_volume_id(&s.object)).copied().unwrap_or(0)
                }
                VolumeSnapshotState::VolumeSnapshotFailed => 0,
            })
            .fold(0i64, i64::saturating_add);
        volume_bytes.saturating_add(snapshot_bytes)
    }
}

/// The data directory's room: free space plus what the directory itself occupies, minus the
/// reserve; followed in [`CAPACITY_STEP`]s (see the module docs).
struct Capacity {
    backend: Arc<dyn Backend>,
    data_dir: PathBuf,
    reserve: u64,
    sample: Mutex<Option<Sample>>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The published value.
    bytes: u64,
    /// When it was last confirmed by a measurement.
    at: Instant,
}

impl Capacity {
    async fn bytes(&self) -> Result<u64> {
        let last = *self.sample.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sample) = last
            && sample.at.elapsed() < CAPACITY_FRESH
        {
            return Ok(sample.bytes);
        }
        let measured = match tokio::time::timeout(CAPACITY_TIMEOUT, self.measure()).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable(format!(
                "measuring the capacity of {} took longer than {CAPACITY_TIMEOUT:?}",
                self.data_dir.display()
            ))),
        };
        let mut sample = self.sample.lock().unwrap_or_else(PoisonError::into_inner);
        match (measured, *sample) {
            (Ok(bytes), Some(last)) if bytes.abs_diff(last.bytes) < CAPACITY_STEP => {
                *sample = Some(Sample {
                    bytes: last.bytes,
                    at: Instant::now(),
                });
                Ok(last.bytes)
            }
            (Ok(bytes), _) => {
                *sample = Some(Sample {
                    bytes,
                    at: Instant::now(),
                });
                Ok(bytes)
            }
            (Err(err), Some(last)) => {
                tracing::warn!(%err, "capacity measurement failed; using the last one");
                Ok(last.bytes)
            }
            (Err(err), None) => Err(err),
        }
    }

    async fn measure(&self) -> Result<u64> {
        let free = self
            .backend
            .available_bytes()
            .await
            .map_err(|e| Error::Unavailable(format!("free space of the data directory: {e}")))?;
        let dir = self.data_dir.clone();
        let used = tokio::task::spawn_blocking(move || disk_usage(&dir))
            .await
            .map_err(|e| Error::Internal(format!("disk usage task: {e}")))?;
        Ok(free.saturating_add(used).saturating_sub(self.reserve))
    }
}

/// Bytes allocated on disk under `dir` (like `du -s`: blocks, not apparent sizes, so sparse
/// files count what they really hold). Files that vanish during the walk are skipped.
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // Never follow symlinks: only what lives in the data directory counts.
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            total = total.saturating_add(meta.blocks().saturating_mul(512));
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    total
}

#[tonic::async_trait]
impl volume_runtime_server::VolumeRuntime for VolumeService {
    async fn version(&self, _: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            runtime_name: RUNTIME_NAME.to_string(),
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let filter = request.into_inner().filter;
        reply(handler::list_events(&self.store, filter).await, |events| {
            ListEventsResponse { events }
        })
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let filter = request.into_inner().filter;
        let volumes = handler::list(&self.store, filter, VolumeRecord::into_volume);
        Ok(Response::new(ListVolumesResponse { volumes }))
    }

    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        reply(self.insert_volume(request.into_inner()).await, |volume| {
            CreateVolumeResponse { volume: Some(volume) }
        })
    }

    async fn expand_volume(
        &self,
        request: Request<ExpandVolumeRequest>,
    ) -> Result<Response<ExpandVolumeResponse>, Status> {
        reply(self.grow_volume(request.into_inner()).await, |()| {
            ExpandVolumeResponse {}
        })
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        reply(
            self.request_volume_deletion(request.into_inner().volume_id).await,
            |()| DeleteVolumeResponse {},
        )
    }

    async fn create_volume_snapshot(
        &self,
        request: Request<CreateVolumeSnapshotRequest>,
    ) -> Result<Response<CreateVolumeSnapshotResponse>, Status> {
        reply(self.insert_snapshot(request.into_inner()).await, |snapshot| {
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
            self.request_snapshot_deletion(request.into_inner().volume_snapshot_id)
                .await,
            |()| DeleteVolumeSnapshotResponse {},
        )
    }

    async fn list_volume_snapshots(
        &self,
        request: Request<ListVolumeSnapshotsRequest>,
    ) -> Result<Response<ListVolumeSnapshotsResponse>, Status> {
        let filter = request.into_inner().filter;
        let volume_snapshots = handler::list(&self.store, filter, |snapshot: VolumeSnapshot| snapshot);
        Ok(Response::new(ListVolumeSnapshotsResponse { volume_snapshots }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            volume_class_status: self.class_status().await,
        }))
    }
}

#[cfg(test)]
mod tests {
    use iri_api::volume::v1alpha1::{
        EncryptionSpec, ImageDataSource, SnapshotDataSource, VolumeDataSource, VolumeFilter,
        VolumeSnapshotFilter, VolumeSnapshotSpec, volume_runtime_server::VolumeRuntime,
    };
    use iri_runtime::StoreOptions;
    use tonic::Code;

    use super::*;
    use crate::reconcile::fake::FakeBackend;
    use iri_api::meta::v1alpha1::ObjectMetadata;
    use iri_runtime::validate::{MAX_METADATA_ENTRIES, MAX_METADATA_VALUE_BYTES};

    const GIB: i64 = 1 << 30;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        fake: Arc<FakeBackend>,
        service: VolumeService,
    }

    fn fixture(free: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.db"), StoreOptions::default()).unwrap();
        let fake = FakeBackend::with_free(free);
        let mut config = Config::default();
        config.server.data_dir = dir.path().to_path_buf();
        config.reserve_bytes = GIB as u64;
        let service = VolumeService::new(
            store.clone(),
            fake.clone(),
            Arc::new(Kek::from_bytes(&[3; crate::keys::KEK_LEN])),
            &config,
        );
        Fixture {
            _dir: dir,
            store,
            fake,
            service,
        }
    }

    fn spec(size: i64) -> VolumeSpec {
        VolumeSpec {
            class: "fast".into(),
            resources: Some(VolumeResources { storage_bytes: size }),
            encryption: None,
            volume_data_source: None,
        }
    }

    fn from_snapshot(size: i64, snapshot_id: &str) -> VolumeSpec {
        VolumeSpec {
            volume_data_source: Some(VolumeDataSource {
                image_data_source: None,
                snapshot_data_source: Some(SnapshotDataSource {
                    snapshot_id: snapshot_id.into(),
                }),
            }),
            ..spec(size)
        }
    }

    fn labelled(labels: &[(&str, &str)]) -> ObjectMetadata {
        ObjectMetadata {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn create_request(spec: VolumeSpec) -> CreateVolumeRequest {
        CreateVolumeRequest {
            volume: Some(Volume {
                metadata: Some(labelled(&[("app", "test")])),
                spec: Some(spec),
                status: None,
            }),
        }
    }

    /// The error's code and message.
    fn failure<T: std::fmt::Debug>(result: Result<Response<T>, Status>) -> (Code, String) {
        let status = result.expect_err("the call should fail");
        (status.code(), status.message().to_string())
    }

    fn expect(result: (Code, String), code: Code, mention: &str) {
        assert_eq!(result.0, code, "{}", result.1);
        assert!(
            result.1.contains(mention),
            "{:?} does not mention {mention:?}",
            result.1
        );
    }

    impl Fixture {
        async fn create(&self, spec: VolumeSpec) -> Volume {
            self.service
                .create_volume(Request::new(create_request(spec)))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
        }

        async fn snapshot(&self, volume_id: &str) -> VolumeSnapshot {
            self.service
                .create_volume_snapshot(Request::new(CreateVolumeSnapshotRequest {
                    volume_snapshot: Some(VolumeSnapshot {
                        metadata: Some(labelled(&[("app", "snap")])),
                        spec: Some(VolumeSnapshotSpec {
                            volume_id: volume_id.into(),
                        }),
                        status: None,
                    }),
                }))
                .await
                .unwrap()
                .into_inner()
                .volume_snapshot
                .unwrap()
        }

        async fn quantity(&self) -> i64 {
            let status = self
                .service
                .status(Request::new(StatusRequest {}))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(status.volume_class_status.len(), 2);
            let quantities: Vec<i64> = status.volume_class_status.iter().map(|c| c.quantity).collect();
            assert!(quantities.iter().all(|q| *q == quantities[0]), "{quantities:?}");
            quantities[0]
        }

        async fn expand(
            &self,
            id: &str,
            resources: Option<i64>,
        ) -> Result<Response<ExpandVolumeResponse>, Status> {
            self.service
                .expand_volume(Request::new(ExpandVolumeRequest {
                    volume_id: id.into(),
                    resources: resources.map(|storage_bytes| VolumeResources { storage_bytes }),
                }))
                .await
        }

        fn set_snapshot_state(&self, id: &str, state: VolumeSnapshotState, size: i64) {
            self.store
                .update::<VolumeSnapshot>(id, |s| {
                    s.status = Some(VolumeSnapshotStatus {
                        state: state as i32,
                        size,
                    });
                    Ok(())
                })
                .unwrap();
        }
    }

    fn id(volume: &Volume) -> String {
        volume.metadata.as_ref().unwrap().id.clone()
    }

    #[tokio::test]
    async fn passphrases_are_stored_wrapped_and_never_returned() {
        let f = fixture(100 << 30);
        let passphrase = b"the-passphrase-of-this-test".to_vec();
        let request = create_request(VolumeSpec {
            encryption: Some(EncryptionSpec {
                secret_data: BTreeMap::from([
                    ("encryptionKey".to_string(), passphrase.clone()),
                    ("other".to_string(), b"copied along by the poollet".to_vec()),
                ]),
            }),
            ..spec(GIB)
        });
        let created = f
            .service
            .create_volume(Request::new(request))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let returned = created.spec.as_ref().unwrap().encryption.as_ref().unwrap();
        assert!(returned.secret_data.is_empty(), "secrets are never returned");
        let record = f.store.get::<VolumeRecord>(&id(&created)).unwrap().object;
        assert!(record.spec.unwrap().encryption.unwrap().secret_data.is_empty());
        let kek = Kek::from_bytes(&[3; crate::keys::KEK_LEN]);
        let wrapped = crate::keys::WrappedKey::from_bytes(record.encryption_key.clone());
        assert_eq!(kek.unwrap(&wrapped).unwrap().expose(), passphrase.as_slice());
        assert!(
            !record
                .encryption_key
                .windows(8)
                .any(|w| passphrase.windows(8).any(|p| p == w)),
            "the stored form holds no run of the passphrase"
        );
    }

    #[tokio::test]
    async fn malformed_creates_name_the_field() {
        let f = fixture(100 << 30);
        let image = |image: &str| VolumeSpec {
            volume_data_source: Some(VolumeDataSource {
                image_data_source: Some(ImageDataSource {
                    image: image.into(),
                    architecture: String::new(),
                }),
                snapshot_data_source: None,
            }),
            ..spec(GIB)
        };
        let both = VolumeSpec {
            volume_data_source: Some(VolumeDataSource {
                image_data_source: image("x").volume_data_source.unwrap().image_data_source,
                snapshot_data_source: from_snapshot(GIB, "s")
                    .volume_data_source
                    .unwrap()
                    .snapshot_data_source,
            }),
            ..spec(GIB)
        };
        let cases: Vec<(VolumeSpec, &str)> = vec![
            (
                VolumeSpec {
                    class: String::new(),
                    ..spec(GIB)
                },
                "volume.spec.class",
            ),
            (
                VolumeSpec {
                    class: "gold".into(),
                    ..spec(GIB)
                },
                "volume.spec.class",
            ),
            (
                VolumeSpec {
                    resources: None,
                    ..spec(GIB)
                },
                "volume.spec.resources",
            ),
            (spec(0), "volume.spec.resources.storage_bytes"),
            (spec(-1), "volume.spec.resources.storage_bytes"),
            (both, "volume.spec.volume_data_source"),
            (
                image(""),
                "volume.spec.volume_data_source.image_data_source.image",
            ),
            (image("ftp://example.com/os.img"), "only file://"),
            (image("Registry.Example/UPPER:1"), "lowercase"),
            (image("file:///etc/shadow"), "local.image_dirs"),
            (from_snapshot(GIB, ""), "snapshot_data_source.snapshot_id"),
            (
                VolumeSpec {
                    encryption: Some(EncryptionSpec::default()),
                    ..spec(GIB)
                },
                "volume.spec.encryption.secret_data[\"encryptionKey\"]",
            ),
            (
                VolumeSpec {
                    encryption: Some(EncryptionSpec {
                        secret_data: BTreeMap::from([("encryptionKey".to_string(), Vec::new())]),
                    }),
                    ..spec(GIB)
                },
                "an empty passphrase",
            ),
        ];
        for (spec, field) in cases {
            let result = f.service.create_volume(Request::new(create_request(spec))).await;
            expect(failure(result), Code::InvalidArgument, field);
        }
        let result = f
            .service
            .create_volume(Request::new(CreateVolumeRequest { volume: None }))
            .await;
        expect(failure(result), Code::InvalidArgument, "volume");
        let mut request = create_request(spec(GIB));
        request.volume.as_mut().unwrap().metadata = None;
        expect(
            failure(f.service.create_volume(Request::new(request)).await),
            Code::InvalidArgument,
            "volume.metadata",
        );
        let mut request = create_request(spec(GIB));
        request.volume.as_mut().unwrap().spec = None;
        expect(
            failure(f.service.create_volume(Request::new(request)).await),
            Code::InvalidArgument,
            "volume.spec",
        );
        // Label and annotation caps.
        let mut request = create_request(spec(GIB));
        let meta = request.volume.as_mut().unwrap().metadata.as_mut().unwrap();
        meta.labels = (0..=MAX_METADATA_ENTRIES)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        expect(
            failure(f.service.create_volume(Request::new(request.clone())).await),
            Code::InvalidArgument,
            "volume.metadata.labels",
        );
        let meta = request.volume.as_mut().unwrap().metadata.as_mut().unwrap();
        meta.labels = BTreeMap::from([(String::new(), "v".into())]);
        expect(
            failure(f.service.create_volume(Request::new(request.clone())).await),
            Code::InvalidArgument,
            "keys must not be empty",
        );
        let meta = request.volume.as_mut().unwrap().metadata.as_mut().unwrap();
        meta.labels.clear();
        meta.annotations = BTreeMap::from([("a".into(), "x".repeat(MAX_METADATA_VALUE_BYTES + 1))]);
        expect(
            failure(f.service.create_volume(Request::new(request)).await),
            Code::InvalidArgument,
            "volume.metadata.annotations",
        );
        // An unknown restore source is an unknown id.
        let result = f
            .service
            .create_volume(Request::new(create_request(from_snapshot(GIB, "nope"))))
            .await;
        expect(failure(result), Code::NotFound, "snapshot_id");
        assert_eq!(f.store.count::<VolumeRecord>(), 0, "nothing was stored");
    }

    #[tokio::test]
    async fn create_stores_a_pending_volume_with_server_owned_metadata() {
        let f = fixture(100 << 30);
        let mut request = create_request(spec(GIB));
        let meta = request.volume.as_mut().unwrap().metadata.as_mut().unwrap();
        meta.id = "client-chosen".into();
        meta.generation = 7;
        meta.annotations = BTreeMap::from([("note".into(), "line 1\nline 2".into())]);
        let created = f
            .service
            .create_volume(Request::new(request.clone()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let meta = created.metadata.as_ref().unwrap();
        assert!(iri_runtime::id::is_valid_id(&meta.id), "{}", meta.id);
        assert_eq!(meta.generation, 1);
        assert!(meta.created_at > 0);
        assert_eq!(
            meta.labels,
            request.volume.as_ref().unwrap().metadata.as_ref().unwrap().labels
        );
        assert_eq!(meta.annotations["note"], "line 1\nline 2");
        assert_eq!(created.spec, Some(spec(GIB)));
        let status = created.status.as_ref().unwrap();
        assert_eq!(status.state, VolumeState::VolumePending as i32);
        assert_eq!(status.access, None);
        let listed = f
            .service
            .list_volumes(Request::new(ListVolumesRequest { filter: None }))
            .await
            .unwrap()
            .into_inner()
            .volumes;
        assert_eq!(listed, std::slice::from_ref(&created));
        let events = f
            .service
            .list_events(Request::new(ListEventsRequest { filter: None }))
            .await
            .unwrap()
            .into_inner()
            .events;
        assert_eq!(events.len(), 1);
        let event = events[0].spec.as_ref().unwrap();
        assert_eq!(
            (event.r#type.as_str(), event.reason.as_str()),
            ("Normal", "Created")
        );
        assert_eq!(event.involved_object_meta.as_ref().unwrap().id, meta.id);
    }

    #[tokio::test]
    async fn lists_filter_by_id_and_labels() {
        let f = fixture(100 << 30);
        let a = f.create(spec(GIB)).await;
        let mut request = create_request(spec(GIB));
        request.volume.as_mut().unwrap().metadata = Some(labelled(&[("app", "other"), ("tier", "")]));
        f.service.create_volume(Request::new(request)).await.unwrap();
        let list = |filter: Option<VolumeFilter>| {
            let service = &f.service;
            async move {
                service
                    .list_volumes(Request::new(ListVolumesRequest { filter }))
                    .await
                    .unwrap()
                    .into_inner()
                    .volumes
            }
        };
        assert_eq!(list(None).await.len(), 2);
        let by_id = list(Some(VolumeFilter {
            id: id(&a),
            ..Default::default()
        }))
        .await;
        assert_eq!(by_id, std::slice::from_ref(&a));
        let unknown = list(Some(VolumeFilter {
            id: iri_runtime::id::new_id(),
            ..Default::default()
        }))
        .await;
        assert!(unknown.is_empty());
        let by_label = list(Some(VolumeFilter {
            label_selector: BTreeMap::from([("tier".into(), String::new())]),
            ..Default::default()
        }))
        .await;
        assert_eq!(by_label.len(), 1);
        assert_ne!(id(&by_label[0]), id(&a));
    }

    #[tokio::test]
    async fn expand_grows_the_spec_and_refuses_to_shrink() {
        let f = fixture(100 << 30);
        let volume = f.create(spec(2 * GIB)).await;
        let id = id(&volume);
        expect(
            failure(f.expand(&iri_runtime::id::new_id(), Some(3 * GIB)).await),
            Code::NotFound,
            "volume",
        );
        expect(
            failure(f.expand(&id, None).await),
            Code::InvalidArgument,
            "resources",
        );
        expect(
            failure(f.expand(&id, Some(0)).await),
            Code::InvalidArgument,
            "resources.storage_bytes",
        );
        expect(
            failure(f.expand(&id, Some(GIB)).await),
            Code::InvalidArgument,
            "resources.storage_bytes",
        );
        f.expand(&id, Some(2 * GIB)).await.unwrap();
        let same = f.store.get::<VolumeRecord>(&id).unwrap().object;
        assert_eq!(same.generation(), 1, "the same size is a no-op");
        f.expand(&id, Some(3 * GIB)).await.unwrap();
        let grown = f.store.get::<VolumeRecord>(&id).unwrap().object;
        assert_eq!((grown.generation(), grown.spec_bytes()), (2, 3 * GIB));
        f.service
            .delete_volume(Request::new(DeleteVolumeRequest {
                volume_id: id.clone(),
            }))
            .await
            .unwrap();
        expect(
            failure(f.expand(&id, Some(4 * GIB)).await),
            Code::FailedPrecondition,
            "being deleted",
        );
    }

    #[tokio::test]
    async fn delete_is_two_phase_and_idempotent() {
        let f = fixture(100 << 30);
        let volume = f.create(spec(GIB)).await;
        let id = id(&volume);
        let delete = |id: String| {
            f.service
                .delete_volume(Request::new(DeleteVolumeRequest { volume_id: id }))
        };
        expect(
            failure(delete(iri_runtime::id::new_id()).await),
            Code::NotFound,
            "volume",
        );
        expect(failure(delete(String::new()).await), Code::NotFound, "volume");
        delete(id.clone()).await.unwrap();
        let deleting = f.store.get::<VolumeRecord>(&id).unwrap().object;
        let deleted_at = deleting.metadata.as_ref().unwrap().deleted_at;
        assert!(deleted_at > 0);
        delete(id.clone()).await.unwrap();
        let again = f.store.get::<VolumeRecord>(&id).unwrap().object;
        assert_eq!(
            again.metadata.unwrap().deleted_at,
            deleted_at,
            "the first request counts"
        );
        // The reconciler removes the record once the backend let go; then it is NotFound.
        f.store.remove::<VolumeRecord>(&id).unwrap();
        expect(failure(delete(id).await), Code::NotFound, "volume");
    }

    #[tokio::test]
    async fn snapshots_validate_their_source() {
        let f = fixture(100 << 30);
        let volume = f.create(spec(GIB)).await;
        let create = |snapshot: Option<VolumeSnapshot>| {
            f.service
                .create_volume_snapshot(Request::new(CreateVolumeSnapshotRequest {
                    volume_snapshot: snapshot,
                }))
        };
        let valid = VolumeSnapshot {
            metadata: Some(labelled(&[])),
            spec: Some(VolumeSnapshotSpec {
                volume_id: id(&volume),
            }),
            status: None,
        };
        expect(
            failure(create(None).await),
            Code::InvalidArgument,
            "volume_snapshot",
        );
        expect(
            failure(
                create(Some(VolumeSnapshot {
                    metadata: None,
                    ..valid.clone()
                }))
                .await,
            ),
            Code::InvalidArgument,
            "volume_snapshot.metadata",
        );
        expect(
            failure(
                create(Some(VolumeSnapshot {
                    spec: None,
                    ..valid.clone()
                }))
                .await,
            ),
            Code::InvalidArgument,
            "volume_snapshot.spec",
        );
        expect(
            failure(
                create(Some(VolumeSnapshot {
                    spec: Some(VolumeSnapshotSpec::default()),
                    ..valid.clone()
                }))
                .await,
            ),
            Code::InvalidArgument,
            "volume_snapshot.spec.volume_id",
        );
        expect(
            failure(
                create(Some(VolumeSnapshot {
                    spec: Some(VolumeSnapshotSpec {
                        volume_id: iri_runtime::id::new_id(),
                    }),
                    ..valid.clone()
                }))
                .await,
            ),
            Code::NotFound,
            "volume_snapshot.spec.volume_id",
        );

        let snapshot = f.snapshot(&id(&volume)).await;
        assert_eq!(snapshot.spec, valid.spec, "spec echoed");
        let snap_id = snapshot.metadata.as_ref().unwrap().id.clone();
        assert_eq!(
            snapshot_state(&snapshot),
            VolumeSnapshotState::VolumeSnapshotPending
        );
        let listed = f
            .service
            .list_volume_snapshots(Request::new(ListVolumeSnapshotsRequest {
                filter: Some(VolumeSnapshotFilter {
                    label_selector: BTreeMap::from([("app".into(), "snap".into())]),
                    ..Default::default()
                }),
            }))
            .await
            .unwrap()
            .into_inner()
            .volume_snapshots;
        assert_eq!(listed, [snapshot]);

        // Restores: a pending source is accepted (the reconciler waits), a ready one must fit,
        // a failed one holds nothing.
        f.create(from_snapshot(GIB, &snap_id)).await;
        f.set_snapshot_state(&snap_id, VolumeSnapshotState::VolumeSnapshotReady, 2 * GIB);
        let result = f
            .service
            .create_volume(Request::new(create_request(from_snapshot(GIB, &snap_id))))
            .await;
        expect(
            failure(result),
            Code::InvalidArgument,
            "volume.spec.resources.storage_bytes",
        );
        f.create(from_snapshot(2 * GIB, &snap_id)).await;
        f.set_snapshot_state(&snap_id, VolumeSnapshotState::VolumeSnapshotFailed, 0);
        let result = f
            .service
            .create_volume(Request::new(create_request(from_snapshot(2 * GIB, &snap_id))))
            .await;
        expect(
            failure(result),
            Code::FailedPrecondition,
            "VOLUME_SNAPSHOT_FAILED",
        );

        let delete = |id: String| {
            f.service
                .delete_volume_snapshot(Request::new(DeleteVolumeSnapshotRequest {
                    volume_snapshot_id: id,
                }))
        };
        expect(
            failure(delete(iri_runtime::id::new_id()).await),
            Code::NotFound,
            "volume_snapshot",
        );
        delete(snap_id.clone()).await.unwrap();
        delete(snap_id.clone()).await.unwrap();
        assert!(is_deleting(
            &f.store.get::<VolumeSnapshot>(&snap_id).unwrap().object
        ));

        // A volume being deleted cannot be snapshotted any more.
        f.service
            .delete_volume(Request::new(DeleteVolumeRequest {
                volume_id: id(&volume),
            }))
            .await
            .unwrap();
        expect(
            failure(create(Some(valid)).await),
            Code::FailedPrecondition,
            "being deleted",
        );
    }

    #[tokio::test]
    async fn quantity_is_thick_and_admission_follows_it() {
        let f = fixture(10 << 30);
        let q0 = f.quantity().await;
        let used = i64::try_from(disk_usage(f._dir.path())).unwrap();
        // free + what the data directory holds - reserve; nothing is committed yet.
        assert!((q0 - (9 * GIB + used)).abs() < CAPACITY_STEP as i64, "{q0}");

        let volume = f.create(spec(2 * GIB)).await;
        assert_eq!(f.quantity().await, q0 - 2 * GIB, "a create takes its size");
        f.expand(&id(&volume), Some(3 * GIB)).await.unwrap();
        assert_eq!(f.quantity().await, q0 - 3 * GIB);
        f.snapshot(&id(&volume)).await;
        assert_eq!(
            f.quantity().await,
            q0 - 6 * GIB,
            "a pending snapshot may freeze it all"
        );

        let result = f
            .service
            .create_volume(Request::new(create_request(spec(q0 - 6 * GIB + 1))))
            .await;
        expect(failure(result), Code::ResourceExhausted, "not enough storage");
        expect(
            failure(f.expand(&id(&volume), Some(100 * GIB)).await),
            Code::ResourceExhausted,
            "not enough",
        );
        f.create(spec(q0 - 6 * GIB)).await;
        assert_eq!(f.quantity().await, 0);

        // Small changes of free space (what our own writes do) leave the quantity alone; big
        // ones are followed.
        tokio::time::sleep(CAPACITY_FRESH).await;
        f.fake.state().free -= 1 << 20;
        assert_eq!(f.quantity().await, 0);
        f.store.remove::<VolumeRecord>(&id(&volume)).unwrap();
        // The volume's size is back, and so is what its pending snapshot would have frozen.
        assert_eq!(f.quantity().await, 6 * GIB);
        tokio::time::sleep(CAPACITY_FRESH).await;
        f.fake.state().free -= 2 << 30;
        let q = f.quantity().await;
        assert!(q <= 4 * GIB && q > 4 * GIB - (2 << 20), "{q}");
    }

    #[tokio::test]
    async fn version_names_the_runtime() {
        let f = fixture(0);
        let version = f
            .service
            .version(Request::new(VersionRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(version.runtime_name, RUNTIME_NAME);
        assert_eq!(version.runtime_version, env!("CARGO_PKG_VERSION"));
        // Less free space than the reserve: nothing to promise, never negative.
        assert_eq!(f.quantity().await, 0);
    }
}
