"""``wit filter``: image-level decisions on a download ledger, one FILTERED row per ledger row.

Its phases run in order, each reading the previous one's finished output (``FILTER_PHASES``)::

    downloaded ──SCAN──▶ _scan ──EXACT──▶ _exact ──NODES──▶ _nodes ──EDGES──▶ _edges
    (ledger parts +      per part:        per sha256       per phash        per key bucket:
     shards)             sha256, phash,   bucket: eval     bucket: the      node pairs within
                         size, reason     overlap, exact   distinct         the distance
                                          duplicates       hashes, keyed
      ──STAR──▶ _star/r000, r001… ──COMPONENTS──▶ _components ──LINKS──▶ _links
      per phash bucket, in rounds    per phash bucket: nodes     per component bucket:
      until every component is a     and edges to their          leader clustering
      star: connected components     component's bucket
      ──RESOLVE──▶ _resolve ──QUERIES──▶ _queries ──JOIN──▶ _join ──CAPS──▶ _caps
      per phash bucket:     --rebalance: per     per uid bucket:   per query bucket:
      every row's           curated part, its    kept rows and     the queries over
      duplicate decision    queries by uid       their queries     the cap
      ──OVERCAP──▶ _overcap ──THRESHOLD──▶ _threshold ──GROUP──▶ _group ──DECIDE──▶ OUT (filtered)
      per uid bucket:         --keep-top: per uid     one partition,   per scan part: every
      over_cap; score         bucket, the quantile    no rows: the     ledger row with keep/
      histogram (high bits)   bin's low bits          CLIP threshold   reason/duplicate_of

SCAN (one partition per ledger part) reads each successful row's image from its tar shard and
names the first problem, in this order: ``download_failed:<error>`` (the ledger's failed rows pass
through, so every ledger row has a FILTERED row), ``missing_image`` (the ledger points at a
member the shard lacks), ``too_small`` / ``bad_aspect`` on the *original* size (img2dataset
upsamples an 8×8 image to its target size and calls it a success), then ``too_many_pixels`` (the
header claims more than ``max_pixels``: refused before decoding) and ``undecodable``. Each image
is decoded once (:mod:`.imaging`); a row with no reason gets its 64-bit perceptual hash and, with
``--clip-score``, its CLIP score (:mod:`.clipscore`: the cosine similarity of the image and caption
embeddings, in [-1, 1]) from the same decoded pixels, batched, on the GPU when there is one.

GROUP (the phases from EXACT to GROUP: duplicates cross partitions) drops, among the rows with
no reason, in this order and with ``duplicate_of`` naming the kept row:

- ``eval_overlap:<task>``: within ``eval_overlap_distance`` bits of an image of a reference set
  (``reference_images``: CLIP_benchmark webdataset folders or image folders), counted per task
  as the CLIP paper's section 5 does;
- ``duplicate``: the same sha256 as a row with a smaller uid;
- ``near_duplicate``: within ``near_duplicate_distance`` bits of a kept row with a smaller uid
  (leader clustering in uid order, so the representative is the smallest uid of its group and
  the choice depends on nothing but the rows);
- ``over_cap`` (``--rebalance``): MetaCLIP's per-query cap re-applied to the rows still kept,
  with curate's rule :func:`wit.ingest.queries.selection_draw`. With curate's own cap and seed
  nothing can drop (link rot only lowers counts, so every draw that passed still passes); a
  lower cap gives the subset curate would have kept with that cap.
- ``low_clip_score``: among the rows still kept, a CLIP score below ``min_clip_score``, or below
  the ``1 - keep_top_fraction`` quantile of their scores (:func:`.clipscore.score_threshold`:
  global, and a function of the scores only, so any partitioning gives the same rows). The
  threshold used is in the group phase's run record (``extra.clip_threshold``).

No phase holds the rows of the whole dataset (:mod:`wit.manifests.buckets`): SCAN splits its eligible rows
by sha256 into ``B`` buckets (``--buckets``, default one per 500,000 ledger rows), EXACT decides
evaluation overlap (:func:`.neardup.matches` against the reference hashes) and exact duplicates
per sha256 bucket and passes the rest on by phash bucket. NODES keeps one *node* per distinct
phash (rows with one hash always share the decision of the smallest uid among them, so a
placeholder image on millions of pages is one node) and keys each node once per block
combination of the layout :func:`.neardup.choose_layout` picks for the node count; EDGES compares
the nodes sharing a key, per key bucket, and keeps the pairs within ``near_duplicate_distance``.
STAR finds the connected components of that graph in rounds of large-star and small-star
(:func:`.neardup.star_round`, one pass over the edges per round, grouped by node bucket; a chain
of ``n`` hashes needs O(log² n) rounds, the run stops at the first round that finds only stars),
COMPONENTS sends each linked node (with its uid) and each edge to the bucket of its component,
and LINKS runs the leader clustering there (:func:`.neardup.leaders`), component bucket by
component bucket: a node's decision depends only on its component, so this is exactly one pass
over the whole graph. No task holds more than its bucket's edges (a single component of near
duplicates of *distinct* hashes is one task's: identical hashes are already one node).
RESOLVE turns a row's sha256 representative and its node's leader into ``duplicate`` /
``near_duplicate`` and the uid kept. The decisions are exactly those of the single-process
reference :func:`group_decisions` (tested on planted chains, duplicate groups, evaluation
overlaps and a skewed band, for several bucket and worker counts).
``--rebalance`` and the CLIP-score threshold need the rows still kept: RESOLVE sends them (uid,
scan part, row, score) on by uid bucket. QUERIES splits the curated queries by uid bucket, JOIN
joins the two per bucket and counts the kept rows of each query, CAPS sums those counts per query
bucket (the queries over the cap: a table of queries, not rows), OVERCAP applies MetaCLIP's rule
per uid bucket and histograms the scores still kept by the high 16 bits of their order key, and
THRESHOLD histograms the low 16 bits within the bin that holds the ``--keep-top`` quantile: GROUP
reads the exact quantile off the merged histograms, and DECIDE drops the kept rows below it.
Phases that are not asked for run one empty partition.

DECIDE (one partition per scan part) reads the drops of its part (one small read per bucket file:
the phases split their decisions by scan part) and writes FILTERED rows, with
``clip_score`` for every scored row; its run record tallies the scores of all scored rows
(``clip_score``) and of the kept ones (``clip_score_kept``) in buckets of 0.05 keyed by lower edge.

The curated manifest (queries, for ``--rebalance``) is ``config.curated`` when given, otherwise
the nearest ``curated`` output up the run records' inputs
(:func:`wit.manifests.lineage.find_upstream`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import posixpath
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from xxhash import xxh3_128_hexdigest

from wit.manifests import buckets, storage
from wit.manifests.buckets import ROWS_PER_BUCKET
from wit.manifests.buckets import option as buckets_option  # the config field is `buckets`
from wit.manifests.lineage import find_upstream
from wit.manifests.manifest import ManifestRef, open_manifest, part_name, read_part
from wit.manifests.manifest import shard_url as locate_shard
from wit.manifests.options import Option, check_options, split_ref
from wit.manifests.runrecord import read_run_record
from wit.manifests.schemas import conform, with_kind
from wit.manifests.stage import Partition, PartitionResult, Resources, StageError, input_parts
from wit.manifests.tars import IMAGE_EXTENSIONS, TarError, read_files

from . import neardup
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
    buckets: int | None = None  # of GROUP's bucketed steps; None: one per ROWS_PER_BUCKET ledger rows

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
        buckets_option("the duplicate search", "ledger rows"),
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
        buckets.bucket_count(0, self.buckets)  # validates --buckets

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
            for file in read_files(fh):
                key, dot, ext = posixpath.basename(file.name).partition(".")
                if not dot or key not in keys or ext.lower() not in IMAGE_EXTENSIONS or key in found:
                    continue
                found[key] = Member(ext.lower(), file.offset, file.read())
        except TarError as exc:
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
        rec = read_run_record(inputs[0].url)
        plan = group_plan(rec.rows if rec is not None else 0, config)
        return [Partition(index=i, source=u, params=(inputs[0].url, plan)) for i, u in enumerate(parts)]

    def resources(self, config: FilterConfig) -> Resources:
        # CLIP scoring loads a model: long-lived workers keep it (one per GPU when there are GPUs);
        # on CPUs it scores with one thread (clipscore.cpu_threads), so one CPU each
        if not config.scores_clip:
            return Resources()
        return Resources(cpus=1.0, gpus=0.0 if config.clip_device == "cpu" else 1.0, model=True)

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        downloaded_url, plan = partition.params
        ledger = read_part(partition.source, columns=_LEDGER_COLUMNS)
        extra: dict[str, Any] = {}
        if not config.scores_clip:
            table, counts = scan_table(ledger, downloaded_url, config)
        else:
            from .clipscore import cpu_threads

            scorer = clip_scorer(config)
            with cpu_threads(scorer.device):
                table, counts = scan_table(ledger, downloaded_url, config, scorer)
            extra["clip_device"] = scorer.device
        return scan_result(table, counts, partition.index, plan, out, extra)


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """How GROUP splits its work, fixed from the ledger's row count (and ``--buckets``)."""

    buckets: int  # sha256 buckets of EXACT
    node_buckets: int  # phash buckets of NODES and RESOLVE
    blocks: int  # the near-duplicate layout (:class:`.neardup.Layout`)


