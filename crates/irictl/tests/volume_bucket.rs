// SPDX-License-Identifier: Apache-2.0
//! `irictl volume ...` and `irictl bucket ...` against the reference runtimes over real sockets.

mod support;

use iri_testing::{BucketRuntime, VolumeRuntime};
use serde_json::{Value, json};
use support::{Session, created_id, example, example_text};

const GI: i64 = 1 << 30;

#[tokio::test(flavor = "multi_thread")]
async fn volume_session() {
    let runtime = VolumeRuntime::default();
    let s = Session::volume(runtime.clone()).await;

    let status = s.ok(&["volume", "get", "status"]).await;
    let header: Vec<&str> = status.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["Name", "TPS", "IOPS", "Quantity"]);
    assert!(status.contains("fast") && status.contains("slow"), "{status}");
    let version = s.json(&["volume", "get", "version"]).await;
    assert_eq!(version["runtime_name"], json!(iri_testing::VOLUME_RUNTIME_NAME));

    // create
    let id = created_id(
        &s.ok(&[
            "volume",
            "create",
            "volume",
            "-f",
            &example("volume-from-image.yaml"),
        ])
        .await,
        "volume",
    );
    let table = s.ok(&["volume", "get", "volumes"]).await;
    let lines: Vec<&str> = table.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["ID", "Class", "Image", "State", "Age"]);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row.len(), 5, "every column has a cell: {table}");
    assert_eq!(
        row[..3],
        [
            id.as_str(),
            "fast",
            "ghcr.io/ironcore-dev/os-images/gardenlinux:1877.0"
        ]
    );
    assert!(row[3].starts_with("VOLUME_"), "{table}");

    // snapshot of it (the sample's placeholder replaced)
    let snapshot_input = example_text("volume-snapshot.yaml").replace("VOLUME_ID", &id);
    let out = s
        .run_with_stdin(&["volume", "create", "volsnap", "-f", "-"], Some(&snapshot_input))
        .await
        .ok();
    let snapshot = created_id(&out, "volume snapshot");
    let table = s.ok(&["volume", "get", "volumesnapshot"]).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "VolumeID", "State", "Age"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..2], [snapshot.as_str(), id.as_str()]);
    let snapshots = s.json(&["volume", "get", "volsnaps", "-l", "app=web"]).await;
    assert_eq!(snapshots[0]["spec"]["volume_id"], json!(id));
    assert_eq!(
        s.ok(&["volume", "get", "volsnap", &snapshot, "-q"]).await,
        format!("{snapshot}\n")
    );

    // expand, with a quantity
    let out = s.ok(&["volume", "expand", "volume", &id, "--size", "20Gi"]).await;
    assert_eq!(out, format!("Volume {id} expanded to 20Gi\n"));
    let volume = s.json(&["volume", "get", "volume", &id]).await;
    assert_eq!(volume["spec"]["resources"]["storage_bytes"], json!(20 * GI));
    let wide = s.ok(&["volume", "get", "vol", "-o", "wide"]).await;
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "Class", "Image", "State", "Age", "Size", "Driver", "Handle", "Labels"
        ]
    );
    assert!(wide.contains("20Gi") && wide.contains("app=web"), "{wide}");
    let line = s
        .run(&["volume", "expand", "volume", "nonexistent", "--size", "1Gi"])
        .await
        .error();
    assert!(line.starts_with("error: ExpandVolume: NotFound: "), "{line}");

    // list: label filter, quiet, yaml
    assert_eq!(
        s.ok(&["volume", "get", "volume", "-l", "app=web", "-q"]).await,
        format!("{id}\n")
    );
    let yaml = s.ok(&["volume", "get", "volume", "-o", "yaml"]).await;
    let from_yaml: Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(from_yaml[0]["spec"]["class"], json!("fast"));

    // output fed back as input
    let document = s.ok(&["volume", "get", "volume", &id, "-o", "yaml"]).await;
    let copy = s
        .run_with_stdin(
            &["volume", "create", "volume", "-f", "-", "-o", "json"],
            Some(&document),
        )
        .await
        .json();
    let original = s.json(&["volume", "get", "volume", &id]).await;
    assert_eq!(copy["spec"], original["spec"]);
    let copy_id = copy["metadata"]["id"].as_str().unwrap().to_string();

    // events
    let events = s.ok(&["volume", "get", "events"]).await;
    assert!(events.starts_with("InvolvedVolumeName"), "{events}");
    assert!(events.contains(&id), "{events}");

    // delete
    let out = s
        .ok(&["volume", "delete", "volumesnapshot", &snapshot, &snapshot])
        .await;
    assert_eq!(
        out,
        format!("Volume snapshot {snapshot} deleted\nVolume snapshot {snapshot} not found\n")
    );
    let out = s.ok(&["volume", "delete", "vols", &id, &copy_id]).await;
    assert_eq!(out, format!("Volume {id} deleted\nVolume {copy_id} deleted\n"));
    assert_eq!(s.ok(&["volume", "get", "volume"]).await, "No resources found\n");
    assert!(runtime.volumes().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_input_errors() {
    let s = Session::volume(VolumeRuntime::default()).await;
    let line = s
        .run(&[
            "volume",
            "create",
            "volumesnapshot",
            "-f",
            &example("volume-snapshot.yaml"),
        ])
        .await
        .error();
    assert!(
        line.starts_with("error: CreateVolumeSnapshot: NotFound: "),
        "placeholder id: {line}"
    );
    let path = s.file(
        "v.yaml",
        "spec:\n  class: medium\n  resources: {storage_bytes: 1}\n",
    );
    let line = s.run(&["volume", "create", "volume", "-f", &path]).await.error();
    assert!(
        line.starts_with("error: CreateVolume: InvalidArgument: invalid volume.spec.class"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bucket_session() {
    let runtime = BucketRuntime::default();
    let s = Session::bucket(runtime.clone()).await;

    let classes = s.ok(&["bucket", "get", "bucketclass"]).await;
    let header: Vec<&str> = classes.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["Name", "TPS", "IOPS"]);
    assert_eq!(
        s.ok(&["bucket", "get", "bucketclasses", "-q"]).await,
        "fast\nslow\n"
    );
    let version = s.ok(&["bucket", "get", "version"]).await;
    assert!(version.contains(iri_testing::BUCKET_RUNTIME_NAME), "{version}");

    let id = created_id(
        &s.ok(&["bucket", "create", "bucket", "-f", &example("bucket.yaml")])
            .await,
        "bucket",
    );
    let table = s.ok(&["bucket", "get", "buckets"]).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "Class", "State", "Age"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..2], [id.as_str(), "fast"]);
    let wide = s.ok(&["bucket", "get", "bucket", "-o", "wide"]).await;
    assert!(wide.lines().next().unwrap().contains("Endpoint"), "{wide}");
    assert!(wide.contains("http://127.0.0.1:9000"), "{wide}");

    let bucket = s.json(&["bucket", "get", "bucket", &id]).await;
    assert_eq!(bucket["spec"]["class"], json!("fast"));
    assert_eq!(
        bucket["status"]["state"],
        json!(1),
        "BUCKET_AVAILABLE as a number"
    );
    let secret = bucket["status"]["access"]["secret_data"].as_object().unwrap();
    assert!(!secret.is_empty(), "bytes map rendered as base64 strings");

    // output as input; the status (with enum numbers and base64 secrets) decodes too
    let document = s.ok(&["bucket", "get", "bucket", &id, "-o", "json"]).await;
    let copy = s
        .run_with_stdin(&["bucket", "create", "bucket", "-f", "-", "-q"], Some(&document))
        .await
        .ok();
    let copy = copy.trim_end().to_string();
    assert_eq!(
        s.json(&["bucket", "get", "bucket", &copy]).await["spec"],
        bucket["spec"]
    );

    let events = s.ok(&["bucket", "get", "events"]).await;
    assert!(events.starts_with("InvolvedBucketName"), "{events}");

    let path = s.file("b.yaml", "spec: {class: gold}\n");
    let line = s.run(&["bucket", "create", "bucket", "-f", &path]).await.error();
    assert!(
        line.starts_with("error: CreateBucket: InvalidArgument: invalid bucket.spec.class"),
        "{line}"
    );

    let out = s
        .ok(&["bucket", "delete", "bucket", &id, &copy, "nonexistent"])
        .await;
    assert_eq!(
        out,
        format!("Bucket {id} deleted\nBucket {copy} deleted\nBucket nonexistent not found\n")
    );
    assert_eq!(s.ok(&["bucket", "get", "bucket"]).await, "No resources found\n");
    assert!(runtime.buckets().is_empty());
}
