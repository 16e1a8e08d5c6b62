// SPDX-License-Identifier: Apache-2.0
//! Machine runtime tests.
//!
//! Every test isolates its machines with the labels of [`Ctx::labels`](crate::Ctx::labels) and
//! lists them with [`Ctx::selector`](crate::Ctx::selector), so tests run in parallel on a shared
//! runtime without seeing each other's machines. Tests that measure global state (capacity) or
//! take a lot of it (parallel creates, scale) or restart the runtime are serial.
//!
//! Where the contract leaves a choice, the tests accept every documented behaviour:
//! * a powered-off machine may be `MACHINE_STOPPED` or `MACHINE_SUSPENDED` (the upstream
//!   machinepoollet can only map SUSPENDED, iri-contract §3.2.5);
//! * a runtime may leave `generation` at 0 forever; one that sets it must count spec changes;
//! * an unknown class may be INVALID_ARGUMENT or NOT_FOUND;
//! * deletion may be asynchronous (OK until gone, listed with `deleted_at`/TERMINATING
//!   meanwhile), but must end in NOT_FOUND and disappearance;
//! * INVALID_ARGUMENT messages only need to mention the field somewhere (runtimes word them
//!   differently).

mod attachments;
mod events;
mod exec;
mod fixtures;
mod identity;
mod lifecycle;
mod metadata;
#[cfg(test)]
mod mutants;
mod scale;
#[cfg(test)]
mod selftest;
mod validation;

use attachments::{
    attach_and_detach, double_attach_is_already_exists, failed_detach_keeps_status,
    generation_follows_attachments, update_volume_resizes,
};
use events::events_describe_machine;
use exec::{
    console_shows_the_guest, exec_returns_url, exec_unknown_machine_is_not_found, exec_url_accepts_websocket,
};
use identity::{quantity_tracks_creates_and_deletes, status_reports_classes, version_is_set_and_semver};
use lifecycle::{
    create_list_run_delete, detach_unknown_name_is_not_found, generation_follows_power_changes,
    power_off_and_on, repeated_delete_ends_in_not_found,
};
use metadata::{
    label_selectors_match_exactly, labels_and_annotations_round_trip, spec_round_trips_exactly,
    update_annotations_replaces_map,
};
use scale::{list_at_scale, objects_survive_restart, parallel_creates_and_deletes};
use validation::{
    attach_rejects_malformed_requests, create_rejects_malformed_machines, list_unknown_id_is_empty,
    power_rejects_unknown_value, unknown_machine_is_not_found,
};

use crate::{harness::TestCase, test_case};

