"""One HTML page: its bytes decoded to text, then its `<img>` tags read with selectolax (lexbor).

Data flow: ``bytes --decode_html--> str --parse_page--> ParsedPage(base_href, canonical, images)``.
An :class:`ImgTag` is what the page says, nothing more: the chosen source URL as written
(relative or not) and the attribute it came from, alt, title, the enclosing figure's caption, and
the declared size. Deciding which images become candidates, and why the others do not, is
``extract``'s job.

Decoding follows the order browsers use (a BOM, then the HTTP header's charset, then a
``<meta charset>`` in the first bytes, then UTF-8), trying each declared encoding strictly before
falling back to UTF-8, then to the first declared encoding with replacement characters. Charset
labels mean what the WHATWG Encoding Standard says they mean (:data:`WHATWG_LABELS`): ``gb2312``
is GBK, ``shift_jis`` is Windows-31J, ``euc-kr`` is UHC, ``iso-8859-1`` is windows-1252. Only
bytes that are clearly not text (more than 1% control bytes; ESC is text in ISO-2022-JP) make a
page ``undecodable``, and so does a label the standard maps to its "replacement" encoding
(ISO-2022-KR, HZ, ISO-2022-CN: browsers show one U+FFFD for the whole page).

Source choice (:func:`choose_src`), for lazy-loading pages whose ``src`` is a placeholder:

1. a lazy-loading attribute (:data:`LAZY_SRC_ATTRS`, then :data:`LAZY_SRCSET_ATTRS`) holding a
   URL wins over ``src``: it is what the page's script loads;
2. else ``src``, unless it looks like a placeholder (:func:`is_placeholder`);
3. else the ``srcset`` candidate :func:`pick_srcset` picks;
4. else ``src`` even if it looks like a placeholder (a ``data:`` URI is then skipped by extract).

``<noscript>`` copies of a lazy image (``<img data-src=X><noscript><img src=X></noscript>``)
are dropped; a ``<noscript>`` image that is the only copy is kept.
"""

from __future__ import annotations

import codecs
import functools
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from selectolax.lexbor import LexborHTMLParser

# How far into the page a <meta charset> is looked for (the HTML standard's prescan reads 1024
# bytes; real pages put long <script> blocks first often enough that a little more pays).
PRESCAN_BYTES = 4096
_META_CHARSET = re.compile(rb"""<meta[^>]{0,512}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:\-]+)""", re.I)

# --- encodings -----------------------------------------------------------------------------------

