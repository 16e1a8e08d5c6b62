// SPDX-License-Identifier: Apache-2.0
//! Data-plane checks: the access an available bucket reports really opens that bucket, and
//! only that bucket, and stops working when the bucket is deleted.
//!
//! The S3 client is boto3 (the most widely used S3 client library), driven through `python3`
//! with the probe script `s3_probe.py` embedded in this binary. Why not a Rust S3 crate: every
//! provider's tests build this crate, and the Rust S3 SDKs are heavy to compile; boto3 is also
//! what the bucket provider's own tests use, so both prove the same client works. Without
//! python3 or boto3 the checks are Skipped with that reason, never Passed.

use std::process::Stdio;

use iri_api::bucket::v1alpha1::Bucket;
use tokio::{io::AsyncWriteExt, process::Command};

use super::{check_access, create_available, id};
use crate::{
    harness::{Ctx, TestError, TestResult},
    suite::common::Kind,
};

const PROBE: &str = include_str!("s3_probe.py");

/// The access of `bucket` as the probe reads it: endpoint and secret_data as strings.
fn access_json(bucket: &Bucket) -> Result<serde_json::Value, TestError> {
    let access = check_access(bucket)?;
    let mut secret_data = serde_json::Map::new();
    for (key, value) in &access.secret_data {
        let value = String::from_utf8(value.clone()).map_err(|_| {
            TestError::fail(format!(
                "secret_data[{key:?}] of bucket {} is not UTF-8",
                id(bucket)
            ))
        })?;
        secret_data.insert(key.clone(), serde_json::Value::String(value));
    }
    Ok(serde_json::json!({ "endpoint": access.endpoint, "secret_data": secret_data }))
}

/// Runs one probe check with `input` (which carries the check name and the access).
async fn probe(input: serde_json::Value) -> TestResult {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(PROBE)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| TestError::skip(format!("python3 is needed for the bucket data-plane checks: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.to_string().as_bytes())
            .await
            .map_err(|e| TestError::fail(format!("writing to the S3 probe: {e}")))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| TestError::fail(format!("running the S3 probe: {e}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or("").trim();
    match (output.status.code(), last) {
        (Some(0), "PASS") => Ok(()),
        (Some(3), line) => Err(TestError::skip(
            line.strip_prefix("SKIP: ").unwrap_or(line).to_string(),
        )),
        (_, line) if line.starts_with("FAIL: ") => Err(TestError::fail(line["FAIL: ".len()..].to_string())),
        (code, _) => Err(TestError::fail(format!(
            "the S3 probe ended with {code:?}: {}{}",
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))),
    }
}

fn with(check: &str, access: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    let mut input = serde_json::json!({ "check": check, "access": access });
    if let (Some(input), Some(extra)) = (input.as_object_mut(), extra.as_object()) {
        input.extend(extra.clone());
    }
    input
}

/// PUT, GET, HEAD, LIST and DELETE of an object with the bucket's own access.
pub(crate) async fn objects_round_trip(ctx: &mut Ctx) -> TestResult {
    let bucket = create_available(ctx, &[]).await?;
    probe(with("round_trip", access_json(&bucket)?, serde_json::json!({}))).await
}

/// One bucket's credentials are refused on another bucket (GET, PUT, LIST).
pub(crate) async fn credentials_open_one_bucket(ctx: &mut Ctx) -> TestResult {
    let first = create_available(ctx, &[("conformance.iri.ironcore.dev/index", "0")]).await?;
    let second = create_available(ctx, &[("conformance.iri.ironcore.dev/index", "1")]).await?;
    let (a, b) = (access_json(&first)?, access_json(&second)?);
    let key = "iri-conformance/private";
    probe(with("put", b.clone(), serde_json::json!({ "key": key }))).await?;
    let other = b["secret_data"]["BUCKET_NAME"].clone();
    probe(with(
        "refused",
        a,
        serde_json::json!({ "other": other, "key": key }),
    ))
    .await
}

/// After DeleteBucket (waited until NotFound), the bucket's credentials no longer work.
pub(crate) async fn delete_revokes_credentials(ctx: &mut Ctx) -> TestResult {
    let bucket = create_available(ctx, &[]).await?;
    let access = access_json(&bucket)?;
    let key = "iri-conformance/before-delete";
    probe(with("put", access.clone(), serde_json::json!({ "key": key }))).await?;
    Kind::Bucket.delete_and_wait(ctx, id(&bucket)).await?;
    probe(with("revoked", access, serde_json::json!({ "key": key }))).await
}
