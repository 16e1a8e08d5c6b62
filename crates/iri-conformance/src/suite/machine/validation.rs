// SPDX-License-Identifier: Apache-2.0
//! Argument validation and the error matrix (iri-contract §2.0): malformed requests are
//! INVALID_ARGUMENT naming the field, unknown ids are NOT_FOUND, lists of unknown ids are empty.

use iri_api::machine::v1alpha1::{
    AttachNetworkInterfaceRequest, AttachVolumeRequest, CreateMachineRequest, DeleteMachineRequest,
    DetachNetworkInterfaceRequest, DetachVolumeRequest, LocalDisk, Machine, MachineFilter, MachineSpec,
    NetworkInterface, Power, UpdateMachineAnnotationsRequest, UpdateMachinePowerRequest, UpdateVolumeRequest,
    Volume,
};
use tonic::Code;

use super::fixtures::{
    connection_volume, create_default, ensure_mentions, expect_invalid, id_of, list, machine_class, must_get,
    new_machine, nic, scratch_disk, spec_difference, spec_of, track_created, unknown_id,
};
use crate::{
    call, ensure,
    harness::{Ctx, TestError, TestResult, expect_code},
};

/// A power value that is neither POWER_ON nor POWER_OFF.
const BAD_POWER: i32 = 7;

/// One malformed `CreateMachine`: what it is, the request, and words one of which the error
/// message should contain (the field).
struct BadCreate {
    what: &'static str,
    request: CreateMachineRequest,
    hints: &'static [&'static str],
}

pub(super) async fn create_rejects_malformed_machines(ctx: &mut Ctx) -> TestResult {
    let class = machine_class(ctx).await?;
    let valid = new_machine(ctx, &class, &[]);
    let with = |change: &dyn Fn(&mut Machine)| {
        let mut machine = valid.clone();
        change(&mut machine);
        CreateMachineRequest {
            machine: Some(machine),
        }
    };
    let spec = |change: &dyn Fn(&mut MachineSpec)| {
        with(&|m: &mut Machine| change(m.spec.get_or_insert_with(Default::default)))
    };
    let cases = vec![
        BadCreate {
            what: "CreateMachine without machine",
            request: CreateMachineRequest { machine: None },
            hints: &["machine"],
        },
        BadCreate {
            what: "CreateMachine without machine.metadata",
            request: with(&|m| m.metadata = None),
            hints: &["metadata"],
        },
        BadCreate {
            what: "CreateMachine without machine.spec",
            request: with(&|m| m.spec = None),
            hints: &["spec"],
        },
        BadCreate {
            what: "CreateMachine with an empty class",
            request: spec(&|s| s.class.clear()),
            hints: &["class"],
        },
        BadCreate {
            what: "CreateMachine with an unknown power value",
            request: spec(&|s| s.power = BAD_POWER),
            hints: &["power"],
        },
        BadCreate {
            what: "CreateMachine with a volume without name",
            request: spec(&|s| s.volumes.push(scratch_disk("", ""))),
            hints: &["name"],
        },
        BadCreate {
            what: "CreateMachine with two volumes of the same name",
            request: spec(&|s| {
                s.volumes.push(scratch_disk("twin", "odx"));
                s.volumes.push(scratch_disk("twin", "ody"));
            }),
            hints: &["name", "duplicate", "volume"],
        },
        BadCreate {
            what: "CreateMachine with a volume that has neither local_disk nor connection",
            request: spec(&|s| {
                s.volumes.push(Volume {
                    name: "hollow".into(),
                    ..Default::default()
                })
            }),
            hints: &["local_disk", "connection", "volume"],
        },
        BadCreate {
            what: "CreateMachine with a volume that has both local_disk and connection",
            request: spec(&|s| {
                let mut both = connection_volume("both", "", 1 << 30);
                both.local_disk = Some(LocalDisk::default());
                s.volumes.push(both);
            }),
            hints: &["local_disk", "connection", "volume"],
        },
        BadCreate {
            what: "CreateMachine with a NIC without name",
            request: with(&|m| nic_into(m, nic(ctx, "", &["10.0.0.1"]))),
            hints: &["name"],
        },
        BadCreate {
            what: "CreateMachine with a NIC without network_id",
            request: with(&|m| {
                let mut nic = nic(ctx, "eth0", &["10.0.0.1"]);
                nic.network_id.clear();
                nic_into(m, nic);
            }),
            hints: &["network"],
        },
        BadCreate {
            what: "CreateMachine with a NIC whose IP is not an IP address",
            request: with(&|m| nic_into(m, nic(ctx, "eth0", &["10.0.0.1", "not-an-ip"]))),
            hints: &["ip"],
        },
        BadCreate {
            what: "CreateMachine with two NICs of the same name",
            request: with(&|m| {
                nic_into(m, nic(ctx, "eth0", &["10.0.0.1"]));
                nic_into(m, nic(ctx, "eth0", &["10.0.0.2"]));
            }),
            hints: &["name", "duplicate", "network"],
        },
    ];
    for case in cases {
        let result = call!(ctx, machine.create_machine(case.request));
        track_created(ctx, &result, |r| r.machine.as_ref().map(|m| id_of(m).to_string()));
        expect_invalid(result, case.what, case.hints)?;
    }

    // The anchors' sketch (§1.4) allows NOT_FOUND for an unknown class as well: the class is
    // a reference to something the runtime does not have. Either way the message names it.
    let request = spec(&|s| s.class = "conformance-no-such-class".into());
    let result = call!(ctx, machine.create_machine(request));
    track_created(ctx, &result, |r| r.machine.as_ref().map(|m| id_of(m).to_string()));
    let what = "CreateMachine with an unknown class";
    match result {
        Err(status) if matches!(status.code(), Code::InvalidArgument | Code::NotFound) => {
            ensure_mentions(&status, what, &["class"])
        }
        other => expect_code(other, Code::InvalidArgument, what).map(drop),
    }
}

