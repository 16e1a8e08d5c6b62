// SPDX-License-Identifier: Apache-2.0
//! Fixtures shared by the machine tests: classes, machine builders that isolate and track what
//! they create, reads, waits and comparisons.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use iri_api::{
    machine::v1alpha1::{
        CreateMachineRequest, DeleteMachineRequest, ImageSpec, ListMachinesRequest, LocalDisk, Machine,
        MachineClassStatus, MachineFilter, MachineSpec, MachineState, MachineStatus, NetworkInterface,
        NetworkInterfaceState, Power, StatusRequest, Volume, VolumeConnection, VolumeState,
    },
    meta::v1alpha1::ObjectMetadata,
};
use tonic::{Code, Status};

use crate::{
    call,
    harness::{Ctx, Probe, TestError, Tracked},
};

/// Network id used for NICs when the config names none.
pub(super) const DEFAULT_NETWORK_ID: &str = "conformance";

/// The machinepoollet's labels and annotations (iri-contract §3.2.1): tests use the real keys so
/// a runtime that mangles exactly these is caught.
pub(super) const POOLLET_MACHINE_UID: &str = "machinepoollet.ironcore.dev/machine-uid";
pub(super) const POOLLET_MACHINE_NAMESPACE: &str = "machinepoollet.ironcore.dev/machine-namespace";
pub(super) const POOLLET_MACHINE_NAME: &str = "machinepoollet.ironcore.dev/machine-name";
pub(super) const POOLLET_MACHINE_GENERATION: &str = "machinepoollet.ironcore.dev/machine-generation";
pub(super) const POOLLET_IRIMACHINE_GENERATION: &str = "machinepoollet.ironcore.dev/irimachine-generation";
pub(super) const POOLLET_NIC_MAPPING: &str = "machinepoollet.ironcore.dev/networkinterfacemapping";

/// How long a result that must *stay* true (status honesty) is watched.
pub(super) const HOLD_FOR: Duration = Duration::from_secs(2);

/// The network id NICs are attached to.
pub(super) fn network_id(ctx: &Ctx) -> String {
    match ctx.config.machine.network_id.as_str() {
        "" => DEFAULT_NETWORK_ID.to_string(),
        id => id.to_string(),
    }
}

/// The classes `Status` reports.
pub(super) async fn classes(ctx: &mut Ctx) -> Result<Vec<MachineClassStatus>, TestError> {
    Ok(call!(ctx, machine.status(StatusRequest {}))?.machine_class_status)
}

/// Name of a class status entry ("" when the runtime left `machine_class` out).
pub(super) fn class_name(status: &MachineClassStatus) -> &str {
    status
        .machine_class
        .as_ref()
        .map(|c| c.name.as_str())
        .unwrap_or("")
}

/// The class to create machines with: the configured one, else the first `Status` reports.
pub(super) async fn machine_class(ctx: &mut Ctx) -> Result<String, TestError> {
    if !ctx.config.machine.class.is_empty() {
        return Ok(ctx.config.machine.class.clone());
    }
    let classes = classes(ctx).await?;
    classes
        .first()
        .map(|c| class_name(c).to_string())
        .filter(|name| !name.is_empty())
        .ok_or_else(|| TestError::fail("Status reports no machine class, so no machine can be created"))
}

/// The class for tests that need room for several machines, with its free quantity: the
/// configured class, else the class with the largest quantity.
pub(super) async fn roomy_class(ctx: &mut Ctx) -> Result<(String, i64), TestError> {
    let classes = classes(ctx).await?;
    let wanted = ctx.config.machine.class.clone();
    let chosen = if wanted.is_empty() {
        // The first of the roomiest (max_by_key alone would pick the last).
        classes.iter().rev().max_by_key(|c| c.quantity)
    } else {
        classes.iter().find(|c| class_name(c) == wanted)
    };
    match chosen {
        Some(class) if !class_name(class).is_empty() => Ok((class_name(class).to_string(), class.quantity)),
        _ if wanted.is_empty() => Err(TestError::fail("Status reports no machine class")),
        _ => Err(TestError::fail(format!(
            "the configured class {wanted:?} is not among the classes Status reports"
        ))),
    }
}

/// The free quantity `Status` reports for `class` (failing when the class is missing).
pub(super) async fn quantity_of(p: &Probe, class: &str) -> Result<i64, TestError> {
    let classes = p
        .machine()
        .status(p.request(StatusRequest {}))
        .await?
        .into_inner()
        .machine_class_status;
    classes
        .iter()
        .find(|c| class_name(c) == class)
        .map(|c| c.quantity)
        .ok_or_else(|| TestError::fail(format!("class {class:?} vanished from Status")))
}

