// SPDX-License-Identifier: Apache-2.0
//! The reference BucketRuntime, driven over a real unix socket with the generated client.

mod common;

use std::time::Duration;

use common::{assert_err, assert_fresh_metadata, bad_maps, map, meta};
use iri_api::bucket::v1alpha1::{
    Bucket, BucketFilter, BucketSpec, BucketState, CreateBucketRequest, DeleteBucketRequest, EventFilter,
    ListBucketClassesRequest, ListBucketsRequest, ListEventsRequest, VersionRequest,
    bucket_runtime_client::BucketRuntimeClient,
};
use iri_testing::BucketConfig;
use tonic::{Code, Status, transport::Channel};

type Client = BucketRuntimeClient<Channel>;

fn bucket(labels: &[(&str, &str)], class: &str) -> Bucket {
    Bucket {
        metadata: Some(meta(labels)),
        spec: Some(BucketSpec { class: class.into() }),
        status: None,
    }
}

async fn try_create(client: &Client, bucket: Option<Bucket>) -> Result<Bucket, Status> {
    let mut c = client.clone();
    c.create_bucket(CreateBucketRequest { bucket })
        .await
        .map(|r| r.into_inner().bucket.unwrap())
}

async fn list(client: &Client, filter: Option<BucketFilter>) -> Vec<Bucket> {
    let mut c = client.clone();
    c.list_buckets(ListBucketsRequest { filter })
        .await
        .unwrap()
        .into_inner()
        .buckets
}

async fn delete(client: &Client, bucket_id: &str) -> Result<(), Status> {
    let mut c = client.clone();
    c.delete_bucket(DeleteBucketRequest {
        bucket_id: bucket_id.into(),
    })
    .await
    .map(|_| ())
}

fn id(bucket: &Bucket) -> String {
    bucket.metadata.as_ref().unwrap().id.clone()
}

#[tokio::test]
async fn version_and_classes() {
    let mut h = common::bucket(BucketConfig::default()).await;
    let v = h
        .client
        .version(VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "iri-reference-bucket");
    assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));
    let classes = h
        .client
        .list_bucket_classes(ListBucketClassesRequest {})
        .await
        .unwrap()
        .into_inner()
        .bucket_classes;
    let names: Vec<_> = classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["fast", "slow"]);
    for class in classes {
        let caps = class.capabilities.expect("capabilities always set");
        assert!(caps.tps > 0 && caps.iops > 0);
    }
}

#[tokio::test]
async fn create_becomes_available_with_fresh_credentials() {
    let h = common::bucket(BucketConfig {
        endpoint: "https://s3.example.test:8443".into(),
        ..Default::default()
    })
    .await;
    let sent = bucket(&[("bucketpoollet.ironcore.dev/bucket-uid", "u1")], "fast");
    let created = try_create(&h.client, Some(sent.clone())).await.unwrap();
    assert_fresh_metadata(
        created.metadata.as_ref().unwrap(),
        sent.metadata.as_ref().unwrap(),
    );
    assert_eq!(created.spec, sent.spec);
    let st = created.status.as_ref().unwrap();
    assert_eq!(st.state, BucketState::BucketPending as i32);
    assert!(st.access.is_none());

    let other = try_create(&h.client, Some(bucket(&[], "slow"))).await.unwrap();
    let listed = list(&h.client, None).await;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].metadata, created.metadata);
    assert_eq!(listed[0].spec, sent.spec);
    let access = |b: &Bucket| {
        let st = b.status.clone().unwrap();
        assert_eq!(st.state, BucketState::BucketAvailable as i32);
        st.access.expect("access once available")
    };
    let a = access(&listed[0]);
    assert_eq!(a.endpoint, "https://s3.example.test:8443");
    let text = |k: &str| String::from_utf8(a.secret_data[k].clone()).unwrap();
    assert_eq!(text("BUCKET_NAME"), id(&created));
    assert_eq!(text("BUCKET_HOST"), "s3.example.test");
    assert_eq!(text("BUCKET_PORT"), "8443");
    assert_eq!(text("BUCKET_REGION"), "us-east-1");
    assert_eq!(text("AWS_ACCESS_KEY_ID").len(), 20);
    assert_eq!(text("AWS_SECRET_ACCESS_KEY").len(), 40);
    let b = access(&listed[1]);
    assert_ne!(
        a.secret_data["AWS_ACCESS_KEY_ID"],
        b.secret_data["AWS_ACCESS_KEY_ID"]
    );
    assert_ne!(
        a.secret_data["AWS_SECRET_ACCESS_KEY"],
        b.secret_data["AWS_SECRET_ACCESS_KEY"]
    );
    assert_eq!(id(&listed[1]), id(&other));
    // Stable across reads.
    assert_eq!(access(&list(&h.client, None).await[0]), a);
    assert_eq!(h.runtime.buckets(), list(&h.client, None).await);
}

