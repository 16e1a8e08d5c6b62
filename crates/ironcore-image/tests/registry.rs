// SPDX-License-Identifier: Apache-2.0
//! Against a real registry (Debian's `docker-registry`): resolve by tag, by digest and through
//! an index; download layers with digest checks; refuse what is not an IronCore image.

use ironcore_image::{
    Client, Error, Policy,
    testing::{Layer, Registry},
};

#[test]
fn resolves_and_downloads_ironcore_images() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let rootfs: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    let digest = registry.push(
        "os-images/test",
        "1",
        &[
            Layer {
                kind: "rootfs",
                content: &rootfs,
            },
            Layer {
                kind: "kernel",
                content: b"kernel",
            },
            Layer {
                kind: "initramfs",
                content: b"initramfs",
            },
        ],
    );
    // The registry is on loopback: refused unless trusted.
    let untrusting = Client::new(Vec::new(), Policy::default());
    let refused = untrusting.resolve(&format!("{}/os-images/test:1", registry.address), "");
    assert!(matches!(refused, Err(Error::Refused(m)) if m.contains("internal address")));
    let client = Client::new(
        Vec::new(),
        Policy {
            trusted_hosts: vec!["127.0.0.1".into()],
        },
    );
    let reference = format!("{}/os-images/test:1", registry.address);
    let image = client.resolve(&reference, "").unwrap();
    assert_eq!(image.digest, digest);
    let layer = image.rootfs.clone().expect("a rootfs layer");
    assert_eq!(layer.size, rootfs.len() as u64);
    assert!(image.kernel.is_some() && image.initramfs.is_some());

    let dest = dir.path().join("rootfs.raw");
    client.download(&image, &layer, &dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), rootfs);

    // By digest, and through an index for linux/amd64.
    let by_digest = format!("{}/os-images/test@{digest}", registry.address);
    assert_eq!(
        client.resolve(&by_digest, "amd64").unwrap().rootfs,
        Some(layer.clone())
    );
    let size = registry.manifest_size("os-images/test", &digest);
    registry.push_index("os-images/test", "multi", &digest, size, "amd64");
    let multi = format!("{}/os-images/test:multi", registry.address);
    assert_eq!(client.resolve(&multi, "amd64").unwrap().digest, digest);
    let err = client.resolve(&multi, "arm64").unwrap_err();
    assert!(err.to_string().contains("no linux/arm64 manifest"), "{err}");

    // A descriptor whose digest does not match the content: the download is refused and removed.
    let mut lying = layer.clone();
    lying.digest = image.kernel.clone().unwrap().digest;
    lying.size = rootfs.len() as u64;
    let dest2 = dir.path().join("lying.raw");
    assert!(client.download(&image, &lying, &dest2).is_err());
    assert!(!dest2.exists(), "a failed download leaves no file");

    // Unknown tags and foreign layer types.
    let missing = client.resolve(&format!("{}/os-images/test:nope", registry.address), "");
    assert!(matches!(missing, Err(Error::Registry(m)) if m.contains("404")));
    registry.push(
        "os-images/foreign",
        "1",
        &[Layer {
            kind: "application/vnd.oci.image.layer.v1.tar+gzip",
            content: b"tar",
        }],
    );
    let foreign = client.resolve(&format!("{}/os-images/foreign:1", registry.address), "");
    assert!(matches!(foreign, Err(Error::Image(m)) if m.contains("unknown layer media type")));
}
