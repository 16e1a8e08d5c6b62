// SPDX-License-Identifier: Apache-2.0
//! The `iri-conformance` binary end to end: it runs as a separate process against the in-memory
//! reference runtimes (and a deliberately broken one) on real unix sockets.
//!
//! The test catalogs grow independently of these tests, so nothing here counts tests: the
//! assertions are about structure and about the outputs agreeing with each other (stdout lines,
//! summary line, JUnit and JSON reports, exit code).

use std::{
    path::{Path, PathBuf},
    process::Output,
    sync::Arc,
};

use iri_api::machine::v1alpha1::{self as machine, machine_runtime_server::MachineRuntime};
use iri_runtime::{
    metrics::Metrics,
    server::{ListenAddress, RuntimeServer, ServeOptions},
};
use quick_xml::events::{BytesStart, Event};
use tonic::{Request, Response, Status};

/// The binary under test, with none of the endpoint variables of the environment leaking in.
fn binary() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_iri-conformance"));
    for kind in ["MACHINE", "VOLUME", "BUCKET"] {
        command.env_remove(format!("IRI_{kind}_RUNTIME_ENDPOINT"));
    }
    command.kill_on_drop(true);
    command
}

async fn run(args: &[&str]) -> Output {
    binary().args(args).output().await.expect("the binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

/// A config with short timeouts: the reference runtimes answer at once, a broken runtime
/// should fail fast.
fn quick_config(dir: &Path) -> PathBuf {
    let path = dir.join("conformance.toml");
    std::fs::write(
        &path,
        "[timeouts]\nrpc_seconds = 10\nready_seconds = 5\ndelete_seconds = 3\n\n[scale]\nobjects = 20\n",
    )
    .unwrap();
    path
}

/// Counts parsed from a summary line `N passed, N failed, N skipped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    passed: usize,
    failed: usize,
    skipped: usize,
}

impl Counts {
    fn total(self) -> usize {
        self.passed + self.failed + self.skipped
    }
}

fn parse_summary(line: &str) -> Counts {
    let numbers: Vec<usize> = line
        .split(", ")
        .zip(["passed", "failed", "skipped"])
        .map(|(part, word)| {
            let (n, w) = part
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad summary {line:?}"));
            assert_eq!(w, word, "bad summary {line:?}");
            n.parse().unwrap_or_else(|_| panic!("bad summary {line:?}"))
        })
        .collect();
    assert_eq!(numbers.len(), 3, "bad summary {line:?}");
    Counts {
        passed: numbers[0],
        failed: numbers[1],
        skipped: numbers[2],
    }
}

/// Checks the text report and returns the counts of its summary line, which must be the last
/// line and agree with the PASS/FAIL/SKIP lines.
fn check_text(text: &str, kind: &str) -> Counts {
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "report too short:\n{text}");
    let counts = parse_summary(lines[lines.len() - 1]);
    assert!(
        lines[lines.len() - 2].starts_with("Verdict: passes "),
        "no verdict line:\n{text}"
    );
    let count = |status: &str| {
        lines
            .iter()
            .filter(|l| l.starts_with(&format!("{status} {kind}/")))
            .count()
    };
    assert_eq!(
        (count("PASS"), count("FAIL"), count("SKIP")),
        (counts.passed, counts.failed, counts.skipped),
        "{text}"
    );
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("FAIL ") {
            assert!(line.ends_with("s)"), "no duration: {line}");
            assert!(
                lines.get(i + 1).is_some_and(|l| l.starts_with("    reason: ")),
                "a failure without its reason:\n{text}"
            );
        }
    }
    counts
}

