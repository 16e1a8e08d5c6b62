// SPDX-License-Identifier: Apache-2.0
//! Structured logs for provider binaries.
//!
//! Providers put the object id into a span (`tracing::info_span!("reconcile", id = %id)`), so every
//! line logged while working on an object carries it.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber: level from `RUST_LOG` (default `info`), to stderr. Calling it
/// twice is harmless (the second call does nothing), so tests may call it freely.
pub fn init(format: LogFormat) {
    init_with_default(format, "info");
}

/// [`init`] with another filter where `RUST_LOG` is unset, e.g. `info,s3s=off` for a process
/// serving S3 (`s3s` logs every refused request, a 403 or a 404, at ERROR level).
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}
