"""Writing tar shards, the one writer of every stage: the I/O engine of ``wit shard``'s WRITE phase
(:func:`write_shard`), the small archives ``wit eval`` exports (:func:`tar_bytes`) and download's
re-keyed copy of img2dataset's shards (:func:`rename_members`). Reading them is :mod:`.tars`'s.

A dataset shard is built so that the same rows give the same bytes: per sample ``{uid}.{ext}``
(the image bytes as downloaded), ``{uid}.json`` and ``{uid}.txt``, members sorted, mtime 0,
uid/gid 0, headers from a template (:func:`ustar_headers`). The tar stream is gathered in reused
4 MB buffers (:class:`TarStream`): images are read from local source shards straight into them
(``preadv``, no copy in Python, :class:`Span`) and checked there while in cache, and each full
buffer is written with one ``write`` by one thread while another hashes it for the manifest
(``O_DIRECT`` for a durable local commit, ``WIT_FSYNC=1``: to disk while the next buffers fill).
A shard's images are read in a shuffled order, so on a cold page cache each would be a small
random read; a thread (:class:`Readahead`) asks the kernel for them in file order, then the next
shard's, so the disk sees ascending reads and the writer finds them in cache.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import mmap
import os
import tarfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from xxhash import xxh3_128

from . import storage
from .manifest import FileInfo
from .stage import StageError
from .tars import BLOCK, random_access

# ---------------------------------------------------------------------------------------------
# headers and sample members


RECORD = 20 * BLOCK  # tar pads the archive to whole records, as tarfile does
# A ustar header is name[100] mode[8] uid[8] gid[8] size[12] mtime[12] chksum[8] type[1]
# linkname[100] magic+version[8] and zeros to 512 bytes. All but name, size and checksum are fixed.
_TEMPLATE = np.frombuffer(
    bytes(100)
    + b"0000444\0"  # mode
    + b"0000000\0" * 2  # uid, gid
    + bytes(12)  # size, filled in
    + b"00000000000\0"  # mtime 0
    + b" " * 8  # the checksum counts its own field as spaces
    + b"0"  # a regular file
    + bytes(100)
    + b"ustar\x0000"
    + bytes(BLOCK - 265),
    np.uint8,
)
_MAX_SIZE = 8**11 - 1
_OCTAL_11 = np.arange(30, -1, -3)  # shifts of 11 octal digits, most significant first
_OCTAL_6 = np.arange(15, -1, -3)


def ustar_headers(names: list[str], sizes: list[int]) -> np.ndarray:
    """POSIX ustar headers for regular files, one 512-byte row each, with everything that could vary fixed.

    mtime 0, mode 0444, uid/gid 0 and empty owner names: identical input gives identical bytes.
    Built with numpy from a template (name, size and checksum filled in for all rows at once)
    because tarfile spends ~60 µs per member building one, which for 30 kB web images is most of
    the resharding time; the tests read the shards back with tarfile.
    """
    raw = [name.encode("utf-8") for name in names]
    for name, r, size in zip(names, raw, sizes, strict=True):
        if len(r) > 100:
            raise StageError(f"member name {name!r} is longer than a ustar header holds")
        if size > _MAX_SIZE:
            raise StageError(f"member {name!r} is {size} bytes, more than a ustar header holds")
    headers = np.tile(_TEMPLATE, (len(raw), 1))
    headers[:, :100] = np.frombuffer(b"".join(r.ljust(100, b"\0") for r in raw), np.uint8).reshape(-1, 100)
    headers[:, 124:135] = (np.asarray(sizes, np.int64)[:, None] >> _OCTAL_11) % 8 + 48
    checksum = headers.sum(axis=1, dtype=np.int64)
    headers[:, 148:154] = (checksum[:, None] >> _OCTAL_6) % 8 + 48
    headers[:, 154] = 0  # the checksum field is six digits, NUL, space
    return headers


_PADDING = [bytes(n) for n in range(BLOCK)]
_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))
_STR = json.encoder.encode_basestring  # what _JSON quotes strings with


def _json_value(value: Any) -> str:
    kind = type(value)
    if value is None:
        return "null"
    if kind is str:
        return _STR(value)
    if kind is int or (kind is float and math.isfinite(value)):
        return repr(value)
    return _JSON.encode(value)  # NaN and infinities as json.dumps writes them


def sample_json(row: dict) -> bytes:
    """A sample's ``json`` member: what ``json.dumps(..., sort_keys=True, ensure_ascii=False,
    separators=(",", ":"))`` gives for the meta dict, assembled from a template (3× faster)."""
    queries = ",".join(map(_STR, row["queries"] or ()))
    v = _json_value
    return (
        f'{{"height":{v(row["height"])},"page_url":{v(row["page_url"])},"queries":[{queries}],'
        f'"scores":{{"clip_score":{v(row["clip_score"])},"phash":{v(row["phash"])}}},'
        f'"sha256":{v(row["sha256"])},"uid":{v(row["uid"])},"url":{v(row["url"])},"width":{v(row["width"])}}}'
    ).encode()


# ---------------------------------------------------------------------------------------------
# images


class Span(NamedTuple):
    """An image's bytes in a local source shard: read by the kernel straight into the output buffer."""

    fd: int
    offset: int
    size: int


