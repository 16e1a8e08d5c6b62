// SPDX-License-Identifier: Apache-2.0
//! Hotplug: attaching, updating and detaching volumes and NICs on a running machine, and status
//! honesty around failed detaches (ironcore#1338).

use iri_api::machine::v1alpha1::{
    AttachNetworkInterfaceRequest, AttachVolumeRequest, DetachNetworkInterfaceRequest, DetachVolumeRequest,
    Machine, NetworkInterface, UpdateVolumeRequest, Volume,
};
use tonic::Code;

use super::{
    fixtures::{
        connection_volume, create_default, holds, id_of, meta_of, must_get, nic, nic_attached, nic_status,
        scratch_disk, spec_of, status_of, volume_attached, volume_status, wait_for, wait_running,
    },
    lifecycle::expect_spec_change,
};
use crate::{
    call, ensure,
    harness::{Ctx, TestError, TestResult, expect_code},
};

/// Creates a default machine and waits until it runs; returns its id.
async fn running_machine(ctx: &mut Ctx) -> Result<String, TestError> {
    let id = id_of(&create_default(ctx, &[]).await?).to_string();
    wait_running(ctx, &id).await?;
    Ok(id)
}

async fn attach_volume(ctx: &mut Ctx, id: &str, volume: &Volume) -> TestResult {
    call!(
        ctx,
        machine.attach_volume(AttachVolumeRequest {
            machine_id: id.into(),
            volume: Some(volume.clone()),
        })
    )?;
    Ok(())
}

async fn attach_nic(ctx: &mut Ctx, id: &str, nic: &NetworkInterface) -> TestResult {
    call!(
        ctx,
        machine.attach_network_interface(AttachNetworkInterfaceRequest {
            machine_id: id.into(),
            network_interface: Some(nic.clone()),
        })
    )?;
    Ok(())
}

/// The spec's volume `name` must equal `want` exactly and appear once.
fn ensure_volume_in_spec(machine: &Machine, want: &Volume) -> TestResult {
    let spec = spec_of(machine);
    let found: Vec<&Volume> = spec.volumes.iter().filter(|v| v.name == want.name).collect();
    match found.as_slice() {
        [] => Err(TestError::fail(format!(
            "volume {:?} is not in the spec",
            want.name
        ))),
        [got] if *got == want => Ok(()),
        [got] => Err(TestError::fail(format!(
            "volume {:?} in the spec differs from what was sent: sent {want:?}, got {got:?}",
            want.name
        ))),
        many => Err(TestError::fail(format!(
            "volume {:?} is in the spec {} times",
            want.name,
            many.len()
        ))),
    }
}

/// The spec's NIC `name` must equal `want` exactly and appear once.
fn ensure_nic_in_spec(machine: &Machine, want: &NetworkInterface) -> TestResult {
    let spec = spec_of(machine);
    let found: Vec<&NetworkInterface> = spec
        .network_interfaces
        .iter()
        .filter(|n| n.name == want.name)
        .collect();
    match found.as_slice() {
        [] => Err(TestError::fail(format!("NIC {:?} is not in the spec", want.name))),
        [got] if *got == want => Ok(()),
        [got] => Err(TestError::fail(format!(
            "NIC {:?} in the spec differs from what was sent: sent {want:?}, got {got:?}",
            want.name
        ))),
        many => Err(TestError::fail(format!(
            "NIC {:?} is in the spec {} times",
            want.name,
            many.len()
        ))),
    }
}

