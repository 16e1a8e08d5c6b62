// SPDX-License-Identifier: Apache-2.0
//! `irictl machine exec`: an interactive console over the runtime's Exec URL.
//!
//! Calls Exec, opens the URL with the remote-command WebSocket protocol
//! ([`remotecommand`]), and pumps stdin to the session and the session's stdout/stderr to ours.
//!
//! * **Terminal** (stdin is a TTY): the terminal goes into raw mode, so every key (Ctrl-C, Ctrl-D,
//!   arrows) reaches the guest; the terminal size is sent at start and on every SIGWINCH. The
//!   escape character (default `Ctrl-]`, as in telnet) detaches. The terminal is restored on every
//!   way out: detach, end of the session, errors, SIGTERM/SIGHUP/SIGINT, and panics (a drop guard).
//! * **Pipe** (stdin is not a TTY): stdin is sent as it comes; at its end the client tells the
//!   server (v5) and keeps showing output for `--wait`, then closes the session. A console has no
//!   end of its own, so this wait is what ends `echo cmd | irictl machine exec <id>`.
//!
//! The session also ends when the server closes it (e.g. the machine stopped); a failure the
//! server reports on the error channel makes irictl exit non-zero with that message.

use std::{
    io::{IsTerminal, Read, Write},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::termios::{self, SetArg, Termios};
use remotecommand::Output;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::Instant,
};

/// The default escape character: Ctrl-], as telnet uses.
pub const DEFAULT_ESCAPE: &str = "^]";

/// How `machine exec` behaves.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// After the end of piped stdin, how long output is still shown.
    pub wait: Duration,
    /// The byte that detaches an interactive session (`None`: no escape).
    pub escape: Option<u8>,
    /// How long connecting to the URL may take.
    pub connect_timeout: Duration,
}

/// The byte that detaches an interactive session (`None`: no escape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escape(pub Option<u8>);

/// Parses an escape character: `^X` (Ctrl-X, `^]` by default), a single ASCII character, or
/// `none`.
pub fn parse_escape(text: &str) -> Result<Escape, String> {
    parse_escape_byte(text).map(Escape)
}

fn parse_escape_byte(text: &str) -> Result<Option<u8>, String> {
    let invalid =
        || format!("invalid escape character {text:?}, expected ^X (e.g. ^]), one ASCII character or none");
    if text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    match text.as_bytes() {
        [b'^', c] if (b'@'..=b'_').contains(&c.to_ascii_uppercase()) => {
            Ok(Some(c.to_ascii_uppercase() & 0x1f))
        }
        [b'^', b'?'] => Ok(Some(0x7f)),
        [c] if c.is_ascii() => Ok(Some(*c)),
        _ => Err(invalid()),
    }
}

/// How an escape byte is shown (`^]`).
fn show_escape(byte: u8) -> String {
    match byte {
        0x7f => "^?".into(),
        b if b < 0x20 => format!("^{}", (b | 0x40) as char),
        b => (b as char).to_string(),
    }
}

