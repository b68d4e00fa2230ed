"""`wit run PIPELINE.yaml`: every stage in order under one root, skipping what is already done.

A pipeline file names a root URL and holds one section per stage of the registry
(:mod:`wit.pipeline.registry`), with the options of that stage's command (``per-query-cap`` or
``per_query_cap``)::

    root: out                      # local path (relative to this file) or s3://bucket/run
    executor: local                # or ray (the partitions of the data stages as Ray tasks)
    ray-address: HEAD:6379         # with executor: ray (default: RAY_ADDRESS)
    extract: {sources: [crawl/], languages: en,de}
    curate: {per-query-cap: 20000}
    download: {image-size: 256, workers: 4}
    filter: {}
    shard: {samples-per-shard: 10000}
    train: {model: wit-tiny, steps: 300}
    eval: {suite: default}

:meth:`PipelineConfig.from_yaml` validates the whole file once (unknown stages and keys, types,
and every stage's own config, built by its config class's ``from_options`` as `wit <stage>` builds
it) before anything runs. :func:`run_pipeline` then walks the stages in registry order
(extract → curate → download → filter → shard → train → eval) into ``root/<folder>``
(``root/candidates``, ``curated``, ``downloaded``, ``filtered``, ``dataset``, ``train``, ``eval``);
each stage reads the output of the stage its entry names (extract reads ``extract.sources``).
A registered optional stage runs only when the file has its section.

When a stage is skipped, run, or cleared. Each stage's output folder is compared with what this
run wants (:func:`wit.pipeline.driver.decide`): the stage's resolved config and its input digests
(for extract, the sha256 of each source file, so a regenerated crawl is a changed input). A
finished folder that matches is skipped. A folder that holds another config or another input is
*removed* before the stage runs again: stage folders are fixed names under the root and the stage
driver refuses to mix two configs in one folder, and keeping old copies (``curate.old-<time>``)
would silently fill a bucket; the dry run says which folders would go. A partial folder with the
same config resumes (its committed partitions are kept; train resumes from its newest checkpoint).
Since a re-run stage usually has a new output digest, everything downstream then differs in its
input and runs again, while an upstream stage is never touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from wit.manifests import storage
from wit.manifests.manifest import ManifestError, ManifestRef
from wit.manifests.options import Option, check_options, option_key, resolve, yaml_number
from wit.manifests.runrecord import read_run_record
from wit.manifests.stage import StageError, resolve_inputs
from wit.manifests.storage import StorageError
from wit.pipeline import driver, registry
from wit.pipeline.driver import EXECUTOR, RAY_ADDRESS, WORKERS, Decision
from wit.pipeline.registry import StageSpec

# the source files of a stage that reads no other stage (extract): its command's SOURCE arguments
SOURCES = Option("sources", "paths", (), "The files or folders to read.")
# keys of a pipeline file that are not stage sections, as option_key spells them
TOP_LEVEL = ("root", EXECUTOR.key, RAY_ADDRESS.key)


class PipelineError(StageError):
    """A pipeline file that cannot be run as written, or a stage that failed (its message kept)."""


# ------------------------------------------------------------------------------------------------
# the pipeline config


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """A validated pipeline file: the root, the stages it runs and the config of each.

    ``data`` and ``overrides`` are what it was built from, so that :meth:`with_overrides` can
    build it again with more overrides.
    """

    root: str
    base: str  # the pipeline file's folder: relative paths resolve against it
    stages: tuple[str, ...]  # the stages this pipeline runs, in registry order
    configs: dict[str, Any] = field(repr=False)  # the frozen config of each stage
    sources: dict[str, tuple[str, ...]]  # the source files of each stage that reads sources
    workers: dict[str, int] = field(repr=False)  # local processes of each stage the executor runs
    executor: str = "local"
    ray_address: str | None = None
    data: dict = field(default_factory=dict, repr=False)
    overrides: tuple[str, ...] = ()
    source: str = ""  # the file it was read from

    # -- building ----------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, url: str, overrides: Sequence[str] = ()) -> PipelineConfig:
        """Read and validate a pipeline file; ``overrides`` are ``stage.key=value`` (or ``root=URL``,
        ``executor=ray``, ``ray-address=URL``)."""
        try:
            text = storage.read_text(url)
        except (OSError, StorageError) as exc:
            raise ValueError(f"{url}: cannot read the pipeline file ({exc})") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"{url}: not valid YAML ({first})") from exc
        norm = storage.normalize(url)
        base = norm.rsplit("/", 1)[0] if "/" in norm else "."
        return cls.from_dict(data, base=base, overrides=overrides, source=norm)

    @classmethod
    def from_dict(
        cls, data: Any, base: str = ".", overrides: Sequence[str] = (), source: str = "<dict>"
    ) -> PipelineConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a pipeline file is a mapping with 'root' and one section per stage")
        base = storage.normalize(base)
        names = registry.names()
        top = {_top_key(k, names): v for k, v in data.items()}
        unknown = sorted(set(top) - {*TOP_LEVEL, *names})
        if unknown:
            raise ValueError(
                f"{source}: unknown section(s) {', '.join(unknown)}; a pipeline has "
                f"{', '.join(k.replace('_', '-') for k in TOP_LEVEL)} and {', '.join(names)}"
            )
        sections: dict[str, dict[str, Any]] = {}
        for name in names:
            if name not in top and registry.get(name).optional:
                continue  # an optional stage runs only when the file (or an override) has its section
            sec = top.get(name) or {}
            if not isinstance(sec, dict):
                raise ValueError(f"{source}: section {name} must be a mapping of option: value")
            sections[name] = {option_key(k): yaml_number(v) for k, v in sec.items()}
        for item in overrides:
            target, sep, raw = item.partition("=")
            target = target.strip()
            if not sep or not target:
                raise ValueError(f"override {item!r}: expected stage.key=value or root=URL")
            # YAML typing, so `curate.per-query-cap=50` is an int; an empty value is the empty string
            value = yaml.safe_load(raw) if raw.strip() else ""
            if option_key(target) in TOP_LEVEL:
                top[option_key(target)] = value
                continue
            stage, dot, key = target.partition(".")
            if not dot or stage not in names:
                raise ValueError(f"override {item!r}: unknown stage {stage!r}; stages: {', '.join(names)}")
            sections.setdefault(stage, {})[option_key(key)] = yaml_number(value)
        root = top.get("root")
        if not isinstance(root, str) or not root:
            raise ValueError(f"{source}: 'root' must name the output folder (a path or s3://bucket/prefix)")
        root = resolve(base, root)
        stages = tuple(n for n in names if n in sections)
        for name in stages:
            needs = registry.get(name).input
            if needs is not None and needs not in sections:
                raise ValueError(f"{source}: {name} reads {needs}'s output; add a {needs} section")

        configs: dict[str, Any] = {}
        sources: dict[str, tuple[str, ...]] = {}
        workers: dict[str, int] = {}
        for name in stages:
            spec = registry.get(name)
            section = {**spec.section_defaults(root), **sections[name]}
            try:
                if spec.runs_partitions:
                    value = WORKERS.check(section.pop(WORKERS.key, WORKERS.default), name, base)
                    workers[name] = WORKERS.check_bounds(value, name)
                if spec.input is None:
                    urls = SOURCES.check(section.pop(SOURCES.key, SOURCES.default), name, base)
                    if not urls:
                        raise ValueError(f"{name}.sources must name the files or folders to read")
                    sources[name] = tuple(r.url for r in spec.source_refs(list(urls)))
                # paths resolved against the pipeline file; keys that are no option are the config
                # class's to refuse (or, for train, to take: every field of TrainConfig)
                values = check_options(spec.options(), section, name, base, open_keys=True)
                configs[name] = spec.build_config(values, storage.join(root, spec.folder))
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from exc
        executor = EXECUTOR.check(top.get(EXECUTOR.key, EXECUTOR.default))
        ray_address = RAY_ADDRESS.check(top.get(RAY_ADDRESS.key, RAY_ADDRESS.default))
        for name in stages:  # a config that cannot run on this executor is refused before anything runs
            if registry.get(name).runs_partitions:
                try:
                    driver.check_executor(configs[name], executor)
                except ValueError as exc:
                    raise ValueError(f"{source}: {name}: {exc}") from exc
        return cls(
            root, base, stages, configs, sources, workers, executor, ray_address, dict(data), tuple(overrides), source
        )

    def with_overrides(self, overrides: Sequence[str]) -> PipelineConfig:
        """The same pipeline with ``stage.key=value`` overrides applied after its own (validated again)."""
        if not overrides:
            return self
        return PipelineConfig.from_dict(self.data, self.base, (*self.overrides, *overrides), self.source)

    # -- reading -----------------------------------------------------------------------------------

    def config(self, stage: str) -> Any:
        return self.configs[stage]

    def url(self, stage: str) -> str:
        """The output folder of a stage: ``root/<its registry folder>`` (``root/dataset`` for shard)."""
        return storage.join(self.root, registry.get(stage).folder)

    def scheduling(self, stage: str) -> dict[str, Any]:
        """How the executor runs ``stage`` (nothing for a stage that drives itself)."""
        if not registry.get(stage).runs_partitions:
            return {}
        return {"executor": self.executor, "workers": self.workers[stage], "ray_address": self.ray_address}


def _top_key(key: Any, names: tuple[str, ...]) -> str:
    # stage names are kept as registered (a plugin's may hold a dash); other keys as options are
    return key if key in names else option_key(key)


# ------------------------------------------------------------------------------------------------
# running


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """What happened to one stage: ``action`` is ran, skipped, would-run or would-skip."""

    stage: str
    action: str
    why: str
    out: str
    digest: str | None = None  # the output digest once finished
    seconds: float = 0.0
    result: Any = None  # TrainResult / EvalResult / StageOutcome when the stage ran


def _stage_range(stages: tuple[str, ...], from_stage: str | None, until_stage: str | None) -> tuple[int, int]:
    for name in (from_stage, until_stage):
        if name is not None and name not in stages:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(stages)}")
    lo = stages.index(from_stage) if from_stage else 0
    hi = stages.index(until_stage) if until_stage else len(stages) - 1
    if lo > hi:
        raise ValueError(f"--from {from_stage} comes after --until {until_stage}")
    return lo, hi


def _finished_output(cfg: PipelineConfig, stage: str, needed_by: str) -> ManifestRef:
    rec = read_run_record(cfg.url(stage))
    if rec is None:
        raise PipelineError(
            f"{needed_by} reads {stage}'s output, but {cfg.url(stage)} is not finished: run from {stage} first"
        )
    return rec.output


# Errors a stage raises for its own reasons (bad input, storage, config); anything else is a bug
# and keeps its traceback.
_STAGE_ERRORS = (StageError, ManifestError, StorageError, ValueError, OSError)


def run_pipeline(
    config: PipelineConfig,
    from_stage: str | None = None,
    until_stage: str | None = None,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    echo: Callable[[str], Any] = print,
    progress: bool = True,
) -> list[StepOutcome]:
    """Run the stages ``from_stage``..``until_stage`` of ``config`` in order (see the module docstring).

    Returns one :class:`StepOutcome` per stage in the range. A stage that fails raises
    :class:`PipelineError` naming the stage, with the stage's own message; committed work stays,
    so the next call resumes there.
    """
    config = config.with_overrides(overrides)
    lo, hi = _stage_range(config.stages, from_stage, until_stage)
    outcomes: list[StepOutcome] = []
    # the output of each stage handled in this call (None: it would run, in a dry run), and the
    # first stage on its input chain that ran (or would): a stage after it sees a new input
    outputs: dict[str, ManifestRef | None] = {}
    first_ran: dict[str, str | None] = {}
    for name in config.stages[lo : hi + 1]:
        spec = registry.get(name)
        out = config.url(name)
        upstream = first_ran.get(spec.input) if spec.input else None
        ref = outputs[spec.input] if spec.input in outputs else _input_of(config, spec)
        t0 = time.perf_counter()
        try:
            decision, inputs = _decide(config, spec, ref, upstream)
        except _STAGE_ERRORS as exc:
            raise PipelineError(f"{name}: {_first_line(exc)}") from exc
        if dry_run:
            note = f" (removes {out})" if decision.clear else ""
            echo(f"{name:<9} {decision.action:<4} {decision.why}{note}")
            outcomes.append(StepOutcome(name, f"would-{decision.action}", decision.why, out))
            would_run = decision.action == "run"
            outputs[name] = None if would_run else read_run_record(out).output
            first_ran[name] = upstream or (name if would_run else None)
            continue
        if decision.action == "skip":
            outputs[name], first_ran[name] = read_run_record(out).output, upstream
            echo(f"{name:<9} skip {decision.why} → {out}")
            outcomes.append(StepOutcome(name, "skipped", decision.why, out, outputs[name].digest))
            continue
        echo(f"{name:<9} run  {decision.why}{' (removing the old folder)' if decision.clear else ''}")
        if decision.clear:
            storage.remove(out, recursive=True)
        try:
            result = driver.run(spec, config.config(name), inputs, out, progress=progress, **config.scheduling(name))
        except _STAGE_ERRORS as exc:
            raise PipelineError(f"{name} failed: {_first_line(exc)}") from exc
        first_ran[name] = upstream or name
        rec = read_run_record(out)
        if rec is None:  # a --part slice of a stage whose other slices are still running
            raise PipelineError(f"{name}: not finished after running (see above); run again to resume")
        outputs[name] = rec.output
        seconds = time.perf_counter() - t0
        digest = rec.output.digest
        echo(f"{name:<9} done {seconds:.1f} s, {rec.rows} rows, digest {digest[:16] if digest else '-'}")
        outcomes.append(StepOutcome(name, "ran", decision.why, out, digest, seconds, result))
    return outcomes


def _input_of(config: PipelineConfig, spec: StageSpec) -> ManifestRef | None:
    """The finished output a stage reads when the stage that writes it is not part of this call."""
    return None if spec.input is None else _finished_output(config, spec.input, spec.name)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _decide(
    config: PipelineConfig, spec: StageSpec, ref: ManifestRef | None, upstream: str | None
) -> tuple[Decision, list[ManifestRef]]:
    out = config.url(spec.name)
    if spec.input is None:
        inputs = driver.source_inputs(config.sources[spec.name])
        return driver.decide(spec, config.config(spec.name), inputs, out), inputs
    if ref is None:  # dry run: the stage it reads would run, so its input is not known yet
        have = storage.exists(storage.join(out, "_run.json"))
        why = f"after {upstream} runs (if its output changes)" if have else "no output yet"
        return Decision("run", why), []
    inputs = resolve_inputs([ref])
    return driver.decide(spec, config.config(spec.name), inputs, out, upstream is not None), inputs
