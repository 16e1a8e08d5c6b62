// SPDX-License-Identifier: Apache-2.0
//! `irictl machine ...`: the MachineRuntime commands.

use std::io::Write;

use anyhow::{Result, bail};
use iri_api::{
    RuntimeKind,
    endpoint::clients,
    machine::v1alpha1::{
        AttachNetworkInterfaceRequest, AttachVolumeRequest, CreateMachineRequest, DeleteMachineRequest,
        DetachNetworkInterfaceRequest, DetachVolumeRequest, EventFilter, ExecRequest, ListEventsRequest,
        ListMachinesRequest, Machine, MachineClassStatus, MachineFilter, MachineState, NetworkInterface,
        Power, StatusRequest, UpdateMachineAnnotationsRequest, UpdateMachinePowerRequest,
        UpdateVolumeRequest, VersionRequest, VersionResponse, Volume,
    },
};

use crate::{
    cli::{
        MachineAttach, MachineCommand, MachineCreate, MachineDelete, MachineDetach, MachineGet, MachineUpdate,
    },
    common::{VersionColumns, print_events, version_response},
    input::Input,
    render::{Columns, Object, enum_name, format_list, format_map, headers},
    session::{Session, event_window, list_filter, selector},
    units::{age, format_bytes},
};

impl Object for Machine {
    const MESSAGE: &'static str = "machine.v1alpha1.Machine";

    fn key(&self) -> String {
        self.metadata.as_ref().map(|m| m.id.clone()).unwrap_or_default()
    }
}

impl Object for MachineClassStatus {
    const MESSAGE: &'static str = "machine.v1alpha1.MachineClassStatus";

    fn key(&self) -> String {
        self.machine_class
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default()
    }
}

impl Object for Volume {
    const MESSAGE: &'static str = "machine.v1alpha1.Volume";

    fn key(&self) -> String {
        self.name.clone()
    }
}

impl Object for NetworkInterface {
    const MESSAGE: &'static str = "machine.v1alpha1.NetworkInterface";

    fn key(&self) -> String {
        self.name.clone()
    }
}

version_response!(VersionResponse, "machine.v1alpha1.VersionResponse");

/// Upstream's machine table `ID, Class, State, Age`; wide adds `Power, Volumes, NICs, Labels`.
#[derive(Debug, Clone, Copy)]
pub struct MachineColumns;

impl Columns<Machine> for MachineColumns {
    fn headers(&self, wide: bool) -> Vec<String> {
        headers(
            &["ID", "Class", "State", "Age"],
            &["Power", "Volumes", "NICs", "Labels"],
            wide,
        )
    }

    fn row(&self, machine: &Machine, wide: bool) -> Vec<String> {
        let metadata = machine.metadata.clone().unwrap_or_default();
        let spec = machine.spec.clone().unwrap_or_default();
        let state = machine.status.as_ref().map_or(0, |s| s.state);
        let mut row = vec![
            metadata.id,
            spec.class,
            enum_name(state, MachineState::as_str_name),
            age(metadata.created_at, 1_000_000_000),
        ];
        if wide {
            row.push(enum_name(spec.power, Power::as_str_name));
            row.push(format_list(spec.volumes.iter().map(|v| v.name.as_str())));
            row.push(format_list(
                spec.network_interfaces.iter().map(|n| n.name.as_str()),
            ));
            row.push(format_map(&metadata.labels));
        }
        row
    }
}

/// Upstream's machine class status table `Name, CPU, Memory, Quantity`; wide adds all
/// `Resources`.
#[derive(Debug, Clone, Copy)]
pub struct MachineStatusColumns;

impl Columns<MachineClassStatus> for MachineStatusColumns {
    fn headers(&self, wide: bool) -> Vec<String> {
        headers(&["Name", "CPU", "Memory", "Quantity"], &["Resources"], wide)
    }

