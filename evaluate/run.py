"""``evaluate()``: a suite of tasks on one checkpoint, as a stage with one partition per task.

Flow: load the checkpoint once → open every task's dataset and take the digests of the splits it
needs (bad input fails here, before any encoding) → build the text classifiers of all zero-shot
tasks in one batched pass → run the partitions in order: one per task (image features from the
cache or encoded now; metrics with intervals; a part file of ``EVAL_RESULTS`` rows and a
``tasks/NAME.json`` detail file), then a last ``report`` partition that writes ``results.json``,
``report.md``, ``report.html`` and ``report/*.png`` from the detail files → ``_run.json`` last.

The partitions are committed through ``wit.manifests.stage`` (markers, pin, finalize), so a run
that is killed resumes at the first uncommitted task, and a finished folder is returned as is.
The report partition must run after the task partitions: the driver here runs them in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from wit.manifests import storage
from wit.manifests.manifest import FileInfo, ManifestError, ManifestRef, read_table
from wit.manifests.options import Option, check_options, field_default
from wit.manifests.runrecord import read_run_record
from wit.manifests.schemas import EVAL_RESULTS
from wit.manifests.stage import (
    Partition,
    PartitionResult,
    StageError,
    commit_partition,
    finalize,
    finished,
    open_run,
    resolve_inputs,
)
from wit.train.checkpoint import LoadedModel, load_model

from . import metrics as M
from .datasets import DEFAULT_TEMPLATES, Dataset, open_dataset
from .errors import DatasetMissing, EvalError
from .features import Encoder, FeatureCache, ImageFeatures, split_features
from .mirror import mirror_digest
from .probe import DEFAULT_CS, fewshot, linear_probe
from .report import build_blocks, render_html, render_markdown, results_json, suite_summary
from .tasks import Suite, TaskSpec, load_suite, suite_of


def default_cache() -> str:
    """``$WIT_CACHE/eval-features``, or ``~/.cache/wit/eval-features``."""
    root = os.environ.get("WIT_CACHE") or str(Path.home() / ".cache" / "wit")
    return storage.join(root, "eval-features")


PRECISIONS = ("auto", "fp32", "bf16", "amp")


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """How to evaluate (not what: that is the suite). Validated once, here."""

    model: str | None = None  # architecture of a foreign (open_clip) checkpoint; wit checkpoints name their own
    data_root: str | None = None  # what a suite's {data_root} stands for: a CLIP_benchmark-layout mirror
    # published weights instead of a checkpoint: an open_clip tag of `model`, hf-hub:ORG/REPO or a file
    # (wit train --pretrained's resolution: train/pretrained.py, through open_clip's own loader)
    pretrained: str | None = None
    device: str = "auto"  # auto: cuda when there is one
    batch_size: int = 0  # 0: 64 on a CPU (its caches favour small batches), 256 on a GPU
    precision: str = "auto"  # auto: amp on a GPU, fp32 on a CPU; fp32; bf16; amp (fp16 on CUDA, bf16 on CPU)
    threads: int = 0  # image decode threads; 0: min(8, cores)
    cache: str | None = field(default_factory=default_cache)  # None or "": no feature cache
    resamples: int = M.DEFAULT_RESAMPLES
    seed: int = 0
    probe_cs: tuple[float, ...] = DEFAULT_CS
    fewshot_c: float = 10.0
    progress: bool = False  # a line per task on stderr

    def __post_init__(self) -> None:
        if self.batch_size < 0:
            raise EvalError("batch_size must be at least 1 (or 0: chosen by device)")
        if self.precision not in PRECISIONS:
            raise EvalError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.threads < 0:
            raise EvalError("threads must be 0 (automatic) or more")
        if self.resamples < 0:
            raise EvalError("resamples must be 0 (no intervals) or more")
        if not self.probe_cs or any(c <= 0 for c in self.probe_cs):
            raise EvalError("probe_cs must be positive")
        if self.fewshot_c <= 0:
            raise EvalError("fewshot_c must be positive")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda", "mps")):
            raise EvalError(f"unknown device {self.device!r}; expected auto, cpu, cuda[:N] or mps")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_batch_size(self) -> int:
        return self.batch_size or (64 if self.resolved_device().startswith("cpu") else 256)

    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the forward passes; None: plain fp32."""
        cpu = self.resolved_device().startswith("cpu")
        if self.precision == "fp32" or (self.precision == "auto" and cpu):
            return None
        if self.precision == "bf16" or cpu:
            return torch.bfloat16
        return torch.float16


