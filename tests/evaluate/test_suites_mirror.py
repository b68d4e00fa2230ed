"""Named suites over a mirror in CLIP_benchmark's WebDataset layout (`--data-root`), local and on
S3 (moto), made by `wit eval prepare`; missing datasets reported and skipped; summary lines,
`wit eval compare`, the VOC 11-point mAP and the clip-paper suite's metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from wit.evaluate import EvalConfig, EvalError, evaluate, export
from wit.evaluate import metrics as M
from wit.evaluate.mirror import MIRROR_FILE, prepare
from wit.evaluate.report import compare_table
from wit.evaluate.tasks import load_suite, parse_suite
from wit.manifests import storage
from wit.pipeline.cli import cli

from .test_evaluate import _checkpoint

SUITE = """
name: mirror-test
summary:
  - {name: "mean over the classification sets", group: cls}
  - {name: "retrieval R@1", group: ret}
tasks:
  - {name: digits, kind: zeroshot_classification, dataset: "{data_root}/wds_digits", metrics: [acc1, acc5], group: cls}
  - {name: shape, kind: zeroshot_classification, dataset: "{data_root}/wds_synthetic-shape", metrics: [mean_per_class_recall, acc1, mean_average_precision_11pt], group: cls}
  - {name: retrieval, kind: zeroshot_retrieval, dataset: "{data_root}/wds_synthetic-retrieval", group: ret}
  - {name: absent, kind: zeroshot_classification, dataset: "{data_root}/wds_not-mirrored", metrics: [acc1], group: cls}
