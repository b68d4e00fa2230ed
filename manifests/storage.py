"""All I/O of `wit` goes through here: paths are URLs, resolved by fsspec.

A URL may be a local path, ``file://...``, ``s3://bucket/key`` or any fsspec protocol. S3 endpoint
and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ...), never from code.

Writes are atomic: a local file is written under a temporary name in the same folder and renamed;
an object store ``put`` only becomes visible once the upload completes. So a reader never sees a
half-written part file or shard, whatever kills the writer.

Local commits are not fsynced unless ``WIT_FSYNC=1``: a rename is atomic against a killed process
(the resume contract), and like ``cp``, img2dataset and webdataset we leave power-loss durability
to the user who asks for it (each fsync costs a disk round trip; ``wit manifest verify`` finds a
file that a crash left short).

Every storage failure is raised as :class:`StorageError` with the URL in its message.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import re
import shutil
import socket
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, BinaryIO

import fsspec
from fsspec.core import url_to_fs

CHUNK = 1 << 20
# Every temporary file starts with this, so a leftover of a killed writer is recognisable:
# verify ignores it and the stage driver sweeps away the abandoned ones (see `is_abandoned`).
TMP_PREFIX = ".wit-tmp-"
# After the prefix, the writer's identity: host, pid and the process's start time. Several writers
# share a folder (the slices of a job array, Ray workers on other nodes), so a temporary may only be
# swept once its writer is provably gone, never because somebody else's run started.
_OWNER_RE = re.compile(r"^([0-9a-f]{8})\.(\d+)\.(\d+)-")
# A temporary whose writer cannot be checked (another host, an older wit) is abandoned once it has
# not been written to for this long; a live writer keeps touching its file. WIT_TMP_MAX_AGE overrides.
TMP_MAX_AGE = 3600.0


def env_flag(name: str) -> bool:
    """A yes/no environment switch of wit: ``1``, ``true``, ``yes`` or ``on`` (any case) is yes."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def env_number(name: str, default: float, integer: bool = False) -> float:
    """A number (``integer``: a whole one) from the environment, not negative, or ``default`` when
    unset; anything else is a clear error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


def durable() -> bool:
    """Whether local commits reach the disk before their rename (``WIT_FSYNC=1``, read here and
    nowhere else): an fsync, or a shard's ``O_DIRECT`` writes (:class:`.tarwrite.TarStream`)."""
    return env_flag("WIT_FSYNC")


def _sync(fh) -> None:
    """fsync a flushed local file before its commit, when ``WIT_FSYNC=1`` asks for it."""
    if durable():
        os.fsync(fh.fileno())


class StorageError(RuntimeError):
    """A storage operation failed (missing file, permission, endpoint unreachable, ...)."""


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return url_to_fs(str(url))
    except (ValueError, ImportError) as exc:
        raise StorageError(f"cannot open storage for {url}: {exc}") from exc


def protocol(url: str) -> str:
    """The fsspec protocol of a URL: ``file`` for local paths."""
    fs, _ = _fs(url)
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def is_local(url: str) -> bool:
    return protocol(url) in ("file", "local")


def normalize(url: str) -> str:
    """A canonical form: absolute local paths without ``file://``, remote URLs untouched."""
    url = str(url)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" not in url:
        return os.path.abspath(url)
    return url.rstrip("/")


def join(url: str, *parts: str) -> str:
    url = str(url)
    if "://" in url:
        return posixpath.join(url.rstrip("/"), *parts)
    return os.path.join(url, *parts)


def basename(url: str) -> str:
    return posixpath.basename(str(url).rstrip("/"))


class _errors:
    """Turns the zoo of fsspec/botocore/OS errors into one StorageError naming the URL."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, StorageError):
            return False
        if isinstance(exc, FileNotFoundError):
            raise StorageError(f"not found: {self.url}") from exc
        if isinstance(exc, PermissionError):
            raise StorageError(f"permission denied: {self.url}") from exc
        if isinstance(exc, (OSError, ValueError)):
            raise StorageError(f"storage error on {self.url}: {exc}") from exc
        # botocore raises its own hierarchy for endpoint and credential problems
        if type(exc).__module__.startswith(("botocore", "aiobotocore", "aiohttp")):
            raise StorageError(f"storage error on {self.url}: {exc}") from exc
        return False


def exists(url: str) -> bool:
    fs, path = _fs(url)
    with _errors(url):
        fs.invalidate_cache(path)
        return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = _fs(url)
    with _errors(url):
        fs.invalidate_cache(path)
        return fs.isdir(path)


def size(url: str) -> int:
    fs, path = _fs(url)
    with _errors(url):
        return int(fs.size(path))


def listdir(url: str, recursive: bool = False) -> list[str]:
    """Names (relative to ``url``, ``/``-separated) of the files below a folder, sorted.

    The listing cache is dropped first: other processes (workers, array jobs) write into the
    same folders, and a stale listing would make a finished partition look missing.
    """
    fs, path = _fs(url)
    with _errors(url):
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        if recursive:
            entries = fs.find(path, detail=True).values()
        else:
            entries = fs.ls(path, detail=True)
        # Object stores may hold empty "folder/" marker objects (the S3 console makes them): not files
        found = [e["name"] for e in entries if e.get("type") != "directory" and not e["name"].endswith("/")]
    root = path.rstrip("/") + "/"
    names = []
    for full in found:
        if full.startswith(root):
            names.append(full[len(root) :])
        elif full.lstrip("/").startswith(root.lstrip("/")):
            names.append(full.lstrip("/")[len(root.lstrip("/")) :])
    return sorted(n for n in names if n)


def makedirs(url: str) -> None:
    fs, path = _fs(url)
    with _errors(url):
        fs.makedirs(path, exist_ok=True)


@contextmanager
def open_url(url: str, mode: str = "rb", **options: Any) -> Iterator[IO]:
    """Open a URL for reading; for writing, prefer :func:`atomic_writer`. ``options`` go to
    fsspec's ``open`` (``cache_type="none"``: every read is one ranged request, no read-ahead)."""
    fs, path = _fs(url)
    # Only opening and closing are guarded: an error raised by the caller's own code in the
    # block (a Parquet decoder's, say) is theirs, not a storage error.
    with _errors(url):
        fh = fs.open(path, mode, **options) if options and not is_local(url) else fs.open(path, mode)
    try:
        yield fh
    finally:
        with _errors(url):
            fh.close()


