"""``wit filter``: image-level decisions on a download ledger, one FILTERED row per ledger row.

Three stages run in order, each reading the previous one's finished output (``FILTER_PHASES``)::

    downloaded ──SCAN──▶ OUT/_scan ──GROUP──▶ OUT/_group ──DECIDE──▶ OUT (filtered)
    (ledger parts +      per row: sha256,    (one partition)        (per scan part)
     webdataset shards)  decoded size,       eval overlap, exact    every ledger row with
                         phash, or the       and near duplicates,   keep/reason/duplicate_of
                         first reason        rebalancing over all   and the scores used
                                             eligible rows

SCAN (one partition per ledger part) reads each successful row's image from its tar shard and
names the first problem, in this order: ``download_failed:<error>`` (the ledger's failed rows pass
through, so every ledger row has a FILTERED row), ``missing_image`` (the ledger points at a
member the shard lacks), ``too_small`` / ``bad_aspect`` on the *original* size (img2dataset
upsamples an 8×8 image to its target size and calls it a success), then ``too_many_pixels`` (the
header claims more than ``max_pixels``: refused before decoding) and ``undecodable``. Each image
is decoded once (:mod:`.imaging`); a row with no reason gets its 64-bit perceptual hash and, with
``--clip-score``, its CLIP score (:mod:`.clipscore`: the cosine similarity of the image and caption
embeddings, in [-1, 1]) from the same decoded pixels, batched, on the GPU when there is one.

GROUP (one partition over all scan parts: duplicates cross partitions) drops, among the rows with
no reason, in this order and with ``duplicate_of`` naming the kept row:

- ``eval_overlap:<task>``: within ``eval_overlap_distance`` bits of an image of a reference set
  (``reference_images``: CLIP_benchmark webdataset folders or image folders), counted per task
  as the CLIP paper's section 5 does;
- ``duplicate``: the same sha256 as a row with a smaller uid;
- ``near_duplicate``: within ``near_duplicate_distance`` bits of a kept row with a smaller uid
  (leader clustering in uid order, so the representative is the smallest uid of its group and
  the choice depends on nothing but the rows);
- ``over_cap`` (``--rebalance``): MetaCLIP's per-query cap re-applied to the rows still kept,
  with curate's rule :func:`wit.ingest.curate.selection_draw`. With curate's own cap and seed
  nothing can drop (link rot only lowers counts, so every draw that passed still passes); a
  lower cap gives the subset curate would have kept with that cap.
- ``low_clip_score``: among the rows still kept, a CLIP score below ``min_clip_score``, or below
  the ``1 - keep_top_fraction`` quantile of their scores (:func:`.clipscore.score_threshold`:
  global, and a function of the scores only, so any partitioning gives the same rows). The
  threshold used is in the group phase's run record (``extra.clip_threshold``).

DECIDE (one partition per scan part) joins GROUP's decisions back and writes FILTERED rows, with
``clip_score`` for every scored row; its run record tallies the scores of all scored rows
(``clip_score``) and of the kept ones (``clip_score_kept``) in buckets of 0.05 keyed by lower edge.

The curated manifest (queries, for ``--rebalance``) is ``config.curated`` when given, otherwise
the nearest ``curated`` output up the run records' inputs (:func:`find_upstream`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import posixpath
import re
import tarfile
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
from xxhash import xxh3_128_hexdigest

from wit.manifests import storage
from wit.manifests.manifest import ManifestError, ManifestRef, open_manifest, read_part
from wit.manifests.options import Option, check_options, split_ref
from wit.manifests.runrecord import read_run_record
from wit.manifests.schemas import conform, with_kind
from wit.manifests.stage import Partition, PartitionResult, Resources, StageError, input_parts

from .download import shard_url as locate_shard
from .imaging import HashIndex, check_image, hash_hex, hash_int

if TYPE_CHECKING:  # torch is imported only when a CLIP model is asked for
    from .clipscore import ClipScorer

KEPT = "kept"
DOWNLOAD_FAILED = "download_failed"
MISSING_IMAGE = "missing_image"
TOO_SMALL = "too_small"
BAD_ASPECT = "bad_aspect"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
EVAL_OVERLAP = "eval_overlap"
OVER_CAP = "over_cap"
LOW_CLIP_SCORE = "low_clip_score"

SCAN_KIND = "filter_scan"
GROUP_KIND = "filter_group"

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")

SCAN_SCHEMA = with_kind(
    pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("url", pa.string(), nullable=False),
            pa.field("text", pa.string()),
            pa.field("sha256", pa.string()),  # of the image bytes in the shard
            pa.field("width", pa.int32()),  # as stored (decoded header)
            pa.field("height", pa.int32()),
            pa.field("shard", pa.string()),
            pa.field("key", pa.string()),
            pa.field("ext", pa.string()),  # the image member's extension in the shard, lowercased
            pa.field("offset", pa.int64()),  # of its data in the shard file (null: compressed shard)
            pa.field("bytes", pa.int64()),  # its size
            pa.field("xxh3", pa.string()),  # xxh3-128 of its bytes: what shard checks them against
            pa.field("reason", pa.string()),  # null: eligible for GROUP
            pa.field("detail", pa.string()),  # the decoder's message for undecodable images
            pa.field("phash", pa.string()),  # 16 hex digits, imagehash's order; null unless eligible
            pa.field("clip_score", pa.float32()),  # cosine in [-1, 1]; null unless eligible and scored
        ]
    ),
    SCAN_KIND,
)
GROUP_SCHEMA = with_kind(
    pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("duplicate_of", pa.string()),
        ]
    ),
    GROUP_KIND,
)


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """What ``wit filter`` does. Sizes are pixels; distances are bits of the 64-bit phash."""

    min_side: int = 32  # on the original size, before img2dataset resized it
    max_aspect_ratio: float = 3.0  # long side / short side, on the original size
    # Checked on the header before decoding: a 50 MP RGB image is 150 MB decoded; bigger photos
    # exist (medium-format cameras) but a web image of that size is far likelier a bomb.
    max_pixels: int = 50_000_000
    near_duplicate_distance: int = 4  # 0: only identical hashes
    # "task=URL" or URL (task = folder name, "wds_" stripped): CLIP_benchmark webdataset folders
    # (``wds_<task>/test/*.tar``) or folders of image files
    reference_images: tuple[str, ...] = ()
    eval_overlap_distance: int = 4
    rebalance: bool = False
    per_query_cap: int | None = None  # None: the curated run's cap
    seed: int | None = None  # None: the curated run's seed
    curated: str | None = None  # None: found up the run records (find_upstream)
    # CLIP-score filter: build the config with FilterConfig.build, which loads the checkpoint once
    # (so a missing file or a wrong architecture fails here, not mid-stage) and pins its sha256.
    clip_checkpoint: str | None = None  # URL of a wit checkpoint or an open_clip weights file
    clip_model: str | None = None  # open_clip architecture; needed for open_clip files only
    clip_checkpoint_sha256: str | None = None
    min_clip_score: float | None = None  # raw cosine in [-1, 1]
    keep_top_fraction: float | None = None  # in (0, 1]: keep this share of the rows still kept
    clip_batch_size: int = 64
    clip_device: str = "auto"  # auto: cuda when torch sees a GPU

    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("min-side", "int", min_side, "On the original size (img2dataset upsamples small images).", low=1),
        Option("max-aspect-ratio", "float", max_aspect_ratio, low=1.0),
        Option("max-pixels", "int", max_pixels, "Checked on the header, before decoding (decompression bombs).", low=1),
        Option(
            "near-duplicate-distance",
            "int",
            near_duplicate_distance,
            "Hamming distance of 64-bit perceptual hashes; 0 = identical hashes only.",
            low=0,
            high=31,
        ),
        Option(
            "reference-images",
            "refs",
            reference_images,
            "Evaluation images to decontaminate against (CLIP_benchmark wds folder or image folder).",
            metavar="[TASK=]URL",
        ),
        Option(
            "decontaminate",
            "name_or_path",
            None,
            "Drop near duplicates of a `wit eval` suite's test images (reason eval_overlap:<task>); "
            "its built-in sets are exported to --reference-root.",
            metavar="SUITE",
        ),
        Option(
            "reference-root",
            "path",
            None,
            "Where --decontaminate exports built-in test sets (default: OUT/_reference; in `wit run`: "
            "ROOT/_reference). Sets already there are reused.",
            metavar="URL",
        ),
        Option(
            "clip-score",
            "path",
            None,
            "Score image-text pairs with this checkpoint (wit or open_clip).",
            metavar="CKPT",
        ),
        Option("clip-model", "str", None, "Architecture of an open_clip --clip-score file.", metavar="NAME"),
        Option("min-score", "float", None, "Drop pairs below this cosine.", low=-1, high=1),
        Option(
            "keep-top",
            "float",
            None,
            "Keep this fraction of the best-scoring pairs (DataComp's CLIP-score filter).",
            low=0,
            high=1,
            low_open=True,
            metavar="FRACTION",
        ),
        Option("rebalance", "bool", False, "Re-apply the per-query cap after download (MetaCLIP)."),
        Option("per-query-cap", "int", None, "With --rebalance.", low=1),
        Option(
            "curated", "path", None, "The curated manifest (default: found through the run records).", metavar="URL"
        ),
    )

    @classmethod
    def from_options(cls, values: Mapping[str, Any], out: str | None = None) -> FilterConfig:
        """``out`` is the filter's output folder: ``decontaminate`` exports its suite's built-in
        test sets under ``reference-root``, by default :func:`reference_root` (``out``/_reference)."""
        v = check_options(cls.OPTIONS, values, "filter")
        references = v.pop("reference_images")
        suite = v.pop("decontaminate")
        root = v.pop("reference_root")
        if suite:
            from wit.evaluate.datasets import reference_sets

            if root is None and out is None:
                raise ValueError("filter.decontaminate exports reference images: give out or reference-root")
            references += reference_sets(suite, root or reference_root(out))
        return cls.build(
            clip_checkpoint=v.pop("clip_score"),
            clip_model=v.pop("clip_model"),
            min_clip_score=v.pop("min_score"),
            keep_top_fraction=v.pop("keep_top"),
            reference_images=references,
            **v,
        )

    def __post_init__(self) -> None:
        if not isinstance(self.min_side, int) or self.min_side < 1:
            raise ValueError(f"--min-side must be a positive integer, got {self.min_side!r}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"--max-aspect-ratio must be at least 1, got {self.max_aspect_ratio!r}")
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be a positive integer, got {self.max_pixels!r}")
        for name in ("near_duplicate_distance", "eval_overlap_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 32:
                raise ValueError(f"{name} must be an integer in [0, 32), got {value!r}")
        if not isinstance(self.reference_images, tuple):
            raise ValueError("reference_images must be a tuple of URLs")
        self.reference_sets()  # validates the task names
        if self.per_query_cap is not None and (not isinstance(self.per_query_cap, int) or self.per_query_cap < 1):
            raise ValueError(f"--per-query-cap must be a positive integer, got {self.per_query_cap!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if (self.per_query_cap is not None or self.seed is not None) and not self.rebalance:
            raise ValueError("--per-query-cap and --seed only apply with --rebalance")
        _check_clip_options(
            self.clip_checkpoint, self.min_clip_score, self.keep_top_fraction, self.clip_batch_size, self.clip_device
        )
        if self.clip_model is not None and not self.clip_checkpoint:
            raise ValueError("--clip-model names the architecture of a --clip-score checkpoint; give one")
        if self.clip_checkpoint and not _SHA256_RE.match(self.clip_checkpoint_sha256 or ""):
            raise ValueError("clip_checkpoint needs its sha256: build the config with FilterConfig.build")
        if not self.clip_checkpoint and self.clip_checkpoint_sha256 is not None:
            raise ValueError("clip_checkpoint_sha256 without a clip_checkpoint")

    @classmethod
    def build(cls, clip_checkpoint: str | None = None, clip_model: str | None = None, **options: Any) -> FilterConfig:
        """A config whose CLIP-score checkpoint (if any) is loaded and pinned by its sha256.

        Loading here makes a missing or unreadable file, or weights of another architecture than
        ``clip_model``, a :class:`wit.train.checkpoint.CheckpointError` (a ValueError) before any
        partition runs; the loaded model stays cached for this process's partitions.
        """
        digest = None
        if clip_checkpoint:
            from .clipscore import load_scorer

            _check_clip_options(
                clip_checkpoint,
                options.get("min_clip_score"),
                options.get("keep_top_fraction"),
                options.get("clip_batch_size", 64),
                options.get("clip_device", "auto"),
            )
            clip_checkpoint = storage.normalize(clip_checkpoint)
            scorer = load_scorer(
                clip_checkpoint, clip_model, options.get("clip_device", "auto"), options.get("clip_batch_size", 64)
            )
            digest = scorer.digest
        return cls(
            clip_checkpoint=clip_checkpoint or None, clip_model=clip_model, clip_checkpoint_sha256=digest, **options
        )

    @property
    def scores_clip(self) -> bool:
        return bool(self.clip_checkpoint)

    @property
    def filters_clip(self) -> bool:
        return self.min_clip_score is not None or self.keep_top_fraction is not None

    def reference_sets(self) -> list[tuple[str, str]]:
        """``(task, URL)`` for each reference set, in the order given."""
        sets = []
        for entry in self.reference_images:
            task, url = split_ref(entry)
            if task is None:
                task = _task_name(url)
            if not task or any(c in task for c in ":/ "):
                raise ValueError(f"reference set {entry!r}: task name {task!r} must be a plain word")
            sets.append((task, storage.normalize(url)))
        return sets


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def reference_root(out: str) -> str:
    """Where ``--decontaminate`` exports evaluation images unless told (``reference-root``):
    ``OUT/_reference``, inside the folder the command was given, whatever it is (``s3://bucket``
    too). `wit run` gives ``ROOT/_reference`` instead (the registry's ``pipeline_defaults``): it
    removes a filter folder that holds another run after building the config, and so after the
    export. The exported sets depend only on the suite, so a later run finds them and reuses them.
    """
    return storage.join(storage.normalize(out), "_reference")


def _check_clip_options(
    checkpoint: str | None, min_score: float | None, keep_top: float | None, batch_size: int, device: str
) -> None:
    if (min_score is not None or keep_top is not None) and not checkpoint:
        raise ValueError("--min-score and --keep-top need a CLIP model: give --clip-score CKPT")
    if min_score is not None and not (isinstance(min_score, int | float) and -1.0 <= min_score <= 1.0):
        raise ValueError(f"--min-score is a cosine similarity in [-1, 1], got {min_score!r}")
    if keep_top is not None and not (
        isinstance(keep_top, int | float) and not math.isnan(keep_top) and 0.0 < keep_top <= 1.0
    ):
        raise ValueError(f"--keep-top is a fraction in (0, 1], got {keep_top!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"clip_batch_size must be a positive integer, got {batch_size!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"clip_device must be auto, cpu or cuda, got {device!r}")


def _task_name(url: str) -> str:
    parts = [p for p in storage.normalize(url).split("/") if p]
    name = parts[-1] if parts else ""
    if name in ("test", "train", "val", "validation") and len(parts) > 1:
        name = parts[-2]  # wds_cifar10/test → cifar10
    return name[4:] if name.startswith("wds_") else name


def find_upstream(url: str, kind: str) -> ManifestRef | None:
    """The nearest finished output of ``kind`` up the run records' inputs of ``url`` (breadth first).

    Returns its ref as recorded by the run that read it (URL and digest at that time), or None.
    """
    queue = deque([storage.normalize(url)])
    seen = set()
    while queue:
        here = queue.popleft()
        if here in seen:
            continue
        seen.add(here)
        try:
            rec = read_run_record(here)
        except ManifestError:
            continue
        if rec is None:
            continue
        for ref in rec.inputs:
            if ref.kind == kind:
                return ManifestRef(url=storage.normalize(ref.url), kind=ref.kind, digest=ref.digest)
            queue.append(storage.normalize(ref.url))
    return None


# ---------------------------------------------------------------------------------------------
# SCAN: read each image once


def read_members(shard_url: str, keys: set[str]) -> dict[str, Member]:
    """The first image member of each wanted key of one webdataset tar shard, with its bytes.

    The shard is streamed once (``r|``), so a remote shard is read sequentially, never seeked.
    Each member's data offset is recorded (None in a compressed shard, where it would not be a
    byte offset of the file) so that shard can later read the bytes with one ranged read.
    """
    found: dict[str, Member] = {}
    with storage.open_url(shard_url, "rb") as fh:
        try:
            with tarfile.open(fileobj=fh, mode="r|*") as tar:
                plain = getattr(tar.fileobj, "comptype", "tar") == "tar"
                for member in tar:
                    if not member.isfile():
                        continue
                    name = posixpath.basename(member.name)
                    key, dot, ext = name.partition(".")
                    if not dot or key not in keys or ext.lower() not in IMAGE_EXTENSIONS or key in found:
                        continue
                    data = tar.extractfile(member).read()
                    found[key] = Member(ext.lower(), member.offset_data if plain else None, data)
        except tarfile.TarError as exc:
            raise StageError(f"{shard_url}: not a readable tar shard ({exc})") from exc
    return found


class Member(NamedTuple):
    """An image member of a downloaded shard: extension, data offset (None: compressed), bytes."""

    ext: str
    offset: int | None
    data: bytes


def read_ledger_images(downloaded_url: str, rows: list[dict]) -> dict[tuple[str, str], Member]:
    """``(shard, key) → Member`` for the downloaded ledger rows that succeeded, each shard streamed once."""
    wanted: dict[str, set[str]] = {}
    for r in rows:
        if r["status"] == "success" and r["shard"] and r["key"]:
            wanted.setdefault(r["shard"], set()).add(r["key"])
    images: dict[tuple[str, str], Member] = {}
    for shard in sorted(wanted):
        for key, value in read_members(locate_shard(downloaded_url, shard), wanted[shard]).items():
            images[(shard, key)] = value
    return images


def scan_table(
    ledger: pa.Table, downloaded_url: str, config: FilterConfig, scorer: ClipScorer | None = None
) -> tuple[pa.Table, dict[str, int]]:
    """The SCAN rows of one ledger part, and its counts by reason (``kept``: still eligible).

    With a ``scorer``, every eligible row also gets its CLIP score, from the pixels decoded for
    the checks (scored ``scorer.batch_size`` rows at a time as the scan goes).
    """
    batch = scorer.batches() if scorer is not None else None
    rows = ledger.to_pylist()
    images = read_ledger_images(downloaded_url, rows)
    out = []
    for r in rows:
        row = {
            "uid": r["uid"],
            "url": r["url"],
            "text": r["text"],
            "sha256": r["sha256"],
            "width": r["width"],
            "height": r["height"],
            "shard": r["shard"],
            "key": r["key"],
            "ext": None,
            "offset": None,
            "bytes": None,
            "xxh3": None,
            "reason": None,
            "detail": None,
            "phash": None,
            "clip_score": None,
        }
        out.append(row)
        if r["status"] != "success":
            row["reason"] = f"{DOWNLOAD_FAILED}:{r['error'] or 'unknown'}"
            row["detail"] = r["error_message"]
            continue
        found = images.get((r["shard"], r["key"]))
        if found is None:
            row["reason"] = MISSING_IMAGE
            continue
        ext, row["offset"], data = found
        row["ext"], row["bytes"] = ext, len(data)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        row["xxh3"] = xxh3_128_hexdigest(data)
        ow, oh = r["original_width"], r["original_height"]
        if ow and oh:
            row["reason"] = size_problem(ow, oh, config)
            if row["reason"]:
                continue
        check = check_image(data, config.max_pixels, keep_image=batch is not None)
        if check.reason:
            row["reason"], row["detail"] = check.reason, check.detail
            continue
        row["width"], row["height"] = check.width, check.height
        if not (ow and oh):  # no original size in the ledger: judge the stored one
            row["reason"] = size_problem(check.width, check.height, config)
            if row["reason"]:
                continue
        row["phash"] = hash_hex(check.phash)
        if batch is not None:
            batch.add(len(out) - 1, check.image, r["text"])
    if batch is not None:
        batch.flush()
        for i, score in batch.scores.items():
            out[i]["clip_score"] = score
    counts = Counter(r["reason"] or KEPT for r in out)
    return pa.Table.from_pylist(out, schema=SCAN_SCHEMA), dict(sorted(counts.items()))


def size_problem(width: int, height: int, config: FilterConfig) -> str | None:
    short, long = sorted((width, height))
    if short < config.min_side:
        return TOO_SMALL
    if long / short > config.max_aspect_ratio:
        return BAD_ASPECT
    return None


_LEDGER_COLUMNS = [
    "uid", "url", "text", "status", "error", "error_message", "sha256", "width", "height",
    "original_width", "original_height", "shard", "key",
]  # fmt: skip


class FilterScan:
    """Phase 1 of filter: read, check and hash each image of one ledger part (module docstring)."""

    name = "filter-scan"
    kind = SCAN_KIND
    schema = SCAN_SCHEMA

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        if len(inputs) != 1:
            raise StageError("filter takes exactly one input: a downloaded ledger")
        parts = input_parts(inputs, "downloaded")
        return [Partition(index=i, source=u, params=(inputs[0].url,)) for i, u in enumerate(parts)]

    def resources(self, config: FilterConfig) -> Resources:
        # CLIP scoring loads a model: long-lived workers keep it (one per GPU when there are GPUs);
        # on CPUs it scores with one thread (clipscore.cpu_threads), so one CPU each
        if not config.scores_clip:
            return Resources()
        return Resources(cpus=1.0, gpus=0.0 if config.clip_device == "cpu" else 1.0, model=True)

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        (downloaded_url,) = partition.params
        ledger = read_part(partition.source, columns=_LEDGER_COLUMNS)
        if not config.scores_clip:
            table, counts = scan_table(ledger, downloaded_url, config)
            return PartitionResult(table=table, counts=counts)
        from .clipscore import cpu_threads

        scorer = clip_scorer(config)
        with cpu_threads(scorer.device):
            table, counts = scan_table(ledger, downloaded_url, config, scorer)
        return PartitionResult(table=table, counts=counts, extra={"clip_device": scorer.device})


def clip_scorer(config: FilterConfig) -> ClipScorer:
    """The config's CLIP model, loaded once per process; refuses a checkpoint changed since the build."""
    from .clipscore import load_scorer

    scorer = load_scorer(config.clip_checkpoint, config.clip_model, config.clip_device, config.clip_batch_size)
    if scorer.digest != config.clip_checkpoint_sha256:
        raise StageError(
            f"{config.clip_checkpoint}: the checkpoint changed since the filter's config was built "
            f"(sha256 {scorer.digest[:12]}…, expected {config.clip_checkpoint_sha256[:12]}…)"
        )
    return scorer