/// Restores the terminal's settings when dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal on stdin into raw mode.
    fn enable() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).context("cannot read the terminal's settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("cannot put the terminal in raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // TCSADRAIN: what we printed last is shown with the settings it was written for.
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// Reads stdin on a plain thread: tokio's stdin would leave a blocking read behind that keeps
/// the process from exiting until the next key press. The thread ends with the process.
fn stdin_reader() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buffer = vec![0u8; 8192];
        loop {
            match stdin.read(&mut buffer) {
                // EOF (or an unreadable stdin): dropping the sender ends the stream.
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buffer[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// The terminal's size (columns, rows), from stdout or else stdin.
fn terminal_size() -> Option<(u16, u16)> {
    terminal_size::terminal_size_of(std::io::stdout())
        .or_else(|| terminal_size::terminal_size_of(std::io::stdin()))
        .map(|(w, h)| (w.0, h.0))
}

/// Why the pump stopped.
enum End {
    /// The server closed the session.
    Closed,
    /// The user typed the escape character.
    Detached,
    /// Piped stdin ended and `--wait` passed.
    InputDone,
    /// A signal asked us to stop.
    Signal(&'static str),
}

/// Runs an interactive or piped console session on `url` for machine `machine_id`.
pub async fn console(machine_id: &str, url: &str, options: Options, out: &mut dyn Write) -> Result<()> {
    let session = tokio::time::timeout(options.connect_timeout, remotecommand::Session::connect(url))
        .await
        .map_err(|_| {
            anyhow!(
                "connecting to the console at {url}: no answer within {:?}",
                options.connect_timeout
            )
        })?
        .with_context(|| format!("connecting to the console at {url}"))?;
    let interactive = std::io::stdin().is_terminal();
    // Handlers first: from here on these signals are ours, so the terminal is always restored.
    let mut signals = Signals::new()?;
    if interactive {
        let escape = match options.escape {
            Some(byte) => format!("escape character is '{}'", show_escape(byte)),
            None => "no escape character: end the session from the guest".into(),
        };
        eprintln!("Connected to the console of machine {machine_id} ({escape}).");
    }
    let raw = if interactive {
        Some(RawMode::enable()?)
    } else {
        None
    };
    let (mut writer, reader) = session.split();
    let result = pump(&mut writer, reader, interactive, options, &mut signals, out).await;
    // Tell the server we are gone; it may already have closed.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.close()).await;
    drop(raw);
    let (end, failure) = result?;
    if interactive {
        match end {
            End::Detached => eprintln!("\nDetached from machine {machine_id}."),
            End::Closed => eprintln!("\nConnection to the console of machine {machine_id} closed."),
            End::InputDone | End::Signal(_) => eprintln!(),
        }
    }
    if let Some(message) = failure {
        bail!("console of machine {machine_id}: {message}");
    }
    if let End::Signal(name) = end {
        bail!("console of machine {machine_id}: interrupted by {name}");
    }
    Ok(())
}

/// The signals that end a session, and SIGWINCH.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    window: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        let install = |kind| signal(kind).context("cannot install signal handlers");
        Ok(Signals {
            terminate: install(SignalKind::terminate())?,
            hangup: install(SignalKind::hangup())?,
            interrupt: install(SignalKind::interrupt())?,
            window: install(SignalKind::window_change())?,
        })
    }
}

async fn pump(
    writer: &mut remotecommand::SessionWriter,
    mut reader: remotecommand::SessionReader,
    interactive: bool,
    options: Options,
    signals: &mut Signals,
    out: &mut dyn Write,
) -> Result<(End, Option<String>)> {
    let mut input = stdin_reader();
    let mut input_open = true;
    let mut failure = None;
    // Far away until piped input ends; `input_done` says whether it is armed.
    let done_at = tokio::time::sleep(Duration::from_secs(86400 * 365));
    tokio::pin!(done_at);
    let mut input_done = false;
    if interactive && let Some((width, height)) = terminal_size() {
        writer.resize(width, height).await?;
    }
    let end = loop {
        tokio::select! {
            output = reader.next() => match output {
                None => break End::Closed,
                Some(Ok(Output::Stdout(bytes))) => {
                    out.write_all(&bytes)?;
                    out.flush()?;
                }
                Some(Ok(Output::Stderr(bytes))) => {
                    let mut stderr = std::io::stderr();
                    stderr.write_all(&bytes)?;
                    stderr.flush()?;
                }
                Some(Ok(Output::Error(message))) => failure = Some(message),
                Some(Err(e)) => return Err(anyhow::Error::new(e).context("console session")),
            },
            chunk = input.recv(), if input_open => match chunk {
                Some(bytes) => {
                    let escape_at = options
                        .escape
                        .filter(|_| interactive)
                        .and_then(|escape| bytes.iter().position(|b| *b == escape));
                    match escape_at {
                        Some(at) => {
                            writer.send_stdin(&bytes[..at]).await?;
                            break End::Detached;
                        }
                        None => writer.send_stdin(&bytes).await?,
                    }
                }
                None => {
                    input_open = false;
                    // A closed terminal (hangup) is the end of an interactive session.
                    if interactive {
                        break End::InputDone;
                    }
                    writer.close_stdin().await?;
                    done_at.as_mut().reset(Instant::now() + options.wait);
                    input_done = true;
                }
            },
            () = &mut done_at, if input_done => break End::InputDone,
            _ = signals.window.recv() => {
                if interactive && let Some((width, height)) = terminal_size() {
                    writer.resize(width, height).await?;
                }
            }
            _ = signals.terminate.recv() => break End::Signal("SIGTERM"),
            _ = signals.hangup.recv() => break End::Signal("SIGHUP"),
            _ = signals.interrupt.recv() => break End::Signal("SIGINT"),
        }
    };
    Ok((end, failure))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_characters() {
        assert_eq!(parse_escape_byte("^]"), Ok(Some(0x1d)));
        assert_eq!(parse_escape_byte("^a"), Ok(Some(0x01)));
        assert_eq!(parse_escape_byte("^?"), Ok(Some(0x7f)));
        assert_eq!(parse_escape_byte("~"), Ok(Some(b'~')));
        assert_eq!(parse_escape_byte("none"), Ok(None));
        for bad in ["", "^]]", "é", "ab", "^1"] {
            assert!(parse_escape_byte(bad).is_err(), "{bad:?}");
        }
        assert_eq!(show_escape(0x1d), "^]");
        assert_eq!(show_escape(0x7f), "^?");
        assert_eq!(show_escape(b'~'), "~");
    }
}
