// SPDX-License-Identifier: Apache-2.0
//! The streaming server behind `Exec`: single-use URLs, and console sessions over the
//! Kubernetes remote-command WebSocket protocol.
//!
//! `Exec` hands out `<base_url>/exec/<token>`: the token is 128 random bits (base64url), valid
//! once, for `exec.url_seconds`. At most `exec.max_sessions` URLs and sessions are in flight
//! together; Exec beyond that is RESOURCE_EXHAUSTED (the machinepoollet turns it into HTTP 429
//! with Retry-After). An unknown, used or expired token is HTTP 404.
//!
//! A session is a WebSocket with subprotocol `v5.channel.k8s.io`, `v4.channel.k8s.io` or
//! `channel.k8s.io`: every binary message starts with a channel byte: 0 stdin, 1 stdout,
//! 2 stderr, 3 error (a JSON `metav1.Status` when the session ends), 4 resize (ignored: a serial
//! console has no size), and with v5 255 close (the client is done with a stream; a console
//! has no end of input, so it is ignored).
//! The session is the machine's serial console (TTY semantics, no stderr): it first shows the
//! recent console output, then what the guest prints; stdin goes to the guest. Several sessions
//! may share a console. The session ends when the client closes it or the machine stops.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{
        Path, State, WebSocketUpgrade,
        ws::rejection::WebSocketUpgradeRejection,
        ws::{Message, WebSocket},
    },
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use base64::Engine;
use iri_runtime::{Error, Result};
use tokio::sync::broadcast::error::RecvError;

use crate::machines::Machines;

/// Subprotocols spoken, preferred first.
pub const PROTOCOLS: [&str; 3] = ["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"];

/// Channel bytes of the remote-command protocol.
pub mod channel {
    /// Input to the guest.
    pub const STDIN: u8 = 0;
    /// Output of the guest.
    pub const STDOUT: u8 = 1;
    /// Unused: a TTY session has no separate stderr.
    pub const STDERR: u8 = 2;
    /// The final status.
    pub const ERROR: u8 = 3;
    /// Terminal size changes.
    pub const RESIZE: u8 = 4;
    /// v5: the client closed one of its streams.
    pub const CLOSE: u8 = 255;
}

struct Token {
    machine_id: String,
    expires: Instant,
}

/// Issues Exec URLs and serves them.
pub struct ExecServer {
    machines: Arc<Machines>,
    tokens: Mutex<HashMap<String, Token>>,
    open: AtomicUsize,
    max_sessions: usize,
    lifetime: Duration,
    base_url: OnceLock<String>,
}

impl ExecServer {
    /// A server for the consoles of `machines`.
    pub fn new(machines: Arc<Machines>, max_sessions: usize, lifetime: Duration) -> Self {
        ExecServer {
            machines,
            tokens: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
            max_sessions,
            lifetime,
            base_url: OnceLock::new(),
        }
    }

    /// Sets the URL prefix (once the listener is bound and its port known).
    pub fn set_base_url(&self, url: String) {
        let _ = self.base_url.set(url.trim_end_matches('/').to_string());
    }

    fn tokens(&self) -> MutexGuard<'_, HashMap<String, Token>> {
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A single-use URL for a console session of `machine_id`.
    pub fn issue(&self, machine_id: &str) -> Result<String> {
        let base = self
            .base_url
            .get()
            .ok_or_else(|| Error::Unavailable("the exec streaming server is not up yet".into()))?;
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(Error::internal)?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let now = Instant::now();
        let mut tokens = self.tokens();
        tokens.retain(|_, t| t.expires > now);
        let in_flight = tokens.len() + self.open.load(Ordering::Acquire);
        if in_flight >= self.max_sessions {
            return Err(Error::ResourceExhausted(format!(
                "{in_flight} exec sessions are in flight, at most {} are allowed; retry in a minute",
                self.max_sessions
            )));
        }
        tokens.insert(
            token.clone(),
            Token {
                machine_id: machine_id.to_string(),
                expires: now + self.lifetime,
            },
        );
        Ok(format!("{base}/exec/{token}"))
    }

    /// Takes a token: its machine, if the token is known and not expired.
    fn redeem(&self, token: &str) -> Option<String> {
        let token = self.tokens().remove(token)?;
        (token.expires > Instant::now()).then_some(token.machine_id)
    }

    /// The HTTP routes: `GET /exec/{token}`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/exec/{token}", get(handle).post(handle))
            .with_state(self.clone())
    }
}

