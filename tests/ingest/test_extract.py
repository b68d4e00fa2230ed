"""`wit extract` against the synthetic web's ground truth, every source format, and bad inputs."""

from __future__ import annotations

import codecs
import gzip
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from wit.ingest.extract import (
    EXTRACT,
    ExtractConfig,
    ExtractStage,
    extract_source,
    source_refs,
)
from wit.ingest.sources import expand_sources, source_format
from wit.ingest.synthetic import BASE_PLACEHOLDER, MessConfig, generate_web
from wit.ingest.urls import BadURL, absolutize, normalize_url, uid_of
from wit.ingest.wat import warc_to_wat
from wit.ingest.webpage import decode_html, parse_dimension, parse_page
from wit.manifests import storage
from wit.manifests.manifest import ManifestRef, read_table
from wit.manifests.runrecord import read_run_record
from wit.manifests.stage import StageError
from wit.pipeline.executor import PartSpec, run_stage

# What the generator plants that extract must skip, and the reason it must give.
SKIPPED = {"data_uri": "data_uri", "tracking_pixel": "tracking_pixel", "empty_alt": "empty_alt"}
FOREIGN = ("de", "fr", "es")


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    # 60 pages in 3 WARC files (three partitions for the worker and slice tests), with enough
    # foreign alt texts to measure language identification on.
    mess = MessConfig(non_english=0.15)
    return generate_web(tmp_path_factory.mktemp("web"), pages=60, seed=11, pages_per_warc=20, mess=mess)


@pytest.fixture(scope="module")
def warc_run(web, tmp_path_factory):
    out = tmp_path_factory.mktemp("cand") / "warc"
    return extract(web.warc_paths, out)


def extract(sources, out, config: ExtractConfig = ExtractConfig(), **kw):
    """Run the stage; returns (outcome, table, run record)."""
    outcome = run_stage(EXTRACT, config, source_refs([str(s) for s in sources]), str(out), progress=False, **kw)
    assert outcome.done
    return outcome, read_table(str(out), expect_kind="candidates"), read_run_record(str(out))


def keyed(table: pa.Table) -> dict[tuple[str, str], dict]:
    rows = table.to_pylist()
    keys = [(r["page_url"], r["url"]) for r in rows]
    assert len(set(keys)) == len(keys), "one row per (page, image) in the synthetic web"
    return dict(zip(keys, rows, strict=True))


def pairs(table: pa.Table) -> set[tuple[str, str, str]]:
    return set(zip(*(table.column(c).to_pylist() for c in ("page_url", "url", "text")), strict=True))


# --- the synthetic web ---------------------------------------------------------------------------


def test_warc_finds_every_image_of_the_ground_truth(web, warc_run):
    _, table, record = warc_run
    truth = web.truth().to_pylist()
    rows = keyed(table)
    wanted = [t for t in truth if t["mess"] not in SKIPPED]
    assert len(rows) == len(wanted)
    for t in wanted:
        row = rows[(t["page_url"], normalize_url(t["img_url"]))]
        assert row["text"] == t["alt"]
        assert row["title"] == t["title"]
        assert row["caption"] == t["figcaption"]
        assert (row["width_attr"], row["height_attr"]) == (t["declared_width"], t["declared_height"])
        assert row["uid"] == uid_of(t["img_url"], t["alt"])
        assert row["source"].endswith(".warc.gz") and row["offset"] > 0
    # the hard cases are really in there
    assert any(t["relative"] for t in wanted) and any(t["base_href"] for t in wanted)
    assert any(t["figcaption"] for t in wanted) and any(t["declared_width"] for t in wanted)
    skipped = Counter(SKIPPED[t["mess"]] for t in truth if t["mess"] in SKIPPED)
    assert all(skipped.values())
    assert {k: record.counts.get(k) for k in skipped} == dict(skipped)
    assert record.counts["kept"] == len(wanted) == record.rows
    assert record.counts["pages"] == web.pages and record.counts["images_seen"] == len(truth)
    sources = record.extra["sources"]
    assert [s["sha256"] for s in sources] == [storage.sha256_url(str(p)) for p in web.warc_paths]


