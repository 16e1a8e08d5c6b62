// SPDX-License-Identifier: Apache-2.0
//! A minimal S3 client: PutObject and GetObject, path-style, signed with AWS Signature Version
//! 4 in the `Authorization` header, over hyper's pooled HTTP/1.1 client (keep-alive, one
//! connection per request in flight, shared by every task of a measurement).
//!
//! Why not an SDK: the AWS SDK is a large dependency tree for two calls, and the benchmark should
//! measure the provider, not an SDK. The requests are the ones SDKs send over plain http: the
//! payload's SHA-256 in `x-amz-content-sha256` (signed), `Content-Length`, no chunked encoding.
//! The body's hash is computed once per body by the caller ([`Body`]), since every object of a
//! size carries the same bytes; SDKs hash each upload, the server verifies each one either way.

use std::time::SystemTime;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use sha2::{Digest, Sha256};

use crate::system::rfc3339;

/// The SHA-256 of an empty payload (GET), as S3 expects it in `x-amz-content-sha256`.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Bucket credentials and addressing, as `status.access` hands them out.
#[derive(Debug, Clone)]
pub struct Access {
    /// `http://host:port`.
    pub endpoint: String,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// `BUCKET_NAME`.
    pub bucket: String,
    /// `BUCKET_REGION`.
    pub region: String,
}

/// An object body with its SHA-256 (hex), computed once.
#[derive(Debug, Clone)]
pub struct Body {
    /// The bytes.
    pub data: Bytes,
    /// Hex SHA-256 of `data`.
    pub sha256: String,
}

impl Body {
    /// `data` and its hash.
    pub fn new(data: Bytes) -> Body {
        let sha256 = hex(&Sha256::digest(&data));
        Body { data, sha256 }
    }
}

/// A signed S3 client of one bucket; cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct S3Client {
    http: HyperClient<HttpConnector, Full<Bytes>>,
    access: Access,
    /// `host:port` of the endpoint: the `Host` header, which is signed.
    host: String,
}

impl S3Client {
    /// A client of `access`'s bucket; only `http://` endpoints (the provider serves plain HTTP).
    pub fn new(access: Access) -> Result<S3Client> {
        let uri: Uri = access
            .endpoint
            .parse()
            .with_context(|| format!("endpoint {:?} is not a URL", access.endpoint))?;
        if uri.scheme_str() != Some("http") {
            bail!("endpoint {:?}: only http:// is supported", access.endpoint);
        }
        let host = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| anyhow!("endpoint {:?} has no host", access.endpoint))?;
        let mut connector = HttpConnector::new();
        // As SDKs do: without it a small PUT's body waits for the ACK of its headers (Nagle
        // against delayed ACKs), which would add ~40 ms to every request.
        connector.set_nodelay(true);
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(usize::MAX)
            .build(connector);
        Ok(S3Client { http, access, host })
    }

    /// PutObject of `body` as `key`.
    pub async fn put(&self, key: &str, body: &Body) -> Result<()> {
        let response = self
            .send(Method::PUT, key, body.data.clone(), &body.sha256)
            .await
            .with_context(|| format!("PUT {key}"))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("PUT {key}: reading the answer"))?
            .to_bytes();
        check_status("PUT", key, status, &bytes)
    }

    /// GetObject of `key`: its bytes.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let response = self
            .send(Method::GET, key, Bytes::new(), EMPTY_SHA256)
            .await
            .with_context(|| format!("GET {key}"))?;
        let status = response.status();
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let bytes = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("GET {key}: reading the body"))?
            .to_bytes();
        check_status("GET", key, status, &bytes)?;
        if let Some(declared) = declared
            && declared != bytes.len()
        {
            bail!(
                "GET {key}: received {} bytes, Content-Length says {declared}",
                bytes.len()
            );
        }
        Ok(bytes)
    }

    async fn send(
        &self,
        method: Method,
        key: &str,
        body: Bytes,
        payload_sha256: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let path = format!("/{}/{}", uri_encode(&self.access.bucket), uri_encode(key));
        let amz_date = amz_date(SystemTime::now());
        let authorization = authorization(
            &SigningInput {
                method: method.as_str(),
                path: &path,
                query: "",
                headers: &[
                    ("host", &self.host),
                    ("x-amz-content-sha256", payload_sha256),
                    ("x-amz-date", &amz_date),
                ],
                payload_sha256,
                amz_date: &amz_date,
            },
            &self.access.access_key_id,
            &self.access.secret_access_key,
            &self.access.region,
        );
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.access.endpoint.trim_end_matches('/')))
            .header(header::HOST, &self.host)
            .header("x-amz-content-sha256", payload_sha256)
            .header("x-amz-date", &amz_date)
            .header(header::AUTHORIZATION, authorization)
            .header(header::CONTENT_LENGTH, body.len())
            .body(Full::new(body))
            .context("building the request")?;
        self.http.request(request).await.map_err(|e| anyhow!("{e:?}"))
    }
}

