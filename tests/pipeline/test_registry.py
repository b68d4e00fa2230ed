"""One registry, one driver: a stage registered once (tests/registry_toy.py) runs through the library
driver and `wit run` and appears in the report; where registered stages go; scheduling options reach
the executor from `wit <stage>` and `wit run`; `import wit.pipeline.cli` imports no stage."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from wit.ingest.synthetic import generate_web
from wit.manifests.runrecord import read_run_record
from wit.pipeline import driver, registry
from wit.pipeline.cli import cli
from wit.pipeline.executor import PartSpec
from wit.pipeline.registry import StageSpec
from wit.pipeline.report import build_report
from wit.pipeline.runner import PipelineConfig, run_pipeline

import registry_toy


@pytest.fixture
def caption_stats():
    registry.register(registry_toy.SPEC)
    try:
        yield registry_toy.SPEC
    finally:
        registry.unregister(registry_toy.SPEC.name)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    return generate_web(tmp_path_factory.mktemp("web"), pages=12, seed=4)


PIPELINE = """\
root: out
extract:
  sources: [{warc}]
  no-lang: true
caption-stats:
  min-words: 5
"""


def test_a_registered_stage_runs_through_the_driver_wit_run_and_the_report(caption_stats, web, tmp_path):
    # the library driver, with option values as a mapping (the config class builds the config)
    lib = tmp_path / "lib"
    driver.run("extract", {"no-lang": True}, [str(web.root / "warc")], str(lib / "candidates"), progress=False)
    outcome = driver.run(
        "caption-stats", {"min-words": 5}, [str(lib / "candidates")], str(lib / "stats"), workers=2, progress=False
    )
    assert outcome.done and outcome.ref.kind == "caption_stats"
    rec = read_run_record(str(lib / "stats"))
    assert rec.config == {"min_words": 5}
    assert rec.counts["kept"] > 0 and rec.counts["short_caption"] > 0
    assert rec.counts["kept"] + rec.counts["short_caption"] == rec.rows == read_run_record(str(lib / "candidates")).rows

    # `wit run`: the section puts the stage in the pipeline, right after the stage it reads
    (tmp_path / "pipeline.yaml").write_text(PIPELINE.format(warc=web.root / "warc"))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "pipeline.yaml"), "--until", "caption-stats"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[:2] for line in lines if " run " in line] == [["extract", "run"], ["caption-stats", "run"]]
    out = tmp_path / "out"
    # the same bytes whichever way it ran
    assert read_run_record(str(out / "caption-stats")).output.digest == outcome.ref.digest
    cfg = PipelineConfig.from_yaml(str(tmp_path / "pipeline.yaml"))
    assert cfg.stages == ("extract", "caption-stats", "curate", "download", "filter", "shard", "train", "eval")
    again = run_pipeline(cfg, until_stage="caption-stats", echo=lambda _: None, progress=False)
    assert [(o.stage, o.action) for o in again] == [("extract", "skipped"), ("caption-stats", "skipped")]
    dry = run_pipeline(cfg, until_stage="caption-stats", overrides=["caption-stats.min-words=6"], dry_run=True,
                       echo=lambda _: None)  # fmt: skip
    assert dry[1].why == "config changed: min_words 5→6" and dry[1].action == "would-run"
    with pytest.raises(ValueError, match="unknown caption-stats option.*min_wordz.*known: min-words"):
        PipelineConfig.from_yaml(str(tmp_path / "pipeline.yaml"), overrides=["caption-stats.min-wordz=4"])
    # without its section an optional stage is not part of the pipeline
    (tmp_path / "plain.yaml").write_text(PIPELINE.format(warc=web.root / "warc").split("caption-stats:")[0])
    assert "caption-stats" not in PipelineConfig.from_yaml(str(tmp_path / "plain.yaml")).stages

    # the report lists it with its output, and in the lineage
    with open(build_report(str(out))) as fh:
        text = fh.read()
    assert f"<td>caption-stats</td><td><a href='caption-stats/_run.json'>{out / 'caption-stats'}</a>" in text
    assert "<b>caption-stats</b>" in text


def test_a_stage_is_registered_after_the_stage_it_reads_once(caption_stats):
    names = registry.names()
    assert names.index("caption-stats") == names.index("extract") + 1
    with pytest.raises(ValueError, match="already registered"):
        registry.register(caption_stats)
    other = StageSpec(name="other", folder="other", config=registry_toy.CaptionStatsConfig, input="nowhere",
                      phases=[(registry_toy.CAPTION_STATS, "")])  # fmt: skip
    with pytest.raises(ValueError, match="unknown stage 'nowhere'"):
        registry.register(other)
    with pytest.raises(ValueError, match="already the folder"):
        registry.register(StageSpec(name="other", folder="dataset", config=registry_toy.CaptionStatsConfig,
                                    input="extract", phases=[(registry_toy.CAPTION_STATS, "")]))  # fmt: skip
    with pytest.raises(ValueError, match="built-in"):
        registry.unregister("curate")
    with pytest.raises(ValueError, match="phases .* or an entry"):
        StageSpec(name="x", folder="x", config=registry_toy.CaptionStatsConfig, input="extract")
    # an entry stage runs in this process: scheduling options are refused, not ignored
    with pytest.raises(ValueError, match="train runs in this process"):
        driver.run("train", {}, ["somewhere"], "elsewhere", executor="ray")


class _Captured(Exception):
    """Raised by a stand-in for the driver once it has seen what it was called with."""


@pytest.fixture
def captured(monkeypatch):
    calls: list[dict] = []

    def fake_run(stage, config, inputs, out, **scheduling):
        calls.append({"stage": driver.spec_of(stage).name, "config": config, "out": out, **scheduling})
        raise _Captured

    monkeypatch.setattr(driver, "run", fake_run)
    return calls


def test_scheduling_options_reach_the_executor_from_a_stage_command(captured, tmp_path):
    (tmp_path / "a.warc.gz").write_bytes(b"")
    args = ["extract", str(tmp_path), "-o", str(tmp_path / "c"), "--workers", "3", "--part", "1/2"]
    result = CliRunner().invoke(cli, [*args, "--executor", "ray", "--ray-address", "ray://head:10001"])
    assert isinstance(result.exception, _Captured), result.output
    assert captured[-1] | {"config": None} == {
        "stage": "extract",
        "config": None,
        "out": str(tmp_path / "c"),
        "workers": 3,
        "part": PartSpec(1, 2),
        "executor": "ray",
        "ray_address": "ray://head:10001",
    }
    CliRunner().invoke(cli, args)
    assert captured[-1]["executor"] == "local" and captured[-1]["ray_address"] is None


def test_wit_run_takes_the_executor_from_the_file_and_the_command_line_wins(captured, tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.warc.gz").write_bytes(b"")
    text = "root: out\nexecutor: ray\nray-address: ray://head:10001\nextract: {sources: [web], workers: 2}\n"
    (tmp_path / "p.yaml").write_text(text)
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "p.yaml")])
    assert isinstance(result.exception, _Captured), result.output
    assert {k: captured[-1][k] for k in ("stage", "executor", "ray_address", "workers")} == {
        "stage": "extract",
        "executor": "ray",
        "ray_address": "ray://head:10001",
        "workers": 2,
    }
    CliRunner().invoke(cli, ["run", str(tmp_path / "p.yaml"), "--executor", "local", "--ray-address", "other:6379"])
    assert (captured[-1]["executor"], captured[-1]["ray_address"]) == ("local", "other:6379")


def test_img2dataset_distributors_are_refused_under_the_ray_executor(tmp_path, monkeypatch):
    """--executor ray with --distributor multiprocessing|pyspark|ray (img2dataset's own distributor
    inside a one-CPU Ray task) is refused before any work: by the driver (and so `wit download`) and
    by `wit run` when it reads the file. No Ray cluster here: the check comes before Ray is imported."""
    monkeypatch.setattr(driver, "run_phases", lambda *args, **kwargs: pytest.fail("work started"))
    curated, out = str(tmp_path / "curated"), str(tmp_path / "downloaded")
    for distributor in ("multiprocessing", "pyspark", "ray"):
        with (
            pytest.warns(FutureWarning) if distributor == "ray" else contextlib.nullcontext(),
            pytest.raises(ValueError, match=f"--distributor {distributor} cannot run under --executor ray"),
        ):
            driver.run("download", {"distributor": distributor, "processes": 2}, [curated], out, executor="ray")
    args = ["download", curated, "-o", out, "--distributor", "pyspark", "--processes", "2"]
    result = CliRunner().invoke(cli, [*args, "--executor", "ray"])
    assert result.exit_code == 1 and "cannot run under --executor ray" in result.output, result.output

    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.warc.gz").write_bytes(b"")
    data = {
        "root": "out",
        "extract": {"sources": ["web"]},
        "curate": {},
        "download": {"distributor": "multiprocessing", "processes": 2},
    }
    with pytest.raises(ValueError, match="download: --distributor multiprocessing cannot run under --executor ray"):
        PipelineConfig.from_dict(data | {"executor": "ray"}, base=str(tmp_path))
    with pytest.raises(ValueError, match="cannot run under --executor ray"):
        PipelineConfig.from_dict(data, base=str(tmp_path), overrides=["executor=ray"])  # wit run --executor ray
    assert PipelineConfig.from_dict(data, base=str(tmp_path)).executor == "local"  # the local executor runs it

    code = (
        "import sys\n"
        "from wit.pipeline import driver\n"
        "try:\n"
        "    driver.run('download', {'distributor': 'pyspark', 'processes': 2}, ['c'], 'd', executor='ray')\n"
        "except ValueError as exc:\n"
        "    print('refused', 'ray' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout.strip() == "refused False", proc.stderr


def test_importing_the_cli_imports_no_stage_module():
    code = (
        "import sys, wit.pipeline.cli\n"
        "print([m for m in sys.modules if m in ('torch', 'ray') or m.startswith(('wit.ingest', 'wit.evaluate', "
        "'wit.train'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_registered_stage_runs_on_ray_with_the_bytes_of_a_local_run(caption_stats, web, tmp_path, ray_cluster):
    candidates = str(tmp_path / "candidates")
    driver.run("extract", {"no-lang": True}, [str(web.root / "warc")], candidates, progress=False)
    local = driver.run("caption-stats", {"min-words": 5}, [candidates], str(tmp_path / "local"), progress=False)
    on_ray = driver.run("caption-stats", {"min-words": 5}, [candidates], str(tmp_path / "ray"), executor="ray",
                        ray_address=ray_cluster["RAY_ADDRESS"], progress=False)  # fmt: skip
    assert on_ray.done and on_ray.ref.digest == local.ref.digest
