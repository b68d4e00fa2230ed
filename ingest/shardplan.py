"""The plan of ``wit shard`` (:mod:`.shard`): the seeded sample order, the buckets of it, where
each kept image lies in the downloaded shards, and the plan parts that say which rows make each
output shard. Shared by the SPLIT and PLAN phases and read back by WRITE; no stage itself.

The samples are ordered by a seeded hash of the uid (:func:`order_key`, then the uid);
:func:`plan_rows` is that order in one pass over every row, the reference the phases reproduce
without any task holding every row, and :func:`order_buckets` cuts it into ranges of the key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wit.manifests import buckets, storage
from wit.manifests.buckets import MAX_BUCKETS
from wit.manifests.manifest import FileInfo, ManifestError, commit_file, open_manifest, part_name, read_part, shard_name
from wit.manifests.schemas import conform, with_kind
from wit.manifests.stage import StageError
from wit.manifests.tars import IMAGE_EXTENSIONS, BadTar, TarError, tar_members
from wit.manifests.tarwrite import load_images

SPLIT_KIND = "shard_split"
PLAN_KIND = "shard_plan"
PLAN_TABLE = "plan"

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
FILTERED_COLUMNS = ["uid", "url", "text", "sha256", "width", "height", "shard", "key", "keep", "phash", "clip_score"]
FILTERED_COLUMNS += ["ext", "offset", "bytes", "xxh3"]


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
# where the images are


def index_tar(url: str, keys: set[str]) -> dict[str, tuple[str, int, int]]:
    """``key → (extension, data offset, size)`` of the image members of one tar shard.

    Only headers are read, skipping each member's data (through a memory map when the shard is
    local, ranged reads otherwise; :func:`wit.manifests.tars.tar_members`); an archive with
    extended headers (pax, GNU long names) is handed to tarfile. Header checksums past the first
    are not summed: WRITE checks every image's bytes against filter's digest, which a misread
    header cannot pass.
    """
    try:
        members = tar_members(url, checksums=False)
    except (BadTar, TarError) as exc:
        raise StageError(f"{url}: not a readable tar shard ({exc})") from exc
    found: dict[str, tuple[str, int, int]] = {}
    for m in members:
        _note(found, keys, m.name, m.is_file, m.offset, m.size)
    return found


def _note(found: dict, keys: set[str], name: str, is_file: bool, offset: int, size: int) -> None:
    key, dot, ext = name.rsplit("/", 1)[-1].partition(".")
    if is_file and dot and key in keys and ext.lower() in IMAGE_EXTENSIONS:
        found.setdefault(key, (ext.lower(), offset, size))


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


def split_part(table: str, url: str, part: str, downloaded: str, seed: int) -> tuple[pa.Table, np.ndarray]:
    """SPLIT's rows of one part of the filtered or curated manifest (``table``, as its kind) and
    their order keys: a filtered part's kept rows :func:`located` with their order key, a curated
    part's kept rows' curate columns."""
    filtered = table == FILTERED_TABLE
    columns = FILTERED_COLUMNS if filtered else ["uid", *CURATE_COLUMNS, "keep"]
    rows = read_part(storage.join(url, part), columns)  # the stage opened (and checked) the manifest
    rows = rows.filter(rows.column("keep"))
    keys = order_keys(seed, rows.column("uid").to_pylist())
    if filtered:
        split = conform(located(rows, downloaded).append_column("order", pa.array(keys)), SPLIT_ROWS_SCHEMA)
    else:
        split = conform(rows.select(["uid", *CURATE_COLUMNS]), SPLIT_CURATED_SCHEMA)
    return split, keys


def plan_bucket(split_url: str, b: int, expected: int, n_filtered: int, n_curated: int | None) -> pa.Table:
    """PLAN's rows of bucket ``b``: that bucket of every SPLIT file (``expected`` rows, as the run
    record says), curate's columns joined, in the order (order key, uid)."""
    rows = buckets.read_all(buckets.file_urls(split_url, FILTERED_TABLE, n_filtered), b, SPLIT_ROWS_SCHEMA)
    if rows.num_rows != expected:
        raise StageError(f"{split_url}: bucket {b} holds {rows.num_rows} rows, its run record says {expected}")
    curated = None
    if n_curated is not None:
        curated = buckets.read_all(buckets.file_urls(split_url, CURATED_TABLE, n_curated), b, SPLIT_CURATED_SCHEMA)
    # Equal keys are equal uids (or a 64-bit collision): the sort is stable, and bucket b of
    # the files in part order holds each part's rows in their order, as the whole table does.
    rows = with_curated(rows, curated).sort_by([("order", "ascending"), ("uid", "ascending")])
    return conform(rows.select(PLAN_ROWS_SCHEMA.names), PLAN_ROWS_SCHEMA)


# ---------------------------------------------------------------------------------------------
# plan parts


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
    return commit_file(out, part_name(index, PLAN_TABLE), data, rows=table.num_rows)


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


def following_images(downloaded: str, pieces: Sequence[tuple[str, int]], stack: ExitStack) -> list:
    """The next shard's local images (its plan ``pieces``, :func:`read_pieces`), for
    :class:`Readahead` only: any trouble with them is the next partition's to report, so here it
    just means no hint."""
    try:
        return load_images(downloaded, read_pieces(pieces), stack, remote=False)
    except (StageError, ManifestError, OSError, pa.ArrowException, KeyError):
        return []
