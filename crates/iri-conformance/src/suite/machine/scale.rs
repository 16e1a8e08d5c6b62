// SPDX-License-Identifier: Apache-2.0
//! Many machines at once: parallel creates and deletes, durability across a runtime restart,
//! and listing at scale.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use futures::StreamExt;
use iri_api::{
    endpoint::clients,
    machine::v1alpha1::{
        CreateMachineRequest, DeleteMachineRequest, ListMachinesRequest, Machine, MachineFilter,
        MachineState, Power, UpdateMachinePowerRequest,
    },
};
use tonic::{Code, Status, transport::Channel};

use super::fixtures::{
    by_labels, create_machine, describe, id_of, list, machine_class, meta_of, new_machine, nic, probe_list,
    roomy_class, scratch_disk, spec_difference, spec_of, state_name, state_of, wait_for, wait_running,
};
use crate::{
    call, ensure,
    harness::{Ctx, Probe, TestError, TestResult, Tracked},
};

/// Machines created at once by the concurrency test.
const PARALLEL_MACHINES: i64 = 10;

/// In-flight RPCs while creating or deleting many machines for the scale test.
const SCALE_BATCH: usize = 32;

/// The machinepoollet lists all machines every 5 s (iri-contract §3.2.9, §3.5.7): an
/// unfiltered list that takes longer makes it fall behind.
const RELIST_PERIOD: Duration = Duration::from_secs(5);

fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

async fn create_on(channel: Channel, machine: Machine, timeout: Duration) -> Result<String, String> {
    let response = clients::machine(channel)
        .create_machine(request(
            CreateMachineRequest {
                machine: Some(machine),
            },
            timeout,
        ))
        .await
        .map_err(|s| format!("CreateMachine: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let id = response.machine.as_ref().map(id_of).unwrap_or("").to_string();
    if id.is_empty() {
        return Err("CreateMachine answered OK without a machine id".into());
    }
    Ok(id)
}

async fn delete_on(channel: Channel, id: String, timeout: Duration) -> Result<(), Status> {
    clients::machine(channel)
        .delete_machine(request(DeleteMachineRequest { machine_id: id }, timeout))
        .await
        .map(drop)
}

/// Waits until nothing with this test's labels is listed, then forgets `ids`.
async fn wait_all_gone(ctx: &mut Ctx, ids: &[String]) -> TestResult {
    let selector = ctx.selector();
    let selector = &selector;
    ctx.eventually(
        "every machine of the test disappears from ListMachines",
        ctx.config.timeouts.delete(),
        |p: Probe| async move {
            let left = probe_list(&p, Some(by_labels(selector.clone()))).await?;
            let seen = format!("{} still listed", left.len());
            Ok((left.is_empty().then_some(()), seen))
        },
    )
    .await?;
    for id in ids {
        ctx.untrack(&Tracked::Machine(id.clone()));
    }
    Ok(())
}

/// N CreateMachine calls at once (N = 10, or the class's free quantity if smaller): all succeed,
/// ids are distinct, all are listed; N DeleteMachine calls at once: all go away, nothing with the
/// test's labels is left. Serial because it takes up to ten units of capacity at once.
pub(super) async fn parallel_creates_and_deletes(ctx: &mut Ctx) -> TestResult {
    let (class, room) = roomy_class(ctx).await?;
    let count = PARALLEL_MACHINES.min(room);
    if count < 2 {
        return Err(TestError::skip(format!(
            "class {class:?} has room for {room} machines; parallel creates need at least 2"
        )));
    }
    let timeout = ctx.config.timeouts.rpc();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..count {
        let machine = new_machine(ctx, &class, &[("index", &index.to_string())]);
        tasks.spawn(create_on(ctx.channel(), machine, timeout));
    }
    let mut ids = Vec::new();
    let mut errors = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(id)) => {
                ctx.track(Tracked::Machine(id.clone()));
                ids.push(id);
            }
            Ok(Err(error)) => errors.push(error),
            Err(join) => errors.push(format!("task failed: {join}")),
        }
    }
    ensure!(
        errors.is_empty(),
        "{} of {count} parallel creates failed: {}",
        errors.len(),
        errors.join("; ")
    );
    let distinct: BTreeSet<&String> = ids.iter().collect();
    ensure!(
        distinct.len() == ids.len(),
        "{count} parallel creates returned only {} distinct ids",
        distinct.len()
    );
    let listed: BTreeSet<String> = list(ctx, Some(by_labels(ctx.selector())))
        .await?
        .iter()
        .map(|m| id_of(m).to_string())
        .collect();
    let created: BTreeSet<String> = ids.iter().cloned().collect();
    ensure!(
        listed == created,
        "after {count} parallel creates, the test's labels select {} machines ({} of them created)",
        listed.len(),
        listed.intersection(&created).count()
    );

    let mut tasks = tokio::task::JoinSet::new();
    for id in &ids {
        let (channel, id) = (ctx.channel(), id.clone());
        tasks.spawn(async move { (id.clone(), delete_on(channel, id, timeout).await) });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(()))) => {}
            Ok((id, Err(status))) => errors.push(format!("{id}: {:?}: {}", status.code(), status.message())),
            Err(join) => errors.push(format!("task failed: {join}")),
        }
    }
    ensure!(
        errors.is_empty(),
        "{} of {count} parallel deletes failed: {}",
        errors.len(),
        errors.join("; ")
    );
    wait_all_gone(ctx, &ids).await
}

