// SPDX-License-Identifier: Apache-2.0
//! End-to-end tests of the real `iri-bucket-provider` binary: started on a temporary data
//! directory, driven over gRPC like a bucketpoollet would, and used through its embedded S3
//! server by boto3 (`tests/s3_client.py`) with nothing but what `BucketAccess` returns. They
//! need python3 with boto3 (`pip install boto3`).

mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use iri_api::bucket::v1alpha1::{
    BucketFilter, BucketState, DeleteBucketRequest, EventFilter, ListBucketClassesRequest,
    ListBucketsRequest, ListEventsRequest, VersionRequest,
};
use tonic::Code;

const SECRET_KEYS: [&str; 6] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "BUCKET_NAME",
    "BUCKET_HOST",
    "BUCKET_PORT",
    "BUCKET_REGION",
];

async fn delete_and_wait(client: &mut Client, id: &str) {
    let deadline = Instant::now() + READY;
    loop {
        match client
            .delete_bucket(DeleteBucketRequest {
                bucket_id: id.to_string(),
            })
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => break,
            Err(status) => panic!("DeleteBucket: {status}"),
        }
        assert!(Instant::now() < deadline, "bucket {id} not deleted in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(get(client, id).await.is_none(), "NotFound but still listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_contract_and_access() {
    let dir = tempfile::tempdir().unwrap();
    let mut provider = Provider::start(dir.path(), "");
    let mut client = provider.client().await;

    let version = client
        .version(VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.runtime_name, "iri-bucket-provider");
    let classes = client
        .list_bucket_classes(ListBucketClassesRequest {})
        .await
        .unwrap()
        .into_inner()
        .bucket_classes;
    let names: Vec<&str> = classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["standard", "fast"]);
    assert!(
        classes
            .iter()
            .all(|c| c.capabilities.is_some_and(|c| c.tps > 0 && c.iops > 0))
    );

    // Validation: the field is named, the code is InvalidArgument.
    for (request, field) in [
        (
            iri_api::bucket::v1alpha1::CreateBucketRequest { bucket: None },
            "bucket",
        ),
        (request("", &[]), "bucket.spec.class"),
        (request("gold", &[]), "bucket.spec.class"),
    ] {
        let status = client.create_bucket(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status}");
        assert!(status.message().contains(field), "{status}");
    }
    let mut no_meta = request("standard", &[]);
    no_meta.bucket.as_mut().unwrap().metadata = None;
    let status = client.create_bucket(no_meta).await.unwrap_err();
    assert!(status.code() == Code::InvalidArgument && status.message().contains("bucket.metadata"));
    for unknown in ["", "nope", "../../etc", &"a".repeat(63)] {
        let status = client
            .delete_bucket(DeleteBucketRequest {
                bucket_id: unknown.to_string(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{unknown:?}: {status}");
    }

    // Create: PENDING, then AVAILABLE with a usable endpoint and the whole access contract.
    let created = client
        .create_bucket(request("standard", &[("app", "test")]))
        .await
        .unwrap()
        .into_inner()
        .bucket
        .unwrap();
    assert_eq!(
        created.status.as_ref().unwrap().state,
        BucketState::BucketPending as i32
    );
    let bucket_id = id(&created);
    let available = wait_available(&mut client, &bucket_id).await;
    let access = available.status.as_ref().unwrap().access.clone().unwrap();
    assert_eq!(access.endpoint, format!("http://{}", provider.s3_address));
    let keys: Vec<&str> = access.secret_data.keys().map(String::as_str).collect();
    let mut expected = SECRET_KEYS.to_vec();
    expected.sort();
    assert_eq!(keys, expected);
    let text = |k: &str| String::from_utf8(access.secret_data[k].clone()).unwrap();
    assert_eq!(text("BUCKET_NAME"), bucket_id);
    assert_eq!(
        format!("{}:{}", text("BUCKET_HOST"), text("BUCKET_PORT")),
        provider.s3_address
    );
    assert_eq!(text("BUCKET_REGION"), "us-east-1");
    assert_eq!(text("AWS_ACCESS_KEY_ID").len(), 20);
    assert_eq!(text("AWS_SECRET_ACCESS_KEY").len(), 40);
    let by_label = client
        .list_buckets(ListBucketsRequest {
            filter: Some(BucketFilter {
                label_selector: BTreeMap::from([("app".into(), "test".into())]),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .buckets;
    assert_eq!(by_label.len(), 1);
    assert_eq!(by_label[0], available, "List returns the same bucket every time");

    // Secrets are stored 0600 in a 0700 directory and never logged.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&provider.data_dir), 0o700);
    assert_eq!(mode(&provider.data_dir.join("store.db")), 0o600);
    let credentials = provider
        .data_dir
        .join("embedded/buckets")
        .join(&bucket_id)
        .join("credentials.json");
    assert_eq!(mode(&credentials), 0o600);
    assert_eq!(mode(&provider.socket), 0o600);

    // Delete: OK while deleting, then NotFound; the bucket's directory is gone.
    delete_and_wait(&mut client, &bucket_id).await;
    assert!(!credentials.exists());
    let events = client
        .list_events(ListEventsRequest {
            filter: Some(EventFilter {
                label_selector: BTreeMap::from([("app".into(), "test".into())]),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let reasons: Vec<String> = events
        .iter()
        .map(|e| e.spec.as_ref().unwrap().reason.clone())
        .collect();
    assert_eq!(reasons, ["Created", "Available", "Deleting", "Deleted"]);
    provider.stop();
    let logs = provider.logs();
    assert!(
        !logs.contains(&text("AWS_SECRET_ACCESS_KEY")),
        "secret in the logs:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn boto3_uses_buckets_with_their_own_credentials_only() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let config = format!(
        "[server]\nmetrics_address = \"127.0.0.1:{metrics_port}\"\n\n[s3]\nvirtual_host_domain = \"s3.test\"\n"
    );
    let mut provider = Provider::start(dir.path(), &config);
    let mut client = provider.client().await;
    let first = create_available(&mut client, "standard").await;
    let second = create_available(&mut client, "standard").await;
    let (a, b) = (access_json(&first), access_json(&second));

    let started = Instant::now();
    run_script(
        "objects",
        serde_json::json!({ "access": a, "virtual_host_domain": "s3.test" }),
    )
    .await;
    println!("objects scenario: {:?}", started.elapsed());

    run_script(
        "put",
        serde_json::json!({ "access": b, "objects": { "secret/b": "b's data" } }),
    )
    .await;
    run_script(
        "refused",
        serde_json::json!({ "access": a, "other_bucket": id(&second), "other_key": "secret/b" }),
    )
    .await;
    run_script(
        "refused",
        serde_json::json!({ "access": b, "other_bucket": id(&first), "other_key": "docs/hello.txt" }),
    )
    .await;

    // After DeleteBucket: the credentials stop working, the data is gone, the other bucket
    // is untouched.
    delete_and_wait(&mut client, &id(&first)).await;
    run_script(
        "revoked",
        serde_json::json!({ "access": a, "key": "docs/hello.txt" }),
    )
    .await;
    assert!(
        !provider
            .data_dir
            .join("embedded/buckets")
            .join(id(&first))
            .exists()
    );
    assert_eq!(
        std::fs::read_dir(provider.data_dir.join("embedded/trash"))
            .unwrap()
            .count(),
        0,
        "nothing of the deleted bucket is left"
    );
    run_script(
        "get",
        serde_json::json!({ "access": b, "objects": { "secret/b": "b's data" } }),
    )
    .await;

    let logs = provider.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    // The client retries 5xx answers; none may have happened.
    let metrics = scrape(metrics_port);
    let errors = server_errors(&metrics);
    assert!(
        errors.is_empty(),
        "the S3 server failed requests: {errors:?}\n{logs}"
    );
    assert!(
        metrics.contains("iri_s3_requests{operation=\"PutObject\",status=\"200\"}"),
        "{metrics}"
    );
}

/// `iri_s3_requests` samples with a server-side failure: 500, 502, 504 (not 501
/// NotImplemented nor 503 SlowDown, which are answers, not failures).
fn server_errors(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("iri_s3_requests{"))
        .filter(|l| ["\"500\"", "\"502\"", "\"504\""].iter().any(|s| l.contains(s)))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn class_tps_limit_answers_slowdown() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let config = format!(
        "[server]\nmetrics_address = \"127.0.0.1:{metrics_port}\"\n\n[[classes]]\nname = \"slow\"\ntps = 3\n\
         iops = 3\n\n[[classes]]\nname = \"open\"\ntps = 0\niops = 0\n\n\
         [[classes]]\nname = \"data\"\ntps = 0\niops = 2\n"
    );
    let config = config.as_str();
    let mut provider = Provider::start(dir.path(), config);
    let mut client = provider.client().await;
    let slow = create_available(&mut client, "slow").await;
    let out = run_script("slowdown", serde_json::json!({ "access": access_json(&slow) })).await;
    let counts: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let (ok, refused) = (
        counts["ok"].as_u64().unwrap(),
        counts["slowdown"].as_u64().unwrap(),
    );
    let seconds = counts["seconds"].as_f64().unwrap();
    println!("tps 3 for {seconds:.2} s: {ok} admitted, {refused} SlowDown");
    // A full bucket of 3 plus at most 3 per second refilled (one extra for timing slack).
    let most = 3 + (3.0 * seconds).ceil() as u64 + 1;
    assert!(
        (3..=most).contains(&ok),
        "{ok} requests passed a 3 tps limit in {seconds:.2} s"
    );
    assert!(refused > 0, "no SlowDown");

    let open = create_available(&mut client, "open").await;
    let out = run_script("slowdown", serde_json::json!({ "access": access_json(&open) })).await;
    let counts: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(counts["slowdown"], 0, "an unlimited class was limited: {counts}");

    // iops limits the requests that move object data only.
    let data = access_json(&create_available(&mut client, "data").await);
    let out = run_script("slowdown", serde_json::json!({ "access": data })).await;
    let counts: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(counts["slowdown"], 0, "iops limited HeadBucket: {counts}");
    let out = run_script(
        "slowdown",
        serde_json::json!({ "access": data, "operation": "get" }),
    )
    .await;
    let counts: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let (gets, seconds) = (
        counts["ok"].as_u64().unwrap(),
        counts["seconds"].as_f64().unwrap(),
    );
    println!(
        "iops 2 for {seconds:.2} s: {gets} GETs admitted, {} SlowDown",
        counts["slowdown"]
    );
    assert!(
        counts["slowdown"].as_u64().unwrap() > 0,
        "no SlowDown for GETs over iops"
    );
    // The PUT of the object took one token; 2 burst + 2 per second (+1 slack).
    assert!(
        gets <= 2 + (2.0 * seconds).ceil() as u64 + 1,
        "{gets} GETs passed iops 2"
    );

    // S3 request metrics by operation and status.
    let metrics = scrape(metrics_port);
    let count = |status: u16| -> u64 {
        let prefix = format!("iri_s3_requests{{operation=\"HeadBucket\",status=\"{status}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(count(503) >= refused, "SlowDown not counted:\n{metrics}");
    assert!(count(200) >= ok, "successes not counted:\n{metrics}");
}

/// GET /metrics over plain HTTP/1.0.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_during_uploads_loses_no_acknowledged_object() {
    let dir = tempfile::tempdir().unwrap();
    let mut provider = Provider::start(dir.path(), "");
    let mut client = provider.client().await;
    let bucket = create_available(&mut client, "fast").await;
    let access = access_json(&bucket);

    let mut writers: Vec<_> = (0..3)
        .map(|w| spawn_script("writer", &serde_json::json!({ "access": access, "writer": w })))
        .collect();
    // Collect acknowledgements as they come.
    let acked = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let readers: Vec<_> = writers
        .iter_mut()
        .map(|w| {
            let stdout = w.stdout.take().unwrap();
            let acked = acked.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                        && v.get("key").is_some()
                    {
                        acked.lock().unwrap().push(v);
                    }
                }
            })
        })
        .collect();
    // Kill in the middle of the stream of uploads: once enough were acknowledged, while the
    // writers keep going (2 MiB objects are in flight most of the time).
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 30 {
        assert!(
            Instant::now() < deadline,
            "writers made no progress:\n{}",
            provider.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    provider.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for w in &mut writers {
        let _ = w.kill();
        let _ = w.wait();
    }
    for r in readers {
        r.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked
            .iter()
            .any(|a| a["key"].as_str().is_some_and(|k| k.contains("/mp-"))),
        "no multipart upload completed before the kill"
    );

    provider.spawn();
    let mut client = provider.client().await;
    let after = wait_available(&mut client, &id(&bucket)).await;
    assert_eq!(
        access_json(&after),
        access,
        "credentials changed across the crash"
    );
    let out = run_script("verify", serde_json::json!({ "access": access, "acked": acked })).await;
    println!("after kill -9: {}", out.lines().next().unwrap_or(""));
    let tmp = provider
        .data_dir
        .join("embedded/buckets")
        .join(id(&bucket))
        .join("tmp");
    assert_eq!(
        std::fs::read_dir(tmp).unwrap().count(),
        0,
        "half-written files left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_follows_a_bucket_directory_removed_behind_our_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut provider = Provider::start(dir.path(), "resync_seconds = 1\n");
    let mut client = provider.client().await;
    let bucket = create_available(&mut client, "standard").await;
    let before = access_json(&bucket);
    std::fs::remove_dir_all(provider.data_dir.join("embedded/buckets").join(id(&bucket))).unwrap();

    // The resync notices, recreates the bucket, and the status reports the new credentials.
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let now = wait_available(&mut client, &id(&bucket)).await;
        if access_json(&now) != before {
            break access_json(&now);
        }
        assert!(
            Instant::now() < deadline,
            "status still reports the removed bucket's access"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(
        after["secret_data"]["AWS_ACCESS_KEY_ID"],
        before["secret_data"]["AWS_ACCESS_KEY_ID"]
    );
    run_script(
        "put",
        serde_json::json!({ "access": after, "objects": { "k": "v" } }),
    )
    .await;
    run_script("revoked", serde_json::json!({ "access": before })).await;
    let events = client
        .list_events(ListEventsRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events.iter().any(|e| e
            .spec
            .as_ref()
            .is_some_and(|s| s.reason == "AccessChanged" && s.r#type == "Warning")),
        "no AccessChanged warning"
    );
}

#[test]
fn a_busy_s3_port_fails_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_iri-bucket-provider"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--address")
        .arg(dir.path().join("bucket.sock"))
        .arg("--s3-address")
        .arg(busy.local_addr().unwrap().to_string())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot listen for S3"), "{stderr}");
    assert!(
        !dir.path().join("bucket.sock").exists(),
        "IRI served although S3 cannot be"
    );
}
