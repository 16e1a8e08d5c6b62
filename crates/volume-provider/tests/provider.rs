// SPDX-License-Identifier: Apache-2.0
//! End-to-end tests of the real `iri-volume-provider` binary: started on a temporary data
//! directory, driven over gRPC like a volumepoollet would, with data written and read through
//! the NBD exports by `qemu-io` and sizes checked with `qemu-img`. They need qemu-utils
//! (qemu-storage-daemon, qemu-io, qemu-img), which `scripts/test` installs.
//!
//! Run with `--nocapture` to see the measured latencies.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use iri_api::{
    Endpoint,
    endpoint::clients,
    meta::v1alpha1::ObjectMetadata,
    volume::v1alpha1::{
        CreateVolumeRequest, CreateVolumeSnapshotRequest, DeleteVolumeRequest, DeleteVolumeSnapshotRequest,
        EncryptionSpec, ExpandVolumeRequest, ImageDataSource, ListEventsRequest, ListVolumeSnapshotsRequest,
        ListVolumesRequest, SnapshotDataSource, StatusRequest, VersionRequest, Volume, VolumeDataSource,
        VolumeFilter, VolumeResources, VolumeSnapshot, VolumeSnapshotFilter, VolumeSnapshotSpec,
        VolumeSnapshotState, VolumeSpec, VolumeState, volume_runtime_client::VolumeRuntimeClient,
    },
};
use nix::{sys::signal::Signal, unistd::Pid};
use tonic::{Code, transport::Channel};

const MIB: i64 = 1 << 20;
const GIB: i64 = 1 << 30;
/// How long a volume or snapshot may take to converge.
const READY: Duration = Duration::from_secs(60);

type Client = VolumeRuntimeClient<Channel>;

/// A running provider process on a data directory.
struct Provider {
    child: Option<Child>,
    data_dir: PathBuf,
    socket: PathBuf,
    /// The current process's log.
    log: PathBuf,
    root: PathBuf,
    starts: usize,
}

impl Provider {
    /// Starts the binary on `root/data`, serving `root/volume.sock`.
    fn start(root: &Path) -> Provider {
        let mut provider = Provider {
            child: None,
            data_dir: root.join("data"),
            socket: root.join("volume.sock"),
            log: PathBuf::new(),
            root: root.to_path_buf(),
            starts: 0,
        };
        provider.spawn();
        provider
    }

    /// Starts the process (again), logging to `root/provider-<n>.log`.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        self.log = self.root.join(format!("provider-{}.log", self.starts));
        let child = Command::new(env!("CARGO_BIN_EXE_iri-volume-provider"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--address")
            .arg(&self.socket)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(File::create(&self.log).expect("log file"))
            .spawn()
            .expect("start iri-volume-provider");
        self.child = Some(child);
    }

    /// Stops the process if it runs (SIGTERM) and starts it again on the same directory.
    fn restart(&mut self) {
        self.stop_with(Signal::SIGTERM);
        self.spawn();
    }

    /// A client, once the provider answers Version.
    async fn client(&mut self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("provider exited with {status}:\n{}", self.logs());
            }
            if let Ok(channel) = Endpoint::Unix(self.socket.clone())
                .connect(Duration::from_secs(2))
                .await
            {
                let mut client = clients::volume(channel);
                if client.version(VersionRequest::default()).await.is_ok() {
                    return client;
                }
            }
            assert!(
                Instant::now() < deadline,
                "provider not serving after 30 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` and waits for the process to exit.
    fn stop_with(&mut self, signal: Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), signal);
            let status = child.wait().expect("wait for provider");
            if signal == Signal::SIGTERM {
                assert!(
                    status.success(),
                    "provider exited with {status}:\n{}",
                    self.logs()
                );
            }
        }
    }

    /// `<data>/local/<sub>` entries' file names (none if the directory does not exist).
    fn files(&self, sub: &str) -> BTreeSet<String> {
        std::fs::read_dir(self.data_dir.join("local").join(sub))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop_with(Signal::SIGKILL);
        // The storage daemon outlives the provider on purpose; the test's daemon goes with
        // the test. Only the daemon of this data directory (its pid file) is touched.
        if let Ok(pid) = std::fs::read_to_string(self.data_dir.join("local/daemon/pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*self.data_dir.to_string_lossy()))
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn labels(test: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("test".to_string(), test.to_string())])
}

fn spec(size: i64) -> VolumeSpec {
    VolumeSpec {
        class: "fast".into(),
        resources: Some(VolumeResources { storage_bytes: size }),
        encryption: None,
        volume_data_source: None,
    }
}

fn from_snapshot(size: i64, snapshot_id: &str) -> VolumeSpec {
    VolumeSpec {
        volume_data_source: Some(VolumeDataSource {
            image_data_source: None,
            snapshot_data_source: Some(SnapshotDataSource {
                snapshot_id: snapshot_id.into(),
            }),
        }),
        ..spec(size)
    }
}

fn request(test: &str, spec: VolumeSpec) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume: Some(Volume {
            metadata: Some(ObjectMetadata {
                labels: labels(test),
                ..Default::default()
            }),
            spec: Some(spec),
            status: None,
        }),
    }
}

