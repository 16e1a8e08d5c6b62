// SPDX-License-Identifier: Apache-2.0
//! `iri-conformance`: runs the IRI conformance suite, or the benchmark, against any runtime.
//!
//! Exit codes: 0 when nothing failed, 1 when a test (or a benchmark sample) failed, 2 for usage
//! errors and when the runtime cannot be reached, each with one `error: ...` line on stderr.

use std::{
    collections::BTreeSet,
    io::{ErrorKind, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::Ordering,
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum, error::ErrorKind as ClapErrorKind};
use iri_api::{Endpoint, RuntimeKind};
use iri_conformance::{
    Config, Profile, RunOptions,
    bench::{self, BenchOptions},
    report,
};
use regex::Regex;

/// How long to poll for a well-known socket when no address is given (upstream's clients: 3 s).
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Exit code when a test or a benchmark sample failed.
const FAILED: u8 = 1;
/// Exit code of usage errors and unreachable runtimes (as clap uses for usage errors).
const USAGE: u8 = 2;

/// iri-conformance: the conformance suite and benchmark for IronCore IRI runtimes (machine,
/// volume and bucket), ours or anyone's.
///
/// The runtime is found via --address, else IRI_{MACHINE,VOLUME,BUCKET}_RUNTIME_ENDPOINT, else
/// the well-known sockets /var/run/iri-<kind>broker.sock and /var/run/iri-<kind>provider.sock
/// (polled for up to 3 s). The runtime must serve nobody else while the suite runs.
#[derive(Debug, Parser)]
#[command(name = "iri-conformance", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Test a machine runtime (machine.v1alpha1.MachineRuntime).
    Machine(RunArgs),
    /// Test a volume runtime (volume.v1alpha1.VolumeRuntime).
    Volume(RunArgs),
    /// Test a bucket runtime (bucket.v1alpha1.BucketRuntime).
    Bucket(RunArgs),
    /// Measure per-RPC latency (p50/p90/p99/max) and throughput of a runtime.
    ///
    /// Runs a create/list/delete lifecycle `--iterations` times at each `--concurrency` level
    /// and prints a table per level. `--json` writes critest's benchmark schema, one document
    /// per level: FILE itself for a single level, else FILE with `.c<N>` before the extension.
    Bench(BenchArgs),
}

/// Where the runtime is and what the suite cannot guess about it.
#[derive(Debug, Args)]
struct Target {
    /// Runtime endpoint: unix:///path, /path, tcp://host:port or http://host:port.
    #[arg(long, value_name = "ADDRESS")]
    address: Option<String>,

    /// Config file (TOML): classes, image, sizes, timeouts, hooks. See docs/conformance.md.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl Target {
    fn config(&self) -> Result<Config> {
        match &self.config {
            Some(path) => Config::load(path),
            None => Ok(Config::default()),
        }
    }

    async fn endpoint(&self, kind: RuntimeKind) -> Result<Endpoint> {
        Ok(Endpoint::resolve(kind, self.address.as_deref(), DISCOVERY_TIMEOUT).await?)
    }
}

/// A `--profile` value: a profile or `all`.
#[derive(Debug, Clone, Copy)]
enum ProfileArg {
    All,
    One(Profile),
}

fn parse_profile(text: &str) -> Result<ProfileArg, String> {
    match text {
        "all" => Ok(ProfileArg::All),
        _ => text.parse().map(ProfileArg::One),
    }
}

fn parse_regex(text: &str) -> Result<Regex, String> {
    Regex::new(text).map_err(|e| format!("invalid regex: {}", one_line(&e.to_string())))
}

/// Flags of a suite run.
#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    target: Target,

    /// Profiles to run: core, snapshots, encryption, expand, hotplug, exec, restart,
    /// data-plane, scale or all (comma-separated or repeated). Tests of other profiles are
    /// reported as skipped.
    #[arg(long, value_name = "PROFILE,...", value_delimiter = ',', value_parser = parse_profile, default_value = "core")]
    profile: Vec<ProfileArg>,

    /// Run only tests whose full name (<kind>/<category>/<name>) matches this regex.
    #[arg(long, value_name = "REGEX", value_parser = parse_regex)]
    focus: Option<Regex>,

    /// Skip tests whose full name matches this regex.
    #[arg(long, value_name = "REGEX", value_parser = parse_regex)]
    skip: Option<Regex>,

    /// Write a JUnit XML report to FILE.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,

    /// Write a JSON report to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// How many tests run at once (serial tests always run alone).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    parallel: u16,

    /// List the tests (with profile, category and summary) and whether this invocation selects
    /// them, then exit without connecting.
    #[arg(long)]
    list: bool,
}

