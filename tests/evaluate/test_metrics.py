"""Metric code on constructed embeddings with known answers (no model, no files)."""

from __future__ import annotations

import numpy as np
import pytest

from wit.evaluate import metrics as M


def _one_hot_world(classes: int, per_class: int, dim: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    prototypes = M.normalize(rng.normal(size=(classes, dim)))
    labels = np.repeat(np.arange(classes), per_class)
    return prototypes, labels


def test_perfect_classifier_scores_one_with_a_degenerate_interval():
    protos, labels = _one_hot_world(10, 20)
    images = protos[labels]  # every image is exactly its class embedding
    scores = M.classification_scores(images @ protos.T, labels, 10, resamples=200)
    by = {s.metric: s for s in scores}
    assert by["acc1"].value == 1.0 and by["acc1"].ci_low == 1.0 and by["acc1"].ci_high == 1.0
    assert by["acc5"].value == 1.0 and by["mean_per_class_recall"].value == 1.0
    assert by["acc1"].n == 200


def test_random_classifier_is_at_chance_within_its_interval():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, size=3000)
    scores = rng.normal(size=(3000, 10))
    by = {s.metric: s for s in M.classification_scores(scores, labels, 10, resamples=500, seed=3)}
    for name, chance in (("acc1", 0.1), ("acc5", 0.5), ("mean_per_class_recall", 0.1)):
        s = by[name]
        assert s.ci_low <= chance <= s.ci_high, (name, s)
        assert s.ci_low < s.value < s.ci_high


def test_known_confusion_matrix_and_per_class_recall():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 0, 1, 2, 1, 1, 2, 2, 0, 2])
    m = M.confusion_matrix(labels, preds, 3)
    assert m.tolist() == [[2, 1, 1], [0, 2, 0], [1, 0, 3]]
    recall = M.per_class_recall(preds == labels, labels, 3)
    np.testing.assert_allclose(recall, [0.5, 1.0, 0.75])
    s = M.mean_per_class_recall_score("mpcr", preds == labels, labels, 3, resamples=100)
    assert s.value == pytest.approx(0.75) and s.n == 10
    # a class with no samples is left out of the mean rather than counted as 0
    assert np.isnan(M.per_class_recall(np.array([1.0]), np.array([0]), 2)[1])


def test_topk_hits():
    scores = np.array([[0.1, 0.5, 0.4, 0.0], [0.9, 0.05, 0.03, 0.02]])
    assert M.topk_hits(scores, np.array([2, 3]), 1).tolist() == [False, False]
    assert M.topk_hits(scores, np.array([2, 3]), 2).tolist() == [True, False]
    assert M.topk_hits(scores, np.array([2, 3]), 4).tolist() == [True, True]


def test_recall_at_k_on_constructed_retrieval():
    # 3 images, 2 captions each; text j belongs to image owner[j].
    owner = np.array([0, 0, 1, 1, 2, 2])
    sim = np.array(
        [
            [0.9, 0.1, 0.0, 0.0, 0.2, 0.0],  # image 0: its caption 0 is first -> i2t hit at 1
            [
                0.0,
                0.0,
                0.1,
                0.1,
                0.9,
                0.8,
            ],  # image 1: two captions of image 2 first; its own 3rd -> hit at 5 only
            [0.0, 0.0, 0.0, 0.0, 0.7, 0.0],  # image 2: own caption first
        ]
    )
    i2t1, t2i1 = M.retrieval_hits(sim, owner, 1)
    assert i2t1.tolist() == [True, False, True]
    # text queries: text 0 -> image 0 (0.9) hit; text 1 -> image 0 (0.1) hit; text 2 -> image 1 (0.1) hit;
    # text 3 -> image 1 hit; text 4 -> image 1 (0.9) miss; text 5 -> image 1 (0.8) miss
    assert t2i1.tolist() == [True, True, True, True, False, False]
    i2t3, t2i3 = M.retrieval_hits(sim, owner, 3)
    assert i2t3.all() and t2i3.sum() == 6 - 0
    by = {s.metric: s for s in M.retrieval_scores(sim, owner, (1,), resamples=100)}
    assert by["text_retrieval_recall@1"].value == pytest.approx(2 / 3) and by["text_retrieval_recall@1"].n == 3
    assert by["image_retrieval_recall@1"].value == pytest.approx(4 / 6) and by["image_retrieval_recall@1"].n == 6


