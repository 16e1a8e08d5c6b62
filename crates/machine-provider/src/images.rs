// SPDX-License-Identifier: Apache-2.0
//! Boot images from OCI registries: an IronCore image reference becomes local files, a kernel
//! and an initramfs for direct kernel boot and/or a raw disk image (the rootfs layer) for the
//! base of a `local_disk`, plus the kernel command line of the image's config.
//!
//! Layout under the cache directory (`<data-dir>/images`, 0700):
//!
//! * `blobs/sha256-<hex>`: layer contents, named by their digest, read-only (0444), written
//!   to a temporary name, fsynced and renamed, so a crash never leaves half a file under a
//!   digest's name;
//! * `refs/<key>.json`: what a reference resolved to last (manifest digest, layer digests,
//!   command line), `key` being the SHA-256 of reference and architecture.
//!
//! Every call resolves the reference again (a tag can move) but downloads only the layers
//! whose digests are not cached yet: a moved tag gets its new layers, an unchanged one costs a
//! manifest request, and a reference pinned by `@sha256:` is served from the cache without
//! contacting the registry at all. When the registry cannot be reached, a tag that resolved
//! before is served as it resolved then.
//!
//! Fetching follows the volume provider's rules (`ironcore-image`): registries that resolve to
//! internal addresses are refused unless listed in `images.trusted_hosts`, plain HTTP only for
//! loopback and `images.insecure_registries`, every layer digest-verified.

use std::{
    collections::{HashMap, HashSet},
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use ironcore_image::{Client, Descriptor, Image, MEDIA_CONFIG, Policy, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Layers beyond this many bytes are refused unless configured otherwise (8 GiB).
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 8 << 30;
/// An image config is a small JSON document; anything bigger is not one.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Prefix of files being written; removed when the cache is opened.
const PARTIAL_PREFIX: &str = ".partial-";

/// Where OCI boot images may come from (the `[images]` section of the configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageSettings {
    /// Registries (`host` or `host:port`) fetched from even though they resolve to internal
    /// (loopback, private, link-local) addresses; all others that do are refused.
    pub trusted_hosts: Vec<String>,
    /// Registries (`host:port`) reached over plain HTTP instead of HTTPS (loopback always is).
    pub insecure_registries: Vec<String>,
    /// Layers larger than this many bytes are refused before they are downloaded.
    pub max_layer_bytes: u64,
}

impl Default for ImageSettings {
    fn default() -> Self {
        ImageSettings {
            trusted_hosts: Vec::new(),
            insecure_registries: Vec::new(),
            max_layer_bytes: DEFAULT_MAX_LAYER_BYTES,
        }
    }
}

/// Why an image could not be made local.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// Retrying cannot help: the reference is invalid, the image is not a bootable IronCore
    /// image, a layer is too large, or the registry is not allowed.
    #[error("{0}")]
    Permanent(String),
    /// A retry may succeed: the registry is unreachable or answered with an error, local I/O.
    #[error("{0}")]
    Transient(String),
}

/// A boot image as local files; every path is a read-only file in the cache, shared with other
/// machines of the same image: read it, never write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootImage {
    /// The manifest digest the reference resolved to (`sha256:<hex>`).
    pub digest: String,
    /// The kernel, for direct kernel boot (set exactly when `initramfs` is).
    pub kernel: Option<PathBuf>,
    /// The initramfs that goes with the kernel (set exactly when `kernel` is).
    pub initramfs: Option<PathBuf>,
    /// The kernel command line of the image's config (`commandLine`), whitespace-normalized.
    pub cmdline: String,
    /// The raw disk image (the rootfs layer), the base of a `local_disk`.
    pub rootfs: Option<PathBuf>,
}

/// Whether `image` names an OCI image (`registry/repository:tag`, `…@sha256:…`) rather than a
/// local one (`file:///dir`, `/dir`) or a URL.
pub fn is_oci_reference(image: &str) -> bool {
    !image.is_empty() && !image.starts_with('/') && !image.contains("://")
}

