"""Generated input for the filter and shard benchmarks: a downloaded folder and its filtered manifest.

Images are rendered by the synthetic world (JPEG, 256 px, plus photo-like noise so they weigh what
web thumbnails weigh); the ledger, shards and run records follow ``wit download``'s layout.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image
from xxhash import xxh3_128_hexdigest

from wit.evaluate import world
from wit.ingest.filter import read_ledger_images
from wit.manifests.manifest import ManifestRef, digest_of, write_part
from wit.manifests.runrecord import RunRecord, write_run_record
from wit.manifests.schemas import DOWNLOADED, FILTERED


def images(n: int, side: int = 256, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = world.render(world.sample_concept(rng), rng, size=side)
        noisy = np.clip(np.asarray(img, np.float32) + nrng.normal(0, 12, (side, side, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(noisy.astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _record(root: Path, stage: str, kind: str, files: dict, rows: int, inputs: list) -> ManifestRef:
    ref = ManifestRef(str(root), kind, digest_of({n: f.sha256 for n, f in files.items()}))
    write_run_record(str(root), RunRecord(stage, {}, inputs, ref, files, rows, partitions=len(files)))
    return ref


def write_downloaded(root: Path, blobs: list[bytes], per_shard: int = 1000) -> tuple[ManifestRef, list[dict]]:
    """A downloaded folder holding ``blobs`` (reused cyclically is fine: shard does not dedup)."""
    (root / "shards").mkdir(parents=True)
    ledger = []
    for k in range(0, len(blobs), per_shard):
        shard = f"shards/{k // per_shard:06d}.tar"
        with tarfile.open(root / shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(k, min(k + per_shard, len(blobs))):
                key = f"{i:09d}"
                uid = f"{random.Random(i).getrandbits(128):032x}"
                text = f"sample {i}"
                meta = json.dumps({"uid": uid, "caption": text}).encode()
                for ext, data in (("jpg", blobs[i]), ("txt", text.encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                ledger.append({"uid": uid, "url": f"http://127.0.0.1/{i}.jpg", "text": text,
                               "status": "success", "sha256": hashlib.sha256(blobs[i]).hexdigest(),
                               "width": 256,
                               "height": 256, "original_width": 256, "original_height": 256, "shard": shard,
                               "key": key})  # fmt: skip
    info = write_part(str(root), 0, pa.Table.from_pylist(ledger), DOWNLOADED)
    return _record(root, "download", "downloaded", {info.name: info}, len(ledger), []), ledger


def write_filtered(root: Path, downloaded: ManifestRef, ledger: list[dict]) -> ManifestRef:
    """Every ledger row kept, each image located the way filter's scan locates it."""
    members = read_ledger_images(downloaded.url, ledger)
    rows = []
    for r in ledger:
        m = members[(r["shard"], r["key"])]
        rows.append({**{k: r[k] for k in ("uid", "url", "text", "sha256", "width", "height", "shard", "key")},
                     "ext": m.ext, "offset": m.offset, "bytes": len(m.data), "xxh3": xxh3_128_hexdigest(m.data),
                     "keep": True})  # fmt: skip
    info = write_part(str(root), 0, pa.Table.from_pylist(rows), FILTERED)
    return _record(root, "filter", "filtered", {info.name: info}, len(rows), [downloaded])
