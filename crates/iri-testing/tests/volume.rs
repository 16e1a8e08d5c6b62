// SPDX-License-Identifier: Apache-2.0
//! The reference VolumeRuntime, driven over a real unix socket with the generated client.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{assert_err, assert_fresh_metadata, bad_maps, map, meta};
use iri_api::volume::v1alpha1::{
    CreateVolumeRequest, CreateVolumeSnapshotRequest, DeleteVolumeRequest, DeleteVolumeSnapshotRequest,
    EncryptionSpec, EventFilter, ExpandVolumeRequest, ImageDataSource, ListEventsRequest,
    ListVolumeSnapshotsRequest, ListVolumesRequest, SnapshotDataSource, StatusRequest, VersionRequest,
    Volume, VolumeDataSource, VolumeFilter, VolumeResources, VolumeSnapshot, VolumeSnapshotFilter,
    VolumeSnapshotSpec, VolumeSnapshotState, VolumeSpec, VolumeState,
    volume_runtime_client::VolumeRuntimeClient,
};
use iri_testing::VolumeConfig;
use prost::Message;
use tonic::{Code, Status, transport::Channel};

type Client = VolumeRuntimeClient<Channel>;

const GI: i64 = 1 << 30;
const TI: i64 = 1 << 40;

fn volume(labels: &[(&str, &str)], class: &str, size: i64) -> Volume {
    Volume {
        metadata: Some(meta(labels)),
        spec: Some(VolumeSpec {
            class: class.into(),
            resources: Some(VolumeResources { storage_bytes: size }),
            encryption: None,
            volume_data_source: None,
        }),
        status: None,
    }
}

fn snapshot_of(volume_id: &str, labels: &[(&str, &str)]) -> VolumeSnapshot {
    VolumeSnapshot {
        metadata: Some(meta(labels)),
        spec: Some(VolumeSnapshotSpec {
            volume_id: volume_id.into(),
        }),
        status: None,
    }
}

async fn try_create(client: &Client, volume: Option<Volume>) -> Result<Volume, Status> {
    let mut c = client.clone();
    c.create_volume(CreateVolumeRequest { volume })
        .await
        .map(|r| r.into_inner().volume.unwrap())
}

async fn create(client: &Client, volume: Volume) -> Volume {
    try_create(client, Some(volume)).await.unwrap()
}

async fn list(client: &Client, filter: Option<VolumeFilter>) -> Vec<Volume> {
    let mut c = client.clone();
    c.list_volumes(ListVolumesRequest { filter })
        .await
        .unwrap()
        .into_inner()
        .volumes
}

