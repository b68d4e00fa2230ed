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
from _report import commit, pin_one_core, table, write_section  # noqa: E402

from wit.ingest.filter import FILTER_PHASES, FilterConfig  # noqa: E402
from wit.ingest.imaging import check_image, phash  # noqa: E402
from wit.pipeline.executor import run_stage  # noqa: E402

N = 2000
REPEAT = 3


def rates(contenders: list[tuple[object, list]]) -> list[float]:
    """Items per CPU second of each ``(fn, items)``, the best of ``REPEAT`` turns taken in rotation
    (what other processes do falls on all of them alike)."""
    best = [float("inf")] * len(contenders)
    for _ in range(REPEAT):
        for i, (fn, items) in enumerate(contenders):
            start = time.process_time()
            for x in items:
                fn(x)
            best[i] = min(best[i], time.process_time() - start)
    return [len(items) / secs for (_, items), secs in zip(contenders, best, strict=True)]


def main() -> None:
    pinned = pin_one_core()  # images/s per core
    blobs = images(N, seed=1)
    decoded = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as img:
            img.load()
            decoded.append(img.copy())
    ref, ours, checked = rates(
        [(imagehash.phash, decoded), (phash, decoded), (lambda b: check_image(b, 50_000_000), blobs)]
    )
    rows = [
        ["imagehash.phash (decoded image)", f"{ref:,.0f}"],
        ["wit `phash` (decoded image)", f"{ours:,.0f}"],
        ["wit `check_image` (guard + decode + phash, from bytes)", f"{checked:,.0f}"],
    ]
    root = Path(tempfile.mkdtemp(prefix="bench-filter-"))
    try:
        down, _ = write_downloaded(root / "downloaded", blobs)
        best = float("inf")
        for turn in range(REPEAT):  # each turn filters afresh into its own folder (no resume)
            start = time.process_time()
            ref = down
            for stage, sub in FILTER_PHASES:
                out = root / f"filtered{turn}"
                ref = run_stage(stage, FilterConfig(), [ref], str(out / sub if sub else out), progress=False).ref
            best = min(best, time.process_time() - start)
        rows.append(["`wit filter`, all phases (read tar, decode, hash, dedup, write)", f"{N / best:,.0f}"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    body = (
        f"Commit `{commit()}`. {N:,} JPEG images, 256×256; one process, {pinned}, images per CPU "
        f"second of it, best of {REPEAT} turns (the three image rows take theirs in rotation; `wit filter` "
        "runs its phases in-process, `--workers 1`).\n\n" + table(["", "images/s/core"], rows)
    )
    print(body)
    write_section("filter", "Perceptual-hash filter: images/s/core", body, "bench/bench_filter.py")


if __name__ == "__main__":
    main()
