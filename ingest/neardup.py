"""Near duplicates at any size: every pair of 64-bit hashes within ``d`` bits, found by blocks.

Split the 64 bits into ``k > d`` blocks. Two hashes at most ``d`` bits apart differ in at most ``d``
blocks, so they agree exactly on at least ``k - d`` of them: on one of the ``C(k, k - d)``
*combinations* of ``k - d`` blocks. Each hash is keyed once per combination by its bits there
(``hash & mask``); hashes sharing a key are candidates, and a candidate pair is a pair when the
Hamming distance says so. Every pair is found (the pigeonhole argument), nothing else is kept.

``k = d + 1`` is classic multi-index hashing with ``d + 1`` bands (each ``64 / (d + 1)`` bits);
a larger ``k`` makes wider keys (fewer candidates per key) at the price of more keys per hash.
:func:`choose_layout` picks ``k`` for the number of hashes, so that the candidates per hash stay
about constant as the dataset grows: this is what keeps the time per row flat instead of growing
with the row count (13-bit bands at 16M hashes give ~2,000 candidates per hash per band).

The keys are also what spreads the work: a (combination, key) pair is hashed to a bucket, and a
bucket's task only compares hashes that share a key, so no task holds more than its bucket.
:func:`leaders` turns the pairs into today's leader-clustering decisions (see its docstring).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

PAIRS_PER_CHUNK = 1 << 22  # candidate pairs compared per numpy step (a few tens of MB)
# measured on one core (numpy 2.4, 4M hashes): one key (bucket file written and read, sorted), one pair compared
_KEY_NS, _PAIR_NS = 200.0, 80.0
MAX_COMBINATIONS = 64


@dataclass(frozen=True, slots=True)
class Layout:
    """``blocks`` blocks of the 64 bits; a key is the bits of ``blocks - distance`` of them."""

    distance: int
    blocks: int

    @property
    def masks(self) -> np.ndarray:
        edges = [round(64 * i / self.blocks) for i in range(self.blocks + 1)]
        block_masks = [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(edges, edges[1:], strict=False)]
        combos = itertools.combinations(range(self.blocks), self.blocks - self.distance)
        return np.array([sum(block_masks[i] for i in c) for c in combos], dtype=np.uint64)

    @property
    def key_bits(self) -> int:
        """The width of the narrowest key: what bounds the candidates per key."""
        return min(int(m).bit_count() for m in self.masks)

    def describe(self) -> str:
        n = len(self.masks)
        return f"{self.blocks} blocks, {n} key{'s' if n > 1 else ''} of >= {self.key_bits} bits per hash"


def estimated_ns(layout: Layout, hashes: int) -> float:
    """Rough cost per hash of a layout with ``hashes`` uniformly spread hashes."""
    keys = len(layout.masks)
    candidates = keys * hashes / 2.0**layout.key_bits / 2  # pairs per hash
    return keys * _KEY_NS + candidates * _PAIR_NS


def choose_layout(distance: int, hashes: int) -> Layout:
    """The cheapest exact layout for ``hashes`` hashes at ``distance`` bits (deterministic)."""
    if not 0 <= distance < 32:
        raise ValueError(f"Hamming distance must be in [0, 32), got {distance}")
    best = Layout(distance, distance + 1)
    for k in range(distance + 2, min(64, distance + 8) + 1):
        layout = Layout(distance, k)
        if math.comb(k, k - distance) > MAX_COMBINATIONS:
            break
        if estimated_ns(layout, hashes) < estimated_ns(best, hashes):
            best = layout
    return best


def keyed(hashes: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """One record per hash and combination: ``(combination, hash)`` arrays, hash-major order."""
    count = len(layout.masks)
    hashes = np.asarray(hashes, dtype=np.uint64)
    return np.tile(np.arange(count, dtype=np.uint8), len(hashes)), np.repeat(hashes, count)


def record_keys(combo: np.ndarray, hashes: np.ndarray, layout: Layout) -> np.ndarray:
    """The key of each record: its hash's bits in its combination's blocks."""
    return np.asarray(hashes, dtype=np.uint64) & layout.masks[combo]


def pairs_sharing_keys(
    combo: np.ndarray, hashes: np.ndarray, layout: Layout
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(a, b)`` arrays of the distinct hash pairs within the distance among keyed records.

    Each record is one (combination, hash); records with the same combination and key are
    compared, all pairs of a group, in chunks of :data:`PAIRS_PER_CHUNK` (a huge group costs time,
    never memory). ``a < b``. Two hashes may share keys under several combinations; the pair is
    yielded only under the first of them, so across all buckets every pair comes out exactly once.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    combo = np.asarray(combo)
    masks = layout.masks
    for c in np.unique(combo).tolist():
        h = hashes[combo == c] if len(masks) > 1 else hashes
        keys = h & masks[c]
        order = np.argsort(keys)
        yield from _group_pairs(keys[order], h[order], layout.distance, masks[:c])


def _group_pairs(
    keys: np.ndarray, h: np.ndarray, distance: int, earlier: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All pairs within ``distance`` among records with equal (sorted) ``keys``, chunk by chunk,
    but those that also agree on an ``earlier`` combination's blocks (found there)."""
    n = len(h)
    if n < 2:
        return
    start = np.ones(n, dtype=bool)
    start[1:] = keys[1:] != keys[:-1]
    ends = np.flatnonzero(np.append(start[1:], True)) + 1  # one past each group's last record
    after = ends[np.cumsum(start) - 1] - np.arange(n) - 1  # records after each in its group
    total = np.cumsum(after)
    first = 0
    while first < n:
        # the records whose forward pairs fit in one chunk (at least one record)
        base = total[first - 1] if first else 0
        last = max(first + 1, int(np.searchsorted(total, base + PAIRS_PER_CHUNK, side="right")))
        counts = after[first:last]
        m = int(counts.sum())
        if m:
            i = np.repeat(np.arange(first, last), counts)
            j = i + 1 + (np.arange(m) - np.repeat(np.cumsum(counts) - counts, counts))
            a, b = h[i], h[j]
            diff = a ^ b
            near = (np.bitwise_count(diff) <= distance) & (diff != 0)
            for mask in earlier:
                near &= (diff & mask) != 0
            if near.any():
                a, b = a[near], b[near]
                yield np.minimum(a, b), np.maximum(a, b)
        first = last


