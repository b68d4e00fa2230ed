"""Shared fixtures: a real moto S3 server process and a real Ray head on 127.0.0.1, and the toy
stages on sys.path."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
# The toy stages must be importable by name in spawned worker processes; spawn copies sys.path.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# The tiny WebDataset builder of the trainer's tests, importable by this name from any test
# ("train._data" would clash with the `train` source folder, whichever comes first on sys.path).
_spec = importlib.util.spec_from_file_location("wit_train_testdata", TESTS / "train" / "_data.py")
wit_train_testdata = importlib.util.module_from_spec(_spec)
sys.modules["wit_train_testdata"] = wit_train_testdata
_spec.loader.exec_module(wit_train_testdata)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@contextlib.contextmanager
def moto_process() -> Iterator[str]:
    """A moto_server process on a free port of 127.0.0.1, for as long as the block; its endpoint URL."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not found: install the test extra (pip install -e '.[test]')")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# Ray swaps 127.0.0.1 for the address of the outward interface unless this is 0, in the head's
# environment and every client's (this process, and the `wit` subprocesses the tests start).
# Ray reads it when it is imported, and img2dataset imports Ray when it can: set for the whole session.
RAY_CLIENT_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(RAY_CLIENT_ENV)


@contextlib.contextmanager
def ray_head_process(cpus: int = 2, object_store_bytes: int = 100_000_000) -> Iterator[str]:
    """`ray start --head` on 127.0.0.1 in its own process group, for as long as the block; its address.

    It gets its own HOME (a token file that an earlier local `ray.init()` wrote would make it refuse
    clients) and a short temp dir (socket paths over 107 bytes fail). Stopped by killing its process
    group, never by `ray stop`, which would stop every Ray on the machine. The toy stages are on its
    workers' PYTHONPATH.
    """
    exe = shutil.which("ray", path=os.path.dirname(sys.executable))
    if exe is None:
        raise RuntimeError("ray not found: install the ray extra (pip install -e '.[ray]')")
    home = tempfile.mkdtemp(prefix="wr-", dir="/tmp")
    port = free_port()
    env = {
        **os.environ,
        **RAY_CLIENT_ENV,
        "HOME": home,
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
        "RAY_memory_usage_threshold": "0.98",
    }
    log_path = os.path.join(home, "head.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [exe, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             f"--num-cpus={cpus}", "--num-gpus=0", f"--object-store-memory={object_store_bytes}",
             f"--temp-dir={home}/t", "--include-dashboard=false", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240  # a loaded 2-core machine
        while b"Ray runtime started" not in open(log_path, "rb").read():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head failed:\n{open(log_path).read()[-3000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group outlived the head
        proc.wait()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real one-node Ray cluster (2 CPUs, a 100 MB object store), and this process connected to it.

    Yields the environment a `wit` subprocess needs to use it (RAY_ADDRESS and the loopback switch).
    """
    ray = pytest.importorskip("ray", reason="the Ray executor's tests need the ray extra")
    with ray_head_process() as address:
        ray.init(address=address, logging_level="WARNING", configure_logging=False)
        try:
            yield {**RAY_CLIENT_ENV, "RAY_ADDRESS": address}
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def moto_server():
    """A moto_server process, reached over HTTP exactly as a real S3 endpoint (as s3fs's tests do)."""
    with moto_process() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """The standard AWS variables pointing at the moto server; returns them for subprocesses."""
    env = {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    # s3fs caches filesystem instances (and their listings) across tests; a fresh endpoint needs a fresh one
    s3fs.S3FileSystem.clear_instance_cache()
    yield env
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_env):
    """A new empty bucket on the moto server, as an s3:// URL."""
    import boto3

    name = f"wit-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def run_wit():
    """Run the installed `wit` console script in a subprocess; returns CompletedProcess."""

    def run(*args: str, env: dict | None = None, check: bool = False, timeout: float = 120):
        exe = shutil.which("wit", path=os.path.dirname(sys.executable)) or "wit"
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"wit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    return run


def stage_digests(outs: dict[str, str]) -> dict[str, str]:
    """Each data stage's output digest (``outs``: name → folder), filter's taken without ``offset``.

    Filter's rows record where each image lies in the downloaded tars, and img2dataset writes a
    tar's images in the order its threads finish them, so offsets differ between any two downloads
    (the ledger does not): filter's rows without that column stand in for its digest.
    """
    import hashlib

    from wit.manifests.manifest import read_table
    from wit.manifests.runrecord import read_run_record

    got = {}
    for name, url in outs.items():
        record = read_run_record(url)
        if record.output.kind != "filtered":
            got[name] = record.output.digest
            continue
        rows = read_table(url).drop_columns(["offset"])
        got[f"{name} (rows without offset)"] = hashlib.sha256(rows.to_pandas().to_json().encode()).hexdigest()
    return got
