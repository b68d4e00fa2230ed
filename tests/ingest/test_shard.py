"""shard: kept samples into deterministic webdataset shards, the dataset manifest, card, kills, S3.

Input: the ``_downloaded.py`` fixture run through ``wit filter``'s phases once per module.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from wit.ingest.filter import FILTER_PHASES, FilterConfig
from wit.ingest.shard import SHARD_PHASES, ShardConfig
from wit.manifests import storage
from wit.manifests.buckets import MAX_BUCKETS
from wit.manifests.manifest import ManifestError, ManifestRef, open_manifest, read_table
from wit.manifests.stage import committed
from wit.manifests.verify import verify
from wit.pipeline.executor import PartSpec, run_stage

sys.path.insert(0, str(Path(__file__).parent))
from _downloaded import make_downloaded, run_phases  # noqa: E402

CONFIG = ShardConfig(samples_per_shard=5, seed=3)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard-in")
    d = make_downloaded(root)
    cfg = FilterConfig(reference_images=(f"shape={d.references}",))
    return d, run_phases(FILTER_PHASES, cfg, d.downloaded, str(root / "filtered"))


@pytest.fixture(scope="module")
def dataset(filtered, tmp_path_factory):
    out = tmp_path_factory.mktemp("shard-out") / "dataset"
    return run_phases(SHARD_PHASES, CONFIG, filtered[1], str(out)), out


def test_shards_hold_exactly_the_kept_samples(filtered, dataset):
    d, _ = filtered
    ref, out = dataset
    kept = {u for u, reason in d.expected.items() if reason is None}
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    assert [Path(s).name for s in shards] == [f"{i:06d}.tar" for i in range(5)]  # 24 kept, 5 per shard
    seen, per_shard = [], {}
    for sample in wds.WebDataset(shards, shardshuffle=False):
        seen.append(sample["__key__"])
        per_shard[Path(sample["__url__"]).name] = per_shard.get(Path(sample["__url__"]).name, 0) + 1
        meta = json.loads(sample["json"])
        assert meta["uid"] == sample["__key__"]
        image = sample.get("jpg") or sample.get("png")
        assert image is not None and Image.open(io.BytesIO(image)).size == (meta["width"], meta["height"])
        assert meta["queries"] and meta["page_url"].startswith("http://127.0.0.1")
        assert set(meta["scores"]) == {"phash", "clip_score"}
        assert sample["txt"].decode()
    assert sorted(seen) == sorted(kept) and len(seen) == len(set(seen))  # no planted defect, no repeats
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sizes == per_shard == {"000000.tar": 5, "000001.tar": 5, "000002.tar": 5, "000003.tar": 5, "000004.tar": 4}
    samples = read_table(str(out), expect_kind="samples").to_pylist()
    assert [s["uid"] for s in samples] == seen  # the manifest lists the samples in shard order
    assert all(s["key"] == s["uid"] and s["shard"].startswith("shards/") for s in samples)
    index = open_manifest(str(out), table="shard_index", expect_kind="shards").table().to_pylist()
    assert [r["samples"] for r in index] == [5, 5, 5, 5, 4]
    assert all(r["bytes"] == (out / r["shard"]).stat().st_size for r in index)
    assert verify(str(out)).ok


def test_shuffled_order_mixes_queries(dataset):
    _, out = dataset
    samples = read_table(str(out)).to_pylist()
    by_uid = sorted(s["uid"] for s in samples)
    assert [s["uid"] for s in samples] != by_uid


def test_same_input_and_seed_give_identical_bytes_with_workers_and_slices(filtered, dataset, tmp_path):
    ref, out = dataset
    two = run_phases(SHARD_PHASES, CONFIG, filtered[1], str(tmp_path / "w2"), workers=2)
    assert two.digest == ref.digest
    for p in sorted((out / "shards").iterdir()):
        assert (tmp_path / "w2" / "shards" / p.name).read_bytes() == p.read_bytes()
    sliced = tmp_path / "sliced"
    plan = run_phases(SHARD_PHASES[:-1], CONFIG, filtered[1], str(sliced))
    for i in range(3):
        outcome = run_stage(SHARD_PHASES[-1][0], CONFIG, [plan], str(sliced), part=PartSpec(i, 3), progress=False)
    assert outcome.ref.digest == ref.digest
    other = run_phases(SHARD_PHASES, ShardConfig(samples_per_shard=5, seed=4), filtered[1], str(tmp_path / "s4"))
    assert other.digest != ref.digest  # another seed, another order


def test_rerun_rewrites_nothing(filtered, dataset):
    ref, out = dataset
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run_phases(SHARD_PHASES, CONFIG, filtered[1], str(out))
    assert again == ref
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_verify_detects_a_flipped_shard_byte(filtered, tmp_path):
    out = tmp_path / "ds"
    run_phases(SHARD_PHASES, CONFIG, filtered[1], str(out))
    shard = out / "shards" / "000002.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    kinds = {(p.kind, p.name) for p in verify(str(out)).problems}
    assert ("changed", "shards/000002.tar") in kinds and ("shard_index", "shards/000002.tar") in kinds


def test_card_has_counts_and_plots(dataset):
    _, out = dataset
    card = (out / "CARD.md").read_text()
    for needle in (
        "| filter | filtered |",
        "too_many_pixels 1",
        "eval_overlap:shape 1",
        "| download |",
        "card/queries.png",
        "card/samples.png",
        "Licence and opt-out",
        "24 image–text pairs",
    ):
        assert needle in card
    for name in ("card/queries.png", "card/samples.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 300


def test_killed_shard_run_resumes_to_the_same_digest(filtered, dataset, tmp_path):
    ref, _ = dataset
    out = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from _downloaded import run_phases
        from wit.ingest.shard import SHARD_PHASES, ShardConfig, ShardWrite
        from wit.manifests.manifest import ManifestRef

        # every shard but the first waits, so the kill finds exactly one committed
        write = ShardWrite.run_partition
        def slow(self, config, partition, out):
            if partition.index > 0:
                time.sleep(30)
            return write(self, config, partition, out)
        ShardWrite.run_partition = slow

        run_phases(SHARD_PHASES, ShardConfig(samples_per_shard=5, seed=3),
                   ManifestRef(**{filtered[1].to_dict()!r}), {str(out)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not committed(str(out)):
            time.sleep(0.05)
        assert committed(str(out)) == {0}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "_run.json").exists() and verify(str(out)).problems[0].kind == "unfinished"
    resumed = run_phases(SHARD_PHASES, CONFIG, filtered[1], str(out))
    assert resumed.digest == ref.digest
    assert verify(str(out)).ok and not list(out.rglob(f"{storage.TMP_PREFIX}*"))


@pytest.mark.s3
def test_output_on_s3_gives_the_same_digest(filtered, dataset, s3_bucket):
    ref, _ = dataset
    url = f"{s3_bucket}/dataset"
    remote = run_phases(SHARD_PHASES, CONFIG, filtered[1], url)
    assert remote.digest == ref.digest
    assert verify(url).ok
    sizes = json.loads(storage.read_text(f"{url}/shards/sizes.json"))
    assert sum(sizes.values()) == 24


@pytest.mark.parametrize(
    "kw", [{"samples_per_shard": 0}, {"seed": -1}, {"grid_samples": 1000}, {"buckets": 0}, {"buckets": MAX_BUCKETS + 1}]
)
def test_bad_config_is_a_clear_error(kw):
    with pytest.raises(ValueError):
        ShardConfig(**kw)


def test_an_image_changed_since_filter_stops_the_shard_before_commit(tmp_path):
    """The downloaded shard is rewritten after filter, same size, one image byte flipped: shard
    refuses to write that image under the sha256 filter recorded, and commits no shard."""
    from wit.manifests.stage import StageError

    d = make_downloaded(tmp_path / "in", n_clean=8, shards=1)
    ref = run_phases(FILTER_PHASES, FilterConfig(), d.downloaded, str(tmp_path / "filtered"))
    tar = next((tmp_path / "in").rglob("shards/*.tar"))
    data = bytearray(tar.read_bytes())
    at = data.index(b"\xff\xd8\xff") + 600  # inside the first JPEG's bytes
    data[at] ^= 0x01
    tar.write_bytes(bytes(data))
    out = tmp_path / "ds"
    with pytest.raises(StageError, match="not the one filter saw"):
        run_phases(SHARD_PHASES, ShardConfig(samples_per_shard=100), ref, str(out))
    assert not list(out.rglob("*.tar")) and not list(out.rglob(f"{storage.TMP_PREFIX}*"))


def test_an_image_moved_since_filter_stops_the_shard_before_commit(tmp_path):
    """The downloaded shard is rebuilt after filter with its members in reverse order: every
    offset filter recorded is stale, and shard refuses rather than writing the wrong bytes."""
    import tarfile

    from wit.manifests.stage import StageError

    d = make_downloaded(tmp_path / "in", n_clean=8, shards=1)
    ref = run_phases(FILTER_PHASES, FilterConfig(), d.downloaded, str(tmp_path / "filtered"))
    tar_path = next((tmp_path / "in").rglob("shards/*.tar"))
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in reversed(members):
            tar.addfile(m, io.BytesIO(data))
    out = tmp_path / "ds"
    with pytest.raises(StageError, match="not the one filter saw|ends inside"):
        run_phases(SHARD_PHASES, ShardConfig(samples_per_shard=100), ref, str(out))
    assert not list(out.rglob("*.tar")) and not list(out.rglob(f"{storage.TMP_PREFIX}*"))


def test_filter_locates_every_kept_image_where_the_tar_index_finds_it(filtered):
    """Plan takes each image's place from filter's ext/offset/bytes; without them (a compressed
    shard) it indexes the tar headers. Both give the same places."""
    import pyarrow as pa

    from wit.ingest.shardplan import locate_images

    d, ref = filtered
    rows = read_table(ref.url, expect_kind="filtered")
    rows = rows.filter(rows.column("keep"))
    by_filter = locate_images(d.downloaded.url, rows)
    assert all(w is not None and w[1] > 0 and w[2] > 0 for w in by_filter)
    unlocated = rows
    for name in ("ext", "offset", "bytes"):  # as filter writes them for a compressed shard: nulls
        at = unlocated.schema.get_field_index(name)
        unlocated = unlocated.set_column(at, name, pa.nulls(rows.num_rows, unlocated.schema.field(name).type))
    by_index = locate_images(d.downloaded.url, unlocated)
    half = rows.set_column(
        rows.schema.get_field_index("offset"),
        "offset",
        pa.array([o if i % 2 else None for i, o in enumerate(rows.column("offset").to_pylist())], pa.int64()),
    )
    assert by_filter == by_index == locate_images(d.downloaded.url, half)
    # and the xxh3-128 filter recorded is that of the bytes at the place it recorded
    from xxhash import xxh3_128_hexdigest

    for row, (_, offset, size) in zip(rows.to_pylist(), by_filter, strict=True):
        with open(Path(d.downloaded.url) / row["shard"], "rb") as fh:
            fh.seek(offset)
            assert xxh3_128_hexdigest(fh.read(size)) == row["xxh3"]


def test_a_filtered_manifest_from_another_manifest_format_is_refused(filtered, tmp_path):
    """Shard reads no part of another manifest format (nor one lacking a column, as filters before
    xxh3 wrote): it stops before its first partition, naming both versions, and writes nothing."""
    import shutil

    import pyarrow.parquet as pq

    from wit.manifests.schemas import SCHEMA_VERSION, VERSION_KEY

    d, ref = filtered
    old = tmp_path / "filtered"
    shutil.copytree(ref.url, old)
    part = sorted(old.glob("part-*.parquet"))[-1]
    table = pq.read_table(part)
    pq.write_table(table.drop_columns(["xxh3"]), part)
    out = tmp_path / "ds"
    with pytest.raises(ManifestError, match=r"schema does not match the filtered's \(lacks xxh3\)"):
        run_phases(SHARD_PHASES, CONFIG, ManifestRef(url=str(old), kind="filtered"), str(out))
    meta = {**table.schema.metadata, VERSION_KEY: b"0"}
    pq.write_table(table.replace_schema_metadata(meta), part)
    with pytest.raises(ManifestError, match=f"manifest format 0; this wit reads manifest format {SCHEMA_VERSION} only"):
        run_phases(SHARD_PHASES, CONFIG, ManifestRef(url=str(old), kind="filtered"), str(out))
    assert not list(out.rglob("*.tar")) and not list(out.rglob("*.parquet"))


# ---------------------------------------------------------------------------------------------
# The bucketed plan: the same dataset for any bucket count, and the one-pass reference order


def _reference_shards(filtered_url: str, curated_url: str, config: ShardConfig, folder: Path) -> list[dict]:
    """The dataset as the one-pass reference makes it: :func:`plan_rows` over every filtered and
    curated row, images located in that order, cut into chunks of ``samples_per_shard``, each
    written with ``write_shard``. Per shard: its samples (uid, text, page_url, queries) and sha256."""
    from contextlib import ExitStack

    import pyarrow as pa

    from wit.ingest import shardplan
    from wit.manifests import tarwrite
    from wit.manifests.lineage import find_upstream
    from wit.manifests.schemas import conform

    downloaded = find_upstream(filtered_url, "downloaded").url
    curated = open_manifest(curated_url, expect_kind="curated").table(["uid", "page_url", "queries", "keep"])
    rows = shardplan.plan_rows(read_table(filtered_url), curated.filter(curated.column("keep")), config.seed)
    where = shardplan.locate_images(downloaded, rows)
    table = pa.table(
        {
            **{n: rows.column(n) for n in shardplan.PLAN_ROWS_SCHEMA.names if n in rows.column_names},
            "ext": [w[0] for w in where],
            "source": rows.column("shard"),
            "offset": [w[1] for w in where],
            "size": [w[2] for w in where],
        }
    )
    table = conform(table, shardplan.PLAN_ROWS_SCHEMA)
    shards = []
    n = config.samples_per_shard
    for k, start in enumerate(range(0, table.num_rows, n)):
        chunk = table.slice(start, n)
        with ExitStack() as stack:
            info = tarwrite.write_shard(
                str(folder / f"{k:06d}.tar"), chunk, tarwrite.load_images(downloaded, chunk, stack)
            )
        samples = chunk.select(["uid", "text", "page_url", "queries"]).to_pylist()
        shards.append({"shard": f"shards/{k:06d}.tar", "samples": samples, "sha256": info.sha256})
    return shards


def _dataset_shards(out: Path) -> list[dict]:
    """Per shard of a written dataset, as :func:`_reference_shards` gives them."""
    index = read_table(str(out / "shard_index")).to_pylist()
    samples = read_table(str(out), expect_kind="samples").to_pylist()
    return [
        {
            "shard": r["shard"],
            "samples": [
                {k: s[k] for k in ("uid", "text", "page_url", "queries")} for s in samples if s["shard"] == r["shard"]
            ],
            "sha256": r["sha256"],
        }
        for r in index
    ]


def _published(out: Path) -> dict[str, bytes]:
    """Every file of a dataset but its run record, markers and phase folders: what a reader gets."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not str(p.relative_to(out)).startswith("_")
    }


