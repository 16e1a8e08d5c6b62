// SPDX-License-Identifier: Apache-2.0
//! The storage daemon's block graph, driven over QMP.
//!
//! One volume is served as
//!
//! ```text
//! NBD export e-<volume> (name <volume>, writable)
//!   └ throttle node t<volume[..30]> (throttle group tg-<volume>: the class limits, 0 = none)
//!       └ qcow2 node l<tip> (the active layer, layers/<tip>.qcow2)
//!           └ backing chain, opened by QEMU from the qcow2 headers (read-only, unnamed nodes)
//! ```
//!
//! Every volume gets a throttle node, limited or not, so that limits change with `qom-set`
//! and never need the graph rebuilt. Node names are capped at 31 characters by QEMU, hence the
//! 30-character layer ids and the volume id prefix in the throttle node's name.
//!
//! A snapshot puts a new qcow2 node on top with `blockdev-snapshot`: QEMU drains and flushes the
//! old tip, moves every parent (the throttle node) to the new node and reopens the old one
//! read-only, all without stopping the export. The old tip keeps its name `l<layer>` below the
//! new one, so a volume's graph holds named nodes for its tip and for every layer that was its
//! tip while this daemon ran.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use qmp::Qmp;
use serde::Deserialize;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::layout::StoredLimits;
use crate::keys::Passphrase;

/// QEMU's largest throttle value.
const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;
/// How long a deleted export may take to drop its clients.
const EXPORT_DELETE_TIMEOUT: Duration = Duration::from_secs(10);

/// The qcow2 node of layer `layer`.
pub(super) fn layer_node(layer: &str) -> String {
    format!("l{layer}")
}

/// The throttle node of volume `volume` (ids are random: 120 bits of prefix do not collide).
pub(super) fn throttle_node(volume: &str) -> String {
    format!("t{}", &volume[..volume.len().min(30)])
}

/// The throttle group of volume `volume`.
pub(super) fn throttle_group(volume: &str) -> String {
    format!("tg-{volume}")
}

/// The NBD export of volume `volume`.
pub(super) fn export_id(volume: &str) -> String {
    format!("e-{volume}")
}

/// What the daemon holds, as far as this backend cares.
#[derive(Debug, Default)]
pub(super) struct Graph {
    /// Export id → node name.
    exports: HashMap<String, String>,
    /// Named node → whether a backing child is attached.
    nodes: HashMap<String, bool>,
    /// QOM objects under `/objects`.
    objects: HashSet<String>,
}

#[derive(Deserialize)]
struct ExportInfo {
    id: String,
    #[serde(rename = "node-name")]
    node_name: String,
}

#[derive(Deserialize)]
struct NodeInfo {
    #[serde(rename = "node-name")]
    node_name: String,
    /// Present exactly when a backing node is attached (a node added with `backing: null`
    /// has none, even if its header names a backing file).
    #[serde(default)]
    backing_file: Option<String>,
}

#[derive(Deserialize)]
struct ObjectInfo {
    name: String,
}

impl Graph {
    /// Reads the daemon's exports, named nodes and objects.
    pub async fn fetch(qmp: &Qmp) -> qmp::Result<Graph> {
        let exports: Vec<ExportInfo> = qmp.execute("query-block-exports", Value::Null).await?;
        let nodes: Vec<NodeInfo> = qmp
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await?;
        let objects: Vec<ObjectInfo> = qmp.execute("qom-list", json!({"path": "/objects"})).await?;
        Ok(Graph {
            exports: exports.into_iter().map(|e| (e.id, e.node_name)).collect(),
            nodes: nodes
                .into_iter()
                // Unnamed nodes (QEMU calls them #block123) are never ours to touch.
                .filter(|n| !n.node_name.starts_with('#'))
                .map(|n| (n.node_name, n.backing_file.is_some()))
                .collect(),
            objects: objects.into_iter().map(|o| o.name).collect(),
        })
    }

    /// Whether volume `volume` is exported.
    pub fn is_exported(&self, volume: &str) -> bool {
        self.exports.contains_key(&export_id(volume))
    }

    /// Volume ids of every export of ours.
    pub fn exported_volumes(&self) -> Vec<String> {
        self.exports
            .keys()
            .filter_map(|id| id.strip_prefix("e-"))
            .map(str::to_string)
            .collect()
    }

