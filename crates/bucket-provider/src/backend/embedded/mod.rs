// SPDX-License-Identifier: Apache-2.0
//! Backend `embedded`: an S3 server inside the provider process, on its own TCP address, over
//! durable storage in the data directory.
//!
//! Addressing: path-style (`http://127.0.0.1:7480/<bucket>/<key>`) always works and is what
//! `status.access.endpoint` is for. Virtual-host style (`http://<bucket>.<domain>/<key>`) works
//! too when `s3.virtual_host_domain` is set and `*.<domain>` resolves to the server.

pub mod auth;
pub mod limit;
pub mod s3;
pub mod storage;

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use hyper_util::rt::TokioIo;
use iri_runtime::{Error, Result, metrics::Metrics};
use s3s::service::{S3Service, S3ServiceBuilder};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use self::{
    auth::{BucketAccess, BucketAuth, OperationSlot, VirtualHosts},
    s3::S3Api,
    storage::Storage,
};
use super::{
    ACCESS_KEY_ID, Access, BUCKET_HOST, BUCKET_NAME, BUCKET_PORT, BUCKET_REGION, Backend, BackendError,
    BackendResult, BucketPlan, SECRET_ACCESS_KEY,
};

/// The default S3 listen address: loopback only, so nothing is exposed unless asked for.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:7480";

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The `[s3]` table of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Settings {
    /// Where the S3 server listens (`ip:port`; port 0 picks a free one).
    pub address: String,
    /// The endpoint URL handed to clients; empty = `http://<address>` (the bound address).
    /// Set it when listening on 0.0.0.0 or behind a proxy.
    pub endpoint: String,
    /// The region clients sign requests for (`BUCKET_REGION`). Requests signed for another
    /// region are refused by the signature check.
    pub region: String,
    /// Domain for virtual-host-style addressing (`<bucket>.<domain>`); empty = path-style only.
    pub virtual_host_domain: String,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            address: DEFAULT_ADDRESS.to_string(),
            endpoint: String::new(),
            region: "us-east-1".to_string(),
            virtual_host_domain: String::new(),
        }
    }
}

impl S3Settings {
    /// Checks the settings; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        let address: SocketAddr = self.address.parse().map_err(|_| {
            Error::invalid(
                "s3.address",
                format!("{:?} is not an ip:port address", self.address),
            )
        })?;
        if address.ip().is_unspecified() && self.endpoint.is_empty() {
            return Err(Error::invalid(
                "s3.endpoint",
                "must be set when s3.address listens on all interfaces: clients need a reachable URL",
            ));
        }
        if !self.endpoint.is_empty() {
            endpoint_host_port(&self.endpoint).map_err(|e| Error::invalid("s3.endpoint", e))?;
        }
        if self.region.is_empty()
            || !self
                .region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(Error::invalid(
                "s3.region",
                format!("{:?} is not a region name", self.region),
            ));
        }
        if !self.virtual_host_domain.is_empty()
            && !self
                .virtual_host_domain
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(Error::invalid(
                "s3.virtual_host_domain",
                format!("{:?} is not a domain name", self.virtual_host_domain),
            ));
        }
        Ok(())
    }
}

