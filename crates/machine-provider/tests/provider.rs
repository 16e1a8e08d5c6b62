// SPDX-License-Identifier: Apache-2.0
//! The real `iri-machine-provider` binary booting the real test guest (`scripts/test-guest`)
//! under QEMU: the console marker and the guest's report (ignition, hostname, disk) read
//! through Exec, hot-plug and hot-unplug of a local disk and a NIC seen in the guest, a QEMU killed behind the provider's back started again, the NIC seen with its MAC, an NBD volume (served by qemu-storage-daemon as the
//! volume provider does) seen with its size and serial, power off and on, kill -9 of the provider with the machine running and
//! adoption of the same QEMU process, and a delete that leaves nothing behind.
//!
//! Needs qemu-system-x86 and qemu-utils; TCG is enough.

mod common;

use std::time::{Duration, Instant};

use common::{
    Provider, exec, get, is_alive, open_exec, qemus_under, report_until, sha256_hex, state, test_guest,
    tiny_config, volume_state, wait_for,
};
use iri_api::{
    machine::v1alpha1::{
        AttachNetworkInterfaceRequest, AttachVolumeRequest, CreateMachineRequest, DeleteMachineRequest,
        DetachNetworkInterfaceRequest, DetachVolumeRequest, GuestConfig, ImageSpec, ListEventsRequest,
        LocalDisk, Machine, MachineSpec, MachineState, NetworkInterface, Power, StatusRequest,
        UpdateMachinePowerRequest, Volume, VolumeConnection,
    },
    meta::v1alpha1::ObjectMetadata,
};

const RUNNING: i32 = MachineState::MachineRunning as i32;
const STOPPED: i32 = MachineState::MachineStopped as i32;
/// A TCG boot of the test guest takes ~10 s on an idle 2-core machine; CI machines are busy.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn config(guest_root: &std::path::Path, nbd_dir: &std::path::Path) -> String {
    tiny_config(
        &format!(
            "image_dirs = [{:?}]\nnbd_socket_dirs = [{:?}]\npower_off_grace_seconds = 30",
            guest_root.display().to_string(),
            nbd_dir.display().to_string()
        ),
        4,
    )
}

