"""The trainer end to end on CPU: it learns, open_clip loads the result, lineage reaches the dataset."""

from __future__ import annotations

import math

import open_clip
import pyarrow.parquet as pq
import pytest
import torch

from wit.manifests.lineage import lineage
from wit.manifests.runrecord import read_run_record
from wit.manifests.verify import verify
from wit.train.checkpoint import load_checkpoint
from wit.train.config import TrainConfig
from wit.train.data import StreamError
from wit.train.loop import train


def test_tiny_model_learns_and_open_clip_loads_it(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(batch_size=32, steps=50, lr=1e-3, warmup=5, workers=1, log_every=5, save_every=25)
    result = train(cfg, tiny_dataset.url, str(out))
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == list(range(5, 55, 5))
    assert rows[0]["loss"] > 2.5  # about log(32) = 3.47 at the start: chance
    assert result.loss < 0.6 * math.log(32), rows  # well below chance within 50 steps
    assert all(r["logit_scale"] <= 100 for r in rows) and rows[-1]["samples_per_s"] > 0

    model, _, preprocess = open_clip.create_model_and_transforms("wit-tiny", pretrained=result.checkpoint)
    ckpt = load_checkpoint(result.checkpoint)
    assert torch.equal(model.state_dict()["logit_scale"], ckpt["state_dict"]["logit_scale"])
    assert (
        ckpt["wit"]["step"] == 50 and ckpt["wit"]["dataset_digest"] == read_run_record(tiny_dataset.url).output.digest
    )

    rec = read_run_record(str(out))
    assert rec.stage == "train" and rec.output.kind == "checkpoint"
    assert rec.counts == {"corrupt_sample": 1} and rec.extra["skipped"][0][0] == tiny_dataset.corrupt[0]
    assert rec.extra["shards_per_epoch"]["0"] == 4 and "checkpoints/step-00000050.pt" in rec.files
    assert pq.read_table(out / "skipped.parquet").column("uid").to_pylist() == tiny_dataset.corrupt
    tree = lineage(str(out))
    assert [n.record.stage for n in tree.walk()] == ["train", "shard"] and tree.inputs[0].status == "ok"
    assert verify(str(out)).ok


def test_gradient_accumulation_keeps_the_contrastive_batch_whole(tiny_dataset, tmp_path):
    base = dict(steps=1, lr=1e-3, workers=0, shuffle=False, log_every=1)
    whole = train(TrainConfig(batch_size=32, **base), tiny_dataset.url, str(tmp_path / "whole"))
    accum = train(TrainConfig(batch_size=16, grad_accum=2, **base), tiny_dataset.url, str(tmp_path / "accum"))
    assert whole.loss == pytest.approx(accum.loss, abs=1e-5)
    a = load_checkpoint(whole.checkpoint)["state_dict"]
    b = load_checkpoint(accum.checkpoint)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_siglip_and_bf16_run(tiny_dataset, tmp_path):
    cfg = TrainConfig(batch_size=16, steps=2, loss="siglip", precision="bf16", workers=0, log_every=1)
    result = train(cfg, tiny_dataset.url, str(tmp_path / "sig"))
    assert math.isfinite(result.loss)
    model, _, _ = open_clip.create_model_and_transforms("wit-tiny-sigmoid", pretrained=result.checkpoint)
    assert model.logit_bias is not None


def test_too_few_shards_fails_before_training(tiny_dataset, tmp_path):
    with pytest.raises(StreamError, match="need at least 8"):
        train(TrainConfig(batch_size=8, steps=1, workers=8), tiny_dataset.url, str(tmp_path / "x"))


def test_config_validation_and_yaml(tmp_path):
    (tmp_path / "t.yaml").write_text("batch-size: 8\nepochs: 2\nlr: 0.01\nweights: [1, 3]\n")
    cfg = TrainConfig.from_yaml(str(tmp_path / "t.yaml"), steps=5, lr=None)
    assert (cfg.batch_size, cfg.steps, cfg.epochs, cfg.lr, cfg.weights) == (8, 5, None, 0.01, (1.0, 3.0))
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(steps=3, epochs=1)
