"""The training data stream: WebDataset shards from any fsspec URL, deterministic and resumable.

Where the shards come from (:func:`resolve_sources`):

- a `wit shard` dataset folder: its ``shard_index/`` side table (or open_clip's ``sizes.json``)
  lists the shards and their sample counts, its ``_run.json`` gives the dataset digest;
- a brace pattern (``s3://b/ds/{000000..000099}.tar``), one shard URL, or a list of them;
- several of those joined by ``::`` (open_clip's convention), mixed by resampling shards with
  ``weights`` = each source's share of the samples (when shard sizes are known; else of the shards).

Shards are opened through fsspec (``wit.manifests.storage.open_url``), never ``pipe:aws``.

Determinism is what makes exact resume possible. The order of raw samples that a DataLoader
worker sees is a pure function of (seed, epoch, shard list, rank, world size, worker id):

    epoch e:  shards --seeded order(seed, e), computed once--> every (R*W)-th shard for global worker g
              --> tar members read forward (byte offsets known) --> samples
              --> chunks of `buffer` samples, each shuffled by a seed of where it starts --> raw order

A worker's position is therefore (epoch, the item and byte its chunk starts at, samples of the
chunk handed out, where the chunk's reading stopped). A resumed worker seeks to the chunk's start
(an fsspec range read) and re-reads one chunk, never the epoch so far; a resampled worker's n-th
shard draw is keyed by n, so it seeks too. Augmentation is seeded per sample by
``hash(seed, epoch, uid)`` (resampled: by the draw), so it does not depend on the worker or rank.

Resume with another world size or worker count (:func:`carry_over`): what the old workers had not
read of the epochs in progress (whole shards, and shard tails from a byte offset) is split again
over the new workers; the rest of an interrupted chunk is dropped, so each sample is still seen at
most once per epoch.

Workers form whole batches themselves (the last partial batch of a worker's epoch is dropped) and
the DataLoader hands batches out round-robin, worker 0 first. After ``n`` batches the next one
comes from worker ``n % W``; on resume the physical worker ``p`` plays logical worker
``(p + n) % W`` so the round-robin continues where it stopped.

A sample whose image or text does not decode is skipped, counted, and travels to the trainer
with the next batch as ``(uid, shard, reason)``. A shard read that fails (storage, network) is
retried from its last whole sample with back-off (``WIT_READ_TRIES``, ``WIT_READ_BACKOFF_S``);
after the last try, and at once for a tar that does not parse, the rest of the shard is recorded
the same way (``uid`` empty) and the worker goes on with its next shard: one bad shard never ends
a run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import itertools
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import braceexpand
import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F2
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode

from wit.manifests import storage
from wit.manifests.manifest import ManifestError, open_manifest
from wit.manifests.runrecord import read_run_record
from wit.manifests.tars import SAMPLE_IMAGE_EXTENSIONS, TarError, stream_members

from .config import DECODES
from .distributed import cpu_cores

TEXT_KEYS = ("txt", "text")


class StreamError(ValueError):
    """The dataset cannot feed this run (no shards, too few shards for ranks x workers, ...)."""


# -------------------------------------------------------------------------------------------------
# where the shards are


@dataclass(frozen=True, slots=True)
class Shard:
    url: str
    samples: int | None = None  # known from a shard index or sizes.json


@dataclass(frozen=True, slots=True)
class Source:
    """One dataset: its shards, and its digest when it is a finished `wit shard` folder."""

    url: str
    shards: tuple[Shard, ...]
    digest: str | None = None
    is_wit_dataset: bool = False

    @property
    def samples(self) -> int | None:
        counts = [s.samples for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)

    def __reduce__(self):
        # broadcast to every rank: two plain lists pickle ~10x faster than 100k slotted dataclasses
        urls, sizes = [s.url for s in self.shards], [s.samples for s in self.shards]
        return _source, (self.url, urls, sizes, self.digest, self.is_wit_dataset)


def _source(url: str, urls: list[str], sizes: list[int | None], digest: str | None, is_wit: bool) -> Source:
    return Source(url, tuple(map(Shard, urls, sizes)), digest, is_wit)


def resolve_sources(dataset: str | Sequence[str]) -> list[Source]:
    """``A::B`` or a list of shard URLs -> the sources, each with its shards in a fixed order."""
    if not isinstance(dataset, str):
        urls = [u for item in dataset for u in _expand(str(item))]
        if not urls:
            raise StreamError("empty list of shards")
        return [Source(url=",".join(dataset), shards=tuple(Shard(u) for u in urls))]
    return [resolve_source(part) for part in dataset.split("::") if part]


def resolve_source(url: str) -> Source:
    if "{" in url or url.endswith(".tar") or url.endswith(".tar.gz"):
        shards = tuple(Shard(u) for u in _expand(url))
        sizes = _sizes_json(storage.join(_parent(shards[0].url), "sizes.json")) if shards else {}
        return Source(url=url, shards=tuple(Shard(s.url, sizes.get(s.url.rsplit("/", 1)[-1])) for s in shards))
    url = storage.normalize(url)
    if not storage.isdir(url):
        raise StreamError(f"{url}: no such dataset folder (give a folder, a brace pattern or .tar URLs)")
    record = read_run_record(url)
    digest = record.output.digest if record else None
    shards = _from_shard_index(url) or _from_sizes(url) or _from_listing(url)
    if not shards:
        raise StreamError(f"{url}: no shards (no shard_index/, sizes.json or .tar files)")
    return Source(url=url, shards=shards, digest=digest, is_wit_dataset=record is not None)


def _expand(pattern: str) -> list[str]:
    return [u for part in pattern.split(",") for u in braceexpand.braceexpand(part.strip()) if u]


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _from_shard_index(url: str) -> tuple[Shard, ...]:
    try:
        table = open_manifest(url, table="shard_index").table(["shard", "samples"])
    except ManifestError:
        return ()
    rows = sorted(zip(table.column("shard").to_pylist(), table.column("samples").to_pylist(), strict=False))
    # the index names shards relative to the dataset folder ("shards/000000.tar")
    return tuple(Shard(storage.join(url, name if "/" in name else f"shards/{name}"), int(n)) for name, n in rows)


def _from_sizes(url: str) -> tuple[Shard, ...]:
    for folder in (url, storage.join(url, "shards")):
        sizes = _sizes_json(storage.join(folder, "sizes.json"))
        if sizes:
            return tuple(Shard(storage.join(folder, name), n) for name, n in sorted(sizes.items()))
    return ()


def _sizes_json(url: str) -> dict[str, int]:
    if not storage.exists(url):
        return {}
    try:
        data = json.loads(storage.read_text(url))
    except json.JSONDecodeError as exc:
        raise StreamError(f"{url}: not valid JSON ({exc.msg})") from exc
    return {str(k): int(v) for k, v in data.items()}


def _from_listing(url: str) -> tuple[Shard, ...]:
    for folder in (storage.join(url, "shards"), url):
        names = [n for n in storage.listdir(folder) if n.endswith(".tar") and not storage.is_temporary(n)]
        if names:
            return tuple(Shard(storage.join(folder, n)) for n in names)
    return ()


def dataset_digest(sources: Sequence[Source]) -> str | None:
    """The dataset digest a checkpoint records: the source's own, or a digest of the mix."""
    if len(sources) == 1:
        return sources[0].digest
    if any(s.digest is None for s in sources):
        return None
    return hashlib.sha256("::".join(s.digest for s in sources).encode()).hexdigest()