def load_images(downloaded: str, rows: pa.Table, stack: ExitStack, remote: bool = True) -> list:
    """Each row's image, in row order: a :class:`Span` of its local source shard (opened for as
    long as ``stack``), or its bytes from a remote one, read per source shard in offset order so
    an object store sees ascending ranged reads (None instead, without ``remote``)."""
    sources = rows.column("source").to_pylist()
    offsets = rows.column("offset").to_pylist()
    sizes = rows.column("size").to_pylist()
    images: list = [None] * len(sources)
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_source.setdefault(s, []).append(i)
    for source, idx in sorted(by_source.items()):
        url = storage.join(downloaded, source)
        path = storage.local_path(url)
        if path is not None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise StageError(f"{url}: cannot open the downloaded shard ({exc.strerror})") from exc
            stack.callback(os.close, fd)
            for i in idx:
                images[i] = Span(fd, offsets[i], sizes[i])
            continue
        if not remote:
            continue
        read = stack.enter_context(random_access(url))
        for i in sorted(idx, key=offsets.__getitem__):
            images[i] = read(offsets[i], sizes[i])
            if len(images[i]) != sizes[i]:
                raise StageError(f"{url}: ends inside the image of {rows['uid'][i]}")
    return images


READAHEAD_GAP = 64 << 10  # spans closer than this are asked for as one range


def readahead_ranges(images: list, gap: int = READAHEAD_GAP) -> list[tuple[int, int, int]]:
    """The local images' ``(fd, offset, size)`` in file order, spans less than ``gap`` apart merged."""
    ranges: list[list[int]] = []
    for fd, offset, size in sorted((im.fd, im.offset, im.size) for im in images if type(im) is Span):
        last = ranges[-1] if ranges else None
        if last is not None and last[0] == fd and offset - (last[1] + last[2]) <= gap:
            last[2] = max(last[2], offset + size - last[1])
        else:
            ranges.append([fd, offset, size])
    return [(fd, offset, size) for fd, offset, size in ranges]


