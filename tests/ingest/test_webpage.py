"""webpage: lazy-loading sources, srcset, <noscript> copies, WHATWG charset labels, alt trimming."""

from __future__ import annotations

import codecs

import pytest

from wit.ingest import extract, webpage
from wit.ingest.extract import ExtractConfig, extract_source
from wit.ingest.webpage import (
    WHATWG_LABELS,
    choose_src,
    codec_name,
    decode_html,
    is_placeholder,
    parse_page,
    parse_srcset,
    pick_srcset,
)

# --- lazy loading and srcset ---------------------------------------------------------------------


def srcs(html: str) -> list[tuple[str | None, str | None]]:
    return [(img.src, img.src_attr) for img in parse_page(html).images]


def test_lazy_attribute_wins_over_src():
    assert srcs(
        '<img src="/img/placeholder.png" data-src="https://cdn.example/real.jpg" class="lazyload">'
        '<img src="data:image/gif;base64,R0lGOD" data-lazy-src="/a.jpg">'
        '<img src="/grey.gif" data-original="b.jpg">'
        '<img data-pagespeed-lazy-src="/c.jpg" src="/pagespeed_static/1.JiBnMqyl6S.gif">'
        '<img src="/thumb.jpg" data-src="/full.jpg">'  # what the script loads, even over a real src
        '<img src=" /same.jpg " data-src="/same.jpg">'
    ) == [
        ("https://cdn.example/real.jpg", "data-src"),
        ("/a.jpg", "data-lazy-src"),
        ("b.jpg", "data-original"),
        ("/c.jpg", "data-pagespeed-lazy-src"),
        ("/full.jpg", "data-src"),
        ("/same.jpg", "src"),  # the lazy attribute changed nothing
    ]


def test_lazy_attribute_that_is_no_url_is_ignored():
    assert srcs(
        '<img src="/a.jpg" data-src="true"><img src="/b.jpg" data-lazy="1">'
        '<img src="/c.jpg" data-src="https://ichef.example/news/{width}/c.jpg">'
        '<img src="/d.jpg" data-src="data:image/gif;base64,R0l"><img src="/e.jpg" data-src="javascript:load()">'
        '<img src="/f.jpg" data-src="   ">'
    ) == [(f"/{c}.jpg", "src") for c in "abcdef"]


def test_lazy_srcset_and_srcset():
    assert srcs(
        '<img src="data:," data-srcset="/s-300.jpg 300w, /s-800.jpg 800w, /s-2000.jpg 2000w">'
        '<img src="/lazy.gif" data-lazy-srcset="/l1.jpg 1x, /l2.jpg 2x">'
        '<img src="/blank.gif" srcset="/x1.jpg, /x2.jpg 2x">'
        '<img src="/real.jpg" srcset="/r-1024.jpg 1024w">'  # a real src needs no srcset
        '<img srcset="/only.jpg 640w">'
        '<img src="/d.jpg" data-src="/e.jpg" data-srcset="/f.jpg 1x">'  # a single URL before a set
    ) == [
        ("/s-800.jpg", "data-srcset"),
        ("/l1.jpg", "data-lazy-srcset"),
        ("/x1.jpg", "srcset"),
        ("/real.jpg", "src"),
        ("/only.jpg", "srcset"),
        ("/e.jpg", "data-src"),
    ]


def test_placeholder_kept_when_nothing_better():
    assert srcs('<img src="/blank.gif"><img src="data:image/png;base64,AA" srcset="data:, 1x"><img alt="x">') == [
        ("/blank.gif", "src"),
        ("data:image/png;base64,AA", "src"),
        (None, None),
    ]
    assert choose_src({"src": "\t/a.jpg\n"}) == ("/a.jpg", "src")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "#",
        "data:image/gif;base64,R0lGOD",
        "about:blank",
        "javascript:void(0)",
        "/wp-content/plugins/a3-lazy-load/assets/images/lazy_placeholder.gif",
        "https://s0.wp.com/wp-content/mu-plugins/lazy-images/images/1x1.trans.gif",
        "/images/spacer.gif?v=2",
        "/img/blank.gif",
        "/img/blank.png",
        "/static/loading.gif",
        "/i/grey-bg.gif",
        "/i/transparent.png",
        "/lazyload.svg",
        "/img/Placeholder-Image.JPG",
    ],
)
def test_is_placeholder(url):
    assert is_placeholder(url)


