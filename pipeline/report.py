"""The run report: one self-contained HTML page for a whole `wit run` (or `wit demo`) root.

``build_report(root)`` finds the stage outputs under ``root`` (by their ``_run.json`` ``stage``
field, so any folder names work; upstream stages outside ``root`` are found by walking the lineage
of the ones inside it) and writes ``root/report.html`` with four sections:

- **Dataset**: counts per stage and reason, the funnel (rows in, then kept per stage), the per-query
  histogram before and after balancing (curate's tallies), a grid of samples decoded from the first
  shard, decontamination counts (filter's ``eval_overlap:<task>`` reasons);
- **Training**: loss, temperature and samples/s against step, from ``train/metrics.parquet``, and
  the zero-shot evaluations of `wit train --eval-every` (its ``eval/TASK/METRIC`` columns);
- **Evaluation**: the tables and plots of ``evaluate.report``, rebuilt from ``tasks/NAME.json``;
- **Lineage**: the run-record chain from the most downstream output back to the sources.

Every number is a link to the file it was read from (a ``_run.json``, a part file, the metrics
file): relative when the target lies under the folder of the report, an absolute URL otherwise.
Images are PNG data URIs and the style sheet is inline, so the page is one file that can be mailed,
archived or opened from an object store. A stage that has not run gives its section a "not run
yet" line, never an error: the report is useful after any prefix of the pipeline.

All reads and the final write go through :mod:`wit.manifests.storage`, so ``root`` may be ``s3://``.
"""

from __future__ import annotations

import io
import itertools
import json
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import quote

import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from wit.evaluate.findings import Finding, findings
from wit.evaluate.report import build_blocks
from wit.manifests import render, storage
from wit.manifests.lineage import LineageNode, lineage
from wit.manifests.manifest import RUN_RECORD, ManifestError
from wit.manifests.runrecord import RunRecord, read_run_record
from wit.manifests.storage import StorageError
from wit.manifests.tars import SAMPLE_IMAGE_EXTENSIONS, TarError, read_files
from wit.pipeline import registry  # the stages, and the folder `wit run` gives each under the root

REPORT = "report.html"
SAMPLES_SHOWN = 12
THUMBNAIL = 128
TOP_QUERIES = 20
EVAL_OVERLAP = "eval_overlap"

_NOT_RUN = "not run yet"


@dataclass(slots=True)
class StageRun:
    """A finished stage output: where it is and its run record."""

    stage: str
    url: str
    record: RunRecord

    @property
    def record_url(self) -> str:
        return storage.join(self.url, RUN_RECORD)

    def file(self, name: str) -> str:
        return storage.join(self.url, name)


@dataclass(slots=True)
class RunLayout:
    """What ``find_stages`` found: one output per stage, and records it could not read."""

    root: str
    runs: dict[str, StageRun] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def get(self, stage: str) -> StageRun | None:
        return self.runs.get(stage)


# -------------------------------------------------------------------------------------------------
# finding the stages


def find_stages(root: str, stages: dict[str, str] | None = None) -> RunLayout:
    """The stage outputs of the run under ``root``.

    ``stages`` (stage name → URL) wins where given. Otherwise a stage is found at its default folder
    (``root/dataset`` for shard ...), else in any direct subfolder of ``root`` whose ``_run.json``
    names it, else in the lineage of a stage found so far (a dataset built elsewhere and trained on
    here). Internal phase folders (``curated/_count``: stage ``curate-count``) are never taken.
    """
    layout = RunLayout(root=storage.normalize(root))
    names = registry.names()
    for stage, url in (stages or {}).items():
        if stage not in names:
            raise ValueError(f"unknown stage {stage!r} in stages; known: {', '.join(names)}")
        run = _read(layout, storage.normalize(url))
        if run is not None and run.stage != stage:
            raise ValueError(f"{url}: holds a {run.stage} output, not {stage}")
        if run is not None:
            layout.runs[stage] = run
    for spec in registry.specs():
        if spec.name not in layout.runs:
            run = _read(layout, storage.join(layout.root, spec.folder))
            if run is not None and run.stage == spec.name:
                layout.runs[spec.name] = run
    if any(s not in layout.runs for s in names):
        newest: dict[str, StageRun] = {}
        for run in _scan(layout):
            # several outputs of one stage under one root (two evals): the newest is the run's
            if run.stage not in layout.runs and (
                run.stage not in newest or run.record.ended > newest[run.stage].record.ended
            ):
                newest[run.stage] = run
        layout.runs.update(newest)
    for stage in reversed(names):
        if stage in layout.runs and any(s not in layout.runs for s in names):
            for node in _lineage(layout, layout.runs[stage].url):
                rec = node.record
                if rec is not None and rec.stage in names and rec.stage not in layout.runs:
                    layout.runs[rec.stage] = StageRun(rec.stage, node.url, rec)
    return layout


