"""Reshard throughput: ``wit shard`` (plan + write, one process) vs a plain byte copy of the same shards.

Target (issue #4): at least half of copy speed. Both read the same downloaded shards from local
disk and write to local disk; MB/s counts the downloaded shards' bytes.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _ingest_data import images, write_downloaded, write_filtered  # noqa: E402
from _report import table, write_section  # noqa: E402

from wit.ingest.shard import SHARD_PHASES, ShardConfig  # noqa: E402
from wit.manifests import storage  # noqa: E402
from wit.pipeline.executor import run_stage  # noqa: E402

SAMPLES = 6000
UNIQUE = 300


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    try:
        blobs = images(UNIQUE)
        down, ledger = write_downloaded(root / "downloaded", [blobs[i % UNIQUE] for i in range(SAMPLES)])
        filtered = write_filtered(root / "filtered", down, ledger)
        src = sorted((root / "downloaded" / "shards").glob("*.tar"))
        total = sum(p.stat().st_size for p in src)

        start = time.perf_counter()
        (root / "copy").mkdir()
        for p in src:  # a plain byte copy (sendfile; left in the page cache)
            storage.put_file(str(p), str(root / "copy" / p.name))
        copy_s = time.perf_counter() - start

        start = time.perf_counter()
        (root / "copy-sync").mkdir()
        for p in src:  # the same bytes committed as wit commits a shard: written, fsynced, renamed
            with storage.atomic_writer(str(root / "copy-sync" / p.name)) as fh:
                fh.write(p.read_bytes())
        sync_s = time.perf_counter() - start

        config = ShardConfig(samples_per_shard=1000, card=False)
        start = time.perf_counter()
        ref = filtered
        for stage, sub in SHARD_PHASES:
            out = str(root / "dataset" / sub) if sub else str(root / "dataset")
            ref = run_stage(stage, config, [ref], out, progress=False).ref
        wit_s = time.perf_counter() - start

        mb = total / 1e6
        rows = [
            ["plain byte copy (`shutil.copyfile`, no fsync)", f"{copy_s:.2f}", f"{mb / copy_s:.0f}", "1.00"],
            ["byte copy committed like a shard (write, fsync, rename)", f"{sync_s:.2f}", f"{mb / sync_s:.0f}",
             f"{copy_s / sync_s:.2f}"],
            ["`wit shard` (shuffle + write + manifest)", f"{wit_s:.2f}", f"{mb / wit_s:.0f}",
             f"{copy_s / wit_s:.2f}"],
        ]  # fmt: skip
        body = (
            f"{SAMPLES:,} samples (256 px JPEG) in {len(src)} shards, {mb:.0f} MB, local disk, one process; "
            "1000 samples per output shard. Target: `wit shard` at least 0.5× copy speed.\n\n"
            + table(["", "seconds", "MB/s", "× copy speed"], rows)
        )
        print(body)
        write_section("shard", "Reshard throughput: `wit shard` vs byte copy", body, "bench/bench_shard.py")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
