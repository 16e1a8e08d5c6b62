// SPDX-License-Identifier: Apache-2.0
//! Volume runtime tests.

use crate::harness::TestCase;

/// The volume tests.
pub fn cases() -> Vec<TestCase> {
    Vec::new()
}