NODE_RECORDS_PER_BUCKET = 15 * ROWS_PER_BUCKET  # keys a NODES task emits: 15 per node at most sizes


def group_plan(rows: int, config: FilterConfig) -> GroupPlan:
    """The buckets and layout of GROUP for a ledger of ``rows`` rows (an upper bound of the nodes).

    A wider layout emits more keys per node, so NODES gets more buckets: a task's keys, and with
    them its memory, stay the same at any size.
    """
    layout = neardup.choose_layout(config.near_duplicate_distance, rows)
    keys = len(layout.masks) if config.near_duplicate_distance else 1
    nodes = buckets.bucket_count(rows * keys, config.buckets, NODE_RECORDS_PER_BUCKET)
    return GroupPlan(buckets.bucket_count(rows, config.buckets), nodes, layout.blocks)


def scan_result(
    table: pa.Table | None,
    counts: dict,
    index: int,
    plan: GroupPlan,
    out: str,
    extra: dict,
    keys: pa.Table | None = None,
) -> PartitionResult:
    """A scan partition's result: its rows, and its eligible rows (``keys``: :func:`scan_keys` of
    them unless given) split by sha256 into ``plan.buckets`` buckets for GROUP's first step."""
    keys = scan_keys(table) if keys is None else keys
    count = plan.buckets
    files = [buckets.write(out, index, keys, sha_buckets(keys.column("sha256"), count), count, KEYS_TABLE)]
    facts = {"buckets": count, "node_buckets": plan.node_buckets, "blocks": plan.blocks}
    return PartitionResult(table=table, counts=counts, files=files, extra=extra | facts)


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
            with storage.open_url(storage.join(url, name), "rb") as fh:
                for file in read_files(fh):
                    if file.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                        blobs.append(file.read())
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
    """GROUP's decisions for the eligible rows of ``rows`` (uid, sha256, phash; reason null), in one
    process: the reference the bucketed phases are tested against (it holds every row, and its
    near-duplicate search grows with the square of the rows: for tests and small data only).

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
        decisions.update(rebalance_decisions([uids[i] for i in leaders.items], queries, cap, seed))
    return decisions


def _scan_columns(url: str, clip: bool) -> pa.Table:
    columns = ["uid", "sha256", "phash", "reason"] + (["clip_score"] if clip else [])
    return open_manifest(url, expect_kind=SCAN_KIND).table(columns)


# ---------------------------------------------------------------------------------------------
# GROUP, bucketed: EXACT (sha256 buckets) → NODES (phash buckets) → EDGES (key buckets) → LINKS
# (the near-duplicate graph) → RESOLVE (phash buckets) → GROUP (rebalance, CLIP threshold)

KEYS_TABLE = "keys"  # SCAN → EXACT: eligible rows by sha256 bucket
MEMBERS_TABLE = "members"  # EXACT → NODES, RESOLVE: rows left after eval overlap, by phash bucket
RECORDS_TABLE = "records"  # NODES → EDGES: one record per node and key combination, by key bucket
ARCS_TABLE = "arcs"  # EDGES → STAR → STAR … → COMPONENTS: the graph's arcs, by node (phash) bucket
COMPONENT_NODES_TABLE = "component_nodes"  # COMPONENTS → LINKS: linked nodes, by component bucket
COMPONENT_EDGES_TABLE = "component_edges"  # COMPONENTS → LINKS: edges, by component bucket
LEADERS_TABLE = "leaders"  # LINKS → RESOLVE: the nodes that are near duplicates, by phash bucket
KEPT_TABLE = "kept"  # RESOLVE → JOIN, OVERCAP: the rows still kept, by uid bucket (--rebalance, CLIP)
QUERIES_TABLE = "queries"  # QUERIES → JOIN: the curated queries of the curated kept rows, by uid bucket
COUNTS_TABLE = "counts"  # JOIN → CAPS: kept rows per query, by query bucket
DECISIONS_TABLE = "decisions"  # EXACT, RESOLVE, GROUP → DECIDE: drops, by scan part
EXACT_KIND, NODES_KIND, EDGES_KIND, STAR_KIND, COMPONENTS_KIND, LINKS_KIND, RESOLVE_KIND = (
    "filter_exact", "filter_nodes", "filter_edges", "filter_star", "filter_components", "filter_links",
    "filter_resolve",
)  # fmt: skip
QUERIES_KIND, JOIN_KIND, CAPS_KIND, OVERCAP_KIND, THRESHOLD_KIND = (
    "filter_queries", "filter_join", "filter_caps", "filter_overcap", "filter_threshold",
)  # fmt: skip
EDGE_ROWS_PER_BUCKET = 4 * ROWS_PER_BUCKET  # records are 9 bytes: a key bucket holds more of them

KEYS_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("phash", pa.uint64()),
        pa.field("row", pa.int32()),
        pa.field("clip_score", pa.float32()),
    ]
)
MEMBERS_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string()),
        pa.field("phash", pa.uint64()),
        pa.field("part", pa.int32()),
        pa.field("row", pa.int32()),
        pa.field("rep", pa.string()),  # null: the smallest uid of its sha256; else that uid
        pa.field("clip_score", pa.float32()),
    ]
)
RECORDS_SCHEMA = pa.schema([pa.field("combo", pa.uint8()), pa.field("phash", pa.uint64())])
LEADERS_SCHEMA = pa.schema([pa.field("phash", pa.uint64()), pa.field("leader", pa.string())])
DECISIONS_SCHEMA = pa.schema(
    [pa.field("row", pa.int32()), pa.field("reason", pa.string()), pa.field("duplicate_of", pa.string())]
)
NODES_SCHEMA = with_kind(
    pa.schema([pa.field("phash", pa.uint64(), nullable=False), pa.field("uid", pa.string(), nullable=False)]),
    NODES_KIND,
)
ARCS_SCHEMA = pa.schema([pa.field("u", pa.uint64()), pa.field("v", pa.uint64())])
KEPT_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("part", pa.int32(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("clip_score", pa.float32()),
    ]
)
QUERIES_SCHEMA = pa.schema([pa.field("uid", pa.string()), pa.field("queries", pa.list_(pa.string()))])
JOIN_SCHEMA = with_kind(pa.schema(list(KEPT_SCHEMA) + [pa.field("queries", pa.list_(pa.string()))]), JOIN_KIND)
COUNTS_SCHEMA = pa.schema([pa.field("query", pa.string()), pa.field("count", pa.int64())])
CAPS_SCHEMA = with_kind(COUNTS_SCHEMA, CAPS_KIND)


def scan_keys(table: pa.Table) -> pa.Table:
    """What EXACT needs of a scan part's eligible rows (``KEYS_SCHEMA``), with their row numbers."""
    rows = np.flatnonzero(pc.is_null(table.column("reason")).to_numpy(zero_copy_only=False))
    take = pa.array(rows, pa.int64())
    hexes = table.column("phash").take(take).to_pylist()
    return pa.table(
        {
            "uid": table.column("uid").take(take),
            "sha256": table.column("sha256").take(take),
            "phash": pa.array([hash_int(h) for h in hexes], pa.uint64()),
            "row": pa.array(rows.astype(np.int32)),
            "clip_score": table.column("clip_score").take(take),
        },
        schema=KEYS_SCHEMA,
    )


