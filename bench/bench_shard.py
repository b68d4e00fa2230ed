"""Reshard throughput: ``wit shard`` (plan + write) vs a plain byte copy of the same shards.

Target (issue #4): at least half of copy speed. Both read the same downloaded shards from local
disk; MB/s counts the downloaded shards' bytes. Each figure is the median of ``--trials`` runs
(and the ratio of the fastest runs beside it), the tools taking turns, each into a fresh folder
after ``sync``, so no run pays for writing back an earlier one's dirty pages. The same comparison
is made four times: onto local disk as both tools run by default (a rename commits, no fsync,
like ``cp``), onto local disk with ``WIT_FSYNC=1`` against a copy that is fsynced before its
rename, onto local disk with the page cache dropped before each run (as root; the source shards
are then read from disk, as a dataset larger than memory is), and onto S3 (a ``moto_server`` on
127.0.0.1, reached over HTTP) against putting each shard there.

    .venv/bin/python bench/bench_shard.py [--samples 24000] [--trials 7]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from _ingest_data import images, write_downloaded, write_filtered  # noqa: E402
from _report import commit, table, write_section  # noqa: E402

from wit.ingest import shard as shard_module  # noqa: E402
from wit.ingest.shard import SHARD_PHASES, ShardConfig  # noqa: E402
from wit.manifests import storage, tarwrite  # noqa: E402
from wit.pipeline.executor import run_stage  # noqa: E402

from conftest import moto_process  # noqa: E402  (the test suite's own moto_server)

MODES = {
    "warm": "local, fsync off",
    "fsync": "local, fsync on",
    "cold": "local, cold cache",  # the source shards dropped from the page cache before each run
}
UNIQUE = 300
PER_SHARD = 4000  # samples per downloaded and per output shard


def copy(src: list[Path], dest: Path) -> None:
    dest.mkdir()
    for p in src:  # a plain byte copy (sendfile), committed by rename; fsynced when WIT_FSYNC=1
        storage.put_file(str(p), str(dest / p.name))


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    """Evict clean pages (the source shards among them) so the run reads them from disk (root)."""
    Path("/proc/sys/vm/drop_caches").write_text("1")


def hash_once(src: list[Path]) -> None:
    """One sha256 pass over the shards' bytes (page cache warm): the floor under each of wit's two."""
    for p in src:
        with open(p, "rb") as fh:
            hashlib.file_digest(fh, "sha256")


def shard(filtered, dest: Path | str, readahead: bool = True, direct: bool = True) -> None:
    config = ShardConfig(samples_per_shard=PER_SHARD, card=False)
    ref = filtered
    hint, set_direct = shard_module.Readahead, tarwrite.set_direct
    if not readahead:
        shard_module.Readahead = lambda images, then=(): nullcontext()  # the write phase as it was without it
    if not direct:
        tarwrite.set_direct = lambda fd, on: False  # a durable shard through the page cache, then fsync
    try:
        for stage, sub in SHARD_PHASES:
            out = storage.join(str(dest), sub) if sub else str(dest)
            ref = run_stage(stage, config, [ref], out, progress=False).ref
    finally:
        shard_module.Readahead, tarwrite.set_direct = hint, set_direct


@contextmanager
def moto_bucket() -> Iterator[str]:
    """A bucket on a ``moto_server`` process on 127.0.0.1, reached over HTTP as a real S3 endpoint."""
    import boto3

    with moto_process() as endpoint:
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            boto3.client("s3").create_bucket(Bucket="bench-shard")
            yield "s3://bench-shard"
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v


def s3_times(src: list[Path], filtered, trials: int) -> dict[str, list[float]]:
    """The same two jobs with their output on S3: the copy puts each shard, wit shard writes there."""
    times: dict[str, list[float]] = {}
    with moto_bucket() as bucket:
        for trial in range(trials):
            for name in ("copy", "wit"):
                dest = f"{bucket}/{name}{trial}"
                start = time.perf_counter()
                if name == "copy":
                    for p in src:
                        storage.put_file(str(p), f"{dest}/{p.name}")
                else:
                    shard(filtered, dest)
                times.setdefault(name, []).append(time.perf_counter() - start)
                storage.remove(dest, recursive=True)  # moto keeps objects in memory
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24000)
    parser.add_argument("--trials", type=int, default=7)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    try:
        blobs = images(UNIQUE)
        down, ledger = write_downloaded(
            root / "downloaded", [blobs[i % UNIQUE] for i in range(args.samples)], per_shard=PER_SHARD
        )
        filtered = write_filtered(root / "filtered", down, ledger)
        src = sorted((root / "downloaded" / "shards").glob("*.tar"))
        mb = sum(p.stat().st_size for p in src) / 1e6
        runs = {
            "copy": lambda d: copy(src, d),
            "wit": lambda d: shard(filtered, d),
            "sha256": lambda d: hash_once(src),
            "wit-plain": lambda d: shard(filtered, d, readahead=False),
            "wit-buffered": lambda d: shard(filtered, d, direct=False),
        }
        times: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        modes = [m for m in MODES if m != "cold" or can_drop_caches()]
        n = 0
        for mode in modes:
            os.environ["WIT_FSYNC"] = "1" if mode == "fsync" else "0"
            for _ in range(args.trials):
                for name, fn in runs.items():
                    if {"sha256": "warm", "wit-plain": "cold", "wit-buffered": "fsync"}.get(name, mode) != mode:
                        continue  # sha256 writes nothing: once is enough; the hint matters on a cold cache,
                        # O_DIRECT only where the write is durable
                    n += 1
                    os.sync()
                    if mode == "cold":
                        drop_caches()
                    start, start_cpu = time.perf_counter(), time.process_time()
                    fn(root / f"out{n}")
                    times.setdefault((name, mode), []).append(time.perf_counter() - start)
                    cpu.setdefault((name, mode), []).append(time.process_time() - start_cpu)
                    shutil.rmtree(root / f"out{n}", ignore_errors=True)
                    os.sync()
        os.environ.pop("WIT_FSYNC")
        remote = s3_times(src, filtered, args.trials)

        rows = []
        for mode in modes:
            base = statistics.median(times[("copy", mode)])
            best = min(times[("copy", mode)])
            for name, label in (
                ("copy", "byte copy (`shutil.copyfile`, then rename)"),
                ("wit", "`wit shard` (plan + shuffle + write + manifest), one process"),
                ("sha256", "for scale: one sha256 pass over the same bytes, one thread"),
                ("wit-plain", "`wit shard` without its readahead hint"),
                ("wit-buffered", "`wit shard` through the page cache, then fsync (without `O_DIRECT`)"),
            ):
                if (name, mode) not in times:
                    continue
                med = statistics.median(times[(name, mode)])
                cpu_s = statistics.median(cpu[(name, mode)])
                low = min(times[(name, mode)])
                figures = [f"{med:.2f}", f"{cpu_s:.2f}", f"{mb / med:.0f}", f"{base / med:.2f}", f"{best / low:.2f}"]
                rows.append([MODES[mode], label, *figures])
        base, best = statistics.median(remote["copy"]), min(remote["copy"])
        for name, label in (
            ("copy", "byte copy to S3 (`fsspec` put of each shard)"),
            ("wit", "`wit shard` with its output on S3"),
        ):
            med, low = statistics.median(remote[name]), min(remote[name])
            figures = [f"{med:.2f}", "", f"{mb / med:.0f}", f"{base / med:.2f}", f"{best / low:.2f}"]
            rows.append(["S3 (moto)", label, *figures])
        body = (
            f"Commit `{commit()}`. "
            f"{args.samples:,} samples (256 px JPEG, {mb * 1e3 / args.samples:.0f} kB) in {len(src)} shards, "
            f"{mb:.0f} MB, local disk, page cache warm but in the cold-cache rows; {PER_SHARD} samples per "
            f"output shard; {args.trials} runs "
            "of each, taking turns, each after `sync`; seconds are the median, and the last column compares the "
            "fastest runs (this VM's page allocation swings a 0.2 s copy to 1 s and more). `wit shard` reads the "
            "images into reused 4 MB buffers, checks each against filter's xxh3-128 there, and writes each buffer "
            "with one thread while another computes the shard's sha256 for the manifest. CPU seconds are all "
            "threads of the process, kernel time included. That sha256 of every output byte bounds any tool that "
            "hashes what it writes: one pass on one core (SHA-NI here) is by itself only about half of copy speed "
            "(the sha256 row), and the reading, checking and writing have to share the second core, so on local "
            "disk without fsync the target leaves no room on this 2-core machine. With a cold cache (the "
            "page cache dropped before each run) the copy reads each shard front to back while `wit shard` "
            "reads the images in its shuffled order; it asks the kernel for them in file order ahead of use "
            "(`POSIX_FADV_WILLNEED`); the row without that hint shows what it saves. With `WIT_FSYNC=1` the "
            "data has to be on disk before the rename anyway, so `wit shard` writes its buffers with `O_DIRECT` "
            "as the next ones fill (no page-cache copy, no long fsync at the end); the row through the page "
            "cache shows what that saves. "
            "The S3 rows write to a `moto_server` on 127.0.0.1 over HTTP (object storage, where the design "
            "puts datasets; wall time only, moto's CPU is another process). "
            "Target: `wit shard` at least 0.5× copy speed.\n\n"
            + table(["output", "", "seconds", "CPU seconds", "MB/s", "× copy speed", "× copy, fastest runs"], rows)
        )
        print(body)
        write_section("shard", "Reshard throughput: `wit shard` vs byte copy", body, "bench/bench_shard.py")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