# ---------------------------------------------------------------------------------------------
# GROUP: decisions that need every row


def reference_hashes(url: str, max_pixels: int) -> list[int]:
    """The phash of every image in a reference set: webdataset tars if it holds any, else image files."""
    names = storage.listdir(url, recursive=True)
    if not names:
        raise StageError(f"{url}: reference set is empty or missing")
    tars = [n for n in names if n.endswith(".tar")]
    blobs: list[bytes] = []
    if tars:
        for name in tars:
            with (
                storage.open_url(storage.join(url, name), "rb") as fh,
                tarfile.open(fileobj=fh, mode="r|*") as tar,
            ):
                for member in tar:
                    ext = member.name.rsplit(".", 1)[-1].lower()
                    if member.isfile() and ext in IMAGE_EXTENSIONS:
                        blobs.append(tar.extractfile(member).read())
    else:
        blobs = [
            storage.read_bytes(storage.join(url, n)) for n in names if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
        ]
    hashes = []
    for data in blobs:
        check = check_image(data, max_pixels)
        if check.reason is None:
            hashes.append(check.phash)
    return hashes


@dataclass(slots=True)
class Decision:
    reason: str
    duplicate_of: str | None = None


def group_decisions(
    rows: pa.Table,
    references: list[tuple[str, list[int]]],
    config: FilterConfig,
    queries: dict[str, list[str]] | None = None,
    cap: int | None = None,
    seed: int = 0,
) -> dict[str, Decision]:
    """GROUP's decisions for the eligible rows of ``rows`` (uid, sha256, phash; reason null).

    ``references``: ``(task, hashes)`` per reference set. ``queries`` (uid → queries) and ``cap``
    turn on rebalancing. Rows are visited in uid order, so every choice is the smallest uid's.
    """
    eligible = rows.filter(pc.is_null(rows.column("reason"))).sort_by("uid")
    uids = eligible.column("uid").to_pylist()
    shas = eligible.column("sha256").to_pylist()
    hashes = [hash_int(h) for h in eligible.column("phash").to_pylist()]
    decisions: dict[str, Decision] = {}

    ref_index = HashIndex(config.eval_overlap_distance)
    for task, codes in sorted(references):
        for code in codes:
            ref_index.add(code, task)
    rest = []
    for i, uid in enumerate(uids):
        near = ref_index.near(hashes[i]) if references else []
        if near:
            task = min(ref_index.items[p] for p in near)
            decisions[uid] = Decision(f"{EVAL_OVERLAP}:{task}")
        else:
            rest.append(i)

    # Exact duplicates first (cheap, and exact): the smallest uid of each sha256 represents it.
    by_sha: dict[str, int] = {}
    reps = []
    for i in rest:
        first = by_sha.setdefault(shas[i], i)
        if first == i:
            reps.append(i)
        else:
            decisions[uids[i]] = Decision(DUPLICATE, uids[first])
    # Near duplicates: leader clustering in uid order; a row joins the smallest-uid leader near it.
    leaders = HashIndex(config.near_duplicate_distance)
    leader_of: dict[int, int] = {}
    for i in reps:
        near = leaders.near(hashes[i])
        if near:
            leader = leaders.items[near[0]]  # insertion order is uid order
            leader_of[i] = leader
            decisions[uids[i]] = Decision(NEAR_DUPLICATE, uids[leader])
        else:
            leaders.add(hashes[i], i)
    # An exact duplicate of a near duplicate points at the row that is kept.
    for i in rest:
        rep = by_sha[shas[i]]
        if rep != i and rep in leader_of:
            decisions[uids[i]].duplicate_of = uids[leader_of[rep]]

    if queries is not None and cap is not None:
        from .curate import selection_draw

        kept = [uids[i] for i in leaders.items]
        counts = Counter(q for u in kept for q in (queries.get(u) or ()))
        for u in kept:
            qs = queries.get(u) or ()
            if qs and not any(counts[q] <= cap or selection_draw(seed, u, q) < cap / counts[q] for q in qs):
                decisions[u] = Decision(OVER_CAP)
    return decisions


