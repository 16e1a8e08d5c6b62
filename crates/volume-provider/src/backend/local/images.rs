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
    time::Duration,
};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// How long connecting to an image server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the server may pause while sending the image.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
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

/// What a fetch produced: a local file with the image's bytes.
#[derive(Debug)]
pub struct Fetched {
    /// The file (the source itself for `file://`, a download otherwise).
    pub path: PathBuf,
    /// SHA-256 of the content, when it was computed (downloads, pinned references).
    pub sha256: Option<String>,
    /// Whether `path` is a download that the caller removes when done.
    pub temporary: bool,
}

/// Fetches `source` (blocking: run it off the async workers). Downloads go to `download`.
pub fn fetch(source: &ImageSource, download: &Path, context: &FetchContext) -> Result<Fetched, String> {
    let image_dirs = &context.image_dirs;
    match &source.location {
        Location::Oci(reference) => {
            let client = ironcore_image::Client::new(context.insecure_registries.clone());
            let image = client
                .resolve(reference, &context.architecture)
                .map_err(|e| e.to_string())?;
            let rootfs = image
                .rootfs
                .clone()
                .ok_or_else(|| format!("{reference} has no rootfs layer"))?;
            client
                .download(&image, &rootfs, download)
                .map_err(|e| e.to_string())?;
            Ok(Fetched {
                path: download.to_path_buf(),
                sha256: Some(rootfs.digest.trim_start_matches("sha256:").to_string()),
                temporary: true,
            })
        }
        Location::File(path) => {
            // Symlinks may lead anywhere: the real path must still be inside an image directory.
            let real = path
                .canonicalize()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let allowed = image_dirs
                .iter()
                .filter_map(|d| d.canonicalize().ok())
                .any(|dir| real.starts_with(dir));
            if !allowed {
                return Err(format!(
                    "{} resolves to {}, outside the image directories",
                    path.display(),
                    real.display()
                ));
            }
            if !real.is_file() {
                return Err(format!("{} is not a regular file", real.display()));
            }
            let sha256 = match &source.sha256 {
                Some(_) => Some(hash_file(&real).map_err(|e| format!("{}: {e}", real.display()))?),
                None => None,
            };
            check_digest(source, sha256.as_deref())?;
            Ok(Fetched {
                path: real,
                sha256,
                temporary: false,
            })
        }
        Location::Http(url) => {
            let sha256 = download_to(url, download)?;
            if let Err(err) = check_digest(source, Some(&sha256)) {
                let _ = std::fs::remove_file(download);
                return Err(err);
            }
            Ok(Fetched {
                path: download.to_path_buf(),
                sha256: Some(sha256),
                temporary: true,
            })
        }
    }
}

fn check_digest(source: &ImageSource, actual: Option<&str>) -> Result<(), String> {
    match (&source.sha256, actual) {
        (Some(expected), Some(actual)) if expected != actual => Err(format!(
            "content has sha256 {actual}, the reference pins {expected}"
        )),
        _ => Ok(()),
    }
}

fn hash_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Downloads `url` into `dest` (created 0600, fsynced); returns the content's SHA-256.
fn download_to(url: &str, dest: &Path) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_body(None)
        .timeout_recv_response(Some(READ_TIMEOUT))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| format!("GET {url}: {e}"))?;
    let mut body = response.into_body().into_reader();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    let written = (|| -> io::Result<String> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = body.read(&mut buf)?;
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
    written.map_err(|e| {
        let _ = std::fs::remove_file(dest);
        format!("GET {url}: {e}")
    })
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
pub async fn convert(qemu_img: &Path, path: &Path, layer: &Path) -> Result<u64, String> {
    let format = format_of(path).map_err(|e| format!("{}: {e}", path.display()))?;
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
    .await?;
    let info: Value =
        serde_json::from_slice(&info).map_err(|e| format!("qemu-img info said something odd: {e}"))?;
    if info.get("backing-filename").is_some() {
        return Err("the image names a backing file: only standalone images are accepted".into());
    }
    let specific = &info["format-specific"]["data"];
    if specific.get("data-file").is_some() {
        return Err("the image uses an external data file: only standalone images are accepted".into());
    }
    if info["encrypted"].as_bool().unwrap_or(false) {
        return Err("the image is encrypted".into());
    }
    let size = info["virtual-size"]
        .as_u64()
        .filter(|&s| s > 0)
        .ok_or_else(|| "the image is empty".to_string())?;
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
    .await?;
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
