"""The stage registry: one entry per stage, in pipeline order; the CLI, `wit run`, the driver and the
report read it, never a list of their own.

An entry (:class:`StageSpec`) names the stage, its folder under a `wit run` root, its config class
(which owns the stage's options: ``OPTIONS`` and ``from_options``), the stage it reads, and how it
runs: ``phases`` (stages the executor runs partition by partition, one after the other) or ``entry``
(a function that drives itself: train, eval). Code is named by ``"module:attribute"`` strings and
imported on first use, so reading the registry imports no stage module (``wit --help`` stays fast
and never imports torch); a plugin or a test may give the objects themselves.

Adding a stage is one :func:`register` call::

    register(StageSpec(name="caption-stats", folder="caption-stats", config=CaptionStatsConfig,
                       input="extract", phases=[(CAPTION_STATS, "")], produces="caption stats",
                       optional=True))

An optional stage runs in `wit run` only when the pipeline file has its section; a registered stage
runs right after the stage it reads (after any optional stages registered there before it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wit.manifests import storage
from wit.manifests.manifest import ManifestRef
from wit.manifests.options import Option, option_key


def load(ref: Any) -> Any:
    """``"package.module:Name.attr"`` imported now; anything else is already the object."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One stage: what it is called, where it writes, what configures it, what it reads and how it runs."""

    name: str
    folder: str  # its output folder under a `wit run` root, named for what it holds (DESIGN.md)
    config: Any  # the config class (or "module:Class"): OPTIONS, from_options(values, out)
    input: str | None  # the stage whose output it reads; None: source files (its section's `sources`)
    # a stage the executor runs: [(Stage, subfolder)] in order (or "module:NAME" of that list);
    # intermediate phases write to `_name` subfolders, the last one to the folder itself ("")
    phases: Any = None
    # a stage that drives itself (or "module:function"): entry(config, inputs, out, progress)
    entry: Any = None
    kind: str | None = None  # its output's manifest kind; None: the last phase's kind
    produces: str = ""  # what its output is, in the report's titles ("shard → dataset")
    dataset: bool = False  # builds the dataset: its counts are in the report's dataset section
    optional: bool = False  # in `wit run` only when the pipeline file has its section
    # the section's options that the pipeline file adds for this stage before its own (train resumes),
    # or a function of the pipeline's root that gives them (filter's reference-root)
    pipeline_defaults: dict[str, Any] | Callable[[str], dict[str, Any]] = field(default_factory=dict)
    # (config, inputs) -> what its run record's config holds of this run, when that is not the
    # config itself (or "module:function")
    recorded_config: Any = None
    # its run record's config and inputs add what the stage found as it ran (train: the resolved
    # model, the world size; eval: the model, digests, the datasets read): "is this folder already
    # this run?" compares the rest
    record_adds: bool = False
    # for a stage that does not pin its folder while it runs (train): whether a partial folder is
    # continued, given the config (train: resume auto); None: the folder's pin decides
    resumes_partial: Callable[[Any], bool] | None = None
    sources: Any = None  # for a stage that reads source files: "module:function(urls) -> [ManifestRef]"
    rows_seen: str | None = None  # the count of what it read, when that is not its rows (extract's images)

    def __post_init__(self) -> None:
        if (self.phases is None) == (self.entry is None):
            raise ValueError(f"stage {self.name}: give phases (run by the executor) or an entry function, not both")
        if self.input is None and self.sources is None:
            raise ValueError(f"stage {self.name}: a stage that reads no other stage needs `sources`")
        if self.entry is not None and self.kind is None:
            raise ValueError(f"stage {self.name}: an entry stage names its output's kind")

    # -- loading what the strings name (imports the stage's module) ---------------------------------

    @property
    def runs_partitions(self) -> bool:
        """Its phases run on the executor (so --workers, --part and --executor apply)."""
        return self.phases is not None

    def config_class(self) -> Any:
        return load(self.config)

    def options(self) -> tuple[Option, ...]:
        return tuple(self.config_class().OPTIONS)

    def section_defaults(self, root: str) -> dict[str, Any]:
        """The options `wit run` adds to this stage's section, before the file's own, for a pipeline
        whose root is ``root``."""
        given = self.pipeline_defaults
        return {option_key(k): v for k, v in (given(root) if callable(given) else given).items()}

    def build_config(self, values: dict[str, Any], out: str | None = None) -> Any:
        """The frozen config from option values (dashes or underscores; missing ones take their default)."""
        return self.config_class().from_options(values, out)

    def load_phases(self) -> list[tuple[Any, str]]:
        return list(load(self.phases))

    def phase_names(self) -> list[tuple[str, str, Any]]:
        """(stage name in its run records, subfolder, stage) of each phase; an entry stage is one
        phase (stage None)."""
        if self.phases is None:
            return [(self.name, "", None)]
        return [(stage.name, sub, stage) for stage, sub in self.load_phases()]

    def output_kind(self) -> str:
        return self.kind or self.load_phases()[-1][0].kind

    def source_refs(self, urls: list[str]) -> list[ManifestRef]:
        return load(self.sources)(urls)