/// Fails on anything but 2xx, with S3's error document (it names the error code).
fn check_status(op: &str, key: &str, status: StatusCode, body: &[u8]) -> Result<()> {
    if status.is_success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(1024)]);
    bail!("{op} {key}: HTTP {status}: {}", text.trim())
}

/// What a SigV4 signature covers.
#[derive(Debug, Clone, Copy)]
pub struct SigningInput<'a> {
    /// `GET`, `PUT`.
    pub method: &'a str,
    /// The URI-encoded absolute path.
    pub path: &'a str,
    /// The canonical query string (sorted, encoded); empty here.
    pub query: &'a str,
    /// Every signed header (names in any case; `host` must be one of them).
    pub headers: &'a [(&'a str, &'a str)],
    /// Hex SHA-256 of the payload (the value of `x-amz-content-sha256`).
    pub payload_sha256: &'a str,
    /// `YYYYMMDDTHHMMSSZ`.
    pub amz_date: &'a str,
}

/// The `Authorization` header of a request signed with SigV4 for service `s3`.
pub fn authorization(input: &SigningInput<'_>, access_key_id: &str, secret: &str, region: &str) -> String {
    let mut headers: Vec<(String, String)> = input
        .headers
        .iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), collapse_spaces(value)))
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
    let signed_headers = headers
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed_headers}\n{}",
        input.method, input.path, input.query, input.payload_sha256
    );
    let date = &input.amz_date[..input.amz_date.len().min(8)];
    let scope = format!("{date}/{region}/s3/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        input.amz_date,
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let mut key = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    for part in [region, "s3", "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let signature = hex(&hmac(&key, string_to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={access_key_id}/{scope},SignedHeaders={signed_headers},Signature={signature}"
    )
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Trims a header value and collapses runs of spaces, as SigV4's canonical headers want.
fn collapse_spaces(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Percent-encodes everything but RFC 3986's unreserved characters and `/` (S3's canonical URI:
/// encoded once, slashes kept).
pub fn uri_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `time` as SigV4's `YYYYMMDDTHHMMSSZ`.
pub fn amz_date(time: SystemTime) -> String {
    rfc3339(time).replace(['-', ':'], "")
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    /// The "GET Object" example of AWS's "Signature Calculations for the Authorization Header"
    /// (S3 API reference, sig-v4-header-based-auth): its published signature.
    #[test]
    fn signs_aws_published_get_example() {
        let input = SigningInput {
            method: "GET",
            path: "/test.txt",
            query: "",
            headers: &[
                ("Host", "examplebucket.s3.amazonaws.com"),
                ("Range", "bytes=0-9"),
                ("x-amz-content-sha256", EMPTY_SHA256),
                ("x-amz-date", "20130524T000000Z"),
            ],
            payload_sha256: EMPTY_SHA256,
            amz_date: "20130524T000000Z",
        };
        assert_eq!(
            authorization(
                &input,
                "AKIAIOSFODNN7EXAMPLE",
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "us-east-1"
            ),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,\
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,\
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn encodes_keys_and_dates() {
        assert_eq!(uri_encode("bench/4 KiB/000001"), "bench/4%20KiB/000001");
        assert_eq!(uri_encode("a+b=c~d"), "a%2Bb%3Dc~d");
        assert_eq!(
            amz_date(UNIX_EPOCH + Duration::from_secs(1_369_353_600)),
            "20130524T000000Z"
        );
        assert_eq!(hex(&Sha256::digest(b"")), EMPTY_SHA256);
        assert_eq!(collapse_spaces("  a   b "), "a b");
    }
}
