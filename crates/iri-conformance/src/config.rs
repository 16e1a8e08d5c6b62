// SPDX-License-Identifier: Apache-2.0
//! What the suite cannot guess about a runtime: which class, image and sizes to use, how to
//! restart it, how to look inside a guest.

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};

/// The suite's configuration file (TOML). Every setting has a default; an empty file is valid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Machine tests.
    pub machine: MachineSettings,
    /// Volume tests.
    pub volume: VolumeSettings,
    /// Bucket tests.
    pub bucket: BucketSettings,
    /// How long to wait for things.
    pub timeouts: Timeouts,
    /// Shell hooks for what only the operator knows how to do.
    pub hooks: Hooks,
    /// Scale tests.
    pub scale: ScaleSettings,
}

/// Machine test settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MachineSettings {
    /// Machine class to create machines with; empty = the first class `Status` reports.
    pub class: String,
    /// Image of the machine's local boot disk; empty = machines without an image.
    pub image: String,
    /// Network id to attach NICs to; empty = `conformance`.
    pub network_id: String,
    /// Text the console of a machine booted from `image` shows once the guest is up (the
    /// data-plane console test waits for it); empty = any console output will do.
    pub console_marker: String,
}

/// Volume test settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeSettings {
    /// Volume class; empty = the first class `Status` reports.
    pub class: String,
    /// Size of test volumes in bytes.
    pub size_bytes: i64,
    /// Image for create-from-image tests; empty skips them.
    pub image: String,
}

impl Default for VolumeSettings {
    fn default() -> Self {
        VolumeSettings {
            class: String::new(),
            size_bytes: 1 << 30,
            image: String::new(),
        }
    }
}

/// Bucket test settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BucketSettings {
    /// Bucket class; empty = the first class `ListBucketClasses` reports.
    pub class: String,
}

/// Timeouts, in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Per RPC.
    pub rpc_seconds: u64,
    /// For an object to reach its ready state (machine running, volume available...).
    pub ready_seconds: u64,
    /// For a deleted object to disappear from List, in tests and in cleanup.
    pub delete_seconds: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            rpc_seconds: 30,
            ready_seconds: 120,
            delete_seconds: 120,
        }
    }
}

impl Timeouts {
    /// [`Timeouts::rpc_seconds`] as a duration.
    pub fn rpc(&self) -> Duration {
        Duration::from_secs(self.rpc_seconds)
    }
    /// [`Timeouts::ready_seconds`] as a duration.
    pub fn ready(&self) -> Duration {
        Duration::from_secs(self.ready_seconds)
    }
    /// [`Timeouts::delete_seconds`] as a duration.
    pub fn delete(&self) -> Duration {
        Duration::from_secs(self.delete_seconds)
    }
}

/// Shell hooks (run with `sh -c`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hooks {
    /// Restarts the runtime under test and returns once it serves again; empty skips the
    /// `restart` profile.
    pub restart: String,
    /// Runs inside or against a guest: gets `IRI_MACHINE_ID` in its environment and prints what
    /// the guest sees; empty skips guest checks.
    pub guest_probe: String,
}

/// Scale test settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScaleSettings {
    /// How many objects the list-at-scale test creates.
    pub objects: usize,
}

impl Default for ScaleSettings {
    fn default() -> Self {
        ScaleSettings { objects: 1000 }
    }
}

impl Config {
    /// Reads a config file; errors name the file and the offending key.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}",
                path.display(),
                e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
            )
        })
    }
}
