// SPDX-License-Identifier: Apache-2.0
//! The test catalog, one module per runtime.

pub mod bucket;
pub(crate) mod common;
pub mod machine;
pub mod volume;

use crate::harness::TestCase;

/// Every test of the suite, in report order.
pub fn all() -> Vec<TestCase> {
    let mut cases = machine::cases();
    cases.extend(volume::cases());
    cases.extend(bucket::cases());
    cases
}

/// Whether `version` is a semantic version (`MAJOR.MINOR.PATCH[-pre][+build]`, optional `v`).
pub fn is_semver(version: &str) -> bool {
    let version = version.strip_prefix('v').unwrap_or(version);
    let core = version.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (p.len() == 1 || !p.starts_with('0'))
        })
}
