"""Query lists and word-boundary substring matching (the "search" half of WIT-style curation).

A query list is a text file, one query per line (blank lines and lines starting with ``#`` are
skipped), read from any URL through ``wit.manifests.storage``. Its sha256 goes into the curate
config, so a changed list is a changed config and never mixes with an earlier run's output.

:class:`QueryMatcher` puts every lower-cased query into one Aho-Corasick automaton
(pyahocorasick, C), so a text is scanned once whatever the number of queries: a 500,000-entry
list costs about what a 50-entry one does. The automaton reports every occurrence, including
queries inside longer words; a hit counts only when the characters on both sides of it are not
alphanumeric, so "red" matches "a red star" but not "bored" or "redo".

``queries_default.txt`` (shipped next to this module) is built from the synthetic world's
vocabulary by :func:`default_query_lines`; it is what the demo curates with.

:func:`selection_draw` is MetaCLIP's draw per pair and query, the same in curate's balancing and
in filter's ``--rebalance``, so both keep the same pairs for the same seed and cap.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Sequence
from importlib import resources

import ahocorasick

from wit.evaluate import world
from wit.manifests import storage

DEFAULT_QUERIES_NAME = "queries_default.txt"


def default_queries_url() -> str:
    """Where the shipped default list lies (a local path inside the installed package)."""
    return str(resources.files("wit.ingest").joinpath(DEFAULT_QUERIES_NAME))


def parse_queries(text: str) -> list[str]:
    """Queries of a list file's text: stripped, lower-cased, unique, in first-seen order."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        q = " ".join(line.split()).lower()
        if q and not q.startswith("#"):
            seen.setdefault(q, None)
    return list(seen)


def read_queries(url: str) -> tuple[list[str], str]:
    """The queries of the list file at ``url`` and the sha256 of its bytes."""
    data = storage.read_bytes(url)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{url}: a query list must be UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_queries(text), hashlib.sha256(data).hexdigest()


def file_sha256(url: str) -> str:
    return storage.sha256_url(url)


# Every character that is not a letter or a digit becomes a space, one for one, so positions in
# the translated text are positions in the original. ASCII text (nearly all of it) goes through
# bytes.translate, five times faster than str.translate; other text through the regex, whose \W
# is "not a letter, digit or _".
_ASCII_WORDS = bytes(c if c < 128 and chr(c).isalnum() else 32 for c in range(256))
_NON_WORD = re.compile(r"[\W_]")


def _blank_non_words(text: str) -> str:
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_WORDS).decode("ascii")
    return _NON_WORD.sub(" ", text)


