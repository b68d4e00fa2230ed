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

Every WARC record that does not become a page is counted once: ``not_http`` (a response or
resource record for a ``dns:``, ``whois:``, ``ftp:``, ``metadata:``, ``urn:`` ... URI: Heritrix
writes one ``dns:`` response per host it resolves), ``revisit`` (the payload is stored elsewhere;
not followed), ``other_record`` (warcinfo, request, metadata, conversion, continuation: never a
page), ``not_html``, ``bad_http_header``, ``bad_record``, and the body's own problems:
``bad_content_encoding`` (a ``Content-Encoding``, gzip, deflate or br, that does not decode) and
``unsupported_content_encoding`` (one no decoder here knows: ``compress``, ``zstd``). A WAT file
counts the records its metadata records describe the same way. ``resource`` records for http(s)
URIs hold a page without HTTP headers (the WARC ``Content-Type`` says what it is) and are read.

Content codings are undone here, not by warcio (which prints a failure to stderr and hands out
what it has): the HTTP ``Transfer-Encoding`` codings other than ``chunked``, then the
``Content-Encoding`` ones, last applied first, each with its output bounded by the page limit (a
small compressed body can inflate to gigabytes). A body that says it is encoded but is plain text
(ClueWeb09 says ``gzip`` over plain pages) is read as it is; a cut-off encoded body (a crawler's
size limit) gives what it holds.
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
from warcio.bufferedreaders import ChunkedDataReader
from warcio.exceptions import ArchiveLoadFailed
from warcio.statusandheaders import StatusAndHeadersParser, StatusAndHeadersParserException

from wit.ingest.wat import read_envelope
from wit.ingest.webpage import ParsedPage
from wit.manifests import storage
from wit.manifests.storage import StorageError

# brotlicffi is the dependency (warcio takes an installed `brotli` module for its own br decoding,
# which then fails on every br record, AttributeError: no unused_data); Google's `brotli` >= 1.2
# has the same API. Without either, br bodies are counted unsupported_content_encoding.
try:
    import brotlicffi as brotli
except ImportError:  # pragma: no cover
    try:
        import brotli
    except ImportError:
        brotli = None

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
HTTP_SCHEMES = frozenset({"http", "https"})
_IDENTITY = frozenset({"", "identity", "none"})  # codings that change nothing
# Bytes deleted to count control bytes (C0 but tab, newline, form feed, carriage return; DEL), as
# decode_html does: compressed data is about 11% control bytes, text in any charset almost none.
_NOT_CONTROL = bytes(b for b in range(256) if not (b < 32 and b not in (9, 10, 12, 13) or b == 127))

# Counted per page or per source (image-level reasons live in extract).
PAGES = "pages"
NOT_HTML = "not_html"
PAGE_TOO_LARGE = "page_too_large"
BAD_HTTP_HEADER = "bad_http_header"
BAD_RECORD = "bad_record"  # a WAT record whose JSON does not parse, a response without a URL
NOT_HTTP = "not_http"  # a response or resource record for a dns:, whois:, ftp: ... URI
REVISIT = "revisit"  # a revisit record: its payload is another record's (deduplication)
OTHER_RECORD = "other_record"  # warcinfo, request, metadata, conversion, continuation records
BAD_CONTENT_ENCODING = "bad_content_encoding"  # gzip/deflate/br data that does not decode
UNSUPPORTED_CONTENT_ENCODING = "unsupported_content_encoding"  # compress, zstd, ...: no decoder
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
    # True only for a saved HTML file whose URL nobody gave (--page-url, --page-urls): its
    # <link rel=canonical> then stands in for the unknown URL it was fetched from.
    canonical_ok: bool = False


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
    record.http_headers = http  # where warcio keeps them when it parses the record itself
    return http


def _read_body(record, tap: SourceTap, limit: int, stream=None) -> bytes | None:
    """The record's payload (``stream``, by default its raw stream) up to ``limit + 1`` bytes;
    None (and the tap marked) when the file ends inside the record."""
    body = (record.raw_stream if stream is None else stream).read(limit + 1)
    if len(body) <= limit and getattr(record.raw_stream, "limit", 0) > 0:
        tap.mark(TRUNCATED_SOURCE)  # the file ended inside this record
        return None
    return body


