"""`wit extract`: web pages (WARC, WAT, HTML files) in, one candidate row per usable `<img>` out.

One partition per source file. Data flow inside a partition::

    source file ─▶ sources.READERS[fmt] ─▶ RawPage ─▶ webpage.decode_html + parse_page ─▶ ImgTag ...
                   (WARC response records,            (WAT pages arrive already parsed)
                    WAT metadata, HTML file)
      ImgTag ─▶ CandidateBuilder.add_page: absolute + normalised URL, skip reasons ─▶ Candidate rows
                         CandidateBuilder.table: language of each distinct alt text, one batch a file

Every image that does not become a row is counted under one reason, checked in this order:
``no_src``, ``data_uri``, ``bad_url`` (a URL that cannot be normalised), ``bad_scheme`` (not
http(s) once resolved; ``javascript:``, ``file:``), ``svg_or_ico`` (by extension: not photos, and
most image pipelines cannot decode them), ``tracking_pixel`` (a declared side of 0 or 1 pixel:
beacons and spacer lines, whatever the other side says), ``empty_alt``; and ``noscript_copy``
for a ``<noscript>`` copy of an image the page shows anyway (``webpage.parse_page``). Record-, page- and
source-level reasons come from :mod:`wit.ingest.sources` (``not_http``, ``revisit``,
``other_record``, ``not_html``, ``page_too_large``, ``bad_http_header``, ``bad_content_encoding``,
``unsupported_content_encoding``, ``bad_record``, ``truncated_source``, ``corrupt_source``,
``empty_source``; ``bad_page_url`` for a page URL that cannot be normalised) and from decoding
(``bad_encoding``: decoded, but with a bogus charset label or replacement characters;
``undecodable``: skipped). ``pages``, ``images_seen`` and ``kept`` are counted too, and
``no_page_url``: a saved HTML page that ``--page-urls`` does not list (it is still read), and,
among the kept rows, ``src_from_lazy`` / ``src_from_srcset``: rows whose URL a lazy-loading
attribute (``data-src``, ``data-srcset``, ...) or ``srcset`` gave instead of ``src``
(``webpage.choose_src``, which also says which placeholders lose to them).

The page URL (the ``page_url`` column, and what relative images resolve against, through
``<base href>`` when the page has one) is the URL the page was fetched from: a WARC record's
``WARC-Target-URI``, or for a saved HTML file the URL ``--page-url`` / ``--page-urls`` gives. A
``<link rel=canonical>`` names where a site would rather be found (``http://www.`` for an
``https://`` page), not where the page was, so it counts only for a saved file whose URL nobody
gave, where it is the best guess there is (else the file's ``file://`` URL, whose relative images
are ``bad_scheme``).

Rows are in source order (page by page, image by image), so a partition's part file is the same
bytes on every run, whatever the number of workers.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from wit.ingest.language import batch_identifier
from wit.ingest.sources import (
    EMPTY_SOURCE,
    MAX_PAGE_BYTES,
    READERS,
    RawPage,
    SourceTap,
    expand_sources,
    is_http,
    read_html,
    source_format,
)
from wit.ingest.urls import BadURL, Resolver, absolutize, normalize_url, uid_of_normalized
from wit.ingest.webpage import ImgTag, ParsedPage, decode_html, parse_page
from wit.manifests import storage
from wit.manifests.manifest import ManifestRef
from wit.manifests.options import Option, check_options, resolve
from wit.manifests.schemas import CANDIDATES
from wit.manifests.stage import Partition, PartitionResult, StageError

SOURCE_KIND = "source"
# By extension of the URL path: vector art and favicons are not pictures with captions.
SKIPPED_EXTENSIONS = (".svg", ".svgz", ".ico")

IMAGES_SEEN = "images_seen"
KEPT = "kept"
NO_SRC = "no_src"
DATA_URI = "data_uri"
BAD_SCHEME = "bad_scheme"
BAD_URL = "bad_url"
SVG_OR_ICO = "svg_or_ico"
TRACKING_PIXEL = "tracking_pixel"
EMPTY_ALT = "empty_alt"
NOSCRIPT_COPY = "noscript_copy"
BAD_PAGE_URL = "bad_page_url"
NO_PAGE_URL = "no_page_url"
PAGE_URLS_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True, slots=True)
class ExtractConfig:
    """What `wit extract` does with a page. Written into `_run.json`."""

    max_page_bytes: int = MAX_PAGE_BYTES  # larger pages are skipped (page_too_large), never read whole
    detect_lang: bool = True  # py3langid's model on every distinct alt text of a file, one batch (language.py)
    # Restrict language identification to these ISO 639 codes (empty: all the model knows). On short
    # alt texts the full model often answers a neighbour (English as Maltese or Pidgin); naming the
    # languages a crawl can hold makes it far more accurate.
    languages: tuple[str, ...] = ()
    # The URL a saved HTML file was fetched from (one HTML source), or a CSV/Parquet list of them
    # (columns file, url) with its sha256, taken when the config is built: the run record names the
    # exact list, and a changed list is a changed config.
    page_url: str | None = None
    page_urls: str | None = None
    page_urls_sha256: str | None = None

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
        Option(
            "page-url",
            "str",
            None,
            "The http(s) URL the one HTML source was fetched from: its relative images resolve against it.",
            metavar="URL",
        ),
        Option(
            "page-urls",
            "path",
            None,
            "CSV or Parquet file with columns file, url: the URL each saved HTML source was fetched from. "
            "file is a path (relative to the list's folder) or a bare file name, matched by basename.",
            metavar="URL",
        ),
    )

    @classmethod
    def from_options(cls, values: Mapping[str, Any], out: str | None = None) -> ExtractConfig:
        v = check_options(cls.OPTIONS, values, "extract")
        return cls(
            max_page_bytes=v["max_page_bytes"],
            detect_lang=not v["no_lang"],
            languages=v["languages"],
            page_url=v["page_url"],
            page_urls=v["page_urls"],
        )

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
        if self.page_url is not None:
            object.__setattr__(self, "page_url", fetch_url(self.page_url, "page_url"))
        if self.page_urls is None:
            if self.page_urls_sha256 is not None:
                raise ValueError("page_urls_sha256 without page_urls")
            return
        if self.page_url is not None:
            raise ValueError("give page_url (one HTML file) or page_urls (a list), not both")
        if not isinstance(self.page_urls, str) or not self.page_urls.lower().endswith(PAGE_URLS_SUFFIXES):
            raise ValueError(f"page_urls must name a .csv or .parquet file, got {self.page_urls!r}")
        object.__setattr__(self, "page_urls", storage.normalize(self.page_urls))
        if self.page_urls_sha256 is None:  # built from options: read (and check) the list now
            object.__setattr__(self, "page_urls_sha256", read_page_urls(self.page_urls)[1])

    def page_url_for(self, source: str) -> str | None:
        """The URL the HTML file ``source`` was fetched from, when the options give it."""
        if self.page_urls is not None:
            return cached_page_urls(self.page_urls, self.page_urls_sha256).lookup(source)
        return self.page_url


def fetch_url(url: object, where: str) -> str:
    """``url`` stripped, if it is an absolute http(s) URL that normalises; else ValueError."""
    if not isinstance(url, str) or not is_http(url):
        raise ValueError(f"{where}: expected an http(s) URL, got {url!r}")
    try:
        normalize_url(url)
    except BadURL as exc:
        raise ValueError(f"{where}: {exc}") from None
    return url.strip()


@dataclass(frozen=True, slots=True)
class PageURLs:
    """A ``--page-urls`` list: URLs by source path (entries holding a ``/``) and by file name."""

    by_path: dict[str, str]
    by_name: dict[str, str]

    def lookup(self, source: str) -> str | None:
        """A path entry first, then a bare name matching the source's basename."""
        url = self.by_path.get(storage.normalize(source))
        return url if url is not None else self.by_name.get(storage.basename(source))


