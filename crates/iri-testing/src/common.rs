// SPDX-License-Identifier: Apache-2.0
//! Pieces shared by the three reference runtimes: metadata assignment and validation, the
//! bounded event log, simulated-backend deadlines and random tokens.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use iri_api::{
    event::v1alpha1::{Event, EventSpec},
    meta::v1alpha1::ObjectMetadata,
};
use iri_runtime::{Error, EventFilter, Object, ObjectFilter, id};

pub use iri_runtime::validate::{MAX_METADATA_ENTRIES, MAX_METADATA_KEY_BYTES, MAX_METADATA_VALUE_BYTES};
pub(crate) use iri_runtime::validate::{shorten, string_map as validate_string_map};

/// How many events a runtime keeps by default; older ones are dropped first.
pub const DEFAULT_MAX_EVENTS: usize = 1000;

/// Event type of everything the reference runtimes record: they never fail on their own.
const NORMAL: &str = "Normal";

/// Locks `mutex`, ignoring poisoning: the state is only mutated by code that cannot panic half
/// way, and a test double must keep answering even after an unrelated panic in a test.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The instant at which the simulated backend has applied a change made now.
pub(crate) fn after(delay: Duration) -> Instant {
    let now = Instant::now();
    // A huge configured delay must not panic; "practically never" is what the caller meant.
    now.checked_add(delay)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// Hands out `created_at` timestamps that strictly increase within one runtime, so that listing
/// by `(created_at, id)` is creation order even when two creates fall into the same nanosecond.
#[derive(Debug, Default)]
pub(crate) struct Clock {
    last: i64,
}

impl Clock {
    pub(crate) fn next(&mut self) -> i64 {
        let now = id::now_nanos().max(self.last.saturating_add(1));
        self.last = now;
        now
    }
}

/// Validates the client-controlled parts of `metadata` (labels, annotations) and returns the
/// metadata the server stores: client labels/annotations verbatim, everything else assigned by
/// the server (a client-supplied id, generation or timestamps are ignored, iri-contract §2.1).
pub(crate) fn new_metadata(
    object: &str,
    metadata: Option<ObjectMetadata>,
    clock: &mut Clock,
) -> Result<ObjectMetadata, Error> {
    let metadata = iri_runtime::validate::client_metadata(object, metadata)?;
    Ok(ObjectMetadata {
        id: id::new_id(),
        generation: 1,
        created_at: clock.next(),
        deleted_at: 0,
        ..metadata
    })
}

/// Bumps `metadata.generation` (saturating: a counter must never make us panic).
pub(crate) fn bump_generation(metadata: &mut Option<ObjectMetadata>) {
    if let Some(metadata) = metadata {
        metadata.generation = metadata.generation.saturating_add(1);
    }
}

/// The objects passing `filter` (absent filter: all), in creation order with ties broken by id,
/// so listings are deterministic.
pub(crate) fn list_objects<'a, T: Object>(
    objects: impl Iterator<Item = &'a T>,
    filter: Option<ObjectFilter>,
) -> Vec<T> {
    let filter = filter.unwrap_or_default();
    let empty = BTreeMap::new();
    let mut listed: Vec<T> = objects
        .filter(|o| filter.matches(o.id(), o.metadata().map(|m| &m.labels).unwrap_or(&empty)))
        .cloned()
        .collect();
    listed.sort_by_cached_key(|o| {
        o.metadata()
            .map(|m| (m.created_at, m.id.clone()))
            .unwrap_or_default()
    });
    listed
}

/// A bounded, chronological log of events.
#[derive(Debug)]
pub(crate) struct EventLog {
    events: VecDeque<Event>,
    max: usize,
}

impl EventLog {
    pub(crate) fn new(max: usize) -> Self {
        EventLog {
            events: VecDeque::new(),
            max,
        }
    }

    /// Records a `Normal` event about the object with `metadata` (copied as it is now, so the
    /// event keeps the labels that map it back to a Kubernetes object even after deletion).
    pub(crate) fn record(&mut self, metadata: &ObjectMetadata, reason: &str, action: &str, message: String) {
        if self.max == 0 {
            return;
        }
        while self.events.len() >= self.max {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            spec: Some(EventSpec {
                involved_object_meta: Some(metadata.clone()),
                reason: reason.to_string(),
                message,
                r#type: NORMAL.to_string(),
                event_time: id::now_secs(),
                action: action.to_string(),
            }),
        });
    }

    /// Records the `Deleted` event of an object just removed from the runtime, with its last
    /// `metadata` stamped with `deleted_at` (now).
    pub(crate) fn record_deleted(&mut self, metadata: Option<ObjectMetadata>, message: &str) {
        let mut metadata = metadata.unwrap_or_default();
        metadata.deleted_at = id::now_nanos();
        self.record(&metadata, "Deleted", "Delete", message.to_string());
    }

    /// Records the `StateChanged` event of the simulated backend moving an object to a new state.
    pub(crate) fn record_state_change(&mut self, metadata: &ObjectMetadata, message: String) {
        self.record(metadata, "StateChanged", "Reconcile", message);
    }

    /// The events passing `filter` (absent filter: all), oldest first.
    pub(crate) fn list(&self, filter: Option<EventFilter>) -> Vec<Event> {
        let filter = filter.unwrap_or_default();
        let empty = BTreeMap::new();
        self.events
            .iter()
            .filter(|event| {
                let spec = event.spec.as_ref();
                let meta = spec.and_then(|s| s.involved_object_meta.as_ref());
                filter.matches(
                    meta.map(|m| m.id.as_str()).unwrap_or(""),
                    meta.map(|m| &m.labels).unwrap_or(&empty),
                    spec.map(|s| s.event_time).unwrap_or(0),
                )
            })
            .cloned()
            .collect()
    }
}

/// `len` random characters from `alphabet` (which must have at most 256 entries).
pub(crate) fn random_string(len: usize, alphabet: &[u8]) -> String {
    let mut raw = vec![0u8; len];
    // The OS random source is always available on the platforms we run on; should it ever
    // fail, a zeroed (predictable) token is acceptable for a test double, a panic is not.
    let _ = getrandom::fill(&mut raw);
    raw.iter()
        .map(|b| char::from(alphabet[usize::from(*b) % alphabet.len().max(1)]))
        .collect()
}

/// Base64url alphabet, the one upstream's exec tokens use.
pub(crate) const URL_SAFE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

pub(crate) use iri_runtime::error::reply;
