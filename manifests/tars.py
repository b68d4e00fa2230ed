"""Reading tar shards, the one reader of every stage: fast header parsing for plain shards, shared
by ``wit shard`` (which indexes downloaded shards, :func:`tar_members`) and ``wit eval`` (which
reads CLIP_benchmark-layout shards), a forward stream of file members for whoever reads a shard
once from its start (:func:`read_files`: filter, its reference sets, eval's fallback, the pipeline
report), and a forward reader with byte offsets for ``wit train`` (:func:`stream_members`, which
resumes mid-shard). The image members' extensions are defined here once. Writing shards is
:mod:`.tarwrite`'s.

tarfile's header parser costs ~80 µs a member, most of the time spent on a shard of small images.
img2dataset, webdataset's writers and ``wit`` itself write plain ustar/GNU members, whose headers
:func:`plain_members` parses in a few µs; an archive with extended headers (pax, GNU long names)
or base-256 sizes gets ``None`` back, and the caller hands it to tarfile, which knows them all.
"""

from __future__ import annotations

import functools
import io
import mmap
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any, NamedTuple

from . import storage

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
Read = Callable[[int, int], Any]  # (offset, size) -> a bytes-like of at most size bytes
TarError = tarfile.TarError  # what tarfile raises on an archive it cannot read

# The extensions (lower case) of the members that hold a sample's image, defined here once. Filter
# (downloaded shards and reference sets) and shard (which indexes downloaded shards) take any of
# them as the image.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# The sample readers' (``wit train``, the pipeline report): a sample's image is its member of the
# first of these it has.
SAMPLE_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS[:4]
# The same four in the order ``wit eval`` tries them in a CLIP_benchmark-layout shard (and in an
# image folder, where the order does not matter).
CLIP_BENCHMARK_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")


class BadTar(ValueError):
    """A header that does not parse, or a member whose data the file ends inside."""


class Item(NamedTuple):
    """A file member read forward by :func:`stream_members`, with where it lies in the file."""

    name: str
    data: bytes
    offset: int  # of its first header (a pax or GNU long-name header included)
    end: int  # just past its data's padding: where the next member's header starts


def stream_members(fh: IO[bytes], start: int = 0, compressed: bool = False) -> Iterator[Item]:
    """The file members of the tar ``fh`` from byte ``start`` on (a header boundary a previous read
    gave as ``offset`` or ``end``), read forward through tarfile's stream mode, so every header kind
    tarfile knows works. A seekable handle seeks (an fsspec file then reads only from there); a
    compressed archive has no byte to seek to and is read from its start, members before
    ``start`` (offsets in the uncompressed stream) passed over. Raises ``tarfile.TarError`` on a
    member cut short or a header that does not parse, wherever it is: tarfile's stream mode ends
    quietly at a bad header past the first, so where it stopped is checked to be an end of archive
    (zero blocks, or the end of the file)."""
    base = 0
    if start and not compressed:
        fh.seek(start)
        if not fh.read(BLOCK).strip(b"\0"):
            return  # the archive ends here (its end blocks, or the end of a tar written without them)
        fh.seek(start)
        base = start
    tar = tarfile.open(fileobj=fh, mode="r|*" if compressed else "r|")
    for member in tar:
        if member.offset + base < start:
            continue
        if not member.isfile():
            continue
        got = tar.extractfile(member)
        data = got.read() if got is not None else b""
        if len(data) != member.size:
            raise tarfile.ReadError(f"unexpected end of data in {member.name}")
        end = member.offset_data + member.size + (-member.size % BLOCK)
        yield Item(member.name, data, base + member.offset, base + end)
    if not compressed:
        stop = base + tar.offset
        fh.seek(stop)
        block = fh.read(BLOCK)
        if block.strip(b"\0"):
            why = "truncated header" if len(block) < BLOCK else "a header that does not parse"
            raise tarfile.ReadError(f"{why} at byte {stop}")


class File(NamedTuple):
    """A file member met by :func:`read_files`: its name, where its data starts in the file (None
    in a compressed archive, where it is no byte offset of the file) and how to read its data."""

    name: str
    offset: int | None
    read: Callable[[], bytes]  # its data: call it before the next member (a stream is read once)