def _page_url_rows(url: str, data: bytes) -> list[tuple[object, object]]:
    if url.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{url}: not a Parquet file: {exc}") from None
        if not {"file", "url"} <= set(table.column_names):
            raise ValueError(f"{url}: needs columns file and url, has {', '.join(table.column_names)}")
        return list(zip(table.column("file").to_pylist(), table.column("url").to_pylist(), strict=True))
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
        if not {"file", "url"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{url}: needs a header row with columns file and url, has {reader.fieldnames}")
        return [(row["file"], row["url"]) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{url}: not a UTF-8 CSV file: {exc}") from None


def read_page_urls(url: str) -> tuple[PageURLs, str]:
    """The ``--page-urls`` list at ``url`` and its sha256. ValueError for a bad list: a row without
    a file or an http(s) URL, one file given two URLs, no rows."""
    data = storage.read_bytes(url)
    return _parse_page_urls(url, data), hashlib.sha256(data).hexdigest()


def _parse_page_urls(url: str, data: bytes) -> PageURLs:
    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    by_path: dict[str, str] = {}
    by_name: dict[str, str] = {}
    rows = _page_url_rows(url, data)
    first = 1 if url.lower().endswith(".parquet") else 2  # a CSV's rows start on its second line
    for n, (file, page) in enumerate(rows, start=first):
        if not isinstance(file, str) or not file.strip():
            raise ValueError(f"{url}, row {n}: no file")
        page = fetch_url(page, f"{url}, row {n}")
        file = file.strip()
        table, key = (by_path, resolve(folder, file)) if "/" in file else (by_name, file)
        if table.setdefault(key, page) != page:
            raise ValueError(f"{url}, row {n}: {file} is given two URLs ({table[key]}, {page})")
    if not rows:
        raise ValueError(f"{url}: no (file, url) rows")
    return PageURLs(by_path, by_name)


@functools.lru_cache(maxsize=4)
def cached_page_urls(url: str, sha256: str) -> PageURLs:
    """The list a config names, read once per process; it must still be the file the config digested."""
    data = storage.read_bytes(url)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise StageError(f"{url} changed since the extract config was built (sha256 {digest}, not {sha256})")
    return _parse_page_urls(url, data)


# A candidate row is a tuple in CANDIDATES schema order (a page's images are made by the tens of
# thousands; a dataclass costs a microsecond each). LANG is filled per file in table(), from TEXT.
_COLUMNS = CANDIDATES.names
TEXT, LANG = _COLUMNS.index("text"), _COLUMNS.index("lang")


def candidates_table(rows: list[tuple], langs: list[str | None] | None = None) -> pa.Table:
    """The rows as a table; ``langs``: the LANG column, when the rows leave it None."""
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in _COLUMNS]
    if langs is not None:
        columns[LANG] = langs
    return pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, CANDIDATES, strict=True)], schema=CANDIDATES
    )


