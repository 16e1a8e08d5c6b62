// SPDX-License-Identifier: Apache-2.0
//! A client for the Kubernetes remote-command WebSocket protocol, the protocol behind
//! `kubectl exec`/`attach` and behind IRI's `Exec` URLs.
//!
//! The client offers the subprotocols `v5.channel.k8s.io` and `v4.channel.k8s.io` (newest first)
//! and refuses a server that picks neither. Every binary message starts with a channel byte:
//!
//! | channel | direction | content |
//! |---|---|---|
//! | 0 | to server | stdin |
//! | 1 | from server | stdout |
//! | 2 | from server | stderr |
//! | 3 | from server | error: a JSON `metav1.Status` (v4, v5) once the session ends |
//! | 4 | to server | terminal size, JSON `{"Width":..,"Height":..}` |
//! | 255 | to server | v5 only: `[255, channel]` closes that stream (end of stdin) |
//!
//! ```no_run
//! # async fn demo() -> Result<(), remotecommand::Error> {
//! let session = remotecommand::Session::connect("http://127.0.0.1:8080/exec/token").await?;
//! let (mut writer, mut reader) = session.split();
//! writer.send_stdin(b"uname -r\n").await?;
//! while let Some(output) = reader.next().await {
//!     match output? {
//!         remotecommand::Output::Stdout(bytes) => print!("{}", String::from_utf8_lossy(&bytes)),
//!         remotecommand::Output::Stderr(bytes) => eprint!("{}", String::from_utf8_lossy(&bytes)),
//!         remotecommand::Output::Error(message) => eprintln!("{message}"),
//!     }
//! }
//! # Ok(()) }
//! ```

use std::{fmt, sync::Arc};

use bytes::Bytes;
use futures::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    Connector, MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest, http::HeaderValue},
};

/// Channel bytes of the remote-command protocol.
pub mod channel {
    /// Input to the remote process.
    pub const STDIN: u8 = 0;
    /// Output of the remote process.
    pub const STDOUT: u8 = 1;
    /// Error output of the remote process (unused by TTY sessions).
    pub const STDERR: u8 = 2;
    /// The final status of the session.
    pub const ERROR: u8 = 3;
    /// Terminal size changes.
    pub const RESIZE: u8 = 4;
    /// v5: closes one of the client's streams.
    pub const CLOSE: u8 = 255;
}

/// The subprotocols offered, newest first.
pub const PROTOCOLS: [&str; 2] = [Protocol::V5.name(), Protocol::V4.name()];

/// The negotiated protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `v4.channel.k8s.io`: JSON status on the error channel, resize channel.
    V4,
    /// `v5.channel.k8s.io`: v4 plus the close channel (a client can end stdin).
    V5,
}

impl Protocol {
    /// The subprotocol name.
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::V4 => "v4.channel.k8s.io",
            Protocol::V5 => "v5.channel.k8s.io",
        }
    }

    fn from_name(name: &str) -> Option<Protocol> {
        [Protocol::V5, Protocol::V4]
            .into_iter()
            .find(|p| p.name() == name.trim())
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Bytes on stdout.
    Stdout(Bytes),
    /// Bytes on stderr.
    Stderr(Bytes),
    /// The session failed: the message of the server's `Status` (a `Success` status is not
    /// reported; the session just ends).
    Error(String),
}

/// Why a session could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL is not an http(s) or ws(s) URL.
    #[error("invalid exec URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server answered the upgrade with an HTTP error.
    #[error("the exec server answered {status}{}", body_suffix(.body))]
    Http {
        /// Status code and reason, e.g. `404 Not Found`.
        status: String,
        /// The first line of the response body, if any.
        body: String,
    },
    /// The server chose no subprotocol or one that was not offered.
    #[error("the exec server speaks no remote-command protocol we offer ({offered}): it chose {chosen}")]
    Subprotocol {
        /// What we offered.
        offered: String,
        /// What the server chose (`none` when it chose nothing).
        chosen: String,
    },
    /// The WebSocket connection failed.
    #[error("exec session: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// TLS could not be set up.
    #[error("exec session: TLS setup: {0}")]
    Tls(String),
}

