// SPDX-License-Identifier: Apache-2.0
//! Where everything of backend `local` lives in its data directory, and how it is written.
//!
//! ```text
//! <dir>/lock                    flock held by the one provider that owns the directory
//! <dir>/daemon/                 qmp.sock, nbd.sock, pid, log of the storage daemon
//! <dir>/layers/<layer>.qcow2    every qcow2 file: a volume's active layer or a frozen one
//! <dir>/layers/<layer>.key      an encrypted layer's passphrase, wrapped with the provider's KEK
//! <dir>/volumes/<volume>.json   manifest: which layer is the volume's active layer, its limits
//! <dir>/snapshots/<snap>.json   manifest: which frozen layer is the snapshot
//! <dir>/images/<key>.json       manifest: which layer holds the image fetched from a reference
//! ```
//!
//! A file the storage daemon has open is never renamed, so the file names in the daemon's block
//! graph stay true. Every change of state commits with one atomic rename of a manifest (written
//! to a temporary name, fsynced, renamed, directory fsynced); everything written before the
//! commit is unreferenced until then, so a crash leaves only orphans that [`Layout`]'s listing
//! tells apart from live files and the start-up garbage collection removes.
//!
//! Every path is built from a validated id: volume and snapshot ids are the store's 63-hex ids,
//! layer ids are 30 hex characters (so that `l<layer>` fits QEMU's 31-character node names).

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{backend::Limits, keys::WrappedKey};

/// Length of a layer id (hex characters).
pub(super) const LAYER_ID_LEN: usize = 30;

/// Prefix of every temporary file: anything with it is a leftover of an interrupted write.
const TEMP_PREFIX: &str = ".tmp-";

/// The directory tree of one backend.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    root: PathBuf,
}

/// Whether `id` is a volume or snapshot id the store could have made (and so safe in a path).
pub(super) fn valid_object_id(id: &str) -> bool {
    iri_runtime::id::is_valid_id(id)
}

/// Whether `id` is a layer id we could have made.
pub(super) fn valid_layer_id(id: &str) -> bool {
    id.len() == LAYER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A fresh random layer id.
pub(super) fn new_layer_id() -> String {
    let mut id = iri_runtime::id::new_id();
    id.truncate(LAYER_ID_LEN);
    id
}

/// The backing-file name written into a qcow2 header for layer `id`.
///
/// Relative, so the data directory can move; `../layers/` resolves to the layers directory both
/// from `layers/` itself and from any sibling directory.
pub(super) fn backing_name(id: &str) -> String {
    format!("../layers/{id}.qcow2")
}

/// The layer a backing-file name refers to, if it is one of ours.
pub(super) fn parse_backing_name(name: &str) -> Option<String> {
    let id = name.strip_prefix("../layers/")?.strip_suffix(".qcow2")?;
    valid_layer_id(id).then(|| id.to_string())
}

/// Class limits as stored in a volume manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoredLimits {
    /// Bytes per second, 0 = unlimited.
    #[serde(default)]
    pub bytes_per_second: u64,
    /// Operations per second, 0 = unlimited.
    #[serde(default)]
    pub iops: u64,
}

impl From<Limits> for StoredLimits {
    fn from(l: Limits) -> Self {
        StoredLimits {
            bytes_per_second: l.bytes_per_second,
            iops: l.iops,
        }
    }
}

/// `volumes/<id>.json`: a volume exists exactly when its manifest does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct VolumeManifest {
    /// The active layer (the top of the volume's backing chain).
    pub layer: String,
    /// Throttle limits of the volume's export.
    #[serde(default)]
    pub limits: StoredLimits,
}

/// `snapshots/<id>.json`: a snapshot exists exactly when its manifest does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SnapshotManifest {
    /// The frozen layer that is the snapshot.
    pub layer: String,
    /// The volume it was taken of (for operators; the volume may be gone).
    #[serde(default)]
    pub volume: String,
}

/// `images/<key>.json` (key: SHA-256 of the reference): an image fetched once, kept as a
/// read-only layer that the volumes created from it share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ImageManifest {
    /// The reference it was fetched from.
    pub reference: String,
    /// The layer holding it (qcow2, no backing file).
    pub layer: String,
    /// SHA-256 of the fetched content, when computed.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The image's virtual size.
    pub size: u64,
}

