// SPDX-License-Identifier: Apache-2.0
//! The running machines as the provider holds them: per machine its QEMU pid, the QMP
//! connection and the console connection, adopted from a previous provider or made by starting
//! QEMU. Every change QEMU reports (a QMP event, the connection closing because QEMU exited)
//! wakes the machine's reconcile.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError},
    time::Duration,
};

use qmp::Qmp;
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::{
    config::QemuSettings,
    console::{Console, Session},
    qemu::{self, BootPlan, MachineDir, StartError},
};

/// How long a QEMU that closed its QMP connection may take to exit.
const EXIT_GRACE: Duration = Duration::from_secs(10);
/// How often a machine's QMP connection is checked for having closed (QEMU exited).
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Called with a machine id when QEMU reports something about it.
pub type Wake = Arc<dyn Fn(&str) + Send + Sync>;

/// A running QEMU and our connections to it.
pub struct Running {
    /// QEMU's pid.
    pub pid: i32,
    /// The QMP connection (the only one QEMU allows).
    pub qmp: Qmp,
    /// The console connection; `None` if it could not be made (the machine runs without a
    /// console log and Exec sessions fail).
    pub console: Option<Console>,
    watcher: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Running {
    /// Whether QEMU is still there and connected.
    pub fn is_alive(&self) -> bool {
        self.qmp.is_connected() && qemu::is_alive(self.pid)
    }

    /// The ids of the devices created with an id (`qom-list /machine/peripheral`).
    pub async fn peripherals(&self) -> Result<Vec<String>, qmp::Error> {
        let list: Vec<Value> = self
            .qmp
            .execute("qom-list", serde_json::json!({"path": "/machine/peripheral"}))
            .await?;
        Ok(list
            .iter()
            .filter(|p| {
                p.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.starts_with("child<"))
            })
            .filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_string))
            .collect())
    }

    /// The name of the bus device `id` sits on (a root port's id for our disks).
    pub async fn parent_bus(&self, id: &str) -> Result<String, qmp::Error> {
        let path: String = self
            .qmp
            .execute(
                "qom-get",
                serde_json::json!({"path": format!("/machine/peripheral/{id}"), "property": "parent_bus"}),
            )
            .await?;
        Ok(path.rsplit('/').next().unwrap_or_default().to_string())
    }

    /// The virtual size of every named block node, by node name.
    pub async fn node_sizes(&self) -> Result<HashMap<String, u64>, qmp::Error> {
        let nodes = self
            .qmp
            .execute_value("query-named-block-nodes", serde_json::json!({"flat": true}))
            .await?;
        Ok(nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| {
                Some((
                    n.get("node-name")?.as_str()?.to_string(),
                    n.get("image")?.get("virtual-size")?.as_u64()?,
                ))
            })
            .collect())
    }

    /// QEMU's run state (`query-status`): `running`, `paused`, `shutdown`, ...
    pub async fn run_state(&self) -> Result<String, qmp::Error> {
        let status: Value = self.qmp.execute("query-status", Value::Null).await?;
        Ok(status
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }
}

/// All machines' QEMU processes.
pub struct Machines {
    root: PathBuf,
    settings: QemuSettings,
    running: Mutex<HashMap<String, Arc<Running>>>,
    wake: OnceLock<Wake>,
}

impl Machines {
    /// Machines under `root` (`<data>/machines`), started with `settings`.
    pub fn new(root: PathBuf, settings: QemuSettings) -> Self {
        Machines {
            root,
            settings,
            running: Mutex::new(HashMap::new()),
            wake: OnceLock::new(),
        }
    }

    /// Sets who is told about QEMU events (the reconciler's queue). Set once, before any
    /// machine is started or adopted.
    pub fn set_wake(&self, wake: Wake) {
        let _ = self.wake.set(wake);
    }

    /// The QEMU settings.
    pub fn settings(&self) -> &QemuSettings {
        &self.settings
    }

    /// The directory of machine `id`.
    pub fn dir(&self, id: &str) -> MachineDir {
        MachineDir::new(&self.root, id)
    }

    /// The machine directories present (ids), for finding orphans.
    pub fn inventory(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| iri_runtime::id::is_valid_id(name))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Running>>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The running QEMU of machine `id`, if there is one: the one we hold, or one a previous
    /// provider left running (adopted here: QMP and console are reconnected, the guest is not
    /// touched). A QEMU that runs but does not answer on QMP is killed: nobody else may hold
    /// its monitor, so it is of no use.
    pub async fn running(&self, id: &str) -> Option<Arc<Running>> {
        let held = self.lock().get(id).cloned();
        if let Some(running) = held {
            if running.is_alive() {
                return Some(running);
            }
            self.lock().remove(id);
            // QEMU closed QMP: it is exiting. Until its last thread is gone it still holds the
            // machine's disk images, and a new QEMU could not open them; nor is it off yet.
            if !qemu::wait_gone(running.pid, EXIT_GRACE).await {
                tracing::warn!(
                    id,
                    pid = running.pid,
                    "qemu closed QMP but does not exit: killing it"
                );
                qemu::kill_and_wait(running.pid).await;
            }
        }
        let dir = self.dir(id);
        let pid = dir.running_pid()?;
        match qemu::connect(&dir).await {
            Ok(qmp) => {
                let running = self.hold(id, pid, qmp, true).await;
                tracing::info!(id, pid, "adopted the running qemu");
                Some(running)
            }
            Err(err) => {
                tracing::warn!(id, pid, %err, "qemu does not answer on QMP: killing it");
                qemu::kill_and_wait(pid).await;
                None
            }
        }
    }

