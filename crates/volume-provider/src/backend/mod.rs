// SPDX-License-Identifier: Apache-2.0
//! The storage technology behind the provider, as the reconciler sees it.
//!
//! Every method is idempotent: the reconciler calls it again after a crash, after a timeout, or
//! on every resync, and it must converge to the same result without duplicating anything.

pub mod local;

use std::collections::BTreeMap;

use crate::keys::WrappedKey;

/// How a volume's data comes into being.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Zeroes (sparse).
    Empty,
    /// A copy-on-write clone of a snapshot the backend holds.
    Snapshot(String),
    /// A copy-on-write clone of an image (a reference the backend fetches once and keeps).
    Image(ImageRef),
}

/// An image to create a volume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `file://`, `http(s)://` or an OCI reference.
    pub reference: String,
    /// The CPU architecture whose image an OCI index should yield (`amd64` if empty).
    pub architecture: String,
}

/// Class limits, enforced on the data path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes per second; 0 = unlimited.
    pub bytes_per_second: u64,
    /// Operations per second; 0 = unlimited.
    pub iops: u64,
}

/// What the reconciler asks the backend to provide for one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlan {
    /// The IRI volume id (a 63-hex-character id the store assigned: safe in file names).
    pub id: String,
    /// Requested size in bytes (> 0).
    pub size_bytes: u64,
    /// Where the data comes from.
    pub source: Source,
    /// Data path limits of the volume's class.
    pub limits: Limits,
    /// The passphrase to encrypt the volume's data with, wrapped with the provider's KEK.
    /// `None` for a clone of an encrypted snapshot keeps the snapshot's key.
    pub encryption: Option<WrappedKey>,
}

/// A volume as the backend serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// The real size (requested size rounded up to the backend's granularity).
    pub size_bytes: u64,
    /// How a machine provider reaches it: IRI `VolumeAccess`.
    pub access: Access,
}

/// IRI `VolumeAccess`, the contract between this provider and machine providers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// e.g. `nbd`.
    pub driver: String,
    /// A stable handle (disk serial).
    pub handle: String,
    /// e.g. `uri`.
    pub attributes: BTreeMap<String, String>,
    /// Credentials, if the export needs any.
    pub secret_data: BTreeMap<String, Vec<u8>>,
}

/// A failure of the backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// May succeed later (the daemon is restarting, the disk is busy): retried with backoff.
    #[error("{0}")]
    Transient(String),
    /// Cannot succeed as requested (the source snapshot is gone, the size is impossible): the
    /// object goes to an error state, and the reason is reported in an event.
    #[error("{0}")]
    Permanent(String),
}

/// Shorthand for backend results.
pub type BackendResult<T> = Result<T, BackendError>;

/// What exists on the backend, for the resync that removes orphans left by a crash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Volume ids.
    pub volumes: Vec<String>,
    /// Snapshot ids.
    pub snapshots: Vec<String>,
}

/// A storage technology: `local` (qcow2 + qemu-storage-daemon) now, `ceph` later.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Creates the volume if it does not exist yet, exports it, and returns how it is served.
    async fn ensure_volume(&self, plan: &VolumePlan) -> BackendResult<Provisioned>;

    /// Unexports and removes the volume. Absent is success.
    async fn delete_volume(&self, id: &str) -> BackendResult<()>;

    /// Grows the volume online to at least `size_bytes`; returns the real size. Never shrinks.
    async fn expand_volume(&self, id: &str, size_bytes: u64) -> BackendResult<u64>;

    /// Takes a crash-consistent point-in-time snapshot `snapshot_id` of volume `volume_id` while
    /// it stays exported; returns the snapshot's size. If the snapshot exists, returns its size.
    async fn create_snapshot(&self, snapshot_id: &str, volume_id: &str) -> BackendResult<u64>;

    /// Removes a snapshot. Volumes cloned from it keep their data. Absent is success.
    async fn delete_snapshot(&self, snapshot_id: &str) -> BackendResult<()>;

    /// Bytes that new volumes can still take.
    async fn available_bytes(&self) -> BackendResult<u64>;

    /// What the backend holds.
    async fn inventory(&self) -> BackendResult<Inventory>;
}