def test_record_offsets_point_at_the_page(web, warc_run):
    from warcio.archiveiterator import ArchiveIterator

    _, table, _ = warc_run
    row = table.slice(table.num_rows // 2, 1).to_pylist()[0]
    with open(row["source"], "rb") as fh:
        fh.seek(row["offset"])
        record = next(iter(ArchiveIterator(fh)))
        assert record.rec_type == "response"
        assert record.rec_headers.get_header("WARC-Target-URI") == row["page_url"]


def test_language_of_foreign_alt_texts(web, warc_run, tmp_path):
    truth = {(t["page_url"], t["img_url"]): t["lang"] for t in web.truth().to_pylist()}

    def share_right(table):
        got = [(truth[(r["page_url"], r["url"])], r["lang"]) for r in table.to_pylist()]
        foreign = [(want, have) for want, have in got if want in FOREIGN]
        assert len(foreign) >= 5
        return sum(want == have for want, have in foreign) / len(foreign), got

    share, _ = share_right(warc_run[1])
    assert share > 0.5  # the full model on short alt texts: most, not all
    _, narrowed, _ = extract(web.warc_paths, tmp_path / "narrow", ExtractConfig(languages=("en", *FOREIGN)))
    share, got = share_right(narrowed)
    assert share >= 0.9
    assert sum(want == have for want, have in got) / len(got) >= 0.9
    _, off, _ = extract(web.warc_paths, tmp_path / "off", ExtractConfig(detect_lang=False))
    assert off.column("lang").null_count == off.num_rows
    assert pairs(off) == pairs(warc_run[1])


def _html_copy(web, folder: Path) -> None:
    """The site's pages as saved files: real host in place of the placeholder, and a canonical link."""
    for page in web.site_dir.glob("*/p*.html"):
        url = f"{web.base_url}/{page.parent.name}/{page.name}"
        text = page.read_text("utf-8").replace(BASE_PLACEHOLDER, web.base_url)
        text = text.replace("<head>", f'<head><link rel="canonical" href="{url}">', 1)
        target = folder / page.parent.name / page.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, "utf-8")


def test_html_files_give_the_same_pairs_as_the_warc(web, warc_run, tmp_path):
    _html_copy(web, tmp_path / "saved")
    _, table, record = extract([tmp_path / "saved"], tmp_path / "out")
    assert pairs(table) == pairs(warc_run[1])
    assert record.counts["pages"] == web.pages and table.column("offset").null_count == table.num_rows


def test_html_file_without_canonical_resolves_against_its_own_url(tmp_path):
    page = tmp_path / "site" / "a.html"
    page.parent.mkdir()
    page.write_text(
        '<img src="pic.jpg" alt="relative"><img src="https://cdn.example/x.png" alt="absolute">'
        '<img src="https://cdn.example/logo.svg" alt="vector"><img src="javascript:void(0)" alt="js">'
    )
    result = extract_source(str(page), ExtractConfig(detect_lang=False))
    rows = result.table.to_pylist()
    # a file:// image cannot be fetched by anyone: only the absolute one is a candidate
    assert [r["url"] for r in rows] == ["https://cdn.example/x.png"]
    assert rows[0]["page_url"] == "file://" + str(page)
    assert result.counts["bad_scheme"] == 2 and result.counts["svg_or_ico"] == 1


def test_wat_gives_the_same_pairs_as_the_warc(web, warc_run, tmp_path):
    for warc in web.warc_paths:
        name = warc.name.replace(".warc.gz", ".warc.wat.gz")
        assert warc_to_wat(str(warc), str(tmp_path / "wat" / name)) > 0
    assert {source_format(str(p)) for p in (tmp_path / "wat").iterdir()} == {"wat"}
    _, table, record = extract([tmp_path / "wat"], tmp_path / "out")
    warc_table, warc_record = warc_run[1], warc_run[2]
    assert pairs(table) == pairs(warc_table)
    assert record.counts["pages"] == web.pages and record.counts["data_uri"] == warc_record.counts["data_uri"]
    # WAT keeps no declared sizes: the tracking pixels (alt="") fall to empty_alt instead
    assert record.counts["empty_alt"] == warc_record.counts["empty_alt"] + warc_record.counts["tracking_pixel"]
    assert table.column("caption").null_count == table.num_rows


