"""``wit curate``: WIT-style curation of extracted candidates, balanced per query as MetaCLIP does.

Three stages run in order; each reads the previous one's finished output (``CURATE_PHASES``)::

    candidates ──MATCH──▶ OUT/_match ──COUNT──▶ OUT/_count ──BALANCE──▶ OUT (curated)
    (per part)            every row: clean      (per bucket of          (per MATCH part)
                          text, pre-balance     URL hashes)             every row: keep/reason,
                          reason, queries,      the bucket's per-query  queries; tallies of
                          url hash; keys/:      counts; duplicates/:    per-query counts before
                          the eligible rows     its URL-duplicate       and after balancing
                          by URL-hash bucket    losers by MATCH part

MATCH (one partition per candidates part file) cleans the text (:mod:`.text`), then names the
first problem of each row in this order: the image URL (:mod:`.safety`: ``bad_url``,
``private_host``, ``literal_ip``), the text filters (``empty_text``, ``too_short``,
``too_long``, ``boilerplate``, ``too_few_words``, ``blocklisted``, ``lang_not_allowed``), and
``no_query_match`` for a text that contains no query (unless ``keep_unmatched``). A row with no
reason is *eligible*; only eligible rows get their queries and a 64-bit hash of their URL.
MATCH part ``p`` also writes ``keys/part-p.arrow``, a bucket file (:mod:`wit.manifests.buckets`)
of its eligible rows' (url hash, uid, row, queries), split into ``B`` buckets by the URL hash.

COUNT keeps one pair per image URL: among the eligible rows with the same URL hash, the one with
the smallest uid (then the earliest part and row, so even identical rows have one winner). The
others are ``duplicate_url``. No task holds every row: COUNT has one partition per bucket, and
partition ``b`` reads bucket ``b`` of every MATCH part's key file. All rows of one URL share its
bucket, so each bucket decides its URLs exactly as one pass over all rows would
(:func:`count_queries`). Partition ``b`` writes the per-query counts of its winners as main part
``b`` (a query has a row in every bucket where it has winners; BALANCE sums them) and its losers'
row numbers as ``duplicates/part-b.arrow``, a bucket file keyed by MATCH part, so that BALANCE
part ``p`` reads batch ``p`` of each. ``B`` follows the data (one bucket per 500,000 candidates,
or ``--buckets``): it changes where the decisions are made, never what they are, so the curated
bytes are the same for any ``B``.

BALANCE (one partition per MATCH part) keeps an eligible, non-duplicate row iff for any of its
queries ``q``: ``u(seed, uid, q) < t / max(count[q], t)``, with ``t`` the per-query cap and ``u``
a uniform number in [0, 1) drawn from a hash of (seed, uid, q). A query with at most ``t`` pairs
keeps them all; one with ``n > t`` keeps each with probability ``t/n``, about ``t`` in all. The
draw depends on nothing but the row and the seed, so the selection is the same for any number of
workers or ``--part`` slices, and the same seed gives the same bytes. Rows it drops are
``over_cap``. Its output keeps every candidate row, kept or not, in the ``curated`` schema.

The URL is hashed as it is: extract already wrote it normalised (``wit.ingest.urls``).

Memory: a MATCH or BALANCE task holds one part (BALANCE also the summed counts: a table of
queries, not of rows), a COUNT task one bucket (about 500,000 rows by default), however large
the dataset. Job arrays: ``--part i/N`` slices MATCH; the slice that finishes MATCH runs COUNT and
BALANCE in full (:func:`wit.pipeline.executor.run_phases`), ``--workers`` buckets at a time. Two
slices racing on them is harmless, since every partition writes the same bytes atomically.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wit.manifests import buckets, storage
from wit.manifests.buckets import option as buckets_option  # the config field is `buckets`
from wit.manifests.manifest import ManifestError, ManifestRef, open_manifest, read_part
from wit.manifests.options import Option, check_options
from wit.manifests.runrecord import RunRecord, read_run_record
from wit.manifests.schemas import with_kind
from wit.manifests.stage import Partition, PartitionResult, StageError, input_parts

from .queries import QueryMatcher, cached_matcher, default_queries_url, read_queries, selection_draw
from .safety import host_problem
from .text import TextRules, clean_texts, normalize_lang, text_problems

NO_QUERY_MATCH = "no_query_match"
DUPLICATE_URL = "duplicate_url"
OVER_CAP = "over_cap"
KEPT = "kept"

MATCH_KIND = "curate_match"
COUNT_KIND = "curate_count"
KEYS_TABLE = "keys"  # MATCH's bucket files: eligible rows by URL-hash bucket
DUPLICATES_TABLE = "duplicates"  # COUNT's bucket files: URL-duplicate losers by MATCH part

MATCH_SCHEMA = with_kind(
    pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("url", pa.string(), nullable=False),
            pa.field("text", pa.string()),  # cleaned
            pa.field("page_url", pa.string()),
            pa.field("lang", pa.string()),  # the candidate's, normalised; detected when it had none
            pa.field("queries", pa.list_(pa.string())),  # null unless the row is eligible
            pa.field("reason", pa.string()),  # null: eligible for dedup and balancing
            pa.field("url_hash", pa.uint64()),  # null unless the row is eligible
        ]
    ),
    MATCH_KIND,
)
COUNT_SCHEMA = with_kind(
    pa.schema([pa.field("query", pa.string(), nullable=False), pa.field("count", pa.int64(), nullable=False)]),
    COUNT_KIND,
)
# What COUNT needs of an eligible MATCH row; ``row`` is its position in its MATCH part.
KEYS_SCHEMA = pa.schema(
    [
        pa.field("url_hash", pa.uint64(), nullable=False),
        pa.field("uid", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("queries", pa.list_(pa.string())),
    ]
)
# Batch p of a duplicates bucket file: the rows of MATCH part p that lost their URL.
DUPLICATES_SCHEMA = pa.schema([pa.field("row", pa.int32(), nullable=False)])

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CANDIDATE_COLUMNS = ["uid", "url", "text", "page_url", "lang"]


@dataclass(frozen=True, slots=True)
class CurateConfig:
    """What ``wit curate`` does; build it with :meth:`build`, which digests the query list.

    The digests make the files part of the config: the run record names the exact lists used,
    and a changed list is a different config, which the stage driver refuses to mix into an
    existing output folder.
    """

    queries: str = field(default_factory=default_queries_url)  # URL of the query list
    queries_sha256: str = ""
    per_query_cap: int = 20000  # t: MetaCLIP's and the CLIP paper's cap
    seed: int = 0
    langs: tuple[str, ...] = ("en",)  # empty: any language
    min_chars: int = 5
    max_chars: int = 1000
    min_words: int = 2
    blocklist: str | None = None  # URL of a list of words/phrases, one a line
    blocklist_sha256: str | None = None
    allow_private_hosts: bool = False
    keep_unmatched: bool = False
    buckets: int | None = None  # of the URL de-duplication; None: one per ROWS_PER_BUCKET candidates

    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("queries", "path", None, "Query list, one per line (default: the list wit ships).", metavar="URL"),
        Option("per-query-cap", "int", per_query_cap, low=1),
        Option("seed", "int", seed, "Seed of the balancing draw.", low=0),
        Option("lang", "strs", langs, "Allowed languages, comma-separated; '' = any."),
        Option("min-chars", "int", min_chars, low=0),
        Option("max-chars", "int", max_chars, low=1),
        Option("min-words", "int", min_words, low=0),
        Option("blocklist", "path", None, "Words or phrases that drop a text, one per line.", metavar="URL"),
        Option("allow-private-hosts", "bool", False, "Keep 127.0.0.1 and other private hosts (tests, demo)."),
        Option("keep-unmatched", "bool", False, "Keep texts that match no query."),
        buckets_option("the URL de-duplication", "candidates"),
    )

    @classmethod
    def from_options(cls, values: Mapping[str, Any], out: str | None = None) -> CurateConfig:
        v = check_options(cls.OPTIONS, values, "curate")
        return cls.build(queries=v.pop("queries"), blocklist=v.pop("blocklist"), langs=v.pop("lang"), **v)

    def __post_init__(self) -> None:
        if not _SHA256_RE.match(self.queries_sha256 or ""):
            raise ValueError("queries_sha256 must be the query list's sha256: build the config with CurateConfig.build")
        if (self.blocklist is None) != (self.blocklist_sha256 is None) or (
            self.blocklist_sha256 is not None and not _SHA256_RE.match(self.blocklist_sha256)
        ):
            raise ValueError("blocklist needs its sha256: build the config with CurateConfig.build")
        if not isinstance(self.per_query_cap, int) or self.per_query_cap < 1:
            raise ValueError(f"--per-query-cap must be a positive integer, got {self.per_query_cap!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if self.buckets is not None:
            buckets.bucket_count(0, self.buckets)  # raises unless an integer in [1, MAX_BUCKETS]
        if not isinstance(self.langs, tuple):
            raise ValueError("langs must be a tuple of language codes")
        self.text_rules(blocklist=None)  # validates the limits and language codes

    @classmethod
    def build(
        cls,
        queries: str | None = None,
        blocklist: str | None = None,
        langs: tuple[str, ...] | list[str] | str | None = ("en",),
        **options: Any,
    ) -> CurateConfig:
        """A config for the query list (default: the shipped one) and blocklist at these URLs.

        ``langs`` may be a comma-separated string (``"en,de"``); ``None`` or empty allows any.
        Reads both files: they must exist, and the query list must hold at least one query.
        """
        queries = storage.normalize(queries) if queries else default_queries_url()
        parsed, digest = read_queries(queries)
        if not parsed:
            raise ValueError(f"{queries}: the query list holds no queries")
        block_sha = None
        if blocklist:
            blocklist = storage.normalize(blocklist)
            _, block_sha = read_queries(blocklist)
        if isinstance(langs, str):
            langs = [s for s in langs.split(",") if s.strip()]
        codes = tuple(dict.fromkeys(normalize_lang(s) for s in (langs or ()) if normalize_lang(s)))
        return cls(
            queries=queries,
            queries_sha256=digest,
            blocklist=blocklist or None,
            blocklist_sha256=block_sha,
            langs=codes,
            **options,
        )

    def text_rules(self, blocklist: QueryMatcher | None) -> TextRules:
        return TextRules(
            min_chars=self.min_chars,
            max_chars=self.max_chars,
            min_words=self.min_words,
            langs=self.langs,
            blocklist=blocklist,
        )

    def matcher(self) -> QueryMatcher:
        return cached_matcher(self.queries, self.queries_sha256)

    def blocklist_matcher(self) -> QueryMatcher | None:
        if self.blocklist is None:
            return None
        return cached_matcher(self.blocklist, self.blocklist_sha256)


# ---------------------------------------------------------------------------------------------
# MATCH: clean, filter, match


def host_problems(urls: pa.Array | pa.ChunkedArray, allow_private: bool) -> pa.Array:
    """:func:`host_problem` for a column of URLs, computed once per distinct scheme://host:port."""
    urls = urls.combine_chunks() if isinstance(urls, pa.ChunkedArray) else urls
    # The verdict depends on the scheme and netloc only, and a crawl has far fewer of those than
    # URLs; netloc ends where urlsplit ends it, at the first "/", "?" or "#".
    prefix = pc.struct_field(pc.extract_regex(urls, r"^(?P<p>[^:/?#]*://[^/?#]*)"), [0])
    encoded = pc.dictionary_encode(prefix)
    verdicts = pa.array([host_problem(p + "/", allow_private) for p in encoded.dictionary.to_pylist()], pa.string())
    reasons = verdicts.take(encoded.indices)
    missing = np.flatnonzero(pc.is_null(prefix).to_numpy(zero_copy_only=False))
    if missing.size:
        # No "scheme://" at all (data: URIs, relative paths): judge the whole URL.
        fixed = [host_problem(u, allow_private) for u in urls.take(pa.array(missing)).to_pylist()]
        reasons = pc.replace_with_mask(reasons, pc.is_null(prefix), pa.array(fixed, pa.string()))
    return reasons


