"""Tasks and suites: what to evaluate, on which data, with which prompts and metrics.

A suite is a YAML file (or a built-in name)::

    name: my-suite
    tasks:
      - digits                               # a built-in task, by name
      - name: cifar10
        kind: zeroshot_classification        # or zeroshot_retrieval, linear_probe, fewshot
        dataset: s3://bench/wds_cifar10      # CLIP_benchmark wds folder, image folder, .csv/.parquet
        format: wds                          # optional: builtin | wds | folder | table (inferred)
        split: test
        classnames: classnames.txt           # optional: a list, or a file (relative to the YAML)
        templates: ["a photo of a {c}."]     # optional: a list, or a file
        metrics: [acc1, mean_per_class_recall]   # optional: default is every metric of the kind
        group: transfer                      # optional: the summary averages a group's first metrics
      - name: sketch-probe
        kind: linear_probe                   # fit on train_dataset's train split, tested on dataset
        dataset: s3://bench/wds_sketches     # (a shift: effective robustness in the report)
        train_dataset: s3://bench/wds_photos

A dataset written ``{data_root}/NAME`` lives under ``--data-root`` (a mirror in CLIP_benchmark's
layout: ``ROOT/wds_cifar10/test/0.tar``...); a suite may name its summary lines::

    summary:
      - {name: "mean over the transfer datasets", group: transfer}

``classnames: open_clip:imagenet`` and ``templates: open_clip:openai_imagenet`` (or
``open_clip:simple_imagenet``) take open_clip's ``zero_shot_metadata``: ImageNet's 1,000 names and
the CLIP paper's 80 prompts. The package ships ``clip-paper``, ``imagenet-robustness``, ``vtab`` and
``datacomp`` (``evaluate/suites/*.yaml``).

Built-in tasks need no download: ``digits`` (scikit-learn's handwritten digits) and the held-out
synthetic tasks; each is also a suite of one task under its own name, and ``default`` holds all.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

import yaml

from wit.manifests import storage

from .errors import EvalError

DATA_ROOT = "{data_root}"  # in a suite's dataset URL: the --data-root the run is given
SUITES_DIR = "suites"  # the package's suite files, beside this module
KINDS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "fewshot")
FORMATS = ("builtin", "wds", "folder", "table")
FEWSHOT_KS = (1, 2, 4, 8, 16)
RECALL_KS = (1, 5, 10)

# Metric names follow CLIP_benchmark's, so the JSON reads like its output.
_KIND_METRICS: dict[str, tuple[str, ...]] = {
    "zeroshot_classification": (
        "acc1",
        "acc5",
        "mean_per_class_recall",
        "acc1_single_template",
        "mean_average_precision_11pt",  # VOC2007 in the CLIP paper: PASCAL's 11-point interpolated AP
    ),
    "zeroshot_retrieval": tuple(
        f"{d}recall@{k}" for k in RECALL_KS for d in ("image_retrieval_", "text_retrieval_", "mean_")
    ),
    "linear_probe": ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"),
    "fewshot": (),  # fewshot_k{k}_acc1, fewshot_k{k}_mean_per_class_recall
}
_FEWSHOT_METRIC = re.compile(r"^fewshot_k(\d+)_(acc1|mean_per_class_recall)$")

# The CLIP paper's ImageNet-style prompt set is far too long for a 3-layer text tower that saw
# only alt text; these mirror the phrasings of the synthetic web's captions.
SHAPE_TEMPLATES = (
    "a {c}.",
    "a {c} shape.",
    "{c} icon",
    "a drawing of a {c}.",
    "{c} clipart",
    "a picture of a {c}.",
)
COLOUR_TEMPLATES = (
    "something {c}.",
    "a {c} shape.",
    "a {c} object.",
    "{c}",
    "drawn in {c}.",
    "a {c} picture.",
)
DIGIT_TEMPLATES = (
    "the number {c}.",
    "the digit {c}.",
    "number {c}",
    'a photo of the number: "{c}".',
    "hand-drawn number {c}",
    "{c}",
)
RETRIEVAL_TEMPLATES: tuple[str, ...] = ()


def metric_known(kind: str, metric: str) -> bool:
    if kind == "fewshot":
        return bool(_FEWSHOT_METRIC.match(metric))
    return metric in _KIND_METRICS[kind]


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One evaluation: a kind of measurement on one dataset split."""

    name: str
    kind: str
    dataset: str  # a URL, or a built-in dataset name
    format: str | None = None  # inferred from the dataset when None
    split: str = "test"
    train_split: str = "train"  # linear probe and few-shot fit on it (a validation part is held out)
    # where linear probe and few-shot fit, when not on ``dataset``: a probe fit on one distribution
    # and tested under a shift (CLIP paper §3.3's effective robustness)
    train_dataset: str | None = None
    classnames: tuple[str, ...] | None = None  # overrides the dataset's
    templates: tuple[str, ...] | None = None  # overrides the dataset's
    metrics: tuple[str, ...] = ()  # empty: every metric of the kind
    fewshot_ks: tuple[int, ...] = FEWSHOT_KS
    group: str | None = None  # a suite's summary averages the first metric of each task of a group
    # a dataset under --data-root: when the mirror lacks it the task is reported missing and skipped
    # (any other dataset that is not there stops the run: a typo in a path is not a missing mirror)
    skippable: bool = False

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", self.name):
            raise EvalError(f"task name {self.name!r}: use letters, digits, '-', '_' and '.'")
        if self.kind not in KINDS:
            raise EvalError(f"task {self.name}: unknown kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.format is not None and self.format not in FORMATS:
            raise EvalError(f"task {self.name}: unknown format {self.format!r}; expected one of {', '.join(FORMATS)}")
        bad = [m for m in self.metrics if not metric_known(self.kind, m)]
        if bad:
            raise EvalError(f"task {self.name}: {', '.join(bad)} is not a {self.kind} metric")
        if self.train_dataset is not None and self.kind not in ("linear_probe", "fewshot"):
            raise EvalError(f"task {self.name}: train_dataset is for linear_probe and fewshot tasks, not {self.kind}")
        if not self.fewshot_ks or any(k < 1 for k in self.fewshot_ks):
            raise EvalError(f"task {self.name}: few-shot k must be positive integers")
        if self.templates is not None:
            if not self.templates:
                raise EvalError(f"task {self.name}: templates is empty")
            for t in self.templates:
                if "{c}" not in t:
                    raise EvalError(f"task {self.name}: template {t!r} has no {{c}} placeholder")

    def wants(self, metric: str) -> bool:
        return not self.metrics or metric in self.metrics

    @property
    def main_metric(self) -> str:
        """The metric a summary averages: the first the task names, else its kind's headline."""
        if self.metrics:
            return self.metrics[0]
        if self.kind == "fewshot":
            return f"fewshot_k{max(self.fewshot_ks)}_acc1"
        return {"zeroshot_retrieval": "mean_recall@1", "linear_probe": "lp_acc1"}.get(self.kind, "acc1")

    def training_task(self) -> TaskSpec:
        """The task whose ``train_split`` a linear probe or few-shot fits on: this one, or the same
        on ``train_dataset``."""
        if self.train_dataset is None:
            return self
        return replace(self, dataset=self.train_dataset, format=None, train_dataset=None)

    def with_data_root(self, root: str | None) -> TaskSpec:
        """This task with ``{data_root}`` in its dataset replaced by ``root``."""
        if DATA_ROOT not in self.dataset and DATA_ROOT not in (self.train_dataset or ""):
            return self
        if not root:
            where = self.dataset if DATA_ROOT in self.dataset else self.train_dataset
            raise EvalError(
                f"task {self.name} reads its data from --data-root ({where}): give --data-root URL, a "
                "mirror in CLIP_benchmark's WebDataset layout (wit eval prepare makes one)"
            )
        root = root.rstrip("/")
        train = self.train_dataset.replace(DATA_ROOT, root) if self.train_dataset else None
        return replace(self, dataset=self.dataset.replace(DATA_ROOT, root), train_dataset=train, skippable=True)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    tasks: tuple[TaskSpec, ...] = field(default_factory=tuple)
    summary: tuple[tuple[str, str], ...] = ()  # (line name, task group) the report averages

    def __post_init__(self) -> None:
        if not self.tasks:
            raise EvalError(f"suite {self.name}: has no tasks")
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise EvalError(f"suite {self.name}: task names must be unique ({', '.join(dup)})")

    def to_dict(self) -> dict:
        d: dict = {"name": self.name, "tasks": [t.to_dict() for t in self.tasks]}
        if self.summary:
            d["summary"] = [{"name": n, "group": g} for n, g in self.summary]
        return d

    def with_data_root(self, root: str | None) -> Suite:
        return replace(self, tasks=tuple(t.with_data_root(root) for t in self.tasks))


def _builtin_tasks() -> dict[str, TaskSpec]:
    zs = "zeroshot_classification"
    tasks = [
        TaskSpec("digits", zs, "digits", "builtin"),
        TaskSpec("synthetic-shape", zs, "synthetic-shape", "builtin"),
        TaskSpec("synthetic-colour", zs, "synthetic-colour", "builtin"),
        TaskSpec("synthetic-digit", zs, "synthetic-digit", "builtin"),
        TaskSpec("synthetic-retrieval", "zeroshot_retrieval", "synthetic-retrieval", "builtin"),
        TaskSpec("digits-linear-probe", "linear_probe", "digits", "builtin"),
        TaskSpec("digits-fewshot", "fewshot", "digits", "builtin"),
        TaskSpec("synthetic-shape-linear-probe", "linear_probe", "synthetic-shape", "builtin"),
        TaskSpec("synthetic-shape-fewshot", "fewshot", "synthetic-shape", "builtin"),
        # a held-out shift: outline sketches of the shapes, a style the synthetic web never shows;
        # the probe fits on filled shapes (in distribution) and is tested on sketches
        TaskSpec("synthetic-shape-outline", zs, "synthetic-shape-outline", "builtin"),
        TaskSpec(
            "synthetic-shape-outline-linear-probe",
            "linear_probe",
            "synthetic-shape-outline",
            "builtin",
            train_dataset="synthetic-shape",
        ),
    ]
    return {t.name: t for t in tasks}


BUILTIN_TASKS: dict[str, TaskSpec] = _builtin_tasks()


def builtin_suites() -> dict[str, Suite]:
    suites = {"default": Suite("default", tuple(BUILTIN_TASKS.values()))}
    suites.update({name: Suite(name, (task,)) for name, task in BUILTIN_TASKS.items()})
    return suites


def _open_clip_metadata(value: str, what: str, task: str) -> tuple[str, ...]:
    """``open_clip:imagenet`` (class names), ``open_clip:openai_imagenet`` / ``open_clip:simple_imagenet``
    (templates): open_clip's ``zero_shot_metadata``, its template functions written with ``{c}``."""
    from open_clip import zero_shot_metadata as meta

    known = {
        "classnames": {"imagenet": meta.IMAGENET_CLASSNAMES},
        "templates": {
            "openai_imagenet": meta.OPENAI_IMAGENET_TEMPLATES,
            "simple_imagenet": meta.SIMPLE_IMAGENET_TEMPLATES,
        },
    }[what]
    name = value.split(":", 1)[1]
    if name not in known:
        raise EvalError(f"task {task}: {what} {value!r} is not in open_clip's metadata ({', '.join(known)})")
    items = known[name]
    return tuple(item("{c}") if callable(item) else str(item) for item in items)


def _strings(value, what: str, base: str | None, task: str) -> tuple[str, ...] | None:
    """A list given inline, or the lines of a file (a URL, or a path relative to the suite file)."""
    if value is None:
        return None
    if isinstance(value, str) and value.startswith("open_clip:"):
        return _open_clip_metadata(value, what, task)
    if isinstance(value, str):
        url = value if ("://" in value or value.startswith("/") or base is None) else storage.join(base, value)
        if not storage.exists(url):
            raise EvalError(f"task {task}: {what} file {url} not found")
        lines = [line.strip() for line in storage.read_text(url).splitlines()]
        return tuple(line for line in lines if line)
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return tuple(str(v) for v in value)
    raise EvalError(f"task {task}: {what} must be a list of strings or a file name")


def _task_from(entry, base: str | None, where: str) -> TaskSpec:
    if isinstance(entry, str):
        if entry not in BUILTIN_TASKS:
            raise EvalError(f"{where}: no built-in task {entry!r} (built-ins: {', '.join(BUILTIN_TASKS)})")
        return BUILTIN_TASKS[entry]
    if not isinstance(entry, dict):
        raise EvalError(f"{where}: a task is a built-in name or a mapping, not {type(entry).__name__}")
    known = set(TaskSpec.__dataclass_fields__)
    extra = sorted(set(entry) - known)
    if extra:
        raise EvalError(f"{where}: unknown task field(s) {', '.join(extra)}")
    for need in ("name", "kind", "dataset"):
        if need not in entry:
            raise EvalError(f"{where}: a task needs '{need}'")
    name = str(entry["name"])
    dataset = str(entry["dataset"]) if entry.get("format") == "builtin" else _dataset_url(str(entry["dataset"]), base)
    ks = entry.get("fewshot_ks", FEWSHOT_KS)
    return TaskSpec(
        name=name,
        kind=str(entry["kind"]),
        dataset=dataset,
        format=entry.get("format"),
        split=str(entry.get("split", "test")),
        train_split=str(entry.get("train_split", "train")),
        classnames=_strings(entry.get("classnames"), "classnames", base, name),
        templates=_strings(entry.get("templates"), "templates", base, name),
        metrics=tuple(str(m) for m in entry.get("metrics", ()) or ()),
        fewshot_ks=tuple(int(k) for k in ks),
        group=str(entry["group"]) if entry.get("group") is not None else None,
        train_dataset=_dataset_url(str(entry["train_dataset"]), base) if entry.get("train_dataset") else None,
    )


def _dataset_url(dataset: str, base: str | None) -> str:
    """A relative dataset path is relative to the suite file, like the class-name files."""
    from .datasets import BUILTIN_DATASETS

    relative = "://" not in dataset and not dataset.startswith(("/", DATA_ROOT))
    if base and relative and dataset not in BUILTIN_DATASETS:
        return storage.join(base, dataset)
    return dataset


def parse_suite(text: str, name: str = "suite", base: str | None = None) -> Suite:
    """A suite from YAML text; relative file names resolve against ``base`` (the suite's folder)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EvalError(f"{name}: not valid YAML ({first})") from exc
    if isinstance(data, list):
        data = {"tasks": data}
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise EvalError(f"{name}: a suite is a mapping with a 'tasks' list")
    suite_name = str(data.get("name", name))
    tasks = tuple(_task_from(t, base, f"{name} task {i}") for i, t in enumerate(data["tasks"]))
    summary = []
    for line in data.get("summary") or ():
        if not isinstance(line, dict) or not {"name", "group"} <= set(line):
            raise EvalError(f"{name}: a summary line is a mapping with 'name' and 'group'")
        summary.append((str(line["name"]), str(line["group"])))
        if summary[-1][1] not in {t.group for t in tasks}:
            raise EvalError(
                f"{name}: summary line {line['name']!r} averages group {line['group']!r}, which no task has"
            )
    return Suite(suite_name, tasks, tuple(summary))


def packaged_suites() -> dict[str, str]:
    """The suite files the package ships (``evaluate/suites/*.yaml``), by name."""
    from importlib import resources

    folder = resources.files("wit.evaluate") / SUITES_DIR
    return {p.name.rsplit(".", 1)[0]: str(p) for p in folder.iterdir() if p.name.endswith(".yaml")}


def suite_of(value: str, name: str) -> Suite:
    """A suite given as a config value: inline YAML text (it has a newline; ``name`` names it), else
    a built-in or packaged suite name or a suite YAML URL (:func:`load_suite`)."""
    return parse_suite(value, name=name) if "\n" in value else load_suite(value)


def load_suite(name_or_url: str) -> Suite:
    """A built-in suite by name (``default``, or any built-in task's name), or a suite YAML file."""
    suites = builtin_suites()
    if name_or_url in suites:
        return suites[name_or_url]
    packaged = packaged_suites()
    if name_or_url in packaged:
        return parse_suite(storage.read_text(packaged[name_or_url]), name=name_or_url)
    if not name_or_url.endswith((".yaml", ".yml")):
        names = ", ".join([*suites, *sorted(packaged)])
        raise EvalError(f"unknown suite {name_or_url!r}: give a .yaml file or one of {names}")
    if not storage.exists(name_or_url):
        raise EvalError(f"suite file {name_or_url} not found")
    url = storage.normalize(name_or_url)
    base = url.rsplit("/", 1)[0] if "/" in url else None
    stem = storage.basename(url).rsplit(".", 1)[0]
    return parse_suite(storage.read_text(url), name=stem, base=base)
