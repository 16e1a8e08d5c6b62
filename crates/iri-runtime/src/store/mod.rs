// SPDX-License-Identifier: Apache-2.0
//! The durable object store and event store every provider persists its IRI objects in.
//!
//! One SQLite file per provider. Writes are single transactions that also bump a store-wide
//! revision and are fsynced before they return (WAL, `synchronous=FULL`), so an acknowledged
//! write survives `kill -9` and power loss. Reads never touch SQLite: every object is cached in
//! memory at open and the cache is updated after each commit, which keeps the poollets'
//! List-every-few-seconds cheap. After the cache, a [`Change`] goes out on a broadcast channel
//! that wakes reconcilers.
//!
//! The file is locked exclusively while a [`Store`] has it open, because the cache is only
//! correct if nobody else writes the file: share a store by cloning it; a second `open` of the
//! same file, from this process or another, fails.

mod events;
mod schema;

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use tokio::sync::broadcast;

pub use events::EventType;
pub use schema::SCHEMA_VERSION;

use crate::id::{new_id, now_nanos};
use crate::{Error, Object, ObjectFilter, Result};

/// How many unreceived changes a subscriber may fall behind before it sees `Lagged`. Reconcilers
/// treat a lag as "resync everything", so this only needs to absorb ordinary bursts.
const CHANGE_CAPACITY: usize = 1024;

/// How often [`Store::update`] re-runs its closure after losing a race before it gives up with
/// [`Error::Conflict`]. Writes are serialized, so losing this often means a pathological hot spot.
const MAX_UPDATE_ATTEMPTS: usize = 64;

/// Tuning of a [`Store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// At most this many events are kept; older ones are pruned on insert. 0 = no count limit.
    pub max_events: usize,
    /// Events older than this are pruned and never listed. Zero = no age limit.
    pub max_event_age: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_events: 10_000,
            max_event_age: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// An object as stored, with the store revision of its last write.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored<T> {
    /// The object, metadata included.
    pub object: T,
    /// Store revision of the last write to this object (its "mod revision"). Pass it to
    /// [`Store::compare_and_swap`].
    pub revision: u64,
}

/// A committed write, as announced by [`Store::subscribe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The object's kind ([`Object::KIND`]).
    pub kind: &'static str,
    /// The object's id.
    pub id: String,
    /// Store revision of the write.
    pub revision: u64,
    /// Whether the write removed the object.
    pub removed: bool,
}

/// The durable object and event store. Cheap to clone; all clones share one file and cache.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    options: StoreOptions,
    /// The only connection. Writers hold it across commit, cache update and broadcast, so cache
    /// updates and changes are published in revision order.
    conn: Mutex<Connection>,
    cache: RwLock<Cache>,
    revision: AtomicU64,
    changes: broadcast::Sender<Change>,
}

#[derive(Default)]
struct Cache {
    kinds: HashMap<String, KindCache>,
}

#[derive(Default)]
struct KindCache {
    by_id: HashMap<String, Arc<Entry>>,
    /// List order: creation time, then id. created_at never changes, so keys stay valid.
    order: BTreeSet<(i64, String)>,
}

/// One cached row.
struct Entry {
    revision: u64,
    created_at: i64,
    data: Vec<u8>,
    /// The decoded object, filled on first typed read (the cache is loaded before any type is
    /// known) and on writes. Type-erased because the store is generic per call; a reader whose
    /// type differs (two types sharing a kind) decodes `data` itself.
    decoded: OnceLock<Arc<dyn Any + Send + Sync>>,
}

impl Entry {
    fn new(revision: u64, created_at: i64, data: Vec<u8>) -> Self {
        Entry {
            revision,
            created_at,
            data,
            decoded: OnceLock::new(),
        }
    }

    fn with_object<T: Object>(revision: u64, created_at: i64, data: Vec<u8>, object: T) -> Self {
        let entry = Entry::new(revision, created_at, data);
        let _ = entry.decoded.set(Arc::new(object));
        entry
    }