def test_bootstrap_interval_contains_truth_and_shrinks_with_n():
    rng = np.random.default_rng(7)
    small = rng.random(100) < 0.3
    large = rng.random(10_000) < 0.3
    a = M.mean_score("acc", small, resamples=1000, seed=0)
    b = M.mean_score("acc", large, resamples=1000, seed=0)
    assert a.ci_low <= 0.3 <= a.ci_high and b.ci_low <= 0.3 <= b.ci_high
    wa, wb = a.ci_high - a.ci_low, b.ci_high - b.ci_low
    # width ~ 1/sqrt(n): 100x the samples gives about a tenth of the width
    assert 6 < wa / wb < 15
    # about 2 * 1.96 * sqrt(p(1-p)/n) for the large sample
    assert wb == pytest.approx(2 * 1.96 * np.sqrt(0.21 / 10_000), rel=0.15)
    # seeded: the same interval every time
    assert M.mean_score("acc", small, resamples=1000, seed=0).ci_low == a.ci_low


def test_prompt_ensembling_is_the_renormalised_mean_of_normalised_embeddings():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(4, 3, 8)) * rng.uniform(0.1, 10, size=(4, 3, 1))  # very different norms
    got = M.ensemble_classifier(text)
    for c in range(4):
        unit = [t / np.linalg.norm(t) for t in text[c]]
        mean = np.mean(unit, axis=0)
        np.testing.assert_allclose(got[c], mean / np.linalg.norm(mean), rtol=1e-6)
    # not the same as normalising the raw mean (long embeddings would dominate)
    raw = M.normalize(text.mean(axis=1))
    assert not np.allclose(raw, got)
    with pytest.raises(ValueError):
        M.ensemble_classifier(text[0])


def test_per_class_recall_interval_equals_the_plain_loop():
    """The one-bincount resample statistic gives exactly the interval of the obvious per-class loop,
    a class absent from some resamples (NaN there) included."""
    rng = np.random.default_rng(3)
    labels = np.concatenate([rng.integers(0, 5, 300), [7]])  # class 7: one unit, often resampled away
    hits = (rng.random(labels.size) < 0.6).astype(np.float64)

    def naive(idx):
        out = []
        for row in idx:
            lab, hit = labels[row], hits[row]
            out.append(np.nanmean([hit[lab == c].mean() if (lab == c).any() else np.nan for c in np.unique(labels)]))
        return np.array(out)

    got = M.mean_per_class_recall_score("r", hits, labels, 8, resamples=200, seed=5)
    want = M.bootstrap_interval(labels.size, naive, 200, 5)
    assert (got.ci_low, got.ci_high) == pytest.approx(want, abs=1e-12)
    hits = hits * 0.5  # graded values, not hits: the float-weights path
    got = M.mean_per_class_recall_score("r", hits, labels, 8, resamples=200, seed=5)
    want = M.bootstrap_interval(labels.size, naive, 200, 5)
    assert (got.ci_low, got.ci_high) == pytest.approx(want, abs=1e-12)


def test_mean_interval_of_hits_equals_the_float_mean_path():
    """0/1 hits take the byte-counting path; its interval is exactly that of the plain float mean."""
    hits = (np.random.default_rng(4).random(500) < 0.4).astype(np.float64)
    got = M.mean_score("acc1", hits, resamples=300, seed=2)
    want = M.bootstrap_interval(hits.size, lambda idx: hits[idx].mean(axis=1), 300, 2)
    assert (got.ci_low, got.ci_high) == pytest.approx(want, abs=1e-12)
    graded = hits * 0.5  # not hits: the float path, same answer scaled
    assert M.mean_score("m", graded, resamples=300, seed=2).ci_high == pytest.approx(want[1] * 0.5, abs=1e-12)