def sha_buckets(sha256: pa.Array | pa.ChunkedArray, count: int) -> np.ndarray:
    """The EXACT bucket of each sha256 (its first 64 bits): equal images share a bucket."""
    keys = np.array([int(s[:16], 16) for s in sha256.to_pylist()], dtype=np.uint64)
    return buckets.of_keys(keys, count)


@dataclass(frozen=True, slots=True)
class Phases:
    """Where the phases of one filter run are: found by following the run records back to SCAN."""

    urls: dict[str, str]  # kind → finished output URL
    extra: dict[str, dict]  # kind → its run record's extra

    @classmethod
    def of(cls, url: str) -> Phases:
        return _phases(storage.normalize(url))

    def scan_parts(self) -> int:
        return self.extra[SCAN_KIND]["partitions"]

    def buckets(self) -> int:
        """EXACT's sha256 buckets."""
        return self.extra[SCAN_KIND]["buckets"][0]

    def node_buckets(self) -> int:
        """The phash buckets of NODES and RESOLVE."""
        return self.extra[SCAN_KIND]["node_buckets"][0]

    def files(self, kind: str, table: str) -> list[str]:
        """The bucket files ``table`` written by the partitions of phase ``kind``, in order."""
        return buckets.file_urls(self.urls[kind], table, self.extra[kind]["partitions"])


def _phases(url: str) -> Phases:
    urls: dict[str, str] = {}
    extra: dict[str, dict] = {}
    here = url
    while True:
        rec = read_run_record(here)
        if rec is None:
            raise StageError(f"{here}: not a finished phase of filter (no _run.json)")
        kind = rec.output.kind
        # the latest of a repeating phase's rounds (met first, walking back)
        urls.setdefault(kind, here)
        extra.setdefault(kind, dict(rec.extra) | {"partitions": rec.partitions})
        if kind == SCAN_KIND or len(rec.inputs) != 1:
            break
        here = storage.normalize(rec.inputs[0].url)
    if SCAN_KIND not in urls:
        raise StageError(f"{url}: no scan phase of filter up its run records")
    return Phases(urls, extra)


def _one_input(inputs: list[ManifestRef], kind: str, phase: str) -> ManifestRef:
    if len(inputs) != 1 or inputs[0].kind not in (None, kind):
        raise StageError(f"filter's {phase} phase takes exactly one input: a {kind} output")
    return inputs[0]


def _bucket_partitions(ref: ManifestRef, count: int) -> list[Partition]:
    """One partition per bucket, reading the phase before (``ref``)."""
    return [Partition(index=b, source=ref.url, params=(b,)) for b in range(count)]


def node_table(members: pa.Table) -> pa.Table:
    """The nodes among ``members``: each distinct phash with the smallest uid of the
    representatives having it (sorted by phash)."""
    reps = members.filter(pc.is_null(members.column("rep"))).select(["phash", "uid"])
    reps = reps.sort_by([("phash", "ascending"), ("uid", "ascending")])
    ph = reps.column("phash").to_numpy()
    first = np.ones(len(ph), dtype=bool)
    first[1:] = ph[1:] != ph[:-1]
    return reps.filter(pa.array(first))


@functools.lru_cache(maxsize=4)
def _reference_table(sets: tuple[tuple[str, str], ...], max_pixels: int) -> tuple[tuple[str, int], ...]:
    # Once per process: every EXACT bucket checks its rows against the same evaluation images.
    return tuple((task, code) for task, url in sorted(sets) for code in reference_hashes(url, max_pixels))


def eval_overlaps(phashes: np.ndarray, config: FilterConfig) -> list[str | None]:
    """``eval_overlap:<task>`` for each hash within the distance of a reference image (the task
    first in name order when several are), else None."""
    out: list[str | None] = [None] * len(phashes)
    refs = _reference_table(tuple(config.reference_sets()), config.max_pixels)
    if not refs or not len(phashes):
        return out
    tasks = [t for t, _ in refs]
    codes = np.array([c for _, c in refs], dtype=np.uint64)
    for q, s in zip(*neardup.matches(phashes, codes, config.eval_overlap_distance), strict=True):
        task = tasks[s]
        if out[q] is None or task < out[q]:
            out[q] = task
    return [f"{EVAL_OVERLAP}:{t}" if t is not None else None for t in out]


