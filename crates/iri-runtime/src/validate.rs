// SPDX-License-Identifier: Apache-2.0
//! Request validation every runtime shares: the limits on client metadata and the rules for
//! server-owned metadata (iri-contract §2.1). Provider-specific spec checks stay with the
//! provider; what is here is what a reference runtime and a real provider must agree on.

use std::collections::BTreeMap;

use iri_api::meta::v1alpha1::ObjectMetadata;

use crate::{Error, Result};

/// Most entries a `labels` or `annotations` map may have.
pub const MAX_METADATA_ENTRIES: usize = 1024;
/// Longest label/annotation key in bytes: a Kubernetes qualified name (253-byte DNS prefix, `/`,
/// 63-byte name), which is what poollets put there.
pub const MAX_METADATA_KEY_BYTES: usize = 317;
/// Longest label/annotation value in bytes. Poollets store JSON (e.g. the NIC mapping annotation)
/// in values, so this is generous, but bounded so one object cannot eat the process.
pub const MAX_METADATA_VALUE_BYTES: usize = 64 * 1024;

/// Validates the client-controlled parts of `metadata` of a create request for `object` (the
/// request field name, e.g. `volume`) and returns only them: labels and annotations. Everything
/// else a client sends (id, generation, timestamps) is server-owned and dropped.
pub fn client_metadata(object: &str, metadata: Option<ObjectMetadata>) -> Result<ObjectMetadata> {
    let metadata = metadata.ok_or_else(|| Error::required(format!("{object}.metadata")))?;
    string_map(&format!("{object}.metadata.labels"), &metadata.labels)?;
    string_map(&format!("{object}.metadata.annotations"), &metadata.annotations)?;
    Ok(ObjectMetadata {
        labels: metadata.labels,
        annotations: metadata.annotations,
        ..Default::default()
    })
}

/// Checks a labels/annotations map (the request field `field`) against the limits above.
pub fn string_map(field: &str, map: &BTreeMap<String, String>) -> Result<()> {
    if map.len() > MAX_METADATA_ENTRIES {
        return Err(Error::invalid(
            field,
            format!(
                "has {} entries, at most {MAX_METADATA_ENTRIES} are allowed",
                map.len()
            ),
        ));
    }
    for (key, value) in map {
        if key.is_empty() {
            return Err(Error::invalid(field, "keys must not be empty"));
        }
        if key.len() > MAX_METADATA_KEY_BYTES {
            return Err(Error::invalid(
                field,
                format!(
                    "key {:?} is {} bytes long, at most {MAX_METADATA_KEY_BYTES} are allowed",
                    shorten(key),
                    key.len()
                ),
            ));
        }
        if value.len() > MAX_METADATA_VALUE_BYTES {
            return Err(Error::invalid(
                format!("{field}[{:?}]", shorten(key)),
                format!(
                    "value is {} bytes long, at most {MAX_METADATA_VALUE_BYTES} are allowed",
                    value.len()
                ),
            ));
        }
    }
    Ok(())
}

/// The first 40 characters of `s`, so that error messages quoting client input stay one
/// readable line.
pub fn shorten(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

/// Checks configured classes with limits (volume and bucket classes): at least one, unique
/// non-empty names, `tps` and `iops` >= 0. `classes` yields (name, tps, iops); `noun` names
/// the kind in the error ("volume", "bucket"). Errors name the setting (`classes[i]...`).
pub fn limit_classes<'a>(noun: &str, classes: impl IntoIterator<Item = (&'a str, i64, i64)>) -> Result<()> {
    let mut names = std::collections::BTreeSet::new();
    for (i, (name, tps, iops)) in classes.into_iter().enumerate() {
        if name.is_empty() {
            return Err(Error::required(format!("classes[{i}].name")));
        }
        if !names.insert(name) {
            return Err(Error::invalid(
                format!("classes[{i}].name"),
                format!("class {name:?} is configured twice"),
            ));
        }
        if tps < 0 || iops < 0 {
            return Err(Error::invalid(
                format!("classes[{i}]"),
                format!("tps {tps} and iops {iops} must be >= 0 (0 = unlimited)"),
            ));
        }
    }
    if names.is_empty() {
        return Err(Error::invalid(
            "classes",
            format!("at least one {noun} class is needed"),
        ));
    }
    Ok(())
}

/// Checks the reconciler settings every provider has: `workers` and `resync_seconds` (the
/// period of the full resync), each at least 1. Errors name the setting.
pub fn reconcile_settings(workers: usize, resync_seconds: u64) -> Result<()> {
    if workers == 0 {
        return Err(Error::invalid("workers", "must be at least 1"));
    }
    if resync_seconds == 0 {
        return Err(Error::invalid("resync_seconds", "must be at least 1"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_labels_and_annotations_and_drops_server_fields() {
        let sent = ObjectMetadata {
            id: "client-id".into(),
            generation: 9,
            created_at: 1,
            deleted_at: 2,
            labels: BTreeMap::from([("a".into(), "1".into())]),
            annotations: BTreeMap::from([("b".into(), "2".into())]),
        };
        let kept = client_metadata("volume", Some(sent.clone())).unwrap();
        assert_eq!(kept.labels, sent.labels);
        assert_eq!(kept.annotations, sent.annotations);
        assert_eq!(
            (
                kept.id.as_str(),
                kept.generation,
                kept.created_at,
                kept.deleted_at
            ),
            ("", 0, 0, 0)
        );
        let err = client_metadata("volume", None).unwrap_err();
        assert_eq!(err.to_string(), "invalid volume.metadata: must be set");
    }

    #[test]
    fn enforces_the_limits_naming_the_field() {
        let too_many: BTreeMap<String, String> = (0..=MAX_METADATA_ENTRIES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(
            string_map("x.labels", &too_many)
                .unwrap_err()
                .to_string()
                .contains("x.labels")
        );
        let empty_key = BTreeMap::from([(String::new(), "v".into())]);
        assert!(string_map("x.labels", &empty_key).is_err());
        let long_key = BTreeMap::from([("k".repeat(MAX_METADATA_KEY_BYTES + 1), String::new())]);
        assert!(string_map("x.labels", &long_key).is_err());
        let long_value = BTreeMap::from([("k".into(), "v".repeat(MAX_METADATA_VALUE_BYTES + 1))]);
        let err = string_map("x.annotations", &long_value).unwrap_err().to_string();
        assert!(err.contains("x.annotations[\"k\"]"), "{err}");
        let fine = BTreeMap::from([(
            "k".repeat(MAX_METADATA_KEY_BYTES),
            "v".repeat(MAX_METADATA_VALUE_BYTES),
        )]);
        assert!(string_map("x.labels", &fine).is_ok());
    }

    #[test]
    fn shortens_on_character_boundaries() {
        assert_eq!(shorten("short"), "short");
        let long = "ä".repeat(50);
        assert_eq!(shorten(&long), format!("{}...", "ä".repeat(40)));
    }
}
