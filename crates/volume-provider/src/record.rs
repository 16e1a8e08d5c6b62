// SPDX-License-Identifier: Apache-2.0
//! What the store holds for each volume and snapshot.
//!
//! A snapshot is stored as the IRI `VolumeSnapshot` itself: its states say all there is
//! (FAILED is terminal). A volume needs one piece of private state next to the IRI object, the
//! generation whose provisioning failed for good, so that the reconciler does not retry a
//! permanent failure until the spec changes (ExpandVolume). [`VolumeRecord`] therefore carries
//! the three IRI fields under the same tags as `volume.v1alpha1.Volume` plus private fields
//! at high tags: a stored record decodes as a plain IRI `Volume` and back.

use iri_api::{
    meta::v1alpha1::ObjectMetadata,
    volume::v1alpha1::{Volume, VolumeSnapshot, VolumeSnapshotState, VolumeSpec, VolumeState, VolumeStatus},
};
use prost::Message;

/// A volume as stored: the IRI object plus what only the provider needs to know.
#[derive(Clone, PartialEq, Message)]
pub struct VolumeRecord {
    /// IRI metadata (`Volume.metadata`).
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<ObjectMetadata>,
    /// The desired state as requested (`Volume.spec`), returned verbatim.
    #[prost(message, optional, tag = "2")]
    pub spec: Option<VolumeSpec>,
    /// The observed state (`Volume.status`), written by the reconciler only.
    #[prost(message, optional, tag = "3")]
    pub status: Option<VolumeStatus>,
    /// The `metadata.generation` whose provisioning or expansion failed permanently; 0 = none.
    /// The reconciler leaves that operation alone until the spec changes.
    #[prost(int64, tag = "16")]
    pub failed_generation: i64,
    /// Why [`VolumeRecord::failed_generation`] failed, for logs after a restart.
    #[prost(string, tag = "17")]
    pub failure: String,
    /// The encryption passphrase wrapped with the provider's KEK (`crate::keys`); empty for an
    /// unencrypted volume. The spec keeps `encryption` with empty `secret_data`.
    #[prost(bytes = "vec", tag = "18")]
    pub encryption_key: Vec<u8>,
}

iri_runtime::impl_object!(VolumeRecord, "volume");

impl VolumeRecord {
    /// The IRI object, as List and Create return it.
    pub fn into_volume(self) -> Volume {
        Volume {
            metadata: self.metadata,
            spec: self.spec,
            status: self.status,
        }
    }

    /// `metadata.generation`.
    pub fn generation(&self) -> i64 {
        self.metadata.as_ref().map_or(0, |m| m.generation)
    }

    /// Whether deletion was requested.
    pub fn is_deleting(&self) -> bool {
        self.metadata.as_ref().is_some_and(|m| m.deleted_at != 0)
    }

    /// `spec.resources.storage_bytes` (0 when absent; the server never stores that).
    pub fn spec_bytes(&self) -> i64 {
        self.spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .map_or(0, |r| r.storage_bytes)
    }

    /// `status.resources.storage_bytes`: the size the backend serves (0 before provisioning).
    pub fn status_bytes(&self) -> i64 {
        self.status
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .map_or(0, |r| r.storage_bytes)
    }

    /// `status.state` (PENDING without status).
    pub fn state(&self) -> VolumeState {
        self.status
            .as_ref()
            .and_then(|s| VolumeState::try_from(s.state).ok())
            .unwrap_or(VolumeState::VolumePending)
    }

    /// The snapshot this volume is restored from, if any.
    pub fn source_snapshot(&self) -> Option<&str> {
        self.spec
            .as_ref()?
            .volume_data_source
            .as_ref()?
            .snapshot_data_source
            .as_ref()
            .map(|s| s.snapshot_id.as_str())
    }

    /// Bytes this volume may come to occupy: its size as requested or as served, whichever is
    /// bigger (thin files can fill up to their size).
    pub fn committed_bytes(&self) -> i64 {
        self.spec_bytes().max(self.status_bytes()).max(0)
    }

    /// Whether the backend still has to create the volume: not provisioned yet and not given
    /// up on. Snapshots it is restored from must stay until then.
    pub fn awaits_provisioning(&self) -> bool {
        !self.is_deleting() && self.state() == VolumeState::VolumePending
    }
}

/// `status.state` of a snapshot (PENDING without status).
pub fn snapshot_state(snapshot: &VolumeSnapshot) -> VolumeSnapshotState {
    snapshot
        .status
        .as_ref()
        .and_then(|s| VolumeSnapshotState::try_from(s.state).ok())
        .unwrap_or(VolumeSnapshotState::VolumeSnapshotPending)
}

/// `spec.volume_id` of a snapshot ("" when absent; the server never stores that).
pub fn snapshot_volume_id(snapshot: &VolumeSnapshot) -> &str {
    snapshot.spec.as_ref().map_or("", |s| s.volume_id.as_str())
}

/// `status.size` of a snapshot (0 until READY).
pub fn snapshot_size(snapshot: &VolumeSnapshot) -> i64 {
    snapshot.status.as_ref().map_or(0, |s| s.size)
}

#[cfg(test)]
mod tests {
    use iri_api::volume::v1alpha1::VolumeResources;

    use super::*;

    #[test]
    fn a_record_decodes_as_an_iri_volume_and_back() {
        let record = VolumeRecord {
            metadata: Some(ObjectMetadata {
                id: "v".into(),
                generation: 3,
                ..Default::default()
            }),
            spec: Some(VolumeSpec {
                class: "fast".into(),
                resources: Some(VolumeResources { storage_bytes: 42 }),
                ..Default::default()
            }),
            status: Some(VolumeStatus {
                state: VolumeState::VolumeError as i32,
                ..Default::default()
            }),
            failed_generation: 3,
            failure: "no space".into(),
            encryption_key: vec![1, 2, 3],
        };
        let bytes = record.encode_to_vec();
        let volume = Volume::decode(bytes.as_slice()).unwrap();
        assert_eq!(volume, record.clone().into_volume());
        let back = VolumeRecord::decode(volume.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.spec, record.spec);
        assert_eq!(back.failed_generation, 0);
        assert_eq!(record.committed_bytes(), 42);
        assert_eq!(record.state(), VolumeState::VolumeError);
    }
}