class QueryMatcher:
    """Which queries of a list occur in a text, on word boundaries, case-insensitively.

    A query matches where its lower-cased text occurs in the lower-cased text with no letter or
    digit right before or after it. The automaton does the boundary test itself: it holds each
    query with every non-word character blanked and a space at both ends, and scans the text
    blanked the same way with a space at both ends, so it only reports whole-word hits ("red" is
    never reported inside "bored"). Each hit is then compared with the real text, so a blank in
    the key stands for the very character of the query (``"red star"`` does not match
    ``"red-star"``). Scanning for raw substrings instead reports every short query inside every
    longer word, dozens of hits a caption with a large list, each costing a Python iteration.

    >>> QueryMatcher(["red", "red star", "star"]).match("A red STAR, not bored")
    ['red', 'red star', 'star']
    """

    __slots__ = ("_automaton", "size")

    def __init__(self, queries: Iterable[str]):
        keys: dict[str, list[str]] = {}
        seen: set[str] = set()
        for q in queries:
            q = " ".join(q.split()).lower()
            if q and q not in seen:
                seen.add(q)
                # Queries that differ only in punctuation ("c++", "c--") share a key.
                keys.setdefault(f" {_blank_non_words(q)} ", []).append(q)
        automaton = ahocorasick.Automaton()
        for key, originals in keys.items():
            automaton.add_word(key, (len(key), tuple(originals)))
        self.size = len(seen)
        if self.size:
            automaton.make_automaton()
        self._automaton = automaton

    def __len__(self) -> int:
        return self.size

    def _hits(self, text: str):
        """Every (start, query) whole-word hit in the lower-cased ``text``."""
        low = text.lower()
        for end, (n, originals) in self._automaton.iter(f" {_blank_non_words(low)} "):
            # The key spans padded[end - n + 1 : end + 1]; its query starts one after its leading
            # space, which is low[end - n + 1] since padding shifted everything by one.
            start = end - n + 1
            for q in originals:
                if low.startswith(q, start):
                    yield q

    def match(self, text: str | None) -> list[str]:
        """The sorted, unique queries found in ``text`` on word boundaries."""
        if not text or not self.size:
            return []
        low = text.lower()
        # _hits inlined: this is the hot loop of curate, and a comprehension beats a generator.
        found = [
            q
            for end, (n, originals) in self._automaton.iter(f" {_blank_non_words(low)} ")
            for q in originals
            if low.startswith(q, end - n + 1)
        ]
        if len(found) < 2:
            return found
        return sorted(set(found))

    def match_many(self, texts: Sequence[str | None]) -> list[list[str]]:
        match = self.match
        return [match(t) for t in texts]

    def matches_any(self, text: str | None) -> bool:
        """Whether any query occurs in ``text`` on word boundaries (stops at the first)."""
        if not text or not self.size:
            return False
        return next(self._hits(text), None) is not None


def selection_draw(seed: int, uid: str, query: str) -> float:
    """``u(seed, uid, q)``: a uniform number in [0, 1), the same for the same three on any machine."""
    digest = hashlib.blake2b(f"{seed}\x1f{uid}\x1f{query}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@functools.lru_cache(maxsize=4)
def cached_matcher(url: str, sha256: str) -> QueryMatcher:
    """A matcher for the list at ``url``, built once per process (workers run many partitions).

    The digest is part of the key and is checked against the bytes read: a list edited after the
    config was built would otherwise curate with other queries than the run record says.
    """
    queries, digest = read_queries(url)
    if digest != sha256:
        raise ValueError(
            f"{url} changed since the config was built (sha256 {digest[:12]}…, config says {sha256[:12]}…); "
            "rebuild the config"
        )
    return QueryMatcher(queries)


def default_query_lines() -> list[str]:
    """The shipped default list: the synthetic world's words, alone and in the phrases captions use."""
    shapes, colours = list(world.SHAPES), list(world.COLOURS)
    digits = list(world.DIGITS)
    words = [world.DIGIT_WORDS[d] for d in digits]
    lines: list[str] = []
    lines += shapes + colours + words
    lines += [f"number {d}" for d in digits] + [f"number {w}" for w in words]
    lines += [f"digit {d}" for d in digits] + [f"digit {w}" for w in words]
    lines += [f"numeral {d}" for d in digits] + ["number", "digit", "numeral", "shape"]
    lines += [f"{c} {s}" for c in colours for s in shapes]
    lines += [f"{c} {d}" for c in colours for d in digits]
    lines += [f"{c} {w}" for c in colours for w in words]
    lines += [f"{c} number {d}" for c in colours for d in digits]
    lines += [f"{c} digit {d}" for c in colours for d in digits]
    lines += [f"{c} numeral {d}" for c in colours for d in digits]
    lines += [f"{s} in {c}" for c in colours for s in shapes]
    lines += [f"{s} icon" for s in shapes] + [f"{s} shape" for s in shapes]
    return lines


if __name__ == "__main__":
    # Regenerate the shipped list: python -m wit.ingest.queries > ingest/queries_default.txt
    print("# wit default query list: the synthetic world's shapes, colours and digits (see queries.py)")
    print("\n".join(default_query_lines()))
