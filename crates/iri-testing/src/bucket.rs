// SPDX-License-Identifier: Apache-2.0
//! The in-memory reference `BucketRuntime` (a test double, see the crate docs).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use iri_api::{
    bucket::v1alpha1::{
        Bucket, BucketAccess, BucketClass, BucketClassCapabilities, BucketState, BucketStatus,
        CreateBucketRequest, CreateBucketResponse, DeleteBucketRequest, DeleteBucketResponse,
        ListBucketClassesRequest, ListBucketClassesResponse, ListBucketsRequest, ListBucketsResponse,
        ListEventsRequest, ListEventsResponse, VersionRequest, VersionResponse, bucket_runtime_server,
    },
    event::v1alpha1::Event,
};
use iri_runtime::{Error, EventFilter, ObjectFilter};
use tonic::{Request, Response, Status};

use crate::common::{
    Clock, DEFAULT_MAX_EVENTS, EventLog, after, list_objects, lock, new_metadata, random_string, reply,
};

/// `VersionResponse.runtime_name` of the reference bucket runtime.
pub const BUCKET_RUNTIME_NAME: &str = "iri-reference-bucket";

/// How the reference [`BucketRuntime`] behaves.
///
/// Build with struct update syntax: `BucketConfig { endpoint: .., ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct BucketConfig {
    /// Supported bucket classes: `(name, tps, iops)`.
    pub classes: Vec<(String, i64, i64)>,
    /// `status.access.endpoint` of every available bucket. Nothing listens there unless the
    /// test starts something; `BUCKET_HOST`/`BUCKET_PORT` in the secret are derived from it.
    pub endpoint: String,
    /// `BUCKET_REGION` in the access secret.
    pub region: String,
    /// How long the simulated backend takes until a bucket is `BUCKET_AVAILABLE` (with its
    /// access data). Zero means "at the next read".
    pub ready_delay: Duration,
    /// How many events are kept (oldest dropped first).
    pub max_events: usize,
}

impl Default for BucketConfig {
    fn default() -> Self {
        const MI: i64 = 1024 * 1024;
        BucketConfig {
            classes: vec![
                ("fast".to_string(), 100 * MI, 10_000),
                ("slow".to_string(), 10 * MI, 1_000),
            ],
            endpoint: "http://127.0.0.1:9000".to_string(),
            region: "us-east-1".to_string(),
            ready_delay: Duration::ZERO,
            max_events: DEFAULT_MAX_EVENTS,
        }
    }
}

/// An in-memory `bucket.v1alpha1.BucketRuntime` that behaves like a correct provider, for tests
/// of clients. **A test double**: no bucket exists anywhere, the credentials it hands out are
/// random strings, state is lost on drop.
///
/// Cloning is cheap and clones share state.
///
/// A new bucket is `BUCKET_PENDING`, then `BUCKET_AVAILABLE` with `status.access` =
/// [`BucketConfig::endpoint`] and a secret with `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`
/// (random per bucket), `BUCKET_NAME` (the id), `BUCKET_HOST`, `BUCKET_PORT` (from the endpoint)
/// and `BUCKET_REGION`. `spec.class` must name a configured class.
#[derive(Clone)]
pub struct BucketRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    config: BucketConfig,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    buckets: HashMap<String, Record>,
    events: EventLog,
    clock: Clock,
}

#[derive(Debug)]
struct Record {
    bucket: Bucket,
    /// The access secret, generated at create and revealed once the bucket is available.
    secret_data: BTreeMap<String, Vec<u8>>,
    apply_at: Option<Instant>,
}

impl Default for BucketRuntime {
    fn default() -> Self {
        BucketRuntime::new(BucketConfig::default())
    }
}

