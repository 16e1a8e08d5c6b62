// SPDX-License-Identifier: Apache-2.0
//! List filters with upstream's exact semantics (iri-contract §2.1, §2.5).

use std::collections::BTreeMap;

/// Equality-only, AND label selector: every `(k, v)` of the selector must be present in `labels`
/// with exactly that value (an empty value still requires the key). An empty selector matches
/// everything. This is Kubernetes' `labels.SelectorFromSet(..).Matches(..)`.
pub fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// An object filter as the `*Filter` messages carry it. `None` (absent filter) matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectFilter {
    /// Exact id match when non-empty.
    pub id: String,
    /// Label selector, see [`labels_match`].
    pub label_selector: BTreeMap<String, String>,
}

impl ObjectFilter {
    /// Whether an object with `id` and `labels` passes. Like upstream's reference fakes, both
    /// the id and the selector apply when both are set.
    pub fn matches(&self, id: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.id.is_empty() || self.id == id) && labels_match(&self.label_selector, labels)
    }
}

/// An event filter as the `EventFilter` messages carry it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Id of the involved object when non-empty (upstream brokers ignore this; we honour it).
    pub id: String,
    /// Label selector over the involved object's labels.
    pub label_selector: BTreeMap<String, String>,
    /// Window start, Unix seconds, inclusive.
    pub from: i64,
    /// Window end, Unix seconds, inclusive.
    pub to: i64,
}

impl EventFilter {
    /// Whether an event at `time` (Unix seconds) about an object with `id` and `labels` passes.
    /// The time window applies only when both bounds are > 0, as upstream does.
    pub fn matches(&self, id: &str, labels: &BTreeMap<String, String>, time: i64) -> bool {
        let in_window = !(self.from > 0 && self.to > 0) || (self.from <= time && time <= self.to);
        (self.id.is_empty() || self.id == id) && labels_match(&self.label_selector, labels) && in_window
    }
}

macro_rules! impl_object_filter_from {
    ($($ty:path),* $(,)?) => {$(
        impl From<$ty> for ObjectFilter {
            fn from(f: $ty) -> Self {
                ObjectFilter { id: f.id, label_selector: f.label_selector }
            }
        }
    )*};
}

impl_object_filter_from!(
    iri_api::machine::v1alpha1::MachineFilter,
    iri_api::volume::v1alpha1::VolumeFilter,
    iri_api::volume::v1alpha1::VolumeSnapshotFilter,
    iri_api::bucket::v1alpha1::BucketFilter,
);

macro_rules! impl_event_filter_from {
    ($($ty:path),* $(,)?) => {$(
        impl From<$ty> for EventFilter {
            fn from(f: $ty) -> Self {
                EventFilter {
                    id: f.id,
                    label_selector: f.label_selector,
                    from: f.events_from_time,
                    to: f.events_to_time,
                }
            }
        }
    )*};
}

impl_event_filter_from!(
    iri_api::machine::v1alpha1::EventFilter,
    iri_api::volume::v1alpha1::EventFilter,
    iri_api::bucket::v1alpha1::EventFilter,
);

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selector_is_equality_and() {
        let labels = map(&[("a", "1"), ("b", ""), ("c", "3")]);
        assert!(labels_match(&map(&[]), &labels));
        assert!(labels_match(&map(&[("a", "1"), ("c", "3")]), &labels));
        assert!(labels_match(&map(&[("b", "")]), &labels));
        assert!(!labels_match(&map(&[("a", "1"), ("c", "4")]), &labels));
        assert!(!labels_match(&map(&[("d", "")]), &labels));
        assert!(!labels_match(&map(&[("a", "")]), &labels));
    }

    #[test]
    fn id_and_selector_both_apply() {
        let f = ObjectFilter {
            id: "x".into(),
            label_selector: map(&[("a", "1")]),
        };
        assert!(f.matches("x", &map(&[("a", "1")])));
        assert!(!f.matches("y", &map(&[("a", "1")])));
        assert!(!f.matches("x", &map(&[])));
        assert!(ObjectFilter::default().matches("anything", &map(&[])));
    }

    #[test]
    fn event_window_needs_both_bounds() {
        let labels = map(&[]);
        let only_from = EventFilter {
            from: 100,
            ..Default::default()
        };
        assert!(only_from.matches("x", &labels, 5));
        let window = EventFilter {
            from: 100,
            to: 200,
            ..Default::default()
        };
        assert!(window.matches("x", &labels, 100));
        assert!(window.matches("x", &labels, 200));
        assert!(!window.matches("x", &labels, 99));
        assert!(!window.matches("x", &labels, 201));
        let by_id = EventFilter {
            id: "x".into(),
            ..Default::default()
        };
        assert!(!by_id.matches("y", &labels, 0));
    }
}
