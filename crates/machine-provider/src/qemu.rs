// SPDX-License-Identifier: Apache-2.0
//! QEMU processes: one per running machine, in its own directory, started so that it outlives
//! the provider, and adopted again by the next provider through its pid file and QMP socket.
//!
//! # Layout
//!
//! `<data>/machines/<id>/` (0700; `<id>` is a server-made id, never client text):
//!
//! | file | what |
//! |---|---|
//! | `pid` | QEMU's pid file (QEMU locks it while it runs) |
//! | `qmp.sock` | the QMP monitor (0600 by the directory; one client at a time: the provider) |
//! | `console.sock` | the serial console (ttyS0) as a socket server; the provider is its client |
//! | `console.log`, `console.log.1` | what the console printed, appended, size-capped |
//! | `qemu.log` | QEMU's own messages at start |
//! | `ignition` | `spec.ignition_data` (0600), passed as fw_cfg `opt/com.coreos/config` |
//! | `efivars.fd` | the UEFI variable store of a machine that boots from disk (firmware) |
//! | `ceph.conf`, `secret-<id>` | librados timeouts and the cephx keys/passphrases (0600) of `ceph` volumes |
//! | `disk-<hex of the volume name>.qcow2` | a `local_disk` volume (sparse) |
//!
//! QEMU binds its sockets by names relative to the machine directory (it starts there), and
//! the provider connects through `/proc/self/fd/<dir>/…` when the full path is too long: a unix
//! socket path holds at most 107 bytes, and `<data>/machines/<63-character id>/console.sock`
//! would otherwise bound the data directory to about 20 bytes.
//!
//! QEMU is started with `-daemonize`: it forks, the child calls `setsid`, and the parent exits
//! once the machine is set up (or failed to be, with the reason in `qemu.log`). The machine's
//! process is then nobody's child: not reaped by, and not killed with, the provider.

use std::{
    ffi::OsString,
    fs::{self, OpenOptions},
    io::{self, Read, Seek, SeekFrom},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use qmp::Qmp;
use serde_json::Value;

use crate::{config::QemuSettings, server::KernelImage};

/// How long a QMP connect (including the greeting) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long QEMU may take to set a machine up (the `-daemonize` parent exits then).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long QEMU may take to exit after `quit` or SIGKILL.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause between two looks at a process that is exiting.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// `qemu.log` is moved to `qemu.log.1` at start when it grew beyond this.
const MAX_QEMU_LOG_BYTES: u64 = 256 << 10;

/// The least memory a machine booting with UEFI firmware gets started with.
pub const MIN_UEFI_MEMORY_BYTES: i64 = 192 << 20;
/// The QMP socket's name in the machine directory.
const QMP_SOCKET: &str = "qmp.sock";
/// The console socket's name in the machine directory.
const CONSOLE_SOCKET: &str = "console.sock";
/// The longest path a unix socket address can hold (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A unix socket path that can be connected to whatever its length: the path itself when it
/// fits in a socket address, else `/proc/self/fd/<n>/<name>` through an open handle of its
/// directory (held as long as this value lives).
#[derive(Debug)]
pub struct SocketPath {
    path: PathBuf,
    _dir: Option<fs::File>,
}

impl SocketPath {
    /// The connectable form of `path`.
    pub fn new(path: &Path) -> io::Result<SocketPath> {
        if path.as_os_str().len() <= MAX_SOCKET_PATH {
            return Ok(SocketPath {
                path: path.to_path_buf(),
                _dir: None,
            });
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a socket path"));
        };
        // O_PATH: a handle for path resolution only, no read access needed.
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc_o_path())
            .open(parent)?;
        let path = Path::new("/proc/self/fd")
            .join(std::os::fd::AsRawFd::as_raw_fd(&dir).to_string())
            .join(name);
        Ok(SocketPath {
            path,
            _dir: Some(dir),
        })
    }

    /// The path to connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `O_PATH | O_DIRECTORY`.
fn libc_o_path() -> i32 {
    (nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY).bits()
}

/// The files of one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineDir {
    dir: PathBuf,
}

