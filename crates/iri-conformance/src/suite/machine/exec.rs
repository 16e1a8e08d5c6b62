// SPDX-License-Identifier: Apache-2.0
//! Exec: the URL a runtime returns, whether a WebSocket remote-command session can be opened
//! there (iri-contract §3.2.10), and (data-plane profile) whether that session is really the
//! guest's console.
//!
//! The upgrade check does the WebSocket opening handshake (RFC 6455 §4) by hand over a plain TCP
//! stream, so that it can report exactly what the server answered; only `http`/`ws` URLs are
//! checked that way, TLS endpoints are skipped. The console test speaks the whole protocol with
//! the [`remotecommand`] client (TLS included).

use std::time::{Duration, Instant};

use iri_api::machine::v1alpha1::ExecRequest;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;

use super::fixtures::{create_default, id_of, unknown_id, wait_running};
use crate::{
    call,
    harness::{Ctx, TestError, TestResult, expect_code},
};

/// The remote-command subprotocols offered, newest first (machinebroker's server speaks v4).
pub(super) const SUBPROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// The nonce from RFC 6455 §1.3 and its accept value: a fixed key lets us check the server's
/// answer without a SHA-1 implementation, and nothing in the protocol needs it to be random.
pub(super) const WEBSOCKET_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub(super) const WEBSOCKET_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Largest response head read before giving up.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Creates a machine, waits until it runs, and calls Exec on it; returns the URL.
async fn exec_url(ctx: &mut Ctx) -> Result<String, TestError> {
    let id = id_of(&create_default(ctx, &[]).await?).to_string();
    wait_running(ctx, &id).await?;
    let url = call!(ctx, machine.exec(ExecRequest { machine_id: id }))?.url;
    Target::parse(&url).map_err(|reason| TestError::fail(format!("Exec URL {url:?}: {reason}")))?;
    Ok(url)
}

pub(super) async fn exec_returns_url(ctx: &mut Ctx) -> TestResult {
    exec_url(ctx).await.map(drop)
}

pub(super) async fn exec_unknown_machine_is_not_found(ctx: &mut Ctx) -> TestResult {
    let result = call!(
        ctx,
        machine.exec(ExecRequest {
            machine_id: unknown_id()
        })
    );
    expect_code(result, Code::NotFound, "Exec for an unknown machine")?;
    Ok(())
}

pub(super) async fn exec_url_accepts_websocket(ctx: &mut Ctx) -> TestResult {
    let url = exec_url(ctx).await?;
    let target = Target::parse(&url).map_err(TestError::fail)?;
    if target.tls {
        return Err(TestError::skip(format!(
            "Exec URL {url:?} needs TLS, which the suite does not speak"
        )));
    }
    let head = websocket_handshake(&target, ctx.config.timeouts.rpc())
        .await
        .map_err(|reason| TestError::fail(format!("WebSocket upgrade at {url}: {reason}")))?;
    check_upgrade(&head)
        .map_err(|reason| TestError::fail(format!("WebSocket upgrade at {url}: {reason}")))?;
    Ok(())
}

/// How much of the console output a failure reason quotes (the end of it).
const QUOTED_OUTPUT_CHARS: usize = 600;

