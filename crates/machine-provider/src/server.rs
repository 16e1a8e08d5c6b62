// SPDX-License-Identifier: Apache-2.0
//! The gRPC adapter: `machine.v1alpha1.MachineRuntime`.
//!
//! Every handler validates the request (InvalidArgument naming the field, NotFound for unknown
//! ids), turns it into one store write, and returns. Nothing here waits for QEMU: the store's
//! change feed wakes the reconciler, which starts, stops and removes QEMU processes and writes
//! the status. Lists are served from the store's in-memory cache.
//!
//! Validation mirrors the reference runtime (`iri-testing`). Deliberate differences:
//! * a boot image (`local_disk.image`) is an IronCore OCI image (`registry/repo:tag` or
//!   `@sha256:`; fetched when the machine starts, see `images`: its kernel and initramfs are
//!   booted directly, its rootfs becomes the volume's disk, grown to `size_bytes`, and an image
//!   without a kernel boots from that disk with UEFI firmware), or a local directory under one
//!   of the configured `image_dirs`, given as `file:///dir` or `/dir`, holding `vmlinuz` and
//!   `initramfs` (or `initramfs.cpio.gz`) for direct kernel boot;
//! * `connection` volumes of driver `nbd` (the volume provider's) are attached at start; their
//!   `uri` must name a socket inside `nbd_socket_dirs` (or NBD over TCP). Volumes of driver
//!   `ceph` are accepted as upstream's poollet sends them (their access is checked when they are
//!   attached: a malformed one stays PENDING with a Warning event naming the field, since the
//!   poollet re-sends the same spec). Other drivers round-trip, but are not attached: their
//!   status stays PENDING and a Warning event says why. Network interfaces are attached with
//!   the plugin their `network_id` selects (see `network`);
//! * AttachVolume/DetachVolume and AttachNetworkInterface/DetachNetworkInterface hot-plug and
//!   unplug `local_disk` (without image) and `nbd` volumes and NICs on a running machine (on a
//!   stopped one they take effect at the next start); a detached one stays in status until the
//!   guest has let go of it;
//! * UpdateVolume grows a volume online (a `local_disk`'s `size_bytes`, a connection's
//!   `effective_storage_bytes`): anything else it would change, or a smaller size, is
//!   InvalidArgument naming the field (detach and attach do that); the reconciler resizes the
//!   disk and the guest sees the new capacity without a reboot.
//!
//! # Capacity
//!
//! `Status` reports per class how many more machines of it fit: for every resource the class
//! names, `(host capacity − reserve − what every existing machine of every class holds) / what
//! one machine of the class needs`, the smallest of these, floored at 0. Machines hold their
//! resources from create until they are gone, powered off or not (they may be powered on at any
//! time). CreateMachine beyond that is RESOURCE_EXHAUSTED.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use iri_api::machine::v1alpha1::{
    AttachNetworkInterfaceRequest, AttachNetworkInterfaceResponse, AttachVolumeRequest, AttachVolumeResponse,
    CreateMachineRequest, CreateMachineResponse, DeleteMachineRequest, DeleteMachineResponse,
    DetachNetworkInterfaceRequest, DetachNetworkInterfaceResponse, DetachVolumeRequest, DetachVolumeResponse,
    ExecRequest, ExecResponse, ListEventsRequest, ListEventsResponse, ListMachinesRequest,
    ListMachinesResponse, Machine, MachineClass as IriMachineClass, MachineClassCapabilities,
    MachineClassStatus, MachineSpec, MachineState, MachineStatus, NetworkInterface, NetworkInterfaceState,
    NetworkInterfaceStatus, Power, StatusRequest, StatusResponse, UpdateMachineAnnotationsRequest,
    UpdateMachineAnnotationsResponse, UpdateMachinePowerRequest, UpdateMachinePowerResponse,
    UpdateVolumeRequest, UpdateVolumeResponse, VersionRequest, VersionResponse, Volume, VolumeState,
    VolumeStatus, machine_runtime_server,
};
use iri_runtime::{
    Error, EventType, ObjectFilter, Result, Store,
    error::reply,
    handler::{self, blocking, record_event},
    validate::{client_metadata, shorten, string_map},
};
use tonic::{Request, Response, Status};

use crate::{
    config::{Config, MachineClass},
    exec::ExecServer,
    record::MachineRecord,
};

/// `VersionResponse.runtime_name`: what poollets put in front of ids (`<name>://<id>`).
pub const RUNTIME_NAME: &str = "iri-machine-provider";

/// Longest volume or network interface name: a Kubernetes object name segment.
pub const MAX_NAME_BYTES: usize = 63;

/// The `MachineRuntime` service.
pub struct MachineService {
    store: Store,
    config: Arc<Config>,
    exec: Arc<ExecServer>,
    /// Serializes "is there room?" with the store write that takes the room, so concurrent
    /// creates cannot together promise more than there is.
    admission: tokio::sync::Mutex<()>,
}

impl MachineService {
    /// A service over `store` with the classes, capacity and image directories of `config`.
    pub fn new(store: Store, config: Arc<Config>, exec: Arc<ExecServer>) -> Self {
        MachineService {
            store,
            config,
            exec,
            admission: tokio::sync::Mutex::new(()),
        }
    }