class Readahead:
    """Ask the kernel to read a shard's local images in file order while it is written (a
    thread issuing ``POSIX_FADV_WILLNEED``). The plan's order is shuffled, so without it each
    image is a small random read of its own on a cold page cache; with it the disk sees the
    spans in ascending order, many at a time, and the writer finds them in cache. A hint only:
    nothing depends on it having run, and it is a no-op where the OS has no ``posix_fadvise``.
    Enter it after the files are opened, so it is stopped before they are closed."""

    def __init__(self, images: list, then: list = ()):
        """``images`` first, then ``then`` (the next shard's, so its reads start while this one is written)."""
        if hasattr(os, "posix_fadvise"):
            self.ranges = readahead_ranges(images) + readahead_ranges(then)
        else:
            self.ranges = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="wit-shard-readahead", daemon=True)

    def _run(self) -> None:
        for fd, offset, size in self.ranges:
            if self.stop.is_set():
                return
            try:
                os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
            except OSError:  # a file system that refuses the hint reads on demand, as without it
                return

    def __enter__(self) -> Readahead:
        if self.ranges:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def image_bytes(image: Span | bytes) -> bytes:
    if type(image) is Span:
        return os.pread(image.fd, image.size, image.offset)
    return bytes(image)


# ---------------------------------------------------------------------------------------------
# the stream


BUFFER = 4 << 20  # bytes of tar stream gathered before a write (measured best of 0.25-8 MB)
DIRECT_ALIGN = 4096  # O_DIRECT wants offsets, lengths and addresses in whole blocks (512 or 4096 bytes)


def set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; whether it is on now. Off where the OS has no
    such flag or the file system refuses it (tmpfs and some FUSE mounts answer EINVAL)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return on


class TarStream:
    """A shard's tar stream, gathered in reused buffers: small pieces are copied in, images read
    straight into them (``preadv``) and checked there while in cache. Each full buffer goes to
    two threads, one writing it with one ``write``, one hashing it (both let go of the GIL),
    while the next buffer fills. Few large writes go into the page cache at several times the
    speed of one small write per member. Use it as a context manager (it owns the threads).

    With ``direct`` (a durable local commit, ``WIT_FSYNC=1``) the buffers go to disk with
    ``O_DIRECT``: the data has to reach the disk before the commit anyway, and this way it does
    so while the next buffers fill, without a copy into the page cache and without one long
    fsync at the end. The buffers are page-aligned (anonymous ``mmap``) and a whole buffer is
    whole blocks at a whole-block offset; the stream's last, partial block and any write the
    file system refuses (EINVAL) go through the page cache instead, so the bytes are the same.
    """

    def __init__(self, fd: int, size: int | None = None, buffers: int = 3, direct: bool = False):
        size = size or BUFFER
        self.fd = fd
        self.direct = direct and size % DIRECT_ALIGN == 0 and set_direct(fd, True)
        self.hasher = ThreadPoolExecutor(1, "wit-shard-sha256")  # one thread each: in order
        self.writer = ThreadPoolExecutor(1, "wit-shard-write")
        self.buffers = [memoryview(mmap.mmap(-1, size)) for _ in range(buffers)]
        self.pending: list[tuple[Future, ...]] = [()] * buffers  # each buffer's hash and write
        self.current = 0
        self.buffer = self.buffers[0]
        self.pos = 0
        self.total = 0  # bytes handed to the writer
        self.sha = hashlib.sha256()

    def __enter__(self) -> TarStream:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        cancel = exc_type is not None  # the shard is abandoned: skip the writes still queued
        self.hasher.shutdown(cancel_futures=cancel)
        self.writer.shutdown(cancel_futures=cancel)

    def put(self, data) -> None:
        self._append(data)

    def image(self, image: Span | bytes, xxh3: str | None, sha256: str) -> bool:
        """Append an image's bytes; whether they hash to ``xxh3`` (filter's xxh3-128) or, where
        that is None, to ``sha256``. Each stretch is hashed in the buffer, where it was just read."""
        digest = xxh3_128() if xxh3 is not None else hashlib.sha256()
        self._append(image, digest)
        return digest.hexdigest() == (xxh3 if xxh3 is not None else sha256)

    def _append(self, data: Span | bytes, digest=None) -> None:
        """Copy (or, for a :class:`Span`, read) ``data`` into the buffers, a buffer-sized stretch
        at a time, handing each full buffer on; ``digest`` is updated with every stretch."""
        size, done = _size(data), 0
        while done < size:
            k = min(size - done, len(self.buffer) - self.pos)
            slot = self.buffer[self.pos : self.pos + k]
            self._fill(slot, data, done)
            if digest is not None:
                digest.update(slot)
            self.pos += k
            done += k
            if self.pos == len(self.buffer):
                self.flush()

    @staticmethod
    def _fill(slot: memoryview, image: Span | bytes, start: int) -> None:
        if type(image) is not Span:
            slot[:] = memoryview(image)[start : start + len(slot)]
            return
        done = os.preadv(image.fd, [slot], image.offset + start)
        while done < len(slot):  # a short read is not the end of the file on every file system
            got = os.preadv(image.fd, [slot[done:]], image.offset + start + done)
            if got == 0:
                raise StageError("its downloaded shard ends inside it (changed since the plan?)")
            done += got

    def flush(self) -> None:
        """Hand the current buffer to the threads and go on in the next one, once its own hash
        and write are done."""
        if not self.pos:
            return
        chunk = self.buffer[: self.pos]
        hashed = self.hasher.submit(self.sha.update, chunk)
        self.pending[self.current] = (hashed, self.writer.submit(self._write, chunk))
        self.total += self.pos
        self.pos = 0
        self.current = (self.current + 1) % len(self.buffers)
        self.buffer = self.buffers[self.current]
        self.wait(self.current)

    def _write(self, chunk: memoryview) -> None:
        while chunk:  # a short write: a signal, a full disk
            if self.direct:
                whole = len(chunk) - len(chunk) % DIRECT_ALIGN
                try:
                    if whole:
                        chunk = chunk[os.write(self.fd, chunk[:whole]) :]
                        continue
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                # The partial last block, a refused or short direct write: the rest is buffered.
                self.direct = set_direct(self.fd, False)
                continue
            chunk = chunk[os.write(self.fd, chunk) :]

    def wait(self, which: int | None = None) -> None:
        for k in range(len(self.buffers)) if which is None else (which,):
            for fut in self.pending[k]:
                fut.result()  # re-raises a write's error
            self.pending[k] = ()

    def digest(self) -> str:
        """The sha256 of everything written, once all of it is; call after the last :meth:`flush`."""
        self.wait()
        return self.sha.hexdigest()


