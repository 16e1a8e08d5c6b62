// SPDX-License-Identifier: Apache-2.0
//! Serving the reference runtimes on unix sockets, through the same bootstrap real providers use
//! (`iri_runtime::server`): socket mode 0600, stale sockets replaced, live ones refused, health
//! and reflection services.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use iri_api::{
    MAX_MESSAGE_SIZE, bucket::v1alpha1::bucket_runtime_server::BucketRuntimeServer,
    machine::v1alpha1::machine_runtime_server::MachineRuntimeServer,
    volume::v1alpha1::volume_runtime_server::VolumeRuntimeServer,
};
use iri_runtime::{
    metrics::Metrics,
    server::{ListenAddress, RuntimeServer, ServeOptions},
};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::{BucketRuntime, MachineRuntime, VolumeRuntime};

/// How long [`Served::shutdown`] waits for open connections to finish before it cuts them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A runtime being served on a unix socket.
///
/// Dropping it stops the server and removes the socket at once; connected clients are told to go
/// away gracefully in the background. [`Served::shutdown`] does the same but waits (a few seconds
/// at most) until the server has finished.
#[derive(Debug)]
pub struct Served {
    /// The socket the runtime listens on.
    pub path: PathBuf,
    /// Device and inode of our socket, so we never remove a socket someone else bound later.
    socket_id: Option<(u64, u64)>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<iri_runtime::Result<()>>>,
}

impl Served {
    /// Stops the server, waits up to a few seconds for in-flight calls, and removes the socket.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await.is_err()
        {
            // A client kept its connection open past the grace period.
            task.abort();
        }
        // Drop removes the socket if the server did not already.
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The server task finishes in the background: open connections get a graceful GOAWAY,
        // so in-flight calls complete and later calls fail (the socket is gone, too).
        drop(self.task.take());
        if self.socket_id.is_some() && self.socket_id == socket_id(&self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves `runtime` as `machine.v1alpha1.MachineRuntime` on the unix socket `path` (mode 0600);
/// returns once the socket accepts connections. A stale socket at `path` is replaced; a live one
/// or any other file there is an error.
pub async fn serve_machine_unix(runtime: MachineRuntime, path: &Path) -> io::Result<Served> {
    let service = MachineRuntimeServer::new(runtime)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    serve_unix(server(path).add_service(service), path).await
}

/// Serves `runtime` as `volume.v1alpha1.VolumeRuntime` on the unix socket `path`; see
/// [`serve_machine_unix`].
pub async fn serve_volume_unix(runtime: VolumeRuntime, path: &Path) -> io::Result<Served> {
    let service = VolumeRuntimeServer::new(runtime)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    serve_unix(server(path).add_service(service), path).await
}

/// Serves `runtime` as `bucket.v1alpha1.BucketRuntime` on the unix socket `path`; see
/// [`serve_machine_unix`].
pub async fn serve_bucket_unix(runtime: BucketRuntime, path: &Path) -> io::Result<Served> {
    let service = BucketRuntimeServer::new(runtime)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    serve_unix(server(path).add_service(service), path).await
}

fn server(path: &Path) -> RuntimeServer {
    RuntimeServer::new(
        ServeOptions::new(ListenAddress::Unix(path.to_path_buf())),
        Arc::new(Metrics::new()),
    )
}

async fn serve_unix(server: RuntimeServer, path: &Path) -> io::Result<Served> {
    let bound = server.bind().await.map_err(|e| {
        let kind = match e {
            iri_runtime::Error::InvalidArgument { .. } => io::ErrorKind::AlreadyExists,
            iri_runtime::Error::Unavailable(_) => io::ErrorKind::AddrInUse,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e.to_string())
    })?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(bound.serve(async move {
        // Dropping the sender counts as a stop request too.
        let _ = stopped.await;
    }));
    Ok(Served {
        path: path.to_path_buf(),
        socket_id: socket_id(path),
        stop: Some(stop),
        task: Some(task),
    })
}

fn socket_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}
