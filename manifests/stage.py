"""The stage contract: manifest in, manifest out, partition by partition, atomic commit.

A stage is an object with a ``name``, the ``kind`` of its main output table, and two methods:

- ``partitions(config, inputs) -> list[Partition]``: the units of work (an input part file, a WARC
  file, a shard), numbered from 0. Must be deterministic for a given config and inputs.
- ``run_partition(config, partition, out) -> PartitionResult``: does one unit. It returns the rows
  of its part file (the driver commits them) and may itself commit side files (shards) atomically
  with ``manifests.storage``, reporting them in ``files``. Sample-level failures are rows with a
  ``reason``; only configuration and storage errors raise.

Optionally ``resources(config) -> Resources``: the CPUs (and GPUs, and whether it keeps a model
loaded) one partition needs on a cluster; one CPU when absent.

The driver (``wit.pipeline.executor``) commits a partition's part file, then its marker
``_parts/part-NNNNN.json``. A partition is done iff its marker exists, so a killed job redoes at
most the partitions that were in flight. When every marker exists, :func:`finalize` merges them
into ``_run.json``, written last.

``_parts/_stage.json`` pins the stage, resolved config and input digests of a folder: running a
different config into a folder that holds part of another run is refused rather than mixed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Protocol

import pyarrow as pa

from . import storage
from .manifest import MARKERS, PART_RE, FileInfo, ManifestError, ManifestRef, digest_of, write_part
from .runrecord import build_run_record, finished_ref, now, read_json, read_run_record, write_run_record
from .schemas import schema_for

STAGE_PIN = "_stage.json"
_MARKER_RE = re.compile(r"^part-(\d{5,})\.json$")


class StageError(RuntimeError):
    """A stage cannot run as asked (bad config, conflicting output folder, missing input)."""


@dataclass(frozen=True, slots=True)
class Partition:
    index: int
    source: str  # what it reads: an input part URL, a WARC file, a shard...
    params: tuple = ()  # extra picklable, hashable detail a stage needs


@dataclass(slots=True)
class PartitionResult:
    table: pa.Table | None = None  # rows of the main part file; None writes no part
    counts: dict[str, int] = field(default_factory=dict)  # by reason, plus "kept"
    files: list[FileInfo] = field(default_factory=list)  # side files the stage committed itself
    extra: dict[str, Any] = field(default_factory=dict)  # per-partition facts, listed in _run.json
    tallies: dict[str, dict[str, int]] = field(default_factory=dict)  # summed across partitions


@dataclass(frozen=True, slots=True)
class Resources:
    """What one partition of a stage needs from a cluster node (the Ray executor reads it).

    ``model``: partitions load a model (CLIP scoring), so they run on long-lived workers (Ray
    actors) that keep it loaded between partitions; ``gpus`` is what each such worker asks for
    when the cluster has GPUs (without, the same workers run on CPUs).
    """

    cpus: float = 1.0
    gpus: float = 0.0
    model: bool = False


def stage_resources(stage: Stage, config: Any) -> Resources:
    """A stage's optional ``resources(config)``, or one CPU per partition."""
    fn = getattr(stage, "resources", None)
    return fn(config) if fn is not None else Resources()


class Stage(Protocol):
    name: str
    kind: str  # manifest kind of the main table (schemas.SCHEMAS) or a custom kind

    def partitions(self, config: Any, inputs: list[ManifestRef]) -> list[Partition]: ...

    def run_partition(self, config: Any, partition: Partition, out: str) -> PartitionResult: ...


def stage_schema(stage: Stage) -> pa.Schema:
    schema = getattr(stage, "schema", None)
    return schema if schema is not None else schema_for(stage.kind)


def config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if is_dataclass(config):
        return json.loads(json.dumps(asdict(config), default=str))
    if isinstance(config, dict):
        return json.loads(json.dumps(config, default=str))
    raise StageError(f"config must be a dataclass or a dict, not {type(config).__name__}")


def marker_name(index: int) -> str:
    return f"{MARKERS}/part-{index:05d}.json"


def pin(stage: Stage, config: Any, inputs: list[ManifestRef], out: str) -> dict:
    """Record (or check) which stage, config and inputs this output folder belongs to."""
    want = {"stage": stage.name, "config": config_dict(config), "inputs": [i.to_dict() for i in inputs]}
    url = storage.join(out, MARKERS, STAGE_PIN)
    if storage.exists(url):
        have = read_json(url)
        have_cmp = {k: have.get(k) for k in want}
        if have_cmp != want:
            diff = [k for k in want if have_cmp[k] != want[k]]
            raise StageError(
                f"{out} already holds part of a {have.get('stage')} run with a different "
                f"{' and '.join(diff)}; write to a new folder or delete this one"
            )
        return have
    want["started"] = now()
    storage.write_text(url, json.dumps(want, indent=2) + "\n")
    return want


def open_run(stage: Stage, config: Any, inputs: list[ManifestRef], out: str) -> set[int]:
    """Claim ``out`` for this stage, config and inputs (see :func:`pin`), sweep away what killed
    writers left, and return the indices of the partitions already committed."""
    storage.makedirs(out)
    pin(stage, config, inputs, out)
    storage.sweep_temporaries(out)  # leftovers of a killed writer; their partitions are redone
    return committed(out)


def committed(out: str) -> set[int]:
    """Indices of the partitions whose marker exists."""
    done = set()
    for name in storage.listdir(storage.join(out, MARKERS)):
        m = _MARKER_RE.match(name)
        if m:
            done.add(int(m.group(1)))
    return done