# -------------------------------------------------------------------------------------------------
# the order of samples: a pure function of the plan, the epoch and the worker

Item = tuple[int, int]  # (index into the plan's shards, byte offset in that shard where reading starts)


@functools.lru_cache(maxsize=4)
def _shard_order(seed: int, epoch: int, n: int, shuffle: bool) -> tuple[int, ...]:
    """The shards' order in one epoch: computed once per process and epoch, O(shards)."""
    order = list(range(n))
    if shuffle:
        random.Random(f"{seed}:shards:{epoch}").shuffle(order)
    return tuple(order)


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """Everything the order of samples depends on.

    ``carry`` holds, for the epochs a resume with another world size or worker count was in the
    middle of, the items left unread then, which the new layout splits among its workers in
    place of the epoch's usual shards; ``generation`` counts such resumes (resampled draws and
    chunk shuffles are keyed by it, so a new layout never replays an old one's draws)."""

    sources: tuple[Source, ...]
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    workers: int = 1  # logical workers per rank (>= 1; 0 DataLoader workers means one, in-process)
    shuffle: bool = True
    buffer: int = 1000
    resampled: bool = False
    weights: tuple[float, ...] | None = None
    carry: dict[int, tuple[Item, ...]] = field(default_factory=dict)
    generation: int = 0

    def __post_init__(self) -> None:
        if self.weights is not None and len(self.weights) != len(self.sources):
            raise StreamError(f"{len(self.weights)} weights for {len(self.sources)} datasets")
        if self.weights is not None and not self.resampled:
            object.__setattr__(self, "resampled", True)  # weighted mixing only makes sense resampled
        total = self.world_size * self.workers
        n = sum(len(s.shards) for s in self.sources)
        if not self.resampled and n < total:
            raise StreamError(
                f"the dataset has {n} shard(s) but {self.world_size} rank(s) x {self.workers} worker(s) "
                f"need at least {total}: use fewer workers, fewer ranks, more shards, or resampling"
            )

    @property
    def shards(self) -> tuple[Shard, ...]:
        return tuple(s for src in self.sources for s in src.shards)

    @property
    def workers_total(self) -> int:
        return self.world_size * self.workers

    def global_worker(self, worker: int) -> int:
        return self.rank * self.workers + worker

    def schedule(self, epoch: int, worker: int, shards: int | None = None) -> list[Item]:
        """The items one worker reads in one epoch (not resampled): every (R*W)-th shard of the
        epoch's seeded order, or its share of the epoch's carried-over items."""
        g, total = self.global_worker(worker), self.workers_total
        if epoch in self.carry:
            return list(self.carry[epoch][g::total])
        n = shards if shards is not None else sum(len(s.shards) for s in self.sources)
        return [(i, 0) for i in _shard_order(self.seed, epoch, n, self.shuffle)[g::total]]

    def epoch_shards(self, epoch: int, worker: int) -> list[Shard]:
        shards = self.shards
        return [shards[i] for i, _ in self.schedule(epoch, worker, len(shards))]

    def draw(self, worker: int, n: int) -> int:
        """The shard index of a worker's ``n``-th draw when resampled (with replacement, weighted):
        keyed by (seed, generation, global worker, n), so a resumed worker seeks to any draw."""
        rng = random.Random(f"{self.seed}:resample:{self.generation}:{self.global_worker(worker)}:{n}")
        weights = self.weights or tuple(float(s.samples or len(s.shards)) for s in self.sources)
        if all(s.samples for s in self.sources):
            # weights are shares of *samples*: a source of big shards is drawn less often per shard
            weights = tuple(w * len(s.shards) / s.samples for w, s in zip(weights, self.sources, strict=True))
        k = rng.choices(range(len(self.sources)), weights=weights)[0]
        return sum(len(s.shards) for s in self.sources[:k]) + rng.randrange(len(self.sources[k].shards))

    def chunk_rng(self, epoch: int, worker: int, item: int, offset: int) -> random.Random:
        """The shuffle of the chunk that starts at (item, offset): a pure function of where it starts."""
        g = self.global_worker(worker)
        return random.Random(f"{self.seed}:chunk:{self.generation}:{epoch}:{g}:{item}:{offset}")


