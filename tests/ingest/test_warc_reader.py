"""The WARC reader's two paths: FastWARC reads a gzipped file while each gzip member holds one record
as warcio reads it alike; warcio reads the rest (always the last record and what follows it) and
every file that is not gzipped. Each bad input is read by both paths and must give the same pages,
counts, verdict and sha256 as warcio alone, and the counts the reader gave before FastWARC."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
from collections import Counter

import pytest

from wit.ingest import sources
from wit.ingest.sources import READERS, SourceTap
from wit.ingest.wat import warc_to_wat


def _record(kind: str, uri: str | None, block: bytes, *, ctype: str = "application/http; msgtype=response") -> bytes:
    head = f"WARC/1.0\r\nWARC-Type: {kind}\r\n" + (f"WARC-Target-URI: {uri}\r\n" if uri else "")
    head += f"Content-Type: {ctype}\r\nContent-Length: {len(block)}\r\n\r\n"
    return head.encode() + block + b"\r\n\r\n"


def _http(body: bytes, *headers: str) -> bytes:
    return ("\r\n".join(["HTTP/1.1 200 OK", "Content-Type: text/html", *headers]) + "\r\n\r\n").encode() + body


def _page(k: int) -> bytes:
    return f'<html><head><title>{k}</title></head><body><img src="/{k}.jpg" alt="a cat"></body></html>'.encode()


RECORDS = [
    _record("warcinfo", None, b"software: test\r\n", ctype="application/warc-fields"),
    _record("request", "http://a.example/", b"GET / HTTP/1.1\r\n\r\n", ctype="application/http; msgtype=request"),
    _record("response", "http://a.example/", _http(_page(1))),
    _record("response", "dns:a.example", b"a.example. 300 IN A 10.0.0.1\n", ctype="text/dns"),
    _record("response", "http://b.example/", _http(b"3\r\n<ht\r\n0\r\n\r\n", "Transfer-Encoding: chunked")),
    _record("revisit", "http://a.example/", _http(b"")),
    _record("response", "http://c.example/", _http(gzip.compress(_page(3)), "Content-Encoding: gzip")),
    _record("metadata", "http://c.example/", b"fetchTimeMs: 1\r\n", ctype="application/warc-fields"),
    _record("resource", "<http://d.example/saved.html>", _page(4), ctype="text/html"),
    _record("response", "http://e.example/", _http(_page(5))),
]
MEMBERS = [gzip.compress(r, 1) for r in RECORDS]
WARC = b"".join(MEMBERS)
AT = [sum(map(len, MEMBERS[:k])) for k in range(len(MEMBERS))]  # the record offsets


def _read(data: bytes, limit: int = 1 << 20, fmt: str = "warc") -> tuple:
    counts: Counter = Counter()
    tap = SourceTap(io.BytesIO(data), "mem.warc.gz")
    pages = [(p.url, p.offset, p.body, p.parsed) for p in READERS[fmt](tap, "mem.warc.gz", limit, counts)]
    tap.finish()
    assert tap.sha256 == hashlib.sha256(data).hexdigest() and tap.bytes == len(data)
    if tap.problem:
        counts[tap.problem] += 1
    return pages, dict(counts)


def _warcio_alone(monkeypatch, data: bytes, limit: int = 1 << 20, fmt: str = "warc") -> tuple:
    with monkeypatch.context() as m:
        m.setattr(sources, "_FAST_MAX", -1)  # FastWARC hands the first record (and so all) to warcio
        return _read(data, limit, fmt)


def _starts(monkeypatch) -> list[int]:
    """Where warcio took over, as the reader goes."""
    starts, warcio_pages = [], sources._warcio_pages

    def spy(tap, start, *args):
        starts.append(start)
        return warcio_pages(tap, start, *args)

    monkeypatch.setattr(sources, "_warcio_pages", spy)
    return starts


def test_fastwarc_reads_all_but_the_last_record(monkeypatch):
    starts = _starts(monkeypatch)
    pages, counts = _read(WARC)
    assert starts == [AT[-1]]
    assert counts == ALL
    assert [(url, offset) for url, offset, *_ in pages] == [
        ("http://a.example/", AT[2]),
        ("http://b.example/", AT[4]),
        ("http://c.example/", AT[6]),
        ("http://d.example/saved.html", AT[8]),
        ("http://e.example/", AT[9]),
    ]
    assert pages[1][2] == b"<ht" and pages[2][2] == _page(3)  # de-chunked; gzip undone
    assert (pages, counts) == _warcio_alone(monkeypatch, WARC)


def _one_member(records: list[bytes]) -> bytes:
    return gzip.compress(b"".join(records))


ALL = {"other_record": 3, "revisit": 1, "not_http": 1, "pages": 5}  # what WARC counts whole


def _swap(k: int, record: bytes) -> bytes:
    """WARC with record k's member replaced by a member of ``record``."""
    return WARC[: AT[k]] + gzip.compress(record) + WARC[AT[k + 1] :]


