import base64
import hashlib
import http.client
import io
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from selectolax.lexbor import LexborHTMLParser
from warcio.archiveiterator import ArchiveIterator

from wit.evaluate import world
from wit.ingest.synthetic import (
    BASE_PLACEHOLDER,
    MESS_KINDS,
    MessConfig,
    SyntheticWebServer,
    WebInfo,
    bomb_png,
    generate_web,
)

DELAY_SCALE = 0.05
# Never through a proxy from the environment: everything here is on 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - stdlib signature
        return None


RAW_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect)


@dataclass(slots=True)
class Web:
    info: WebInfo
    server: SyntheticWebServer
    rows: list[dict]
    seconds: float

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r["mess"] == kind]


@dataclass(slots=True)
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


def fetch(url: str, opener: urllib.request.OpenerDirector = OPENER, method: str = "GET") -> Fetched:
    start = time.perf_counter()
    req = urllib.request.Request(url, method=method)
    try:
        with opener.open(req, timeout=20) as resp:
            return Fetched(resp.status, dict(resp.headers), resp.read(), time.perf_counter() - start)
    except urllib.error.HTTPError as err:
        return Fetched(err.code, dict(err.headers), err.read(), time.perf_counter() - start)


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("web")
    start = time.perf_counter()
    info = generate_web(out, pages=1000, seed=0)
    server = SyntheticWebServer(out, delay_scale=DELAY_SCALE).start()
    assert fetch(server.url("/index.html")).status == 200
    seconds = time.perf_counter() - start
    rows = pq.read_table(info.truth_path).to_pylist()
    yield Web(info, server, rows, seconds)
    server.stop()


def page_imgs(web: Web, page_path: str) -> tuple[LexborHTMLParser, list]:
    tree = LexborHTMLParser(fetch(web.server.url(page_path)).body.decode("utf-8"))
    return tree, tree.css("img")


def row_img(web: Web, row: dict):
    """The served page's <img> node for a truth row (its src with the server's address filled in)."""
    _, imgs = page_imgs(web, row["page_path"])
    want = row["img_src"].replace(BASE_PLACEHOLDER, web.server.base_url)
    found = [n for n in imgs if n.attributes.get("src") == want]
    assert found, f"{want} not in {row['page_path']}"
    return found[0]


def served(web: Web, row: dict) -> Fetched:
    return fetch(web.server.url(row["img_path"]))


def test_generating_and_serving_1000_pages_takes_under_30s(web: Web):
    assert web.info.pages == 1000
    assert web.seconds < 30, f"generate + serve took {web.seconds:.1f}s"


def test_truth_has_every_mess_kind(web: Web):
    counts = defaultdict(int)
    for r in web.rows:
        counts[r["mess"]] += 1
    assert set(counts) == set(MESS_KINDS)
    assert counts == {k: v for k, v in web.info.counts.items() if v}
    assert 1 <= counts["huge"] <= 2
    assert all(n >= 3 for k, n in counts.items() if k != "huge"), counts
    assert sum(r["relative"] for r in web.rows) > 100
    assert {r["lang"] for r in web.of("non_english")} == {"de", "fr", "es"}
    # absolute URLs live under the base_url given at generation (the WARC host), not the server's port
    assert all(r["img_url"].startswith(web.info.base_url) for r in web.rows if r["mess"] != "data_uri")


def test_clean(web: Web):
    for row in web.of("clean")[:20]:
        got = served(web, row)
        assert got.status == 200
        assert got.headers["Content-Type"] == {"jpeg": "image/jpeg", "png": "image/png"}[row["format"]]
        assert int(got.headers["Content-Length"]) == len(got.body) == row["n_bytes"]
        assert hashlib.sha256(got.body).hexdigest() == row["sha256"]
        assert decode(got.body).size == (row["width"], row["height"])


def test_broken_link_is_404(web: Web):
    for row in web.of("broken_link")[:5]:
        assert row["sha256"] is None and row["http_status"] == 404
        assert served(web, row).status == 404


def test_server_error_is_500(web: Web):
    for row in web.of("server_error")[:5]:
        assert served(web, row).status == 500


def test_rate_limited_says_retry_after_then_serves(web: Web):
    row = web.of("rate_limited")[0]
    failures = MessConfig().rate_limited_failures
    for _ in range(failures):
        got = served(web, row)
        assert got.status == 429 and int(got.headers["Retry-After"]) >= 1
    got = served(web, row)
    assert got.status == 200 and hashlib.sha256(got.body).hexdigest() == row["sha256"]


