// SPDX-License-Identifier: Apache-2.0
//! Protocol framing against a small in-test WebSocket server (a test double of an exec
//! server: it records what the client sends and replays scripted messages).

use std::time::Duration;

use tokio::{net::TcpListener, sync::mpsc};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

use super::*;

/// How the test server answers the upgrade.
#[derive(Clone)]
enum Answer {
    /// Accept with this subprotocol (or none).
    Protocol(Option<&'static str>),
    /// Refuse with HTTP 404.
    NotFound,
}

/// Serves one connection: sends `script` after the upgrade, then forwards every message the
/// client sends to the returned receiver (until the client closes).
async fn serve(answer: Answer, script: Vec<Message>) -> (String, mpsc::UnboundedReceiver<Message>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/exec/token", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        // The error type is tungstenite's `Callback` signature, not ours to shrink.
        #[allow(clippy::result_large_err)]
        let callback = move |request: &Request, mut response: Response| {
            let offered = request
                .headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            assert_eq!(offered, "v5.channel.k8s.io, v4.channel.k8s.io");
            match &answer {
                Answer::Protocol(Some(p)) => {
                    response
                        .headers_mut()
                        .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
                    Ok(response)
                }
                Answer::Protocol(None) => Ok(response),
                Answer::NotFound => {
                    let mut refusal = tokio_tungstenite::tungstenite::handshake::server::ErrorResponse::new(
                        Some("unknown or expired exec session\n".into()),
                    );
                    *refusal.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::NOT_FOUND;
                    Err(refusal)
                }
            }
        };
        let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
            return;
        };
        for message in script {
            socket.send(message).await.unwrap();
        }
        while let Some(Ok(message)) = socket.next().await {
            let close = matches!(message, Message::Close(_));
            let _ = tx.send(message);
            if close {
                break;
            }
        }
    });
    (url, rx)
}

fn binary(channel: u8, bytes: &[u8]) -> Message {
    Message::Binary(frame(channel, bytes).into())
}

async fn received(rx: &mut mpsc::UnboundedReceiver<Message>) -> Message {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the server got nothing")
        .expect("the server stopped")
}

#[tokio::test]
async fn v5_session_frames_every_channel() {
    let status =
        r#"{"metadata":{},"status":"Failure","message":"the machine stopped","reason":"InternalError"}"#;
    let (url, mut rx) = serve(
        Answer::Protocol(Some("v5.channel.k8s.io")),
        vec![
            // kubelet's "session established" empty stdout frame: not reported.
            binary(channel::STDOUT, b""),
            binary(channel::STDOUT, b"hello"),
            binary(channel::STDERR, b"oops"),
            // Unknown channels and empty messages are skipped, never a panic.
            binary(7, b"future"),
            Message::Binary(Bytes::new()),
            Message::Text("\u{1}text-out".into()),
            binary(channel::ERROR, status.as_bytes()),
            Message::Close(None),
        ],
    )
    .await;
    let session = Session::connect(&url).await.unwrap();
    assert_eq!(session.protocol(), Protocol::V5);
    let (mut writer, mut reader) = session.split();

    writer.send_stdin(b"uname -r\n").await.unwrap();
    writer.send_stdin(b"").await.unwrap();
    writer.resize(120, 40).await.unwrap();
    assert!(writer.close_stdin().await.unwrap());
    assert_eq!(received(&mut rx).await, binary(0, b"uname -r\n"));
    let Message::Binary(resize) = received(&mut rx).await else {
        panic!("resize is binary");
    };
    assert_eq!(resize[0], channel::RESIZE);
    let size: serde_json::Value = serde_json::from_slice(&resize[1..]).unwrap();
    assert_eq!(size, serde_json::json!({"Width": 120, "Height": 40}));
    assert_eq!(received(&mut rx).await, Message::Binary(vec![255, 0].into()));

    let mut outputs = Vec::new();
    while let Some(output) = reader.next().await {
        outputs.push(output.unwrap());
    }
    assert_eq!(
        outputs,
        [
            Output::Stdout(Bytes::from_static(b"hello")),
            Output::Stderr(Bytes::from_static(b"oops")),
            Output::Stdout(Bytes::from_static(b"text-out")),
            Output::Error("the machine stopped".into()),
        ]
    );
    // After the end, the reader stays ended.
    assert!(reader.next().await.is_none());
    writer.close().await.unwrap();
}

#[tokio::test]
async fn v4_session_cannot_close_stdin() {
    let (url, mut rx) = serve(Answer::Protocol(Some("v4.channel.k8s.io")), vec![]).await;
    let session = Session::connect(&url.replace("http://", "ws://")).await.unwrap();
    assert_eq!(session.protocol(), Protocol::V4);
    let (mut writer, _reader) = session.split();
    assert!(!writer.close_stdin().await.unwrap(), "v4 has no close channel");
    writer.send_stdin(b"x").await.unwrap();
    assert_eq!(received(&mut rx).await, binary(0, b"x"));
    writer.close().await.unwrap();
    assert!(matches!(received(&mut rx).await, Message::Close(_)));
}

#[tokio::test]
async fn refuses_a_server_without_our_subprotocol() {
    let (url, _rx) = serve(Answer::Protocol(None), vec![]).await;
    let err = Session::connect(&url).await.unwrap_err();
    assert!(matches!(err, Error::Subprotocol { .. }), "{err:?}");
    assert!(err.to_string().contains("it chose none"), "{err}");
}

#[tokio::test]
async fn http_errors_carry_status_and_body() {
    let (url, _rx) = serve(Answer::NotFound, vec![]).await;
    let err = Session::connect(&url).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the exec server answered 404 Not Found: unknown or expired exec session"
    );
}

#[tokio::test]
async fn connection_refused_is_an_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/exec/x", listener.local_addr().unwrap());
    drop(listener);
    assert!(matches!(
        Session::connect(&url).await.unwrap_err(),
        Error::WebSocket(_)
    ));
}

#[test]
fn urls_map_to_websocket_schemes() {
    assert_eq!(websocket_url("http://h:1/exec/t").unwrap(), "ws://h:1/exec/t");
    assert_eq!(websocket_url("HTTPS://h/exec/t").unwrap(), "wss://h/exec/t");
    assert_eq!(websocket_url("ws://h/x").unwrap(), "ws://h/x");
    assert_eq!(websocket_url("wss://h/x").unwrap(), "wss://h/x");
    for bad in ["", "/exec/t", "ftp://h/x", "http://", "http:///x"] {
        assert!(websocket_url(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn wss_urls_build_a_tls_client() {
    // Nothing listens on port 1: the point is that TLS setup itself works (no panic about a
    // missing crypto provider) and the failure is a connection error.
    let err = Session::connect("https://127.0.0.1:1/exec/t").await.unwrap_err();
    assert!(matches!(err, Error::WebSocket(_)), "{err:?}");
}

#[test]
fn error_channel_statuses() {
    assert_eq!(decode(Bytes::from_static(b"\x03{\"status\":\"Success\"}")), None);
    assert_eq!(
        decode(Bytes::from_static(
            b"\x03{\"status\":\"Failure\",\"reason\":\"NonZeroExitCode\"}"
        )),
        Some(Output::Error("NonZeroExitCode".into()))
    );
    assert_eq!(
        decode(Bytes::from_static(b"\x03plain failure\n")),
        Some(Output::Error("plain failure".into()))
    );
    assert_eq!(decode(Bytes::from_static(b"\x03")), None);
    assert_eq!(decode(Bytes::new()), None);
}