impl BucketRuntime {
    /// A runtime with no buckets.
    pub fn new(config: BucketConfig) -> Self {
        let events = EventLog::new(config.max_events);
        BucketRuntime {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State {
                    buckets: HashMap::new(),
                    events,
                    clock: Clock::default(),
                }),
            }),
        }
    }

    /// The configuration this runtime was built with.
    pub fn config(&self) -> &BucketConfig {
        &self.inner.config
    }

    /// All buckets as `ListBuckets` without filter would return them now.
    pub fn buckets(&self) -> Vec<Bucket> {
        list_objects(self.state().buckets.values().map(|r| &r.bucket), None)
    }

    /// All recorded events, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.state().events.list(None)
    }

    /// The locked state, with every change whose delay has passed applied.
    fn state(&self) -> MutexGuard<'_, State> {
        let mut state = lock(&self.inner.state);
        state.reconcile(&self.inner.config.endpoint);
        state
    }

    fn insert_bucket(&self, req: CreateBucketRequest) -> Result<Bucket, Error> {
        let bucket = req.bucket.ok_or_else(|| Error::required("bucket"))?;
        let spec = bucket.spec.ok_or_else(|| Error::required("bucket.spec"))?;
        if spec.class.is_empty() {
            return Err(Error::required("bucket.spec.class"));
        }
        let config = &self.inner.config;
        if !config.classes.iter().any(|c| c.0 == spec.class) {
            let known: Vec<&str> = config.classes.iter().map(|c| c.0.as_str()).collect();
            return Err(Error::invalid(
                "bucket.spec.class",
                format!(
                    "unknown bucket class {:?} (known: {})",
                    spec.class,
                    known.join(", ")
                ),
            ));
        }
        let mut state = self.state();
        let metadata = new_metadata("bucket", bucket.metadata, &mut state.clock)?;
        let message = format!("Created bucket of class {:?}", spec.class);
        let bucket = Bucket {
            metadata: Some(metadata.clone()),
            spec: Some(spec),
            status: Some(BucketStatus {
                state: BucketState::BucketPending as i32,
                access: None,
            }),
        };
        let secret_data = secret_data(&metadata.id, &config.endpoint, &config.region);
        state.events.record(&metadata, "Created", "Create", message);
        state.buckets.insert(
            metadata.id,
            Record {
                bucket: bucket.clone(),
                secret_data,
                apply_at: Some(after(config.ready_delay)),
            },
        );
        Ok(bucket)
    }

    fn remove_bucket(&self, id: &str) -> Result<(), Error> {
        let mut state = self.state();
        let record = state
            .buckets
            .remove(id)
            .ok_or_else(|| Error::not_found("bucket", id))?;
        state
            .events
            .record_deleted(record.bucket.metadata, "Deleted bucket");
        Ok(())
    }
}

impl State {
    /// Lets the simulated backend act on every bucket whose creation is due.
    fn reconcile(&mut self, endpoint: &str) {
        let now = Instant::now();
        for record in self.buckets.values_mut() {
            if record.apply_at.is_none_or(|at| at > now) {
                continue;
            }
            record.apply_at = None;
            record.bucket.status = Some(BucketStatus {
                state: BucketState::BucketAvailable as i32,
                access: Some(BucketAccess {
                    endpoint: endpoint.to_string(),
                    secret_data: record.secret_data.clone(),
                }),
            });
            self.events.record_state_change(
                record.bucket.metadata.as_ref().unwrap_or(&Default::default()),
                "Bucket is BUCKET_AVAILABLE".into(),
            );
        }
    }
}

/// Fresh S3-style credentials for bucket `id`, in the keys S3 clients and bucketpoollet users
/// expect.
fn secret_data(id: &str, endpoint: &str, region: &str) -> BTreeMap<String, Vec<u8>> {
    const UPPER_ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    const SECRET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (host, port) = host_port(endpoint);
    BTreeMap::from([
        (
            "AWS_ACCESS_KEY_ID".to_string(),
            random_string(20, UPPER_ALNUM).into_bytes(),
        ),
        (
            "AWS_SECRET_ACCESS_KEY".to_string(),
            random_string(40, SECRET).into_bytes(),
        ),
        // The id is 63 lowercase hex characters: a valid S3 bucket name as it is.
        ("BUCKET_NAME".to_string(), id.as_bytes().to_vec()),
        ("BUCKET_HOST".to_string(), host.into_bytes()),
        ("BUCKET_PORT".to_string(), port.into_bytes()),
        ("BUCKET_REGION".to_string(), region.as_bytes().to_vec()),
    ])
}