def test_redirect_points_to_the_image(web: Web):
    for row in web.of("redirect")[:5]:
        first = fetch(web.server.url(row["img_path"]), RAW_OPENER)
        assert first.status == 302
        target = urlsplit(row["redirect_to"]).path
        assert first.headers["Location"] == web.server.url(target)
        final = served(web, row)  # urllib follows the redirect
        assert final.status == 200 and hashlib.sha256(final.body).hexdigest() == row["sha256"]
        decode(final.body)


def test_slow_is_delayed_without_blocking_others(web: Web):
    row = web.of("slow")[0]
    delay = MessConfig().slow_delay_s
    got = served(web, row)
    assert got.status == 200 and got.seconds >= delay * DELAY_SCALE
    assert hashlib.sha256(got.body).hexdigest() == row["sha256"]
    # A second server with a longer delay: a clean fetch must finish while the slow one sleeps.
    with SyntheticWebServer(web.info.root, delay_scale=0.5) as slow_server:
        result: dict[str, Fetched] = {}
        thread = threading.Thread(target=lambda: result.update(slow=fetch(slow_server.url(row["img_path"]))))
        thread.start()
        time.sleep(0.05)
        quick = fetch(slow_server.url(web.of("clean")[0]["img_path"]))
        thread.join()
    assert quick.status == 200 and quick.seconds < delay * 0.5 / 2
    assert result["slow"].seconds >= delay * 0.5


def test_noai_header(web: Web):
    for row in web.of("noai")[:5]:
        got = served(web, row)
        assert got.status == 200 and "noai" in got.headers["X-Robots-Tag"]
        assert hashlib.sha256(got.body).hexdigest() == row["sha256"]
    assert "X-Robots-Tag" not in served(web, web.of("clean")[0]).headers


def original(web: Web, row: dict) -> dict:
    (orig,) = [r for r in web.rows if r["img_url"] == row["duplicate_of"]]
    return orig


def test_duplicate_has_the_same_bytes_under_another_url(web: Web):
    for row in web.of("duplicate")[:5]:
        orig = original(web, row)
        assert row["img_url"] != orig["img_url"]
        assert served(web, row).body == served(web, orig).body
        assert row["sha256"] == orig["sha256"]


def test_near_duplicate_differs_in_bytes_not_in_content(web: Web):
    for row in web.of("near_duplicate")[:10]:
        a, b = served(web, row).body, served(web, original(web, row)).body
        assert a != b
        small = [np.asarray(decode(x).convert("RGB").resize((16, 16)), dtype=np.float32) for x in (a, b)]
        assert np.abs(small[0] - small[1]).mean() < 35, row["detail"]
        assert (row["kind"], row["colour"], row["shape"], row["digit"]) == tuple(
            original(web, row)[k] for k in ("kind", "colour", "shape", "digit")
        )


def test_every_near_duplicate_is_within_reach_of_the_reference_phash(web: Web):
    import imagehash

    from wit.ingest.synthetic.generate import NEAR_DUPLICATE_BITS

    rows = web.of("near_duplicate")
    assert rows
    for row in rows:
        a, b = served(web, row).body, served(web, original(web, row)).body
        assert imagehash.phash(decode(a)) - imagehash.phash(decode(b)) <= NEAR_DUPLICATE_BITS, row["detail"]


def test_mismatched_caption_describes_another_concept(web: Web):
    for row in web.of("mismatched_caption")[:10]:
        assert row_img(web, row).attributes.get("alt") == row["alt"]
        assert row["colour"].lower() not in row["alt"].lower().replace("coloured", "")


def test_non_english_alt_is_on_the_page(web: Web):
    for row in web.of("non_english")[:10]:
        assert row["lang"] in ("de", "fr", "es")
        node = row_img(web, row)
        assert node.attributes.get("alt") == row["alt"]
        concept = world.Concept(row["kind"], row["colour"], row["shape"], row["digit"])
        for forms in world.class_words(concept, row["lang"]):
            assert any(f in row["alt"].lower() for f in forms)


def test_tiny_is_8x8(web: Web):
    for row in web.of("tiny")[:5]:
        assert decode(served(web, row).body).size == (8, 8)


