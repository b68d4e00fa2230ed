"""The evaluation report: results JSON in CLIP_benchmark's shape, Markdown, and one HTML page.

The report is built from the per-task detail files (``tasks/NAME.json``) that the task partitions
commit, so it can be rebuilt from a finished output alone. Content is a list of blocks (heading,
paragraph, table, figure) rendered twice: Markdown with PNG files beside it, and a self-contained
HTML page with the same figures inlined as base64 PNG.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

import numpy as np

from wit.manifests import render

from .findings import findings, shift_rows

CONFUSION_MAX_CLASSES = 20
_HEADLINE = {
    "zeroshot_classification": "acc1",
    "linear_probe": "lp_acc1",
    "zeroshot_retrieval": "image_retrieval_recall@5",
}


@dataclass(slots=True)
class Block:
    type: str  # h1 | h2 | p | table | figure
    text: str = ""
    headers: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    png: bytes = b""
    name: str = ""  # figure file name


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f}"


def _ci(m: dict) -> str:
    if m.get("ci_low") is None:
        return "–"
    return f"[{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"


def headline(task: dict) -> dict | None:
    metrics = {m["metric"]: m for m in task["metrics"]}
    if task["kind"] == "fewshot":
        ks = sorted(task.get("fewshot", {}), key=int)
        return metrics.get(f"fewshot_k{ks[-1]}_acc1") if ks else None
    return metrics.get(_HEADLINE[task["kind"]])


def summary_plot(tasks: list[dict]) -> bytes:
    items = [(t, headline(t)) for t in tasks]
    items = [(t, m) for t, m in items if m is not None]
    fig = render.figure(7, 0.45 * len(items) + 1.2)
    ax = fig.subplots()
    y = np.arange(len(items))
    vals = [m["value"] for _, m in items]
    lo = [m["value"] - (m["ci_low"] if m["ci_low"] is not None else m["value"]) for _, m in items]
    hi = [(m["ci_high"] if m["ci_high"] is not None else m["value"]) - m["value"] for _, m in items]
    ax.barh(y, vals, xerr=[lo, hi], color=render.BLUE, ecolor="black", capsize=3)
    for i, (t, _) in enumerate(items):
        if t.get("chance"):
            ax.plot([t["chance"]] * 2, [i - 0.4, i + 0.4], color=render.RED, lw=2)
    ax.set_yticks(y, [f"{t['task']} ({m['metric']})" for t, m in items])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score with 95% bootstrap interval (red: chance)")
    return render.png(fig)


def fewshot_plot(task: dict, zeroshot: dict | None) -> bytes:
    curve = task["fewshot"]
    ks = sorted(curve, key=int)
    x = [int(k) for k in ks]
    v = [curve[k]["value"] for k in ks]
    lo = [curve[k]["ci_low"] for k in ks]
    hi = [curve[k]["ci_high"] for k in ks]
    fig = render.figure(6, 3.6)
    ax = fig.subplots()
    ax.plot(x, v, marker="o", color=render.BLUE, label=f"{task['task']} (linear, k per class)")
    if all(a is not None for a in lo + hi):
        ax.fill_between(x, lo, hi, color=render.BLUE, alpha=0.2)
    if zeroshot is not None:
        ax.axhline(zeroshot["value"], color=render.RED, ls="--", label=f"zero-shot ({zeroshot['task']})")
        if zeroshot.get("ci_low") is not None:
            ax.axhspan(zeroshot["ci_low"], zeroshot["ci_high"], color=render.RED, alpha=0.1)
    if task.get("chance"):
        ax.axhline(task["chance"], color=render.GREY, ls=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(k) for k in x])
    ax.set_ylim(0, 1)
    ax.set_xlabel("training examples per class")
    ax.set_ylabel("top-1 accuracy")
    ax.legend(loc="lower right", fontsize=8)
    return render.png(fig)


def _main(task: dict) -> dict | None:
    """The task's main metric (its suite's first-named metric, recorded in its detail)."""
    name = task.get("main_metric")
    found = next((m for m in task["metrics"] if m["metric"] == name), None) if name else None
    return found or headline(task)


def suite_summary(lines: list[dict], tasks: list[dict], missing: dict[str, str], groups: dict[str, str]) -> list[dict]:
    """Each summary line of the suite: the mean of the main metric over its group's evaluated
    tasks, with how many of the group's tasks that is (a missing dataset is not averaged as 0)."""
    out = []
    for line in lines:
        members = [t for t in tasks if t.get("group") == line["group"]]
        values = [m["value"] for t in members if (m := _main(t)) is not None and not math.isnan(m["value"])]
        absent = sorted(name for name in missing if groups.get(name) == line["group"])
        out.append(
            {
                "name": line["name"],
                "group": line["group"],
                "value": float(np.mean(values)) if values else None,
                "tasks": len(values),
                "missing": absent,
            }
        )
    return out


