"""The Ray executor: a stage's partitions as Ray tasks (or actors) on a cluster.

One Ray task runs one partition through :func:`wit.pipeline.executor.run_one`, which writes and
commits the partition and its marker on storage exactly as the local pool does and returns only
the small marker dict: data never travels through the object store (a big return once broke
NeMo Curator on gRPC's 512 MB limit), and the markers on storage, not Ray, are the durable record,
so a driver killed and run again resumes from them (Ray rebuilds lost work only while its driver
lives).

- Bounded in flight: at most ``WIT_RAY_MAX_IN_FLIGHT`` tasks (default twice the partitions the
  cluster can run at once) are submitted; the rest wait in the driver, so a stage of a million
  partitions does not put a million task specs in the cluster.
- A worker or node that dies is Ray's to retry (``max_retries``, ``WIT_RAY_MAX_RETRIES``, default
  3); the retry redoes the partition from the start (what the dead attempt left is an abandoned
  temporary). An error raised by the stage itself is not retried: it is raised once, in the
  driver, with its own type and message, and nothing more is submitted; partitions already
  running finish and commit (a rerun then redoes only the failed ones).
- Each task declares the CPUs (and GPUs) of ``stage.resources(config)``: Ray sets
  ``OMP_NUM_THREADS`` from it. Stages whose partitions load a model (CLIP scoring) run on actors
  that keep it loaded: one per GPU when the cluster has GPUs, else CPU actors.
- The driver's environment does not reach Ray workers by itself: the ``AWS_*`` and ``WIT_*``
  variables (storage endpoint and credentials, wit's own switches) go with every task.

Ray is imported here only, and this module only when ``--executor ray`` is asked for.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wit.manifests import storage
from wit.manifests.stage import Partition, Resources, Stage, StageError, stage_resources
from wit.pipeline.executor import run_one

FORWARDED_PREFIXES = ("AWS_", "WIT_")
MAX_RETRIES = 3
INSTALL_HINT = "--executor ray needs Ray: pip install 'wit[ray]'"


def forwarded_env() -> dict[str, str]:
    """The driver's variables that every task needs (storage endpoint and credentials, WIT_*)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise StageError(INSTALL_HINT) from exc
    return ray


def _lost_errors() -> tuple[type, ...]:
    """Ray's exceptions for a task that lost its process or node (as opposed to one that failed)."""
    import ray.exceptions as rex

    names = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OutOfMemoryError", "ActorDiedError",
             "ActorUnavailableError", "LocalRayletDiedError")  # fmt: skip
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


class _PartitionWorker:
    """A Ray actor that runs partitions in one long-lived process, so a model loaded by the first
    partition (``functools.lru_cache`` in the stage) serves the rest."""

    def run(self, stage: Stage, config: Any, partition: Partition, out: str) -> dict:
        return run_one(stage, config, partition, out)


