"""The evaluation report: results JSON in CLIP_benchmark's shape, Markdown, and one HTML page.

The report is built from the per-task detail files (``tasks/NAME.json``) that the task partitions
commit, so it can be rebuilt from a finished output alone. Content is a list of blocks (heading,
paragraph, table, figure) rendered twice: Markdown with PNG files beside it, and a self-contained
HTML page with the same figures inlined as base64 PNG.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # no display here, and a report must render the same anywhere
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

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


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def summary_plot(tasks: list[dict]) -> bytes:
    items = [(t, headline(t)) for t in tasks]
    items = [(t, m) for t, m in items if m is not None]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(items) + 1.2))
    y = np.arange(len(items))
    vals = [m["value"] for _, m in items]
    lo = [m["value"] - (m["ci_low"] if m["ci_low"] is not None else m["value"]) for _, m in items]
    hi = [(m["ci_high"] if m["ci_high"] is not None else m["value"]) - m["value"] for _, m in items]
    ax.barh(y, vals, xerr=[lo, hi], color="#4c72b0", ecolor="black", capsize=3)
    for i, (t, _) in enumerate(items):
        if t.get("chance"):
            ax.plot([t["chance"]] * 2, [i - 0.4, i + 0.4], color="#c44e52", lw=2)
    ax.set_yticks(y, [f"{t['task']} ({m['metric']})" for t, m in items])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score with 95% bootstrap interval (red: chance)")
    return _png(fig)


def fewshot_plot(task: dict, zeroshot: dict | None) -> bytes:
    curve = task["fewshot"]
    ks = sorted(curve, key=int)
    x = [int(k) for k in ks]
    v = [curve[k]["value"] for k in ks]
    lo = [curve[k]["ci_low"] for k in ks]
    hi = [curve[k]["ci_high"] for k in ks]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(x, v, marker="o", label=f"{task['task']} (linear, k per class)")
    if all(a is not None for a in lo + hi):
        ax.fill_between(x, lo, hi, alpha=0.2)
    if zeroshot is not None:
        ax.axhline(zeroshot["value"], color="#c44e52", ls="--", label=f"zero-shot ({zeroshot['task']})")
        if zeroshot.get("ci_low") is not None:
            ax.axhspan(zeroshot["ci_low"], zeroshot["ci_high"], color="#c44e52", alpha=0.1)
    if task.get("chance"):
        ax.axhline(task["chance"], color="grey", ls=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(k) for k in x])
    ax.set_ylim(0, 1)
    ax.set_xlabel("training examples per class")
    ax.set_ylabel("top-1 accuracy")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def confusion_plot(task: dict) -> bytes:
    m = np.asarray(task["confusion"], dtype=float)
    names = task["classnames"]
    rows = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.4 * len(names) + 2.5, 0.4 * len(names) + 2))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{task['task']}: row-normalised confusion", fontsize=9)
    return _png(fig)


def build_blocks(run: dict, tasks: list[dict]) -> list[Block]:
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
    b.append(Block("h2", "Summary"))
    b.append(Block("figure", "Headline score per task", png=summary_plot(tasks), name="summary.png"))
    rows = []
    for t in tasks:
        for m in t["metrics"]:
            rows.append((t["task"], t["kind"], m["metric"], _fmt(m["value"]), _ci(m), str(m["n"])))
    b.append(Block("table", headers=("task", "kind", "metric", "value", "95% CI", "n"), rows=tuple(rows)))
    ens = []
    for t in tasks:
        ms = {m["metric"]: m for m in t["metrics"]}
        if "acc1" in ms and "acc1_single_template" in ms:
            gain = ms["acc1"]["value"] - ms["acc1_single_template"]["value"]
            ens.append(
                (
                    t["task"],
                    str(t.get("templates", "")),
                    _fmt(ms["acc1_single_template"]["value"]),
                    _fmt(ms["acc1"]["value"]),
                    f"{100 * gain:+.1f}",
                )
            )
    if ens:
        b.append(Block("h2", "Prompt ensembling"))
        b.append(
            Block(
                "p",
                "Top-1 with the first template alone against the ensemble of all templates "
                "(mean of normalised text embeddings, renormalised; CLIP §3.1.4).",
            )
        )
        b.append(Block("table", headers=("task", "templates", "single template", "ensemble", "gain"), rows=tuple(ens)))
    by_dataset = {t["dataset"]: t for t in tasks if t["kind"] == "zeroshot_classification"}
    for t in tasks:
        if t["kind"] == "fewshot" and t.get("fewshot"):
            zs = by_dataset.get(t["dataset"])
            zline = None
            if zs is not None:
                m = next((m for m in zs["metrics"] if m["metric"] == "acc1"), None)
                zline = dict(m, task=zs["task"]) if m else None
            b.append(Block("h2", f"Few-shot: {t['task']}"))
            b.append(
                Block(
                    "figure",
                    f"Few-shot curve of {t['task']} against zero-shot",
                    png=fewshot_plot(t, zline),
                    name=f"fewshot-{t['task']}.png",
                )
            )
    for t in tasks:
        if t.get("confusion") is not None and len(t["classnames"]) <= CONFUSION_MAX_CLASSES:
            b.append(Block("h2", f"Confusion: {t['task']}"))
            b.append(
                Block(
                    "figure",
                    f"Confusion matrix of {t['task']}",
                    png=confusion_plot(t),
                    name=f"confusion-{t['task']}.png",
                )
            )
    skips = [
        (t["task"], str(t["n"]), ", ".join(f"{k}: {v}" for k, v in sorted(t["skipped"].items())) or "none")
        for t in tasks
    ]
    b.append(Block("h2", "Data"))
    b.append(Block("table", headers=("task", "images evaluated", "skipped"), rows=tuple(skips)))
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


_CSS = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
    "th{background:#f0f0f0}img{max-width:100%}"
)


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[Block], title: str) -> str:
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>"
    ]
    for blk in blocks:
        if blk.type in ("h1", "h2"):
            out.append(f"<{blk.type}>{html.escape(blk.text)}</{blk.type}>")
        elif blk.type == "p":
            out.append(f"<p>{_inline_code(blk.text)}</p>")
        elif blk.type == "figure":
            data = base64.b64encode(blk.png).decode()
            out.append(
                f"<figure><img alt='{html.escape(blk.text)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(blk.text)}</figcaption></figure>"
            )
        elif blk.type == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in blk.headers)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in blk.rows)
            out.append(f"<table><tr>{head}</tr>{body}</table>")
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