    /// Starts QEMU for `plan` (the caller made sure none runs).
    pub async fn start(&self, plan: &BootPlan) -> Result<Arc<Running>, StartError> {
        let dir = self.dir(&plan.id);
        let pid = qemu::start(&self.settings, &dir, plan).await?;
        let qmp = match qemu::connect(&dir).await {
            Ok(qmp) => qmp,
            Err(err) => {
                qemu::kill_and_wait(pid).await;
                return Err(StartError::Transient(format!(
                    "qemu started but QMP does not answer: {err}"
                )));
            }
        };
        Ok(self.hold(&plan.id, pid, qmp, false).await)
    }

    async fn hold(&self, id: &str, pid: i32, qmp: Qmp, adopted: bool) -> Arc<Running> {
        let dir = self.dir(id);
        let console = match Console::connect(
            dir.console_socket(),
            dir.console_log(),
            self.settings.console_log_bytes,
            adopted,
        )
        .await
        {
            Ok(console) => Some(console),
            Err(err) => {
                tracing::warn!(id, %err, "cannot connect to the console");
                None
            }
        };
        let watcher = tokio::spawn(watch(id.to_string(), qmp.clone(), self.wake.get().cloned()));
        let running = Arc::new(Running {
            pid,
            qmp,
            console,
            watcher,
        });
        self.lock().insert(id.to_string(), running.clone());
        running
    }

    /// Stops machine `id`'s QEMU at once (quit, then SIGKILL) if one runs, and forgets it.
    pub async fn stop(&self, id: &str) {
        let held = self.lock().remove(id);
        let dir = self.dir(id);
        qemu::stop(held.as_ref().map(|r| &r.qmp), &dir).await;
    }

    /// Powers every running machine down: an ACPI power-down request to each, all at once,
    /// then those still running after `grace` are forced off. For a provider that exits with
    /// `stop_machines_on_exit`; the stored desired power stays as it is.
    pub async fn power_down_all(&self, grace: std::time::Duration) {
        let held: Vec<(String, Arc<Running>)> = self
            .lock()
            .iter()
            .map(|(id, running)| (id.clone(), running.clone()))
            .collect();
        let mut waits = tokio::task::JoinSet::new();
        for (id, running) in held {
            waits.spawn(async move {
                if let Err(err) = running.qmp.execute_value("system_powerdown", Value::Null).await {
                    tracing::warn!(%id, %err, "system_powerdown");
                }
                let off = qemu::wait_gone(running.pid, grace).await;
                (id, off)
            });
        }
        while let Some(Ok((id, off))) = waits.join_next().await {
            if !off {
                tracing::warn!(%id, ?grace, "the guest did not power off in time: forced off");
            }
            self.stop(&id).await;
            tracing::info!(%id, "machine stopped at exit");
        }
    }

    /// Removes everything of machine `id`: its QEMU, then its directory. Idempotent: a machine
    /// whose QEMU vanished on its own, or whose directory is gone already, is fine.
    pub async fn remove(&self, id: &str) -> std::io::Result<()> {
        self.stop(id).await;
        let dir = self.dir(id);
        match tokio::fs::remove_dir_all(dir.path()).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A console session of machine `id`, if it runs and its console is connected.
    pub fn console(&self, id: &str) -> Option<Session> {
        let running = self.lock().get(id).cloned()?;
        let console = running.console.as_ref()?;
        console.is_open().then(|| console.session())
    }

    /// Pids of the QEMU processes held, by machine id (for tests and metrics).
    pub fn pids(&self) -> HashMap<String, i32> {
        self.lock().iter().map(|(id, r)| (id.clone(), r.pid)).collect()
    }

    /// The machines root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Wakes the machine's reconcile on every QMP event and once when the connection closes.
async fn watch(id: String, qmp: Qmp, wake: Option<Wake>) {
    let mut events = qmp.events();
    let wake = |id: &str| {
        if let Some(wake) = &wake {
            wake(id);
        }
    };
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => {
                    tracing::debug!(id = %id, event = %event.event, "qemu event");
                    wake(&id);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => wake(&id),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    wake(&id);
                    return;
                }
            },
            _ = tokio::time::sleep(WATCH_INTERVAL) => {
                if !qmp.is_connected() {
                    wake(&id);
                    return;
                }
            }
        }
    }
}
