"""Training at scale on CPU (gloo): resume on another world size, one resume decision, bad shards."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from wit_train_testdata import build_dataset

from wit.manifests import storage
from wit.train.checkpoint import load_checkpoint
from wit.train.config import TrainConfig
from wit.train.loop import train

from conftest import free_port

RUNNER = str(Path(__file__).with_name("_run_train.py"))


def _cmd(ranks: int, dataset: str, out: str, opts: dict) -> list[str]:
    launch = [sys.executable, RUNNER]
    if ranks > 1:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(free_port()),
            RUNNER,
        ]
    return [*launch, dataset, out, json.dumps(opts)]


def _run(ranks, dataset, out, opts, env, kill_after: int | None = None, timeout: float = 240):
    """Run to the end, or (``kill_after``) until the runner SIGKILLs its whole process group as
    rank 0 starts the step after that checkpoint is committed."""
    if kill_after is not None:
        env = {**env, "WIT_TEST_KILL_AFTER": str(kill_after)}
    proc = subprocess.Popen(
        _cmd(ranks, dataset, out, opts),
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, stdout.decode(), stderr.decode()


def _segments(path: Path, ranks: int) -> list[list[dict]]:
    """One rank's log lines split at its resumes."""
    segments: list[list[dict]] = [[]]
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "resumed_at" in row:
            segments.append([row])
        else:
            segments[-1].append(row)
    return segments


@pytest.mark.slow
def test_resume_on_another_world_size_sees_no_uid_twice_per_epoch(tmp_path):
    # 8 shards of 12; 2 ranks x 2 workers: 4 x 2 shards; 1 rank x 2 workers: 2 x 4 shards
    ds = build_dataset(tmp_path / "ds", n_shards=8, per_shard=12, corrupt=0, seed=5)
    out = str(tmp_path / "run")
    log = tmp_path / "uids"
    opts = dict(batch_size=4, steps=30, lr=1e-3, workers=2, shuffle_buffer=5, save_every=3, keep=20, log_every=3)
    env = {"WIT_TEST_UID_LOG": str(log)}
    ckpt = f"{out}/checkpoints/step-{{:08d}}.pt"

    # 2 ranks, killed once step 6 is committed (about 2/3 through epoch 0: 12 batches a rank per epoch)
    rc, _, err = _run(2, ds.url, out, opts, env, kill_after=6)
    assert rc != 0 and "Signal 9 (SIGKILL) received" in err, err[-3000:]  # torchrun then stops rank 1
    seg1 = load_checkpoint(ckpt.format(6))
    assert seg1["stream"]["world_size"] == 2
    assert not (seg1["ranks"][0]["rng"]["torch"] == seg1["ranks"][1]["rng"]["torch"]).all()  # a seed per rank
    # -> 1 rank, killed once step 15 is committed
    rc, _, err = _run(1, ds.url, out, {**opts, "resume": "auto"}, env, kill_after=15)
    assert rc == -signal.SIGKILL, err[-3000:]
    assert "with another layout (2 rank(s) x 2 worker(s) -> 1 x 2)" in err
    # -> 2 ranks again, to the end
    rc, stdout, err = _run(2, ds.url, out, {**opts, "resume": "auto"}, env)
    assert rc == 0, err[-3000:]
    assert "with another layout (1 rank(s) x 2 worker(s) -> 2 x 2)" in err
    assert json.loads(stdout.strip().splitlines()[-1])["step"] == 30

    # What each rank trained on: batches up to the step the next segment resumed from (later ones
    # were trained by a killed run and are trained again from the checkpoint).
    seen: Counter = Counter()
    r0, r1 = _segments(Path(f"{log}.rank0"), 2), _segments(Path(f"{log}.rank1"), 2)
    assert len(r0) == 3 and len(r1) == 2  # rank 1 ran in segments 1 and 3 only
    starts = [0] + [seg[0]["resumed_at"] for seg in r0[1:]]
    assert starts == [0, 6, 15]
    per_rank = {0: r0, 1: [r1[0], [], r1[1]]}
    for rank, segs in per_rank.items():
        for k, seg in enumerate(segs):
            rows = [r for r in seg if "uids" in r]
            if not rows:
                continue
            end = starts[k + 1] if k + 1 < len(starts) else 30
            rows = rows[: end - starts[k]]
            assert len(rows) == end - starts[k], (rank, k)  # one batch per step (grad_accum 1)
            seen.update((r["epoch"], u) for r in rows for u in r["uids"])
    twice = [key for key, n in seen.items() if n > 1]
    assert not twice, twice[:5]
    epochs = Counter(e for e, _ in seen)
    assert set(epochs) >= {0, 1} and epochs[0] >= 0.75 * len(ds.uids)  # most of epoch 0 was trained on
    record = json.loads(Path(out, "_run.json").read_text())
    assert record["extra"]["steps"] == 30


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_gives_every_rank_the_same_outcome(tmp_path):
    ds = build_dataset(tmp_path / "ds", n_shards=4, per_shard=8, corrupt=0, seed=6)
    out = tmp_path / "run"
    opts = dict(batch_size=4, steps=4, lr=1e-3, workers=1, save_every=2, keep=3, log_every=2)
    rc, _, err = _run(2, ds.url, str(out), opts, {})
    assert rc == 0, err[-3000:]
    newest = out / "checkpoints" / "step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short

    # auto: rank 0 passes over it, and both ranks resume from the one before
    rc, _, err = _run(2, ds.url, str(out), {**opts, "steps": 6, "resume": "auto"}, {}, timeout=120)
    assert rc == 0, err[-3000:]
    assert "skipping unreadable checkpoint" in err and err.count("resumed from") == 1  # rank 0 logs
    assert err.count("step-00000002.pt at step 2") == 1

    # the corrupt one named: a clear error on every rank, within seconds, no hang
    newest.write_bytes(b"not a checkpoint")
    t0 = time.monotonic()
    rc, _, err = _run(2, ds.url, str(out), {**opts, "steps": 6, "resume": str(newest)}, {}, timeout=240)
    # (start-up is most of it: two processes importing torch and open_clip on a busy 2-core machine)
    assert rc != 0 and time.monotonic() - t0 < 180
    assert err.count("not a loadable checkpoint") >= 2, err[-3000:]  # raised on rank 0 and on rank 1


