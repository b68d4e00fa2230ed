"""`wit extract` on every kind of WARC record, encoded bodies, and the URL a page was fetched from.

Small WARC files are written record by record (raw bytes, so a record stays exactly as a crawler
wrote it); saved pages and their (file, url) lists are generated in tmp_path.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import zlib
from collections import Counter
from pathlib import Path

import brotlicffi as brotli
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from wit.ingest.extract import EXTRACT, ExtractConfig, extract_source, read_page_urls, source_refs
from wit.ingest.sources import decode_body
from wit.ingest.wat import warc_to_wat
from wit.manifests.manifest import read_table
from wit.manifests.runrecord import read_run_record
from wit.manifests.stage import StageError
from wit.pipeline.cli import cli
from wit.pipeline.executor import run_stage

NO_LANG = ExtractConfig(detect_lang=False)


def _record(kind: str, uri: str | None, block: bytes, content_type: str, k: int) -> bytes:
    head = f"WARC/1.0\r\nWARC-Type: {kind}\r\n"
    if uri is not None:
        head += f"WARC-Target-URI: {uri}\r\n"
    head += (
        f"WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-{k:012d}>\r\nWARC-Date: 2024-01-01T00:00:00Z\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(block)}\r\n\r\n"
    )
    return gzip.compress(head.encode() + block + b"\r\n\r\n", compresslevel=1)


def _warc(path: Path, records: list[tuple]) -> Path:
    """A .warc.gz of (kind, uri, block[, content type]) records; the content type defaults to an
    HTTP response's."""
    with open(path, "wb") as fh:
        for k, (kind, uri, block, *ctype) in enumerate(records):
            fh.write(_record(kind, uri, block, ctype[0] if ctype else "application/http; msgtype=response", k))
    return path


def _http(body: bytes, *headers: str, content_type: str = "text/html") -> bytes:
    head = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _page(*imgs: str, head: str = "", text: str = "") -> bytes:
    tags = "".join(f'<img src="{src}" alt="picture {k}">' for k, src in enumerate(imgs))
    return f"<html><head><title>t</title>{head}</head><body>{tags}<p>{text}</p></body></html>".encode()


def _chunked(data: bytes, size: int = 7) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def _urls(result) -> list[str]:
    return [r["url"] for r in result.table.to_pylist()]


# --- every record type ------------------------------------------------------------------------------

DNS = b"20240101000000\nexample.org.\t300\tIN\tA\t93.184.216.34\n"