def commit_partition(stage: Stage, partition: Partition, result: PartitionResult, out: str) -> dict:
    """Commit the part file (if any), then the marker. Returns the marker's content."""
    files = list(result.files)
    rows = 0
    if result.table is not None:
        info = write_part(out, partition.index, result.table, stage_schema(stage))
        files.append(info)
        rows = info.rows or 0
    marker = {
        "index": partition.index,
        "source": partition.source,
        "rows": rows,
        "counts": dict(result.counts),
        "files": {f.name: f.to_dict() for f in files},
        "extra": result.extra,
        "tallies": result.tallies,
        "ended": now(),
    }
    storage.write_text(storage.join(out, marker_name(partition.index)), json.dumps(marker, indent=1) + "\n")
    return marker


def finalize(stage: Stage, config: Any, inputs: list[ManifestRef], out: str, total: int) -> ManifestRef:
    """Merge all partition markers into ``_run.json`` (written last) and return the output ref."""
    markers = []
    for i in range(total):
        url = storage.join(out, marker_name(i))
        if not storage.exists(url):
            raise StageError(f"{out}: partition {i} is not committed; cannot finalize")
        marker = read_json(url)
        _check_marker(out, marker)
        markers.append(marker)
    pinned = read_json(storage.join(out, MARKERS, STAGE_PIN))
    files: dict[str, FileInfo] = {}
    counts: Counter = Counter()
    extra: dict[str, Any] = {}
    tallies: dict[str, Counter] = {}
    rows = 0
    for m in markers:
        for name, f in m["files"].items():
            files[name] = FileInfo(name=name, sha256=f["sha256"], bytes=f["bytes"], rows=f.get("rows"))
        counts.update(m["counts"])
        rows += m["rows"]
        for k, v in m.get("extra", {}).items():
            extra.setdefault(k, []).append(v)
        for k, v in m.get("tallies", {}).items():
            tallies.setdefault(k, Counter()).update(v)
    digest = digest_of({n: f.sha256 for n, f in files.items()})
    ref = ManifestRef(url=storage.normalize(out), kind=stage.kind, digest=digest)
    record = build_run_record(
        stage=stage.name,
        config=config_dict(config),
        inputs=list(inputs),
        output=ref,
        files=files,
        started=pinned.get("started", ""),
        rows=rows,
        counts=dict(counts),
        partitions=total,
        extra=extra,
        tallies={k: dict(sorted(v.items())) for k, v in sorted(tallies.items())},
    )
    write_run_record(out, record)
    return ref


def _check_marker(out: str, marker: dict) -> None:
    """The files a marker promises must be the files on storage before _run.json vouches for them.

    Two overlapping attempts at one partition (an array task launched twice) can interleave so
    that a marker describes the other attempt's file. Part files are re-hashed (they are small);
    other files (shards) are checked by size, which is cheap on object stores.
    """
    for name, f in marker["files"].items():
        url = storage.join(out, name)
        if not storage.exists(url):
            bad = "is missing"
        elif PART_RE.match(name):
            bad = "" if storage.sha256_url(url) == f["sha256"] else "has other bytes than its marker says"
        else:
            bad = "" if storage.size(url) == f["bytes"] else "has another size than its marker says"
        if bad:
            storage.remove(storage.join(out, marker_name(marker["index"])))
            raise StageError(
                f"{out}/{name} {bad} (two runs wrote partition {marker['index']} at once?); "
                "its marker was removed: run the stage again to redo it"
            )


def resolve_inputs(inputs: list[ManifestRef]) -> list[ManifestRef]:
    """Inputs as recorded in run records: normalized URL, and for manifests their kind and digest.

    A manifest input must be finished (have ``_run.json``); a digest given by the caller must be
    the digest it has now. Raw sources (``kind="source"``: WARC files, HTML) pass through.
    """
    resolved = []
    for ref in inputs:
        url = storage.normalize(ref.url)
        if ref.kind == "source":
            resolved.append(ManifestRef(url=url, kind="source", digest=ref.digest))
            continue
        have = finished_ref(url)
        if ref.digest and ref.digest != have.digest:
            raise StageError(
                f"{url} changed since it was referenced (digest {have.digest[:12]}, expected {ref.digest[:12]})"
            )
        if ref.kind and ref.kind != have.kind:
            raise StageError(f"{url} is a {have.kind} manifest, expected {ref.kind}")
        resolved.append(ManifestRef(url=url, kind=have.kind, digest=have.digest))
    return resolved


def finished(stage: Stage, config: Any, inputs: list[ManifestRef], out: str) -> ManifestRef | None:
    """The output ref if ``out`` already holds a finished run of this stage, config and inputs."""
    try:
        rec = read_run_record(out)
    except ManifestError:
        return None
    if rec is None:
        return None
    same = (
        rec.stage == stage.name
        and rec.config == config_dict(config)
        and [i.to_dict() for i in rec.inputs] == [i.to_dict() for i in inputs]
    )
    if not same:
        raise StageError(
            f"{out} already holds a finished {rec.stage} run with a different config or inputs; "
            "write to a new folder or delete this one"
        )
    return rec.output


def input_parts(inputs: list[ManifestRef], expect_kind: str) -> list[str]:
    """The part file URLs of every input manifest, checking that each is of ``expect_kind``."""
    from .manifest import open_manifest

    urls: list[str] = []
    for ref in inputs:
        if ref.kind is not None and ref.kind != expect_kind:
            raise StageError(f"{ref.url}: is a {ref.kind} manifest, expected {expect_kind}")
        urls += open_manifest(ref.url, expect_kind=expect_kind).part_urls()
    return urls
