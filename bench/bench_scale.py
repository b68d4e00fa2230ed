"""Every step at any size: the four steps that need the whole dataset, at 1M, 4M and 16M rows.

No network and no images: each step's input is generated as the stage before it would have
written it (a curated manifest for download planning, curate's MATCH output for COUNT, scan rows
with random and with clustered perceptual hashes for filter's GROUP, a filtered manifest for
shard's PLAN), then the step runs in a fresh process, partition after partition (one core), and
reports its wall time and the peak resident memory of that process: the largest of the tasks'
peaks, each task's own peak (reset before it: Linux's VmHWM; the interpreter and libraries, ~130 MB, are
in every figure), and what runs between tasks (planning, commits) is measured as well. Download
planning runs in the driver, so its process is the driver.

Side by side, at 1M rows: today's single-process code for the same step (the reference functions
the tests compare the bucketed steps against): download's plan of every pair in the driver,
curate's ``count_queries`` over every row, filter's ``group_decisions`` (leader clustering with one
multi-index table of 5 × 13-bit bands), shard's global ``plan_rows`` sort.

    .venv/bin/python bench/bench_scale.py [--sizes 1M,4M,16M] [--steps download,curate,filter,shard]
                                          [--no-reference] [--no-write] [--work DIR]
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import commit, table, write_section  # noqa: E402

ROWS_PER_PART = 250_000  # input part files hold this many rows at every size, as a real run's would
TARGET_ROWS = 400_000_000  # the CLIP paper's dataset


# ---------------------------------------------------------------------------------------------
# inputs, written as the stage before would have (run in a child process, not measured)


def _hex_strings(rng, n: int, nbytes: int):
    import numpy as np

    table = np.array([f"{i:02x}".encode() for i in range(256)])
    return table[rng.integers(0, 256, (n, nbytes), dtype=np.uint8)].view(f"S{2 * nbytes}").ravel().astype(str)


def filter_input(rows: int, out: str, clustered: bool) -> None:
    """A finished scan phase: eligible rows with unique sha256s (a share of exact duplicates) and
    perceptual hashes that are random, or (``clustered``) a third of them in clusters of 8 within
    3 bits of their centre, plus a placeholder hash shared by 1% of the rows."""
    import numpy as np
    import pyarrow as pa

    from wit.ingest.filter import KEYS_SCHEMA, SCAN_KIND, FilterConfig, group_plan, scan_result
    from wit.manifests.stage import Partition
    from wit.pipeline.executor import run_stage

    class Scan:
        name, kind = "filter-scan", SCAN_KIND

        def partitions(self, config, inputs):
            return [Partition(index=i, source=f"gen#{i}") for i in range(math.ceil(rows / ROWS_PER_PART))]

        def run_partition(self, config, partition, out):
            rng = np.random.default_rng(partition.index)
            n = min(ROWS_PER_PART, rows - partition.index * ROWS_PER_PART)
            phash = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
            sha = _hex_strings(rng, n, 32)
            if clustered:
                m = n // 3 // 8 * 8
                centres = np.repeat(rng.integers(0, 2**64 - 1, m // 8, dtype=np.uint64), 8)
                flips = np.zeros(m, dtype=np.uint64)
                for _ in range(3):
                    bit = rng.integers(0, 64, m).astype(np.uint64)
                    flips ^= np.where(rng.random(m) < 0.7, np.uint64(1) << bit, np.uint64(0))
                phash[:m] = centres ^ flips
                phash[m : m + n // 100] = np.uint64(0x8000000000000000)  # a placeholder image
            dup = rng.random(n) < 0.02  # exact duplicates (same bytes) of the row before
            sha[1:][dup[1:]] = sha[:-1][dup[1:]]
            phash[1:][dup[1:]] = phash[:-1][dup[1:]]
            keys = pa.table(
                {
                    "uid": pa.array(rng.integers(0, 2**63, n, dtype=np.uint64)).cast(pa.string()),
                    "sha256": pa.array(sha),
                    "phash": pa.array(phash),
                    "row": pa.array(np.arange(n, dtype=np.int32)),
                    "clip_score": pa.nulls(n, pa.float32()),
                },
                schema=KEYS_SCHEMA,
            )
            return scan_result(None, {"kept": n}, partition.index, group_plan(rows, config), out, {}, keys=keys)

    run_stage(Scan(), FilterConfig(), [], os.path.join(out, "_scan"), progress=False)


def _queries(rng, n: int, vocabulary: int = 50_000):
    """1 to 3 queries per row from a vocabulary with a long tail (a few very common ones)."""
    import numpy as np
    import pyarrow as pa

    per_row = rng.integers(1, 4, n)
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    picks = np.minimum((rng.pareto(1.2, int(offsets[-1])) * 50).astype(np.int64), vocabulary - 1)
    words = pa.array([f"q{i}" for i in range(vocabulary)])
    return pa.ListArray.from_arrays(pa.array(offsets), words.take(pa.array(picks)))


def _url_hashes(rng, n: int, part: int):
    """64-bit URL hashes, 5% of them repeating a URL of an earlier part (the same image on two pages)."""
    import numpy as np

    hashes = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    if part:
        seen = np.random.default_rng(part - 1).integers(0, 2**64 - 1, n, dtype=np.uint64)
        again = rng.random(n) < 0.05
        hashes[again] = seen[rng.integers(0, n, int(again.sum()))]
    return hashes


def curate_input(rows: int, out: str) -> None:
    """A finished MATCH phase: every row eligible, its URL hash and queries in the key files."""
    import numpy as np
    import pyarrow as pa

    from wit.ingest.curate import KEYS_SCHEMA, MATCH_KIND, MATCH_SCHEMA
    from wit.manifests import buckets
    from wit.manifests.stage import Partition, PartitionResult
    from wit.pipeline.executor import run_stage

    class Match:
        name, kind, schema = "curate-match", MATCH_KIND, MATCH_SCHEMA

        def partitions(self, config, inputs):
            return [Partition(index=i, source=f"gen#{i}") for i in range(math.ceil(rows / ROWS_PER_PART))]

        def run_partition(self, config, partition, out):
            rng = np.random.default_rng(partition.index)
            n = min(ROWS_PER_PART, rows - partition.index * ROWS_PER_PART)
            keys = pa.table(
                {
                    "url_hash": pa.array(_url_hashes(rng, n, partition.index)),
                    "uid": pa.array(rng.integers(0, 2**63, n, dtype=np.uint64)).cast(pa.string()),
                    "row": pa.array(np.arange(n, dtype=np.int32)),
                    "queries": _queries(rng, n),
                },
                schema=KEYS_SCHEMA,
            )
            count = buckets.bucket_count(rows)
            files = [
                buckets.write(
                    out,
                    partition.index,
                    keys,
                    buckets.of_keys(keys.column("url_hash").to_numpy(), count),
                    count,
                    "keys",
                )
            ]
            # COUNT reads the key files; the main parts (clean text and all) are BALANCE's
            return PartitionResult(table=MATCH_SCHEMA.empty_table(), counts={"kept": n}, files=files)

    run_stage(Match(), _curate_config(rows), [], os.path.join(out, "_match"), progress=False)


def download_input(rows: int, out: str) -> None:
    """A finished curated manifest: uid, url (10,000 hosts), text and queries; 80% kept."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from wit.manifests.stage import Partition, PartitionResult
    from wit.pipeline.executor import run_stage

    class Curated:
        name, kind = "curate", "curated"

        def partitions(self, config, inputs):
            return [Partition(index=i, source=f"gen#{i}") for i in range(math.ceil(rows / ROWS_PER_PART))]

        def run_partition(self, config, partition, out):
            rng = np.random.default_rng(partition.index)
            n = min(ROWS_PER_PART, rows - partition.index * ROWS_PER_PART)
            ids = pa.array(rng.integers(0, 2**63, n, dtype=np.uint64)).cast(pa.string())
            hosts = pa.array(rng.integers(0, 10_000, n)).cast(pa.string())
            url = pc.binary_join_element_wise("http://img", hosts, ".example/", ids, ".jpg", "")
            text = pc.binary_join_element_wise("a photo of a thing number ", ids, "")
            keep = rng.random(n) < 0.8
            table = pa.table(
                {
                    "uid": ids,
                    "url": url,
                    "text": text,
                    "page_url": pc.binary_join_element_wise("http://page", hosts, ".example/", ""),
                    "lang": pa.array(["en"] * n),
                    "queries": _queries(rng, n),
                    "keep": pa.array(keep),
                    "reason": pa.array(np.where(keep, None, "over_cap").tolist(), pa.string()),
                }
            )
            return PartitionResult(table=table, counts={"kept": int(keep.sum())})

    run_stage(Curated(), None, [], os.path.join(out, "curated"), progress=False)


