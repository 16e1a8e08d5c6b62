// SPDX-License-Identifier: Apache-2.0
//! The machine provider's configuration file (TOML); `iri-machine-provider --print-config`
//! prints it with every default written out.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use iri_api::RuntimeKind;
use iri_runtime::cli::{ProviderConfig, ServerSettings};
use iri_runtime::{Error, Result};
use serde::{Deserialize, Serialize};

/// The resource name of virtual CPUs (cores, an integer).
pub const CPU: &str = "cpu";
/// The resource name of guest memory (bytes).
pub const MEMORY: &str = "memory";

/// The files of [`Config::nbd_tls_dir`], as QEMU's `tls-creds-x509` object reads them.
pub const NBD_TLS_FILES: [&str; 3] = ["ca-cert.pem", "client-cert.pem", "client-key.pem"];

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where and how to serve IRI.
    pub server: ServerSettings,
    /// Machine classes offered. Each needs `cpu` and `memory`; any other resource name is
    /// accounted too, if the host declares a capacity for it.
    pub classes: Vec<MachineClass>,
    /// What the host offers machines, per resource. `cpu` (the host's CPU count) and `memory`
    /// (its total memory in bytes) are detected when left out; set them to overcommit or to
    /// hand out less. Every other resource a class names must be declared here.
    pub capacity: BTreeMap<String, i64>,
    /// What is kept back from `capacity` for the host itself, per resource.
    pub reserve: BTreeMap<String, i64>,
    /// Power-off: after an ACPI power-down request, the machine is forced off once this many
    /// seconds passed without the guest powering itself off.
    pub power_off_grace_seconds: u64,
    /// Directories boot images may be read from: a machine's image `file:///dir` (or `/dir`)
    /// must resolve inside one of them. Empty: no local images are accepted.
    pub image_dirs: Vec<PathBuf>,
    /// OCI boot images (`local_disk.image` given as a registry reference): registries trusted
    /// despite internal addresses, plain-HTTP registries, the layer size limit. They are fetched
    /// into `<data-dir>/images`.
    pub images: crate::images::ImageSettings,
    /// Linux bridges machines may join: a network interface whose `network_id` names one of
    /// them gets a tap device on it (plugin `bridge`, needs root); any other `network_id` gets
    /// the `isolated` plugin (user-mode networking). Each must exist at start.
    pub bridges: Vec<String>,
    /// Directories NBD unix sockets of `nbd` volumes may be in (e.g. the volume provider's
    /// `local/daemon`). Empty: only NBD over TCP is accepted.
    pub nbd_socket_dirs: Vec<PathBuf>,
    /// Client credentials for `nbd://` volumes served with TLS (a volume provider's
    /// `local.tcp_listen`): a directory in QEMU's `tls-creds-x509` layout, `ca-cert.pem`,
    /// `client-cert.pem` and `client-key.pem` (copy them from the volume provider's
    /// `<local>/tls/`). Unset: `nbd://` volumes are attached without TLS, and volumes whose
    /// access names a `tls_hostname` are refused.
    pub nbd_tls_dir: Option<PathBuf>,
    /// Stop every machine (ACPI power-down, forced off after `power_off_grace_seconds`) when
    /// the provider exits, instead of leaving them running for the next start to adopt. The
    /// stored desired power is not changed: the next start boots them again.
    pub stop_machines_on_exit: bool,
    /// Size of a `local_disk` that asks for none (`size_bytes` 0, no image), in bytes.
    pub default_local_disk_bytes: i64,
    /// State reported for a powered-off machine: `stopped` (MACHINE_STOPPED, the contract's
    /// value) or `suspended` (MACHINE_SUSPENDED, which the upstream machinepoollet maps to
    /// `Shutdown`; it cannot map MACHINE_STOPPED yet).
    pub stopped_state: StoppedState,
    /// Reconcile workers.
    pub workers: usize,
    /// Seconds between full resyncs, which also refresh every machine's state from QEMU.
    pub resync_seconds: u64,
    /// QEMU.
    pub qemu: QemuSettings,
    /// The streaming server for Exec.
    pub exec: ExecSettings,
}

/// One machine class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineClass {
    /// Class name, as poollets see it.
    pub name: String,
    /// Resources of one machine: `cpu` (cores), `memory` (bytes), and any others.
    pub resources: BTreeMap<String, i64>,
}

impl MachineClass {
    /// Virtual CPUs of a machine of this class.
    pub fn cpus(&self) -> i64 {
        self.resources.get(CPU).copied().unwrap_or(1)
    }

    /// Memory of a machine of this class, in bytes.
    pub fn memory_bytes(&self) -> i64 {
        self.resources.get(MEMORY).copied().unwrap_or(0)
    }
}

/// See [`Config::stopped_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoppedState {
    /// MACHINE_STOPPED.
    Stopped,
    /// MACHINE_SUSPENDED.
    Suspended,
}