def clip_score_decisions(
    rows: pa.Table, decisions: dict[str, Decision], config: FilterConfig
) -> tuple[dict[str, Decision], float | None]:
    """``low_clip_score`` drops among the eligible rows that ``decisions`` keeps, and the threshold.

    ``rows``: uid, reason and clip_score (SCAN's float32 scores, compared as stored).
    """
    if not config.filters_clip:
        return {}, None
    eligible = rows.filter(pc.is_null(rows.column("reason")))
    kept = [
        (u, s)
        for u, s in zip(eligible.column("uid").to_pylist(), eligible.column("clip_score").to_pylist(), strict=True)
        if u not in decisions
    ]
    unscored = [u for u, s in kept if s is None]
    if unscored:
        raise StageError(f"{len(unscored)} eligible rows have no CLIP score (e.g. {unscored[0]}): rerun the scan")
    from .clipscore import score_threshold

    threshold = score_threshold((s for _, s in kept), config.min_clip_score, config.keep_top_fraction)
    if threshold is None:
        return {}, None
    return {u: Decision(LOW_CLIP_SCORE) for u, s in kept if s < threshold}, threshold


def _scan_columns(url: str, clip: bool) -> pa.Table:
    columns = ["uid", "sha256", "phash", "reason"] + (["clip_score"] if clip else [])
    return open_manifest(url, expect_kind=SCAN_KIND).table(columns)


