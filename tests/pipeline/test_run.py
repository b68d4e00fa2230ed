"""`wit run`'s library: a pipeline file validated once; a second run does no work; a changed curate cap
reruns curate and everything after it and nothing before; --from/--until; the dry run says why;
a failing stage stops the run with its message and the next run resumes there."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

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
    with pytest.raises(ValueError, match="per-query-cap must be a positive integer, got 0"):  # the config's bound
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
# Made by hand: --grad-clip (a number or `none`, YAML's null) and --weights (W1,W2, YAML's list)
# set config fields no option kind can spell.
CLI_ONLY = {"out", "part", "retry_failed", "config_url", "grad_clip", "weights"}


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
    # --decontaminate exports the suite's images to OUT/_reference, a pipeline to ROOT/_reference:
    # the configs differ in those URLs only (see the test)
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
        return
    made = seen[0][0 if stage == "train" else 1]  # train(config, dataset, out); driver.run(stage, config, ...)
    if "--decontaminate" in args:
        # the command line exports into its OUT, a pipeline into its root, never outside either
        in_root = f"digits={tmp_path / 'out' / '_reference' / 'wds_digits' / 'test'}"
        in_out = f"digits={tmp_path / 'out' / 'filtered' / '_reference' / 'wds_digits' / 'test'}"
        assert in_root in piped.reference_images and in_out not in piped.reference_images
        assert in_out in made.reference_images and in_root not in made.reference_images
        assert replace(made, reference_images=piped.reference_images) == piped
        # told the pipeline's reference root, the command builds the pipeline's config exactly
        seen.clear()
        args = [*args, "--reference-root", str(tmp_path / "out" / "_reference")]
        result = CliRunner().invoke(cli, [*command, "-o", out, *args])
        assert isinstance(result.exception, _Captured), result.output
        made = seen[0][1]
    assert made == piped


def test_decontaminate_exports_inside_the_folder_given_even_at_a_bucket_root(tmp_path, monkeypatch):
    """A pipeline exports into ROOT/_reference, `wit filter` into OUT/_reference: inside the tree the
    user named, also when that is a whole bucket (no S3 server: where is decided from the URLs)."""
    from click.testing import CliRunner

    from wit.evaluate import datasets
    from wit.pipeline import driver
    from wit.pipeline.cli import cli

    roots = []

    def fake_reference_sets(suite, root):
        roots.append(root)
        return (f"digits={root}/wds_digits/test",)

    monkeypatch.setattr(datasets, "reference_sets", fake_reference_sets)
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.warc.gz").write_bytes(b"")
    data = {"root": "s3://bucket", "extract": {"sources": ["web"]}, "curate": {}, "download": {}}
    piped = PipelineConfig.from_dict(data | {"filter": {"decontaminate": "digits"}}, base=str(tmp_path))
    assert roots == ["s3://bucket/_reference"]
    assert piped.config("filter").reference_images == ("digits=s3://bucket/_reference/wds_digits/test",)

    monkeypatch.setattr(driver, "run", lambda *args, **kwargs: None)
    monkeypatch.setattr("wit.pipeline.ingest_commands.finish", lambda *args: None)
    for out, root in (
        ("s3://bucket", "s3://bucket/_reference"),
        ("s3://bucket/", "s3://bucket/_reference"),
        ("s3://bucket/filtered", "s3://bucket/filtered/_reference"),
    ):
        result = CliRunner().invoke(cli, ["filter", "s3://bucket/downloaded", "-o", out, "--decontaminate", "digits"])
        assert result.exit_code == 0, result.output
        assert roots[-1] == root


def _all_sections(stage: str, key: str, value) -> dict:
    sections = {s: {} for s in ("curate", "download", "filter", "shard", "train", "eval")}
    sections[stage] = {key: value}
    return {"root": "out", "extract": {"sources": ["web"]}} | sections


@pytest.mark.parametrize(
    "stage,key,value",
    [
        ("eval", "resamples", 0),  # no intervals (EvalConfig)
        ("train", "batch-size", 1),
        ("download", "image-size", 4),
    ],
)
def test_wit_run_accepts_what_the_config_class_accepts(stage, key, value, tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.warc.gz").write_bytes(b"")
    config = PipelineConfig.from_dict(_all_sections(stage, key, value), base=str(tmp_path)).config(stage)
    config = config.config if stage == "eval" else config
    assert getattr(config, key.replace("-", "_")) == value


@pytest.mark.parametrize(
    "stage,key,value,message",
    [
        ("eval", "resamples", -1, r"resamples must be 0 \(no intervals\) or more"),
        ("train", "batch-size", 0, "batch_size must be >= 1, got 0"),
        ("download", "image-size", 0, "download config: image_size must be at least 1"),
        ("curate", "workers", 0, "curate.workers: must be >= 1, got 0"),  # no config class holds workers
    ],
)
def test_wit_run_refuses_what_the_config_class_refuses_with_its_message(stage, key, value, message, tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.warc.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=message):
        PipelineConfig.from_dict(_all_sections(stage, key, value), base=str(tmp_path))


# options that a config can only be built with when another option is given too
_WITH = {
    ("curate", "max-chars"): {"min-chars": 0},
    ("filter", "per-query-cap"): {"rebalance": True},
    # a score filter needs a CLIP checkpoint, loaded when the config is built: the bounds are checked
    # before it is loaded, so a missing file shows the refusals (what is accepted needs a real one)
    ("filter", "min-score"): {"clip-score": "/nonexistent/clip.pt"},
    ("filter", "keep-top"): {"clip-score": "/nonexistent/clip.pt"},
}


def _at_and_beyond(option) -> tuple[list, list]:
    """Values at the option's bounds (accepted) and just beyond them (refused)."""
    step = 1 if option.kind == "int" else 1e-3
    accept, refuse = [], []
    if option.low is not None:
        accept.append(option.low + step if option.low_open else option.low)
        refuse.append(option.low if option.low_open else option.low - step)
    if option.high is not None:
        accept.append(option.high)
        refuse.append(option.high + step)
    return accept, refuse


