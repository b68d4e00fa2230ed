"""The run report: built from a real small run (synthetic web → shards → 5 training steps → eval),
its sections, that every number links to an existing manifest file, missing stages, a custom
layout, an S3 root, and a headless-Chromium render in which every image must load."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from wit.evaluate.run import EvalConfig, evaluate
from wit.ingest.synthetic import SyntheticWebServer, generate_web
from wit.manifests import storage
from wit.manifests.runrecord import read_run_record
from wit.pipeline import registry
from wit.pipeline.report import build_report, find_stages
from wit.train.config import TrainConfig
from wit.train.loop import train

from conftest import free_port

pytestmark = pytest.mark.slow
STAGES = registry.names()

SECTIONS = (
    "findings",
    "overview",
    "dataset",
    "counts",
    "queries",
    "samples",
    "decontamination",
    "training",
    "evaluation",
    "lineage",
)
NUMBER = re.compile(r"^[\s\d.,:%+\-–\[\]]*\d[\s\d.,:%+\-–\[\]]*$")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _wit(*args, cwd=None) -> None:
    exe = shutil.which("wit", path=os.path.dirname(sys.executable)) or "wit"
    proc = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, (args[0], proc.stderr[-2000:])


def _reference_images(downloaded: Path, folder: Path, n: int = 2) -> None:
    """Copies of a few downloaded images as an "evaluation set", so decontamination drops them."""
    folder.mkdir()
    with tarfile.open(downloaded / "shards" / "000000.tar") as tar:
        images = [m for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))][:n]
        for m in images:
            (folder / Path(m.name).name).write_bytes(tar.extractfile(m).read())


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """A whole run under one root, laid out as `wit run` lays it out."""
    base = tmp_path_factory.mktemp("report")
    root = base / "run"
    port = free_port()
    web = generate_web(base / "web", pages=25, seed=21, base_url=f"http://127.0.0.1:{port}")
    out = {name: root / name for name in ("candidates", "curated", "downloaded", "filtered", "dataset")}
    with SyntheticWebServer(web.root, port=port):
        _wit("extract", web.root / "warc", "--languages", "en,de,fr,es", "-o", out["candidates"])
        _wit("curate", out["candidates"], "--allow-private-hosts", "--per-query-cap", "3", "--lang", "",
             "-o", out["curated"])  # fmt: skip
        _wit("download", out["curated"], "--allow-private-hosts", "--image-size", "64", "--timeout", "1",
             "--threads", "8", "--samples-per-shard", "40", "--workers", "2", "-o", out["downloaded"])  # fmt: skip
    _reference_images(out["downloaded"], base / "evalset")
    _wit("filter", out["downloaded"], "--reference-images", f"synthetic={base / 'evalset'}", "-o", out["filtered"])
    _wit("shard", out["filtered"], "--samples-per-shard", "16", "-o", out["dataset"])
    cfg = TrainConfig.from_dict({}, steps=5, batch_size=8, workers=0, log_every=1, device="cpu")
    result = train(cfg, str(out["dataset"]), str(root / "train"))
    # tasks enough for each of the report's four findings
    suite = base / "suite.yaml"
    suite.write_text(FINDINGS_SUITE)
    evaluate(result.checkpoint, str(root / "eval"), str(suite), EvalConfig(cache=None, resamples=100))
    return root


FINDINGS_SUITE = """
tasks:
  - synthetic-colour
  - synthetic-shape
  - synthetic-shape-outline
  - synthetic-shape-linear-probe
  - synthetic-shape-outline-linear-probe
  - name: synthetic-shape-fewshot
    kind: fewshot
    dataset: synthetic-shape
    fewshot_ks: [1, 2]
