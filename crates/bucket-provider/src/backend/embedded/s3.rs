// SPDX-License-Identifier: Apache-2.0
//! The S3 operations, over [`Storage`]. `s3s` does the protocol (routing, XML, headers,
//! SigV4); this file maps each operation to the storage and back. Operations not implemented
//! here answer `NotImplemented` (the `s3s` default).

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Seek, SeekFrom, Write},
    path::PathBuf,
    sync::Arc,
};

use base64::Engine;
use futures::StreamExt;
use md5::{Digest, Md5};
use s3s::{
    S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, TrailingHeaders,
    checksum::ChecksumHasher,
    crypto::{Checksum as _, Crc32, Crc32c, Crc64Nvme, Sha1, Sha256},
    dto::{self, ETag, StreamingBlob, Timestamp},
    s3_error,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::storage::{
    BucketData, Listing, ObjectHeaders, ObjectMeta, PartMeta, Storage, Upload, finish_file, hex, now_nanos,
};

/// Longest object key S3 accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Smallest part of a multipart upload except the last (S3's rule; clients size parts by it).
pub const MIN_PART_BYTES: u64 = 5 << 20;
/// Most parts of a multipart upload.
pub const MAX_PARTS: i32 = 10_000;
/// Largest single PUT and largest part, as in S3: larger uploads are refused before they fill
/// the disk.
pub const MAX_UPLOAD_BYTES: u64 = 5 << 30;
/// Received data is written to disk in batches of this size.
const WRITE_BATCH: usize = 1 << 20;
/// Most keys a list returns per page.
const MAX_LIST_KEYS: usize = 1000;

/// The S3 API over the embedded storage.
#[derive(Debug, Clone)]
pub struct S3Api {
    storage: Arc<Storage>,
    region: String,
}

fn internal(err: impl std::fmt::Display) -> S3Error {
    tracing::error!(%err, "S3 storage error");
    S3Error::with_message(S3ErrorCode::InternalError, "internal storage error")
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> S3Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(internal)?
        .map_err(internal)
}

/// Refuses keys that are empty, too long, or look like paths that leave the bucket: a NUL, a
/// leading `/`, or a `.`/`..` segment. The storage never uses keys as paths anyway (see
/// `storage`); refusing them keeps clients from relying on keys that break file-based tools.
pub fn check_key(key: &str) -> S3Result<()> {
    if key.is_empty() {
        return Err(s3_error!(InvalidArgument, "the object key must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(s3_error!(
            KeyTooLongError,
            "the object key is longer than {MAX_KEY_BYTES} bytes"
        ));
    }
    if key.contains('\0') {
        return Err(s3_error!(
            InvalidArgument,
            "the object key contains a NUL character"
        ));
    }
    if key.starts_with('/') {
        return Err(s3_error!(
            InvalidArgument,
            "the object key must not start with '/'"
        ));
    }
    if key.split('/').any(|segment| segment == ".." || segment == ".") {
        return Err(s3_error!(
            InvalidArgument,
            "the object key must not contain '.' or '..' segments"
        ));
    }
    Ok(())
}

/// Removes a temporary file unless disarmed: a failed upload leaves nothing behind.
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The flexible checksums (`x-amz-checksum-*`) a request asks to be verified, as headers or as
/// trailers of an `aws-chunked` body, and the hashers computing them over the body.
struct Checksums {
    hasher: ChecksumHasher,
    declared: dto::Checksum,
}

/// The checksums a request declares: PutObjectInput and UploadPartInput carry the same fields
/// under the same names, as two types.
macro_rules! declared_checksums {
    ($input:expr) => {
        DeclaredChecksums {
            algorithm: $input.checksum_algorithm.as_ref(),
            crc32: $input.checksum_crc32.clone(),
            crc32c: $input.checksum_crc32c.clone(),
            crc64nvme: $input.checksum_crc64nvme.clone(),
            sha1: $input.checksum_sha1.clone(),
            sha256: $input.checksum_sha256.clone(),
        }
    };
}

/// The checksum fields every upload input carries.
struct DeclaredChecksums<'a> {
    algorithm: Option<&'a dto::ChecksumAlgorithm>,
    crc32: Option<String>,
    crc32c: Option<String>,
    crc64nvme: Option<String>,
    sha1: Option<String>,
    sha256: Option<String>,
}

impl Checksums {
    /// Hashers for every algorithm the request names: in a checksum header, as its SDK
    /// checksum algorithm, or as an announced trailer.
    fn new(declared: DeclaredChecksums<'_>, headers: &http::HeaderMap) -> Self {
        let trailer = headers
            .get("x-amz-trailer")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let algorithm = declared
            .algorithm
            .map(|a| a.as_str().to_ascii_uppercase())
            .unwrap_or_default();
        let wants = |name: &str, header: &Option<String>| {
            header.is_some()
                || algorithm == name.to_ascii_uppercase()
                || trailer.contains(&format!("x-amz-checksum-{name}"))
        };
        let hasher = ChecksumHasher {
            crc32: wants("crc32", &declared.crc32).then(Crc32::new),
            crc32c: wants("crc32c", &declared.crc32c).then(Crc32c::new),
            sha1: wants("sha1", &declared.sha1).then(Sha1::new),
            sha256: wants("sha256", &declared.sha256).then(Sha256::new),
            crc64nvme: wants("crc64nvme", &declared.crc64nvme).then(Crc64Nvme::new),
        };
        Checksums {
            hasher,
            declared: dto::Checksum {
                checksum_crc32: declared.crc32,
                checksum_crc32c: declared.crc32c,
                checksum_crc64nvme: declared.crc64nvme,
                checksum_sha1: declared.sha1,
                checksum_sha256: declared.sha256,
                ..Default::default()
            },
        }
    }

