// SPDX-License-Identifier: Apache-2.0
//! What every IRI provider shares: the durable object store, the event store, the reconcile
//! queue, ids and timestamps, list filters, the error type with its gRPC mapping, and the server
//! bootstrap (socket permissions, health, reflection, metrics, signals, graceful shutdown).
//!
//! It knows stores and queues and nothing about QEMU, files or S3: providers bring those.

pub mod cli;
pub mod error;
pub mod filter;
pub mod handler;
pub mod id;
pub mod logging;
pub mod metrics;
pub mod object;
pub mod queue;
pub mod server;
pub mod store;
pub mod validate;
pub mod warning;

pub use error::{Error, Result};
pub use filter::{EventFilter, ObjectFilter};
pub use object::Object;
pub use store::{Change, EventType, Store, StoreOptions, Stored};