/// Data plane: a machine booted from the configured image shows its guest on the console. The
/// session must open, and within the ready timeout show the configured marker
/// (`machine.console_marker`), or any output when none is configured.
pub(super) async fn console_shows_the_guest(ctx: &mut Ctx) -> TestResult {
    if ctx.config.machine.image.is_empty() {
        return Err(TestError::skip(
            "no machine image configured ([machine] image): a machine without a boot disk has no guest to show",
        ));
    }
    let url = exec_url(ctx).await?;
    let marker = ctx.config.machine.console_marker.clone();
    let timeout = ctx.config.timeouts.ready();
    let session = tokio::time::timeout(ctx.config.timeouts.rpc(), remotecommand::Session::connect(&url))
        .await
        .map_err(|_| {
            TestError::fail(format!(
                "console session at {url}: no answer within {:?}",
                ctx.config.timeouts.rpc()
            ))
        })?
        .map_err(|e| TestError::fail(format!("console session at {url}: {e}")))?;
    let (mut writer, mut reader) = session.split();
    // A guest that printed everything before we came may be sitting at a prompt: a carriage
    // return makes a shell or getty show itself again. It is harmless to a guest that ignores it.
    let _ = writer.send_stdin(b"\r").await;
    let deadline = Instant::now() + timeout;
    let mut seen = String::new();
    let quote = |seen: &str| {
        let start = seen
            .char_indices()
            .rev()
            .nth(QUOTED_OUTPUT_CHARS)
            .map_or(0, |(at, _)| at);
        format!("{:?}", &seen[start..])
    };
    let wanted = if marker.is_empty() {
        "any output".to_string()
    } else {
        format!("the marker {marker:?} (machine.console_marker)")
    };
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let output = match tokio::time::timeout(left, reader.next()).await {
            Err(_) => {
                break Err(TestError::fail(format!(
                    "the console at {url} did not show {wanted} within {timeout:?}; it showed {}",
                    quote(&seen)
                )));
            }
            Ok(None) => {
                break Err(TestError::fail(format!(
                    "the console session at {url} ended before it showed {wanted}; it showed {}",
                    quote(&seen)
                )));
            }
            Ok(Some(Err(e))) => {
                break Err(TestError::fail(format!(
                    "the console session at {url} failed before it showed {wanted}: {e}; it showed {}",
                    quote(&seen)
                )));
            }
            Ok(Some(Ok(output))) => output,
        };
        match output {
            // A console is a TTY: guests may write to either stream.
            remotecommand::Output::Stdout(bytes) | remotecommand::Output::Stderr(bytes) => {
                seen.push_str(&String::from_utf8_lossy(&bytes));
                if seen.contains(&marker) && !seen.is_empty() {
                    break Ok(());
                }
            }
            remotecommand::Output::Error(message) => {
                break Err(TestError::fail(format!(
                    "the console session at {url} reported {message:?} before it showed {wanted}; it showed {}",
                    quote(&seen)
                )));
            }
        }
    };
    let _ = writer.close().await;
    result
}

/// An exec URL taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    /// `https`/`wss`.
    pub(super) tls: bool,
    /// Host as in the URL (brackets kept for IPv6), for the `Host` header.
    pub(super) authority: String,
    /// Host to dial (no brackets).
    pub(super) host: String,
    pub(super) port: u16,
    /// Path and query, at least `/`.
    pub(super) path: String,
}

impl Target {
    /// Parses an absolute `http`, `https`, `ws` or `wss` URL.
    pub(super) fn parse(url: &str) -> Result<Target, String> {
        ensure_str(!url.is_empty(), "the URL is empty")?;
        let (scheme, rest) = url.split_once("://").ok_or("not an absolute URL (no scheme)")?;
        let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "http" | "ws" => (false, 80),
            "https" | "wss" => (true, 443),
            other => return Err(format!("scheme {other:?} is not http, https, ws or wss")),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) if rest[at..].starts_with('/') => (&rest[..at], rest[at..].to_string()),
            Some(at) => (&rest[..at], format!("/{}", &rest[at..])),
            None => (rest, "/".to_string()),
        };
        let path = path.split('#').next().unwrap_or("/").to_string();
        ensure_str(
            !authority.contains('@'),
            "credentials in the URL are not supported",
        )?;
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or("unterminated IPv6 literal")?;
            let port = match after.strip_prefix(':') {
                Some(port) => port.parse().map_err(|_| format!("bad port {port:?}"))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("garbage after the IPv6 literal: {after:?}")),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (
                    host.to_string(),
                    port.parse().map_err(|_| format!("bad port {port:?}"))?,
                ),
                None => (authority.to_string(), default_port),
            }
        };
        ensure_str(!host.is_empty(), "the URL has no host")?;
        Ok(Target {
            tls,
            authority: authority.to_string(),
            host,
            port,
            path,
        })
    }
}

fn ensure_str(cond: bool, reason: &str) -> Result<(), String> {
    if cond { Ok(()) } else { Err(reason.to_string()) }
}

