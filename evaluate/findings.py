"""The CLIP paper's findings, read off one evaluation: what its reports open with.

Each finding is a short sentence in plain words whose numbers carry the task they come from, so a
renderer can link every number to its ``tasks/NAME.json`` (the run report does):

- zero-shot transfer: each zero-shot classification task's top-1 against chance (§3.1);
- prompt ensembling: the first template alone against the ensemble of all of them (§3.1.4);
- effective robustness: a linear probe fit in distribution against zero-shot, both in
  distribution and under a shift the training data never shows (§3.3);
- zero-shot against few-shot: how many labelled examples per class a linear probe needs to match
  the zero-shot classifier (§3.1.5, figure 7).

A finding is left out when the evaluation lacks the tasks it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Part = str | tuple[str, str]  # plain text, or (a number as text, the task it comes from)


@dataclass(slots=True)
class Finding:
    title: str
    parts: list[Part] = field(default_factory=list)

    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p[0] for p in self.parts)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _pts(v: float) -> str:
    return f"{100 * v:+.1f} points"


def metric(task: dict, name: str) -> dict | None:
    return next((m for m in task.get("metrics", []) if m["metric"] == name), None)


def _zeroshot(tasks: list[dict]) -> list[dict]:
    return [t for t in tasks if t["kind"] == "zeroshot_classification" and metric(t, "acc1")]


def shift_rows(tasks: list[dict]) -> list[dict]:
    """One row per linear probe fit on another dataset than it is tested on (a shift): the
    zero-shot and probe top-1 in distribution (the probe's training dataset) and under the shift."""
    by = {(t["kind"], t["dataset"], t.get("train_dataset")): t for t in tasks}
    rows = []
    for p in tasks:
        base = p.get("train_dataset")
        if p["kind"] != "linear_probe" or not base or base == p["dataset"]:
            continue
        p0 = by.get(("linear_probe", base, None))
        z0 = by.get(("zeroshot_classification", base, None))
        z1 = by.get(("zeroshot_classification", p["dataset"], None))
        if not (p0 and z0 and z1):
            continue
        rows.append(
            {
                "base": base,
                "shift": p["dataset"],
                "zeroshot": (metric(z0, "acc1"), z0["task"], metric(z1, "acc1"), z1["task"]),
                "probe": (metric(p0, "lp_acc1"), p0["task"], metric(p, "lp_acc1"), p["task"]),
            }
        )
    return [r for r in rows if all(r[k][0] and r[k][2] for k in ("zeroshot", "probe"))]


def _against_chance(m: dict, chance: float) -> str:
    """Where the 95% interval lies against chance ("" above it, or no interval to say)."""
    lo, hi = m.get("ci_low"), m.get("ci_high")
    if lo is None or hi is None or lo > chance:
        return ""
    return ", below it" if hi < chance else ", within the interval"


def _transfer(tasks: list[dict]) -> Finding | None:
    zs = [t for t in _zeroshot(tasks) if t.get("chance")]
    if not zs:
        return None
    f = Finding("Zero-shot transfer")
    f.parts.append("With no labelled example, the model classifies ")
    for i, t in enumerate(zs):
        m = metric(t, "acc1")
        f.parts += [
            ", " if 0 < i < len(zs) - 1 else (" and " if i else ""),
            f"{t['task']} at ",
            (_pct(m["value"]), t["task"]),
            f" (chance {_pct(t['chance'])}{_against_chance(m, t['chance'])})",
        ]
    f.parts.append(" by naming the classes in text.")
    return f


def _ensembling(tasks: list[dict]) -> Finding | None:
    pairs = [(t, metric(t, "acc1_single_template"), metric(t, "acc1")) for t in _zeroshot(tasks)]
    pairs = [(t, s, e) for t, s, e in pairs if s and e and (t.get("templates") or 0) > 1]
    if not pairs:
        return None
    gains = [e["value"] - s["value"] for _, s, e in pairs]
    f = Finding("Prompt ensembling")
    f.parts.append("Averaging the class embeddings of all prompt templates, against the first template alone, ")
    f.parts.append("changes top-1 by ")
    for i, ((t, s, e), g) in enumerate(zip(pairs, gains, strict=True)):
        f.parts += [
            "; " if i else "",
            (_pts(g), t["task"]),
            f" on {t['task']} (",
            (_pct(s["value"]), t["task"]),
            " → ",
            (_pct(e["value"]), t["task"]),
            ")",
        ]
    f.parts.append(".")
    return f


def _robustness(tasks: list[dict]) -> Finding | None:
    rows = shift_rows(tasks)
    if not rows:
        return None
    f = Finding("Effective robustness")
    for r in rows:
        z0, zt0, z1, zt1 = r["zeroshot"]
        p0, pt0, p1, pt1 = r["probe"]
        f.parts += [
            f"A linear probe fit on {r['base']} scores ",
            (_pct(p0["value"]), pt0),
            " there, against zero-shot's ",
            (_pct(z0["value"]), zt0),
            f"; under the shift to {r['shift']}, which training never showed, the probe falls to ",
            (_pct(p1["value"]), pt1),
            " (",
            (_pts(p1["value"] - p0["value"]), pt1),
            ") and zero-shot to ",
            (_pct(z1["value"]), zt1),
            " (",
            (_pts(z1["value"] - z0["value"]), zt1),
            "). ",
        ]
    return f


def _fewshot(tasks: list[dict]) -> Finding | None:
    zs = {t["dataset"]: t for t in _zeroshot(tasks)}
    f = Finding("Zero-shot against few-shot")
    for t in tasks:
        z = zs.get(t["dataset"])
        if t["kind"] != "fewshot" or not t.get("fewshot") or z is None:
            continue
        zv = metric(z, "acc1")["value"]
        curve = sorted((int(k), v["value"]) for k, v in t["fewshot"].items())
        match = next((k for k, v in curve if v >= zv), None)
        f.parts += [f"On {t['dataset']}, zero-shot (", (_pct(zv), z["task"]), ") "]
        if match is None:
            k, v = curve[-1]
            f.parts += [f"beats a linear probe on {k} labelled examples per class (", (_pct(v), t["task"]), "). "]
        elif match == curve[0][0]:
            f.parts += [
                f"is beaten already by a linear probe on {match} labelled example(s) per class (",
                (_pct(curve[0][1]), t["task"]),
                "). ",
            ]
        else:
            f.parts += [
                f"is worth a linear probe on {match} labelled examples per class (",
                (_pct(dict(curve)[match]), t["task"]),
                "). ",
            ]
    return f if f.parts else None


def findings(tasks: list[dict]) -> list[Finding]:
    """The findings the evaluation's tasks support, in the order above."""
    out = [fn(tasks) for fn in (_transfer, _ensembling, _robustness, _fewshot)]
    return [f for f in out if f is not None]
