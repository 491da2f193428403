"""Artifact store contract, run against LocalStore and against S3Store talking real
HTTP to moto's standalone S3 server (a separate process)."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from edgefleet.controller.config import ControllerConfig, StoreConfig
from edgefleet.controller.errors import NotFound, Unavailable
from edgefleet.controller.store import ArtifactStore, open_store
from edgefleet.controller.store.local import LocalStore
from edgefleet.controller.store.s3 import S3Store
from tests.conftest import free_port, reachable

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not reachable("127.0.0.1", port, timeout=0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto server did not start on port {port} (exit {process.poll()})")
            time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            for name, value in CREDENTIALS.items():
                mp.setenv(name, value)
            yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def make_bucket(endpoint: str) -> str:
    bucket = f"edgefleet-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


def s3_config(endpoint: str, bucket: str, prefix: str = "fleet") -> StoreConfig:
    return StoreConfig(kind="s3", bucket=bucket, prefix=prefix, endpoint_url=endpoint, presign_ttl_s=60)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Store(s3_config(endpoint, make_bucket(endpoint)))


# --- the contract, on both backends -----------------------------------------


def test_put_get_overwrite(store: ArtifactStore) -> None:
    store.put_bytes("repository/metadata/1.root.json", b"one")
    store.put_bytes("repository/metadata/1.root.json", b"two!")
    assert store.get_bytes("repository/metadata/1.root.json") == b"two!"
    assert store.size("repository/metadata/1.root.json") == 4
    assert store.exists("repository/metadata/1.root.json")
    assert not store.exists("repository/metadata/2.root.json")


def test_put_file_and_download_to(store: ArtifactStore, tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000   # > one 1 MiB chunk
    source = tmp_path / "model.onnx"
    source.write_bytes(data)
    store.put_file("repository/targets/digits/1.0.0/abc.cpu-fp32.onnx", source)
    dest = tmp_path / "copy"
    with open(dest, "wb") as f:
        store.download_to("repository/targets/digits/1.0.0/abc.cpu-fp32.onnx", f)
    assert dest.read_bytes() == data


@pytest.mark.parametrize(
    "start,end,expected",
    [(0, None, b"0123456789"), (2, 5, b"2345"), (7, None, b"789"), (9, 9, b"9"), (8, 100, b"89"), (10, None, b"")],
)
def test_open_range(store: ArtifactStore, start: int, end: int | None, expected: bytes) -> None:
    store.put_bytes("blob", b"0123456789")
    assert b"".join(store.open_range("blob", start, end)) == expected


def test_missing_objects_are_not_found(store: ArtifactStore) -> None:
    with pytest.raises(NotFound, match="samples/nope is not in the store"):
        store.get_bytes("samples/nope")
    with pytest.raises(NotFound):
        store.size("samples/nope")
    with pytest.raises(NotFound):
        b"".join(store.open_range("samples/nope", 0, 3))


def test_list_treats_prefix_as_directory(store: ArtifactStore) -> None:
    for key in ("a/b/1", "a/bc/2", "a/b/c/3", "z"):
        store.put_bytes(key, key.encode())
    assert store.list("a/b") == ["a/b/1", "a/b/c/3"]
    assert store.list("a/b/") == ["a/b/1", "a/b/c/3"]
    assert store.list("") == ["a/b/1", "a/b/c/3", "a/bc/2", "z"]
    assert store.list("missing") == []


def test_delete_is_idempotent(store: ArtifactStore) -> None:
    store.put_bytes("samples/d1/x.npz", b"x")
    store.delete("samples/d1/x.npz")
    store.delete("samples/d1/x.npz")
    assert not store.exists("samples/d1/x.npz")
    assert store.list("samples") == []


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/./b", ""])
def test_bad_keys_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(NotFound, match="invalid object key"):
        store.put_bytes(key, b"x")


# --- S3 specifics ----------------------------------------------------------


def test_presigned_url_serves_the_object_over_http(s3_endpoint: str) -> None:
    store = S3Store(s3_config(s3_endpoint, make_bucket(s3_endpoint)))
    store.put_bytes("repository/targets/m/1/x.onnx", b"model bytes")
    url = store.download_url("repository/targets/m/1/x.onnx")
    assert "Signature=" in url or "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"model bytes"
    request = urllib.request.Request(url, headers={"Range": "bytes=6-"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 206 and response.read() == b"bytes"


def test_prefixes_isolate_stores_in_one_bucket(s3_endpoint: str) -> None:
    bucket = make_bucket(s3_endpoint)
    a = S3Store(s3_config(s3_endpoint, bucket, prefix="fleet-a"))
    b = S3Store(s3_config(s3_endpoint, bucket, prefix="/fleet-b/"))
    a.put_bytes("k", b"a")
    b.put_bytes("k", b"b")
    assert (a.get_bytes("k"), b.get_bytes("k")) == (b"a", b"b")
    assert a.list("") == ["k"]
    raw = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert sorted(o["Key"] for o in raw.list_objects_v2(Bucket=bucket)["Contents"]) == ["fleet-a/k", "fleet-b/k"]


def test_open_store_builds_s3_from_config(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = make_bucket(s3_endpoint)
    config = ControllerConfig(home=tmp_path, store=s3_config(s3_endpoint, bucket))
    store = open_store(config)
    assert isinstance(store, S3Store)
    store.put_bytes("x", b"1")
    assert S3Store(s3_config(s3_endpoint, bucket)).get_bytes("x") == b"1"


def test_missing_bucket_is_unavailable(s3_endpoint: str, tmp_path: Path) -> None:
    store = S3Store(s3_config(s3_endpoint, "no-such-bucket-here"))
    with pytest.raises(Unavailable, match="bucket 'no-such-bucket-here' does not exist"):
        store.put_bytes("x", b"1")
    (tmp_path / "f").write_bytes(b"1")
    with pytest.raises(Unavailable, match="NoSuchBucket") as caught:
        store.put_file("x", tmp_path / "f")
    assert "\n" not in str(caught.value)


def test_unreachable_endpoint_is_unavailable(monkeypatch) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    store = S3Store(s3_config(f"http://127.0.0.1:{free_port()}", "bucket"))
    for call in (lambda: store.get_bytes("k"), lambda: store.put_bytes("k", b"1"), lambda: store.list("")):
        with pytest.raises(Unavailable, match="is unreachable") as caught:
            call()
        assert "\n" not in str(caught.value)


def test_store_without_bucket_is_refused() -> None:
    with pytest.raises(Unavailable, match="no bucket"):
        S3Store(StoreConfig(kind="s3"))