/// Restart durability: machines, with their labels, annotations, specs and states, are listed
/// the same after the runtime restarted (`hooks.restart`).
pub(super) async fn objects_survive_restart(ctx: &mut Ctx) -> TestResult {
    let hook = ctx.config.hooks.restart.clone();
    if hook.is_empty() {
        return Err(TestError::skip("no restart hook configured"));
    }
    let class = machine_class(ctx).await?;
    let mut ids = Vec::new();
    for role in ["plain", "rich", "off"] {
        let mut machine = new_machine(ctx, &class, &[("role", role)]);
        if role == "rich" {
            if let Some(meta) = machine.metadata.as_mut() {
                meta.annotations = BTreeMap::from([
                    (
                        "conformance.iri.ironcore.dev/note".into(),
                        "survives restarts".into(),
                    ),
                    (
                        "machinepoollet.ironcore.dev/irimachine-generation".into(),
                        "0".into(),
                    ),
                ]);
            }
            if let Some(spec) = machine.spec.as_mut() {
                spec.volumes.push(scratch_disk("restart-disk", "odb"));
                spec.network_interfaces
                    .push(nic(ctx, "restart-nic", &["10.0.0.41"]));
            }
        }
        ids.push(id_of(&create_machine(ctx, machine).await?).to_string());
    }
    for id in &ids[..2] {
        wait_running(ctx, id).await?;
    }
    call!(
        ctx,
        machine.update_machine_power(UpdateMachinePowerRequest {
            machine_id: ids[2].clone(),
            power: Power::Off as i32,
        })
    )?;
    let off = [
        MachineState::MachineStopped as i32,
        MachineState::MachineSuspended as i32,
    ];
    wait_for(ctx, &ids[2], "the powered-off machine stops", |m| {
        off.contains(&state_of(m))
    })
    .await?;
    let before = by_id(list(ctx, Some(by_labels(ctx.selector()))).await?);

    run_hook(&hook, ctx.config.timeouts.ready()).await?;

    // The runtime may take a moment to serve again and to rediscover its machines' states.
    let before_ref = &before;
    let selector = ctx.selector();
    let selector = &selector;
    let after = ctx
        .eventually(
            "after the restart, the same machines are listed in the same states",
            ctx.config.timeouts.ready(),
            |p: Probe| async move {
                let listed = match probe_list(&p, Some(by_labels(selector.clone()))).await {
                    Ok(listed) => by_id(listed),
                    Err(e) => return Ok((None, format!("ListMachines failed: {}", e.reason))),
                };
                let same_ids = listed.keys().eq(before_ref.keys());
                let same_states = same_ids
                    && listed
                        .iter()
                        .all(|(id, m)| state_of(m) == state_of(&before_ref[id]));
                let seen = listed.values().map(describe).collect::<Vec<_>>().join("; ");
                Ok((same_states.then_some(listed), seen))
            },
        )
        .await?;

    for (id, was) in &before {
        let now = &after[id];
        let (was_meta, now_meta) = (meta_of(was), meta_of(now));
        ensure!(
            now_meta.labels == was_meta.labels,
            "machine {id}: labels changed across the restart"
        );
        ensure!(
            now_meta.annotations == was_meta.annotations,
            "machine {id}: annotations changed across the restart"
        );
        ensure!(
            now_meta.created_at == was_meta.created_at,
            "machine {id}: created_at changed from {} to {} across the restart",
            was_meta.created_at,
            now_meta.created_at
        );
        ensure!(
            now_meta.generation == was_meta.generation,
            "machine {id}: generation changed from {} to {} across the restart without a spec change",
            was_meta.generation,
            now_meta.generation
        );
        if let Some(diff) = spec_difference(&spec_of(was), &spec_of(now)) {
            return Err(TestError::fail(format!(
                "machine {id}: spec changed across the restart: {diff}"
            )));
        }
        ensure!(
            state_of(now) == state_of(was),
            "machine {id}: state {} became {}",
            state_name(state_of(was)),
            state_name(state_of(now))
        );
    }
    Ok(())
}

