// SPDX-License-Identifier: Apache-2.0
//! The in-memory reference `MachineRuntime` (a test double, see the crate docs).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use iri_api::{
    event::v1alpha1::Event,
    machine::v1alpha1::{
        AttachNetworkInterfaceRequest, AttachNetworkInterfaceResponse, AttachVolumeRequest,
        AttachVolumeResponse, CreateMachineRequest, CreateMachineResponse, DeleteMachineRequest,
        DeleteMachineResponse, DetachNetworkInterfaceRequest, DetachNetworkInterfaceResponse,
        DetachVolumeRequest, DetachVolumeResponse, ExecRequest, ExecResponse, ListEventsRequest,
        ListEventsResponse, ListMachinesRequest, ListMachinesResponse, Machine, MachineClass,
        MachineClassCapabilities, MachineClassStatus, MachineSpec, MachineState, MachineStatus,
        NetworkInterface, NetworkInterfaceState, NetworkInterfaceStatus, Power, StatusRequest,
        StatusResponse, UpdateMachineAnnotationsRequest, UpdateMachineAnnotationsResponse,
        UpdateMachinePowerRequest, UpdateMachinePowerResponse, UpdateVolumeRequest, UpdateVolumeResponse,
        VersionRequest, VersionResponse, Volume, VolumeState, VolumeStatus, machine_runtime_server,
    },
};
use iri_runtime::{Error, EventFilter, ObjectFilter};
use tonic::{Request, Response, Status};

use crate::common::{
    Clock, DEFAULT_MAX_EVENTS, EventLog, URL_SAFE, after, bump_generation, list_objects, lock, new_metadata,
    random_string, reply, validate_string_map,
};

/// `VersionResponse.runtime_name` of the reference machine runtime.
pub const MACHINE_RUNTIME_NAME: &str = "iri-reference-machine";

/// Length of an exec token (upstream's machinebroker uses 8 base64url characters).
const EXEC_TOKEN_LEN: usize = 8;

/// How the reference [`MachineRuntime`] behaves.
///
/// Build with struct update syntax: `MachineConfig { ready_delay: .., ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Supported machine classes: `(name, resources, capacity)`. `resources` is reported as the
    /// class capabilities (e.g. `cpu` in cores, `memory` in bytes); `capacity` is how many
    /// machines of the class fit. `Status` reports `capacity - existing machines of the class`
    /// and `CreateMachine` fails with RESOURCE_EXHAUSTED when none is left.
    pub classes: Vec<(String, BTreeMap<String, i64>, i64)>,
    /// How long the simulated backend takes to act on a create or a spec change: the machine is
    /// `MACHINE_PENDING` until then, and `status.observed_generation`, the power state and the
    /// volume/NIC statuses follow `metadata.generation` once it has passed. Zero means "at the
    /// next read" (the create response itself still says PENDING).
    pub ready_delay: Duration,
    /// The state a powered-off machine reports. Default `MACHINE_STOPPED`; use
    /// `MACHINE_SUSPENDED` when testing an upstream machinepoollet, which cannot map STOPPED
    /// (iri-contract §3.2.5).
    pub off_state: MachineState,
    /// Base of the URLs `Exec` returns: `<exec_base_url>/exec/<token>`. Nothing listens there;
    /// see [`MachineRuntime::take_exec_session`] to play the streaming server in a test.
    pub exec_base_url: String,
    /// Most exec tokens outstanding at once; `Exec` beyond that fails with RESOURCE_EXHAUSTED.
    pub max_exec_sessions: usize,
    /// How long an unused exec token stays valid (upstream: one minute).
    pub exec_token_ttl: Duration,
    /// How many events are kept (oldest dropped first).
    pub max_events: usize,
}

