// SPDX-License-Identifier: Apache-2.0
//! Images that volumes are created from: fetched once, checked, converted into a read-only
//! qcow2 layer that every volume of the image shares as its backing file.
//!
//! References: `file:///<path>` (the path must lie in one of `local.image_dirs`, so a request
//! cannot make the provider read arbitrary host files), `http://` / `https://` URLs (a
//! `#sha256=<hex>` suffix makes the fetch verify the content's digest), and OCI references
//! (`registry/repository:tag` or `@sha256:…`) to IronCore images, whose rootfs layer is used
//! (digest-verified, see the `ironcore-image` crate). The image may be raw or
//! qcow2; its format is decided by its magic number, never by QEMU's format probing, and a
//! qcow2 image that names a backing file or an external data file is refused (it would make
//! QEMU open host files on the image's behalf).
//!
//! A fetch that fails is an error for this attempt only: nothing about the failure is kept,
//! and the next reconcile fetches again.

use std::{
    fs::File,
    io::{self, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Component, Path, PathBuf},
    process::Stdio,
};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Beyond this, a download is refused (the largest volume).
const MAX_IMAGE_BYTES: u64 = super::MAX_VOLUME_BYTES;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    /// Where the bytes come from.
    pub location: Location,
    /// The expected SHA-256 of the content (lowercase hex), if the reference pins one.
    pub sha256: Option<String>,
}

/// Where an image's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An absolute, normalized local path.
    File(PathBuf),
    /// An `http://` or `https://` URL.
    Http(String),
    /// An OCI reference to an IronCore image.
    Oci(String),
}

/// What a fetch may use besides the reference.
#[derive(Debug, Clone, Default)]
pub struct FetchContext {
    /// Where `file://` images may come from.
    pub image_dirs: Vec<PathBuf>,
    /// Registries reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// The architecture an OCI index should yield.
    pub architecture: String,
    /// Which hosts may be fetched from.
    pub policy: ironcore_image::Policy,
}

