// SPDX-License-Identifier: Apache-2.0
//! `iri up`: one host's pool node. The machine, volume and bucket providers run in one process,
//! each with its own store, socket and data directory under one node data directory, wired
//! together: the machine provider may open the volume provider's NBD socket and boot images
//! from the node's image directory. Each provider still runs on its own (`iri-*-provider`) for
//! a deployment with one sidecar per poollet.
//!
//! ```text
//! <data-dir>/config.toml?          nothing is written here by iri up; pass --config
//! <data-dir>/images/               boot and volume images (file:// references)
//! <data-dir>/machine/              the machine provider's data directory
//! <data-dir>/volume/               the volume provider's (its NBD socket: volume/local/daemon/nbd.sock)
//! <data-dir>/bucket/               the bucket provider's
//! ```
//!
//! Machine classes are sized to the host (see [`host_classes`]) unless the config file names
//! its own `[[machine.classes]]`.
//!
//! Sockets: as root with the default data directory, at upstream's well-known paths
//! (`/var/run/iri-<kind>provider.sock`), where poollets and `irictl` look; otherwise
//! `<data-dir>/<kind>.sock`, so that several nodes can share a host.
//!
//! Stopping (Ctrl-C) leaves the storage daemon and the running machines up, to be adopted at
//! the next start; `iri up --stop-machines` sets `[machine] stop_machines_on_exit`, so that the
//! machine provider powers them off on its way out (their stored power stays on).

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use iri_api::{Endpoint, RuntimeKind};
use iri_runtime::cli::{ProviderConfig, load_config_file_over};
use serde::{Deserialize, Serialize};

/// The node's configuration: one table per provider, each that provider's own configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The machine provider.
    pub machine: machine_provider::config::Config,
    /// The volume provider.
    pub volume: volume_provider::config::Config,
    /// The bucket provider.
    pub bucket: bucket_provider::config::Config,
}

/// The default node data directory: `/var/lib/iri` as root, else `$XDG_DATA_HOME/iri`.
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/var/lib/iri")
    } else {
        std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."))
            .join("iri")
    }
}

const GIB: i64 = 1 << 30;

/// The machine classes of a host with `cpus` CPUs and `memory` bytes for machines: `small` (1
/// CPU, 1 GiB), `medium` (2 CPUs, 4 GiB) and `large` (half the host), each capped at the host,
/// and left out when it would not fit or is no bigger than the one before.
pub fn host_classes(cpus: i64, memory: i64) -> Vec<machine_provider::config::MachineClass> {
    use machine_provider::config::{CPU, MEMORY, MachineClass};
    let cpus = cpus.max(1);
    let wanted = [
        ("small", 1, GIB),
        ("medium", 2, 4 * GIB),
        ("large", cpus / 2, memory / 2 / GIB * GIB),
    ];
    let mut classes: Vec<MachineClass> = Vec::new();
    for (name, cpu, bytes) in wanted {
        let (cpu, bytes) = (cpu.clamp(1, cpus), bytes.min(memory / GIB * GIB));
        let bigger = classes
            .last()
            .is_none_or(|last| bytes > last.memory_bytes() || cpu > last.cpus());
        if bytes >= GIB && bigger {
            classes.push(MachineClass {
                name: name.into(),
                resources: [(CPU.to_string(), cpu), (MEMORY.to_string(), bytes)].into(),
            });
        }
    }
    if classes.is_empty() {
        // A host with less than 1 GiB to give: one class of what there is.
        classes.push(MachineClass {
            name: "small".into(),
            resources: [
                (CPU.to_string(), 1),
                (MEMORY.to_string(), (memory / 2).max(256 << 20)),
            ]
            .into(),
        });
    }
    classes
}

