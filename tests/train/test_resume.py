"""SIGKILL mid-run, then resume auto: the final weights equal an uninterrupted run's (local and S3)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from wit.manifests import storage
from wit.train.checkpoint import load_checkpoint
from wit.train.config import TrainConfig
from wit.train.loop import train

RUNNER = str(Path(__file__).with_name("_run_train.py"))
OPTS = dict(batch_size=16, steps=14, lr=1e-3, warmup=2, workers=2, save_every=4, keep=2, log_every=2)


def _kill_when_checkpointed(dataset: str, out: str, env: dict, wanted: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, RUNNER, dataset, out, json.dumps(OPTS)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own group: workers too
    )
    try:
        deadline = time.monotonic() + 180
        while not storage.exists(wanted):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigkill_then_resume_auto_equals_uninterrupted(where, tiny_dataset, tmp_path, request):
    env = {}
    if where == "s3":
        env = request.getfixturevalue("s3_env")
        out = f"{request.getfixturevalue('s3_bucket')}/killed"
    else:
        out = str(tmp_path / "killed")
    _kill_when_checkpointed(tiny_dataset.url, out, env, storage.join(out, "checkpoints", "step-00000004.pt"))
    assert not storage.exists(storage.join(out, "_run.json"))

    resumed = train(TrainConfig(resume="auto", **OPTS), tiny_dataset.url, out)
    assert resumed.resumed_from and resumed.resumed_from.endswith(".pt") and resumed.step == 14
    straight = train(TrainConfig(**OPTS), tiny_dataset.url, str(tmp_path / "straight"))

    a = load_checkpoint(straight.checkpoint)
    b = load_checkpoint(resumed.checkpoint)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k  # bit for bit
    assert a["ranks"][0]["stream"] == b["ranks"][0]["stream"]  # at the same sample
    assert resumed.loss == straight.loss
    rows = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, "metrics.parquet"))))
    assert rows.column("step").to_pylist() == list(range(2, 16, 2))  # no duplicated or missing rows
    kept = [n for n in storage.listdir(storage.join(out, "checkpoints")) if not storage.is_temporary(n)]
    assert kept == ["step-00000012.pt", "step-00000012.pt.json", "step-00000014.pt", "step-00000014.pt.json"]  # keep=2
