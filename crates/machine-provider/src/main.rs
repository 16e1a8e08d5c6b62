// SPDX-License-Identifier: Apache-2.0
//! `iri-machine-provider`: flags, config, logging; everything else is [`machine_provider::run`].

use std::process::ExitCode;

use clap::Parser;
use iri_runtime::cli::{ProviderArgs, render_config};
use machine_provider::config::Config;

/// IRI MachineRuntime provider: one QEMU process per machine, driven over QMP; machines keep
/// running across provider restarts and are adopted again.
#[derive(Debug, Parser)]
#[command(name = "iri-machine-provider", version)]
struct Args {
    #[command(flatten)]
    provider: ProviderArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config: Config = match args.provider.resolve() {
        Ok(config) => config,
        Err(err) => return fail(&err),
    };
    if args.provider.print_config {
        // Printing is also how an operator checks a config file: report what is wrong.
        if let Err(err) = config.validate() {
            return fail(&err);
        }
        return match render_config(&config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        };
    }
    iri_runtime::logging::init(config.server.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&err),
    };
    match runtime.block_on(machine_provider::run(
        config,
        iri_runtime::server::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&format!("{err:#}")),
    }
}

fn fail(err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("iri-machine-provider: {err}");
    ExitCode::FAILURE
}