@dataclass(frozen=True, slots=True)
class EvalStageConfig:
    """The eval stage's config (`wit eval`, a pipeline's ``eval:`` section): which suite, and how.

    ``suite`` is a built-in name, a suite YAML URL, or an inline suite as YAML text. It is loaded
    once, when the config is made (so an unknown or broken suite fails before any stage runs), and
    kept: :meth:`load_suite` gives that parse, which the record's config and the run both use.
    """

    suite: str = "default"
    config: EvalConfig = field(default_factory=EvalConfig)
    # the parsed suite (not compared: it follows from `suite`); set in __post_init__
    parsed: Suite | None = field(default=None, init=False, compare=False, repr=False)

    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "suite",
            "suite",
            suite,
            "A built-in suite (default, digits, synthetic-colour, ...) or a suite YAML URL.",
            metavar="NAME_OR_YAML",
        ),
        Option(
            "model",
            "str",
            None,
            "Architecture of a foreign open_clip checkpoint (wit checkpoints name their own).",
            metavar="NAME",
        ),
        Option(
            "data-root",
            "path",
            None,
            "Where the suite's datasets are: a mirror in CLIP_benchmark's WebDataset layout "
            "(ROOT/wds_<name>/test/*.tar), local, s3:// or hf://datasets/clip-benchmark.",
            metavar="URL",
        ),
        Option(
            "pretrained",
            "str",
            None,
            "Published weights instead of CHECKPOINT: an open_clip tag of --model (laion2b_s34b_b79k), "
            "hf-hub:ORG/REPO, or a file, read by open_clip's own loader.",
            metavar="TAG_OR_FILE",
        ),
        Option("device", "str", field_default(EvalConfig, "device"), "auto, cpu or cuda[:N]."),
        Option("batch-size", "int", field_default(EvalConfig, "batch_size"), "0: 64 on a CPU, 256 on a GPU.", low=0),
        Option(
            "precision",
            "str",
            field_default(EvalConfig, "precision"),
            "auto: amp on a GPU, fp32 on a CPU. bf16 is ~2.5x faster on CPUs with AVX512-BF16 or AMX.",
            choices=PRECISIONS,
        ),
        Option("cache", "path", None, "Image-feature cache (default: ~/.cache/wit).", metavar="URL"),
        Option("no-cache", "bool", False, "Encode every image again."),
        Option(
            "resamples",
            "int",
            field_default(EvalConfig, "resamples"),
            "Bootstrap resamples for the 95% intervals (0: no intervals).",
            low=0,
        ),
    )

    @classmethod
    def from_options(cls, values: Mapping[str, Any], out: str | None = None) -> EvalStageConfig:
        """The config of these option values (its suite loaded here, once: see the class docstring)."""
        v = check_options(cls.OPTIONS, values, "eval")
        config = EvalConfig(
            model=v["model"],
            data_root=v["data_root"],
            pretrained=v["pretrained"],
            device=v["device"],
            batch_size=v["batch_size"],
            precision=v["precision"],
            cache=None if v["no_cache"] else (v["cache"] or default_cache()),
            resamples=v["resamples"],
            progress=True,
        )
        return cls(suite=v["suite"], config=config)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parsed", suite_of(self.suite, "pipeline"))

    def load_suite(self) -> Suite:
        """The suite, as loaded when this config was made."""
        return self.parsed

    def recorded_config(self, inputs: list[ManifestRef]) -> dict:
        """What the run record of evaluating the checkpoint of ``inputs[0]`` (a train output) holds
        of this config: the part of evaluate()'s recorded config that its caller decides."""
        return decided_config(checkpoint_of(inputs[0].url), self.load_suite(), self.config)


