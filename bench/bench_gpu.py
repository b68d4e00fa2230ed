"""`wit train` (JPEGs decoded by the workers, and on the GPU) vs `open_clip_train` on one CUDA GPU.

For each: samples/s, the share of the time the step waits for data, MFU and peak GPU memory, on the
same synthetic shards (288 px JPEGs of the synthetic world, so the 224 px crop decodes at full
size), the same model (ViT-B-32), precision (bf16 autocast), batch (256) and data workers.

    .venv/bin/python bench/bench_gpu.py [--model ViT-B-32] [--batch 256] [--steps 200] [--workers N]

Without a CUDA GPU it stops with a message, unless `--device cpu` is given: that runs the mechanics
(tests/train/test_bench_gpu.py does, with `--model wit-tiny --batch 8 --steps 3`); `--decode gpu`
needs CUDA, so its row says so there. The table goes to BENCHMARKS.md (section `gpu`), or to the
file `--benchmarks` names.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _report  # noqa: E402
from _report import OPEN_CLIP_TRAIN_PATCH, commit, table, train_testdata, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
testdata = train_testdata()

# wit train in its own process (a fresh CUDA context and allocator per run), then its peak memory
WIT_RUN = (
    "import json, sys, torch; from wit.train.config import TrainConfig; from wit.train.loop import train; "
    "train(TrainConfig(**json.loads(sys.argv[3])), sys.argv[1], sys.argv[2]); "
    "print('PEAK_BYTES', torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)"
)
PATCH = OPEN_CLIP_TRAIN_PATCH
OPEN_CLIP_PRECISION = {"bf16": "amp_bf16", "amp": "amp", "fp32": "fp32"}


def run_wit(url: str, out: str, a, decode: str) -> dict:
    opts = dict(
        model=a.model,
        batch_size=a.batch,
        steps=a.steps,
        lr=1e-3,
        warmup=0,
        precision=a.precision,
        workers=a.workers,
        decode=decode,
        device=a.device,
        log_every=max(1, a.steps // 10),
    )
    proc = subprocess.run(
        [sys.executable, "-c", WIT_RUN, url, out, json.dumps(opts)], capture_output=True, text=True, env=_env()
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wit train --decode {decode} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = pq.read_table(Path(out) / "metrics.parquet").to_pylist()
    rows = rows[1:] or rows  # the first interval: warm-up
    mfu = [r["mfu"] for r in rows if r["mfu"] is not None]
    return {
        "samples_per_s": _mean(r["samples_per_s"] for r in rows),
        "data_wait": _mean(r["data_wait_frac"] for r in rows),
        "mfu": _mean(mfu) if mfu else None,
        "peak_bytes": _peak(proc.stdout),
    }


def run_open_clip(pattern: str, logs: str, a) -> dict:
    code = (
        f"import sys, torch, wit.train.models; {PATCH}; from open_clip_train.main import main; main(sys.argv[1:]); "
        "print('PEAK_BYTES', torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)"
    )
    args = [
        *("--train-data", pattern, "--dataset-type", "webdataset", "--dataset-resampled"),
        *("--train-num-samples", str(a.steps * a.batch), "--batch-size", str(a.batch), "--epochs", "1"),
        *("--workers", str(a.workers), "--lr", "1e-3", "--warmup", "0", "--model", a.model, "--logs", logs),
        *("--log-every-n-steps", str(max(1, a.steps // 10)), "--save-frequency", "0", "--report-to", ""),
        *("--precision", OPEN_CLIP_PRECISION[a.precision], "--grad-clip-norm", "1.0", "--device", a.device),
    ]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env())
    text = proc.stdout + proc.stderr
    # "Data (t)" and "Batch (t)": mean data wait and step time (data included) over each log interval
    times = [(float(d), float(b)) for d, b in re.findall(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)", text)]
    if proc.returncode != 0 or not times:
        raise RuntimeError(f"open_clip_train failed:\n{text[-3000:]}")
    times = times[1:] or times  # the first interval: warm-up, as for wit
    return {
        "samples_per_s": _mean(a.batch / b for _, b in times),
        "data_wait": _mean(d / b for d, b in times),
        "mfu": None,
        "peak_bytes": _peak(proc.stdout),
    }


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _peak(stdout: str) -> int | None:
    found = [int(x) for x in re.findall(r"PEAK_BYTES (\d+)", stdout)]
    return found[-1] if found and found[-1] > 0 else None


def mfu_of(model: str, device: torch.device, precision: str, rate: float) -> float | None:
    """MFU of a rate by wit's estimate (metrics.flops_per_sample, metrics.peak_flops)."""
    import open_clip

    import wit.train.models  # noqa: F401  (registers wit-tiny)
    from wit.train import metrics as mx

    peak = mx.peak_flops(device, precision)
    if not peak or not math.isfinite(rate):
        return None
    return rate * mx.flops_per_sample(open_clip.create_model(model), open_clip.get_model_config(model)) / peak


