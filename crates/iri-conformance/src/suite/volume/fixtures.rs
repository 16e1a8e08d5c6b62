// SPDX-License-Identifier: Apache-2.0
//! Volume and snapshot fixtures: the class to use, request builders, create-and-track, get,
//! wait until available/ready/gone, delete-and-wait.

use std::collections::BTreeMap;

use iri_api::{
    meta::v1alpha1::ObjectMetadata,
    volume::v1alpha1::{
        CreateVolumeRequest, CreateVolumeSnapshotRequest, DeleteVolumeRequest, DeleteVolumeSnapshotRequest,
        ListVolumeSnapshotsRequest, ListVolumesRequest, SnapshotDataSource, StatusRequest, Volume,
        VolumeClassStatus, VolumeDataSource, VolumeFilter, VolumeResources, VolumeSnapshot,
        VolumeSnapshotFilter, VolumeSnapshotSpec, VolumeSnapshotState, VolumeSpec, VolumeState,
    },
};

use crate::{
    call, ensure,
    harness::{Ctx, TestError, TestResult, Tracked},
};

/// One mebibyte.
pub(crate) const MIB: i64 = 1 << 20;
/// One gibibyte.
pub(crate) const GIB: i64 = 1 << 30;

/// The class the tests use (`config.volume.class`, else the first `Status` reports) with its
/// status. Fails when the runtime reports no class or not the configured one.
pub(crate) async fn class(ctx: &mut Ctx) -> Result<VolumeClassStatus, TestError> {
    let status = call!(ctx, volume.status(StatusRequest {}))?;
    let wanted = ctx.config.volume.class.clone();
    let classes = status.volume_class_status;
    let found = if wanted.is_empty() {
        classes.into_iter().next()
    } else {
        classes.into_iter().find(|c| class_name(c) == wanted)
    };
    found.ok_or_else(|| {
        TestError::fail(if wanted.is_empty() {
            "Status reports no volume class".to_string()
        } else {
            format!("Status does not report the configured volume class {wanted:?}")
        })
    })
}

/// The name of a class status entry ("" when the runtime left `volume_class` out).
pub(crate) fn class_name(class: &VolumeClassStatus) -> &str {
    class.volume_class.as_ref().map(|c| c.name.as_str()).unwrap_or("")
}

/// The configured test volume size.
pub(crate) fn size(ctx: &Ctx) -> i64 {
    ctx.config.volume.size_bytes
}

/// A plain volume spec: `class`, `size` bytes, nothing else.
pub(crate) fn spec(class: &str, size: i64) -> VolumeSpec {
    VolumeSpec {
        class: class.to_string(),
        resources: Some(VolumeResources { storage_bytes: size }),
        encryption: None,
        volume_data_source: None,
    }
}

/// A volume spec restored from snapshot `snapshot_id`.
pub(crate) fn spec_from_snapshot(class: &str, size: i64, snapshot_id: &str) -> VolumeSpec {
    VolumeSpec {
        volume_data_source: Some(VolumeDataSource {
            image_data_source: None,
            snapshot_data_source: Some(SnapshotDataSource {
                snapshot_id: snapshot_id.to_string(),
            }),
        }),
        ..spec(class, size)
    }
}

/// Metadata as a client sends it: labels and annotations only.
pub(crate) fn metadata(
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
) -> ObjectMetadata {
    ObjectMetadata {
        labels,
        annotations,
        ..Default::default()
    }
}

/// A create request for a volume with `labels` and `spec`.
pub(crate) fn request(labels: BTreeMap<String, String>, spec: VolumeSpec) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume: Some(Volume {
            metadata: Some(metadata(labels, BTreeMap::new())),
            spec: Some(spec),
            status: None,
        }),
    }
}

/// The volume's id ("" without metadata).
pub(crate) fn id(volume: &Volume) -> &str {
    volume.metadata.as_ref().map(|m| m.id.as_str()).unwrap_or("")
}

/// The volume's state (PENDING when the runtime sent no status).
pub(crate) fn state(volume: &Volume) -> i32 {
    volume.status.as_ref().map(|s| s.state).unwrap_or_default()
}

/// The enum name of a volume state, for messages.
pub(crate) fn state_name(state: i32) -> String {
    VolumeState::try_from(state)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("state {state}"))
}

