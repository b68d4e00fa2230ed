"""Executors: drive a stage's partitions in a local process pool or on a Ray cluster, whole or as
one slice of a job array.

The stage knows nothing of scheduling. This module asks it for its partitions, skips the ones
already committed (a re-run after a kill redoes only what was in flight), keeps the slice
``--part i/N`` (partition ``k`` belongs to slice ``k % N``: with a job array of N tasks, task ``i``
runs ``--part i/N``), runs them (``executor="local"``: ``workers`` processes at a time;
``executor="ray"``: one Ray task per partition, see :mod:`wit.pipeline.ray_executor`), and
finalizes the run once every partition of the stage is committed, whichever slice finishes last.
Whatever runs a partition commits it and its marker itself, so the executor, the slice and the
worker count never change the bytes out.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from wit.manifests import storage
from wit.manifests.manifest import ManifestRef
from wit.manifests.runrecord import read_run_record
from wit.manifests.stage import (
    Partition,
    Stage,
    StageError,
    commit_partition,
    committed,
    finalize,
    finished,
    open_run,
    resolve_inputs,
)


@dataclass(frozen=True, slots=True)
class PartSpec:
    """Slice ``index`` of ``count``: the partitions whose number is ``index`` modulo ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"--part {self.index}/{self.count}: need 0 <= i < N")

    @classmethod
    def parse(cls, text: str | None) -> PartSpec:
        if not text:
            return cls()
        try:
            i, n = text.split("/")
            return cls(int(i), int(n))
        except ValueError:
            raise ValueError(f"--part takes i/N with 0 <= i < N (e.g. 0/4), got {text!r}") from None

    def owns(self, partition: Partition) -> bool:
        return partition.index % self.count == self.index


EXECUTORS = ("local", "ray")


@dataclass(frozen=True, slots=True)
class StageOutcome:
    ref: ManifestRef | None  # set once the whole stage is finished
    total: int
    ran: int
    skipped: int
    remaining: int  # partitions of other slices still to run

    @property
    def done(self) -> bool:
        return self.ref is not None


def run_one(stage: Stage, config: Any, partition: Partition, out: str) -> dict:
    # Runs in a worker process: do the work and commit it there, so only a small marker dict
    # travels back and a crash of the parent cannot lose committed work.
    result = stage.run_partition(config, partition, out)
    return commit_partition(stage, partition, result, out)


def run_stage(
    stage: Stage,
    config: Any,
    inputs: list[ManifestRef],
    out: str,
    workers: int = 1,
    part: PartSpec = PartSpec(),
    progress: bool = True,
    executor: str = "local",
    ray_address: str | None = None,
) -> StageOutcome:
    """Run (or resume) ``stage`` into ``out``; see the module docstring.

    ``ray_address``: the cluster of ``executor="ray"`` (default ``RAY_ADDRESS``; with neither, a
    local Ray instance).
    """
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    if executor not in EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    out = storage.normalize(out)
    inputs = resolve_inputs(inputs)
    ref = finished(stage, config, inputs, out)
    partitions = stage.partitions(config, inputs)
    if ref is not None:
        return StageOutcome(ref=ref, total=len(partitions), ran=0, skipped=len(partitions), remaining=0)
    if not partitions:
        raise StageError(f"{stage.name}: no input to process")
    if [p.index for p in partitions] != list(range(len(partitions))):
        raise StageError(f"{stage.name}: partitions must be numbered 0..n-1")
    cluster = None
    before = committed(out) if executor == "ray" else set()
    if executor == "ray" and any(part.owns(p) and p.index not in before for p in partitions):
        from wit.pipeline import ray_executor

        # connect (or say which extra to install) and refuse local paths on a multi-node
        # cluster before anything is claimed or written; nothing to run needs no cluster
        cluster = ray_executor.RayCluster.connect(ray_address)
        urls = [out] + [i.url for i in inputs] + ray_executor.config_paths(config)
        cluster.check_reachable(stage.name, urls)
    done = open_run(stage, config, inputs, out)
    todo = [p for p in partitions if part.owns(p) and p.index not in done]
    skipped = sum(1 for p in partitions if part.owns(p) and p.index in done)
    bar = tqdm(
        total=len(todo),
        desc=stage.name,
        unit="part",
        disable=not progress or not todo,
        file=sys.stderr,
        leave=False,
    )
    try:
        if cluster is not None:
            if todo:
                cluster.run(stage, config, todo, out, bar.update)
        elif workers == 1 or len(todo) <= 1:
            for p in todo:
                run_one(stage, config, p, out)
                bar.update()
        else:
            _run_pool(stage, config, todo, out, workers, bar)
    finally:
        bar.close()
    done = committed(out)
    missing = [p.index for p in partitions if p.index not in done]
    if not missing:
        # what killed attempts left (a worker SIGKILLed mid-partition, whose retry committed it)
        storage.sweep_temporaries(out)
    ref = finalize(stage, config, inputs, out, len(partitions)) if not missing else None
    return StageOutcome(ref=ref, total=len(partitions), ran=len(todo), skipped=skipped, remaining=len(missing))