def url_hash(url: str) -> int:
    """64 bits of blake2b of the URL: the dedup key (a collision needs ~4 billion distinct URLs)."""
    return int.from_bytes(hashlib.blake2b(url.encode("utf-8"), digest_size=8).digest(), "little")


def match_table(
    table: pa.Table, rules: TextRules, matcher: QueryMatcher, allow_private: bool, keep_unmatched: bool
) -> tuple[pa.Table, dict[str, int]]:
    """The MATCH rows (``MATCH_SCHEMA``) of one candidates table, and its counts by reason."""
    n = table.num_rows
    host = host_problems(table.column("url"), allow_private)
    texts = clean_texts(table.column("text"))
    text_reason, langs = text_problems(texts, table.column("lang"), rules, skip=pc.is_valid(host))
    reason = pc.coalesce(host, text_reason)

    eligible = np.flatnonzero(pc.is_null(reason).to_numpy(zero_copy_only=False)).tolist()
    take = pa.array(eligible, pa.int64())
    matched = matcher.match_many(texts.take(take).to_pylist()) if eligible else []
    urls = table.column("url").take(take).to_pylist() if eligible else []
    queries: list[list[str] | None] = [None] * n
    hashes: list[int | None] = [None] * n
    reasons = reason.to_pylist()
    for i, q, url in zip(eligible, matched, urls, strict=True):
        queries[i] = q
        if q or keep_unmatched:
            hashes[i] = url_hash(url)
        else:
            reasons[i] = NO_QUERY_MATCH

    out = pa.table(
        {
            "uid": table.column("uid"),
            "url": table.column("url"),
            "text": texts,
            "page_url": table.column("page_url"),
            "lang": langs,
            "queries": pa.array(queries, pa.list_(pa.string())),
            "reason": pa.array(reasons, pa.string()),
            "url_hash": pa.array(hashes, pa.uint64()),
        }
    )
    counts = Counter(r if r is not None else KEPT for r in reasons)
    return out, dict(sorted(counts.items()))