# The WHATWG Encoding Standard's labels (https://encoding.spec.whatwg.org/#names-and-labels), by
# the encoding's name. Checked label for label against the `webencodings` package's table (0.6.1).
WHATWG_LABELS: dict[str, tuple[str, ...]] = {
    "utf-8": ("unicode-1-1-utf-8", "unicode11utf8", "unicode20utf8", "utf-8", "utf8", "x-unicode20utf8"),
    "ibm866": ("866", "cp866", "csibm866", "ibm866"),
    "iso-8859-2": (
        *("csisolatin2", "iso-8859-2", "iso-ir-101", "iso8859-2", "iso88592", "iso_8859-2", "iso_8859-2:1987"),
        *("l2", "latin2"),
    ),
    "iso-8859-3": (
        *("csisolatin3", "iso-8859-3", "iso-ir-109", "iso8859-3", "iso88593", "iso_8859-3", "iso_8859-3:1988"),
        *("l3", "latin3"),
    ),
    "iso-8859-4": (
        *("csisolatin4", "iso-8859-4", "iso-ir-110", "iso8859-4", "iso88594", "iso_8859-4", "iso_8859-4:1988"),
        *("l4", "latin4"),
    ),
    "iso-8859-5": (
        *("csisolatincyrillic", "cyrillic", "iso-8859-5", "iso-ir-144", "iso8859-5", "iso88595", "iso_8859-5"),
        "iso_8859-5:1988",
    ),
    "iso-8859-6": (
        *("arabic", "asmo-708", "csiso88596e", "csiso88596i", "csisolatinarabic", "ecma-114", "iso-8859-6"),
        *("iso-8859-6-e", "iso-8859-6-i", "iso-ir-127", "iso8859-6", "iso88596", "iso_8859-6", "iso_8859-6:1987"),
    ),
    "iso-8859-7": (
        *("csisolatingreek", "ecma-118", "elot_928", "greek", "greek8", "iso-8859-7", "iso-ir-126", "iso8859-7"),
        *("iso88597", "iso_8859-7", "iso_8859-7:1987", "sun_eu_greek"),
    ),
    "iso-8859-8": (
        *("csiso88598e", "csisolatinhebrew", "hebrew", "iso-8859-8", "iso-8859-8-e", "iso-ir-138", "iso8859-8"),
        *("iso88598", "iso_8859-8", "iso_8859-8:1988", "visual"),
    ),
    "iso-8859-8-i": ("csiso88598i", "iso-8859-8-i", "logical"),
    "iso-8859-10": ("csisolatin6", "iso-8859-10", "iso-ir-157", "iso8859-10", "iso885910", "l6", "latin6"),
    "iso-8859-13": ("iso-8859-13", "iso8859-13", "iso885913"),
    "iso-8859-14": ("iso-8859-14", "iso8859-14", "iso885914"),
    "iso-8859-15": ("csisolatin9", "iso-8859-15", "iso8859-15", "iso885915", "iso_8859-15", "l9"),
    "iso-8859-16": ("iso-8859-16",),
    "koi8-r": ("cskoi8r", "koi", "koi8", "koi8-r", "koi8_r"),
    "koi8-u": ("koi8-ru", "koi8-u"),
    "macintosh": ("csmacintosh", "mac", "macintosh", "x-mac-roman"),
    "windows-874": ("dos-874", "iso-8859-11", "iso8859-11", "iso885911", "tis-620", "windows-874"),
    "windows-1250": ("cp1250", "windows-1250", "x-cp1250"),
    "windows-1251": ("cp1251", "windows-1251", "x-cp1251"),
    "windows-1252": (
        *("ansi_x3.4-1968", "ascii", "cp1252", "cp819", "csisolatin1", "ibm819", "iso-8859-1", "iso-ir-100"),
        *("iso8859-1", "iso88591", "iso_8859-1", "iso_8859-1:1987", "l1", "latin1", "us-ascii", "windows-1252"),
        "x-cp1252",
    ),
    "windows-1253": ("cp1253", "windows-1253", "x-cp1253"),
    "windows-1254": (
        *("cp1254", "csisolatin5", "iso-8859-9", "iso-ir-148", "iso8859-9", "iso88599", "iso_8859-9"),
        *("iso_8859-9:1989", "l5", "latin5", "windows-1254", "x-cp1254"),
    ),
    "windows-1255": ("cp1255", "windows-1255", "x-cp1255"),
    "windows-1256": ("cp1256", "windows-1256", "x-cp1256"),
    "windows-1257": ("cp1257", "windows-1257", "x-cp1257"),
    "windows-1258": ("cp1258", "windows-1258", "x-cp1258"),
    "x-mac-cyrillic": ("x-mac-cyrillic", "x-mac-ukrainian"),
    "gbk": ("chinese", "csgb2312", "csiso58gb231280", "gb2312", "gb_2312", "gb_2312-80", "gbk", "iso-ir-58", "x-gbk"),
    "gb18030": ("gb18030",),
    "big5": ("big5", "big5-hkscs", "cn-big5", "csbig5", "x-x-big5"),
    "euc-jp": ("cseucpkdfmtjapanese", "euc-jp", "x-euc-jp"),
    "iso-2022-jp": ("csiso2022jp", "iso-2022-jp"),
    "shift_jis": ("csshiftjis", "ms932", "ms_kanji", "shift-jis", "shift_jis", "sjis", "windows-31j", "x-sjis"),
    "euc-kr": (
        *("cseuckr", "csksc56011987", "euc-kr", "iso-ir-149", "korean", "ks_c_5601-1987", "ks_c_5601-1989"),
        *("ksc5601", "ksc_5601", "windows-949"),
    ),
    "replacement": ("csiso2022kr", "hz-gb-2312", "iso-2022-cn", "iso-2022-cn-ext", "iso-2022-kr", "replacement"),
    "utf-16be": ("unicodefffe", "utf-16be"),
    "utf-16le": ("csunicode", "iso-10646-ucs-2", "ucs-2", "unicode", "unicodefeff", "utf-16", "utf-16le"),
    "x-user-defined": ("x-user-defined",),
}
# The Python codec for each WHATWG encoding. Where names differ in meaning, the Python codec is the
# one whose table is the standard's: GBK's decoder *is* gb18030's; Shift_JIS's index is Windows'
# (cp932: ①, ～ U+FF5E); EUC-KR's is UHC (cp949); Big5's includes HKSCS. x-user-defined (bytes
# 0x80-0xFF as private-use characters) only comes from an HTTP header - a <meta> saying it means
# windows-1252 - and its text would be useless, so it is read as windows-1252 too.
REPLACEMENT = "replacement"  # ISO-2022-KR, HZ, ISO-2022-CN: browsers show one U+FFFD, no markup
_PYTHON_CODECS = {
    "utf-8": "utf-8",
    "ibm866": "cp866",
    "iso-8859-8-i": "iso8859-8",
    "koi8-r": "koi8-r",
    "koi8-u": "koi8-u",
    "macintosh": "mac-roman",
    "windows-874": "cp874",
    "x-mac-cyrillic": "mac-cyrillic",
    "gbk": "gb18030",
    "gb18030": "gb18030",
    "big5": "big5hkscs",
    "euc-jp": "euc_jp",
    "iso-2022-jp": "iso2022_jp",
    "shift_jis": "cp932",
    "euc-kr": "cp949",
    "replacement": REPLACEMENT,
    "utf-16be": "utf-16-be",
    "utf-16le": "utf-16-le",
    "x-user-defined": "cp1252",
    **{f"iso-8859-{n}": f"iso8859-{n}" for n in (2, 3, 4, 5, 6, 7, 8, 10, 13, 14, 15, 16)},
    **{f"windows-{n}": f"cp{n}" for n in range(1250, 1259)},
}
_LABEL_CODECS = {label: _PYTHON_CODECS[name] for name, labels in WHATWG_LABELS.items() for label in labels}
# A label the standard does not know is still read when Python knows it (`cp936`, `latin-1`,
# `euc-cn`): a browser would fall back to its locale's encoding, which is the label's encoding more
# often than UTF-8 is. The codec is then widened the way the standard widens it.
_PYTHON_WIDENED = {
    "ascii": "cp1252",
    "latin-1": "cp1252",
    "iso8859-1": "cp1252",
    "iso8859-9": "cp1254",
    "iso8859-11": "cp874",
    "tis-620": "cp874",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "big5": "big5hkscs",
    "cp950": "big5hkscs",
    "shift_jis": "cp932",
    "euc_kr": "cp949",
}
# Python codecs that read text but are no page encoding (UTF-7 is excluded by the standard).
# ISO-2022-KR and HZ are "replacement" under their standard labels; other spellings are ignored.
_NOT_PAGE_CODECS = {
    "utf-7",
    "undefined",
    "idna",
    "punycode",
    "unicode-escape",
    "raw-unicode-escape",
    "iso2022_kr",
    "hz",
}
_ASCII_PROBE = '<meta charset="x"><img src="/a-b_c.jpg?x=1&y=2#z" alt=\'A;B\'>'
# A <meta> that claims UTF-16 was found by an ASCII scan, so the bytes are not UTF-16.
_UTF16 = {"utf-16", "utf-16-le", "utf-16-be"}
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _c1_control(data: bytes, at: int) -> tuple[str, int] | None:
    # The standard's windows-* indexes give the bytes 0x80-0x9F Windows leaves unassigned their C1
    # code points (windows-1252's 0x81 is U+0081); Python's cp125x codecs reject them.
    return (chr(data[at]), at + 1) if 0x80 <= data[at] <= 0x9F else None


