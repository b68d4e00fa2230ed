"""Regression tests: killed writers' leftovers, overlapping attempts, malformed records, S3 folders."""

from __future__ import annotations

import json
import os
import stat

import pytest

from wit.manifests import storage
from wit.manifests.manifest import ManifestError, ManifestRef
from wit.manifests.runrecord import read_run_record
from wit.manifests.stage import StageError, committed, finalize
from wit.manifests.verify import verify
from wit.pipeline.executor import run_stage

from toy_stages import SourceConfig, TagConfig, ToySource, ToyTag, run_chain


def test_leftover_temporary_of_a_killed_writer_is_swept_and_never_extra(tmp_path, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setenv("TOY_FAIL_PARTITION", "1")
    with pytest.raises(RuntimeError):
        run_stage(ToySource(), SourceConfig(parts=3), [], str(out), progress=False)
    # what a SIGKILL between write and rename leaves behind
    leftover = out / f"{storage.TMP_PREFIX}0123456789ab-part-00001.parquet"
    leftover.write_bytes(b"half a parquet file")
    monkeypatch.delenv("TOY_FAIL_PARTITION")
    run_stage(ToySource(), SourceConfig(parts=3), [], str(out), progress=False)
    assert not leftover.exists()
    assert verify(str(out)).ok


def test_marker_that_does_not_match_its_file_is_refused_and_redone(tmp_path):
    out = tmp_path / "o"
    cfg = SourceConfig(parts=2, rows_per_part=3)
    run_stage(ToySource(), cfg, [], str(out), progress=False)
    (out / "_run.json").unlink()
    # an overlapping attempt replaced the part after partition 0's marker was written
    other = run_stage(ToySource(), SourceConfig(parts=2, rows_per_part=4), [], str(tmp_path / "x"), progress=False)
    (out / "part-00000.parquet").write_bytes((tmp_path / "x" / "part-00000.parquet").read_bytes())
    with pytest.raises(StageError, match="other bytes than its marker"):
        finalize(ToySource(), cfg, [], str(out), 2)
    assert committed(str(out)) == {1}
    done = run_stage(ToySource(), cfg, [], str(out), progress=False)
    assert done.ran == 1 and verify(str(out)).ok
    assert done.ref.digest != other.ref.digest


@pytest.mark.parametrize(
    "record",
    [
        {"stage": "x", "output": {"url": "u"}, "files": []},
        {"stage": "x", "output": {"url": "u"}, "counts": [1]},
        {"stage": "x", "output": {"url": "u", "digest": 5}},
        {"stage": "x", "output": "u"},
        {"stage": "x", "output": {"url": "u"}, "inputs": ["a"]},
    ],
)
def test_malformed_run_record_is_a_manifest_error(tmp_path, record, run_wit):
    refs = run_chain(str(tmp_path))
    (tmp_path / "tag" / "_run.json").write_text(json.dumps(record))
    with pytest.raises(ManifestError, match="malformed run record"):
        read_run_record(refs["tag"].url)
    for cmd in ("show", "verify", "lineage"):
        proc = run_wit("manifest", cmd, refs["tag"].url)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (cmd, proc.stderr)


def test_run_record_that_is_not_utf8(tmp_path):
    refs = run_chain(str(tmp_path))
    (tmp_path / "tag" / "_run.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_run_record(refs["tag"].url)


def test_verify_and_lineage_accept_the_run_record_url(tmp_path):
    refs = run_chain(str(tmp_path))
    assert verify(storage.join(refs["tag"].url, "_run.json")).ok
    from wit.manifests.lineage import lineage

    assert lineage(storage.join(refs["pack"].url, "_run.json")).record.stage == "toy-pack"


def test_s3_folder_placeholder_objects_are_not_extra_files(s3_bucket, s3_env):
    import boto3

    refs = run_chain(f"{s3_bucket}/c")
    boto3.client("s3").put_object(Bucket=s3_bucket[5:], Key="c/pack/shards/", Body=b"")
    assert verify(refs["pack"].url).ok


def test_inputs_must_be_finished_and_are_recorded_with_their_digest(tmp_path, monkeypatch):
    src = str(tmp_path / "src")
    monkeypatch.setenv("TOY_FAIL_PARTITION", "1")
    with pytest.raises(RuntimeError):
        run_stage(ToySource(), SourceConfig(parts=2), [], src, progress=False)
    with pytest.raises(ManifestError, match="not a finished wit output"):
        run_stage(ToyTag(), TagConfig(), [ManifestRef(src)], str(tmp_path / "tag"), progress=False)
    monkeypatch.delenv("TOY_FAIL_PARTITION")
    done = run_stage(ToySource(), SourceConfig(parts=2), [], src, progress=False)
    # a bare relative URL is resolved: normalized, with kind and digest from the run record
    monkeypatch.chdir(tmp_path)
    run_stage(ToyTag(), TagConfig(), [ManifestRef("src")], "tag", progress=False)
    assert read_run_record(str(tmp_path / "tag")).inputs == [done.ref]
    with pytest.raises(StageError, match="changed since"):
        run_stage(ToyTag(), TagConfig(), [ManifestRef("src", digest="0" * 64)], "tag2", progress=False)


def test_atomic_writer_files_are_readable_by_others(tmp_path):
    with storage.atomic_writer(str(tmp_path / "a.bin")) as fh:
        fh.write(b"x")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode)
    assert mode & stat.S_IROTH, oct(mode)