fn body_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An open remote-command session.
pub struct Session {
    socket: Socket,
    protocol: Protocol,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("protocol", &self.protocol)
            .finish()
    }
}

/// The URL to dial: `http` becomes `ws` and `https` becomes `wss` (IRI runtimes return
/// `http(s)` URLs, as kubelet's streaming server does).
pub fn websocket_url(url: &str) -> Result<String, Error> {
    let bad = |reason: &str| Error::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("not an absolute URL"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => return Err(bad(&format!("scheme {other:?} is not http, https, ws or wss"))),
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("the URL has no host"));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// TLS for `wss`: the web PKI roots, with the ring provider (the one this crate compiles in,
/// so no process-wide default provider has to be installed).
fn tls_connector() -> Result<Connector, Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots_certs());
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Connector::Rustls(Arc::new(config)))
}

fn webpki_roots_certs() -> impl Iterator<Item = rustls::pki_types::TrustAnchor<'static>> {
    webpki_roots::TLS_SERVER_ROOTS.iter().cloned()
}

impl Session {
    /// Opens a session at `url` (`http`, `https`, `ws` or `wss`), offering v5 and v4.
    pub async fn connect(url: &str) -> Result<Session, Error> {
        let target = websocket_url(url)?;
        let mut request = target.as_str().into_client_request().map_err(|e| Error::Url {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        let offered = PROTOCOLS.join(", ");
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(&offered).map_err(|e| Error::Tls(e.to_string()))?,
        );
        let connector = if target.starts_with("wss://") {
            Some(tls_connector()?)
        } else {
            None
        };
        let (socket, response) =
            match tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector).await {
                Ok(connected) => connected,
                Err(tungstenite::Error::Http(response)) => {
                    let status = response.status();
                    let body = response
                        .body()
                        .as_deref()
                        .map(|b| {
                            String::from_utf8_lossy(b)
                                .lines()
                                .next()
                                .unwrap_or("")
                                .trim()
                                .to_string()
                        })
                        .unwrap_or_default();
                    return Err(Error::Http {
                        status: format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or(""))
                            .trim_end()
                            .to_string(),
                        body,
                    });
                }
                // tungstenite checks the chosen subprotocol against the offer itself.
                Err(tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(e),
                )) => {
                    use tungstenite::error::SubProtocolError;
                    let chosen = match e {
                        SubProtocolError::NoSubProtocol => "none".to_string(),
                        SubProtocolError::InvalidSubProtocol => "one that was not offered".to_string(),
                        SubProtocolError::ServerSentSubProtocolNoneRequested => "one unasked".to_string(),
                    };
                    return Err(Error::Subprotocol { offered, chosen });
                }
                Err(e) => return Err(e.into()),
            };
        let chosen = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let Some(protocol) = chosen.as_deref().and_then(Protocol::from_name) else {
            let mut socket = socket;
            let _ = socket.close(None).await;
            return Err(Error::Subprotocol {
                offered,
                chosen: chosen.unwrap_or_else(|| "none".into()),
            });
        };
        Ok(Session { socket, protocol })
    }

    /// The negotiated protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Splits the session into a writer and a reader, to send and receive concurrently.
    pub fn split(self) -> (SessionWriter, SessionReader) {
        let (sink, stream) = self.socket.split();
        (
            SessionWriter {
                sink,
                protocol: self.protocol,
                stdin_closed: false,
            },
            SessionReader { stream, done: false },
        )
    }
}

/// The sending half of a session.
pub struct SessionWriter {
    sink: SplitSink<Socket, Message>,
    protocol: Protocol,
    stdin_closed: bool,
}

impl fmt::Debug for SessionWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionWriter")
            .field("protocol", &self.protocol)
            .finish()
    }
}