/// A root disk with `image`, as the machinepoollet sends it for a machine booting from an image.
pub(super) fn root_disk(image: &str) -> Volume {
    Volume {
        name: "root".into(),
        device: "oda".into(),
        local_disk: Some(LocalDisk {
            size_bytes: 0,
            image: Some(ImageSpec { image: image.into() }),
        }),
        connection: None,
    }
}

/// A local scratch disk (no image), the cheapest volume any runtime can attach.
pub(super) fn scratch_disk(name: &str, device: &str) -> Volume {
    Volume {
        name: name.into(),
        device: device.into(),
        local_disk: Some(LocalDisk {
            size_bytes: 1 << 30,
            image: None,
        }),
        connection: None,
    }
}

/// A remote (connection) volume shaped like the machinepoollet's (iri-contract §3.2.2), with
/// attributes, secrets and encryption data, so exact round-trips are exercised.
pub(super) fn connection_volume(name: &str, device: &str, size_bytes: i64) -> Volume {
    // What the poollet puts there: the JSON of the Kubernetes volume's identifying labels.
    let raw_labels = serde_json::json!({
        "machinepoollet.ironcore.dev/volume-uid": "2b5b9c1e-7d0a-4f3e-9a55-0d1e2a3b4c5d",
        "machinepoollet.ironcore.dev/volume-namespace": "default",
        "machinepoollet.ironcore.dev/volume-name": name,
    })
    .to_string();
    Volume {
        name: name.into(),
        device: device.into(),
        local_disk: None,
        connection: Some(VolumeConnection {
            driver: "ceph".into(),
            handle: format!("conformance-pool/{name}"),
            attributes: BTreeMap::from([
                ("monitors".into(), "[::1]:6789,127.0.0.1:6789".into()),
                ("image".into(), format!("conformance-pool/{name}")),
                ("rawVolumeLabels".into(), raw_labels),
            ]),
            secret_data: BTreeMap::from([
                ("userID".into(), b"conformance".to_vec()),
                // Arbitrary bytes, not UTF-8: secrets are `bytes` and must survive as such.
                ("userKey".into(), vec![0x00, 0xff, 0x10, b'k', 0x80, 0x00]),
            ]),
            encryption_data: BTreeMap::from([("encryptionKey".into(), vec![0xde, 0xad, 0xbe, 0xef, 0x00])]),
            effective_storage_bytes: size_bytes,
        }),
    }
}

/// A NIC shaped like the machinepoollet's, with IPs in a deliberately unsorted order.
pub(super) fn nic(ctx: &Ctx, name: &str, ips: &[&str]) -> NetworkInterface {
    NetworkInterface {
        name: name.into(),
        network_id: network_id(ctx),
        ips: ips.iter().map(|ip| ip.to_string()).collect(),
        attributes: BTreeMap::from([
            (
                "rawNICLabels".into(),
                serde_json::json!({
                    "machinepoollet.ironcore.dev/nic-namespace": "default",
                    "machinepoollet.ironcore.dev/nic-name": name,
                })
                .to_string(),
            ),
            (
                "rawNetworkLabels".into(),
                serde_json::json!({
                    "machinepoollet.ironcore.dev/network-namespace": "default",
                    "machinepoollet.ironcore.dev/network-name": "conformance",
                })
                .to_string(),
            ),
        ]),
    }
}

/// A machine of `class` with this test's labels plus `extra_labels`, powered on, with the
/// configured boot image (if any) as root disk.
pub(super) fn new_machine(ctx: &Ctx, class: &str, extra_labels: &[(&str, &str)]) -> Machine {
    let mut volumes = Vec::new();
    if !ctx.config.machine.image.is_empty() {
        volumes.push(root_disk(&ctx.config.machine.image));
    }
    Machine {
        metadata: Some(ObjectMetadata {
            labels: ctx.labels(extra_labels),
            ..Default::default()
        }),
        spec: Some(MachineSpec {
            power: Power::On as i32,
            class: class.into(),
            volumes,
            ..Default::default()
        }),
        status: None,
    }
}

/// Creates `machine`, tracks it for cleanup and returns what the runtime answered.
pub(super) async fn create_machine(ctx: &mut Ctx, machine: Machine) -> Result<Machine, TestError> {
    let response = call!(
        ctx,
        machine.create_machine(CreateMachineRequest {
            machine: Some(machine)
        })
    )?;
    let created = response
        .machine
        .ok_or_else(|| TestError::fail("CreateMachine answered OK without a machine"))?;
    let id = id_of(&created).to_string();
    ensure_id(&id)?;
    ctx.track(Tracked::Machine(id));
    Ok(created)
}

