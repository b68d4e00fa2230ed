"""download: every planted failure ends in the ledger with its class; safety; S3; kill/resume; retry.

The synthetic web is served on 127.0.0.1 with ``delay_scale`` 1: a ``slow`` image answers after
2 s, and the download timeout is 1 s, so it fails as ``timeout`` while every other response (a few
ms) is far inside it. Four threads per shard keep the connections below the test server's listen
backlog (5), so no SYN is dropped and retransmitted a second later, which would look like a timeout.

Runs that are compared row by row (local vs S3, killed vs uninterrupted) each get a fresh server on
the same port: the URLs, hence the uids, are the same, and the ``rate_limited`` images, which 429
only on their first request, behave the same.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
import webdataset as wds

from wit.ingest import download
from wit.ingest.download import (
    DOWNLOAD,
    RETRY,
    DownloadConfig,
    Pair,
    _guarded_urllib,
    _GuardedRedirects,
    classify,
    interleave_hosts,
    refusals,
)
from wit.ingest.synthetic import MessConfig, SyntheticWebServer, generate_web
from wit.manifests import storage
from wit.manifests.manifest import ManifestRef, read_table, shard_url
from wit.manifests.stage import Partition, PartitionResult
from wit.manifests.verify import verify
from wit.pipeline.executor import run_stage

from conftest import free_port

DELAY_SCALE = 1.0  # slow images: 2.0 s
TIMEOUT = 1.0


def config(**kw) -> DownloadConfig:
    base = dict(
        image_size=64,
        samples_per_shard=40,
        threads=4,
        timeout=TIMEOUT,
        allow_private_hosts=True,
    )
    return DownloadConfig(**{**base, **kw})


# -- a curated manifest built straight from the ground truth -----------------------------------


@dataclass(frozen=True, slots=True)
class RowsConfig:
    rows: tuple  # (uid, url, text, page_url, keep)
    parts: int = 1  # the rows split evenly over this many part files


class CuratedRows:
    name = "test-curated"
    kind = "curated"

    def partitions(self, config, inputs):
        return [Partition(index=k, source="rows") for k in range(config.parts)]

    def run_partition(self, config, partition, out):
        n, k = len(config.rows), partition.index
        rows = config.rows[k * n // config.parts : (k + 1) * n // config.parts]
        cols = list(zip(*rows, strict=True))
        table = pa.table(
            {
                "uid": list(cols[0]),
                "url": list(cols[1]),
                "text": list(cols[2]),
                "page_url": list(cols[3]),
                "keep": list(cols[4]),
                "reason": [None if k else "test_drop" for k in cols[4]],
            }
        )
        return PartitionResult(table=table, counts={"kept": sum(cols[4])})


def uid_of(url: str, text: str) -> str:
    return hashlib.sha256(f"{url}\n{text}".encode()).hexdigest()[:32]


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    # rate_limited images 429 once, then serve: a first pass sees http_429, a retry succeeds
    return generate_web(tmp_path_factory.mktemp("web"), pages=45, seed=5, mess=MessConfig(rate_limited_failures=1))


@pytest.fixture(scope="module")
def truth(web):
    return [r for r in web.truth().to_pylist() if r["img_path"]]


def curated(
    srv: SyntheticWebServer, truth: list[dict], out: Path, kinds=None, dropped: int = 3, extra=(), parts: int = 1
) -> tuple[ManifestRef, dict[str, dict]]:
    """A curated manifest of the truth rows (``kinds`` only, if given) in ``parts`` part files;
    returns it and uid -> truth row."""
    rows, by_uid = [], {}
    for r in truth:
        if kinds is not None and r["mess"] not in kinds:
            continue
        url, text = srv.url(r["img_path"]), r["alt"] or ""
        uid = uid_of(url, text)
        if uid in by_uid:
            continue
        keep = len(by_uid) >= dropped  # the first few are curated out: never fetched
        rows.append((uid, url, text, srv.url(r["page_path"]), keep))
        by_uid[uid] = {**r, "keep": keep}
    n = len(rows)
    for k, (mess, path, text) in reversed(list(enumerate(extra))):
        url = srv.url(path)
        uid = uid_of(url, text)
        rows.insert(k * n // len(extra), (uid, url, text, None, True))  # spread evenly
        by_uid[uid] = {"mess": mess, "img_path": path, "keep": True}
    ref = run_stage(CuratedRows(), RowsConfig(tuple(rows), parts), [], str(out), progress=False).ref
    return ref, by_uid


def ledger(url: str) -> list[dict]:
    return sorted(read_table(url, expect_kind="downloaded").to_pylist(), key=lambda r: r["uid"])


def shard_samples(out: str, rows: list[dict]) -> dict[str, dict]:
    """__key__ -> sample of every shard the ledger names, read with plain webdataset."""
    urls = sorted({shard_url(out, r["shard"]) for r in rows if r["shard"]})
    samples = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, u in enumerate(urls):
            if not storage.is_local(u):  # webdataset opens s3:// only through a `pipe:` command
                local = os.path.join(tmp, f"{n}.tar")
                Path(local).write_bytes(storage.read_bytes(u))
                u = local
            for s in wds.WebDataset(u, shardshuffle=False):
                samples[s["__key__"]] = s
    return samples


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith(".wit-tmp-")]


# -- the mess --------------------------------------------------------------------------------------


def test_every_mess_kind_lands_in_the_ledger(web, truth, tmp_path):
    with SyntheticWebServer(web.root, delay_scale=DELAY_SCALE) as srv:
        # three parts of uneven kept counts: partitions (40 kept rows each) straddle part files
        ref, by_uid = curated(srv, truth, tmp_path / "curated", parts=3)
        t0 = time.monotonic()
        outcome = run_stage(DOWNLOAD, config(), [ref], str(tmp_path / "dl"), progress=False)
        took = time.monotonic() - t0
    assert outcome.done and took < 30
    rows = ledger(outcome.ref.url)
    keep = {u for u, r in by_uid.items() if r["keep"]}
    assert {r["uid"] for r in rows} == keep and len(rows) == len(keep)  # none lost, none extra

    expected = {
        "broken_link": ("failed", "http_404", 404),
        "server_error": ("failed", "http_5xx", 500),
        "rate_limited": ("failed", "http_429", 429),
        "slow": ("failed", "timeout", None),
        "noai": ("failed", "robots_noai", None),
        "corrupt": ("failed", "decode", None),
        "huge": ("failed", "too_large", None),
        "redirect": ("success", None, None),
        "tiny": ("success", None, None),
        "clean": ("success", None, None),
    }
    seen = set()
    for r in rows:
        t = by_uid[r["uid"]]
        if t["mess"] in expected:
            seen.add(t["mess"])
            assert (r["status"], r["error"], r["http_status"]) == expected[t["mess"]], (t["mess"], r)
        if r["status"] == "success":
            assert r["sha256"] == t["sha256"]  # the original bytes, before resizing
            assert (r["original_width"], r["original_height"]) == (t["width"], t["height"])
            assert max(r["width"], r["height"]) == 64 and r["key"] == r["uid"]
            assert r["shard"].startswith("shards/") and r["error"] is None
        else:
            assert r["shard"] is None and r["key"] is None and r["error_message"]
        if t["mess"] == "tiny":
            assert (r["original_width"], r["original_height"]) == (8, 8)  # the filter stage drops it
    assert seen == set(expected)

    samples = shard_samples(outcome.ref.url, rows)
    assert set(samples) == {r["uid"] for r in rows if r["status"] == "success"}
    huge = {r["uid"] for r in rows if by_uid[r["uid"]]["mess"] == "huge"}
    assert huge and not huge & set(samples)
    some = next(iter(samples.values()))
    assert {"jpg", "txt", "json"} <= set(some)
    with tarfile.open(tmp_path / "dl" / "shards" / "000000.tar") as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())  # a redone shard has the same bytes
    run = storage.read_text(storage.join(outcome.ref.url, "_run.json"))
    assert '"http_404"' in run and verify(outcome.ref.url).ok
    assert not leftovers(tmp_path / "dl")


def test_private_hosts_are_refused_by_default(web, truth, tmp_path):
    requests: list[str] = []
    # A handler thread of an earlier test's server (a slow image, still sleeping when that test
    # ended) logs to the same logger when it wakes: count only threads started after this point.
    earlier = set(threading.enumerate())

    class Count(logging.Handler):
        def emit(self, record):
            if threading.current_thread() not in earlier:
                requests.append(record.getMessage())

    log = logging.getLogger("wit.ingest.synthetic.server")
    handler, level = Count(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        with SyntheticWebServer(web.root, delay_scale=DELAY_SCALE) as srv:
            ref, _ = curated(srv, truth[:30], tmp_path / "curated")
            urllib.request.urlopen(srv.url("/"), timeout=5).read()  # the counter does count requests
            assert len(requests) == 1
            out = run_stage(DOWNLOAD, config(allow_private_hosts=False), [ref], str(tmp_path / "dl"))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    rows = ledger(out.ref.url)
    assert rows and all(r["status"] == "failed" and r["error"] == "private_host" for r in rows)
    assert len(requests) == 1
    assert not storage.exists(storage.join(out.ref.url, "shards"))


def test_no_kept_pair_gives_an_empty_ledger(tmp_path):
    rows = (("a" * 32, "http://img.example.com/a.png", "a", None, False),)
    ref = run_stage(CuratedRows(), RowsConfig(rows), [], str(tmp_path / "curated"), progress=False).ref
    out = run_stage(DOWNLOAD, config(), [ref], str(tmp_path / "dl"), progress=False)
    assert out.done and ledger(out.ref.url) == []


def test_s3_output_gives_the_same_ledger_as_local(web, truth, tmp_path, s3_bucket):
    port = free_port()
    kinds = {"clean", "broken_link", "rate_limited", "redirect", "huge", "tiny", "corrupt", "noai"}
    results = []
    for out in (str(tmp_path / "dl"), f"{s3_bucket}/dl"):
        with SyntheticWebServer(web.root, port=port, delay_scale=DELAY_SCALE) as srv:
            ref, _ = curated(srv, truth, tmp_path / f"curated-{len(results)}", kinds=kinds)
            outcome = run_stage(DOWNLOAD, config(samples_per_shard=25), [ref], out, progress=False)
        results.append((outcome.ref, ledger(outcome.ref.url)))
    (local_ref, local), (s3_ref, remote) = results
    assert local == remote and local_ref.digest == s3_ref.digest
    assert shard_samples(s3_ref.url, remote).keys() == shard_samples(local_ref.url, local).keys()
    assert verify(s3_ref.url).ok


# -- planning: partitions name part ranges, never pairs --------------------------------------------


@dataclass(frozen=True, slots=True)
class GeneratedConfig:
    parts: int
    rows: int  # per part
    hosts: int = 3


class GeneratedCurated:
    """A curated manifest of ``parts`` parts of ``rows`` rows; every fourth row is curated out."""

    name = "test-generated-curated"
    kind = "curated"

    def partitions(self, config, inputs):
        return [Partition(index=k, source=f"gen#{k}") for k in range(config.parts)]

    def run_partition(self, config, partition, out):
        k, n = partition.index, config.rows
        keep = [i % 4 != 0 for i in range(n)]
        table = pa.table(
            {
                "uid": [f"{k:03d}-{i:06d}" for i in range(n)],
                "url": [f"http://h{i % config.hosts}.example.com/{k}/{i}.png" for i in range(n)],
                "text": [f"text {k} {i}" for i in range(n)],
                "page_url": [None] * n,
                "keep": keep,
                "reason": [None if kp else "test_drop" for kp in keep],
            }
        )
        return PartitionResult(table=table, counts={"kept": sum(keep)})


def generated(out: Path, parts: int, rows: int) -> ManifestRef:
    return run_stage(GeneratedCurated(), GeneratedConfig(parts, rows), [], str(out), progress=False).ref


def test_partitions_name_part_ranges_not_pairs(tmp_path):
    ref = generated(tmp_path / "curated", parts=3, rows=1000)  # 750 kept per part
    table = read_table(ref.url)
    kept = [u for u, k in zip(table["uid"].to_pylist(), table["keep"].to_pylist(), strict=True) if k]
    part_urls = download.open_manifest(ref.url).part_urls()
    cfg = config(samples_per_shard=200)
    parts = DOWNLOAD.partitions(cfg, [ref])

    assert [p.index for p in parts] == list(range(12))  # 2250 kept rows: 11 chunks of 200, then 50
    sizes = []
    for p in parts:
        mode, ranges = p.params
        assert mode == "fetch" and ranges
        for url, start, stop in ranges:  # part URLs and positions, nothing of the pairs
            assert url in part_urls and isinstance(start, int) and isinstance(stop, int) and start < stop
        assert b"example.com" not in pickle.dumps(p) and b"text " not in pickle.dumps(p)
        sizes.append(sum(stop - start for _, start, stop in ranges))
    assert sizes == [200] * 11 + [50]
    # the ranges tile each part's kept rows, in part order
    flat = [r for p in parts for r in p.params[1]]
    for url in part_urls:
        spans = [(start, stop) for u, start, stop in flat if u == url]
        assert spans[0][0] == 0 and spans[-1][1] == 750
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert [u for u, _, _ in flat] == sorted((u for u, _, _ in flat), key=part_urls.index)

    # what the workers read: exactly the kept rows, each once, in order, hosts interleaved within
    covered = [q.uid for p in parts for q in download.read_ranges(p.params[1], cfg, "curated")]
    assert covered == kept
    first = interleave_hosts(download.read_ranges(parts[0].params[1], cfg, "curated"))
    assert [download._host(q.url) for q in first[:3]] == ["h1.example.com", "h2.example.com", "h0.example.com"]


def test_planning_does_not_grow_with_rows(tmp_path):
    """The driver's partitions pickle to the same size for 1k and 10k rows per part, and its
    Python memory while planning stays small (the pairs are never read into the driver)."""
    cfg = config(samples_per_shard=100_000)  # one partition covering every kept row
    pickled, peaks = {}, {}
    for name, rows in (("small", 1_000), ("large", 10_000)):  # same path lengths
        ref = generated(tmp_path / name / "curated", parts=3, rows=rows)
        DOWNLOAD.partitions(cfg, [ref])  # warm: imports and caches are not planning
        tracemalloc.start()
        try:
            parts = DOWNLOAD.partitions(cfg, [ref])
            peaks[name] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert sum(stop - start for _, start, stop in parts[0].params[1]) == 3 * rows * 3 // 4
        pickled[name] = len(pickle.dumps(parts))
    assert pickled["small"] == pickled["large"] < 1_000
    # Reading the 22,500 kept pairs into the driver peaked at ~11 MB here (1.4 MB pickled); what is
    # left is bounded by the Parquet footer reads of open_manifest (64 KiB each).
    assert peaks["large"] < 1_000_000, peaks


# -- kill and resume -----------------------------------------------------------------------------

RUN = textwrap.dedent(
    """
    import sys
    from wit.ingest.download import DOWNLOAD, DownloadConfig
    from wit.manifests.runrecord import finished_ref
    from wit.pipeline.executor import run_stage
    cfg = DownloadConfig(image_size=64, samples_per_shard=int(sys.argv[3]), threads=4,
                         timeout=float(sys.argv[4]), allow_private_hosts=True)
    run_stage(DOWNLOAD, cfg, [finished_ref(sys.argv[1], expect_kind="curated")], sys.argv[2], progress=False)
    """
)


def test_killed_download_resumes_to_the_same_ledger(web, truth, tmp_path):
    port = free_port()
    kinds = {"clean", "broken_link", "server_error", "redirect", "huge", "tiny", "corrupt", "noai", "slow"}
    slow = next(r["img_path"] for r in truth if r["mess"] == "slow")
    # one slow image per shard, so each shard takes at least the 1 s timeout: the kill lands mid-run
    extra = [("slow", slow, f"slow copy {k}") for k in range(5)]
    spp = 6
    rows = [r for r in truth if r["mess"] != "clean"] + [r for r in truth if r["mess"] == "clean"][:12]

    with SyntheticWebServer(web.root, port=port, delay_scale=DELAY_SCALE) as srv:
        ref, by_uid = curated(srv, rows, tmp_path / "curated", kinds=kinds, extra=extra)
        want = run_stage(DOWNLOAD, config(samples_per_shard=spp), [ref], str(tmp_path / "whole"), progress=False)
    assert want.total == 5

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    out = tmp_path / "killed"
    args = [sys.executable, "-c", RUN, ref.url, str(out), str(spp), str(TIMEOUT)]
    with SyntheticWebServer(web.root, port=port, delay_scale=DELAY_SCALE):
        proc = subprocess.Popen(args, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not list((out / "_parts").glob("part-*.json")) and time.monotonic() < deadline:
                assert proc.poll() is None, "the download ended before it could be killed"
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        assert not (out / "_run.json").exists(), "killed after the end: nothing to resume"
        done_before = {p.name for p in (out / "_parts").glob("part-*.json")}
        assert 1 <= len(done_before) < want.total
        subprocess.run(args, env=env, check=True, timeout=120)

    assert (out / "_run.json").exists()
    assert ledger(str(out)) == ledger(want.ref.url)
    assert read_table(str(out)).num_rows == len([u for u, r in by_uid.items() if r["keep"]])
    # (wandb, which img2dataset imports, leaves its own temporary folders behind a SIGKILL)
    assert not leftovers(out) and not list(scratch.glob("wit-download-*"))
    assert verify(str(out)).ok
    assert shard_samples(str(out), ledger(str(out))).keys() == shard_samples(want.ref.url, ledger(want.ref.url)).keys()


# -- retry-failed ----------------------------------------------------------------------------------


def test_retry_failed_refetches_transient_failures_only(web, truth, tmp_path):
    kinds = {"clean", "rate_limited", "server_error", "broken_link", "slow", "tiny"}
    with SyntheticWebServer(web.root, delay_scale=DELAY_SCALE) as srv:
        ref, by_uid = curated(srv, truth, tmp_path / "curated", kinds=kinds, dropped=0)
        first = run_stage(DOWNLOAD, config(samples_per_shard=20), [ref], str(tmp_path / "dl"), progress=False)
        before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "dl").rglob("*") if p.is_file()}
        second = run_stage(RETRY, config(samples_per_shard=20), [first.ref], str(tmp_path / "dl2"), progress=False)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "dl").rglob("*") if p.is_file()}
    assert before == after  # the first run's folder is not touched

    old = {r["uid"]: r for r in ledger(first.ref.url)}
    new = {r["uid"]: r for r in ledger(second.ref.url)}
    assert new.keys() == old.keys()
    for uid, r in new.items():
        mess = by_uid[uid]["mess"]
        if mess == "rate_limited":
            assert old[uid]["error"] == "http_429" and r["status"] == "success"
            assert r["shard"].startswith("shards/") and r["key"] == uid
        elif mess in ("server_error", "slow"):  # retried, failing again the same way
            assert r["error"] == old[uid]["error"] in ("http_5xx", "timeout")
        else:  # carried over: same row, its shard now named by absolute URL
            want = dict(old[uid])
            if want["shard"]:
                want["shard"] = storage.join(first.ref.url, want["shard"])
            assert r == want
    samples = shard_samples(second.ref.url, list(new.values()))
    assert set(samples) == {u for u, r in new.items() if r["status"] == "success"}
    assert verify(second.ref.url).ok


# -- img2dataset's own distributor ------------------------------------------------------------------


def test_img2dataset_distributor_is_passed_through(web, truth, tmp_path):
    kinds = {"clean", "broken_link", "huge", "tiny"}
    with SyntheticWebServer(web.root, delay_scale=DELAY_SCALE) as srv:
        ref, by_uid = curated(srv, truth[:40], tmp_path / "curated", kinds=kinds, dropped=0)
        # one partition of two img2dataset shards: img2dataset starts a pool per call
        cfg = config(distributor="multiprocessing", processes=2, samples_per_shard=(len(by_uid) + 1) // 2)
        outcome = run_stage(DOWNLOAD, cfg, [ref], str(tmp_path / "dl"), progress=False)
    assert outcome.total == 1
    rows = ledger(outcome.ref.url)
    assert {r["uid"] for r in rows} == set(by_uid)
    samples = shard_samples(outcome.ref.url, rows)
    ok = [r for r in rows if r["status"] == "success"]
    assert {r["key"] for r in ok} == {r["uid"] for r in ok} == set(samples)  # re-keyed by uid
    assert {r["shard"] for r in ok} == {"shards/000000.tar", "shards/000001.tar"}
    for r in rows:
        mess = by_uid[r["uid"]]["mess"]
        if mess in ("clean", "tiny"):
            assert r["status"] == "success"
        elif mess == "broken_link":
            assert r["error"] == "http_404"
        elif mess == "huge":  # refused by OpenCV's pixel limit before it allocates the pixels
            assert r["status"] == "failed" and r["error"] == "too_large"


# -- the connect-time check ------------------------------------------------------------------------

PUBLIC = "93.184.216.34"  # what a fooled lookup answers; never connected to in these tests


def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


class TinyWeb:
    """A threaded HTTP server on 127.0.0.1: ``/a.png`` an image, ``/r`` a 302 to ``location``;
    ``served`` lists the paths it answered."""

    def __init__(self, location: str | None = None):
        self.served: list[str] = []
        body, served, where = png_bytes(), self.served, location

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                served.append(self.path)
                if self.path == "/r" and where:
                    self.send_response(302)
                    self.send_header("Location", where)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def fake_dns(monkeypatch, answers: dict[str, list[str]]) -> list[tuple]:
    """Names of ``answers`` resolve to its addresses in turn (the last one from then on); others
    resolve as usual. Returns the list of (name, port) lookups made."""
    real, lookups = socket.getaddrinfo, []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        n = sum(h == host for h, _ in lookups)
        lookups.append((host, port))
        ip = answers[host][min(n, len(answers[host]) - 1)]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port or 0))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # a proxy would resolve the names itself
    return lookups


def download_one(url: str, tmp_path: Path, name: str) -> dict:
    """The ledger row of downloading ``url`` alone, private hosts refused (in this process)."""
    uid = uid_of(url, name)
    curated_ref = run_stage(
        CuratedRows(), RowsConfig(((uid, url, name, None, True),)), [], str(tmp_path / f"c-{name}"), progress=False
    ).ref
    out = run_stage(DOWNLOAD, config(allow_private_hosts=False), [curated_ref], str(tmp_path / name), progress=False)
    (row,) = ledger(out.ref.url)
    return row


def test_a_dns_answer_that_changes_after_the_up_front_check_is_refused_at_connect(tmp_path, monkeypatch):
    with TinyWeb() as private:
        url = f"http://rebind.example.com:{private.port}/a.png"
        # the up-front check is fooled: its lookup answers a public address
        fake_dns(monkeypatch, {"rebind.example.com": [PUBLIC, "127.0.0.1"]})
        assert refusals([Pair("x", url, None)], allow_private=False) == {}

        # the hole, had there been no connect-time check: the second lookup reaches the server
        fake_dns(monkeypatch, {"rebind.example.com": [PUBLIC, "127.0.0.1"]})
        monkeypatch.setattr(download, "_peer_allowed", lambda peer: True)
        assert download_one(url, tmp_path, "unchecked")["status"] == "success"
        assert private.served == ["/a.png"]

        # closed: the address the socket reached is judged (here: this server's port is private)
        lookups = fake_dns(monkeypatch, {"rebind.example.com": [PUBLIC, "127.0.0.1"]})
        monkeypatch.setattr(download, "_peer_allowed", lambda peer: peer[1] != private.port)
        row = download_one(url, tmp_path, "checked")
        assert (row["status"], row["error"]) == ("failed", "private_host")
        assert "wit-refused:private_host" in row["error_message"]
        assert [h for h, _ in lookups] == ["rebind.example.com"] * 2  # up front, then connect
        assert private.served == ["/a.png"]  # nothing more served


def test_a_redirect_to_a_name_of_a_private_host_is_refused_at_connect(tmp_path, monkeypatch):
    with TinyWeb() as private:
        with TinyWeb(location=f"http://inside.example.com:{private.port}/a.png") as public:
            answers = {"outside.example.com": [PUBLIC, "127.0.0.1"], "inside.example.com": ["127.0.0.1"]}
            monkeypatch.setattr(download, "_peer_allowed", lambda peer: peer[1] == public.port)
            url = f"http://outside.example.com:{public.port}/r"

            fake_dns(monkeypatch, answers)
            row = download_one(url, tmp_path, "checked")
            assert (row["status"], row["error"]) == ("failed", "private_host")
            assert public.served == ["/r"] and private.served == []

            # the redirect guard alone (it judges the URL) lets the name through
            fake_dns(monkeypatch, answers)
            monkeypatch.setattr(download, "_peer_allowed", lambda peer: True)
            assert download_one(url, tmp_path, "unchecked")["status"] == "success"
            assert private.served == ["/a.png"]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_connect_time_check_sends_nothing_to_a_refused_peer(scheme):
    """Refused right after connecting: no request line, no TLS hello reaches the peer."""
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def accept():
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(2)
                chunks = []
                try:
                    while chunk := conn.recv(4096):
                        chunks.append(chunk)
                except TimeoutError:
                    pass
                received.append(b"".join(chunks))

        t = threading.Thread(target=accept)
        t.start()
        url = f"{scheme}://127.0.0.1:{listener.getsockname()[1]}/a.png"
        with _guarded_urllib(config(allow_private_hosts=False)), pytest.raises(urllib.error.URLError) as err:
            urllib.request.urlopen(url, timeout=5)
        t.join()
    assert classify(str(err.value)) == ("private_host", None)
    assert received == [b""]


# -- units ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "want"),
    [
        ("HTTP Error 404: Not Found", ("http_404", 404)),
        ("HTTP Error 403: Forbidden", ("http_4xx", 403)),
        ("HTTP Error 429: Too Many Requests", ("http_429", 429)),
        ("HTTP Error 503: Service Unavailable", ("http_5xx", 503)),
        (
            "HTTP Error 308: The HTTP server returned a redirect error that would lead to an infinite loop",
            ("redirect", 308),
        ),
        ("<urlopen error timed out>", ("timeout", None)),
        ("The read operation timed out", ("timeout", None)),
        ("<urlopen error [Errno -2] Name or service not known>", ("dns", None)),
        ("<urlopen error [Errno 111] Connection refused>", ("connection", None)),
        ("Use of image disallowed by X-Robots-Tag directive", ("robots_noai", None)),
        ("Image decoding error", ("decode", None)),
        ("image too small", ("too_small", None)),
        (
            "OpenCV(4.14.0) loadsave.cpp:79: error: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS",
            ("too_large", None),
        ),
        ("image area too large (20000x20000), not decoded", ("too_large", None)),
        ("<urlopen error wit-refused:private_host redirect to http://10.0.0.1/x>", ("private_host", None)),
        ("something else", ("other", None)),
        (None, (None, None)),
    ],
)
def test_classify(message, want):
    assert classify(message) == want


def test_hosts_are_interleaved_round_robin():
    pairs = [Pair(f"a{i}", f"http://a.example/{i}", None) for i in range(4)]
    pairs += [Pair(f"b{i}", f"http://b.example/{i}", None) for i in range(2)]
    pairs += [Pair("c0", "http://c.example/0", None)]
    assert [p.uid for p in interleave_hosts(pairs)] == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]


def test_refusals_check_urls_and_resolved_addresses(monkeypatch):
    def fake(host, *a, **kw):
        ip = {"inside.example.com": "10.1.2.3", "outside.example.com": "93.184.216.34"}.get(host)
        if ip is None:
            raise socket.gaierror("Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    pairs = [
        Pair("1", "http://127.0.0.1:8000/a.png", None),
        Pair("2", "http://169.254.169.254/latest/meta-data", None),
        Pair("3", "http://inside.example.com/a.png", None),
        Pair("4", "http://outside.example.com/a.png", None),
        Pair("5", "http://nowhere.example.com/a.png", None),
        Pair("6", "ftp://outside.example.com/a.png", None),
        Pair("7", "http://93.184.216.34/a.png", None),
    ]
    assert refusals(pairs, allow_private=False) == {
        "1": "private_host",
        "2": "private_host",
        "3": "private_host",
        "6": "bad_url",
        "7": "literal_ip",
    }
    assert refusals(pairs, allow_private=True) == {"6": "bad_url"}


def test_redirects_to_private_hosts_are_refused():
    req = urllib.request.Request("http://outside.example.com/a.png")
    with pytest.raises(urllib.error.URLError) as err:
        _GuardedRedirects(allow_private=False).redirect_request(
            req, io.BytesIO(), 302, "Found", {}, "http://169.254.169.254/latest"
        )
    assert classify(str(err.value)) == ("private_host", None)
    ok = _GuardedRedirects(allow_private=False).redirect_request(
        req, io.BytesIO(), 302, "Found", {}, "http://cdn.example.com/a.png"
    )
    assert ok.full_url == "http://cdn.example.com/a.png"


def test_requests_carry_our_user_agent_and_urllib_is_restored(tmp_path):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers["User-Agent"])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/x.png"
        before = urllib.request._opener
        cfg = config(user_agent="wit-test/1 (+https://example.org/bot)")
        with _guarded_urllib(cfg):
            # img2dataset sends a browser string; ours replaces it
            urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "Mozilla/5.0"}), timeout=5)
        assert urllib.request._opener is before
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["wit-test/1 (+https://example.org/bot)"]


def test_config_is_validated():
    with pytest.raises(ValueError, match="resize_mode"):
        DownloadConfig(resize_mode="stretch")
    with pytest.raises(ValueError, match="--workers"):
        DownloadConfig(processes=4)
    with pytest.raises(ValueError, match="distributor"):
        DownloadConfig(distributor="dask")
    with pytest.raises(ValueError, match="retry_classes"):
        DownloadConfig(retry_classes=("timeout", "flaky"))
    assert DownloadConfig(distributor="ray", processes=4).shards_per_partition == 4


def test_img2dataset_ray_distributor_is_deprecated_for_the_ray_executor(tmp_path, run_wit):
    """Still accepted, with a warning that points at --executor ray, from the library and the command line."""
    with pytest.warns(FutureWarning, match="--distributor ray .* deprecated: use --executor ray"):
        config = DownloadConfig.from_options({"distributor": "ray", "processes": 2})
    assert config.distributor == "ray" and config.processes == 2
    proc = run_wit("download", tmp_path / "none", "-o", tmp_path / "o", "--distributor", "ray", "--processes", "2")
    assert "FutureWarning: --distributor ray (img2dataset's Ray distributor) is deprecated: use --executor ray" in (
        proc.stderr
    )
    assert proc.returncode == 1  # the warning does not stop the command: its missing input does


def test_shard_url():
    assert shard_url("/data/dl", "shards/000001.tar") == "/data/dl/shards/000001.tar"
    assert shard_url("s3://b/dl", "shards/000001.tar") == "s3://b/dl/shards/000001.tar"
    assert shard_url("s3://b/dl2", "s3://b/dl/shards/000001.tar") == "s3://b/dl/shards/000001.tar"


def test_addresses_that_carry_a_private_ipv4_address_are_not_global():
    from wit.ingest.download import _is_global

    for private in (
        "10.0.0.1",
        "169.254.169.254",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
        "2002:a00:1::1",
        "fe80::1%eth0",
    ):
        assert not _is_global(private), private
    for public in ("8.8.8.8", "64:ff9b::808:808", "2002:808:808::1", "2001:4860:4860::8888"):
        assert _is_global(public), public
