"""What the user sees while training: log lines, the metrics Parquet file, TensorBoard if installed,
and an MFU estimate on GPUs.

FLOPs per sample (documented estimate, the usual ``6 * params * tokens`` rule for a forward and
backward pass): ``6 * (P_vision * T_vision + P_text * T_text)``, where ``T_vision`` is the number of
patches plus the class token, ``T_text`` the context length, and the token embedding table is not
counted (it is a lookup). Attention's quadratic term is ignored, as in the rule.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from wit.manifests import storage

# dense peak FLOP/s per device by name fragment: (bf16/fp16 tensor core, fp32)
PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "A10G": (125e12, 31.2e12),
    "L4": (121e12, 30.3e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


@dataclass(slots=True)
class StepMetrics:
    step: int
    epoch: int
    loss: float
    lr: float
    logit_scale: float  # exp(logit_scale): the inverse temperature
    samples_per_s: float  # all ranks
    samples_per_s_per_device: float
    data_wait_frac: float  # share of wall time spent waiting for the next batch
    mfu: float | None
    samples_seen: int
    elapsed_s: float

    def line(self) -> str:
        mfu = f"  mfu {self.mfu:.1%}" if self.mfu is not None else ""
        return (
            f"step {self.step}  loss {self.loss:.4f}  lr {self.lr:.2e}  temp {1 / self.logit_scale:.4f} "
            f"(scale {self.logit_scale:.1f})  {self.samples_per_s:.1f} samples/s "
            f"({self.samples_per_s_per_device:.1f}/device)  data wait {self.data_wait_frac:.0%}{mfu}"
        )


def flops_per_sample(model: torch.nn.Module, model_config: dict) -> float:
    vision = getattr(model, "visual", None)
    p_vis = sum(p.numel() for p in vision.parameters()) if vision is not None else 0
    p_all = sum(p.numel() for n, p in model.named_parameters())
    emb = sum(p.numel() for n, p in model.named_parameters() if "token_embedding" in n)
    p_txt = p_all - p_vis - emb
    vcfg, tcfg = model_config.get("vision_cfg", {}), model_config.get("text_cfg", {})
    image, patch = vcfg.get("image_size", 224), vcfg.get("patch_size", 16)
    image = image[0] if isinstance(image, (list, tuple)) else image
    t_vis = (image // patch) ** 2 + 1 if patch else 1
    t_txt = tcfg.get("context_length", 77)
    return 6.0 * (p_vis * t_vis + p_txt * t_txt)


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, full) in PEAK_FLOPS.items():
        if key in name:
            return full if precision == "fp32" else half
    return None


class MetricsLog:
    """Rows of :class:`StepMetrics`; written to ``OUT/metrics.parquet`` (rank 0) at every log
    interval, and to TensorBoard when it is installed (``tensorboard``)."""

    def __init__(self, out: str, rows: list[dict] | None = None, tensorboard: bool = True):
        self.out = out
        self.url = storage.join(out, "metrics.parquet")
        self.rows: list[dict] = list(rows or [])
        self.tensorboard = tensorboard
        self.writer: _TensorBoard | None = None  # opened with the first row: a log never used leaves no events file

    @classmethod
    def resume(cls, out: str, upto_step: int) -> MetricsLog:
        """The rows of an earlier run up to the checkpoint's step (later rows are re-done)."""
        log = cls(out)
        if storage.exists(log.url):
            rows = pq.read_table(io.BytesIO(storage.read_bytes(log.url))).to_pylist()
            log.rows = [r for r in rows if r["step"] <= upto_step]
        return log

    def add(self, m: StepMetrics) -> None:
        self.rows.append(asdict(m))
        if self.tensorboard and self.writer is None:
            self.writer = _TensorBoard.open(self.out)
            self.tensorboard = self.writer is not None
        if self.writer is not None:
            for key in ("loss", "lr", "logit_scale", "samples_per_s", "data_wait_frac"):
                self.writer.add_scalar(f"train/{key}", getattr(m, key), m.step)
            if m.mfu is not None:
                self.writer.add_scalar("train/mfu", m.mfu, m.step)

    def add_eval(self, step: int, values: dict) -> bool:
        """Put the evaluation callback's numbers at ``step`` into that step's row (the loop logs an
        evaluation step) as columns ``eval/NAME``, and into TensorBoard under the same tags.
        Values that are not numbers are left out; False when none is a number."""
        numbers = {
            f"{EVAL_PREFIX}{k}": float(v)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if not numbers:
            return False
        row = next((r for r in reversed(self.rows) if r["step"] == step), None)
        if row is None:  # an evaluation without a logged step: a row of its own
            row = {"step": step}
            self.rows.append(row)
        row.update(numbers)
        if self.writer is not None:
            for tag, value in numbers.items():
                self.writer.add_scalar(tag, value, step)
        return True

    def schema(self) -> pa.Schema:
        """``METRICS_SCHEMA``, then an ``eval/NAME`` column per evaluation number seen, by name."""
        extra = sorted({k for r in self.rows for k in r if k.startswith(EVAL_PREFIX)})
        return pa.schema(list(METRICS_SCHEMA) + [pa.field(k, pa.float64()) for k in extra])

    def write(self, strict: bool = True) -> None:
        """Rewrite ``metrics.parquet``. ``strict=False`` (the writes at log steps): a storage error
        is a warning, and the next write catches up, rather than the end of a long run."""
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.rows, schema=self.schema()), buf)
        try:
            storage.write_bytes(self.url, buf.getvalue())
        except storage.StorageError as exc:
            if strict:
                raise
            log(f"warning: {self.url} not written, retried at the next log step: {exc}")
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# the evaluation callback's numbers (`wit train --eval-every N --eval-suite S`): eval/TASK/METRIC
EVAL_PREFIX = "eval/"
METRICS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.int64()),
        ("loss", pa.float64()),
        ("lr", pa.float64()),
        ("logit_scale", pa.float64()),
        ("samples_per_s", pa.float64()),
        ("samples_per_s_per_device", pa.float64()),
        ("data_wait_frac", pa.float64()),
        ("mfu", pa.float64()),
        ("samples_seen", pa.int64()),
        ("elapsed_s", pa.float64()),
    ]
)


