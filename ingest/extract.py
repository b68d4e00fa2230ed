"""`wit extract`: web pages (WARC, WAT, HTML files) in, one candidate row per usable `<img>` out.

One partition per source file. Data flow inside a partition::

    source file ─▶ sources.READERS[fmt] ─▶ RawPage ─▶ webpage.decode_html + parse_page ─▶ ImgTag ...
                   (WARC response records,            (WAT pages arrive already parsed)
                    WAT metadata, HTML file)
      ImgTag ─▶ CandidateBuilder.add_image: absolute + normalised URL, skip reasons ─▶ Candidate rows
                                            language of the alt text (cached per text)

Every image that does not become a row is counted under one reason, checked in this order:
``no_src``, ``data_uri``, ``bad_scheme`` (not http(s) once resolved; ``javascript:``, ``file:``),
``bad_url`` (a URL that cannot be normalised), ``svg_or_ico`` (by extension: not photos, and
most image pipelines cannot decode them), ``tracking_pixel`` (a declared side of 0 or 1 pixel:
beacons and spacer lines, whatever the other side says), ``empty_alt``. Page- and source-level
reasons come from :mod:`wit.ingest.sources` (``not_html``, ``page_too_large``, ``bad_http_header``,
``bad_record``, ``truncated_source``, ``corrupt_source``, ``empty_source``; ``bad_page_url`` for a
page URL that cannot be normalised) and from decoding
(``bad_encoding``: decoded, but with a bogus charset label or replacement characters;
``undecodable``: skipped). ``pages``, ``images_seen`` and ``kept`` are counted too.

Rows are in source order (page by page, image by image), so a partition's part file is the same
bytes on every run, whatever the number of workers.
"""

from __future__ import annotations

import functools
import operator
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import pyarrow as pa

from wit.ingest.sources import EMPTY_SOURCE, READERS, RawPage, SourceTap, expand_sources, source_format
from wit.ingest.urls import BadURL, absolutize, normalize_url, uid_of_normalized
from wit.ingest.webpage import ImgTag, ParsedPage, decode_html, parse_page
from wit.manifests import storage
from wit.manifests.manifest import ManifestRef
from wit.manifests.options import Option, check_options
from wit.manifests.schemas import CANDIDATES
from wit.manifests.stage import Partition, PartitionResult, StageError

MiB = 1 << 20
SOURCE_KIND = "source"
HTTP_SCHEMES = frozenset({"http", "https"})
# By extension of the URL path: vector art and favicons are not pictures with captions.
SKIPPED_EXTENSIONS = (".svg", ".svgz", ".ico")
_LANG_CACHE_MAX = 200_000  # distinct alt texts remembered per partition (bounded memory)

IMAGES_SEEN = "images_seen"
KEPT = "kept"
NO_SRC = "no_src"
DATA_URI = "data_uri"
BAD_SCHEME = "bad_scheme"
BAD_URL = "bad_url"
SVG_OR_ICO = "svg_or_ico"
TRACKING_PIXEL = "tracking_pixel"
EMPTY_ALT = "empty_alt"
BAD_PAGE_URL = "bad_page_url"