    async fn insert_machine(&self, request: CreateMachineRequest) -> Result<Machine> {
        let machine = request.machine.ok_or_else(|| Error::required("machine"))?;
        let metadata = client_metadata("machine", machine.metadata)?;
        let spec = machine.spec.ok_or_else(|| Error::required("machine.spec"))?;
        self.validate_spec(&spec)?;

        let admission = self.admission.lock().await;
        let free = self.free_quantity(&spec.class);
        if free < 1 {
            return Err(Error::ResourceExhausted(format!(
                "no capacity left for machine class {:?}",
                spec.class
            )));
        }
        let record = MachineRecord {
            metadata: Some(metadata),
            status: Some(initial_status(&spec)),
            spec: Some(spec),
            ..Default::default()
        };
        let store = self.store.clone();
        let stored = blocking(move || store.create(record)).await?.object;
        drop(admission);

        tracing::info!(id = %stored.id(), class = %stored.class(), "machine created");
        record_event(
            &self.store,
            stored.metadata.as_ref(),
            EventType::Normal,
            "Created",
            "Create",
            format!("Created machine of class {:?}", stored.class()),
        )
        .await;
        Ok(stored.into_machine())
    }

    /// Checks everything about a spec that does not depend on state.
    fn validate_spec(&self, spec: &MachineSpec) -> Result<()> {
        if spec.class.is_empty() {
            return Err(Error::required("machine.spec.class"));
        }
        if self.config.class(&spec.class).is_none() {
            let known: Vec<&str> = self.config.classes.iter().map(|c| c.name.as_str()).collect();
            return Err(Error::invalid(
                "machine.spec.class",
                format!(
                    "unknown machine class {:?} (known: {})",
                    shorten(&spec.class),
                    known.join(", ")
                ),
            ));
        }
        validate_power("machine.spec.power", spec.power)?;
        if spec.ignition_data.len() > MAX_IGNITION_BYTES {
            return Err(Error::invalid(
                "machine.spec.ignition_data",
                format!(
                    "is {} bytes long, at most {MAX_IGNITION_BYTES} are allowed",
                    spec.ignition_data.len()
                ),
            ));
        }
        if let Some(guest) = &spec.guest_config
            && !guest.hostname.is_empty()
        {
            validate_hostname("machine.spec.guest_config.hostname", &guest.hostname)?;
        }
        let mut names = HashSet::new();
        let mut devices = HashSet::new();
        let mut boot = None;
        for (i, volume) in spec.volumes.iter().enumerate() {
            let field = format!("machine.spec.volumes[{i}]");
            validate_volume(&field, volume)?;
            if !names.insert(volume.name.as_str()) {
                return Err(Error::invalid(
                    format!("{field}.name"),
                    format!("duplicate volume name {:?}", shorten(&volume.name)),
                ));
            }
            if !volume.device.is_empty() && !devices.insert(volume.device.as_str()) {
                return Err(Error::invalid(
                    format!("{field}.device"),
                    format!("duplicate device {:?}", volume.device),
                ));
            }
            if let Some(image) = volume.local_disk.as_ref().and_then(|d| d.image.as_ref()) {
                let field = format!("{field}.local_disk.image.image");
                if let Some(first) = boot.replace(i) {
                    return Err(Error::invalid(
                        field,
                        format!(
                            "machine.spec.volumes[{first}] has a boot image already; only one volume may"
                        ),
                    ));
                }
                // OCI images are fetched when the machine starts (slow, and the registry may be
                // down for a while): here only the reference is checked.
                if crate::images::is_oci_reference(&image.image) {
                    crate::images::check_reference(&image.image)
                        .map_err(|reason| Error::invalid(field, reason))?;
                } else {
                    resolve_image(&self.config.image_dirs, &image.image)
                        .map_err(|reason| Error::invalid(field, reason))?;
                }
            }
            self.check_nbd(&field, volume)?;
        }
        let mut names = HashSet::new();
        for (i, nic) in spec.network_interfaces.iter().enumerate() {
            let field = format!("machine.spec.network_interfaces[{i}]");
            validate_nic(&field, nic)?;
            if !names.insert(nic.name.as_str()) {
                return Err(Error::invalid(
                    format!("{field}.name"),
                    format!("duplicate network interface name {:?}", shorten(&nic.name)),
                ));
            }
        }
        Ok(())
    }

    /// How many more machines of `class` fit (see the module docs).
    fn free_quantity(&self, class: &str) -> i64 {
        let Some(class) = self.config.class(class) else {
            return 0;
        };
        let free = self.free_resources();
        quantity(class, &free)
    }

    /// Host capacity minus reserve minus what every stored machine holds, per resource.
    fn free_resources(&self) -> BTreeMap<String, i64> {
        let mut free = self.config.host_capacity();
        for (name, reserved) in &self.config.reserve {
            if let Some(value) = free.get_mut(name) {
                *value = value.saturating_sub(*reserved);
            }
        }
        for stored in self.store.list::<MachineRecord>(&ObjectFilter::default()) {
            let Some(class) = self.config.class(stored.object.class()) else {
                // A class removed from the config while machines of it exist: what they hold
                // is unknown; they are reported at startup (see `run`).
                continue;
            };
            for (name, held) in &class.resources {
                if let Some(value) = free.get_mut(name) {
                    *value = value.saturating_sub(*held);
                }
            }
        }
        free
    }

