// SPDX-License-Identifier: Apache-2.0
//! Durable object storage on the local filesystem: the ground truth of the embedded backend.
//!
//! Layout under the backend directory:
//!
//! ```text
//! buckets/<bucket>/credentials.json   the bucket's S3 key pair (mode 0600)
//! buckets/<bucket>/objects/<sha256>   one file per object: data, metadata, trailer
//! buckets/<bucket>/uploads/<id>/      a multipart upload: upload.json + one file per part
//! buckets/<bucket>/tmp/               objects being written (removed at start)
//! staging/                            buckets being created (removed at start)
//! trash/                              buckets being deleted (removed at start)
//! ```
//!
//! Why it is crash safe: an object is written to `tmp/`, its metadata appended as a trailer,
//! fsynced, renamed into `objects/`, and the directory fsynced before the request is
//! acknowledged. A file in `objects/` is therefore always complete, and data and metadata can
//! never disagree because they are one file replaced by one rename. Buckets appear and
//! disappear by one rename too (`staging/` → `buckets/` → `trash/`), so a crash never leaves a
//! half-created bucket or a half-deleted one that still answers.
//!
//! Why keys cannot escape: file names are the SHA-256 of the key, never the key itself; the
//! key is stored inside the file. Upload ids and bucket names are checked to be the shapes we
//! hand out before they become path components.

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    ops::Bound,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::limit::Limiter;

/// Marks the end of an object file; a file without it is not an object.
const MAGIC: &[u8; 8] = b"IRIOBJ01";
/// Trailer: metadata length (u64 LE) + magic.
const TRAILER_LEN: u64 = 16;
/// Upper bound of an object's metadata JSON, so a corrupt length cannot make us allocate much.
const MAX_META_LEN: u64 = 1 << 20;

/// What is stored about an object next to its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// The object key, verbatim.
    pub key: String,
    /// Data length in bytes.
    pub size: u64,
    /// The ETag without quotes: hex MD5, or `<hex md5 of part md5s>-<parts>` for multipart.
    pub etag: String,
    /// Last modification, Unix nanoseconds.
    pub modified: i64,
    /// `Content-Type` as uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// `Content-Encoding` as uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// `Content-Disposition` as uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_disposition: Option<String>,
    /// `Content-Language` as uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_language: Option<String>,
    /// `Cache-Control` as uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<String>,
    /// User metadata (`x-amz-meta-*`), names lower-case.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Number of parts for a multipart object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<u32>,
}

/// The headers an upload sets on the object it creates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectHeaders {
    /// `Content-Type`.
    #[serde(default)]
    pub content_type: Option<String>,
    /// `Content-Encoding`.
    #[serde(default)]
    pub content_encoding: Option<String>,
    /// `Content-Disposition`.
    #[serde(default)]
    pub content_disposition: Option<String>,
    /// `Content-Language`.
    #[serde(default)]
    pub content_language: Option<String>,
    /// `Cache-Control`.
    #[serde(default)]
    pub cache_control: Option<String>,
    /// User metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl ObjectMeta {
    /// Metadata for `key` with `headers`, written now.
    pub fn new(key: &str, size: u64, etag: String, headers: ObjectHeaders, parts: Option<u32>) -> Self {
        ObjectMeta {
            key: key.to_string(),
            size,
            etag,
            modified: now_nanos(),
            content_type: headers.content_type,
            content_encoding: headers.content_encoding,
            content_disposition: headers.content_disposition,
            content_language: headers.content_language,
            cache_control: headers.cache_control,
            metadata: headers.metadata,
            parts,
        }
    }

    /// The headers, to copy them onto another object.
    pub fn headers(&self) -> ObjectHeaders {
        ObjectHeaders {
            content_type: self.content_type.clone(),
            content_encoding: self.content_encoding.clone(),
            content_disposition: self.content_disposition.clone(),
            content_language: self.content_language.clone(),
            cache_control: self.cache_control.clone(),
            metadata: self.metadata.clone(),
        }
    }

    /// Last modification as a system time.
    pub fn modified_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(u64::try_from(self.modified).unwrap_or(0))
    }
}