/// What the JUnit file says, read with a real XML parser.
#[derive(Debug, Default)]
struct Junit {
    suites_tests: usize,
    suite_name: String,
    suite_tests: usize,
    suite_failures: usize,
    suite_skipped: usize,
    has_timestamp: bool,
    /// (classname, name, outcome: "passed" | "failed" | "skipped", message)
    cases: Vec<(String, String, &'static str, String)>,
}

fn attribute(element: &BytesStart<'_>, name: &str) -> Option<String> {
    element
        .try_get_attribute(name)
        .expect("well-formed attribute")
        .map(|a| a.unescape_value().expect("valid escapes").into_owned())
}

fn number(element: &BytesStart<'_>, name: &str) -> usize {
    attribute(element, name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .parse()
        .unwrap()
}

fn parse_junit(xml: &str) -> Junit {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut junit = Junit::default();
    let mut stack: Vec<String> = Vec::new();
    loop {
        let event = reader
            .read_event()
            .unwrap_or_else(|e| panic!("invalid XML: {e}\n{xml}"));
        let (element, empty) = match &event {
            Event::Start(e) => (Some(e.clone()), false),
            Event::Empty(e) => (Some(e.clone()), true),
            Event::End(_) => {
                stack.pop();
                (None, false)
            }
            Event::Eof => break,
            _ => (None, false),
        };
        let Some(element) = element else { continue };
        let tag = String::from_utf8(element.name().as_ref().to_vec()).unwrap();
        match tag.as_str() {
            "testsuites" => {
                assert!(stack.is_empty(), "testsuites is not the root");
                junit.suites_tests = number(&element, "tests");
            }
            "testsuite" => {
                assert_eq!(stack, ["testsuites"]);
                junit.suite_name = attribute(&element, "name").unwrap();
                junit.suite_tests = number(&element, "tests");
                junit.suite_failures = number(&element, "failures");
                junit.suite_skipped = number(&element, "skipped");
                junit.has_timestamp = attribute(&element, "timestamp").is_some();
                attribute(&element, "time").unwrap().parse::<f64>().unwrap();
            }
            "testcase" => {
                assert_eq!(stack, ["testsuites", "testsuite"]);
                attribute(&element, "time").unwrap().parse::<f64>().unwrap();
                junit.cases.push((
                    attribute(&element, "classname").unwrap(),
                    attribute(&element, "name").unwrap(),
                    "passed",
                    String::new(),
                ));
            }
            "failure" | "skipped" => {
                assert_eq!(stack, ["testsuites", "testsuite", "testcase"]);
                let case = junit.cases.last_mut().unwrap();
                assert_eq!(case.2, "passed", "two outcomes in one testcase");
                case.2 = if tag == "failure" { "failed" } else { "skipped" };
                case.3 = attribute(&element, "message").unwrap_or_default();
            }
            "properties" | "property" => {}
            other => panic!("unexpected element <{other}>"),
        }
        if !empty {
            stack.push(tag);
        }
    }
    junit
}

/// Checks the JUnit and JSON reports of a run against each other and against `counts`.
fn check_reports(junit_path: &Path, json_path: &Path, kind: &str, counts: Counts) {
    let junit = parse_junit(&std::fs::read_to_string(junit_path).unwrap());
    assert_eq!(junit.suite_name, format!("iri-conformance.{kind}"));
    assert!(junit.has_timestamp);
    assert_eq!(junit.suites_tests, counts.total());
    assert_eq!(junit.suite_tests, counts.total());
    assert_eq!(junit.cases.len(), counts.total());
    assert_eq!(junit.suite_failures, counts.failed);
    assert_eq!(junit.suite_skipped, counts.skipped);
    let outcome = |o: &str| junit.cases.iter().filter(|c| c.2 == o).count();
    assert_eq!(
        (outcome("passed"), outcome("failed"), outcome("skipped")),
        (counts.passed, counts.failed, counts.skipped)
    );
    for (classname, _, outcome, message) in &junit.cases {
        assert!(classname.starts_with(&format!("{kind}.")), "{classname}");
        if *outcome != "passed" {
            assert!(!message.is_empty(), "a {outcome} testcase without a message");
        }
    }

    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json_path).unwrap()).unwrap();
    assert_eq!(json["kind"], kind);
    assert_eq!(json["passed"], counts.passed);
    assert_eq!(json["failed"], counts.failed);
    assert_eq!(json["skipped"], counts.skipped);
    assert_eq!(
        json["summary"],
        format!(
            "{} passed, {} failed, {} skipped",
            counts.passed, counts.failed, counts.skipped
        )
    );
    let tests = json["tests"].as_array().unwrap();
    assert_eq!(tests.len(), counts.total());
    // The same tests, in the same order, in both reports.
    for (test, (classname, name, outcome, _)) in tests.iter().zip(&junit.cases) {
        let category = classname.strip_prefix(&format!("{kind}.")).unwrap();
        assert_eq!(test["name"], format!("{kind}/{category}/{name}"));
        assert_eq!(test["category"], category);
        assert_eq!(test["outcome"], *outcome);
        if *outcome == "failed" {
            assert!(
                test["reason"].is_string() && test["exchange"].is_array(),
                "{test}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_prints_every_test_without_connecting() {
    for kind in ["machine", "volume", "bucket"] {
        let output = run(&[kind, "--list", "--address", "unix:///nonexistent/iri.sock"]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        let text = stdout(&output);
        let lines: Vec<&str> = text.lines().collect();
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(header, ["TEST", "PROFILE", "CATEGORY", "SELECTED", "SUMMARY"]);
        let rows = &lines[1..lines.len() - 1];
        let expected = iri_conformance::suite::all()
            .into_iter()
            .filter(|c| c.kind.name() == kind)
            .count();
        assert_eq!(rows.len(), expected, "{text}");
        for row in rows {
            let cells: Vec<&str> = row.split_whitespace().collect();
            assert!(cells[0].starts_with(&format!("{kind}/{}/", cells[2])), "{row}");
            cells[1].parse::<iri_conformance::Profile>().unwrap();
            assert!(["yes", "no"].contains(&cells[3]), "{row}");
            assert!(cells.len() > 4, "no summary: {row}");
        }
        assert_eq!(
            lines[lines.len() - 1].split(' ').next(),
            Some(expected.to_string().as_str())
        );

        // --profile all selects everything; a focus nobody matches selects nothing.
        let all = stdout(&run(&[kind, "--list", "--profile", "all"]).await);
        assert!(
            all.ends_with(&format!("{expected} tests, {expected} selected\n")),
            "{all}"
        );
        let none = stdout(&run(&[kind, "--list", "--profile", "all", "--focus", "^nothing$"]).await);
        assert!(
            none.ends_with(&format!("{expected} tests, 0 selected\n")),
            "{none}"
        );
    }
}

/// The profiles each reference runtime implements.
const REFERENCE_PROFILES: [(&str, &str); 3] = [
    ("machine", "core,hotplug"),
    ("volume", "core,expand,snapshots,encryption"),
    ("bucket", "core"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_write_junit_and_json_that_agree_with_the_summary_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = quick_config(dir.path());
    let machine_socket = dir.path().join("machine.sock");
    let volume_socket = dir.path().join("volume.sock");
    let bucket_socket = dir.path().join("bucket.sock");
    let _machine = iri_testing::serve_machine_unix(iri_testing::MachineRuntime::default(), &machine_socket)
        .await
        .unwrap();
    let _volume = iri_testing::serve_volume_unix(iri_testing::VolumeRuntime::default(), &volume_socket)
        .await
        .unwrap();
    let _bucket = iri_testing::serve_bucket_unix(iri_testing::BucketRuntime::default(), &bucket_socket)
        .await
        .unwrap();

    for (kind, profiles) in REFERENCE_PROFILES {
        let socket = dir.path().join(format!("{kind}.sock"));
        let address = format!("unix://{}", socket.display());
        let junit = dir.path().join(format!("{kind}.xml"));
        let json = dir.path().join(format!("{kind}.json"));
        let output = run(&[
            kind,
            "--address",
            &address,
            "--config",
            config.to_str().unwrap(),
            "--profile",
            profiles,
            "--junit",
            junit.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--parallel",
            "8",
        ])
        .await;
        let text = stdout(&output);
        let counts = check_text(&text, kind);
        // Exit 0 exactly when nothing failed.
        assert_eq!(
            output.status.code(),
            Some(if counts.failed == 0 { 0 } else { 1 }),
            "{text}"
        );
        check_reports(&junit, &json, kind, counts);
        let first = text.lines().next().unwrap();
        assert!(
            first.starts_with(&format!("iri-conformance {kind} at {address} (")),
            "{first}"
        );
    }

    // A run that selects nothing passes with everything skipped, and says why.
    let address = format!("unix://{}", bucket_socket.display());
    let output = run(&["bucket", "--address", &address, "--focus", "^nothing$"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    let counts = check_text(&text, "bucket");
    assert_eq!((counts.passed, counts.failed), (0, 0));
    let reasons = text
        .lines()
        .filter(|l| {
            *l == "    not matched by --focus"
                || (l.starts_with("    profile ") && l.ends_with(" not selected"))
        })
        .count();
    assert_eq!(reasons, counts.skipped, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_runtimes_and_bad_usage_exit_2_with_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("unix://{}", dir.path().join("missing.sock").display());
    let not_a_socket = dir.path().join("file");
    std::fs::write(&not_a_socket, "").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["machine".into(), "--address".into(), missing.clone()],
            "no such socket",
        ),
        (
            vec![
                "bench".into(),
                "bucket".into(),
                "--address".into(),
                missing.clone(),
            ],
            "no such socket",
        ),
        (
            vec![
                "volume".into(),
                "--address".into(),
                not_a_socket.display().to_string(),
            ],
            "not a unix socket",
        ),
        (
            vec!["volume".into(), "--address".into(), "dns:///x".into()],
            "invalid endpoint",
        ),
        (
            vec!["machine".into(), "--profile".into(), "core,fast".into()],
            "unknown profile \"fast\"",
        ),
        (
            vec!["machine".into(), "--focus".into(), "(".into()],
            "invalid regex",
        ),
        (
            vec!["bucket".into(), "--parallel".into(), "0".into()],
            "--parallel",
        ),
        (vec!["bench".into(), "tape".into()], "tape"),
        (
            vec![
                "machine".into(),
                "--config".into(),
                dir.path().join("nope.toml").display().to_string(),
            ],
            "nope.toml",
        ),
    ];
    for (args, needle) in cases {
        let output = binary().args(&args).output().await.unwrap();
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        assert!(stdout(&output).is_empty(), "{args:?}: {}", stdout(&output));
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(needle),
            "{args:?}: {err}"
        );
    }

    // A config with an unknown key is rejected with the key named.
    let config = dir.path().join("typo.toml");
    std::fs::write(&config, "[machine]\nclas = \"x\"\n").unwrap();
    let output = run(&[
        "machine",
        "--config",
        config.to_str().unwrap(),
        "--address",
        &missing,
    ])
    .await;
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.starts_with("error: ") && err.contains("clas") && err.lines().count() == 1,
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_and_version_exit_0() {
    for args in [
        &["--help"][..],
        &["--version"],
        &["machine", "--help"],
        &["bench", "--help"],
    ] {
        let output = run(args).await;
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        assert!(!stdout(&output).is_empty());
    }
}

/// A machine runtime that answers every call with INTERNAL.
#[derive(Clone)]
struct Broken;

fn broken<T>() -> Result<Response<T>, Status> {
    Err(Status::internal("injected failure <&>"))
}

#[tonic::async_trait]
impl MachineRuntime for Broken {
    async fn version(
        &self,
        _: Request<machine::VersionRequest>,
    ) -> Result<Response<machine::VersionResponse>, Status> {
        broken()
    }
    async fn list_events(
        &self,
        _: Request<machine::ListEventsRequest>,
    ) -> Result<Response<machine::ListEventsResponse>, Status> {
        broken()
    }
    async fn list_machines(
        &self,
        _: Request<machine::ListMachinesRequest>,
    ) -> Result<Response<machine::ListMachinesResponse>, Status> {
        broken()
    }
    async fn create_machine(
        &self,
        _: Request<machine::CreateMachineRequest>,
    ) -> Result<Response<machine::CreateMachineResponse>, Status> {
        broken()
    }
    async fn delete_machine(
        &self,
        _: Request<machine::DeleteMachineRequest>,
    ) -> Result<Response<machine::DeleteMachineResponse>, Status> {
        broken()
    }
    async fn update_machine_annotations(
        &self,
        _: Request<machine::UpdateMachineAnnotationsRequest>,
    ) -> Result<Response<machine::UpdateMachineAnnotationsResponse>, Status> {
        broken()
    }
    async fn update_machine_power(
        &self,
        _: Request<machine::UpdateMachinePowerRequest>,
    ) -> Result<Response<machine::UpdateMachinePowerResponse>, Status> {
        broken()
    }
    async fn attach_volume(
        &self,
        _: Request<machine::AttachVolumeRequest>,
    ) -> Result<Response<machine::AttachVolumeResponse>, Status> {
        broken()
    }
    async fn detach_volume(
        &self,
        _: Request<machine::DetachVolumeRequest>,
    ) -> Result<Response<machine::DetachVolumeResponse>, Status> {
        broken()
    }
    async fn update_volume(
        &self,
        _: Request<machine::UpdateVolumeRequest>,
    ) -> Result<Response<machine::UpdateVolumeResponse>, Status> {
        broken()
    }
    async fn attach_network_interface(
        &self,
        _: Request<machine::AttachNetworkInterfaceRequest>,
    ) -> Result<Response<machine::AttachNetworkInterfaceResponse>, Status> {
        broken()
    }
    async fn detach_network_interface(
        &self,
        _: Request<machine::DetachNetworkInterfaceRequest>,
    ) -> Result<Response<machine::DetachNetworkInterfaceResponse>, Status> {
        broken()
    }
    async fn status(
        &self,
        _: Request<machine::StatusRequest>,
    ) -> Result<Response<machine::StatusResponse>, Status> {
        broken()
    }
    async fn exec(
        &self,
        _: Request<machine::ExecRequest>,
    ) -> Result<Response<machine::ExecResponse>, Status> {
        broken()
    }
}

/// Serves [`Broken`] on `path` until the returned sender is dropped.
async fn serve_broken(path: &Path) -> tokio::sync::oneshot::Sender<()> {
    let service = machine::machine_runtime_server::MachineRuntimeServer::new(Broken);
    let bound = RuntimeServer::new(
        ServeOptions::new(ListenAddress::Unix(path.to_path_buf())),
        Arc::new(Metrics::new()),
    )
    .add_service(service)
    .bind()
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_runtime_exits_1_with_reasons_and_exchanges() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("broken.sock");
    let _stop = serve_broken(&socket).await;
    let config = quick_config(dir.path());
    let junit = dir.path().join("broken.xml");
    let json = dir.path().join("broken.json");
    let address = format!("unix://{}", socket.display());
    let output = run(&[
        "machine",
        "--address",
        &address,
        "--config",
        config.to_str().unwrap(),
        "--profile",
        "core",
        "--junit",
        junit.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}\n{}", stderr(&output));
    let counts = check_text(&text, "machine");
    assert!(counts.failed > 0, "{text}");
    assert_eq!(
        counts.passed, 0,
        "a runtime that fails every call passed a test:\n{text}"
    );
    assert!(text.contains("; fails core\n"), "{text}");
    // The failing exchange is shown: the method, the request and the runtime's answer.
    assert!(text.contains("        request:  "), "{text}");
    assert!(
        text.contains("        response: Internal: injected failure <&>"),
        "{text}"
    );
    check_reports(&junit, &json, "machine", counts);
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("Internal: injected failure &lt;&amp;&gt;"), "{xml}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_profile_exit_code_follows_its_outcome() {
    // The reference machine runtime hands out exec URLs that point nowhere, so exec tests that
    // open the stream fail against it; whatever the catalog decides, the exit code must agree
    // with the report.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("machine.sock");
    let _served = iri_testing::serve_machine_unix(iri_testing::MachineRuntime::default(), &socket)
        .await
        .unwrap();
    let config = quick_config(dir.path());
    let address = format!("unix://{}", socket.display());
    let output = run(&[
        "machine",
        "--address",
        &address,
        "--config",
        config.to_str().unwrap(),
        "--profile",
        "exec",
    ])
    .await;
    let text = stdout(&output);
    let counts = check_text(&text, "machine");
    assert_eq!(
        output.status.code(),
        Some(if counts.failed == 0 { 0 } else { 1 }),
        "{text}"
    );
    if counts.failed > 0 {
        assert!(text.contains("fails exec"), "{text}");
    }
    // The test that opens the stream cannot pass against a URL that points nowhere.
    if text.contains("machine/exec/exec_url_accepts_websocket ") {
        assert!(
            text.contains("FAIL machine/exec/exec_url_accepts_websocket "),
            "{text}"
        );
        assert_eq!(output.status.code(), Some(1));
    }
}
