"""One HTML page: its bytes decoded to text, then its `<img>` tags read with selectolax (lexbor).

Data flow: ``bytes --decode_html--> str --parse_page--> ParsedPage(base_href, canonical, images)``.
An :class:`ImgTag` is what the page says, nothing more: the chosen source attribute as written
(relative or not), alt, title, the enclosing figure's caption, and the declared size. Deciding
which images become candidates, and why the others do not, is ``extract``'s job.

Decoding follows the order browsers use (a BOM, then the HTTP header's charset, then a
``<meta charset>`` in the first bytes, then UTF-8), trying each declared encoding strictly before
falling back to UTF-8 with replacement characters. Only bytes that are clearly not text (more than
1% control bytes) make a page ``undecodable``.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field

from selectolax.lexbor import LexborHTMLParser

# How far into the page a <meta charset> is looked for (the HTML standard's prescan reads 1024
# bytes; real pages put long <script> blocks first often enough that a little more pays).
PRESCAN_BYTES = 4096
_META_CHARSET = re.compile(rb"""<meta[^>]{0,512}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:\-]+)""", re.I)
# WHATWG maps these labels to windows-1252: pages that say latin-1 use its extra characters.
_LABEL_ALIASES = {
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "ascii": "cp1252",
    "us-ascii": "cp1252",
}
# A <meta> that claims UTF-16 was found by an ASCII scan, so the bytes are not UTF-16.
_ASCII_INCOMPATIBLE = {"utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"}
# Bytes deleted to count control bytes (C0 controls but tab, newline, form feed, carriage return; DEL).
_NOT_CONTROL = bytes(b for b in range(256) if not (b < 32 and b not in (9, 10, 12, 13) or b == 127))
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))

# Where lazy-loading pages keep the real image URL when `src` holds a placeholder.
SRC_ATTRS = ("src", "data-src", "data-lazy-src", "data-original")
SRCSET_ATTRS = ("srcset", "data-srcset")
_DIMENSION = re.compile(r"\s*\+?(\d+)(?:\.\d*)?\s*(%?)")
_INT32_MAX = 2**31 - 1

BAD_ENCODING = "bad_encoding"
UNDECODABLE = "undecodable"


@dataclass(slots=True)
class Decoded:
    text: str | None  # None when undecodable
    encoding: str
    problem: str | None = None  # None, BAD_ENCODING (decoded with replacements) or UNDECODABLE


@dataclass(slots=True)
class ImgTag:
    src: str | None  # as written (stripped); None when no source attribute has a value
    alt: str | None  # None when the attribute is missing
    title: str | None = None
    caption: str | None = None  # the enclosing <figure>'s <figcaption>, whitespace collapsed
    width: int | None = None  # declared in the tag, in CSS pixels; None when absent or a percentage
    height: int | None = None


@dataclass(slots=True)
class ParsedPage:
    base_href: str | None = None
    canonical: str | None = None
    images: list[ImgTag] = field(default_factory=list)


def codec_name(label: str | None) -> str | None:
    """The Python codec for a charset label, or None when the label is unknown."""
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    label = _LABEL_ALIASES.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


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
            names.append("utf-8" if from_meta and name in _ASCII_INCOMPATIBLE else name)
    return names, bogus


def decode_html(body: bytes, http_charset: str | None = None) -> Decoded:
    """Decode a page as a browser would; see the module docstring."""
    # Text in a wrong encoding is still mostly markup with readable URLs; binary (an image or an
    # archive served as text/html) is full of control bytes that no text encoding uses.
    names, bogus = _declared(body, http_charset)
    wide = bool(names) and names[0] == "utf-16"  # only a BOM says so; its NULs are text
    if not wide and len(body.translate(None, _NOT_CONTROL)) * 100 > len(body):
        return Decoded(None, "utf-8", UNDECODABLE)
    for name in [*names, "utf-8"]:
        try:
            return Decoded(body.decode(name), name, BAD_ENCODING if bogus else None)
        except UnicodeDecodeError:
            continue
    return Decoded(body.decode("utf-8", errors="replace"), "utf-8", BAD_ENCODING)


def parse_dimension(value: str | None) -> int | None:
    """An HTML width/height attribute in pixels ("64", " 64px", "64.5"); None for "50%" or junk."""
    if value is None:
        return None
    m = _DIMENSION.match(value)
    if m is None or m.group(2):
        return None
    n = int(m.group(1))
    return n if n <= _INT32_MAX else None


def _first_srcset_url(srcset: str) -> str | None:
    # A srcset is "url [descriptor], url [descriptor]"; URLs may hold commas, but never spaces.
    words = srcset.strip().lstrip(",").split()
    return (words[0].rstrip(",") or None) if words else None


def pick_src(attrs: dict[str, str | None]) -> str | None:
    """The image's URL: ``src``, else a lazy-loading attribute; a ``data:`` placeholder in ``src``
    loses to a real URL in ``data-src``/``srcset``, but is returned when nothing better exists."""
    placeholder = None
    for name in SRC_ATTRS:
        value = attrs.get(name)
        if value and (value := value.strip()):
            if value[:5].lower() != "data:":
                return value
            placeholder = placeholder or value
    for name in SRCSET_ATTRS:
        value = attrs.get(name)
        if value and (url := _first_srcset_url(value)) and url[:5].lower() != "data:":
            return url
    return placeholder


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = " ".join(value.split())
    return value or None


def _captions(tree: LexborHTMLParser) -> dict[int, str]:
    """Caption text by img node id, for images inside a <figure> that has a <figcaption>."""
    captions: dict[int, str] = {}
    for figure in tree.css("figure"):
        node = figure.css_first("figcaption")
        text = _clean(node.text(deep=True, separator="")) if node is not None else None
        if text:
            # Figures come in document order, so a nested figure's caption overwrites its parent's.
            for img in figure.css("img"):
                captions[img.mem_id] = text
    return captions


def _canonical(tree: LexborHTMLParser) -> str | None:
    for link in tree.css("link[rel]"):
        attrs = link.attributes
        if "canonical" in (attrs.get("rel") or "").lower().split() and attrs.get("href"):
            return attrs["href"].strip() or None
    return None


def parse_page(text: str) -> ParsedPage:
    """Every ``<img>`` of a page in document order, with the page's ``<base href>`` and canonical link."""
    tree = LexborHTMLParser(text)
    base = tree.css_first("base[href]")
    href = (base.attributes.get("href") or "").strip() if base is not None else ""
    page = ParsedPage(base_href=href or None)
    page.canonical = _canonical(tree)
    images = tree.css("img")
    if not images:
        return page
    captions = _captions(tree)
    for node in images:
        attrs = node.attributes
        alt = attrs.get("alt")
        page.images.append(
            ImgTag(
                src=pick_src(attrs),
                alt=alt.strip() if alt is not None else None,
                title=_clean(attrs.get("title")),
                caption=captions.get(node.mem_id),
                width=parse_dimension(attrs.get("width")),
                height=parse_dimension(attrs.get("height")),
            )
        )
    return page