def decided_config(checkpoint: str, suite: Suite, config: EvalConfig) -> dict:
    """The part of eval's recorded config that its caller decides (evaluate() adds what it finds:
    the model, the checkpoint's and the datasets' digests)."""
    return {
        "checkpoint": storage.normalize(checkpoint),
        "pretrained": config.pretrained,
        "suite": suite.to_dict(),
        "resamples": config.resamples,
        "seed": config.seed,
        "probe_cs": list(config.probe_cs),
        "fewshot_c": config.fewshot_c,
    }


def checkpoint_of(train_out: str) -> str:
    """The checkpoint a finished train output names as its last (``extra.checkpoint`` of its run record)."""
    rec = read_run_record(train_out)
    if rec is None or not rec.extra.get("checkpoint"):
        raise StageError(f"{storage.normalize(train_out)}: not a finished train output (no checkpoint in _run.json)")
    return storage.join(storage.normalize(train_out), rec.extra["checkpoint"])


def eval_stage(config: EvalStageConfig, inputs: list[ManifestRef], out: str, progress: bool = True) -> EvalResult:
    """The eval stage of a pipeline: the checkpoint of ``inputs[0]`` (a finished train output) on the suite."""
    return evaluate(checkpoint_of(inputs[0].url), out, config.load_suite(), replace(config.config, progress=progress))


@dataclass(slots=True)
class EvalResult:
    ref: ManifestRef  # the results manifest (kind eval_results)
    out: str
    rows: list[dict]
    results_json: str
    report_md: str
    report_html: str
    images_encoded: int = 0  # images run through the model in this call (0 when all came from the cache)
    images_cached: int = 0
    reused: bool = False  # the output folder already held this finished run
    seconds: float = 0.0  # wall time of the call: model load, classifiers, encoding, metrics, report


