// SPDX-License-Identifier: Apache-2.0
//! `irictl machine ...` against the reference machine runtime over a real unix socket.

mod support;

use iri_testing::MachineRuntime;
use serde_json::{Value, json};
use support::{Session, created_id, example, example_text};

/// The whole life of a machine: create, list in every format, attach/update/detach a volume and a
/// NIC, annotations, power off, status, events, version, exec, delete.
#[tokio::test(flavor = "multi_thread")]
async fn machine_session() {
    let runtime = MachineRuntime::default();
    let s = Session::machine(runtime.clone()).await;

    let id = created_id(
        &s.ok(&["machine", "create", "machine", "-f", &example("machine.yaml")])
            .await,
        "machine",
    );
    assert_eq!(id.len(), 63, "{id}");
    assert_eq!(runtime.machines().len(), 1);

    // table
    let table = s.ok(&["machine", "get", "machine"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["ID", "Class", "State", "Age"]);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..2], [id.as_str(), "x3-small"]);
    assert!(row[2].starts_with("MACHINE_"), "{table}");
    assert!(row[3].ends_with('s'), "{table}");
    // every column starts at the header's offset
    assert_eq!(lines[0].find("Class"), lines[1].find("x3-small"));

    // wide
    let wide = s.ok(&["machine", "get", "machines", "-o", "wide"]).await;
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "Class", "State", "Age", "Power", "Volumes", "NICs", "Labels"
        ]
    );
    let row = wide.lines().nth(1).unwrap();
    for cell in ["POWER_ON", "root", "primary", "app=web,tier=frontend"] {
        assert!(row.contains(cell), "{cell} missing: {wide}");
    }

    // json: upstream's shape
    let list = s.json(&["machine", "get", "machine"]).await;
    let machine = &list.as_array().expect("a list renders as an array")[0];
    assert_eq!(machine["metadata"]["id"], json!(id));
    assert!(
        machine["metadata"]["created_at"].is_i64(),
        "int64 as a JSON number"
    );
    assert_eq!(
        machine["metadata"]["labels"],
        json!({"app": "web", "tier": "frontend"})
    );
    assert_eq!(machine["spec"]["class"], json!("x3-small"));
    assert_eq!(
        machine["spec"]["ignition_data"],
        json!("eyJpZ25pdGlvbiI6eyJ2ZXJzaW9uIjoiMy40LjAifX0=")
    );
    assert_eq!(machine["spec"]["guest_config"]["hostname"], json!("web-0"));
    assert_eq!(
        machine["spec"]["volumes"][0]["local_disk"]["size_bytes"],
        json!(10737418240i64)
    );
    assert_eq!(
        machine["spec"]["network_interfaces"][0]["ips"],
        json!(["10.0.0.10", "fd00::10"])
    );
    assert!(machine["spec"].get("power").is_none(), "zero values are omitted");
    assert!(machine["status"]["state"].is_i64(), "enums as integers");

    // yaml carries the same document
    let yaml = s.ok(&["machine", "get", "machine", "-o", "yaml"]).await;
    assert!(yaml.starts_with("- metadata:\n"), "{yaml}");
    let from_yaml: Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(from_yaml, list);

    // quiet, single object, label selector
    assert_eq!(
        s.ok(&["machine", "get", "machine", "-q"]).await,
        format!("{id}\n")
    );
    let one = s.json(&["machine", "get", "mach", &id]).await;
    assert_eq!(one["metadata"]["id"], json!(id), "an id shows the object itself");
    assert_eq!(
        s.ok(&["machine", "get", "machs", "-l", "app=web,tier=frontend", "-q"])
            .await,
        format!("{id}\n")
    );
    assert_eq!(
        s.ok(&["machine", "get", "machine", "-l", "app=other"]).await,
        "No resources found\n"
    );

    // attach, update and detach a volume
    let out = s
        .ok(&[
            "machine",
            "attach",
            "volume",
            "--machine-id",
            &id,
            "-f",
            &example("volume-attach.yaml"),
        ])
        .await;
    assert_eq!(out, format!("Volume data attached to machine {id}\n"));
    let machine = s.json(&["machine", "get", "machine", &id]).await;
    let data = &machine["spec"]["volumes"][1];
    assert_eq!(data["name"], json!("data"));
    assert_eq!(data["connection"]["driver"], json!("nbd"));
    assert_eq!(
        data["connection"]["secret_data"]["password"],
        json!("Y2hhcC1wYXNzd29yZA==")
    );
    let resized = example_text("volume-attach.yaml").replace("21474836480", "32212254720");
    let out = s
        .run_with_stdin(
            &["machine", "update", "vol", "--machine-id", &id, "-f", "-"],
            Some(&resized),
        )
        .await
        .ok();
    assert_eq!(out, format!("Volume data of machine {id} updated\n"));
    let machine = s.json(&["machine", "get", "machine", &id]).await;
    assert_eq!(
        machine["spec"]["volumes"][1]["connection"]["effective_storage_bytes"],
        json!(32212254720i64)
    );
    let out = s
        .ok(&["machine", "detach", "volume", "data", "--machine-id", &id])
        .await;
    assert_eq!(out, "Volume data detached\n");
    let out = s
        .ok(&["machine", "detach", "volume", "data", "--machine-id", &id])
        .await;
    assert_eq!(out, "Volume data not found\n", "NOT_FOUND is tolerated");
    let machine = s.json(&["machine", "get", "machine", &id]).await;
    assert_eq!(machine["spec"]["volumes"].as_array().unwrap().len(), 1);

    // attach and detach a NIC
    let out = s
        .ok(&[
            "machine",
            "attach",
            "nic",
            "--machine-id",
            &id,
            "-f",
            &example("nic.yaml"),
        ])
        .await;
    assert_eq!(
        out,
        format!("Network interface secondary attached to machine {id}\n")
    );
    let machine = s.json(&["machine", "get", "machine", &id]).await;
    assert_eq!(
        machine["spec"]["network_interfaces"][1]["ips"],
        json!(["192.168.100.5"])
    );
    let out = s
        .ok(&[
            "machine",
            "detach",
            "networkinterface",
            "secondary",
            "gone",
            "--machine-id",
            &id,
        ])
        .await;
    assert_eq!(
        out,
        "Network interface secondary detached\nNetwork interface gone not found\n"
    );

    // annotations (replaced wholesale)
    let out = s
        .ok(&[
            "machine",
            "update",
            "annotations",
            "--machine-id",
            &id,
            "-f",
            &example("annotations.yaml"),
        ])
        .await;
    assert_eq!(out, format!("Annotations of machine {id} updated\n"));
    let machine = s.json(&["machine", "get", "machine", &id]).await;
    assert_eq!(
        machine["metadata"]["annotations"],
        json!({"example.ironcore.dev/owner": "team-b", "example.ironcore.dev/ticket": "4711"})
    );

    // power off
    let out = s
        .ok(&[
            "machine",
            "update",
            "power",
            "--machine-id",
            &id,
            "--power",
            "off",
        ])
        .await;
    assert_eq!(out, format!("Machine {id} power set to POWER_OFF\n"));
    let machine = s.json(&["machine", "get", "machine", &id]).await;
    assert_eq!(machine["spec"]["power"], json!(1));
    assert_eq!(machine["status"]["state"], json!(5), "MACHINE_STOPPED: {machine}");
    let table = s.ok(&["machine", "get", "machine", &id]).await;
    assert!(table.contains("MACHINE_STOPPED"), "{table}");
    s.ok(&["machine", "update", "power", "--machine-id", &id, "--power", "0"])
        .await;
    let machine = s.json(&["machine", "get", "machine", &id]).await;
    assert!(machine["spec"].get("power").is_none());

    // status, events, version
    let status = s.ok(&["machine", "get", "status"]).await;
    let header: Vec<&str> = status.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["Name", "CPU", "Memory", "Quantity"]);
    assert!(
        status.contains("x3-small") && status.contains("x3-large") && status.contains("4Gi"),
        "{status}"
    );
    let status = s.json(&["machine", "get", "status"]).await;
    assert_eq!(
        status[0]["machine_class"]["capabilities"]["resources"]["cpu"],
        json!(2)
    );
    assert_eq!(
        s.ok(&["machine", "get", "status", "-q"]).await,
        "x3-small\nx3-large\n"
    );

    let events = s.ok(&["machine", "get", "events"]).await;
    let header: Vec<&str> = events.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "InvolvedMachineName",
            "Type",
            "Reason",
            "Message",
            "RootMachineName",
            "RootMachineNamespace"
        ]
    );
    assert!(events.contains(&id), "{events}");
    let events = s
        .json(&["machine", "get", "events", "-l", "app=web", "-d", "5m"])
        .await;
    assert!(!events.as_array().unwrap().is_empty());
    assert!(
        events[0]["spec"]["event_time"].as_i64().unwrap() < 10_000_000_000,
        "seconds"
    );
    assert_eq!(
        s.ok(&["machine", "get", "events", "-l", "app=none"]).await,
        "No resources found\n"
    );

    let version = s.ok(&["machine", "get", "version"]).await;
    assert!(version.starts_with("Name"), "{version}");
    assert!(version.contains(iri_testing::MACHINE_RUNTIME_NAME), "{version}");
    let version = s.json(&["machine", "get", "version"]).await;
    assert_eq!(version["runtime_name"], json!(iri_testing::MACHINE_RUNTIME_NAME));

    // exec --print-url prints the URL, and the URL is a real session
    let url = s.ok(&["machine", "exec", &id, "--print-url"]).await;
    let url = url.trim_end();
    assert!(url.starts_with("http://"), "{url}");
    assert_eq!(runtime.take_exec_session(url), Some(id.clone()));
    // Without --print-url irictl connects; the reference runtime's URLs point nowhere, which is
    // one clear error line (tests/console.rs talks to a real console).
    let line = s.run(&["machine", "exec", &id]).await.error();
    assert!(
        line.starts_with("error: connecting to the console at http://"),
        "{line}"
    );

    // delete: known, unknown (tolerated), then gone
    let out = s.ok(&["machine", "delete", "machine", &id, "nonexistent"]).await;
    assert_eq!(
        out,
        format!("Machine {id} deleted\nMachine nonexistent not found\n")
    );
    assert_eq!(s.ok(&["machine", "get", "machine"]).await, "No resources found\n");
    assert_eq!(s.json(&["machine", "get", "machine"]).await, json!([]));
}