def _pieces_per_shard(out: Path) -> dict[str, int]:
    plan = read_table(str(out / "_plan"), expect_kind="shard_plan").column("shard").to_pylist()
    return {s: plan.count(s) for s in plan}


def test_the_dataset_is_the_one_pass_reference_order(filtered, dataset, tmp_path):
    """Shard by shard, the dataset holds exactly the samples of plan_rows' global order cut into
    chunks (the last one short), with the bytes write_shard gives them in that order."""
    d, ref = filtered
    _, out = dataset
    expected = _reference_shards(ref.url, d.curated.url, CONFIG, tmp_path)
    assert [len(s["samples"]) for s in expected] == [5, 5, 5, 5, 4]
    assert _dataset_shards(out) == expected


@pytest.mark.parametrize(("buckets", "workers"), [(1, 1), (3, 1), (8, 1), (8, 2)])
def test_the_dataset_is_the_same_bytes_for_any_bucket_count(filtered, dataset, tmp_path, buckets, workers):
    """PLAN runs one partition per bucket of the order key; the shards, the samples manifest (so
    the digest), sizes.json and the card are the same bytes for any bucket count and worker count,
    and with more than one bucket some shard is cut across a bucket boundary (two pieces)."""
    ref, out = dataset
    config = ShardConfig(samples_per_shard=5, seed=3, buckets=buckets)
    got = run_phases(SHARD_PHASES, config, filtered[1], str(tmp_path / "ds"), workers=workers)
    assert got.digest == ref.digest
    assert _published(tmp_path / "ds") == _published(out)
    plan = read_table(str(tmp_path / "ds" / "_plan"), expect_kind="shard_plan")
    assert plan.column("plan").to_pylist()[-1] <= f"plan/part-{buckets - 1:05d}.parquet"
    pieces = _pieces_per_shard(tmp_path / "ds")
    assert list(pieces) == [f"shards/{k:06d}.tar" for k in range(5)]
    assert (max(pieces.values()) > 1) == (buckets > 1)
    assert verify(str(tmp_path / "ds")).ok


