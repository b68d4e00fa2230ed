"""``wit shard``: the kept rows of a filtered manifest into new webdataset shards, plus the dataset manifest.

Three stages run in order (``SHARD_PHASES``)::

    filtered ──SPLIT──▶ OUT/_split ──PLAN──▶ OUT/_plan ──WRITE──▶ OUT (dataset)
    (+ downloaded       per filtered or      per bucket:          per output shard:
     shards, curated    curated part: its    its rows in order,   shards/NNNNNN.tar, SAMPLES
     queries)           kept rows in B       a row group per      rows, shard_index/ row;
                        ranges of the order  shard piece, the     partition 0 also
                        key, images located  pieces listed        shards/sizes.json, CARD.md

The samples are ordered by a seeded hash of the uid (:func:`order_key`, then the uid), so each
shard mixes queries and hosts and the order depends on nothing but seed and rows; chunks of
``samples_per_shard`` of that order (the last may be short) are the output shards.
:func:`plan_rows` is that order in one pass over every row, the reference the phases reproduce
without any task holding every row.

SPLIT (one partition per filtered part, and one per curated part; the curated manifest is
``config.curated`` or found up the run records) cuts the kept rows into ``B`` ranges of the
order key: bucket ``⌊key · B / 2⁶⁴⌋`` (:func:`order_buckets`), so bucket order is the global
order. Each part becomes one bucket file (:mod:`wit.manifests.buckets`): a filtered part's kept
rows with where their image bytes are in the downloaded shards, a curated part's kept ``uid``,
``page_url`` and ``queries``. The places come from filter, which recorded the member it read
(FILTERED's ``ext``, ``offset``, ``bytes``); only a source shard it could not locate
(compressed) has its tar headers indexed here, and a filtered part's rows come from few source
shards. So WRITE reads each image with one ranged read instead of streaming whole source
shards. The run record's tally ``bucket_rows`` sums the rows of each bucket over the parts.

PLAN partition ``b`` reads bucket ``b`` of every SPLIT file, joins ``page_url`` and ``queries``
by uid (the first curated row of it, as :func:`plan_rows` does; null without one) and sorts by
(order key, uid). The rows of the buckets before it (the prefix sum of ``bucket_rows``) say
where its rows start in the global order, so which output shards they fall into. It writes them
as the side table part ``plan/part-b.parquet``, one row group per piece of an output shard (a
shard across a bucket boundary has a piece in each bucket, an empty bucket none), and lists the
pieces (shard, samples, part, row group) in its main part; its ``queries`` tally and its
``samples`` and ``shards`` (the shards that start in it) sum to the whole dataset's. ``B``
follows the data (:func:`wit.manifests.buckets.bucket_count`: one bucket per 500,000 filtered
rows, or ``--buckets``), so a task holds one filtered part, one bucket or one shard however large
the dataset; it changes where the order is computed, never the order: the dataset is the same
bytes for any ``B``. Job arrays: ``--part i/N`` slices SPLIT; the slice that finishes it runs
PLAN and WRITE in full.

WRITE builds shard ``k`` from its pieces (a row group of a plan part each): per sample
``{uid}.{ext}`` (the image bytes as downloaded, checked against the xxh3-128 filter recorded when
it read them, or its sha256 for a manifest without one), ``{uid}.txt`` and ``{uid}.json``, in
plan order with members sorted, mtime 0 and uid/gid 0, so the same input and seed give the same
bytes. The tar stream is gathered in reused 4 MB buffers (:class:`TarStream`): images are read
from local source shards straight into them (``preadv``, no copy in Python) and checked there
while in cache, and each full buffer is written with one ``write`` by one thread while another
hashes it for the manifest (``O_DIRECT`` for a durable local commit, ``WIT_FSYNC=1``: to disk
while the next buffers fill). The plan's
order is shuffled, so on a cold page cache each image would be a small random read; a thread
(:class:`Readahead`) asks the kernel for the shard's images in file order, then the next shard's,
so the disk sees ascending reads and the writer finds them in cache. The shard is
written to a temporary file and committed by rename or a single put. The dataset
manifest is the SAMPLES main table (uid → shard, key, sha256, ...) plus the SHARDS side table
``shard_index/`` that ``wit manifest verify`` checks every shard against. Partition 0 also commits
``shards/sizes.json`` (open_clip_train's ``get_dataset_size`` reads it next to the shards) and the
dataset card (:mod:`.card`); both follow from the plan alone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from xxhash import xxh3_128

from wit.manifests import buckets, storage
from wit.manifests.buckets import MAX_BUCKETS
from wit.manifests.buckets import option as buckets_option  # the config field is `buckets`
from wit.manifests.manifest import (
    FileInfo,
    Manifest,
    ManifestError,
    ManifestRef,
    open_manifest,
    part_name,
    write_part,
)
from wit.manifests.options import Option, check_options
from wit.manifests.runrecord import read_run_record
from wit.manifests.schemas import SAMPLES, SHARDS, conform, schema_for, with_kind
from wit.manifests.stage import Partition, PartitionResult, StageError
from wit.manifests.tars import BLOCK, BadTar, plain_members, random_access

from .filter import IMAGE_EXTENSIONS, find_upstream

SPLIT_KIND = "shard_split"
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
            # one row per piece of an output shard, in shard order: a shard is one piece, or one
            # in each bucket it spans
            pa.field("shard", pa.string(), nullable=False),  # the output shard
            pa.field("samples", pa.int64(), nullable=False),  # of this piece
            pa.field("plan", pa.string(), nullable=False),  # the part with its rows: plan/part-NNNNN.parquet
            pa.field("row_group", pa.int32(), nullable=False),  # and which row group of that part
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
            pa.field("xxh3", pa.string()),  # filter's xxh3-128 of the image bytes; null: check the sha256
        ]
    ),
    "shard_plan_rows",
)
# SPLIT's bucket files: a filtered part's kept rows as PLAN writes them but for curate's columns,
# with their order key; a curated part's kept rows' curate columns.
CURATE_COLUMNS = ("page_url", "queries")
SPLIT_ROWS_SCHEMA = with_kind(
    pa.schema(
        [pa.field("order", pa.uint64(), nullable=False)]  # order_key as a big-endian integer
        + [f for f in PLAN_ROWS_SCHEMA if f.name not in CURATE_COLUMNS]
    ),
    "shard_split_rows",
)
SPLIT_CURATED_SCHEMA = with_kind(
    pa.schema([PLAN_ROWS_SCHEMA.field(n) for n in ("uid", *CURATE_COLUMNS)]),
    "shard_split_curated",
)
FILTERED_TABLE, CURATED_TABLE = "filtered", "curated"  # SPLIT's bucket files: filtered/part-NNNNN.arrow
# Null in parts of an older filter: located here, checked by sha256.
FILTERED_COLUMNS = ["uid", "url", "text", "sha256", "width", "height", "shard", "key", "keep", "phash", "clip_score"]
FILTERED_COLUMNS += ["ext", "offset", "bytes", "xxh3"]


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """What ``wit shard`` does."""

    samples_per_shard: int = 10000
    seed: int = 0
    curated: str | None = None  # None: found up the run records of the filtered manifest
    card: bool = True  # write CARD.md and its plots
    grid_samples: int = 16  # images in the card's sample grid
    buckets: int | None = None  # of the shuffle; None: one per ROWS_PER_BUCKET filtered rows

    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("samples-per-shard", "int", samples_per_shard, low=1),
        Option("seed", "int", seed, "Seed of the shuffled sample order.", low=0),
        Option(
            "curated", "path", None, "The curated manifest (default: found through the run records).", metavar="URL"
        ),
        Option("no-card", "bool", False, "Skip CARD.md and its plots."),
        buckets_option("the shuffle", "filtered rows"),
    )

    @classmethod
    def from_options(cls, values: Mapping[str, Any], out: str | None = None) -> ShardConfig:
        v = check_options(cls.OPTIONS, values, "shard")
        return cls(
            samples_per_shard=v["samples_per_shard"],
            seed=v["seed"],
            curated=v["curated"],
            card=not v["no_card"],
            buckets=v["buckets"],
        )

    def __post_init__(self) -> None:
        if not isinstance(self.samples_per_shard, int) or self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be a positive integer, got {self.samples_per_shard!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.grid_samples, int) or not 0 <= self.grid_samples <= 100:
            raise ValueError(f"grid_samples must be in [0, 100], got {self.grid_samples!r}")
        if self.buckets is not None:
            buckets.bucket_count(0, self.buckets)  # raises unless an integer in [1, MAX_BUCKETS]


def shard_name(index: int) -> str:
    return f"shards/{index:06d}.tar"


def order_key(seed: int, uid: str) -> bytes:
    """The sort key of a sample: a seeded hash, so shards mix queries and hosts reproducibly."""
    return hashlib.blake2b(f"{seed}\x1f{uid}".encode(), digest_size=8).digest()


def order_keys(seed: int, uids: Sequence[str]) -> np.ndarray:
    """:func:`order_key` of each uid as a big-endian 64-bit integer, which sorts as the bytes do."""
    return np.frombuffer(b"".join(order_key(seed, u) for u in uids), dtype=">u8").astype(np.uint64)


_LOW32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def order_buckets(keys: np.ndarray, count: int) -> np.ndarray:
    """``⌊key · count / 2⁶⁴⌋`` of each order key: ``count`` ranges of the key, so every row of
    bucket ``b`` comes before every row of bucket ``b + 1`` in the shard order, equal keys share
    a bucket, and the buckets' order is the global order.

    Exact in 64-bit integers: with ``key = hi · 2³² + lo``, it is ``(hi · count + ⌊lo · count /
    2³²⌋) / 2³²`` rounded down, no term of which passes 2⁴⁸ for ``count`` up to 2¹⁶.
    """
    if not 1 <= count <= MAX_BUCKETS:
        raise ValueError(f"bucket count must be in [1, {MAX_BUCKETS}], got {count}")
    keys = np.asarray(keys, dtype=np.uint64)
    n = np.uint64(count)
    return (((keys >> _32) * n + (((keys & _LOW32) * n) >> _32)) >> _32).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# SPLIT and PLAN


def index_tar(url: str, keys: set[str]) -> dict[str, tuple[str, int, int]]:
    """``key → (extension, data offset, size)`` of the image members of one tar shard.

    Only headers are read, skipping each member's data (through a memory map when the shard is
    local, ranged reads otherwise; :mod:`wit.manifests.tars`); an archive with extended headers
    (pax, GNU long names) is handed to tarfile. Header checksums past the first are not summed:
    WRITE checks every image's bytes against filter's digest, which a misread header cannot pass.
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