    /// Compares what was computed with what the headers or trailers declared; BadDigest on a
    /// mismatch. Returns the computed checksums.
    fn verify(self, trailers: Option<&TrailingHeaders>) -> S3Result<dto::Checksum> {
        let computed = self.hasher.finalize();
        let trailer = |name: &str| -> Option<String> {
            trailers
                .and_then(|t| t.read(|h| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)))
                .flatten()
        };
        for (name, declared, computed) in [
            (
                "x-amz-checksum-crc32",
                &self.declared.checksum_crc32,
                &computed.checksum_crc32,
            ),
            (
                "x-amz-checksum-crc32c",
                &self.declared.checksum_crc32c,
                &computed.checksum_crc32c,
            ),
            (
                "x-amz-checksum-crc64nvme",
                &self.declared.checksum_crc64nvme,
                &computed.checksum_crc64nvme,
            ),
            (
                "x-amz-checksum-sha1",
                &self.declared.checksum_sha1,
                &computed.checksum_sha1,
            ),
            (
                "x-amz-checksum-sha256",
                &self.declared.checksum_sha256,
                &computed.checksum_sha256,
            ),
        ] {
            let Some(computed) = computed else { continue };
            if let Some(expected) = declared.clone().or_else(|| trailer(name))
                && expected != *computed
            {
                return Err(s3_error!(
                    BadDigest,
                    "the {name} checksum does not match the data"
                ));
            }
        }
        Ok(computed)
    }
}

/// A body received into a temporary file.
struct Received {
    guard: TempGuard,
    path: PathBuf,
    file: std::fs::File,
    /// Received data not written to `file` yet.
    pending: Vec<u8>,
    md5: [u8; 16],
    size: u64,
    checksums: dto::Checksum,
}

/// Streams `body` into a new temporary file of `bucket`, computing its MD5, and checks it
/// against the declared length and `Content-MD5`.
async fn receive(
    bucket: &BucketData,
    body: Option<StreamingBlob>,
    content_length: Option<i64>,
    content_md5: Option<&str>,
    mut checksums: Checksums,
    trailers: Option<&TrailingHeaders>,
) -> S3Result<Received> {
    if content_length.is_some_and(|n| u64::try_from(n).unwrap_or(0) > MAX_UPLOAD_BYTES) {
        return Err(s3_error!(
            EntityTooLarge,
            "at most {MAX_UPLOAD_BYTES} bytes per upload"
        ));
    }
    let (path, file) = bucket.temp_file().map_err(internal)?;
    let guard = TempGuard(Some(path.clone()));
    // Data is written in batches from a blocking thread; the last batch is written together
    // with the trailer and the commit, so a small object costs a single blocking hop.
    let mut file = Some(file);
    let mut pending = Vec::new();
    let mut md5 = Md5::new();
    let mut size = 0u64;
    if let Some(mut body) = body {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| s3_error!(IncompleteBody, "reading the request body: {e}"))?;
            md5.update(&chunk);
            checksums.hasher.update(&chunk);
            size += chunk.len() as u64;
            if size > MAX_UPLOAD_BYTES {
                return Err(s3_error!(
                    EntityTooLarge,
                    "at most {MAX_UPLOAD_BYTES} bytes per upload"
                ));
            }
            pending.extend_from_slice(&chunk);
            if pending.len() >= WRITE_BATCH {
                let (mut f, batch) = (
                    file.take().ok_or_else(|| internal("no file"))?,
                    std::mem::take(&mut pending),
                );
                let (f, mut batch) = blocking(move || f.write_all(&batch).map(|()| (f, batch))).await?;
                batch.clear();
                pending = batch;
                file = Some(f);
            }
        }
    }
    let file = file.ok_or_else(|| internal("no file"))?;
    if let Some(declared) = content_length
        && u64::try_from(declared).ok() != Some(size)
    {
        return Err(s3_error!(
            IncompleteBody,
            "received {size} bytes, Content-Length says {declared}"
        ));
    }
    let digest: [u8; 16] = md5.finalize().into();
    if let Some(expected) = content_md5 {
        let expected = base64::engine::general_purpose::STANDARD
            .decode(expected)
            .map_err(|_| s3_error!(InvalidDigest, "Content-MD5 is not base64"))?;
        if expected != digest {
            return Err(s3_error!(BadDigest, "the Content-MD5 does not match the data"));
        }
    }
    let checksums = checksums.verify(trailers)?;
    Ok(Received {
        guard,
        path,
        file,
        pending,
        md5: digest,
        size,
        checksums,
    })
}

/// Finishes a received body as object `meta` and commits it.
async fn commit(bucket: Arc<BucketData>, mut received: Received, meta: ObjectMeta) -> S3Result<ObjectMeta> {
    let path = received.path.clone();
    let mut file = received.file.try_clone().map_err(internal)?;
    let pending = std::mem::take(&mut received.pending);
    let committed = meta.clone();
    blocking(move || {
        file.write_all(&pending)?;
        finish_file(&mut file, &meta)?;
        bucket.commit(&path, meta)
    })
    .await?;
    received.guard.disarm();
    Ok(committed)
}

fn etag(value: &str) -> ETag {
    ETag::Strong(value.to_string())
}

fn timestamp(meta: &ObjectMeta) -> Timestamp {
    Timestamp::from(meta.modified_time())
}