impl RunArgs {
    fn profiles(&self) -> BTreeSet<Profile> {
        self.profile
            .iter()
            .flat_map(|p| match p {
                ProfileArg::All => Profile::ALL.to_vec(),
                ProfileArg::One(p) => vec![*p],
            })
            .collect()
    }
}

/// The runtime kind `bench` measures.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    Machine,
    Volume,
    Bucket,
}

impl From<Kind> for RuntimeKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Machine => RuntimeKind::Machine,
            Kind::Volume => RuntimeKind::Volume,
            Kind::Bucket => RuntimeKind::Bucket,
        }
    }
}

/// Flags of `bench`.
#[derive(Debug, Args)]
struct BenchArgs {
    /// The runtime to measure.
    #[arg(value_enum)]
    kind: Kind,

    #[command(flatten)]
    target: Target,

    /// Lifecycles in flight at once; several levels as a list (1,4,16), measured in order.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_value = "1", value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: Vec<u16>,

    /// Lifecycles per concurrency level.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    iterations: u32,

    /// Write the raw datapoints in critest's benchmark JSON schema (one file per level).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Write the percentiles and throughput per operation and level as JSON.
    #[arg(long, value_name = "FILE")]
    summary_json: Option<PathBuf>,
}

/// How a command ended, when it did not fail outright.
enum Finished {
    Passed,
    Failed,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(USAGE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Finished::Passed) => ExitCode::SUCCESS,
        Ok(Finished::Failed) => ExitCode::from(FAILED),
        Err(error) => {
            eprintln!("error: {}", one_line(&format!("{error:#}")));
            ExitCode::from(USAGE)
        }
    }
}

async fn run(cli: Cli) -> Result<Finished> {
    match cli.command {
        Command::Machine(args) => suite(RuntimeKind::Machine, args).await,
        Command::Volume(args) => suite(RuntimeKind::Volume, args).await,
        Command::Bucket(args) => suite(RuntimeKind::Bucket, args).await,
        Command::Bench(args) => benchmark(args).await,
    }
}

async fn suite(kind: RuntimeKind, args: RunArgs) -> Result<Finished> {
    let config = args.target.config()?;
    let mut options = RunOptions::new(kind);
    options.profiles = args.profiles();
    options.focus = args.focus.clone();
    options.skip = args.skip.clone();
    options.parallel = usize::from(args.parallel);
    options.config = config;

    let cases: Vec<_> = iri_conformance::suite::all()
        .into_iter()
        .filter(|c| c.kind == kind)
        .collect();
    let selected = |case: &iri_conformance::TestCase| {
        let name = case.full_name();
        options.profiles.contains(&case.profile)
            && options.focus.as_ref().is_none_or(|re| re.is_match(&name))
            && !options.skip.as_ref().is_some_and(|re| re.is_match(&name))
    };
    if args.list {
        let rows: Vec<[String; 5]> = cases
            .iter()
            .map(|c| {
                [
                    c.full_name(),
                    c.profile.name().to_string(),
                    c.category.name().to_string(),
                    if selected(c) { "yes" } else { "no" }.to_string(),
                    c.summary.to_string(),
                ]
            })
            .collect();
        let chosen = cases.iter().filter(|c| selected(c)).count();
        let mut text = align(["TEST", "PROFILE", "CATEGORY", "SELECTED", "SUMMARY"], &rows);
        text.push_str(&format!("{} tests, {chosen} selected\n", cases.len()));
        print(&text)?;
        return Ok(Finished::Passed);
    }

    let endpoint = args.target.endpoint(kind).await?;
    // Dial once up front, so an unreachable runtime is exactly one error line, before any
    // progress output.
    drop(endpoint.connect(options.config.timeouts.rpc()).await?);
    let chosen = cases.iter().filter(|c| selected(c)).count();
    // Progress goes to stderr: stdout carries only the report, summary line last.
    eprintln!(
        "iri-conformance: running {chosen} of {} {kind} tests against {endpoint} ({} at once)",
        cases.len(),
        options.parallel
    );
    let report = iri_conformance::run(&endpoint, options).await?;
    print(&report::text(&report))?;
    if let Some(path) = &args.junit {
        write_file(path, &report::junit(&report))?;
    }
    if let Some(path) = &args.json {
        write_file(path, &report::json(&report))?;
    }
    Ok(if report.failed() == 0 {
        Finished::Passed
    } else {
        Finished::Failed
    })
}

