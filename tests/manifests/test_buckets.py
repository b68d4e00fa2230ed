"""Bucket files: batch b holds exactly the rows of bucket b, in their order, locally and on S3."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from wit.manifests import buckets
from wit.manifests.manifest import in_digest


def _table(n: int) -> pa.Table:
    return pa.table({"x": pa.array(np.arange(n)), "s": pa.array([f"r{i}" for i in range(n)])})


def _check(url: str, table: pa.Table, which: np.ndarray, count: int, probe: list[int]) -> None:
    for b in probe:
        want = table.filter(pa.array(which == b))
        assert buckets.read(url, b).equals(want), b


def test_each_batch_is_its_bucket_in_row_order(tmp_path):
    table = _table(500)
    which = np.random.default_rng(0).integers(0, 9, 500)
    info = buckets.write(str(tmp_path), 3, table, which, 9, "keys")
    assert info.name == "keys/part-00003.arrow" and in_digest(info.name) and info.rows == 500
    _check(str(tmp_path / info.name), table, which, 9, list(range(9)))
    got = buckets.read_all([str(tmp_path / info.name)] * 2, 4, table.schema, "source")
    assert got.column("source").to_pylist() == [0] * int((which == 4).sum()) + [1] * int((which == 4).sum())
    with pytest.raises(ValueError, match="9 buckets"):
        buckets.read(str(tmp_path / info.name), 9)


def test_more_buckets_than_sixteen_bits_hold(tmp_path):
    # files split by input part can have more batches than key buckets: 65,536 must not wrap to 0
    table = _table(6)
    which = np.array([0, 65_536, 1, 65_537, 0, 70_000])
    info = buckets.write(str(tmp_path), 0, table, which, 70_001, "parts")
    _check(str(tmp_path / info.name), table, which, 70_001, [0, 1, 65_536, 65_537, 70_000, 5])


def test_remote_bucket_files_read_the_same(s3_bucket):
    table = _table(300)
    which = np.random.default_rng(1).integers(0, 5, 300)
    info = buckets.write(s3_bucket, 0, table, which, 5, "keys")
    _check(f"{s3_bucket}/{info.name}", table, which, 5, list(range(5)))


def test_bucket_numbers_spread_structured_keys():
    keys = np.arange(50_000, dtype=np.uint64)  # structured keys (perceptual hashes cluster)
    spread = np.bincount(buckets.of_keys(keys, 8), minlength=8)
    assert spread.min() > 5_800 and spread.max() < 6_700
    assert buckets.bucket_count(1_000_001) == 3 and buckets.bucket_count(0) == 1 and buckets.bucket_count(5, 7) == 7
