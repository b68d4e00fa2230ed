"""Metrics on embeddings and predictions, each with a seeded bootstrap 95% interval.

Everything here works on NumPy arrays and knows nothing of models or files, so it is tested on
constructed embeddings with known answers (tests/evaluate/test_metrics.py).

The interval is the percentile bootstrap over the evaluation units (images for classification and
image→text retrieval, captions for text→image retrieval): resample the units with replacement,
recompute the statistic, take the 2.5% and 97.5% quantiles. Models are held fixed, so the interval
says how much the score would move on another draw of the same test distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
# Resample in blocks so that memory stays at block * n indices, whatever the test set size.
_BLOCK_ELEMENTS = 4_000_000


@dataclass(slots=True)
class Score:
    """One metric value with its interval and the number of units it was computed on."""

    metric: str
    value: float
    ci_low: float | None
    ci_high: float | None
    n: int


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero rather than becoming NaN)."""
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def ensemble_classifier(text_features: np.ndarray) -> np.ndarray:
    """Class embeddings by prompt ensembling (CLIP §3.1.4).

    ``text_features`` is ``(classes, templates, dim)``: each template's embedding is normalised,
    they are averaged per class, and the mean is renormalised. Returns ``(classes, dim)``.
    """
    if text_features.ndim != 3:
        raise ValueError(f"text features must be (classes, templates, dim), got shape {text_features.shape}")
    return normalize(normalize(text_features).mean(axis=1))