"""
FINDINGS = ("Zero-shot transfer", "Prompt ensembling", "Effective robustness", "Zero-shot against few-shot")


class _Page(HTMLParser):
    """What the tests look at: section ids, images, links, and whether each table cell holds a link."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.images: list[str] = []
        self.hrefs: list[str] = []
        self.cells: list[tuple[str, bool]] = []
        self.external: list[str] = []
        self._cell: list | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("script", "link", "iframe") and (a.get("src") or a.get("href")):
            self.external.append(a.get("src") or a.get("href"))
        if tag == "a":
            self.hrefs.append(a.get("href", ""))
            if self._cell is not None:
                self._cell[1] = True
        if tag == "td":
            self._cell = ["", False]

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append((self._cell[0].strip(), self._cell[1]))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def _target(report: Path, href: str) -> Path:
    if href.startswith("file://"):
        return Path(unquote(href[len("file://") :]))
    return (report.parent / unquote(href)).resolve()


def test_report_has_every_section_and_every_number_links_to_its_manifest(run_root):
    url = build_report(str(run_root))
    assert url == str(run_root / "report.html")
    text = (run_root / "report.html").read_text()
    page = _Page(text)
    assert set(SECTIONS) <= page.ids
    assert "not run yet" not in text
    assert not page.external, "the page must be self-contained"
    # images: inline PNGs only (funnel, queries, 12 samples, training curves, eval summary, confusion)
    assert len(page.images) >= 17
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    # every number in a table is a link, and every link resolves to a file of the run
    numeric = [(t, linked) for t, linked in page.cells if NUMBER.match(t)]
    assert len(numeric) > 50
    assert all(linked for _, linked in numeric), [t for t, linked in numeric if not linked][:10]
    local = [h for h in page.hrefs if not h.startswith("#")]
    assert local
    for href in local:
        target = _target(run_root / "report.html", href)
        assert target.exists(), href
        # inside the root: relative, so the folder can move; outside (the WARC sources): absolute
        assert ("://" in href) != target.is_relative_to(run_root), href
    # the numbers are the run records' numbers, linked to their record
    for stage, folder in (("shard", "dataset"), ("filter", "filtered"), ("download", "downloaded")):
        rec = read_run_record(str(run_root / folder))
        assert f"<a href='{folder}/_run.json'>{rec.rows:,}</a>" in text, stage
    flt = read_run_record(str(run_root / "filtered"))
    overlap = flt.counts["eval_overlap:synthetic"]
    assert overlap >= 1
    assert re.search(rf"<td>synthetic</td><td><a href='filtered/_run.json'>{overlap}</a></td>", text)
    assert "<a href='train/metrics.parquet'>" in text
    assert re.search(r"<a href='eval/tasks/synthetic-colour.json'>\d+\.\d</a>", text)
    # the report opens with the findings, each number linked to the task it was read from
    findings = text[text.index("id='findings'") : text.index("id='overview'")]
    assert [t in findings for t in FINDINGS] == [True] * 4
    for task in ("synthetic-colour", "synthetic-shape-outline-linear-probe", "synthetic-shape-fewshot"):
        assert re.search(rf"<a href='eval/tasks/{task}.json'>[+-]?\d+\.\d( points|%)</a>", findings), task
    for stage in STAGES:
        assert f"<b>{stage}</b>" in text, f"lineage misses {stage}"


def test_missing_stages_say_not_run_yet(run_root, tmp_path):
    empty = build_report(str(tmp_path / "nothing"))
    text = Path(empty).read_text()
    assert text.count("not run yet") >= 7 and {"overview", "dataset", "training", "evaluation"} <= _Page(text).ids
    partial = tmp_path / "partial"
    for folder in ("candidates", "curated", "downloaded", "filtered", "dataset"):
        shutil.copytree(run_root / folder, partial / folder)
    text = Path(build_report(str(partial))).read_text()
    training = text[text.index("id='training'") : text.index("id='evaluation'")]
    evaluation = text[text.index("id='evaluation'") : text.index("id='lineage'")]
    assert "train: not run yet" in training and "eval: not run yet" in evaluation
    assert "id='samples'" in text and "data:image/png;base64," in text