class FilterGroup:
    """Phase 2 of filter: one partition over every scan part (module docstring)."""

    name = "filter-group"
    kind = GROUP_KIND
    schema = GROUP_SCHEMA

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        if len(inputs) != 1:
            raise StageError("filter's group phase takes exactly one input: the scan phase's output")
        input_parts(inputs, SCAN_KIND)
        curated = None
        if config.rebalance:
            ref = (
                ManifestRef(url=storage.normalize(config.curated), kind="curated")
                if config.curated
                else find_upstream(inputs[0].url, "curated")
            )
            if ref is None:
                raise StageError(
                    f"--rebalance needs the curated manifest: none found up the lineage of {inputs[0].url}; "
                    "name it with --curated"
                )
            curated = ref.url
        return [Partition(index=0, source=inputs[0].url, params=(curated,))]

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        (curated,) = partition.params
        rows = _scan_columns(partition.source, config.filters_clip)
        references = [(task, reference_hashes(url, config.max_pixels)) for task, url in config.reference_sets()]
        queries, cap, seed, extra = None, None, 0, {}
        if curated:
            queries, cap, seed = _rebalance_inputs(curated, config)
            extra = {"curated": curated, "per_query_cap": cap, "seed": seed}
        decisions = group_decisions(rows, references, config, queries, cap, seed)
        low_score, threshold = clip_score_decisions(rows, decisions, config)
        decisions.update(low_score)
        if config.filters_clip:
            extra["clip_threshold"] = threshold
        ordered = sorted(decisions.items())
        table = pa.table(
            {
                "uid": [u for u, _ in ordered],
                "reason": [d.reason for _, d in ordered],
                "duplicate_of": [d.duplicate_of for _, d in ordered],
            }
        )
        counts = Counter(d.reason for d in decisions.values())
        eligible = rows.column("reason").null_count
        counts[KEPT] = eligible - len(decisions)
        overlap = {task: counts.get(f"{EVAL_OVERLAP}:{task}", 0) for task, _ in references}
        extra["reference_images"] = {task: len(codes) for task, codes in references}
        return PartitionResult(
            table=table, counts=dict(sorted(counts.items())), extra=extra, tallies={EVAL_OVERLAP: overlap}
        )


