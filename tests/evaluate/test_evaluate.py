"""End to end: a random-init wit-tiny checkpoint through a suite; outputs, cache, lineage, bad input."""

from __future__ import annotations

import json
import re

import open_clip
import pyarrow.parquet as pq
import pytest
import torch

from wit.evaluate import EvalConfig, EvalError, evaluate, export
from wit.manifests import storage
from wit.manifests.manifest import ManifestRef
from wit.manifests.runrecord import RunRecord, read_run_record, write_run_record
from wit.manifests.schemas import EVAL_RESULTS
from wit.manifests.verify import verify
from wit.train.checkpoint import CheckpointError, save_checkpoint
from wit.train.models import resolve_model

SUITE = """
name: small
tasks:
  - synthetic-colour
  - synthetic-retrieval
  - name: shape-probe
    kind: linear_probe
    dataset: synthetic-shape
  - name: shape-fewshot
    kind: fewshot
    dataset: synthetic-shape
    fewshot_ks: [1, 4, 16]
  - name: shape
    kind: zeroshot_classification
    dataset: synthetic-shape
    templates: ["a {c}.", "a {c} shape."]
"""


def _checkpoint(url: str, name: str = "wit-tiny", seed: int = 0, wit: bool = True) -> str:
    spec = resolve_model(name)
    torch.manual_seed(seed)
    model = open_clip.create_model(spec.name)
    payload = {"state_dict": model.state_dict()}
    if wit:
        payload["wit"] = {"format": 1, "model": spec.name, "model_config": spec.config, "step": 0}
    save_checkpoint(url, payload)
    return url


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    train = root / "train"
    ckpt = _checkpoint(str(train / "checkpoints" / "latest.pt"))
    # A finished train output around the checkpoint, so lineage goes eval -> train -> dataset.
    ref = ManifestRef(url=str(train), kind="train", digest="d" * 64)
    write_run_record(str(train), RunRecord(stage="train", config={}, inputs=[], output=ref))
    (root / "small.yaml").write_text(SUITE)
    cfg = EvalConfig(cache=str(root / "cache"), resamples=200)
    first = evaluate(ckpt, str(root / "out1"), str(root / "small.yaml"), cfg)
    return root, ckpt, cfg, first


def test_suite_writes_results_report_and_run_record(world):
    root, ckpt, cfg, res = world
    out = root / "out1"
    table = pq.read_table(out / "part-00000.parquet")
    assert table.schema.remove_metadata() == EVAL_RESULTS.remove_metadata()
    rows = {(r["task"], r["metric"]): r for r in res.rows}
    acc = rows[("synthetic-colour", "acc1")]
    assert acc["n"] == 400 and acc["ci_low"] <= acc["value"] <= acc["ci_high"]
    assert acc["checkpoint_digest"] == storage.sha256_url(ckpt) and acc["templates_digest"]
    assert ("synthetic-colour", "acc1_single_template") in rows and ("synthetic-colour", "acc5") in rows
    assert rows[("synthetic-retrieval", "image_retrieval_recall@10")]["n"] == 720
    assert rows[("synthetic-retrieval", "text_retrieval_recall@10")]["n"] == 144
    assert ("shape-probe", "lp_acc1") in rows and ("shape-fewshot", "fewshot_k16_acc1") in rows
    assert {r["task"] for r in res.rows} == {
        "synthetic-colour",
        "synthetic-retrieval",
        "shape-probe",
        "shape-fewshot",
        "shape",
    }
    # CLIP_benchmark's result shape, one entry per task
    results = json.loads((out / "results.json").read_text())
    colour = next(e for e in results if e["wit"]["task"] == "synthetic-colour")
    assert colour["task"] == "zeroshot_classification" and set(colour["metrics"]) >= {"acc1", "acc5"}
    assert colour["dataset"] == "synthetic-colour" and colour["model"] == "wit-tiny"
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "Prompt ensembling" in md and "![Headline score per task](report/summary.png)" in md
    assert html.count("data:image/png;base64,") >= 4 and "report/" not in html.split("<body>")[1].split("<img")[0]
    pngs = {p.name for p in (out / "report").iterdir()}
    assert {
        "summary.png",
        "fewshot-shape-fewshot.png",
        "confusion-synthetic-colour.png",
        "confusion-shape-probe.png",
        "confusion-shape.png",
    } <= pngs
    rec = read_run_record(str(out))
    assert rec.stage == "eval" and rec.output.kind == "eval_results"
    assert rec.inputs[0].url == str(root / "train") and rec.inputs[0].kind == "train"
    assert rec.counts["kept"] == 400 + 144 + 400 + 400 + 400
    assert verify(str(out)).ok, verify(str(out)).problems


def test_second_run_hits_the_feature_cache(world):
    root, ckpt, cfg, first = world
    assert first.images_encoded == 400 + 144 + 400 + 320  # each split once, shared across tasks
    again = evaluate(ckpt, str(root / "out2"), str(root / "small.yaml"), cfg)
    assert again.images_encoded == 0 and again.images_cached > 0 and not again.reused
    key = lambda r: (r["task"], r["metric"])  # noqa: E731
    assert sorted(first.rows, key=key) == sorted(again.rows, key=key)
    # the same folder again: the finished run is returned as it is
    same = evaluate(ckpt, str(root / "out1"), str(root / "small.yaml"), cfg)
    assert same.reused and same.ref == first.ref


