// SPDX-License-Identifier: Apache-2.0
//! `iri-volume-provider`: flags, config, logging; everything else is [`volume_provider::run`].

use std::process::ExitCode;

use clap::Parser;
use iri_runtime::cli::{self, ProviderArgs};
use volume_provider::config::Config;

/// The binary's name, in `--help` and in front of every error.
const NAME: &str = "iri-volume-provider";

/// IRI VolumeRuntime provider: volumes as qcow2 files in the data directory, served over NBD
/// by a qemu-storage-daemon that the provider supervises.
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
        volume_provider::run(config, iri_runtime::server::shutdown_signal()),
    )
}