def _rebalance_inputs(curated: str, config: FilterConfig) -> tuple[dict[str, list[str]], int, int]:
    rec = read_run_record(curated)
    cur_config = rec.config if rec is not None else {}
    cap = config.per_query_cap if config.per_query_cap is not None else cur_config.get("per_query_cap")
    seed = config.seed if config.seed is not None else cur_config.get("seed", 0)
    if cap is None:
        raise StageError(f"{curated}: its run record names no per_query_cap; give --per-query-cap")
    table = open_manifest(curated, expect_kind="curated").table(["uid", "queries", "keep"])
    table = table.filter(table.column("keep"))
    return (
        dict(zip(table.column("uid").to_pylist(), table.column("queries").to_pylist(), strict=True)),
        int(cap),
        int(seed),
    )


# ---------------------------------------------------------------------------------------------
# DECIDE: write the FILTERED rows


@functools.lru_cache(maxsize=4)
def _decisions(group_url: str, digest: str | None) -> dict[str, tuple[str, str | None]]:
    # Once per worker process: every DECIDE partition joins against the same decisions.
    t = open_manifest(group_url, expect_kind=GROUP_KIND).table()
    return {
        u: (r, d)
        for u, r, d in zip(
            t.column("uid").to_pylist(),
            t.column("reason").to_pylist(),
            t.column("duplicate_of").to_pylist(),
            strict=True,
        )
    }


