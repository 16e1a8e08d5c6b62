// SPDX-License-Identifier: Apache-2.0
//! The volume provider's configuration file (TOML); `iri-volume-provider --print-config` prints
//! it with every default written out.

use iri_api::RuntimeKind;
use iri_runtime::cli::{ProviderConfig, ServerSettings};
use iri_runtime::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::backend::local::LocalSettings;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where and how to serve IRI.
    pub server: ServerSettings,
    /// Volume classes offered. Their limits become throttle limits on each volume's export.
    pub classes: Vec<VolumeClass>,
    /// Bytes of the data directory's filesystem kept free: Status reports free space minus this.
    pub reserve_bytes: u64,
    /// Reconcile workers.
    pub workers: usize,
    /// Seconds between full resyncs (which repair drift such as a lost export).
    pub resync_seconds: u64,
    /// The key-encryption key that wraps the passphrases of encrypted volumes (32 bytes, mode
    /// 0600; created at the first start). A relative path is relative to the data directory.
    /// Losing it loses every encrypted volume: back it up, apart from the data.
    pub key_file: std::path::PathBuf,
    /// Backend `local`.
    pub local: LocalSettings,
}

/// One volume class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeClass {
    /// Class name, as poollets see it.
    pub name: String,
    /// Throughput limit in bytes per second (IRI `tps`); 0 = unlimited.
    pub tps: i64,
    /// Operations per second; 0 = unlimited.
    pub iops: i64,
}

impl ProviderConfig for Config {
    fn defaults() -> Self {
        Config {
            server: ServerSettings::defaults(RuntimeKind::Volume),
            classes: vec![
                VolumeClass {
                    name: "fast".into(),
                    tps: 200 * 1024 * 1024,
                    iops: 20_000,
                },
                VolumeClass {
                    name: "standard".into(),
                    tps: 50 * 1024 * 1024,
                    iops: 2_000,
                },
            ],
            reserve_bytes: 1 << 30,
            workers: 4,
            resync_seconds: 60,
            key_file: crate::KEY_FILE.into(),
            local: LocalSettings::default(),
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
    /// Checks what serde cannot: at least one class, unique non-empty class names,
    /// non-negative limits, at least one worker and a resync period. Errors name the setting.
    pub fn validate(&self) -> Result<()> {
        iri_runtime::validate::limit_classes(
            "volume",
            self.classes.iter().map(|c| (c.name.as_str(), c.tps, c.iops)),
        )?;
        iri_runtime::validate::reconcile_settings(self.workers, self.resync_seconds)?;
        let listen = self.local.tcp_listen.as_str();
        if !listen.is_empty() {
            let Ok(address) = listen.parse::<std::net::SocketAddr>() else {
                return Err(Error::invalid(
                    "local.tcp_listen",
                    format!("{listen:?} is not ip:port (e.g. 0.0.0.0:10809)"),
                ));
            };
            if address.ip().is_unspecified() && self.local.tcp_advertise.is_empty() {
                return Err(Error::invalid(
                    "local.tcp_advertise",
                    format!("{listen} listens on every address: say which host:port clients should use"),
                ));
            }
        }
        for (i, dir) in self.local.image_dirs.iter().enumerate() {
            if !dir.is_absolute() {
                return Err(Error::invalid(
                    format!("local.image_dirs[{i}]"),
                    format!("{} is not an absolute path", dir.display()),
                ));
            }
        }
        Ok(())
    }

    /// The class named `name`, if configured.
    pub fn class(&self, name: &str) -> Option<&VolumeClass> {
        self.classes.iter().find(|c| c.name == name)
    }
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
    }

    #[test]
    fn bad_classes_are_named() {
        let mut config = Config::default();
        config.classes.push(config.classes[0].clone());
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("classes[2].name")
        );
        config.classes.clear();
        assert!(config.validate().unwrap_err().to_string().contains("classes"));
        let mut config = Config::default();
        config.classes[1].iops = -1;
        assert!(config.validate().unwrap_err().to_string().contains("classes[1]"));
        let config = Config {
            workers: 0,
            ..Config::default()
        };
        assert!(config.validate().unwrap_err().to_string().contains("workers"));
    }

    #[test]
    fn bad_local_settings_are_named() {
        let with = |f: &dyn Fn(&mut LocalSettings)| {
            let mut config = Config::default();
            f(&mut config.local);
            config.validate().map_err(|e| e.to_string())
        };
        assert!(
            with(&|l| l.tcp_listen = "nope".into())
                .unwrap_err()
                .contains("local.tcp_listen")
        );
        assert!(
            with(&|l| l.tcp_listen = "0.0.0.0:10809".into())
                .unwrap_err()
                .contains("local.tcp_advertise")
        );
        with(&|l| {
            l.tcp_listen = "0.0.0.0:10809".into();
            l.tcp_advertise = "node-1.example:10809".into();
        })
        .unwrap();
        assert!(
            with(&|l| l.image_dirs = vec!["images".into()])
                .unwrap_err()
                .contains("local.image_dirs[0]")
        );
    }
}
