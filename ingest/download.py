"""`wit download`: fetch the kept pairs of a curated manifest with img2dataset into shards and a ledger.

What flows where::

    CURATED parts ──plan (driver: keep column only)──▶ partitions: ranges (part URL, first, last
       │          kept row) covering ``samples_per_shard * shards_per_partition`` kept rows each
       ▼  run_partition (worker), in a local scratch folder
    its ranges' pairs, read from the parts, hosts interleaved round-robin within the partition
    refused up front (private_host, literal_ip, bad_url: never requested)
    the rest ──img2dataset──▶ NNNNNN.tar + NNNNNN.parquet + NNNNNN_stats.json (scratch)
       │      each connection refused (private_host) if the address it reached is not global
       ▼
    OUT/shards/NNNNNN.tar      committed atomically (only shards with at least one image)
    OUT/part-NNNNN.parquet     the DOWNLOADED ledger: one row per kept pair, success or failed with an
                               error class (dns, timeout, http_404, http_429, robots_noai, decode...)

Two ways to run img2dataset (``DownloadConfig.distributor``):

- ``"wit"`` (default): a partition is one shard, downloaded by img2dataset's own shard downloader
  (``Downloader.download_shard``: its thread pool, resizer and webdataset writer) inside the
  executor's worker process. The executor is the distributor (``--workers N``, ``--part i/N`` job
  arrays), so a partition costs no process start-up; the tar ``__key__`` is the uid; requests
  carry an honest User-Agent; redirects and connections to private hosts are refused; image
  dimensions are read from the header before decoding, so a decompression bomb is refused without
  being decoded.
- ``"multiprocessing" | "pyspark" | "ray"``: a partition is ``processes`` shards, handed to
  ``img2dataset.download(distributor=...)``, whose tars are then copied with the uid as key.
  Each call starts img2dataset's process pool and logger process (seconds to tens of seconds),
  its User-Agent is img2dataset's browser string with our token appended, and the bomb guard is
  OpenCV's pixel limit (``OPENCV_IO_MAX_IMAGE_PIXELS``, set before its workers start) plus
  img2dataset's ``max_image_area``. ``"ray"`` is deprecated: ``--executor ray`` runs the ``"wit"``
  partitions as Ray tasks instead, with the same bytes out as a local run. These distributors
  are refused under ``--executor ray`` (:meth:`DownloadConfig.check_executor`).

Planning handles partition descriptors, never rows: the driver reads only the ``keep`` column of
each curated part, one part at a time, and cuts the kept rows (in part order, then row order) into
chunks of ``samples_per_shard * shards_per_partition``; a partition's params are the ranges of kept
rows it covers, a few hundred bytes however many pairs (copying the pairs themselves into the
params cost ~640 B and 7 µs per pair in the driver: 250 GB for 400M pairs). Each worker reads its
ranges from the parts and interleaves hosts round-robin within its partition, no longer across
the whole dataset: which pairs share a shard depends on the curated part layout. The dataset the
shard stage writes does not depend on this order (it orders samples by a seeded hash of the uid).
A uid is fetched once per partition (curate keeps one row per URL, so none repeats across them).

Hosts are checked three times in ``"wit"`` mode: up front (:func:`refusals`: the URL, then one
DNS lookup per host), on each redirect's URL, and at connect time: the address each socket
reached, first request and redirects alike, must be global before a byte is sent, which catches a
DNS answer that changed since the up-front lookup and a redirect to a name of a private host.
Behind an HTTP(S) proxy the peer is the proxy, so the connect-time check leaves it to the proxy.

A re-run after a kill redoes only partitions without a marker (the executor's rule); a partition's
scratch folder is named after the output and the partition, so a re-run removes what a killed
attempt left.

``RETRY`` (``--retry-failed``) reads a finished ledger and writes a NEW folder: it re-fetches only
rows that failed with a transient class (``DownloadConfig.retry_classes``: timeout, http_5xx,
http_429, connection) into new shards there, planned like the download (ranges over the old
ledger's parts of the rows to retry, never the rows in the driver), and carries every other row
over unchanged except that its ``shard`` becomes the absolute URL of the shard in the old folder.
The old folder is never written, so its run record, digest and shards stay valid, and the new
folder's run record names the old ledger as its input. Use
:func:`~wit.manifests.manifest.shard_url` to open a ledger row's shard: it handles both relative
(``shards/000001.tar``) and absolute shard values.
"""

from __future__ import annotations

import glob
import hashlib
import http.client
import io
import ipaddress
import json
import os
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
import warnings
from collections import Counter, OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wit.ingest.safety import PRIVATE_HOST, host_problem
from wit.manifests import storage
from wit.manifests.manifest import FileInfo, ManifestRef, open_manifest, read_part, shard_name, shard_url
from wit.manifests.options import Option, check_options
from wit.manifests.schemas import DOWNLOADED
from wit.manifests.stage import Partition, PartitionResult, StageError
from wit.manifests.tarwrite import rename_members

