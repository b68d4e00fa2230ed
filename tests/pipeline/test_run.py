"""`wit run`'s library: a pipeline file validated once; a second run does no work; a changed curate cap
reruns curate and everything after it and nothing before; --from/--until; the dry run says why;
a failing stage stops the run with its message and the next run resumes there."""

from __future__ import annotations

import os
import shutil

import pytest

from wit.ingest.synthetic import SyntheticWebServer, generate_web
from wit.manifests import storage
from wit.manifests.runrecord import read_run_record
from wit.pipeline.runner import FOLDERS, STAGES, PipelineConfig, PipelineError, run_pipeline

from conftest import free_port

PIPELINE = """\
root: out
extract:
  sources: [web/warc]
  languages: en,de,fr,es
curate:
  per-query-cap: 1000
  lang: ""
  allow-private-hosts: true
download:
  image_size: 64
  timeout: 1
  threads: 8
  allow-private-hosts: true
filter: {}
shard:
  samples-per-shard: 32
  no-card: true
train:
  batch-size: 8
  steps: 3
  workers: 1
eval:
  suite: synthetic-colour
  no-cache: true
  resamples: 20
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A pipeline file next to a 24-page web, run once; returns (folder, port) and keeps a snapshot."""
    folder = tmp_path_factory.mktemp("run") / "project"
    port = free_port()
    generate_web(folder / "web", pages=24, seed=3, base_url=f"http://127.0.0.1:{port}")
    (folder / "pipeline.yaml").write_text(PIPELINE)
    with SyntheticWebServer(folder / "web", port=port):
        outcomes = run_pipeline(PipelineConfig.from_yaml(str(folder / "pipeline.yaml")), progress=False)
    assert [o.action for o in outcomes] == ["ran"] * len(STAGES)
    shutil.copytree(folder, folder.with_name("snapshot"))
    return folder, port


@pytest.fixture
def copy(project):
    """The finished project as the module fixture left it, for a test that changes it.

    Restored in place: run records name their inputs by absolute URL, so a copy elsewhere would
    be a different pipeline (every input moved) and run again.
    """
    folder, port = project
    shutil.rmtree(folder)
    shutil.copytree(folder.with_name("snapshot"), folder)
    return folder, port


def mtimes(folder) -> dict[str, float]:
    return {s: os.stat(folder / "out" / FOLDERS[s] / "_run.json").st_mtime_ns for s in STAGES}


def run(folder, port, **kw):
    lines: list[str] = []
    with SyntheticWebServer(folder / "web", port=port):
        cfg = PipelineConfig.from_yaml(str(folder / "pipeline.yaml"))
        outcomes = run_pipeline(cfg, echo=lines.append, progress=False, **kw)
    return {o.stage: o for o in outcomes}, lines


def test_a_second_run_does_no_work(copy):
    folder, port = copy
    before = mtimes(folder)
    outcomes, _ = run(folder, port)
    assert {s: o.action for s, o in outcomes.items()} == {s: "skipped" for s in STAGES}
    assert mtimes(folder) == before


def test_a_new_curate_cap_reruns_curate_and_everything_after_it(copy):
    # Cap 1, not 2: the draws depend on the uids, hence on the test server's port, and cap 2
    # dropped only 1-6 of this web's 53 pairs (so now and then none, and download rightly skipped).
    # Cap 1 dropped 8-13 on every port tried.
    folder, port = copy
    before = mtimes(folder)
    old = {s: read_run_record(folder / "out" / FOLDERS[s]).output.digest for s in STAGES}
    outcomes, lines = run(folder, port, overrides=["curate.per-query-cap=1"])
    assert outcomes["extract"].action == "skipped"
    assert all(outcomes[s].action == "ran" for s in STAGES[1:]), lines
    assert "config changed: per_query_cap 1000→1" in outcomes["curate"].why
    assert outcomes["download"].why.startswith("input changed: curated")
    after = mtimes(folder)
    assert after["extract"] == before["extract"]
    assert all(after[s] != before[s] for s in STAGES[1:])
    assert read_run_record(folder / "out" / "curated").config["per_query_cap"] == 1
    assert read_run_record(folder / "out" / "dataset").output.digest != old["shard"]
    # the same edit made in the file instead: nothing more to do
    (folder / "pipeline.yaml").write_text(PIPELINE.replace("per-query-cap: 1000", "per-query-cap: 1"))
    outcomes, _ = run(folder, port)
    assert {o.action for o in outcomes.values()} == {"skipped"}


