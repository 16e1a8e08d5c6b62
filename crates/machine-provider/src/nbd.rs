// SPDX-License-Identifier: Apache-2.0
//! Volumes with driver `nbd`, as the volume provider hands them out: attribute `uri` is
//! `nbd+unix:///<export>?socket=<absolute socket path>` or `nbd://<host>[:<port>]/<export>`.
//!
//! A unix socket path comes from a request, so it must lie inside one of the configured
//! `nbd_socket_dirs` (checked after resolving symlinks and `..`): a client cannot make QEMU
//! connect to arbitrary sockets of the host.
//!
//! Given client credentials (`nbd_tls_dir`), a volume whose access has a `tcp_uri` is attached
//! through it rather than through `uri`.
//!
//! NBD over TCP uses TLS when the provider has client credentials (`nbd_tls_dir`): QEMU's
//! `tls-creds-x509` object [`TLS_OBJECT`] and the attribute `tls_hostname` (the name the
//! server's certificate carries; the volume provider names it). A volume whose access asks for
//! TLS is refused, saying why, when the provider has no credentials.

use std::path::{Path, PathBuf};

use iri_runtime::validate::shorten;

/// The `uri` attribute of an `nbd` volume.
pub const URI: &str = "uri";
/// The attribute with the export's `nbd://` URI when it is also served over TCP.
pub const TCP_URI: &str = "tcp_uri";
/// The attribute naming the host name in the server's TLS certificate.
pub const TLS_HOSTNAME: &str = "tls_hostname";
/// The QEMU object id of the TLS client credentials.
pub const TLS_OBJECT: &str = "nbdtls";

/// Where an NBD export is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    /// A unix socket.
    Unix(PathBuf),
    /// TCP.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port.
        port: u16,
    },
}

/// An NBD export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The server.
    pub server: Server,
    /// The export name.
    pub name: String,
    /// TLS, for NBD over TCP with the provider's client credentials.
    pub tls: Option<Tls>,
}

/// TLS of an NBD connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The credentials directory (`nbd_tls_dir`).
    pub dir: PathBuf,
    /// The host name the server's certificate must carry.
    pub hostname: String,
}

/// The export of an `nbd` volume's `attributes`: its `uri` (see [`parse`]), with TLS when it
/// is served over TCP and the provider has client credentials in `tls_dir`.
pub fn from_attributes(
    attributes: &std::collections::BTreeMap<String, String>,
    socket_dirs: &[PathBuf],
    tls_dir: Option<&Path>,
) -> Result<Export, String> {
    // A volume provider with TCP exports hands out both; a machine provider with TLS client
    // credentials is set up for volumes of other hosts and takes the one that works from
    // anywhere (a unix socket path may name this host's own volume daemon at the same path).
    let uri = match attributes.get(TCP_URI).filter(|u| !u.is_empty()) {
        Some(tcp) if tls_dir.is_some() => tcp.as_str(),
        _ => attributes.get(URI).map_or("", String::as_str),
    };
    let mut export = parse(uri, socket_dirs)?;
    let Server::Tcp { host, .. } = &export.server else {
        return Ok(export);
    };
    let hostname = attributes.get(TLS_HOSTNAME).filter(|h| !h.is_empty());
    match (tls_dir, hostname) {
        (Some(dir), hostname) => {
            let hostname = hostname.unwrap_or(host).clone();
            if hostname.is_empty()
                || !hostname
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
            {
                return Err(format!("{hostname:?} is not a TLS host name"));
            }
            export.tls = Some(Tls {
                dir: dir.to_path_buf(),
                hostname,
            });
        }
        (None, Some(_)) => {
            return Err(format!(
                "{:?} is served with TLS ({TLS_HOSTNAME} is set) but this provider has no client credentials: configure nbd_tls_dir",
                shorten(uri)
            ));
        }
        (None, None) => {}
    }
    Ok(export)
}

/// The `tls-creds-x509` object of `tls`, as `object-add` and `-object` take it (JSON).
pub fn tls_object(tls: &Tls) -> serde_json::Value {
    serde_json::json!({
        "qom-type": "tls-creds-x509", "id": TLS_OBJECT, "dir": tls.dir,
        "endpoint": "client", "verify-peer": true,
    })
}

/// Parses an NBD URI and checks a unix socket against `socket_dirs`.
pub fn parse(uri: &str, socket_dirs: &[PathBuf]) -> Result<Export, String> {
    let safe = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    };
    if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
        let (name, query) = rest
            .split_once('?')
            .ok_or_else(|| format!("{:?} has no ?socket=<path>", shorten(uri)))?;
        let socket = query
            .split('&')
            .find_map(|p| p.strip_prefix("socket="))
            .ok_or_else(|| format!("{:?} has no ?socket=<path>", shorten(uri)))?;
        if !safe(name) {
            return Err(format!("{:?}: unsupported export name", shorten(uri)));
        }
        let socket = Path::new(socket);
        if !socket.is_absolute() {
            return Err(format!("{:?}: the socket path is not absolute", shorten(uri)));
        }
        // The socket may not exist yet (a volume provider restarting): check its directory.
        let parent = socket
            .parent()
            .and_then(|p| p.canonicalize().ok())
            .ok_or_else(|| format!("{:?}: the socket's directory does not exist", shorten(uri)))?;
        let file = socket
            .file_name()
            .filter(|f| *f != ".." && *f != ".")
            .ok_or_else(|| format!("{:?}: not a socket path", shorten(uri)))?;
        let inside = socket_dirs
            .iter()
            .filter_map(|d| d.canonicalize().ok())
            .any(|d| parent.starts_with(d));
        if !inside {
            return Err(format!(
                "{:?}: the socket is not inside the configured nbd_socket_dirs",
                shorten(uri)
            ));
        }
        return Ok(Export {
            server: Server::Unix(parent.join(file)),
            name: name.to_string(),
            tls: None,
        });
    }
    if let Some(rest) = uri.strip_prefix("nbd://") {
        let (authority, name) = rest
            .split_once('/')
            .ok_or_else(|| format!("{:?} has no export name", shorten(uri)))?;
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse()
                    .map_err(|_| format!("{:?}: bad port", shorten(uri)))?,
            ),
            None => (authority, 10809),
        };
        if !safe(host) || !safe(name) {
            return Err(format!("{:?}: unsupported host or export name", shorten(uri)));
        }
        return Ok(Export {
            server: Server::Tcp {
                host: host.to_string(),
                port,
            },
            name: name.to_string(),
            tls: None,
        });
    }
    Err(format!("{:?} is not an nbd+unix:/// or nbd:// URI", shorten(uri)))
}

