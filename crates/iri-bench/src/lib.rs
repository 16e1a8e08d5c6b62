// SPDX-License-Identifier: Apache-2.0
//! Benchmarks of the IRI providers: programs that print numbers against a baseline measured in the same run.
//!
//! One module per subcommand of the `iri-bench` binary ([`volume`], [`machine`], [`bucket`]),
//! and small shared pieces: [`stats`] (percentiles, rates, ratios, tables), [`units`] (byte
//! sizes), [`system`] (what machine the numbers come from) and [`binary`] (where the provider
//! binaries are).
//!
//! Every benchmark prints its results as Markdown tables (readable in a terminal, pasted as-is
//! into `docs/benchmarks.md` by `scripts/benchmarks`) and can write them as JSON.

pub mod binary;
pub mod bucket;
pub mod machine;
pub mod stats;
pub mod system;
pub mod units;
pub mod volume;
