// SPDX-License-Identifier: Apache-2.0
//! Shared helpers of the integration tests: serve a runtime on a socket in a temporary
//! directory and connect the generated client to it, exactly as a real client would.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::{collections::BTreeMap, path::Path, time::Duration};

use iri_api::{
    Endpoint, bucket::v1alpha1::bucket_runtime_client::BucketRuntimeClient,
    machine::v1alpha1::machine_runtime_client::MachineRuntimeClient, meta::v1alpha1::ObjectMetadata,
    volume::v1alpha1::volume_runtime_client::VolumeRuntimeClient,
};
use iri_testing::{
    BucketConfig, BucketRuntime, MachineConfig, MachineRuntime, Served, VolumeConfig, VolumeRuntime,
};
use tonic::{Code, Status, transport::Channel};

/// A served runtime, its client, and the directory holding the socket.
pub struct Harness<R, C> {
    pub runtime: R,
    pub client: C,
    pub served: Served,
    pub dir: tempfile::TempDir,
}

pub async fn connect(path: &Path) -> Channel {
    Endpoint::Unix(path.to_path_buf())
        .connect(Duration::from_secs(2))
        .await
        .expect("connect to the served runtime")
}

pub async fn machine(config: MachineConfig) -> Harness<MachineRuntime, MachineRuntimeClient<Channel>> {
    let dir = tempfile::tempdir().unwrap();
    let runtime = MachineRuntime::new(config);
    let served = iri_testing::serve_machine_unix(runtime.clone(), &dir.path().join("machine.sock"))
        .await
        .unwrap();
    let client = iri_api::endpoint::clients::machine(connect(&served.path).await);
    Harness {
        runtime,
        client,
        served,
        dir,
    }
}

pub async fn volume(config: VolumeConfig) -> Harness<VolumeRuntime, VolumeRuntimeClient<Channel>> {
    let dir = tempfile::tempdir().unwrap();
    let runtime = VolumeRuntime::new(config);
    let served = iri_testing::serve_volume_unix(runtime.clone(), &dir.path().join("volume.sock"))
        .await
        .unwrap();
    let client = iri_api::endpoint::clients::volume(connect(&served.path).await);
    Harness {
        runtime,
        client,
        served,
        dir,
    }
}

pub async fn bucket(config: BucketConfig) -> Harness<BucketRuntime, BucketRuntimeClient<Channel>> {
    let dir = tempfile::tempdir().unwrap();
    let runtime = BucketRuntime::new(config);
    let served = iri_testing::serve_bucket_unix(runtime.clone(), &dir.path().join("bucket.sock"))
        .await
        .unwrap();
    let client = iri_api::endpoint::clients::bucket(connect(&served.path).await);
    Harness {
        runtime,
        client,
        served,
        dir,
    }
}

/// Asserts that `result` failed with `code` and a message containing every one of `parts`.
#[track_caller]
pub fn assert_err<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, parts: &[&str]) {
    let status = result.expect_err("expected an error");
    assert_eq!(status.code(), code, "wrong code; message: {}", status.message());
    for part in parts {
        assert!(
            status.message().contains(part),
            "message {:?} does not mention {part:?}",
            status.message()
        );
    }
}

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Metadata as a poollet sends it: labels and annotations, plus junk in the server-owned
/// fields that the server must ignore.
pub fn meta(labels: &[(&str, &str)]) -> ObjectMetadata {
    ObjectMetadata {
        id: "client-chosen-id".into(),
        labels: map(labels),
        annotations: map(&[("note", "kept verbatim"), ("json", r#"{"a": {"b": [1, 2]}}"#)]),
        generation: 42,
        created_at: 7,
        deleted_at: 9,
    }
}

/// Checks the server-owned metadata fields of a freshly created object.
#[track_caller]
pub fn assert_fresh_metadata(got: &ObjectMetadata, sent: &ObjectMetadata) {
    assert!(iri_runtime::id::is_valid_id(&got.id), "id {:?}", got.id);
    assert_ne!(got.id, sent.id);
    assert_eq!(got.generation, 1);
    assert_eq!(got.deleted_at, 0);
    let now = iri_runtime::id::now_nanos();
    assert!(
        got.created_at > now - 60_000_000_000 && got.created_at <= now,
        "created_at in ns"
    );
    assert_eq!(got.labels, sent.labels);
    assert_eq!(got.annotations, sent.annotations);
}

/// The labels of a map with more entries than allowed, a too long key, a too long value and an
/// empty key, each paired with the words the error must contain.
pub fn bad_maps() -> Vec<(BTreeMap<String, String>, &'static str)> {
    let too_many: BTreeMap<String, String> = (0..=iri_testing::MAX_METADATA_ENTRIES)
        .map(|i| (format!("k{i}"), String::new()))
        .collect();
    vec![
        (too_many, "entries"),
        (
            map(&[(&"k".repeat(iri_testing::MAX_METADATA_KEY_BYTES + 1), "v")]),
            "bytes",
        ),
        (
            BTreeMap::from([(
                "k".to_string(),
                "v".repeat(iri_testing::MAX_METADATA_VALUE_BYTES + 1),
            )]),
            "bytes",
        ),
        (map(&[("", "v")]), "empty"),
    ]
}