/// Parses `reference`; `image_dirs` are the directories `file://` references may point into.
/// The error says what is wrong, for the caller to put next to the field name.
pub fn parse(reference: &str, image_dirs: &[PathBuf]) -> Result<ImageSource, String> {
    let (location, sha256) = match reference.rsplit_once("#sha256=") {
        Some((location, digest)) => {
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("the #sha256= suffix must be 64 hexadecimal characters".into());
            }
            (location, Some(digest.to_ascii_lowercase()))
        }
        None => (reference, None),
    };
    if let Some(path) = location.strip_prefix("file://") {
        let path = Path::new(path);
        if !path.is_absolute() {
            return Err("a file:// reference needs an absolute path (file:///dir/image.qcow2)".into());
        }
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err("a file:// path must not contain . or .. components".into());
        }
        if image_dirs.is_empty() {
            return Err(
                "file:// images are disabled: list the directories they may come from in local.image_dirs"
                    .into(),
            );
        }
        if !image_dirs.iter().any(|dir| path.starts_with(dir)) {
            return Err(format!(
                "{} is not inside an image directory ({})",
                path.display(),
                image_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        return Ok(ImageSource {
            location: Location::File(path.to_path_buf()),
            sha256,
        });
    }
    if location.starts_with("http://") || location.starts_with("https://") {
        let host = location.split_once("://").map_or("", |(_, rest)| rest);
        if host.is_empty() || host.starts_with('/') {
            return Err("the URL has no host".into());
        }
        return Ok(ImageSource {
            location: Location::Http(location.to_string()),
            sha256,
        });
    }
    if location.contains("://") {
        return Err("only file://, http:// and https:// URLs, or OCI references, are supported".into());
    }
    if sha256.is_some() {
        return Err("pin an OCI image with @sha256:<digest>, not #sha256=".into());
    }
    ironcore_image::Reference::parse(location).map_err(|e| e.to_string())?;
    Ok(ImageSource {
        location: Location::Oci(location.to_string()),
        sha256: None,
    })
}

/// What a fetch produced: a private local file with the image's bytes.
#[derive(Debug)]
pub struct Fetched {
    /// The file: a download, or a private copy of a `file://` image.
    pub path: PathBuf,
    /// SHA-256 of the content.
    pub sha256: String,
}

/// Refused (retrying cannot help: the reference or the content is wrong, the destination is
/// not allowed) or Failed (the network, the server, the disk: retried).
pub use ironcore_image::FetchError;

fn refused(reason: impl Into<String>) -> FetchError {
    FetchError::Refused(reason.into())
}

fn failed(reason: impl Into<String>) -> FetchError {
    FetchError::Failed(reason.into())
}

/// Fetches `source` into the new file `download` (blocking: run it off the async workers).
///
/// A `file://` image is copied too, through a descriptor opened without following a final
/// symlink and checked to be inside an image directory: everything after (hash, inspection,
/// conversion) reads the private copy, so swapping the file in the image directory between
/// the check and the use changes nothing.
pub fn fetch(source: &ImageSource, download: &Path, context: &FetchContext) -> Result<Fetched, FetchError> {
    let sha256 = match &source.location {
        Location::Oci(reference) => {
            let client =
                ironcore_image::Client::new(context.insecure_registries.clone(), context.policy.clone());
            let oci_error = |e: ironcore_image::Error| match e {
                ironcore_image::Error::Registry(m) | ironcore_image::Error::Io(m) => failed(m),
                other => refused(other.to_string()),
            };
            let image = client
                .resolve(reference, &context.architecture)
                .map_err(oci_error)?;
            let rootfs = image
                .rootfs
                .clone()
                .ok_or_else(|| refused(format!("{reference} has no rootfs layer")))?;
            client.download(&image, &rootfs, download).map_err(oci_error)?;
            rootfs.digest.trim_start_matches("sha256:").to_string()
        }
        Location::File(path) => {
            let real = path
                .canonicalize()
                .map_err(|e| failed(format!("{}: {e}", path.display())))?;
            let allowed = context
                .image_dirs
                .iter()
                .filter_map(|d| d.canonicalize().ok())
                .any(|dir| real.starts_with(dir));
            if !allowed {
                return Err(refused(format!(
                    "{} resolves to {}, outside the image directories",
                    path.display(),
                    real.display()
                )));
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&real)
                .map_err(|e| failed(format!("{}: {e}", real.display())))?;
            let meta = file
                .metadata()
                .map_err(|e| failed(format!("{}: {e}", real.display())))?;
            if !meta.is_file() {
                return Err(refused(format!("{} is not a regular file", real.display())));
            }
            copy_hashed(file, download).map_err(|e| failed(format!("copying {}: {e}", real.display())))?
        }
        Location::Http(url) => {
            let response =
                ironcore_image::net::get(&ironcore_image::net::agent(), &context.policy, url, &[], None)?;
            let status = response.status().as_u16();
            if !(200..300).contains(&status) {
                return Err(failed(format!("GET {url}: HTTP {status}")));
            }
            copy_hashed(response.into_body().into_reader(), download)
                .map_err(|e| failed(format!("GET {url}: {e}")))?
        }
    };
    if let Some(expected) = &source.sha256
        && *expected != sha256
    {
        let _ = std::fs::remove_file(download);
        return Err(refused(format!(
            "content has sha256 {sha256}, the reference pins {expected}"
        )));
    }
    Ok(Fetched {
        path: download.to_path_buf(),
        sha256,
    })
}

/// Copies `from` into the new file `dest` (0600, fsynced); returns the content's SHA-256. A
/// partial file is removed.
fn copy_hashed(mut from: impl Read, dest: &Path) -> io::Result<String> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)?;
    let written = (|| -> io::Result<String> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = from.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > MAX_IMAGE_BYTES {
                return Err(io::Error::other(format!(
                    "larger than the largest volume ({MAX_IMAGE_BYTES} bytes)"
                )));
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])?;
        }
        file.sync_all()?;
        Ok(hex(&hasher.finalize()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    written
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An image's format, from its first bytes (never from QEMU's probing).
fn format_of(path: &Path) -> io::Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut file = File::open(path)?;
    let mut read = 0;
    while read < magic.len() {
        match file.read(&mut magic[read..])? {
            0 => break,
            n => read += n,
        }
    }
    Ok(if read == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// Checks the image at `path` and converts it into a standalone qcow2 file at `layer`;
/// returns the image's virtual size.
/// A file `qemu-img info` cannot read, or one that is not a standalone image, is Refused; a
/// conversion that fails (the disk is full) is Failed.
pub async fn convert(qemu_img: &Path, path: &Path, layer: &Path) -> Result<u64, FetchError> {
    let format = format_of(path).map_err(|e| failed(format!("{}: {e}", path.display())))?;
    let info = run(
        qemu_img,
        &[
            "info".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            format.as_ref(),
            path.as_os_str(),
        ],
    )
    .await
    .map_err(|e| refused(format!("not a readable {format} image: {e}")))?;
    let info: Value = serde_json::from_slice(&info)
        .map_err(|e| failed(format!("qemu-img info said something odd: {e}")))?;
    if info.get("backing-filename").is_some() {
        return Err(refused(
            "the image names a backing file: only standalone images are accepted",
        ));
    }
    let specific = &info["format-specific"]["data"];
    if specific.get("data-file").is_some() {
        return Err(refused(
            "the image uses an external data file: only standalone images are accepted",
        ));
    }
    if info["encrypted"].as_bool().unwrap_or(false) {
        return Err(refused("the image is encrypted"));
    }
    let size = info["virtual-size"]
        .as_u64()
        .filter(|&s| s > 0)
        .ok_or_else(|| refused("the image is empty"))?;
    run(
        qemu_img,
        &[
            "convert".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            format.as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            "-o".as_ref(),
            "preallocation=off".as_ref(),
            path.as_os_str(),
            layer.as_os_str(),
        ],
    )
    .await
    .map_err(failed)?;
    Ok(size)
}

async fn run(program: &Path, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, String> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("running {}: {e}", program.display()))?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(format!(
            "{} {} failed: {}",
            program.display(),
            args.first().map(|a| a.to_string_lossy()).unwrap_or_default(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The key an image is cached under: SHA-256 of its reference and architecture (64 hex
/// characters).
pub fn cache_key(reference: &str, architecture: &str) -> String {
    hex(&Sha256::digest(format!("{reference}\n{architecture}").as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_or_say_why_not() {
        let dirs = [PathBuf::from("/srv/images")];
        assert_eq!(
            parse("file:///srv/images/os.qcow2", &dirs).unwrap().location,
            Location::File("/srv/images/os.qcow2".into())
        );
        let pinned = parse(
            &format!("https://example.com/os.img#sha256={}", "AB".repeat(32)),
            &dirs,
        )
        .unwrap();
        assert_eq!(
            pinned.location,
            Location::Http("https://example.com/os.img".into())
        );
        assert_eq!(pinned.sha256, Some("ab".repeat(32)));
        for (bad, why) in [
            ("file:///etc/shadow", "not inside an image directory"),
            ("file:///srv/images/../../etc/shadow", "must not contain"),
            ("file://relative/x", "absolute path"),
            ("ftp://host/os.img", "only file://"),
            ("Ghcr.io/UPPER", "repository"),
            ("http://", "no host"),
            ("http://x/y#sha256=12", "64 hexadecimal"),
        ] {
            let err = parse(bad, &dirs).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(
            parse("file:///srv/images/a", &[])
                .unwrap_err()
                .contains("local.image_dirs")
        );
    }

    #[test]
    fn cache_keys_are_fixed_length_hex() {
        let key = cache_key("https://example.com/os.img", "");
        assert_eq!(key.len(), 64);
        assert_ne!(key, cache_key("https://example.com/os2.img", ""));
        assert_ne!(key, cache_key("https://example.com/os.img", "arm64"));
        assert_eq!(
            parse("ghcr.io/ironcore-dev/os-images/gardenlinux:1877", &[])
                .unwrap()
                .location,
            Location::Oci("ghcr.io/ironcore-dev/os-images/gardenlinux:1877".into())
        );
    }
}
