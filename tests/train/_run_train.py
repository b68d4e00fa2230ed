"""Run `wit.train.loop.train` in a subprocess (for torchrun and SIGKILL tests).

usage: python _run_train.py DATASET OUT '{"steps": 10, ...}'

With ``WIT_TEST_UID_LOG=PATH`` each rank appends to ``PATH.rank<R>`` one JSON line per batch it
takes (``{"epoch", "uids"}``) and one ``{"resumed_at": step}`` line when it resumes: what the
elastic-resume test needs to check that no uid is seen twice in an epoch. With
``WIT_TEST_KILL_AFTER=N`` rank 0 SIGKILLs its process group (itself and its data workers;
torchrun then stops the other ranks) as it starts step N + 1, once checkpoint N is committed: a
kill at a known point.
"""

import json
import os
import signal
import sys
import time

from wit.train import loop
from wit.train.config import TrainConfig
from wit.train.loop import train


def _instrument(out: str, log: str | None, kill_after: int | None) -> None:
    rank = os.environ.get("RANK", "0")
    sink = open(f"{log}.rank{rank}", "a", buffering=1) if log else None  # noqa: SIM115 (for the process's life)
    add, resume = loop._Tallies.add, loop._resume_stream
    steps = {"start": 0, "calls": 0}

    def logged_add(self, batch):
        steps["calls"] += 1  # one call per step (grad_accum 1), before the step
        if kill_after is not None and rank == "0" and steps["start"] + steps["calls"] == kill_after + 1:
            sidecar = f"{out}/checkpoints/step-{kill_after:08d}.pt.json"
            while not os.path.exists(sidecar):
                time.sleep(0.01)
            os.killpg(os.getpgid(0), signal.SIGKILL)
        if sink:
            sink.write(json.dumps({"epoch": batch["epoch"], "uids": batch["uids"]}) + "\n")
        return add(self, batch)

    def logged_resume(ckpt, *args, **kwargs):
        steps["start"] = int(ckpt["wit"]["step"])
        if sink:
            sink.write(json.dumps({"resumed_at": steps["start"]}) + "\n")
        return resume(ckpt, *args, **kwargs)

    loop._Tallies.add, loop._resume_stream = logged_add, logged_resume


if __name__ == "__main__":
    dataset, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    kill = os.environ.get("WIT_TEST_KILL_AFTER")
    if os.environ.get("WIT_TEST_UID_LOG") or kill:
        _instrument(out, os.environ.get("WIT_TEST_UID_LOG"), int(kill) if kill else None)
    result = train(TrainConfig(**options), dataset, out)
    if os.environ.get("RANK", "0") == "0":  # one line: two ranks' prints can interleave on one pipe
        print(json.dumps({"loss": result.loss, "step": result.step, "checkpoint": result.checkpoint}))
