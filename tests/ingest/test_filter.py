"""filter: every planted defect ends with its reason, deterministic representatives, safe decoding.

The downloaded input is the fixture of ``_downloaded.py`` (the layout ``wit download`` writes); the
three phases run through the real executor, in worker processes and ``--part`` slices too.
"""

from __future__ import annotations

import io
import json
import random
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import imagehash
import pyarrow as pa
import pytest
from PIL import Image

from wit.evaluate import world
from wit.ingest.filter import FILTER_PHASES, FilterConfig, group_decisions, reference_root
from wit.ingest.imaging import HashIndex, check_image, hash_hex, phash
from wit.ingest.queries import selection_draw
from wit.ingest.synthetic.mess import bomb_png
from wit.manifests.manifest import read_table
from wit.manifests.runrecord import read_run_record
from wit.manifests.stage import StageError
from wit.manifests.verify import verify
from wit.pipeline.executor import PartSpec, run_stage

# the fixture module next to this file (the test folders are not packages)
sys.path.insert(0, str(Path(__file__).parent))
from _downloaded import make_downloaded, run_phases  # noqa: E402


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    return make_downloaded(tmp_path_factory.mktemp("dl"))


def _config(d, **kw) -> FilterConfig:
    return FilterConfig(reference_images=(f"shape={d.references}",), **kw)


@pytest.fixture(scope="module")
def filtered(downloaded, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("flt") / "filtered")
    ref = run_phases(FILTER_PHASES, _config(downloaded), downloaded.downloaded, out)
    return ref, out


def test_every_planted_defect_ends_with_its_reason(downloaded, filtered):
    ref, out = filtered
    rows = {r["uid"]: r for r in read_table(out, expect_kind="filtered").to_pylist()}
    assert set(rows) == set(downloaded.expected), "every ledger row has exactly one FILTERED row"
    for s in downloaded.samples:
        r = rows[s.uid]
        assert r["reason"] == downloaded.expected[s.uid], s.url
        assert r["keep"] == (r["reason"] is None)
        assert r["duplicate_of"] == downloaded.duplicate_of.get(s.uid), s.url
        if r["keep"]:
            assert r["phash"] and len(r["phash"]) == 16 and r["sha256"]
    planted = {v for v in downloaded.expected.values() if v}
    assert planted == {
        "duplicate", "near_duplicate", "too_small", "bad_aspect", "undecodable", "too_many_pixels",
        "download_failed:http_404", "download_failed:timeout", "missing_image", "eval_overlap:shape",
    }  # fmt: skip
    rec = read_run_record(out)
    assert rec.stage == "filter" and rec.output.digest == ref.digest
    assert rec.counts["kept"] == 24 and rec.counts["near_duplicate"] == 3 and rec.counts["undecodable"] == 2
    assert rec.tallies["eval_overlap"] == {"shape": 1}
    assert verify(out).ok


def test_workers_and_part_slices_give_the_same_digest(downloaded, filtered, tmp_path):
    ref, _ = filtered
    two = run_phases(FILTER_PHASES, _config(downloaded), downloaded.downloaded, str(tmp_path / "w2"), workers=2)
    assert two.digest == ref.digest
    out = tmp_path / "sliced"
    # a job array of two tasks: each phase finishes when its last slice does
    prev = downloaded.downloaded
    for stage, sub in FILTER_PHASES:
        target = str(out / sub) if sub else str(out)
        first = run_stage(stage, _config(downloaded), [prev], target, part=PartSpec(0, 2), progress=False)
        second = run_stage(stage, _config(downloaded), [prev], target, part=PartSpec(1, 2), progress=False)
        assert first.ref is None or first.total == 1  # a phase of one partition: slice 0 ends it
        prev = first.ref or second.ref
    assert prev.digest == ref.digest