def test_workers_and_slices_give_the_same_digest(web, warc_run, tmp_path):
    one = warc_run[0].ref.digest
    two, _, _ = extract(web.warc_paths, tmp_path / "w2", workers=2)
    assert two.ref.digest == one
    refs = source_refs([str(p) for p in web.warc_paths])
    first = run_stage(EXTRACT, ExtractConfig(), refs, str(tmp_path / "parts"), part=PartSpec(0, 2), progress=False)
    assert not first.done and first.ran == 2
    second = run_stage(EXTRACT, ExtractConfig(), refs, str(tmp_path / "parts"), part=PartSpec(1, 2), progress=False)
    assert second.done and second.ref.digest == one


@pytest.mark.parametrize("pages, size", [(1, 1 << 30), (3, 1 << 30), (1000, 1)])
def test_batches_give_the_rows_of_page_by_page(web, monkeypatch, pages, size):
    # extract_source takes pages a batch at a time (decode and parse all, then the images): the rows,
    # their order and the counts are those of one page at a time, whatever bounds a batch.
    from wit.ingest import extract as extract_module

    path = str(web.warc_paths[0])
    monkeypatch.setattr(extract_module, "BATCH_PAGES", 1)
    one = extract_source(path, ExtractConfig())
    monkeypatch.setattr(extract_module, "BATCH_PAGES", pages)
    monkeypatch.setattr(extract_module, "BATCH_BYTES", size)
    batched = extract_source(path, ExtractConfig())
    assert one.table.num_rows > 20
    assert batched.table.to_pylist() == one.table.to_pylist()
    assert batched.counts == one.counts


@pytest.mark.s3
def test_s3_sources_and_output(web, warc_run, s3_bucket):
    for p in web.warc_paths:
        storage.put_file(str(p), f"{s3_bucket}/crawl/{p.name}")
    outcome, table, record = extract([f"{s3_bucket}/crawl/*.warc.gz"], f"{s3_bucket}/cand")
    local = warc_run[1]
    # Same rows but for `source`, which names the file where it was read.
    assert table.drop_columns(["source"]).equals(local.drop_columns(["source"]))
    assert set(table.column("source").to_pylist()) == {f"{s3_bucket}/crawl/{p.name}" for p in web.warc_paths}
    assert record.counts == warc_run[2].counts
    assert [s["sha256"] for s in record.extra["sources"]] == [s["sha256"] for s in warc_run[2].extra["sources"]]
    assert storage.exists(f"{s3_bucket}/cand/_run.json") and outcome.ref.url == f"{s3_bucket}/cand"


# --- bad inputs -----------------------------------------------------------------------------------


def _warc(path: Path, records: list[tuple[str, bytes]]) -> None:
    """A .warc.gz of response records whose HTTP part (status line, headers, body) is given raw,
    so that a broken header stays broken (warcio's writer would parse and fix it)."""
    with open(path, "wb") as fh:
        for k, (url, http) in enumerate(records):
            head = (
                f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: {url}\r\n"
                f"WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-{k:012d}>\r\n"
                "WARC-Date: 2024-01-01T00:00:00Z\r\nContent-Type: application/http; msgtype=response\r\n"
                f"Content-Length: {len(http)}\r\n\r\n"
            )
            fh.write(gzip.compress(head.encode() + http + b"\r\n\r\n", compresslevel=1))


def _page(alt: str, src: str = "/cat.jpg") -> str:
    return f'<html><head><title>t</title></head><body><p>x</p><img src="{src}" alt="{alt}"></body></html>'