def shard_input(rows: int, out: str) -> None:
    """A curated manifest (as for download), an empty downloaded ledger after it (the lineage
    shard follows to find the images), and a filtered manifest of the kept rows with where each
    image is (ext, offset, bytes), as filter writes it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from wit.manifests.manifest import open_manifest, read_part
    from wit.manifests.runrecord import read_run_record
    from wit.manifests.schemas import DOWNLOADED
    from wit.manifests.stage import Partition, PartitionResult
    from wit.pipeline.executor import run_stage

    download_input(rows, out)
    curated = read_run_record(os.path.join(out, "curated")).output
    parts = open_manifest(curated.url).part_urls()

    class Downloaded:
        name, kind = "download", "downloaded"

        def partitions(self, config, inputs):
            return [Partition(index=0, source="gen")]

        def run_partition(self, config, partition, out):
            return PartitionResult(table=DOWNLOADED.empty_table())

    class Filtered:
        name, kind = "filter", "filtered"

        def partitions(self, config, inputs):
            return [Partition(index=i, source=u) for i, u in enumerate(parts)]

        def run_partition(self, config, partition, out):
            rng = np.random.default_rng(partition.index)
            t = read_part(partition.source, ["uid", "url", "text", "keep"])
            t = t.filter(t.column("keep"))
            n = t.num_rows
            size = rng.integers(5_000, 60_000, n)
            table = pa.table(
                {
                    "uid": t.column("uid"),
                    "url": t.column("url"),
                    "text": t.column("text"),
                    "sha256": pa.array(_hex_strings(rng, n, 32)),
                    "width": pa.array(np.full(n, 256, np.int32)),
                    "height": pa.array(np.full(n, 256, np.int32)),
                    "shard": pa.array([f"shards/{partition.index:06d}.tar"] * n),
                    "key": t.column("uid"),
                    "ext": pa.array(["jpg"] * n),
                    "offset": pa.array(np.cumsum(size + 1024) - size),
                    "bytes": pa.array(size),
                    "xxh3": pa.array(_hex_strings(rng, n, 16)),
                    "keep": pa.array(np.ones(n, dtype=bool)),
                    "phash": pc.cast(pa.array(rng.integers(0, 2**63, n, dtype=np.uint64)), pa.string()),
                }
            )
            return PartitionResult(table=table, counts={"kept": n})

    downloaded = run_stage(Downloaded(), None, [curated], os.path.join(out, "downloaded"), progress=False).ref
    run_stage(Filtered(), None, [downloaded], os.path.join(out, "filtered"), progress=False)


def _curate_config(rows: int):
    from wit.ingest.curate import CurateConfig
    from wit.manifests import buckets

    # the bucket count MATCH would have chosen from the candidates (which this input has none of)
    return CurateConfig.build(buckets=buckets.bucket_count(rows))


# ---------------------------------------------------------------------------------------------
# the measured steps (each in a fresh process)


def download_plan(rows: int, out: str) -> dict:
    """The driver's part of `wit download`: planning the partitions."""
    import pickle

    from wit.ingest.download import DOWNLOAD, DownloadConfig
    from wit.manifests.runrecord import read_run_record

    ref = read_run_record(os.path.join(out, "curated")).output
    partitions = DOWNLOAD.partitions(DownloadConfig(), [ref])
    return {"partitions": len(partitions), "params KB": round(len(pickle.dumps(partitions)) / 1024)}


