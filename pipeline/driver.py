"""The library driver: run one registered stage, and decide whether a folder already holds a run.

    from wit.pipeline import driver
    outcome = driver.run("curate", {"per-query-cap": 500}, ["out/candidates"], "out/curated", workers=4)

:func:`run` builds the config from option values when given a mapping (the config class's
``from_options``, as `wit <stage>` and `wit run` do), turns input URLs into refs of the kind the
stage reads, and runs the stage: a stage made of phases through the executor
(:func:`wit.pipeline.executor.run_phases`, which takes ``executor``, ``workers``, ``part`` and
``ray_address``: scheduling, never part of the config or its pin), an entry stage (train, eval) by
calling its entry function. Nothing here imports click.

:func:`decide` answers `wit run`'s question for any registered stage: is its output folder finished
with this config and these inputs (skip), a partial run of them (resume), or something else
(clear and run)? It reads the run records and pins of the stage's phases, so it is the same code
for every stage; what differs is in the registry entry (its phases, the config its record holds,
whether the record adds to it, how a partial folder without a pin resumes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wit.manifests import storage
from wit.manifests.manifest import ManifestError, ManifestRef
from wit.manifests.options import Option
from wit.manifests.runrecord import read_json
from wit.manifests.stage import STAGE_PIN, config_dict, resolve_inputs
from wit.pipeline import registry
from wit.pipeline.executor import EXECUTORS, PartSpec, phase_folders, run_phases
from wit.pipeline.registry import StageSpec, load

# Scheduling options: how the executor runs a stage's partitions (the same bytes out whichever).
# `wit <stage>` has them as flags; a pipeline file has `workers` per section and `executor`,
# `ray-address` at the top.
WORKERS = Option("workers", "int", 1, "Local processes.", low=1)
EXECUTOR = Option(
    "executor",
    "str",
    "local",
    "Where the partitions run: local processes, or Ray tasks on a cluster.",
    choices=EXECUTORS,
)
RAY_ADDRESS = Option(
    "ray-address",
    "str",
    None,
    "The Ray cluster of --executor ray (default: the RAY_ADDRESS environment variable; with neither, "
    "a local Ray instance).",
    metavar="URL",
)
_PIN = f"_parts/{STAGE_PIN}"


def spec_of(stage: str | StageSpec) -> StageSpec:
    return stage if isinstance(stage, StageSpec) else registry.get(stage)


def run(
    stage: str | StageSpec,
    config: Any,
    inputs: Sequence[ManifestRef | str],
    out: str,
    executor: str = "local",
    workers: int = 1,
    part: PartSpec | None = None,
    ray_address: str | None = None,
    progress: bool = True,
) -> Any:
    """Run (or resume) ``stage`` (a registered name or an entry) with ``config`` on ``inputs`` into ``out``.

    ``config``: the stage's config object, or a mapping of its option values. ``inputs``: refs or
    URLs (source files, folders or globs for a stage that reads sources; finished outputs of the
    stage it reads otherwise). Returns the executor's ``StageOutcome`` for a stage made of phases,
    the entry function's result (``TrainResult``, ``EvalResult``) for the others.
    """
    spec = spec_of(stage)
    out = storage.normalize(out)
    if isinstance(config, Mapping):
        config = spec.build_config(dict(config), out)
    if spec.runs_partitions:
        check_executor(config, executor)  # before any work (and before Ray is imported)
    refs = input_refs(spec, inputs)
    if spec.runs_partitions:
        phases = spec.load_phases()
        part = part or PartSpec()
        return run_phases(
            phases, config, refs, out, workers, part, progress, executor=executor, ray_address=ray_address
        )
    if executor != "local" or workers != 1 or (part is not None and part != PartSpec()) or ray_address:
        raise ValueError(
            f"{spec.name} runs in this process (torchrun for several): "
            "--executor, --workers, --part and --ray-address are for the data stages"
        )
    return load(spec.entry)(config, resolve_inputs(refs), out, progress)


def check_executor(config: Any, executor: str) -> None:
    """Refuse a config that cannot run on ``executor`` (a ValueError saying why), before any work.

    A config class says so with a ``check_executor(executor)`` method (download: img2dataset's own
    distributors cannot run inside the one-CPU tasks of ``--executor ray``); `wit <stage>` (through
    :func:`run`) and `wit run` (when it reads the pipeline file) both ask it.
    """
    check = getattr(config, "check_executor", None)
    if check is not None:
        check(executor)


def input_refs(spec: StageSpec, inputs: Sequence[ManifestRef | str]) -> list[ManifestRef]:
    """Refs for ``inputs``: URLs become source refs (a stage that reads sources) or refs of the kind
    the input stage writes, which the executor checks against the folder's run record."""
    urls = [i for i in inputs if isinstance(i, str)]
    if spec.input is None:  # files, folders and globs expand to source files, sorted
        return [i for i in inputs if isinstance(i, ManifestRef)] + (spec.source_refs(urls) if urls else [])
    kind = registry.get(spec.input).output_kind() if urls else None
    return [ManifestRef(url=storage.normalize(i), kind=kind) if isinstance(i, str) else i for i in inputs]


