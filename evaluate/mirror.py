"""`wit eval prepare`: mirror a suite's datasets once, with a manifest, for audited offline runs.

A suite file names its datasets under ``{data_root}`` (``{data_root}/wds_cifar10``): CLIP_benchmark's
WebDataset layout, as the published ``hf://datasets/clip-benchmark/wds_<name>`` repositories hold it
(``test/0.tar ...``, ``classnames.txt``, ``zeroshot_classification_templates.txt``). ``prepare``
copies every file of each of those datasets from a source root to a bucket or folder, streaming
(nothing is unpacked), and writes ``MIRROR.json`` beside them::

    {"suites": ["clip-paper"], "sources": ["hf://datasets/clip-benchmark"],
     "files": {"wds_cifar10/test/0.tar": {"sha256": "...", "bytes": 123}, ...},
     "missing": {"wds_objectnet": "not found at hf://..."}}

Only the splits the suite reads are copied (``test``; the training split of a probe or few-shot
task). A dataset the source does not have is listed under ``missing`` and the rest are copied; a
second ``prepare`` into the same place (another source for those) adds to the record. A later
``wit eval --data-root MIRROR`` records the sha256 of ``MIRROR.json`` in its run, and each split's
digest is the sha256 of its shards, so every number names the bytes it was measured on.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field

from wit.manifests import storage

from .errors import EvalError
from .tasks import DATA_ROOT, Suite

MIRROR_FILE = "MIRROR.json"
DEFAULT_SOURCE = "hf://datasets/clip-benchmark"
_CHUNK = 8 << 20
# what a CLIP_benchmark dataset folder holds: shards and its metadata text files
_COPIED = (".tar", ".txt", ".json")


@dataclass(slots=True)
class Mirror:
    suite: str
    source: str
    files: dict[str, dict] = field(default_factory=dict)  # relative path -> {"sha256", "bytes"}
    missing: dict[str, str] = field(default_factory=dict)  # dataset folder -> why


def dataset_folders(suite: Suite) -> dict[str, set[str]]:
    """The folders under ``{data_root}`` that the suite's tasks read, in suite order, each with the
    splits its tasks read (``test``; the training split too for a linear probe or few-shot task)."""
    prefix = DATA_ROOT + "/"
    folders: dict[str, set[str]] = {}
    for t in suite.tasks:
        reads = [(t.dataset, t.split)]
        if t.kind in ("linear_probe", "fewshot"):
            reads.append((t.training_task().dataset, t.train_split))  # its own, or train_dataset's
        for dataset, split in reads:
            if dataset.startswith(prefix):
                folders.setdefault(dataset[len(prefix) :].strip("/"), set()).add(split)
    if not folders:
        raise EvalError(f"suite {suite.name} names no dataset under {DATA_ROOT}: there is nothing to mirror")
    return folders


def _copy(src: str, dst: str) -> dict:
    """Stream one file across and hash it on the way."""
    h, n = hashlib.sha256(), 0
    with storage.open_url(src, "rb") as fin, storage.atomic_writer(dst) as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
            fout.write(chunk)
    return {"sha256": h.hexdigest(), "bytes": n}


def prepare(suite: Suite, out: str, source: str = DEFAULT_SOURCE, progress: bool = True) -> Mirror:
    """Copy the splits the suite reads of its datasets from ``source`` to ``out`` and write
    ``out/MIRROR.json``. A mirror made earlier at ``out`` (another suite, another source) is added
    to: its files stay listed, and a dataset this source provides leaves its missing list."""
    out, source = storage.normalize(out), source.rstrip("/")
    mirror = Mirror(suite.name, source)
    for name, splits in dataset_folders(suite).items():
        root = f"{source}/{name}"
        if not storage.exists(root):
            mirror.missing[name] = f"not found at {root}"
            if progress:
                print(f"prepare: {name}: not found at {root}", file=sys.stderr)
            continue
        files = sorted(
            f
            for f in storage.listdir(root, recursive=True)
            if f.endswith(_COPIED) and ("/" not in f or f.split("/", 1)[0] in splits)
        )
        for i, rel in enumerate(files, 1):
            mirror.files[f"{name}/{rel}"] = _copy(f"{root}/{rel}", storage.join(out, name, rel))
            if progress:
                print(f"\rprepare: {name}: {i}/{len(files)} files", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
    url = storage.join(out, MIRROR_FILE)
    before = json.loads(storage.read_text(url)) if storage.exists(url) else {}
    files = {**before.get("files", {}), **mirror.files}
    present = {path.split("/", 1)[0] for path in files}
    missing = {k: v for k, v in {**before.get("missing", {}), **mirror.missing}.items() if k not in present}
    record = {
        "suites": sorted({*before.get("suites", []), mirror.suite}),
        "sources": sorted({*before.get("sources", []), mirror.source}),
        "files": files,
        "missing": missing,
    }
    storage.write_text(url, json.dumps(record, indent=1, sort_keys=True) + "\n")
    mirror.missing = {k: v for k, v in mirror.missing.items() if k not in present}
    return mirror


def mirror_digest(data_root: str | None) -> str | None:
    """sha256 of ``MIRROR.json`` at ``data_root`` (what a run records), None when there is none."""
    if not data_root:
        return None
    url = storage.join(storage.normalize(data_root), MIRROR_FILE)
    return storage.sha256_url(url) if storage.exists(url) else None
