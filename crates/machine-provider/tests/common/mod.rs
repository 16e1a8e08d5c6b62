// SPDX-License-Identifier: Apache-2.0
//! What the integration tests share: the test guest, a provider process on a temp dir, gRPC
//! and exec clients, and cleanup of every QEMU a test started.

#![allow(dead_code)]

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use futures::{SinkExt, StreamExt};
use iri_api::{
    Endpoint,
    machine::v1alpha1::{
        ExecRequest, ImageSpec, ListMachinesRequest, LocalDisk, Machine, MachineFilter, VersionRequest,
        Volume, machine_runtime_client::MachineRuntimeClient,
    },
};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
use tonic::transport::Channel;

/// The test guest (`scripts/test-guest`), built into `target/test-guest` on first use.
pub fn test_guest() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = built.as_ref() {
        return dir.clone();
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = repo.join("target/test-guest");
    let status = Command::new(repo.join("scripts/test-guest"))
        .arg(&dir)
        .status()
        .expect("run scripts/test-guest");
    assert!(status.success(), "scripts/test-guest failed");
    let dir = dir.canonicalize().expect("test guest directory");
    *built = Some(dir.clone());
    dir
}

/// A provider configuration with one class, `tiny` (1 cpu, 256 MiB), a host of `cpus` cpus
/// and 1 GiB, QEMU on TCG and Exec on a free port; `top` (top-level settings, or a table)
/// comes after the first setting.
pub fn tiny_config(top: &str, cpus: i64) -> String {
    format!(
        r#"resync_seconds = 2
{top}
[[classes]]
name = "tiny"
resources = {{ cpu = 1, memory = 268435456 }}
[capacity]
cpu = {cpus}
memory = 1073741824
[reserve]
memory = 0
[exec]
address = "127.0.0.1:0"
[qemu]
# /dev/kvm may exist without working (nested virtualization): TCG is what CI has.
accel = ["tcg"]
"#
    )
}

/// The boot volume `root` (device `oda`) with `image`, of `size_bytes` (0: the image only).
pub fn boot_volume(image: String, size_bytes: i64) -> Volume {
    Volume {
        name: "root".into(),
        device: "oda".into(),
        local_disk: Some(LocalDisk {
            size_bytes,
            image: Some(ImageSpec { image }),
        }),
        connection: None,
    }
}

/// The state of volume `name` in the machine's status, if listed.
pub fn volume_state(machine: Option<&Machine>, name: &str) -> Option<i32> {
    machine?
        .status
        .as_ref()?
        .volumes
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.state)
}

/// Runs iri-report in the guest until a report satisfies `done` (hot-plug takes the guest a
/// moment); returns the output position after it.
pub async fn report_until(session: &mut ExecSession, mut from: usize, done: impl Fn(&str) -> bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        session.send("iri-report\n").await;
        let begin = session
            .read_until("IRI-REPORT BEGIN", from, Duration::from_secs(30))
            .await;
        let end = session
            .read_until("IRI-REPORT END", begin, Duration::from_secs(30))
            .await;
        let report = session.output[begin..end].to_string();
        from = end;
        if done(&report) {
            return end;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never reported what was expected:\n{report}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A provider process on `dir`.
pub struct Provider {
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Provider {
    /// Writes `config` (TOML, without the data dir and address, which come as flags) and
    /// starts the provider.
    pub async fn start(dir: &Path, config: &str) -> Provider {
        Provider::start_on(dir, dir.join("data"), config).await
    }

    /// [`Provider::start`] with the data directory elsewhere (the socket, config and log stay
    /// in `dir`).
    pub async fn start_on(dir: &Path, data_dir: PathBuf, config: &str) -> Provider {
        let path = dir.join("config.toml");
        std::fs::write(&path, config).expect("write config");
        let mut provider = Provider {
            dir: dir.to_path_buf(),
            data_dir,
            socket: dir.join("machine.sock"),
            config: path,
            log: dir.join("provider.log"),
            child: None,
        };
        provider.spawn().await;
        provider
    }

    /// Starts the provider process and waits until it serves.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_iri-machine-provider"))
            .arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--address")
            .arg(&self.socket)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start iri-machine-provider");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("provider exited with {status}:\n{}", self.logs());
            }
            if let Ok(mut client) = self.try_client().await
                && client.version(VersionRequest::default()).await.is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "provider not serving:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn try_client(&self) -> Result<MachineRuntimeClient<Channel>, String> {
        let channel = Endpoint::Unix(self.socket.clone())
            .connect(Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())?;
        Ok(iri_api::endpoint::clients::machine(channel))
    }

    /// A client.
    pub async fn client(&self) -> MachineRuntimeClient<Channel> {
        self.try_client().await.expect("connect to the provider")
    }

    /// The endpoint.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }

    /// The provider's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// The directory of machine `id`.
    pub fn machine_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("machines").join(id)
    }

    /// The pid in machine `id`'s pid file.
    pub fn qemu_pid(&self, id: &str) -> Option<i32> {
        std::fs::read_to_string(self.machine_dir(id).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.kill();
        // Machines outlive the provider by design; the test's machines go with the test.
        kill_qemus_under(&self.dir);
    }
}

/// Kills every QEMU whose command line mentions `dir`.
pub fn kill_qemus_under(dir: &Path) {
    for pid in qemus_under(dir) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Live processes whose command line mentions `dir`.
pub fn qemus_under(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle) && c.starts_with(b"qemu"))
                && is_alive(*pid)
        })
        .collect()
}