def test_every_option_bound_is_the_config_classes_own(tmp_path):
    """An option's low/high (click's range and its help) are exactly what its config class accepts:
    the config takes the values at the bounds and refuses, naming the option, those just beyond."""
    import re

    checked = 0
    for spec in registry.specs():
        for option in spec.options():
            accept, refuse = _at_and_beyond(option)
            extra = _WITH.get((spec.name, option.name), {})
            for value in accept if "clip-score" not in extra else ():
                config = spec.build_config({**extra, option.key: value}, str(tmp_path / spec.folder))
                assert config is not None
            for value in refuse:
                with pytest.raises(ValueError) as info:
                    spec.build_config({**extra, option.key: value}, str(tmp_path / spec.folder))
                assert re.search(option.key.replace("_", "[-_]"), str(info.value)), (spec.name, option.name, info.value)
            checked += bool(refuse)
    assert checked >= 30


def test_wit_train_config_checks_a_train_section_as_wit_run_does(tmp_path, monkeypatch):
    """`wit train --config FILE` and `wit run FILE` take a train section's values through the same
    checks (types, bounds, paths against the file's folder, 2e-3 as a number) to the same config."""
    from click.testing import CliRunner

    from wit.pipeline.cli import cli
    from wit.train.config import TrainConfig

    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.warc.gz").write_bytes(b"")
    base = "root: out\nextract: {sources: [web]}\ncurate: {}\ndownload: {}\nfilter: {}\nshard: {}\n"
    path = tmp_path / "p.yaml"
    path.write_text(base + "train: {model: m.json, batch-size: 1, lr: 2e-3, resume: auto}\n")
    config = TrainConfig.from_yaml(str(path))
    assert config == PipelineConfig.from_yaml(str(path)).config("train")
    assert (config.model, config.batch_size, config.lr) == (str(tmp_path / "m.json"), 1, 0.002)
    assert TrainConfig.from_yaml(str(path), batch_size=4, steps=3) == replace(config, batch_size=4, steps=3)
    for section, message in (
        ("{batch-size: 0}", "batch_size must be >= 1, got 0"),
        ("{batch-size: lots}", "train.batch-size: expected an integer"),
    ):
        path.write_text(base + f"train: {section}\n")
        for build in (lambda: TrainConfig.from_yaml(str(path)), lambda: PipelineConfig.from_yaml(str(path))):
            with pytest.raises(ValueError, match=message):
                build()
    # the command refuses it before training
    monkeypatch.setattr("wit.train.loop.train", lambda *args: pytest.fail("trained"))
    args = ["train", str(tmp_path / "dataset"), "-o", str(tmp_path / "t"), "--config", str(path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "train.batch-size: expected an integer" in result.output


def test_wit_run_with_the_ray_executor_gives_the_local_digests(copy, ray_cluster, run_wit):
    """The whole pipeline again through `wit run --executor ray`, into the same root (filter's rows
    name the downloaded shards by URL): every data stage as the local executor made it, then train
    and eval."""
    from conftest import stage_digests

    folder, port = copy
    data = [s for s in STAGES if registry.get(s).runs_partitions]
    outs = {s: str(folder / "out" / FOLDERS[s]) for s in data}
    local = stage_digests(outs)
    shutil.rmtree(folder / "out")
    with SyntheticWebServer(folder / "web", port=port):
        proc = run_wit("run", folder / "pipeline.yaml", "--executor", "ray", env=ray_cluster, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stage_digests(outs) == local
    for stage in STAGES:
        assert f"{stage:<9} done" in proc.stdout, proc.stdout