def test_job_array_slices_of_the_split_give_the_same_dataset(filtered, dataset, tmp_path):
    """``--part i/N`` slices SPLIT; the slice that completes it runs PLAN and WRITE in full."""
    from wit.pipeline.executor import run_phases as run_sliced

    ref, _ = dataset
    config = ShardConfig(samples_per_shard=5, seed=3, buckets=3)
    first = run_sliced(SHARD_PHASES, config, [filtered[1]], str(tmp_path / "ds"), part=PartSpec(0, 2), progress=False)
    assert not first.done and first.remaining
    last = run_sliced(SHARD_PHASES, config, [filtered[1]], str(tmp_path / "ds"), part=PartSpec(1, 2), progress=False)
    assert last.ref.digest == ref.digest


def _rewrite(folder: Path, edit) -> None:
    """Rewrite each part file of a copied manifest folder with ``edit(index, table)``."""
    import pyarrow.parquet as pq

    for k, part in enumerate(sorted(folder.glob("part-*.parquet"))):
        pq.write_table(edit(k, pq.read_table(part)), part)


@pytest.mark.parametrize("buckets", [1, 3, 4, 8, 16])
def test_ties_duplicates_and_empty_buckets_keep_the_reference_order(filtered, tmp_path, monkeypatch, buckets):
    """The order key made coarse (four values, each exactly at the start of a bucket when there
    are four buckets; buckets left empty when there are eight or sixteen): samples tie on it and
    go by uid. A uid kept three times (twice in one filtered part, once in another, with other
    texts) keeps part-then-row order, and a uid curated several times takes its first kept
    curated row, as in plan_rows. The dataset is the reference's, shard for shard, for any bucket
    count, with shards cut across buckets and a short last shard."""
    import hashlib
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from wit.ingest import shardplan

    def coarse(seed: int, uid: str) -> bytes:
        return bytes([hashlib.blake2b(f"{seed}{uid}".encode()).digest()[0] % 4 * 64]) + bytes(7)

    monkeypatch.setattr(shardplan, "order_key", coarse)  # workers=1: PLAN runs in this process
    d, ref = filtered
    flt, cur = tmp_path / "filtered", tmp_path / "curated"
    shutil.copytree(ref.url, flt)
    shutil.copytree(d.curated.url, cur)
    twice = pq.read_table(flt / "part-00000.parquet")
    twice = twice.filter(twice.column("keep")).slice(0, 2)

    def with_values(t: pa.Table, **values) -> pa.Table:
        for name, value in values.items():
            column = pa.array([value] * t.num_rows, t.schema.field(name).type)
            t = t.set_column(t.schema.get_field_index(name), t.schema.field(name), column)
        return t

    # each filtered part ends with another copy of the two rows, under another text
    _rewrite(flt, lambda k, t: pa.concat_tables([t, with_values(twice, text=f"copy in part {k}")]))
    curated = read_table(str(cur))
    first_page = {r["uid"]: r["page_url"] for r in curated.to_pylist() if r["keep"]}
    twins = curated.filter(pc.is_in(curated.column("uid"), value_set=twice.column("uid")))
    # curated: a dropped twin before each kept row, a kept one after, and one in a second part
    dropped = with_values(twins, page_url="http://dropped/", keep=False)
    later = with_values(twins, page_url="http://later/")
    _rewrite(cur, lambda k, t: pa.concat_tables([dropped, t, later]))
    pq.write_table(with_values(twins, page_url="http://second-part/"), cur / "part-00001.parquet")

    config = ShardConfig(samples_per_shard=3, seed=5, curated=str(cur), card=False, buckets=buckets)
    out = tmp_path / "ds"
    run_phases(SHARD_PHASES, config, ManifestRef(url=str(flt), kind="filtered"), str(out))
    expected = _reference_shards(str(flt), str(cur), config, tmp_path / "reference")
    assert _dataset_shards(out) == expected
    samples = [s for sh in expected for s in sh["samples"]]
    for uid in twice.column("uid").to_pylist():
        copies = [s for s in samples if s["uid"] == uid]
        assert [s["text"] for s in copies][1:] == ["copy in part 0", "copy in part 1"]
        assert {s["page_url"] for s in copies} == {first_page[uid]}
    assert len(expected[-1]["samples"]) < 3
    assert (max(_pieces_per_shard(out).values()) > 1) == (buckets > 1)
    # the four key values fill min(buckets, 4) buckets; an empty bucket writes no plan part
    assert len(set(read_table(str(out / "_plan")).column("plan").to_pylist())) == min(buckets, 4)


