// SPDX-License-Identifier: Apache-2.0
//! A volume of the real volume provider on a running machine, the way the poollets move it:
//! created and exported by `volume_provider::run`, hot-plugged with AttachVolume (its size seen
//! in the guest), expanded with ExpandVolume then grown online with UpdateVolume (the new size
//! seen in the guest without a reboot), and detached.
//!
//! The machine provider runs on a data directory far deeper than a unix socket path could
//! name (the machines' sockets are bound relative to their directory).
//!
//! Needs qemu-system-x86 and qemu-utils; TCG is enough.

mod common;

use std::time::{Duration, Instant};

use common::{
    Provider, boot_volume, exec, get, report_until, state, test_guest, tiny_config, volume_state, wait_for,
};
use iri_api::{
    Endpoint,
    machine::v1alpha1::{
        AttachVolumeRequest, CreateMachineRequest, DeleteMachineRequest, DetachVolumeRequest,
        ListEventsRequest, Machine, MachineSpec, MachineState, Power, UpdateVolumeRequest, Volume,
        VolumeConnection,
    },
    meta::v1alpha1::ObjectMetadata,
    volume::v1alpha1::{
        self as volume_api, CreateVolumeRequest, ExpandVolumeRequest, ListVolumesRequest, VolumeFilter,
        VolumeResources, VolumeSpec, VolumeState,
    },
};
use iri_runtime::cli::ProviderConfig;
use tonic::Code;

const MIB: i64 = 1 << 20;
const RUNNING: i32 = MachineState::MachineRunning as i32;
/// A TCG boot of the test guest takes ~10 s on an idle 2-core machine; CI machines are busy.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn machine_config(guest_root: &std::path::Path, nbd_dir: &std::path::Path) -> String {
    tiny_config(
        &format!(
            "image_dirs = [{:?}]\nnbd_socket_dirs = [{:?}]",
            guest_root.display().to_string(),
            nbd_dir.display().to_string()
        ),
        2,
    )
}

