// SPDX-License-Identifier: Apache-2.0
//! What the volume and bucket catalogs share: a [`Kind`] that drives either runtime through the
//! same object life cycle, the tests that are identical for both (label selectors, idempotent
//! deletes, events, concurrency, restart, scale), and small checks (maps, timestamps, error
//! messages, the restart hook).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    future::Future,
    time::{Duration, Instant},
};

use futures::StreamExt;
use iri_api::{
    bucket::v1alpha1 as bucket, event::v1alpha1::Event, meta::v1alpha1::ObjectMetadata,
    volume::v1alpha1 as volume,
};
use iri_runtime::id::{now_nanos, now_secs};
use tonic::{Code, Status};

use crate::{
    call, ensure,
    harness::{Ctx, Probe, TestError, TestResult, Tracked, expect_code},
};

/// Tolerated clock difference between the suite and the runtime (it may run on another host).
pub(crate) const CLOCK_SLACK_SECS: i64 = 600;

/// Label that numbers the objects of tests that create many.
pub(crate) const INDEX_LABEL: &str = "conformance.iri.ironcore.dev/index";

/// How many creates or deletes the many-object tests keep in flight at once.
const BATCH: usize = 16;

/// The runtime kinds whose objects share one life cycle: create, converge, list, delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `volume.v1alpha1.VolumeRuntime` volumes.
    Volume,
    /// `bucket.v1alpha1.BucketRuntime` buckets.
    Bucket,
}

/// Where an object is in its life, whatever its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// `*_PENDING`.
    Pending,
    /// `VOLUME_AVAILABLE` / `BUCKET_AVAILABLE`.
    Ready,
    /// `*_ERROR`.
    Error,
    /// A value outside the enum.
    Unknown(i32),
}

/// What the kind-independent tests look at in an object.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Seen {
    /// The object's metadata (default when the runtime sent none).
    pub metadata: ObjectMetadata,
    /// Its state.
    pub phase: Phase,
    /// The state's enum name, for messages.
    pub state: String,
    /// Debug form of spec and status: what must survive a runtime restart unchanged.
    pub durable: String,
}

impl Seen {
    /// The object's id.
    pub(crate) fn id(&self) -> &str {
        &self.metadata.id
    }

    /// `<id> (<STATE>)`, for messages.
    pub(crate) fn describe(&self) -> String {
        format!("{} ({})", self.metadata.id, self.state)
    }
}

/// What a kind creates objects from: the spec every create of a test uses.
#[derive(Debug, Clone)]
pub(crate) enum Template {
    /// A volume spec.
    Volume(volume::VolumeSpec),
    /// A bucket spec.
    Bucket(bucket::BucketSpec),
}

/// A create request of either kind (for recording exchanges made outside `call!`).
#[derive(Debug, Clone)]
pub(crate) enum CreateRequest {
    /// CreateVolume.
    Volume(volume::CreateVolumeRequest),
    /// CreateBucket.
    Bucket(bucket::CreateBucketRequest),
}

impl Template {
    /// The create request for an object with `labels` and `annotations`.
    pub(crate) fn request(
        &self,
        labels: BTreeMap<String, String>,
        annotations: BTreeMap<String, String>,
    ) -> CreateRequest {
        let metadata = Some(ObjectMetadata {
            labels,
            annotations,
            ..Default::default()
        });
        match self {
            Template::Volume(spec) => CreateRequest::Volume(volume::CreateVolumeRequest {
                volume: Some(volume::Volume {
                    metadata,
                    spec: Some(spec.clone()),
                    status: None,
                }),
            }),
            Template::Bucket(spec) => CreateRequest::Bucket(bucket::CreateBucketRequest {
                bucket: Some(bucket::Bucket {
                    metadata,
                    spec: Some(spec.clone()),
                    status: None,
                }),
            }),
        }
    }
}

/// The [`Seen`] view of a volume.
pub(crate) fn seen_volume(v: &volume::Volume) -> Seen {
    let state = v.status.as_ref().map(|s| s.state).unwrap_or_default();
    Seen {
        metadata: v.metadata.clone().unwrap_or_default(),
        phase: match volume::VolumeState::try_from(state) {
            Ok(volume::VolumeState::VolumePending) => Phase::Pending,
            Ok(volume::VolumeState::VolumeAvailable) => Phase::Ready,
            Ok(volume::VolumeState::VolumeError) => Phase::Error,
            Err(_) => Phase::Unknown(state),
        },
        state: volume::VolumeState::try_from(state)
            .map(|s| s.as_str_name().to_string())
            .unwrap_or_else(|_| format!("state {state}")),
        durable: format!("spec {:?}, status {:?}", v.spec, v.status),
    }
}

/// The [`Seen`] view of a bucket.
pub(crate) fn seen_bucket(b: &bucket::Bucket) -> Seen {
    let state = b.status.as_ref().map(|s| s.state).unwrap_or_default();
    Seen {
        metadata: b.metadata.clone().unwrap_or_default(),
        phase: match bucket::BucketState::try_from(state) {
            Ok(bucket::BucketState::BucketPending) => Phase::Pending,
            Ok(bucket::BucketState::BucketAvailable) => Phase::Ready,
            Ok(bucket::BucketState::BucketError) => Phase::Error,
            Err(_) => Phase::Unknown(state),
        },
        state: bucket::BucketState::try_from(state)
            .map(|s| s.as_str_name().to_string())
            .unwrap_or_else(|_| format!("state {state}")),
        durable: format!("spec {:?}, status {:?}", b.spec, b.status),
    }
}