/// Whether `key` is an image cache key (64 lowercase hex characters).
pub(super) fn valid_image_key(key: &str) -> bool {
    key.len() == 64
        && key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `layers/<layer>.key`: what opens an encrypted layer. Written before its layer, removed after
/// it, so that a layer on disk always has its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct LayerKey {
    /// The passphrase, wrapped.
    pub key: WrappedKey,
}

impl Layout {
    /// The tree under `root` (an absolute path).
    pub fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
        }
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directories (mode 0700) that are missing.
    pub fn create_dirs(&self) -> io::Result<()> {
        let mut builder = DirBuilder::new();
        builder.recursive(true).mode(0o700);
        for dir in [
            self.root.clone(),
            self.daemon_dir(),
            self.layers_dir(),
            self.volumes_dir(),
            self.snapshots_dir(),
            self.images_dir(),
        ] {
            builder.create(&dir)?;
            // An existing directory keeps its mode otherwise; sockets and data must not be
            // reachable by other users.
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// The directory lock file.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// The storage daemon's directory.
    pub fn daemon_dir(&self) -> PathBuf {
        self.root.join("daemon")
    }

    /// The storage daemon's QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.daemon_dir().join("qmp.sock")
    }

    /// The NBD server's socket.
    pub fn nbd_socket(&self) -> PathBuf {
        self.daemon_dir().join("nbd.sock")
    }

    /// The storage daemon's pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.daemon_dir().join("pid")
    }

    /// The storage daemon's stdout and stderr.
    pub fn log_file(&self) -> PathBuf {
        self.daemon_dir().join("log")
    }

    /// Where layers live.
    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// Where volume manifests live.
    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    /// Where snapshot manifests live.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Layer `id`'s file.
    pub fn layer(&self, id: &str) -> PathBuf {
        self.layers_dir().join(format!("{id}.qcow2"))
    }

    /// The image manifests and downloads.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Image `key`'s manifest.
    pub fn image(&self, key: &str) -> PathBuf {
        self.images_dir().join(format!("{key}.json"))
    }

    /// Image keys that have a manifest.
    pub fn list_images(&self) -> io::Result<Vec<String>> {
        list_ids(&self.images_dir(), ".json", valid_image_key)
    }

    /// Image `key`'s manifest, if it has one.
    pub fn read_image(&self, key: &str) -> io::Result<Option<ImageManifest>> {
        read_json(&self.image(key))
    }

    /// Commits image `key`'s manifest.
    pub fn write_image(&self, key: &str, manifest: &ImageManifest) -> io::Result<()> {
        self.write_json(&self.images_dir(), &self.image(key), manifest)
    }

    /// Layer `id`'s key file (encrypted layers only).
    pub fn layer_key(&self, id: &str) -> PathBuf {
        self.layers_dir().join(format!("{id}.key"))
    }

    /// Volume `id`'s manifest.
    pub fn volume(&self, id: &str) -> PathBuf {
        self.volumes_dir().join(format!("{id}.json"))
    }

    /// Snapshot `id`'s manifest.
    pub fn snapshot(&self, id: &str) -> PathBuf {
        self.snapshots_dir().join(format!("{id}.json"))
    }

    /// A fresh temporary name in `dir`.
    pub fn temp_in(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{TEMP_PREFIX}{}", new_layer_id()))
    }

    /// Volume ids that have a manifest.
    pub fn list_volumes(&self) -> io::Result<Vec<String>> {
        list_ids(&self.volumes_dir(), ".json", valid_object_id)
    }

    /// Snapshot ids that have a manifest.
    pub fn list_snapshots(&self) -> io::Result<Vec<String>> {
        list_ids(&self.snapshots_dir(), ".json", valid_object_id)
    }

    /// Layer ids that have a file.
    pub fn list_layers(&self) -> io::Result<Vec<String>> {
        list_ids(&self.layers_dir(), ".qcow2", valid_layer_id)
    }

    /// Layer ids that have a key file.
    pub fn list_layer_keys(&self) -> io::Result<Vec<String>> {
        list_ids(&self.layers_dir(), ".key", valid_layer_id)
    }

    /// Removes the temporary files interrupted writes left behind; returns how many.
    pub fn remove_temp_files(&self) -> io::Result<usize> {
        let mut removed = 0;
        for dir in [
            self.layers_dir(),
            self.volumes_dir(),
            self.snapshots_dir(),
            self.images_dir(),
        ] {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    remove_file_if_exists(&entry.path())?;
                    removed += 1;
                }
            }
            if removed > 0 {
                sync_dir(&dir)?;
            }
        }
        Ok(removed)
    }

    /// Volume `id`'s manifest, if it has one.
    pub fn read_volume(&self, id: &str) -> io::Result<Option<VolumeManifest>> {
        read_json(&self.volume(id))
    }

    /// Snapshot `id`'s manifest, if it has one.
    pub fn read_snapshot(&self, id: &str) -> io::Result<Option<SnapshotManifest>> {
        read_json(&self.snapshot(id))
    }

    /// Layer `id`'s key, if it has one.
    pub fn read_layer_key(&self, id: &str) -> io::Result<Option<LayerKey>> {
        read_json(&self.layer_key(id))
    }

    /// Writes layer `id`'s key (before the layer itself).
    pub fn write_layer_key(&self, id: &str, key: &LayerKey) -> io::Result<()> {
        self.write_json(&self.layers_dir(), &self.layer_key(id), key)
    }

    /// Commits volume `id`'s manifest.
    pub fn write_volume(&self, id: &str, manifest: &VolumeManifest) -> io::Result<()> {
        self.write_json(&self.volumes_dir(), &self.volume(id), manifest)
    }

    /// Commits snapshot `id`'s manifest.
    pub fn write_snapshot(&self, id: &str, manifest: &SnapshotManifest) -> io::Result<()> {
        self.write_json(&self.snapshots_dir(), &self.snapshot(id), manifest)
    }

    fn write_json<T: Serialize>(&self, dir: &Path, path: &Path, value: &T) -> io::Result<()> {
        let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
        let temp = self.temp_in(dir);
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&temp, path)?;
            sync_dir(dir)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written
    }
}

