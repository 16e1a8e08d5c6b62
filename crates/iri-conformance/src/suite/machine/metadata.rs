// SPDX-License-Identifier: Apache-2.0
//! Labels, annotations and the spec round-trip verbatim (iri-contract §3.5), annotations are
//! replaced wholesale, and label selectors have exact-match AND semantics (§2.1).

use std::collections::{BTreeMap, BTreeSet};

use iri_api::machine::v1alpha1::{GuestConfig, Machine, MachineFilter, UpdateMachineAnnotationsRequest};

use super::fixtures::{
    POOLLET_IRIMACHINE_GENERATION, POOLLET_MACHINE_GENERATION, POOLLET_MACHINE_NAME,
    POOLLET_MACHINE_NAMESPACE, POOLLET_MACHINE_UID, POOLLET_NIC_MAPPING, by_labels, connection_volume,
    create_machine, id_of, list, machine_class, meta_of, must_get, new_machine, nic, root_disk, scratch_disk,
    spec_difference, spec_of,
};
use crate::{
    call, ensure,
    harness::{Ctx, TestError, TestResult},
};

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Labels as the machinepoollet sets them, plus edge cases (empty and non-ASCII values).
fn poollet_labels(ctx: &Ctx) -> BTreeMap<String, String> {
    ctx.labels(&[
        (POOLLET_MACHINE_UID, "6f0c1b1e-3c1d-4b8e-9f51-0d1e2a3b4c5d"),
        (POOLLET_MACHINE_NAMESPACE, "default"),
        (POOLLET_MACHINE_NAME, "web-0"),
        (
            "downward-api.machinepoollet.ironcore.dev/root-machine-name",
            "web",
        ),
        ("conformance.iri.ironcore.dev/empty", ""),
        ("conformance.iri.ironcore.dev/unicode", "größe-µ-東京"),
    ])
}

/// Annotations as the machinepoollet sets them (the generation annotations gate status
/// propagation, the NIC mapping is parsed as JSON, iri-contract §3.2.1), plus edge cases.
fn poollet_annotations() -> BTreeMap<String, String> {
    let long: String = "0123456789abcdef".repeat(512);
    BTreeMap::from([
        (POOLLET_MACHINE_GENERATION.into(), "3".into()),
        (POOLLET_IRIMACHINE_GENERATION.into(), "0".into()),
        (
            POOLLET_NIC_MAPPING.into(),
            r#"{"eth0":{"name":"web-0-eth0","uid":"9a1b2c3d-0000-4000-8000-000000000001"}}"#.into(),
        ),
        (
            "downward-api.machinepoollet.ironcore.dev/owner".into(),
            "team \"blue\"\n\tline two".into(),
        ),
        (
            "conformance.iri.ironcore.dev/unicode".into(),
            "Grüße, 世界 🌍".into(),
        ),
        ("conformance.iri.ironcore.dev/long".into(), long),
        ("conformance.iri.ironcore.dev/empty".into(), String::new()),
    ])
}

pub(super) async fn labels_and_annotations_round_trip(ctx: &mut Ctx) -> TestResult {
    let class = machine_class(ctx).await?;
    let labels = poollet_labels(ctx);
    let annotations = poollet_annotations();
    let mut machine = new_machine(ctx, &class, &[]);
    if let Some(meta) = machine.metadata.as_mut() {
        meta.labels = labels.clone();
        meta.annotations = annotations.clone();
    }
    let created = create_machine(ctx, machine).await?;
    check_metadata("CreateMachine response", &created, &labels, &annotations)?;
    let listed = must_get(ctx, id_of(&created)).await?;
    check_metadata("ListMachines", &listed, &labels, &annotations)?;
    let by_selector = list(ctx, Some(by_labels(labels.clone()))).await?;
    ensure!(
        by_selector.len() == 1 && id_of(&by_selector[0]) == id_of(&created),
        "ListMachines with all of the machine's labels as selector returned {:?}",
        by_selector.iter().map(id_of).collect::<Vec<_>>()
    );
    Ok(())
}

