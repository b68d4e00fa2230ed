"""A downloaded folder as ``wit download`` writes it, built from synthetic images with planted defects.

Layout (the contract with the download stage)::

    ROOT/curated/part-00000.parquet + _run.json     CURATED rows (queries, page_url)
    ROOT/downloaded/part-0000k.parquet + _run.json  DOWNLOADED ledger, input: the curated ref
    ROOT/downloaded/shards/00000k.tar               webdataset shards as img2dataset writes them
    ROOT/references/shape/*.png                     an evaluation image folder (decontamination)

``make_downloaded`` returns the refs and the reason each planted row must end with. Importable by
name (pytest puts this folder on sys.path), so the download stage's real output can replace it.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageEnhance

from wit.evaluate import world
from wit.ingest.synthetic.mess import bomb_png
from wit.ingest.urls import uid_of
from wit.manifests.manifest import ManifestRef, digest_of, write_part
from wit.manifests.runrecord import RunRecord, write_run_record
from wit.manifests.schemas import CURATED, DOWNLOADED

BASE = "http://127.0.0.1:8000"


@dataclass(slots=True)
class Sample:
    url: str
    text: str
    data: bytes | None  # None: failed download (or missing from the shard when status is success)
    ext: str = "jpg"
    original: tuple[int, int] | None = None
    stored: tuple[int, int] | None = None
    queries: list[str] = field(default_factory=list)
    status: str = "success"
    error: str | None = None
    in_shard: bool = True
    expect: str | None = None  # the reason filter must give; None: kept (decided later for dups)
    twin: int | None = None  # index of the sample this one duplicates (exact or near)

    @property
    def uid(self) -> str:
        return uid_of(self.url, self.text)


@dataclass(slots=True)
class Downloaded:
    curated: ManifestRef
    downloaded: ManifestRef
    references: str  # folder of reference images for task "shape"
    samples: list[Sample]
    expected: dict[str, str | None]  # uid → reason (None: kept)
    duplicate_of: dict[str, str]  # uid → the uid it duplicates


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _queries(c: world.Concept) -> list[str]:
    return ["picture", c.colour, c.shape or f"number {c.digit}"]


def build_samples(n_clean: int = 24, seed: int = 0) -> tuple[list[Sample], list[bytes]]:
    """The samples (clean ones first) and the reference images of the task ``shape``."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    images: list[Image.Image] = []
    for i in range(n_clean):
        c = world.sample_concept(rng)
        size = rng.choice((96, 128, 160, 200))
        img = world.render(c, rng, size=size)
        images.append(img)
        samples.append(
            Sample(
                f"{BASE}/img/{i}.jpg",
                world.caption(c, rng),
                _jpeg(img),
                "jpg",
                (size, size),
                (size, size),
                _queries(c),
            )
        )
    c0 = world.sample_concept(rng)
    # exact duplicate: the very bytes of sample 0 under another URL and text
    samples.append(
        Sample(
            f"{BASE}/copy/0.jpg",
            "copy of the first picture",
            samples[0].data,
            "jpg",
            samples[0].original,
            samples[0].stored,
            ["picture"],
            twin=0,
        )
    )
    # near duplicates: resized, re-encoded, brightened versions of samples 1-3
    w, h = images[1].size
    small = images[1].resize((int(w * 0.8), int(h * 0.8)), Image.Resampling.BILINEAR)
    samples.append(
        Sample(
            f"{BASE}/near/1.jpg",
            "resized copy",
            _jpeg(small),
            "jpg",
            small.size,
            small.size,
            ["picture"],
            twin=1,
        )
    )
    samples.append(
        Sample(
            f"{BASE}/near/2.jpg",
            "re-encoded copy",
            _jpeg(images[2], 55),
            "jpg",
            images[2].size,
            images[2].size,
            ["picture"],
            twin=2,
        )
    )
    bright = ImageEnhance.Brightness(images[3]).enhance(1.1)
    samples.append(
        Sample(
            f"{BASE}/near/3.png",
            "brighter copy",
            _png(bright),
            "png",
            bright.size,
            bright.size,
            ["picture"],
            twin=3,
        )
    )
    # tiny: 8×8 upsampled to 64×64 by the downloader, which called it a success
    tiny = world.render(c0, rng, size=8).resize((64, 64))
    samples.append(
        Sample(
            f"{BASE}/tiny.jpg",
            "a tiny red icon",
            _jpeg(tiny),
            "jpg",
            (8, 8),
            (64, 64),
            ["picture"],
            expect="too_small",
        )
    )
    wide = world.render(c0, rng, size=(640, 64))
    samples.append(
        Sample(
            f"{BASE}/wide.jpg",
            "a very wide banner",
            _jpeg(wide),
            "jpg",
            (640, 64),
            (640, 64),
            ["picture"],
            expect="bad_aspect",
        )
    )
    junk = random.Random(seed + 1).randbytes(3000)
    samples.append(
        Sample(
            f"{BASE}/corrupt.jpg",
            "corrupt bytes",
            junk,
            "jpg",
            (100, 100),
            (100, 100),
            ["picture"],
            expect="undecodable",
        )
    )
    whole = _jpeg(world.render(c0, rng, size=128))
    samples.append(
        Sample(
            f"{BASE}/truncated.jpg",
            "a truncated jpeg",
            whole[: len(whole) // 2],
            "jpg",
            (128, 128),
            (128, 128),
            ["picture"],
            expect="undecodable",
        )
    )
    samples.append(
        Sample(
            f"{BASE}/bomb.png",
            "a decompression bomb",
            bomb_png(),
            "png",
            (20000, 20000),
            (20000, 20000),
            ["picture"],
            expect="too_many_pixels",
        )
    )
    samples.append(
        Sample(
            f"{BASE}/gone.jpg",
            "a 404",
            None,
            status="failed",
            error="http_404",
            expect="download_failed:http_404",
        )
    )
    samples.append(
        Sample(
            f"{BASE}/slow.jpg",
            "too slow",
            None,
            status="failed",
            error="timeout",
            expect="download_failed:timeout",
        )
    )
    samples.append(
        Sample(
            f"{BASE}/lost.jpg",
            "not in the shard",
            _jpeg(tiny),
            "jpg",
            (64, 64),
            (64, 64),
            ["picture"],
            in_shard=False,
            expect="missing_image",
        )
    )
    # an evaluation image planted on the web (re-encoded)
    refs = [world.render(world.sample_concept(rng, kind="shape"), rng, size=96) for _ in range(3)]
    samples.append(
        Sample(
            f"{BASE}/eval.jpg",
            "a shape found on the web",
            _jpeg(refs[0], 80),
            "jpg",
            (96, 96),
            (96, 96),
            ["picture"],
            expect="eval_overlap:shape",
        )
    )
    return samples, [_png(r) for r in refs]


def expected_reasons(samples: list[Sample]) -> tuple[dict[str, str | None], dict[str, str]]:
    expected: dict[str, str | None] = {}
    dup_of: dict[str, str] = {}
    for s in samples:
        expected[s.uid] = s.expect
    for s in samples:
        if s.twin is None:
            continue
        a, b = sorted((s.uid, samples[s.twin].uid))
        exact = s.data == samples[s.twin].data
        expected[b] = "duplicate" if exact else "near_duplicate"
        dup_of[b] = a
    return expected, dup_of


def _finish(
    root: Path,
    stage: str,
    kind: str,
    files: dict,
    rows: int,
    inputs: list[ManifestRef],
    parts: int,
    config: dict | None = None,
) -> ManifestRef:
    ref = ManifestRef(url=str(root), kind=kind, digest=digest_of({n: f.sha256 for n, f in files.items()}))
    write_run_record(
        str(root),
        RunRecord(
            stage=stage,
            config=config or {},
            inputs=inputs,
            output=ref,
            files=files,
            rows=rows,
            partitions=parts,
        ),
    )
    return ref


def _tar(samples: list[tuple[str, Sample]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, s in samples:
            meta = {
                "uid": s.uid,
                "url": s.url,
                "caption": s.text,
                "key": key,
                "status": "success",
                "width": s.stored[0],
                "height": s.stored[1],
                "original_width": s.original[0],
                "original_height": s.original[1],
            }
            for ext, data in ((s.ext, s.data), ("txt", s.text.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_downloaded(
    root: Path, n_clean: int = 24, seed: int = 0, parts: int = 2, shards: int = 2, per_query_cap: int = 1000
) -> Downloaded:
    """Write curated, downloaded and reference folders under ``root``."""
    samples, refs = build_samples(n_clean, seed)
    # curated: every sample kept, plus two rows the curator dropped (never downloaded)
    cur_rows = [
        {
            "uid": s.uid,
            "url": s.url,
            "text": s.text,
            "page_url": f"{BASE}/page/{i // 4}.html",
            "lang": "en",
            "queries": s.queries,
            "keep": True,
            "reason": None,
        }
        for i, s in enumerate(samples)
    ]
    cur_rows += [
        {
            "uid": uid_of(f"{BASE}/x{i}.jpg", "x"),
            "url": f"{BASE}/x{i}.jpg",
            "text": "x",
            "page_url": None,
            "lang": "en",
            "queries": [],
            "keep": False,
            "reason": "no_query_match",
        }
        for i in range(2)
    ]
    cur = root / "curated"
    info = write_part(str(cur), 0, pa.Table.from_pylist(cur_rows), CURATED)
    curated = _finish(
        cur,
        "curate",
        "curated",
        {info.name: info},
        len(cur_rows),
        [],
        1,
        {"per_query_cap": per_query_cap, "seed": 0},
    )

    down = root / "downloaded"
    (down / "shards").mkdir(parents=True)
    by_shard: list[list[tuple[str, Sample]]] = [[] for _ in range(shards)]
    ledger = []
    for i, s in enumerate(samples):
        shard_no = i % shards
        key = f"{shard_no:05d}{len(by_shard[shard_no]):04d}"
        ok = s.status == "success"
        if ok and s.in_shard:
            by_shard[shard_no].append((key, s))
        ledger.append(
            {
                "uid": s.uid,
                "url": s.url,
                "text": s.text,
                "status": s.status,
                "error": s.error,
                "error_message": None if ok else f"planted {s.error}",
                "http_status": 200 if ok else 404,
                "sha256": None,
                "width": s.stored[0] if ok else None,
                "height": s.stored[1] if ok else None,
                "original_width": s.original[0] if ok else None,
                "original_height": s.original[1] if ok else None,
                "shard": f"shards/{shard_no:06d}.tar" if ok else None,
                "key": key if ok else None,
            }
        )
    files = {}
    for k, members in enumerate(by_shard):
        data = _tar(members)
        (down / "shards" / f"{k:06d}.tar").write_bytes(data)
    step = -(-len(ledger) // parts)
    for p in range(parts):
        info = write_part(str(down), p, pa.Table.from_pylist(ledger[p * step : (p + 1) * step]), DOWNLOADED)
        files[info.name] = info
    downloaded = _finish(down, "download", "downloaded", files, len(ledger), [curated], parts)

    ref_dir = root / "references" / "shape"
    ref_dir.mkdir(parents=True)
    for i, data in enumerate(refs):
        (ref_dir / f"{i}.png").write_bytes(data)
    expected, dup_of = expected_reasons(samples)
    return Downloaded(curated, downloaded, str(ref_dir), samples, expected, dup_of)


def run_phases(phases, config, ref: ManifestRef, out: str, workers: int = 1, part=None) -> ManifestRef | None:
    """Run a multi-phase stage (``FILTER_PHASES``, ``SHARD_PHASES``) as the CLI does.

    With ``part`` (a PartSpec) every phase runs only its slice; a phase whose other slices are not
    done yet returns None, as a job array task would stop there.
    """
    from wit.manifests import storage
    from wit.pipeline.executor import PartSpec, run_stage

    for stage, sub in phases:
        target = storage.join(out, sub) if sub else out
        outcome = run_stage(stage, config, [ref], target, workers, part or PartSpec(), progress=False)
        if not outcome.done:
            return None
        ref = outcome.ref
    return ref