def decide_table(scan: pa.Table, decisions: dict[str, tuple[str, str | None]]) -> tuple[pa.Table, Counter]:
    reasons = scan.column("reason").to_pylist()
    dup_of: list[str | None] = [None] * len(reasons)
    for i, uid in enumerate(scan.column("uid").to_pylist()):
        if reasons[i] is None and uid in decisions:
            reasons[i], dup_of[i] = decisions[uid]
    keep = [r is None for r in reasons]
    table = pa.table(
        {
            "uid": scan.column("uid"),
            "url": scan.column("url"),
            "text": scan.column("text"),
            "sha256": scan.column("sha256"),
            "width": scan.column("width"),
            "height": scan.column("height"),
            "shard": scan.column("shard"),
            "key": scan.column("key"),
            "ext": scan.column("ext"),
            "offset": scan.column("offset"),
            "bytes": scan.column("bytes"),
            "xxh3": scan.column("xxh3"),
            "keep": pa.array(keep, pa.bool_()),
            "reason": pa.array(reasons, pa.string()),
            "phash": scan.column("phash"),
            "duplicate_of": pa.array(dup_of, pa.string()),
            "clip_score": scan.column("clip_score"),
        }
    )
    return table, Counter(r or KEPT for r in reasons)


def score_tallies(table: pa.Table) -> dict[str, dict[str, int]]:
    """Histograms of the CLIP scores of one FILTERED part: all scored rows, and the kept ones."""
    scores = table.column("clip_score")
    if scores.null_count == len(scores):
        return {}
    from .clipscore import histogram

    kept = table.filter(table.column("keep")).column("clip_score")
    return {"clip_score": histogram(scores.to_pylist()), "clip_score_kept": histogram(kept.to_pylist())}