/// Sends a WebSocket upgrade request for the remote-command subprotocols and returns the
/// response head (status line and headers).
pub(super) async fn websocket_handshake(target: &Target, timeout: Duration) -> Result<String, String> {
    let exchange = async {
        let mut stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", target.host, target.port))?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WEBSOCKET_KEY}\r\n\
             Sec-WebSocket-Protocol: {}\r\n\r\n",
            target.path,
            target.authority,
            SUBPROTOCOLS.join(", ")
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send the upgrade request: {e}"))?;
        let mut head = Vec::new();
        let mut buffer = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() > MAX_HEAD_BYTES {
                return Err(format!(
                    "no end of the response head within {MAX_HEAD_BYTES} bytes"
                ));
            }
            let n = stream
                .read(&mut buffer)
                .await
                .map_err(|e| format!("reading the response: {e}"))?;
            if n == 0 {
                if head.is_empty() {
                    return Err("the server closed the connection without answering".into());
                }
                break;
            }
            head.extend_from_slice(&buffer[..n]);
        }
        let end = head
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(head.len());
        Ok(String::from_utf8_lossy(&head[..end]).into_owned())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no complete answer within {timeout:?}"))?
}

/// Checks a response head is a valid switch to the WebSocket protocol with one of our
/// subprotocols (or none: the legacy unnamed channel protocol).
pub(super) fn check_upgrade(head: &str) -> Result<(), String> {
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let mut parts = status.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") || code != "101" {
        return Err(format!(
            "expected \"HTTP/1.1 101 Switching Protocols\", got {status:?}"
        ));
    }
    let header = |name: &str| {
        head.split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    match header("Upgrade") {
        Some(v) if v.eq_ignore_ascii_case("websocket") => {}
        other => return Err(format!("Upgrade header is {other:?}, want \"websocket\"")),
    }
    match header("Sec-WebSocket-Accept") {
        Some(v) if v == WEBSOCKET_ACCEPT => {}
        other => {
            return Err(format!(
                "Sec-WebSocket-Accept is {other:?}, want {WEBSOCKET_ACCEPT:?} for our key"
            ));
        }
    }
    match header("Sec-WebSocket-Protocol") {
        None => Ok(()),
        Some(p) if SUBPROTOCOLS.contains(&p.as_str()) => Ok(()),
        Some(p) => Err(format!(
            "the server chose subprotocol {p:?}, which was not offered"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exec_urls() {
        let t = Target::parse("http://127.0.0.1:20251/exec/AbC-_123").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (false, "127.0.0.1", 20251, "/exec/AbC-_123")
        );
        let t = Target::parse("wss://[::1]/x?y=1#frag").unwrap();
        assert_eq!(
            (
                t.tls,
                t.host.as_str(),
                t.port,
                t.path.as_str(),
                t.authority.as_str()
            ),
            (true, "::1", 443, "/x?y=1", "[::1]")
        );
        let t = Target::parse("ws://host?token=1").unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/?token=1"));
        for bad in [
            "",
            "/exec/x",
            "ftp://h/x",
            "http://:80/x",
            "http://h:port/",
            "http://[::1/x",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn checks_the_upgrade_answer() {
        let good = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {WEBSOCKET_ACCEPT}\r\nSec-WebSocket-Protocol: v4.channel.k8s.io"
        );
        assert_eq!(check_upgrade(&good), Ok(()));
        assert!(check_upgrade("HTTP/1.1 404 Not Found\r\nContent-Length: 0").is_err());
        assert!(check_upgrade(&good.replace(WEBSOCKET_ACCEPT, "wrong=")).is_err());
        assert!(check_upgrade(&good.replace("v4.channel.k8s.io", "v9.channel.k8s.io")).is_err());
    }

    #[tokio::test]
    async fn handshakes_with_a_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let n = socket.read(&mut request).await.unwrap();
            let request = String::from_utf8_lossy(&request[..n]).into_owned();
            socket
                .write_all(
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                         Sec-WebSocket-Accept: {WEBSOCKET_ACCEPT}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            request
        });
        let target = Target::parse(&format!("http://127.0.0.1:{port}/exec/tok")).unwrap();
        let head = websocket_handshake(&target, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(check_upgrade(&head), Ok(()));
        let request = server.await.unwrap();
        assert!(request.starts_with("GET /exec/tok HTTP/1.1\r\n"), "{request}");
        assert!(request.contains(&format!("Sec-WebSocket-Key: {WEBSOCKET_KEY}")));
    }
}
