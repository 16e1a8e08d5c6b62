# SPDX-License-Identifier: Apache-2.0
"""Data-plane probe of iri-conformance: boto3 against a bucket's BucketAccess.

Reads {"check": ..., "access": {"endpoint", "secret_data"}, ...} as JSON on stdin. Prints
"PASS", "SKIP: <reason>" (exit 3) or "FAIL: <reason>" (exit 1) as its last line.
"""

import json
import sys


def finish(kind, reason=""):
    print(f"{kind}: {reason}" if reason else kind)
    sys.exit({"PASS": 0, "SKIP": 3}.get(kind, 1))


try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError, EndpointConnectionError
except ImportError as e:
    finish("SKIP", f"boto3 is needed for the bucket data-plane checks (pip install boto3): {e}")


def client(access):
    data = access["secret_data"]
    return boto3.client(
        "s3",
        endpoint_url=access["endpoint"],
        aws_access_key_id=data["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=data["AWS_SECRET_ACCESS_KEY"],
        region_name=data.get("BUCKET_REGION", "us-east-1"),
        # Standard retries, as real clients have them: they ride out a keep-alive connection
        # the server closed after refusing a request early; 4xx answers are never retried.
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=30,
        ),
    )


def bucket_of(access):
    name = access["secret_data"].get("BUCKET_NAME")
    if not name:
        finish("SKIP", "secret_data has no BUCKET_NAME, so the S3 bucket name is unknown")
    return name


def code_of(fn, **kwargs):
    try:
        fn(**kwargs)
    except ClientError as e:
        err = e.response.get("Error", {})
        return err.get("Code") or str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return None


def round_trip(args):
    access = args["access"]
    s3, bucket = client(access), bucket_of(access)
    key = "iri-conformance/object.bin"
    body = bytes(range(256)) * 1024
    put = s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/octet-stream")
    got = s3.get_object(Bucket=bucket, Key=key)
    data = got["Body"].read()
    if data != body:
        finish("FAIL", f"GET returned {len(data)} bytes that differ from the {len(body)} bytes PUT")
    if got["ETag"] != put["ETag"]:
        finish("FAIL", f"GET ETag {got['ETag']} differs from PUT ETag {put['ETag']}")
    part = s3.get_object(Bucket=bucket, Key=key, Range="bytes=1000-1999")["Body"].read()
    if part != body[1000:2000]:
        finish("FAIL", f"GET with Range bytes=1000-1999 returned {len(part)} bytes that are not that range")
    head = s3.head_object(Bucket=bucket, Key=key)
    if head["ContentLength"] != len(body):
        finish("FAIL", f"HEAD reports {head['ContentLength']} bytes, PUT wrote {len(body)}")
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="iri-conformance/").get("Contents", [])]
    if listed != [key]:
        finish("FAIL", f"ListObjectsV2 returned {listed}, expected [{key!r}]")
    s3.delete_object(Bucket=bucket, Key=key)
    code = code_of(s3.get_object, Bucket=bucket, Key=key)
    if code not in ("NoSuchKey", "404"):
        finish("FAIL", f"GET after DELETE answered {code!r}, expected NoSuchKey")


def put(args):
    access = args["access"]
    client(access).put_object(Bucket=bucket_of(access), Key=args["key"], Body=b"iri-conformance")


def refused(args):
    """`access` of one bucket used on `other` bucket."""
    s3 = client(args["access"])
    other = args["other"]
    for what, fn, kwargs in [
        ("GET", s3.get_object, {"Bucket": other, "Key": args["key"]}),
        ("PUT", s3.put_object, {"Bucket": other, "Key": "iri-conformance/intruder", "Body": b"x"}),
        ("LIST", s3.list_objects_v2, {"Bucket": other}),
    ]:
        code = code_of(fn, **kwargs)
        if code not in ("AccessDenied", "403"):
            finish("FAIL", f"{what} on bucket {other} with another bucket's credentials answered {code!r}, expected AccessDenied")


def revoked(args):
    access = args["access"]
    s3, bucket = client(access), bucket_of(access)
    for what, fn, kwargs in [
        ("GET", s3.get_object, {"Bucket": bucket, "Key": args["key"]}),
        ("PUT", s3.put_object, {"Bucket": bucket, "Key": "iri-conformance/after-delete", "Body": b"x"}),
    ]:
        try:
            code = code_of(fn, **kwargs)
        except EndpointConnectionError:
            continue  # an endpoint that went away with the bucket refuses too
        if code is None:
            finish("FAIL", f"{what} with a deleted bucket's credentials succeeded")
        if code in ("NoSuchKey", "404"):
            finish("FAIL", f"{what} with a deleted bucket's credentials was authorized (answered {code})")


if __name__ == "__main__":
    args = json.load(sys.stdin)
    try:
        globals()[args["check"]](args)
    except ClientError as e:
        finish("FAIL", f"S3 error: {e}")
    except EndpointConnectionError as e:
        finish("FAIL", f"cannot reach the endpoint: {e}")
    finish("PASS")