@pytest.mark.parametrize(
    "url",
    [
        "/photos/pixel-7-review.jpg",
        "/blank-canvas-painting.jpg",
        "/grey-cat.jpg",
        "https://cdn.example/lazy/photo.jpg",  # a folder's name says nothing
        "/p/clearance-sale.png",
        "//cdn.example/a.jpg",
        "relative/x.webp",
    ],
)
def test_is_not_placeholder(url):
    assert not is_placeholder(url)


def test_parse_srcset_follows_the_html_rules():
    # URLs hold commas (they end at whitespace); a trailing comma ends a URL without descriptors.
    assert parse_srcset(" https://r.example/w_300,h_200/a.jpg 300w,\n/b.jpg 2x , c.jpg (x, y) 3x,,d.jpg,e.jpg 1x") == [
        ("https://r.example/w_300,h_200/a.jpg", "300w"),
        ("/b.jpg", "2x"),
        ("c.jpg", "(x, y) 3x"),
        ("d.jpg,e.jpg", "1x"),
    ]
    assert parse_srcset("a.jpg, b.jpg 2X") == [("a.jpg", ""), ("b.jpg", "2x")]
    assert parse_srcset(" , ") == []


@pytest.mark.parametrize(
    ("srcset", "url"),
    [
        ("a.jpg 300w, b.jpg 1024w, c.jpg 2048w", "b.jpg"),  # widest up to 1024
        ("c.jpg 2048w, b.jpg 1200w", "b.jpg"),  # none fits: the narrowest
        ("a.jpg 1x, b.jpg 2x", "a.jpg"),  # what a 1x screen loads
        ("a.jpg, b.jpg 2x", "a.jpg"),  # no descriptor is 1x
        ("b.jpg 2x, c.jpg 1.5x", "c.jpg"),
        ("a.jpg 0.5x, b.jpg 0.75x", "b.jpg"),
        ("a.jpg 1x, b.jpg 600w", "b.jpg"),  # widths win in a mix
        ("a.jpg 600w 400h, b.jpg 1.5w, c.jpg 2x 3x", "a.jpg"),  # invalid candidates left out
        ("a.jpg foo", "a.jpg"),  # nothing valid: the first URL
        ("data:image/gif;base64,R0l 1x, /real.jpg 2x", "/real.jpg"),
        ("/img/{width}/a.jpg 300w", None),
        ("", None),
    ],
)
def test_pick_srcset(srcset, url):
    assert pick_srcset(srcset) == url


# --- <noscript> copies ---------------------------------------------------------------------------


def test_lexbor_parses_noscript_as_markup():
    # lexbor parses with scripting disabled: <img> inside <noscript> are elements tree.css sees.
    # (A parser with scripting on would keep them as text; parse_page handles that too, below.)
    assert webpage.NOSCRIPT_IS_MARKUP


def test_noscript_copy_of_a_lazy_image_is_dropped():
    page = parse_page(
        '<img data-src="https://cdn.example/a.jpg" src="data:," class="lazyload" alt="A">'
        '<noscript><img src="https://cdn.example/a.jpg" alt="A"></noscript>'
        '<img data-srcset="//cdn.example/b-300.jpg 300w, //cdn.example/b-800.jpg 800w" alt="B">'
        '<noscript><img src="https://cdn.example/b-300.jpg" alt=" B "></noscript>'  # another size
        '<img data-src="/c.jpg" alt="C"><noscript><img src="/c.jpg"></noscript>'  # no alt: adds nothing
        '<noscript><img src="/only.jpg" alt="only"></noscript>'  # the only copy
        '<img data-src="/d.jpg"><noscript><img src="/d.jpg" alt="D"></noscript>'  # says more: kept
        '<img src="/blank.gif" data-src="/e.jpg" alt="E"><noscript><img src="/blank.gif" alt="E"></noscript>'
    )
    assert [(i.src, i.alt) for i in page.images] == [
        ("https://cdn.example/a.jpg", "A"),
        ("//cdn.example/b-800.jpg", "B"),
        ("/c.jpg", "C"),
        ("/only.jpg", "only"),
        ("/d.jpg", None),
        ("/d.jpg", "D"),
        ("/e.jpg", "E"),
        ("/blank.gif", "E"),  # a shared placeholder makes no copy
    ]
    assert page.noscript_copies == 3  # a, b and c: counted by extract as noscript_copy


