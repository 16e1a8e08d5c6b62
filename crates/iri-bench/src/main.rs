// SPDX-License-Identifier: Apache-2.0
//! `iri-bench`: benchmarks of the IRI providers. Each subcommand starts what it measures,
//! prints Markdown tables (numbers and ratios against a baseline measured in the same run) on
//! stdout, progress on stderr, and optionally writes JSON.

use clap::{Parser, Subcommand};
use iri_bench::{bucket, machine, volume};

#[derive(Debug, Parser)]
#[command(name = "iri-bench", version, about = "Benchmarks of the IRI providers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The volume provider: create/snapshot/clone times at two sizes, and I/O through the NBD
    /// export against the qcow2 file directly.
    Volume(volume::VolumeArgs),
    /// The machine provider: CreateMachine to the guest's console marker against a bare QEMU
    /// boot, CreateMachine to RUNNING, machines started per minute, and memory with 50 machines.
    Machine(machine::MachineArgs),
    /// The bucket provider: PUT and GET of 4 KiB, 64 KiB and 4 MiB objects at concurrency 1 and
    /// 16 through its S3 server against the same writes (write, fsync, rename) and reads on the
    /// filesystem directly.
    Bucket(bucket::BucketArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Volume(args) => tokio::select! {
            // Dropping the benchmark's future stops what it started and removes its directory.
            report = volume::run(args) => report.map(|r| r.render()),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        },
        Command::Machine(args) => tokio::select! {
            // Dropping the benchmark's future stops the provider, kills its QEMUs and removes
            // the directory.
            report = machine::run(args) => report.map(|r| r.render()),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        },
        Command::Bucket(args) => tokio::select! {
            // Dropping the benchmark's future stops the provider and removes the directory.
            report = bucket::run(args) => report.map(|r| r.render()),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        },
    };
    match result {
        Ok(text) => {
            print!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("iri-bench: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