    /// Whether the named node exists.
    pub fn has_node(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    /// Names of every throttle node of ours.
    pub fn throttle_nodes(&self) -> Vec<String> {
        self.nodes
            .keys()
            .filter(|n| n.starts_with('t'))
            .cloned()
            .collect()
    }

    /// Secret objects of ours: leftovers of an open that was interrupted (they exist only
    /// while a layer opens).
    pub fn secrets(&self) -> Vec<String> {
        self.objects
            .iter()
            .filter(|o| o.strip_prefix('k').is_some_and(super::layout::valid_layer_id))
            .cloned()
            .collect()
    }

    /// Volume ids of every throttle group of ours.
    pub fn throttle_groups(&self) -> Vec<String> {
        self.objects
            .iter()
            .filter_map(|o| o.strip_prefix("tg-"))
            .map(str::to_string)
            .collect()
    }
}

/// One layer of a chain, as the daemon opens it.
#[derive(Debug, Clone)]
pub(super) struct Layer {
    /// The layer id.
    pub id: String,
    /// Its file.
    pub path: PathBuf,
    /// Its passphrase, if the layer is encrypted.
    pub key: Option<Passphrase>,
}

/// What one volume's graph is built from (read from its manifest and layer headers).
#[derive(Debug)]
pub(super) struct VolumeSpec<'a> {
    /// The volume id.
    pub id: &'a str,
    /// Its layers from the tip down (the tip first).
    pub chain: &'a [Layer],
    /// Throttle limits.
    pub limits: StoredLimits,
}

impl VolumeSpec<'_> {
    fn tip(&self) -> &str {
        &self.chain[0].id
    }

    fn tip_backing(&self) -> Option<&str> {
        self.chain.get(1).map(|l| l.id.as_str())
    }

    fn layer_ids(&self) -> Vec<String> {
        self.chain.iter().map(|l| l.id.clone()).collect()
    }
}

/// What [`ensure_exported`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    /// The volume was served as it should be.
    None,
    /// The export and its nodes were created.
    Built,
    /// A snapshot's switch to the new tip had not happened (a crash or an error between the
    /// manifest's commit and `blockdev-snapshot`): it was done now.
    SwitchCompleted,
    /// The graph was not what the manifest says and had to be rebuilt (clients reconnect).
    Rebuilt,
}

/// Makes the daemon serve `volume` as its manifest says: creates what is missing, completes an
/// interrupted switch to a new tip, and applies the limits.
///
/// The daemon's tip of an exported volume is either the manifest's tip or the layer right
/// below it (the manifest commits a snapshot's new tip before the daemon switches to it); any
/// other state is not one this backend produces, and is rebuilt from the manifest.
pub(super) async fn ensure_exported(
    qmp: &Qmp,
    graph: &mut Graph,
    volume: &VolumeSpec<'_>,
) -> qmp::Result<Change> {
    set_limits(qmp, graph, volume.id, volume.limits).await?;
    let tip = layer_node(volume.tip());
    let throttle = throttle_node(volume.id);
    let mut change = Change::Built;
    if let Some(node) = graph.exports.get(&export_id(volume.id)) {
        let tip_attached = graph
            .nodes
            .get(&tip)
            .is_some_and(|&attached| attached || volume.tip_backing().is_none());
        let pending_below = volume
            .tip_backing()
            .map(layer_node)
            .filter(|below| graph.has_node(below));
        if *node == throttle && graph.has_node(&throttle) {
            if tip_attached {
                return Ok(Change::None);
            }
            if let Some(below) = pending_below {
                if !graph.has_node(&tip) {
                    add_layer(qmp, graph, volume.chain, false).await?;
                }
                qmp.execute_value("blockdev-snapshot", json!({"node": below, "overlay": tip}))
                    .await?;
                graph.nodes.insert(tip, true);
                return Ok(Change::SwitchCompleted);
            }
        }
        tracing::warn!(
            volume = volume.id,
            "the daemon's graph does not match the manifest: rebuilding it"
        );
        teardown(qmp, graph, volume.id, &volume.layer_ids()).await?;
        change = Change::Rebuilt;
    }
    // Leftovers of an interrupted build or teardown are in the way of fresh nodes.
    if graph.has_node(&throttle) {
        remove_node(qmp, graph, &throttle).await?;
    }
    if graph
        .nodes
        .get(&tip)
        .is_some_and(|&attached| !attached && volume.tip_backing().is_some())
    {
        remove_node(qmp, graph, &tip).await?;
    }
    if !graph.has_node(&tip) {
        add_layer(qmp, graph, volume.chain, true).await?;
    }
    qmp.execute_value(
        "blockdev-add",
        json!({
            "driver": "throttle", "node-name": throttle,
            "throttle-group": throttle_group(volume.id), "file": tip,
        }),
    )
    .await?;
    graph.nodes.insert(throttle, false);
    add_export(qmp, graph, volume.id).await?;
    Ok(change)
}