/// Volume `id` of the volume provider, once it satisfies `done`.
async fn volume_until(
    client: &mut volume_api::volume_runtime_client::VolumeRuntimeClient<tonic::transport::Channel>,
    id: &str,
    what: &str,
    done: impl Fn(&volume_api::Volume) -> bool,
) -> volume_api::Volume {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let volumes = client
            .list_volumes(ListVolumesRequest {
                filter: Some(VolumeFilter {
                    id: id.to_string(),
                    label_selector: Default::default(),
                }),
            })
            .await
            .expect("ListVolumes")
            .into_inner()
            .volumes;
        if let Some(volume) = volumes.into_iter().next()
            && done(&volume)
        {
            return volume;
        }
        assert!(Instant::now() < deadline, "volume {id} never became {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_provider_volume_is_plugged_grown_online_and_detached() {
    let guest = test_guest();
    let dir = tempfile::tempdir().expect("tempdir");

    // The volume provider, in this process.
    let volume_dir = dir.path().join("volume");
    let mut volume_config = <volume_provider::config::Config as ProviderConfig>::defaults();
    volume_config.server.data_dir = volume_dir.clone();
    volume_config.server.address = dir.path().join("volume.sock").display().to_string();
    volume_config.reserve_bytes = 0;
    let (stop_volumes, stopped) = tokio::sync::oneshot::channel::<()>();
    let volumes = tokio::spawn(volume_provider::run(volume_config, async move {
        let _ = stopped.await;
    }));
    let mut volume_client = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let endpoint = Endpoint::Unix(dir.path().join("volume.sock"));
            if let Ok(channel) = endpoint.connect(Duration::from_secs(2)).await {
                break iri_api::endpoint::clients::volume(channel);
            }
            assert!(Instant::now() < deadline, "the volume provider does not serve");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let created = volume_client
        .create_volume(CreateVolumeRequest {
            volume: Some(volume_api::Volume {
                metadata: Some(ObjectMetadata::default()),
                spec: Some(VolumeSpec {
                    class: "fast".into(),
                    resources: Some(VolumeResources {
                        storage_bytes: 32 * MIB,
                    }),
                    ..Default::default()
                }),
                status: None,
            }),
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap();
    let volume_id = created.metadata.unwrap().id;
    let available = volume_until(&mut volume_client, &volume_id, "AVAILABLE", |v| {
        v.status
            .as_ref()
            .is_some_and(|s| s.state == VolumeState::VolumeAvailable as i32)
    })
    .await;
    let access = available.status.unwrap().access.expect("access");

    // The machine provider, on a data directory deeper than any socket path may be.
    let deep = dir.path().join("d".repeat(100)).join("data");
    let nbd_dir = volume_dir.join("local/daemon");
    let provider = Provider::start_on(
        dir.path(),
        deep,
        &machine_config(guest.parent().unwrap(), &nbd_dir),
    )
    .await;
    assert!(
        provider
            .machine_dir(&"0".repeat(63))
            .join("console.sock")
            .as_os_str()
            .len()
            > 107,
        "the test must exercise socket paths longer than a socket address holds"
    );
    let mut client = provider.client().await;
    let machine = client
        .create_machine(CreateMachineRequest {
            machine: Some(Machine {
                metadata: Some(ObjectMetadata::default()),
                spec: Some(MachineSpec {
                    power: Power::On as i32,
                    class: "tiny".into(),
                    volumes: vec![boot_volume(format!("file://{}", guest.display()), 0)],
                    ..Default::default()
                }),
                status: None,
            }),
        })
        .await
        .expect("CreateMachine")
        .into_inner()
        .machine
        .unwrap();
    let id = machine.metadata.unwrap().id;
    wait_for(&mut client, &id, BOOT_TIMEOUT, "RUNNING", |m| {
        m.is_some_and(|m| state(m) == RUNNING)
    })
    .await;
    let (_, mut session) = exec(&mut client, &id).await;
    let from = session.read_until("IRI-TEST-GUEST READY", 0, BOOT_TIMEOUT).await;

    // Hot-plug the volume as the machinepoollet does: the access becomes the connection.
    let attached = |bytes: i64| Volume {
        name: "data".into(),
        device: "odb".into(),
        local_disk: None,
        connection: Some(VolumeConnection {
            driver: access.driver.clone(),
            handle: access.handle.clone(),
            attributes: access.attributes.clone(),
            secret_data: access.secret_data.clone(),
            effective_storage_bytes: bytes,
            ..Default::default()
        }),
    };
    client
        .attach_volume(AttachVolumeRequest {
            machine_id: id.clone(),
            volume: Some(attached(32 * MIB)),
        })
        .await
        .expect("AttachVolume");
    wait_for(&mut client, &id, Duration::from_secs(60), "data ATTACHED", |m| {
        volume_state(m, "data") == Some(1)
    })
    .await;
    let serial = &access.handle;
    let from = report_until(&mut session, from, |report| {
        report.contains(&format!("IRI-REPORT disk vda {} {serial}", 32 * MIB))
    })
    .await;

    // Shrinking, or changing anything but the size, is refused, naming the field.
    let status = client
        .update_volume(UpdateVolumeRequest {
            machine_id: id.clone(),
            volume: Some(attached(16 * MIB)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("effective_storage_bytes"), "{status:?}");
    let mut moved = attached(64 * MIB);
    moved.connection.as_mut().unwrap().handle = "elsewhere".into();
    let status = client
        .update_volume(UpdateVolumeRequest {
            machine_id: id.clone(),
            volume: Some(moved),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("handle"), "{status:?}");

    // Expanded by the volume provider, then grown on the machine: the guest sees it.
    volume_client
        .expand_volume(ExpandVolumeRequest {
            volume_id: volume_id.clone(),
            resources: Some(VolumeResources {
                storage_bytes: 64 * MIB,
            }),
        })
        .await
        .expect("ExpandVolume");
    volume_until(&mut volume_client, &volume_id, "64 MiB", |v| {
        v.status
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .is_some_and(|r| r.storage_bytes == 64 * MIB)
    })
    .await;
    let grown_at = Instant::now();
    client
        .update_volume(UpdateVolumeRequest {
            machine_id: id.clone(),
            volume: Some(attached(64 * MIB)),
        })
        .await
        .expect("UpdateVolume");
    let from = report_until(&mut session, from, |report| {
        report.contains(&format!("IRI-REPORT disk vda {} {serial}", 64 * MIB))
    })
    .await;
    println!(
        "UpdateVolume → new size seen in the guest {:?}",
        grown_at.elapsed()
    );
    let listed = get(&mut client, &id).await.expect("listed");
    let spec_volume = &listed.spec.as_ref().unwrap().volumes[1];
    assert_eq!(
        spec_volume.connection.as_ref().unwrap().effective_storage_bytes,
        64 * MIB,
        "the spec round-trips the update"
    );
    let events = client
        .list_events(ListEventsRequest { filter: None })
        .await
        .expect("ListEvents")
        .into_inner()
        .events;
    assert!(
        events
            .iter()
            .filter_map(|e| e.spec.as_ref())
            .any(|s| s.reason == "VolumeResized"),
        "no VolumeResized event"
    );

    // Detached: gone from status and from the guest.
    client
        .detach_volume(DetachVolumeRequest {
            machine_id: id.clone(),
            name: "data".into(),
        })
        .await
        .expect("DetachVolume");
    wait_for(&mut client, &id, Duration::from_secs(60), "data gone", |m| {
        m.is_some() && volume_state(m, "data").is_none()
    })
    .await;
    report_until(&mut session, from, |report| !report.contains(serial.as_str())).await;
    session.close().await;

    client
        .delete_machine(DeleteMachineRequest {
            machine_id: id.clone(),
        })
        .await
        .expect("DeleteMachine");
    wait_for(&mut client, &id, Duration::from_secs(60), "gone", |m| m.is_none()).await;
    assert!(
        !provider.machine_dir(&id).exists(),
        "the machine directory is left"
    );
    drop(provider);
    let _ = stop_volumes.send(());
    volumes
        .await
        .expect("volume provider task")
        .expect("volume provider");
}
