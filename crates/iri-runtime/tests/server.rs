// SPDX-License-Identifier: Apache-2.0
//! The server bootstrap against real sockets: permissions, stale-socket handling, health,
//! reflection, metrics and graceful shutdown.

use std::{os::unix::fs::PermissionsExt, sync::Arc, time::Duration};

use iri_api::bucket::v1alpha1::{
    bucket_runtime_server::{BucketRuntime, BucketRuntimeServer},
    *,
};
use iri_runtime::{
    Error,
    metrics::Metrics,
    server::{ListenAddress, RuntimeServer, ServeOptions},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status};

/// The smallest BucketRuntime: enough to see RPCs flow through the bootstrap.
struct Minimal;

#[tonic::async_trait]
impl BucketRuntime for Minimal {
    async fn version(&self, _: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            runtime_name: "minimal".into(),
            runtime_version: "0.1.0".into(),
        }))
    }
    async fn list_events(
        &self,
        _: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        Ok(Response::new(ListEventsResponse::default()))
    }
    async fn list_buckets(
        &self,
        _: Request<ListBucketsRequest>,
    ) -> Result<Response<ListBucketsResponse>, Status> {
        Ok(Response::new(ListBucketsResponse::default()))
    }
    async fn create_bucket(
        &self,
        _: Request<CreateBucketRequest>,
    ) -> Result<Response<CreateBucketResponse>, Status> {
        Err(Error::required("bucket").into())
    }
    async fn delete_bucket(
        &self,
        r: Request<DeleteBucketRequest>,
    ) -> Result<Response<DeleteBucketResponse>, Status> {
        Err(Error::not_found("bucket", r.into_inner().bucket_id).into())
    }
    async fn list_bucket_classes(
        &self,
        _: Request<ListBucketClassesRequest>,
    ) -> Result<Response<ListBucketClassesResponse>, Status> {
        Ok(Response::new(ListBucketClassesResponse::default()))
    }
}

async fn start(
    address: ListenAddress,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<iri_runtime::Result<()>>,
    Option<std::net::SocketAddr>,
    Option<std::net::SocketAddr>,
) {
    let mut options = ServeOptions::new(address);
    options.metrics_address = Some("127.0.0.1:0".parse().unwrap());
    let bound = RuntimeServer::new(options, Arc::new(Metrics::new()))
        .add_service(BucketRuntimeServer::new(Minimal))
        .bind()
        .await
        .unwrap();
    let metrics = bound.metrics_address();
    let tcp = bound.tcp_address();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(bound.serve(async move {
        let _ = rx.await;
    }));
    (tx, task, metrics, tcp)
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

#[tokio::test]
async fn serves_on_a_private_socket_with_health_reflection_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/iri-bucket.sock");
    let (stop, task, metrics_addr, _) = start(ListenAddress::Unix(path.clone())).await;

    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // Nothing of the staging directory is left behind.
    assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);

    let channel = iri_api::Endpoint::Unix(path.clone())
        .connect(Duration::from_secs(2))
        .await
        .unwrap();
    let mut client = iri_api::endpoint::clients::bucket(channel.clone());
    assert_eq!(
        client
            .version(VersionRequest::default())
            .await
            .unwrap()
            .into_inner()
            .runtime_name,
        "minimal"
    );
    let err = client
        .delete_bucket(DeleteBucketRequest {
            bucket_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "bucket.v1alpha1.BucketRuntime".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"bucket.v1alpha1.BucketRuntime".to_string()),
        "{names:?}"
    );

    let text = http_get(metrics_addr.unwrap(), "/metrics").await;
    assert!(text.contains("200 OK"), "{text}");
    assert!(text.contains(
        r#"iri_operations_seconds_count{service="bucket.v1alpha1.BucketRuntime",method="DeleteBucket",code="NotFound"} 1"#
    ), "{text}");
    assert!(text.contains(r#"method="Version",code="OK"} 1"#), "{text}");

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(!path.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn replaces_stale_sockets_but_never_live_ones_or_other_files() {
    let dir = tempfile::tempdir().unwrap();

    // A stale socket: bound, then its listener dropped (as after kill -9).
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let (stop, task, _, _) = start(ListenAddress::Unix(stale.clone())).await;

    // A live socket: the server we just started.
    let err = RuntimeServer::new(
        ServeOptions::new(ListenAddress::Unix(stale.clone())),
        Arc::new(Metrics::new()),
    )
    .bind()
    .await
    .err()
    .expect("binding over a live socket must fail");
    assert!(err.to_string().contains("in use by a running server"), "{err}");
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();

    // A regular file is never deleted.
    let file = dir.path().join("data.sock");
    std::fs::write(&file, b"precious").unwrap();
    let err = RuntimeServer::new(
        ServeOptions::new(ListenAddress::Unix(file.clone())),
        Arc::new(Metrics::new()),
    )
    .bind()
    .await
    .err()
    .expect("binding over a regular file must fail");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

#[tokio::test]
async fn serves_over_tcp() {
    let (stop, task, _, tcp) = start(ListenAddress::Tcp("127.0.0.1:0".parse().unwrap())).await;
    let channel = iri_api::Endpoint::Tcp(tcp.unwrap().to_string())
        .connect(Duration::from_secs(2))
        .await
        .unwrap();
    let mut client = iri_api::endpoint::clients::bucket(channel);
    let err = client
        .create_bucket(CreateBucketRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "invalid bucket: must be set");
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
