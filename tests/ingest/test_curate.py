"""curate: text clean-up and filters, unsafe hosts, query matching, and the three stages end to end.

Candidates are built directly (from the synthetic web's ground truth, or by hand), so these tests
do not depend on extract; the stages run through the real executor, in worker processes too.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from wit.evaluate import world
from wit.ingest.curate import (
    BALANCE,
    COUNT,
    CURATE_PHASES,
    MATCH,
    CurateConfig,
    balance_table,
    candidate_rows,
    count_queries,
    curate_summary,
    host_problems,
)
from wit.ingest.queries import (
    QueryMatcher,
    default_queries_url,
    default_query_lines,
    read_queries,
    selection_draw,
)
from wit.ingest.safety import host_problem
from wit.ingest.synthetic import generate_web
from wit.ingest.text import TextRules, clean_text, clean_texts, text_problem, text_problems
from wit.ingest.urls import uid_of
from wit.manifests import buckets
from wit.manifests.manifest import ManifestRef, digest_of, open_manifest, read_part, write_part
from wit.manifests.runrecord import RunRecord, read_run_record, write_run_record
from wit.manifests.schemas import CANDIDATES, schema_for
from wit.pipeline.executor import PartSpec, run_stage

# ---------------------------------------------------------------------------------------------
# helpers


def make_candidates(root: Path, rows: list[dict], parts: int = 1) -> ManifestRef:
    """Write rows (url, text, page_url, lang) as a candidates manifest of ``parts`` part files."""
    full = [
        {
            "uid": uid_of(r["url"], r.get("text") or ""),
            "page_url": "https://example.com/page.html",
            "lang": "en",
            **r,
        }
        for r in rows
    ]
    step = math.ceil(len(full) / parts)
    files = {}
    for i in range(parts):
        info = write_part(str(root), i, pa.Table.from_pylist(full[i * step : (i + 1) * step]), CANDIDATES)
        files[info.name] = info
    # A stage input must be finished: a run record as extract would write it.
    ref = ManifestRef(url=str(root), kind="candidates", digest=digest_of({n: f.sha256 for n, f in files.items()}))
    write_run_record(
        str(root),
        RunRecord(
            stage="test-candidates",
            config={},
            inputs=[],
            output=ref,
            files=files,
            rows=len(full),
            partitions=parts,
        ),
    )
    return ref


def run_curate(
    config: CurateConfig, candidates: ManifestRef, out: Path, workers: int = 1, slices: int = 1
) -> ManifestRef:
    """The three phases in order, as the CLI runs them.

    ``slices`` > 1 runs MATCH and BALANCE as a job array, one ``--part i/N`` after the other.
    """
    ref = candidates
    for stage, sub in CURATE_PHASES:
        folder = str(out / sub) if sub else str(out)
        specs = [PartSpec(i, slices) for i in range(slices)] if stage is not COUNT else [PartSpec()]
        for spec in specs:
            outcome = run_stage(stage, config, [ref], folder, workers=workers, part=spec, progress=False)
        assert outcome.done
        ref = outcome.ref
    return ref


def curated_rows(out: Path) -> dict[str, dict]:
    return {r["uid"]: r for r in open_manifest(str(out), expect_kind="curated").table().to_pylist()}


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------
# text


def test_clean_text():
    assert clean_text("  a  red\tstar \n") == "a red star"
    assert clean_text("Caf&eacute; &amp; cr&egrave;me") == "Café & crème"
    assert clean_text("Ã©cole") == "école"  # mojibake
    assert clean_text("a\u00a0b\u2003c") == "a b c"  # Unicode spaces
    assert clean_text(None) == "" and clean_text("   ") == ""


def test_vectorised_filters_match_the_reference():
    samples = [
        "  a red star ",
        None,
        "",
        "img",
        "IMG_1234.jpg",
        "image",
        "Photo 3",
        "untitled-1",
        "click here",
        "DSC0001",
        "PXL_20230101_123456789",
        "Screenshot 2023-04-01 at 10.11.12",
        "a1b2c3d4e5f6a7b8",
        "12345 678",
        "--- ###",
        "circle",
        "a darn red star",
        "x " * 600,
        "Caf&eacute; au lait photo",
        "eine rote Raute auf hellem Hintergrund",
        "blue star icon",
        "my photo (1).PNG",
        "IMG_7448: red heart",
        "a\x00b c",
        "红色的 星星",
        "Free pink hexagon png.",
    ]
    rules = TextRules(blocklist=QueryMatcher(["darn"]))
    texts = clean_texts(pa.array(samples, pa.string()))
    assert texts.to_pylist() == [clean_text(s) for s in samples]
    langs = pa.array([None] * len(samples), pa.string())
    reasons, found = text_problems(texts, langs, rules)
    want = [text_problem(clean_text(s), None, rules) for s in samples]
    assert list(zip(reasons.to_pylist(), found.to_pylist(), strict=True)) == want
    by_text = dict(zip(samples, reasons.to_pylist(), strict=True))
    for s in (
        "IMG_1234.jpg",
        "image",
        "Photo 3",
        "untitled-1",
        "click here",
        "DSC0001",
        "PXL_20230101_123456789",
        "Screenshot 2023-04-01 at 10.11.12",
        "a1b2c3d4e5f6a7b8",
        "12345 678",
        "my photo (1).PNG",
    ):
        assert by_text[s] == "boilerplate", s
    assert by_text[None] == by_text[""] == "empty_text"
    assert by_text["img"] == "too_short"
    assert by_text["x " * 600] == "too_long"
    assert by_text["circle"] == "too_few_words"
    assert by_text["a darn red star"] == "blocklisted"
    assert by_text["eine rote Raute auf hellem Hintergrund"] == "lang_not_allowed"
    # Short English alt text is not dropped on a low-confidence guess of its language.
    assert by_text["blue star icon"] is None and by_text["IMG_7448: red heart"] is None


def test_language_column_wins_over_detection():
    rules = TextRules(langs=("en", "de"))
    texts = pa.array(["a red star on a plain background", "un carré bleu sur fond blanc", "ein roter Stern"])
    reasons, langs = text_problems(texts, pa.array(["en-US", "fr", "DE"]), rules)
    assert reasons.to_pylist() == [None, "lang_not_allowed", None]
    assert langs.to_pylist() == ["en", "fr", "de"]
    reasons, _ = text_problems(texts, pa.array(["fr", "fr", "fr"]), TextRules(langs=()))
    assert reasons.to_pylist() == [None, None, None]  # empty langs: any language


# ---------------------------------------------------------------------------------------------
# hosts


@pytest.mark.parametrize(
    ("url", "default", "allowed"),
    [
        ("https://example.com/a.jpg", None, None),
        ("https://bücher.de/a.jpg", None, None),
        ("http://127.0.0.1:8000/a.png", "private_host", None),
        ("http://169.254.169.254/latest/meta-data/", "private_host", None),
        ("http://10.1.2.3/a.png", "private_host", None),
        ("http://192.168.0.10/a.png", "private_host", None),
        ("http://[::1]/a.png", "private_host", None),
        ("http://[fd12::1]/a.png", "private_host", None),
        ("http://[fe80::1]/a.png", "private_host", None),
        ("http://[::ffff:169.254.169.254]/", "private_host", None),
        ("http://2130706433/", "private_host", None),  # 127.0.0.1 as one number
        ("http://0x7f.1/", "private_host", None),
        ("http://0.0.0.0/", "private_host", None),
        ("http://localhost:8080/a.png", "private_host", None),
        ("http://printer.local/a.png", "private_host", None),
        ("http://metadata.google.internal/computeMetadata/v1/", "private_host", None),
        ("http://intranet/a.png", "private_host", None),
        ("http://8.8.8.8/a.png", "literal_ip", None),
        ("http://[2001:4860:4860::8888]/a.png", "literal_ip", None),
        ("ftp://example.com/a.png", "bad_url", "bad_url"),
        ("data:image/png;base64,iVBOR", "bad_url", "bad_url"),
        ("http:///a.png", "bad_url", "bad_url"),
        ("http://example.com:99999/a.png", "bad_url", "bad_url"),
        ("http://[::1/a.png", "bad_url", "bad_url"),
        ("http://exa mple.com/a.png", "bad_url", "bad_url"),
        ("http://999.1.1.1/a.png", "bad_url", "bad_url"),
    ],
)
def test_host_problem(url, default, allowed):
    assert host_problem(url) == default
    assert host_problem(url, allow_private=True) == allowed
    # The column version judges each scheme://host once and must agree with the function.
    assert host_problems(pa.array([url, url]), False).to_pylist() == [default, default]


# ---------------------------------------------------------------------------------------------
# queries


def test_matching_on_word_boundaries():
    m = QueryMatcher(["red", "red star", "star", "number 7", "Crème Brûlée", "c++"])
    assert m.match("a red star") == ["red", "red star", "star"]
    assert m.match("bored") == [] and m.match("redo it") == [] and m.match("starred") == []
    assert m.match("RED-star!") == ["red", "star"]  # "-" is a boundary, but "red star" needs the space
    assert m.match("Number 7 in red") == ["number 7", "red"]
    assert m.match("number 77") == []
    assert m.match("une CRÈME BRÛLÉE maison") == ["crème brûlée"]
    assert m.match("crème brûléex") == []
    assert m.match("c++ code") == ["c++"]
    assert m.match("红色 red 星") == ["red"]
    assert m.match("") == [] and m.match(None) == []
    assert QueryMatcher([]).match("red") == []


def test_default_query_list_is_shipped_and_covers_the_synthetic_captions():
    queries, _ = read_queries(default_queries_url())
    assert queries == list(dict.fromkeys(q.lower() for q in default_query_lines()))
    assert 200 <= len(queries) <= 2000
    m = QueryMatcher(queries)
    rng = random.Random(0)
    for _ in range(500):
        concept = world.sample_concept(rng)
        found = m.match(world.caption(concept, rng))
        assert concept.colour in found
        names = {concept.shape} if concept.kind == "shape" else {concept.digit, world.DIGIT_WORDS[concept.digit]}
        assert any(names & set(q.split()) for q in found), found


# ---------------------------------------------------------------------------------------------
# config


def test_config_is_built_from_the_files(tmp_path):
    with pytest.raises(ValueError, match="CurateConfig.build"):
        CurateConfig()
    qfile = write_lines(tmp_path / "q.txt", ["red", "blue"])
    config = CurateConfig.build(queries=qfile, langs="en,DE-at", per_query_cap=5)
    assert config.langs == ("en", "de") and len(config.queries_sha256) == 64
    with pytest.raises(ValueError, match="per-query-cap"):
        CurateConfig.build(queries=qfile, per_query_cap=0)
    with pytest.raises(ValueError, match="no queries"):
        CurateConfig.build(queries=write_lines(tmp_path / "empty.txt", ["# nothing"]))
    default = CurateConfig.build()
    assert default.queries == default_queries_url() and default.blocklist is None
    # A list edited after the config was built is refused rather than silently used.
    write_lines(tmp_path / "q.txt", ["green"])
    assert CurateConfig.build(queries=qfile).queries_sha256 != config.queries_sha256
    with pytest.raises(ValueError, match="changed since the config was built"):
        config.matcher()


# ---------------------------------------------------------------------------------------------
# stages on the synthetic web


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    return generate_web(tmp_path_factory.mktemp("web"), pages=60, seed=3)


def test_synthetic_web_mess_ends_with_the_right_reason(web, tmp_path):
    truth = web.truth().to_pylist()
    rows = [{"url": t["img_url"], "text": t["alt"], "page_url": t["page_url"], "lang": t["lang"]} for t in truth]
    # The same image placed on other pages: once with another alt text, once with the same one.
    clean = [t for t in truth if t["mess"] == "clean"]
    dup_urls = {clean[0]["img_url"], clean[1]["img_url"]}
    rows.append(
        {
            "url": clean[0]["img_url"],
            "text": "another red star on a plain background",
            "page_url": "http://127.0.0.1:8000/other.html",
            "lang": "en",
        }
    )
    rows.append(
        {
            "url": clean[1]["img_url"],
            "text": clean[1]["alt"],
            "page_url": "http://127.0.0.1:8000/other.html",
            "lang": "en",
        }
    )
    cands = make_candidates(tmp_path / "cands", rows, parts=3)
    config = CurateConfig.build(allow_private_hosts=True, per_query_cap=10**6)
    run_curate(config, cands, tmp_path / "out")
    out = open_manifest(str(tmp_path / "out"), expect_kind="curated").table().to_pylist()
    assert len(out) == len(rows)
    by_mess: dict[str, list[dict]] = {}
    for t, r in zip(truth, out[: len(truth)], strict=True):
        by_mess.setdefault(t["mess"], []).append(r)
    assert {r["reason"] for r in by_mess["non_english"]} == {"lang_not_allowed"}
    assert {r["reason"] for r in by_mess["empty_alt"]} == {"empty_text"}
    assert {r["reason"] for r in by_mess["tracking_pixel"]} == {"empty_text"}
    assert {r["reason"] for r in by_mess["data_uri"]} == {"bad_url"}
    # Everything else carries a clean English caption of the world: kept (curate cannot see the
    # image problems; download and filter catch those), with the queries it names.
    text_mess = {"non_english", "empty_alt", "tracking_pixel", "data_uri"}
    for kind, got in by_mess.items():
        if kind in text_mess:
            continue
        for r in got:
            if r["url"] in dup_urls:
                continue
            assert r["keep"] and r["reason"] is None and r["queries"], (kind, r)
    # Each image URL keeps one pair: the smallest uid among its eligible rows.
    for url in dup_urls:
        same = [r for r in out if r["url"] == url]
        assert len(same) == 2
        winner = min(same, key=lambda r: r["uid"])
        assert [r["reason"] for r in same if r is not winner] == ["duplicate_url"] and winner["keep"]
    record = read_run_record(str(tmp_path / "out"))
    assert record.counts["duplicate_url"] == 2 and record.counts["lang_not_allowed"] == len(by_mess["non_english"])

    # Without --allow-private-hosts the whole 127.0.0.1 web is refused.
    strict = CurateConfig.build(per_query_cap=10**6)
    run_curate(strict, cands, tmp_path / "strict")
    reasons = {r["reason"] for r in curated_rows(tmp_path / "strict").values()}
    assert reasons == {"private_host", "bad_url"}


def test_constructed_cases_end_with_the_right_reason(tmp_path):
    good = "a red star on a plain background"
    cases = [
        ("https://img.example.com/1.jpg", good, None),
        ("https://img.example.com/2.jpg", "IMG_1234.jpg", "boilerplate"),
        ("https://img.example.com/3.jpg", "DSC0001", "boilerplate"),
        ("https://img.example.com/4.jpg", "Screenshot 2023-04-01 at 10.11.12", "boilerplate"),
        ("https://img.example.com/5.jpg", "untitled", "boilerplate"),
        ("https://img.example.com/6.jpg", "Click here", "boilerplate"),
        ("https://img.example.com/7.jpg", "9f86d081884c7d65", "boilerplate"),
        ("https://img.example.com/8.jpg", "a red star, darn it", "blocklisted"),
        ("https://img.example.com/9.jpg", "a red star " + "very " * 300, "too_long"),
        ("https://img.example.com/10.jpg", "red", "too_short"),
        ("https://img.example.com/11.jpg", "redstars", "too_few_words"),
        ("https://img.example.com/12.jpg", "a bored cat on a sofa", "no_query_match"),
        ("https://img.example.com/13.jpg", "  ", "empty_text"),
        ("http://127.0.0.1:8000/14.jpg", good, "private_host"),
        ("http://169.254.169.254/latest/meta-data/iam", good, "private_host"),
        ("http://metadata.google.internal/x.png", good, "private_host"),
        ("http://93.184.216.34/15.jpg", good, "literal_ip"),
        ("data:image/png;base64,iVBOR", good, "bad_url"),
        # A bad URL is named for its URL even when its text is bad too (URLs are checked first).
        ("http://localhost/16.jpg", "IMG_1234.jpg", "private_host"),
    ]
    cands = make_candidates(tmp_path / "cands", [{"url": u, "text": t} for u, t, _ in cases])
    block = write_lines(tmp_path / "block.txt", ["darn"])
    config = CurateConfig.build(blocklist=block, per_query_cap=100)
    run_curate(config, cands, tmp_path / "out")
    got = list(curated_rows(tmp_path / "out").values())
    assert [(r["url"], r["reason"]) for r in got] == [(u, want) for u, _, want in cases]
    assert [r["keep"] for r in got] == [want is None for _, _, want in cases]
    assert got[0]["queries"] == ["red", "red star", "star"]

    loose = CurateConfig.build(blocklist=block, per_query_cap=100, allow_private_hosts=True, keep_unmatched=True)
    run_curate(loose, cands, tmp_path / "loose")
    reasons = {r["url"]: r["reason"] for r in curated_rows(tmp_path / "loose").values()}
    assert reasons["http://127.0.0.1:8000/14.jpg"] is None
    assert reasons["http://169.254.169.254/latest/meta-data/iam"] is None
    assert reasons["http://93.184.216.34/15.jpg"] is None
    assert reasons["https://img.example.com/12.jpg"] is None  # kept unmatched
    assert reasons["data:image/png;base64,iVBOR"] == "bad_url"


# ---------------------------------------------------------------------------------------------
# balancing


def balancing_rows(n_rare: int, n_common: int) -> list[dict]:
    rows = [{"url": f"https://img.example.com/r{i}.jpg", "text": f"a rare bird number {i}"} for i in range(n_rare)]
    rows += [{"url": f"https://img.example.com/c{i}.jpg", "text": f"a common bird number {i}"} for i in range(n_common)]
    return rows


def test_balancing_caps_common_queries_and_keeps_rare_ones(tmp_path):
    n_rare, n_common, cap = 60, 3000, 300
    cands = make_candidates(tmp_path / "cands", balancing_rows(n_rare, n_common), parts=3)
    qfile = write_lines(tmp_path / "q.txt", ["rare", "common"])
    config = CurateConfig.build(queries=qfile, per_query_cap=cap, seed=7)
    run_curate(config, cands, tmp_path / "a")
    rows = list(curated_rows(tmp_path / "a").values())
    kept_rare = sum(r["keep"] for r in rows if r["queries"] == ["rare"])
    kept_common = sum(r["keep"] for r in rows if r["queries"] == ["common"])
    assert kept_rare == n_rare
    p = cap / n_common
    sd = math.sqrt(n_common * p * (1 - p))
    assert abs(kept_common - cap) <= 4 * sd, (kept_common, cap, sd)
    assert {r["reason"] for r in rows if not r["keep"]} == {"over_cap"}

    record = read_run_record(str(tmp_path / "a"))
    assert record.tallies["queries_before"] == {"common": n_common, "rare": n_rare}
    assert record.tallies["queries_after"] == {"common": kept_common, "rare": n_rare}
    assert record.counts == {"kept": n_rare + kept_common, "over_cap": n_common - kept_common}
    assert record.config["queries_sha256"] == config.queries_sha256 and record.config["per_query_cap"] == cap
    # COUNT's main table: per bucket of URL hashes, each query it has winners for and how many
    count_rows = open_manifest(str(tmp_path / "a" / "_count")).table().to_pylist()
    summed = Counter()
    for r in count_rows:
        summed[r["query"]] += r["count"]
    assert summed == {"common": n_common, "rare": n_rare}
    summary = curate_summary(record)
    assert (
        "before balancing" in summary and f"{n_common:,}  common" in summary and f"{kept_common:,}  common" in summary
    )

    # The same seed gives the same bytes; another seed another selection of about the same size.
    run_curate(config, cands, tmp_path / "b")
    parts_a = sorted((tmp_path / "a").glob("part-*.parquet"))
    assert parts_a and [p.read_bytes() for p in parts_a] == [
        p.read_bytes() for p in sorted((tmp_path / "b").glob("part-*.parquet"))
    ]
    other = CurateConfig.build(queries=qfile, per_query_cap=cap, seed=8)
    run_curate(other, cands, tmp_path / "c")
    kept_a = {u for u, r in curated_rows(tmp_path / "a").items() if r["keep"]}
    kept_c = {u for u, r in curated_rows(tmp_path / "c").items() if r["keep"]}
    assert kept_a != kept_c
    assert abs(len(kept_c) - n_rare - cap) <= 4 * sd


def test_a_row_is_kept_if_any_of_its_queries_keeps_it(tmp_path):
    # Every row matches the capped "common"; half also match the uncapped "rare": those all stay.
    rows = [
        {
            "url": f"https://img.example.com/{i}.jpg",
            "text": f"a common {'rare ' if i % 2 else ''}bird number {i}",
        }
        for i in range(400)
    ]
    cands = make_candidates(tmp_path / "cands", rows)
    qfile = write_lines(tmp_path / "q.txt", ["rare", "common"])
    config = CurateConfig.build(queries=qfile, per_query_cap=250)
    run_curate(config, cands, tmp_path / "out")
    got = list(curated_rows(tmp_path / "out").values())
    assert all(r["keep"] for r in got if "rare" in r["queries"])
    for r in got:
        if r["queries"] == ["common"]:
            assert r["keep"] == (selection_draw(config.seed, r["uid"], "common") < 250 / 400)


def test_selection_draw_is_uniform_and_stable():
    draws = [selection_draw(0, f"{i:032x}", "q") for i in range(20000)]
    assert 0 <= min(draws) and max(draws) < 1
    assert abs(sum(draws) / len(draws) - 0.5) < 0.01
    assert selection_draw(0, "abc", "q") == selection_draw(0, "abc", "q") != selection_draw(1, "abc", "q")


# ---------------------------------------------------------------------------------------------
# independence of workers and slices


@pytest.mark.slow
def test_workers_and_slices_give_the_same_manifest(tmp_path):
    rng = random.Random(5)
    rows = []
    for i in range(300):
        concept = world.sample_concept(rng)
        url = f"https://img{i % 250 % 7}.example.com/{i % 250}.jpg"  # URL duplicates across part files
        rows.append({"url": url, "text": world.caption(concept, rng)})
    rows += [
        {"url": "http://10.0.0.1/x.jpg", "text": "a red star"},
        {"url": "https://e.com/y.jpg", "text": "image"},
    ]
    cands = make_candidates(tmp_path / "cands", rows, parts=5)
    # Colours only: each is matched by ~35 rows, over the cap, so balancing has work to do.
    qfile = write_lines(tmp_path / "q.txt", list(world.COLOURS))
    config = CurateConfig.build(queries=qfile, per_query_cap=20, seed=1)
    one = run_curate(config, cands, tmp_path / "one")
    two = run_curate(config, cands, tmp_path / "two", workers=2)
    sliced = run_curate(config, cands, tmp_path / "sliced", slices=2)
    assert one.digest == two.digest == sliced.digest
    for sub in ("_match", "_count"):
        digests = {read_run_record(str(tmp_path / d / sub)).output.digest for d in ("one", "two", "sliced")}
        assert len(digests) == 1
    record = read_run_record(str(tmp_path / "one"))
    assert record.counts["duplicate_url"] > 0 and record.counts["over_cap"] > 0
    assert json.loads((tmp_path / "one" / "_run.json").read_text())["stage"] == "curate"


def test_phases_check_their_inputs(tmp_path):
    cands = make_candidates(tmp_path / "cands", [{"url": "https://e.com/1.jpg", "text": "a red star"}])
    config = CurateConfig.build()
    from wit.manifests.stage import StageError

    with pytest.raises(StageError, match="exactly one input"):
        COUNT.partitions(config, [])
    with pytest.raises(StageError, match="expected curate_count"):
        BALANCE.partitions(config, [cands])
    assert len(MATCH.partitions(config, [cands])) == 1


def test_buckets_option_is_checked(tmp_path):
    rows = [{"url": f"https://e.com/{i}.jpg", "text": "a red star"} for i in range(9)]
    cands = make_candidates(tmp_path / "cands", rows)
    assert candidate_rows([cands]) == 9
    assert {p.params for p in MATCH.partitions(CurateConfig.build(), [cands])} == {(1,)}  # 9 rows: one bucket
    assert {p.params for p in MATCH.partitions(CurateConfig.build(buckets=5), [cands])} == {(5,)}
    for bad in (0, -1, buckets.MAX_BUCKETS + 1):
        with pytest.raises(ValueError, match="--buckets"):
            CurateConfig.build(buckets=bad)
    assert CurateConfig.from_options({"buckets": 3}).buckets == 3


# ---------------------------------------------------------------------------------------------
# the bucketed COUNT against the whole-dataset reference

PLANTED_PARTS, PLANTED_ROWS, PLANTED_EMPTY = 8, 40, (3, 6)  # parts, rows a part, parts with no eligible row


def ineligible_row(part: int, i: int) -> dict:
    """Boilerplate text, a private host, or a text that matches no query."""
    return [
        {"url": f"https://e.com/b{part}-{i}.jpg", "text": "IMG_1234.jpg"},
        {"url": f"http://10.0.0.{i}/x.jpg", "text": "a red star on a plain background"},
        {"url": f"https://e.com/n{part}-{i}.jpg", "text": "a bored cat on a sofa"},
    ][i % 3]


def planted_candidates(root: Path) -> ManifestRef:
    """Parts of captions whose URLs repeat across parts, identical rows (one uid, so the tie goes to
    part and row), colour queries far over a small cap, and parts where no row is eligible."""
    rng = random.Random(15)
    chunks: list[list[dict]] = []
    for p in range(PLANTED_PARTS):
        if p in PLANTED_EMPTY:
            chunks.append([ineligible_row(p, i) for i in range(PLANTED_ROWS)])
            continue
        chunk = []
        for _ in range(PLANTED_ROWS):
            url = f"https://img{rng.randrange(3)}.example.com/{rng.randrange(120)}.jpg"
            chunk.append({"url": url, "text": world.caption(world.sample_concept(rng), rng)})
        chunks.append(chunk)
    chunks[1][7] = dict(chunks[1][2])  # identical rows in one part
    for i in range(5):  # and across parts: the same uid in parts 0, 4 and 7
        chunks[4][10 + i] = dict(chunks[0][i])
        chunks[7][30 + i] = dict(chunks[0][i])
    return make_candidates(root, [r for c in chunks for r in c], parts=PLANTED_PARTS)


def reference_curate(config: CurateConfig, match: Path, out: Path) -> tuple[dict[str, str], Counter, dict]:
    """What curate decided before COUNT was bucketed: :func:`count_queries` over every eligible row
    of every MATCH part at once, then BALANCE's rule per part. Returns the curated part files'
    sha256 by name, the counts by reason and the per-query tallies."""
    parts = [(i, read_part(str(f))) for i, f in enumerate(sorted(match.glob("part-*.parquet")))]
    counts, duplicates = count_queries(parts)
    by_query = dict(zip(counts.column("query").to_pylist(), counts.column("count").to_pylist(), strict=True))
    losers: dict[int, set[int]] = {}
    for d in duplicates.to_pylist():
        losers.setdefault(d["part"], set()).add(d["row"])
    files, reasons, before, after = {}, Counter(), Counter(), Counter()
    for i, table in parts:
        rows, c, b, a = balance_table(table, losers.get(i, set()), by_query, config.per_query_cap, config.seed)
        info = write_part(str(out), i, rows, schema_for("curated"))
        files[info.name] = info.sha256
        reasons.update(c)
        before.update(b)
        after.update(a)
    assert dict(before) == by_query  # the tally before balancing is COUNT's table
    tallies = {"queries_after": dict(sorted(after.items())), "queries_before": dict(sorted(before.items()))}
    return files, reasons, tallies


@pytest.mark.slow
def test_bucketed_count_gives_the_reference_bytes_for_any_bucket_count(tmp_path):
    cands = planted_candidates(tmp_path / "cands")
    qfile = write_lines(tmp_path / "q.txt", list(world.COLOURS) + ["star", "circle"])
    # (buckets, workers, MATCH slices); worker processes are slow to start, so one run has them
    runs = [(1, 1, 1), (2, 1, 1), (7, 1, 1), (2, 1, 3), (7, 2, 1)]
    got = {}
    for b, workers, slices in runs:
        config = CurateConfig.build(queries=qfile, per_query_cap=8, seed=3, buckets=b)
        out = tmp_path / f"b{b}-w{workers}-s{slices}"
        ref = run_curate(config, cands, out, workers=workers, slices=slices)
        record = read_run_record(str(out))
        assert read_run_record(str(out / "_count")).partitions == b
        files = {n: f.sha256 for n, f in record.files.items()}
        got[(b, workers, slices)] = (ref.digest, files, record.counts, record.tallies)

    want_files, want_counts, want_tallies = reference_curate(config, out / "_match", tmp_path / "reference")
    want = (digest_of(want_files), want_files, dict(want_counts), want_tallies)
    for key, have in got.items():
        assert have == want, key
    # the planted cases are all there: URL duplicates (identical rows among them), over-cap queries
    assert want_counts["duplicate_url"] >= 10 and want_counts["over_cap"] > 0 and want_counts["kept"] > 0
    assert sum(1 for n in want_tallies["queries_before"].values() if n > 8) >= 3
    assert len(want_files) == PLANTED_PARTS  # a part without eligible rows has its curated part too
    # The rule itself, in plain Python: among the eligible rows of one URL the smallest uid wins,
    # and among identical rows the first (the curated table is in (part, row) order).
    rows = open_manifest(str(out), expect_kind="curated").table(["uid", "url", "reason"]).to_pylist()
    by_url: dict[str, list[tuple[str, int]]] = {}
    for pos, r in enumerate(rows):
        if r["reason"] in (None, "over_cap", "duplicate_url"):
            by_url.setdefault(r["url"], []).append((r["uid"], pos))
    for group in by_url.values():
        winner = min(group)
        assert [rows[pos]["reason"] == "duplicate_url" for _, pos in group] == [g != winner for g in group]
    assert max(Counter(r["uid"] for r in rows).values()) == 3  # the planted identical rows


def test_a_count_task_reads_only_its_bucket(tmp_path, monkeypatch):
    cands = planted_candidates(tmp_path / "cands")
    qfile = write_lines(tmp_path / "q.txt", list(world.COLOURS))
    config = CurateConfig.build(queries=qfile, per_query_cap=8, buckets=7)
    outcome = run_stage(MATCH, config, [cands], str(tmp_path / "_match"), progress=False)
    match_rows = open_manifest(str(tmp_path / "_match")).table(["reason", "url_hash"])
    eligible = match_rows.filter(match_rows.column("reason").is_null())

    reads: list[tuple[str, int]] = []
    seen: list = []
    real_read = buckets.read

    def spy(url: str, bucket: int):
        table = real_read(url, bucket)
        reads.append((url, bucket))
        seen.append(table)
        return table

    monkeypatch.setattr(buckets, "read", spy)
    partitions = COUNT.partitions(config, [outcome.ref])
    assert [p.index for p in partitions] == list(range(7))
    hashes_seen = []
    for p in partitions:
        reads.clear()
        seen.clear()
        result = COUNT.run_partition(config, p, str(tmp_path / "_count"))
        # one read of batch b per MATCH part, and every row it got is of bucket b
        assert sorted(reads) == [(u, p.index) for u in buckets.file_urls(str(tmp_path / "_match"), "keys", 8)]
        held = pa.concat_tables(seen).column("url_hash").to_numpy()
        assert (buckets.of_keys(held, 7) == p.index).all()
        assert sum(result.counts.values()) == len(held)
        hashes_seen.append(held)
    # the buckets cover every eligible row exactly once
    assert sorted(h for part in hashes_seen for h in part.tolist()) == sorted(eligible.column("url_hash").to_pylist())