class FilterExact:
    """GROUP, part 1 (one partition per sha256 bucket): evaluation overlap, exact duplicates."""

    name = "filter-exact"
    kind = EXACT_KIND

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        ref = _one_input(inputs, SCAN_KIND, "exact")
        return _bucket_partitions(ref, Phases.of(ref.url).buckets())

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        (b,) = partition.params
        phases = Phases.of(partition.source)
        count, parts = phases.node_buckets(), phases.scan_parts()
        rows = buckets.read_all(buckets.file_urls(partition.source, KEYS_TABLE, parts), b, KEYS_SCHEMA, "part")
        phash = rows.column("phash").to_numpy()
        overlap = eval_overlaps(phash, config)
        hit = np.array([r is not None for r in overlap], dtype=bool)
        drops = rows.filter(pa.array(hit)).select(["part", "row"])
        drop_reasons = [r for r in overlap if r is not None]
        # Exact duplicates among the rest: the smallest uid of a sha256 represents it (then the
        # earliest part and row, so even identical rows have one representative).
        rest = rows.filter(pa.array(~hit)).sort_by(
            [("sha256", "ascending"), ("uid", "ascending"), ("part", "ascending"), ("row", "ascending")]
        )
        sha = rest.column("sha256")
        first = np.ones(rest.num_rows, dtype=bool)
        if rest.num_rows > 1:
            first[1:] = pc.not_equal(sha.slice(1), sha.slice(0, rest.num_rows - 1)).to_numpy(zero_copy_only=False)
        run_start = np.maximum.accumulate(np.where(first, np.arange(rest.num_rows), 0))
        uids = rest.column("uid")
        rep = pc.if_else(pa.array(first), pa.nulls(rest.num_rows, pa.string()), uids.take(pa.array(run_start)))
        members = pa.table(
            {
                "uid": uids,
                # the representative's hash (equal bytes hash equally; this keeps a group together
                # even if a scan from another version hashed a copy differently)
                "phash": rest.column("phash").take(pa.array(run_start)),
                "part": rest.column("part"),
                "row": rest.column("row"),
                "rep": rep,
                "clip_score": rest.column("clip_score"),
            },
            schema=MEMBERS_SCHEMA,
        )
        decisions = pa.table(
            {
                "row": drops.column("row"),
                "reason": pa.array(drop_reasons, pa.string()),
                "duplicate_of": pa.nulls(drops.num_rows, pa.string()),
            },
            schema=DECISIONS_SCHEMA,
        )
        member_buckets = buckets.of_keys(members.column("phash").to_numpy(), count)
        files = [
            buckets.write(out, b, members, member_buckets, count, MEMBERS_TABLE),
            buckets.write(out, b, decisions, drops.column("part").to_numpy(), parts, DECISIONS_TABLE),
        ]
        counts = Counter(drop_reasons)
        counts[DUPLICATE] = int((~first).sum())
        counts[KEPT] = int(first.sum())
        return PartitionResult(counts=dict(sorted(counts.items())), files=files)


def _combo_salts(count: int) -> np.ndarray:
    return buckets.mix64(np.arange(1, count + 1, dtype=np.uint64))


class FilterNodes:
    """GROUP, part 2 (one partition per phash bucket): the distinct perceptual hashes.

    Rows with the same phash always get the decision of the smallest uid among them (if it
    leads, they join it; if it joins a leader, so do they), so only distinct hashes take part
    in the near-duplicate search: a placeholder image shared by millions of rows is one node.
    Each node goes out once per key combination of the layout (:mod:`.neardup`), to the bucket
    of that key.
    """

    name = "filter-nodes"
    kind = NODES_KIND
    schema = NODES_SCHEMA

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        ref = _one_input(inputs, EXACT_KIND, "nodes")
        phases = Phases.of(ref.url)
        rec = read_run_record(ref.url)
        reps = int(rec.counts.get(KEPT, 0)) if rec is not None else 0
        blocks = phases.extra[SCAN_KIND]["blocks"][0]
        keys = reps * len(neardup.Layout(config.near_duplicate_distance, blocks).masks)
        edge_buckets = buckets.bucket_count(
            keys if config.near_duplicate_distance else 0, config.buckets, EDGE_ROWS_PER_BUCKET
        )
        return [
            Partition(index=b, source=ref.url, params=(b, blocks, edge_buckets)) for b in range(phases.node_buckets())
        ]

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        b, blocks, edge_buckets = partition.params
        layout = neardup.Layout(config.near_duplicate_distance, blocks)
        phases = Phases.of(partition.source)
        members = buckets.read_all(phases.files(EXACT_KIND, MEMBERS_TABLE), b, MEMBERS_SCHEMA)
        nodes = node_table(members)
        node_hashes = nodes.column("phash").to_numpy()
        if config.near_duplicate_distance:
            combo, hashes = neardup.keyed(node_hashes, layout)
        else:  # identical hashes only: the nodes are already distinct, nothing to search
            combo, hashes = np.empty(0, np.uint8), np.empty(0, np.uint64)
        keys = neardup.record_keys(combo, hashes, layout) ^ _combo_salts(len(layout.masks))[combo]
        records = pa.table({"combo": pa.array(combo), "phash": pa.array(hashes)}, schema=RECORDS_SCHEMA)
        files = [buckets.write(out, b, records, buckets.of_keys(keys, edge_buckets), edge_buckets, RECORDS_TABLE)]
        return PartitionResult(
            table=nodes,
            counts={"nodes": nodes.num_rows, "records": records.num_rows},
            files=files,
            extra={"layout": layout.describe(), "blocks": blocks, "edge_buckets": edge_buckets},
        )


class FilterEdges:
    """GROUP, part 3 (one partition per key bucket): the node pairs within the distance, sent on as
    arcs (both directions) by the node bucket of their first end, for the component rounds."""

    name = "filter-edges"
    kind = EDGES_KIND

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        ref = _one_input(inputs, NODES_KIND, "edges")
        return _bucket_partitions(ref, Phases.of(ref.url).extra[NODES_KIND]["edge_buckets"][0])

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        (b,) = partition.params
        phases = Phases.of(partition.source)
        layout = neardup.Layout(config.near_duplicate_distance, phases.extra[NODES_KIND]["blocks"][0])
        records = buckets.read_all(phases.files(NODES_KIND, RECORDS_TABLE), b, RECORDS_SCHEMA)
        # every pair comes out once, in the bucket of the first key the two hashes share
        found = list(
            neardup.pairs_sharing_keys(records.column("combo").to_numpy(), records.column("phash").to_numpy(), layout)
        )
        a = np.concatenate([p for p, _ in found]) if found else np.empty(0, np.uint64)
        c = np.concatenate([q for _, q in found]) if found else np.empty(0, np.uint64)
        files = [_write_arcs(out, b, a, c, phases.node_buckets())]
        return PartitionResult(counts={"records": records.num_rows, "edges": len(a)}, files=files)


def _write_arcs(out: str, index: int, x: np.ndarray, y: np.ndarray, count: int):
    """The edges ``(x, y)`` as arcs both ways (``ARCS_TABLE``), each in the node bucket of its first end."""
    u, v = np.concatenate([x, y]), np.concatenate([y, x])
    arcs = pa.table({"u": pa.array(u, pa.uint64()), "v": pa.array(v, pa.uint64())}, schema=ARCS_SCHEMA)
    return buckets.write(out, index, arcs, buckets.of_keys(u, count), count, ARCS_TABLE)