/// A bucket's S3 key pair.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPair {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret, not even in debug output.
        f.debug_struct("KeyPair")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh random key pair: a 20-character access key id (the length AWS uses, so clients
    /// that validate it are happy) and a 40-character secret.
    pub fn generate() -> io::Result<KeyPair> {
        const ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        const SECRET_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut raw = [0u8; 57];
        getrandom::fill(&mut raw).map_err(|e| io::Error::other(e.to_string()))?;
        // 32 and 64 divide 256, so taking the byte modulo the alphabet has no bias.
        let id: String = std::iter::once("IRI".to_string())
            .chain(
                raw[..17]
                    .iter()
                    .map(|b| (ID_CHARS[usize::from(*b) % 32] as char).to_string()),
            )
            .collect();
        let secret: String = raw[17..]
            .iter()
            .map(|b| SECRET_CHARS[usize::from(*b) % 64] as char)
            .collect();
        Ok(KeyPair {
            access_key_id: id,
            secret_access_key: secret,
        })
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Objects, in key order.
    pub objects: Vec<ObjectMeta>,
    /// Common prefixes (with delimiter), in order.
    pub prefixes: Vec<String>,
    /// More entries follow.
    pub truncated: bool,
    /// The last key or common prefix returned: where the next page starts after.
    pub last: Option<String>,
}

/// A multipart upload as stored in `upload.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    /// The key the upload will create.
    pub key: String,
    /// Headers of the object to be.
    pub headers: ObjectHeaders,
    /// When it was initiated, Unix nanoseconds.
    pub initiated: i64,
}

/// A stored part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartMeta {
    /// Part number, 1..=10000.
    pub number: u32,
    /// Bytes.
    pub size: u64,
    /// Hex MD5 of the part's data.
    pub etag: String,
    /// When it was uploaded, Unix nanoseconds.
    pub modified: i64,
}

/// One bucket: its directory, the in-memory index of its objects, its credentials and limits.
pub struct BucketData {
    /// The bucket name (= the IRI bucket id).
    pub name: String,
    dir: PathBuf,
    index: Mutex<BTreeMap<String, ObjectMeta>>,
    /// Its key pair.
    pub keys: KeyPair,
    /// Its class limits.
    pub limiter: Limiter,
}

impl std::fmt::Debug for BucketData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketData")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Maps {
    buckets: HashMap<String, Arc<BucketData>>,
    /// access key id → bucket name.
    keys: HashMap<String, String>,
}