@dataclass(frozen=True, slots=True)
class ExtractConfig:
    """What `wit extract` does with a page. Written into `_run.json`."""

    max_page_bytes: int = 5 * MiB  # larger pages are skipped (page_too_large), never read whole
    detect_lang: bool = True  # py3langid on every distinct alt text; the main cost after parsing
    # Restrict language identification to these ISO 639 codes (empty: all the model knows). On short
    # alt texts the full model often answers a neighbour (English as Maltese or Pidgin); naming the
    # languages a crawl can hold makes it far more accurate.
    languages: tuple[str, ...] = ()

    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("max-page-bytes", "int", max_page_bytes, "Skip larger pages (reason page_too_large).", low=1024),
        Option("no-lang", "bool", False, "Skip language identification (faster; lang stays null)."),
        Option(
            "languages",
            "strs",
            languages,
            "Comma-separated ISO 639-1 codes the identifier may answer (default: all it knows).",
            metavar="CODES",
        ),
    )

    @classmethod
    def from_options(cls, values: Mapping[str, Any], out: str | None = None) -> ExtractConfig:
        v = check_options(cls.OPTIONS, values, "extract")
        return cls(max_page_bytes=v["max_page_bytes"], detect_lang=not v["no_lang"], languages=v["languages"])

    def __post_init__(self) -> None:
        if isinstance(self.max_page_bytes, bool) or not isinstance(self.max_page_bytes, int):
            raise ValueError(f"max_page_bytes must be an integer, got {self.max_page_bytes!r}")
        if self.max_page_bytes < 1024:
            raise ValueError(f"max_page_bytes must be at least 1024, got {self.max_page_bytes}")
        if not isinstance(self.detect_lang, bool):
            raise ValueError(f"detect_lang must be true or false, got {self.detect_lang!r}")
        if isinstance(self.languages, str) or not isinstance(self.languages, (tuple, list)):
            raise ValueError(f"languages must be a tuple of ISO 639 codes, got {self.languages!r}")
        object.__setattr__(self, "languages", tuple(sorted(set(self.languages))))
        unknown = set(self.languages) - set(known_languages())
        if unknown:
            raise ValueError(f"languages unknown to py3langid: {', '.join(sorted(unknown))}")


@dataclass(slots=True)
class Candidate:
    """One row of the candidates manifest; fields in `CANDIDATES` schema order."""

    uid: str
    url: str
    text: str
    page_url: str
    title: str | None
    caption: str | None
    width_attr: int | None
    height_attr: int | None
    lang: str | None
    source: str
    offset: int | None


_COLUMNS = [f.name for f in fields(Candidate)]
assert _COLUMNS == CANDIDATES.names, "Candidate fields must follow the CANDIDATES schema"


_ROW = operator.attrgetter(*_COLUMNS)  # a row as a tuple; dataclasses.astuple deep-copies every value


def candidates_table(rows: list[Candidate]) -> pa.Table:
    columns = list(zip(*map(_ROW, rows), strict=True)) if rows else [[] for _ in _COLUMNS]
    return pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, CANDIDATES, strict=True)], schema=CANDIDATES
    )


