// SPDX-License-Identifier: Apache-2.0
//! Shared by the integration tests: the real `iri-bucket-provider` process on a temporary data
//! directory, a gRPC client to it, and the boto3 driver script (`tests/s3_client.py`).

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use iri_api::{
    Endpoint,
    bucket::v1alpha1::{
        Bucket, BucketFilter, BucketSpec, BucketState, CreateBucketRequest, ListBucketsRequest,
        VersionRequest, bucket_runtime_client::BucketRuntimeClient,
    },
    endpoint::clients,
    meta::v1alpha1::ObjectMetadata,
};
use nix::{sys::signal::Signal, unistd::Pid};
use tonic::transport::Channel;

/// A gRPC client of the provider.
pub type Client = BucketRuntimeClient<Channel>;

/// How long a bucket may take to become available or go away.
pub const READY: Duration = Duration::from_secs(30);

/// The boto3 driver.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/s3_client.py");

/// A free TCP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running provider process on a data directory.
pub struct Provider {
    child: Option<Child>,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The gRPC socket.
    pub socket: PathBuf,
    /// The current process's log.
    pub log: PathBuf,
    root: PathBuf,
    starts: usize,
    /// The S3 listen address.
    pub s3_address: String,
    config: Option<PathBuf>,
}

impl Provider {
    /// Starts the binary on `root/data` with S3 on a free loopback port and the TOML `config`
    /// (may be empty).
    pub fn start(root: &Path, config: &str) -> Provider {
        let config_file = (!config.is_empty()).then(|| {
            let path = root.join("config.toml");
            std::fs::write(&path, config).expect("write config");
            path
        });
        let mut provider = Provider {
            child: None,
            data_dir: root.join("data"),
            socket: root.join("bucket.sock"),
            log: PathBuf::new(),
            root: root.to_path_buf(),
            starts: 0,
            s3_address: format!("127.0.0.1:{}", free_port()),
            config: config_file,
        };
        provider.spawn();
        provider
    }

    /// Starts the process (again) on the same directories and S3 address.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        self.log = self.root.join(format!("provider-{}.log", self.starts));
        let mut command = Command::new(env!("CARGO_BIN_EXE_iri-bucket-provider"));
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--address")
            .arg(&self.socket)
            .arg("--s3-address")
            .arg(&self.s3_address)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(File::create(&self.log).expect("log file"));
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        self.child = Some(command.spawn().expect("start iri-bucket-provider"));
    }

    /// The logs of every start so far.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.root.join(format!("provider-{n}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n--- restart ---\n")
    }

    /// Waits until the provider answers Version, and returns a client.
    pub async fn client(&mut self) -> Client {
        let endpoint = Endpoint::Unix(self.socket.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("provider exited with {status}:\n{}", self.logs());
            }
            if let Ok(channel) = endpoint.connect(Duration::from_secs(2)).await {
                let mut client = clients::bucket(channel);
                if client.version(VersionRequest::default()).await.is_ok() {
                    return client;
                }
            }
            assert!(
                Instant::now() < deadline,
                "provider not serving:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A create request of `class` with `labels`.
pub fn request(class: &str, labels: &[(&str, &str)]) -> CreateBucketRequest {
    CreateBucketRequest {
        bucket: Some(Bucket {
            metadata: Some(ObjectMetadata {
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
            spec: Some(BucketSpec {
                class: class.to_string(),
            }),
            status: None,
        }),
    }
}

/// The id of a bucket.
pub fn id(bucket: &Bucket) -> String {
    bucket.metadata.as_ref().map(|m| m.id.clone()).unwrap_or_default()
}

/// The bucket `id`, if listed.
pub async fn get(client: &mut Client, id: &str) -> Option<Bucket> {
    let listed = client
        .list_buckets(ListBucketsRequest {
            filter: Some(BucketFilter {
                id: id.to_string(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListBuckets")
        .into_inner()
        .buckets;
    listed.into_iter().next()
}

/// Waits until bucket `id` is AVAILABLE and returns it.
pub async fn wait_available(client: &mut Client, id: &str) -> Bucket {
    let deadline = Instant::now() + READY;
    loop {
        let bucket = get(client, id).await.expect("bucket listed");
        let state = bucket.status.as_ref().map_or(0, |s| s.state);
        if state == BucketState::BucketAvailable as i32 {
            return bucket;
        }
        assert_ne!(
            state,
            BucketState::BucketError as i32,
            "bucket {id} went to BUCKET_ERROR"
        );
        assert!(Instant::now() < deadline, "bucket {id} not available in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates a bucket of `class` and waits until it is available.
pub async fn create_available(client: &mut Client, class: &str) -> Bucket {
    let created = client
        .create_bucket(request(class, &[]))
        .await
        .expect("CreateBucket")
        .into_inner()
        .bucket
        .expect("bucket");
    wait_available(client, &id(&created)).await
}

/// The access of an available bucket as the JSON the driver script reads: exactly
/// `BucketAccess` (endpoint and secret_data as strings), nothing else.
pub fn access_json(bucket: &Bucket) -> serde_json::Value {
    let access = bucket
        .status
        .as_ref()
        .and_then(|s| s.access.as_ref())
        .expect("available bucket has access");
    let secret_data: BTreeMap<String, String> = access
        .secret_data
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8(v.clone()).expect("utf-8 secret")))
        .collect();
    serde_json::json!({ "endpoint": access.endpoint, "secret_data": secret_data })
}

/// Spawns the driver script with `scenario`, feeding it `input`.
pub fn spawn_script(scenario: &str, input: &serde_json::Value) -> Child {
    let mut child = Command::new("python3")
        .arg(SCRIPT)
        .arg(scenario)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed for the S3 tests");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(input.to_string().as_bytes())
        .expect("write input");
    drop(stdin);
    child
}

/// Runs the driver script with `scenario` to completion; panics with its output unless it
/// passed; returns its stdout.
pub async fn run_script(scenario: &str, input: serde_json::Value) -> String {
    let scenario = scenario.to_string();
    let output = tokio::task::spawn_blocking(move || {
        spawn_script(&scenario, &input)
            .wait_with_output()
            .expect("python3 runs")
    })
    .await
    .expect("script task");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    if stderr.contains("No module named 'boto3'") {
        panic!("boto3 is needed for the S3 tests: pip install boto3");
    }
    assert!(
        output.status.success() && stdout.trim_end().ends_with("OK"),
        "s3_client.py failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}