/// Creates a default machine (see [`new_machine`]) of the default class.
pub(super) async fn create_default(
    ctx: &mut Ctx,
    extra_labels: &[(&str, &str)],
) -> Result<Machine, TestError> {
    let class = machine_class(ctx).await?;
    let machine = new_machine(ctx, &class, extra_labels);
    create_machine(ctx, machine).await
}

/// Tracks the machine of a create response that should have failed, so a wrongly accepted
/// request does not leak.
pub(super) fn track_created<T>(
    ctx: &mut Ctx,
    created: &Result<T, Status>,
    id: impl Fn(&T) -> Option<String>,
) {
    if let Ok(response) = created
        && let Some(id) = id(response).filter(|id| !id.is_empty())
    {
        ctx.track(Tracked::Machine(id));
    }
}

/// Fails unless `id` looks like a server-assigned id the poollet can publish.
pub(super) fn ensure_id(id: &str) -> Result<(), TestError> {
    if id.is_empty() {
        return Err(TestError::fail(
            "CreateMachine returned a machine without metadata.id",
        ));
    }
    if id.contains("://") {
        // The poollet publishes `<runtime_name>://<id>` (iri-contract §2.1).
        return Err(TestError::fail(format!("machine id {id:?} contains \"://\"")));
    }
    Ok(())
}

/// The machine's id ("" when metadata is missing).
pub(super) fn id_of(machine: &Machine) -> &str {
    machine.metadata.as_ref().map(|m| m.id.as_str()).unwrap_or("")
}

/// The machine's metadata, or the empty one.
pub(super) fn meta_of(machine: &Machine) -> ObjectMetadata {
    machine.metadata.clone().unwrap_or_default()
}

/// The machine's spec, or the empty one.
pub(super) fn spec_of(machine: &Machine) -> MachineSpec {
    machine.spec.clone().unwrap_or_default()
}

/// The machine's status, or the empty one.
pub(super) fn status_of(machine: &Machine) -> MachineStatus {
    machine.status.clone().unwrap_or_default()
}

/// The machine's state.
pub(super) fn state_of(machine: &Machine) -> i32 {
    machine.status.as_ref().map(|s| s.state).unwrap_or_default()
}

/// Name of a machine state value, or the number if it is not one.
pub(super) fn state_name(state: i32) -> String {
    MachineState::try_from(state)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("unknown state {state}"))
}

/// A one-line picture of a machine for failure reasons.
pub(super) fn describe(machine: &Machine) -> String {
    let meta = meta_of(machine);
    let spec = spec_of(machine);
    let status = status_of(machine);
    let volumes: Vec<String> = status
        .volumes
        .iter()
        .map(|v| {
            let state = VolumeState::try_from(v.state)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_else(|_| v.state.to_string());
            format!("{}={state}({:?})", v.name, v.handle)
        })
        .collect();
    let nics: Vec<String> = status
        .network_interfaces
        .iter()
        .map(|n| {
            let state = NetworkInterfaceState::try_from(n.state)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_else(|_| n.state.to_string());
            format!("{}={state}({:?})", n.name, n.handle)
        })
        .collect();
    format!(
        "machine {} state {} power {} generation {} observed {} deleted_at {} volume status [{}] nic status [{}]",
        meta.id,
        state_name(status.state),
        spec.power,
        meta.generation,
        status.observed_generation,
        meta.deleted_at,
        volumes.join(", "),
        nics.join(", ")
    )
}

/// A filter selecting one id.
pub(super) fn by_id(id: &str) -> MachineFilter {
    MachineFilter {
        id: id.into(),
        ..Default::default()
    }
}

/// A filter selecting by labels.
pub(super) fn by_labels(selector: BTreeMap<String, String>) -> MachineFilter {
    MachineFilter {
        label_selector: selector,
        ..Default::default()
    }
}

/// `ListMachines` with `filter` (recorded).
pub(super) async fn list(ctx: &mut Ctx, filter: Option<MachineFilter>) -> Result<Vec<Machine>, TestError> {
    Ok(call!(ctx, machine.list_machines(ListMachinesRequest { filter }))?.machines)
}

/// `ListMachines` with `filter` from a probe (not recorded).
pub(super) async fn probe_list(p: &Probe, filter: Option<MachineFilter>) -> Result<Vec<Machine>, TestError> {
    Ok(p.machine()
        .list_machines(p.request(ListMachinesRequest { filter }))
        .await?
        .into_inner()
        .machines)
}

