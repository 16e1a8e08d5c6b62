// SPDX-License-Identifier: Apache-2.0
//! Lifecycle (create, list, converge, power, delete), idempotent deletes and detaches, and the
//! generation / observed-generation contract.

use std::time::{Duration, Instant};

use iri_api::{
    machine::v1alpha1::{
        DeleteMachineRequest, DetachNetworkInterfaceRequest, DetachVolumeRequest, MachineState, Power,
        UpdateMachineAnnotationsRequest, UpdateMachinePowerRequest,
    },
    meta::v1alpha1::ObjectMetadata,
};
use tonic::Code;

use super::fixtures::{
    by_id, by_labels, create_default, create_machine, describe, ensure_id, id_of, list, machine_class,
    meta_of, must_get, new_machine, now_nanos, probe_get, spec_of, state_of, wait_for, wait_gone,
    wait_running,
};
use crate::{
    call, ensure,
    harness::{Ctx, Probe, TestError, TestResult, Tracked, expect_code},
};

/// How far a server timestamp may be from the suite's clock (clock skew, slow runtimes).
const CLOCK_SLACK_NANOS: i64 = 60 * 1_000_000_000;

/// A client-chosen id the server must ignore (iri-contract §2.1).
const CLIENT_ID: &str = "conformance-client-chosen-id";

pub(super) async fn create_list_run_delete(ctx: &mut Ctx) -> TestResult {
    let class = machine_class(ctx).await?;
    let mut machine = new_machine(ctx, &class, &[]);
    // Server-owned metadata the client tries to set: the server must ignore all of it.
    let labels = machine.metadata.take().unwrap_or_default().labels;
    machine.metadata = Some(ObjectMetadata {
        id: CLIENT_ID.into(),
        labels: labels.clone(),
        created_at: 1,
        deleted_at: 2,
        ..Default::default()
    });
    let before = now_nanos();
    let created = create_machine(ctx, machine).await?;
    let after = now_nanos();
    let meta = meta_of(&created);
    let id = meta.id.clone();
    ensure!(
        id != CLIENT_ID,
        "CreateMachine kept the client-supplied id {CLIENT_ID:?}; ids are assigned by the server"
    );
    ensure_id(&id)?;
    // Nanoseconds (iri-contract §2.1): seconds or milliseconds would be decades off.
    ensure!(
        meta.created_at >= before - CLOCK_SLACK_NANOS && meta.created_at <= after + CLOCK_SLACK_NANOS,
        "created_at {} is not within a minute of now ({before}) in Unix nanoseconds",
        meta.created_at
    );
    ensure!(
        meta.deleted_at == 0,
        "a new machine has deleted_at {}",
        meta.deleted_at
    );
    ensure!(
        meta.generation >= 0,
        "a new machine has generation {}",
        meta.generation
    );
    ensure!(
        meta.labels == labels,
        "CreateMachine returned labels {:?}, sent {labels:?}",
        meta.labels
    );

    let listed = list(ctx, Some(by_id(&id))).await?;
    ensure!(
        listed.len() == 1 && id_of(&listed[0]) == id,
        "ListMachines by id {id} returned {:?}",
        listed.iter().map(id_of).collect::<Vec<_>>()
    );
    ensure!(
        meta_of(&listed[0]).created_at == meta.created_at,
        "created_at changed from {} (create) to {} (list)",
        meta.created_at,
        meta_of(&listed[0]).created_at
    );
    let selected = list(ctx, Some(by_labels(ctx.selector()))).await?;
    ensure!(
        selected.len() == 1 && id_of(&selected[0]) == id,
        "ListMachines by this test's labels returned {:?}, want exactly [{id}]",
        selected.iter().map(id_of).collect::<Vec<_>>()
    );
    let everything = list(ctx, None).await?;
    ensure!(
        everything.iter().filter(|m| id_of(m) == id).count() == 1,
        "ListMachines without filter does not list machine {id} exactly once"
    );

    wait_running(ctx, &id).await?;

    call!(
        ctx,
        machine.delete_machine(DeleteMachineRequest {
            machine_id: id.clone()
        })
    )?;
    // Deletion may be asynchronous: while it is still listed the machine may say so
    // (TERMINATING, deleted_at), and it must go away within the delete timeout.
    wait_gone(ctx, &id).await?;
    ctx.untrack(&Tracked::Machine(id.clone()));
    let result = call!(
        ctx,
        machine.delete_machine(DeleteMachineRequest { machine_id: id })
    );
    expect_code(result, Code::NotFound, "DeleteMachine of a machine that is gone")?;
    Ok(())
}

