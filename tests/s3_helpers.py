"""A real S3 API on 127.0.0.1: the `moto` package's server mode, one bucket per test module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from mlflow_helpers import free_port


def s3_environment(endpoint: str) -> dict[str, str]:
    """What pyarrow (and so Ray) and boto3 read: fake credentials, the server as the endpoint."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}


@contextmanager
def s3_server() -> Iterator[tuple[str, str]]:
    """(endpoint, bucket): a moto S3 server with an empty bucket, the environment pointing at
    it for this process and every process it starts (Ray's included) while the block runs."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    saved = {key: os.environ.get(key) for key in s3_environment(endpoint)}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, "moto server exited"
                assert time.monotonic() < deadline, "moto server did not answer in 60 s"
                time.sleep(0.3)
        os.environ.update(s3_environment(endpoint))
        bucket = f"amid-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield endpoint, bucket
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def object_keys(bucket: str, prefix: str = "") -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))
