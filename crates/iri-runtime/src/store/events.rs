// SPDX-License-Identifier: Apache-2.0
//! The event store: what providers report about their objects, served by ListEvents
//! (iri-contract §2.5).

use iri_api::event::v1alpha1::{Event, EventSpec};
use iri_api::meta::v1alpha1::ObjectMetadata;
use prost::Message;
use rusqlite::{Connection, TransactionBehavior, params};

use super::{NO_LABELS, Store};
use crate::id::now_secs;
use crate::{EventFilter, Result};

/// The Kubernetes event type of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// Something expected happened.
    Normal,
    /// Something went wrong or needs attention.
    Warning,
}

impl EventType {
    /// The wire value: `Normal` or `Warning`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Store {
    /// Records an event about the object with metadata `meta`, timestamped now (Unix seconds,
    /// the unit of `event_time`). The event carries a copy of `meta` as it is now, so it still
    /// lists under the object's labels after the object is gone.
    ///
    /// The event is durable once this returns. Events beyond [`super::StoreOptions::max_events`]
    /// or older than [`super::StoreOptions::max_event_age`] are pruned in the same transaction.
    /// Events do not change the store revision.
    pub fn record_event(
        &self,
        meta: &ObjectMetadata,
        event_type: EventType,
        reason: &str,
        action: &str,
        message: &str,
    ) -> Result<()> {
        let event_time = now_secs();
        let event = Event {
            spec: Some(EventSpec {
                involved_object_meta: Some(meta.clone()),
                reason: reason.to_string(),
                message: message.to_string(),
                r#type: event_type.as_str().to_string(),
                event_time,
                action: action.to_string(),
            }),
        };
        let data = event.encode_to_vec();
        let mut conn = self.lock_conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.prepare_cached("INSERT INTO events (event_time, involved_id, data) VALUES (?1, ?2, ?3)")?
            .execute(params![event_time, meta.id, data])?;
        let seq = tx.last_insert_rowid();
        self.prune_events(&tx, seq, event_time)?;
        tx.commit()?;
        Ok(())
    }

    /// The stored events that pass `filter` ([`EventFilter::matches`] on the involved object's
    /// id and labels and the event time), oldest first.
    ///
    /// An event that cannot be decoded is logged and left out rather than failing every
    /// ListEvents until it ages out.
    pub fn list_events(&self, filter: &EventFilter) -> Result<Vec<Event>> {
        // Let the index narrow by time and id; `matches` below stays the single authority.
        let (mut from, mut to) = (i64::MIN, i64::MAX);
        if filter.from > 0 && filter.to > 0 {
            (from, to) = (filter.from, filter.to);
        }
        from = from.max(self.event_cutoff(now_secs()));
        let rows: Vec<Vec<u8>> = {
            let conn = self.lock_conn();
            // Only the blobs are read under the lock; decoding happens after it is released.
            if filter.id.is_empty() {
                let mut stmt = conn.prepare_cached(
                    "SELECT data FROM events WHERE event_time BETWEEN ?1 AND ?2 ORDER BY event_time, seq",
                )?;
                stmt.query_map(params![from, to], |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()?
            } else {
                let mut stmt = conn.prepare_cached(
                    "SELECT data FROM events WHERE involved_id = ?3 AND event_time BETWEEN ?1 AND ?2
                     ORDER BY event_time, seq",
                )?;
                stmt.query_map(params![from, to, filter.id], |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()?
            }
        };
        Ok(rows
            .into_iter()
            .filter_map(|data| match Event::decode(data.as_slice()) {
                Ok(event) => Some(event),
                Err(err) => {
                    tracing::error!(%err, "skipping undecodable event");
                    None
                }
            })
            .filter(|event| {
                let spec = event.spec.as_ref();
                let meta = spec.and_then(|s| s.involved_object_meta.as_ref());
                filter.matches(
                    meta.map_or("", |m| m.id.as_str()),
                    meta.map_or(&NO_LABELS, |m| &m.labels),
                    spec.map_or(0, |s| s.event_time),
                )
            })
            .collect())
    }

    /// Prunes events with the current limits; used at open, where the limits may have shrunk
    /// since the file was last written.
    pub(super) fn prune_events_now(&self) -> Result<()> {
        let mut conn = self.lock_conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last: Option<i64> = tx.query_row("SELECT max(seq) FROM events", [], |row| row.get(0))?;
        if let Some(last) = last {
            self.prune_events(&tx, last, now_secs())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes events over the limits, given the newest sequence number `last`. Both deletes
    /// are index range scans, cheap enough for every insert.
    ///
    /// The count limit counts sequence numbers: rows are numbered consecutively and only the
    /// oldest are deleted, so the last `max_events` numbers are the newest `max_events` events
    /// (at most that many, if age pruning removed some out of order after a clock jump).
    fn prune_events(&self, conn: &Connection, last: i64, now: i64) -> Result<()> {
        let max = i64::try_from(self.inner.options.max_events).unwrap_or(i64::MAX);
        if max > 0 && last > max {
            conn.prepare_cached("DELETE FROM events WHERE seq <= ?1")?
                .execute([last - max])?;
        }
        let cutoff = self.event_cutoff(now);
        if cutoff > i64::MIN {
            conn.prepare_cached("DELETE FROM events WHERE event_time < ?1")?
                .execute([cutoff])?;
        }
        Ok(())
    }

    /// The oldest event time (Unix seconds) still kept, or `i64::MIN` without an age limit.
    fn event_cutoff(&self, now: i64) -> i64 {
        let age = self.inner.options.max_event_age;
        if age.is_zero() {
            return i64::MIN;
        }
        now.saturating_sub(i64::try_from(age.as_secs()).unwrap_or(i64::MAX))
    }
}
