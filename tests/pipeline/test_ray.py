"""The Ray executor on a real one-node Ray cluster (`ray start --head` on 127.0.0.1, see conftest):
same bytes as the local pool, a SIGKILLed worker retried, a killed driver resumed from the markers,
a stage error raised once, slices mixed across executors, and the CLI without Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from wit.manifests.runrecord import read_run_record
from wit.manifests.stage import StageError, committed
from wit.manifests.verify import verify
from wit.pipeline.executor import PartSpec, run_stage

from toy_stages import PackConfig, SourceConfig, TagConfig, ToyPack, ToySource, ToyTag, run_chain

TESTS = Path(__file__).parents[1]


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _tagged(root: Path, parts: int = 3):
    """A finished toy-tag manifest of ``parts`` parts, made by the local executor."""
    src = run_stage(ToySource(), SourceConfig(parts=parts), [], str(root / "src"), progress=False).ref
    return run_stage(ToyTag(), TagConfig(), [src], str(root / "tag"), progress=False).ref


def test_the_toy_chain_on_ray_gives_the_local_digests(ray_cluster, tmp_path):
    local = run_chain(str(tmp_path / "local"), workers=2)
    on_ray = run_chain(str(tmp_path / "ray"), executor="ray")
    assert {k: r.digest for k, r in on_ray.items()} == {k: r.digest for k, r in local.items()}
    for name in on_ray:
        assert verify(str(tmp_path / "ray" / name)).ok


def test_a_worker_sigkilled_inside_a_partition_is_retried_and_the_result_is_clean(ray_cluster, tmp_path, monkeypatch):
    tag = _tagged(tmp_path)
    clean = run_stage(ToyPack(), PackConfig(), [tag], str(tmp_path / "clean"), progress=False)
    hold = tmp_path / "hold"
    hold.mkdir()
    # partition 1's first attempt writes its pid and waits with its shard's temporary open
    monkeypatch.setenv("WIT_TOY_HOLD", f"1:60:{hold}")
    out = tmp_path / "out"
    result: dict = {}

    def drive():
        try:
            result["outcome"] = run_stage(ToyPack(), PackConfig(), [tag], str(out), progress=False, executor="ray")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result["error"] = exc

    driver = threading.Thread(target=drive)
    driver.start()
    _wait_for(hold / "pid-1")
    pid = int((hold / "pid-1").read_text())
    assert pid != os.getpid()  # a Ray worker, not this process
    assert list((out / "shards").glob(".wit-tmp-*")), "the partition holds a temporary when it is killed"
    os.kill(pid, signal.SIGKILL)
    driver.join(timeout=120)
    assert not driver.is_alive() and "error" not in result, result.get("error")
    outcome = result["outcome"]
    assert outcome.done and outcome.ran == 3
    attempts = (hold / "attempts-1").read_text().split()
    assert len(attempts) == 2 and attempts[0] == str(pid)  # ran twice: the killed attempt and its retry
    assert outcome.ref.digest == clean.ref.digest
    assert not list(out.rglob(".wit-tmp-*")), "the killed attempt's temporary must be swept"
    assert verify(str(out)).ok


def test_a_driver_killed_mid_stage_resumes_from_the_markers(ray_cluster, tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from toy_stages import SourceConfig, ToySource
        from wit.pipeline.executor import run_stage
        run_stage(ToySource(), SourceConfig(parts=6), [], {str(out)!r}, progress=False, executor="ray")
        """
    )
    env = {**os.environ, **ray_cluster, "WIT_TOY_SLOW_PARTITION": "3"}
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while committed(str(out)) != {0, 1, 2, 4, 5}:
            assert time.monotonic() < deadline and proc.poll() is None, committed(str(out))
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "_run.json").exists()
    resumed = run_stage(ToySource(), SourceConfig(parts=6), [], str(out), progress=False, executor="ray")
    assert resumed.done and resumed.ran == 1 and resumed.skipped == 5
    clean = run_stage(ToySource(), SourceConfig(parts=6), [], str(tmp_path / "clean"), progress=False)
    assert resumed.ref.digest == clean.ref.digest
    assert verify(str(out)).ok