class _TensorBoard:
    """TensorBoard scalars in ``OUT/_tensorboard/`` ("_": not an output verify checks).

    A local output is written in place. TensorBoard's writer only writes local files, so for a
    remote output the events go to a local temporary folder, copied up to ``OUT/_tensorboard/`` at
    every :meth:`flush` (each log interval) and at :meth:`close`. A failed copy is reported and
    retried at the next flush: the plots are a view, the metrics Parquet file is the record.
    """

    def __init__(self, writer, remote: str | None, local_dir: str):
        self.writer = writer
        self.remote = remote
        self.local_dir = local_dir
        self._sent: dict[str, int] = {}  # local file -> size at its last copy

    @classmethod
    def open(cls, out: str) -> _TensorBoard | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        path = storage.local_path(out)
        if path is not None:
            folder = storage.join(path, "_tensorboard")
            return cls(SummaryWriter(log_dir=folder), None, folder)
        folder = tempfile.mkdtemp(prefix="wit-tensorboard-")
        return cls(SummaryWriter(log_dir=folder), storage.join(out, "_tensorboard"), folder)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()
        self._upload()

    def close(self) -> None:
        self.writer.close()
        if self.remote is not None:
            self._upload()
            shutil.rmtree(self.local_dir, ignore_errors=True)

    def _upload(self) -> None:
        if self.remote is None:
            return
        for root, _, names in os.walk(self.local_dir):
            for name in sorted(names):
                path = os.path.join(root, name)
                size = os.path.getsize(path)
                if self._sent.get(path) == size:
                    continue  # unchanged since its last copy
                rel = os.path.relpath(path, self.local_dir).replace(os.sep, "/")
                try:
                    storage.put_file(path, storage.join(self.remote, rel))
                except storage.StorageError as exc:
                    log(f"warning: TensorBoard events not copied up, retried at the next log step: {exc}")
                    return
                self._sent[path] = size


class Timer:
    """Wall time and the part of it spent waiting for data, between two log lines."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.wait = 0.0
        self.samples = 0

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def lap(self) -> tuple[float, float, int]:
        now = time.perf_counter()
        span, wait, samples = now - self.last, self.wait, self.samples
        self.last, self.wait, self.samples = now, 0.0, 0
        return span, wait, samples


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
