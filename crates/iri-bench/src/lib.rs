// SPDX-License-Identifier: Apache-2.0
//! Benchmarks of the IRI providers: programs that print numbers against a baseline measured in the same run.
