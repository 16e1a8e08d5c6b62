// SPDX-License-Identifier: Apache-2.0
//! Boot images from a real registry (Debian's `docker-registry`, through `ironcore-image`'s
//! `testing` feature): fetched into the cache once, reused by digest, refused or failed with
//! a message that says what to do.

use std::{
    collections::HashSet,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

use ironcore_image::testing::{Layer, Registry};
use machine_provider::images::{BootImage, ImageCache, ImageError, ImageSettings};

/// The registry, or `None` (with the reason printed) where `docker-registry` is missing.
fn registry(dir: &Path) -> Option<Registry> {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join("docker-registry").is_file()));
    if !found {
        eprintln!("skipped: docker-registry is not installed (apt-get install docker-registry)");
        return None;
    }
    Some(Registry::start(dir))
}

/// Settings that trust the loopback registry.
fn trusting() -> ImageSettings {
    ImageSettings {
        trusted_hosts: vec!["127.0.0.1".into()],
        ..ImageSettings::default()
    }
}

/// A kernel and an initramfs: the real test guest's if it was built, small blobs otherwise.
fn guest() -> (Vec<u8>, Vec<u8>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-guest");
    match (
        std::fs::read(dir.join("vmlinuz")),
        std::fs::read(dir.join("initramfs.cpio.gz")),
    ) {
        (Ok(kernel), Ok(initramfs)) => (kernel, initramfs),
        _ => (b"a kernel".to_vec(), b"an initramfs".to_vec()),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn identity(path: &Path) -> (u64, i64, i64) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.ino(), meta.mtime(), meta.mtime_nsec())
}

#[tokio::test]
async fn fetches_kernel_images_once_and_reuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let Some(registry) = registry(dir.path()) else {
        return;
    };
    let (kernel, initramfs) = guest();
    let digest = registry.push(
        "os-images/guest",
        "1",
        &[
            Layer {
                kind: "kernel",
                content: &kernel,
            },
            Layer {
                kind: "initramfs",
                content: &initramfs,
            },
        ],
    );
    let cache_dir = dir.path().join("images");
    let cache = ImageCache::new(cache_dir.clone(), trusting());
    let reference = format!("{}/os-images/guest:1", registry.address);
    let image = cache.boot_image(&reference).await.unwrap();
    assert_eq!(image.digest, digest);
    // The pusher's config carries `commandLine: "console=ttyS0"`.
    assert_eq!(image.cmdline, "console=ttyS0");
    assert_eq!(image.rootfs, None);
    let (kernel_path, initramfs_path) = (image.kernel.clone().unwrap(), image.initramfs.clone().unwrap());
    assert_eq!(std::fs::read(&kernel_path).unwrap(), kernel);
    assert_eq!(std::fs::read(&initramfs_path).unwrap(), initramfs);
    assert_eq!(mode(&kernel_path), 0o444);
    assert_eq!(mode(&initramfs_path), 0o444);
    assert_eq!(mode(&cache_dir), 0o700);
    assert!(kernel_path.starts_with(&cache_dir));

    // Again, from a new cache on the same directory (a provider restart): same files, untouched.
    let before = (identity(&kernel_path), identity(&initramfs_path));
    let again = ImageCache::new(cache_dir.clone(), trusting());
    assert_eq!(again.boot_image(&reference).await.unwrap(), image);
    assert_eq!((identity(&kernel_path), identity(&initramfs_path)), before);

    // Concurrent calls for one reference agree and leave no partial files behind.
    let (a, b) = tokio::join!(cache.boot_image(&reference), cache.boot_image(&reference));
    assert_eq!(a.unwrap(), image);
    assert_eq!(b.unwrap(), image);
    let leftovers: Vec<_> = std::fs::read_dir(cache_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A pinned digest is served from the cache without the registry.
    let pinned = format!("{}/os-images/guest@{digest}", registry.address);
    let by_digest = cache.boot_image(&pinned).await.unwrap();
    assert_eq!(by_digest.kernel, image.kernel);
    drop(registry);
    assert_eq!(cache.boot_image(&pinned).await.unwrap(), by_digest);
    // A tag that resolved before is served as it was while the registry is away.
    assert_eq!(cache.boot_image(&reference).await.unwrap(), image);
}

