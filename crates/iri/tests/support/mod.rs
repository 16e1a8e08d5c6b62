// SPDX-License-Identifier: Apache-2.0
//! What the node tests share: a real `iri up` on a short data directory under /tmp with the
//! test guest in its images, stopped with Ctrl-C, and every process it leaves behind by design
//! (machines' QEMUs, the storage daemon) killed when the test ends, passed or failed.

#![allow(dead_code)]

use std::{
    ffi::OsString,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

/// The repository's top directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The test guest `scripts/test-guest` builds (`target/test-guest`).
pub fn test_guest() -> PathBuf {
    workspace().join("target/test-guest")
}

/// Why a node test cannot run here (a missing program or test guest), if it cannot.
pub fn skip_reason(extra_programs: &[&str]) -> Option<String> {
    let guest = test_guest();
    if !guest.join("vmlinuz").is_file() || !guest.join("initramfs.cpio.gz").is_file() {
        return Some(format!(
            "no test guest in {} (build it with scripts/test-guest)",
            guest.display()
        ));
    }
    let programs = ["qemu-system-x86_64", "qemu-storage-daemon", "qemu-img", "python3"];
    for program in programs.iter().chain(extra_programs) {
        let found = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!("{program} is not installed"));
        }
    }
    None
}

/// PATH with the directory of the cargo that runs the tests in front (the README's commands
/// call `cargo`).
pub fn path_with_cargo() -> OsString {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(cargo) = std::env::var_os("CARGO").map(PathBuf::from)
        && let Some(dir) = cargo.parent()
    {
        dirs.push(dir.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap()
}

/// What a node is started with, besides the test defaults (TCG, free ports).
#[derive(Default)]
pub struct Settings<'a> {
    /// Lines of the `[machine]` table (`{data}` stands for the data directory).
    pub machine: &'a str,
    /// Lines of the `[volume.local]` table (`{data}` too).
    pub volume_local: &'a str,
    /// Extra `iri up` arguments.
    pub args: &'a [&'a str],
    /// Called with the data directory before `iri up` starts.
    pub prepare: Option<&'a dyn Fn(&Path)>,
}

/// A running `iri up`.
pub struct Node {
    _dir: tempfile::TempDir,
    /// The node's data directory.
    pub data: PathBuf,
    config: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    lines: Vec<String>,
}

