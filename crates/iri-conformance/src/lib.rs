// SPDX-License-Identifier: Apache-2.0
//! A conformance suite and benchmark for any IRI runtime, ours or upstream's: the IRI
//! counterpart of Kubernetes' critest (CRI) and csi-sanity (CSI).
//!
//! Each test is Passed, Failed (with the reason and the RPC exchange that failed) or Skipped
//! (with the reason). Every object a test creates is tracked and deleted afterwards, even when
//! the test fails. Tests belong to a capability [`Profile`]: `core` is what every runtime must
//! do, the others are named capabilities, so a verdict reads "passes core + snapshots + exec".
//!
//! Use [`run`] from a provider's own `cargo test`, or the `iri-conformance` binary against any
//! endpoint.

pub mod bench;
pub mod config;
pub mod harness;
pub mod report;
pub mod suite;

pub use config::Config;
pub use harness::{
    Category, Ctx, Exchange, Failure, Outcome, Probe, Profile, Report, RunOptions, TestCase, TestError,
    TestReport, TestResult, Tracked, run,
};
