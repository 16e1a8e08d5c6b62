// SPDX-License-Identifier: Apache-2.0
//! The qemu-storage-daemon process: adopted when one is already serving the data directory,
//! started otherwise, and stopped on request.
//!
//! The daemon runs in its own process group and is never killed when the provider exits: the
//! volumes stay served while the provider restarts, and the next provider adopts the daemon
//! through its pid file and QMP socket. Its stdout and stderr go to `daemon/log`. QEMU keeps
//! the pid file locked while it runs, so two daemons can never serve one directory.
//!
//! A daemon that was killed (by a crash of the host's processes, by us, by an operator) is not
//! gone when the signal is sent: its threads exit one by one, and on a loaded machine that takes
//! a while. Its command line reads empty as soon as its memory is released, and its main thread
//! shows as a zombie while other threads still hold its files, but its pid file stays locked and
//! its images stay open until the last thread is through. A new daemon started in that window
//! cannot lock the pid file and exits, so before starting one we wait until every daemon of the
//! directory has exited for good: no thread of it is left and nobody holds the pid file lock.

use std::{
    collections::BTreeSet,
    fs::{self, OpenOptions},
    io::{self, Read, Seek, SeekFrom},
    os::unix::fs::OpenOptionsExt,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use nix::{
    fcntl::{FcntlArg, fcntl},
    libc,
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use qmp::Qmp;
use serde_json::{Value, json};

use super::layout::Layout;
use crate::backend::{BackendError, BackendResult};

/// How long a QMP connect (including the greeting) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a fresh daemon may take to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a daemon may take to exit after `quit` or SIGKILL (all its threads, and so release
/// its pid file lock, sockets and images).
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`start_or_adopt`] keeps retrying when the daemon it starts finds the pid file
/// locked by another one (which it then adopts, or waits for).
const START_RETRY_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause between two looks at a daemon that is exiting.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The log is moved to `log.1` at start when it grew beyond this.
const MAX_LOG_BYTES: u64 = 4 << 20;

/// A running storage daemon and our QMP connection to it.
#[derive(Debug, Clone)]
pub(super) struct Daemon {
    /// The connection. The QMP socket accepts one client: this is the only way in.
    pub qmp: Qmp,
    /// The daemon's pid.
    pub pid: i32,
}

/// Whether [`start_or_adopt`] found a daemon or started one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// A live daemon serving this directory was adopted.
    Adopted,
    /// A new daemon was started.
    Started,
}

