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

    epoch e:  shards --seeded shuffle(seed, e)--> every (R*W)-th shard for global worker g
              --> tar --> samples --seeded buffer(seed, e, rank, worker)--> raw sample order

A stream position is therefore just ``(epoch, samples consumed in that epoch)`` per worker, and a
resumed worker skips that many *undecoded* samples (cheap: no JPEG decode, no augmentation).
Augmentation is seeded per sample by ``hash(seed, epoch, uid)``, so it does not depend on how
many samples were skipped, on the worker, or on the rank.

Workers form whole batches themselves (the last partial batch of a worker's epoch is dropped) and
the DataLoader hands batches out round-robin, worker 0 first. After ``n`` batches the next one
comes from worker ``n % W``; on resume the physical worker ``p`` plays logical worker
``(p + n) % W`` so the round-robin continues where it stopped.

A sample whose image or text does not decode is skipped, counted, and travels to the trainer
with the next batch as ``(uid, shard, reason)``; a tar that cannot be read past some point is
recorded the same way (``uid`` empty) and the worker goes on with its next shard.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from wit.manifests import storage
from wit.manifests.manifest import ManifestError, open_manifest
from wit.manifests.runrecord import read_run_record

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
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
        return Source(url=url, shards=tuple(Shard(s.url, sizes.get(storage.basename(s.url))) for s in shards))
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


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """Everything the order of samples depends on."""

    sources: tuple[Source, ...]
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    workers: int = 1  # logical workers per rank (>= 1; 0 DataLoader workers means one, in-process)
    shuffle: bool = True
    buffer: int = 1000
    resampled: bool = False
    weights: tuple[float, ...] | None = None

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

    def global_worker(self, worker: int) -> int:
        return self.rank * self.workers + worker

    def epoch_shards(self, epoch: int, worker: int) -> list[Shard]:
        """The shards one worker reads in one epoch (not resampled)."""
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}:shards:{epoch}").shuffle(shards)
        return shards[self.global_worker(worker) :: self.world_size * self.workers]

    def resampled_shards(self, worker: int) -> Iterator[Shard]:
        """An endless weighted draw of shards (with replacement) for one worker."""
        rng = random.Random(f"{self.seed}:resample:{self.global_worker(worker)}")
        weights = self.weights or tuple(float(s.samples or len(s.shards)) for s in self.sources)
        if all(s.samples for s in self.sources):
            # weights are shares of *samples*: a source of big shards is drawn less often per shard
            weights = tuple(w * len(s.shards) / s.samples for w, s in zip(weights, self.sources, strict=True))
        while True:
            src = rng.choices(self.sources, weights=weights)[0]
            yield rng.choice(src.shards)

    def samples_per_epoch(self, worker: int, epoch: int = 0) -> int | None:
        counts = [s.samples for s in self.epoch_shards(epoch, worker)]
        return None if any(c is None for c in counts) else sum(counts)


@dataclass(slots=True)
class Skipped:
    uid: str
    shard: str
    reason: str


class _ErrorLog:
    """webdataset's ``handler=``: a tar that breaks off is recorded and the stream goes on; any other
    error (storage, network) is raised, never swallowed — a silently shorter epoch breaks resume."""

    def __init__(self) -> None:
        self.items: list[Skipped] = []

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, tarfile.TarError):
            # tar_file_expander appends (stream, url) to the exception's args
            url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else ""
            why = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__
            self.items.append(Skipped(uid="", shard=url, reason=f"unreadable tar: {why}"))
            return True
        raise exn

    def drain(self) -> list[Skipped]:
        items, self.items = self.items, []
        return items


def _open_shards(shards: Iterator[Shard], opened: list[str]) -> Iterator[dict]:
    for shard in shards:
        opened.append(shard.url)
        with storage.open_url(shard.url, "rb") as fh:
            yield {"url": shard.url, "stream": fh}