# ---------------------------------------------------------------------------------------------
# a dataset shard


def write_shard(url: str, rows: pa.Table, images: list) -> FileInfo:
    """Write one webdataset shard atomically; returns its sha256, size and sample count.

    The tar stream goes through a :class:`TarStream`. Each image is checked in the buffer
    against what filter read (its xxh3-128, or its sha256 where filter recorded no xxh3); a
    mismatch aborts before the commit, so no shard holds an unchecked image. Headers, json and
    txt members are built a block of samples at a time into one blob (:func:`_block`).
    """
    cols = {n: rows.column(n).to_pylist() for n in SAMPLE_COLUMNS}
    uids, xxh3s, sha256s = cols["uid"], cols["xxh3"], cols["sha256"]
    n = len(uids)
    direct = storage.durable() and storage.is_local(url)  # to disk before the commit: O_DIRECT (TarStream)
    with storage.atomic_writer(url) as fh, TarStream(fh.fileno(), direct=direct) as stream:
        fh.flush()
        # A block of samples at a time, so building the next block's members (Python, holding
        # the GIL) overlaps the hashing and writing of the buffers before it.
        for first in range(0, n, SAMPLES_PER_BLOCK):
            last = min(first + SAMPLES_PER_BLOCK, n)
            blob, cuts = _block(cols, images, first, last)
            start = 0
            for i, cut in zip(range(first, last), cuts, strict=True):
                stream.put(blob[start:cut])
                try:
                    same = stream.image(images[i], xxh3s[i], sha256s[i])
                except StageError as exc:
                    raise StageError(f"{url}: the image of {uids[i]}: {exc}") from exc
                if not same:
                    raise StageError(f"{url}: the image of {uids[i]} is not the one filter saw (its hash differs)")
                start = cut
            stream.put(blob[start:])
        end = 2 * BLOCK  # two zero blocks end the archive; then pad to a whole record
        stream.put(bytes(end + (-(stream.total + stream.pos + end) % RECORD)))
        stream.flush()
        sha256 = stream.digest()
    return FileInfo(name="", sha256=sha256, bytes=stream.total, rows=n)


