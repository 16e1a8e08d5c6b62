// SPDX-License-Identifier: Apache-2.0
//! Bucket runtime tests.

use crate::harness::TestCase;

/// The bucket tests.
pub fn cases() -> Vec<TestCase> {
    Vec::new()
}
