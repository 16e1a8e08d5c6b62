// SPDX-License-Identifier: Apache-2.0
//! The reconciler: workers that make the backend hold what the store asks for and write what
//! the backend reports back as status.
//!
//! One keyed queue of bucket ids, fed by the store's change feed and a periodic resync of
//! everything (which repairs drift: a bucket directory someone removed is recreated with new
//! credentials, and the status says so). A pending bucket becomes AVAILABLE once the backend
//! has created it and its key pair; the access written to the status is the backend's, read on
//! every pass, so it never lies (e.g. a changed endpoint after a restart on another port).
//! A bucket being deleted has its credentials revoked and its data removed before its record
//! goes. Transient failures are retried with backoff and reported as Warning events at most
//! once per [`WARNING_INTERVAL`] per bucket and message.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use iri_api::bucket::v1alpha1::{Bucket, BucketAccess, BucketState, BucketStatus};
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
    backend::{Backend, BackendError, BucketPlan, Limits},
    config::BucketClass,
    record::{class, state},
};

/// The same transient failure of one bucket is reported as an event at most this often.
pub const WARNING_INTERVAL: Duration = Duration::from_secs(300);

/// Buckets, reconciled.
pub struct Reconciler {
    store: Store,
    backend: Arc<dyn Backend>,
    classes: Vec<BucketClass>,
    queue: ReconcileQueue<String>,
    /// `(generation, deleted_at)` of each bucket when a reconcile last picked it up: a change
    /// that leaves these as they were is the reconciler's own status write.
    observed: Mutex<HashMap<String, (i64, i64)>>,
    /// Holds back a Warning about a transient failure repeated per bucket.
    warned: WarningGate<String>,
}

/// The running workers, change feed and resync; [`Workers::shut_down`] stops them.
pub struct Workers {
    queue: ReconcileQueue<String>,
    task: JoinHandle<()>,
    feed: JoinHandle<()>,
}

