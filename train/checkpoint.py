"""Checkpoints on any URL, written atomically, loaded with ``weights_only=True``.

A checkpoint is one ``torch.save`` file. Its top-level ``state_dict`` is the model's weights in
open_clip's layout (no DDP ``module.`` prefix), so ``open_clip.create_model_and_transforms(name,
pretrained=path)`` loads it. Beside it, ``wit`` holds what makes the file self-describing:

    {"state_dict": {...},
     "wit": {"format": 1, "model": "wit-tiny", "model_config": {...open_clip JSON...},
             "step": int, "config": {...resolved train config...}, "dataset_digest": str, ...},
     "optimizer": ..., "scaler": ..., "rng": ..., "stream": ...}   # training state, for resume

Only tensors, numbers, strings, lists, tuples and dicts go in, so ``weights_only=True`` can load it.

The trainer writes ``step-N.pt`` and then, once it is committed, a sidecar ``step-N.pt.json`` =
``{"sha256": ..., "bytes": ...}`` (the digest computed from the bytes while they were in memory): a
sidecar implies its checkpoint is complete, and the run record takes the digest from it instead of
reading the checkpoint back. :class:`CheckpointWriter` does that upload on a background thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from wit.manifests import storage

from .models import image_transform, no_random_init_warning, register_own, set_preprocess

FORMAT = 1


class CheckpointError(ValueError):
    """Not a loadable checkpoint: unreadable, another format, or another architecture."""


SIDECAR = ".json"  # step-N.pt -> step-N.pt.json


def serialize_checkpoint(payload: dict[str, Any]) -> tuple[bytes, str]:
    """The bytes of the checkpoint file and their sha256: a snapshot, the payload may change after."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def save_checkpoint(url: str, payload: dict[str, Any]) -> str:
    """Write atomically (never a half-written checkpoint visible); returns its sha256."""
    data, sha = serialize_checkpoint(payload)
    storage.write_bytes(url, data)
    return sha


def sidecar_url(url: str) -> str:
    return url + SIDECAR


def sidecar_bytes(sha256: str, size: int) -> bytes:
    return json.dumps({"sha256": sha256, "bytes": size}, sort_keys=True).encode()


def read_sidecar(url: str) -> tuple[dict | None, bytes | None]:
    """The checkpoint ``url``'s sidecar, parsed (None if absent or malformed), and its raw bytes
    (None if absent)."""
    try:
        raw = storage.read_bytes(sidecar_url(url))
    except storage.StorageError:
        return None, None
    try:
        info = json.loads(raw)
        ok = isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("bytes"), int)
    except ValueError:
        ok = False
    return (info if ok else None), raw


@dataclass(frozen=True, slots=True)
class CheckpointDigest:
    sha256: str  # of the checkpoint file
    bytes: int
    sidecar_sha256: str  # of its sidecar file, which is a file of the output too
    sidecar_bytes: int


def checkpoint_digest(url: str) -> CheckpointDigest:
    """The sha256 and size of the committed checkpoint ``url``, from its sidecar: the checkpoint is
    not read. One without a usable sidecar (written by an older wit) is read and hashed once, and
    gets its sidecar."""
    info, raw = read_sidecar(url)
    if info is None:
        sha, size = storage.sha256_url(url), storage.size(url)
        raw = sidecar_bytes(sha, size)
        storage.write_bytes(sidecar_url(url), raw)
        info = {"sha256": sha, "bytes": size}
    return CheckpointDigest(info["sha256"], info["bytes"], hashlib.sha256(raw).hexdigest(), len(raw))


def write_checkpoint(url: str, data: bytes, sha256: str) -> None:
    """Commit serialised checkpoint bytes, then their sidecar. A sidecar left by an earlier file of
    the same name goes first: it must never vouch for other bytes, even if this write is killed."""
    side = sidecar_url(url)
    if storage.exists(side):
        storage.remove(side)
    storage.write_bytes(url, data)
    storage.write_bytes(side, sidecar_bytes(sha256, len(data)))


