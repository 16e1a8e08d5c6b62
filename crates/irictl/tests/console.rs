// SPDX-License-Identifier: Apache-2.0
//! `irictl machine exec` end to end: the real `iri-machine-provider` boots the test guest
//! (`scripts/test-guest`) under QEMU/TCG, and the real irictl binary creates the machine, reads
//! its console, sends a command through a pipe and sees the answer; then an interactive session
//! on a pseudo-terminal is detached with Ctrl-] and leaves the terminal's settings as they were.
//!
//! Needs qemu-system-x86 (TCG is enough) and the `iri-machine-provider` binary next to irictl
//! (built here when missing).

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use iri_api::machine::v1alpha1::MachineState;
use support::{Run, created_id, irictl_raw};

/// A TCG boot of the test guest takes ~5-10 s on an idle machine; CI machines are busy.
const BOOT_TIMEOUT: Duration = Duration::from_secs(40);

/// The provider binary of this build profile (next to irictl), built when missing.
fn provider_binary() -> PathBuf {
    let irictl = PathBuf::from(env!("CARGO_BIN_EXE_irictl"));
    let provider = irictl.with_file_name("iri-machine-provider");
    if !provider.is_file() {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "machine-provider", "--bin", "iri-machine-provider"]);
        if irictl.parent().is_some_and(|d| d.ends_with("release")) {
            build.arg("--release");
        }
        // Cargo releases the target directory's lock before it runs tests, so this does not wait
        // on our own `cargo test`.
        let status = build.status().expect("run cargo build -p machine-provider");
        assert!(status.success(), "cargo build -p machine-provider failed");
    }
    assert!(provider.is_file(), "{} missing", provider.display());
    provider
}

/// The test guest, built into `target/test-guest` (kept when up to date).
fn test_guest() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = repo.join("target/test-guest");
    let status = Command::new(repo.join("scripts/test-guest"))
        .arg(&dir)
        .status()
        .expect("run scripts/test-guest");
    assert!(status.success(), "scripts/test-guest failed");
    dir.canonicalize().expect("test guest directory")
}

/// The provider process; killed, with every QEMU it started, when dropped (even on panic).
struct Provider {
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Provider {
    fn start(dir: &Path, guest: &Path) -> Provider {
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"
image_dirs = ["{}"]
power_off_grace_seconds = 3
resync_seconds = 2
[[classes]]
name = "tiny"
resources = {{ cpu = 1, memory = 134217728 }}
[capacity]
cpu = 2
memory = 1073741824
[reserve]
memory = 0
[exec]
address = "127.0.0.1:0"
[qemu]
accel = ["tcg"]
"#,
                guest.parent().unwrap().display()
            ),
        )
        .unwrap();
        let socket = dir.join("machine.sock");
        let log = dir.join("provider.log");
        let child = Command::new(provider_binary())
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--address")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start iri-machine-provider");
        Provider {
            dir: dir.to_path_buf(),
            socket,
            log,
            child,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `irictl --address <socket> args` with `stdin`.
    async fn irictl(&self, args: &[&str], stdin: Option<&str>) -> Run {
        let address = self.socket.display().to_string();
        let mut all = vec!["--address", address.as_str()];
        all.extend_from_slice(args);
        irictl_raw(&all, stdin, &[]).await
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Machines outlive the provider by design; this test's machines go with the test.
        for pid in qemus_under(&self.dir) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Live QEMU processes whose command line mentions `dir`.
fn qemus_under(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            cmdline.starts_with(b"qemu") && String::from_utf8_lossy(&cmdline).contains(&needle) && !zombie
        })
        .collect()
}

