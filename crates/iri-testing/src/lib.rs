// SPDX-License-Identifier: Apache-2.0
//! In-memory reference runtimes (test doubles).
