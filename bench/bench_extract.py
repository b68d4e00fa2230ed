"""Pages per second per core of `wit extract`, against a stdlib `html.parser` scraper, same WARCs.

Generates a synthetic web (default 2,000 pages), then in one process pinned to one core runs, over
its WARC files:

- `wit extract`'s partition function (`extract_source`: WARC reading, hashing, gzip check, decoding,
  selectolax parsing, URL resolution, skip reasons, Arrow table), with and without language
  identification;
- the reference a naive scraper would write (BeautifulSoup is not installed, and its default
  parser is this one): warcio for the records, `html.parser.HTMLParser` for `<img>` and
  `<base href>`, `urljoin` for the URLs, no language identification;
- the same reference loop with selectolax in place of `html.parser`, to show where the time goes.

Each is run `--repeat` times; the best time counts. Writes the `extract` section of BENCHMARKS.md.

    .venv/bin/python bench/bench_extract.py --pages 2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

from selectolax.lexbor import LexborHTMLParser
from warcio.archiveiterator import ArchiveIterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import commit, pin_one_core, table, write_section  # noqa: E402

from wit.ingest.extract import ExtractConfig, extract_source  # noqa: E402
from wit.ingest.synthetic import generate_web  # noqa: E402


class _ImgCollector(HTMLParser):
    """What a scraper built on the standard library does: collect <img> attributes and <base href>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.images: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "base" and self.base is None:
            self.base = dict(attrs).get("href")


def _warc_pages(path: str):
    with open(path, "rb") as fh:
        for record in ArchiveIterator(fh):
            if record.rec_type == "response":
                yield record.rec_headers.get_header("WARC-Target-URI"), record.content_stream().read()


def reference_stdlib(paths: list[str]) -> tuple[int, int]:
    pages = rows = 0
    for path in paths:
        for url, body in _warc_pages(path):
            pages += 1
            parser = _ImgCollector()
            parser.feed(body.decode("utf-8", errors="replace"))
            parser.close()
            base = urljoin(url, parser.base) if parser.base else url
            for img in parser.images:
                src, alt = img.get("src"), img.get("alt")
                if src and alt and not src.startswith("data:"):
                    urljoin(base, src)
                    rows += 1
    return pages, rows


def reference_selectolax(paths: list[str]) -> tuple[int, int]:
    pages = rows = 0
    for path in paths:
        for url, body in _warc_pages(path):
            pages += 1
            tree = LexborHTMLParser(body.decode("utf-8", errors="replace"))
            node = tree.css_first("base[href]")
            base = urljoin(url, node.attributes["href"]) if node is not None else url
            for img in tree.css("img"):
                attrs = img.attributes
                src, alt = attrs.get("src"), attrs.get("alt")
                if src and alt and not src.startswith("data:"):
                    urljoin(base, src)
                    rows += 1
    return pages, rows


def wit_extract(config: ExtractConfig):
    def run(paths: list[str]) -> tuple[int, int]:
        pages = rows = 0
        for path in paths:
            result = extract_source(path, config)
            pages += result.counts.get("pages", 0)
            rows += result.table.num_rows
        return pages, rows

    return run


def best_of(fn, paths: list[str], repeat: int) -> tuple[float, int, int]:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        pages, rows = fn(paths)
        best = min(best, time.perf_counter() - t0)
    return best, pages, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    pin_one_core()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        web = generate_web(Path(tmp) / "web", pages=args.pages, seed=0)
        gen_s = time.perf_counter() - t0
        paths = [str(p) for p in web.warc_paths]
        warc_mb = sum(p.stat().st_size for p in web.warc_paths) / 2**20
        # Load the language model before timing: a worker pays that once, not per file.
        wit_extract(ExtractConfig())(paths[:1])
        contenders = [
            ("`wit extract` (`extract_source`), language identification on", wit_extract(ExtractConfig())),
            ("`wit extract`, `detect_lang=False`", wit_extract(ExtractConfig(detect_lang=False))),
            ("reference: warcio + stdlib `html.parser` + `urljoin`", reference_stdlib),
            ("reference loop with selectolax instead of `html.parser`", reference_selectolax),
        ]
        results = [(name, *best_of(fn, paths, args.repeat)) for name, fn in contenders]

    base_rate = results[2][2] / results[2][1]
    rows = [
        [
            name,
            f"{pages / secs:,.0f}",
            f"{n_rows / secs:,.0f}",
            f"{n_rows:,}",
            f"{(pages / secs) / base_rate:.1f}x",
        ]
        for name, secs, pages, n_rows in results
    ]
    body = (
        f"Commit `{commit()}`. "
        f"Synthetic web of {args.pages:,} pages ({warc_mb:.1f} MB of gzipped WARC in {len(paths)} files, "
        f"generated in {gen_s:.0f} s); one process pinned to one core; best of {args.repeat}. "
        "`wit extract` does more per page than the references (sha256 and gzip check of the source, "
        "charset detection, figure captions, URL normalisation, uids, skip reasons, an Arrow table); "
        "the references only find `<img src alt>` and resolve the URL.\n\n"
        + table(["extractor", "pages/s (one core)", "candidates/s", "candidates", "vs html.parser"], rows)
    )
    print(body)
    if not args.no_write:
        path = write_section(
            "extract", "extract: pages per second per core (synthetic WARC)", body, "bench/bench_extract.py"
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