def test_representative_is_the_smallest_uid_whatever_the_row_order():
    rng = random.Random(3)
    base = rng.getrandbits(64)
    rows = []
    for i in range(40):
        code = base ^ (1 << rng.randrange(64)) if i % 2 else rng.getrandbits(64)
        rows.append(
            {
                "uid": f"{rng.getrandbits(128):032x}",
                "sha256": f"{i // 3:064x}" if i < 6 else f"{i:064x}",
                "phash": hash_hex(code),
                "reason": None,
            }
        )
    config = FilterConfig(near_duplicate_distance=2)
    first = group_decisions(pa.Table.from_pylist(rows), [], config)
    for _ in range(3):
        rng.shuffle(rows)
        again = group_decisions(pa.Table.from_pylist(rows), [], config)
        assert {u: (d.reason, d.duplicate_of) for u, d in again.items()} == {
            u: (d.reason, d.duplicate_of) for u, d in first.items()
        }
    kept = {r["uid"] for r in rows} - set(first)
    for uid, d in first.items():
        assert d.duplicate_of in kept and d.duplicate_of < uid


def test_phash_is_bit_compatible_with_imagehash():
    rng = random.Random(7)
    for _ in range(30):
        img = world.render(world.sample_concept(rng), rng, size=(rng.randint(40, 300), rng.randint(40, 300)))
        assert hash_hex(phash(img)) == str(imagehash.phash(img))


def test_hash_index_finds_exactly_the_hashes_within_the_distance():
    rng = random.Random(1)
    stored = [rng.getrandbits(64) for _ in range(300)]
    index = HashIndex(5)
    for i, code in enumerate(stored):
        index.add(code, i)
    for _ in range(200):
        q = stored[rng.randrange(300)] ^ sum(1 << rng.randrange(64) for _ in range(rng.randint(0, 7)))
        assert index.near(q) == [i for i, c in enumerate(stored) if (c ^ q).bit_count() <= 5]


