"""The float32, chunked, any-device linear probe (issue #19) against the float64 full-batch fit it replaced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wit.evaluate import probe
from wit.evaluate.probe import LinearClassifier, _fit, _loss_grad, _stratified_holdout, fewshot, linear_probe


def _reference_fit(
    x: np.ndarray, y: np.ndarray, c: float, init: LinearClassifier | None = None, max_iter: int = 300
) -> LinearClassifier:
    """The probe's ``_fit`` before issue #19, verbatim but for the name and ``max_iter`` (300 there; the
    benchmark bounds it): float64, full-batch logits, one thread."""
    classes = np.unique(y)
    target = torch.from_numpy(np.searchsorted(classes, y))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).double()
    w = torch.zeros(x.shape[1], len(classes), dtype=torch.float64)
    b = torch.zeros(len(classes), dtype=torch.float64)
    if init is not None and np.array_equal(init.classes, classes):
        w, b = torch.from_numpy(init.weight.copy()), torch.from_numpy(init.bias.copy())
    w.requires_grad_(True)
    b.requires_grad_(True)
    lam = 1.0 / (2.0 * c * len(y))
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, target) + lam * (w * w).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return LinearClassifier(w.detach().numpy(), b.detach().numpy(), classes)


def _reference_probe(train_x, train_y, test_x, num_classes, cs=probe.DEFAULT_CS, val_fraction=0.2, seed=0):
    """The probe's ``linear_probe`` before issue #19 (float64 scores), on ``_reference_fit``."""
    rng = np.random.default_rng(seed)
    val = _stratified_holdout(train_y, val_fraction, rng)
    validation = {}
    clf = None
    for c in sorted(cs):
        clf = _reference_fit(train_x[~val], train_y[~val], c, clf)
        validation[c] = float((clf.predict(train_x[val]) == train_y[val]).mean())
    best = max(validation.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    clf = _reference_fit(train_x, train_y, best)
    out = np.full((test_x.shape[0], num_classes), -np.inf)
    out[:, clf.classes] = test_x.astype(np.float64) @ clf.weight + clf.bias
    return out, best


def _mixture(
    n: int, dim: int, classes: int, spread: float, seed: int, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mixture features: class means ``spread`` noise standard deviations apart (in expectation),
    the whole times ``scale / sqrt(dim)``."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim)) * spread / np.sqrt(2 * dim)
    y = rng.integers(0, classes, n)
    x = (means[y] + rng.standard_normal((n, dim))) * scale / np.sqrt(dim)
    return x.astype(np.float32), y


@pytest.mark.parametrize(
    ("spread", "scale", "label"),
    [
        (6.0, 1.0, "separable"),  # ~98% accurate, C 0.1
        (3.0, 1.0, "overlapping"),  # ~64%, C 1
        (6.0, 0.01, "small-norm"),  # features like a random-init model's: the large, ill-conditioned C end
    ],
)
def test_float32_probe_matches_the_float64_reference(spread, scale, label):
    x, y = _mixture(2500, 64, 10, spread, seed=1, scale=scale)
    train_x, train_y, test_x, test_y = x[:2000], y[:2000], x[2000:], y[2000:]
    ref_scores, ref_c = _reference_probe(train_x, train_y, test_x, 10)
    res = linear_probe(train_x, train_y, test_x, 10)
    ref_acc = (ref_scores.argmax(1) == test_y).mean()
    acc = (res.scores.argmax(1) == test_y).mean()
    assert abs(acc - ref_acc) <= 0.01, (label, acc, ref_acc)
    cs = sorted(probe.DEFAULT_CS)
    assert abs(cs.index(res.best_c) - cs.index(ref_c)) <= 1, (label, res.best_c, ref_c)
    assert res.scores.dtype == np.float32 and res.scores.shape == (500, 10)
    assert 0.3 < acc  # chance is 0.1: the problems are learnable


def test_chunked_fit_gives_the_one_chunk_weights():
    x, y = _mixture(1500, 32, 7, 3.0, seed=2)
    whole = _fit(x, y, 1.0, chunk_rows=len(y))
    chunked = _fit(x, y, 1.0, chunk_rows=211)  # uneven: the last chunk is shorter
    assert whole.weight.dtype == np.float32
    np.testing.assert_allclose(chunked.weight, whole.weight, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(chunked.bias, whole.bias, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(chunked.classes, whole.classes)


def test_chunked_loss_and_gradient_are_the_objective_and_its_autograd_gradient():
    x, y = _mixture(300, 16, 5, 3.0, seed=3)
    rng = np.random.default_rng(0)
    w64 = torch.tensor(rng.standard_normal((16, 5)), requires_grad=True)
    b64 = torch.tensor(rng.standard_normal(5), requires_grad=True)
    lam = 0.01
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(x).double() @ w64 + b64, torch.from_numpy(y))
    ref = ref + lam * (w64 * w64).sum()
    ref.backward()
    w, b = w64.detach().float().clone(), b64.detach().float().clone()
    loss = _loss_grad(torch.from_numpy(x), torch.from_numpy(y), w, b, lam, chunk=64)
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-5)
    np.testing.assert_allclose(w.grad.numpy(), w64.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b.grad.numpy(), b64.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_fewshot_is_none_when_a_class_has_fewer_than_k_examples():
    x, y = _mixture(200, 16, 4, 3.0, seed=4)
    y[y == 3] = 0
    y[:3] = 3  # class 3 has 3 examples
    assert fewshot(x, y, x[:10], 4, k=4) is None
    scores = fewshot(x, y, x[:10], 4, k=3)
    assert scores is not None and scores.shape == (10, 4) and scores.dtype == np.float32


def test_a_class_missing_from_training_scores_minus_infinity():
    x, y = _mixture(400, 16, 4, 3.0, seed=5)
    y[y == 2] = 1
    res = linear_probe(x, y, x[:20], 4)
    assert np.isneginf(res.scores[:, 2]).all() and np.isfinite(res.scores[:, [0, 1, 3]]).all()