def download_reference(rows: int, out: str) -> dict:
    """Today's planning: every kept (uid, url, text) as Python objects in the driver, hosts
    interleaved across the whole dataset, chunks pickled into the partitions' params."""
    import pickle

    from wit.ingest.download import DownloadConfig, Pair, interleave_hosts
    from wit.manifests.manifest import open_manifest
    from wit.manifests.stage import Partition

    config = DownloadConfig()
    table = open_manifest(os.path.join(out, "curated"), expect_kind="curated").table(["uid", "url", "text", "keep"])
    pairs, seen = [], set()
    for uid, url, text, keep in zip(
        *(table.column(c).to_pylist() for c in ("uid", "url", "text", "keep")), strict=True
    ):
        if keep and uid not in seen:
            seen.add(uid)
            pairs.append(Pair(uid, url, text))
    del table
    pairs = interleave_hosts(pairs)
    size = config.samples_per_shard
    partitions = [
        Partition(
            index=i, source=f"curated#{i}", params=("fetch", tuple((p.uid, p.url, p.text) for p in pairs[j : j + size]))
        )
        for i, j in enumerate(range(0, len(pairs), size))
    ]
    return {"partitions": len(partitions), "params KB": round(len(pickle.dumps(partitions)) / 1024)}


def curate_count(rows: int, out: str) -> dict:
    from wit.ingest.curate import COUNT
    from wit.manifests.runrecord import read_run_record
    from wit.pipeline.executor import run_stage

    ref = read_run_record(os.path.join(out, "_match")).output
    done = run_stage(Measured(COUNT), _curate_config(rows), [ref], os.path.join(out, "_count"), progress=False)
    rec = read_run_record(done.ref.url)
    return {"buckets": rec.partitions, "duplicates": rec.counts.get("duplicate_url", 0)}


