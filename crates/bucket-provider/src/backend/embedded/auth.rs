// SPDX-License-Identifier: Apache-2.0
//! Who may do what: per-bucket key pairs (SigV4 header and presigned-URL signatures are
//! verified by `s3s` with the secret looked up here), the rule that a key pair opens its own
//! bucket only, the class rate limits, and virtual-host addressing.

use std::sync::{Arc, Mutex, PoisonError};

use s3s::{
    S3Result,
    access::{S3Access, S3AccessContext},
    auth::{S3Auth, SecretKey},
    host::{S3Host, VirtualHost},
    path::S3Path,
    s3_error,
};

use super::storage::Storage;

/// Looks up a bucket's secret by its access key id.
#[derive(Debug, Clone)]
pub struct BucketAuth {
    storage: Arc<Storage>,
}

impl BucketAuth {
    /// Authentication over the key pairs of `storage`'s buckets.
    pub fn new(storage: Arc<Storage>) -> Self {
        BucketAuth { storage }
    }
}

#[async_trait::async_trait]
impl S3Auth for BucketAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        match self.storage.bucket_of_key(access_key) {
            Some(bucket) => Ok(SecretKey::from(bucket.keys.secret_access_key.as_str())),
            // Also what a deleted bucket's keys get: they are revoked with it.
            None => Err(s3_error!(InvalidAccessKeyId, "the access key id does not exist")),
        }
    }
}

/// The operation name of the current request, filled in by [`BucketAccess`] for the request
/// metrics. Inserted into the request's extensions by the HTTP layer.
#[derive(Debug, Clone, Default)]
pub struct OperationSlot(pub Arc<Mutex<Option<String>>>);

impl OperationSlot {
    /// The recorded operation name, if any.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set(&self, name: &str) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(name.to_string());
    }
}

/// Operations that move object data, limited by the class's `iops`.
const DATA_OPERATIONS: &[&str] = &[
    "GetObject",
    "PutObject",
    "CopyObject",
    "UploadPart",
    "UploadPartCopy",
];

/// Authorization: a signed request may touch its key pair's bucket only, within its class
/// limits.
#[derive(Debug, Clone)]
pub struct BucketAccess {
    storage: Arc<Storage>,
}

impl BucketAccess {
    /// Authorization over `storage`'s buckets.
    pub fn new(storage: Arc<Storage>) -> Self {
        BucketAccess { storage }
    }
}

#[async_trait::async_trait]
impl S3Access for BucketAccess {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let operation = cx.s3_op().name().to_string();
        if let Some(slot) = cx.extensions_mut().get::<OperationSlot>() {
            slot.set(&operation);
        }
        let Some(credentials) = cx.credentials() else {
            return Err(s3_error!(
                AccessDenied,
                "anonymous access is not allowed; sign the request"
            ));
        };
        let Some(own) = self.storage.bucket_of_key(&credentials.access_key) else {
            return Err(s3_error!(InvalidAccessKeyId, "the access key id does not exist"));
        };
        match cx.s3_path() {
            // ListBuckets: answered with the key pair's own bucket only.
            S3Path::Root => {}
            S3Path::Bucket { bucket } | S3Path::Object { bucket, .. } => {
                if **bucket != *own.name {
                    return Err(s3_error!(
                        AccessDenied,
                        "these credentials are not valid for this bucket"
                    ));
                }
            }
        }
        if !own.limiter.admit(DATA_OPERATIONS.contains(&operation.as_str())) {
            return Err(s3_error!(
                SlowDown,
                "the bucket's request rate limit is exceeded; slow down"
            ));
        }
        Ok(())
    }
}

/// Virtual-host addressing: `Host: <bucket>.<domain>[:port]` names the bucket; any other host
/// (an IP address, the domain itself, localhost) is path-style. Unlike `s3s`'s `SingleDomain`,
/// a host outside the domain is never taken for a bucket name, so path-style requests to
/// `127.0.0.1:<port>` keep working when a domain is configured.
#[derive(Debug, Clone)]
pub struct VirtualHosts {
    domain: String,
}

impl VirtualHosts {
    /// Virtual hosts under `domain` (e.g. `s3.example.com`).
    pub fn new(domain: &str) -> Self {
        VirtualHosts {
            domain: domain.to_ascii_lowercase(),
        }
    }
}

/// `host` without a `:port` suffix (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

impl S3Host for VirtualHosts {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<VirtualHost<'a>> {
        let name = strip_port(host);
        if let Some(bucket) = name
            .strip_suffix(self.domain.as_str())
            .and_then(|h| h.strip_suffix('.'))
            .filter(|b| !b.is_empty())
        {
            return Ok(VirtualHost::new(self.domain.as_str()).with_bucket(bucket.to_ascii_lowercase()));
        }
        Ok(VirtualHost::new(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_hosts_name_buckets_only_under_the_domain() {
        let hosts = VirtualHosts::new("s3.test");
        let bucket = |h: &str| hosts.parse_host_header(h).unwrap().bucket().map(str::to_string);
        assert_eq!(bucket("abc.s3.test:7480").as_deref(), Some("abc"));
        assert_eq!(bucket("abc.s3.test").as_deref(), Some("abc"));
        assert_eq!(bucket("s3.test:7480"), None);
        assert_eq!(bucket("127.0.0.1:7480"), None);
        assert_eq!(bucket("[::1]:7480"), None);
        assert_eq!(bucket("localhost"), None);
        assert_eq!(bucket(".s3.test"), None);
    }
}