/// Power off and on again. A powered-off machine may report MACHINE_STOPPED or MACHINE_SUSPENDED:
/// both are accepted, although the upstream machinepoollet cannot map STOPPED (iri-contract
/// §3.2.5) and a runtime meant for it should report SUSPENDED.
pub(super) async fn power_off_and_on(ctx: &mut Ctx) -> TestResult {
    let id = id_of(&create_default(ctx, &[]).await?).to_string();
    wait_running(ctx, &id).await?;

    set_power(ctx, &id, Power::Off).await?;
    let spec = spec_of(&must_get(ctx, &id).await?);
    ensure!(
        spec.power == Power::Off as i32,
        "after UpdateMachinePower(POWER_OFF) spec.power is {}",
        spec.power
    );
    let off = [
        MachineState::MachineStopped as i32,
        MachineState::MachineSuspended as i32,
    ];
    wait_for(
        ctx,
        &id,
        &format!("machine {id} reaches MACHINE_STOPPED or MACHINE_SUSPENDED after power off"),
        |m| off.contains(&state_of(m)),
    )
    .await?;

    set_power(ctx, &id, Power::On).await?;
    let spec = spec_of(&must_get(ctx, &id).await?);
    ensure!(
        spec.power == Power::On as i32,
        "after UpdateMachinePower(POWER_ON) spec.power is {}",
        spec.power
    );
    wait_running(ctx, &id).await?;
    Ok(())
}

async fn set_power(ctx: &mut Ctx, id: &str, power: Power) -> TestResult {
    call!(
        ctx,
        machine.update_machine_power(UpdateMachinePowerRequest {
            machine_id: id.into(),
            power: power as i32,
        })
    )?;
    Ok(())
}

/// Deletes until the runtime says NOT_FOUND: OK while deletion is in progress is fine (brokers),
/// but it must end in NOT_FOUND and the machine must be gone by then (iri-contract §3.5.5).
pub(super) async fn repeated_delete_ends_in_not_found(ctx: &mut Ctx) -> TestResult {
    let id = id_of(&create_default(ctx, &[]).await?).to_string();
    call!(
        ctx,
        machine.delete_machine(DeleteMachineRequest {
            machine_id: id.clone()
        })
    )?;
    let deadline = Instant::now() + ctx.config.timeouts.delete();
    let mut deletes = 1;
    loop {
        let result = call!(
            ctx,
            machine.delete_machine(DeleteMachineRequest {
                machine_id: id.clone()
            })
        );
        deletes += 1;
        match result {
            Err(status) if status.code() == Code::NotFound => break,
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Ok(_) => {
                return Err(TestError::fail(format!(
                    "DeleteMachine still answers OK after {deletes} calls over {:?}; a repeated delete \
                     must end in NotFound once the machine is gone",
                    ctx.config.timeouts.delete()
                )));
            }
            Err(status) => {
                return Err(TestError::fail(format!(
                    "repeated DeleteMachine: expected OK (still deleting) or NotFound, got {:?}: {}",
                    status.code(),
                    status.message()
                )));
            }
        }
    }
    let listed = list(ctx, Some(by_id(&id))).await?;
    ensure!(
        listed.is_empty(),
        "DeleteMachine answers NotFound but the machine is still listed: {}",
        describe(&listed[0])
    );
    ctx.untrack(&Tracked::Machine(id));
    Ok(())
}