@dataclass(slots=True)
class Skipped:
    uid: str
    shard: str
    reason: str


def _retries() -> tuple[int, float]:
    """(tries, first back-off in seconds) for a shard read that fails: ``WIT_READ_TRIES`` (default 6)
    and ``WIT_READ_BACKOFF_S`` (default 1, doubled each try: 31 s of waiting before a shard is given up)."""
    return int(storage.env_number("WIT_READ_TRIES", 6, integer=True)), storage.env_number("WIT_READ_BACKOFF_S", 1.0)


# where the errors of a failed read come from when they are not OSErrors: s3fs re-raises what its own
# retries did not absorb (botocore's HTTPClientError, ConnectionClosedError, EndpointConnectionError;
# urllib3's IncompleteRead; aiohttp's ClientPayloadError), gcsfs and adlfs theirs
TRANSPORT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "http.client", "s3fs", "gcsfs")


def _is_read_error(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, EOFError, TimeoutError, storage.StorageError)):
        return True
    return any(k.__module__.startswith(TRANSPORT_MODULES) for k in type(exc).__mro__)


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's key and extension of a member name: ``a/b.c.jpg`` -> (``a/b``, ``c.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _shard_samples(url: str, start: int, skipped: list[Skipped]) -> Iterator[dict]:
    """The samples of one shard from byte ``start``: ``{__key__, __url__, ext: bytes..., _offset,
    _end}``. A read error (storage, network) is retried from the last whole sample, with back-off;
    after the last try, and on a tar that does not parse, the rest of the shard is recorded in
    ``skipped`` and the reader goes on with the next shard. A sample with a repeated member name
    is recorded and left out."""
    tries, backoff = _retries()
    resume_at, attempt = start, 0
    compressed = url.endswith((".gz", ".tgz", ".bz2", ".xz"))
    while True:
        current: dict | None = None
        try:
            with storage.open_url(url, "rb") as fh:
                for item in stream_members(fh, resume_at, compressed):
                    key, ext = _split_name(item.name)
                    if key.startswith("__") or not ext:
                        continue  # webdataset's meta members
                    if current is not None and key != current["__key__"]:
                        yield _finish(current, skipped)
                        resume_at, attempt = current["_end"], 0
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url, "_offset": item.offset, "_dup": None}
                    if ext in current:
                        current["_dup"] = current["_dup"] or ext
                    current[ext] = item.data
                    current["_end"] = item.end
            if current is not None:
                yield _finish(current, skipped)
            return
        except GeneratorExit:  # the consumer stopped: close, never retry
            raise
        except TarError as exc:
            if current is not None:
                resume_at = current["_offset"]  # the sample being read is lost with the rest
            skipped.append(Skipped("", url, f"unreadable tar from byte {resume_at}: {exc}"))
            return
        except Exception as exc:
            if not _is_read_error(exc):
                raise
            attempt += 1
            if attempt >= tries:
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
                skipped.append(Skipped("", url, f"unreadable shard from byte {resume_at} after {tries} tries: {why}"))
                return
            time.sleep(backoff * 2 ** (attempt - 1))


def _finish(sample: dict, skipped: list[Skipped]) -> dict:
    dup = sample.pop("_dup")
    if dup:
        skipped.append(Skipped(sample["__key__"], sample["__url__"], f"duplicate member {dup!r} in the sample"))
        sample["_bad"] = True
    return sample


@dataclass(slots=True)
class Position:
    """Where one logical worker stands: the chunk it is in (the item and byte it starts at), how
    many of the chunk's samples it has handed out, and where reading the chunk stopped (None
    before the chunk is read). A resumed worker seeks to the chunk's start and re-reads one chunk."""

    epoch: int = 0
    item: int = 0
    offset: int | None = None  # None: the item's own start
    taken: int = 0
    end: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "item": self.item,
            "offset": self.offset,
            "taken": self.taken,
            "end": list(self.end) if self.end else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Position:
        if not isinstance(d, dict):
            raise StreamError("the checkpoint's stream position is from an older wit; it cannot resume exactly")
        end = d.get("end")
        return cls(int(d["epoch"]), int(d["item"]), d.get("offset"), int(d["taken"]), tuple(end) if end else None)


