// SPDX-License-Identifier: Apache-2.0
//! `irictl bucket ...`: the BucketRuntime commands.

use std::io::Write;

use anyhow::Result;
use iri_api::{
    RuntimeKind,
    bucket::v1alpha1::{
        Bucket, BucketClass, BucketFilter, BucketState, CreateBucketRequest, DeleteBucketRequest,
        EventFilter, ListBucketClassesRequest, ListBucketsRequest, ListEventsRequest, VersionRequest,
        VersionResponse,
    },
    endpoint::clients,
};

use crate::{
    cli::{BucketCommand, BucketCreate, BucketDelete, BucketGet},
    common::{VersionColumns, print_events, version_response},
    input::Input,
    render::{Columns, Object, enum_name, format_map, headers, or_none},
    session::{Session, event_window, list_filter, selector},
    units::age,
};

impl Object for Bucket {
    const MESSAGE: &'static str = "bucket.v1alpha1.Bucket";

    fn key(&self) -> String {
        self.metadata.as_ref().map(|m| m.id.clone()).unwrap_or_default()
    }
}

impl Object for BucketClass {
    const MESSAGE: &'static str = "bucket.v1alpha1.BucketClass";

    fn key(&self) -> String {
        self.name.clone()
    }
}

version_response!(VersionResponse, "bucket.v1alpha1.VersionResponse");

/// Upstream's bucket table `ID, Class, State, Age`; wide adds `Endpoint, Labels`.
#[derive(Debug, Clone, Copy)]
pub struct BucketColumns;

impl Columns<Bucket> for BucketColumns {
    fn headers(&self, wide: bool) -> Vec<String> {
        headers(&["ID", "Class", "State", "Age"], &["Endpoint", "Labels"], wide)
    }

    fn row(&self, bucket: &Bucket, wide: bool) -> Vec<String> {
        let metadata = bucket.metadata.clone().unwrap_or_default();
        let class = bucket.spec.as_ref().map(|s| s.class.clone()).unwrap_or_default();
        let status = bucket.status.clone().unwrap_or_default();
        let mut row = vec![
            metadata.id,
            class,
            enum_name(status.state, BucketState::as_str_name),
            age(metadata.created_at, 1_000_000_000),
        ];
        if wide {
            let endpoint = status.access.map(|a| a.endpoint).unwrap_or_default();
            row.push(or_none(&endpoint));
            row.push(format_map(&metadata.labels));
        }
        row
    }
}

/// Upstream's bucket class table `Name, TPS, IOPS`.
#[derive(Debug, Clone, Copy)]
pub struct BucketClassColumns;

impl Columns<BucketClass> for BucketClassColumns {
    fn headers(&self, _wide: bool) -> Vec<String> {
        headers(&["Name", "TPS", "IOPS"], &[], false)
    }

    fn row(&self, class: &BucketClass, _wide: bool) -> Vec<String> {
        let capabilities = class.capabilities.unwrap_or_default();
        vec![
            class.name.clone(),
            capabilities.tps.to_string(),
            capabilities.iops.to_string(),
        ]
    }
}

/// Runs a bucket command.
pub async fn run(session: &Session, command: BucketCommand, out: &mut dyn Write) -> Result<()> {
    let mut client = clients::bucket(session.connect(RuntimeKind::Bucket).await?);
    let printer = session.printer();
    match command {
        BucketCommand::Get(BucketGet::Bucket(args)) => {
            let filter = list_filter(&args, |id, label_selector| BucketFilter { id, label_selector });
            let request = session.request(ListBucketsRequest { filter });
            let buckets = session
                .call("ListBuckets", client.list_buckets(request))
                .await?
                .buckets;
            printer.found(out, "bucket", args.id.as_deref(), &buckets, &BucketColumns)
        }
        BucketCommand::Get(BucketGet::Bucketclass) => {
            let request = session.request(ListBucketClassesRequest {});
            let classes = session
                .call("ListBucketClasses", client.list_bucket_classes(request))
                .await?
                .bucket_classes;
            printer.list(out, &classes, &BucketClassColumns)
        }
        BucketCommand::Get(BucketGet::Events(args)) => {
            let (from, to) = event_window(args.duration);
            let filter = EventFilter {
                id: String::new(),
                label_selector: selector(&args.labels),
                events_from_time: from,
                events_to_time: to,
            };
            let request = session.request(ListEventsRequest { filter: Some(filter) });
            let events = session
                .call("ListEvents", client.list_events(request))
                .await?
                .events;
            print_events(&printer, out, RuntimeKind::Bucket, &events)
        }
        BucketCommand::Get(BucketGet::Version) => {
            let request = session.request(VersionRequest::default());
            let version = session.call("Version", client.version(request)).await?;
            printer.one(out, &version, &VersionColumns)
        }
        BucketCommand::Create(BucketCreate::Bucket(file)) => {
            let bucket = Input::read(&file.file)?.decode_new(|b: &mut Bucket| &mut b.metadata)?;
            let request = session.request(CreateBucketRequest { bucket: Some(bucket) });
            let response = session
                .call("CreateBucket", client.create_bucket(request))
                .await?;
            session.print_created_response(out, "CreateBucket", "bucket", response.bucket, &BucketColumns)
        }
        BucketCommand::Delete(BucketDelete::Bucket(args)) => {
            session
                .for_each_tolerating_not_found(
                    out,
                    &args.ids,
                    "Bucket",
                    "deleted",
                    "DeleteBucket",
                    |bucket_id| {
                        let mut client = client.clone();
                        let request = session.request(DeleteBucketRequest { bucket_id });
                        async move { client.delete_bucket(request).await }
                    },
                )
                .await
        }
    }
}