def curate_reference(rows: int, out: str) -> dict:
    """Today's COUNT: every eligible row's URL hash, uid and queries in one process, one sort."""
    import pyarrow as pa

    from wit.ingest.curate import KEYS_SCHEMA, dedup_urls
    from wit.manifests import buckets
    from wit.manifests.runrecord import read_run_record

    match = os.path.join(out, "_match")
    rec = read_run_record(match)
    urls = buckets.file_urls(match, "keys", rec.partitions)
    count = buckets.bucket_count(rows)
    start = time.perf_counter()  # today's COUNT read every eligible row too
    keys = pa.concat_tables([buckets.read_all(urls, b, KEYS_SCHEMA, "part") for b in range(count)])
    _, duplicates = dedup_urls(keys)
    return {"seconds": time.perf_counter() - start, "duplicates": duplicates.num_rows}


def shard_plan(rows: int, out: str) -> dict:
    """Shard's phases before WRITE: SPLIT (per filtered and curated part) and PLAN (per bucket)."""
    from wit.ingest.shard import SHARD_PHASES, ShardConfig
    from wit.manifests.runrecord import read_run_record
    from wit.pipeline.executor import run_stage

    config = ShardConfig(card=False)
    ref = read_run_record(os.path.join(out, "filtered")).output
    for stage, sub in SHARD_PHASES[:-1]:
        ref = run_stage(Measured(stage), config, [ref], os.path.join(out, "dataset", sub), progress=False).ref
    rec = read_run_record(ref.url)
    return {"buckets": rec.partitions, "samples": rec.counts.get("kept", rec.rows)}


def shard_reference(rows: int, out: str) -> dict:
    """Today's PLAN: every kept filtered row and curated row in one process, one global sort."""
    from wit.ingest.shardplan import plan_rows
    from wit.manifests.manifest import open_manifest

    start = time.perf_counter()
    columns = ["uid", "url", "text", "sha256", "width", "height", "shard", "key", "keep", "phash", "clip_score"]
    filtered = open_manifest(os.path.join(out, "filtered"), expect_kind="filtered").table(
        columns + ["ext", "offset", "bytes", "xxh3"]
    )
    curated = open_manifest(os.path.join(out, "curated"), expect_kind="curated").table(
        ["uid", "page_url", "queries", "keep"]
    )
    curated = curated.filter(curated.column("keep"))
    ordered = plan_rows(filtered, curated, 0)
    return {"seconds": time.perf_counter() - start, "samples": ordered.num_rows}