def _worker_samples(
    plan: StreamPlan,
    worker: int,
    pos: Position,
    skipped: list[Skipped],
    opened: list[str],
    last_epoch: int | None = None,
) -> Iterator[tuple[dict, Position]]:
    """(undecoded sample, the position after it) for one worker from ``pos`` on, through epochs
    (endless when resampled). Samples are read forward and shuffled in chunks of ``buffer``
    samples, each chunk by a seed of where it starts, so a position is (chunk start, taken)."""
    shards = plan.shards
    size = max(1, plan.buffer)
    epoch, item, offset, taken = pos.epoch, pos.item, pos.offset, pos.taken
    while True:
        sched = None if plan.resampled else plan.schedule(epoch, worker, len(shards))

        def at(i: int, sched=sched) -> Item | None:
            if sched is None:
                return plan.draw(worker, i), 0
            return sched[i] if i < len(sched) else None

        def read(i: int, off: int | None) -> Iterator[dict]:
            while (it := at(i)) is not None:
                shard = shards[it[0]]
                opened.append(shard.url)
                for sample in _shard_samples(shard.url, it[1] if off is None else off, skipped):
                    sample["_item"] = i
                    yield sample
                i, off = i + 1, None

        reader = read(item, offset)
        while True:
            chunk = list(itertools.islice(reader, size))
            if not chunk:
                break
            last = chunk[-1]
            end = (last["_item"], last["_end"])
            if plan.shuffle:
                start = offset if offset is not None else (at(item) or (0, 0))[1]
                plan.chunk_rng(epoch, worker, item, start).shuffle(chunk)
            for k in range(taken, len(chunk)):
                if k + 1 == len(chunk):
                    after = Position(epoch, end[0], end[1], 0, None)
                else:
                    after = Position(epoch, item, offset, k + 1, end)
                yield chunk[k], after
            item, offset, taken = end[0], end[1], 0
            if len(chunk) < size:
                break
        if plan.resampled:
            raise StreamError("resampled stream ended")  # unreachable: draws are endless
        if last_epoch is not None and epoch >= last_epoch:
            return
        epoch, item, offset, taken = epoch + 1, 0, None, 0


def raw_samples(plan: StreamPlan, epoch: int, worker: int) -> Iterator[dict]:
    """The undecoded samples of one worker's epoch (endless when resampled), in their final order."""
    for sample, _ in _worker_samples(plan, worker, Position(epoch), [], [], last_epoch=epoch):
        if not sample.get("_bad"):
            yield sample


# -------------------------------------------------------------------------------------------------
# a resume with another layout: the items left unread, split again


def carry_over(old: StreamPlan, positions: Sequence[Position]) -> dict[int, tuple[Item, ...]]:
    """The items the workers of ``old`` (``positions`` in global-worker order) had not read, per
    epoch from the earliest any worker was in to the latest: a worker in an earlier epoch left
    all of this one; the one in it, what follows its chunk (the chunk's samples it had not handed
    out yet are dropped: at most ``buffer`` per worker, so each sample is still seen at most once
    per epoch). A new layout splits these among its workers (``StreamPlan.carry``)."""
    if len(positions) != old.workers_total:
        raise StreamError(f"{len(positions)} positions for {old.workers_total} workers")
    n = sum(len(s.shards) for s in old.sources)
    first = min(p.epoch for p in positions)
    # an epoch carried over by an earlier resume that no worker has reached yet is still to come
    last = max([p.epoch for p in positions] + list(old.carry))
    carry: dict[int, tuple[Item, ...]] = {}
    for epoch in range(first, last + 1):
        items: list[Item] = []
        for g, p in enumerate(positions):
            rank, worker = divmod(g, old.workers)
            sched = dataclasses.replace(old, rank=rank).schedule(epoch, worker, n)
            if p.epoch > epoch:
                continue
            if p.epoch < epoch:
                items.extend(sched)
                continue
            i, off = p.end if p.end is not None else (p.item, p.offset)
            if i < len(sched):
                items.append((sched[i][0], sched[i][1] if off is None else off))
                items.extend(sched[i + 1 :])
        carry[epoch] = tuple(items)
    return carry


# -------------------------------------------------------------------------------------------------
# decoding and augmentation, in the workers


class CorruptSample(ValueError):
    pass


