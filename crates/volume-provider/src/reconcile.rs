// SPDX-License-Identifier: Apache-2.0
//! The reconciler: workers that drive the backend toward what the store asks for and write
//! what the backend reports back as status.
//!
//! Two keyed queues (volumes, snapshots) are fed by the store's change feed, by a periodic
//! resync of everything (which repairs drift such as a lost export, and retries what waits on
//! another object), and by the reconcilers themselves when one object's progress unblocks
//! another. A key is never reconciled by two workers at once; failures are retried with
//! exponential backoff.
//!
//! Ordering between related objects goes through the store, not through the queues:
//! * a snapshot requested while its volume existed is taken before the volume is deleted:
//!   the volume's deletion waits while a snapshot of it is PENDING (a snapshot of a volume
//!   that never became available fails instead, so neither waits for the other forever);
//! * a snapshot is deleted only once no volume restored from it still waits to be created.
//!
//! Failures: a [`BackendError::Permanent`] while provisioning puts the volume into
//! VOLUME_ERROR (a snapshot into FAILED) with a Warning event, and the volume is left alone
//! until its spec changes. A permanent failure to expand an available volume leaves it
//! AVAILABLE at its old size (it is still served) with a Warning event. A
//! [`BackendError::Transient`] is retried with backoff and reported as a Warning event at most
//! once per [`WARNING_INTERVAL`] per object and message.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use iri_api::volume::v1alpha1::{
    VolumeAccess, VolumeResources, VolumeSnapshot, VolumeSnapshotState, VolumeSnapshotStatus, VolumeState,
    VolumeStatus,
};
use iri_runtime::{
    Change, Error, EventType, Object, ObjectFilter, Result, Store,
    handler::{self, blocking, is_deleting, record_event},
    metrics::Metrics,
    queue::{Outcome, QueueOptions, ReconcileQueue},
    warning::WarningGate,
};
use tokio::{sync::broadcast::error::RecvError, task::JoinHandle};
use tracing::Instrument;

use crate::{
    backend::{Access, Backend, BackendError, ImageRef, Limits, Source, VolumePlan},
    config::VolumeClass,
    keys::WrappedKey,
    record::{VolumeRecord, snapshot_size, snapshot_state, snapshot_volume_id},
};

/// How soon an object that waits for another one looks again, in case the wake-up by the
/// other object's reconcile is missed (e.g. across a restart).
const WAIT: Duration = Duration::from_secs(2);

/// The same transient failure of one object is reported as an event at most this often.
pub const WARNING_INTERVAL: Duration = Duration::from_secs(300);