def _read(layout: RunLayout, url: str) -> StageRun | None:
    try:
        rec = read_run_record(url)
    except (ManifestError, StorageError) as exc:
        layout.problems.append(str(exc))
        return None
    return None if rec is None else StageRun(rec.stage, url, rec)


def _scan(layout: RunLayout) -> list[StageRun]:
    """Finished outputs in direct subfolders of the root (custom folder names)."""
    try:
        # storage lists files, not folders; the root of one run is small next to its shards' count
        names = storage.listdir(layout.root, recursive=True)
    except StorageError as exc:
        layout.problems.append(str(exc))
        return []
    found = []
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == RUN_RECORD and not parts[0].startswith(("_", ".")):
            run = _read(layout, storage.join(layout.root, parts[0]))
            if run is not None and run.stage in registry.names():
                found.append(run)
    return sorted(found, key=lambda r: r.url)


def _lineage(layout: RunLayout, url: str) -> list[LineageNode]:
    try:
        return list(lineage(url).walk())
    except (ManifestError, StorageError) as exc:
        layout.problems.append(str(exc))
        return []


# -------------------------------------------------------------------------------------------------
# links and HTML pieces


class _Links:
    """``href`` for a file: relative below the report's folder, an absolute URL elsewhere."""

    def __init__(self, report_url: str):
        self.base = _parent(report_url)

    def href(self, url: str) -> str:
        url = storage.normalize(url)
        if url == self.base:
            return "./"
        if url.startswith(self.base.rstrip("/") + "/"):
            rel = posixpath.relpath(url.replace("\\", "/"), self.base.replace("\\", "/"))
            return quote(rel)
        if "://" not in url:
            return "file://" + quote(url)
        return url


def _parent(url: str) -> str:
    url = storage.normalize(url)
    return url.rsplit("/", 1)[0] if "/" in url else url


class _Page:
    def __init__(self, links: _Links):
        self.links = links
        self.parts: list[str] = []

    def a(self, text, url: str) -> str:
        return f"<a href='{render.esc(self.links.href(url))}'>{render.esc(text)}</a>"

    def n(self, value, url: str) -> str:
        """A number, linked to the file it came from."""
        return self.a(render.num(value), url)

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)

    def table(self, headers: tuple[str, ...], rows: list[tuple[str, ...]], cls: str = "") -> None:
        """Rows of already-escaped HTML cells."""
        self.add(render.html_table(headers, rows, cls))

    def figure(self, png: bytes, caption: str, source_html: str = "") -> None:
        self.add(render.html_figure(png, caption, source_html))

    def missing(self, what: str) -> None:
        self.add(f"<p class='missing'>{render.esc(what)}: {_NOT_RUN}.</p>")


# -------------------------------------------------------------------------------------------------
# the sections


def _dataset_stages() -> list[registry.StageSpec]:
    """The stages that build the dataset (extract ... shard), in order."""
    return [s for s in registry.specs() if s.dataset]


def _overview(page: _Page, layout: RunLayout) -> None:
    page.add("<section id='overview'><h2>Stages</h2>")
    rows = []
    for stage in registry.names():
        run = layout.get(stage)
        if run is None:
            rows.append((render.esc(stage), "–", "–", "–", f"<span class='missing'>{_NOT_RUN}</span>"))
            continue
        rec = run.record
        rows.append(
            (
                render.esc(stage),
                page.a(run.url, run.record_url),
                page.n(rec.rows, run.record_url),
                page.a((rec.output.digest or "")[:12] or "–", run.record_url),
                page.a(f"{rec.started} → {rec.ended}", run.record_url),
            )
        )
    page.table(("stage", "output", "rows", "digest", "ran"), rows)
    for problem in layout.problems:
        page.add(f"<p class='problem'>unreadable: {render.esc(problem)}</p>")
    page.add("</section>")