def test_eval_command_prints_scores_and_its_own_time(world, tmp_path, run_wit):
    """``wit eval`` as a user runs it: the score table, how long the evaluation took after
    start-up and how many images it encoded, the report; the same folder again does no work."""
    root, ckpt, _, _ = world
    (tmp_path / "colour.yaml").write_text("tasks: [synthetic-colour]\n")
    args = ("eval", ckpt, "-o", tmp_path / "out", "--suite", tmp_path / "colour.yaml", "--no-cache", "--resamples", 50)
    out = run_wit(*args, check=True).stdout
    assert re.search(r"^synthetic-colour +acc1 +0\.\d{3}  \[0\.\d{3}, 0\.\d{3}\] +400$", out, re.M), out
    took = re.search(r"^(\d+\.\d\d) s after start-up: 400 images encoded \((\d+)/s\), 0 from the cache$", out, re.M)
    assert took and float(took.group(1)) > 0, out
    assert f"report: {tmp_path / 'out' / 'report.html'}" in out and (tmp_path / "out" / "results.json").exists()
    again = run_wit(*args, check=True).stdout
    assert "after start-up" not in again and "synthetic-colour" in again


def test_missing_classnames_is_a_clear_error_before_any_encoding(tmp_path, world):
    _, ckpt, cfg, _ = world
    data = tmp_path / "wds"
    export("synthetic-digit", str(data), splits=("test",))
    (data / "classnames.txt").unlink()
    suite = tmp_path / "s.yaml"
    suite.write_text("tasks: [{name: d, kind: zeroshot_classification, dataset: wds}]\n")
    with pytest.raises(EvalError, match=r"no class names \(.*wds/classnames.txt is missing"):
        evaluate(ckpt, str(tmp_path / "out"), str(suite), cfg)
    assert not (tmp_path / "out").exists()


def test_corrupt_image_is_a_recorded_skip(tmp_path, world):
    _, ckpt, cfg, _ = world
    data = tmp_path / "folder"
    export("synthetic-colour", str(tmp_path / "wds"), splits=("test",))
    from wit.evaluate.datasets import open_builtin

    ds = open_builtin("synthetic-colour")
    for s in list(ds.split("test").samples())[:40]:
        d = data / ds.classnames[s.label]
        d.mkdir(parents=True, exist_ok=True)
        s.image.save(d / f"{s.key}.png")
    (data / "red" / "zz-broken.png").write_bytes(b"not an image at all")
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "tasks: [{name: folder-colour, kind: zeroshot_classification, dataset: folder,"
        " templates: ['something {c}.']}]\n"
    )
    res = evaluate(ckpt, str(tmp_path / "out"), str(suite), EvalConfig(cache=None, resamples=50))
    assert res.rows[0]["n"] == 40
    rec = read_run_record(str(tmp_path / "out"))
    assert rec.counts == {"kept": 40, "undecodable": 1}
    assert rec.inputs[1].kind == "source" and rec.inputs[1].url == str(data)
    assert "undecodable: 1" in (tmp_path / "out" / "report.md").read_text()


def test_empty_split_and_wrong_architecture(tmp_path, world):
    _, ckpt, cfg, _ = world
    empty = tmp_path / "empty"
    (empty / "test").mkdir(parents=True)
    import tarfile

    with tarfile.open(empty / "test" / "0.tar", "w"):
        pass
    (empty / "classnames.txt").write_text("a\nb\n")
    suite = tmp_path / "s.yaml"
    suite.write_text("tasks: [{name: e, kind: zeroshot_classification, dataset: empty}]\n")
    with pytest.raises(EvalError, match="split 'test' of .* has no usable image \\(no samples\\)"):
        evaluate(ckpt, str(tmp_path / "out"), str(suite), EvalConfig(cache=None))
    # an open_clip checkpoint of another architecture, loaded as wit-tiny
    cfg_json = tmp_path / "other-tiny.json"
    cfg_json.write_text(json.dumps(dict(resolve_model("wit-tiny").config, embed_dim=64)))
    foreign = _checkpoint(str(tmp_path / "other.pt"), str(cfg_json), wit=False)
    with pytest.raises(CheckpointError, match="do not fit the wit-tiny architecture"):
        evaluate(foreign, str(tmp_path / "out2"), "synthetic-colour", EvalConfig(model="wit-tiny", cache=None))
    with pytest.raises(CheckpointError, match="--model NAME"):
        evaluate(foreign, str(tmp_path / "out3"), "synthetic-colour", EvalConfig(cache=None))


def test_config_is_validated_once():
    with pytest.raises(EvalError, match="batch_size"):
        EvalConfig(batch_size=-1)
    with pytest.raises(EvalError, match="unknown precision"):
        EvalConfig(precision="fp8")
    assert EvalConfig(device="cpu").resolved_batch_size() == 64  # CPU caches favour small batches
    assert EvalConfig(device="cuda").resolved_batch_size() == 256
    assert EvalConfig(device="cpu").autocast_dtype() is None  # fp32 on a CPU unless asked
    assert EvalConfig(device="cpu", precision="bf16").autocast_dtype() == torch.bfloat16
    assert EvalConfig(device="cuda").autocast_dtype() == torch.float16
    with pytest.raises(EvalError, match="unknown device"):
        EvalConfig(device="tpu")


def test_bf16_gives_the_fp32_answer_to_rounding(tmp_path, world):
    """--precision bf16 (autocast, ~2.5x on CPUs with AVX512-BF16) changes the numbers, not the
    answer: top-1 moves by at most 2 points (only images whose top two classes nearly tie flip)."""
    _, ckpt, _, _ = world
    scores = {}
    for precision in ("fp32", "bf16"):
        cfg = EvalConfig(cache=None, resamples=0, precision=precision, device="cpu")
        res = evaluate(ckpt, str(tmp_path / precision), "synthetic-colour", cfg)
        scores[precision] = next(r["value"] for r in res.rows if r["metric"] == "acc1")
    assert abs(scores["fp32"] - scores["bf16"]) <= 0.02