class CheckpointWriter:
    """Uploads checkpoints on one background thread, so the ranks keep training while rank 0 uploads.

    At most one upload is in flight: :meth:`submit` first waits for the previous one. An upload's
    error is raised again by the next :meth:`submit` or :meth:`wait` (never lost); call
    :meth:`wait` before relying on the files (the run record). ``then`` runs on the same thread
    after a successful upload (pruning old checkpoints).
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._url = ""

    def submit(self, url: str, data: bytes, sha256: str, then: Callable[[], None] | None = None) -> None:
        self.wait()
        self._url = url
        self._thread = threading.Thread(
            target=self._run, args=(url, data, sha256, then), name="wit-checkpoint-writer", daemon=False
        )  # not a daemon: an exception on the training thread still lets the upload finish
        self._thread.start()

    def _run(self, url: str, data: bytes, sha256: str, then: Callable[[], None] | None) -> None:
        try:
            write_checkpoint(url, data, sha256)
            if then is not None:
                then()
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = exc

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the upload in flight (if any) is done; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            exc, self._error = self._error, None
            exc.add_note(f"while writing checkpoint {self._url} in the background")
            raise exc


def load_checkpoint(url: str, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at ``url``, loaded with ``weights_only=True``; anything that is not one (a
    missing, empty, truncated, YAML or random file, a pickle of code) is a one-line
    :class:`CheckpointError` naming ``url`` and what is wrong with it. Never advice to load it with
    ``weights_only=False``: a file from elsewhere must never run code.

    ``mmap``: a local file in torch.save's zip format is memory-mapped (its tensors are read when
    used): a quick look at a big file."""
    path = storage.local_path(url) if mmap else None
    if path is None:
        try:
            data = storage.read_bytes(url)
        except storage.StorageError as exc:
            raise CheckpointError(_read_error(url, exc)) from exc
        head, tail, size, source = data[:HEAD], data[-TAIL:], len(data), io.BytesIO(data)
    else:
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as fh:
                head = fh.read(HEAD)
                fh.seek(max(0, size - TAIL))
                tail = fh.read()
        except OSError as exc:
            raise CheckpointError(_read_error(url, exc)) from exc
        source = path
    why = _not_torch_file(head, tail, size)
    if why:
        raise CheckpointError(f"{url}: not a loadable checkpoint ({why})")
    try:
        with warnings.catch_warnings():  # a pickle of another protocol than torch's: refused below anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            mapped = path is not None and head.startswith(ZIP_MAGIC)  # mmap reads zip archives only
            ckpt = torch.load(source, map_location=map_location, weights_only=True, mmap=mapped)
    except Exception as exc:  # noqa: BLE001 - weights_only runs no code: whatever fails, the file is at fault
        raise CheckpointError(f"{url}: not a loadable checkpoint ({_load_error(exc, size)})") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{url}: not a checkpoint (a {type(ckpt).__name__}, not a dict of weights)")
    return ckpt


