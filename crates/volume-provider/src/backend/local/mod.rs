// SPDX-License-Identifier: Apache-2.0
//! Backend `local`: volumes are qcow2 files in the data directory, owned and exported over NBD by
//! one qemu-storage-daemon that the provider starts (or adopts), supervises and stops.
//!
//! * **Files** (`layout.rs`): every qcow2 file is a *layer* `layers/<layer>.qcow2`; a volume is
//!   a manifest `volumes/<id>.json` naming its active layer (the top of a backing chain); a
//!   snapshot is a manifest `snapshots/<id>.json` naming a frozen layer. Layers are shared
//!   copy-on-write: a snapshot freezes the volume's active layer and puts a new empty one on top;
//!   a clone is a new empty layer over the snapshot's layer. Both take constant time.
//! * **Reference counting**: a layer lives while a volume or snapshot manifest reaches it
//!   through backing chains (read from the qcow2 headers); garbage collection after every
//!   delete and at every start removes the rest. Deleting a snapshot or a volume therefore never
//!   changes another volume's data, and a snapshot outlives its source volume.
//! * **Daemon** (`daemon.rs`, `graph.rs`): each volume is exported over NBD on `daemon/nbd.sock`
//!   under its id, through a throttle node carrying the class limits. The daemon outlives the
//!   provider (a restarted provider adopts it, the volumes stay served); a task restarts it when
//!   it dies and rebuilds every export from the manifests.
//! * **Crash safety**: every change commits with one atomic manifest rename (see `layout.rs`); what
//!   was written before the commit is an orphan that garbage collection removes; what follows
//!   it is completed from the manifest by [`LocalBackend::start`] and by every `ensure_volume`
//!   (a snapshot's switch to its new layer, an export lost with a daemon).
//! * **Sizes** round up to [`SIZE_GRANULARITY`]; the size reported is the qcow2 virtual size.
//!
//! Access: driver `nbd`, handle = the first 16 characters of the volume id (a stable disk
//! serial that fits virtio-blk's 20 bytes), attribute `uri` =
//! `nbd+unix:///<volume id>?socket=<absolute path of daemon/nbd.sock>`. The export is
//! writable and presents the raw volume data. Clients are disconnected when the daemon restarts
//! and when a volume is expanded (NBD has no way to announce a new size): they must reconnect
//! (QEMU: `reconnect-delay` on the NBD block driver).

mod daemon;
mod graph;
mod images;
mod layout;
mod qcow2;
mod tcp;

pub use tcp::TLS_HOSTNAME;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use nix::fcntl::{Flock, FlockArg};
use qmp::Qmp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::{
    daemon::Daemon,
    graph::{Change, Graph, Layer, VolumeSpec},
    layout::{ImageManifest, LayerKey, Layout, StoredLimits, VolumeManifest},
};
use super::{
    Access, Backend, BackendError, BackendResult, ImageRef, Inventory, Provisioned, Source, VolumePlan,
};
use crate::keys::{Kek, Passphrase, WrappedKey};

/// Volume sizes are rounded up to a multiple of this (1 MiB): small enough not to waste space,
/// and a multiple of every sector and qcow2 cluster size a guest or QEMU cares about.
pub const SIZE_GRANULARITY: u64 = 1 << 20;

/// The largest volume (1 PiB). qcow2 can address more, but its L1 table alone takes 16 MiB of
/// metadata per PiB, written when the volume is created.
pub const MAX_VOLUME_BYTES: u64 = 1 << 50;

/// The longest path a unix socket can have (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How often the supervisor checks the daemon connection.
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(200);

/// The least time a health check waits for its answer (three in a row must be missed).
const HEALTH_TIMEOUT_MIN: Duration = Duration::from_secs(2);

/// Health checks the daemon may miss in a row before it is deemed hung.
const HUNG_AFTER_MISSED: u32 = 3;

/// The longest pause between two attempts to restart the daemon.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// How long [`LocalBackend::start`] waits for the directory lock (a backend dropped a moment
/// ago may still be releasing it).
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// `[local]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalSettings {
    /// The qemu-storage-daemon binary.
    pub qemu_storage_daemon: PathBuf,
    /// The qemu-img binary (creates qcow2 files).
    pub qemu_img: PathBuf,
    /// Where to serve NBD over TCP with TLS for machines on other hosts (`ip:port`); empty:
    /// only the local unix socket.
    pub tcp_listen: String,
    /// The `host:port` remote clients use to reach `tcp_listen` (its host goes into the server
    /// certificate); empty: the listen address.
    pub tcp_advertise: String,
    /// Seconds between health checks of the storage daemon (a QMP query that must answer
    /// within the same time); after three missed answers in a row the daemon is deemed hung,
    /// killed and restarted, and every export rebuilt. 0 disables the checks.
    pub daemon_health_seconds: u64,
    /// Image hosts (`host` or `host:port`) fetched from even though they resolve to loopback,
    /// private or link-local addresses. Others are refused: image references come from API
    /// objects and must not reach the host's internal services.
    pub trusted_image_hosts: Vec<String>,
    /// Registries (`host[:port]`) reached over plain HTTP instead of HTTPS (loopback ones always
    /// are).
    pub insecure_registries: Vec<String>,
    /// Directories that `file://` image references may point into (none: `file://` is
    /// refused). Requests must not make the provider read arbitrary host files.
    pub image_dirs: Vec<PathBuf>,
    /// Milliseconds of PBKDF2 work in the LUKS key slot of each encrypted layer; every open of
    /// the layer (each start, each daemon restart) costs about as much.
    pub encryption_iter_time_ms: u64,
    /// Crash tests only: the process aborts, as if killed, when it passes this crash point
    /// (`<name>` or `<name>#<n>` for the n-th time). Not settable from a configuration file.
    #[doc(hidden)]
    #[serde(skip)]
    pub crash_at: Option<String>,
}

impl Default for LocalSettings {
    fn default() -> Self {
        LocalSettings {
            qemu_storage_daemon: PathBuf::from("qemu-storage-daemon"),
            qemu_img: PathBuf::from("qemu-img"),
            tcp_listen: String::new(),
            tcp_advertise: String::new(),
            daemon_health_seconds: 5,
            trusted_image_hosts: Vec::new(),
            insecure_registries: Vec::new(),
            image_dirs: Vec::new(),
            encryption_iter_time_ms: 200,
            crash_at: None,
        }
    }
}

