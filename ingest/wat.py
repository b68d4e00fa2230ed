"""Common Crawl WAT files: the JSON metadata Common Crawl extracts from every WARC record.

A WAT file is a WARC file of ``metadata`` records, one per record of the WARC it describes, each
holding a JSON document. For an HTML response the links Common Crawl's parser found are under
``Envelope.Payload-Metadata.HTTP-Response-Metadata.HTML-Metadata``: ``Head.Base`` (the
``<base href>`` as written) and ``Links``, where an image is ``{"path": "IMG@/src", "url": <src as
written>, "alt": ..., "title": ...}``. LAION built its pairs from exactly these entries.

:func:`read_envelope` turns one such document into an :class:`Envelope` whose ``html`` is a
:class:`~wit.ingest.webpage.ParsedPage`, so extract treats a WAT page like a parsed HTML page
(without figure captions or declared sizes, which WAT does not keep). :func:`warc_to_wat` writes
the WAT of a WARC file in Common Crawl's layout, for tests and for trying the WAT path on a
generated web.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from warcio.archiveiterator import ArchiveIterator
from warcio.warcwriter import WARCWriter

from wit.ingest.webpage import ImgTag, ParsedPage, decode_html, parse_dimension, parse_page
from wit.manifests import storage

IMG_PATH = "IMG@/src"


@dataclass(slots=True)
class Envelope:
    warc_type: str | None  # the WARC-Type of the record described: response, request, warcinfo...
    url: str | None  # its WARC-Target-URI: the page URL
    html: ParsedPage | None  # None when Common Crawl found no HTML in the response


def _get(doc: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _img(link: dict) -> ImgTag:
    alt = _text(link.get("alt"))
    title = _text(link.get("title"))
    return ImgTag(
        src=(_text(link.get("url")) or "").strip() or None,
        alt=alt.strip() if alt is not None else None,
        title=(" ".join(title.split()) or None) if title else None,
        width=parse_dimension(_text(link.get("width"))),
        height=parse_dimension(_text(link.get("height"))),
    )


def read_envelope(doc: object) -> Envelope:
    """The page URL and image links of one WAT JSON document (missing parts are None, never raise)."""
    envelope = _get(doc, "Envelope")
    header = _get(envelope, "WARC-Header-Metadata")
    meta = _get(envelope, "Payload-Metadata", "HTTP-Response-Metadata", "HTML-Metadata")
    result = Envelope(_text(_get(header, "WARC-Type")), _text(_get(header, "WARC-Target-URI")), None)
    if not isinstance(meta, dict):
        return result
    links = meta.get("Links")
    images = [_img(link) for link in links or () if isinstance(link, dict) and link.get("path") == IMG_PATH]
    base = _text(_get(meta, "Head", "Base"))
    result.html = ParsedPage(base_href=(base or "").strip() or None, images=images)
    return result


def _links(page: ParsedPage) -> list[dict]:
    links = []
    for img in page.images:
        if img.src is None:
            continue  # Common Crawl's parser only records attributes that are there
        link = {"path": IMG_PATH, "url": img.src}
        if img.alt is not None:
            link["alt"] = img.alt
        if img.title is not None:
            link["title"] = img.title
        links.append(link)
    return links


def _envelope(record, page: ParsedPage | None) -> dict:
    header = {k: v for k, v in record.rec_headers.headers}
    payload: dict = {"Actual-Content-Type": header.get("Content-Type", "")}
    if record.http_headers is not None and record.rec_type == "response":
        http = record.http_headers
        response = {
            "Response-Message": {"Version": http.protocol, "Status": http.get_statuscode(), "Reason": ""},
            "Headers": dict(http.headers),
        }
        if page is not None:
            head = {"Base": page.base_href} if page.base_href else {}
            response["HTML-Metadata"] = {"Head": head, "Links": _links(page)}
        payload["HTTP-Response-Metadata"] = response
    return {"Envelope": {"Format": "WARC", "WARC-Header-Metadata": header, "Payload-Metadata": payload}}


def warc_to_wat(warc_url: str, wat_url: str) -> int:
    """Write the WAT (gzipped, one metadata record per WARC record) of a WARC file; returns the
    number of records written. Pages are parsed with :func:`~wit.ingest.webpage.parse_page`."""
    from wit.ingest.sources import MAX_PAGE_BYTES, decode_body, payload_stream  # sources imports this module

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    n = 0
    with storage.open_url(warc_url, "rb") as fh:
        for record in ArchiveIterator(fh):
            page = None
            http = record.http_headers
            if record.rec_type == "response" and http is not None:
                if "html" in (http.get_header("Content-Type") or ""):
                    # Not warcio's content_stream(): with Google's brotli installed (FastWARC needs
                    # it) warcio's own br decoding fails; extract's decoding is the one to match.
                    stream, codings = payload_stream(record.raw_stream, http)
                    body, _ = decode_body(stream.read(MAX_PAGE_BYTES + 1), codings, MAX_PAGE_BYTES)
                    decoded = decode_html(body) if body is not None else None
                    page = parse_page(decoded.markup) if decoded is not None and decoded.text is not None else None
            doc = _envelope(record, page)
            data = json.dumps(doc, ensure_ascii=False).encode("utf-8")
            url = record.rec_headers.get_header("WARC-Target-URI")
            meta = writer.create_warc_record(
                url or "", "metadata", payload=io.BytesIO(data), warc_content_type="application/json"
            )
            writer.write_record(meta)
            n += 1
    storage.write_bytes(wat_url, buf.getvalue())
    return n
