// SPDX-License-Identifier: Apache-2.0
//! An async client for the QEMU Machine Protocol (QMP), the JSON protocol QEMU and
//! qemu-storage-daemon are driven by.
//!
//! One [`Qmp`] is one connection to one QMP socket. Commands may be issued concurrently from
//! many tasks: each gets a unique id and its own answer. Asynchronous events (`SHUTDOWN`,
//! `BLOCK_JOB_COMPLETED`, `DEVICE_DELETED`...) go to every [`Qmp::events`] subscriber. When
//! the peer goes away, every pending and future command fails with [`Error::Disconnected`]:
//! the caller decides whether to reconnect.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixStream, unix::OwnedWriteHalf},
    sync::{broadcast, oneshot},
};

/// What can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting or writing failed.
    #[error("qmp {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The peer closed the connection (the process exited or crashed).
    #[error("qmp {0}: disconnected")]
    Disconnected(String),
    /// The peer did not answer in time.
    #[error("qmp {path}: {command} timed out after {timeout:?}")]
    Timeout {
        /// The socket.
        path: String,
        /// The command.
        command: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The peer answered with an error.
    #[error("qmp {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The peer sent something that is not QMP, or an answer of an unexpected shape.
    #[error("qmp {path}: protocol error: {reason}")]
    Protocol {
        /// The socket.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// Shorthand for QMP results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    /// Event name, e.g. `SHUTDOWN`.
    pub event: String,
    /// Event data (`null` when the event has none).
    #[serde(default)]
    pub data: Value,
}

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Value>>>>>>;

/// A QMP connection.
#[derive(Clone)]
pub struct Qmp {
    path: String,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    /// Answers we wait for, by id; `None` once the connection is gone.
    pending: Pending,
    next_id: Arc<AtomicU64>,
    events: broadcast::Sender<Event>,
    timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).finish()
    }
}

/// How long a command may take by default. Block jobs run asynchronously, so commands
/// themselves are quick; this bounds a hung peer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path).await.map_err(|source| Error::Io {
            path: shown.clone(),
            source,
        })?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(DEFAULT_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| Error::Timeout {
                path: shown.clone(),
                command: "greeting".into(),
                timeout: DEFAULT_TIMEOUT,
            })?
            .map_err(|source| Error::Io {
                path: shown.clone(),
                source,
            })?
            .ok_or_else(|| Error::Disconnected(shown.clone()))?;
        let greeting: Value = serde_json::from_str(&greeting).map_err(|e| Error::Protocol {
            path: shown.clone(),
            reason: format!("greeting: {e}"),
        })?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Protocol {
                path: shown,
                reason: format!("not a QMP greeting: {greeting}"),
            });
        }

        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events, _) = broadcast::channel(256);
        let qmp = Qmp {
            path: shown,
            writer: Arc::new(tokio::sync::Mutex::new(write)),
            pending: pending.clone(),
            next_id: Arc::new(AtomicU64::new(1)),
            events: events.clone(),
            timeout: DEFAULT_TIMEOUT,
        };
        tokio::spawn(read_loop(qmp.path.clone(), lines, pending, events));
        qmp.execute_value("qmp_capabilities", Value::Null).await?;
        Ok(qmp)
    }

    /// The same connection with another per-command timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Qmp {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Subscribes to asynchronous events (those emitted from now on).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether the connection is still up.
    pub fn is_connected(&self) -> bool {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Executes `command` with `arguments` (an object, or `Value::Null` for none) and decodes the
    /// `return` value into `T`.
    pub async fn execute<T: DeserializeOwned>(&self, command: &str, arguments: Value) -> Result<T> {
        let value = self.execute_value(command, arguments).await?;
        serde_json::from_value(value).map_err(|e| Error::Protocol {
            path: self.path.clone(),
            reason: format!("{command}: unexpected answer: {e}"),
        })
    }

    /// Executes `command` and returns its raw `return` value.
    pub async fn execute_value(&self, command: &str, arguments: Value) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let Some(pending) = pending.as_mut() else {
                return Err(Error::Disconnected(self.path.clone()));
            };
            pending.insert(id, tx);
        }
        let mut message = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        tracing::trace!(qmp = %self.path, command, "execute");
        let written = {
            let mut writer = self.writer.lock().await;
            writer.write_all(line.as_bytes()).await
        };
        if let Err(source) = written {
            self.forget(id);
            return Err(Error::Io {
                path: self.path.clone(),
                source,
            });
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Err(_) => {
                self.forget(id);
                Err(Error::Timeout {
                    path: self.path.clone(),
                    command: command.to_string(),
                    timeout: self.timeout,
                })
            }
            Ok(Err(_)) => Err(Error::Disconnected(self.path.clone())),
            Ok(Ok(result)) => result.map_err(|e| match e {
                Error::Command { class, desc, .. } => Error::Command {
                    command: command.to_string(),
                    class,
                    desc,
                },
                other => other,
            }),
        }
    }

    fn forget(&self, id: u64) {
        if let Some(pending) = self.pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            pending.remove(&id);
        }
    }
}

async fn read_loop(
    path: String,
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: broadcast::Sender<Event>,
) {
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(err) => {
                tracing::debug!(qmp = %path, %err, "read failed");
                break;
            }
        };
        let message: Value = match serde_json::from_str(&line) {
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(qmp = %path, %err, "ignoring a line that is not JSON");
                continue;
            }
        };
        if message.get("event").is_some() {
            if let Ok(event) = serde_json::from_value::<Event>(message) {
                // No subscriber is fine: events nobody asked for are dropped.
                let _ = events.send(event);
            }
            continue;
        }
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            tracing::warn!(qmp = %path, %message, "answer without our id");
            continue;
        };
        let result = if let Some(value) = message.get("return") {
            Ok(value.clone())
        } else if let Some(error) = message.get("error") {
            Err(Error::Command {
                command: String::new(),
                class: error
                    .get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                desc: error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            })
        } else {
            Err(Error::Protocol {
                path: path.clone(),
                reason: format!("answer without return or error: {message}"),
            })
        };
        let waiter = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|p| p.remove(&id));
        if let Some(waiter) = waiter {
            let _ = waiter.send(result);
        }
    }
    // Fail everything still waiting, and everything that comes later.
    let waiters = pending.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(waiters);
}