/// Checks that `reference` is a valid OCI reference without fetching anything (for request
/// validation); the error says what is wrong and what to write instead.
pub fn check_reference(reference: &str) -> Result<(), String> {
    if !is_oci_reference(reference) {
        return Err(format!(
            "image {:?} is a local path or URL, not an OCI reference",
            shorten(reference)
        ));
    }
    Reference::parse(reference).map(drop).map_err(|e| {
        format!("{e}; write [registry/]repository[:tag][@sha256:<digest>], or file:///dir for a local image")
    })
}

/// The key a reference is recorded under: SHA-256 of reference and architecture (64 hex
/// characters), as the volume provider keys its images.
pub fn cache_key(reference: &str, architecture: &str) -> String {
    hex(&Sha256::digest(format!("{reference}\n{architecture}").as_bytes()))
}

/// The OCI architecture of this host's machines (`amd64`, `arm64`, …).
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// What a reference resolved to, as stored in `refs/<key>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    reference: String,
    architecture: String,
    manifest: String,
    kernel: Option<String>,
    initramfs: Option<String>,
    rootfs: Option<String>,
    cmdline: String,
}

/// The boot images fetched so far, under one directory.
pub struct ImageCache {
    dir: PathBuf,
    settings: ImageSettings,
    architecture: String,
    /// One fetch per reference at a time; entries stay (one per reference ever used).
    fetches: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Fetches hold it shared, [`ImageCache::prune`] exclusively: a blob just downloaded is
    /// never pruned before the record naming it is written.
    pruning: Arc<tokio::sync::RwLock<()>>,
}

impl ImageCache {
    /// A cache in `dir` (`<data-dir>/images`) for images of this host's architecture. Nothing
    /// is created until the first fetch; files left half-written by a crash are removed.
    pub fn new(dir: PathBuf, settings: ImageSettings) -> ImageCache {
        let _ = remove_partials(&dir.join("blobs"));
        let _ = remove_partials(&dir.join("refs"));
        ImageCache {
            dir,
            settings,
            architecture: host_architecture().to_string(),
            fetches: Mutex::new(HashMap::new()),
            pruning: Arc::new(tokio::sync::RwLock::new(())),
        }
    }

    /// The image `reference` (an OCI reference, see [`is_oci_reference`]) as local files: from
    /// the cache, or fetched now. Slow on first use (layers of many MiB): call it where a
    /// machine is started, not in an RPC.
    pub async fn boot_image(&self, reference: &str) -> Result<BootImage, ImageError> {
        check_reference(reference).map_err(ImageError::Permanent)?;
        let key = cache_key(reference, &self.architecture);
        let lock = self
            .fetches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        // Held until the blocking fetch ends, even if this future is dropped before.
        let fetching = lock.lock_owned().await;
        let not_pruning = self.pruning.clone().read_owned().await;
        let fetch = Fetch {
            dir: self.dir.clone(),
            settings: self.settings.clone(),
            architecture: self.architecture.clone(),
            reference: reference.to_string(),
            key,
        };
        tokio::task::spawn_blocking(move || {
            let _held = (fetching, not_pruning);
            fetch.run()
        })
        .await
        .map_err(|e| ImageError::Transient(format!("image {:?}: fetch task: {e}", shorten(reference))))?
    }

    /// Forgets every reference not in `keep` (the images of the machines that exist) and
    /// removes the blobs no remaining reference names; returns how many bytes were freed.
    ///
    /// The files of a pruned image go: a disk made from a rootfs must be a copy (`qemu-img
    /// convert`), never a qcow2 overlay naming the cached file as its backing file.
    pub async fn prune(&self, keep: &HashSet<String>) -> Result<u64, ImageError> {
        let exclusive = self.pruning.clone().write_owned().await;
        let dir = self.dir.clone();
        let keep: HashSet<String> = keep
            .iter()
            .map(|reference| format!("{}.json", cache_key(reference, &self.architecture)))
            .collect();
        let shown = self.dir.display().to_string();
        tokio::task::spawn_blocking(move || {
            let _held = exclusive;
            prune(&dir, &keep)
        })
        .await
        .map_err(|e| ImageError::Transient(format!("image prune task: {e}")))?
        .map_err(|e| ImageError::Transient(format!("pruning the images in {shown}: {e}")))
    }
}

/// One blocking fetch of one reference.
struct Fetch {
    dir: PathBuf,
    settings: ImageSettings,
    architecture: String,
    reference: String,
    key: String,
}

