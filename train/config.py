"""The training config: one frozen dataclass, validated once, saved into every checkpoint.

The CLI builds it from options (`wit train --batch-size 32 ...`, made from ``TrainConfig.OPTIONS``)
or from a YAML file with the same keys (`TrainConfig.from_yaml(url, **overrides)`; dashes and
underscores are the same). A YAML file, or a pipeline file's ``train:`` section, may set every field;
the command line has the options in ``OPTIONS``, and ``--grad-clip`` and ``--weights`` (made by hand in
``wit.pipeline.model_commands``: a YAML file says ``grad_clip: null`` and ``weights: [1, 3]``, which
no option kind checks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from wit.manifests import storage
from wit.manifests.options import Option, check_options, option_key, yaml_number

PRECISIONS = ("fp32", "bf16", "amp")
LOSSES = ("clip", "siglip")
DECODES = ("cpu", "gpu")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    model: str = "wit-tiny"  # an open_clip model name or the URL of a JSON config
    batch_size: int = 32  # per device and per micro-batch; contrastive batch = this x grad_accum x world
    steps: int | None = None  # optimiser steps; or
    epochs: float | None = None  # passes over the dataset (needs known shard sizes); default 1 epoch
    lr: float = 5e-4
    warmup: int = 0  # linear warm-up steps, then cosine decay to 0
    weight_decay: float = 0.2  # open_clip_train's rule: not on ndim < 2, *bn*, *ln*, *bias*, logit_scale
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast) | amp (fp16 autocast + GradScaler on CUDA)
    loss: str = "clip"  # clip | siglip
    grad_accum: int = 1  # micro-batches per step, contrastive batch kept whole (feature cache)
    grad_checkpointing: bool = False
    compile: bool = False
    # DataLoader workers per rank; None: the node's cores per rank - 1, 1 to 8 (data.default_workers)
    workers: int | None = None
    decode: str = "cpu"  # cpu: JPEGs decoded by the workers | gpu: on the GPU, in the trainer (nvJPEG)
    ddp_bf16_allreduce: bool = False  # DDP all-reduces gradients in bf16 (half the bytes between nodes)
    shuffle: bool = True  # shuffle shards per epoch and samples through a seeded buffer
    shuffle_buffer: int = 1000
    augment: bool = True  # open_clip's train transform (RandomResizedCrop); False: eval transform
    resampled: bool = False  # draw shards with replacement (implied by weighted mixing)
    weights: tuple[float, ...] | None = None  # per source of an "A::B" dataset
    save_every: int | None = None  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # checkpoints kept
    resume: str | None = None  # "auto" | a checkpoint URL | None
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None  # steps between eval_callback calls
    eval_suite: str | None = None  # the suite `wit train` hands to its eval_callback (a name, a YAML URL)
    # start from these weights (an open_clip tag, "hf-hub:ID", a wit or open_clip checkpoint URL);
    # a fresh optimizer and step 0. A resume (a checkpoint of this run) wins over it: see pretrained.py
    pretrained: str | None = None
    lock_image: bool = False  # LiT: freeze the image tower (open_clip's model.lock_image_tower)
    lock_image_unlocked_groups: int = 0  # ... but its last N layer groups
    lock_image_freeze_bn_stats: bool = False  # ... and its BatchNorm running statistics
    lock_text: bool = False  # freeze the text tower (model.lock_text_tower)
    lock_text_unlocked_layers: int = 0  # ... but its last N layers
    device: str = "auto"  # auto | cpu | cuda
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, kept in the checkpoint

    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("model", "name_or_path", model, "open_clip name or JSON config.", metavar="NAME_OR_JSON"),
        Option("batch-size", "int", batch_size, "Per device.", low=1),
        Option("steps", "int", steps, "Optimiser steps (or --epochs).", low=1),
        Option("epochs", "float", epochs, low=0, low_open=True),
        Option("lr", "float", lr, "Peak learning rate.", low=0, low_open=True),
        Option("warmup", "int", warmup, "Warm-up steps.", low=0),
        Option("weight-decay", "float", weight_decay, "Not on gains, biases, norms, logit_scale (open_clip).", low=0),
        Option("precision", "str", precision, choices=PRECISIONS),
        Option("loss", "str", loss, choices=LOSSES),
        Option("grad-accum", "int", grad_accum, "Micro-batches per step.", low=1),
        Option(
            "workers",
            "int",
            workers,
            "Data loader workers per rank.  [default: the node's cores per rank - 1, 1 to 8]",
            low=0,
        ),
        Option(
            "decode",
            "str",
            decode,
            "Where JPEGs decode: cpu (the workers) or gpu (nvJPEG in the trainer; crop boxes as on cpu).",
            choices=DECODES,
        ),
        Option("save-every", "int", save_every, "Steps between checkpoints.", low=1),
        Option("keep", "int", keep, "Checkpoints kept.", low=1),
        Option("resume", "str", resume, "Continue from the newest or a given checkpoint.", metavar="auto|URL"),
        Option(
            "pretrained",
            "str",
            pretrained,
            "Start from weights: an open_clip tag of --model (openai, laion2b_s34b_b79k, ...), hf-hub:ORG/REPO, "
            "or a wit or open_clip checkpoint (any URL). Fresh optimizer and step; a checkpoint of this run "
            "found by --resume wins.",
            metavar="TAG|hf-hub:ID|URL",
        ),
        Option("lock-image", "bool", False, "Freeze the image tower (LiT)."),
        Option(
            "lock-image-unlocked-groups", "int", lock_image_unlocked_groups, "Leave its last N groups trainable.", low=0
        ),
        Option("lock-image-freeze-bn-stats", "bool", False, "Freeze its BatchNorm running statistics too."),
        Option("lock-text", "bool", False, "Freeze the text tower."),
        Option(
            "lock-text-unlocked-layers", "int", lock_text_unlocked_layers, "Leave its last N layers trainable.", low=0
        ),
        Option("eval-every", "int", eval_every, "Steps between zero-shot evaluations of --eval-suite.", low=1),
        Option(
            "eval-suite",
            "suite",
            eval_suite,
            "Suite for --eval-every: a built-in (synthetic-colour, digits, default, ...) or a suite YAML.",
            metavar="NAME_OR_YAML",
        ),
        Option("log-every", "int", log_every, "Steps between log lines and metrics rows.", low=1),
        Option("shuffle-buffer", "int", shuffle_buffer, "Samples per seeded shuffle chunk.", low=0),
        Option("resampled", "bool", False, "Draw shards with replacement (implied by --weights)."),
        Option("seed", "int", seed),
        Option("device", "str", device, "auto, cpu or cuda."),
        Option("grad-checkpointing", "bool", False),
        Option("compile", "bool", False, "torch.compile the model."),
        Option("ddp-bf16-allreduce", "bool", False, "All-reduce gradients in bf16 (DDP's bf16_compress_hook)."),
    )

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(isinstance(self.model, str) and bool(self.model), "model must be a model name or a JSON URL")
        need(_int(self.batch_size) and self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(
            self.steps is None or (_int(self.steps) and self.steps >= 1),
            f"steps must be >= 1, got {self.steps}",
        )
        need(self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        need(self.steps is None or self.epochs is None, "give steps or epochs, not both")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(_int(self.warmup) and self.warmup >= 0, f"warmup must be a step count >= 0, got {self.warmup}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(
            self.grad_clip is None or self.grad_clip > 0,
            f"grad_clip must be > 0 or None, got {self.grad_clip}",
        )
        need(
            self.precision in PRECISIONS,
            f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        need(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        need(_int(self.grad_accum) and self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(
            self.workers is None or (_int(self.workers) and self.workers >= 0),
            f"workers must be >= 0 (or None: from the cores), got {self.workers}",
        )
        need(self.decode in DECODES, f"decode must be one of {', '.join(DECODES)}, got {self.decode!r}")
        need(isinstance(self.ddp_bf16_allreduce, bool), "ddp_bf16_allreduce must be true or false")
        need(_int(self.shuffle_buffer) and self.shuffle_buffer >= 0, "shuffle_buffer must be >= 0")
        need(
            self.save_every is None or (_int(self.save_every) and self.save_every >= 1),
            "save_every must be >= 1",
        )
        need(_int(self.keep) and self.keep >= 1, f"keep must be >= 1, got {self.keep}")
        need(_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        need(_int(self.log_every) and self.log_every >= 1, "log_every must be >= 1")
        need(
            self.eval_every is None or (_int(self.eval_every) and self.eval_every >= 1),
            "eval_every must be >= 1",
        )
        need(
            self.eval_suite is None or self.eval_every is not None,
            "eval_suite needs eval_every (steps between evaluations)",
        )
        need(
            self.pretrained is None or (isinstance(self.pretrained, str) and bool(self.pretrained)),
            "pretrained must be a tag, hf-hub:ID or a checkpoint URL",
        )
        for name in ("lock_image", "lock_image_freeze_bn_stats", "lock_text"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            value = getattr(self, name)
            need(_int(value) and value >= 0, f"{name} must be >= 0, got {value!r}")
        need(
            self.lock_image or not (self.lock_image_unlocked_groups or self.lock_image_freeze_bn_stats),
            "lock_image_unlocked_groups and lock_image_freeze_bn_stats need lock_image",
        )
        need(self.lock_text or not self.lock_text_unlocked_layers, "lock_text_unlocked_layers needs lock_text")
        need(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"device must be auto, cpu or cuda, got {self.device!r}",
        )
        if self.weights is not None:
            try:  # lists from YAML; "0.7,0.3" from the command line
                weights = self.weights.split(",") if isinstance(self.weights, str) else self.weights
                object.__setattr__(self, "weights", tuple(float(w) for w in weights))
            except (TypeError, ValueError):
                need(False, f"weights must be numbers, one per source of an A::B dataset, got {self.weights!r}")
            need(all(w > 0 for w in self.weights), "weights must all be > 0")

    # -- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["weights"] is not None:
            d["weights"] = list(d["weights"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        merged = {k.replace("-", "_"): v for k, v in d.items()}
        merged.update({k.replace("-", "_"): v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "steps" in overrides and overrides["steps"] is not None:
            merged.pop("epochs", None)  # a command-line --steps wins over the file's epochs
        elif "epochs" in overrides and overrides["epochs"] is not None:
            merged.pop("steps", None)
        return cls(**merged)

    @classmethod
    def from_options(cls, values: Mapping[str, Any], out: str | None = None) -> TrainConfig:
        """The options in ``OPTIONS`` checked as the command line checks them; every other field
        as :meth:`from_dict` takes it."""
        checked = check_options(cls.OPTIONS, values, "train", open_keys=True)
        try:
            return cls.from_dict(checked)
        except TypeError as exc:  # a string compared with a number in the checks of a field not in OPTIONS
            raise ValueError(f"train: an option has the wrong type ({exc})") from exc

    @classmethod
    def from_yaml(cls, url: str, **overrides: Any) -> TrainConfig:
        """Keys of the YAML file as in this class (``batch-size`` or ``batch_size``); ``overrides``
        that are not None win (the CLI passes its options here).

        The file's values are checked as `wit run` checks a pipeline file's ``train:`` section (the
        options' types, a relative ``model`` file resolved against the file's folder, ``2e-3`` read
        as a number), then built by :meth:`from_options`, so both refuse and accept the same values.
        """
        try:
            data = yaml.safe_load(storage.read_text(url)) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{url}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{url}: a training config is a mapping of option: value")
        if isinstance(data.get("train"), dict):  # a pipeline file's train: section
            data = data["train"]
        norm = storage.normalize(url)
        base = norm.rsplit("/", 1)[0] if "/" in norm else "."
        values = {option_key(k): yaml_number(v) for k, v in data.items()}
        try:
            values = check_options(cls.OPTIONS, values, "train", base, open_keys=True)
        except ValueError as exc:
            raise ValueError(f"{url}: {exc}") from exc
        given = {option_key(k): v for k, v in overrides.items() if v is not None}
        if "steps" in given:
            values.pop("epochs", None)  # a command-line --steps wins over the file's epochs
        elif "epochs" in given:
            values.pop("steps", None)
        return cls.from_options(values | given)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
