// SPDX-License-Identifier: Apache-2.0
//! `ceph` volumes against a real single-node Ceph cluster (`scripts/ceph-test-cluster`): an RBD
//! image attached at start with upstream's access (monitors, image, userID, userKey), seen in
//! the guest with its size; grown online; a LUKS2-encrypted image (librbd encryption,
//! `encryptionKey`) hot-plugged and detached; a volume whose monitors are unreachable stays
//! PENDING without blocking the machine; delete leaves no secret behind.
//!
//! Needs root, ceph-mon, ceph-osd, ceph-common (rbd) and QEMU's rbd driver
//! (qemu-block-extra); skipped with the reason otherwise.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    process::Command,
    time::Duration,
};

use common::{
    Provider, boot_volume, exec, report_until, state, test_guest, tiny_config, volume_state, wait_for,
};
use iri_api::{
    machine::v1alpha1::{
        AttachVolumeRequest, CreateMachineRequest, DeleteMachineRequest, DetachVolumeRequest, Machine,
        MachineSpec, MachineState, Power, UpdateVolumeRequest, Volume, VolumeConnection,
    },
    meta::v1alpha1::ObjectMetadata,
};

const RUNNING: i32 = MachineState::MachineRunning as i32;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const MIB: i64 = 1 << 20;

/// A cluster started by the script, stopped when dropped.
struct Cluster {
    dir: std::path::PathBuf,
    env: HashMap<String, String>,
}

impl Cluster {
    fn script() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph-test-cluster")
    }

    fn start(dir: &Path) -> Cluster {
        let status = Command::new(Self::script())
            .arg("start")
            .arg(dir)
            .status()
            .expect("scripts/ceph-test-cluster");
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            env: HashMap::new(),
        };
        assert!(status.success(), "the Ceph test cluster did not start");
        cluster.env = std::fs::read_to_string(dir.join("env"))
            .expect("the cluster's env file")
            .lines()
            .filter_map(|l| l.strip_prefix("export ").unwrap_or(l).split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches(['"', '\'']).to_string()))
            .collect();
        cluster
    }

    fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} not in the cluster's env"))
    }

    fn rbd(&self, args: &[&str]) {
        let status = Command::new("rbd")
            .arg("-c")
            .arg(self.get("CEPH_CONF"))
            .args(args)
            .status()
            .expect("rbd");
        assert!(status.success(), "rbd {args:?}");
    }

    /// The access of image `image`, as ceph-provider hands it out.
    fn connection(&self, image: &str, bytes: i64, passphrase: Option<&[u8]>) -> VolumeConnection {
        VolumeConnection {
            driver: "ceph".into(),
            handle: format!("wwn{image}"),
            attributes: BTreeMap::from([
                ("monitors".into(), self.get("CEPH_MON_ADDR").to_string()),
                ("image".into(), format!("{}/{image}", self.get("CEPH_POOL"))),
            ]),
            secret_data: BTreeMap::from([
                ("userID".into(), self.get("CEPH_CLIENT_ID").as_bytes().to_vec()),
                ("userKey".into(), self.get("CEPH_CLIENT_KEY").as_bytes().to_vec()),
            ]),
            encryption_data: passphrase
                .map(|p| BTreeMap::from([("encryptionKey".to_string(), p.to_vec())]))
                .unwrap_or_default(),
            effective_storage_bytes: bytes,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(Self::script()).arg("stop").arg(&self.dir).status();
    }
}

fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    for tool in ["ceph-mon", "ceph-osd", "rbd"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()));
        if !found {
            return Some(format!(
                "{tool} is not installed (apt-get install ceph-mon ceph-osd ceph-common)"
            ));
        }
    }
    None
}

