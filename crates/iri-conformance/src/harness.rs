// SPDX-License-Identifier: Apache-2.0
//! The harness: test cases, their context (clients, RPC recording, object tracking), the runner
//! (parallel unless serial, guaranteed cleanup), and the report.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Debug},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use iri_api::{
    Endpoint, RuntimeKind,
    bucket::v1alpha1::{
        BucketFilter, DeleteBucketRequest, ListBucketsRequest, bucket_runtime_client::BucketRuntimeClient,
    },
    endpoint::clients,
    machine::v1alpha1::{
        DeleteMachineRequest, ListMachinesRequest, MachineFilter,
        machine_runtime_client::MachineRuntimeClient,
    },
    volume::v1alpha1::{
        DeleteVolumeRequest, DeleteVolumeSnapshotRequest, ListVolumeSnapshotsRequest, ListVolumesRequest,
        VolumeFilter, VolumeSnapshotFilter, volume_runtime_client::VolumeRuntimeClient,
    },
};
use serde::Serialize;
use tonic::{Code, Status, transport::Channel};

use crate::Config;

/// A capability profile. `core` is what every runtime must do; the others are capabilities a
/// runtime may or may not claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// What every runtime must do.
    Core,
    /// Volume snapshots and volumes restored from them.
    Snapshots,
    /// Encrypted volumes.
    Encryption,
    /// Growing volumes.
    Expand,
    /// Attaching and detaching volumes and NICs on existing machines.
    Hotplug,
    /// Exec/console sessions.
    Exec,
    /// Durability across a runtime restart (needs the restart hook).
    Restart,
    /// Data reaches the backend: S3 objects, volume blocks, guest consoles.
    DataPlane,
    /// Listing many objects.
    Scale,
}

impl Profile {
    /// Every profile, in report order.
    pub const ALL: [Profile; 9] = [
        Profile::Core,
        Profile::Snapshots,
        Profile::Encryption,
        Profile::Expand,
        Profile::Hotplug,
        Profile::Exec,
        Profile::Restart,
        Profile::DataPlane,
        Profile::Scale,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Core => "core",
            Profile::Snapshots => "snapshots",
            Profile::Encryption => "encryption",
            Profile::Expand => "expand",
            Profile::Hotplug => "hotplug",
            Profile::Exec => "exec",
            Profile::Restart => "restart",
            Profile::DataPlane => "data-plane",
            Profile::Scale => "scale",
        }
    }
}