def _robustness_rows(tasks: list[dict]) -> tuple[dict | None, list[dict]]:
    """ImageNet's top-1 and each distribution shift's (groups ``imagenet`` and ``imagenet-shift``)."""
    base = next((t for t in tasks if t.get("group") == "imagenet"), None)
    acc = {m["metric"]: m for m in base["metrics"]}.get("acc1") if base else None
    shifts = []
    for t in tasks:
        m = {m["metric"]: m for m in t["metrics"]}.get("acc1")
        if t.get("group") == "imagenet-shift" and m is not None:
            shifts.append(dict(m, task=t["task"]))
    return (dict(acc, task=base["task"]) if acc else None), shifts


def robustness_plot(base: dict, shifts: list[dict]) -> bytes:
    """Each shift's top-1 against ImageNet's, with the y = x line a perfectly robust model is on
    (CLIP paper figure 13 plots models on these axes; one evaluation is one column of points)."""
    fig, ax = _shift_axes(f"{base['task']} top-1", "top-1 under the distribution shift")
    for m, colour in zip(shifts, itertools.cycle(render.CYCLE)):
        ax.scatter(base["value"], m["value"], s=40, color=colour, zorder=3)
        ax.annotate(m["task"], (base["value"], m["value"]), xytext=(6, 0), textcoords="offset points", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    return render.png(fig)


def _shift_axes(xlabel: str, ylabel: str):
    """Top-1 against top-1 on [0, 1] axes, with the y = x line of a classifier that loses nothing."""
    fig = render.figure(5.5, 4.5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color=render.GREY, ls="--", lw=1, label="y = x (no drop under the shift)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig, ax


def _summary_blocks(summary: list[dict], missing: dict[str, str]) -> tuple[list[Block], list[Block]]:
    """The summary lines' table, and the missing datasets' section."""
    b, gone = [], []
    if summary:
        rows = []
        for line in summary:
            over = f"{line['tasks']} task(s)" + (f"; missing: {', '.join(line['missing'])}" if line["missing"] else "")
            rows.append((line["name"], _fmt(line["value"]), over))
        b.append(Block("table", headers=("summary", "mean", "over"), rows=tuple(rows)))
    if missing:
        gone.append(Block("h2", "Missing datasets"))
        gone.append(Block("p", "These tasks were not run (the rest of the suite was):"))
        gone.append(Block("table", headers=("task", "reason"), rows=tuple(sorted(missing.items()))))
    return b, gone


def _robustness_blocks(tasks: list[dict]) -> list[Block]:
    base, shifts = _robustness_rows(tasks)
    if base is None or not shifts:
        return []
    rows = tuple(
        (m["task"], _fmt(base["value"]), _fmt(m["value"]), f"{100 * (m['value'] - base['value']):+.1f}", _ci(m))
        for m in shifts
    )
    return [
        Block("h2", "Robustness to natural distribution shifts"),
        Block(
            "p",
            f"Top-1 on each shifted dataset against `{base['task']}`'s (CLIP paper §3.3). Effective robustness "
            "is the accuracy above what ImageNet-trained models of the same ImageNet accuracy reach on the "
            "shift; this table gives the raw drop, the plot the position against y = x.",
        ),
        Block("table", headers=("shift", "ImageNet top-1", "shift top-1", "drop", "shift 95% CI"), rows=rows),
        Block(
            "figure",
            "Top-1 under each shift against ImageNet top-1",
            png=robustness_plot(base, shifts),
            name="robustness.png",
        ),
    ]


def confusion_plot(task: dict) -> bytes:
    m = np.asarray(task["confusion"], dtype=float)
    names = task["classnames"]
    rows = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig = render.figure(0.4 * len(names) + 2.5, 0.4 * len(names) + 2)
    ax = fig.subplots()
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{task['task']}: row-normalised confusion", fontsize=9)
    return render.png(fig)


def build_blocks(run: dict, tasks: list[dict], with_findings: bool = True) -> list[Block]:
    """The report: ``run`` is the run's header (model, checkpoint, suite...; ``summary`` and
    ``missing`` when the suite has summary lines or datasets it did not find). ``with_findings``:
    open with :func:`findings` (a page that shows them itself, with links, leaves them out)."""
    b = [Block("h1", f"Evaluation of {run['model']}")]
    b.append(
        Block(
            "p",
            f"Checkpoint `{run['checkpoint']}` (sha256 {run['checkpoint_digest'][:12]}), suite "
            f"`{run['suite']}`; intervals are 95% bootstrap ({run['resamples']} resamples, "
            f"seed {run['seed']}); "
            "scores in percent.",
        )
    )
    found = findings(tasks) if with_findings else []
    if found:
        b.append(Block("h2", "Findings"))
        b += [Block("p", f"**{f.title}.** {f.text()}") for f in found]
    b.append(Block("h2", "Summary"))
    summary, missing = _summary_blocks(run.get("summary") or [], run.get("missing") or {})
    b += summary
    b.append(Block("figure", "Headline score per task", png=summary_plot(tasks), name="summary.png"))
    b += missing
    rows = []
    for t in tasks:
        for m in t["metrics"]:
            rows.append((t["task"], t["kind"], m["metric"], _fmt(m["value"]), _ci(m), str(m["n"])))
    b.append(Block("table", headers=("task", "kind", "metric", "value", "95% CI", "n"), rows=tuple(rows)))
    b += _ensembling_blocks(tasks)
    b += _robustness_blocks(tasks)
    b += _shift_blocks(tasks)
    b += _fewshot_blocks(tasks)
    b += _confusion_blocks(tasks)
    skips = [
        (t["task"], str(t["n"]), ", ".join(f"{k}: {v}" for k, v in sorted(t["skipped"].items())) or "none")
        for t in tasks
    ]
    b.append(Block("h2", "Data"))
    b.append(Block("table", headers=("task", "images evaluated", "skipped"), rows=tuple(skips)))
    return b


def _ensembling_blocks(tasks: list[dict]) -> list[Block]:
    """Single template against the ensemble, for each task that reports both."""
    ens = []
    for t in tasks:
        ms = {m["metric"]: m for m in t["metrics"]}
        if "acc1" in ms and "acc1_single_template" in ms:
            gain = ms["acc1"]["value"] - ms["acc1_single_template"]["value"]
            single, ensemble = _fmt(ms["acc1_single_template"]["value"]), _fmt(ms["acc1"]["value"])
            ens.append((t["task"], str(t.get("templates", "")), single, ensemble, f"{100 * gain:+.1f}"))
    if not ens:
        return []
    return [
        Block("h2", "Prompt ensembling"),
        Block(
            "p",
            "Top-1 with the first template alone against the ensemble of all templates "
            "(mean of normalised text embeddings, renormalised; CLIP §3.1.4).",
        ),
        Block("table", headers=("task", "templates", "single template", "ensemble", "gain"), rows=tuple(ens)),
    ]


def shift_plot(rows: list[dict]) -> bytes:
    """Zero-shot and the in-distribution probe, each an arrow from its top-1 in distribution (x =
    y) down to its top-1 under the shift: the longer drop is the less robust classifier."""
    fig, ax = _shift_axes("top-1 in distribution", "top-1 under the shift")
    for r in rows:
        for key, label, colour in (("zeroshot", "zero-shot", render.RED), ("probe", "linear probe", render.BLUE)):
            before, _, after, _ = r[key]
            ax.scatter(before["value"], after["value"], s=50, color=colour, zorder=3, label=f"{label}: {r['shift']}")
            ax.annotate(
                "",
                (before["value"], after["value"]),
                (before["value"], before["value"]),
                arrowprops={"arrowstyle": "->", "color": colour, "lw": 1},
            )
    ax.legend(loc="upper left", fontsize=8)
    return render.png(fig)


def _shift_blocks(tasks: list[dict]) -> list[Block]:
    """Zero-shot against a linear probe fit in distribution, in distribution and under a shift."""
    rows = shift_rows(tasks)
    if not rows:
        return []
    table = []
    for r in rows:
        for key, label in (("zeroshot", "zero-shot"), ("probe", f"linear probe fit on {r['base']}")):
            before, task, after, shifted = r[key]
            drop = f"{100 * (after['value'] - before['value']):+.1f}"
            table.append((shifted, label, _fmt(before["value"]), _fmt(after["value"]), drop, _ci(after)))
    return [
        Block("h2", "Effective robustness: zero-shot against a probe fit in distribution"),
        Block(
            "p",
            "Top-1 of each classifier on the dataset the probe was fit on and under a shift neither the "
            "probe's training split nor the model's training data shows (CLIP paper §3.3, figure 14: the "
            "probe is better in distribution and loses more under the shift).",
        ),
        Block(
            "table",
            headers=("task", "classifier", "in distribution", "under the shift", "drop", "shift 95% CI"),
            rows=tuple(table),
        ),
        Block("figure", "Top-1 in distribution and under the shift", png=shift_plot(rows), name="shift.png"),
    ]


def _fewshot_blocks(tasks: list[dict]) -> list[Block]:
    """Each few-shot curve, with the zero-shot top-1 of the same dataset as its line."""
    by_dataset = {t["dataset"]: t for t in tasks if t["kind"] == "zeroshot_classification"}
    b = []
    for t in tasks:
        if t["kind"] == "fewshot" and t.get("fewshot"):
            zs = by_dataset.get(t["dataset"])
            zline = None
            if zs is not None:
                m = next((m for m in zs["metrics"] if m["metric"] == "acc1"), None)
                zline = dict(m, task=zs["task"]) if m else None
            b.append(Block("h2", f"Few-shot: {t['task']}"))
            png = fewshot_plot(t, zline)
            b.append(
                Block(
                    "figure",
                    f"Few-shot curve of {t['task']} against zero-shot",
                    png=png,
                    name=f"fewshot-{t['task']}.png",
                )
            )
    return b


def _confusion_blocks(tasks: list[dict]) -> list[Block]:
    b = []
    for t in tasks:
        if t.get("confusion") is not None and len(t["classnames"]) <= CONFUSION_MAX_CLASSES:
            b.append(Block("h2", f"Confusion: {t['task']}"))
            png = confusion_plot(t)
            b.append(Block("figure", f"Confusion matrix of {t['task']}", png=png, name=f"confusion-{t['task']}.png"))
    return b


def render_markdown(blocks: list[Block], figure_dir: str = "report") -> str:
    out = []
    for blk in blocks:
        if blk.type == "h1":
            out.append(f"# {blk.text}\n")
        elif blk.type == "h2":
            out.append(f"## {blk.text}\n")
        elif blk.type == "p":
            out.append(blk.text + "\n")
        elif blk.type == "figure":
            out.append(f"![{blk.text}]({figure_dir}/{blk.name})\n")
        elif blk.type == "table":
            out.append("| " + " | ".join(blk.headers) + " |")
            out.append("|" + "---|" * len(blk.headers))
            out.extend("| " + " | ".join(r) + " |" for r in blk.rows)
            out.append("")
    return "\n".join(out) + "\n"


def render_html(blocks: list[Block], title: str) -> str:
    out = [render.html_head(title)]
    for blk in blocks:
        if blk.type in ("h1", "h2"):
            out.append(f"<{blk.type}>{render.esc(blk.text)}</{blk.type}>")
        elif blk.type == "p":
            out.append(f"<p>{render.inline_code(blk.text)}</p>")
        elif blk.type == "figure":
            out.append(render.html_figure(blk.png, blk.text))
        elif blk.type == "table":
            out.append(render.html_table(blk.headers, [[render.esc(c) for c in r] for r in blk.rows]))
    out.append("</body></html>")
    return "\n".join(out)


def results_json(run: dict, tasks: list[dict]) -> str:
    """One entry per task in CLIP_benchmark's result shape (dataset, model, pretrained, task,
    metrics, language), with wit's intervals and counts under ``wit``."""
    entries = []
    for t in tasks:
        entries.append(
            {
                "dataset": t["dataset"],
                "model": run["model"],
                "pretrained": run["checkpoint"],
                "task": t["kind"],
                "metrics": {m["metric"]: m["value"] for m in t["metrics"]},
                "language": "en",
                "wit": {
                    "task": t["task"],
                    "intervals": {m["metric"]: [m["ci_low"], m["ci_high"]] for m in t["metrics"]},
                    "n": {m["metric"]: m["n"] for m in t["metrics"]},
                    "checkpoint_digest": run["checkpoint_digest"],
                    "dataset_digest": t["dataset_digest"],
                    "skipped": t["skipped"],
                },
            }
        )
    return json.dumps(entries, indent=2) + "\n"


def _load_output(out: str) -> tuple[dict, dict[str, dict]]:
    """An eval output's header (``summary.json``; empty for outputs written before it existed)
    and its task details (``tasks/NAME.json``), by task name."""
    from wit.manifests import storage

    from .errors import EvalError

    out = storage.normalize(out)
    if not storage.exists(storage.join(out, "results.json")):
        raise EvalError(f"{out}: not a wit eval output (no results.json)")
    head_url = storage.join(out, "summary.json")
    head = json.loads(storage.read_text(head_url)) if storage.exists(head_url) else {}
    tasks = {}
    for name in storage.listdir(storage.join(out, "tasks")):
        if name.endswith(".json") and "/" not in name:
            t = json.loads(storage.read_text(storage.join(out, "tasks", name)))
            tasks[t["task"]] = t
    return head, tasks


def _cell(m: dict | None) -> str:
    if m is None:
        return "–"
    return _fmt(m["value"]) + (f" {_ci(m)}" if m.get("ci_low") is not None else "")


def _diff(a: dict | None, b: dict | None) -> str:
    """The second output's value minus the first's, in points; '–' when either lacks one."""
    if not a or not b or a["value"] is None or b["value"] is None:
        return "–"
    return f"{100 * (b['value'] - a['value']):+.1f}"


def compare_table(outs: list[str], all_metrics: bool = False) -> str:
    """Two or more eval outputs side by side (``wit eval compare``): a row per task and metric
    (its main metric, or all), each output's value with its 95% interval, and with two outputs
    the difference; then the suites' summary lines. Scores in percent; '–' where an output lacks it."""
    loaded = [_load_output(o) for o in outs]
    labels = [o.rstrip("/").rsplit("/", 1)[-1] for o in outs]
    if len(set(labels)) < len(labels):
        labels = [f"[{i + 1}] {label}" for i, label in enumerate(labels)]
    names = list(dict.fromkeys(n for _, tasks in loaded for n in tasks))
    header = ["task", "metric", *labels] + (["diff"] if len(outs) == 2 else [])
    rows = []
    for name in names:
        per = [tasks.get(name) for _, tasks in loaded]
        first = next(t for t in per if t is not None)
        metrics = [m["metric"] for m in first["metrics"]] if all_metrics else [(_main(first) or {}).get("metric")]
        for metric in metrics:
            if metric is None:
                continue
            cells = [next((m for m in t["metrics"] if m["metric"] == metric), None) if t else None for t in per]
            row = [name, metric, *(_cell(c) for c in cells)]
            if len(outs) == 2:
                row.append(_diff(*cells))
            rows.append(row)
    lines = list(dict.fromkeys(line["name"] for head, _ in loaded for line in head.get("summary") or []))
    for line in lines:
        found = [next((x for x in head.get("summary") or [] if x["name"] == line), None) for head, _ in loaded]
        cells = [_fmt(f["value"]) if f else "–" for f in found]
        row = ["summary", line, *cells]
        if len(outs) == 2:
            row.append(_diff(*found))
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(text) + "\n\nscores in percent, [95% interval]\n"