class FilterDecide:
    """Phase 3 of filter: every ledger row with its keep/reason (module docstring)."""

    name = "filter"
    kind = "filtered"

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        if len(inputs) != 1 or (inputs[0].kind not in (None, GROUP_KIND)):
            raise StageError("filter's decide phase takes exactly one input: the group phase's output")
        group = inputs[0]
        record = read_run_record(group.url)
        if record is None or len(record.inputs) != 1:
            raise StageError(f"{group.url}: not a finished group phase of filter (no _run.json)")
        # The scan parts are found through GROUP's run record, so lineage stays one chain.
        parts = input_parts(record.inputs, SCAN_KIND)
        return [Partition(index=i, source=u, params=(group.url, group.digest)) for i, u in enumerate(parts)]

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        group_url, digest = partition.params
        # conform: a scan part from before a column was added (a run resumed across an upgrade)
        scan = conform(read_part(partition.source), SCAN_SCHEMA)
        table, counts = decide_table(scan, _decisions(group_url, digest))
        overlap = Counter()
        for reason, n in counts.items():
            if reason.startswith(EVAL_OVERLAP + ":"):
                overlap[reason.split(":", 1)[1]] += n
        tallies = {EVAL_OVERLAP: dict(overlap)} if overlap else {}
        tallies.update(score_tallies(table))
        return PartitionResult(table=table, counts=dict(sorted(counts.items())), tallies=tallies)


SCAN = FilterScan()
GROUP = FilterGroup()
DECIDE = FilterDecide()
# (stage, subfolder of OUT): run in order, each with the previous phase's finished ref as input.
FILTER_PHASES: list[tuple[Any, str]] = [(SCAN, "_scan"), (GROUP, "_group"), (DECIDE, "")]


def filter_summary(counts: dict[str, int]) -> str:
    """Counts by reason, largest first, as ``wit filter`` prints them."""
    total = sum(counts.values())
    width = max((len(f"{v:,}") for v in counts.values()), default=1)
    lines = [f"{total:,} ledger rows, {counts.get(KEPT, 0):,} kept"]
    lines += [f"  {v:>{width},}  {k}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "\n".join(lines)