def test_a_plan_partition_reads_only_its_bucket(filtered, tmp_path, monkeypatch):
    """PLAN partition ``b`` reads batch ``b`` of each split file and nothing else, holds exactly
    the kept samples whose order key lies in the ``b``-th of ``B`` equal ranges, and starts at
    the number of samples in the buckets before it."""
    import pyarrow.parquet as pq

    from wit.ingest import shard, shardplan
    from wit.manifests import buckets

    _, ref = filtered
    config = ShardConfig(samples_per_shard=5, seed=3, buckets=4)
    split = run_phases(SHARD_PHASES[:1], config, ref, str(tmp_path / "_split"))
    rows = read_table(ref.url)
    kept = rows.filter(rows.column("keep")).column("uid").to_pylist()
    files = [f"{split.url}/filtered/part-{k:05d}.arrow" for k in range(len(open_manifest(ref.url).parts))]
    files.append(f"{split.url}/curated/part-00000.arrow")
    in_bucket = {
        b: [u for u in kept if int.from_bytes(shardplan.order_key(3, u), "big") * 4 >> 64 == b] for b in range(4)
    }
    assert all(in_bucket.values())
    reads = []
    real = buckets.read
    monkeypatch.setattr(buckets, "read", lambda url, b: reads.append((url, b)) or real(url, b))
    partitions = shard.PLAN.partitions(config, [split])
    assert [p.params[:2] for p in partitions] == [
        (sum(len(in_bucket[c]) for c in range(b)), len(in_bucket[b])) for b in range(4)
    ]
    for p in partitions:
        reads.clear()
        result = shard.PLAN.run_partition(config, p, str(tmp_path / "_plan"))
        assert sorted(u for u, _ in reads) == sorted(files)
        assert {b for _, b in reads} == {p.index}
        part = pq.read_table(tmp_path / "_plan" / "plan" / f"part-{p.index:05d}.parquet")
        assert sorted(part.column("uid").to_pylist()) == sorted(in_bucket[p.index])
        assert result.extra["samples"] == sum(result.table.column("samples").to_pylist()) == part.num_rows