def test_huge_is_a_decompression_bomb(web: Web, monkeypatch: pytest.MonkeyPatch):
    row = web.of("huge")[0]
    got = served(web, row)
    assert got.status == 200 and got.headers["Content-Type"] == "image/png"
    assert len(got.body) < 2_000_000 and got.body == bomb_png(20000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(got.body)).load()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    img = Image.open(io.BytesIO(got.body))
    assert img.size == (20000, 20000) and img.mode == "L"


def test_bomb_png_is_a_valid_png():
    small = bomb_png(300)
    img = decode(small)
    assert img.size == (300, 300) and img.getextrema() == (0, 0)


def test_corrupt_fails_to_decode(web: Web):
    rows = web.of("corrupt")
    assert {r["detail"] for r in rows} == {"truncated", "garbage"}
    for row in rows[:10]:
        got = served(web, row)
        assert got.status == 200 and got.headers["Content-Type"].startswith("image/")
        with pytest.raises((OSError, SyntaxError)):
            decode(got.body)


def test_empty_alt(web: Web):
    rows = web.of("empty_alt")
    assert {r["detail"] for r in rows} == {"empty", "missing"}
    for row in rows[:10]:
        node = row_img(web, row)
        if row["detail"] == "empty":
            assert node.attributes["alt"] in ("", None)  # lexbor gives None for a bare attribute
            assert 'alt=""' in node.html
        else:
            assert "alt" not in node.attributes


def test_data_uri(web: Web):
    for row in web.of("data_uri")[:5]:
        node = row_img(web, row)
        src = node.attributes["src"]
        assert src.startswith("data:image/png;base64,") and row["img_path"] is None
        data = base64.b64decode(src.split(",", 1)[1])
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert decode(data).size == (row["width"], row["height"])


def test_tracking_pixel(web: Web):
    for row in web.of("tracking_pixel")[:5]:
        node = row_img(web, row)
        assert node.attributes.get("width") == "1" and node.attributes.get("height") == "1"
        parts = urlsplit(row["img_url"])
        got = fetch(web.server.url(f"{parts.path}?{parts.query}"))
        assert parts.path == "/px.gif" and parts.query
        assert got.status == 200 and got.headers["Content-Type"] == "image/gif"
        assert decode(got.body).size == (1, 1)


def test_relative_srcs_resolve_to_their_image(web: Web):
    rows = [r for r in web.rows if r["relative"] and r["mess"] == "clean"]
    with_base = [r for r in rows if r["base_href"]]
    assert with_base and len(rows) > len(with_base)
    for row in rows[:15] + with_base[:5]:
        tree, _ = page_imgs(web, row["page_path"])
        node = row_img(web, row)
        src = node.attributes["src"]
        assert not src.startswith(("/", "http", BASE_PLACEHOLDER))
        doc_base = web.server.url(row["page_path"])
        base = tree.css_first("base")
        if base is not None:
            doc_base = urljoin(doc_base, base.attributes["href"])
        url = urljoin(doc_base, src)
        assert urlsplit(url).path == row["img_path"]
        got = fetch(url)
        assert got.status == 200 and hashlib.sha256(got.body).hexdigest() == row["sha256"]


def test_every_truth_row_is_an_img_in_its_page(web: Web):
    by_page: dict[str, list[dict]] = defaultdict(list)
    for r in web.rows:
        by_page[r["page_path"]].append(r)
    site = web.info.site_dir
    for page_path, rows in by_page.items():
        tree = LexborHTMLParser((site / page_path.lstrip("/")).read_text("utf-8"))
        imgs = tree.css("img")
        assert [n.attributes.get("src") for n in imgs] == [r["img_src"] for r in rows], page_path
        for node, r in zip(imgs, rows, strict=True):
            assert (node.attributes.get("alt") or "") == (r["alt"] or "")
            if r["figcaption"]:
                assert node.parent.tag == "figure"
                assert node.parent.css_first("figcaption").text() == r["figcaption"]


def test_served_pages_carry_the_servers_address(web: Web):
    body = fetch(web.server.url("/index.html")).body.decode()
    assert body.count("<a href=") == 1000
    pages = {r["page_path"] for r in web.rows if BASE_PLACEHOLDER in r["img_src"]}
    text = fetch(web.server.url(sorted(pages)[0])).body.decode()
    assert BASE_PLACEHOLDER not in text and web.server.base_url in text


