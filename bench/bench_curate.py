"""Curate's query matching against a 500,000-entry query list, on one core, next to a plain loop.

Generates the list (the synthetic world's vocabulary plus pseudo-words and pairs of them, the size
of the CLIP paper's list) and 200,000 captions from ``wit.evaluate.world.caption``, then measures
in one run:

Timings of (a) and (b) are the fastest of three runs.

a. ``QueryMatcher`` alone (Aho-Corasick, word boundaries): captions per second;
b. the whole MATCH partition function (clean-up, URL and text filters, matching, URL hashing) on
   an in-memory candidates table, and the same through the stage (Parquet read and write);
c. the plain Python way, ``[q for q in queries if q in text]`` over all 500,000 queries, on a
   small sample (it takes tens of milliseconds per caption), extrapolated to captions per second;

and, for context, the three curate phases end to end through the executor.

Run: ``.venv/bin/python bench/bench_curate.py [--captions N] [--queries N]``; writes the
``curate`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import commit, pin_one_core, table, write_section  # noqa: E402

from wit.evaluate import world  # noqa: E402
from wit.ingest.curate import BALANCE, COUNT, CURATE_PHASES, MATCH, CurateConfig, match_table  # noqa: E402
from wit.ingest.queries import QueryMatcher, default_query_lines  # noqa: E402
from wit.ingest.urls import uid_of  # noqa: E402
from wit.manifests.manifest import ManifestRef, digest_of, write_part  # noqa: E402
from wit.manifests.runrecord import RunRecord, write_run_record  # noqa: E402
from wit.manifests.schemas import CANDIDATES  # noqa: E402
from wit.pipeline.executor import run_stage  # noqa: E402

_ONSETS = [
    "",
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "br",
    "ch",
    "cl",
    "dr",
    "fl",
    "gr",
    "pl",
    "pr",
    "sh",
    "sl",
    "st",
    "str",
    "th",
    "tr",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "oo", "ou", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "rk", "st", "x"]


def pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 3)))


def make_queries(n: int, seed: int = 0) -> list[str]:
    """The world's vocabulary, then pseudo-words (60%) and pairs of them until there are ``n``."""
    rng = random.Random(seed)
    queries = dict.fromkeys(default_query_lines())
    words = [pseudo_word(rng) for _ in range(n // 2)]
    while len(queries) < n:
        queries[rng.choice(words) if rng.random() < 0.6 else f"{rng.choice(words)} {rng.choice(words)}"] = None
    return list(queries)[:n]


def make_captions(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [world.caption(world.sample_concept(rng), rng) for _ in range(n)]


def candidates_table(captions: list[str]) -> pa.Table:
    urls = [f"https://img{i % 997}.example.com/{i}.jpg" for i in range(len(captions))]
    return pa.table(
        {
            "uid": [uid_of(u, t) for u, t in zip(urls, captions, strict=True)],
            "url": urls,
            "text": captions,
            "page_url": [f"https://site{i % 997}.example.com/p{i // 3}.html" for i in range(len(captions))],
            "lang": ["en"] * len(captions),
        }
    )


def best_of(fn, repeat: int = 3) -> tuple[float, object]:
    """Fastest of ``repeat`` runs (seconds) and the last result: this machine is shared, and the
    fastest run is the one least disturbed by other processes."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}"


def one_core() -> str:
    # One core, as the target says: no Arrow thread pool, and the process pinned where possible.
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    return pin_one_core()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=500_000)
    ap.add_argument("--loop-sample", type=int, default=200)
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    pinned = one_core()
    # The machine may be shared: say how busy it was, since that moves every number below.
    load = f"load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""

    queries = make_queries(args.queries)
    captions = make_captions(args.captions)
    print(f"{len(queries):,} queries, {len(captions):,} captions; {pinned}", file=sys.stderr)

    t0 = time.perf_counter()
    matcher = QueryMatcher(queries)
    build_s = time.perf_counter() - t0

    match_s, matched = best_of(lambda: matcher.match_many(captions))
    hit_share = sum(1 for m in matched if m) / len(matched)
    per_caption = sum(len(m) for m in matched) / len(matched)

    with tempfile.TemporaryDirectory() as tmp:
        qfile = Path(tmp) / "queries.txt"
        qfile.write_text("\n".join(queries) + "\n")
        config = CurateConfig.build(queries=str(qfile))
        cands = candidates_table(captions)
        rules = config.text_rules(None)
        table_s, (rows, counts) = best_of(
            lambda: match_table(cands, rules, matcher, config.allow_private_hosts, config.keep_unmatched)
        )

        # Through the stage: Parquet in, Parquet out, the matcher built once per process first.
        src = Path(tmp) / "cands"
        info = write_part(str(src), 0, cands, CANDIDATES)
        ref = ManifestRef(url=str(src), kind="candidates", digest=digest_of({info.name: info.sha256}))
        write_run_record(
            str(src),
            RunRecord(
                stage="bench",
                config={},
                inputs=[],
                output=ref,
                files={info.name: info},
                rows=cands.num_rows,
                partitions=1,
            ),
        )
        config.matcher()  # warm the per-process cache, as a worker has after its first partition
        phase_s = {}
        phase_ref = ref
        for stage, sub in CURATE_PHASES:
            t0 = time.perf_counter()
            outcome = run_stage(stage, config, [phase_ref], str(Path(tmp) / "out" / sub), progress=False)
            phase_s[stage.name] = time.perf_counter() - t0
            phase_ref = outcome.ref

    sample = captions[: args.loop_sample]
    t0 = time.perf_counter()
    for text in sample:
        low = text.lower()
        [q for q in queries if q in low]  # substring test only: no word boundaries, and still this slow
    loop_s = time.perf_counter() - t0

    n = len(captions)
    stage_total = sum(phase_s.values())
    rows_md = [
        [
            "`QueryMatcher.match` (Aho-Corasick, word boundaries)",
            rate(n, match_s),
            f"{n:,}",
            f"automaton built in {build_s:.1f} s",
        ],
        [
            "MATCH partition function (`match_table`: clean + filters + match + URL hash)",
            rate(n, table_s),
            f"{n:,}",
            f"{counts.get('kept', 0):,} eligible",
        ],
        [
            "MATCH phase through the executor (Parquet read + write)",
            rate(n, phase_s[MATCH.name]),
            f"{n:,}",
            "",
        ],
        ["COUNT phase (URL dedup, per-query counts)", rate(n, phase_s[COUNT.name]), f"{n:,}", ""],
        ["BALANCE phase (MetaCLIP draw per row)", rate(n, phase_s[BALANCE.name]), f"{n:,}", ""],
        ["whole curate, three phases", rate(n, stage_total), f"{n:,}", f"{stage_total:.1f} s"],
        [
            "plain Python `q in text` over every query",
            rate(len(sample), loop_s),
            f"{len(sample):,}",
            f"{loop_s / len(sample) * 1e3:.0f} ms per caption",
        ],
    ]
    speedup = (n / table_s) / (len(sample) / loop_s)
    body = (
        f"Commit `{commit()}`. {len(queries):,} queries (the synthetic world's {len(default_query_lines())} "
        "plus pseudo-words and pairs), captions from `wit.evaluate.world.caption` "
        f"({hit_share:.0%} match at least one query, {per_caption:.1f} queries per caption on average); "
        f"one process, {pinned}, Arrow on one thread; "
        f"{load}.\n\n"
        + table(["what", "captions/s (one core)", "captions", "note"], rows_md)
        + f"\n\nThe MATCH partition function is {speedup:,.0f}× the plain loop; "
        "target ≥ 100,000 captions/s/core "
        f"for curate's matching: {'met' if n / table_s >= 100_000 else 'NOT met'} "
        f"({rate(n, table_s)} captions/s).\n"
    )
    print(body)
    if not args.no_write:
        path = write_section("curate", "curate: query matching (500k queries, one core)", body, "bench/bench_curate.py")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
