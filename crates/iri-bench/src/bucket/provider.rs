// SPDX-License-Identifier: Apache-2.0
//! The `iri-bucket-provider` under test: a black box started as a binary on a fresh data
//! directory, with a configuration written by the benchmark (one class without limits, S3 on a
//! free loopback port), driven over its IRI socket as a bucketpoollet would: CreateBucket, poll
//! until AVAILABLE, take the access from the status.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use iri_api::{
    bucket::v1alpha1::{
        Bucket, BucketFilter, BucketSpec, BucketState, CreateBucketRequest, ListBucketsRequest,
        VersionRequest, bucket_runtime_client::BucketRuntimeClient,
    },
    endpoint::clients,
    meta::v1alpha1::ObjectMetadata,
};
use tonic::transport::Channel;

use super::s3::Access;

/// A BucketRuntime client.
pub type Client = BucketRuntimeClient<Channel>;

/// The one bucket class the benchmark configures: `tps = 0, iops = 0` (unlimited). The default
/// classes would throttle the benchmark (`standard` admits 500 data requests per second, and
/// the S3 server answers `SlowDown` beyond), which would measure the class, not the server.
pub const CLASS: &str = "bench";

/// Label on the bucket the benchmark creates.
pub const LABEL: &str = "iri-bench";

/// How long the bucket may take to become AVAILABLE.
const CONVERGE: Duration = Duration::from_secs(60);

/// A running provider. Dropping it stops the provider.
pub struct Provider {
    process: crate::binary::Process,
    /// The provider's data directory.
    pub data_dir: PathBuf,
    /// The IRI socket.
    pub socket: PathBuf,
    /// The provider's log (stderr).
    pub log: PathBuf,
}

/// Where to find `iri-bucket-provider`: see [`crate::binary::find`] (`$IRI_BUCKET_PROVIDER_BIN`).
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    crate::binary::find(
        "iri-bucket-provider",
        "bucket-provider",
        "IRI_BUCKET_PROVIDER_BIN",
        explicit,
    )
}

impl Provider {
    /// Starts `binary` on `root/provider` (a new directory), serving IRI on `root/bucket.sock`
    /// and S3 on a port the kernel picks (the bucket's endpoint names it), and waits until it
    /// answers Version. Its log goes to `root/provider.log`.
    pub async fn start(binary: &Path, root: &Path) -> Result<(Provider, Client)> {
        let data_dir = root.join("provider");
        let config = root.join("provider.toml");
        std::fs::write(
            &config,
            format!(
                "[[classes]]\nname = \"{CLASS}\"\ntps = 0\niops = 0\n\n[s3]\naddress = \"127.0.0.1:0\"\n"
            ),
        )
        .context("writing the provider config")?;
        let socket = root.join("bucket.sock");
        let log = root.join("provider.log");
        let process = crate::binary::Process::spawn(binary, &data_dir, &socket, &config, &log)?;
        let mut provider = Provider {
            process,
            data_dir,
            socket,
            log,
        };
        let client = provider.connect().await?;
        Ok((provider, client))
    }

    async fn connect(&mut self) -> Result<Client> {
        self.process
            .wait_serving(&self.socket, |channel| async move {
                let mut client = clients::bucket(channel);
                client
                    .version(VersionRequest::default())
                    .await
                    .ok()
                    .map(|_| client)
            })
            .await
    }

    /// The last lines of the provider's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Stops the provider (SIGTERM, SIGKILL after a timeout). Idempotent.
    pub fn stop(&mut self) {
        self.process.stop();
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CreateBucket in the benchmark's class, polls until AVAILABLE, and returns its id and access.
pub async fn create_bucket(client: &mut Client) -> Result<(String, Access)> {
    let created = client
        .create_bucket(CreateBucketRequest {
            bucket: Some(Bucket {
                metadata: Some(ObjectMetadata {
                    labels: BTreeMap::from([(LABEL.to_string(), "bucket".to_string())]),
                    ..Default::default()
                }),
                spec: Some(BucketSpec {
                    class: CLASS.to_string(),
                }),
                status: None,
            }),
        })
        .await
        .context("CreateBucket")?
        .into_inner()
        .bucket
        .ok_or_else(|| anyhow!("CreateBucket answered without a bucket"))?;
    let id = created.metadata.map(|m| m.id).unwrap_or_default();
    if id.is_empty() {
        bail!("CreateBucket answered a bucket without an id");
    }
    let deadline = Instant::now() + CONVERGE;
    loop {
        let bucket = client
            .list_buckets(ListBucketsRequest {
                filter: Some(BucketFilter {
                    id: id.clone(),
                    ..Default::default()
                }),
            })
            .await
            .context("ListBuckets")?
            .into_inner()
            .buckets
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("bucket {id} disappeared"))?;
        let status = bucket.status.unwrap_or_default();
        if status.state == BucketState::BucketAvailable as i32 {
            let access = status
                .access
                .ok_or_else(|| anyhow!("bucket {id} is AVAILABLE without an access"))?;
            let secret = |name: &str| {
                access
                    .secret_data
                    .get(name)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| anyhow!("bucket {id}: access.secret_data has no {name}"))
            };
            let access = Access {
                endpoint: access.endpoint.clone(),
                access_key_id: secret("AWS_ACCESS_KEY_ID")?,
                secret_access_key: secret("AWS_SECRET_ACCESS_KEY")?,
                bucket: secret("BUCKET_NAME")?,
                region: secret("BUCKET_REGION")?,
            };
            return Ok((id, access));
        }
        if status.state == BucketState::BucketError as i32 {
            bail!("bucket {id} went to BUCKET_ERROR");
        }
        if Instant::now() > deadline {
            bail!("bucket {id} not AVAILABLE after {CONVERGE:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