def test_warc_files_hold_every_page(web: Web):
    assert len(web.info.warc_paths) == 4
    uris, infos = [], 0
    for path in web.info.warc_paths:
        with open(path, "rb") as fh:
            for rec in ArchiveIterator(fh):
                if rec.rec_type == "warcinfo":
                    infos += 1
                elif rec.rec_type == "response":
                    assert rec.rec_headers.get_header("Content-Type") == "application/http; msgtype=response"
                    assert rec.rec_headers.get_header("WARC-Date")
                    assert rec.http_headers.get_statuscode() == "200"
                    body = rec.content_stream().read().decode("utf-8")
                    assert BASE_PLACEHOLDER not in body and "<img" in body
                    uris.append(rec.rec_headers.get_header("WARC-Target-URI"))
    assert infos == 4
    pages = {r["page_url"] for r in web.rows}
    assert len(uris) == len(set(uris)) == 1000 and pages <= set(uris)
    assert all(u.startswith(web.info.base_url) for u in uris)


def test_head_traversal_and_unknown_paths(web: Web):
    row = web.of("clean")[0]
    head = fetch(web.server.url(row["img_path"]), method="HEAD")
    assert head.status == 200 and head.body == b"" and int(head.headers["Content-Length"]) == row["n_bytes"]
    assert fetch(web.server.url("/no/such/page.html")).status == 404
    assert fetch(web.server.base_url + "/").status == 200
    for path in ("/../routes.json", "/%2e%2e/web.json", "/img/../../truth.parquet"):
        conn = http.client.HTTPConnection("127.0.0.1", web.server.port, timeout=5)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status in (403, 404) and b"placeholder" not in body and b"PAR1" not in body, path


def test_server_binds_only_loopback(tmp_path: Path, web: Web):
    with pytest.raises(ValueError):
        SyntheticWebServer(web.info.root, host="0.0.0.0")
    with pytest.raises(FileNotFoundError):
        SyntheticWebServer(tmp_path)
    assert web.server.base_url.startswith("http://127.0.0.1:")


def test_small_web_is_deterministic_and_has_every_kind(tmp_path: Path):
    a = generate_web(tmp_path / "a", pages=40, seed=3)
    b = generate_web(tmp_path / "b", pages=40, seed=3)
    assert a.truth().equals(b.truth())
    assert {k for k, n in a.counts.items() if n} == set(MESS_KINDS)
    files_a = sorted(p.relative_to(a.site_dir) for p in a.site_dir.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b.site_dir) for p in b.site_dir.rglob("*") if p.is_file())
    assert all((a.site_dir / p).read_bytes() == (b.site_dir / p).read_bytes() for p in files_a)
    assert WebInfo.load(tmp_path / "a").counts == a.counts
    with pytest.raises(FileExistsError):
        generate_web(tmp_path / "a", pages=5)
    assert generate_web(tmp_path / "a", pages=5, overwrite=True).pages == 5


def test_mess_config_is_validated():
    with pytest.raises(ValueError):
        MessConfig(slow=1.5)
    with pytest.raises(ValueError):
        MessConfig(broken_link=0.6, server_error=0.6)
    with pytest.raises(ValueError):
        MessConfig(huge_count=-1)
    quiet = MessConfig(**{k: 0.0 for k in MessConfig().rates()}, huge_count=0, guarantee_each=False)
    assert quiet.rates() and not any(quiet.rates().values())


def test_same_seed_gives_byte_identical_warc_and_truth(tmp_path):
    import hashlib

    from wit.ingest.synthetic import generate_web

    def digests(root):
        files = sorted((root / "warc").glob("*.warc.gz")) + [root / "truth.parquet"]
        return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]

    generate_web(tmp_path / "a", pages=20, seed=11)
    generate_web(tmp_path / "b", pages=20, seed=11)
    generate_web(tmp_path / "c", pages=20, seed=12)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert digests(tmp_path / "a") != digests(tmp_path / "c")


def test_eval_image_is_a_digits_test_image(web: Web):
    import imagehash

    from wit.evaluate.datasets import open_builtin

    rows = web.of("eval_image")
    assert rows
    test_hashes = [imagehash.phash(s.image) for s in open_builtin("digits").split("test").samples()]
    for row in rows:
        served_hash = imagehash.phash(decode(served(web, row).body))
        assert min(served_hash - h for h in test_hashes) <= 2, row["img_url"]
        assert row["kind"] == "digit" and row["digit"] is not None
