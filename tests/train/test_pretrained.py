"""Starting from weights (--pretrained) and locked towers (--lock-image / --lock-text): fine-tuning
starts at the source's loss, through open_clip's own loader; locked towers do not move, across a
resume; bad files and unreachable tags are one clear line."""

from __future__ import annotations

import hashlib
import json
import random

import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from wit.manifests.runrecord import read_run_record
from wit.pipeline.cli import cli
from wit.train.checkpoint import CheckpointError, load_checkpoint, load_model
from wit.train.config import TrainConfig
from wit.train.loop import train

# the same batches every time: no crops, no shuffling, no workers
FIXED = dict(batch_size=16, workers=0, augment=False, shuffle=False, log_every=1)


@pytest.fixture(scope="module")
def source(tiny_dataset, tmp_path_factory):
    """A wit-tiny trained well below chance on the tiny dataset (40 steps), and its losses."""
    out = tmp_path_factory.mktemp("source") / "run"
    result = train(TrainConfig(steps=40, lr=1e-3, warmup=5, **FIXED), tiny_dataset.url, str(out))
    losses = pq.read_table(out / "metrics.parquet").column("loss").to_pylist()
    return result.checkpoint, losses


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_fine_tuning_starts_at_the_checkpoints_loss(tiny_dataset, source, tmp_path):
    ckpt, losses = source
    base = dict(steps=1, lr=1e-6, **FIXED)
    fresh = train(TrainConfig(**base), tiny_dataset.url, str(tmp_path / "fresh")).loss
    wit = train(TrainConfig(pretrained=ckpt, **base), tiny_dataset.url, str(tmp_path / "wit")).loss
    # open_clip_train's layout: a DDP "module." prefix and other keys beside the state_dict
    state = load_checkpoint(ckpt)["state_dict"]
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "oc.pt")
    foreign = train(TrainConfig(pretrained=str(tmp_path / "oc.pt"), **base), tiny_dataset.url, str(tmp_path / "oc"))
    # Where the source ended: within the spread of its last losses (batch to batch they differ by
    # up to 0.8 here, so one batch's loss is not held to their mean), and far from a fresh model's.
    end = losses[-10:]
    assert min(end) - 0.3 < wit < max(end) + 0.3 and wit < fresh - 0.8, (wit, end, fresh)
    assert foreign.loss == wit  # the same weights, through open_clip.load_checkpoint
    rec = read_run_record(str(tmp_path / "oc"))
    assert rec.extra["pretrained"]["kind"] == "open_clip" and rec.extra["pretrained"]["sha256"] == _sha(
        tmp_path / "oc.pt"
    )
    rec = read_run_record(str(tmp_path / "wit"))
    assert rec.extra["pretrained"]["kind"] == "wit" and rec.extra["pretrained"]["step"] == 40
    assert rec.extra["pretrained"]["sha256"] == _sha(ckpt) and rec.config["pretrained"] == ckpt


def _towers(state: dict) -> tuple[dict, dict]:
    image = {k: v for k, v in state.items() if k.startswith("visual.")}
    text = {k: v for k, v in state.items() if not k.startswith("visual.") and "logit" not in k}
    return image, text


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_locked_image_tower_stays_put_across_a_resume(tiny_dataset, source, tmp_path):
    ckpt, _ = source
    start_image, start_text = _towers(load_checkpoint(ckpt)["state_dict"])
    out = str(tmp_path / "lit")
    cfg = dict(pretrained=ckpt, lr=1e-3, lock_image=True, save_every=2, **FIXED)
    train(TrainConfig(steps=2, **cfg), tiny_dataset.url, out)
    result = train(TrainConfig(steps=4, resume="auto", **cfg), tiny_dataset.url, out)  # resumes at 2
    assert result.resumed_from.endswith("step-00000002.pt")
    final = load_checkpoint(result.checkpoint)
    image, text = _towers(final["state_dict"])
    assert _same(image, start_image) and not _same(text, start_text)
    # the optimizer holds the trainable parameters only: the text tower and the temperature
    held = sum(len(g["params"]) for g in final["optimizer"]["param_groups"])
    assert held == len(text) + 1
    rec = read_run_record(out)
    assert rec.extra["locked"]["image"] == {"unlocked_groups": 0, "freeze_bn_stats": False}
    assert rec.extra["locked"]["frozen"] == list(start_image) and rec.extra["locked"]["text"] is None
    assert rec.extra["pretrained"]["sha256"] == _sha(ckpt)  # named by the checkpoint the resume read
    assert all(n.startswith(("visual.",)) is False for n in rec.extra["optimizer"]["decayed"])
    with pytest.raises(CheckpointError, match="locked other parameters"):  # the same locks, or no resume
        train(TrainConfig(steps=6, resume="auto", **{**cfg, "lock_image": False}), tiny_dataset.url, out)


