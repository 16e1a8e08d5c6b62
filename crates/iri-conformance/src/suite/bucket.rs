// SPDX-License-Identifier: Apache-2.0
//! Bucket runtime tests (`bucket.v1alpha1.BucketRuntime`).
//!
//! What they hold a runtime to is iri-contract §1.5, §2.0, §2.1, §2.4, §2.5 and §3.4: classes
//! with capabilities, server-assigned ids, AVAILABLE buckets with an endpoint URL and S3
//! credentials the bucketpoollet copies into a Secret, NotFound for unknown ids (upstream's
//! ceph-provider answers InvalidArgument), verbatim metadata, events, parallel creates, restart
//! and scale. The data-plane profile (`dataplane`) puts and gets objects through the returned
//! access with a real S3 client.

mod dataplane;

use std::collections::{BTreeMap, BTreeSet};

use iri_api::bucket::v1alpha1::{
    Bucket, BucketAccess, BucketFilter, BucketSpec, BucketState, CreateBucketRequest,
    ListBucketClassesRequest, ListBucketsRequest,
};
use iri_runtime::id::now_nanos;
use tonic::Code;

use crate::{
    call, ensure,
    harness::{Ctx, TestCase, TestError, TestResult, Tracked, expect_code},
    suite::common::{
        Kind, check_created_at, check_mentions, check_metadata_round_trip, map_diff, unknown_id,
    },
    test_case,
};

/// Secret key with the S3 access key id (what Rook's ObjectBucketClaims produce and S3 clients
/// read from the environment).
pub const ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
/// Secret key with the S3 secret access key.
pub const SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";