async fn benchmark(args: BenchArgs) -> Result<Finished> {
    let kind = RuntimeKind::from(args.kind);
    let config = args.target.config()?;
    let endpoint = args.target.endpoint(kind).await?;
    // As for a suite run: an unreachable runtime is one error line, before any progress output.
    drop(endpoint.connect(config.timeouts.rpc()).await?);
    let mut options = BenchOptions::new(kind);
    options.concurrency = args.concurrency.iter().map(|&c| usize::from(c)).collect();
    options.iterations = args.iterations as usize;
    options.config = config;
    // Ctrl-C stops starting samples; those in flight finish and everything is cleaned up.
    let interrupt = options.interrupt.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("iri-conformance: interrupted, finishing the samples in flight and cleaning up");
            interrupt.store(true, Ordering::Relaxed);
        }
    });
    eprintln!(
        "iri-conformance: benchmarking the {kind} runtime at {endpoint}: {} lifecycles at concurrency {}",
        options.iterations,
        args.concurrency
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let report = bench::run(&endpoint, options).await?;
    print(&bench::table(&report))?;
    if let Some(path) = &args.json {
        for level in &report.levels {
            let file = bench::results_path(path, level.concurrency, report.levels.len());
            let mut text = serde_json::to_string_pretty(&level.results)?;
            text.push('\n');
            write_file(&file, &text)?;
        }
    }
    if let Some(path) = &args.summary_json {
        let mut text = serde_json::to_string_pretty(&report)?;
        text.push('\n');
        write_file(path, &text)?;
    }
    Ok(if report.is_clean() {
        Finished::Passed
    } else {
        Finished::Failed
    })
}

/// Prints to stdout. A reader that went away (`iri-conformance ... | head`) is not an error:
/// the outcome, the exit code and the report files must not depend on who reads stdout.
fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

/// Left-aligned columns separated by two spaces, the last one unpadded.
fn align<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let header = header.map(String::from);
    let mut widths = [0usize; N];
    for row in std::iter::once(&header).chain(rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            line.push_str(cell);
            line.push_str(&" ".repeat(width - cell.chars().count() + 2));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
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
            ExitCode::from(USAGE)
        } else {
            ExitCode::SUCCESS
        };
    }
    eprintln!("error: {} (see --help)", usage_line(&error.render().to_string()));
    ExitCode::from(USAGE)
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

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_accept_lists_repeats_and_all() {
        let cli = Cli::try_parse_from([
            "iri-conformance",
            "volume",
            "--profile",
            "core,snapshots",
            "--profile",
            "expand",
        ])
        .unwrap();
        let Command::Volume(args) = cli.command else {
            panic!()
        };
        assert_eq!(
            args.profiles(),
            BTreeSet::from([Profile::Core, Profile::Snapshots, Profile::Expand])
        );
        let cli = Cli::try_parse_from(["iri-conformance", "machine", "--profile", "all"]).unwrap();
        let Command::Machine(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.profiles().len(), Profile::ALL.len());
        let cli = Cli::try_parse_from(["iri-conformance", "bucket"]).unwrap();
        let Command::Bucket(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.profiles(), BTreeSet::from([Profile::Core]));
        assert_eq!(args.parallel, 4);
    }

    #[test]
    fn usage_errors_fold_into_one_line() {
        let error = Cli::try_parse_from(["iri-conformance", "machine", "--profile", "fast"]).unwrap_err();
        let line = usage_line(&error.render().to_string());
        assert!(line.contains("unknown profile \"fast\""), "{line}");
        assert!(!line.contains('\n'));
        let error = Cli::try_parse_from(["iri-conformance", "machine", "--focus", "("]).unwrap_err();
        assert!(usage_line(&error.render().to_string()).contains("invalid regex"));
        let error =
            Cli::try_parse_from(["iri-conformance", "bench", "machine", "--concurrency", "1,0"]).unwrap_err();
        assert!(usage_line(&error.render().to_string()).contains("--concurrency"));
    }

    #[test]
    fn bench_concurrency_takes_a_list() {
        let cli =
            Cli::try_parse_from(["iri-conformance", "bench", "volume", "--concurrency", "1,4,16"]).unwrap();
        let Command::Bench(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.concurrency, [1, 4, 16]);
        assert_eq!(args.iterations, 100);
    }
}