/// All buckets of the embedded backend.
pub struct Storage {
    root: PathBuf,
    maps: RwLock<Maps>,
    /// Serializes bucket creation and deletion (not object I/O).
    admin: Mutex<()>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single map operation or a rename; a panic cannot leave the
    // data half-updated, so poisoning carries no information.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether `name` is a bucket name we create: the IRI id shape (63 lowercase hex
/// characters), which is also a valid S3 bucket name. Checked before a name becomes a path.
pub fn is_bucket_name(name: &str) -> bool {
    iri_runtime::id::is_valid_id(name)
}

/// Whether `id` is an upload id we hand out (32 lowercase hex characters).
pub fn is_upload_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> io::Result<String> {
    let mut raw = vec![0u8; n];
    getrandom::fill(&mut raw).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(hex(&raw))
}

/// Now, Unix nanoseconds.
pub fn now_nanos() -> i64 {
    iri_runtime::id::now_nanos()
}

fn mkdir(path: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// fsyncs a directory, making renames and creations in it durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Removes everything inside `dir` (not `dir` itself).
fn clear_dir(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if fs::symlink_metadata(&path)?.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Writes `value` as JSON to `path` atomically (tmp file, fsync, rename, fsync dir), mode 0600.
fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("no parent directory"))?;
    let tmp = dir.join(format!(".tmp-{}", random_hex(8)?));
    let data = serde_json::to_vec(value).map_err(io::Error::other)?;
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&data)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Appends `meta` as the trailer of an object or part file and fsyncs it.
pub fn finish_file<T: Serialize>(file: &mut File, meta: &T) -> io::Result<()> {
    let json = serde_json::to_vec(meta).map_err(io::Error::other)?;
    file.write_all(&json)?;
    file.write_all(&(json.len() as u64).to_le_bytes())?;
    file.write_all(MAGIC)?;
    file.sync_all()
}

/// Reads the trailer of an object or part file; the data is the first `size` bytes.
pub fn read_trailer<T: for<'de> Deserialize<'de>>(file: &mut File) -> io::Result<T> {
    let len = file.metadata()?.len();
    if len < TRAILER_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "file too short for a trailer",
        ));
    }
    file.seek(SeekFrom::Start(len - TRAILER_LEN))?;
    let mut trailer = [0u8; TRAILER_LEN as usize];
    file.read_exact(&mut trailer)?;
    if &trailer[8..] != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "no object trailer"));
    }
    let meta_len = u64::from_le_bytes(trailer[..8].try_into().unwrap_or_default());
    if meta_len > MAX_META_LEN || meta_len > len - TRAILER_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad metadata length"));
    }
    file.seek(SeekFrom::Start(len - TRAILER_LEN - meta_len))?;
    let mut json = vec![0u8; meta_len as usize];
    file.read_exact(&mut json)?;
    serde_json::from_slice(&json).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

impl Storage {
    /// Opens (creating) the storage under `root`: removes what crashed creations, deletions
    /// and uploads left behind, and loads every bucket's credentials and object index.
    pub fn open(root: &Path) -> io::Result<Storage> {
        mkdir(root)?;
        for sub in ["buckets", "staging", "trash"] {
            mkdir(&root.join(sub))?;
        }
        // Half-created buckets never got credentials out; half-deleted ones were already
        // revoked. Both go.
        clear_dir(&root.join("staging"))?;
        clear_dir(&root.join("trash"))?;
        let storage = Storage {
            root: root.to_path_buf(),
            maps: RwLock::new(Maps::default()),
            admin: Mutex::new(()),
        };
        for entry in fs::read_dir(root.join("buckets"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if !is_bucket_name(&name) {
                tracing::warn!(name, "ignoring a foreign entry in the buckets directory");
                continue;
            }
            match BucketData::load(&name, &entry.path()) {
                Ok(bucket) => storage.insert(Arc::new(bucket)),
                Err(err) => tracing::error!(bucket = name, %err, "cannot load bucket; it is not served"),
            }
        }
        Ok(storage)
    }

    fn read_maps(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_maps(&self) -> std::sync::RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, bucket: Arc<BucketData>) {
        let mut maps = self.write_maps();
        maps.keys
            .insert(bucket.keys.access_key_id.clone(), bucket.name.clone());
        maps.buckets.insert(bucket.name.clone(), bucket);
    }

    /// The bucket called `name`.
    pub fn bucket(&self, name: &str) -> Option<Arc<BucketData>> {
        self.read_maps().buckets.get(name).cloned()
    }

    /// The bucket the access key `access_key_id` belongs to.
    pub fn bucket_of_key(&self, access_key_id: &str) -> Option<Arc<BucketData>> {
        let maps = self.read_maps();
        let name = maps.keys.get(access_key_id)?;
        maps.buckets.get(name).cloned()
    }

    /// Names of all buckets.
    pub fn bucket_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read_maps().buckets.keys().cloned().collect();
        names.sort();
        names
    }