# (name, file, its counts as the reader gave them before FastWARC, where warcio takes over: the
# file's start, or that of the last record FastWARC read, whose page is then warcio's to give)
CASES = [
    (
        "cut inside a member",
        WARC[: AT[5] + 30],
        {"other_record": 2, "not_http": 1, "pages": 2, "truncated_source": 1},
        AT[4],
    ),
    ("cut in the last gzip trailer", WARC[:-3], {**ALL, "truncated_source": 1}, AT[9]),
    ("cut between members", WARC[: AT[3]], {"other_record": 2, "pages": 1}, AT[2]),
    (
        "header cut off",
        WARC[: AT[3]] + gzip.compress(RECORDS[3][:40]),
        {"other_record": 2, "pages": 1, "truncated_source": 1},
        AT[3],
    ),
    ("body cut off, uncompressed", b"".join(RECORDS)[:-60], {**ALL, "pages": 4, "truncated_source": 1}, 0),
    (
        "corrupt member",
        WARC[: AT[4] + 20] + bytes([WARC[AT[4] + 20] ^ 0x55]) + WARC[AT[4] + 21 :],
        {"other_record": 2, "not_http": 1, "pages": 1, "corrupt_source": 1},
        AT[3],
    ),
    (
        "garbage between members",
        WARC[: AT[4]] + b"garbage\r\n" + WARC[AT[4] :],
        {"other_record": 2, "not_http": 1, "pages": 1, "corrupt_source": 1},
        AT[3],
    ),
    ("zeros after the end", WARC + b"\0" * 64, {**ALL, "corrupt_source": 1}, AT[9]),
    ("stray text", b"this is not a warc file\n" * 4, {"corrupt_source": 1}, 0),
    ("gzipped stray text", gzip.compress(b"no WARC here\n" * 4), {"corrupt_source": 1}, 0),
    # warcio reads a gzipped file member by member; more than one record in a member is an error
    ("the whole file one member", gzip.compress(b"".join(RECORDS)), {"other_record": 1, "corrupt_source": 1}, 0),
    (
        "two records in a member",
        WARC[: AT[2]] + gzip.compress(RECORDS[2] + RECORDS[3]) + WARC[AT[4] :],
        {**ALL, "pages": 4, "corrupt_source": 1},
        AT[2],
    ),
    (
        "a record split over two members",
        WARC[: AT[2]] + gzip.compress(RECORDS[2][:150]) + gzip.compress(RECORDS[2][150:]) + WARC[AT[3] :],
        {"other_record": 2, "truncated_source": 1},
        AT[2],
    ),
    ("an empty member", WARC[: AT[3]] + gzip.compress(b"") + WARC[AT[3] :], ALL, AT[2]),
    (
        "a member of blank lines",
        WARC[: AT[3]] + gzip.compress(b"\r\n\r\n") + WARC[AT[3] :],
        {**ALL, "truncated_source": 1},
        AT[2],
    ),
    # a line of blanks ends a WARC header for warcio: no Content-Length; the rest of the member unread
    (
        "a blank header line",
        _swap(2, RECORDS[2].replace(b"Content-Length", b" \r\nContent-Length")),
        {**ALL, "pages": 4, "truncated_source": 1},
        AT[2],
    ),
    ("a folded target URI", _swap(2, RECORDS[2].replace(b"a.example/\r\n", b"a.example/\r\n  x\r\n")), ALL, AT[2]),
    ("a lower-case WARC version", _swap(2, RECORDS[2].replace(b"WARC/1.0", b"warc/1.0")), ALL, AT[1]),
    (
        "a Content-Length too short",
        _swap(2, RECORDS[2].replace(b"Content-Length: 1", b"Content-Length: ")),
        {"other_record": 2, "not_html": 1, "corrupt_source": 1},
        AT[2],
    ),
    (
        "bare LF line ends",
        gzip.compress(RECORDS[2].replace(b"\r\n", b"\n")) + WARC[AT[3] :],
        {**ALL, "other_record": 1, "pages": 4, "truncated_source": 1},
        0,
    ),
]