def test_locked_text_tower_stays_put(tiny_dataset, source, tmp_path):
    ckpt, _ = source
    start_image, start_text = _towers(load_checkpoint(ckpt)["state_dict"])
    cfg = TrainConfig(pretrained=ckpt, steps=2, lr=1e-3, lock_text=True, **FIXED)
    result = train(cfg, tiny_dataset.url, str(tmp_path / "lt"))
    image, text = _towers(load_checkpoint(result.checkpoint)["state_dict"])
    assert _same(text, start_text) and not _same(image, start_image)


def test_locked_resnet_with_frozen_batchnorm_is_evaluated_as_usual(tiny_dataset, tmp_path):
    cfg = TrainConfig(model="wit-tiny-rn", steps=2, lr=1e-3, lock_image=True, lock_image_freeze_bn_stats=True, **FIXED)
    result = train(cfg, tiny_dataset.url, str(tmp_path / "rn"))
    loaded = load_model(result.checkpoint)  # open_clip's plain BatchNorm layers take the frozen ones' state
    state = load_checkpoint(result.checkpoint)["state_dict"]
    assert torch.equal(loaded.model.state_dict()["visual.bn1.running_mean"], state["visual.bn1.running_mean"])
    with pytest.raises(ValueError, match="cannot lock"):  # a ResNet tower is locked whole, or not at all
        train(TrainConfig(**{**cfg.to_dict(), "lock_image_unlocked_groups": 1}), tiny_dataset.url, str(tmp_path / "x"))


def _train_cli(tiny_dataset, tmp_path, *args: str, env: dict | None = None):
    runner = CliRunner()
    base = ["train", tiny_dataset.url, "-o", str(tmp_path / "out"), "--steps", "1", "--workers", "0"]
    return runner.invoke(cli, [*base, *args], env=env)