    /// Creates bucket `name` with fresh credentials, or returns it if it exists.
    pub fn create_bucket(&self, name: &str) -> io::Result<Arc<BucketData>> {
        if !is_bucket_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a bucket name of ours"),
            ));
        }
        let _admin = lock(&self.admin);
        if let Some(bucket) = self.bucket(name) {
            if bucket.dir.join("credentials.json").exists() {
                return Ok(bucket);
            }
            // Someone removed the bucket's directory behind our back: its objects are gone,
            // so it is created anew, with new credentials (the old ones would open nothing).
            tracing::warn!(bucket = name, "bucket directory vanished; recreating the bucket");
            let mut maps = self.write_maps();
            maps.buckets.remove(name);
            maps.keys.remove(&bucket.keys.access_key_id);
        }
        let staging = self
            .root
            .join("staging")
            .join(format!("{name}-{}", random_hex(8)?));
        mkdir(&staging)?;
        for sub in ["objects", "uploads", "tmp"] {
            mkdir(&staging.join(sub))?;
        }
        write_json_atomic(&staging.join("credentials.json"), &KeyPair::generate()?)?;
        sync_dir(&staging)?;
        let target = self.root.join("buckets").join(name);
        fs::rename(&staging, &target)?;
        sync_dir(&self.root.join("buckets"))?;
        sync_dir(&self.root.join("staging"))?;
        let bucket = Arc::new(BucketData::load(name, &target)?);
        self.insert(bucket.clone());
        Ok(bucket)
    }

    /// Revokes bucket `name`'s credentials and removes it with all its data. Absent is success.
    pub fn delete_bucket(&self, name: &str) -> io::Result<()> {
        if !is_bucket_name(name) {
            return Ok(());
        }
        let trash = {
            let _admin = lock(&self.admin);
            {
                // Revoke first: from here on no request authenticates with its keys.
                let mut maps = self.write_maps();
                if let Some(bucket) = maps.buckets.remove(name) {
                    maps.keys.remove(&bucket.keys.access_key_id);
                }
            }
            let dir = self.root.join("buckets").join(name);
            if !dir.exists() {
                return Ok(());
            }
            // One rename takes the whole bucket out of service; a crash after it leaves only
            // trash, which the next start removes.
            let trash = self.root.join("trash").join(format!("{name}-{}", random_hex(8)?));
            fs::rename(&dir, &trash)?;
            sync_dir(&self.root.join("buckets"))?;
            trash
        };
        // Removing the data may take long; other buckets need not wait for it.
        fs::remove_dir_all(&trash)
    }
}