fn check_metadata(
    source: &str,
    machine: &Machine,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> TestResult {
    let meta = meta_of(machine);
    check_map(source, "label", labels, &meta.labels)?;
    check_map(source, "annotation", annotations, &meta.annotations)
}

/// Compares two string maps byte for byte and names the first difference.
fn check_map(
    source: &str,
    kind: &str,
    want: &BTreeMap<String, String>,
    got: &BTreeMap<String, String>,
) -> TestResult {
    for (key, value) in want {
        match got.get(key) {
            None => return Err(TestError::fail(format!("{source}: {kind} {key:?} is missing"))),
            Some(v) if v != value => {
                return Err(TestError::fail(format!(
                    "{source}: {kind} {key:?} is {:?}, sent {:?}",
                    shorten(v),
                    shorten(value)
                )));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = got.keys().find(|k| !want.contains_key(*k)) {
        return Err(TestError::fail(format!("{source}: unexpected {kind} {extra:?}")));
    }
    Ok(())
}

fn shorten(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((cut, _)) => format!("{}... ({} bytes)", &s[..cut], s.len()),
        None => s.to_string(),
    }
}

/// The whole spec comes back exactly as sent: the machinepoollet compares volumes and NICs with
/// `proto.Equal` and detaches/re-attaches whatever differs (iri-contract §3.5.1). Covers
/// attributes with the `raw*Labels` JSON, `secret_data`, `encryption_data`, devices, the order of
/// `ips`, and a present-but-empty `local_disk` (which is not the same as an absent one).
pub(super) async fn spec_round_trips_exactly(ctx: &mut Ctx) -> TestResult {
    let class = machine_class(ctx).await?;
    let mut machine = new_machine(ctx, &class, &[]);
    let spec = machine.spec.get_or_insert_with(Default::default);
    spec.ignition_data = b"{\"ignition\":{\"version\":\"3.4.0\"}}\x00\xff".to_vec();
    spec.guest_config = Some(GuestConfig {
        hostname: "conformance-host".into(),
    });
    if spec.volumes.is_empty() {
        // Without a configured boot image the image name is never pulled by a runtime that only
        // stores the spec; a runtime that boots needs `machine.image` configured anyway.
        spec.volumes.push(root_disk("conformance.invalid/image:latest"));
    }
    spec.volumes.push(connection_volume("data", "odb", 3 << 30));
    spec.volumes.push(scratch_disk("scratch", "odc"));
    // Present but empty: encodes as an empty message, which a proto.Equal client tells apart
    // from an absent one.
    spec.volumes.push(iri_api::machine::v1alpha1::Volume {
        name: "empty-disk".into(),
        device: "odd".into(),
        local_disk: Some(Default::default()),
        connection: None,
    });
    spec.network_interfaces
        .push(nic(ctx, "eth0", &["10.0.0.9", "10.0.0.2", "fd00::2"]));
    let mut bare = nic(ctx, "eth1", &[]);
    bare.attributes.clear();
    spec.network_interfaces.push(bare);
    let sent = spec.clone();

    let created = create_machine(ctx, machine).await?;
    if let Some(diff) = spec_difference(&sent, &spec_of(&created)) {
        return Err(TestError::fail(format!(
            "CreateMachine response spec differs from the request: {diff}"
        )));
    }
    let listed = must_get(ctx, id_of(&created)).await?;
    if let Some(diff) = spec_difference(&sent, &spec_of(&listed)) {
        return Err(TestError::fail(format!(
            "listed spec differs from the one sent: {diff}"
        )));
    }
    Ok(())
}

/// `UpdateMachineAnnotations` replaces the whole map: keys not sent are gone (iri-contract §2.1).
pub(super) async fn update_annotations_replaces_map(ctx: &mut Ctx) -> TestResult {
    let class = machine_class(ctx).await?;
    let mut machine = new_machine(ctx, &class, &[]);
    if let Some(meta) = machine.metadata.as_mut() {
        meta.annotations = map(&[("keep", "1"), ("drop", "2")]);
    }
    let created = create_machine(ctx, machine).await?;
    let id = id_of(&created).to_string();
    let labels = meta_of(&created).labels;

    for annotations in [
        map(&[
            ("keep", "changed"),
            ("new", ""),
            (POOLLET_IRIMACHINE_GENERATION, "1"),
        ]),
        BTreeMap::new(),
    ] {
        call!(
            ctx,
            machine.update_machine_annotations(UpdateMachineAnnotationsRequest {
                machine_id: id.clone(),
                annotations: annotations.clone(),
            })
        )?;
        let listed = must_get(ctx, &id).await?;
        check_map(
            "ListMachines after UpdateMachineAnnotations",
            "annotation",
            &annotations,
            &meta_of(&listed).annotations,
        )?;
        check_map(
            "ListMachines after UpdateMachineAnnotations",
            "label",
            &labels,
            &meta_of(&listed).labels,
        )?;
    }
    Ok(())
}

/// Labels added to the test's selector.
type Extra = &'static [(&'static str, &'static str)];
/// What a selector is, what it adds to the test's selector, and which machines it selects.
type SelectorCase = (&'static str, Extra, &'static [&'static str]);

/// Exact-match AND selectors; an empty value requires the key with an empty value.
pub(super) async fn label_selectors_match_exactly(ctx: &mut Ctx) -> TestResult {
    let class = machine_class(ctx).await?;
    let mut ids = BTreeMap::new();
    for (name, extra) in [
        ("web-a", &[("tier", "web"), ("zone", "a")][..]),
        ("web-b", &[("tier", "web"), ("zone", "b"), ("flag", "")][..]),
        ("db", &[("tier", "db")][..]),
    ] {
        let machine = new_machine(ctx, &class, extra);
        ids.insert(name, id_of(&create_machine(ctx, machine).await?).to_string());
    }
    // (what, labels added to the test's selector, machines it must select)
    let cases: [SelectorCase; 9] = [
        ("only the test's labels", &[], &["web-a", "web-b", "db"]),
        ("tier=web", &[("tier", "web")], &["web-a", "web-b"]),
        (
            "tier=web AND zone=b",
            &[("tier", "web"), ("zone", "b")],
            &["web-b"],
        ),
        ("tier=web AND zone=c", &[("tier", "web"), ("zone", "c")], &[]),
        (
            "flag=\"\" (key present with empty value)",
            &[("flag", "")],
            &["web-b"],
        ),
        ("zone=\"\" (no machine has an empty zone)", &[("zone", "")], &[]),
        ("tier=we (no prefix match)", &[("tier", "we")], &[]),
        ("tier=WEB (case-sensitive)", &[("tier", "WEB")], &[]),
        ("missing=x (unknown key)", &[("missing", "x")], &[]),
    ];
    for (what, extra, want) in cases {
        let mut selector = ctx.selector();
        selector.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let got: BTreeSet<String> = list(
            ctx,
            Some(MachineFilter {
                label_selector: selector,
                ..Default::default()
            }),
        )
        .await?
        .iter()
        .map(|m| id_of(m).to_string())
        .collect();
        let want: BTreeSet<String> = want.iter().map(|name| ids[name].clone()).collect();
        if got != want {
            let name = |id: &String| {
                ids.iter()
                    .find(|(_, v)| *v == id)
                    .map(|(k, _)| k.to_string())
                    .unwrap_or_else(|| format!("foreign machine {id}"))
            };
            return Err(TestError::fail(format!(
                "selector {what}: listed {:?}, want {:?}",
                got.iter().map(name).collect::<Vec<_>>(),
                want.iter().map(name).collect::<Vec<_>>()
            )));
        }
    }
    Ok(())
}
