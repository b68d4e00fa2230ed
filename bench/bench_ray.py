"""The Ray executor against the local process pool, on the same machine and the same input.

1. The demo's data stages (extract → curate → download → filter → shard, `pipeline/demo.yaml`: 2
   workers each) on the demo's synthetic web served on 127.0.0.1, once with the local pool and once
   with `executor: ray` on a one-node Ray cluster of 2 CPUs (`ray start --head`, started here and
   stopped by its process group), alternating, ``--repeat`` times each; a fresh server for every run
   (its rate-limit counters start at zero) on one fixed port, so both give the same dataset digest,
   which is checked. Target: Ray within 1.15x of local on 2 cores.
2. Scheduling overhead: a stage of ``--tiny`` partitions that each only commit their marker, on
   the pool (2 workers) and on Ray: milliseconds per partition.
3. What the cluster costs a node: the resident memory of the idle head's processes (GCS, raylet,
   agents, idle workers), and the object store it was given.

    .venv/bin/python bench/bench_ray.py [--pages 2000] [--repeat 1] [--tiny 1000] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# keep Ray on loopback (SCALE-NOTES.md): read when ray is imported, by the head and by this client
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from _report import commit, table, write_section  # noqa: E402

from wit.manifests.stage import Partition, PartitionResult  # noqa: E402
from wit.pipeline.executor import run_stage  # noqa: E402

from conftest import free_port, ray_head_process  # noqa: E402  (the test suite's own Ray head)

OBJECT_STORE = 200_000_000


@dataclass(frozen=True, slots=True)
class NoConfig:
    parts: int


class Tiny:
    """A stage whose partitions do nothing but commit their marker: what is left is scheduling."""

    name = "bench-tiny"
    kind = "tiny"

    def partitions(self, config, inputs):
        return [Partition(index=i, source=f"tiny:{i}") for i in range(config.parts)]

    def run_partition(self, config, partition, out):
        return PartitionResult(counts={"kept": 1})


def data_stages(web: Path, port: int, root: str, executor: str, address: str | None) -> tuple[float, str]:
    from wit.ingest.synthetic import SyntheticWebServer
    from wit.pipeline.demo import SLOW_DELAY_SCALE, demo_config
    from wit.pipeline.runner import PipelineConfig, run_pipeline

    data = demo_config()
    data["root"] = root
    data["extract"]["sources"] = [str(web / "warc")]
    data["executor"] = executor
    if address:
        data["ray-address"] = address
    config = PipelineConfig.from_dict(data, base=root, source="demo.yaml")
    with SyntheticWebServer(web, port=port, delay_scale=SLOW_DELAY_SCALE):
        t0 = time.perf_counter()
        outcomes = run_pipeline(config, until_stage="shard", echo=lambda _: None, progress=False)
        seconds = time.perf_counter() - t0
    return seconds, next(o.digest for o in outcomes if o.stage == "shard")


def tiny(parts: int, root: str, executor: str) -> float:
    t0 = time.perf_counter()
    outcome = run_stage(Tiny(), NoConfig(parts), [], root, workers=2, progress=False, executor=executor)
    assert outcome.done and outcome.ran == parts
    return time.perf_counter() - t0


def head_memory(head_pid: int) -> tuple[float, list[str]]:
    """Resident MB of the Ray head's process group (and the idle workers it started)."""
    out = subprocess.run(["ps", "-eo", "pid,pgid,rss,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    total, parts = 0.0, []
    for line in out:
        pid, pgid, rss, args = line.split(None, 3)
        if int(pgid) == head_pid or ("default_worker.py" in args and "ray" in args):
            mb = int(rss) / 1024
            total += mb
            name = args.split()[0].rsplit("/", 1)[-1]
            if "ray start" in args:
                name = "ray start (the head's parent)"
            elif "default_worker.py" in args and name.startswith("python"):
                name = "idle worker"
            elif name.startswith("python"):
                name = next((a.rsplit("/", 1)[-1] for a in args.split()[1:] if a.endswith(".py")), name)
            parts.append(f"{name} {mb:.0f}")
    return total, parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--tiny", type=int, default=1000)
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = ap.parse_args()

    import ray

    from wit.ingest.synthetic import generate_web

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        port = free_port()
        web = work / "web"
        generate_web(web, pages=args.pages, seed=0, base_url=f"http://127.0.0.1:{port}")
        with ray_head_process(cpus=2, object_store_bytes=OBJECT_STORE) as address:
            time.sleep(5)  # let the head settle before reading its idle memory
            head_pid = int(
                subprocess.run(["pgrep", "-f", f"ray start --head.*--port={address.rsplit(':', 1)[1]}"],
                               capture_output=True, text=True).stdout.split()[0]
            )  # fmt: skip
            idle_mb, idle_parts = head_memory(head_pid)
            ray.init(address=address, logging_level="WARNING", configure_logging=False)
            times: dict[str, list[float]] = {"local": [], "ray": []}
            digests: dict[str, set] = {"local": set(), "ray": set()}
            for r in range(args.repeat):
                for executor in ("local", "ray"):
                    root = str(work / f"{executor}-{r}")
                    seconds, digest = data_stages(web, port, root, executor, address)
                    times[executor].append(seconds)
                    digests[executor].add(digest)
                    print(f"data stages, {executor}: {seconds:.1f} s, dataset {digest[:16]}", flush=True)
                    shutil.rmtree(root, ignore_errors=True)
            same = digests["local"] == digests["ray"] and len(digests["local"]) == 1
            tiny_s = {e: tiny(args.tiny, str(work / f"tiny-{e}"), e) for e in ("local", "ray")}
            for e, s in tiny_s.items():
                print(f"{args.tiny} tiny partitions, {e}: {s:.2f} s", flush=True)
            busy_mb, _ = head_memory(head_pid)
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    local, on_ray = statistics.median(times["local"]), statistics.median(times["ray"])
    rows = [
        ["demo data stages (extract → shard), s", f"{local:.1f}", f"{on_ray:.1f}", f"{on_ray / local:.2f}x"],
        [
            f"{args.tiny} tiny partitions, ms per partition",
            f"{1000 * tiny_s['local'] / args.tiny:.2f}",
            f"{1000 * tiny_s['ray'] / args.tiny:.2f}",
            f"{tiny_s['ray'] / tiny_s['local']:.2f}x",
        ],
    ]
    body = table(["what", "local pool (2 workers)", "Ray (2 CPUs)", "Ray / local"], rows)
    body += (
        f"\n\nThe demo's {args.pages}-page synthetic web, `pipeline/demo.yaml` up to shard, {args.repeat} run(s) "
        f"each (median); dataset digests {'identical' if same else 'DIFFER'} between the executors. Target: Ray "
        "within 1.15x of local. The Ray time includes connecting the driver and starting its workers "
        "(the first run of each stage's environment).\n\n"
        f"Per node, as measured here: the idle head (GCS, raylet, dashboard and runtime-env agents, its prestarted "
        f"workers) holds {idle_mb:.0f} MB resident ({', '.join(idle_parts)}); after the runs, with the "
        f"workers it keeps, {busy_mb:.0f} MB. Object store: {OBJECT_STORE // 10**6} MB given here "
        "(`--object-store-memory`; Ray's default is 30% of RAM in /dev/shm); `wit` puts only the stage and "
        "its config in it, and markers come back, so a few hundred MB is plenty. A worker node runs a raylet "
        "and its agents, without GCS."
    )
    print(body)
    if not args.no_write:
        body = f"Commit `{commit()}`.\n\n" + body
        print("wrote", write_section("ray", "Ray executor vs the local pool", body, "bench/bench_ray.py"))


if __name__ == "__main__":
    main()