impl NodeConfig {
    /// Defaults for a node in `data_dir`; `well_known_sockets` puts the sockets where upstream
    /// clients look (root, default data directory).
    pub fn defaults(data_dir: &Path, well_known_sockets: bool) -> NodeConfig {
        let images = data_dir.join("images");
        let mut machine = <machine_provider::config::Config as ProviderConfig>::defaults();
        let mut volume = <volume_provider::config::Config as ProviderConfig>::defaults();
        let mut bucket = <bucket_provider::config::Config as ProviderConfig>::defaults();
        for (kind, server) in [
            (RuntimeKind::Machine, machine.server_mut()),
            (RuntimeKind::Volume, volume.server_mut()),
            (RuntimeKind::Bucket, bucket.server_mut()),
        ] {
            server.data_dir = data_dir.join(kind.to_string());
            server.address = if well_known_sockets {
                format!("/var/run/iri-{kind}provider.sock")
            } else {
                data_dir.join(format!("{kind}.sock")).display().to_string()
            };
        }
        // Classes sized to this host (a config file's [[machine.classes]] replaces them).
        let host = machine.host_capacity();
        let usable_memory = host[machine_provider::config::MEMORY]
            - machine
                .reserve
                .get(machine_provider::config::MEMORY)
                .copied()
                .unwrap_or(0);
        machine.classes = host_classes(host[machine_provider::config::CPU], usable_memory);
        // The wiring: machines attach this node's volumes and boot its images.
        machine.nbd_socket_dirs = vec![data_dir.join("volume/local/daemon")];
        machine.image_dirs = vec![images.clone()];
        volume.local.image_dirs = vec![images];
        NodeConfig {
            machine,
            volume,
            bucket,
        }
    }

    /// Defaults, then the config file (tables it leaves out keep their defaults).
    pub fn load(
        data_dir: &Path,
        well_known_sockets: bool,
        file: Option<&Path>,
    ) -> anyhow::Result<NodeConfig> {
        let defaults = NodeConfig::defaults(data_dir, well_known_sockets);
        let config = match file {
            Some(path) => load_config_file_over(path, defaults)?,
            None => defaults,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every provider's configuration; errors name the table.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.machine.validate().context("[machine]")?;
        self.volume.validate().context("[volume]")?;
        self.bucket.validate().context("[bucket]")?;
        for (table, server) in [
            ("machine", &self.machine.server),
            ("volume", &self.volume.server),
            ("bucket", &self.bucket.server),
        ] {
            server.serve_options().with_context(|| format!("[{table}]"))?;
        }
        Ok(())
    }

    /// The configuration as TOML, every default written out.
    pub fn render(&self) -> anyhow::Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Where each provider serves.
    pub fn endpoints(&self) -> anyhow::Result<Vec<(RuntimeKind, Endpoint)>> {
        [
            (RuntimeKind::Machine, &self.machine.server.address),
            (RuntimeKind::Volume, &self.volume.server.address),
            (RuntimeKind::Bucket, &self.bucket.server.address),
        ]
        .into_iter()
        .map(|(kind, address)| Ok((kind, address.parse::<Endpoint>()?)))
        .collect()
    }
}

/// Runs the three providers until `shutdown` completes or one of them fails (then the others
/// are shut down too, and the first error is returned).
pub async fn up(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let NodeConfig {
        machine,
        volume,
        bucket,
    } = config;
    // The volume provider first: machines restored at start may attach its exports.
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn({
        let s = signal(stopped.clone());
        async move { ("volume", volume_provider::run(volume, s).await) }
    });
    tasks.spawn({
        let s = signal(stopped.clone());
        async move { ("bucket", bucket_provider::run(bucket, s).await) }
    });
    tasks.spawn({
        let s = signal(stopped.clone());
        async move { ("machine", machine_provider::run(machine, s).await) }
    });
    let stop_on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_on_signal.send(true);
    });
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let (name, result) = joined.context("a provider task panicked")?;
        if let Err(err) = result {
            tracing::error!(provider = name, "{err:#}");
            if first_error.is_none() {
                first_error = Some(err.context(format!("the {name} provider")));
            }
        }
        // One provider down means the node is down: stop the rest.
        let _ = stop.send(true);
    }
    first_error.map_or(Ok(()), Err)
}