def locate_images(downloaded: str, rows: pa.Table) -> list[tuple[str, int, int]]:
    """``(extension, data offset, size)`` of each row's image in its downloaded shard.

    Filter records where it read each image (FILTERED's ``ext``, ``offset``, ``bytes``); only
    source shards with a row where they are null (a compressed shard, a part from before those
    columns) have their headers indexed here. A stale location cannot slip through: WRITE checks
    every image's bytes against filter's xxh3-128 (or sha256).
    """
    sources = rows.column("shard").to_pylist()
    keys = rows.column("key").to_pylist()
    exts, offsets, sizes = (rows.column(c).to_pylist() for c in ("ext", "offset", "bytes"))
    n = rows.num_rows
    where: list = [None] * n
    wanted: dict[str, dict[str, list[int]]] = {}
    for i in range(n):
        if exts[i] is not None and offsets[i] is not None and sizes[i] is not None:
            where[i] = (exts[i], offsets[i], sizes[i])
        else:
            wanted.setdefault(sources[i], {}).setdefault(keys[i], []).append(i)
    for source in sorted(wanted):
        found = index_tar(storage.join(downloaded, source), set(wanted[source]))
        for key, idx in wanted[source].items():
            if key not in found:
                raise StageError(f"{downloaded}/{source}: has no image for key {key} (changed since filter?)")
            for i in idx:
                where[i] = found[key]
    return where


