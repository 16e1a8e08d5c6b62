// SPDX-License-Identifier: Apache-2.0
//! `iri-reference-runtime`: serves the in-memory reference Machine, Volume and Bucket runtimes
//! on unix sockets, so irictl can be tried without a real provider. A test double: nothing is
//! created anywhere and all state is lost on exit.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::Parser;
use iri_testing::{
    BucketConfig, BucketRuntime, MachineConfig, MachineRuntime, VolumeConfig, VolumeRuntime,
    serve_bucket_unix, serve_machine_unix, serve_volume_unix,
};

/// In-memory IRI reference runtimes: a TEST DOUBLE, not a provider.
///
/// Serves machine.v1alpha1.MachineRuntime, volume.v1alpha1.VolumeRuntime and
/// bucket.v1alpha1.BucketRuntime on three unix sockets. Everything lives in memory: no machine
/// boots, no storage is allocated, bucket credentials are random strings, and all state is lost
/// when the process exits. Use it to try irictl or to test clients. Stop it with Ctrl-C.
#[derive(Debug, Parser)]
#[command(name = "iri-reference-runtime", version)]
struct Args {
    /// Directory for the default socket paths (created if missing).
    #[arg(long, default_value = "./iri-reference")]
    dir: PathBuf,
    /// Machine runtime socket path [default: DIR/machine.sock].
    #[arg(long, value_name = "PATH")]
    machine_address: Option<PathBuf>,
    /// Volume runtime socket path [default: DIR/volume.sock].
    #[arg(long, value_name = "PATH")]
    volume_address: Option<PathBuf>,
    /// Bucket runtime socket path [default: DIR/bucket.sock].
    #[arg(long, value_name = "PATH")]
    bucket_address: Option<PathBuf>,
    /// Milliseconds until new objects leave their PENDING state and spec changes are observed.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    ready_delay_ms: u64,
    /// Report powered-off machines as MACHINE_SUSPENDED instead of MACHINE_STOPPED (what an
    /// upstream machinepoollet can map).
    #[arg(long)]
    suspend_when_off: bool,
    /// Base of the (fake) URLs Exec returns.
    #[arg(long, default_value = "http://127.0.0.1:20251", value_name = "URL")]
    exec_base_url: String,
    /// Endpoint handed out in bucket access data (nothing is served there).
    #[arg(long, default_value = "http://127.0.0.1:9000", value_name = "URL")]
    bucket_endpoint: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("iri-reference-runtime: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
    // Printed endpoints must be absolute: `unix://` targets with relative paths do not parse.
    let dir = std::path::absolute(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let socket = |given: &Option<PathBuf>, name: &str| -> Result<PathBuf, String> {
        match given {
            // Accept the `unix://` form users copy from endpoint variables, too.
            Some(p) => {
                let p = p
                    .to_str()
                    .and_then(|s| s.strip_prefix("unix://"))
                    .map(PathBuf::from)
                    .unwrap_or(p.clone());
                std::path::absolute(&p).map_err(|e| format!("{}: {e}", p.display()))
            }
            None => Ok(dir.join(name)),
        }
    };
    let machine_path = socket(&args.machine_address, "machine.sock")?;
    let volume_path = socket(&args.volume_address, "volume.sock")?;
    let bucket_path = socket(&args.bucket_address, "bucket.sock")?;

    let ready_delay = Duration::from_millis(args.ready_delay_ms);
    let machine = MachineRuntime::new(MachineConfig {
        ready_delay,
        exec_base_url: args.exec_base_url,
        off_state: if args.suspend_when_off {
            iri_api::machine::v1alpha1::MachineState::MachineSuspended
        } else {
            iri_api::machine::v1alpha1::MachineState::MachineStopped
        },
        ..Default::default()
    });
    let volume = VolumeRuntime::new(VolumeConfig {
        ready_delay,
        ..Default::default()
    });
    let bucket = BucketRuntime::new(BucketConfig {
        ready_delay,
        endpoint: args.bucket_endpoint,
        ..Default::default()
    });

    let fail = |what: &str, path: &Path, e: std::io::Error| {
        format!("cannot serve {what} runtime on {}: {e}", path.display())
    };
    let machine_served = serve_machine_unix(machine, &machine_path)
        .await
        .map_err(|e| fail("machine", &machine_path, e))?;
    let volume_served = serve_volume_unix(volume, &volume_path)
        .await
        .map_err(|e| fail("volume", &volume_path, e))?;
    let bucket_served = serve_bucket_unix(bucket, &bucket_path)
        .await
        .map_err(|e| fail("bucket", &bucket_path, e))?;

    println!("iri-reference-runtime: in-memory TEST DOUBLE (nothing real is created; state is lost on exit)");
    println!("  machine runtime: unix://{}", machine_path.display());
    println!("  volume runtime:  unix://{}", volume_path.display());
    println!("  bucket runtime:  unix://{}", bucket_path.display());
    println!("Point irictl at them with --address, or:");
    println!(
        "  export IRI_MACHINE_RUNTIME_ENDPOINT=unix://{}",
        machine_path.display()
    );
    println!(
        "  export IRI_VOLUME_RUNTIME_ENDPOINT=unix://{}",
        volume_path.display()
    );
    println!(
        "  export IRI_BUCKET_RUNTIME_ENDPOINT=unix://{}",
        bucket_path.display()
    );
    println!("Press Ctrl-C to stop.");

    wait_for_stop_signal().await;
    println!("iri-reference-runtime: stopping");
    tokio::join!(
        machine_served.shutdown(),
        volume_served.shutdown(),
        bucket_served.shutdown()
    );
    Ok(())
}

/// Ctrl-C (SIGINT) or SIGTERM, so it also stops cleanly under a process supervisor.
async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