impl Node {
    /// Starts a node on a fresh data directory `/tmp/<prefix>XXXXXX` (short: a machine's
    /// sockets are at `<data>/machine/machines/<63-character id>/`, and a unix socket path
    /// holds at most 107 bytes), with the test guest in `<data>/images/test-guest`, and waits
    /// until every provider is healthy.
    pub fn start(prefix: &str, settings: &Settings) -> Node {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/tmp")
            .unwrap();
        let data = dir.path().to_path_buf();
        let images = data.join("images/test-guest");
        fs::create_dir_all(&images).unwrap();
        for entry in fs::read_dir(test_guest()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                fs::copy(entry.path(), images.join(entry.file_name())).unwrap();
            }
        }
        // Where /dev/kvm exists but does not work (nested), KVM would hang the guest: TCG.
        // Free ports, so that nodes and other tests on this host do not collide.
        let config = format!(
            "[machine]\npower_off_grace_seconds = 10\n{}\n\
             [machine.qemu]\naccel = [\"tcg\"]\n\
             [machine.exec]\naddress = \"127.0.0.1:0\"\n\
             [volume.local]\n{}\n\
             [bucket.s3]\naddress = \"127.0.0.1:0\"\n",
            settings.machine, settings.volume_local
        )
        .replace("{data}", &data.display().to_string());
        let config_path = data.join("node.toml");
        fs::write(&config_path, config).unwrap();
        if let Some(prepare) = settings.prepare {
            prepare(&data);
        }
        let mut node = Node {
            _dir: dir,
            data,
            config: config_path,
            args: settings.args.iter().map(|a| a.to_string()).collect(),
            child: None,
            lines: Vec::new(),
        };
        node.spawn();
        node
    }

    /// Runs `iri up` and waits for the health screen, then what Ctrl-C will do.
    fn spawn(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_iri"))
            .args(["up", "--data-dir"])
            .arg(&self.data)
            .arg("--config")
            .arg(&self.config)
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let log = self.data.join("iri-up.log");
        std::thread::spawn(move || {
            let mut out = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            let _ = std::io::copy(&mut BufReader::new(stderr), &mut out);
        });
        self.child = Some(child);
        self.lines.clear();
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self.lines.iter().any(|l| l.starts_with("Ctrl-C")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => self.lines.push(line),
                Err(_) => panic!(
                    "iri up did not come up:\n{}\nlog:\n{}",
                    self.lines.join("\n"),
                    self.log()
                ),
            }
        }
        for kind in ["machine", "volume", "bucket"] {
            assert!(
                self.lines
                    .iter()
                    .any(|l| l.starts_with(kind) && l.contains(" ok ")),
                "{kind} not healthy:\n{}",
                self.lines.join("\n")
            );
        }
    }

    /// Ctrl-C, and `iri up` again on the same data directory.
    pub fn restart(&mut self) {
        self.interrupt();
        self.spawn();
    }

    /// The line `iri up` printed about Ctrl-C.
    pub fn notice(&self) -> String {
        self.lines
            .iter()
            .find(|l| l.starts_with("Ctrl-C"))
            .cloned()
            .unwrap_or_default()
    }

    /// What `iri up` logged (warnings and errors).
    pub fn log(&self) -> String {
        fs::read_to_string(self.data.join("iri-up.log")).unwrap_or_default()
    }

    /// The endpoint of one provider.
    pub fn socket(&self, kind: &str) -> PathBuf {
        self.data.join(format!("{kind}.sock"))
    }

    /// Pids of the machines' QEMUs.
    pub fn qemu_pids(&self) -> Vec<i32> {
        pids(&self.data.join("machine/machines"))
    }

    /// Ctrl-C; the node must exit successfully.
    pub fn interrupt(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "iri up exited with {status} after Ctrl-C:\n{}",
            self.log()
        );
    }

    /// Ctrl-C, then the processes that outlive the node by design go too.
    pub fn stop(mut self) {
        self.interrupt();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut leftovers = pids(&self.data.join("machine/machines"));
        leftovers.extend(read_pid(&self.data.join("volume/local/daemon/pid")));
        for pid in leftovers {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Whether a process runs (a zombie waiting for init to reap it does not).
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn pids(machines: &Path) -> Vec<i32> {
    let Ok(entries) = fs::read_dir(machines) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| read_pid(&e.path().join("pid")))
        .collect()
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Clients of a node's providers, over IRI as a poollet talks to them.
pub mod iri {
    use std::{collections::HashMap, path::Path, time::Duration};

    use iri_api::{
        Endpoint, endpoint::clients, machine::v1alpha1 as m, meta::v1alpha1::ObjectMetadata,
        volume::v1alpha1 as v,
    };

    /// A channel to the provider serving `$socket`.
    macro_rules! channel {
        ($socket:expr) => {
            Endpoint::Unix($socket.to_path_buf())
                .connect(Duration::from_secs(5))
                .await
                .unwrap()
        };
    }

    /// Creates an empty volume of `bytes` and waits until it is available; returns it with
    /// its access.
    pub async fn available_volume(socket: &Path, bytes: i64) -> v::Volume {
        let mut client = clients::volume(channel!(socket));
        let created = client
            .create_volume(v::CreateVolumeRequest {
                volume: Some(v::Volume {
                    metadata: Some(ObjectMetadata::default()),
                    spec: Some(v::VolumeSpec {
                        class: "fast".into(),
                        resources: Some(v::VolumeResources { storage_bytes: bytes }),
                        ..Default::default()
                    }),
                    status: None,
                }),
            })
            .await
            .unwrap()
            .into_inner();
        let id = created.volume.unwrap().metadata.unwrap().id;
        for _ in 0..300 {
            let volumes = client
                .list_volumes(v::ListVolumesRequest {
                    filter: Some(v::VolumeFilter {
                        id: id.clone(),
                        ..Default::default()
                    }),
                })
                .await
                .unwrap()
                .into_inner()
                .volumes;
            if let Some(volume) = volumes.into_iter().next()
                && volume
                    .status
                    .as_ref()
                    .is_some_and(|s| s.state == v::VolumeState::VolumeAvailable as i32)
            {
                return volume;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("volume {id} not available within 30 s");
    }

    /// A machine of class `small` booting `image` (a directory), with `connection` attached
    /// as volume `data` if given; returns its id.
    pub async fn create_machine(
        socket: &Path,
        image: &Path,
        connection: Option<m::VolumeConnection>,
    ) -> String {
        let mut volumes = vec![m::Volume {
            name: "boot".into(),
            device: "oda".into(),
            local_disk: Some(m::LocalDisk {
                size_bytes: 0,
                image: Some(m::ImageSpec {
                    image: format!("file://{}", image.display()),
                }),
            }),
            connection: None,
        }];
        if let Some(connection) = connection {
            volumes.push(m::Volume {
                name: "data".into(),
                device: "odb".into(),
                local_disk: None,
                connection: Some(connection),
            });
        }
        let mut client = clients::machine(channel!(socket));
        let created = client
            .create_machine(m::CreateMachineRequest {
                machine: Some(m::Machine {
                    metadata: Some(ObjectMetadata::default()),
                    spec: Some(m::MachineSpec {
                        class: "small".into(),
                        volumes,
                        ..Default::default()
                    }),
                    status: None,
                }),
            })
            .await
            .unwrap()
            .into_inner();
        created.machine.unwrap().metadata.unwrap().id
    }

    /// The connection a machine provider gets for `volume`: its access, with `uri` replaced
    /// where the access names another one (e.g. `tcp_uri` for another host).
    pub fn connection(volume: &v::Volume, uri_attribute: &str) -> m::VolumeConnection {
        let access = volume.status.as_ref().unwrap().access.as_ref().unwrap();
        let mut attributes: HashMap<String, String> = access.attributes.clone().into_iter().collect();
        let uri = attributes
            .get(uri_attribute)
            .unwrap_or_else(|| panic!("the access has no {uri_attribute}: {attributes:?}"))
            .clone();
        attributes.insert("uri".into(), uri);
        m::VolumeConnection {
            driver: access.driver.clone(),
            handle: access.handle.clone(),
            attributes: attributes.into_iter().collect(),
            ..Default::default()
        }
    }
}

/// Waits until the console log of machine `id` of the node in `data` shows `text`; returns
/// the log.
pub fn wait_console(data: &Path, id: &str, text: &str, timeout: Duration) -> String {
    let log = data.join("machine/machines").join(id).join("console.log");
    let deadline = Instant::now() + timeout;
    loop {
        let shown = fs::read_to_string(&log).unwrap_or_default();
        if shown.contains(text) {
            return shown;
        }
        if Instant::now() > deadline {
            let qemu = fs::read_to_string(log.with_file_name("qemu.log")).unwrap_or_default();
            panic!(
                "the console of {id} does not show {text:?} after {timeout:?}:\n{shown}\nqemu.log:\n{qemu}"
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
