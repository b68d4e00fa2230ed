"""Run `wit.train.loop.train` in a subprocess (for torchrun and SIGKILL tests).

usage: python _run_train.py DATASET OUT '{"steps": 10, ...}'
"""

import json
import sys

from wit.train.config import TrainConfig
from wit.train.loop import train

if __name__ == "__main__":
    dataset, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    result = train(TrainConfig(**options), dataset, out)
    print(json.dumps({"loss": result.loss, "step": result.step, "checkpoint": result.checkpoint}))