    fn status(&self) -> Vec<MachineClassStatus> {
        let free = self.free_resources();
        self.config
            .classes
            .iter()
            .map(|class| MachineClassStatus {
                machine_class: Some(IriMachineClass {
                    name: class.name.clone(),
                    capabilities: Some(MachineClassCapabilities {
                        resources: class.resources.clone().into_iter().collect(),
                    }),
                }),
                quantity: quantity(class, &free),
            })
            .collect()
    }

    /// DeleteMachine: the reconciler stops QEMU and then removes the record.
    async fn request_deletion(&self, id: String) -> Result<()> {
        handler::request_deletion::<MachineRecord>(&self.store, id, "machine", "Deleting machine").await
    }

    async fn set_power(&self, request: UpdateMachinePowerRequest) -> Result<()> {
        let power = validate_power("power", request.power)?;
        let id = request.machine_id;
        let current = self.store.get::<MachineRecord>(&id)?.object;
        if current.spec.as_ref().is_some_and(|s| s.power == request.power) {
            return Ok(());
        }
        let store = self.store.clone();
        let updated = {
            let id = id.clone();
            blocking(move || {
                store.update::<MachineRecord>(&id, |record| {
                    if record.is_deleting() {
                        return Err(Error::FailedPrecondition(format!(
                            "machine {id:?} is being deleted"
                        )));
                    }
                    record.spec.get_or_insert_with(Default::default).power = power as i32;
                    Ok(())
                })
            })
            .await?
            .object
        };
        record_event(
            &self.store,
            updated.metadata.as_ref(),
            EventType::Normal,
            "PowerChanged",
            "UpdatePower",
            format!("Set power to {}", power.as_str_name()),
        )
        .await;
        Ok(())
    }

    async fn set_annotations(&self, request: UpdateMachineAnnotationsRequest) -> Result<()> {
        string_map("annotations", &request.annotations)?;
        let id = request.machine_id;
        self.store.get::<MachineRecord>(&id)?;
        let store = self.store.clone();
        let annotations = request.annotations;
        blocking(move || {
            store.update::<MachineRecord>(&id, |record| {
                // Annotations are metadata, not spec: replaced wholesale, generation untouched.
                record.metadata_mut_annotations().clone_from(&annotations);
                Ok(())
            })
        })
        .await?;
        Ok(())
    }

    /// The machine `id`, NotFound if unknown.
    fn machine(&self, id: &str) -> Result<MachineRecord> {
        Ok(self.store.get::<MachineRecord>(id)?.object)
    }

    async fn attach_volume(&self, request: AttachVolumeRequest) -> Result<()> {
        let volume = request.volume.ok_or_else(|| Error::required("volume"))?;
        validate_volume("volume", &volume)?;
        if volume.local_disk.as_ref().is_some_and(|d| d.image.is_some()) {
            return Err(Error::invalid(
                "volume.local_disk.image",
                "a boot image can only be given at CreateMachine, not attached later",
            ));
        }
        self.check_nbd("volume", &volume)?;
        let device_is_free = |attached: &[Volume], volume: &Volume| {
            if !volume.device.is_empty()
                && let Some(other) = attached.iter().find(|v| v.device == volume.device)
            {
                return Err(Error::invalid(
                    "volume.device",
                    format!(
                        "device {:?} is already used by volume {:?}",
                        volume.device, other.name
                    ),
                ));
            }
            Ok(())
        };
        self.attach(
            request.machine_id,
            volume,
            device_is_free,
            "VolumeAttaching",
            "AttachVolume",
        )
        .await
    }

    async fn detach_volume(&self, request: DetachVolumeRequest) -> Result<()> {
        self.detach::<Volume>(
            request.machine_id,
            request.name,
            "VolumeDetaching",
            "DetachVolume",
        )
        .await
    }

    /// Adds `item` to machine `id`'s spec, after the checks every attachment shares and, after
    /// those about its name, `check` against what is attached already; then records `reason`.
    async fn attach<T: Attachment>(
        &self,
        id: String,
        item: T,
        check: impl Fn(&[T], &T) -> Result<()> + Send + 'static,
        reason: &'static str,
        action: &'static str,
    ) -> Result<()> {
        self.machine(&id)?;
        let key = crate::qemu::volume_key(item.name());
        let name = item.name().to_string();
        let store = self.store.clone();
        let updated = blocking(move || {
            store.update::<MachineRecord>(&id, |record| {
                if record.is_deleting() {
                    return Err(Error::FailedPrecondition(format!("machine {id:?} is being deleted")));
                }
                let (attached, detaching) = T::lists(record);
                if attached.iter().any(|a| a.name() == item.name()) {
                    return Err(Error::AlreadyExists {
                        kind: T::KIND,
                        id: item.name().to_string(),
                    });
                }
                if detaching.iter().any(|d| d.name() == item.name()) {
                    return Err(Error::FailedPrecondition(format!(
                        "{} {:?} is still being detached from machine {id:?}; attach it again once it is gone",
                        T::NOUN,
                        item.name()
                    )));
                }
                check(attached, &item)?;
                if let Some(other) = attached
                    .iter()
                    .chain(detaching.iter())
                    .find(|a| crate::qemu::volume_key(a.name()) == key)
                {
                    // 64-bit hashes of names do not collide in practice; if they ever do, the
                    // devices would, so refuse rather than confuse them.
                    return Err(Error::invalid(
                        format!("{}.name", T::FIELD),
                        format!(
                            "{:?} collides with {} {:?}; choose another name",
                            item.name(),
                            T::NOUN,
                            other.name()
                        ),
                    ));
                }
                attached.push(item.clone());
                Ok(())
            })
        })
        .await?
        .object;
        record_event(
            &self.store,
            updated.metadata.as_ref(),
            EventType::Normal,
            reason,
            action,
            format!("Attaching {} {name:?}", T::NOUN),
        )
        .await;
        Ok(())
    }