def candidate_rows(inputs: list[ManifestRef]) -> int:
    """Rows of the candidates manifests: their run records' ``rows``, else their part footers."""
    total = 0
    for ref in inputs:
        record = read_run_record(ref.url)
        if record is not None and record.rows > 0:
            total += record.rows
        else:
            total += open_manifest(ref.url, expect_kind="candidates").num_rows
    return total


def key_buckets(config: CurateConfig, candidates: list[ManifestRef]) -> int:
    """``B``, the buckets of the URL de-duplication: ``--buckets``, or one per 500,000 candidates.

    MATCH and COUNT both compute it from the candidates (COUNT through MATCH's run record), so it
    is fixed by the config and the inputs, as partitions must be.
    """
    return buckets.bucket_count(candidate_rows(candidates), config.buckets)


class CurateMatch:
    """Phase 1 of curate: clean, filter and match each candidates part (see the module docstring)."""

    name = "curate-match"
    kind = MATCH_KIND
    schema = MATCH_SCHEMA

    def partitions(self, config: CurateConfig, inputs: list[ManifestRef]) -> list[Partition]:
        if not inputs:
            raise StageError("curate needs at least one candidates manifest")
        parts = input_parts(inputs, "candidates")
        count = key_buckets(config, inputs)
        return [Partition(index=i, source=u, params=(count,)) for i, u in enumerate(parts)]

    def run_partition(self, config: CurateConfig, partition: Partition, out: str) -> PartitionResult:
        (count,) = partition.params
        table = read_part(partition.source, columns=_CANDIDATE_COLUMNS)
        rows, counts = match_table(
            table,
            config.text_rules(config.blocklist_matcher()),
            config.matcher(),
            config.allow_private_hosts,
            config.keep_unmatched,
        )
        keys = eligible_keys(rows)
        where = buckets.of_keys(keys.column("url_hash").to_numpy(), count)
        keys_file = buckets.write(out, partition.index, keys, where, count, KEYS_TABLE)
        return PartitionResult(table=rows, counts=counts, files=[keys_file])