impl BucketData {
    fn load(name: &str, dir: &Path) -> io::Result<BucketData> {
        let keys: KeyPair = serde_json::from_slice(&fs::read(dir.join("credentials.json"))?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        mkdir(&dir.join("tmp"))?;
        mkdir(&dir.join("uploads"))?;
        mkdir(&dir.join("objects"))?;
        // Objects being written when the process died were never acknowledged.
        clear_dir(&dir.join("tmp"))?;
        // An upload directory without its upload.json was never acknowledged either
        // (CreateMultipartUpload answers only after upload.json is durable).
        for entry in fs::read_dir(dir.join("uploads"))? {
            let path = entry?.path();
            if !path.join("upload.json").exists() {
                fs::remove_dir_all(&path)?;
            }
        }
        let mut index = BTreeMap::new();
        for entry in fs::read_dir(dir.join("objects"))? {
            let path = entry?.path();
            let loaded = File::open(&path).and_then(|mut f| read_trailer::<ObjectMeta>(&mut f));
            match loaded {
                Ok(meta)
                    if path
                        .file_name()
                        .is_some_and(|n| *n == *object_file_name(&meta.key)) =>
                {
                    index.insert(meta.key.clone(), meta);
                }
                Ok(meta) => tracing::warn!(
                    bucket = name,
                    key = meta.key,
                    "object file under a wrong name; ignored"
                ),
                Err(err) => {
                    tracing::warn!(bucket = name, path = %path.display(), %err, "not an object file; ignored")
                }
            }
        }
        Ok(BucketData {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            index: Mutex::new(index),
            keys,
            limiter: Limiter::default(),
        })
    }

    /// A new temporary file for data being received, opened for writing.
    pub fn temp_file(&self) -> io::Result<(PathBuf, File)> {
        let path = self.dir.join("tmp").join(random_hex(16)?);
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok((path, file))
    }

    fn object_path(&self, key: &str) -> PathBuf {
        self.dir.join("objects").join(object_file_name(key))
    }

    /// Makes the finished temporary file `tmp` the object `meta.key` and durable.
    pub fn commit(&self, tmp: &Path, meta: ObjectMeta) -> io::Result<()> {
        let target = self.object_path(&meta.key);
        {
            // Rename and index change together, so the index always names the file on disk.
            let mut index = lock(&self.index);
            fs::rename(tmp, &target)?;
            index.insert(meta.key.clone(), meta);
        }
        sync_dir(&self.dir.join("objects"))
    }

    /// Removes object `key`; whether it existed.
    pub fn remove(&self, key: &str) -> io::Result<bool> {
        let existed = {
            let mut index = lock(&self.index);
            match fs::remove_file(self.object_path(key)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            index.remove(key).is_some()
        };
        sync_dir(&self.dir.join("objects"))?;
        Ok(existed)
    }

    /// Object `key`'s metadata, from the index.
    pub fn meta(&self, key: &str) -> Option<ObjectMeta> {
        lock(&self.index).get(key).cloned()
    }

    /// Opens object `key`: the open file (positioned at the start) and its metadata as stored
    /// in that very file, so a concurrent overwrite cannot mix two versions.
    pub fn open(&self, key: &str) -> io::Result<Option<(File, ObjectMeta)>> {
        let mut file = match File::open(self.object_path(key)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta: ObjectMeta = read_trailer(&mut file)?;
        if meta.key != key {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "object file holds another key",
            ));
        }
        file.seek(SeekFrom::Start(0))?;
        Ok(Some((file, meta)))
    }

    /// Number of objects and their total bytes.
    pub fn usage(&self) -> (usize, u64) {
        let index = lock(&self.index);
        (index.len(), index.values().map(|m| m.size).sum())
    }

    /// Lists keys under `prefix` after `after` (exclusive), rolling keys that contain
    /// `delimiter` past the prefix into common prefixes, at most `max` entries.
    pub fn list(&self, prefix: &str, delimiter: Option<&str>, after: Option<&str>, max: usize) -> Listing {
        let index = lock(&self.index);
        list_index(&index, prefix, delimiter, after, max)
    }

    fn upload_dir(&self, upload_id: &str) -> io::Result<PathBuf> {
        if !is_upload_id(upload_id) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such upload"));
        }
        Ok(self.dir.join("uploads").join(upload_id))
    }

    /// Starts a multipart upload; returns its id.
    pub fn create_upload(&self, upload: &Upload) -> io::Result<String> {
        let id = random_hex(16)?;
        let dir = self.dir.join("uploads").join(&id);
        mkdir(&dir)?;
        write_json_atomic(&dir.join("upload.json"), upload)?;
        sync_dir(&self.dir.join("uploads"))?;
        Ok(id)
    }

