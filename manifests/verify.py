"""Verify a finished output folder against what its ``_run.json`` promises.

Every committed file's sha256 is recomputed (changed or missing files are reported), every file in
the folder that the run record does not know is reported as extra, the manifest digest is
recomputed, and every shard index row (a ``shards`` table) is checked against the shard's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import storage
from .manifest import PART_RE, RUN_RECORD, ManifestError, digest_of, open_manifest
from .runrecord import folder_of, read_run_record


@dataclass(slots=True)
class Problem:
    kind: str  # changed | missing | extra | digest | shard_index | unfinished
    name: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind:<11} {self.name}" + (f"  ({self.detail})" if self.detail else "")


@dataclass(slots=True)
class VerifyReport:
    url: str
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _ignored(name: str) -> bool:
    # Names starting with "_" are internal: the run record, commit markers, and sub-runs of a
    # multi-phase stage (curate's "_match/"), which carry their own _run.json and verify on their own.
    # A leftover temporary file of a killed writer was never part of the output either.
    return name.startswith("_") or storage.is_temporary(name)


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/") or "://" in name


def verify(url: str) -> VerifyReport:
    url = folder_of(url)
    if not storage.exists(url):
        raise ManifestError(f"{url}: no such folder")
    rec = read_run_record(url)
    report = VerifyReport(url=url)
    if rec is None:
        report.problems.append(Problem("unfinished", RUN_RECORD, "no run record: the stage did not finish"))
        return report
    present = set(storage.listdir(url, recursive=True))
    actual: dict[str, str] = {}
    for name, info in sorted(rec.files.items()):
        report.checked += 1
        if _unsafe(name):
            report.problems.append(Problem("unsafe", name, "a run record may only name files inside its folder"))
            continue
        if name not in present:
            report.problems.append(Problem("missing", name))
            continue
        sha = storage.sha256_url(storage.join(url, name))
        actual[name] = sha
        if sha != info.sha256:
            report.problems.append(Problem("changed", name, f"sha256 {sha[:12]}… expected {info.sha256[:12]}…"))
    for name in sorted(present - set(rec.files)):
        if not _ignored(name):
            report.problems.append(Problem("extra", name, "not written by this run"))
    # The files were checked one by one above; this catches a run record edited by hand.
    recorded_digest = digest_of({n: f.sha256 for n, f in rec.files.items()})
    if recorded_digest != rec.output.digest:
        report.problems.append(Problem("digest", RUN_RECORD, "the run record's digest does not match its files"))
    _check_shard_index(url, rec.files, actual, report)
    return report


def _check_shard_index(url: str, files, actual: dict[str, str], report: VerifyReport) -> None:
    """A dataset keeps each shard's sha256 in a ``shards`` table: check those too."""
    tables = sorted({n.split("/", 1)[0] for n in files if "/" in n and PART_RE.match(n)})
    for table in tables:
        if _unsafe(table):
            continue
        try:
            m = open_manifest(url, table=table)
        except ManifestError as exc:
            report.problems.append(Problem("shard_index", table, str(exc)))
            continue
        if m.kind != "shards":
            continue
        for row in m.table(["shard", "sha256"]).to_pylist():
            name = row["shard"]
            report.checked += 1
            sha = actual.get(name)
            if sha is None:
                full = storage.join(url, name)
                if not storage.exists(full):
                    if name not in files:  # not already reported as missing
                        report.problems.append(Problem("missing", name, "listed in the shard index"))
                    continue
                sha = storage.sha256_url(full)
            if sha != row["sha256"]:
                report.problems.append(Problem("shard_index", name, "sha256 differs from the shard index"))
