"""`wit demo`'s library on a small web and a few training steps (the full demo is too slow for the suite;
its timings and scores are measured by hand): it prints the score table and the report path, a second
demo into the same folder does no work and keeps every digest, and the demo with its stages on the moto
S3 server builds the same dataset digest as the local one."""

from __future__ import annotations

import re

import pytest

from wit.manifests import storage
from wit.manifests.runrecord import read_run_record
from wit.manifests.verify import verify
from wit.pipeline import registry
from wit.pipeline.demo import demo_config, run_demo
from wit.pipeline.runner import PipelineConfig
from wit.train.models import resolve_model

from conftest import free_port

STAGES = registry.names()
# A smoke-sized demo: 30 pages, 3 training steps, one evaluation task
SMOKE = dict(pages=30, steps=3, suite=["synthetic-colour"], overrides=("train.batch-size=16", "eval.resamples=50"))


@pytest.fixture(scope="module")
def port():
    return free_port()  # the same for every demo here: image URLs (so uids and digests) contain it


@pytest.fixture(scope="module")
def local_demo(tmp_path_factory, port):
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    result = run_demo(out, port=port, echo=lines.append, progress=False, **SMOKE)
    return out, result, lines


def test_the_demo_prints_the_scores_and_the_report(local_demo):
    out, result, lines = local_demo
    assert [s.action for s in result.steps] == ["ran"] * len(STAGES)
    header = next(i for i, line in enumerate(lines) if line.startswith("task"))
    assert lines[header].split() == ["task", "metric", "value", "95%", "interval", "n", "chance"]
    row = lines[header + 1].split()
    assert row[:2] == ["synthetic-colour", "acc1"] and row[-2:] == ["400", "0.125"]
    assert [s["task"] for s in result.scores] == ["synthetic-colour"]
    assert 0 <= result.scores[0]["ci_low"] <= result.scores[0]["value"] <= result.scores[0]["ci_high"] <= 1
    assert lines[-2] == f"report: {result.report}"
    assert re.fullmatch(r"demo: \d+\.\d minutes in all", lines[-1])
    assert storage.exists(result.report)
    assert set(result.timings) >= {"web", *STAGES, "total"}
    assert verify(str(out / "dataset")).ok


def test_a_second_demo_does_no_work_and_keeps_every_digest(local_demo, port):
    out, first, _ = local_demo
    again = run_demo(out, port=port, echo=lambda _: None, progress=False, **SMOKE)
    assert [s.action for s in again.steps] == ["skipped"] * len(STAGES)
    assert [s.digest for s in again.steps] == [s.digest for s in first.steps]
    assert again.dataset_digest == first.dataset_digest


def test_the_shipped_demo_config_is_valid(tmp_path):
    (tmp_path / "warc").mkdir()
    (tmp_path / "warc" / "w.warc.gz").write_bytes(b"")
    data = demo_config()
    data["extract"]["sources"] = ["warc"]
    cfg = PipelineConfig.from_dict(data, base=str(tmp_path))
    assert cfg.config("curate").allow_private_hosts and cfg.config("download").allow_private_hosts
    # the demo downloads images at its model's input size, so no pixel is fetched to be thrown away
    model = resolve_model(cfg.config("train").model)
    assert model.name == "wit-tiny-rn"
    assert cfg.config("download").image_size == model.config["vision_cfg"]["image_size"]
    # the paper's findings in miniature: zero-shot, a shift scored zero-shot and by an
    # in-distribution probe, and a few-shot curve beside its zero-shot score
    suite = cfg.config("eval").load_suite()
    kinds = {(t.kind, t.dataset, t.train_dataset) for t in suite.tasks}
    assert {
        ("zeroshot_classification", "digits", None),
        ("zeroshot_classification", "synthetic-shape", None),
        ("zeroshot_classification", "synthetic-shape-outline", None),
        ("linear_probe", "synthetic-shape", None),
        ("linear_probe", "synthetic-shape-outline", "synthetic-shape"),
        ("fewshot", "digits", None),
    } <= kinds


def test_demo_seeds_stay_below_the_evaluation_seeds(tmp_path):
    with pytest.raises(ValueError, match="seed must be in"):
        run_demo(tmp_path, seed=10**6, echo=lambda _: None, progress=False, **SMOKE)
    assert not (tmp_path / "web").exists()


@pytest.mark.slow
@pytest.mark.s3
def test_the_demo_on_s3_builds_the_same_dataset_digest(local_demo, port, tmp_path, s3_bucket):
    _, local, _ = local_demo
    remote = run_demo(tmp_path, root=f"{s3_bucket}/demo", port=port, echo=lambda _: None, progress=False, **SMOKE)
    assert remote.root == f"{s3_bucket}/demo"
    assert remote.dataset_digest == local.dataset_digest
    assert read_run_record(f"{s3_bucket}/demo/dataset").output.digest == local.dataset_digest
    assert storage.exists(f"{s3_bucket}/demo/eval/_run.json")
