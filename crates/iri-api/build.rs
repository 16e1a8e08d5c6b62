// SPDX-License-Identifier: Apache-2.0
//! Compiles the IRI protos with protox (pure Rust, no system `protoc`), then generates prost
//! messages and tonic clients/servers from the descriptors.

use std::{env, fs, path::PathBuf};

use prost::Message;

const FILES: &[&str] = &[
    "meta/v1alpha1/api.proto",
    "event/v1alpha1/api.proto",
    "machine/v1alpha1/api.proto",
    "volume/v1alpha1/api.proto",
    "bucket/v1alpha1/api.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    for file in FILES {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    // The include root is proto/, so descriptor file names are exactly upstream's
    // ("machine/v1alpha1/api.proto"), which matters for reflection and descriptor-level tooling.
    let fds = protox::compile(FILES, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("iri_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Ordered maps make encoding deterministic, so specs can be compared byte for byte and
        // listings print in a stable order. Wire format is unaffected.
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
