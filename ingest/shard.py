"""``wit shard``: the kept rows of a filtered manifest into new webdataset shards, plus the dataset manifest.

Two stages run in order (``SHARD_PHASES``)::

    filtered ──PLAN──▶ OUT/_plan ──WRITE──▶ OUT (dataset)
    (+ downloaded      one partition:       one partition per output shard:
     shards, curated   order, shard of      shards/NNNNNN.tar, SAMPLES rows,
     queries)          each sample, where   shard_index/ row; partition 0 also
                       its image bytes are  shards/sizes.json and CARD.md

PLAN reads the kept FILTERED rows, joins curate's ``page_url`` and ``queries`` (the curated
manifest is ``config.curated`` or found up the run records), and sorts them by a seeded hash of
the uid, so each shard mixes queries and hosts and the order depends on nothing but seed and
rows. Chunks of ``samples_per_shard`` (the last may be short) become the output shards: the
number of shards depends on the global count of kept rows, which is why this is a phase of its
own. It also indexes the downloaded shards' tar headers, so WRITE reads each image with one
ranged read instead of streaming whole source shards. Each output shard's rows go to a side
table ``plan/part-NNNNN.parquet``.

WRITE builds shard ``k`` from plan part ``k``: per sample ``{uid}.{ext}`` (the image bytes as
downloaded; their sha256 is checked against FILTERED's), ``{uid}.txt`` and ``{uid}.json``, in plan
order with members sorted, mtime 0 and uid/gid 0, so the same input and seed give the same bytes.
Local source shards are memory-mapped and the tar stream goes out by ``writev`` over the maps, so
image bytes are never copied in Python; sha256 of the output and of each image run in two threads.
The shard is written to a temporary file and committed by rename or a single put. The dataset
manifest is the SAMPLES main table (uid → shard, key, sha256, ...) plus the SHARDS side table
``shard_index/`` that ``wit manifest verify`` checks every shard against. Partition 0 also commits
``shards/sizes.json`` (open_clip_train's ``get_dataset_size`` reads it next to the shards) and the
dataset card (:mod:`.card`); both follow from the plan alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from wit.manifests import storage
from wit.manifests.manifest import FileInfo, ManifestRef, open_manifest, read_part, write_part
from wit.manifests.runrecord import read_run_record
from wit.manifests.schemas import SAMPLES, SHARDS, with_kind
from wit.manifests.stage import Partition, PartitionResult, StageError
from wit.manifests.tars import BLOCK, BadTar, plain_members, random_access

from .filter import IMAGE_EXTENSIONS, find_upstream

PLAN_KIND = "shard_plan"
PLAN_TABLE = "plan"
SHARD_INDEX = "shard_index"
SIZES = "shards/sizes.json"
# Planted delay for the kill test, outside the config so a re-run has the very same config:
# every partition but the first sleeps this many seconds before it starts.
DELAY_ENV = "WIT_SHARD_TEST_DELAY"

PLAN_SCHEMA = with_kind(
    pa.schema(
        [
            pa.field("shard", pa.string(), nullable=False),  # the output shard
            pa.field("samples", pa.int64(), nullable=False),
            pa.field("plan", pa.string(), nullable=False),  # its rows: plan/part-NNNNN.parquet
        ]
    ),
    PLAN_KIND,
)
PLAN_ROWS_SCHEMA = with_kind(
    pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("url", pa.string(), nullable=False),
            pa.field("text", pa.string()),
            pa.field("page_url", pa.string()),
            pa.field("queries", pa.list_(pa.string())),
            pa.field("sha256", pa.string(), nullable=False),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("phash", pa.string()),
            pa.field("clip_score", pa.float32()),
            pa.field("ext", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),  # downloaded shard, relative
            pa.field("offset", pa.int64(), nullable=False),  # of the image bytes in it
            pa.field("size", pa.int64(), nullable=False),
        ]
    ),
    "shard_plan_rows",
)


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """What ``wit shard`` does."""

    samples_per_shard: int = 10000
    seed: int = 0
    curated: str | None = None  # None: found up the run records of the filtered manifest
    card: bool = True  # write CARD.md and its plots
    grid_samples: int = 16  # images in the card's sample grid

    def __post_init__(self) -> None:
        if not isinstance(self.samples_per_shard, int) or self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be a positive integer, got {self.samples_per_shard!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.grid_samples, int) or not 0 <= self.grid_samples <= 100:
            raise ValueError(f"grid_samples must be in [0, 100], got {self.grid_samples!r}")


def shard_name(index: int) -> str:
    return f"shards/{index:06d}.tar"


def order_key(seed: int, uid: str) -> bytes:
    """The sort key of a sample: a seeded hash, so shards mix queries and hosts reproducibly."""
    return hashlib.blake2b(f"{seed}\x1f{uid}".encode(), digest_size=8).digest()


# ---------------------------------------------------------------------------------------------
# PLAN


def index_tar(url: str, keys: set[str]) -> dict[str, tuple[str, int, int]]:
    """``key → (extension, data offset, size)`` of the image members of one tar shard.

    Only headers are read, skipping each member's data (through a memory map when the shard is
    local, ranged reads otherwise; :mod:`wit.manifests.tars`); an archive with extended headers
    (pax, GNU long names) is handed to tarfile. Header checksums past the first are not summed:
    WRITE checks every image's bytes against filter's sha256, which a misread header cannot pass.
    """
    with random_access(url) as read:
        try:
            members = plain_members(read, checksums=False)
        except BadTar as exc:
            raise StageError(f"{url}: not a readable tar shard ({exc})") from exc
    if members is None:
        return _index_with_tarfile(url, keys)
    found: dict[str, tuple[str, int, int]] = {}
    for m in members:
        _note(found, keys, m.name, m.is_file, m.offset, m.size)
    return found


def _note(found: dict, keys: set[str], name: str, is_file: bool, offset: int, size: int) -> None:
    key, dot, ext = name.rsplit("/", 1)[-1].partition(".")
    if is_file and dot and key in keys and ext.lower() in IMAGE_EXTENSIONS:
        found.setdefault(key, (ext.lower(), offset, size))


def _index_with_tarfile(url: str, keys: set[str]) -> dict[str, tuple[str, int, int]]:
    found: dict[str, tuple[str, int, int]] = {}
    with storage.open_url(url, "rb") as fh:
        try:
            with tarfile.open(fileobj=fh, mode="r:") as tar:
                for member in tar:
                    _note(found, keys, member.name, member.isfile(), member.offset_data, member.size)
        except tarfile.TarError as exc:
            raise StageError(f"{url}: not a readable tar shard ({exc})") from exc
    return found


def plan_rows(filtered: pa.Table, curated: pa.Table | None, seed: int) -> pa.Table:
    """Kept FILTERED rows joined with curate's page_url and queries, in the seeded shard order."""
    rows = filtered.filter(filtered.column("keep"))
    if curated is not None:
        # Acero's join cannot carry list columns: look each uid up in the curated uids instead.
        at = pc.index_in(rows.column("uid"), value_set=curated.column("uid"))
        rows = rows.append_column("page_url", curated.column("page_url").take(at))
        rows = rows.append_column("queries", curated.column("queries").take(at))
    else:
        rows = rows.append_column("page_url", pa.nulls(rows.num_rows, pa.string()))
        rows = rows.append_column("queries", pa.nulls(rows.num_rows, pa.list_(pa.string())))
    keys = [order_key(seed, u) for u in rows.column("uid").to_pylist()]
    rows = rows.append_column("_order", pa.array(keys, pa.binary()))
    return rows.sort_by([("_order", "ascending"), ("uid", "ascending")]).drop_columns(["_order"])


