// SPDX-License-Identifier: Apache-2.0
//! Machines booted from IronCore OCI images in a real registry (Debian's `docker-registry`):
//! one image carries a kernel and an initramfs (direct kernel boot), the other only a rootfs
//! (the test guest's UEFI boot disk, `scripts/test-guest`): it becomes the machine's disk,
//! grown to the volume's `size_bytes`, and OVMF boots it.
//!
//! Needs qemu-system-x86, qemu-utils, ovmf and docker-registry; TCG is enough.

mod common;

use std::{path::Path, time::Duration};

use common::{Provider, boot_volume, exec, state, test_guest, tiny_config, wait_for};
use iri_api::{
    machine::v1alpha1::{
        CreateMachineRequest, DeleteMachineRequest, Machine, MachineSpec, MachineState, Power,
    },
    meta::v1alpha1::ObjectMetadata,
};
use ironcore_image::testing::{Layer, Registry};

const RUNNING: i32 = MachineState::MachineRunning as i32;
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const MIB: i64 = 1 << 20;

fn config(registry: &str) -> String {
    tiny_config(&format!("[images]\ntrusted_hosts = [{registry:?}]"), 2)
}

fn missing(tool: &str) -> bool {
    !std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()))
}

fn machine(image: String, size_bytes: i64) -> CreateMachineRequest {
    CreateMachineRequest {
        machine: Some(Machine {
            metadata: Some(ObjectMetadata::default()),
            spec: Some(MachineSpec {
                power: Power::On as i32,
                class: "tiny".into(),
                volumes: vec![boot_volume(image, size_bytes)],
                ..Default::default()
            }),
            status: None,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_boot_oci_kernel_images_and_uefi_disk_images() {
    if missing("docker-registry") {
        eprintln!("skipped: docker-registry is not installed (apt-get install docker-registry)");
        return;
    }
    let guest = test_guest();
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path());
    let read = |name: &str| std::fs::read(guest.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (kernel, initramfs) = (read("vmlinuz"), read("initramfs.cpio.gz"));
    registry.push(
        "guest",
        "kernel",
        &[
            Layer {
                kind: "kernel",
                content: &kernel,
            },
            Layer {
                kind: "initramfs",
                content: &initramfs,
            },
        ],
    );
    // The rootfs layer is a raw disk image.
    let raw = dir.path().join("disk.raw");
    let converted = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-O", "raw"])
        .arg(guest.join("disk.qcow2"))
        .arg(&raw)
        .status()
        .expect("qemu-img");
    assert!(converted.success());
    let rootfs = std::fs::read(&raw).unwrap();
    let rootfs_bytes = rootfs.len() as i64;
    registry.push(
        "guest",
        "disk",
        &[Layer {
            kind: "rootfs",
            content: &rootfs,
        }],
    );
    drop(rootfs);

    let provider = Provider::start(dir.path(), &config(&registry.address)).await;
    let mut client = provider.client().await;
    let direct = client
        .create_machine(machine(format!("{}/guest:kernel", registry.address), 0))
        .await
        .expect("CreateMachine (kernel image)")
        .into_inner()
        .machine
        .unwrap()
        .metadata
        .unwrap()
        .id;
    let disk_bytes = 96 * MIB;
    assert!(disk_bytes > rootfs_bytes, "the disk must grow beyond the image");
    let uefi = client
        .create_machine(machine(format!("{}/guest:disk", registry.address), disk_bytes))
        .await
        .expect("CreateMachine (disk image)")
        .into_inner()
        .machine
        .unwrap()
        .metadata
        .unwrap()
        .id;

    for (id, what) in [(&direct, "kernel image"), (&uefi, "UEFI disk image")] {
        wait_for(&mut client, id, BOOT_TIMEOUT, "RUNNING", |m| {
            m.is_some_and(|m| state(m) == RUNNING)
        })
        .await
        .unwrap_or_else(|| panic!("{what}: not RUNNING\n{}", provider.logs()));
        let (_, mut session) = exec(&mut client, id).await;
        let end = session.read_until("IRI-REPORT END", 0, BOOT_TIMEOUT).await;
        let output = &session.output[..end];
        assert!(output.contains("IRI-TEST-GUEST READY"), "{what}: {output}");
        if id == &uefi {
            // The image's disk, grown to size_bytes, is the guest's first disk.
            assert!(
                output.contains(&format!("IRI-REPORT disk vda {disk_bytes} oda")),
                "{what}: {output}"
            );
            assert!(output.contains("IRI-REPORT firmware uefi"), "{what}: {output}");
            let vars = provider.machine_dir(id).join("efivars.fd");
            assert!(vars.is_file(), "the machine has its own UEFI variable store");
        } else {
            assert!(!output.contains("IRI-REPORT disk vda"), "{what}: {output}");
        }
        session.close().await;
    }
    // The images were fetched once into the provider's cache.
    assert!(Path::new(&provider.data_dir).join("images").is_dir());

    for id in [&direct, &uefi] {
        client
            .delete_machine(DeleteMachineRequest {
                machine_id: id.clone(),
            })
            .await
            .expect("DeleteMachine");
        wait_for(&mut client, id, Duration::from_secs(60), "gone", |m| m.is_none()).await;
        assert!(
            !provider.machine_dir(id).exists(),
            "the machine directory is left"
        );
    }
}
