"""The stage contract under the executors: skip committed partitions, slices, pools, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wit.manifests.manifest import read_table
from wit.manifests.runrecord import read_run_record
from wit.manifests.stage import StageError, committed
from wit.manifests.verify import verify
from wit.pipeline.executor import PartSpec, run_stage

from toy_stages import SourceConfig, TagConfig, ToySource, ToyTag, run_chain


def test_run_writes_parts_markers_and_run_record_last(tmp_path):
    out = tmp_path / "src"
    outcome = run_stage(ToySource(), SourceConfig(parts=3, rows_per_part=5), [], str(out), progress=False)
    assert outcome.done and outcome.ran == 3
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    rec = read_run_record(str(out))
    assert rec.rows == 15 and rec.counts == {"kept": 15} and rec.partitions == 3
    assert rec.output.digest == outcome.ref.digest
    assert set(rec.files) == {f"part-0000{i}.parquet" for i in range(3)}
    assert read_table(str(out)).num_rows == 15


def test_rerun_of_finished_stage_does_nothing(tmp_path):
    cfg = SourceConfig(parts=2, rows_per_part=3)
    first = run_stage(ToySource(), cfg, [], str(tmp_path / "o"), progress=False)
    mtime = (tmp_path / "o" / "_run.json").stat().st_mtime_ns
    again = run_stage(ToySource(), cfg, [], str(tmp_path / "o"), progress=False)
    assert again.ran == 0 and again.ref == first.ref
    assert (tmp_path / "o" / "_run.json").stat().st_mtime_ns == mtime


def test_failed_partition_keeps_others_and_rerun_redoes_only_it(tmp_path, monkeypatch):
    cfg = SourceConfig(parts=4, rows_per_part=3)
    out = str(tmp_path / "o")
    monkeypatch.setenv("WIT_TOY_FAIL_PARTITION", "2")
    with pytest.raises(RuntimeError, match="planted failure"):
        run_stage(ToySource(), cfg, [], out, progress=False)
    assert committed(out) == {0, 1}
    assert not (tmp_path / "o" / "_run.json").exists()
    monkeypatch.delenv("WIT_TOY_FAIL_PARTITION")
    outcome = run_stage(ToySource(), cfg, [], out, progress=False)
    assert outcome.ran == 2 and outcome.skipped == 2 and outcome.done
    clean = run_stage(ToySource(), cfg, [], str(tmp_path / "clean"), progress=False)
    assert outcome.ref.digest == clean.ref.digest


def test_slices_finalize_when_the_last_one_finishes(tmp_path):
    cfg = SourceConfig(parts=5, rows_per_part=2)
    out = str(tmp_path / "o")
    first = run_stage(ToySource(), cfg, [], out, part=PartSpec.parse("0/2"), progress=False)
    assert not first.done and first.ran == 3 and first.remaining == 2  # partitions 0, 2, 4
    assert committed(out) == {0, 2, 4}
    second = run_stage(ToySource(), cfg, [], out, part=PartSpec.parse("1/2"), progress=False)
    assert second.done and second.ran == 2
    whole = run_stage(ToySource(), cfg, [], str(tmp_path / "whole"), progress=False)
    assert second.ref.digest == whole.ref.digest


@pytest.mark.parametrize("text", ["2/2", "-1/3", "a/b", "3"])
def test_bad_part_spec_is_a_clear_error(text):
    with pytest.raises(ValueError, match="--part"):
        PartSpec.parse(text)


def test_process_pool_gives_the_same_digest(tmp_path):
    one = run_chain(str(tmp_path / "w1"), workers=1)
    two = run_chain(str(tmp_path / "w2"), workers=2)
    assert [r.digest for r in one.values()] == [r.digest for r in two.values()]


def test_another_config_in_the_same_folder_is_refused(tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    monkeypatch.setenv("WIT_TOY_FAIL_PARTITION", "1")
    with pytest.raises(RuntimeError):
        run_stage(ToySource(), SourceConfig(parts=3), [], out, progress=False)
    with pytest.raises(StageError, match="different config"):
        run_stage(ToySource(), SourceConfig(parts=3, rows_per_part=7), [], out, progress=False)


def test_input_digest_is_recorded_and_changed_input_is_refused(tmp_path):
    src = run_stage(ToySource(), SourceConfig(parts=2), [], str(tmp_path / "s"), progress=False).ref
    tag = run_stage(ToyTag(), TagConfig(), [src], str(tmp_path / "t"), progress=False)
    rec = read_run_record(str(tmp_path / "t"))
    assert rec.inputs == [src]
    # per-partition tallies are summed into the run record
    assert sum(rec.tallies["first_word"].values()) == rec.rows == 50
    assert rec.tallies["first_word"]["red"] == 5
    assert rec.counts["has_x"] > 0 and rec.counts["kept"] + rec.counts["has_x"] == 50
    src2 = run_stage(ToySource(), SourceConfig(parts=3), [], str(tmp_path / "s2"), progress=False).ref
    with pytest.raises(StageError):
        run_stage(ToyTag(), TagConfig(), [src2], str(tmp_path / "t"), progress=False)
    assert tag.done


def test_killed_job_rerun_matches_uninterrupted_run(tmp_path):
    """SIGKILL the whole job while partition 2 is in flight; the re-run completes identically."""
    out = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from toy_stages import SourceConfig, ToySource
        from wit.pipeline.executor import run_stage
        run_stage(ToySource(), SourceConfig(parts=4), [], {str(out)!r}, progress=False)
        """
    )
    env = {**os.environ, "WIT_TOY_SLOW_PARTITION": "2"}
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and committed(str(out)) != {0, 1}:
            time.sleep(0.05)
        assert committed(str(out)) == {0, 1}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "_run.json").exists()
    assert not list(out.glob("part-00002*")), "an in-flight partition must not leave a visible part"
    assert verify(str(out)).problems[0].kind == "unfinished"
    resumed = run_stage(ToySource(), SourceConfig(parts=4), [], str(out), progress=False)
    assert resumed.ran == 2 and resumed.skipped == 2
    clean = run_stage(ToySource(), SourceConfig(parts=4), [], str(tmp_path / "clean"), progress=False)
    assert resumed.ref.digest == clean.ref.digest
    assert json.loads((out / "_run.json").read_text())["rows"] == 100
    assert verify(str(out)).ok and not list(out.rglob(".wit-tmp-*"))


