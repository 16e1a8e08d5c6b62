// SPDX-License-Identifier: Apache-2.0
//! Every failure prints exactly one `error: ` line on stderr and exits non-zero.

mod support;

use iri_testing::MachineRuntime;
use support::{Session, example, irictl_raw};

#[tokio::test(flavor = "multi_thread")]
async fn connection_errors() {
    let run = irictl_raw(
        &[
            "--address",
            "unix:///nonexistent/x.sock",
            "machine",
            "get",
            "machine",
        ],
        None,
        &[],
    )
    .await;
    assert_eq!(
        run.error(),
        "error: cannot connect to unix:///nonexistent/x.sock: no such socket (is the runtime running?)"
    );

    // A bare path is accepted as a unix socket.
    let run = irictl_raw(
        &["--address", "/nonexistent/x.sock", "volume", "get", "volume"],
        None,
        &[],
    )
    .await;
    assert!(
        run.error()
            .starts_with("error: cannot connect to unix:///nonexistent/x.sock")
    );

    for address in ["dns:///x", "tcp://host", "relative.sock"] {
        let run = irictl_raw(&["--address", address, "bucket", "get", "bucket"], None, &[]).await;
        let line = run.error();
        assert!(line.starts_with("error: invalid endpoint"), "{address}: {line}");
    }

    // Nobody listens on this TCP port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("tcp://127.0.0.1:{port}");
    let run = irictl_raw(
        &[
            "--address",
            &address,
            "--timeout",
            "2s",
            "machine",
            "get",
            "version",
        ],
        None,
        &[],
    )
    .await;
    assert!(
        run.error()
            .starts_with(&format!("error: cannot connect to {address}"))
    );

    // The environment variable is used when --address is absent.
    let run = irictl_raw(
        &["machine", "get", "machine"],
        None,
        &[("IRI_MACHINE_RUNTIME_ENDPOINT", "unix:///nonexistent/env.sock")],
    )
    .await;
    assert!(
        run.error()
            .starts_with("error: cannot connect to unix:///nonexistent/env.sock")
    );
}