def with_curated(rows: pa.Table, curated: pa.Table | None) -> pa.Table:
    """``rows`` with curate's ``page_url`` and ``queries`` of each uid: those of the first row of
    ``curated`` with that uid, null where it has none (or where there is no curated manifest)."""
    if curated is not None:
        # Acero's join cannot carry list columns: look each uid up in the curated uids instead.
        at = pc.index_in(rows.column("uid"), value_set=curated.column("uid"))
        rows = rows.append_column("page_url", curated.column("page_url").take(at))
        return rows.append_column("queries", curated.column("queries").take(at))
    rows = rows.append_column("page_url", pa.nulls(rows.num_rows, pa.string()))
    return rows.append_column("queries", pa.nulls(rows.num_rows, pa.list_(pa.string())))


def plan_rows(filtered: pa.Table, curated: pa.Table | None, seed: int) -> pa.Table:
    """Kept FILTERED rows joined with curate's page_url and queries, in the seeded shard order.

    The whole order in one pass over every row: the reference that SPLIT and PLAN reproduce bucket
    by bucket (the tests compare them).
    """
    rows = with_curated(filtered.filter(filtered.column("keep")), curated)
    keys = [order_key(seed, u) for u in rows.column("uid").to_pylist()]
    rows = rows.append_column("_order", pa.array(keys, pa.binary()))
    return rows.sort_by([("_order", "ascending"), ("uid", "ascending")]).drop_columns(["_order"])


