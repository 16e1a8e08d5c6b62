// SPDX-License-Identifier: Apache-2.0
//! The reconciler: workers that drive each machine's QEMU toward what the store asks for and
//! write what QEMU reports back as status.
//!
//! A keyed queue is fed by the store's change feed, by QEMU (every QMP event and the exit of
//! QEMU wake the machine), and by a periodic resync. A machine is never reconciled by two
//! workers at once; failures are retried with exponential backoff.
//!
//! States never lie: PENDING until QEMU runs, then RUNNING or SUSPENDED (paused) from
//! `query-status`, STOPPED (or SUSPENDED, see `stopped_state`) while powered off, TERMINATING
//! from the delete request until the machine is gone.
//!
//! Power: POWER_OFF sends an ACPI power-down and forces QEMU off once the grace period passed.
//! A guest that powers itself off (QEMU exits) while its desired power is on is reported and
//! started again; with desired power off it stays off.
//!
//! Network interfaces are virtio-net devices with a MAC address derived from machine id and
//! NIC name, connected by the plugin `network_id` selects (see `network`: a tap on a configured
//! bridge, else isolated user-mode networking). `ips` are stored, not used (no IPAM here).
//!
//! Hot-plug: on a running machine, volumes and NICs the spec has and QEMU does not are added
//! into a free PCIe root port; ones QEMU has and the spec does not are unplugged, which the
//! guest must complete; until it has, they stay in status (the record keeps them in
//! `detaching`).
//!
//! Deletion: TERMINATING is written first, then QEMU is stopped and the machine directory
//! removed, then the record. Every step is idempotent, so a crash at any point resumes on the
//! next start, also when QEMU vanished on its own meanwhile.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use iri_api::machine::v1alpha1::{
    MachineState, MachineStatus, NetworkInterface, NetworkInterfaceState, NetworkInterfaceStatus, Volume,
    VolumeState, VolumeStatus,
};
use iri_runtime::{
    Change, Error, EventType, Object, ObjectFilter, Result, Store,
    handler::{self, blocking, record_event},
    id::now_nanos,
    metrics::Metrics,
    queue::{Outcome, QueueOptions, ReconcileQueue},
    warning::WarningGate,
};
use tokio::{sync::broadcast::error::RecvError, task::JoinHandle};
use tracing::Instrument;

use crate::{
    ceph,
    config::{Config, StoppedState},
    images::{self, ImageCache, ImageError},
    machines::{Machines, Running},
    nbd, network,
    qemu::{self, BootPlan, Disk, DiskSource, Nic, StartError},
    record::MachineRecord,
    server::{KernelImage, resolve_image},
};

/// The volume driver attached through NBD (the volume provider's).
pub const NBD_DRIVER: &str = "nbd";

/// The disk serial of an NBD volume: its handle, cut to virtio-blk's 20 bytes and to
/// characters that are safe in a QEMU option.
pub fn nbd_serial(handle: &str) -> String {
    handle
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(20)
        .collect()
}

/// The serial the guest sees for `volume`: its device name (e.g. `oda`), for NBD volumes the
/// handle, else the volume key; at most 20 bytes.
pub fn volume_serial(volume: &Volume) -> String {
    if let Some(connection) = volume.connection.as_ref().filter(|c| c.driver == NBD_DRIVER) {
        return nbd_serial(&connection.handle);
    }
    if volume.device.is_empty() {
        qemu::volume_key(&volume.name)
    } else {
        volume.device.clone()
    }
}

fn nic_of(bridges: &[String], id: &str, nic: &NetworkInterface) -> Nic {
    Nic {
        key: qemu::volume_key(&nic.name),
        mac: qemu::mac_address(id, &nic.name),
        plugin: network::plugin(bridges, id, &nic.name, &nic.network_id),
    }
}

fn nic_status(
    bridges: &[String],
    id: &str,
    nic: &NetworkInterface,
    attached: bool,
) -> NetworkInterfaceStatus {
    let wanted = nic_of(bridges, id, nic);
    NetworkInterfaceStatus {
        name: nic.name.clone(),
        handle: if attached {
            network::handle(&wanted.plugin, &wanted.mac)
        } else {
            String::new()
        },
        state: if attached {
            NetworkInterfaceState::NetworkInterfaceAttached as i32
        } else {
            NetworkInterfaceState::NetworkInterfacePending as i32
        },
    }
}

fn volume_status(volume: &Volume, attached: bool) -> VolumeStatus {
    VolumeStatus {
        name: volume.name.clone(),
        // The disk's serial, which is how the guest finds it.
        handle: if attached {
            volume_serial(volume)
        } else {
            String::new()
        },
        state: if attached {
            VolumeState::VolumeAttached as i32
        } else {
            VolumeState::VolumePending as i32
        },
    }
}

/// The size volume `volume` should have in the guest, when the spec says (a `local_disk` with
/// `size_bytes`, or a connection with `effective_storage_bytes`).
fn wanted_bytes(volume: &Volume) -> Option<u64> {
    let bytes = match (&volume.connection, &volume.local_disk) {
        // librbd's LUKS2 header sits inside the image: the guest's size is not the volume's,
        // so an encrypted ceph volume is not grown online.
        (Some(connection), _)
            if connection.driver == ceph::DRIVER && !connection.encryption_data.is_empty() =>
        {
            0
        }
        (Some(connection), _) => connection.effective_storage_bytes,
        (None, Some(disk)) if disk.image.is_none() => disk.size_bytes,
        _ => 0,
    };
    u64::try_from(bytes).ok().filter(|&b| b > 0)
}