# Honest by default; a crawl at scale should add a contact URL or address (--user-agent), so site
# owners can reach whoever runs it.
DEFAULT_USER_AGENT = "wit/0.1 (research image-text dataset crawler; honours X-Robots-Tag noai)"
DISTRIBUTORS = ("wit", "multiprocessing", "pyspark", "ray")
RAY_DISTRIBUTOR_DEPRECATED = (
    "--distributor ray (img2dataset's Ray distributor) is deprecated: use --executor ray, which runs "
    "the download's partitions (and every other stage's) as Ray tasks with the same bytes out"
)
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
ENCODE_FORMATS = ("jpg", "png", "webp")
ROBOTS_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")

# Error classes of the ledger's `error` column.
ERROR_CLASSES = (
    "dns",
    "timeout",
    "connection",
    "http_404",
    "http_429",
    "http_4xx",
    "http_5xx",
    "redirect",
    "robots_noai",
    "decode",
    "too_small",
    "too_large",
    "aspect_ratio",
    "private_host",
    "literal_ip",
    "bad_url",
    "other",
)
TRANSIENT = ("timeout", "http_5xx", "http_429", "connection")
_REFUSED = "wit-refused:"  # prefix of the error our redirect guard raises, then parsed back


@dataclass(frozen=True, slots=True)
class DownloadConfig:
    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    samples_per_shard: int = 10_000  # one partition = one shard in "wit" mode
    processes: int = 1  # img2dataset processes per partition; "wit" mode uses the executor's workers
    threads: int = 64
    timeout: float = 10.0
    retries: int = 0
    distributor: str = "wit"
    user_agent: str = DEFAULT_USER_AGENT  # sent as is in "wit" mode
    user_agent_token: str = "wit"  # matched against X-Robots-Tag "<token>: noai" and put in img2dataset's UA
    disallowed_header_directives: tuple[str, ...] = ROBOTS_DIRECTIVES
    allow_private_hosts: bool = False
    max_image_pixels: int = 8192 * 8192  # decompression-bomb guard, checked before decoding
    min_image_size: int = 0  # min side; the filter stage decides on the original size instead
    max_aspect_ratio: float | None = None  # None: no limit
    retry_classes: tuple[str, ...] = TRANSIENT  # what RETRY re-fetches

    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("image-size", "int", image_size, low=1),
        Option("resize-mode", "str", resize_mode, choices=RESIZE_MODES),
        Option("encode-format", "str", encode_format, choices=ENCODE_FORMATS),
        Option(
            "encode-quality", "int", encode_quality, "JPEG/WebP quality; PNG: compression level 0-9.", low=0, high=100
        ),
        Option("samples-per-shard", "int", samples_per_shard, low=1),
        Option("threads", "int", threads, "Fetch threads per worker.", low=1),
        Option("timeout", "float", timeout, "Seconds per image.", low=0, low_open=True),
        Option("retries", "int", retries, low=0),
        Option(
            "distributor",
            "str",
            distributor,
            "wit: partitions run by the executor (--workers, --part, --executor); others: passed to "
            "img2dataset, not with --executor ray (ray: deprecated, use --executor ray).",
            choices=DISTRIBUTORS,
        ),
        Option(
            "processes",
            "int",
            processes,
            "img2dataset processes per partition (with --distributor multiprocessing|pyspark|ray).",
            low=1,
        ),
        Option("user-agent", "str", None, "The User-Agent sent (default: wit's); add a contact for crawls at scale."),
        Option("allow-private-hosts", "bool", False, "Fetch from 127.0.0.1 and private hosts (tests, demo)."),
    )

    @classmethod
    def from_options(cls, values: Mapping[str, Any], out: str | None = None) -> DownloadConfig:
        v = check_options(cls.OPTIONS, values, "download")
        if v["distributor"] == "ray":
            # FutureWarning, not DeprecationWarning: it is meant for the person running the command
            warnings.warn(RAY_DISTRIBUTOR_DEPRECATED, FutureWarning, stacklevel=2)
        return cls(**(v | {"user_agent": v["user_agent"] or DEFAULT_USER_AGENT}))

    def __post_init__(self):
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"download config: {what}")

        need(self.image_size >= 1, "image_size must be at least 1")
        need(self.resize_mode in RESIZE_MODES, f"resize_mode must be one of {', '.join(RESIZE_MODES)}")
        need(self.encode_format in ENCODE_FORMATS, f"encode_format must be one of {', '.join(ENCODE_FORMATS)}")
        if self.encode_format == "png":
            need(0 <= self.encode_quality <= 9, "encode_quality is the PNG compression level, 0 to 9")
        else:
            need(0 <= self.encode_quality <= 100, "encode_quality must lie in [0, 100]")
        need(self.samples_per_shard >= 1, "samples_per_shard must be at least 1")
        need(self.processes >= 1 and self.threads >= 1, "processes and threads must be at least 1")
        need(self.timeout > 0, "timeout must be positive")
        need(self.retries >= 0, "retries must not be negative")
        need(self.distributor in DISTRIBUTORS, f"distributor must be one of {', '.join(DISTRIBUTORS)}")
        need(
            self.distributor != "wit" or self.processes == 1,
            "with the default distributor 'wit' the executor's --workers sets the processes; "
            "--processes is for --distributor multiprocessing|pyspark|ray",
        )
        need(
            bool(self.user_agent.strip()) and bool(self.user_agent_token.strip()),
            "user agent must not be empty",
        )
        need(
            all(d.strip() and d == d.strip().lower() for d in self.disallowed_header_directives),
            "disallowed_header_directives must be lower-case words",
        )
        need(self.max_image_pixels >= 1, "max_image_pixels must be at least 1")
        need(
            self.min_image_size >= 0 and (self.max_aspect_ratio is None or self.max_aspect_ratio >= 1),
            "min_image_size >= 0, max_aspect_ratio >= 1",
        )
        unknown = set(self.retry_classes) - set(ERROR_CLASSES)
        need(not unknown, f"retry_classes has unknown error classes: {', '.join(sorted(unknown))}")

    def check_executor(self, executor: str) -> None:
        """Refuse img2dataset's own distributors inside ``--executor ray``'s tasks (see
        :func:`wit.pipeline.driver.check_executor`): each partition would start a multiprocessing
        pool, a Spark session or a Ray job of its own inside a task that Ray gave one CPU."""
        if executor == "ray" and self.distributor != "wit":
            raise ValueError(
                f"--distributor {self.distributor} cannot run under --executor ray (img2dataset's own "
                "distributor inside a one-CPU Ray task): with --executor ray keep --distributor wit, "
                "the default, and Ray runs the download's partitions"
            )

    @property
    def shards_per_partition(self) -> int:
        return 1 if self.distributor == "wit" else self.processes