def shard_pieces(start: int, count: int, per_shard: int) -> list[tuple[int, int, int]]:
    """``(shard, first row, rows)`` of each piece of ``count`` rows that start at global position
    ``start``, cut at every multiple of ``per_shard``: the pieces of output shards they hold."""
    pieces, at = [], 0
    while at < count:
        k = (start + at) // per_shard
        end = min(count, (k + 1) * per_shard - start)
        pieces.append((k, at, end - at))
        at = end
    return pieces


def located(rows: pa.Table, downloaded: str) -> pa.Table:
    """Kept FILTERED ``rows`` with PLAN's columns but curate's: where each image's bytes are in
    its downloaded shard (:func:`locate_images`) as ``ext``, ``source``, ``offset``, ``size``."""
    where = locate_images(downloaded, rows)
    return pa.table(
        {
            **{n: rows.column(n) for n in ("uid", "url", "text", "sha256", "width", "height", "phash", "clip_score")},
            "ext": [w[0] for w in where],
            "source": rows.column("shard"),
            "offset": pa.array([w[1] for w in where], pa.int64()),
            "size": pa.array([w[2] for w in where], pa.int64()),
            "xxh3": rows.column("xxh3"),
        }
    )


def read_manifest_part(url: str, kind: str, part: str, lacks: Sequence[str], columns: list[str]) -> pa.Table:
    """``columns`` of one part of the manifest at ``url`` (as :meth:`Manifest.table` reads it:
    the columns an older part ``lacks`` as nulls), without opening every other part."""
    older = {part: tuple(lacks)} if lacks else {}
    return Manifest(url=url, kind=kind, schema=schema_for(kind), parts=[part], older=older).table(columns)


