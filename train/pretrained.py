"""Start a run from weights (`wit train --pretrained SOURCE`): what SOURCE is, its file and digest,
and the model built from it by open_clip's own loader.

SOURCE is, in this order:

- ``hf-hub:ORG/REPO``: the repository's open_clip weights (``open_clip_pytorch_model.bin``, or its
  safetensors twin) and the preprocessing of its ``open_clip_config.json``; the architecture is
  ``--model``'s (a repository of another one fails to load, strictly).
- an open_clip pretrained tag of ``--model`` (``openai``, ``laion2b_s34b_b79k``, ...:
  ``open_clip.list_pretrained_tags_by_model``), with the tag's preprocessing (mean, std, ...).
- a checkpoint file on any URL: a wit checkpoint (its model config must be ``--model``'s), or an
  open_clip / open_clip_train one (``{"state_dict": ...}`` or a bare state dict, ``module.``
  prefixes, safetensors: whatever ``open_clip.load_checkpoint`` reads).

The file of a tag or hub id is looked up in the local caches first (huggingface_hub's, and
open_clip's ``~/.cache/clip``); only a file that is not there is downloaded, by open_clip's own
downloader. Where no download can work (``HF_HUB_OFFLINE`` set, or the host's name does not resolve
and no proxy is set) that is one clear error at once, instead of a minute of retries.

A file is looked at before open_clip reads it (``checkpoint.load_weights``, memory-mapped:
one-line errors for an empty, truncated, YAML or random file), then the model is built with
``open_clip.create_model(name, pretrained=LOCAL_FILE)``, which calls ``open_clip.load_checkpoint``
(strict, with its conversions of other layouts). The run record and every checkpoint name the
source, the file and its sha256 (:meth:`Pretrained.to_dict`).

This only starts a run: the optimizer and the step start afresh. A resume (``--resume``, once a
checkpoint of the run exists) wins over it; the loop decides that before it gets here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

import open_clip
import torch

from wit.manifests import storage

from .checkpoint import CheckpointError, load_weights
from .metrics import log
from .models import ModelSpec, no_random_init_warning, set_preprocess

HF_HUB = "hf-hub:"
HF_WEIGHTS = "open_clip_pytorch_model.bin"  # open_clip.constants.HF_WEIGHTS_NAME
HF_SAFE_WEIGHTS = "open_clip_model.safetensors"  # its safetensors twin, preferred when there
HF_CONFIG = "open_clip_config.json"
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")
CHUNK = 1 << 22


@dataclass(frozen=True, slots=True)
class Pretrained:
    """Where a run's starting weights came from (for the run record and the checkpoints)."""

    source: str  # as given: a tag, hf-hub:ID, a URL
    kind: str  # "tag" | "hf-hub" | "wit" (a wit checkpoint) | "open_clip" (any other checkpoint file)
    model: str  # the open_clip model name the tag belongs to (--model)
    file: str  # the file read: the checkpoint's URL, or the local file a tag or hub id resolved to
    sha256: str
    bytes: int
    preprocess: dict = field(default_factory=dict)  # the tag's / hub config's / wit checkpoint's
    step: int | None = None  # a wit checkpoint's step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load(source: str, spec: ModelSpec, tag_model: str, device) -> tuple[Pretrained, torch.nn.Module]:
    """Resolve ``source`` (downloading a tag's file only if it is in no local cache), check it and
    build ``spec``'s model from it. ``tag_model``: the open_clip name whose tags count (``--model``
    as given: ``spec.name`` may be a derived name, ``ViT-B-32-sigmoid``)."""
    if source.startswith(HF_HUB):
        repo = source[len(HF_HUB) :].strip("/")
        if repo.count("/") != 1:
            raise ValueError(f"pretrained {source!r}: give hf-hub:ORG/REPO")
        weights = _hub_weights(repo, source)
        config = _hub_file(repo, HF_CONFIG, source, required=False)
        preprocess = {}
        if config is not None:
            try:
                preprocess = json.loads(open(config, encoding="utf-8").read()).get("preprocess_cfg") or {}
            except (OSError, ValueError, AttributeError) as exc:
                raise ValueError(f"pretrained {source!r}: {HF_CONFIG} does not read ({exc})") from exc
        info = _describe(source, "hf-hub", tag_model, weights, _keep(preprocess))
        _look_at(weights, source)
        return info, build(spec, info, device, weights)
    tag = open_clip.get_pretrained_cfg(tag_model, source)
    if tag:
        path = _tag_file(tag, source, tag_model)
        if tag.get("quick_gelu", False) != spec.config.get("quick_gelu", False):
            log(
                f"warning: pretrained {source!r} was trained with quick_gelu={tag.get('quick_gelu', False)}, "
                f"{spec.name} has quick_gelu={spec.config.get('quick_gelu', False)} "
                "(open_clip's -quickgelu models match)"
            )
        info = _describe(source, "tag", tag_model, path, _keep(tag))
        _look_at(path, source)
        return info, build(spec, info, device, path)
    if not storage.exists(source):
        tags = open_clip.list_pretrained_tags_by_model(tag_model)
        known = f"its tags: {', '.join(tags)}" if tags else "it has none"
        raise ValueError(
            f"pretrained {source!r}: no such file, and not a pretrained tag of {tag_model} ({known}) "
            "nor hf-hub:ORG/REPO"
        )
    if os.path.isdir(storage.local_path(source) or ""):
        raise ValueError(f"pretrained {source!r}: a folder, not a checkpoint file")
    with local_copy(source) as (path, sha256, size):
        ckpt = _look_at(path, source)
        wit = ckpt.get("wit") if isinstance(ckpt.get("wit"), dict) else None
        url = storage.normalize(source)
        if wit is not None:
            _check_wit_config(source, wit, spec)
            preprocess = wit.get("preprocess") if isinstance(wit.get("preprocess"), dict) else {}
            info = Pretrained(source, "wit", tag_model, url, sha256, size, preprocess, wit.get("step"))
        else:
            info = Pretrained(source, "open_clip", tag_model, url, sha256, size)
        del ckpt
        return info, build(spec, info, device, path)


