"""Language identification of many short texts at once, with py3langid's model and decision.

py3langid walks its byte automaton in a Python loop and scores each text with its own handful of
numpy calls: about 20 µs an alt text, most of it fixed cost, which made language identification
the largest single cost of ``wit extract``. :class:`BatchIdentifier` runs the same automaton and
the same naive Bayes sum over a batch of texts: the automaton steps every text of a batch at once
(one numpy gather a byte position), and the feature sums are one sparse (text × feature) by dense
(feature × language) product.

The result is py3langid's ``classify(text)[0]`` (raw scores, no normalisation), with one
difference: the per-text sums are added in another order, so two languages whose float32 scores
differ in the last bits may swap. ``tests/ingest/test_language.py`` checks agreement on generated
texts in many scripts; on the real-web corpus the labels are identical.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

# A batch's byte grid (texts × longest text) stays under this many bytes.
GRID_BYTES = 1 << 22
# The longest texts of a batch are walked one by one (Python, like py3langid) once fewer than this
# many remain: a numpy step costs the same for one text as for a thousand.
MIN_VECTOR_ROWS = 16
# Texts labelled in one go: the walk's (text, feature) hits take about 2 kB a text.
TEXTS_AT_ONCE = 50_000


class BatchIdentifier:
    """py3langid's identifier over many texts; ``languages`` restricts it as ``--languages`` does."""

    def __init__(self, languages: Sequence[str] = ()) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        model = LanguageIdentifier.from_model_file(MODEL_FILE)
        if languages:
            model.set_languages(list(languages))
        self._encode = model._encode  # lower-case an all-capitals text, NFC, UTF-8: py3langid's own
        self.labels: list[str] = list(model.nb_classes)  # one per column: aliases (srl -> sr) repeat a label
        self._next = np.frombuffer(model.tk_nextmove, dtype=np.uint32)  # the model's array, not a copy
        self._rowbase = np.asarray(model._rowbase, dtype=np.int64)
        self._feature = np.asarray(model.tk_output, dtype=np.int64)  # state → feature, -1 for none
        # feature × language; the model ships float16, and float32 (exact) is faster to sum
        self._table = np.asarray(model.nb_ptc, dtype=np.float32)
        self._prior = np.asarray(model.nb_pc, dtype=np.float32)
        self._aliases = list(model._alias_pairs)  # (first, duplicate) columns of one label
        # the same automaton as Python sequences, for the few long texts walked one at a time
        self.tk_nextmove, self.tk_rowbase, self.tk_output = model.tk_nextmove, model._rowbase, model.tk_output

    def distinct_labels(self) -> list[str]:
        return list(dict.fromkeys(self.labels))

    def classify_many(self, texts: Sequence[str]) -> list[str]:
        """The language label of each text, as ``py3langid.classify(text)[0]`` gives it, in slices
        of :data:`TEXTS_AT_ONCE` texts (the walk holds about 2 kB per text)."""
        if len(texts) > TEXTS_AT_ONCE:
            return [
                x for i in range(0, len(texts), TEXTS_AT_ONCE) for x in self._classify(texts[i : i + TEXTS_AT_ONCE])
            ]
        return self._classify(texts)

    def _classify(self, texts: Sequence[str]) -> list[str]:
        if not texts:
            return []
        encoded = [self._encode(t) for t in texts]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        order = np.argsort(lengths, kind="stable")
        rows, features = [], []
        start = 0
        while start < len(order):
            # texts sorted by length: a batch's grid is its count times its last text's length
            stop = start + 1
            while stop < len(order) and (stop + 1 - start) * int(lengths[order[stop]]) <= GRID_BYTES:
                stop += 1
            batch = order[start:stop]
            r, f = self._walk([encoded[i] for i in batch], lengths[batch])
            rows.append(batch[r])
            features.append(f)
            start = stop
        best = self._best_columns(np.concatenate(rows), np.concatenate(features), len(encoded))
        labels = self.labels
        return [labels[i] for i in best.tolist()]

    def _walk(self, batch: list[bytes], lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(text, feature) of every feature the automaton emits on a batch sorted by length."""
        n = len(batch)
        width = int(lengths[-1]) if n else 0
        if width == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        grid = np.frombuffer(b"".join(b.ljust(width, b"\0") for b in batch), dtype=np.uint8).reshape(n, width)
        # The texts that still have a byte at position j are a suffix of the batch (sorted by length).
        first_active = np.searchsorted(lengths, np.arange(width), side="right")
        state = np.zeros(n, dtype=np.int64)
        hit_rows, hit_features = [], []
        j = 0
        while j < width and n - first_active[j] >= MIN_VECTOR_ROWS:
            lo = int(first_active[j])
            s = self._next[self._rowbase[state[lo:]] + grid[lo:, j]]
            state[lo:] = s
            f = self._feature[s]
            keep = np.flatnonzero(f >= 0)
            if keep.size:
                hit_rows.append(keep + lo)
                hit_features.append(f[keep])
            j += 1
        if j < width:  # the few longest texts: on in Python from where the grid stopped
            nm, rowbase, out = self.tk_nextmove, self.tk_rowbase, self.tk_output
            tail = int(first_active[j])
            rows: list[int] = []  # one list for all of them: two numpy arrays a text cost more than its walk
            found: list[int] = []
            for i, at in enumerate(state[tail:].tolist(), start=tail):
                for byte in batch[i][j:]:
                    at = nm[rowbase[at] + byte]
                    if (feature := out[at]) >= 0:
                        found.append(feature)
                        rows.append(i)
            hit_rows.append(np.array(rows, dtype=np.int64))
            hit_features.append(np.array(found, dtype=np.int64))
        if not hit_rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(hit_rows), np.concatenate(hit_features)

    def _best_columns(self, rows: np.ndarray, features: np.ndarray, n: int) -> np.ndarray:
        """Best language column of each of ``n`` texts from the (text, feature) hits of the walk."""
        import scipy.sparse  # here, not at the top: `wit --help` and the other stages need not load it

        best = np.zeros(n, dtype=np.int64)  # a text with no feature gets column 0, as in py3langid
        if rows.size == 0:
            return best
        n_features = self._table.shape[0]
        keys, counts = np.unique(rows * n_features + features, return_counts=True)
        rows, features = np.divmod(keys, n_features)
        # text × feature weights (log1p of the counts, as py3langid weighs them) times the feature ×
        # language table: one sparse product, which adds each text's rows without copying them out
        indptr = np.searchsorted(rows, np.arange(n + 1))
        weights = scipy.sparse.csr_matrix(
            (np.log1p(counts.astype(np.float32)), features, indptr), shape=(n, n_features)
        )
        scores = weights @ self._table
        scores += self._prior
        for i, j in self._aliases:
            np.maximum(scores[:, i], scores[:, j], out=scores[:, i])
            scores[:, j] = -np.inf
        found = np.diff(indptr) > 0
        best[found] = scores[found].argmax(axis=1)
        return best


@functools.lru_cache(maxsize=4)
def batch_identifier(languages: tuple[str, ...] = ()) -> BatchIdentifier:
    """One identifier per process and language set (loading the model takes about half a second)."""
    return BatchIdentifier(languages)
