// SPDX-License-Identifier: Apache-2.0
//! The durable object store (being written).