def _dataset(page: _Page, layout: RunLayout) -> None:
    page.add("<section id='dataset'><h2>Dataset</h2>")
    shard = layout.get("shard")
    if shard is not None and storage.exists(shard.file("CARD.md")):
        page.add(f"<p>The dataset's own card: {page.a('CARD.md', shard.file('CARD.md'))}.</p>")
    dataset_stages = _dataset_stages()
    if not any(layout.get(s.name) for s in dataset_stages):
        page.missing("No dataset stage")
        page.add("</section>")
        return
    page.add("<h3 id='counts'>Counts per stage and reason</h3>")
    funnel = _funnel_rows(layout)
    if funnel:
        page.figure(_funnel_plot(funnel), "Rows in, then rows kept after each stage", page.a(RUN_RECORD, funnel[-1][2]))
        page.table(("step", "rows"), [(render.esc(label), page.n(n, url)) for label, n, url in funnel], "funnel")
    page.add("<div class='stages'>")
    for spec in dataset_stages:
        page.add(f"<div class='stage'><h4>{render.esc(spec.name)} → {render.esc(spec.produces)}</h4>")
        run = layout.get(spec.name)
        if run is None:
            page.missing(spec.name)
        else:
            _stage_counts(page, run)
        page.add("</div>")
    page.add("</div>")
    page.add("<h3 id='queries'>Pairs per query, before and after balancing</h3>")
    _queries(page, layout.get("curate"))
    page.add("<h3 id='samples'>Samples</h3>")
    _samples(page, shard)
    page.add("<h3 id='decontamination'>Decontamination</h3>")
    _decontamination(page, layout.get("filter"))
    page.add("</section>")


def _stage_counts(page: _Page, run: StageRun) -> None:
    rec, src = run.record, run.record_url
    counts = dict(rec.counts)
    rows = [("rows out", page.n(rec.rows, src))]
    if "kept" in counts:
        rows.append(("kept", page.n(counts.pop("kept"), src)))
    for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        rows.append((render.esc(reason), page.n(n, src)))
    page.table(("reason", "count"), rows, "counts")


def _funnel_rows(layout: RunLayout) -> list[tuple[str, int, str]]:
    """(label, rows, source) from the first stage's input to the dataset's samples."""
    rows: list[tuple[str, int, str]] = []
    for spec in _dataset_stages():
        run = layout.get(spec.name)
        if run is None:
            continue
        rec, src = run.record, run.record_url
        if not rows:
            # a stage that counts what it saw (extract: every image) starts there; another first
            # stage starts at its rows
            if spec.rows_seen and spec.rows_seen in rec.counts:
                label = spec.rows_seen.replace("_", " ")
                rows.append((f"{spec.name}: {label}", int(rec.counts[spec.rows_seen]), src))
            else:
                rows.append((f"{spec.name}: rows in", int(rec.rows), src))
        rows.append((f"{spec.name}: kept", int(rec.counts.get("kept", rec.rows)), src))
    return rows


def _funnel_plot(rows: list[tuple[str, int, str]]) -> bytes:
    fig = render.figure(7, 0.4 * len(rows) + 1)
    ax = fig.subplots()
    values = [n for _, n, _ in rows]
    ax.barh(range(len(rows)), values, color=render.BLUE)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,}", va="center", fontsize=8)
    ax.set_xlim(0, max(values + [1]) * 1.15)
    ax.set_xlabel("rows")
    return render.png(fig)