/// A binary message on `channel`.
pub fn frame(channel: u8, bytes: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(bytes.len() + 1);
    data.push(channel);
    data.extend_from_slice(bytes);
    data
}

/// The resize message body (the field names are Go's `TerminalSize`).
pub fn resize_body(width: u16, height: u16) -> Vec<u8> {
    serde_json::json!({ "Width": width, "Height": height })
        .to_string()
        .into_bytes()
}

impl SessionWriter {
    /// The negotiated protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Sends `bytes` on stdin (nothing for an empty slice: an empty frame means nothing).
    pub async fn send_stdin(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.send(frame(channel::STDIN, bytes)).await
    }

    /// Tells the server the terminal's size.
    pub async fn resize(&mut self, width: u16, height: u16) -> Result<(), Error> {
        self.send(frame(channel::RESIZE, &resize_body(width, height)))
            .await
    }

    /// Ends stdin. With v5 the server is told (`[255, 0]`); v4 has no way to say it, so this
    /// returns `false` and the caller decides how long to keep the session open.
    pub async fn close_stdin(&mut self) -> Result<bool, Error> {
        if self.protocol != Protocol::V5 {
            return Ok(false);
        }
        if !self.stdin_closed {
            self.send(vec![channel::CLOSE, channel::STDIN]).await?;
            self.stdin_closed = true;
        }
        Ok(true)
    }

    /// Closes the WebSocket (a normal close frame).
    pub async fn close(&mut self) -> Result<(), Error> {
        match self.sink.close().await {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn send(&mut self, data: Vec<u8>) -> Result<(), Error> {
        Ok(self.sink.send(Message::Binary(data.into())).await?)
    }
}

/// The receiving half of a session.
pub struct SessionReader {
    stream: SplitStream<Socket>,
    done: bool,
}

impl fmt::Debug for SessionReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionReader").field("done", &self.done).finish()
    }
}

impl SessionReader {
    /// The next output, `None` once the server closed the session. Cancel-safe (usable in
    /// `select!`). Messages the protocol does not define (unknown channels, empty frames,
    /// pings) are skipped.
    pub async fn next(&mut self) -> Option<Result<Output, Error>> {
        while !self.done {
            let message = match self.stream.next().await {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e.into()));
                }
                Some(Ok(message)) => message,
            };
            let data: Bytes = match message {
                Message::Binary(data) => data,
                // Some servers send channel frames as text.
                Message::Text(text) => Bytes::copy_from_slice(text.as_bytes()),
                Message::Close(_) => {
                    self.done = true;
                    return None;
                }
                _ => continue,
            };
            if let Some(output) = decode(data) {
                return Some(Ok(output));
            }
        }
        None
    }
}

/// Decodes one server message; `None` for what carries nothing for the user.
pub fn decode(data: Bytes) -> Option<Output> {
    let (&channel, _) = data.split_first()?;
    let payload = data.slice(1..);
    match channel {
        channel::STDOUT if !payload.is_empty() => Some(Output::Stdout(payload)),
        channel::STDERR if !payload.is_empty() => Some(Output::Stderr(payload)),
        channel::ERROR if !payload.is_empty() => status_error(&payload).map(Output::Error),
        _ => None,
    }
}

/// The failure in an error-channel message: the message of a `metav1.Status` that is not
/// `Success`, or the text itself when it is not a Status (the v1 protocol sent plain text).
fn status_error(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Status {
        #[serde(default)]
        status: String,
        #[serde(default)]
        message: String,
        #[serde(default)]
        reason: String,
    }
    match serde_json::from_slice::<Status>(payload) {
        Ok(status) if status.status == "Success" => None,
        Ok(status) if !status.message.is_empty() => Some(status.message),
        Ok(status) if !status.reason.is_empty() => Some(status.reason),
        Ok(_) => Some("the session failed (the server gave no reason)".into()),
        Err(_) => Some(String::from_utf8_lossy(payload).trim().to_string()),
    }
}

#[cfg(test)]
mod tests;