/// Serves a fresh qcow2 of `size` bytes as NBD export `vol0` on `<dir>/nbd.sock` with
/// qemu-storage-daemon, as the volume provider does. Killed with the test's QEMUs.
async fn nbd_server(dir: &std::path::Path, size: i64) -> std::process::Child {
    std::fs::create_dir_all(dir).unwrap();
    let image = dir.join("vol0.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg(size.to_string())
        .status()
        .expect("qemu-img");
    assert!(status.success());
    let socket = dir.join("nbd.sock");
    let child = std::process::Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,filename={},node-name=f", image.display()))
        .args(["--blockdev", "driver=qcow2,file=f,node-name=vol0"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", socket.display()))
        .args(["--export", "type=nbd,id=e0,node-name=vol0,name=vol0,writable=on"])
        .spawn()
        .expect("qemu-storage-daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "qemu-storage-daemon does not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

/// The MAC of NIC `name` from its ATTACHED status (handle `isolated/<mac>`), if attached.
fn nic_handle(machine: Option<&Machine>, name: &str) -> Option<String> {
    machine?
        .status
        .as_ref()?
        .network_interfaces
        .iter()
        .find(|n| n.name == name && n.state == 1)
        .and_then(|n| n.handle.strip_prefix("isolated/"))
        .map(str::to_string)
}

async fn quantity(provider: &Provider) -> i64 {
    provider
        .client()
        .await
        .status(StatusRequest {})
        .await
        .expect("Status")
        .into_inner()
        .machine_class_status[0]
        .quantity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_execs_powers_survives_kill_and_deletes() {
    let guest = test_guest();
    let dir = tempfile::tempdir().expect("tempdir");
    let nbd_dir = dir.path().join("nbd");
    let nbd_bytes: i64 = 32 << 20;
    let _nbd = nbd_server(&nbd_dir, nbd_bytes).await;
    let mut provider = Provider::start(dir.path(), &config(guest.parent().unwrap(), &nbd_dir)).await;
    let mut client = provider.client().await;
    // 4 cpus and 1 GiB hold four machines of 1 cpu and 256 MiB.
    assert_eq!(quantity(&provider).await, 4);

    let ignition = b"{\"ignition\":{\"version\":\"3.4.0\"}}\n".to_vec();
    let disk_bytes: i64 = 64 << 20;
    let created_at = Instant::now();
    let machine = client
        .create_machine(CreateMachineRequest {
            machine: Some(Machine {
                metadata: Some(ObjectMetadata::default()),
                spec: Some(MachineSpec {
                    power: Power::On as i32,
                    class: "tiny".into(),
                    ignition_data: ignition.clone(),
                    volumes: vec![
                        Volume {
                            name: "root".into(),
                            device: "oda".into(),
                            local_disk: Some(LocalDisk {
                                size_bytes: 0,
                                image: Some(ImageSpec {
                                    image: format!("file://{}", guest.display()),
                                }),
                            }),
                            connection: None,
                        },
                        Volume {
                            name: "scratch".into(),
                            device: "odb".into(),
                            local_disk: Some(LocalDisk {
                                size_bytes: disk_bytes,
                                image: None,
                            }),
                            connection: None,
                        },
                        Volume {
                            name: "data".into(),
                            device: "odc".into(),
                            local_disk: None,
                            connection: Some(VolumeConnection {
                                driver: "nbd".into(),
                                handle: "nbdvol0123456789".into(),
                                attributes: [(
                                    "uri".to_string(),
                                    format!("nbd+unix:///vol0?socket={}/nbd.sock", nbd_dir.display()),
                                )]
                                .into(),
                                effective_storage_bytes: nbd_bytes,
                                ..Default::default()
                            }),
                        },
                    ],
                    network_interfaces: vec![NetworkInterface {
                        name: "eth0".into(),
                        network_id: "isolated".into(),
                        ips: vec!["10.0.0.2".into()],
                        attributes: Default::default(),
                    }],
                    guest_config: Some(GuestConfig {
                        hostname: "iri-test-1".into(),
                    }),
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
    assert_eq!(
        quantity(&provider).await,
        3,
        "a created machine holds its resources"
    );

    let running = wait_for(&mut client, &id, BOOT_TIMEOUT, "RUNNING", |m| {
        m.is_some_and(|m| state(m) == RUNNING)
    })
    .await
    .unwrap();
    let rpc_to_running = created_at.elapsed();
    let volumes = &running.status.as_ref().unwrap().volumes;
    assert!(
        volumes.iter().all(|v| v.state == 1),
        "local disks are attached while QEMU runs: {volumes:?}"
    );
    let nics = &running.status.as_ref().unwrap().network_interfaces;
    assert_eq!(nics.len(), 1);
    assert_eq!(nics[0].state, 1, "the NIC is attached while QEMU runs: {nics:?}");
    let mac = nics[0]
        .handle
        .strip_prefix("isolated/")
        .unwrap_or_else(|| panic!("NIC handle {:?}", nics[0].handle))
        .to_string();
    let pid = provider.qemu_pid(&id).expect("pid file");
    assert!(is_alive(pid));
    // Only the provider may read a machine's files; the ignition data is a secret.
    let mode = |path: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&provider.data_dir), 0o700);
    assert_eq!(mode(&provider.data_dir.join("machines")), 0o700);
    assert_eq!(mode(&provider.machine_dir(&id)), 0o700);
    assert_eq!(mode(&provider.machine_dir(&id).join("ignition")), 0o600);
    assert_eq!(mode(&provider.machine_dir(&id).join("console.log")), 0o600);

    // The marker and the report, through Exec.
    let (url, mut session) = exec(&mut client, &id).await;
    let end = session.read_until("IRI-REPORT END", 0, BOOT_TIMEOUT).await;
    let rpc_to_marker = created_at.elapsed();
    println!("CreateMachine → RUNNING {rpc_to_running:?}, → console report {rpc_to_marker:?}");
    let output = session.output.clone();
    assert!(output.contains("IRI-TEST-GUEST READY"), "{output}");
    assert!(output.contains("IRI-REPORT hostname iri-test-1"), "{output}");
    assert!(
        output.contains(&format!(
            "IRI-REPORT ignition {} {}",
            ignition.len(),
            sha256_hex(&ignition)
        )),
        "{output}"
    );
    assert!(
        output.contains(&format!("IRI-REPORT disk vda {disk_bytes} odb")),
        "{output}"
    );
    assert!(output.contains(&format!("IRI-REPORT nic eth0 {mac}")), "{output}");
    assert!(
        output.contains(&format!("IRI-REPORT disk vdb {nbd_bytes} nbdvol0123456789")),
        "{output}"
    );
    // Input reaches the guest's shell: the answer, not the echo of the question.
    session.send("echo exec-$((6*7))\n").await;
    session.read_until("exec-42", end, Duration::from_secs(30)).await;
    session.close().await;
    // The URL was good for one session only.
    assert!(open_exec(&url).await.is_err(), "an exec URL worked twice");

    // kill -9 of the provider: QEMU keeps running and is adopted, not restarted.
    provider.kill();
    assert!(is_alive(pid), "QEMU died with the provider");
    provider.spawn().await;
    let mut client = provider.client().await;
    let adopted = get(&mut client, &id).await.expect("listed after restart");
    assert_eq!(state(&adopted), RUNNING);
    assert_eq!(provider.qemu_pid(&id), Some(pid), "the same QEMU was adopted");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(is_alive(pid));
    let (_, mut session) = exec(&mut client, &id).await;
    let from = session.output.len();
    session.send("iri-report\n").await;
    let mut from = session
        .read_until("IRI-REPORT hostname iri-test-1", from, Duration::from_secs(30))
        .await;

    // Hot-plug into the adopted QEMU: a local disk appears in the guest...
    client
        .attach_volume(AttachVolumeRequest {
            machine_id: id.clone(),
            volume: Some(Volume {
                name: "extra".into(),
                device: "odd".into(),
                local_disk: Some(LocalDisk {
                    size_bytes: 16 << 20,
                    image: None,
                }),
                connection: None,
            }),
        })
        .await
        .expect("AttachVolume");
    client
        .attach_network_interface(AttachNetworkInterfaceRequest {
            machine_id: id.clone(),
            network_interface: Some(NetworkInterface {
                name: "eth1".into(),
                network_id: "isolated".into(),
                ips: vec![],
                attributes: Default::default(),
            }),
        })
        .await
        .expect("AttachNetworkInterface");
    let attached = wait_for(
        &mut client,
        &id,
        Duration::from_secs(30),
        "extra and eth1 ATTACHED",
        |m| volume_state(m, "extra") == Some(1) && nic_handle(m, "eth1").is_some(),
    )
    .await;
    let mac1 = nic_handle(attached.as_ref(), "eth1").unwrap();
    assert_ne!(mac1, mac);
    let plugged = "IRI-REPORT disk vdc 16777216 odd";
    let plugged_nic = format!("IRI-REPORT nic eth1 {mac1}");
    from = report_until(&mut session, from, |report| {
        report.contains(plugged) && report.contains(&plugged_nic)
    })
    .await;
    // ...and detached, it stays in status until the guest let go (pciehp takes 5 s), then
    // leaves status and guest.
    let detach_at = Instant::now();
    client
        .detach_volume(DetachVolumeRequest {
            machine_id: id.clone(),
            name: "extra".into(),
        })
        .await
        .expect("DetachVolume");
    client
        .detach_network_interface(DetachNetworkInterfaceRequest {
            machine_id: id.clone(),
            name: "eth1".into(),
        })
        .await
        .expect("DetachNetworkInterface");
    // The reconcile that acts on the detach (the first status with the new generation) asks
    // QEMU to unplug, and QEMU only lets go once the guest ejected the device (ACPI, ~100 ms
    // and more under TCG): that status must still list the volume. Polled without pause.
    let listed = loop {
        let m = get(&mut client, &id).await.unwrap();
        let generation = m.metadata.as_ref().unwrap().generation;
        if m.status.as_ref().unwrap().observed_generation >= generation {
            break m;
        }
    };
    assert!(
        !listed
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .iter()
            .any(|v| v.name == "extra"),
        "the detached volume is still in spec"
    );
    assert_eq!(
        volume_state(Some(&listed), "extra"),
        Some(1),
        "a detach the guest had not completed yet vanished from status"
    );
    wait_for(
        &mut client,
        &id,
        Duration::from_secs(60),
        "extra and eth1 gone",
        |m| m.is_some() && volume_state(m, "extra").is_none() && nic_handle(m, "eth1").is_none(),
    )
    .await;
    println!("DetachVolume → gone from status {:?}", detach_at.elapsed());
    report_until(&mut session, from, |report| {
        !report.contains("odd") && !report.contains("nic eth1") && report.contains("nic eth0")
    })
    .await;
    assert!(
        !provider.machine_dir(&id).join("disk-6578747261.qcow2").exists(),
        "the detached local disk's image is left"
    );
    session.close().await;

    // Power off: the guest handles the ACPI power button, well within the grace period.
    let off_at = Instant::now();
    client
        .update_machine_power(UpdateMachinePowerRequest {
            machine_id: id.clone(),
            power: Power::Off as i32,
        })
        .await
        .expect("power off");
    wait_for(&mut client, &id, Duration::from_secs(60), "STOPPED", |m| {
        m.is_some_and(|m| state(m) == STOPPED)
    })
    .await;
    println!("POWER_OFF → STOPPED {:?}", off_at.elapsed());
    assert!(!is_alive(pid), "QEMU runs after power off");
    assert_eq!(
        quantity(&provider).await,
        3,
        "a stopped machine keeps its resources"
    );
    let events = client
        .list_events(ListEventsRequest { filter: None })
        .await
        .expect("ListEvents")
        .into_inner()
        .events;
    let reasons: Vec<String> = events
        .iter()
        .filter_map(|e| e.spec.as_ref())
        .map(|s| s.reason.clone())
        .collect();
    assert!(reasons.contains(&"PoweringOff".to_string()), "{reasons:?}");
    assert!(reasons.contains(&"PoweredOff".to_string()), "{reasons:?}");
    assert!(
        !reasons.contains(&"ForcedOff".to_string()),
        "the guest ignored ACPI: {reasons:?}"
    );

    // Power on: a new QEMU with the same disks.
    client
        .update_machine_power(UpdateMachinePowerRequest {
            machine_id: id.clone(),
            power: Power::On as i32,
        })
        .await
        .expect("power on");
    wait_for(&mut client, &id, BOOT_TIMEOUT, "RUNNING again", |m| {
        m.is_some_and(|m| state(m) == RUNNING)
    })
    .await;
    let new_pid = provider.qemu_pid(&id).expect("pid file");
    assert_ne!(new_pid, pid);
    assert!(is_alive(new_pid));

    // A QEMU that dies on its own is noticed, reported, and (power is on) started again.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let restarted = loop {
        if let Some(pid) = provider.qemu_pid(&id)
            && pid != new_pid
            && is_alive(pid)
            && get(&mut client, &id).await.is_some_and(|m| state(&m) == RUNNING)
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the killed QEMU was not started again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
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
            .any(|s| s.reason == "Stopped" && s.r#type == "Warning"),
        "no Warning event about the QEMU that died"
    );
    let new_pid = restarted;

    // Delete: nothing of the machine is left.
    client
        .delete_machine(DeleteMachineRequest {
            machine_id: id.clone(),
        })
        .await
        .expect("delete");
    wait_for(&mut client, &id, Duration::from_secs(60), "gone", |m| m.is_none()).await;
    assert!(!is_alive(new_pid), "QEMU runs after delete");
    assert!(
        !provider.machine_dir(&id).exists(),
        "the machine directory is left"
    );
    assert!(
        qemus_under(&provider.data_dir).is_empty(),
        "a QEMU of the provider is left"
    );
    let status = client
        .delete_machine(DeleteMachineRequest {
            machine_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(quantity(&provider).await, 4);
    provider.stop();
}
