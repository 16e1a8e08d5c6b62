// SPDX-License-Identifier: Apache-2.0
//! `irictl volume ...`: the VolumeRuntime commands.

use std::io::Write;

use anyhow::{Result, bail};
use iri_api::{
    RuntimeKind,
    endpoint::clients,
    volume::v1alpha1::{
        CreateVolumeRequest, CreateVolumeSnapshotRequest, DeleteVolumeRequest, DeleteVolumeSnapshotRequest,
        EventFilter, ExpandVolumeRequest, ListEventsRequest, ListVolumeSnapshotsRequest, ListVolumesRequest,
        StatusRequest, VersionRequest, VersionResponse, Volume, VolumeClassStatus, VolumeFilter,
        VolumeResources, VolumeSnapshot, VolumeSnapshotFilter, VolumeSnapshotState, VolumeState,
    },
};

use crate::{
    cli::{VolumeCommand, VolumeCreate, VolumeDelete, VolumeExpand, VolumeGet},
    common::{VersionColumns, print_events, version_response},
    input::Input,
    render::{Columns, Object, enum_name, format_map, headers, or_none},
    session::{Session, event_window, list_filter, selector},
    units::{age, format_bytes},
};

impl Object for Volume {
    const MESSAGE: &'static str = "volume.v1alpha1.Volume";

    fn key(&self) -> String {
        self.metadata.as_ref().map(|m| m.id.clone()).unwrap_or_default()
    }
}

impl Object for VolumeSnapshot {
    const MESSAGE: &'static str = "volume.v1alpha1.VolumeSnapshot";

    fn key(&self) -> String {
        self.metadata.as_ref().map(|m| m.id.clone()).unwrap_or_default()
    }
}

impl Object for VolumeClassStatus {
    const MESSAGE: &'static str = "volume.v1alpha1.VolumeClassStatus";

    fn key(&self) -> String {
        self.volume_class
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default()
    }
}

version_response!(VersionResponse, "volume.v1alpha1.VersionResponse");

/// Upstream's volume table `ID, Class, Image, State, Age` (with the image cell upstream forgot);
/// wide adds `Size, Driver, Handle, Labels`.
#[derive(Debug, Clone, Copy)]
pub struct VolumeColumns;

impl Columns<Volume> for VolumeColumns {
    fn headers(&self, wide: bool) -> Vec<String> {
        headers(
            &["ID", "Class", "Image", "State", "Age"],
            &["Size", "Driver", "Handle", "Labels"],
            wide,
        )
    }

    fn row(&self, volume: &Volume, wide: bool) -> Vec<String> {
        let metadata = volume.metadata.clone().unwrap_or_default();
        let spec = volume.spec.clone().unwrap_or_default();
        let status = volume.status.clone().unwrap_or_default();
        let image = spec
            .volume_data_source
            .as_ref()
            .and_then(|s| s.image_data_source.as_ref())
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let mut row = vec![
            metadata.id,
            spec.class,
            or_none(&image),
            enum_name(status.state, VolumeState::as_str_name),
            age(metadata.created_at, 1_000_000_000),
        ];
        if wide {
            let size = status.resources.or(spec.resources).map_or(0, |r| r.storage_bytes);
            let access = status.access.unwrap_or_default();
            row.push(format_bytes(size));
            row.push(or_none(&access.driver));
            row.push(or_none(&access.handle));
            row.push(format_map(&metadata.labels));
        }
        row
    }
}

/// Upstream's volume snapshot table `ID, VolumeID, State, Age`; wide adds `Size, Labels`.
#[derive(Debug, Clone, Copy)]
pub struct VolumeSnapshotColumns;

impl Columns<VolumeSnapshot> for VolumeSnapshotColumns {
    fn headers(&self, wide: bool) -> Vec<String> {
        headers(&["ID", "VolumeID", "State", "Age"], &["Size", "Labels"], wide)
    }

    fn row(&self, snapshot: &VolumeSnapshot, wide: bool) -> Vec<String> {
        let metadata = snapshot.metadata.clone().unwrap_or_default();
        let volume_id = snapshot
            .spec
            .as_ref()
            .map(|s| s.volume_id.clone())
            .unwrap_or_default();
        let status = snapshot.status.unwrap_or_default();
        let mut row = vec![
            metadata.id,
            or_none(&volume_id),
            enum_name(status.state, VolumeSnapshotState::as_str_name),
            age(metadata.created_at, 1_000_000_000),
        ];
        if wide {
            row.push(format_bytes(status.size));
            row.push(format_map(&metadata.labels));
        }
        row
    }
}

/// Upstream's volume class status table `Name, TPS, IOPS, Quantity` (quantity in bytes).
#[derive(Debug, Clone, Copy)]
pub struct VolumeStatusColumns;

impl Columns<VolumeClassStatus> for VolumeStatusColumns {
    fn headers(&self, _wide: bool) -> Vec<String> {
        headers(&["Name", "TPS", "IOPS", "Quantity"], &[], false)
    }

    fn row(&self, status: &VolumeClassStatus, _wide: bool) -> Vec<String> {
        let class = status.volume_class.clone().unwrap_or_default();
        let capabilities = class.capabilities.unwrap_or_default();
        vec![
            class.name,
            capabilities.tps.to_string(),
            capabilities.iops.to_string(),
            format_bytes(status.quantity),
        ]
    }
}