impl Fetch {
    fn run(&self) -> Result<BootImage, ImageError> {
        let cached = self.cached()?;
        // A digest names fixed content: what was fetched once is that content.
        if let Some(record) = &cached
            && self.reference.contains('@')
        {
            return Ok(self.boot_image(record));
        }
        let client = Client::new(
            self.settings.insecure_registries.clone(),
            Policy {
                trusted_hosts: self.settings.trusted_hosts.clone(),
            },
        );
        let image = match client.resolve(&self.reference, &self.architecture) {
            Ok(image) => image,
            Err(err) => {
                let err = self.error(err);
                if let (ImageError::Transient(reason), Some(record)) = (&err, &cached) {
                    tracing::warn!(
                        reference = %self.reference,
                        digest = %record.manifest,
                        %reason,
                        "the registry cannot be reached: using the image as it resolved before"
                    );
                    return Ok(self.boot_image(record));
                }
                return Err(err);
            }
        };
        if let Some(record) = &cached
            && record.manifest == image.digest
        {
            return Ok(self.boot_image(record));
        }
        let record = self.fetch(&client, &image)?;
        self.write_record(&record)?;
        Ok(self.boot_image(&record))
    }

    /// The record of the last resolution, if it and every blob it names are there.
    fn cached(&self) -> Result<Option<Record>, ImageError> {
        let path = self.record_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("reading", &path, e)),
        };
        let Ok(record) = serde_json::from_slice::<Record>(&bytes) else {
            // A record from another version or a damaged one: fetch again and replace it.
            return Ok(None);
        };
        let complete = record.reference == self.reference
            && [&record.kernel, &record.initramfs, &record.rootfs]
                .into_iter()
                .flatten()
                .all(|digest| self.blob_path(digest).is_file());
        Ok(complete.then_some(record))
    }

    /// Downloads what `image` needs and is not cached yet; returns its record.
    fn fetch(&self, client: &Client, image: &Image) -> Result<Record, ImageError> {
        let reference = shorten(&self.reference);
        let boots_kernel = image.kernel.is_some() && image.initramfs.is_some();
        if !boots_kernel && image.rootfs.is_none() {
            return Err(ImageError::Permanent(format!(
                "image {reference:?} has neither a kernel and an initramfs layer nor a rootfs layer, so nothing can boot from it; \
                 use an IronCore image with application/vnd.ironcore.image.kernel and .initramfs layers or a .rootfs layer"
            )));
        }
        // A kernel is of use only with its initramfs.
        let (kernel, initramfs) = if boots_kernel {
            (image.kernel.clone(), image.initramfs.clone())
        } else {
            (None, None)
        };
        let layers = [&kernel, &initramfs, &image.rootfs];
        for layer in layers.into_iter().flatten() {
            if !is_sha256_digest(&layer.digest) {
                return Err(ImageError::Permanent(format!(
                    "image {reference:?}: layer digest {:?} is not sha256:<64 hex characters>",
                    shorten(&layer.digest)
                )));
            }
            if layer.size > self.settings.max_layer_bytes {
                return Err(ImageError::Permanent(format!(
                    "image {reference:?}: layer {} ({}) has {} bytes, more than images.max_layer_bytes ({}); \
                     raise that limit to accept it",
                    layer.digest, layer.media_type, layer.size, self.settings.max_layer_bytes
                )));
            }
        }
        let cmdline = self.command_line(client, image)?;
        for layer in layers.into_iter().flatten() {
            self.ensure_blob(client, image, layer)?;
        }
        let digest = |layer: &Option<Descriptor>| layer.as_ref().map(|l| l.digest.clone());
        Ok(Record {
            reference: self.reference.clone(),
            architecture: self.architecture.clone(),
            manifest: image.digest.clone(),
            kernel: digest(&kernel),
            initramfs: digest(&initramfs),
            rootfs: digest(&image.rootfs),
            cmdline,
        })
    }

    /// Makes `blobs/<digest>` exist with `layer`'s content (digest-verified by the download).
    fn ensure_blob(&self, client: &Client, image: &Image, layer: &Descriptor) -> Result<(), ImageError> {
        let path = self.blob_path(&layer.digest);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() == layer.size => return Ok(()),
            // Not what the digest names (cannot happen short of tampering): fetch it again.
            Ok(_) => fs::remove_file(&path).map_err(|e| self.io("removing", &path, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io("reading", &path, e)),
        }
        let blobs = self.blobs_dir()?;
        let temp = partial_in(&blobs);
        client.download(image, layer, &temp).map_err(|e| self.error(e))?;
        let committed = fs::set_permissions(&temp, fs::Permissions::from_mode(0o444))
            .and_then(|()| fs::rename(&temp, &path))
            .and_then(|()| File::open(&blobs)?.sync_all());
        if let Err(e) = committed {
            let _ = fs::remove_file(&temp);
            return Err(self.io("storing", &path, e));
        }
        Ok(())
    }

    /// The image config's `commandLine`, empty if the image has no config or none in it. The
    /// config blob comes through the client, digest-verified.
    fn command_line(&self, client: &Client, image: &Image) -> Result<String, ImageError> {
        #[derive(Deserialize)]
        struct Config {
            #[serde(rename = "commandLine", default)]
            command_line: String,
        }
        let not_ironcore = |why: String| {
            ImageError::Permanent(format!(
                "image {:?} is not an IronCore image: {why}",
                shorten(&self.reference)
            ))
        };
        let Some(config) = image.config.clone() else {
            return Ok(String::new());
        };
        if config.media_type != MEDIA_CONFIG {
            return Err(not_ironcore(format!("config media type {:?}", config.media_type)));
        }
        if !is_sha256_digest(&config.digest) {
            return Err(not_ironcore(format!(
                "config digest {:?}",
                shorten(&config.digest)
            )));
        }
        if config.size > MAX_CONFIG_BYTES {
            return Err(not_ironcore(format!("a config of {} bytes", config.size)));
        }
        let blobs = self.blobs_dir()?;
        let temp = partial_in(&blobs);
        client
            .download(image, &config, &temp)
            .map_err(|e| self.error(e))?;
        let read = fs::read(&temp);
        let _ = fs::remove_file(&temp);
        let bytes = read.map_err(|e| self.io("reading", &temp, e))?;
        let config: Config =
            serde_json::from_slice(&bytes).map_err(|e| not_ironcore(format!("config: {e}")))?;
        Ok(config
            .command_line
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "))
    }

    fn write_record(&self, record: &Record) -> Result<(), ImageError> {
        let refs = self.private_dir(&self.dir.join("refs"))?;
        let path = self.record_path();
        let temp = partial_in(&refs);
        let bytes = serde_json::to_vec_pretty(record).expect("a record serializes");
        let written = (|| -> io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&temp, &path)?;
            File::open(&refs)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(self.io("writing", &path, e));
        }
        Ok(())
    }

    fn boot_image(&self, record: &Record) -> BootImage {
        let path = |digest: &Option<String>| digest.as_deref().map(|d| self.blob_path(d));
        BootImage {
            digest: record.manifest.clone(),
            kernel: path(&record.kernel),
            initramfs: path(&record.initramfs),
            cmdline: record.cmdline.clone(),
            rootfs: path(&record.rootfs),
        }
    }

    fn record_path(&self) -> PathBuf {
        self.dir.join("refs").join(format!("{}.json", self.key))
    }

    /// `blobs/sha256-<hex>`; the digest was checked by the download, and a record's digests
    /// were written by us, so the name has no path separators.
    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.replace(':', "-").replace('/', "_"))
    }

    fn blobs_dir(&self) -> Result<PathBuf, ImageError> {
        self.private_dir(&self.dir.join("blobs"))
    }

    /// Creates `dir` under the cache directory, both 0700.
    fn private_dir(&self, dir: &Path) -> Result<PathBuf, ImageError> {
        for dir in [self.dir.as_path(), dir] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o700)))
                .map_err(|e| self.io("creating", dir, e))?;
        }
        Ok(dir.to_path_buf())
    }

    fn io(&self, doing: &str, path: &Path, e: io::Error) -> ImageError {
        ImageError::Transient(format!(
            "image {:?}: {doing} {}: {e}",
            shorten(&self.reference),
            path.display()
        ))
    }

    /// Classifies an `ironcore-image` error and says what to do about it.
    fn error(&self, err: ironcore_image::Error) -> ImageError {
        use ironcore_image::Error;
        let reference = shorten(&self.reference);
        match err {
            Error::Reference { .. } => ImageError::Permanent(format!(
                "{err}; write [registry/]repository[:tag][@sha256:<digest>], or file:///dir for a local image"
            )),
            Error::Refused(m) => ImageError::Permanent(format!(
                "image {reference:?} refused: {m} (images.trusted_hosts in the machine provider's configuration)"
            )),
            Error::Image(m) => ImageError::Permanent(format!(
                "image {reference:?} cannot be used: {m}; use an IronCore image \
                 (config application/vnd.ironcore.image.config.v1+json)"
            )),
            Error::Registry(m) if m.contains("HTTP 404") => ImageError::Transient(format!(
                "image {reference:?} was not found in the registry ({m}); check the repository and tag, \
                 or push the image (retrying)"
            )),
            Error::Registry(m) if m.contains("HTTP 401") || m.contains("HTTP 403") => {
                ImageError::Transient(format!(
                    "image {reference:?}: the registry denies anonymous pulls ({m}); make the image public (retrying)"
                ))
            }
            Error::Registry(m) => ImageError::Transient(format!(
                "fetching image {reference:?}: {m} (retrying; a registry that serves plain HTTP must be listed \
                 in images.insecure_registries)"
            )),
            Error::Io(m) => ImageError::Transient(format!("fetching image {reference:?}: {m}")),
        }
    }
}