    /// Moves the attachment `name` of machine `id` from its spec to the detaching ones, then
    /// records `reason`. NotFound when it is not attached (any more).
    async fn detach<T: Attachment>(
        &self,
        id: String,
        name: String,
        reason: &'static str,
        action: &'static str,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::required("name"));
        }
        self.machine(&id)?;
        let store = self.store.clone();
        let updated = {
            let name = name.clone();
            blocking(move || {
                store.update::<MachineRecord>(&id, |record| {
                    let (attached, detaching) = T::lists(record);
                    let at = attached
                        .iter()
                        .position(|a| a.name() == name)
                        .ok_or_else(|| Error::not_found(T::KIND, name.clone()))?;
                    let item = attached.remove(at);
                    // The device goes when the guest lets go of it; until then it stays in status.
                    detaching.retain(|d| d.name() != item.name());
                    detaching.push(item);
                    Ok(())
                })
            })
            .await?
            .object
        };
        record_event(
            &self.store,
            updated.metadata.as_ref(),
            EventType::Normal,
            reason,
            action,
            format!("Detaching {} {name:?}", T::NOUN),
        )
        .await;
        Ok(())
    }

    /// An `nbd` volume's `uri` must parse and name an allowed socket; `field` is the volume's
    /// path in the request.
    fn check_nbd(&self, field: &str, volume: &Volume) -> Result<()> {
        if let Some(connection) = volume
            .connection
            .as_ref()
            .filter(|c| c.driver == crate::reconcile::NBD_DRIVER)
        {
            let field = format!("{field}.connection.attributes[\"{}\"]", crate::nbd::URI);
            if !connection.attributes.contains_key(crate::nbd::URI) {
                return Err(Error::required(field));
            }
            crate::nbd::from_attributes(
                &connection.attributes,
                &self.config.nbd_socket_dirs,
                self.config.nbd_tls_dir.as_deref(),
            )
            .map_err(|reason| Error::invalid(field, reason))?;
        }
        Ok(())
    }

    /// UpdateVolume: the upstream machinepoollet uses it for online resize only. The new
    /// attachment replaces the old one when it differs only in size, and only upward; the
    /// reconciler then grows the disk the guest sees.
    async fn update_volume(&self, request: UpdateVolumeRequest) -> Result<()> {
        let volume = request.volume.ok_or_else(|| Error::required("volume"))?;
        validate_volume("volume", &volume)?;
        self.check_nbd("volume", &volume)?;
        let id = request.machine_id;
        self.machine(&id)?;
        let name = volume.name.clone();
        let store = self.store.clone();
        let default_bytes = self.config.default_local_disk_bytes;
        let updated = blocking(move || {
            store.update::<MachineRecord>(&id, |record| {
                if record.is_deleting() {
                    return Err(Error::FailedPrecondition(format!(
                        "machine {id:?} is being deleted"
                    )));
                }
                let spec = record.spec.get_or_insert_with(Default::default);
                let current = spec
                    .volumes
                    .iter_mut()
                    .find(|v| v.name == volume.name)
                    .ok_or_else(|| Error::not_found("volume attachment", volume.name.clone()))?;
                check_volume_update(current, &volume, default_bytes)?;
                *current = volume.clone();
                Ok(())
            })
        })
        .await?
        .object;
        record_event(
            &self.store,
            updated.metadata.as_ref(),
            EventType::Normal,
            "VolumeUpdating",
            "UpdateVolume",
            format!("Updating volume {name:?}"),
        )
        .await;
        Ok(())
    }

    async fn attach_nic(&self, request: AttachNetworkInterfaceRequest) -> Result<()> {
        let nic = request
            .network_interface
            .ok_or_else(|| Error::required("network_interface"))?;
        validate_nic("network_interface", &nic)?;
        let no_more_checks = |_: &[NetworkInterface], _: &NetworkInterface| Ok(());
        self.attach(
            request.machine_id,
            nic,
            no_more_checks,
            "NICAttaching",
            "AttachNetworkInterface",
        )
        .await
    }

    async fn detach_nic(&self, request: DetachNetworkInterfaceRequest) -> Result<()> {
        self.detach::<NetworkInterface>(
            request.machine_id,
            request.name,
            "NICDetaching",
            "DetachNetworkInterface",
        )
        .await
    }

    fn exec(&self, request: ExecRequest) -> Result<String> {
        let machine = self.machine(&request.machine_id)?;
        if machine.is_deleting() {
            return Err(Error::FailedPrecondition(format!(
                "machine {:?} is being deleted",
                request.machine_id
            )));
        }
        self.exec.issue(&request.machine_id)
    }
}

/// A volume or a network interface: a named part of a machine's spec that Attach adds and
/// Detach moves to the record's detaching ones, where it stays until the guest has let go.
trait Attachment: Clone + Send + 'static {
    /// The kind in NotFound and AlreadyExists errors.
    const KIND: &'static str;
    /// What error and event messages call it.
    const NOUN: &'static str;
    /// The field of the Attach request that carries it.
    const FIELD: &'static str;

    /// Its name, unique among the machine's attachments of its kind.
    fn name(&self) -> &str;

    /// The attached ones in `record`'s spec, and those still detaching.
    fn lists(record: &mut MachineRecord) -> (&mut Vec<Self>, &mut Vec<Self>);
}