def _gb18030_euro(data: bytes, at: int) -> tuple[str, int] | None:
    return ("€", at + 1) if data[at] == 0x80 else None  # the standard's gb18030 decoder: 0x80 is €


def _big5_euro(data: bytes, at: int) -> tuple[str, int] | None:
    return ("€", at + 2) if data[at : at + 2] == b"\xa3\xe1" else None  # in the standard's Big5 index


def _eucjp_as_cp932(data: bytes, at: int) -> tuple[str, int] | None:
    # The standard's EUC-JP reads JIS X 0208 through the same index as Shift_JIS, NEC and IBM rows
    # included (① is 0xADA1); Python's euc_jp lacks them. Rewrite the JIS code as Shift_JIS.
    pair = data[at : at + 2]
    if len(pair) < 2 or not (0xA1 <= pair[0] <= 0xFE and 0xA1 <= pair[1] <= 0xFE):
        return None
    row, cell = pair[0] - 0x80, pair[1] - 0x80
    lead = (row + 1) // 2 + 0x70
    lead += 0x40 if lead > 0x9F else 0
    trail = cell + (0x1F + (cell >= 0x60) if row % 2 else 0x7E)
    try:
        return bytes((lead, trail)).decode("cp932"), at + 2
    except UnicodeDecodeError:
        return None


_FIXES = {
    "gb18030": _gb18030_euro,
    "big5hkscs": _big5_euro,
    "euc_jp": _eucjp_as_cp932,
    **{codec: _c1_control for codec in ("cp874", *(f"cp{n}" for n in range(1250, 1259)))},
}


def _register_fix(codec: str, fix, replace: bool) -> str:
    def handler(err: UnicodeError) -> tuple[str, int]:
        if isinstance(err, UnicodeDecodeError) and (fixed := fix(err.object, err.start)) is not None:
            return fixed
        if replace:
            return "\ufffd", err.end
        raise err

    name = f"wit-whatwg-{codec}{'-replace' if replace else ''}"
    codecs.register_error(name, handler)
    return name


