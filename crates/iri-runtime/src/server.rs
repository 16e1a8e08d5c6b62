// SPDX-License-Identifier: Apache-2.0
//! Serving an IRI runtime: a unix socket (mode 0600 by default, stale sockets replaced safely) or
//! TCP; the gRPC health and reflection services; RPC metrics and logs; a Prometheus `/metrics`
//! endpoint; graceful shutdown on SIGTERM/SIGINT.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::{body::Body, server::NamedService, service::Routes, transport::Server};
use tower::{Layer, Service};

use crate::{Error, Result, metrics::Metrics};

/// Where a runtime listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl std::str::FromStr for ListenAddress {
    type Err = Error;

    /// Accepts `/path`, `unix:///path`, `unix:/path`, `tcp://ip:port`.
    fn from_str(s: &str) -> Result<Self> {
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
            .or(Some(s))
            && path.starts_with('/')
        {
            return Ok(ListenAddress::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            return addr
                .parse()
                .map(ListenAddress::Tcp)
                .map_err(|_| Error::invalid("address", format!("{s:?}: expected tcp://<ip>:<port>")));
        }
        Err(Error::invalid(
            "address",
            format!("{s:?}: expected an absolute socket path, unix:///path or tcp://<ip>:<port>"),
        ))
    }
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Unix(p) => write!(f, "unix://{}", p.display()),
            ListenAddress::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where the gRPC server listens.
    pub address: ListenAddress,
    /// Permission bits of the unix socket. Default 0600: only the owner (the poollet sidecar
    /// running as the same user) may connect.
    pub socket_mode: u32,
    /// Where `/metrics` is served over HTTP; `None` disables it.
    pub metrics_address: Option<SocketAddr>,
}

impl ServeOptions {
    /// Defaults for `address`: socket mode 0600, no metrics endpoint.
    pub fn new(address: ListenAddress) -> Self {
        ServeOptions {
            address,
            socket_mode: 0o600,
            metrics_address: None,
        }
    }
}

/// A gRPC server for one or more IRI services, with health, reflection and metrics.
pub struct RuntimeServer {
    options: ServeOptions,
    metrics: Arc<Metrics>,
    routes: Routes,
    service_names: Vec<&'static str>,
}

impl RuntimeServer {
    /// A server with the health and reflection services and nothing else yet.
    pub fn new(options: ServeOptions, metrics: Arc<Metrics>) -> Self {
        RuntimeServer {
            options,
            metrics,
            routes: Routes::default(),
            service_names: Vec::new(),
        }
    }

    /// Adds a service (e.g. a `MachineRuntimeServer`), reported as SERVING by the health service.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.service_names.push(S::NAME);
        self.routes = self.routes.add_service(service);
        self
    }

    /// Binds the listeners. Errors here (address in use, a non-socket file at the socket path)
    /// are the ones an operator must see before the process claims to be up.
    pub async fn bind(self) -> Result<BoundServer> {
        let listener = match &self.options.address {
            ListenAddress::Unix(path) => {
                let (listener, guard) = bind_unix(path, self.options.socket_mode).await?;
                Listener::Unix(listener, guard)
            }
            ListenAddress::Tcp(addr) => Listener::Tcp(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::Unavailable(format!("cannot listen on {addr}: {e}")))?,
            ),
        };
        let metrics_listener = match self.options.metrics_address {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::Unavailable(format!("cannot serve metrics on {addr}: {e}")))?,
            ),
            None => None,
        };
        Ok(BoundServer {
            server: self,
            listener,
            metrics_listener,
        })
    }
}

enum Listener {
    Unix(UnixListener, SocketGuard),
    Tcp(TcpListener),
}