def _shuffled(samples: Iterator[dict], rng: random.Random | None, size: int) -> Iterator[dict]:
    """A seeded shuffle buffer: a pure function of (input order, rng seed, size)."""
    if rng is None or size <= 1:
        yield from samples
        return
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = rng.randrange(size)
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def raw_samples(
    plan: StreamPlan,
    epoch: int,
    worker: int,
    errors: _ErrorLog | None = None,
    opened: list[str] | None = None,
) -> Iterator[dict]:
    """The undecoded samples of one worker's epoch (endless when resampled), in their final order."""
    errors = errors if errors is not None else _ErrorLog()
    opened = opened if opened is not None else []
    shards = plan.resampled_shards(worker) if plan.resampled else iter(plan.epoch_shards(epoch, worker))
    rng = random.Random(f"{plan.seed}:buffer:{epoch}:{plan.rank}:{worker}") if plan.shuffle else None
    return wds.DataPipeline(
        # the shards of this worker for this epoch, in their seeded order
        lambda: _open_shards(shards, opened),
        # -> {url, stream}: open file handles through fsspec
        lambda src: tar_file_expander(src, handler=errors),
        # -> {fname, data}: tar members, an EOF marker between shards
        lambda src: group_by_keys(src, handler=errors),
        # -> {__key__, __url__, jpg, txt, json}: one undecoded sample
        lambda src: _shuffled(src, rng, plan.buffer),
        # -> the same samples in the seeded buffer's order: the order positions count in
    ).iterator()


# -------------------------------------------------------------------------------------------------
# decoding and augmentation, in the workers


class CorruptSample(ValueError):
    pass


def sample_seed(seed: int, epoch: int, uid: str) -> int:
    """The augmentation seed of one sample in one epoch: independent of worker, rank and skips."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{uid}".encode(), digest_size=8).digest(), "little") >> 1


@dataclass(slots=True)
class Decoder:
    """Bytes -> (uid, image tensor, text). ``transform`` is open_clip's train (or eval) transform."""

    transform: Callable[[Image.Image], torch.Tensor]
    image_size: int
    seed: int = 0
    min_crop_scale: float = 0.9  # RandomResizedCrop's smallest area: bounds how far JPEG draft may shrink

    def uid(self, sample: dict) -> str:
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
                if isinstance(meta, dict) and isinstance(meta.get("uid"), str):
                    return meta["uid"]
            except (ValueError, TypeError):
                pass  # metadata is optional; the tar key is the uid then
        return sample["__key__"]

    def __call__(self, sample: dict, epoch: int) -> tuple[str, torch.Tensor, str]:
        uid = self.uid(sample)
        img_key = next((k for k in IMAGE_KEYS if k in sample), None)
        txt_key = next((k for k in TEXT_KEYS if k in sample), None)
        if img_key is None:
            raise CorruptSample("no image")
        if txt_key is None:
            raise CorruptSample("no caption")
        try:
            text = sample[txt_key].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptSample(f"caption is not UTF-8 ({exc.reason})") from exc
        try:
            img = Image.open(io.BytesIO(sample[img_key]))
            # JPEG decodes at 1/2, 1/4, 1/8 scale for free: never below what the crop needs
            need = int(self.image_size / self.min_crop_scale**0.5) + 1
            img.draft("RGB", (need, need))
            img = img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise CorruptSample(f"image does not decode ({type(exc).__name__}: {str(exc)[:120]})") from exc
        torch.manual_seed(sample_seed(self.seed, epoch, uid))
        return uid, self.transform(img), text


# -------------------------------------------------------------------------------------------------
# the position, and the batches


