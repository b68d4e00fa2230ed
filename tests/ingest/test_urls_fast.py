"""urls.Resolver: the plain-URL fast path gives what absolutize + normalize_url give, URL for URL."""

from __future__ import annotations

import random

import pytest

from wit.ingest.urls import BadURL, Resolver, absolutize, normalize_url

# Pieces that reach every branch and every reason to leave the fast path: dot segments, empty
# segments, escapes, fragments, ports, userinfo, upper case, non-ASCII, spaces, params, queries.
PIECES = [
    "a", "b.jpg", "IMG.PNG", "x-y_z~", "..", ".", "", "%20", "%7e", "%zz", "#f", "?", "?q=1", "?a?b",
    ";p=1", ":", "@", "é", " ", "\t", "//", "/", "http:", "https://", "HTTP://", "Host.COM", "h.com.",
    ":8080", ":443", ":80", ":080", ":99999", "user@", "data:", "javascript:", "..b", ".hidden", "(1)", "[",
    "\\", "&amp;",
]  # fmt: skip
PAGES = [
    "https://example.com/a/b/page.html",
    "https://example.com/",
    "http://example.com",
    "https://example.com/dir/",
    "https://example.com/a//b/c",
    "https://example.com/a/./b/c",
    "https://example.com:8443/a/b",
    "http://127.0.0.1:8080/site/page.html",
    "https://example.com/a/b?x=1",
    "https://example.com/a;p/b;q",
    "file:///saved/page.html",
    "https://example.com/%D8%A7/page",  # a base path the fast path does not join to
]
BASES = [None, "", " ", "/other/", "sub/", "https://cdn.example/base/", "//cdn.example/x/y", "../up/", "?q", "#f"]
BASES += ["//[::1/x/"]  # an unbalanced IPv6 bracket: BadURL for every image, never a crash


def general(src: str, page: str, base: str | None) -> str | None:
    url = absolutize(src, page, base)
    if url.split(":", 1)[0].lower() not in ("http", "https"):
        return None
    return normalize_url(url)


def outcome(fn, *args):
    try:
        return fn(*args)
    except BadURL:
        return BadURL


def test_fast_path_agrees_with_the_general_one():
    rng = random.Random(0)
    cases = 0
    for _ in range(40_000):
        page, base = rng.choice(PAGES), rng.choice(BASES)
        src = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.3:
            src = rng.choice(["https://", "//", "/", "http://"]) + "h.example/" + src
        assert outcome(Resolver(page, base).resolve, src) == outcome(general, src, page, base), (src, page, base)
        cases += 1
    assert cases == 40_000


@pytest.mark.parametrize(
    ("src", "want"),
    [
        ("x.jpg", "https://example.com/a/b/x.jpg"),
        ("/y.jpg?w=1", "https://example.com/y.jpg?w=1"),
        ("//CDN.example/z.png", "https://cdn.example/z.png"),
        ("HTTP://Cdn.Example/q", "http://cdn.example/q"),
        ("../up.jpg", "https://example.com/a/up.jpg"),  # the general path
        ("a b.jpg", "https://example.com/a/b/a%20b.jpg"),
        ("javascript:void(0)", None),
    ],
)
def test_resolves_as_a_browser_would(src, want):
    assert Resolver("https://example.com/a/b/page.html").resolve(src) == want


def test_the_fast_path_is_taken_for_plain_urls(monkeypatch):
    resolver = Resolver("https://example.com/a/b/page.html")
    monkeypatch.setattr(Resolver, "_general", None)  # any fall-back would now fail
    for src in ("x.jpg", "img/x.jpg?s=2", "/y.jpg", "//cdn.example/z.png", "https://cdn.example/a/b.webp"):
        assert resolver.resolve(src).startswith("https://")


def test_images_of_a_saved_file_are_resolved_without_urllib(monkeypatch):
    # a file:// page: what names no scheme of its own is a file: URL, not an image to fetch
    resolver = Resolver("file:///saved/page.html")
    monkeypatch.setattr(Resolver, "_general", None)
    for src in ("x.jpg", "/y.jpg", "//cdn.example/z.png", "../a b.png", ""):
        assert resolver.resolve(src) is None
    # and a plain absolute URL is itself, whatever the base
    assert resolver.resolve("HTTPS://CDN.example/a.jpg") == "https://cdn.example/a.jpg"
    assert Resolver("https://example.com/%D8%A7/page").resolve("http://cdn.example/b.jpg?w=1") == (
        "http://cdn.example/b.jpg?w=1"
    )
    monkeypatch.undo()
    assert resolver.resolve("https://cdn.example/a b.jpg") == "https://cdn.example/a%20b.jpg"
    with pytest.raises(BadURL):
        resolver.resolve("//[::1/x.jpg")


def test_an_unparsable_image_url_is_counted_not_a_crash(tmp_path):
    from wit.ingest.extract import ExtractConfig, extract_source

    page = tmp_path / "p.html"
    page.write_text(
        '<link rel="canonical" href="//[bad/">'  # a canonical link that does not parse names nothing
        '<img src="//[::1/a.jpg" alt="a"><img src="https://x.example:99999/b.jpg" alt="b">'
        '<img src="https://x.example/c.jpg" alt="c">'
    )
    result = extract_source(str(page), ExtractConfig(detect_lang=False))
    assert result.counts["bad_url"] == 2
    assert [r["url"] for r in result.table.to_pylist()] == ["https://x.example/c.jpg"]
