"""`wit run PIPELINE.yaml`: every stage in order under one root, skipping what is already done.

A pipeline file names a root URL and holds one section per stage, with the options of that stage's
command (``per-query-cap`` or ``per_query_cap``)::

    root: out                      # local path (relative to this file) or s3://bucket/run
    extract: {sources: [crawl/], languages: en,de}
    curate: {per-query-cap: 20000}
    download: {image-size: 256}
    filter: {}
    shard: {samples-per-shard: 10000}
    train: {model: wit-tiny, steps: 300}
    eval: {suite: default}

:meth:`PipelineConfig.from_yaml` validates the whole file once (unknown stages and keys, types,
and every stage's own config) before anything runs. :func:`run_pipeline` then walks
extract → curate → download → filter → shard → train → eval into ``root/candidates``,
``curated``, ``downloaded``, ``filtered``, ``dataset``, ``train`` and ``eval`` (:data:`FOLDERS`); each
stage reads the previous stage's output (extract reads ``extract.sources``).

When a stage is skipped, run, or cleared. Each stage's output folder is compared with what this
run wants: the stage's resolved config and its input digests (for extract, the sha256 of each
source file, so a regenerated crawl is a changed input). A finished folder that matches is skipped.
A folder that holds another config or another input is *removed* before the stage runs again:
stage folders are fixed names under the root and the stage driver refuses to mix two configs in
one folder, and keeping old copies (``curate.old-<time>``) would silently fill a bucket; the dry
run says which folders would go. A partial folder with the same config resumes (its committed
partitions are kept; train resumes from its newest checkpoint). Since a re-run stage usually has
a new output digest, everything downstream then differs in its input and runs again, while an
upstream stage is never touched.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from wit.manifests import storage
from wit.manifests.manifest import ManifestError, ManifestRef
from wit.manifests.runrecord import read_json, read_run_record
from wit.manifests.stage import STAGE_PIN, StageError, config_dict, resolve_inputs
from wit.manifests.storage import StorageError

STAGES = ("extract", "curate", "download", "filter", "shard", "train", "eval")
# Each stage's folder under the root, named for what it holds (DESIGN.md's diagram; the report and
# `wit manifest lineage` examples use these names): root/dataset is what `wit train` reads.
FOLDERS = {
    "extract": "candidates",
    "curate": "curated",
    "download": "downloaded",
    "filter": "filtered",
    "shard": "dataset",
    "train": "train",
    "eval": "eval",
}
_PIN = f"_parts/{STAGE_PIN}"


class PipelineError(StageError):
    """A pipeline file that cannot be run as written, or a stage that failed (its message kept)."""


# ------------------------------------------------------------------------------------------------
# the options of each section: the CLI's option names, with their type and default


@dataclass(frozen=True, slots=True)
class Option:
    kind: str  # int | float | bool | str | path | strs | paths | any
    default: Any = None
    optional: bool = False  # null is allowed


def _opts(**kw: Option) -> dict[str, Option]:
    return kw


_I, _F, _B, _S, _P = "int", "float", "bool", "str", "path"
OPTIONS: dict[str, dict[str, Option]] = {
    "extract": _opts(
        sources=Option("paths", ()),
        max_page_bytes=Option(_I, 5 * 1024 * 1024),
        no_lang=Option(_B, False),
        languages=Option("strs", ()),
        workers=Option(_I, 1),
    ),
    "curate": _opts(
        queries=Option(_P, None, optional=True),
        per_query_cap=Option(_I, 20000),
        seed=Option(_I, 0),
        lang=Option("strs", ("en",)),
        min_chars=Option(_I, 5),
        max_chars=Option(_I, 1000),
        min_words=Option(_I, 2),
        blocklist=Option(_P, None, optional=True),
        allow_private_hosts=Option(_B, False),
        keep_unmatched=Option(_B, False),
        workers=Option(_I, 1),
    ),
    "download": _opts(
        image_size=Option(_I, 256),
        resize_mode=Option(_S, "border"),
        encode_format=Option(_S, "jpg"),
        encode_quality=Option(_I, 95),
        samples_per_shard=Option(_I, 10000),
        threads=Option(_I, 64),
        timeout=Option(_F, 10.0),
        retries=Option(_I, 0),
        distributor=Option(_S, "wit"),
        processes=Option(_I, 1),
        user_agent=Option(_S, None, optional=True),
        allow_private_hosts=Option(_B, False),
        workers=Option(_I, 1),
    ),
    "filter": _opts(
        min_side=Option(_I, 32),
        max_aspect_ratio=Option(_F, 3.0),
        max_pixels=Option(_I, 50_000_000),
        near_duplicate_distance=Option(_I, 4),
        reference_images=Option("refs", ()),
        decontaminate=Option(_S, None, optional=True),
        clip_score=Option(_P, None, optional=True),
        clip_model=Option(_S, None, optional=True),
        min_score=Option(_F, None, optional=True),
        keep_top=Option(_F, None, optional=True),
        rebalance=Option(_B, False),
        per_query_cap=Option(_I, None, optional=True),
        curated=Option(_P, None, optional=True),
        workers=Option(_I, 1),
    ),
    "shard": _opts(
        samples_per_shard=Option(_I, 10000),
        seed=Option(_I, 0),
        curated=Option(_P, None, optional=True),
        no_card=Option(_B, False),
        workers=Option(_I, 1),
    ),
    # train: every TrainConfig field (TrainConfig.from_dict checks the names); see _train_config
    "train": {},
    "eval": _opts(
        suite=Option("suite", "default"),
        model=Option(_S, None, optional=True),
        device=Option(_S, "auto"),
        batch_size=Option(_I, 0),
        precision=Option(_S, "auto"),
        cache=Option(_P, None, optional=True),
        no_cache=Option(_B, False),
        resamples=Option(_I, 1000),
    ),
}
# A killed training run continues from its newest checkpoint when the pipeline is run again.
TRAIN_DEFAULTS = {"resume": "auto"}


def _key(k: Any) -> str:
    return str(k).replace("-", "_")


# YAML 1.1 (PyYAML) reads 2e-3 as a string; it needs 2.0e-3. Users write 2e-3.
_EXP_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _EXP_NUMBER.match(value.strip()) else value


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith("/")


def _resolve(base: str, path: str) -> str:
    """A path relative to the pipeline file's folder, or an absolute path / URL as it is."""
    return storage.normalize(path if _is_url(path) else storage.join(base, path))


