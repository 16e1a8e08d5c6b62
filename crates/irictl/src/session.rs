// SPDX-License-Identifier: Apache-2.0
//! What every command shares: connecting to a runtime, calling it with a deadline, reporting
//! errors in one line, and printing.

use std::{collections::BTreeMap, fmt, future::Future, io::Write, time::Duration};

use anyhow::{Result, bail};
use iri_api::{Endpoint, RuntimeKind};
use tonic::{Code, Status, transport::Channel};

use crate::{
    cli::{GlobalArgs, Label, ListArgs, OutputFormat},
    render::{Columns, Object, Printer},
};

/// How long irictl polls for a well-known socket when no address is configured (upstream: 3 s).
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);

/// A failed call: the RPC's name and the gRPC status.
#[derive(Debug)]
pub struct RpcError {
    /// The RPC, e.g. `CreateMachine`.
    pub method: &'static str,
    /// What the runtime (or the transport) answered.
    pub status: Status,
}

impl RpcError {
    /// The gRPC status code.
    pub fn code(&self) -> Code {
        self.status.code()
    }
}

impl fmt::Display for RpcError {
    /// `CreateMachine: InvalidArgument: invalid machine.spec.class: ...`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?}", self.method, self.status.code())?;
        let mut message = self.status.message().to_string();
        let mut source = std::error::Error::source(&self.status);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                if !message.is_empty() {
                    message.push_str(": ");
                }
                message.push_str(&text);
            }
            source = cause.source();
        }
        if !message.is_empty() {
            write!(f, ": {message}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RpcError {}

/// Marks a command that already printed its errors (one `error:` line each) and only needs to
/// exit non-zero.
#[derive(Debug)]
pub struct AlreadyReported;

impl fmt::Display for AlreadyReported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("failed")
    }
}

impl std::error::Error for AlreadyReported {}

/// The settings of one irictl invocation.
#[derive(Debug)]
pub struct Session {
    address: Option<String>,
    timeout: Duration,
    output: Option<OutputFormat>,
    quiet: bool,
}

impl Session {
    /// A session from the global flags.
    pub fn new(global: &GlobalArgs) -> Self {
        Self {
            address: global.address.clone(),
            timeout: global.timeout,
            output: global.output,
            quiet: global.quiet,
        }
    }

    /// The deadline for connecting and for each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Resolves the runtime's endpoint and connects within the timeout.
    pub async fn connect(&self, kind: RuntimeKind) -> Result<Channel> {
        let endpoint = Endpoint::resolve(kind, self.address.as_deref(), DISCOVERY_TIMEOUT).await?;
        Ok(endpoint.connect(self.timeout).await?)
    }

    /// A request carrying the deadline as `grpc-timeout`.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// Awaits a call, enforcing the deadline on our side too.
    pub async fn call<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, RpcError> {
        let deadline_exceeded = || RpcError {
            method,
            status: Status::deadline_exceeded(format!("no answer within {:?}", self.timeout)),
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            // tonic's own enforcement of the grpc-timeout we set.
            Ok(Err(status)) if status.code() == Code::Cancelled && status.message() == "Timeout expired" => {
                Err(deadline_exceeded())
            }
            Ok(Err(status)) => Err(RpcError { method, status }),
            Err(_) => Err(deadline_exceeded()),
        }
    }

    /// The printer for `get` (table unless `-o` is given).
    pub fn printer(&self) -> Printer {
        Printer {
            format: self.output.unwrap_or(OutputFormat::Table),
            quiet: self.quiet,
        }
    }

    /// Prints a created object: `Created <what> <id>` unless `-o` or `-q` was given.
    pub fn print_created<T: Object>(
        &self,
        out: &mut dyn Write,
        what: &str,
        item: &T,
        columns: &impl Columns<T>,
    ) -> Result<()> {
        if self.output.is_none() && !self.quiet {
            writeln!(out, "Created {what} {}", item.key())?;
            return Ok(());
        }
        self.printer().one(out, item, columns)
    }

    /// Prints the object a create call (`method`) returned as [`Session::print_created`] does,
    /// or fails with `<method>: the runtime returned no <what>` when the response carries none.
    pub fn print_created_response<T: Object>(
        &self,
        out: &mut dyn Write,
        method: &str,
        what: &str,
        created: Option<T>,
        columns: &impl Columns<T>,
    ) -> Result<()> {
        let Some(created) = created else {
            bail!("{method}: the runtime returned no {what}");
        };
        self.print_created(out, what, &created, columns)
    }

    /// Calls `method` (a delete or detach, `rpc` starts it) for each subject (id or name) and
    /// prints `<noun> <subject> <done>`, or `<noun> <subject> not found` on NOT_FOUND (upstream
    /// treats that as done). Other errors are printed as `error:` lines as they happen and make
    /// the command fail once all subjects were tried.
    pub async fn for_each_tolerating_not_found<T, F, Fut>(
        &self,
        out: &mut dyn Write,
        subjects: &[String],
        noun: &str,
        done: &str,
        method: &'static str,
        mut rpc: F,
    ) -> Result<()>
    where
        F: FnMut(String) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut failed = false;
        for subject in subjects {
            match self.call(method, rpc(subject.clone())).await {
                Ok(_) => writeln!(out, "{noun} {subject} {done}")?,
                Err(e) if e.code() == Code::NotFound => writeln!(out, "{noun} {subject} not found")?,
                Err(e) => {
                    out.flush()?;
                    eprintln!("error: {}", crate::one_line(&e.to_string()));
                    failed = true;
                }
            }
        }
        if failed {
            Err(AlreadyReported.into())
        } else {
            Ok(())
        }
    }
}

/// A label selector map from `-l` pairs.
pub fn selector(labels: &[Label]) -> BTreeMap<String, String> {
    labels.iter().cloned().collect()
}

/// The filter of a list command built by `make` from `(id, label_selector)`, or `None` (list
/// everything) when neither an id nor labels were given.
pub fn list_filter<F>(
    args: &ListArgs,
    make: impl FnOnce(String, BTreeMap<String, String>) -> F,
) -> Option<F> {
    (args.id.is_some() || !args.labels.is_empty())
        .then(|| make(args.id.clone().unwrap_or_default(), selector(&args.labels)))
}

/// `[now - duration, now]` in Unix seconds, the event window upstream irictl sends.
pub fn event_window(duration: Duration) -> (i64, i64) {
    let now = crate::units::now_unix_seconds();
    let span = i64::try_from(duration.as_secs()).unwrap_or(i64::MAX);
    (now.saturating_sub(span).max(1), now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_errors_name_method_and_code() {
        let err = RpcError {
            method: "CreateMachine",
            status: Status::invalid_argument("invalid machine.spec.class: nope"),
        };
        assert_eq!(
            err.to_string(),
            "CreateMachine: InvalidArgument: invalid machine.spec.class: nope"
        );
        let err = RpcError {
            method: "DeleteMachine",
            status: Status::not_found(""),
        };
        assert_eq!(err.to_string(), "DeleteMachine: NotFound");
    }

    #[test]
    fn event_window_is_in_seconds() {
        let (from, to) = event_window(Duration::from_secs(3600));
        assert_eq!(to - from, 3600);
        assert!(to < 10_000_000_000, "seconds, not nanoseconds");
    }
}
