"""Lineage: walk ``_run.json`` records from any output back to its sources.

Each node is an output folder (or a source with no run record: WARC files, HTML folders). For each
input a record names, the walk checks that the input's digest now is the digest recorded when it
was read, so a re-run upstream that changed the data shows as ``changed`` rather than passing
silently as the same lineage.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from . import storage
from .manifest import ManifestError, ManifestRef
from .runrecord import RunRecord, folder_of, read_run_record
from .storage import StorageError


@dataclass(slots=True)
class LineageNode:
    url: str
    record: RunRecord | None
    status: str = "ok"  # ok | changed | missing | source | unreadable | unreachable
    recorded_digest: str | None = None
    inputs: list[LineageNode] = field(default_factory=list)

    def walk(self):
        yield self
        for child in self.inputs:
            yield from child.walk()

    def to_dict(self) -> dict:
        rec = self.record
        return {
            "url": self.url,
            "status": self.status,
            "stage": rec.stage if rec else None,
            "kind": rec.output.kind if rec else None,
            "digest": rec.output.digest if rec else self.recorded_digest,
            "rows": rec.rows if rec else None,
            "ended": rec.ended if rec else None,
            "counts": rec.counts if rec else None,
            "inputs": [c.to_dict() for c in self.inputs],
        }


def lineage(url: str, max_depth: int = 64) -> LineageNode:
    url = folder_of(url)
    rec = read_run_record(url)
    if rec is None:
        if storage.exists(url):
            raise ManifestError(f"{url}: no _run.json (not a finished wit output)")
        raise ManifestError(f"{url}: no such output")
    return _Walker(max_depth).node(url, rec, None, max_depth, ())


def find_upstream(url: str, kind: str) -> ManifestRef | None:
    """The nearest finished output of ``kind`` up the run records' inputs of ``url`` (breadth first).

    Returns its ref as recorded by the run that read it (URL and digest at that time), or None.
    """
    queue = deque([storage.normalize(url)])
    seen = set()
    while queue:
        here = queue.popleft()
        if here in seen:
            continue
        seen.add(here)
        try:
            rec = read_run_record(here)
        except ManifestError:
            continue
        if rec is None:
            continue
        for ref in rec.inputs:
            if ref.kind == kind:
                return ManifestRef(url=storage.normalize(ref.url), kind=ref.kind, digest=ref.digest)
            queue.append(storage.normalize(ref.url))
    return None


class _Walker:
    """Builds the tree; run records are read once per URL even where several outputs share an input."""

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.records: dict[str, tuple[RunRecord | None, str]] = {}

    def read(self, url: str) -> tuple[RunRecord | None, str]:
        if url not in self.records:
            try:
                rec = read_run_record(url)
                status = "ok" if rec is not None else ("source" if storage.exists(url) else "missing")
            except ManifestError:
                rec, status = None, "unreadable"
            except StorageError:
                rec, status = None, "unreachable"
            self.records[url] = (rec, status)
        return self.records[url]

    def node(self, url: str, rec: RunRecord | None, recorded: str | None, depth: int, path: tuple) -> LineageNode:
        node = LineageNode(url=url, record=rec, recorded_digest=recorded)
        if rec is None:
            node.status = self.read(url)[1]
            return node
        if recorded and rec.output.digest and recorded != rec.output.digest:
            node.status = "changed"
        if depth <= 0 or url in path:  # a cycle can only come from hand-edited records
            return node
        for ref in rec.inputs:
            child_url = storage.normalize(ref.url)
            child_rec, _ = self.read(child_url)
            node.inputs.append(self.node(child_url, child_rec, ref.digest, depth - 1, path + (url,)))
        return node


def render(node: LineageNode) -> str:
    """A tree, newest output first, one line per run: stage, kind, rows, digest, url, status."""
    lines: list[str] = []

    def describe(n: LineageNode) -> str:
        if n.record is None:
            tag = "source" if n.status == "source" else n.status.upper()
            return f"{tag}  {n.url}"
        r = n.record
        digest = (r.output.digest or "")[:12]
        line = f"{r.stage}  [{r.output.kind}]  {r.rows} rows  digest {digest}  {n.url}  ({r.ended})"
        if n.status == "changed":
            line += f"  CHANGED since read (recorded digest {(n.recorded_digest or '')[:12]})"
        return line

    def walk(n: LineageNode, prefix: str, last: bool, root: bool) -> None:
        if root:
            lines.append(describe(n))
            child_prefix = ""
        else:
            lines.append(f"{prefix}{'└─ ' if last else '├─ '}{describe(n)}")
            child_prefix = prefix + ("   " if last else "│  ")
        for i, c in enumerate(n.inputs):
            walk(c, child_prefix, i == len(n.inputs) - 1, False)

    walk(node, "", True, True)
    return "\n".join(lines)