def read_bytes(url: str) -> bytes:
    fs, path = _fs(url)
    with _errors(url):
        return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file atomically."""
    fs, path = _fs(url)
    with _errors(url):
        if is_local(url):
            _local_atomic_write(path, data)
        else:
            fs.pipe_file(path, data)
            fs.invalidate_cache(posixpath.dirname(path))


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def _local_atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = _tmp_name(folder, path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            _sync(fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _tmp_name(folder: str, path: str) -> str:
    return os.path.join(folder, f"{tmp_prefix()}{uuid.uuid4().hex[:12]}-{os.path.basename(path)}")


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """Which process table a pid belongs to: the host name, its boot, and the pid namespace.

    Two containers can share a host name (host networking) with separate pid namespaces, and a
    host reuses pids after a reboot: a pid means something only where all three are the same.
    """
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            parts.append(fh.read().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass  # no /proc: the host name alone
    return f"{zlib.crc32(chr(0).join(parts).encode()):08x}"


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), or None where unknown.

    With the pid it names one process for good: a pid reused by a later process has another start.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count fields after its last ")"
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def tmp_prefix() -> str:
    """The prefix of this process's temporaries: ``.wit-tmp-<host>.<pid>.<start>-``."""
    return _prefix_of(os.getpid())  # a forked child has its own pid, so its own entry


@functools.lru_cache(maxsize=4)
def _prefix_of(pid: int) -> str:
    return f"{TMP_PREFIX}{_host_tag()}.{pid}.{_start_ticks(pid) or 0}-"


def pid_alive(pid: int, start: int = 0) -> bool:
    """Whether process ``pid`` of this host lives, and (``start`` not 0) is the one that started
    at ``start`` (:func:`_start_ticks`), not a later process that reuses its pid."""
    ticks = _start_ticks(pid)
    if ticks is not None:
        return start == 0 or ticks == start
    try:
        os.kill(pid, 0)  # no /proc: the pid alone
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_abandoned(name: str, age: float) -> bool:
    """Whether the temporary ``name``, last written ``age`` seconds ago, has no live writer.

    Its writer ran on this host: abandoned iff that process (pid and start time) is gone. Another
    host, or a name without a writer (an older wit): abandoned once idle for ``WIT_TMP_MAX_AGE``.
    """
    m = _OWNER_RE.match(posixpath.basename(name)[len(TMP_PREFIX) :])
    if m and m.group(1) == _host_tag():
        return not pid_alive(int(m.group(2)), int(m.group(3)))
    return age > env_number("WIT_TMP_MAX_AGE", TMP_MAX_AGE)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_temporary(name: str) -> bool:
    return posixpath.basename(name).startswith(TMP_PREFIX)


def sweep_temporaries(url: str) -> int:
    """Delete the abandoned temporaries (:func:`is_abandoned`) below a local folder; returns how many.

    Temporaries of live writers stay: another slice of the same job array may be writing them.
    """
    if not is_local(url):
        return 0  # object stores never show an unfinished put
    removed = 0
    now = time.time()
    for name in listdir(url, recursive=True):
        if not is_temporary(name):
            continue
        path = os.path.join(local_path(url), name)
        try:
            age = now - os.stat(path).st_mtime
            if is_abandoned(name, age):
                os.unlink(path)
                removed += 1
        except FileNotFoundError:
            pass  # its writer committed or removed it meanwhile
    return removed


def put_file(local_path: str, url: str) -> None:
    """Commit a finished local file to ``url`` atomically (rename locally, single put remotely)."""
    fs, path = _fs(url)
    with _errors(url):
        if is_local(url):
            folder = os.path.dirname(path) or "."
            os.makedirs(folder, exist_ok=True)
            tmp = _tmp_name(folder, path)
            try:
                shutil.copyfile(local_path, tmp)
                if durable():
                    with open(tmp, "rb") as fh:
                        os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            fs.put_file(local_path, path)
            fs.invalidate_cache(posixpath.dirname(path))


@contextmanager
def atomic_writer(url: str) -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at ``url`` only if the block ends without error.

    It writes to a local temporary file first (next to the target when local, so the final
    ``os.replace`` is a same-filesystem rename), then commits it.
    """
    local_target = is_local(url)
    _, path = _fs(url)
    folder = (os.path.dirname(path) or ".") if local_target else None
    with _errors(url):
        if folder:
            os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(), dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            with _errors(url):
                fh.flush()
                if local_target:
                    _sync(fh)
        with _errors(url):
            if local_target:
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; committed files are shared
                os.replace(tmp, path)
            else:
                put_file(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = _fs(url)
    with _errors(url):
        fs.rm(path, recursive=recursive)
        fs.invalidate_cache(posixpath.dirname(path))


def sha256_url(url: str) -> str:
    """Streaming sha256 of a file at a URL."""
    h = hashlib.sha256()
    with open_url(url, "rb") as fh, _errors(url):
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def local_path(url: str) -> str | None:
    """The filesystem path of a local URL, or None for remote ones."""
    if not is_local(url):
        return None
    _, path = _fs(url)
    return path
