// SPDX-License-Identifier: Apache-2.0
//! ListEvents: events about a machine carry its metadata, are timed in Unix seconds, and the
//! label and time-window filters work (iri-contract §2.5, §3.2.9, §3.5.8).

use std::collections::BTreeMap;

use iri_api::{
    event::v1alpha1::Event,
    machine::v1alpha1::{EventFilter, ListEventsRequest},
};

use super::fixtures::{create_default, delete_and_wait, id_of, meta_of, now_secs};
use crate::{
    call, ensure,
    harness::{Ctx, Probe, TEST_LABEL, TestError, TestResult},
};

/// How far an event time may be from the suite's clock, in seconds.
const CLOCK_SLACK_SECS: i64 = 60;

/// Kubernetes only accepts these event types, and the machinepoollet re-emits IRI events as
/// Kubernetes events (iri-contract §3.2.9).
const EVENT_TYPES: [&str; 2] = ["Normal", "Warning"];

pub(super) async fn events_describe_machine(ctx: &mut Ctx) -> TestResult {
    let start = now_secs();
    let machine = create_default(ctx, &[]).await?;
    let id = id_of(&machine).to_string();
    let labels = meta_of(&machine).labels;
    delete_and_wait(ctx, &id).await?;

    // Events may be recorded asynchronously; wait until some about our machine are listed.
    let selector = ctx.selector();
    let events = ctx
        .eventually(
            &format!("ListEvents with this test's labels returns events about machine {id}"),
            ctx.config.timeouts.ready(),
            |p: Probe| {
                let selector = selector.clone();
                async move {
                    let events = probe_events(
                        &p,
                        EventFilter {
                            label_selector: selector,
                            ..Default::default()
                        },
                    )
                    .await?;
                    let seen = format!("{} events", events.len());
                    Ok(((!events.is_empty()).then_some(events), seen))
                }
            },
        )
        .await?;
    let end = now_secs();

    for event in &events {
        let spec = event
            .spec
            .as_ref()
            .ok_or_else(|| TestError::fail(format!("an event has no spec: {event:?}")))?;
        let meta = spec.involved_object_meta.as_ref().ok_or_else(|| {
            TestError::fail(format!(
                "event {:?} has no involved_object_meta (the poollet drops such events)",
                spec.reason
            ))
        })?;
        ensure!(
            meta.id == id,
            "ListEvents with this test's labels returned an event about {:?}, but the test only \
             created machine {id}",
            meta.id
        );
        ensure!(
            meta.labels == labels,
            "event {:?}: involved_object_meta.labels {:?} are not the machine's labels {labels:?}",
            spec.reason,
            meta.labels
        );
        ensure!(
            spec.event_time >= start - CLOCK_SLACK_SECS && spec.event_time <= end + CLOCK_SLACK_SECS,
            "event {:?}: event_time {} is not within a minute of now ({end}) in Unix seconds",
            spec.reason,
            spec.event_time
        );
        ensure!(
            EVENT_TYPES.contains(&spec.r#type.as_str()),
            "event {:?} has type {:?}, not one of {EVENT_TYPES:?}",
            spec.reason,
            spec.r#type
        );
    }
    let want = events.len();

    let filtered = |from: i64, to: i64, label_selector: BTreeMap<String, String>| EventFilter {
        label_selector,
        events_from_time: from,
        events_to_time: to,
        ..Default::default()
    };
    // `true`: the filter must return (at least) every event seen above, `false`: none of them.
    let cases = [
        (
            "a time window an hour in the past",
            filtered(start - 7200, start - 3600, selector.clone()),
            false,
        ),
        (
            "a time window around the test",
            filtered(
                start - CLOCK_SLACK_SECS,
                now_secs() + CLOCK_SLACK_SECS,
                selector.clone(),
            ),
            true,
        ),
        // The window applies only when both bounds are set (iri-contract §6.2).
        (
            "only events_from_time set (in the future): the window is ignored",
            filtered(now_secs() + 3600, 0, selector.clone()),
            true,
        ),
        (
            "only events_to_time set (in the past): the window is ignored",
            filtered(0, start - 3600, selector.clone()),
            true,
        ),
        (
            "an unrelated label selector",
            filtered(0, 0, unrelated(&selector)),
            false,
        ),
    ];
    for (what, filter, included) in cases {
        let listed = list_events(ctx, filter).await?;
        let ours = listed.iter().filter(|e| about(e) == id).count();
        let foreign = listed.len() - ours;
        ensure!(
            foreign == 0,
            "ListEvents with {what}: got {foreign} events about other objects"
        );
        // At least: a runtime recording events asynchronously may have added more meanwhile.
        ensure!(
            if included { ours >= want } else { ours == 0 },
            "ListEvents with {what}: got {ours} events about the machine, want {}",
            if included {
                format!("all {want}")
            } else {
                "none".to_string()
            }
        );
    }
    Ok(())
}

/// The test's selector with the test name replaced: matches nothing any test created.
fn unrelated(selector: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut selector = selector.clone();
    selector.insert(TEST_LABEL.into(), "conformance-no-such-test".into());
    selector
}

fn about(event: &Event) -> &str {
    event
        .spec
        .as_ref()
        .and_then(|s| s.involved_object_meta.as_ref())
        .map(|m| m.id.as_str())
        .unwrap_or("")
}

async fn list_events(ctx: &mut Ctx, filter: EventFilter) -> Result<Vec<Event>, TestError> {
    Ok(call!(
        ctx,
        machine.list_events(ListEventsRequest { filter: Some(filter) })
    )?
    .events)
}

async fn probe_events(p: &Probe, filter: EventFilter) -> Result<Vec<Event>, TestError> {
    Ok(p.machine()
        .list_events(p.request(ListEventsRequest { filter: Some(filter) }))
        .await?
        .into_inner()
        .events)
}
