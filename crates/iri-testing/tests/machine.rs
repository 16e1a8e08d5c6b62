// SPDX-License-Identifier: Apache-2.0
//! The reference MachineRuntime, driven over a real unix socket with the generated client.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{assert_err, assert_fresh_metadata, bad_maps, map, meta};
use iri_api::machine::v1alpha1::{
    AttachNetworkInterfaceRequest, AttachVolumeRequest, CreateMachineRequest, DeleteMachineRequest,
    DetachNetworkInterfaceRequest, DetachVolumeRequest, EventFilter, ExecRequest, GuestConfig, ImageSpec,
    ListEventsRequest, ListMachinesRequest, LocalDisk, Machine, MachineFilter, MachineSpec, MachineState,
    NetworkInterface, NetworkInterfaceState, Power, StatusRequest, UpdateMachineAnnotationsRequest,
    UpdateMachinePowerRequest, UpdateVolumeRequest, VersionRequest, Volume, VolumeConnection, VolumeState,
    machine_runtime_client::MachineRuntimeClient,
};
use iri_testing::{MachineConfig, MachineRuntime};
use prost::Message;
use tonic::{Code, transport::Channel};

type Client = MachineRuntimeClient<Channel>;

fn remote_volume(name: &str, device: &str, handle: &str) -> Volume {
    Volume {
        name: name.into(),
        device: device.into(),
        local_disk: None,
        connection: Some(VolumeConnection {
            driver: "ceph".into(),
            handle: handle.into(),
            attributes: map(&[(
                "rawVolumeLabels",
                r#"{"machinepoollet.ironcore.dev/volume-uid":"u1"}"#,
            )]),
            secret_data: BTreeMap::from([("userKey".into(), vec![0, 1, 2, 255])]),
            encryption_data: BTreeMap::from([("encryptionKey".into(), b"secret".to_vec())]),
            effective_storage_bytes: 10 << 30,
        }),
    }
}

fn local_volume(name: &str, device: &str, image: Option<&str>) -> Volume {
    Volume {
        name: name.into(),
        device: device.into(),
        local_disk: Some(LocalDisk {
            size_bytes: if image.is_some() { 5 << 30 } else { 0 },
            image: image.map(|i| ImageSpec { image: i.into() }),
        }),
        connection: None,
    }
}