class FilterStar:
    """GROUP, part 4, in rounds (one partition per phash bucket): the connected components of the
    near-duplicate graph, by large-star and small-star rounds (:func:`.neardup.star_round`).

    A round reads the arcs of its bucket's nodes and sends each edge it makes to the buckets of
    both ends; it repeats (``_star/r000``, ``r001``…) until a round finds every node a centre or a
    leaf. A task holds its bucket's arcs only: at most the edges of its nodes, never the rows.
    """

    name = "filter-star"
    kind = STAR_KIND
    repeats = True

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        rec = read_run_record(inputs[0].url) if len(inputs) == 1 else None
        if rec is None or rec.output.kind not in (EDGES_KIND, STAR_KIND):
            raise StageError("filter's star phase takes exactly one input: a filter_edges or filter_star output")
        ref = inputs[0]
        step = 0 if rec.output.kind == EDGES_KIND else rec.extra["round"][0] + 1
        count = Phases.of(ref.url).node_buckets()
        return [Partition(index=b, source=ref.url, params=(b, step, rec.partitions, count)) for b in range(count)]

    def another_round(self, url: str) -> bool:
        rec = read_run_record(url)
        return rec is not None and rec.counts.get("open_nodes", 0) > 0

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        b, step, parts, count = partition.params
        arcs = buckets.read_all(buckets.file_urls(partition.source, ARCS_TABLE, parts), b, ARCS_SCHEMA)
        u, v = arcs.column("u").to_numpy(), arcs.column("v").to_numpy()
        del arcs
        x, y, open_ = neardup.star_round(u, v, large=step % 2 == 0)
        files = [_write_arcs(out, b, x, y, count)]
        return PartitionResult(
            counts={"arcs_in": len(u), "edges_out": len(x), "open_nodes": open_},
            files=files,
            extra={"round": step, "step": "large star" if step % 2 == 0 else "small star"},
        )


class FilterComponents:
    """GROUP, part 5 (one partition per phash bucket): each linked node, and each edge of the
    near-duplicate graph, sent to the bucket of its connected component (its star's centre), with
    the node's uid from NODES: what LINKS needs, one component bucket at a time."""

    name = "filter-components"
    kind = COMPONENTS_KIND

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        ref = _one_input(inputs, STAR_KIND, "components")
        phases = Phases.of(ref.url)
        edges = read_run_record(phases.urls[EDGES_KIND]).counts.get("edges", 0)
        rec = read_run_record(ref.url)
        # a component bucket holds its nodes (at most one per edge end) and edges
        count = buckets.bucket_count(3 * edges, config.buckets)
        return [
            Partition(index=b, source=ref.url, params=(b, rec.partitions, count)) for b in range(phases.node_buckets())
        ]

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        b, parts, count = partition.params
        phases = Phases.of(partition.source)
        stars = buckets.read_all(buckets.file_urls(partition.source, ARCS_TABLE, parts), b, ARCS_SCHEMA)
        node, label = neardup.star_labels(stars.column("u").to_numpy(), stars.column("v").to_numpy())
        del stars
        arcs = buckets.read_all(phases.files(EDGES_KIND, ARCS_TABLE), b, ARCS_SCHEMA)
        u, v = arcs.column("u").to_numpy(), arcs.column("v").to_numpy()
        one = u < v  # each edge once, from its smaller end (in this bucket)
        a, c = u[one], v[one]
        edge_label = label[np.searchsorted(node, a)]
        nodes = read_part(storage.join(phases.urls[NODES_KIND], part_name(b)))  # this bucket's nodes
        labels = _lookup(node, pa.array(label, pa.uint64()), nodes.column("phash").to_numpy())
        linked = pc.is_valid(labels)
        linked_nodes = nodes.filter(linked)
        node_label = labels.filter(linked).to_numpy()
        edges = pa.table({"u": pa.array(a, pa.uint64()), "v": pa.array(c, pa.uint64())}, schema=ARCS_SCHEMA)
        files = [
            buckets.write(out, b, linked_nodes, buckets.of_keys(node_label, count), count, COMPONENT_NODES_TABLE),
            buckets.write(out, b, edges, buckets.of_keys(edge_label, count), count, COMPONENT_EDGES_TABLE),
        ]
        return PartitionResult(
            counts={"linked_nodes": linked_nodes.num_rows, "components": int((node == label).sum())},
            files=files,
            extra={"component_buckets": count},
        )


class FilterLinks:
    """GROUP, part 6 (one partition per component bucket): leader clustering over the
    near-duplicate graph, component by component (a node's decision depends only on nodes of its
    component, so each bucket decides alone, exactly as one pass over the whole graph would).

    Holds the edges and nodes of its components; a row with no hash within the distance leads and
    never appears here.
    """

    name = "filter-links"
    kind = LINKS_KIND

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        ref = _one_input(inputs, COMPONENTS_KIND, "links")
        rec = read_run_record(ref.url)
        count = rec.extra["component_buckets"][0]
        return [Partition(index=c, source=ref.url, params=(c, rec.partitions)) for c in range(count)]

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        c, parts = partition.params
        phases = Phases.of(partition.source)
        nodes = buckets.read_all(buckets.file_urls(partition.source, COMPONENT_NODES_TABLE, parts), c, NODES_SCHEMA)
        edges = buckets.read_all(buckets.file_urls(partition.source, COMPONENT_EDGES_TABLE, parts), c, ARCS_SCHEMA)
        nodes = nodes.sort_by("phash")
        ph = nodes.column("phash").to_numpy()
        uids = nodes.column("uid")
        a, b = edges.column("u").to_numpy(), edges.column("v").to_numpy()
        del edges
        rank = np.empty(len(ph), dtype=np.int64)
        rank[pc.sort_indices(uids).to_numpy()] = np.arange(len(ph))
        leader = neardup.leaders(rank, np.searchsorted(ph, a), np.searchsorted(ph, b))
        follow = np.flatnonzero(leader >= 0)
        table = pa.table(
            {"phash": pa.array(ph[follow], pa.uint64()), "leader": uids.take(pa.array(leader[follow]))},
            schema=LEADERS_SCHEMA,
        )
        count = phases.node_buckets()
        files = [buckets.write(out, c, table, buckets.of_keys(table.column("phash").to_numpy(), count), count,
                               LEADERS_TABLE)]  # fmt: skip
        return PartitionResult(
            counts={"edges": len(a), "linked_nodes": len(ph), "near_duplicate_nodes": len(follow)}, files=files
        )


class FilterResolve:
    """GROUP, part 5 (one partition per phash bucket): every row's duplicate and near-duplicate
    decision, from its sha256 representative and its node's leader."""

    name = "filter-resolve"
    kind = RESOLVE_KIND

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        ref = _one_input(inputs, LINKS_KIND, "resolve")
        return _bucket_partitions(ref, Phases.of(ref.url).node_buckets())

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        (b,) = partition.params
        phases = Phases.of(partition.source)
        members = buckets.read_all(phases.files(EXACT_KIND, MEMBERS_TABLE), b, MEMBERS_SCHEMA)
        links = buckets.read_all(phases.files(LINKS_KIND, LEADERS_TABLE), b, LEADERS_SCHEMA)
        phash = members.column("phash").to_numpy()
        # the node of each row: the smallest uid among the representatives with its hash
        nodes = node_table(members)
        node = _lookup(nodes.column("phash").to_numpy(), nodes.column("uid"), phash)
        # its node's leader when the node is a near duplicate (LINKS lists only those), else null
        lead = _lookup(links.column("phash").to_numpy(), links.column("leader"), phash)
        is_rep = pc.is_null(members.column("rep"))
        uid = members.column("uid")
        # a representative is kept when it is its node's uid and the node leads; an exact
        # duplicate points at the row kept for its representative
        rep_of = pc.coalesce(members.column("rep"), uid)
        rep_kept = pc.and_(pc.equal(rep_of, node), pc.is_null(lead))
        kept = pc.and_(is_rep, rep_kept)
        reason_arr = pc.if_else(kept, pa.scalar(None, pa.string()), pc.if_else(is_rep, NEAR_DUPLICATE, DUPLICATE))
        target = pc.if_else(rep_kept, rep_of, pc.coalesce(lead, node))
        target = pc.if_else(kept, pa.scalar(None, pa.string()), target)
        dropped = pc.is_valid(reason_arr)
        decisions = pa.table(
            {
                "row": members.column("row").filter(dropped),
                "reason": reason_arr.filter(dropped),
                "duplicate_of": target.filter(dropped),
            },
            schema=DECISIONS_SCHEMA,
        )
        parts = phases.scan_parts()
        part_of = members.column("part").filter(dropped).to_numpy()
        files = [buckets.write(out, b, decisions, part_of, parts, DECISIONS_TABLE)]
        if config.rebalance or config.filters_clip:  # the rest of GROUP needs the rows still kept
            kept_rows = members.filter(pc.invert(dropped)).select(["uid", "part", "row", "clip_score"])
            count = phases.buckets()
            uid_buckets = buckets.of_strings(kept_rows.column("uid"), count)
            files.append(buckets.write(out, b, kept_rows.cast(KEPT_SCHEMA), uid_buckets, count, KEPT_TABLE))
        vc = pc.value_counts(reason_arr.drop_null())
        counts = Counter(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)))
        counts[KEPT] = members.num_rows - int(pc.sum(dropped).as_py() or 0)
        return PartitionResult(counts=dict(sorted(counts.items())), files=files)


