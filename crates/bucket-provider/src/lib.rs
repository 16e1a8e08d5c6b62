// SPDX-License-Identifier: Apache-2.0
//! The IRI BucketRuntime provider: buckets served by an S3 server embedded in the provider.
//!
//! Same inner shape as every provider: `server` (the gRPC adapter: validate, one store
//! transaction, return) → `store` (iri-runtime's SQLite store, holding IRI `Bucket`s) →
//! `reconcile` (workers that make the backend hold what the store asks for and write the
//! observed access back) → `backend` (a trait; `embedded` is our own S3 server over durable
//! files, see [`backend::embedded`]).
//!
//! [`run`] wires them together; the binary adds flags and logging.

/// The default log filter of a process serving S3: `s3s` is off (it logs every refused request
/// at ERROR level).
pub const LOG_FILTER: &str = "info,s3s=off";

pub mod backend;
pub mod config;
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
use iri_api::{MAX_MESSAGE_SIZE, bucket::v1alpha1::bucket_runtime_server::BucketRuntimeServer};
use iri_runtime::{Store, StoreOptions, metrics::Metrics, server::RuntimeServer};

use crate::{
    backend::{Backend, embedded::EmbeddedBackend},
    config::Config,
    reconcile::Reconciler,
    server::{BucketService, RUNTIME_NAME},
};

/// The store file inside the data directory.
pub const STORE_FILE: &str = "store.db";
/// The `embedded` backend's directory inside the data directory.
pub const EMBEDDED_DIR: &str = "embedded";
/// How long reconcile workers get to finish the bucket they are on at shutdown.
const WORKER_GRACE: Duration = Duration::from_secs(10);

/// Runs the provider until `shutdown` completes: opens the store and the S3 storage in the data
/// directory, removes buckets no record references, starts the reconciler and the S3 server,
/// and serves IRI.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    config.validate()?;
    let serve_options = config.server.serve_options()?;
    let data_dir = std::path::absolute(&config.server.data_dir)
        .with_context(|| format!("data directory {}", config.server.data_dir.display()))?;
    create_private_dir(&data_dir)?;

    // The store is locked exclusively: a second provider on the same data directory stops
    // here, before it touches the S3 storage.
    let store = Store::open(&data_dir.join(STORE_FILE), StoreOptions::default())?;
    let metrics = Arc::new(Metrics::new());
    store.register_metrics(&metrics);
    let (embedded, s3_server) = EmbeddedBackend::start(&data_dir.join(EMBEDDED_DIR), &config.s3, &metrics)
        .await
        .context("starting backend embedded")?;
    let endpoint = embedded.endpoint().to_string();
    let s3_address = s3_server.local_addr();
    let backend: Arc<dyn Backend> = Arc::new(embedded);

    let reconciler = Reconciler::new(store.clone(), backend.clone(), config.classes.clone());
    if let Err(err) = reconciler.remove_orphans().await {
        // Orphans only waste space; serving matters more. The next start tries again.
        tracing::warn!(%err, "cannot look for orphaned buckets");
    }
    let workers = reconciler.start(
        config.workers,
        Duration::from_secs(config.resync_seconds),
        Some(metrics.clone()),
    );

    let (stop_s3, s3_stopped) = tokio::sync::watch::channel(false);
    let s3_task = tokio::spawn(s3_server.serve(async move {
        let mut stopped = s3_stopped;
        let _ = stopped.wait_for(|s| *s).await;
    }));

    let service = BucketRuntimeServer::new(BucketService::new(store, &config))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let server = RuntimeServer::new(serve_options.clone(), metrics)
        .add_service(service)
        .bind()
        .await?;
    println!(
        "{RUNTIME_NAME} {} serving bucket.v1alpha1.BucketRuntime on {} and S3 on {endpoint} (listening on {}, data directory {})",
        env!("CARGO_PKG_VERSION"),
        serve_options.address,
        s3_address.map_or_else(|| "?".to_string(), |a| a.to_string()),
        data_dir.display()
    );
    let served = server.serve(shutdown).await;
    let _ = stop_s3.send(true);
    let _ = s3_task.await;
    workers.shut_down(WORKER_GRACE).await;
    served?;
    Ok(())
}

/// Creates `dir` (and parents) if missing and makes it 0700: it holds the store, the
/// credentials and the objects, which only the provider may read.
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