def source_inputs(files: Sequence[str]) -> list[ManifestRef]:
    """A source-reading stage's inputs (``files`` as its ``sources`` expanded them), each with the
    sha256 of its file: a changed crawl is a changed input."""
    # kind "source": what the stage contract passes through unresolved (no run record to read)
    return [ManifestRef(url=u, kind="source", digest=storage.sha256_url(u)) for u in files]


# ------------------------------------------------------------------------------------------------
# deciding: skip, resume or clear


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # "run" | "skip"
    why: str
    clear: bool = False  # the folder holds another config or input: remove it first


def decide(
    stage: str | StageSpec, config: Any, inputs: list[ManifestRef], out: str, upstream_ran: bool = False
) -> Decision:
    """Whether ``out`` already holds this run of ``stage`` (see the module docstring).

    ``inputs`` are resolved refs (with digests). ``upstream_ran``: a stage before this one ran in
    this pipeline run, so a partial folder of a stage that does not pin its folder (train) holds
    work on an older input and is cleared.
    """
    spec = spec_of(stage)
    recorded = load(spec.recorded_config) if spec.recorded_config is not None else None
    want_config = config_dict(recorded(config, inputs) if recorded else config)
    want_inputs = [i.to_dict() for i in inputs]
    prev_out: dict | None = None  # the output of the phase before, which the next one reads
    finished_all, partial = True, False
    first = True
    for phase, sub, stage in spec.phase_names():
        # a phase's folder, or a repeating phase's rounds (as far as they have gone)
        for url in phase_folders(stage, sub, out) if stage is not None else [out]:
            # a later phase of a partial run: its input is not known yet, so it is not compared
            expect_inputs = want_inputs if first else ([prev_out] if prev_out else None)
            first = False
            rec = _read_json_or_none(storage.join(url, "_run.json"))
            if rec is not None:
                why = _compare(spec, phase, want_config, expect_inputs, rec, url)
                if why:
                    return Decision("run", why, clear=True)
                prev_out, partial = rec.get("output"), True
                continue
            finished_all, prev_out = False, None
            pinned = _read_json_or_none(storage.join(url, _PIN))
            if pinned is not None:
                why = _compare(spec, phase, want_config, expect_inputs, pinned, url)
                if why:
                    return Decision("run", why, clear=True)
                partial = True
    if finished_all:
        return Decision("skip", "finished")
    if partial:
        return Decision("run", "resume: same config and inputs, committed partitions are kept")
    if not _has_files(out):
        return Decision("run", "no output yet")
    if spec.resumes_partial is None:
        return Decision("run", "folder holds no wit run (cleared)", clear=True)
    if upstream_ran or not spec.resumes_partial(config):
        # work on an earlier input (or a config that does not resume) cannot be continued
        return Decision("run", "partial run of an earlier input or config (cleared)", clear=True)
    return Decision("run", "resume from the newest checkpoint")


def _compare(spec: StageSpec, phase: str, config: dict, inputs: list[dict] | None, have: dict, what: str) -> str | None:
    """Why a run record or pin (``have``) is not this run, or None when it is."""
    if have.get("stage") != phase:
        return f"{what} holds a {have.get('stage')} run"
    have_config = have.get("config") or {}
    have_inputs = have.get("inputs") or []
    if spec.record_adds:  # compare what this run decides, not what the stage found as it ran
        have_config = {k: have_config.get(k) for k in config}
        have_inputs = have_inputs[: len(inputs or [])]
    if have_config != config:
        return f"config changed: {_diff(have_config, config)}"
    if inputs is not None and have_inputs != inputs:
        return f"input changed: {_input_diff(have_inputs, inputs)}"
    return None


def _diff(have: dict, want: dict, limit: int = 3) -> str:
    """``key a→b`` for the top-level keys that differ."""
    keys = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    parts = [f"{k} {_short(have.get(k))}→{_short(want.get(k))}" for k in keys[:limit]]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(parts) + more


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _input_diff(have: list[dict], want: list[dict]) -> str:
    old = {i["url"]: i.get("digest") for i in have}
    new = {i["url"]: i.get("digest") for i in want}
    for url in new:
        if url in old and old[url] != new[url]:
            return f"{storage.basename(url)} {str(old[url])[:12]}→{str(new[url])[:12]}"
    added, gone = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    parts = ([f"{len(added)} new ({storage.basename(added[0])}...)"] if added else []) + (
        [f"{len(gone)} gone ({storage.basename(gone[0])}...)"] if gone else []
    )
    return ", ".join(parts) or "order changed"


def _read_json_or_none(url: str) -> dict | None:
    try:
        return read_json(url) if storage.exists(url) else None
    except ManifestError:
        return None  # a broken control file: the folder is treated as foreign and cleared


def _has_files(out: str) -> bool:
    return bool(storage.listdir(out, recursive=True))
