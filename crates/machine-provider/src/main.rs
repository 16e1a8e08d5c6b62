// SPDX-License-Identifier: Apache-2.0
//! `iri-machine-provider`: flags, config, logging; everything else is [`machine_provider::run`].

use std::process::ExitCode;

use clap::Parser;
use iri_runtime::cli::{self, ProviderArgs};
use machine_provider::config::Config;

/// The binary's name, in `--help` and in front of every error.
const NAME: &str = "iri-machine-provider";

/// IRI MachineRuntime provider: one QEMU process per machine, driven over QMP; machines keep
/// running across provider restarts and are adopted again.
#[derive(Debug, Parser)]
#[command(name = NAME, version)]
struct Args {
    #[command(flatten)]
    provider: ProviderArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config: Config = match args.provider.resolve() {
        Ok(config) => config,
        Err(err) => return cli::fail(NAME, &err),
    };
    if args.provider.print_config {
        return cli::print_config(NAME, &config, config.validate());
    }
    iri_runtime::logging::init(config.server.log_format);
    cli::block_on(
        NAME,
        machine_provider::run(config, iri_runtime::server::shutdown_signal()),
    )
}
