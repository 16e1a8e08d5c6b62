// SPDX-License-Identifier: Apache-2.0
//! The flags and configuration every provider binary shares, so that all of them are operated
//! the same way: `--address`, `--data-dir`, `--config`, `--metrics-address`, `--print-config`.
//!
//! A provider's config file is TOML. Its `[server]` table is [`ServerSettings`]; the rest is the
//! provider's own. Flags override the file; the file overrides the defaults; with no file at all
//! a provider starts with defaults that work on this host.

use std::{
    fmt::Display,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use iri_api::RuntimeKind;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    Error, Result,
    logging::LogFormat,
    server::{ListenAddress, ServeOptions},
};

/// Flags shared by every provider binary.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ProviderArgs {
    /// Where to serve IRI: a socket path, unix:///path or tcp://ip:port [default: the upstream
    /// well-known socket when root, else a socket in the data directory]
    #[arg(long, value_name = "ADDRESS")]
    pub address: Option<String>,
    /// Directory for all state (store, disks, sockets) [default: /var/lib/iri/<kind>-provider
    /// when root, else $XDG_DATA_HOME/iri/<kind>-provider]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file (see --print-config for every setting and its default)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://<ADDRESS>/metrics (e.g. 127.0.0.1:9090)
    #[arg(long, value_name = "ADDRESS")]
    pub metrics_address: Option<SocketAddr>,
    /// Print the effective configuration, defaults included, as TOML and exit
    #[arg(long)]
    pub print_config: bool,
    /// Log format
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormatArg>,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// JSON lines.
    Json,
}

/// The `[server]` table of every provider's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Where to serve IRI (socket path, unix:///path or tcp://ip:port).
    pub address: String,
    /// Permission bits of the unix socket, octal.
    pub socket_mode: String,
    /// Where to serve `/metrics`; empty disables it.
    pub metrics_address: String,
    /// Directory for all state.
    pub data_dir: PathBuf,
    /// `text` or `json`.
    pub log_format: LogFormat,
}

impl ServerSettings {
    /// Defaults for a provider of `kind` on this host, for the current user.
    pub fn defaults(kind: RuntimeKind) -> Self {
        let root = nix::unistd::geteuid().is_root();
        let data_dir = if root {
            PathBuf::from(format!("/var/lib/iri/{kind}-provider"))
        } else {
            user_data_home().join(format!("iri/{kind}-provider"))
        };
        // Root serves where upstream clients look first for a provider; anyone else cannot write
        // /var/run, so the socket lives with the state.
        let address = if root {
            format!("/var/run/iri-{kind}provider.sock")
        } else {
            data_dir
                .join(format!("iri-{kind}provider.sock"))
                .display()
                .to_string()
        };
        ServerSettings {
            address,
            socket_mode: "0600".into(),
            metrics_address: String::new(),
            data_dir,
            log_format: LogFormat::Text,
        }
    }

    /// The options the server bootstrap takes, validated.
    pub fn serve_options(&self) -> Result<ServeOptions> {
        let address: ListenAddress = self.address.parse()?;
        let socket_mode = u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                Error::invalid(
                    "server.socket_mode",
                    format!("{:?} is not an octal mode like 0600", self.socket_mode),
                )
            })?;
        let metrics_address = match self.metrics_address.as_str() {
            "" => None,
            a => Some(a.parse().map_err(|_| {
                Error::invalid(
                    "server.metrics_address",
                    format!("{a:?} is not an ip:port address"),
                )
            })?),
        };
        Ok(ServeOptions {
            address,
            socket_mode,
            metrics_address,
        })
    }
}

fn user_data_home() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A provider's whole configuration.
pub trait ProviderConfig: Serialize + DeserializeOwned {
    /// Defaults that work on this host.
    fn defaults() -> Self;
    /// The `[server]` table.
    fn server_mut(&mut self) -> &mut ServerSettings;
}

impl ProviderArgs {
    /// The effective configuration: defaults, then the `--config` file, then flags.
    pub fn resolve<C: ProviderConfig>(&self) -> Result<C> {
        let mut config = match &self.config {
            Some(path) => load_config_file::<C>(path)?,
            None => C::defaults(),
        };
        let server = config.server_mut();
        if let Some(dir) = &self.data_dir {
            // A socket that lives in the data directory by default moves with it.
            let default_dir = std::mem::replace(&mut server.data_dir, dir.clone());
            if self.address.is_none()
                && let Ok(rest) = Path::new(&server.address).strip_prefix(&default_dir)
            {
                server.address = dir.join(rest).display().to_string();
            }
        }
        if let Some(address) = &self.address {
            server.address = address.clone();
        }
        if let Some(metrics) = self.metrics_address {
            server.metrics_address = metrics.to_string();
        }
        if let Some(format) = self.log_format {
            server.log_format = match format {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            };
        }
        server.serve_options()?;
        Ok(config)
    }
}

