"""The report's findings and the effective-robustness section, from task details; probes fit on
another dataset; the handwriting and outline styles of the synthetic world."""

from __future__ import annotations

import random

import numpy as np
import pytest

from wit.evaluate import world
from wit.evaluate.errors import EvalError
from wit.evaluate.findings import findings, shift_rows
from wit.evaluate.handwriting import digit_mask, skeleton
from wit.evaluate.report import build_blocks, render_html, render_markdown
from wit.evaluate.tasks import BUILTIN_TASKS, DATA_ROOT, parse_suite


def _m(metric: str, value: float, lo: float | None = None) -> dict:
    return {
        "metric": metric,
        "value": value,
        "ci_low": value - 0.05 if lo is None else lo,
        "ci_high": value + 0.05,
        "n": 400,
    }


def _zs(task: str, dataset: str, acc: float, single: float, chance: float, lo: float | None = None) -> dict:
    return {
        "task": task,
        "kind": "zeroshot_classification",
        "dataset": dataset,
        "chance": chance,
        "templates": 6,
        "metrics": [_m("acc1", acc, lo), _m("acc1_single_template", single)],
        "n": 400,
        "skipped": {},
    }


def _lp(task: str, dataset: str, acc: float, train_dataset: str | None = None) -> dict:
    t = {"task": task, "kind": "linear_probe", "dataset": dataset, "chance": 0.125, "metrics": [_m("lp_acc1", acc)]}
    if train_dataset:
        t["train_dataset"] = train_dataset
    return t | {"n": 400, "skipped": {}}


def _fs(task: str, dataset: str, curve: dict[int, float]) -> dict:
    return {
        "task": task,
        "kind": "fewshot",
        "dataset": dataset,
        "chance": 0.1,
        "fewshot": {str(k): {"value": v, "ci_low": v - 0.05, "ci_high": v + 0.05} for k, v in curve.items()},
        "metrics": [_m(f"fewshot_k{k}_acc1", v) for k, v in curve.items()],
        "n": 400,
        "skipped": {},
    }


TASKS = [
    _zs("synthetic-shape", "synthetic-shape", 0.75, 0.70, 0.125),
    _zs("digits", "digits", 0.32, 0.35, 0.1),
    _zs("synthetic-shape-outline", "synthetic-shape-outline", 0.60, 0.55, 0.125, lo=0.1),
    _lp("synthetic-shape-linear-probe", "synthetic-shape", 0.90),
    _lp("synthetic-shape-outline-linear-probe", "synthetic-shape-outline", 0.50, train_dataset="synthetic-shape"),
    _fs("digits-fewshot", "digits", {1: 0.2, 2: 0.28, 4: 0.36, 8: 0.5, 16: 0.6}),
    _fs("synthetic-shape-fewshot", "synthetic-shape", {1: 0.3, 16: 0.7}),
]


def test_the_four_findings_in_words_with_each_number_from_its_task():
    found = {f.title: f for f in findings(TASKS)}
    assert list(found) == [
        "Zero-shot transfer",
        "Prompt ensembling",
        "Effective robustness",
        "Zero-shot against few-shot",
    ]
    transfer = found["Zero-shot transfer"].text()
    assert "synthetic-shape at 75.0% (chance 12.5%)" in transfer and "digits at 32.0% (chance 10.0%)" in transfer
    # an interval reaching down to chance is said to
    assert "synthetic-shape-outline at 60.0% (chance 12.5%, within the interval)" in transfer
    ens = found["Prompt ensembling"].text()
    assert "+5.0 points on synthetic-shape (70.0% → 75.0%)" in ens and "-3.0 points on digits" in ens
    robust = found["Effective robustness"].text()
    assert "scores 90.0% there, against zero-shot's 75.0%" in robust
    assert "probe falls to 50.0% (-40.0 points) and zero-shot to 60.0% (-15.0 points)" in robust
    few = found["Zero-shot against few-shot"].text()
    assert "On digits, zero-shot (32.0%) is worth a linear probe on 4 labelled examples per class (36.0%)" in few
    early = findings([TASKS[1], _fs("digits-fewshot", "digits", {1: 0.4, 2: 0.5})])[-1].text()
    assert "zero-shot (32.0%) is beaten already by a linear probe on 1 labelled example(s) per class (40.0%)" in early
    assert "On synthetic-shape, zero-shot (75.0%) beats a linear probe on 16 labelled examples per class (70.0%)" in few
    # every number is a (text, task) part naming the task it was read from
    numbers = [p for f in found.values() for p in f.parts if not isinstance(p, str)]
    names = {t["task"] for t in TASKS}
    assert numbers and all(task in names for _, task in numbers)
    assert ("-40.0 points", "synthetic-shape-outline-linear-probe") in numbers


def test_a_finding_without_its_tasks_is_left_out():
    only = [TASKS[0]]  # one zero-shot task: transfer and ensembling, nothing to compare under a shift
    assert [f.title for f in findings(only)] == ["Zero-shot transfer", "Prompt ensembling"]
    assert findings([TASKS[3]]) == [] and shift_rows(TASKS[:4]) == []
    # a probe fit on its own dataset is no shift
    assert shift_rows([*TASKS[:4], _lp("x", "synthetic-shape", 0.5, train_dataset="synthetic-shape")]) == []


