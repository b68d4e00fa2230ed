"""extract → curate through the `wit` console script, on the synthetic web's WARC files."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from wit.evaluate import world
from wit.ingest.synthetic import generate_web
from wit.manifests.manifest import read_table
from wit.manifests.runrecord import read_run_record
from wit.manifests.verify import verify


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    return generate_web(tmp_path_factory.mktemp("web"), pages=40, seed=5)


def test_extract_then_curate_with_the_cli(web, tmp_path, run_wit):
    cands, cur = tmp_path / "candidates", tmp_path / "curated"
    proc = run_wit("extract", web.root / "warc", "-o", cands, "--workers", "2", "--languages", "en,de,fr,es")
    assert proc.returncode == 0, proc.stderr
    assert "extract: ran" in proc.stdout and "data_uri" in proc.stdout
    truth = web.truth()
    candidates = read_table(str(cands))
    # every image with usable alt text and an http(s) src is a candidate, relative ones included
    wanted = truth.filter(
        pc.invert(pc.is_in(truth["mess"], pc.cast(["data_uri", "tracking_pixel", "empty_alt"], truth["mess"].type)))
    )
    found = set(zip(candidates["page_url"].to_pylist(), candidates["url"].to_pylist(), strict=True))
    missing = [
        (p, u)
        for p, u in zip(wanted["page_url"].to_pylist(), wanted["img_url"].to_pylist(), strict=True)
        if (p, u) not in found
    ]
    assert not missing, missing[:3]
    assert pc.sum(truth["relative"]).as_py() > 0

    # coarse queries (one word each), so that every query is matched by more pairs than the cap
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(list(world.COLOURS) + list(world.SHAPES)) + "\n")
    proc = run_wit("curate", cands, "-o", cur, "--allow-private-hosts", "--queries", queries, "--per-query-cap", "3")
    assert proc.returncode == 0, proc.stderr
    rec = read_run_record(str(cur))
    assert rec.counts.get("lang_not_allowed", 0) > 0 and rec.counts.get("over_cap", 0) > 0
    curated = read_table(str(cur)).to_pandas()
    assert len(curated) == candidates.num_rows  # every candidate row kept with its decision
    assert curated.loc[~curated["keep"], "reason"].notna().all()
    assert verify(str(cur)).ok
    show = run_wit("manifest", "show", cur).stdout
    assert "queries_before" in show and "queries_after" in show
    lineage = run_wit("manifest", "lineage", cur).stdout
    for stage in ("curate", "curate-count", "curate-match", "extract", "source"):
        assert stage in lineage


def test_private_hosts_are_dropped_by_default(web, tmp_path, run_wit):
    cands = tmp_path / "c"
    run_wit("extract", web.root / "warc", "-o", cands, "--no-lang", check=True)
    run_wit("curate", cands, "-o", tmp_path / "cur", "--lang", "", check=True)
    rec = read_run_record(str(tmp_path / "cur"))
    assert (
        rec.counts.get("private_host", 0) == rec.rows - rec.counts.get("bad_url", 0) - rec.counts.get("empty_text", 0)
        or rec.counts.get("kept", 0) == 0
    )


def test_stage_errors_are_one_line(tmp_path, run_wit):
    proc = run_wit("curate", tmp_path / "nothing", "-o", tmp_path / "o")
    assert proc.returncode == 1 and proc.stderr.strip().startswith("Error:") and "Traceback" not in proc.stderr
    proc = run_wit("extract", tmp_path / "nothing-here", "-o", tmp_path / "o")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    proc = run_wit("filter", tmp_path / "d", "-o", tmp_path / "o", "--clip-score", tmp_path / "missing.pt")
    assert proc.returncode == 1 and "missing.pt" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_wit("extract", "x.warc", "-o", tmp_path / "o", "--part", "3/2")
    assert proc.returncode == 2 and "--part" in proc.stderr  # a usage error, caught before any work