/// Host and port of an `http(s)://host[:port][/]` URL, the port defaulted by scheme.
pub fn endpoint_host_port(endpoint: &str) -> std::result::Result<(String, u16), String> {
    let (scheme, rest) = endpoint.split_once("://").ok_or("expected http://host[:port]")?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return Err(format!("scheme {scheme:?} is neither http nor https")),
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
        return Err(format!(
            "{endpoint:?} must be scheme://host[:port] without path or user"
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed '['")?;
        (host.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or(format!("bad port {p:?}"))?,
    };
    if host.is_empty() {
        return Err("empty host".to_string());
    }
    Ok((host, port))
}

/// Counts of S3 requests by operation and HTTP status, exported at scrape time.
#[derive(Debug, Default)]
pub struct S3Metrics {
    requests: Mutex<BTreeMap<(String, u16), (u64, f64)>>,
}

impl S3Metrics {
    fn observe(&self, operation: &str, status: u16, seconds: f64) {
        let mut requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = requests.entry((operation.to_string(), status)).or_default();
        entry.0 += 1;
        entry.1 += seconds;
    }

    /// Registers `iri_s3_requests{operation,status}` and
    /// `iri_s3_request_milliseconds{operation,status}` (sums) with `metrics`.
    pub fn register(self: &Arc<Self>, metrics: &Metrics) {
        let this = self.clone();
        metrics.register_gauge(
            "iri_s3_requests",
            "S3 requests served, by operation and HTTP status (a running count)",
            move || this.samples(|(count, _)| i64::try_from(*count).unwrap_or(i64::MAX)),
        );
        let this = self.clone();
        metrics.register_gauge(
            "iri_s3_request_milliseconds",
            "Total time spent serving S3 requests, by operation and HTTP status (a running sum)",
            move || this.samples(|(_, seconds)| (seconds * 1000.0) as i64),
        );
    }

    fn samples(&self, value: impl Fn(&(u64, f64)) -> i64) -> Vec<(Vec<(String, String)>, i64)> {
        let requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        requests
            .iter()
            .map(|((operation, status), v)| {
                (
                    vec![
                        ("operation".to_string(), operation.clone()),
                        ("status".to_string(), status.to_string()),
                    ],
                    value(v),
                )
            })
            .collect()
    }
}

/// The embedded backend: the storage, and the endpoint clients reach it at.
#[derive(Debug, Clone)]
pub struct EmbeddedBackend {
    storage: Arc<Storage>,
    endpoint: String,
    host: String,
    port: u16,
    region: String,
}

/// The bound S3 server; [`S3Server::serve`] runs it.
pub struct S3Server {
    listener: TcpListener,
    service: S3Service,
    metrics: Arc<S3Metrics>,
}

impl EmbeddedBackend {
    /// Opens the storage in `dir` and binds the S3 listener (so a busy port fails the start).
    pub async fn start(
        dir: &Path,
        settings: &S3Settings,
        metrics: &Metrics,
    ) -> anyhow::Result<(Self, S3Server)> {
        settings.validate()?;
        let dir = dir.to_path_buf();
        let storage = Arc::new(
            tokio::task::spawn_blocking(move || Storage::open(&dir))
                .await
                .map_err(|e| anyhow::anyhow!("storage task: {e}"))??,
        );
        let listener = TcpListener::bind(&settings.address)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for S3 on {}: {e}", settings.address))?;
        let bound = listener.local_addr()?;
        let endpoint = if settings.endpoint.is_empty() {
            format!("http://{bound}")
        } else {
            settings.endpoint.trim_end_matches('/').to_string()
        };
        let (host, port) = endpoint_host_port(&endpoint).map_err(|e| anyhow::anyhow!("s3.endpoint: {e}"))?;

        let mut builder = S3ServiceBuilder::new(S3Api::new(storage.clone(), settings.region.clone()));
        builder.set_auth(BucketAuth::new(storage.clone()));
        builder.set_access(BucketAccess::new(storage.clone()));
        if !settings.virtual_host_domain.is_empty() {
            builder.set_host(VirtualHosts::new(&settings.virtual_host_domain));
        }
        let s3_metrics = Arc::new(S3Metrics::default());
        s3_metrics.register(metrics);
        let backend = EmbeddedBackend {
            storage,
            endpoint,
            host,
            port,
            region: settings.region.clone(),
        };
        Ok((
            backend,
            S3Server {
                listener,
                service: builder.build(),
                metrics: s3_metrics,
            },
        ))
    }

    /// The endpoint URL clients are given.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn access(&self, bucket: &storage::BucketData) -> Access {
        let secret_data = BTreeMap::from([
            (
                ACCESS_KEY_ID.to_string(),
                bucket.keys.access_key_id.clone().into_bytes(),
            ),
            (
                SECRET_ACCESS_KEY.to_string(),
                bucket.keys.secret_access_key.clone().into_bytes(),
            ),
            (BUCKET_NAME.to_string(), bucket.name.clone().into_bytes()),
            (BUCKET_HOST.to_string(), self.host.clone().into_bytes()),
            (BUCKET_PORT.to_string(), self.port.to_string().into_bytes()),
            (BUCKET_REGION.to_string(), self.region.clone().into_bytes()),
        ]);
        Access {
            endpoint: self.endpoint.clone(),
            secret_data,
        }
    }
}

impl S3Server {
    /// The address the S3 server listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves S3 until `shutdown` completes. Requests in flight then are cut off: none of
    /// them was acknowledged, and the storage is crash safe, so nothing is lost.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) {
        let S3Server {
            listener,
            service,
            metrics,
        } = self;
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!(%err, "S3 accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Small responses must not wait for Nagle's algorithm and delayed ACKs (~40 ms).
            let _ = stream.set_nodelay(true);
            let service = service.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let handler =
                    hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
                        let service = service.clone();
                        let metrics = metrics.clone();
                        async move {
                            let slot = OperationSlot::default();
                            request.extensions_mut().insert(slot.clone());
                            let started = Instant::now();
                            let response = hyper::service::Service::call(&service, request).await;
                            let status = response.as_ref().map_or(500, |r| r.status().as_u16());
                            let operation = slot.get().unwrap_or_else(|| "unknown".to_string());
                            metrics.observe(&operation, status, started.elapsed().as_secs_f64());
                            response
                        }
                    });
                // A client that never finishes its request headers must not hold a connection
                // (and its task) forever.
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), handler)
                    .await
                {
                    tracing::debug!(%peer, %err, "S3 connection ended with an error");
                }
            });
        }
        tracing::info!("S3 server stopped");
    }
}