impl Kind {
    /// `volume` or `bucket`, for messages.
    pub(crate) fn noun(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Bucket => "bucket",
        }
    }

    /// The tracker entry for object `id`.
    pub(crate) fn tracked(self, id: &str) -> Tracked {
        match self {
            Kind::Volume => Tracked::Volume(id.to_string()),
            Kind::Bucket => Tracked::Bucket(id.to_string()),
        }
    }

    /// The spec the generic tests create objects with: the configured (or first) class and,
    /// for volumes, the configured size, or at most 1 MiB when `small` (many objects).
    pub(crate) async fn template(self, ctx: &mut Ctx, small: bool) -> Result<Template, TestError> {
        Ok(match self {
            Kind::Volume => {
                let class = crate::suite::volume::fixtures::class(ctx).await?;
                let size = if small {
                    ctx.config
                        .volume
                        .size_bytes
                        .min(crate::suite::volume::fixtures::MIB)
                } else {
                    ctx.config.volume.size_bytes
                };
                Template::Volume(crate::suite::volume::fixtures::spec(
                    crate::suite::volume::fixtures::class_name(&class),
                    size,
                ))
            }
            Kind::Bucket => Template::Bucket(bucket::BucketSpec {
                class: crate::suite::bucket::class(ctx).await?,
            }),
        })
    }

    /// Fails unless the runtime reports room for `count` objects of `template` (volumes: the
    /// class quantity in bytes; buckets have no capacity). A skip, not a failure: a full
    /// runtime is a deployment matter, not a contract violation.
    pub(crate) async fn ensure_room(self, ctx: &mut Ctx, template: &Template, count: usize) -> TestResult {
        if let Template::Volume(spec) = template {
            let class = crate::suite::volume::fixtures::class(ctx).await?;
            let size = spec.resources.as_ref().map(|r| r.storage_bytes).unwrap_or(0);
            let needed = size.saturating_mul(i64::try_from(count).unwrap_or(i64::MAX));
            if class.quantity < needed {
                return Err(TestError::skip(format!(
                    "class {:?} reports {} bytes, {count} volumes of {size} bytes need {needed}",
                    spec.class, class.quantity
                )));
            }
        }
        Ok(())
    }

    /// Creates an object from `template` and tracks it; fails on an error or a response
    /// without an object id.
    pub(crate) async fn create(
        self,
        ctx: &mut Ctx,
        template: &Template,
        labels: BTreeMap<String, String>,
        annotations: BTreeMap<String, String>,
    ) -> Result<Seen, TestError> {
        let (request, result) = self
            .create_detached(ctx, template.request(labels, annotations))
            .await;
        record_create(ctx, &request, &result);
        let seen = result?;
        ensure!(
            !seen.id().is_empty(),
            "Create{} returned an object without metadata.id",
            title(self)
        );
        ctx.track(self.tracked(seen.id()));
        Ok(seen)
    }

    /// A create that does not borrow `ctx`, so many can run at once. The caller records the
    /// exchange ([`record_create`]) and tracks the object.
    pub(crate) fn create_detached(
        self,
        ctx: &Ctx,
        request: CreateRequest,
    ) -> impl Future<Output = (CreateRequest, Result<Seen, Status>)> + Send + 'static {
        let mut volumes = ctx.volume();
        let mut buckets = ctx.bucket();
        let timeout = ctx.config.timeouts.rpc();
        async move {
            let result =
                match &request {
                    CreateRequest::Volume(r) => volumes
                        .create_volume(with_timeout(r.clone(), timeout))
                        .await
                        .and_then(|r| {
                            r.into_inner().volume.map(|v| seen_volume(&v)).ok_or_else(|| {
                                Status::internal("conformance: CreateVolume returned no volume")
                            })
                        }),
                    CreateRequest::Bucket(r) => buckets
                        .create_bucket(with_timeout(r.clone(), timeout))
                        .await
                        .and_then(|r| {
                            r.into_inner().bucket.map(|b| seen_bucket(&b)).ok_or_else(|| {
                                Status::internal("conformance: CreateBucket returned no bucket")
                            })
                        }),
                };
            (request, result)
        }
    }

    /// Lists objects by `id` (empty: any) and `selector`, recorded.
    pub(crate) async fn list(
        self,
        ctx: &mut Ctx,
        id: &str,
        selector: BTreeMap<String, String>,
    ) -> Result<Vec<Seen>, TestError> {
        Ok(match self {
            Kind::Volume => call!(
                ctx,
                volume.list_volumes(volume::ListVolumesRequest {
                    filter: Some(volume::VolumeFilter {
                        id: id.to_string(),
                        label_selector: selector,
                    }),
                })
            )?
            .volumes
            .iter()
            .map(seen_volume)
            .collect(),
            Kind::Bucket => call!(
                ctx,
                bucket.list_buckets(bucket::ListBucketsRequest {
                    filter: Some(bucket::BucketFilter {
                        id: id.to_string(),
                        label_selector: selector,
                    }),
                })
            )?
            .buckets
            .iter()
            .map(seen_bucket)
            .collect(),
        })
    }

    /// Lists every object (no filter), recorded.
    pub(crate) async fn list_all(self, ctx: &mut Ctx) -> Result<Vec<Seen>, TestError> {
        Ok(match self {
            Kind::Volume => call!(
                ctx,
                volume.list_volumes(volume::ListVolumesRequest { filter: None })
            )?
            .volumes
            .iter()
            .map(seen_volume)
            .collect(),
            Kind::Bucket => call!(
                ctx,
                bucket.list_buckets(bucket::ListBucketsRequest { filter: None })
            )?
            .buckets
            .iter()
            .map(seen_bucket)
            .collect(),
        })
    }

    /// Lists objects from an [`Ctx::eventually`] probe (not recorded).
    pub(crate) async fn probe_list(
        self,
        p: &Probe,
        id: &str,
        selector: BTreeMap<String, String>,
    ) -> Result<Vec<Seen>, Status> {
        Ok(match self {
            Kind::Volume => p
                .volume()
                .list_volumes(p.request(volume::ListVolumesRequest {
                    filter: Some(volume::VolumeFilter {
                        id: id.to_string(),
                        label_selector: selector,
                    }),
                }))
                .await?
                .into_inner()
                .volumes
                .iter()
                .map(seen_volume)
                .collect(),
            Kind::Bucket => p
                .bucket()
                .list_buckets(p.request(bucket::ListBucketsRequest {
                    filter: Some(bucket::BucketFilter {
                        id: id.to_string(),
                        label_selector: selector,
                    }),
                }))
                .await?
                .into_inner()
                .buckets
                .iter()
                .map(seen_bucket)
                .collect(),
        })
    }

    /// Deletes object `id`, recorded; returns the raw result so callers can check codes.
    pub(crate) async fn delete(self, ctx: &mut Ctx, id: &str) -> Result<(), Status> {
        match self {
            Kind::Volume => call!(
                ctx,
                volume.delete_volume(volume::DeleteVolumeRequest {
                    volume_id: id.to_string()
                })
            )
            .map(drop),
            Kind::Bucket => call!(
                ctx,
                bucket.delete_bucket(bucket::DeleteBucketRequest {
                    bucket_id: id.to_string()
                })
            )
            .map(drop),
        }
    }

    /// A delete that does not borrow `ctx`, so many can run at once; yields the id back. The
    /// caller records the exchange.
    pub(crate) fn delete_detached(
        self,
        ctx: &Ctx,
        id: String,
    ) -> impl Future<Output = (String, Result<(), Status>)> + Send + 'static {
        let mut volumes = ctx.volume();
        let mut buckets = ctx.bucket();
        let timeout = ctx.config.timeouts.rpc();
        async move {
            let result = match self {
                Kind::Volume => volumes
                    .delete_volume(with_timeout(
                        volume::DeleteVolumeRequest {
                            volume_id: id.clone(),
                        },
                        timeout,
                    ))
                    .await
                    .map(drop),
                Kind::Bucket => buckets
                    .delete_bucket(with_timeout(
                        bucket::DeleteBucketRequest {
                            bucket_id: id.clone(),
                        },
                        timeout,
                    ))
                    .await
                    .map(drop),
            };
            (id, result)
        }
    }

    /// Deletes object `id` from a probe (not recorded).
    pub(crate) async fn probe_delete(self, p: &Probe, id: &str) -> Result<(), Status> {
        match self {
            Kind::Volume => p
                .volume()
                .delete_volume(p.request(volume::DeleteVolumeRequest {
                    volume_id: id.to_string(),
                }))
                .await
                .map(drop),
            Kind::Bucket => p
                .bucket()
                .delete_bucket(p.request(bucket::DeleteBucketRequest {
                    bucket_id: id.to_string(),
                }))
                .await
                .map(drop),
        }
    }

    /// ListEvents with `selector` and the time window `[from, to]` (0 = unset), recorded.
    pub(crate) async fn list_events(
        self,
        ctx: &mut Ctx,
        selector: BTreeMap<String, String>,
        from: i64,
        to: i64,
    ) -> Result<Vec<Event>, TestError> {
        Ok(match self {
            Kind::Volume => {
                call!(
                    ctx,
                    volume.list_events(volume::ListEventsRequest {
                        filter: Some(volume::EventFilter {
                            id: String::new(),
                            label_selector: selector,
                            events_from_time: from,
                            events_to_time: to,
                        }),
                    })
                )?
                .events
            }
            Kind::Bucket => {
                call!(
                    ctx,
                    bucket.list_events(bucket::ListEventsRequest {
                        filter: Some(bucket::EventFilter {
                            id: String::new(),
                            label_selector: selector,
                            events_from_time: from,
                            events_to_time: to,
                        }),
                    })
                )?
                .events
            }
        })
    }

    /// ListEvents with `selector` from a probe (not recorded).
    pub(crate) async fn probe_events(
        self,
        p: &Probe,
        selector: BTreeMap<String, String>,
    ) -> Result<Vec<Event>, Status> {
        Ok(match self {
            Kind::Volume => {
                p.volume()
                    .list_events(p.request(volume::ListEventsRequest {
                        filter: Some(volume::EventFilter {
                            label_selector: selector,
                            ..Default::default()
                        }),
                    }))
                    .await?
                    .into_inner()
                    .events
            }
            Kind::Bucket => {
                p.bucket()
                    .list_events(p.request(bucket::ListEventsRequest {
                        filter: Some(bucket::EventFilter {
                            label_selector: selector,
                            ..Default::default()
                        }),
                    }))
                    .await?
                    .into_inner()
                    .events
            }
        })
    }

    /// Version, recorded: `(runtime_name, runtime_version)`.
    pub(crate) async fn version(self, ctx: &mut Ctx) -> Result<(String, String), TestError> {
        Ok(match self {
            Kind::Volume => {
                let v = call!(ctx, volume.version(volume::VersionRequest::default()))?;
                (v.runtime_name, v.runtime_version)
            }
            Kind::Bucket => {
                let v = call!(ctx, bucket.version(bucket::VersionRequest::default()))?;
                (v.runtime_name, v.runtime_version)
            }
        })
    }

    /// Waits until object `id` is ready (AVAILABLE); fails at once when it reports ERROR or
    /// disappears.
    pub(crate) async fn wait_ready(self, ctx: &Ctx, id: &str) -> Result<Seen, TestError> {
        let what = format!("{} {id} becomes available", self.noun());
        let id = id.to_string();
        ctx.eventually(&what, ctx.config.timeouts.ready(), move |p| {
            let id = id.clone();
            async move {
                let listed = self.probe_list(&p, &id, BTreeMap::new()).await?;
                let Some(seen) = listed.into_iter().find(|s| s.id() == id) else {
                    return Err(TestError::fail(format!(
                        "{} {id} disappeared while waiting for it to become available",
                        self.noun()
                    )));
                };
                match seen.phase {
                    Phase::Ready => Ok((Some(seen.clone()), seen.state)),
                    Phase::Error => Err(TestError::fail(format!(
                        "{} {id} went to {} instead of becoming available",
                        self.noun(),
                        seen.state
                    ))),
                    _ => Ok((None, seen.state)),
                }
            }
        })
        .await
    }

    /// Waits until List by id no longer returns object `id`.
    pub(crate) async fn wait_gone(self, ctx: &Ctx, id: &str) -> TestResult {
        let what = format!("deleted {} {id} disappears from List", self.noun());
        let id = id.to_string();
        ctx.eventually(&what, ctx.config.timeouts.delete(), move |p| {
            let id = id.clone();
            async move {
                let listed = self.probe_list(&p, &id, BTreeMap::new()).await?;
                match listed.iter().find(|s| s.id() == id) {
                    None => Ok((Some(()), "gone".to_string())),
                    Some(seen) => Ok((
                        None,
                        format!(
                            "still listed as {} (deleted_at {})",
                            seen.state, seen.metadata.deleted_at
                        ),
                    )),
                }
            }
        })
        .await
    }

    /// Deletes object `id` (the first delete must succeed), waits until it is gone, stops
    /// tracking it.
    pub(crate) async fn delete_and_wait(self, ctx: &mut Ctx, id: &str) -> TestResult {
        if let Err(status) = self.delete(ctx, id).await {
            return Err(TestError::fail(format!(
                "Delete{} of existing {} {id}: unexpected {:?}: {}",
                title(self),
                self.noun(),
                status.code(),
                status.message()
            )));
        }
        self.wait_gone(ctx, id).await?;
        ctx.untrack(&self.tracked(id));
        Ok(())
    }
}