/// Polls `check` every 200 ms until it returns `Some`, failing after `timeout` with `what`.
async fn eventually<T, F: Future<Output = Result<T, String>>>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_console_talks_to_the_guest() {
    let started = Instant::now();
    let guest = test_guest();
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = Provider::start(dir.path(), &guest);
    eventually("the provider to serve", Duration::from_secs(30), || async {
        let run = provider.irictl(&["machine", "get", "version"], None).await;
        if run.code == Some(0) {
            Ok(())
        } else {
            Err(format!("{run:?}\n{}", provider.logs()))
        }
    })
    .await;

    let spec = serde_json::json!({
        "metadata": {"labels": {"test": "irictl-console"}},
        "spec": {
            "power": "POWER_ON",
            "class": "tiny",
            "volumes": [{
                "name": "root",
                "device": "oda",
                "local_disk": {"image": {"image": format!("file://{}", guest.display())}},
            }],
        },
    });
    let file = dir.path().join("machine.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    let created = provider
        .irictl(
            &["machine", "create", "machine", "-f", file.to_str().unwrap()],
            None,
        )
        .await
        .ok();
    let id = created_id(&created, "machine");

    let running = MachineState::MachineRunning as i64;
    eventually("MACHINE_RUNNING", BOOT_TIMEOUT, || async {
        let machine = provider
            .irictl(&["machine", "get", "machine", &id, "-o", "json"], None)
            .await
            .json();
        // One id: a single object.
        if machine["status"]["state"] == serde_json::json!(running) {
            Ok(())
        } else {
            Err(machine.to_string())
        }
    })
    .await;

    // --print-url keeps the old behaviour.
    let url = provider
        .irictl(&["machine", "exec", &id, "--print-url"], None)
        .await
        .ok();
    assert!(url.starts_with("http://") && url.ends_with('\n'), "{url:?}");

    // No input (stdin is /dev/null): the session shows the console's recent output, which
    // says once the guest is up, then ends after --wait.
    eventually("the guest's marker on the console", BOOT_TIMEOUT, || async {
        let run = provider
            .irictl(&["machine", "exec", &id, "--wait", "1s"], None)
            .await;
        if run.code == Some(0) && run.stdout.contains("IRI-TEST-GUEST READY") {
            Ok(())
        } else {
            Err(format!("{run:?}"))
        }
    })
    .await;

    // A command through a pipe reaches the guest's shell: the answer is there, not just the
    // echo of the question (which says `$((6*7))`). Retried: the shell may start a moment after
    // the marker.
    eventually(
        "hello-42 from the guest's shell",
        Duration::from_secs(30),
        || async {
            let run = provider
                .irictl(
                    &["machine", "exec", &id, "--wait", "3s"],
                    Some("echo hello-$((6*7))\n"),
                )
                .await;
            if run.code == Some(0) && run.stdout.contains("hello-42") {
                // Not interactive: no hint, no raw mode, nothing on stderr.
                assert!(run.stderr.is_empty(), "{run:?}");
                Ok(())
            } else {
                Err(format!("{run:?}"))
            }
        },
    )
    .await;

    interactive_session_detaches_and_restores_the_terminal(&provider, &id).await;

    let deleted = provider
        .irictl(&["machine", "delete", "machine", &id], None)
        .await
        .ok();
    assert_eq!(deleted, format!("Machine {id} deleted\n"));
    // An exec of a machine that is gone is a one-line error.
    eventually("the machine to be gone", Duration::from_secs(30), || async {
        let run = provider.irictl(&["machine", "exec", &id], None).await;
        if run.code == Some(1) && run.stderr.contains("NotFound") {
            Ok(())
        } else {
            Err(format!("{run:?}"))
        }
    })
    .await;
    println!("exec end to end took {:?}", started.elapsed());
}

/// irictl on a pseudo-terminal: raw mode while attached, the hint on stderr, input reaches the
/// guest, Ctrl-] detaches, SIGTERM ends it, and the terminal's settings are restored after both.
async fn interactive_session_detaches_and_restores_the_terminal(provider: &Provider, id: &str) {
    use std::{io::Read, io::Write, os::fd::AsFd};

    use nix::sys::termios::{LocalFlags, tcgetattr};

    let pty = nix::pty::openpty(None, None).expect("openpty");
    let before = tcgetattr(pty.slave.as_fd()).unwrap();
    assert!(before.local_flags.contains(LocalFlags::ICANON | LocalFlags::ECHO));
    let slave = std::fs::File::from(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let mut child = Command::new(env!("CARGO_BIN_EXE_irictl"))
        .arg("--address")
        .arg(&provider.socket)
        .args(["machine", "exec", id])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap())
        .spawn()
        .expect("spawn irictl");

    // Everything irictl writes to the terminal, read on a thread (the master blocks).
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buffer) {
            if n == 0 || tx.send(buffer[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut screen = String::new();
    let wait_for = |needle: &str, screen: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !screen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(bytes) => screen.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => panic!("no {needle:?} on the terminal; got:\n{screen}"),
            }
        }
    };
    wait_for("(escape character is '^]')", &mut screen);
    // Raw mode: no echo, no line editing by the local terminal.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcgetattr(slave.as_fd())
        .unwrap()
        .local_flags
        .contains(LocalFlags::ICANON)
    {
        assert!(
            Instant::now() < deadline,
            "irictl did not put the terminal in raw mode"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut answered = false;
    for _ in 0..10 {
        master.write_all(b"echo tty-$((7*6))\r").unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !screen.contains("tty-42") {
            if let Ok(bytes) = rx.recv_timeout(Duration::from_millis(200)) {
                screen.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        if screen.contains("tty-42") {
            answered = true;
            break;
        }
    }
    assert!(answered, "the guest never answered on the terminal:\n{screen}");
    // Ctrl-] detaches.
    master.write_all(&[0x1d]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("irictl did not detach on Ctrl-]:\n{screen}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    wait_for(&format!("Detached from machine {id}."), &mut screen);
    assert!(status.success(), "{status:?}:\n{screen}");
    let after = tcgetattr(slave.as_fd()).unwrap();
    assert_eq!(after.local_flags, before.local_flags, "terminal not restored");
    assert_eq!(after.input_flags, before.input_flags, "terminal not restored");
    assert_eq!(after.output_flags, before.output_flags, "terminal not restored");

    // SIGTERM while attached: exit 1 with one error line, terminal restored as well.
    let mut child = Command::new(env!("CARGO_BIN_EXE_irictl"))
        .arg("--address")
        .arg(&provider.socket)
        .args(["machine", "exec", id])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap())
        .spawn()
        .expect("spawn irictl");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcgetattr(slave.as_fd())
        .unwrap()
        .local_flags
        .contains(LocalFlags::ICANON)
    {
        assert!(
            Instant::now() < deadline,
            "irictl did not put the terminal in raw mode"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("irictl did not end on SIGTERM:\n{screen}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1), "{status:?}");
    wait_for("interrupted by SIGTERM", &mut screen);
    let after = tcgetattr(slave.as_fd()).unwrap();
    assert_eq!(
        after.local_flags, before.local_flags,
        "terminal not restored after SIGTERM"
    );
    assert_eq!(
        after.input_flags, before.input_flags,
        "terminal not restored after SIGTERM"
    );
}
