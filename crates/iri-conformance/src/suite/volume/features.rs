// SPDX-License-Identifier: Apache-2.0
//! Volume tests of optional capabilities: expansion, snapshots (and volumes restored from
//! them), encryption.

use std::collections::BTreeMap;

use iri_api::volume::v1alpha1::{
    CreateVolumeRequest, CreateVolumeSnapshotRequest, EncryptionSpec, ExpandVolumeRequest, Volume,
    VolumeResources, VolumeSnapshot, VolumeSnapshotFilter, VolumeSnapshotSpec, VolumeSnapshotState,
    VolumeState,
};
use iri_runtime::id::now_nanos;
use tonic::{Code, Status};

use super::{
    basics::{check_volume_round_trip, tricky_annotations},
    fixtures::{
        self, class_name, id, snapshot_id, snapshot_size, snapshot_state, snapshot_state_name, spec_bytes,
        state_name, status_bytes,
    },
};
use crate::suite::common::{check_created_at, check_mentions, check_metadata_round_trip, unknown_id};
use crate::{
    call, ensure,
    harness::{Ctx, TestError, TestResult, Tracked, expect_code},
};

// ---------------------------------------------------------------------------------------------
// Expand
// ---------------------------------------------------------------------------------------------

async fn expand(ctx: &mut Ctx, volume_id: &str, storage_bytes: i64) -> Result<(), Status> {
    call!(
        ctx,
        volume.expand_volume(ExpandVolumeRequest {
            volume_id: volume_id.to_string(),
            resources: Some(VolumeResources { storage_bytes }),
        })
    )
    .map(drop)
}

/// ExpandVolume to a bigger size shows in the spec at once and in the status eventually, the
/// volume stays available; expanding to the current size is an OK no-op.
pub(crate) async fn expand_grows(ctx: &mut Ctx) -> TestResult {
    let size = fixtures::size(ctx);
    let bigger = 2 * size;
    let created = fixtures::create_available(ctx, &[]).await?;
    let volume_id = id(&created).to_string();

    expand(ctx, &volume_id, bigger).await?;
    let listed = fixtures::must_get(ctx, &volume_id).await?;
    ensure!(
        spec_bytes(&listed) == bigger,
        "after ExpandVolume to {bigger} bytes, spec.resources.storage_bytes is {}",
        spec_bytes(&listed)
    );
    wait_status_bytes(ctx, &volume_id, bigger).await?;

    // The same size again: nothing to do, and nothing to complain about.
    expand(ctx, &volume_id, bigger).await?;
    let listed = fixtures::must_get(ctx, &volume_id).await?;
    ensure!(
        spec_bytes(&listed) == bigger && status_bytes(&listed) >= bigger,
        "after ExpandVolume to the current size {bigger}, spec/status storage_bytes are {}/{}",
        spec_bytes(&listed),
        status_bytes(&listed)
    );
    ensure!(
        fixtures::state(&listed) == VolumeState::VolumeAvailable as i32,
        "volume {volume_id} is {} after expansion",
        state_name(fixtures::state(&listed))
    );
    Ok(())
}

/// Waits until the volume is available with `status.resources.storage_bytes >= bytes`.
async fn wait_status_bytes(ctx: &Ctx, volume_id: &str, bytes: i64) -> TestResult {
    let what = format!("volume {volume_id} reports status.resources.storage_bytes >= {bytes}");
    let wanted = volume_id.to_string();
    ctx.eventually(&what, ctx.config.timeouts.ready(), move |p| {
        let wanted = wanted.clone();
        async move {
            let listed = p
                .volume()
                .list_volumes(p.request(iri_api::volume::v1alpha1::ListVolumesRequest {
                    filter: Some(iri_api::volume::v1alpha1::VolumeFilter {
                        id: wanted.clone(),
                        ..Default::default()
                    }),
                }))
                .await?
                .into_inner()
                .volumes;
            let Some(volume) = listed.into_iter().find(|v| id(v) == wanted) else {
                return Err(TestError::fail(format!(
                    "volume {wanted} disappeared while expanding"
                )));
            };
            let state = fixtures::state(&volume);
            if state == VolumeState::VolumeError as i32 {
                return Err(TestError::fail(format!(
                    "volume {wanted} went to VOLUME_ERROR while expanding"
                )));
            }
            let done = state == VolumeState::VolumeAvailable as i32 && status_bytes(&volume) >= bytes;
            Ok((
                done.then_some(()),
                format!("{}, {} bytes", state_name(state), status_bytes(&volume)),
            ))
        }
    })
    .await
}

