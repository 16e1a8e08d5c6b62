// SPDX-License-Identifier: Apache-2.0
//! The gRPC adapter: `bucket.v1alpha1.BucketRuntime`.
//!
//! Every handler validates the request (InvalidArgument naming the field, NotFound for unknown
//! ids), turns it into one store write, and returns. Nothing here waits for the S3 backend:
//! the store's change feed wakes the reconciler, which creates the bucket and its credentials
//! and writes the status. Lists are served from the store's in-memory cache.
//!
//! Deletes are two-phase: DeleteBucket marks the bucket (OK, also when repeated) and the
//! reconciler revokes its credentials, removes its data and then the record; from then on
//! DeleteBucket answers NotFound, which is what tells the bucketpoollet the bucket is gone.

use iri_api::bucket::v1alpha1::{
    Bucket, BucketClass as IriBucketClass, BucketClassCapabilities, BucketState, BucketStatus,
    CreateBucketRequest, CreateBucketResponse, DeleteBucketRequest, DeleteBucketResponse,
    ListBucketClassesRequest, ListBucketClassesResponse, ListBucketsRequest, ListBucketsResponse,
    ListEventsRequest, ListEventsResponse, VersionRequest, VersionResponse, bucket_runtime_server,
};
use iri_runtime::{
    Error, EventType, Result, Store,
    error::reply,
    handler::{self, blocking, record_event},
    validate::{client_metadata, shorten},
};
use tonic::{Request, Response, Status};

use crate::config::{BucketClass, Config};

/// `VersionResponse.runtime_name`: what poollets put in front of ids (`<name>://<id>`).
pub const RUNTIME_NAME: &str = "iri-bucket-provider";

/// The `BucketRuntime` service.
pub struct BucketService {
    store: Store,
    classes: Vec<BucketClass>,
}

impl BucketService {
    /// A service over `store` offering `config`'s classes.
    pub fn new(store: Store, config: &Config) -> Self {
        BucketService {
            store,
            classes: config.classes.clone(),
        }
    }

    async fn insert_bucket(&self, request: CreateBucketRequest) -> Result<Bucket> {
        let bucket = request.bucket.ok_or_else(|| Error::required("bucket"))?;
        let spec = bucket.spec.ok_or_else(|| Error::required("bucket.spec"))?;
        if spec.class.is_empty() {
            return Err(Error::required("bucket.spec.class"));
        }
        if !self.classes.iter().any(|c| c.name == spec.class) {
            let known: Vec<&str> = self.classes.iter().map(|c| c.name.as_str()).collect();
            return Err(Error::invalid(
                "bucket.spec.class",
                format!(
                    "unknown bucket class {:?} (known: {})",
                    shorten(&spec.class),
                    known.join(", ")
                ),
            ));
        }
        let metadata = client_metadata("bucket", bucket.metadata)?;
        let bucket = Bucket {
            metadata: Some(metadata),
            spec: Some(spec),
            status: Some(BucketStatus {
                state: BucketState::BucketPending as i32,
                access: None,
            }),
        };
        let store = self.store.clone();
        let stored = blocking(move || store.create(bucket)).await?.object;
        let class = stored.spec.as_ref().map_or("", |s| s.class.as_str()).to_string();
        tracing::info!(
            id = %stored.metadata.as_ref().map_or("", |m| m.id.as_str()),
            class,
            "bucket created"
        );
        record_event(
            &self.store,
            stored.metadata.as_ref(),
            EventType::Normal,
            "Created",
            "Create",
            format!("Created bucket in class {class:?}"),
        )
        .await;
        Ok(stored)
    }

    /// DeleteBucket: the reconciler revokes the credentials, removes the data and the record.
    async fn request_deletion(&self, id: String) -> Result<()> {
        handler::request_deletion::<Bucket>(
            &self.store,
            id,
            "bucket",
            "Deleting bucket: revoking its credentials and removing its objects",
        )
        .await
    }
}

#[tonic::async_trait]
impl bucket_runtime_server::BucketRuntime for BucketService {
    async fn version(&self, _: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            runtime_name: RUNTIME_NAME.to_string(),
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let filter = request.into_inner().filter;
        reply(handler::list_events(&self.store, filter).await, |events| {
            ListEventsResponse { events }
        })
    }

    async fn list_buckets(
        &self,
        request: Request<ListBucketsRequest>,
    ) -> Result<Response<ListBucketsResponse>, Status> {
        let filter = request.into_inner().filter;
        let buckets = handler::list(&self.store, filter, |bucket: Bucket| bucket);
        Ok(Response::new(ListBucketsResponse { buckets }))
    }

    async fn create_bucket(
        &self,
        request: Request<CreateBucketRequest>,
    ) -> Result<Response<CreateBucketResponse>, Status> {
        reply(self.insert_bucket(request.into_inner()).await, |bucket| {
            CreateBucketResponse { bucket: Some(bucket) }
        })
    }

    async fn delete_bucket(
        &self,
        request: Request<DeleteBucketRequest>,
    ) -> Result<Response<DeleteBucketResponse>, Status> {
        reply(
            self.request_deletion(request.into_inner().bucket_id).await,
            |()| DeleteBucketResponse {},
        )
    }

    async fn list_bucket_classes(
        &self,
        _: Request<ListBucketClassesRequest>,
    ) -> Result<Response<ListBucketClassesResponse>, Status> {
        let bucket_classes = self
            .classes
            .iter()
            .map(|class| IriBucketClass {
                name: class.name.clone(),
                capabilities: Some(BucketClassCapabilities {
                    tps: class.tps,
                    iops: class.iops,
                }),
            })
            .collect();
        Ok(Response::new(ListBucketClassesResponse { bucket_classes }))
    }
}