def test_a_decompression_bomb_is_refused_before_it_is_decoded(monkeypatch):
    data = bomb_png()
    # Even with PIL's own guard off, the header check refuses it without allocating 400 MB.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    tracemalloc.start()
    start = time.perf_counter()
    check = check_image(data, max_pixels=50_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert check.reason == "too_many_pixels" and (check.width, check.height) == (20000, 20000)
    assert peak < 20 << 20 and time.perf_counter() - start < 1.0


def test_undecodable_images_are_rows_not_exceptions():
    buf = io.BytesIO()
    world.render(world.sample_concept(random.Random(0)), random.Random(0), size=64).save(buf, "PNG")
    png = buf.getvalue()
    for bad in (b"", b"not an image", png[: len(png) // 2], png[:40] + bytes(200)):
        assert check_image(bad, 10**8).reason == "undecodable"
    ok = check_image(png, 10**8)
    assert ok.reason is None and (ok.width, ok.height, ok.format) == (64, 64, "PNG")


def test_rebalance_reapplies_the_per_query_cap(downloaded, filtered, tmp_path):
    ref, out = filtered
    # curate's own cap: link rot only lowers counts, so nothing more drops
    same = run_phases(FILTER_PHASES, _config(downloaded, rebalance=True), downloaded.downloaded, str(tmp_path / "a"))
    assert same.digest == ref.digest
    low = run_phases(
        FILTER_PHASES,
        _config(downloaded, rebalance=True, per_query_cap=2, seed=5),
        downloaded.downloaded,
        str(tmp_path / "b"),
    )
    before = {r["uid"]: r for r in read_table(out).to_pylist()}
    after = {r["uid"]: r for r in read_table(low.url).to_pylist()}
    queries = {s.uid: s.queries for s in downloaded.samples}
    kept = [u for u, r in before.items() if r["keep"]]
    counts = {}
    for u in kept:
        for q in queries[u]:
            counts[q] = counts.get(q, 0) + 1
    for u in kept:
        stays = any(counts[q] <= 2 or selection_draw(5, u, q) < 2 / counts[q] for q in queries[u])
        assert after[u]["reason"] == (None if stays else "over_cap")
    assert any(r["reason"] == "over_cap" for r in after.values())
    assert read_run_record(low.url).counts["over_cap"] > 0


def test_rebalance_without_a_curated_manifest_is_a_clear_error(downloaded, tmp_path):
    from wit.ingest.filter import QUERIES
    from wit.manifests.manifest import ManifestRef

    # the phases up to RESOLVE, then the planning of the rebalance's first phase alone
    upto = [i for i, (stage, _) in enumerate(FILTER_PHASES) if stage is QUERIES][0]
    run_phases(FILTER_PHASES[:upto], _config(downloaded), downloaded.downloaded, str(tmp_path / "f"))
    resolved = ManifestRef(url=str(tmp_path / "f" / "_resolve"), kind="filter_resolve")
    cfg = _config(downloaded, rebalance=True)
    parts = QUERIES.partitions(cfg, [resolved])
    assert parts[0].params[1] == downloaded.curated.url  # found up the lineage
    # a scan output whose lineage is lost (its run record names no inputs)
    scan = tmp_path / "f" / "_scan"
    rec = json.loads((scan / "_run.json").read_text())
    rec["inputs"] = []
    (scan / "_run.json").write_text(json.dumps(rec))
    with pytest.raises(StageError, match="--curated"):
        QUERIES.partitions(cfg, [resolved])


def test_reference_sets_in_clip_benchmark_layout(downloaded, tmp_path):
    wds = tmp_path / "wds_shape" / "test"
    wds.mkdir(parents=True)
    with tarfile.open(wds / "0.tar", "w") as tar:
        for i, p in enumerate(sorted(Path(downloaded.references).glob("*.png"))):
            tar.add(p, arcname=f"s{i:04d}.png")
            cls = tarfile.TarInfo(f"s{i:04d}.cls")
            cls.size = 1
            tar.addfile(cls, io.BytesIO(b"0"))
    cfg = FilterConfig(reference_images=(str(tmp_path / "wds_shape" / "test"),))
    assert cfg.reference_sets() == [("shape", str(wds))]
    ref = run_phases(FILTER_PHASES, cfg, downloaded.downloaded, str(tmp_path / "f"))
    assert read_run_record(ref.url).counts["eval_overlap:shape"] == 1


def test_decontaminate_exports_into_the_folder_it_is_given(tmp_path, monkeypatch):
    """OUT/_reference, or --reference-root: never beside OUT (at a bucket root there is no beside)."""
    assert reference_root("s3://bucket") == "s3://bucket/_reference"
    assert reference_root("s3://bucket/") == "s3://bucket/_reference"
    assert reference_root("s3://bucket/run/filtered") == "s3://bucket/run/filtered/_reference"
    assert reference_root(str(tmp_path / "filtered")) == str(tmp_path / "filtered" / "_reference")
    monkeypatch.chdir(tmp_path)
    assert reference_root("out") == str(tmp_path / "out" / "_reference")

    from wit.evaluate import datasets

    monkeypatch.setattr(datasets, "reference_sets", lambda suite, root: (f"digits={root}/wds_digits/test",))
    config = FilterConfig.from_options({"decontaminate": "digits"}, "s3://bucket")
    assert config.reference_images == ("digits=s3://bucket/_reference/wds_digits/test",)
    config = FilterConfig.from_options({"decontaminate": "digits", "reference-root": "s3://refs/r"}, "s3://bucket")
    assert config.reference_images == ("digits=s3://refs/r/wds_digits/test",)
    with pytest.raises(ValueError, match="give out or reference-root"):
        FilterConfig.from_options({"decontaminate": "digits"})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"clip_checkpoint": "ckpt.pt"}, "FilterConfig.build"),
        ({"min_side": 0}, "min-side"),
        ({"max_aspect_ratio": 0.5}, "aspect"),
        ({"near_duplicate_distance": 40}, "near_duplicate_distance"),
        ({"per_query_cap": 3}, "--rebalance"),
        ({"reference_images": ("a b=/x",)}, "plain word"),
    ],
)
def test_bad_config_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        FilterConfig(**kw)