/// Checks an image reference the way the backend will (`image_dirs` from [`LocalSettings`]);
/// the error says what is wrong with it.
pub fn check_image_reference(reference: &str, image_dirs: &[PathBuf]) -> Result<(), String> {
    images::parse(reference, image_dirs).map(drop)
}

/// The `local` backend.
pub struct LocalBackend {
    inner: Arc<Inner>,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("dir", &self.inner.layout.root())
            .field("daemon_pid", &self.daemon_pid())
            .finish()
    }
}

impl Drop for LocalBackend {
    fn drop(&mut self) {
        // The daemon stays: volumes keep being served, and the next backend adopts it.
        if let Some(supervisor) = self.supervisor.lock().unwrap_or_else(|e| e.into_inner()).take() {
            supervisor.abort();
        }
    }
}

struct Inner {
    layout: Layout,
    settings: LocalSettings,
    /// Unwraps the passphrases of encrypted layers.
    kek: Arc<Kek>,
    /// NBD over TCP with TLS, when configured.
    tls: Option<tcp::TlsEndpoint>,
    /// One lock per image being fetched: concurrent volumes of one image fetch it once, and a
    /// fetch never holds up operations on other volumes.
    image_fetches: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The NBD socket path, escaped for the query of an NBD URI.
    uri_socket: String,
    /// Serializes every change of files or of the daemon's graph, and the daemon restart.
    state: tokio::sync::Mutex<State>,
    /// The daemon connection; `None` while the daemon is down.
    daemon: Mutex<Option<Daemon>>,
    /// Set by [`LocalBackend::stop_daemon`]: nothing restarts the daemon any more.
    stopped: AtomicBool,
    /// Held for the backend's lifetime: one provider per data directory.
    _lock: Flock<File>,
    /// Passes through crash points (see [`LocalSettings::crash_at`]).
    crash_hits: AtomicU32,
}

#[derive(Default)]
struct State {
    /// Volumes known to be served as their manifest says, with the tip and limits they are
    /// served with. Emptied whenever the daemon changes; `ensure_volume` of a volume listed here
    /// needs no QMP round trip.
    served: HashMap<String, Served>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Served {
    tip: String,
    limits: StoredLimits,
}

impl LocalBackend {
    /// Opens the backend in `dir` (created if missing): takes the directory lock, adopts the
    /// running storage daemon or starts one, completes or rolls back what a crash interrupted,
    /// exports every volume, removes orphans, and starts supervising the daemon.
    pub async fn start(dir: &Path, settings: &LocalSettings, kek: Arc<Kek>) -> BackendResult<LocalBackend> {
        let setup =
            |what: &str, e: io::Error| BackendError::Transient(format!("{what} {}: {e}", dir.display()));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| setup("creating", e))?;
        let root = fs::canonicalize(dir).map_err(|e| setup("resolving", e))?;
        let layout = Layout::new(&root);
        for socket in [layout.qmp_socket(), layout.nbd_socket()] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(BackendError::Permanent(format!(
                    "{} is longer than a unix socket path may be ({MAX_SOCKET_PATH} bytes): choose a shorter data directory",
                    socket.display()
                )));
            }
        }
        layout
            .create_dirs()
            .map_err(|e| setup("creating the directories of", e))?;
        let lock = lock_dir(&layout).await?;
        let (daemon, origin) = daemon::start_or_adopt(&layout, &settings.qemu_storage_daemon).await?;
        let tls = match settings.tcp_listen.as_str() {
            "" => None,
            listen => Some(
                tcp::start(
                    listen,
                    &settings.tcp_advertise,
                    &layout.root().join("tls"),
                    layout.nbd_socket(),
                )
                .await?,
            ),
        };
        tracing::info!(dir = %root.display(), pid = daemon.pid, ?origin, "backend local started");
        let inner = Arc::new(Inner {
            uri_socket: uri_escape(&layout.nbd_socket().display().to_string()),
            layout,
            settings: settings.clone(),
            kek,
            tls,
            image_fetches: Mutex::default(),
            state: tokio::sync::Mutex::new(State::default()),
            daemon: Mutex::new(Some(daemon)),
            stopped: AtomicBool::new(false),
            _lock: lock,
            crash_hits: AtomicU32::new(0),
        });
        {
            let mut state = inner.state.lock().await;
            inner.recover(&mut state, true).await;
        }
        let supervisor = tokio::spawn(supervise(Arc::downgrade(&inner)));
        Ok(LocalBackend {
            inner,
            supervisor: Mutex::new(Some(supervisor)),
        })
    }

    /// Stops the storage daemon (volumes are no longer served) and its supervision. For tests
    /// and `--stop`; operations fail with [`BackendError::Transient`] afterwards.
    pub async fn stop_daemon(&self) -> BackendResult<()> {
        self.inner.stopped.store(true, Ordering::SeqCst);
        if let Some(supervisor) = self.supervisor.lock().unwrap_or_else(|e| e.into_inner()).take() {
            supervisor.abort();
        }
        let mut state = self.inner.state.lock().await;
        state.served.clear();
        let daemon = self.inner.daemon.lock().unwrap_or_else(|e| e.into_inner()).take();
        daemon::stop(daemon, &self.inner.layout).await;
        tracing::info!("storage daemon stopped");
        Ok(())
    }

    /// The pid of the storage daemon, while connected.
    pub fn daemon_pid(&self) -> Option<i32> {
        self.inner.connected().map(|d| d.pid)
    }

    /// The data directory (absolute).
    pub fn data_dir(&self) -> &Path {
        self.inner.layout.root()
    }

    /// Runs a read-only QMP query (a command named `query-*`) on the storage daemon, for
    /// diagnostics and tests: the daemon's monitor accepts only one client, this backend.
    pub async fn query(&self, command: &str) -> BackendResult<Value> {
        if !command.starts_with("query-") {
            return Err(BackendError::Permanent(format!("{command} is not a query")));
        }
        let qmp = self.inner.qmp()?;
        let arguments = if command == "query-named-block-nodes" {
            serde_json::json!({"flat": true})
        } else {
            Value::Null
        };
        qmp.execute_value(command, arguments)
            .await
            .map_err(|e| qmp_error(command, e))
    }
}