def test_dry_run_says_what_would_run_and_why_and_touches_nothing(copy):
    folder, port = copy
    before = mtimes(folder)
    outcomes, lines = run(folder, port, overrides=["curate.per-query-cap=1"], dry_run=True)
    assert mtimes(folder) == before
    assert outcomes["extract"].action == "would-skip" and outcomes["extract"].why == "finished"
    assert outcomes["curate"].action == "would-run"
    assert outcomes["curate"].why == "config changed: per_query_cap 1000→1"
    assert all(outcomes[s].action == "would-run" and "after curate runs" in outcomes[s].why for s in STAGES[2:])
    text = "\n".join(lines)
    assert "curate    run  config changed: per_query_cap 1000→1 (removes" in text
    assert "extract   skip finished" in text
    # nothing changed: everything would be skipped
    outcomes, _ = run(folder, port, dry_run=True)
    assert {o.action for o in outcomes.values()} == {"would-skip"}


def test_from_and_until_select_stages(copy):
    folder, port = copy
    before = mtimes(folder)
    outcomes, _ = run(folder, port, until_stage="curate", overrides=["curate.per-query-cap=1"])
    assert list(outcomes) == ["extract", "curate"]
    assert outcomes["curate"].action == "ran"
    after = mtimes(folder)
    assert all(after[s] == before[s] for s in STAGES[2:])  # download... untouched: stale until run
    outcomes, _ = run(folder, port, from_stage="download", until_stage="download", overrides=["curate.per-query-cap=1"])
    assert list(outcomes) == ["download"] and outcomes["download"].action == "ran"
    assert outcomes["download"].why.startswith("input changed: curated")
    outcomes, _ = run(folder, port, from_stage="eval")
    assert list(outcomes) == ["eval"] and outcomes["eval"].action == "skipped"
    with pytest.raises(ValueError, match="unknown stage 'shards'"):
        run(folder, port, from_stage="shards")
    with pytest.raises(ValueError, match="comes after"):
        run(folder, port, from_stage="train", until_stage="curate")


def test_from_a_stage_whose_input_is_not_finished_is_refused(copy):
    folder, port = copy
    storage.remove(str(folder / "out" / "filtered" / "_run.json"))
    with pytest.raises(PipelineError, match="shard reads filter's output.*run from filter first"):
        run(folder, port, from_stage="shard")


def test_a_failing_stage_stops_the_run_and_the_next_run_resumes_there(copy, monkeypatch):
    from wit.ingest.filter import FILTER_PHASES
    from wit.manifests.stage import StageError

    folder, port = copy
    for name in ("filtered", "dataset", "train", "eval"):
        shutil.rmtree(folder / "out" / name)

    def broken(self, config, partition, out):
        raise StageError(f"{partition.source}: disk on fire")

    # the stages run in this process (workers: 1), so a patched stage is the one that runs
    monkeypatch.setattr(type(FILTER_PHASES[0][0]), "run_partition", broken)
    with pytest.raises(PipelineError, match="^filter failed: .*disk on fire"):
        run(folder, port)
    assert not (folder / "out" / "dataset").exists()
    monkeypatch.undo()
    outcomes, _ = run(folder, port)
    assert [outcomes[s].action for s in STAGES] == ["skipped"] * 3 + ["ran"] * 4
    assert outcomes["filter"].why.startswith("resume")


