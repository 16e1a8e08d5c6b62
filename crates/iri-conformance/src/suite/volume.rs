// SPDX-License-Identifier: Apache-2.0
//! Volume runtime tests (`volume.v1alpha1.VolumeRuntime`).
//!
//! What they hold a runtime to is iri-contract §1.4, §2.0, §2.1, §2.3, §2.5 and §3.3: the
//! answers the volumepoollet relies on, plus the error matrix a correct server follows. Where
//! upstream providers are known to differ (ceph-provider answers Internal for unknown ids,
//! the volumebroker drops snapshot specs, nobody rejects a shrink), the test names the rule so
//! the report explains the failure.
//!
//! Core covers identity, capacity accounting (serial: it reads a global quantity), argument
//! validation, the life cycle, idempotent deletes, metadata and label selectors, events and
//! parallel creates. Expansion, snapshots and encryption are profiles; restart needs the
//! restart hook; the scale test lists `scale.objects` volumes.

mod basics;
mod dataplane;

mod features;
pub(crate) mod fixtures;

#[cfg(test)]
mod tests;

use crate::suite::common::{self, Kind};
use basics::{
    invalid_requests, lifecycle, metadata_round_trip, quantity_follows_volumes, status_reports_classes,
};
use dataplane::{export_reads_and_writes, snapshot_keeps_point_in_time_data};
use features::{
    encryption_round_trip, expand_grows, expand_invalid_requests, expand_rejects_shrink,
    snapshot_delete_keeps_restored, snapshot_invalid_requests, snapshot_lifecycle, snapshot_repeated_delete,
    snapshot_restore, snapshot_survives_source, volume_from_image,
};

use crate::{
    harness::{Ctx, TestCase, TestResult},
    test_case,
};

