// SPDX-License-Identifier: Apache-2.0
//! NBD over TCP with TLS, for machines on other hosts.
//!
//! The storage daemon runs one NBD server, on the unix socket. Remote clients reach the same
//! exports through this endpoint: it speaks the NBD handshake up to `NBD_OPT_STARTTLS` (the
//! NBD protocol's way of starting TLS inside the connection), completes the TLS handshake,
//! requiring a client certificate signed by the provider's CA, and then joins the decrypted
//! stream to a fresh connection to the daemon's unix socket, where option haggling
//! (`NBD_OPT_GO` with the export name) continues. Plaintext options before STARTTLS get
//! `NBD_REP_ERR_TLS_REQD`, as a TLS-only NBD server answers them.
//!
//! Certificates live in `<local>/tls/` in the file names QEMU's `tls-creds-x509` uses:
//! `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`
//! (keys 0600). Missing ones are generated at start (a CA, a server certificate for
//! [`TLS_HOSTNAME`] and the advertised host, a client certificate); an operator may put their
//! own there instead. The access carries the CA; the client certificate and key are the
//! operator's to give to machine providers (copy `client-cert.pem` and `client-key.pem`): they
//! are never put into the access, because poollets copy `secret_data` into a Secret in the
//! tenant's namespace, and this one certificate opens every export of the node.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UnixStream},
};
use tokio_rustls::TlsAcceptor;

use super::BackendError;
use crate::keys::write_new_private;

/// The name in the server certificate that clients verify (QEMU: `tls-hostname`).
pub const TLS_HOSTNAME: &str = "iri-volume-provider";

const NBD_MAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_STARTTLS: u32 = 5;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REP_ACK: u32 = 1;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
/// Connections in the handshake at once: each holds a descriptor for up to
/// [`HANDSHAKE_TIMEOUT`], and a flood of them must not starve the process.
const MAX_HANDSHAKES: usize = 64;
/// A client gets this many plaintext options before it must start TLS.
const MAX_PLAINTEXT_OPTIONS: usize = 16;
/// Option data a client may send before TLS (real clients send none with STARTTLS).
const MAX_OPTION_DATA: u32 = 4096;
/// Time for the plaintext handshake and the TLS handshake together.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// What a remote client needs to connect, besides the export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsAccess {
    /// `host:port` clients connect to.
    pub address: String,
    /// The CA that signed the server certificate (PEM).
    pub ca_cert: String,
}

/// The running endpoint; stops when dropped.
pub(super) struct TlsEndpoint {
    /// What clients need.
    pub access: TlsAccess,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the endpoint on `listen`, advertised as `advertise` (`host:port`), forwarding to the
/// daemon's NBD socket `nbd_socket`, with certificates in `tls_dir`.
pub(super) async fn start(
    listen: &str,
    advertise: &str,
    tls_dir: &Path,
    nbd_socket: PathBuf,
) -> Result<TlsEndpoint, BackendError> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| BackendError::Permanent(format!("NBD over TLS: {what}: {e}"));
    let advertised_host = advertise
        .rsplit_once(':')
        .map_or(advertise, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let files = ensure_certificates(tls_dir, &advertised_host).map_err(|e| fail("certificates", &e))?;
    let config = server_config(&files).map_err(|e| fail("TLS configuration", &e))?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| fail(&format!("listening on {listen}"), &e))?;
    let local = listener.local_addr().map_err(|e| fail("listener", &e))?;
    let access = TlsAccess {
        address: if advertise.is_empty() {
            local.to_string()
        } else {
            advertise.to_string()
        },
        ca_cert: read_text(&files.ca_cert).map_err(|e| fail("CA certificate", &e))?,
    };
    tracing::info!(%local, advertise = access.address, "serving NBD over TLS");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "too many NBD handshakes in progress: connection dropped");
                        continue;
                    };
                    let (acceptor, socket) = (acceptor.clone(), nbd_socket.clone());
                    tokio::spawn(async move {
                        if let Err(err) = serve(stream, acceptor, &socket, permit).await {
                            tracing::info!(%peer, %err, "NBD over TLS connection ended");
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!(%err, "accepting an NBD connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(TlsEndpoint { access, task })
}

/// One client: plaintext handshake to STARTTLS, TLS, then the daemon.
async fn serve(
    mut stream: TcpStream,
    acceptor: TlsAcceptor,
    nbd_socket: &Path,
    handshake: tokio::sync::OwnedSemaphorePermit,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (tls, client_flags) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let client_flags = start_tls(&mut stream).await?;
        let tls = acceptor.accept(stream).await?;
        Ok::<_, io::Error>((tls, client_flags))
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake took too long"))??;
    drop(handshake);
    let mut daemon = UnixStream::connect(nbd_socket).await?;
    let mut greeting = [0u8; 18];
    daemon.read_exact(&mut greeting).await?;
    if &greeting[..8] != NBD_MAGIC || &greeting[8..16] != IHAVEOPT {
        return Err(io::Error::other(
            "the storage daemon did not greet as an NBD server",
        ));
    }
    let daemon_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    // The client already agreed to our flags; the daemon offers at least as much (QEMU does).
    daemon
        .write_all(&(client_flags & u32::from(daemon_flags)).to_be_bytes())
        .await?;
    let mut tls = tls;
    tokio::io::copy_bidirectional(&mut tls, &mut daemon).await?;
    Ok(())
}

/// The plaintext part of the handshake; returns the client's flags once it asked for TLS.
async fn start_tls(stream: &mut TcpStream) -> io::Result<u32> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(NBD_MAGIC);
    greeting.extend_from_slice(IHAVEOPT);
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(io::Error::other("client does not speak fixed newstyle NBD"));
    }
    for _ in 0..MAX_PLAINTEXT_OPTIONS {
        let mut magic = [0u8; 8];
        stream.read_exact(&mut magic).await?;
        if &magic != IHAVEOPT {
            return Err(io::Error::other("bad option magic"));
        }
        let option = stream.read_u32().await?;
        let length = stream.read_u32().await?;
        if length > MAX_OPTION_DATA {
            return Err(io::Error::other("option data too long"));
        }
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data).await?;
        match option {
            OPT_STARTTLS if length == 0 => {
                reply(stream, option, REP_ACK).await?;
                return Ok(client_flags);
            }
            OPT_STARTTLS => reply(stream, option, REP_ERR_INVALID).await?,
            // It has no reply format: a server that will not serve it closes the connection.
            OPT_EXPORT_NAME => return Err(io::Error::other("NBD_OPT_EXPORT_NAME before TLS")),
            OPT_ABORT => {
                let _ = reply(stream, option, REP_ACK).await;
                return Err(io::Error::other("client aborted"));
            }
            _ => reply(stream, option, REP_ERR_TLS_REQD).await?,
        }
    }
    Err(io::Error::other("client never started TLS"))
}