fn nanos_timestamp(nanos: i64) -> Timestamp {
    Timestamp::from(
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(u64::try_from(nanos).unwrap_or(0)),
    )
}

fn user_metadata(meta: &ObjectMeta) -> Option<dto::Metadata> {
    (!meta.metadata.is_empty()).then(|| meta.metadata.clone().into_iter().collect::<HashMap<_, _>>())
}

fn to_btree(metadata: Option<dto::Metadata>) -> BTreeMap<String, String> {
    metadata
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

/// Percent-encodes for `encoding-type=url` listings: everything but unreserved characters and
/// `/` (what AWS does, and what botocore's `unquote_plus` reverses exactly).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn s3_object(meta: &ObjectMeta, encode: bool) -> dto::Object {
    dto::Object {
        key: Some(if encode {
            url_encode(&meta.key)
        } else {
            meta.key.clone()
        }),
        size: Some(i64::try_from(meta.size).unwrap_or(i64::MAX)),
        e_tag: Some(etag(&meta.etag)),
        last_modified: Some(timestamp(meta)),
        storage_class: Some(dto::ObjectStorageClass::from_static(
            dto::ObjectStorageClass::STANDARD,
        )),
        ..Default::default()
    }
}

fn max_keys(requested: Option<i32>) -> S3Result<usize> {
    match requested {
        None => Ok(MAX_LIST_KEYS),
        Some(n) if n < 0 => Err(s3_error!(InvalidArgument, "max-keys must not be negative")),
        Some(n) => Ok(usize::try_from(n).unwrap_or(0).min(MAX_LIST_KEYS)),
    }
}

fn wants_url_encoding(encoding: &Option<dto::EncodingType>) -> S3Result<bool> {
    match encoding {
        None => Ok(false),
        Some(e) if e.as_str() == dto::EncodingType::URL => Ok(true),
        Some(e) => Err(s3_error!(
            InvalidArgument,
            "unknown encoding-type {:?}",
            e.as_str()
        )),
    }
}

/// The continuation token of a page that ended at `last`: opaque to clients.
fn continuation_token(last: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last.as_bytes())
}

fn parse_continuation_token(token: &str) -> S3Result<String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|raw| String::from_utf8(raw).ok())
        .ok_or_else(|| s3_error!(InvalidArgument, "the continuation token is not one we issued"))
}

fn headers_of(
    content_type: Option<String>,
    content_encoding: Option<String>,
    content_disposition: Option<String>,
    content_language: Option<String>,
    cache_control: Option<String>,
    metadata: Option<dto::Metadata>,
) -> ObjectHeaders {
    ObjectHeaders {
        content_type,
        content_encoding,
        content_disposition,
        content_language,
        cache_control,
        metadata: to_btree(metadata),
    }
}

/// `ETag` of a multipart object: MD5 over the concatenated binary MD5s of its parts, then
/// `-<number of parts>`.
pub fn multipart_etag(part_etags: &[String]) -> Option<String> {
    let mut md5 = Md5::new();
    for part in part_etags {
        let raw: Vec<u8> = (0..part.len())
            .step_by(2)
            .map(|i| part.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<_>>()?;
        md5.update(&raw);
    }
    let digest: [u8; 16] = md5.finalize().into();
    Some(format!("{}-{}", hex(&digest), part_etags.len()))
}

impl S3Api {
    /// The API over `storage`, reporting `region` as every bucket's location.
    pub fn new(storage: Arc<Storage>, region: String) -> Self {
        S3Api { storage, region }
    }

    fn bucket(&self, name: &str) -> S3Result<Arc<BucketData>> {
        self.storage
            .bucket(name)
            .ok_or_else(|| s3_error!(NoSuchBucket, "the bucket does not exist"))
    }

    async fn open(bucket: &Arc<BucketData>, key: &str) -> S3Result<(std::fs::File, ObjectMeta)> {
        let (bucket, key) = (bucket.clone(), key.to_string());
        blocking(move || bucket.open(&key))
            .await?
            .ok_or_else(|| s3_error!(NoSuchKey, "the object does not exist"))
    }

    fn listing(
        bucket: &BucketData,
        prefix: &str,
        delimiter: Option<&str>,
        after: Option<&str>,
        max: usize,
    ) -> Listing {
        if max == 0 {
            return Listing::default();
        }
        bucket.list(prefix, delimiter, after, max)
    }
}

/// The conditional headers of a GET or HEAD.
struct Conditions<'a> {
    if_match: Option<&'a dto::IfMatch>,
    if_none_match: Option<&'a dto::IfNoneMatch>,
    if_modified_since: Option<&'a Timestamp>,
    if_unmodified_since: Option<&'a Timestamp>,
}

/// Evaluates conditional headers as S3 does (RFC 9110 §13.2.2 order: If-Match, then
/// If-Unmodified-Since unless If-Match was given, then If-None-Match, then If-Modified-Since
/// unless If-None-Match was given). Times compare at the second, as HTTP dates carry no more.
fn check_conditions(meta: &ObjectMeta, c: Conditions<'_>) -> S3Result<()> {
    let modified = meta.modified.div_euclid(1_000_000_000);
    let secs = |t: &Timestamp| time::OffsetDateTime::from(t.clone()).unix_timestamp();
    let etag_matches = |tag: Option<&ETag>| tag.is_none_or(|t| t.value() == meta.etag);
    if let Some(condition) = c.if_match {
        if !etag_matches(condition.as_etag()) {
            return Err(s3_error!(
                PreconditionFailed,
                "If-Match does not match the object's ETag"
            ));
        }
    } else if let Some(since) = c.if_unmodified_since
        && modified > secs(since)
    {
        return Err(s3_error!(
            PreconditionFailed,
            "the object was modified since If-Unmodified-Since"
        ));
    }
    if let Some(condition) = c.if_none_match {
        if etag_matches(condition.as_etag()) {
            return Err(S3Error::new(S3ErrorCode::NotModified));
        }
    } else if let Some(since) = c.if_modified_since
        && modified <= secs(since)
    {
        return Err(S3Error::new(S3ErrorCode::NotModified));
    }
    Ok(())
}

