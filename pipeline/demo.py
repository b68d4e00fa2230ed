"""`wit demo -o OUT`: the whole pipeline on a generated web served on 127.0.0.1.

    OUT/web/        the synthetic web (pages, images, WARC copy, ground truth), reused when it matches
    ROOT/<stage>/   extract … eval, as `wit run` writes them (ROOT = OUT, or e.g. s3://bucket/demo)
    OUT/report.html the run's report

The run is `demo.yaml` (shipped next to this module) with its root and sources filled in, through
:func:`wit.pipeline.runner.run_pipeline`, so a second demo into the same OUT skips every finished
stage. Curate and download allow private hosts, as the web is on 127.0.0.1.

The image URLs, and so every uid and the dataset digest, contain the server's port. The demo
serves on `DEMO_PORT` when it is free, so two demos (local and S3, or two machines) build the same
dataset digest; when that port is taken it picks a free one and says that digests will differ.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from wit.manifests import storage
from wit.manifests.manifest import read_table
from wit.pipeline.runner import PipelineConfig, StepOutcome, run_pipeline

SLOW_DELAY_SCALE = 3.0
DEMO_PAGES = 3000  # → ~7,500 images, ~5,500 samples after curate, download and filter
DEMO_SEED = 0
DEMO_PORT = 18642  # fixed, so the dataset digest is the same wherever the demo runs (see above)
# The score table's headline metric of each task kind (every metric is in the results manifest).
HEADLINE = {
    "zeroshot_classification": "acc1",
    "zeroshot_retrieval": "image_retrieval_recall@1",
    "linear_probe": "acc1",
    "fewshot": "fewshot_k16_acc1",
}


@dataclass(slots=True)
class DemoResult:
    root: str  # where the stages wrote
    web: str  # the generated web
    port: int
    steps: list[StepOutcome]
    scores: list[dict]  # task, metric, value, ci_low, ci_high, n, chance
    dataset_digest: str | None
    report: str  # the report's path (the run report, or the eval report when there is none)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: web, each stage, total


def demo_config() -> dict:
    """The shipped demo pipeline, as a mapping (root and sources still to fill in)."""
    text = resources.files("wit.pipeline").joinpath("demo.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def run_demo(
    out: str | Path,
    root: str | None = None,
    pages: int = DEMO_PAGES,
    steps: int | None = None,
    suite: str | list[str] | None = None,
    port: int | None = None,
    seed: int = DEMO_SEED,
    overrides: tuple[str, ...] = (),
    echo: Callable[[str], Any] = print,
    progress: bool = True,
) -> DemoResult:
    """Generate (or reuse) the web in OUT/web, serve it, run the demo pipeline into ``root`` (OUT).

    ``steps`` and ``suite`` shorten a run (tests: a few steps and one task); ``overrides`` are
    ``stage.key=value`` as for `wit run`. ``port`` None: `DEMO_PORT`, or a free one when taken.
    ``seed`` draws the web and seeds training; the evaluation's held-out seeds stay as they are.
    """
    from wit.evaluate.datasets import TRAINING_SEED_LIMIT
    from wit.ingest.synthetic import SyntheticWebServer

    if not 0 <= seed < TRAINING_SEED_LIMIT:
        raise ValueError(f"seed must be in [0, {TRAINING_SEED_LIMIT}): the evaluation's seeds lie above")

    t_start = time.perf_counter()
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    root = storage.normalize(root) if root else str(out)
    port = port or _demo_port(echo)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    web = _web(out / "web", pages, port, seed, echo)
    timings["web"] = time.perf_counter() - t0

    data = demo_config()
    data["root"] = root
    data.setdefault("extract", {})["sources"] = [str(web / "warc")]
    more = [f"train.seed={seed}", *overrides]
    if steps is not None:
        more.append(f"train.steps={steps}")
    if suite is not None:
        data.setdefault("eval", {})["suite"] = suite
    config = PipelineConfig.from_dict(data, base=str(out), overrides=more, source="demo.yaml")

    echo(f"demo: web of {pages} pages on http://127.0.0.1:{port}, stages under {root}")
    # planted slow images answer after 6 s, past the 3 s download timeout of demo.yaml; ordinary
    # images get 3 s, ample even on a loaded machine (a timeout there would change the dataset)
    with SyntheticWebServer(web, port=port, delay_scale=SLOW_DELAY_SCALE):
        outcomes = run_pipeline(config, echo=echo, progress=progress)
    for o in outcomes:
        timings[o.stage] = o.seconds

    scores = score_table(config.url("eval"))
    echo("")
    for line in format_scores(scores):
        echo(line)
    report = _report(root, out, config.url("eval"), echo)
    timings["total"] = time.perf_counter() - t_start
    echo(f"report: {report}")
    echo(f"demo: {timings['total'] / 60:.1f} minutes in all")
    dataset = next((o.digest for o in outcomes if o.stage == "shard"), None)
    return DemoResult(root, str(web), port, outcomes, scores, dataset, report, timings)


def _demo_port(echo: Callable[[str], Any]) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", DEMO_PORT))
            return DEMO_PORT
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    echo(f"demo: port {DEMO_PORT} is taken; serving on {port} (uids and digests differ from a run on {DEMO_PORT})")
    return port


def _web(web: Path, pages: int, port: int, seed: int, echo: Callable[[str], Any]) -> Path:
    """The synthetic web for this port and size: reused when OUT/web already holds exactly it."""
    from wit.ingest.synthetic import generate_web
    from wit.ingest.synthetic.generate import WEB_VERSION

    base_url = f"http://127.0.0.1:{port}"
    meta = web / "web.json"
    if meta.exists():
        have = json.loads(meta.read_text())
        if (have.get("version"), have.get("pages"), have.get("seed"), have.get("base_url")) == (
            WEB_VERSION,
            pages,
            seed,
            base_url,
        ):
            return web
        echo(f"demo: regenerating {web} ({pages} pages for {base_url})")
    info = generate_web(web, pages=pages, seed=seed, base_url=base_url, overwrite=True)
    echo(f"demo: generated {info.images} images on {pages} pages in {web}")
    return web


def score_table(eval_out: str) -> list[dict]:
    """The headline score of each task with its interval, n and chance level (from tasks/NAME.json)."""
    rows = read_table(eval_out, expect_kind="eval_results").to_pylist()
    table = []
    for r in rows:
        if HEADLINE.get(r["kind"]) != r["metric"]:
            continue
        detail_url = storage.join(eval_out, "tasks", f"{r['task']}.json")
        chance = json.loads(storage.read_text(detail_url)).get("chance") if storage.exists(detail_url) else None
        table.append({k: r.get(k) for k in ("task", "metric", "value", "ci_low", "ci_high", "n")} | {"chance": chance})
    return table


def format_scores(scores: list[dict]) -> list[str]:
    width = max([len("task")] + [len(s["task"]) for s in scores])
    lines = [f"{'task':<{width}}  {'metric':<10} {'value':>6}  {'95% interval':<15} {'n':>5}  {'chance':>6}"]
    for s in scores:
        lo, hi = s.get("ci_low"), s.get("ci_high")
        ci = f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
        chance = f"{s['chance']:.3f}" if s.get("chance") is not None else ""
        lines.append(
            f"{s['task']:<{width}}  {s['metric']:<10} {s['value']:>6.3f}  {ci:<15} {s.get('n') or '':>5}  {chance:>6}"
        )
    return lines


def _report(root: str, out: Path, eval_out: str, echo: Callable[[str], Any]) -> str:
    """The run report (wit.pipeline.report, when installed), else the eval stage's report."""
    # find_spec, not a caught ImportError: a report module that fails to import is a bug to see
    if importlib.util.find_spec("wit.pipeline.report") is None:
        return storage.join(eval_out, "report.html")
    from wit.pipeline.report import build_report

    html = str(out / "report.html")
    build_report(root, html)
    return html
