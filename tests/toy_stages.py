"""Three toy stages that exercise the stage contract end to end: source → tag → pack.

- ``ToySource`` makes ``parts`` candidate partitions of deterministic rows (no inputs).
- ``ToyTag`` reads each input part and drops rows whose text has an ``x`` (reason ``has_x``).
- ``ToyPack`` writes kept rows into tar shards (side files) plus a ``shard_index`` side table,
  like a dataset.

Importable by name (conftest puts this folder on sys.path) so spawned workers can unpickle them;
the test Ray cluster has this folder on its workers' PYTHONPATH.

Planted trouble comes from ``WIT_TOY_*`` variables, outside the configs so that a re-run has the
very same config (and ``WIT_*`` reaches Ray workers):

- ``WIT_TOY_SLOW_PARTITION=k``: ToySource's partition k sleeps a minute (a test kills the job there).
- ``WIT_TOY_FAIL_PARTITION=k``: ToySource's partition k raises.
- ``WIT_TOY_HOLD=k:SECONDS:DIR``: ToyPack's partition k appends a line to ``DIR/attempts-k`` on every
  attempt and, on the first one only, writes its pid to ``DIR/pid-k`` and sleeps SECONDS with its
  shard's temporary open (a test kills it there, or starts another slice meanwhile).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from wit.manifests import storage
from wit.manifests.manifest import FileInfo, ManifestRef, open_manifest, write_part
from wit.manifests.schemas import SHARDS
from wit.manifests.stage import Partition, PartitionResult

WORDS = ["red", "box", "sky", "axe", "fox", "sun", "hex", "cat", "dog", "mix"]


@dataclass(frozen=True, slots=True)
class SourceConfig:
    parts: int = 4
    rows_per_part: int = 25


class ToySource:
    name = "toy-source"
    kind = "candidates"

    def partitions(self, config: SourceConfig, inputs: list[ManifestRef]) -> list[Partition]:
        return [Partition(index=i, source=f"generated:{i}") for i in range(config.parts)]

    def run_partition(self, config: SourceConfig, partition: Partition, out: str) -> PartitionResult:
        if os.environ.get("WIT_TOY_SLOW_PARTITION") == str(partition.index):
            time.sleep(60)
        if os.environ.get("WIT_TOY_FAIL_PARTITION") == str(partition.index):
            raise RuntimeError(f"planted failure in partition {partition.index}")
        rows = []
        for j in range(config.rows_per_part):
            n = partition.index * config.rows_per_part + j
            text = f"{WORDS[n % len(WORDS)]} {WORDS[(n * 7) % len(WORDS)]} {n}"
            url = f"http://127.0.0.1/img/{n}.png"
            rows.append(
                {
                    "uid": hashlib.sha256(f"{url}\n{text}".encode()).hexdigest()[:32],
                    "url": url,
                    "text": text,
                    "page_url": f"http://127.0.0.1/p/{n // 3}.html",
                    "source": partition.source,
                }
            )
        return PartitionResult(table=pa.Table.from_pylist(rows), counts={"kept": len(rows)})


def _input_partitions(inputs: list[ManifestRef]) -> list[Partition]:
    parts = []
    for ref in inputs:
        m = open_manifest(ref.url)
        parts += [Partition(index=len(parts) + k, source=u) for k, u in enumerate(m.part_urls())]
    return parts


@dataclass(frozen=True, slots=True)
class TagConfig:
    letter: str = "x"


class ToyTag:
    name = "toy-tag"
    kind = "curated"

    def partitions(self, config: TagConfig, inputs: list[ManifestRef]) -> list[Partition]:
        return _input_partitions(inputs)

    def run_partition(self, config: TagConfig, partition: Partition, out: str) -> PartitionResult:
        with storage.open_url(partition.source) as fh:
            import pyarrow.parquet as pq

            table = pq.read_table(fh, columns=["uid", "url", "text", "page_url"])
        has = [config.letter in t for t in table.column("text").to_pylist()]
        table = table.append_column("keep", pa.array([not h for h in has]))
        table = table.append_column("reason", pa.array([f"has_{config.letter}" if h else None for h in has]))
        dropped = sum(has)
        first_words = Counter(t.split()[0] for t in table.column("text").to_pylist())
        return PartitionResult(
            table=table,
            counts={"kept": len(has) - dropped, f"has_{config.letter}": dropped},
            tallies={"first_word": dict(first_words)},
        )


@dataclass(frozen=True, slots=True)
class PackConfig:
    pass


class ToyPack:
    name = "toy-pack"
    kind = "samples"

    def partitions(self, config: PackConfig, inputs: list[ManifestRef]) -> list[Partition]:
        return _input_partitions(inputs)

    def run_partition(self, config: PackConfig, partition: Partition, out: str) -> PartitionResult:
        import pyarrow.parquet as pq

        with storage.open_url(partition.source) as fh:
            table = pq.read_table(fh)
        rows = [r for r in table.to_pylist() if r["keep"]]
        shard = f"shards/{partition.index:06d}.tar"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for r in rows:
                data = r["text"].encode()
                info = tarfile.TarInfo(f"{r['uid']}.txt")
                info.size, info.mtime = len(data), 0  # mtime 0: identical input → identical bytes
                tar.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        with storage.atomic_writer(storage.join(out, shard)) as fh:
            fh.write(data)
            fh.flush()
            _hold(partition.index)
        index = write_part(
            out,
            partition.index,
            pa.table({"shard": [shard], "samples": [len(rows)], "bytes": [len(data)], "sha256": [sha]}),
            SHARDS,
            table_name="shard_index",
        )
        samples = pa.Table.from_pylist(
            [
                {
                    "uid": r["uid"],
                    "url": r["url"],
                    "text": r["text"],
                    "page_url": r["page_url"],
                    "shard": shard,
                    "key": r["uid"],
                }
                for r in rows
            ],
            schema=pa.schema([(n, pa.string()) for n in ("uid", "url", "text", "page_url", "shard", "key")]),
        )
        return PartitionResult(
            table=samples,
            counts={"kept": len(rows)},
            files=[FileInfo(name=shard, sha256=sha, bytes=len(data), rows=len(rows)), index],
        )


def _hold(index: int) -> None:
    """``WIT_TOY_HOLD`` (see the module docstring)."""
    spec = os.environ.get("WIT_TOY_HOLD", "")
    if not spec:
        return
    k, seconds, folder = spec.split(":", 2)
    if int(k) != index:
        return
    attempts = os.path.join(folder, f"attempts-{index}")
    first = not os.path.exists(attempts)
    with open(attempts, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    if first:
        with open(os.path.join(folder, f"pid-{index}.tmp"), "w") as fh:
            fh.write(str(os.getpid()))
        os.replace(os.path.join(folder, f"pid-{index}.tmp"), os.path.join(folder, f"pid-{index}"))
        time.sleep(float(seconds))


def run_chain(
    root: str, workers: int = 1, source: SourceConfig = SourceConfig(), executor: str = "local"
) -> dict[str, ManifestRef]:
    """source → tag → pack under ``root``; returns the three output refs."""
    from wit.pipeline.executor import run_stage

    refs: dict[str, ManifestRef] = {}
    inputs: list[ManifestRef] = []
    for name, stage, config in (("source", ToySource(), source), ("tag", ToyTag(), TagConfig()),
                                ("pack", ToyPack(), PackConfig())):  # fmt: skip
        out = storage.join(root, name)
        refs[name] = run_stage(stage, config, inputs, out, workers, progress=False, executor=executor).ref
        inputs = [refs[name]]
    return refs
