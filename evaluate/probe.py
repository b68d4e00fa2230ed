"""Linear probe and few-shot classifiers on frozen image features.

The linear probe follows CLIP's appendix A.3: an L2-regularised logistic regression on the image
embeddings, its inverse regularisation ``C`` chosen by a sweep scored on a validation part held
out of the training split, then refitted on the whole training split with the chosen ``C``.

Few-shot draws ``k`` training examples per class (seeded) and fits the same classifier with a
fixed ``C``: with one example per class there is nothing to hold out for a sweep.

The fit is float32 torch on any device, its loss and gradient summed over chunks of rows, so memory
stays bounded at ImageNet scale (1.28M x 512 features, 1000 classes: the float32 features are 2.6 GB,
one chunk's logits a few MB on CPU, a few hundred MB on a GPU).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

DEFAULT_CS = tuple(float(c) for c in np.logspace(-2, 4, 7))

MAX_ITER = 300  # L-BFGS iterations of a fit
# From this many fitted rows on, each fit of the C sweep is capped at SWEEP_MAX_ITER iterations (the
# sweep warm-starts each C from the last, so later fits start close); the final refit is not capped.
LARGE_N = 100_000
SWEEP_MAX_ITER = 100
# Logits elements per chunk of rows: bounds the working memory of one loss/gradient pass.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "other": 1 << 27}  # 16 MB on CPU, 512 MB on an accelerator
# Below this many multiply-adds per matrix product (rows x dim x classes) a CPU fit runs on one thread:
# every op is tiny, intra-op threads only add synchronisation (3x slower on probe-sized data).
ONE_THREAD_WORK = 1 << 26


@dataclass(slots=True)
class ProbeResult:
    scores: np.ndarray  # (n_test, classes) float32 decision scores
    best_c: float
    validation: dict[float, float]  # C -> validation accuracy


@dataclass(slots=True)
class LinearClassifier:
    """Multinomial logistic regression weights over the classes seen in training."""

    weight: np.ndarray  # (dim, seen classes) float32
    bias: np.ndarray  # (seen classes,) float32
    classes: np.ndarray  # the label of each column

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes[(x @ self.weight + self.bias).argmax(axis=1)]


def _as_tensor(x: np.ndarray, device: str):
    """float32 features on ``device``, without a copy when they already are float32 on the CPU."""
    import torch

    x = np.ascontiguousarray(x, dtype=np.float32)
    with warnings.catch_warnings():  # a read-only array (a memory-mapped cache) is only ever read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x).to(device)


def _chunk_rows(num_classes: int, device) -> int:
    budget = CHUNK_ELEMENTS["cpu" if str(device).startswith("cpu") else "other"]
    return max(1, budget // max(num_classes, 1))


def _loss_grad(x, target, w, b, lam: float, chunk: int):
    """Mean cross-entropy + ``lam * ||W||^2`` and its gradient, summed over chunks of ``chunk`` rows:
    never more than one chunk's logits at a time. The gradient is written to ``w.grad``/``b.grad``."""
    import torch

    n = x.shape[0]
    gw = torch.zeros_like(w)
    gb = torch.zeros_like(b)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    minus_one = torch.full((min(chunk, n), 1), -1.0, dtype=w.dtype, device=x.device)
    for start in range(0, n, chunk):
        xc, tc = x[start : start + chunk], target[start : start + chunk, None]
        z = torch.addmm(b, xc, w)  # (rows, classes) logits
        z -= z.amax(1, keepdim=True)
        zt = z.gather(1, tc)  # 0 where the target is the top logit: the loss keeps its precision near 0
        z.exp_()
        s = z.sum(1, keepdim=True)
        total += (s.log() - zt).sum(dtype=torch.float64)
        z /= s  # softmax
        z.scatter_add_(1, tc, minus_one[: len(tc)])  # d(cross-entropy)/d(logits), times n
        gw.addmm_(xc.T, z)
        gb += z.sum(0)
    gw.div_(n).add_(w, alpha=2.0 * lam)
    gb.div_(n)
    w.grad, b.grad = gw, gb
    return total / n + lam * (w * w).sum(dtype=torch.float64)


def _fit_tensors(x, target, num_classes: int, c: float, init=None, max_iter: int = MAX_ITER, chunk_rows=None):
    """Fit on torch tensors (features on their device, targets 0..num_classes-1); returns (W, b)."""
    import torch

    n, dim = x.shape
    if init is not None:
        w, b = init[0].detach().clone(), init[1].detach().clone()
    else:
        w = torch.zeros(dim, num_classes, dtype=torch.float32, device=x.device)
        b = torch.zeros(num_classes, dtype=torch.float32, device=x.device)
    lam = 1.0 / (2.0 * c * n)
    chunk = chunk_rows or _chunk_rows(num_classes, x.device)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    threads = torch.get_num_threads()
    small = x.device.type == "cpu" and n * dim * num_classes <= ONE_THREAD_WORK
    if small:
        torch.set_num_threads(1)
    try:
        with torch.no_grad():
            opt.step(lambda: _loss_grad(x, target, w, b, lam, chunk))
    finally:
        if small:
            torch.set_num_threads(threads)
    return w, b