/// Attach a local disk and a NIC to a running machine: both appear in the spec exactly as sent
/// and in status ATTACHED with a handle; detached, they leave spec and (eventually) status, and a
/// second detach is NOT_FOUND.
pub(super) async fn attach_and_detach(ctx: &mut Ctx) -> TestResult {
    let id = running_machine(ctx).await?;
    let volume = scratch_disk("hotplug-disk", "odb");
    let nic = nic(ctx, "hotplug-nic", &["10.0.0.10", "fd00::10"]);
    attach_volume(ctx, &id, &volume).await?;
    attach_nic(ctx, &id, &nic).await?;

    let machine = must_get(ctx, &id).await?;
    ensure_volume_in_spec(&machine, &volume)?;
    ensure_nic_in_spec(&machine, &nic)?;
    wait_for(
        ctx,
        &id,
        "volume hotplug-disk and NIC hotplug-nic are reported ATTACHED with a handle",
        |m| volume_attached(m, &volume.name) && nic_attached(m, &nic.name),
    )
    .await?;

    call!(
        ctx,
        machine.detach_volume(DetachVolumeRequest {
            machine_id: id.clone(),
            name: volume.name.clone(),
        })
    )?;
    call!(
        ctx,
        machine.detach_network_interface(DetachNetworkInterfaceRequest {
            machine_id: id.clone(),
            name: nic.name.clone(),
        })
    )?;
    let machine = must_get(ctx, &id).await?;
    let spec = spec_of(&machine);
    ensure!(
        !spec.volumes.iter().any(|v| v.name == volume.name),
        "volume {:?} is still in the spec after DetachVolume",
        volume.name
    );
    ensure!(
        !spec.network_interfaces.iter().any(|n| n.name == nic.name),
        "NIC {:?} is still in the spec after DetachNetworkInterface",
        nic.name
    );
    // A backend detaches asynchronously (libvirt-provider#114); status must converge.
    wait_for(ctx, &id, "detached volume and NIC leave the status", |m| {
        let status = status_of(m);
        volume_status(&status, &volume.name).is_none() && nic_status(&status, &nic.name).is_none()
    })
    .await?;

    let result = call!(
        ctx,
        machine.detach_volume(DetachVolumeRequest {
            machine_id: id.clone(),
            name: volume.name.clone(),
        })
    );
    expect_code(result, Code::NotFound, "a second DetachVolume of the same name")?;
    let result = call!(
        ctx,
        machine.detach_network_interface(DetachNetworkInterfaceRequest {
            machine_id: id.clone(),
            name: nic.name.clone(),
        })
    );
    expect_code(
        result,
        Code::NotFound,
        "a second DetachNetworkInterface of the same name",
    )?;
    Ok(())
}

/// Attaching a name that is already attached is ALREADY_EXISTS (machinebroker does this for
/// NICs; our runtimes do it for both), and the spec keeps exactly the first attachment.
pub(super) async fn double_attach_is_already_exists(ctx: &mut Ctx) -> TestResult {
    let id = running_machine(ctx).await?;
    let volume = scratch_disk("twice-disk", "odb");
    let nic = nic(ctx, "twice-nic", &["10.0.0.11"]);
    attach_volume(ctx, &id, &volume).await?;
    attach_nic(ctx, &id, &nic).await?;

    let mut again = scratch_disk("twice-disk", "odc");
    again.local_disk = again.local_disk.map(|mut d| {
        d.size_bytes *= 2;
        d
    });
    let result = call!(
        ctx,
        machine.attach_volume(AttachVolumeRequest {
            machine_id: id.clone(),
            volume: Some(again),
        })
    );
    expect_code(
        result,
        Code::AlreadyExists,
        "AttachVolume with a name already attached",
    )?;
    let mut other = nic.clone();
    other.ips = vec!["10.0.0.12".into()];
    let result = call!(
        ctx,
        machine.attach_network_interface(AttachNetworkInterfaceRequest {
            machine_id: id.clone(),
            network_interface: Some(other),
        })
    );
    expect_code(
        result,
        Code::AlreadyExists,
        "AttachNetworkInterface with a name already attached",
    )?;

    let machine = must_get(ctx, &id).await?;
    ensure_volume_in_spec(&machine, &volume)?;
    ensure_nic_in_spec(&machine, &nic)?;
    Ok(())
}

/// `UpdateVolume` is how the machinepoollet resizes a remote volume online (iri-contract
/// §3.2.4): the attachment's spec becomes exactly the updated volume. Unknown names are
/// NOT_FOUND.
pub(super) async fn update_volume_resizes(ctx: &mut Ctx) -> TestResult {
    let id = running_machine(ctx).await?;
    let volume = connection_volume("resize-me", "odb", 1 << 30);
    attach_volume(ctx, &id, &volume).await?;
    ensure_volume_in_spec(&must_get(ctx, &id).await?, &volume)?;

    let mut bigger = volume.clone();
    if let Some(connection) = bigger.connection.as_mut() {
        connection.effective_storage_bytes = 2 << 30;
    }
    call!(
        ctx,
        machine.update_volume(UpdateVolumeRequest {
            machine_id: id.clone(),
            volume: Some(bigger.clone()),
        })
    )?;
    ensure_volume_in_spec(&must_get(ctx, &id).await?, &bigger)?;

    let result = call!(
        ctx,
        machine.update_volume(UpdateVolumeRequest {
            machine_id: id.clone(),
            volume: Some(connection_volume("conformance-no-such-volume", "odz", 1 << 30)),
        })
    );
    expect_code(result, Code::NotFound, "UpdateVolume of an unknown volume name")?;
    Ok(())
}