def read_files(fh: IO[bytes], compressed: bool = True) -> Iterator[File]:
    """The file members of the tar ``fh``, read forward once through tarfile's stream mode, so a
    remote file is read sequentially, never seeked, and every header kind tarfile knows works;
    a member whose data is not read is passed over. ``compressed``: a gzip, bzip2 or xz archive is
    read too (False: a plain tar only). Raises ``tarfile.TarError`` at once on a first header that
    does not parse, and while iterating on a member cut short; like tarfile it ends quietly at a
    bad header past the first (:func:`stream_members` checks where it stopped instead)."""
    tar = tarfile.open(fileobj=fh, mode="r|*" if compressed else "r|")
    return _files(tar)


def _files(tar: tarfile.TarFile) -> Iterator[File]:
    with tar:
        plain = getattr(tar.fileobj, "comptype", "tar") == "tar"
        for member in tar:
            if member.isfile():
                yield File(member.name, member.offset_data if plain else None, functools.partial(_data, tar, member))


def _data(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    return tar.extractfile(member).read()


class Member(NamedTuple):
    name: str  # with its ustar prefix folder, if any
    is_file: bool
    offset: int  # of the data
    size: int


@contextmanager
def random_access(url: str) -> Iterator[Read]:
    """``read(offset, size)`` over the file at ``url``: slices of a memory map for a local file
    (no copy, no system call), seek and read on any other (fsspec's read-ahead keeps ascending
    offsets to few requests). A read past the end returns what there is."""
    with storage.open_url(url, "rb") as fh:
        try:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            mm = None  # not a local file, or an empty one (a zero-length map is refused)
        if mm is None:

            def read(offset: int, size: int) -> bytes:
                fh.seek(offset)
                return fh.read(size)

            yield read
            return
        view = memoryview(mm)
        try:
            yield lambda offset, size: view[offset : offset + size]
        finally:
            view.release()
            with suppress(BufferError):  # slices still held: the map closes when the last goes
                mm.close()


def tar_members(url: str, checksums: bool = True) -> list[Member]:
    """Every member of the tar shard at ``url``, from its headers alone: :func:`plain_members` over
    :func:`random_access` (a memory map when local, ranged reads otherwise), or tarfile's for an
    archive with extended headers (pax, GNU long names). Raises :class:`BadTar` or
    ``tarfile.TarError`` on one it cannot read."""
    with random_access(url) as read:
        members = plain_members(read, checksums=checksums)
    if members is not None:
        return members
    with storage.open_url(url, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        return [Member(m.name, m.isfile(), m.offset_data, m.size) for m in tar]


def plain_members(read: Read, checksums: bool = True) -> list[Member] | None:
    """Every member of a plain ustar/GNU archive, from its headers alone; None when the archive
    has a header kind this parser leaves to tarfile. Raises :class:`BadTar` on a header that does
    not parse or a member cut short by the end of the file (an archive may end without its two
    zero blocks, as tarfile accepts). ``checksums=False`` checks only the first header's (is it a
    tar at all?): for a caller that checks every member's bytes against a digest anyway."""
    members: list[Member] = []
    offset = 0
    while True:
        header = bytes(read(offset, BLOCK))
        if not header or header == ZERO_BLOCK:
            return members
        if len(header) < BLOCK:
            raise BadTar(f"the file ends inside a header at byte {offset}")
        if (checksums or offset == 0) and not _checksum_ok(header):
            raise BadTar(f"bad header checksum at byte {offset}")
        kind = header[156:157]
        size_field = header[124:136]
        if kind not in (b"0", b"\0", b"5") or size_field[:1] in (b"\x80", b"\xff"):
            return None
        try:
            size = int(size_field.rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise BadTar(f"bad header at byte {offset}") from None
        if size and len(read(offset + BLOCK + size - 1, 1)) != 1:
            raise BadTar(f"the file ends inside the member at byte {offset}")
        name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].rstrip(b"\0").decode("utf-8", "replace") + "/" + name
        members.append(Member(name, kind != b"5", offset + BLOCK, size))
        offset += BLOCK + size + (-size % BLOCK)


def _checksum_ok(header: bytes) -> bool:
    """The header's checksum field against its sum, the field counted as spaces: unsigned bytes,
    or signed ones as some old writers summed them (tarfile accepts either)."""
    try:
        stored = int(header[148:156].rstrip(b"\0 ").strip() or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 256
    if stored == unsigned:
        return True
    return stored == unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b >= 128)