# ---------------------------------------------------------------------------------------------
# COUNT: dedup by URL, count per query, one bucket of URL hashes at a time


def _part_number(url: str) -> int:
    m = re.search(r"part-(\d+)\.parquet$", url)
    if m is None:
        raise StageError(f"{url}: not a part file")
    return int(m.group(1))


def eligible_keys(table: pa.Table) -> pa.Table:
    """The eligible rows of one MATCH part as ``KEYS_SCHEMA``, in row order.

    ``table`` needs ``uid``, ``reason``, ``queries`` and ``url_hash``.
    """
    rows = np.flatnonzero(pc.is_null(table.column("reason")).to_numpy(zero_copy_only=False))
    take = pa.array(rows, pa.int64())
    return pa.Table.from_arrays(
        [
            table.column("url_hash").take(take),
            table.column("uid").take(take),
            pa.array(rows.astype(np.int32)),
            table.column("queries").take(take),
        ],
        schema=KEYS_SCHEMA,
    )


def dedup_urls(keys: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(per-query counts over the winners, (part, row) of the losers) of ``keys``.

    ``keys``: ``KEYS_SCHEMA`` plus ``part``, holding every row of each URL hash it holds (all
    rows, or one bucket of them). The counts are sorted by query, the losers by (part, row).
    """
    # The winner of a URL is its smallest uid; part and row break ties between identical rows.
    # (part, row) is unique, so the order, and with it every decision, ignores the input order.
    ordered = keys.sort_by(
        [("url_hash", "ascending"), ("uid", "ascending"), ("part", "ascending"), ("row", "ascending")]
    )
    hashes = ordered.column("url_hash").to_numpy()
    loser = np.zeros(len(hashes), dtype=bool)
    loser[1:] = hashes[1:] == hashes[:-1]
    duplicates = (
        ordered.filter(pa.array(loser)).select(["part", "row"]).sort_by([("part", "ascending"), ("row", "ascending")])
    )
    winners = ordered.filter(pa.array(~loser))
    flat = pc.list_flatten(winners.column("queries"))
    if len(flat):
        vc = pc.value_counts(flat)
        counts = pa.table({"query": vc.field("values"), "count": vc.field("counts")}).sort_by("query")
    else:
        counts = COUNT_SCHEMA.empty_table()
    return counts, duplicates


def count_queries(parts: list[tuple[int, pa.Table]]) -> tuple[pa.Table, pa.Table]:
    """(per-query counts, duplicate positions) over the MATCH parts ``(part number, table)`` at once.

    The whole-dataset form of COUNT (every eligible row in one table), kept as the reference the
    bucketed COUNT must agree with. Each table needs ``uid``, ``reason``, ``queries`` and
    ``url_hash``; only eligible rows count.
    """
    keys = [
        (k := eligible_keys(t)).append_column("part", pa.array(np.full(k.num_rows, number, dtype=np.int32)))
        for number, t in parts
    ]
    part_field = pa.field("part", pa.int32(), nullable=False)
    every = pa.concat_tables(keys) if keys else KEYS_SCHEMA.append(part_field).empty_table()
    return dedup_urls(every)


def bucket_keys(match_url: str, parts: int, bucket: int) -> pa.Table:
    """Bucket ``bucket`` of the key files of MATCH parts ``0..parts-1``, with each row's ``part``."""
    urls = buckets.file_urls(match_url, KEYS_TABLE, parts)
    return buckets.read_all(urls, bucket, KEYS_SCHEMA, source_column="part")


class CurateCount:
    """Phase 2 of curate: one partition per bucket of URL hashes (see the module docstring)."""

    name = "curate-count"
    kind = COUNT_KIND
    schema = COUNT_SCHEMA

    def partitions(self, config: CurateConfig, inputs: list[ManifestRef]) -> list[Partition]:
        if len(inputs) != 1:
            raise StageError("curate's count phase takes exactly one input: the match phase's output")
        match = inputs[0]
        parts = input_parts(inputs, MATCH_KIND)  # checks the kind and that it holds parts
        record = read_run_record(match.url)
        if record is None:
            raise StageError(f"{match.url}: not a finished match phase of curate (no _run.json)")
        count = key_buckets(config, record.inputs)
        return [Partition(index=b, source=match.url, params=(len(parts),)) for b in range(count)]

    def run_partition(self, config: CurateConfig, partition: Partition, out: str) -> PartitionResult:
        (parts,) = partition.params
        keys = bucket_keys(partition.source, parts, partition.index)
        counts, duplicates = dedup_urls(keys)
        # batch p: the losers of MATCH part p, which BALANCE part p reads (one small read per bucket)
        dup_file = buckets.write(
            out,
            partition.index,
            duplicates.select(["row"]),
            duplicates.column("part").to_numpy(),
            parts,
            DUPLICATES_TABLE,
        )
        return PartitionResult(
            table=counts,
            counts={KEPT: keys.num_rows - duplicates.num_rows, DUPLICATE_URL: duplicates.num_rows},
            files=[dup_file],
        )


# ---------------------------------------------------------------------------------------------
# BALANCE: keep at most about t pairs per query

QUERY_SUM_ROWS = 4_000_000  # per-bucket count rows gathered before they are summed by query


def _sum_by_query(tables: list[pa.Table]) -> pa.Table:
    summed = pa.concat_tables(tables).group_by("query").aggregate([("count", "sum")])
    return summed.select(["query", "count_sum"]).rename_columns(["query", "count"])


@functools.lru_cache(maxsize=4)
def _query_counts(count_url: str, digest: str | None) -> dict[str, int]:
    # Once per worker process and COUNT output: BALANCE runs many parts against the same counts.
    # Each COUNT part counts one bucket's winners, so a query's count is its sum over the parts;
    # summed a few parts at a time, memory stays one table of queries, not one row per bucket.
    manifest = open_manifest(count_url, expect_kind=COUNT_KIND)
    held: list[pa.Table] = []
    rows = 0
    for url in manifest.part_urls():
        held.append(read_part(url, columns=["query", "count"]))
        rows += held[-1].num_rows
        if rows > QUERY_SUM_ROWS:
            held = [_sum_by_query(held)]
            rows = held[0].num_rows
    table = _sum_by_query(held)
    return dict(zip(table.column("query").to_pylist(), table.column("count").to_pylist(), strict=True))


def _duplicate_rows(count_url: str, count: int, part: int) -> set[int]:
    """The rows of MATCH part ``part`` that lost their URL: batch ``part`` of each COUNT bucket."""
    t = buckets.read_all(buckets.file_urls(count_url, DUPLICATES_TABLE, count), part, DUPLICATES_SCHEMA)
    return set(t.column("row").to_pylist())


def balance_table(
    rows: pa.Table, duplicates: set[int], counts: dict[str, int], cap: int, seed: int
) -> tuple[pa.Table, dict[str, int], dict[str, int], dict[str, int]]:
    """The curated rows of one MATCH part, counts by reason, and per-query tallies before/after."""
    reasons = rows.column("reason").to_pylist()
    uids = rows.column("uid").to_pylist()
    queries_col = rows.column("queries")
    keep = [False] * len(reasons)
    # Only rows still eligible need their query lists in Python (converting lists is the slow part).
    open_rows = [i for i, r in enumerate(reasons) if r is None]
    open_queries = queries_col.take(pa.array(open_rows, pa.int64())).to_pylist() if open_rows else []
    for i, qs in zip(open_rows, open_queries, strict=True):
        if i in duplicates:
            reasons[i] = DUPLICATE_URL
            continue
        # MetaCLIP's rule. A query at or under the cap keeps every row, so no draw is needed;
        # an empty list is an unmatched row that keep_unmatched let through.
        if not qs or any(counts.get(q, 0) <= cap or selection_draw(seed, uids[i], q) < cap / counts[q] for q in qs):
            keep[i] = True
        else:
            reasons[i] = OVER_CAP
    keep_arr = pa.array(keep, pa.bool_())
    reason_arr = pa.array(reasons, pa.string())
    # Per-query tallies in Arrow: "before" over the eligible non-duplicates (kept or over the cap).
    standing = pc.or_(keep_arr, pc.fill_null(pc.equal(reason_arr, OVER_CAP), False))
    out = pa.table(
        {
            "uid": rows.column("uid"),
            "url": rows.column("url"),
            "text": rows.column("text"),
            "page_url": rows.column("page_url"),
            "lang": rows.column("lang"),
            "queries": queries_col,
            "keep": keep_arr,
            "reason": reason_arr,
        }
    )
    tally = Counter(r if r is not None else KEPT for r in reasons)
    return (
        out,
        dict(sorted(tally.items())),
        _query_tally(queries_col, standing),
        _query_tally(queries_col, keep_arr),
    )


def _query_tally(queries: pa.ChunkedArray | pa.Array, mask: pa.Array) -> dict[str, int]:
    flat = pc.list_flatten(queries.filter(mask))
    if not len(flat):
        return {}
    vc = pc.value_counts(flat)
    return dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True))