_ERRORS = {(codec, replace): _register_fix(codec, fix, replace) for codec, fix in _FIXES.items() for replace in (0, 1)}


def _decode(body: bytes, codec: str, replace: bool = False) -> str:
    """``body`` in ``codec`` as the standard decodes it; UnicodeDecodeError unless ``replace``."""
    return body.decode(codec, _ERRORS.get((codec, replace), "replace" if replace else "strict"))


BAD_ENCODING = "bad_encoding"
UNDECODABLE = "undecodable"

# --- image sources -------------------------------------------------------------------------------

# Where lazy-loading scripts keep the real URL while `src` holds a placeholder, most common first:
# lazysizes, lozad, vanilla-lazyload and most others (data-src); WP Rocket, a3 Lazy Load
# (data-lazy-src); jQuery lazyload (data-original); Revolution Slider (data-lazyload); slick
# (data-lazy); mod_pagespeed (data-pagespeed-lazy-src); echo.js (data-echo); Zhihu
# (data-actualsrc); Taobao's KISSY (data-ks-lazyload). Not data-url/data-image/data-hi-res-src:
# sites use those for links, lightboxes and share buttons as often as for the image shown.
LAZY_SRC_ATTRS = (
    "data-src",
    "data-lazy-src",
    "data-original",
    "data-lazyload",
    "data-lazy",
    "data-pagespeed-lazy-src",
    "data-echo",
    "data-actualsrc",
    "data-ks-lazyload",
)
LAZY_SRCSET_ATTRS = ("data-srcset", "data-lazy-srcset", "data-pagespeed-lazy-srcset")
SRC_ATTRS = ("src", *LAZY_SRC_ATTRS)
SRCSET_ATTRS = ("srcset", *LAZY_SRCSET_ATTRS)
_CHOICE_ATTRS = frozenset(SRC_ATTRS[1:] + SRCSET_ATTRS)  # without any of them, src it is
# pick_srcset: the widest `w` candidate up to this many pixels (else the narrowest).
SRCSET_MAX_WIDTH = 1024

# URLs strip what the URL parser strips (C0 controls and space), not Python's whitespace.
_URL_STRIP = "".join(map(chr, range(0x21)))
# HTML's ASCII whitespace: TAB, LF, FF, CR, SPACE (not NBSP, not U+3000).
_ASCII_WS = "\t\n\f\r "
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
# Placeholder file names (see is_placeholder): words that mark one wherever they stand in the
# name, and words that do only as the whole name or in a GIF's name.
_PLACEHOLDER_WORDS = frozenset(
    {"placeholder", "lazy", "lazyload", "lazyloader", "spacer", "spinner", "preloader", "1x1"}
)
_PLACEHOLDER_NAMES = frozenset(
    {"blank", "empty", "pixel", "transparent", "trans", "clear", "grey", "gray", "loading", "loader", "dummy", "px"}
)
_NAME_WORDS = re.compile(r"[a-z0-9]+")
# A srcset candidate's URL: past whitespace and commas, up to whitespace (commas and all).
_SRCSET_URL = re.compile(r"[\t\n\f\r ,]*([^\t\n\f\r ]+)")
_DESCRIPTOR = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([wxh])")
_DIMENSION = re.compile(r"\s*\+?(\d+)(?:\.\d*)?\s*(%?)")
_INT32_MAX = 2**31 - 1


@dataclass(slots=True)
class Decoded:
    text: str | None  # None when undecodable
    encoding: str
    problem: str | None = None  # None, BAD_ENCODING (decoded with replacements) or UNDECODABLE
    # The page's bytes when they are strict UTF-8, i.e. exactly ``text.encode()``: what the parser
    # reads (selectolax would otherwise encode the text back to UTF-8, a third of its parse time).
    utf8: bytes | None = None

    @property
    def markup(self) -> str | bytes | None:
        """What :func:`parse_page` takes: the UTF-8 bytes when there are, else the text."""
        return self.utf8 if self.utf8 is not None else self.text


class ImgTag(NamedTuple):
    """One ``<img>`` as the page writes it (a tuple: a page's images are made by the tens of thousands)."""

    src: str | None  # as written (stripped); None when no source attribute has a value
    alt: str | None  # None when the attribute is missing; HTML's ASCII whitespace trimmed
    title: str | None = None
    caption: str | None = None  # the enclosing <figure>'s <figcaption>, whitespace collapsed
    width: int | None = None  # declared in the tag, in CSS pixels; None when absent or a percentage
    height: int | None = None
    # The attribute `src` came from: "src", "srcset", or a lazy-loading one ("data-src",
    # "data-srcset", ... see choose_src); None when there is no source.
    src_attr: str | None = "src"