/// Shrinking is InvalidArgument and leaves the size as it was (data loss is never implied).
pub(crate) async fn expand_rejects_shrink(ctx: &mut Ctx) -> TestResult {
    let size = fixtures::size(ctx);
    let created = fixtures::create_available(ctx, &[]).await?;
    let volume_id = id(&created).to_string();
    let smaller = size / 2;
    let result = expand(ctx, &volume_id, smaller).await;
    let what = format!("ExpandVolume from {size} to {smaller} bytes (shrink)");
    let status = expect_code(result, Code::InvalidArgument, &what)?;
    check_mentions(&status, "storage_bytes", &what)?;
    let listed = fixtures::must_get(ctx, &volume_id).await?;
    ensure!(
        spec_bytes(&listed) == size && status_bytes(&listed) >= size,
        "a rejected shrink changed the volume: spec/status storage_bytes are {}/{}, was {size}",
        spec_bytes(&listed),
        status_bytes(&listed)
    );
    Ok(())
}

/// ExpandVolume of an unknown id is NotFound; without resources it is InvalidArgument and
/// changes nothing.
pub(crate) async fn expand_invalid_requests(ctx: &mut Ctx) -> TestResult {
    let size = fixtures::size(ctx);
    let result = expand(ctx, &unknown_id(), 2 * size).await;
    expect_code(result, Code::NotFound, "ExpandVolume of an unknown id")?;

    let created = fixtures::create_available(ctx, &[]).await?;
    let volume_id = id(&created).to_string();
    let result = call!(
        ctx,
        volume.expand_volume(ExpandVolumeRequest {
            volume_id: volume_id.clone(),
            resources: None,
        })
    );
    let what = "ExpandVolume without resources";
    let status = expect_code(result, Code::InvalidArgument, what)?;
    check_mentions(&status, "resources", what)?;
    let listed = fixtures::must_get(ctx, &volume_id).await?;
    ensure!(
        spec_bytes(&listed) == size,
        "a rejected ExpandVolume changed spec.resources.storage_bytes from {size} to {}",
        spec_bytes(&listed)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------------

/// The snapshot's spec, as sent: `{volume_id}`.
fn snapshot_spec(volume_id: &str) -> Option<VolumeSnapshotSpec> {
    Some(VolumeSnapshotSpec {
        volume_id: volume_id.to_string(),
    })
}

/// Create a snapshot of an available volume: id, spec echoed, labels verbatim, listed by id
/// and labels, READY with the volume's size; delete it, it disappears, a second delete is
/// NotFound, and the volume is untouched.
pub(crate) async fn snapshot_lifecycle(ctx: &mut Ctx) -> TestResult {
    let started = now_nanos();
    let source = fixtures::create_available(ctx, &[]).await?;
    let volume_id = id(&source).to_string();
    let labels = ctx.labels(&[(
        "volumepoollet.ironcore.dev/volume-snapshot-uid",
        &super::basics::uuid_like(),
    )]);
    let annotations = tricky_annotations();
    let mut request = fixtures::snapshot_request(labels.clone(), &volume_id);
    if let Some(metadata) = request.volume_snapshot.as_mut().and_then(|s| s.metadata.as_mut()) {
        metadata.annotations = annotations.clone();
    }
    let created = fixtures::create_snapshot(ctx, request).await?;
    let snap_id = snapshot_id(&created).to_string();
    ensure!(
        !snap_id.contains("://"),
        "snapshot id {snap_id:?} contains \"://\""
    );
    // Upstream's volumebroker drops the spec here, which crashes irictl (iri-contract §2.3).
    ensure!(
        created.spec == snapshot_spec(&volume_id),
        "CreateVolumeSnapshot returned spec {:?}, expected the spec sent ({:?})",
        created.spec,
        snapshot_spec(&volume_id)
    );
    let metadata = created.metadata.clone().unwrap_or_default();
    check_created_at("CreateVolumeSnapshot", metadata.created_at, started)?;
    check_metadata_round_trip("CreateVolumeSnapshot", &metadata, &labels, &annotations)?;
    let initial = snapshot_state(&created);
    ensure!(
        initial == VolumeSnapshotState::VolumeSnapshotPending as i32
            || initial == VolumeSnapshotState::VolumeSnapshotReady as i32,
        "CreateVolumeSnapshot returned state {}, expected PENDING or READY",
        snapshot_state_name(initial)
    );

    let listed = fixtures::get_snapshot(ctx, &snap_id)
        .await?
        .ok_or_else(|| TestError::fail(format!("ListVolumeSnapshots with id {snap_id} returned nothing")))?;
    check_snapshot_listed("ListVolumeSnapshots", &listed, &volume_id, &labels, &annotations)?;
    let by_labels = fixtures::list_snapshots(
        ctx,
        VolumeSnapshotFilter {
            label_selector: labels.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        by_labels.len() == 1 && snapshot_id(&by_labels[0]) == snap_id,
        "ListVolumeSnapshots by the snapshot's labels returned {:?}, expected [{snap_id}]",
        by_labels.iter().map(snapshot_id).collect::<Vec<_>>()
    );

    let ready = fixtures::wait_snapshot_ready(ctx, &snap_id).await?;
    check_snapshot_listed(
        "ListVolumeSnapshots once ready",
        &ready,
        &volume_id,
        &labels,
        &annotations,
    )?;
    let source_bytes = status_bytes(&source);
    ensure!(
        snapshot_size(&ready) == source_bytes,
        "ready snapshot {snap_id} has status.size {}, its volume has {source_bytes} bytes",
        snapshot_size(&ready)
    );

    fixtures::delete_snapshot_and_wait(ctx, &snap_id).await?;
    let again = fixtures::delete_snapshot(ctx, &snap_id).await;
    expect_code(
        again,
        Code::NotFound,
        "second DeleteVolumeSnapshot of a deleted snapshot",
    )?;
    let volume = fixtures::must_get(ctx, &volume_id).await?;
    ensure!(
        fixtures::state(&volume) == VolumeState::VolumeAvailable as i32,
        "volume {volume_id} is {} after its snapshot was deleted",
        state_name(fixtures::state(&volume))
    );
    Ok(())
}

fn check_snapshot_listed(
    what: &str,
    snapshot: &VolumeSnapshot,
    volume_id: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> TestResult {
    ensure!(
        snapshot.spec == snapshot_spec(volume_id),
        "{what}: spec {:?}, expected the spec sent ({:?})",
        snapshot.spec,
        snapshot_spec(volume_id)
    );
    let metadata = snapshot.metadata.clone().unwrap_or_default();
    check_metadata_round_trip(what, &metadata, labels, annotations)
}

/// Creates a volume from snapshot `snap_id` with the test's labels plus `extra`; checks the
/// spec is echoed and the volume becomes available with at least `size` bytes.
async fn restore(ctx: &mut Ctx, snap_id: &str, extra: &[(&str, &str)]) -> Result<Volume, TestError> {
    let class = fixtures::class(ctx).await?;
    let size = fixtures::size(ctx);
    let spec = fixtures::spec_from_snapshot(class_name(&class), size, snap_id);
    let request = fixtures::request(ctx.labels(extra), spec.clone());
    let created = fixtures::create(ctx, request).await?;
    let restored_id = id(&created).to_string();
    let available = fixtures::wait_available(ctx, &restored_id).await?;
    ensure!(
        available.spec.as_ref() == Some(&spec),
        "volume restored from snapshot {snap_id}: spec {:?}, expected the spec sent ({spec:?})",
        available.spec
    );
    ensure!(
        status_bytes(&available) >= size,
        "volume restored from snapshot {snap_id} has {} bytes, requested {size}",
        status_bytes(&available)
    );
    Ok(available)
}

/// A volume created from a READY snapshot becomes available with the snapshot as its source.
pub(crate) async fn snapshot_restore(ctx: &mut Ctx) -> TestResult {
    let source = fixtures::create_available(ctx, &[("conformance.iri.ironcore.dev/role", "source")]).await?;
    let snapshot = fixtures::create_ready_snapshot(ctx, id(&source), &[]).await?;
    restore(
        ctx,
        snapshot_id(&snapshot),
        &[("conformance.iri.ironcore.dev/role", "restored")],
    )
    .await?;
    Ok(())
}

/// A snapshot outlives its source volume: still listed and READY with its size, and new
/// volumes can still be created from it.
pub(crate) async fn snapshot_survives_source(ctx: &mut Ctx) -> TestResult {
    let source = fixtures::create_available(ctx, &[("conformance.iri.ironcore.dev/role", "source")]).await?;
    let source_id = id(&source).to_string();
    let snapshot = fixtures::create_ready_snapshot(ctx, &source_id, &[]).await?;
    let snap_id = snapshot_id(&snapshot).to_string();
    let size = snapshot_size(&snapshot);

    fixtures::delete_and_wait(ctx, &source_id).await?;
    let after = fixtures::get_snapshot(ctx, &snap_id).await?.ok_or_else(|| {
        TestError::fail(format!(
            "snapshot {snap_id} is no longer listed after its volume {source_id} was deleted"
        ))
    })?;
    // spec.volume_id is not checked here: it names a volume that no longer exists.
    ensure!(
        snapshot_state(&after) == VolumeSnapshotState::VolumeSnapshotReady as i32
            && snapshot_size(&after) == size,
        "after deleting its volume, snapshot {snap_id} is {} with size {} (was READY, {size})",
        snapshot_state_name(snapshot_state(&after)),
        snapshot_size(&after)
    );
    let selector = ctx.selector();
    let by_labels = fixtures::list_snapshots(
        ctx,
        VolumeSnapshotFilter {
            label_selector: selector,
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        by_labels.iter().any(|s| snapshot_id(s) == snap_id),
        "ListVolumeSnapshots by the test's labels no longer returns {snap_id} after its volume was \
         deleted"
    );
    restore(
        ctx,
        &snap_id,
        &[("conformance.iri.ironcore.dev/role", "restored")],
    )
    .await?;
    Ok(())
}

/// Deleting a snapshot leaves volumes restored from it (and its source) available.
pub(crate) async fn snapshot_delete_keeps_restored(ctx: &mut Ctx) -> TestResult {
    let source = fixtures::create_available(ctx, &[("conformance.iri.ironcore.dev/role", "source")]).await?;
    let source_id = id(&source).to_string();
    let snapshot = fixtures::create_ready_snapshot(ctx, &source_id, &[]).await?;
    let snap_id = snapshot_id(&snapshot).to_string();
    let restored = restore(
        ctx,
        &snap_id,
        &[("conformance.iri.ironcore.dev/role", "restored")],
    )
    .await?;
    let restored_id = id(&restored).to_string();

    fixtures::delete_snapshot_and_wait(ctx, &snap_id).await?;
    for (volume_id, before) in [(&restored_id, &restored), (&source_id, &source)] {
        let after = fixtures::must_get(ctx, volume_id)
            .await
            .map_err(|e| TestError::fail(format!("after deleting snapshot {snap_id}: {}", e.reason)))?;
        ensure!(
            fixtures::state(&after) == VolumeState::VolumeAvailable as i32,
            "volume {volume_id} is {} after snapshot {snap_id} was deleted",
            state_name(fixtures::state(&after))
        );
        let access = |v: &Volume| v.status.as_ref().and_then(|s| s.access.clone());
        ensure!(
            access(&after) == access(before) && status_bytes(&after) == status_bytes(before),
            "deleting snapshot {snap_id} changed volume {volume_id}: access/size was {:?}/{}, is \
             {:?}/{}",
            access(before),
            status_bytes(before),
            access(&after),
            status_bytes(&after)
        );
    }
    Ok(())
}

/// Repeated DeleteVolumeSnapshot: OK while deleting, NotFound once gone, and NotFound only
/// once the snapshot is no longer listed.
pub(crate) async fn snapshot_repeated_delete(ctx: &mut Ctx) -> TestResult {
    let source = fixtures::create_available(ctx, &[]).await?;
    let snapshot = fixtures::create_ready_snapshot(ctx, id(&source), &[]).await?;
    let snap_id = snapshot_id(&snapshot).to_string();
    if let Err(status) = fixtures::delete_snapshot(ctx, &snap_id).await {
        return Err(TestError::fail(format!(
            "first DeleteVolumeSnapshot of {snap_id}: unexpected {:?}: {}",
            status.code(),
            status.message()
        )));
    }
    let what = format!("repeated DeleteVolumeSnapshot of {snap_id} ends in NotFound");
    let wanted = snap_id.clone();
    ctx.eventually(&what, ctx.config.timeouts.delete(), move |p| {
        let wanted = wanted.clone();
        async move {
            let result = p
                .volume()
                .delete_volume_snapshot(p.request(iri_api::volume::v1alpha1::DeleteVolumeSnapshotRequest {
                    volume_snapshot_id: wanted.clone(),
                }))
                .await;
            match result {
                Ok(_) => Ok((None, "OK (still deleting)".to_string())),
                Err(status) if status.code() == Code::NotFound => {
                    let listed = p
                        .volume()
                        .list_volume_snapshots(p.request(
                            iri_api::volume::v1alpha1::ListVolumeSnapshotsRequest {
                                filter: Some(VolumeSnapshotFilter {
                                    id: wanted.clone(),
                                    ..Default::default()
                                }),
                            },
                        ))
                        .await?
                        .into_inner()
                        .volume_snapshots;
                    ensure!(
                        listed.is_empty(),
                        "DeleteVolumeSnapshot said NotFound for {wanted}, but it is still listed"
                    );
                    Ok((Some(()), "NotFound".to_string()))
                }
                Err(status) => Err(TestError::fail(format!(
                    "repeated DeleteVolumeSnapshot of {wanted}: expected OK or NotFound, got {:?}: {}",
                    status.code(),
                    status.message()
                ))),
            }
        }
    })
    .await?;
    ctx.untrack(&Tracked::VolumeSnapshot(snap_id.clone()));
    let again = fixtures::delete_snapshot(ctx, &snap_id).await;
    expect_code(
        again,
        Code::NotFound,
        "DeleteVolumeSnapshot of a deleted snapshot",
    )?;
    Ok(())
}

/// Sends a CreateVolumeSnapshot that must fail with `code` (naming `field` for
/// InvalidArgument); tracks whatever a wrong runtime created anyway.
async fn expect_snapshot_rejected(
    ctx: &mut Ctx,
    case: &str,
    request: CreateVolumeSnapshotRequest,
    code: Code,
    field: &str,
) -> TestResult {
    let result = call!(ctx, volume.create_volume_snapshot(request));
    if let Ok(response) = &result
        && let Some(created) = &response.volume_snapshot
        && !snapshot_id(created).is_empty()
    {
        ctx.track(Tracked::VolumeSnapshot(snapshot_id(created).to_string()));
    }
    let what = format!("CreateVolumeSnapshot {case}");
    let status = expect_code(result, code, &what)?;
    if code == Code::InvalidArgument {
        check_mentions(&status, field, &what)?;
    }
    Ok(())
}

/// Malformed snapshot creates are InvalidArgument naming the field; unknown volume and
/// snapshot ids are NotFound (also as a restore source); List by an unknown id is OK and empty.
pub(crate) async fn snapshot_invalid_requests(ctx: &mut Ctx) -> TestResult {
    // A real, available source, so every request below has exactly one defect.
    let source = fixtures::create_available(ctx, &[]).await?;
    let valid = fixtures::snapshot_request(ctx.labels(&[]), id(&source));
    let snapshot = || valid.volume_snapshot.clone().unwrap_or_default();

    let request = |s: VolumeSnapshot| CreateVolumeSnapshotRequest {
        volume_snapshot: Some(s),
    };
    let invalid = Code::InvalidArgument;
    expect_snapshot_rejected(
        ctx,
        "without volume_snapshot",
        CreateVolumeSnapshotRequest {
            volume_snapshot: None,
        },
        invalid,
        "volume_snapshot",
    )
    .await?;
    let mut no_metadata = snapshot();
    no_metadata.metadata = None;
    expect_snapshot_rejected(ctx, "without metadata", request(no_metadata), invalid, "metadata").await?;
    let mut no_spec = snapshot();
    no_spec.spec = None;
    expect_snapshot_rejected(ctx, "without spec", request(no_spec), invalid, "spec").await?;
    let mut no_volume = snapshot();
    no_volume.spec = snapshot_spec("");
    expect_snapshot_rejected(
        ctx,
        "with an empty spec.volume_id",
        request(no_volume),
        invalid,
        "volume_id",
    )
    .await?;
    let mut unknown_volume = snapshot();
    unknown_volume.spec = snapshot_spec(&unknown_id());
    expect_snapshot_rejected(
        ctx,
        "of an unknown volume",
        request(unknown_volume),
        Code::NotFound,
        "",
    )
    .await?;

    let unknown = unknown_id();
    let result = fixtures::delete_snapshot(ctx, &unknown).await;
    expect_code(result, Code::NotFound, "DeleteVolumeSnapshot of an unknown id")?;
    let listed = fixtures::list_snapshots(
        ctx,
        VolumeSnapshotFilter {
            id: unknown.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        listed.is_empty(),
        "ListVolumeSnapshots with unknown id {unknown} returned {} snapshots",
        listed.len()
    );

    // A dangling restore source is an unknown id like any other.
    let class = fixtures::class(ctx).await?;
    let spec = fixtures::spec_from_snapshot(class_name(&class), fixtures::size(ctx), &unknown);
    let result = call!(
        ctx,
        volume.create_volume(fixtures::request(ctx.labels(&[]), spec))
    );
    if let Ok(response) = &result
        && let Some(created) = &response.volume
        && !id(created).is_empty()
    {
        ctx.track(Tracked::Volume(id(created).to_string()));
    }
    expect_code(result, Code::NotFound, "CreateVolume from an unknown snapshot id")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// A volume from `volume.image` (config) becomes available with at least the requested size,
/// and its spec, image reference included, round-trips.
pub(crate) async fn volume_from_image(ctx: &mut Ctx) -> TestResult {
    let image = ctx.config.volume.image.clone();
    if image.is_empty() {
        return Err(TestError::skip(
            "no image configured: set volume.image in the config file to test volumes from images",
        ));
    }
    let class = fixtures::class(ctx).await?;
    let size = fixtures::size(ctx);
    let spec = iri_api::volume::v1alpha1::VolumeSpec {
        volume_data_source: Some(iri_api::volume::v1alpha1::VolumeDataSource {
            image_data_source: Some(iri_api::volume::v1alpha1::ImageDataSource {
                image,
                architecture: "amd64".into(),
            }),
            snapshot_data_source: None,
        }),
        ..fixtures::spec(class_name(&class), size)
    };
    let labels = ctx.labels(&[]);
    let request = CreateVolumeRequest {
        volume: Some(Volume {
            metadata: Some(fixtures::metadata(labels.clone(), BTreeMap::new())),
            spec: Some(spec.clone()),
            status: None,
        }),
    };
    let created = fixtures::create(ctx, request).await?;
    check_volume_round_trip(
        "CreateVolume (from image)",
        &created,
        &labels,
        &BTreeMap::new(),
        &spec,
    )?;
    let available = fixtures::wait_available(ctx, id(&created)).await?;
    check_volume_round_trip(
        "ListVolumes (from image, available)",
        &available,
        &labels,
        &BTreeMap::new(),
        &spec,
    )?;
    let served = available
        .status
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .map_or(0, |r| r.storage_bytes);
    ensure!(
        served >= size,
        "a volume from an image serves {served} bytes, less than the {size} requested"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Encryption
// ---------------------------------------------------------------------------------------------

/// An encrypted volume becomes available, and its spec round-trips except for the secret:
/// a runtime may omit `encryption` or its `secret_data` in what it returns (upstream omits it,
/// and a runtime that keeps passphrases only wrapped cannot return them), but what it returns
/// must be what was sent or nothing: never other bytes.
pub(crate) async fn encryption_round_trip(ctx: &mut Ctx) -> TestResult {
    let class = fixtures::class(ctx).await?;
    let passphrase: Vec<u8> = unknown_id().into_bytes();
    // The poollet copies the whole encryption Secret, so secret_data can hold more than the
    // key, and Secret values are arbitrary bytes: storage must not assume UTF-8.
    let binary: Vec<u8> = (0..=255u8).collect();
    let spec = iri_api::volume::v1alpha1::VolumeSpec {
        encryption: Some(EncryptionSpec {
            secret_data: BTreeMap::from([
                ("encryptionKey".to_string(), passphrase),
                ("conformance-binary".to_string(), binary),
            ]),
        }),
        ..fixtures::spec(class_name(&class), fixtures::size(ctx))
    };
    let labels = ctx.labels(&[]);
    let request = CreateVolumeRequest {
        volume: Some(Volume {
            metadata: Some(fixtures::metadata(labels.clone(), BTreeMap::new())),
            spec: Some(spec.clone()),
            status: None,
        }),
    };
    let created = fixtures::create(ctx, request).await?;
    let volume_id = id(&created).to_string();
    check_encrypted_round_trip("CreateVolume (encrypted)", created, &labels, &spec)?;
    let available = fixtures::wait_available(ctx, &volume_id).await?;
    check_encrypted_round_trip("ListVolumes (encrypted, available)", available, &labels, &spec)
}

/// [`check_volume_round_trip`] with the secret allowed to be withheld (see
/// [`encryption_round_trip`]).
fn check_encrypted_round_trip(
    what: &str,
    mut volume: Volume,
    labels: &BTreeMap<String, String>,
    sent: &iri_api::volume::v1alpha1::VolumeSpec,
) -> TestResult {
    let returned = volume.spec.as_mut().and_then(|s| s.encryption.take());
    if let Some(returned) = &returned {
        let sent_data = &sent.encryption.as_ref().map(|e| &e.secret_data);
        ensure!(
            returned.secret_data.is_empty() || Some(&returned.secret_data) == sent_data.as_ref().copied(),
            "{what}: spec.encryption.secret_data returned with other content than sent ({} keys)",
            returned.secret_data.len()
        );
    }
    let expected = iri_api::volume::v1alpha1::VolumeSpec {
        encryption: None,
        ..sent.clone()
    };
    check_volume_round_trip(what, &volume, labels, &BTreeMap::new(), &expected)
}
