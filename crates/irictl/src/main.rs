// SPDX-License-Identifier: Apache-2.0
//! irictl: the command-line client for IRI runtimes.
//!
//! One binary with a subcommand per runtime (`irictl machine|volume|bucket ...`) covering what
//! upstream's `irictl-machine`, `irictl-volume` and `irictl-bucket` do, with the same input and
//! output shapes. Every failure prints exactly one `error: ...` line to stderr and exits non-zero.

mod bucket;
mod cli;
mod common;
mod exec;
mod input;
mod machine;
mod render;
mod session;
mod table;
mod units;
mod volume;

use std::{
    io::{ErrorKind, Write},
    process::ExitCode,
};

use anyhow::Result;
use clap::{Parser, error::ErrorKind as ClapErrorKind};

use crate::{
    cli::{Cli, RuntimeCommand},
    session::{AlreadyReported, Session},
};

/// Exit code of command-line usage errors (as clap uses).
const USAGE_EXIT_CODE: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<AlreadyReported>() => ExitCode::FAILURE,
        // The reader went away (`irictl ... | head`): nothing left to tell.
        Err(error)
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", one_line(&format!("{error:#}")));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let session = Session::new(&cli.global);
    let mut out = std::io::stdout().lock();
    match cli.runtime {
        RuntimeCommand::Machine { command } => machine::run(&session, command, &mut out).await?,
        RuntimeCommand::Volume { command } => volume::run(&session, command, &mut out).await?,
        RuntimeCommand::Bucket { command } => bucket::run(&session, command, &mut out).await?,
    }
    out.flush()?;
    Ok(())
}

/// Prints help and version as clap does; folds every other usage error into one `error:` line.
fn usage_error(error: &clap::Error) -> ExitCode {
    if matches!(
        error.kind(),
        ClapErrorKind::DisplayHelp
            | ClapErrorKind::DisplayVersion
            | ClapErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = error.print();
        return if error.use_stderr() {
            ExitCode::from(USAGE_EXIT_CODE)
        } else {
            ExitCode::SUCCESS
        };
    }
    eprintln!("error: {} (see --help)", usage_line(&error.render().to_string()));
    ExitCode::from(USAGE_EXIT_CODE)
}

/// The message of a rendered clap error, without `error:`, usage and hints, on one line.
fn usage_line(rendered: &str) -> String {
    let parts: Vec<String> = rendered
        .lines()
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| match line.strip_prefix("tip: ") {
            Some(tip) => format!("({tip})"),
            None => line.to_string(),
        })
        .collect();
    let joined = parts.join(" ");
    joined.strip_prefix("error: ").unwrap_or(&joined).to_string()
}

/// Flattens a message to one line.
pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_fold_into_one_line() {
        let error = Cli::try_parse_from(["irictl", "machine", "create", "machine"]).unwrap_err();
        assert_eq!(
            usage_line(&error.render().to_string()),
            "the following required arguments were not provided: --filename <FILE>"
        );
        let error = Cli::try_parse_from(["irictl", "machin"]).unwrap_err();
        let line = usage_line(&error.render().to_string());
        assert!(line.starts_with("unrecognized subcommand 'machin'"), "{line}");
        assert!(!line.contains('\n'));
    }
}
