// SPDX-License-Identifier: Apache-2.0
//! What the store holds per bucket, and small helpers around store writes.
//!
//! A bucket is stored as the IRI `Bucket` itself: its state says all there is. Its
//! `status.access.secret_data` holds the S3 secret, which is why the store file is 0600 in a
//! 0700 data directory and why no bucket is ever logged whole.

use iri_api::{
    bucket::v1alpha1::{Bucket, BucketState},
    meta::v1alpha1::ObjectMetadata,
};
use iri_runtime::{Error, EventType, Result, Store};

/// `status.state` (PENDING without status).
pub fn state(bucket: &Bucket) -> BucketState {
    bucket
        .status
        .as_ref()
        .and_then(|s| BucketState::try_from(s.state).ok())
        .unwrap_or(BucketState::BucketPending)
}

/// Whether deletion was requested.
pub fn is_deleting(bucket: &Bucket) -> bool {
    bucket.metadata.as_ref().is_some_and(|m| m.deleted_at != 0)
}

/// `spec.class` ("" when absent; the server never stores that).
pub fn class(bucket: &Bucket) -> &str {
    bucket.spec.as_ref().map_or("", |s| s.class.as_str())
}

/// Runs a store write (an fsynced SQLite transaction) off the async worker threads.
pub(crate) async fn blocking<T: Send + 'static>(
    write: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(write)
        .await
        .map_err(|e| Error::Internal(format!("store task: {e}")))?
}

/// Records an event about the object with `meta`. The change it reports has happened already,
/// so an event that cannot be stored is logged, never turned into a failure of that change.
pub(crate) async fn record_event(
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