@pytest.mark.slow
def test_a_bad_shard_on_s3_never_kills_the_run(tmp_path, s3_bucket, monkeypatch):
    """One shard truncated, one deleted from the moto server mid-run: the run completes and
    skipped.parquet names both."""
    monkeypatch.setenv("WIT_READ_BACKOFF_S", "0")
    monkeypatch.setenv("WIT_READ_TRIES", "4")
    ds = build_dataset(tmp_path / "ds", n_shards=4, per_shard=16, corrupt=0, seed=7)
    shards = sorted(Path(ds.url, "shards").glob("*.tar"))
    shards[1].write_bytes(shards[1].read_bytes()[:9000])  # cut mid-member
    remote = f"{s3_bucket}/ds"
    for path in Path(ds.url).rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{remote}/{path.relative_to(ds.url)}", path.read_bytes())
    victim = f"{remote}/shards/000003.tar"
    order = []

    def delete_mid_run(model, step):
        if step == 1:
            assert not order, "the callback runs once"
            storage.remove(victim)  # read after step 1 by the one in-process worker (shards unshuffled)
            order.append(step)
        return {}

    cfg = TrainConfig(
        batch_size=8, steps=12, lr=1e-3, workers=0, shuffle=False, shuffle_buffer=8, log_every=4, eval_every=1
    )
    result = train(cfg, remote, str(tmp_path / "run"), eval_callback=delete_mid_run)
    assert result.step == 12 and order == [1]
    skipped = pq.read_table(io.BytesIO(storage.read_bytes(str(tmp_path / "run" / "skipped.parquet")))).to_pylist()
    by_shard = {r["shard"].rsplit("/", 1)[-1]: r["reason"] for r in skipped if r["uid"] == ""}
    assert "unreadable tar" in by_shard["000001.tar"]
    assert "unreadable shard" in by_shard["000003.tar"] and "after 4 tries" in by_shard["000003.tar"]