def _check(stage: str, key: str, opt: Option, value: Any, base: str) -> Any:
    """The value of one option, type-checked; paths resolved against the pipeline file."""
    where = f"{stage}.{key.replace('_', '-')}"
    if value is None:
        if opt.optional:
            return None
        raise ValueError(f"{where}: needs a value")
    kind = opt.kind
    if kind == _I and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if kind == _F and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if kind == _B and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if kind in (_S, _P) and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if kind == _F:
        return float(value)
    if kind == _P:
        return _resolve(base, value)
    if kind in ("strs", "paths", "refs"):
        # a list, or one comma-separated string (as the command line takes --languages en,de)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if kind == "strs" else [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: expected a list of strings, got {value!r}")
        value = [v.strip() for v in value]
        if kind == "paths":
            return tuple(_resolve(base, v) for v in value)
        if kind == "refs":  # [TASK=]URL
            out = []
            for v in value:
                task, sep, url = v.rpartition("=") if "=" in v.split("://")[0] else ("", "", v)
                out.append(f"{task}{sep}{_resolve(base, url)}")
            return tuple(out)
        return tuple(value)
    if kind == "suite":
        # a built-in name, a suite YAML (relative to this file), or an inline suite (a task list)
        if isinstance(value, str):
            return _resolve(base, value) if value.endswith((".yaml", ".yml")) else value
        if isinstance(value, (list, dict)):
            return yaml.safe_dump(value, sort_keys=True)
        raise ValueError(f"{where}: expected a suite name, a suite file or a list of tasks, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------
# the pipeline config


@dataclass(frozen=True, slots=True)
class EvalSpec:
    """What the eval stage needs: the suite (name, file URL or inline YAML) and how to run it."""

    suite: str
    config: Any  # wit.evaluate.run.EvalConfig

    def load_suite(self):
        from wit.evaluate.tasks import load_suite, parse_suite

        if "\n" in self.suite:  # inline
            return parse_suite(self.suite, name="pipeline")
        return load_suite(self.suite)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """A validated pipeline file: the root, each section's options and the stage configs built from them.

    ``options`` keeps the sections as given (keys with underscores, paths resolved), so that
    :meth:`with_overrides` can rebuild the configs; ``configs`` are the frozen stage configs.
    """

    root: str
    base: str  # the pipeline file's folder: relative paths resolve against it
    options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    sources: tuple[str, ...]
    configs: tuple[Any, ...] = field(repr=False)  # one per STAGES entry
    workers: tuple[int, ...] = field(repr=False)  # local processes per ingest stage (train/eval: 1)
    source: str = ""  # the file it was read from

    # -- building ----------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, url: str, overrides: Sequence[str] = ()) -> PipelineConfig:
        """Read and validate a pipeline file; ``overrides`` are ``stage.key=value`` (or ``root=URL``)."""
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
        data = {_key(k): v for k, v in data.items()}
        unknown = sorted(set(data) - {"root", *STAGES})
        if unknown:
            raise ValueError(
                f"{source}: unknown section(s) {', '.join(unknown)}; a pipeline has root and {', '.join(STAGES)}"
            )
        sections: dict[str, dict[str, Any]] = {}
        for stage in STAGES:
            sec = data.get(stage) or {}
            if not isinstance(sec, dict):
                raise ValueError(f"{source}: section {stage} must be a mapping of option: value")
            sections[stage] = {_key(k): _number(v) for k, v in sec.items()}
        root = data.get("root")
        for item in overrides:
            target, sep, raw = item.partition("=")
            if not sep or not target.strip():
                raise ValueError(f"override {item!r}: expected stage.key=value or root=URL")
            # YAML typing, so `curate.per-query-cap=50` is an int; an empty value is the empty string
            value = yaml.safe_load(raw) if raw.strip() else ""
            if target.strip() == "root":
                root = str(value)
                continue
            stage, dot, key = target.strip().partition(".")
            if not dot or stage not in STAGES:
                raise ValueError(f"override {item!r}: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
            sections[stage][_key(key)] = _number(value)
        if not isinstance(root, str) or not root:
            raise ValueError(f"{source}: 'root' must name the output folder (a path or s3://bucket/prefix)")
        root = _resolve(base, root)

        checked: dict[str, dict[str, Any]] = {}
        for stage in STAGES:
            if stage == "train":
                checked[stage] = _train_options(sections[stage], base)
                continue
            known = OPTIONS[stage]
            bad = sorted(set(sections[stage]) - set(known))
            if bad:
                names = ", ".join(k.replace("_", "-") for k in known)
                raise ValueError(f"{source}: unknown {stage} option(s) {', '.join(bad)}; known: {names}")
            checked[stage] = {
                k: _check(stage, k, opt, sections[stage][k], base) if k in sections[stage] else opt.default
                for k, opt in known.items()
            }
        if not checked["extract"]["sources"]:
            raise ValueError(f"{source}: extract.sources must name the WARC/WAT/HTML files or folders to read")
        for stage in STAGES:
            w = checked[stage].get("workers", 1) if stage not in ("train", "eval") else 1
            if w < 1:
                raise ValueError(f"{stage}.workers must be at least 1, got {w}")
        options = tuple((s, tuple(sorted(checked[s].items()))) for s in STAGES)
        return cls._build(root, base, options, source)

    @classmethod
    def _build(cls, root: str, base: str, options, source: str) -> PipelineConfig:
        from wit.ingest.extract import expand_sources

        opts = {s: dict(o) for s, o in options}
        # evaluation images to decontaminate against: exported once under the root (not inside the
        # filter folder, which a rerun clears)
        opts["filter"]["_reference_root"] = storage.join(root, "_reference")
        configs = tuple(_BUILDERS[s](opts[s]) for s in STAGES)
        sources = tuple(expand_sources(list(opts["extract"]["sources"])))
        workers = tuple(int(opts[s].get("workers", 1)) if s not in ("train", "eval") else 1 for s in STAGES)
        return cls(root, base, options, sources, configs, workers, source)

    def with_overrides(self, overrides: Sequence[str]) -> PipelineConfig:
        """The same pipeline with ``stage.key=value`` overrides applied (validated again)."""
        if not overrides:
            return self
        data: dict[str, Any] = {"root": self.root}
        for stage, opts in self.options:
            data[stage] = {k: v for k, v in opts if not (stage == "train" and TRAIN_DEFAULTS.get(k) == v)}
        return PipelineConfig.from_dict(data, base=self.base, overrides=overrides, source=self.source)

    # -- reading -----------------------------------------------------------------------------------

    def config(self, stage: str) -> Any:
        return self.configs[STAGES.index(stage)]

    def url(self, stage: str) -> str:
        """The output folder of a stage: ``root/<FOLDERS[stage]>`` (``root/dataset`` for shard)."""
        return storage.join(self.root, FOLDERS[stage])


def _train_options(section: dict[str, Any], base: str) -> dict[str, Any]:
    from wit.train.config import TrainConfig

    opts = {**TRAIN_DEFAULTS, **section}
    model = opts.get("model")
    if isinstance(model, str) and model.endswith(".json"):
        opts["model"] = _resolve(base, model)
    try:
        TrainConfig.from_dict(opts)  # unknown keys and bad values fail here, with TrainConfig's message
    except TypeError as exc:  # a comparison of a string with a number in TrainConfig's checks
        raise ValueError(f"train: an option has the wrong type ({exc})") from exc
    return opts


def _extract_config(o: dict):
    from wit.ingest.extract import ExtractConfig

    return ExtractConfig(max_page_bytes=o["max_page_bytes"], detect_lang=not o["no_lang"], languages=o["languages"])


def _curate_config(o: dict):
    from wit.ingest.curate import CurateConfig

    return CurateConfig.build(
        queries=o["queries"],
        blocklist=o["blocklist"],
        langs=list(o["lang"]),
        per_query_cap=o["per_query_cap"],
        seed=o["seed"],
        min_chars=o["min_chars"],
        max_chars=o["max_chars"],
        min_words=o["min_words"],
        allow_private_hosts=o["allow_private_hosts"],
        keep_unmatched=o["keep_unmatched"],
    )


def _download_config(o: dict):
    from wit.ingest.download import DEFAULT_USER_AGENT, DownloadConfig

    keys = ("image_size", "resize_mode", "encode_format", "encode_quality", "samples_per_shard", "threads",
            "timeout", "retries", "distributor", "processes", "allow_private_hosts")  # fmt: skip
    return DownloadConfig(**{k: o[k] for k in keys}, user_agent=o["user_agent"] or DEFAULT_USER_AGENT)


def _filter_config(o: dict):
    from wit.ingest.filter import FilterConfig

    keys = ("min_side", "max_aspect_ratio", "max_pixels", "near_duplicate_distance", "rebalance", "per_query_cap",
            "curated")  # fmt: skip
    references = tuple(o["reference_images"])
    if o.get("decontaminate"):
        from wit.evaluate.datasets import reference_sets

        references += reference_sets(o["decontaminate"], o["_reference_root"])
    return FilterConfig.build(
        reference_images=references,
        clip_checkpoint=o.get("clip_score"),
        clip_model=o.get("clip_model"),
        min_clip_score=o.get("min_score"),
        keep_top_fraction=o.get("keep_top"),
        **{k: o[k] for k in keys},
    )


def _shard_config(o: dict):
    from wit.ingest.shard import ShardConfig

    return ShardConfig(samples_per_shard=o["samples_per_shard"], seed=o["seed"], curated=o["curated"],
                       card=not o["no_card"])  # fmt: skip


def _train_config(o: dict):
    from wit.train.config import TrainConfig

    return TrainConfig.from_dict(o)


def _eval_spec(o: dict) -> EvalSpec:
    from wit.evaluate.run import EvalConfig, default_cache

    config = EvalConfig(
        model=o["model"],
        device=o["device"],
        batch_size=o["batch_size"],
        precision=o["precision"],
        cache=None if o["no_cache"] else (o["cache"] or default_cache()),
        resamples=o["resamples"],
        progress=True,
    )
    spec = EvalSpec(suite=o["suite"], config=config)
    spec.load_suite()  # an unknown suite or a bad inline one fails now, not after training
    return spec


_BUILDERS: dict[str, Callable[[dict], Any]] = {
    "extract": _extract_config,
    "curate": _curate_config,
    "download": _download_config,
    "filter": _filter_config,
    "shard": _shard_config,
    "train": _train_config,
    "eval": _eval_spec,
}


# ------------------------------------------------------------------------------------------------
# deciding: run or skip, and why


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # "run" | "skip"
    why: str
    clear: bool = False  # the folder holds another config or input: remove it first


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


def _phases(stage: str) -> list[tuple[Any, str]]:
    if stage == "extract":
        from wit.ingest.extract import EXTRACT

        return [(EXTRACT, "")]
    if stage == "curate":
        from wit.ingest.curate import CURATE_PHASES

        return CURATE_PHASES
    if stage == "download":
        from wit.ingest.download import DOWNLOAD

        return [(DOWNLOAD, "")]
    if stage == "filter":
        from wit.ingest.filter import FILTER_PHASES

        return FILTER_PHASES
    if stage == "shard":
        from wit.ingest.shard import SHARD_PHASES

        return SHARD_PHASES
    raise AssertionError(stage)


def _diff(have: dict, want: dict, limit: int = 3) -> str:
    """``key a→b`` for the top-level keys that differ."""
    keys = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    parts = [f"{k} {_short(have.get(k))}→{_short(want.get(k))}" for k in keys[:limit]]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(parts) + more


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _compare(stage_name: str, config: dict, inputs: list[dict] | None, have: dict, what: str) -> str | None:
    """Why a run record or pin (``have``) is not this run, or None when it is.

    ``inputs`` None means "not known yet" (a later phase of a partial run): not compared.
    """
    if have.get("stage") != stage_name:
        return f"{what} holds a {have.get('stage')} run"
    if have.get("config") != config:
        return f"config changed: {_diff(have.get('config') or {}, config)}"
    if inputs is not None and have.get("inputs") != inputs:
        return f"input changed: {_input_diff(have.get('inputs') or [], inputs)}"
    return None


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


def _decide_ingest(stage: str, config: Any, inputs: list[ManifestRef], out: str) -> Decision:
    want_config = config_dict(config)
    want_inputs = [i.to_dict() for i in inputs]
    phases = _phases(stage)
    prev_out: dict | None = None
    finished_all, partial = True, False
    for k, (phase, sub) in enumerate(phases):
        url = storage.join(out, sub) if sub else out
        expect_inputs = want_inputs if k == 0 else ([prev_out] if prev_out else None)
        rec = _read_json_or_none(storage.join(url, "_run.json"))
        if rec is not None:
            why = _compare(phase.name, want_config, expect_inputs, rec, url)
            if why:
                return Decision("run", why, clear=True)
            prev_out = rec.get("output")
            partial = True
            continue
        finished_all, prev_out = False, None
        pinned = _read_json_or_none(storage.join(url, _PIN))
        if pinned is not None:
            why = _compare(phase.name, want_config, expect_inputs, pinned, url)
            if why:
                return Decision("run", why, clear=True)
            partial = True
    if finished_all:
        return Decision("skip", "finished")
    if partial:
        return Decision("run", "resume: same config and inputs, committed partitions are kept")
    if _has_files(out):
        return Decision("run", "folder holds no wit run (cleared)", clear=True)
    return Decision("run", "no output yet")


def _has_files(out: str) -> bool:
    return bool(storage.listdir(out, recursive=True))


def _train_record_config(rec_config: dict) -> dict:
    return {k: v for k, v in rec_config.items() if k not in ("model_resolved", "world_size")}


def _decide_train(config: Any, inputs: list[ManifestRef], out: str, upstream_ran: bool) -> Decision:
    rec = _read_json_or_none(storage.join(out, "_run.json"))
    if rec is not None:
        have = {**rec, "config": _train_record_config(rec.get("config") or {})}
        why = _compare("train", config.to_dict(), [i.to_dict() for i in inputs], have, out)
        return Decision("run", why, clear=True) if why else Decision("skip", "finished")
    if not _has_files(out):
        return Decision("run", "no output yet")
    if upstream_ran or config.resume != "auto":
        # checkpoints of a run on another dataset (or with resume off) cannot be continued
        return Decision("run", "partial run of an earlier dataset or config (cleared)", clear=True)
    return Decision("run", "resume from the newest checkpoint")


def _eval_want(spec: EvalSpec, checkpoint: str) -> dict:
    """The part of eval's recorded config that the pipeline decides (the rest follows from it)."""
    c = spec.config
    return config_dict(
        {  # JSON-shaped (lists, not tuples), as the run record holds it
            "checkpoint": storage.normalize(checkpoint),
            "suite": spec.load_suite().to_dict(),
            "resamples": c.resamples,
            "seed": c.seed,
            "probe_cs": list(c.probe_cs),
            "fewshot_c": c.fewshot_c,
        }
    )


def _decide_eval(spec: EvalSpec, checkpoint: str | None, train_ref: ManifestRef | None, out: str) -> Decision:
    if checkpoint is None or train_ref is None:
        return Decision("run", "after train runs") if storage.exists(out) else Decision("run", "no output yet")
    want = _eval_want(spec, checkpoint)
    for name in ("_run.json", _PIN):
        have = _read_json_or_none(storage.join(out, name))
        if have is None:
            continue
        have_cfg = {k: (have.get("config") or {}).get(k) for k in want}
        why = _compare("eval", want, None, {**have, "config": have_cfg}, out)
        if why is None and (have.get("inputs") or [{}])[0] != train_ref.to_dict():
            why = f"input changed: {_input_diff((have.get('inputs') or [])[:1], [train_ref.to_dict()])}"
        if why:
            return Decision("run", why, clear=True)
        return Decision("skip", "finished") if name == "_run.json" else Decision("run", "resume: tasks kept")
    if _has_files(out):
        return Decision("run", "folder holds no wit run (cleared)", clear=True)
    return Decision("run", "no output yet")


# ------------------------------------------------------------------------------------------------
# running


def source_refs_with_digests(sources: Sequence[str]) -> list[ManifestRef]:
    """Extract's inputs, each with the sha256 of its file: a changed crawl is a changed input."""
    from wit.ingest.extract import SOURCE_KIND

    return [ManifestRef(url=storage.normalize(u), kind=SOURCE_KIND, digest=storage.sha256_url(u)) for u in sources]


def _stage_range(from_stage: str | None, until_stage: str | None) -> tuple[int, int]:
    for name in (from_stage, until_stage):
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    lo = STAGES.index(from_stage) if from_stage else 0
    hi = STAGES.index(until_stage) if until_stage else len(STAGES) - 1
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


def _checkpoint_of(train_out: str) -> str | None:
    rec = read_run_record(train_out)
    if rec is None or not rec.extra.get("checkpoint"):
        return None
    return storage.join(train_out, rec.extra["checkpoint"])


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
    lo, hi = _stage_range(from_stage, until_stage)
    outcomes: list[StepOutcome] = []
    ref: ManifestRef | None = None  # the previous stage's output
    upstream_ran: str | None = None  # the first stage of this call that ran (or would)
    checkpoint: str | None = None
    if lo > 0:
        prev = STAGES[lo - 1]
        if STAGES[lo] == "eval":
            checkpoint = _checkpoint_of(config.url("train"))
            if checkpoint is None:
                raise PipelineError(f"eval reads train's checkpoint, but {config.url('train')} is not finished")
        ref = _finished_output(config, prev, STAGES[lo])
    for stage in STAGES[lo : hi + 1]:
        out = config.url(stage)
        t0 = time.perf_counter()
        try:
            decision, inputs = _decide(config, stage, ref, checkpoint, upstream_ran, dry_run)
        except _STAGE_ERRORS as exc:
            raise PipelineError(f"{stage}: {_first_line(exc)}") from exc
        if dry_run:
            note = f" (removes {out})" if decision.clear else ""
            echo(f"{stage:<9} {decision.action:<4} {decision.why}{note}")
            outcomes.append(StepOutcome(stage, f"would-{decision.action}", decision.why, out))
            if decision.action == "run":
                upstream_ran = upstream_ran or stage
                ref, checkpoint = None, None
            else:
                ref = read_run_record(out).output
                checkpoint = _checkpoint_of(out) if stage == "train" else checkpoint
            continue
        if decision.action == "skip":
            ref = read_run_record(out).output
            if stage == "train":
                checkpoint = _checkpoint_of(out)
            echo(f"{stage:<9} skip {decision.why} → {out}")
            outcomes.append(StepOutcome(stage, "skipped", decision.why, out, ref.digest))
            continue
        echo(f"{stage:<9} run  {decision.why}{' (removing the old folder)' if decision.clear else ''}")
        if decision.clear:
            storage.remove(out, recursive=True)
        try:
            result = _execute(config, stage, inputs, out, checkpoint, progress)
        except _STAGE_ERRORS as exc:
            raise PipelineError(f"{stage} failed: {_first_line(exc)}") from exc
        upstream_ran = upstream_ran or stage
        rec = read_run_record(out)
        if rec is None:  # a --part slice of a stage whose other slices are still running
            raise PipelineError(f"{stage}: not finished after running (see above); run again to resume")
        ref = rec.output
        if stage == "train":
            checkpoint = _checkpoint_of(out)
        seconds = time.perf_counter() - t0
        echo(f"{stage:<9} done {seconds:.1f} s, {rec.rows} rows, digest {ref.digest[:16] if ref.digest else '-'}")
        outcomes.append(StepOutcome(stage, "ran", decision.why, out, ref.digest, seconds, result))
    return outcomes


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _decide(
    config: PipelineConfig,
    stage: str,
    ref: ManifestRef | None,
    checkpoint: str | None,
    upstream_ran: str | None,
    dry_run: bool,
) -> tuple[Decision, list[ManifestRef]]:
    out = config.url(stage)
    if stage == "extract":
        inputs = source_refs_with_digests(config.sources)
        return _decide_ingest(stage, config.config(stage), inputs, out), inputs
    if ref is None:  # dry run: the stage before will run, so this input is not known yet
        assert dry_run and upstream_ran
        have = storage.exists(storage.join(out, "_run.json"))
        why = f"after {upstream_ran} runs (if its output changes)" if have else "no output yet"
        return Decision("run", why), []
    inputs = resolve_inputs([ref])
    if stage == "train":
        return _decide_train(config.config(stage), inputs, out, upstream_ran is not None), inputs
    if stage == "eval":
        return _decide_eval(config.config(stage), checkpoint, inputs[0], out), inputs
    return _decide_ingest(stage, config.config(stage), inputs, out), inputs


def _execute(config: PipelineConfig, stage: str, inputs: list[ManifestRef], out: str, checkpoint, progress: bool):
    workers = config.workers[STAGES.index(stage)]
    if stage == "train":
        from wit.train.loop import train

        return train(config.config(stage), inputs[0].url, out)
    if stage == "eval":
        from wit.evaluate.run import evaluate

        spec: EvalSpec = config.config(stage)
        return evaluate(checkpoint, out, spec.load_suite(), replace(spec.config, progress=progress))
    from wit.pipeline.executor import run_phases

    return run_phases(_phases(stage), config.config(stage), inputs, out, workers, progress=progress)
