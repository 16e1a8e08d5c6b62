// SPDX-License-Identifier: Apache-2.0
//! In-memory reference runtimes for the IRI: **test doubles**, not providers.
//!
//! [`MachineRuntime`], [`VolumeRuntime`] and [`BucketRuntime`] implement the three generated
//! tonic server traits entirely in memory. Nothing is booted, allocated or stored; state is lost
//! when the last clone is dropped. They exist so that clients (irictl, the poollets, the
//! conformance suite's self-test) can be unit-tested against a server that behaves as the IRI
//! contract (`iri-contract.md`) says a correct provider behaves, including validation and error
//! codes. The conformance suite holds real providers to the same expectations.
//!
//! Serve one on a unix socket with [`serve_machine_unix`] (and friends), or call the trait
//! methods directly. The `iri-reference-runtime` binary serves all three for manual testing.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use iri_testing::{MachineRuntime, serve_machine_unix};
//! let runtime = MachineRuntime::default();
//! let served = serve_machine_unix(runtime.clone(), "/tmp/machine.sock".as_ref()).await?;
//! // ... drive a client against unix:///tmp/machine.sock, assert on runtime.machines() ...
//! served.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Behaviour (where the contract leaves room, what a correct provider would do)
//!
//! * **Metadata**: the server assigns `id` (63 hex chars), `created_at` (Unix ns, strictly
//!   increasing per runtime), `generation` 1 and `deleted_at` 0, ignoring whatever the client
//!   sent; `metadata` must be present. Labels, annotations and the whole spec are stored and
//!   returned verbatim (iri-contract §3.5). Label/annotation maps are capped at
//!   [`MAX_METADATA_ENTRIES`] entries, keys at [`MAX_METADATA_KEY_BYTES`] (and non-empty),
//!   values at [`MAX_METADATA_VALUE_BYTES`].
//! * **Validation** fails with INVALID_ARGUMENT and a message naming the field
//!   (`invalid machine.spec.class: ...`). Unknown ids fail with NOT_FOUND, also when the id is
//!   a *reference* inside a create request (`volume.spec.volume_data_source.snapshot_data_source.snapshot_id`,
//!   `volume_snapshot.spec.volume_id`): a dangling reference depends on state, not on the
//!   request's shape, so it is reported like any other unknown id.
//! * **Generation**: every actual spec change (power, attach/detach/update of volumes and
//!   NICs, volume expansion) bumps `metadata.generation`; a request that leaves the spec as it
//!   was (same power, identical volume) changes nothing. `UpdateMachineAnnotations` replaces
//!   the map and never bumps it. `status.observed_generation` catches up once the simulated
//!   backend has acted, `ready_delay` after the change (at the next read when zero).
//! * **Lists** return everything for an absent filter, apply `id` *and* `label_selector`, give
//!   OK with an empty list for an unknown id, and are ordered by `(created_at, id)`.
//! * **Deletes** are synchronous: NOT_FOUND for an unknown id, so a second delete is NOT_FOUND.
//! * **Capacity**: machine classes have a count capacity and volumes share a byte capacity;
//!   creating (or expanding) beyond it fails with RESOURCE_EXHAUSTED, and `Status` reports what
//!   is left.
//! * **Events**: `Normal` events for creates, deletes, spec and state changes, with the
//!   object's metadata at that time (deletes carry `deleted_at`), `event_time` in Unix seconds,
//!   filtered with [`iri_runtime::EventFilter`] and bounded per runtime.
//! * Machine, volume and bucket details are documented on the runtime types.

mod bucket;
mod common;
mod machine;
mod serve;
mod volume;

pub use bucket::{BUCKET_RUNTIME_NAME, BucketConfig, BucketRuntime};
pub use common::{
    DEFAULT_MAX_EVENTS, MAX_METADATA_ENTRIES, MAX_METADATA_KEY_BYTES, MAX_METADATA_VALUE_BYTES,
};
pub use machine::{MACHINE_RUNTIME_NAME, MachineConfig, MachineRuntime};
pub use serve::{Served, serve_bucket_unix, serve_machine_unix, serve_volume_unix};
pub use volume::{VOLUME_ACCESS_DRIVER, VOLUME_RUNTIME_NAME, VolumeConfig, VolumeRuntime};
