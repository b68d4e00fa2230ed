"""The pyarrow schema of every manifest kind, as named constants.

Column names shared between kinds mean the same thing everywhere (DESIGN.md, "Identity and
manifests"): ``uid`` (128-bit hex of the normalised image URL and text), ``url`` (image URL),
``text``, ``page_url``, ``keep``, ``reason`` (null when kept), ``queries``, ``status``, ``sha256``,
``width``, ``height``, ``shard``, ``key``.

Each part file carries its kind in the schema metadata (``wit.kind``), so a reader can tell a
curated manifest from a ledger without being told, and refuse a part of the wrong kind.
"""

from __future__ import annotations

import pyarrow as pa

KIND_KEY = b"wit.kind"
VERSION_KEY = b"wit.schema_version"
SCHEMA_VERSION = "1"


def _schema(kind: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={KIND_KEY: kind.encode(), VERSION_KEY: SCHEMA_VERSION.encode()})


_UID = pa.field("uid", pa.string(), nullable=False)
_URL = pa.field("url", pa.string(), nullable=False)
_TEXT = pa.field("text", pa.string())
_PAGE = pa.field("page_url", pa.string())
_KEEP = pa.field("keep", pa.bool_(), nullable=False)
_REASON = pa.field("reason", pa.string())
_QUERIES = pa.field("queries", pa.list_(pa.string()))
_SHA = pa.field("sha256", pa.string())
_W = pa.field("width", pa.int32())
_H = pa.field("height", pa.int32())
_SHARD = pa.field("shard", pa.string())
_KEY = pa.field("key", pa.string())

CANDIDATES = _schema(
    "candidates",
    [
        _UID,
        _URL,
        _TEXT,
        _PAGE,
        pa.field("title", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("width_attr", pa.int32()),
        pa.field("height_attr", pa.int32()),
        pa.field("lang", pa.string()),
        pa.field("source", pa.string()),
        pa.field("offset", pa.int64()),
    ],
)

CURATED = _schema(
    "curated",
    [
        _UID,
        _URL,
        _TEXT,
        _PAGE,
        pa.field("lang", pa.string()),
        _QUERIES,
        _KEEP,
        _REASON,
    ],
)

DOWNLOADED = _schema(
    "downloaded",
    [
        _UID,
        _URL,
        _TEXT,
        pa.field("status", pa.string(), nullable=False),  # "success" or "failed"
        pa.field("error", pa.string()),  # error class: dns, timeout, http_404, robots_noai, decode...
        pa.field("error_message", pa.string()),
        pa.field("http_status", pa.int32()),
        _SHA,
        _W,
        _H,
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        _SHARD,
        _KEY,
    ],
)

FILTERED = _schema(
    "filtered",
    [
        _UID,
        _URL,
        _TEXT,
        _SHA,
        _W,
        _H,
        _SHARD,
        _KEY,
        # The image member of ``shard`` that filter read: its extension, the byte offset of its
        # data in the shard file (null in a compressed shard) and its size, so that ``wit shard``
        # reads each image with one ranged read instead of walking the shard's headers again; and
        # the bytes' xxh3-128 (32 hex digits), which ``wit shard`` checks them against at memory
        # speed (sha256 stays the image's identity; it is checked where xxh3 is missing).
        pa.field("ext", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("bytes", pa.int64()),
        pa.field("xxh3", pa.string()),
        _KEEP,
        _REASON,
        pa.field("phash", pa.string()),
        pa.field("duplicate_of", pa.string()),
        pa.field("clip_score", pa.float32()),
    ],
)

SAMPLES = _schema(
    "samples",
    [
        _UID,
        _URL,
        _TEXT,
        _PAGE,
        _QUERIES,
        _SHA,
        _W,
        _H,
        _SHARD,
        _KEY,
    ],
)

SHARDS = _schema(
    "shards",
    [
        _SHARD,
        pa.field("samples", pa.int64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ],
)

EVAL_RESULTS = _schema(
    "eval_results",
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
        pa.field("n", pa.int64()),
        pa.field("checkpoint_digest", pa.string()),
        pa.field("dataset_digest", pa.string()),
        pa.field("templates_digest", pa.string()),
    ],
)

SCHEMAS: dict[str, pa.Schema] = {
    s.metadata[KIND_KEY].decode(): s for s in (CANDIDATES, CURATED, DOWNLOADED, FILTERED, SAMPLES, SHARDS, EVAL_RESULTS)
}


def schema_for(kind: str) -> pa.Schema:
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise ValueError(f"unknown manifest kind {kind!r}; known: {', '.join(sorted(SCHEMAS))}") from None


def kind_of(schema: pa.Schema) -> str | None:
    meta = schema.metadata or {}
    raw = meta.get(KIND_KEY)
    return raw.decode() if raw else None


def version_of(schema: pa.Schema) -> str | None:
    """The manifest format a part file was written in (``wit.schema_version``), None when unmarked."""
    raw = (schema.metadata or {}).get(VERSION_KEY)
    return raw.decode() if raw else None


def with_kind(schema: pa.Schema, kind: str) -> pa.Schema:
    """A custom schema (a test stage's, a user's) tagged with a kind name."""
    meta = dict(schema.metadata or {})
    meta[KIND_KEY] = kind.encode()
    meta[VERSION_KEY] = SCHEMA_VERSION.encode()
    return schema.with_metadata(meta)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast a table to ``schema``: same columns in schema order, missing nullable columns as nulls.

    Extra columns are an error rather than silently dropped: a stage that produces a column the
    schema does not know has a bug, and losing data silently is worse than stopping.
    """
    extra = [n for n in table.column_names if schema.get_field_index(n) < 0]
    if extra:
        raise ValueError(f"columns not in the {kind_of(schema)} schema: {', '.join(extra)}")
    columns = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            if not col.type.equals(field.type):
                col = col.cast(field.type)
            if not field.nullable and col.null_count:
                raise ValueError(f"column {field.name!r} of the {kind_of(schema)} schema has nulls")
            columns.append(col)
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"column {field.name!r} is required by the {kind_of(schema)} schema")
    return pa.Table.from_arrays(columns, schema=schema)
