"""torchrun with 2 processes (gloo) on a global batch of B == one process on the same B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from wit_train_testdata import build_dataset

from wit.train.checkpoint import load_checkpoint
from wit.train.config import TrainConfig
from wit.train.loop import train

from conftest import free_port

RUNNER = str(Path(__file__).with_name("_run_train.py"))


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_same_global_batch(tmp_path):
    # 2 shards of 8: rank r reads shard r; one process reads shard 0 then shard 1 -> the same 16
    # samples in the same order. Augmentation is seeded per sample uid, so it is rank-invariant.
    ds = build_dataset(tmp_path / "ds", n_shards=2, per_shard=8, corrupt=0)
    opts = dict(steps=1, lr=1e-3, workers=1, shuffle=False, log_every=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        RUNNER,
        ds.url,
        str(tmp_path / "ddp"),
        json.dumps({**opts, "batch_size": 8}),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = train(TrainConfig(batch_size=16, **opts), ds.url, str(tmp_path / "one"))
    ddp_loss = pq.read_table(tmp_path / "ddp" / "metrics.parquet").column("loss").to_pylist()[0]
    assert ddp_loss == pytest.approx(single.loss, abs=1e-5)
    a = load_checkpoint(single.checkpoint)["state_dict"]
    b = load_checkpoint(str(tmp_path / "ddp" / "checkpoints" / "step-00000001.pt"))["state_dict"]
    assert a.keys() == b.keys()
    before = build_initial_weights()
    moved = 0
    for k in a:
        # One AdamW step moves a weight by about lr = 1e-3 (Adam's first step is ~lr * sign(grad)); a
        # wrong gradient moves it elsewhere by that much. Reduction order differs between 1 and 2
        # ranks, and Adam's normalisation magnifies it where gradients are near eps: up to ~2e-6.
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
        moved += not torch.equal(a[k], before[k])
    assert moved > len(a) // 2  # the step really changed the weights


def build_initial_weights():
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("wit-tiny").state_dict()
