// SPDX-License-Identifier: Apache-2.0
//! Time from CreateVolume to AVAILABLE, from CreateVolumeSnapshot to READY, and from a
//! CreateVolume from that snapshot (a clone) to AVAILABLE, for a small and a large size. The
//! local backend makes all three constant-time (a new qcow2 layer, copy-on-write), so the
//! large/small ratio should be about 1.
//!
//! Sizes alternate within each iteration (small, then large) so that drift over the run hits
//! both alike; one unmeasured small iteration comes first (connections, first daemon work).
//! Every iteration deletes what it created, so each starts from the same state.

use std::time::Instant;

use anyhow::{Result, bail};
use serde::Serialize;

use super::rpc::{self, Client};
use crate::{
    stats::{Summary, Table, fmt_num, fmt_ratio, ratio},
    units::{GIB, MIB, fmt_size, fmt_size_approx},
};

/// Objects one iteration holds at its peak (volume, snapshot, clone); the provider accounts
/// each at the full volume size.
const OBJECTS_PER_ITERATION: u64 = 3;

/// The sizes measured, and why the large one differs from what was asked, if it does.
#[derive(Debug, Clone, Serialize)]
pub struct Sizes {
    /// The small size (the baseline of the ratio).
    pub small_bytes: u64,
    /// The large size asked for (`--large-size`).
    pub large_requested_bytes: u64,
    /// The large size measured.
    pub large_bytes: u64,
    /// Status quantity of the class before the run.
    pub quantity_bytes: u64,
    /// Why the requested large size was not used (the provider's refusal, verbatim).
    pub admission: Option<String>,
}

/// One operation's times at one size.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// Volume size in bytes.
    pub size_bytes: u64,
    /// Milliseconds per iteration.
    pub samples_ms: Vec<f64>,
    /// Their percentiles.
    pub summary: Option<Summary>,
}

/// One operation at both sizes.
#[derive(Debug, Clone, Serialize)]
pub struct Operation {
    /// `create`, `snapshot` or `clone`.
    pub name: String,
    /// What is timed.
    pub measures: String,
    /// At the small size.
    pub small: Timing,
    /// At the large size.
    pub large: Timing,
    /// Large p50 / small p50.
    pub ratio_p50: Option<f64>,
}

/// The lifecycle part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct LifecycleReport {
    /// Sizes used.
    pub sizes: Sizes,
    /// Measured iterations per size.
    pub iterations: usize,
    /// create, snapshot, clone.
    pub operations: Vec<Operation>,
}

/// Picks the large size: the requested one if the provider can admit a volume, a snapshot and a
/// clone of it; else the largest size it can, and the reason (CreateVolume of the requested size
/// is tried once, so that the reason is the provider's own answer).
pub async fn choose_sizes(client: &mut Client, small: u64, large: u64) -> Result<Sizes> {
    let quantity = rpc::quantity(client).await?;
    let mut sizes = Sizes {
        small_bytes: small,
        large_requested_bytes: large,
        large_bytes: large,
        quantity_bytes: quantity,
        admission: None,
    };
    let need = large.saturating_mul(OBJECTS_PER_ITERATION);
    if need <= quantity {
        return Ok(sizes);
    }
    let answer = match rpc::create_volume(client, large, None).await {
        Err(status) => format!(
            "CreateVolume of {} answered {:?}: {}",
            fmt_size(large),
            status.code(),
            status.message()
        ),
        Ok(id) => {
            rpc::wait_available(client, &id).await?;
            rpc::delete_volume(client, &id).await?;
            format!(
                "one {} volume is admitted, but a volume, its snapshot and a clone are accounted at \
                 {OBJECTS_PER_ITERATION} x its size",
                fmt_size(large)
            )
        }
    };
    // Headroom of one GiB: the provider follows others' use of the filesystem in 1 GiB steps.
    let room = quantity.saturating_sub(GIB) / OBJECTS_PER_ITERATION;
    let largest = if room >= 2 * GIB {
        room / GIB * GIB
    } else {
        room / MIB * MIB
    };
    if largest <= small {
        bail!(
            "the provider can admit only {} (Status quantity {} bytes) for {OBJECTS_PER_ITERATION} objects: \
             not more than the small size {}",
            fmt_size_approx(room),
            quantity,
            fmt_size(small)
        );
    }
    sizes.large_bytes = largest;
    sizes.admission = Some(format!(
        "{answer}. Status quantity of the class was {quantity} bytes ({}): free space of the data \
         directory's filesystem plus what the provider occupies, minus reserve_bytes (1 GiB), minus the \
         full size of every volume and snapshot (thick accounting of sparse qcow2). An iteration holds \
         a volume, a snapshot and a clone ({OBJECTS_PER_ITERATION} x {} = {}), so the largest admissible \
         size, {}, was measured instead",
        fmt_size_approx(quantity),
        fmt_size(large),
        fmt_size_approx(need),
        fmt_size(largest)
    ));
    Ok(sizes)
}