/// The bucket tests, in report order.
pub fn cases() -> Vec<TestCase> {
    vec![
        test_case!(
            Bucket,
            Identity,
            Core,
            false,
            version_is_set_and_semver,
            "Version returns a runtime name and a semver version"
        ),
        test_case!(
            Bucket,
            Identity,
            Core,
            false,
            classes_are_listed,
            "ListBucketClasses lists named, unique classes with capabilities"
        ),
        test_case!(
            Bucket,
            Validation,
            Core,
            false,
            invalid_requests,
            "malformed CreateBucket is InvalidArgument naming the field; DeleteBucket of an unknown id is NotFound"
        ),
        test_case!(
            Bucket,
            Lifecycle,
            Core,
            false,
            lifecycle,
            "create, list, AVAILABLE with an endpoint URL and S3 credentials, delete, gone, NotFound"
        ),
        test_case!(
            Bucket,
            Lifecycle,
            Core,
            false,
            credentials_are_per_bucket,
            "two buckets get different access key ids; a bucket's credentials are stable across reads"
        ),
        test_case!(
            Bucket,
            Idempotence,
            Core,
            false,
            repeated_delete,
            "repeated DeleteBucket right after create ends in NotFound, and NotFound means unlisted"
        ),
        test_case!(
            Bucket,
            Metadata,
            Core,
            false,
            metadata_round_trip,
            "labels (bucketpoollet's too), annotations and spec round-trip byte for byte; found by UID label"
        ),
        test_case!(
            Bucket,
            Metadata,
            Core,
            false,
            label_selector,
            "ListBuckets label selectors are exact-match AND; an empty value requires the key"
        ),
        test_case!(
            Bucket,
            Events,
            Core,
            false,
            events,
            "ListEvents by labels: involved metadata, Unix-second times, both-bounds time window, kept after delete"
        ),
        test_case!(
            Bucket,
            Concurrency,
            Core,
            false,
            parallel_create_delete,
            "10 parallel creates get distinct ids, are listed and available; 10 parallel deletes remove them"
        ),
        test_case!(
            Bucket,
            DataPlane,
            DataPlane,
            false,
            objects_round_trip,
            "the access of an available bucket PUTs, GETs (whole and a range), HEADs, LISTs and DELETEs objects with boto3"
        ),
        test_case!(
            Bucket,
            DataPlane,
            DataPlane,
            false,
            credentials_open_one_bucket,
            "one bucket's credentials are refused (AccessDenied) on another bucket"
        ),
        test_case!(
            Bucket,
            DataPlane,
            DataPlane,
            false,
            delete_revokes_credentials,
            "after DeleteBucket the bucket's credentials no longer work"
        ),
        test_case!(
            Bucket,
            Restart,
            Restart,
            true,
            restart,
            "buckets keep ids, metadata, spec, state and credentials across a runtime restart (hooks.restart)"
        ),
        test_case!(
            Bucket,
            Scale,
            Scale,
            true,
            list_at_scale,
            "scale.objects buckets are all listed by labels, without filter and by id, then deleted"
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// The class the tests use: `config.bucket.class`, else the first ListBucketClasses reports.
pub(crate) async fn class(ctx: &mut Ctx) -> Result<String, TestError> {
    let classes = call!(ctx, bucket.list_bucket_classes(ListBucketClassesRequest {}))?.bucket_classes;
    let wanted = ctx.config.bucket.class.clone();
    if wanted.is_empty() {
        return classes
            .into_iter()
            .next()
            .map(|c| c.name)
            .ok_or_else(|| TestError::fail("ListBucketClasses reports no class"));
    }
    ensure!(
        classes.iter().any(|c| c.name == wanted),
        "ListBucketClasses does not report the configured bucket class {wanted:?}"
    );
    Ok(wanted)
}

fn request(
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    class: &str,
) -> CreateBucketRequest {
    CreateBucketRequest {
        bucket: Some(Bucket {
            metadata: Some(iri_api::meta::v1alpha1::ObjectMetadata {
                labels,
                annotations,
                ..Default::default()
            }),
            spec: Some(BucketSpec {
                class: class.to_string(),
            }),
            status: None,
        }),
    }
}

fn id(bucket: &Bucket) -> &str {
    bucket.metadata.as_ref().map(|m| m.id.as_str()).unwrap_or("")
}

fn state(bucket: &Bucket) -> i32 {
    bucket.status.as_ref().map(|s| s.state).unwrap_or_default()
}

fn state_name(state: i32) -> String {
    BucketState::try_from(state)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("state {state}"))
}

/// Creates a bucket, tracks it, returns what CreateBucket returned.
async fn create(ctx: &mut Ctx, request: CreateBucketRequest) -> Result<Bucket, TestError> {
    let response = call!(ctx, bucket.create_bucket(request))?;
    let created = response
        .bucket
        .ok_or_else(|| TestError::fail("CreateBucket returned no bucket"))?;
    ensure!(
        !id(&created).is_empty(),
        "CreateBucket returned a bucket without metadata.id"
    );
    ctx.track(Tracked::Bucket(id(&created).to_string()));
    Ok(created)
}

/// Creates a bucket of the test class with the test's labels plus `extra`.
async fn create_plain(ctx: &mut Ctx, extra: &[(&str, &str)]) -> Result<Bucket, TestError> {
    let class = class(ctx).await?;
    let request = request(ctx.labels(extra), BTreeMap::new(), &class);
    create(ctx, request).await
}

async fn list(ctx: &mut Ctx, filter: BucketFilter) -> Result<Vec<Bucket>, TestError> {
    Ok(call!(
        ctx,
        bucket.list_buckets(ListBucketsRequest { filter: Some(filter) })
    )?
    .buckets)
}

/// The bucket with `id`; fails unless List by id returns exactly it.
async fn must_get(ctx: &mut Ctx, wanted: &str) -> Result<Bucket, TestError> {
    let listed = list(
        ctx,
        BucketFilter {
            id: wanted.to_string(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        listed.len() == 1 && id(&listed[0]) == wanted,
        "ListBuckets with id {wanted} returned {:?}, expected [{wanted}]",
        listed.iter().map(id).collect::<Vec<_>>()
    );
    Ok(listed.into_iter().next().unwrap_or_default())
}

/// Waits until bucket `id` is BUCKET_AVAILABLE and returns it; fails at once on BUCKET_ERROR
/// or when it disappears.
async fn wait_available(ctx: &Ctx, wanted: &str) -> Result<Bucket, TestError> {
    let what = format!("bucket {wanted} becomes BUCKET_AVAILABLE");
    let wanted = wanted.to_string();
    ctx.eventually(&what, ctx.config.timeouts.ready(), move |p| {
        let wanted = wanted.clone();
        async move {
            let listed = p
                .bucket()
                .list_buckets(p.request(ListBucketsRequest {
                    filter: Some(BucketFilter {
                        id: wanted.clone(),
                        ..Default::default()
                    }),
                }))
                .await?
                .into_inner()
                .buckets;
            let Some(bucket) = listed.into_iter().find(|b| id(b) == wanted) else {
                return Err(TestError::fail(format!(
                    "bucket {wanted} disappeared while waiting for BUCKET_AVAILABLE"
                )));
            };
            let state = state(&bucket);
            if state == BucketState::BucketError as i32 {
                return Err(TestError::fail(format!(
                    "bucket {wanted} went to BUCKET_ERROR instead of BUCKET_AVAILABLE"
                )));
            }
            let done = state == BucketState::BucketAvailable as i32;
            Ok((done.then_some(bucket), state_name(state)))
        }
    })
    .await
}

async fn create_available(ctx: &mut Ctx, extra: &[(&str, &str)]) -> Result<Bucket, TestError> {
    let created = create_plain(ctx, extra).await?;
    wait_available(ctx, id(&created)).await
}

/// Scheme, host and port of an endpoint URL (`http(s)://host[:port][/path]`, IPv6 hosts in
/// brackets); the port defaults by scheme.
pub(crate) fn parse_endpoint(endpoint: &str) -> Result<(String, String, u16), String> {
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or("no scheme: expected http://host[:port] or https://host[:port]")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return Err(format!("scheme {scheme:?} is neither http nor https")),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        // Credentials belong in secret_data, where the poollet keeps them in a Secret.
        return Err("the URL carries user info".to_string());
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed.split_once(']').ok_or("unclosed '[' in the host")?;
            if !host.contains(':')
                || !host
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
            {
                return Err(format!("{host:?} is not an IPv6 address"));
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or("garbage after the IPv6 host")?),
            };
            (host, port)
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let valid_host = !host.is_empty()
        && (host.contains(':')
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')));
    if !valid_host {
        return Err(format!("{host:?} is not a host name or address"));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(format!("port {p:?} is not a number in 1..=65535")),
        },
    };
    Ok((scheme, host.to_string(), port))
}

/// The access of an available bucket: an endpoint URL and non-empty S3 credentials.
fn check_access(bucket: &Bucket) -> Result<BucketAccess, TestError> {
    let bucket_id = id(bucket);
    let access = bucket
        .status
        .as_ref()
        .and_then(|s| s.access.clone())
        .ok_or_else(|| TestError::fail(format!("available bucket {bucket_id} has no status.access")))?;
    if let Err(reason) = parse_endpoint(&access.endpoint) {
        return Err(TestError::fail(format!(
            "bucket {bucket_id}: status.access.endpoint {:?} is not an http(s) URL: {reason}",
            access.endpoint
        )));
    }
    for key in [ACCESS_KEY_ID, SECRET_ACCESS_KEY] {
        let value = access.secret_data.get(key);
        ensure!(
            value.is_some_and(|v| !v.is_empty()),
            "bucket {bucket_id}: status.access.secret_data has no non-empty {key} (keys: {:?})",
            access.secret_data.keys().collect::<Vec<_>>()
        );
    }
    Ok(access)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

async fn version_is_set_and_semver(ctx: &mut Ctx) -> TestResult {
    let (name, version) = Kind::Bucket.version(ctx).await?;
    ensure!(!name.is_empty(), "runtime_name is empty");
    ensure!(
        crate::suite::is_semver(&version),
        "runtime_version {version:?} is not semver"
    );
    Ok(())
}

async fn classes_are_listed(ctx: &mut Ctx) -> TestResult {
    let classes = call!(ctx, bucket.list_bucket_classes(ListBucketClassesRequest {}))?.bucket_classes;
    ensure!(!classes.is_empty(), "ListBucketClasses reports no class");
    let mut names = BTreeSet::new();
    for class in &classes {
        ensure!(!class.name.is_empty(), "a bucket class has an empty name");
        ensure!(
            names.insert(class.name.clone()),
            "bucket class {:?} is reported twice",
            class.name
        );
        // The bucketpoollet dereferences capabilities (iri-contract §3.5.6).
        let Some(caps) = class.capabilities.as_ref() else {
            return Err(TestError::fail(format!(
                "bucket class {:?} has no capabilities",
                class.name
            )));
        };
        ensure!(
            caps.tps >= 0 && caps.iops >= 0,
            "bucket class {:?} has negative capabilities: tps {}, iops {}",
            class.name,
            caps.tps,
            caps.iops
        );
    }
    let wanted = &ctx.config.bucket.class;
    ensure!(
        wanted.is_empty() || names.contains(wanted),
        "ListBucketClasses does not report the configured class {wanted:?} (reported: {names:?})"
    );
    Ok(())
}

/// Sends a CreateBucket that must fail with InvalidArgument naming `field`; tracks whatever a
/// wrong runtime created anyway.
async fn expect_invalid_create(
    ctx: &mut Ctx,
    case: &str,
    request: CreateBucketRequest,
    field: &str,
) -> TestResult {
    let result = call!(ctx, bucket.create_bucket(request));
    if let Ok(response) = &result
        && let Some(created) = &response.bucket
        && !id(created).is_empty()
    {
        ctx.track(Tracked::Bucket(id(created).to_string()));
    }
    let what = format!("CreateBucket {case}");
    let status = expect_code(result, Code::InvalidArgument, &what)?;
    check_mentions(&status, field, &what)
}

async fn invalid_requests(ctx: &mut Ctx) -> TestResult {
    let class = class(ctx).await?;
    // Each request has exactly one defect, so the expected answer is unambiguous.
    let valid = request(ctx.labels(&[]), BTreeMap::new(), &class);
    let bucket = || valid.bucket.clone().unwrap_or_default();
    let wrap = |b: Bucket| CreateBucketRequest { bucket: Some(b) };

    expect_invalid_create(
        ctx,
        "without bucket",
        CreateBucketRequest { bucket: None },
        "bucket",
    )
    .await?;
    let mut no_metadata = bucket();
    no_metadata.metadata = None;
    expect_invalid_create(ctx, "without metadata", wrap(no_metadata), "metadata").await?;
    let mut no_spec = bucket();
    no_spec.spec = None;
    expect_invalid_create(ctx, "without spec", wrap(no_spec), "spec").await?;
    let unknown_class = format!("conformance-no-such-class-{}", &unknown_id()[..8]);
    for (case, class) in [
        ("with an unknown class", unknown_class.as_str()),
        ("with an empty class", ""),
    ] {
        let mut invalid = bucket();
        invalid.spec = Some(BucketSpec {
            class: class.to_string(),
        });
        expect_invalid_create(ctx, case, wrap(invalid), "class").await?;
    }

    // Upstream's ceph-provider answers InvalidArgument here; the poollet then never finishes
    // deleting (only NotFound means gone, iri-contract §3.1).
    let unknown = unknown_id();
    let result = Kind::Bucket.delete(ctx, &unknown).await;
    expect_code(result, Code::NotFound, "DeleteBucket of an unknown id")?;
    let listed = list(
        ctx,
        BucketFilter {
            id: unknown.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        listed.is_empty(),
        "ListBuckets with unknown id {unknown} returned {} buckets",
        listed.len()
    );
    Ok(())
}

async fn lifecycle(ctx: &mut Ctx) -> TestResult {
    let started = now_nanos();
    let class = class(ctx).await?;
    let mut request = request(ctx.labels(&[]), BTreeMap::new(), &class);
    // A client-supplied id must be ignored (iri-contract §2.1): the server owns ids.
    let supplied = format!("conformance-client-supplied-{}", &unknown_id()[..8]);
    if let Some(metadata) = request.bucket.as_mut().and_then(|b| b.metadata.as_mut()) {
        metadata.id = supplied.clone();
    }
    let created = create(ctx, request).await?;
    let bucket_id = id(&created).to_string();
    ensure!(
        bucket_id != supplied,
        "CreateBucket used the client-supplied metadata.id {supplied:?}; ids are assigned by the \
         server"
    );
    ensure!(
        !bucket_id.contains("://"),
        "bucket id {bucket_id:?} contains \"://\""
    );
    let metadata = created.metadata.clone().unwrap_or_default();
    check_created_at("CreateBucket", metadata.created_at, started)?;
    let initial = state(&created);
    ensure!(
        initial == BucketState::BucketPending as i32 || initial == BucketState::BucketAvailable as i32,
        "CreateBucket returned state {}, expected BUCKET_PENDING or BUCKET_AVAILABLE",
        state_name(initial)
    );

    must_get(ctx, &bucket_id).await?;
    let selector = ctx.selector();
    let by_labels = list(
        ctx,
        BucketFilter {
            label_selector: selector.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        by_labels.len() == 1 && id(&by_labels[0]) == bucket_id,
        "ListBuckets by the test's labels returned {:?}, expected [{bucket_id}]",
        by_labels.iter().map(id).collect::<Vec<_>>()
    );

    let available = wait_available(ctx, &bucket_id).await?;
    check_access(&available)?;

    Kind::Bucket.delete_and_wait(ctx, &bucket_id).await?;
    let again = Kind::Bucket.delete(ctx, &bucket_id).await;
    expect_code(again, Code::NotFound, "second DeleteBucket of a deleted bucket")?;
    let left = list(
        ctx,
        BucketFilter {
            label_selector: selector,
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        left.is_empty(),
        "ListBuckets by the test's labels still returns {:?} after deletion",
        left.iter().map(id).collect::<Vec<_>>()
    );
    Ok(())
}

async fn credentials_are_per_bucket(ctx: &mut Ctx) -> TestResult {
    let first = create_available(ctx, &[("conformance.iri.ironcore.dev/index", "0")]).await?;
    let second = create_available(ctx, &[("conformance.iri.ironcore.dev/index", "1")]).await?;
    let (a, b) = (check_access(&first)?, check_access(&second)?);
    // One bucket's credentials must not open another's bucket.
    ensure!(
        a.secret_data.get(ACCESS_KEY_ID) != b.secret_data.get(ACCESS_KEY_ID),
        "buckets {} and {} share the access key id {:?}",
        id(&first),
        id(&second),
        String::from_utf8_lossy(
            a.secret_data
                .get(ACCESS_KEY_ID)
                .map(Vec::as_slice)
                .unwrap_or_default()
        )
    );
    // The poollet copies them into a Secret on every reconcile: they must not change per read.
    let again = must_get(ctx, id(&first)).await?;
    let again = check_access(&again)?;
    if let Some(diff) = map_diff(&a.secret_data, &again.secret_data) {
        return Err(TestError::fail(format!(
            "bucket {}: status.access.secret_data changed between two reads: {diff}",
            id(&first)
        )));
    }
    ensure!(
        again.endpoint == a.endpoint,
        "bucket {}: status.access.endpoint changed between two reads: {:?}, then {:?}",
        id(&first),
        a.endpoint,
        again.endpoint
    );
    Ok(())
}

async fn metadata_round_trip(ctx: &mut Ctx) -> TestResult {
    const UID: &str = "bucketpoollet.ironcore.dev/bucket-uid";
    let hex = unknown_id();
    let uid = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    let labels = ctx.labels(&[
        (UID, &uid),
        ("bucketpoollet.ironcore.dev/bucket-namespace", "conformance"),
        ("bucketpoollet.ironcore.dev/bucket-name", "metadata-round-trip"),
        ("downward-api.bucketpoollet.ironcore.dev/root-bucket-uid", &uid),
        ("conformance.iri.ironcore.dev/empty", ""),
        ("conformance.iri.ironcore.dev/unicode", "grüße, 世界 ✓"),
    ]);
    let annotations = BTreeMap::from([
        (
            "conformance.iri.ironcore.dev/json".to_string(),
            r#"{"a":{"b":[1,2,3]},"quote":"\"x\""}"#.to_string(),
        ),
        (
            "conformance.iri.ironcore.dev/multiline".to_string(),
            "line 1\nline 2\n\ttabbed\r\n".to_string(),
        ),
        ("conformance.iri.ironcore.dev/empty".to_string(), String::new()),
    ]);
    let class = class(ctx).await?;
    let spec = BucketSpec { class: class.clone() };
    let created = create(ctx, request(labels.clone(), annotations.clone(), &class)).await?;
    let bucket_id = id(&created).to_string();
    let check = |what: &str, bucket: &Bucket| -> TestResult {
        check_metadata_round_trip(
            what,
            &bucket.metadata.clone().unwrap_or_default(),
            &labels,
            &annotations,
        )?;
        ensure!(
            bucket.spec.as_ref() == Some(&spec),
            "{what}: spec not returned as sent: sent {spec:?}, got {:?}",
            bucket.spec
        );
        Ok(())
    };
    check("CreateBucket", &created)?;
    check("ListBuckets", &must_get(ctx, &bucket_id).await?)?;

    // How the bucketpoollet finds its bucket (iri-contract §3.1).
    let mut selector = ctx.selector();
    selector.insert(UID.to_string(), uid.clone());
    let found = list(
        ctx,
        BucketFilter {
            label_selector: selector,
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        found.len() == 1 && id(&found[0]) == bucket_id,
        "ListBuckets by {UID}={uid} returned {:?}, expected [{bucket_id}]",
        found.iter().map(id).collect::<Vec<_>>()
    );
    let available = wait_available(ctx, &bucket_id).await?;
    check("ListBuckets once available", &available)
}

async fn repeated_delete(ctx: &mut Ctx) -> TestResult {
    crate::suite::common::repeated_delete(Kind::Bucket, ctx).await
}

async fn label_selector(ctx: &mut Ctx) -> TestResult {
    crate::suite::common::label_selector(Kind::Bucket, ctx).await
}

async fn events(ctx: &mut Ctx) -> TestResult {
    crate::suite::common::events(Kind::Bucket, ctx).await
}

async fn parallel_create_delete(ctx: &mut Ctx) -> TestResult {
    crate::suite::common::parallel_create_delete(Kind::Bucket, ctx).await
}

async fn restart(ctx: &mut Ctx) -> TestResult {
    crate::suite::common::restart(Kind::Bucket, ctx).await
}

async fn objects_round_trip(ctx: &mut Ctx) -> TestResult {
    dataplane::objects_round_trip(ctx).await
}

async fn credentials_open_one_bucket(ctx: &mut Ctx) -> TestResult {
    dataplane::credentials_open_one_bucket(ctx).await
}

async fn delete_revokes_credentials(ctx: &mut Ctx) -> TestResult {
    dataplane::delete_revokes_credentials(ctx).await
}

async fn list_at_scale(ctx: &mut Ctx) -> TestResult {
    crate::suite::common::list_at_scale(Kind::Bucket, ctx).await
}

#[cfg(test)]
mod tests {
    use super::parse_endpoint;

    #[test]
    fn endpoints_that_parse() {
        let ok = |e: &str| parse_endpoint(e).unwrap_or_else(|err| panic!("{e}: {err}"));
        assert_eq!(
            ok("http://127.0.0.1:9000"),
            ("http".into(), "127.0.0.1".into(), 9000)
        );
        assert_eq!(
            ok("https://s3.example.com/"),
            ("https".into(), "s3.example.com".into(), 443)
        );
        assert_eq!(ok("HTTP://minio"), ("http".into(), "minio".into(), 80));
        assert_eq!(ok("http://[::1]:9000/x?y"), ("http".into(), "::1".into(), 9000));
        assert_eq!(ok("https://[fd00::1]"), ("https".into(), "fd00::1".into(), 443));
    }

    #[test]
    fn endpoints_that_do_not() {
        for bad in [
            "",
            "127.0.0.1:9000",
            // Upstream's ceph-provider: virtual-hosted name without a scheme.
            "bucket-abc.rgw.example.com",
            "s3://bucket",
            "http://",
            "http://:9000",
            "http://host:0",
            "http://host:65536",
            "http://host:port",
            "http://user:pw@host",
            "http://[::1",
            "http://[::1]x",
            "http://[host]:1",
            "http://ho st",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} parsed");
        }
    }
}
