"""Regression tests: killed writers' leftovers, overlapping attempts, malformed records, S3 folders."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

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
    monkeypatch.setenv("WIT_TOY_FAIL_PARTITION", "1")
    with pytest.raises(RuntimeError):
        run_stage(ToySource(), SourceConfig(parts=3), [], str(out), progress=False)
    # what a SIGKILL between write and rename leaves behind: a temporary named for a writer that is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = storage.tmp_prefix().replace(f".{os.getpid()}.", f".{dead.pid}.", 1)
    leftover = out / f"{owner}0123456789ab-part-00001.parquet"
    leftover.write_bytes(b"half a parquet file")
    # and one of an older wit (no writer in its name), idle for longer than WIT_TMP_MAX_AGE
    legacy = out / f"{storage.TMP_PREFIX}0123456789ab-part-00002.parquet"
    legacy.write_bytes(b"half a parquet file")
    os.utime(legacy, (time.time() - 2 * storage.TMP_MAX_AGE,) * 2)
    monkeypatch.delenv("WIT_TOY_FAIL_PARTITION")
    run_stage(ToySource(), SourceConfig(parts=3), [], str(out), progress=False)
    assert not leftover.exists() and not legacy.exists()
    assert verify(str(out)).ok


def test_only_temporaries_of_writers_that_are_gone_are_abandoned():
    mine = storage.tmp_prefix() + "abc-part-00000.parquet"
    assert not storage.is_abandoned(mine, age=10 * storage.TMP_MAX_AGE)  # this process is alive
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = mine.replace(f".{os.getpid()}.", f".{dead.pid}.", 1)
    assert storage.is_abandoned(gone, age=0)
    # the same pid but another start time: the pid was reused by a later process
    host, pid, start = mine[len(storage.TMP_PREFIX) :].split("-", 1)[0].split(".")
    assert storage.is_abandoned(f"{storage.TMP_PREFIX}{host}.{pid}.{int(start) + 1}-x", age=0)
    # another host's writer cannot be checked from here: only a long idle file is abandoned
    other = f"{storage.TMP_PREFIX}ffffffff.{os.getpid()}.{start}-x"
    assert not storage.is_abandoned(other, age=60) and storage.is_abandoned(other, age=storage.TMP_MAX_AGE + 1)


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
    monkeypatch.setenv("WIT_TOY_FAIL_PARTITION", "1")
    with pytest.raises(RuntimeError):
        run_stage(ToySource(), SourceConfig(parts=2), [], src, progress=False)
    with pytest.raises(ManifestError, match="not a finished wit output"):
        run_stage(ToyTag(), TagConfig(), [ManifestRef(src)], str(tmp_path / "tag"), progress=False)
    monkeypatch.delenv("WIT_TOY_FAIL_PARTITION")
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
