"""`wit train`'s options: every flag reaches TrainConfig; --eval-every writes zero-shot numbers into
metrics.parquet; no "initialized randomly" warning from open_clip in `wit train` or `wit eval`."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from wit.pipeline.cli import cli


@pytest.fixture
def captured(monkeypatch):
    """`wit train`'s TrainConfig and callback, without training."""
    import wit.train.loop

    got = {}

    def fake_train(config, dataset, out, eval_callback=None):
        got.update(config=config, callback=eval_callback)

    monkeypatch.setattr(wit.train.loop, "train", fake_train)
    return got


def test_every_new_flag_reaches_the_config(captured, tmp_path):
    args = [
        "train", "ds", "-o", str(tmp_path / "o"), "--pretrained", "openai", "--model", "RN50",
        "--lock-image", "--lock-image-unlocked-groups", "0", "--lock-image-freeze-bn-stats",
        "--lock-text", "--lock-text-unlocked-layers", "2", "--eval-every", "7", "--eval-suite", "synthetic-colour",
        "--resampled", "--weights", "0.7,0.3", "--grad-clip", "0.5", "--log-every", "3", "--shuffle-buffer", "64",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    c = captured["config"]
    assert (c.pretrained, c.model, c.lock_image, c.lock_image_freeze_bn_stats) == ("openai", "RN50", True, True)
    assert (c.lock_text, c.lock_text_unlocked_layers, c.eval_every, c.eval_suite) == (True, 2, 7, "synthetic-colour")
    assert (c.resampled, c.weights, c.grad_clip, c.log_every, c.shuffle_buffer) == (True, (0.7, 0.3), 0.5, 3, 64)
    assert type(captured["callback"]).__name__ == "TrainingEval"


def test_flags_win_over_the_yaml_and_grad_clip_none(captured, tmp_path):
    (tmp_path / "t.yaml").write_text(
        "grad_clip: 0.5\nweights: [1, 3]\nlog-every: 5\nresampled: true\npretrained: w.pt\nlock-text: true\n"
    )
    args = ["train", "ds", "-o", str(tmp_path / "o"), "--config", str(tmp_path / "t.yaml")]
    assert CliRunner().invoke(cli, [*args, "--log-every", "2"]).exit_code == 0
    c = captured["config"]
    assert (c.grad_clip, c.weights, c.log_every, c.resampled, captured["callback"]) == (0.5, (1.0, 3.0), 2, True, None)
    assert (c.pretrained, c.lock_text) == ("w.pt", True)
    assert CliRunner().invoke(cli, [*args, "--grad-clip", "none", "--weights", "2,1"]).exit_code == 0
    assert (captured["config"].grad_clip, captured["config"].weights) == (None, (2.0, 1.0))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval-every", "5"], "--eval-every needs --eval-suite"),
        (["--eval-every", "5", "--eval-suite", "nonsense"], "unknown suite 'nonsense'"),
        (["--eval-every", "5", "--eval-suite", "clip-paper"], "which training evaluation does not take"),
        (["--lock-text-unlocked-layers", "2"], "lock_text_unlocked_layers needs lock_text"),
        (["--grad-clip", "big"], "neither a number nor 'none'"),
        (["--weights", "0.7,x"], "give numbers separated by commas"),
    ],
)
def test_bad_flags_are_one_line(captured, tmp_path, extra, message):
    result = CliRunner().invoke(cli, ["train", "ds", "-o", str(tmp_path / "o"), *extra])
    assert result.exit_code in (1, 2) and message in result.output and "Traceback" not in result.output, result.output


def test_eval_every_writes_zero_shot_values_into_the_metrics(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = ["train", tiny_dataset.url, "-o", str(out), "--steps", "5", "--batch-size", "16", "--workers", "0"]
    result = CliRunner().invoke(
        cli, [*args, "--log-every", "5", "--eval-every", "2", "--eval-suite", "synthetic-colour"]
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "metrics.parquet")
    rows = {r["step"]: r for r in table.to_pylist()}
    assert sorted(rows) == [2, 4, 5]  # the evaluation steps are logged too, with the loss beside
    for step in (2, 4):
        assert 0 <= rows[step]["eval/synthetic-colour/acc1"] <= 1 and rows[step]["loss"] > 0
    assert rows[5]["eval/synthetic-colour/acc1"] is None
    assert {"eval/synthetic-colour/acc5", "eval/synthetic-colour/mean_per_class_recall"} <= set(table.column_names)


def test_no_initialized_randomly_warning(tiny_dataset, tmp_path, run_wit):
    out = tmp_path / "run"
    proc = run_wit("train", tiny_dataset.url, "-o", out, "--steps", "1", "--batch-size", "8", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert "initialized randomly" not in proc.stderr + proc.stdout and "WARNING:root" not in proc.stderr
    ckpt = out / "checkpoints" / "step-00000001.pt"
    proc = run_wit(
        "eval", ckpt, "-o", tmp_path / "eval", "--suite", "synthetic-colour", "--no-cache", "--resamples", "0"
    )
    assert proc.returncode == 0, proc.stderr
    assert "initialized randomly" not in proc.stderr + proc.stdout and "WARNING:root" not in proc.stderr


def test_the_filter_drops_only_that_message(caplog):
    import logging

    import open_clip

    from wit.train.models import no_random_init_warning

    with caplog.at_level(logging.INFO), no_random_init_warning():
        open_clip.create_model("wit-tiny")
        logging.warning("another warning")
    messages = [r.getMessage() for r in caplog.records]
    assert "another warning" in messages and not any("initialized randomly" in m for m in messages)
    assert any("Instantiating model architecture" in m for m in messages)  # open_clip's other records pass


def test_wit_run_train_stage_hands_the_eval_callback(captured, tmp_path):
    # `wit run` calls the registry's train entry, not `wit train`: it must build the same callback
    from wit.manifests.manifest import ManifestRef
    from wit.pipeline import registry
    from wit.train.config import TrainConfig

    entry = registry.load(registry.get("train").entry)
    config = TrainConfig(eval_every=3, eval_suite="synthetic-colour")
    entry(config, [ManifestRef(url="ds")], str(tmp_path / "o"))
    assert type(captured["callback"]).__name__ == "TrainingEval" and captured["config"] is config
    entry(TrainConfig(), [ManifestRef(url="ds")], str(tmp_path / "o"))
    assert captured["callback"] is None