def test_bad_inputs_are_counted_and_the_stage_finishes(web, warc_run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    # a .warc.gz cut in the middle
    whole = web.warc_paths[0].read_bytes()
    (bad / "a-truncated.warc.gz").write_bytes(whole[: len(whole) // 2])
    # a broken HTTP header between two good records; a record that is not HTML; garbage as text/html
    _warc(
        bad / "b-headers.warc.gz",
        [
            (
                "http://h.example/1.html",
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + _page("one").encode(),
            ),
            (
                "http://h.example/2.html",
                b"garbage status\r\nContent-Type: text/html\r\n\r\n" + _page("two").encode(),
            ),
            ("http://h.example/3.png", b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n\x89PNG..."),
            (
                "http://h.example/4.html",
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + bytes(range(256)) * 40,
            ),
            (
                "http://h.example/5.html",
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + _page("five").encode(),
            ),
        ],
    )
    # encodings: declared shift_jis (right), none (cp1251 and shift_jis bytes), a bogus charset name
    sjis, ru = "猫の写真", "кошка на диване"
    _warc(
        bad / "c-encodings.warc.gz",
        [
            (
                "http://e.example/sjis.html",
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=Shift_JIS\r\n\r\n"
                + _page(sjis, "/sjis.jpg").encode("shift_jis"),
            ),
            (
                "http://e.example/meta.html",
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n"
                + b'<meta charset="windows-1251">'
                + _page(ru, "/meta.jpg").encode("cp1251"),
            ),
            (
                "http://e.example/ru.html",
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + _page(ru, "/ru.jpg").encode("cp1251"),
            ),
            (
                "http://e.example/bogus.html",
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=x-no-such\r\n\r\n"
                + _page("caf\u00e9", "/bogus.jpg").encode("utf-8"),
            ),
        ],
    )
    # a 50 MB page, as a file and inside a WARC; empty files
    big = _page("big") + "<p>" + "lorem ipsum " * (50 * 2**20 // 12) + "</p>"
    (bad / "d-big.html").write_text(big)
    _warc(
        bad / "e-big.warc.gz",
        [("http://b.example/big.html", b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + big.encode())],
    )
    (bad / "f-empty.warc.gz").write_bytes(b"")
    (bad / "g-empty.html").write_bytes(b"")

    _, table, record = extract([bad], tmp_path / "out", ExtractConfig(detect_lang=False))
    counts = record.counts
    assert counts["truncated_source"] == 1
    assert counts["bad_http_header"] == 1 and counts["not_html"] == 1 and counts["undecodable"] == 1
    assert counts["page_too_large"] == 2
    assert counts["empty_source"] == 2
    assert counts["bad_encoding"] == 2  # cp1251 without a charset; a charset nobody knows
    by_page = {r["page_url"]: r for r in table.to_pylist()}
    # rows read before the cut are kept, in the same order as from the whole file
    cut = [r for r in table.to_pylist() if r["source"].endswith("a-truncated.warc.gz")]
    full = [r for r in warc_run[1].to_pylist() if r["source"] == str(web.warc_paths[0])]
    assert 0 < len(cut) < len(full)
    assert [(r["url"], r["text"]) for r in cut] == [(r["url"], r["text"]) for r in full[: len(cut)]]
    assert {"http://h.example/1.html", "http://h.example/5.html"} <= set(by_page)
    assert "http://h.example/2.html" not in by_page
    assert by_page["http://e.example/sjis.html"]["text"] == sjis
    assert by_page["http://e.example/meta.html"]["text"] == ru
    assert "\ufffd" in by_page["http://e.example/ru.html"]["text"]  # kept, marked by the count
    assert by_page["http://e.example/bogus.html"]["text"] == "caf\u00e9"
    assert "http://b.example/big.html" not in by_page
    sizes = {Path(s["url"]).name: s["bytes"] for s in record.extra["sources"]}
    assert sizes["d-big.html"] == len(big) and sizes["f-empty.warc.gz"] == 0


def test_garbage_and_plain_warcs(tmp_path, web):
    (tmp_path / "junk.warc").write_bytes(b"this is not a warc file at all\n" * 10)
    (tmp_path / "zeros.warc.gz").write_bytes(gzip.compress(b"\0" * 1000))
    plain = tmp_path / "plain.warc"
    plain.write_bytes(gzip.decompress(web.warc_paths[1].read_bytes()))
    data = plain.read_bytes()
    (tmp_path / "plain-cut.warc").write_bytes(data[: data.index(b"<main>", len(data) // 3)])  # inside a page
    results = {
        name: extract_source(str(tmp_path / name), ExtractConfig(detect_lang=False))
        for name in ("junk.warc", "zeros.warc.gz", "plain.warc", "plain-cut.warc")
    }
    assert results["junk.warc"].counts.get("corrupt_source") == 1
    assert results["zeros.warc.gz"].counts.get("corrupt_source") == 1
    assert "truncated_source" not in results["plain.warc"].counts and results["plain.warc"].table.num_rows > 0
    assert results["plain-cut.warc"].counts.get("truncated_source") == 1
    assert 0 < results["plain-cut.warc"].table.num_rows < results["plain.warc"].table.num_rows


# --- pieces ---------------------------------------------------------------------------------------


def test_expand_sources(tmp_path, web):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.warc.gz", "a/b/y.wat.gz", "a/b/z.html", "a/b/notes.txt", "a/b/.tmp.warc.gz", "w.warc"):
        (tmp_path / name).write_bytes(b"")
    found = expand_sources([str(tmp_path / "a"), str(tmp_path / "a" / "x.warc.gz"), str(tmp_path / "*.warc")])
    assert found == sorted(str(tmp_path / n) for n in ("a/x.warc.gz", "a/b/y.wat.gz", "a/b/z.html", "w.warc"))
    assert expand_sources([str(tmp_path / "a/**/*.html")]) == [str(tmp_path / "a/b/z.html")]
    for bad, message in [
        (tmp_path / "nope.warc.gz", "does not exist"),
        (tmp_path / "a/b/notes.txt", "not a WARC"),
        (tmp_path / "*.wat", "matches no"),
    ]:
        with pytest.raises(ValueError, match=message):
            expand_sources([str(bad)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        expand_sources([str(tmp_path / "empty")])
    refs = source_refs([str(tmp_path / "w.warc")])
    assert refs == [ManifestRef(url=str(tmp_path / "w.warc"), kind="source")]
    with pytest.raises(StageError, match="source files"):
        ExtractStage().partitions(ExtractConfig(), [ManifestRef(url=str(tmp_path), kind="candidates")])


def test_config_is_validated():
    for bad in (
        {"max_page_bytes": 10},
        {"max_page_bytes": "5M"},
        {"detect_lang": "yes"},
        {"languages": "en"},
        {"languages": ("en", "zz")},
    ):
        with pytest.raises(ValueError):
            ExtractConfig(**bad)
    assert ExtractConfig(languages=["fr", "en", "fr"]).languages == ("en", "fr")


def test_normalize_url():
    assert normalize_url("HTTP://Ex.COM:80/a b/%7e/%zz?q=1 2#frag") == "http://ex.com/a%20b/%7E/%25zz?q=1%202"
    assert normalize_url("https://EX.com:443") == "https://ex.com/"
    assert normalize_url("https://ex.com:8443/x") == "https://ex.com:8443/x"
    assert normalize_url("http://bücher.de/ä") == "http://xn--bcher-kva.de/%C3%A4"
    for url in ("HTTP://Ex.COM:80/a b/%7e/%zz?q=1 2#frag", "http://[::1]:8080/x", "http://u:p@H.example/"):
        assert normalize_url(normalize_url(url)) == normalize_url(url)
    for bad in ("http://ex.com:port/", "http:///x", "http://[::1/x"):
        with pytest.raises(BadURL):
            normalize_url(bad)
    assert uid_of("HTTP://EX.com/a#x", "t") == uid_of("http://ex.com/a", "t")
    assert uid_of("http://ex.com/a", "t") != uid_of("http://ex.com/a", "u")
    assert len(uid_of("http://ex.com/a", "t")) == 32


def test_absolutize():
    page = "http://h.example/blog/p1.html"
    assert absolutize("img/a.png", page) == "http://h.example/blog/img/a.png"
    assert absolutize("../a.png", page) == "http://h.example/a.png"
    assert absolutize("a.png", page, "/media/") == "http://h.example/media/a.png"
    assert absolutize("a.png", page, "media/") == "http://h.example/blog/media/a.png"
    assert absolutize("a.png", page, "https://cdn.example/m/") == "https://cdn.example/m/a.png"
    assert absolutize("//cdn.example/a.png", page) == "http://cdn.example/a.png"
    assert absolutize(" /a.png\n", page) == "http://h.example/a.png"


def test_parse_page_attributes():
    page = parse_page(
        '<base href="/m/"><link rel="Canonical foo" href=" http://c.example/p ">'
        '<figure><div><img src=" a.png " alt=" A &amp; B " width="64px" height="50%" title=" t\n t "></div>'
        "<figcaption> Fig <b>1</b>:\n cap </figcaption></figure>"
        '<img src="data:image/gif;base64,R0l" data-src="lazy.jpg" alt="lazy">'
        '<img srcset="s1.jpg 1x, s2.jpg 2x" alt="set"><img alt="none"><img src="d.png" width=0>'
    )
    assert page.base_href == "/m/" and page.canonical == "http://c.example/p"
    first, lazy, srcset, none, zero = page.images
    assert (first.src, first.alt, first.title, first.caption) == ("a.png", "A & B", "t t", "Fig 1: cap")
    assert (first.width, first.height) == (64, None)
    assert lazy.src == "lazy.jpg" and lazy.caption is None
    assert srcset.src == "s1.jpg" and none.src is None and none.alt == "none"
    assert zero.width == 0 and zero.alt is None
    assert [parse_dimension(v) for v in ("12", " 7.5 ", "+3", "x", "", "99999999999", None)] == [
        12,
        7,
        3,
        None,
        None,
        None,
        None,
    ]


def test_image_skip_reasons(tmp_path):
    page = tmp_path / "p.html"
    page.write_text(
        '<link rel="canonical" href="https://site.example/dir/p.html">'
        '<img alt="no source"><img src="data:image/png;base64,AAAA" alt="d"><img src="mailto:x@y" alt="m">'
        '<img src="http://bad:port/x.png" alt="b"><img src="/favicon.ICO" alt="i">'
        '<img src="/x.svg?v=1" alt="s">'
        '<img src="/px.gif" width="1" height="1" alt="p"><img src="/line.gif" width="600" height="1" alt="l">'
        '<img src="/a.jpg" alt=" "><img src="/a.jpg"><img src="/ok.jpg#top" alt="ok" width="wide">'
    )
    result = extract_source(str(page), ExtractConfig(detect_lang=False))
    assert result.counts == {
        "pages": 1,
        "images_seen": 11,
        "kept": 1,
        "no_src": 1,
        "data_uri": 1,
        "bad_scheme": 1,
        "bad_url": 1,
        "svg_or_ico": 2,
        "tracking_pixel": 2,
        "empty_alt": 2,
    }
    (row,) = result.table.to_pylist()
    assert row["url"] == "https://site.example/ok.jpg" and row["page_url"] == "https://site.example/dir/p.html"
    assert row["width_attr"] is None


def test_decode_html():
    assert decode_html("é".encode("cp1252"), "ISO-8859-1").text == "é"
    assert decode_html(b"\xef\xbb\xbf<p>\xc3\xa9", "cp1252").text == "<p>é"  # a BOM wins
    assert decode_html("<meta charset=utf-16><p>é".encode(), None).text.endswith("é")
    assert decode_html(b"<p>ok", "no-such").problem == "bad_encoding"
    assert decode_html(b"\x00\x01\x02" * 100, None).problem == "undecodable"
    wide = decode_html(codecs.BOM_UTF16_LE + "<p>é".encode("utf-16-le"), "utf-8")
    assert (wide.text, wide.problem) == ("<p>é", None)
    assert decode_html("<p>кошка".encode("cp1251"), None).problem == "bad_encoding"