def load_weights(url: str, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """:func:`load_checkpoint`, and a one-line :class:`CheckpointError` unless the file holds model
    weights: a wit checkpoint (its ``wit`` section naming the model and its config), an open_clip /
    open_clip_train one (``{"state_dict": {...}}``) or a bare state dict, with tensors in it. The one
    safe loader of weights files for ``wit train --pretrained``, ``wit eval`` and ``wit filter
    --clip-score``."""
    ckpt = load_checkpoint(url, map_location=map_location, mmap=mmap)
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        keys = ", ".join(map(str, list(ckpt)[:5]))
        raise CheckpointError(f"{url}: holds no model weights (a dict of {keys or 'nothing'})")
    wit = ckpt.get("wit")
    if wit is not None and not (
        isinstance(wit, dict) and isinstance(wit.get("model"), str) and isinstance(wit.get("model_config"), dict)
    ):
        raise CheckpointError(f"{url}: a damaged wit checkpoint (its wit section names no model and model config)")
    return ckpt


ZIP_MAGIC = b"PK\x03\x04"
ZIP_END = b"PK\x05\x06"  # a zip archive's end of central directory record: in its last 22 + 65535 bytes
HEAD, TAIL = 512, 22 + 65535


def _read_error(url: str, exc: BaseException) -> str:
    """A file that cannot be read, in one line naming it."""
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    if isinstance(cause, FileNotFoundError):
        return f"{url}: no such file"
    if isinstance(cause, IsADirectoryError):
        return f"{url}: a folder, not a checkpoint file"
    if isinstance(cause, OSError):
        return f"{url}: cannot read it ({cause.strerror or cause})"
    return str(exc).splitlines()[0] if str(exc) else f"{url}: cannot read it"


def _not_torch_file(head: bytes, tail: bytes, size: int) -> str:
    """Why a file of this start and end cannot be a torch.save file, or "" if it may be one."""
    if not size:
        return "an empty file"
    if head.startswith(ZIP_MAGIC):  # torch.save's zip archive: cut short, it has lost its directory
        if ZIP_END not in tail:
            return f"truncated: {size:,} bytes, and a torch.save zip archive ends with a directory this one lacks"
        return ""
    if head.startswith(b"\x80"):  # a pickle (torch.save's legacy format): torch.load tells
        return ""
    if len(head) >= 10 and int.from_bytes(head[:8], "little") < size and head[8:10] in (b'{"', b"{'"):
        return "a safetensors file: give it to wit train --pretrained, or torch.save its tensors"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file: decompress it first"
    text = _as_text(head)
    if text is not None:
        return f"it is text, not a torch.save file{_text_kind(text)}"
    return f"binary data, neither a torch.save zip archive nor a pickle: it starts {head[:12]!r}"


def _as_text(head: bytes) -> str | None:
    """The start of a text file (UTF-8, or UTF-16 with its byte order mark), or None for binary data."""
    for bom, encoding in ((b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if head.startswith(bom):
            return head[2:].decode(encoding, errors="ignore")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            return None
        text = head[: exc.start].decode("utf-8")
    printable = sum(c.isprintable() or c in "\t\r\n" for c in text)
    return text if text and printable == len(text) else None


def _text_kind(text: str) -> str:
    """A guess at what a text file is, for the error message."""
    start = text.lstrip("\ufeff \t\r\n")
    if start.startswith(("{", "[")):
        return ": JSON?"
    if start.lower().startswith(("<!doctype", "<html", "<?xml")):
        return ": HTML or XML? (a download that got a web page?)"
    if start.startswith("version https://git-lfs"):
        return ": a Git LFS pointer (git lfs pull fetches the file)"
    first = start.splitlines()[0] if start else ""
    if start.startswith("---") or (":" in first and not first.startswith("#!")):
        return ": YAML?"
    return ""


def _load_error(exc: BaseException, size: int) -> str:
    """torch.load's error in a few words. Its own are essays (a truncated zip, or a pickle that
    ``weights_only`` refuses, come with advice to load it unsafely, which we never take)."""
    text = str(exc).strip()
    if "Unsupported global" in text:  # a pickled object: say which
        culprit = text.split("Unsupported global:", 1)[1].split(" was ")[0].strip()
        return f"it holds pickled code: {culprit}"
    lower = text.lower()
    if (
        isinstance(exc, (EOFError, IndexError))
        or "truncated" in lower
        or "unexpected eof" in lower
        or "ran out of input" in lower
    ):  # the unpickler reads past the end (an IndexError from its empty stack, or an EOF)
        return f"truncated: {size:,} bytes, and its data ends early"
    if "WeightsUnpickler error:" in text:  # a pickle of other things than tensors and plain data
        why = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split())
        return f"its pickle holds more than tensors and plain data: {why or 'refused'}"
    if "PytorchStreamReader failed" in text:  # a zip archive damaged
        why = text.split("PytorchStreamReader failed", 1)[1].split(". ")[0].strip()
        return f"damaged: {why}"
    if "inline_container" in text:  # a zip archive torch.save did not write (no archive/ folder, ...)
        why = text.split("]", 1)[-1].strip(" .").splitlines()[0]
        return f"a zip archive, but not a torch.save one: {why}"
    if "magic number" in lower:
        return "a pickle, but not a torch.save file"
    first = text.splitlines()[0] if text else type(exc).__name__
    return first.split(" Check the documentation")[0].split("weights_only")[0].rstrip(" (.,;:") or type(exc).__name__


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

    ckpt = load_weights(url)
    info = ckpt.get("wit") or {}
    if info:
        name = info["model"]
        if model and model != name:
            raise CheckpointError(f"{url} holds a {name} model, not {model}")
        # the file's own config, under a derived name if the shipped one has changed since
        build = register_own(name, info["model_config"])
    elif model:
        name = build = model
    else:
        raise CheckpointError(f"{url} is not a wit checkpoint; say which architecture with --model NAME")
    state = ckpt.get("state_dict", ckpt)
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    # every parameter is overwritten by the checkpoint just below: no random draws, no warning about them
    try:
        with skip_random_init(), no_random_init_warning():
            net, _, preprocess = open_clip.create_model_and_transforms(build, device=device)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        if not info:  # --model names an architecture open_clip cannot build: not the file's fault
            raise
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{url}: its {name} model config does not build ({why})") from exc
    if isinstance(info.get("preprocess"), dict):  # the run's own (a pretrained tag's mean and std, ...)
        set_preprocess(net, info["preprocess"])
        preprocess = image_transform(net, is_train=False)
    try:
        net.load_state_dict(state)  # strict: a parameter left out would keep uninitialised memory
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{url}: weights do not fit the {name} architecture ({why})") from exc
    net.eval()
    digest = storage.sha256_url(url)
    return LoadedModel(net, preprocess, open_clip.get_tokenizer(build), name, digest, info)