def known_languages() -> list[str]:
    return batch_identifier().distinct_labels()


class CandidateBuilder:
    """Turns the pages of one source file into candidate rows, counting every skip by reason."""

    def __init__(self, source: str, config: ExtractConfig, counts: Counter) -> None:
        self.source = source
        self.config = config
        self.counts = counts
        self.rows: list[tuple] = []  # in CANDIDATES order
        self._identifier = batch_identifier(config.languages) if config.detect_lang else None

    def add_pages(self, pages: list[RawPage]) -> None:
        """The rows of a batch of pages: each step over the whole batch (decode and parse every
        page, then take every page's images), which keeps a step's code and data in the CPU's
        caches from one page to the next; per page, the steps' turns evict each other."""
        parsed = [page.parsed if page.parsed is not None else self._parse(page) for page in pages]
        for page, found in zip(pages, parsed, strict=True):
            if found is not None:
                self.add_page(page, found)

    def add_page(self, page: RawPage, parsed: ParsedPage) -> None:
        page_url = self._page_url(page, parsed)
        if page_url is None:
            return
        if parsed.noscript_copies:
            self.counts[IMAGES_SEEN] += parsed.noscript_copies
            self.counts[NOSCRIPT_COPY] += parsed.noscript_copies
        if not parsed.images:
            return
        self._add_images(parsed.images, page_url, Resolver(page_url, parsed.base_href), page.offset)

    def _parse(self, page: RawPage) -> ParsedPage | None:
        decoded = decode_html(page.body or b"", page.charset)
        if decoded.problem:
            self.counts[decoded.problem] += 1
        return parse_page(decoded.markup, canonical=page.canonical_ok) if decoded.text is not None else None

    def _page_url(self, page: RawPage, parsed: ParsedPage) -> str | None:
        """The URL the page was fetched from, normalised (see the module docstring)."""
        url = page.url
        if page.canonical_ok and parsed.canonical:
            # A saved file nobody gave a URL: its canonical link (resolved as a link is, against
            # <base href>) stands in for the URL it was fetched from.
            try:
                canonical = absolutize(parsed.canonical, url, parsed.base_href)
            except BadURL:
                canonical = ""  # one that does not parse names nothing
            if is_http(canonical):
                url = canonical
        try:
            return normalize_url(url)
        except BadURL:
            self.counts[BAD_PAGE_URL] += 1
            return None

    def _add_images(self, tags: list[ImgTag], page_url: str, resolver: Resolver, offset: int | None) -> None:
        """A row for each of a page's images, or its skip reason counted. One loop with everything
        in locals: a page's images come by the tens, a source file's by the tens of thousands."""
        counts, append, resolve, source = self.counts, self.rows.append, resolver.resolve, self.source
        kept = 0
        for src, alt, title, caption, width, height, src_attr in tags:
            # The skip reasons, in this order: no source, data: URI, URL that does not parse, not
            # http(s), SVG or icon, a 1-pixel tracking image, no alt text.
            if src is None:
                counts[NO_SRC] += 1
                continue
            if src[:5].lower() == "data:":
                counts[DATA_URI] += 1
                continue
            try:
                url = resolve(src)
            except BadURL:
                counts[BAD_URL] += 1
                continue
            if url is None:
                counts[BAD_SCHEME] += 1
                continue
            if url.split("?", 1)[0].lower().endswith(SKIPPED_EXTENSIONS):
                counts[SVG_OR_ICO] += 1
                continue
            if (width is not None and width <= 1) or (height is not None and height <= 1):
                counts[TRACKING_PIXEL] += 1
                continue
            if not alt:
                counts[EMPTY_ALT] += 1
                continue
            # Rows whose URL a lazy-loading attribute (data-src, data-srcset, ...) or srcset gave
            # instead of src (webpage.choose_src); informational, not skip reasons.
            if src_attr != "src":
                counts["src_from_srcset" if src_attr == "srcset" else "src_from_lazy"] += 1
            uid = uid_of_normalized(url, alt)
            # lang (None) is labelled per file in table()
            append((uid, url, alt, page_url, title, caption, width, height, None, source, offset))
            kept += 1
        counts[IMAGES_SEEN] += len(tags)
        if kept:
            counts[KEPT] += kept

    def table(self) -> pa.Table:
        """The rows as a candidates table, each labelled with its alt text's language."""
        rows = self.rows
        if self._identifier is not None and rows:
            # One batch per source file, over its distinct alt texts (language.BatchIdentifier).
            texts = list(dict.fromkeys(row[TEXT] for row in rows))
            langs = dict(zip(texts, self._identifier.classify_many(texts), strict=True))
            return candidates_table(rows, [langs[row[TEXT]] for row in rows])
        return candidates_table(rows)