@pytest.mark.parametrize("name,data,counts,start", CASES, ids=[c[0] for c in CASES])
def test_bad_input_reads_as_in_warcio_alone(monkeypatch, name, data, counts, start):
    starts = _starts(monkeypatch)
    read = _read(data)
    assert read[1] == counts
    assert starts == [start]
    assert read == _warcio_alone(monkeypatch, data)


def test_a_page_that_needs_more_of_its_record_is_read_by_warcio(monkeypatch):
    # An HTTP header longer than what FastWARC's path reads past the page limit.
    big_header = _record("response", "http://big.example/", _http(_page(7), "X-Padding: " + "p" * 3000))
    data = WARC[: AT[3]] + gzip.compress(big_header) + WARC[AT[3] :]
    monkeypatch.setattr(sources, "_HEADROOM", 1000)
    starts = _starts(monkeypatch)
    pages, counts = _read(data, limit=500)
    assert starts == [AT[3]]
    assert counts == {**ALL, "pages": 6} and ("http://big.example/", AT[3], _page(7), None) in pages
    assert (pages, counts) == _warcio_alone(monkeypatch, data, limit=500)


def test_a_record_larger_than_fastwarc_takes_goes_to_warcio(monkeypatch):
    monkeypatch.setattr(sources, "_FAST_MAX", 100)  # the response records are larger
    starts = _starts(monkeypatch)
    read = _read(WARC)
    assert starts == [AT[2]]
    assert read == _warcio_alone(monkeypatch, WARC)


def test_wat_files_read_the_same_way(monkeypatch, tmp_path):
    (tmp_path / "a.warc.gz").write_bytes(WARC)
    warc_to_wat(str(tmp_path / "a.warc.gz"), str(tmp_path / "a.warc.wat.gz"))
    wat = (tmp_path / "a.warc.wat.gz").read_bytes()
    starts = _starts(monkeypatch)
    whole = _read(wat, fmt="wat")
    assert len(starts) == 1 and starts[0] > 0  # FastWARC read all but the last record
    assert whole[1] == {**ALL, "pages": 4, "not_html": 1}  # the WAT writer parses responses only
    for data in (wat, wat[: len(wat) // 2], wat[:-3] + b"\0"):
        assert _read(data, fmt="wat") == _warcio_alone(monkeypatch, data, fmt="wat")


def test_warcio_reads_on_as_if_it_had_read_from_the_start(monkeypatch):
    # warcio reads a member that holds two records differently when one of its 16 KiB reads holds
    # the member whole and when two reads cut it: reads from a record on keep to the file's grid.
    rng = random.Random(1)
    records = [
        _record("response", f"http://n{k}.example/", _http(bytes(rng.randrange(97, 123) for _ in range(3000))))
        for k in range(12)
    ]
    members = [gzip.compress(r) for r in records]
    at = [sum(map(len, members[:k])) for k in range(len(members))]
    k = next(k for k in range(1, 10) if at[k] < 16384 < at[k + 2])  # the pair straddles a read
    data = b"".join(members[:k]) + gzip.compress(records[k] + records[k + 1]) + b"".join(members[k + 2 :])
    starts = _starts(monkeypatch)
    read = _read(data)
    assert starts == [at[k]] and read[1]["corrupt_source"] == 1
    assert read == _warcio_alone(monkeypatch, data)


def test_the_tap_keeps_what_a_reader_may_read_again():
    tap = SourceTap(io.BytesIO(bytes(range(256)) * 4), "mem")
    tap.keep(0)
    for _ in range(4):
        tap.read(256)
    tap.keep(600)  # whole chunks before it go
    assert tap.kept(600, 604) == bytes([88, 89, 90, 91])
    stream = tap.reread(600)
    assert stream.read(10) == bytes(range(88, 98)) and stream.tell() == 610
    assert stream.read(256) == bytes(range(98, 256)) and stream.tell() == 768  # to the grid of 256
    assert stream.read() == bytes(range(256)) and stream.tell() == 1024