    /// Upload `upload_id`, if it exists and is for `key`.
    pub fn upload(&self, upload_id: &str, key: &str) -> io::Result<Option<Upload>> {
        let dir = self.upload_dir(upload_id);
        let Ok(dir) = dir else { return Ok(None) };
        match fs::read(dir.join("upload.json")) {
            Ok(data) => {
                let upload: Upload = serde_json::from_slice(&data)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                Ok((upload.key == key).then_some(upload))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn part_path(&self, upload_id: &str, number: u32) -> io::Result<PathBuf> {
        Ok(self.upload_dir(upload_id)?.join(format!("part-{number:05}")))
    }

    /// Makes the finished temporary file `tmp` part `meta.number` of `upload_id`.
    pub fn commit_part(&self, upload_id: &str, tmp: &Path, meta: &PartMeta) -> io::Result<()> {
        let target = self.part_path(upload_id, meta.number)?;
        fs::rename(tmp, &target)?;
        sync_dir(&self.upload_dir(upload_id)?)
    }

    /// The stored parts of `upload_id`, by number.
    pub fn parts(&self, upload_id: &str) -> io::Result<BTreeMap<u32, PartMeta>> {
        let mut parts = BTreeMap::new();
        for entry in fs::read_dir(self.upload_dir(upload_id)?)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if !name.starts_with("part-") {
                continue;
            }
            let meta: PartMeta = read_trailer(&mut File::open(entry.path())?)?;
            parts.insert(meta.number, meta);
        }
        Ok(parts)
    }

    /// Opens part `number` of `upload_id` at its start.
    pub fn open_part(&self, upload_id: &str, number: u32) -> io::Result<File> {
        File::open(self.part_path(upload_id, number)?)
    }

    /// The multipart uploads in progress whose key starts with `prefix`, as `(upload id,
    /// upload)` ordered by key, then initiation time.
    pub fn uploads(&self, prefix: &str) -> io::Result<Vec<(String, Upload)>> {
        let mut uploads = Vec::new();
        for entry in fs::read_dir(self.dir.join("uploads"))? {
            let entry = entry?;
            let id = entry.file_name().to_string_lossy().to_string();
            if !is_upload_id(&id) {
                continue;
            }
            let upload = match fs::read(entry.path().join("upload.json")) {
                Ok(data) => serde_json::from_slice::<Upload>(&data)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
                // Completed or aborted meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if upload.key.starts_with(prefix) {
                uploads.push((id, upload));
            }
        }
        uploads.sort_by(|a, b| (&a.1.key, a.1.initiated, &a.0).cmp(&(&b.1.key, b.1.initiated, &b.0)));
        Ok(uploads)
    }

    /// Removes upload `upload_id` and its parts.
    pub fn remove_upload(&self, upload_id: &str) -> io::Result<()> {
        let dir = self.upload_dir(upload_id)?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => sync_dir(&self.dir.join("uploads")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The file name of `key`'s object: the SHA-256 of the key in hex. Never derived from the key's
/// characters, so no key can name a path outside `objects/`.
pub fn object_file_name(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// The listing algorithm over a sorted index (see [`BucketData::list`]).
pub fn list_index(
    index: &BTreeMap<String, ObjectMeta>,
    prefix: &str,
    delimiter: Option<&str>,
    after: Option<&str>,
    max: usize,
) -> Listing {
    let mut listing = Listing::default();
    let delimiter = delimiter.filter(|d| !d.is_empty());
    // Start at the prefix or after the marker, whichever is later.
    let start = match after {
        Some(after) if after >= prefix => Bound::Excluded(after.to_string()),
        _ => Bound::Included(prefix.to_string()),
    };
    for (key, meta) in index.range::<String, _>((start, Bound::Unbounded)) {
        if !key.starts_with(prefix) {
            break;
        }
        let entry = match delimiter.and_then(|d| key[prefix.len()..].find(d).map(|i| (i, d))) {
            Some((i, d)) => {
                let common = &key[..prefix.len() + i + d.len()];
                // Keys under a prefix already returned (on this page or an earlier one).
                if listing.last.as_deref() == Some(common) || after.is_some_and(|a| common <= a) {
                    continue;
                }
                Err(common.to_string())
            }
            None => Ok(meta),
        };
        if listing.objects.len() + listing.prefixes.len() >= max {
            listing.truncated = true;
            break;
        }
        match entry {
            Ok(meta) => {
                listing.last = Some(meta.key.clone());
                listing.objects.push(meta.clone());
            }
            Err(common) => {
                listing.last = Some(common.clone());
                listing.prefixes.push(common);
            }
        }
    }
    listing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(keys: &[&str]) -> BTreeMap<String, ObjectMeta> {
        keys.iter()
            .map(|k| {
                (
                    k.to_string(),
                    ObjectMeta::new(k, 1, "e".into(), ObjectHeaders::default(), None),
                )
            })
            .collect()
    }

    fn names(l: &Listing) -> (Vec<&str>, Vec<&str>) {
        (
            l.objects.iter().map(|m| m.key.as_str()).collect(),
            l.prefixes.iter().map(String::as_str).collect(),
        )
    }

    #[test]
    fn lists_with_prefix_delimiter_and_pages() {
        let idx = index(&["a/1", "a/2", "a/b/3", "b", "c/1", "c/2", "d"]);
        let all = list_index(&idx, "", Some("/"), None, 1000);
        assert_eq!(names(&all), (vec!["b", "d"], vec!["a/", "c/"]));
        assert!(!all.truncated);

        let page1 = list_index(&idx, "", Some("/"), None, 2);
        assert_eq!(names(&page1), (vec!["b"], vec!["a/"]));
        assert!(page1.truncated);
        let page2 = list_index(&idx, "", Some("/"), page1.last.as_deref(), 2);
        assert_eq!(names(&page2), (vec!["d"], vec!["c/"]));
        assert!(!page2.truncated);

        let under_a = list_index(&idx, "a/", Some("/"), None, 1000);
        assert_eq!(names(&under_a), (vec!["a/1", "a/2"], vec!["a/b/"]));
        let flat = list_index(&idx, "c", None, None, 1000);
        assert_eq!(names(&flat), (vec!["c/1", "c/2"], vec![]));
        let after = list_index(&idx, "", None, Some("c/1"), 1000);
        assert_eq!(names(&after), (vec!["c/2", "d"], vec![]));
    }

    #[test]
    fn file_names_never_come_from_the_key() {
        for key in ["../../etc/passwd", "/abs", "a\0b", "", &"x".repeat(1024)] {
            let name = object_file_name(key);
            assert_eq!(name.len(), 64);
            assert!(name.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn objects_survive_reopen_and_temp_files_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let name = iri_runtime::id::new_id();
        let keys = {
            let storage = Storage::open(dir.path()).unwrap();
            let bucket = storage.create_bucket(&name).unwrap();
            let (tmp, mut file) = bucket.temp_file().unwrap();
            file.write_all(b"hello").unwrap();
            let meta = ObjectMeta::new("k/1", 5, "etag".into(), ObjectHeaders::default(), None);
            finish_file(&mut file, &meta).unwrap();
            bucket.commit(&tmp, meta).unwrap();
            // An unfinished write.
            let (_tmp, mut file) = bucket.temp_file().unwrap();
            file.write_all(b"partial").unwrap();
            bucket.keys.clone()
        };
        let storage = Storage::open(dir.path()).unwrap();
        let bucket = storage.bucket(&name).unwrap();
        assert_eq!(bucket.keys, keys);
        assert_eq!(storage.bucket_of_key(&keys.access_key_id).unwrap().name, name);
        let (mut file, meta) = bucket.open("k/1").unwrap().unwrap();
        let mut data = vec![0; meta.size as usize];
        file.read_exact(&mut data).unwrap();
        assert_eq!(data, b"hello");
        assert_eq!(
            fs::read_dir(dir.path().join("buckets").join(&name).join("tmp"))
                .unwrap()
                .count(),
            0
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("buckets").join(&name).join("credentials.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        storage.delete_bucket(&name).unwrap();
        assert!(storage.bucket_of_key(&keys.access_key_id).is_none());
        assert!(!dir.path().join("buckets").join(&name).exists());
        storage.delete_bucket(&name).unwrap();
    }
}