/// Removes `volume`'s export, nodes and throttle group. `chain` is the volume's layers from
/// the tip down: their named nodes are this volume's (or, where another volume still uses
/// one, QEMU refuses to delete it, and that is left alone).
pub(super) async fn teardown(
    qmp: &Qmp,
    graph: &mut Graph,
    volume: &str,
    chain: &[String],
) -> qmp::Result<()> {
    remove_export(qmp, graph, volume).await?;
    let throttle = throttle_node(volume);
    if graph.has_node(&throttle) {
        remove_node(qmp, graph, &throttle).await?;
    }
    // From the tip down: each deletion releases the node below.
    for layer in chain {
        let node = layer_node(layer);
        if graph.has_node(&node) {
            match remove_node(qmp, graph, &node).await {
                Ok(()) => {}
                Err(qmp::Error::Command { desc, .. }) if desc.contains("busy") || desc.contains("in use") => {
                    tracing::debug!(volume, node, "node still used by another volume");
                }
                Err(err) => return Err(err),
            }
        }
    }
    remove_throttle_group(qmp, graph, volume).await
}

/// Removes the throttle group of `volume` if it exists.
pub(super) async fn remove_throttle_group(qmp: &Qmp, graph: &mut Graph, volume: &str) -> qmp::Result<()> {
    let group = throttle_group(volume);
    if graph.objects.contains(&group) {
        qmp.execute_value("object-del", json!({"id": group})).await?;
        graph.objects.remove(&group);
    }
    Ok(())
}

/// The QOM secret object that carries layer `layer`'s passphrase while the layer is opened.
pub(super) fn secret_id(layer: &str) -> String {
    format!("k{layer}")
}

/// Adds the qcow2 node of `chain[0]`: with its backing chain, or with none (`backing: null`),
/// as `blockdev-snapshot` wants its overlay.
///
/// An unencrypted chain is opened as the qcow2 headers describe it. A chain with an encrypted
/// layer is spelled out layer by layer, because QEMU needs each encrypted layer's secret
/// named in its options. Secrets exist only while the nodes open: QEMU derives the volume key
/// at open time and never reads the secret again, so the passphrase does not stay around in
/// the daemon's object tree.
pub(super) async fn add_layer(
    qmp: &Qmp,
    graph: &mut Graph,
    chain: &[Layer],
    with_backing: bool,
) -> qmp::Result<()> {
    let layer = &chain[0];
    let node = layer_node(&layer.id);
    let opened = if with_backing { chain } else { &chain[..1] };
    let explicit = opened.iter().any(|l| l.key.is_some());
    let mut arguments = node_options(opened, with_backing, explicit);
    arguments["node-name"] = Value::String(node.clone());
    let mut secrets = Vec::new();
    let mut result = Ok(());
    for layer in opened {
        if let Some(key) = &layer.key {
            let id = secret_id(&layer.id);
            // A leftover of an interrupted open would make object-add fail.
            let _ = qmp.execute_value("object-del", json!({"id": id})).await;
            let data = Zeroizing::new(STANDARD.encode(key.expose()));
            let added = qmp
                .execute_value(
                    "object-add",
                    json!({"qom-type": "secret", "id": id, "format": "base64", "data": data.as_str()}),
                )
                .await;
            match added {
                Ok(_) => secrets.push(id),
                Err(err) => {
                    result = Err(err);
                    break;
                }
            }
        }
    }
    if result.is_ok() {
        result = qmp.execute_value("blockdev-add", arguments).await.map(drop);
    }
    for id in secrets {
        if let Err(err) = qmp.execute_value("object-del", json!({"id": id})).await {
            tracing::warn!(secret = id, %err, "cannot remove a secret object");
        }
    }
    result?;
    graph.nodes.insert(node, false);
    Ok(())
}

/// The `blockdev-add` options of `chain[0]` (without its node name): its backing as the
/// header says, none, or (`explicit`) the rest of `chain`, spelled out.
fn node_options(chain: &[Layer], with_backing: bool, explicit: bool) -> Value {
    let layer = &chain[0];
    let mut options = json!({
        "driver": "qcow2",
        // Guest discards free space in the file: volumes stay thin.
        "discard": "unmap",
        "file": {"driver": "file", "filename": layer.path.display().to_string(), "discard": "unmap"},
    });
    if layer.key.is_some() {
        options["encrypt"] = json!({"format": "luks", "key-secret": secret_id(&layer.id)});
    }
    if !with_backing {
        options["backing"] = Value::Null;
    } else if explicit {
        options["backing"] = match chain.get(1) {
            Some(_) => node_options(&chain[1..], true, true),
            None => Value::Null,
        };
    }
    options
}

