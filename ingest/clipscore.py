"""CLIP score: how well an image and its caption agree under a CLIP model the user gives.

The score of a pair is the cosine similarity of the L2-normalised image and text embeddings, a
number in [-1, 1] (DataComp's convention; the "CLIPScore" of Hessel et al. is ``100 × max(cos, 0)``,
and OpenAI's models put good web pairs around 0.3). Nothing else in the filter depends on the
scale, so thresholds (``--min-score``) are given on the same raw cosine.

Data flow inside one SCAN partition of ``wit filter``::

    decoded RGB image (imaging.check_image, keep_image=True) ──preprocess──▶ tensor ┐
    caption ─────────────────────────────────────────────────────────────────▶ text ├─▶ BatchScorer
                                            every ``batch_size`` pairs: one forward pass ┘   (index → score)

The model is loaded once per process and kept (:func:`load_scorer`, cached by checkpoint URL,
architecture and device); torch is imported only when a scorer is built, so the rest of the filter
never pays for it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

BUCKET_WIDTH = 0.05  # of the score histogram kept in the run record
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> str:
    """``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(slots=True)
class ClipScorer:
    """A loaded model with its eval transform and tokenizer; :meth:`score` does one batch."""

    model: Any  # open_clip CLIP, in eval mode, on ``device``
    preprocess: Any  # PIL image → tensor (the model's eval transform)
    tokenizer: Any  # list[str] → LongTensor
    name: str  # the architecture
    digest: str  # sha256 of the checkpoint file
    device: str
    batch_size: int = 64

    def score(self, images: list[Any], texts: list[str | None]) -> list[float]:
        """Cosine similarity of each (preprocessed image tensor, caption) pair, as float32 values."""
        import torch

        if not images:
            return []
        pixels = torch.stack(images).to(self.device)
        tokens = self.tokenizer([t or "" for t in texts]).to(self.device)
        with torch.no_grad():
            img = self.model.encode_image(pixels, normalize=True)
            txt = self.model.encode_text(tokens, normalize=True)
            cos = (img.float() * txt.float()).sum(dim=-1).clamp(-1.0, 1.0)
        return cos.cpu().tolist()

    def batches(self) -> BatchScorer:
        return BatchScorer(self)


@dataclass(slots=True)
class BatchScorer:
    """Collects pairs as a scan decodes them and scores them ``batch_size`` at a time.

    Each image is turned into a tensor as soon as it is added, so at most one batch of tensors
    (never the decoded images of a whole partition) is held in memory.
    """

    scorer: ClipScorer
    scores: dict[int, float] = field(default_factory=dict)  # the caller's index → score
    _pending: list[tuple[int, Any, str | None]] = field(default_factory=list)

    def add(self, index: int, image: Any, text: str | None) -> None:
        self._pending.append((index, self.scorer.preprocess(image), text))
        if len(self._pending) >= self.scorer.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        indices, images, texts = zip(*self._pending, strict=True)
        self._pending.clear()
        for i, s in zip(indices, self.scorer.score(list(images), list(texts)), strict=True):
            self.scores[i] = s


@functools.lru_cache(maxsize=2)
def load_scorer(url: str, model: str | None = None, device: str = "auto", batch_size: int = 64) -> ClipScorer:
    """The scorer for the checkpoint at ``url``, loaded once per process.

    A wit checkpoint names its architecture (``model`` may repeat it); an open_clip checkpoint
    needs ``model``. Raises :class:`wit.train.checkpoint.CheckpointError` (a ValueError) for a
    missing or unreadable file, or weights of another architecture.
    """
    from wit.train.checkpoint import load_model

    dev = resolve_device(device)
    loaded = load_model(url, model=model, device=dev)
    return ClipScorer(loaded.model, loaded.preprocess, loaded.tokenizer, loaded.name, loaded.digest, dev, batch_size)


@contextlib.contextmanager
def cpu_threads(device: str) -> Iterator[None]:
    """One torch thread while scoring on CPU, whatever the process.

    The bits of a forward pass depend on the thread count (reductions are split differently), and
    ``keep_top_fraction`` compares scores across partitions: with one thread everywhere, ``--workers``
    and ``--part`` slices give the same scores, hence the same rows. Parallelism comes from
    ``--workers`` (one partition per process), which also suits a pool better than OpenMP's
    spinning threads fighting over the same cores.
    """
    if device != "cpu":
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def score_threshold(
    scores: Iterable[float], min_score: float | None = None, keep_top_fraction: float | None = None
) -> float | None:
    """The lowest score that is kept: ``min_score``, raised to the ``1 - keep_top_fraction`` quantile.

    The quantile is taken over the scores at least ``min_score``: with ``n`` of them it is the
    ``ceil(keep_top_fraction × n)``-th highest, so that many rows are kept, plus any that tie with
    it. It depends only on the multiset of scores, never on their order. None: nothing to drop.
    """
    threshold = min_score
    if keep_top_fraction is not None:
        ranked = sorted((s for s in scores if min_score is None or s >= min_score), reverse=True)
        if ranked:
            k = max(1, math.ceil(keep_top_fraction * len(ranked) - 1e-9))
            quantile = ranked[min(k, len(ranked)) - 1]
            threshold = quantile if threshold is None else max(threshold, quantile)
    return threshold


def histogram(scores: Iterable[float | None]) -> dict[str, int]:
    """Counts per bucket of width :data:`BUCKET_WIDTH`, keyed by its lower edge (``"0.25"``)."""
    counts: Counter[str] = Counter()
    for s in scores:
        if s is None or math.isnan(s):
            continue
        edge = math.floor(s / BUCKET_WIDTH) * BUCKET_WIDTH
        counts[f"{edge + 0.0:.2f}"] += 1  # + 0.0 turns -0.0 into 0.0
    return dict(sorted(counts.items(), key=lambda kv: float(kv[0])))