/// `status.resources.storage_bytes` (0 when absent).
pub(crate) fn status_bytes(volume: &Volume) -> i64 {
    volume
        .status
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .map(|r| r.storage_bytes)
        .unwrap_or(0)
}

/// `spec.resources.storage_bytes` (0 when absent).
pub(crate) fn spec_bytes(volume: &Volume) -> i64 {
    volume
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .map(|r| r.storage_bytes)
        .unwrap_or(0)
}

/// Creates a volume, tracks it, and returns what CreateVolume returned. Fails on an error and
/// on a response without a volume id.
pub(crate) async fn create(ctx: &mut Ctx, request: CreateVolumeRequest) -> Result<Volume, TestError> {
    let response = call!(ctx, volume.create_volume(request))?;
    let created = response
        .volume
        .ok_or_else(|| TestError::fail("CreateVolume returned no volume"))?;
    ensure!(
        !id(&created).is_empty(),
        "CreateVolume returned a volume without metadata.id"
    );
    ctx.track(Tracked::Volume(id(&created).to_string()));
    Ok(created)
}

/// Creates a plain volume of the test class and size with the test's labels plus `extra`.
pub(crate) async fn create_plain(ctx: &mut Ctx, extra: &[(&str, &str)]) -> Result<Volume, TestError> {
    let class = class(ctx).await?;
    let request = request(ctx.labels(extra), spec(class_name(&class), size(ctx)));
    create(ctx, request).await
}

/// Creates a plain volume and waits until it is available.
pub(crate) async fn create_available(ctx: &mut Ctx, extra: &[(&str, &str)]) -> Result<Volume, TestError> {
    let created = create_plain(ctx, extra).await?;
    wait_available(ctx, id(&created)).await
}

/// ListVolumes with `filter`, recorded.
pub(crate) async fn list(ctx: &mut Ctx, filter: VolumeFilter) -> Result<Vec<Volume>, TestError> {
    Ok(call!(
        ctx,
        volume.list_volumes(ListVolumesRequest { filter: Some(filter) })
    )?
    .volumes)
}

