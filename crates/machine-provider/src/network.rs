// SPDX-License-Identifier: Apache-2.0
//! Network plugins: how a machine's network interface reaches a network.
//!
//! * `isolated` (every `network_id` that names no configured bridge): QEMU user-mode
//!   networking with `restrict=on`; the guest gets DHCP and nothing else, and QEMU needs no
//!   privileges. Status handle `isolated/<mac>`.
//! * `bridge` (a `network_id` listed in the provider's `bridges`): a tap device on that Linux
//!   bridge. QEMU creates the tap (`-netdev tap,ifname=…,script=no`; it needs CAP_NET_ADMIN,
//!   i.e. a provider running as root) as a non-persistent device: it vanishes with the QEMU
//!   process or the netdev, so a machine that is deleted, or a QEMU that dies, leaves no tap
//!   behind. The provider then enslaves it to the bridge and sets it up, on every reconcile
//!   until it is. Status handle `bridge/<tap>`; the tap name is derived from machine id and
//!   NIC name (`iri` + 12 hex digits: within the kernel's 15-byte limit).

use std::path::Path;

use serde_json::Value;

/// How a NIC is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plugin {
    /// QEMU user-mode networking, no route anywhere.
    Isolated,
    /// A tap device on a Linux bridge.
    Bridge {
        /// The bridge.
        bridge: String,
        /// The tap device's name.
        tap: String,
    },
}

/// The tap device name of NIC `name` of machine `id`.
pub fn tap_name(id: &str, name: &str) -> String {
    // FNV-1a over both, like the MAC: stable across restarts and provider versions.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.bytes().chain([0]).chain(name.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("iri{:012x}", hash >> 16)
}

/// The plugin of a NIC on `network_id` of machine `id`, given the configured `bridges`.
pub fn plugin(bridges: &[String], id: &str, name: &str, network_id: &str) -> Plugin {
    if bridges.iter().any(|b| b == network_id) {
        Plugin::Bridge {
            bridge: network_id.to_string(),
            tap: tap_name(id, name),
        }
    } else {
        Plugin::Isolated
    }
}

/// The netdev `netdev_id` of `plugin`, as `netdev_add` and `-netdev` take it (JSON).
pub fn netdev(plugin: &Plugin, netdev_id: &str) -> Value {
    match plugin {
        Plugin::Isolated => serde_json::json!({"type": "user", "id": netdev_id, "restrict": true}),
        Plugin::Bridge { tap, .. } => serde_json::json!({
            "type": "tap", "id": netdev_id, "ifname": tap, "script": "no", "downscript": "no",
        }),
    }
}

/// The status handle of a NIC with `plugin` and `mac`.
pub fn handle(plugin: &Plugin, mac: &str) -> String {
    match plugin {
        Plugin::Isolated => format!("isolated/{mac}"),
        Plugin::Bridge { tap, .. } => format!("bridge/{tap}"),
    }
}

/// Whether `name` is a Linux bridge on this host.
pub fn is_bridge(name: &str) -> bool {
    valid_interface_name(name) && Path::new("/sys/class/net").join(name).join("bridge").is_dir()
}

/// Whether `name` can be a network interface name (1-15 bytes, no `/`, whitespace or `:`).
pub fn valid_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// Whether tap `tap` exists, is enslaved to `bridge` and is up.
fn on_bridge(tap: &str, bridge: &str) -> bool {
    let dir = Path::new("/sys/class/net").join(tap);
    let master = std::fs::read_link(dir.join("master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    // IFF_UP is bit 0 of the flags (operstate stays "down" while no guest drives the link).
    let up = std::fs::read_to_string(dir.join("flags"))
        .ok()
        .and_then(|f| i64::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|flags| flags & 1 == 1);
    master.as_deref() == Some(bridge) && up
}

/// Puts tap `tap` (made by QEMU) on `bridge` and sets it up, unless it is already. An error
/// says what failed, for an event.
pub async fn attach_tap(tap: &str, bridge: &str) -> Result<(), String> {
    if on_bridge(tap, bridge) {
        return Ok(());
    }
    if !Path::new("/sys/class/net").join(tap).exists() {
        return Err(format!(
            "tap device {tap} does not exist (QEMU did not create it)"
        ));
    }
    let output = tokio::process::Command::new("ip")
        .args(["link", "set", "dev", tap, "master", bridge, "up"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("running ip (iproute2): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "ip link set dev {tap} master {bridge} up: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_are_named_stably_within_the_kernel_limit() {
        let tap = tap_name("machine-1", "eth0");
        assert_eq!(tap.len(), 15);
        assert!(valid_interface_name(&tap));
        assert_eq!(tap, tap_name("machine-1", "eth0"));
        assert_ne!(tap, tap_name("machine-1", "eth1"));
        assert_ne!(tap, tap_name("machine-2", "eth0"));
    }

    #[test]
    fn only_configured_bridges_get_the_bridge_plugin() {
        let bridges = vec!["br0".to_string()];
        assert_eq!(plugin(&bridges, "m", "eth0", "isolated"), Plugin::Isolated);
        assert_eq!(plugin(&bridges, "m", "eth0", "br1"), Plugin::Isolated);
        let bridged = plugin(&bridges, "m", "eth0", "br0");
        assert!(matches!(&bridged, Plugin::Bridge { bridge, .. } if bridge == "br0"));
        let netdev = netdev(&bridged, "u1");
        assert_eq!(netdev["type"], "tap");
        assert_eq!(netdev["script"], "no");
        assert!(handle(&bridged, "02:00:00:00:00:01").starts_with("bridge/iri"));
        assert_eq!(
            handle(&Plugin::Isolated, "02:00:00:00:00:01"),
            "isolated/02:00:00:00:00:01"
        );
        assert!(
            !valid_interface_name("a/b")
                && !valid_interface_name("")
                && !valid_interface_name(&"x".repeat(16))
        );
    }
}
