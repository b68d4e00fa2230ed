"""``wit shard``: the kept rows of a filtered manifest into new webdataset shards, plus the dataset manifest.

Three stages run in order (``SHARD_PHASES``)::

    filtered ──SPLIT──▶ OUT/_split ──PLAN──▶ OUT/_plan ──WRITE──▶ OUT (dataset)
    (+ downloaded       per filtered or      per bucket:          per output shard:
     shards, curated    curated part: its    its rows in order,   shards/NNNNNN.tar, SAMPLES
     queries)           kept rows in B       a row group per      rows, shard_index/ row;
                        ranges of the order  shard piece, the     partition 0 also
                        key, images located  pieces listed        shards/sizes.json, CARD.md

The samples are ordered by a seeded hash of the uid (:func:`.shardplan.order_key`, then the
uid), so each shard mixes queries and hosts and the order depends on nothing but seed and rows;
chunks of ``samples_per_shard`` of that order (the last may be short) are the output shards.
:func:`.shardplan.plan_rows` is that order in one pass over every row, the reference the phases
reproduce without any task holding every row. :mod:`.shardplan` holds the pieces of the plan the
phases share; :mod:`wit.manifests.tarwrite` writes the shards.

SPLIT (one partition per filtered part, and one per curated part; the curated manifest is
``config.curated`` or found up the run records) cuts the kept rows into ``B`` ranges of the order
key: bucket ``⌊key · B / 2⁶⁴⌋`` (:func:`.shardplan.order_buckets`), so bucket order is the global
order. Each part becomes one bucket file (:mod:`wit.manifests.buckets`): a filtered part's kept
rows with where their image bytes are in the downloaded shards, a curated part's kept ``uid``,
``page_url`` and ``queries``. The places come from filter, which recorded the member it read
(FILTERED's ``ext``, ``offset``, ``bytes``); only a source shard it could not locate (compressed)
has its tar headers indexed here, and a filtered part's rows come from few source shards. So WRITE
reads each image with one ranged read instead of streaming whole source shards. The run record's
tally ``bucket_rows`` sums the rows of each bucket over the parts.

PLAN partition ``b`` reads bucket ``b`` of every SPLIT file, joins ``page_url`` and ``queries`` by
uid (the first curated row of it, as :func:`.shardplan.plan_rows` does; null without one) and
sorts by (order key, uid). The rows of the buckets before it (the prefix sum of ``bucket_rows``)
say where its rows start in the global order, so which output shards they fall into. It writes
them as the side table part ``plan/part-b.parquet``, one row group per piece of an output shard (a
shard across a bucket boundary has a piece in each bucket, an empty bucket none), and lists the
pieces (shard, samples, part, row group) in its main part; its ``queries`` tally and its
``samples`` and ``shards`` (the shards that start in it) sum to the whole dataset's. ``B`` follows
the data (:func:`wit.manifests.buckets.bucket_count`: one bucket per 500,000 filtered rows, or
``--buckets``), so a task holds one filtered part, one bucket or one shard however large the
dataset; it changes where the order is computed, never the order: the dataset is the same bytes
for any ``B``. Job arrays: ``--part i/N`` slices SPLIT; the slice that finishes it runs PLAN and
WRITE in full.

WRITE builds shard ``k`` from its pieces (a row group of a plan part each): per sample
``{uid}.{ext}`` (the image bytes as downloaded, checked against the xxh3-128 filter recorded when
it read them), ``{uid}.txt`` and ``{uid}.json``, in
plan order with members sorted, mtime 0 and uid/gid 0, so the same input and seed give the same
bytes. The tar stream is gathered in reused buffers that images are read straight into, written
and hashed by threads while the next ones fill, and a thread reads the images ahead in file order
(:mod:`wit.manifests.tarwrite` says how). The shard is written to a temporary file and committed
by rename or a single put. The dataset manifest is the SAMPLES main table (uid → shard, key,
sha256, ...) plus the SHARDS side table ``shard_index/`` that ``wit manifest verify`` checks every
shard against. Partition 0 also commits ``shards/sizes.json`` (open_clip_train's
``get_dataset_size`` reads it next to the shards) and the dataset card (:mod:`.card`); both follow
from the plan alone.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from wit.manifests import buckets, storage
from wit.manifests.buckets import option as buckets_option  # the config field is `buckets`
from wit.manifests.lineage import find_upstream
from wit.manifests.manifest import FileInfo, ManifestRef, commit_file, open_manifest, shard_name, write_part
from wit.manifests.options import Option, check_options
from wit.manifests.runrecord import read_run_record
from wit.manifests.schemas import SAMPLES, SHARDS, conform
from wit.manifests.stage import Partition, PartitionResult, StageError
from wit.manifests.tarwrite import Readahead, image_bytes, load_images, write_shard

from .shardplan import (
    CURATED_TABLE,
    FILTERED_TABLE,
    PLAN_KIND,
    PLAN_ROWS_SCHEMA,
    PLAN_SCHEMA,
    SPLIT_KIND,
    following_images,
    order_buckets,
    plan_bucket,
    read_pieces,
    shard_pieces,
    shard_pieces_of,
    split_part,
    write_row_groups,
)

SHARD_INDEX = "shard_index"
SIZES = "shards/sizes.json"


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
                params = (table, k, m.url, part, *common)
                partitions.append(Partition(index=len(partitions), source=storage.join(m.url, part), params=params))
        return partitions

    def run_partition(self, config: ShardConfig, partition: Partition, out: str) -> PartitionResult:
        table, k, url, part, count, downloaded, curated_url, sizes = partition.params
        filtered = table == FILTERED_TABLE
        split, keys = split_part(table, url, part, downloaded, config.seed)
        which = order_buckets(keys, count)
        info = buckets.write(out, k, split, which, count, table)
        counts, tallies, extra = {}, {}, {}
        if filtered:
            per_bucket = np.bincount(which, minlength=count)
            counts = {"kept": split.num_rows}
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
        table = plan_bucket(split_url, b, expected, n_filtered, n_curated)
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
        downloaded, plan_url, pieces, following = partition.params
        rows = conform(read_pieces(pieces), PLAN_ROWS_SCHEMA)
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
    files = [commit_file(out, SIZES, (json.dumps(sizes, indent=1, sort_keys=True) + "\n").encode())]
    if config.card:
        from .card import render_card

        for name, data in render_card(plan_url, rows[: config.grid_samples], images[: config.grid_samples]).items():
            files.append(commit_file(out, name, data))
    return files


SPLIT = ShardSplit()
PLAN = ShardPlan()
WRITE = ShardWrite()
# (stage, subfolder of OUT): run in order, each with the previous phase's finished ref as input.
SHARD_PHASES: list[tuple[Any, str]] = [(SPLIT, "_split"), (PLAN, "_plan"), (WRITE, "")]
