// SPDX-License-Identifier: Apache-2.0
//! `iri-bucket-provider`: flags, config, logging; everything else is [`bucket_provider::run`].

use std::process::ExitCode;

use bucket_provider::config::Config;
use clap::Parser;
use iri_runtime::cli::{self, ProviderArgs};

/// The binary's name, in `--help` and in front of every error.
const NAME: &str = "iri-bucket-provider";

/// IRI BucketRuntime provider: buckets served by an S3 server inside the provider, each with
/// its own credentials, stored durably in the data directory.
#[derive(Debug, Parser)]
#[command(name = NAME, version)]
struct Args {
    #[command(flatten)]
    provider: ProviderArgs,
    /// Where the S3 server listens (ip:port; overrides s3.address) [default: 127.0.0.1:7480]
    #[arg(long, value_name = "ADDRESS")]
    s3_address: Option<String>,
    /// The S3 endpoint URL handed to clients (overrides s3.endpoint) [default: http://<s3 address>]
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut config: Config = match args.provider.resolve() {
        Ok(config) => config,
        Err(err) => return cli::fail(NAME, &err),
    };
    if let Some(address) = args.s3_address {
        config.s3.address = address;
    }
    if let Some(endpoint) = args.s3_endpoint {
        config.s3.endpoint = endpoint;
    }
    if args.provider.print_config {
        return cli::print_config(NAME, &config, config.validate());
    }
    // s3s logs every refused S3 request (a 403, a 404) at ERROR level, which would bury real
    // errors under ordinary client mistakes: off unless RUST_LOG asks for it. The provider logs
    // its own S3 failures, and iri_s3_requests{operation,status} counts every answer.
    iri_runtime::logging::init_with_default(config.server.log_format, bucket_provider::LOG_FILTER);
    cli::block_on(
        NAME,
        bucket_provider::run(config, iri_runtime::server::shutdown_signal()),
    )
}
