"""bench/bench_gpu.py's mechanics on CPU: shards made, both trainers run, the table written where asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


@pytest.mark.slow
def test_bench_gpu_runs_on_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n<!-- bench:train -->\nkept\n<!-- /bench:train -->\n")
    args = ["--device", "cpu", "--model", "wit-tiny", "--batch", "8", "--steps", "3", "--samples", "64"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args, "--workers", "1", "--benchmarks", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "<!-- bench:train -->\nkept" in text and "<!-- bench:gpu -->" in text  # other sections kept
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in text.splitlines() if line.startswith("| ")
    }
    assert float(rows["wit train --decode cpu"][0]) > 0 and float(rows["open_clip_train"][0]) > 0
    assert rows["wit train --decode gpu"][0] == "needs CUDA"
    assert "wit-tiny fp32, batch 8, 3 steps, 1 data worker(s)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_gpu_without_a_gpu_says_so():
    proc = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no CUDA GPU here" in proc.stderr
