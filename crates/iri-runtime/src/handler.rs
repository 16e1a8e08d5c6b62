// SPDX-License-Identifier: Apache-2.0
//! The steps every provider's gRPC handlers (and reconcilers) take the same way: store writes
//! off the async threads, events that never fail the change they report, the two-phase delete
//! request, and lists served from the store's cache.
//!
//! Everything here speaks only of [`Store`] and [`Object`]: what a provider's records mean stays
//! in the provider.

use iri_api::{event::v1alpha1::Event, meta::v1alpha1::ObjectMetadata};

use crate::{Error, EventFilter, EventType, Object, ObjectFilter, Result, Store};

/// Runs a store write (an fsynced SQLite transaction) off the async worker threads, so a slow
/// disk delays only the caller, not every other RPC and reconcile sharing the thread.
pub async fn blocking<T: Send + 'static>(write: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(write)
        .await
        .map_err(|e| Error::Internal(format!("store task: {e}")))?
}

/// Records an event about the object with `meta`. The change it reports has happened already,
/// so an event that cannot be stored is logged, never turned into a failure of that change.
pub async fn record_event(
    store: &Store,
    meta: Option<&ObjectMetadata>,
    event_type: EventType,
    reason: &'static str,
    action: &'static str,
    message: String,
) {
    let store = store.clone();
    let meta = meta.cloned().unwrap_or_default();
    let id = meta.id.clone();
    let result = blocking(move || store.record_event(&meta, event_type, reason, action, &message)).await;
    if let Err(err) = result {
        tracing::warn!(id = %id, reason, %err, "cannot record event");
    }
}

/// Whether deletion of `object` was requested (`metadata.deleted_at` is set).
pub fn is_deleting<T: Object>(object: &T) -> bool {
    object.metadata().is_some_and(|m| m.deleted_at != 0)
}

/// The first phase of a two-phase delete: marks object `id` deleted and records a Normal
/// `Deleting` event with `message`; the reconciler releases what it holds and then removes the
/// record. NotFound for an unknown id; OK, without a second event, while the deletion is under
/// way, because poollets poll Delete until it answers NotFound. `noun` names the object in the
/// log line (`volume snapshot`).
pub async fn request_deletion<T: Object>(store: &Store, id: String, noun: &str, message: &str) -> Result<()> {
    let current = store.get::<T>(&id)?.object;
    if is_deleting(&current) {
        return Ok(());
    }
    let marked = {
        let store = store.clone();
        let id = id.clone();
        blocking(move || store.mark_deleted::<T>(&id)).await?.object
    };
    tracing::info!(id = %id, "{noun} deletion requested");
    record_event(
        store,
        marked.metadata(),
        EventType::Normal,
        "Deleting",
        "Delete",
        message.to_string(),
    )
    .await;
    Ok(())
}

/// The last step of a two-phase delete, once the backend let go: removes object `id`'s record.
/// A record gone already is fine (a pass before a restart removed it).
pub async fn remove_deleted<T: Object>(store: &Store, id: &str) -> Result<()> {
    let store = store.clone();
    let id = id.to_string();
    match blocking(move || store.remove::<T>(&id)).await {
        Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
        Err(err) => Err(err),
    }
}

/// The stored objects of kind `T` that `filter` (a List request's, absent = all) selects, each
/// turned into what the List response carries by `into`.
pub fn list<T: Object, U>(
    store: &Store,
    filter: Option<impl Into<ObjectFilter>>,
    into: impl FnMut(T) -> U,
) -> Vec<U> {
    let filter = filter.map(Into::into).unwrap_or_default();
    store
        .list::<T>(&filter)
        .into_iter()
        .map(|stored| stored.object)
        .map(into)
        .collect()
}

/// The stored events that `filter` (a ListEvents request's, absent = all) selects.
pub async fn list_events(store: &Store, filter: Option<impl Into<EventFilter>>) -> Result<Vec<Event>> {
    let filter = filter.map(Into::into).unwrap_or_default();
    let store = store.clone();
    blocking(move || store.list_events(&filter)).await
}
