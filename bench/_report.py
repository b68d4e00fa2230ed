"""Write one benchmark's table into its own section of BENCHMARKS.md (other sections are kept)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Each section is written by the script named in it, which runs `wit` and the reference tool\n"
    "side by side in one run on the same input. Re-run a script to refresh its section.\n"
)


# CPU features that move this project's figures: bf16 matmuls are emulated without AVX512-BF16 or
# AMX (a third of fp32's speed instead of faster), sha256 runs several times faster with SHA-NI.
CPU_FEATURES = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_bf16", "AVX512-BF16"),
    ("amx_bf16", "AMX"),
    ("sha_ni", "SHA-NI"),
)


def cpu() -> str:
    """The CPU's model and which of CPU_FEATURES it has ("AMD EPYC, AVX2 SHA-NI"), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "CPU unknown"
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    have = set(flags.group(1).split()) if flags else set()
    name = model.group(1).strip() if model else (platform.processor() or "CPU unknown")
    features = " ".join(label for flag, label in CPU_FEATURES if flag in have)
    return f"{name}, {features or 'none of ' + ' '.join(label for _, label in CPU_FEATURES)}"


def pin_one_core() -> str:
    """Pin this process to one core (the lowest it may use), for figures per core; says whether it could."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        return "pinned to one core"
    return "not pinned (no sched_setaffinity)"


def machine() -> str:
    return f"{platform.machine()}, {cpu()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def commit() -> str:
    """The commit a table measured: ``git rev-parse --short HEAD``, marked when tracked files differ."""
    root = BENCHMARKS.parent
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    # BENCHMARKS.md itself is left out: an earlier script of the same run may have just written it
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md"],
        cwd=root,
        capture_output=True,
    )
    return rev.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def write_section(name: str, title: str, body: str, script: str) -> Path:
    """Replace (or append) the section ``name`` of BENCHMARKS.md with ``body`` (Markdown)."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"`{script}` · {stamp} · {machine()}\n\n{body.strip()}\n<!-- /bench:{name} -->\n"
    )
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    BENCHMARKS.write_text(text)
    return BENCHMARKS


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def train_testdata():
    """tests/train/_data.py (the tiny-shard builder of the trainer's tests), imported by path."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    if "wit_train_testdata" not in sys.modules:
        spec = importlib.util.spec_from_file_location("wit_train_testdata", root / "tests/train/_data.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["wit_train_testdata"] = module
        spec.loader.exec_module(module)
    return sys.modules["wit_train_testdata"]


# open_clip_train 3.3's own group_by_keys does not know the end-of-shard marker ({}) that webdataset
# 0.2.9x's tar_file_expander yields (KeyError: 'fname'); the smallest fix: ask for no marker. Code
# the benchmarks exec before importing open_clip_train.
OPEN_CLIP_TRAIN_PATCH = (
    "import functools, open_clip_train.data as d, webdataset.tariterators as t; "
    "d.tar_file_expander = functools.partial(t.tar_file_expander, eof_value=None)"
)