def _run_pool(stage: Stage, config: Any, todo: list[Partition], out: str, workers: int, bar: tqdm) -> None:
    # spawn, not fork: s3fs runs an event loop thread and torch keeps thread pools, neither of
    # which survives fork reliably.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
        pending: set[Future] = {pool.submit(run_one, stage, config, p, out) for p in todo}
        try:
            while pending:
                finished_now, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished_now:
                    fut.result()  # re-raises a stage error from the worker
                    bar.update()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


MAX_ROUNDS = 1000  # a repeating phase that has not converged by then is a bug, not a big input


def phase_folders(stage: Stage, sub: str, out: str) -> Iterator[str]:
    """The folders of one phase: ``out/sub`` (``out`` for ``""``), or, for a phase that repeats
    (``stage.repeats``, e.g. filter's connected-component rounds), its rounds ``out/sub/r000``,
    ``r001``…: the next round comes once a round has finished and ``stage.another_round(url)``
    says its output has not converged. The generator stops at the first unfinished round (after
    yielding it), so a caller that runs each folder it gets, and one that only reads the run
    records (the driver's skip-or-resume decision), see the same rounds.
    """
    if not getattr(stage, "repeats", False):
        yield storage.join(out, sub) if sub else out
        return
    for r in range(MAX_ROUNDS):
        url = storage.join(out, sub, f"r{r:03d}")
        yield url
        if read_run_record(url) is None or not stage.another_round(url):
            return
    raise StageError(f"{stage.name}: no convergence after {MAX_ROUNDS} rounds in {storage.join(out, sub)}")


def run_phases(
    phases: list[tuple[Stage, str]],
    config: Any,
    inputs: list[ManifestRef],
    out: str,
    workers: int = 1,
    part: PartSpec = PartSpec(),
    progress: bool = True,
    executor: str = "local",
    ray_address: str | None = None,
) -> StageOutcome:
    """Run a stage made of phases in order, each reading the previous one's output.

    ``phases`` pairs each stage with its subfolder of ``out`` (``""`` for the final output;
    intermediates go to ``_name`` folders, which verify leaves to their own run records). A
    repeating phase runs round after round, each reading the round before (:func:`phase_folders`).
    Only the first phase is sliced by ``part``: later phases need the whole of the phase before,
    so the slice that completes it runs them in full (they are idempotent, so two slices
    finishing at once only repeat identical work).
    """
    outcome = None
    for k, (stage, sub) in enumerate(phases):
        for phase_out in phase_folders(stage, sub, out):
            slice_ = part if k == 0 else PartSpec()
            outcome = run_stage(stage, config, inputs, phase_out, workers, slice_, progress, executor, ray_address)
            if not outcome.done:
                return outcome
            inputs = [outcome.ref]
    assert outcome is not None, "a stage needs at least one phase"
    return outcome