fn by_id(machines: Vec<Machine>) -> BTreeMap<String, Machine> {
    machines.into_iter().map(|m| (id_of(&m).to_string(), m)).collect()
}

/// Runs the restart hook with `sh -c`; fails with its exit status and the tail of its output.
async fn run_hook(hook: &str, timeout: Duration) -> TestResult {
    let output = tokio::time::timeout(
        timeout,
        tokio::process::Command::new("sh")
            .arg("-c")
            .arg(hook)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| TestError::fail(format!("the restart hook did not finish within {timeout:?}")))?
    .map_err(|e| TestError::fail(format!("cannot run the restart hook with sh -c: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: String = stderr
        .chars()
        .rev()
        .take(500)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(TestError::fail(format!(
        "the restart hook failed ({}): {}",
        output.status,
        tail.trim()
    )))
}

/// Creates `scale.objects` machines and lists them: the unfiltered list contains all of them,
/// the test's selector returns exactly them, a narrower selector exactly its half. Latencies are
/// measured but a pass carries no numbers (the benchmark reports those); they appear in the
/// reason when the test fails, including when an unfiltered list is slower than the
/// machinepoollet's relist period.
pub(super) async fn list_at_scale(ctx: &mut Ctx) -> TestResult {
    let wanted = ctx.config.scale.objects;
    if wanted == 0 {
        return Err(TestError::skip("scale.objects is 0"));
    }
    let (class, room) = roomy_class(ctx).await?;
    if usize::try_from(room).unwrap_or(0) < wanted {
        return Err(TestError::skip(format!(
            "class {class:?} has room for {room} machines, scale.objects is {wanted}"
        )));
    }
    let timeout = ctx.config.timeouts.rpc();
    let machines: Vec<(bool, Machine)> = (0..wanted)
        .map(|i| {
            let even = i % 2 == 0;
            let shard = if even { "even" } else { "odd" };
            (even, new_machine(ctx, &class, &[("shard", shard)]))
        })
        .collect();
    let started = Instant::now();
    let channel = ctx.channel();
    let mut created = futures::stream::iter(machines)
        .map(|(even, machine)| {
            let channel = channel.clone();
            async move { (even, create_on(channel, machine, timeout).await) }
        })
        .buffer_unordered(SCALE_BATCH);
    let (mut ids, mut even_ids, mut errors) = (Vec::new(), BTreeSet::new(), Vec::new());
    while let Some((even, result)) = created.next().await {
        match result {
            Ok(id) => {
                ctx.track(Tracked::Machine(id.clone()));
                if even {
                    even_ids.insert(id.clone());
                }
                ids.push(id);
            }
            Err(error) => errors.push(error),
        }
    }
    let create_time = started.elapsed();
    let mut timings = vec![format!("{wanted} creates in {create_time:?}")];
    let outcome = check_lists(ctx, &ids, &even_ids, &errors, &mut timings).await;

    // Delete in batches ourselves: the per-object cleanup would take long for thousands.
    let started = Instant::now();
    let failures: Vec<String> = futures::stream::iter(ids.clone())
        .map(|id| {
            let channel = channel.clone();
            async move { (id.clone(), delete_on(channel, id, timeout).await) }
        })
        .buffer_unordered(SCALE_BATCH)
        .filter_map(|(id, result)| async move {
            match result {
                Err(status) if status.code() != Code::NotFound => {
                    Some(format!("{id}: {:?}: {}", status.code(), status.message()))
                }
                _ => None,
            }
        })
        .collect()
        .await;
    let gone = wait_all_gone(ctx, &ids).await;
    timings.push(format!("{} deletes in {:?}", ids.len(), started.elapsed()));
    let timings = timings.join(", ");
    let with_timings = |e: TestError| TestError::fail(format!("{} ({timings})", e.reason));
    outcome.map_err(with_timings)?;
    if !failures.is_empty() {
        return Err(TestError::fail(format!(
            "{} deletes failed: {} ({timings})",
            failures.len(),
            failures.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
        )));
    }
    gone.map_err(with_timings)
}

async fn check_lists(
    ctx: &mut Ctx,
    ids: &[String],
    even_ids: &BTreeSet<String>,
    errors: &[String],
    timings: &mut Vec<String>,
) -> TestResult {
    ensure!(
        errors.is_empty(),
        "{} of {} creates failed, e.g. {}",
        errors.len(),
        errors.len() + ids.len(),
        errors.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
    );
    let all: BTreeSet<String> = ids.iter().cloned().collect();

    let (unfiltered, unfiltered_took) = timed_list(ctx, None).await?;
    timings.push(format!(
        "unfiltered list of {} machines in {unfiltered_took:?}",
        unfiltered.len()
    ));
    let found = unfiltered.iter().filter(|m| all.contains(id_of(m))).count();
    ensure!(
        found == all.len(),
        "ListMachines without filter returned {found} of the {} machines created",
        all.len()
    );

    let (selected, took) = timed_list(ctx, Some(by_labels(ctx.selector()))).await?;
    timings.push(format!("selector list of {} in {took:?}", selected.len()));
    let selected: BTreeSet<String> = selected.iter().map(|m| id_of(m).to_string()).collect();
    ensure!(
        selected == all,
        "the test's selector returned {} machines, {} of the {} created",
        selected.len(),
        selected.intersection(&all).count(),
        all.len()
    );

    let mut selector = ctx.selector();
    selector.insert("shard".into(), "even".into());
    let (half, took) = timed_list(ctx, Some(by_labels(selector))).await?;
    timings.push(format!("half selector list of {} in {took:?}", half.len()));
    let half: BTreeSet<String> = half.iter().map(|m| id_of(m).to_string()).collect();
    ensure!(
        &half == even_ids,
        "selector shard=even returned {} machines, want exactly the {} labelled so",
        half.len(),
        even_ids.len()
    );

    ensure!(
        unfiltered_took < RELIST_PERIOD,
        "an unfiltered ListMachines took {unfiltered_took:?}; the machinepoollet relists every \
         {RELIST_PERIOD:?}"
    );
    Ok(())
}

/// A ListMachines call timed on its own (not recorded: recording formats the whole response).
async fn timed_list(ctx: &Ctx, filter: Option<MachineFilter>) -> Result<(Vec<Machine>, Duration), TestError> {
    let started = Instant::now();
    let machines = ctx
        .machine()
        .list_machines(ctx.request(ListMachinesRequest { filter }))
        .await?
        .into_inner()
        .machines;
    Ok((machines, started.elapsed()))
}