/// One line per provider once it answers, or why it does not within `timeout`.
pub async fn health(config: &NodeConfig, timeout: Duration) -> Vec<String> {
    let mut lines = Vec::new();
    let endpoints = match config.endpoints() {
        Ok(endpoints) => endpoints,
        Err(err) => return vec![format!("cannot parse the addresses: {err:#}")],
    };
    for (kind, endpoint) in endpoints {
        let deadline = tokio::time::Instant::now() + timeout;
        let line = loop {
            match probe(kind, &endpoint).await {
                Ok(summary) => break format!("{kind:<8} ok    {endpoint}  {summary}"),
                Err(err) if tokio::time::Instant::now() >= deadline => {
                    break format!("{kind:<8} DOWN  {endpoint}  {err}");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        lines.push(line);
    }
    lines
}

async fn probe(kind: RuntimeKind, endpoint: &Endpoint) -> Result<String, String> {
    use iri_api::endpoint::clients;
    let channel = endpoint
        .connect(Duration::from_secs(2))
        .await
        .map_err(|e| e.to_string())?;
    match kind {
        RuntimeKind::Machine => {
            let mut client = clients::machine(channel);
            let version = client
                .version(iri_api::machine::v1alpha1::VersionRequest::default())
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            let status = client
                .status(iri_api::machine::v1alpha1::StatusRequest::default())
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            let classes: Vec<String> = status
                .machine_class_status
                .iter()
                .filter_map(|c| Some(format!("{}×{}", c.machine_class.as_ref()?.name, c.quantity)))
                .collect();
            Ok(format!(
                "{} {}; free: {}",
                version.runtime_name,
                version.runtime_version,
                classes.join(", ")
            ))
        }
        RuntimeKind::Volume => {
            let mut client = clients::volume(channel);
            let version = client
                .version(iri_api::volume::v1alpha1::VersionRequest::default())
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            let status = client
                .status(iri_api::volume::v1alpha1::StatusRequest::default())
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            let classes: Vec<String> = status
                .volume_class_status
                .iter()
                .filter_map(|c| {
                    Some(format!(
                        "{} {} GiB",
                        c.volume_class.as_ref()?.name,
                        c.quantity >> 30
                    ))
                })
                .collect();
            Ok(format!(
                "{} {}; free: {}",
                version.runtime_name,
                version.runtime_version,
                classes.join(", ")
            ))
        }
        RuntimeKind::Bucket => {
            let mut client = clients::bucket(channel);
            let version = client
                .version(iri_api::bucket::v1alpha1::VersionRequest::default())
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            let classes = client
                .list_bucket_classes(iri_api::bucket::v1alpha1::ListBucketClassesRequest::default())
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner()
                .bucket_classes;
            let names: Vec<&str> = classes.iter().map(|c| c.name.as_str()).collect();
            Ok(format!(
                "{} {}; classes: {}",
                version.runtime_name,
                version.runtime_version,
                names.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(classes: &[machine_provider::config::MachineClass]) -> Vec<(String, i64, i64)> {
        classes
            .iter()
            .map(|c| (c.name.clone(), c.cpus(), c.memory_bytes() / GIB))
            .collect()
    }

    #[test]
    fn classes_follow_the_host() {
        assert_eq!(
            sizes(&host_classes(16, 64 * GIB)),
            [
                ("small".into(), 1, 1),
                ("medium".into(), 2, 4),
                ("large".into(), 8, 32)
            ]
        );
        // Two CPUs and 23 GiB (this CI machine): large has more memory, not more CPUs.
        assert_eq!(
            sizes(&host_classes(2, 23 * GIB)),
            [
                ("small".into(), 1, 1),
                ("medium".into(), 2, 4),
                ("large".into(), 1, 11)
            ]
        );
        // A small host: medium is capped and large would be no bigger.
        assert_eq!(
            sizes(&host_classes(1, 3 * GIB)),
            [("small".into(), 1, 1), ("medium".into(), 1, 3)]
        );
        let tiny = host_classes(1, 512 << 20);
        assert_eq!(tiny.len(), 1);
        assert_eq!(tiny[0].memory_bytes(), 256 << 20);
    }

    #[test]
    fn a_config_file_replaces_the_derived_classes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "[[machine.classes]]\nname = \"only\"\nresources = { cpu = 1, memory = 268435456 }\n",
        )
        .unwrap();
        let config = NodeConfig::load(dir.path(), false, Some(&file)).unwrap();
        assert_eq!(sizes(&config.machine.classes), [("only".into(), 1, 0)]);
        let defaults = NodeConfig::load(dir.path(), false, None).unwrap();
        assert!(defaults.machine.classes.iter().any(|c| c.name == "small"));
    }
}
