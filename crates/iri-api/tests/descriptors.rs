// SPDX-License-Identifier: Apache-2.0
//! Checks the compiled descriptors against a field table transcribed from the contract
//! (iri-contract §1), independently of the .proto files: every message, field number, type,
//! enum value and RPC. A renumbered or retyped field breaks wire compatibility with upstream, so
//! this test must fail on any drift, in either direction (missing or extra).

use std::collections::BTreeMap;

use prost_reflect::{Cardinality, FieldDescriptor, Kind};

/// `message <full name>: <field>=<number>:<type> ...` / `enum <full name>: <NAME>=<n> ...` /
/// `service <full name>: <Rpc>(<Req>)-><Resp> ...`, one per line. Types of fields in the same
/// package are written without the package.
const CONTRACT: &str = r#"
message meta.v1alpha1.ObjectMetadata: id=1:string annotations=2:map<string,string> labels=3:map<string,string> generation=4:int64 created_at=5:int64 deleted_at=6:int64

message event.v1alpha1.Event: spec=2:EventSpec
message event.v1alpha1.EventSpec: involved_object_meta=1:meta.v1alpha1.ObjectMetadata reason=2:string message=3:string type=4:string event_time=5:int64 action=6:string

service machine.v1alpha1.MachineRuntime: Version(VersionRequest)->VersionResponse ListEvents(ListEventsRequest)->ListEventsResponse ListMachines(ListMachinesRequest)->ListMachinesResponse CreateMachine(CreateMachineRequest)->CreateMachineResponse DeleteMachine(DeleteMachineRequest)->DeleteMachineResponse UpdateMachineAnnotations(UpdateMachineAnnotationsRequest)->UpdateMachineAnnotationsResponse UpdateMachinePower(UpdateMachinePowerRequest)->UpdateMachinePowerResponse AttachVolume(AttachVolumeRequest)->AttachVolumeResponse DetachVolume(DetachVolumeRequest)->DetachVolumeResponse UpdateVolume(UpdateVolumeRequest)->UpdateVolumeResponse AttachNetworkInterface(AttachNetworkInterfaceRequest)->AttachNetworkInterfaceResponse DetachNetworkInterface(DetachNetworkInterfaceRequest)->DetachNetworkInterfaceResponse Status(StatusRequest)->StatusResponse Exec(ExecRequest)->ExecResponse
enum machine.v1alpha1.Power: POWER_ON=0 POWER_OFF=1
enum machine.v1alpha1.VolumeState: VOLUME_PENDING=0 VOLUME_ATTACHED=1
enum machine.v1alpha1.NetworkInterfaceState: NETWORK_INTERFACE_PENDING=0 NETWORK_INTERFACE_ATTACHED=1
enum machine.v1alpha1.MachineState: MACHINE_PENDING=0 MACHINE_RUNNING=1 MACHINE_SUSPENDED=2 MACHINE_TERMINATED=3 MACHINE_TERMINATING=4 MACHINE_STOPPED=5
message machine.v1alpha1.VolumeSpec: driver=1:string handle=2:string attributes=3:map<string,string> secret_data=4:map<string,bytes>
message machine.v1alpha1.MachineFilter: id=1:string label_selector=2:map<string,string>
message machine.v1alpha1.EventFilter: id=1:string label_selector=2:map<string,string> events_from_time=3:int64 events_to_time=4:int64
message machine.v1alpha1.MachineClassCapabilities: resources=1:map<string,int64>
message machine.v1alpha1.Machine: metadata=1:meta.v1alpha1.ObjectMetadata spec=2:MachineSpec status=3:MachineStatus
message machine.v1alpha1.ImageSpec: image=1:string
message machine.v1alpha1.LocalDisk: size_bytes=1:int64 image=2:ImageSpec
message machine.v1alpha1.VolumeConnection: driver=1:string handle=2:string attributes=3:map<string,string> secret_data=4:map<string,bytes> encryption_data=5:map<string,bytes> effective_storage_bytes=6:int64
message machine.v1alpha1.Volume: name=1:string device=2:string local_disk=4:LocalDisk connection=5:VolumeConnection
message machine.v1alpha1.NetworkInterface: name=1:string network_id=2:string ips=3:repeated string attributes=4:map<string,string>
message machine.v1alpha1.MachineSpec: power=1:enum Power class=2:string ignition_data=3:bytes volumes=4:repeated Volume network_interfaces=5:repeated NetworkInterface guest_config=6:GuestConfig
message machine.v1alpha1.MachineStatus: observed_generation=1:int64 state=2:enum MachineState image_ref=3:string volumes=4:repeated VolumeStatus network_interfaces=5:repeated NetworkInterfaceStatus machine_conditions=6:repeated Conditions
message machine.v1alpha1.Conditions: type=1:string status=2:string reason=3:string message=4:string last_transition_time=5:int64
message machine.v1alpha1.VolumeStatus: name=1:string handle=2:string state=3:enum VolumeState
message machine.v1alpha1.NetworkInterfaceStatus: name=1:string handle=2:string state=3:enum NetworkInterfaceState
message machine.v1alpha1.MachineClass: name=1:string capabilities=2:MachineClassCapabilities
message machine.v1alpha1.MachineClassStatus: machine_class=1:MachineClass quantity=2:int64
message machine.v1alpha1.VersionRequest: version=1:string
message machine.v1alpha1.VersionResponse: runtime_name=1:string runtime_version=2:string
message machine.v1alpha1.ListMachinesRequest: filter=1:MachineFilter
message machine.v1alpha1.ListMachinesResponse: machines=1:repeated Machine
message machine.v1alpha1.ListEventsRequest: filter=1:EventFilter
message machine.v1alpha1.ListEventsResponse: events=1:repeated event.v1alpha1.Event
message machine.v1alpha1.CreateMachineRequest: machine=1:Machine
message machine.v1alpha1.CreateMachineResponse: machine=1:Machine
message machine.v1alpha1.DeleteMachineRequest: machine_id=1:string
message machine.v1alpha1.DeleteMachineResponse:
message machine.v1alpha1.UpdateMachineAnnotationsRequest: machine_id=1:string annotations=2:map<string,string>
message machine.v1alpha1.UpdateMachineAnnotationsResponse:
message machine.v1alpha1.UpdateMachinePowerRequest: machine_id=1:string power=2:enum Power
message machine.v1alpha1.UpdateMachinePowerResponse:
message machine.v1alpha1.AttachVolumeRequest: machine_id=1:string volume=2:Volume
message machine.v1alpha1.AttachVolumeResponse:
message machine.v1alpha1.DetachVolumeRequest: machine_id=1:string name=2:string
message machine.v1alpha1.DetachVolumeResponse:
message machine.v1alpha1.UpdateVolumeRequest: machine_id=1:string volume=2:Volume
message machine.v1alpha1.UpdateVolumeResponse:
message machine.v1alpha1.AttachNetworkInterfaceRequest: machine_id=1:string network_interface=2:NetworkInterface
message machine.v1alpha1.AttachNetworkInterfaceResponse:
message machine.v1alpha1.DetachNetworkInterfaceRequest: machine_id=1:string name=2:string
message machine.v1alpha1.DetachNetworkInterfaceResponse:
message machine.v1alpha1.StatusRequest:
message machine.v1alpha1.StatusResponse: machine_class_status=1:repeated MachineClassStatus
message machine.v1alpha1.ExecRequest: machine_id=1:string
message machine.v1alpha1.ExecResponse: url=1:string
message machine.v1alpha1.GuestConfig: hostname=1:string