@dataclass(slots=True)
class StreamState:
    """Where one rank's stream stands: per logical worker ``[epoch, raw samples consumed]``, and
    how many batches this rank has taken (which fixes whose turn the next batch is)."""

    positions: list[list[int]]
    batches: int = 0

    @classmethod
    def start(cls, workers: int) -> StreamState:
        return cls(positions=[[0, 0] for _ in range(workers)])

    def advance(self, batch: dict) -> None:
        self.positions[batch["worker"]] = [batch["epoch"], batch["consumed"]]
        self.batches += 1

    @property
    def epoch(self) -> int:
        return min(e for e, _ in self.positions)

    def to_dict(self) -> dict:
        return {"positions": [list(p) for p in self.positions], "batches": self.batches}

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        return cls(positions=[[int(e), int(c)] for e, c in d["positions"]], batches=int(d["batches"]))


class BatchStream(IterableDataset):
    """Endless batches for one rank: ``{"images", "texts", "uids", "worker", "epoch", "consumed",
    "skipped", "opened"}``; starts at ``state`` (a fresh run: every worker at epoch 0, sample 0)."""

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
        epoch, skip = self.state.positions[worker]
        while True:
            yield from self._epoch(worker, epoch, skip)
            if self.plan.resampled:
                raise StreamError("resampled stream ended")  # unreachable: it is endless
            epoch, skip = epoch + 1, 0

    def _epoch(self, worker: int, epoch: int, skip: int) -> Iterator[dict]:
        errors, opened = _ErrorLog(), []
        raw = raw_samples(self.plan, epoch, worker, errors, opened)
        consumed = 0
        for _ in itertools.islice(raw, skip):  # resume: skip undecoded samples
            consumed += 1
        uids, images, texts, skipped = [], [], [], []
        batches = 0
        for sample in raw:
            consumed += 1
            try:
                uid, image, text = self.decoder(sample, epoch)
            except CorruptSample as exc:
                skipped.append(Skipped(self.decoder.uid(sample), sample.get("__url__", ""), str(exc)))
                continue
            uids.append(uid)
            images.append(image)
            texts.append(text)
            if len(uids) == self.batch_size:
                skipped.extend(errors.drain())
                yield {
                    "images": torch.stack(images),
                    "texts": self.tokenizer(texts),
                    "uids": uids,
                    "worker": worker,
                    "epoch": epoch,
                    "consumed": consumed,
                    "skipped": [(s.uid, s.shard, s.reason) for s in skipped],
                    "opened": list(opened),
                }
                uids, images, texts, skipped = [], [], [], []
                opened.clear()
                batches += 1
        # the partial batch at the end of this worker's epoch is dropped (its skips are lost with
        # it only if no batch follows; they are re-found on the next epoch's pass)
        if batches == 0 and skip == 0:
            raise StreamError(
                f"worker {worker} of rank {self.plan.rank} got no full batch of {self.batch_size} in "
                f"epoch {epoch}: too few samples per worker; use a smaller batch or fewer workers"
            )


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
    dataset: str | Sequence[str],
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
) -> StreamInfo:
    """Resolve the shards and check, before any worker starts, that every worker can fill a batch."""
    sources = resolve_sources(dataset)
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
        per_rank = []
        for r in range(world_size):
            p = StreamPlan(**{**_plan_kwargs(plan), "rank": r})
            counts = [p.samples_per_epoch(w) for w in range(p.workers)]
            short = [c for c in counts if c < batch_size]
            if short:
                raise StreamError(
                    f"a worker of rank {r} has {min(short)} samples per epoch, fewer than one batch of "
                    f"{batch_size}: use a smaller batch, fewer workers or more shards"
                )
            per_rank.append(sum(c // batch_size for c in counts))
        steps = min(per_rank)
    elif samples is not None:
        steps = samples // (batch_size * world_size)
    return StreamInfo(
        sources=sources, plan=plan, samples=samples, steps_per_epoch=steps, digest=dataset_digest(sources)
    )


def _plan_kwargs(plan: StreamPlan) -> dict[str, Any]:
    return {name: getattr(plan, name) for name in StreamPlan.__dataclass_fields__}