/// `Volume` or `Bucket`, for RPC names in messages.
fn title(kind: Kind) -> &'static str {
    match kind {
        Kind::Volume => "Volume",
        Kind::Bucket => "Bucket",
    }
}

fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Records a create made with [`Kind::create_detached`] for the failure report.
pub(crate) fn record_create(ctx: &mut Ctx, request: &CreateRequest, result: &Result<Seen, Status>) {
    match request {
        CreateRequest::Volume(r) => ctx.record("create_volume", r, result),
        CreateRequest::Bucket(r) => ctx.record("create_bucket", r, result),
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// Fails unless `status` names `field` (case, `_`, `-` and spaces ignored, so `storage_bytes`
/// matches `storageBytes`): an InvalidArgument must say what is wrong.
pub(crate) fn check_mentions(status: &Status, field: &str, what: &str) -> TestResult {
    let normalize = |s: &str| {
        s.chars()
            .filter(|c| !matches!(c, '_' | '-' | ' '))
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    ensure!(
        normalize(status.message()).contains(&normalize(field)),
        "{what}: the {:?} message {:?} does not name the field {field:?}",
        status.code(),
        status.message()
    );
    Ok(())
}

/// `None` when the maps are equal, else what differs: missing, changed and unexpected keys.
pub(crate) fn map_diff<V: Debug + PartialEq>(
    expected: &BTreeMap<String, V>,
    actual: &BTreeMap<String, V>,
) -> Option<String> {
    if expected == actual {
        return None;
    }
    let mut parts = Vec::new();
    for (key, want) in expected {
        match actual.get(key) {
            None => parts.push(format!("missing {key:?}")),
            Some(got) if got != want => parts.push(format!("{key:?}: sent {want:?}, got {got:?}")),
            Some(_) => {}
        }
    }
    for key in actual.keys().filter(|k| !expected.contains_key(*k)) {
        parts.push(format!("unexpected {key:?}"));
    }
    let mut text = parts.join("; ");
    if text.len() > 600 {
        let cut = text.char_indices().nth(600).map(|(i, _)| i).unwrap_or(text.len());
        text.truncate(cut);
        text.push_str("...");
    }
    Some(text)
}

/// Fails unless the labels and annotations in `metadata` are exactly those sent.
pub(crate) fn check_metadata_round_trip(
    what: &str,
    metadata: &ObjectMetadata,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> TestResult {
    if let Some(diff) = map_diff(labels, &metadata.labels) {
        return Err(TestError::fail(format!(
            "{what}: labels not returned verbatim: {diff}"
        )));
    }
    if let Some(diff) = map_diff(annotations, &metadata.annotations) {
        return Err(TestError::fail(format!(
            "{what}: annotations not returned verbatim: {diff}"
        )));
    }
    Ok(())
}

/// What unit a Unix timestamp of this magnitude is probably in, for messages.
fn unit_hint(value: i64) -> &'static str {
    match value.unsigned_abs() {
        v if v >= 100_000_000_000_000_000 => "looks like nanoseconds",
        v if v >= 100_000_000_000_000 => "looks like microseconds",
        v if v >= 100_000_000_000 => "looks like milliseconds",
        v if v >= 100_000_000 => "looks like seconds",
        _ => "not a current Unix time",
    }
}

/// Fails unless `created_at` is Unix **nanoseconds** between `started_nanos` and now (with
/// [`CLOCK_SLACK_SECS`] either side).
pub(crate) fn check_created_at(what: &str, created_at: i64, started_nanos: i64) -> TestResult {
    let slack = CLOCK_SLACK_SECS * 1_000_000_000;
    let now = now_nanos();
    ensure!(
        created_at >= started_nanos - slack && created_at <= now + slack,
        "{what}: metadata.created_at {created_at} is not Unix nanoseconds near now ({now}): {}",
        unit_hint(created_at)
    );
    Ok(())
}

/// Fails unless `event_time` is Unix **seconds** between `started_secs` and now (with
/// [`CLOCK_SLACK_SECS`] either side).
pub(crate) fn check_event_time(what: &str, event_time: i64, started_secs: i64) -> TestResult {
    let now = now_secs();
    ensure!(
        event_time >= started_secs - CLOCK_SLACK_SECS && event_time <= now + CLOCK_SLACK_SECS,
        "{what}: event_time {event_time} is not Unix seconds near now ({now}): {}",
        unit_hint(event_time)
    );
    Ok(())
}

/// A fresh identifier that no runtime knows: unknown-id tests use it.
pub(crate) fn unknown_id() -> String {
    iri_runtime::id::new_id()
}

/// Runs the configured restart hook (`sh -c`), with `IRI_CONFORMANCE_KIND` set to the runtime
/// kind; skips when none is configured. The hook returns once the runtime serves again; the
/// caller still polls, because "serves" may mean "accepts connections" before state is loaded.
pub(crate) async fn restart_runtime(ctx: &Ctx, kind: Kind) -> TestResult {
    let hook = ctx.config.hooks.restart.trim().to_string();
    if hook.is_empty() {
        return Err(skip_without_restart_hook());
    }
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&hook)
        .env("IRI_CONFORMANCE_KIND", kind.noun())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    // A hook that never returns must not hang the suite: the ready timeout bounds it.
    let output = tokio::time::timeout(ctx.config.timeouts.ready(), child)
        .await
        .map_err(|_| {
            TestError::fail(format!(
                "restart hook {hook:?} did not finish within {:?}",
                ctx.config.timeouts.ready()
            ))
        })?
        .map_err(|e| TestError::fail(format!("restart hook {hook:?} could not be started: {e}")))?;
    ensure!(
        output.status.success(),
        "restart hook {hook:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// The skip of restart tests when no hook is configured.
pub(crate) fn skip_without_restart_hook() -> TestError {
    TestError::skip("no restart hook configured (hooks.restart)")
}

// ---------------------------------------------------------------------------------------------
// Tests shared by volumes and buckets
// ---------------------------------------------------------------------------------------------

/// A label-selector case: labels added to the test's selector, the objects it must select,
/// and what the case is about.
type SelectorCase<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);

/// Label selectors are equality-only AND over the object's IRI labels; an empty value still
/// requires the key (iri-contract §2.1).
pub(crate) async fn label_selector(kind: Kind, ctx: &mut Ctx) -> TestResult {
    const A: &str = "conformance.iri.ironcore.dev/a";
    const SHARED: &str = "conformance.iri.ironcore.dev/shared";
    const EMPTY: &str = "conformance.iri.ironcore.dev/empty";
    let template = kind.template(ctx, false).await?;
    let labels = ctx.labels(&[(A, "1"), (SHARED, "x")]);
    let first = kind.create(ctx, &template, labels, BTreeMap::new()).await?;
    let labels = ctx.labels(&[(A, "2"), (SHARED, "x"), (EMPTY, "")]);
    let second = kind.create(ctx, &template, labels, BTreeMap::new()).await?;
    let (one, two) = (first.id(), second.id());

    let cases: [SelectorCase; 9] = [
        (&[], &[one, two], "the test's own labels"),
        (&[(SHARED, "x")], &[one, two], "a label both carry"),
        (&[(A, "1")], &[one], "a value only the first carries"),
        (&[(A, "2"), (SHARED, "x")], &[two], "two labels (AND)"),
        (
            &[(A, "1"), (SHARED, "y")],
            &[],
            "one matching, one mismatching label (AND)",
        ),
        (&[(EMPTY, "")], &[two], "an empty value (the key must exist)"),
        (&[(A, "")], &[], "an empty value for a key with a non-empty value"),
        (
            &[("conformance.iri.ironcore.dev/absent", "x")],
            &[],
            "a key no object carries",
        ),
        (&[(A, "1 ")], &[], "a value with a trailing space (exact match)"),
    ];
    for (extra, expected, case) in cases {
        let selector = ctx.labels(extra);
        let listed = kind.list(ctx, "", selector.clone()).await?;
        let got: BTreeSet<&str> = listed.iter().map(Seen::id).collect();
        let want: BTreeSet<&str> = expected.iter().copied().collect();
        ensure!(
            got == want,
            "List{}s with {case} ({selector:?}): expected {want:?}, got {got:?}",
            title(kind)
        );
    }
    // id and selector together: the object whose id it is, when it matches.
    let selector = ctx.selector();
    let listed = kind.list(ctx, one, selector).await?;
    ensure!(
        listed.len() == 1 && listed[0].id() == one,
        "List{}s with id {one} and the test's labels: expected exactly that object, got {:?}",
        title(kind),
        listed.iter().map(Seen::id).collect::<Vec<_>>()
    );
    Ok(())
}

/// Repeated deletes: OK while deleting, then NOT_FOUND once gone, and NOT_FOUND only once the
/// object is no longer listed (the poollets' List+Delete loop, iri-contract §3.1).
pub(crate) async fn repeated_delete(kind: Kind, ctx: &mut Ctx) -> TestResult {
    let template = kind.template(ctx, false).await?;
    let labels = ctx.labels(&[]);
    let created = kind.create(ctx, &template, labels, BTreeMap::new()).await?;
    let id = created.id().to_string();
    // Deleting right after creating (no wait): poollets do that when a resource is deleted
    // while still being provisioned.
    if let Err(status) = kind.delete(ctx, &id).await {
        return Err(TestError::fail(format!(
            "first Delete{} of {id}: unexpected {:?}: {}",
            title(kind),
            status.code(),
            status.message()
        )));
    }
    let what = format!("repeated Delete{} of {id} ends in NotFound", title(kind));
    let probe_id = id.clone();
    ctx.eventually(&what, ctx.config.timeouts.delete(), move |p| {
        let id = probe_id.clone();
        async move {
            match kind.probe_delete(&p, &id).await {
                Ok(()) => Ok((None, "OK (still deleting)".to_string())),
                Err(status) if status.code() == Code::NotFound => {
                    let listed = kind.probe_list(&p, &id, BTreeMap::new()).await?;
                    ensure!(
                        listed.is_empty(),
                        "Delete{} said NotFound for {id}, but List still returns {:?}",
                        title(kind),
                        listed.iter().map(Seen::describe).collect::<Vec<_>>()
                    );
                    Ok((Some(()), "NotFound".to_string()))
                }
                Err(status) => Err(TestError::fail(format!(
                    "repeated Delete{} of {id}: expected OK or NotFound, got {:?}: {}",
                    title(kind),
                    status.code(),
                    status.message()
                ))),
            }
        }
    })
    .await?;
    ctx.untrack(&kind.tracked(&id));
    for attempt in 1..=2 {
        let result = kind.delete(ctx, &id).await;
        expect_code(
            result,
            Code::NotFound,
            &format!("Delete{} of deleted {id} (again, #{attempt})", title(kind)),
        )?;
    }
    Ok(())
}

/// Events about an object: found by its labels, carrying its metadata, Unix-second times, and
/// honouring the time window only when both bounds are set (iri-contract §2.5).
pub(crate) async fn events(kind: Kind, ctx: &mut Ctx) -> TestResult {
    let started = now_secs();
    let template = kind.template(ctx, false).await?;
    let labels = ctx.labels(&[]);
    let created = kind
        .create(ctx, &template, labels.clone(), BTreeMap::new())
        .await?;
    let id = created.id().to_string();
    kind.wait_ready(ctx, &id).await?;

    // Events may be recorded asynchronously: wait for the first one.
    let selector = ctx.selector();
    let what = format!("ListEvents returns events for {} {id}", kind.noun());
    let events = ctx
        .eventually(&what, ctx.config.timeouts.ready(), {
            let selector = selector.clone();
            move |p| {
                let selector = selector.clone();
                async move {
                    let events = kind.probe_events(&p, selector).await?;
                    let seen = format!("{} events", events.len());
                    Ok(((!events.is_empty()).then_some(events), seen))
                }
            }
        })
        .await?;
    check_events(kind, &events, &id, &labels, started)?;
    // Record the exchange that is checked from here on.
    let events = kind.list_events(ctx, selector.clone(), 0, 0).await?;
    check_events(kind, &events, &id, &labels, started)?;
    let first_time = events
        .iter()
        .filter_map(|e| e.spec.as_ref().map(|s| s.event_time))
        .min()
        .unwrap_or(started);

    // A window entirely in the past excludes them.
    let past = kind
        .list_events(ctx, selector.clone(), started - 7200, started - 3600)
        .await?;
    ensure!(
        past.is_empty(),
        "ListEvents with the window [{}, {}] (an hour before the test) returned {} events; \
         event_time: {:?}",
        started - 7200,
        started - 3600,
        past.len(),
        times(&past)
    );
    // A window around now includes them, and only events inside it.
    let (from, to) = (started - 60, now_secs() + 60);
    let around = kind.list_events(ctx, selector.clone(), from, to).await?;
    ensure!(
        !around.is_empty(),
        "ListEvents with the window [{from}, {to}] around now returned no events (unfiltered: \
         event_time {:?})",
        times(&events)
    );
    check_events(kind, &around, &id, &labels, started)?;
    ensure!(
        times(&around).iter().all(|t| (from..=to).contains(t)),
        "ListEvents with the window [{from}, {to}] returned events outside it: {:?}",
        times(&around)
    );
    // Both bounds are inclusive: a one-second window at an event's time contains it.
    let exact = kind
        .list_events(ctx, selector.clone(), first_time, first_time)
        .await?;
    ensure!(
        times(&exact).contains(&first_time) && times(&exact).iter().all(|t| *t == first_time),
        "ListEvents with the window [{first_time}, {first_time}] (inclusive bounds at an event's \
         time) returned event_time {:?}",
        times(&exact)
    );
    // A single bound is ignored (only both > 0 filter), even one that would exclude everything.
    for (from, to, case) in [
        (now_secs() + 3600, 0, "only events_from_time, an hour ahead"),
        (0, started - 3600, "only events_to_time, an hour back"),
    ] {
        let listed = kind.list_events(ctx, selector.clone(), from, to).await?;
        ensure!(
            !listed.is_empty(),
            "ListEvents with {case} ({from}, {to}) returned no events: a single bound must be \
             ignored (iri-contract §2.5)"
        );
    }

    // Events outlive their object: the poollet maps them back by labels after deletion, too.
    kind.delete_and_wait(ctx, &id).await?;
    let after = kind.list_events(ctx, selector, 0, 0).await?;
    ensure!(
        !after.is_empty(),
        "ListEvents returned no events for {} {id} after it was deleted",
        kind.noun()
    );
    check_events(kind, &after, &id, &labels, started)
}

fn times(events: &[Event]) -> Vec<i64> {
    events
        .iter()
        .filter_map(|e| e.spec.as_ref().map(|s| s.event_time))
        .collect()
}

/// Every event must be about object `id` (the only one with the test's labels), carry its
/// labels, a Kubernetes event type and reason, and a Unix-seconds time.
fn check_events(
    kind: Kind,
    events: &[Event],
    id: &str,
    labels: &BTreeMap<String, String>,
    started: i64,
) -> TestResult {
    for event in events {
        let Some(spec) = event.spec.as_ref() else {
            return Err(TestError::fail("ListEvents returned an event without spec"));
        };
        // Poollets dereference involved_object_meta.labels without a nil check.
        let Some(meta) = spec.involved_object_meta.as_ref() else {
            return Err(TestError::fail(format!(
                "event {:?} ({:?}) has no involved_object_meta",
                spec.reason, spec.message
            )));
        };
        ensure!(
            labels.iter().all(|(k, v)| meta.labels.get(k) == Some(v)),
            "ListEvents ignored the label selector: it returned an event about {:?} with labels {:?}",
            meta.id,
            meta.labels
        );
        ensure!(
            meta.id == id,
            "event {:?} is about {:?}, expected {} {id} (the only object with these labels)",
            spec.reason,
            meta.id,
            kind.noun()
        );
        if let Some(diff) = map_diff(labels, &meta.labels) {
            return Err(TestError::fail(format!(
                "event {:?}: involved_object_meta.labels differ from the {}'s labels: {diff}",
                spec.reason,
                kind.noun()
            )));
        }
        // The poollet re-emits them as Kubernetes events, which only know these two types.
        ensure!(
            spec.r#type == "Normal" || spec.r#type == "Warning",
            "event {:?}: type {:?} is neither Normal nor Warning",
            spec.reason,
            spec.r#type
        );
        ensure!(
            !spec.reason.is_empty(),
            "event {:?} has an empty reason",
            spec.message
        );
        check_event_time(&format!("event {:?}", spec.reason), spec.event_time, started)?;
    }
    Ok(())
}

/// Ten parallel creates get distinct ids and are all listed and converge; ten parallel deletes
/// make them all disappear.
pub(crate) async fn parallel_create_delete(kind: Kind, ctx: &mut Ctx) -> TestResult {
    const N: usize = 10;
    let template = kind.template(ctx, false).await?;
    kind.ensure_room(ctx, &template, N).await?;
    let shared: &Ctx = ctx;
    let creates: Vec<_> = (0..N)
        .map(|i| {
            let labels = shared.labels(&[(INDEX_LABEL, &i.to_string())]);
            kind.create_detached(shared, template.request(labels, BTreeMap::new()))
        })
        .collect();
    let results = futures::future::join_all(creates).await;
    let ids = collect_created(kind, ctx, &results)?;
    check_listed_exactly(kind, ctx, &ids).await?;

    let what = format!("{N} parallel {}s become available", kind.noun());
    let selector = ctx.selector();
    let probe_ids = ids.clone();
    ctx.eventually(&what, ctx.config.timeouts.ready(), move |p| {
        let (selector, ids) = (selector.clone(), probe_ids.clone());
        async move {
            let listed = kind.probe_list(&p, "", selector).await?;
            if let Some(failed) = listed.iter().find(|s| s.phase == Phase::Error) {
                return Err(TestError::fail(format!(
                    "{} {} went to {}",
                    kind.noun(),
                    failed.id(),
                    failed.state
                )));
            }
            let ready = listed
                .iter()
                .filter(|s| s.phase == Phase::Ready && ids.contains(s.id()))
                .count();
            Ok((
                (ready == ids.len()).then_some(()),
                format!("{ready} of {} available", ids.len()),
            ))
        }
    })
    .await?;

    delete_all(kind, ctx, ids).await
}

/// Records the parallel creates, tracks every object that was created (before judging, so a
/// failure leaks nothing), and returns the ids; fails on errors and duplicate ids.
fn collect_created(
    kind: Kind,
    ctx: &mut Ctx,
    results: &[(CreateRequest, Result<Seen, Status>)],
) -> Result<BTreeSet<String>, TestError> {
    let mut ids = BTreeSet::new();
    let mut duplicates = Vec::new();
    let mut errors = Vec::new();
    for (request, result) in results {
        record_create(ctx, request, result);
        match result {
            Ok(seen) if seen.id().is_empty() => errors.push("an object without metadata.id".to_string()),
            Ok(seen) => {
                ctx.track(kind.tracked(seen.id()));
                if !ids.insert(seen.id().to_string()) {
                    duplicates.push(seen.id().to_string());
                }
            }
            Err(status) => errors.push(format!("{:?}: {}", status.code(), status.message())),
        }
    }
    ensure!(
        errors.is_empty(),
        "{} of {} parallel Create{} calls failed; first: {}",
        errors.len(),
        results.len(),
        title(kind),
        errors[0]
    );
    ensure!(
        duplicates.is_empty(),
        "parallel Create{} calls returned the same id twice: {duplicates:?}",
        title(kind)
    );
    Ok(ids)
}

/// Fails unless List with the test's selector returns exactly `ids`.
async fn check_listed_exactly(kind: Kind, ctx: &mut Ctx, ids: &BTreeSet<String>) -> TestResult {
    let selector = ctx.selector();
    let listed = kind.list(ctx, "", selector).await?;
    let got: BTreeSet<String> = listed.iter().map(|s| s.id().to_string()).collect();
    let missing: Vec<&String> = ids.difference(&got).collect();
    let extra: Vec<&String> = got.difference(ids).collect();
    ensure!(
        missing.is_empty() && extra.is_empty() && listed.len() == ids.len(),
        "List{}s by the test's labels: {} listed for {} created; missing {missing:?}, unexpected \
         {extra:?}",
        title(kind),
        listed.len(),
        ids.len()
    );
    Ok(())
}

/// Deletes `ids` in parallel (each first delete must succeed) and waits until none is listed.
async fn delete_all(kind: Kind, ctx: &mut Ctx, ids: BTreeSet<String>) -> TestResult {
    let shared: &Ctx = ctx;
    let deletes: Vec<_> = ids
        .iter()
        .map(|id| kind.delete_detached(shared, id.clone()))
        .collect();
    let mut errors = Vec::new();
    let mut stream = futures::stream::iter(deletes).buffer_unordered(BATCH);
    while let Some((id, result)) = stream.next().await {
        record_delete(kind, ctx, &id, &result);
        if let Err(status) = result {
            errors.push(format!("{id}: {:?}: {}", status.code(), status.message()));
        }
    }
    ensure!(
        errors.is_empty(),
        "{} of {} parallel Delete{} calls failed; first: {}",
        errors.len(),
        ids.len(),
        title(kind),
        errors[0]
    );
    let what = format!("{} deleted {}s disappear from List", ids.len(), kind.noun());
    let selector = ctx.selector();
    ctx.eventually(&what, ctx.config.timeouts.delete(), move |p| {
        let selector = selector.clone();
        async move {
            let left = kind.probe_list(&p, "", selector).await?.len();
            Ok(((left == 0).then_some(()), format!("{left} still listed")))
        }
    })
    .await?;
    for id in &ids {
        ctx.untrack(&kind.tracked(id));
    }
    Ok(())
}

fn record_delete(kind: Kind, ctx: &mut Ctx, id: &str, result: &Result<(), Status>) {
    match kind {
        Kind::Volume => ctx.record(
            "delete_volume",
            &volume::DeleteVolumeRequest {
                volume_id: id.to_string(),
            },
            result,
        ),
        Kind::Bucket => ctx.record(
            "delete_bucket",
            &bucket::DeleteBucketRequest {
                bucket_id: id.to_string(),
            },
            result,
        ),
    }
}

/// Objects survive a restart of the runtime: same ids, metadata, specs and states; the runtime
/// still works afterwards.
pub(crate) async fn restart(kind: Kind, ctx: &mut Ctx) -> TestResult {
    if ctx.config.hooks.restart.trim().is_empty() {
        return Err(skip_without_restart_hook());
    }
    let template = kind.template(ctx, false).await?;
    let annotations = BTreeMap::from([(
        "conformance.iri.ironcore.dev/note".to_string(),
        "must survive a restart".to_string(),
    )]);
    let mut ids = Vec::new();
    for (i, annotations) in [BTreeMap::new(), annotations].into_iter().enumerate() {
        let labels = ctx.labels(&[(INDEX_LABEL, &i.to_string())]);
        let created = kind.create(ctx, &template, labels, annotations).await?;
        ids.push(created.id().to_string());
    }
    for id in &ids {
        kind.wait_ready(ctx, id).await?;
    }
    let selector = ctx.selector();
    let before = by_id(kind.list(ctx, "", selector).await?);

    restart_runtime(ctx, kind).await?;

    // The runtime may accept connections before it answers, or answer before it has loaded
    // everything: poll until the listing matches, and report the last difference.
    let what = format!("{}s are listed unchanged after the restart", kind.noun());
    let selector = ctx.selector();
    let expected = before.clone();
    ctx.eventually(&what, ctx.config.timeouts.ready(), move |p| {
        let (selector, expected) = (selector.clone(), expected.clone());
        async move {
            let listed = match kind.probe_list(&p, "", selector).await {
                Ok(listed) => by_id(listed),
                Err(status) => return Ok((None, format!("{:?}: {}", status.code(), status.message()))),
            };
            Ok(match seen_diff(&expected, &listed) {
                None => (Some(()), String::new()),
                Some(diff) => (None, diff),
            })
        }
    })
    .await?;

    let (name, _) = kind.version(ctx).await?;
    ensure!(
        !name.is_empty(),
        "Version after the restart has an empty runtime_name"
    );
    for id in &ids {
        kind.delete_and_wait(ctx, id).await?;
    }
    // And it still creates: state written after the restart works like before.
    let labels = ctx.labels(&[]);
    let created = kind.create(ctx, &template, labels, BTreeMap::new()).await?;
    kind.wait_ready(ctx, created.id()).await?;
    Ok(())
}

fn by_id(listed: Vec<Seen>) -> BTreeMap<String, Seen> {
    listed.into_iter().map(|s| (s.id().to_string(), s)).collect()
}

/// What changed between two listings, `None` when nothing did.
fn seen_diff(before: &BTreeMap<String, Seen>, after: &BTreeMap<String, Seen>) -> Option<String> {
    let mut parts = Vec::new();
    for (id, old) in before {
        match after.get(id) {
            None => parts.push(format!("{id} missing")),
            Some(new) if new.metadata != old.metadata => parts.push(format!(
                "{id}: metadata was {:?}, is {:?}",
                old.metadata, new.metadata
            )),
            Some(new) if new.durable != old.durable => {
                parts.push(format!("{id}: was {}, is {}", old.durable, new.durable))
            }
            Some(_) => {}
        }
    }
    for id in after.keys().filter(|id| !before.contains_key(*id)) {
        parts.push(format!("unexpected {id}"));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// `config.scale.objects` objects, created in parallel batches: all listed by selector and
/// without filter, each found by id; then all deleted.
pub(crate) async fn list_at_scale(kind: Kind, ctx: &mut Ctx) -> TestResult {
    let count = ctx.config.scale.objects;
    if count == 0 {
        return Err(TestError::skip("scale.objects is 0"));
    }
    let template = kind.template(ctx, true).await?;
    kind.ensure_room(ctx, &template, count).await?;

    let shared: &Ctx = ctx;
    let creates: Vec<_> = (0..count)
        .map(|i| {
            let labels = shared.labels(&[(INDEX_LABEL, &i.to_string())]);
            kind.create_detached(shared, template.request(labels, BTreeMap::new()))
        })
        .collect();
    let started = Instant::now();
    let results: Vec<_> = futures::stream::iter(creates)
        .buffer_unordered(BATCH)
        .collect()
        .await;
    let create_time = started.elapsed();
    let ids = collect_created(kind, ctx, &results)?;

    check_listed_exactly(kind, ctx, &ids).await?;
    let all = kind.list_all(ctx).await?;
    let unfiltered: BTreeSet<&str> = all.iter().map(Seen::id).collect();
    let missing = ids.iter().filter(|id| !unfiltered.contains(id.as_str())).count();
    ensure!(
        missing == 0,
        "List{}s without filter returned {} objects but misses {missing} of the {count} just \
         created (created in {create_time:?})",
        title(kind),
        all.len()
    );
    let ordered: Vec<&String> = ids.iter().collect();
    for id in [ordered[0], ordered[ordered.len() / 2], ordered[ordered.len() - 1]] {
        let listed = kind.list(ctx, id, BTreeMap::new()).await?;
        ensure!(
            listed.len() == 1 && listed[0].id() == id,
            "List{}s with id {id} among {count} objects returned {:?}",
            title(kind),
            listed.iter().map(Seen::id).collect::<Vec<_>>()
        );
    }
    delete_all(kind, ctx, ids).await
}
