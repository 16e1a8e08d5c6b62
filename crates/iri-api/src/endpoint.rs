// SPDX-License-Identifier: Apache-2.0
//! Finding and dialing an IRI runtime, the way upstream's clients do.
//!
//! Resolution order (upstream `iri/remote/common/address.go`): an explicit address, else the
//! runtime's environment variable, else the first well-known socket that exists (broker before
//! provider), polled once a second until a discovery timeout.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Uri};

/// The three IRI runtimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    /// `machine.v1alpha1.MachineRuntime`.
    Machine,
    /// `volume.v1alpha1.VolumeRuntime`.
    Volume,
    /// `bucket.v1alpha1.BucketRuntime`.
    Bucket,
}

impl RuntimeKind {
    /// The lower-case name used in socket paths and messages.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Machine => "machine",
            RuntimeKind::Volume => "volume",
            RuntimeKind::Bucket => "bucket",
        }
    }

    /// The environment variable upstream clients read the endpoint from.
    pub fn env_var(self) -> &'static str {
        match self {
            RuntimeKind::Machine => "IRI_MACHINE_RUNTIME_ENDPOINT",
            RuntimeKind::Volume => "IRI_VOLUME_RUNTIME_ENDPOINT",
            RuntimeKind::Bucket => "IRI_BUCKET_RUNTIME_ENDPOINT",
        }
    }

    /// The well-known sockets, in probe order: the broker's, then the provider's.
    pub fn well_known_sockets(self) -> [PathBuf; 2] {
        let kind = self.name();
        [
            PathBuf::from(format!("/var/run/iri-{kind}broker.sock")),
            PathBuf::from(format!("/var/run/iri-{kind}provider.sock")),
        ]
    }

    /// The full gRPC service name.
    pub fn service_name(self) -> &'static str {
        match self {
            RuntimeKind::Machine => "machine.v1alpha1.MachineRuntime",
            RuntimeKind::Volume => "volume.v1alpha1.VolumeRuntime",
            RuntimeKind::Bucket => "bucket.v1alpha1.BucketRuntime",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an endpoint could not be resolved or dialed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The address has a form we do not accept.
    #[error(
        "invalid endpoint {address:?}: {reason} (accepted: unix:///path, /path, ./path, tcp://host:port, http://host:port)"
    )]
    Invalid {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No address was given and no well-known socket appeared in time.
    #[error(
        "no {kind} runtime endpoint: pass --address, set {env}, or start a runtime at {paths} (waited {waited:?})"
    )]
    NotDiscovered {
        /// The runtime looked for.
        kind: RuntimeKind,
        /// Its environment variable.
        env: &'static str,
        /// The well-known paths probed.
        paths: String,
        /// How long discovery waited.
        waited: Duration,
    },
    /// The endpoint exists as an address but nothing answered.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The endpoint dialed.
        endpoint: Endpoint,
        /// What went wrong, in one line.
        reason: String,
    },
}

/// A resolved runtime address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix domain socket.
    Unix(PathBuf),
    /// A TCP address, `host:port`.
    Tcp(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix://{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;

    /// Accepts `unix:///path`, `unix:/path`, `/path`, `./path`, `../path`, `tcp://host:port` and
    /// `http://host:port`.
    fn from_str(address: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| EndpointError::Invalid {
            address: address.to_string(),
            reason,
        };
        if address.is_empty() {
            return Err(invalid("empty"));
        }
        if let Some(rest) = address
            .strip_prefix("unix://")
            .or_else(|| address.strip_prefix("unix:"))
        {
            if !rest.starts_with('/') {
                return Err(invalid("a unix socket path must be absolute"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(rest)));
        }
        // A relative path must say so with ./ or ../; a bare "name" could be a typo'd host.
        if address.starts_with('/') || address.starts_with("./") || address.starts_with("../") {
            return Ok(Endpoint::Unix(PathBuf::from(address)));
        }
        let hostport = address
            .strip_prefix("tcp://")
            .or_else(|| address.strip_prefix("http://"))
            .ok_or_else(|| invalid("unknown scheme"))?;
        let hostport = hostport.trim_end_matches('/');
        let (host, port) = hostport.rsplit_once(':').ok_or_else(|| invalid("missing port"))?;
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        if port.parse::<u16>().is_err() {
            return Err(invalid("port is not a number in 0..65535"));
        }
        if hostport.contains('/') {
            return Err(invalid("a tcp address takes no path"));
        }
        Ok(Endpoint::Tcp(hostport.to_string()))
    }
}

impl Endpoint {
    /// Resolves an endpoint as upstream clients do: `explicit`, else the runtime's environment
    /// variable, else the first existing well-known socket, polled every second for up to
    /// `discovery_timeout`.
    pub async fn resolve(
        kind: RuntimeKind,
        explicit: Option<&str>,
        discovery_timeout: Duration,
    ) -> Result<Endpoint, EndpointError> {
        let from_env = std::env::var(kind.env_var()).ok().filter(|v| !v.is_empty());
        if let Some(address) = explicit
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .or(from_env)
        {
            return address.parse();
        }
        Self::discover(kind, &kind.well_known_sockets(), discovery_timeout).await
    }

    /// Polls `paths` every second for the first that is a unix socket.
    pub async fn discover(
        kind: RuntimeKind,
        paths: &[PathBuf],
        timeout: Duration,
    ) -> Result<Endpoint, EndpointError> {
        let started = tokio::time::Instant::now();
        loop {
            if let Some(path) = paths.iter().find(|p| is_socket(p)) {
                return Ok(Endpoint::Unix(path.clone()));
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(EndpointError::NotDiscovered {
                    kind,
                    env: kind.env_var(),
                    paths: paths
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" or "),
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_secs(1).min(timeout - waited)).await;
        }
    }

    /// Dials the endpoint and waits until the connection is up (or `connect_timeout` passed), so
    /// that a missing socket or a wrong address is reported at once, in one line.
    pub async fn connect(&self, connect_timeout: Duration) -> Result<Channel, EndpointError> {
        let fail = |reason: String| EndpointError::Connect {
            endpoint: self.clone(),
            reason,
        };
        match self {
            Endpoint::Tcp(addr) => {
                let endpoint = Channel::from_shared(format!("http://{addr}"))
                    .map_err(|e| fail(e.to_string()))?
                    .connect_timeout(connect_timeout);
                tokio::time::timeout(connect_timeout, endpoint.connect())
                    .await
                    .map_err(|_| fail(format!("timed out after {connect_timeout:?}")))?
                    .map_err(|e| fail(error_chain(&e)))
            }
            Endpoint::Unix(path) => {
                // Check up front so the common mistakes get a precise message instead of a
                // transport error.
                match std::fs::metadata(path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(fail("no such socket (is the runtime running?)".into()));
                    }
                    Err(e) => return Err(fail(e.to_string())),
                    Ok(_) if !is_socket(path) => return Err(fail("not a unix socket".into())),
                    Ok(_) => {}
                }
                let path = path.clone();
                // The URI is required by tonic but unused: the connector ignores it.
                let endpoint = tonic::transport::Endpoint::from_static("http://iri.sock")
                    .connect_timeout(connect_timeout);
                let connector = tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::time::timeout(connect_timeout, UnixStream::connect(&path))
                            .await
                            .map_err(|_| {
                                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                            })??;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                });
                endpoint
                    .connect_with_connector(connector)
                    .await
                    .map_err(|e| fail(error_chain(&e)))
            }
        }
    }
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Joins an error and its sources into one line ("transport error: connection refused").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// Clients for each runtime with our message size limits applied.
pub mod clients {
    use tonic::transport::Channel;

