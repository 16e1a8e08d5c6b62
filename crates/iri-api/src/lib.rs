// SPDX-License-Identifier: Apache-2.0
//! The IronCore Runtime Interface (IRI) v1alpha1 API.
//!
//! Generated from `proto/` (which mirrors upstream's `iri/apis` byte for byte on the wire): the
//! messages of the five packages, the tonic clients and servers of the three runtimes
//! (`MachineRuntime`, `VolumeRuntime`, `BucketRuntime`), the compiled descriptors, and the
//! endpoint resolution and dialing rules that upstream's clients follow. Nothing else lives here.

pub mod endpoint;

pub use endpoint::{Endpoint, EndpointError, RuntimeKind};

/// `meta.v1alpha1`: object metadata shared by every IRI object.
pub mod meta {
    /// Version v1alpha1.
    #[allow(missing_docs, clippy::all)]
    pub mod v1alpha1 {
        tonic::include_proto!("meta.v1alpha1");
    }
}

/// `event.v1alpha1`: events about IRI objects.
pub mod event {
    /// Version v1alpha1.
    #[allow(missing_docs, clippy::all)]
    pub mod v1alpha1 {
        tonic::include_proto!("event.v1alpha1");
    }
}

/// `machine.v1alpha1`: the MachineRuntime service.
pub mod machine {
    /// Version v1alpha1.
    #[allow(missing_docs, clippy::all)]
    pub mod v1alpha1 {
        tonic::include_proto!("machine.v1alpha1");
    }
}

/// `volume.v1alpha1`: the VolumeRuntime service.
pub mod volume {
    /// Version v1alpha1.
    #[allow(missing_docs, clippy::all)]
    pub mod v1alpha1 {
        tonic::include_proto!("volume.v1alpha1");
    }
}

/// `bucket.v1alpha1`: the BucketRuntime service.
pub mod bucket {
    /// Version v1alpha1.
    #[allow(missing_docs, clippy::all)]
    pub mod v1alpha1 {
        tonic::include_proto!("bucket.v1alpha1");
    }
}

/// The encoded `FileDescriptorSet` of all five IRI files (for gRPC reflection and dynamic
/// encoding such as irictl's JSON/YAML input).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/iri_descriptor.bin"));

/// The largest gRPC message our clients and servers accept or send: 16 MiB.
///
/// grpc-go's default is 4 MiB, which a machine with a large ignition config plus many volume
/// secrets can exceed; 16 MiB leaves room for real ignition data (typically tens of KiB, at most a
/// few MiB) while still bounding memory per request.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// The descriptor pool of all IRI files, decoded once.
pub fn descriptor_pool() -> &'static prost_reflect::DescriptorPool {
    static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set compiled by build.rs is valid")
    })
}
