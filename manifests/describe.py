"""Human summaries of manifests: ``wit manifest show`` and ``wit manifest diff``."""

from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc

from .manifest import Manifest, ManifestError, open_manifest
from .runrecord import RunRecord, folder_of, read_run_record


def reason_counts(m: Manifest) -> Counter:
    """Rows by reason, read from the manifest itself (``kept`` for rows with a null reason)."""
    if "reason" not in m.schema.names:
        return Counter()
    col = m.table(["reason"]).column("reason")
    vc = pc.value_counts(pc.fill_null(col, "kept"))
    return Counter({d["values"]: d["counts"] for d in vc.to_pylist()})


def show(url: str, head: int = 5) -> str:
    url = folder_of(url)
    rec = read_run_record(url)
    m = open_manifest(url)
    rows = m.num_rows
    out = [
        f"manifest  {url}",
        f"kind      {m.kind or 'untyped'}",
        f"rows      {rows}   parts {len(m.parts)}",
    ]
    if rec is None:
        out.append("status    UNFINISHED (no _run.json)")
    else:
        out += [
            f"stage     {rec.stage}   {rec.started} → {rec.ended}",
            f"digest    {rec.output.digest}",
        ]
        for ref in rec.inputs:
            out.append(f"input     {ref.url}  [{ref.kind}]  {(ref.digest or '')[:12]}")
    reasons = reason_counts(m)
    if reasons:
        out.append("reasons")
        width = max(len(r) for r in reasons)
        for reason, n in reasons.most_common():
            out.append(f"  {reason:<{width}}  {n:>9}  {100 * n / max(rows, 1):5.1f}%")
    if rec is not None and rec.counts:
        out.append("counts (run record)")
        for k, v in sorted(rec.counts.items()):
            out.append(f"  {k}: {v}")
    if rec is not None:
        for name, tally in rec.tallies.items():
            out += _distribution(name, tally)
    out.append("schema")
    for f in m.schema:
        out.append(f"  {f.name}: {f.type}{'' if f.nullable else ' not null'}")
    if head and rows:
        out.append(f"head ({min(head, rows)} rows)")
        frame = m.dataset().head(head).to_pandas()
        out.append(frame.to_string(max_colwidth=40, index=False))
    return "\n".join(out)


def _distribution(name: str, tally: dict[str, int], k: int = 10) -> list[str]:
    """Head and tail of a tally (e.g. pairs per query), largest first."""
    items = sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(tally.values())
    lines = [f"{name}  ({len(items)} keys, {total} in all)"]
    width = max((len(key) for key, _ in items[:k] + items[-k:]), default=0)
    shown = items if len(items) <= 2 * k else items[:k] + [("…", None)] + items[-k:]
    for key, n in shown:
        lines.append("  …" if n is None else f"  {key:<{width}}  {n:>9}")
    return lines


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _record(url: str) -> RunRecord:
    rec = read_run_record(url)
    if rec is None:
        raise ManifestError(f"{url}: no _run.json (not a finished wit output)")
    return rec


def diff(url_a: str, url_b: str) -> str:
    """What differs between two runs: stage, config keys, inputs, digest, counts, schema, rows by uid."""
    a_url, b_url = folder_of(url_a), folder_of(url_b)
    a, b = _record(a_url), _record(b_url)
    out = [f"A  {a_url}", f"B  {b_url}"]
    if a.stage != b.stage:
        out.append(f"stage: {a.stage} → {b.stage}")
    ca, cb = _flatten(a.config), _flatten(b.config)
    for key in sorted(set(ca) | set(cb)):
        if ca.get(key) != cb.get(key):
            out.append(f"config.{key}: {ca.get(key)!r} → {cb.get(key)!r}")
    ia = {i.url: i.digest for i in a.inputs}
    ib = {i.url: i.digest for i in b.inputs}
    for u in sorted(set(ia) | set(ib)):
        if ia.get(u) != ib.get(u):
            out.append(f"input {u}: {(ia.get(u) or '-')[:12]} → {(ib.get(u) or '-')[:12]}")
    same = a.output.digest == b.output.digest
    da, db = (a.output.digest or "")[:12], (b.output.digest or "")[:12]
    out.append("digest: same" if same else f"digest: {da} → {db}")
    out.append(f"rows: {a.rows} → {b.rows}")
    for key in sorted(set(a.counts) | set(b.counts)):
        va, vb = a.counts.get(key, 0), b.counts.get(key, 0)
        if va != vb:
            out.append(f"count {key}: {va} → {vb} ({vb - va:+d})")
    ma, mb = open_manifest(a_url), open_manifest(b_url)
    fa = {f.name: str(f.type) for f in ma.schema}
    fb = {f.name: str(f.type) for f in mb.schema}
    for name in sorted(set(fa) | set(fb)):
        if fa.get(name) != fb.get(name):
            out.append(f"column {name}: {fa.get(name, '-')} → {fb.get(name, '-')}")
    if not same and "uid" in fa and "uid" in fb:
        out += _uid_diff(ma, mb)
    return "\n".join(out)


def _uid_diff(ma, mb) -> list[str]:
    cols = ["uid", "keep"] if "keep" in ma.schema.names and "keep" in mb.schema.names else ["uid"]
    ta, tb = ma.table(cols).to_pandas().set_index("uid"), mb.table(cols).to_pandas().set_index("uid")
    only_a = ta.index.difference(tb.index)
    only_b = tb.index.difference(ta.index)
    lines = [f"uids only in A: {len(only_a)}", f"uids only in B: {len(only_b)}"]
    if "keep" in cols:
        both = ta.index.intersection(tb.index)
        flipped = (ta.loc[both, "keep"] != tb.loc[both, "keep"]).sum()
        lines.append(f"uids whose keep changed: {int(flipped)}")
    return lines
