// SPDX-License-Identifier: Apache-2.0
//! The MachineRuntime calls the benchmark makes, as a machinepoollet would: create a machine
//! booting the test guest, poll the list until a state is reached, read the console through
//! Exec (the Kubernetes remote-command WebSocket protocol), delete and poll until gone.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use iri_api::{
    machine::v1alpha1::{
        CreateMachineRequest, DeleteMachineRequest, ExecRequest, ImageSpec, ListMachinesRequest, LocalDisk,
        Machine, MachineFilter, MachineSpec, MachineState, Power, UpdateMachinePowerRequest, Volume,
        machine_runtime_client::MachineRuntimeClient,
    },
    meta::v1alpha1::ObjectMetadata,
};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
use tonic::{Code, transport::Channel};

/// A MachineRuntime client.
pub type Client = MachineRuntimeClient<Channel>;

/// Label on every machine the benchmark creates.
pub const LABEL: &str = "iri-bench";
/// What the test guest prints on its serial console once its init runs.
pub const MARKER: &str = "IRI-TEST-GUEST READY";
/// The RUNNING state.
pub const RUNNING: i32 = MachineState::MachineRunning as i32;

/// How long a machine may take to be RUNNING, to be gone, or to print its marker.
pub const CONVERGE: Duration = Duration::from_secs(300);
/// Pause between list polls (lists are served from the provider's memory).
pub const POLL: Duration = Duration::from_millis(10);

/// CreateMachine of class `class` booting the test guest in `guest` (a directory), powered on
/// or off. Returns the id.
pub async fn create(client: &mut Client, class: &str, guest: &Path, power_on: bool) -> Result<String> {
    let power = if power_on { Power::On } else { Power::Off };
    let machine = Machine {
        metadata: Some(ObjectMetadata {
            labels: BTreeMap::from([(LABEL.to_string(), "machine".to_string())]),
            ..Default::default()
        }),
        spec: Some(MachineSpec {
            power: power as i32,
            class: class.into(),
            volumes: vec![Volume {
                name: "root".into(),
                device: "oda".into(),
                local_disk: Some(LocalDisk {
                    size_bytes: 0,
                    image: Some(ImageSpec {
                        image: format!("file://{}", guest.display()),
                    }),
                }),
                connection: None,
            }],
            ..Default::default()
        }),
        status: None,
    };
    let created = client
        .create_machine(CreateMachineRequest {
            machine: Some(machine),
        })
        .await
        .context("CreateMachine")?
        .into_inner()
        .machine
        .ok_or_else(|| anyhow!("CreateMachine answered without a machine"))?;
    Ok(created.metadata.map(|m| m.id).unwrap_or_default())
}

/// The benchmark's machines as listed: id and state.
pub async fn list(client: &mut Client) -> Result<Vec<(String, i32)>> {
    let machines = client
        .list_machines(ListMachinesRequest {
            filter: Some(MachineFilter {
                id: String::new(),
                label_selector: BTreeMap::from([(LABEL.to_string(), "machine".to_string())]),
            }),
        })
        .await
        .context("ListMachines")?
        .into_inner()
        .machines;
    Ok(machines
        .into_iter()
        .map(|m| {
            let state = m.status.as_ref().map_or(0, |s| s.state);
            (m.metadata.map(|m| m.id).unwrap_or_default(), state)
        })
        .collect())
}

/// Polls until every machine of `ids` is RUNNING.
pub async fn wait_running(client: &mut Client, ids: &[String]) -> Result<()> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let listed = list(client).await?;
        let running = ids
            .iter()
            .all(|id| listed.iter().any(|(l, s)| l == id && *s == RUNNING));
        if running {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("machines not RUNNING after {CONVERGE:?}: {listed:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls until every machine of `ids` is listed in a state other than PENDING.
pub async fn wait_settled(client: &mut Client, ids: &[String]) -> Result<Vec<(String, i32)>> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let listed = list(client).await?;
        let settled = ids.iter().all(|id| {
            listed
                .iter()
                .any(|(l, s)| l == id && *s != MachineState::MachinePending as i32)
        });
        if settled {
            return Ok(listed);
        }
        if Instant::now() > deadline {
            bail!("machines still PENDING after {CONVERGE:?}: {listed:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// UpdateMachinePower to on.
pub async fn power_on(client: &mut Client, id: &str) -> Result<()> {
    client
        .update_machine_power(UpdateMachinePowerRequest {
            machine_id: id.into(),
            power: Power::On as i32,
        })
        .await
        .context("UpdateMachinePower")?;
    Ok(())
}

/// DeleteMachine of every id, then polls until none is listed.
pub async fn delete_all(client: &mut Client, ids: &[String]) -> Result<()> {
    for id in ids {
        match client
            .delete_machine(DeleteMachineRequest {
                machine_id: id.clone(),
            })
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => return Err(anyhow!(status).context(format!("DeleteMachine {id}"))),
        }
    }
    let deadline = Instant::now() + CONVERGE;
    loop {
        let listed = list(client).await?;
        if !listed.iter().any(|(l, _)| ids.contains(l)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("machines not gone after {CONVERGE:?}: {listed:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes every machine of the benchmark the provider lists.
pub async fn delete_everything(client: &mut Client) -> Result<()> {
    let ids: Vec<String> = list(client).await?.into_iter().map(|(id, _)| id).collect();
    delete_all(client, &ids).await
}

/// Calls Exec for `id`, opens the URL as the machinepoollet would proxy it (WebSocket,
/// `v4.channel.k8s.io`), and reads stdout (channel 1) until `MARKER`. The session first replays
/// the recent console output, so a marker printed before it opened is seen at once.
pub async fn read_marker(client: &mut Client, id: &str) -> Result<()> {
    let url = client
        .exec(ExecRequest {
            machine_id: id.into(),
        })
        .await
        .context("Exec")?
        .into_inner()
        .url;
    let mut request = url.replace("http://", "ws://").into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "v4.channel.k8s.io, channel.k8s.io".parse()?,
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("opening the exec URL {url}"))?;
    let mut output = String::new();
    let deadline = tokio::time::Instant::now() + CONVERGE;
    let found = loop {
        if output.contains(MARKER) {
            break true;
        }
        let Ok(message) = tokio::time::timeout_at(deadline, socket.next()).await else {
            break false;
        };
        match message {
            Some(Ok(tungstenite::Message::Binary(data))) => {
                if let Some((&1, rest)) = data.split_first() {
                    output.push_str(&String::from_utf8_lossy(rest));
                }
            }
            Some(Ok(_)) => {}
            other => bail!("the exec session ended ({other:?}) before the marker; console:\n{output}"),
        }
    };
    let _ = socket.close(None).await;
    if !found {
        bail!("no {MARKER:?} on the console within {CONVERGE:?}; console:\n{output}");
    }
    Ok(())
}