/// Makes a finished file durable and moves it to its final name: the commit of a new layer.
pub(super) fn install(temp: &Path, path: &Path) -> io::Result<()> {
    fs::set_permissions(temp, fs::Permissions::from_mode(0o600))?;
    File::open(temp)?.sync_all()?;
    fs::rename(temp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

/// Removes `path` durably; absent is fine. Returns whether it existed.
pub(super) fn remove_durably(path: &Path) -> io::Result<bool> {
    let existed = remove_file_if_exists(path)?;
    if existed {
        sync_dir(path.parent().unwrap_or(Path::new("/")))?;
    }
    Ok(existed)
}

fn remove_file_if_exists(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// fsyncs a directory, so that renames and unlinks in it survive a power loss.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn list_ids(dir: &Path, suffix: &str, valid: fn(&str) -> bool) -> io::Result<Vec<String>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name.strip_suffix(suffix).filter(|id| valid(id)) {
            ids.push(id.to_string());
        }
    }
    ids.sort();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_backing_names() {
        let id = new_layer_id();
        assert!(valid_layer_id(&id), "{id}");
        assert_eq!(parse_backing_name(&backing_name(&id)), Some(id.clone()));
        assert_eq!(parse_backing_name("/etc/passwd"), None);
        assert_eq!(parse_backing_name("../layers/../../x.qcow2"), None);
        assert_eq!(parse_backing_name(&format!("../volumes/{id}.qcow2")), None);
        assert!(!valid_layer_id(&"A".repeat(LAYER_ID_LEN)));
        assert!(!valid_object_id("../../etc"));
    }

    #[test]
    fn manifests_commit_atomically_and_temp_files_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create_dirs().unwrap();
        let id = iri_runtime::id::new_id();
        let manifest = VolumeManifest {
            layer: new_layer_id(),
            limits: StoredLimits {
                bytes_per_second: 1,
                iops: 2,
            },
        };
        layout.write_volume(&id, &manifest).unwrap();
        assert_eq!(layout.read_volume(&id).unwrap(), Some(manifest));
        assert_eq!(layout.list_volumes().unwrap(), vec![id.clone()]);
        let mode = fs::metadata(layout.volume(&id)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::write(layout.temp_in(&layout.volumes_dir()), b"half").unwrap();
        fs::write(layout.volumes_dir().join("unrelated.txt"), b"x").unwrap();
        assert_eq!(layout.remove_temp_files().unwrap(), 1);
        assert_eq!(layout.list_volumes().unwrap(), vec![id]);
        assert!(layout.volumes_dir().join("unrelated.txt").exists());
    }
}