/// Reads a TOML config; settings it leaves out keep their defaults (so a file may be as short as
/// one line), unknown settings are an error naming the file and the key.
pub fn load_config_file<C: ProviderConfig>(path: &Path) -> Result<C> {
    load_config_file_over(path, C::defaults())
}

/// [`load_config_file`] over given defaults (for configurations that hold several providers'
/// or whose defaults depend on flags).
pub fn load_config_file_over<C: Serialize + DeserializeOwned>(path: &Path, defaults: C) -> Result<C> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::invalid("config", format!("{}: {e}", path.display())))?;
    let file: toml::Table = toml::from_str(&text).map_err(|e| {
        Error::invalid(
            "config",
            format!("{}: {}", path.display(), one_line(&e.to_string())),
        )
    })?;
    let mut merged = toml::Table::try_from(defaults).map_err(Error::internal)?;
    merge(&mut merged, file);
    merged.try_into().map_err(|e: toml::de::Error| {
        Error::invalid(
            "config",
            format!("{}: {}", path.display(), one_line(&e.to_string())),
        )
    })
}

/// Overlays `over` onto `base`, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The configuration as TOML, every default written out (what `--print-config` prints).
pub fn render_config<C: ProviderConfig>(config: &C) -> Result<String> {
    toml::to_string_pretty(config).map_err(Error::internal)
}

/// `--print-config`: prints `config` as TOML, unless `valid` (the provider's own checks of it)
/// failed. Printing is also how an operator checks a config file, so what is wrong is reported
/// (see [`fail`]).
pub fn print_config<C: ProviderConfig>(name: &str, config: &C, valid: Result<()>) -> ExitCode {
    if let Err(err) = valid {
        return fail(name, &err);
    }
    match render_config(config) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => fail(name, &err),
    }
}

/// Runs a provider's `serve` to its end on a multi-threaded runtime: success when it returns
/// Ok, else its error with its causes (`{:#}`) reported as by [`fail`].
pub fn block_on<E: Display>(name: &str, serve: impl Future<Output = std::result::Result<(), E>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(name, &err),
    };
    match runtime.block_on(serve) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(name, &format!("{err:#}")),
    }
}

/// Reports `err` on stderr as `<name>: <err>` (`name` is the binary) and fails the process.
pub fn fail(name: &str, err: &dyn Display) -> ExitCode {
    eprintln!("{name}: {err}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct TestConfig {
        server: ServerSettings,
        classes: Vec<String>,
    }

    impl ProviderConfig for TestConfig {
        fn defaults() -> Self {
            TestConfig {
                server: ServerSettings::defaults(RuntimeKind::Volume),
                classes: vec!["fast".into()],
            }
        }
        fn server_mut(&mut self) -> &mut ServerSettings {
            &mut self.server
        }
    }

    #[test]
    fn flags_override_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "classes = [\"slow\"]\n[server]\nsocket_mode = \"0660\"\n").unwrap();
        let args = ProviderArgs {
            config: Some(file),
            data_dir: Some(dir.path().join("data")),
            metrics_address: Some("127.0.0.1:9100".parse().unwrap()),
            ..Default::default()
        };
        let config: TestConfig = args.resolve().unwrap();
        assert_eq!(config.classes, ["slow"]);
        assert_eq!(config.server.socket_mode, "0660");
        assert_eq!(config.server.data_dir, dir.path().join("data"));
        assert_eq!(config.server.metrics_address, "127.0.0.1:9100");
        let options = config.server.serve_options().unwrap();
        assert_eq!(options.socket_mode, 0o660);
        // The printed config reads back to the same thing.
        let printed = render_config(&config).unwrap();
        let reread: TestConfig = toml::from_str(&printed).unwrap();
        assert_eq!(reread, config);
    }

    #[test]
    fn bad_files_name_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[server]\nsokcet_mode = \"0600\"\n").unwrap();
        let args = ProviderArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        let err = args.resolve::<TestConfig>().unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("sokcet_mode"), "{err}");

        std::fs::write(&file, "[server]\nsocket_mode = \"rw\"\n").unwrap();
        let err = args.resolve::<TestConfig>().unwrap_err().to_string();
        assert!(err.contains("server.socket_mode"), "{err}");

        let missing = ProviderArgs {
            config: Some(dir.path().join("nope.toml")),
            ..Default::default()
        };
        assert!(
            missing
                .resolve::<TestConfig>()
                .unwrap_err()
                .to_string()
                .contains("nope.toml")
        );
    }

    #[test]
    fn default_socket_follows_the_data_dir() {
        let defaults = TestConfig::defaults();
        let args = ProviderArgs {
            data_dir: Some("/srv/iri".into()),
            ..Default::default()
        };
        let config: TestConfig = args.resolve().unwrap();
        if Path::new(&defaults.server.address).starts_with(&defaults.server.data_dir) {
            assert_eq!(config.server.address, "/srv/iri/iri-volumeprovider.sock");
        } else {
            assert_eq!(config.server.address, "/var/run/iri-volumeprovider.sock");
        }
    }
}