class ShardPlan:
    """Phase 1 of shard: order the kept rows and cut them into shards (module docstring)."""

    name = "shard-plan"
    kind = PLAN_KIND
    schema = PLAN_SCHEMA

    def partitions(self, config: ShardConfig, inputs: list[ManifestRef]) -> list[Partition]:
        if len(inputs) != 1 or inputs[0].kind not in (None, "filtered"):
            raise StageError("shard takes exactly one input: a filtered manifest")
        url = inputs[0].url
        downloaded = find_upstream(url, "downloaded")
        if downloaded is None:
            raise StageError(f"{url}: no downloaded manifest up its lineage; the shards' images live there")
        curated = storage.normalize(config.curated) if config.curated else None
        if curated is None:
            found = find_upstream(url, "curated")
            curated = found.url if found else None
        return [Partition(index=0, source=url, params=(downloaded.url, curated))]

    def run_partition(self, config: ShardConfig, partition: Partition, out: str) -> PartitionResult:
        downloaded, curated_url = partition.params
        filtered = open_manifest(partition.source, expect_kind="filtered").table(
            ["uid", "url", "text", "sha256", "width", "height", "shard", "key", "keep", "phash", "clip_score"]
        )
        curated = None
        if curated_url:
            curated = open_manifest(curated_url, expect_kind="curated").table(["uid", "page_url", "queries", "keep"])
            curated = curated.filter(curated.column("keep"))
        rows = plan_rows(filtered, curated, config.seed)
        if rows.num_rows == 0:
            raise StageError(f"{partition.source}: no kept samples to shard")
        # Where each image's bytes are in the downloaded shards.
        sources = rows.column("shard").to_pylist()
        src_keys = rows.column("key").to_pylist()
        wanted: dict[str, set[str]] = {}
        for s, k in zip(sources, src_keys, strict=True):
            wanted.setdefault(s, set()).add(k)
        located: dict[tuple[str, str], tuple[str, int, int]] = {}
        for s in sorted(wanted):
            for k, where in index_tar(storage.join(downloaded, s), wanted[s]).items():
                located[(s, k)] = where
        missing = [(s, k) for s, k in zip(sources, src_keys, strict=True) if (s, k) not in located]
        if missing:
            raise StageError(
                f"{downloaded}/{missing[0][0]}: has no image for key {missing[0][1]} (changed since filter?)"
            )
        where = [located[(s, k)] for s, k in zip(sources, src_keys, strict=True)]
        table = pa.table(
            {
                **{
                    n: rows.column(n)
                    for n in (
                        "uid",
                        "url",
                        "text",
                        "page_url",
                        "queries",
                        "sha256",
                        "width",
                        "height",
                        "phash",
                        "clip_score",
                    )
                },
                "ext": [w[0] for w in where],
                "source": sources,
                "offset": pa.array([w[1] for w in where], pa.int64()),
                "size": pa.array([w[2] for w in where], pa.int64()),
            }
        )
        n = config.samples_per_shard
        files, index_rows = [], []
        for k, start in enumerate(range(0, table.num_rows, n)):
            chunk = table.slice(start, n)
            info = write_part(out, k, chunk, PLAN_ROWS_SCHEMA, table_name=PLAN_TABLE)
            files.append(info)
            index_rows.append({"shard": shard_name(k), "samples": chunk.num_rows, "plan": info.name})
        queries = Counter(q for qs in table.column("queries").to_pylist() for q in (qs or ()))
        return PartitionResult(
            table=pa.Table.from_pylist(index_rows, schema=PLAN_SCHEMA),
            counts={"kept": table.num_rows},
            files=files,
            extra={
                "downloaded": downloaded,
                "curated": curated_url,
                "samples": table.num_rows,
                "shards": len(index_rows),
            },
            tallies={"queries": dict(queries)},
        )