_new_tag = functools.partial(tuple.__new__, ImgTag)  # ImgTag from one tuple, without the keyword handling


@dataclass(slots=True)
class ParsedPage:
    base_href: str | None = None
    canonical: str | None = None
    images: list[ImgTag] = field(default_factory=list)
    # <noscript> copies of an image the page shows anyway, left out of ``images`` (counted by
    # extract as ``noscript_copy``, so that every <img> element is accounted for).
    noscript_copies: int = 0


# --- decoding ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def codec_name(label: str | None) -> str | None:
    """The Python codec for a charset label as the WHATWG Encoding Standard reads it, or None when
    the label is unknown. :data:`REPLACEMENT` for labels browsers refuse to decode."""
    if not label:
        return None
    label = label.strip(_ASCII_WS).strip("\"'").strip(_ASCII_WS)
    if not label.isascii():
        return None
    label = label.lower()
    name = _LABEL_CODECS.get(label)
    if name is not None:
        return name
    try:
        info = codecs.lookup(label)
        name = _PYTHON_WIDENED.get(info.name, info.name)
        if name in _NOT_PAGE_CODECS or _ASCII_PROBE.encode(name) != _ASCII_PROBE.encode("ascii"):
            return None
    except (LookupError, UnicodeError):
        return None
    return name


def meta_charset(body: bytes) -> str | None:
    m = _META_CHARSET.search(body, 0, PRESCAN_BYTES)
    return m.group(1).decode("ascii") if m else None


def _declared(body: bytes, http_charset: str | None) -> tuple[list[str], bool]:
    """Codecs the page declares, in priority order, and whether some declared label was bogus."""
    for bom, name in _BOMS:
        if body.startswith(bom):
            return [name], False
    names, bogus = [], False
    for label, from_meta in ((http_charset, False), (meta_charset(body), True)):
        name = codec_name(label)
        if label and name is None:
            bogus = True
        elif name is not None:
            names.append("utf-8" if from_meta and name in _UTF16 else name)
    return names, bogus


_NINE = np.uint8(9)


def too_many_controls(data: bytes, escapes_are_text: bool = False) -> bool:
    """Whether more than 1% of ``data`` is control bytes: C0 controls other than tab, newline, form
    feed and carriage return, and DEL. Text in any charset has almost none; compressed or binary
    data about 11%. ``escapes_are_text``: ESC is not counted (ISO-2022-JP switches charsets with it).

    Counted with numpy's vectorised compares (about twice as fast as bytes.translate), first all
    C0 bytes and DEL, an upper bound that settles most pages; whitespace is taken out only when it
    does not."""
    a = np.frombuffer(data, dtype=np.uint8)
    count = int(np.count_nonzero(a < 32)) + int(np.count_nonzero(a == 127))
    if count * 100 <= len(data):
        return False
    # less tab, newline, VT, form feed, carriage return (9-13); VT (11) is a control after all
    count += int(np.count_nonzero(a == 11)) - int(np.count_nonzero((a - _NINE) < 5))
    if escapes_are_text:
        count -= int(np.count_nonzero(a == 27))
    return count * 100 > len(data)


def decode_html(body: bytes, http_charset: str | None = None) -> Decoded:
    """Decode a page as a browser would; see the module docstring."""
    names, bogus = _declared(body, http_charset)
    if names and names[0] == REPLACEMENT:
        return Decoded(None, REPLACEMENT, UNDECODABLE)
    names = [n for n in names if n != REPLACEMENT]
    # Text in a wrong encoding is still mostly markup with readable URLs; binary (an image or an
    # archive served as text/html) is full of control bytes that no text encoding uses.
    wide = bool(names) and names[0] in _UTF16  # a BOM or the HTTP header says so; its NULs are text
    if not wide and too_many_controls(body, escapes_are_text=bool(names) and names[0].startswith("iso2022")):
        return Decoded(None, "utf-8", UNDECODABLE)
    for name in [*names, "utf-8"]:
        try:
            text = _decode(body, name)
        except UnicodeDecodeError:
            continue
        return Decoded(text, name, BAD_ENCODING if bogus else None, body if name == "utf-8" else None)
    # Neither what the page says nor UTF-8 reads cleanly: a browser reads what the page says.
    name = names[0] if names else "utf-8"
    return Decoded(_decode(body, name, replace=True), name, BAD_ENCODING)


# --- <img> attributes ----------------------------------------------------------------------------


