// SPDX-License-Identifier: Apache-2.0
//! What the store and the reference runtimes need to know about an IRI object.

use iri_api::{
    bucket::v1alpha1 as bucket, machine::v1alpha1 as machine, meta::v1alpha1::ObjectMetadata,
    volume::v1alpha1 as volume,
};
use prost::Message;

/// An object with IRI metadata, storable in the [`crate::store::Store`].
///
/// Implemented for the four IRI object types. A provider that needs private state next to the
/// IRI object (a QEMU pid, a backing file) implements it for its own record message that wraps
/// the IRI object.
pub trait Object: Message + Default + Clone + Send + Sync + 'static {
    /// The kind, as used in store keys, metrics and messages (`machine`, `volume`, ...).
    const KIND: &'static str;

    /// The object's metadata, if set.
    fn metadata(&self) -> Option<&ObjectMetadata>;

    /// The object's metadata, created empty if absent.
    fn metadata_mut(&mut self) -> &mut ObjectMetadata;

    /// The encoded spec. A change of these bytes is a spec change and bumps `generation`.
    /// (Maps are ordered, so equal specs encode equally.)
    fn spec_bytes(&self) -> Vec<u8>;

    /// The object id, or "" if unset.
    fn id(&self) -> &str {
        self.metadata().map(|m| m.id.as_str()).unwrap_or("")
    }
}

/// Implements [`Object`] of kind `$kind` for a message with the IRI object's `metadata` and
/// `spec` fields: the IRI types themselves, and providers' records that wrap them.
#[macro_export]
macro_rules! impl_object {
    ($ty:ty, $kind:literal) => {
        impl $crate::Object for $ty {
            const KIND: &'static str = $kind;

            fn metadata(&self) -> Option<&::iri_api::meta::v1alpha1::ObjectMetadata> {
                self.metadata.as_ref()
            }

            fn metadata_mut(&mut self) -> &mut ::iri_api::meta::v1alpha1::ObjectMetadata {
                self.metadata.get_or_insert_with(Default::default)
            }

            fn spec_bytes(&self) -> Vec<u8> {
                self.spec
                    .as_ref()
                    .map(::prost::Message::encode_to_vec)
                    .unwrap_or_default()
            }
        }
    };
}

impl_object!(machine::Machine, "machine");
impl_object!(volume::Volume, "volume");
impl_object!(volume::VolumeSnapshot, "volume_snapshot");
impl_object!(bucket::Bucket, "bucket");
