// SPDX-License-Identifier: Apache-2.0
//! The event store against real SQLite files (iri-contract §2.5).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use iri_api::event::v1alpha1::Event;
use iri_api::meta::v1alpha1::ObjectMetadata;
use iri_runtime::EventFilter;
use iri_runtime::id::now_secs;
use iri_runtime::store::{EventType, Store, StoreOptions};
use prost::Message;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn object(id: &str, label_pairs: &[(&str, &str)]) -> ObjectMetadata {
    ObjectMetadata {
        id: id.to_string(),
        labels: labels(label_pairs),
        annotations: labels(&[("note", id)]),
        generation: 3,
        created_at: 1_700_000_000_000_000_000,
        deleted_at: 0,
    }
}

fn reasons(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.spec.as_ref().unwrap().reason.clone())
        .collect()
}

fn record(store: &Store, meta: &ObjectMetadata, reason: &str) {
    store
        .record_event(meta, EventType::Normal, reason, "Act", "msg")
        .unwrap();
}

/// Rewrites the time of every stored event (the row and the encoded event alike), as if it had
/// been recorded at `time(reason)`. The store must be closed.
fn set_event_times(path: &Path, time: impl Fn(&str) -> i64) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let rows: Vec<(i64, Vec<u8>)> = conn
        .prepare("SELECT seq, data FROM events")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (seq, data) in rows {
        let mut event = Event::decode(data.as_slice()).unwrap();
        let spec = event.spec.as_mut().unwrap();
        let event_time = time(&spec.reason);
        spec.event_time = event_time;
        conn.execute(
            "UPDATE events SET event_time = ?1, data = ?2 WHERE seq = ?3",
            rusqlite::params![event_time, event.encode_to_vec(), seq],
        )
        .unwrap();
    }
}

fn stored_event_rows(path: &Path) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn event_carries_a_copy_of_the_metadata_and_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db"), StoreOptions::default()).unwrap();
    let meta = object("m1", &[("uid", "u1")]);
    let before = now_secs();
    store
        .record_event(
            &meta,
            EventType::Warning,
            "FailedPull",
            "Pulling",
            "image not found",
        )
        .unwrap();
    let after = now_secs();

    let events = store.list_events(&EventFilter::default()).unwrap();
    assert_eq!(events.len(), 1);
    let spec = events[0].spec.as_ref().unwrap();
    assert_eq!(spec.involved_object_meta.as_ref(), Some(&meta));
    assert_eq!(spec.r#type, "Warning");
    assert_eq!(spec.reason, "FailedPull");
    assert_eq!(spec.action, "Pulling");
    assert_eq!(spec.message, "image not found");
    assert!(
        before <= spec.event_time && spec.event_time <= after,
        "seconds, not nanoseconds"
    );
    assert_eq!(EventType::Normal.as_str(), "Normal");
    assert_eq!(EventType::Warning.to_string(), "Warning");
    assert_eq!(store.revision(), 0, "events are not object writes");
}

#[test]
fn events_filter_by_id_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db"), StoreOptions::default()).unwrap();
    let a = object("a", &[("uid", "1"), ("pool", "x")]);
    let b = object("b", &[("uid", "2"), ("pool", "x")]);
    record(&store, &a, "a1");
    record(&store, &b, "b1");
    record(&store, &a, "a2");

    let list = |f: EventFilter| reasons(&store.list_events(&f).unwrap());
    assert_eq!(list(EventFilter::default()), ["a1", "b1", "a2"]);
    assert_eq!(
        list(EventFilter {
            id: "a".into(),
            ..Default::default()
        }),
        ["a1", "a2"]
    );
    assert_eq!(
        list(EventFilter {
            id: "zzz".into(),
            ..Default::default()
        }),
        Vec::<String>::new()
    );
    assert_eq!(
        list(EventFilter {
            label_selector: labels(&[("uid", "2")]),
            ..Default::default()
        }),
        ["b1"]
    );
    assert_eq!(
        list(EventFilter {
            label_selector: labels(&[("pool", "x")]),
            ..Default::default()
        }),
        ["a1", "b1", "a2"]
    );
    assert_eq!(
        list(EventFilter {
            id: "b".into(),
            label_selector: labels(&[("uid", "1")]),
            ..Default::default()
        }),
        Vec::<String>::new()
    );
}

