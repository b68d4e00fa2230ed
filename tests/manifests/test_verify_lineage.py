"""verify catches every changed, missing or extra byte; lineage walks a three-stage chain."""

from __future__ import annotations

import json

import pytest

from wit.manifests import storage
from wit.manifests.lineage import lineage, render
from wit.manifests.verify import verify

from toy_stages import run_chain


@pytest.fixture(params=["local", "s3"])
def chain_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket") + "/chain"


def _flip_byte(url: str, offset: int) -> None:
    data = bytearray(storage.read_bytes(url))
    data[offset] ^= 0x01
    storage.write_bytes(url, bytes(data))


def test_clean_outputs_verify(chain_root):
    refs = run_chain(chain_root)
    for ref in refs.values():
        report = verify(ref.url)
        assert report.ok, [str(p) for p in report.problems]
        assert report.checked > 0


def test_flipped_byte_in_a_shard_and_deleted_part_are_reported(chain_root):
    refs = run_chain(chain_root)
    pack = refs["pack"].url
    _flip_byte(storage.join(pack, "shards/000001.tar"), 700)
    storage.remove(storage.join(pack, "part-00002.parquet"))
    storage.write_bytes(storage.join(pack, "shards/999999.tar"), b"stray")
    problems = {(p.kind, p.name) for p in verify(pack).problems}
    assert ("changed", "shards/000001.tar") in problems
    assert ("shard_index", "shards/000001.tar") in problems
    assert ("missing", "part-00002.parquet") in problems
    assert ("extra", "shards/999999.tar") in problems


def test_changed_part_file_is_reported(chain_root):
    refs = run_chain(chain_root)
    _flip_byte(storage.join(refs["tag"].url, "part-00000.parquet"), 10)
    problems = [(p.kind, p.name) for p in verify(refs["tag"].url).problems]
    assert problems == [("changed", "part-00000.parquet")]


def test_lineage_of_a_three_stage_chain(chain_root):
    refs = run_chain(chain_root)
    node = lineage(refs["pack"].url)
    assert [n.record.stage for n in node.walk()] == ["toy-pack", "toy-tag", "toy-source"]
    assert all(n.status == "ok" for n in node.walk())
    text = render(node)
    for stage in ("toy-pack", "toy-tag", "toy-source"):
        assert stage in text
    assert refs["source"].digest[:12] in text


def test_lineage_flags_an_upstream_output_changed_since_it_was_read(tmp_path):
    refs = run_chain(str(tmp_path))
    rec_url = storage.join(refs["source"].url, "_run.json")
    rec = json.loads(storage.read_text(rec_url))
    rec["output"]["digest"] = "0" * 64  # as if the source stage had been re-run with other data
    storage.write_text(rec_url, json.dumps(rec))
    node = lineage(refs["pack"].url)
    statuses = {n.record.stage: n.status for n in node.walk()}
    assert statuses == {"toy-pack": "ok", "toy-tag": "ok", "toy-source": "changed"}
    assert "CHANGED" in render(node)


def test_unfinished_folder_verifies_as_unfinished(tmp_path):
    refs = run_chain(str(tmp_path))
    storage.remove(storage.join(refs["tag"].url, "_run.json"))
    assert [p.kind for p in verify(refs["tag"].url).problems] == ["unfinished"]