def build(spec: ModelSpec, start: Pretrained | None, device, path: str | None = None) -> torch.nn.Module:
    """``spec``'s model, with ``start``'s weights when given (read from ``path``, else from its file
    again: the other ranks of a run, after rank 0's :func:`load`), without open_clip's "initialized
    randomly" warning when there are none."""
    if start is None:
        with no_random_init_warning():
            return open_clip.create_model(spec.name, device=device, output_dict=True)
    if path is None:
        with _local_file(start) as local:
            return build(spec, start, device, local)
    try:
        model = open_clip.create_model(spec.name, pretrained=path, device=device, output_dict=True)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError, StopIteration, OSError) as exc:
        raise ValueError(f"pretrained {start.source!r}: {_fit_error(exc, spec.name)}") from exc
    if start.preprocess:
        set_preprocess(model, start.preprocess)
    return model


# -------------------------------------------------------------------------------------------------
# files


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[tuple[str, str, int]]:
    """``(path, sha256, bytes)`` of the file at ``url``: the file itself when it is local, else a
    temporary copy (its name kept: open_clip reads ``.safetensors`` and ``.npz`` by the suffix),
    removed after."""
    path = storage.local_path(url)
    if path is not None:
        yield path, storage.sha256_url(path), os.path.getsize(path)
        return
    with tempfile.TemporaryDirectory(prefix="wit-pretrained-") as folder:
        local = os.path.join(folder, storage.basename(url) or "checkpoint.pt")
        h, size = hashlib.sha256(), 0
        with storage.open_url(url, "rb") as src, open(local, "wb") as dst:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        yield local, h.hexdigest(), size


@contextlib.contextmanager
def _local_file(start: Pretrained) -> Iterator[str]:
    """``start``'s file on this machine: a tag's or hub id's is looked up (or downloaded) again
    where rank 0's cache path is not this node's; a checkpoint URL is copied if remote."""
    if start.kind in ("tag", "hf-hub"):
        if os.path.isfile(start.file):
            yield start.file
        elif start.kind == "tag":
            yield _tag_file(open_clip.get_pretrained_cfg(start.model, start.source), start.source, start.model)
        else:
            yield _hub_weights(start.source[len(HF_HUB) :].strip("/"), start.source)
        return
    local = storage.local_path(start.file)
    if local is not None:  # rank 0 hashed it already: the other ranks only need the path
        yield local
        return
    with local_copy(start.file) as (path, _, _):
        yield path


def _describe(source: str, kind: str, model: str, path: str, preprocess: dict) -> Pretrained:
    return Pretrained(source, kind, model, path, storage.sha256_url(path), os.path.getsize(path), preprocess)


def _keep(cfg: dict) -> dict:
    """The preprocessing settings of a tag or hub config (lists, as JSON and YAML have them)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in PREPROCESS_KEYS}


def _look_at(path: str, source: str) -> dict:
    """The checkpoint at ``path`` (memory-mapped), or a one-line error saying why it is none."""
    if path.endswith(".npz"):  # big_vision (SigLIP) numpy weights: open_clip's converter reads them
        return {}
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                if not list(f.keys()):
                    raise ValueError("it holds no tensors")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own (Rust) error types
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"pretrained {source!r}: not a loadable safetensors file ({why})") from exc
        return {}
    try:
        return load_weights(path, mmap=True)  # the same checks as wit eval's and wit filter's
    except CheckpointError as exc:
        why = str(exc).removeprefix(f"{path}: ")  # the file may be a temporary copy: name the source
        raise ValueError(f"pretrained {source!r}: {why}") from exc


def _check_wit_config(source: str, wit: dict, spec: ModelSpec) -> None:
    """A wit checkpoint names its architecture: it must be ``--model``'s (the temperature's and
    logit bias's initial values aside: a CLIP checkpoint may start a SigLIP run)."""

    def arch(cfg) -> dict:
        return {k: v for k, v in (cfg or {}).items() if not k.startswith("init_")}

    if arch(wit.get("model_config")) != arch(spec.config):
        name = wit.get("model", "?")
        if name == spec.name:  # saved before the shipped config of that name changed
            raise ValueError(
                f"pretrained {source!r} holds a {name} model whose config differs from today's {name}: "
                "give --model the checkpoint's model_config as a JSON file"
            )
        raise ValueError(
            f"pretrained {source!r} holds a {name} model, not {spec.name}: give --model {name} (or its JSON config)"
        )