/// `-o json` output fed back as input creates an equal machine; `-o`/`-q` on create.
#[tokio::test(flavor = "multi_thread")]
async fn json_and_yaml_output_round_trip_as_input() {
    let s = Session::machine(MachineRuntime::default()).await;
    let created = s
        .json(&["machine", "create", "machine", "-f", &example("machine.yaml")])
        .await;
    let id = created["metadata"]["id"].as_str().unwrap().to_string();
    assert_eq!(created["spec"]["class"], json!("x3-small"));

    for format in ["json", "yaml"] {
        let document = s.ok(&["machine", "get", "machine", &id, "-o", format]).await;
        let copy = s
            .run_with_stdin(
                &["machine", "create", "machine", "-f", "-", "-q"],
                Some(&document),
            )
            .await
            .ok();
        let copy = copy.trim_end();
        assert_eq!(copy.len(), 63, "-q prints only the id: {copy}");
        assert_ne!(copy, id);
        let original = s.json(&["machine", "get", "machine", &id]).await;
        let duplicate = s.json(&["machine", "get", "machine", copy]).await;
        assert_eq!(original["spec"], duplicate["spec"], "{format}");
        assert_eq!(original["metadata"]["labels"], duplicate["metadata"]["labels"]);
        assert_eq!(
            original["metadata"]["annotations"],
            duplicate["metadata"]["annotations"]
        );
    }

    // A whole list (as `get` prints it) holding one machine is accepted too.
    let list = s.ok(&["machine", "get", "machine", &id, "-o", "json"]).await;
    let list = format!("[{list}]");
    let out = s
        .run_with_stdin(&["machine", "create", "machine", "-f", "-"], Some(&list))
        .await
        .ok();
    created_id(&out, "machine");

    let table = s
        .ok(&[
            "machine",
            "create",
            "machine",
            "-f",
            &example("machine.yaml"),
            "-o",
            "table",
        ])
        .await;
    assert!(table.starts_with("ID"), "{table}");
}