def near_pairs(hashes: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct pair of distinct hashes within the distance, once (``a < b``), in one process."""
    combo, repeated = keyed(np.unique(np.asarray(hashes, dtype=np.uint64)), layout)
    return unique_pairs(pairs_sharing_keys(combo, repeated, layout))


def unique_pairs(chunks) -> tuple[np.ndarray, np.ndarray]:
    a_parts, b_parts = [], []
    for a, b in chunks:
        a_parts.append(a)
        b_parts.append(b)
    if not a_parts:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    pairs = np.unique(np.stack([np.concatenate(a_parts), np.concatenate(b_parts)], axis=1), axis=0)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def matches(queries: np.ndarray, stored: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
    """``(query position, stored position)`` of every query/stored pair within ``distance`` bits.

    For a small stored set (evaluation images): each band of ``distance + 1`` is looked up in the
    stored hashes sorted by that band, so the cost is the queries times the candidates per band.
    """
    queries = np.asarray(queries, dtype=np.uint64)
    stored = np.asarray(stored, dtype=np.uint64)
    if not len(queries) or not len(stored):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    out_q, out_s = [], []
    for mask in Layout(distance, distance + 1).masks:
        skeys = stored & mask
        order = np.argsort(skeys, kind="stable")
        sorted_keys = skeys[order]
        qkeys = queries & mask
        lo = np.searchsorted(sorted_keys, qkeys, side="left")
        hi = np.searchsorted(sorted_keys, qkeys, side="right")
        counts = hi - lo
        m = int(counts.sum())
        if not m:
            continue
        qi = np.repeat(np.arange(len(queries)), counts)
        si = order[np.repeat(lo, counts) + (np.arange(m) - np.repeat(np.cumsum(counts) - counts, counts))]
        near = np.bitwise_count(queries[qi] ^ stored[si]) <= distance
        out_q.append(qi[near])
        out_s.append(si[near])
    if not out_q:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    pairs = np.unique(np.stack([np.concatenate(out_q), np.concatenate(out_s)], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def leaders(rank: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Leader clustering over a graph: ``leader[i]`` is ``-1`` for a leader, else the leader it joins.

    Nodes are visited in ``rank`` order (``rank[i]``: node ``i``'s place, the order of the smallest
    uids); a node becomes a leader unless a leader visited before it is a neighbour, and joins the
    first such leader. ``a``, ``b``: node positions of the edges (the pairs within the distance).
    This is exactly global leader clustering (a node's decision depends only on the leaders within
    the distance, which are its neighbours), run on the nodes that have any neighbour at all.

    Computed in rounds over the edges, all nodes at once: a node whose earlier neighbours are,
    in order, followers up to a leader follows that leader; one whose earlier neighbours are all
    followers leads; the others wait for the next round. A visiting order that is a hash (uids)
    needs few rounds; a chain needs as many as it is long.
    """
    rank = np.asarray(rank)
    n = len(rank)
    index = np.int32 if n < 2**31 else np.int64
    ra, rb = rank[a].astype(index), rank[b].astype(index)
    lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
    del ra, rb
    order = np.lexsort((lo, hi))  # by node, its earlier neighbours ascending
    lo, hi = lo[order], hi[order]
    del order
    undecided, leads, follows = 0, 1, 2
    state = np.zeros(n, dtype=np.int8)  # by rank
    joins = np.full(n, -1, dtype=index)
    has_earlier = np.zeros(n, dtype=bool)
    has_earlier[hi] = True
    state[~has_earlier] = leads
    while True:
        open_ = state[hi] == undecided
        lo, hi = lo[open_], hi[open_]
        if not len(hi):
            break
        s = state[lo]
        # the first earlier neighbour of each node that is not (yet) known to follow
        cand = np.flatnonzero(s != follows)
        first = cand[np.r_[True, hi[cand][1:] != hi[cand][:-1]]] if len(cand) else cand
        node, first_state = hi[first], s[first]
        join = first_state == leads
        state[node[join]], joins[node[join]] = follows, lo[first][join]
        has_candidate = np.zeros(n, dtype=bool)
        has_candidate[node] = True
        alone = np.zeros(n, dtype=bool)
        alone[hi] = True  # still undecided, with earlier neighbours
        lead_now = alone & ~has_candidate  # every earlier neighbour follows
        state[lead_now] = leads
        if not join.any() and not lead_now.any():
            raise RuntimeError("leader clustering made no progress")  # cannot happen: the smallest open node decides
    by_rank = np.empty(n, dtype=np.int64)
    by_rank[rank] = np.arange(n)  # rank -> node
    joined = joins[rank].astype(np.int64)  # per node, the rank of its leader
    return np.where(joined >= 0, by_rank[np.maximum(joined, 0)], -1)


# ---------------------------------------------------------------------------------------------
# connected components at any size: large-star and small-star rounds (Kiveris et al., 2014)


def star_round(u: np.ndarray, v: np.ndarray, large: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """One round of the alternating large-star / small-star algorithm on the arcs ``(u, v)`` of the
    nodes at hand (both directions of every edge that touches them; repeats are fine).

    Returns the round's edges ``(x, y)`` (undirected: the caller sends each to both ends) and how
    many of the nodes at hand are *open*: neither a centre (every neighbour larger) nor a leaf
    (one neighbour, smaller). With no open node anywhere every component is a star around its
    smallest node, and a round gives back the edges it was given: that is convergence.

    - large star: each node ``u`` links its larger neighbours to ``m``, the smallest of ``u`` and
      its neighbours;
    - small star: each node ``u`` links itself and its smaller neighbours to the smallest of them.

    Both keep the components; alternated, every component becomes a star in O(log² n) rounds
    (each round is one pass over the edges, grouped by node, so it splits into node buckets).
    """
    u = np.asarray(u, dtype=np.uint64)
    v = np.asarray(v, dtype=np.uint64)
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    keep = np.ones(len(u), dtype=bool)
    keep[1:] = (u[1:] != u[:-1]) | (v[1:] != v[:-1])
    u, v = u[keep], v[keep]
    first = np.ones(len(u), dtype=bool)
    first[1:] = u[1:] != u[:-1]
    group = np.cumsum(first) - 1
    smaller = v < u
    n_small = np.bincount(group, weights=smaller, minlength=int(first.sum()))
    n_all = np.bincount(group, minlength=int(first.sum()))
    open_ = int((~((n_small == 0) | ((n_small == 1) & (n_all == 1)))).sum())
    if large:
        # sorted by (u, v): a node's smallest neighbour is its first arc's
        m = np.minimum(u[first], v[first])[group]
        sel = v > u
        return v[sel], m[sel], open_
    us, vs = u[smaller], v[smaller]
    if not len(us):
        return us, vs, open_
    head = np.ones(len(us), dtype=bool)
    head[1:] = us[1:] != us[:-1]
    m = vs[head][np.cumsum(head) - 1]  # the smallest smaller neighbour of each arc's node
    sel = vs != m
    return np.concatenate([vs[sel], us[head]]), np.concatenate([m[sel], vs[head]]), open_


def star_labels(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(node, label)`` for the nodes of converged (star) arcs: each node's component is named by
    its centre, the smallest node (a leaf's one neighbour; a centre's own value)."""
    u = np.asarray(u, dtype=np.uint64)
    v = np.asarray(v, dtype=np.uint64)
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    first = np.ones(len(u), dtype=bool)
    first[1:] = u[1:] != u[:-1]
    return u[first], np.minimum(u[first], v[first])


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(node, label)`` of every node of the edges ``(a, b)``, in one process: the star rounds
    run to convergence (the reference the bucketed rounds are tested against)."""
    x, y = np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)
    for r in itertools.count():
        u, v = np.concatenate([x, y]), np.concatenate([y, x])
        x, y, open_ = star_round(u, v, large=r % 2 == 0)
        if not open_:
            return star_labels(u, v)
    raise AssertionError("unreachable")