def _fit_error(exc: BaseException, name: str) -> str:
    """open_clip's load error in one line: a strict load lists every missing and unexpected key."""
    text = str(exc)
    if "Error(s) in loading state_dict" in text:
        parts = []
        for line in text.splitlines()[1:]:
            line = line.strip()
            if line.startswith(("Missing key(s)", "Unexpected key(s)")):
                head, _, keys = line.partition(":")
                n = keys.count('", "') + 1 if keys.strip() else 0
                parts.append(f"{head.split(' in ')[0].lower()}: {n} ({keys.strip()[:60]}...)")
            elif line.startswith("size mismatch") and not any(p.startswith("size mismatch") for p in parts):
                parts.append(line.rstrip("."))
        return f"weights do not fit the {name} architecture ({'; '.join(parts) or 'strict load failed'})"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"open_clip cannot load it into {name} ({first})"


# -------------------------------------------------------------------------------------------------
# tags and hub ids: the local caches first, a download only when needed and possible


def _tag_file(tag: dict, source: str, model: str) -> str:
    """The local file of an open_clip pretrained tag: from a cache, else downloaded by open_clip."""
    if "file" in tag:
        return tag["file"]
    hub = tag.get("hf_hub", "")
    if hub and _has_hf_hub():
        repo, filename = os.path.split(hub)  # "org/repo/" names the default weights file
        filename = filename or HF_WEIGHTS
        for name in (*_safe_twins(filename), filename):  # open_clip prefers the safetensors twin too
            cached = _hub_cached(repo, name)
            if cached is not None:
                return cached
        _can_download(source, model, _hub_host(), hub=True)
        return _download(source, model, lambda: open_clip.download_pretrained(tag))
    url = tag.get("url", "")
    if url:
        cached = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if not os.path.isfile(cached):
            _can_download(source, model, urlparse(url).hostname or "", hub=False)
        # open_clip checks a cached file's sha256 against the one in its URL, and gives the path back
        return _download(source, model, lambda: open_clip.download_pretrained_from_url(url))
    raise ValueError(f"pretrained {source!r} of {model}: open_clip names no file for it")


def _safe_twins(filename: str) -> tuple[str, ...]:
    """The safetensors file open_clip takes instead of ``filename`` when a repository has both."""
    if filename == HF_WEIGHTS:
        return (HF_SAFE_WEIGHTS,)
    return (filename[:-4] + ".safetensors",) if filename.endswith((".bin", ".pth")) else ()


def _hub_weights(repo: str, source: str) -> str:
    for name in (HF_SAFE_WEIGHTS, HF_WEIGHTS):
        cached = _hub_cached(repo, name)
        if cached is not None:
            return cached
    return _hub_file(repo, HF_WEIGHTS, source)


def _hub_file(repo: str, filename: str, source: str, required: bool = True) -> str | None:
    """``filename`` of the hub repository ``repo``: from huggingface_hub's cache, else downloaded by
    open_clip (which takes the safetensors twin of the weights when the repository has one)."""
    if not _has_hf_hub():
        raise ValueError(f"pretrained {source!r}: needs the huggingface_hub package")
    cached = _hub_cached(repo, filename)
    if cached is not None:
        return cached
    try:
        _can_download(source, repo, _hub_host(), hub=True)
    except ValueError:
        if not required:
            return None
        raise
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        return _download(source, repo, lambda: download_pretrained_from_hf(repo, filename=filename))
    except ValueError:
        if not required:
            return None
        raise


def _has_hf_hub() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def _hub_cached(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return found if isinstance(found, str) and os.path.isfile(found) else None


def _hub_host() -> str:
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def _can_download(source: str, model: str, host: str, hub: bool) -> None:
    """Refuse at once a download that cannot work here, rather than let it retry for a minute."""
    where = "huggingface_hub's cache" if hub else "~/.cache/clip"
    fix = "download it where there is a network (open_clip.create_model(..., pretrained=...)), or give the file"
    if hub and storage.env_flag("HF_HUB_OFFLINE"):
        raise ValueError(f"pretrained {source!r} of {model} is not in {where} and HF_HUB_OFFLINE is set: {fix}")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return  # the proxy resolves names
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        raise ValueError(
            f"pretrained {source!r} of {model} is not in {where}, and {host} cannot be reached to download it "
            f"({exc.strerror or exc}): {fix}"
        ) from exc


def _download(source: str, model: str, fetch) -> str:
    try:
        path = fetch()
    except Exception as exc:  # noqa: BLE001 - urllib, huggingface_hub and open_clip each raise their own
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"pretrained {source!r} of {model}: the download failed ({why})") from exc
    if not path or not os.path.isfile(path):
        raise ValueError(f"pretrained {source!r} of {model}: open_clip gave no file")
    return path