impl MachineDir {
    /// The directory of machine `id` under `root` (`<data>/machines`). `id` must be a
    /// server-made id (checked by the caller with `iri_runtime::id::is_valid_id`).
    pub fn new(root: &Path, id: &str) -> Self {
        MachineDir { dir: root.join(id) }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// QEMU's pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join(QMP_SOCKET)
    }

    /// The serial console socket.
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join(CONSOLE_SOCKET)
    }

    /// The console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// QEMU's own log.
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    /// The file of QEMU secret object `id` (0600; base64 of the secret).
    pub fn secret(&self, id: &str) -> PathBuf {
        self.dir.join(format!("secret-{id}"))
    }

    /// The `ceph.conf` of the machine's `ceph` volumes.
    pub fn ceph_conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    /// The machine's UEFI variable store (a copy of the firmware's template).
    pub fn efivars(&self) -> PathBuf {
        self.dir.join("efivars.fd")
    }

    /// The ignition file.
    pub fn ignition(&self) -> PathBuf {
        self.dir.join("ignition")
    }

    /// The image file of local disk `name`. The name is hex-encoded: client text never becomes
    /// a path component as such.
    pub fn disk(&self, name: &str) -> PathBuf {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("disk-{hex}.qcow2"))
    }

    /// Creates the directory (0700) if missing.
    pub fn create(&self) -> io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
    }

    /// The pid in the pid file, if any.
    pub fn read_pid(&self) -> Option<i32> {
        fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
            .filter(|&pid: &i32| pid > 0)
    }

    /// Whether `pid` is a live QEMU of this machine (not a zombie, not a reused pid): its
    /// command line names this machine's pid file, an absolute path no other machine has.
    pub fn is_ours(&self, pid: i32) -> bool {
        let pid_file = self.pid_file().display().to_string();
        cmdline(pid).is_some_and(|args| args.windows(2).any(|w| w[0] == "-pidfile" && w[1] == pid_file))
            && is_alive(pid)
    }

    /// The live QEMU of this machine, if any: the pid file's process when it is ours.
    pub fn running_pid(&self) -> Option<i32> {
        self.read_pid().filter(|&pid| self.is_ours(pid))
    }
}

/// Everything a machine is started with.
#[derive(Debug, Clone)]
pub struct BootPlan {
    /// The machine id (the QEMU guest name).
    pub id: String,
    /// Virtual CPUs.
    pub cpus: i64,
    /// Memory in bytes.
    pub memory_bytes: i64,
    /// The kernel to boot directly, if any.
    pub kernel: Option<KernelImage>,
    /// Whether to pass the ignition file.
    pub ignition: bool,
    /// The guest's hostname ("" = none).
    pub hostname: String,
    /// Disks, in boot order.
    pub disks: Vec<Disk>,
    /// Network interfaces.
    pub nics: Vec<Nic>,
}

/// A network interface of a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// [`volume_key`] of the NIC's name: names its device (`n<key>`) and netdev (`u<key>`).
    pub key: String,
    /// Its MAC address.
    pub mac: String,
    /// How it is connected.
    pub plugin: crate::network::Plugin,
}

/// The QEMU device id of the NIC with `key`.
pub fn nic_device_id(key: &str) -> String {
    format!("n{key}")
}

/// The NIC key of QEMU device `id`, if it is a NIC's device.
pub fn key_of_nic(id: &str) -> Option<String> {
    let key = id.strip_prefix('n')?;
    (key.len() == 16 && key.bytes().all(|b| b.is_ascii_hexdigit())).then(|| key.to_string())
}

/// The netdev of `nic`, as `netdev_add` and `-netdev` take it (JSON): see [`crate::network`].
pub fn netdev(nic: &Nic) -> Value {
    crate::network::netdev(&nic.plugin, &format!("u{}", nic.key))
}

/// The virtio-net device of `nic` on `bus` (JSON).
pub fn nic_device(nic: &Nic, bus: Option<&str>) -> Value {
    let mut device = serde_json::json!({
        "driver": "virtio-net-pci",
        "id": nic_device_id(&nic.key),
        "netdev": format!("u{}", nic.key),
        "mac": nic.mac,
    });
    if let Some(bus) = bus {
        device["bus"] = Value::from(bus);
    }
    device
}