/// Enum names (any case, with or without prefix), lowerCamel keys, int64 strings and obsolete
/// upstream fields are accepted.
#[tokio::test(flavor = "multi_thread")]
async fn lenient_input() {
    let s = Session::machine(MachineRuntime::default()).await;
    let input = r#"{
        "metadata": {"labels": {"k": "v"}},
        "spec": {
            "class": "x3-large",
            "power": "POWER_OFF",
            "image": "obsolete-field-from-upstream-samples",
            "volumes": [{"name": "root", "emptyDisk": {"size_bytes": 1}, "localDisk": {"sizeBytes": "1073741824"}}],
            "networkInterfaces": [{"name": "eth0", "networkId": "n1", "ips": ["10.1.0.1"]}]
        }
    }"#;
    let created = s
        .run_with_stdin(
            &["machine", "create", "machine", "-f", "-", "-o", "json"],
            Some(input),
        )
        .await
        .json();
    assert_eq!(created["spec"]["power"], json!(1));
    assert_eq!(
        created["spec"]["volumes"][0]["local_disk"]["size_bytes"],
        json!(1073741824)
    );
    assert_eq!(
        created["spec"]["network_interfaces"][0]["network_id"],
        json!("n1")
    );
    let id = created["metadata"]["id"].as_str().unwrap();

    let path = s.file("power.yaml", "spec:\n  class: x3-small\n  power: off\n");
    let created = s.json(&["machine", "create", "machine", "-f", &path]).await;
    assert_eq!(created["spec"]["power"], json!(1));

    for power in ["on", "POWER_ON", "0"] {
        s.ok(&["machine", "update", "power", "--machine-id", id, "--power", power])
            .await;
    }
    let machine = s.json(&["machine", "get", "machine", id]).await;
    assert!(machine["spec"].get("power").is_none());
}