# Pages are handled in batches (CandidateBuilder.add_pages) of at most this many pages and bytes
# of HTML: 10% faster than page by page on the synthetic WARC of bench_real_web at 64 pages, and a
# few MB held at once.
BATCH_PAGES = 64
BATCH_BYTES = 8 << 20


def _batches(pages: Iterator[RawPage]) -> Iterator[list[RawPage]]:
    batch: list[RawPage] = []
    size = 0
    for page in pages:
        batch.append(page)
        size += len(page.body or b"")
        if len(batch) >= BATCH_PAGES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


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
        if fmt == "html":
            pages = read_html(tap, url, config.max_page_bytes, counts, page_url=config.page_url_for(url))
        else:
            pages = READERS[fmt](tap, url, config.max_page_bytes, counts)
        for batch in _batches(pages):
            if config.page_urls is not None:
                counts[NO_PAGE_URL] += sum(page.canonical_ok for page in batch)
            builder.add_pages(batch)
        tap.finish()
    if tap.bytes == 0:
        counts[EMPTY_SOURCE] += 1
    elif tap.problem:
        counts[tap.problem] += 1
    extra = {"sources": {"url": url, "format": fmt, "sha256": tap.sha256, "bytes": tap.bytes}}
    return PartitionResult(table=builder.table(), counts=dict(counts), extra=extra)


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
        html = [ref.url for ref in inputs if source_format(ref.url) == "html"]
        if config.page_url is not None and len(html) != 1:
            raise StageError(
                f"extract: --page-url is the URL of one HTML file, but the sources hold {len(html)}; "
                "give a list of (file, url) rows with --page-urls instead"
            )
        if config.page_urls is not None:
            # a bare file name in the list must not give two sources one URL
            mapping = cached_page_urls(config.page_urls, config.page_urls_sha256)
            names = Counter(storage.basename(u) for u in html if storage.normalize(u) not in mapping.by_path)
            twice = sorted(n for n, k in names.items() if k > 1 and n in mapping.by_name)
            if twice:
                raise StageError(
                    f"extract: {config.page_urls} gives a URL by file name to several sources named "
                    f"{', '.join(twice)}; give their paths instead"
                )
        return [Partition(index=i, source=ref.url) for i, ref in enumerate(inputs)]

    def run_partition(self, config: ExtractConfig, partition: Partition, out: str) -> PartitionResult:
        return extract_source(partition.source, config)


EXTRACT = ExtractStage()
EXTRACT_PHASES: list[tuple[ExtractStage, str]] = [(EXTRACT, "")]