/// Removes the socket file we created when dropped, but only if it is still ours (a newer server
/// may have replaced it).
struct SocketGuard {
    path: PathBuf,
    inode: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path` with `mode`, handling a leftover socket file safely: a socket that still accepts
/// connections belongs to a live server (refuse); one that refuses is stale (replace); anything
/// that is not a socket is never deleted (refuse).
async fn bind_unix(path: &Path, mode: u32) -> Result<(UnixListener, SocketGuard)> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(Error::Unavailable(format!(
                    "{shown} is in use by a running server; stop it or choose another --address"
                )));
            }
            std::fs::remove_file(path)
                .map_err(|e| Error::Internal(format!("removing stale socket {shown}: {e}")))?;
        }
        Ok(_) => {
            return Err(Error::invalid(
                "address",
                format!("{shown} exists and is not a socket; refusing to replace it"),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::Internal(format!("{shown}: {e}"))),
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| Error::Internal(format!("creating {}: {e}", parent.display())))?;
    }
    // Bind inside a private directory, fix the mode, then rename into place: the socket is
    // never reachable with looser permissions, not even for an instant.
    let staging = tempdir_in(parent)?;
    let staged = staging.join("s");
    let listener = UnixListener::bind(&staged)
        .map_err(|e| Error::Unavailable(format!("cannot listen on {shown}: {e}")))?;
    let result = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&staged, path));
    let _ = std::fs::remove_dir(&staging);
    result.map_err(|e| Error::Internal(format!("placing socket at {shown}: {e}")))?;
    let inode = std::fs::symlink_metadata(path)
        .map(|m| m.ino())
        .unwrap_or_default();
    Ok((
        listener,
        SocketGuard {
            path: path.to_path_buf(),
            inode,
        },
    ))
}

/// A fresh 0700 directory next to the socket.
fn tempdir_in(parent: &Path) -> Result<PathBuf> {
    for attempt in 0..16u32 {
        let mut raw = [0u8; 6];
        getrandom::fill(&mut raw).map_err(Error::internal)?;
        let suffix: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let dir = parent.join(format!(".iri-socket-{}-{suffix}-{attempt}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::Internal(format!("creating {}: {e}", dir.display()))),
        }
    }
    Err(Error::Internal(
        "cannot create a staging directory for the socket".into(),
    ))
}

/// A server whose listeners are bound; [`BoundServer::serve`] runs it.
pub struct BoundServer {
    server: RuntimeServer,
    listener: Listener,
    metrics_listener: Option<TcpListener>,
}

impl BoundServer {
    /// The metrics endpoint's actual address (useful with port 0).
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The gRPC listener's actual TCP address, if it listens on TCP.
    pub fn tcp_address(&self) -> Option<SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight RPCs finish,
    /// reports NOT_SERVING, and removes the socket.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let BoundServer {
            server,
            listener,
            metrics_listener,
        } = self;
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        for name in &server.service_names {
            health_reporter
                .set_service_status(*name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(iri_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(Error::internal)?;
        let routes = server.routes.add_service(health_service).add_service(reflection);

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics_task = metrics_listener.map(|l| {
            let metrics = server.metrics.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let app = axum::Router::new().route(
                    "/metrics",
                    axum::routing::get(move || {
                        let metrics = metrics.clone();
                        async move {
                            (
                                [(
                                    http::header::CONTENT_TYPE,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )],
                                metrics.encode(),
                            )
                        }
                    }),
                );
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
            })
        });

        let signal = {
            let reporter = health_reporter.clone();
            let names = server.service_names.clone();
            async move {
                shutdown.await;
                for name in names {
                    reporter
                        .set_service_status(name, tonic_health::ServingStatus::NotServing)
                        .await;
                }
                let _ = stop_tx.send(true);
            }
        };

        let builder = Server::builder()
            .layer(OperationLayer {
                metrics: server.metrics.clone(),
            })
            .add_routes(routes);
        tracing::info!(address = %server.options.address, services = ?server.service_names, "serving");
        let result = match listener {
            Listener::Unix(listener, guard) => {
                let result = builder
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal)
                    .await;
                drop(guard);
                result
            }
            Listener::Tcp(l) => {
                builder
                    .serve_with_incoming_shutdown(TcpListenerStream::new(l), signal)
                    .await
            }
        };
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
        tracing::info!("stopped");
        result.map_err(|e| Error::Internal(format!("gRPC server: {e}")))
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// Records `iri_operations_seconds` and logs every RPC.
#[derive(Clone)]
struct OperationLayer {
    metrics: Arc<Metrics>,
}

impl<S> Layer<S> for OperationLayer {
    type Service = OperationService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OperationService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
struct OperationService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<http::Request<B>> for OperationService<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let started = Instant::now();
        let future = self.inner.call(request);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = future.await;
            let elapsed = started.elapsed();
            // Unary handlers that fail answer "trailers-only": the status is in the headers. A
            // success carries grpc-status 0 in the trailers, which we do not wait for.
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from)
                    .unwrap_or(tonic::Code::Ok),
                Err(_) => tonic::Code::Unknown,
            };
            let (service, method) = split_path(&path);
            // Health checks and reflection are not IRI operations; keep them out of the histogram.
            if !service.starts_with("grpc.") {
                metrics.observe_operation(service, method, code, elapsed);
            }
            log_operation(service, method, code, elapsed);
            response
        })
    }
}

fn log_operation(service: &str, method: &str, code: tonic::Code, elapsed: Duration) {
    let code = crate::metrics::code_name(code);
    match code {
        // Codes that mean "our fault" deserve attention; client mistakes and NotFound polling
        // (poollets delete in tight loops) do not.
        "Internal" | "Unknown" | "DataLoss" | "Unavailable" => {
            tracing::warn!(service, method, code, ?elapsed, "rpc failed")
        }
        _ => tracing::debug!(service, method, code, ?elapsed, "rpc"),
    }
}

/// `/machine.v1alpha1.MachineRuntime/CreateMachine` → (`machine.v1alpha1.MachineRuntime`, `CreateMachine`).
fn split_path(path: &str) -> (&str, &str) {
    path.trim_start_matches('/').split_once('/').unwrap_or((path, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!(
            "/run/x.sock".parse::<ListenAddress>().unwrap(),
            ListenAddress::Unix("/run/x.sock".into())
        );
        assert_eq!(
            "unix:///run/x.sock".parse::<ListenAddress>().unwrap(),
            ListenAddress::Unix("/run/x.sock".into())
        );
        assert_eq!(
            "tcp://127.0.0.1:9000".parse::<ListenAddress>().unwrap(),
            ListenAddress::Tcp("127.0.0.1:9000".parse().unwrap())
        );
        for bad in ["x.sock", "tcp://host", "http://1.2.3.4:5", "unix://rel"] {
            assert!(bad.parse::<ListenAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn splits_grpc_paths() {
        assert_eq!(
            split_path("/machine.v1alpha1.MachineRuntime/CreateMachine"),
            ("machine.v1alpha1.MachineRuntime", "CreateMachine")
        );
    }
}