/// Takes the directory lock, waiting a little for a backend that is just being dropped.
async fn lock_dir(layout: &Layout) -> BackendResult<Flock<File>> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(layout.lock_file())
            .map_err(|e| BackendError::Transient(format!("opening {}: {e}", layout.lock_file().display())))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, errno)) if Instant::now() > deadline => {
                return Err(BackendError::Permanent(format!(
                    "{} is in use by another volume provider ({errno})",
                    layout.root().display()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Watches the daemon connection; when it is lost, restarts (or re-adopts) the daemon and
/// rebuilds every export. Holds only a weak reference between checks, so that dropping the
/// backend releases it.
async fn supervise(inner: Weak<Inner>) {
    let mut backoff = Duration::from_secs(1);
    let mut last_check = Instant::now();
    let mut missed = 0u32;
    loop {
        tokio::time::sleep(SUPERVISE_INTERVAL).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.stopped.load(Ordering::SeqCst) {
            return;
        }
        if let Some(daemon) = inner.connected() {
            backoff = Duration::from_secs(1);
            let period = Duration::from_secs(inner.settings.daemon_health_seconds);
            if period.is_zero() || last_check.elapsed() < period {
                continue;
            }
            last_check = Instant::now();
            // A daemon can hang without dying (a stuck disk, a deadlock): its exports stall,
            // and only an answer to a query tells it apart from a busy one.
            // A busy daemon (opening a long encrypted chain holds its monitor for a while) is
            // not a hung one: the answer gets more time than the period.
            let ping = daemon.qmp.clone().with_timeout(period.max(HEALTH_TIMEOUT_MIN));
            match ping.execute_value("query-version", Value::Null).await {
                Ok(_) => missed = 0,
                Err(err) => {
                    missed += 1;
                    tracing::warn!(pid = daemon.pid, %err, missed, "the storage daemon did not answer");
                    if missed >= HUNG_AFTER_MISSED {
                        tracing::error!(
                            pid = daemon.pid,
                            "the storage daemon is hung: killing it to restart it"
                        );
                        daemon::kill_hung(&daemon, &inner.layout).await;
                        missed = 0;
                    }
                }
            }
            continue;
        }
        let mut state = inner.state.lock().await;
        if inner.stopped.load(Ordering::SeqCst) || inner.connected().is_some() {
            continue;
        }
        let lost = inner.daemon.lock().unwrap_or_else(|e| e.into_inner()).take();
        state.served.clear();
        tracing::warn!(
            pid = lost.map(|d| d.pid),
            "lost the storage daemon: restarting it"
        );
        match daemon::start_or_adopt(&inner.layout, &inner.settings.qemu_storage_daemon).await {
            Ok((daemon, origin)) => {
                tracing::info!(
                    pid = daemon.pid,
                    ?origin,
                    "storage daemon back: rebuilding the exports"
                );
                *inner.daemon.lock().unwrap_or_else(|e| e.into_inner()) = Some(daemon);
                // Not a start: image fetches in flight keep their temporary files.
                inner.recover(&mut state, false).await;
            }
            Err(err) => {
                tracing::error!(%err, retry_in = ?backoff, "cannot restart the storage daemon");
                drop(state);
                drop(inner);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_RESTART_BACKOFF);
            }
        }
    }
}

impl Inner {
    /// Aborts the process here if the crash tests asked for it (see [`LocalSettings::crash_at`]).
    fn crash_point(&self, name: &str) {
        let Some(wanted) = &self.settings.crash_at else {
            return;
        };
        let (point, nth) = wanted.split_once('#').unwrap_or((wanted, "1"));
        if point == name && self.crash_hits.fetch_add(1, Ordering::SeqCst) + 1 == nth.parse().unwrap_or(1) {
            tracing::error!(point = wanted, "crash point reached: aborting");
            std::process::abort();
        }
    }

    /// The live daemon connection.
    fn connected(&self) -> Option<Daemon> {
        self.daemon
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|d| d.qmp.is_connected())
            .cloned()
    }

    /// The live daemon connection, or the transient error operations return without one.
    fn qmp(&self) -> BackendResult<Qmp> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(BackendError::Transient("the storage daemon was stopped".into()));
        }
        self.connected()
            .map(|d| d.qmp)
            .ok_or_else(|| BackendError::Transient("the storage daemon is down and being restarted".into()))
    }

    /// Brings the daemon and the files in line with the manifests after a start, a crash or a
    /// daemon restart: removes temporary files, exports that no manifest wants and their
    /// nodes, exports every volume (completing interrupted snapshot switches), and collects
    /// garbage. Failures are logged: what cannot be repaired now is retried by the next
    /// `ensure_volume` or the next start.
    async fn recover(&self, state: &mut State, startup: bool) {
        state.served.clear();
        let layout = self.layout.clone();
        if startup {
            match blocking(move || layout.remove_temp_files()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(files = n, "removed temporary files of interrupted writes"),
                Err(err) => tracing::warn!(%err, "removing temporary files"),
            }
        }
        let volumes = match self.layout.list_volumes() {
            Ok(volumes) => volumes,
            Err(err) => {
                tracing::error!(%err, "listing volumes");
                return;
            }
        };
        let qmp = self.qmp().ok();
        if let Some(qmp) = &qmp {
            match Graph::fetch(qmp).await {
                Ok(mut graph) => {
                    if let Err(err) = self.remove_strays(qmp, &mut graph, &volumes).await {
                        tracing::warn!(%err, "removing exports of deleted volumes");
                    }
                    for id in &volumes {
                        match self.serve(qmp, &mut graph, state, id).await {
                            Ok(Change::None) => {}
                            Ok(change) => tracing::info!(volume = %id, ?change, "volume exported"),
                            Err(err) => tracing::error!(volume = %id, %err, "cannot export volume"),
                        }
                    }
                }
                Err(err) => tracing::warn!(%err, "reading the storage daemon's graph"),
            }
        }
        match self.collect_garbage(qmp.as_ref()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(layers = n, "removed orphan layers"),
            Err(err) => tracing::warn!(%err, "garbage collection"),
        }
    }

    /// Removes exports, throttle nodes and throttle groups of volumes that have no manifest
    /// (a delete interrupted between unexporting and unlinking, or a daemon from elsewhere).
    async fn remove_strays(&self, qmp: &Qmp, graph: &mut Graph, volumes: &[String]) -> BackendResult<()> {
        let known: HashSet<&str> = volumes.iter().map(String::as_str).collect();
        for id in graph.exported_volumes() {
            if !known.contains(id.as_str()) {
                tracing::info!(volume = %id, "removing the export of a deleted volume");
                graph::teardown(qmp, graph, &id, &[])
                    .await
                    .map_err(|e| qmp_error("teardown", e))?;
            }
        }
        let prefixes: HashSet<String> = volumes.iter().map(|v| graph::throttle_node(v)).collect();
        for node in graph.throttle_nodes() {
            if !prefixes.contains(&node) {
                graph::remove_node(qmp, graph, &node)
                    .await
                    .map_err(|e| qmp_error("blockdev-del", e))?;
            }
        }
        for id in graph.secrets() {
            qmp.execute_value("object-del", serde_json::json!({"id": id}))
                .await
                .map_err(|e| qmp_error("object-del", e))?;
        }
        for id in graph.throttle_groups() {
            if !known.contains(id.as_str()) {
                graph::remove_throttle_group(qmp, graph, &id)
                    .await
                    .map_err(|e| qmp_error("object-del", e))?;
            }
        }
        Ok(())
    }

    /// Makes the daemon serve volume `id` as its manifest says.
    async fn serve(
        &self,
        qmp: &Qmp,
        graph: &mut Graph,
        state: &mut State,
        id: &str,
    ) -> BackendResult<Change> {
        state.served.remove(id);
        let manifest = self
            .read_volume(id)?
            .ok_or_else(|| BackendError::Permanent(format!("volume {id} not found")))?;
        let chain = self.open_chain(&manifest.layer)?;
        let spec = VolumeSpec {
            id,
            chain: &chain,
            limits: manifest.limits,
        };
        let change = graph::ensure_exported(qmp, graph, &spec)
            .await
            .map_err(|e| qmp_error("export", e))?;
        state.served.insert(
            id.to_string(),
            Served {
                tip: manifest.layer,
                limits: manifest.limits,
            },
        );
        Ok(change)
    }

    /// Serves volume `id` with `manifest`, with a QMP round trip only when it is not known to be
    /// served that way already.
    async fn ensure_served(
        &self,
        state: &mut State,
        id: &str,
        manifest: &VolumeManifest,
    ) -> BackendResult<Qmp> {
        let qmp = self.qmp()?;
        match state.served.get(id) {
            Some(served) if served.tip == manifest.layer && served.limits == manifest.limits => {}
            Some(served) if served.tip == manifest.layer => {
                if let Err(err) = graph::update_limits(&qmp, id, manifest.limits).await {
                    // Not known to be served right any more: the next call rebuilds what is off.
                    state.served.remove(id);
                    return Err(qmp_error("qom-set", err));
                }
                state.served.insert(
                    id.to_string(),
                    Served {
                        tip: manifest.layer.clone(),
                        limits: manifest.limits,
                    },
                );
                tracing::info!(volume = %id, limits = ?manifest.limits, "limits changed");
            }
            _ => {
                let mut graph = Graph::fetch(&qmp)
                    .await
                    .map_err(|e| qmp_error("reading the graph", e))?;
                let change = self.serve(&qmp, &mut graph, state, id).await?;
                if change != Change::None {
                    tracing::info!(volume = %id, ?change, "volume exported");
                }
            }
        }
        Ok(qmp)
    }

    /// Layer `tip` and its backing layers, from the top down. Every layer must exist and be
    /// one of ours: a chain that is not is damaged, and nothing can repair it.
    fn chain(&self, tip: &str) -> BackendResult<Vec<String>> {
        let mut chain = vec![tip.to_string()];
        loop {
            let layer = chain.last().cloned().unwrap_or_default();
            let header = self.header(&layer)?;
            let Some(backing) = header.backing else {
                return Ok(chain);
            };
            let below = layout::parse_backing_name(&backing).ok_or_else(|| {
                BackendError::Permanent(format!("layer {layer} has a foreign backing file {backing:?}"))
            })?;
            if chain.contains(&below) {
                return Err(BackendError::Permanent(format!(
                    "layer {layer}: backing chain loops"
                )));
            }
            chain.push(below);
        }
    }

    /// The header of layer `layer`.
    fn header(&self, layer: &str) -> BackendResult<qcow2::Header> {
        if !layout::valid_layer_id(layer) {
            return Err(BackendError::Permanent(format!("invalid layer id {layer:?}")));
        }
        qcow2::read_header(&self.layout.layer(layer)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BackendError::Permanent(format!("layer {layer} is missing")),
            io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => {
                BackendError::Permanent(format!("layer {layer} is damaged: {e}"))
            }
            _ => BackendError::Transient(format!("reading layer {layer}: {e}")),
        })
    }

    /// The image `reference` as a layer: from the cache, or fetched, checked and converted now.
    /// Runs without the state lock (a download may take long) except for the commit.
    async fn ensure_image(&self, image: &ImageRef) -> BackendResult<ImageManifest> {
        let reference = image.reference.as_str();
        let key = images::cache_key(reference, &image.architecture);
        let lock = self
            .image_fetches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let _fetching = lock.lock().await;
        let cached = |inner: &Inner| -> BackendResult<Option<ImageManifest>> {
            match inner.layout.read_image(&key) {
                Ok(Some(image)) if inner.layout.layer(&image.layer).exists() => Ok(Some(image)),
                Ok(_) => Ok(None),
                Err(e) => Err(io_error("reading an image manifest", e)),
            }
        };
        if let Some(image) = cached(self)? {
            return Ok(image);
        }
        let source = images::parse(reference, &self.settings.image_dirs)
            .map_err(|e| BackendError::Permanent(format!("image {reference:?}: {e}")))?;
        let download = self.layout.temp_in(&self.layout.images_dir());
        let context = images::FetchContext {
            image_dirs: self.settings.image_dirs.clone(),
            insecure_registries: self.settings.insecure_registries.clone(),
            architecture: image.architecture.clone(),
            policy: ironcore_image::Policy {
                trusted_hosts: self.settings.trusted_image_hosts.clone(),
            },
        };
        let (fetch_source, fetch_download) = (source.clone(), download.clone());
        let started = Instant::now();
        // Network and server trouble is retried (the server may come back, the file may
        // appear); a refused destination or content fails this volume. Nothing of either is
        // remembered: the next volume of the image fetches again.
        let fetch_error = |e: images::FetchError| match e {
            images::FetchError::Refused(m) => BackendError::Permanent(format!("image {reference:?}: {m}")),
            images::FetchError::Failed(m) => {
                BackendError::Transient(format!("fetching image {reference:?}: {m}"))
            }
        };
        let fetched =
            tokio::task::spawn_blocking(move || images::fetch(&fetch_source, &fetch_download, &context))
                .await
                .map_err(|e| BackendError::Transient(format!("image fetch task: {e}")))?
                .map_err(fetch_error)?;
        let layer = layout::new_layer_id();
        let temp = self.layout.temp_in(&self.layout.layers_dir());
        let converted = images::convert(&self.settings.qemu_img, &fetched.path, &temp).await;
        let _ = fs::remove_file(&fetched.path);
        let size = match converted {
            Ok(size) => size,
            Err(err) => {
                let _ = fs::remove_file(&temp);
                return Err(fetch_error(err));
            }
        };
        let manifest = ImageManifest {
            reference: reference.to_string(),
            layer: layer.clone(),
            sha256: Some(fetched.sha256),
            size,
        };
        // The commit: under the state lock, so that garbage collection never sees the layer
        // without the manifest that references it.
        let _state = self.state.lock().await;
        let (layout, key2, m, path) = (
            self.layout.clone(),
            key.clone(),
            manifest.clone(),
            self.layout.layer(&layer),
        );
        let committed = blocking(move || {
            layout::install(&temp, &path)?;
            // Shared by every volume of the image: nothing may write to it.
            fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
            layout.write_image(&key2, &m)
        })
        .await;
        if let Err(err) = committed {
            let _ = fs::remove_file(self.layout.layer(&layer));
            return Err(io_error("committing an image", err));
        }
        tracing::info!(
            image = reference, layer, size, sha256 = ?manifest.sha256,
            seconds = started.elapsed().as_secs_f64(), "image fetched"
        );
        Ok(manifest)
    }

    /// Layer `tip`'s chain as the daemon opens it: files and, for encrypted layers, passphrases.
    fn open_chain(&self, tip: &str) -> BackendResult<Vec<Layer>> {
        self.chain(tip)?
            .into_iter()
            .map(|id| {
                let key = match self.header(&id)?.encrypted {
                    true => Some(self.layer_passphrase(&id)?),
                    false => None,
                };
                Ok(Layer {
                    path: self.layout.layer(&id),
                    id,
                    key,
                })
            })
            .collect()
    }

    /// The wrapped passphrase of layer `layer` (which must be encrypted).
    /// A missing or unusable key is an operator's problem to fix (a key file or KEK restored
    /// from backup), so it is Transient: retried, never turned into VOLUME_ERROR.
    fn layer_key(&self, layer: &str) -> BackendResult<WrappedKey> {
        match self.layout.read_layer_key(layer) {
            Ok(Some(key)) => Ok(key.key),
            Ok(None) => Err(BackendError::Transient(format!(
                "layer {layer} is encrypted but its key file is missing"
            ))),
            Err(e) => Err(io_error(&format!("reading the key of layer {layer}"), e)),
        }
    }

    /// The passphrase of layer `layer` (which must be encrypted).
    fn layer_passphrase(&self, layer: &str) -> BackendResult<Passphrase> {
        self.kek
            .unwrap(&self.layer_key(layer)?)
            .map_err(|e| BackendError::Transient(format!("layer {layer}: {e}")))
    }

    fn read_volume(&self, id: &str) -> BackendResult<Option<VolumeManifest>> {
        self.layout
            .read_volume(id)
            .map_err(|e| io_error(&format!("reading volume {id}"), e))
    }

    /// Creates layer `layer`: `size` bytes, over `backing` if given, encrypted with `key` if
    /// given. The file appears under its final name complete and durable, or not at all; an
    /// encrypted layer's key file is written first, so that a layer never lacks its key.
    async fn create_layer(
        &self,
        layer: &str,
        size: u64,
        backing: Option<&str>,
        key: Option<&WrappedKey>,
    ) -> BackendResult<()> {
        let passphrase = match key {
            Some(key) => {
                let passphrase = self
                    .kek
                    .unwrap(key)
                    .map_err(|e| BackendError::Permanent(e.to_string()))?;
                let (layout, id, record) = (
                    self.layout.clone(),
                    layer.to_string(),
                    LayerKey { key: key.clone() },
                );
                blocking(move || layout.write_layer_key(&id, &record))
                    .await
                    .map_err(|e| io_error("writing a layer key", e))?;
                self.crash_point("layer-key-written");
                Some(passphrase)
            }
            None => None,
        };
        let encryption = passphrase.as_ref().map(|passphrase| qcow2::Encryption {
            passphrase,
            iter_time_ms: self.settings.encryption_iter_time_ms,
        });
        let temp = self.layout.temp_in(&self.layout.layers_dir());
        let backing = backing.map(layout::backing_name);
        if let Err(err) = qcow2::create(
            &self.settings.qemu_img,
            &temp,
            size,
            backing.as_deref(),
            encryption,
        )
        .await
        {
            let _ = fs::remove_file(&temp);
            return Err(BackendError::Transient(err));
        }
        let path = self.layout.layer(layer);
        let installed = {
            let temp = temp.clone();
            blocking(move || layout::install(&temp, &path)).await
        };
        installed.map_err(|e| {
            let _ = fs::remove_file(&temp);
            io_error("installing a new layer", e)
        })?;
        self.crash_point("layer-installed");
        Ok(())
    }

    /// Creates volume `plan.id` (which has no manifest yet) and commits its manifest.
    async fn create_volume(
        &self,
        plan: &VolumePlan,
        image: Option<&ImageManifest>,
    ) -> BackendResult<VolumeManifest> {
        let requested = round_size(plan.size_bytes)?;
        let (size, backing, key) = match &plan.source {
            Source::Empty => {
                if requested == 0 {
                    return Err(BackendError::Permanent("a volume needs a size above 0".into()));
                }
                (requested, None, plan.encryption.clone())
            }
            Source::Snapshot(snapshot) => {
                check_id(snapshot)?;
                let manifest = self
                    .layout
                    .read_snapshot(snapshot)
                    .map_err(|e| io_error(&format!("reading snapshot {snapshot}"), e))?
                    .ok_or_else(|| BackendError::Permanent(format!("snapshot {snapshot} not found")))?;
                // The whole chain must be readable (and its keys unwrap), or the clone would be
                // born broken.
                self.open_chain(&manifest.layer)?;
                let header = self.header(&manifest.layer)?;
                // A clone of an encrypted snapshot stays encrypted: with the key it was given
                // (its own writes; the snapshot's data keeps the snapshot's key), else with the
                // snapshot's. A clone of a plain snapshot given a key encrypts what it writes.
                let key = match (&plan.encryption, header.encrypted) {
                    (Some(key), _) => Some(key.clone()),
                    (None, true) => Some(self.layer_key(&manifest.layer)?),
                    (None, false) => None,
                };
                (requested.max(header.size), Some(manifest.layer), key)
            }
            Source::Image(source) => {
                let image = image.ok_or_else(|| {
                    BackendError::Transient(format!("image {:?} is not fetched yet", source.reference))
                })?;
                // Never smaller than the image: the guest sees all of it and room to grow.
                let size = requested.max(round_size(image.size)?);
                (size, Some(image.layer.clone()), plan.encryption.clone())
            }
        };
        let layer = layout::new_layer_id();
        self.create_layer(&layer, size, backing.as_deref(), key.as_ref())
            .await?;
        let manifest = VolumeManifest {
            layer: layer.clone(),
            limits: plan.limits.into(),
        };
        let committed = {
            let (layout, id, manifest) = (self.layout.clone(), plan.id.clone(), manifest.clone());
            blocking(move || layout.write_volume(&id, &manifest)).await
        };
        if let Err(err) = committed {
            let _ = fs::remove_file(self.layout.layer(&layer));
            return Err(io_error("committing the volume", err));
        }
        self.crash_point("volume-committed");
        tracing::info!(
            volume = %plan.id, layer, size, source = ?plan.source, encrypted = key.is_some(),
            "volume created"
        );
        Ok(manifest)
    }

    /// Removes every layer no manifest reaches; returns how many. Nothing is removed when a
    /// manifest or a reachable header cannot be read: an uncertain reference must never cost
    /// data.
    async fn collect_garbage(&self, qmp: Option<&Qmp>) -> BackendResult<usize> {
        let layout = self.layout.clone();
        let orphans = blocking(move || orphan_layers(&layout))
            .await
            .map_err(|e| io_error("scanning layers", e))?
            .map_err(|reason| BackendError::Permanent(format!("garbage collection skipped: {reason}")))?;
        let layout = self.layout.clone();
        blocking(move || remove_orphan_keys(&layout))
            .await
            .map_err(|e| io_error("removing orphan layer keys", e))?;
        if orphans.is_empty() {
            return Ok(0);
        }
        if let Some(qmp) = qmp {
            // A layer the daemon still has open as a named node (left by an interrupted
            // snapshot or teardown) is closed first, top layers before the ones below them.
            let mut graph = Graph::fetch(qmp)
                .await
                .map_err(|e| qmp_error("reading the graph", e))?;
            for layer in &orphans {
                let node = graph::layer_node(layer);
                if graph.has_node(&node) {
                    graph::remove_node(qmp, &mut graph, &node)
                        .await
                        .map_err(|e| qmp_error("blockdev-del", e))?;
                }
            }
        }
        self.crash_point("gc-closed");
        let layout = self.layout.clone();
        let count = orphans.len();
        blocking(move || {
            for layer in &orphans {
                // The layer before its key: a layer on disk always has its key.
                for path in [layout.layer(layer), layout.layer_key(layer)] {
                    match fs::remove_file(path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                tracing::debug!(layer, "orphan layer removed");
            }
            layout::sync_dir(&layout.layers_dir())
        })
        .await
        .map_err(|e| io_error("removing orphan layers", e))?;
        Ok(count)
    }

    fn access(&self, id: &str) -> Access {
        let mut access = Access {
            driver: "nbd".into(),
            handle: id[..16].to_string(),
            attributes: BTreeMap::from([(
                "uri".to_string(),
                format!("nbd+unix:///{id}?socket={}", self.uri_socket),
            )]),
            secret_data: BTreeMap::new(),
        };
        if let Some(tls) = &self.tls {
            let tls = &tls.access;
            access
                .attributes
                .insert("tcp_uri".into(), format!("nbd://{}/{id}", tls.address));
            access
                .attributes
                .insert("tls_hostname".into(), TLS_HOSTNAME.into());
            access
                .attributes
                .insert("tls_ca_cert".into(), tls.ca_cert.clone());
        }
        access
    }
}

/// Removes key files whose layer does not exist (a creation interrupted between the key and
/// the layer).
fn remove_orphan_keys(layout: &Layout) -> io::Result<()> {
    let layers: HashSet<String> = layout.list_layers()?.into_iter().collect();
    let mut removed = false;
    for key in layout.list_layer_keys()? {
        if !layers.contains(&key) {
            fs::remove_file(layout.layer_key(&key))?;
            removed = true;
        }
    }
    if removed {
        layout::sync_dir(&layout.layers_dir())?;
    }
    Ok(())
}

/// The layers no manifest reaches, each before the layers below it; `Err(reason)` when that
/// cannot be known for sure.
fn orphan_layers(layout: &Layout) -> io::Result<Result<Vec<String>, String>> {
    let layers: HashSet<String> = layout.list_layers()?.into_iter().collect();
    let mut roots = Vec::new();
    for id in layout.list_volumes()? {
        match layout.read_volume(&id) {
            Ok(Some(manifest)) => roots.push(manifest.layer),
            Ok(None) => {}
            Err(e) => return Ok(Err(format!("volume {id}: {e}"))),
        }
    }
    for id in layout.list_snapshots()? {
        match layout.read_snapshot(&id) {
            Ok(Some(manifest)) => roots.push(manifest.layer),
            Ok(None) => {}
            Err(e) => return Ok(Err(format!("snapshot {id}: {e}"))),
        }
    }
    // Images stay cached (fetched once) whether a volume uses them or not.
    for key in layout.list_images()? {
        match layout.read_image(&key) {
            Ok(Some(manifest)) => roots.push(manifest.layer),
            Ok(None) => {}
            Err(e) => return Ok(Err(format!("image {key}: {e}"))),
        }
    }
    let backing_of = |layer: &str| -> Result<Option<String>, String> {
        let header = qcow2::read_header(&layout.layer(layer)).map_err(|e| format!("layer {layer}: {e}"))?;
        match header.backing {
            None => Ok(None),
            Some(name) => layout::parse_backing_name(&name)
                .map(Some)
                .ok_or_else(|| format!("layer {layer} has a foreign backing file {name:?}")),
        }
    };
    let mut reachable = HashSet::new();
    while let Some(layer) = roots.pop() {
        if !reachable.insert(layer.clone()) {
            continue;
        }
        if !layers.contains(&layer) {
            return Ok(Err(format!("layer {layer} is referenced but missing")));
        }
        match backing_of(&layer) {
            Ok(Some(below)) => roots.push(below),
            Ok(None) => {}
            Err(reason) => return Ok(Err(reason)),
        }
    }
    // Order the orphans so that a layer comes before the one it is backed by.
    let mut below: HashMap<String, Option<String>> = HashMap::new();
    for layer in layers.iter().filter(|l| !reachable.contains(*l)) {
        // A damaged orphan is removed all the same.
        below.insert(layer.clone(), backing_of(layer).ok().flatten());
    }
    let mut ordered = Vec::with_capacity(below.len());
    while !below.is_empty() {
        let used: HashSet<&String> = below.values().flatten().collect();
        let mut tops: Vec<String> = below.keys().filter(|l| !used.contains(l)).cloned().collect();
        if tops.is_empty() {
            // A loop among orphans (only a damaged file can make one): any order will do.
            tops = below.keys().cloned().collect();
        }
        tops.sort();
        for layer in tops {
            below.remove(&layer);
            ordered.push(layer);
        }
    }
    Ok(Ok(ordered))
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    async fn ensure_volume(&self, plan: &VolumePlan) -> BackendResult<Provisioned> {
        check_id(&plan.id)?;
        let inner = &self.inner;
        let image = match &plan.source {
            Source::Image(image) if inner.read_volume(&plan.id)?.is_none() => {
                Some(inner.ensure_image(image).await?)
            }
            _ => None,
        };
        let mut state = inner.state.lock().await;
        let manifest = match inner.read_volume(&plan.id)? {
            Some(mut manifest) => {
                let limits = StoredLimits::from(plan.limits);
                if manifest.limits != limits {
                    manifest.limits = limits;
                    let (layout, id, m) = (inner.layout.clone(), plan.id.clone(), manifest.clone());
                    blocking(move || layout.write_volume(&id, &m))
                        .await
                        .map_err(|e| io_error("updating limits", e))?;
                }
                manifest
            }
            None => inner.create_volume(plan, image.as_ref()).await?,
        };
        inner.ensure_served(&mut state, &plan.id, &manifest).await?;
        let size = inner.header(&manifest.layer)?.size;
        Ok(Provisioned {
            size_bytes: size,
            access: inner.access(&plan.id),
        })
    }

    async fn delete_volume(&self, id: &str) -> BackendResult<()> {
        check_id(id)?;
        let inner = &self.inner;
        let mut state = inner.state.lock().await;
        let manifest = match inner.layout.read_volume(id) {
            Ok(None) => return Ok(()),
            Ok(Some(manifest)) => Some(manifest),
            // Unreadable: it goes all the same; its export and nodes are found by name, and
            // garbage collection closes and removes its layers.
            Err(err) if err.kind() == io::ErrorKind::InvalidData => None,
            Err(err) => return Err(io_error(&format!("reading volume {id}"), err)),
        };
        let chain = manifest
            .and_then(|m| inner.chain(&m.layer).ok())
            .unwrap_or_default();
        let qmp = inner.qmp()?;
        let mut graph = Graph::fetch(&qmp)
            .await
            .map_err(|e| qmp_error("reading the graph", e))?;
        state.served.remove(id);
        graph::teardown(&qmp, &mut graph, id, &chain)
            .await
            .map_err(|e| qmp_error("unexporting", e))?;
        inner.crash_point("volume-unexported");
        let path = inner.layout.volume(id);
        blocking(move || layout::remove_durably(&path))
            .await
            .map_err(|e| io_error("removing the volume", e))?;
        inner.crash_point("volume-removed");
        tracing::info!(volume = %id, "volume deleted");
        if let Err(err) = inner.collect_garbage(Some(&qmp)).await {
            // The volume is gone; its layers go at the next collection.
            tracing::warn!(volume = %id, %err, "garbage collection");
        }
        Ok(())
    }

    async fn expand_volume(&self, id: &str, size_bytes: u64) -> BackendResult<u64> {
        check_id(id)?;
        let target = round_size(size_bytes)?;
        let inner = &self.inner;
        let mut state = inner.state.lock().await;
        let manifest = inner
            .read_volume(id)?
            .ok_or_else(|| BackendError::Permanent(format!("volume {id} not found")))?;
        let qmp = inner.ensure_served(&mut state, id, &manifest).await?;
        let current = inner.header(&manifest.layer)?.size;
        if target <= current {
            // Never shrinks; the volume already is at least as large as asked.
            return Ok(current);
        }
        // An NBD export forbids resizing its node, and NBD cannot tell connected clients about a
        // new size anyway: the export goes away for the resize, and clients reconnect to see it.
        let mut graph = Graph::fetch(&qmp)
            .await
            .map_err(|e| qmp_error("reading the graph", e))?;
        state.served.remove(id);
        graph::remove_export(&qmp, &mut graph, id)
            .await
            .map_err(|e| qmp_error("unexporting", e))?;
        inner.crash_point("expand-unexported");
        let resized = graph::resize(&qmp, id, target).await;
        inner.crash_point("expand-resized");
        // Re-exported whatever the resize did; if this fails too, the next ensure_volume does it.
        graph::add_export(&qmp, &mut graph, id)
            .await
            .map_err(|e| qmp_error("re-exporting", e))?;
        resized.map_err(|e| qmp_error("block_resize", e))?;
        state.served.insert(
            id.to_string(),
            Served {
                tip: manifest.layer.clone(),
                limits: manifest.limits,
            },
        );
        let size = inner.header(&manifest.layer)?.size;
        tracing::info!(volume = %id, from = current, to = size, "volume expanded");
        Ok(size)
    }

    async fn create_snapshot(&self, snapshot_id: &str, volume_id: &str) -> BackendResult<u64> {
        check_id(snapshot_id)?;
        check_id(volume_id)?;
        let inner = &self.inner;
        let mut state = inner.state.lock().await;
        if let Some(snapshot) = inner
            .layout
            .read_snapshot(snapshot_id)
            .map_err(|e| io_error(&format!("reading snapshot {snapshot_id}"), e))?
        {
            return Ok(inner.header(&snapshot.layer)?.size);
        }
        let manifest = inner
            .read_volume(volume_id)?
            .ok_or_else(|| BackendError::Permanent(format!("volume {volume_id} not found")))?;
        // The switch below needs the daemon serving the volume's current tip; this also
        // completes a switch an earlier attempt left undone.
        let qmp = inner.ensure_served(&mut state, volume_id, &manifest).await?;
        let frozen = manifest.layer.clone();
        let header = inner.header(&frozen)?;
        let size = header.size;
        // The volume goes on with the key it had: its new writes stay encrypted alike.
        let key = match header.encrypted {
            true => Some(inner.layer_key(&frozen)?),
            false => None,
        };
        let overlay = layout::new_layer_id();
        inner
            .create_layer(&overlay, size, Some(&frozen), key.as_ref())
            .await?;
        let overlay_layer = Layer {
            path: inner.layout.layer(&overlay),
            id: overlay.clone(),
            key: match &key {
                Some(_) => Some(inner.layer_passphrase(&overlay)?),
                None => None,
            },
        };
        // Commit point: from here on the overlay is the volume's active layer, whether the
        // daemon has switched to it or not (ensure_volume and the start complete the switch).
        let switched = VolumeManifest {
            layer: overlay.clone(),
            limits: manifest.limits,
        };
        let committed = {
            let (layout, id, m) = (inner.layout.clone(), volume_id.to_string(), switched.clone());
            blocking(move || layout.write_volume(&id, &m)).await
        };
        if let Err(err) = committed {
            let _ = fs::remove_file(inner.layout.layer(&overlay));
            return Err(io_error("committing the new active layer", err));
        }
        state.served.remove(volume_id);
        inner.crash_point("snapshot-tip-committed");
        // blockdev-snapshot drains and flushes the old tip and moves the export onto the
        // overlay atomically: the frozen layer is a crash-consistent point in time.
        graph::switch_to_overlay(&qmp, &mut Graph::default(), &frozen, &overlay_layer)
            .await
            .map_err(|e| qmp_error("blockdev-snapshot", e))?;
        state.served.insert(
            volume_id.to_string(),
            Served {
                tip: overlay.clone(),
                limits: manifest.limits,
            },
        );
        inner.crash_point("snapshot-switched");
        let record = layout::SnapshotManifest {
            layer: frozen.clone(),
            volume: volume_id.to_string(),
        };
        let (layout, id) = (inner.layout.clone(), snapshot_id.to_string());
        // If this fails, the frozen layer stays in the volume's chain unnamed, and a retry
        // freezes the next one: no data is lost either way.
        blocking(move || layout.write_snapshot(&id, &record))
            .await
            .map_err(|e| io_error("committing the snapshot", e))?;
        inner.crash_point("snapshot-committed");
        tracing::info!(snapshot = %snapshot_id, volume = %volume_id, layer = frozen, size, "snapshot taken");
        Ok(size)
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> BackendResult<()> {
        check_id(snapshot_id)?;
        let inner = &self.inner;
        let _state = inner.state.lock().await;
        let path = inner.layout.snapshot(snapshot_id);
        let existed = blocking(move || layout::remove_durably(&path))
            .await
            .map_err(|e| io_error("removing the snapshot", e))?;
        if existed {
            inner.crash_point("snapshot-removed");
            tracing::info!(snapshot = %snapshot_id, "snapshot deleted");
            let qmp = inner.qmp().ok();
            if let Err(err) = inner.collect_garbage(qmp.as_ref()).await {
                tracing::warn!(snapshot = %snapshot_id, %err, "garbage collection");
            }
        }
        Ok(())
    }

    async fn available_bytes(&self) -> BackendResult<u64> {
        let stat = nix::sys::statvfs::statvfs(self.inner.layout.root())
            .map_err(|e| BackendError::Transient(format!("statvfs: {e}")))?;
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        Ok((stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64))
    }

    async fn inventory(&self) -> BackendResult<Inventory> {
        let inner = &self.inner;
        let mut state = inner.state.lock().await;
        let volumes = inner
            .layout
            .list_volumes()
            .map_err(|e| io_error("listing volumes", e))?;
        let snapshots = inner
            .layout
            .list_snapshots()
            .map_err(|e| io_error("listing snapshots", e))?;
        // The resync's cheap audit: a volume whose export is gone is no longer known to be
        // served, so its next ensure_volume rebuilds it.
        if let Ok(qmp) = inner.qmp()
            && let Ok(graph) = Graph::fetch(&qmp).await
        {
            state.served.retain(|id, _| graph.is_exported(id));
        }
        Ok(Inventory { volumes, snapshots })
    }
}

/// Rounds `bytes` up to the granularity; Permanent when it exceeds the largest volume.
fn round_size(bytes: u64) -> BackendResult<u64> {
    if bytes > MAX_VOLUME_BYTES {
        return Err(BackendError::Permanent(format!(
            "{bytes} bytes exceeds the largest volume ({MAX_VOLUME_BYTES} bytes)"
        )));
    }
    Ok(bytes.div_ceil(SIZE_GRANULARITY) * SIZE_GRANULARITY)
}

fn check_id(id: &str) -> BackendResult<()> {
    if layout::valid_object_id(id) {
        Ok(())
    } else {
        let shown: String = id.chars().take(80).collect();
        Err(BackendError::Permanent(format!("invalid id {shown:?}")))
    }
}

fn qmp_error(what: &str, err: qmp::Error) -> BackendError {
    BackendError::Transient(format!("{what}: {err}"))
}

fn io_error(what: &str, err: io::Error) -> BackendError {
    if err.kind() == io::ErrorKind::InvalidData {
        BackendError::Permanent(format!("{what}: {err}"))
    } else {
        BackendError::Transient(format!("{what}: {err}"))
    }
}

/// Runs file system work that may block (fsync) off the async workers.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

/// Percent-encodes `s` for the query of a URI (QEMU decodes it).
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_the_granularity() {
        assert_eq!(round_size(0).unwrap(), 0);
        assert_eq!(round_size(1).unwrap(), SIZE_GRANULARITY);
        assert_eq!(round_size(SIZE_GRANULARITY).unwrap(), SIZE_GRANULARITY);
        assert_eq!(round_size(SIZE_GRANULARITY + 1).unwrap(), 2 * SIZE_GRANULARITY);
        assert_eq!(round_size(MAX_VOLUME_BYTES).unwrap(), MAX_VOLUME_BYTES);
        assert!(matches!(
            round_size(MAX_VOLUME_BYTES + 1),
            Err(BackendError::Permanent(_))
        ));
        assert!(matches!(round_size(u64::MAX), Err(BackendError::Permanent(_))));
    }

    #[test]
    fn uris_escape_what_needs_it() {
        assert_eq!(uri_escape("/var/lib/x/nbd.sock"), "/var/lib/x/nbd.sock");
        assert_eq!(uri_escape("/a b/&c?#"), "/a%20b/%26c%3F%23");
    }

    #[test]
    fn ids_are_checked_before_they_reach_a_path() {
        assert!(check_id(&iri_runtime::id::new_id()).is_ok());
        for bad in [
            "",
            "../../etc/passwd",
            "ABC",
            &"a".repeat(64),
            &format!("{}/", "a".repeat(62)),
        ] {
            assert!(matches!(check_id(bad), Err(BackendError::Permanent(_))), "{bad}");
        }
    }
}