/// A disk of a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// [`volume_key`] of the volume's name: names its QEMU device (`v<key>`) and block nodes
    /// (`d<key>`, `f<key>`), which must be short (block node names have at most 31 bytes).
    pub key: String,
    /// Where its data is.
    pub source: DiskSource,
    /// The serial the guest sees (at most 20 bytes, virtio-blk's limit).
    pub serial: String,
}

/// Where a disk's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A qcow2 file of ours (a `local_disk`).
    Qcow2(PathBuf),
    /// An NBD export (a volume of driver `nbd`).
    Nbd(crate::nbd::Export),
    /// An RBD image (a volume of driver `ceph`), with the machine's `ceph.conf`.
    Rbd {
        /// The image and its credentials.
        rbd: crate::ceph::Rbd,
        /// The `ceph.conf` bounding librados' waits.
        conf: PathBuf,
    },
}

/// A failure to start QEMU.
#[derive(Debug)]
pub enum StartError {
    /// Retrying will not help until something changes (the binary is missing, the image is
    /// gone, QEMU rejects the configuration).
    Permanent(String),
    /// It might work next time.
    Transient(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Permanent(s) | StartError::Transient(s) => f.write_str(s),
        }
    }
}

/// The QEMU command line for `plan` in `dir` (without the binary).
pub fn command_line(settings: &QemuSettings, dir: &MachineDir, plan: &BootPlan) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut arg = |a: String| args.push(a.into());
    arg("-name".into());
    arg(format!("guest={},debug-threads=on", plan.id));
    arg("-machine".into());
    arg(settings.machine.clone());
    for accel in &settings.accel {
        arg("-accel".into());
        arg(accel.clone());
    }
    arg("-smp".into());
    arg(plan.cpus.max(1).to_string());
    arg("-m".into());
    // QEMU takes MiB; round up so the guest never gets less than its class says.
    arg(format!("{}M", (plan.memory_bytes.max(1) + (1 << 20) - 1) >> 20));
    for fixed in ["-nodefaults", "-no-user-config", "-display", "none", "-daemonize"] {
        arg(fixed.into());
    }
    arg("-pidfile".into());
    arg(dir.pid_file().display().to_string());
    // Socket paths relative to the machine directory, QEMU's working directory at start (see
    // the module docs): bound before `-daemonize` changes to `/`.
    arg("-chardev".into());
    arg(format!("socket,id=qmp,path={QMP_SOCKET},server=on,wait=off"));
    arg("-mon".into());
    arg("chardev=qmp,mode=control".into());
    arg("-chardev".into());
    arg(format!(
        "socket,id=console,path={CONSOLE_SOCKET},server=on,wait=off"
    ));
    arg("-serial".into());
    arg("chardev:console".into());
    if let Some(kernel) = &plan.kernel {
        arg("-kernel".into());
        arg(kernel.kernel.display().to_string());
        arg("-initrd".into());
        arg(kernel.initramfs.display().to_string());
        let mut cmdline = String::from("console=ttyS0");
        if !kernel.cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&kernel.cmdline);
        }
        if !plan.hostname.is_empty() {
            // Validated RFC 1123: no spaces, nothing the kernel would take as another argument.
            cmdline.push_str(&format!(
                " hostname={} systemd.hostname={}",
                plan.hostname, plan.hostname
            ));
        }
        arg("-append".into());
        arg(cmdline);
    }
    if plan.kernel.is_none() {
        // No kernel to boot directly: UEFI firmware boots the first disk (bootindex 1).
        arg("-drive".into());
        arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            escape(&settings.firmware_code)
        ));
        arg("-drive".into());
        arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            escape(&dir.efivars())
        ));
    }
    if plan.ignition {
        arg("-fw_cfg".into());
        arg(format!(
            "name=opt/com.coreos/config,file={}",
            escape(&dir.ignition())
        ));
    }
    if !plan.hostname.is_empty() {
        arg("-fw_cfg".into());
        arg(format!("name=opt/dev.ironcore/hostname,string={}", plan.hostname));
    }
    let q35 = settings.machine.starts_with("q35");
    if q35 {
        // One root port per disk and NIC, plus empty ones: on q35 a device can only be
        // hot-plugged into a free port, ports cannot be added to a running machine, and
        // devices on the root complex itself cannot be unplugged.
        for port in 0..plan.disks.len() + plan.nics.len() + settings.hotplug_ports as usize {
            arg("-device".into());
            arg(format!(
                "pcie-root-port,id=rp{port},bus=pcie.0,chassis={},slot={}",
                port + 1,
                port + 1
            ));
        }
    }
    if let Some(tls) = plan.disks.iter().find_map(|d| match &d.source {
        DiskSource::Nbd(export) => export.tls.as_ref(),
        DiskSource::Qcow2(_) | DiskSource::Rbd { .. } => None,
    }) {
        arg("-object".into());
        arg(crate::nbd::tls_object(tls).to_string());
    }
    for disk in &plan.disks {
        if let DiskSource::Rbd { rbd, .. } = &disk.source {
            // From files of the machine directory (written with the plan), never inline: the
            // command line is readable by every local user.
            for object in crate::ceph::secret_objects(rbd, &disk.key) {
                let id = object["id"].as_str().unwrap_or_default().to_string();
                arg("-object".into());
                arg(format!(
                    "secret,id={id},format=base64,file={}",
                    escape(&dir.secret(&id))
                ));
            }
        }
    }
    for (i, disk) in plan.disks.iter().enumerate() {
        for node in blockdevs(disk) {
            arg("-blockdev".into());
            arg(node.to_string());
        }
        // On q35 every disk gets a root port of its own: devices on the root complex itself
        // cannot be unplugged.
        let bus = q35.then(|| format!("rp{i}"));
        let mut device = device(disk, bus.as_deref());
        device["bootindex"] = Value::from(i + 1);
        arg("-device".into());
        arg(device.to_string());
    }
    for (j, nic) in plan.nics.iter().enumerate() {
        arg("-netdev".into());
        arg(netdev(nic).to_string());
        let bus = q35.then(|| format!("rp{}", plan.disks.len() + j));
        arg("-device".into());
        arg(nic_device(nic, bus.as_deref()).to_string());
    }
    args
}

