"""Perceptual-hash filter speed: images per second per core, wit's path vs imagehash.

Rows: imagehash.phash on a decoded image (the reference), wit's ``phash`` on the same image,
wit's ``check_image`` (header guard + full decode + phash: what filter's scan does per image),
and the whole ``wit filter`` (all its phases, one process) on a downloaded folder of the same images.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import imagehash
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _ingest_data import images, write_downloaded  # noqa: E402
from _report import table, write_section  # noqa: E402

from wit.ingest.filter import FILTER_PHASES, FilterConfig  # noqa: E402
from wit.ingest.imaging import check_image, phash  # noqa: E402
from wit.pipeline.executor import run_stage  # noqa: E402

N = 2000


def rate(fn, items) -> float:
    start = time.perf_counter()
    for x in items:
        fn(x)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    blobs = images(N, seed=1)
    decoded = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as img:
            img.load()
            decoded.append(img.copy())
    rows = [
        ["imagehash.phash (decoded image)", f"{rate(imagehash.phash, decoded):,.0f}"],
        ["wit `phash` (decoded image)", f"{rate(phash, decoded):,.0f}"],
        ["wit `check_image` (guard + decode + phash, from bytes)",
         f"{rate(lambda b: check_image(b, 50_000_000), blobs):,.0f}"],
    ]  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="bench-filter-"))
    try:
        down, _ = write_downloaded(root / "downloaded", blobs)
        start = time.perf_counter()
        ref = down
        for stage, sub in FILTER_PHASES:
            out = str(root / "filtered" / sub) if sub else str(root / "filtered")
            ref = run_stage(stage, FilterConfig(), [ref], out, progress=False).ref
        rows.append(["`wit filter`, all phases (read tar, decode, hash, dedup, write)",
                     f"{N / (time.perf_counter() - start):,.0f}"])  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    body = f"{N:,} JPEG images, 256×256, one process (images/s/core).\n\n" + table(["", "images/s/core"], rows)
    print(body)
    write_section("filter", "Perceptual-hash filter: images/s/core", body, "bench/bench_filter.py")


if __name__ == "__main__":
    main()