/// The volume tests, in report order.
pub fn cases() -> Vec<TestCase> {
    vec![
        // Identity and capacity.
        test_case!(
            Volume,
            Identity,
            Core,
            false,
            version_is_set_and_semver,
            "Version returns a runtime name and a semver version"
        ),
        test_case!(
            Volume,
            Identity,
            Core,
            false,
            status_reports_classes,
            "Status lists named, unique classes with capabilities and a quantity in bytes"
        ),
        test_case!(
            Volume,
            Capacity,
            Core,
            true,
            quantity_follows_volumes,
            "a class's quantity drops by a volume's size while it exists and is restored after deletion"
        ),
        // Validation.
        test_case!(
            Volume,
            Validation,
            Core,
            false,
            invalid_requests,
            "malformed CreateVolume is InvalidArgument naming the field; unknown ids are NotFound; List of an unknown id is empty"
        ),
        test_case!(
            Volume,
            Validation,
            Expand,
            false,
            expand_invalid_requests,
            "ExpandVolume of an unknown id is NotFound, without resources InvalidArgument"
        ),
        test_case!(
            Volume,
            Validation,
            Snapshots,
            false,
            snapshot_invalid_requests,
            "malformed CreateVolumeSnapshot is InvalidArgument; unknown volume/snapshot ids are NotFound"
        ),
        // Life cycle.
        test_case!(
            Volume,
            Lifecycle,
            Core,
            false,
            lifecycle,
            "create, list by id and labels, AVAILABLE with access and size, delete, gone, NotFound"
        ),
        test_case!(
            Volume,
            Lifecycle,
            Expand,
            false,
            expand_grows,
            "ExpandVolume grows spec and status, keeps the volume available; the same size is a no-op"
        ),
        test_case!(
            Volume,
            Lifecycle,
            Expand,
            false,
            expand_rejects_shrink,
            "ExpandVolume to a smaller size is InvalidArgument and changes nothing"
        ),
        test_case!(
            Volume,
            Lifecycle,
            Snapshots,
            false,
            snapshot_lifecycle,
            "snapshot of an available volume: spec echoed, listed, READY with the volume's size, deleted, NotFound"
        ),
        test_case!(
            Volume,
            Lifecycle,
            Snapshots,
            false,
            snapshot_restore,
            "a volume created from a READY snapshot becomes available with the snapshot as source"
        ),
        test_case!(
            Volume,
            Lifecycle,
            Snapshots,
            false,
            snapshot_survives_source,
            "a snapshot stays READY and listed after its volume is deleted, and can still be restored"
        ),
        test_case!(
            Volume,
            Lifecycle,
            Snapshots,
            false,
            snapshot_delete_keeps_restored,
            "deleting a snapshot leaves its source and the volumes restored from it unchanged"
        ),
        test_case!(
            Volume,
            Lifecycle,
            Encryption,
            false,
            encryption_round_trip,
            "an encrypted volume becomes available; its spec round-trips (the secret may be withheld)"
        ),
        test_case!(
            Volume,
            Lifecycle,
            Core,
            false,
            volume_from_image,
            "a volume created from the configured image becomes available, at least as large as asked"
        ),
        // Idempotence.
        test_case!(
            Volume,
            Idempotence,
            Core,
            false,
            repeated_delete,
            "repeated DeleteVolume right after create ends in NotFound, and NotFound means unlisted"
        ),
        test_case!(
            Volume,
            Idempotence,
            Snapshots,
            false,
            snapshot_repeated_delete,
            "repeated DeleteVolumeSnapshot ends in NotFound, and NotFound means unlisted"
        ),
        // Metadata.
        test_case!(
            Volume,
            Metadata,
            Core,
            false,
            metadata_round_trip,
            "labels (volumepoollet's too), annotations and spec round-trip byte for byte; found by UID label"
        ),
        test_case!(
            Volume,
            Metadata,
            Core,
            false,
            label_selector,
            "ListVolumes label selectors are exact-match AND; an empty value requires the key"
        ),
        // Events.
        test_case!(
            Volume,
            Events,
            Core,
            false,
            events,
            "ListEvents by labels: involved metadata, Unix-second times, both-bounds time window, kept after delete"
        ),
        // Concurrency.
        test_case!(
            Volume,
            Concurrency,
            Core,
            false,
            parallel_create_delete,
            "10 parallel creates get distinct ids, are listed and available; 10 parallel deletes remove them"
        ),
        // Restart and scale.
        test_case!(
            Volume,
            Restart,
            Restart,
            true,
            restart,
            "volumes keep ids, metadata, spec and state across a runtime restart (hooks.restart)"
        ),
        test_case!(
            Volume,
            Scale,
            Scale,
            true,
            list_at_scale,
            "scale.objects small volumes are all listed by labels, without filter and by id, then deleted"
        ),
        // Data plane: the reported access really serves the blocks.
        test_case!(
            Volume,
            DataPlane,
            DataPlane,
            false,
            export_reads_and_writes,
            "an nbd export reads back what was written at its start and end, and its length is the reported size"
        ),
        test_case!(
            Volume,
            DataPlane,
            DataPlane,
            false,
            snapshot_keeps_point_in_time_data,
            "a volume restored from a snapshot reads the data written before it, after the source is deleted"
        ),
    ]
}

async fn version_is_set_and_semver(ctx: &mut Ctx) -> TestResult {
    let (name, version) = Kind::Volume.version(ctx).await?;
    crate::ensure!(!name.is_empty(), "runtime_name is empty");
    crate::ensure!(
        crate::suite::is_semver(&version),
        "runtime_version {version:?} is not semver"
    );
    Ok(())
}

async fn repeated_delete(ctx: &mut Ctx) -> TestResult {
    common::repeated_delete(Kind::Volume, ctx).await
}

async fn label_selector(ctx: &mut Ctx) -> TestResult {
    common::label_selector(Kind::Volume, ctx).await
}

async fn events(ctx: &mut Ctx) -> TestResult {
    common::events(Kind::Volume, ctx).await
}

async fn parallel_create_delete(ctx: &mut Ctx) -> TestResult {
    common::parallel_create_delete(Kind::Volume, ctx).await
}

async fn restart(ctx: &mut Ctx) -> TestResult {
    common::restart(Kind::Volume, ctx).await
}

async fn list_at_scale(ctx: &mut Ctx) -> TestResult {
    common::list_at_scale(Kind::Volume, ctx).await
}