@pytest.mark.parametrize("case", ["yaml", "random", "truncated", "empty", "pickled code", "no weights"])
def test_bad_pretrained_files_are_one_clear_line(case, tiny_dataset, source, tmp_path):
    bad = tmp_path / f"bad-{case.replace(' ', '-')}.pt"
    if case == "yaml":
        bad.write_text("model: wit-tiny\nsteps: 3\n")
    elif case == "random":
        bad.write_bytes(random.Random(0).randbytes(4096))
    elif case == "truncated":
        data = open(source[0], "rb").read()
        bad.write_bytes(data[: len(data) // 2])
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "pickled code":
        import pickle

        bad.write_bytes(pickle.dumps({"state_dict": json.JSONDecoder}, protocol=2))
    else:
        torch.save({"epoch": 3, "args": "x"}, bad)
    result = _train_cli(tiny_dataset, tmp_path, "--pretrained", str(bad))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output and "weights_only" not in result.output
    assert bad.name in lines[0]


def test_unknown_and_offline_tags_are_one_clear_line(tiny_dataset, tmp_path, monkeypatch):
    result = _train_cli(tiny_dataset, tmp_path, "--pretrained", "laion9000")
    assert result.exit_code == 1 and "not a pretrained tag of wit-tiny (it has none)" in result.output
    # a real tag whose file is in no local cache, on a machine that cannot download: at once
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    result = _train_cli(
        tiny_dataset, tmp_path, "--model", "RN50", "--pretrained", "openai", env={"HF_HUB_OFFLINE": "1"}
    )
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0], result.output


def _hub_cache(root, repo: str, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/COMMIT/FILE}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_tags_and_hub_ids_come_from_the_local_cache(tiny_dataset, source, tmp_path, monkeypatch):
    """A tag of open_clip's table and an hf-hub id, both found in huggingface_hub's cache: no
    network, the tag's preprocessing kept in the checkpoint, the cached file's digest recorded."""
    import open_clip.pretrained as ocp

    state = load_checkpoint(source[0])["state_dict"]
    buf = tmp_path / "w.bin"
    torch.save(state, buf)
    mean = [0.5, 0.5, 0.5]
    cache = tmp_path / "hub"
    _hub_cache(cache, "wit-test/tiny", {"open_clip_pytorch_model.bin": buf.read_bytes()})
    config = {"model_cfg": {}, "preprocess_cfg": {"mean": mean, "std": [0.25, 0.25, 0.25]}}
    _hub_cache(cache, "wit-test/tiny-hub", {"open_clip_pytorch_model.bin": buf.read_bytes()})
    (cache / "models--wit-test--tiny-hub" / "snapshots" / ("0" * 40) / "open_clip_config.json").write_text(
        json.dumps(config)
    )
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setitem(ocp._PRETRAINED, "wit-tiny", {"wittest": ocp._pcfg(hf_hub="wit-test/tiny/", mean=mean)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source_name, out in (("wittest", "tag"), ("hf-hub:wit-test/tiny-hub", "hub")):
        result = _train_cli(tiny_dataset, tmp_path / out, "--pretrained", source_name, "--log-every", "1")
        assert result.exit_code == 0, result.output
        rec = read_run_record(str(tmp_path / out / "out"))
        assert rec.extra["pretrained"]["sha256"] == _sha(buf), rec.extra["pretrained"]
        assert rec.extra["pretrained"]["kind"] == ("tag" if out == "tag" else "hf-hub")
        ckpt = str(tmp_path / out / "out" / "checkpoints" / "step-00000001.pt")
        assert load_checkpoint(ckpt)["wit"]["preprocess"]["mean"] == mean
        # wit eval's loader gives the model the preprocessing it was trained with
        normalize = load_model(ckpt).preprocess.transforms[-1]
        assert list(normalize.mean) == mean


def test_a_config_of_another_architecture_is_refused(tiny_dataset, source, tmp_path):
    result = _train_cli(tiny_dataset, tmp_path, "--model", "wit-tiny-rn", "--pretrained", source[0])
    assert result.exit_code == 1 and "holds a wit-tiny model, not wit-tiny-rn" in result.output
    model = open_clip.create_model("wit-tiny-rn")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "rn.pt")
    result = _train_cli(tiny_dataset, tmp_path, "--pretrained", str(tmp_path / "rn.pt"))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "do not fit the wit-tiny architecture" in lines[0], lines


def test_a_checkpoint_on_s3_is_read_through_a_local_copy(tiny_dataset, source, s3_bucket, tmp_path):
    from wit.manifests import storage

    url = f"{s3_bucket}/weights/step-00000040.pt"
    storage.write_bytes(url, open(source[0], "rb").read())
    result = train(TrainConfig(pretrained=url, steps=1, lr=1e-6, **FIXED), tiny_dataset.url, str(tmp_path / "s3"))
    local = train(TrainConfig(pretrained=source[0], steps=1, lr=1e-6, **FIXED), tiny_dataset.url, str(tmp_path / "l"))
    assert result.loss == local.loss
    got = read_run_record(str(tmp_path / "s3")).extra["pretrained"]
    assert (got["file"], got["sha256"], got["kind"]) == (url, _sha(source[0]), "wit")