/// A detach that fails must not make status pretend anything changed: with volumes A and B and
/// NICs A and B attached, failed detaches (unknown names) leave all four reported ATTACHED
/// (ironcore#1338: status dropped a volume that was still attached).
pub(super) async fn failed_detach_keeps_status(ctx: &mut Ctx) -> TestResult {
    let id = running_machine(ctx).await?;
    let volumes = [scratch_disk("honest-a", "odb"), scratch_disk("honest-b", "odc")];
    let nics = [
        nic(ctx, "honest-nic-a", &["10.0.0.21"]),
        nic(ctx, "honest-nic-b", &["10.0.0.22"]),
    ];
    for volume in &volumes {
        attach_volume(ctx, &id, volume).await?;
    }
    for nic in &nics {
        attach_nic(ctx, &id, nic).await?;
    }
    let all_attached = |m: &Machine| -> Result<(), String> {
        for volume in &volumes {
            if !volume_attached(m, &volume.name) {
                return Err(format!("volume {:?} is not reported ATTACHED", volume.name));
            }
            ensure_volume_in_spec(m, volume).map_err(|e| e.reason)?;
        }
        for nic in &nics {
            if !nic_attached(m, &nic.name) {
                return Err(format!("NIC {:?} is not reported ATTACHED", nic.name));
            }
            ensure_nic_in_spec(m, nic).map_err(|e| e.reason)?;
        }
        Ok(())
    };
    wait_for(ctx, &id, "volumes and NICs A and B are reported ATTACHED", |m| {
        all_attached(m).is_ok()
    })
    .await?;

    let result = call!(
        ctx,
        machine.detach_volume(DetachVolumeRequest {
            machine_id: id.clone(),
            name: "conformance-no-such-volume".into(),
        })
    );
    expect_code(result, Code::NotFound, "DetachVolume of an unknown volume name")?;
    let result = call!(
        ctx,
        machine.detach_network_interface(DetachNetworkInterfaceRequest {
            machine_id: id.clone(),
            name: "conformance-no-such-nic".into(),
        })
    );
    expect_code(
        result,
        Code::NotFound,
        "DetachNetworkInterface of an unknown NIC name",
    )?;
    holds(ctx, &id, |m| {
        all_attached(m).map_err(|reason| format!("after failed detaches: {reason}"))
    })
    .await
}

/// Attaching and detaching are spec changes: generation moves and observed_generation follows
/// (same rules as for power, see `generation_follows_power_changes`).
pub(super) async fn generation_follows_attachments(ctx: &mut Ctx) -> TestResult {
    let id = running_machine(ctx).await?;
    let mut generation = meta_of(&must_get(ctx, &id).await?).generation;
    let volume = scratch_disk("generation-disk", "odb");
    attach_volume(ctx, &id, &volume).await?;
    generation = expect_spec_change(ctx, &id, generation, "AttachVolume").await?;
    let nic = nic(ctx, "generation-nic", &["10.0.0.31"]);
    attach_nic(ctx, &id, &nic).await?;
    generation = expect_spec_change(ctx, &id, generation, "AttachNetworkInterface").await?;
    call!(
        ctx,
        machine.detach_volume(DetachVolumeRequest {
            machine_id: id.clone(),
            name: volume.name.clone(),
        })
    )?;
    generation = expect_spec_change(ctx, &id, generation, "DetachVolume").await?;
    call!(
        ctx,
        machine.detach_network_interface(DetachNetworkInterfaceRequest {
            machine_id: id.clone(),
            name: nic.name.clone(),
        })
    )?;
    expect_spec_change(ctx, &id, generation, "DetachNetworkInterface").await?;
    Ok(())
}