/// 64 bits of FNV-1a over `parts` (separated, so ("ab", "c") differs from ("a", "bc")).
fn fnv(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        let separator: &[u8] = if i == 0 { &[] } else { &[0] };
        for byte in separator.iter().chain(part.as_bytes()) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The key of volume `name` in QEMU ids: 16 hex digits of its hash.
pub fn volume_key(name: &str) -> String {
    format!("{:016x}", fnv(&[name]))
}

/// The volume key of QEMU device `id`, if it is a volume's device.
pub fn key_of_device(id: &str) -> Option<String> {
    let key = id.strip_prefix('v')?;
    (key.len() == 16 && key.bytes().all(|b| b.is_ascii_hexdigit())).then(|| key.to_string())
}

/// The QEMU device id of the volume with `key`.
pub fn device_id(key: &str) -> String {
    format!("v{key}")
}

/// The block nodes of `disk`, as `blockdev-add` and `-blockdev` take them (JSON): the node
/// the device uses is `d<key>`.
pub fn blockdevs(disk: &Disk) -> Vec<Value> {
    let key = &disk.key;
    match &disk.source {
        DiskSource::Qcow2(file) => vec![
            serde_json::json!({
                "driver": "file", "filename": file, "node-name": format!("f{key}"),
                "discard": "unmap",
            }),
            serde_json::json!({
                "driver": "qcow2", "file": format!("f{key}"), "node-name": format!("d{key}"),
                "discard": "unmap",
            }),
        ],
        DiskSource::Nbd(export) => vec![crate::nbd::blockdev(export, &format!("d{key}"))],
        DiskSource::Rbd { rbd, conf } => vec![crate::ceph::blockdev(rbd, key, &format!("d{key}"), conf)],
    }
}

/// The virtio-blk device of `disk` on `bus` (a root port), as `device_add` and `-device` take
/// it (JSON).
pub fn device(disk: &Disk, bus: Option<&str>) -> Value {
    let mut device = serde_json::json!({
        "driver": "virtio-blk-pci",
        "id": device_id(&disk.key),
        "drive": format!("d{}", disk.key),
        "serial": disk.serial,
    });
    if let Some(bus) = bus {
        device["bus"] = Value::from(bus);
    }
    device
}

/// The MAC address of network interface `name` of machine `id`: stable across restarts and
/// provider versions (FNV-1a of both), locally administered, unicast.
pub fn mac_address(id: &str, name: &str) -> String {
    let b = fnv(&[id, name]).to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

/// Starts QEMU for `plan`. Returns once QEMU runs (its `-daemonize` parent exited with
/// success) with the machine's pid.
pub async fn start(settings: &QemuSettings, dir: &MachineDir, plan: &BootPlan) -> Result<i32, StartError> {
    let transient = |what: &str, e: io::Error| StartError::Transient(format!("{what}: {e}"));
    // A previous QEMU of this machine is gone (the caller checked): its sockets are stale.
    for path in [dir.qmp_socket(), dir.console_socket(), dir.pid_file()] {
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(transient("removing a stale file", e));
            }
            _ => {}
        }
    }
    if plan.kernel.is_none() && !dir.efivars().exists() {
        copy_private(&settings.firmware_vars, &dir.efivars()).map_err(|e| {
            StartError::Permanent(format!(
                "copying the UEFI variable store {} (qemu.firmware_vars; Debian: apt install ovmf): {e}",
                settings.firmware_vars.display()
            ))
        })?;
    }
    if plan.kernel.is_none() && plan.memory_bytes < MIN_UEFI_MEMORY_BYTES {
        // OVMF stops with an invalid opcode after starting the loader below ~160 MiB.
        return Err(StartError::Permanent(format!(
            "the machine boots from disk with UEFI firmware, which needs at least {} MiB of memory; its class has {} MiB",
            MIN_UEFI_MEMORY_BYTES >> 20,
            plan.memory_bytes >> 20
        )));
    }
    if plan.kernel.is_none() && !settings.firmware_code.is_file() {
        return Err(StartError::Permanent(format!(
            "the machine boots from disk and needs UEFI firmware, but {} is missing (qemu.firmware_code; Debian: apt install ovmf)",
            settings.firmware_code.display()
        )));
    }
    let log_path = dir.qemu_log();
    if fs::metadata(&log_path).is_ok_and(|m| m.len() > MAX_QEMU_LOG_BYTES) {
        let _ = fs::rename(&log_path, log_path.with_extension("log.1"));
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|e| transient("opening qemu.log", e))?;
    let log_err = log.try_clone().map_err(|e| transient("opening qemu.log", e))?;
    let args = command_line(settings, dir, plan);
    tracing::debug!(id = %plan.id, ?args, "starting qemu");
    let mut command = tokio::process::Command::new(&settings.binary);
    command
        .args(&args)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // QEMU's -daemonize calls setsid in the machine process; this makes the short-lived
        // parent independent of the provider's process group too, so a Ctrl-C aimed at the
        // provider cannot reach it.
        .process_group(0)
        .kill_on_drop(false);
    let mut child = command.spawn().map_err(|e| {
        let reason = format!("starting {}: {e}", settings.binary.display());
        if e.kind() == io::ErrorKind::NotFound {
            StartError::Permanent(reason)
        } else {
            StartError::Transient(reason)
        }
    })?;
    let status = match tokio::time::timeout(START_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(transient("waiting for qemu to start", e)),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            if let Some(pid) = dir.running_pid() {
                kill_and_wait(pid).await;
            }
            return Err(StartError::Transient(format!(
                "qemu did not finish starting in {START_TIMEOUT:?}: {}",
                log_tail(&log_path)
            )));
        }
    };
    if !status.success() {
        // QEMU refuses bad configurations at start, but also fails on what may pass (an NBD
        // server that is restarting): retried with backoff, and reported as events.
        return Err(StartError::Transient(format!(
            "qemu exited at start ({status}): {}",
            log_tail(&log_path)
        )));
    }
    dir.running_pid().ok_or_else(|| {
        StartError::Transient(format!(
            "qemu started but its pid file names no running qemu: {}",
            log_tail(&log_path)
        ))
    })
}