# ---------------------------------------------------------------------------------------------
# WRITE


RECORD = 20 * BLOCK  # tar pads the archive to whole records, as tarfile does
IOV_MAX = 1020  # pieces per writev; Linux takes 1024
# A ustar header is name[100] mode[8] uid[8] gid[8] size[12] mtime[12] chksum[8] type[1]
# linkname[100] magic+version[8] and zeros to 512 bytes. All but name, size and checksum are fixed.
_MODE_IDS = b"0000444\0" + b"0000000\0" * 2
_MTIME = b"00000000000\0"
_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(BLOCK - 265)
_FIXED_SUM = sum(_MODE_IDS) + sum(_MTIME) + sum(b" " * 8) + sum(_TAIL)  # the checksum counts itself as spaces
_MAX_SIZE = 8**11 - 1


def ustar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header for a regular file, with everything that could vary fixed.

    mtime 0, mode 0444, uid/gid 0 and empty owner names: identical input gives identical bytes.
    Built by hand from fixed pieces (the checksum is the fixed pieces' sum plus name's and size's)
    because tarfile spends ~60 µs per member building one, which for 30 kB web images is most of
    the resharding time; the tests read the shards back with tarfile.
    """
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise StageError(f"member name {name!r} is longer than a ustar header holds")
    if size > _MAX_SIZE:
        raise StageError(f"member {name!r} is {size} bytes, more than a ustar header holds")
    size_field = b"%011o\0" % size
    checksum = _FIXED_SUM + sum(raw) + sum(size_field)
    return b"".join((raw, bytes(100 - len(raw)), _MODE_IDS, size_field, _MTIME, b"%06o\0 " % checksum, _TAIL))


_PADDING = [bytes(n) for n in range(BLOCK)]
_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def sample_json(row: dict) -> bytes:
    meta = {
        "uid": row["uid"],
        "url": row["url"],
        "page_url": row["page_url"],
        "queries": row["queries"] or [],
        "sha256": row["sha256"],
        "width": row["width"],
        "height": row["height"],
        "scores": {"phash": row["phash"], "clip_score": row["clip_score"]},
    }
    return _JSON.encode(meta).encode()


def load_images(downloaded: str, rows: pa.Table, stack: ExitStack) -> list:
    """The image bytes of ``rows`` in row order, each a buffer: zero-copy slices of memory-mapped
    source shards when local (they live as long as ``stack``), else read per source shard in
    offset order, so an object store sees ascending ranged reads."""
    sources = rows.column("source").to_pylist()
    offsets = rows.column("offset").to_pylist()
    sizes = rows.column("size").to_pylist()
    images: list = [None] * len(sources)
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_source.setdefault(s, []).append(i)
    for source, idx in sorted(by_source.items()):
        url = storage.join(downloaded, source)
        read = stack.enter_context(random_access(url))
        for i in sorted(idx, key=offsets.__getitem__):
            images[i] = read(offsets[i], sizes[i])
            if len(images[i]) != sizes[i]:
                raise StageError(f"{url}: ends inside the image of {rows['uid'][i]}")
    return images


def _first_mismatch(images: list, expected: list[str]) -> int:
    """The index of the first image whose sha256 is not the expected one, or -1."""
    for i, (data, digest) in enumerate(zip(images, expected, strict=True)):
        if hashlib.sha256(data).hexdigest() != digest:
            return i
    return -1


def _hash_all(sha, pieces: list) -> None:
    for piece in pieces:
        sha.update(piece)


def _writev_all(fd: int, pieces: list) -> int:
    """Write ``pieces`` in order with few ``writev`` calls (the kernel copies straight from the
    source shards' memory maps); returns the byte count."""
    total = 0
    for start in range(0, len(pieces), IOV_MAX):
        chunk = pieces[start : start + IOV_MAX]
        want = sum(map(len, chunk))
        done = os.writev(fd, chunk)
        if done < want:  # a short write (a signal, a full disk): finish piece by piece
            rest = b"".join(chunk)[done:]
            while rest:
                rest = rest[os.write(fd, rest) :]
        total += want
    return total


def write_shard(url: str, rows: pa.Table, images: list) -> FileInfo:
    """Write one webdataset shard atomically; returns its sha256, size and sample count.

    The tar stream goes out as ``writev`` calls over headers and the images' buffers (zero-copy
    slices of the source shards when local), so no image is copied in Python. Two threads hash
    beside it (hashlib lets go of the GIL): the output stream for the manifest, and each image
    against the sha256 filter saw. A mismatch aborts before the commit, so no shard holds an
    unchecked image.
    """
    cols = {n: rows.column(n).to_pylist() for n in PLAN_ROWS_SCHEMA.names if n not in ("source", "offset", "size")}
    uids, exts, texts = cols["uid"], cols["ext"], cols["text"]
    n = len(uids)
    sha = hashlib.sha256()
    written = 0
    with ThreadPoolExecutor(1) as hasher, ThreadPoolExecutor(1) as checker:
        check = checker.submit(_first_mismatch, images, cols["sha256"])
        pending: deque = deque()
        with storage.atomic_writer(url) as fh:
            fh.flush()
            fd = fh.fileno()

            def flush(pieces: list) -> None:
                nonlocal written
                pending.append(hasher.submit(_hash_all, sha, pieces))  # in order: one hashing thread
                written += _writev_all(fd, pieces)
                while len(pending) > 4:  # bounds the batches held for hashing
                    pending.popleft().result()

            batch: list = []
            for i in range(n):
                uid, image = uids[i], images[i]
                meta = sample_json({k: cols[k][i] for k in SAMPLE_META})
                text = (texts[i] or "").encode()
                # webdataset groups a sample's members by key prefix; members sorted by extension
                for ext, data in sorted(((exts[i], image), ("json", meta), ("txt", text)), key=_first):
                    size = len(data)
                    batch += (ustar_header(f"{uid}.{ext}", size), data, _PADDING[-size % BLOCK])
                if len(batch) >= IOV_MAX:
                    flush(batch)
                    batch = []
            end = 2 * BLOCK  # two zero blocks end the archive; then pad to a whole record
            tail = sum(map(len, batch)) + written
            batch.append(bytes(end + (-(tail + end) % RECORD)))
            flush(batch)
            for fut in pending:
                fut.result()
            bad = check.result()
            if bad >= 0:
                raise StageError(f"{url}: the image of {uids[bad]} is not the one filter saw (sha256 differs)")
    return FileInfo(name="", sha256=sha.hexdigest(), bytes=written, rows=n)


SAMPLE_META = ("uid", "url", "page_url", "queries", "sha256", "width", "height", "phash", "clip_score")


def _first(pair: tuple) -> Any:
    return pair[0]


class ShardWrite:
    """Phase 2 of shard: one output shard per partition (module docstring)."""

    name = "shard"
    kind = "samples"

    def partitions(self, config: ShardConfig, inputs: list[ManifestRef]) -> list[Partition]:
        if len(inputs) != 1 or inputs[0].kind not in (None, PLAN_KIND):
            raise StageError("shard's write phase takes exactly one input: the plan phase's output")
        plan_url = inputs[0].url
        record = read_run_record(plan_url)
        if record is None:
            raise StageError(f"{plan_url}: not a finished plan phase of shard (no _run.json)")
        downloaded = record.extra["downloaded"][0]
        plan = open_manifest(plan_url, expect_kind=PLAN_KIND).table()
        names = plan.column("plan").to_pylist()
        return [
            Partition(index=k, source=storage.join(plan_url, name), params=(downloaded, plan_url))
            for k, name in enumerate(names)
        ]

    def run_partition(self, config: ShardConfig, partition: Partition, out: str) -> PartitionResult:
        delay = os.environ.get(DELAY_ENV)
        if delay and partition.index > 0:
            time.sleep(float(delay))
        downloaded, plan_url = partition.params
        rows = read_part(partition.source)
        name = shard_name(partition.index)
        with ExitStack() as stack:
            images = load_images(downloaded, rows, stack)
            info = write_shard(storage.join(out, name), rows, images)
            grid = [bytes(b) for b in images[: config.grid_samples]] if partition.index == 0 else []
            del images  # the memory map's slices: the maps close with the stack
        shard_file = FileInfo(name=name, sha256=info.sha256, bytes=info.bytes, rows=rows.num_rows)
        index = write_part(
            out,
            partition.index,
            pa.table({"shard": [name], "samples": [rows.num_rows], "bytes": [info.bytes], "sha256": [info.sha256]}),
            SHARDS,
            table_name=SHARD_INDEX,
        )
        files = [shard_file, index]
        if partition.index == 0:
            files += dataset_files(config, plan_url, out, rows.slice(0, len(grid)).to_pylist(), grid)
        samples = pa.table(
            {
                **{n: rows.column(n) for n in SAMPLES.names if n not in ("shard", "key")},
                "shard": pa.array([name] * rows.num_rows, pa.string()),
                "key": rows.column("uid"),
            }
        )
        return PartitionResult(
            table=samples,
            counts={"kept": rows.num_rows},
            files=files,
            extra={"shard": {"name": name, "samples": rows.num_rows, "bytes": info.bytes}},
        )


def dataset_files(
    config: ShardConfig, plan_url: str, out: str, rows: list[dict], images: list[bytes]
) -> list[FileInfo]:
    """``shards/sizes.json`` and the card: everything they say follows from the plan."""
    plan = open_manifest(plan_url, expect_kind=PLAN_KIND).table()
    sizes = {
        storage.basename(s): n
        for s, n in zip(plan.column("shard").to_pylist(), plan.column("samples").to_pylist(), strict=True)
    }
    files = [_commit(out, SIZES, (json.dumps(sizes, indent=1, sort_keys=True) + "\n").encode())]
    if config.card:
        from .card import render_card

        for name, data in render_card(plan_url, rows[: config.grid_samples], images[: config.grid_samples]).items():
            files.append(_commit(out, name, data))
    return files


def _commit(out: str, name: str, data: bytes) -> FileInfo:
    storage.write_bytes(storage.join(out, name), data)
    return FileInfo(name=name, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


PLAN = ShardPlan()
WRITE = ShardWrite()
# (stage, subfolder of OUT): run in order, each with the previous phase's finished ref as input.
SHARD_PHASES: list[tuple[Any, str]] = [(PLAN, "_plan"), (WRITE, "")]