service volume.v1alpha1.VolumeRuntime: Version(VersionRequest)->VersionResponse ListEvents(ListEventsRequest)->ListEventsResponse ListVolumes(ListVolumesRequest)->ListVolumesResponse CreateVolume(CreateVolumeRequest)->CreateVolumeResponse ExpandVolume(ExpandVolumeRequest)->ExpandVolumeResponse DeleteVolume(DeleteVolumeRequest)->DeleteVolumeResponse CreateVolumeSnapshot(CreateVolumeSnapshotRequest)->CreateVolumeSnapshotResponse DeleteVolumeSnapshot(DeleteVolumeSnapshotRequest)->DeleteVolumeSnapshotResponse ListVolumeSnapshots(ListVolumeSnapshotsRequest)->ListVolumeSnapshotsResponse Status(StatusRequest)->StatusResponse
enum volume.v1alpha1.VolumeState: VOLUME_PENDING=0 VOLUME_AVAILABLE=1 VOLUME_ERROR=2
enum volume.v1alpha1.VolumeSnapshotState: VOLUME_SNAPSHOT_PENDING=0 VOLUME_SNAPSHOT_READY=1 VOLUME_SNAPSHOT_FAILED=2
message volume.v1alpha1.VolumeFilter: id=1:string label_selector=2:map<string,string>
message volume.v1alpha1.EventFilter: id=1:string label_selector=2:map<string,string> events_from_time=3:int64 events_to_time=4:int64
message volume.v1alpha1.VolumeResources: storage_bytes=1:int64
message volume.v1alpha1.EncryptionSpec: secret_data=1:map<string,bytes>
message volume.v1alpha1.ImageDataSource: image=1:string architecture=2:string
message volume.v1alpha1.SnapshotDataSource: snapshot_id=1:string
message volume.v1alpha1.VolumeDataSource: image_data_source=1:ImageDataSource snapshot_data_source=2:SnapshotDataSource
message volume.v1alpha1.VolumeSpec: class=2:string resources=3:VolumeResources encryption=4:EncryptionSpec volume_data_source=5:VolumeDataSource
message volume.v1alpha1.VolumeStatus: state=1:enum VolumeState access=2:VolumeAccess resources=3:VolumeResources
message volume.v1alpha1.Volume: metadata=1:meta.v1alpha1.ObjectMetadata spec=2:VolumeSpec status=3:VolumeStatus
message volume.v1alpha1.VolumeClassCapabilities: tps=1:int64 iops=2:int64
message volume.v1alpha1.VolumeClass: name=1:string capabilities=2:VolumeClassCapabilities
message volume.v1alpha1.VolumeClassStatus: volume_class=1:VolumeClass quantity=2:int64
message volume.v1alpha1.VolumeAccess: driver=1:string handle=2:string attributes=3:map<string,string> secret_data=4:map<string,bytes>
message volume.v1alpha1.ListEventsRequest: filter=1:EventFilter
message volume.v1alpha1.ListEventsResponse: events=1:repeated event.v1alpha1.Event
message volume.v1alpha1.VersionRequest: version=1:string
message volume.v1alpha1.VersionResponse: runtime_name=1:string runtime_version=2:string
message volume.v1alpha1.ListVolumesRequest: filter=1:VolumeFilter
message volume.v1alpha1.ListVolumesResponse: volumes=1:repeated Volume
message volume.v1alpha1.CreateVolumeRequest: volume=1:Volume
message volume.v1alpha1.CreateVolumeResponse: volume=1:Volume
message volume.v1alpha1.ExpandVolumeRequest: volume_id=1:string resources=2:VolumeResources
message volume.v1alpha1.ExpandVolumeResponse:
message volume.v1alpha1.DeleteVolumeRequest: volume_id=1:string
message volume.v1alpha1.DeleteVolumeResponse:
message volume.v1alpha1.StatusRequest:
message volume.v1alpha1.StatusResponse: volume_class_status=1:repeated VolumeClassStatus
message volume.v1alpha1.VolumeSnapshotSpec: volume_id=1:string
message volume.v1alpha1.VolumeSnapshotStatus: state=1:enum VolumeSnapshotState size=2:int64
message volume.v1alpha1.VolumeSnapshot: metadata=1:meta.v1alpha1.ObjectMetadata spec=2:VolumeSnapshotSpec status=3:VolumeSnapshotStatus
message volume.v1alpha1.VolumeSnapshotFilter: id=1:string label_selector=2:map<string,string>
message volume.v1alpha1.ListVolumeSnapshotsRequest: filter=1:VolumeSnapshotFilter
message volume.v1alpha1.ListVolumeSnapshotsResponse: volume_snapshots=1:repeated VolumeSnapshot
message volume.v1alpha1.CreateVolumeSnapshotRequest: volume_snapshot=1:VolumeSnapshot
message volume.v1alpha1.CreateVolumeSnapshotResponse: volume_snapshot=1:VolumeSnapshot
message volume.v1alpha1.DeleteVolumeSnapshotRequest: volume_snapshot_id=1:string
message volume.v1alpha1.DeleteVolumeSnapshotResponse:

service bucket.v1alpha1.BucketRuntime: Version(VersionRequest)->VersionResponse ListEvents(ListEventsRequest)->ListEventsResponse ListBuckets(ListBucketsRequest)->ListBucketsResponse CreateBucket(CreateBucketRequest)->CreateBucketResponse DeleteBucket(DeleteBucketRequest)->DeleteBucketResponse ListBucketClasses(ListBucketClassesRequest)->ListBucketClassesResponse
enum bucket.v1alpha1.BucketState: BUCKET_PENDING=0 BUCKET_AVAILABLE=1 BUCKET_ERROR=2
message bucket.v1alpha1.EventFilter: id=1:string label_selector=2:map<string,string> events_from_time=3:int64 events_to_time=4:int64
message bucket.v1alpha1.BucketFilter: id=1:string label_selector=2:map<string,string>
message bucket.v1alpha1.BucketSpec: class=2:string
message bucket.v1alpha1.BucketStatus: state=1:enum BucketState access=2:BucketAccess
message bucket.v1alpha1.Bucket: metadata=1:meta.v1alpha1.ObjectMetadata spec=2:BucketSpec status=3:BucketStatus
message bucket.v1alpha1.BucketClassCapabilities: tps=1:int64 iops=2:int64
message bucket.v1alpha1.BucketClass: name=1:string capabilities=2:BucketClassCapabilities
message bucket.v1alpha1.BucketAccess: endpoint=1:string secret_data=2:map<string,bytes>
message bucket.v1alpha1.ListEventsRequest: filter=1:EventFilter
message bucket.v1alpha1.ListEventsResponse: events=1:repeated event.v1alpha1.Event
message bucket.v1alpha1.VersionRequest: version=1:string
message bucket.v1alpha1.VersionResponse: runtime_name=1:string runtime_version=2:string
message bucket.v1alpha1.ListBucketsRequest: filter=1:BucketFilter
message bucket.v1alpha1.ListBucketsResponse: buckets=1:repeated Bucket
message bucket.v1alpha1.CreateBucketRequest: bucket=1:Bucket
message bucket.v1alpha1.CreateBucketResponse: bucket=1:Bucket
message bucket.v1alpha1.DeleteBucketRequest: bucket_id=1:string
message bucket.v1alpha1.DeleteBucketResponse:
message bucket.v1alpha1.ListBucketClassesRequest:
message bucket.v1alpha1.ListBucketClassesResponse: bucket_classes=1:repeated BucketClass
"#;