def test_noscript_as_raw_text(monkeypatch):
    # What a parser with scripting enabled gives: the <noscript> holds text, its images are parsed
    # from it (here the text is written escaped, which lexbor turns into the same text).
    monkeypatch.setattr(webpage, "NOSCRIPT_IS_MARKUP", False)
    page = parse_page(
        '<img data-src="/a.jpg" alt="A"><noscript>&lt;img src="/a.jpg" alt="A"&gt;</noscript>'
        '<noscript>&lt;IMG src="/b.jpg" alt="B"&gt;</noscript><noscript>no images</noscript>'
    )
    assert [(i.src, i.alt) for i in page.images] == [("/a.jpg", "A"), ("/b.jpg", "B")]


# --- alt text ------------------------------------------------------------------------------------


def test_alt_trims_only_ascii_whitespace():
    a, b, c, d = parse_page(
        '<img src="a.jpg" alt=" \xa0Zürich\u3000 "><img src="b.jpg" alt="\t\n x  y \r\f">'
        '<img src="c.jpg" alt="\xa0"><img src="d.jpg" alt="" title=" t\xa0u\n ">'
    ).images
    assert a.alt == "\xa0Zürich\u3000"  # NBSP and the ideographic space are text to HTML
    assert b.alt == "x  y"  # inner whitespace as written
    assert c.alt == "\xa0" and d.alt == ""
    assert d.title == "t u"  # titles still collapse all whitespace


# --- the counters in extract ---------------------------------------------------------------------


def test_extract_counts_where_kept_urls_came_from(tmp_path, monkeypatch):
    monkeypatch.setattr(extract, "known_languages", list)  # no language model to load (2 s)
    page = tmp_path / "p.html"
    page.write_text(
        '<link rel="canonical" href="https://site.example/p.html">'
        '<img src="/blank.gif" data-src="/a.jpg" alt="a"><noscript><img src="/a.jpg" alt="a"></noscript>'
        '<img src="data:," data-srcset="/b.jpg 1x" alt="b"><img srcset="/c.jpg 2x" alt="c">'
        '<img src="/d.jpg" alt="d"><img data-src="/e.jpg">'
    )
    result = extract_source(str(page), ExtractConfig(detect_lang=False))
    assert [r["url"] for r in result.table.to_pylist()] == [f"https://site.example/{c}.jpg" for c in "abcd"]
    assert result.counts["src_from_lazy"] == 2 and result.counts["src_from_srcset"] == 1
    assert result.counts["images_seen"] == 6 and result.counts["empty_alt"] == 1
    assert result.counts["noscript_copy"] == 1  # every <img> element is accounted for


# --- encodings -----------------------------------------------------------------------------------


def decoded(text: str, encoding: str, label: str | None, meta: str | None = None):
    head = f'<meta charset="{meta}">' if meta else ""
    return decode_html((head + "<p>" + text).encode(encoding), label)


