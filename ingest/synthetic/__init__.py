"""The synthetic web: a seeded website with planted mess, its WARC copy, and a local server.

Tests and `wit demo` use it in place of the internet. `generate_web(out)` writes::

    out/
      site/                      what the server serves (one host; sections are path prefixes)
        index.html               links to every page
        {blog,news,shop,gallery}/pNNNNN.html
        img/<section>/iNNNNNN.{jpg,png}      most images
        <section>/img/iNNNNNN.*  images written as src="img/..." relative to their page
        media/<section>/iNNNNNN.*            images of pages with <base href="/media/<section>/">
        img/full/iNNNNNN.*       targets of redirects
        px.gif                   the tracking pixel (src="/px.gif?p=..&i=..")
      routes.json                URL path -> behaviour (status, redirect, delay, headers), read by the server
      truth.parquet              one row per <img> (TRUTH_SCHEMA): URLs, alt, mess kind, true concept, sha256
      warc/wit-synthetic-NNNNN.warc.gz   warcinfo + request/response records, PAGES_PER_WARC pages a file
      web.json                   seed, counts per mess kind, base_url, timings

URLs and the port. Pages are written with root-relative (`/img/...`), relative (`../img/...`,
`img/...`, or bare names under a `<base href>`) and absolute URLs; an absolute URL is written as
`__WIT_BASE__/path` (`BASE_PLACEHOLDER`) because the server's port is only known once it binds.
`SyntheticWebServer` substitutes its own `http://127.0.0.1:PORT` for the token in every HTML page
and redirect it serves. The WARC copy and the ground truth use the `base_url` given to
`generate_web` (default `http://127.0.0.1:8000`) instead; `truth.img_path` and `page_path` are the
port-free paths, so `server.url(row.img_path)` fetches a row's image from a running server.

Mess kinds (`truth.mess`, one per row; `truth.relative` marks relative srcs independently):
clean; broken_link (404); server_error (500); rate_limited (429 with Retry-After for the first
`rate_limited_failures` requests, then the image); redirect (302 to /img/full/...); slow (served after
`slow_delay_s` x the server's `delay_scale`); noai (`X-Robots-Tag: noai, noimageai`); duplicate (same
bytes as `duplicate_of`); near_duplicate (`duplicate_of` resized, border-cropped, re-encoded or brightened;
`detail` says which); mismatched_caption (alt describes another concept); non_english (alt in
de/fr/es, `lang`); tiny (8x8); huge (a 20000x20000 grey PNG, a decompression bomb of ~400 kB built
without holding the pixels); corrupt (truncated or garbage bytes behind .jpg/.png and an image
content type); empty_alt (alt="" or no alt); data_uri (src="data:image/png;base64,..."); tracking_pixel
(width=1 height=1, a 1x1 GIF). `MessConfig` sets the rates; the defaults give every kind several times
in a 1,000-page web, and small webs still get at least one of each.

Run it by hand: `python -m wit.ingest.synthetic generate OUT --pages 1000` and
`python -m wit.ingest.synthetic serve OUT --port 8000`.
"""

from wit.ingest.synthetic.generate import (
    DEFAULT_BASE_URL,
    PAGES_PER_WARC,
    TRUTH_SCHEMA,
    TruthRow,
    WebInfo,
    generate_web,
    write_warc,
)
from wit.ingest.synthetic.mess import MESS_KINDS, MessConfig, bomb_png
from wit.ingest.synthetic.server import BASE_PLACEHOLDER, Route, SyntheticWebServer

__all__ = [
    "BASE_PLACEHOLDER",
    "DEFAULT_BASE_URL",
    "MESS_KINDS",
    "PAGES_PER_WARC",
    "TRUTH_SCHEMA",
    "MessConfig",
    "Route",
    "SyntheticWebServer",
    "TruthRow",
    "WebInfo",
    "bomb_png",
    "generate_web",
    "write_warc",
]