SAMPLES_PER_BLOCK = 256


def _block(cols: dict[str, list], images: list, first: int, last: int) -> tuple[memoryview, list[int]]:
    """The tar stream of samples ``first..last-1`` but their image bytes, as one blob, and where
    in it each image goes. Each sample's members are sorted by extension (webdataset groups a
    sample by key prefix), so where the image goes among json and txt depends on its extension."""
    uids, exts = cols["uid"][first:last], cols["ext"][first:last]
    metas = [sample_json(row) for row in _rows(cols, SAMPLE_META, first, last)]
    texts = [(t or "").encode() for t in cols["text"][first:last]]
    layout = {ext: sorted((ext, "json", "txt")) for ext in set(exts)}  # the members' extensions in tar order
    order = [_smalls(layout[ext].index(ext), meta, text) for ext, meta, text in zip(exts, metas, texts, strict=True)]
    sizes = [_size(images[first + k]) if d is None else len(d) for k, members in enumerate(order) for d in members]
    names = [f"{uid}.{member}" for uid, ext in zip(uids, exts, strict=True) for member in layout[ext]]
    headers = memoryview(ustar_headers(names, sizes).reshape(-1))
    pieces: list = []
    cuts: list[int] = []
    pos = 0
    for m, data in enumerate(d for members in order for d in members):
        header, pad = headers[m * BLOCK : (m + 1) * BLOCK], _PADDING[-sizes[m] % BLOCK]
        if data is None:
            pieces += (header, pad)
            cuts.append(pos + BLOCK)
            pos += BLOCK + len(pad)
        else:
            pieces += (header, data, pad)
            pos += BLOCK + len(data) + len(pad)
    return memoryview(b"".join(pieces)), cuts


def _rows(cols: dict[str, list], names: tuple[str, ...], first: int, last: int):
    columns = [cols[k] for k in names]
    for i in range(first, last):
        yield {k: c[i] for k, c in zip(names, columns, strict=True)}


def _smalls(at: int, meta: bytes, text: bytes) -> tuple:
    """A sample's three members' data in tar order, None where the image goes."""
    return ((None, meta, text), (meta, None, text), (meta, text, None))[at]


def _size(image: Span | bytes) -> int:
    return image.size if type(image) is Span else len(image)


SAMPLE_META = ("uid", "url", "page_url", "queries", "sha256", "width", "height", "phash", "clip_score")
SAMPLE_COLUMNS = (*SAMPLE_META, "text", "ext", "xxh3")  # the columns of ``rows`` that write_shard reads


# ---------------------------------------------------------------------------------------------
# other archives


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A ustar archive of ``(name, data)`` members, mode 0644 and mtime 0: the same members give
    the same bytes (``wit eval``'s exported shards, whose digests must be stable)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0  # byte-identical on every export, so the digest is stable
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def rename_members(src: str, dst: str, rename: Callable[[str], str]) -> None:
    """Copy the local tar ``src`` to ``dst`` with every member renamed by ``rename`` and its mtime
    0, the rest of each header and every member's data as they were."""
    with tarfile.open(src) as source, tarfile.open(dst, "w") as out:
        for member in source:
            data = source.extractfile(member) if member.isfile() else None
            member.name, member.mtime = rename(member.name), 0
            out.addfile(member, data)