def parse_dimension(value: str | None) -> int | None:
    """An HTML width/height attribute in pixels ("64", " 64px", "64.5"); None for "50%" or junk."""
    if value is None:
        return None
    if len(value) < 10 and value.isascii() and value.isdigit():
        return int(value)  # "300", most of them: what the pattern would read, without it
    m = _DIMENSION.match(value)
    if m is None or m.group(2):
        return None
    n = int(m.group(1))
    return n if n <= _INT32_MAX else None


def strip_html_whitespace(value: str | None) -> str | None:
    """``value`` less leading and trailing ASCII whitespace, as HTML trims (NBSP, U+3000 stay)."""
    return value.strip(_ASCII_WS) if value is not None else None


def _url(value: str | None) -> str | None:
    if value is None:
        return None
    return value.strip(_URL_STRIP) or None


def _fetchable(url: str) -> bool:
    """A URL a script could load as the image: relative or http(s), no template (`{width}`), and
    with a dot or slash (`true`, `1` and `lazy` are flags, not URLs)."""
    m = _SCHEME.match(url)
    if m is not None and m.group(1).lower() not in ("http", "https"):
        return False
    return url[0] != "#" and "{" not in url and "}" not in url and ("." in url or "/" in url)


def is_placeholder(url: str | None) -> bool:
    """Whether a ``src`` looks like a lazy-loading placeholder rather than the image.

    Sure signs: nothing, a fragment, a ``data:`` URI or any other non-http(s) scheme
    (``about:blank``, ``javascript:``). Then by file name, split into words at non-alphanumerics:
    ``placeholder``, ``lazy``, ``lazyload``, ``spacer``, ``spinner``, ``preloader``, ``1x1``
    anywhere (``lazy_placeholder.gif``, ``1x1.trans.gif``); ``blank``, ``empty``, ``pixel``,
    ``transparent``, ``trans``, ``clear``, ``grey``, ``gray``, ``loading``, ``loader``,
    ``dummy``, ``px`` only as the whole name (``blank.gif``) or in a GIF's name (``grey-bg.gif``),
    since photos are called ``pixel-7-review.jpg``. The guess only decides between ``src`` and
    ``srcset`` (a lazy attribute wins over ``src`` anyway), and a placeholder ``src`` is still
    returned when the tag offers nothing else, so a wrong guess costs little.
    """
    if not url or url[0] == "#":
        return True
    m = _SCHEME.match(url)
    if m is not None and m.group(1).lower() not in ("http", "https"):
        return True
    name = url.split("#", 1)[0].split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    stem, _, ext = name.rpartition(".") if "." in name else (name, "", "")
    words = _NAME_WORDS.findall(stem)
    if not words:
        return False
    if _PLACEHOLDER_WORDS.intersection(words):
        return True
    if "-".join(words) in _PLACEHOLDER_NAMES or "".join(words) in _PLACEHOLDER_NAMES:
        return True
    return ext == "gif" and bool(_PLACEHOLDER_NAMES.intersection(words))


def parse_srcset(value: str) -> list[tuple[str, str]]:
    """``(url, descriptors)`` of each candidate of a ``srcset``, as the HTML standard splits it:
    a URL runs to whitespace (it may hold commas); a URL ending in commas has no descriptors;
    descriptors run to the next comma outside parentheses. Descriptors are lower-cased."""
    out: list[tuple[str, str]] = []
    pos, n = 0, len(value)
    while (m := _SRCSET_URL.match(value, pos)) is not None:
        url, pos = m.group(1), m.end()
        descriptors = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            end = value.find(",", pos)
            end = n if end < 0 else end
            if "(" in value[pos:end]:  # a comma inside parentheses does not end the descriptors
                end, depth = pos, 0
                while end < n and (value[end] != "," or depth):
                    if value[end] == "(":
                        depth += 1
                    elif value[end] == ")" and depth:
                        depth -= 1
                    end += 1
            descriptors, pos = value[pos:end].strip(_ASCII_WS).lower(), end
        if url:
            out.append((url, descriptors))
    return out


def _descriptor(descriptors: str) -> tuple[str, float] | None:
    """("w", width) or ("x", density) of a candidate (none: 1x); None when invalid."""
    kinds: dict[str, float] = {}
    for token in descriptors.split():
        m = _DESCRIPTOR.fullmatch(token)
        if m is None or m.group(2) in kinds or (m.group(2) == "w" and "." in m.group(1)):
            return None
        kinds[m.group(2)] = float(m.group(1))
    kinds.pop("h", None)
    if len(kinds) > 1 or kinds.get("w") == 0 or kinds.get("x") == 0:
        return None
    return next(iter(kinds.items()), ("x", 1.0))