def test_no_kept_sample_is_a_clear_error(filtered, tmp_path):
    """A filtered manifest that keeps nothing: shard stops with a StageError that says so, before
    any plan or shard is written."""
    import shutil

    import pyarrow as pa

    from wit.manifests.stage import StageError

    _, ref = filtered
    flt = tmp_path / "filtered"
    shutil.copytree(ref.url, flt)
    _rewrite(flt, lambda k, t: t.set_column(t.schema.get_field_index("keep"), "keep", pa.array([False] * t.num_rows)))
    out = tmp_path / "ds"
    with pytest.raises(StageError, match=f"{flt}: no kept samples to shard"):
        run_phases(SHARD_PHASES, CONFIG, ManifestRef(url=str(flt), kind="filtered"), str(out))
    assert not (out / "_plan").exists() and not (out / "shards").exists()


def test_order_buckets_are_equal_ranges_of_the_key():
    """``⌊key · B / 2⁶⁴⌋`` in numpy's 64-bit integers is Python's exact big-integer value, at the
    edges of each range too, for any bucket count up to the most there may be."""
    import random

    import numpy as np

    from wit.ingest.shardplan import order_buckets

    rng = random.Random(7)
    for count in (1, 2, 3, 7, 8, 1000, 65_521, MAX_BUCKETS):
        edges = [-(-b * 2**64 // count) for b in range(1, count)][:50]  # the first key of each bucket
        keys = [0, 2**64 - 1] + [rng.getrandbits(64) for _ in range(500)] + edges + [e - 1 for e in edges]
        got = order_buckets(np.array(keys, dtype=np.uint64), count)
        assert got.tolist() == [k * count >> 64 for k in keys]
    with pytest.raises(ValueError):
        order_buckets(np.zeros(1, np.uint64), MAX_BUCKETS + 1)


@pytest.mark.parametrize(
    ("start", "count", "pieces"),
    [
        (0, 5, [(0, 0, 5)]),  # exactly one shard
        (0, 12, [(0, 0, 5), (1, 5, 5), (2, 10, 2)]),
        (3, 9, [(0, 0, 2), (1, 2, 5), (2, 7, 2)]),  # ends of shards begun and ended elsewhere
        (7, 2, [(1, 0, 2)]),  # inside one shard
        (10, 0, []),
    ],
)
def test_a_bucket_is_cut_at_the_global_shard_boundaries(start, count, pieces):
    from wit.ingest.shardplan import shard_pieces

    assert shard_pieces(start, count, 5) == pieces


def test_headers_read_back_with_tarfile():
    import tarfile

    from wit.manifests.tarwrite import ustar_headers

    names = ["a.jpg", "x" * 96 + ".txt", "ü-ключ.json", "0.png"]
    sizes = [0, 1, 8**11 - 1, 123456789]
    headers = ustar_headers(names, sizes)
    assert headers.shape == (4, 512)
    for row, name, size in zip(headers, names, sizes, strict=True):
        info = tarfile.TarInfo.frombuf(row.tobytes(), "utf-8", "surrogateescape")  # checks the checksum
        assert (info.name, info.size, info.mode, info.mtime, info.uid, info.gid) == (name, size, 0o444, 0, 0, 0)
        assert info.isfile()
    from wit.manifests.stage import StageError

    with pytest.raises(StageError, match="longer than"):
        ustar_headers(["y" * 101], [1])
    with pytest.raises(StageError, match="more than"):
        ustar_headers(["big.jpg"], [8**11])


@pytest.mark.parametrize(
    "row",
    [
        {"uid": "ab", "url": "http://h/a.jpg", "page_url": None, "queries": None, "sha256": "00",
         "width": 3, "height": None, "phash": None, "clip_score": None},
        {"uid": "cd", "url": 'http://h/"q"\\ü\n.jpg', "page_url": "http://h/p", "queries": ["cat", "ключ", 'a"b'],
         "sha256": "ff", "width": 640, "height": 480, "phash": "0f0f", "clip_score": 0.12340000271797180},
        {"uid": "ef", "url": "u", "page_url": "p", "queries": [], "sha256": "1", "width": 1, "height": 1,
         "phash": "x", "clip_score": float("nan")},
    ],
)  # fmt: skip
def test_sample_json_is_what_json_dumps_gives(row):
    from wit.manifests.tarwrite import sample_json

    meta = {
        "uid": row["uid"],
        "url": row["url"],
        "page_url": row["page_url"],
        "queries": row["queries"] or [],
        "sha256": row["sha256"],
        "width": row["width"],
        "height": row["height"],
        "scores": {"phash": row["phash"], "clip_score": row["clip_score"]},
    }
    assert sample_json(row) == json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _plan_rows(images: list[bytes], xxh3: bool, ext: str = "jpg"):
    """PLAN rows for ``images`` as they lie, one after another, in one source file."""
    import hashlib

    import pyarrow as pa
    from xxhash import xxh3_128_hexdigest

    from wit.ingest.shardplan import PLAN_ROWS_SCHEMA

    offsets = [sum(map(len, images[:i])) for i in range(len(images))]
    rows = [
        {
            "uid": f"{i:032x}",
            "url": f"http://h/{i}.{ext}",
            "text": f"caption {i}",
            "page_url": None,
            "queries": ["q"],
            "sha256": hashlib.sha256(data).hexdigest(),
            "width": 8,
            "height": 8,
            "phash": None,
            "clip_score": None,
            "ext": ext,
            "source": "src.bin",
            "offset": offsets[i],
            "size": len(data),
            "xxh3": xxh3_128_hexdigest(data) if xxh3 else None,
        }  # fmt: skip
        for i, data in enumerate(images)
    ]
    return pa.Table.from_pylist(rows, schema=PLAN_ROWS_SCHEMA)


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])  # before json, between json and txt, after txt
def test_written_shard_is_the_same_bytes_for_any_buffer_size(tmp_path, monkeypatch, ext):
    """The tar stream goes out through reused buffers; images larger than a buffer are split
    across writes. Any buffer size, and images given as bytes (a remote source) instead of
    local spans, give the same shard, which tarfile reads back member for member."""
    import hashlib
    import tarfile
    from contextlib import ExitStack

    from wit.manifests import tarwrite

    images = [os.urandom(n) for n in (0, 1, 511, 512, 513, 5000, 70000, 3)]
    (tmp_path / "src.bin").write_bytes(b"".join(images))
    rows = _plan_rows(images, xxh3=True, ext=ext)
    written = []
    for buffer in (4 << 20, 4096, 1000):
        monkeypatch.setattr(tarwrite, "BUFFER", buffer)
        for local in (True, False):
            with ExitStack() as stack:
                loaded = tarwrite.load_images(str(tmp_path), rows, stack)
                assert all(isinstance(x, tarwrite.Span) for x in loaded)
                if not local:
                    loaded = [tarwrite.image_bytes(x) for x in loaded]
                out = tmp_path / f"out-{buffer}-{local}.tar"
                info = tarwrite.write_shard(str(out), rows, loaded)
            data = out.read_bytes()
            assert info.sha256 == hashlib.sha256(data).hexdigest() and info.bytes == len(data)
            assert len(data) % (20 * 512) == 0
            written.append(data)
    assert all(w == written[0] for w in written)
    with tarfile.open(tmp_path / "out-1000-True.tar") as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        order = [m.name for m in tar.getmembers()]
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # the archive ends in at least two zero blocks
    assert len(written[0]) - end >= 1024 and written[0][end:] == bytes(len(written[0]) - end)
    for i, data in enumerate(images):
        uid = f"{i:032x}"
        assert got[f"{uid}.{ext}"] == data and got[f"{uid}.txt"] == f"caption {i}".encode()
        assert json.loads(got[f"{uid}.json"])["uid"] == uid
        assert order[3 * i : 3 * i + 3] == sorted(f"{uid}.{e}" for e in (ext, "json", "txt"))