/// The block node of `export` named `node`, as `blockdev-add` and `-blockdev` take it (JSON).
pub fn blockdev(export: &Export, node: &str) -> serde_json::Value {
    let server = match &export.server {
        Server::Unix(path) => serde_json::json!({"type": "unix", "path": path}),
        Server::Tcp { host, port } => {
            serde_json::json!({"type": "inet", "host": host, "port": port.to_string()})
        }
    };
    // reconnect-delay: a volume provider restart (or an expansion, which reconnects clients)
    // stalls I/O for a moment instead of failing it.
    let mut node = serde_json::json!({
        "driver": "nbd", "node-name": node, "server": server, "export": export.name,
        "reconnect-delay": 10,
    });
    if let Some(tls) = &export.tls {
        node["tls-creds"] = TLS_OBJECT.into();
        node["tls-hostname"] = tls.hostname.clone().into();
    }
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_volume_providers_uris_inside_allowed_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = vec![dir.path().to_path_buf()];
        let socket = dir.path().join("nbd.sock");
        let uri = format!("nbd+unix:///0123abcd?socket={}", socket.display());
        let export = parse(&uri, &dirs).unwrap();
        assert_eq!(export.name, "0123abcd");
        assert_eq!(
            export.server,
            Server::Unix(socket.canonicalize().unwrap_or(socket.clone()))
        );
        let node = blockdev(&export, "d0");
        assert_eq!(node["server"]["type"], "unix");
        assert_eq!(node["export"], "0123abcd");

        let tcp = parse("nbd://10.0.0.1:10810/vol", &[]).unwrap();
        assert_eq!(
            tcp.server,
            Server::Tcp {
                host: "10.0.0.1".into(),
                port: 10810
            }
        );
        let node = blockdev(&tcp, "d0");
        assert_eq!(node["server"]["host"], "10.0.0.1");
        assert_eq!(node["server"]["port"], "10810");
        assert!(node.get("tls-creds").is_none());
    }

    #[test]
    fn tcp_exports_use_tls_with_credentials_and_refuse_without() {
        let mut attributes = std::collections::BTreeMap::from([
            (URI.to_string(), "nbd://10.0.0.1:10810/vol".to_string()),
            (TLS_HOSTNAME.to_string(), "node-b".to_string()),
        ]);
        let tls_dir = Path::new("/etc/iri/nbd-tls");
        let export = from_attributes(&attributes, &[], Some(tls_dir)).unwrap();
        let node = blockdev(&export, "d0");
        assert_eq!(node["tls-creds"], TLS_OBJECT);
        assert_eq!(node["tls-hostname"], "node-b");
        assert_eq!(
            tls_object(export.tls.as_ref().unwrap())["dir"],
            "/etc/iri/nbd-tls"
        );
        let err = from_attributes(&attributes, &[], None).unwrap_err();
        assert!(err.contains("nbd_tls_dir"), "{err}");
        attributes.remove(TLS_HOSTNAME);
        assert!(from_attributes(&attributes, &[], None).unwrap().tls.is_none());
        let export = from_attributes(&attributes, &[], Some(tls_dir)).unwrap();
        assert_eq!(export.tls.unwrap().hostname, "10.0.0.1");
        // With credentials, tcp_uri wins over a unix socket uri; without, uri is used.
        let both = std::collections::BTreeMap::from([
            (
                URI.to_string(),
                "nbd+unix:///vol?socket=/nonexistent/nbd.sock".to_string(),
            ),
            (TCP_URI.to_string(), "nbd://node-b:10809/vol".to_string()),
        ]);
        let export = from_attributes(&both, &[], Some(tls_dir)).unwrap();
        assert!(matches!(export.server, Server::Tcp { ref host, port: 10809 } if host == "node-b"));
        assert!(
            from_attributes(&both, &[], None).is_err(),
            "the unix socket is not allowed"
        );
        attributes.insert(TLS_HOSTNAME.into(), "a,b".into());
        assert!(from_attributes(&attributes, &[], Some(tls_dir)).is_err());
    }

    #[test]
    fn refuses_sockets_elsewhere_and_odd_names() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let dirs = vec![dir.path().to_path_buf()];
        let outside = format!("nbd+unix:///v?socket={}/nbd.sock", other.path().display());
        assert!(parse(&outside, &dirs).unwrap_err().contains("nbd_socket_dirs"));
        let sneaky = format!(
            "nbd+unix:///v?socket={}/../{}/nbd.sock",
            dir.path().display(),
            other.path().display()
        );
        assert!(parse(&sneaky, &dirs).is_err());
        let comma = format!(
            "nbd+unix:///v,driver=file?socket={}/nbd.sock",
            dir.path().display()
        );
        assert!(parse(&comma, &dirs).is_err());
        assert!(parse("nbd://host/a,b", &[]).is_err());
        assert!(parse("iscsi://x/y", &[]).is_err());
    }
}