/// The volume with `id`, if listed; fails when List by id returns anything else.
pub(crate) async fn get(ctx: &mut Ctx, volume_id: &str) -> Result<Option<Volume>, TestError> {
    let listed = list(
        ctx,
        VolumeFilter {
            id: volume_id.to_string(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        listed.len() <= 1 && listed.iter().all(|v| id(v) == volume_id),
        "ListVolumes with id {volume_id} returned {:?}",
        listed.iter().map(id).collect::<Vec<_>>()
    );
    Ok(listed.into_iter().next())
}

/// The volume with `id`; fails when it is not listed.
pub(crate) async fn must_get(ctx: &mut Ctx, volume_id: &str) -> Result<Volume, TestError> {
    get(ctx, volume_id)
        .await?
        .ok_or_else(|| TestError::fail(format!("ListVolumes with id {volume_id} returned nothing")))
}

/// Waits until volume `id` is VOLUME_AVAILABLE and returns it; fails at once on VOLUME_ERROR
/// or when it disappears.
pub(crate) async fn wait_available(ctx: &Ctx, volume_id: &str) -> Result<Volume, TestError> {
    let what = format!("volume {volume_id} becomes VOLUME_AVAILABLE");
    let volume_id = volume_id.to_string();
    ctx.eventually(&what, ctx.config.timeouts.ready(), move |p| {
        let volume_id = volume_id.clone();
        async move {
            let listed = p
                .volume()
                .list_volumes(p.request(ListVolumesRequest {
                    filter: Some(VolumeFilter {
                        id: volume_id.clone(),
                        ..Default::default()
                    }),
                }))
                .await?
                .into_inner()
                .volumes;
            let Some(volume) = listed.into_iter().find(|v| id(v) == volume_id) else {
                return Err(TestError::fail(format!(
                    "volume {volume_id} disappeared while waiting for VOLUME_AVAILABLE"
                )));
            };
            let state = state(&volume);
            if state == VolumeState::VolumeError as i32 {
                return Err(TestError::fail(format!(
                    "volume {volume_id} went to VOLUME_ERROR instead of VOLUME_AVAILABLE"
                )));
            }
            let done = state == VolumeState::VolumeAvailable as i32;
            Ok((done.then_some(volume), state_name(state)))
        }
    })
    .await
}

/// Deletes volume `id` (the first delete must succeed), waits until it is gone, untracks it.
pub(crate) async fn delete_and_wait(ctx: &mut Ctx, volume_id: &str) -> TestResult {
    crate::suite::common::Kind::Volume
        .delete_and_wait(ctx, volume_id)
        .await
}

/// DeleteVolume, recorded, returning the raw result.
pub(crate) async fn delete(ctx: &mut Ctx, volume_id: &str) -> Result<(), tonic::Status> {
    call!(
        ctx,
        volume.delete_volume(DeleteVolumeRequest {
            volume_id: volume_id.to_string()
        })
    )
    .map(drop)
}

// ---------------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------------

/// A create request for a snapshot of `volume_id` with `labels`.
pub(crate) fn snapshot_request(
    labels: BTreeMap<String, String>,
    volume_id: &str,
) -> CreateVolumeSnapshotRequest {
    CreateVolumeSnapshotRequest {
        volume_snapshot: Some(VolumeSnapshot {
            metadata: Some(metadata(labels, BTreeMap::new())),
            spec: Some(VolumeSnapshotSpec {
                volume_id: volume_id.to_string(),
            }),
            status: None,
        }),
    }
}

/// The snapshot's id ("" without metadata).
pub(crate) fn snapshot_id(snapshot: &VolumeSnapshot) -> &str {
    snapshot.metadata.as_ref().map(|m| m.id.as_str()).unwrap_or("")
}

/// The snapshot's state (PENDING when the runtime sent no status).
pub(crate) fn snapshot_state(snapshot: &VolumeSnapshot) -> i32 {
    snapshot.status.as_ref().map(|s| s.state).unwrap_or_default()
}

/// `status.size` of a snapshot (0 when absent).
pub(crate) fn snapshot_size(snapshot: &VolumeSnapshot) -> i64 {
    snapshot.status.as_ref().map(|s| s.size).unwrap_or(0)
}

/// The enum name of a snapshot state, for messages.
pub(crate) fn snapshot_state_name(state: i32) -> String {
    VolumeSnapshotState::try_from(state)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("state {state}"))
}

/// Creates a snapshot, tracks it, and returns what CreateVolumeSnapshot returned.
pub(crate) async fn create_snapshot(
    ctx: &mut Ctx,
    request: CreateVolumeSnapshotRequest,
) -> Result<VolumeSnapshot, TestError> {
    let response = call!(ctx, volume.create_volume_snapshot(request))?;
    let created = response
        .volume_snapshot
        .ok_or_else(|| TestError::fail("CreateVolumeSnapshot returned no volume_snapshot"))?;
    ensure!(
        !snapshot_id(&created).is_empty(),
        "CreateVolumeSnapshot returned a snapshot without metadata.id"
    );
    ctx.track(Tracked::VolumeSnapshot(snapshot_id(&created).to_string()));
    Ok(created)
}

/// Snapshots volume `volume_id` with the test's labels plus `extra` and waits until the
/// snapshot is READY.
pub(crate) async fn create_ready_snapshot(
    ctx: &mut Ctx,
    volume_id: &str,
    extra: &[(&str, &str)],
) -> Result<VolumeSnapshot, TestError> {
    let request = snapshot_request(ctx.labels(extra), volume_id);
    let created = create_snapshot(ctx, request).await?;
    wait_snapshot_ready(ctx, snapshot_id(&created)).await
}

/// ListVolumeSnapshots with `filter`, recorded.
pub(crate) async fn list_snapshots(
    ctx: &mut Ctx,
    filter: VolumeSnapshotFilter,
) -> Result<Vec<VolumeSnapshot>, TestError> {
    Ok(call!(
        ctx,
        volume.list_volume_snapshots(ListVolumeSnapshotsRequest { filter: Some(filter) })
    )?
    .volume_snapshots)
}

/// The snapshot with `id`, if listed; fails when List by id returns anything else.
pub(crate) async fn get_snapshot(ctx: &mut Ctx, wanted: &str) -> Result<Option<VolumeSnapshot>, TestError> {
    let listed = list_snapshots(
        ctx,
        VolumeSnapshotFilter {
            id: wanted.to_string(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        listed.len() <= 1 && listed.iter().all(|s| snapshot_id(s) == wanted),
        "ListVolumeSnapshots with id {wanted} returned {:?}",
        listed.iter().map(snapshot_id).collect::<Vec<_>>()
    );
    Ok(listed.into_iter().next())
}

/// Waits until snapshot `id` is VOLUME_SNAPSHOT_READY and returns it; fails at once on
/// VOLUME_SNAPSHOT_FAILED or when it disappears.
pub(crate) async fn wait_snapshot_ready(ctx: &Ctx, wanted: &str) -> Result<VolumeSnapshot, TestError> {
    let what = format!("volume snapshot {wanted} becomes VOLUME_SNAPSHOT_READY");
    let wanted = wanted.to_string();
    ctx.eventually(&what, ctx.config.timeouts.ready(), move |p| {
        let wanted = wanted.clone();
        async move {
            let listed = p
                .volume()
                .list_volume_snapshots(p.request(ListVolumeSnapshotsRequest {
                    filter: Some(VolumeSnapshotFilter {
                        id: wanted.clone(),
                        ..Default::default()
                    }),
                }))
                .await?
                .into_inner()
                .volume_snapshots;
            let Some(snapshot) = listed.into_iter().find(|s| snapshot_id(s) == wanted) else {
                return Err(TestError::fail(format!(
                    "volume snapshot {wanted} disappeared while waiting for VOLUME_SNAPSHOT_READY"
                )));
            };
            let state = snapshot_state(&snapshot);
            if state == VolumeSnapshotState::VolumeSnapshotFailed as i32 {
                return Err(TestError::fail(format!(
                    "volume snapshot {wanted} went to VOLUME_SNAPSHOT_FAILED instead of READY"
                )));
            }
            let done = state == VolumeSnapshotState::VolumeSnapshotReady as i32;
            Ok((done.then_some(snapshot), snapshot_state_name(state)))
        }
    })
    .await
}

/// Waits until List by id no longer returns snapshot `id`.
pub(crate) async fn wait_snapshot_gone(ctx: &Ctx, wanted: &str) -> TestResult {
    let what = format!("deleted volume snapshot {wanted} disappears from List");
    let wanted = wanted.to_string();
    ctx.eventually(&what, ctx.config.timeouts.delete(), move |p| {
        let wanted = wanted.clone();
        async move {
            let listed = p
                .volume()
                .list_volume_snapshots(p.request(ListVolumeSnapshotsRequest {
                    filter: Some(VolumeSnapshotFilter {
                        id: wanted.clone(),
                        ..Default::default()
                    }),
                }))
                .await?
                .into_inner()
                .volume_snapshots;
            Ok(match listed.iter().find(|s| snapshot_id(s) == wanted) {
                None => (Some(()), "gone".to_string()),
                Some(s) => (
                    None,
                    format!("still listed as {}", snapshot_state_name(snapshot_state(s))),
                ),
            })
        }
    })
    .await
}

/// DeleteVolumeSnapshot, recorded, returning the raw result.
pub(crate) async fn delete_snapshot(ctx: &mut Ctx, wanted: &str) -> Result<(), tonic::Status> {
    call!(
        ctx,
        volume.delete_volume_snapshot(DeleteVolumeSnapshotRequest {
            volume_snapshot_id: wanted.to_string()
        })
    )
    .map(drop)
}

/// Deletes snapshot `id` (the first delete must succeed), waits until it is gone, untracks it.
pub(crate) async fn delete_snapshot_and_wait(ctx: &mut Ctx, wanted: &str) -> TestResult {
    if let Err(status) = delete_snapshot(ctx, wanted).await {
        return Err(TestError::fail(format!(
            "DeleteVolumeSnapshot of existing snapshot {wanted}: unexpected {:?}: {}",
            status.code(),
            status.message()
        )));
    }
    wait_snapshot_gone(ctx, wanted).await?;
    ctx.untrack(&Tracked::VolumeSnapshot(wanted.to_string()));
    Ok(())
}
