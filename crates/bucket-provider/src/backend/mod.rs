// SPDX-License-Identifier: Apache-2.0
//! The object storage behind the provider, as the reconciler sees it.
//!
//! Every method is idempotent: the reconciler calls it again after a crash, after a timeout, or
//! on every resync, and it must converge to the same result without duplicating anything.

pub mod embedded;

use std::collections::BTreeMap;

/// `secret_data` key of the access key id (what Rook's bucket claims use).
pub const ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
/// `secret_data` key of the secret access key.
pub const SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
/// `secret_data` key of the S3 bucket name.
pub const BUCKET_NAME: &str = "BUCKET_NAME";
/// `secret_data` key of the endpoint's host.
pub const BUCKET_HOST: &str = "BUCKET_HOST";
/// `secret_data` key of the endpoint's port.
pub const BUCKET_PORT: &str = "BUCKET_PORT";
/// `secret_data` key of the region to sign requests for.
pub const BUCKET_REGION: &str = "BUCKET_REGION";

/// Class limits of a bucket; 0 = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests per second (IRI `tps`).
    pub tps: u64,
    /// Object data requests per second (IRI `iops`).
    pub iops: u64,
}

/// What the reconciler asks the backend to provide for one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    /// The IRI bucket id (63 hex characters the store assigned: safe in paths, and a valid S3
    /// bucket name, so it is the bucket's S3 name too).
    pub id: String,
    /// The class limits.
    pub limits: Limits,
}

/// IRI `BucketAccess`: how a client reaches the bucket.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// The S3 endpoint URL, usable as it is (`http://127.0.0.1:7480`).
    pub endpoint: String,
    /// Credentials and connection details (see the `*_KEY*`/`BUCKET_*` constants).
    pub secret_data: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach logs: only the keys are shown.
        f.debug_struct("Access")
            .field("endpoint", &self.endpoint)
            .field("secret_data", &self.secret_data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A failure of the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// May succeed later (disk full, I/O error): retried with backoff.
    #[error("{0}")]
    Transient(String),
    /// Cannot succeed as requested: the bucket goes to BUCKET_ERROR.
    #[error("{0}")]
    Permanent(String),
}

/// Shorthand for backend results.
pub type BackendResult<T> = Result<T, BackendError>;

/// An object storage technology: `embedded` (our own S3 server) now, `rgw` later.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Creates the bucket with its own credentials if it does not exist yet, applies `limits`,
    /// and returns how it is reached. An existing bucket keeps its credentials.
    async fn ensure_bucket(&self, plan: &BucketPlan) -> BackendResult<Access>;

    /// Revokes the bucket's credentials and removes it with all its objects. Absent is success.
    async fn delete_bucket(&self, id: &str) -> BackendResult<()>;

    /// The ids of the buckets the backend holds.
    async fn inventory(&self) -> BackendResult<Vec<String>>;
}