#[async_trait::async_trait]
impl S3 for S3Api {
    async fn head_bucket(
        &self,
        req: S3Request<dto::HeadBucketInput>,
    ) -> S3Result<S3Response<dto::HeadBucketOutput>> {
        self.bucket(&req.input.bucket)?;
        Ok(S3Response::new(dto::HeadBucketOutput {
            bucket_region: Some(self.region.clone()),
            ..Default::default()
        }))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<dto::GetBucketLocationInput>,
    ) -> S3Result<S3Response<dto::GetBucketLocationOutput>> {
        self.bucket(&req.input.bucket)?;
        // S3 reports us-east-1 as an empty location constraint.
        let location =
            (self.region != "us-east-1").then(|| dto::BucketLocationConstraint::from(self.region.clone()));
        Ok(S3Response::new(dto::GetBucketLocationOutput {
            location_constraint: location,
        }))
    }

    async fn get_bucket_versioning(
        &self,
        req: S3Request<dto::GetBucketVersioningInput>,
    ) -> S3Result<S3Response<dto::GetBucketVersioningOutput>> {
        // Versioning is not supported: answer what S3 answers for a bucket on which it was
        // never enabled (no status), so tools such as rclone need not guess.
        self.bucket(&req.input.bucket)?;
        Ok(S3Response::new(dto::GetBucketVersioningOutput::default()))
    }

