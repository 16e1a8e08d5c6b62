// SPDX-License-Identifier: Apache-2.0
//! `iri`: the all-in-one pool node. `iri up` runs this host's machine, volume and bucket
//! providers together (see the crate docs for the layout).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use iri::{NodeConfig, default_data_dir, health, up};
use iri_runtime::{
    logging::{self, LogFormat},
    server::shutdown_signal,
};

#[derive(Debug, Parser)]
#[command(
    name = "iri",
    version,
    about = "IronCore pool node: machines, volumes and buckets on one host"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the machine, volume and bucket providers of this host until Ctrl-C.
    Up {
        /// All state; default /var/lib/iri as root, else $XDG_DATA_HOME/iri.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// A TOML file with [machine], [volume] and [bucket] tables (each provider's own
        /// configuration); what it leaves out keeps its default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the effective configuration, every default written out, and exit.
        #[arg(long)]
        print_config: bool,
        /// Log as JSON lines instead of text (also when any provider's `log_format` is `json`).
        #[arg(long)]
        log_json: bool,
        /// On Ctrl-C, stop the running machines too (ACPI power-down, forced off after
        /// `[machine] power_off_grace_seconds`); their power stays on in the store, so the next
        /// start boots them again. Same as `[machine] stop_machines_on_exit = true`.
        #[arg(long)]
        stop_machines: bool,
    },
}

fn main() -> ExitCode {
    let Command::Up {
        data_dir,
        config,
        print_config,
        log_json,
        stop_machines,
    } = Args::parse().command;
    let default_dir = default_data_dir();
    // Sockets go where upstream clients look only for the default node of a root user; any
    // other node keeps them in its own directory, so that several can share a host.
    let well_known = nix::unistd::geteuid().is_root() && data_dir.as_ref().is_none_or(|d| *d == default_dir);
    let data_dir = data_dir.unwrap_or(default_dir);
    let data_dir = match std::path::absolute(&data_dir) {
        Ok(dir) => dir,
        Err(err) => return fail(&format!("data directory {}: {err}", data_dir.display())),
    };
    let mut config = match NodeConfig::load(&data_dir, well_known, config.as_deref()) {
        Ok(config) => config,
        Err(err) => return fail(&format!("{err:#}")),
    };
    if stop_machines {
        config.machine.stop_machines_on_exit = true;
    }
    if print_config {
        return match config.render() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => fail(&format!("{err:#}")),
        };
    }
    // One process, one log: JSON when asked by the flag or by any provider's [*.server] table.
    let json = log_json
        || [
            &config.machine.server,
            &config.volume.server,
            &config.bucket.server,
        ]
        .iter()
        .any(|server| server.log_format == LogFormat::Json);
    logging::init_with_default(
        if json { LogFormat::Json } else { LogFormat::Text },
        bucket_provider::LOG_FILTER,
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("starting the async runtime: {err}")),
    };
    runtime.block_on(async move {
        println!("iri up: node data directory {}", data_dir.display());
        let report = config.clone();
        let node = tokio::spawn(up(config, shutdown_signal()));
        let lines = health(&report, Duration::from_secs(60)).await;
        println!("{}", lines.join("\n"));
        println!("{}", shutdown_notice(&report));
        match node.await {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(err)) => fail(&format!("{err:#}")),
            Err(err) => fail(&format!("{err}")),
        }
    })
}

/// What Ctrl-C will do, printed under the health screen.
fn shutdown_notice(config: &NodeConfig) -> String {
    if config.machine.stop_machines_on_exit {
        format!(
            "Ctrl-C stops the providers and the running machines (ACPI power-down, forced off after \
             {} s); machines whose power is on boot again at the next start. The storage daemon \
             keeps serving volumes.",
            config.machine.power_off_grace_seconds
        )
    } else {
        "Ctrl-C stops the providers; running machines keep running and are adopted at the next \
         start (iri up --stop-machines stops them too). The storage daemon keeps serving volumes."
            .to_string()
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}