def _every_record_type(path: Path) -> Path:
    return _warc(
        path,
        [
            ("warcinfo", None, b"software: Heritrix/3.4\r\n", "application/warc-fields"),
            ("response", "dns:example.org", DNS, "text/dns"),  # Heritrix: one per host it resolves
            ("response", "whois://whois.example/example.org", b"Domain Name: EXAMPLE.ORG\n", "text/plain"),
            ("response", "ftp://ftp.example/pub/index.html", _page("/ftp.jpg"), "application/octet-stream"),
            ("request", "http://example.org/", b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", "application/http"),
            ("response", "http://example.org/", _http(_page("/a.jpg"))),
            ("metadata", "http://example.org/", b"via: \r\nfetchTimeMs: 12\r\n", "application/warc-fields"),
            ("revisit", "http://example.org/", _http(b""), "application/http; msgtype=response"),
            ("resource", "metadata://gnu.org/software/wget/warc/wget.log", b"wget log\n", "text/plain"),
            ("resource", "<https://example.org/saved.html>", _page("b.jpg"), "text/html; charset=utf-8"),
            ("resource", "https://example.org/logo.png", b"\x89PNG\r\n\x1a\n", "image/png"),
        ],
    )


def test_every_record_is_counted_once_and_dns_is_not_a_bad_header(tmp_path):
    result = extract_source(str(_every_record_type(tmp_path / "crawl.warc.gz")), NO_LANG)
    counts = result.counts
    assert "bad_http_header" not in counts and "truncated_source" not in counts
    assert counts["not_http"] == 4  # dns:, whois:, ftp:, metadata:
    assert counts["other_record"] == 3  # warcinfo, request, metadata
    assert counts["revisit"] == 1
    assert counts["pages"] == 2 and counts["not_html"] == 1  # a resource record is read as the page it holds
    assert sum(counts[k] for k in ("not_http", "other_record", "revisit", "pages", "not_html")) == 11
    rows = result.table.to_pylist()
    assert [(r["page_url"], r["url"]) for r in rows] == [
        ("http://example.org/", "http://example.org/a.jpg"),
        ("https://example.org/saved.html", "https://example.org/b.jpg"),
    ]


def test_a_broken_http_header_is_still_one(tmp_path):
    warc = _warc(tmp_path / "h.warc.gz", [("response", "http://h.example/", b"garbage\r\n\r\n<html>")])
    assert extract_source(str(warc), NO_LANG).counts == {"bad_http_header": 1}


def test_wat_counts_the_records_it_describes_the_same_way(tmp_path):
    warc = _every_record_type(tmp_path / "crawl.warc.gz")
    wat = tmp_path / "crawl.warc.wat.gz"
    assert warc_to_wat(str(warc), str(wat)) == 11
    counts = extract_source(str(wat), NO_LANG).counts
    assert counts["not_http"] == 4 and counts["other_record"] == 3 and counts["revisit"] == 1
    assert counts["pages"] == 1 and counts["kept"] == 1  # the WAT writer parses response records only
    assert "bad_record" not in counts


# --- content encodings --------------------------------------------------------------------------------


def test_encoded_bodies_are_decoded(tmp_path):
    def gz(data: bytes) -> bytes:
        return gzip.compress(data)

    def raw_deflate(data: bytes) -> bytes:
        c = zlib.compressobj(wbits=-15)
        return c.compress(data) + c.flush()

    plain = _page("/plain.jpg")
    warc = _warc(
        tmp_path / "enc.warc.gz",
        [
            ("response", "http://e.example/br", _http(brotli.compress(_page("/br.jpg")), "Content-Encoding: br")),
            (
                "response",
                "http://e.example/chunked-br",
                _http(
                    _chunked(brotli.compress(_page("/chunked.jpg"))),
                    "Content-Encoding: BR",
                    "Transfer-Encoding: chunked",
                ),
            ),
            (
                "response",
                "http://e.example/two",
                _http(brotli.compress(gz(_page("/two.jpg"))), "Content-Encoding: gzip, br"),
            ),
            (
                "response",
                "http://e.example/deflate",
                _http(raw_deflate(_page("/deflate.jpg")), "Content-Encoding: deflate"),
            ),
            (
                "response",
                "http://e.example/zlib",
                _http(zlib.compress(_page("/zlib.jpg")), "Content-Encoding: deflate"),
            ),
            # ClueWeb09 says gzip over plain pages; servers send charset names as codings
            ("response", "http://e.example/says-gzip", _http(plain, "Content-Encoding: gzip")),
            ("response", "http://e.example/says-utf8", _http(_page("/utf8.jpg"), "Content-Encoding: utf-8")),
            # no Content-Type: sniffed after decoding
            (
                "response",
                "http://e.example/sniffed",
                b"HTTP/1.1 200 OK\r\nContent-Encoding: x-gzip\r\n\r\n" + gz(plain),
            ),
        ],
    )
    result = extract_source(str(warc), NO_LANG)
    assert _urls(result) == [
        f"http://e.example/{name}.jpg" for name in ("br", "chunked", "two", "deflate", "zlib", "plain", "utf8", "plain")
    ]
    assert result.counts["pages"] == 8
    assert not {"bad_content_encoding", "unsupported_content_encoding", "undecodable"} & set(result.counts)
    # The WAT writer decodes as extract does (warcio's own br decoding fails with Google's brotli,
    # which FastWARC installs); it parses pages that say text/html, so not the sniffed one.
    wat = tmp_path / "enc.warc.wat.gz"
    assert warc_to_wat(str(warc), str(wat)) == 8
    assert _urls(extract_source(str(wat), NO_LANG)) == _urls(result)[:-1]


def test_bad_bodies_are_counted_never_raised(tmp_path):
    noise = random.Random(0).randbytes(3000)
    page = _page("/cut.jpg", text="words " * 4000)
    warc = _warc(
        tmp_path / "bad.warc.gz",
        [
            ("response", "http://b.example/noise-br", _http(noise, "Content-Encoding: br")),
            ("response", "http://b.example/noise-gzip", _http(b"\x1f\x8b\x08\x00" + noise, "Content-Encoding: gzip")),
            ("response", "http://b.example/zstd", _http(noise, "Content-Encoding: zstd")),
            # cut short by a crawler's size limit: what it holds is read
            ("response", "http://b.example/cut", _http(gzip.compress(page)[:600], "Content-Encoding: gzip")),
            ("response", "http://b.example/ok", _http(brotli.compress(_page("/ok.jpg")), "Content-Encoding: br")),
        ],
    )
    result = extract_source(str(warc), NO_LANG)
    assert result.counts["bad_content_encoding"] == 2 and result.counts["unsupported_content_encoding"] == 1
    assert result.counts["pages"] == 5 and "truncated_source" not in result.counts
    assert _urls(result) == ["http://b.example/cut.jpg", "http://b.example/ok.jpg"]


def test_a_compression_bomb_stops_at_the_page_limit(tmp_path):
    huge = b"<html><body><img src=a.jpg alt=x>" + b"<p>spam</p>" * (4 << 20)  # 44 MiB of HTML
    warc = _warc(
        tmp_path / "bomb.warc.gz",
        [
            ("response", "http://x.example/br", _http(brotli.compress(huge, quality=1), "Content-Encoding: br")),
            ("response", "http://x.example/gz", _http(gzip.compress(huge, 1), "Content-Encoding: gzip")),
        ],
    )
    result = extract_source(str(warc), ExtractConfig(detect_lang=False, max_page_bytes=1 << 20))
    assert result.counts == {"pages": 2, "page_too_large": 2}
    body, problem = decode_body(brotli.compress(huge, quality=1), ["br"], 1 << 20)
    assert problem is None and (1 << 20) < len(body) < (2 << 20)


# --- the page URL -------------------------------------------------------------------------------------


def test_images_resolve_against_the_fetched_url_never_the_canonical(tmp_path):
    canonical = '<link rel="canonical" href="http://www.site.example/a/page.html">'
    warc = _warc(
        tmp_path / "urls.warc.gz",
        [
            ("response", "https://site.example/a/page.html", _http(_page("pic.jpg", "/root.jpg", head=canonical))),
            # a relative <base href> resolves against the fetched URL; the first base with an href counts
            (
                "response",
                "https://site.example/a/b/based.html",
                _http(
                    _page("pic.jpg", head='<base target="_top"><base href="../media/"><base href="/no/">' + canonical)
                ),
            ),
            ("response", "https://site.example/c.html", _http(_page("pic.jpg", head='<base href="//cdn.example/x/">'))),
        ],
    )
    rows = extract_source(str(warc), NO_LANG).table.to_pylist()
    assert [(r["page_url"], r["url"]) for r in rows] == [
        ("https://site.example/a/page.html", "https://site.example/a/pic.jpg"),
        ("https://site.example/a/page.html", "https://site.example/root.jpg"),
        ("https://site.example/a/b/based.html", "https://site.example/a/media/pic.jpg"),
        ("https://site.example/c.html", "https://cdn.example/x/pic.jpg"),
    ]


def _saved(path: Path, *imgs: str, head: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_page(*imgs, head=head))
    return path


def _cli(*args) -> object:
    return CliRunner().invoke(cli, ["extract", *map(str, args), "--no-lang"])


def test_page_url_gives_a_saved_file_its_url(tmp_path):
    page = _saved(tmp_path / "p.html", "img/a.jpg", head='<link rel="canonical" href="http://www.other.example/p">')
    out = tmp_path / "out"
    result = _cli(page, "-o", out, "--page-url", "https://site.example/dir/p.html")
    assert result.exit_code == 0, result.output
    rows = read_table(str(out), expect_kind="candidates").to_pylist()
    assert [(r["page_url"], r["url"]) for r in rows] == [
        ("https://site.example/dir/p.html", "https://site.example/dir/img/a.jpg")
    ]
    record = read_run_record(str(out))
    assert record.config["page_url"] == "https://site.example/dir/p.html"
    # without it, the canonical link is the best guess for a saved file (and the only place it counts)
    rows = extract_source(str(page), NO_LANG).table.to_pylist()
    assert rows[0]["url"] == "http://www.other.example/img/a.jpg"

    second = _saved(tmp_path / "q.html", "b.jpg")
    result = _cli(page, second, "-o", tmp_path / "two", "--page-url", "https://site.example/p.html")
    assert result.exit_code == 1 and "--page-urls" in result.output
    result = _cli(page, "-o", tmp_path / "ftp", "--page-url", "ftp://site.example/p.html")
    assert result.exit_code != 0 and "http(s) URL" in result.output


def _folder(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    _saved(site / "a.html", "a.jpg")
    _saved(site / "sub" / "b.html", "b.jpg", head='<base href="../static/">')
    _saved(site / "c.html", "c.jpg", "https://cdn.example/c.jpg")
    return site


WANT = [
    ("https://a.example/x/a.html", "https://a.example/x/a.jpg"),
    ("https://b.example/y/b.html", "https://b.example/static/b.jpg"),
]


def test_page_urls_csv_by_name_and_by_path(tmp_path):
    site = _folder(tmp_path)
    listing = tmp_path / "urls.csv"
    # a bare name matches by basename; a path is relative to the list's folder
    listing.write_text(
        "file,url,note\na.html,https://a.example/x/a.html,\nsite/sub/b.html,https://b.example/y/b.html,\n"
    )
    out = tmp_path / "out"
    result = _cli(site, "-o", out, "--page-urls", listing)
    assert result.exit_code == 0, result.output
    rows = read_table(str(out), expect_kind="candidates").to_pylist()
    assert [(r["page_url"], r["url"]) for r in rows if not r["page_url"].startswith("file:")] == WANT
    record = read_run_record(str(out))
    assert record.config["page_urls"] == str(listing)
    assert record.config["page_urls_sha256"] == hashlib.sha256(listing.read_bytes()).hexdigest()
    # c.html is not listed: counted, read against its file:// URL (its relative image is bad_scheme)
    assert record.counts["no_page_url"] == 1 and record.counts["bad_scheme"] == 1
    assert [r["url"] for r in rows if r["page_url"].startswith("file:")] == ["https://cdn.example/c.jpg"]


def test_page_urls_parquet(tmp_path):
    site = _folder(tmp_path)
    listing = tmp_path / "urls.parquet"
    files = ["a.html", str(site / "sub" / "b.html")]  # an absolute path works too
    pq.write_table(pa.table({"file": files, "url": [u for u, _ in WANT]}), listing)
    config = ExtractConfig(detect_lang=False, page_urls=str(listing))
    got = []
    for name in ("a.html", "sub/b.html"):
        got += [(r["page_url"], r["url"]) for r in extract_source(str(site / name), config).table.to_pylist()]
    assert got == WANT
    # the list must still be the file the config digested
    listing.write_bytes(listing.read_bytes() + b"\0")
    with pytest.raises(StageError, match="changed"):
        stale = ExtractConfig(detect_lang=False, page_urls=str(listing), page_urls_sha256="0" * 64)
        extract_source(str(site / "a.html"), stale)


def test_page_urls_a_bare_name_must_not_name_two_sources(tmp_path):
    for folder in ("x", "y"):
        _saved(tmp_path / folder / "p.html", "a.jpg")
    listing = tmp_path / "urls.csv"
    listing.write_text("file,url\np.html,https://p.example/\n")
    config = ExtractConfig(detect_lang=False, page_urls=str(listing))
    with pytest.raises(StageError, match="several sources named p.html"):
        refs = source_refs([str(tmp_path / "x"), str(tmp_path / "y")])
        run_stage(EXTRACT, config, refs, str(tmp_path / "o"), progress=False)
    listing.write_text("file,url\nx/p.html,https://p.example/x\ny/p.html,https://p.example/y\n")
    config = ExtractConfig(detect_lang=False, page_urls=str(listing))
    outcome = run_stage(EXTRACT, config, source_refs([str(tmp_path)]), str(tmp_path / "o2"), progress=False)
    assert outcome.done
    pages = read_table(str(tmp_path / "o2"), expect_kind="candidates").column("page_url").to_pylist()
    assert pages == ["https://p.example/x", "https://p.example/y"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("u.csv", "file,url\na.html,ftp://a.example/\n", "http"),
        ("u.csv", "file,url\na.html,https://a.example/1\na.html,https://a.example/2\n", "two URLs"),
        ("u.csv", "path,url\na.html,https://a.example/\n", "columns file and url"),
        ("u.csv", "file,url\n,https://a.example/\n", "no file"),
        ("u.csv", "file,url\n", "no \\(file, url\\) rows"),
        ("u.tsv", "file\turl\n", ".csv or .parquet"),
    ],
)
def test_page_urls_are_checked(tmp_path, name, text, message):
    listing = tmp_path / name
    listing.write_text(text)
    with pytest.raises(ValueError, match=message):
        ExtractConfig(page_urls=str(listing))


def test_page_url_options_are_checked(tmp_path):
    listing = tmp_path / "u.csv"
    listing.write_text("file,url\na.html,https://a.example/\n")
    for bad in (
        {"page_url": "site.example/p.html"},
        {"page_url": "http://bad:port/"},
        {"page_url": "https://a.example/", "page_urls": str(listing)},
        {"page_urls_sha256": "0" * 64},
    ):
        with pytest.raises(ValueError):
            ExtractConfig(**bad)
    mapping, digest = read_page_urls(str(listing))
    assert mapping.lookup(str(tmp_path / "deep" / "a.html")) == "https://a.example/" and len(digest) == 64
    assert ExtractConfig.from_options({"page-urls": str(listing)}).page_urls_sha256 == digest


def test_counts_reach_the_run_record(tmp_path):
    (tmp_path / "crawl").mkdir()
    warc = _every_record_type(tmp_path / "crawl" / "c.warc.gz")
    result = _cli(warc, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    counts = Counter(read_run_record(str(tmp_path / "out")).counts)
    assert counts["not_http"] == 4 and counts["bad_http_header"] == 0