impl Attachment for Volume {
    const KIND: &'static str = "volume attachment";
    const NOUN: &'static str = "volume";
    const FIELD: &'static str = "volume";

    fn name(&self) -> &str {
        &self.name
    }

    fn lists(record: &mut MachineRecord) -> (&mut Vec<Self>, &mut Vec<Self>) {
        let spec = record.spec.get_or_insert_with(Default::default);
        (&mut spec.volumes, &mut record.detaching)
    }
}

impl Attachment for NetworkInterface {
    const KIND: &'static str = "network interface";
    const NOUN: &'static str = "network interface";
    const FIELD: &'static str = "network_interface";

    fn name(&self) -> &str {
        &self.name
    }

    fn lists(record: &mut MachineRecord) -> (&mut Vec<Self>, &mut Vec<Self>) {
        let spec = record.spec.get_or_insert_with(Default::default);
        (&mut spec.network_interfaces, &mut record.detaching_nics)
    }
}

/// The most ignition data a machine may carry (it is passed to QEMU as a file through fw_cfg).
pub const MAX_IGNITION_BYTES: usize = 4 << 20;

impl MachineRecord {
    fn metadata_mut_annotations(&mut self) -> &mut BTreeMap<String, String> {
        &mut self.metadata.get_or_insert_with(Default::default).annotations
    }
}

/// Quantity of `class` that fits into `free`.
fn quantity(class: &MachineClass, free: &BTreeMap<String, i64>) -> i64 {
    class
        .resources
        .iter()
        .filter(|(_, need)| **need > 0)
        .map(|(name, need)| free.get(name).copied().unwrap_or(0).max(0) / need)
        .min()
        .unwrap_or(0)
}

/// The status of a machine nothing has been done for yet.
fn initial_status(spec: &MachineSpec) -> MachineStatus {
    MachineStatus {
        observed_generation: 0,
        state: MachineState::MachinePending as i32,
        volumes: spec
            .volumes
            .iter()
            .map(|v| VolumeStatus {
                name: v.name.clone(),
                handle: String::new(),
                state: VolumeState::VolumePending as i32,
            })
            .collect(),
        network_interfaces: spec
            .network_interfaces
            .iter()
            .map(|n| NetworkInterfaceStatus {
                name: n.name.clone(),
                handle: String::new(),
                state: NetworkInterfaceState::NetworkInterfacePending as i32,
            })
            .collect(),
        ..Default::default()
    }
}

fn validate_power(field: &str, power: i32) -> Result<Power> {
    Power::try_from(power).map_err(|_| {
        Error::invalid(
            field,
            format!("unknown power {power} (0 = POWER_ON, 1 = POWER_OFF)"),
        )
    })
}

/// RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens, each at most
/// 63 characters, 253 in all. Anything else could not be handed to the guest safely.
fn validate_hostname(field: &str, name: &str) -> Result<()> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(Error::invalid(
            field,
            format!("{:?} is not a valid host name (RFC 1123)", shorten(name)),
        ));
    }
    Ok(())
}

fn validate_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::required(field));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "{:?} is {} bytes long, at most {MAX_NAME_BYTES} are allowed",
                shorten(name),
                name.len()
            ),
        ));
    }
    Ok(())
}

/// Checks one volume attachment; `field` is its path in the request.
/// What UpdateVolume may change of an attached volume: its size, upward. Everything else
/// (the kind, the device, the image, the connection's driver, handle and attributes) would need
/// the disk to be attached anew, which DetachVolume and AttachVolume do.
fn check_volume_update(current: &Volume, new: &Volume, default_local_disk_bytes: i64) -> Result<()> {
    let detach_attach = "UpdateVolume changes only the size; detach and attach the volume to change this";
    if new.device != current.device {
        return Err(Error::invalid("volume.device", detach_attach));
    }
    match (
        &current.local_disk,
        &current.connection,
        &new.local_disk,
        &new.connection,
    ) {
        (Some(old), None, Some(disk), None) => {
            if disk.image != old.image {
                return Err(Error::invalid("volume.local_disk.image", detach_attach));
            }
            let size = |bytes: i64| {
                if bytes > 0 {
                    bytes
                } else {
                    default_local_disk_bytes
                }
            };
            if old.image.is_none() && size(disk.size_bytes) < size(old.size_bytes) {
                return Err(Error::invalid(
                    "volume.local_disk.size_bytes",
                    format!(
                        "volumes only grow: {} bytes is less than the {} bytes it has",
                        size(disk.size_bytes),
                        size(old.size_bytes)
                    ),
                ));
            }
        }
        (None, Some(old), None, Some(connection)) => {
            if connection.driver != old.driver {
                return Err(Error::invalid("volume.connection.driver", detach_attach));
            }
            if connection.handle != old.handle {
                return Err(Error::invalid("volume.connection.handle", detach_attach));
            }
            if connection.attributes != old.attributes {
                return Err(Error::invalid("volume.connection.attributes", detach_attach));
            }
            if connection.effective_storage_bytes < old.effective_storage_bytes {
                return Err(Error::invalid(
                    "volume.connection.effective_storage_bytes",
                    format!(
                        "volumes only grow: {} bytes is less than the {} bytes it has",
                        connection.effective_storage_bytes, old.effective_storage_bytes
                    ),
                ));
            }
        }
        _ => {
            return Err(Error::invalid(
                "volume",
                "UpdateVolume cannot turn a local disk into a connection or back; detach and attach instead",
            ));
        }
    }
    Ok(())
}

