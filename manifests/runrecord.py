"""``_run.json``: what a stage did, written last into its output folder.

It holds the stage name, the resolved config, the inputs (URL, kind, digest at the time they were
read), the output (URL, kind, digest, every committed file with its sha256), counts by reason,
package versions and times. Lineage walks these records; verify recomputes what they promise.
"""

from __future__ import annotations

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
_VERSIONED = ("wit", "pyarrow", "pandas", "fsspec", "s3fs", "torch", "open_clip_torch", "webdataset", "img2dataset")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED + extra:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


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
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"malformed run record: missing or bad field {exc}") from exc


def host_info() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    return {"hostname": socket.gethostname(), "user": user, "platform": sys.platform, "argv": " ".join(sys.argv)}


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
    try:
        data = json.loads(storage.read_text(rec_url))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{rec_url}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict) or "stage" not in data:
        raise ManifestError(f"{rec_url}: not a wit run record")
    return RunRecord.from_dict(data)


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
