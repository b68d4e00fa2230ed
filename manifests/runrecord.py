"""``_run.json``: what a stage did, written last into its output folder.

It holds the stage name, the resolved config, the inputs (URL, kind, digest at the time they were
read), the output (URL, kind, digest, every committed file with its sha256), counts by reason,
package versions and times. Lineage walks these records; verify recomputes what they promise.
"""

from __future__ import annotations

import functools
import getpass
import json
import platform
import socket
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from . import storage
from .manifest import RUN_RECORD, FileInfo, ManifestError, ManifestRef

FORMAT = 1
_VERSIONED = (
    "wit",
    "pyarrow",
    "pandas",
    "fsspec",
    "s3fs",
    "torch",
    "open_clip_torch",
    "webdataset",
    "img2dataset",
)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    return dict(_package_versions(extra))


@functools.lru_cache(maxsize=8)
def _package_versions(extra: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    # Once per process: reading the installed metadata costs ~20 ms, and every phase's run
    # record (a filter run writes a dozen and more) names the same versions.
    versions = {"python": platform.python_version()}
    for name in _VERSIONED + extra:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return tuple(versions.items())


@dataclass(slots=True)
class RunRecord:
    stage: str
    config: dict
    inputs: list[ManifestRef]
    output: ManifestRef
    files: dict[str, FileInfo] = field(default_factory=dict)
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    partitions: int = 0
    started: str = ""
    ended: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    host: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    tallies: dict[str, dict[str, int]] = field(default_factory=dict)  # e.g. matches per query

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "stage": self.stage,
            "config": self.config,
            "inputs": [i.to_dict() for i in self.inputs],
            "output": self.output.to_dict(),
            "rows": self.rows,
            "counts": dict(sorted(self.counts.items())),
            "partitions": self.partitions,
            "files": {name: info.to_dict() for name, info in sorted(self.files.items())},
            "started": self.started,
            "ended": self.ended,
            "versions": self.versions,
            "host": self.host,
            "extra": self.extra,
            "tallies": self.tallies,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunRecord:
        _check_types(d)
        try:
            return cls(
                stage=d["stage"],
                config=d.get("config", {}),
                inputs=[ManifestRef.from_dict(i) for i in d.get("inputs", [])],
                output=ManifestRef.from_dict(d["output"]),
                files={
                    name: FileInfo(name=name, sha256=f["sha256"], bytes=f["bytes"], rows=f.get("rows"))
                    for name, f in d.get("files", {}).items()
                },
                rows=d.get("rows", 0),
                counts=d.get("counts", {}),
                partitions=d.get("partitions", 0),
                started=d.get("started", ""),
                ended=d.get("ended", ""),
                versions=d.get("versions", {}),
                host=d.get("host", {}),
                extra=d.get("extra", {}),
                tallies=d.get("tallies", {}),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"malformed run record: missing or bad field {exc}") from exc


def build_run_record(
    stage: str,
    config: dict,
    inputs: list[ManifestRef],
    output: ManifestRef,
    files: dict[str, FileInfo],
    started: str,
    rows: int = 0,
    counts: dict[str, int] | None = None,
    partitions: int = 0,
    extra: dict | None = None,
    tallies: dict[str, dict[str, int]] | None = None,
) -> RunRecord:
    """The run record of a stage that ends now: what it did, stamped with the end time, the package
    versions and the host. Every run record is made here: the stage driver's ``finalize`` (every
    data stage, and eval) and the trainer."""
    return RunRecord(
        stage=stage,
        config=config,
        inputs=list(inputs),
        output=output,
        files=files,
        rows=rows,
        counts=dict(counts or {}),
        partitions=partitions,
        started=started,
        ended=now(),
        versions=package_versions(),
        host=host_info(),
        extra=extra or {},
        tallies=tallies or {},
    )


def _check_types(d: dict) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ManifestError(f"malformed run record: {what}")

    need(isinstance(d.get("stage"), str), "'stage' must be a string")
    out = d.get("output")
    need(isinstance(out, dict) and isinstance(out.get("url"), str), "'output.url' must be a string")
    need(out.get("digest") is None or isinstance(out.get("digest"), str), "'output.digest' must be a string")
    for key in ("config", "files", "counts", "extra", "tallies"):
        need(isinstance(d.get(key, {}), dict), f"'{key}' must be an object")
    need(isinstance(d.get("inputs", []), list), "'inputs' must be a list")
    for i in d.get("inputs", []):
        need(isinstance(i, dict) and isinstance(i.get("url"), str), "each input needs a 'url'")
    for name, f in d.get("files", {}).items():
        need(isinstance(f, dict) and isinstance(f.get("sha256"), str), f"file {name!r} needs a 'sha256'")


def host_info() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    return {
        "hostname": socket.gethostname(),
        "user": user,
        "platform": sys.platform,
        "argv": " ".join(sys.argv),
    }


def write_run_record(out: str, record: RunRecord) -> None:
    storage.write_text(storage.join(out, RUN_RECORD), json.dumps(record.to_dict(), indent=2, sort_keys=False) + "\n")


def run_record_url(url: str) -> str:
    """The ``_run.json`` for a folder, or the URL itself if it names a run record."""
    url = storage.normalize(url)
    return url if storage.basename(url) == RUN_RECORD else storage.join(url, RUN_RECORD)


def read_run_record(url: str) -> RunRecord | None:
    """The run record of an output folder, or None when the folder has none (unfinished/source)."""
    rec_url = run_record_url(url)
    if not storage.exists(rec_url):
        return None
    data = read_json(rec_url)
    if not isinstance(data, dict) or "stage" not in data:
        raise ManifestError(f"{rec_url}: not a wit run record")
    try:
        return RunRecord.from_dict(data)
    except ManifestError as exc:
        raise ManifestError(f"{rec_url}: {exc}") from exc


def read_json(url: str):
    """A JSON control file (run record, marker, pin); a broken one is a ManifestError naming it."""
    try:
        return json.loads(storage.read_bytes(url).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{url}: not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{url}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def folder_of(url: str) -> str:
    """Accept either an output folder or its ``_run.json``; return the folder."""
    url = storage.normalize(url)
    if storage.basename(url) == RUN_RECORD:
        return url[: -len(RUN_RECORD)].rstrip("/")
    return url


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def finished_ref(url: str, expect_kind: str | None = None) -> ManifestRef:
    """The ref (URL, kind, digest) of a finished output, for use as a stage input.

    Raises ManifestError when the folder has no run record (an unfinished or foreign folder) or
    holds another kind than ``expect_kind``.
    """
    rec = read_run_record(url)
    if rec is None:
        raise ManifestError(f"{storage.normalize(url)}: no _run.json (not a finished wit output)")
    if expect_kind and rec.output.kind != expect_kind:
        raise ManifestError(f"{rec.output.url}: is a {rec.output.kind} manifest, expected {expect_kind}")
    return rec.output