/// Runs `iterations` measured iterations (after one warm-up) at both sizes.
pub async fn run(client: &mut Client, sizes: Sizes, iterations: usize) -> Result<LifecycleReport> {
    eprintln!("lifecycle: warm-up ({})", fmt_size(sizes.small_bytes));
    iteration(client, sizes.small_bytes).await?;
    let mut small = [Vec::new(), Vec::new(), Vec::new()];
    let mut large = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..iterations {
        eprintln!(
            "lifecycle: iteration {}/{iterations} ({} and {})",
            i + 1,
            fmt_size(sizes.small_bytes),
            fmt_size(sizes.large_bytes)
        );
        for (size, samples) in [(sizes.small_bytes, &mut small), (sizes.large_bytes, &mut large)] {
            let times = iteration(client, size).await?;
            for (k, ms) in times.into_iter().enumerate() {
                samples[k].push(ms);
            }
        }
    }
    let timing = |size_bytes: u64, samples: &[f64]| Timing {
        size_bytes,
        samples_ms: samples.to_vec(),
        summary: Summary::of(samples),
    };
    let names = [
        ("create", "CreateVolume until AVAILABLE"),
        ("snapshot", "CreateVolumeSnapshot until READY"),
        ("clone", "CreateVolume from the snapshot until AVAILABLE"),
    ];
    let operations = names
        .iter()
        .enumerate()
        .map(|(k, (name, measures))| {
            let small = timing(sizes.small_bytes, &small[k]);
            let large = timing(sizes.large_bytes, &large[k]);
            let ratio_p50 = match (&small.summary, &large.summary) {
                (Some(s), Some(l)) => ratio(l.p50, s.p50),
                _ => None,
            };
            Operation {
                name: name.to_string(),
                measures: measures.to_string(),
                small,
                large,
                ratio_p50,
            }
        })
        .collect();
    Ok(LifecycleReport {
        sizes,
        iterations,
        operations,
    })
}

/// One create, snapshot, clone of a `size` volume, then deletes all three. Returns the three
/// times in milliseconds.
async fn iteration(client: &mut Client, size: u64) -> Result<[f64; 3]> {
    let start = Instant::now();
    let volume = rpc::create_volume(client, size, None).await?;
    rpc::wait_available(client, &volume).await?;
    let create = ms(start);

    let start = Instant::now();
    let snapshot = rpc::create_snapshot(client, &volume).await?;
    rpc::wait_snapshot_ready(client, &snapshot).await?;
    let snap = ms(start);

    let start = Instant::now();
    let clone = rpc::create_volume(client, size, Some(&snapshot)).await?;
    rpc::wait_available(client, &clone).await?;
    let cloned = ms(start);

    rpc::delete_volume(client, &clone).await?;
    rpc::delete_snapshot(client, &snapshot).await?;
    rpc::delete_volume(client, &volume).await?;
    Ok([create, snap, cloned])
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

impl LifecycleReport {
    /// The section as Markdown.
    pub fn render(&self) -> String {
        let s = &self.sizes;
        let mut out = String::from("### Create, snapshot and clone: constant time whatever the size\n\n");
        let requested = if s.large_bytes == s.large_requested_bytes {
            String::new()
        } else {
            format!(" ({} requested)", fmt_size(s.large_requested_bytes))
        };
        out.push_str(&format!(
            "Sizes measured: **{}** and **{}**{requested}, {} iterations each after one warm-up, \
             sizes alternating. Time from the request until a ListVolumes/ListVolumeSnapshots poll \
             (every 1 ms) shows the state. Each iteration deletes its objects.\n\n",
            fmt_size(s.small_bytes),
            fmt_size(s.large_bytes),
            self.iterations
        ));
        if let Some(why) = &s.admission {
            out.push_str(&format!(
                "**{} was not measured**: {why}.\n\n",
                fmt_size(s.large_requested_bytes)
            ));
        }
        let mut table = Table::new([
            "operation",
            "size",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "p50 large/small",
        ]);
        for op in &self.operations {
            for (timing, ratio) in [(&op.small, None), (&op.large, Some(op.ratio_p50))] {
                let cell =
                    |f: fn(&Summary) -> f64| timing.summary.as_ref().map_or("n/a".into(), |s| fmt_num(f(s)));
                table.row([
                    op.name.clone(),
                    fmt_size(timing.size_bytes),
                    cell(|s| s.p50),
                    cell(|s| s.p90),
                    cell(|s| s.p99),
                    cell(|s| s.max),
                    ratio.map_or(String::new(), fmt_ratio),
                ]);
            }
        }
        out.push_str(&table.render());
        out.push('\n');
        for op in &self.operations {
            out.push_str(&format!("- {}: {}\n", op.name, op.measures));
        }
        out
    }
}
