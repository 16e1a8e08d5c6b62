// SPDX-License-Identifier: Apache-2.0
//! Volumes with driver `ceph`, as upstream's ceph-provider hands them out, attached as QEMU
//! `rbd` block nodes (librbd, Debian's `qemu-block-extra`).
//!
//! The access: `attributes["monitors"]` (`host:port[,host:port…]`, IPv6 in brackets),
//! `attributes["image"]` (`<pool>/<image>`), `secret_data["userID"]` (the cephx client without
//! `client.`), `secret_data["userKey"]` (its key, base64 text as Ceph prints it), and, for an
//! encrypted image (LUKS2 formatted by librbd), `encryption_data["encryptionKey"]`.
//!
//! Secrets reach QEMU as `secret` objects: from files 0600 in the machine directory at start
//! (never on the command line, which every local user can read), over QMP at hot-plug. A
//! `ceph.conf` of the machine bounds every librados wait: without it an unreachable monitor
//! blocks QEMU's main loop (every QMP command) for `client_mount_timeout`, 300 s. Monitors are
//! probed with a TCP connect before a hot-plug for the same reason.

use std::{collections::BTreeMap, path::Path, time::Duration};

use base64::Engine as _;
use iri_api::machine::v1alpha1::VolumeConnection;
use serde_json::Value;

/// The volume driver.
pub const DRIVER: &str = "ceph";
/// How long librados may wait for a monitor or an OSD (see the module docs).
pub const CONF: &str = "[global]\n\
client mount timeout = 5\n\
rados mon op timeout = 5\n\
rados osd op timeout = 10\n\
log file = /dev/null\n";
/// How long a monitor may take to accept a TCP connection before a hot-plug.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// An RBD image with what it takes to open it.
#[derive(Clone, PartialEq, Eq)]
pub struct Rbd {
    /// The pool.
    pub pool: String,
    /// The image in the pool.
    pub image: String,
    /// Monitors, host and port.
    pub monitors: Vec<(String, u16)>,
    /// The cephx user (without `client.`).
    pub user: String,
    /// Its key (base64 text).
    pub key: String,
    /// The LUKS2 passphrase of an encrypted image.
    pub passphrase: Option<Vec<u8>>,
}

impl std::fmt::Debug for Rbd {
    // Never the key or the passphrase.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rbd")
            .field("pool", &self.pool)
            .field("image", &self.image)
            .field("monitors", &self.monitors)
            .field("user", &self.user)
            .field("encrypted", &self.passphrase.is_some())
            .finish_non_exhaustive()
    }
}

fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn secret_text(secrets: &BTreeMap<String, Vec<u8>>, key: &str) -> Result<String, String> {
    let value = secrets
        .get(key)
        .ok_or_else(|| format!("secret_data has no {key:?}"))?;
    String::from_utf8(value.clone()).map_err(|_| format!("secret_data[{key:?}] is not text"))
}

/// The RBD image of a `ceph` volume's connection; the error names what is wrong.
pub fn from_connection(connection: &VolumeConnection) -> Result<Rbd, String> {
    let attribute = |key: &str| {
        connection
            .attributes
            .get(key)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("attributes has no {key:?}"))
    };
    let mut monitors = Vec::new();
    for monitor in attribute("monitors")?.split(',') {
        let bad = || format!("monitor {monitor:?} is not host:port");
        let (host, port) = monitor.trim().rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
        {
            return Err(bad());
        }
        monitors.push((host.to_string(), port));
    }
    let image = attribute("image")?;
    let (pool, image) = image
        .split_once('/')
        .filter(|(p, i)| safe_name(p) && safe_name(i))
        .ok_or_else(|| format!("image {image:?} is not <pool>/<image>"))?;
    let user = secret_text(&connection.secret_data, "userID")?;
    if !safe_name(&user) {
        return Err("secret_data[\"userID\"] is not a cephx user name".into());
    }
    let key = secret_text(&connection.secret_data, "userKey")?;
    let key = key.trim().to_string();
    if base64::engine::general_purpose::STANDARD.decode(&key).is_err() {
        return Err("secret_data[\"userKey\"] is not a base64 cephx key".into());
    }
    let passphrase = if connection.encryption_data.is_empty() {
        None
    } else {
        Some(
            connection
                .encryption_data
                .get("encryptionKey")
                .filter(|k| !k.is_empty())
                .ok_or("encryption_data has no \"encryptionKey\"")?
                .clone(),
        )
    };
    Ok(Rbd {
        pool: pool.to_string(),
        image: image.to_string(),
        monitors,
        user,
        key,
        passphrase,
    })
}

/// The QEMU id of the cephx key secret of the disk with `key`.
pub fn key_secret_id(key: &str) -> String {
    format!("k{key}")
}

/// The QEMU id of the LUKS2 passphrase secret of the disk with `key`.
pub fn passphrase_secret_id(key: &str) -> String {
    format!("e{key}")
}