fn id(volume: &Volume) -> String {
    volume.metadata.as_ref().expect("metadata").id.clone()
}

fn state(volume: &Volume) -> i32 {
    volume.status.as_ref().map_or(0, |s| s.state)
}

fn status_bytes(volume: &Volume) -> i64 {
    volume
        .status
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .map_or(0, |r| r.storage_bytes)
}

/// The NBD URI a machine provider would connect to.
fn export_uri(volume: &Volume) -> String {
    let access = volume
        .status
        .as_ref()
        .and_then(|s| s.access.as_ref())
        .unwrap_or_else(|| panic!("volume {} has no access", id(volume)));
    assert_eq!(access.driver, "nbd", "{access:?}");
    assert!(!access.handle.is_empty(), "{access:?}");
    access
        .attributes
        .get("uri")
        .unwrap_or_else(|| panic!("access without a uri attribute: {access:?}"))
        .clone()
}

async fn create(client: &mut Client, request: CreateVolumeRequest) -> Volume {
    client
        .create_volume(request)
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume in response")
}

async fn get(client: &mut Client, volume_id: &str) -> Option<Volume> {
    let listed = client
        .list_volumes(ListVolumesRequest {
            filter: Some(VolumeFilter {
                id: volume_id.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListVolumes")
        .into_inner()
        .volumes;
    assert!(listed.len() <= 1);
    listed.into_iter().next()
}

/// Polls until volume `id` passes `done`; panics on VOLUME_ERROR or after [`READY`].
async fn wait_volume(client: &mut Client, volume_id: &str, done: impl Fn(&Volume) -> bool) -> Volume {
    let deadline = Instant::now() + READY;
    loop {
        let volume = get(client, volume_id)
            .await
            .unwrap_or_else(|| panic!("volume {volume_id} disappeared"));
        assert_ne!(
            state(&volume),
            VolumeState::VolumeError as i32,
            "volume {volume_id} went to VOLUME_ERROR"
        );
        if done(&volume) {
            return volume;
        }
        assert!(
            Instant::now() < deadline,
            "volume {volume_id} did not converge: {volume:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_available(client: &mut Client, volume_id: &str) -> Volume {
    wait_volume(client, volume_id, |v| {
        state(v) == VolumeState::VolumeAvailable as i32
    })
    .await
}

/// Deletes the volume and polls Delete (like the poollet) until NotFound; checks it is unlisted.
async fn delete_and_wait(client: &mut Client, volume_id: &str) {
    let deadline = Instant::now() + READY;
    loop {
        match client
            .delete_volume(DeleteVolumeRequest {
                volume_id: volume_id.into(),
            })
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => break,
            Err(status) => panic!("DeleteVolume {volume_id}: {status}"),
        }
        assert!(
            Instant::now() < deadline,
            "volume {volume_id} not deleted in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(get(client, volume_id).await.is_none());
}

async fn create_snapshot(client: &mut Client, test: &str, volume_id: &str) -> VolumeSnapshot {
    client
        .create_volume_snapshot(CreateVolumeSnapshotRequest {
            volume_snapshot: Some(VolumeSnapshot {
                metadata: Some(ObjectMetadata {
                    labels: labels(test),
                    ..Default::default()
                }),
                spec: Some(VolumeSnapshotSpec {
                    volume_id: volume_id.into(),
                }),
                status: None,
            }),
        })
        .await
        .expect("CreateVolumeSnapshot")
        .into_inner()
        .volume_snapshot
        .expect("snapshot in response")
}

async fn get_snapshot(client: &mut Client, snapshot_id: &str) -> Option<VolumeSnapshot> {
    client
        .list_volume_snapshots(ListVolumeSnapshotsRequest {
            filter: Some(VolumeSnapshotFilter {
                id: snapshot_id.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListVolumeSnapshots")
        .into_inner()
        .volume_snapshots
        .into_iter()
        .next()
}

async fn wait_snapshot_ready(client: &mut Client, snapshot_id: &str) -> VolumeSnapshot {
    let deadline = Instant::now() + READY;
    loop {
        let snapshot = get_snapshot(client, snapshot_id)
            .await
            .unwrap_or_else(|| panic!("snapshot {snapshot_id} disappeared"));
        let state = snapshot.status.as_ref().map_or(0, |s| s.state);
        assert_ne!(
            state,
            VolumeSnapshotState::VolumeSnapshotFailed as i32,
            "{snapshot:?}"
        );
        if state == VolumeSnapshotState::VolumeSnapshotReady as i32 {
            return snapshot;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot {snapshot_id} not ready: {snapshot:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn delete_snapshot_and_wait(client: &mut Client, snapshot_id: &str) {
    let deadline = Instant::now() + READY;
    loop {
        match client
            .delete_volume_snapshot(DeleteVolumeSnapshotRequest {
                volume_snapshot_id: snapshot_id.into(),
            })
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => break,
            Err(status) => panic!("DeleteVolumeSnapshot {snapshot_id}: {status}"),
        }
        assert!(
            Instant::now() < deadline,
            "snapshot {snapshot_id} not deleted in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(get_snapshot(client, snapshot_id).await.is_none());
}

async fn quantity(client: &mut Client) -> i64 {
    let status = client
        .status(StatusRequest {})
        .await
        .expect("Status")
        .into_inner();
    let fast = status
        .volume_class_status
        .iter()
        .find(|c| c.volume_class.as_ref().is_some_and(|c| c.name == "fast"))
        .expect("class fast");
    let caps = fast
        .volume_class
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .expect("capabilities");
    assert!(caps.tps > 0 && caps.iops > 0, "{caps:?}");
    fast.quantity
}

/// Runs `qemu-io -f raw -c <command> <uri>` and returns its output; fails on a non-zero exit.
fn qemu_io(uri: &str, command: &str) -> String {
    let output = Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, uri])
        .output()
        .expect("run qemu-io (install qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "qemu-io -c {command:?} {uri}: {text}");
    text
}

/// Writes `pattern` to the first 64 KiB of the export.
fn write_pattern(uri: &str, pattern: u8) {
    let out = qemu_io(uri, &format!("write -P 0x{pattern:02x} 0 64k"));
    assert!(out.contains("wrote 65536/65536 bytes"), "{out}");
}

/// Whether the first 64 KiB of the export hold `pattern`.
fn has_pattern(uri: &str, pattern: u8) -> bool {
    let out = qemu_io(uri, &format!("read -P 0x{pattern:02x} 0 64k"));
    !out.contains("Pattern verification failed") && out.contains("read 65536/65536 bytes")
}

/// The size the export reports to an NBD client.
fn export_size(uri: &str) -> i64 {
    let output = Command::new("qemu-img")
        .args(["info", "-f", "raw", "--output=json", uri])
        .output()
        .expect("run qemu-img");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "qemu-img info {uri}: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let info: serde_json::Value = serde_json::from_str(&text).expect("qemu-img JSON");
    info["virtual-size"].as_i64().expect("virtual-size")
}

fn event_reasons(events: &[iri_api::event::v1alpha1::Event], object_id: &str) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e.spec.as_ref())
        .filter(|s| s.involved_object_meta.as_ref().is_some_and(|m| m.id == object_id))
        .map(|s| s.reason.clone())
        .collect()
}

/// The whole life of volumes and snapshots with data going through the exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volumes_snapshots_and_clones_serve_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut provider = Provider::start(dir.path());
    let mut client = provider.client().await;
    let test = "lifecycle";

    let version = client
        .version(VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.runtime_name, "iri-volume-provider");

    // Thick accounting (see server.rs): the quantity drops by the size at create and comes
    // back at delete, whatever is written; others' activity on the filesystem only moves it in
    // GiB steps.
    let before = quantity(&mut client).await;
    assert!(before > 64 * MIB, "quantity {before}");
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        quantity(&mut client).await;
        slowest = slowest.max(started.elapsed());
    }
    println!("Status: slowest of 20 calls {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "Status must answer fast");
    let started = Instant::now();
    let created = create(&mut client, request(test, spec(64 * MIB))).await;
    println!("CreateVolume RPC: {:?}", started.elapsed());
    let volume_id = id(&created);
    assert_eq!(state(&created), VolumeState::VolumePending as i32);
    let volume = wait_available(&mut client, &volume_id).await;
    println!("create -> AVAILABLE: {:?}", started.elapsed());
    assert!(status_bytes(&volume) >= 64 * MIB, "{volume:?}");
    let drop = before - quantity(&mut client).await;
    assert!((drop - 64 * MIB).abs() < GIB, "quantity dropped by {drop}");

    let uri = export_uri(&volume);
    write_pattern(&uri, 0xab);
    assert!(has_pattern(&uri, 0xab));
    assert_eq!(export_size(&uri), status_bytes(&volume));

    let started = Instant::now();
    let snapshot = create_snapshot(&mut client, test, &volume_id).await;
    let snapshot_id = snapshot.metadata.as_ref().unwrap().id.clone();
    let snapshot = wait_snapshot_ready(&mut client, &snapshot_id).await;
    println!("snapshot -> READY: {:?}", started.elapsed());
    assert_eq!(snapshot.status.as_ref().unwrap().size, status_bytes(&volume));
    assert_eq!(snapshot.spec.as_ref().unwrap().volume_id, volume_id);
    // The volume stays served while and after the snapshot is taken, and moves on.
    write_pattern(&uri, 0xcd);
    assert!(has_pattern(&uri, 0xcd));

    let started = Instant::now();
    let clone = create(&mut client, request(test, from_snapshot(64 * MIB, &snapshot_id))).await;
    let clone_id = id(&clone);
    let clone = wait_available(&mut client, &clone_id).await;
    println!("clone from snapshot -> AVAILABLE: {:?}", started.elapsed());
    let clone_uri = export_uri(&clone);
    assert_ne!(clone_uri, uri);

    // The snapshot and its clone outlive the source.
    delete_and_wait(&mut client, &volume_id).await;
    assert!(
        has_pattern(&clone_uri, 0xab),
        "the clone holds the snapshot's data"
    );
    let after = get_snapshot(&mut client, &snapshot_id)
        .await
        .expect("snapshot listed");
    assert_eq!(after.status, snapshot.status);

    // Online expansion: the status and the export grow.
    let started = Instant::now();
    client
        .expand_volume(ExpandVolumeRequest {
            volume_id: clone_id.clone(),
            resources: Some(VolumeResources {
                storage_bytes: 128 * MIB,
            }),
        })
        .await
        .expect("ExpandVolume");
    let grown = wait_volume(&mut client, &clone_id, |v| status_bytes(v) >= 128 * MIB).await;
    println!("expand -> status grown: {:?}", started.elapsed());
    assert_eq!(state(&grown), VolumeState::VolumeAvailable as i32);
    assert_eq!(export_size(&export_uri(&grown)), status_bytes(&grown));
    assert!(
        has_pattern(&export_uri(&grown), 0xab),
        "data survives the expansion"
    );

    // Events, found by labels like the poollet's event mapper.
    let events = client
        .list_events(ListEventsRequest {
            filter: Some(iri_api::volume::v1alpha1::EventFilter {
                label_selector: labels(test),
                ..Default::default()
            }),
        })
        .await
        .expect("ListEvents")
        .into_inner()
        .events;
    let volume_events = event_reasons(&events, &volume_id);
    for reason in ["Created", "Available", "Deleting", "Deleted"] {
        assert!(
            volume_events.iter().any(|r| r == reason),
            "{reason} missing in {volume_events:?}"
        );
    }
    let clone_events = event_reasons(&events, &clone_id);
    assert!(clone_events.iter().any(|r| r == "Expanded"), "{clone_events:?}");
    let snapshot_events = event_reasons(&events, &snapshot_id);
    assert!(
        snapshot_events.iter().any(|r| r == "Ready"),
        "{snapshot_events:?}"
    );
    assert!(events.iter().all(|e| {
        let s = e.spec.as_ref().unwrap();
        s.r#type == "Normal" && s.involved_object_meta.as_ref().unwrap().labels == labels(test)
    }));

    let started = Instant::now();
    delete_snapshot_and_wait(&mut client, &snapshot_id).await;
    println!("snapshot delete -> gone: {:?}", started.elapsed());
    assert!(
        has_pattern(&clone_uri, 0xab),
        "the clone keeps its data without the snapshot"
    );
    let started = Instant::now();
    delete_and_wait(&mut client, &clone_id).await;
    println!("delete -> gone: {:?}", started.elapsed());

    // Nothing leaks: no manifests, no layers; the quantity is back.
    assert_eq!(provider.files("volumes"), BTreeSet::new());
    assert_eq!(provider.files("snapshots"), BTreeSet::new());
    assert_eq!(provider.files("layers"), BTreeSet::new());
    let back = quantity(&mut client).await;
    assert!((back - before).abs() < GIB, "quantity {back}, was {before}");

    provider.stop_with(Signal::SIGTERM);
}

/// Every row of the error matrix, over the wire: codes and the fields the messages name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_follow_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut provider = Provider::start(dir.path());
    let mut client = provider.client().await;
    let test = "errors";
    let unknown = iri_runtime::id::new_id();

    async fn expect<T: std::fmt::Debug>(
        call: impl std::future::Future<Output = Result<T, tonic::Status>>,
        code: Code,
        mention: &str,
    ) {
        let status = call.await.expect_err("the call should fail");
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(
            status.message().contains(mention),
            "{:?} does not mention {mention:?}",
            status.message()
        );
    }

    let invalid = Code::InvalidArgument;
    expect(
        client.create_volume(CreateVolumeRequest { volume: None }),
        invalid,
        "volume",
    )
    .await;
    let mut no_metadata = request(test, spec(GIB));
    no_metadata.volume.as_mut().unwrap().metadata = None;
    expect(client.create_volume(no_metadata), invalid, "volume.metadata").await;
    let mut no_spec = request(test, spec(GIB));
    no_spec.volume.as_mut().unwrap().spec = None;
    expect(client.create_volume(no_spec), invalid, "volume.spec").await;
    let specs: Vec<(VolumeSpec, Code, &str)> = vec![
        (
            VolumeSpec {
                class: "gold".into(),
                ..spec(GIB)
            },
            invalid,
            "volume.spec.class",
        ),
        (
            VolumeSpec {
                resources: None,
                ..spec(GIB)
            },
            invalid,
            "volume.spec.resources",
        ),
        (spec(0), invalid, "volume.spec.resources.storage_bytes"),
        (spec(-1), invalid, "volume.spec.resources.storage_bytes"),
        (
            VolumeSpec {
                volume_data_source: Some(VolumeDataSource {
                    image_data_source: Some(ImageDataSource {
                        image: "ftp://example.com/os-images/gardenlinux.raw".into(),
                        architecture: "amd64".into(),
                    }),
                    snapshot_data_source: None,
                }),
                ..spec(GIB)
            },
            invalid,
            "only file://",
        ),
        (
            VolumeSpec {
                encryption: Some(EncryptionSpec {
                    secret_data: BTreeMap::from([("passphrase".into(), b"secret".to_vec())]),
                }),
                ..spec(GIB)
            },
            invalid,
            "volume.spec.encryption.secret_data[\"encryptionKey\"]",
        ),
        (
            from_snapshot(GIB, ""),
            invalid,
            "snapshot_data_source.snapshot_id",
        ),
        (
            from_snapshot(GIB, &unknown),
            Code::NotFound,
            "snapshot_data_source.snapshot_id",
        ),
        (spec(i64::MAX), Code::ResourceExhausted, "not enough storage"),
    ];
    for (spec, code, mention) in specs {
        expect(client.create_volume(request(test, spec)), code, mention).await;
    }

    let volume = create(&mut client, request(test, spec(64 * MIB))).await;
    let volume_id = id(&volume);
    let expand = |volume_id: &str, size: Option<i64>| ExpandVolumeRequest {
        volume_id: volume_id.into(),
        resources: size.map(|storage_bytes| VolumeResources { storage_bytes }),
    };
    expect(
        client.expand_volume(expand(&unknown, Some(GIB))),
        Code::NotFound,
        "volume",
    )
    .await;
    expect(
        client.expand_volume(expand(&volume_id, None)),
        invalid,
        "resources",
    )
    .await;
    expect(
        client.expand_volume(expand(&volume_id, Some(32 * MIB))),
        invalid,
        "resources.storage_bytes",
    )
    .await;
    client
        .expand_volume(expand(&volume_id, Some(64 * MIB)))
        .await
        .expect("the same size is a no-op");
    expect(
        client.delete_volume(DeleteVolumeRequest {
            volume_id: unknown.clone(),
        }),
        Code::NotFound,
        "volume",
    )
    .await;

    let snapshot = |volume_id: &str| CreateVolumeSnapshotRequest {
        volume_snapshot: Some(VolumeSnapshot {
            metadata: Some(ObjectMetadata::default()),
            spec: Some(VolumeSnapshotSpec {
                volume_id: volume_id.into(),
            }),
            status: None,
        }),
    };
    expect(
        client.create_volume_snapshot(CreateVolumeSnapshotRequest {
            volume_snapshot: None,
        }),
        invalid,
        "volume_snapshot",
    )
    .await;
    let mut no_spec = snapshot(&volume_id);
    no_spec.volume_snapshot.as_mut().unwrap().spec = None;
    expect(
        client.create_volume_snapshot(no_spec),
        invalid,
        "volume_snapshot.spec",
    )
    .await;
    expect(
        client.create_volume_snapshot(snapshot("")),
        invalid,
        "volume_snapshot.spec.volume_id",
    )
    .await;
    expect(
        client.create_volume_snapshot(snapshot(&unknown)),
        Code::NotFound,
        "volume_snapshot.spec.volume_id",
    )
    .await;
    expect(
        client.delete_volume_snapshot(DeleteVolumeSnapshotRequest {
            volume_snapshot_id: unknown.clone(),
        }),
        Code::NotFound,
        "volume_snapshot",
    )
    .await;

    // Lists of unknown ids are empty, not errors.
    assert!(get(&mut client, &unknown).await.is_none());
    assert!(get_snapshot(&mut client, &unknown).await.is_none());

    // Deletion: OK while deleting, NotFound once gone; a deleting volume takes no snapshots.
    client
        .delete_volume(DeleteVolumeRequest {
            volume_id: volume_id.clone(),
        })
        .await
        .expect("DeleteVolume");
    let second = client
        .delete_volume(DeleteVolumeRequest {
            volume_id: volume_id.clone(),
        })
        .await;
    assert!(
        second.is_ok() || second.as_ref().unwrap_err().code() == Code::NotFound,
        "{second:?}"
    );
    if get(&mut client, &volume_id).await.is_some() {
        expect(
            client.create_volume_snapshot(snapshot(&volume_id)),
            Code::FailedPrecondition,
            "being deleted",
        )
        .await;
    }
    delete_and_wait(&mut client, &volume_id).await;
    provider.stop_with(Signal::SIGTERM);
}

/// SIGTERM keeps the exports served (the storage daemon stays), and a restart adopts
/// everything: same ids, states, access and data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_adopts_volumes_and_keeps_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut provider = Provider::start(dir.path());
    let mut client = provider.client().await;
    let test = "restart";

    let volume = create(&mut client, request(test, spec(64 * MIB))).await;
    let volume = wait_available(&mut client, &id(&volume)).await;
    let uri = export_uri(&volume);
    write_pattern(&uri, 0x5a);
    let snapshot = create_snapshot(&mut client, test, &id(&volume)).await;
    let snapshot = wait_snapshot_ready(&mut client, &snapshot.metadata.unwrap().id).await;
    let list_all = |client: &mut Client| {
        let mut client = client.clone();
        async move {
            let volumes = client
                .list_volumes(ListVolumesRequest { filter: None })
                .await
                .unwrap()
                .into_inner()
                .volumes;
            let snapshots = client
                .list_volume_snapshots(ListVolumeSnapshotsRequest { filter: None })
                .await
                .unwrap()
                .into_inner()
                .volume_snapshots;
            (volumes, snapshots)
        }
    };
    let before = list_all(&mut client).await;
    assert_eq!(before.0.len(), 1);
    assert_eq!(before.1, std::slice::from_ref(&snapshot));

    provider.stop_with(Signal::SIGTERM);
    assert!(
        has_pattern(&uri, 0x5a),
        "the export is served while the provider is down"
    );

    provider.restart();
    let mut client = provider.client().await;
    let after = list_all(&mut client).await;
    assert_eq!(after, before, "same ids, metadata, specs and states");
    assert_eq!(export_uri(&after.0[0]), uri);
    assert!(has_pattern(&uri, 0x5a));

    // Still fully working: restore from the adopted snapshot.
    let snapshot_id = snapshot.metadata.as_ref().unwrap().id.clone();
    let clone = create(&mut client, request(test, from_snapshot(64 * MIB, &snapshot_id))).await;
    let clone = wait_available(&mut client, &id(&clone)).await;
    assert!(has_pattern(&export_uri(&clone), 0x5a));
    provider.stop_with(Signal::SIGTERM);
}

/// kill -9 in the middle of creating volumes: after a restart, every volume whose CreateVolume
/// returned OK becomes available, and the backend holds nothing no volume references.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_during_creates_converges() {
    const N: usize = 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut provider = Provider::start(dir.path());
    let client = provider.client().await;
    let test = "crash";

    // Creates race the kill: some return OK, some fail, some commit without an answer.
    let answered = Arc::new(AtomicUsize::new(0));
    let mut creates = tokio::task::JoinSet::new();
    for i in 0..N {
        let mut client = client.clone();
        let answered = answered.clone();
        creates.spawn(async move {
            tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
            let created = client
                .create_volume(request(test, spec(16 * MIB)))
                .await
                .ok()
                .and_then(|r| r.into_inner().volume)
                .map(|v| id(&v));
            if created.is_some() {
                answered.fetch_add(1, Ordering::SeqCst);
            }
            created
        });
    }
    // Crash half way: about half of the creates answered, the rest in flight or not sent.
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.load(Ordering::SeqCst) < N / 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    provider.stop_with(Signal::SIGKILL);
    let mut acknowledged = BTreeSet::new();
    while let Some(result) = creates.join_next().await {
        if let Some(volume_id) = result.expect("create task") {
            acknowledged.insert(volume_id);
        }
    }
    println!(
        "{} of {N} creates acknowledged before kill -9; {} volume manifests on disk",
        acknowledged.len(),
        provider.files("volumes").len()
    );
    assert!(!acknowledged.is_empty(), "no create got through before the kill");

    provider.spawn();
    let mut client = provider.client().await;
    let listed: BTreeSet<String> = client
        .list_volumes(ListVolumesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .volumes
        .iter()
        .map(id)
        .collect();
    assert!(
        acknowledged.is_subset(&listed),
        "acknowledged volumes lost: {:?}",
        acknowledged.difference(&listed).collect::<Vec<_>>()
    );
    let started = Instant::now();
    for volume_id in &listed {
        let volume = wait_available(&mut client, volume_id).await;
        assert!(status_bytes(&volume) >= 16 * MIB);
    }
    println!(
        "{} volumes available {:?} after the restart",
        listed.len(),
        started.elapsed()
    );
    // Every manifest belongs to a listed volume: nothing orphaned.
    let manifests: BTreeSet<String> = provider
        .files("volumes")
        .iter()
        .map(|f| f.trim_end_matches(".json").to_string())
        .collect();
    assert_eq!(manifests, listed, "backend volumes vs. listed volumes");
    // A fresh volume is one qcow2 layer; anything more is a leftover of the crash.
    let layers = provider.files("layers");
    assert_eq!(layers.len(), listed.len(), "layers {layers:?}");
    for sub in ["volumes", "layers", "snapshots"] {
        let temporary: Vec<String> = provider
            .files(sub)
            .into_iter()
            .filter(|f| f.starts_with('.'))
            .collect();
        assert!(temporary.is_empty(), "leftovers in {sub}: {temporary:?}");
    }

    for volume_id in &listed {
        delete_and_wait(&mut client, volume_id).await;
    }
    assert_eq!(provider.files("volumes"), BTreeSet::new());
    assert_eq!(provider.files("layers"), BTreeSet::new());
    provider.stop_with(Signal::SIGTERM);
}

/// Every file under `dir` (recursively, sockets skipped) that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            found.extend(files_containing(&entry.path(), needle));
        } else if kind.is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(entry.path());
            }
        }
    }
    found
}

/// An encrypted volume over the real binary: the passphrase is nowhere on disk or in the logs,
/// the data on disk is ciphertext, a clone of its snapshot stays encrypted, and everything
/// reopens after the provider and the storage daemon were both killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn encrypted_volumes_keep_secrets_and_data_off_the_disk() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut provider = Provider::start(dir.path());
    let mut client = provider.client().await;
    let test = "encryption";
    let passphrase = b"provider-test-passphrase-4f1c".to_vec();
    let encrypted = VolumeSpec {
        encryption: Some(iri_api::volume::v1alpha1::EncryptionSpec {
            secret_data: BTreeMap::from([("encryptionKey".to_string(), passphrase.clone())]),
        }),
        ..spec(64 * MIB)
    };
    let volume = create(&mut client, request(test, encrypted)).await;
    let volume = wait_available(&mut client, &id(&volume)).await;
    let uri = export_uri(&volume);
    write_pattern(&uri, 0x5a);
    let snapshot = create_snapshot(&mut client, test, &id(&volume)).await;
    let snapshot_id = snapshot.metadata.unwrap().id;
    wait_snapshot_ready(&mut client, &snapshot_id).await;
    // The poollet passes the source's secret on; without it the clone inherits the key anyway.
    let clone = create(&mut client, request(test, from_snapshot(64 * MIB, &snapshot_id))).await;
    let clone = wait_available(&mut client, &id(&clone)).await;
    assert!(has_pattern(&export_uri(&clone), 0x5a));

    let kek = provider.data_dir.join("kek");
    assert_eq!(
        std::fs::metadata(&kek).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let plaintext = [0x5au8; 64];
    assert_eq!(files_containing(dir.path(), &plaintext), Vec::<PathBuf>::new());
    assert_eq!(files_containing(dir.path(), &passphrase), Vec::<PathBuf>::new());

    // kill -9 the provider and its storage daemon: both come back and serve the data again.
    let daemon_pid: i32 = std::fs::read_to_string(provider.data_dir.join("local/daemon/pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    provider.stop_with(Signal::SIGKILL);
    nix::sys::signal::kill(Pid::from_raw(daemon_pid), Signal::SIGKILL).unwrap();
    provider.spawn();
    let mut client = provider.client().await;
    let volume = wait_available(&mut client, &id(&volume)).await;
    assert_eq!(export_uri(&volume), uri);
    let deadline = Instant::now() + Duration::from_secs(30);
    let served = || {
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x5a 0 64k", &uri])
            .output()
            .is_ok_and(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed"))
    };
    while !served() {
        assert!(
            Instant::now() < deadline,
            "the export did not come back:\n{}",
            provider.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(has_pattern(&export_uri(&clone), 0x5a));
    assert_eq!(files_containing(dir.path(), &passphrase), Vec::<PathBuf>::new());
    provider.stop_with(Signal::SIGTERM);
}
