// SPDX-License-Identifier: Apache-2.0
//! Core volume tests that are volume specific: identity, capacity accounting, argument
//! validation, the life cycle, and metadata/spec round trips.

use std::collections::{BTreeMap, BTreeSet};

use iri_api::volume::v1alpha1::{
    CreateVolumeRequest, StatusRequest, Volume, VolumeFilter, VolumeSpec, VolumeState,
};
use iri_runtime::id::now_nanos;
use tonic::Code;

use super::fixtures::{self, GIB, MIB, class_name, id, state, state_name};
use crate::suite::common::{check_created_at, check_mentions, check_metadata_round_trip, unknown_id};
use crate::{
    call, ensure,
    harness::{Ctx, TestError, TestResult, Tracked, expect_code},
};

/// Status lists the volume classes: named, unique, with capabilities, and a byte quantity.
pub(crate) async fn status_reports_classes(ctx: &mut Ctx) -> TestResult {
    let status = call!(ctx, volume.status(StatusRequest {}))?;
    ensure!(
        !status.volume_class_status.is_empty(),
        "Status reports no volume class"
    );
    let mut names = BTreeSet::new();
    for entry in &status.volume_class_status {
        let Some(class) = entry.volume_class.as_ref() else {
            return Err(TestError::fail("a Status entry has no volume_class"));
        };
        ensure!(!class.name.is_empty(), "a volume class has an empty name");
        ensure!(
            names.insert(class.name.clone()),
            "volume class {:?} is reported twice",
            class.name
        );
        // The volumepoollet dereferences capabilities to map classes (iri-contract §3.5.6).
        let Some(caps) = class.capabilities.as_ref() else {
            return Err(TestError::fail(format!(
                "volume class {:?} has no capabilities",
                class.name
            )));
        };
        ensure!(
            caps.tps >= 0 && caps.iops >= 0,
            "volume class {:?} has negative capabilities: tps {}, iops {}",
            class.name,
            caps.tps,
            caps.iops
        );
        ensure!(
            entry.quantity >= 0,
            "volume class {:?} has a negative quantity {}",
            class.name,
            entry.quantity
        );
        // The quantity is bytes (iri-contract §2.3), not a count of volumes: a storage pool
        // with room for anything has at least a mebibyte.
        ensure!(
            entry.quantity == 0 || entry.quantity >= MIB,
            "volume class {:?} reports quantity {}: that looks like a count, the quantity is \
             storage in bytes",
            class.name,
            entry.quantity
        );
    }
    let wanted = &ctx.config.volume.class;
    ensure!(
        wanted.is_empty() || names.contains(wanted),
        "Status does not report the configured volume class {wanted:?} (reported: {names:?})"
    );
    Ok(())
}

/// The quantity of the class drops by the volume's size while it exists and is restored
/// after it is deleted.
pub(crate) async fn quantity_follows_volumes(ctx: &mut Ctx) -> TestResult {
    let class = fixtures::class(ctx).await?;
    let name = class_name(&class).to_string();
    let size = fixtures::size(ctx);
    let before = class.quantity;
    if before < size {
        return Err(TestError::skip(format!(
            "class {name:?} reports {before} bytes, fewer than the {size} bytes of a test volume"
        )));
    }
    let created = fixtures::create_available(ctx, &[]).await?;
    let volume_id = id(&created).to_string();

    // Accounting may lag behind the state; sizes may be rounded up (to at most a GiB).
    let what = format!("quantity of class {name:?} drops by {size} bytes after creating a volume");
    let probe_name = name.clone();
    ctx.eventually(&what, ctx.config.timeouts.ready(), move |p| {
        let name = probe_name.clone();
        async move {
            let now = quantity(&p, &name).await?;
            let drop = before - now;
            let ok = drop >= size && drop < size + GIB;
            Ok((
                ok.then_some(()),
                format!("quantity {now} (was {before}, drop {drop})"),
            ))
        }
    })
    .await?;

    fixtures::delete_and_wait(ctx, &volume_id).await?;
    let what = format!("quantity of class {name:?} is back at {before} after deleting the volume");
    ctx.eventually(&what, ctx.config.timeouts.delete(), move |p| {
        let name = name.clone();
        async move {
            let now = quantity(&p, &name).await?;
            Ok(((now == before).then_some(()), format!("quantity {now}")))
        }
    })
    .await
}

async fn quantity(p: &crate::harness::Probe, class: &str) -> Result<i64, TestError> {
    let status = p.volume().status(p.request(StatusRequest {})).await?.into_inner();
    status
        .volume_class_status
        .iter()
        .find(|c| class_name(c) == class)
        .map(|c| c.quantity)
        .ok_or_else(|| TestError::fail(format!("Status no longer reports class {class:?}")))
}

/// Sends a CreateVolume that must fail with InvalidArgument naming `field`; tracks whatever a
/// wrong runtime created anyway.
async fn expect_invalid_create(
    ctx: &mut Ctx,
    case: &str,
    request: CreateVolumeRequest,
    field: &str,
) -> TestResult {
    let result = call!(ctx, volume.create_volume(request));
    if let Ok(response) = &result
        && let Some(created) = &response.volume
        && !id(created).is_empty()
    {
        ctx.track(Tracked::Volume(id(created).to_string()));
    }
    let what = format!("CreateVolume {case}");
    let status = expect_code(result, Code::InvalidArgument, &what)?;
    check_mentions(&status, field, &what)
}

