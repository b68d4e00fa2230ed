"""A stage that is not part of wit, added with one ``register`` call: caption statistics of the candidates.

``caption-stats`` reads extract's candidates, one partition per part file, and writes one row per
candidate with its caption's word count; captions with fewer than ``min-words`` words are kept out
with reason ``short_caption``. Its config class owns its one option, as wit's stages do, so the
driver, `wit run` and the report take it without a line of their own.

Importable by name (conftest puts this folder on sys.path) so spawned workers can unpickle it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wit.manifests import storage
from wit.manifests.manifest import ManifestRef
from wit.manifests.options import Option, check_options
from wit.manifests.schemas import with_kind
from wit.manifests.stage import Partition, PartitionResult, input_parts
from wit.pipeline.registry import StageSpec

KIND = "caption_stats"
SHORT = "short_caption"
SCHEMA = with_kind(
    pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("words", pa.int32(), nullable=False),
            pa.field("keep", pa.bool_(), nullable=False),
            pa.field("reason", pa.string()),
        ]
    ),
    KIND,
)


@dataclass(frozen=True, slots=True)
class CaptionStatsConfig:
    min_words: int = 2

    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("min-words", "int", min_words, "Captions with fewer words are kept out (short_caption).", low=1),
    )

    @classmethod
    def from_options(cls, values: Mapping[str, Any], out: str | None = None) -> CaptionStatsConfig:
        return cls(**check_options(cls.OPTIONS, values, "caption-stats"))

    def __post_init__(self) -> None:  # the bound its option mirrors (Option.low) is enforced here
        if not isinstance(self.min_words, int) or self.min_words < 1:
            raise ValueError(f"min_words must be a positive integer, got {self.min_words!r}")


class CaptionStats:
    name = "caption-stats"
    kind = KIND
    schema = SCHEMA

    def partitions(self, config: CaptionStatsConfig, inputs: list[ManifestRef]) -> list[Partition]:
        return [Partition(index=i, source=url) for i, url in enumerate(input_parts(inputs, "candidates"))]

    def run_partition(self, config: CaptionStatsConfig, partition: Partition, out: str) -> PartitionResult:
        with storage.open_url(partition.source) as fh:
            table = pq.read_table(fh, columns=["uid", "text"])
        words = pc.list_value_length(pc.utf8_split_whitespace(table["text"])).cast(pa.int32())
        keep = pc.greater_equal(words, config.min_words)
        reason = pc.if_else(keep, pa.scalar(None, pa.string()), SHORT)
        kept = pc.sum(keep).as_py() or 0
        rows = pa.table({"uid": table["uid"], "words": words, "keep": keep, "reason": reason})
        return PartitionResult(table=rows, counts={"kept": kept, SHORT: table.num_rows - kept})


CAPTION_STATS = CaptionStats()

SPEC = StageSpec(
    name="caption-stats",
    folder="caption-stats",
    config=CaptionStatsConfig,
    input="extract",
    phases=[(CAPTION_STATS, "")],
    produces="caption statistics",
    optional=True,
)