@dataclass(slots=True)
class Pair:
    """One pair to fetch, as carried in a partition's params."""

    uid: str
    url: str
    text: str | None


@dataclass(slots=True)
class LedgerRow:
    uid: str
    url: str
    text: str | None
    status: str  # "success" or "failed"
    error: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    shard: str | None = None
    key: str | None = None


# -- error classes -----------------------------------------------------------------------------

_HTTP_ERROR = re.compile(r"HTTP Error (\d{3})")
_DNS = (
    "name or service not known",
    "temporary failure in name resolution",
    "nodename nor servname",
    "no address associated",
    "getaddrinfo failed",
    "name resolution",
)
_CONNECTION = (
    "connection refused",
    "connection reset",
    "remote end closed",
    "connection aborted",
    "broken pipe",
)


def classify(message: str | None) -> tuple[str | None, int | None]:
    """The error class and HTTP status (when the message has one) of an img2dataset error message."""
    if message is None:
        return None, None
    low = message.lower()
    m = _HTTP_ERROR.search(message)
    if m:
        code = int(m.group(1))
        if code == 404:
            return "http_404", code
        if code == 429:
            return "http_429", code
        if code >= 500:
            return "http_5xx", code
        if 300 <= code < 400:
            return "redirect", code  # a redirect loop or a 3xx without Location
        return "http_4xx", code
    if _REFUSED in message:
        reason = message.split(_REFUSED, 1)[1].split()[0].strip(">'\" ")
        return (reason if reason in ERROR_CLASSES else PRIVATE_HOST), None
    if "x-robots-tag" in low:
        return "robots_noai", None
    if "timed out" in low or "timeout" in low:
        return "timeout", None
    if any(s in low for s in _DNS):
        return "dns", None
    if any(s in low for s in _CONNECTION):
        return "connection", None
    if "decoding error" in low:
        return "decode", None
    if "too small" in low:
        return "too_small", None
    if "area too large" in low or "max_image_pixels" in low:  # ours, img2dataset's, OpenCV's limit
        return "too_large", None
    if "aspect ratio" in low:
        return "aspect_ratio", None
    return "other", None


# -- planning ------------------------------------------------------------------------------------


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def interleave_hosts(pairs: list[Pair]) -> list[Pair]:
    """Round-robin across hosts (hosts in order of first appearance, each host's rows in input order).

    Consecutive rows then come from different hosts, so a shard's thread pool spreads its requests
    instead of sending all of them to the site that happened to come first.
    """
    by_host: OrderedDict[str, list[Pair]] = OrderedDict()
    for p in pairs:
        by_host.setdefault(_host(p.url), []).append(p)
    queues = [iter(rows) for rows in by_host.values()]
    out: list[Pair] = []
    while queues:
        alive = []
        for q in queues:
            nxt = next(q, None)
            if nxt is not None:
                out.append(nxt)
                alive.append(q)
        queues = alive
    return out


