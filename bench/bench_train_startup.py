"""`wit train` start-up: planning the data stream over 100,000 shards, the old code vs the new, in one run.

Before any worker starts, `wit train` plans its stream: it resolves the shard list (here a brace
pattern and its ``sizes.json``, no tar is read) and checks that every worker of every rank gets at
least one batch per epoch. The old code (commit 770d49f) did all of it on every rank and reshuffled
the whole shard list once per (rank, worker): O(ranks x workers x shards) on each rank. The new code
resolves the sources once on rank 0, broadcasts them (``wit.train.distributed.on_main``) and plans
in O(shards).

1. Two ranks under torchrun (gloo, CPU), 8 workers each, batch 256: seconds per rank from a barrier
   to the end of planning; old and new are the same worker script run against the old commit's
   package (a git worktree put first on PYTHONPATH) and against this working tree.
2. One process planning rank 0 of a large simulated world (64 ranks x 8 workers), old vs new, and a
   new-only row at LAION-2B scale (230,000 shards, 512 ranks x 8 workers).

    .venv/bin/python bench/bench_train_startup.py [--shards 100000] [--world 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "770d49f"
OLD_TREE = Path(f"/tmp/wit-old-{OLD_COMMIT}")
OLD_PKG = Path("/tmp/wit-old-pkg")
SAMPLES_PER_SHARD = 1000
WORKERS = 8
BATCH = 256
OLD_BUDGET_S = 60.0  # the old code's simulated-world row is shrunk to stay under this


# -------------------------------------------------------------------------------------------------
# the worker: runs against whichever `wit` is first on the path (old or new), reports JSON


def _plan(url: str, rank: int, world: int, env=None) -> tuple[dict, int | None]:
    """Plan the stream the way this `wit` does at start-up; (seconds by part, steps per epoch)."""
    import wit.train.data as data
    import wit.train.distributed as distributed

    t0 = time.perf_counter()
    kw = {"seed": 0, "rank": rank, "world_size": world, "workers": WORKERS, "batch_size": BATCH}
    if hasattr(distributed, "on_main"):  # new: resolve once on rank 0, broadcast, plan in O(shards)
        parts = {}

        def resolve():
            t = time.perf_counter()
            out = data.resolve_sources(url)
            parts["resolve"] = time.perf_counter() - t  # rank 0 only; the rest of "sources" is the broadcast
            return out

        sources = distributed.on_main(env, resolve) if env is not None else resolve()
        t1 = time.perf_counter()
        info = data.plan_stream(None, sources=sources, **kw)
        t2 = time.perf_counter()
        parts.update(sources=t1 - t0, plan=t2 - t1, total=t2 - t0)
    else:  # old: every rank resolves, then reshuffles the shard list per (rank, worker)
        info = data.plan_stream(url, **kw)
        parts = {"total": time.perf_counter() - t0}
    return parts, info.steps_per_epoch


def _whoami() -> str:
    import wit.train.data

    return wit.train.data.__file__  # `wit` itself is a namespace package (no __file__)


def worker(args: argparse.Namespace) -> None:
    if args.worker == "dist":
        import wit.train.distributed as distributed

        env = distributed.init("cpu")
        distributed.barrier(env)
        parts, steps = _plan(args.url, env.rank, env.world_size, env)
        everyone = distributed.gather_objects(env, parts)
        if env.is_main:
            print("RESULT " + json.dumps({"wit": _whoami(), "ranks": everyone, "steps": steps}), flush=True)
        distributed.barrier(env)
        distributed.shutdown(env)
    else:
        parts, steps = _plan(args.url, 0, args.world)
        print("RESULT " + json.dumps({"wit": _whoami(), "ranks": [parts], "steps": steps}), flush=True)


# -------------------------------------------------------------------------------------------------
# the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], old: bool, timeout: float) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    if old:
        env["PYTHONPATH"] = str(OLD_PKG)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    lines = [ln for ln in proc.stdout.splitlines() if "RESULT " in ln]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1].split("RESULT ", 1)[1])
    expect = OLD_TREE if old else ROOT
    if not Path(result["wit"]).resolve().is_relative_to(expect.resolve()):
        sys.exit(f"the worker imported {result['wit']}, expected a file under {expect}")
    print(f"  ({'old' if old else 'new'}: wit.train.data from {result['wit']})", flush=True)
    return result


def run_dist(url: str, old: bool) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += [__file__, "--worker", "dist", "--url", url]
    return _run(cmd, old, timeout=600)


def run_single(url: str, world: int, old: bool, timeout: float = 600) -> dict | None:
    return _run([sys.executable, __file__, "--worker", "single", "--url", url, "--world", str(world)], old, timeout)


def make_dataset(folder: Path, shards: int) -> str:
    """A ``sizes.json`` for ``shards`` shard names and no tar: the brace pattern over them."""
    folder.mkdir(parents=True)
    width = max(6, len(str(shards - 1)))
    (folder / "sizes.json").write_text(json.dumps({f"{i:0{width}d}.tar": SAMPLES_PER_SHARD for i in range(shards)}))
    return f"{folder}/{{{0:0{width}d}..{shards - 1:0{width}d}}}.tar"


def setup_old() -> tuple[bool, bool]:
    """The old commit's tree as a `wit` package on PYTHONPATH; (worktree created, pkg dir created)."""
    created_tree = created_pkg = False
    if not (OLD_TREE / "train" / "data.py").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(OLD_TREE), OLD_COMMIT], cwd=ROOT, check=True)
        created_tree = True
    link = OLD_PKG / "wit"
    if not link.is_symlink():
        created_pkg = not OLD_PKG.exists()
        OLD_PKG.mkdir(exist_ok=True)
        link.symlink_to(OLD_TREE)
    return created_tree, created_pkg


