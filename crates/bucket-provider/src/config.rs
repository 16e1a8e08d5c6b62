// SPDX-License-Identifier: Apache-2.0
//! The bucket provider's configuration file (TOML); `iri-bucket-provider --print-config` prints
//! it with every default written out.

use iri_api::RuntimeKind;
use iri_runtime::Result;
use iri_runtime::cli::{ProviderConfig, ServerSettings};
use serde::{Deserialize, Serialize};

use crate::backend::embedded::S3Settings;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where and how to serve IRI.
    pub server: ServerSettings,
    /// Bucket classes offered; their limits are enforced per bucket by the S3 server.
    pub classes: Vec<BucketClass>,
    /// Reconcile workers.
    pub workers: usize,
    /// Seconds between full resyncs (which repair drift such as a removed bucket directory).
    pub resync_seconds: u64,
    /// The embedded S3 server.
    pub s3: S3Settings,
}

/// One bucket class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketClass {
    /// Class name, as poollets see it.
    pub name: String,
    /// S3 requests per second per bucket (IRI `tps`); 0 = unlimited.
    pub tps: i64,
    /// S3 requests that move object data (GET, PUT, copy, upload part) per second per bucket
    /// (IRI `iops`); 0 = unlimited.
    pub iops: i64,
}

impl ProviderConfig for Config {
    fn defaults() -> Self {
        Config {
            server: ServerSettings::defaults(RuntimeKind::Bucket),
            classes: vec![
                BucketClass {
                    name: "standard".into(),
                    tps: 1000,
                    iops: 500,
                },
                BucketClass {
                    name: "fast".into(),
                    tps: 10_000,
                    iops: 5_000,
                },
            ],
            workers: 4,
            resync_seconds: 60,
            s3: S3Settings::default(),
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
    /// non-negative limits, workers, resync period, S3 settings. Errors name the setting.
    pub fn validate(&self) -> Result<()> {
        iri_runtime::validate::limit_classes(
            "bucket",
            self.classes.iter().map(|c| (c.name.as_str(), c.tps, c.iops)),
        )?;
        iri_runtime::validate::reconcile_settings(self.workers, self.resync_seconds)?;
        self.s3.validate()
    }

    /// The class named `name`, if configured.
    pub fn class(&self, name: &str) -> Option<&BucketClass> {
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
        config.classes.clear();
        assert!(config.validate().unwrap_err().to_string().contains("classes"));
        let mut config = Config::default();
        config.classes[1].tps = -1;
        assert!(config.validate().unwrap_err().to_string().contains("classes[1]"));
        let config = Config {
            workers: 0,
            ..Config::default()
        };
        assert!(config.validate().unwrap_err().to_string().contains("workers"));
        let mut config = Config::default();
        config.s3.address = "localhost".into();
        assert!(config.validate().unwrap_err().to_string().contains("s3.address"));
    }
}