fn transient(err: impl std::fmt::Display) -> BackendError {
    BackendError::Transient(err.to_string())
}

#[async_trait::async_trait]
impl Backend for EmbeddedBackend {
    async fn ensure_bucket(&self, plan: &BucketPlan) -> BackendResult<Access> {
        if !storage::is_bucket_name(&plan.id) {
            return Err(BackendError::Permanent(format!(
                "{:?} is not a bucket id",
                plan.id
            )));
        }
        let storage = self.storage.clone();
        let id = plan.id.clone();
        let bucket = tokio::task::spawn_blocking(move || storage.create_bucket(&id))
            .await
            .map_err(transient)?
            .map_err(transient)?;
        bucket.limiter.set(limit::Limits {
            requests: plan.limits.tps,
            data_requests: plan.limits.iops,
        });
        Ok(self.access(&bucket))
    }

    async fn delete_bucket(&self, id: &str) -> BackendResult<()> {
        let storage = self.storage.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || storage.delete_bucket(&id))
            .await
            .map_err(transient)?
            .map_err(transient)
    }

    async fn inventory(&self) -> BackendResult<Vec<String>> {
        Ok(self.storage.bucket_names())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_split_into_host_and_port() {
        assert_eq!(
            endpoint_host_port("http://127.0.0.1:7480").unwrap(),
            ("127.0.0.1".into(), 7480)
        );
        assert_eq!(
            endpoint_host_port("https://s3.example.com/").unwrap(),
            ("s3.example.com".into(), 443)
        );
        assert_eq!(
            endpoint_host_port("http://[::1]:9000").unwrap(),
            ("::1".into(), 9000)
        );
        for bad in [
            "127.0.0.1:7480",
            "ftp://x",
            "http://",
            "http://h:0",
            "http://h/path",
            "http://u@h",
        ] {
            assert!(endpoint_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn settings_are_checked() {
        S3Settings::default().validate().unwrap();
        let bad = |f: fn(&mut S3Settings)| {
            let mut s = S3Settings::default();
            f(&mut s);
            s.validate().unwrap_err().to_string()
        };
        assert!(bad(|s| s.address = "nope".into()).contains("s3.address"));
        assert!(bad(|s| s.address = "0.0.0.0:7480".into()).contains("s3.endpoint"));
        assert!(bad(|s| s.region = "a b".into()).contains("s3.region"));
        assert!(bad(|s| s.virtual_host_domain = "a..b".into()).contains("s3.virtual_host_domain"));
    }
}
