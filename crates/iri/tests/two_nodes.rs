// SPDX-License-Identifier: Apache-2.0
//! Two pool nodes on one host, as two hosts would run them (docs/multi-host.md): node B's
//! volume provider exports over TCP with TLS (`[volume.local] tcp_listen`), node A's machine
//! provider holds B's client credentials (`[machine] nbd_tls_dir`), and a machine on A boots
//! with a volume of B, attached with the access B reports, unchanged, as a poollet passes it
//! (`uri` naming B's unix socket, `tcp_uri`, `tls_hostname`): A takes `tcp_uri`. The guest must
//! see the disk, of the volume's size.

mod support;

use std::{fs, net::TcpListener, os::unix::fs::PermissionsExt, path::Path, time::Duration};

use support::{Node, Settings, iri, skip_reason, wait_console};

/// The volume of node B: 1.5 GiB, a size no other disk of the guest has.
const VOLUME_BYTES: i64 = 1536 << 20;

#[test]
fn machine_on_one_node_boots_with_a_volume_of_another_over_nbd_with_tls() {
    if let Some(reason) = skip_reason(&[]) {
        eprintln!("SKIP machine_on_one_node_boots_with_a_volume_of_another_over_nbd_with_tls: {reason}");
        return;
    }
    // A free port for B's NBD endpoint (separate addresses, as two hosts would have).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("tcp_listen = \"127.0.0.1:{port}\"");
    let b = Node::start(
        "b",
        &Settings {
            volume_local: &listen,
            ..Default::default()
        },
    );
    let b_tls = b.data.join("volume/local/tls");
    // What the operator copies from B to A once: the CA and B's client certificate and key,
    // in QEMU's tls-creds-x509 layout.
    let copy_credentials = |a: &Path| {
        let dir = a.join("nbd-tls");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        for file in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
            fs::copy(b_tls.join(file), dir.join(file)).unwrap();
        }
        fs::set_permissions(dir.join("client-key.pem"), fs::Permissions::from_mode(0o600)).unwrap();
    };
    let a = Node::start(
        "a",
        &Settings {
            machine: "nbd_tls_dir = \"{data}/nbd-tls\"",
            prepare: Some(&copy_credentials),
            ..Default::default()
        },
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let volume = runtime.block_on(iri::available_volume(&b.socket("volume"), VOLUME_BYTES));
    let access = volume.status.as_ref().unwrap().access.as_ref().unwrap();
    let tcp_uri = access.attributes.get("tcp_uri").cloned().unwrap_or_default();
    assert_eq!(
        tcp_uri,
        format!("nbd://127.0.0.1:{port}/{}", volume.metadata.as_ref().unwrap().id),
        "B's access names its TCP endpoint: {:?}",
        access.attributes
    );
    assert!(
        access.attributes.contains_key("tls_hostname"),
        "{:?}",
        access.attributes
    );
    // The access as B reports it: `uri` stays B's unix socket, which A must not use.
    let connection = iri::connection(&volume, "uri");

    let image = a.data.join("images/test-guest");
    let id = runtime.block_on(iri::create_machine(
        &a.socket("machine"),
        &image,
        Some(connection),
    ));
    let console = wait_console(&a.data, &id, "IRI-REPORT END", Duration::from_secs(150));
    let disk = console
        .lines()
        .find(|l| l.starts_with("IRI-REPORT disk ") && l.contains(&access.handle[..12]))
        .unwrap_or_else(|| panic!("the guest does not see B's volume:\n{console}"));
    let bytes: i64 = disk.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(bytes, VOLUME_BYTES, "{disk}");

    // A before B: A's machine uses B's export until it is gone.
    drop(a);
    b.stop();
}
