// SPDX-License-Identifier: Apache-2.0
//! The IRI VolumeRuntime provider.
//!
//! Same inner shape as every provider: `server` (the gRPC adapter: validate, one store
//! transaction, return) → `store` (iri-runtime's SQLite store, holding [`record`]s) →
//! `reconcile` (workers that drive the backend toward the stored desired state and write
//! observed status back) → `backend` (a trait; `local` serves qcow2 files through
//! qemu-storage-daemon).
//!
//! [`run`] wires them together; the binary adds flags and logging.

pub mod backend;
pub mod config;
pub mod keys;
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
use iri_api::{MAX_MESSAGE_SIZE, volume::v1alpha1::volume_runtime_server::VolumeRuntimeServer};
use iri_runtime::{Store, StoreOptions, metrics::Metrics, server::RuntimeServer};

use crate::{
    backend::{Backend, local::LocalBackend},
    config::Config,
    keys::Kek,
    reconcile::Reconciler,
    server::{RUNTIME_NAME, VolumeService},
};

/// The store file inside the data directory.
pub const STORE_FILE: &str = "store.db";
/// The default key-encryption key file, relative to the data directory.
pub const KEY_FILE: &str = "kek";
/// The `local` backend's directory inside the data directory.
pub const LOCAL_DIR: &str = "local";
/// How long reconcile workers get to finish the object they are on at shutdown.
const WORKER_GRACE: Duration = Duration::from_secs(10);

/// Runs the provider until `shutdown` completes: opens the store and the backend in the data
/// directory, removes backend leftovers no record references, starts the reconciler, and
/// serves IRI. On shutdown the storage daemon keeps running, so volumes stay served to the
/// machines using them; the next start adopts it.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    config.validate()?;
    let serve_options = config.server.serve_options()?;
    let data_dir = std::path::absolute(&config.server.data_dir)
        .with_context(|| format!("data directory {}", config.server.data_dir.display()))?;
    create_private_dir(&data_dir)?;
    let mut config = config;
    config.server.data_dir = data_dir.clone();

    // The store is locked exclusively: a second provider on the same data directory stops
    // here, before it touches the backend.
    let store = Store::open(&data_dir.join(STORE_FILE), StoreOptions::default())?;
    let key_file = data_dir.join(&config.key_file);
    let kek = Arc::new(Kek::load_or_create(&key_file, || {
        encrypted_data_exists(&store, &data_dir.join(LOCAL_DIR))
    })?);
    let backend: Arc<dyn Backend> = Arc::new(
        LocalBackend::start(&data_dir.join(LOCAL_DIR), &config.local, kek.clone())
            .await
            .context("starting backend local")?,
    );

    let metrics = Arc::new(Metrics::new());
    store.register_metrics(&metrics);
    let reconciler = Reconciler::new(store.clone(), backend.clone(), config.classes.clone());
    if let Err(err) = reconciler.remove_orphans().await {
        // Orphans only waste space; serving matters more. The next start tries again.
        tracing::warn!(%err, "cannot look for orphaned backend objects");
    }
    let workers = reconciler.start(
        config.workers,
        Duration::from_secs(config.resync_seconds),
        Some(metrics.clone()),
    );

    let service = VolumeRuntimeServer::new(VolumeService::new(store, backend, kek, &config))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let server = RuntimeServer::new(serve_options.clone(), metrics)
        .add_service(service)
        .bind()
        .await?;
    println!(
        "{RUNTIME_NAME} {} serving volume.v1alpha1.VolumeRuntime on {} (data directory {})",
        env!("CARGO_PKG_VERSION"),
        serve_options.address,
        data_dir.display()
    );
    let served = server.serve(shutdown).await;
    workers.shut_down(WORKER_GRACE).await;
    served?;
    Ok(())
}

/// Whether anything is wrapped with a KEK already: an encrypted volume record, or a layer key.
fn encrypted_data_exists(store: &Store, local_dir: &Path) -> bool {
    let records = store
        .list::<record::VolumeRecord>(&Default::default())
        .iter()
        .any(|r| !r.object.encryption_key.is_empty());
    let keys = std::fs::read_dir(local_dir.join("layers")).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".key"))
    });
    records || keys
}

/// Creates `dir` (and parents) if missing and makes it 0700: it holds the store and the
/// volumes, which only the provider may read.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making data directory {} private", dir.display()))?;
    Ok(())
}