impl Workers {
    /// Stops handing out work and lets workers finish the bucket they are on (at most `grace`).
    pub async fn shut_down(self, grace: Duration) {
        self.queue.shut_down();
        self.feed.abort();
        if tokio::time::timeout(grace, self.task).await.is_err() {
            tracing::warn!(?grace, "reconcile workers did not finish in time");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps are caches of hints; a panic elsewhere cannot leave them inconsistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn marks(bucket: &Bucket) -> (i64, i64) {
    bucket
        .metadata
        .as_ref()
        .map_or((0, 0), |m| (m.generation, m.deleted_at))
}

fn ids(store: &Store) -> Vec<String> {
    store
        .list::<Bucket>(&ObjectFilter::default())
        .into_iter()
        .map(|s| s.object.id().to_string())
        .collect()
}

impl Reconciler {
    /// A reconciler over `store` and `backend`; `classes` give each bucket's limits.
    pub fn new(store: Store, backend: Arc<dyn Backend>, classes: Vec<BucketClass>) -> Arc<Self> {
        Arc::new(Reconciler {
            store,
            backend,
            classes,
            queue: ReconcileQueue::new(QueueOptions::named("bucket")),
            observed: Mutex::new(HashMap::new()),
            warned: WarningGate::new(WARNING_INTERVAL),
        })
    }

    /// Removes buckets the backend holds but no record references: leftovers of a crash or
    /// of a store restored from a backup. Run it before the workers start.
    ///
    /// The inventory is taken before the store is read: a record always exists before its
    /// bucket (the RPC writes it first) and is removed only after it, so a bucket the later
    /// store read does not know is an orphan.
    pub async fn remove_orphans(&self) -> Result<()> {
        let inventory = self
            .backend
            .inventory()
            .await
            .map_err(|e| Error::Unavailable(format!("backend inventory: {e}")))?;
        let known: HashSet<String> = ids(&self.store).into_iter().collect();
        for id in inventory.iter().filter(|id| !known.contains(*id)) {
            match self.backend.delete_bucket(id).await {
                Ok(()) => tracing::info!(id = %id, "removed orphan bucket"),
                Err(err) => tracing::warn!(id = %id, %err, "cannot remove orphan bucket"),
            }
        }
        Ok(())
    }

    /// Starts `workers` workers, the change feed, and a resync of everything every `resync`
    /// (and right away).
    pub fn start(
        self: &Arc<Self>,
        workers: usize,
        resync: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> Workers {
        if let Some(metrics) = &metrics {
            self.queue.register_metrics(metrics);
        }
        // Subscribe before the first resync so that no change falls between the two.
        let changes = self.store.subscribe();
        let feed = tokio::spawn(self.clone().follow(changes));
        let store = self.store.clone();
        self.queue.spawn_resync(resync, move || ids(&store));
        let reconciler = self.clone();
        let queue = self.queue.clone();
        let task = tokio::spawn(async move {
            queue
                .run(workers, metrics, move |id: String| {
                    let reconciler = reconciler.clone();
                    async move {
                        let span = tracing::info_span!("bucket", id = %id);
                        reconciler.reconcile(&id).instrument(span).await
                    }
                })
                .await
        });
        Workers {
            queue: self.queue.clone(),
            task,
            feed,
        }
    }

    async fn follow(self: Arc<Self>, mut changes: tokio::sync::broadcast::Receiver<Change>) {
        loop {
            match changes.recv().await {
                Ok(change) => {
                    if change.kind == Bucket::KIND && self.wants(&change) {
                        self.queue.add(change.id);
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "change feed lagged; resyncing everything");
                    for id in ids(&self.store) {
                        self.queue.add(id);
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    fn wants(&self, change: &Change) -> bool {
        if change.removed {
            lock(&self.observed).remove(&change.id);
            return false;
        }
        match self.store.get::<Bucket>(&change.id) {
            Ok(current) => lock(&self.observed).get(&change.id) != Some(&marks(&current.object)),
            Err(_) => true,
        }
    }

    fn forget(&self, id: &str) {
        lock(&self.observed).remove(id);
        self.warned.forget(id);
    }

    fn limits(&self, bucket: &Bucket) -> Limits {
        let name = class(bucket);
        match self.classes.iter().find(|c| c.name == name) {
            Some(class) => Limits {
                tps: u64::try_from(class.tps).unwrap_or(0),
                iops: u64::try_from(class.iops).unwrap_or(0),
            },
            None => {
                // The class was removed from the configuration after the bucket was created.
                // Refusing to serve the bucket would hurt more than serving it unlimited.
                tracing::warn!(
                    class = name,
                    "bucket class no longer configured; serving without limits"
                );
                Limits::default()
            }
        }
    }

    /// Brings bucket `id` to what its record asks for.
    pub async fn reconcile(&self, id: &str) -> Result<Outcome> {
        let bucket = match self.store.get::<Bucket>(id) {
            Ok(stored) => stored.object,
            Err(Error::NotFound { .. }) => {
                self.forget(id);
                return Ok(Outcome::Done);
            }
            Err(err) => return Err(err),
        };
        lock(&self.observed).insert(id.to_string(), marks(&bucket));
        if is_deleting(&bucket) {
            return self.delete(bucket).await;
        }
        let plan = BucketPlan {
            id: id.to_string(),
            limits: self.limits(&bucket),
        };
        let access = match self.backend.ensure_bucket(&plan).await {
            Ok(access) => access,
            Err(BackendError::Permanent(reason)) => {
                self.fail(&bucket, reason).await?;
                return Ok(Outcome::Done);
            }
            Err(BackendError::Transient(reason)) => {
                return Err(self.transient(&bucket, "Provision", reason).await);
            }
        };
        let status = BucketStatus {
            state: BucketState::BucketAvailable as i32,
            access: Some(BucketAccess {
                endpoint: access.endpoint.clone(),
                secret_data: access.secret_data.clone(),
            }),
        };
        let before = bucket.status.clone();
        if before.as_ref() != Some(&status) {
            let store = self.store.clone();
            let key = id.to_string();
            let written = blocking(move || {
                store.update::<Bucket>(&key, |b| {
                    b.status = Some(status.clone());
                    Ok(())
                })
            })
            .await?
            .object;
            let meta = written.metadata.as_ref();
            if state(&bucket) != BucketState::BucketAvailable {
                tracing::info!(endpoint = %access.endpoint, "bucket available");
                record_event(
                    &self.store,
                    meta,
                    EventType::Normal,
                    "Available",
                    "Provision",
                    format!(
                        "Bucket is available at {} with its own credentials",
                        access.endpoint
                    ),
                )
                .await;
            } else {
                // The endpoint moved or the backend had to recreate the bucket.
                tracing::warn!(endpoint = %access.endpoint, "bucket access changed");
                record_event(
                    &self.store,
                    meta,
                    EventType::Warning,
                    "AccessChanged",
                    "Provision",
                    format!("Bucket access changed; it is now served at {}", access.endpoint),
                )
                .await;
            }
        }
        self.warned.forget(id);
        Ok(Outcome::Done)
    }

    async fn delete(&self, bucket: Bucket) -> Result<Outcome> {
        let id = bucket.id().to_string();
        if let Err(err) = self.backend.delete_bucket(&id).await {
            return Err(self.transient(&bucket, "Delete", err.to_string()).await);
        }
        handler::remove_deleted::<Bucket>(&self.store, &id).await?;
        tracing::info!("bucket deleted");
        record_event(
            &self.store,
            bucket.metadata.as_ref(),
            EventType::Normal,
            "Deleted",
            "Delete",
            "Bucket deleted: credentials revoked, objects removed".to_string(),
        )
        .await;
        self.forget(&id);
        Ok(Outcome::Done)
    }

    /// BUCKET_ERROR, with a Warning event.
    async fn fail(&self, bucket: &Bucket, message: String) -> Result<()> {
        tracing::warn!(%message, "bucket failed permanently");
        let store = self.store.clone();
        let id = bucket.id().to_string();
        let written = blocking(move || {
            store.update::<Bucket>(&id, |b| {
                b.status = Some(BucketStatus {
                    state: BucketState::BucketError as i32,
                    access: None,
                });
                Ok(())
            })
        })
        .await?
        .object;
        record_event(
            &self.store,
            written.metadata.as_ref(),
            EventType::Warning,
            "ProvisioningFailed",
            "Provision",
            message,
        )
        .await;
        Ok(())
    }

    /// Reports a transient failure (rate-limited) and returns the error that makes the queue
    /// retry with backoff.
    async fn transient(&self, bucket: &Bucket, action: &'static str, reason: String) -> Error {
        if self.warned.admit(bucket.id().to_string(), &reason) {
            record_event(
                &self.store,
                bucket.metadata.as_ref(),
                EventType::Warning,
                "BackendError",
                action,
                format!("{action} failed, retrying: {reason}"),
            )
            .await;
        }
        Error::Unavailable(reason)
    }
}
