"""The dataset card: ``CARD.md`` and its two plots, written by ``wit shard`` next to the shards.

Everything on the card comes from run records and the shard plan: the counts per stage and
reason are read by walking the lineage of the filtered manifest (:mod:`wit.manifests.lineage`),
the per-query histogram from the plan's ``queries`` tally, and the sample grid from the first
shard's images. No timestamps of its own, so the same input gives the same card bytes.
"""

from __future__ import annotations

import io
import textwrap

from PIL import Image

from wit.manifests import render
from wit.manifests.lineage import LineageNode, find_upstream, lineage
from wit.manifests.runrecord import read_run_record
from wit.manifests.stage import StageError

CARD = "CARD.md"
QUERY_PLOT = "card/queries.png"
GRID_PLOT = "card/samples.png"
TOP_QUERIES = 30

LICENCE_NOTES = """\
## Licence and opt-out

- The images and texts were published by third parties on the web; this dataset holds copies for
  research. It grants no licence to them: each item keeps the rights of its publisher, and
  `url`/`page_url` in every sample's JSON name where it came from.
- Opt-outs honoured at download time: `X-Robots-Tag: noai` / `noimageai` responses were not kept
  (they appear in the download ledger as `robots_noai`).
- To have an item removed, send its `uid` (or image URL): marking it `keep=false` in the filtered
  manifest and re-running `wit shard` gives a new dataset with a new digest, and lineage shows
  which datasets contained it.
- Near duplicates of the evaluation suite's images were dropped (`eval_overlap:<task>` below),
  so zero-shot results on those tasks are not inflated by train/test overlap.
"""


def render_card(plan_url: str, rows: list[dict], images: list[bytes]) -> dict[str, bytes]:
    """``{relative name: bytes}`` of the card and its plots for the dataset planned at ``plan_url``."""
    plan = read_run_record(plan_url)
    if plan is None:
        raise StageError(f"{plan_url}: not a finished plan (no _run.json)")
    queries = plan.tallies.get("queries", {})
    samples = sum(plan.extra.get("samples", [0]))
    shards = sum(plan.extra.get("shards", [0]))
    # the plan's input is shard's split phase, which read the filtered manifest
    filtered = find_upstream(plan_url, "filtered")
    if filtered is None:
        raise StageError(f"{plan_url}: no filtered manifest up its run records")
    filtered_url = filtered.url
    tree = lineage(filtered_url)
    lines = [
        "# Dataset card",
        "",
        f"{samples:,} image–text pairs in {shards:,} webdataset shards (`shards/NNNNNN.tar`; "
        "`shards/sizes.json` gives each shard's sample count as open_clip's trainer reads it).",
        "Each sample: the image as downloaded (`jpg`, `png`, ...), `txt` (the alt text) and `json` "
        "(uid, url, page_url, queries, sha256, width, height, scores). The sample key is the uid.",
        "",
        f"Built from the filtered manifest `{filtered_url}` "
        f"(digest `{(filtered.digest or '')[:16]}`), seed {plan.config.get('seed')}, "
        f"{plan.config.get('samples_per_shard')} samples per shard.",
        "",
        "## Counts per stage and reason",
        "",
        "Walked from the filtered manifest back through each stage's `_run.json` (phases in `_` "
        "folders are internal steps of a stage).",
        "",
        "| stage | kind | rows | kept | dropped by reason |",
        "|---|---|---:|---:|---|",
    ]
    for node in _stages(tree):
        rec = node.record
        counts = dict(rec.counts)
        kept = counts.pop("kept", None)
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        kept_text = "" if kept is None else f"{kept:,}"
        lines.append(f"| {rec.stage} | {rec.output.kind} | {rec.rows:,} | {kept_text} | {reasons or '—'} |")
    lines += [
        "",
        "## Queries",
        "",
        f"{len(queries):,} queries have at least one sample; a sample counts once for each query it matched.",
        "",
        f"![pairs per query]({QUERY_PLOT})",
        "",
    ]
    ranked = sorted(queries.items(), key=lambda kv: (-kv[1], kv[0]))
    if ranked:
        lines += ["| query | samples |", "|---|---:|"]
        lines += [f"| {q} | {n:,} |" for q, n in ranked[:10]]
        lines.append("")
    lines += ["## Samples", "", f"![sample grid]({GRID_PLOT})", "", LICENCE_NOTES]
    return {
        CARD: ("\n".join(lines)).encode("utf-8"),
        QUERY_PLOT: query_plot(ranked),
        GRID_PLOT: sample_grid(rows, images),
    }


def _stages(tree: LineageNode) -> list[LineageNode]:
    seen, found = set(), []
    for node in tree.walk():
        if node.record is not None and node.url not in seen:
            seen.add(node.url)
            found.append(node)
    return found


def query_plot(ranked: list[tuple[str, int]]) -> bytes:
    """Two panels: the top queries by samples, and the histogram of samples per query."""
    fig = render.figure(11, 4.5)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    top = ranked[:TOP_QUERIES]
    left.barh(range(len(top)), [n for _, n in top], color=render.BLUE)
    left.set_yticks(range(len(top)), [q[:28] for q, _ in top], fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("samples")
    left.set_title(f"top {len(top)} queries")
    counts = [n for _, n in ranked]
    right.hist(counts or [0], bins=min(30, max(1, len(set(counts)))), color=render.GREEN)
    right.set_xlabel("samples per query")
    right.set_ylabel("queries")
    right.set_title("samples per query")
    fig.tight_layout()
    return render.png(fig)


def sample_grid(rows: list[dict], images: list[bytes], columns: int = 4) -> bytes:
    """A grid of the first samples of shard 0 with their captions."""
    n = max(1, len(rows))
    grid_rows = -(-n // columns)
    fig = render.figure(3 * columns, 3.2 * grid_rows)
    axes = fig.subplots(grid_rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(rows):
            continue
        with Image.open(io.BytesIO(images[i])) as img:
            thumb = img.convert("RGB")
            thumb.thumbnail((256, 256))
        ax.imshow(thumb)
        ax.set_title("\n".join(textwrap.wrap(rows[i]["text"] or "", 32)[:3]), fontsize=7)
    fig.tight_layout()
    return render.png(fig)