def bootstrap_interval(
    n: int,
    statistic: Callable[[np.ndarray], np.ndarray],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float | None, float | None]:
    """Percentile interval of ``statistic`` over bootstrap resamples of ``n`` units.

    ``statistic`` takes an index matrix ``(b, n)`` (each row one resample) and returns ``(b,)``.
    Returns ``(None, None)`` when there is nothing to resample.
    """
    if n <= 0 or resamples <= 0:
        return None, None
    rng = np.random.default_rng(seed)
    block = max(1, min(resamples, _BLOCK_ELEMENTS // n))
    values = []
    done = 0
    while done < resamples:
        b = min(block, resamples - done)
        values.append(np.asarray(statistic(rng.integers(0, n, size=(b, n))), dtype=np.float64))
        done += b
    stats = np.concatenate(values)
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return None, None
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def _binary(values: np.ndarray) -> bool:
    """Whether per-unit values are all 0 or 1 (hits), so resamples can be counted, not summed."""
    return bool(np.isin(values, (0.0, 1.0)).all())


def mean_score(name: str, hits: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Score:
    """The mean of per-unit values (accuracy from hits, recall@k from per-query hits)."""
    hits = np.asarray(hits, dtype=np.float64)
    if hits.size == 0:
        return Score(name, float("nan"), None, None, 0)
    if _binary(hits):  # hits: gather one byte a unit and count, ~10x faster, exact
        ones = hits.astype(np.uint8)
        lo, hi = bootstrap_interval(
            hits.size, lambda idx: ones[idx].sum(axis=1, dtype=np.int64) / idx.shape[1], resamples, seed
        )
    else:
        lo, hi = bootstrap_interval(hits.size, lambda idx: hits[idx].mean(axis=1), resamples, seed)
    return Score(name, float(hits.mean()), lo, hi, int(hits.size))


def per_class_recall(hits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class (NaN for a class with no test sample)."""
    hits = np.asarray(hits, dtype=np.float64)
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    right = np.bincount(labels, weights=hits, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, right / np.maximum(total, 1), np.nan)


def mean_per_class_recall_score(
    name: str,
    hits: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Score:
    """The mean over classes of per-class recall (balanced accuracy), classes without samples left out."""
    hits = np.asarray(hits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if hits.size == 0:
        return Score(name, float("nan"), None, None, 0)
    value = float(np.nanmean(per_class_recall(hits, labels, num_classes)))
    present = np.unique(labels)
    cls = np.searchsorted(present, labels)  # each unit's class as 0..C-1 over the classes present
    c = present.size
    binary = _binary(hits)
    hit = hits.astype(bool)

    def stat(idx: np.ndarray) -> np.ndarray:
        # one bincount over (resample, class) pairs: counts and hits per class of every resample
        cells = idx.shape[0] * c
        pair = (np.arange(idx.shape[0])[:, None] * c + cls[idx]).ravel()
        count = np.bincount(pair, minlength=cells).reshape(-1, c)
        if binary:  # count the pairs of the hits, exact and without float weights
            right = np.bincount(pair[hit[idx].ravel()], minlength=cells).reshape(-1, c)
        else:
            right = np.bincount(pair, weights=hits[idx].ravel(), minlength=cells).reshape(-1, c)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls = np.where(count > 0, right / np.maximum(count, 1), np.nan)
        return np.nanmean(recalls, axis=1)

    lo, hi = bootstrap_interval(hits.size, stat, resamples, seed)
    return Score(name, value, lo, hi, int(hits.size))


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's label is among its ``k`` highest scores (ties broken by index order)."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.arange(scores.shape[1])[None]
    return (top == np.asarray(labels)[:, None]).any(axis=1)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return m


def classification_scores(
    scores: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    prefix: str = "",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> list[Score]:
    """top-1, top-5 (only with more than 5 classes, where it says something) and mean per-class recall."""
    labels = np.asarray(labels, dtype=np.int64)
    top1 = scores.argmax(axis=1) == labels
    out = [mean_score(f"{prefix}acc1", top1, resamples, seed)]
    if num_classes > 5:
        out.append(mean_score(f"{prefix}acc5", topk_hits(scores, labels, 5), resamples, seed))
    out.append(
        mean_per_class_recall_score(f"{prefix}mean_per_class_recall", top1, labels, num_classes, resamples, seed)
    )
    return out


def retrieval_hits(similarity: np.ndarray, owner: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query hits at ``k`` for both directions of image–text retrieval.

    ``similarity`` is ``(images, texts)``; ``owner[j]`` is the image that text ``j`` describes.
    Image→text: an image is a hit when any of its texts is among its ``k`` most similar texts.
    Text→image: a text is a hit when its image is among its ``k`` most similar images.
    """
    owner = np.asarray(owner, dtype=np.int64)
    n_img, n_txt = similarity.shape
    kt = min(k, n_txt)
    top_txt = (
        np.argpartition(-similarity, kt - 1, axis=1)[:, :kt] if kt < n_txt else np.tile(np.arange(n_txt), (n_img, 1))
    )
    i2t = (owner[top_txt] == np.arange(n_img)[:, None]).any(axis=1)
    ki = min(k, n_img)
    sim_t = similarity.T
    top_img = np.argpartition(-sim_t, ki - 1, axis=1)[:, :ki] if ki < n_img else np.tile(np.arange(n_img), (n_txt, 1))
    t2i = (top_img == owner[:, None]).any(axis=1)
    return i2t, t2i


def retrieval_scores(
    similarity: np.ndarray,
    owner: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> list[Score]:
    """Recall@k in CLIP_benchmark's names: ``image_retrieval_recall@k`` is text→image (a text
    query retrieves images), ``text_retrieval_recall@k`` is image→text; ``mean_recall@k`` is their
    mean (DataComp's retrieval metric; no interval: the two directions count different units)."""
    out = []
    for k in ks:
        i2t, t2i = retrieval_hits(similarity, owner, k)
        image = mean_score(f"image_retrieval_recall@{k}", t2i, resamples, seed)
        text = mean_score(f"text_retrieval_recall@{k}", i2t, resamples, seed)
        both = Score(f"mean_recall@{k}", (image.value + text.value) / 2, None, None, image.n + text.n)
        out += [image, text, both]
    return out


def average_precision_11pt(scores: np.ndarray, positive: np.ndarray) -> float:
    """PASCAL VOC2007's 11-point interpolated average precision of one class: the mean, over
    recall levels 0, 0.1, ..., 1, of the highest precision at that recall or beyond, the images
    ranked by ``scores``. NaN when the class has no positive image."""
    positive = np.asarray(positive, dtype=bool)
    if not positive.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = positive[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / positive.sum()
    points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
    return float(np.mean(points))


def mean_average_precision_11pt(
    scores: np.ndarray, labels: np.ndarray, num_classes: int, name: str = "mean_average_precision_11pt"
) -> Score:
    """The mean over classes with a test image of their 11-point AP (the CLIP paper's VOC2007
    metric), each class's images ranked by their score for it. No interval: the bootstrap of a
    ranking metric per class is not what the paper reports."""
    labels = np.asarray(labels, dtype=np.int64)
    aps = [average_precision_11pt(scores[:, c], labels == c) for c in range(num_classes)]
    present = [a for a in aps if not np.isnan(a)]
    return Score(name, float(np.mean(present)) if present else float("nan"), None, None, len(labels))
