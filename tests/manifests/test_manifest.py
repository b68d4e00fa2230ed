"""Part files, schemas, digests and reading manifests back; bad input gives one clear error."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit.manifests import schemas
from wit.manifests.manifest import (
    ManifestError,
    current_digest,
    digest_of,
    open_manifest,
    read_frame,
    write_part,
)


def _curated(n: int, start: int = 0) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "uid": f"{i:032x}",
                "url": f"http://h/{i}.jpg",
                "text": f"a red circle {i}",
                "queries": ["red circle"],
                "keep": i % 3 != 0,
                "reason": None if i % 3 else "no_query_match",
            }
            for i in range(start, start + n)
        ]
    )


def test_every_design_kind_has_a_schema_with_the_core_columns():
    assert set(schemas.SCHEMAS) == {
        "candidates",
        "curated",
        "downloaded",
        "filtered",
        "samples",
        "shards",
        "eval_results",
    }
    for kind in ("candidates", "curated", "downloaded", "filtered", "samples"):
        names = schemas.schema_for(kind).names
        assert {"uid", "url", "text"} <= set(names), kind
    assert {"keep", "reason", "queries"} <= set(schemas.CURATED.names)
    assert {"status", "sha256", "width", "height", "shard", "key"} <= set(schemas.DOWNLOADED.names)
    assert {"shard", "sha256"} <= set(schemas.SHARDS.names)


def test_write_then_read_round_trip_with_kind(tmp_path):
    out = str(tmp_path / "m")
    a = write_part(out, 0, _curated(4), schemas.CURATED)
    b = write_part(out, 1, _curated(3, start=4), schemas.CURATED)
    m = open_manifest(out)
    assert m.kind == "curated" and m.parts == ["part-00000.parquet", "part-00001.parquet"]
    frame = read_frame(out)
    assert len(frame) == 7 and list(frame.columns) == schemas.CURATED.names
    assert frame["page_url"].isna().all()  # missing nullable column written as nulls
    assert frame.loc[0, "reason"] == "no_query_match"
    assert current_digest(out) == digest_of({a.name: a.sha256, b.name: b.sha256})
    with pytest.raises(ManifestError, match="expected downloaded"):
        open_manifest(out, expect_kind="downloaded")


def test_parts_are_deterministic_bytes(tmp_path):
    a = write_part(str(tmp_path / "a"), 0, _curated(5), schemas.CURATED)
    b = write_part(str(tmp_path / "b"), 0, _curated(5), schemas.CURATED)
    assert a.sha256 == b.sha256


def test_digest_changes_with_any_part(tmp_path):
    base = digest_of({"part-00000.parquet": "a" * 64, "part-00001.parquet": "b" * 64})
    assert base != digest_of({"part-00000.parquet": "a" * 64, "part-00001.parquet": "c" * 64})
    assert base != digest_of({"part-00000.parquet": "a" * 64})
    assert base == digest_of({"part-00001.parquet": "b" * 64, "part-00000.parquet": "a" * 64, "x.tar": "z"})


def test_conform_refuses_unknown_columns_and_missing_required(tmp_path):
    with pytest.raises(ValueError, match="not in the curated schema: bogus"):
        write_part(str(tmp_path), 0, _curated(2).append_column("bogus", pa.array([1, 2])), schemas.CURATED)
    with pytest.raises(ValueError, match="'keep' is required"):
        write_part(str(tmp_path), 0, _curated(2).drop_columns(["keep"]), schemas.CURATED)


def test_not_a_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no part-NNNNN.parquet"):
        open_manifest(str(tmp_path / "empty"))
    with pytest.raises(ManifestError, match="no such manifest"):
        open_manifest(str(tmp_path / "nowhere"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ManifestError, match="not a manifest folder"):
        open_manifest(str(tmp_path / "file.txt"))


def test_part_with_wrong_schema(tmp_path):
    out = tmp_path / "m"
    write_part(str(out), 0, _curated(3), schemas.CURATED)
    pq.write_table(pa.table({"uid": ["a"], "other": [1]}), out / "part-00001.parquet")
    with pytest.raises(ManifestError, match="part-00001.parquet: schema does not match"):
        open_manifest(str(out))


def test_a_part_of_another_manifest_format_is_refused_naming_both_versions(tmp_path):
    out = tmp_path / "m"
    write_part(str(out), 0, _curated(3), schemas.CURATED)
    write_part(str(out), 1, _curated(3, start=3), schemas.CURATED)
    assert open_manifest(str(out)).num_rows == 6
    part = out / "part-00001.parquet"
    table = pq.read_table(part)
    meta = dict(table.schema.metadata)
    meta[schemas.VERSION_KEY] = b"0"
    pq.write_table(table.replace_schema_metadata(meta), part)
    v = schemas.SCHEMA_VERSION
    expected = f"part-00001.parquet: written by manifest format 0; this wit reads manifest format {v} only"
    with pytest.raises(ManifestError, match=expected):
        open_manifest(str(out))
    del meta[schemas.VERSION_KEY]
    pq.write_table(table.replace_schema_metadata(meta), part)
    with pytest.raises(ManifestError, match="written by a wit without manifest format versions"):
        open_manifest(str(out))
    # a table a user wrote (no kind) carries no version and opens as before
    pq.write_table(pa.table({"uid": ["a"], "url": ["http://x/a.jpg"]}), tmp_path / "mine.parquet")
    (tmp_path / "user").mkdir()
    (tmp_path / "mine.parquet").rename(tmp_path / "user" / "part-00000.parquet")
    assert open_manifest(str(tmp_path / "user")).num_rows == 1


def test_a_part_without_a_column_of_its_kind_is_refused_not_read_as_nulls(tmp_path):
    """No part is read with a column filled in: one that lacks a nullable column its kind has is
    refused with the columns named, as one with a column too many is."""
    out = tmp_path / "m"
    write_part(str(out), 0, _curated(3), schemas.CURATED)
    write_part(str(out), 1, _curated(3, start=3), schemas.CURATED)
    part = out / "part-00001.parquet"
    table = pq.read_table(part)
    pq.write_table(table.drop_columns(["lang", "reason"]), part)
    lacks = r"part-00001.parquet: schema does not match the curated's \(lacks lang, reason\)"
    with pytest.raises(ManifestError, match=lacks):
        open_manifest(str(out))
    pq.write_table(table.append_column("extra", pa.array([1, 2, 3])), part)
    with pytest.raises(ManifestError, match=r"\(has extra too\)"):
        open_manifest(str(out))


def test_truncated_part(tmp_path):
    out = tmp_path / "m"
    write_part(str(out), 0, _curated(50), schemas.CURATED)
    data = (out / "part-00000.parquet").read_bytes()
    (out / "part-00000.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        open_manifest(str(out))


def test_manifest_on_s3_reads_as_dataset(s3_bucket):
    out = f"{s3_bucket}/curated"
    write_part(out, 0, _curated(4), schemas.CURATED)
    write_part(out, 1, _curated(4, start=4), schemas.CURATED)
    m = open_manifest(out)
    assert m.kind == "curated" and m.num_rows == 8
    kept = m.dataset().to_table(filter=pa.compute.field("keep")).num_rows
    assert kept == sum(1 for i in range(8) if i % 3)
