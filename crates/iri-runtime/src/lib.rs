// SPDX-License-Identifier: Apache-2.0
//! What every IRI provider shares: the durable object store, the event store, the reconcile
//! queue, ids and timestamps, list filters, the error type with its gRPC mapping, and the server
//! bootstrap (socket permissions, health, reflection, metrics, signals, graceful shutdown).
//!
//! It knows stores and queues and nothing about QEMU, files or S3: providers bring those.

pub mod error;
pub mod filter;
pub mod id;
pub mod object;

pub use error::{Error, Result};
pub use filter::{EventFilter, ObjectFilter};
pub use object::Object;
pub mod store;