async fn reply(stream: &mut TcpStream, option: u32, kind: u32) -> io::Result<()> {
    let mut message = Vec::with_capacity(20);
    message.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    message.extend_from_slice(&option.to_be_bytes());
    message.extend_from_slice(&kind.to_be_bytes());
    message.extend_from_slice(&0u32.to_be_bytes());
    stream.write_all(&message).await
}

/// The certificate files of one endpoint.
struct CertFiles {
    ca_cert: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// Generates what is missing in `dir`: a CA, a server certificate for [`TLS_HOSTNAME`] (and
/// `host`), a client certificate. Existing files are kept (an operator's own, or ours).
fn ensure_certificates(dir: &Path, host: &str) -> Result<CertFiles, String> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let files = CertFiles {
        ca_cert: dir.join("ca-cert.pem"),
        server_cert: dir.join("server-cert.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client-cert.pem"),
        client_key: dir.join("client-key.pem"),
    };
    let all = [
        &files.ca_cert,
        &files.server_cert,
        &files.server_key,
        &files.client_cert,
        &files.client_key,
    ];
    if all.iter().all(|f| f.exists()) {
        return Ok(files);
    }
    if all.iter().any(|f| f.exists()) {
        return Err(format!(
            "{} holds only some of ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem: \
             provide all or none (none: they are generated)",
            dir.display()
        ));
    }
    let generated = generate(host).map_err(|e| format!("generating certificates: {e}"))?;
    // The CA key is not kept: nothing else is ever signed with it. Keys before certificates,
    // and the CA last, so that an interrupted generation is seen as "some files" and redone
    // by hand rather than half-used.
    let write = |path: &Path, text: &str| {
        write_new_private(path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
    };
    write(&files.server_key, &generated.server_key)?;
    write(&files.client_key, &generated.client_key)?;
    write(&files.server_cert, &generated.server_cert)?;
    write(&files.client_cert, &generated.client_cert)?;
    write(&files.ca_cert, &generated.ca_cert)?;
    tracing::info!(dir = %dir.display(), "generated a CA, a server and a client certificate for NBD over TLS");
    Ok(files)
}

struct Generated {
    ca_cert: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn generate(host: &str) -> Result<Generated, rcgen::Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose,
    };
    let name = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("iri-volume-provider NBD CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let mut names = vec![TLS_HOSTNAME.to_string()];
    if !host.is_empty() && host != TLS_HOSTNAME {
        names.push(host.to_string());
    }
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(names)?;
    server.distinguished_name = name(TLS_HOSTNAME);
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate()?;
    let mut client = CertificateParams::default();
    client.distinguished_name = name("iri machine provider");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client.signed_by(&client_key, &issuer)?;
    Ok(Generated {
        ca_cert: ca_cert.pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    })
}

fn server_config(files: &CertFiles) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, String> {
        CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut roots = RootCertStore::empty();
    for ca in certs(&files.ca_cert)? {
        roots
            .add(ca)
            .map_err(|e| format!("{}: {e}", files.ca_cert.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let mut chain = certs(&files.server_cert)?;
    chain.extend(certs(&files.ca_cert)?);
    let key = PrivateKeyDer::from_pem_file(&files.server_key)
        .map_err(|e| format!("{}: {e}", files.server_key.display()))?;
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())
}

fn read_text(path: &Path) -> io::Result<String> {
    fs::read_to_string(path)
}
