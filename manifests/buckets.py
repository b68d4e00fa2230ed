"""Bucketed phases: how a step that needs every row runs with memory bounded by one bucket.

A global decision (one winner per URL, near duplicates, the shard order) is split by a hash of its
key into ``B`` buckets. The phase before writes, per partition, ONE bucket file: an Arrow IPC file
holding ``B`` record batches, batch ``b`` being that partition's rows of bucket ``b`` in their
original order (an empty batch when it has none). The bucketed phase then has one partition per
bucket, which reads batch ``b`` of every bucket file (one ranged read each) and so holds only its
bucket; a small merge follows where a step needs one (a table of queries, a histogram).

``B`` follows the data (:func:`bucket_count`: about :data:`ROWS_PER_BUCKET` rows each, or
``--buckets``), so per-task memory stays flat as the dataset grows. Which bucket a row lands in
never changes what is decided, only where: every bucketed step gives the same bytes for any ``B``.

Files are named like part files (``TABLE/part-NNNNN.arrow``) and count in the manifest digest
(:func:`wit.manifests.manifest.in_digest`), so a phase that reads them notices when they change.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from . import storage
from .manifest import FileInfo, commit_file
from .options import Option

ROWS_PER_BUCKET = 500_000  # rows one bucketed task holds, by default (a few hundred MB at most)
MAX_BUCKETS = 65_535  # bucket numbers fit 16 bits


def bucket_count(rows: int, given: int | None = None, rows_per_bucket: int = ROWS_PER_BUCKET) -> int:
    """``given`` (``--buckets``), or enough buckets for ``rows`` at ``rows_per_bucket`` each."""
    if given is not None:
        if not isinstance(given, int) or not 1 <= given <= MAX_BUCKETS:
            raise ValueError(f"--buckets must be an integer in [1, {MAX_BUCKETS}], got {given!r}")
        return given
    return max(1, min(MAX_BUCKETS, math.ceil(rows / rows_per_bucket)))


def option(what: str, rows: str) -> Option:
    """The ``--buckets`` option of a stage whose ``what`` is bucketed by its count of ``rows``."""
    return Option(
        "buckets",
        "int",
        None,
        f"Buckets of {what} (default: one per {ROWS_PER_BUCKET:,} {rows}); never changes the result.",
        low=1,
        high=MAX_BUCKETS,
    )


def bucket_name(index: int, table: str) -> str:
    return f"{table}/part-{index:05d}.arrow"


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads any 64-bit keys (perceptual hashes cluster) over all bits."""
    x = np.asarray(values, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def of_keys(keys: np.ndarray, count: int) -> np.ndarray:
    """The bucket of each 64-bit key (mixed first, so structured keys spread evenly)."""
    high = mix64(keys) >> np.uint64(32)  # then scaled to [0, count): a multiply, not a division
    return ((high * np.uint64(count)) >> np.uint64(32)).astype(np.int64)


def of_strings(values: Sequence[str] | pa.Array | pa.ChunkedArray, count: int) -> np.ndarray:
    """The bucket of each string (a uid): 64 bits of blake2b, the same on every machine."""
    if isinstance(values, pa.ChunkedArray | pa.Array):
        values = values.to_pylist()
    keys = np.fromiter(
        (int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") for v in values),
        dtype=np.uint64,
        count=len(values),
    )
    return (keys % np.uint64(count)).astype(np.int64)


def encode(table: pa.Table, buckets: np.ndarray, count: int) -> bytes:
    """The bucket file of ``table``: ``count`` batches, batch ``b`` = rows with ``buckets == b``."""
    buckets = np.asarray(buckets, dtype=np.int64)
    if len(buckets) != table.num_rows:
        raise ValueError(f"{len(buckets)} buckets for {table.num_rows} rows")
    if len(buckets) and (buckets.min() < 0 or buckets.max() >= count):
        raise ValueError(f"bucket numbers must lie in [0, {count})")
    # a radix sort when bucket numbers fit 16 bits (files split by input part may have more)
    keys = buckets.astype(np.uint16) if count <= 1 << 16 else buckets
    order = np.argsort(keys, kind="stable")
    ordered = table.take(pa.array(order)) if table.num_rows else table
    edges = np.concatenate([[0], np.cumsum(np.bincount(buckets, minlength=count))])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        for b in range(count):
            chunk = ordered.slice(int(edges[b]), int(edges[b + 1] - edges[b])).combine_chunks()
            batches = chunk.to_batches()
            writer.write_batch(batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema))
    return sink.getvalue().to_pybytes()


def write(out: str, index: int, table: pa.Table, buckets: np.ndarray, count: int, name: str) -> FileInfo:
    """Commit ``table`` split into ``count`` buckets as ``name/part-<index>.arrow`` of ``out``."""
    return commit_file(out, bucket_name(index, name), encode(table, buckets, count), rows=table.num_rows)


def read(url: str, bucket: int) -> pa.Table:
    """Batch ``bucket`` of one bucket file (a memory map when local, ranged reads otherwise)."""
    path = storage.local_path(url)
    if path is not None:
        # read, not mapped: a task's memory is then the rows it asked for (mapped pages of many
        # files count in its resident size as the page cache around them is faulted in)
        with pa.OSFile(path) as source:
            reader = pa.ipc.open_file(source)
            _check(url, reader, bucket)
            return pa.Table.from_batches([reader.get_batch(bucket)])
    # no read-ahead: each read is one ranged request for what the reader asks (the footer, the batch)
    with storage.open_url(url, "rb", cache_type="none") as fh:
        reader = pa.ipc.open_file(pa.PythonFile(fh, mode="r"))
        _check(url, reader, bucket)
        return pa.Table.from_batches([reader.get_batch(bucket)])


def _check(url: str, reader: pa.ipc.RecordBatchFileReader, bucket: int) -> None:
    if not 0 <= bucket < reader.num_record_batches:
        raise ValueError(f"{url}: has {reader.num_record_batches} buckets, asked for bucket {bucket}")


def read_all(urls: Sequence[str], bucket: int, schema: pa.Schema, source_column: str | None = None) -> pa.Table:
    """Batch ``bucket`` of every file in ``urls``, concatenated in that order.

    ``source_column``: add the position of each row's file in ``urls`` (an int32 column), for a
    step that must send its results back to the partition the row came from.
    """
    tables = []
    for k, url in enumerate(urls):
        t = read(url, bucket)
        if source_column is not None:
            t = t.append_column(source_column, pa.array(np.full(t.num_rows, k, dtype=np.int32)))
        tables.append(t)
    if source_column is not None:
        schema = schema.append(pa.field(source_column, pa.int32(), nullable=False))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables([t.cast(schema) if t.schema != schema else t for t in tables])


def file_urls(folder: str, name: str, count: int) -> list[str]:
    """The URLs of bucket files ``0..count-1`` that partitions of ``folder`` wrote as ``name``."""
    return [storage.join(folder, bucket_name(i, name)) for i in range(count)]
