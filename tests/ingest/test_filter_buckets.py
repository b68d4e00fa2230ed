"""The bucketed GROUP (exact, nodes, edges, links, resolve) decides exactly what the single-process
leader clustering (``group_decisions``, today's reference) decides, for any bucket and worker count."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from wit.ingest import neardup
from wit.ingest.filter import (
    FILTER_PHASES,
    SCAN_KIND,
    SCAN_SCHEMA,
    FilterConfig,
    group_decisions,
    group_plan,
    reference_hashes,
    scan_result,
)
from wit.ingest.imaging import hash_hex
from wit.manifests.manifest import open_manifest
from wit.manifests.stage import Partition
from wit.pipeline.executor import run_phases, run_stage


class GivenScan:
    """A scan phase whose rows are given (generated hashes instead of downloaded images)."""

    name = "filter-scan"
    kind = SCAN_KIND
    schema = SCAN_SCHEMA

    def __init__(self, parts: list[list[dict]], count: int):
        self.parts, self.count = parts, count

    def partitions(self, config, inputs):
        return [Partition(index=i, source=f"given#{i}") for i in range(len(self.parts))]

    def run_partition(self, config, partition, out):
        table = pa.Table.from_pylist(self.parts[partition.index], schema=SCAN_SCHEMA)
        counts = {"kept": sum(r["reason"] is None for r in self.parts[partition.index])}
        plan = group_plan(sum(len(p) for p in self.parts), config)
        return scan_result(table, counts, partition.index, plan, out, {})


def _flip(code: int, bits: list[int]) -> int:
    for b in bits:
        code ^= 1 << b
    return code


def planted_rows(rng: random.Random, refs: list[int], n_random: int = 300) -> list[dict]:
    """Random hashes, chains, exact-duplicate groups, shared placeholders, eval overlaps and a
    skewed band (many distinct hashes with the same 48 high bits)."""
    codes: list[tuple[int, str | None]] = []  # (phash, sha256 or None for a fresh one)
    codes += [(rng.getrandbits(64), None) for _ in range(n_random)]
    for _ in range(8):  # chains: each step 3 bits from the last, the ends far apart
        code = rng.getrandbits(64)
        for _ in range(rng.randint(3, 7)):
            code = _flip(code, rng.sample(range(64), 3))
            codes.append((code, None))
    for g in range(6):  # exact duplicate groups (same bytes: same sha256 and phash), some near others
        code = rng.getrandbits(64) if g % 2 else codes[rng.randrange(len(codes))][0] ^ (1 << rng.randrange(64))
        codes += [(code, f"{0xE0 + g:064x}")] * rng.randint(2, 5)
    placeholder = rng.getrandbits(64)  # the same hash from different bytes
    codes += [(placeholder, None)] * 25 + [(_flip(placeholder, [1, 9]), None)] * 3
    for ref in refs:  # near an evaluation image
        codes.append((_flip(ref, rng.sample(range(64), rng.randint(0, 3))), None))
    high = rng.getrandbits(48) << 16  # the skewed band
    codes += [(high | rng.getrandbits(16), None) for _ in range(120)]
    rows = []
    for i, (code, sha) in enumerate(codes):
        rows.append(
            {
                "uid": f"{rng.getrandbits(64):016x}",
                "url": f"http://h/{i}",
                "sha256": sha or f"{rng.getrandbits(256):064x}",
                "phash": hash_hex(code),
                "reason": None,
            }
        )
    rows += [{"uid": f"{rng.getrandbits(64):016x}", "url": "http://h/x", "reason": "too_small"} for _ in range(5)]
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refs") / "shape"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        img = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        (folder / f"{i}.png").write_bytes(buf.getvalue())
    return str(folder), reference_hashes(str(folder), 10**8)


def _outcome(url: str) -> dict[str, tuple]:
    t = open_manifest(url).table(["uid", "reason", "duplicate_of"])
    return {
        u: (r, d) for u, r, d in zip(*(t.column(c).to_pylist() for c in ("uid", "reason", "duplicate_of")), strict=True)
    }


@pytest.mark.parametrize("distance", [4, 2, 0])
def test_bucketed_group_decides_as_leader_clustering(references, tmp_path, distance):
    ref_url, ref_codes = references
    rows = planted_rows(random.Random(distance), ref_codes)
    config = FilterConfig(near_duplicate_distance=distance, reference_images=(f"shape={ref_url}",))
    want = group_decisions(pa.Table.from_pylist(rows), [("shape", ref_codes)], config)
    planted = {"duplicate", "near_duplicate", "eval_overlap:shape"} if distance else {"duplicate", "eval_overlap:shape"}
    assert {d.reason for d in want.values()} >= planted
    expected = {r["uid"]: (r["reason"], None) for r in rows}
    expected |= {u: (d.reason, d.duplicate_of) for u, d in want.items()}
    # the last part has no eligible row; 50 buckets are more than some phases have rows
    eligible, ineligible = [r for r in rows if r["reason"] is None], [r for r in rows if r["reason"]]
    parts = [eligible[i::3] for i in range(3)] + [ineligible]
    digests = set()
    for count, workers in ((1, 1), (3, 1), (7, 2), (50, 1)):
        out = tmp_path / f"b{count}"
        cfg = FilterConfig(near_duplicate_distance=distance, reference_images=config.reference_images, buckets=count)
        scan = run_stage(GivenScan(parts, count), cfg, [], str(out / "_scan"), progress=False).ref
        done = run_phases(FILTER_PHASES[1:], cfg, [scan], str(out), workers=workers, progress=False)
        assert _outcome(done.ref.url) == expected, (count, workers)
        digests.add(done.ref.digest)
    assert len(digests) == 1


def test_layouts_find_every_pair():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, 60, dtype=np.uint64)
    flips = [np.uint64(1) << np.uint64(b) for b in range(64)]
    near = [int(b) ^ int(flips[i]) ^ int(flips[(i * 7 + 3) % 64]) for i, b in enumerate(base)]
    hashes = np.array(list(base) + near + list(rng.integers(0, 2**63, 200, dtype=np.uint64)), dtype=np.uint64)
    u = np.unique(hashes)
    for distance in (0, 1, 2, 4, 5):
        brute = {
            (int(u[i]), int(u[j]))
            for i in range(len(u))
            for j in range(i + 1, len(u))
            if (int(u[i]) ^ int(u[j])).bit_count() <= distance
        }
        for blocks in range(distance + 1, distance + 4):
            a, b = neardup.near_pairs(hashes, neardup.Layout(distance, blocks))
            assert set(zip(a.tolist(), b.tolist(), strict=True)) == brute, (distance, blocks)


def test_layout_widens_keys_as_the_count_grows():
    small, large = neardup.choose_layout(4, 10**6), neardup.choose_layout(4, 4 * 10**8)
    assert large.key_bits > small.key_bits
    assert neardup.estimated_ns(large, 4 * 10**8) < 4 * neardup.estimated_ns(small, 10**6)


def _sequential_leaders(rank, a, b):
    n = len(rank)
    neighbours = [set() for _ in range(n)]
    for x, y in zip(a, b, strict=True):
        neighbours[x].add(y)
        neighbours[y].add(x)
    leader = [-1] * n
    is_leader = [False] * n
    for node in sorted(range(n), key=lambda i: rank[i]):
        earlier = sorted((q for q in neighbours[node] if rank[q] < rank[node] and is_leader[q]), key=lambda q: rank[q])
        if earlier:
            leader[node] = earlier[0]
        else:
            is_leader[node] = True
    return leader


@pytest.mark.parametrize("seed", range(4))
def test_leader_rounds_match_the_sequential_rule(seed):
    rng = np.random.default_rng(seed)
    n = 300
    a = list(rng.integers(0, n, 700))
    b = list(rng.integers(0, n, 700))
    chain = list(range(200, 260))  # a long chain visited in order: one round per link
    a += chain[:-1]
    b += chain[1:]
    pairs = {(min(x, y), max(x, y)) for x, y in zip(a, b, strict=True) if x != y}
    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    rank = rng.permutation(n)
    rank[200:260] = np.sort(rank[200:260])
    assert neardup.leaders(rank, a, b).tolist() == _sequential_leaders(rank.tolist(), a.tolist(), b.tolist())


def _union_find_labels(a, b) -> dict[int, int]:
    parent: dict[int, int] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a, b, strict=True):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    smallest: dict[int, int] = {}
    for x in parent:
        smallest[find(x)] = min(smallest.get(find(x), x), x)
    return {x: smallest[find(x)] for x in parent}


@pytest.mark.parametrize("seed", range(3))
def test_star_rounds_find_the_components(seed):
    rng = np.random.default_rng(seed)
    n = 400
    a, b = rng.integers(0, n, 300), rng.integers(0, n, 300)
    chain = rng.permutation(np.arange(1000, 1300))  # a long path in random node order: many rounds
    a, b = np.concatenate([a, chain[:-1]]), np.concatenate([b, chain[1:]])
    keep = a != b
    a, b = a[keep].astype(np.uint64), b[keep].astype(np.uint64)
    node, label = neardup.components(a, b)
    assert dict(zip(node.tolist(), label.tolist(), strict=True)) == _union_find_labels(a.tolist(), b.tolist())


def chain_rows(rng: random.Random, length: int) -> list[dict]:
    """One chain of ``length`` hashes, each 3 bits from the one before (the ends far apart), in
    random uid order, and a few random rows."""
    code, codes = rng.getrandbits(64), []
    for _ in range(length):
        code = _flip(code, rng.sample(range(64), 3))
        codes.append(code)
    codes += [rng.getrandbits(64) for _ in range(20)]
    return [
        {"uid": f"{rng.getrandbits(64):016x}", "url": f"http://h/{i}", "sha256": f"{rng.getrandbits(256):064x}",
         "phash": hash_hex(c), "reason": None}
        for i, c in enumerate(codes)
    ]  # fmt: skip


def test_a_long_chain_takes_many_rounds_and_a_killed_round_resumes(tmp_path, monkeypatch):
    from wit.ingest.filter import STAR
    from wit.manifests.stage import StageError

    rows = chain_rows(random.Random(7), 150)
    config = FilterConfig(near_duplicate_distance=4, buckets=4)
    want = group_decisions(pa.Table.from_pylist(rows), [], config)
    assert sum(d.reason == "near_duplicate" for d in want.values()) > 40
    expected = {r["uid"]: (None, None) for r in rows} | {u: (d.reason, d.duplicate_of) for u, d in want.items()}
    parts = [rows[i::2] for i in range(2)]

    clean = run_stage(GivenScan(parts, 4), config, [], str(tmp_path / "clean" / "_scan"), progress=False).ref
    done = run_phases(FILTER_PHASES[1:], config, [clean], str(tmp_path / "clean"), progress=False)
    assert _outcome(done.ref.url) == expected
    rounds = sorted(p.name for p in (tmp_path / "clean" / "_star").iterdir())
    assert len(rounds) >= 6 and rounds[0] == "r000"

    # a kill in the fourth round: the run again resumes there and ends with the same bytes
    real = type(STAR).run_partition

    def dies_in_round_3(self, cfg, partition, out):
        if partition.params[1] == 3 and partition.index == 2:
            raise StageError("killed")
        return real(self, cfg, partition, out)

    scan = run_stage(GivenScan(parts, 4), config, [], str(tmp_path / "killed" / "_scan"), progress=False).ref
    monkeypatch.setattr(type(STAR), "run_partition", dies_in_round_3)
    with pytest.raises(StageError, match="killed"):
        run_phases(FILTER_PHASES[1:], config, [scan], str(tmp_path / "killed"), progress=False)
    assert not (tmp_path / "killed" / "_star" / "r004").exists()
    monkeypatch.undo()
    again = run_phases(FILTER_PHASES[1:], config, [scan], str(tmp_path / "killed"), workers=2, progress=False)
    assert again.ref.digest == done.ref.digest


@pytest.mark.parametrize("fraction,min_score", [(0.3, None), (0.55, -0.25), (None, 0.0), (1.0, None)])
def test_the_clip_threshold_from_bucket_histograms_is_the_exact_quantile(tmp_path, fraction, min_score):
    from wit.ingest.clipscore import score_threshold
    from wit.manifests.runrecord import read_run_record

    rng = random.Random(11)
    rows = planted_rows(rng, [], n_random=200)
    values = np.float32([-0.5, -0.25, -0.0, 0.0, 0.125, 0.3, 0.3, 0.3])  # ties, signed zeros, negatives
    for i, r in enumerate(rows):
        if r["reason"] is None:
            r["clip_score"] = float(values[i % len(values)] if i % 3 == 0 else np.float32(rng.uniform(-1, 1)))
    options = {"clip_checkpoint": "ckpt.pt", "clip_checkpoint_sha256": "0" * 64}
    config = FilterConfig(**options, keep_top_fraction=fraction, min_clip_score=min_score)
    dups = group_decisions(pa.Table.from_pylist(rows), [], config)
    kept = [r for r in rows if r["reason"] is None and r["uid"] not in dups]
    threshold = score_threshold([r["clip_score"] for r in kept], min_score, fraction)
    low = {r["uid"] for r in kept if r["clip_score"] < threshold}
    assert len(low) < len(kept) and (low or fraction == 1.0)  # 1.0: everything stays
    parts = [rows[i::3] for i in range(3)]
    for count in (1, 4):
        cfg = FilterConfig(**options, keep_top_fraction=fraction, min_clip_score=min_score, buckets=count)
        scan = run_stage(GivenScan(parts, count), cfg, [], str(tmp_path / f"b{count}" / "_scan"), progress=False).ref
        done = run_phases(FILTER_PHASES[1:], cfg, [scan], str(tmp_path / f"b{count}"), progress=False)
        got = {u for u, (reason, _) in _outcome(done.ref.url).items() if reason == "low_clip_score"}
        assert got == low, count
        assert read_run_record(str(tmp_path / f"b{count}" / "_group")).extra["clip_threshold"] == [threshold]