def _chunks(pairs: list[Pair], size: int) -> list[list[Pair]]:
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]


# A partition's params name the rows it fetches, never the rows themselves: ``("fetch", ranges)``
# with ``ranges`` a tuple of ``(part URL, start, stop)``: the part's *selected* rows (kept by
# curate, or failed with a retried class) numbered from 0, ``start`` included, ``stop`` not. A few
# hundred bytes per partition however many pairs it covers: the driver never holds the pairs.
Range = tuple[str, int, int]


def _curated_selected(table: pa.Table, config: DownloadConfig) -> pa.ChunkedArray:
    return pc.fill_null(table.column("keep"), False)


def _retry_selected(table: pa.Table, config: DownloadConfig) -> pa.ChunkedArray:
    failed = pc.equal(table.column("status"), "failed")
    retried = pc.is_in(table.column("error"), value_set=pa.array(config.retry_classes, pa.string()))
    return pc.fill_null(pc.and_(failed, retried), False)


# What each input kind selects: the columns the selection reads, and the selection.
_SELECT = {
    "curated": (["keep"], _curated_selected),
    "retry": (["status", "error"], _retry_selected),
}


def plan_ranges(part_urls: list[str], config: DownloadConfig, kind: str) -> list[tuple[Range, ...]]:
    """The selected rows of ``part_urls`` (in part order, then row order) cut into chunks of
    ``samples_per_shard * shards_per_partition``, each chunk as the ranges it covers.

    Reads only the selection's columns, one part at a time: the driver holds one part's ``keep``
    column (a bit per row), never the pairs.
    """
    columns, selected = _SELECT[kind]
    size = config.samples_per_shard * config.shards_per_partition
    chunks: list[tuple[Range, ...]] = []
    current: list[Range] = []
    room = size
    for url in part_urls:
        n = pc.sum(selected(read_part(url, columns), config)).as_py() or 0
        start = 0
        while start < n:
            take = min(room, n - start)
            current.append((url, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                chunks.append(tuple(current))
                current, room = [], size
    if current:
        chunks.append(tuple(current))
    return chunks


def read_ranges(ranges: tuple[Range, ...], config: DownloadConfig, kind: str) -> list[Pair]:
    """The pairs a partition's ranges name, in order; a uid seen before in them is dropped.

    Reads one part at a time, only the columns it needs.
    """
    columns, selected = _SELECT[kind]
    pairs: list[Pair] = []
    seen: set[str] = set()
    for url, start, stop in ranges:
        table = read_part(url, ["uid", "url", "text", *columns])
        rows = table.filter(selected(table, config)).slice(start, stop - start)
        for uid, img_url, text in zip(*(rows.column(c).to_pylist() for c in ("uid", "url", "text")), strict=True):
            # A uid twice would become two tar members with one __key__; the first one is fetched.
            # (Curate keeps one row per URL, so this does not happen across partitions either.)
            if uid not in seen:
                seen.add(uid)
                pairs.append(Pair(uid, img_url, text))
    return pairs


def _fetch_partitions(part_urls: list[str], config: DownloadConfig, kind: str) -> list[Partition]:
    return [
        Partition(index=i, source=f"{kind}#{i}", params=("fetch", ranges))
        for i, ranges in enumerate(plan_ranges(part_urls, config, kind))
    ]


def _fetch(config: DownloadConfig, partition: Partition, out: str, kind: str) -> PartitionResult:
    """Read a fetch partition's pairs, interleave their hosts, download them into its shards."""
    _, ranges = partition.params
    pairs = interleave_hosts(read_ranges(ranges, config, kind))
    first = partition.index * config.shards_per_partition
    return download_pairs(config, pairs, first, out, partition.index)


# -- host safety ---------------------------------------------------------------------------------


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _is_global(address: str) -> bool:
    """Whether an IP address (``fe80::1%eth0`` style scope allowed) is global. IPv6 addresses that
    carry an IPv4 address (IPv4-mapped, 6to4, Teredo's client, NAT64's last 32 bits) are judged by
    it too: on a DNS64/NAT64 network ``64:ff9b::a00:1`` reaches 10.0.0.1."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is None and any(ip in net for net in _NAT64):
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return inner.is_global
    return True


def _resolves_private(host: str) -> bool:
    """Whether a DNS name resolves to a non-global address (False when it does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False  # img2dataset's own lookup fails the same way and the row gets class "dns"
    return any(not _is_global(info[4][0]) for info in infos)


def refusals(pairs: list[Pair], allow_private: bool, resolve: bool = True) -> dict[str, str]:
    """uid -> reason for the pairs that must not be requested.

    The URL check (``safety.host_problem``) needs no network; a name that passes it is resolved
    once per host, and a name pointing at a private address is refused too. This spares requests
    in the obvious cases; it is not the only guard: a DNS answer that changes between this lookup
    and the connection is caught at connect time (:func:`_peer_allowed`).
    """
    refused: dict[str, str] = {}
    hosts: dict[str, list[str]] = {}
    for p in pairs:
        problem = host_problem(p.url, allow_private=allow_private)
        if problem:
            refused[p.uid] = problem
        elif resolve and not allow_private:
            hosts.setdefault(_host(p.url), []).append(p.uid)
    if hosts:
        # getaddrinfo has no timeout and blocks: look hosts up side by side.
        with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
            for host, private in zip(hosts, pool.map(_resolves_private, hosts), strict=True):
                if private:
                    for uid in hosts[host]:
                        refused[uid] = PRIVATE_HOST
    return refused


class _GuardedRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses a redirect to a host the first URL could not have named (e.g. 169.254.169.254)."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        problem = host_problem(newurl, allow_private=self.allow_private)
        if problem:
            raise urllib.error.URLError(f"{_REFUSED}{problem} redirect to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _HonestUserAgent(urllib.request.BaseHandler):
    """Replaces img2dataset's browser User-Agent by ours on every request, redirects included."""

    handler_order = 100  # before the HTTP handlers send the request

    def __init__(self, user_agent: str):
        self.user_agent = user_agent

    def http_request(self, req):
        req.add_header("User-Agent", self.user_agent)
        return req

    https_request = http_request


# -- the connect-time check --------------------------------------------------------------------
# refusals() and _GuardedRedirects judge names and URLs; urllib then resolves the name again when
# it connects. A DNS answer that changes in between (rebinding), or a redirect to a *name* of a
# private host, would reach that host. So every connection is also judged by the address its
# socket reached, right after connecting and before a byte of the request (or a TLS hello) is sent.


def _peer_allowed(peer: tuple) -> bool:
    """Whether a request may be sent to ``peer``, a connected socket's ``getpeername()``
    (address, port[, flowinfo, scope]). The connect-time check's one decision (tests redefine it)."""
    return _is_global(peer[0])


class _PeerCheckedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection that refuses a non-global peer address once connected, before sending."""

    def connect(self):
        super().connect()  # for HTTPS (below): the TCP connection only, before the TLS handshake
        peer = self.sock.getpeername()
        if not _peer_allowed(peer):
            self.close()
            # urllib wraps it as URLError; classify() reads the class back from the message
            raise OSError(f"{_REFUSED}{PRIVATE_HOST} {self.host} connected to {peer[0]}")


class _PeerCheckedHTTPSConnection(http.client.HTTPSConnection, _PeerCheckedHTTPConnection):
    """HTTPS with the same check: HTTPSConnection.connect's super().connect() runs the check
    (method order: this, HTTPSConnection, _PeerCheckedHTTPConnection, HTTPConnection)."""


def _proxied(req: urllib.request.Request) -> bool:
    # Through a proxy the socket's peer is the proxy, which resolves and connects itself: the
    # check would judge the operator's proxy, not the image host, so it is left to the proxy.
    return req.has_proxy() or bool(getattr(req, "_tunnel_host", None))


class _PeerCheckedHTTPHandler(urllib.request.HTTPHandler):
    def do_open(self, http_class, req, **kwargs):
        return super().do_open(http_class if _proxied(req) else _PeerCheckedHTTPConnection, req, **kwargs)


class _PeerCheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(self, http_class, req, **kwargs):
        return super().do_open(http_class if _proxied(req) else _PeerCheckedHTTPSConnection, req, **kwargs)


@contextmanager
def _guarded_urllib(config: DownloadConfig):
    """Install our opener for img2dataset's ``urllib.request.urlopen`` calls in this process.

    Every request, redirects included (they reuse the opener): our User-Agent, redirects judged
    by URL, and unless ``allow_private_hosts`` each connection judged by the address it reached.
    urlopen uses the process-wide opener; the previous one is put back afterwards, so a caller
    running the stage in its own process (``--workers 1``) keeps its urllib as it was.
    """
    previous = urllib.request._opener  # noqa: SLF001 - the only way to restore what was installed
    handlers = [_GuardedRedirects(config.allow_private_hosts), _HonestUserAgent(config.user_agent)]
    if not config.allow_private_hosts:
        handlers += [_PeerCheckedHTTPHandler(), _PeerCheckedHTTPSHandler()]
    opener = urllib.request.build_opener(*handlers)
    urllib.request.install_opener(opener)
    try:
        yield
    finally:
        urllib.request.install_opener(previous)


# -- img2dataset ---------------------------------------------------------------------------------


def _img2dataset_env(config: DownloadConfig) -> None:
    # Before img2dataset (albumentations, cv2) is first imported in this process: albumentations
    # otherwise checks PyPI for updates, and OpenCV reads its pixel limit once, at first decode.
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(config.max_image_pixels))


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding pixels; None when PIL cannot tell."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError:
        return (-1, -1)  # past twice PIL's own limit: certainly past ours
    except (OSError, ValueError, SyntaxError):
        return None  # not PIL-readable: OpenCV decides (and fails with "Image decoding error")


def _guarded_resizer_class():
    from img2dataset.resizer import Resizer

    class GuardedResizer(Resizer):
        """img2dataset's resizer, refusing images whose header claims too many pixels.

        img2dataset checks ``max_image_area`` only after decoding, and OpenCV decodes a
        20000x20000 PNG into 400 MB (1.2 GB as colour) before that.
        """

        def __call__(self, img_stream, blurring_bbox_list=None):
            img_stream.seek(0)
            size = _header_size(img_stream.getvalue())
            if size is not None and (size[0] < 0 or size[0] * size[1] > self.max_image_area):
                what = "more than twice PIL's limit" if size[0] < 0 else f"{size[0]}x{size[1]}"
                return None, None, None, None, None, f"image area too large ({what}), not decoded"
            img_stream.seek(0)
            return super().__call__(img_stream, blurring_bbox_list)

    return GuardedResizer


def _uid_keyed_writer_class():
    import webdataset as wds
    from img2dataset.writer import WebDatasetSampleWriter

    class UidKeyedWriter(WebDatasetSampleWriter):
        """img2dataset's webdataset writer with the uid as ``__key__`` and reproducible tar bytes."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # mtime 0: the same images give the same tar, whichever attempt wrote it
            self.tarwriter = wds.TarWriter(self.tar_fd, mtime=0)

        def write(self, img_str, key, caption, meta):
            meta["key"] = meta["uid"]
            super().write(img_str, meta["uid"], caption, meta)

    return UidKeyedWriter


def _resizer_kwargs(config: DownloadConfig) -> dict:
    return dict(
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_quality=config.encode_quality,
        encode_format=config.encode_format,
        min_image_size=config.min_image_size,
        max_image_area=config.max_image_pixels,
        max_aspect_ratio=float("inf") if config.max_aspect_ratio is None else config.max_aspect_ratio,
    )


def _input_table(pairs: list[Pair]) -> pa.Table:
    return pa.table(
        {
            "uid": pa.array([p.uid for p in pairs], pa.string()),
            "caption": pa.array([p.text or "" for p in pairs], pa.string()),
            "url": pa.array([p.url for p in pairs], pa.string()),
        }
    )


def _run_inline(config: DownloadConfig, pairs: list[Pair], shard_id: int, work: str) -> str:
    """img2dataset's shard downloader on one shard, in this process; returns its output folder."""
    _img2dataset_env(config)
    from img2dataset.downloader import Downloader

    out = os.path.join(work, "out")
    os.makedirs(out, exist_ok=True)
    feather = os.path.join(work, f"{shard_id}.feather")
    table = _input_table(pairs)
    with pa.OSFile(feather, "wb") as fh, pa.ipc.new_file(fh, table.schema) as writer:
        writer.write_table(table)
    resizer = _guarded_resizer_class()(**_resizer_kwargs(config))
    schema_columns = ["uid", "caption", "url"]  # what img2dataset's Reader would hand over
    downloader = Downloader(
        sample_writer_class=_uid_keyed_writer_class(),
        resizer=resizer,
        thread_count=config.threads,
        save_caption=True,
        extract_exif=False,
        output_folder=out,
        column_list=schema_columns,
        timeout=config.timeout,
        number_sample_per_shard=config.samples_per_shard,
        oom_shard_count=6,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=config.encode_format,
        retries=config.retries,
        user_agent_token=config.user_agent_token,
        disallowed_header_directives=list(config.disallowed_header_directives) or None,
    )
    with _guarded_urllib(config):
        # Called directly rather than through Downloader.__call__, which prints and swallows a
        # shard-level error: here it is a storage or environment error and must fail the partition.
        downloader.download_shard((shard_id, feather))
    return out


def _run_img2dataset(config: DownloadConfig, pairs: list[Pair], work: str) -> str:
    """``img2dataset.download`` with the configured distributor; shards 0.. of the chunk."""
    _img2dataset_env(config)
    import img2dataset

    url_list = os.path.join(work, "input.parquet")
    pq.write_table(_input_table(pairs), url_list)
    out = os.path.join(work, "out")
    img2dataset.download(
        url_list=url_list,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["uid"],
        output_folder=out,
        output_format="webdataset",
        incremental_mode="incremental",  # "overwrite" deletes the _tmp folder it has just made
        number_sample_per_shard=config.samples_per_shard,
        oom_shard_count=6,
        processes_count=config.processes,
        thread_count=config.threads,
        distributor=config.distributor,
        timeout=config.timeout,
        retries=config.retries,
        extract_exif=False,
        compute_hash="sha256",
        user_agent_token=config.user_agent_token,
        disallowed_header_directives=list(config.disallowed_header_directives),
        enable_wandb=False,
        **_resizer_kwargs(config),
    )
    return out


# -- a partition ---------------------------------------------------------------------------------


def _work_prefix(out: str, index: int) -> str:
    tag = hashlib.sha256(storage.normalize(out).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"wit-download-{tag}-{index:05d}-")


@contextmanager
def _scratch(out: str, index: int):
    """A local scratch folder for one partition; sweeps those of killed earlier attempts."""
    prefix = _work_prefix(out, index)
    for stale in glob.glob(prefix + "*"):
        pid = stale[len(prefix) :].split("-")[0]
        if not pid.isdigit() or not storage.pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    work = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(storage.CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _ledger_from_shard(folder: str, local_id: int, shard: str, pairs: list[Pair]) -> tuple[list[LedgerRow], dict]:
    """Ledger rows for the pairs img2dataset fetched into one shard, from its .parquet and _stats.json."""
    base = os.path.join(folder, f"{local_id:06d}")
    if not os.path.exists(base + ".parquet") or not os.path.exists(base + "_stats.json"):
        raise StageError(f"img2dataset wrote no result for shard {shard} (see its output above); run again")
    with open(base + "_stats.json") as fh:
        stats = json.load(fh)
    by_uid = {r["uid"]: r for r in pq.read_table(base + ".parquet").to_pylist()}
    rows = []
    for p in pairs:
        r = by_uid.get(p.uid)
        if r is None:  # img2dataset lost it to an exception it printed and swallowed
            rows.append(LedgerRow(p.uid, p.url, p.text, "failed", "other", "no result from img2dataset"))
            continue
        ok = r["status"] == "success"
        error, http_status = classify(r["error_message"]) if not ok else (None, None)
        rows.append(
            LedgerRow(
                uid=p.uid,
                url=p.url,
                text=p.text,
                status="success" if ok else "failed",
                error=error if not ok else None,
                error_message=r["error_message"] if not ok else None,
                http_status=http_status,
                sha256=r.get("sha256") if ok else None,
                width=r["width"] if ok else None,
                height=r["height"] if ok else None,
                original_width=r["original_width"] if ok else None,
                original_height=r["original_height"] if ok else None,
                shard=shard if ok else None,
                key=r["key"] if ok else None,
            )
        )
    return rows, stats


# img2dataset's per-shard totals, summed into the partition's `extra` (its raw messages may name URLs)
_STAT_KEYS = ("count", "successes", "failed_to_download", "failed_to_resize")


def _rekey_tar(tar: str, rows: list[LedgerRow]) -> str:
    """A copy of img2dataset's tar with the uid as ``__key__`` (and mtime 0); updates ``rows``' keys.

    img2dataset numbers keys from each call's shard 0, so two partitions would share keys; the
    uid is unique and is what later stages join on. A copy of local bytes is cheap next to the
    downloads that made them.
    """
    uid_of = {r.key: r.uid for r in rows if r.key is not None}

    def rekey(name: str) -> str:
        key, dot, ext = name.partition(".")
        return f"{uid_of[key]}{dot}{ext}"

    out = tar + ".uid"
    rename_members(tar, out, rekey)
    for r in rows:
        r.key = r.uid if r.key is not None else None
    return out


def download_pairs(
    config: DownloadConfig, pairs: list[Pair], first_shard: int, out: str, index: int
) -> PartitionResult:
    """Fetch ``pairs`` into shards ``first_shard``.. of ``out``; the ledger rows in input order."""
    refused = refusals(pairs, config.allow_private_hosts)
    fetch = [p for p in pairs if p.uid not in refused]
    rows: dict[str, LedgerRow] = {
        p.uid: LedgerRow(p.uid, p.url, p.text, "failed", refused[p.uid], f"not requested: {refused[p.uid]}")
        for p in pairs
        if p.uid in refused
    }
    files: list[FileInfo] = []
    extra: dict = {"shards": [], "img2dataset": {}}
    if fetch:
        with _scratch(out, index) as work:
            groups = _chunks(fetch, config.samples_per_shard)
            if config.distributor == "wit":
                folder = _run_inline(config, groups[0], first_shard, work)
                ids = [first_shard]
            else:
                folder = _run_img2dataset(config, fetch, work)
                ids = list(range(len(groups)))
            stat_totals: Counter = Counter()
            for j, (local_id, group) in enumerate(zip(ids, groups, strict=True)):
                shard = shard_name(first_shard + j)
                shard_rows, stats = _ledger_from_shard(folder, local_id, shard, group)
                stat_totals.update({k: stats[k] for k in _STAT_KEYS if isinstance(stats.get(k), int)})
                rows.update((r.uid, r) for r in shard_rows)
                successes = sum(r.status == "success" for r in shard_rows)
                if successes:
                    tar = os.path.join(folder, f"{local_id:06d}.tar")
                    if config.distributor != "wit":
                        tar = _rekey_tar(tar, shard_rows)
                    info = FileInfo(name=shard, sha256=_sha256_file(tar), bytes=os.path.getsize(tar), rows=successes)
                    storage.put_file(tar, storage.join(out, shard))
                    files.append(info)
                    extra["shards"].append(shard)
            extra["img2dataset"] = dict(sorted(stat_totals.items()))
    ledger = [rows[p.uid] for p in pairs]
    counts = Counter(r.error or "kept" for r in ledger)
    table = pa.Table.from_pylist([_row_dict(r) for r in ledger], schema=DOWNLOADED)
    return PartitionResult(table=table, counts=dict(counts), files=files, extra=extra)


def _row_dict(r: LedgerRow) -> dict:
    return {name: getattr(r, name) for name in LedgerRow.__slots__}


# -- the stages ----------------------------------------------------------------------------------


class DownloadStage:
    """CURATED (keep rows) -> DOWNLOADED ledger + ``shards/NNNNNN.tar``."""

    name = "download"
    kind = "downloaded"

    def partitions(self, config: DownloadConfig, inputs: list[ManifestRef]) -> list[Partition]:
        if not inputs:
            raise StageError("download needs a curated manifest")
        parts = [u for ref in inputs for u in open_manifest(ref.url, expect_kind="curated").part_urls()]
        # No kept pair at all still makes one (empty) partition: an empty ledger, not an error.
        return _fetch_partitions(parts, config, "curated") or [
            Partition(index=0, source="curated#0", params=("fetch", ()))
        ]

    def run_partition(self, config: DownloadConfig, partition: Partition, out: str) -> PartitionResult:
        return _fetch(config, partition, out, "curated")


class DownloadRetryStage:
    """A finished DOWNLOADED ledger -> a new ledger: transient failures re-fetched, the rest carried.

    Partitions: first the re-fetch chunks (new shards in the new folder), then one carry
    partition per part of the old ledger (its other rows, ``shard`` made absolute).
    """

    name = "download-retry"
    kind = "downloaded"

    def partitions(self, config: DownloadConfig, inputs: list[ManifestRef]) -> list[Partition]:
        if len(inputs) != 1:
            raise StageError("--retry-failed takes exactly one downloaded manifest")
        manifest = open_manifest(inputs[0].url, expect_kind="downloaded")
        fetch = _fetch_partitions(manifest.part_urls(), config, "retry")
        carry = [
            Partition(index=len(fetch) + k, source=url, params=("carry", manifest.url))
            for k, url in enumerate(manifest.part_urls())
        ]
        return fetch + carry

    def run_partition(self, config: DownloadConfig, partition: Partition, out: str) -> PartitionResult:
        mode, params = partition.params
        if mode == "fetch":
            return _fetch(config, partition, out, "retry")
        old = params
        table = read_part(partition.source)
        rows = table.filter(pc.invert(_retry_selected(table, config))).to_pylist()  # what fetch leaves
        for r in rows:
            if r["shard"] is not None:
                r["shard"] = shard_url(old, r["shard"])
        table = pa.Table.from_pylist(rows, schema=DOWNLOADED)
        counts = Counter(r["error"] or "kept" for r in rows)
        return PartitionResult(table=table, counts=dict(counts), extra={"carried_from": old})


DOWNLOAD = DownloadStage()
DOWNLOAD_PHASES: list[tuple[DownloadStage, str]] = [(DOWNLOAD, "")]
RETRY = DownloadRetryStage()
RETRY_PHASES: list[tuple[DownloadRetryStage, str]] = [(RETRY, "")]

__all__ = [
    "DOWNLOAD",
    "DOWNLOAD_PHASES",
    "DOWNLOADED",
    "ERROR_CLASSES",
    "RETRY",
    "RETRY_PHASES",
    "TRANSIENT",
    "DownloadConfig",
    "DownloadRetryStage",
    "DownloadStage",
    "LedgerRow",
    "Pair",
    "classify",
    "download_pairs",
    "interleave_hosts",
    "plan_ranges",
    "read_ranges",
    "refusals",
]