/// The machinepoollet detaches what it no longer wants and treats NOT_FOUND as done
/// (iri-contract §2.0), so detaching an unknown name from an existing machine is NOT_FOUND.
pub(super) async fn detach_unknown_name_is_not_found(ctx: &mut Ctx) -> TestResult {
    let id = id_of(&create_default(ctx, &[]).await?).to_string();
    let result = call!(
        ctx,
        machine.detach_volume(DetachVolumeRequest {
            machine_id: id.clone(),
            name: "conformance-no-such-volume".into(),
        })
    );
    expect_code(result, Code::NotFound, "DetachVolume of an unknown volume name")?;
    let result = call!(
        ctx,
        machine.detach_network_interface(DetachNetworkInterfaceRequest {
            machine_id: id.clone(),
            name: "conformance-no-such-nic".into(),
        })
    );
    expect_code(
        result,
        Code::NotFound,
        "DetachNetworkInterface of an unknown NIC name",
    )?;
    must_get(ctx, &id).await?;
    Ok(())
}

/// Generation counts spec changes and `observed_generation` follows it (the machinepoollet only
/// propagates status once `observed_generation` has caught up, iri-contract §3.2.5).
/// Annotations are not spec: replacing them leaves the generation alone.
///
/// A runtime that never touches generation (0 forever) passes: the poollet's gate then always
/// opens. A runtime that sets it must count consistently.
pub(super) async fn generation_follows_power_changes(ctx: &mut Ctx) -> TestResult {
    let id = id_of(&create_default(ctx, &[]).await?).to_string();
    let start = meta_of(&wait_running(ctx, &id).await?).generation;

    call!(
        ctx,
        machine.update_machine_annotations(UpdateMachineAnnotationsRequest {
            machine_id: id.clone(),
            annotations: [("conformance-generation".to_string(), "untouched".to_string())].into(),
        })
    )?;
    let after_annotations = meta_of(&must_get(ctx, &id).await?).generation;
    ensure!(
        after_annotations == start,
        "UpdateMachineAnnotations changed generation from {start} to {after_annotations}; \
         annotations are not spec"
    );

    let mut generation = start;
    for power in [Power::Off, Power::On] {
        set_power(ctx, &id, power).await?;
        generation =
            expect_spec_change(ctx, &id, generation, &format!("power {}", power.as_str_name())).await?;
    }
    Ok(())
}

/// Checks the generation after a spec change made on machine `id` whose generation was
/// `before`, waits for `observed_generation` to catch up, and returns the new generation.
pub(super) async fn expect_spec_change(
    ctx: &mut Ctx,
    id: &str,
    before: i64,
    change: &str,
) -> Result<i64, TestError> {
    let machine = must_get(ctx, id).await?;
    let generation = meta_of(&machine).generation;
    if before == 0 && generation == 0 {
        // The runtime does not count generations at all, which the contract allows.
        return Ok(0);
    }
    ensure!(
        generation > before,
        "after a spec change ({change}) generation is {generation}, was {before}: a runtime that \
         sets generation must increase it on every spec change"
    );
    ctx.eventually(
        &format!("observed_generation of machine {id} reaches generation {generation} after {change}"),
        ctx.config.timeouts.ready(),
        |p: Probe| async move {
            let machine = probe_get(&p, id)
                .await?
                .ok_or_else(|| TestError::fail(format!("machine {id} disappeared")))?;
            let meta = meta_of(&machine);
            let observed = machine
                .status
                .as_ref()
                .map(|s| s.observed_generation)
                .unwrap_or(0);
            if observed > meta.generation {
                return Err(TestError::fail(format!(
                    "observed_generation {observed} is ahead of generation {}: {}",
                    meta.generation,
                    describe(&machine)
                )));
            }
            Ok(((observed >= generation).then_some(()), describe(&machine)))
        },
    )
    .await?;
    Ok(generation)
}