    use crate::{
        MAX_MESSAGE_SIZE, bucket::v1alpha1::bucket_runtime_client::BucketRuntimeClient,
        machine::v1alpha1::machine_runtime_client::MachineRuntimeClient,
        volume::v1alpha1::volume_runtime_client::VolumeRuntimeClient,
    };

    /// A MachineRuntime client on `channel`.
    pub fn machine(channel: Channel) -> MachineRuntimeClient<Channel> {
        MachineRuntimeClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// A VolumeRuntime client on `channel`.
    pub fn volume(channel: Channel) -> VolumeRuntimeClient<Channel> {
        VolumeRuntimeClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// A BucketRuntime client on `channel`.
    pub fn bucket(channel: Channel) -> BucketRuntimeClient<Channel> {
        BucketRuntimeClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accepted_forms() {
        assert_eq!(
            "unix:///var/run/x.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/var/run/x.sock".into())
        );
        assert_eq!(
            "/tmp/a.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/tmp/a.sock".into())
        );
        assert_eq!(
            "./a.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("./a.sock".into())
        );
        assert_eq!(
            "tcp://127.0.0.1:8080".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:8080".into())
        );
        assert_eq!(
            "http://localhost:1234".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("localhost:1234".into())
        );
        assert_eq!(
            "tcp://[::1]:99".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("[::1]:99".into())
        );
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            "",
            "unix://relative.sock",
            "tcp://host",
            "tcp://:80",
            "tcp://host:notaport",
            "tcp://host:70000",
            "dns:///x",
            "relative/path.sock",
            "tcp://host:80/path",
        ] {
            let err = bad.parse::<Endpoint>().unwrap_err();
            assert!(matches!(err, EndpointError::Invalid { .. }), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn explicit_address_wins_over_discovery() {
        let ep = Endpoint::resolve(RuntimeKind::Volume, Some("unix:///x/y.sock"), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(ep, Endpoint::Unix("/x/y.sock".into()));
    }

    #[tokio::test]
    async fn discovery_finds_first_socket_and_times_out_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let broker = dir.path().join("broker.sock");
        let provider = dir.path().join("provider.sock");
        let paths = [broker.clone(), provider.clone()];

        let err = Endpoint::discover(RuntimeKind::Machine, &paths, Duration::from_millis(50))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("IRI_MACHINE_RUNTIME_ENDPOINT") && text.contains("broker.sock"),
            "{text}"
        );

        // A regular file at the broker path is not a socket and must be skipped.
        std::fs::write(&broker, b"").unwrap();
        let _listener = tokio::net::UnixListener::bind(&provider).unwrap();
        let ep = Endpoint::discover(RuntimeKind::Machine, &paths, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(ep, Endpoint::Unix(provider));
    }

    #[tokio::test]
    async fn connect_reports_missing_socket_in_one_line() {
        let err = Endpoint::Unix("/nonexistent/iri.sock".into())
            .connect(Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot connect to unix:///nonexistent/iri.sock: no such socket (is the runtime running?)"
        );
    }

    #[tokio::test]
    async fn connect_reports_refused_tcp() {
        // Bind and drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = Endpoint::Tcp(format!("127.0.0.1:{port}"))
            .connect(Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("cannot connect to tcp://127.0.0.1:"),
            "{err}"
        );
    }
}
