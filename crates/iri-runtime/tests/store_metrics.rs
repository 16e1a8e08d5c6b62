// SPDX-License-Identifier: Apache-2.0
//! The store's gauges follow its contents.

use iri_api::{machine::v1alpha1::Machine, volume::v1alpha1::Volume};
use iri_runtime::{Store, StoreOptions, metrics::Metrics};

#[test]
fn store_gauges_follow_the_contents() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store.db"), StoreOptions::default()).unwrap();
    let metrics = Metrics::new();
    store.register_metrics(&metrics);
    let a = store.create(Machine::default()).unwrap();
    store.create(Machine::default()).unwrap();
    store.create(Volume::default()).unwrap();
    let text = metrics.encode();
    assert!(text.contains(r#"iri_store_objects{kind="machine"} 2"#), "{text}");
    assert!(text.contains(r#"iri_store_objects{kind="volume"} 1"#), "{text}");
    assert!(text.contains("iri_store_revision 3"), "{text}");
    store
        .remove::<Machine>(a.object.metadata.as_ref().unwrap().id.as_str())
        .unwrap();
    let text = metrics.encode();
    assert!(text.contains(r#"iri_store_objects{kind="machine"} 1"#), "{text}");
    assert!(text.contains("iri_store_revision 4"), "{text}");
}