async fn get(client: &Client, id: &str) -> Volume {
    let mut found = list(
        client,
        Some(VolumeFilter {
            id: id.into(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(found.len(), 1);
    found.remove(0)
}

async fn try_snapshot(client: &Client, snapshot: Option<VolumeSnapshot>) -> Result<VolumeSnapshot, Status> {
    let mut c = client.clone();
    c.create_volume_snapshot(CreateVolumeSnapshotRequest {
        volume_snapshot: snapshot,
    })
    .await
    .map(|r| r.into_inner().volume_snapshot.unwrap())
}

async fn snapshots(client: &Client, filter: Option<VolumeSnapshotFilter>) -> Vec<VolumeSnapshot> {
    let mut c = client.clone();
    c.list_volume_snapshots(ListVolumeSnapshotsRequest { filter })
        .await
        .unwrap()
        .into_inner()
        .volume_snapshots
}

async fn expand(client: &Client, volume_id: &str, resources: Option<VolumeResources>) -> Result<(), Status> {
    let mut c = client.clone();
    c.expand_volume(ExpandVolumeRequest {
        volume_id: volume_id.into(),
        resources,
    })
    .await
    .map(|_| ())
}

async fn delete(client: &Client, volume_id: &str) -> Result<(), Status> {
    let mut c = client.clone();
    c.delete_volume(DeleteVolumeRequest {
        volume_id: volume_id.into(),
    })
    .await
    .map(|_| ())
}

async fn quantities(client: &Client) -> Vec<(String, i64, i64, i64)> {
    let mut c = client.clone();
    c.status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .volume_class_status
        .into_iter()
        .map(|s| {
            let class = s.volume_class.unwrap();
            let caps = class.capabilities.expect("capabilities always set");
            (class.name, caps.tps, caps.iops, s.quantity)
        })
        .collect()
}

fn id<T: iri_runtime::Object>(object: &T) -> String {
    object.id().to_string()
}

#[tokio::test]
async fn version_names_the_reference_runtime() {
    let mut h = common::volume(VolumeConfig::default()).await;
    let v = h
        .client
        .version(VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "iri-reference-volume");
    assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn create_round_trips_and_becomes_available() {
    let h = common::volume(VolumeConfig::default()).await;
    let mut sent = volume(
        &[("volumepoollet.ironcore.dev/volume-uid", "u1")],
        "fast",
        10 * GI,
    );
    let spec = sent.spec.as_mut().unwrap();
    spec.encryption = Some(EncryptionSpec {
        secret_data: BTreeMap::from([("encryptionKey".into(), vec![1, 2, 3, 0, 255])]),
    });
    spec.volume_data_source = Some(VolumeDataSource {
        image_data_source: Some(ImageDataSource {
            image: "ghcr.io/ironcore-dev/os-images/gardenlinux:1443".into(),
            architecture: "amd64".into(),
        }),
        snapshot_data_source: None,
    });
    let created = create(&h.client, sent.clone()).await;
    assert_fresh_metadata(
        created.metadata.as_ref().unwrap(),
        sent.metadata.as_ref().unwrap(),
    );
    assert_eq!(created.spec, sent.spec);
    let st = created.status.as_ref().unwrap();
    assert_eq!(st.state, VolumeState::VolumePending as i32);
    assert!(st.access.is_none(), "access only when available");
    assert_eq!(st.resources.as_ref().unwrap().storage_bytes, 10 * GI);

    let got = get(&h.client, &id(&created)).await;
    assert_eq!(got.metadata, created.metadata);
    assert_eq!(
        got.spec.as_ref().unwrap().encode_to_vec(),
        sent.spec.as_ref().unwrap().encode_to_vec()
    );
    let st = got.status.as_ref().unwrap();
    assert_eq!(st.state, VolumeState::VolumeAvailable as i32);
    let access = st.access.as_ref().unwrap();
    assert_eq!(access.driver, "nbd");
    assert_eq!(access.handle, id(&created));
    assert!(access.attributes["uri"].contains(&id(&created)));
    assert_eq!(st.resources.as_ref().unwrap().storage_bytes, 10 * GI);
    assert_eq!(h.runtime.volumes(), vec![got]);
}

#[tokio::test]
async fn create_rejects_malformed_requests_naming_the_field() {
    let h = common::volume(VolumeConfig::default()).await;
    assert_err(
        try_create(&h.client, None).await,
        Code::InvalidArgument,
        &["invalid volume: must be set"],
    );
    let mut v = volume(&[], "fast", GI);
    v.spec = None;
    assert_err(
        try_create(&h.client, Some(v)).await,
        Code::InvalidArgument,
        &["invalid volume.spec: must be set"],
    );
    let mut v = volume(&[], "fast", GI);
    v.metadata = None;
    assert_err(
        try_create(&h.client, Some(v)).await,
        Code::InvalidArgument,
        &["volume.metadata"],
    );
    assert_err(
        try_create(&h.client, Some(Volume::default())).await,
        Code::InvalidArgument,
        &["volume.spec"],
    );

    let with = |f: &dyn Fn(&mut VolumeSpec)| {
        let mut v = volume(&[], "fast", GI);
        f(v.spec.as_mut().unwrap());
        Some(v)
    };
    let image = || ImageDataSource {
        image: "img".into(),
        architecture: String::new(),
    };
    let cases: Vec<(Option<Volume>, &[&str])> = vec![
        (with(&|s| s.class.clear()), &["volume.spec.class", "must be set"]),
        (
            with(&|s| s.class = "gold".into()),
            &["volume.spec.class", "gold", "fast"],
        ),
        (
            with(&|s| s.resources = None),
            &["volume.spec.resources", "must be set"],
        ),
        (
            with(&|s| s.resources = Some(VolumeResources { storage_bytes: 0 })),
            &["volume.spec.resources.storage_bytes"],
        ),
        (
            with(&|s| s.resources = Some(VolumeResources { storage_bytes: -5 })),
            &["volume.spec.resources.storage_bytes"],
        ),
        (
            with(&|s| {
                s.volume_data_source = Some(VolumeDataSource {
                    image_data_source: Some(image()),
                    snapshot_data_source: Some(SnapshotDataSource {
                        snapshot_id: "x".into(),
                    }),
                })
            }),
            &["volume.spec.volume_data_source", "at most one"],
        ),
        (
            with(&|s| {
                s.volume_data_source = Some(VolumeDataSource {
                    image_data_source: Some(ImageDataSource::default()),
                    snapshot_data_source: None,
                })
            }),
            &["volume.spec.volume_data_source.image_data_source.image"],
        ),
        (
            with(&|s| {
                s.volume_data_source = Some(VolumeDataSource {
                    image_data_source: None,
                    snapshot_data_source: Some(SnapshotDataSource::default()),
                })
            }),
            &["volume.spec.volume_data_source.snapshot_data_source.snapshot_id"],
        ),
        (
            with(&|s| s.encryption = Some(EncryptionSpec::default())),
            &["volume.spec.encryption.secret_data"],
        ),
    ];
    for (v, parts) in cases {
        assert_err(try_create(&h.client, v).await, Code::InvalidArgument, parts);
    }
    for (bad, words) in bad_maps() {
        let mut v = volume(&[], "fast", GI);
        v.metadata.as_mut().unwrap().labels = bad.clone();
        assert_err(
            try_create(&h.client, Some(v)).await,
            Code::InvalidArgument,
            &["volume.metadata.labels", words],
        );
        let mut v = volume(&[], "fast", GI);
        v.metadata.as_mut().unwrap().annotations = bad;
        assert_err(
            try_create(&h.client, Some(v)).await,
            Code::InvalidArgument,
            &["volume.metadata.annotations", words],
        );
    }
    // A snapshot id that does not exist is NOT_FOUND (a dangling reference, documented choice).
    let from_ghost = with(&|s| {
        s.volume_data_source = Some(VolumeDataSource {
            image_data_source: None,
            snapshot_data_source: Some(SnapshotDataSource {
                snapshot_id: "ghost".into(),
            }),
        })
    });
    assert_err(
        try_create(&h.client, from_ghost).await,
        Code::NotFound,
        &["snapshot_id", "ghost"],
    );
    assert!(h.runtime.volumes().is_empty());
}

#[tokio::test]
async fn list_filters_and_delete() {
    let h = common::volume(VolumeConfig::default()).await;
    let a = create(&h.client, volume(&[("app", "a")], "fast", GI)).await;
    let b = create(&h.client, volume(&[("app", "b")], "slow", GI)).await;
    let ids = |vs: Vec<Volume>| vs.iter().map(id).collect::<Vec<_>>();
    let by = |id: &str, labels: &[(&str, &str)]| {
        Some(VolumeFilter {
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
        &["volume", "unknown"],
    );
    delete(&h.client, &id(&a)).await.unwrap();
    assert_eq!(ids(list(&h.client, None).await), vec![id(&b)]);
    assert_err(delete(&h.client, &id(&a)).await, Code::NotFound, &[&id(&a)]);
}

#[tokio::test]
async fn status_reports_bytes_left_and_capacity_is_enforced() {
    let h = common::volume(VolumeConfig::default()).await;
    let mi = 1 << 20;
    let initial = quantities(&h.client).await;
    assert_eq!(
        initial,
        vec![
            ("fast".into(), 100 * mi, 10_000, TI),
            ("slow".into(), 10 * mi, 1_000, TI)
        ]
    );
    let v = create(&h.client, volume(&[], "fast", 10 * GI)).await;
    let q = quantities(&h.client).await;
    assert_eq!(
        (q[0].3, q[1].3),
        (TI - 10 * GI, TI - 10 * GI),
        "one volume's worth of bytes"
    );
    delete(&h.client, &id(&v)).await.unwrap();
    assert_eq!(quantities(&h.client).await, initial);

    let big = create(&h.client, volume(&[], "slow", TI - GI)).await;
    assert_err(
        try_create(&h.client, Some(volume(&[], "fast", 2 * GI))).await,
        Code::ResourceExhausted,
        &["storage"],
    );
    create(&h.client, volume(&[], "fast", GI)).await;
    assert_eq!(quantities(&h.client).await[0].3, 0);
    assert_err(
        expand(&h.client, &id(&big), Some(VolumeResources { storage_bytes: TI })).await,
        Code::ResourceExhausted,
        &[],
    );
}

#[tokio::test]
async fn expand_grows_but_never_shrinks() {
    let h = common::volume(VolumeConfig::default()).await;
    let v = create(&h.client, volume(&[], "fast", 10 * GI)).await;
    let vid = id(&v);
    let res = |s| Some(VolumeResources { storage_bytes: s });
    assert_err(
        expand(&h.client, "unknown", res(20 * GI)).await,
        Code::NotFound,
        &["unknown"],
    );
    assert_err(
        expand(&h.client, &vid, None).await,
        Code::InvalidArgument,
        &["invalid resources: must be set"],
    );
    assert_err(
        expand(&h.client, &vid, res(0)).await,
        Code::InvalidArgument,
        &["resources.storage_bytes"],
    );
    assert_err(
        expand(&h.client, &vid, res(5 * GI)).await,
        Code::InvalidArgument,
        &["resources.storage_bytes", &vid, "cannot shrink"],
    );
    // Same size: nothing to do.
    expand(&h.client, &vid, res(10 * GI)).await.unwrap();
    assert_eq!(get(&h.client, &vid).await.metadata.unwrap().generation, 1);

    expand(&h.client, &vid, res(20 * GI)).await.unwrap();
    let got = get(&h.client, &vid).await;
    assert_eq!(got.metadata.as_ref().unwrap().generation, 2);
    assert_eq!(got.spec.as_ref().unwrap().resources, res(20 * GI));
    assert_eq!(got.status.as_ref().unwrap().resources, res(20 * GI));
    assert_eq!(quantities(&h.client).await[0].3, TI - 20 * GI);
}

#[tokio::test]
async fn ready_delay_keeps_objects_pending() {
    let h = common::volume(VolumeConfig {
        ready_delay: Duration::from_millis(1000),
        ..Default::default()
    })
    .await;
    let v = create(&h.client, volume(&[], "fast", GI)).await;
    let s = try_snapshot(&h.client, Some(snapshot_of(&id(&v), &[])))
        .await
        .unwrap();
    let got = get(&h.client, &id(&v)).await;
    assert_eq!(
        got.status.as_ref().unwrap().state,
        VolumeState::VolumePending as i32
    );
    assert_eq!(
        snapshots(&h.client, None).await[0].status.as_ref().unwrap().state,
        VolumeSnapshotState::VolumeSnapshotPending as i32
    );
    expand(
        &h.client,
        &id(&v),
        Some(VolumeResources {
            storage_bytes: 2 * GI,
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        get(&h.client, &id(&v))
            .await
            .status
            .unwrap()
            .resources
            .unwrap()
            .storage_bytes,
        GI,
        "the status size follows the backend"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let got = get(&h.client, &id(&v)).await;
    let st = got.status.unwrap();
    assert_eq!(st.state, VolumeState::VolumeAvailable as i32);
    assert_eq!(st.resources.unwrap().storage_bytes, 2 * GI);
    let listed = snapshots(&h.client, None).await;
    assert_eq!(id(&listed[0]), id(&s));
    assert_eq!(
        listed[0].status.as_ref().unwrap().state,
        VolumeSnapshotState::VolumeSnapshotReady as i32
    );
}

#[tokio::test]
async fn snapshots_outlive_their_volume_and_seed_new_ones() {
    let h = common::volume(VolumeConfig::default()).await;
    let v = create(&h.client, volume(&[], "fast", 10 * GI)).await;

    assert_err(
        try_snapshot(&h.client, None).await,
        Code::InvalidArgument,
        &["invalid volume_snapshot: must be set"],
    );
    let mut no_spec = snapshot_of(&id(&v), &[]);
    no_spec.spec = None;
    assert_err(
        try_snapshot(&h.client, Some(no_spec)).await,
        Code::InvalidArgument,
        &["invalid volume_snapshot.spec: must be set"],
    );
    assert_err(
        try_snapshot(&h.client, Some(snapshot_of("", &[]))).await,
        Code::InvalidArgument,
        &["volume_snapshot.spec.volume_id"],
    );
    assert_err(
        try_snapshot(&h.client, Some(snapshot_of("ghost", &[]))).await,
        Code::NotFound,
        &["volume_snapshot.spec.volume_id", "ghost"],
    );
    let mut no_meta = snapshot_of(&id(&v), &[]);
    no_meta.metadata = None;
    assert_err(
        try_snapshot(&h.client, Some(no_meta)).await,
        Code::InvalidArgument,
        &["volume_snapshot.metadata"],
    );

    let sent = snapshot_of(
        &id(&v),
        &[("volumepoollet.ironcore.dev/volume-snapshot-uid", "s1")],
    );
    let s = try_snapshot(&h.client, Some(sent.clone())).await.unwrap();
    assert_fresh_metadata(s.metadata.as_ref().unwrap(), sent.metadata.as_ref().unwrap());
    assert_eq!(s.spec, sent.spec, "spec echoed back");
    assert_eq!(
        s.status.as_ref().unwrap().state,
        VolumeSnapshotState::VolumeSnapshotPending as i32
    );
    let other = try_snapshot(&h.client, Some(snapshot_of(&id(&v), &[("x", "y")])))
        .await
        .unwrap();

    let listed = snapshots(&h.client, None).await;
    assert_eq!(
        listed.iter().map(id).collect::<Vec<_>>(),
        vec![id(&s), id(&other)]
    );
    assert_eq!(listed[0].spec, sent.spec);
    assert_eq!(listed[0].metadata, s.metadata);
    let st = listed[0].status.as_ref().unwrap();
    assert_eq!(
        (st.state, st.size),
        (VolumeSnapshotState::VolumeSnapshotReady as i32, 10 * GI)
    );
    let by = |id: &str, labels: &[(&str, &str)]| {
        Some(VolumeSnapshotFilter {
            id: id.into(),
            label_selector: map(labels),
        })
    };
    assert_eq!(snapshots(&h.client, by(&id(&other), &[])).await.len(), 1);
    assert_eq!(
        snapshots(&h.client, by("", &[("x", "y")])).await[0].metadata,
        other.metadata
    );
    assert!(snapshots(&h.client, by("unknown", &[])).await.is_empty());
    assert!(snapshots(&h.client, by(&id(&s), &[("x", "y")])).await.is_empty());
    assert_eq!(h.runtime.volume_snapshots(), listed);

    // Deleting the volume keeps its snapshots, which can still seed a volume.
    delete(&h.client, &id(&v)).await.unwrap();
    assert_eq!(snapshots(&h.client, None).await.len(), 2);
    let from_snapshot = |size| {
        let mut nv = volume(&[], "slow", size);
        nv.spec.as_mut().unwrap().volume_data_source = Some(VolumeDataSource {
            image_data_source: None,
            snapshot_data_source: Some(SnapshotDataSource { snapshot_id: id(&s) }),
        });
        nv
    };
    assert_err(
        try_create(&h.client, Some(from_snapshot(5 * GI))).await,
        Code::InvalidArgument,
        &["volume.spec.resources.storage_bytes", "snapshot"],
    );
    let restored = create(&h.client, from_snapshot(10 * GI)).await;
    assert_eq!(restored.spec, Some(from_snapshot(10 * GI).spec.unwrap()));

    let delete_snapshot = |sid: String| {
        let mut c = h.client.clone();
        async move {
            c.delete_volume_snapshot(DeleteVolumeSnapshotRequest {
                volume_snapshot_id: sid,
            })
            .await
        }
    };
    assert_err(
        delete_snapshot("unknown".into()).await,
        Code::NotFound,
        &["volume snapshot", "unknown"],
    );
    delete_snapshot(id(&s)).await.unwrap();
    assert_err(delete_snapshot(id(&s)).await, Code::NotFound, &[&id(&s)]);
    assert_eq!(snapshots(&h.client, None).await.len(), 1);
}

#[tokio::test]
async fn events_cover_volumes_and_snapshots() {
    let h = common::volume(VolumeConfig::default()).await;
    let v = create(&h.client, volume(&[("app", "v")], "fast", GI)).await;
    let s = try_snapshot(&h.client, Some(snapshot_of(&id(&v), &[("app", "s")])))
        .await
        .unwrap();
    expand(
        &h.client,
        &id(&v),
        Some(VolumeResources {
            storage_bytes: 2 * GI,
        }),
    )
    .await
    .unwrap();
    delete(&h.client, &id(&v)).await.unwrap();
    let events = |filter: Option<EventFilter>| {
        let mut c = h.client.clone();
        async move {
            c.list_events(ListEventsRequest { filter })
                .await
                .unwrap()
                .into_inner()
                .events
        }
    };
    let reasons = |es: Vec<iri_api::event::v1alpha1::Event>| {
        es.into_iter().map(|e| e.spec.unwrap().reason).collect::<Vec<_>>()
    };
    let for_v = events(Some(EventFilter {
        label_selector: map(&[("app", "v")]),
        ..Default::default()
    }))
    .await;
    assert_eq!(
        reasons(for_v.clone()),
        vec!["Created", "StateChanged", "Expanded", "Deleted"]
    );
    assert_eq!(
        for_v[2]
            .spec
            .as_ref()
            .unwrap()
            .involved_object_meta
            .as_ref()
            .unwrap()
            .generation,
        2
    );
    let for_s = events(Some(EventFilter {
        id: id(&s),
        ..Default::default()
    }))
    .await;
    assert_eq!(reasons(for_s), vec!["Created", "StateChanged"]);
    let now = iri_runtime::id::now_secs();
    let all = events(None).await;
    let windowed = events(Some(EventFilter {
        events_from_time: now - 60,
        events_to_time: now + 1,
        ..Default::default()
    }))
    .await;
    assert_eq!(windowed, all);
    assert!(
        events(Some(EventFilter {
            events_from_time: now + 100,
            events_to_time: now + 200,
            ..Default::default()
        }))
        .await
        .is_empty()
    );
}
