// SPDX-License-Identifier: Apache-2.0
//! IRI MachineRuntime provider: one QEMU process per machine, driven over QMP.
//!
//! Same inner shape as every provider: `server` (the gRPC adapter: validate, one store
//! transaction, return) → `store` (iri-runtime's SQLite store, holding [`record`]s) →
//! `reconcile` (workers that drive QEMU toward the stored desired state and write observed
//! status back) → `machines`/`qemu` (QEMU processes, their QMP and console connections).
//! `exec` serves console sessions over the Kubernetes remote-command WebSocket protocol.
//!
//! # Boot images
//!
//! The image of a machine's `local_disk` volume is an IronCore OCI image ([`images`]: kernel
//! and initramfs booted directly, a rootfs copied into the disk) or a local directory
//! (`file:///dir` or `/dir`) inside one of the configured `image_dirs`, holding `vmlinuz`,
//! `initramfs` (or `initramfs.cpio.gz`) and optionally `cmdline` (extra kernel arguments);
//! `scripts/test-guest` builds such a directory. Without a kernel the machine boots its first
//! disk with UEFI firmware (OVMF). Ignition data reaches the guest as fw_cfg
//! `opt/com.coreos/config`, the hostname as fw_cfg `opt/dev.ironcore/hostname` and as
//! `hostname=`/`systemd.hostname=` on the kernel command line.
//!
//! # What it attaches
//!
//! * volumes: `local_disk` (a sparse qcow2 in the machine directory, or made from an OCI
//!   image's rootfs) and `connection` with driver `nbd` (the volume provider's; over TCP with
//!   TLS given `nbd_tls_dir`), at start and by hot-plug into pre-created PCIe root ports, grown
//!   online by UpdateVolume; `ceph` (upstream's access, QEMU's rbd driver, see [`ceph`]);
//!   other drivers stay PENDING with a Warning event;
//! * network interfaces: plugin `bridge` (a tap on a configured Linux bridge) or `isolated`
//!   (QEMU user-mode networking, `restrict=on`), at start and by hot-plug.
//!
//! [`run`] wires it together; the binary adds flags and logging.

pub mod ceph;
pub mod config;
pub mod console;
pub mod exec;
pub mod images;
pub mod machines;
pub mod nbd;
pub mod network;
pub mod qemu;
pub mod reconcile;
pub mod record;
pub mod server;

use std::{
    future::Future,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use iri_api::{MAX_MESSAGE_SIZE, machine::v1alpha1::machine_runtime_server::MachineRuntimeServer};
use iri_runtime::{ObjectFilter, Store, StoreOptions, metrics::Metrics, server::RuntimeServer};

use crate::{
    config::Config,
    exec::ExecServer,
    machines::Machines,
    reconcile::Reconciler,
    record::MachineRecord,
    server::{MachineService, RUNTIME_NAME},
};

/// The store file inside the data directory.
pub const STORE_FILE: &str = "store.db";
/// The machines' directory inside the data directory.
pub const MACHINES_DIR: &str = "machines";
/// How long reconcile workers get to finish the machine they are on at shutdown.
const WORKER_GRACE: Duration = Duration::from_secs(10);

/// Runs the provider until `shutdown` completes: opens the store, adopts the QEMU processes
/// of machines that still run, removes leftovers no record references, starts the reconciler
/// and the exec streaming server, and serves IRI. On shutdown every QEMU keeps running; the
/// next start adopts it.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    config.validate()?;
    let serve_options = config.server.serve_options()?;
    let data_dir = std::path::absolute(&config.server.data_dir)
        .with_context(|| format!("data directory {}", config.server.data_dir.display()))?;
    create_private_dir(&data_dir)?;
    create_private_dir(&data_dir.join(MACHINES_DIR))?;
    let mut config = config;
    config.server.data_dir = data_dir.clone();
    config.qemu.accel = qemu::usable_accel(&config.qemu, &data_dir).await;
    let config = Arc::new(config);

    // The store is locked exclusively: a second provider on the same data directory stops
    // here, before it touches any QEMU.
    let store = Store::open(&data_dir.join(STORE_FILE), StoreOptions::default())?;
    for stored in store.list::<MachineRecord>(&ObjectFilter::default()) {
        if config.class(stored.object.class()).is_none() {
            tracing::warn!(
                id = %stored.object.id(),
                class = %stored.object.class(),
                "machine of a class that is no longer configured: its resources are not accounted"
            );
        }
    }
    let machines = Arc::new(Machines::new(data_dir.join(MACHINES_DIR), config.qemu.clone()));

    let exec = Arc::new(ExecServer::new(
        machines.clone(),
        config.exec.max_sessions,
        Duration::from_secs(config.exec.url_seconds),
    ));
    let exec_listener = tokio::net::TcpListener::bind(&config.exec.address)
        .await
        .with_context(|| format!("exec streaming server on {}", config.exec.address))?;
    let exec_address = exec_listener.local_addr()?;
    exec.set_base_url(if config.exec.base_url.is_empty() {
        format!("http://{exec_address}")
    } else {
        config.exec.base_url.clone()
    });

    let metrics = Arc::new(Metrics::new());
    store.register_metrics(&metrics);
    {
        let machines_count = machines.clone();
        metrics.register_gauge(
            "iri_machine_qemu_processes",
            "QEMU processes the provider holds (running machines)",
            move || vec![(Vec::new(), machines_count.pids().len() as i64)],
        );
        let machines_rss = machines.clone();
        metrics.register_gauge(
            "iri_machine_qemu_resident_bytes",
            "Resident memory of each machine's QEMU process",
            move || {
                let mut samples: Vec<_> = machines_rss
                    .pids()
                    .into_iter()
                    .filter_map(|(id, pid)| {
                        Some((vec![("machine".to_string(), id)], qemu::resident_bytes(pid)?))
                    })
                    .collect();
                samples.sort();
                samples
            },
        );
    }
    let reconciler = Reconciler::new(store.clone(), machines.clone(), config.clone());
    reconciler.remove_orphans().await;
    reconciler.retry_failed_starts().await;
    let workers = reconciler.start(
        config.workers,
        Duration::from_secs(config.resync_seconds),
        Some(metrics.clone()),
    );

    let (stop_exec, exec_stopped) = tokio::sync::watch::channel(false);
    let exec_task = {
        let router = exec.router();
        let mut stopped = exec_stopped.clone();
        tokio::spawn(async move {
            let served = axum::serve(exec_listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
            if let Err(err) = served {
                tracing::error!(%err, "exec streaming server failed");
            }
        })
    };

    let service = MachineRuntimeServer::new(MachineService::new(store, config.clone(), exec))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let server = RuntimeServer::new(serve_options.clone(), metrics)
        .add_service(service)
        .bind()
        .await?;
    println!(
        "{RUNTIME_NAME} {} serving machine.v1alpha1.MachineRuntime on {} (data directory {}, exec on http://{exec_address})",
        env!("CARGO_PKG_VERSION"),
        serve_options.address,
        data_dir.display()
    );
    let served = server.serve(shutdown).await;
    let _ = stop_exec.send(true);
    // Open exec sessions would keep the server up; they end with the process.
    let _ = tokio::time::timeout(Duration::from_secs(2), exec_task).await;
    workers.shut_down(WORKER_GRACE).await;
    if config.stop_machines_on_exit {
        machines
            .power_down_all(Duration::from_secs(config.power_off_grace_seconds))
            .await;
    }
    served?;
    Ok(())
}

/// Creates `dir` (and parents) if missing and makes it 0700: it holds the store, the disks,
/// ignition data and sockets, which only the provider may reach.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))?;
    Ok(())
}