def test_custom_layout_is_found_by_stage_and_outside_links_are_absolute(run_root, tmp_path):
    root = tmp_path / "custom"
    shutil.copytree(run_root / "eval", root / "scores")  # any folder name: found by its _run.json
    layout = find_stages(str(root))
    assert layout.runs["eval"].url == str(root / "scores")
    # the rest is found through the lineage of the eval output, back in the original root
    assert layout.runs["train"].url == str(run_root / "train")
    assert layout.runs["extract"].url == str(run_root / "candidates")
    text = Path(build_report(str(root))).read_text()
    assert "not run yet" not in text
    assert "<a href='scores/_run.json'>" in text
    assert f"<a href='file://{run_root}/dataset/_run.json'>" in text
    # a report written outside the root links everything absolutely
    elsewhere = build_report(str(run_root), str(tmp_path / "out" / "r.html"))
    page = _Page(Path(elsewhere).read_text())
    local = [h for h in page.hrefs if not h.startswith("#")]
    assert all(h.startswith("file://") for h in local)
    assert all(_target(Path(elsewhere), h).exists() for h in local)
    with pytest.raises(ValueError, match="holds a shard output, not eval"):
        find_stages(str(root), {"eval": str(run_root / "dataset")})


@pytest.mark.s3
def test_report_of_an_s3_root(run_root, s3_bucket):
    remote = f"{s3_bucket}/run"
    for path in run_root.rglob("*"):
        if path.is_file():
            storage.put_file(str(path), f"{remote}/{path.relative_to(run_root).as_posix()}")
    url = build_report(remote)
    assert url == f"{remote}/report.html"
    text = storage.read_text(url)
    page = _Page(text)
    assert set(SECTIONS) <= page.ids and "not run yet" not in text
    # the stages under the S3 root are the ones reported, linked relatively inside the bucket
    assert "<a href='dataset/_run.json'>" in text and "<a href='train/metrics.parquet'>" in text
    for href in page.hrefs:
        if not href.startswith(("#", "file://", "./")):
            assert storage.exists(f"{remote}/{unquote(href)}"), href


# The page's own check, run inside the browser after load: how many images decoded.
_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const out = document.createElement('pre');
  out.id = 'wit-probe';
  out.textContent = 'images ' + ok + '/' + imgs.length;
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium_with_every_image_loaded(run_root, tmp_path):
    text = Path(build_report(str(run_root))).read_text()
    # a copy next to the original, so that its relative links stay the same
    probed = run_root / "report-probe.html"
    probed.write_text(text.replace("</body>", _PROBE + "</body>"))
    try:
        proc = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",  # tests may run as root, where the sandbox refuses to start
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                probed.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        probed.unlink()
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    found = re.search(r"<pre id=\"wit-probe\">images (\d+)/(\d+)</pre>", dom)
    assert found, "the probe did not run: " + dom[-500:]
    loaded, total = int(found.group(1)), int(found.group(2))
    assert total >= 17 and loaded == total, f"{loaded} of {total} images loaded"
    rendered = _Page(dom)
    assert set(SECTIONS) <= rendered.ids
    for heading in ("Findings", "Stages", "Dataset", "Training", "Evaluation", "Lineage"):
        assert f"<h2>{heading}</h2>" in dom
    findings = dom[dom.index('id="findings"') : dom.index('id="overview"')]
    assert findings.count("<li>") == 4 and all(f"<strong>{t}.</strong>" in findings for t in FINDINGS)


def test_stages_are_found_in_the_folders_wit_run_gives_them(run_root):
    # the report and `wit run` read one registry: each stage is at its entry's folder
    layout = find_stages(str(run_root))
    assert {name: run.url for name, run in layout.runs.items()} == {
        s.name: str(run_root / s.folder) for s in registry.specs()
    }
