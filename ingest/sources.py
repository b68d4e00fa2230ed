"""Source files of `wit extract`: which files a SOURCE argument names, and reading one into pages.

Data flow for one source file::

    storage.open_url ──▶ SourceTap ──▶ reader (WARC / WAT / HTML file) ──▶ RawPage ...
                       (sha256, bytes,    (records → pages; page-level skips counted
                        gzip integrity)    by reason in the caller's Counter)

:class:`SourceTap` sees every byte once, as the reader pulls it: it hashes them (the source's
sha256 goes into the run record without a second read) and, for gzipped files, follows the gzip
members to their end, because warcio reads a truncated ``.warc.gz`` to the cut without a word.

Readers never raise on bad data: a record they cannot use is counted under a reason and skipped;
an unreadable rest of a file marks the tap ``truncated_source`` or ``corrupt_source`` and stops.
Only storage errors (the file vanished, the endpoint is down) raise, as ``StorageError``.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from fsspec.core import url_to_fs
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed
from warcio.statusandheaders import StatusAndHeadersParser, StatusAndHeadersParserException

from wit.ingest.wat import read_envelope
from wit.ingest.webpage import ParsedPage
from wit.manifests import storage
from wit.manifests.storage import StorageError

# Longest suffix first: `.warc.wat.gz` is a WAT, not a WARC.
SUFFIXES: tuple[tuple[str, str], ...] = (
    (".warc.wat.gz", "wat"),
    (".wat.gz", "wat"),
    (".wat", "wat"),
    (".warc.gz", "warc"),
    (".warc", "warc"),
    (".html", "html"),
    (".htm", "html"),
)
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_GLOB_CHARS = re.compile(r"[*?\[]")
_CHARSET = re.compile(r"""charset\s*=\s*["']?([^"';\s]+)""", re.I)
_HTTP_PARSER = StatusAndHeadersParser(["HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/2.0", "HTTP/3"], verify=True)
_DRAIN_CHUNK = 1 << 16
_GZIP_OUT = 1 << 20  # bound on what one step of the integrity check inflates (gzip bombs)

# Counted per page or per source (image-level reasons live in extract).
PAGES = "pages"
NOT_HTML = "not_html"
PAGE_TOO_LARGE = "page_too_large"
BAD_HTTP_HEADER = "bad_http_header"
BAD_RECORD = "bad_record"  # a WAT record whose JSON does not parse, a response without a URL
TRUNCATED_SOURCE = "truncated_source"
CORRUPT_SOURCE = "corrupt_source"
EMPTY_SOURCE = "empty_source"


@dataclass(slots=True)
class RawPage:
    url: str  # where the page was fetched from (WARC-Target-URI, or the HTML file's URL)
    offset: int | None  # byte offset of its record in the source file; None for an HTML file
    body: bytes | None = None  # the HTML (WARC, HTML files); None when `parsed` is given
    charset: str | None = None  # declared by the HTTP header
    parsed: ParsedPage | None = None  # WAT: links Common Crawl already parsed
    canonical_ok: bool = False  # an HTML file's <link rel=canonical> may name its real URL


def source_format(url: str) -> str | None:
    """``warc``, ``wat`` or ``html`` from the file name; None for anything else."""
    name = storage.basename(url).lower()
    for suffix, fmt in SUFFIXES:
        if name.endswith(suffix):
            return fmt
    return None


# --- which files -------------------------------------------------------------------------------


def _walk(folder: str) -> list[str]:
    names = storage.listdir(folder, recursive=True)
    # Dot files are the temporary names of atomic writers and editors, never sources.
    keep = [n for n in names if source_format(n) and not storage.basename(n).startswith(".")]
    return [storage.normalize(storage.join(folder, n)) for n in keep]


def _glob(pattern: str) -> list[str]:
    try:
        fs, path = url_to_fs(pattern)
        matches = fs.glob(path)
    except (OSError, ValueError, ImportError) as exc:
        raise StorageError(f"cannot list {pattern}: {exc}") from exc
    return [storage.normalize(fs.unstrip_protocol(m)) for m in sorted(matches)]


def _expand_one(url: str) -> list[str]:
    if storage.isdir(url):
        found = _walk(url)
        if not found:
            kinds = ", ".join(s for s, _ in SUFFIXES)
            raise ValueError(f"source folder {url} holds no {kinds} files")
        return found
    if storage.exists(url):
        if source_format(url) is None:
            raise ValueError(f"source {url}: not a WARC, WAT or HTML file (by its name)")
        return [storage.normalize(url)]
    if not _GLOB_CHARS.search(url):
        raise ValueError(f"source {url} does not exist")
    found = []
    for match in _glob(url):
        if storage.isdir(match):
            found += _walk(match)
        elif source_format(match):
            found.append(match)
    if not found:
        raise ValueError(f"source pattern {url} matches no WARC, WAT or HTML file")
    return found


def expand_sources(urls: Iterable[str]) -> list[str]:
    """The source files that files, folders (recursively) and glob patterns name; sorted, unique.

    Raises ValueError for a source that names nothing usable, StorageError when storage fails.
    """
    found: set[str] = set()
    for url in urls:
        found.update(_expand_one(str(url)))
    if not found:
        raise ValueError("no sources given")
    return sorted(found)


# --- reading one file --------------------------------------------------------------------------


class _GzipCheck:
    """Inflates a multi-member gzip stream alongside the reader and throws the output away, to
    tell a complete file from a truncated or corrupt one."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(31)
        self._fed = False  # the current member has received data
        self.corrupt = False

    def feed(self, data: bytes) -> None:
        try:
            while data and not self.corrupt:
                self._fed = True
                self._d.decompress(data, _GZIP_OUT)
                if self._d.eof:
                    data = self._d.unused_data
                    self._d, self._fed = zlib.decompressobj(31), False
                else:
                    data = self._d.unconsumed_tail
        except zlib.error:
            self.corrupt = True

    def complete(self) -> bool:
        if self.corrupt:
            return False
        try:
            # Output held back by the size bound comes out now; the member may end with it.
            while self._fed and not self._d.eof and self._d.decompress(b"", _GZIP_OUT):
                pass
        except zlib.error:
            self.corrupt = True
            return False
        return not self._fed or self._d.eof


class SourceTap:
    """A read-only stream over an opened source file; see the module docstring."""

    def __init__(self, fh: IO[bytes], url: str, check_gzip: bool = True) -> None:
        self._fh = fh
        self._url = url
        self._sha = hashlib.sha256()
        self._check_gzip = check_gzip
        self._gzip: _GzipCheck | None = None
        self.bytes = 0
        self.problem: str | None = None  # TRUNCATED_SOURCE or CORRUPT_SOURCE, set by readers too

    def read(self, size: int | None = -1) -> bytes:
        try:
            data = self._fh.read(-1 if size is None else size)
        except OSError as exc:
            raise StorageError(f"reading {self._url} failed: {exc}") from exc
        if data:
            if self.bytes == 0 and self._check_gzip and data[:2] == b"\x1f\x8b":
                self._gzip = _GzipCheck()
            self._sha.update(data)
            self.bytes += len(data)
            if self._gzip is not None:
                self._gzip.feed(data)
        return data

    def tell(self) -> int:
        # warcio computes record offsets from this: bytes handed out so far, i.e. the raw position.
        return self.bytes

    def mark(self, problem: str) -> None:
        self.problem = self.problem or problem

    def finish(self) -> None:
        """Read what the reader left (so the hash covers the file) and judge the gzip framing."""
        while self.read(_DRAIN_CHUNK):
            pass
        if self._gzip is not None and not self._gzip.complete():
            # The gzip verdict is the precise one: warcio may have called the cut garbage.
            self.problem = CORRUPT_SOURCE if self._gzip.corrupt else TRUNCATED_SOURCE

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


def _content_type(value: str | None) -> tuple[str | None, str | None]:
    if not value:
        return None, None
    mime = value.split(";", 1)[0].strip().lower() or None
    m = _CHARSET.search(value)
    return mime, (m.group(1) if m else None)


def _looks_like_html(body: bytes) -> bool:
    head = body[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head


def _http_headers(record):
    """The HTTP status and headers of a response record, or None when they do not parse.

    Records are read with ``no_record_parse``: warcio would otherwise parse every request
    record's headers too (a quarter of its time here) and accept a garbage status line silently.
    """
    try:
        http = _HTTP_PARSER.parse(record.raw_stream)
    except (StatusAndHeadersParserException, EOFError):
        return None
    if not http.statusline[:3].isdigit():
        return None
    record.http_headers = http  # so that content_stream() undoes chunking and content encoding
    return http


def _read_body(record, tap: SourceTap, limit: int) -> bytes | None:
    """The record's payload up to ``limit + 1`` bytes; None (and the tap marked) when cut short."""
    body = record.content_stream().read(limit + 1)
    if len(body) <= limit and getattr(record.raw_stream, "limit", 0) > 0:
        tap.mark(TRUNCATED_SOURCE)  # the file ended inside this record
        return None
    return body


def _warc_response(record, records: ArchiveIterator, tap: SourceTap, limit: int, counts: Counter) -> RawPage | None:
    http = _http_headers(record)
    if http is None:
        counts[BAD_HTTP_HEADER] += 1
        return None
    mime, charset = _content_type(http.get_header("Content-Type"))
    if mime is not None and mime not in HTML_TYPES:
        counts[NOT_HTML] += 1
        return None
    body = _read_body(record, tap, limit)
    if body is None:
        return None
    if mime is None and not _looks_like_html(body):
        counts[NOT_HTML] += 1
        return None
    counts[PAGES] += 1
    if len(body) > limit:
        counts[PAGE_TOO_LARGE] += 1
        return None
    url = record.rec_headers.get_header("WARC-Target-URI")
    if not url:
        counts[BAD_RECORD] += 1
        return None
    return RawPage(url=url.strip("<> "), offset=records.get_record_offset(), body=body, charset=charset)


def _next(records: ArchiveIterator, tap: SourceTap):
    """The next record, or None at the end of the file or where it stops making sense."""
    try:
        return next(records, None)
    except ArchiveLoadFailed:
        tap.mark(CORRUPT_SOURCE)
    except AttributeError:
        # warcio (1.7) fails this way on a response header without WARC-Target-URI: a header cut
        # short by the end of the file.
        tap.mark(TRUNCATED_SOURCE)
    return None


def _records(tap: SourceTap) -> Iterator[tuple[object, ArchiveIterator]]:
    """The WARC records of a tap, stopping (and marking the tap) where the file stops making sense."""
    records = ArchiveIterator(tap, no_record_parse=True)
    while (record := _next(records, tap)) is not None:
        if record.format != "warc":  # warcio reads stray text as an ARC record
            tap.mark(CORRUPT_SOURCE)
            return
        if record.rec_type is None or record.rec_headers.get_header("Content-Length") is None:
            tap.mark(TRUNCATED_SOURCE)  # a record header cut off by the end of the file
            continue
        yield record, records
        # warcio reads the rest of a record only on the next step; do it now, so that a record
        # the file ends inside (its LimitReader still owed bytes) is seen.
        records.read_to_end()
        if getattr(record.raw_stream, "limit", 0) > 0:
            tap.mark(TRUNCATED_SOURCE)
    if tap.problem is None and records.offset < tap.bytes:
        # warcio ends quietly on a header cut short; its offset then stops short of the bytes read.
        tap.mark(TRUNCATED_SOURCE)


def read_warc(tap: SourceTap, url: str, limit: int, counts: Counter) -> Iterator[RawPage]:
    for record, records in _records(tap):
        if record.rec_type == "response":
            page = _warc_response(record, records, tap, limit, counts)
            if page is not None:
                yield page


def _wat_page(record, records: ArchiveIterator, tap: SourceTap, limit: int, counts: Counter) -> RawPage | None:
    body = _read_body(record, tap, limit)
    if body is None:
        return None
    if len(body) > limit:
        counts[PAGE_TOO_LARGE] += 1
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        counts[BAD_RECORD] += 1
        return None
    envelope = read_envelope(doc)
    if envelope.warc_type != "response":
        return None  # WAT describes request and warcinfo records too
    if not envelope.url:
        counts[BAD_RECORD] += 1
        return None
    if envelope.html is None:
        counts[NOT_HTML] += 1
        return None
    counts[PAGES] += 1
    return RawPage(url=envelope.url, offset=records.get_record_offset(), parsed=envelope.html)


def read_wat(tap: SourceTap, url: str, limit: int, counts: Counter) -> Iterator[RawPage]:
    for record, records in _records(tap):
        if record.rec_type == "metadata":
            page = _wat_page(record, records, tap, limit, counts)
            if page is not None:
                yield page


def html_file_url(url: str) -> str:
    """The page URL of an HTML file: ``file://`` + its absolute path, or its remote URL."""
    url = storage.normalize(url)
    return url if "://" in url else "file://" + url


def read_html(tap: SourceTap, url: str, limit: int, counts: Counter) -> Iterator[RawPage]:
    body = tap.read(limit + 1)
    if not body:
        return
    counts[PAGES] += 1
    if len(body) > limit:
        counts[PAGE_TOO_LARGE] += 1
        return
    yield RawPage(url=html_file_url(url), offset=None, body=body, canonical_ok=True)


Reader = Callable[[SourceTap, str, int, Counter], Iterator[RawPage]]
READERS: dict[str, Reader] = {"warc": read_warc, "wat": read_wat, "html": read_html}