fn nic_into(machine: &mut Machine, nic: NetworkInterface) {
    machine
        .spec
        .get_or_insert_with(Default::default)
        .network_interfaces
        .push(nic);
}

pub(super) async fn power_rejects_unknown_value(ctx: &mut Ctx) -> TestResult {
    let machine = create_default(ctx, &[]).await?;
    let id = id_of(&machine).to_string();
    let result = call!(
        ctx,
        machine.update_machine_power(UpdateMachinePowerRequest {
            machine_id: id.clone(),
            power: BAD_POWER,
        })
    );
    expect_invalid(result, "UpdateMachinePower with power 7", &["power"])?;
    let listed = must_get(ctx, &id).await?;
    ensure!(
        spec_of(&listed).power == Power::On as i32,
        "a rejected UpdateMachinePower changed spec.power to {}",
        spec_of(&listed).power
    );
    Ok(())
}

/// Every RPC that names a machine answers NOT_FOUND for an id that does not exist, with an
/// otherwise valid request (so a runtime that validates the body first has nothing to reject).
pub(super) async fn unknown_machine_is_not_found(ctx: &mut Ctx) -> TestResult {
    let id = unknown_id();
    let result = call!(
        ctx,
        machine.delete_machine(DeleteMachineRequest {
            machine_id: id.clone()
        })
    );
    expect_code(result, Code::NotFound, "DeleteMachine of an unknown id")?;
    let result = call!(
        ctx,
        machine.update_machine_annotations(UpdateMachineAnnotationsRequest {
            machine_id: id.clone(),
            annotations: [("a".to_string(), "b".to_string())].into(),
        })
    );
    expect_code(
        result,
        Code::NotFound,
        "UpdateMachineAnnotations of an unknown id",
    )?;
    let result = call!(
        ctx,
        machine.update_machine_power(UpdateMachinePowerRequest {
            machine_id: id.clone(),
            power: Power::Off as i32,
        })
    );
    expect_code(result, Code::NotFound, "UpdateMachinePower of an unknown id")?;
    let result = call!(
        ctx,
        machine.attach_volume(AttachVolumeRequest {
            machine_id: id.clone(),
            volume: Some(scratch_disk("scratch", "odb")),
        })
    );
    expect_code(result, Code::NotFound, "AttachVolume to an unknown machine")?;
    let result = call!(
        ctx,
        machine.detach_volume(DetachVolumeRequest {
            machine_id: id.clone(),
            name: "scratch".into(),
        })
    );
    expect_code(result, Code::NotFound, "DetachVolume from an unknown machine")?;
    let result = call!(
        ctx,
        machine.update_volume(UpdateVolumeRequest {
            machine_id: id.clone(),
            volume: Some(connection_volume("data", "odc", 2 << 30)),
        })
    );
    expect_code(result, Code::NotFound, "UpdateVolume on an unknown machine")?;
    let result = call!(
        ctx,
        machine.attach_network_interface(AttachNetworkInterfaceRequest {
            machine_id: id.clone(),
            network_interface: Some(nic(ctx, "eth0", &["10.0.0.1"])),
        })
    );
    expect_code(
        result,
        Code::NotFound,
        "AttachNetworkInterface to an unknown machine",
    )?;
    let result = call!(
        ctx,
        machine.detach_network_interface(DetachNetworkInterfaceRequest {
            machine_id: id.clone(),
            name: "eth0".into(),
        })
    );
    expect_code(
        result,
        Code::NotFound,
        "DetachNetworkInterface from an unknown machine",
    )?;
    Ok(())
}

