// SPDX-License-Identifier: Apache-2.0
//! Machines started per minute at a few concurrency levels, and the provider's memory.
//!
//! Throughput: for each level N, N CreateMachine calls at once, timed until ListMachines shows
//! all N RUNNING (QEMU started, not the guest's marker: N TCG guests booting on two cores would
//! measure the CPU, not the provider); then the machines are deleted.
//!
//! Memory: the provider's VmRSS idle (just started, no machine ever created), then with
//! `machines` machines defined, created powered off (no QEMU runs for them: 50 TCG guests do not
//! fit on a small host), then with `running` of them powered on (QEMU's own VmRSS is read
//! `settle` after they are RUNNING, while their guests boot).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{
    boot::ms,
    provider::{CLASS, Provider, SMALL_CLASS},
    rpc::{self, Client},
};
use crate::{
    stats::{Summary, Table, fmt_num, per_minute},
    system::vm_rss_bytes,
    units::{MIB, fmt_size_approx},
};

/// One concurrency level.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    /// Machines created at once.
    pub concurrency: usize,
    /// Rounds measured.
    pub rounds: usize,
    /// Milliseconds from the first CreateMachine until all are RUNNING, per round.
    pub samples_ms: Vec<f64>,
    /// Their median.
    pub p50_ms: f64,
    /// Machines started per minute at the median.
    pub per_minute: f64,
}

/// Machines started per minute.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputReport {
    /// Guest memory of each machine, bytes.
    pub memory_bytes: u64,
    /// One entry per level.
    pub levels: Vec<Level>,
}

/// Measures `rounds` rounds at each of `levels`.
pub async fn throughput(
    client: &mut Client,
    guest: &std::path::Path,
    levels: &[usize],
    rounds: usize,
    memory_bytes: u64,
) -> Result<ThroughputReport> {
    let mut out = Vec::new();
    for &n in levels {
        let mut samples = Vec::new();
        for round in 0..rounds {
            let start = Instant::now();
            let creates = (0..n).map(|_| {
                let mut client = client.clone();
                async move { rpc::create(&mut client, CLASS, guest, true).await }
            });
            let results = futures::future::join_all(creates).await;
            let ids: Vec<String> = results.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
            let result = async {
                for r in results {
                    r?;
                }
                rpc::wait_running(client, &ids).await
            }
            .await;
            let elapsed = ms(start);
            rpc::delete_all(client, &ids).await?;
            result?;
            eprintln!(
                "throughput: {n} at once, round {}/{rounds}: all RUNNING after {elapsed:.0} ms",
                round + 1
            );
            samples.push(elapsed);
        }
        let p50 = Summary::of(&samples).map_or(f64::NAN, |s| s.p50);
        out.push(Level {
            concurrency: n,
            rounds,
            per_minute: per_minute(n as u64, p50 / 1e3),
            p50_ms: p50,
            samples_ms: samples,
        });
    }
    Ok(ThroughputReport {
        memory_bytes,
        levels: out,
    })
}

/// The provider's and QEMU's memory.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// Provider VmRSS just after start, bytes.
    pub idle_bytes: Option<u64>,
    /// Machines defined.
    pub machines: usize,
    /// Provider VmRSS with `machines` defined, all powered off, bytes.
    pub defined_off_bytes: Option<u64>,
    /// The states ListMachines showed for them then (state number, count).
    pub defined_states: Vec<(i32, usize)>,
    /// Machines powered on of those.
    pub running: usize,
    /// Guest memory of each, bytes.
    pub small_memory_bytes: u64,
    /// Provider VmRSS with `running` of the `machines` running, bytes.
    pub with_running_bytes: Option<u64>,
    /// Seconds after RUNNING when QEMU's VmRSS was read.
    pub settle_seconds: u64,
    /// VmRSS of each running machine's QEMU, bytes.
    pub qemu_rss_bytes: Vec<u64>,
}

/// The VmRSS of `pid`, bytes.
pub fn rss(pid: Option<i32>) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    vm_rss_bytes(&text)
}

/// What the memory part creates.
#[derive(Debug, Clone, Copy)]
pub struct MemoryPlan {
    /// Machines defined, powered off.
    pub machines: usize,
    /// Of those, how many are powered on.
    pub running: usize,
    /// Guest memory of each, bytes.
    pub small_memory_bytes: u64,
    /// How long after RUNNING QEMU's memory is read.
    pub settle: Duration,
}