    /// The decoded object. A row that does not decode is reported with its kind and id and
    /// affects nothing but reads of that row.
    fn object<T: Object>(&self, id: &str) -> Result<Arc<T>> {
        if let Some(any) = self.decoded.get()
            && let Ok(object) = Arc::clone(any).downcast::<T>()
        {
            return Ok(object);
        }
        let object = Arc::new(
            T::decode(self.data.as_slice())
                .map_err(|e| Error::Internal(format!("stored {} {id:?} cannot be decoded: {e}", T::KIND)))?,
        );
        let _ = self.decoded.set(object.clone());
        Ok(object)
    }
}

/// The result of trying to write a modified object.
enum Swap<T> {
    Done(Stored<T>),
    /// Someone else wrote the object since it was read.
    Lost {
        found: u64,
    },
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

fn labels<T: Object>(object: &T) -> &BTreeMap<String, String> {
    object.metadata().map(|m| &m.labels).unwrap_or(&NO_LABELS)
}

fn to_sql_revision(revision: u64) -> Result<i64> {
    i64::try_from(revision).map_err(|_| Error::Internal(format!("store revision {revision} out of range")))
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store file at `path`, creating it (mode 0600) and migrating its schema as
    /// needed, and loads all objects into memory.
    ///
    /// Fails if the file belongs to a newer release (schema version above [`SCHEMA_VERSION`]),
    /// is not an IRI store, or is held open by another process ([`Error::Unavailable`] after a
    /// few seconds of waiting).
    pub fn open(path: &Path, options: StoreOptions) -> Result<Store> {
        let conn = schema::open(path)?;
        let revision: i64 = conn.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |row| {
            row.get(0)
        })?;
        let mut revision = u64::try_from(revision).unwrap_or(0);
        let mut cache = Cache::default();
        {
            let mut stmt = conn.prepare(
                "SELECT kind, id, revision, created_at, data FROM objects ORDER BY kind, created_at, id",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let kind: String = row.get(0)?;
                let id: String = row.get(1)?;
                let row_revision = u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0);
                let created_at: i64 = row.get(3)?;
                let data: Vec<u8> = row.get(4)?;
                if row_revision > revision {
                    // Cannot happen through this code (both are written in one transaction), but
                    // handing out a revision twice would break compare-and-swap, so never go back.
                    tracing::warn!(
                        kind,
                        id,
                        row_revision,
                        revision,
                        "object newer than store revision"
                    );
                    revision = row_revision;
                }
                let kind_cache = cache.kinds.entry(kind).or_default();
                kind_cache.order.insert((created_at, id.clone()));
                kind_cache
                    .by_id
                    .insert(id, Arc::new(Entry::new(row_revision, created_at, data)));
            }
        }
        let store = Store {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                options,
                conn: Mutex::new(conn),
                cache: RwLock::new(cache),
                revision: AtomicU64::new(revision),
                changes: broadcast::channel(CHANGE_CAPACITY).0,
            }),
        };
        store.prune_events_now()?;
        tracing::info!(
            path = %path.display(),
            revision,
            objects = store.read_cache().kinds.values().map(|k| k.by_id.len()).sum::<usize>(),
            "store opened"
        );
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The current store revision. Every committed object write (create, modification, deletion
    /// mark, removal) increases it by exactly one; it never decreases, across restarts too.
    /// Events do not count as object writes.
    pub fn revision(&self) -> u64 {
        self.inner.revision.load(Ordering::Acquire)
    }

    /// Stores a new object. The server owns identity: any client-supplied id is replaced by a
    /// fresh [`crate::id::new_id`], `created_at` is now (Unix nanoseconds), `generation` is 1 and
    /// `deleted_at` is 0.
    pub fn create<T: Object>(&self, mut object: T) -> Result<Stored<T>> {
        let created_at = now_nanos();
        let meta = object.metadata_mut();
        meta.created_at = created_at;
        meta.generation = 1;
        meta.deleted_at = 0;

        let mut conn = self.lock_conn();
        let id = loop {
            // 63 random hex characters do not collide in practice; the check makes sure a
            // collision could never overwrite anything.
            let id = new_id();
            if self.entry(T::KIND, &id).is_none() {
                break id;
            }
        };
        object.metadata_mut().id = id.clone();
        let data = object.encode_to_vec();
        let revision = transact(&mut conn, |tx, revision| {
            tx.prepare_cached(
                "INSERT INTO objects (kind, id, revision, created_at, deleted_at, data) VALUES (?1, ?2, ?3, ?4, 0, ?5)",
            )?
            .execute(params![T::KIND, id, revision, created_at, data])?;
            Ok(())
        })?;
        let entry = Entry::with_object(revision, created_at, data, object.clone());
        self.publish(T::KIND, &id, Some(entry), revision);
        drop(conn);
        Ok(Stored { object, revision })
    }

    /// The object of kind `T` with `id`; [`Error::NotFound`] if there is none.
    pub fn get<T: Object>(&self, id: &str) -> Result<Stored<T>> {
        let entry = self
            .entry(T::KIND, id)
            .ok_or_else(|| Error::not_found(T::KIND, id))?;
        Ok(Stored {
            object: (*entry.object::<T>(id)?).clone(),
            revision: entry.revision,
        })
    }

    /// The objects of kind `T` that pass `filter` ([`ObjectFilter::matches`] on id and labels),
    /// ordered by creation time, then id.
    ///
    /// A row that cannot be decoded is logged and left out, so one bad row does not take down
    /// listing for everything else; [`Store::get`] reports it.
    pub fn list<T: Object>(&self, filter: &ObjectFilter) -> Vec<Stored<T>> {
        let entries: Vec<(String, Arc<Entry>)> = {
            let cache = self.read_cache();
            match cache.kinds.get(T::KIND) {
                None => Vec::new(),
                Some(kind) if !filter.id.is_empty() => kind
                    .by_id
                    .get(&filter.id)
                    .map(|entry| (filter.id.clone(), entry.clone()))
                    .into_iter()
                    .collect(),
                Some(kind) => kind
                    .order
                    .iter()
                    .filter_map(|(_, id)| kind.by_id.get(id).map(|entry| (id.clone(), entry.clone())))
                    .collect(),
            }
        };
        // Decoding and cloning happen outside the cache lock, so writers are not held up.
        entries
            .into_iter()
            .filter_map(|(id, entry)| match entry.object::<T>(&id) {
                Ok(object) => filter.matches(&id, labels(&*object)).then(|| Stored {
                    object: (*object).clone(),
                    revision: entry.revision,
                }),
                Err(err) => {
                    tracing::error!(kind = T::KIND, id, %err, "skipping undecodable object in list");
                    None
                }
            })
            .collect()
    }

    /// Exports `iri_store_objects{kind}` and `iri_store_revision`, read from the cache on each
    /// scrape.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        let store = self.clone();
        metrics.register_gauge(
            "iri_store_objects",
            "Objects in the store by kind, deleting ones included",
            move || {
                let cache = store.read_cache();
                let mut samples: Vec<_> = cache
                    .kinds
                    .iter()
                    .map(|(kind, objects)| {
                        (
                            vec![("kind".to_string(), kind.clone())],
                            objects.by_id.len() as i64,
                        )
                    })
                    .collect();
                samples.sort();
                samples
            },
        );
        let store = self.clone();
        metrics.register_gauge(
            "iri_store_revision",
            "Revision of the last committed store write",
            move || vec![(Vec::new(), i64::try_from(store.revision()).unwrap_or(i64::MAX))],
        );
    }

    /// How many objects of kind `T` are stored (deleting ones included).
    pub fn count<T: Object>(&self) -> usize {
        self.read_cache()
            .kinds
            .get(T::KIND)
            .map_or(0, |kind| kind.by_id.len())
    }

    /// Read-modify-write of the object with `id`.
    ///
    /// `f` gets the current object; if it returns an error, nothing is written and the error is
    /// returned. If another write to the object commits between the read and this write, `f`
    /// runs again on the new state, so `f` must not have side effects beyond the object.
    ///
    /// The store owns some metadata and restores it after `f`: `id`, `created_at` and
    /// `deleted_at` (set only by [`Store::mark_deleted`]) cannot change, and `generation` goes up
    /// by one exactly when the spec ([`Object::spec_bytes`]) changed. If the result encodes to
    /// the same bytes as the current object, nothing is written and the revision stays.
    pub fn update<T: Object>(&self, id: &str, mut f: impl FnMut(&mut T) -> Result<()>) -> Result<Stored<T>> {
        let mut lost = (0, 0);
        for _ in 0..MAX_UPDATE_ATTEMPTS {
            let entry = self
                .entry(T::KIND, id)
                .ok_or_else(|| Error::not_found(T::KIND, id))?;
            let current = entry.object::<T>(id)?;
            let mut next = (*current).clone();
            f(&mut next)?;
            let deleted_at = current.metadata().map_or(0, |m| m.deleted_at);
            match self.swap(id, &entry, &*current, next, deleted_at)? {
                Swap::Done(stored) => return Ok(stored),
                Swap::Lost { found } => lost = (entry.revision, found),
            }
        }
        Err(conflict::<T>(id, lost))
    }

    /// Replaces the object with `id` by `object` if the object's revision is still
    /// `expected_revision`, else fails with [`Error::Conflict`]. Store-owned metadata is handled
    /// as in [`Store::update`], including "no change, no write".
    pub fn compare_and_swap<T: Object>(
        &self,
        id: &str,
        expected_revision: u64,
        object: T,
    ) -> Result<Stored<T>> {
        let entry = self
            .entry(T::KIND, id)
            .ok_or_else(|| Error::not_found(T::KIND, id))?;
        if entry.revision != expected_revision {
            return Err(conflict::<T>(id, (expected_revision, entry.revision)));
        }
        let current = entry.object::<T>(id)?;
        let deleted_at = current.metadata().map_or(0, |m| m.deleted_at);
        match self.swap(id, &entry, &*current, object, deleted_at)? {
            Swap::Done(stored) => Ok(stored),
            Swap::Lost { found } => Err(conflict::<T>(id, (expected_revision, found))),
        }
    }

    /// Step one of two-phase deletion: records the deletion request by setting
    /// `metadata.deleted_at` to now (Unix nanoseconds). Idempotent: a repeated call keeps the
    /// first timestamp and writes nothing.
    pub fn mark_deleted<T: Object>(&self, id: &str) -> Result<Stored<T>> {
        let mut lost = (0, 0);
        for _ in 0..MAX_UPDATE_ATTEMPTS {
            let entry = self
                .entry(T::KIND, id)
                .ok_or_else(|| Error::not_found(T::KIND, id))?;
            let current = entry.object::<T>(id)?;
            if current.metadata().is_some_and(|m| m.deleted_at != 0) {
                return Ok(Stored {
                    object: (*current).clone(),
                    revision: entry.revision,
                });
            }
            let next = (*current).clone();
            match self.swap(id, &entry, &*current, next, now_nanos())? {
                Swap::Done(stored) => return Ok(stored),
                Swap::Lost { found } => lost = (entry.revision, found),
            }
        }
        Err(conflict::<T>(id, lost))
    }

    /// Step two of two-phase deletion, once the backend resources are released: removes the
    /// object. [`Error::NotFound`] if it does not exist.
    pub fn remove<T: Object>(&self, id: &str) -> Result<()> {
        let mut conn = self.lock_conn();
        if self.entry(T::KIND, id).is_none() {
            return Err(Error::not_found(T::KIND, id));
        }
        let revision = transact(&mut conn, |tx, _| {
            let removed = tx
                .prepare_cached("DELETE FROM objects WHERE kind = ?1 AND id = ?2")?
                .execute(params![T::KIND, id])?;
            expect_one_row(removed, T::KIND, id)
        })?;
        self.publish(T::KIND, id, None, revision);
        Ok(())
    }

    /// A receiver of every committed object write from now on, in revision order. Changes are
    /// sent after commit and cache update, so a reader woken by one sees the write. A receiver
    /// that falls more than a thousand changes behind gets `Lagged` and should resync by
    /// listing.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    /// Writes `next` in place of `current` (read from `entry`) unless someone else wrote the
    /// object in between. Restores store-owned metadata first.
    fn swap<T: Object>(
        &self,
        id: &str,
        entry: &Entry,
        current: &T,
        mut next: T,
        deleted_at: i64,
    ) -> Result<Swap<T>> {
        let (generation, created_at) = current
            .metadata()
            .map_or((0, entry.created_at), |m| (m.generation, m.created_at));
        let spec_changed = current.spec_bytes() != next.spec_bytes();
        let meta = next.metadata_mut();
        meta.id = id.to_string();
        meta.created_at = created_at;
        meta.deleted_at = deleted_at;
        meta.generation = if spec_changed {
            generation.saturating_add(1)
        } else {
            generation
        };
        let data = next.encode_to_vec();
        if data == entry.data {
            return Ok(Swap::Done(Stored {
                object: next,
                revision: entry.revision,
            }));
        }

        let mut conn = self.lock_conn();
        // Writers are serialized by the connection lock and the cache is updated before it is
        // released, so the cached revision is the committed one: this is the compare of the CAS.
        match self.entry(T::KIND, id) {
            None => return Err(Error::not_found(T::KIND, id)),
            Some(now) if now.revision != entry.revision => return Ok(Swap::Lost { found: now.revision }),
            Some(_) => {}
        }
        let expected = to_sql_revision(entry.revision)?;
        let revision = transact(&mut conn, |tx, revision| {
            let updated = tx
                .prepare_cached(
                    "UPDATE objects SET revision = ?1, deleted_at = ?2, data = ?3
                     WHERE kind = ?4 AND id = ?5 AND revision = ?6",
                )?
                .execute(params![revision, deleted_at, data, T::KIND, id, expected])?;
            expect_one_row(updated, T::KIND, id)
        })?;
        let new_entry = Entry::with_object(revision, entry.created_at, data, next.clone());
        self.publish(T::KIND, id, Some(new_entry), revision);
        drop(conn);
        Ok(Swap::Done(Stored {
            object: next,
            revision,
        }))
    }

    /// Makes a committed write visible: cache first, then the revision, then the change feed.
    /// Called with the connection lock held so that all three happen in commit order.
    fn publish(&self, kind: &'static str, id: &str, entry: Option<Entry>, revision: u64) {
        let removed = entry.is_none();
        {
            let mut cache = self.write_cache();
            match entry {
                Some(entry) => {
                    let kind_cache = cache.kinds.entry(kind.to_string()).or_default();
                    kind_cache.order.insert((entry.created_at, id.to_string()));
                    kind_cache.by_id.insert(id.to_string(), Arc::new(entry));
                }
                None => {
                    if let Some(kind_cache) = cache.kinds.get_mut(kind)
                        && let Some(old) = kind_cache.by_id.remove(id)
                    {
                        kind_cache.order.remove(&(old.created_at, id.to_string()));
                    }
                }
            }
        }
        self.inner.revision.store(revision, Ordering::Release);
        // No receivers is fine: nobody is waiting to be woken.
        let _ = self.inner.changes.send(Change {
            kind,
            id: id.to_string(),
            revision,
            removed,
        });
    }

    fn entry(&self, kind: &str, id: &str) -> Option<Arc<Entry>> {
        self.read_cache().kinds.get(kind)?.by_id.get(id).cloned()
    }

    // A panic elsewhere while a lock was held cannot leave these half-updated (SQLite rolls the
    // transaction back; cache updates do not panic), so poisoning carries no information and
    // must not take the store down.
    fn lock_conn(&self) -> MutexGuard<'_, Connection> {
        self.inner.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_cache(&self) -> RwLockReadGuard<'_, Cache> {
        self.inner.cache.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_cache(&self) -> RwLockWriteGuard<'_, Cache> {
        self.inner.cache.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs `f` in one immediate transaction that also bumps the store revision, and returns the
/// new revision once committed. `f` gets the new revision as an SQL integer.
fn transact(conn: &mut Connection, f: impl FnOnce(&Transaction<'_>, i64) -> Result<()>) -> Result<u64> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let revision: i64 = tx
        .prepare_cached("UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value")?
        .query_row([], |row| row.get(0))?;
    f(&tx, revision)?;
    tx.commit()?;
    u64::try_from(revision).map_err(|_| Error::Internal(format!("store revision {revision} out of range")))
}

/// The error of a write that kept losing races; `(expected, found)` of the last attempt.
fn conflict<T: Object>(id: &str, (expected, found): (u64, u64)) -> Error {
    Error::Conflict {
        kind: T::KIND,
        id: id.to_string(),
        expected,
        found,
    }
}

/// The cache and the file must agree; if they do not, roll back rather than guess.
fn expect_one_row(rows: usize, kind: &'static str, id: &str) -> Result<()> {
    if rows == 1 {
        Ok(())
    } else {
        Err(Error::Internal(format!(
            "store cache out of sync with file for {kind} {id:?} ({rows} rows matched)"
        )))
    }
}
