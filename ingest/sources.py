"""Source files of `wit extract`: which files a SOURCE argument names, and reading one into pages.

Data flow for one source file::

    storage.open_url ──▶ SourceTap ──▶ reader (WARC / WAT / HTML file) ──▶ RawPage ...
                       (sha256, bytes,    (records → pages; page-level skips counted
                        gzip integrity)    by reason in the caller's Counter)

:class:`SourceTap` sees every byte once, as the reader pulls it: it hashes them (the source's
sha256 goes into the run record without a second read) and keeps the last record or two of a
gzipped file, for warcio to read again.

WARC and WAT files are read by FastWARC (Rust, several times warcio's speed) and by warcio, and read
as warcio alone reads them. FastWARC reads a gzipped file while each gzip member holds one record
that it reads as warcio does: a "Name: value" header warcio takes the same way, the block, two CRLF,
nothing more (the member's length in its gzip trailer says so); its inflate vouches for the members.
warcio reads the rest: from the first record that is not so seen on, and always the last record and
what follows it, and a file that is not gzipped; the tap then follows the gzip members from there to
their end, because warcio reads a truncated ``.warc.gz`` to the cut without a word.

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
import io
import json
import re
import zlib
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import IO, Any

from fastwarc.stream_io import GzipReader
from fastwarc.warc import ArchiveIterator as FastArchiveIterator
from fsspec.core import url_to_fs
from warcio.archiveiterator import ArchiveIterator
from warcio.bufferedreaders import ChunkedDataReader
from warcio.exceptions import ArchiveLoadFailed
from warcio.recordloader import ArcWarcRecordLoader
from warcio.statusandheaders import StatusAndHeadersParser, StatusAndHeadersParserException

from wit.ingest.wat import read_envelope
from wit.ingest.webpage import ParsedPage, too_many_controls
from wit.manifests import storage
from wit.manifests.storage import StorageError

# br bodies are undone with brotlicffi, the dependency, else with Google's `brotli` >= 1.2 (the same
# API; FastWARC depends on it); without either they are counted unsupported_content_encoding. warcio
# takes an installed `brotli` for its own br decoding in content_stream(), which then fails on every
# br record (AttributeError: no unused_data): nothing here calls content_stream().
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
_GZIP_MAGIC = b"\x1f\x8b"
_WARC_VERSIONS = tuple(ArcWarcRecordLoader.WARC_TYPES)  # warcio reads a record whose first line starts so
_HEADROOM = 1 << 16  # of a FastWARC record's block read past the page limit, for its HTTP header
# FastWARC reads a record only if its block is no larger: the tap keeps the last record or two for
# warcio to read again (see _read_records), and a larger record and the rest of its file go to warcio.
_FAST_MAX = 32 << 20
_GZIP_OUT = 1 << 20  # bound on what one step of the integrity check inflates (gzip bombs)
HTTP_SCHEMES = frozenset({"http", "https"})
MAX_PAGE_BYTES = 5 << 20  # extract's default --max-page-bytes
_IDENTITY = frozenset({"", "identity", "none"})  # codings that change nothing

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
        # What the tap has handed out from offset _kept_at on, while a reader may read it again.
        self._kept: deque[bytes] | None = None
        self._kept_at = 0
        self.bytes = 0
        self.problem: str | None = None  # TRUNCATED_SOURCE or CORRUPT_SOURCE, set by readers too

    def read(self, size: int | None = -1) -> bytes:
        try:
            data = self._fh.read(-1 if size is None else size)
        except OSError as exc:
            raise StorageError(f"reading {self._url} failed: {exc}") from exc
        if data:
            self._sha.update(data)
            self.bytes += len(data)
            if self._kept is not None:
                self._kept.append(data)
            if self._gzip is not None:
                self._gzip.feed(data)
        return data

    def keep(self, offset: int) -> None:
        """Keep what the tap hands out from ``offset`` on (no further back than it keeps already),
        for :meth:`reread`; what lies before it may go."""
        if self._kept is None:
            self._kept, self._kept_at = deque(), self.bytes
        while self._kept and self._kept_at + len(self._kept[0]) <= offset:
            self._kept_at += len(self._kept.popleft())

    def kept(self, start: int, end: int) -> bytes:
        """The kept bytes from offset ``start`` to ``end``."""
        out, pos = [], self._kept_at
        for chunk in self._kept or ():
            if pos >= end:
                break
            if pos + len(chunk) > start:
                out.append(chunk[max(0, start - pos) : end - pos])
            pos += len(chunk)
        return b"".join(out)

    def reread(self, offset: int) -> _Reread:
        """The file from ``offset`` (kept) on: the kept bytes from there, then what the tap reads."""
        return _Reread(self, self.kept(offset, self.bytes), offset)

    def judge_gzip(self, head: bytes) -> None:
        """Stop keeping; :meth:`finish` judges the gzip framing of ``head`` (the file from the start
        of a gzip member, or of the file, to the tap's position) and of what the tap reads after it.
        The members before ``head`` are the reader's to vouch for."""
        self._kept = None
        if self._check_gzip and head[:2] == _GZIP_MAGIC:
            self._gzip = _GzipCheck()
            self._gzip.feed(head)

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


class _Reread:
    """A tap's file from ``offset`` on, as a stream: ``head`` (bytes the tap kept), then the tap's."""

    def __init__(self, tap: SourceTap, head: bytes, offset: int) -> None:
        self._tap = tap
        self.head = head
        self._head = memoryview(head)  # what is left of it
        self._pos = offset

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            # Reads keep to the grid that reads of this size from the file's start would: warcio
            # reads a gzip member that one read holds whole otherwise than one that two reads cut.
            size -= self._pos % size
        if not self._head:
            data = self._tap.read(size)
        elif size is None or size < 0:
            data = bytes(self._head) + self._tap.read(-1)
            self._head = self._head[:0]
        else:
            data, self._head = bytes(self._head[:size]), self._head[size:]
        self._pos += len(data)
        return data

    def tell(self) -> int:
        # Record offsets are computed from this: the raw position in the file.
        return self._pos


def _content_type(value: str | None) -> tuple[str | None, str | None]:
    if not value:
        return None, None
    mime = value.split(";", 1)[0].strip().lower() or None
    m = _CHARSET.search(value)
    return mime, (m.group(1) if m else None)


def _looks_like_html(body: bytes) -> bool:
    head = body[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head


@dataclass(slots=True)
class _Record:
    """A WARC record as the readers use it, read by warcio or by FastWARC."""

    kind: str | None  # WARC-Type
    url: str | None  # WARC-Target-URI, as warcio reads it (no angle brackets, spaces as %20)
    content_type: str | None  # the WARC header's: what a resource record's block is
    stream: Any  # the block: read, readline; `limit`, what it has not handed out yet
    offset: int  # of the record (its gzip member) in the file
    cut: bool = False  # its page was read short of its end: the file ended inside it (see _read_body)


class _NotFast(Exception):
    """A FastWARC record whose block was read only in part needs more of it: warcio reads it."""


class _Block:
    """The block of a FastWARC record, held whole or up to what a page needs (``length`` bytes in
    the file), and read as warcio's LimitReader reads one, ``limit`` and all."""

    __slots__ = ("_data", "_part", "limit")

    def __init__(self, data: bytes, length: int) -> None:
        self._data = io.BytesIO(data)
        self._part = len(data) < length
        self.limit = length

    def _took(self, data: bytes, wanted: int, ended: bool) -> bytes:
        if self._part and len(data) < wanted and not ended:
            raise _NotFast
        self.limit -= len(data)
        return data

    def read(self, size: int | None = None) -> bytes:
        size = self.limit if size is None else min(size, self.limit)
        return self._took(self._data.read(size), size, False) if size else b""

    def readline(self, size: int | None = None) -> bytes:
        size = self.limit if size is None else min(size, self.limit)
        if not size:
            return b""
        line = self._data.readline(size)
        return self._took(line, size, line.endswith(b"\n"))


def _http_headers(record: _Record):
    """The HTTP status and headers of a response record, or None when they do not parse.

    Both readers leave HTTP headers to this: warcio (``no_record_parse``) would otherwise parse every
    request record's headers too and accept a garbage status line silently; FastWARC reads them its
    own way.
    """
    try:
        http = _HTTP_PARSER.parse(record.stream)
    except (StatusAndHeadersParserException, EOFError):
        return None
    if not http.statusline[:3].isdigit():
        return None
    return http


def _read_body(record: _Record, limit: int, stream=None) -> bytes | None:
    """The record's payload (``stream``, by default its block) up to ``limit + 1`` bytes; None (and
    the record marked cut, for the reader to mark the tap) when the file ends inside the record."""
    body = (record.stream if stream is None else stream).read(limit + 1)
    if len(body) <= limit and getattr(record.stream, "limit", 0) > 0:
        record.cut = True  # the file ended inside this record
        return None
    return body


def _codings(value: str | None) -> list[str]:
    return [c.strip().lower() for c in (value or "").split(",") if c.strip()]


def _is_text(data: bytes) -> bool:
    # decode_html's test: compressed data is about 11% control bytes, text in any charset almost none
    return not too_many_controls(data)


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


def _target_uri(record: _Record) -> str | None:
    url = record.url.strip("<> \t") if record.url else ""  # WARC 1.0 drafts (wget): <angle brackets>
    return url or None


def is_http(url: str) -> bool:
    return url.split(":", 1)[0].strip().lower() in HTTP_SCHEMES


def payload_stream(stream, http) -> tuple[object, list[str]]:
    """The stream of a response's payload with chunked transfer coding undone, and the content
    (then transfer) codings :func:`decode_body` must undo, from its HTTP headers."""
    transfer = _codings(http.get_header("Transfer-Encoding"))
    if transfer and transfer[-1] == "chunked":
        stream, transfer = ChunkedDataReader(stream), transfer[:-1]
    return stream, _codings(http.get_header("Content-Encoding")) + transfer


def _warc_page(record: _Record, limit: int, counts: Counter, url: str, http) -> RawPage | None:
    """A page from a response record (``http``: its parsed HTTP headers) or a resource record
    (``http`` None: the WARC header's Content-Type describes the block, which is the page)."""
    mime, charset = _content_type(record.content_type if http is None else http.get_header("Content-Type"))
    if mime is not None and mime not in HTML_TYPES:
        counts[NOT_HTML] += 1
        return None
    stream, codings = (record.stream, []) if http is None else payload_stream(record.stream, http)
    raw = _read_body(record, limit, stream)
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
    return RawPage(url=url, offset=record.offset, body=body, charset=charset)


def _warc_record(record: _Record, limit: int, counts: Counter) -> RawPage | None:
    """The page of one WARC record, or None with the record counted under a reason."""
    kind = record.kind
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
    return _warc_page(record, limit, counts, url, http)


def _wat_record(record: _Record, limit: int, counts: Counter) -> RawPage | None:
    """The page a WAT metadata record describes, or None with the record counted under a reason."""
    if record.kind != "metadata":
        counts[OTHER_RECORD] += 1  # the WAT file's own warcinfo
        return None
    body = _read_body(record, limit)
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
    return RawPage(url=url, offset=record.offset, parsed=envelope.html)


RecordPage = Callable[[_Record, int, Counter], "RawPage | None"]


def _text(value: bytes | None) -> str | None:
    """A WARC header's value as warcio reads it: UTF-8, else Latin-1; stripped."""
    if value is None:
        return None
    try:
        return value.decode().strip()
    except UnicodeDecodeError:
        return value.decode("latin-1").strip()


def _fast_record(record, limit: int) -> tuple[_Record, int] | None:
    """A FastWARC record as the readers use it, its block read (whole, or as much as a page needs),
    and the length of its gzip member's data if the member holds it alone as warcio writes it; None
    for one that warcio may read otherwise."""
    length = record.content_length
    if length > _FAST_MAX:
        return None
    headers = record.headers
    items = headers.items_bytes()
    # Names as warcio matches them (any case), the first of each.
    fields = {name.lower(): value for name, value in reversed(items)}
    kind, url = _text(fields.get(b"warc-type")), _text(fields.get(b"warc-target-uri"))
    declared = fields.get(b"content-length")
    # What FastWARC and warcio may read apart: a version line warcio does not take (warcio takes any
    # line that starts with one it knows), a header folded over lines (FastWARC joins the lines with
    # a space), a Content-Length FastWARC or Python's int() reads its own way.
    if (
        not (headers.status_line or "").upper().startswith(_WARC_VERSIONS)
        or not kind
        or " " in kind
        or (url is not None and " " in url)
        or declared is None
        or not declared.isdigit()
        or int(declared) != length
    ):
        return None
    if url is not None and url.startswith("<") and url.endswith(">"):
        url = url[1:-1]  # as warcio does
    data = record.reader.read(min(length, limit + _HEADROOM))
    view = _Record(kind, url, _text(fields.get(b"content-type")), _Block(data, length), record.stream_pos)
    # "Name: value" lines, the blank line, the block, and the two CRLF that end a record.
    size = len(headers.status_line_bytes) + 4 + sum(map(len, chain.from_iterable(items))) + 4 * len(items) + length + 4
    return view, size


def _fast_pages(tap: SourceTap, limit: int, counts: Counter, page_of: RecordPage) -> Generator[RawPage, None, int]:
    """The pages of a gzipped file's records as FastWARC reads them, while each gzip member holds one
    record, written as warcio reads it alike. Returns where warcio reads on from: the start of the
    file, or of the last record read here (its page and counts are left to warcio: it is the last
    one in the file, or its member could not be seen to hold it alone)."""
    gz = GzipReader(tap.reread(0))
    records = FastArchiveIterator(gz, parse_http=False, stream_detect=False)
    start = 0
    pending: tuple[_Record, RawPage | None, Counter, int] | None = None  # the last record read
    while True:
        try:
            record = next(records, None)
            # warcio reads a gzipped file member by member: a record that does not start one (two
            # records in a member, one split over two) would be read otherwise there.
            if record is None or record.stream_pos != gz.frame_start_position():
                return start
        except (OSError, ValueError):  # FastWARC's errors: a corrupt gzip member, stray data
            return start
        offset = record.stream_pos
        if pending is not None:
            done, page, done_counts, size = pending
            # The gzip trailer ends with the length of the member's data: the member that ends here
            # is the last record's own, and holds nothing more (blank lines, a header line that
            # warcio reads otherwise) if that length is the record's.
            if int.from_bytes(tap.kept(offset - 4, offset), "little") != size & 0xFFFFFFFF:
                return start
            for reason, n in done_counts.items():  # Counter.update's checks cost more than this
                counts[reason] += n
            if done.cut:
                tap.mark(TRUNCATED_SOURCE)
            if page is not None:
                yield page
            start = offset
            tap.keep(start)
        try:
            read = _fast_record(record, limit)
            if read is None:
                return start
            view, size = read
            record_counts: Counter = Counter()
            pending = view, page_of(view, limit, record_counts), record_counts, size
        except (OSError, ValueError, _NotFast):
            # FastWARC's errors, or a page that needs more of its record than was read.
            return start


def _warcio_pages(tap: SourceTap, start: int, limit: int, counts: Counter, page_of: RecordPage) -> Iterator[RawPage]:
    """The pages of a file's records as warcio reads them from ``start`` (the file's start, or that
    of a record that starts a gzip member) on, stopping (and marking the tap) where the file stops
    making sense."""
    stream = tap.reread(start)
    tap.judge_gzip(stream.head)
    records = ArchiveIterator(stream, no_record_parse=True)
    while (record := _next(records, tap)) is not None:
        if record.format != "warc":  # warcio reads stray text as an ARC record
            tap.mark(CORRUPT_SOURCE)
            return
        headers = record.rec_headers
        if record.rec_type is None or headers.get_header("Content-Length") is None:
            tap.mark(TRUNCATED_SOURCE)  # a record header cut off by the end of the file
            continue
        url, content_type = headers.get_header("WARC-Target-URI"), headers.get_header("Content-Type")
        view = _Record(record.rec_type, url, content_type, record.raw_stream, records.offset)
        page = page_of(view, limit, counts)
        if view.cut:
            tap.mark(TRUNCATED_SOURCE)
        if page is not None:
            yield page
        # warcio reads the rest of a record only on the next step; do it now, so that a record
        # the file ends inside (its LimitReader still owed bytes) is seen.
        records.read_to_end()
        if getattr(record.raw_stream, "limit", 0) > 0:
            tap.mark(TRUNCATED_SOURCE)
    if tap.problem is None and records.offset < stream.tell():
        # warcio ends quietly on a header cut short; its offset then stops short of the bytes read.
        tap.mark(TRUNCATED_SOURCE)


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


def _read_records(tap: SourceTap, limit: int, counts: Counter, page_of: RecordPage) -> Iterator[RawPage]:
    """The pages of a WARC or WAT file: FastWARC reads a gzipped one as long as warcio would read it
    alike (see _fast_pages), warcio the rest, which is at least the last record and what follows it
    (a cut, stray bytes: the end of a file reads as in warcio), and a file that is not gzipped."""
    tap.keep(0)
    start = 0
    if tap.read(_DRAIN_CHUNK)[:2] == _GZIP_MAGIC:
        start = yield from _fast_pages(tap, limit, counts, page_of)
    yield from _warcio_pages(tap, start, limit, counts, page_of)


def read_warc(tap: SourceTap, url: str, limit: int, counts: Counter) -> Iterator[RawPage]:
    return _read_records(tap, limit, counts, _warc_record)


def read_wat(tap: SourceTap, url: str, limit: int, counts: Counter) -> Iterator[RawPage]:
    return _read_records(tap, limit, counts, _wat_record)


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