def _codings(value: str | None) -> list[str]:
    return [c.strip().lower() for c in (value or "").split(",") if c.strip()]


def _is_text(data: bytes) -> bool:
    return len(data.translate(None, _NOT_CONTROL)) * 100 <= len(data)


def _inflate(data: bytes, wbits: int, limit: int) -> tuple[bytes, bool]:
    """gzip (several members too) or deflate data, inflated up to ``limit + 1`` bytes; and whether
    the stream ended (False: cut short, or stopped at the bound)."""
    out = bytearray()
    while True:
        d = zlib.decompressobj(wbits)
        out += d.decompress(data, limit + 1 - len(out))
        if not d.eof or len(out) > limit:
            return bytes(out), d.eof
        data = d.unused_data
        if wbits != 47 or data[:2] != b"\x1f\x8b":  # another gzip member follows, or the end
            return bytes(out), True


def _unbrotli(data: bytes, limit: int) -> tuple[bytes, bool]:
    d = brotli.Decompressor()
    out = d.process(data, output_buffer_limit=limit + 1)
    while len(out) <= limit and not d.can_accept_more_data():
        more = d.process(b"", output_buffer_limit=limit + 1 - len(out))
        if not more:
            break
        out += more
    return out, d.is_finished()


def _deflate(data: bytes, limit: int) -> tuple[bytes, bool]:
    # HTTP's deflate is zlib-wrapped; some servers send it raw, which browsers accept too.
    zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
    return _inflate(data, zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS, limit)


_DECODERS: dict[str, Callable[[bytes, int], tuple[bytes, bool]]] = {
    "gzip": lambda data, limit: _inflate(data, 47, limit),  # 47: a gzip or zlib header
    "x-gzip": lambda data, limit: _inflate(data, 47, limit),
    "deflate": _deflate,
}
if brotli is not None:
    _DECODERS["br"] = _unbrotli
_DECODE_ERRORS = (zlib.error,) if brotli is None else (zlib.error, brotli.error)


def decode_body(body: bytes, codings: list[str], limit: int) -> tuple[bytes | None, str | None]:
    """``body`` with ``codings`` (in the order they were applied) undone: ``(bytes, None)``, or
    ``(None, reason)``. Output stops past ``limit`` bytes; the caller judges the size."""
    for coding in reversed(codings):
        if coding in _IDENTITY:
            continue
        decoder = _DECODERS.get(coding)
        if decoder is None:
            if _is_text(body):
                continue  # a label that means nothing here (utf-8 is seen) over a plain body
            return None, UNSUPPORTED_CONTENT_ENCODING
        try:
            out, ended = decoder(body, limit)
        except _DECODE_ERRORS:
            out, ended = b"", False
        # Decoded; or stopped at the bound; or cut short (a crawler's size limit), whose text is kept.
        # A stream that stops early with no text out of it is no such stream: brotli, which has no
        # header, reads noise as an unfinished uncompressed block.
        if ended or len(out) > limit or (out and _is_text(out)):
            body = out
        elif not _is_text(body):
            return None, BAD_CONTENT_ENCODING
        # else: plain text under an encoding label (ClueWeb09's gzip): read as it is
    return body, None


def _target_uri(record) -> str | None:
    url = record.rec_headers.get_header("WARC-Target-URI")
    url = url.strip("<> \t") if url else ""  # WARC 1.0 drafts (wget) wrote it in <angle brackets>
    return url or None


def is_http(url: str) -> bool:
    return url.split(":", 1)[0].strip().lower() in HTTP_SCHEMES