def pick_srcset(srcset: str | None) -> str | None:
    """The URL taken from a ``srcset``: among width candidates the widest up to
    :data:`SRCSET_MAX_WIDTH` (else the narrowest), among density candidates the lowest density of
    at least 1x (else the highest) - what a 1x screen loads, the image ``src`` usually names, large
    enough for training and never the 3000-pixel original. Width candidates win over density ones
    in a (non-conforming) mix. Placeholders, templates and candidates with invalid descriptors are
    left out; if no candidate has a valid descriptor, the first usable URL is returned."""
    if not srcset:
        return None
    urls = [(url, d) for url, d in parse_srcset(srcset) if _fetchable(url) and not is_placeholder(url)]
    valid = []
    for url, descriptors in urls:
        if (kind_value := _descriptor(descriptors)) is not None:
            valid.append((url, *kind_value))
    if not valid:
        return urls[0][0] if urls else None
    widths = [c for c in valid if c[1] == "w"]
    if widths:
        fitting = [c for c in widths if c[2] <= SRCSET_MAX_WIDTH]
        return max(fitting, key=lambda c: c[2])[0] if fitting else min(widths, key=lambda c: c[2])[0]
    dense = [c for c in valid if c[2] >= 1]
    return min(dense, key=lambda c: c[2])[0] if dense else max(valid, key=lambda c: c[2])[0]


def choose_src(attrs: dict[str, str | None]) -> tuple[str | None, str | None]:
    """``(url, attribute)``: the image's URL as written and the attribute it came from, by the
    order in the module docstring. ``(None, None)`` when no source attribute has a value."""
    src = _url(attrs.get("src"))
    if _CHOICE_ATTRS.isdisjoint(attrs):
        return (src, "src") if src is not None else (None, None)  # most images: nothing to choose
    lazy = None
    for name in LAZY_SRC_ATTRS:
        if (url := _url(attrs.get(name))) is not None and _fetchable(url):
            lazy = url, name
            break
    else:
        for name in LAZY_SRCSET_ATTRS:
            if (url := pick_srcset(attrs.get(name))) is not None:
                lazy = url, name
                break
    if lazy is not None:
        return (src, "src") if lazy[0] == src else lazy
    if src is not None and ("srcset" not in attrs or not is_placeholder(src)):
        return src, "src"
    if (url := pick_srcset(attrs.get("srcset"))) is not None:
        return url, "srcset"
    return (src, "src") if src is not None else (None, None)


def _source_urls(attrs: dict[str, str | None]) -> list[str]:
    """Every URL an <img> names: src, the lazy attributes, each srcset candidate."""
    urls = [u for name in SRC_ATTRS if (u := _url(attrs.get(name))) is not None]
    for name in SRCSET_ATTRS:
        if value := attrs.get(name):
            urls.extend(url for url, _ in parse_srcset(value))
    return urls


def _source_keys(attrs: dict[str, str | None]) -> set[str]:
    """Every real image URL an <img> names (no placeholder, nothing unfetchable), scheme-less."""
    return {_scheme_less(u) for u in _source_urls(attrs) if _fetchable(u) and not is_placeholder(u)}


def _raw_source_keys(attrs: dict[str, str | None]) -> set[str]:
    """:func:`_source_keys` with placeholders and all: to match against keys that function gave
    (a key's filter depends on the key alone), without paying for the filter twice."""
    return {_scheme_less(u) for u in _source_urls(attrs) if u}


def _scheme_less(url: str) -> str:
    lower = url[:6].lower()
    return url[6:] if lower == "https:" else url[5:] if lower.startswith("http:") else url


# --- the page ------------------------------------------------------------------------------------


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = " ".join(value.split())
    return value or None


def _captions(figures: list) -> dict[int, str]:
    """Caption text by img node id, for images inside a <figure> that has a <figcaption>."""
    captions: dict[int, str] = {}
    for figure in figures:
        # One walk of the figure's (small) subtree finds its first <figcaption> and its images:
        # a css() call per figure would compile its selector each time, which costs more.
        caption, images = None, []
        for node in figure.traverse():
            tag = node.tag
            if tag == "img":
                images.append(node.mem_id)
            elif tag == "figcaption" and caption is None:
                caption = node
        text = _clean(caption.text(deep=True, separator="")) if caption is not None else None
        if text:
            # Figures come in document order, so a nested figure's caption overwrites its parent's.
            for node_id in images:
                captions[node_id] = text
    return captions


def _canonical(links: list) -> str | None:
    for link in links:
        attrs = link.attributes
        if "canonical" in (attrs.get("rel") or "").lower().split() and attrs.get("href"):
            return attrs["href"].strip() or None
    return None


