"""Process groups: torchrun (env://) or SLURM, DDP over NCCL on GPUs and gloo on CPU.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Under
``srun`` without torchrun, the SLURM variables (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``) give rank and size; the rendezvous address still comes from ``MASTER_ADDR`` and
``MASTER_PORT`` (export them in the batch script; see train/README.md).

Every collective gives up after ``WIT_DIST_TIMEOUT_S`` seconds (default 1800, 30 minutes) instead
of the backend's own default (10 minutes for NCCL in some torch versions, 30 for gloo): a rank that
died or hangs fails the others with a timeout error rather than holding them forever, and a slow but
live step (a long first ``torch.compile``, a slow shard) is not mistaken for a dead rank.
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wit.manifests import storage

TIMEOUT_S = 1800.0  # default of WIT_DIST_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else SLURM's, else one process."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def local_world_size(env: DistEnv) -> int:
    """The ranks on this node: torchrun's ``LOCAL_WORLD_SIZE``, else SLURM's tasks per node
    (``SLURM_NTASKS_PER_NODE``, as ``8`` or ``8(x2)``), else the world size (one node)."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "").split("(")[0].split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return max(1, env.world_size)


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or SLURM's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def init(device: str = "auto") -> DistEnv:
    """Join the process group (if launched as several processes) and pick this process's device."""
    rank, world, local = detect()
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local) if device in ("auto", "cuda") else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world == 1:
        return DistEnv(device=dev)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"{var} is not set: launch with torchrun, or export it in the SLURM script")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            device_id=dev if use_cuda else None,
            timeout=timeout(),
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def timeout() -> datetime.timedelta:
    """How long a collective may wait for the other ranks: ``WIT_DIST_TIMEOUT_S`` seconds, 30 minutes by default."""
    seconds = storage.env_number("WIT_DIST_TIMEOUT_S", TIMEOUT_S)
    if seconds <= 0:
        raise ValueError(f"WIT_DIST_TIMEOUT_S must be positive, got {seconds}")
    return datetime.timedelta(seconds=seconds)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean(env: DistEnv, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over ranks (a sync point: only call it on logging steps)."""
    if not env.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / env.world_size


def gather_objects(env: DistEnv, obj):
    """Every rank's ``obj``, in rank order (picklable objects; small ones: stream states, skips)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj, src: int = 0):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class RemoteError(RuntimeError):
    """Raised on every rank when the work rank 0 did for all of them failed there."""


def on_main(env: DistEnv, fn):
    """``fn()`` run on rank 0 only and its result broadcast: one decision (which shards, which
    checkpoint) instead of one per rank, and one read of storage. An error on rank 0 is raised on
    every rank, with rank 0's type where it pickles, so none waits for a broadcast that never comes."""
    if not env.distributed:
        return fn()
    box: list = [None]
    error: Exception | None = None
    if env.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # sent to every rank, raised below on each (rank 0's own included)
            error = exc
            try:
                pickle.dumps(exc)
                box[0] = ("error", exc)
            except Exception:  # an exception that does not pickle goes as its text
                box[0] = ("error", RemoteError(f"on rank 0: {type(exc).__name__}: {exc}"))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise error if error is not None else value  # rank 0 raises its own, with its traceback
    return value


def agree(env: DistEnv, error: str | None, kind: type[Exception] = RemoteError) -> None:
    """Every rank says whether its part went well; if one failed, every rank raises the same error
    (``kind``) naming it, so no rank goes on into a collective that a failed one never joins."""
    errors = gather_objects(env, error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        raise kind("; ".join(f"rank {r}: {e}" if env.distributed else e for r, e in failed))