def _warc_page(
    record, records: ArchiveIterator, tap: SourceTap, limit: int, counts: Counter, url: str, http
) -> RawPage | None:
    """A page from a response record (``http``: its parsed HTTP headers) or a resource record
    (``http`` None: the WARC header's Content-Type describes the block, which is the page)."""
    headers = record.rec_headers if http is None else http
    mime, charset = _content_type(headers.get_header("Content-Type"))
    if mime is not None and mime not in HTML_TYPES:
        counts[NOT_HTML] += 1
        return None
    stream, codings = record.raw_stream, []
    if http is not None:
        transfer = _codings(http.get_header("Transfer-Encoding"))
        if transfer and transfer[-1] == "chunked":
            stream, transfer = ChunkedDataReader(record.raw_stream), transfer[:-1]
        codings = _codings(http.get_header("Content-Encoding")) + transfer
    raw = _read_body(record, tap, limit, stream)
    if raw is None:
        return None
    body, problem = decode_body(raw, codings, limit)
    if body is None:
        if mime is not None:
            counts[PAGES] += 1
        counts[problem] += 1
        return None
    if mime is None and not _looks_like_html(body):
        counts[NOT_HTML] += 1
        return None
    counts[PAGES] += 1
    if len(body) > limit or len(raw) > limit:
        counts[PAGE_TOO_LARGE] += 1
        return None
    return RawPage(url=url, offset=records.get_record_offset(), body=body, charset=charset)


def _warc_record(record, records: ArchiveIterator, tap: SourceTap, limit: int, counts: Counter) -> RawPage | None:
    """The page of one WARC record, or None with the record counted under a reason."""
    kind = record.rec_type
    if kind not in ("response", "resource"):
        counts[REVISIT if kind == "revisit" else OTHER_RECORD] += 1
        return None
    url = _target_uri(record)
    if url is None:
        counts[BAD_RECORD] += 1
        return None
    if not is_http(url):
        counts[NOT_HTTP] += 1  # dns:, whois:, ftp:, metadata: ...: no HTTP header to read
        return None
    http = None
    if kind == "response":
        http = _http_headers(record)
        if http is None:
            counts[BAD_HTTP_HEADER] += 1
            return None
    return _warc_page(record, records, tap, limit, counts, url, http)


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
        page = _warc_record(record, records, tap, limit, counts)
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
    kind = envelope.warc_type
    if kind not in ("response", "resource"):
        # WAT describes every record of its WARC: requests, warcinfo, metadata, revisits too
        counts[REVISIT if kind == "revisit" else OTHER_RECORD if kind else BAD_RECORD] += 1
        return None
    url = (envelope.url or "").strip("<> \t")
    if not url:
        counts[BAD_RECORD] += 1
        return None
    if not is_http(url):
        counts[NOT_HTTP] += 1
        return None
    if envelope.html is None:
        counts[NOT_HTML] += 1
        return None
    counts[PAGES] += 1
    return RawPage(url=url, offset=records.get_record_offset(), parsed=envelope.html)


def read_wat(tap: SourceTap, url: str, limit: int, counts: Counter) -> Iterator[RawPage]:
    for record, records in _records(tap):
        if record.rec_type != "metadata":
            counts[OTHER_RECORD] += 1  # the WAT file's own warcinfo
            continue
        page = _wat_page(record, records, tap, limit, counts)
        if page is not None:
            yield page


def html_file_url(url: str) -> str:
    """The page URL of an HTML file: ``file://`` + its absolute path, or its remote URL."""
    url = storage.normalize(url)
    return url if "://" in url else "file://" + url


def read_html(tap: SourceTap, url: str, limit: int, counts: Counter, page_url: str | None = None) -> Iterator[RawPage]:
    """The page of a saved HTML file. ``page_url``: the URL it was fetched from, when known; without
    it the page's URL is the file's own (see :func:`html_file_url`), or its canonical link."""
    body = tap.read(limit + 1)
    if not body:
        return
    counts[PAGES] += 1
    if len(body) > limit:
        counts[PAGE_TOO_LARGE] += 1
        return
    if page_url:
        yield RawPage(url=page_url, offset=None, body=body)
    else:
        yield RawPage(url=html_file_url(url), offset=None, body=body, canonical_ok=True)


Reader = Callable[[SourceTap, str, int, Counter], Iterator[RawPage]]
READERS: dict[str, Reader] = {"warc": read_warc, "wat": read_wat, "html": read_html}