@pytest.mark.parametrize(
    ("label", "text", "encoding", "codec"),
    [
        ("gb2312", "請·中山", "gbk", "gb18030"),  # 請 is GBK only; A1A4 is · (U+00B7), not ・
        ("GB_2312-80", "請", "gbk", "gb18030"),
        ("x-gbk", "€", "gb18030", "gb18030"),
        ("shift_jis", "①～Ⅲ", "cp932", "cp932"),  # NEC and Windows characters; ～ is U+FF5E
        ("x-sjis", "日本語", "cp932", "cp932"),
        ("ms_kanji", "①", "cp932", "cp932"),
        ("euc-kr", "똠방각하", "cp949", "cp949"),  # 똠 is a UHC-only syllable
        ("ks_c_5601-1987", "한국어", "cp949", "cp949"),
        ("iso-8859-1", "€ “quoted” – ok", "cp1252", "cp1252"),
        ("us-ascii", "café", "cp1252", "cp1252"),
        ("windows-874", "ภาษาไทย", "cp874", "cp874"),
        ("tis-620", "ภาษาไทย", "cp874", "cp874"),
        ("iso-8859-11", "ภาษาไทย", "cp874", "cp874"),
        ("big5", "中文", "big5hkscs", "big5hkscs"),
        ("x-x-big5", "中文", "big5hkscs", "big5hkscs"),
        ("x-cp1251", "кошка", "cp1251", "cp1251"),
        ("x-cp1250", "Łódź", "cp1250", "cp1250"),
        ("iso-8859-9", "İstanbul ‘x’", "cp1254", "cp1254"),
        ("euc-jp", "日本語", "euc_jp", "euc_jp"),
        ("iso-2022-jp", "日本語", "iso2022_jp", "iso2022_jp"),
        ("unicode-1-1-utf-8", "é", "utf-8", "utf-8"),
        ("utf8", "é", "utf-8", "utf-8"),
        ("x-user-defined", "é", "cp1252", "cp1252"),
        ("latin-1", "€", "cp1252", "cp1252"),  # not a WHATWG label; Python's, widened
        ("cp936", "請", "gbk", "gb18030"),  # the same
    ],
)
def test_labels_decode_as_browsers_do(label, text, encoding, codec):
    for http, meta in ((label, None), (None, label)):
        result = decoded(text, encoding, http, meta)
        assert (result.text.rsplit("<p>", 1)[1], result.encoding, result.problem) == (text, codec, None)


def test_bytes_python_rejects_but_the_standard_maps():
    assert decode_html(b"<p>\x81\x8d\x9d", "iso-8859-1").text == "<p>\x81\x8d\x9d"  # windows-1252 C1
    assert decode_html(b"<p>\x98", "windows-1251").text == "<p>\x98"
    assert decode_html(b"<p>\x80", "gbk").text == "<p>€"  # gb18030's decoder reads 0x80 as €
    assert decode_html(b"<p>\xa3\xe1", "big5").text == "<p>€"
    result = decode_html(b"<p>\xad\xa1\xad\xa2 \xf9\xa1", "euc-jp")  # NEC row 13, IBM rows
    assert (result.text, result.problem) == ("<p>①② 纊", None)


def test_control_bytes_are_counted_as_defined_at_the_threshold():
    # C0 controls but tab, LF, FF, CR, and DEL; more than 1% of the bytes is binary. Each control
    # byte, and each whitespace byte that is not one, at exactly 1% and one byte past it.
    controls = [b for b in range(256) if b < 32 and b not in (9, 10, 12, 13) or b == 127]
    assert len(controls) == 29
    for byte in range(256):
        for n in (10, 11):
            body = b"a" * (1000 - n) + bytes([byte]) * n
            binary = byte in controls and n * 100 > len(body)
            assert webpage.too_many_controls(body) is binary, (byte, n)
            assert (decode_html(body, "utf-8").problem == "undecodable") is binary
    # Whitespace that crosses 1% does not make controls under 1% binary, nor hide controls over it.
    page = b"<p>x\n" * 300 + b"\x01" * 10
    assert not webpage.too_many_controls(page) and webpage.too_many_controls(page + b"\x0b" * 30)
    assert not webpage.too_many_controls(b"")
    assert webpage.too_many_controls(b"\x1b" * 5 + b"a" * 95) and not webpage.too_many_controls(b"\x1b" * 5, True)


def test_iso2022jp_escapes_are_not_binary():
    body = "".join(f"<p>日本{i}<b>語</b>" for i in range(50)).encode("iso2022_jp")
    assert body.count(b"\x1b") * 100 > len(body)  # more than 1% ESC bytes
    result = decode_html(body, "csiso2022jp")
    assert result.text.startswith("<p>日本0<b>語</b><p>日本1") and result.problem is None
    assert decode_html(body, None).problem == "undecodable"  # undeclared, ESC is just a control byte


