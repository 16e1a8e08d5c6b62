// SPDX-License-Identifier: Apache-2.0
//! Server-assigned object ids and timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

/// Length of an id: 63 lowercase hex characters, like upstream's brokers.
pub const ID_LEN: usize = 63;

/// A new random object id.
///
/// Upstream rule (`broker/common/idgen`): 32 random bytes as hex, cut to 63 characters (the
/// length limit of a Kubernetes label value), re-rolled while the first 12 characters parse as a
/// decimal number, because truncated ids must never look numerical. Hex never contains `://`, so
/// `<runtime>://<id>` stays unambiguous.
pub fn new_id() -> String {
    loop {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).expect("the OS random source is available");
        let mut id = String::with_capacity(64);
        for byte in raw {
            id.push_str(&format!("{byte:02x}"));
        }
        id.truncate(ID_LEN);
        if !id[..12].bytes().all(|b| b.is_ascii_digit()) {
            return id;
        }
    }
}

/// Whether `id` has the shape of an id we hand out.
///
/// Check this before an id from a request goes into a file path. For lookups, a malformed id is
/// simply not found: the contract wants NotFound for any unknown id, and poollets rely on it.
pub fn is_valid_id(id: &str) -> bool {
    id.len() == ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Now, in Unix nanoseconds (the unit of `ObjectMetadata.created_at` / `deleted_at`).
pub fn now_nanos() -> i64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Now, in Unix seconds (the unit of `EventSpec.event_time` and event filters).
pub fn now_secs() -> i64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_upstream_shape() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let id = new_id();
            assert!(is_valid_id(&id), "{id}");
            assert!(!id[..12].bytes().all(|b| b.is_ascii_digit()));
            assert!(!id.contains("://"));
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn rejects_foreign_ids() {
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("../etc/passwd"));
        assert!(!is_valid_id(&"A".repeat(63)));
        assert!(!is_valid_id(&"a".repeat(64)));
    }
}