def sample_seed(seed: int, draw: int | str, uid: str) -> int:
    """The augmentation seed of one sample: by (epoch, uid), so independent of worker, rank and
    skips; when resampled by the draw that brought it (a uid drawn twice gets two crops)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{draw}:{uid}".encode(), digest_size=8).digest(), "little") >> 1


def seed_cpu(seed: int) -> None:
    """Seed the CPU generator as ``torch.manual_seed(seed)`` does, so that the draws after it are
    the same, without seeding every accelerator's too: with CUDA built in but not yet initialised
    (a data worker), ``torch.manual_seed`` queues the CUDA seeding with a formatted stack trace of
    the call, which made it 1.6 ms a call, more than decoding and cropping a small image."""
    torch.default_generator.manual_seed(seed)


Box = tuple[int, int, int, int]  # (top, left, height, width), as RandomResizedCrop.get_params draws it
# what PIL raises for bytes that are not an image it can decode
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True, slots=True)
class PixelTransform:
    """open_clip's standard image transform, recognised, and done on uint8 tensors.

    open_clip's train transform is ``RandomResizedCrop`` (bicubic, antialiased) -> convert to RGB ->
    ``ToTensor`` -> ``Normalize``; its eval transform has ``Resize`` (shortest side) + ``CenterCrop``
    in place of the first. Here the crop box is drawn by torchvision's own
    ``RandomResizedCrop.get_params`` under the sample's seed (so it is the box the PIL transform
    draws), the crop and resize run on the uint8 tensor (``torchvision.transforms.v2.functional``:
    within about one grey level of PIL's resize), and ``(x / 255 - mean) / std`` is left to the
    trainer's device (``train/device.py``). Anything else (colour jitter, timm's transforms, another
    resize mode) is not recognised: the Decoder then runs the transform itself, sample by sample."""

    size: tuple[int, int]  # output (height, width)
    interpolation: InterpolationMode
    antialias: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float] | None = None  # RandomResizedCrop's; None: Resize + CenterCrop (eval)
    ratio: tuple[float, float] | None = None
    resize: int | None = None  # eval: the shortest side Resize gives

    @classmethod
    def recognise(cls, transform) -> PixelTransform | None:
        steps = list(getattr(transform, "transforms", None) or []) if isinstance(transform, T.Compose) else []
        if len(steps) < 4 or type(steps[-1]) is not T.Normalize or not isinstance(steps[-2], T.ToTensor):
            return None
        norm, head = steps[-1], steps[:-2]
        if not _is_rgb_conversion(head[-1]):
            return None
        head = head[:-1]
        common = dict(mean=tuple(float(m) for m in norm.mean), std=tuple(float(s) for s in norm.std))
        if len(head) == 1 and type(head[0]) is T.RandomResizedCrop:
            crop = head[0]
            return cls(
                size=_pair(crop.size),
                interpolation=crop.interpolation,
                antialias=bool(crop.antialias),
                scale=(float(crop.scale[0]), float(crop.scale[1])),
                ratio=(float(crop.ratio[0]), float(crop.ratio[1])),
                **common,
            )
        if len(head) == 2 and type(head[0]) is T.Resize and type(head[1]) is T.CenterCrop:
            resize, centre = head
            side = resize.size if isinstance(resize.size, int) else None
            if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1:
                side = int(resize.size[0])
            if side is None or resize.max_size is not None:
                return None  # a squash to (h, w), or a capped long side: not the shortest-side resize
            return cls(
                size=_pair(centre.size),
                interpolation=resize.interpolation,
                antialias=bool(resize.antialias),
                resize=side,
                **common,
            )
        return None

    def box(self, width: int, height: int, seed: int) -> Box | None:
        """The crop box of an image of ``width`` x ``height`` for the sample seeded ``seed``: what
        ``RandomResizedCrop`` draws right after ``torch.manual_seed(seed)``. None for the eval
        transform (its crop is the centre of the resized image)."""
        if self.scale is None:
            return None
        seed_cpu(seed)
        shape = torch.empty(1, 1, 1).expand(1, height, width)  # get_params reads the size only
        return T.RandomResizedCrop.get_params(shape, list(self.scale), list(self.ratio))

    def apply(self, pixels: torch.Tensor, box: Box | None) -> torch.Tensor:
        """uint8 ``pixels`` (C, H, W), on any device -> the crop, resized: uint8 (C, *size)."""
        if box is None:
            pixels = F2.resize(pixels, [self.resize], interpolation=self.interpolation, antialias=self.antialias)
            return F2.center_crop(pixels, list(self.size))
        top, left, height, width = box
        return F2.resized_crop(
            pixels,
            top,
            left,
            height,
            width,
            list(self.size),
            interpolation=self.interpolation,
            antialias=self.antialias,
        )


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def _is_rgb_conversion(step) -> bool:
    """open_clip's convert-to-RGB step: ``MaybeConvertMode("RGB")``, or ``_convert_to_rgb`` (older)."""
    if type(step).__name__ == "MaybeConvertMode":
        return getattr(step, "mode", None) == "RGB"
    return getattr(step, "__name__", "") == "_convert_to_rgb"


def crop_box(decoder: Decoder, img_size: tuple[int, int], seed: int) -> Box | None:
    """The crop box ``decoder`` draws for a sample seeded ``seed`` whose image, as the CPU path
    decodes it (JPEG draft included), is ``img_size`` = (width, height)."""
    if decoder.pixels is None:
        raise ValueError("this decoder runs its transform sample by sample: it draws no box of its own")
    return decoder.pixels.box(img_size[0], img_size[1], seed)