def _targets(y: np.ndarray, device: str):
    import torch

    classes = np.unique(y)
    return classes, torch.from_numpy(np.searchsorted(classes, y)).to(device)


def _fit(
    x: np.ndarray,
    y: np.ndarray,
    c: float,
    init: LinearClassifier | None = None,
    *,
    device: str = "cpu",
    max_iter: int = MAX_ITER,
    chunk_rows: int | None = None,
) -> LinearClassifier:
    """L2-regularised multinomial logistic regression, sklearn's objective
    ``C * sum(cross-entropy) + ||W||^2 / 2`` divided by ``C * n`` so it is a mean (mean cross-entropy
    + ``||W||^2 / (2 C n)``), minimised by full-batch L-BFGS in float32 torch on ``device``. Each loss
    and gradient evaluation runs over chunks of ``chunk_rows`` rows (default: a few MB of logits on
    CPU), so memory does not grow with n x classes. (scipy's L-BFGS in sklearn needs thousands of slow
    iterations at the large C end of the sweep; this converges in well under a second on probe-sized
    data, where it runs on one thread.)"""
    import torch

    classes, target = _targets(y, device)
    w0 = None
    if init is not None and np.array_equal(init.classes, classes):
        w0 = (torch.from_numpy(init.weight).float().to(device), torch.from_numpy(init.bias).float().to(device))
    w, b = _fit_tensors(_as_tensor(x, device), target, len(classes), c, w0, max_iter, chunk_rows)
    return LinearClassifier(w.cpu().numpy(), b.cpu().numpy(), classes)


def _logits_argmax(x, w, b):
    """Row-wise argmax of ``x @ w + b``, chunk by chunk."""
    import torch

    chunk = _chunk_rows(w.shape[1], x.device)
    with torch.no_grad():
        return torch.cat([torch.addmm(b, x[s : s + chunk], w).argmax(1) for s in range(0, x.shape[0], chunk)])


def _scores(clf: LinearClassifier, x: np.ndarray, num_classes: int, device: str = "cpu") -> np.ndarray:
    """float32 decision scores laid out over all classes (a class missing from training scores -inf),
    computed chunk by chunk on ``device``."""
    import torch

    out = np.full((x.shape[0], num_classes), -np.inf, dtype=np.float32)
    w = torch.from_numpy(clf.weight).float().to(device)
    b = torch.from_numpy(clf.bias).float().to(device)
    cols = clf.classes
    chunk = _chunk_rows(num_classes, device)
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            out[s : s + chunk, cols] = torch.addmm(b, _as_tensor(x[s : s + chunk], device), w).cpu().numpy()
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
    *,
    device: str = "cpu",
) -> ProbeResult:
    """Sweep ``cs`` (increasing, each fit warm-started from the last) scored on a stratified validation
    part, then refit on all of ``train_x`` with the best C (ties: the smaller C) and score ``test_x``.

    Everything runs on ``device`` in float32. From ``LARGE_N`` fitted rows on (ImageNet scale), each
    sweep fit stops after ``SWEEP_MAX_ITER`` L-BFGS iterations rather than ``MAX_ITER``; the refit is
    not capped."""
    import torch

    rng = np.random.default_rng(seed)
    val = _stratified_holdout(train_y, val_fraction, rng)
    x = _as_tensor(train_x, device)
    validation: dict[float, float] = {}
    if val.any() and len(np.unique(train_y[~val])) > 1:
        fit_y, val_y = train_y[~val], train_y[val]
        classes, target = _targets(fit_y, device)
        mask = torch.from_numpy(~val).to(device)
        fit_x, val_x = x[mask], x[~mask]
        max_iter = SWEEP_MAX_ITER if len(fit_y) >= LARGE_N else MAX_ITER
        wb = None
        for c in sorted(cs):  # increasing C, each fit warm-started from the last
            wb = _fit_tensors(fit_x, target, len(classes), c, wb, max_iter)
            pred = classes[_logits_argmax(val_x, *wb).cpu().numpy()]
            validation[c] = float((pred == val_y).mean())
        del fit_x, val_x, target, wb
        # Ties go to the smaller C (stronger regularisation), the safer choice on a small val set.
        best = max(validation.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    else:
        best = 1.0
    classes, target = _targets(train_y, device)
    w, b = _fit_tensors(x, target, len(classes), best)
    clf = LinearClassifier(w.cpu().numpy(), b.cpu().numpy(), classes)
    return ProbeResult(_scores(clf, test_x, num_classes, device), best, validation)


def fewshot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    k: int,
    c: float = 10.0,
    seed: int = 0,
    *,
    device: str = "cpu",
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
    clf = _fit(train_x[sel], train_y[sel], c, device=device)
    return _scores(clf, test_x, num_classes, device)