def _queries(page: _Page, curate: StageRun | None) -> None:
    if curate is None:
        page.missing("curate")
        return
    src = curate.record_url
    before = curate.record.tallies.get("queries_before", {})
    after = curate.record.tallies.get("queries_after", {})
    if not before and not after:
        page.add("<p>curate recorded no per-query tallies.</p>")
        return
    cap = curate.record.config.get("per_query_cap")
    caption = "Pairs per query before and after the per-query cap"
    page.figure(_query_plot(before, after, cap), caption, page.a(RUN_RECORD, src))
    page.table(
        ("", "queries matched", "pairs (once per matched query)", "cap per query"),
        [
            ("before balancing", page.n(len(before), src), page.n(sum(before.values()), src), page.n(cap, src)),
            ("after balancing", page.n(len(after), src), page.n(sum(after.values()), src), page.n(cap, src)),
        ],
    )
    ranked = sorted(before.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    page.table(
        ("query", "before", "after"),
        [(render.esc(q), page.n(n, src), page.n(after.get(q, 0), src)) for q, n in ranked],
        "queries",
    )


def _query_plot(before: dict[str, int], after: dict[str, int], cap) -> bytes:
    fig = render.figure(11, 4)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    top = sorted(before.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_QUERIES]
    y = list(range(len(top)))
    left.barh([i - 0.2 for i in y], [n for _, n in top], height=0.4, color=render.LIGHT_GREY, label="before")
    left.barh([i + 0.2 for i in y], [after.get(q, 0) for q, _ in top], height=0.4, color=render.BLUE, label="after")
    left.set_yticks(y, [q[:28] for q, _ in top], fontsize=7)
    left.invert_yaxis()
    if isinstance(cap, int):
        left.axvline(cap, color=render.RED, ls="--", lw=1, label=f"cap {cap}")
    left.set_xlabel("pairs")
    left.set_title(f"top {len(top)} queries")
    left.legend(fontsize=8, loc="lower right")
    values = list(before.values()) + list(after.values())
    top_value = max(values + [1])
    bins = list(range(0, top_value + 2, max(1, (top_value + 1) // 30 or 1)))
    right.hist(list(before.values()) or [0], bins=bins, color=render.LIGHT_GREY, label="before")
    right.hist(list(after.values()) or [0], bins=bins, histtype="step", lw=2, color=render.BLUE, label="after")
    right.set_yscale("log")
    right.set_xlabel("pairs per query")
    right.set_ylabel("queries")
    right.set_title("histogram")
    right.legend(fontsize=8)
    return render.png(fig)


def _samples(page: _Page, shard: StageRun | None) -> None:
    if shard is None:
        page.missing("shard")
        return
    names = sorted(n for n in shard.record.files if n.startswith("shards/") and n.endswith(".tar"))
    if not names:
        page.add("<p>The dataset lists no shards.</p>")
        return
    url = shard.file(names[0])
    try:
        samples = read_samples(url, SAMPLES_SHOWN)
    except (StorageError, TarError) as exc:
        page.add(f"<p class='problem'>cannot read {page.a(names[0], url)}: {render.esc(exc)}</p>")
        return
    cells = []
    for s in samples:
        cells.append(
            f"<figure class='sample'><img alt='{render.esc(s.caption)}' src='{render.data_uri(s.png)}'>"
            f"<figcaption>{render.esc(s.caption)}<br><small>{page.a(s.key[:12], url)}</small></figcaption></figure>"
        )
    page.add(
        f"<p>The first {page.n(len(samples), url)} samples of {page.a(names[0], url)}, "
        f"one of {page.n(len(names), shard.record_url)} shards; captions are the samples' <code>txt</code>.</p>"
    )
    page.add("<div class='grid'>" + "".join(cells) + "</div>")


@dataclass(slots=True)
class Sample:
    key: str
    caption: str
    png: bytes  # a thumbnail, re-encoded: the page shows only PNG, whatever the shard holds


def read_samples(shard_url: str, limit: int) -> list[Sample]:
    """The first ``limit`` decodable samples of a webdataset shard, streamed: shards may be GBs."""
    members: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with storage.open_url(shard_url) as f:
        for m in read_files(f, compressed=False):
            if "." not in m.name:
                continue
            key, ext = m.name.split(".", 1)
            if key not in members:
                if len(order) > limit * 2:  # enough candidates even if some fail to decode
                    break
                members[key] = {}
                order.append(key)
            members[key][ext.lower()] = m.read()
    out = []
    for key in order:
        parts = members[key]
        image = next((parts[e] for e in SAMPLE_IMAGE_EXTENSIONS if e in parts), None)
        if image is None:
            continue
        try:
            with Image.open(io.BytesIO(image)) as img:
                thumb = img.convert("RGB")
        except (UnidentifiedImageError, OSError):
            continue  # a sample the trainer would skip too; the grid shows the next one
        thumb.thumbnail((THUMBNAIL, THUMBNAIL))
        buf = io.BytesIO()
        thumb.save(buf, format="PNG")
        caption = parts.get("txt", b"").decode("utf-8", errors="replace").strip()
        out.append(Sample(key=key, caption=caption, png=buf.getvalue()))
        if len(out) == limit:
            break
    return out


def _decontamination(page: _Page, flt: StageRun | None) -> None:
    if flt is None:
        page.missing("filter")
        return
    src = flt.record_url
    by_task: dict[str, int] = dict(flt.record.tallies.get(EVAL_OVERLAP, {}))
    for reason, n in flt.record.counts.items():
        if reason.startswith(EVAL_OVERLAP + ":"):
            by_task.setdefault(reason.split(":", 1)[1], n)
    references = list(flt.record.config.get("reference_images") or [])
    for ref in references:
        task = ref.split("=", 1)[0] if "=" in ref and "://" not in ref.split("=", 1)[0] else None
        if task:
            by_task.setdefault(task, 0)
    if not references and not by_task:
        page.add(
            "<p>No evaluation images were given to filter (<code>--decontaminate SUITE</code> or "
            "<code>--reference-images</code>), so nothing was checked for train/test overlap.</p>"
        )
        return
    distance = flt.record.config.get("eval_overlap_distance")
    page.add(
        f"<p>Downloaded images within {page.n(distance, src)} bits (perceptual hash) of an evaluation "
        f"image were dropped as <code>{EVAL_OVERLAP}:&lt;task&gt;</code>, counted per task as in the "
        f"CLIP paper's section 5; {page.n(len(references), src)} reference sets.</p>"
    )
    page.table(
        ("task", "near duplicates dropped"),
        [(render.esc(task), page.n(n, src)) for task, n in sorted(by_task.items())],
        "decontamination",
    )


def _training(page: _Page, layout: RunLayout) -> None:
    page.add("<section id='training'><h2>Training</h2>")
    run = layout.get("train")
    if run is None:
        page.missing("train")
        page.add("</section>")
        return
    rec, src = run.record, run.record_url
    cfg = rec.config
    steps = rec.extra.get("steps", 0)
    ckpt = rec.extra.get("checkpoint", "checkpoints")
    page.add(
        f"<p>{render.esc(cfg.get('model_resolved') or cfg.get('model', '?'))}, {page.n(steps, src)} steps of "
        f"{page.n(cfg.get('batch_size'), src)} samples on {page.n(cfg.get('world_size', 1), src)} rank(s); "
        f"checkpoint {page.a(ckpt, run.file(ckpt))}.</p>"
    )
    murl = run.file("metrics.parquet")
    if not storage.exists(murl):
        page.add("<p>No <code>metrics.parquet</code>: this run logged no steps.</p>")
        page.add("</section>")
        return
    table = pq.read_table(io.BytesIO(storage.read_bytes(murl)))
    m = {name: table.column(name).to_pylist() for name in table.column_names}
    if not m.get("step"):
        page.add(f"<p>{page.a('metrics.parquet', murl)} holds no rows.</p></section>")
        return
    evals = _eval_curves(m)
    what = "Loss, temperature and throughput" + (", zero-shot evaluation" if evals else "")
    page.figure(_training_plot(m, evals), f"{what} against step", page.a("metrics.parquet", murl))
    last = len(m["step"]) - 1
    scale = m["logit_scale"][last]
    rows = [
        ("steps logged", page.n(len(m["step"]), murl)),
        ("last step", page.n(m["step"][last], murl)),
        ("samples seen", page.n(m["samples_seen"][last], murl)),
        ("final loss", page.n(m["loss"][last], murl)),
        ("final temperature (1 / logit scale)", page.n(1 / scale if scale else float("nan"), murl)),
        ("final logit scale", page.n(scale, murl)),
        ("mean samples/s", page.n(sum(m["samples_per_s"]) / len(m["samples_per_s"]), murl)),
        ("mean data wait", page.n(sum(m["data_wait_frac"]) / len(m["data_wait_frac"]), murl)),
        ("samples skipped", page.n(len(rec.extra.get("skipped", [])), src)),
    ]
    rows += [
        (render.esc(f"zero-shot {name} at step {xs[-1]}"), page.n(ys[-1], murl)) for name, (xs, ys) in evals.items()
    ]
    page.table(("", "value"), rows, "training")
    page.add("</section>")


# the headline numbers of `wit train --eval-every`'s eval/TASK/METRIC columns (all of them if none is one)
_EVAL_HEADLINE = ("acc1", "lp_acc1", "fewshot_k16_acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")


def _eval_curves(m: dict[str, list]) -> dict[str, tuple[list, list]]:
    """``TASK/METRIC -> (steps, values)`` of the evaluations during training (rows that have one)."""
    cols = sorted(k for k in m if k.startswith("eval/"))
    shown = [k for k in cols if k.rsplit("/", 1)[-1] in _EVAL_HEADLINE] or cols
    curves = {}
    for k in shown:
        pts = [(s, v) for s, v in zip(m["step"], m[k], strict=True) if v is not None]
        if pts:
            curves[k.removeprefix("eval/")] = ([s for s, _ in pts], [v for _, v in pts])
    return curves


def _training_plot(m: dict[str, list], evals: dict[str, tuple[list, list]] | None = None) -> bytes:
    fig = render.figure(16 if evals else 12, 3.2)
    axes = fig.subplots(1, 4 if evals else 3)
    loss, temp, speed = axes[:3]
    if evals:
        for (name, (xs, ys)), colour in zip(evals.items(), itertools.cycle(render.CYCLE)):
            axes[3].plot(xs, ys, marker="o", color=colour, label=name)
        axes[3].set_title("zero-shot evaluation")
        axes[3].legend(fontsize=7)
    steps = m["step"]
    loss.plot(steps, m["loss"], color=render.BLUE)
    loss.set_title("loss")
    temp.plot(steps, [1 / s if s else float("nan") for s in m["logit_scale"]], color=render.ORANGE)
    temp.set_title("temperature (1 / logit scale)")
    speed.plot(steps, m["samples_per_s"], color=render.GREEN)
    speed.set_title("samples/s (all ranks)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return render.png(fig)


_NUMERIC = re.compile(r"^[\s\d.,:%+\-–\[\]]*\d[\s\d.,:%+\-–\[\]]*$")


@dataclass(slots=True)
class _EvalRead:
    """The eval run's task details (``tasks/NAME.json``), read once for the findings and the
    evaluation section, with each one's URL and the files that could not be read."""

    run: StageRun
    tasks: list[dict]
    task_urls: dict[str, str]
    problems: list[tuple[str, str, str]]  # (name, url, error)


FINDINGS_LINK = "<a href='#findings'>findings</a>"


def _read_eval(layout: RunLayout) -> _EvalRead | None:
    run = layout.get("eval")
    if run is None:
        return None
    read = _EvalRead(run, [], {}, [])
    for name in [t["name"] for t in run.record.config.get("suite", {}).get("tasks", [])]:
        url = run.file(f"tasks/{name}.json")
        try:
            read.tasks.append(json.loads(storage.read_text(url)))
        except (StorageError, json.JSONDecodeError) as exc:
            read.problems.append((name, url, str(exc)))
            continue
        read.task_urls[name] = url
    return read


def _findings(page: _Page, found: list[Finding], ev: _EvalRead) -> None:
    """What the evaluation shows, in plain words (wit.evaluate.findings), each number linked to the
    task file it was read from."""
    page.add("<section id='findings'><h2>Findings</h2><ol class='findings'>")
    for f in found:
        text = "".join(
            render.esc(p) if isinstance(p, str) else page.a(p[0], ev.task_urls.get(p[1], ev.run.record_url))
            for p in f.parts
        )
        page.add(f"<li><strong>{render.esc(f.title)}.</strong> {text}</li>")
    page.add("</ol></section>")


def _evaluation(page: _Page, ev: _EvalRead | None) -> None:
    page.add("<section id='evaluation'><h2>Evaluation</h2>")
    if ev is None:
        page.missing("eval")
        page.add("</section>")
        return
    run, tasks, task_urls = ev.run, ev.tasks, ev.task_urls
    for name, url, error in ev.problems:
        page.add(f"<p class='problem'>cannot read {page.a(f'tasks/{name}.json', url)}: {render.esc(error)}</p>")
    cfg = run.record.config
    if not tasks:
        page.add("<p>No task results.</p></section>")
        return
    meta = {
        "model": cfg.get("model", "?"),
        "checkpoint": cfg.get("checkpoint", "?"),
        "checkpoint_digest": cfg.get("checkpoint_digest", ""),
        "suite": cfg.get("suite", {}).get("name", "?"),
        "resamples": cfg.get("resamples"),
        "seed": cfg.get("seed"),
    }
    results = run.file("part-00000.parquet")
    for blk in build_blocks(meta, tasks, with_findings=False):
        if blk.type == "h1":
            page.add(f"<h3>{render.esc(blk.text)}</h3>")
        elif blk.type == "h2":
            page.add(f"<h4>{render.esc(blk.text)}</h4>")
        elif blk.type == "p":
            page.add(f"<p>{render.inline_code(blk.text)} Source: {page.a(RUN_RECORD, run.record_url)}.</p>")
        elif blk.type == "figure":
            page.figure(blk.png, blk.text, page.a("results", results))
        elif blk.type == "table":
            rows = []
            for r in blk.rows:
                # every eval table starts with the task: its numbers come from tasks/TASK.json
                src = task_urls.get(r[0], run.record_url)
                rows.append(tuple(page.a(c, src) if _NUMERIC.match(c) else render.esc(c) for c in r))
            page.table(blk.headers, rows, "eval")
    page.add(
        f"<p>Files: {page.a('results.json', run.file('results.json'))} (CLIP_benchmark's shape), "
        f"{page.a('report.md', run.file('report.md'))}, {page.a('results manifest', results)}.</p>"
    )
    page.add("</section>")


def _lineage_section(page: _Page, layout: RunLayout) -> None:
    page.add("<section id='lineage'><h2>Lineage</h2>")
    leaves = [layout.runs[s] for s in reversed(registry.names()) if s in layout.runs]
    if not leaves:
        page.missing("No stage")
        page.add("</section>")
        return
    page.add(
        "<p>Each output names the inputs it read and their digests at the time; <em>changed</em> marks "
        "an input rewritten since.</p>"
    )
    shown: set[str] = set()
    for run in leaves:
        if storage.normalize(run.url) in shown:
            continue
        nodes = _lineage(layout, run.url)
        if not nodes:
            continue
        shown.update(n.url for n in nodes)
        page.add("<ul class='lineage'>" + _lineage_item(page, nodes[0]) + "</ul>")
    page.add("</section>")


def _lineage_item(page: _Page, node: LineageNode) -> str:
    rec = node.record
    if rec is None:
        text = f"<span class='source'>{render.esc(node.status)}</span> {page.a(node.url, node.url)}"
    else:
        src = storage.join(node.url, RUN_RECORD)
        status = "" if node.status == "ok" else f" <strong class='problem'>{render.esc(node.status)}</strong>"
        text = (
            f"<b>{render.esc(rec.stage)}</b> [{render.esc(rec.output.kind)}] {page.n(rec.rows, src)} rows, digest "
            f"{page.a((rec.output.digest or '–')[:12], src)}, {page.a(node.url, src)}{status}"
        )
    children = "".join(_lineage_item(page, c) for c in node.inputs)
    return f"<li>{text}" + (f"<ul>{children}</ul>" if children else "") + "</li>"


_CSS = (
    render.CSS
    + """nav a{margin-right:1em}td a{text-decoration:none}
.stages{display:flex;flex-wrap:wrap;gap:1em}.stage{flex:0 1 auto}.stage h4{margin:.5em 0 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:.8em}
.sample{margin:0}.sample img{width:128px;height:auto;image-rendering:pixelated}
.missing{color:#888;font-style:italic}.problem{color:#b00}ul.lineage{font-size:.9em}
"""
)


def build_report(root: str, out_html: str | None = None, stages: dict[str, str] | None = None) -> str:
    """Write the report of the run under ``root`` to ``out_html`` (default ``root/report.html``).

    ``stages`` maps stage names (``extract`` ... ``eval``) to output URLs for a custom layout; the
    rest are found under ``root``. Returns the URL of the written page.
    """
    root = storage.normalize(root)
    out_html = storage.normalize(out_html) if out_html else storage.join(root, REPORT)
    layout = find_stages(root, stages)
    page = _Page(_Links(out_html))
    ev = _read_eval(layout)
    found = findings(ev.tasks) if ev is not None else []
    page.add(
        render.html_head(f"wit run report: {root}", _CSS)
        + f"<h1>wit run report</h1><p>Run root {page.a(root, root)}. Every number links to "
        "the run record, part file or metrics file it was read from.</p>"
        f"<nav>{FINDINGS_LINK if found else ''}"
        "<a href='#overview'>stages</a><a href='#dataset'>dataset</a>"
        "<a href='#training'>training</a>"
        "<a href='#evaluation'>evaluation</a><a href='#lineage'>lineage</a></nav>"
    )
    if found:
        _findings(page, found, ev)
    _overview(page, layout)
    _dataset(page, layout)
    _training(page, layout)
    _evaluation(page, ev)
    _lineage_section(page, layout)
    page.add("</body></html>\n")
    storage.write_text(out_html, "\n".join(page.parts))
    return out_html