/// Malformed creates are InvalidArgument naming the field; unknown ids are NotFound; List by
/// an unknown id is OK and empty (iri-contract §2.0).
pub(crate) async fn invalid_requests(ctx: &mut Ctx) -> TestResult {
    let class = fixtures::class(ctx).await?;
    let class = class_name(&class).to_string();
    let size = fixtures::size(ctx);
    // Each request has exactly one defect, so the expected answer is unambiguous.
    let valid = fixtures::request(ctx.labels(&[]), fixtures::spec(&class, size));
    let volume = || valid.volume.clone().unwrap_or_default();

    expect_invalid_create(
        ctx,
        "without volume",
        CreateVolumeRequest { volume: None },
        "volume",
    )
    .await?;
    let mut no_metadata = volume();
    no_metadata.metadata = None;
    expect_invalid_create(
        ctx,
        "without metadata",
        CreateVolumeRequest {
            volume: Some(no_metadata),
        },
        "metadata",
    )
    .await?;
    let mut no_spec = volume();
    no_spec.spec = None;
    expect_invalid_create(
        ctx,
        "without spec",
        CreateVolumeRequest {
            volume: Some(no_spec),
        },
        "spec",
    )
    .await?;
    let unknown_class = format!("conformance-no-such-class-{}", &unknown_id()[..8]);
    let cases: [(&str, VolumeSpec, &str); 4] = [
        (
            "with an unknown class",
            fixtures::spec(&unknown_class, size),
            "class",
        ),
        (
            "without spec.resources",
            VolumeSpec {
                resources: None,
                ..fixtures::spec(&class, size)
            },
            "resources",
        ),
        ("with storage_bytes 0", fixtures::spec(&class, 0), "storage_bytes"),
        (
            "with storage_bytes -1",
            fixtures::spec(&class, -1),
            "storage_bytes",
        ),
    ];
    for (case, spec, field) in cases {
        let mut invalid = volume();
        invalid.spec = Some(spec);
        expect_invalid_create(
            ctx,
            case,
            CreateVolumeRequest {
                volume: Some(invalid),
            },
            field,
        )
        .await?;
    }

    let unknown = unknown_id();
    let result = fixtures::delete(ctx, &unknown).await;
    expect_code(result, Code::NotFound, "DeleteVolume of an unknown id")?;

    let listed = fixtures::list(
        ctx,
        VolumeFilter {
            id: unknown.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        listed.is_empty(),
        "ListVolumes with unknown id {unknown} returned {} volumes",
        listed.len()
    );
    Ok(())
}

/// Create, list by id and labels, converge to AVAILABLE with access data and the requested
/// size, delete, disappear; a second delete is NotFound.
pub(crate) async fn lifecycle(ctx: &mut Ctx) -> TestResult {
    let started = now_nanos();
    let class = fixtures::class(ctx).await?;
    let size = fixtures::size(ctx);
    let mut request = fixtures::request(ctx.labels(&[]), fixtures::spec(class_name(&class), size));
    // A client-supplied id must be ignored (iri-contract §2.1): the server owns ids.
    let supplied = format!("conformance-client-supplied-{}", &unknown_id()[..8]);
    if let Some(metadata) = request.volume.as_mut().and_then(|v| v.metadata.as_mut()) {
        metadata.id = supplied.clone();
    }
    let created = fixtures::create(ctx, request).await?;
    let volume_id = id(&created).to_string();
    ensure!(
        volume_id != supplied,
        "CreateVolume used the client-supplied metadata.id {supplied:?}; ids are assigned by the \
         server"
    );
    // Poollets publish `<runtime_name>://<id>` and split it again.
    ensure!(
        !volume_id.contains("://"),
        "volume id {volume_id:?} contains \"://\""
    );
    let metadata = created.metadata.clone().unwrap_or_default();
    check_created_at("CreateVolume", metadata.created_at, started)?;
    ensure!(
        metadata.deleted_at == 0,
        "a new volume has deleted_at {}",
        metadata.deleted_at
    );
    let initial = state(&created);
    ensure!(
        initial == VolumeState::VolumePending as i32 || initial == VolumeState::VolumeAvailable as i32,
        "CreateVolume returned state {}, expected VOLUME_PENDING or VOLUME_AVAILABLE",
        state_name(initial)
    );

    let by_id = fixtures::must_get(ctx, &volume_id).await?;
    ensure!(
        by_id.metadata.as_ref().map(|m| m.created_at) == Some(metadata.created_at),
        "ListVolumes returns created_at {:?}, CreateVolume returned {}",
        by_id.metadata.as_ref().map(|m| m.created_at),
        metadata.created_at
    );
    let selector = ctx.selector();
    let by_labels = fixtures::list(
        ctx,
        VolumeFilter {
            label_selector: selector.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        by_labels.len() == 1 && id(&by_labels[0]) == volume_id,
        "ListVolumes by the test's labels returned {:?}, expected [{volume_id}]",
        by_labels.iter().map(id).collect::<Vec<_>>()
    );

    let available = fixtures::wait_available(ctx, &volume_id).await?;
    let access = available
        .status
        .as_ref()
        .and_then(|s| s.access.as_ref())
        .ok_or_else(|| TestError::fail(format!("available volume {volume_id} has no status.access")))?;
    ensure!(
        !access.driver.is_empty(),
        "available volume {volume_id} has an empty status.access.driver"
    );
    ensure!(
        !access.handle.is_empty(),
        "available volume {volume_id} has an empty status.access.handle"
    );
    let status_bytes = fixtures::status_bytes(&available);
    ensure!(
        status_bytes >= size,
        "available volume {volume_id} has status.resources.storage_bytes {status_bytes}, requested \
         {size}"
    );

    fixtures::delete_and_wait(ctx, &volume_id).await?;
    let again = fixtures::delete(ctx, &volume_id).await;
    expect_code(again, Code::NotFound, "second DeleteVolume of a deleted volume")?;
    let left = fixtures::list(
        ctx,
        VolumeFilter {
            label_selector: selector,
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        left.is_empty(),
        "ListVolumes by the test's labels still returns {:?} after deletion",
        left.iter().map(id).collect::<Vec<_>>()
    );
    Ok(())
}

/// Labels (the volumepoollet's among them), annotations and the spec come back byte for byte,
/// from Create and from List, before and after the volume became available; the poollet finds
/// the volume by its UID label.
pub(crate) async fn metadata_round_trip(ctx: &mut Ctx) -> TestResult {
    const UID: &str = "volumepoollet.ironcore.dev/volume-uid";
    let uid = uuid_like();
    let labels = ctx.labels(&[
        (UID, &uid),
        ("volumepoollet.ironcore.dev/volume-namespace", "conformance"),
        ("volumepoollet.ironcore.dev/volume-name", "metadata-round-trip"),
        ("downward-api.volumepoollet.ironcore.dev/root-volume-uid", &uid),
        ("conformance.iri.ironcore.dev/empty", ""),
        ("conformance.iri.ironcore.dev/unicode", "grüße, 世界 ✓"),
    ]);
    let annotations = tricky_annotations();
    let class = fixtures::class(ctx).await?;
    let spec = fixtures::spec(class_name(&class), fixtures::size(ctx));
    let request = CreateVolumeRequest {
        volume: Some(Volume {
            metadata: Some(fixtures::metadata(labels.clone(), annotations.clone())),
            spec: Some(spec.clone()),
            status: None,
        }),
    };
    let created = fixtures::create(ctx, request).await?;
    let volume_id = id(&created).to_string();
    check_volume_round_trip("CreateVolume", &created, &labels, &annotations, &spec)?;
    let listed = fixtures::must_get(ctx, &volume_id).await?;
    check_volume_round_trip("ListVolumes", &listed, &labels, &annotations, &spec)?;

    // How the volumepoollet finds its volume (iri-contract §3.1).
    let mut selector = ctx.selector();
    selector.insert(UID.to_string(), uid.clone());
    let found = fixtures::list(
        ctx,
        VolumeFilter {
            label_selector: selector,
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        found.len() == 1 && id(&found[0]) == volume_id,
        "ListVolumes by {UID}={uid} returned {:?}, expected [{volume_id}]",
        found.iter().map(id).collect::<Vec<_>>()
    );

    let available = fixtures::wait_available(ctx, &volume_id).await?;
    check_volume_round_trip(
        "ListVolumes once available",
        &available,
        &labels,
        &annotations,
        &spec,
    )
}

/// Checks labels, annotations and spec of `volume` against what was sent.
pub(super) fn check_volume_round_trip(
    what: &str,
    volume: &Volume,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    spec: &VolumeSpec,
) -> TestResult {
    let metadata = volume.metadata.clone().unwrap_or_default();
    check_metadata_round_trip(what, &metadata, labels, annotations)?;
    ensure!(
        volume.spec.as_ref() == Some(spec),
        "{what}: spec not returned as sent: sent {spec:?}, got {:?}",
        volume.spec
    );
    Ok(())
}

/// Annotations that trip careless storage: JSON, newlines, an empty value, a long value.
pub(super) fn tricky_annotations() -> BTreeMap<String, String> {
    let long: String = (0..4096).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    BTreeMap::from([
        (
            "conformance.iri.ironcore.dev/json".to_string(),
            r#"{"eth0":{"name":"nic-a","uid":"7d3c"},"quote":"\"x\""}"#.to_string(),
        ),
        (
            "conformance.iri.ironcore.dev/multiline".to_string(),
            "line 1\nline 2\n\ttabbed\r\n".to_string(),
        ),
        ("conformance.iri.ironcore.dev/empty".to_string(), String::new()),
        ("conformance.iri.ironcore.dev/long".to_string(), long),
    ])
}

/// A Kubernetes-UID-shaped random string (what poollets put in their UID labels).
pub(super) fn uuid_like() -> String {
    let hex = unknown_id();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