#[test]
fn time_window_applies_only_with_both_bounds_and_is_inclusive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    let now = now_secs();
    let m = object("m", &[]);
    for reason in ["t-300", "t-200", "t-100", "t-0"] {
        record(&store, &m, reason);
    }
    drop(store);
    // Recorded in shuffled time order, to show listing is oldest first by event time.
    set_event_times(&path, |reason| match reason {
        "t-300" => now - 200,
        "t-200" => now - 300,
        "t-100" => now - 100,
        _ => now,
    });
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    let list = |from: i64, to: i64| {
        reasons(
            &store
                .list_events(&EventFilter {
                    from,
                    to,
                    ..Default::default()
                })
                .unwrap(),
        )
    };

    assert_eq!(list(0, 0), ["t-200", "t-300", "t-100", "t-0"], "oldest first");
    assert_eq!(
        list(now - 300, now - 200),
        ["t-200", "t-300"],
        "inclusive on both ends"
    );
    assert_eq!(list(now - 299, now - 201), Vec::<String>::new());
    assert_eq!(list(now - 100, now + 100), ["t-100", "t-0"]);
    // A single bound is ignored, as upstream does.
    assert_eq!(list(now - 100, 0), ["t-200", "t-300", "t-100", "t-0"]);
    assert_eq!(list(0, now - 250), ["t-200", "t-300", "t-100", "t-0"]);
    assert_eq!(list(-5, now - 250), ["t-200", "t-300", "t-100", "t-0"]);
    // Consecutive poll windows share their boundary second.
    assert_eq!(list(now - 200, now - 100), ["t-300", "t-100"]);
    assert_eq!(list(now - 100, now), ["t-100", "t-0"]);
}

#[test]
fn events_are_pruned_by_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let options = StoreOptions {
        max_events: 5,
        ..Default::default()
    };
    let store = Store::open(&path, options.clone()).unwrap();
    let m = object("m", &[]);
    for i in 0..12 {
        record(&store, &m, &format!("e{i}"));
    }
    assert_eq!(
        reasons(&store.list_events(&EventFilter::default()).unwrap()),
        ["e7", "e8", "e9", "e10", "e11"]
    );
    drop(store);
    assert_eq!(
        stored_event_rows(&path),
        5,
        "pruned from the file, not just hidden"
    );

    // A lower limit applies at the next open.
    let store = Store::open(
        &path,
        StoreOptions {
            max_events: 3,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        reasons(&store.list_events(&EventFilter::default()).unwrap()),
        ["e9", "e10", "e11"]
    );
    record(&store, &m, "e12");
    assert_eq!(
        reasons(&store.list_events(&EventFilter::default()).unwrap()),
        ["e10", "e11", "e12"]
    );
    drop(store);

    // 0 = no count limit.
    let store = Store::open(
        &path,
        StoreOptions {
            max_events: 0,
            ..Default::default()
        },
    )
    .unwrap();
    for i in 13..20 {
        record(&store, &m, &format!("e{i}"));
    }
    assert_eq!(store.list_events(&EventFilter::default()).unwrap().len(), 10);
}

#[test]
fn events_are_pruned_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    let m = object("m", &[]);
    record(&store, &m, "ancient");
    record(&store, &m, "yesterday");
    record(&store, &m, "recent");
    drop(store);
    let now = now_secs();
    set_event_times(&path, |reason| match reason {
        "ancient" => now - 3 * 86_400,
        "yesterday" => now - 86_400 - 60,
        _ => now - 3600,
    });

    // No age limit: everything is kept.
    let store = Store::open(
        &path,
        StoreOptions {
            max_event_age: Duration::ZERO,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(store.list_events(&EventFilter::default()).unwrap().len(), 3);
    drop(store);
    assert_eq!(stored_event_rows(&path), 3);

    // Default 24h: the two old ones go at open.
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    assert_eq!(
        reasons(&store.list_events(&EventFilter::default()).unwrap()),
        ["recent"]
    );
    drop(store);
    assert_eq!(stored_event_rows(&path), 1);

    // While running: old events stop being listed and are pruned by the next insert.
    let store = Store::open(
        &path,
        StoreOptions {
            max_event_age: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(store.list_events(&EventFilter::default()).unwrap().len(), 0);
    record(&store, &m, "first");
    assert_eq!(
        reasons(&store.list_events(&EventFilter::default()).unwrap()),
        ["first"]
    );
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(
        store.list_events(&EventFilter::default()).unwrap().len(),
        0,
        "too old to list"
    );
    record(&store, &m, "second");
    assert_eq!(
        reasons(&store.list_events(&EventFilter::default()).unwrap()),
        ["second"]
    );
    drop(store);
    assert_eq!(stored_event_rows(&path), 1);
}

#[test]
fn events_survive_reopen_and_outlive_their_object() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    let machine = store
        .create(iri_api::machine::v1alpha1::Machine {
            metadata: Some(object("ignored", &[("uid", "k8s-1")])),
            ..Default::default()
        })
        .unwrap();
    let meta = machine.object.metadata.clone().unwrap();
    record(&store, &meta, "Created");
    store
        .remove::<iri_api::machine::v1alpha1::Machine>(&meta.id)
        .unwrap();
    record(&store, &meta, "Removed");
    let events = store.list_events(&EventFilter::default()).unwrap();
    drop(store);

    let store = Store::open(&path, StoreOptions::default()).unwrap();
    assert_eq!(store.list_events(&EventFilter::default()).unwrap(), events);
    let by_uid = EventFilter {
        label_selector: labels(&[("uid", "k8s-1")]),
        ..Default::default()
    };
    assert_eq!(
        reasons(&store.list_events(&by_uid).unwrap()),
        ["Created", "Removed"]
    );
    // Numbering continues after the rows already there.
    record(&store, &meta, "Again");
    assert_eq!(
        reasons(&store.list_events(&by_uid).unwrap()),
        ["Created", "Removed", "Again"]
    );
}
