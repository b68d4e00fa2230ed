"""wit.evaluate: zero-shot benchmark suites for CLIP checkpoints (see README.md in this folder).

``evaluate(checkpoint, out, suite, config)`` runs a suite and writes results, JSON and a report;
``export(name, url)`` writes a built-in dataset in CLIP_benchmark's WebDataset layout.
The synthetic world (:mod:`wit.evaluate.world`) is imported by ingest's synthetic web too, so
this module imports the heavy parts lazily.
"""

from __future__ import annotations

__all__ = ["EvalConfig", "EvalError", "EvalResult", "evaluate", "export", "load_suite"]


def __getattr__(name: str):
    if name in ("EvalConfig", "EvalResult", "evaluate"):
        from . import run

        return getattr(run, name)
    if name == "export":
        from .datasets import export

        return export
    if name == "EvalError":
        from .errors import EvalError

        return EvalError
    if name == "load_suite":
        from .tasks import load_suite

        return load_suite
    raise AttributeError(name)