class CurateBalance:
    """Phase 3 of curate: keep about ``per_query_cap`` pairs per query (see the module docstring)."""

    name = "curate"
    kind = "curated"

    def partitions(self, config: CurateConfig, inputs: list[ManifestRef]) -> list[Partition]:
        if len(inputs) != 1:
            raise StageError("curate's balance phase takes exactly one input: the count phase's output")
        count_ref = inputs[0]
        if count_ref.kind is not None and count_ref.kind != COUNT_KIND:
            raise StageError(f"{count_ref.url}: is a {count_ref.kind} manifest, expected {COUNT_KIND}")
        record = read_run_record(count_ref.url)
        if record is None or len(record.inputs) != 1:
            raise StageError(f"{count_ref.url}: not a finished count phase of curate (no _run.json)")
        # The MATCH parts are found through COUNT's run record, so lineage stays one chain; COUNT
        # had one partition per bucket, so its record also says how many duplicates files it wrote.
        parts = input_parts(record.inputs, MATCH_KIND)
        params = (count_ref.url, count_ref.digest, record.partitions)
        return [Partition(index=i, source=u, params=params) for i, u in enumerate(parts)]

    def run_partition(self, config: CurateConfig, partition: Partition, out: str) -> PartitionResult:
        count_url, digest, count = partition.params
        rows = read_part(partition.source)
        duplicates = _duplicate_rows(count_url, count, _part_number(partition.source))
        table, counts, before, after = balance_table(
            rows, duplicates, _query_counts(count_url, digest), config.per_query_cap, config.seed
        )
        # Each part tallies its own eligible, non-duplicate rows: summed over parts in _run.json,
        # queries_before is exactly COUNT's counts summed by query (so its length is the number of
        # queries matched), and queries_after the kept pairs per query.
        return PartitionResult(
            table=table,
            counts=counts,
            tallies={"queries_before": before, "queries_after": after},
        )