/// The accelerators of `settings` that work here: `kvm` is tried first with a QEMU that
/// insists on its default CPU model's features (`-cpu qemu64,enforce`), and dropped when that
/// QEMU refuses to start. A `/dev/kvm` of broken nested virtualization opens fine, but guests
/// hang on it; it lacks basic features such as SSE3, which is how it is told apart. Only
/// dropped when another accelerator is left to fall back to.
pub async fn usable_accel(settings: &QemuSettings, scratch: &Path) -> Vec<String> {
    let accel = settings.accel.clone();
    if accel.len() < 2 || !accel.iter().any(|a| a == "kvm") {
        return accel;
    }
    let pid_file = scratch.join("kvm-probe.pid");
    let _ = fs::remove_file(&pid_file);
    let probe = tokio::process::Command::new(&settings.binary)
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "qemu64,enforce",
            "-machine",
            &settings.machine,
        ])
        .args([
            "-m",
            "16",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-S",
            "-daemonize",
        ])
        .arg("-pidfile")
        .arg(&pid_file)
        .stdin(Stdio::null())
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(20), probe).await {
        Ok(Ok(output)) => output,
        // No QEMU, or no answer: starting machines will say what is wrong.
        _ => return accel,
    };
    if let Some(pid) = fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = fs::remove_file(&pid_file);
    if output.status.success() {
        return accel;
    }
    let reason = String::from_utf8_lossy(&output.stderr);
    tracing::warn!(
        reason = %reason.trim(),
        "KVM is not usable here (QEMU refuses its CPU model on it): machines run without it"
    );
    accel.into_iter().filter(|a| a != "kvm").collect()
}

