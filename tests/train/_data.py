"""A tiny WebDataset dataset for tests and benchmarks, built without the ingest stages.

Images come from the synthetic world (`wit.evaluate.world.render`) with captions from
`world.caption`, so a model that learns from them is evaluated on the classes its captions name.
The folder has the layout of a `wit shard` output::

    OUT/shards/000000.tar ...      samples: KEY.jpg, KEY.txt, KEY.json ({"uid": KEY})
    OUT/shards/sizes.json          {"000000.tar": n, ...}   (open_clip's form)
    OUT/part-00000.parquet         samples manifest (uid -> shard, key)
    OUT/shard_index/part-00000.parquet   shard -> samples, bytes, sha256
    OUT/_run.json                  a run record of stage "shard", so lineage and digests work

Usable from any test: ``from train._data import build_dataset`` (tests/ is on sys.path).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import webdataset as wds

from wit.evaluate import world
from wit.manifests import schemas
from wit.manifests.manifest import FileInfo, ManifestRef, digest_of, write_part
from wit.manifests.runrecord import RunRecord, now, write_run_record

CORRUPT_BYTES = b"\xff\xd8\xff\xe0 this is not a JPEG"


@dataclass(slots=True)
class BuiltDataset:
    url: str  # the dataset folder
    shards: list[str]  # shard paths, in order
    uids: list[str]  # every sample's uid, corrupt ones included
    corrupt: list[str]  # uids of the samples whose image does not decode
    captions: dict[str, str]


def _uid(seed: int, shard: int, index: int) -> str:
    return hashlib.blake2b(f"{seed}:{shard}:{index}".encode(), digest_size=16).hexdigest()


def build_dataset(
    out: str | Path,
    n_shards: int = 4,
    per_shard: int = 48,
    seed: int = 0,
    corrupt: int = 1,
    image_size: int = 64,
    quality: int = 90,
    run_record: bool = True,
) -> BuiltDataset:
    """Write ``n_shards`` shards of ``per_shard`` samples; the first ``corrupt`` samples of shard 0
    get image bytes that do not decode."""
    out = Path(out)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    uids, bad, captions, sizes = [], [], {}, {}
    sample_rows, shard_rows, shard_paths = [], [], []
    for s in range(n_shards):
        name = f"{s:06d}.tar"
        path = shard_dir / name
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                uid = _uid(seed, s, i)
                concept = world.sample_concept(rng)
                text = world.caption(concept, rng)
                if s == 0 and i < corrupt:
                    jpg = CORRUPT_BYTES
                    bad.append(uid)
                else:
                    buf = io.BytesIO()
                    world.render(concept, rng, size=image_size).save(buf, format="JPEG", quality=quality)
                    jpg = buf.getvalue()
                sink.write({"__key__": uid, "jpg": jpg, "txt": text, "json": {"uid": uid}})
                uids.append(uid)
                captions[uid] = text
                sample_rows.append(
                    {
                        "uid": uid,
                        "url": f"http://127.0.0.1/{uid}.jpg",
                        "text": text,
                        "shard": f"shards/{name}",
                        "key": uid,
                    }
                )
        data = path.read_bytes()
        sizes[name] = per_shard
        shard_rows.append(
            {
                "shard": f"shards/{name}",
                "samples": per_shard,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        shard_paths.append(str(path))
    (shard_dir / "sizes.json").write_text(json.dumps(sizes))
    if run_record:
        files: dict[str, FileInfo] = {}
        for info in (
            write_part(str(out), 0, pa.Table.from_pylist(sample_rows), schemas.SAMPLES),
            write_part(str(out), 0, pa.Table.from_pylist(shard_rows), schemas.SHARDS, "shard_index"),
        ):
            files[info.name] = info
        digest = digest_of({n: f.sha256 for n, f in files.items()})
        stamp = now()
        write_run_record(
            str(out),
            RunRecord(
                stage="shard",
                config={"seed": seed},
                inputs=[],
                output=ManifestRef(url=str(out), kind="samples", digest=digest),
                files=files,
                rows=len(uids),
                partitions=n_shards,
                started=stamp,
                ended=stamp,
            ),
        )
    return BuiltDataset(url=str(out), shards=shard_paths, uids=uids, corrupt=bad, captions=captions)