def test_utf16_and_replacement_labels():
    body = "<p>é".encode("utf-16-le")
    assert (decode_html(body, "utf-16").text, decode_html(body, "unicode").problem) == ("<p>é", None)
    assert decode_html("<p>é".encode("utf-16-be"), "utf-16be").text == "<p>é"
    assert decode_html(b'<meta charset="utf-16be"><p>\xc3\xa9', None).text.endswith("é")  # ASCII: UTF-8
    # ISO-2022-KR, HZ and ISO-2022-CN decode to one U+FFFD in browsers: nothing to read.
    for label in ("iso-2022-kr", "hz-gb-2312", "ISO-2022-CN-ext", "replacement"):
        assert decode_html(b"<p><img src=a.jpg>", label).problem == "undecodable"
    assert decode_html(b'<meta charset="hz-gb-2312"><p>', None).problem == "undecodable"
    assert decode_html(codecs.BOM_UTF8 + b"<p>", "hz-gb-2312").problem is None  # a BOM wins


def test_unknown_and_misused_labels():
    for label in ("no-such", "utf-7", "utf-32", "hex", "base64", "rot13", "cp037", "K\u212aOI8-R", "hz", "iso2022kr"):
        assert codec_name(label) is None, label
        assert decode_html(b"<p>ok", label).problem == "bad_encoding"
    assert codec_name(' "Shift_JIS" ') == "cp932" and codec_name("\tUTF-8\n") == "utf-8"
    assert codec_name(None) is None and codec_name("") is None


def test_declared_encoding_with_bad_bytes_reads_as_declared():
    # A Shift_JIS page with an unassigned character: the rest stays Japanese (not UTF-8 mojibake).
    body = "<p>日本語".encode("cp932") + b"\x85\x40" + "のページ".encode("cp932")
    result = decode_html(body, "shift_jis")
    assert (result.text, result.encoding, result.problem) == ("<p>日本語\ufffd@のページ", "cp932", "bad_encoding")
    # a page mislabelled as Shift_JIS but in UTF-8 is still read as UTF-8
    assert decode_html("<p>日本語".encode(), "shift_jis").text == "<p>日本語"


def test_label_table_is_complete_and_resolves():
    labels = [label for names in WHATWG_LABELS.values() for label in names]
    assert len(labels) == len(set(labels)) == 228
    for name, names in WHATWG_LABELS.items():
        codec = webpage._PYTHON_CODECS[name]
        if codec != webpage.REPLACEMENT:
            codecs.lookup(codec)
        assert {codec_name(label.upper()) for label in names} == {codec}, name


def test_label_table_matches_webencodings_and_the_changes_since():
    # webencodings (html5lib's table, a test dependency) froze the standard of 2017; the standard
    # since moved HZ and ISO-2022-KR to "replacement" and added labels. Anything else that differs
    # is a mistake in our table.
    from webencodings.labels import LABELS

    ours = {label: name for name, names in WHATWG_LABELS.items() for label in names}
    theirs = {label: name.lower() for label, name in LABELS.items()}
    changed = {label for label in theirs if ours.get(label) != theirs[label]}
    assert changed == {"hz-gb-2312", "iso-2022-kr", "csiso2022kr"}
    assert {ours[label] for label in changed} == {"replacement"}
    added = set(ours) - set(theirs)
    assert added == {"csunicode", "iso-10646-ucs-2", "iso-2022-cn", "iso-2022-cn-ext", "koi8-ru", "ms932",
                     "replacement", "ucs-2", "unicode", "unicode11utf8", "unicode20utf8", "unicodefeff",
                     "unicodefffe", "x-unicode20utf8"}  # fmt: skip


def test_utf8_pages_are_parsed_from_their_bytes_with_the_same_result():
    html = '<base href="/b/"><figure><img src="a.jpg" alt=" Ünïcödé 中文 "><figcaption>c</figcaption></figure>'
    d = decode_html(html.encode("utf-8"), "utf-8")
    assert d.utf8 == d.text.encode("utf-8") and d.markup is d.utf8
    assert parse_page(d.markup) == parse_page(d.text)
    # Any other codec (a BOM'd UTF-8 page included) hands the parser the text.
    for body, label in ((html.encode("cp1252", "replace"), "windows-1252"), (b"\xef\xbb\xbf" + html.encode(), None)):
        d = decode_html(body, label)
        assert d.utf8 is None and d.markup is d.text