/// Removes the records in `dir/refs` not named in `keep` and the blobs no remaining record
/// names; returns the bytes freed.
fn prune(dir: &Path, keep: &HashSet<String>) -> io::Result<u64> {
    let mut named = HashSet::new();
    match fs::read_dir(dir.join("refs")) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().to_string();
                if !keep.contains(&name) {
                    fs::remove_file(entry.path())?;
                    continue;
                }
                // A record that cannot be read names nothing; the next fetch replaces it.
                if let Ok(record) = serde_json::from_slice::<Record>(&fs::read(entry.path())?) {
                    named.extend(
                        [record.kernel, record.initramfs, record.rootfs]
                            .into_iter()
                            .flatten(),
                    );
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let named: HashSet<String> = named.iter().map(|d| d.replace(':', "-")).collect();
    let mut freed = 0;
    match fs::read_dir(dir.join("blobs")) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().to_string();
                if !named.contains(&name) {
                    freed += entry.metadata()?.len();
                    fs::remove_file(entry.path())?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(freed)
}

/// A new name in `dir` for a file being written (unique in this process and across processes).
fn partial_in(dir: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(
        "{PARTIAL_PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn remove_partials(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

fn is_sha256_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// At most 200 characters of a reference, for messages.
fn shorten(reference: &str) -> String {
    reference.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_references_are_told_from_local_images() {
        for oci in [
            "ghcr.io/ironcore-dev/os-images/gardenlinux:1877.0",
            "localhost:5000/os@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "debian",
        ] {
            assert!(is_oci_reference(oci), "{oci}");
        }
        assert!(check_reference("ghcr.io/ironcore-dev/os-images/gardenlinux:1877.0").is_ok());
        assert!(check_reference("Upper/Case").unwrap_err().contains("file:///dir"));
        assert!(check_reference("/srv/images/os").is_err());
        for local in [
            "file:///srv/images/os",
            "/srv/images/os",
            "https://example.com/os.img",
            "",
        ] {
            assert!(!is_oci_reference(local), "{local}");
        }
    }

    #[test]
    fn cache_keys_depend_on_reference_and_architecture() {
        let key = cache_key("ghcr.io/a/b:1", "amd64");
        assert_eq!(key.len(), 64);
        assert_ne!(key, cache_key("ghcr.io/a/b:2", "amd64"));
        assert_ne!(key, cache_key("ghcr.io/a/b:1", "arm64"));
    }

    #[test]
    fn settings_default_and_refuse_unknown_fields() {
        let settings: ImageSettings =
            serde_json::from_str(r#"{"trusted_hosts":["registry.internal:5000"]}"#).unwrap();
        assert_eq!(settings.max_layer_bytes, DEFAULT_MAX_LAYER_BYTES);
        assert_eq!(settings.trusted_hosts, ["registry.internal:5000"]);
        assert!(serde_json::from_str::<ImageSettings>(r#"{"trusted_host":[]}"#).is_err());
    }
}