@pytest.mark.parametrize("xxh3", [True, False], ids=["xxh3", "sha256-only"])
@pytest.mark.parametrize("buffer", [4 << 20, 1000])
def test_write_shard_refuses_an_image_filter_did_not_see(tmp_path, monkeypatch, xxh3, buffer):
    """One flipped byte in one source image: caught by filter's xxh3-128, or by its sha256 in a
    manifest from before xxh3 was recorded, whether the image fits a buffer or is split; no
    shard and no temporary file are left."""
    from contextlib import ExitStack

    from wit.manifests import tarwrite
    from wit.manifests.stage import StageError

    monkeypatch.setattr(tarwrite, "BUFFER", buffer)
    images = [os.urandom(n) for n in (3000, 4000, 5000)]
    rows = _plan_rows(images, xxh3=xxh3)
    images[1] = images[1][:100] + bytes([images[1][100] ^ 1]) + images[1][101:]
    (tmp_path / "src.bin").write_bytes(b"".join(images))
    out = tmp_path / "out" / "000000.tar"
    with ExitStack() as stack, pytest.raises(StageError, match=f"{1:032x} is not the one filter saw"):
        tarwrite.write_shard(str(out), rows, tarwrite.load_images(str(tmp_path), rows, stack))
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("buffer", [4 << 20, 1000])
def test_a_source_shorter_than_the_plan_says_is_a_clear_error(tmp_path, monkeypatch, buffer):
    from contextlib import ExitStack

    from wit.manifests import tarwrite
    from wit.manifests.stage import StageError

    monkeypatch.setattr(tarwrite, "BUFFER", buffer)
    images = [os.urandom(n) for n in (3000, 4000)]
    rows = _plan_rows(images, xxh3=True)
    (tmp_path / "src.bin").write_bytes(b"".join(images)[:-10])
    out = tmp_path / "out" / "000000.tar"
    message = f"the image of {1:032x}: its downloaded shard ends inside it"
    with ExitStack() as stack, pytest.raises(StageError, match=message):
        tarwrite.write_shard(str(out), rows, tarwrite.load_images(str(tmp_path), rows, stack))
    assert not list((tmp_path / "out").iterdir())


