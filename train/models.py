"""Model configs: open_clip names, JSON files, and the configs that ship with wit.

- ``wit-tiny``: a 64-pixel ViT (8-pixel patches, 3 layers) with a 3-layer text tower; the tests'
  model, quick to build and step.
- ``wit-tiny-rn``: open_clip's ModifiedResNet at 32 pixels (one block per stage) with the same text
  tower over 16 tokens (the synthetic web's alt texts take at most 14 in English; 16 instead of 32
  makes a CPU step 30% cheaper); the demo's model. On the synthetic world a convolutional tower
  learns shape from a few thousand pairs on two CPU cores, where the tiny ViT learns colour but
  stays near chance on shape.

Both are registered with open_clip when this module is imported, so
``open_clip.create_model_and_transforms("wit-tiny-rn", pretrained=ckpt)`` works anywhere after
``import wit.train.models``.

Also here: :func:`no_random_init_warning` (open_clip's factory warns that a model it built without
loading weights itself is "initialized randomly": true of every model the trainer builds and every
checkpoint `wit eval` loads, so that one message is dropped), and :func:`lock_towers` (LiT).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import open_clip
from open_clip import factory as _factory

from wit.manifests import storage

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A resolved model: the open_clip name it is created under and its full config."""

    name: str
    config: dict


def resolve_model(name_or_json: str) -> ModelSpec:
    """An open_clip model name, or the URL of a JSON config (registered under its file stem)."""
    if name_or_json.endswith(".json"):
        try:
            cfg = json.loads(storage.read_text(name_or_json))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name_or_json}: not a valid model config ({exc.msg})") from exc
        if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
            raise ValueError(f"{name_or_json}: a model config needs embed_dim, vision_cfg and text_cfg")
        name = Path(storage.basename(name_or_json)).stem
        register(name, cfg)
        return ModelSpec(name=name, config=cfg)
    cfg = open_clip.get_model_config(name_or_json)
    if cfg is None:
        known = ", ".join(sorted(n for n in open_clip.list_models() if "tiny" in n or n.startswith("wit")))
        raise ValueError(f"unknown model {name_or_json!r}: give a JSON config or an open_clip name ({known})")
    return ModelSpec(name=name_or_json, config=cfg)


def image_transform(model, is_train: bool):
    """open_clip's train (``is_train``: RandomResizedCrop) or eval transform for ``model``, from
    the preprocessing settings it carries (``model.visual.preprocess_cfg``: size, mean, std, ...)."""
    pp = model.visual.preprocess_cfg
    return open_clip.image_transform(
        pp["size"],
        is_train=is_train,
        mean=pp["mean"],
        std=pp["std"],
        resize_mode=pp.get("resize_mode"),
        interpolation=pp.get("interpolation"),
        fill_color=pp.get("fill_color", 0),
    )


def set_preprocess(model, preprocess: dict) -> None:
    """Give ``model`` these preprocessing settings (a pretrained tag's mean and std, a checkpoint's
    own), over the ones it has."""
    open_clip.set_model_preprocess_cfg(model, {**model.visual.preprocess_cfg, **preprocess})


def register(name: str, config: dict) -> None:
    """Make a config known to open_clip under ``name`` (a checkpoint's own config, a user's JSON)."""
    existing = open_clip.get_model_config(name)
    if existing is not None and existing != config:
        raise ValueError(f"model name {name!r} is already registered with another config")
    _factory._MODEL_CONFIGS[name] = config


def register_own(name: str, config: dict) -> str:
    """Register a checkpoint's own ``config`` and return the name open_clip builds it by: ``name``,
    or ``name@<hash of the config>`` when ``name`` already means another config (a checkpoint of
    ``wit-tiny-rn`` from before its config changed, a user's model of the same name)."""
    existing = open_clip.get_model_config(name)
    if existing is None or existing == config:
        register(name, config)
        return name
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    register(f"{name}@{digest}", config)
    return f"{name}@{digest}"


# open_clip.factory.create_model: logging.warning(f"No pretrained weights loaded for model '{name}'. ...")
RANDOM_INIT_WARNING = "No pretrained weights loaded for model"


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(RANDOM_INIT_WARNING))


@contextlib.contextmanager
def no_random_init_warning() -> Iterator[None]:
    """Build an open_clip model without its "initialized randomly" warning; every other record passes.

    open_clip logs it on the root logger whenever ``create_model`` loads no weights itself, which is
    the trainer's case (a fresh model, or weights loaded right after: a resume) and ``wit eval``'s
    (a checkpoint loaded after). A filter on the root logger (and on ``open_clip``'s own, should it
    move there) drops that one message while the model is built. ``logging.warning`` on a root
    logger without handlers would also call ``basicConfig()``, changing how every later record of
    the process is printed; so, while the model is built, such a root logger gets the handler that
    Python would use anyway (``logging.lastResort``) and loses it after.
    """
    drop = _DropRandomInitWarning()
    loggers = [logging.getLogger(), logging.getLogger("open_clip"), logging.getLogger("open_clip.factory")]
    root = loggers[0]
    borrowed = logging.lastResort if not root.handlers and logging.lastResort is not None else None
    for lg in loggers:
        lg.addFilter(drop)
    if borrowed is not None:
        root.addHandler(borrowed)
    try:
        yield
    finally:
        if borrowed is not None:
            root.removeHandler(borrowed)
        for lg in loggers:
            lg.removeFilter(drop)


def lock_towers(
    model,
    lock_image: bool = False,
    unlocked_groups: int = 0,
    freeze_bn_stats: bool = False,
    lock_text: bool = False,
    unlocked_layers: int = 0,
) -> dict | None:
    """Freeze the image and/or text tower with open_clip's own ``lock_image_tower`` /
    ``lock_text_tower`` (LiT, open_clip_train's ``--lock-image`` / ``--lock-text``): their parameters
    get ``requires_grad=False``, so the optimizer never holds them (``optim.make_optimizer`` takes
    trainable parameters only): no update, no weight decay. Returns what was locked (for the run
    record), or None when nothing is.

    ``freeze_bn_stats`` also swaps the tower's BatchNorm layers for frozen ones (ResNet towers),
    whose running statistics no longer move; without it a locked ResNet tower's weights stay put but
    its BatchNorm statistics follow the data, as in open_clip_train."""
    if not (lock_image or lock_text):
        return None
    try:
        if lock_image:
            model.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)
        if lock_text:
            model.lock_text_tower(unlocked_layers=unlocked_layers)
    except (AssertionError, NotImplementedError, AttributeError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot lock this model's towers as asked: {why}") from exc
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "image": {"unlocked_groups": unlocked_groups, "freeze_bn_stats": freeze_bn_stats} if lock_image else None,
        "text": {"unlocked_layers": unlocked_layers} if lock_text else None,
        "frozen_parameters": sum(p.numel() for _, p in frozen),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "frozen": [n for n, _ in frozen],
    }