#[tokio::test]
async fn a_moved_tag_gets_its_new_layers() {
    let dir = tempfile::tempdir().unwrap();
    let Some(registry) = registry(dir.path()) else {
        return;
    };
    let push = |kernel: &[u8]| {
        registry.push(
            "os-images/moving",
            "stable",
            &[
                Layer {
                    kind: "kernel",
                    content: kernel,
                },
                Layer {
                    kind: "initramfs",
                    content: b"shared initramfs",
                },
            ],
        )
    };
    let first_digest = push(b"kernel 1");
    let cache = ImageCache::new(dir.path().join("images"), trusting());
    let reference = format!("{}/os-images/moving:stable", registry.address);
    let first = cache.boot_image(&reference).await.unwrap();
    assert_eq!(first.digest, first_digest);
    let shared = identity(first.initramfs.as_ref().unwrap());

    let second_digest = push(b"kernel 2");
    let second = cache.boot_image(&reference).await.unwrap();
    assert_eq!(second.digest, second_digest);
    assert_ne!(second.kernel, first.kernel);
    assert_eq!(
        std::fs::read(second.kernel.as_ref().unwrap()).unwrap(),
        b"kernel 2"
    );
    // The unchanged layer was not fetched again.
    assert_eq!(second.initramfs, first.initramfs);
    assert_eq!(identity(second.initramfs.as_ref().unwrap()), shared);

    // Pruning keeps what the references in use name, and frees the layer the tag moved off.
    let in_use = HashSet::from([reference.clone()]);
    assert_eq!(cache.prune(&in_use).await.unwrap(), b"kernel 1".len() as u64);
    assert!(!first.kernel.as_ref().unwrap().exists());
    assert!(second.kernel.as_ref().unwrap().exists() && second.initramfs.as_ref().unwrap().exists());
    assert_eq!(cache.boot_image(&reference).await.unwrap(), second);
    cache.prune(&HashSet::new()).await.unwrap();
    assert!(!second.kernel.as_ref().unwrap().exists());
    assert_eq!(cache.boot_image(&reference).await.unwrap(), second);
    assert!(second.kernel.as_ref().unwrap().exists());
}

#[tokio::test]
async fn an_image_without_kernel_gives_its_rootfs() {
    let dir = tempfile::tempdir().unwrap();
    let Some(registry) = registry(dir.path()) else {
        return;
    };
    let rootfs: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    registry.push(
        "os-images/disk",
        "1",
        &[Layer {
            kind: "rootfs",
            content: &rootfs,
        }],
    );
    let cache = ImageCache::new(dir.path().join("images"), trusting());
    let image: BootImage = cache
        .boot_image(&format!("{}/os-images/disk:1", registry.address))
        .await
        .unwrap();
    assert_eq!((image.kernel, image.initramfs), (None, None));
    let path = image.rootfs.expect("the rootfs layer");
    assert_eq!(std::fs::read(&path).unwrap(), rootfs);
    assert_eq!(mode(&path), 0o444);

    // Too large for the configured limit: refused before the download.
    let small = ImageCache::new(
        dir.path().join("small"),
        ImageSettings {
            max_layer_bytes: 1000,
            ..trusting()
        },
    );
    let err = small
        .boot_image(&format!("{}/os-images/disk:1", registry.address))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::Permanent(m) if m.contains("max_layer_bytes")),
        "{err:?}"
    );
}

#[tokio::test]
async fn unusable_references_fail_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let Some(registry) = registry(dir.path()) else {
        return;
    };
    registry.push(
        "os-images/ok",
        "1",
        &[Layer {
            kind: "rootfs",
            content: b"disk",
        }],
    );
    let cache = ImageCache::new(dir.path().join("images"), trusting());

    // A tag that does not exist (yet): retried, and the message names the reference.
    let missing = format!("{}/os-images/ok:nope", registry.address);
    let err = cache.boot_image(&missing).await.unwrap_err();
    assert!(
        matches!(&err, ImageError::Transient(m) if m.contains("not found") && m.contains(&missing)),
        "{err:?}"
    );

    // Not an IronCore image, and an image with nothing to boot.
    registry.push(
        "os-images/tarball",
        "1",
        &[Layer {
            kind: "application/vnd.oci.image.layer.v1.tar+gzip",
            content: b"tar",
        }],
    );
    let err = cache
        .boot_image(&format!("{}/os-images/tarball:1", registry.address))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::Permanent(m) if m.contains("IronCore image")),
        "{err:?}"
    );
    registry.push(
        "os-images/lonely",
        "1",
        &[Layer {
            kind: "kernel",
            content: b"kernel without initramfs",
        }],
    );
    let err = cache
        .boot_image(&format!("{}/os-images/lonely:1", registry.address))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::Permanent(m) if m.contains("neither a kernel and an initramfs")),
        "{err:?}"
    );

    // Bad references, and local paths that are not OCI references at all.
    for bad in ["Upper/Case:1", "x@sha256:12", "file:///srv/images/os"] {
        let err = cache.boot_image(bad).await.unwrap_err();
        assert!(matches!(err, ImageError::Permanent(_)), "{bad}: {err:?}");
    }

    // The loopback registry is an internal address: refused unless trusted.
    let untrusting = ImageCache::new(dir.path().join("untrusting"), ImageSettings::default());
    let err = untrusting
        .boot_image(&format!("{}/os-images/ok:1", registry.address))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::Permanent(m) if m.contains("internal address") && m.contains("images.trusted_hosts")),
        "{err:?}"
    );
    assert!(!dir.path().join("untrusting").join("blobs").exists());
}
