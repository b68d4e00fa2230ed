"""Checkpoints on any URL, written atomically, loaded with ``weights_only=True``.

A checkpoint is one ``torch.save`` file. Its top-level ``state_dict`` is the model's weights in
open_clip's layout (no DDP ``module.`` prefix), so ``open_clip.create_model_and_transforms(name,
pretrained=path)`` loads it. Beside it, ``wit`` holds what makes the file self-describing:

    {"state_dict": {...},
     "wit": {"format": 1, "model": "wit-tiny", "model_config": {...open_clip JSON...},
             "step": int, "config": {...resolved train config...}, "dataset_digest": str, ...},
     "optimizer": ..., "scaler": ..., "rng": ..., "stream": ...}   # training state, for resume

Only tensors, numbers, strings, lists, tuples and dicts go in, so ``weights_only=True`` can load it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from wit.manifests import storage

from .models import register

FORMAT = 1


class CheckpointError(ValueError):
    """Not a loadable checkpoint: unreadable, another format, or another architecture."""


def save_checkpoint(url: str, payload: dict[str, Any]) -> str:
    """Write atomically (never a half-written checkpoint visible); returns its sha256."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    storage.write_bytes(url, data)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(url: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        data = storage.read_bytes(url)
    except storage.StorageError as exc:
        raise CheckpointError(str(exc)) from exc
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as exc:
        # torch.load's errors for truncated files and unpickling refusals are multi-line essays
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        if "Unsupported global" in text:  # weights_only refused a pickled object: say which
            culprit = text.split("Unsupported global:", 1)[1].split(" was ")[0].strip()
            first = f"it holds pickled code: {culprit}"
        raise CheckpointError(f"{url}: not a loadable checkpoint ({first})") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{url}: not a checkpoint (a {type(ckpt).__name__})")
    return ckpt


@dataclass(slots=True)
class LoadedModel:
    model: torch.nn.Module
    preprocess: Any  # the eval transform
    tokenizer: Any
    name: str
    digest: str  # sha256 of the checkpoint file (or of the open_clip pretrained file)
    info: dict  # the checkpoint's "wit" section (empty for foreign checkpoints)


_RANDOM_INITS = (
    "normal_", "trunc_normal_", "uniform_", "kaiming_normal_", "kaiming_uniform_",
    "xavier_normal_", "xavier_uniform_", "orthogonal_",
)  # fmt: skip


@contextlib.contextmanager
def skip_random_init() -> Iterator[None]:
    """Build a model without drawing its random initial weights, as transformers' ``no_init_weights``.

    Only for a model whose every parameter is loaded next, strictly: ``torch.nn.init``'s random
    fills return their tensor untouched (it keeps whatever ``torch.empty`` gave), so building a
    ViT-B/32 takes 0.16 s instead of 0.9 s on a CPU, and more for bigger towers. Buffers computed
    at construction (attention masks) are built as usual.
    """
    saved = {name: getattr(torch.nn.init, name) for name in _RANDOM_INITS}
    try:
        for name in _RANDOM_INITS:
            setattr(torch.nn.init, name, _keep)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def load_model(url: str, model: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """A model ready for inference from a wit checkpoint, or from an open_clip checkpoint file.

    For wit checkpoints the architecture comes from the file itself; ``model`` may name it and
    must then agree. For foreign (open_clip) checkpoints ``model`` is required.
    """
    import open_clip

    ckpt = load_checkpoint(url)
    info = ckpt.get("wit") if isinstance(ckpt.get("wit"), dict) else {}
    if info:
        name = info["model"]
        if model and model != name:
            raise CheckpointError(f"{url} holds a {name} model, not {model}")
        register(name, info["model_config"])
    elif model:
        name = model
    else:
        raise CheckpointError(f"{url} is not a wit checkpoint; say which architecture with --model NAME")
    state = ckpt.get("state_dict", ckpt)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    with skip_random_init():  # every parameter is overwritten by the checkpoint just below
        net, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    try:
        net.load_state_dict(state)  # strict: a parameter left out would keep uninitialised memory
    except RuntimeError as exc:
        why = str(exc).splitlines()[0]
        raise CheckpointError(f"{url}: weights do not fit the {name} architecture ({why})") from exc
    net.eval()
    digest = storage.sha256_url(url)
    return LoadedModel(net, preprocess, open_clip.get_tokenizer(name), name, digest, info)