def filter_group(rows: int, out: str) -> dict:
    from wit.ingest.filter import FILTER_PHASES, FilterConfig
    from wit.manifests.runrecord import read_run_record
    from wit.pipeline.executor import run_phases

    config = FilterConfig()
    ref = read_run_record(os.path.join(out, "_scan")).output
    phases = [(Measured(stage), sub) for stage, sub in FILTER_PHASES[1:-1]]  # EXACT .. GROUP
    ref = run_phases(phases, config, [ref], out, progress=False).ref
    rec = read_run_record(ref.url)
    nodes = read_run_record(os.path.join(out, "_nodes"))
    links = read_run_record(os.path.join(out, "_links"))
    seconds = ", ".join(f"{name.removeprefix('filter-')} {t:.0f}" for name, t in PHASE_SECONDS.items())
    return {
        "layout": rec.extra["near_duplicate_layout"][0],
        "buckets sha256/phash/key/component": " / ".join(
            str(n)
            for n in (rec.extra["buckets"][0], nodes.partitions, nodes.extra["edge_buckets"][0], links.partitions)
        ),
        "star rounds": rec.extra["component_rounds"][0],
        "edges": links.counts.get("edges", 0),
        "phase s": seconds,
    }


def filter_reference(rows: int, out: str) -> dict:
    """Today's GROUP: every eligible row in one process, leader clustering over one HashIndex."""
    import pyarrow as pa

    from wit.ingest.filter import KEYS_SCHEMA, KEYS_TABLE, FilterConfig, group_decisions
    from wit.ingest.imaging import hash_hex
    from wit.manifests import buckets
    from wit.manifests.runrecord import read_run_record

    scan = os.path.join(out, "_scan")
    rec = read_run_record(scan)
    count = rec.extra["buckets"][0]
    urls = buckets.file_urls(scan, KEYS_TABLE, rec.partitions)
    keys = pa.concat_tables([buckets.read_all(urls, b, KEYS_SCHEMA) for b in range(count)])
    phash = [hash_hex(h) for h in keys.column("phash").to_pylist()]
    table_ = pa.table(
        {
            "uid": keys.column("uid"),
            "sha256": keys.column("sha256"),
            "phash": pa.array(phash, pa.string()),
            "reason": pa.nulls(keys.num_rows, pa.string()),
        }
    )
    del keys, phash
    start = time.perf_counter()
    decisions = group_decisions(table_, [], FilterConfig())
    return {"seconds": time.perf_counter() - start, "dropped": len(decisions)}


STEPS: dict[str, dict] = {
    "download": {
        "title": "download planning (driver)",
        "input": download_input,
        "run": download_plan,
        "reference": download_reference,
    },
    "curate": {
        "title": "curate COUNT",
        "input": curate_input,
        "run": curate_count,
        "reference": curate_reference,
    },
    "shard": {
        "title": "shard PLAN",
        "input": shard_input,
        "run": shard_plan,
        "reference": shard_reference,
    },
    "filter-random": {
        "title": "filter GROUP, random hashes",
        "input": functools.partial(filter_input, clustered=False),
        "run": filter_group,
        "reference": filter_reference,
    },
    "filter-clustered": {
        "title": "filter GROUP, clustered hashes",
        "input": functools.partial(filter_input, clustered=True),
        "run": filter_group,
        "reference": None,
    },
}


# ---------------------------------------------------------------------------------------------
# harness


def _peak_mb() -> float:
    """This process's peak resident memory since the last :func:`_reset_peak` (Linux VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Return freed memory to the system, then restart the peak from what is resident now."""
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident size


PEAKS: list[float] = []  # the measured peaks of this process: every task, and what ran between
PHASE_SECONDS: dict[str, float] = {}  # stage name -> the time its partitions took


class Measured:
    """A stage whose partitions' peaks are measured one by one: the peak is reset before each
    partition, so a task's figure is its own (plus what the process holds anyway), never the
    high-water mark of the tasks before it. What runs between partitions (planning, commits, the
    run record) is measured too."""

    def __init__(self, stage):
        self._stage = stage

    def __getattr__(self, name):
        return getattr(self._stage, name)

    def run_partition(self, config, partition, out):
        PEAKS.append(_peak_mb())
        _reset_peak()
        start = time.perf_counter()
        try:
            return self._stage.run_partition(config, partition, out)
        finally:
            name = self._stage.name
            PHASE_SECONDS[name] = PHASE_SECONDS.get(name, 0.0) + time.perf_counter() - start
            PEAKS.append(_peak_mb())
            _reset_peak()