/// Host and port of an endpoint URL like `http://127.0.0.1:9000/` or `https://[::1]`; the port
/// defaults by scheme. Never fails: a test double with an odd endpoint should still answer.
fn host_port(endpoint: &str) -> (String, String) {
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("http", endpoint));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map(|(_, a)| a).unwrap_or(authority);
    let default_port = if scheme.eq_ignore_ascii_case("https") {
        "443"
    } else {
        "80"
    };
    if let Some(bracketed) = authority.strip_prefix('[') {
        // IPv6 literal: `[::1]:9000` or `[::1]`.
        let (host, after) = bracketed.split_once(']').unwrap_or((bracketed, ""));
        let port = after
            .strip_prefix(':')
            .filter(|p| !p.is_empty())
            .unwrap_or(default_port);
        return (host.to_string(), port.to_string());
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() => (host.to_string(), port.to_string()),
        Some((host, _)) => (host.to_string(), default_port.to_string()),
        None => (authority.to_string(), default_port.to_string()),
    }
}

#[tonic::async_trait]
impl bucket_runtime_server::BucketRuntime for BucketRuntime {
    async fn version(&self, _: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            runtime_name: BUCKET_RUNTIME_NAME.to_string(),
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let filter = request.into_inner().filter.map(EventFilter::from);
        let events = self.state().events.list(filter);
        Ok(Response::new(ListEventsResponse { events }))
    }

    async fn list_buckets(
        &self,
        request: Request<ListBucketsRequest>,
    ) -> Result<Response<ListBucketsResponse>, Status> {
        let filter = request.into_inner().filter.map(ObjectFilter::from);
        let buckets = list_objects(self.state().buckets.values().map(|r| &r.bucket), filter);
        Ok(Response::new(ListBucketsResponse { buckets }))
    }

    async fn create_bucket(
        &self,
        request: Request<CreateBucketRequest>,
    ) -> Result<Response<CreateBucketResponse>, Status> {
        reply(self.insert_bucket(request.into_inner()), |bucket| {
            CreateBucketResponse { bucket: Some(bucket) }
        })
    }

    async fn delete_bucket(
        &self,
        request: Request<DeleteBucketRequest>,
    ) -> Result<Response<DeleteBucketResponse>, Status> {
        reply(self.remove_bucket(&request.into_inner().bucket_id), |()| {
            DeleteBucketResponse {}
        })
    }

    async fn list_bucket_classes(
        &self,
        _: Request<ListBucketClassesRequest>,
    ) -> Result<Response<ListBucketClassesResponse>, Status> {
        let bucket_classes = self
            .inner
            .config
            .classes
            .iter()
            .map(|(name, tps, iops)| BucketClass {
                name: name.clone(),
                // Always present: bucketpoollet dereferences it (iri-contract §3.5.6).
                capabilities: Some(BucketClassCapabilities {
                    tps: *tps,
                    iops: *iops,
                }),
            })
            .collect();
        Ok(Response::new(ListBucketClassesResponse { bucket_classes }))
    }
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_port_of_endpoints() {
        let hp = |e| {
            let (h, p) = host_port(e);
            (h, p)
        };
        assert_eq!(hp("http://127.0.0.1:9000"), ("127.0.0.1".into(), "9000".into()));
        assert_eq!(
            hp("https://s3.example.com/"),
            ("s3.example.com".into(), "443".into())
        );
        assert_eq!(hp("http://[::1]:9000/x"), ("::1".into(), "9000".into()));
        assert_eq!(hp("https://[::1]"), ("::1".into(), "443".into()));
        assert_eq!(hp("minio:9000"), ("minio".into(), "9000".into()));
        assert_eq!(hp("http://user:pw@host:1"), ("host".into(), "1".into()));
        assert_eq!(hp(""), ("".into(), "80".into()));
    }
}
