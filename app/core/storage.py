"""Object storage (S3 API) for model versions, uploads and outputs.

One boto3 client per process and endpoint. Pre-signed URLs are signed against the public
endpoint when one is configured, because the signature covers the host a client will use.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.client import Config as BotoConfig
from botocore.exceptions import ClientError

from app.core.config import get_settings

_lock = threading.Lock()

# Multipart above 16 MB, 8 parts in flight: model weights are large and a single PUT stream
# would be limited by one TCP connection.
TRANSFER = TransferConfig(multipart_threshold=16 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024, max_concurrency=8)


def _make_client(endpoint: str | None) -> Any:
    settings = get_settings()
    return boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key or None,
        aws_secret_access_key=settings.s3_secret_key or None,
        config=BotoConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=16,
            connect_timeout=5,
            read_timeout=60,
        ),
    )


@functools.lru_cache(maxsize=4)
def _client_for(endpoint: str, access_key: str, secret_key: str) -> Any:
    return _make_client(endpoint)


def s3_client() -> Any:
    settings = get_settings()
    with _lock:
        return _client_for(settings.s3_endpoint_url, settings.s3_access_key, settings.s3_secret_key)


def public_s3_client() -> Any:
    settings = get_settings()
    endpoint = settings.s3_public_endpoint_url or settings.s3_endpoint_url
    with _lock:
        return _client_for(endpoint, settings.s3_access_key, settings.s3_secret_key)


def reset_clients() -> None:
    """After a fork or a settings change (tests): boto3 clients are not fork-safe."""
    _client_for.cache_clear()


def ensure_bucket(name: str) -> None:
    client = s3_client()
    try:
        client.head_bucket(Bucket=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
            raise
        try:
            client.create_bucket(Bucket=name)
        except ClientError as create_exc:
            code = create_exc.response.get("Error", {}).get("Code")
            if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise


def ensure_buckets() -> None:
    settings = get_settings()
    ensure_bucket(settings.models_bucket)
    ensure_bucket(settings.media_bucket)


def put_bytes(bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)


def get_bytes(bucket: str, key: str) -> bytes:
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def exists(bucket: str, key: str) -> bool:
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise


def delete_prefix(bucket: str, prefix: str) -> int:
    client = s3_client()
    deleted = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            deleted += len(keys)
    return deleted


def presign_get(bucket: str, key: str, *, filename: str | None = None, ttl_s: int | None = None) -> str:
    params: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if filename:
        params["ResponseContentDisposition"] = f'inline; filename="{filename}"'
    return public_s3_client().generate_presigned_url(
        "get_object", Params=params, ExpiresIn=ttl_s or get_settings().presign_ttl_s
    )