/// How soon a machine in transition (starting, powering off) is looked at again.
const TRANSITION_POLL: Duration = Duration::from_millis(500);
/// The same warning about one machine is recorded as an event at most this often.
pub const WARNING_INTERVAL: Duration = Duration::from_secs(300);

/// A machine id and an event reason.
type WarningKey = (String, &'static str);

/// Machines, reconciled.
pub struct Reconciler {
    store: Store,
    machines: Arc<Machines>,
    config: Arc<Config>,
    /// OCI boot images, fetched into `<data-dir>/images`.
    images: ImageCache,
    queue: ReconcileQueue<String>,
    /// Holds back a warning repeated per machine and reason.
    warned: WarningGate<WarningKey>,
}

/// The running workers, change feed and resync; [`Workers::shut_down`] stops them.
pub struct Workers {
    queue: ReconcileQueue<String>,
    tasks: Vec<JoinHandle<()>>,
    feed: JoinHandle<()>,
}

impl Workers {
    /// Stops handing out work and lets workers finish the machine they are on (at most
    /// `grace`). QEMU processes keep running.
    pub async fn shut_down(self, grace: Duration) {
        self.queue.shut_down();
        self.feed.abort();
        let all = async {
            for task in self.tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(?grace, "reconcile workers did not finish in time");
        }
    }
}

fn ids(store: &Store) -> Vec<String> {
    store
        .list::<MachineRecord>(&ObjectFilter::default())
        .into_iter()
        .map(|s| s.object.id().to_string())
        .collect()
}

impl Reconciler {
    /// A reconciler over `store` and `machines`.
    pub fn new(store: Store, machines: Arc<Machines>, config: Arc<Config>) -> Arc<Self> {
        let queue = ReconcileQueue::new(QueueOptions {
            max_backoff: Duration::from_secs(30),
            ..QueueOptions::named("machine")
        });
        let images = ImageCache::new(config.server.data_dir.join("images"), config.images.clone());
        let reconciler = Arc::new(Reconciler {
            store,
            machines,
            images,
            config,
            queue,
            warned: WarningGate::new(WARNING_INTERVAL),
        });
        let queue = reconciler.queue.clone();
        reconciler
            .machines
            .set_wake(Arc::new(move |id: &str| queue.add(id.to_string())));
        reconciler
    }

    /// Removes machine directories (and their QEMU) that no record references: leftovers of
    /// a crash between removing a record's files and the record, or of a restored store. Runs
    /// before the workers start. Directories are listed before the store is read: a record is
    /// always written before its directory is made and removed after it.
    pub async fn remove_orphans(&self) {
        let inventory = self.machines.inventory();
        let known: HashSet<String> = ids(&self.store).into_iter().collect();
        for id in inventory.iter().filter(|id| !known.contains(*id)) {
            match self.machines.remove(id).await {
                Ok(()) => tracing::info!(id = %id, "removed an orphaned machine directory"),
                Err(err) => tracing::warn!(id = %id, %err, "cannot remove an orphaned machine directory"),
            }
        }
        // Cached boot images no machine names any more (deleted machines' images).
        let keep: HashSet<String> = self
            .store
            .list::<MachineRecord>(&ObjectFilter::default())
            .into_iter()
            .flat_map(|stored| stored.object.spec.unwrap_or_default().volumes)
            .filter_map(|v| v.local_disk?.image)
            .map(|image| image.image)
            .filter(|image| images::is_oci_reference(image))
            .collect();
        match self.images.prune(&keep).await {
            Ok(0) => {}
            Ok(freed) => tracing::info!(freed, "removed cached boot images no machine uses"),
            Err(err) => tracing::warn!(%err, "cannot prune cached boot images"),
        }
    }

    /// Forgets which machines failed to start for good: a provider restart retries them, since
    /// the operator may have fixed the cause (installed a firmware, freed a port) meanwhile.
    pub async fn retry_failed_starts(&self) {
        for stored in self.store.list::<MachineRecord>(&ObjectFilter::default()) {
            if stored.object.failed_generation != 0 {
                let id = stored.object.id().to_string();
                if let Err(err) = self
                    .update(&id, |r| {
                        r.failed_generation = 0;
                        Ok(())
                    })
                    .await
                {
                    tracing::warn!(%id, %err, "cannot reset a failed start");
                }
            }
        }
    }

    /// Starts `workers` workers, the change feed, and a resync every `resync`.
    pub fn start(
        self: &Arc<Self>,
        workers: usize,
        resync: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> Workers {
        if let Some(metrics) = &metrics {
            self.queue.register_metrics(metrics);
        }
        let changes = self.store.subscribe();
        let feed = tokio::spawn(self.clone().follow(changes));
        let store = self.store.clone();
        self.queue.spawn_resync(resync, move || ids(&store));
        let reconciler = self.clone();
        let queue = self.queue.clone();
        let run = tokio::spawn(async move {
            queue
                .run(workers, metrics, move |id: String| {
                    let reconciler = reconciler.clone();
                    async move {
                        let span = tracing::info_span!("machine", id = %id);
                        reconciler.reconcile(&id).instrument(span).await
                    }
                })
                .await
        });
        Workers {
            queue: self.queue.clone(),
            tasks: vec![run],
            feed,
        }
    }

    async fn follow(self: Arc<Self>, mut changes: tokio::sync::broadcast::Receiver<Change>) {
        loop {
            match changes.recv().await {
                Ok(change) if change.kind == MachineRecord::KIND && !change.removed => {
                    self.queue.add(change.id);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    for id in ids(&self.store) {
                        self.queue.add(id);
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// Records a Warning event unless the same one was recorded for this machine recently.
    async fn warn(
        &self,
        record: &MachineRecord,
        reason: &'static str,
        action: &'static str,
        message: String,
    ) {
        if !self.warned.admit((record.id().to_string(), reason), &message) {
            return;
        }
        tracing::warn!(id = %record.id(), reason, "{message}");
        record_event(
            &self.store,
            record.metadata.as_ref(),
            EventType::Warning,
            reason,
            action,
            message,
        )
        .await;
    }

    async fn event(
        &self,
        record: &MachineRecord,
        reason: &'static str,
        action: &'static str,
        message: String,
    ) {
        tracing::info!(id = %record.id(), reason, "{message}");
        record_event(
            &self.store,
            record.metadata.as_ref(),
            EventType::Normal,
            reason,
            action,
            message,
        )
        .await;
    }

    /// One pass over machine `id`.
    pub async fn reconcile(&self, id: &str) -> Result<Outcome> {
        let record = match self.store.get::<MachineRecord>(id) {
            Ok(stored) => stored.object,
            Err(Error::NotFound { .. }) => return Ok(Outcome::Done),
            Err(err) => return Err(err),
        };
        if record.is_deleting() {
            return self.delete(record).await;
        }
        let running = self.machines.running(id).await;
        let (state, outcome, present) = if record.wants_power_on() {
            self.power_on(&record, running).await?
        } else {
            let (state, outcome) = self.power_off(&record, running).await?;
            (state, outcome, None)
        };
        // Re-read: the volume sync may have changed private fields.
        let record = match self.store.get::<MachineRecord>(id) {
            Ok(stored) => stored.object,
            Err(Error::NotFound { .. }) => return Ok(Outcome::Done),
            Err(err) => return Err(err),
        };
        self.write_status(&record, state, present.as_ref()).await?;
        Ok(outcome)
    }

    async fn power_on(
        &self,
        record: &MachineRecord,
        running: Option<Arc<Running>>,
    ) -> Result<(MachineState, Outcome, Option<HashSet<String>>)> {
        if record.powerdown_sent_at != 0 {
            self.update(record.id(), |r| {
                r.powerdown_sent_at = 0;
                Ok(())
            })
            .await?;
        }
        if let Some(running) = running {
            return self.observe_and_sync(record, &running).await;
        }
        // A new QEMU gets the volumes and NICs of the spec: detaches of the old one are complete.
        self.finish_detaches(record, &record.detaching).await?;
        self.finish_nic_detaches(record, &record.detaching_nics).await?;
        if record.failed_generation == record.generation() {
            // Starting failed for good with this spec; a spec change (power off and on) retries.
            return Ok((MachineState::MachinePending, Outcome::Done, None));
        }
        let previous = record.state();
        if previous == MachineState::MachineRunning {
            // Every time, not rate-limited like other warnings: each stop is news.
            tracing::warn!(id = %record.id(), "the machine stopped without being asked to");
            record_event(
                &self.store,
                record.metadata.as_ref(),
                EventType::Warning,
                "Stopped",
                "Observe",
                "The machine stopped without being asked to (the guest powered off or QEMU exited); \
                 starting it again because its power is on"
                    .into(),
            )
            .await;
        }
        let plan = match self.plan(record).await {
            Ok(plan) => plan,
            Err(StartError::Permanent(reason)) => {
                return self.give_up(record, reason).await.map(|(s, o)| (s, o, None));
            }
            Err(StartError::Transient(reason)) => {
                self.warn(record, "StartFailed", "Start", reason.clone()).await;
                return Err(Error::Unavailable(reason));
            }
        };
        let started = Instant::now();
        match self.machines.start(&plan).await {
            Ok(running) => {
                self.event(
                    record,
                    "Started",
                    "Start",
                    format!("Started QEMU (pid {}) in {:?}", running.pid, started.elapsed()),
                )
                .await;
                self.observe_and_sync(record, &running).await
            }
            Err(StartError::Permanent(reason)) => {
                self.give_up(record, reason).await.map(|(s, o)| (s, o, None))
            }
            Err(StartError::Transient(reason)) => {
                self.warn(record, "StartFailed", "Start", reason.clone()).await;
                Err(Error::Unavailable(reason))
            }
        }
    }

    /// Records that this generation cannot be started; the machine stays PENDING.
    async fn give_up(&self, record: &MachineRecord, reason: String) -> Result<(MachineState, Outcome)> {
        let generation = record.generation();
        let failure = reason.clone();
        self.update(record.id(), move |r| {
            r.failed_generation = generation;
            r.failure.clone_from(&failure);
            Ok(())
        })
        .await?;
        self.warn(
            record,
            "StartFailed",
            "Start",
            format!("Cannot start the machine: {reason}"),
        )
        .await;
        Ok((MachineState::MachinePending, Outcome::Done))
    }

    async fn power_off(
        &self,
        record: &MachineRecord,
        running: Option<Arc<Running>>,
    ) -> Result<(MachineState, Outcome)> {
        let off = match self.config.stopped_state {
            StoppedState::Stopped => MachineState::MachineStopped,
            StoppedState::Suspended => MachineState::MachineSuspended,
        };
        let Some(running) = running else {
            self.finish_detaches(record, &record.detaching).await?;
            self.finish_nic_detaches(record, &record.detaching_nics).await?;
            if record.powerdown_sent_at != 0 {
                self.update(record.id(), |r| {
                    r.powerdown_sent_at = 0;
                    Ok(())
                })
                .await?;
                self.event(record, "PoweredOff", "PowerOff", "The machine powered off".into())
                    .await;
            }
            return Ok((off, Outcome::Done));
        };
        let grace = Duration::from_secs(self.config.power_off_grace_seconds);
        if record.powerdown_sent_at == 0 {
            if let Err(err) = running
                .qmp
                .execute_value("system_powerdown", serde_json::Value::Null)
                .await
            {
                return Err(Error::Unavailable(format!("system_powerdown: {err}")));
            }
            let now = now_nanos();
            self.update(record.id(), move |r| {
                r.powerdown_sent_at = now;
                Ok(())
            })
            .await?;
            self.event(
                record,
                "PoweringOff",
                "PowerOff",
                format!("Sent an ACPI power-down; forcing the machine off after {grace:?}"),
            )
            .await;
        } else {
            let elapsed =
                Duration::from_nanos(now_nanos().saturating_sub(record.powerdown_sent_at).max(0) as u64);
            if elapsed >= grace {
                self.machines.stop(record.id()).await;
                self.update(record.id(), |r| {
                    r.powerdown_sent_at = 0;
                    Ok(())
                })
                .await?;
                self.warn(
                    record,
                    "ForcedOff",
                    "PowerOff",
                    format!(
                        "The guest did not power off within {grace:?} of the ACPI power-down: forced it off"
                    ),
                )
                .await;
                return Ok((off, Outcome::Done));
            }
        }
        let (state, _) = self.observe(record, &running).await;
        Ok((state, Outcome::RequeueAfter(TRANSITION_POLL)))
    }

    /// The state of a running QEMU, with its volumes brought in line with the spec.
    async fn observe_and_sync(
        &self,
        record: &MachineRecord,
        running: &Running,
    ) -> Result<(MachineState, Outcome, Option<HashSet<String>>)> {
        let (state, outcome) = self.observe(record, running).await;
        if !matches!(
            state,
            MachineState::MachineRunning | MachineState::MachineSuspended
        ) {
            return Ok((state, outcome, None));
        }
        let (present, busy) = self.sync_volumes(record, running).await?;
        let outcome = if busy {
            Outcome::RequeueAfter(Duration::from_secs(1))
        } else {
            outcome
        };
        Ok((state, outcome, Some(present)))
    }

    /// The state of a running QEMU, and when to look again.
    async fn observe(&self, record: &MachineRecord, running: &Running) -> (MachineState, Outcome) {
        match running.run_state().await {
            Ok(state) => match state.as_str() {
                "running" => (MachineState::MachineRunning, Outcome::Done),
                "paused" | "suspended" => (MachineState::MachineSuspended, Outcome::Done),
                // QEMU is about to exit: what follows (a stop, a restart) is decided once it
                // has, from the state it had; look again soon.
                "shutdown" => (record.state(), Outcome::RequeueAfter(TRANSITION_POLL)),
                // prelaunch, inmigrate, restore-vm, finish-migrate...
                _ => (
                    MachineState::MachinePending,
                    Outcome::RequeueAfter(TRANSITION_POLL),
                ),
            },
            // QEMU is exiting (the connection closes) or hangs: keep the last state for the
            // moment and look again soon.
            Err(_) => (record.state(), Outcome::RequeueAfter(TRANSITION_POLL)),
        }
    }

    /// What to start the machine with: resolves the image, creates missing disks, writes the
    /// ignition file.
    async fn plan(&self, record: &MachineRecord) -> Result<BootPlan, StartError> {
        let spec = record.spec.clone().unwrap_or_default();
        let class = self.config.class(&spec.class).ok_or_else(|| {
            StartError::Permanent(format!("machine class {:?} is no longer configured", spec.class))
        })?;
        let dir = self.machines.dir(record.id());
        dir.create()
            .map_err(|e| StartError::Transient(format!("creating {}: {e}", dir.path().display())))?;
        let mut kernel = None;
        let mut disks = Vec::new();
        for volume in &spec.volumes {
            let mut rootfs = None;
            if let Some(image) = volume.local_disk.as_ref().and_then(|d| d.image.as_ref()) {
                if images::is_oci_reference(&image.image) {
                    let boot = self.images.boot_image(&image.image).await.map_err(|e| match e {
                        ImageError::Permanent(m) => StartError::Permanent(m),
                        ImageError::Transient(m) => StartError::Transient(m),
                    })?;
                    if let (Some(k), Some(i)) = (boot.kernel, boot.initramfs) {
                        kernel = Some(KernelImage {
                            kernel: k,
                            initramfs: i,
                            cmdline: boot.cmdline,
                        });
                    }
                    rootfs = boot.rootfs;
                } else {
                    kernel = Some(
                        resolve_image(&self.config.image_dirs, &image.image)
                            .map_err(StartError::Permanent)?,
                    );
                }
            }
            match self.disk(record.id(), volume, rootfs.as_deref()).await {
                Ok(Some(disk)) => disks.push(disk),
                Ok(None) => {}
                // A ceph volume that cannot be opened now (no monitor answers) does not keep
                // the machine from starting: it stays PENDING and is hot-plugged once it can.
                Err(StartError::Transient(reason))
                    if volume
                        .connection
                        .as_ref()
                        .is_some_and(|c| c.driver == ceph::DRIVER) =>
                {
                    tracing::info!(id = %record.id(), volume = %volume.name, "starting without it: {reason}");
                }
                Err(e) => return Err(e),
            }
        }
        let ignition = !spec.ignition_data.is_empty();
        if ignition {
            qemu::write_private(&dir.ignition(), &spec.ignition_data)
                .map_err(|e| StartError::Transient(format!("writing the ignition file: {e}")))?;
        } else {
            let _ = std::fs::remove_file(dir.ignition());
        }
        Ok(BootPlan {
            id: record.id().to_string(),
            cpus: class.cpus(),
            memory_bytes: class.memory_bytes(),
            kernel,
            ignition,
            nics: spec
                .network_interfaces
                .iter()
                .map(|n| nic_of(&self.config.bridges, record.id(), n))
                .collect(),
            hostname: spec.guest_config.map(|g| g.hostname).unwrap_or_default(),
            disks,
        })
    }

    /// The disk QEMU gets for `volume` of machine `id`, creating a local disk's image if
    /// missing; `None` for a volume without one (a boot image without size, a driver that is
    /// not implemented).
    /// `rootfs` is the raw disk image of the volume's OCI image, if it has one: the disk is made
    /// from a copy of it (never backed by the cached file, which may be pruned).
    async fn disk(
        &self,
        id: &str,
        volume: &Volume,
        rootfs: Option<&std::path::Path>,
    ) -> Result<Option<Disk>, StartError> {
        let key = qemu::volume_key(&volume.name);
        let serial = volume_serial(volume);
        if let Some(connection) = &volume.connection {
            if connection.driver == ceph::DRIVER {
                return self.rbd_disk(id, key, serial, connection).await.map(Some);
            }
            if connection.driver != NBD_DRIVER {
                // Reported PENDING with an event by write_status.
                return Ok(None);
            }
            let export = nbd::from_attributes(
                &connection.attributes,
                &self.config.nbd_socket_dirs,
                self.config.nbd_tls_dir.as_deref(),
            )
            .map_err(StartError::Permanent)?;
            return Ok(Some(Disk {
                key,
                source: DiskSource::Nbd(export),
                serial,
            }));
        }
        let Some(disk) = &volume.local_disk else {
            return Ok(None);
        };
        let dir = self.machines.dir(id);
        let path = dir.disk(&volume.name);
        if let Some(image) = &disk.image {
            if let Some(rootfs) = rootfs {
                dir.create()
                    .map_err(|e| StartError::Transient(format!("creating {}: {e}", dir.path().display())))?;
                qemu::create_disk_from(&path, rootfs, disk.size_bytes).await?;
                return Ok(Some(Disk {
                    key,
                    source: DiskSource::Qcow2(path),
                    serial,
                }));
            }
            if images::is_oci_reference(&image.image) {
                // Made at start from the image's rootfs (an image volume is not hot-plugged).
                return Ok(path.exists().then_some(Disk {
                    key,
                    source: DiskSource::Qcow2(path),
                    serial,
                }));
            }
            if disk.size_bytes == 0 {
                // The image is the boot volume; there is nothing to put on a disk.
                return Ok(None);
            }
        }
        let size = if disk.size_bytes > 0 {
            disk.size_bytes
        } else {
            self.config.default_local_disk_bytes
        };
        dir.create()
            .map_err(|e| StartError::Transient(format!("creating {}: {e}", dir.path().display())))?;
        qemu::create_disk(&path, size).await?;
        Ok(Some(Disk {
            key,
            source: DiskSource::Qcow2(path),
            serial,
        }))
    }

    /// The disk of a `ceph` volume: its access checked, a monitor reachable (else QEMU would
    /// block on it), the machine's `ceph.conf` and secret files (0600) written for a start.
    async fn rbd_disk(
        &self,
        id: &str,
        key: String,
        serial: String,
        connection: &iri_api::machine::v1alpha1::VolumeConnection,
    ) -> Result<Disk, StartError> {
        let rbd = ceph::from_connection(connection).map_err(StartError::Permanent)?;
        if !ceph::reachable(&rbd).await {
            let monitors: Vec<String> = rbd.monitors.iter().map(|(h, p)| format!("{h}:{p}")).collect();
            return Err(StartError::Transient(format!(
                "no Ceph monitor answers ({}); attached once one does",
                monitors.join(", ")
            )));
        }
        let dir = self.machines.dir(id);
        let written = dir
            .create()
            .and_then(|()| qemu::write_private(&dir.ceph_conf(), ceph::CONF.as_bytes()));
        let written = written.and_then(|()| {
            for object in ceph::secret_objects(&rbd, &key) {
                let id = object["id"].as_str().unwrap_or_default();
                let data = object["data"].as_str().unwrap_or_default();
                qemu::write_private(&dir.secret(id), data.as_bytes())?;
            }
            Ok(())
        });
        written.map_err(|e| StartError::Transient(format!("writing the volume's Ceph files: {e}")))?;
        Ok(Disk {
            key,
            source: DiskSource::Rbd {
                rbd,
                conf: dir.ceph_conf(),
            },
            serial,
        })
    }

    /// Brings the volumes of a running QEMU in line with the spec: hot-plugs what is missing
    /// into a free root port, unplugs what was detached (the guest must agree: the device stays
    /// until QEMU reports it gone), and cleans up after completed detaches. Returns the keys of
    /// the volume devices QEMU has now, and whether something is still in progress.
    async fn sync_volumes(
        &self,
        record: &MachineRecord,
        running: &Running,
    ) -> Result<(HashSet<String>, bool)> {
        let unavailable = |what: &str, e: qmp::Error| Error::Unavailable(format!("{what}: {e}"));
        let devices = running
            .peripherals()
            .await
            .map_err(|e| unavailable("listing devices", e))?;
        let mut present: HashSet<String> = devices.iter().filter_map(|d| qemu::key_of_device(d)).collect();
        let mut nics: HashSet<String> = devices.iter().filter_map(|d| qemu::key_of_nic(d)).collect();
        let ports: Vec<&String> = devices.iter().filter(|d| d.starts_with("rp")).collect();
        let spec = record.spec.clone().unwrap_or_default();
        let mut busy = false;
        let mut used = HashSet::new();
        for device in devices
            .iter()
            .filter(|d| qemu::key_of_device(d).is_some() || qemu::key_of_nic(d).is_some())
        {
            if let Ok(bus) = running.parent_bus(device).await {
                used.insert(bus);
            }
        }
        for volume in &spec.volumes {
            let key = qemu::volume_key(&volume.name);
            if present.contains(&key) {
                continue;
            }
            let disk = match self.disk(record.id(), volume, None).await {
                Ok(Some(disk)) => disk,
                Ok(None) => continue,
                Err(StartError::Permanent(reason) | StartError::Transient(reason)) => {
                    self.warn(
                        record,
                        "AttachVolumeFailed",
                        "AttachVolume",
                        format!("volume {:?}: {reason}", volume.name),
                    )
                    .await;
                    busy = true;
                    continue;
                }
            };
            let Some(port) = ports.iter().find(|p| !used.contains(p.as_str())) else {
                self.warn(
                    record,
                    "AttachVolumeFailed",
                    "AttachVolume",
                    format!(
                        "volume {:?}: no free hot-plug port (qemu.hotplug_ports); power the machine off and on to attach it",
                        volume.name
                    ),
                )
                .await;
                continue;
            };
            if let DiskSource::Nbd(nbd::Export { tls: Some(tls), .. }) = &disk.source {
                // A QEMU started without TLS volumes has no credentials object yet.
                match running
                    .qmp
                    .execute_value("object-add", nbd::tls_object(tls))
                    .await
                {
                    Ok(_) => {}
                    Err(qmp::Error::Command { desc, .. }) if desc.contains("already") => {}
                    Err(e) => return Err(unavailable("object-add", e)),
                }
            }
            if let DiskSource::Rbd { rbd, .. } = &disk.source {
                for object in ceph::secret_objects(rbd, &disk.key) {
                    match running.qmp.execute_value("object-add", object).await {
                        Ok(_) => {}
                        Err(qmp::Error::Command { desc, .. }) if desc.contains("already") => {}
                        Err(e) => return Err(unavailable("object-add", e)),
                    }
                }
            }
            for node in qemu::blockdevs(&disk) {
                match running.qmp.execute_value("blockdev-add", node).await {
                    Ok(_) => {}
                    // Left over from an attempt that failed at device_add: reuse it.
                    Err(qmp::Error::Command { desc, .. }) if desc.contains("Duplicate") => {}
                    Err(e) => return Err(unavailable("blockdev-add", e)),
                }
            }
            running
                .qmp
                .execute_value("device_add", qemu::device(&disk, Some(port)))
                .await
                .map_err(|e| unavailable("device_add", e))?;
            used.insert(port.to_string());
            present.insert(key);
            self.event(
                record,
                "VolumeAttached",
                "AttachVolume",
                format!("Attached volume {:?}", volume.name),
            )
            .await;
        }
        busy |= self
            .resize_volumes(record, running, &spec.volumes, &present)
            .await;
        let wanted: HashSet<String> = spec.volumes.iter().map(|v| qemu::volume_key(&v.name)).collect();
        for key in present.iter().filter(|k| !wanted.contains(*k)) {
            busy = true;
            // Repeated requests are refused while one is pending; the device goes once the
            // guest lets go of it (DEVICE_DELETED wakes us).
            let _ = running
                .qmp
                .execute_value("device_del", serde_json::json!({"id": qemu::device_id(key)}))
                .await;
        }
        let done: Vec<Volume> = record
            .detaching
            .iter()
            .filter(|v| !present.contains(&qemu::volume_key(&v.name)))
            .cloned()
            .collect();
        for volume in &done {
            let key = qemu::volume_key(&volume.name);
            for node in [format!("d{key}"), format!("f{key}")] {
                let _ = running
                    .qmp
                    .execute_value("blockdev-del", serde_json::json!({"node-name": node}))
                    .await;
            }
            // A ceph volume's secrets go with it, in QEMU and on disk.
            let dir = self.machines.dir(record.id());
            for secret in [ceph::key_secret_id(&key), ceph::passphrase_secret_id(&key)] {
                let _ = running
                    .qmp
                    .execute_value("object-del", serde_json::json!({"id": secret}))
                    .await;
                let _ = std::fs::remove_file(dir.secret(&secret));
            }
        }
        self.finish_detaches(record, &done).await?;

        // Network interfaces, the same way.
        for nic in &spec.network_interfaces {
            let wanted = nic_of(&self.config.bridges, record.id(), nic);
            if nics.contains(&wanted.key) {
                if let network::Plugin::Bridge { bridge, tap } = &wanted.plugin
                    && let Err(reason) = network::attach_tap(tap, bridge).await
                {
                    busy = true;
                    self.warn(
                        record,
                        "AttachNICFailed",
                        "AttachNetworkInterface",
                        format!("network interface {:?}: {reason}", nic.name),
                    )
                    .await;
                }
                continue;
            }
            let Some(port) = ports.iter().find(|p| !used.contains(p.as_str())) else {
                self.warn(
                    record,
                    "AttachNICFailed",
                    "AttachNetworkInterface",
                    format!(
                        "network interface {:?}: no free hot-plug port (qemu.hotplug_ports); power the machine off and on to attach it",
                        nic.name
                    ),
                )
                .await;
                continue;
            };
            match running
                .qmp
                .execute_value("netdev_add", qemu::netdev(&wanted))
                .await
            {
                Ok(_) => {}
                // Left over from an attempt that failed at device_add: reuse it.
                Err(qmp::Error::Command { desc, .. }) if desc.contains("Duplicate") => {}
                Err(e) => return Err(unavailable("netdev_add", e)),
            }
            running
                .qmp
                .execute_value("device_add", qemu::nic_device(&wanted, Some(port)))
                .await
                .map_err(|e| unavailable("device_add", e))?;
            used.insert(port.to_string());
            nics.insert(wanted.key);
            self.event(
                record,
                "NICAttached",
                "AttachNetworkInterface",
                format!("Attached network interface {:?}", nic.name),
            )
            .await;
        }
        let wanted: HashSet<String> = spec
            .network_interfaces
            .iter()
            .map(|n| qemu::volume_key(&n.name))
            .collect();
        for key in nics.iter().filter(|k| !wanted.contains(*k)) {
            busy = true;
            let _ = running
                .qmp
                .execute_value("device_del", serde_json::json!({"id": qemu::nic_device_id(key)}))
                .await;
        }
        let done: Vec<NetworkInterface> = record
            .detaching_nics
            .iter()
            .filter(|n| !nics.contains(&qemu::volume_key(&n.name)))
            .cloned()
            .collect();
        for nic in &done {
            let _ = running
                .qmp
                .execute_value(
                    "netdev_del",
                    serde_json::json!({"id": format!("u{}", qemu::volume_key(&nic.name))}),
                )
                .await;
        }
        self.finish_nic_detaches(record, &done).await?;
        present.extend(nics.into_iter().map(|k| qemu::nic_device_id(&k)));
        Ok((present, busy))
    }

    /// Grows the disks of a running QEMU that are smaller than the spec wants (UpdateVolume):
    /// `block_resize` of the disk's node, which tells the guest (virtio-blk announces the new
    /// capacity). An NBD client only learns an export's new size when it reconnects, and the
    /// volume provider drops its clients when it expands a volume: a read makes QEMU reconnect
    /// before the second try. Returns whether a resize is still pending.
    async fn resize_volumes(
        &self,
        record: &MachineRecord,
        running: &Running,
        volumes: &[Volume],
        present: &HashSet<String>,
    ) -> bool {
        let wanted: Vec<(&Volume, String, u64)> = volumes
            .iter()
            .filter_map(|v| Some((v, qemu::volume_key(&v.name), wanted_bytes(v)?)))
            .filter(|(_, key, _)| present.contains(key))
            .collect();
        if wanted.is_empty() {
            return false;
        }
        let sizes = match running.node_sizes().await {
            Ok(sizes) => sizes,
            Err(e) => {
                tracing::debug!(id = %record.id(), %e, "cannot read disk sizes");
                return true;
            }
        };
        let mut pending = false;
        for (volume, key, bytes) in wanted {
            let node = format!("d{key}");
            let Some(&current) = sizes.get(&node) else {
                continue;
            };
            if bytes <= current {
                continue;
            }
            let resize = || {
                running.qmp.execute_value(
                    "block_resize",
                    serde_json::json!({"node-name": node, "size": bytes}),
                )
            };
            let mut result = resize().await;
            if matches!(&result, Err(qmp::Error::Command { desc, .. }) if desc.contains("Cannot grow NBD")) {
                let _ = running
                    .qmp
                    .execute_value(
                        "human-monitor-command",
                        serde_json::json!({"command-line": format!("qemu-io {node} \"read 0 512\"")}),
                    )
                    .await;
                result = resize().await;
            }
            match result {
                Ok(_) => {
                    self.event(
                        record,
                        "VolumeResized",
                        "UpdateVolume",
                        format!("Volume {:?} grown from {current} to {bytes} bytes", volume.name),
                    )
                    .await;
                }
                Err(e) => {
                    pending = true;
                    self.warn(
                        record,
                        "ResizeVolumeFailed",
                        "UpdateVolume",
                        format!(
                            "volume {:?} cannot grow from {current} to {bytes} bytes yet (is the volume itself expanded?): {e}",
                            volume.name
                        ),
                    )
                    .await;
                }
            }
        }
        pending
    }

    /// Forgets detached network interfaces whose device is gone.
    async fn finish_nic_detaches(&self, record: &MachineRecord, done: &[NetworkInterface]) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let names: HashSet<String> = done.iter().map(|n| n.name.clone()).collect();
        self.update(record.id(), move |r| {
            r.detaching_nics.retain(|n| !names.contains(&n.name));
            Ok(())
        })
        .await?;
        for nic in done {
            self.event(
                record,
                "NICDetached",
                "DetachNetworkInterface",
                format!("Detached network interface {:?}", nic.name),
            )
            .await;
        }
        Ok(())
    }

    /// Forgets detached volumes whose device is gone, and removes the images of local disks
    /// among them (a local disk lives as long as its attachment).
    async fn finish_detaches(&self, record: &MachineRecord, done: &[Volume]) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let dir = self.machines.dir(record.id());
        for volume in done {
            if volume.local_disk.is_some()
                && !record
                    .spec
                    .as_ref()
                    .is_some_and(|s| s.volumes.iter().any(|v| v.name == volume.name))
            {
                let _ = std::fs::remove_file(dir.disk(&volume.name));
            }
        }
        let names: HashSet<String> = done.iter().map(|v| v.name.clone()).collect();
        self.update(record.id(), move |r| {
            r.detaching.retain(|v| !names.contains(&v.name));
            Ok(())
        })
        .await?;
        for volume in done {
            self.event(
                record,
                "VolumeDetached",
                "DetachVolume",
                format!("Detached volume {:?}", volume.name),
            )
            .await;
        }
        Ok(())
    }

    async fn delete(&self, record: MachineRecord) -> Result<Outcome> {
        let id = record.id().to_string();
        if record.state() != MachineState::MachineTerminating {
            self.write_status(&record, MachineState::MachineTerminating, None)
                .await?;
        }
        self.machines
            .remove(&id)
            .await
            .map_err(|e| Error::Internal(format!("removing the machine directory: {e}")))?;
        handler::remove_deleted::<MachineRecord>(&self.store, &id).await?;
        self.warned.retain(|(machine, _)| *machine != id);
        self.event(&record, "Deleted", "Delete", "Deleted the machine".into())
            .await;
        Ok(Outcome::Done)
    }

    /// Writes the observed status: `state`, the generation acted on, and per volume and NIC
    /// whether QEMU has it.
    async fn write_status(
        &self,
        record: &MachineRecord,
        state: MachineState,
        present: Option<&HashSet<String>>,
    ) -> Result<()> {
        let generation = record.generation();
        let running = state == MachineState::MachineRunning || state == MachineState::MachineSuspended;
        let spec = record.spec.clone().unwrap_or_default();
        let mut unsupported = Vec::new();
        let has_device = |v: &Volume| present.is_some_and(|p| p.contains(&qemu::volume_key(&v.name)));
        let mut volumes: Vec<VolumeStatus> = spec
            .volumes
            .iter()
            .map(|v| {
                // A boot image without a size is the kernel QEMU booted: attached while it runs.
                let boot_image = v
                    .local_disk
                    .as_ref()
                    .is_some_and(|d| d.image.is_some() && d.size_bytes == 0);
                let attached = running && (boot_image || has_device(v));
                if let Some(connection) = v
                    .connection
                    .as_ref()
                    .filter(|c| c.driver != NBD_DRIVER && c.driver != ceph::DRIVER)
                {
                    unsupported.push(format!("volume {:?} (driver {:?})", v.name, connection.driver));
                }
                volume_status(v, attached)
            })
            .collect();
        // A detach the guest has not completed yet: still there.
        volumes.extend(
            record
                .detaching
                .iter()
                .filter(|v| has_device(v) && !spec.volumes.iter().any(|s| s.name == v.name))
                .map(|v| volume_status(v, true)),
        );
        let has_nic = |n: &NetworkInterface| {
            present.is_some_and(|p| p.contains(&qemu::nic_device_id(&qemu::volume_key(&n.name))))
        };
        let mut network_interfaces: Vec<NetworkInterfaceStatus> = spec
            .network_interfaces
            .iter()
            .map(|n| nic_status(&self.config.bridges, record.id(), n, running && has_nic(n)))
            .collect();
        network_interfaces.extend(
            record
                .detaching_nics
                .iter()
                .filter(|n| has_nic(n) && !spec.network_interfaces.iter().any(|s| s.name == n.name))
                .map(|n| nic_status(&self.config.bridges, record.id(), n, true)),
        );
        if !unsupported.is_empty() && !record.is_deleting() {
            self.warn(
                record,
                "AttachmentNotSupported",
                "Attach",
                format!(
                    "Not attached (volume drivers nbd and ceph are implemented): {}",
                    unsupported.join(", ")
                ),
            )
            .await;
        }
        let status = MachineStatus {
            observed_generation: generation,
            state: state as i32,
            image_ref: String::new(),
            volumes,
            network_interfaces,
            machine_conditions: Vec::new(),
        };
        self.update(record.id(), move |r| {
            // A write racing with a newer spec must not claim to have seen it.
            let mut status = status.clone();
            status.observed_generation = status.observed_generation.min(r.generation());
            if r.is_deleting() && state != MachineState::MachineTerminating {
                status.state = MachineState::MachineTerminating as i32;
            }
            r.status = Some(status);
            Ok(())
        })
        .await
    }

    async fn update(
        &self,
        id: &str,
        f: impl FnMut(&mut MachineRecord) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let store = self.store.clone();
        let id = id.to_string();
        let mut f = f;
        match blocking(move || store.update::<MachineRecord>(&id, &mut f)).await {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(err),
        }
    }
}