fn nic(name: &str, ips: &[&str]) -> NetworkInterface {
    NetworkInterface {
        name: name.into(),
        network_id: "net-1".into(),
        ips: ips.iter().map(|s| s.to_string()).collect(),
        attributes: map(&[("rawNICLabels", "{}"), ("rawNetworkLabels", r#"{"x":"y"}"#)]),
    }
}

fn spec(class: &str) -> MachineSpec {
    MachineSpec {
        power: Power::On as i32,
        class: class.into(),
        ignition_data: b"{\"ignition\":{\"version\":\"3.2.0\"}}".to_vec(),
        volumes: vec![
            remote_volume("root", "vda", "pool/root"),
            local_volume("scratch", "vdb", None),
            local_volume(
                "os",
                "vdc",
                Some("ghcr.io/ironcore-dev/os-images/gardenlinux:1443"),
            ),
        ],
        network_interfaces: vec![nic("primary", &["10.0.0.2", "fd00::2"]), nic("secondary", &[])],
        guest_config: Some(GuestConfig {
            hostname: "host-1".into(),
        }),
    }
}

fn machine(labels: &[(&str, &str)], class: &str) -> Machine {
    Machine {
        metadata: Some(meta(labels)),
        spec: Some(spec(class)),
        status: None,
    }
}

async fn create(client: &mut Client, machine: Machine) -> Machine {
    client
        .create_machine(CreateMachineRequest {
            machine: Some(machine),
        })
        .await
        .unwrap()
        .into_inner()
        .machine
        .unwrap()
}

async fn list(client: &mut Client, filter: Option<MachineFilter>) -> Vec<Machine> {
    client
        .list_machines(ListMachinesRequest { filter })
        .await
        .unwrap()
        .into_inner()
        .machines
}

async fn get(client: &mut Client, id: &str) -> Machine {
    let mut found = list(
        client,
        Some(MachineFilter {
            id: id.into(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(found.len(), 1, "machine {id} listed once");
    found.remove(0)
}

fn id(machine: &Machine) -> String {
    machine.metadata.as_ref().unwrap().id.clone()
}

fn generation(machine: &Machine) -> i64 {
    machine.metadata.as_ref().unwrap().generation
}

fn status(machine: &Machine) -> &iri_api::machine::v1alpha1::MachineStatus {
    machine.status.as_ref().unwrap()
}

#[tokio::test]
async fn version_names_the_reference_runtime() {
    let mut h = common::machine(MachineConfig::default()).await;
    let v = h
        .client
        .version(VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "iri-reference-machine");
    assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn create_assigns_metadata_and_round_trips_everything_else() {
    let mut h = common::machine(MachineConfig::default()).await;
    let sent = machine(&[("machinepoollet.ironcore.dev/machine-uid", "u1")], "x3-small");
    let created = create(&mut h.client, sent.clone()).await;
    assert_fresh_metadata(
        created.metadata.as_ref().unwrap(),
        sent.metadata.as_ref().unwrap(),
    );
    assert_eq!(created.spec, sent.spec);
    let st = status(&created);
    assert_eq!(st.state, MachineState::MachinePending as i32);
    assert_eq!(st.observed_generation, 0);
    assert!(
        st.volumes
            .iter()
            .all(|v| v.state == VolumeState::VolumePending as i32)
    );
    assert_eq!(st.volumes.len(), 3);

    // ready_delay 0: the next read sees the backend's work done.
    let listed = get(&mut h.client, &id(&created)).await;
    assert_eq!(listed.metadata, created.metadata);
    // Byte for byte, including secret/encryption data, device, ips order, and presence of
    // local_disk.image (iri-contract §3.5).
    assert_eq!(
        listed.spec.as_ref().unwrap().encode_to_vec(),
        sent.spec.as_ref().unwrap().encode_to_vec()
    );
    let st = status(&listed);
    assert_eq!(st.state, MachineState::MachineRunning as i32);
    assert_eq!(st.observed_generation, 1);
    let handles: Vec<(&str, &str, i32)> = st
        .volumes
        .iter()
        .map(|v| (v.name.as_str(), v.handle.as_str(), v.state))
        .collect();
    let attached = VolumeState::VolumeAttached as i32;
    assert_eq!(
        handles,
        vec![
            ("root", "pool/root", attached),
            ("scratch", "local-disk/scratch", attached),
            ("os", "local-disk/os", attached)
        ]
    );
    assert_eq!(st.network_interfaces.len(), 2);
    for n in &st.network_interfaces {
        assert_eq!(n.state, NetworkInterfaceState::NetworkInterfaceAttached as i32);
        assert!(!n.handle.is_empty());
    }
    assert_eq!(h.runtime.machines(), vec![listed]);
}

#[tokio::test]
async fn create_rejects_malformed_requests_naming_the_field() {
    let mut h = common::machine(MachineConfig::default()).await;
    let c = &mut h.client;
    let try_create = |m: Option<Machine>| {
        let mut c = c.clone();
        async move { c.create_machine(CreateMachineRequest { machine: m }).await }
    };
    assert_err(
        try_create(None).await,
        Code::InvalidArgument,
        &["invalid machine: must be set"],
    );
    let no_spec = Machine {
        spec: None,
        ..machine(&[], "x3-small")
    };
    assert_err(
        try_create(Some(no_spec)).await,
        Code::InvalidArgument,
        &["invalid machine.spec: must be set"],
    );
    let no_meta = Machine {
        metadata: None,
        ..machine(&[], "x3-small")
    };
    assert_err(
        try_create(Some(no_meta)).await,
        Code::InvalidArgument,
        &["machine.metadata"],
    );
    // Nothing at all set must not crash the server either.
    assert_err(
        try_create(Some(Machine::default())).await,
        Code::InvalidArgument,
        &["machine.spec"],
    );

    let with = |f: &dyn Fn(&mut MachineSpec)| {
        let mut m = machine(&[], "x3-small");
        f(m.spec.as_mut().unwrap());
        Some(m)
    };
    let cases: Vec<(Option<Machine>, &[&str])> = vec![
        (with(&|s| s.class.clear()), &["machine.spec.class", "must be set"]),
        (
            with(&|s| s.class = "x9-huge".into()),
            &["machine.spec.class", "x9-huge", "x3-small"],
        ),
        (with(&|s| s.power = 7), &["machine.spec.power"]),
        (
            with(&|s| s.volumes[1].name.clear()),
            &["machine.spec.volumes[1].name"],
        ),
        (
            with(&|s| s.volumes[1].name = "root".into()),
            &["machine.spec.volumes[1].name", "duplicate"],
        ),
        (
            with(&|s| s.volumes[1].device = "vda".into()),
            &["machine.spec.volumes[1].device", "duplicate"],
        ),
        (
            with(&|s| s.volumes[0].local_disk = Some(LocalDisk::default())),
            &[
                "machine.spec.volumes[0]",
                "exactly one of local_disk and connection",
            ],
        ),
        (
            with(&|s| s.volumes[1].local_disk = None),
            &[
                "machine.spec.volumes[1]",
                "exactly one of local_disk and connection",
            ],
        ),
        (
            with(&|s| s.volumes[0].connection.as_mut().unwrap().driver.clear()),
            &["machine.spec.volumes[0].connection.driver"],
        ),
        (
            with(&|s| s.volumes[0].connection.as_mut().unwrap().handle.clear()),
            &["machine.spec.volumes[0].connection.handle"],
        ),
        (
            with(&|s| s.volumes[1].local_disk.as_mut().unwrap().size_bytes = -1),
            &["machine.spec.volumes[1].local_disk.size_bytes"],
        ),
        (
            with(&|s| s.volumes[2].local_disk.as_mut().unwrap().image = Some(ImageSpec::default())),
            &["machine.spec.volumes[2].local_disk.image.image"],
        ),
        (
            with(&|s| s.network_interfaces[1].name.clear()),
            &["machine.spec.network_interfaces[1].name"],
        ),
        (
            with(&|s| s.network_interfaces[1].name = "primary".into()),
            &["machine.spec.network_interfaces[1].name", "duplicate"],
        ),
        (
            with(&|s| s.network_interfaces[0].ips[1] = "10.0.0.300".into()),
            &["machine.spec.network_interfaces[0].ips[1]", "10.0.0.300"],
        ),
        (
            with(&|s| s.network_interfaces[0].network_id.clear()),
            &["machine.spec.network_interfaces[0].network_id"],
        ),
    ];
    for (m, parts) in cases {
        assert_err(try_create(m).await, Code::InvalidArgument, parts);
    }
    for (bad, words) in bad_maps() {
        let mut m = machine(&[], "x3-small");
        m.metadata.as_mut().unwrap().labels = bad.clone();
        assert_err(
            try_create(Some(m)).await,
            Code::InvalidArgument,
            &["machine.metadata.labels", words],
        );
        let mut m = machine(&[], "x3-small");
        m.metadata.as_mut().unwrap().annotations = bad;
        assert_err(
            try_create(Some(m)).await,
            Code::InvalidArgument,
            &["machine.metadata.annotations", words],
        );
    }
    assert!(h.runtime.machines().is_empty(), "nothing was created");
}

#[tokio::test]
async fn list_filters_by_id_and_labels_in_creation_order() {
    let mut h = common::machine(MachineConfig::default()).await;
    let a = create(
        &mut h.client,
        machine(&[("app", "web"), ("tier", "1")], "x3-small"),
    )
    .await;
    let b = create(
        &mut h.client,
        machine(&[("app", "web"), ("tier", "2")], "x3-small"),
    )
    .await;
    let c = create(
        &mut h.client,
        machine(&[("app", "db"), ("empty", "")], "x3-large"),
    )
    .await;
    let ids = |ms: Vec<Machine>| ms.iter().map(id).collect::<Vec<_>>();

    assert_eq!(ids(list(&mut h.client, None).await), vec![id(&a), id(&b), id(&c)]);
    assert_eq!(
        ids(list(&mut h.client, Some(MachineFilter::default())).await),
        vec![id(&a), id(&b), id(&c)]
    );
    let by = |id: &str, labels: &[(&str, &str)]| {
        Some(MachineFilter {
            id: id.into(),
            label_selector: map(labels),
        })
    };
    assert_eq!(ids(list(&mut h.client, by(&id(&b), &[])).await), vec![id(&b)]);
    assert_eq!(
        ids(list(&mut h.client, by("", &[("app", "web")])).await),
        vec![id(&a), id(&b)]
    );
    assert_eq!(
        ids(list(&mut h.client, by("", &[("app", "web"), ("tier", "2")])).await),
        vec![id(&b)]
    );
    assert_eq!(
        ids(list(&mut h.client, by("", &[("empty", "")])).await),
        vec![id(&c)]
    );
    assert!(ids(list(&mut h.client, by("", &[("tier", "")])).await).is_empty());
    // Unknown id: OK and empty, never NOT_FOUND.
    assert!(list(&mut h.client, by("does-not-exist", &[])).await.is_empty());
    // id and selector both apply.
    assert!(
        list(&mut h.client, by(&id(&a), &[("app", "db")]))
            .await
            .is_empty()
    );
    assert_eq!(
        ids(list(&mut h.client, by(&id(&a), &[("app", "web")])).await),
        vec![id(&a)]
    );
}

#[tokio::test]
async fn delete_is_not_found_for_unknown_and_second_delete() {
    let mut h = common::machine(MachineConfig::default()).await;
    let m = create(&mut h.client, machine(&[("k", "v")], "x3-small")).await;
    let cl = h.client.clone();
    let delete = |id: String| {
        let mut c = cl.clone();
        async move { c.delete_machine(DeleteMachineRequest { machine_id: id }).await }
    };
    assert_err(delete("nope".into()).await, Code::NotFound, &["machine", "nope"]);
    assert_err(delete(String::new()).await, Code::NotFound, &["machine"]);
    delete(id(&m)).await.unwrap();
    assert!(list(&mut h.client, None).await.is_empty());
    assert_err(delete(id(&m)).await, Code::NotFound, &[&id(&m)]);
}

#[tokio::test]
async fn power_changes_bump_generation_and_state_follows() {
    let mut h = common::machine(MachineConfig::default()).await;
    let m = create(&mut h.client, machine(&[], "x3-small")).await;
    let mid = id(&m);
    let cl = h.client.clone();
    let power = |p: i32, machine_id: &str| {
        let mut c = cl.clone();
        let machine_id = machine_id.to_string();
        async move {
            c.update_machine_power(UpdateMachinePowerRequest { machine_id, power: p })
                .await
        }
    };
    power(Power::Off as i32, &mid).await.unwrap();
    let got = get(&mut h.client, &mid).await;
    assert_eq!(generation(&got), 2);
    assert_eq!(got.spec.as_ref().unwrap().power, Power::Off as i32);
    assert_eq!(status(&got).state, MachineState::MachineStopped as i32);
    assert_eq!(status(&got).observed_generation, 2);

    // Same power again: no spec change, no new generation.
    power(Power::Off as i32, &mid).await.unwrap();
    assert_eq!(generation(&get(&mut h.client, &mid).await), 2);

    power(Power::On as i32, &mid).await.unwrap();
    let got = get(&mut h.client, &mid).await;
    assert_eq!(generation(&got), 3);
    assert_eq!(status(&got).state, MachineState::MachineRunning as i32);
    assert_eq!(status(&got).observed_generation, 3);

    assert_err(power(Power::Off as i32, "nope").await, Code::NotFound, &["nope"]);
    assert_err(power(9, &mid).await, Code::InvalidArgument, &["invalid power"]);
}

#[tokio::test]
async fn off_state_is_configurable_for_upstream_poollets() {
    let mut h = common::machine(MachineConfig {
        off_state: MachineState::MachineSuspended,
        ..Default::default()
    })
    .await;
    let m = create(&mut h.client, machine(&[], "x3-small")).await;
    h.client
        .update_machine_power(UpdateMachinePowerRequest {
            machine_id: id(&m),
            power: Power::Off as i32,
        })
        .await
        .unwrap();
    assert_eq!(
        status(&get(&mut h.client, &id(&m)).await).state,
        MachineState::MachineSuspended as i32
    );
}

#[tokio::test]
async fn ready_delay_keeps_machines_pending_and_generation_unobserved() {
    let mut h = common::machine(MachineConfig {
        ready_delay: Duration::from_millis(1000),
        ..Default::default()
    })
    .await;
    let m = create(&mut h.client, machine(&[], "x3-small")).await;
    let got = get(&mut h.client, &id(&m)).await;
    assert_eq!(status(&got).state, MachineState::MachinePending as i32);
    assert_eq!(status(&got).observed_generation, 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let got = get(&mut h.client, &id(&m)).await;
    assert_eq!(status(&got).state, MachineState::MachineRunning as i32);
    assert_eq!(status(&got).observed_generation, 1);

    h.client
        .update_machine_power(UpdateMachinePowerRequest {
            machine_id: id(&m),
            power: Power::Off as i32,
        })
        .await
        .unwrap();
    let got = get(&mut h.client, &id(&m)).await;
    assert_eq!(generation(&got), 2);
    assert_eq!(status(&got).observed_generation, 1, "not yet acted on");
    assert_eq!(status(&got).state, MachineState::MachineRunning as i32);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let got = get(&mut h.client, &id(&m)).await;
    assert_eq!(status(&got).observed_generation, 2);
    assert_eq!(status(&got).state, MachineState::MachineStopped as i32);
}

#[tokio::test]
async fn annotations_are_replaced_without_a_generation_bump() {
    let mut h = common::machine(MachineConfig::default()).await;
    let m = create(&mut h.client, machine(&[], "x3-small")).await;
    let cl = h.client.clone();
    let update = |machine_id: &str, annotations: BTreeMap<String, String>| {
        let mut c = cl.clone();
        let machine_id = machine_id.to_string();
        async move {
            c.update_machine_annotations(UpdateMachineAnnotationsRequest {
                machine_id,
                annotations,
            })
            .await
        }
    };
    let new = map(&[("machinepoollet.ironcore.dev/irimachine-generation", "1")]);
    update(&id(&m), new.clone()).await.unwrap();
    let got = get(&mut h.client, &id(&m)).await;
    assert_eq!(
        got.metadata.as_ref().unwrap().annotations,
        new,
        "replaced, not merged"
    );
    assert_eq!(generation(&got), 1);

    assert_err(update("nope", new).await, Code::NotFound, &["nope"]);
    for (bad, words) in bad_maps() {
        assert_err(
            update(&id(&m), bad).await,
            Code::InvalidArgument,
            &["annotations", words],
        );
    }
}

#[tokio::test]
async fn volumes_attach_update_and_detach() {
    let mut h = common::machine(MachineConfig::default()).await;
    let m = create(&mut h.client, machine(&[], "x3-small")).await;
    let mid = id(&m);
    let cl = h.client.clone();
    let attach = |machine_id: &str, volume: Option<Volume>| {
        let mut c = cl.clone();
        let machine_id = machine_id.to_string();
        async move { c.attach_volume(AttachVolumeRequest { machine_id, volume }).await }
    };
    let update = |machine_id: &str, volume: Option<Volume>| {
        let mut c = cl.clone();
        let machine_id = machine_id.to_string();
        async move { c.update_volume(UpdateVolumeRequest { machine_id, volume }).await }
    };
    let detach = |machine_id: &str, name: &str| {
        let mut c = cl.clone();
        let (machine_id, name) = (machine_id.to_string(), name.to_string());
        async move { c.detach_volume(DetachVolumeRequest { machine_id, name }).await }
    };

    let data = remote_volume("data", "vdd", "pool/data");
    assert_err(
        attach("nope", Some(data.clone())).await,
        Code::NotFound,
        &["machine", "nope"],
    );
    assert_err(
        attach(&mid, None).await,
        Code::InvalidArgument,
        &["invalid volume: must be set"],
    );
    assert_err(
        attach(&mid, Some(remote_volume("root", "vdz", "x"))).await,
        Code::AlreadyExists,
        &["root"],
    );
    assert_err(
        attach(&mid, Some(remote_volume("", "vdz", "x"))).await,
        Code::InvalidArgument,
        &["volume.name"],
    );
    assert_err(
        attach(&mid, Some(remote_volume("other", "vda", "x"))).await,
        Code::InvalidArgument,
        &["volume.device", "vda"],
    );
    let mut neither = data.clone();
    neither.connection = None;
    assert_err(
        attach(&mid, Some(neither)).await,
        Code::InvalidArgument,
        &["volume", "exactly one"],
    );

    attach(&mid, Some(data.clone())).await.unwrap();
    let got = get(&mut h.client, &mid).await;
    assert_eq!(generation(&got), 2);
    assert_eq!(status(&got).observed_generation, 2);
    assert_eq!(
        got.spec.as_ref().unwrap().volumes.last(),
        Some(&data),
        "appended verbatim"
    );
    let vs = status(&got).volumes.iter().find(|v| v.name == "data").unwrap();
    assert_eq!(
        (vs.handle.as_str(), vs.state),
        ("pool/data", VolumeState::VolumeAttached as i32)
    );

    // Update: online resize, replaces the whole entry.
    let mut bigger = data.clone();
    bigger.connection.as_mut().unwrap().effective_storage_bytes = 20 << 30;
    bigger.connection.as_mut().unwrap().handle = "pool/data-2".into();
    assert_err(
        update("nope", Some(bigger.clone())).await,
        Code::NotFound,
        &["nope"],
    );
    assert_err(
        update(&mid, Some(remote_volume("ghost", "", "x"))).await,
        Code::NotFound,
        &["volume attachment", "ghost"],
    );
    assert_err(
        update(&mid, None).await,
        Code::InvalidArgument,
        &["invalid volume: must be set"],
    );
    let mut clash = bigger.clone();
    clash.device = "vda".into();
    assert_err(
        update(&mid, Some(clash)).await,
        Code::InvalidArgument,
        &["volume.device"],
    );
    update(&mid, Some(bigger.clone())).await.unwrap();
    let got = get(&mut h.client, &mid).await;
    assert_eq!(generation(&got), 3);
    assert_eq!(got.spec.as_ref().unwrap().volumes.last(), Some(&bigger));
    assert_eq!(status(&got).volumes.last().unwrap().handle, "pool/data-2");
    // The same entry again changes nothing.
    update(&mid, Some(bigger.clone())).await.unwrap();
    assert_eq!(generation(&get(&mut h.client, &mid).await), 3);

    assert_err(detach("nope", "data").await, Code::NotFound, &["nope"]);
    assert_err(detach(&mid, "ghost").await, Code::NotFound, &["ghost"]);
    detach(&mid, "data").await.unwrap();
    let got = get(&mut h.client, &mid).await;
    assert_eq!(generation(&got), 4);
    assert!(
        got.spec
            .as_ref()
            .unwrap()
            .volumes
            .iter()
            .all(|v| v.name != "data")
    );
    assert!(status(&got).volumes.iter().all(|v| v.name != "data"));
    assert_eq!(got.spec.as_ref().unwrap().volumes, spec("x3-small").volumes);
    assert_err(detach(&mid, "data").await, Code::NotFound, &["data"]);
}

#[tokio::test]
async fn network_interfaces_attach_and_detach() {
    let mut h = common::machine(MachineConfig::default()).await;
    let m = create(&mut h.client, machine(&[], "x3-small")).await;
    let mid = id(&m);
    let cl = h.client.clone();
    let attach = |machine_id: &str, network_interface: Option<NetworkInterface>| {
        let mut c = cl.clone();
        let machine_id = machine_id.to_string();
        async move {
            c.attach_network_interface(AttachNetworkInterfaceRequest {
                machine_id,
                network_interface,
            })
            .await
        }
    };
    let detach = |machine_id: &str, name: &str| {
        let mut c = cl.clone();
        let (machine_id, name) = (machine_id.to_string(), name.to_string());
        async move {
            c.detach_network_interface(DetachNetworkInterfaceRequest { machine_id, name })
                .await
        }
    };
    let third = nic("third", &["192.168.1.10"]);
    assert_err(
        attach("nope", Some(third.clone())).await,
        Code::NotFound,
        &["nope"],
    );
    assert_err(
        attach(&mid, None).await,
        Code::InvalidArgument,
        &["invalid network_interface: must be set"],
    );
    assert_err(
        attach(&mid, Some(nic("primary", &[]))).await,
        Code::AlreadyExists,
        &["primary"],
    );
    assert_err(
        attach(&mid, Some(nic("bad", &["not-an-ip"]))).await,
        Code::InvalidArgument,
        &["network_interface.ips[0]", "not-an-ip"],
    );
    assert_err(
        attach(&mid, Some(nic("", &[]))).await,
        Code::InvalidArgument,
        &["network_interface.name"],
    );

    attach(&mid, Some(third.clone())).await.unwrap();
    let got = get(&mut h.client, &mid).await;
    assert_eq!(generation(&got), 2);
    assert_eq!(got.spec.as_ref().unwrap().network_interfaces.last(), Some(&third));
    let ns = status(&got)
        .network_interfaces
        .iter()
        .find(|n| n.name == "third")
        .unwrap();
    assert_eq!(ns.state, NetworkInterfaceState::NetworkInterfaceAttached as i32);
    assert!(ns.handle.contains("third"));

    assert_err(detach("nope", "third").await, Code::NotFound, &["nope"]);
    assert_err(
        detach(&mid, "ghost").await,
        Code::NotFound,
        &["network interface", "ghost"],
    );
    detach(&mid, "third").await.unwrap();
    let got = get(&mut h.client, &mid).await;
    assert_eq!(generation(&got), 3);
    assert_eq!(
        got.spec.as_ref().unwrap().network_interfaces,
        spec("x3-small").network_interfaces
    );
    assert!(status(&got).network_interfaces.iter().all(|n| n.name != "third"));
}

#[tokio::test]
async fn status_reports_capabilities_and_remaining_capacity() {
    let mut h = common::machine(MachineConfig::default()).await;
    let quantities = |c: Client| async move {
        let mut c = c;
        let st = c.status(StatusRequest {}).await.unwrap().into_inner();
        st.machine_class_status
            .into_iter()
            .map(|s| {
                let class = s.machine_class.expect("class set");
                let caps = class.capabilities.expect("capabilities always set");
                (class.name, caps.resources, s.quantity)
            })
            .collect::<Vec<_>>()
    };
    let gi = 1i64 << 30;
    let initial = quantities(h.client.clone()).await;
    assert_eq!(
        initial,
        vec![
            (
                "x3-small".into(),
                BTreeMap::from([("cpu".into(), 2), ("memory".into(), 4 * gi)]),
                10
            ),
            (
                "x3-large".into(),
                BTreeMap::from([("cpu".into(), 8), ("memory".into(), 16 * gi)]),
                2
            ),
        ]
    );
    let m = create(&mut h.client, machine(&[], "x3-small")).await;
    let after_create = quantities(h.client.clone()).await;
    assert_eq!((after_create[0].2, after_create[1].2), (9, 2));
    h.client
        .delete_machine(DeleteMachineRequest { machine_id: id(&m) })
        .await
        .unwrap();
    assert_eq!(quantities(h.client.clone()).await, initial);

    // Full classes refuse further machines.
    create(&mut h.client, machine(&[], "x3-large")).await;
    create(&mut h.client, machine(&[], "x3-large")).await;
    assert_eq!(quantities(h.client.clone()).await[1].2, 0);
    assert_err(
        h.client
            .create_machine(CreateMachineRequest {
                machine: Some(machine(&[], "x3-large")),
            })
            .await,
        Code::ResourceExhausted,
        &["x3-large"],
    );
}

#[tokio::test]
async fn exec_hands_out_bounded_single_use_tokens() {
    let mut h = common::machine(MachineConfig {
        exec_base_url: "http://exec.example:1234/".into(),
        max_exec_sessions: 3,
        exec_token_ttl: Duration::from_millis(1000),
        ..Default::default()
    })
    .await;
    let m = create(&mut h.client, machine(&[], "x3-small")).await;
    let cl = h.client.clone();
    let exec = |machine_id: &str| {
        let mut c = cl.clone();
        let machine_id = machine_id.to_string();
        async move {
            c.exec(ExecRequest { machine_id })
                .await
                .map(|r| r.into_inner().url)
        }
    };
    assert_err(exec("nope").await, Code::NotFound, &["nope"]);
    let mut urls = Vec::new();
    for _ in 0..3 {
        let url = exec(&id(&m)).await.unwrap();
        let token = url
            .strip_prefix("http://exec.example:1234/exec/")
            .expect("url shape");
        assert_eq!(token.len(), 8);
        urls.push(url);
    }
    assert_ne!(urls[0], urls[1]);
    assert_err(exec(&id(&m)).await, Code::ResourceExhausted, &["exec sessions"]);

    // Redeeming a token frees its slot; tokens are single use.
    assert_eq!(h.runtime.take_exec_session(&urls[0]), Some(id(&m)));
    assert_eq!(h.runtime.take_exec_session(&urls[0]), None);
    let url = exec(&id(&m)).await.unwrap();
    assert_err(exec(&id(&m)).await, Code::ResourceExhausted, &[]);

    // Tokens expire.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(h.runtime.take_exec_session(&url), None);
    exec(&id(&m)).await.unwrap();
}

#[tokio::test]
async fn events_record_changes_and_filter() {
    let mut h = common::machine(MachineConfig::default()).await;
    let a = create(&mut h.client, machine(&[("app", "a")], "x3-small")).await;
    let b = create(&mut h.client, machine(&[("app", "b")], "x3-small")).await;
    h.client
        .update_machine_power(UpdateMachinePowerRequest {
            machine_id: id(&a),
            power: Power::Off as i32,
        })
        .await
        .unwrap();
    h.client
        .delete_machine(DeleteMachineRequest { machine_id: id(&b) })
        .await
        .unwrap();
    let cl = h.client.clone();
    let events = |filter: Option<EventFilter>| {
        let mut c = cl.clone();
        async move {
            c.list_events(ListEventsRequest { filter })
                .await
                .unwrap()
                .into_inner()
                .events
        }
    };
    let all = events(None).await;
    let now = iri_runtime::id::now_secs();
    for e in &all {
        let spec = e.spec.as_ref().unwrap();
        assert_eq!(spec.r#type, "Normal");
        assert!(!spec.reason.is_empty() && !spec.action.is_empty() && !spec.message.is_empty());
        assert!(
            (now - 60..=now).contains(&spec.event_time),
            "event_time in seconds"
        );
        assert!(spec.involved_object_meta.is_some());
    }
    let reasons = |es: &[iri_api::event::v1alpha1::Event]| {
        es.iter()
            .map(|e| e.spec.as_ref().unwrap().reason.clone())
            .collect::<Vec<_>>()
    };

    let for_a = events(Some(EventFilter {
        label_selector: map(&[("app", "a")]),
        ..Default::default()
    }))
    .await;
    assert_eq!(
        reasons(&for_a),
        vec!["Created", "StateChanged", "PowerChanged", "StateChanged"]
    );
    // The metadata is the object's at the time of the event.
    let meta_of = |e: &iri_api::event::v1alpha1::Event| e.spec.clone().unwrap().involved_object_meta.unwrap();
    assert_eq!(meta_of(&for_a[0]).generation, 1);
    assert_eq!(meta_of(&for_a[2]).generation, 2);
    assert_eq!(meta_of(&for_a[0]).labels, map(&[("app", "a")]));

    let for_b = events(Some(EventFilter {
        id: id(&b),
        ..Default::default()
    }))
    .await;
    assert_eq!(reasons(&for_b), vec!["Created", "StateChanged", "Deleted"]);
    assert!(meta_of(&for_b[2]).deleted_at > 0);

    // The window applies only when both bounds are set.
    let window = |from, to| {
        events(Some(EventFilter {
            events_from_time: from,
            events_to_time: to,
            ..Default::default()
        }))
    };
    assert_eq!(window(now - 60, now + 1).await.len(), all.len());
    assert!(window(now - 600, now - 300).await.is_empty());
    assert_eq!(window(now + 300, 0).await.len(), all.len());
    assert_eq!(window(0, now - 300).await.len(), all.len());
}

#[tokio::test]
async fn event_log_is_bounded() {
    let mut h = common::machine(MachineConfig {
        max_events: 3,
        ..Default::default()
    })
    .await;
    for _ in 0..4 {
        create(&mut h.client, machine(&[], "x3-small")).await;
    }
    let events = h
        .client
        .list_events(ListEventsRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 3);
    assert_eq!(h.runtime.events(), events);
}

#[tokio::test]
async fn accepts_messages_above_grpc_go_default_size() {
    let mut h = common::machine(MachineConfig::default()).await;
    let mut m = machine(&[], "x3-small");
    m.spec.as_mut().unwrap().ignition_data = vec![b'x'; 6 << 20];
    let created = create(&mut h.client, m).await;
    assert_eq!(created.spec.unwrap().ignition_data.len(), 6 << 20);
}

#[tokio::test]
async fn runtime_is_usable_without_a_socket() {
    use iri_api::machine::v1alpha1::machine_runtime_server::MachineRuntime as _;
    let runtime = MachineRuntime::default();
    let created = runtime
        .create_machine(tonic::Request::new(CreateMachineRequest {
            machine: Some(machine(&[], "x3-small")),
        }))
        .await
        .unwrap()
        .into_inner()
        .machine
        .unwrap();
    assert_eq!(runtime.machines().len(), 1);
    assert_eq!(id(&runtime.machines()[0]), id(&created));
}