def _sha_text(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class Session:
    """What the partitions of one evaluate() call share: the model, the opened datasets, the cache."""

    def __init__(self, checkpoint: str, suite: Suite, config: EvalConfig, loaded: LoadedModel):
        self.config = config
        self.suite = suite
        self.checkpoint = storage.normalize(checkpoint)
        self.device = config.resolved_device()
        self.use(loaded)  # load_for_eval's model, or the trainer's at an evaluation step
        self.cache = FeatureCache(config.cache or None)
        self.full_suite = suite  # with the tasks whose datasets are missing (self.suite has the rest)
        self.missing: dict[str, str] = {}  # task -> why it was not run (its dataset is not there)
        self.datasets: dict[tuple[str, str | None], Dataset] = {}
        self.splits: dict[tuple[str, str], object] = {}
        self.images_cached = 0

    def use(self, loaded: LoadedModel) -> None:
        """Evaluate ``loaded`` from now on (the trainer's callback: the model of each evaluation
        step); the opened datasets stay, the text classifiers made by the previous model go."""
        self.loaded = loaded
        self.encoder = Encoder(
            loaded.model,
            loaded.preprocess,
            loaded.tokenizer,
            self.device,
            self.config.resolved_batch_size(),
            self.config.threads,
            self.config.autocast_dtype(),
        )
        self.text: dict[str, np.ndarray] = {}  # task -> (classes, templates, dim)

    # -- data ---------------------------------------------------------------------------------
    def dataset(self, task: TaskSpec) -> Dataset:
        key = (task.dataset, task.format)
        if key not in self.datasets:
            self.datasets[key] = open_dataset(task.dataset, task.format)
        return self.datasets[key]

    def split(self, task: TaskSpec, name: str):
        key = (task.dataset, name)
        if key not in self.splits:
            self.splits[key] = self.dataset(task).split(name)
        return self.splits[key]

    def needed_splits(self, task: TaskSpec) -> list[tuple[TaskSpec, str]]:
        """(the task whose dataset holds it, split) of each split the task reads."""
        if task.kind in ("linear_probe", "fewshot"):
            return [(task.training_task(), task.train_split), (task, task.split)]
        return [(task, task.split)]

    def classnames(self, task: TaskSpec) -> list[str]:
        ds = self.dataset(task)
        names = list(task.classnames) if task.classnames else ds.classnames
        if not names:
            where = f"{ds.source}/classnames.txt" if ds.format in ("wds", "folder") else ds.source
            raise EvalError(f"task {task.name}: no class names ({where} is missing; give classnames: in the suite)")
        return names

    def templates(self, task: TaskSpec) -> list[str]:
        return list(task.templates or self.dataset(task).templates or DEFAULT_TEMPLATES)

    def features(self, task: TaskSpec, split: str) -> ImageFeatures:
        s = self.split(task, split)
        feats = split_features(self.encoder, self.cache, self.loaded.digest, self.loaded.name, s)
        if feats.cached:
            self.images_cached += len(feats.keys)
        if len(feats.keys) == 0:
            skipped = ", ".join(f"{v} {k}" for k, v in feats.skipped.items()) or "no samples"
            raise EvalError(
                f"task {task.name}: split {split!r} of {self.dataset(task).source} has no usable image ({skipped})"
            )
        return feats

    # -- text ---------------------------------------------------------------------------------
    def build_text_classifiers(self, tasks: list[TaskSpec]) -> None:
        """Prompt embeddings of every zero-shot task, in one batched pass over all their texts."""
        todo = [t for t in tasks if t.kind == "zeroshot_classification" and t.name not in self.text]
        texts, shapes = [], []
        for t in todo:
            names, temps = self.classnames(t), self.templates(t)
            texts.extend(tmpl.replace("{c}", c) for c in names for tmpl in temps)
            shapes.append((t.name, len(names), len(temps)))
        if not texts:
            return
        emb = self.encoder.encode_texts(texts)
        at = 0
        for name, c, k in shapes:
            self.text[name] = emb[at : at + c * k].reshape(c, k, -1)
            at += c * k


class EvalStage:
    """The stage contract for one suite: partitions are the tasks, then the report."""

    name = "eval"
    kind = "eval_results"

    def __init__(self, session: Session):
        self.session = session

    def partitions(self, config, inputs) -> list[Partition]:
        tasks = self.session.suite.tasks
        parts = [Partition(i, t.name) for i, t in enumerate(tasks)]
        return parts + [Partition(len(tasks), "report")]

    def run_partition(self, config, partition: Partition, out: str) -> PartitionResult:
        tasks = self.session.suite.tasks
        if partition.index == len(tasks):
            return self._report(config, out)
        return self._task(config, tasks[partition.index], out)

    # -----------------------------------------------------------------------------------------
    def _task(self, config: dict, task: TaskSpec, out: str) -> PartitionResult:
        s = self.session
        rows, detail, counts = measure(s, task)
        n = int(rows[0]["n"]) if rows else detail["n"]
        if s.config.progress:
            head = ", ".join(f"{r['metric']}={100 * r['value']:.1f}" for r in rows[:3])
            print(f"eval: {task.name}: {head} (n={n}{', cached' if detail['cached'] else ''})", file=sys.stderr)
        info = _commit_text(out, f"tasks/{task.name}.json", json.dumps(detail, indent=1) + "\n")
        return PartitionResult(table=pa.Table.from_pylist(rows, schema=EVAL_RESULTS), counts=counts, files=[info])

    def _report(self, config: dict, out: str) -> PartitionResult:
        tasks = []
        for t in self.session.suite.tasks:
            url = storage.join(out, f"tasks/{t.name}.json")
            if not storage.exists(url):
                raise StageError(f"{out}: task {t.name} is not committed; the report runs after every task")
            tasks.append(json.loads(storage.read_text(url)))
        run = {
            "model": self.session.loaded.name,
            "checkpoint": self.session.checkpoint,
            "checkpoint_digest": self.session.loaded.digest,
            "suite": self.session.suite.name,
            "resamples": self.session.config.resamples,
            "seed": self.session.config.seed,
        }
        full = self.session.full_suite
        groups = {t.name: t.group for t in full.tasks}
        lines = [{"name": n, "group": g} for n, g in full.summary]
        run["summary"] = suite_summary(lines, tasks, self.session.missing, groups)
        run["missing"] = dict(self.session.missing)
        blocks = build_blocks(run, tasks)
        files = [
            _commit_text(out, "results.json", results_json(run, tasks)),
            _commit_text(out, "summary.json", json.dumps(run, indent=1) + "\n"),
            _commit_text(out, "report.md", render_markdown(blocks)),
            _commit_text(out, "report.html", render_html(blocks, f"wit eval: {run['model']}")),
        ]
        files += [_commit_bytes(out, f"report/{b.name}", b.png) for b in blocks if b.type == "figure"]
        return PartitionResult(table=None, files=files)


def measure(s: Session, task: TaskSpec) -> tuple[list[dict], dict, dict]:
    """One task on the session's model: its result rows (``EVAL_RESULTS``), its detail (the
    ``tasks/NAME.json`` of a run) and its counts (kept and skipped images). Writes nothing.
    The measurement itself is the task kind's function in :data:`MEASURES`."""
    start = time.perf_counter()
    detail: dict = {
        "task": task.name,
        "kind": task.kind,
        "dataset": task.dataset,
        "chance": None,
        "group": task.group,
        "main_metric": task.main_metric,
    }
    test = s.features(task, task.split)
    skipped = dict(test.skipped)
    scores, templates_digest = MEASURES[task.kind](s, task, test, skipped, detail)
    scores = [sc for sc in scores if task.wants(sc.metric)]
    dataset_digest = s.split(task, task.split).digest
    rows = [
        {
            "task": task.name,
            "kind": task.kind,
            "metric": sc.metric,
            "value": sc.value,
            "ci_low": sc.ci_low,
            "ci_high": sc.ci_high,
            "n": sc.n,
            "checkpoint_digest": s.loaded.digest,
            "dataset_digest": dataset_digest,
            "templates_digest": templates_digest,
        }
        for sc in scores
    ]
    detail.update(
        metrics=[{k: r[k] for k in ("metric", "value", "ci_low", "ci_high", "n")} for r in rows],
        n=len(test.keys),
        skipped=skipped,
        dataset_digest=dataset_digest,
        cached=test.cached,
        encode_seconds=round(test.seconds, 3),
        seconds=round(time.perf_counter() - start, 3),
    )
    counts = {"kept": len(test.keys), **skipped}
    return rows, detail, counts


# Each kind's measurement: (session, task, test features, skipped counts to add to, detail to fill)
# -> (scores, templates digest or None).
Measured = tuple[list[M.Score], str | None]


def _retrieval(s: Session, task: TaskSpec, test: ImageFeatures, skipped: dict, detail: dict) -> Measured:
    texts = [c for caps in test.captions for c in caps]
    if not texts:
        raise EvalError(f"task {task.name}: {task.dataset} has no captions (a retrieval dataset needs txt)")
    owner = np.repeat(np.arange(len(test.captions)), [len(c) for c in test.captions])
    txt = s.encoder.encode_texts(texts)
    detail.update(captions=len(texts))
    return M.retrieval_scores(test.features @ txt.T, owner, (1, 5, 10), s.config.resamples, s.config.seed), None


def _labelled(s: Session, task: TaskSpec, test: ImageFeatures, skipped: dict, detail: dict):
    """(class names, features, labels) of the test images with a label in range; the others are
    counted ``no_label``."""
    names = _class_names(s, task)
    valid = (test.labels >= 0) & (test.labels < len(names))
    if (~valid).any():
        skipped["no_label"] = skipped.get("no_label", 0) + int((~valid).sum())
    x, y = test.features[valid], test.labels[valid]
    if len(y) == 0:
        raise EvalError(f"task {task.name}: no test image has a class label")
    detail.update(classnames=names, chance=1.0 / len(names))
    return names, x, y


def _training_split(s: Session, task: TaskSpec, n_classes: int, detail: dict) -> tuple[np.ndarray, np.ndarray]:
    fit_on = task.training_task()
    if fit_on is not task and s.classnames(fit_on) != s.classnames(task):
        raise EvalError(
            f"task {task.name}: {task.train_dataset} and {task.dataset} name their classes differently; "
            "a probe fit on one scores the other only when labels mean the same classes"
        )
    train = s.features(fit_on, task.train_split)
    keep = (train.labels >= 0) & (train.labels < n_classes)
    detail["train_digest"] = s.split(fit_on, task.train_split).digest
    if task.train_dataset is not None:
        detail["train_dataset"] = task.train_dataset
    return train.features[keep], train.labels[keep]


def _zeroshot(s: Session, task: TaskSpec, test: ImageFeatures, skipped: dict, detail: dict) -> Measured:
    cfg = s.config
    names, x, y = _labelled(s, task, test, skipped, detail)
    if task.name not in s.text:
        s.build_text_classifiers([task])
    text = s.text[task.name]
    templates = s.templates(task)
    logits = x @ M.ensemble_classifier(text).T
    single = x @ M.normalize(text[:, 0, :]).T
    scores = M.classification_scores(logits, y, len(names), "", cfg.resamples, cfg.seed)
    scores.append(M.mean_score("acc1_single_template", single.argmax(1) == y, cfg.resamples, cfg.seed))
    if task.wants("mean_average_precision_11pt") and task.metrics:  # asked for by name (VOC2007)
        scores.append(M.mean_average_precision_11pt(logits, y, len(names)))
    detail.update(templates=len(templates), confusion=M.confusion_matrix(y, logits.argmax(1), len(names)).tolist())
    return scores, _sha_text(*templates, "\n", *names)


def _linear_probe(s: Session, task: TaskSpec, test: ImageFeatures, skipped: dict, detail: dict) -> Measured:
    cfg = s.config
    names, x, y = _labelled(s, task, test, skipped, detail)
    tx, ty = _training_split(s, task, len(names), detail)
    probe = linear_probe(tx, ty, x, len(names), cfg.probe_cs, seed=cfg.seed, device=_fit_device(s))
    detail.update(
        best_c=probe.best_c,
        validation={str(k): v for k, v in probe.validation.items()},
        confusion=M.confusion_matrix(y, probe.scores.argmax(1), len(names)).tolist(),
    )
    return M.classification_scores(probe.scores, y, len(names), "lp_", cfg.resamples, cfg.seed), None


def _fewshot(s: Session, task: TaskSpec, test: ImageFeatures, skipped: dict, detail: dict) -> Measured:
    cfg = s.config
    names, x, y = _labelled(s, task, test, skipped, detail)
    tx, ty = _training_split(s, task, len(names), detail)
    scores, curve = [], {}
    for k in task.fewshot_ks:
        fs = fewshot(tx, ty, x, len(names), k, cfg.fewshot_c, cfg.seed, device=_fit_device(s))
        if fs is None:
            continue  # some class has fewer than k training examples
        top1 = fs.argmax(1) == y
        a = M.mean_score(f"fewshot_k{k}_acc1", top1, cfg.resamples, cfg.seed)
        name = f"fewshot_k{k}_mean_per_class_recall"
        scores += [a, M.mean_per_class_recall_score(name, top1, y, len(names), cfg.resamples, cfg.seed)]
        curve[str(k)] = {"value": a.value, "ci_low": a.ci_low, "ci_high": a.ci_high}
    if not curve:
        raise EvalError(f"task {task.name}: no class has {min(task.fewshot_ks)} training examples")
    detail["fewshot"] = curve
    return scores, None


MEASURES = {
    "zeroshot_classification": _zeroshot,
    "zeroshot_retrieval": _retrieval,
    "linear_probe": _linear_probe,
    "fewshot": _fewshot,
}


def _fit_device(s: Session) -> str:
    """Where probes fit: the model's CUDA device, else the CPU (their float64 sums are not MPS's)."""
    return s.device if s.device.startswith("cuda") else "cpu"


def _class_names(s: Session, task: TaskSpec) -> list[str]:
    try:
        return s.classnames(task)
    except EvalError:
        if task.kind == "zeroshot_classification":
            raise
        # A probe needs labels, not names: number the classes it finds.
        labels = s.features(task, task.split).labels
        return [f"class {i}" for i in range(int(labels.max()) + 1)]


class TrainingEval:
    """The trainer's periodic zero-shot evaluation (`wit train --eval-every N --eval-suite NAME`):
    an ``eval_callback`` for :func:`wit.train.loop.train`, which calls it on rank 0 with the bare
    model in eval mode; it returns ``{"TASK/METRIC": value}`` (every metric of every task), which
    the loop writes into ``metrics.parquet`` as ``eval/TASK/METRIC`` columns and into TensorBoard.

    The suite is loaded and its datasets opened once; each call encodes with the model as it is at
    that step (no feature cache: the weights change between calls; no bootstrap intervals unless
    ``config`` asks: a point estimate per step is what a training curve plots) and writes nothing.
    """

    def __init__(self, suite: str | Suite, model_name: str, config: EvalConfig | None = None):
        import open_clip

        self.suite = load_suite(suite) if isinstance(suite, str) else suite
        self.config = replace(config or EvalConfig(resamples=0), cache=None, progress=False)
        self.model_name = model_name
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.session: Session | None = None

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        from wit.train.models import image_transform

        loaded = LoadedModel(
            model=model,
            preprocess=image_transform(model, is_train=False),
            tokenizer=self.tokenizer,
            name=self.model_name,
            digest=f"training step {step}",
            info={},
        )
        if self.session is None:
            device = str(next(model.parameters()).device)
            self.session = Session("training", self.suite, replace(self.config, device=device), loaded)
        else:
            self.session.use(loaded)
        self.session.build_text_classifiers(list(self.suite.tasks))
        values: dict[str, float] = {}
        for task in self.suite.tasks:
            rows, _, _ = measure(self.session, task)
            values.update({f"{task.name}/{r['metric']}": float(r["value"]) for r in rows})
        return values


def _commit_bytes(out: str, name: str, data: bytes) -> FileInfo:
    storage.write_bytes(storage.join(out, name), data)
    return FileInfo(name=name, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def _commit_text(out: str, name: str, text: str) -> FileInfo:
    return _commit_bytes(out, name, text.encode("utf-8"))


def checkpoint_inputs(checkpoint: str, digest: str) -> list[ManifestRef]:
    """The lineage input of a checkpoint: the finished train output that holds it, if any
    (so lineage reads checkpoint → dataset → pages), else the checkpoint file as a source."""
    url = storage.normalize(checkpoint)
    folder = url
    for _ in range(3):
        if "/" not in folder.rstrip("/"):
            break
        folder = folder.rstrip("/").rsplit("/", 1)[0]
        try:
            rec = read_run_record(folder)
        except (ManifestError, storage.StorageError):
            rec = None
        if rec is not None and rec.stage == "train":
            return [rec.output]
    return [ManifestRef(url=url, kind="source", digest=digest)]


def load_for_eval(checkpoint: str | None, config: EvalConfig) -> LoadedModel:
    """The model to evaluate: a checkpoint file (wit's, or open_clip's with ``config.model``), or
    ``config.pretrained`` (an open_clip tag, hf-hub id or file) built by open_clip's own loader."""
    device = config.resolved_device()
    if not config.pretrained:
        if not checkpoint:
            raise EvalError("give a CHECKPOINT to evaluate, or --model NAME --pretrained TAG_OR_FILE")
        return load_model(storage.normalize(checkpoint), model=config.model, device=device)
    if checkpoint:
        raise EvalError(f"give a CHECKPOINT ({checkpoint}) or --pretrained ({config.pretrained}), not both")
    if not config.model:
        raise EvalError(f"--pretrained {config.pretrained} needs --model NAME: the architecture its weights are for")
    import open_clip

    from wit.train import pretrained
    from wit.train.models import image_transform, resolve_model

    spec = resolve_model(config.model)
    try:
        info, net = pretrained.load(config.pretrained, spec, config.model, device)
    except ValueError as exc:
        raise EvalError(str(exc)) from exc
    net.eval()
    preprocess = image_transform(net, is_train=False)
    tokenizer = open_clip.get_tokenizer(spec.name)
    return LoadedModel(net, preprocess, tokenizer, spec.name, info.sha256, {"pretrained": info.to_dict()})


def _open_datasets(session: Session, suite: Suite) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Open every split first: a missing class-names file or an empty split fails before any
    work; a dataset that is not there (DatasetMissing) puts its task in ``session.missing``.
    Returns each dataset's split digests and the URL -> dataset string of the non-built-in ones."""
    digests: dict[str, dict[str, str]] = {}
    sources: dict[str, str] = {}
    for t in suite.tasks:
        try:
            if t.kind == "zeroshot_classification":
                session.classnames(t)
            read = session.needed_splits(t)
            for spec, sp in read:
                digests.setdefault(spec.dataset, {})[sp] = session.split(spec, sp).digest
        except DatasetMissing as exc:
            if not t.skippable:
                raise EvalError(f"task {t.name}: dataset {exc}") from exc
            session.missing[t.name] = str(exc)
            continue
        for spec, _ in read:
            if session.dataset(spec).format != "builtin":
                sources[storage.normalize(spec.dataset)] = spec.dataset
    return digests, sources


def evaluate(checkpoint: str, out: str, suite: str | Suite = "default", config: EvalConfig | None = None) -> EvalResult:
    """Evaluate ``checkpoint`` on ``suite`` (a name, a YAML URL or a Suite) into the folder ``out``."""
    start = time.perf_counter()
    config = config or EvalConfig()
    suite = load_suite(suite) if isinstance(suite, str) else suite
    suite = suite.with_data_root(config.data_root)
    out = storage.normalize(out)
    loaded = load_for_eval(checkpoint, config)
    if config.pretrained:  # the record names the file the tag or hub id resolved to, and its digest
        checkpoint = loaded.info["pretrained"]["file"]
    session = Session(checkpoint, suite, config, loaded)
    digests, sources = _open_datasets(session, suite)
    if session.missing:
        present = tuple(t for t in suite.tasks if t.name not in session.missing)
        if not present:
            first = next(iter(session.missing.items()))
            raise EvalError(f"suite {suite.name}: no dataset of it was found ({first[0]}: {first[1]}, ...)")
        session.suite = replace(suite, tasks=present, summary=())
        if config.progress:
            for name, why in session.missing.items():
                print(f"eval: {name}: skipped, dataset {why}", file=sys.stderr)
    inputs = checkpoint_inputs(session.checkpoint, session.loaded.digest)
    for url, key in sources.items():
        d = _sha_text(*(f"{k}:{v}" for k, v in sorted(digests[key].items())))
        inputs.append(ManifestRef(url=url, kind="source", digest=d))
    stage_config = decided_config(session.checkpoint, suite, config) | {
        "checkpoint_digest": session.loaded.digest,
        "model": session.loaded.name,
        "dataset_digests": digests,
        "missing": session.missing,
        "mirror_sha256": mirror_digest(config.data_root),  # wit eval prepare's MIRROR.json, if any
    }
    stage = EvalStage(session)
    inputs = resolve_inputs(inputs)
    ref = finished(stage, stage_config, inputs, out)
    if ref is None:
        done = open_run(stage, stage_config, inputs, out)
        partitions = stage.partitions(stage_config, inputs)
        session.build_text_classifiers([session.suite.tasks[p.index] for p in partitions[:-1] if p.index not in done])
        for p in partitions:
            if p.index not in done:
                commit_partition(stage, p, stage.run_partition(stage_config, p, out), out)
        ref = finalize(stage, stage_config, inputs, out, len(partitions))
        reused = False
    else:
        reused = True
    rows = read_table(out, expect_kind="eval_results").to_pylist()
    return EvalResult(
        ref=ref,
        out=out,
        rows=rows,
        results_json=storage.join(out, "results.json"),
        report_md=storage.join(out, "report.md"),
        report_html=storage.join(out, "report.html"),
        images_encoded=session.encoder.images_encoded,
        images_cached=session.images_cached,
        reused=reused,
        seconds=time.perf_counter() - start,
    )