/// How QEMU is run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuSettings {
    /// The `qemu-system-x86_64` binary (a bare name is looked up in PATH).
    pub binary: PathBuf,
    /// `-accel` values, tried in this order by QEMU (`kvm` falls back to `tcg` where there is
    /// no /dev/kvm).
    pub accel: Vec<String>,
    /// `-machine` type.
    pub machine: String,
    /// Empty PCIe root ports created at start, for hot-plug.
    pub hotplug_ports: u32,
    /// The console log of a machine is moved to `console.log.1` when it grows beyond this.
    pub console_log_bytes: u64,
    /// UEFI firmware code (OVMF, read-only) for machines that boot from a disk image (an image
    /// without a kernel). Debian's `ovmf` package installs it here.
    pub firmware_code: PathBuf,
    /// The UEFI variable store template: each such machine gets its own copy (`efivars.fd`).
    pub firmware_vars: PathBuf,
}

impl Default for QemuSettings {
    fn default() -> Self {
        QemuSettings {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: vec!["kvm".into(), "tcg".into()],
            machine: "q35".into(),
            hotplug_ports: 4,
            console_log_bytes: 1 << 20,
            firmware_code: PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd"),
            firmware_vars: PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd"),
        }
    }
}

/// The Exec streaming server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecSettings {
    /// Where it listens, `ip:port` (port 0 picks a free one).
    pub address: String,
    /// The URL prefix Exec answers with (`<base_url>/exec/<token>`); empty: `http://<address>`
    /// with the port actually bound. Set it when clients reach the server through another name.
    pub base_url: String,
    /// Sessions in flight (URLs handed out and not yet used, plus open sessions); Exec beyond
    /// this is RESOURCE_EXHAUSTED.
    pub max_sessions: usize,
    /// How long an Exec URL can be used, in seconds. It can be used once.
    pub url_seconds: u64,
}

impl Default for ExecSettings {
    fn default() -> Self {
        ExecSettings {
            address: "127.0.0.1:20251".into(),
            base_url: String::new(),
            max_sessions: 100,
            url_seconds: 60,
        }
    }
}

impl ProviderConfig for Config {
    fn defaults() -> Self {
        Config {
            server: ServerSettings::defaults(RuntimeKind::Machine),
            classes: vec![
                MachineClass {
                    name: "small".into(),
                    resources: BTreeMap::from([(CPU.into(), 1), (MEMORY.into(), 1 << 30)]),
                },
                MachineClass {
                    name: "medium".into(),
                    resources: BTreeMap::from([(CPU.into(), 2), (MEMORY.into(), 4 << 30)]),
                },
            ],
            capacity: BTreeMap::new(),
            reserve: BTreeMap::from([(CPU.into(), 0), (MEMORY.into(), 1 << 30)]),
            power_off_grace_seconds: 60,
            image_dirs: Vec::new(),
            images: crate::images::ImageSettings::default(),
            bridges: Vec::new(),
            nbd_socket_dirs: Vec::new(),
            nbd_tls_dir: None,
            stop_machines_on_exit: false,
            default_local_disk_bytes: 10 << 30,
            stopped_state: StoppedState::Stopped,
            workers: 4,
            resync_seconds: 10,
            qemu: QemuSettings::default(),
            exec: ExecSettings::default(),
        }
    }

    fn server_mut(&mut self) -> &mut ServerSettings {
        &mut self.server
    }
}

impl Default for Config {
    fn default() -> Self {
        <Config as ProviderConfig>::defaults()
    }
}

