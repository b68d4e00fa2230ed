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
from wit.pipeline import registry
from wit.pipeline.runner import PipelineConfig, PipelineError, run_pipeline

from conftest import free_port

STAGES = registry.names()
FOLDERS = {s.name: s.folder for s in registry.specs()}

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
    assert cfg.root == str(tmp_path / "out") and cfg.sources["extract"] == (str(tmp_path / "web" / "a.warc.gz"),)
    assert cfg.url("shard") == str(tmp_path / "out" / "dataset")
    assert load(base, ["root=s3://bucket/run"]).url("train") == "s3://bucket/run/train"
    assert load(base + "curate: {per_query_cap: 7}").config("curate").per_query_cap == 7
    assert load(base, ["curate.per-query-cap=9"]).config("curate").per_query_cap == 9
    assert load(base, ["train.steps=4"]).config("train").steps == 4
    assert load(base, ["train.lr=2e-3"]).config("train").lr == 0.002  # YAML 1.1 reads 2e-3 as a string
    with pytest.raises(ValueError, match="train.lr: expected a number"):
        load(base + "train: {lr: fast}\n")
    with pytest.raises(ValueError, match="train: an option has the wrong type"):  # a field with no option
        load(base + "train: {grad-clip: fast}\n")
    with pytest.raises(ValueError, match="curate.per-query-cap: must be >= 1"):  # the command line's range
        load(base + "curate: {per-query-cap: 0}\n")
    with pytest.raises(ValueError, match="download.resize-mode: expected one of"):
        load(base + "download: {resize-mode: squash}\n")
    assert load(base, ["executor=ray", "ray-address=ray://head:10001"]).executor == "ray"
    with pytest.raises(ValueError, match="executor: expected one of local, ray"):
        load(base + "executor: slurm\n")
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


# Options that belong to one command line and not to a pipeline section: where to write (the file
# names its folders), which slice of a job array this is, download's second pass over failures, and
# train's own YAML file (the pipeline file is that).
CLI_ONLY = {"out", "part", "retry_failed", "config_url"}


def _command(stage: str):
    from wit.pipeline.cli import cli

    return cli.commands["eval"].commands["run"] if stage == "eval" else cli.commands[stage]


def test_each_stage_command_has_exactly_the_options_its_config_class_declares():
    """A stage's command makes its options from the option specs of the registry entry's config class
    (and the scheduling specs, which a pipeline file has as a section's `workers` and the top-level
    `executor`, `ray-address`), the same objects the pipeline file is checked against."""
    import click

    from wit.pipeline.clikit import SpecOption
    from wit.pipeline.driver import EXECUTOR, RAY_ADDRESS, WORKERS

    for spec in registry.specs():
        command = _command(spec.name)
        params = command.get_params(click.Context(command))
        made = {id(p.spec) for p in params if isinstance(p, SpecOption)}
        scheduling = (WORKERS, EXECUTOR, RAY_ADDRESS) if spec.runs_partitions else ()
        assert made == {id(o) for o in (*spec.options(), *scheduling)}, spec.name
        by_hand = {
            p.name for p in params if isinstance(p, click.Option) and not (isinstance(p, SpecOption) or p.is_eager)
        }
        assert by_hand <= CLI_ONLY, (spec.name, by_hand - CLI_ONLY)


# (stage, command-line options, the same options as a pipeline section); paths are relative to the
# working directory on the command line and to the pipeline file's folder in the file: the same here
SAME_CONFIG = [
    ("extract", [], {}),
    ("extract", ["--no-lang", "--languages", "en,de", "--max-page-bytes", "4096"],
     {"no-lang": True, "languages": ["en", "de"], "max_page_bytes": 4096}),
    ("curate", [], {}),
    ("curate", ["--per-query-cap", "7", "--lang", "", "--queries", "q.txt", "--allow-private-hosts"],
     {"per-query-cap": 7, "lang": "", "queries": "q.txt", "allow-private-hosts": True}),
    ("download", [], {}),
    ("download", ["--image-size", "64", "--resize-mode", "center_crop", "--timeout", "2"],
     {"image_size": 64, "resize-mode": "center_crop", "timeout": 2}),
    ("filter", [], {}),
    # --decontaminate exports the suite's images to _reference beside the filter's folder either way
    ("filter", ["--decontaminate", "digits", "--reference-images", "a=refs", "--max-aspect-ratio", "2"],
     {"decontaminate": "digits", "reference-images": ["a=refs"], "max-aspect-ratio": 2}),
    ("shard", [], {}),
    ("shard", ["--no-card", "--samples-per-shard", "5"], {"no-card": True, "samples-per-shard": 5}),
    ("eval", [], {}),
    ("eval", ["--suite", "digits", "--no-cache", "--resamples", "50"], {"suite": "digits", "no-cache": True,
                                                                       "resamples": 50}),
    ("train", ["--resume", "auto"], {}),  # a pipeline resumes a killed training by default
    ("train", ["--resume", "auto", "--steps", "3", "--model", "m.json"], {"steps": 3, "model": "m.json"}),
]  # fmt: skip


class _Captured(Exception):
    pass


@pytest.mark.parametrize("stage,args,section", SAME_CONFIG, ids=lambda v: v if isinstance(v, str) else None)
def test_a_stage_command_and_a_pipeline_section_build_the_same_config(stage, args, section, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from wit.pipeline import driver
    from wit.pipeline.cli import cli

    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.warc.gz").write_bytes(b"")
    (tmp_path / "q.txt").write_text("red box\n")
    data = {"root": "out", "extract": {"sources": ["web"]}}
    data[stage] = data.get(stage, {}) | section
    piped = PipelineConfig.from_dict(data, base=str(tmp_path)).config(stage)

    seen = []

    def capture(*args, **kwargs):
        seen.append(args)
        raise _Captured

    target = {"eval": "wit.evaluate.run.evaluate", "train": "wit.train.loop.train"}.get(stage)
    monkeypatch.setattr(target, capture) if target else monkeypatch.setattr(driver, "run", capture)
    monkeypatch.chdir(tmp_path)
    command = {"extract": ["extract", "web"], "eval": ["eval", "ckpt.pt"]}.get(stage, [stage, "input"])
    out = str(tmp_path / "out" / registry.get(stage).folder)
    result = CliRunner().invoke(cli, [*command, "-o", out, *args])
    assert isinstance(result.exception, _Captured), result.output
    if stage == "eval":  # evaluate(checkpoint, out, suite, config)
        assert (seen[0][2].to_dict(), seen[0][3]) == (piped.load_suite().to_dict(), piped.config)
    else:  # train(config, dataset, out); driver.run(stage, config, inputs, out)
        assert seen[0][0 if stage == "train" else 1] == piped
    if "--decontaminate" in args:
        assert f"digits={tmp_path / 'out' / '_reference' / 'wds_digits' / 'test'}" in piped.reference_images
