"""Encoding: images and texts to normalised embeddings, batched, streaming, cached.

Images are decoded and resized in a thread pool (PIL releases the GIL while it decodes and
resamples) one batch ahead of the model, then turned into one tensor and normalised in a single
batched op, numerically the same as the model's own per-image ``ToTensor`` + ``Normalize``.

Image features of a split are cached under ``cache/`` by (checkpoint digest, model name, split
digest): a second suite run over the same data and checkpoint skips decoding and encoding.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from wit.manifests import storage

from .datasets import Sample, Split

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(slots=True)
class ImageFeatures:
    """Normalised image embeddings of one split, with what each row is."""

    features: np.ndarray  # (n, dim) float32, unit rows
    labels: np.ndarray  # (n,) int64, -1 where the split has none
    keys: list[str]
    captions: list[tuple[str, ...]]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    seconds: float = 0.0  # encode time (0 for a cache hit)
    cached: bool = False

    def to_npz(self) -> bytes:
        flat = [c for caps in self.captions for c in caps]
        offsets = np.cumsum([0] + [len(c) for c in self.captions]).astype(np.int64)
        buf = io.BytesIO()
        np.savez(
            buf,
            features=self.features,
            labels=self.labels,
            keys=np.array(self.keys, dtype=str),
            captions=np.array(flat, dtype=str),
            offsets=offsets,
            skipped=np.array(json.dumps(self.skipped)),
        )
        return buf.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> ImageFeatures:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        flat = [str(c) for c in z["captions"]]
        off = z["offsets"]
        caps = [tuple(flat[off[i] : off[i + 1]]) for i in range(len(off) - 1)]
        return cls(
            features=z["features"],
            labels=z["labels"],
            keys=[str(k) for k in z["keys"]],
            captions=caps,
            skipped=json.loads(str(z["skipped"])),
            cached=True,
        )


class FeatureCache:
    """npz files of image features at ``{url}/{key[:2]}/{key}.npz``, written atomically."""

    def __init__(self, url: str | None):
        self.url = storage.normalize(url) if url else None

    @staticmethod
    def key(model_digest: str, model_name: str, split_digest: str) -> str:
        return hashlib.sha256(f"{model_digest}\0{model_name}\0{split_digest}".encode()).hexdigest()

    def _path(self, key: str) -> str:
        assert self.url is not None
        return storage.join(self.url, key[:2], f"{key}.npz")

    def get(self, key: str) -> ImageFeatures | None:
        if self.url is None or not storage.exists(self._path(key)):
            return None
        try:
            return ImageFeatures.from_npz(storage.read_bytes(self._path(key)))
        except (OSError, ValueError, KeyError):
            return None  # a damaged cache entry is recomputed, never trusted

    def put(self, key: str, feats: ImageFeatures) -> None:
        if self.url is not None:
            storage.write_bytes(self._path(key), feats.to_npz())


def _split_preprocess(preprocess) -> tuple[T.Compose | None, torch.Tensor | None, torch.Tensor | None]:
    """Split open_clip's ``Compose([...PIL ops, ToTensor, Normalize])`` into the PIL part and the
    normalisation, so the tensor part runs batched. None when the transform has another shape."""
    ops = list(getattr(preprocess, "transforms", []))
    tt = next((i for i, op in enumerate(ops) if isinstance(op, T.ToTensor)), None)
    if tt is None or tt != len(ops) - 2 or not isinstance(ops[-1], T.Normalize):
        return None, None, None
    norm = ops[-1]
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
    return T.Compose(ops[:tt]), mean, std


class Encoder:
    """Wraps a loaded model: ``encode_images`` streams a split, ``encode_texts`` batches strings."""

    def __init__(
        self,
        model,
        preprocess,
        tokenizer,
        device: str = "cpu",
        batch_size: int = 64,
        threads: int = 0,
        autocast: torch.dtype | None = None,
    ):
        self.model = model
        self.autocast = autocast  # None: fp32
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.threads = threads or min(8, os.cpu_count() or 1)
        self.pil_ops, self.mean, self.std = _split_preprocess(preprocess)
        size = getattr(getattr(model, "visual", None), "image_size", None)
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
        self.images_encoded = 0  # counters, so tests and benches can tell a cache hit from work
        self.texts_encoded = 0

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def _prepare(self, sample: Sample) -> tuple[np.ndarray | torch.Tensor | None, str | None]:
        if sample.image is None:
            return None, "missing_image"
        try:
            if isinstance(sample.image, Image.Image):
                img = sample.image
            else:
                img = Image.open(io.BytesIO(sample.image))
                img.load()
            if self.pil_ops is None:
                return self.preprocess(img), None
            return np.asarray(self.pil_ops(img), dtype=np.uint8), None
        except _DECODE_ERRORS:
            return None, "undecodable"

    def _to_tensor(self, arrays: list) -> torch.Tensor:
        if self.pil_ops is None:
            return torch.stack(arrays)
        return self._rows_to_tensor(np.stack(arrays))

    def _rows_to_tensor(self, rows: np.ndarray) -> torch.Tensor:
        """uint8 ``(n, h, w, 3)`` to the normalised float batch, as ``ToTensor`` + ``Normalize`` do."""
        x = torch.from_numpy(rows).permute(0, 3, 1, 2).float().div_(255)
        return x.sub_(self.mean).div_(self.std)

    @torch.inference_mode()
    def _forward_images(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, non_blocking=True)
        with self._autocast():
            f = self.model.encode_image(x)
        return torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy()

    def encode_images(self, samples: Iterable[Sample]) -> ImageFeatures:
        import time

        start = time.perf_counter()
        feats, labels, keys, caps = [], [], [], []
        skipped: Counter = Counter()
        with ThreadPoolExecutor(self.threads) as pool:
            pending: _Prepared | None = None
            for batch in _batches(samples, self.batch_size):
                # Decode the next batch across threads while this one runs through the model.
                nxt = self._submit(pool, batch)
                if pending is not None:
                    self._consume(pending, feats, labels, keys, caps, skipped)
                pending = nxt
            if pending is not None:
                self._consume(pending, feats, labels, keys, caps, skipped)
        dim = feats[0].shape[1] if feats else 0
        return ImageFeatures(
            features=np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
            labels=np.asarray(labels, dtype=np.int64),
            keys=keys,
            captions=caps,
            skipped=dict(skipped),
            seconds=time.perf_counter() - start,
        )

    def _submit(self, pool: ThreadPoolExecutor, batch: list[Sample]) -> _Prepared:
        """One task per thread over a slice of the batch; each decoded image is written straight
        into its row of one uint8 batch array (no per-image future, no stacking afterwards)."""
        rows: np.ndarray | None = None
        if self.pil_ops is not None and self.size is not None:
            rows = np.empty((len(batch), self.size[0], self.size[1], 3), dtype=np.uint8)
        step = -(-len(batch) // self.threads)
        futures = [
            pool.submit(self._prepare_slice, batch, rows, lo, min(lo + step, len(batch)))
            for lo in range(0, len(batch), step)
        ]
        return _Prepared(batch, rows, futures)

    def _prepare_slice(self, batch: list[Sample], rows: np.ndarray | None, lo: int, hi: int) -> list:
        """``(array or None, reason or None)`` per sample; an array only where it did not fit ``rows``."""
        out = []
        for i in range(lo, hi):
            arr, reason = self._prepare(batch[i])
            if reason is None and rows is not None and arr.shape == rows.shape[1:]:
                rows[i] = arr
                arr = None
            out.append((arr, reason))
        return out

    def _consume(self, prepared: _Prepared, feats, labels, keys, caps, skipped) -> None:
        results = [r for f in prepared.futures for r in f.result()]
        ok = [reason is None for _, reason in results]
        for (_, reason), sample in zip(results, prepared.batch, strict=True):
            if reason is not None:
                skipped[reason] += 1
                continue
            labels.append(sample.label)
            keys.append(sample.key)
            caps.append(sample.captions)
        if not any(ok):
            return
        if prepared.rows is not None and all(arr is None for arr, _ in results):
            x = prepared.rows if all(ok) else prepared.rows[np.asarray(ok)]
            tensor = self._rows_to_tensor(x)
        else:  # a transform of another shape: per-image arrays or tensors, stacked
            arrays = [arr if arr is not None else prepared.rows[i] for i, (arr, r) in enumerate(results) if r is None]
            tensor = self._to_tensor(arrays)
        feats.append(self._forward_images(tensor))
        self.images_encoded += len(tensor)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 1024) -> np.ndarray:
        """Normalised embeddings of ``texts``, in large batches (one tokenizer call per batch)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
            with self._autocast():
                f = self.model.encode_text(tokens)
            out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
        self.texts_encoded += len(texts)
        if not out:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(out)


@dataclass(slots=True)
class _Prepared:
    """One batch on its way through the decode threads."""

    batch: list[Sample]
    rows: np.ndarray | None  # the batch's uint8 array, when the transform's output size is known
    futures: list[Future]


def _batches(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def split_features(
    encoder: Encoder, cache: FeatureCache, model_digest: str, model_name: str, split: Split
) -> ImageFeatures:
    """Image features of a split from the cache, or encoded now and cached."""
    key = FeatureCache.key(model_digest, model_name, split.digest)
    hit = cache.get(key)
    if hit is not None:
        return hit
    feats = encoder.encode_images(split.samples())
    cache.put(key, feats)
    return feats