class ShardSplit:
    """Phase 1 of shard: each filtered or curated part's kept rows into buckets of the order
    (module docstring)."""

    name = "shard-split"
    kind = SPLIT_KIND

    def partitions(self, config: ShardConfig, inputs: list[ManifestRef]) -> list[Partition]:
        if len(inputs) != 1 or inputs[0].kind not in (None, "filtered"):
            raise StageError("shard takes exactly one input: a filtered manifest")
        url = inputs[0].url
        downloaded = find_upstream(url, "downloaded")
        if downloaded is None:
            raise StageError(f"{url}: no downloaded manifest up its lineage; the shards' images live there")
        curated_url = storage.normalize(config.curated) if config.curated else None
        if curated_url is None:
            found = find_upstream(url, "curated")
            curated_url = found.url if found else None
        record = read_run_record(url)
        if record is None:
            raise StageError(f"{url}: not a finished filtered manifest (no _run.json)")
        count = buckets.bucket_count(record.rows, config.buckets)
        filtered = open_manifest(url, expect_kind="filtered")
        curated = open_manifest(curated_url, expect_kind="curated") if curated_url else None
        tables = [(FILTERED_TABLE, filtered)] + ([(CURATED_TABLE, curated)] if curated else [])
        sizes = (len(filtered.parts), len(curated.parts) if curated else 0)
        common = (count, downloaded.url, curated_url, sizes)
        partitions = []
        for table, m in tables:
            for k, part in enumerate(m.parts):
                params = (table, k, m.url, part, m.older.get(part, ()), *common)
                partitions.append(Partition(index=len(partitions), source=storage.join(m.url, part), params=params))
        return partitions

    def run_partition(self, config: ShardConfig, partition: Partition, out: str) -> PartitionResult:
        table, k, url, part, lacks, count, downloaded, curated_url, sizes = partition.params
        filtered = table == FILTERED_TABLE
        columns = FILTERED_COLUMNS if filtered else ["uid", *CURATE_COLUMNS, "keep"]
        rows = read_manifest_part(url, table, part, lacks, columns)  # the tables are named as their kinds
        rows = rows.filter(rows.column("keep"))
        keys = order_keys(config.seed, rows.column("uid").to_pylist())
        if filtered:
            split = conform(located(rows, downloaded).append_column("order", pa.array(keys)), SPLIT_ROWS_SCHEMA)
        else:
            split = conform(rows.select(["uid", *CURATE_COLUMNS]), SPLIT_CURATED_SCHEMA)
        which = order_buckets(keys, count)
        info = buckets.write(out, k, split, which, count, table)
        counts, tallies, extra = {}, {}, {}
        if filtered:
            per_bucket = np.bincount(which, minlength=count)
            counts = {"kept": rows.num_rows}
            # summed over the filtered parts in _run.json: each bucket's rows, whence PLAN's positions
            tallies = {"bucket_rows": {str(b): int(per_bucket[b]) for b in np.flatnonzero(per_bucket)}}
        if partition.index == 0:  # the facts of the whole run, once
            extra = {
                "buckets": count,
                "downloaded": downloaded,
                "curated": curated_url,
                "filtered_parts": sizes[0],
                "curated_parts": sizes[1],
            }
        return PartitionResult(counts=counts, files=[info], extra=extra, tallies=tallies)


class ShardPlan:
    """Phase 2 of shard: one bucket of the order, cut into pieces of output shards (module docstring)."""

    name = "shard-plan"
    kind = PLAN_KIND
    schema = PLAN_SCHEMA

    def partitions(self, config: ShardConfig, inputs: list[ManifestRef]) -> list[Partition]:
        if len(inputs) != 1 or inputs[0].kind not in (None, SPLIT_KIND):
            raise StageError("shard's plan phase takes exactly one input: the split phase's output")
        split_url = inputs[0].url
        record = read_run_record(split_url)
        if record is None or len(record.inputs) != 1 or not record.extra.get("buckets"):
            raise StageError(f"{split_url}: not a finished split phase of shard (no _run.json)")
        facts = {k: v[0] for k, v in record.extra.items()}
        count = facts["buckets"]
        rows = [0] * count
        for b, n in record.tallies.get("bucket_rows", {}).items():
            rows[int(b)] = n
        if not sum(rows):
            raise StageError(f"{record.inputs[0].url}: no kept samples to shard")
        starts = np.cumsum([0, *rows[:-1]]).tolist()
        files = (facts["filtered_parts"], facts["curated_parts"] if facts["curated"] else None)
        return [
            Partition(
                index=b,
                source=split_url,
                params=(starts[b], rows[b], count, files, facts["downloaded"], facts["curated"]),
            )
            for b in range(count)
        ]

    def run_partition(self, config: ShardConfig, partition: Partition, out: str) -> PartitionResult:
        start, expected, count, (n_filtered, n_curated), downloaded, curated_url = partition.params
        b, split_url = partition.index, partition.source
        extra: dict[str, Any] = {"downloaded": downloaded, "curated": curated_url} if b == 0 else {}
        if not expected:  # an empty bucket: no rows, no piece
            return PartitionResult(extra={**extra, "samples": 0, "shards": 0})
        rows = buckets.read_all(buckets.file_urls(split_url, FILTERED_TABLE, n_filtered), b, SPLIT_ROWS_SCHEMA)
        if rows.num_rows != expected:
            raise StageError(f"{split_url}: bucket {b} holds {rows.num_rows} rows, its run record says {expected}")
        curated = None
        if n_curated is not None:
            curated = buckets.read_all(buckets.file_urls(split_url, CURATED_TABLE, n_curated), b, SPLIT_CURATED_SCHEMA)
        # Equal keys are equal uids (or a 64-bit collision): the sort is stable, and bucket b of
        # the files in part order holds each part's rows in their order, as the whole table does.
        rows = with_curated(rows, curated).sort_by([("order", "ascending"), ("uid", "ascending")])
        table = conform(rows.select(PLAN_ROWS_SCHEMA.names), PLAN_ROWS_SCHEMA)
        pieces = shard_pieces(start, table.num_rows, config.samples_per_shard)
        info = write_row_groups(out, b, table, [n for _, _, n in pieces])
        index = pa.table(
            {
                "shard": [shard_name(k) for k, _, _ in pieces],
                "samples": [n for _, _, n in pieces],
                "plan": [info.name] * len(pieces),
                "row_group": pa.array(range(len(pieces)), pa.int32()),
            }
        )
        queries = Counter(q for qs in table.column("queries").to_pylist() for q in (qs or ()))
        return PartitionResult(
            table=index,
            counts={"kept": table.num_rows},
            files=[info],
            extra={
                **extra,
                "samples": table.num_rows,
                "shards": sum(1 for k, at, _ in pieces if start + at == k * config.samples_per_shard),
            },
            tallies={"queries": dict(queries)},
        )


