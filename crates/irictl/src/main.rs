// SPDX-License-Identifier: Apache-2.0
//! irictl: the command-line client for IRI runtimes.
fn main() {}
