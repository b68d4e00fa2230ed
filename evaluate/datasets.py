"""Evaluation datasets: CLIP_benchmark's WebDataset layout, image folders, tables, and built-ins.

Every reader gives a :class:`Dataset`: class names, prompt templates, and named splits, each a
re-iterable stream of :class:`Sample` (key, encoded image bytes or a PIL image, label or captions)
with a digest that identifies its content (the feature cache is keyed by it).

Layouts (any fsspec URL, read through ``wit.manifests.storage``):

- ``wds``: CLIP_benchmark's ``{split}/0.tar, 1.tar...`` (+ ``nshards.txt``), samples of
  ``webp|png|jpg|jpeg`` with ``cls`` (classification) or ``txt`` (retrieval: one caption a line),
  beside ``classnames.txt``, ``zeroshot_classification_templates.txt`` and ``dataset_type.txt``.
- ``folder``: ``ROOT/{split}/{class}/*.png`` (or ``ROOT/{class}/*.png`` as the ``test`` split);
  classes in sorted folder order, their display names from ``ROOT/classnames.txt`` when present.
- ``table``: a ``.csv`` or ``.parquet`` with an image path column (``image``/``path``/``filepath``;
  relative to the table's folder), a ``label`` (class index or class name) and optionally ``split``.
- ``builtin``: ``digits`` (scikit-learn's 1,797 real 8x8 handwritten digits, upscaled) and the
  held-out synthetic tasks drawn from :mod:`wit.evaluate.world`.

Held-out seeds: the synthetic web and every training-data generator use seeds below 10**6; the
built-in evaluation sets use seeds in ``[EVAL_SEED_BASE, EVAL_SEED_BASE + 10**6)`` with
``EVAL_SEED_BASE = 10**9``, so no training picture is ever an evaluation picture.

A digest is computed by reading the data once (shard or image sha256s), before the decode pass;
for remote data that is a second read, the price of knowing the cache key before encoding.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from wit.manifests import storage
from wit.manifests.tars import (
    CLIP_BENCHMARK_IMAGE_EXTENSIONS,
    BadTar,
    TarError,
    plain_members,
    random_access,
    read_files,
)
from wit.manifests.tarwrite import tar_bytes

from . import world
from .errors import DatasetMissing, EvalError
from .tasks import (
    BUILTIN_TASKS,
    COLOUR_TEMPLATES,
    DIGIT_TEMPLATES,
    SHAPE_TEMPLATES,
)

EVAL_SEED_BASE = 10**9
TRAINING_SEED_LIMIT = 10**6  # generators of training data (the synthetic web) stay below this
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


@dataclass(slots=True)
class Sample:
    key: str
    image: bytes | Image.Image | None  # encoded bytes, a decoded image (built-ins), None if missing
    label: int = -1
    captions: tuple[str, ...] = ()


@dataclass(slots=True)
class Split:
    name: str
    digest: str
    samples: Callable[[], Iterator[Sample]]
    count: int | None = None  # known up front for built-ins


@dataclass(slots=True)
class Dataset:
    source: str
    format: str
    kind: str  # "classification" | "retrieval"
    classnames: list[str] | None
    templates: list[str] | None
    splits: dict[str, Callable[[], Split]]  # opened lazily: a digest costs a read

    def split(self, name: str) -> Split:
        if name not in self.splits:
            have = ", ".join(sorted(self.splits)) or "none"
            raise EvalError(f"{self.source}: no split {name!r} (splits: {have})")
        return self.splits[name]()


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _lines(url: str) -> list[str] | None:
    if not storage.exists(url):
        return None
    return [line.strip() for line in storage.read_text(url).splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# built-ins


@dataclass(frozen=True, slots=True)
class BuiltinSpec:
    name: str
    kind: str  # classification | retrieval
    index: int  # seed slot: split seeds are EVAL_SEED_BASE + 1000 * index + split number
    test_per_class: int = 50
    train_per_class: int = 40
    size: int = 64
    captions_per_image: int = 5
    style: str | None = None  # world.render's; None: the style the synthetic web draws


BUILTIN_DATASETS: dict[str, BuiltinSpec] = {
    s.name: s
    for s in (
        BuiltinSpec("digits", "classification", 0),
        BuiltinSpec("synthetic-shape", "classification", 1),
        BuiltinSpec("synthetic-colour", "classification", 2),
        BuiltinSpec("synthetic-digit", "classification", 3, test_per_class=40, train_per_class=32),
        BuiltinSpec("synthetic-retrieval", "retrieval", 4),
        # the shapes as outline sketches: a distribution shift the synthetic web never shows
        BuiltinSpec("synthetic-shape-outline", "classification", 5, style="outline"),
    )
}
_SPLIT_NUMBER = {"test": 0, "train": 1}
_BUILTIN_TEMPLATES = {
    "digits": DIGIT_TEMPLATES,
    "synthetic-shape": SHAPE_TEMPLATES,
    "synthetic-colour": COLOUR_TEMPLATES,
    "synthetic-digit": DIGIT_TEMPLATES,
    "synthetic-shape-outline": SHAPE_TEMPLATES,
}


def builtin_seed(spec: BuiltinSpec, split: str) -> int:
    seed = EVAL_SEED_BASE + 1000 * spec.index + _SPLIT_NUMBER[split]
    assert seed >= EVAL_SEED_BASE > TRAINING_SEED_LIMIT
    return seed


def _builtin_classes(name: str) -> list[str] | None:
    if name == "digits":
        return list(world.DIGITS)
    if name == "synthetic-retrieval":
        return None
    return world.task_classes(_world_task(name))


def _world_task(name: str) -> world.Task:
    """The synthetic world's task a built-in dataset draws: shape, colour or digit."""
    return name.removeprefix("synthetic-").split("-")[0]  # type: ignore[return-value]


