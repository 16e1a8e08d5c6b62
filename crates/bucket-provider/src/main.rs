// SPDX-License-Identifier: Apache-2.0
//! `iri-bucket-provider`: flags, config, logging; everything else is [`bucket_provider::run`].

use std::process::ExitCode;

use bucket_provider::config::Config;
use clap::Parser;
use iri_runtime::cli::{ProviderArgs, render_config};

/// IRI BucketRuntime provider: buckets served by an S3 server inside the provider, each with
/// its own credentials, stored durably in the data directory.
#[derive(Debug, Parser)]
#[command(name = "iri-bucket-provider", version)]
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
        Err(err) => return fail(&err),
    };
    if let Some(address) = args.s3_address {
        config.s3.address = address;
    }
    if let Some(endpoint) = args.s3_endpoint {
        config.s3.endpoint = endpoint;
    }
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
    // s3s logs every refused S3 request (a 403, a 404) at ERROR level, which would bury real
    // errors under ordinary client mistakes: off unless RUST_LOG asks for it. The provider logs
    // its own S3 failures, and iri_s3_requests{operation,status} counts every answer.
    iri_runtime::logging::init_with_default(config.server.log_format, bucket_provider::LOG_FILTER);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&err),
    };
    match runtime.block_on(bucket_provider::run(
        config,
        iri_runtime::server::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&format!("{err:#}")),
    }
}

fn fail(err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("iri-bucket-provider: {err}");
    ExitCode::FAILURE
}
