"""`wit eval prepare`: mirror a suite's datasets once, with a manifest, for audited offline runs.

A suite file names its datasets under ``{data_root}`` (``{data_root}/wds_cifar10``): CLIP_benchmark's
WebDataset layout, as the published ``hf://datasets/clip-benchmark/wds_<name>`` repositories hold it
(``test/0.tar ...``, ``classnames.txt``, ``zeroshot_classification_templates.txt``). ``prepare``
copies every file of each of those datasets from a source root to a bucket or folder, streaming
(nothing is unpacked), and writes ``MIRROR.json`` beside them::

    {"suite": "clip-paper", "source": "hf://datasets/clip-benchmark",
     "files": {"wds_cifar10/test/0.tar": {"sha256": "...", "bytes": 123}, ...},
     "missing": {"wds_objectnet": "not found at hf://..."}}

A dataset the source does not have is listed under ``missing`` and the rest are copied. A later
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


def dataset_folders(suite: Suite) -> list[str]:
    """The folders under ``{data_root}`` that the suite's tasks read, in suite order, once each."""
    prefix = DATA_ROOT + "/"
    names = [t.dataset[len(prefix) :].strip("/") for t in suite.tasks if t.dataset.startswith(prefix)]
    if not names:
        raise EvalError(f"suite {suite.name} names no dataset under {DATA_ROOT}: there is nothing to mirror")
    return list(dict.fromkeys(names))


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
    """Copy the suite's datasets from ``source`` to ``out`` and write ``out/MIRROR.json``."""
    out, source = storage.normalize(out), source.rstrip("/")
    mirror = Mirror(suite.name, source)
    for name in dataset_folders(suite):
        root = f"{source}/{name}"
        if not storage.exists(root):
            mirror.missing[name] = f"not found at {root}"
            if progress:
                print(f"prepare: {name}: not found at {root}", file=sys.stderr)
            continue
        files = sorted(f for f in storage.listdir(root, recursive=True) if f.endswith(_COPIED))
        for i, rel in enumerate(files, 1):
            mirror.files[f"{name}/{rel}"] = _copy(f"{root}/{rel}", storage.join(out, name, rel))
            if progress:
                print(f"\rprepare: {name}: {i}/{len(files)} files", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
    record = {"suite": mirror.suite, "source": mirror.source, "files": mirror.files, "missing": mirror.missing}
    storage.write_text(storage.join(out, MIRROR_FILE), json.dumps(record, indent=1, sort_keys=True) + "\n")
    return mirror


def mirror_digest(data_root: str | None) -> str | None:
    """sha256 of ``MIRROR.json`` at ``data_root`` (what a run records), None when there is none."""
    if not data_root:
        return None
    url = storage.join(storage.normalize(data_root), MIRROR_FILE)
    return storage.sha256_url(url) if storage.exists(url) else None