/// Measures the memory part. `idle_bytes` was read right after the provider started.
pub async fn memory(
    client: &mut Client,
    provider: &Provider,
    guest: &std::path::Path,
    idle_bytes: Option<u64>,
    plan: MemoryPlan,
) -> Result<MemoryReport> {
    let MemoryPlan {
        machines,
        running,
        small_memory_bytes,
        settle,
    } = plan;
    let mut ids = Vec::new();
    let result = async {
        eprintln!("memory: creating {machines} machines powered off");
        for _ in 0..machines {
            ids.push(rpc::create(client, SMALL_CLASS, guest, false).await?);
        }
        let listed = rpc::wait_settled(client, &ids).await?;
        // A resync or two, so that the provider's steady state is measured, not a peak.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let defined_off_bytes = rss(provider.pid());
        let mut defined_states: Vec<(i32, usize)> = Vec::new();
        for (_, state) in &listed {
            match defined_states.iter_mut().find(|(s, _)| s == state) {
                Some(entry) => entry.1 += 1,
                None => defined_states.push((*state, 1)),
            }
        }
        let on: Vec<String> = ids.iter().take(running).cloned().collect();
        eprintln!("memory: powering on {} of them", on.len());
        for id in &on {
            rpc::power_on(client, id).await?;
        }
        rpc::wait_running(client, &on).await?;
        tokio::time::sleep(settle).await;
        let with_running_bytes = rss(provider.pid());
        let qemu_rss_bytes: Vec<u64> = provider
            .qemu_pids()
            .into_iter()
            .filter_map(|pid| rss(Some(pid)))
            .collect();
        anyhow::Ok(MemoryReport {
            idle_bytes,
            machines,
            defined_off_bytes,
            defined_states,
            running: on.len(),
            small_memory_bytes,
            with_running_bytes,
            settle_seconds: settle.as_secs(),
            qemu_rss_bytes,
        })
    }
    .await;
    eprintln!("memory: deleting the {} machines", ids.len());
    rpc::delete_all(client, &ids)
        .await
        .context("deleting the memory test's machines")?;
    result
}

fn state_name(state: i32) -> String {
    iri_api::machine::v1alpha1::MachineState::try_from(state)
        .map_or_else(|_| state.to_string(), |s| s.as_str_name().to_string())
}

fn opt_size(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "n/a".into(),
        |b| format!("{} MiB", fmt_num(b as f64 / MIB as f64)),
    )
}

impl ThroughputReport {
    /// The section as Markdown.
    pub fn render(&self) -> String {
        let mut out = String::from("### Machines started per minute\n\n");
        let rounds = self.levels.first().map_or(0, |l| l.rounds);
        out.push_str(&format!(
            "N CreateMachine calls at once (guests of {} memory, one vCPU), timed until ListMachines \
             shows all N RUNNING (QEMU started; not the guests' marker, which on TCG measures the CPU); \
             {rounds} round(s) per level, median; the machines are deleted after each round.\n\n",
            fmt_size_approx(self.memory_bytes)
        ));
        let mut table = Table::new([
            "machines at once",
            "all RUNNING p50 ms",
            "machines/min",
            "vs 1 at once",
        ]);
        let base = self.levels.first().map(|l| l.per_minute);
        for level in &self.levels {
            table.row([
                level.concurrency.to_string(),
                fmt_num(level.p50_ms),
                fmt_num(level.per_minute),
                crate::stats::fmt_ratio(base.and_then(|b| crate::stats::ratio(level.per_minute, b))),
            ]);
        }
        out.push_str(&table.render());
        out
    }
}

impl MemoryReport {
    /// The section as Markdown.
    pub fn render(&self) -> String {
        let mut out = String::from("### Memory: the provider with many machines, and QEMU per machine\n\n");
        let states: Vec<String> = self
            .defined_states
            .iter()
            .map(|(s, n)| format!("{n} {}", state_name(*s)))
            .collect();
        out.push_str(&format!(
            "VmRSS from /proc/<pid>/status. {} machines of {} memory were created with power off (so no \
             QEMU runs for them; ListMachines showed {}): 50 running TCG guests do not fit on this host's \
             cores. Then {} of them powered on (UpdateMachinePower), and QEMU's own VmRSS read {} s after \
             RUNNING, while the guests boot.\n\n",
            self.machines,
            fmt_size_approx(self.small_memory_bytes),
            if states.is_empty() {
                "nothing".into()
            } else {
                states.join(", ")
            },
            self.running,
            self.settle_seconds
        ));
        let mut table = Table::new(["process", "state", "VmRSS"]);
        table.row([
            "provider".into(),
            "idle (no machine)".into(),
            opt_size(self.idle_bytes),
        ]);
        table.row([
            "provider".into(),
            format!("{} machines defined, powered off", self.machines),
            opt_size(self.defined_off_bytes),
        ]);
        table.row([
            "provider".into(),
            format!("{} defined, {} of them running", self.machines, self.running),
            opt_size(self.with_running_bytes),
        ]);
        let qemu: Vec<f64> = self.qemu_rss_bytes.iter().map(|&b| b as f64).collect();
        if let Some(s) = Summary::of(&qemu) {
            table.row([
                "QEMU, per machine".into(),
                format!(
                    "running, {} of {} guest memory (p50, max)",
                    self.running,
                    fmt_size_approx(self.small_memory_bytes)
                ),
                format!(
                    "{} MiB, {} MiB",
                    fmt_num(s.p50 / MIB as f64),
                    fmt_num(s.max / MIB as f64)
                ),
            ]);
        }
        out.push_str(&table.render());
        if let (Some(idle), Some(defined)) = (self.idle_bytes, self.defined_off_bytes)
            && self.machines > 0
        {
            out.push_str(&format!(
                "\nPer defined machine, the provider holds about {} KiB more than idle.\n",
                fmt_num((defined as f64 - idle as f64) / 1024.0 / self.machines as f64)
            ));
        }
        out
    }
}