#[tokio::test]
async fn create_rejects_malformed_requests_naming_the_field() {
    let h = common::bucket(BucketConfig::default()).await;
    assert_err(
        try_create(&h.client, None).await,
        Code::InvalidArgument,
        &["invalid bucket: must be set"],
    );
    let mut b = bucket(&[], "fast");
    b.spec = None;
    assert_err(
        try_create(&h.client, Some(b)).await,
        Code::InvalidArgument,
        &["invalid bucket.spec: must be set"],
    );
    let mut b = bucket(&[], "fast");
    b.metadata = None;
    assert_err(
        try_create(&h.client, Some(b)).await,
        Code::InvalidArgument,
        &["bucket.metadata"],
    );
    assert_err(
        try_create(&h.client, Some(bucket(&[], ""))).await,
        Code::InvalidArgument,
        &["bucket.spec.class", "must be set"],
    );
    assert_err(
        try_create(&h.client, Some(bucket(&[], "glacier"))).await,
        Code::InvalidArgument,
        &["bucket.spec.class", "glacier"],
    );
    for (bad, words) in bad_maps() {
        let mut b = bucket(&[], "fast");
        b.metadata.as_mut().unwrap().labels = bad.clone();
        assert_err(
            try_create(&h.client, Some(b)).await,
            Code::InvalidArgument,
            &["bucket.metadata.labels", words],
        );
        let mut b = bucket(&[], "fast");
        b.metadata.as_mut().unwrap().annotations = bad;
        assert_err(
            try_create(&h.client, Some(b)).await,
            Code::InvalidArgument,
            &["bucket.metadata.annotations", words],
        );
    }
    assert!(h.runtime.buckets().is_empty());
}

#[tokio::test]
async fn list_filters_delete_and_events() {
    let h = common::bucket(BucketConfig::default()).await;
    let a = try_create(&h.client, Some(bucket(&[("app", "a")], "fast")))
        .await
        .unwrap();
    let b = try_create(&h.client, Some(bucket(&[("app", "b")], "fast")))
        .await
        .unwrap();
    let ids = |bs: Vec<Bucket>| bs.iter().map(id).collect::<Vec<_>>();
    let by = |id: &str, labels: &[(&str, &str)]| {
        Some(BucketFilter {
            id: id.into(),
            label_selector: map(labels),
        })
    };
    assert_eq!(ids(list(&h.client, None).await), vec![id(&a), id(&b)]);
    assert_eq!(ids(list(&h.client, by(&id(&b), &[])).await), vec![id(&b)]);
    assert_eq!(ids(list(&h.client, by("", &[("app", "a")])).await), vec![id(&a)]);
    assert!(list(&h.client, by("unknown", &[])).await.is_empty());
    assert!(list(&h.client, by(&id(&a), &[("app", "b")])).await.is_empty());

    assert_err(
        delete(&h.client, "unknown").await,
        Code::NotFound,
        &["bucket", "unknown"],
    );
    delete(&h.client, &id(&a)).await.unwrap();
    assert_err(delete(&h.client, &id(&a)).await, Code::NotFound, &[&id(&a)]);
    assert_eq!(ids(list(&h.client, None).await), vec![id(&b)]);

    let events = |filter| {
        let mut c = h.client.clone();
        async move {
            c.list_events(ListEventsRequest { filter })
                .await
                .unwrap()
                .into_inner()
                .events
        }
    };
    let for_a = events(Some(EventFilter {
        label_selector: map(&[("app", "a")]),
        ..Default::default()
    }))
    .await;
    let reasons: Vec<_> = for_a
        .iter()
        .map(|e| e.spec.as_ref().unwrap().reason.as_str())
        .collect();
    assert_eq!(reasons, ["Created", "StateChanged", "Deleted"]);
    let by_id = events(Some(EventFilter {
        id: id(&b),
        ..Default::default()
    }))
    .await;
    assert_eq!(by_id.len(), 2);
    assert!(
        by_id
            .iter()
            .all(|e| e.spec.as_ref().unwrap().involved_object_meta.as_ref().unwrap().id == id(&b))
    );
}

#[tokio::test]
async fn ready_delay_keeps_buckets_pending() {
    let h = common::bucket(BucketConfig {
        ready_delay: Duration::from_millis(1000),
        ..Default::default()
    })
    .await;
    try_create(&h.client, Some(bucket(&[], "fast"))).await.unwrap();
    let st = list(&h.client, None).await[0].status.clone().unwrap();
    assert_eq!(st.state, BucketState::BucketPending as i32);
    assert!(st.access.is_none());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let st = list(&h.client, None).await[0].status.clone().unwrap();
    assert_eq!(st.state, BucketState::BucketAvailable as i32);
    assert!(st.access.is_some());
}