fn validate_volume(field: &str, volume: &Volume) -> Result<()> {
    validate_name(&format!("{field}.name"), &volume.name)?;
    if volume.device.len() > 16
        || !volume
            .device
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(Error::invalid(
            format!("{field}.device"),
            format!(
                "{:?} is not a device name (at most 16 lowercase letters and digits, e.g. oda)",
                shorten(&volume.device)
            ),
        ));
    }
    match (&volume.local_disk, &volume.connection) {
        (Some(disk), None) => {
            if disk.size_bytes < 0 {
                return Err(Error::invalid(
                    format!("{field}.local_disk.size_bytes"),
                    "must not be negative",
                ));
            }
            if disk.image.as_ref().is_some_and(|i| i.image.is_empty()) {
                return Err(Error::required(format!("{field}.local_disk.image.image")));
            }
        }
        (None, Some(connection)) => {
            if connection.driver.is_empty() {
                return Err(Error::required(format!("{field}.connection.driver")));
            }
            if connection.handle.is_empty() {
                return Err(Error::required(format!("{field}.connection.handle")));
            }
            if connection.effective_storage_bytes < 0 {
                return Err(Error::invalid(
                    format!("{field}.connection.effective_storage_bytes"),
                    "must not be negative",
                ));
            }
            string_map(&format!("{field}.connection.attributes"), &connection.attributes)?;
        }
        _ => {
            return Err(Error::invalid(
                field.to_string(),
                "exactly one of local_disk and connection must be set",
            ));
        }
    }
    Ok(())
}

/// Checks one network interface; `field` is its path in the request.
fn validate_nic(field: &str, nic: &NetworkInterface) -> Result<()> {
    validate_name(&format!("{field}.name"), &nic.name)?;
    if nic.network_id.is_empty() {
        return Err(Error::required(format!("{field}.network_id")));
    }
    for (i, ip) in nic.ips.iter().enumerate() {
        if ip.parse::<IpAddr>().is_err() {
            return Err(Error::invalid(
                format!("{field}.ips[{i}]"),
                format!("{:?} is not an IP address", shorten(ip)),
            ));
        }
    }
    string_map(&format!("{field}.attributes"), &nic.attributes)?;
    Ok(())
}

/// A boot image for direct kernel boot: the kernel, the initramfs, and optional extra kernel
/// arguments (the file `cmdline` next to them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImage {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// Extra kernel command line arguments.
    pub cmdline: String,
}

/// Resolves an image reference of a request to a [`KernelImage`] inside one of `roots`.
///
/// Accepted: `file:///abs/dir` and `/abs/dir`. The directory is canonicalized (symlinks and
/// `..` resolved) before it is checked against `roots`, so a request cannot name a file outside
/// of them.
pub fn resolve_image(roots: &[PathBuf], reference: &str) -> std::result::Result<KernelImage, String> {
    let path = reference.strip_prefix("file://").unwrap_or(reference);
    if !path.starts_with('/') {
        return Err(format!(
            "{:?}: a local image is file:///dir or /dir, a directory with vmlinuz and initramfs \
             (OCI images are registry/repository:tag)",
            shorten(reference)
        ));
    }
    if roots.is_empty() {
        return Err(format!(
            "{:?}: no image_dirs are configured, so no local image is accepted",
            shorten(reference)
        ));
    }
    let dir = Path::new(path)
        .canonicalize()
        .map_err(|e| format!("{:?}: {e}", shorten(reference)))?;
    let inside = roots
        .iter()
        .filter_map(|root| root.canonicalize().ok())
        .any(|root| dir.starts_with(root));
    if !inside {
        return Err(format!(
            "{:?} is not inside the configured image_dirs",
            shorten(reference)
        ));
    }
    let kernel = dir.join("vmlinuz");
    if !kernel.is_file() {
        return Err(format!("{:?} has no file vmlinuz", shorten(reference)));
    }
    let initramfs = ["initramfs", "initramfs.cpio.gz"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "{:?} has no file initramfs (or initramfs.cpio.gz)",
                shorten(reference)
            )
        })?;
    let cmdline = std::fs::read_to_string(dir.join("cmdline"))
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    Ok(KernelImage {
        kernel,
        initramfs,
        cmdline,
    })
}

#[tonic::async_trait]
impl machine_runtime_server::MachineRuntime for MachineService {
    async fn version(&self, _: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            runtime_name: RUNTIME_NAME.to_string(),
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let filter = request.into_inner().filter;
        reply(handler::list_events(&self.store, filter).await, |events| {
            ListEventsResponse { events }
        })
    }

    async fn list_machines(
        &self,
        request: Request<ListMachinesRequest>,
    ) -> Result<Response<ListMachinesResponse>, Status> {
        let filter = request.into_inner().filter;
        let machines = handler::list(&self.store, filter, MachineRecord::into_machine);
        Ok(Response::new(ListMachinesResponse { machines }))
    }