impl std::str::FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| {
            let names: Vec<_> = Profile::ALL.iter().map(|p| p.name()).collect();
            format!("unknown profile {s:?} (known: {}, all)", names.join(", "))
        })
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a test is about (for reports and `--focus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// Version and identity.
    Identity,
    /// Status, classes and capacity accounting.
    Capacity,
    /// Argument validation and error codes.
    Validation,
    /// Create, list, converge, delete.
    Lifecycle,
    /// Repeated and unknown deletes and detaches.
    Idempotence,
    /// Labels and annotations round-trip.
    Metadata,
    /// Generation and observed generation.
    Generation,
    /// Attach, detach and update of volumes and NICs.
    Attachments,
    /// ListEvents.
    Events,
    /// Exec sessions.
    Exec,
    /// Parallel creates and deletes.
    Concurrency,
    /// Restart durability.
    Restart,
    /// Listing at scale.
    Scale,
    /// Data plane.
    DataPlane,
}

impl Category {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Category::Identity => "identity",
            Category::Capacity => "capacity",
            Category::Validation => "validation",
            Category::Lifecycle => "lifecycle",
            Category::Idempotence => "idempotence",
            Category::Metadata => "metadata",
            Category::Generation => "generation",
            Category::Attachments => "attachments",
            Category::Events => "events",
            Category::Exec => "exec",
            Category::Concurrency => "concurrency",
            Category::Restart => "restart",
            Category::Scale => "scale",
            Category::DataPlane => "data-plane",
        }
    }
}

/// Why a test failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestError {
    /// What went wrong, in a sentence.
    pub reason: String,
    /// Set when the test decided it cannot run here (a missing capability or hook).
    pub skip: bool,
}

impl TestError {
    /// A failure with `reason`.
    pub fn fail(reason: impl Into<String>) -> Self {
        TestError {
            reason: reason.into(),
            skip: false,
        }
    }

    /// A skip with `reason` (the runtime or the config lacks what the test needs).
    pub fn skip(reason: impl Into<String>) -> Self {
        TestError {
            reason: reason.into(),
            skip: true,
        }
    }
}

impl From<Status> for TestError {
    fn from(status: Status) -> Self {
        TestError::fail(format!("unexpected {:?}: {}", status.code(), status.message()))
    }
}

/// What a test body returns.
pub type TestResult = Result<(), TestError>;

/// A test body.
pub type TestFn = for<'a> fn(&'a mut Ctx) -> BoxFuture<'a, TestResult>;

/// One test of the suite.
#[derive(Clone)]
pub struct TestCase {
    /// Unique name, `snake_case`, used by `--focus`/`--skip` together with kind and category.
    pub name: &'static str,
    /// The runtime the test is for.
    pub kind: RuntimeKind,
    /// What it is about.
    pub category: Category,
    /// The profile it belongs to.
    pub profile: Profile,
    /// Must run alone (it measures global state such as capacity, or restarts the runtime).
    pub serial: bool,
    /// One line: what the test checks.
    pub summary: &'static str,
    /// The body.
    pub run: TestFn,
}

impl TestCase {
    /// The full name `<kind>/<category>/<name>` that `--focus` and `--skip` match against.
    pub fn full_name(&self) -> String {
        format!("{}/{}/{}", self.kind, self.category.name(), self.name)
    }
}

impl Debug for TestCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full_name())
    }
}

/// Declares a [`TestCase`] from an `async fn(&mut Ctx) -> TestResult`.
#[macro_export]
macro_rules! test_case {
    ($kind:ident, $category:ident, $profile:ident, $serial:expr, $f:ident, $summary:expr) => {
        $crate::harness::TestCase {
            name: stringify!($f),
            kind: ::iri_api::RuntimeKind::$kind,
            category: $crate::harness::Category::$category,
            profile: $crate::harness::Profile::$profile,
            serial: $serial,
            summary: $summary,
            run: {
                fn run(
                    ctx: &mut $crate::harness::Ctx,
                ) -> ::futures::future::BoxFuture<'_, $crate::harness::TestResult> {
                    Box::pin($f(ctx))
                }
                run
            },
        }
    };
}

/// Calls an RPC through a fresh client of `ctx`, records the exchange for the report, and
/// returns the response message: `call!(ctx, machine.create_machine(request))`.
#[macro_export]
macro_rules! call {
    ($ctx:expr, $client:ident . $method:ident ( $request:expr )) => {{
        let request = $request;
        let mut client = $ctx.$client();
        let result = client
            .$method($ctx.request(::std::clone::Clone::clone(&request)))
            .await
            .map(::tonic::Response::into_inner);
        $ctx.record(stringify!($method), &request, &result);
        result
    }};
}

/// Fails the test with a formatted reason unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($reason:tt)+) => {
        if !$cond {
            return Err($crate::harness::TestError::fail(format!($($reason)+)));
        }
    };
}

/// Fails the test unless `result` is an error with `code`; returns the status.
pub fn expect_code<T: Debug>(result: Result<T, Status>, code: Code, what: &str) -> Result<Status, TestError> {
    match result {
        Err(status) if status.code() == code => Ok(status),
        Err(status) => Err(TestError::fail(format!(
            "{what}: expected {code:?}, got {:?}: {}",
            status.code(),
            status.message()
        ))),
        Ok(response) => Err(TestError::fail(format!(
            "{what}: expected {code:?}, got OK: {}",
            truncate(&format!("{response:?}"), 300)
        ))),
    }
}

/// One recorded RPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exchange {
    /// The client method, e.g. `create_machine`.
    pub method: String,
    /// The request, debug-printed (truncated).
    pub request: String,
    /// `OK <response>` or `<Code>: <message>` (truncated).
    pub response: String,
}

/// An object a test created, deleted after the test whatever its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracked {
    /// A machine id.
    Machine(String),
    /// A volume id.
    Volume(String),
    /// A volume snapshot id.
    VolumeSnapshot(String),
    /// A bucket id.
    Bucket(String),
}

/// What a test gets: the runtime's clients, the config, labels that isolate its objects, RPC
/// recording and object tracking.
pub struct Ctx {
    /// The suite configuration.
    pub config: Arc<Config>,
    /// The clients; also what [`Ctx::eventually`] probes get.
    probe: Probe,
    labels: BTreeMap<String, String>,
    exchanges: Vec<Exchange>,
    tracked: Vec<Tracked>,
}

/// Label put on every object the suite creates: the run id, so objects of one run can be found
/// (and cleaned up by an operator) and never confused with anything else on the runtime.
pub const RUN_LABEL: &str = "conformance.iri.ironcore.dev/run";
/// Label with the name of the test that created the object.
pub const TEST_LABEL: &str = "conformance.iri.ironcore.dev/test";

/// How many recorded exchanges a failure report carries (the failing one is the last).
const EXCHANGES_IN_REPORT: usize = 3;

impl Ctx {
    /// A context for one test on `channel`.
    pub fn new(config: Arc<Config>, channel: Channel, run_id: &str, test: &str) -> Ctx {
        let labels = BTreeMap::from([
            (RUN_LABEL.to_string(), run_id.to_string()),
            (TEST_LABEL.to_string(), test.to_string()),
        ]);
        let probe = Probe {
            channel,
            config: config.clone(),
        };
        Ctx {
            config,
            probe,
            labels,
            exchanges: Vec::new(),
            tracked: Vec::new(),
        }
    }

    /// A MachineRuntime client.
    pub fn machine(&self) -> MachineRuntimeClient<Channel> {
        self.probe.machine()
    }

    /// A VolumeRuntime client.
    pub fn volume(&self) -> VolumeRuntimeClient<Channel> {
        self.probe.volume()
    }

    /// A BucketRuntime client.
    pub fn bucket(&self) -> BucketRuntimeClient<Channel> {
        self.probe.bucket()
    }

    /// The channel, for tests that drive many calls concurrently.
    pub fn channel(&self) -> Channel {
        self.probe.channel.clone()
    }

    /// Wraps `message` in a request with the configured deadline.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        self.probe.request(message)
    }

    /// Labels that isolate this test's objects: the run id and the test name, plus `extra`.
    pub fn labels(&self, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        labels
    }

    /// A selector matching exactly this test's objects.
    pub fn selector(&self) -> BTreeMap<String, String> {
        self.labels.clone()
    }

    /// Records an RPC for the failure report.
    pub fn record<Q: Debug, R: Debug>(&mut self, method: &str, request: &Q, result: &Result<R, Status>) {
        let response = match result {
            Ok(response) => format!("OK {}", truncate(&format!("{response:?}"), 1500)),
            Err(status) => format!("{:?}: {}", status.code(), status.message()),
        };
        self.exchanges.push(Exchange {
            method: method.to_string(),
            request: truncate(&format!("{request:?}"), 1500),
            response,
        });
        // Keep memory bounded for tests that make thousands of calls.
        if self.exchanges.len() > 64 {
            self.exchanges.drain(..32);
        }
    }

    /// Registers an object for deletion after the test.
    pub fn track(&mut self, object: Tracked) {
        if !self.tracked.contains(&object) {
            self.tracked.push(object);
        }
    }

    /// Forgets an object the test deleted itself and saw disappear.
    pub fn untrack(&mut self, object: &Tracked) {
        self.tracked.retain(|t| t != object);
    }

    /// Deletes every tracked object (newest first) and waits until List no longer returns it.
    /// Returns the objects that did not go away: leaks.
    pub async fn cleanup(&mut self) -> Vec<String> {
        let mut leaks = Vec::new();
        let deadline = Instant::now() + self.config.timeouts.delete();
        let tracked: Vec<Tracked> = self.tracked.drain(..).rev().collect();
        for object in &tracked {
            let _ = self.delete(object).await;
        }
        for object in tracked {
            loop {
                match self.exists(&object).await {
                    Ok(false) => break,
                    Ok(true) | Err(_) if Instant::now() >= deadline => {
                        leaks.push(format!(
                            "{object:?} still listed {:?} after delete",
                            self.config.timeouts.delete()
                        ));
                        break;
                    }
                    _ => {
                        // Deletion may be asynchronous; ask again (idempotent) while waiting.
                        let _ = self.delete(&object).await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        leaks
    }

    async fn delete(&self, object: &Tracked) -> Result<(), Status> {
        let result = match object {
            Tracked::Machine(id) => self
                .machine()
                .delete_machine(self.request(DeleteMachineRequest {
                    machine_id: id.clone(),
                }))
                .await
                .map(drop),
            Tracked::Volume(id) => self
                .volume()
                .delete_volume(self.request(DeleteVolumeRequest {
                    volume_id: id.clone(),
                }))
                .await
                .map(drop),
            Tracked::VolumeSnapshot(id) => self
                .volume()
                .delete_volume_snapshot(self.request(DeleteVolumeSnapshotRequest {
                    volume_snapshot_id: id.clone(),
                }))
                .await
                .map(drop),
            Tracked::Bucket(id) => self
                .bucket()
                .delete_bucket(self.request(DeleteBucketRequest {
                    bucket_id: id.clone(),
                }))
                .await
                .map(drop),
        };
        match result {
            Err(status) if status.code() == Code::NotFound => Ok(()),
            other => other,
        }
    }

    async fn exists(&self, object: &Tracked) -> Result<bool, Status> {
        Ok(match object {
            Tracked::Machine(id) => !self
                .machine()
                .list_machines(self.request(ListMachinesRequest {
                    filter: Some(MachineFilter {
                        id: id.clone(),
                        ..Default::default()
                    }),
                }))
                .await?
                .into_inner()
                .machines
                .is_empty(),
            Tracked::Volume(id) => !self
                .volume()
                .list_volumes(self.request(ListVolumesRequest {
                    filter: Some(VolumeFilter {
                        id: id.clone(),
                        ..Default::default()
                    }),
                }))
                .await?
                .into_inner()
                .volumes
                .is_empty(),
            Tracked::VolumeSnapshot(id) => !self
                .volume()
                .list_volume_snapshots(self.request(ListVolumeSnapshotsRequest {
                    filter: Some(VolumeSnapshotFilter {
                        id: id.clone(),
                        ..Default::default()
                    }),
                }))
                .await?
                .into_inner()
                .volume_snapshots
                .is_empty(),
            Tracked::Bucket(id) => !self
                .bucket()
                .list_buckets(self.request(ListBucketsRequest {
                    filter: Some(BucketFilter {
                        id: id.clone(),
                        ..Default::default()
                    }),
                }))
                .await?
                .into_inner()
                .buckets
                .is_empty(),
        })
    }

    /// Polls `probe` every `interval` until it returns `Some`, or fails after `timeout` with
    /// `what` and the last value seen.
    pub async fn eventually<T, P, F>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: P,
    ) -> Result<T, TestError>
    where
        P: FnMut(Probe) -> F,
        F: std::future::Future<Output = Result<(Option<T>, String), TestError>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let (value, seen) = probe(self.probe.clone()).await?;
            if let Some(value) = value {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                return Err(TestError::fail(format!(
                    "{what}: not reached within {timeout:?}; last seen: {seen}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What an [`Ctx::eventually`] probe gets: clients without the recorder (a probe may run
/// hundreds of times; its last observation goes into the failure reason instead).
#[derive(Clone)]
pub struct Probe {
    channel: Channel,
    config: Arc<Config>,
}

impl Probe {
    /// A MachineRuntime client.
    pub fn machine(&self) -> MachineRuntimeClient<Channel> {
        clients::machine(self.channel.clone())
    }
    /// A VolumeRuntime client.
    pub fn volume(&self) -> VolumeRuntimeClient<Channel> {
        clients::volume(self.channel.clone())
    }
    /// A BucketRuntime client.
    pub fn bucket(&self) -> BucketRuntimeClient<Channel> {
        clients::bucket(self.channel.clone())
    }
    /// Wraps `message` in a request with the configured deadline.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.config.timeouts.rpc());
        request
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}... ({} bytes)", &text[..cut], text.len()),
        None => text.to_string(),
    }
}

/// Why a test failed, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// What went wrong.
    pub reason: String,
    /// The last RPCs before the failure; the failing one is last.
    pub exchange: Vec<Exchange>,
}

/// A test's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Outcome {
    /// Passed.
    Passed,
    /// Failed, with the reason and the exchange.
    Failed(Failure),
    /// Not run, with the reason.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// One test's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct TestReport {
    /// `<kind>/<category>/<name>`.
    pub name: String,
    /// Category name.
    pub category: Category,
    /// Profile.
    pub profile: Profile,
    /// One-line description.
    pub summary: String,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// How long it took (0 when skipped).
    #[serde(serialize_with = "seconds")]
    pub duration: Duration,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The result of a suite run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The runtime kind tested.
    pub kind: String,
    /// The endpoint tested.
    pub endpoint: String,
    /// `runtime_name runtime_version` as the runtime reported it.
    pub runtime: String,
    /// Profiles selected.
    pub profiles: Vec<Profile>,
    /// Every test, in suite order.
    pub tests: Vec<TestReport>,
    /// Wall time of the run.
    #[serde(serialize_with = "seconds")]
    pub duration: Duration,
}

impl Report {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.tests.iter().filter(|t| f(&t.outcome)).count()
    }

    /// Tests that passed.
    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Passed))
    }

    /// Tests that failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }

    /// Tests skipped.
    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skipped { .. }))
    }

    /// `N passed, N failed, N skipped`.
    pub fn summary_line(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed(),
            self.failed(),
            self.skipped()
        )
    }

    /// The profiles in which at least one test ran and none failed: "passes core + snapshots".
    pub fn passed_profiles(&self) -> Vec<Profile> {
        Profile::ALL
            .into_iter()
            .filter(|p| {
                let tests: Vec<_> = self.tests.iter().filter(|t| t.profile == *p).collect();
                tests.iter().any(|t| matches!(t.outcome, Outcome::Passed))
                    && !tests.iter().any(|t| matches!(t.outcome, Outcome::Failed(_)))
            })
            .collect()
    }

    /// `passes core + snapshots` or `fails core` and the like, in one line.
    pub fn verdict(&self) -> String {
        let failed: BTreeSet<Profile> = self
            .tests
            .iter()
            .filter(|t| matches!(t.outcome, Outcome::Failed(_)))
            .map(|t| t.profile)
            .collect();
        let passed: Vec<&str> = self.passed_profiles().iter().map(|p| p.name()).collect();
        let mut verdict = if passed.is_empty() {
            "passes nothing".to_string()
        } else {
            format!("passes {}", passed.join(" + "))
        };
        if !failed.is_empty() {
            let failed: Vec<&str> = failed.iter().map(|p| p.name()).collect();
            verdict.push_str(&format!("; fails {}", failed.join(" + ")));
        }
        verdict
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The runtime kind to test.
    pub kind: RuntimeKind,
    /// Profiles to run; tests of others are skipped with that reason.
    pub profiles: BTreeSet<Profile>,
    /// Only tests whose full name matches.
    pub focus: Option<regex::Regex>,
    /// No tests whose full name matches.
    pub skip: Option<regex::Regex>,
    /// How many non-serial tests run at once.
    pub parallel: usize,
    /// The suite configuration.
    pub config: Config,
}

impl RunOptions {
    /// Defaults for `kind`: the core profile, 4 tests at once, default config.
    pub fn new(kind: RuntimeKind) -> Self {
        RunOptions {
            kind,
            profiles: BTreeSet::from([Profile::Core]),
            focus: None,
            skip: None,
            parallel: 4,
            config: Config::default(),
        }
    }
}

/// Runs the suite against `endpoint`. Errors only when the runtime cannot be reached at all;
/// everything else is in the report.
pub async fn run(endpoint: &Endpoint, options: RunOptions) -> anyhow::Result<Report> {
    let started = Instant::now();
    let channel = endpoint
        .connect(options.config.timeouts.rpc())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtime = runtime_version(options.kind, channel.clone(), options.config.timeouts.rpc()).await;
    let config = Arc::new(options.config.clone());
    let run_id = run_id();

    let cases: Vec<TestCase> = crate::suite::all()
        .into_iter()
        .filter(|c| c.kind == options.kind)
        .collect();
    let mut results: Vec<Option<TestReport>> = vec![None; cases.len()];
    let mut parallel = Vec::new();
    let mut serial = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let full_name = case.full_name();
        let skip_reason = if !options.profiles.contains(&case.profile) {
            Some(format!("profile {} not selected", case.profile))
        } else if options.focus.as_ref().is_some_and(|re| !re.is_match(&full_name)) {
            Some("not matched by --focus".to_string())
        } else if options.skip.as_ref().is_some_and(|re| re.is_match(&full_name)) {
            Some("matched by --skip".to_string())
        } else {
            None
        };
        match skip_reason {
            Some(reason) => {
                results[index] = Some(report_for(case, Outcome::Skipped { reason }, Duration::ZERO))
            }
            None if case.serial => serial.push(index),
            None => parallel.push(index),
        }
    }

    let run_one = |index: usize| {
        let case = cases[index].clone();
        let ctx = Ctx::new(config.clone(), channel.clone(), &run_id, case.name);
        async move { (index, run_case(case, ctx).await) }
    };
    use futures::StreamExt;
    let mut stream =
        futures::stream::iter(parallel.into_iter().map(run_one)).buffer_unordered(options.parallel.max(1));
    while let Some((index, report)) = stream.next().await {
        results[index] = Some(report);
    }
    for index in serial {
        let (index, report) = run_one(index).await;
        results[index] = Some(report);
    }

    Ok(Report {
        kind: options.kind.to_string(),
        endpoint: endpoint.to_string(),
        runtime,
        profiles: options.profiles.into_iter().collect(),
        tests: results.into_iter().flatten().collect(),
        duration: started.elapsed(),
    })
}

async fn run_case(case: TestCase, mut ctx: Ctx) -> TestReport {
    let started = Instant::now();
    // A panicking test must not take the suite down; it fails like any other.
    let result = {
        use futures::FutureExt;
        let body = (case.run)(&mut ctx);
        match std::panic::AssertUnwindSafe(body).catch_unwind().await {
            Ok(result) => result,
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "non-string panic".into());
                Err(TestError::fail(format!("test panicked: {message}")))
            }
        }
    };
    let leaks = ctx.cleanup().await;
    let exchange = ctx
        .exchanges
        .iter()
        .rev()
        .take(EXCHANGES_IN_REPORT)
        .rev()
        .cloned()
        .collect::<Vec<_>>();
    let outcome = match result {
        Ok(()) if leaks.is_empty() => Outcome::Passed,
        Ok(()) => Outcome::Failed(Failure {
            reason: format!("cleanup: {}", leaks.join("; ")),
            exchange,
        }),
        Err(e) if e.skip => Outcome::Skipped { reason: e.reason },
        Err(e) => Outcome::Failed(Failure {
            reason: e.reason,
            exchange,
        }),
    };
    report_for(&case, outcome, started.elapsed())
}

fn report_for(case: &TestCase, outcome: Outcome, duration: Duration) -> TestReport {
    TestReport {
        name: case.full_name(),
        category: case.category,
        profile: case.profile,
        summary: case.summary.to_string(),
        outcome,
        duration,
    }
}

async fn runtime_version(kind: RuntimeKind, channel: Channel, timeout: Duration) -> String {
    let answer = match kind {
        RuntimeKind::Machine => {
            let mut request = tonic::Request::new(iri_api::machine::v1alpha1::VersionRequest::default());
            request.set_timeout(timeout);
            clients::machine(channel)
                .version(request)
                .await
                .map(|r| r.into_inner())
                .map(|v| (v.runtime_name, v.runtime_version))
        }
        RuntimeKind::Volume => {
            let mut request = tonic::Request::new(iri_api::volume::v1alpha1::VersionRequest::default());
            request.set_timeout(timeout);
            clients::volume(channel)
                .version(request)
                .await
                .map(|r| r.into_inner())
                .map(|v| (v.runtime_name, v.runtime_version))
        }
        RuntimeKind::Bucket => {
            let mut request = tonic::Request::new(iri_api::bucket::v1alpha1::VersionRequest::default());
            request.set_timeout(timeout);
            clients::bucket(channel)
                .version(request)
                .await
                .map(|r| r.into_inner())
                .map(|v| (v.runtime_name, v.runtime_version))
        }
    };
    match answer {
        Ok((name, version)) => format!("{name} {version}"),
        Err(status) => format!(
            "unknown (Version failed: {:?}: {})",
            status.code(),
            status.message()
        ),
    }
}

/// A short random id for this run's labels.
fn run_id() -> String {
    let nanos = iri_runtime::id::now_nanos();
    format!("{:x}-{}", nanos, &iri_runtime::id::new_id()[..8])
}