def full_box(box: Box, scale: int, width: int, height: int) -> Box:
    """``box``, drawn on a JPEG decoded at 1/``scale`` (draft), as a box on the full image of
    ``width`` x ``height``: pixel j of the reduced image is the DCT-scaled block of full pixels
    [j * scale, (j + 1) * scale), the last one cut at the image's edge (libjpeg's reduced size is
    ceil(width / scale)). So the box covers the same part of the picture."""
    top, left, h, w = box
    y, x = top * scale, left * scale
    return y, x, min((top + h) * scale, height) - y, min((left + w) * scale, width) - x


def to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 (3, H, W), a channels-last view (what torch's uint8 resize wants)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


@dataclass(slots=True)
class EncodedImage:
    """A JPEG left for the trainer to decode on its device (``decode="gpu"``), with its crop box
    drawn here, on the image as the CPU path would decode it (at 1/``scale``: JPEG draft)."""

    data: bytes
    box: Box | None  # None: the eval transform's centre crop
    scale: int  # 1, 2, 4 or 8
    shard: str


@dataclass(slots=True)
class Decoder:
    """Bytes -> (uid, image, text). ``transform`` is open_clip's train (or eval) transform.

    When :class:`PixelTransform` recognises it, the image is the crop as a uint8 (3, H, W) tensor,
    which the trainer normalises on its device; otherwise it is ``transform``'s own output (float,
    normalised here). With ``decode="gpu"`` a baseline RGB JPEG is not decoded at all: its image is
    an :class:`EncodedImage` (the file and its crop box), for ``train/device.py`` to decode on the
    GPU; every other image (PNG, WebP, greyscale, CMYK or progressive JPEGs) is decoded here as
    with ``decode="cpu"``."""

    transform: Callable[[Image.Image], torch.Tensor]
    image_size: int
    seed: int = 0
    min_crop_scale: float = 0.9  # RandomResizedCrop's smallest area: bounds how far JPEG draft may shrink
    decode: str = "cpu"  # cpu | gpu
    pixels: PixelTransform | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {', '.join(DECODES)}, got {self.decode!r}")
        self.pixels = PixelTransform.recognise(self.transform)
        if self.decode == "gpu" and self.pixels is None:
            raise ValueError(
                "decode on the GPU needs open_clip's standard transform (RandomResizedCrop, or Resize + "
                f"CenterCrop, then RGB, ToTensor, Normalize); this run's is {self.transform!r}"
            )

    def uid(self, sample: dict) -> str:
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
                if isinstance(meta, dict) and isinstance(meta.get("uid"), str):
                    return meta["uid"]
            except (ValueError, TypeError):
                pass  # metadata is optional; the tar key is the uid then
        return sample["__key__"]

    def open(self, data: bytes) -> tuple[Image.Image, int]:
        """The image opened, not decoded: its header read and, for a JPEG, the draft scale set
        (JPEG decodes at 1/2, 1/4, 1/8 scale for free: never below what the crop needs). Returns
        the image (its ``size`` the size it decodes to) and that scale."""
        try:
            img = Image.open(io.BytesIO(data))
            need = int(self.image_size / self.min_crop_scale**0.5) + 1
            img.draft("RGB", (need, need))
        except _IMAGE_ERRORS as exc:
            raise CorruptSample(_undecodable(exc)) from exc
        config = getattr(img, "decoderconfig", None)
        return img, int(config[0]) if config else 1

    def load(self, img: Image.Image) -> Image.Image:
        """Decode an opened image, as RGB."""
        try:
            return img.convert("RGB")
        except _IMAGE_ERRORS as exc:
            raise CorruptSample(_undecodable(exc)) from exc

    def decode_pixels(self, data: bytes, box: Box | None) -> torch.Tensor:
        """The CPU path's uint8 crop of an image file, given its box (the trainer's fallback for a
        JPEG its device does not decode: the same pixels a worker would have made)."""
        img, _ = self.open(data)
        return self.pixels.apply(to_uint8(self.load(img)), box)

    def __call__(self, sample: dict, draw: int | str) -> tuple[str, torch.Tensor | EncodedImage, str]:
        uid = self.uid(sample)
        img_key = next((k for k in SAMPLE_IMAGE_EXTENSIONS if k in sample), None)
        txt_key = next((k for k in TEXT_KEYS if k in sample), None)
        if img_key is None:
            raise CorruptSample("no image")
        if txt_key is None:
            raise CorruptSample("no caption")
        try:
            text = sample[txt_key].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptSample(f"caption is not UTF-8 ({exc.reason})") from exc
        seed = sample_seed(self.seed, draw, uid)
        img, scale = self.open(sample[img_key])
        if self.decode == "gpu" and _device_decodable(img):
            # the box of the image the CPU path would decode (img.size: after the draft), so the
            # same seed gives the same box; the device maps it onto the full image (full_box)
            return uid, EncodedImage(sample[img_key], self.pixels.box(*img.size, seed), scale, sample["__url__"]), text
        img = self.load(img)
        if self.pixels is None:
            seed_cpu(seed)
            return uid, self.transform(img), text
        return uid, self.pixels.apply(to_uint8(img), self.pixels.box(*img.size, seed)), text


def _undecodable(exc: BaseException) -> str:
    return f"image does not decode ({type(exc).__name__}: {str(exc)[:120]})"


def _device_decodable(img: Image.Image) -> bool:
    """A JPEG that nvJPEG decodes as is: baseline (not progressive), three colour components.
    Greyscale, CMYK and progressive JPEGs, and other formats, are decoded by the worker."""
    return img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")


@dataclass(slots=True)
class EncodedBatch:
    """The JPEGs of a batch left for the device (``decode="gpu"``): the files one after another in
    one uint8 tensor (one shared-memory block through the DataLoader, rather than a pickle of each),
    their places in the batch, crop boxes, draft scales and shards; and the places of the images the
    worker decoded itself (``batch["images"]``, in that order)."""

    data: torch.Tensor
    offsets: list[int]  # file i is data[offsets[i]:offsets[i + 1]]
    index: list[int]
    boxes: list[Box | None]
    scales: list[int]
    shards: list[str]
    decoded: list[int]

    @property
    def size(self) -> int:
        return len(self.index) + len(self.decoded)

    def files(self) -> list[torch.Tensor]:
        return [self.data[a:b] for a, b in zip(self.offsets, self.offsets[1:], strict=False)]


def batch_images(images: list, pixels: PixelTransform | None) -> dict:
    """A batch's images as the loader hands them on: ``images`` (float, normalised: the per-sample
    transform's; uint8: crops to normalise on the device), ``normalize`` ((mean, std), or None when
    that is done), and ``encoded`` (the JPEGs left for the device, or None)."""
    if pixels is None:
        return {"images": torch.stack(images), "normalize": None, "encoded": None}
    norm = (pixels.mean, pixels.std)
    encoded = [i for i, x in enumerate(images) if isinstance(x, EncodedImage)]
    if not encoded:
        return {"images": torch.stack(images), "normalize": norm, "encoded": None}
    decoded = [i for i, x in enumerate(images) if not isinstance(x, EncodedImage)]
    files = [images[i] for i in encoded]
    offsets = [0, *itertools.accumulate(len(f.data) for f in files)]
    stacked = (
        torch.stack([images[i] for i in decoded]) if decoded else torch.empty((0, 3, *pixels.size), dtype=torch.uint8)
    )
    batch = EncodedBatch(
        data=torch.frombuffer(bytearray(b"".join(f.data for f in files)), dtype=torch.uint8),
        offsets=offsets,
        index=encoded,
        boxes=[f.box for f in files],
        scales=[f.scale for f in files],
        shards=[f.shard for f in files],
        decoded=decoded,
    )
    return {"images": stacked, "normalize": norm, "encoded": batch}


# -------------------------------------------------------------------------------------------------
# the position, and the batches


@dataclass(slots=True)
class StreamState:
    """Where one rank's stream stands: a :class:`Position` per logical worker, and how many
    batches this rank has taken (which fixes whose turn the next batch is)."""

    positions: list[Position]
    batches: int = 0

    @classmethod
    def start(cls, workers: int, epoch: int = 0) -> StreamState:
        return cls(positions=[Position(epoch) for _ in range(workers)])

    def advance(self, batch: dict) -> None:
        self.positions[batch["worker"]] = Position.from_dict(batch["position"])
        self.batches += 1

    @property
    def epoch(self) -> int:
        return min(p.epoch for p in self.positions)

    def to_dict(self) -> dict:
        return {"positions": [p.to_dict() for p in self.positions], "batches": self.batches}

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        return cls(positions=[Position.from_dict(p) for p in d["positions"]], batches=int(d["batches"]))


class BatchStream(IterableDataset):
    """Endless batches for one rank: ``{"images", "normalize", "encoded", "texts", "uids", "worker",
    "epoch", "position", "skipped", "opened"}`` (the images as :func:`batch_images` says: uint8 crops
    for the device to normalise, with open_clip's standard transform); starts at ``state`` (a fresh
    run: every worker at epoch 0, sample 0)."""

    def __init__(
        self,
        plan: StreamPlan,
        decoder: Decoder,
        tokenizer: Callable,
        batch_size: int,
        state: StreamState | None = None,
    ):
        super().__init__()
        self.plan = plan
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.state = state or StreamState.start(plan.workers)
        if len(self.state.positions) != plan.workers:
            raise StreamError(f"stream state has {len(self.state.positions)} workers, the run {plan.workers}")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, n = (info.id, info.num_workers) if info else (0, 1)
        if n != self.plan.workers:
            raise StreamError(f"DataLoader has {n} workers, the stream plan {self.plan.workers}")
        worker = (physical + self.state.batches) % n  # continue the round-robin where it stopped
        pos = self.state.positions[worker]
        skipped: list[Skipped] = []
        opened: list[str] = []
        samples = _worker_samples(self.plan, worker, pos, skipped, opened)
        uids, images, texts = [], [], []
        epoch, batches, fresh = pos.epoch, 0, pos == Position(pos.epoch)
        for sample, after in samples:
            if after.epoch != epoch:
                # the partial batch at the end of this worker's epoch is dropped
                # (plan_stream checks epoch 0's shards; later epochs, carried-over items and skipped
                # shards may leave a worker short, which only costs that worker's turn)
                if batches == 0 and fresh and epoch == 0 and epoch not in self.plan.carry:
                    raise StreamError(
                        f"worker {worker} of rank {self.plan.rank} got no full batch of {self.batch_size} in "
                        f"epoch {epoch}: too few samples per worker; use a smaller batch or fewer workers"
                    )
                uids, images, texts = [], [], []
                epoch, batches, fresh = after.epoch, 0, True
            if sample.get("_bad"):
                continue
            draw = (
                f"{self.plan.generation}:{self.plan.global_worker(worker)}:{sample['_item']}"
                if self.plan.resampled
                else epoch
            )
            try:
                uid, image, text = self.decoder(sample, draw)
            except CorruptSample as exc:
                skipped.append(Skipped(self.decoder.uid(sample), sample["__url__"], str(exc)))
                continue
            uids.append(uid)
            images.append(image)
            texts.append(text)
            if len(uids) == self.batch_size:
                yield {
                    **batch_images(images, self.decoder.pixels),
                    "texts": self.tokenizer(texts),
                    "uids": uids,
                    "worker": worker,
                    "epoch": epoch,
                    "position": after.to_dict(),
                    "skipped": [(s.uid, s.shard, s.reason) for s in skipped],
                    "opened": list(opened),
                }
                uids, images, texts = [], [], []
                skipped.clear()
                opened.clear()
                batches += 1


MAX_DEFAULT_WORKERS = 8


def default_workers(local_world_size: int, cores: int | None = None, shards: int | None = None) -> int:
    """DataLoader workers per rank when ``--workers`` is not given: this rank's share of the node's
    cores (``cores // local_world_size``), less one for the rank's own process (the training loop,
    the pin-memory thread, and with ``--decode gpu`` the JPEG hand-off), at least 1 and at most
    :data:`MAX_DEFAULT_WORKERS`; and no more than the shards a rank reads (``shards``, when the
    stream is not resampled), so a small dataset does not fail for lack of shards.

    Why 8 at most: a worker decodes, crops and tokenizes ~800 samples/s (256 px JPEGs to 224 px
    uint8 crops, one core of this project's machine), so 8 feed ~6k samples/s per rank; each worker
    also holds its prefetched batches in /dev/shm and RAM. Give ``--workers`` for more when the
    data-wait share says so (larger images, slower storage); ``bench/bench_gpu.py`` measures it."""
    cores = cores if cores is not None else cpu_cores()
    n = max(1, min(MAX_DEFAULT_WORKERS, cores // max(1, local_world_size) - 1))
    return max(1, min(n, shards)) if shards is not None else n


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one core per worker: decode and augment are single-threaded work


def make_loader(stream: BatchStream, workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches from ``workers`` processes (or in-process when 0), in the round-robin order."""
    return DataLoader(
        stream,
        batch_size=None,  # workers form the batches themselves
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


@dataclass(slots=True)
class StreamInfo:
    """What the trainer needs to know about a stream before it starts."""

    sources: list[Source]
    plan: StreamPlan
    samples: int | None  # per epoch, all ranks; None when shard sizes are unknown
    steps_per_epoch: int | None  # batches per rank per epoch (min over ranks), None when unknown
    digest: str | None
    skipped: list[Skipped] = field(default_factory=list)


def plan_stream(
    dataset: str | Sequence[str] | None,
    *,
    seed: int,
    rank: int,
    world_size: int,
    workers: int,
    batch_size: int,
    shuffle: bool = True,
    buffer: int = 1000,
    resampled: bool = False,
    weights: Sequence[float] | None = None,
    sources: Sequence[Source] | None = None,
) -> StreamInfo:
    """Check, before any worker starts, that every worker can fill a batch. ``sources`` (resolved
    once, by rank 0, and broadcast) saves resolving ``dataset`` again; the work is O(shards)."""
    sources = list(sources) if sources is not None else resolve_sources(dataset)
    plan = StreamPlan(
        sources=tuple(sources),
        seed=seed,
        rank=rank,
        world_size=world_size,
        workers=max(1, workers),
        shuffle=shuffle,
        buffer=buffer,
        resampled=resampled or weights is not None,
        weights=tuple(weights) if weights else None,
    )
    samples = None if any(s.samples is None for s in sources) else sum(s.samples for s in sources)
    steps = None
    if samples is not None and not plan.resampled:
        sizes = [s.samples for s in plan.shards]
        order = _shard_order(seed, 0, len(sizes), shuffle)
        total = plan.workers_total
        counts = [sum(sizes[i] for i in order[g::total]) for g in range(total)]
        if min(counts) < batch_size:
            g = counts.index(min(counts))
            raise StreamError(
                f"a worker of rank {g // plan.workers} has {min(counts)} samples per epoch, fewer than one "
                f"batch of {batch_size}: use a smaller batch, fewer workers or more shards"
            )
        steps = min(
            sum(c // batch_size for c in counts[r * plan.workers : (r + 1) * plan.workers]) for r in range(world_size)
        )
    elif samples is not None:
        steps = samples // (batch_size * world_size)
    return StreamInfo(
        sources=sources, plan=plan, samples=samples, steps_per_epoch=steps, digest=dataset_digest(sources)
    )