def test_buffers_are_not_reused_before_their_write_and_hash_are_done(tmp_path, monkeypatch):
    """With the writer and hasher threads slowed down, the main thread fills buffers far ahead
    of them: the shard still comes out byte for byte, with the right sha256."""
    import hashlib
    import time
    from contextlib import ExitStack

    from wit.manifests import tarwrite

    images = [os.urandom(n) for n in (700, 1500, 300, 2500, 900, 100, 1800)]
    (tmp_path / "src.bin").write_bytes(b"".join(images))
    rows = _plan_rows(images, xxh3=True)
    with ExitStack() as stack:
        expected = tarwrite.write_shard(
            str(tmp_path / "fast.tar"), rows, tarwrite.load_images(str(tmp_path), rows, stack)
        )

    real = hashlib.sha256

    class SlowSha:
        def __init__(self):
            self.inner = real()

        def update(self, data):
            time.sleep(0.003)
            self.inner.update(data)

        def hexdigest(self):
            return self.inner.hexdigest()

    write = tarwrite.TarStream._write
    monkeypatch.setattr(tarwrite, "BUFFER", 1024)
    monkeypatch.setattr(tarwrite.TarStream, "_write", lambda self, chunk: (time.sleep(0.002), write(self, chunk)))
    monkeypatch.setattr(tarwrite.hashlib, "sha256", SlowSha)
    with ExitStack() as stack:
        slow = tarwrite.write_shard(str(tmp_path / "slow.tar"), rows, tarwrite.load_images(str(tmp_path), rows, stack))
    assert (tmp_path / "slow.tar").read_bytes() == (tmp_path / "fast.tar").read_bytes()
    assert slow.sha256 == expected.sha256


def test_the_xxh3_is_what_is_checked_when_filter_recorded_one(tmp_path):
    """With an xxh3 recorded, it decides alone: a wrong one refuses the image though its sha256 is
    right, and a right one passes though the recorded sha256 is wrong (the sha256 is then only
    the identity filter gave the bytes)."""
    from contextlib import ExitStack

    import pyarrow as pa

    from wit.manifests import tarwrite
    from wit.manifests.stage import StageError

    images = [os.urandom(n) for n in (3000, 4000)]
    (tmp_path / "src.bin").write_bytes(b"".join(images))
    rows = _plan_rows(images, xxh3=True)

    def with_column(name, values):
        return rows.set_column(rows.schema.get_field_index(name), name, pa.array(values, pa.string()))

    wrong_xxh3 = with_column("xxh3", [rows["xxh3"][0].as_py(), "0" * 32])
    with ExitStack() as stack, pytest.raises(StageError, match=f"{1:032x} is not the one filter saw"):
        tarwrite.write_shard(str(tmp_path / "a.tar"), wrong_xxh3, tarwrite.load_images(str(tmp_path), rows, stack))
    wrong_sha = with_column("sha256", ["0" * 64, "0" * 64])
    with ExitStack() as stack:
        tarwrite.write_shard(str(tmp_path / "b.tar"), wrong_sha, tarwrite.load_images(str(tmp_path), rows, stack))
    assert (tmp_path / "b.tar").exists()


def test_readahead_asks_for_each_local_image_once_in_file_order(tmp_path):
    """The plan's order is shuffled; the readahead hint goes out in file order per source,
    neighbours merged into one range, every local image covered and remote bytes left out."""
    from wit.manifests.tarwrite import Span, readahead_ranges

    a, b = 3, 4  # two source shards' descriptors
    images = [Span(b, 9000, 10), Span(a, 5000, 100), b"remote", Span(a, 0, 1000), Span(a, 1512, 512), Span(b, 0, 7)]
    ranges = readahead_ranges(images, gap=1000)
    assert ranges == [(a, 0, 2024), (a, 5000, 100), (b, 0, 7), (b, 9000, 10)]
    for im in images:
        if isinstance(im, Span):
            assert any(fd == im.fd and off <= im.offset and im.offset + im.size <= off + n for fd, off, n in ranges)
    assert readahead_ranges([Span(a, 0, 10), Span(a, 4, 2)], gap=0) == [(a, 0, 10)]  # one inside another


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_readahead_hints_the_kernel_and_stops_before_the_files_close(tmp_path, monkeypatch):
    """Each range becomes one WILLNEED hint on the real file; leaving the block stops the
    thread before the stack closes the files, so no hint goes to a closed (or reused) fd."""
    import threading
    from contextlib import ExitStack

    from wit.manifests import tarwrite

    path = tmp_path / "src.bin"
    path.write_bytes(os.urandom(1 << 20))
    hinted, started, release = [], threading.Event(), threading.Event()
    real = os.posix_fadvise

    def fadvise(fd, offset, size, advice):
        real(fd, offset, size, advice)  # the call itself, on the real descriptor
        hinted.append((fd, offset, size, advice))
        started.set()
        release.wait(5)
        time.sleep(0.2)  # still in the call when the block is left

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    with ExitStack() as stack:
        fd = os.open(path, os.O_RDONLY)
        stack.callback(os.close, fd)
        images = [tarwrite.Span(fd, k * 200_000, 1000) for k in (4, 0, 2)]
        ra = stack.enter_context(tarwrite.Readahead(images))
        assert started.wait(5)
        release.set()  # the first hint returns 0.2 s later, after the stop is asked for
    assert not ra.thread.is_alive()  # joined before the descriptor closed
    assert hinted == [(fd, 0, 1000, os.POSIX_FADV_WILLNEED)]  # and nothing hinted after the stop
    assert [r[1] for r in ra.ranges] == [0, 400_000, 800_000]  # file order, not the plan's