def _lookup(keys: np.ndarray, values: pa.Array | pa.ChunkedArray, wanted: np.ndarray) -> pa.Array:
    """``values`` at the position of each ``wanted`` key in ``keys`` (distinct); null when absent."""
    if not len(keys):
        return pa.nulls(len(wanted), values.type)
    order = np.argsort(keys)
    keys = keys[order]
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found = keys[at] == wanted
    return pc.if_else(pa.array(found), values.take(pa.array(order[at])), pa.scalar(None, values.type))


def _curated_for(config: FilterConfig, url: str) -> str:
    found = (
        ManifestRef(url=storage.normalize(config.curated), kind="curated")
        if config.curated
        else find_upstream(url, "curated")
    )
    if found is None:
        raise StageError(
            f"--rebalance needs the curated manifest: none found up the lineage of {url}; name it with --curated"
        )
    return found.url


def _rebalance_settings(curated: str, config: FilterConfig) -> tuple[int, int]:
    """``(per-query cap, seed)``: the options, else curate's own (from its run record)."""
    rec = read_run_record(curated)
    cur_config = rec.config if rec is not None else {}
    cap = config.per_query_cap if config.per_query_cap is not None else cur_config.get("per_query_cap")
    seed = config.seed if config.seed is not None else cur_config.get("seed", 0)
    if cap is None:
        raise StageError(f"{curated}: its run record names no per_query_cap; give --per-query-cap")
    return int(cap), int(seed)


def _idle(ref: ManifestRef) -> list[Partition]:
    """One partition that does nothing: the phase is not asked for (no --rebalance, no CLIP filter)."""
    return [Partition(index=0, source=ref.url, params=(None,))]


def _uid_partitions(ref: ManifestRef, wanted: bool) -> list[Partition]:
    return _bucket_partitions(ref, Phases.of(ref.url).buckets()) if wanted else _idle(ref)


class FilterQueries:
    """GROUP, rebalance 1 (one partition per curated part, only with ``--rebalance``): the curated
    queries of the kept curated rows, by uid bucket."""

    name = "filter-queries"
    kind = QUERIES_KIND

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        ref = _one_input(inputs, RESOLVE_KIND, "queries")
        if not config.rebalance:
            return _idle(ref)
        curated = _curated_for(config, ref.url)
        cap, seed = _rebalance_settings(curated, config)
        parts = open_manifest(curated, expect_kind="curated").part_urls()
        return [Partition(index=i, source=ref.url, params=(u, curated, cap, seed)) for i, u in enumerate(parts)]

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        if partition.params[0] is None:
            return PartitionResult()
        part, curated, cap, seed = partition.params
        table = read_part(part).select(["uid", "queries", "keep"])
        table = table.filter(table.column("keep")).select(["uid", "queries"])
        table = pa.table({"uid": table.column("uid"), "queries": table.column("queries")}, schema=QUERIES_SCHEMA)
        count = Phases.of(partition.source).buckets()
        files = [buckets.write(out, partition.index, table, buckets.of_strings(table.column("uid"), count), count,
                               QUERIES_TABLE)]  # fmt: skip
        return PartitionResult(
            counts={"curated_kept": table.num_rows},
            files=files,
            extra={"curated": curated, "per_query_cap": cap, "seed": seed},
        )


def _kept_rows(phases: Phases, bucket: int) -> pa.Table:
    """The rows RESOLVE kept, of one uid bucket, in (part, row) order."""
    kept = buckets.read_all(phases.files(RESOLVE_KIND, KEPT_TABLE), bucket, KEPT_SCHEMA)
    return kept.sort_by([("part", "ascending"), ("row", "ascending")])


class FilterJoin:
    """GROUP, rebalance 2 (one partition per uid bucket): the kept rows with their curated
    queries, and how many kept rows each query has here (by query bucket)."""

    name = "filter-join"
    kind = JOIN_KIND
    schema = JOIN_SCHEMA

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        return _uid_partitions(_one_input(inputs, QUERIES_KIND, "join"), config.rebalance)

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        (b,) = partition.params
        if b is None:
            return PartitionResult()
        phases = Phases.of(partition.source)
        kept = _kept_rows(phases, b)
        queries = buckets.read_all(phases.files(QUERIES_KIND, QUERIES_TABLE), b, QUERIES_SCHEMA)
        wanted = _lookup_strings(queries.column("uid"), queries.column("queries"), kept.column("uid"))
        rows = pa.table(
            {
                "uid": kept.column("uid"),
                "part": kept.column("part"),
                "row": kept.column("row"),
                "clip_score": kept.column("clip_score"),
                "queries": wanted,
            },
            schema=JOIN_SCHEMA,
        )
        flat = pc.list_flatten(wanted)
        vc = pc.value_counts(flat) if len(flat) else pa.StructArray.from_arrays(
            [pa.array([], pa.string()), pa.array([], pa.int64())], names=["values", "counts"]
        )  # fmt: skip
        counts = pa.table({"query": vc.field("values"), "count": vc.field("counts")}, schema=COUNTS_SCHEMA)
        count = phases.buckets()
        files = [buckets.write(out, b, counts, buckets.of_strings(counts.column("query"), count), count, COUNTS_TABLE)]
        return PartitionResult(table=rows, counts={"kept": rows.num_rows}, files=files)


def _lookup_strings(keys: pa.Array | pa.ChunkedArray, values, wanted: pa.Array | pa.ChunkedArray):
    """``values`` at each ``wanted`` key's first place in ``keys``; null where absent."""
    if isinstance(keys, pa.ChunkedArray):
        keys, values = keys.combine_chunks(), values.combine_chunks()
    return values.take(pc.index_in(wanted, value_set=keys))