/// Brokers answer a list by an unknown id with OK and `[]`, and the machinepoollet relies on
/// that to tell "gone" from "error" (iri-contract §2.0, §6.3).
pub(super) async fn list_unknown_id_is_empty(ctx: &mut Ctx) -> TestResult {
    let id = unknown_id();
    let machines = list(
        ctx,
        Some(MachineFilter {
            id: id.clone(),
            ..Default::default()
        }),
    )
    .await?;
    ensure!(
        machines.is_empty(),
        "ListMachines with an unknown filter.id returned {} machines",
        machines.len()
    );
    let machines = list(
        ctx,
        Some(MachineFilter {
            id,
            label_selector: ctx.selector(),
        }),
    )
    .await?;
    ensure!(
        machines.is_empty(),
        "ListMachines with an unknown filter.id and a label selector returned {} machines",
        machines.len()
    );
    Ok(())
}

/// Malformed attach/update requests on an existing machine are INVALID_ARGUMENT and leave the
/// spec as it was.
pub(super) async fn attach_rejects_malformed_requests(ctx: &mut Ctx) -> TestResult {
    let machine = create_default(ctx, &[]).await?;
    let id = id_of(&machine).to_string();
    let before = spec_of(&must_get(ctx, &id).await?);
    let attach = |volume: Option<Volume>| AttachVolumeRequest {
        machine_id: id.clone(),
        volume,
    };
    let cases: Vec<(&str, AttachVolumeRequest, &[&str])> = vec![
        ("AttachVolume without volume", attach(None), &["volume"]),
        (
            "AttachVolume with a volume without name",
            attach(Some(scratch_disk("", "odb"))),
            &["name"],
        ),
        (
            "AttachVolume with neither local_disk nor connection",
            attach(Some(Volume {
                name: "hollow".into(),
                ..Default::default()
            })),
            &["local_disk", "connection", "volume"],
        ),
    ];
    for (what, request, hints) in cases {
        let result = call!(ctx, machine.attach_volume(request));
        expect_invalid(result, what, hints)?;
    }
    let result = call!(
        ctx,
        machine.update_volume(UpdateVolumeRequest {
            machine_id: id.clone(),
            volume: None,
        })
    );
    expect_invalid(result, "UpdateVolume without volume", &["volume"])?;

    let attach_nic = |nic| AttachNetworkInterfaceRequest {
        machine_id: id.clone(),
        network_interface: nic,
    };
    let cases: Vec<(&str, AttachNetworkInterfaceRequest, &[&str])> = vec![
        (
            "AttachNetworkInterface without network_interface",
            attach_nic(None),
            &["network"],
        ),
        (
            "AttachNetworkInterface with a NIC without name",
            attach_nic(Some(nic(ctx, "", &["10.0.0.1"]))),
            &["name"],
        ),
        (
            "AttachNetworkInterface with a NIC whose IP is not an IP address",
            attach_nic(Some(nic(ctx, "eth9", &["10.0.0.300"]))),
            &["ip"],
        ),
    ];
    for (what, request, hints) in cases {
        let result = call!(ctx, machine.attach_network_interface(request));
        expect_invalid(result, what, hints)?;
    }

    let after = spec_of(&must_get(ctx, &id).await?);
    if let Some(diff) = spec_difference(&before, &after) {
        return Err(TestError::fail(format!(
            "rejected attach requests changed the spec: {diff}"
        )));
    }
    Ok(())
}