impl Default for MachineConfig {
    fn default() -> Self {
        const GI: i64 = 1024 * 1024 * 1024;
        let class = |name: &str, cpu: i64, memory: i64, capacity: i64| {
            (
                name.to_string(),
                BTreeMap::from([("cpu".to_string(), cpu), ("memory".to_string(), memory)]),
                capacity,
            )
        };
        MachineConfig {
            classes: vec![class("x3-small", 2, 4 * GI, 10), class("x3-large", 8, 16 * GI, 2)],
            ready_delay: Duration::ZERO,
            off_state: MachineState::MachineStopped,
            // machinebroker's default streaming address (iri-contract §5).
            exec_base_url: "http://127.0.0.1:20251".to_string(),
            max_exec_sessions: 1000,
            exec_token_ttl: Duration::from_secs(60),
            max_events: DEFAULT_MAX_EVENTS,
        }
    }
}

/// An in-memory `machine.v1alpha1.MachineRuntime` that behaves like a correct provider, for
/// tests of clients. **A test double**: nothing is booted, state is lost on drop.
///
/// Cloning is cheap and clones share state, so a test can keep one clone for assertions
/// ([`MachineRuntime::machines`]) while another is served.
///
/// Behaviour beyond the crate-level rules:
/// * A new machine is `MACHINE_PENDING` with its volumes/NICs pending; once the simulated
///   backend has acted ([`MachineConfig::ready_delay`]) it is `MACHINE_RUNNING`, or
///   [`MachineConfig::off_state`] when `spec.power` is `POWER_OFF`.
/// * `spec` is validated: known class and power; volume and NIC names set and unique; devices
///   unique; each volume has exactly one of `local_disk`/`connection` (a connection needs
///   `driver` and `handle`, a present `local_disk.image` needs `image`); NICs need `network_id`
///   and IP-literal `ips`. The stored spec is exactly what was sent.
/// * Attached volumes report handle `connection.handle`, or `local-disk/<name>` for local
///   disks; NICs report `nic/<machine id>/<name>`.
/// * `AttachVolume`/`AttachNetworkInterface` with a name already present: ALREADY_EXISTS.
///   `UpdateVolume`, `Detach*` with an unknown name: NOT_FOUND. A volume device used by
///   another attachment: INVALID_ARGUMENT.
/// * `Exec` checks the machine exists (NOT_FOUND otherwise, unlike upstream's machinebroker)
///   and returns `<exec_base_url>/exec/<8-char token>`; at most
///   [`MachineConfig::max_exec_sessions`] unexpired tokens, RESOURCE_EXHAUSTED beyond.
#[derive(Clone)]
pub struct MachineRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    config: MachineConfig,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    machines: HashMap<String, Record>,
    events: EventLog,
    clock: Clock,
    exec_sessions: HashMap<String, ExecSession>,
}

#[derive(Debug)]
struct Record {
    machine: Machine,
    /// When the simulated backend applies the current spec; `None` when it has.
    apply_at: Option<Instant>,
}

#[derive(Debug)]
struct ExecSession {
    machine_id: String,
    expires: Instant,
}

impl Default for MachineRuntime {
    fn default() -> Self {
        MachineRuntime::new(MachineConfig::default())
    }
}

