"""The Ray executor: a stage's partitions as Ray tasks (or actors) on a cluster.

One Ray task runs one partition through :func:`wit.pipeline.executor.run_one`, which writes and
commits the partition and its marker on storage exactly as the local pool does and returns only
the small marker dict: data never travels through the object store (a big return once broke
NeMo Curator on gRPC's 512 MB limit), and the markers on storage, not Ray, are the durable record,
so a driver killed and run again resumes from them (Ray rebuilds lost work only while its driver
lives).

- Bounded in flight: at most ``WIT_RAY_MAX_IN_FLIGHT`` tasks (default twice the partitions the
  cluster can run at once, read again as the cluster grows) are submitted; the rest wait in the
  driver, so a stage of a million partitions does not put a million task specs in the cluster.
- A worker or node that dies is Ray's to retry (``max_retries``, ``WIT_RAY_MAX_RETRIES``, default
  3); the retry redoes the partition from the start (what the dead attempt left is an abandoned
  temporary, swept before the run record is written). An error raised by the stage itself is not
  retried: it is raised once, in the driver, with its own type and message; nothing more is
  submitted and what was submitted is cancelled (a rerun redoes exactly the partitions without a
  marker).
- Each task declares the CPUs (and GPUs) of ``stage.resources(config)``: Ray sets
  ``OMP_NUM_THREADS`` from it. Stages whose partitions load a model (CLIP scoring) run on actors
  that keep it loaded: one per GPU when the cluster has GPUs, else CPU actors.
- The driver's environment does not reach Ray workers by itself: the ``AWS_*`` variables (but those
  naming the driver's own machine: a profile, a credentials file) and ``WIT_*`` go with every task.
- Before anything is written, a cluster of several nodes refuses local paths: the output, the
  inputs and the files a config names (a query list, a checkpoint), but wit's own package data.

Ray is imported here only, and this module only when ``--executor ray`` is asked for.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wit.manifests import storage
from wit.manifests.stage import Partition, Resources, Stage, StageError, stage_resources
from wit.pipeline.executor import run_one

FORWARDED_PREFIXES = ("AWS_", "WIT_")
# AWS variables that name something of the driver's machine (a profile, a file, its container's
# credential endpoint): on the nodes they would replace credentials that work there (an instance
# role) with ones that do not exist
MACHINE_LOCAL = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_CA_BUNDLE",
)  # fmt: skip
MAX_RETRIES = 3
INSTALL_HINT = "--executor ray needs Ray: pip install 'wit[ray]'"


def forwarded_env() -> dict[str, str]:
    """The driver's variables that every task needs: ``AWS_*`` (endpoint, region, keys) but those
    that name the driver's own machine, and ``WIT_*``.

    ``WIT_RAY_NO_ENV=1`` forwards nothing (nodes with credentials of their own). What is forwarded
    is part of each task's runtime environment, which Ray's dashboard shows: prefer node credentials
    (an instance role) to keys on a shared cluster.
    """
    if storage.env_flag("WIT_RAY_NO_ENV"):
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) and k not in MACHINE_LOCAL}


def config_paths(config: Any) -> list[str]:
    """The local files a config names (a query list, a checkpoint, reference images), but those
    shipped inside wit itself: each node has its own copy of the package, at the same place (Ray
    needs the same environment on every node)."""
    from wit.manifests.options import split_ref
    from wit.manifests.stage import config_dict

    shipped = [os.path.dirname(os.path.abspath(m.__file__)) for n, m in list(sys.modules.items())
               if n.startswith("wit.") and n.count(".") == 1 and getattr(m, "__file__", None)]  # fmt: skip
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            url = split_ref(value)[1]  # a reference set is TASK=URL
            path = storage.local_path(url) if url.startswith(("/", "file://")) else None
            if path and os.path.exists(path) and not any(path.startswith(d + os.sep) for d in shipped):
                found.append(url)

    walk(config_dict(config))
    return found


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


_connected: str | None = None  # the address this module connected with ("local": a local instance)


def _gcs_address(ray) -> str | None:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - e.g. Ray Client mode, which has no GCS address to show
        return None


@dataclass(frozen=True, slots=True)
class RayCluster:
    """A connection to a Ray cluster (``address``, ``RAY_ADDRESS``, or a local instance)."""

    cpus: float
    gpus: float
    nodes: int

    @classmethod
    def connect(cls, address: str | None = None) -> RayCluster:
        global _connected
        ray = import_ray()
        if ray.is_initialized():
            # the stages of one `wit run` connect once; a library caller may have connected itself
            have = _connected if _connected is not None else _gcs_address(ray)
            if address and have and address not in (have, "auto"):
                raise StageError(f"--ray-address {address}: this process is already connected to Ray at {have}")
        else:
            address = address or os.environ.get("RAY_ADDRESS") or None
            kwargs: dict[str, Any] = {"logging_level": "WARNING", "configure_logging": False}
            if address is None:
                kwargs["include_dashboard"] = False  # a local instance: nobody to show it to
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as exc:
                raise StageError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
            _connected = address or "local"
        resources = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        return cls(cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)), nodes=nodes)

    def check_reachable(self, stage_name: str, urls: list[str]) -> None:
        """Refuse local paths on a cluster of several nodes: the other nodes cannot see them.

        ``WIT_RAY_SHARED_FS=1`` says that local paths are a file system mounted at the same place
        on every node (NFS, Lustre).
        """
        if self.nodes <= 1 or storage.env_flag("WIT_RAY_SHARED_FS"):
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
        retries = int(storage.env_number("WIT_RAY_MAX_RETRIES", MAX_RETRIES, integer=True))
        fixed_limit = int(storage.env_number("WIT_RAY_MAX_IN_FLIGHT", 0, integer=True))
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
            if fixed_limit:
                count = min(count, fixed_limit)
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

            # an actor's restarts count over its whole life, across the partitions it ran
            lost = f"lost its model worker, which Ray restarts at most {retries} times a stage"
            try:
                self._drive(ray, stage, todo, submit, release, lambda: bool(idle), on_done, lost)
            finally:
                for actor in actors:
                    ray.kill(actor)  # give back their CPUs / GPUs and the model's memory
            return
        task = ray.remote(run_one).options(
            num_gpus=res.gpus if self.gpus else 0.0, max_retries=retries, retry_exceptions=False, **options
        )
        in_flight: set = set()
        limit = _InFlightLimit(ray, res.cpus, fixed_limit)

        def submit_task(p: Partition):
            ref = task.remote(stage_ref, config_ref, p, out)
            in_flight.add(ref)
            return ref

        lost = f"lost its worker {retries + 1} times"
        self._drive(ray, stage, todo, submit_task, in_flight.discard, lambda: len(in_flight) < limit(), on_done, lost)

    def _actor_count(self, res: Resources, gpus: float, partitions: int) -> int:
        per = self.gpus / gpus if gpus else self.cpus / max(res.cpus, 1e-9)
        return max(1, min(partitions, int(per)))

    @staticmethod
    def _drive(ray, stage: Stage, todo, submit, release, has_room, on_done, lost_why: str) -> None:
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
                        if error is not None:
                            continue  # cancelled after the first error, or failed too: one error is raised
                        cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
                        if isinstance(cause, BaseException) and not isinstance(cause, RayError):
                            error = cause  # the stage's own exception: its type and message, once
                        else:
                            exc = cause if isinstance(cause, RayError) else exc
                            first = (str(exc).strip().splitlines() or [""])[0]
                            # lost: the worker or node died more often than Ray retries; otherwise e.g.
                            # a worker that cannot import the stage's or config's module
                            why = lost_why if isinstance(exc, lost) else "failed on Ray"
                            error = StageError(
                                f"{stage.name}: partition {p.index} ({p.source}) {why} ({type(exc).__name__}: {first})"
                            )
                        _cancel(ray, pending)  # what is queued or running stops; a rerun redoes it
                        continue
                    on_done()
        except BaseException:
            _cancel(ray, pending)  # the driver is going away: nothing of this run goes on
            raise
        if error is not None:
            raise error


def _cancel(ray, refs) -> None:
    """Stop the tasks of ``refs``: a queued one never starts, a running one's worker is killed (a
    polite cancel does not stop a task that is busy; a partition is idempotent, and what the killed
    one left is an abandoned temporary). Actor tasks cannot be killed: queued ones are dropped."""
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - an actor task: cancel what has not started
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort: a task that ends anyway, a dead driver's job
                pass


class _InFlightLimit:
    """How many tasks to keep submitted: ``WIT_RAY_MAX_IN_FLIGHT``, or twice the partitions the
    cluster can run at once, read again every few seconds (an autoscaling cluster grows)."""

    REFRESH_S = 5.0

    def __init__(self, ray, cpus_per_task: float, fixed: int):
        self.ray, self.per, self.fixed = ray, max(cpus_per_task, 1e-9), fixed
        self.value, self.read_at = 2, -self.REFRESH_S

    def __call__(self) -> int:
        if self.fixed:
            return self.fixed
        if time.monotonic() - self.read_at >= self.REFRESH_S:
            cpus = float(self.ray.cluster_resources().get("CPU", 0))
            self.value, self.read_at = max(2, 2 * int(cpus // self.per)), time.monotonic()
        return self.value