fn volume(name: &str, device: &str, connection: VolumeConnection) -> Volume {
    Volume {
        name: name.into(),
        device: device.into(),
        local_disk: None,
        connection: Some(connection),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_volumes_attach_grow_encrypt_and_detach() {
    if let Some(reason) = missing() {
        eprintln!("skipped: {reason}");
        return;
    }
    let guest = test_guest();
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(&dir.path().join("ceph"));
    cluster.rbd(&["create", "rbd-test/vol1", "--size", "64M"]);
    cluster.rbd(&["create", "rbd-test/vol2", "--size", "64M"]);
    let passphrase = b"a passphrase of vol2";
    let pass_file = dir.path().join("vol2.pass");
    std::fs::write(&pass_file, passphrase).unwrap();
    cluster.rbd(&[
        "encryption",
        "format",
        "rbd-test/vol2",
        "luks2",
        pass_file.to_str().unwrap(),
    ]);

    let provider = Provider::start(
        dir.path(),
        &tiny_config(
            &format!(
                "image_dirs = [{:?}]",
                guest.parent().unwrap().display().to_string()
            ),
            2,
        ),
    )
    .await;
    let mut client = provider.client().await;
    // An unreachable cluster: a monitor port with nothing behind it.
    let mut unreachable = cluster.connection("vol1", 64 * MIB, None);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    unreachable
        .attributes
        .insert("monitors".into(), closed.to_string());
    let id = client
        .create_machine(CreateMachineRequest {
            machine: Some(Machine {
                metadata: Some(ObjectMetadata::default()),
                spec: Some(MachineSpec {
                    power: Power::On as i32,
                    class: "tiny".into(),
                    volumes: vec![
                        boot_volume(format!("file://{}", guest.display()), 0),
                        volume("data", "odb", cluster.connection("vol1", 64 * MIB, None)),
                        volume("lost", "odc", unreachable),
                    ],
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
    let running = wait_for(&mut client, &id, BOOT_TIMEOUT, "RUNNING with data", |m| {
        m.is_some_and(|m| state(m) == RUNNING) && volume_state(m, "data") == Some(1)
    })
    .await
    .unwrap_or_else(|| panic!("{}", provider.logs()));
    assert_eq!(
        volume_state(Some(&running), "lost"),
        Some(0),
        "a volume of an unreachable cluster is PENDING"
    );
    let machine_dir = provider.machine_dir(&id);
    for entry in std::fs::read_dir(&machine_dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().starts_with("secret-") {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(entry.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
    let cmdline =
        std::fs::read_to_string(format!("/proc/{}/cmdline", provider.qemu_pid(&id).unwrap())).unwrap();
    assert!(
        !cmdline.contains(cluster.get("CEPH_CLIENT_KEY")),
        "the cephx key is on QEMU's command line"
    );

    let (_, mut session) = exec(&mut client, &id).await;
    let from = session.read_until("IRI-REPORT END", 0, BOOT_TIMEOUT).await;
    assert!(
        session.output[..from].contains(&format!("IRI-REPORT disk vda {}", 64 * MIB)),
        "{}",
        &session.output[..from]
    );

    // Grown online: the image first (as ceph-provider does), then UpdateVolume.
    cluster.rbd(&["resize", "rbd-test/vol1", "--size", "96M"]);
    client
        .update_volume(UpdateVolumeRequest {
            machine_id: id.clone(),
            volume: Some(volume("data", "odb", cluster.connection("vol1", 96 * MIB, None))),
        })
        .await
        .expect("UpdateVolume");
    let from = report_until(&mut session, from, |r| {
        r.contains(&format!("IRI-REPORT disk vda {}", 96 * MIB))
    })
    .await;

    // An encrypted image, hot-plugged: the guest sees the plaintext size (LUKS2 header off).
    client
        .attach_volume(AttachVolumeRequest {
            machine_id: id.clone(),
            volume: Some(volume(
                "secret",
                "odd",
                cluster.connection("vol2", 64 * MIB, Some(passphrase)),
            )),
        })
        .await
        .expect("AttachVolume");
    let from = report_until(&mut session, from, |r| {
        r.contains(&format!("IRI-REPORT disk vdb {}", 48 * MIB))
    })
    .await;
    client
        .detach_volume(DetachVolumeRequest {
            machine_id: id.clone(),
            name: "secret".into(),
        })
        .await
        .expect("DetachVolume");
    wait_for(&mut client, &id, Duration::from_secs(60), "secret gone", |m| {
        m.is_some() && volume_state(m, "secret").is_none()
    })
    .await;
    report_until(&mut session, from, |r| !r.contains("disk vdb")).await;
    session.close().await;

    client
        .delete_machine(DeleteMachineRequest {
            machine_id: id.clone(),
        })
        .await
        .expect("DeleteMachine");
    wait_for(&mut client, &id, Duration::from_secs(60), "gone", |m| m.is_none()).await;
    assert!(
        !machine_dir.exists(),
        "the machine directory (and its secrets) is left"
    );
    drop(cluster);
}
