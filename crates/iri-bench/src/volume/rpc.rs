// SPDX-License-Identifier: Apache-2.0
//! The VolumeRuntime calls the benchmark makes, as a volumepoollet would: create, poll the list
//! until the state is reached, delete and poll until NotFound.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use iri_api::{
    meta::v1alpha1::ObjectMetadata,
    volume::v1alpha1::{
        CreateVolumeRequest, CreateVolumeSnapshotRequest, DeleteVolumeRequest, DeleteVolumeSnapshotRequest,
        ListVolumeSnapshotsRequest, ListVolumesRequest, SnapshotDataSource, StatusRequest, Volume,
        VolumeDataSource, VolumeFilter, VolumeResources, VolumeSnapshot, VolumeSnapshotFilter,
        VolumeSnapshotSpec, VolumeSnapshotState, VolumeSpec, VolumeState,
        volume_runtime_client::VolumeRuntimeClient,
    },
};
use tonic::{Code, Status, transport::Channel};

use super::provider::CLASS;

/// A VolumeRuntime client.
pub type Client = VolumeRuntimeClient<Channel>;

/// Label on every object the benchmark creates.
pub const LABEL: &str = "iri-bench";

/// How long a volume or snapshot may take to become ready or to be deleted.
const CONVERGE: Duration = Duration::from_secs(120);
/// Pause between polls: short, so that it adds little to the measured times (lists are served
/// from the provider's memory).
const POLL: Duration = Duration::from_millis(1);

fn metadata() -> Option<ObjectMetadata> {
    Some(ObjectMetadata {
        labels: BTreeMap::from([(LABEL.to_string(), "volume".to_string())]),
        ..Default::default()
    })
}

/// CreateVolume of `size` bytes in the benchmark's class, from `snapshot` if given. Returns the
/// id, or the provider's refusal as it is.
pub async fn create_volume(client: &mut Client, size: u64, snapshot: Option<&str>) -> Result<String, Status> {
    let spec = VolumeSpec {
        class: CLASS.into(),
        resources: Some(VolumeResources {
            storage_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        }),
        encryption: None,
        volume_data_source: snapshot.map(|id| VolumeDataSource {
            image_data_source: None,
            snapshot_data_source: Some(SnapshotDataSource {
                snapshot_id: id.to_string(),
            }),
        }),
    };
    let volume = client
        .create_volume(CreateVolumeRequest {
            volume: Some(Volume {
                metadata: metadata(),
                spec: Some(spec),
                status: None,
            }),
        })
        .await?
        .into_inner()
        .volume
        .ok_or_else(|| Status::internal("CreateVolume answered without a volume"))?;
    Ok(volume.metadata.map(|m| m.id).unwrap_or_default())
}

/// Polls until volume `id` is AVAILABLE; returns it (with its access).
pub async fn wait_available(client: &mut Client, id: &str) -> Result<Volume> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let volume = client
            .list_volumes(ListVolumesRequest {
                filter: Some(VolumeFilter {
                    id: id.into(),
                    ..Default::default()
                }),
            })
            .await
            .context("ListVolumes")?
            .into_inner()
            .volumes
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("volume {id} disappeared"))?;
        let state = volume.status.as_ref().map_or(0, |s| s.state);
        if state == VolumeState::VolumeAvailable as i32 {
            return Ok(volume);
        }
        if state == VolumeState::VolumeError as i32 {
            bail!("volume {id} went to VOLUME_ERROR");
        }
        if Instant::now() > deadline {
            bail!("volume {id} not AVAILABLE after {CONVERGE:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// CreateVolumeSnapshot of volume `volume`; returns the snapshot id.
pub async fn create_snapshot(client: &mut Client, volume: &str) -> Result<String> {
    let snapshot = client
        .create_volume_snapshot(CreateVolumeSnapshotRequest {
            volume_snapshot: Some(VolumeSnapshot {
                metadata: metadata(),
                spec: Some(VolumeSnapshotSpec {
                    volume_id: volume.into(),
                }),
                status: None,
            }),
        })
        .await
        .context("CreateVolumeSnapshot")?
        .into_inner()
        .volume_snapshot
        .ok_or_else(|| anyhow!("CreateVolumeSnapshot answered without a snapshot"))?;
    Ok(snapshot.metadata.map(|m| m.id).unwrap_or_default())
}

/// Polls until snapshot `id` is READY.
pub async fn wait_snapshot_ready(client: &mut Client, id: &str) -> Result<()> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let snapshot = client
            .list_volume_snapshots(ListVolumeSnapshotsRequest {
                filter: Some(VolumeSnapshotFilter {
                    id: id.into(),
                    ..Default::default()
                }),
            })
            .await
            .context("ListVolumeSnapshots")?
            .into_inner()
            .volume_snapshots
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("snapshot {id} disappeared"))?;
        let state = snapshot.status.as_ref().map_or(0, |s| s.state);
        if state == VolumeSnapshotState::VolumeSnapshotReady as i32 {
            return Ok(());
        }
        if state == VolumeSnapshotState::VolumeSnapshotFailed as i32 {
            bail!("snapshot {id} went to VOLUME_SNAPSHOT_FAILED");
        }
        if Instant::now() > deadline {
            bail!("snapshot {id} not READY after {CONVERGE:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Deletes volume `id` and polls DeleteVolume until NotFound (the volume and its room are gone).
pub async fn delete_volume(client: &mut Client, id: &str) -> Result<()> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        match client
            .delete_volume(DeleteVolumeRequest { volume_id: id.into() })
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => return Ok(()),
            Err(status) => bail!("DeleteVolume {id}: {status}"),
        }
        if Instant::now() > deadline {
            bail!("volume {id} not deleted after {CONVERGE:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Deletes snapshot `id` and polls until NotFound.
pub async fn delete_snapshot(client: &mut Client, id: &str) -> Result<()> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        match client
            .delete_volume_snapshot(DeleteVolumeSnapshotRequest {
                volume_snapshot_id: id.into(),
            })
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => return Ok(()),
            Err(status) => bail!("DeleteVolumeSnapshot {id}: {status}"),
        }
        if Instant::now() > deadline {
            bail!("snapshot {id} not deleted after {CONVERGE:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The bytes Status says the benchmark's class can still be promised.
pub async fn quantity(client: &mut Client) -> Result<u64> {
    let status = client
        .status(StatusRequest {})
        .await
        .context("Status")?
        .into_inner();
    let class = status
        .volume_class_status
        .iter()
        .find(|c| c.volume_class.as_ref().is_some_and(|c| c.name == CLASS))
        .ok_or_else(|| anyhow!("Status does not list class {CLASS:?}"))?;
    Ok(u64::try_from(class.quantity).unwrap_or(0))
}

/// The NBD URI of an AVAILABLE volume (`status.access.attributes["uri"]`).
pub fn export_uri(volume: &Volume) -> Result<String> {
    let access = volume
        .status
        .as_ref()
        .and_then(|s| s.access.as_ref())
        .ok_or_else(|| anyhow!("the volume has no access"))?;
    if access.driver != "nbd" {
        bail!("access driver {:?}, expected nbd", access.driver);
    }
    access
        .attributes
        .get("uri")
        .cloned()
        .ok_or_else(|| anyhow!("the access has no uri attribute: {access:?}"))
}