/// A socket that accepts connections but never answers: the deadline ends the call.
#[tokio::test(flavor = "multi_thread")]
async fn deadline_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let address = format!("unix://{}", path.display());
    let started = std::time::Instant::now();
    let run = irictl_raw(
        &[
            "--address",
            &address,
            "--timeout",
            "1s",
            "machine",
            "get",
            "version",
        ],
        None,
        &[],
    )
    .await;
    let line = run.error();
    assert_eq!(line, "error: Version: DeadlineExceeded: no answer within 1s");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_gives_up_after_three_seconds() {
    let kind = "bucket";
    if ["broker", "provider"]
        .iter()
        .any(|p| std::path::Path::new(&format!("/var/run/iri-{kind}{p}.sock")).exists())
    {
        eprintln!("skipped: a {kind} runtime socket exists on this machine");
        return;
    }
    let started = std::time::Instant::now();
    let line = irictl_raw(&[kind, "get", "bucket"], None, &[]).await.error();
    assert!(
        line.starts_with(
            "error: no bucket runtime endpoint: pass --address, set IRI_BUCKET_RUNTIME_ENDPOINT"
        ),
        "{line}"
    );
    assert!(started.elapsed() >= std::time::Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_variable_finds_the_runtime() {
    let s = Session::machine(MachineRuntime::default()).await;
    let run = irictl_raw(
        &["machine", "get", "machine"],
        None,
        &[("IRI_MACHINE_RUNTIME_ENDPOINT", &s.address)],
    )
    .await;
    assert_eq!(run.ok(), "No resources found\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn rpc_errors() {
    let s = Session::machine(MachineRuntime::default()).await;
    let missing = "0123456789abcdef";

    let line = s
        .run(&[
            "machine",
            "update",
            "power",
            "--machine-id",
            missing,
            "--power",
            "off",
        ])
        .await
        .error();
    assert!(
        line.starts_with("error: UpdateMachinePower: NotFound: "),
        "{line}"
    );
    let line = s
        .run(&[
            "machine",
            "attach",
            "volume",
            "--machine-id",
            missing,
            "-f",
            &example("volume-attach.yaml"),
        ])
        .await
        .error();
    assert!(line.starts_with("error: AttachVolume: NotFound: "), "{line}");
    let line = s
        .run(&[
            "machine",
            "attach",
            "nic",
            "--machine-id",
            missing,
            "-f",
            &example("nic.yaml"),
        ])
        .await
        .error();
    assert!(
        line.starts_with("error: AttachNetworkInterface: NotFound: "),
        "{line}"
    );
    let line = s
        .run(&[
            "machine",
            "update",
            "volume",
            "--machine-id",
            missing,
            "-f",
            &example("volume-attach.yaml"),
        ])
        .await
        .error();
    assert!(line.starts_with("error: UpdateVolume: NotFound: "), "{line}");
    let line = s
        .run(&[
            "machine",
            "update",
            "annotations",
            "--machine-id",
            missing,
            "-f",
            &example("annotations.yaml"),
        ])
        .await
        .error();
    assert!(
        line.starts_with("error: UpdateMachineAnnotations: NotFound: "),
        "{line}"
    );
    let line = s.run(&["machine", "get", "machine", missing]).await.error();
    assert_eq!(line, format!("error: machine {missing} not found"));

    // Unknown class: the server's INVALID_ARGUMENT, verbatim.
    let path = s.file(
        "bad-class.yaml",
        &std::fs::read_to_string(example("machine.yaml"))
            .unwrap()
            .replace("x3-small", "x9-huge"),
    );
    let line = s
        .run(&["machine", "create", "machine", "-f", &path])
        .await
        .error();
    assert!(
        line.starts_with("error: CreateMachine: InvalidArgument: invalid machine.spec.class: "),
        "{line}"
    );
    assert!(line.contains("x9-huge"), "{line}");

    // A volume needs exactly one of local_disk and connection.
    let path = s.file("bad-volume.yaml", "name: x\n");
    let line = s
        .run(&["machine", "create", "machine", "-f", &path])
        .await
        .error();
    assert!(
        line.starts_with("error: CreateMachine: InvalidArgument: "),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn input_errors() {
    let session = Session::machine(MachineRuntime::default()).await;
    let s = &session;
    let create = |file: String| async move {
        s.run(&["machine", "create", "machine", "-f", &file])
            .await
            .error()
    };

    assert_eq!(
        create("/nonexistent/machine.yaml".into()).await,
        "error: /nonexistent/machine.yaml: cannot read: No such file or directory (os error 2)"
    );
    let path = s.file("power.yaml", "spec:\n  class: x3-small\n  power: sideways\n");
    let line = create(path.clone()).await;
    assert!(
        line.starts_with(&format!(
            "error: {path}: invalid value for field spec.power: unknown Power \"sideways\""
        )),
        "{line}"
    );
    let path = s.file(
        "size.yaml",
        "spec:\n  volumes:\n  - name: a\n    local_disk:\n      size_bytes: big\n",
    );
    let line = create(path.clone()).await;
    assert!(
        line.starts_with(&format!(
            "error: {path}: invalid value for field spec.volumes[0].local_disk.size_bytes: "
        )),
        "{line}"
    );
    let path = s.file("ignition.yaml", "spec:\n  ignition_data: not base64!\n");
    assert!(create(path.clone()).await.starts_with(&format!(
        "error: {path}: invalid value for field spec.ignition_data: "
    )));
    let path = s.file("broken.yaml", "spec: [unclosed\n");
    assert!(
        create(path.clone())
            .await
            .starts_with(&format!("error: {path}: invalid YAML: "))
    );
    let path = s.file("broken.json", "{\"spec\": {\n");
    assert!(
        create(path.clone())
            .await
            .starts_with(&format!("error: {path}: invalid JSON: "))
    );
    let path = s.file("empty.yaml", "");
    assert_eq!(
        create(path.clone()).await,
        format!("error: {path}: empty input, expected a JSON or YAML object")
    );
    let path = s.file("list.yaml", "- a\n- b\n");
    assert_eq!(
        create(path.clone()).await,
        format!("error: {path}: expected one object, found a list of 2")
    );

    let line = s
        .run_with_stdin(&["machine", "create", "machine", "-f", "-"], Some("spec: 3\n"))
        .await
        .error();
    assert!(
        line.starts_with("error: <stdin>: invalid value for field spec: "),
        "{line}"
    );

    let path = s.file("annotations.yaml", "a: {nested: map}\n");
    let line = s
        .run(&[
            "machine",
            "update",
            "annotations",
            "--machine-id",
            "x",
            "-f",
            &path,
        ])
        .await
        .error();
    assert_eq!(
        line,
        format!("error: {path}: invalid value for key \"a\": expected a string, found an object")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_errors() {
    for args in [
        &["machine", "create", "machine"][..],
        &[
            "machine",
            "update",
            "power",
            "--machine-id",
            "x",
            "--power",
            "sideways",
        ],
        &["machine", "update", "power", "--power", "on"],
        &["machine", "detach", "volume", "--machine-id", "x"],
        &["machine", "get", "machine", "-l", "novalue"],
        &["machine", "get", "machine", "-o", "xml"],
        &["volume", "expand", "volume", "v", "--size", "lots"],
        &["machine", "get", "events", "-d", "soon"],
        &["--timeout", "x", "machine", "get", "version"],
        &["--timeout", "0s", "machine", "get", "version"],
        &["machin"],
    ] {
        let run = irictl_raw(args, None, &[]).await;
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        let line = run.error();
        assert!(line.ends_with("(see --help)"), "{args:?}: {line}");
    }
    let run = irictl_raw(&["machine", "create", "machine"], None, &[]).await;
    assert_eq!(
        run.error(),
        "error: the following required arguments were not provided: --filename <FILE> (see --help)"
    );

    // Help is not an error.
    let run = irictl_raw(&["machine", "exec", "--help"], None, &[]).await;
    assert!(run.ok().contains("machine provider"));
}