def _child(fn: Callable, rows: int, out: str, conn) -> None:
    try:
        import importlib

        for module in ("curate", "download", "filter", "shard"):  # libraries loaded before the peak starts
            importlib.import_module(f"wit.ingest.{module}")
        _reset_peak()
        start = time.perf_counter()
        facts = fn(rows, out) or {}
        seconds = facts.pop("seconds", None) or time.perf_counter() - start
        conn.send({"seconds": seconds, "peak_mb": max(PEAKS + [_peak_mb()]), **facts})
    except BaseException as exc:  # reported, then raised again in the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise


def in_child(fn: Callable, rows: int, out: str) -> dict:
    """Run ``fn(rows, out)`` in a fresh spawned process; its wall time and peak resident memory."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(fn, rows, out, child))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {"error": f"the process died (exit code {proc.join() or proc.exitcode}: killed for memory?)"}
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{fn.__name__} at {rows:,} rows: {result['error']}")
    return result


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1M,4M,16M")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--no-reference", action="store_true", help="skip today's single-process code at 1M")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    steps = [s for s in args.steps.split(",") if s]
    work = args.work or tempfile.mkdtemp(prefix="wit-scale-")
    results: dict[tuple[str, int], dict] = {}
    references: dict[str, dict] = {}
    try:
        for step in steps:
            spec = STEPS[step]
            for rows in sizes:
                out = os.path.join(work, f"{step}-{rows}")
                shutil.rmtree(out, ignore_errors=True)
                os.makedirs(out)
                in_child(spec["input"], rows, out)
                results[(step, rows)] = in_child(spec["run"], rows, out)
                print(step, f"{rows:,}", results[(step, rows)], flush=True)
                if rows == min(sizes) and spec.get("reference") and not args.no_reference:
                    references[step] = in_child(spec["reference"], rows, out)
                    print(step, "reference", references[step], flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    body = report(steps, sizes, results, references)
    print(body)
    if not args.no_write:
        write_section("scale", "Every step at any size (bench_scale)", body, "bench/bench_scale.py")


def report(steps: list[str], sizes: list[int], results: dict, references: dict) -> str:
    rows = []
    for step in steps:
        for n in sizes:
            r = results[(step, n)]
            extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("seconds", "peak_mb"))
            rows.append(
                [
                    STEPS[step]["title"],
                    f"{n / 1e6:g}M",
                    f"{r['seconds']:.1f}",
                    f"{r['seconds'] / n * 1e6:.2f}",
                    f"{r['peak_mb']:,.0f}",
                    extra,
                ]
            )
    lines = [
        f"Commit {commit()}. One process per step, its partitions one after another (one core); "
        f"input parts of {ROWS_PER_PART:,} rows.",
        "",
        table(["step", "rows", "wall s", "µs / row", "peak MB (largest task)", "notes"], rows),
        "",
    ]
    flat = []
    for step in steps:
        lo, hi = results[(step, sizes[0])], results[(step, sizes[-1])]
        t_ratio = (hi["seconds"] / sizes[-1]) / (lo["seconds"] / sizes[0])
        m_ratio = hi["peak_mb"] / lo["peak_mb"]
        per_row = hi["seconds"] / sizes[-1]
        flat.append(
            [
                STEPS[step]["title"],
                f"{t_ratio:.2f}x",
                f"{m_ratio:.2f}x",
                f"{per_row * TARGET_ROWS / 3600:,.1f} core-hours",
            ]
        )
    lines += [
        f"Growth from {sizes[0] / 1e6:g}M to {sizes[-1] / 1e6:g}M rows, and the projection to 400M rows at the "
        f"largest size's time per row (memory per task stays that of the largest size: the bucket count grows "
        f"instead):",
        "",
        table(["step", "time per row", "peak memory per task", "400M rows"], flat),
    ]
    if references:
        ref_rows = []
        for step, r in references.items():
            ours = results[(step, sizes[0])]
            ref_rows.append(
                [
                    STEPS[step]["title"],
                    f"{sizes[0] / 1e6:g}M",
                    f"{r['seconds']:.1f}",
                    f"{r['peak_mb']:,.0f}",
                    f"{ours['seconds']:.1f}",
                    f"{ours['peak_mb']:,.0f}",
                    f"{r['seconds'] / ours['seconds']:.1f}x",
                ]
            )
        lines += [
            "",
            "Today's single-process code on the same input, side by side:",
            "",
            table(["step", "rows", "today s", "today MB", "bucketed s", "bucketed MB", "speed-up"], ref_rows),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