def write_row_groups(out: str, index: int, table: pa.Table, lengths: list[int]) -> FileInfo:
    """Commit ``table`` (already conformed to PLAN_ROWS_SCHEMA) as plan part ``index``, one row
    group per stretch of ``lengths`` rows, so a reader of one stretch reads just its row group."""
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, compression="zstd", write_statistics=True) as writer:
        at = 0
        for n in lengths:
            writer.write_table(table.slice(at, n).combine_chunks(), row_group_size=n)
            at += n
    data = sink.getvalue().to_pybytes()
    written = pq.ParquetFile(pa.BufferReader(data)).metadata
    if [written.row_group(g).num_rows for g in range(written.num_row_groups)] != lengths:
        raise StageError(f"plan part {index}: the Parquet writer did not keep one row group per shard piece")
    name = part_name(index, PLAN_TABLE)
    storage.write_bytes(storage.join(out, name), data)
    return FileInfo(name=name, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), rows=table.num_rows)


def read_pieces(pieces: Sequence[tuple[str, int]]) -> pa.Table:
    """The rows of an output shard: row group ``g`` of plan part ``url`` for each ``(url, g)``,
    in order (a ranged read of each when remote)."""
    tables = []
    for url, group in pieces:
        try:
            if storage.is_local(url):
                with pq.ParquetFile(storage.local_path(url)) as part:
                    tables.append(_row_group(url, part, group))
                continue
            with storage.open_url(url, "rb") as fh, pq.ParquetFile(fh) as part:
                tables.append(_row_group(url, part, group))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ManifestError(f"{url} is not a readable Parquet file ({exc})") from exc
    return pa.concat_tables(tables) if len(tables) != 1 else tables[0]


def shard_pieces_of(plan_url: str) -> list[tuple[tuple[str, int], ...]]:
    """Each output shard's pieces ``(plan part URL, row group)``, shard by shard, from the plan's
    main table (one row per piece, in shard order)."""
    plan = open_manifest(plan_url, expect_kind=PLAN_KIND).table(["shard", "plan", "row_group"])
    names: list[str] = []
    pieces: list[list[tuple[str, int]]] = []
    for shard, part, group in zip(*(plan.column(c).to_pylist() for c in plan.column_names), strict=True):
        if not names or names[-1] != shard:
            names.append(shard)
            pieces.append([])
        pieces[-1].append((storage.join(plan_url, part), group))
    if names != [shard_name(k) for k in range(len(names))]:
        raise StageError(f"{plan_url}: its pieces do not list shards 0, 1, 2... in order (a plan of another wit?)")
    return [tuple(p) for p in pieces]