/// Connects to the machine's QMP socket.
pub async fn connect(dir: &MachineDir) -> Result<Qmp, String> {
    let socket = dir.qmp_socket();
    let path = SocketPath::new(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, Qmp::connect(path.path())).await {
        Ok(Ok(qmp)) => Ok(qmp.with_timeout(Duration::from_secs(10))),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!(
            "{}: no QMP greeting within {CONNECT_TIMEOUT:?}",
            socket.display()
        )),
    }
}

/// Stops the machine's QEMU (`qmp` if connected, else whatever live QEMU the pid file names):
/// `quit`, then SIGKILL if it does not exit in time. Then removes its sockets and pid file.
pub async fn stop(qmp: Option<&Qmp>, dir: &MachineDir) {
    let pid = dir.running_pid();
    if let Some(qmp) = qmp {
        // The answer may or may not arrive before the socket closes.
        let _ = qmp.execute_value("quit", Value::Null).await;
    }
    if let Some(pid) = pid
        && !wait_gone(pid, EXIT_TIMEOUT).await
    {
        tracing::warn!(pid, "qemu did not quit: killing it");
        kill_and_wait(pid).await;
    }
    for path in [dir.qmp_socket(), dir.console_socket(), dir.pid_file()] {
        let _ = fs::remove_file(path);
    }
}

/// SIGKILL, and wait until the process is gone.
pub async fn kill_and_wait(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    if !wait_gone(pid, EXIT_TIMEOUT).await {
        tracing::error!(pid, "qemu survived SIGKILL");
    }
}

/// Waits up to `timeout` for `pid` to be gone; whether it is.
pub async fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while is_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    true
}

/// Creates a sparse qcow2 image of `size` bytes at `path` unless it exists (a restart keeps
/// the disk's data); an existing one is only grown.
pub async fn create_disk(path: &Path, size: i64) -> Result<(), StartError> {
    if !path.exists() {
        let size = size.to_string();
        make_image(
            path,
            &["create", "-q", "-f", "qcow2", "-o", "preallocation=off"],
            &[&size],
        )
        .await?;
    }
    grow_disk(path, size).await
}

/// Makes the qcow2 image `path` from the raw disk image `rootfs` (an OCI image's rootfs
/// layer), grown to `size` bytes when that is larger; an existing `path` is only grown.
pub async fn create_disk_from(path: &Path, rootfs: &Path, size: i64) -> Result<(), StartError> {
    if !path.exists() {
        let rootfs = rootfs.display().to_string();
        make_image(path, &["convert", "-q", "-f", "raw", "-O", "qcow2", &rootfs], &[]).await?;
    }
    grow_disk(path, size).await
}

