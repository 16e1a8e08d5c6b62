// SPDX-License-Identifier: Apache-2.0
//! The `bridge` network plugin with a real Linux bridge: a NIC whose `network_id` names a
//! configured bridge gets a tap device on it (seen by the guest with its MAC), a hot-plugged one
//! too, and unplugging or deleting the machine leaves no tap behind.
//!
//! Needs root (creating a bridge and taps), iproute2, qemu-system-x86; skipped otherwise.

mod common;

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{Provider, boot_volume, exec, report_until, state, test_guest, tiny_config, wait_for};
use iri_api::{
    machine::v1alpha1::{
        AttachNetworkInterfaceRequest, CreateMachineRequest, DeleteMachineRequest,
        DetachNetworkInterfaceRequest, Machine, MachineSpec, MachineState, NetworkInterface, Power,
    },
    meta::v1alpha1::ObjectMetadata,
};
use machine_provider::{network::tap_name, qemu::mac_address};

const RUNNING: i32 = MachineState::MachineRunning as i32;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A Linux bridge, removed when dropped.
struct Bridge(String);

impl Bridge {
    fn create() -> Option<Bridge> {
        let name = format!("iribr{:06x}", std::process::id() & 0xff_ffff);
        let ok = Command::new("ip")
            .args(["link", "add", "name", &name, "type", "bridge"])
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Bridge(name))
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// The bridge tap `tap` is on, if it exists.
fn master(tap: &str) -> Option<String> {
    let link = std::fs::read_link(Path::new("/sys/class/net").join(tap).join("master")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

fn exists(tap: &str) -> bool {
    Path::new("/sys/class/net").join(tap).exists()
}

fn nic(name: &str, network_id: &str) -> NetworkInterface {
    NetworkInterface {
        name: name.into(),
        network_id: network_id.into(),
        ips: vec![],
        attributes: Default::default(),
    }
}

fn handle(machine: Option<&Machine>, name: &str) -> Option<String> {
    machine?
        .status
        .as_ref()?
        .network_interfaces
        .iter()
        .find(|n| n.name == name && n.state == 1)
        .map(|n| n.handle.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_nics_get_taps_on_the_bridge_and_leave_none_behind() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the bridge plugin needs root");
        return;
    }
    let Some(bridge) = Bridge::create() else {
        eprintln!("skipped: cannot create a Linux bridge here (ip link add ... type bridge failed)");
        return;
    };
    let guest = test_guest();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = tiny_config(
        &format!(
            "image_dirs = [{:?}]\nbridges = [{:?}]",
            guest.parent().unwrap().display().to_string(),
            bridge.0
        ),
        2,
    );
    let provider = Provider::start(dir.path(), &config).await;
    let mut client = provider.client().await;
    let id = client
        .create_machine(CreateMachineRequest {
            machine: Some(Machine {
                metadata: Some(ObjectMetadata::default()),
                spec: Some(MachineSpec {
                    power: Power::On as i32,
                    class: "tiny".into(),
                    volumes: vec![boot_volume(format!("file://{}", guest.display()), 0)],
                    network_interfaces: vec![nic("eth0", &bridge.0), nic("eth1", "isolated")],
                    ..Default::default()
                }),
                status: None,
            }),
        })
        .await
        .expect("CreateMachine")
        .into_inner()
        .machine
        .unwrap()
        .metadata
        .unwrap()
        .id;
    let tap0 = tap_name(&id, "eth0");
    let running = wait_for(
        &mut client,
        &id,
        BOOT_TIMEOUT,
        "RUNNING with eth0 on the bridge",
        |m| m.is_some_and(|m| state(m) == RUNNING) && handle(m, "eth0").is_some() && master(&tap0).is_some(),
    )
    .await
    .unwrap();
    assert_eq!(handle(Some(&running), "eth0").unwrap(), format!("bridge/{tap0}"));
    assert!(handle(Some(&running), "eth1").unwrap().starts_with("isolated/"));
    assert_eq!(master(&tap0).as_deref(), Some(bridge.0.as_str()));

    // The guest sees both NICs with their MACs.
    let (_, mut session) = exec(&mut client, &id).await;
    let end = session.read_until("IRI-REPORT END", 0, BOOT_TIMEOUT).await;
    for name in ["eth0", "eth1"] {
        let mac = mac_address(&id, name);
        assert!(
            session.output[..end].contains(&mac),
            "{name} {mac}: {}",
            &session.output[..end]
        );
    }

    // Hot-plugged onto the bridge, then unplugged: the tap comes and goes.
    client
        .attach_network_interface(AttachNetworkInterfaceRequest {
            machine_id: id.clone(),
            network_interface: Some(nic("eth2", &bridge.0)),
        })
        .await
        .expect("AttachNetworkInterface");
    let tap2 = tap_name(&id, "eth2");
    wait_for(
        &mut client,
        &id,
        Duration::from_secs(60),
        "eth2 on the bridge",
        |m| handle(m, "eth2").is_some() && master(&tap2).as_deref() == Some(bridge.0.as_str()),
    )
    .await;
    let mac2 = mac_address(&id, "eth2");
    report_until(&mut session, end, |report| report.contains(&mac2)).await;
    session.close().await;
    client
        .detach_network_interface(DetachNetworkInterfaceRequest {
            machine_id: id.clone(),
            name: "eth2".into(),
        })
        .await
        .expect("DetachNetworkInterface");
    wait_for(&mut client, &id, Duration::from_secs(60), "eth2 gone", |m| {
        m.is_some_and(|m| {
            !m.status
                .as_ref()
                .is_some_and(|s| s.network_interfaces.iter().any(|n| n.name == "eth2"))
        })
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while exists(&tap2) {
        assert!(
            Instant::now() < deadline,
            "the unplugged NIC's tap {tap2} is left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    client
        .delete_machine(DeleteMachineRequest {
            machine_id: id.clone(),
        })
        .await
        .expect("DeleteMachine");
    wait_for(&mut client, &id, Duration::from_secs(60), "gone", |m| m.is_none()).await;
    assert!(!exists(&tap0), "the deleted machine's tap {tap0} is left");
}