/// The secret objects of `rbd` for the disk with `key`, as `object-add` takes them (JSON, the
/// data inline, base64: QMP is the provider's private socket).
pub fn secret_objects(rbd: &Rbd, key: &str) -> Vec<Value> {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    // QEMU hands a secret to librados base64-encoded: the cephx key (base64 text) goes in as
    // the bytes it encodes.
    let mut objects = vec![serde_json::json!({
        "qom-type": "secret", "id": key_secret_id(key), "data": rbd.key, "format": "base64",
    })];
    if let Some(passphrase) = &rbd.passphrase {
        objects.push(serde_json::json!({
            "qom-type": "secret", "id": passphrase_secret_id(key), "data": b64(passphrase),
            "format": "base64",
        }));
    }
    objects
}

/// The block node `node` of `rbd` for the disk with `key` (JSON), with the machine's
/// `ceph.conf` at `conf`.
pub fn blockdev(rbd: &Rbd, key: &str, node: &str, conf: &Path) -> Value {
    let servers: Vec<Value> = rbd
        .monitors
        .iter()
        .map(|(host, port)| serde_json::json!({"host": host, "port": port.to_string()}))
        .collect();
    let mut node = serde_json::json!({
        "driver": "rbd", "node-name": node, "pool": rbd.pool, "image": rbd.image,
        "conf": conf, "server": servers, "user": rbd.user,
        "auth-client-required": ["cephx"], "key-secret": key_secret_id(key),
        "discard": "unmap",
    });
    if rbd.passphrase.is_some() {
        node["encrypt"] = serde_json::json!({"format": "luks2", "key-secret": passphrase_secret_id(key)});
    }
    node
}

/// Whether any monitor of `rbd` accepts a TCP connection (a hot-plug would otherwise block
/// QEMU for the whole mount timeout).
pub async fn reachable(rbd: &Rbd) -> bool {
    for (host, port) in &rbd.monitors {
        let connect = tokio::net::TcpStream::connect((host.as_str(), *port));
        if let Ok(Ok(_)) = tokio::time::timeout(PROBE_TIMEOUT, connect).await {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection() -> VolumeConnection {
        VolumeConnection {
            driver: DRIVER.into(),
            handle: "0123456789abcdef".into(),
            attributes: BTreeMap::from([
                ("monitors".into(), "10.0.0.1:6789,[::1]:3300".into()),
                ("image".into(), "rbd/img_1".into()),
            ]),
            secret_data: BTreeMap::from([
                ("userID".into(), b"volumes".to_vec()),
                (
                    "userKey".into(),
                    b"AQBVtfxkAAAAABAAmZ5c1Sd0rXo6kkNtrQYqNw==".to_vec(),
                ),
            ]),
            encryption_data: BTreeMap::new(),
            effective_storage_bytes: 1 << 30,
        }
    }

    #[test]
    fn upstream_access_becomes_an_rbd_node_with_secrets() {
        let rbd = from_connection(&connection()).unwrap();
        assert_eq!(rbd.monitors, [("10.0.0.1".into(), 6789), ("::1".into(), 3300)]);
        assert_eq!(
            (rbd.pool.as_str(), rbd.image.as_str(), rbd.user.as_str()),
            ("rbd", "img_1", "volumes")
        );
        let node = blockdev(&rbd, "abc", "dabc", Path::new("/m/ceph.conf"));
        assert_eq!(node["driver"], "rbd");
        assert_eq!(node["server"][1]["host"], "::1");
        assert_eq!(node["key-secret"], "kabc");
        assert!(node.get("encrypt").is_none());
        let objects = secret_objects(&rbd, "abc");
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0]["data"], "AQBVtfxkAAAAABAAmZ5c1Sd0rXo6kkNtrQYqNw==");
        assert!(!format!("{rbd:?}").contains("AQBV"), "Debug shows no key");

        let mut encrypted = connection();
        encrypted
            .encryption_data
            .insert("encryptionKey".into(), b"secret".to_vec());
        let rbd = from_connection(&encrypted).unwrap();
        let node = blockdev(&rbd, "abc", "dabc", Path::new("/m/ceph.conf"));
        assert_eq!(node["encrypt"]["key-secret"], "eabc");
        assert_eq!(secret_objects(&rbd, "abc")[1]["data"], "c2VjcmV0");
    }

    #[test]
    fn bad_access_is_refused_saying_what() {
        let mut c = connection();
        c.attributes.insert("image".into(), "no-pool".into());
        assert!(from_connection(&c).unwrap_err().contains("<pool>/<image>"));
        let mut c = connection();
        c.attributes.insert("monitors".into(), "10.0.0.1".into());
        assert!(from_connection(&c).unwrap_err().contains("host:port"));
        let mut c = connection();
        c.secret_data.insert("userKey".into(), vec![0, 0xff]);
        assert!(from_connection(&c).unwrap_err().contains("userKey"));
        let mut c = connection();
        c.encryption_data.insert("other".into(), b"x".to_vec());
        assert!(from_connection(&c).unwrap_err().contains("encryptionKey"));
    }
}
