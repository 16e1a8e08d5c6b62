// SPDX-License-Identifier: Apache-2.0
//! Where the provider binaries a benchmark starts are found.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The binary `name` (e.g. `iri-volume-provider`, of crate `package`): `explicit`
/// (`--provider-bin`), else the environment variable `env` (e.g. `IRI_VOLUME_PROVIDER_BIN`),
/// else next to this executable (`target/<profile>/`, also from `target/<profile>/deps` where
/// test executables live), else `target/release/` and `target/debug/` under the current
/// directory, else on the PATH.
pub fn find(name: &str, package: &str, env: &str, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--provider-bin {}: no such file", path.display());
        }
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(name));
        if let Some(parent) = dir.parent() {
            candidates.push(parent.join(name));
        }
    }
    candidates.push(PathBuf::from("target/release").join(name));
    candidates.push(PathBuf::from("target/debug").join(name));
    if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
        return Ok(std::path::absolute(&found).unwrap_or(found));
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .with_context(|| {
            format!("{name} not found: build it (cargo build --release -p {package}) or pass --provider-bin")
        })
}