/// Renders a type name relative to `package` the way the table writes it.
fn relative(full_name: &str, package: &str) -> String {
    full_name
        .strip_prefix(package)
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or(full_name)
        .to_string()
}

fn kind_name(kind: &Kind, package: &str) -> String {
    match kind {
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes".into(),
        Kind::Message(m) => relative(m.full_name(), package),
        Kind::Enum(e) => format!("enum {}", relative(e.full_name(), package)),
    }
}

fn field_type(field: &FieldDescriptor, package: &str) -> String {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            unreachable!("map fields are messages")
        };
        let key = kind_name(&entry.map_entry_key_field().kind(), package);
        let value = kind_name(&entry.map_entry_value_field().kind(), package);
        return format!("map<{key},{value}>");
    }
    let base = kind_name(&field.kind(), package);
    match field.cardinality() {
        Cardinality::Repeated => format!("repeated {base}"),
        _ => base,
    }
}

/// The table as a map from "message x" / "enum x" / "service x" to its sorted items.
fn contract_table() -> BTreeMap<String, Vec<String>> {
    let mut table = BTreeMap::new();
    for line in CONTRACT.lines().filter(|l| !l.trim().is_empty()) {
        let (head, rest) = line.split_once(':').expect("line has a colon");
        let mut items: Vec<String> = Vec::new();
        let mut pending = String::new();
        // Items are space-separated, except that "repeated X" and "enum X" types contain a space.
        for word in rest.split_whitespace() {
            if word.ends_with(":repeated") || word.ends_with(":enum") {
                pending = format!("{word} ");
                continue;
            }
            items.push(format!("{pending}{word}"));
            pending.clear();
        }
        items.sort();
        assert!(
            table.insert(head.to_string(), items).is_none(),
            "duplicate {head}"
        );
    }
    table
}