    fn row(&self, status: &MachineClassStatus, wide: bool) -> Vec<String> {
        let class = status.machine_class.clone().unwrap_or_default();
        let resources = class.capabilities.map(|c| c.resources).unwrap_or_default();
        let mut row = vec![
            class.name,
            resources.get("cpu").map_or("<none>".into(), i64::to_string),
            resources
                .get("memory")
                .map_or("<none>".into(), |m| format_bytes(*m)),
            status.quantity.to_string(),
        ];
        if wide {
            let all = resources
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect();
            row.push(format_map(&all));
        }
        row
    }
}

/// Runs a machine command.
pub async fn run(session: &Session, command: MachineCommand, out: &mut dyn Write) -> Result<()> {
    let mut client = clients::machine(session.connect(RuntimeKind::Machine).await?);
    let printer = session.printer();
    match command {
        MachineCommand::Get(MachineGet::Machine(args)) => {
            let filter = list_filter(&args, |id, label_selector| MachineFilter { id, label_selector });
            let request = session.request(ListMachinesRequest { filter });
            let machines = session
                .call("ListMachines", client.list_machines(request))
                .await?
                .machines;
            printer.found(out, "machine", args.id.as_deref(), &machines, &MachineColumns)
        }
        MachineCommand::Get(MachineGet::Status) => {
            let response = session
                .call("Status", client.status(session.request(StatusRequest {})))
                .await?;
            printer.list(out, &response.machine_class_status, &MachineStatusColumns)
        }
        MachineCommand::Get(MachineGet::Events(args)) => {
            let (from, to) = event_window(args.duration);
            let filter = EventFilter {
                id: String::new(),
                label_selector: selector(&args.labels),
                events_from_time: from,
                events_to_time: to,
            };
            let request = session.request(ListEventsRequest { filter: Some(filter) });
            let events = session
                .call("ListEvents", client.list_events(request))
                .await?
                .events;
            print_events(&printer, out, RuntimeKind::Machine, &events)
        }
        MachineCommand::Get(MachineGet::Version) => {
            let request = session.request(VersionRequest::default());
            let version = session.call("Version", client.version(request)).await?;
            printer.one(out, &version, &VersionColumns)
        }
        MachineCommand::Create(MachineCreate::Machine(file)) => {
            let machine = Input::read(&file.file)?.decode_new(|m: &mut Machine| &mut m.metadata)?;
            let request = session.request(CreateMachineRequest {
                machine: Some(machine),
            });
            let response = session
                .call("CreateMachine", client.create_machine(request))
                .await?;
            session.print_created_response(out, "CreateMachine", "machine", response.machine, &MachineColumns)
        }
        MachineCommand::Delete(MachineDelete::Machine(args)) => {
            session
                .for_each_tolerating_not_found(
                    out,
                    &args.ids,
                    "Machine",
                    "deleted",
                    "DeleteMachine",
                    |machine_id| {
                        let mut client = client.clone();
                        let request = session.request(DeleteMachineRequest { machine_id });
                        async move { client.delete_machine(request).await }
                    },
                )
                .await
        }
        MachineCommand::Update(MachineUpdate::Power { machine, power }) => {
            let request = session.request(UpdateMachinePowerRequest {
                machine_id: machine.machine_id.clone(),
                power: power as i32,
            });
            session
                .call("UpdateMachinePower", client.update_machine_power(request))
                .await?;
            writeln!(
                out,
                "Machine {} power set to {}",
                machine.machine_id,
                power.as_str_name()
            )?;
            Ok(())
        }
        MachineCommand::Update(MachineUpdate::Volume { machine, file }) => {
            let volume: Volume = Input::read(&file.file)?.decode()?;
            let name = volume.name.clone();
            let request = session.request(UpdateVolumeRequest {
                machine_id: machine.machine_id.clone(),
                volume: Some(volume),
            });
            session
                .call("UpdateVolume", client.update_volume(request))
                .await?;
            writeln!(out, "Volume {name} of machine {} updated", machine.machine_id)?;
            Ok(())
        }
        MachineCommand::Update(MachineUpdate::Annotations { machine, file }) => {
            let annotations = Input::read(&file.file)?.decode_string_map()?;
            let request = session.request(UpdateMachineAnnotationsRequest {
                machine_id: machine.machine_id.clone(),
                annotations,
            });
            session
                .call(
                    "UpdateMachineAnnotations",
                    client.update_machine_annotations(request),
                )
                .await?;
            writeln!(out, "Annotations of machine {} updated", machine.machine_id)?;
            Ok(())
        }
        MachineCommand::Attach(MachineAttach::Volume { machine, file }) => {
            let volume: Volume = Input::read(&file.file)?.decode()?;
            let name = volume.name.clone();
            let request = session.request(AttachVolumeRequest {
                machine_id: machine.machine_id.clone(),
                volume: Some(volume),
            });
            session
                .call("AttachVolume", client.attach_volume(request))
                .await?;
            writeln!(out, "Volume {name} attached to machine {}", machine.machine_id)?;
            Ok(())
        }
        MachineCommand::Attach(MachineAttach::Networkinterface { machine, file }) => {
            let nic: NetworkInterface = Input::read(&file.file)?.decode()?;
            let name = nic.name.clone();
            let request = session.request(AttachNetworkInterfaceRequest {
                machine_id: machine.machine_id.clone(),
                network_interface: Some(nic),
            });
            session
                .call("AttachNetworkInterface", client.attach_network_interface(request))
                .await?;
            writeln!(
                out,
                "Network interface {name} attached to machine {}",
                machine.machine_id
            )?;
            Ok(())
        }
        MachineCommand::Detach(MachineDetach::Volume { machine, names }) => {
            session
                .for_each_tolerating_not_found(out, &names, "Volume", "detached", "DetachVolume", |name| {
                    let mut client = client.clone();
                    let machine_id = machine.machine_id.clone();
                    let request = session.request(DetachVolumeRequest { machine_id, name });
                    async move { client.detach_volume(request).await }
                })
                .await
        }
        MachineCommand::Detach(MachineDetach::Networkinterface { machine, names }) => {
            session
                .for_each_tolerating_not_found(
                    out,
                    &names,
                    "Network interface",
                    "detached",
                    "DetachNetworkInterface",
                    |name| {
                        let mut client = client.clone();
                        let machine_id = machine.machine_id.clone();
                        let request = session.request(DetachNetworkInterfaceRequest { machine_id, name });
                        async move { client.detach_network_interface(request).await }
                    },
                )
                .await
        }
        MachineCommand::Exec(args) => {
            let request = session.request(ExecRequest {
                machine_id: args.machine_id.clone(),
            });
            let url = session.call("Exec", client.exec(request)).await?.url;
            if url.is_empty() {
                bail!("Exec: the runtime returned no URL");
            }
            if args.print_url {
                writeln!(out, "{url}")?;
                return Ok(());
            }
            let options = crate::exec::Options {
                wait: args.wait,
                escape: args.escape.0,
                connect_timeout: session.timeout(),
            };
            crate::exec::console(&args.machine_id, &url, options, out).await
        }
    }
}

#[cfg(test)]
mod tests {
    use iri_api::{
        machine::v1alpha1::{MachineSpec, MachineStatus},
        meta::v1alpha1::ObjectMetadata,
    };

    use super::*;

    #[test]
    fn machine_rows() {
        let machine = Machine {
            metadata: Some(ObjectMetadata {
                id: "m1".into(),
                labels: [("app".into(), "web".into())].into(),
                ..Default::default()
            }),
            spec: Some(MachineSpec {
                class: "x3-small".into(),
                power: 1,
                volumes: vec![Volume {
                    name: "root".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(MachineStatus {
                state: MachineState::MachineRunning as i32,
                ..Default::default()
            }),
        };
        assert_eq!(
            MachineColumns.row(&machine, false),
            ["m1", "x3-small", "MACHINE_RUNNING", "<unknown>"]
        );
        assert_eq!(
            MachineColumns.row(&machine, true)[4..],
            ["POWER_OFF", "root", "<none>", "app=web"]
        );
        assert_eq!(MachineColumns.headers(true).len(), 8);
    }
}