impl MachineRuntime {
    /// A runtime with no machines.
    pub fn new(config: MachineConfig) -> Self {
        let events = EventLog::new(config.max_events);
        MachineRuntime {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State {
                    machines: HashMap::new(),
                    events,
                    clock: Clock::default(),
                    exec_sessions: HashMap::new(),
                }),
            }),
        }
    }

    /// The configuration this runtime was built with.
    pub fn config(&self) -> &MachineConfig {
        &self.inner.config
    }

    /// All machines as `ListMachines` without filter would return them now.
    pub fn machines(&self) -> Vec<Machine> {
        self.list(None)
    }

    /// All recorded events, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.state().events.list(None)
    }

    /// Redeems an exec token as the provider's streaming server would: returns the machine id
    /// the token was issued for and invalidates it (tokens are single use), or `None` if the
    /// token is unknown, used or expired. Accepts the token or the whole URL `Exec` returned.
    pub fn take_exec_session(&self, token_or_url: &str) -> Option<String> {
        let token = token_or_url.rsplit('/').next().unwrap_or(token_or_url);
        let mut state = self.state();
        let session = state.exec_sessions.remove(token)?;
        (session.expires > Instant::now()).then_some(session.machine_id)
    }

    /// The locked state, with every change whose delay has passed applied.
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        let mut state = lock(&self.inner.state);
        state.reconcile(self.inner.config.off_state);
        state
    }

    fn list(&self, filter: Option<ObjectFilter>) -> Vec<Machine> {
        list_objects(self.state().machines.values().map(|r| &r.machine), filter)
    }

    fn class(&self, name: &str) -> Option<&(String, BTreeMap<String, i64>, i64)> {
        self.inner.config.classes.iter().find(|(n, _, _)| n == name)
    }

    fn create(&self, req: CreateMachineRequest) -> Result<Machine, Error> {
        let machine = req.machine.ok_or_else(|| Error::required("machine"))?;
        let spec = machine.spec.ok_or_else(|| Error::required("machine.spec"))?;
        self.validate_spec(&spec)?;
        let capacity = self.class(&spec.class).map(|c| c.2).unwrap_or(0);

        let mut state = self.state();
        // Everything about the request itself is checked before anything that depends on state.
        let metadata = new_metadata("machine", machine.metadata, &mut state.clock)?;
        let used = state
            .machines
            .values()
            .filter(|r| class_of(&r.machine) == spec.class)
            .count();
        if i64::try_from(used).unwrap_or(i64::MAX) >= capacity {
            return Err(Error::ResourceExhausted(format!(
                "no capacity left for machine class {:?} ({used} of {capacity} in use)",
                spec.class
            )));
        }
        let status = MachineStatus {
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
        };
        let message = format!("Created machine of class {:?}", spec.class);
        let machine = Machine {
            metadata: Some(metadata.clone()),
            spec: Some(spec),
            status: Some(status),
        };
        state.events.record(&metadata, "Created", "Create", message);
        state.machines.insert(
            metadata.id,
            Record {
                machine: machine.clone(),
                apply_at: Some(after(self.inner.config.ready_delay)),
            },
        );
        Ok(machine)
    }

    fn validate_spec(&self, spec: &MachineSpec) -> Result<(), Error> {
        if spec.class.is_empty() {
            return Err(Error::required("machine.spec.class"));
        }
        if self.class(&spec.class).is_none() {
            let known: Vec<&str> = self.inner.config.classes.iter().map(|c| c.0.as_str()).collect();
            return Err(Error::invalid(
                "machine.spec.class",
                format!(
                    "unknown machine class {:?} (known: {})",
                    spec.class,
                    known.join(", ")
                ),
            ));
        }
        validate_power("machine.spec.power", spec.power)?;
        let mut names = HashSet::new();
        let mut devices = HashSet::new();
        for (i, volume) in spec.volumes.iter().enumerate() {
            let field = format!("machine.spec.volumes[{i}]");
            validate_volume(&field, volume)?;
            if !names.insert(volume.name.as_str()) {
                return Err(Error::invalid(
                    format!("{field}.name"),
                    format!("duplicate volume name {:?}", volume.name),
                ));
            }
            if !volume.device.is_empty() && !devices.insert(volume.device.as_str()) {
                return Err(Error::invalid(
                    format!("{field}.device"),
                    format!("duplicate device {:?}", volume.device),
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, nic) in spec.network_interfaces.iter().enumerate() {
            let field = format!("machine.spec.network_interfaces[{i}]");
            validate_nic(&field, nic)?;
            if !names.insert(nic.name.as_str()) {
                return Err(Error::invalid(
                    format!("{field}.name"),
                    format!("duplicate network interface name {:?}", nic.name),
                ));
            }
        }
        Ok(())
    }

    fn delete(&self, id: &str) -> Result<(), Error> {
        let mut state = self.state();
        let record = state
            .machines
            .remove(id)
            .ok_or_else(|| Error::not_found("machine", id))?;
        state.exec_sessions.retain(|_, s| s.machine_id != id);
        state
            .events
            .record_deleted(record.machine.metadata, "Deleted machine");
        Ok(())
    }

    /// Runs `change` on the spec of machine `id`; if the spec changed, bumps the generation,
    /// schedules the simulated backend and records an event.
    fn update_spec(
        &self,
        id: &str,
        reason: &str,
        action: &str,
        change: impl FnOnce(&mut MachineSpec, &mut MachineStatus) -> Result<String, Error>,
    ) -> Result<(), Error> {
        let delay = self.inner.config.ready_delay;
        let mut state = self.state();
        let State { machines, events, .. } = &mut *state;
        let record = machines
            .get_mut(id)
            .ok_or_else(|| Error::not_found("machine", id))?;
        let machine = &mut record.machine;
        let before = machine.spec.clone();
        let message = change(
            machine.spec.get_or_insert_with(Default::default),
            machine.status.get_or_insert_with(Default::default),
        )?;
        if machine.spec != before {
            bump_generation(&mut machine.metadata);
            record.apply_at = Some(after(delay));
            events.record(
                machine.metadata.as_ref().unwrap_or(&Default::default()),
                reason,
                action,
                message,
            );
        }
        Ok(())
    }

    fn set_power(&self, req: UpdateMachinePowerRequest) -> Result<(), Error> {
        let power = validate_power("power", req.power)?;
        self.update_spec(&req.machine_id, "PowerChanged", "UpdatePower", |spec, _| {
            spec.power = req.power;
            Ok(format!("Set power to {}", power.as_str_name()))
        })
    }

    fn set_annotations(&self, req: UpdateMachineAnnotationsRequest) -> Result<(), Error> {
        validate_string_map("annotations", &req.annotations)?;
        let mut state = self.state();
        let State { machines, events, .. } = &mut *state;
        let machine = &mut machines
            .get_mut(&req.machine_id)
            .ok_or_else(|| Error::not_found("machine", &req.machine_id))?
            .machine;
        // Annotations are metadata, not spec: replaced wholesale, generation untouched.
        let metadata = machine.metadata.get_or_insert_with(Default::default);
        if metadata.annotations != req.annotations {
            metadata.annotations = req.annotations;
            events.record(
                metadata,
                "AnnotationsUpdated",
                "UpdateAnnotations",
                "Replaced annotations".into(),
            );
        }
        Ok(())
    }

    fn attach_volume_to(&self, req: AttachVolumeRequest) -> Result<(), Error> {
        let volume = req.volume.ok_or_else(|| Error::required("volume"))?;
        validate_volume("volume", &volume)?;
        self.update_spec(
            &req.machine_id,
            "VolumeAttached",
            "AttachVolume",
            |spec, status| {
                if spec.volumes.iter().any(|v| v.name == volume.name) {
                    return Err(Error::AlreadyExists {
                        kind: "volume attachment",
                        id: volume.name,
                    });
                }
                check_device_free(&spec.volumes, &volume)?;
                let message = format!("Attached volume {:?}", volume.name);
                status.volumes.push(VolumeStatus {
                    name: volume.name.clone(),
                    handle: String::new(),
                    state: VolumeState::VolumePending as i32,
                });
                spec.volumes.push(volume);
                Ok(message)
            },
        )
    }

    fn detach_volume_from(&self, req: DetachVolumeRequest) -> Result<(), Error> {
        self.update_spec(
            &req.machine_id,
            "VolumeDetached",
            "DetachVolume",
            |spec, status| {
                let at = spec
                    .volumes
                    .iter()
                    .position(|v| v.name == req.name)
                    .ok_or_else(|| Error::not_found("volume attachment", &req.name))?;
                spec.volumes.remove(at);
                status.volumes.retain(|v| v.name != req.name);
                Ok(format!("Detached volume {:?}", req.name))
            },
        )
    }

    fn update_attached_volume(&self, req: UpdateVolumeRequest) -> Result<(), Error> {
        let volume = req.volume.ok_or_else(|| Error::required("volume"))?;
        validate_volume("volume", &volume)?;
        self.update_spec(&req.machine_id, "VolumeUpdated", "UpdateVolume", |spec, _| {
            let at = spec
                .volumes
                .iter()
                .position(|v| v.name == volume.name)
                .ok_or_else(|| Error::not_found("volume attachment", &volume.name))?;
            let others: Vec<Volume> = spec
                .volumes
                .iter()
                .filter(|v| v.name != volume.name)
                .cloned()
                .collect();
            check_device_free(&others, &volume)?;
            let message = format!("Updated volume {:?}", volume.name);
            spec.volumes[at] = volume;
            Ok(message)
        })
    }

    fn attach_nic(&self, req: AttachNetworkInterfaceRequest) -> Result<(), Error> {
        let nic = req
            .network_interface
            .ok_or_else(|| Error::required("network_interface"))?;
        validate_nic("network_interface", &nic)?;
        self.update_spec(
            &req.machine_id,
            "NetworkInterfaceAttached",
            "AttachNetworkInterface",
            |spec, status| {
                if spec.network_interfaces.iter().any(|n| n.name == nic.name) {
                    return Err(Error::AlreadyExists {
                        kind: "network interface",
                        id: nic.name,
                    });
                }
                let message = format!("Attached network interface {:?}", nic.name);
                status.network_interfaces.push(NetworkInterfaceStatus {
                    name: nic.name.clone(),
                    handle: String::new(),
                    state: NetworkInterfaceState::NetworkInterfacePending as i32,
                });
                spec.network_interfaces.push(nic);
                Ok(message)
            },
        )
    }

    fn detach_nic(&self, req: DetachNetworkInterfaceRequest) -> Result<(), Error> {
        self.update_spec(
            &req.machine_id,
            "NetworkInterfaceDetached",
            "DetachNetworkInterface",
            |spec, status| {
                let at = spec
                    .network_interfaces
                    .iter()
                    .position(|n| n.name == req.name)
                    .ok_or_else(|| Error::not_found("network interface", &req.name))?;
                spec.network_interfaces.remove(at);
                status.network_interfaces.retain(|n| n.name != req.name);
                Ok(format!("Detached network interface {:?}", req.name))
            },
        )
    }

    fn class_status(&self) -> Vec<MachineClassStatus> {
        let state = self.state();
        self.inner
            .config
            .classes
            .iter()
            .map(|(name, resources, capacity)| {
                let used = state
                    .machines
                    .values()
                    .filter(|r| class_of(&r.machine) == *name)
                    .count();
                let used = i64::try_from(used).unwrap_or(i64::MAX);
                MachineClassStatus {
                    machine_class: Some(MachineClass {
                        name: name.clone(),
                        // Always present: poollets dereference it (iri-contract §3.5.6).
                        capabilities: Some(MachineClassCapabilities {
                            resources: resources.clone(),
                        }),
                    }),
                    quantity: capacity.saturating_sub(used).max(0),
                }
            })
            .collect()
    }

    fn new_exec_session(&self, machine_id: &str) -> Result<String, Error> {
        let config = &self.inner.config;
        let mut state = self.state();
        if !state.machines.contains_key(machine_id) {
            return Err(Error::not_found("machine", machine_id));
        }
        let now = Instant::now();
        state.exec_sessions.retain(|_, s| s.expires > now);
        if state.exec_sessions.len() >= config.max_exec_sessions {
            return Err(Error::ResourceExhausted(format!(
                "too many exec sessions in flight ({} of {}); retry once one is used or expired \
                 (tokens live {:?})",
                state.exec_sessions.len(),
                config.max_exec_sessions,
                config.exec_token_ttl
            )));
        }
        // Bounded, so a broken random source yields an error instead of a hang.
        let token = (0..100)
            .map(|_| random_string(EXEC_TOKEN_LEN, URL_SAFE))
            .find(|token| !state.exec_sessions.contains_key(token))
            .ok_or_else(|| Error::internal("cannot generate a unique exec token"))?;
        let expires = after(config.exec_token_ttl);
        state.exec_sessions.insert(
            token.clone(),
            ExecSession {
                machine_id: machine_id.to_string(),
                expires,
            },
        );
        Ok(format!(
            "{}/exec/{token}",
            config.exec_base_url.trim_end_matches('/')
        ))
    }
}

impl State {
    /// Lets the simulated backend act on every machine whose change is due.
    fn reconcile(&mut self, off_state: MachineState) {
        let now = Instant::now();
        for record in self.machines.values_mut() {
            if record.apply_at.is_some_and(|at| at <= now) {
                record.apply_at = None;
                apply(&mut record.machine, off_state, &mut self.events);
            }
        }
    }
}

/// What the backend does once it has acted on the spec: power state, attachments and
/// `observed_generation` all catch up with the spec.
fn apply(machine: &mut Machine, off_state: MachineState, events: &mut EventLog) {
    let metadata = machine.metadata.clone().unwrap_or_default();
    let spec = machine.spec.clone().unwrap_or_default();
    let status = machine.status.get_or_insert_with(Default::default);
    let state = if spec.power == Power::Off as i32 {
        off_state
    } else {
        MachineState::MachineRunning
    };
    status.observed_generation = metadata.generation;
    status.volumes = spec
        .volumes
        .iter()
        .map(|v| VolumeStatus {
            name: v.name.clone(),
            handle: match &v.connection {
                Some(connection) => connection.handle.clone(),
                None => format!("local-disk/{}", v.name),
            },
            state: VolumeState::VolumeAttached as i32,
        })
        .collect();
    status.network_interfaces = spec
        .network_interfaces
        .iter()
        .map(|n| NetworkInterfaceStatus {
            name: n.name.clone(),
            handle: format!("nic/{}/{}", metadata.id, n.name),
            state: NetworkInterfaceState::NetworkInterfaceAttached as i32,
        })
        .collect();
    if status.state != state as i32 {
        status.state = state as i32;
        events.record_state_change(&metadata, format!("Machine is {}", state.as_str_name()));
    }
}

fn class_of(machine: &Machine) -> &str {
    machine.spec.as_ref().map(|s| s.class.as_str()).unwrap_or("")
}

fn validate_power(field: &str, power: i32) -> Result<Power, Error> {
    Power::try_from(power).map_err(|_| {
        Error::invalid(
            field,
            format!("unknown power {power} (0 = POWER_ON, 1 = POWER_OFF)"),
        )
    })
}

/// Checks one volume attachment; `field` is its path in the request.
fn validate_volume(field: &str, volume: &Volume) -> Result<(), Error> {
    if volume.name.is_empty() {
        return Err(Error::required(format!("{field}.name")));
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

/// A new or changed volume must not take a device another attachment uses.
fn check_device_free(others: &[Volume], volume: &Volume) -> Result<(), Error> {
    if volume.device.is_empty() {
        return Ok(());
    }
    match others.iter().find(|v| v.device == volume.device) {
        Some(other) => Err(Error::invalid(
            "volume.device",
            format!(
                "device {:?} is already used by volume {:?}",
                volume.device, other.name
            ),
        )),
        None => Ok(()),
    }
}

/// Checks one network interface; `field` is its path in the request.
fn validate_nic(field: &str, nic: &NetworkInterface) -> Result<(), Error> {
    if nic.name.is_empty() {
        return Err(Error::required(format!("{field}.name")));
    }
    if nic.network_id.is_empty() {
        return Err(Error::required(format!("{field}.network_id")));
    }
    for (i, ip) in nic.ips.iter().enumerate() {
        if ip.parse::<IpAddr>().is_err() {
            return Err(Error::invalid(
                format!("{field}.ips[{i}]"),
                format!("{:?} is not an IP address", crate::common::shorten(ip)),
            ));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl machine_runtime_server::MachineRuntime for MachineRuntime {
    async fn version(&self, _: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            runtime_name: MACHINE_RUNTIME_NAME.to_string(),
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let filter = request.into_inner().filter.map(EventFilter::from);
        let events = self.state().events.list(filter);
        Ok(Response::new(ListEventsResponse { events }))
    }

    async fn list_machines(
        &self,
        request: Request<ListMachinesRequest>,
    ) -> Result<Response<ListMachinesResponse>, Status> {
        let filter = request.into_inner().filter.map(ObjectFilter::from);
        Ok(Response::new(ListMachinesResponse {
            machines: self.list(filter),
        }))
    }

    async fn create_machine(
        &self,
        request: Request<CreateMachineRequest>,
    ) -> Result<Response<CreateMachineResponse>, Status> {
        reply(self.create(request.into_inner()), |machine| {
            CreateMachineResponse {
                machine: Some(machine),
            }
        })
    }

    async fn delete_machine(
        &self,
        request: Request<DeleteMachineRequest>,
    ) -> Result<Response<DeleteMachineResponse>, Status> {
        reply(self.delete(&request.into_inner().machine_id), |()| {
            DeleteMachineResponse {}
        })
    }

    async fn update_machine_annotations(
        &self,
        request: Request<UpdateMachineAnnotationsRequest>,
    ) -> Result<Response<UpdateMachineAnnotationsResponse>, Status> {
        reply(self.set_annotations(request.into_inner()), |()| {
            UpdateMachineAnnotationsResponse {}
        })
    }

    async fn update_machine_power(
        &self,
        request: Request<UpdateMachinePowerRequest>,
    ) -> Result<Response<UpdateMachinePowerResponse>, Status> {
        reply(self.set_power(request.into_inner()), |()| {
            UpdateMachinePowerResponse {}
        })
    }

    async fn attach_volume(
        &self,
        request: Request<AttachVolumeRequest>,
    ) -> Result<Response<AttachVolumeResponse>, Status> {
        reply(self.attach_volume_to(request.into_inner()), |()| {
            AttachVolumeResponse {}
        })
    }

    async fn detach_volume(
        &self,
        request: Request<DetachVolumeRequest>,
    ) -> Result<Response<DetachVolumeResponse>, Status> {
        reply(self.detach_volume_from(request.into_inner()), |()| {
            DetachVolumeResponse {}
        })
    }

    async fn update_volume(
        &self,
        request: Request<UpdateVolumeRequest>,
    ) -> Result<Response<UpdateVolumeResponse>, Status> {
        reply(self.update_attached_volume(request.into_inner()), |()| {
            UpdateVolumeResponse {}
        })
    }

    async fn attach_network_interface(
        &self,
        request: Request<AttachNetworkInterfaceRequest>,
    ) -> Result<Response<AttachNetworkInterfaceResponse>, Status> {
        reply(self.attach_nic(request.into_inner()), |()| {
            AttachNetworkInterfaceResponse {}
        })
    }

    async fn detach_network_interface(
        &self,
        request: Request<DetachNetworkInterfaceRequest>,
    ) -> Result<Response<DetachNetworkInterfaceResponse>, Status> {
        reply(self.detach_nic(request.into_inner()), |()| {
            DetachNetworkInterfaceResponse {}
        })
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            machine_class_status: self.class_status(),
        }))
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        reply(self.new_exec_session(&request.into_inner().machine_id), |url| {
            ExecResponse { url }
        })
    }
}