/// Identifies an object across both kinds: `(Object::KIND, id)`.
type Key = (&'static str, String);

/// Volumes and snapshots, reconciled.
pub struct Reconciler {
    store: Store,
    backend: Arc<dyn Backend>,
    classes: Vec<VolumeClass>,
    volumes: ReconcileQueue<String>,
    snapshots: ReconcileQueue<String>,
    /// `(generation, deleted_at)` of each object when a reconcile last picked it up. A change
    /// that leaves these as they were is the reconciler's own status write and needs no
    /// further pass; anything a client changes moves one of them.
    observed: Mutex<HashMap<Key, (i64, i64)>>,
    /// Holds back a Warning about a transient failure repeated per object.
    warned: WarningGate<Key>,
}

/// Where a volume's data comes from, as far as the store can tell.
enum SourceState {
    /// Ready to be provisioned from this.
    Ready(Source),
    /// The source snapshot is still being taken.
    Wait,
    /// The source will never be there.
    Gone(String),
}

/// The running workers, change feed and resync; [`Workers::shut_down`] stops them.
pub struct Workers {
    volumes: ReconcileQueue<String>,
    snapshots: ReconcileQueue<String>,
    tasks: Vec<JoinHandle<()>>,
    feed: JoinHandle<()>,
}

impl Workers {
    /// Stops handing out work, lets workers finish the object they are on (at most `grace`),
    /// and returns.
    pub async fn shut_down(self, grace: Duration) {
        self.volumes.shut_down();
        self.snapshots.shut_down();
        self.feed.abort();
        let all = join_all(self.tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(?grace, "reconcile workers did not finish in time");
        }
    }
}

async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps are caches of hints; a panic elsewhere cannot leave them inconsistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn to_iri_access(access: Access) -> VolumeAccess {
    VolumeAccess {
        driver: access.driver,
        handle: access.handle,
        attributes: access.attributes,
        secret_data: access.secret_data,
    }
}

impl Reconciler {
    /// A reconciler over `store` and `backend`; `classes` give each volume's limits.
    pub fn new(store: Store, backend: Arc<dyn Backend>, classes: Vec<VolumeClass>) -> Arc<Self> {
        Arc::new(Reconciler {
            store,
            backend,
            classes,
            volumes: ReconcileQueue::new(QueueOptions::named("volume")),
            snapshots: ReconcileQueue::new(QueueOptions::named("volume_snapshot")),
            observed: Mutex::new(HashMap::new()),
            warned: WarningGate::new(WARNING_INTERVAL),
        })
    }

    /// Removes what the backend holds but no store record references: leftovers of a crash
    /// or of a store restored from a backup. Run it before the workers start, so that nothing
    /// else touches the backend meanwhile.
    ///
    /// The inventory is taken before the store is read: a record always exists before its
    /// backend object (the RPC writes it first) and is removed only after it, so anything in
    /// the inventory that the later store read does not know is an orphan.
    pub async fn remove_orphans(&self) -> Result<()> {
        let inventory = self
            .backend
            .inventory()
            .await
            .map_err(|e| Error::Unavailable(format!("backend inventory: {e}")))?;
        let all = ObjectFilter::default();
        let volumes: HashSet<String> = self
            .store
            .list::<VolumeRecord>(&all)
            .into_iter()
            .map(|s| s.object.id().to_string())
            .collect();
        let snapshots: HashSet<String> = self
            .store
            .list::<VolumeSnapshot>(&all)
            .into_iter()
            .map(|s| s.object.id().to_string())
            .collect();
        // Volumes first: an orphan volume may be a clone of an orphan snapshot.
        for id in inventory.volumes.iter().filter(|id| !volumes.contains(*id)) {
            match self.backend.delete_volume(id).await {
                Ok(()) => tracing::info!(id = %id, "removed orphan volume"),
                Err(err) => tracing::warn!(id = %id, %err, "cannot remove orphan volume"),
            }
        }
        for id in inventory.snapshots.iter().filter(|id| !snapshots.contains(*id)) {
            match self.backend.delete_snapshot(id).await {
                Ok(()) => tracing::info!(id = %id, "removed orphan volume snapshot"),
                Err(err) => tracing::warn!(id = %id, %err, "cannot remove orphan volume snapshot"),
            }
        }
        Ok(())
    }

    /// Starts `workers` workers per queue, the change feed, and a resync of everything every
    /// `resync` (and right away).
    pub fn start(
        self: &Arc<Self>,
        workers: usize,
        resync: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> Workers {
        if let Some(metrics) = &metrics {
            self.volumes.register_metrics(metrics);
            self.snapshots.register_metrics(metrics);
        }
        // Subscribe before the first resync so that no change falls between the two.
        let changes = self.store.subscribe();
        let feed = tokio::spawn(self.clone().follow(changes));

        let store = self.store.clone();
        self.volumes
            .spawn_resync(resync, move || ids::<VolumeRecord>(&store));
        let store = self.store.clone();
        self.snapshots
            .spawn_resync(resync, move || ids::<VolumeSnapshot>(&store));

        let volume_workers = {
            let reconciler = self.clone();
            let queue = self.volumes.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                queue
                    .run(workers, metrics, move |id: String| {
                        let reconciler = reconciler.clone();
                        async move {
                            let span = tracing::info_span!("volume", id = %id);
                            reconciler.reconcile_volume(&id).instrument(span).await
                        }
                    })
                    .await
            })
        };
        let snapshot_workers = {
            let reconciler = self.clone();
            let queue = self.snapshots.clone();
            tokio::spawn(async move {
                queue
                    .run(workers, metrics, move |id: String| {
                        let reconciler = reconciler.clone();
                        async move {
                            let span = tracing::info_span!("volume_snapshot", id = %id);
                            reconciler.reconcile_snapshot(&id).instrument(span).await
                        }
                    })
                    .await
            })
        };
        Workers {
            volumes: self.volumes.clone(),
            snapshots: self.snapshots.clone(),
            tasks: vec![volume_workers, snapshot_workers],
            feed,
        }
    }

    /// Queues every stored object.
    pub fn resync_all(&self) {
        for id in ids::<VolumeRecord>(&self.store) {
            self.volumes.add(id);
        }
        for id in ids::<VolumeSnapshot>(&self.store) {
            self.snapshots.add(id);
        }
    }

    /// Turns store changes into queued keys until the store goes away.
    async fn follow(self: Arc<Self>, mut changes: tokio::sync::broadcast::Receiver<Change>) {
        loop {
            match changes.recv().await {
                Ok(change) => {
                    if self.wants(&change) {
                        match change.kind {
                            VolumeRecord::KIND => self.volumes.add(change.id),
                            VolumeSnapshot::KIND => self.snapshots.add(change.id),
                            _ => {}
                        }
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "change feed lagged; resyncing everything");
                    self.resync_all();
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// Whether `change` needs a reconcile: not for removals (done) and not for the
    /// reconciler's own status writes (see [`Reconciler::observed`]).
    fn wants(&self, change: &Change) -> bool {
        let key = (change.kind, change.id.clone());
        if change.removed {
            lock(&self.observed).remove(&key);
            return false;
        }
        let current = match change.kind {
            VolumeRecord::KIND => self
                .store
                .get::<VolumeRecord>(&change.id)
                .map(|s| marks(&s.object)),
            VolumeSnapshot::KIND => self
                .store
                .get::<VolumeSnapshot>(&change.id)
                .map(|s| marks(&s.object)),
            _ => return false,
        };
        match current {
            Ok(current) => lock(&self.observed).get(&key) != Some(&current),
            // Gone meanwhile, or unreadable: let the reconcile find out and report.
            Err(_) => true,
        }
    }

    fn observe<T: Object>(&self, object: &T) {
        lock(&self.observed).insert((T::KIND, object.id().to_string()), marks(object));
    }

    fn forget(&self, kind: &'static str, id: &str) {
        let key = (kind, id.to_string());
        lock(&self.observed).remove(&key);
        self.warned.forget(&key);
    }

    /// Brings volume `id` to what its record asks for.
    pub async fn reconcile_volume(&self, id: &str) -> Result<Outcome> {
        let record = match self.store.get::<VolumeRecord>(id) {
            Ok(stored) => stored.object,
            Err(Error::NotFound { .. }) => {
                self.forget(VolumeRecord::KIND, id);
                return Ok(Outcome::Done);
            }
            Err(err) => return Err(err),
        };
        self.observe(&record);
        if record.is_deleting() {
            return self.delete_volume(record).await;
        }
        let generation = record.generation();
        if record.state() == VolumeState::VolumeError && record.failed_generation == generation {
            tracing::debug!(
                failure = record.failure,
                "waiting for a spec change after a permanent failure"
            );
            return Ok(Outcome::Done);
        }

        let source = match self.volume_source(&record) {
            SourceState::Ready(source) => source,
            SourceState::Wait => {
                tracing::debug!("waiting for the source snapshot");
                return Ok(Outcome::RequeueAfter(WAIT));
            }
            SourceState::Gone(reason) => {
                self.fail_volume(&record, "ProvisioningFailed", reason).await?;
                return Ok(Outcome::Done);
            }
        };
        let spec_bytes = record.spec_bytes();
        let plan = VolumePlan {
            id: id.to_string(),
            size_bytes: u64::try_from(spec_bytes).unwrap_or(0),
            source,
            limits: self.limits(&record),
            encryption: (!record.encryption_key.is_empty())
                .then(|| WrappedKey::from_bytes(record.encryption_key.clone())),
        };
        let provisioned = match self.backend.ensure_volume(&plan).await {
            Ok(provisioned) => provisioned,
            Err(BackendError::Permanent(reason)) => {
                self.fail_volume(&record, "ProvisioningFailed", reason).await?;
                return Ok(Outcome::Done);
            }
            Err(BackendError::Transient(reason)) => {
                return Err(self.transient(&record, "Provision", reason).await);
            }
        };
        let mut size = i64::try_from(provisioned.size_bytes).unwrap_or(i64::MAX);
        let mut expand_failure = None;
        let mut retry = None;
        if spec_bytes > size && record.failed_generation != generation {
            match self.backend.expand_volume(id, plan.size_bytes).await {
                Ok(grown) => size = i64::try_from(grown).unwrap_or(i64::MAX),
                Err(BackendError::Permanent(reason)) => expand_failure = Some(reason),
                Err(BackendError::Transient(reason)) => retry = Some(reason),
            }
        }

        let access = to_iri_access(provisioned.access);
        let failure = expand_failure.clone();
        let store = self.store.clone();
        let key = id.to_string();
        let written = blocking(move || {
            store.update::<VolumeRecord>(&key, |r| {
                r.status = Some(VolumeStatus {
                    state: VolumeState::VolumeAvailable as i32,
                    access: Some(access.clone()),
                    resources: Some(VolumeResources { storage_bytes: size }),
                });
                if let Some(reason) = &failure {
                    r.failed_generation = generation;
                    r.failure = reason.clone();
                } else if r.failed_generation != generation {
                    r.failed_generation = 0;
                    r.failure.clear();
                }
                Ok(())
            })
        })
        .await?
        .object;

        let meta = written.metadata.as_ref();
        if record.state() != VolumeState::VolumeAvailable {
            tracing::info!(size, "volume available");
            record_event(
                &self.store,
                meta,
                EventType::Normal,
                "Available",
                "Provision",
                format!(
                    "Volume is available: {size} bytes via {}",
                    access_summary(&written)
                ),
            )
            .await;
            self.wake_dependents_of_volume(&written);
        } else if size > record.status_bytes() {
            tracing::info!(from = record.status_bytes(), to = size, "volume expanded");
            record_event(
                &self.store,
                meta,
                EventType::Normal,
                "Expanded",
                "Expand",
                format!("Volume grew from {} to {size} bytes", record.status_bytes()),
            )
            .await;
        }
        if let Some(reason) = expand_failure {
            tracing::warn!(%reason, "expansion failed permanently");
            record_event(
                &self.store,
                meta,
                EventType::Warning,
                "ExpandFailed",
                "Expand",
                format!("Cannot grow the volume to {spec_bytes} bytes: {reason}"),
            )
            .await;
        }
        if let Some(reason) = retry {
            return Err(self.transient(&written, "Expand", reason).await);
        }
        self.warned.forget(&(VolumeRecord::KIND, id.to_string()));
        Ok(Outcome::Done)
    }

    /// Where the volume's data comes from. Only a volume still waiting to be created needs its
    /// source snapshot; once provisioned, the snapshot may go.
    fn volume_source(&self, record: &VolumeRecord) -> SourceState {
        let data_source = record.spec.as_ref().and_then(|s| s.volume_data_source.as_ref());
        if let Some(image) = data_source.and_then(|d| d.image_data_source.as_ref()) {
            return SourceState::Ready(Source::Image(ImageRef {
                reference: image.image.clone(),
                architecture: image.architecture.clone(),
            }));
        }
        let Some(snapshot_id) = record.source_snapshot() else {
            return SourceState::Ready(Source::Empty);
        };
        if record.state() != VolumeState::VolumePending {
            return SourceState::Ready(Source::Snapshot(snapshot_id.to_string()));
        }
        let snapshot = match self.store.get::<VolumeSnapshot>(snapshot_id) {
            Ok(stored) => stored.object,
            Err(_) => return SourceState::Gone(format!("source snapshot {snapshot_id} no longer exists")),
        };
        match snapshot_state(&snapshot) {
            // Checked at create unless the snapshot was still pending then.
            VolumeSnapshotState::VolumeSnapshotReady if snapshot_size(&snapshot) > record.spec_bytes() => {
                SourceState::Gone(format!(
                    "{} bytes is smaller than source snapshot {snapshot_id} ({} bytes)",
                    record.spec_bytes(),
                    snapshot_size(&snapshot)
                ))
            }
            VolumeSnapshotState::VolumeSnapshotReady => {
                SourceState::Ready(Source::Snapshot(snapshot_id.to_string()))
            }
            VolumeSnapshotState::VolumeSnapshotFailed => {
                SourceState::Gone(format!("source snapshot {snapshot_id} is VOLUME_SNAPSHOT_FAILED"))
            }
            VolumeSnapshotState::VolumeSnapshotPending if is_deleting(&snapshot) => SourceState::Gone(
                format!("source snapshot {snapshot_id} was deleted before it was taken"),
            ),
            VolumeSnapshotState::VolumeSnapshotPending => SourceState::Wait,
        }
    }

    fn limits(&self, record: &VolumeRecord) -> Limits {
        let class = record.spec.as_ref().map_or("", |s| s.class.as_str());
        match self.classes.iter().find(|c| c.name == class) {
            Some(class) => Limits {
                bytes_per_second: u64::try_from(class.tps).unwrap_or(0),
                iops: u64::try_from(class.iops).unwrap_or(0),
            },
            None => {
                // The class was removed from the configuration after the volume was created.
                // Refusing to serve the volume would hurt more than serving it unthrottled.
                tracing::warn!(class, "volume class no longer configured; serving without limits");
                Limits::default()
            }
        }
    }

    /// VOLUME_ERROR for the record's generation, with a Warning event.
    async fn fail_volume(&self, record: &VolumeRecord, reason: &'static str, message: String) -> Result<()> {
        let generation = record.generation();
        tracing::warn!(%message, "volume failed permanently");
        let store = self.store.clone();
        let id = record.id().to_string();
        let failure = message.clone();
        let written = blocking(move || {
            store.update::<VolumeRecord>(&id, |r| {
                let status = r.status.get_or_insert_with(Default::default);
                status.state = VolumeState::VolumeError as i32;
                // Whatever was served is not any more: access would be a lie.
                status.access = None;
                r.failed_generation = generation;
                r.failure = failure.clone();
                Ok(())
            })
        })
        .await?
        .object;
        record_event(
            &self.store,
            written.metadata.as_ref(),
            EventType::Warning,
            reason,
            "Provision",
            message,
        )
        .await;
        self.wake_dependents_of_volume(&written);
        Ok(())
    }

    async fn delete_volume(&self, record: VolumeRecord) -> Result<Outcome> {
        let id = record.id().to_string();
        // Snapshots requested while the volume existed are taken first.
        let pending: Vec<String> = self
            .store
            .list::<VolumeSnapshot>(&ObjectFilter::default())
            .into_iter()
            .filter(|s| {
                snapshot_volume_id(&s.object) == id
                    && !is_deleting(&s.object)
                    && snapshot_state(&s.object) == VolumeSnapshotState::VolumeSnapshotPending
            })
            .map(|s| s.object.id().to_string())
            .collect();
        if !pending.is_empty() {
            tracing::debug!(?pending, "deletion waits for snapshots of the volume");
            for snapshot in pending {
                self.snapshots.add(snapshot);
            }
            return Ok(Outcome::RequeueAfter(WAIT));
        }
        if let Err(err) = self.backend.delete_volume(&id).await {
            return Err(self.transient(&record, "Delete", err.to_string()).await);
        }
        handler::remove_deleted::<VolumeRecord>(&self.store, &id).await?;
        tracing::info!("volume deleted");
        record_event(
            &self.store,
            record.metadata.as_ref(),
            EventType::Normal,
            "Deleted",
            "Delete",
            "Volume deleted".to_string(),
        )
        .await;
        if let Some(snapshot) = record.source_snapshot() {
            self.snapshots.add(snapshot.to_string());
        }
        self.forget(VolumeRecord::KIND, &id);
        Ok(Outcome::Done)
    }

    /// Brings snapshot `id` to what its record asks for.
    pub async fn reconcile_snapshot(&self, id: &str) -> Result<Outcome> {
        let snapshot = match self.store.get::<VolumeSnapshot>(id) {
            Ok(stored) => stored.object,
            Err(Error::NotFound { .. }) => {
                self.forget(VolumeSnapshot::KIND, id);
                return Ok(Outcome::Done);
            }
            Err(err) => return Err(err),
        };
        self.observe(&snapshot);
        if is_deleting(&snapshot) {
            return self.delete_snapshot(snapshot).await;
        }
        if snapshot_state(&snapshot) != VolumeSnapshotState::VolumeSnapshotPending {
            return Ok(Outcome::Done);
        }
        let volume_id = snapshot_volume_id(&snapshot).to_string();
        let volume = match self.store.get::<VolumeRecord>(&volume_id) {
            Ok(stored) => stored.object,
            Err(Error::NotFound { .. }) => {
                self.fail_snapshot(&snapshot, format!("source volume {volume_id} no longer exists"))
                    .await?;
                return Ok(Outcome::Done);
            }
            Err(err) => return Err(err),
        };
        match volume.state() {
            // Also while the volume is being deleted: its deletion waits for this snapshot.
            VolumeState::VolumeAvailable => {}
            VolumeState::VolumeError => {
                self.fail_snapshot(&snapshot, format!("source volume {volume_id} is VOLUME_ERROR"))
                    .await?;
                return Ok(Outcome::Done);
            }
            VolumeState::VolumePending if volume.is_deleting() => {
                let reason = format!("source volume {volume_id} was deleted before it became available");
                self.fail_snapshot(&snapshot, reason).await?;
                return Ok(Outcome::Done);
            }
            VolumeState::VolumePending => {
                tracing::debug!(volume = %volume_id, "waiting for the volume to become available");
                return Ok(Outcome::RequeueAfter(WAIT));
            }
        }

        let size = match self.backend.create_snapshot(id, &volume_id).await {
            Ok(size) => i64::try_from(size).unwrap_or(i64::MAX),
            Err(BackendError::Permanent(reason)) => {
                self.fail_snapshot(&snapshot, reason).await?;
                return Ok(Outcome::Done);
            }
            Err(BackendError::Transient(reason)) => {
                return Err(self.transient(&snapshot, "Snapshot", reason).await);
            }
        };
        let written = self
            .write_snapshot_status(id, VolumeSnapshotState::VolumeSnapshotReady, size)
            .await?;
        tracing::info!(size, volume = %volume_id, "volume snapshot ready");
        record_event(
            &self.store,
            written.metadata.as_ref(),
            EventType::Normal,
            "Ready",
            "Snapshot",
            format!("Snapshot of volume {volume_id} is ready: {size} bytes"),
        )
        .await;
        self.wake_dependents_of_snapshot(&written);
        self.warned.forget(&(VolumeSnapshot::KIND, id.to_string()));
        Ok(Outcome::Done)
    }

    async fn write_snapshot_status(
        &self,
        id: &str,
        state: VolumeSnapshotState,
        size: i64,
    ) -> Result<VolumeSnapshot> {
        let store = self.store.clone();
        let id = id.to_string();
        Ok(blocking(move || {
            store.update::<VolumeSnapshot>(&id, |s| {
                s.status = Some(VolumeSnapshotStatus {
                    state: state as i32,
                    size,
                });
                Ok(())
            })
        })
        .await?
        .object)
    }

    /// VOLUME_SNAPSHOT_FAILED (terminal), with a Warning event.
    async fn fail_snapshot(&self, snapshot: &VolumeSnapshot, message: String) -> Result<()> {
        tracing::warn!(%message, "volume snapshot failed");
        let written = self
            .write_snapshot_status(snapshot.id(), VolumeSnapshotState::VolumeSnapshotFailed, 0)
            .await?;
        record_event(
            &self.store,
            written.metadata.as_ref(),
            EventType::Warning,
            "SnapshotFailed",
            "Snapshot",
            message,
        )
        .await;
        self.wake_dependents_of_snapshot(&written);
        Ok(())
    }

    async fn delete_snapshot(&self, snapshot: VolumeSnapshot) -> Result<Outcome> {
        let id = snapshot.id().to_string();
        // Volumes restored from it that are still to be created need it.
        let waiting: Vec<String> = self
            .store
            .list::<VolumeRecord>(&ObjectFilter::default())
            .into_iter()
            .filter(|v| v.object.source_snapshot() == Some(id.as_str()) && v.object.awaits_provisioning())
            .map(|v| v.object.id().to_string())
            .collect();
        if !waiting.is_empty() {
            tracing::debug!(?waiting, "deletion waits for volumes restored from the snapshot");
            for volume in waiting {
                self.volumes.add(volume);
            }
            return Ok(Outcome::RequeueAfter(WAIT));
        }
        if let Err(err) = self.backend.delete_snapshot(&id).await {
            return Err(self.transient(&snapshot, "Delete", err.to_string()).await);
        }
        handler::remove_deleted::<VolumeSnapshot>(&self.store, &id).await?;
        tracing::info!("volume snapshot deleted");
        record_event(
            &self.store,
            snapshot.metadata.as_ref(),
            EventType::Normal,
            "Deleted",
            "Delete",
            "Volume snapshot deleted".to_string(),
        )
        .await;
        self.volumes.add(snapshot_volume_id(&snapshot).to_string());
        self.forget(VolumeSnapshot::KIND, &id);
        Ok(Outcome::Done)
    }

    /// A volume changed state: snapshots waiting for it (to be taken, or for its restore to
    /// finish before they may go) look again.
    fn wake_dependents_of_volume(&self, volume: &VolumeRecord) {
        let id = volume.id();
        for snapshot in self.store.list::<VolumeSnapshot>(&ObjectFilter::default()) {
            if snapshot_volume_id(&snapshot.object) == id {
                self.snapshots.add(snapshot.object.id().to_string());
            }
        }
        if let Some(source) = volume.source_snapshot() {
            self.snapshots.add(source.to_string());
        }
    }

    /// A snapshot changed state: its volume (whose deletion may wait for it) and volumes to be
    /// restored from it look again.
    fn wake_dependents_of_snapshot(&self, snapshot: &VolumeSnapshot) {
        let id = snapshot.id();
        self.volumes.add(snapshot_volume_id(snapshot).to_string());
        for volume in self.store.list::<VolumeRecord>(&ObjectFilter::default()) {
            if volume.object.source_snapshot() == Some(id) {
                self.volumes.add(volume.object.id().to_string());
            }
        }
    }

    /// Reports a transient failure (a Warning event, rate-limited) and returns the error that
    /// makes the queue retry with backoff.
    async fn transient<T: Object>(&self, object: &T, action: &'static str, reason: String) -> Error {
        if self.warned.admit((T::KIND, object.id().to_string()), &reason) {
            record_event(
                &self.store,
                object.metadata(),
                EventType::Warning,
                "BackendUnavailable",
                action,
                format!("{action} failed, retrying: {reason}"),
            )
            .await;
        }
        Error::Unavailable(format!("{action}: {reason}"))
    }
}

/// `(generation, deleted_at)`: what moves when a client changes an object.
fn marks<T: Object>(object: &T) -> (i64, i64) {
    object.metadata().map_or((0, 0), |m| (m.generation, m.deleted_at))
}

/// The ids of all stored objects of one kind.
fn ids<T: Object>(store: &Store) -> Vec<String> {
    store
        .list::<T>(&ObjectFilter::default())
        .into_iter()
        .map(|s| s.object.id().to_string())
        .collect()
}

/// How the volume is reached, for event messages: the driver and a non-secret attribute.
fn access_summary(record: &VolumeRecord) -> String {
    let Some(access) = record.status.as_ref().and_then(|s| s.access.as_ref()) else {
        return "no access".to_string();
    };
    match access.attributes.get("uri") {
        Some(uri) => format!("{} {uri}", access.driver),
        None => access.driver.clone(),
    }
}

/// A scripted in-memory [`Backend`] for unit tests of the server and the reconciler.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::backend::{Inventory, Provisioned};

    /// Sizes are rounded up to this, like a backend with a granularity.
    pub(crate) const GRANULE: u64 = 1 << 20;

    /// What the fake holds and how it misbehaves.
    #[derive(Debug, Default)]
    pub(crate) struct FakeState {
        pub volumes: BTreeMap<String, u64>,
        pub snapshots: BTreeMap<String, u64>,
        pub free: u64,
        /// Next failures of `ensure_volume` / `expand_volume` / `create_snapshot` /
        /// `delete_volume`: `(permanent, message)`, consumed one per call.
        pub ensure_failures: Vec<(bool, String)>,
        pub expand_failures: Vec<(bool, String)>,
        pub snapshot_failures: Vec<(bool, String)>,
        pub delete_failures: Vec<(bool, String)>,
        /// Every call, e.g. `ensure <id>`.
        pub calls: Vec<String>,
    }

    #[derive(Debug, Default)]
    pub(crate) struct FakeBackend {
        pub state: Mutex<FakeState>,
    }

    impl FakeBackend {
        pub(crate) fn with_free(free: u64) -> Arc<Self> {
            let fake = FakeBackend::default();
            lock(&fake.state).free = free;
            Arc::new(fake)
        }

        pub(crate) fn state(&self) -> MutexGuard<'_, FakeState> {
            lock(&self.state)
        }

        pub(crate) fn calls(&self, prefix: &str) -> usize {
            self.state()
                .calls
                .iter()
                .filter(|c| c.starts_with(prefix))
                .count()
        }
    }

    fn fail(failures: &mut Vec<(bool, String)>) -> BackendResult<()> {
        if failures.is_empty() {
            return Ok(());
        }
        let (permanent, message) = failures.remove(0);
        Err(if permanent {
            BackendError::Permanent(message)
        } else {
            BackendError::Transient(message)
        })
    }

    fn round(size: u64) -> u64 {
        size.div_ceil(GRANULE) * GRANULE
    }

    fn access(id: &str) -> Access {
        Access {
            driver: "nbd".into(),
            handle: id.into(),
            attributes: BTreeMap::from([("uri".into(), format!("nbd+unix:///{id}?socket=/fake"))]),
            secret_data: BTreeMap::new(),
        }
    }

    use crate::backend::BackendResult;

    #[async_trait::async_trait]
    impl Backend for FakeBackend {
        async fn ensure_volume(&self, plan: &VolumePlan) -> BackendResult<Provisioned> {
            let mut state = self.state();
            state.calls.push(format!("ensure {}", plan.id));
            fail(&mut state.ensure_failures)?;
            if let Some(size) = state.volumes.get(&plan.id) {
                return Ok(Provisioned {
                    size_bytes: *size,
                    access: access(&plan.id),
                });
            }
            if let Source::Snapshot(snapshot) = &plan.source
                && !state.snapshots.contains_key(snapshot)
            {
                return Err(BackendError::Permanent(format!("snapshot {snapshot} is gone")));
            }
            let size = round(plan.size_bytes);
            state.volumes.insert(plan.id.clone(), size);
            Ok(Provisioned {
                size_bytes: size,
                access: access(&plan.id),
            })
        }

        async fn delete_volume(&self, id: &str) -> BackendResult<()> {
            let mut state = self.state();
            state.calls.push(format!("delete {id}"));
            fail(&mut state.delete_failures)?;
            state.volumes.remove(id);
            Ok(())
        }

        async fn expand_volume(&self, id: &str, size_bytes: u64) -> BackendResult<u64> {
            let mut state = self.state();
            state.calls.push(format!("expand {id}"));
            fail(&mut state.expand_failures)?;
            let size = state
                .volumes
                .get_mut(id)
                .ok_or_else(|| BackendError::Permanent(format!("volume {id} is gone")))?;
            *size = (*size).max(round(size_bytes));
            Ok(*size)
        }

        async fn create_snapshot(&self, snapshot_id: &str, volume_id: &str) -> BackendResult<u64> {
            let mut state = self.state();
            state.calls.push(format!("snapshot {snapshot_id}"));
            fail(&mut state.snapshot_failures)?;
            if let Some(size) = state.snapshots.get(snapshot_id) {
                return Ok(*size);
            }
            let size = *state
                .volumes
                .get(volume_id)
                .ok_or_else(|| BackendError::Permanent(format!("volume {volume_id} is gone")))?;
            state.snapshots.insert(snapshot_id.to_string(), size);
            Ok(size)
        }

        async fn delete_snapshot(&self, snapshot_id: &str) -> BackendResult<()> {
            let mut state = self.state();
            state.calls.push(format!("delete-snapshot {snapshot_id}"));
            state.snapshots.remove(snapshot_id);
            Ok(())
        }

        async fn available_bytes(&self) -> BackendResult<u64> {
            Ok(self.state().free)
        }

        async fn inventory(&self) -> BackendResult<Inventory> {
            let state = self.state();
            Ok(Inventory {
                volumes: state.volumes.keys().cloned().collect(),
                snapshots: state.snapshots.keys().cloned().collect(),
            })
        }
    }

    /// The set of volume ids the fake holds.
    pub(crate) fn volume_ids(fake: &FakeBackend) -> BTreeSet<String> {
        fake.state().volumes.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Instant};

    use iri_api::{
        meta::v1alpha1::ObjectMetadata,
        volume::v1alpha1::{SnapshotDataSource, VolumeDataSource, VolumeSnapshotSpec, VolumeSpec},
    };
    use iri_runtime::{EventFilter, StoreOptions};

    use super::fake::{FakeBackend, GRANULE, volume_ids};
    use super::*;
    use crate::config::Config;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        fake: Arc<FakeBackend>,
        reconciler: Arc<Reconciler>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.db"), StoreOptions::default()).unwrap();
        let fake = FakeBackend::with_free(100 << 30);
        let reconciler = Reconciler::new(store.clone(), fake.clone(), Config::default().classes);
        Fixture {
            _dir: dir,
            store,
            fake,
            reconciler,
        }
    }

    fn volume(size: i64, snapshot: Option<&str>) -> VolumeRecord {
        VolumeRecord {
            metadata: Some(ObjectMetadata {
                labels: BTreeMap::from([("app".into(), "test".into())]),
                ..Default::default()
            }),
            spec: Some(VolumeSpec {
                class: "fast".into(),
                resources: Some(VolumeResources { storage_bytes: size }),
                encryption: None,
                volume_data_source: snapshot.map(|s| VolumeDataSource {
                    image_data_source: None,
                    snapshot_data_source: Some(SnapshotDataSource {
                        snapshot_id: s.to_string(),
                    }),
                }),
            }),
            status: Some(VolumeStatus::default()),
            ..Default::default()
        }
    }

    fn snapshot_of(volume_id: &str) -> VolumeSnapshot {
        VolumeSnapshot {
            metadata: Some(ObjectMetadata::default()),
            spec: Some(VolumeSnapshotSpec {
                volume_id: volume_id.to_string(),
            }),
            status: Some(VolumeSnapshotStatus::default()),
        }
    }

    impl Fixture {
        fn create(&self, record: VolumeRecord) -> String {
            self.store.create(record).unwrap().object.id().to_string()
        }
        fn create_snapshot(&self, volume_id: &str) -> String {
            self.store
                .create(snapshot_of(volume_id))
                .unwrap()
                .object
                .id()
                .to_string()
        }
        fn volume(&self, id: &str) -> VolumeRecord {
            self.store.get::<VolumeRecord>(id).unwrap().object
        }
        fn snapshot(&self, id: &str) -> VolumeSnapshot {
            self.store.get::<VolumeSnapshot>(id).unwrap().object
        }
        fn reasons(&self, id: &str) -> Vec<String> {
            self.store
                .list_events(&EventFilter {
                    id: id.to_string(),
                    ..Default::default()
                })
                .unwrap()
                .into_iter()
                .filter_map(|e| e.spec.map(|s| format!("{}:{}", s.r#type, s.reason)))
                .collect()
        }
    }

    #[tokio::test]
    async fn provisions_with_the_real_size_and_access() {
        let f = fixture();
        let id = f.create(volume(3 * GRANULE as i64 + 1, None));
        assert_eq!(f.reconciler.reconcile_volume(&id).await.unwrap(), Outcome::Done);
        let v = f.volume(&id);
        assert_eq!(v.state(), VolumeState::VolumeAvailable);
        assert_eq!(v.status_bytes(), 4 * GRANULE as i64, "the backend's rounded size");
        let access = v.status.as_ref().unwrap().access.as_ref().unwrap();
        assert_eq!(access.driver, "nbd");
        assert_eq!(f.reasons(&id), ["Normal:Available"]);
        // A second pass writes nothing and records nothing.
        let revision = f.store.revision();
        f.reconciler.reconcile_volume(&id).await.unwrap();
        assert_eq!(f.store.revision(), revision);
        assert_eq!(f.reasons(&id).len(), 1);
    }

    #[tokio::test]
    async fn expands_an_available_volume() {
        let f = fixture();
        let id = f.create(volume(GRANULE as i64, None));
        f.reconciler.reconcile_volume(&id).await.unwrap();
        f.store
            .update::<VolumeRecord>(&id, |r| {
                r.spec.as_mut().unwrap().resources.as_mut().unwrap().storage_bytes = 3 * GRANULE as i64;
                Ok(())
            })
            .unwrap();
        f.reconciler.reconcile_volume(&id).await.unwrap();
        let v = f.volume(&id);
        assert_eq!(v.status_bytes(), 3 * GRANULE as i64);
        assert_eq!(v.state(), VolumeState::VolumeAvailable);
        assert_eq!(f.reasons(&id), ["Normal:Available", "Normal:Expanded"]);
    }

    #[tokio::test]
    async fn permanent_failure_is_an_error_until_the_spec_changes() {
        let f = fixture();
        f.fake.state().ensure_failures.push((true, "disk on fire".into()));
        let id = f.create(volume(GRANULE as i64, None));
        f.reconciler.reconcile_volume(&id).await.unwrap();
        let v = f.volume(&id);
        assert_eq!(v.state(), VolumeState::VolumeError);
        assert_eq!(v.failed_generation, 1);
        assert_eq!(f.reasons(&id), ["Warning:ProvisioningFailed"]);
        // Resyncs leave it alone.
        f.reconciler.reconcile_volume(&id).await.unwrap();
        assert_eq!(f.fake.calls("ensure"), 1);
        // A spec change (ExpandVolume) is a new attempt.
        f.store
            .update::<VolumeRecord>(&id, |r| {
                r.spec.as_mut().unwrap().resources.as_mut().unwrap().storage_bytes = 2 * GRANULE as i64;
                Ok(())
            })
            .unwrap();
        f.reconciler.reconcile_volume(&id).await.unwrap();
        let v = f.volume(&id);
        assert_eq!(v.state(), VolumeState::VolumeAvailable);
        assert_eq!((v.failed_generation, v.failure.as_str()), (0, ""));
        assert_eq!(v.status_bytes(), 2 * GRANULE as i64);
    }

    #[tokio::test]
    async fn permanent_expand_failure_keeps_the_volume_available() {
        let f = fixture();
        let id = f.create(volume(GRANULE as i64, None));
        f.reconciler.reconcile_volume(&id).await.unwrap();
        f.fake.state().expand_failures.push((true, "too big".into()));
        f.store
            .update::<VolumeRecord>(&id, |r| {
                r.spec.as_mut().unwrap().resources.as_mut().unwrap().storage_bytes = 9 * GRANULE as i64;
                Ok(())
            })
            .unwrap();
        f.reconciler.reconcile_volume(&id).await.unwrap();
        let v = f.volume(&id);
        assert_eq!(v.state(), VolumeState::VolumeAvailable);
        assert_eq!(v.status_bytes(), GRANULE as i64);
        assert_eq!(v.failed_generation, 2);
        f.reconciler.reconcile_volume(&id).await.unwrap();
        assert_eq!(f.fake.calls("expand"), 1, "not retried until the spec changes");
        assert_eq!(f.reasons(&id), ["Normal:Available", "Warning:ExpandFailed"]);
    }

    #[tokio::test]
    async fn transient_failures_are_retried_and_reported_once() {
        let f = fixture();
        for _ in 0..3 {
            f.fake
                .state()
                .ensure_failures
                .push((false, "daemon restarting".into()));
        }
        let id = f.create(volume(GRANULE as i64, None));
        for _ in 0..3 {
            let err = f.reconciler.reconcile_volume(&id).await.unwrap_err();
            assert!(err.to_string().contains("daemon restarting"), "{err}");
        }
        assert_eq!(f.volume(&id).state(), VolumeState::VolumePending);
        f.reconciler.reconcile_volume(&id).await.unwrap();
        assert_eq!(f.volume(&id).state(), VolumeState::VolumeAvailable);
        assert_eq!(f.reasons(&id), ["Warning:BackendUnavailable", "Normal:Available"]);
    }

    #[tokio::test]
    async fn deletion_releases_the_backend_before_the_record() {
        let f = fixture();
        let id = f.create(volume(GRANULE as i64, None));
        f.reconciler.reconcile_volume(&id).await.unwrap();
        f.store.mark_deleted::<VolumeRecord>(&id).unwrap();
        f.fake.state().delete_failures.push((false, "busy".into()));
        assert!(f.reconciler.reconcile_volume(&id).await.is_err());
        assert!(
            f.store.get::<VolumeRecord>(&id).is_ok(),
            "kept while the backend holds it"
        );
        f.reconciler.reconcile_volume(&id).await.unwrap();
        assert!(f.store.get::<VolumeRecord>(&id).unwrap_err().is_not_found());
        assert!(volume_ids(&f.fake).is_empty());
        let reasons = f.reasons(&id);
        assert_eq!(
            reasons.last().map(String::as_str),
            Some("Normal:Deleted"),
            "{reasons:?}"
        );
    }

    #[tokio::test]
    async fn a_snapshot_requested_before_deletion_is_taken_first() {
        let f = fixture();
        let volume_id = f.create(volume(GRANULE as i64, None));
        f.reconciler.reconcile_volume(&volume_id).await.unwrap();
        let snap = f.create_snapshot(&volume_id);
        f.store.mark_deleted::<VolumeRecord>(&volume_id).unwrap();
        assert_eq!(
            f.reconciler.reconcile_volume(&volume_id).await.unwrap(),
            Outcome::RequeueAfter(WAIT)
        );
        assert!(volume_ids(&f.fake).contains(&volume_id));
        f.reconciler.reconcile_snapshot(&snap).await.unwrap();
        let s = f.snapshot(&snap);
        assert_eq!(snapshot_state(&s), VolumeSnapshotState::VolumeSnapshotReady);
        assert_eq!(s.status.unwrap().size, GRANULE as i64);
        assert_eq!(
            f.reconciler.reconcile_volume(&volume_id).await.unwrap(),
            Outcome::Done
        );
        assert!(volume_ids(&f.fake).is_empty());
        // The snapshot outlives its volume and still seeds new ones.
        let restored = f.create(volume(GRANULE as i64, Some(&snap)));
        f.reconciler.reconcile_volume(&restored).await.unwrap();
        assert_eq!(f.volume(&restored).state(), VolumeState::VolumeAvailable);
    }

    #[tokio::test]
    async fn a_snapshot_of_a_volume_deleted_while_pending_fails_instead_of_waiting() {
        let f = fixture();
        let volume_id = f.create(volume(GRANULE as i64, None));
        let snap = f.create_snapshot(&volume_id);
        assert_eq!(
            f.reconciler.reconcile_snapshot(&snap).await.unwrap(),
            Outcome::RequeueAfter(WAIT),
            "waits for the volume"
        );
        f.store.mark_deleted::<VolumeRecord>(&volume_id).unwrap();
        f.reconciler.reconcile_snapshot(&snap).await.unwrap();
        assert_eq!(
            snapshot_state(&f.snapshot(&snap)),
            VolumeSnapshotState::VolumeSnapshotFailed
        );
        assert_eq!(f.reasons(&snap), ["Warning:SnapshotFailed"]);
        assert_eq!(
            f.reconciler.reconcile_volume(&volume_id).await.unwrap(),
            Outcome::Done
        );
    }

    #[tokio::test]
    async fn a_snapshot_deleted_before_it_was_taken_fails_its_pending_restore() {
        let f = fixture();
        let volume_id = f.create(volume(GRANULE as i64, None));
        f.reconciler.reconcile_volume(&volume_id).await.unwrap();
        let snap = f.create_snapshot(&volume_id);
        let restored = f.create(volume(GRANULE as i64, Some(&snap)));
        assert_eq!(
            f.reconciler.reconcile_volume(&restored).await.unwrap(),
            Outcome::RequeueAfter(WAIT),
            "waits for the snapshot"
        );
        f.store.mark_deleted::<VolumeSnapshot>(&snap).unwrap();
        // A snapshot deleted before it was taken is never taken; the restore cannot happen.
        assert_eq!(
            f.reconciler.reconcile_snapshot(&snap).await.unwrap(),
            Outcome::RequeueAfter(WAIT),
            "the restore still waits"
        );
        f.reconciler.reconcile_volume(&restored).await.unwrap();
        assert_eq!(f.volume(&restored).state(), VolumeState::VolumeError);
        f.reconciler.reconcile_snapshot(&snap).await.unwrap();
        assert!(f.store.get::<VolumeSnapshot>(&snap).unwrap_err().is_not_found());
    }

    #[tokio::test]
    async fn a_restore_smaller_than_its_snapshot_fails() {
        let f = fixture();
        let volume_id = f.create(volume(4 * GRANULE as i64, None));
        f.reconciler.reconcile_volume(&volume_id).await.unwrap();
        let snap = f.create_snapshot(&volume_id);
        // Accepted while the snapshot's size was unknown.
        let restored = f.create(volume(GRANULE as i64, Some(&snap)));
        f.reconciler.reconcile_snapshot(&snap).await.unwrap();
        f.reconciler.reconcile_volume(&restored).await.unwrap();
        let v = f.volume(&restored);
        assert_eq!(v.state(), VolumeState::VolumeError);
        assert!(
            v.failure.contains("smaller than source snapshot"),
            "{}",
            v.failure
        );
        assert_eq!(f.fake.calls(&format!("ensure {restored}")), 0);
    }

    #[tokio::test]
    async fn snapshot_deletion_waits_for_a_pending_restore() {
        let f = fixture();
        let volume_id = f.create(volume(GRANULE as i64, None));
        f.reconciler.reconcile_volume(&volume_id).await.unwrap();
        let snap = f.create_snapshot(&volume_id);
        f.reconciler.reconcile_snapshot(&snap).await.unwrap();
        let restored = f.create(volume(GRANULE as i64, Some(&snap)));
        f.store.mark_deleted::<VolumeSnapshot>(&snap).unwrap();
        assert_eq!(
            f.reconciler.reconcile_snapshot(&snap).await.unwrap(),
            Outcome::RequeueAfter(WAIT)
        );
        f.reconciler.reconcile_volume(&restored).await.unwrap();
        assert_eq!(f.volume(&restored).state(), VolumeState::VolumeAvailable);
        f.reconciler.reconcile_snapshot(&snap).await.unwrap();
        assert!(f.store.get::<VolumeSnapshot>(&snap).unwrap_err().is_not_found());
        assert!(f.fake.state().snapshots.is_empty());
    }

    #[tokio::test]
    async fn orphans_are_removed_and_referenced_objects_kept() {
        let f = fixture();
        let id = f.create(volume(GRANULE as i64, None));
        f.reconciler.reconcile_volume(&id).await.unwrap();
        {
            let mut state = f.fake.state();
            state.volumes.insert("orphan".into(), GRANULE);
            state.snapshots.insert("orphan-snapshot".into(), GRANULE);
        }
        f.reconciler.remove_orphans().await.unwrap();
        assert_eq!(volume_ids(&f.fake), [id].into_iter().collect());
        assert!(f.fake.state().snapshots.is_empty());
    }

    #[tokio::test]
    async fn workers_converge_from_the_change_feed_without_extra_passes() {
        let f = fixture();
        let workers = f.reconciler.start(2, Duration::from_secs(3600), None);
        // Let the start-up resync (of nothing) pass, so that it cannot add a second pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let id = f.create(volume(GRANULE as i64, None));
        let deadline = Instant::now() + Duration::from_secs(5);
        while f.volume(&id).state() != VolumeState::VolumeAvailable {
            assert!(Instant::now() < deadline, "not available in time");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            f.fake.calls("ensure"),
            1,
            "the reconciler's own status write must not trigger another pass"
        );
        f.store.mark_deleted::<VolumeRecord>(&id).unwrap();
        while f.store.get::<VolumeRecord>(&id).is_ok() {
            assert!(Instant::now() < deadline, "not deleted in time");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        workers.shut_down(Duration::from_secs(5)).await;
    }
}