"""  # noqa: E501


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """CLIP_benchmark-layout copies of three built-in sets (generated images: scikit-learn's digits
    and the held-out synthetic world), each with its class names and templates (or captions)."""
    root = tmp_path_factory.mktemp("mirror")
    for name in ("digits", "synthetic-shape", "synthetic-retrieval"):
        splits = ("test", "train") if name == "digits" else ("test",)  # a train split no task reads
        export(name, str(root / "src" / f"wds_{name}"), samples_per_shard=200, splits=splits)
    (root / "suite.yaml").write_text(SUITE)
    ckpt = _checkpoint(str(root / "ckpt.pt"))
    return root, ckpt


def _rows(result) -> list[tuple]:
    return sorted((r["task"], r["metric"], r["value"], r["n"], r["dataset_digest"]) for r in result.rows)


def test_local_and_s3_mirrors_give_the_same_results(mirror, s3_bucket, tmp_path):
    root, ckpt = mirror
    suite = load_suite(str(root / "suite.yaml"))
    cfg = dict(cache=None, resamples=0)
    local = evaluate(ckpt, str(tmp_path / "local"), suite, EvalConfig(data_root=str(root / "src"), **cfg))

    made = prepare(suite, f"{s3_bucket}/bench", str(root / "src"), progress=False)
    assert set(made.missing) == {"wds_not-mirrored"}
    assert not any("/train/" in k for k in made.files)  # only the splits the suite reads
    record = json.loads(storage.read_text(f"{s3_bucket}/bench/{MIRROR_FILE}"))
    tar = next(k for k in record["files"] if k.startswith("wds_digits/test/") and k.endswith(".tar"))
    assert record["files"][tar]["sha256"] == storage.sha256_url(str(root / "src" / tar))
    remote = evaluate(ckpt, str(tmp_path / "s3"), suite, EvalConfig(data_root=f"{s3_bucket}/bench", **cfg))

    assert _rows(local) == _rows(remote) and len(local.rows) >= 6
    for res in (local, remote):
        head = json.loads(storage.read_text(storage.join(res.out, "summary.json")))
        assert set(head["missing"]) == {"absent"} and "not found at" in head["missing"]["absent"]
        cls = next(line for line in head["summary"] if line["group"] == "cls")
        value = {(r["task"], r["metric"]): r["value"] for r in res.rows}
        digits_acc, shape_mpcr = value["digits", "acc1"], value["shape", "mean_per_class_recall"]
        assert cls["tasks"] == 2 and cls["missing"] == ["absent"]
        assert cls["value"] == pytest.approx((digits_acc + shape_mpcr) / 2)
        assert 0 < value["shape", "mean_average_precision_11pt"] <= 1
        ret = value["retrieval", "image_retrieval_recall@1"], value["retrieval", "text_retrieval_recall@1"]
        assert value["retrieval", "mean_recall@1"] == pytest.approx(sum(ret) / 2)
        report = storage.read_text(res.report_md)
        assert "## Missing datasets" in report and "absent" in report and "mean over the classification sets" in report
    run = json.loads(storage.read_text(f"{tmp_path}/s3/_run.json"))
    assert run["config"]["mirror_sha256"] == storage.sha256_url(f"{s3_bucket}/bench/{MIRROR_FILE}")


def test_compare_prints_both_side_by_side(mirror, tmp_path):
    root, ckpt = mirror
    suite = load_suite(str(root / "suite.yaml"))
    outs = []
    for seed in (0, 1):
        c = _checkpoint(str(tmp_path / f"c{seed}.pt"), seed=seed)
        cfg = EvalConfig(data_root=str(root / "src"), cache=None, resamples=50)
        outs.append(evaluate(c, str(tmp_path / f"e{seed}"), suite, cfg))
    text = compare_table([o.out for o in outs])
    a = next(r["value"] for r in outs[0].rows if r["task"] == "digits" and r["metric"] == "acc1")
    b = next(r["value"] for r in outs[1].rows if r["task"] == "digits" and r["metric"] == "acc1")
    line = next(x for x in text.splitlines() if x.startswith("digits"))
    assert f"{100 * a:.1f}" in line and f"{100 * b:.1f}" in line and f"{100 * (b - a):+.1f}" in line
    assert any(x.startswith("summary") and "mean over the classification sets" in x for x in text.splitlines())
    result = CliRunner().invoke(cli, ["eval", "compare", outs[0].out, outs[1].out, "--all-metrics"])
    assert result.exit_code == 0 and "acc5" in result.output, result.output
    bad = CliRunner().invoke(cli, ["eval", "compare", outs[0].out, str(tmp_path)])
    assert bad.exit_code != 0 and "not a wit eval output" in bad.output


def test_prepare_command_and_data_root_errors(mirror, tmp_path):
    root, ckpt = mirror
    result = CliRunner().invoke(
        cli, ["eval", "prepare", str(root / "suite.yaml"), "-o", str(tmp_path / "m"), "--from", str(root / "src")]
    )
    assert result.exit_code == 0, result.output
    assert "wds_not-mirrored: not found at" in result.output and (tmp_path / "m" / "wds_digits" / "test").is_dir()
    with pytest.raises(EvalError, match="give --data-root"):
        evaluate(ckpt, str(tmp_path / "e"), load_suite(str(root / "suite.yaml")), EvalConfig(cache=None))
    with pytest.raises(EvalError, match="no dataset of it was found"):
        evaluate(ckpt, str(tmp_path / "e"), load_suite(str(root / "suite.yaml")), EvalConfig(data_root=str(tmp_path)))
    with pytest.raises(EvalError, match="which no task has"):
        parse_suite("summary: [{name: x, group: nope}]\ntasks: [digits]")
    # a dataset path that is not there is an error, not a skip: only a --data-root mirror may lack one
    typo = parse_suite(f"tasks: [digits, {{name: t, kind: zeroshot_classification, dataset: {tmp_path}/nope}}]")
    with pytest.raises(EvalError, match="task t: dataset not found at"):
        evaluate(ckpt, str(tmp_path / "e2"), typo, EvalConfig(cache=None, resamples=0))
    # a second prepare into the same mirror adds to its record (another source for what was missing)
    other = tmp_path / "other" / "wds_not-mirrored"
    export("synthetic-colour", str(other), samples_per_shard=500, splits=("test",))
    more = prepare(load_suite(str(root / "suite.yaml")), str(tmp_path / "m"), str(tmp_path / "other"), progress=False)
    assert set(more.missing) == set() and all(k.startswith("wds_not-mirrored/") for k in more.files)
    record = json.loads((tmp_path / "m" / MIRROR_FILE).read_text())
    assert record["missing"] == {} and len(record["sources"]) == 2
    assert {k.split("/")[0] for k in record["files"]} == {
        "wds_digits", "wds_synthetic-shape", "wds_synthetic-retrieval", "wds_not-mirrored"
    }  # fmt: skip


def test_eleven_point_map_by_hand():
    # class 0: ranking by its score puts positives at ranks 1 and 3 of 4 -> precision 1, 2/3
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.9]])
    labels = np.array([0, 1, 0, 1])
    ap0 = (6 * 1.0 + 5 * (2 / 3)) / 11  # recall 0..0.5 -> precision 1; 0.6..1 -> 2/3
    scores[1, 1] = 0.05  # class 1: its positives (rows 1, 3) now rank 1st and 4th: precision 1, then 2/4
    ap1 = (6 * 1.0 + 5 * 0.5) / 11
    assert M.average_precision_11pt(scores[:, 0], labels == 0) == pytest.approx(ap0)
    assert M.mean_average_precision_11pt(scores, labels, 2).value == pytest.approx((ap0 + ap1) / 2)
    three = np.c_[scores, np.zeros(4)]  # a class no test image has is left out of the mean
    assert M.mean_average_precision_11pt(three, labels, 3).value == pytest.approx((ap0 + ap1) / 2)


# The CLIP paper's metric for each dataset it reports zero-shot (Radford et al. 2021, table 9 and
# section 3.1): top-1 unless named; retrieval reports Recall@K.
CLIP_PAPER = {
    "imagenet1k": "acc1", "imagenetv2": "acc1", "imagenet_sketch": "acc1", "imagenet-r": "acc1",
    "imagenet-a": "acc1", "objectnet": "acc1", "cifar10": "acc1", "cifar100": "acc1", "stl10": "acc1",
    "food101": "acc1", "pets": "mean_per_class_recall", "flowers": "mean_per_class_recall", "cars": "acc1",
    "fgvc_aircraft": "mean_per_class_recall", "dtd": "acc1", "eurosat": "acc1", "resisc45": "acc1",
    "gtsrb": "acc1", "mnist": "acc1", "svhn": "acc1", "country211": "acc1", "sst2": "acc1", "pcam": "acc1",
    "fer2013": "acc1", "sun397": "acc1", "caltech101": "mean_per_class_recall",
    "voc2007": "mean_average_precision_11pt", "kitti_distance": "acc1",
    "flickr30k": "mean_recall@1", "mscoco": "mean_recall@1",
}  # fmt: skip


def test_clip_paper_suite_names_every_dataset_with_the_papers_metric():
    suite = load_suite("clip-paper")
    got = {t.name: t.main_metric for t in suite.tasks}
    assert got == CLIP_PAPER
    by_name = {t.name: t for t in suite.tasks}
    for name in ("flickr30k", "mscoco"):  # Recall@1, 5, 10 in both directions, as the paper's table 13
        assert by_name[name].kind == "zeroshot_retrieval"
        assert {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)} <= set(
            by_name[name].metrics
        )
    imagenet = by_name["imagenet1k"]
    assert len(imagenet.classnames) == 1000 and len(imagenet.templates) == 80
    assert all(t.dataset.startswith("{data_root}/wds_") for t in suite.tasks)
    for other, count in (("imagenet-robustness", 6), ("vtab", 19), ("datacomp", 37)):
        assert len(load_suite(other).tasks) == count
    datacomp = {t.name: t.main_metric for t in load_suite("datacomp").tasks}
    assert {n for n, m in datacomp.items() if m == "mean_per_class_recall"} == {
        "caltech101",
        "fgvc_aircraft",
        "flowers",
        "pets",
    }
    assert datacomp["flickr30k"] == datacomp["mscoco"] == "mean_recall@1"
    few = parse_suite("tasks: [digits-fewshot, synthetic-retrieval]").tasks
    assert [t.main_metric for t in few] == ["fewshot_k16_acc1", "mean_recall@1"]


def test_pretrained_file_goes_through_open_clips_loader(tmp_path, monkeypatch):
    import open_clip
    import open_clip.factory
    import torch

    torch.manual_seed(3)
    weights = tmp_path / "published.pt"
    torch.save(open_clip.create_model("wit-tiny").state_dict(), weights)  # a bare state dict, as published
    calls = []
    real = open_clip.factory.load_checkpoint
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    args = ["eval", "--model", "wit-tiny", "--pretrained", str(weights), "-o", str(tmp_path / "by-tag-route")]
    args += ["--suite", "synthetic-colour", "--no-cache", "--resamples", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert calls == [str(weights)]  # open_clip.create_model(pretrained=FILE) -> its load_checkpoint
    by_file = evaluate(
        str(weights),
        str(tmp_path / "by-file"),
        "synthetic-colour",
        EvalConfig(model="wit-tiny", cache=None, resamples=0),
    )
    head = json.loads((tmp_path / "by-tag-route" / "summary.json").read_text())
    assert head["checkpoint_digest"] == storage.sha256_url(str(weights)) == by_file.rows[0]["checkpoint_digest"]
    route = pq_values(tmp_path / "by-tag-route")
    assert route == {(r["task"], r["metric"]): r["value"] for r in by_file.rows}
    both = CliRunner().invoke(cli, [*args[:1], str(weights), *args[1:]])
    assert both.exit_code != 0 and "not both" in both.output
    neither = CliRunner().invoke(cli, ["eval", "--pretrained", str(weights), "-o", str(tmp_path / "x")])
    assert neither.exit_code != 0 and "needs --model" in neither.output


def pq_values(out) -> dict:
    from wit.manifests.manifest import read_table

    return {(r["task"], r["metric"]): r["value"] for r in read_table(str(out)).to_pylist()}


def test_robustness_table_and_plot_for_the_imagenet_family():
    from wit.evaluate.report import build_blocks, render_markdown

    def task(name, group, acc):
        m = {"metric": "acc1", "value": acc, "ci_low": acc - 0.01, "ci_high": acc + 0.01, "n": 100}
        return {"task": name, "kind": "zeroshot_classification", "dataset": name, "group": group, "metrics": [m],
                "n": 100, "skipped": {}, "chance": 0.001, "main_metric": "acc1"}  # fmt: skip

    run = {"model": "m", "checkpoint": "c", "checkpoint_digest": "0" * 64, "suite": "s", "resamples": 0, "seed": 0}
    tasks = [task("imagenet1k", "imagenet", 0.62), task("imagenetv2", "imagenet-shift", 0.55)]
    tasks.append(task("imagenet-r", "imagenet-shift", 0.70))
    blocks = build_blocks(run, tasks)
    md = render_markdown(blocks)
    assert "## Robustness to natural distribution shifts" in md
    assert "| imagenetv2 | 62.0 | 55.0 | -7.0 |" in md and "| imagenet-r | 62.0 | 70.0 | +8.0 |" in md
    figure = next(b for b in blocks if b.name == "robustness.png")
    assert figure.png.startswith(b"\x89PNG")
    assert "Robustness" not in render_markdown(build_blocks(run, tasks[:1]))  # no shift, no section