/// Runs a volume command.
pub async fn run(session: &Session, command: VolumeCommand, out: &mut dyn Write) -> Result<()> {
    let mut client = clients::volume(session.connect(RuntimeKind::Volume).await?);
    let printer = session.printer();
    match command {
        VolumeCommand::Get(VolumeGet::Volume(args)) => {
            let filter = list_filter(&args, |id, label_selector| VolumeFilter { id, label_selector });
            let request = session.request(ListVolumesRequest { filter });
            let volumes = session
                .call("ListVolumes", client.list_volumes(request))
                .await?
                .volumes;
            printer.found(out, "volume", args.id.as_deref(), &volumes, &VolumeColumns)
        }
        VolumeCommand::Get(VolumeGet::Volumesnapshot(args)) => {
            let filter = list_filter(&args, |id, label_selector| VolumeSnapshotFilter {
                id,
                label_selector,
            });
            let request = session.request(ListVolumeSnapshotsRequest { filter });
            let snapshots = session
                .call("ListVolumeSnapshots", client.list_volume_snapshots(request))
                .await?
                .volume_snapshots;
            printer.found(
                out,
                "volume snapshot",
                args.id.as_deref(),
                &snapshots,
                &VolumeSnapshotColumns,
            )
        }
        VolumeCommand::Get(VolumeGet::Status) => {
            let response = session
                .call("Status", client.status(session.request(StatusRequest {})))
                .await?;
            printer.list(out, &response.volume_class_status, &VolumeStatusColumns)
        }
        VolumeCommand::Get(VolumeGet::Events(args)) => {
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
            print_events(&printer, out, RuntimeKind::Volume, &events)
        }
        VolumeCommand::Get(VolumeGet::Version) => {
            let request = session.request(VersionRequest::default());
            let version = session.call("Version", client.version(request)).await?;
            printer.one(out, &version, &VersionColumns)
        }
        VolumeCommand::Create(VolumeCreate::Volume(file)) => {
            let volume = Input::read(&file.file)?.decode_new(|v: &mut Volume| &mut v.metadata)?;
            let request = session.request(CreateVolumeRequest { volume: Some(volume) });
            let response = session
                .call("CreateVolume", client.create_volume(request))
                .await?;
            session.print_created_response(out, "CreateVolume", "volume", response.volume, &VolumeColumns)
        }
        VolumeCommand::Create(VolumeCreate::Volumesnapshot(file)) => {
            let snapshot = Input::read(&file.file)?.decode_new(|s: &mut VolumeSnapshot| &mut s.metadata)?;
            let request = session.request(CreateVolumeSnapshotRequest {
                volume_snapshot: Some(snapshot),
            });
            let response = session
                .call("CreateVolumeSnapshot", client.create_volume_snapshot(request))
                .await?;
            session.print_created_response(
                out,
                "CreateVolumeSnapshot",
                "volume snapshot",
                response.volume_snapshot,
                &VolumeSnapshotColumns,
            )
        }
        VolumeCommand::Delete(VolumeDelete::Volume(args)) => {
            session
                .for_each_tolerating_not_found(
                    out,
                    &args.ids,
                    "Volume",
                    "deleted",
                    "DeleteVolume",
                    |volume_id| {
                        let mut client = client.clone();
                        let request = session.request(DeleteVolumeRequest { volume_id });
                        async move { client.delete_volume(request).await }
                    },
                )
                .await
        }
        VolumeCommand::Delete(VolumeDelete::Volumesnapshot(args)) => {
            session
                .for_each_tolerating_not_found(
                    out,
                    &args.ids,
                    "Volume snapshot",
                    "deleted",
                    "DeleteVolumeSnapshot",
                    |volume_snapshot_id| {
                        let mut client = client.clone();
                        let request = session.request(DeleteVolumeSnapshotRequest { volume_snapshot_id });
                        async move { client.delete_volume_snapshot(request).await }
                    },
                )
                .await
        }
        VolumeCommand::Expand(VolumeExpand::Volume { id, size }) => {
            if size <= 0 {
                bail!("--size must be positive");
            }
            let request = session.request(ExpandVolumeRequest {
                volume_id: id.clone(),
                resources: Some(VolumeResources { storage_bytes: size }),
            });
            session
                .call("ExpandVolume", client.expand_volume(request))
                .await?;
            writeln!(out, "Volume {id} expanded to {}", format_bytes(size))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use iri_api::{
        meta::v1alpha1::ObjectMetadata,
        volume::v1alpha1::{ImageDataSource, VolumeDataSource, VolumeSpec},
    };

    use super::*;

    #[test]
    fn volume_rows_have_every_cell() {
        let volume = Volume {
            metadata: Some(ObjectMetadata {
                id: "v1".into(),
                ..Default::default()
            }),
            spec: Some(VolumeSpec {
                class: "fast".into(),
                resources: Some(VolumeResources {
                    storage_bytes: 1 << 30,
                }),
                volume_data_source: Some(VolumeDataSource {
                    image_data_source: Some(ImageDataSource {
                        image: "gardenlinux".into(),
                        architecture: String::new(),
                    }),
                    snapshot_data_source: None,
                }),
                ..Default::default()
            }),
            status: None,
        };
        let row = VolumeColumns.row(&volume, true);
        assert_eq!(row.len(), VolumeColumns.headers(true).len());
        assert_eq!(
            row[..5],
            ["v1", "fast", "gardenlinux", "VOLUME_PENDING", "<unknown>"]
        );
        assert_eq!(row[5], "1Gi");
    }
}