def test_a_pipeline_file_is_validated_before_anything_runs(tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.warc.gz").write_bytes(b"")

    def load(text: str, overrides=()):
        (tmp_path / "p.yaml").write_text(text)
        return PipelineConfig.from_yaml(str(tmp_path / "p.yaml"), overrides=overrides)

    base = "root: out\nextract: {sources: [web]}\n"
    cfg = load(base)
    assert cfg.root == str(tmp_path / "out") and cfg.sources == (str(tmp_path / "web" / "a.warc.gz"),)
    assert cfg.url("shard") == str(tmp_path / "out" / "dataset")
    assert load(base, ["root=s3://bucket/run"]).url("train") == "s3://bucket/run/train"
    assert load(base + "curate: {per_query_cap: 7}").config("curate").per_query_cap == 7
    assert load(base, ["curate.per-query-cap=9"]).config("curate").per_query_cap == 9
    assert load(base, ["train.steps=4"]).config("train").steps == 4
    assert load(base, ["train.lr=2e-3"]).config("train").lr == 0.002  # YAML 1.1 reads 2e-3 as a string
    with pytest.raises(ValueError, match="train: an option has the wrong type"):
        load(base + "train: {lr: fast}\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load("root: [out\n")
    with pytest.raises(ValueError, match="unknown section.*sharding"):
        load(base + "sharding: {}\n")
    with pytest.raises(ValueError, match="unknown curate option.*per_query_cop.*known: queries, per-query-cap"):
        load(base + "curate: {per-query-cop: 3}\n")
    with pytest.raises(ValueError, match="curate.per-query-cap: expected an integer"):
        load(base + "curate: {per-query-cap: lots}\n")
    with pytest.raises(ValueError, match="unknown training option.*stepz"):
        load(base + "train: {stepz: 3}\n")
    with pytest.raises(ValueError, match="unknown suite"):
        load(base + "eval: {suite: nonsense}\n")
    with pytest.raises(ValueError, match="'root' must name"):
        load("extract: {sources: [web]}\n")
    with pytest.raises(ValueError, match="extract.sources"):
        load("root: out\n")
    with pytest.raises(ValueError, match="expected stage.key=value"):
        load(base, ["curate"])
    with pytest.raises(ValueError, match="unknown stage 'curation'"):
        load(base, ["curation.per-query-cap=3"])
    with pytest.raises(ValueError, match="a pipeline file is a mapping"):
        load("- a\n- b\n")


# Options that belong to one command line and not to a pipeline file: where to write (the file
# names its folders), which slice of a job array this is, download's second pass over failures.
CLI_ONLY = {"out", "part", "retry_failed"}
YAML_ONLY = {"extract": {"sources"}}  # the command's SOURCES argument


def test_the_pipeline_file_takes_every_option_of_each_stage_command_with_its_default():
    """The runner keeps its own table of section options (OPTIONS). This holds it to the click
    commands, so an option added to a command cannot be forgotten in the pipeline file."""
    import click

    from wit.pipeline import ingest_commands, model_commands
    from wit.pipeline.runner import OPTIONS

    commands = {c.name: c for c in ingest_commands.COMMANDS} | {"eval": model_commands.eval_run}
    for stage, options in OPTIONS.items():
        if stage == "train":
            continue  # every TrainConfig field, checked by TrainConfig.from_dict
        command = commands[stage]
        ctx = click.Context(command)
        cli = {}
        for p in command.params:
            if not isinstance(p, click.Option):
                continue
            key = max(p.opts, key=len).lstrip("-").replace("-", "_")  # the long flag, as the YAML key
            default = p.get_default(ctx, call=True)
            default = None if default is click.core.UNSET else default
            if p.multiple:
                default = (default,) if isinstance(default, str) else tuple(default or ())
            cli[key] = default
        assert set(cli) - CLI_ONLY == set(options) - YAML_ONLY.get(stage, set()), stage
        for key in set(cli) - CLI_ONLY:
            want, default = options[key], cli[key]
            if want.kind == "strs" and isinstance(default, str):  # the CLI's comma-separated form
                default = tuple(code for code in default.split(",") if code)
            assert default == want.default, (stage, key, default, want.default)