def test_phases_run_in_order_and_slices_complete_them(tmp_path):
    from wit.pipeline.executor import run_phases

    from toy_stages import ToyPack

    src = run_stage(ToySource(), SourceConfig(parts=3), [], str(tmp_path / "src"), progress=False).ref
    phases = [(ToyTag(), "_tag"), (ToyPack(), "")]
    whole = run_phases(phases, TagConfig(), [src], str(tmp_path / "whole"), progress=False)
    assert whole.done and read_run_record(str(tmp_path / "whole")).inputs[0].url.endswith("whole/_tag")
    first = run_phases(phases, TagConfig(), [src], str(tmp_path / "sliced"), part=PartSpec(0, 2), progress=False)
    assert not first.done and not (tmp_path / "sliced" / "_run.json").exists()
    second = run_phases(phases, TagConfig(), [src], str(tmp_path / "sliced"), part=PartSpec(1, 2), progress=False)
    assert second.done and second.ref.digest == whole.ref.digest
    assert verify(str(tmp_path / "sliced")).ok


# The old sweep: every temporary in the folder, whoever is writing it.
_SWEEP_EVERY = """
from wit.manifests import storage
def sweep_every(url):
    names = [n for n in storage.listdir(url, recursive=True) if storage.is_temporary(n)]
    for n in names:
        storage.remove(storage.join(url, n))
    return len(names)
storage.sweep_temporaries = sweep_every
"""


@pytest.mark.parametrize("sweep", ["abandoned", "every"])
def test_job_array_slices_started_a_second_apart_into_one_folder(tmp_path, sweep):
    """Slice 0 is writing partition 0's shard when slice 1 starts and sweeps the folder: with the
    sweep of abandoned temporaries both finish with a single run's digest; the old sweep deletes
    slice 0's in-flight temporary and slice 0 fails."""
    from toy_stages import PackConfig, ToyPack

    src = run_stage(ToySource(), SourceConfig(parts=2), [], str(tmp_path / "src"), progress=False).ref
    tag = run_stage(ToyTag(), TagConfig(), [src], str(tmp_path / "tag"), progress=False).ref
    single = run_stage(ToyPack(), PackConfig(), [tag], str(tmp_path / "single"), progress=False)
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.mkdir()

    def slice_(i: int) -> subprocess.Popen:
        script = textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parents[1])!r})
            from toy_stages import PackConfig, ToyPack
            from wit.manifests.manifest import ManifestRef
            from wit.pipeline.executor import PartSpec, run_stage
            tag = ManifestRef(url={tag.url!r}, kind={tag.kind!r}, digest={tag.digest!r})
            run_stage(ToyPack(), PackConfig(), [tag], {str(out)!r}, part=PartSpec({i}, 2), progress=False)
            """
        )
        if sweep == "every":
            script = _SWEEP_EVERY + script
        env = {**os.environ, "WIT_TOY_HOLD": f"0:6:{hold}"}  # slice 0 holds its shard's temporary 6 s
        return subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)

    first = slice_(0)
    deadline = time.monotonic() + 60
    while not (hold / "pid-0").exists():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    assert list((out / "shards").glob(".wit-tmp-*"))
    time.sleep(1)
    second = slice_(1)
    errors = [p.communicate(timeout=120)[1] for p in (first, second)]
    if sweep == "every":
        assert first.returncode != 0 and "No such file" in errors[0], errors[0][-2000:]
        assert not (out / "_run.json").exists()
        return
    assert first.returncode == 0 and second.returncode == 0, errors
    assert read_run_record(str(out)).output.digest == single.ref.digest
    assert verify(str(out)).ok and not list(out.rglob(".wit-tmp-*"))