def test_report_opens_with_findings_and_shows_the_shift_table_and_plot():
    run = {"model": "m", "checkpoint": "c", "checkpoint_digest": "0" * 64, "suite": "s", "resamples": 10, "seed": 0}
    blocks = build_blocks(run, TASKS)
    assert [b.text for b in blocks[:3]] == ["Evaluation of m", blocks[1].text, "Findings"]
    md = render_markdown(blocks)
    assert "**Effective robustness.** A linear probe fit on synthetic-shape" in md
    assert "| synthetic-shape-outline-linear-probe | linear probe fit on synthetic-shape | 90.0 | 50.0 | -40.0 |" in md
    assert "| synthetic-shape-outline | zero-shot | 75.0 | 60.0 | -15.0 |" in md
    assert "![Top-1 in distribution and under the shift](report/shift.png)" in md
    html = render_html(blocks, "t")
    assert "<strong>Zero-shot transfer.</strong>" in html and "**" not in html
    assert "Findings" not in render_markdown(build_blocks(run, TASKS, with_findings=False))


def test_train_dataset_in_a_suite_and_under_a_data_root(tmp_path):
    suite = parse_suite(
        f"""
tasks:
  - name: sketch-probe
    kind: linear_probe
    dataset: "{DATA_ROOT}/wds_sketch"
    train_dataset: "{DATA_ROOT}/wds_photo"
  - name: local-probe
    kind: linear_probe
    dataset: shifted
    train_dataset: photos
""",
        base=str(tmp_path),
    )
    sketch, local = suite.tasks
    assert local.dataset == str(tmp_path / "shifted") and local.train_dataset == str(tmp_path / "photos")
    fit = local.training_task()
    assert (fit.dataset, fit.train_dataset, fit.split) == (str(tmp_path / "photos"), None, "test")
    rooted = sketch.with_data_root("s3://mirror/")
    assert rooted.dataset == "s3://mirror/wds_sketch" and rooted.train_dataset == "s3://mirror/wds_photo"
    with pytest.raises(EvalError, match="--data-root"):
        sketch.with_data_root(None)
    builtin = BUILTIN_TASKS["synthetic-shape-outline-linear-probe"]
    assert builtin.training_task().dataset == "synthetic-shape" and builtin.dataset == "synthetic-shape-outline"


@pytest.mark.parametrize("digit", world.DIGITS)
def test_handwritten_digits_fill_their_box_and_differ_by_seed(digit):
    masks = [np.asarray(digit_mask(digit, random.Random(s), 64, scan=s % 2 == 1)) for s in range(4)]
    for a in masks:
        ink = a > 127
        rows = np.flatnonzero(ink.any(1))
        assert rows.size and rows[-1] - rows[0] >= 32, "a written digit fills much of its box"
        assert 0.05 < ink.mean() < 0.7
    assert not np.array_equal(masks[0], masks[2])
    scanned = masks[1]
    assert len(np.unique(scanned)) > 8, "a scan is smooth grey levels, enlarged from 8x8"
    with pytest.raises(ValueError):
        skeleton("x", random.Random(0))


def test_styles_of_the_world():
    rng = random.Random(0)
    shape = world.Concept("shape", "blue", shape="square")
    filled = np.asarray(world.render(shape, random.Random(1), 96, style="filled"))
    outline = np.asarray(world.render(shape, random.Random(1), 96, style="outline"))
    ink = lambda a: int((np.linalg.norm(a.astype(float) - world.COLOURS["blue"], axis=2) < 60).sum())  # noqa: E731
    assert 0 < ink(outline) < ink(filled) / 2, "an outline sketch is the shape's edge only"
    digit = world.Concept("digit", "red", digit="7")
    styles = {world.sample_style(digit, rng) for _ in range(200)}
    assert styles == {"print", "hand", "scan"} and world.sample_style(shape, rng) == "filled"
    with pytest.raises(ValueError, match="outline"):
        world.render(digit, rng, 32, style="outline")


def test_chance_is_compared_with_the_interval_when_there_is_one():
    def said(lo, hi):
        t = _zs("t", "d", 0.12, 0.12, 0.125)
        t["metrics"][0].update(ci_low=lo, ci_high=hi)
        return findings([t])[0].text()

    assert "(chance 12.5%)" in said(None, None)  # no resamples: no interval to speak of
    assert "(chance 12.5%, within the interval)" in said(0.1, 0.15)
    assert "(chance 12.5%, below it)" in said(0.08, 0.11)


def test_train_dataset_only_for_probes_and_mirrored_with_its_training_split():
    from wit.evaluate.mirror import dataset_folders
    from wit.evaluate.tasks import Suite, TaskSpec

    with pytest.raises(EvalError, match="train_dataset is for linear_probe"):
        TaskSpec("z", "zeroshot_classification", "digits", "builtin", train_dataset="synthetic-shape")
    probe = TaskSpec("p", "linear_probe", f"{DATA_ROOT}/wds_sketch", train_dataset=f"{DATA_ROOT}/wds_photo")
    assert dataset_folders(Suite("s", (probe,))) == {"wds_sketch": {"test"}, "wds_photo": {"train"}}
    with pytest.raises(EvalError, match=r"--data-root \(\{data_root\}/wds_photo\)"):
        TaskSpec("q", "linear_probe", "/data/sketch", train_dataset=f"{DATA_ROOT}/wds_photo").with_data_root(None)