def main(argv: list[str] | None = None) -> None:
    from wit.train.data import default_workers

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default=None, help="cuda (default, when there is a GPU) or cpu (the mechanics)")
    p.add_argument("--workers", type=int, default=None, help="data workers (default: wit's default for 1 rank)")
    p.add_argument("--precision", default=None, choices=sorted(OPEN_CLIP_PRECISION), help="default: bf16 on CUDA")
    p.add_argument("--samples", type=int, default=16384, help="samples in the synthetic shards (read in epochs)")
    p.add_argument("--image-size", type=int, default=288, help="JPEG side in pixels")
    p.add_argument("--benchmarks", type=Path, default=None, help="the file to write the table into")
    p.add_argument("--skip-open-clip", action="store_true", help="leave open_clip_train out")
    a = p.parse_args(argv)
    if a.device is None:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu: no CUDA GPU here; it measures one (--device cpu runs its mechanics only)")
        a.device = "cuda"
    device = torch.device(a.device)
    a.precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    a.workers = a.workers if a.workers is not None else default_workers(1)
    stamp = commit()  # of this repository, before the table's file may move elsewhere
    if a.benchmarks is not None:
        _report.BENCHMARKS = a.benchmarks
    if not a.skip_open_clip and importlib.util.find_spec("open_clip_train") is None:
        sys.exit("open_clip_train is not installed (it ships with open_clip_torch): give --skip-open-clip")

    results: dict[str, dict | str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = max(8, a.workers)
        per_shard = math.ceil(a.samples / shards)
        t = time.perf_counter()
        ds = testdata.build_dataset(
            Path(tmp) / "ds", n_shards=shards, per_shard=per_shard, corrupt=0, image_size=a.image_size
        )
        print(f"{shards} shards x {per_shard} samples in {time.perf_counter() - t:.0f} s", flush=True)
        for decode in ("cpu", "gpu"):
            if decode == "gpu" and device.type != "cuda":
                results[f"wit train --decode {decode}"] = "needs CUDA"
                continue
            results[f"wit train --decode {decode}"] = run_wit(ds.url, f"{tmp}/wit-{decode}", a, decode)
            print(f"wit --decode {decode}: {results[f'wit train --decode {decode}']}", flush=True)
        if not a.skip_open_clip:
            pattern = f"{ds.url}/shards/{{000000..{shards - 1:06d}}}.tar"
            oc = run_open_clip(pattern, f"{tmp}/oc", a)
            oc["mfu"] = mfu_of(a.model, device, a.precision, oc["samples_per_s"])
            results["open_clip_train"] = oc
            print(f"open_clip_train: {oc}", flush=True)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (mechanics only)"
    rows = []
    for name, r in results.items():
        if isinstance(r, str):
            rows.append([name, r, "", "", ""])
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r["peak_bytes"] else "n/a"
        rows.append([name, f"{r['samples_per_s']:.0f}", f"{r['data_wait']:.0%}", mfu, peak])
    body = (
        f"Commit `{stamp}`. {gpu}; {a.model} {a.precision}, batch {a.batch}, {a.steps} steps, "
        f"{a.workers} data worker(s) each.\n\n"
        + table(["trainer", "samples/s", "data wait", "MFU", "peak GPU memory"], rows)
        + (
            f"\n\nThe same {shards} shards x {per_shard} samples ({a.image_size} px JPEGs of the synthetic world, "
            "quality 90), read in epochs by wit and with replacement by open_clip_train (`--dataset-resampled`). "
            "Rates are means over the log intervals after the first (warm-up), data waits included: wit's from "
            "its metrics, open_clip_train's from the `Data (t)` / `Batch (t)` it logs. wit's data wait with "
            "`--decode gpu` includes the trainer's own share of the decode (handing the JPEGs to nvJPEG). MFU "
            "by wit's estimate (6 x parameters x tokens, the GPU's dense peak at that precision). Peak memory: "
            "`torch.cuda.max_memory_allocated()` at the end of each run. Both clip gradients at norm 1.0."
        )
    )
    if device.type != "cuda":
        body += " This run had no GPU: its numbers check the script, they measure nothing."
    path = write_section("gpu", "Training on one GPU: wit train vs open_clip_train", body, "bench/bench_gpu.py")
    print(body)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