/// Makes `overlay` (a layer whose header names `base` as backing file) the new tip above
/// `base`, the current tip of an exported volume.
pub(super) async fn switch_to_overlay(
    qmp: &Qmp,
    graph: &mut Graph,
    base: &str,
    overlay: &Layer,
) -> qmp::Result<()> {
    add_layer(qmp, graph, std::slice::from_ref(overlay), false).await?;
    let arguments = json!({"node": layer_node(base), "overlay": layer_node(&overlay.id)});
    qmp.execute_value("blockdev-snapshot", arguments).await?;
    graph.nodes.insert(layer_node(&overlay.id), true);
    Ok(())
}

/// Creates the throttle group of `volume`, or updates its limits.
async fn set_limits(qmp: &Qmp, graph: &mut Graph, volume: &str, limits: StoredLimits) -> qmp::Result<()> {
    let group = throttle_group(volume);
    let limits = json!({
        "bps-total": limits.bytes_per_second.min(THROTTLE_VALUE_MAX),
        "iops-total": limits.iops.min(THROTTLE_VALUE_MAX),
    });
    if graph.objects.contains(&group) {
        qmp.execute_value(
            "qom-set",
            json!({"path": group, "property": "limits", "value": limits}),
        )
        .await?;
    } else {
        qmp.execute_value(
            "object-add",
            json!({"qom-type": "throttle-group", "id": group, "limits": limits}),
        )
        .await?;
        graph.objects.insert(group);
    }
    Ok(())
}

/// Updates the limits of an exported volume.
pub(super) async fn update_limits(qmp: &Qmp, volume: &str, limits: StoredLimits) -> qmp::Result<()> {
    let mut graph = Graph {
        objects: HashSet::from([throttle_group(volume)]),
        ..Graph::default()
    };
    set_limits(qmp, &mut graph, volume, limits).await
}

/// Exports `volume` (its throttle node) over NBD, writable, under the volume id.
pub(super) async fn add_export(qmp: &Qmp, graph: &mut Graph, volume: &str) -> qmp::Result<()> {
    let throttle = throttle_node(volume);
    let arguments = json!({
        "type": "nbd", "id": export_id(volume), "node-name": throttle, "name": volume, "writable": true,
    });
    qmp.execute_value("block-export-add", arguments).await?;
    graph.exports.insert(export_id(volume), throttle);
    Ok(())
}

/// Removes `volume`'s export, dropping connected clients, and waits until it is gone.
pub(super) async fn remove_export(qmp: &Qmp, graph: &mut Graph, volume: &str) -> qmp::Result<()> {
    let id = export_id(volume);
    if !graph.exports.contains_key(&id) {
        return Ok(());
    }
    match qmp
        .execute_value("block-export-del", json!({"id": id, "mode": "hard"}))
        .await
    {
        Ok(_) => {}
        // Already shutting down (an earlier attempt).
        Err(qmp::Error::Command { desc, .. }) if desc.contains("shutting down") => {}
        Err(err) => return Err(err),
    }
    // Deletion completes when the last client is gone; until then the export keeps its id and
    // holds its node.
    let deadline = Instant::now() + EXPORT_DELETE_TIMEOUT;
    loop {
        let exports: Vec<ExportInfo> = qmp.execute("query-block-exports", Value::Null).await?;
        if !exports.iter().any(|e| e.id == id) {
            break;
        }
        if Instant::now() > deadline {
            return Err(qmp::Error::Timeout {
                path: qmp.path().to_string(),
                command: format!("block-export-del {id}"),
                timeout: EXPORT_DELETE_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    graph.exports.remove(&id);
    Ok(())
}

/// Deletes a named node; absent is fine.
pub(super) async fn remove_node(qmp: &Qmp, graph: &mut Graph, name: &str) -> qmp::Result<()> {
    match qmp
        .execute_value("blockdev-del", json!({"node-name": name}))
        .await
    {
        Ok(_) => {}
        Err(qmp::Error::Command { desc, .. }) if desc.contains("Failed to find node") => {}
        Err(err) => return Err(err),
    }
    graph.nodes.remove(name);
    Ok(())
}

/// Grows volume `volume` to `size` bytes. The volume must not be exported: an NBD export
/// forbids resizing its node.
///
/// The resize goes through the throttle node: a node caches its length, and only the nodes a
/// resize passes through learn the new one.
pub(super) async fn resize(qmp: &Qmp, volume: &str, size: u64) -> qmp::Result<()> {
    qmp.execute_value(
        "block_resize",
        json!({"node-name": throttle_node(volume), "size": size}),
    )
    .await?;
    Ok(())
}