/// Whether any thread of `pid` is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    threads.filter_map(Result::ok).any(|thread| {
        std::fs::read_to_string(thread.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
    })
}

/// The machine `id` as listed, if it is.
pub async fn get(client: &mut MachineRuntimeClient<Channel>, id: &str) -> Option<Machine> {
    client
        .list_machines(ListMachinesRequest {
            filter: Some(MachineFilter {
                id: id.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListMachines")
        .into_inner()
        .machines
        .into_iter()
        .next()
}

/// The machine's state.
pub fn state(machine: &Machine) -> i32 {
    machine.status.as_ref().map_or(0, |s| s.state)
}

/// Waits up to `timeout` for `done` on machine `id`.
pub async fn wait_for(
    client: &mut MachineRuntimeClient<Channel>,
    id: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(Option<&Machine>) -> bool,
) -> Option<Machine> {
    let deadline = Instant::now() + timeout;
    loop {
        let machine = get(client, id).await;
        if done(machine.as_ref()) {
            return machine;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {machine:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An exec session on the console.
pub struct ExecSession {
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    /// Everything read on stdout so far.
    pub output: String,
}

/// Opens `url` as the machinepoollet would proxy it: WebSocket, v4.channel.k8s.io.
pub async fn open_exec(url: &str) -> Result<ExecSession, tungstenite::Error> {
    let mut request = url.replace("http://", "ws://").into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "v4.channel.k8s.io, channel.k8s.io".parse().unwrap(),
    );
    let (socket, response) = tokio_tungstenite::connect_async(request).await?;
    assert_eq!(
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some("v4.channel.k8s.io")
    );
    Ok(ExecSession {
        socket,
        output: String::new(),
    })
}

/// Calls Exec for `id` and opens the URL.
pub async fn exec(client: &mut MachineRuntimeClient<Channel>, id: &str) -> (String, ExecSession) {
    let url = client
        .exec(ExecRequest {
            machine_id: id.into(),
        })
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let session = open_exec(&url).await.expect("open the exec URL");
    (url, session)
}

impl ExecSession {
    /// Reads stdout until it contains `needle` (after `from` bytes of output), or fails after
    /// `timeout`. Returns the output position after the match.
    pub async fn read_until(&mut self, needle: &str, from: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(at) = self.output.get(from..).and_then(|rest| rest.find(needle)) {
                return from + at + needle.len();
            }
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no {needle:?} on the console within {timeout:?}; got:\n{}",
                        self.output
                    )
                });
            match message {
                Some(Ok(tungstenite::Message::Binary(data))) => {
                    if let Some((&1, rest)) = data.split_first() {
                        self.output.push_str(&String::from_utf8_lossy(rest));
                    }
                }
                Some(Ok(_)) => {}
                other => panic!(
                    "exec session ended ({other:?}) before {needle:?}; got:\n{}",
                    self.output
                ),
            }
        }
    }

    /// Sends `text` on stdin.
    pub async fn send(&mut self, text: &str) {
        let mut frame = vec![0u8];
        frame.extend_from_slice(text.as_bytes());
        self.socket
            .send(tungstenite::Message::Binary(frame.into()))
            .await
            .expect("send stdin");
    }

    /// Closes the session.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// sha256 of `data` in hex (with the host's sha256sum, to stay independent of our code).
pub fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A file for logs.
pub fn create(path: &Path) -> File {
    File::create(path).expect("create file")
}