@dataclass(frozen=True, slots=True)
class RayCluster:
    """A connection to a Ray cluster (``address``, ``RAY_ADDRESS``, or a local instance)."""

    cpus: float
    gpus: float
    nodes: int

    @classmethod
    def connect(cls, address: str | None = None) -> RayCluster:
        ray = import_ray()
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or None
            kwargs: dict[str, Any] = {"logging_level": "WARNING", "configure_logging": False}
            if address is None:
                kwargs["include_dashboard"] = False  # a local instance: nobody to show it to
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as exc:
                raise StageError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
        resources = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        return cls(cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)), nodes=nodes)

    def check_reachable(self, stage_name: str, urls: list[str]) -> None:
        """Refuse local paths on a cluster of several nodes: the other nodes cannot see them.

        ``WIT_RAY_SHARED_FS=1`` says that local paths are a file system mounted at the same place
        on every node (NFS, Lustre).
        """
        if self.nodes <= 1 or os.environ.get("WIT_RAY_SHARED_FS", "").strip() in ("1", "true", "yes"):
            return
        for url in urls:
            if storage.is_local(url):
                raise StageError(
                    f"{stage_name}: {url} is a local path, but the Ray cluster has {self.nodes} nodes that "
                    "cannot all see it; use storage every node reaches (s3://...), or set "
                    "WIT_RAY_SHARED_FS=1 if it is a file system mounted at the same path on every node"
                )

    def run(self, stage: Stage, config: Any, todo: list[Partition], out: str, on_done: Callable[[], Any]) -> None:
        """Run ``todo`` (each partition commits itself); raise the first stage error once."""
        ray = import_ray()
        res = stage_resources(stage, config)
        retries = _int_env("WIT_RAY_MAX_RETRIES", MAX_RETRIES)
        options: dict[str, Any] = {
            "num_cpus": res.cpus,
            "runtime_env": {"env_vars": forwarded_env()},
        }
        # small objects, but put once rather than pickled into every task spec
        stage_ref, config_ref = ray.put(stage), ray.put(config)
        if res.model:
            gpus = res.gpus if self.gpus >= res.gpus > 0 else 0.0
            actor_cls = ray.remote(_PartitionWorker).options(
                num_gpus=gpus, max_restarts=retries, max_task_retries=retries, **options
            )
            count = self._actor_count(res, gpus, len(todo))
            actors = [actor_cls.remote() for _ in range(count)]
            idle = deque(actors)
            busy: dict[Any, Any] = {}

            def submit(p: Partition):
                actor = idle.popleft()
                ref = actor.run.remote(stage_ref, config_ref, p, out)
                busy[ref] = actor
                return ref

            def release(ref) -> None:
                idle.append(busy.pop(ref))

            try:
                self._drive(ray, stage, todo, submit, release, lambda: bool(idle), on_done, retries)
            finally:
                for actor in actors:
                    ray.kill(actor)  # give back their CPUs / GPUs and the model's memory
            return
        task = ray.remote(run_one).options(
            num_gpus=res.gpus if self.gpus else 0.0, max_retries=retries, retry_exceptions=False, **options
        )
        limit = _int_env("WIT_RAY_MAX_IN_FLIGHT", 0) or max(2, 2 * int(self.cpus // max(res.cpus, 1e-9)))
        in_flight: set = set()

        def submit_task(p: Partition):
            ref = task.remote(stage_ref, config_ref, p, out)
            in_flight.add(ref)
            return ref

        self._drive(ray, stage, todo, submit_task, in_flight.discard, lambda: len(in_flight) < limit, on_done, retries)

    def _actor_count(self, res: Resources, gpus: float, partitions: int) -> int:
        per = self.gpus / gpus if gpus else self.cpus / max(res.cpus, 1e-9)
        return max(1, min(partitions, int(per)))

    @staticmethod
    def _drive(ray, stage: Stage, todo, submit, release, has_room, on_done, retries: int) -> None:
        from ray.exceptions import RayError, RayTaskError

        lost = _lost_errors()

        queue = deque(todo)
        pending: dict[Any, Partition] = {}
        error: BaseException | None = None
        try:
            while queue or pending:
                while queue and error is None and has_room():
                    p = queue.popleft()
                    pending[submit(p)] = p
                if not pending:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    p = pending.pop(ref)
                    release(ref)
                    try:
                        ray.get(ref)
                    except RayError as exc:
                        cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
                        if isinstance(cause, BaseException) and not isinstance(cause, RayError):
                            error = error or cause  # the stage's own exception: its type and message, once
                            continue
                        exc = cause if isinstance(cause, RayError) else exc
                        first = (str(exc).strip().splitlines() or [""])[0]
                        if isinstance(exc, lost):  # the worker or node died more often than Ray retries
                            why = f"lost its worker {retries + 1} times ({type(exc).__name__}: {first})"
                        else:  # e.g. a worker that cannot import the stage's or config's module
                            why = f"failed on Ray ({type(exc).__name__}: {first})"
                        error = error or StageError(f"{stage.name}: partition {p.index} ({p.source}) {why}")
                        continue
                    on_done()
        except BaseException:
            for ref in pending:  # the driver is going away: nothing of this run goes on
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - best effort; a dead driver's tasks end with its job
                    pass
            raise
        if error is not None:
            raise error