@functools.lru_cache(maxsize=4)
def _language_identifier(languages: tuple[str, ...]):
    """A py3langid identifier, loaded once per process (about half a second) and per language set."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE)
    if languages:
        identifier.set_languages(list(languages))
    return identifier


def known_languages() -> list[str]:
    return _language_identifier(()).labels


class CandidateBuilder:
    """Turns the pages of one source file into candidate rows, counting every skip by reason."""

    def __init__(self, source: str, config: ExtractConfig, counts: Counter) -> None:
        self.source = source
        self.config = config
        self.counts = counts
        self.rows: list[Candidate] = []
        self._langs: dict[str, str] = {}
        self._classify = _language_identifier(config.languages).classify if config.detect_lang else None

    def add_page(self, page: RawPage) -> None:
        parsed = page.parsed if page.parsed is not None else self._parse(page)
        if parsed is None:
            return
        page_url = self._page_url(page, parsed)
        if page_url is None:
            return
        for tag in parsed.images:
            self.add_image(tag, page_url, parsed.base_href, page.offset)

    def _parse(self, page: RawPage) -> ParsedPage | None:
        decoded = decode_html(page.body or b"", page.charset)
        if decoded.problem:
            self.counts[decoded.problem] += 1
        return parse_page(decoded.text) if decoded.text is not None else None

    def _page_url(self, page: RawPage, parsed: ParsedPage) -> str | None:
        url = page.url
        if page.canonical_ok and parsed.canonical:
            canonical = absolutize(parsed.canonical, url)
            if canonical.split(":", 1)[0].lower() in HTTP_SCHEMES:
                url = canonical
        try:
            return normalize_url(url)
        except BadURL:
            self.counts[BAD_PAGE_URL] += 1
            return None

    def _skip(self, tag: ImgTag, page_url: str, base_href: str | None) -> tuple[str | None, str]:
        """(reason, normalised URL): the reason is None for an image that becomes a row."""
        src = tag.src
        if src is None:
            return NO_SRC, ""
        if src[:5].lower() == "data:":
            return DATA_URI, ""
        url = absolutize(src, page_url, base_href)
        if url.split(":", 1)[0].lower() not in HTTP_SCHEMES:
            return BAD_SCHEME, ""
        try:
            url = normalize_url(url)
        except BadURL:
            return BAD_URL, ""
        path = url.split("?", 1)[0].lower()
        if path.endswith(SKIPPED_EXTENSIONS):
            return SVG_OR_ICO, url
        if (tag.width is not None and tag.width <= 1) or (tag.height is not None and tag.height <= 1):
            return TRACKING_PIXEL, url
        if not tag.alt:
            return EMPTY_ALT, url
        return None, url

    def add_image(self, tag: ImgTag, page_url: str, base_href: str | None, offset: int | None) -> None:
        self.counts[IMAGES_SEEN] += 1
        reason, url = self._skip(tag, page_url, base_href)
        if reason is not None:
            self.counts[reason] += 1
            return
        text = tag.alt or ""
        self.counts[KEPT] += 1
        self.rows.append(
            Candidate(
                uid=uid_of_normalized(url, text),
                url=url,
                text=text,
                page_url=page_url,
                title=tag.title,
                caption=tag.caption,
                width_attr=tag.width,
                height_attr=tag.height,
                lang=self._lang(text),
                source=self.source,
                offset=offset,
            )
        )

    def _lang(self, text: str) -> str | None:
        if self._classify is None:
            return None
        lang = self._langs.get(text)
        if lang is None:
            if len(self._langs) >= _LANG_CACHE_MAX:
                self._langs.clear()
            lang = self._langs[text] = self._classify(text)[0]
        return lang


def extract_source(url: str, config: ExtractConfig) -> PartitionResult:
    """All candidates of one source file, with counts by reason and the file's sha256 and size."""
    fmt = source_format(url)
    if fmt is None:
        raise StageError(f"extract: {url} is not a WARC, WAT or HTML file (by its name)")
    counts: Counter = Counter()
    builder = CandidateBuilder(url, config, counts)
    with storage.open_url(url, "rb") as fh:
        # Gzip framing is only checked for WARC/WAT: an .html file is read whole, never inflated.
        tap = SourceTap(fh, url, check_gzip=fmt != "html")
        for page in READERS[fmt](tap, url, config.max_page_bytes, counts):
            builder.add_page(page)
        tap.finish()
    if tap.bytes == 0:
        counts[EMPTY_SOURCE] += 1
    elif tap.problem:
        counts[tap.problem] += 1
    extra = {"sources": {"url": url, "format": fmt, "sha256": tap.sha256, "bytes": tap.bytes}}
    return PartitionResult(table=candidates_table(builder.rows), counts=dict(counts), extra=extra)


def source_refs(urls: list[str]) -> list[ManifestRef]:
    """The stage inputs for SOURCE arguments (files, folders, globs): one ref per source file."""
    return [ManifestRef(url=u, kind=SOURCE_KIND) for u in expand_sources(urls)]


class ExtractStage:
    """The extract stage (see the module docstring): one partition per source file."""

    name = "extract"
    kind = "candidates"

    def partitions(self, config: ExtractConfig, inputs: list[ManifestRef]) -> list[Partition]:
        wrong = [ref.url for ref in inputs if ref.kind != SOURCE_KIND]
        if wrong:
            raise StageError(f"extract reads source files (see source_refs), not manifests: {', '.join(wrong)}")
        return [Partition(index=i, source=ref.url) for i, ref in enumerate(inputs)]

    def run_partition(self, config: ExtractConfig, partition: Partition, out: str) -> PartitionResult:
        return extract_source(partition.source, config)


EXTRACT = ExtractStage()
EXTRACT_PHASES: list[tuple[ExtractStage, str]] = [(EXTRACT, "")]