def _digits_images(split: str, size: int) -> list[Sample]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, targets = bunch.images, bunch.target
    # A fixed stratified half/half split, so a linear probe never sees a test digit.
    order = np.random.default_rng(EVAL_SEED_BASE).permutation(len(targets))
    test = np.zeros(len(targets), dtype=bool)
    for c in range(10):
        members = order[targets[order] == c]
        test[members[: (len(members) + 1) // 2]] = True
    keep = np.flatnonzero(test if split == "test" else ~test)
    out = []
    for i in keep:
        # 0..16 ink → dark ink on white paper, as the digits are drawn in the synthetic web
        pixels = (255 - images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        img = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        out.append(Sample(key=f"digits-{i:04d}", image=img, label=int(targets[i])))
    return out


def _synthetic_images(spec: BuiltinSpec, split: str) -> list[Sample]:
    rng = random.Random(builtin_seed(spec, split))
    task = _world_task(spec.name)
    out: list[Sample] = []
    if spec.kind == "retrieval":
        # Every concept exactly once, so each caption has exactly one right image.
        concepts = [world.Concept("shape", c, shape=s) for c in world.COLOURS for s in world.SHAPES]
        concepts += [world.Concept("digit", c, digit=d) for c in world.COLOURS for d in world.DIGITS]
        rng.shuffle(concepts)
        for i, concept in enumerate(concepts):
            img = world.render(concept, rng, spec.size)
            caps = tuple(world.caption(concept, rng) for _ in range(spec.captions_per_image))
            out.append(Sample(key=f"{spec.name}-{split}-{i:05d}", image=img, captions=caps))
        return out
    per_class = spec.test_per_class if split == "test" else spec.train_per_class
    classes = world.task_classes(task)  # type: ignore[arg-type]
    for j in range(per_class):
        for label, cls in enumerate(classes):
            if task == "shape":
                concept = world.Concept("shape", rng.choice(tuple(world.COLOURS)), shape=cls)
            elif task == "digit":
                concept = world.Concept("digit", rng.choice(tuple(world.COLOURS)), digit=cls)
            else:
                other = world.sample_concept(rng)
                concept = world.Concept(other.kind, cls, shape=other.shape, digit=other.digit)
            img = world.render(concept, rng, spec.size, style=spec.style)
            out.append(Sample(key=f"{spec.name}-{split}-{j * len(classes) + label:05d}", image=img, label=label))
    return out


@functools.lru_cache(maxsize=16)
def _builtin_split(name: str, split: str) -> tuple[tuple[Sample, ...], str]:
    spec = BUILTIN_DATASETS[name]
    samples = _digits_images(split, spec.size) if name == "digits" else _synthetic_images(spec, split)
    h = hashlib.sha256(json.dumps({"builtin": name, "split": split, "classes": _builtin_classes(name)}).encode())
    for s in samples:
        assert isinstance(s.image, Image.Image)
        h.update(s.key.encode())
        h.update(s.image.tobytes())
        h.update(str(s.label).encode())
        h.update("\n".join(s.captions).encode())
    return tuple(samples), h.hexdigest()


def open_builtin(name: str) -> Dataset:
    if name not in BUILTIN_DATASETS:
        raise EvalError(f"no built-in dataset {name!r} (built-ins: {', '.join(BUILTIN_DATASETS)})")
    spec = BUILTIN_DATASETS[name]

    def opener(split: str) -> Callable[[], Split]:
        def open_split() -> Split:
            samples, digest = _builtin_split(name, split)
            return Split(split, digest, lambda: iter(samples), len(samples))

        return open_split

    templates = _BUILTIN_TEMPLATES.get(name)
    return Dataset(
        source=name,
        format="builtin",
        kind=spec.kind,
        classnames=_builtin_classes(name),
        templates=list(templates) if templates else None,
        splits={s: opener(s) for s in _SPLIT_NUMBER},
    )


# ---------------------------------------------------------------------------------------------
# CLIP_benchmark WebDataset layout


def _shard_order(name: str) -> tuple[int, str]:
    stem = name.rsplit(".", 1)[0]
    return (int(stem), name) if stem.isdigit() else (1 << 62, name)


def _wds_samples(urls: list[str]) -> Iterator[Sample]:
    """Samples of tar shards: members grouped by key (the name up to the first dot of its basename).

    Plain ustar shards are read from their headers (:mod:`wit.manifests.tars`, a memory map when
    local); others go through tarfile's stream reader."""
    for url in urls:
        with random_access(url) as read:
            try:
                members = plain_members(read)
            except BadTar as exc:
                raise EvalError(f"{url}: truncated or corrupt tar shard ({exc})") from exc
            if members is not None:
                yield from _grouped((m.name, bytes(read(m.offset, m.size))) for m in members if m.is_file)
        if members is None:  # extended headers: tarfile, on a handle of its own
            yield from _tarfile_samples(url)


def _grouped(files: Iterable[tuple[str, bytes]]) -> Iterator[Sample]:
    key, parts = None, {}
    for name, data in files:
        folder, _, base = name.rpartition("/")
        stem, _, ext = base.partition(".")
        k = f"{folder}/{stem}" if folder else stem
        if k != key and key is not None:
            yield _wds_sample(key, parts)
            parts = {}
        key = k
        parts[ext.lower()] = data
    if key is not None:
        yield _wds_sample(key, parts)


def _tarfile_samples(url: str) -> Iterator[Sample]:
    with storage.open_url(url) as fh:
        try:
            members = read_files(fh)
        except TarError as exc:
            raise EvalError(f"{url}: not a tar shard ({exc})") from exc

        def files() -> Iterator[tuple[str, bytes]]:
            try:
                for member in members:
                    yield member.name, member.read()
            except TarError as exc:
                raise EvalError(f"{url}: truncated or corrupt tar shard ({exc})") from exc

        yield from _grouped(files())


def _wds_sample(key: str, parts: dict[str, bytes]) -> Sample:
    image = next((parts[e] for e in CLIP_BENCHMARK_IMAGE_EXTENSIONS if e in parts), None)
    label = -1
    if "cls" in parts:
        try:
            label = int(parts["cls"].decode().strip())
        except ValueError:
            label = -1
    captions = tuple(line for line in parts.get("txt", b"").decode("utf-8", "replace").splitlines() if line.strip())
    return Sample(key=key, image=image, label=label, captions=captions)


def open_wds(root: str) -> Dataset:
    root = storage.normalize(root)
    if not storage.exists(root):
        raise DatasetMissing(f"not found at {root}")
    kind_lines = _lines(storage.join(root, DATASET_TYPE))
    kind = "retrieval" if kind_lines and kind_lines[0].lower() == "retrieval" else "classification"
    splits = {}
    for name in storage.listdir(root, recursive=True):
        if name.endswith(".tar") and name.count("/") == 1:
            splits.setdefault(name.split("/")[0], []).append(name.split("/")[1])

    def opener(split: str, shards: list[str]) -> Callable[[], Split]:
        def open_split() -> Split:
            urls = [storage.join(root, split, s) for s in sorted(shards, key=_shard_order)]
            digest = _sha("wds", *[f"{storage.basename(u)}:{storage.sha256_url(u)}" for u in urls])
            return Split(split, digest, lambda: _wds_samples(urls))

        return open_split

    return Dataset(
        source=root,
        format="wds",
        kind=kind,
        classnames=_lines(storage.join(root, CLASSNAMES)),
        templates=_lines(storage.join(root, TEMPLATES)),
        splits={s: opener(s, shards) for s, shards in splits.items()},
    )


# ---------------------------------------------------------------------------------------------
# image folder and table


def _file_samples(items: list[tuple[str, str, int]]) -> Iterator[Sample]:
    for key, url, label in items:
        try:
            data: bytes | None = storage.read_bytes(url)
        except storage.StorageError:
            data = None  # counted as a missing image by the encoder, not a crash
        yield Sample(key=key, image=data, label=label)


def _file_split(source: str, split: str, items: list[tuple[str, str, int]]) -> Callable[[], Split]:
    def open_split() -> Split:
        if not items:
            raise EvalError(f"{source}: split {split!r} is empty")
        parts = []
        for key, url, label in items:
            try:
                sha = storage.sha256_url(url)
            except storage.StorageError:
                sha = "missing"
            parts.append(f"{key}:{label}:{sha}")
        return Split(split, _sha(split, *parts), lambda: _file_samples(items), len(items))

    return open_split


def open_folder(root: str) -> Dataset:
    root = storage.normalize(root)
    names = storage.listdir(root, recursive=True)
    images = [n for n in names if n.rsplit(".", 1)[-1].lower() in CLIP_BENCHMARK_IMAGE_EXTENSIONS]
    by_split: dict[str, list[tuple[str, str]]] = {}
    for n in images:
        parts = n.split("/")
        if len(parts) == 3:  # split/class/file
            by_split.setdefault(parts[0], []).append((parts[1], n))
        elif len(parts) == 2:  # class/file: the test split
            by_split.setdefault("test", []).append((parts[0], n))
    if not by_split:
        raise EvalError(f"{root}: no images in class folders (expected ROOT/[split/]class/image.png)")
    folders = sorted({cls for items in by_split.values() for cls, _ in items})
    shown = _lines(storage.join(root, CLASSNAMES))
    if shown is not None and len(shown) != len(folders):
        raise EvalError(f"{root}/{CLASSNAMES}: {len(shown)} names for {len(folders)} class folders")
    index = {cls: i for i, cls in enumerate(folders)}
    splits = {
        s: _file_split(
            root, s, [(n, storage.join(root, n), index[cls]) for cls, n in sorted(items, key=lambda x: x[1])]
        )
        for s, items in by_split.items()
    }
    return Dataset(root, "folder", "classification", shown or folders, _lines(storage.join(root, TEMPLATES)), splits)


_PATH_COLUMNS = ("image", "path", "filepath", "file", "image_path")
_LABEL_COLUMNS = ("label", "class", "cls", "target")


def open_table(url: str) -> Dataset:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    url = storage.normalize(url)
    if not storage.exists(url):
        raise EvalError(f"{url}: table not found")
    with storage.open_url(url) as fh:
        try:
            table = pq.read_table(fh) if url.endswith(".parquet") else pacsv.read_csv(fh)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise EvalError(f"{url}: not a readable table ({str(exc).splitlines()[0]})") from exc
    cols = table.column_names
    path_col = next((c for c in _PATH_COLUMNS if c in cols), None)
    label_col = next((c for c in _LABEL_COLUMNS if c in cols), None)
    if path_col is None or label_col is None:
        raise EvalError(
            f"{url}: needs an image path column ({'/'.join(_PATH_COLUMNS)}) "
            f"and a label column ({'/'.join(_LABEL_COLUMNS)})"
        )
    base = url.rsplit("/", 1)[0]
    paths = [str(p) for p in table.column(path_col).to_pylist()]
    labels = table.column(label_col).to_pylist()
    split_of = table.column("split").to_pylist() if "split" in cols else ["test"] * len(paths)
    names = _lines(storage.join(base, CLASSNAMES))
    if all(isinstance(x, int) for x in labels):
        ids = [int(x) for x in labels]
    else:
        text = [str(x) for x in labels]
        names = names or sorted(set(text))
        lookup = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(text) - set(lookup))
        if unknown:
            raise EvalError(f"{url}: labels not in {CLASSNAMES}: {', '.join(unknown[:5])}")
        ids = [lookup[t] for t in text]
    by_split: dict[str, list[tuple[str, str, int]]] = {}
    for i, (p, y, s) in enumerate(zip(paths, ids, split_of, strict=True)):
        full = p if ("://" in p or p.startswith("/")) else storage.join(base, p)
        by_split.setdefault(str(s), []).append((f"{i:08d}", full, y))
    splits = {s: _file_split(url, s, items) for s, items in by_split.items()}
    return Dataset(url, "table", "classification", names, _lines(storage.join(base, TEMPLATES)), splits)


# ---------------------------------------------------------------------------------------------


def infer_format(source: str) -> str:
    if source in BUILTIN_DATASETS:
        return "builtin"
    if source.endswith((".csv", ".parquet")):
        return "table"
    if not storage.exists(source):
        raise DatasetMissing(f"not found at {source} (and it is not a built-in: {', '.join(BUILTIN_DATASETS)})")
    names = storage.listdir(source, recursive=True)
    if any(n.endswith(".tar") for n in names):
        return "wds"
    return "folder"


def open_dataset(source: str, format: str | None = None) -> Dataset:
    """Open a dataset by URL or built-in name; ``format`` is inferred when None."""
    fmt = format or infer_format(source)
    if fmt == "builtin":
        return open_builtin(source)
    if fmt == "wds":
        return open_wds(source)
    if fmt == "folder":
        return open_folder(source)
    if fmt == "table":
        return open_table(source)
    raise EvalError(f"unknown dataset format {fmt!r}")


# ---------------------------------------------------------------------------------------------
# export


def _png(image: bytes | Image.Image) -> bytes:
    img = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def export(
    name: str, url: str, samples_per_shard: int = 1000, splits: tuple[str, ...] = ("test", "train")
) -> dict[str, int]:
    """Write a built-in dataset (or a built-in task's dataset) in CLIP_benchmark's wds layout.

    Returns samples written per split. The output reads back with ``open_wds`` and with
    ``clip_benchmark eval --dataset wds/NAME --dataset_root URL``.
    """
    if name in BUILTIN_TASKS and name not in BUILTIN_DATASETS:
        name = BUILTIN_TASKS[name].dataset
    dataset = open_builtin(name)
    if samples_per_shard < 1:
        raise EvalError("samples_per_shard must be at least 1")
    written: dict[str, int] = {}
    for split in splits:
        samples = list(dataset.split(split).samples())
        shards = [samples[i : i + samples_per_shard] for i in range(0, len(samples), samples_per_shard)]
        for i, chunk in enumerate(shards):
            members: list[tuple[str, bytes]] = []
            for s in chunk:
                key = s.key
                assert s.image is not None
                members.append((f"{key}.png", _png(s.image)))
                if dataset.kind == "retrieval":
                    members.append((f"{key}.txt", "\n".join(s.captions).encode()))
                else:
                    members.append((f"{key}.cls", str(s.label).encode()))
            storage.write_bytes(storage.join(url, split, f"{i}.tar"), tar_bytes(members))
        storage.write_text(storage.join(url, split, "nshards.txt"), f"{len(shards)}\n")
        written[split] = len(samples)
    if dataset.classnames:
        storage.write_text(storage.join(url, CLASSNAMES), "\n".join(dataset.classnames) + "\n")
    if dataset.templates:
        storage.write_text(storage.join(url, TEMPLATES), "\n".join(dataset.templates) + "\n")
    storage.write_text(storage.join(url, DATASET_TYPE), f"{dataset.kind}\n")
    return written


def reference_sets(suite_name_or_url: str, root: str) -> tuple[str, ...]:
    """The evaluation images of a suite, as ``task=URL`` entries for ``wit filter``'s decontamination.

    Built-in datasets are exported (test split only, what the scores are computed on) under
    ``root/wds_<dataset>`` unless already there; datasets given by URL are used where they are.
    """
    from .tasks import load_suite

    entries: list[str] = []
    for task in load_suite(suite_name_or_url).tasks:
        if task.dataset in BUILTIN_DATASETS:
            url = storage.join(root, f"wds_{task.dataset}")
            if not storage.exists(storage.join(url, task.split, "nshards.txt")):
                export(task.dataset, url, splits=(task.split,))
        else:
            url = task.dataset
        entry = f"{task.dataset}={storage.join(url, task.split)}"
        if entry not in entries:
            entries.append(entry)
    return tuple(entries)