def _slowest(run: dict) -> float:
    return max(r["total"] for r in run["ranks"])


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=_slowest)[len(runs) // 2]


def _each(runs: list[dict]) -> str:
    return ", ".join(f"{_slowest(r):.2f}" for r in runs)


def _s(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _speedup(old: float | None, new: float | None) -> str:
    return "—" if old is None or new is None else f"{old / new:.1f}x"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["dist", "single"])
    ap.add_argument("--url")
    ap.add_argument("--world", type=int, default=64, help="simulated ranks for the one-process rows")
    ap.add_argument("--repeats", type=int, default=3, help="torchrun launches per side (the median is kept)")
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--big-shards", type=int, default=230_000, help="the new-only LAION-2B-scale row")
    ap.add_argument("--big-world", type=int, default=512)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(Path(__file__).parent))
    from _report import commit, table, write_section

    measured = commit()
    tmp = Path(tempfile.mkdtemp(prefix="wit-bench-startup-"))
    created_tree, created_pkg = setup_old()
    try:
        url = make_dataset(tmp / "ds", args.shards)
        n = f"{args.shards:,}"
        rows, notes = [], []

        print(f"torchrun, 2 ranks x {WORKERS} workers, {n} shards", flush=True)
        olds, news = [], []
        for _ in range(args.repeats):  # alternated, so a busy spell on the machine hits both
            olds.append(run_dist(url, old=True))
            news.append(run_dist(url, old=False))
        old, new = _median_run(olds), _median_run(news)
        if old["steps"] != new["steps"]:
            sys.exit(f"steps per epoch differ: old {old['steps']}, new {new['steps']}")
        old_s, new_s = _slowest(old), _slowest(new)
        rows.append(
            ["torchrun, 2 ranks (gloo, CPU)", n, f"2 x {WORKERS}", _s(old_s), _s(new_s), _speedup(old_s, new_s)]
        )
        r0, r1 = new["ranks"][0], new["ranks"][1]
        notes.append(
            f"New, 2 ranks, where the time goes: rank 0 resolved the sources in {r0['resolve']:.2f} s (brace "
            f"expansion, `sizes.json`, a `Shard` per name) and had broadcast them at {r0['sources']:.2f} s; rank 1 "
            f"had them at {r1['sources']:.2f} s (the broadcast pickles the {n} `Shard`s on rank 0 and unpickles "
            f"them on rank 1); planning then took {r0['plan']:.2f} / {r1['plan']:.2f} s. Steps per epoch agree "
            f"(old {old['steps']}, new {new['steps']})."
        )
        launches = f"old {_each(olds)} s, new {_each(news)} s"
        notes.append(f"2 ranks, slowest rank per launch: {launches}.")
        print(f"  {launches} (median: old {old_s:.2f}, new {new_s:.2f})", flush=True)

        # the old code reshuffles once per (rank, worker): a line through two small worlds says what
        # the simulated one would cost, and shrinks it if it would not fit the budget
        print("old, one process: the cost per simulated worker from 2 and 8 ranks", flush=True)
        t2 = run_single(url, 2, old=True)["ranks"][0]["total"]
        t8 = run_single(url, 8, old=True)["ranks"][0]["total"]
        per_worker = max(0.0, (t8 - t2) / (6 * WORKERS))

        def estimate(w: int) -> float:
            return t2 + per_worker * (w - 2) * WORKERS

        print(
            f"  {per_worker * 1000:.0f} ms per (rank, worker); {args.world} x {WORKERS}: ~{estimate(args.world):.0f} s"
        )
        world = args.world
        while world > 8 and estimate(world) > OLD_BUDGET_S:
            world //= 2
        if world != args.world:
            notes.append(
                f"The one-process row simulates {world} ranks, not {args.world}: the old code would need about "
                f"{estimate(args.world):.0f} s at {args.world} x {WORKERS} on this machine "
                f"({per_worker * 1000:.0f} ms per (rank, worker))."
            )
        print(f"one process, rank 0 of {world} x {WORKERS}", flush=True)
        old1 = run_single(url, world, old=True)
        new1 = run_single(url, world, old=False)
        if old1["steps"] != new1["steps"]:
            sys.exit(f"steps per epoch differ: old {old1['steps']}, new {new1['steps']}")
        o, w = old1["ranks"][0]["total"], new1["ranks"][0]["total"]
        rows.append([f"one process, rank 0 of {world} ranks", n, f"{world} x {WORKERS}", _s(o), _s(w), _speedup(o, w)])
        print(f"  old {o:.2f} s, new {w:.2f} s", flush=True)

        big_n = f"{args.big_shards:,}"
        print(f"one process, new only, rank 0 of {args.big_world} x {WORKERS}, {big_n} shards", flush=True)
        big_url = make_dataset(tmp / "big", args.big_shards)
        big = run_single(big_url, args.big_world, old=False, timeout=30)
        if big is None:
            notes.append(f"The LAION-2B-scale row ({big_n} shards, {args.big_world} x {WORKERS}) took over 30 s.")
            big_s = None
        else:
            big_s = big["ranks"][0]["total"]
            print(f"  new {big_s:.2f} s", flush=True)
        rows.append(
            [
                f"one process, rank 0 of {args.big_world} ranks",
                big_n,
                f"{args.big_world} x {WORKERS}",
                "—",
                _s(big_s),
                "—",
            ]
        )
        if big is not None:
            p = big["ranks"][0]
            notes.append(
                f"LAION-2B scale, new: resolving the sources {p['sources']:.2f} s, planning {p['plan']:.2f} s "
                "(no broadcast in one process)."
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_pkg:
            shutil.rmtree(OLD_PKG, ignore_errors=True)
        if created_tree:
            subprocess.run(["git", "worktree", "remove", "--force", str(OLD_TREE)], cwd=ROOT, check=False)

    body = (
        f"Measured: {measured} (new) against {OLD_COMMIT} (old). Seconds for the stream planning that "
        f"`wit train` does at start-up, before any DataLoader worker starts: resolving the shard list of a brace "
        f"pattern over {n} shard names and its `sizes.json` ({SAMPLES_PER_SHARD} samples each; no tar exists, "
        f"no data is read) and checking that every worker of every rank gets a batch of {BATCH} per epoch. Old "
        f"(`{OLD_COMMIT}`): every rank calls `plan_stream(url, ...)`, which resolves the shards itself and "
        f"reshuffles the whole shard list once per (rank, worker), O(ranks x workers x shards) on each rank. New: "
        f"rank 0 alone resolves the sources (`resolve_sources` inside `distributed.on_main`), they are broadcast, "
        f"and each rank calls `plan_stream(None, sources=...)`, O(shards). The torchrun row times each rank from a "
        f"barrier after `distributed.init('cpu')` to the end of planning (gloo, `OMP_NUM_THREADS=1`) and takes the "
        f"slowest rank, the median of {args.repeats} launches per side, old and new alternated; the one-process "
        f"rows plan rank 0 of a simulated world in a fresh process (process start and imports excluded). Old and "
        f"new are the same worker script, run with the old commit's tree (a git worktree) first on `PYTHONPATH` "
        f"for old.\n\n"
        + table(["setup", "shards", "ranks x workers", "old s (max over ranks)", "new s", "speed-up"], rows)
        + "\n\n"
        + "\n".join(f"- {x}" for x in notes)
        + "\n\nReproduce: `.venv/bin/python bench/bench_train_startup.py`\n"
    )
    path = write_section(
        "train_startup", "Training start-up: stream planning at 100k shards", body, "bench/bench_train_startup.py"
    )
    print(table(["setup", "shards", "ranks x workers", "old s", "new s", "speed-up"], rows))
    print("\n".join(notes))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
