"""Lineage: walk ``_run.json`` records from any output back to its sources.

Each node is an output folder (or a source with no run record: WARC files, HTML folders). For each
input a record names, the walk checks that the input's digest now is the digest recorded when it
was read, so a re-run upstream that changed the data shows as ``changed`` rather than passing
silently as the same lineage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import storage
from .manifest import ManifestError
from .runrecord import RunRecord, read_run_record


@dataclass(slots=True)
class LineageNode:
    url: str
    record: RunRecord | None
    status: str = "ok"  # ok | changed | missing | source
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
    url = storage.normalize(url)
    rec = read_run_record(url)
    if rec is None:
        if storage.exists(url):
            raise ManifestError(f"{url}: no _run.json (not a finished wit output)")
        raise ManifestError(f"{url}: no such output")
    return _node(url, rec, None, max_depth, set())


def _node(url: str, rec: RunRecord | None, recorded: str | None, depth: int, seen: set[str]) -> LineageNode:
    node = LineageNode(url=url, record=rec, recorded_digest=recorded)
    if rec is None:
        node.status = "source" if storage.exists(url) else "missing"
        return node
    if recorded and rec.output.digest and recorded != rec.output.digest:
        node.status = "changed"
    if depth <= 0 or url in seen:
        return node
    seen = seen | {url}
    for ref in rec.inputs:
        child_url = storage.normalize(ref.url)
        try:
            child_rec = read_run_record(child_url)
        except ManifestError:
            child_rec = None
        node.inputs.append(_node(child_url, child_rec, ref.digest, depth - 1, seen))
    return node


def render(node: LineageNode) -> str:
    """A tree, newest output first, one line per run: stage, kind, rows, digest, url, status."""
    lines: list[str] = []

    def describe(n: LineageNode) -> str:
        if n.record is None:
            tag = "source" if n.status == "source" else "MISSING"
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
