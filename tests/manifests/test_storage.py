"""The storage layer on local paths, file:// URLs and a moto S3 server process over HTTP."""

from __future__ import annotations

import hashlib
import os

import pytest

from wit.manifests import storage
from wit.manifests.storage import StorageError


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    if request.param == "file":
        return f"file://{tmp_path}"
    return request.getfixturevalue("s3_bucket") + "/root"


def test_write_read_list_exists_remove(root):
    a = storage.join(root, "a", "x.bin")
    storage.write_bytes(a, b"hello")
    storage.write_text(storage.join(root, "a", "y.txt"), "héllo")
    storage.write_bytes(storage.join(root, "a", "sub", "z.bin"), b"z")
    assert storage.exists(a) and not storage.exists(storage.join(root, "a", "nope"))
    assert storage.read_bytes(a) == b"hello"
    assert storage.read_text(storage.join(root, "a", "y.txt")) == "héllo"
    assert storage.listdir(storage.join(root, "a")) == ["x.bin", "y.txt"]
    assert storage.listdir(storage.join(root, "a"), recursive=True) == ["sub/z.bin", "x.bin", "y.txt"]
    assert storage.listdir(storage.join(root, "missing")) == []
    assert storage.size(a) == 5
    assert storage.sha256_url(a) == hashlib.sha256(b"hello").hexdigest()
    storage.remove(a)
    assert not storage.exists(a)
    assert storage.listdir(storage.join(root, "a")) == ["y.txt"]


def test_atomic_writer_commits_only_on_success(root):
    url = storage.join(root, "f.bin")
    with storage.atomic_writer(url) as fh:
        fh.write(b"first")
    assert storage.read_bytes(url) == b"first"
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(url) as fh:
            fh.write(b"half-written")
            raise RuntimeError("killed mid-write")
    assert storage.read_bytes(url) == b"first"
    assert storage.listdir(root) == ["f.bin"], "no temporary file may be left visible"


def test_put_file(root, tmp_path):
    src = tmp_path / "local.bin"
    src.write_bytes(b"x" * 3_000_000)
    url = storage.join(root, "up", "big.bin")
    storage.put_file(str(src), url)
    assert storage.size(url) == 3_000_000


def test_missing_file_is_a_storage_error_naming_the_url(root):
    url = storage.join(root, "does-not-exist.bin")
    with pytest.raises(StorageError, match="does-not-exist.bin"):
        storage.read_bytes(url)


def test_s3_endpoint_comes_from_the_environment(s3_bucket, s3_env):
    # The code names no endpoint: only AWS_ENDPOINT_URL says where S3 is. Prove the object is
    # really on the moto server by reading it back with a plain boto3 client.
    import boto3

    storage.write_bytes(f"{s3_bucket}/k/v.txt", b"on moto")
    body = boto3.client("s3").get_object(Bucket=s3_bucket[5:], Key="k/v.txt")["Body"].read()
    assert body == b"on moto"


def test_unreachable_endpoint_is_a_storage_error(monkeypatch):
    import s3fs

    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(StorageError, match="s3://nobucket/key"):
            storage.read_bytes("s3://nobucket/key")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("setting, syncs", [("", 0), ("0", 0), ("1", 3)])
def test_local_commits_fsync_only_when_asked(tmp_path, monkeypatch, setting, syncs):
    """A rename commits against a killed writer; fsync (power loss) is opt-in with WIT_FSYNC=1."""
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    monkeypatch.setenv("WIT_FSYNC", setting)
    storage.write_bytes(str(tmp_path / "a"), b"x")
    with storage.atomic_writer(str(tmp_path / "b")) as fh:
        fh.write(b"y")
    storage.put_file(str(tmp_path / "a"), str(tmp_path / "c"))
    assert len(calls) == syncs
    assert [(tmp_path / n).read_bytes() for n in "abc"] == [b"x", b"y", b"x"]