/// The machine `id` as listed now, `None` if it is not listed. Fails when a list by id returns
/// other machines (the id filter is exact, iri-contract §2.1).
pub(super) async fn get(ctx: &mut Ctx, id: &str) -> Result<Option<Machine>, TestError> {
    pick(id, list(ctx, Some(by_id(id))).await?)
}

/// [`get`] from a probe.
pub(super) async fn probe_get(p: &Probe, id: &str) -> Result<Option<Machine>, TestError> {
    pick(id, probe_list(p, Some(by_id(id))).await?)
}

fn pick(id: &str, machines: Vec<Machine>) -> Result<Option<Machine>, TestError> {
    if let Some(other) = machines.iter().find(|m| id_of(m) != id) {
        return Err(TestError::fail(format!(
            "ListMachines with filter.id {id:?} also returned machine {:?}",
            id_of(other)
        )));
    }
    if machines.len() > 1 {
        return Err(TestError::fail(format!(
            "ListMachines with filter.id {id:?} returned {} machines with that id",
            machines.len()
        )));
    }
    Ok(machines.into_iter().next())
}

/// [`get`], failing when the machine is not listed.
pub(super) async fn must_get(ctx: &mut Ctx, id: &str) -> Result<Machine, TestError> {
    get(ctx, id)
        .await?
        .ok_or_else(|| TestError::fail(format!("machine {id} is not listed")))
}

/// Waits (ready timeout) until machine `id` satisfies `done`; fails at once if it disappears.
pub(super) async fn wait_for(
    ctx: &Ctx,
    id: &str,
    what: &str,
    done: impl Fn(&Machine) -> bool,
) -> Result<Machine, TestError> {
    let done = &done;
    ctx.eventually(what, ctx.config.timeouts.ready(), |p: Probe| async move {
        match probe_get(&p, id).await? {
            None => Err(TestError::fail(format!(
                "machine {id} disappeared while waiting: {what}"
            ))),
            Some(machine) if done(&machine) => Ok((Some(machine), String::new())),
            Some(machine) => Ok((None, describe(&machine))),
        }
    })
    .await
}

/// Waits until machine `id` is `MACHINE_RUNNING`.
pub(super) async fn wait_running(ctx: &Ctx, id: &str) -> Result<Machine, TestError> {
    wait_for(ctx, id, &format!("machine {id} reaches MACHINE_RUNNING"), |m| {
        state_of(m) == MachineState::MachineRunning as i32
    })
    .await
}

/// Waits (delete timeout) until machine `id` is no longer listed.
pub(super) async fn wait_gone(ctx: &Ctx, id: &str) -> Result<(), TestError> {
    ctx.eventually(
        &format!("machine {id} disappears from ListMachines after delete"),
        ctx.config.timeouts.delete(),
        |p: Probe| async move {
            Ok(match probe_get(&p, id).await? {
                None => (Some(()), String::new()),
                Some(machine) => (None, describe(&machine)),
            })
        },
    )
    .await
}

/// Deletes machine `id` (the first delete must succeed), waits until it is gone and untracks it.
pub(super) async fn delete_and_wait(ctx: &mut Ctx, id: &str) -> Result<(), TestError> {
    call!(
        ctx,
        machine.delete_machine(DeleteMachineRequest {
            machine_id: id.into()
        })
    )?;
    wait_gone(ctx, id).await?;
    ctx.untrack(&Tracked::Machine(id.into()));
    Ok(())
}

/// An id no runtime has handed out: fresh, in the upstream id format.
pub(super) fn unknown_id() -> String {
    iri_runtime::id::new_id()
}

/// Fails unless `result` is INVALID_ARGUMENT whose message mentions one of `hints`
/// (case-insensitive; lenient because runtimes word messages differently).
pub(super) fn expect_invalid<T: std::fmt::Debug>(
    result: Result<T, Status>,
    what: &str,
    hints: &[&str],
) -> Result<(), TestError> {
    let status = crate::harness::expect_code(result, Code::InvalidArgument, what)?;
    ensure_mentions(&status, what, hints)
}

/// Fails unless the status message mentions one of `hints` (case-insensitive).
pub(super) fn ensure_mentions(status: &Status, what: &str, hints: &[&str]) -> Result<(), TestError> {
    let message = status.message().to_lowercase();
    if hints.is_empty() || hints.iter().any(|h| message.contains(&h.to_lowercase())) {
        Ok(())
    } else {
        Err(TestError::fail(format!(
            "{what}: {:?} message {:?} names none of {hints:?}; it should name the offending field",
            status.code(),
            status.message()
        )))
    }
}