/// The same map, computed from the compiled descriptors.
fn compiled_table() -> BTreeMap<String, Vec<String>> {
    let pool = iri_api::descriptor_pool();
    let mut table = BTreeMap::new();
    for file in pool.files() {
        let package = file.package_name().to_string();
        for message in file.messages() {
            let mut items: Vec<String> = message
                .fields()
                .map(|f| format!("{}={}:{}", f.name(), f.number(), field_type(&f, &package)))
                .collect();
            items.sort();
            assert_eq!(message.child_messages().filter(|m| !m.is_map_entry()).count(), 0);
            table.insert(format!("message {}", message.full_name()), items);
        }
        for en in file.enums() {
            let mut items: Vec<String> = en
                .values()
                .map(|v| format!("{}={}", v.name(), v.number()))
                .collect();
            items.sort();
            table.insert(format!("enum {}", en.full_name()), items);
        }
        for service in file.services() {
            let mut items: Vec<String> = service
                .methods()
                .map(|m| {
                    assert!(
                        !m.is_client_streaming() && !m.is_server_streaming(),
                        "IRI RPCs are unary"
                    );
                    format!(
                        "{}({})->{}",
                        m.name(),
                        relative(m.input().full_name(), &package),
                        relative(m.output().full_name(), &package)
                    )
                })
                .collect();
            items.sort();
            table.insert(format!("service {}", service.full_name()), items);
        }
    }
    table
}

#[test]
fn descriptors_match_the_contract_field_table() {
    let expected = contract_table();
    let actual = compiled_table();
    let mut problems = Vec::new();
    for (name, items) in &expected {
        match actual.get(name) {
            None => problems.push(format!("missing {name}")),
            Some(got) if got != items => {
                problems.push(format!("{name}:\n  contract: {items:?}\n  compiled: {got:?}"))
            }
            Some(_) => {}
        }
    }
    for name in actual.keys().filter(|n| !expected.contains_key(*n)) {
        problems.push(format!("not in the contract: {name}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn file_names_and_packages_are_upstreams() {
    let pool = iri_api::descriptor_pool();
    let mut files: Vec<(String, String)> = pool
        .files()
        .map(|f| (f.name().to_string(), f.package_name().to_string()))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            ("bucket/v1alpha1/api.proto", "bucket.v1alpha1"),
            ("event/v1alpha1/api.proto", "event.v1alpha1"),
            ("machine/v1alpha1/api.proto", "machine.v1alpha1"),
            ("meta/v1alpha1/api.proto", "meta.v1alpha1"),
            ("volume/v1alpha1/api.proto", "volume.v1alpha1"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    for file in pool.files() {
        let proto = file.file_descriptor_proto();
        assert_eq!(proto.syntax(), "proto3", "{}", file.name());
        let go_package = proto
            .options
            .as_ref()
            .and_then(|o| o.go_package.clone())
            .unwrap_or_default();
        assert_eq!(
            go_package,
            format!(
                "github.com/ironcore-dev/ironcore/iri/apis/{}",
                file.name().trim_end_matches("/api.proto")
            )
        );
    }
    // volume.VolumeSpec field 1 ("image") was removed upstream and must stay reserved.
    let spec = pool.get_message_by_name("volume.v1alpha1.VolumeSpec").unwrap();
    let reserved = &spec.descriptor_proto().reserved_range;
    assert!(reserved.iter().any(|r| r.start() <= 1 && 1 < r.end()));
    assert!(
        spec.descriptor_proto()
            .reserved_name
            .contains(&"image".to_string())
    );
}

#[test]
fn wire_bytes_match_hand_encoded_protobuf() {
    use iri_api::machine::v1alpha1::{DetachVolumeRequest, MachineSpec, Power};
    use prost::Message;
    // field 1 (machine_id) LEN "m", field 2 (name) LEN "v"
    let req = DetachVolumeRequest {
        machine_id: "m".into(),
        name: "v".into(),
    };
    assert_eq!(req.encode_to_vec(), [0x0a, 1, b'm', 0x12, 1, b'v']);
    // power=1 as varint field 1; class "c" as field 2; ignition bytes as field 3
    let spec = MachineSpec {
        power: Power::Off as i32,
        class: "c".into(),
        ignition_data: vec![7],
        ..Default::default()
    };
    assert_eq!(spec.encode_to_vec(), [0x08, 1, 0x12, 1, b'c', 0x1a, 1, 7]);
}
