"""Model configs: open_clip names, JSON files, and the configs that ship with wit.

- ``wit-tiny``: a 64-pixel ViT (8-pixel patches, 3 layers) with a 3-layer text tower; the tests'
  model, quick to build and step.
- ``wit-tiny-rn``: open_clip's ModifiedResNet at 32 pixels (one block per stage) with the same text
  tower; the demo's model. On the synthetic world a convolutional tower learns shape from a few
  thousand pairs on two CPU cores, where the tiny ViT learns colour but stays near chance on shape.

Both are registered with open_clip when this module is imported, so
``open_clip.create_model_and_transforms("wit-tiny-rn", pretrained=ckpt)`` works anywhere after
``import wit.train.models``.
"""

from __future__ import annotations

import json
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


def register(name: str, config: dict) -> None:
    """Make a config known to open_clip under ``name`` (a checkpoint's own config, a user's JSON)."""
    existing = open_clip.get_model_config(name)
    if existing is not None and existing != config:
        raise ValueError(f"model name {name!r} is already registered with another config")
    _factory._MODEL_CONFIGS[name] = config