MATCH = CurateMatch()
COUNT = CurateCount()
BALANCE = CurateBalance()
# (stage, subfolder of OUT): run in order, each with the previous phase's finished ref as input.
CURATE_PHASES: list[tuple[Any, str]] = [(MATCH, "_match"), (COUNT, "_count"), (BALANCE, "")]


# ---------------------------------------------------------------------------------------------
# summary for `wit manifest show`


def curate_summary(record: RunRecord | dict, n: int = 10) -> str:
    """The head and tail (``n`` each) of the per-query distribution before and after balancing."""
    if isinstance(record, RunRecord):
        tallies, config = record.tallies, record.config
    elif isinstance(record, dict):
        tallies, config = record.get("tallies", {}), record.get("config", {})
    else:
        raise TypeError(f"expected a RunRecord or its dict, got {type(record).__name__}")
    before: dict[str, int] = tallies.get("queries_before", {})
    after: dict[str, int] = tallies.get("queries_after", {})
    lines = [
        f"per-query pairs: {len(before)} queries matched before balancing, {len(after)} after; "
        f"cap t={config.get('per_query_cap', '?')}, seed {config.get('seed', '?')}; "
        f"pairs {sum(before.values()):,} before balancing, {sum(after.values()):,} after "
        "(a pair counts once per query it matches)"
    ]
    for title, dist in (("before balancing", before), ("after balancing", after)):
        ranked = sorted(dist.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(f"{title}:")
        if not ranked:
            lines.append("  (none)")
            continue
        width = max(len(f"{v:,}") for _, v in ranked[:n] + ranked[-n:])
        if len(ranked) <= 2 * n:
            shown = [("", ranked)]
        else:
            shown = [
                (f"  top {n}:", ranked[:n]),
                (f"  … {len(ranked) - 2 * n} more …\n  bottom {n}:", ranked[-n:]),
            ]
        for head, items in shown:
            if head:
                lines.append(head)
            lines += [f"    {v:>{width},}  {q}" for q, v in items]
    return "\n".join(lines)


def read_summary(url: str) -> str:
    """:func:`curate_summary` of the curate output at ``url``."""
    record = read_run_record(url)
    if record is None:
        raise ManifestError(f"{storage.normalize(url)}: no _run.json (not a finished curate output)")
    return curate_summary(record)