def _row_group(url: str, part: pq.ParquetFile, group: int) -> pa.Table:
    if not 0 <= group < part.num_row_groups:
        raise ManifestError(f"{url}: has {part.num_row_groups} row groups, the plan names row group {group}")
    return part.read_row_group(group)


# ---------------------------------------------------------------------------------------------
# WRITE


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


def following_images(downloaded: str, pieces: Sequence[tuple[str, int]], stack: ExitStack) -> list:
    """The next shard's local images (its plan ``pieces``, :func:`read_pieces`), for
    :class:`Readahead` only: any trouble with them is the next partition's to report, so here it
    just means no hint."""
    try:
        return load_images(downloaded, read_pieces(pieces), stack, remote=False)
    except (StageError, ManifestError, OSError, pa.ArrowException, KeyError):
        return []


def image_bytes(image: Span | bytes) -> bytes:
    if type(image) is Span:
        return os.pread(image.fd, image.size, image.offset)
    return bytes(image)


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


def write_shard(url: str, rows: pa.Table, images: list) -> FileInfo:
    """Write one webdataset shard atomically; returns its sha256, size and sample count.

    The tar stream goes through a :class:`TarStream`. Each image is checked in the buffer
    against what filter read (its xxh3-128, or its sha256 where filter recorded no xxh3); a
    mismatch aborts before the commit, so no shard holds an unchecked image. Headers, json and
    txt members are built a block of samples at a time into one blob (:func:`_block`).
    """
    cols = {n: rows.column(n).to_pylist() for n in PLAN_ROWS_SCHEMA.names if n not in ("source", "offset", "size")}
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


class ShardWrite:
    """Phase 3 of shard: one output shard per partition (module docstring)."""

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
        shards = shard_pieces_of(plan_url)
        return [
            Partition(
                index=k,
                source=pieces[0][0],
                params=(downloaded, plan_url, pieces, shards[k + 1] if k + 1 < len(shards) else ()),
            )
            for k, pieces in enumerate(shards)
        ]

    def run_partition(self, config: ShardConfig, partition: Partition, out: str) -> PartitionResult:
        delay = os.environ.get(DELAY_ENV)
        if delay and partition.index > 0:
            time.sleep(float(delay))
        downloaded, plan_url, pieces, following = partition.params
        rows = conform(read_pieces(pieces), PLAN_ROWS_SCHEMA)  # a plan part from before xxh3: nulls
        name = shard_name(partition.index)
        with ExitStack() as stack:
            images = load_images(downloaded, rows, stack)
            after = following_images(downloaded, following, stack) if following else []
            stack.enter_context(Readahead(images, then=after))  # exits first: stopped before the files close
            info = write_shard(storage.join(out, name), rows, images)
            grid = [image_bytes(b) for b in images[: config.grid_samples]] if partition.index == 0 else []
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
    plan = open_manifest(plan_url, expect_kind=PLAN_KIND).table(["shard", "samples"])
    sizes: dict[str, int] = {}
    for s, n in zip(plan.column("shard").to_pylist(), plan.column("samples").to_pylist(), strict=True):
        sizes[storage.basename(s)] = sizes.get(storage.basename(s), 0) + n  # a shard's pieces
    files = [_commit(out, SIZES, (json.dumps(sizes, indent=1, sort_keys=True) + "\n").encode())]
    if config.card:
        from .card import render_card

        for name, data in render_card(plan_url, rows[: config.grid_samples], images[: config.grid_samples]).items():
            files.append(_commit(out, name, data))
    return files


def _commit(out: str, name: str, data: bytes) -> FileInfo:
    storage.write_bytes(storage.join(out, name), data)
    return FileInfo(name=name, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


SPLIT = ShardSplit()
PLAN = ShardPlan()
WRITE = ShardWrite()
# (stage, subfolder of OUT): run in order, each with the previous phase's finished ref as input.
SHARD_PHASES: list[tuple[Any, str]] = [(SPLIT, "_split"), (PLAN, "_plan"), (WRITE, "")]