class FilterCaps:
    """GROUP, rebalance 3 (one partition per query bucket): each query's kept rows, summed over
    the uid buckets; the queries over the cap (a table of queries, not rows)."""

    name = "filter-caps"
    kind = CAPS_KIND
    schema = CAPS_SCHEMA

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        return _uid_partitions(_one_input(inputs, JOIN_KIND, "caps"), config.rebalance)

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        (b,) = partition.params
        if b is None:
            return PartitionResult()
        phases = Phases.of(partition.source)
        cap = phases.extra[QUERIES_KIND]["per_query_cap"][0]
        counts = buckets.read_all(phases.files(JOIN_KIND, COUNTS_TABLE), b, COUNTS_SCHEMA)
        summed = counts.group_by("query").aggregate([("count", "sum")]).rename_columns(["query", "count"])
        over = summed.filter(pc.greater(summed.column("count"), cap)).sort_by("query")
        return PartitionResult(
            table=over.cast(CAPS_SCHEMA), counts={"queries": summed.num_rows, "over_cap": over.num_rows}
        )


def score_keys(scores: np.ndarray) -> np.ndarray:
    """Each float32 score as a uint32 in the same order (the sign flipped in, negatives reversed)."""
    bits = np.asarray(scores, dtype=np.float32).view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31)).astype(np.uint32)