impl Config {
    /// Checks what serde cannot. Errors name the setting.
    pub fn validate(&self) -> Result<()> {
        if self.classes.is_empty() {
            return Err(Error::invalid("classes", "at least one machine class is needed"));
        }
        let capacity = self.host_capacity();
        let mut names = BTreeSet::new();
        for (i, class) in self.classes.iter().enumerate() {
            if class.name.is_empty() {
                return Err(Error::required(format!("classes[{i}].name")));
            }
            if !names.insert(class.name.as_str()) {
                return Err(Error::invalid(
                    format!("classes[{i}].name"),
                    format!("class {:?} is configured twice", class.name),
                ));
            }
            for required in [CPU, MEMORY] {
                if class.resources.get(required).is_none_or(|v| *v <= 0) {
                    return Err(Error::invalid(
                        format!("classes[{i}].resources.{required}"),
                        "must be set and > 0",
                    ));
                }
            }
            for (name, value) in &class.resources {
                if *value < 0 {
                    return Err(Error::invalid(
                        format!("classes[{i}].resources.{name}"),
                        format!("must be >= 0, got {value}"),
                    ));
                }
                if !capacity.contains_key(name) {
                    return Err(Error::invalid(
                        format!("classes[{i}].resources.{name}"),
                        format!("the host declares no capacity for {name:?}: set capacity.{name}"),
                    ));
                }
            }
        }
        for (table, map) in [("capacity", &self.capacity), ("reserve", &self.reserve)] {
            if let Some((name, value)) = map.iter().find(|(_, v)| **v < 0) {
                return Err(Error::invalid(
                    format!("{table}.{name}"),
                    format!("must be >= 0, got {value}"),
                ));
            }
        }
        iri_runtime::validate::reconcile_settings(self.workers, self.resync_seconds)?;
        if self.default_local_disk_bytes <= 0 {
            return Err(Error::invalid("default_local_disk_bytes", "must be > 0"));
        }
        if self.qemu.accel.is_empty() {
            return Err(Error::invalid("qemu.accel", "name at least one accelerator"));
        }
        if self.qemu.hotplug_ports > 32 {
            return Err(Error::invalid("qemu.hotplug_ports", "at most 32"));
        }
        for (table, dirs) in [
            ("image_dirs", &self.image_dirs),
            ("nbd_socket_dirs", &self.nbd_socket_dirs),
        ] {
            if let Some((i, dir)) = dirs.iter().enumerate().find(|(_, d)| !d.is_absolute()) {
                return Err(Error::invalid(
                    format!("{table}[{i}]"),
                    format!("{} is not an absolute path", dir.display()),
                ));
            }
        }
        for (i, bridge) in self.bridges.iter().enumerate() {
            if !crate::network::is_bridge(bridge) {
                return Err(Error::invalid(
                    format!("bridges[{i}]"),
                    format!(
                        "{bridge:?} is not a Linux bridge on this host (ip link add {bridge} type bridge)"
                    ),
                ));
            }
        }
        if let Some(dir) = &self.nbd_tls_dir {
            if !dir.is_absolute() {
                return Err(Error::invalid(
                    "nbd_tls_dir",
                    format!("{} is not an absolute path", dir.display()),
                ));
            }
            // QEMU reads these when a machine starts; a missing one would fail every machine
            // with an nbd:// volume, so say it once, here.
            for file in NBD_TLS_FILES {
                if !dir.join(file).is_file() {
                    return Err(Error::invalid(
                        "nbd_tls_dir",
                        format!(
                            "{} has no {file} (it needs {})",
                            dir.display(),
                            NBD_TLS_FILES.join(", ")
                        ),
                    ));
                }
            }
        }
        self.exec
            .address
            .parse::<std::net::SocketAddr>()
            .map_err(|_| Error::invalid("exec.address", format!("{:?} is not ip:port", self.exec.address)))?;
        if self.exec.max_sessions == 0 {
            return Err(Error::invalid("exec.max_sessions", "must be at least 1"));
        }
        if self.exec.url_seconds == 0 {
            return Err(Error::invalid("exec.url_seconds", "must be at least 1"));
        }
        Ok(())
    }

    /// The class named `name`, if configured.
    pub fn class(&self, name: &str) -> Option<&MachineClass> {
        self.classes.iter().find(|c| c.name == name)
    }

    /// What the host offers: the configured capacity, with `cpu` and `memory` detected when
    /// not configured.
    pub fn host_capacity(&self) -> BTreeMap<String, i64> {
        let mut capacity = self.capacity.clone();
        capacity
            .entry(CPU.into())
            .or_insert_with(|| std::thread::available_parallelism().map_or(1, |n| n.get() as i64));
        capacity.entry(MEMORY.into()).or_insert_with(host_memory_bytes);
        capacity
    }
}

/// MemTotal of /proc/meminfo in bytes (0 if unreadable: nothing fits, which is safe).
fn host_memory_bytes() -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        })
        .map_or(0, |kib| kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_print_back() {
        let config = Config::default();
        config.validate().unwrap();
        let printed = iri_runtime::cli::render_config(&config).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, printed).unwrap();
        let reread: Config = iri_runtime::cli::load_config_file(&file).unwrap();
        assert_eq!(reread, config);
        let capacity = config.host_capacity();
        assert!(capacity[CPU] >= 1 && capacity[MEMORY] > 0, "{capacity:?}");
    }

    #[test]
    fn bad_settings_are_named() {
        let mut config = Config::default();
        config.classes.push(config.classes[0].clone());
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("classes[2].name")
        );

        let mut config = Config::default();
        config.classes[1].resources.remove(MEMORY);
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("classes[1].resources.memory")
        );

        let mut config = Config::default();
        config.classes[0].resources.insert("gpu".into(), 1);
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("classes[0].resources.gpu") && err.contains("capacity.gpu"),
            "{err}"
        );
        config.capacity.insert("gpu".into(), 2);
        config.validate().unwrap();

        let mut config = Config::default();
        config.image_dirs.push("relative".into());
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("image_dirs[0]")
        );

        let mut config = Config::default();
        config.exec.address = "nowhere".into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("exec.address")
        );
    }
}