def _noscript_is_markup() -> bool:
    # lexbor parses with scripting disabled, so <noscript> content is elements; a parser with
    # scripting enabled keeps it as raw text, and the images in it must be parsed from that text.
    return LexborHTMLParser("<body><noscript><img src=a.png></noscript>").css_first("noscript img") is not None


NOSCRIPT_IS_MARKUP = _noscript_is_markup()


def _noscript_images(noscripts: list) -> list:
    """The <img>s written inside <noscript>, for a parser that keeps <noscript> as raw text."""
    found = []
    for noscript in noscripts:
        text = noscript.text(deep=True, separator="")
        if "<img" in text.lower():
            found.extend(LexborHTMLParser(text).css("img"))
    return found


# _noscript_copies looks for the URLs of a page's <noscript> images in each shown image's source
# attributes as substrings first, when there are at most this many.
_FEW_NAMES = 32
_SOURCE_ATTRS = SRC_ATTRS + SRCSET_ATTRS


def _noscript_copies(tags: list[tuple[int, dict]], hidden: set[int]) -> set[int]:
    """The node ids of the ``<noscript>`` images (``hidden``) that copy an image the page shows: one
    naming a URL a shown image names, with no alt text or one of those images' alt texts. ``tags``:
    each image's (node id, attributes)."""
    wanted = {node_id: _source_keys(attrs) for node_id, attrs in tags if node_id in hidden}  # the URLs each names
    names = set().union(*wanted.values())
    if not names:
        return set()
    shown: dict[str, set[str]] = {}  # of those URLs, the alt texts of the shown images naming them
    few = len(names) <= _FEW_NAMES
    for node_id, attrs in tags:
        if node_id not in hidden:
            if few:
                # Every key an image gives is a substring of one of its source attributes: an image
                # none of whose attributes holds a wanted URL needs no parse of its srcset.
                values = "\n".join(v for name in _SOURCE_ATTRS if (v := attrs.get(name)))
                if not any(name in values for name in names):
                    continue
            keys = names.intersection(_raw_source_keys(attrs))
            if keys:
                alt = strip_html_whitespace(attrs.get("alt")) or ""
                for key in keys:
                    shown.setdefault(key, set()).add(alt)
    copies = set()
    for node_id, attrs in tags:
        keys = wanted.get(node_id)
        if keys:
            alts = set().union(*(shown.get(key, ()) for key in keys))
            alt = strip_html_whitespace(attrs.get("alt"))
            if alts and (not alt or alt in alts):
                copies.add(node_id)
    return copies


def parse_page(text: str | bytes, canonical: bool = True) -> ParsedPage:
    """Every ``<img>`` of a page in document order, with the page's ``<base href>`` and canonical
    link (``canonical``: look for it); a ``<noscript>`` copy of an image the page shows anyway is
    left out. ``text`` is the decoded page, or its UTF-8 bytes (:attr:`Decoded.markup`)."""
    doc = LexborHTMLParser(text)
    # Elements by tag name (lexbor walks the tree in C, in document order): a css() call compiles
    # its selector first, which costs as much as the walk on a page and more on a figure.
    base = next((attrs for node in doc.tags("base") if "href" in (attrs := node.attributes)), None)
    href = (base["href"] or "").strip() if base is not None else ""
    page = ParsedPage(base_href=href or None)
    if canonical:
        page.canonical = _canonical(doc.tags("link"))
    images = doc.tags("img")
    noscripts = doc.tags("noscript")
    if NOSCRIPT_IS_MARKUP:
        hidden = {n.mem_id for node in noscripts for n in node.traverse() if n.tag == "img"} if images else set()
    else:
        extra = _noscript_images(noscripts)
        hidden = {node.mem_id for node in extra}
        images = [*images, *extra]
    if not images:
        return page
    captions = _captions(doc.tags("figure"))
    attributes = [node.attributes for node in images]
    # node ids only where they are looked up: a page with figure captions or <noscript> images
    ids = [node.mem_id for node in images] if hidden or captions else [None] * len(images)
    copies = _noscript_copies(list(zip(ids, attributes, strict=True)), hidden) if hidden else set()
    append = page.images.append
    for node_id, attrs in zip(ids, attributes, strict=True):
        if node_id in copies:
            page.noscript_copies += 1
            continue
        src, src_attr = choose_src(attrs)
        append(
            _new_tag(
                (
                    src,
                    strip_html_whitespace(attrs.get("alt")),
                    _clean(attrs.get("title")),
                    captions.get(node_id),
                    parse_dimension(attrs.get("width")),
                    parse_dimension(attrs.get("height")),
                    src_attr,
                )
            )
        )
    return page