/// The machine tests.
pub fn cases() -> Vec<TestCase> {
    vec![
        // Identity and capacity.
        test_case!(
            Machine,
            Identity,
            Core,
            false,
            version_is_set_and_semver,
            "Version returns a runtime name (without \"://\") and a semver version"
        ),
        test_case!(
            Machine,
            Identity,
            Core,
            false,
            status_reports_classes,
            "Status answers within 5 s with uniquely named classes, each with capability resources and a quantity >= 0"
        ),
        test_case!(
            Machine,
            Capacity,
            Core,
            true,
            quantity_tracks_creates_and_deletes,
            "Status quantity of a class drops by exactly one per created machine and comes back after each delete"
        ),
        // Validation and the error matrix.
        test_case!(
            Machine,
            Validation,
            Core,
            false,
            create_rejects_malformed_machines,
            "CreateMachine with missing machine/metadata/spec, bad class, power, volumes or NICs is InvalidArgument naming the field"
        ),
        test_case!(
            Machine,
            Validation,
            Core,
            false,
            power_rejects_unknown_value,
            "UpdateMachinePower with a value that is not a Power is InvalidArgument and leaves spec.power alone"
        ),
        test_case!(
            Machine,
            Validation,
            Core,
            false,
            unknown_machine_is_not_found,
            "Delete, UpdateAnnotations, UpdatePower, Attach/Detach/UpdateVolume and Attach/DetachNetworkInterface of an unknown machine are NotFound"
        ),
        test_case!(
            Machine,
            Validation,
            Core,
            false,
            list_unknown_id_is_empty,
            "ListMachines with an unknown filter.id is OK and empty"
        ),
        test_case!(
            Machine,
            Validation,
            Hotplug,
            false,
            attach_rejects_malformed_requests,
            "Malformed AttachVolume, UpdateVolume and AttachNetworkInterface are InvalidArgument and leave the spec alone"
        ),
        // Lifecycle and idempotence.
        test_case!(
            Machine,
            Lifecycle,
            Core,
            false,
            create_list_run_delete,
            "Create assigns id and created_at (ns), the machine is listed by id and labels, runs, is deleted, disappears; a second delete is NotFound"
        ),
        test_case!(
            Machine,
            Lifecycle,
            Core,
            false,
            power_off_and_on,
            "Power off sets spec.power and stops (STOPPED or SUSPENDED) the machine; power on makes it RUNNING again"
        ),
        test_case!(
            Machine,
            Idempotence,
            Core,
            false,
            repeated_delete_ends_in_not_found,
            "Repeated DeleteMachine answers OK while deleting and ends in NotFound with the machine gone"
        ),
        test_case!(
            Machine,
            Idempotence,
            Core,
            false,
            detach_unknown_name_is_not_found,
            "DetachVolume and DetachNetworkInterface of an unknown name on an existing machine are NotFound"
        ),
        // Metadata.
        test_case!(
            Machine,
            Metadata,
            Core,
            false,
            labels_and_annotations_round_trip,
            "Labels and annotations (poollet keys, NIC mapping JSON, unicode, long and empty values) round-trip byte for byte"
        ),
        test_case!(
            Machine,
            Metadata,
            Core,
            false,
            spec_round_trips_exactly,
            "The spec (volumes with attributes, secrets, encryption data, devices; NICs with ordered ips; empty local_disk) round-trips exactly"
        ),
        test_case!(
            Machine,
            Metadata,
            Core,
            false,
            update_annotations_replaces_map,
            "UpdateMachineAnnotations replaces the whole annotation map and leaves labels alone"
        ),
        test_case!(
            Machine,
            Metadata,
            Core,
            false,
            label_selectors_match_exactly,
            "Label selectors are exact-match AND; an empty value requires the key with an empty value"
        ),
        // Generation.
        test_case!(
            Machine,
            Generation,
            Core,
            false,
            generation_follows_power_changes,
            "Power changes bump generation and observed_generation follows; annotation updates do not (or generation stays 0)"
        ),
        test_case!(
            Machine,
            Generation,
            Hotplug,
            false,
            generation_follows_attachments,
            "Attaching and detaching volumes and NICs bump generation and observed_generation follows (or generation stays 0)"
        ),
        // Hotplug.
        test_case!(
            Machine,
            Attachments,
            Hotplug,
            false,
            attach_and_detach,
            "A volume and a NIC attached to a running machine appear in spec as sent and ATTACHED in status; detached they leave both"
        ),
        test_case!(
            Machine,
            Attachments,
            Hotplug,
            false,
            double_attach_is_already_exists,
            "Attaching a volume or NIC name that is already attached is AlreadyExists and keeps the first"
        ),
        test_case!(
            Machine,
            Attachments,
            Hotplug,
            false,
            update_volume_resizes,
            "UpdateVolume with a bigger effective_storage_bytes updates the attachment's spec; unknown names are NotFound"
        ),
        test_case!(
            Machine,
            Attachments,
            Hotplug,
            false,
            failed_detach_keeps_status,
            "After failed detaches (unknown names) all attached volumes and NICs stay in spec and ATTACHED in status"
        ),
        // Events.
        test_case!(
            Machine,
            Events,
            Core,
            false,
            events_describe_machine,
            "ListEvents returns events about a created and deleted machine with its metadata, in seconds, and filters by labels and time window"
        ),
        // Exec.
        test_case!(
            Machine,
            Exec,
            Exec,
            false,
            exec_returns_url,
            "Exec for a running machine returns an absolute http, https, ws or wss URL"
        ),
        test_case!(
            Machine,
            Exec,
            Exec,
            false,
            exec_unknown_machine_is_not_found,
            "Exec for an unknown machine is NotFound"
        ),
        test_case!(
            Machine,
            Exec,
            Exec,
            false,
            exec_url_accepts_websocket,
            "The Exec URL answers a WebSocket upgrade for the channel.k8s.io subprotocols with 101 Switching Protocols"
        ),
        test_case!(
            Machine,
            DataPlane,
            DataPlane,
            false,
            console_shows_the_guest,
            "A machine booted from machine.image shows its guest on the Exec console (machine.console_marker, or any output) within the ready timeout"
        ),
        // Many machines.
        test_case!(
            Machine,
            Concurrency,
            Core,
            true,
            parallel_creates_and_deletes,
            "Up to 10 parallel creates get distinct ids and are all listed; parallel deletes leave nothing behind"
        ),
        test_case!(
            Machine,
            Restart,
            Restart,
            true,
            objects_survive_restart,
            "After the restart hook the same machines are listed with the same metadata, spec and state"
        ),
        test_case!(
            Machine,
            Scale,
            Scale,
            true,
            list_at_scale,
            "With scale.objects machines, an unfiltered list returns all within 5 s and selectors return exactly their subset"
        ),
    ]
}