def test_a_stage_error_is_raised_once_with_its_message_and_a_rerun_redoes_only_it(ray_cluster, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    cfg = SourceConfig(parts=4)
    monkeypatch.setenv("WIT_TOY_FAIL_PARTITION", "2")
    with pytest.raises(RuntimeError) as info:
        run_stage(ToySource(), cfg, [], out, progress=False, executor="ray")
    assert str(info.value) == "planted failure in partition 2"  # the stage's own type and message, not Ray's
    before = committed(out)
    assert 2 not in before and not (tmp_path / "out" / "_run.json").exists()
    monkeypatch.delenv("WIT_TOY_FAIL_PARTITION")
    resumed = run_stage(ToySource(), cfg, [], out, progress=False, executor="ray")
    assert resumed.ran == 4 - len(before) and resumed.skipped == len(before)
    clean = run_stage(ToySource(), cfg, [], str(tmp_path / "clean"), progress=False)
    assert resumed.ref.digest == clean.ref.digest


def test_a_slice_on_ray_and_a_slice_run_locally_make_one_run(ray_cluster, tmp_path):
    cfg = SourceConfig(parts=5, rows_per_part=4)
    out = str(tmp_path / "out")
    first = run_stage(ToySource(), cfg, [], out, part=PartSpec(0, 2), progress=False, executor="ray")
    assert not first.done and first.ran == 3 and committed(out) == {0, 2, 4}
    second = run_stage(ToySource(), cfg, [], out, part=PartSpec(1, 2), progress=False)
    assert second.done and second.ran == 2
    record = read_run_record(out)
    assert record.partitions == 5 and record.rows == 20
    whole = run_stage(ToySource(), cfg, [], str(tmp_path / "whole"), progress=False)
    assert second.ref.digest == whole.ref.digest
    assert verify(out).ok


def test_local_paths_are_refused_on_a_cluster_of_several_nodes(monkeypatch):
    from wit.pipeline.ray_executor import RayCluster

    many = RayCluster(cpus=8, gpus=0, nodes=2)
    with pytest.raises(StageError, match="local path.*2 nodes"):
        many.check_reachable("toy", ["s3://bucket/in", "/data/out"])
    many.check_reachable("toy", ["s3://bucket/in", "s3://bucket/out"])
    RayCluster(cpus=2, gpus=0, nodes=1).check_reachable("toy", ["/data/out"])  # one node sees its disk
    monkeypatch.setenv("WIT_RAY_SHARED_FS", "1")  # the same mount on every node
    many.check_reachable("toy", ["/data/out"])


def test_the_aws_and_wit_variables_reach_the_workers_and_nothing_else(monkeypatch):
    from wit.pipeline.ray_executor import forwarded_env

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("WIT_FSYNC", "1")
    monkeypatch.setenv("SECRET_OF_THE_DRIVER", "x")
    monkeypatch.setenv("AWS_PROFILE", "my-laptop")  # names the driver's machine: nodes have their own
    env = forwarded_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1" and env["WIT_FSYNC"] == "1"
    assert "SECRET_OF_THE_DRIVER" not in env and "AWS_PROFILE" not in env
    monkeypatch.setenv("WIT_RAY_NO_ENV", "yes")
    assert forwarded_env() == {}


def test_the_files_a_config_names_are_checked_but_the_shipped_ones(tmp_path):
    from wit.ingest.curate import CurateConfig
    from wit.pipeline.ray_executor import RayCluster, config_paths

    queries = tmp_path / "queries.txt"
    queries.write_text("red circle\n")
    assert config_paths(CurateConfig.build(queries=str(queries))) == [str(queries)]
    assert config_paths(CurateConfig.build()) == []  # the list wit ships: every node has the package
    # a reference set is TASK=URL; a URL on object storage is not a local file
    refs = tmp_path / "refs"
    refs.mkdir()
    assert config_paths({"reference_images": [f"digits={refs}", "s3://b/refs"]}) == [str(refs)]
    many = RayCluster(cpus=8, gpus=0, nodes=2)
    with pytest.raises(StageError, match="queries.txt is a local path"):
        many.check_reachable(
            "curate", ["s3://b/in", "s3://b/out", *config_paths(CurateConfig.build(queries=str(queries)))]
        )


def test_after_a_stage_error_what_was_submitted_is_cancelled(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("WIT_TOY_FAIL_PARTITION", "0")
    monkeypatch.setenv("WIT_TOY_SLOW_PARTITION", "1")  # would sleep a minute
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="planted failure in partition 0"):
        run_stage(ToySource(), SourceConfig(parts=4), [], str(tmp_path / "o"), progress=False, executor="ray")
    assert time.monotonic() - t0 < 40, "the slow partition was cancelled, not waited for"
    assert 1 not in committed(str(tmp_path / "o"))


def test_nothing_to_run_needs_no_cluster(tmp_path):
    out = tmp_path / "o"
    run_stage(ToySource(), SourceConfig(parts=2), [], str(out), progress=False)
    (out / "_run.json").unlink()  # every partition committed, the record not yet written
    # an address nobody listens on: finalizing must not try to reach it
    outcome = run_stage(ToySource(), SourceConfig(parts=2), [], str(out), executor="ray", ray_address="127.0.0.1:9")
    assert outcome.done and outcome.ran == 0


def test_another_address_than_the_connected_cluster_is_refused(ray_cluster):
    from wit.pipeline.ray_executor import RayCluster

    with pytest.raises(StageError, match="already connected to Ray at"):
        RayCluster.connect("127.0.0.1:9")
    assert RayCluster.connect(ray_cluster["RAY_ADDRESS"]).nodes == 1


def test_without_ray_the_executor_names_the_extra_and_the_cli_never_imports_ray(tmp_path):
    page = tmp_path / "page.html"
    page.write_text('<html><body><img src="http://127.0.0.1/a.png" alt="a red circle"></body></html>')
    script = textwrap.dedent(
        f"""
        import sys
        import wit.pipeline.cli
        assert "ray" not in sys.modules, "importing the CLI imported ray"
        sys.modules["ray"] = None  # from here on, as if Ray were not installed
        sys.path.insert(0, {str(TESTS)!r})
        from toy_stages import SourceConfig, ToySource
        from wit.manifests.stage import StageError
        from wit.pipeline.executor import run_stage
        try:
            run_stage(ToySource(), SourceConfig(parts=2), [], {str(tmp_path / "o")!r}, executor="ray")
        except StageError as exc:
            print(exc)
        # and the command line: the same words, exit status 1, no traceback
        try:
            wit.pipeline.cli.main(["extract", {str(page)!r}, "-o", {str(tmp_path / "c")!r}, "--executor", "ray"])
        except SystemExit as exc:
            print("exit", exc.code)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["--executor ray needs Ray: pip install 'wit[ray]'", "exit 1"]
    assert proc.stderr.strip() == "Error: --executor ray needs Ray: pip install 'wit[ray]'"
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists(), "nothing is written before that"


def test_a_config_the_workers_cannot_import_is_a_clear_error(ray_cluster, tmp_path):
    import types

    module = types.ModuleType("only_in_this_driver")
    sys.modules[module.__name__] = module  # before the class is made: dataclass looks its module up
    try:
        code = "from dataclasses import dataclass\n@dataclass(frozen=True)\nclass Cfg:\n    parts: int = 2\n"
        exec(code, module.__dict__)
        with pytest.raises(StageError, match=r"partition \d .*failed on Ray .*No module named 'only_in_this_driver'"):
            run_stage(ToySource(), module.Cfg(), [], str(tmp_path / "o"), progress=False, executor="ray")
    finally:
        del sys.modules[module.__name__]


def test_a_worker_lost_more_often_than_ray_retries_stops_the_stage(ray_cluster, tmp_path, monkeypatch):
    tag = _tagged(tmp_path, parts=2)
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv("WIT_TOY_HOLD", f"0:60:{hold}")
    monkeypatch.setenv("WIT_RAY_MAX_RETRIES", "0")
    result: dict = {}

    def drive():
        try:
            run_stage(ToyPack(), PackConfig(), [tag], str(tmp_path / "out"), progress=False, executor="ray")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result["error"] = exc

    driver = threading.Thread(target=drive)
    driver.start()
    _wait_for(hold / "pid-0")
    os.kill(int((hold / "pid-0").read_text()), signal.SIGKILL)
    driver.join(timeout=120)
    assert isinstance(result.get("error"), StageError), result
    assert "partition 0" in str(result["error"]) and "lost its worker 1 times" in str(result["error"])
    assert 0 not in committed(str(tmp_path / "out"))
