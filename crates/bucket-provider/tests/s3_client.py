# SPDX-License-Identifier: Apache-2.0
"""A real S3 client (boto3) driving the embedded S3 server of iri-bucket-provider.

Usage: python3 s3_client.py <scenario>, with the scenario's input as JSON on stdin. A bucket's
access is passed exactly as BucketAccess returns it: {"endpoint": ..., "secret_data": {...}},
so the scenarios prove that a client needs nothing else. Exit status 0 and a last line "OK"
mean the scenario passed; anything else is a failure with the reason on stderr.
"""

import hashlib
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

import boto3
import botocore
from botocore.config import Config
from botocore.exceptions import ClientError

MIB = 1 << 20


def client(access, addressing="path", secret=None, region=None, attempts=3):
    """A boto3 client from nothing but the access. Retries are boto3's standard ones, as real
    clients have them: they cover a keep-alive connection the server closed after refusing a
    request early, and never turn a 4xx into a success. 5xx answers would be retried away, so
    the Rust side asserts the server answered none (iri_s3_requests)."""
    data = access["secret_data"]
    return boto3.client(
        "s3",
        endpoint_url=access["endpoint"],
        aws_access_key_id=data["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=secret or data["AWS_SECRET_ACCESS_KEY"],
        region_name=region or data["BUCKET_REGION"],
        config=Config(
            s3={"addressing_style": addressing},
            retries={"max_attempts": attempts, "mode": "standard"},
            signature_version="s3v4",
        ),
    )


def error_code(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ClientError as e:
        return e.response.get("Error", {}).get("Code") or str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return None


def expect_error(codes, fn, *args, **kwargs):
    codes = [codes] if isinstance(codes, str) else codes
    code = error_code(fn, *args, **kwargs)
    assert code in codes, f"{fn.__name__}{args}{kwargs}: expected error {codes}, got {code!r}"


def md5(data):
    return hashlib.md5(data).hexdigest()


def content(key, size):
    """Deterministic content of `size` bytes for `key`: any object can be checked by its key."""
    seed = hashlib.sha256(key.encode()).digest()
    out = bytearray()
    block = seed
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def list_all_v2(s3, bucket, **kwargs):
    keys, prefixes, pages = [], [], 0
    token = None
    while True:
        args = dict(kwargs)
        if token:
            args["ContinuationToken"] = token
        page = s3.list_objects_v2(Bucket=bucket, **args)
        pages += 1
        keys += [o["Key"] for o in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        assert page["KeyCount"] == len(page.get("Contents", [])) + len(page.get("CommonPrefixes", []))
        if not page["IsTruncated"]:
            return keys, prefixes, pages
        token = page["NextContinuationToken"]


def list_all_v1(s3, bucket, **kwargs):
    keys, prefixes, pages = [], [], 0
    marker = ""
    while True:
        page = s3.list_objects(Bucket=bucket, Marker=marker, **kwargs)
        pages += 1
        contents = [o["Key"] for o in page.get("Contents", [])]
        common = [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        keys += contents
        prefixes += common
        if not page["IsTruncated"]:
            return keys, prefixes, pages
        marker = page.get("NextMarker") or (contents + common)[-1]


def objects(args):
    """Everything a client does with one bucket's access."""
    access = args["access"]
    bucket = access["secret_data"]["BUCKET_NAME"]
    s3 = client(access)

    s3.head_bucket(Bucket=bucket)
    location = s3.get_bucket_location(Bucket=bucket).get("LocationConstraint")
    region = access["secret_data"]["BUCKET_REGION"]
    assert location in (None, "", region) and (location or "us-east-1") == region, location
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == [bucket]

    # Put, get, head with content type and user metadata; ETag is the MD5.
    body = b"hello, embedded s3\n" * 100
    put = s3.put_object(
        Bucket=bucket, Key="docs/hello.txt", Body=body, ContentType="text/plain", Metadata={"owner": "test"}
    )
    assert put["ETag"] == f'"{md5(body)}"', put["ETag"]
    got = s3.get_object(Bucket=bucket, Key="docs/hello.txt")
    assert got["Body"].read() == body
    assert got["ETag"] == f'"{md5(body)}"'
    assert got["ContentType"] == "text/plain", got["ContentType"]
    assert got["Metadata"] == {"owner": "test"}, got["Metadata"]
    head = s3.head_object(Bucket=bucket, Key="docs/hello.txt")
    assert head["ContentLength"] == len(body) and head["ETag"] == put["ETag"]
    expect_error(["404", "NoSuchKey"], s3.head_object, Bucket=bucket, Key="docs/missing")
    expect_error("NoSuchKey", s3.get_object, Bucket=bucket, Key="docs/missing")
    # Conditional get.
    expect_error(["304", "NotModified"], s3.get_object, Bucket=bucket, Key="docs/hello.txt", IfNoneMatch=put["ETag"])
    expect_error(["412", "PreconditionFailed"], s3.get_object, Bucket=bucket, Key="docs/hello.txt", IfMatch='"0000"')
    assert s3.get_object(Bucket=bucket, Key="docs/hello.txt", IfMatch=put["ETag"])["Body"].read() == body
    import datetime

    modified = head["LastModified"]
    later, earlier = modified + datetime.timedelta(seconds=5), modified - datetime.timedelta(seconds=5)
    expect_error(["304", "NotModified"], s3.get_object, Bucket=bucket, Key="docs/hello.txt", IfModifiedSince=later)
    assert s3.get_object(Bucket=bucket, Key="docs/hello.txt", IfModifiedSince=earlier)["Body"].read() == body
    expect_error(["412", "PreconditionFailed"], s3.get_object, Bucket=bucket, Key="docs/hello.txt", IfUnmodifiedSince=earlier)
    assert s3.get_object(Bucket=bucket, Key="docs/hello.txt", IfUnmodifiedSince=later)["Body"].read() == body

    # Integrity: Content-MD5 and flexible checksums are verified; a mismatch stores nothing.
    import base64

    s3.put_object(Bucket=bucket, Key="sum/md5", Body=b"abc", ContentMD5=base64.b64encode(hashlib.md5(b"abc").digest()).decode())
    expect_error("BadDigest", s3.put_object, Bucket=bucket, Key="sum/bad-md5", Body=b"abc", ContentMD5=base64.b64encode(hashlib.md5(b"xyz").digest()).decode())
    for algorithm in ("CRC32", "SHA1", "SHA256"):  # CRC32C needs botocore[crt] on the client
        r = s3.put_object(Bucket=bucket, Key=f"sum/{algorithm}", Body=b"checked data", ChecksumAlgorithm=algorithm)
        assert r.get(f"Checksum{algorithm}"), (algorithm, r)
    expect_error("BadDigest", s3.put_object, Bucket=bucket, Key="sum/bad-crc", Body=b"abc", ChecksumCRC32="AAAAAA==")
    expect_error("BadDigest", s3.put_object, Bucket=bucket, Key="sum/bad-sha", Body=b"abc", ChecksumSHA256=base64.b64encode(hashlib.sha256(b"xyz").digest()).decode())
    for key in ("sum/bad-md5", "sum/bad-crc", "sum/bad-sha"):
        expect_error("NoSuchKey", s3.get_object, Bucket=bucket, Key=key)

    # An empty object, and overwriting.
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""
    s3.put_object(Bucket=bucket, Key="empty", Body=b"now full")
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b"now full"

    # Concurrent overwrites of one key: the result is one complete version, never a mix.
    import threading

    versions = {i: content(f"version-{i}", 200_000 + i) for i in range(6)}
    racers = [client(access) for _ in versions]

    def overwrite(i):
        for _ in range(3):
            racers[i].put_object(Bucket=bucket, Key="raced", Body=versions[i])

    threads = [threading.Thread(target=overwrite, args=(i,)) for i in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = s3.get_object(Bucket=bucket, Key="raced")
    data = final["Body"].read()
    assert data in versions.values() and final["ETag"] == f'"{md5(data)}"', "a torn or mismatched version"

    # Ranges.
    data = content("ranged", 100_000)
    s3.put_object(Bucket=bucket, Key="ranged", Body=data)
    for rng, want in [
        ("bytes=0-9", data[0:10]),
        ("bytes=99990-", data[99990:]),
        ("bytes=-5", data[-5:]),
        ("bytes=500-99999999", data[500:]),
    ]:
        part = s3.get_object(Bucket=bucket, Key="ranged", Range=rng)
        assert part["Body"].read() == want, rng
        assert part["ResponseMetadata"]["HTTPStatusCode"] == 206, rng
        assert part["ContentRange"].endswith(f"/{len(data)}"), part["ContentRange"]
    expect_error("InvalidRange", s3.get_object, Bucket=bucket, Key="ranged", Range="bytes=100000-")

    # Keys with characters that need encoding survive put, list (encoding-type=url) and get.
    odd = ["a b+c", "percent%20x", "ünïcödé/キー", "tab\there", "q?x=1&y", "semi;colon", "star*"]
    for key in odd:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == key.encode(), key
    listed, _, _ = list_all_v2(s3, bucket)
    for key in odd:
        assert key in listed, (key, listed)

    # Listing: prefix, delimiter, continuation, both API versions.
    tree = [f"tree/{d}/{i:03}" for d in ("a", "b", "c") for i in range(25)] + ["tree/top1", "tree/top2"]
    for key in tree:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    for lister in (list_all_v1, list_all_v2):
        keys, prefixes, pages = lister(s3, bucket, Prefix="tree/", MaxKeys=7)
        assert keys == sorted(tree) and prefixes == [] and pages == 11, (lister.__name__, len(keys), pages)
        keys, prefixes, pages = lister(s3, bucket, Prefix="tree/", Delimiter="/", MaxKeys=2)
        assert keys == ["tree/top1", "tree/top2"], keys
        assert prefixes == ["tree/a/", "tree/b/", "tree/c/"], prefixes
        assert pages == 3, pages
        keys, prefixes, _ = lister(s3, bucket, Prefix="tree/b/", Delimiter="/")
        assert keys == [k for k in tree if k.startswith("tree/b/")] and prefixes == []
        keys, prefixes, _ = lister(s3, bucket, Prefix="nothing-here/")
        assert keys == [] and prefixes == []
    page = s3.list_objects_v2(Bucket=bucket, Prefix="tree/", StartAfter="tree/c/020")
    assert [o["Key"] for o in page["Contents"]] == ["tree/c/021", "tree/c/022", "tree/c/023", "tree/c/024", "tree/top1", "tree/top2"]
    first = s3.list_objects_v2(Bucket=bucket, Prefix="tree/a/", MaxKeys=1)["Contents"][0]
    assert first["Size"] == len("tree/a/000") and first["ETag"] == f'"{md5(b"tree/a/000")}"'

    # Copy: same data, same ETag; metadata copied or replaced.
    copied = s3.copy_object(Bucket=bucket, Key="docs/copy.txt", CopySource={"Bucket": bucket, "Key": "docs/hello.txt"})
    assert copied["CopyObjectResult"]["ETag"] == put["ETag"]
    c = s3.get_object(Bucket=bucket, Key="docs/copy.txt")
    assert c["Body"].read() == body and c["Metadata"] == {"owner": "test"} and c["ContentType"] == "text/plain"
    s3.copy_object(
        Bucket=bucket,
        Key="docs/copy.txt",
        CopySource={"Bucket": bucket, "Key": "docs/hello.txt"},
        MetadataDirective="REPLACE",
        Metadata={"owner": "other"},
        ContentType="application/x-test",
    )
    h = s3.head_object(Bucket=bucket, Key="docs/copy.txt")
    assert h["Metadata"] == {"owner": "other"} and h["ContentType"] == "application/x-test", h
    expect_error("NoSuchKey", s3.copy_object, Bucket=bucket, Key="x", CopySource={"Bucket": bucket, "Key": "missing"})

    # Multipart: two 5 MiB parts and a small last one; ETag in S3's multipart form.
    parts_data = [content("mp1", 5 * MIB), content("mp2", 5 * MIB), content("mp3", 1234)]
    upload = s3.create_multipart_upload(Bucket=bucket, Key="big/multi", ContentType="application/octet-stream")
    uid = upload["UploadId"]
    etags = []
    for i, chunk in enumerate(parts_data, start=1):
        r = s3.upload_part(Bucket=bucket, Key="big/multi", UploadId=uid, PartNumber=i, Body=chunk)
        assert r["ETag"] == f'"{md5(chunk)}"'
        etags.append(r["ETag"])
    listed_parts = s3.list_parts(Bucket=bucket, Key="big/multi", UploadId=uid)["Parts"]
    assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in listed_parts] == [
        (i + 1, etags[i], len(parts_data[i])) for i in range(3)
    ], listed_parts
    # Not visible before completion.
    expect_error("NoSuchKey", s3.get_object, Bucket=bucket, Key="big/multi")
    expect_error(
        "InvalidPart",
        s3.complete_multipart_upload,
        Bucket=bucket,
        Key="big/multi",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]},
    )
    done = s3.complete_multipart_upload(
        Bucket=bucket,
        Key="big/multi",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": i + 1, "ETag": etags[i]} for i in range(3)]},
    )
    expected_etag = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts_data)).hexdigest() + "-3"
    assert done["ETag"] == f'"{expected_etag}"', (done["ETag"], expected_etag)
    whole = s3.get_object(Bucket=bucket, Key="big/multi")
    assert whole["Body"].read() == b"".join(parts_data) and whole["ETag"] == f'"{expected_etag}"'
    mid = s3.get_object(Bucket=bucket, Key="big/multi", Range=f"bytes={5 * MIB - 3}-{5 * MIB + 2}")["Body"].read()
    assert mid == parts_data[0][-3:] + parts_data[1][:3]
    expect_error("NoSuchUpload", s3.list_parts, Bucket=bucket, Key="big/multi", UploadId=uid)
    # Too small parts, then abort.
    small = s3.create_multipart_upload(Bucket=bucket, Key="big/small")["UploadId"]
    e1 = s3.upload_part(Bucket=bucket, Key="big/small", UploadId=small, PartNumber=1, Body=b"x")["ETag"]
    e2 = s3.upload_part(Bucket=bucket, Key="big/small", UploadId=small, PartNumber=2, Body=b"y")["ETag"]
    expect_error(
        "EntityTooSmall",
        s3.complete_multipart_upload,
        Bucket=bucket,
        Key="big/small",
        UploadId=small,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]},
    )
    other = s3.create_multipart_upload(Bucket=bucket, Key="big/other")["UploadId"]
    listed = s3.list_multipart_uploads(Bucket=bucket, Prefix="big/")["Uploads"]
    assert [(u["Key"], u["UploadId"]) for u in listed] == [("big/other", other), ("big/small", small)], listed
    page = s3.list_multipart_uploads(Bucket=bucket, MaxUploads=1)
    assert page["IsTruncated"] and [u["Key"] for u in page["Uploads"]] == ["big/other"], page
    page = s3.list_multipart_uploads(
        Bucket=bucket, KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"]
    )
    assert not page["IsTruncated"] and [u["Key"] for u in page["Uploads"]] == ["big/small"], page
    s3.abort_multipart_upload(Bucket=bucket, Key="big/other", UploadId=other)
    s3.abort_multipart_upload(Bucket=bucket, Key="big/small", UploadId=small)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    expect_error("NoSuchUpload", s3.abort_multipart_upload, Bucket=bucket, Key="big/small", UploadId=small)
    expect_error("NoSuchUpload", s3.upload_part, Bucket=bucket, Key="big/small", UploadId="../../etc", PartNumber=1, Body=b"x")
    # boto3's managed transfer (multipart above 8 MiB) round-trips too.
    import io

    blob = content("managed", 12 * MIB)
    s3.upload_fileobj(io.BytesIO(blob), bucket, "big/managed")
    out = io.BytesIO()
    s3.download_fileobj(bucket, "big/managed", out)
    assert out.getvalue() == blob

    # Keys that would escape a directory are refused.
    for key in ["../escape", "a/../../b", "/absolute", "dot/./x"]:
        expect_error(["InvalidArgument", "400"], s3.put_object, Bucket=bucket, Key=key, Body=b"x")
        expect_error(["NoSuchKey", "InvalidArgument", "400"], s3.get_object, Bucket=bucket, Key=key)
    expect_error("KeyTooLongError", s3.put_object, Bucket=bucket, Key="k" * 1025, Body=b"x")
    expect_error(["InvalidArgument", "400"], s3.put_object, Bucket=bucket, Key="nul\x00byte", Body=b"x")

    # Presigned URLs: GET and PUT work with nothing but the URL; an expired one is refused.
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "docs/hello.txt"}, ExpiresIn=60)
    assert urllib.request.urlopen(url).read() == body
    put_url = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "presigned"}, ExpiresIn=60)
    req = urllib.request.Request(put_url, data=b"via presigned put", method="PUT")
    urllib.request.urlopen(req).read()
    assert s3.get_object(Bucket=bucket, Key="presigned")["Body"].read() == b"via presigned put"
    expired = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "docs/hello.txt"}, ExpiresIn=1)
    time.sleep(2.5)
    try:
        urllib.request.urlopen(expired)
        raise AssertionError("an expired presigned URL was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 403 and b"AccessDenied" in e.read(), e.code
    tampered = url.replace("docs/hello.txt", "docs/copy.txt")
    try:
        urllib.request.urlopen(tampered)
        raise AssertionError("a presigned URL for another key was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 403 and b"SignatureDoesNotMatch" in e.read(), e.code

    # Wrong secret, wrong region: refused by the signature check; anonymous: refused.
    bad = client(access, secret="x" * 40)
    expect_error("SignatureDoesNotMatch", bad.get_object, Bucket=bucket, Key="docs/hello.txt")
    expect_error("SignatureDoesNotMatch", bad.put_object, Bucket=bucket, Key="docs/hello.txt", Body=b"overwrite")
    anonymous = boto3.client(
        "s3",
        endpoint_url=access["endpoint"],
        region_name=region,
        config=Config(signature_version=botocore.UNSIGNED, s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )
    expect_error("AccessDenied", anonymous.get_object, Bucket=bucket, Key="docs/hello.txt")
    assert s3.get_object(Bucket=bucket, Key="docs/hello.txt")["Body"].read() == body, "a refused write changed data"

    # Virtual-host addressing, when the server has a domain: resolve <bucket>.<domain> here.
    domain = args.get("virtual_host_domain")
    if domain:
        real = socket.getaddrinfo
        host = access["secret_data"]["BUCKET_HOST"]

        def resolve(name, *rest, **kw):
            if isinstance(name, str) and name.endswith("." + domain):
                name = host
            return real(name, *rest, **kw)

        socket.getaddrinfo = resolve
        port = access["secret_data"]["BUCKET_PORT"]
        vh = client({**access, "endpoint": f"http://{domain}:{port}"}, addressing="virtual")
        assert vh.get_object(Bucket=bucket, Key="docs/hello.txt")["Body"].read() == body
        vh.put_object(Bucket=bucket, Key="vhost", Body=b"virtual")
        assert s3.get_object(Bucket=bucket, Key="vhost")["Body"].read() == b"virtual"
        socket.getaddrinfo = real

    # Unsupported operations answer NotImplemented.
    expect_error("NotImplemented", s3.get_bucket_policy, Bucket=bucket)
    expect_error("NotImplemented", s3.put_bucket_versioning, Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    assert "Status" not in s3.get_bucket_versioning(Bucket=bucket), "versioning reported although unsupported"

    # Deletes: single, missing (succeeds), batch with one bad key.
    s3.delete_object(Bucket=bucket, Key="docs/copy.txt")
    expect_error("NoSuchKey", s3.get_object, Bucket=bucket, Key="docs/copy.txt")
    s3.delete_object(Bucket=bucket, Key="docs/never-existed")
    result = s3.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": k} for k in tree[:30]] + [{"Key": "../bad"}]}
    )
    assert sorted(d["Key"] for d in result["Deleted"]) == sorted(tree[:30]), result
    assert [e["Key"] for e in result.get("Errors", [])] == ["../bad"], result
    keys, _, _ = list_all_v2(s3, bucket, Prefix="tree/")
    assert keys == sorted(tree[30:]), keys
    print(json.dumps({"objects": len(list_all_v2(s3, bucket)[0])}))


def refused(args):
    """One bucket's access used on another bucket: every operation is AccessDenied."""
    s3 = client(args["access"])
    other = args["other_bucket"]
    expect_error("AccessDenied", s3.list_objects_v2, Bucket=other)
    expect_error("AccessDenied", s3.put_object, Bucket=other, Key="intruder", Body=b"x")
    expect_error("AccessDenied", s3.get_object, Bucket=other, Key=args.get("other_key", "x"))
    expect_error("AccessDenied", s3.delete_object, Bucket=other, Key=args.get("other_key", "x"))
    expect_error(["403", "AccessDenied"], s3.head_bucket, Bucket=other)
    own = args["access"]["secret_data"]["BUCKET_NAME"]
    expect_error(
        "AccessDenied", s3.copy_object, Bucket=own, Key="stolen", CopySource={"Bucket": other, "Key": args.get("other_key", "x")}
    )


def revoked(args):
    """A deleted bucket's access no longer works."""
    s3 = client(args["access"])
    bucket = args["access"]["secret_data"]["BUCKET_NAME"]
    expect_error("InvalidAccessKeyId", s3.list_objects_v2, Bucket=bucket)
    expect_error("InvalidAccessKeyId", s3.get_object, Bucket=bucket, Key=args.get("key", "x"))
    expect_error("InvalidAccessKeyId", s3.put_object, Bucket=bucket, Key="again", Body=b"x")


def put(args):
    """Puts {key: text} objects; prints their ETags."""
    s3 = client(args["access"])
    bucket = args["access"]["secret_data"]["BUCKET_NAME"]
    tags = {k: s3.put_object(Bucket=bucket, Key=k, Body=v.encode())["ETag"] for k, v in args["objects"].items()}
    print(json.dumps(tags))


def get(args):
    """Checks {key: text} objects are there with that content and nothing else is listed."""
    s3 = client(args["access"])
    bucket = args["access"]["secret_data"]["BUCKET_NAME"]
    for key, text in args["objects"].items():
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == text.encode(), key
    keys, _, _ = list_all_v2(s3, bucket)
    assert sorted(keys) == sorted(args["objects"]), keys


def slowdown(args):
    """Sends requests from 4 threads for two seconds: some must be refused with SlowDown, and
    no more than the class's tps (plus its one-second burst) may pass."""
    import threading

    # One attempt: a SlowDown must show, not be retried away.
    clients = [client(args["access"], attempts=1) for _ in range(4)]
    bucket = args["access"]["secret_data"]["BUCKET_NAME"]
    counts = {"ok": 0, "slowdown": 0}
    lock = threading.Lock()
    errors = []
    start = time.monotonic()

    if args.get("operation") == "get":
        clients[0].put_object(Bucket=bucket, Key="hot", Body=b"x")
        call = lambda s3: error_code(s3.get_object, Bucket=bucket, Key="hot")  # noqa: E731
    else:
        call = lambda s3: error_code(s3.head_bucket, Bucket=bucket)  # noqa: E731
    start = time.monotonic()

    def hammer(s3):
        while time.monotonic() - start < 2.0:
            code = call(s3)
            with lock:
                if code is None:
                    counts["ok"] += 1
                elif code in ("SlowDown", "503"):
                    counts["slowdown"] += 1
                else:
                    errors.append(code)

    threads = [threading.Thread(target=hammer, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    counts["seconds"] = time.monotonic() - start
    print(json.dumps(counts))


def expected_etag(key, data):
    """The ETag S3 gives `data` under `key`: multipart ("/mp-" keys, 5 MiB parts) or MD5."""
    if "/mp-" in key:
        parts = [data[i : i + 5 * MIB] for i in range(0, len(data), 5 * MIB)]
        return '"' + hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + f'-{len(parts)}"'
    return f'"{md5(data)}"'


def writer(args):
    """Writes objects until killed, every fourth as a multipart upload; prints one JSON line
    per acknowledged object."""
    s3 = client(args["access"], attempts=1)
    bucket = args["access"]["secret_data"]["BUCKET_NAME"]
    sizes = [1, 4096, 300_000, 2 * MIB]
    i = 0
    while True:
        multipart = i % 4 == 3
        key = f"crash/{args['writer']}/{'mp-' if multipart else ''}{i:06}"
        size = 5 * MIB + 100_000 if multipart else sizes[i % len(sizes)]
        data = content(key, size)
        try:
            if multipart:
                uid = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
                parts = []
                for n, start in enumerate(range(0, size, 5 * MIB), start=1):
                    r = s3.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=n, Body=data[start : start + 5 * MIB])
                    parts.append({"PartNumber": n, "ETag": r["ETag"]})
                etag = s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": parts})["ETag"]
            else:
                etag = s3.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]
        except Exception as e:  # the server went away mid-request: not acknowledged
            print(json.dumps({"failed": key, "error": str(e)}), flush=True)
            time.sleep(0.05)
            i += 1
            continue
        assert etag == expected_etag(key, data), (key, etag)
        print(json.dumps({"key": key, "size": size, "etag": etag}), flush=True)
        i += 1


def verify(args):
    """After a crash: every acknowledged object intact; every listed object complete."""
    s3 = client(args["access"])
    bucket = args["access"]["secret_data"]["BUCKET_NAME"]
    acked = {a["key"]: a for a in args["acked"]}
    listed = {}
    token = None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        page = s3.list_objects_v2(Bucket=bucket, Prefix="crash/", **kw)
        for o in page.get("Contents", []):
            listed[o["Key"]] = o
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    missing = sorted(set(acked) - set(listed))
    assert not missing, f"acknowledged objects lost: {missing[:5]}"
    for key, o in listed.items():
        got = s3.get_object(Bucket=bucket, Key=key)
        data = got["Body"].read()
        size = o["Size"]
        assert data == content(key, size), f"{key}: content is not what was written (size {size})"
        assert got["ETag"] == o["ETag"] == expected_etag(key, data), f"{key}: ETag mismatch"
        if key in acked:
            assert size == acked[key]["size"] and o["ETag"] == acked[key]["etag"], f"{key}: not as acknowledged"
    print(json.dumps({"acked": len(acked), "listed": len(listed)}))


if __name__ == "__main__":
    scenario = sys.argv[1]
    args = json.load(sys.stdin)
    globals()[scenario](args)
    print("OK")
