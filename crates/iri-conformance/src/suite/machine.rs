// SPDX-License-Identifier: Apache-2.0
//! Machine runtime tests.

use iri_api::machine::v1alpha1::VersionRequest;

use crate::{
    call, ensure,
    harness::{Ctx, TestCase, TestResult},
    test_case,
};

/// The machine tests.
pub fn cases() -> Vec<TestCase> {
    vec![test_case!(
        Machine,
        Identity,
        Core,
        false,
        version_is_set_and_semver,
        "Version returns a runtime name and a semver version"
    )]
}

async fn version_is_set_and_semver(ctx: &mut Ctx) -> TestResult {
    let version = call!(ctx, machine.version(VersionRequest::default()))?;
    ensure!(!version.runtime_name.is_empty(), "runtime_name is empty");
    ensure!(
        crate::suite::is_semver(&version.runtime_version),
        "runtime_version {:?} is not semver",
        version.runtime_version
    );
    Ok(())
}
