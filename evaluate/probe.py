"""Linear probe and few-shot classifiers on frozen image features.

The linear probe follows CLIP's appendix A.3: an L2-regularised logistic regression on the image
embeddings, its inverse regularisation ``C`` chosen by a sweep scored on a validation part held
out of the training split, then refitted on the whole training split with the chosen ``C``.

Few-shot draws ``k`` training examples per class (seeded) and fits the same classifier with a
fixed ``C``: with one example per class there is nothing to hold out for a sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_CS = tuple(float(c) for c in np.logspace(-2, 4, 7))


@dataclass(slots=True)
class ProbeResult:
    scores: np.ndarray  # (n_test, classes) decision scores
    best_c: float
    validation: dict[float, float]  # C -> validation accuracy


@dataclass(slots=True)
class LinearClassifier:
    """Multinomial logistic regression weights over the classes seen in training."""

    weight: np.ndarray  # (dim, seen classes)
    bias: np.ndarray  # (seen classes,)
    classes: np.ndarray  # the label of each column

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes[(x @ self.weight + self.bias).argmax(axis=1)]


def _fit(x: np.ndarray, y: np.ndarray, c: float, init: LinearClassifier | None = None) -> LinearClassifier:
    """L2-regularised multinomial logistic regression, sklearn's objective
    ``C * sum(cross-entropy) + ||W||^2 / 2`` divided by ``C * n`` so it is a mean, minimised by
    full-batch L-BFGS in torch. (scipy's L-BFGS in sklearn needs thousands of slow iterations at
    the large C end of the sweep; this converges in well under a second on probe-sized data.)"""
    import torch

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
        max_iter=300,
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
    # At probe sizes every op is tiny: intra-op threads only add synchronisation (3x slower here).
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return LinearClassifier(w.detach().numpy(), b.detach().numpy(), classes)


def _scores(clf: LinearClassifier, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Decision scores laid out over all classes (a class missing from training scores -inf)."""
    out = np.full((x.shape[0], num_classes), -np.inf)
    out[:, clf.classes] = x.astype(np.float64) @ clf.weight + clf.bias
    return out


def _stratified_holdout(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of validation rows: ``fraction`` of each class (at least one when it has two)."""
    val = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        take = int(round(len(idx) * fraction))
        take = min(max(take, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val[idx[:take]] = True
    return val


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    cs: tuple[float, ...] = DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> ProbeResult:
    rng = np.random.default_rng(seed)
    val = _stratified_holdout(train_y, val_fraction, rng)
    validation: dict[float, float] = {}
    if val.any() and len(np.unique(train_y[~val])) > 1:
        clf = None
        for c in sorted(cs):  # increasing C, each fit warm-started from the last
            clf = _fit(train_x[~val], train_y[~val], c, clf)
            validation[c] = float((clf.predict(train_x[val]) == train_y[val]).mean())
        # Ties go to the smaller C (stronger regularisation), the safer choice on a small val set.
        best = max(validation.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    else:
        best = 1.0
    clf = _fit(train_x, train_y, best)
    return ProbeResult(_scores(clf, test_x, num_classes), best, validation)


def fewshot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    k: int,
    c: float = 10.0,
    seed: int = 0,
) -> np.ndarray | None:
    """Test scores of a classifier fitted on ``k`` examples per class; None when a class has fewer."""
    rng = np.random.default_rng(seed + k)
    chosen = []
    for cls in range(num_classes):
        idx = np.flatnonzero(train_y == cls)
        if len(idx) < k:
            return None
        chosen.append(rng.choice(idx, size=k, replace=False))
    sel = np.concatenate(chosen)
    if len(np.unique(train_y[sel])) < 2:
        return None
    clf = _fit(train_x[sel], train_y[sel], c)
    return _scores(clf, test_x, num_classes)