/// `spec` with volumes and NICs ordered by name: clients match them by name, so their order is
/// not part of the contract (unlike the order of `ips` inside a NIC, which is).
pub(super) fn normalized(spec: &MachineSpec) -> MachineSpec {
    let mut spec = spec.clone();
    spec.volumes.sort_by(|a, b| a.name.cmp(&b.name));
    spec.network_interfaces.sort_by(|a, b| a.name.cmp(&b.name));
    spec
}

/// Where `got` differs from `want` (compared with [`normalized`] order), or `None` if equal.
pub(super) fn spec_difference(want: &MachineSpec, got: &MachineSpec) -> Option<String> {
    let (want, got) = (normalized(want), normalized(got));
    if want == got {
        return None;
    }
    let mut diffs = Vec::new();
    if want.class != got.class {
        diffs.push(format!("class {:?} became {:?}", want.class, got.class));
    }
    if want.power != got.power {
        diffs.push(format!("power {} became {}", want.power, got.power));
    }
    if want.ignition_data != got.ignition_data {
        diffs.push(format!(
            "ignition_data ({} bytes) became {} bytes",
            want.ignition_data.len(),
            got.ignition_data.len()
        ));
    }
    if want.guest_config != got.guest_config {
        diffs.push(format!(
            "guest_config {:?} became {:?}",
            want.guest_config, got.guest_config
        ));
    }
    diff_named(&mut diffs, "volume", &want.volumes, &got.volumes, |v| &v.name);
    diff_named(
        &mut diffs,
        "network interface",
        &want.network_interfaces,
        &got.network_interfaces,
        |n| &n.name,
    );
    Some(diffs.join("; "))
}

fn diff_named<T: PartialEq + std::fmt::Debug>(
    diffs: &mut Vec<String>,
    kind: &str,
    want: &[T],
    got: &[T],
    name: impl Fn(&T) -> &String,
) {
    for w in want {
        match got.iter().find(|g| name(g) == name(w)) {
            None => diffs.push(format!("{kind} {:?} is missing", name(w))),
            Some(g) if g != w => diffs.push(format!("{kind} {:?}: sent {w:?}, got {g:?}", name(w))),
            Some(_) => {}
        }
    }
    for g in got {
        if !want.iter().any(|w| name(w) == name(g)) {
            diffs.push(format!("unexpected {kind} {:?}", name(g)));
        }
    }
    let count = |items: &[T], n: &String| items.iter().filter(|i| name(i) == n).count();
    for g in got {
        if count(got, name(g)) > 1 {
            diffs.push(format!(
                "{kind} {:?} appears {} times",
                name(g),
                count(got, name(g))
            ));
            break;
        }
    }
}

/// Checks `check` on machine `id` repeatedly for [`HOLD_FOR`]: for results that must not only
/// be true once but stay true (a reconciler must not undo them a moment later).
pub(super) async fn holds(
    ctx: &mut Ctx,
    id: &str,
    check: impl Fn(&Machine) -> Result<(), String>,
) -> Result<(), TestError> {
    let until = Instant::now() + HOLD_FOR;
    loop {
        let machine = must_get(ctx, id).await?;
        check(&machine).map_err(|reason| TestError::fail(format!("{reason}; {}", describe(&machine))))?;
        if Instant::now() >= until {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The volume status entry `name`, if any.
pub(super) fn volume_status<'a>(
    status: &'a MachineStatus,
    name: &str,
) -> Option<&'a iri_api::machine::v1alpha1::VolumeStatus> {
    status.volumes.iter().find(|v| v.name == name)
}

/// The NIC status entry `name`, if any.
pub(super) fn nic_status<'a>(
    status: &'a MachineStatus,
    name: &str,
) -> Option<&'a iri_api::machine::v1alpha1::NetworkInterfaceStatus> {
    status.network_interfaces.iter().find(|n| n.name == name)
}

/// Whether volume `name` is reported ATTACHED with a handle.
pub(super) fn volume_attached(machine: &Machine, name: &str) -> bool {
    volume_status(&status_of(machine), name)
        .is_some_and(|v| v.state == VolumeState::VolumeAttached as i32 && !v.handle.is_empty())
}

/// Whether NIC `name` is reported ATTACHED with a handle.
pub(super) fn nic_attached(machine: &Machine, name: &str) -> bool {
    nic_status(&status_of(machine), name).is_some_and(|n| {
        n.state == NetworkInterfaceState::NetworkInterfaceAttached as i32 && !n.handle.is_empty()
    })
}

/// Now in Unix nanoseconds.
pub(super) fn now_nanos() -> i64 {
    iri_runtime::id::now_nanos()
}

/// Now in Unix seconds.
pub(super) fn now_secs() -> i64 {
    iri_runtime::id::now_secs()
}