/// Connects to the daemon serving `layout`, starting one if none is alive. The daemon's NBD
/// server runs when this returns.
///
/// The caller holds the directory lock, so no other provider starts daemons here; but daemons of
/// a provider that crashed may still be starting or exiting, and are adopted or waited for.
pub(super) async fn start_or_adopt(layout: &Layout, program: &Path) -> BackendResult<(Daemon, Origin)> {
    let deadline = Instant::now() + START_RETRY_TIMEOUT;
    let mut pause = Duration::from_millis(100);
    loop {
        let mut unusable = None;
        if let Some(pid) = adoptable(layout) {
            match connect(&layout.qmp_socket()).await {
                Ok(qmp) => {
                    let daemon = Daemon { qmp, pid };
                    start_nbd_server(&daemon.qmp, layout).await?;
                    tracing::info!(pid, "adopted the running storage daemon");
                    return Ok((daemon, Origin::Adopted));
                }
                Err(err) => {
                    // Alive but not answering: hung, exiting, or its monitor is wedged. The
                    // directory lock guarantees no other provider holds the connection, so it is
                    // of no use; make_way waits until it is gone.
                    tracing::warn!(pid, %err, "the storage daemon does not answer on QMP: killing it");
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    unusable = Some(pid);
                }
            }
        }
        make_way(layout, unusable).await?;
        let daemon = match spawn(layout, program).await {
            Ok(daemon) => daemon,
            // Another daemon took the pid file between make_way and the start (one a crashed
            // provider had just started): adopt it, or wait for it, on the next round.
            Err(SpawnError::PidFileTaken(reason)) if Instant::now() + pause < deadline => {
                tracing::warn!(%reason, retry_in = ?pause, "the pid file is taken: retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(SpawnError::PidFileTaken(reason)) => {
                return Err(BackendError::Transient(format!(
                    "cannot start the storage daemon: {reason} (still after {START_RETRY_TIMEOUT:?})"
                )));
            }
            Err(SpawnError::Failed(err)) => return Err(err),
        };
        if let Err(err) = start_nbd_server(&daemon.qmp, layout).await {
            kill_and_wait(daemon.pid).await;
            return Err(err);
        }
        tracing::info!(pid = daemon.pid, "started the storage daemon");
        return Ok((daemon, Origin::Started));
    }
}

/// The live daemon of this directory to adopt, if any: the holder of the pid file lock (QEMU
/// takes it before it writes its pid), else the pid the file names, when its command line says
/// it is a daemon of this directory.
fn adoptable(layout: &Layout) -> Option<i32> {
    match pid_file_holder(layout) {
        Ok(Some(pid)) if is_ours(pid, layout) => Some(pid),
        // Held by a daemon that is exiting (its command line is gone already), or by a
        // stranger: nothing to adopt; make_way waits for it.
        Ok(Some(_)) => None,
        // Unlocked (or a file system that does not tell): the pid file decides.
        Ok(None) => read_pid(layout).filter(|&pid| is_ours(pid, layout)),
        Err(err) => {
            tracing::warn!(%err, "cannot test the lock of the storage daemon's pid file");
            read_pid(layout).filter(|&pid| is_ours(pid, layout))
        }
    }
}

/// Clears the way for a new daemon: kills every daemon of this directory that is still running
/// (none of them could be adopted; `killed` is one that was killed already), and waits until
/// every one has exited for good and nobody holds the pid file lock. A daemon killed a moment
/// ago keeps that lock, its sockets and its images until its last thread has exited; a daemon
/// started before would fail.
async fn make_way(layout: &Layout, killed: Option<i32>) -> BackendResult<()> {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let mut killed: BTreeSet<i32> = killed.into_iter().collect();
    loop {
        // Daemons with their command line: a leftover of a crashed provider (one that crashed
        // while starting it, before it could lock the pid file), or one that did not answer.
        for pid in daemons_of(layout) {
            if killed.insert(pid) {
                tracing::warn!(
                    pid,
                    "killing a storage daemon of this directory that cannot be adopted"
                );
            }
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // Those, and the daemon the pid file names, until their last thread has exited (their
        // command line is empty by then, so the scan above no longer finds them).
        let mut waiting: BTreeSet<i32> = killed
            .iter()
            .copied()
            .filter(|&pid| is_exiting_or_ours(pid, layout))
            .collect();
        if let Some(pid) = read_pid(layout).filter(|&pid| is_exiting_or_ours(pid, layout)) {
            waiting.insert(pid);
        }
        let holder = match pid_file_holder(layout) {
            Ok(holder) => holder,
            Err(err) => {
                tracing::warn!(%err, "cannot test the lock of the storage daemon's pid file");
                None
            }
        };
        if waiting.is_empty() && holder.is_none() {
            if !killed.is_empty() {
                tracing::info!(pids = ?killed, "the old storage daemons are gone");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let reason = match holder {
                Some(pid) => format!(
                    "{} is still locked by process {pid} ({})",
                    layout.pid_file().display(),
                    describe(pid)
                ),
                None => format!("storage daemon processes {waiting:?} have not exited"),
            };
            return Err(BackendError::Transient(format!(
                "cannot start the storage daemon: {reason} after {EXIT_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Stops the daemon serving `layout` (`daemon` if connected, else whatever live daemon the pid
/// file names): `quit`, then SIGKILL if it does not exit in time.
pub(super) async fn stop(daemon: Option<Daemon>, layout: &Layout) {
    let pid = daemon
        .as_ref()
        .map(|d| d.pid)
        .or_else(|| read_pid(layout).filter(|&pid| is_ours(pid, layout)));
    if let Some(daemon) = &daemon {
        // The answer may or may not arrive before the socket closes.
        let _ = daemon.qmp.execute_value("quit", Value::Null).await;
    }
    if let Some(pid) = pid
        && !wait_gone(pid, EXIT_TIMEOUT).await
    {
        tracing::warn!(pid, "the storage daemon did not quit: killing it");
        kill_and_wait(pid).await;
    }
    for path in [layout.qmp_socket(), layout.nbd_socket()] {
        let _ = fs::remove_file(path);
    }
}

/// Kills a daemon that stopped answering QMP (it is ours: it was connected as this
/// directory's daemon); the supervisor then starts a new one.
pub(super) async fn kill_hung(daemon: &Daemon, layout: &Layout) {
    if is_ours(daemon.pid, layout) {
        kill_and_wait(daemon.pid).await;
    }
}

/// The pid in the daemon's pid file, if any.
pub(super) fn read_pid(layout: &Layout) -> Option<i32> {
    fs::read_to_string(layout.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&pid: &i32| pid > 0)
}

/// Whether `pid` is a live storage daemon of this directory (by its command line; not a zombie,
/// not a reused pid).
fn is_ours(pid: i32, layout: &Layout) -> bool {
    cmdline(pid).is_some_and(|args| is_daemon_cmdline(&args, layout)) && is_alive(pid)
}

/// Whether `pid` is a storage daemon of this directory, or a process that is exiting (its command
/// line is gone) and may be one.
fn is_exiting_or_ours(pid: i32, layout: &Layout) -> bool {
    match cmdline(pid) {
        Some(args) => (args.is_empty() || is_daemon_cmdline(&args, layout)) && is_alive(pid),
        None => false,
    }
}

/// Whether `args` are those of a storage daemon of this directory (its QMP socket is ours).
fn is_daemon_cmdline(args: &[String], layout: &Layout) -> bool {
    args.contains(&qmp_chardev(layout))
}

/// The arguments of `pid` (empty once an exiting process has released its memory); `None` when
/// there is no such process.
fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect(),
    )
}

/// Live processes whose command line makes them storage daemons of this directory.
fn daemons_of(layout: &Layout) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| is_ours(pid, layout))
        .collect()
}

/// For error messages: what process `pid` is.
fn describe(pid: i32) -> String {
    match cmdline(pid) {
        None => "gone".into(),
        Some(args) if args.is_empty() => "exiting".into(),
        Some(args) => args.join(" "),
    }
}

/// Whether any thread of `pid` has not exited yet. The main thread of a killed process turns
/// zombie while its other threads may still be closing the files (the pid file lock among
/// them): the process is gone only when every thread is.
fn is_alive(pid: i32) -> bool {
    let Ok(threads) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    threads.filter_map(Result::ok).any(|thread| {
        match fs::read_to_string(thread.path().join("stat")) {
            // The state follows the parenthesized command name, which may itself contain ')'.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    })
}

/// The process that holds the lock QEMU takes on its pid file (`fcntl(F_SETLK)`, for as long
/// as the daemon runs; the kernel releases it when the daemon's last thread closes its files).
/// `None` when the file is missing or unlocked, or the lock has no process (an open file
/// description lock).
fn pid_file_holder(layout: &Layout) -> io::Result<Option<i32>> {
    // Opening and closing the file takes nothing from the holder: POSIX locks belong to a
    // process, and this process never locks the pid file.
    let file = match OpenOptions::new().read(true).write(true).open(layout.pid_file()) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(&file, FcntlArg::F_GETLK(&mut lock)).map_err(io::Error::from)?;
    Ok((lock.l_type != libc::F_UNLCK as libc::c_short && lock.l_pid > 0).then_some(lock.l_pid))
}

async fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while is_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    true
}

async fn kill_and_wait(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    if !wait_gone(pid, EXIT_TIMEOUT).await {
        tracing::error!(pid, "the storage daemon survived SIGKILL");
    }
}

async fn connect(socket: &Path) -> Result<Qmp, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, Qmp::connect(socket)).await {
        Ok(Ok(qmp)) => Ok(qmp),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!(
            "{}: no QMP greeting within {CONNECT_TIMEOUT:?}",
            socket.display()
        )),
    }
}

/// QEMU option values escape a comma by doubling it.
fn chardev_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The `--chardev` argument of the QMP socket: it names the directory a daemon serves.
fn qmp_chardev(layout: &Layout) -> String {
    format!(
        "socket,id=qmp0,path={},server=on,wait=off",
        chardev_path(&layout.qmp_socket())
    )
}

/// Why [`spawn`] failed.
enum SpawnError {
    /// The new daemon found the pid file locked by another one, and exited.
    PidFileTaken(String),
    /// Anything else.
    Failed(BackendError),
}

impl From<BackendError> for SpawnError {
    fn from(err: BackendError) -> Self {
        SpawnError::Failed(err)
    }
}

/// Starts a daemon and connects to it. The caller has made sure no other daemon of the
/// directory is alive ([`make_way`]).
async fn spawn(layout: &Layout, program: &Path) -> Result<Daemon, SpawnError> {
    let transient = |what: &str, e: io::Error| BackendError::Transient(format!("{what}: {e}"));
    // The old daemon is dead: its sockets are stale.
    for path in [layout.qmp_socket(), layout.nbd_socket()] {
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(transient("removing a stale socket", e).into());
            }
            _ => {}
        }
    }
    let log_path = layout.log_file();
    if fs::metadata(&log_path).is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
        let _ = fs::rename(&log_path, log_path.with_extension("1"));
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|e| transient("opening the storage daemon log", e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| transient("opening the storage daemon log", e))?;
    let mut command = tokio::process::Command::new(program);
    command
        .arg("--chardev")
        .arg(qmp_chardev(layout))
        .args(["--monitor", "chardev=qmp0", "--pidfile"])
        .arg(layout.pid_file())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a Ctrl-C or a group kill aimed at the provider must not take
        // the volumes down with it.
        .process_group(0)
        .kill_on_drop(false);
    let mut child = command.spawn().map_err(|e| {
        let reason = format!("starting {}: {e}", program.display());
        if e.kind() == io::ErrorKind::NotFound {
            BackendError::Permanent(reason)
        } else {
            BackendError::Transient(reason)
        }
    })?;
    let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return Err(BackendError::Transient("the storage daemon exited at once".into()).into());
    };
    let socket = layout.qmp_socket();
    let deadline = Instant::now() + START_TIMEOUT;
    let qmp = loop {
        if let Ok(Some(status)) = child.try_wait() {
            let reason = format!(
                "the storage daemon exited at start ({status}): {}",
                log_tail(&log_path)
            );
            let holder = pid_file_holder(layout).ok().flatten();
            return Err(if holder.is_some() || reason.contains("Cannot lock pid file") {
                SpawnError::PidFileTaken(match holder {
                    Some(holder) => format!("{reason} (held by process {holder}: {})", describe(holder)),
                    None => reason,
                })
            } else {
                SpawnError::Failed(BackendError::Transient(reason))
            });
        }
        if socket.exists() {
            match connect(&socket).await {
                Ok(qmp) => break qmp,
                Err(err) if Instant::now() > deadline => {
                    kill_and_wait(pid).await;
                    return Err(BackendError::Transient(format!(
                        "the storage daemon does not answer: {err}"
                    ))
                    .into());
                }
                Err(_) => {}
            }
        } else if Instant::now() > deadline {
            kill_and_wait(pid).await;
            return Err(BackendError::Transient(format!(
                "the storage daemon did not open {} in {START_TIMEOUT:?}: {}",
                socket.display(),
                log_tail(&log_path)
            ))
            .into());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    // Reaps the daemon when it exits (a zombie would look alive to nobody, but it would leak a
    // process slot) and says so in the log.
    tokio::spawn(async move {
        match child.wait().await {
            Ok(status) => tracing::info!(pid, %status, "the storage daemon exited"),
            Err(err) => tracing::warn!(pid, %err, "waiting for the storage daemon"),
        }
    });
    Ok(Daemon { qmp, pid })
}

async fn start_nbd_server(qmp: &Qmp, layout: &Layout) -> BackendResult<()> {
    let arguments = json!({
        // nbd-server-start still takes the legacy address form, with a "data" wrapper.
        "addr": {"type": "unix", "data": {"path": layout.nbd_socket().display().to_string()}},
    });
    match qmp.execute_value("nbd-server-start", arguments).await {
        Ok(_) => Ok(()),
        // An adopted daemon has one already.
        Err(qmp::Error::Command { desc, .. }) if desc.contains("already running") => Ok(()),
        Err(err) => Err(BackendError::Transient(format!("starting the NBD server: {err}"))),
    }
}

/// The end of the daemon log, for error messages.
fn log_tail(path: &Path) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(1024)));
    let mut tail = Vec::new();
    let _ = file.read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).trim().to_string()
}