/// Counts an open session for as long as it lives.
struct OpenSession(Arc<ExecServer>);

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn handle(
    State(server): State<Arc<ExecServer>>,
    Path(token): Path<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some(machine_id) = server.redeem(&token) else {
        return (StatusCode::NOT_FOUND, "unknown or expired exec session\n").into_response();
    };
    let Ok(upgrade) = upgrade else {
        return (
            StatusCode::BAD_REQUEST,
            "exec sessions are WebSocket only (subprotocol v4.channel.k8s.io)\n",
        )
            .into_response();
    };
    let Some(session) = server.machines.console(&machine_id) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the machine is not running, so it has no console\n",
        )
            .into_response();
    };
    server.open.fetch_add(1, Ordering::AcqRel);
    let guard = OpenSession(server.clone());
    upgrade.protocols(PROTOCOLS).on_upgrade(move |socket| async move {
        let _guard = guard;
        run_session(socket, session, &machine_id).await;
    })
}

fn frame(channel: u8, bytes: &[u8]) -> Message {
    let mut data = Vec::with_capacity(bytes.len() + 1);
    data.push(channel);
    data.extend_from_slice(bytes);
    Message::Binary(data.into())
}

async fn run_session(mut socket: WebSocket, session: crate::console::Session, machine_id: &str) {
    let crate::console::Session {
        tail,
        mut output,
        input,
    } = session;
    tracing::info!(id = machine_id, "exec session opened");
    // An empty stdout frame says the session is established (what kubelet's server sends).
    if socket.send(frame(channel::STDOUT, &[])).await.is_err() {
        return;
    }
    if !tail.is_empty() && socket.send(frame(channel::STDOUT, &tail)).await.is_err() {
        return;
    }
    let ending = loop {
        tokio::select! {
            out = output.recv() => match out {
                Ok(bytes) => {
                    if socket.send(frame(channel::STDOUT, &bytes)).await.is_err() {
                        return;
                    }
                }
                // Output went by faster than this client took it: it misses some, like a slow
                // terminal would.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break Some("the machine's console closed (the machine stopped)"),
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Binary(data))) => {
                    if let Some((&channel, rest)) = data.split_first()
                        && channel == channel::STDIN
                        && !rest.is_empty()
                        && input.send(rest.to_vec()).await.is_err()
                    {
                        break Some("the machine's console closed (the machine stopped)");
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    // Some clients send stdin as text frames with the channel as first byte.
                    let bytes = text.as_bytes();
                    if let Some((&channel, rest)) = bytes.split_first()
                        && channel == channel::STDIN
                        && !rest.is_empty()
                        && input.send(rest.to_vec()).await.is_err()
                    {
                        break Some("the machine's console closed (the machine stopped)");
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
                Some(Ok(_)) => {}
            },
        }
    };
    if let Some(reason) = ending {
        let status = serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": reason,
            "reason": "InternalError",
        });
        let _ = socket
            .send(frame(channel::ERROR, status.to_string().as_bytes()))
            .await;
    }
    let _ = socket.send(Message::Close(None)).await;
    tracing::info!(id = machine_id, "exec session closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(max: usize, lifetime: Duration) -> ExecServer {
        let dir = std::env::temp_dir();
        let server = ExecServer::new(Arc::new(Machines::new(dir, Default::default())), max, lifetime);
        server.set_base_url("http://127.0.0.1:1/".into());
        server
    }

    #[test]
    fn urls_are_single_use_and_bounded() {
        let server = server(2, Duration::from_secs(60));
        let a = server.issue("m1").unwrap();
        assert!(a.starts_with("http://127.0.0.1:1/exec/"), "{a}");
        let b = server.issue("m2").unwrap();
        assert_ne!(a, b);
        let err = server.issue("m3").unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let token = a.rsplit('/').next().unwrap();
        assert_eq!(server.redeem(token).as_deref(), Some("m1"));
        assert_eq!(server.redeem(token), None);
        // The used token no longer counts.
        server.issue("m3").unwrap();
    }

    #[test]
    fn expired_urls_are_refused_and_free_their_slot() {
        let server = server(1, Duration::from_millis(1));
        let url = server.issue("m").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(server.redeem(url.rsplit('/').next().unwrap()), None);
        let again = server.issue("m").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        // Expired tokens are pruned on issue: the bound is not eaten by stale URLs.
        server.issue("m").unwrap();
        assert_eq!(server.redeem(again.rsplit('/').next().unwrap()), None);
    }
}