    async fn list_buckets(
        &self,
        req: S3Request<dto::ListBucketsInput>,
    ) -> S3Result<S3Response<dto::ListBucketsOutput>> {
        // A key pair belongs to exactly one bucket: that is all its owner may see.
        let access_key = req
            .credentials
            .as_ref()
            .map(|c| c.access_key.as_str())
            .unwrap_or("");
        let buckets = self
            .storage
            .bucket_of_key(access_key)
            .map(|b| dto::Bucket {
                name: Some(b.name.clone()),
                bucket_region: Some(self.region.clone()),
                ..Default::default()
            })
            .into_iter()
            .collect();
        Ok(S3Response::new(dto::ListBucketsOutput {
            buckets: Some(buckets),
            ..Default::default()
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<dto::PutObjectInput>,
    ) -> S3Result<S3Response<dto::PutObjectOutput>> {
        let checksums = Checksums::new(declared_checksums!(req.input), &req.headers);
        let trailers = req.trailing_headers;
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        check_key(&input.key)?;
        let headers = headers_of(
            input.content_type,
            input.content_encoding,
            input.content_disposition,
            input.content_language,
            input.cache_control,
            input.metadata,
        );
        let received = receive(
            &bucket,
            input.body,
            input.content_length,
            input.content_md5.as_deref(),
            checksums,
            trailers.as_ref(),
        )
        .await?;
        let sums = received.checksums.clone();
        let meta = ObjectMeta::new(&input.key, received.size, hex(&received.md5), headers, None);
        let meta = commit(bucket, received, meta).await?;
        Ok(S3Response::new(dto::PutObjectOutput {
            checksum_crc32: sums.checksum_crc32,
            checksum_crc32c: sums.checksum_crc32c,
            checksum_crc64nvme: sums.checksum_crc64nvme,
            checksum_sha1: sums.checksum_sha1,
            checksum_sha256: sums.checksum_sha256,
            e_tag: Some(etag(&meta.etag)),
            size: Some(i64::try_from(meta.size).unwrap_or(i64::MAX)),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<dto::GetObjectInput>,
    ) -> S3Result<S3Response<dto::GetObjectOutput>> {
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        check_key(&input.key)?;
        if input.part_number.is_some() {
            return Err(s3_error!(
                NotImplemented,
                "GetObject by partNumber is not supported"
            ));
        }
        let (file, meta) = Self::open(&bucket, &input.key).await?;
        check_conditions(
            &meta,
            Conditions {
                if_match: input.if_match.as_ref(),
                if_none_match: input.if_none_match.as_ref(),
                if_modified_since: input.if_modified_since.as_ref(),
                if_unmodified_since: input.if_unmodified_since.as_ref(),
            },
        )?;
        let (start, end) = match input.range {
            Some(range) => {
                let r = range.check(meta.size)?;
                (r.start, r.end)
            }
            None => (0, meta.size),
        };
        let mut file = tokio::fs::File::from_std(file);
        file.seek(SeekFrom::Start(start)).await.map_err(internal)?;
        let body = tokio_util::io::ReaderStream::with_capacity(file.take(end - start), 256 * 1024);
        let content_range = input
            .range
            .is_some()
            .then(|| format!("bytes {start}-{}/{}", end.saturating_sub(1), meta.size));
        Ok(S3Response::new(dto::GetObjectOutput {
            body: Some(StreamingBlob::wrap(body)),
            content_length: Some(i64::try_from(end - start).unwrap_or(i64::MAX)),
            content_range,
            accept_ranges: Some("bytes".to_string()),
            e_tag: Some(etag(&meta.etag)),
            last_modified: Some(timestamp(&meta)),
            content_type: meta.content_type.clone(),
            content_encoding: meta.content_encoding.clone(),
            content_disposition: meta.content_disposition.clone(),
            content_language: meta.content_language.clone(),
            cache_control: meta.cache_control.clone(),
            metadata: user_metadata(&meta),
            parts_count: meta.parts.map(|p| i32::try_from(p).unwrap_or(i32::MAX)),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<dto::HeadObjectInput>,
    ) -> S3Result<S3Response<dto::HeadObjectOutput>> {
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        check_key(&input.key)?;
        let (_, meta) = Self::open(&bucket, &input.key).await?;
        check_conditions(
            &meta,
            Conditions {
                if_match: input.if_match.as_ref(),
                if_none_match: input.if_none_match.as_ref(),
                if_modified_since: input.if_modified_since.as_ref(),
                if_unmodified_since: input.if_unmodified_since.as_ref(),
            },
        )?;
        Ok(S3Response::new(dto::HeadObjectOutput {
            content_length: Some(i64::try_from(meta.size).unwrap_or(i64::MAX)),
            accept_ranges: Some("bytes".to_string()),
            e_tag: Some(etag(&meta.etag)),
            last_modified: Some(timestamp(&meta)),
            content_type: meta.content_type.clone(),
            content_encoding: meta.content_encoding.clone(),
            content_disposition: meta.content_disposition.clone(),
            content_language: meta.content_language.clone(),
            cache_control: meta.cache_control.clone(),
            metadata: user_metadata(&meta),
            parts_count: meta.parts.map(|p| i32::try_from(p).unwrap_or(i32::MAX)),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<dto::DeleteObjectInput>,
    ) -> S3Result<S3Response<dto::DeleteObjectOutput>> {
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        check_key(&input.key)?;
        // Deleting a missing key succeeds, as in S3.
        blocking(move || bucket.remove(&input.key)).await?;
        Ok(S3Response::new(dto::DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<dto::DeleteObjectsInput>,
    ) -> S3Result<S3Response<dto::DeleteObjectsOutput>> {
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        if input.delete.objects.len() > 1000 {
            return Err(s3_error!(
                MalformedXML,
                "at most 1000 keys may be deleted at once"
            ));
        }
        let quiet = input.delete.quiet.unwrap_or(false);
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for object in input.delete.objects {
            let key = object.key;
            if let Err(err) = check_key(&key) {
                errors.push(dto::Error {
                    code: Some(err.code().as_str().to_string()),
                    key: Some(key),
                    message: err.message().map(str::to_string),
                    version_id: None,
                });
                continue;
            }
            let b = bucket.clone();
            let k = key.clone();
            match blocking(move || b.remove(&k)).await {
                Ok(_) => {
                    if !quiet {
                        deleted.push(dto::DeletedObject {
                            key: Some(key),
                            ..Default::default()
                        });
                    }
                }
                Err(err) => errors.push(dto::Error {
                    code: Some(err.code().as_str().to_string()),
                    key: Some(key),
                    message: err.message().map(str::to_string),
                    version_id: None,
                }),
            }
        }
        Ok(S3Response::new(dto::DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: (!errors.is_empty()).then_some(errors),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<dto::CopyObjectInput>,
    ) -> S3Result<S3Response<dto::CopyObjectOutput>> {
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        check_key(&input.key)?;
        let (source_bucket, source_key) = match &input.copy_source {
            dto::CopySource::Bucket { bucket, key, .. } => (bucket.to_string(), key.to_string()),
            _ => {
                return Err(s3_error!(
                    NotImplemented,
                    "only bucket copy sources are supported"
                ));
            }
        };
        // A key pair opens one bucket only, so a copy can only read from that bucket.
        if source_bucket != bucket.name {
            return Err(s3_error!(AccessDenied, "the copy source is in another bucket"));
        }
        check_key(&source_key)?;
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == dto::MetadataDirective::REPLACE);
        if source_key == input.key && !replace {
            return Err(s3_error!(
                InvalidRequest,
                "This copy request is illegal because it is trying to copy an object to itself without \
                 changing the object's metadata"
            ));
        }
        let (mut source, source_meta) = Self::open(&bucket, &source_key).await?;
        if let Some(condition) = &input.copy_source_if_match
            && condition.as_etag().is_some_and(|t| t.value() != source_meta.etag)
        {
            return Err(s3_error!(
                PreconditionFailed,
                "x-amz-copy-source-if-match does not match"
            ));
        }
        let headers = if replace {
            headers_of(
                input.content_type,
                input.content_encoding,
                input.content_disposition,
                input.content_language,
                input.cache_control,
                input.metadata,
            )
        } else {
            source_meta.headers()
        };
        let (path, mut file) = bucket.temp_file().map_err(internal)?;
        let mut guard = TempGuard(Some(path.clone()));
        let size = source_meta.size;
        let key = input.key.clone();
        let target = bucket.clone();
        let meta = blocking(move || {
            let mut md5 = Md5::new();
            let mut left = size;
            let mut buf = vec![0u8; 1 << 20];
            while left > 0 {
                let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
                source.read_exact(&mut buf[..n])?;
                md5.update(&buf[..n]);
                file.write_all(&buf[..n])?;
                left -= n as u64;
            }
            let digest: [u8; 16] = md5.finalize().into();
            let meta = ObjectMeta::new(&key, size, hex(&digest), headers, None);
            finish_file(&mut file, &meta)?;
            target.commit(&path, meta.clone())?;
            Ok(meta)
        })
        .await?;
        guard.disarm();
        Ok(S3Response::new(dto::CopyObjectOutput {
            copy_object_result: Some(dto::CopyObjectResult {
                e_tag: Some(etag(&meta.etag)),
                last_modified: Some(timestamp(&meta)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<dto::ListObjectsInput>,
    ) -> S3Result<S3Response<dto::ListObjectsOutput>> {
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        let encode = wants_url_encoding(&input.encoding_type)?;
        let max = max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let listing = Self::listing(
            &bucket,
            &prefix,
            input.delimiter.as_deref(),
            input.marker.as_deref().filter(|m| !m.is_empty()),
            max,
        );
        let enc = |s: &str| if encode { url_encode(s) } else { s.to_string() };
        Ok(S3Response::new(dto::ListObjectsOutput {
            name: Some(bucket.name.clone()),
            prefix: Some(enc(&prefix)),
            marker: input.marker.as_deref().map(enc),
            max_keys: Some(i32::try_from(max).unwrap_or(i32::MAX)),
            is_truncated: Some(listing.truncated),
            delimiter: input.delimiter.as_deref().map(enc),
            next_marker: listing
                .truncated
                .then(|| listing.last.as_deref().map(enc))
                .flatten(),
            encoding_type: input.encoding_type.clone(),
            contents: Some(listing.objects.iter().map(|m| s3_object(m, encode)).collect()),
            common_prefixes: Some(
                listing
                    .prefixes
                    .iter()
                    .map(|p| dto::CommonPrefix { prefix: Some(enc(p)) })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<dto::ListObjectsV2Input>,
    ) -> S3Result<S3Response<dto::ListObjectsV2Output>> {
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        let encode = wants_url_encoding(&input.encoding_type)?;
        let max = max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let after = match input.continuation_token.as_deref() {
            Some(token) => Some(parse_continuation_token(token)?),
            None => input.start_after.clone().filter(|s| !s.is_empty()),
        };
        let listing = Self::listing(
            &bucket,
            &prefix,
            input.delimiter.as_deref(),
            after.as_deref(),
            max,
        );
        let enc = |s: &str| if encode { url_encode(s) } else { s.to_string() };
        let key_count = listing.objects.len() + listing.prefixes.len();
        Ok(S3Response::new(dto::ListObjectsV2Output {
            name: Some(bucket.name.clone()),
            prefix: Some(enc(&prefix)),
            max_keys: Some(i32::try_from(max).unwrap_or(i32::MAX)),
            key_count: Some(i32::try_from(key_count).unwrap_or(i32::MAX)),
            continuation_token: input.continuation_token.clone(),
            is_truncated: Some(listing.truncated),
            next_continuation_token: listing
                .truncated
                .then(|| listing.last.as_deref().map(continuation_token))
                .flatten(),
            delimiter: input.delimiter.as_deref().map(enc),
            encoding_type: input.encoding_type.clone(),
            start_after: input.start_after.as_deref().map(enc),
            contents: Some(listing.objects.iter().map(|m| s3_object(m, encode)).collect()),
            common_prefixes: Some(
                listing
                    .prefixes
                    .iter()
                    .map(|p| dto::CommonPrefix { prefix: Some(enc(p)) })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<dto::CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CreateMultipartUploadOutput>> {
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        check_key(&input.key)?;
        let upload = Upload {
            key: input.key.clone(),
            headers: headers_of(
                input.content_type,
                input.content_encoding,
                input.content_disposition,
                input.content_language,
                input.cache_control,
                input.metadata,
            ),
            initiated: now_nanos(),
        };
        let b = bucket.clone();
        let upload_id = blocking(move || b.create_upload(&upload)).await?;
        Ok(S3Response::new(dto::CreateMultipartUploadOutput {
            bucket: Some(bucket.name.clone()),
            key: Some(input.key),
            upload_id: Some(upload_id),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<dto::UploadPartInput>,
    ) -> S3Result<S3Response<dto::UploadPartOutput>> {
        let checksums = Checksums::new(declared_checksums!(req.input), &req.headers);
        let trailers = req.trailing_headers;
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        check_key(&input.key)?;
        if !(1..=MAX_PARTS).contains(&input.part_number) {
            return Err(s3_error!(InvalidArgument, "part numbers are 1 to {MAX_PARTS}"));
        }
        let number = u32::try_from(input.part_number).unwrap_or(1);
        let (b, id, key) = (bucket.clone(), input.upload_id.clone(), input.key.clone());
        if blocking(move || b.upload(&id, &key)).await?.is_none() {
            return Err(s3_error!(NoSuchUpload, "the upload does not exist"));
        }
        let received = receive(
            &bucket,
            input.body,
            input.content_length,
            input.content_md5.as_deref(),
            checksums,
            trailers.as_ref(),
        )
        .await?;
        let sums = received.checksums.clone();
        let meta = PartMeta {
            number,
            size: received.size,
            etag: hex(&received.md5),
            modified: now_nanos(),
        };
        let mut received = received;
        let path = received.path.clone();
        let mut file = received.file.try_clone().map_err(internal)?;
        let pending = std::mem::take(&mut received.pending);
        let (b, id, part) = (bucket.clone(), input.upload_id.clone(), meta.clone());
        blocking(move || {
            file.write_all(&pending)?;
            finish_file(&mut file, &part)?;
            b.commit_part(&id, &path, &part)
        })
        .await
        .map_err(|e| {
            // The upload was aborted or completed meanwhile.
            if bucket
                .upload(&input.upload_id, &input.key)
                .ok()
                .flatten()
                .is_none()
            {
                s3_error!(NoSuchUpload, "the upload does not exist")
            } else {
                e
            }
        })?;
        received.guard.disarm();
        Ok(S3Response::new(dto::UploadPartOutput {
            checksum_crc32: sums.checksum_crc32,
            checksum_crc32c: sums.checksum_crc32c,
            checksum_crc64nvme: sums.checksum_crc64nvme,
            checksum_sha1: sums.checksum_sha1,
            checksum_sha256: sums.checksum_sha256,
            e_tag: Some(etag(&meta.etag)),
            ..Default::default()
        }))
    }

    async fn list_parts(
        &self,
        req: S3Request<dto::ListPartsInput>,
    ) -> S3Result<S3Response<dto::ListPartsOutput>> {
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        check_key(&input.key)?;
        let (b, id, key) = (bucket.clone(), input.upload_id.clone(), input.key.clone());
        let parts = blocking(move || {
            if b.upload(&id, &key)?.is_none() {
                return Ok(None);
            }
            b.parts(&id).map(Some)
        })
        .await?
        .ok_or_else(|| s3_error!(NoSuchUpload, "the upload does not exist"))?;
        let max = usize::try_from(input.max_parts.unwrap_or(1000).clamp(0, 1000)).unwrap_or(1000);
        let marker = u32::try_from(input.part_number_marker.unwrap_or(0)).unwrap_or(0);
        let mut selected: Vec<&PartMeta> = parts.values().filter(|p| p.number > marker).collect();
        let truncated = selected.len() > max;
        selected.truncate(max);
        let next = selected.last().map(|p| i32::try_from(p.number).unwrap_or(0));
        Ok(S3Response::new(dto::ListPartsOutput {
            bucket: Some(bucket.name.clone()),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            max_parts: Some(i32::try_from(max).unwrap_or(1000)),
            part_number_marker: input.part_number_marker,
            is_truncated: Some(truncated),
            next_part_number_marker: if truncated { next } else { None },
            parts: Some(
                selected
                    .into_iter()
                    .map(|p| dto::Part {
                        part_number: Some(i32::try_from(p.number).unwrap_or(0)),
                        size: Some(i64::try_from(p.size).unwrap_or(i64::MAX)),
                        e_tag: Some(etag(&p.etag)),
                        last_modified: Some(nanos_timestamp(p.modified)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<dto::ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<dto::ListMultipartUploadsOutput>> {
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        let encode = wants_url_encoding(&input.encoding_type)?;
        if input.delimiter.as_deref().is_some_and(|d| !d.is_empty()) {
            return Err(s3_error!(
                NotImplemented,
                "ListMultipartUploads with a delimiter is not supported"
            ));
        }
        let prefix = input.prefix.clone().unwrap_or_default();
        let max = usize::try_from(input.max_uploads.unwrap_or(1000).clamp(0, 1000)).unwrap_or(1000);
        let b = bucket.clone();
        let p = prefix.clone();
        let all = blocking(move || b.uploads(&p)).await?;
        let key_marker = input.key_marker.clone().unwrap_or_default();
        let id_marker = input.upload_id_marker.clone().unwrap_or_default();
        // Resume after (key marker, upload id marker), in S3's order: key, then initiation.
        let first_after_key = |all: &[(String, Upload)]| {
            all.iter()
                .position(|(_, u)| u.key > key_marker)
                .unwrap_or(all.len())
        };
        let start = if key_marker.is_empty() {
            0
        } else if id_marker.is_empty() {
            first_after_key(&all)
        } else {
            all.iter()
                .position(|(id, u)| u.key == key_marker && *id == id_marker)
                .map_or_else(|| first_after_key(&all), |i| i + 1)
        };
        let rest = all.len().saturating_sub(start);
        let truncated = rest > max;
        let selected: Vec<(String, Upload)> = all.into_iter().skip(start).take(max).collect();
        let enc = |s: &str| if encode { url_encode(s) } else { s.to_string() };
        let next = selected.last().filter(|_| truncated).cloned();
        Ok(S3Response::new(dto::ListMultipartUploadsOutput {
            bucket: Some(bucket.name.clone()),
            prefix: Some(enc(&prefix)),
            key_marker: input.key_marker.as_deref().map(enc),
            upload_id_marker: input.upload_id_marker.clone(),
            max_uploads: Some(i32::try_from(max).unwrap_or(1000)),
            is_truncated: Some(truncated),
            next_key_marker: next.as_ref().map(|(_, u)| enc(&u.key)),
            next_upload_id_marker: next.as_ref().map(|(id, _)| id.clone()),
            encoding_type: input.encoding_type.clone(),
            uploads: Some(
                selected
                    .into_iter()
                    .map(|(id, upload)| dto::MultipartUpload {
                        key: Some(enc(&upload.key)),
                        upload_id: Some(id),
                        initiated: Some(nanos_timestamp(upload.initiated)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<dto::AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::AbortMultipartUploadOutput>> {
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        check_key(&input.key)?;
        let (b, id, key) = (bucket.clone(), input.upload_id.clone(), input.key.clone());
        let found = blocking(move || {
            if b.upload(&id, &key)?.is_none() {
                return Ok(false);
            }
            b.remove_upload(&id).map(|()| true)
        })
        .await?;
        if !found {
            return Err(s3_error!(NoSuchUpload, "the upload does not exist"));
        }
        Ok(S3Response::new(dto::AbortMultipartUploadOutput::default()))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<dto::CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CompleteMultipartUploadOutput>> {
        let input = req.input;
        let bucket = self.bucket(&input.bucket)?;
        check_key(&input.key)?;
        let requested: Vec<(i32, String)> = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                (
                    p.part_number.unwrap_or(0),
                    p.e_tag
                        .map(|t| t.value().trim_matches('"').to_string())
                        .unwrap_or_default(),
                )
            })
            .collect();
        if requested.is_empty() {
            return Err(s3_error!(MalformedXML, "the upload names no parts"));
        }
        if requested.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(s3_error!(
                InvalidPartOrder,
                "parts must be listed in ascending order"
            ));
        }
        let (b, id, key) = (bucket.clone(), input.upload_id.clone(), input.key.clone());
        let found = blocking(move || match b.upload(&id, &key)? {
            None => Ok(None),
            Some(upload) => Ok(Some((upload, b.parts(&id)?))),
        })
        .await?;
        let Some((upload, stored)) = found else {
            return Err(s3_error!(NoSuchUpload, "the upload does not exist"));
        };
        let mut chosen = Vec::with_capacity(requested.len());
        for (i, (number, tag)) in requested.iter().enumerate() {
            let part = u32::try_from(*number)
                .ok()
                .and_then(|n| stored.get(&n))
                .filter(|p| p.etag == *tag)
                .ok_or_else(|| s3_error!(InvalidPart, "part {number} was not uploaded with ETag {tag:?}"))?;
            if i + 1 < requested.len() && part.size < MIN_PART_BYTES {
                return Err(s3_error!(
                    EntityTooSmall,
                    "part {number} is {} bytes; all parts but the last need at least {MIN_PART_BYTES}",
                    part.size
                ));
            }
            chosen.push(part.clone());
        }
        let etags: Vec<String> = chosen.iter().map(|p| p.etag.clone()).collect();
        let tag = multipart_etag(&etags).ok_or_else(|| internal("stored part ETag is not hex"))?;
        let size: u64 = chosen.iter().map(|p| p.size).sum();
        let meta = ObjectMeta::new(
            &input.key,
            size,
            tag,
            upload.headers,
            Some(u32::try_from(chosen.len()).unwrap_or(u32::MAX)),
        );
        let (path, mut file) = bucket.temp_file().map_err(internal)?;
        let mut guard = TempGuard(Some(path.clone()));
        let (b, id, committed) = (bucket.clone(), input.upload_id.clone(), meta.clone());
        blocking(move || {
            let mut buf = vec![0u8; 1 << 20];
            for part in &chosen {
                let mut source = b.open_part(&id, part.number)?;
                // The part may have been uploaded again since it was checked: copy only the
                // version whose ETag the client named.
                let stored: PartMeta = super::storage::read_trailer(&mut source)?;
                if stored != *part {
                    return Err(std::io::Error::other(format!(
                        "part {} changed while the upload was being completed",
                        part.number
                    )));
                }
                source.seek(SeekFrom::Start(0))?;
                let mut left = part.size;
                while left > 0 {
                    let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
                    source.read_exact(&mut buf[..n])?;
                    file.write_all(&buf[..n])?;
                    left -= n as u64;
                }
            }
            finish_file(&mut file, &committed)?;
            b.commit(&path, committed)?;
            // Acknowledged only after the object is durable; the parts may go now. A crash
            // here leaves an upload that the client can still abort.
            b.remove_upload(&id)?;
            Ok(())
        })
        .await?;
        guard.disarm();
        Ok(S3Response::new(dto::CompleteMultipartUploadOutput {
            bucket: Some(bucket.name.clone()),
            key: Some(input.key),
            e_tag: Some(etag(&meta.etag)),
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_escape_are_refused() {
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a/./b", "..", "a\0b"] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            *check_key(&"k".repeat(1025)).unwrap_err().code(),
            S3ErrorCode::KeyTooLongError
        );
        for good in ["a", "a/b/c", "..a", "a..", "a/.b", "日本/語", "with space+plus%"] {
            check_key(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
    }

    #[test]
    fn multipart_etag_is_md5_of_part_md5s() {
        // Two parts "a" and "b": md5("a") = 0cc175b9c0f1b6a831c399e269772661,
        // md5("b") = 92eb5ffee6ae2fec3ad71c777531578f.
        let tag = multipart_etag(&[
            "0cc175b9c0f1b6a831c399e269772661".into(),
            "92eb5ffee6ae2fec3ad71c777531578f".into(),
        ])
        .unwrap();
        let mut md5 = Md5::new();
        md5.update([
            0x0c, 0xc1, 0x75, 0xb9, 0xc0, 0xf1, 0xb6, 0xa8, 0x31, 0xc3, 0x99, 0xe2, 0x69, 0x77, 0x26, 0x61,
        ]);
        md5.update([
            0x92, 0xeb, 0x5f, 0xfe, 0xe6, 0xae, 0x2f, 0xec, 0x3a, 0xd7, 0x1c, 0x77, 0x75, 0x31, 0x57, 0x8f,
        ]);
        let digest: [u8; 16] = md5.finalize().into();
        assert_eq!(tag, format!("{}-2", hex(&digest)));
        assert!(multipart_etag(&["zz".into()]).is_none());
    }

    #[test]
    fn url_encoding_round_trips_through_unquote_plus() {
        assert_eq!(url_encode("a b+c/%d"), "a%20b%2Bc/%25d");
        assert_eq!(url_encode("日"), "%E6%97%A5");
    }
}