/// Runs `qemu-img <args> <temporary file> <after>` and renames the file to `path` (0600,
/// fsynced): a crash never leaves a half-made image under the real name.
async fn make_image(path: &Path, args: &[&str], after: &[&str]) -> Result<(), StartError> {
    let temp = path.with_extension("qcow2.tmp");
    let _ = fs::remove_file(&temp);
    let output = tokio::process::Command::new("qemu-img")
        .args(args)
        .arg(&temp)
        .args(after)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| StartError::Transient(format!("running qemu-img: {e}")))?;
    if !output.status.success() {
        let _ = fs::remove_file(&temp);
        return Err(StartError::Transient(format!(
            "qemu-img {} for {}: {}",
            args[0],
            path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    fs::set_permissions(&temp, fs::Permissions::from_mode(0o600))
        .and_then(|()| fs::File::open(&temp)?.sync_all())
        .and_then(|()| fs::rename(&temp, path))
        .map_err(|e| StartError::Transient(format!("placing {}: {e}", path.display())))
}

/// The virtual size of qcow2 image `path` (from its header: big-endian u64 at byte 24).
pub fn qcow2_size(path: &Path) -> io::Result<u64> {
    let mut header = [0u8; 32];
    let mut file = fs::File::open(path)?;
    file.read_exact(&mut header)?;
    if &header[..4] != b"QFI\xfb" {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a qcow2 image"));
    }
    Ok(u64::from_be_bytes(header[24..32].try_into().expect("8 bytes")))
}

/// Grows the qcow2 image `path` of a stopped machine to `size` bytes (an UpdateVolume while
/// it was off); never shrinks it.
async fn grow_disk(path: &Path, size: i64) -> Result<(), StartError> {
    let current = qcow2_size(path)
        .map_err(|e| StartError::Transient(format!("reading the size of {}: {e}", path.display())))?;
    if u64::try_from(size).unwrap_or(0) <= current {
        return Ok(());
    }
    let output = tokio::process::Command::new("qemu-img")
        .args(["resize", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| StartError::Transient(format!("running qemu-img: {e}")))?;
    if !output.status.success() {
        return Err(StartError::Transient(format!(
            "qemu-img resize {}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Copies `from` to `to` with mode 0600, atomically (temporary file, fsync, rename).
fn copy_private(from: &Path, to: &Path) -> io::Result<()> {
    let temp = to.with_extension("tmp");
    let _ = fs::remove_file(&temp);
    fs::copy(from, &temp)?;
    fs::set_permissions(&temp, fs::Permissions::from_mode(0o600))?;
    fs::File::open(&temp)?.sync_all()?;
    fs::rename(&temp, to)
}

/// Writes `data` to `path` with mode 0600, atomically (temporary file, fsync, rename).
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let temp = path.with_extension("tmp");
    let _ = fs::remove_file(&temp);
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(data)?;
    file.sync_all()?;
    fs::rename(&temp, path)
}

/// QEMU option values escape a comma by doubling it.
fn escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
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

/// Whether any thread of `pid` has not exited yet (a zombie main thread with live threads
/// still holds the machine's files).
pub fn is_alive(pid: i32) -> bool {
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

/// The resident memory of `pid` in bytes (VmRSS), if it runs.
pub fn resident_bytes(pid: i32) -> Option<i64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The end of a log, for error messages.
pub fn log_tail(path: &Path) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(1024)));
    let mut tail = Vec::new();
    let _ = file.read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names_never_escape_the_directory() {
        let dir = MachineDir::new(Path::new("/data/machines"), "abc");
        let disk = dir.disk("../../etc/passwd");
        assert_eq!(disk.parent(), Some(Path::new("/data/machines/abc")));
        assert!(
            disk.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("disk-2e2e2f")
        );
    }

    #[test]
    fn command_line_has_qmp_console_ignition_and_ports() {
        let dir = MachineDir::new(Path::new("/d,x"), "m");
        let plan = BootPlan {
            id: "m".into(),
            cpus: 2,
            memory_bytes: (128 << 20) + 1,
            kernel: Some(KernelImage {
                kernel: "/img/vmlinuz".into(),
                initramfs: "/img/initramfs".into(),
                cmdline: "quiet".into(),
            }),
            ignition: true,
            hostname: "host-1".into(),
            disks: vec![Disk {
                key: volume_key("root"),
                source: DiskSource::Qcow2("/d,x/m/disk-61.qcow2".into()),
                serial: "oda".into(),
            }],
            nics: vec![Nic {
                key: volume_key("eth0"),
                mac: mac_address("m", "eth0"),
                plugin: crate::network::Plugin::Isolated,
            }],
        };
        let args: Vec<String> = command_line(&QemuSettings::default(), &dir, &plan)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-m 129M"), "{joined}");
        // Commas in paths are escaped for QEMU's option syntax.
        assert!(joined.contains("file=/d,,x/m/ignition"), "{joined}");
        assert!(joined.contains("-pidfile /d,x/m/pid"), "{joined}");
        assert!(
            joined.contains("-append console=ttyS0 quiet hostname=host-1"),
            "{joined}"
        );
        assert!(
            joined.contains("name=opt/com.coreos/config,file=/d,,x/m/ignition"),
            "{joined}"
        );
        assert!(
            joined.contains("name=opt/dev.ironcore/hostname,string=host-1"),
            "{joined}"
        );
        let key = volume_key("root");
        assert!(
            joined.contains(&format!(
                r#"{{"bootindex":1,"bus":"rp0","drive":"d{key}","driver":"virtio-blk-pci","id":"v{key}","serial":"oda"}}"#
            )),
            "{joined}"
        );
        assert!(
            joined.contains(r#""filename":"/d,x/m/disk-61.qcow2""#),
            "{joined}"
        );
        // One port for the disk, one for the NIC, four for hot-plug; created before the
        // devices that sit in them.
        let ports: Vec<usize> = (0..args.len())
            .filter(|&i| args[i].starts_with("pcie-root-port"))
            .collect();
        assert_eq!(ports.len(), 6);
        let first_device = args.iter().position(|a| a.contains("virtio-blk-pci")).unwrap();
        assert!(ports.iter().all(|&p| p < first_device), "{joined}");
        assert!(args.contains(&"socket,id=qmp,path=qmp.sock,server=on,wait=off".to_string()));
        assert!(
            !dir.is_ours(std::process::id() as i32),
            "not a QEMU of this machine"
        );
        let nic = volume_key("eth0");
        assert!(
            joined.contains(&format!(r#"{{"id":"u{nic}","restrict":true,"type":"user"}}"#)),
            "{joined}"
        );
        assert!(joined.contains(r#""bus":"rp1""#), "{joined}");
        assert!(
            joined.contains(&format!(r#""mac":"{}""#, mac_address("m", "eth0"))),
            "{joined}"
        );
    }

    #[test]
    fn reads_resident_memory() {
        let own = resident_bytes(std::process::id() as i32).unwrap();
        assert!(own > 0);
        assert_eq!(resident_bytes(-1), None);
    }

    #[tokio::test]
    async fn kvm_is_dropped_only_when_the_probe_qemu_refuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let with = |binary: &str, accel: &[&str]| QemuSettings {
            binary: binary.into(),
            accel: accel.iter().map(|a| a.to_string()).collect(),
            ..QemuSettings::default()
        };
        // `false` stands for a QEMU that refuses to start on KVM, `true` for one that starts.
        assert_eq!(
            usable_accel(&with("false", &["kvm", "tcg"]), dir.path()).await,
            ["tcg"]
        );
        assert_eq!(
            usable_accel(&with("true", &["kvm", "tcg"]), dir.path()).await,
            ["kvm", "tcg"]
        );
        // Nothing to fall back to, or no kvm: left as configured (and not probed).
        assert_eq!(usable_accel(&with("false", &["kvm"]), dir.path()).await, ["kvm"]);
        assert_eq!(usable_accel(&with("false", &["tcg"]), dir.path()).await, ["tcg"]);
    }

    #[test]
    fn macs_are_stable_local_and_unicast() {
        let mac = mac_address("machine", "eth0");
        assert_eq!(mac, mac_address("machine", "eth0"));
        assert_ne!(mac, mac_address("machine", "eth1"));
        assert_ne!(mac, mac_address("machine2", "eth0"));
        // Name and id are separated: ("ab", "c") is not ("a", "bc").
        assert_ne!(mac_address("ab", "c"), mac_address("a", "bc"));
        assert!(mac.starts_with("02:") && mac.len() == 17, "{mac}");
    }
}
