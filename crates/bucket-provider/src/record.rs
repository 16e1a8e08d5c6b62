// SPDX-License-Identifier: Apache-2.0
//! What the store holds per bucket.
//!
//! A bucket is stored as the IRI `Bucket` itself: its state says all there is. Its
//! `status.access.secret_data` holds the S3 secret, which is why the store file is 0600 in a
//! 0700 data directory and why no bucket is ever logged whole.

use iri_api::bucket::v1alpha1::{Bucket, BucketState};

/// `status.state` (PENDING without status).
pub fn state(bucket: &Bucket) -> BucketState {
    bucket
        .status
        .as_ref()
        .and_then(|s| BucketState::try_from(s.state).ok())
        .unwrap_or(BucketState::BucketPending)
}

/// `spec.class` ("" when absent; the server never stores that).
pub fn class(bucket: &Bucket) -> &str {
    bucket.spec.as_ref().map_or("", |s| s.class.as_str())
}