def test_a_broken_next_shard_costs_the_readahead_hint_not_this_shard(tmp_path):
    """The next shard's images (its pieces, in order) are only hinted; a plan part or row group
    that is missing, or whose source shard is gone, gives no hint and no error (its own
    partition reports it)."""
    from contextlib import ExitStack

    import pyarrow as pa

    from wit.ingest import shardplan

    images = [os.urandom(700), os.urandom(300), os.urandom(500)]
    (tmp_path / "src.bin").write_bytes(b"".join(images))
    rows = _plan_rows(images, xxh3=True)
    plan = str(tmp_path / "plan")
    good = shardplan.write_row_groups(plan, 0, rows, [2, 1]).name  # a shard's piece in each row group
    gone = rows.set_column(rows.schema.get_field_index("source"), "source", pa.array(["gone.bin"] * 3))
    broken = shardplan.write_row_groups(plan, 1, gone, [3]).name
    with ExitStack() as stack:
        found = shardplan.following_images(str(tmp_path), [(f"{plan}/{good}", 1), (f"{plan}/{good}", 0)], stack)
        assert [(s.offset, s.size) for s in found] == [(1000, 500), (0, 700), (700, 300)]  # pieces in order
        assert shardplan.following_images(str(tmp_path), [(f"{plan}/{broken}", 0)], stack) == []
        assert shardplan.following_images(str(tmp_path), [(f"{plan}/{good}", 2)], stack) == []  # no such row group
        assert shardplan.following_images(str(tmp_path), [(f"{plan}/part-00009.parquet", 0)], stack) == []


# O_DIRECT, and /proc/self/fd to tell which file a write goes to
linux_fds = pytest.mark.skipif(not hasattr(os, "O_DIRECT") or not os.path.isdir("/proc/self/fd"), reason="Linux only")


def _writes_into(folder, monkeypatch, refuse_direct: bool = False) -> list[tuple[int, int, bool]]:
    """Record ``(offset, length, O_DIRECT on)`` of every ``os.write`` into a file under ``folder``
    (the shard's temporary file); with ``refuse_direct``, each write with O_DIRECT on fails
    with EINVAL, as on a file system that takes the flag but not the I/O."""
    import errno
    import fcntl

    real = os.write
    seen: list[tuple[int, int, bool]] = []

    def write(fd, data):
        if fd > 2 and os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
            direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
            if direct and refuse_direct:
                raise OSError(errno.EINVAL, "Invalid argument")
            seen.append((os.lseek(fd, 0, os.SEEK_CUR), len(data), direct))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return seen


@linux_fds
@pytest.mark.parametrize("buffer", [4 << 20, 8192, 1000])
def test_a_durable_shard_goes_to_disk_with_o_direct_in_whole_blocks(tmp_path, monkeypatch, buffer):
    """With WIT_FSYNC=1 the buffers are written with O_DIRECT, in whole blocks at whole-block
    offsets, only the last partial block through the page cache; without it, nothing is direct.
    Either way the shard is the same bytes. A buffer size that is not whole blocks, or a file
    system that refuses the flag, writes through the page cache."""
    import hashlib
    from contextlib import ExitStack

    from wit.manifests import tarwrite

    monkeypatch.setattr(tarwrite, "BUFFER", buffer)
    images = [os.urandom(n) for n in (5000, 70000, 511, 12000, 3)]
    (tmp_path / "src.bin").write_bytes(b"".join(images))
    rows = _plan_rows(images, xxh3=True)
    probe = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT)
    supported = tarwrite.set_direct(probe, True)
    os.close(probe)
    shards = {}
    for durable in ("0", "1"):
        monkeypatch.setenv("WIT_FSYNC", durable)
        folder = tmp_path / f"out{durable}"
        with monkeypatch.context() as m, ExitStack() as stack:
            writes = _writes_into(folder, m)
            info = tarwrite.write_shard(
                str(folder / "000000.tar"), rows, tarwrite.load_images(str(tmp_path), rows, stack)
            )
        shards[durable] = data = (folder / "000000.tar").read_bytes()
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert sum(n for _, n, _ in writes) == len(data)
        direct = [(at, n) for at, n, d in writes if d]
        if durable == "0" or not supported or buffer % tarwrite.DIRECT_ALIGN:
            assert not direct
            continue
        assert all(at % tarwrite.DIRECT_ALIGN == 0 and n % tarwrite.DIRECT_ALIGN == 0 for at, n in direct)
        assert len(data) - sum(n for _, n in direct) < tarwrite.DIRECT_ALIGN  # only the last block buffered
        assert all(d for _, _, d in writes[: len(direct)])  # and it is the last write
    assert shards["0"] == shards["1"]


@linux_fds
def test_a_refused_direct_write_goes_through_the_page_cache(tmp_path, monkeypatch):
    """A file system that takes O_DIRECT but refuses the writes (EINVAL): the shard is written
    through the page cache instead, the same bytes with the right sha256, not an error."""
    import hashlib
    from contextlib import ExitStack

    from wit.manifests import tarwrite

    monkeypatch.setattr(tarwrite, "BUFFER", 8192)
    images = [os.urandom(n) for n in (5000, 30000, 12000)]
    (tmp_path / "src.bin").write_bytes(b"".join(images))
    rows = _plan_rows(images, xxh3=True)
    with ExitStack() as stack:
        plain = tarwrite.write_shard(
            str(tmp_path / "plain.tar"), rows, tarwrite.load_images(str(tmp_path), rows, stack)
        )
    monkeypatch.setenv("WIT_FSYNC", "1")
    folder = tmp_path / "out"
    with ExitStack() as stack:
        writes = _writes_into(folder, monkeypatch, refuse_direct=True)
        info = tarwrite.write_shard(str(folder / "000000.tar"), rows, tarwrite.load_images(str(tmp_path), rows, stack))
    assert (folder / "000000.tar").read_bytes() == (tmp_path / "plain.tar").read_bytes()
    assert info.sha256 == plain.sha256 == hashlib.sha256((folder / "000000.tar").read_bytes()).hexdigest()
    assert writes and not any(d for _, _, d in writes)