def score_of_key(key: int) -> float:
    bits = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _bins(keys: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(keys, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}


def _merged(parts: list[dict]) -> Counter:
    total: Counter = Counter()
    for bins in parts:
        total.update({int(k): v for k, v in (bins or {}).items()})
    return total


def _from_top(bins: Counter, k: int) -> tuple[int, int]:
    """The bin holding the ``k``-th highest value, and that value's rank from the top within it."""
    for b in sorted(bins, reverse=True):
        if k <= bins[b]:
            return b, k
        k -= bins[b]
    raise AssertionError("k is more than the values")


class FilterOverCap:
    """GROUP, rebalance 4 and CLIP 1 (one partition per uid bucket): ``over_cap`` (MetaCLIP's rule,
    :func:`rebalance_decisions`, with the merged counts of the queries over the cap), and the
    histogram of the scores still kept, by the high 16 bits of their order key (exact quantiles
    in two passes of fixed-size histograms, never a sort of every score)."""

    name = "filter-overcap"
    kind = OVERCAP_KIND
    schema = KEPT_SCHEMA

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        return _uid_partitions(_one_input(inputs, CAPS_KIND, "overcap"), config.rebalance or config.filters_clip)

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        (b,) = partition.params
        if b is None:
            return PartitionResult()
        phases = Phases.of(partition.source)
        drops: dict[str, Decision] = {}
        if config.rebalance:
            rows = read_part(storage.join(phases.urls[JOIN_KIND], part_name(b)))
            over = pa.concat_tables(
                [read_part(u) for u in open_manifest(phases.urls[CAPS_KIND], expect_kind=CAPS_KIND).part_urls()]
            )
            counts = dict(zip(over.column("query").to_pylist(), over.column("count").to_pylist(), strict=True))
            cap, seed = (phases.extra[QUERIES_KIND][k][0] for k in ("per_query_cap", "seed"))
            drops = over_cap_decisions(rows.column("uid").to_pylist(), rows.column("queries").to_pylist(), counts,
                                       cap, seed)  # fmt: skip
            rows = rows.select(["uid", "part", "row", "clip_score"])
        else:
            rows = _kept_rows(phases, b)
        hit = np.array([u in drops for u in rows.column("uid").to_pylist()], dtype=bool)
        chosen = rows.filter(pa.array(hit))
        decisions = pa.table(
            {
                "row": chosen.column("row"),
                "reason": pa.array([OVER_CAP] * chosen.num_rows, pa.string()),
                "duplicate_of": pa.nulls(chosen.num_rows, pa.string()),
            },
            schema=DECISIONS_SCHEMA,
        )
        files = [buckets.write(out, b, decisions, chosen.column("part").to_numpy(), phases.scan_parts(),
                               DECISIONS_TABLE)]  # fmt: skip
        kept = rows.filter(pa.array(~hit))
        extra: dict[str, Any] = {}
        if config.filters_clip:
            scores = kept.column("clip_score")
            if scores.null_count:
                missing = kept.filter(pc.is_null(scores)).column("uid")[0].as_py()
                raise StageError(
                    f"{scores.null_count} eligible rows have no CLIP score (e.g. {missing}): rerun the scan"
                )
            keys = score_keys(_ranked_scores(scores, config))
            extra["score_bins"] = _bins(keys >> 16)
        return PartitionResult(
            table=kept.cast(KEPT_SCHEMA), counts={OVER_CAP: int(hit.sum()), KEPT: kept.num_rows}, files=files,
            extra=extra,
        )  # fmt: skip


def _ranked_scores(scores: pa.Array | pa.ChunkedArray, config: FilterConfig) -> np.ndarray:
    """The scores that take part in the ``--keep-top`` quantile: those at least ``--min-score``."""
    s = np.asarray(scores.to_numpy(), dtype=np.float32)
    return s[s >= np.float32(config.min_clip_score)] if config.min_clip_score is not None else s


def _quantile_target(phases: Phases, config: FilterConfig) -> tuple[int, int] | None:
    """``(high 16 bits, rank within)`` of the ``1 - keep_top_fraction`` quantile of the kept
    scores (the ``ceil(fraction × n)``-th highest, as :func:`.clipscore.score_threshold`)."""
    if config.keep_top_fraction is None:
        return None
    bins = _merged(phases.extra.get(OVERCAP_KIND, {}).get("score_bins", []))
    n = sum(bins.values())
    if not n:
        return None
    k = max(1, math.ceil(config.keep_top_fraction * n - 1e-9))
    return _from_top(bins, min(k, n))


class FilterThreshold:
    """GROUP, CLIP 2 (one partition per uid bucket, only with ``--keep-top``): the histogram of the
    low 16 bits of the scores in the bin that holds the quantile."""

    name = "filter-threshold"
    kind = THRESHOLD_KIND

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        ref = _one_input(inputs, OVERCAP_KIND, "threshold")
        phases = Phases.of(ref.url)
        target = _quantile_target(phases, config)
        if target is None:
            return _idle(ref)
        return [Partition(index=b, source=ref.url, params=(b, target[0])) for b in range(phases.buckets())]

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        if partition.params[0] is None:
            return PartitionResult()
        b, high = partition.params
        kept = read_part(storage.join(partition.source, part_name(b)))
        keys = score_keys(_ranked_scores(kept.column("clip_score"), config))
        return PartitionResult(extra={"score_bins": _bins(keys[(keys >> 16) == high] & 0xFFFF)})


class FilterGroup:
    """GROUP, last part (one partition, no rows): the CLIP-score threshold from the merged
    histograms, and what the run record says about the whole group step."""

    name = "filter-group"
    kind = GROUP_KIND

    def partitions(self, config: FilterConfig, inputs: list[ManifestRef]) -> list[Partition]:
        return [Partition(index=0, source=_one_input(inputs, THRESHOLD_KIND, "group").url)]

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        phases = Phases.of(partition.source)
        references = _reference_table(tuple(config.reference_sets()), config.max_pixels)
        extra: dict[str, Any] = {
            "reference_images": dict(Counter(t for t, _ in references)),
            "near_duplicate_layout": phases.extra[NODES_KIND]["layout"][0],
            "component_rounds": phases.extra[STAR_KIND]["round"][0] + 1,
            "buckets": phases.buckets(),
        }
        for task, _ in config.reference_sets():
            extra["reference_images"].setdefault(task, 0)
        if config.rebalance:
            extra |= {k: phases.extra[QUERIES_KIND][k][0] for k in ("curated", "per_query_cap", "seed")}
        if config.filters_clip:
            threshold = config.min_clip_score
            target = _quantile_target(phases, config)
            if target is not None:
                high, k = target
                low, _ = _from_top(_merged(phases.extra[THRESHOLD_KIND]["score_bins"]), k)
                quantile = score_of_key((high << 16) | low)
                threshold = quantile if threshold is None else max(threshold, quantile)
            extra["clip_threshold"] = threshold
        return PartitionResult(extra=extra)


def over_cap_decisions(
    uids: list[str], queries: list[list[str] | None], over: Mapping[str, int], cap: int, seed: int
) -> dict[str, Decision]:
    """``over_cap`` for the rows whose every query is over the cap (``over``: the kept count of
    each such query) and loses curate's draw for each (:func:`wit.ingest.queries.selection_draw`)."""
    from .queries import selection_draw

    drops = {}
    for u, qs in zip(uids, queries, strict=True):
        if qs and all(q in over for q in qs) and not any(selection_draw(seed, u, q) < cap / over[q] for q in qs):
            drops[u] = Decision(OVER_CAP)
    return drops


def rebalance_decisions(kept: list[str], queries: dict[str, list[str]], cap: int, seed: int) -> dict[str, Decision]:
    """``over_cap`` for the kept uids that MetaCLIP's rule drops (curate's draw, counts over ``kept``),
    in one process: the reference of the bucketed JOIN, CAPS and OVERCAP."""
    counts = Counter(q for u in kept for q in (queries.get(u) or ()))
    over = {q: n for q, n in counts.items() if n > cap}
    return over_cap_decisions(kept, [queries.get(u) for u in kept], over, cap, seed)


# ---------------------------------------------------------------------------------------------
# DECIDE: write the FILTERED rows


def decide_table(scan: pa.Table, decisions: pa.Table) -> tuple[pa.Table, Counter]:
    """The FILTERED rows of one scan part, given GROUP's drops among its rows (``DECISIONS_SCHEMA``)."""
    reasons = scan.column("reason").to_pylist()
    dup_of: list[str | None] = [None] * len(reasons)
    for row, reason, target in zip(*(decisions.column(c).to_pylist() for c in DECISIONS_SCHEMA.names), strict=True):
        if reasons[row] is not None:
            raise StageError(f"row {row} of a scan part has a reason ({reasons[row]}) and a group decision")
        reasons[row], dup_of[row] = reason, target
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


def low_score_decisions(scan: pa.Table, decisions: pa.Table, threshold: float) -> pa.Table:
    """``low_clip_score`` for the rows of a scan part still kept after ``decisions`` whose score
    (float32, compared as stored) is below ``threshold``."""
    kept = pc.is_null(scan.column("reason")).to_numpy(zero_copy_only=False).copy()
    kept[decisions.column("row").to_numpy()] = False
    scores = scan.column("clip_score").to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(kept & (np.nan_to_num(scores.astype(np.float64), nan=np.inf) < threshold))
    return pa.table(
        {
            "row": pa.array(rows.astype(np.int32)),
            "reason": pa.array([LOW_CLIP_SCORE] * len(rows), pa.string()),
            "duplicate_of": pa.nulls(len(rows), pa.string()),
        },
        schema=DECISIONS_SCHEMA,
    )


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
        group = _one_input(inputs, GROUP_KIND, "decide")
        phases = Phases.of(group.url)
        # The scan parts are found through the phases' run records, so lineage stays one chain.
        scan = ManifestRef(url=phases.urls[SCAN_KIND], kind=SCAN_KIND)
        threshold = (read_run_record(group.url).extra.get("clip_threshold") or [None])[0]
        parts = input_parts([scan], SCAN_KIND)
        return [Partition(index=i, source=u, params=(group.url, threshold)) for i, u in enumerate(parts)]

    def run_partition(self, config: FilterConfig, partition: Partition, out: str) -> PartitionResult:
        group_url, threshold = partition.params
        phases = Phases.of(group_url)
        p = partition.index
        # GROUP's drops among this part's rows: one small read of each bucket file that has them
        files = phases.files(EXACT_KIND, DECISIONS_TABLE) + phases.files(RESOLVE_KIND, DECISIONS_TABLE)
        if config.rebalance or config.filters_clip:
            files += phases.files(OVERCAP_KIND, DECISIONS_TABLE)
        decisions = buckets.read_all(files, p, DECISIONS_SCHEMA)
        # conform: a scan part from before a column was added (a run resumed across an upgrade)
        scan = conform(read_part(partition.source), SCAN_SCHEMA)
        if threshold is not None:
            decisions = pa.concat_tables([decisions, low_score_decisions(scan, decisions, threshold)])
        table, counts = decide_table(scan, decisions)
        overlap = Counter()
        for reason, n in counts.items():
            if reason.startswith(EVAL_OVERLAP + ":"):
                overlap[reason.split(":", 1)[1]] += n
        tallies = {EVAL_OVERLAP: dict(overlap)} if overlap else {}
        tallies.update(score_tallies(table))
        return PartitionResult(table=table, counts=dict(sorted(counts.items())), tallies=tallies)


SCAN = FilterScan()
EXACT = FilterExact()
NODES = FilterNodes()
EDGES = FilterEdges()
STAR = FilterStar()
COMPONENTS = FilterComponents()
LINKS = FilterLinks()
RESOLVE = FilterResolve()
QUERIES = FilterQueries()
JOIN = FilterJoin()
CAPS = FilterCaps()
OVERCAP = FilterOverCap()
THRESHOLD = FilterThreshold()
GROUP = FilterGroup()
DECIDE = FilterDecide()
# (stage, subfolder of OUT): run in order, each with the previous phase's finished ref as input.
FILTER_PHASES: list[tuple[Any, str]] = [
    (SCAN, "_scan"),
    (EXACT, "_exact"),
    (NODES, "_nodes"),
    (EDGES, "_edges"),
    (STAR, "_star"),  # repeats: _star/r000, r001… until the components are stars
    (COMPONENTS, "_components"),
    (LINKS, "_links"),
    (RESOLVE, "_resolve"),
    (QUERIES, "_queries"),  # --rebalance: QUERIES, JOIN, CAPS, OVERCAP
    (JOIN, "_join"),
    (CAPS, "_caps"),
    (OVERCAP, "_overcap"),  # and the CLIP threshold: OVERCAP, THRESHOLD, GROUP
    (THRESHOLD, "_threshold"),
    (GROUP, "_group"),
    (DECIDE, ""),
]


def filter_summary(counts: dict[str, int]) -> str:
    """Counts by reason, largest first, as ``wit filter`` prints them."""
    total = sum(counts.values())
    width = max((len(f"{v:,}") for v in counts.values()), default=1)
    lines = [f"{total:,} ledger rows, {counts.get(KEPT, 0):,} kept"]
    lines += [f"  {v:>{width},}  {k}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "\n".join(lines)