# ------------------------------------------------------------------------------------------------
# the stages of wit, in pipeline order


def _pipeline_reference_root(root: str) -> dict[str, Any]:
    # filter --decontaminate exports the suite's test sets when its config is built; in a pipeline
    # they go to root/_reference: inside the tree the pipeline file names, but outside
    # root/filtered, which `wit run` removes (after building the config) when it holds another run
    return {"reference-root": storage.join(root, "_reference")}


BUILTIN = (
    StageSpec(
        name="extract",
        folder="candidates",
        config="wit.ingest.extract:ExtractConfig",
        input=None,
        phases="wit.ingest.extract:EXTRACT_PHASES",
        produces="candidates",
        dataset=True,
        sources="wit.ingest.extract:source_refs",
        rows_seen="images_seen",  # every <img> it saw; its rows are the candidates kept
    ),
    StageSpec(
        name="curate",
        folder="curated",
        config="wit.ingest.curate:CurateConfig",
        input="extract",
        phases="wit.ingest.curate:CURATE_PHASES",
        produces="curated",
        dataset=True,
    ),
    StageSpec(
        name="download",
        folder="downloaded",
        config="wit.ingest.download:DownloadConfig",
        input="curate",
        phases="wit.ingest.download:DOWNLOAD_PHASES",
        produces="downloaded",
        dataset=True,
    ),
    StageSpec(
        name="filter",
        folder="filtered",
        config="wit.ingest.filter:FilterConfig",
        input="download",
        phases="wit.ingest.filter:FILTER_PHASES",
        produces="filtered",
        dataset=True,
        pipeline_defaults=_pipeline_reference_root,
    ),
    StageSpec(
        name="shard",
        folder="dataset",  # what `wit train` reads
        config="wit.ingest.shard:ShardConfig",
        input="filter",
        phases="wit.ingest.shard:SHARD_PHASES",
        produces="dataset",
        dataset=True,
    ),
    StageSpec(
        name="train",
        folder="train",
        config="wit.train.config:TrainConfig",
        input="shard",
        entry="wit.pipeline.model_commands:train_stage",  # with the eval callback
        kind="checkpoint",
        produces="checkpoint",
        # a killed training run continues from its newest checkpoint when the pipeline runs again
        pipeline_defaults={"resume": "auto"},
        record_adds=True,
        # checkpoints are continued only by a run that asks to (and on the same dataset: see decide)
        resumes_partial=lambda config: config.resume == "auto",
    ),
    StageSpec(
        name="eval",
        folder="eval",
        config="wit.evaluate.run:EvalStageConfig",
        input="train",
        entry="wit.evaluate.run:eval_stage",
        kind="eval_results",
        produces="results",
        recorded_config="wit.evaluate.run:EvalStageConfig.recorded_config",
        record_adds=True,
    ),
)


_STAGES: list[StageSpec] = list(BUILTIN)


def specs() -> tuple[StageSpec, ...]:
    """Every registered stage, in pipeline order."""
    return tuple(_STAGES)


def names() -> tuple[str, ...]:
    return tuple(s.name for s in _STAGES)


def get(name: str) -> StageSpec:
    for spec in _STAGES:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(names())}")


def register(spec: StageSpec) -> StageSpec:
    """Add a stage right after the stage it reads (and the optional stages registered there before it)."""
    if spec.name in names():
        raise ValueError(f"a stage named {spec.name!r} is already registered")
    if spec.name in ("root", "executor", "ray_address", "ray-address"):
        raise ValueError(f"{spec.name!r} is a top-level key of a pipeline file, not a stage name")
    if any(s.folder == spec.folder for s in _STAGES):
        raise ValueError(f"folder {spec.folder!r} is already the folder of another stage")
    at = len(_STAGES)
    if spec.input is not None:
        get(spec.input)  # it must exist
        at = names().index(spec.input) + 1
        while at < len(_STAGES) and _STAGES[at].optional:
            at += 1
    _STAGES.insert(at, spec)
    return spec


def unregister(name: str) -> None:
    """Remove a registered stage (a test's or a plugin's); the built-in stages stay."""
    if name in (s.name for s in BUILTIN):
        raise ValueError(f"{name} is a built-in stage")
    spec = get(name)
    readers = [s.name for s in _STAGES if s.input == name]
    if readers:
        raise ValueError(f"cannot unregister {name}: {', '.join(readers)} read it")
    _STAGES.remove(spec)
