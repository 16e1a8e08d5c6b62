// SPDX-License-Identifier: Apache-2.0
//! A machine's serial console, as the provider holds it: one connection to QEMU's console
//! socket (QEMU serves one client at a time), shared by the console log and every Exec session.
//!
//! Output is appended to `console.log` (moved to `console.log.1` when it grows beyond the
//! configured size, so at most twice that is kept), kept in a small in-memory tail that a new
//! session sees first (what is on the "screen"), and broadcast to the open sessions. Input
//! from any session goes to the guest.
//!
//! Output printed while no provider is connected (between a provider crash and the next
//! start) is not recorded: QEMU drops it. The log says so with a line when the provider
//! reconnects to a running machine.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    sync::{broadcast, mpsc},
    task::JoinHandle,
};

/// How much recent output a new session is shown first.
const TAIL_BYTES: usize = 16 << 10;
/// How long the provider tries to reach a fresh QEMU's console socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A machine's console. Dropping it closes the connection.
pub struct Console {
    input: mpsc::Sender<Vec<u8>>,
    output: broadcast::Sender<Arc<Vec<u8>>>,
    tail: Arc<Mutex<VecDeque<u8>>>,
    task: JoinHandle<()>,
}

impl Drop for Console {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

/// One session's view of a console.
pub struct Session {
    /// Recent output, from before the session started.
    pub tail: Vec<u8>,
    /// Output from now on; closed when the console goes away (the machine stopped).
    pub output: broadcast::Receiver<Arc<Vec<u8>>>,
    /// Input to the guest.
    pub input: mpsc::Sender<Vec<u8>>,
}

impl Console {
    /// Connects to `socket` (retrying for a while: a fresh QEMU may not listen yet) and starts
    /// copying. `log` is the console log, `max_log` its size cap, `adopted` whether the machine
    /// ran before we connected (then output may have been lost, and the log says so).
    pub async fn connect(
        socket: PathBuf,
        log: PathBuf,
        max_log: u64,
        adopted: bool,
    ) -> std::io::Result<Console> {
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let path = crate::qemu::SocketPath::new(&socket)?;
        let stream = loop {
            match UnixStream::connect(path.path()).await {
                Ok(stream) => break stream,
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let (input, input_rx) = mpsc::channel(64);
        let (output, _) = broadcast::channel(1024);
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_BYTES)));
        let mut writer = LogWriter::open(log, max_log);
        if adopted {
            writer.write(
                b"\n[iri-machine-provider: console reconnected; output in between was not recorded]\n",
            );
        }
        let task = tokio::spawn(pump(stream, input_rx, output.clone(), tail.clone(), writer));
        Ok(Console {
            input,
            output,
            tail,
            task,
        })
    }

    /// Whether the connection is still up (false once QEMU exited).
    pub fn is_open(&self) -> bool {
        !self.task.is_finished()
    }

    /// A new session: the recent output, and output and input from now on.
    pub fn session(&self) -> Session {
        // Subscribe while holding the tail lock: the pump appends to the tail and broadcasts
        // under the same lock, so nothing falls between the two or shows up twice.
        let tail = lock(&self.tail);
        let output = self.output.subscribe();
        Session {
            tail: tail.iter().copied().collect(),
            output,
            input: self.input.clone(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn pump(
    stream: UnixStream,
    mut input: mpsc::Receiver<Vec<u8>>,
    output: broadcast::Sender<Arc<Vec<u8>>>,
    tail: Arc<Mutex<VecDeque<u8>>>,
    mut log: LogWriter,
) {
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        while let Some(bytes) = input.recv().await {
            if write.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut buffer = vec![0u8; 4096];
    loop {
        match read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let chunk = &buffer[..n];
                // The log write is a plain append to a local file; doing it inline keeps the
                // log in order with what sessions see.
                log.write(chunk);
                let mut tail = lock(&tail);
                tail.extend(chunk.iter().copied());
                let excess = tail.len().saturating_sub(TAIL_BYTES);
                tail.drain(..excess);
                // No receivers is fine: nobody is watching.
                let _ = output.send(Arc::new(chunk.to_vec()));
            }
        }
    }
    writer.abort();
}

/// Appends to the console log, moving it to `.1` when it grows beyond `max`.
struct LogWriter {
    path: PathBuf,
    max: u64,
    file: Option<File>,
    size: u64,
}

impl LogWriter {
    fn open(path: PathBuf, max: u64) -> Self {
        let mut writer = LogWriter {
            path,
            max,
            file: None,
            size: 0,
        };
        writer.reopen();
        writer
    }

    fn reopen(&mut self) {
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| tracing::warn!(path = %self.path.display(), %e, "cannot open the console log"))
            .ok();
        self.size = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.size + bytes.len() as u64 > self.max && self.size > 0 {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            let _ = std::fs::rename(&self.path, rotated);
            self.reopen();
        }
        if let Some(file) = &mut self.file
            && file.write_all(bytes).is_ok()
        {
            self.size += bytes.len() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_capped_at_twice_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = LogWriter::open(path.clone(), 100);
        for _ in 0..50 {
            log.write(&[b'x'; 30]);
        }
        let current = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(dir.path().join("console.log.1")).unwrap().len();
        assert!(current <= 100 && old <= 100, "{current} {old}");
        assert!(current > 0 && old > 0);
    }

    #[tokio::test]
    async fn sessions_see_the_tail_then_live_output_and_send_input() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("console.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let console = tokio::spawn(Console::connect(socket, dir.path().join("log"), 1 << 20, false));
        let (mut guest, _) = listener.accept().await.unwrap();
        let console = console.await.unwrap().unwrap();
        guest.write_all(b"booted\n").await.unwrap();
        // Wait for the pump to take it in.
        for _ in 0..100 {
            if !lock(&console.tail).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut session = console.session();
        assert_eq!(session.tail, b"booted\n");
        guest.write_all(b"more").await.unwrap();
        assert_eq!(session.output.recv().await.unwrap().as_slice(), b"more");
        session.input.send(b"ls\n".to_vec()).await.unwrap();
        let mut got = [0u8; 3];
        guest.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ls\n");
        drop(guest);
        for _ in 0..100 {
            if !console.is_open() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!console.is_open());
        let log = std::fs::read(dir.path().join("log")).unwrap();
        assert_eq!(log, b"booted\nmore");
    }
}