    async fn create_machine(
        &self,
        request: Request<CreateMachineRequest>,
    ) -> Result<Response<CreateMachineResponse>, Status> {
        reply(self.insert_machine(request.into_inner()).await, |m| {
            CreateMachineResponse { machine: Some(m) }
        })
    }

    async fn delete_machine(
        &self,
        request: Request<DeleteMachineRequest>,
    ) -> Result<Response<DeleteMachineResponse>, Status> {
        reply(
            self.request_deletion(request.into_inner().machine_id).await,
            |()| DeleteMachineResponse {},
        )
    }

    async fn update_machine_annotations(
        &self,
        request: Request<UpdateMachineAnnotationsRequest>,
    ) -> Result<Response<UpdateMachineAnnotationsResponse>, Status> {
        reply(self.set_annotations(request.into_inner()).await, |()| {
            UpdateMachineAnnotationsResponse {}
        })
    }

    async fn update_machine_power(
        &self,
        request: Request<UpdateMachinePowerRequest>,
    ) -> Result<Response<UpdateMachinePowerResponse>, Status> {
        reply(self.set_power(request.into_inner()).await, |()| {
            UpdateMachinePowerResponse {}
        })
    }

    async fn attach_volume(
        &self,
        request: Request<AttachVolumeRequest>,
    ) -> Result<Response<AttachVolumeResponse>, Status> {
        reply(self.attach_volume(request.into_inner()).await, |()| {
            AttachVolumeResponse {}
        })
    }

    async fn detach_volume(
        &self,
        request: Request<DetachVolumeRequest>,
    ) -> Result<Response<DetachVolumeResponse>, Status> {
        reply(self.detach_volume(request.into_inner()).await, |()| {
            DetachVolumeResponse {}
        })
    }

    async fn update_volume(
        &self,
        request: Request<UpdateVolumeRequest>,
    ) -> Result<Response<UpdateVolumeResponse>, Status> {
        reply(self.update_volume(request.into_inner()).await, |()| {
            UpdateVolumeResponse {}
        })
    }

    async fn attach_network_interface(
        &self,
        request: Request<AttachNetworkInterfaceRequest>,
    ) -> Result<Response<AttachNetworkInterfaceResponse>, Status> {
        reply(self.attach_nic(request.into_inner()).await, |()| {
            AttachNetworkInterfaceResponse {}
        })
    }

    async fn detach_network_interface(
        &self,
        request: Request<DetachNetworkInterfaceRequest>,
    ) -> Result<Response<DetachNetworkInterfaceResponse>, Status> {
        reply(self.detach_nic(request.into_inner()).await, |()| {
            DetachNetworkInterfaceResponse {}
        })
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            machine_class_status: self.status(),
        }))
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        reply(self.exec(request.into_inner()), |url| ExecResponse { url })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(cpu: i64, memory: i64) -> MachineClass {
        MachineClass {
            name: "c".into(),
            resources: BTreeMap::from([("cpu".into(), cpu), ("memory".into(), memory)]),
        }
    }

    #[test]
    fn quantity_is_the_scarcest_resource() {
        let free = BTreeMap::from([("cpu".into(), 8), ("memory".into(), 10)]);
        assert_eq!(quantity(&class(2, 3), &free), 3);
        assert_eq!(quantity(&class(3, 1), &free), 2);
        let over = BTreeMap::from([("cpu".into(), -4), ("memory".into(), 10)]);
        assert_eq!(quantity(&class(1, 1), &over), 0);
    }

    fn service(dir: &Path) -> MachineService {
        let config = Config {
            classes: vec![
                MachineClass {
                    name: "small".into(),
                    resources: BTreeMap::from([("cpu".into(), 1), ("memory".into(), 2)]),
                },
                MachineClass {
                    name: "big".into(),
                    resources: BTreeMap::from([("cpu".into(), 4), ("memory".into(), 4)]),
                },
            ],
            capacity: BTreeMap::from([("cpu".into(), 10), ("memory".into(), 13)]),
            reserve: BTreeMap::from([("memory".into(), 1)]),
            ..Config::default()
        };
        let store = Store::open(&dir.join("store.db"), Default::default()).unwrap();
        let machines = Arc::new(crate::machines::Machines::new(
            dir.join("machines"),
            Default::default(),
        ));
        let exec = Arc::new(ExecServer::new(machines, 1, std::time::Duration::from_secs(1)));
        MachineService::new(store, Arc::new(config), exec)
    }

    fn request(class: &str) -> CreateMachineRequest {
        CreateMachineRequest {
            machine: Some(Machine {
                metadata: Some(Default::default()),
                spec: Some(MachineSpec {
                    class: class.into(),
                    ..Default::default()
                }),
                status: None,
            }),
        }
    }

    fn quantities(service: &MachineService) -> Vec<(String, i64)> {
        service
            .status()
            .into_iter()
            .map(|s| (s.machine_class.unwrap().name, s.quantity))
            .collect()
    }

    #[tokio::test]
    async fn capacity_counts_every_class_and_refuses_beyond_it() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        // 10 cpu, 13 - 1 = 12 memory: small fits min(10/1, 12/2) = 6, big min(10/4, 12/4) = 2.
        assert_eq!(quantities(&service), [("small".into(), 6), ("big".into(), 2)]);
        service.insert_machine(request("big")).await.unwrap();
        // 6 cpu and 8 memory left.
        assert_eq!(quantities(&service), [("small".into(), 4), ("big".into(), 1)]);
        for _ in 0..3 {
            service.insert_machine(request("small")).await.unwrap();
        }
        // 3 cpu and 2 memory left: one more small, no big.
        assert_eq!(quantities(&service), [("small".into(), 1), ("big".into(), 0)]);
        let err = service.insert_machine(request("big")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        service.insert_machine(request("small")).await.unwrap();
        let err = service.insert_machine(request("small")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        // A machine being deleted still holds its resources until it is gone.
        let id = service.store.list::<MachineRecord>(&ObjectFilter::default())[0]
            .object
            .id()
            .to_string();
        service.request_deletion(id.clone()).await.unwrap();
        assert_eq!(quantities(&service), [("small".into(), 0), ("big".into(), 0)]);
        service.store.remove::<MachineRecord>(&id).unwrap();
        assert_eq!(quantities(&service), [("small".into(), 2), ("big".into(), 1)]);
    }

    #[tokio::test]
    async fn volume_rpcs_check_names_and_track_detaches() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        let mut create = request("small");
        let spec = create.machine.as_mut().unwrap().spec.as_mut().unwrap();
        spec.volumes.push(Volume {
            name: "data".into(),
            device: "odb".into(),
            local_disk: Some(iri_api::machine::v1alpha1::LocalDisk {
                size_bytes: 1 << 20,
                image: None,
            }),
            connection: None,
        });
        let id = service.insert_machine(create).await.unwrap().metadata.unwrap().id;
        let update = |name: &str| UpdateVolumeRequest {
            machine_id: id.clone(),
            volume: Some(Volume {
                name: name.into(),
                device: "odb".into(),
                local_disk: Some(iri_api::machine::v1alpha1::LocalDisk {
                    size_bytes: 2 << 20,
                    image: None,
                }),
                connection: None,
            }),
        };
        let code = |r: Result<()>| r.map_err(Status::from).unwrap_err().code();
        assert_eq!(
            code(service.update_volume(update("nope")).await),
            tonic::Code::NotFound
        );
        // Growing is taken into the spec; shrinking and changing the device are not.
        service.update_volume(update("data")).await.unwrap();
        let stored = service.machine(&id).unwrap().spec.unwrap().volumes;
        let stored: Vec<_> = stored.into_iter().filter(|v| v.name == "data").collect();
        assert_eq!(stored[0].local_disk.as_ref().unwrap().size_bytes, 2 << 20);
        let mut shrink = update("data");
        shrink
            .volume
            .as_mut()
            .unwrap()
            .local_disk
            .as_mut()
            .unwrap()
            .size_bytes = 1 << 20;
        let err = Status::from(service.update_volume(shrink).await.unwrap_err());
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("size_bytes"), "{}", err.message());
        let mut moved = update("data");
        moved.volume.as_mut().unwrap().device = "odz".into();
        let err = Status::from(service.update_volume(moved).await.unwrap_err());
        assert!(err.message().contains("volume.device"), "{}", err.message());
        let mut unknown = update("data");
        unknown.machine_id = "nope".into();
        assert_eq!(code(service.update_volume(unknown).await), tonic::Code::NotFound);

        // Detach moves the volume out of the spec into `detaching`; a second detach is
        // NotFound, and attaching the name again waits until the detach completed.
        let detach = DetachVolumeRequest {
            machine_id: id.clone(),
            name: "data".into(),
        };
        service.detach_volume(detach.clone()).await.unwrap();
        assert!(service.detach_volume(detach).await.unwrap_err().is_not_found());
        let record = service.machine(&id).unwrap();
        assert!(record.spec.unwrap().volumes.is_empty());
        assert_eq!(record.detaching.len(), 1);
        let again = AttachVolumeRequest {
            machine_id: id.clone(),
            volume: update("data").volume,
        };
        let err = service.attach_volume(again).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn hostnames_follow_rfc_1123() {
        for good in ["a", "my-host", "a.b.c", "x1"] {
            validate_hostname("h", good).unwrap();
        }
        for bad in ["-a", "a-", "a..b", "a b", "a,b", "ä", &"a".repeat(64)] {
            assert!(validate_hostname("h", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn images_must_stay_inside_image_dirs() {
        let root = tempfile::tempdir().unwrap();
        let image = root.path().join("guest");
        std::fs::create_dir(&image).unwrap();
        std::fs::write(image.join("vmlinuz"), b"k").unwrap();
        std::fs::write(image.join("initramfs.cpio.gz"), b"i").unwrap();
        let roots = vec![root.path().to_path_buf()];
        let url = format!("file://{}", image.display());
        let found = resolve_image(&roots, &url).unwrap();
        assert!(found.kernel.ends_with("vmlinuz") && found.initramfs.ends_with("initramfs.cpio.gz"));
        // `..` that leads out of the root is caught after canonicalization.
        let outside = tempfile::tempdir().unwrap();
        let sneaky = format!("{}/../{}", image.display(), outside.path().display());
        assert!(resolve_image(&roots, &sneaky).is_err());
        let err = resolve_image(&[outside.path().to_path_buf()], &url).unwrap_err();
        assert!(err.contains("image_dirs"), "{err}");
        let err = resolve_image(&roots, "relative/dir").unwrap_err();
        assert!(err.contains("file:///dir"), "{err}");
        assert!(resolve_image(&[], &url).is_err());
    }
}
