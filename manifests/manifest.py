"""Manifests: folders of Parquet part files, their digest, and reading them back.

Layout of a manifest folder (any URL)::

    OUT/
      part-00000.parquet ...     the main table, one part per partition (schema in schemas.py)
      <table>/part-00000.parquet side tables, e.g. a dataset's ``shard_index/``
      shards/000000.tar ...      other committed files (a dataset's shards)
      _parts/part-00000.json     per-partition commit markers (written by the stage driver)
      _run.json                  the run record, written last: a folder without it is unfinished

The digest of a manifest is the sha256 of its Parquet part files' sha256s in name order. Side
tables are part files too, so a dataset digest covers its shard index, and the shard index holds
every shard's sha256: one changed byte anywhere changes the digest.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .schemas import SCHEMA_VERSION, kind_of, schema_for, version_of

if TYPE_CHECKING:
    import pyarrow.dataset as pads

RUN_RECORD = "_run.json"
MARKERS = "_parts"
PART_RE = re.compile(r"^(?:(?P<table>[A-Za-z0-9_\-]+)/)?part-(?P<index>\d{5,})\.parquet$")
# a partition's rows split into buckets for the next phase (wit.manifests.buckets): Arrow IPC
BUCKETS_RE = re.compile(r"^(?:(?P<table>[A-Za-z0-9_\-]+)/)?part-(?P<index>\d{5,})\.arrow$")


def in_digest(name: str) -> bool:
    """Whether a file's sha256 counts in its manifest's digest: part files and bucket files."""
    return bool(PART_RE.match(name) or BUCKETS_RE.match(name))


class ManifestError(ValueError):
    """The URL does not hold a readable manifest (no parts, wrong schema, truncated file...)."""


@dataclass(frozen=True, slots=True)
class ManifestRef:
    """A pointer to a finished manifest: where it is, what kind, and its digest at that time."""

    url: str
    kind: str | None = None
    digest: str | None = None

    def to_dict(self) -> dict:
        return {"url": self.url, "kind": self.kind, "digest": self.digest}

    @classmethod
    def from_dict(cls, d: dict) -> ManifestRef:
        return cls(url=d["url"], kind=d.get("kind"), digest=d.get("digest"))


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A committed output file: its path relative to the manifest folder, sha256, size, rows."""

    name: str
    sha256: str
    bytes: int
    rows: int | None = None

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "bytes": self.bytes, "rows": self.rows}


def part_name(index: int, table: str | None = None) -> str:
    name = f"part-{index:05d}.parquet"
    return f"{table}/{name}" if table else name


SHARDS_DIR = "shards"  # a downloaded ledger's and a dataset's tar shards: shards/NNNNNN.tar


def shard_name(number: int) -> str:
    return f"{SHARDS_DIR}/{number:06d}.tar"


def shard_url(ledger_url: str, shard: str) -> str:
    """The URL of a ledger row's shard: relative values are under the ledger folder."""
    if "://" in shard or os.path.isabs(shard):
        return shard
    return storage.join(ledger_url, shard)


def is_part(name: str, table: str | None = None) -> bool:
    m = PART_RE.match(name)
    return bool(m) and m.group("table") == table


def digest_of(files: dict[str, str]) -> str:
    """Manifest digest from ``{relpath: sha256}``: the sha256 of the part files' sha256s in name order.

    Only Parquet part files (side tables included) and bucket files count; other files are covered
    through the tables that record their sha256 (a dataset's shard index).
    """
    h = hashlib.sha256()
    for name in sorted(files):
        if in_digest(name):
            h.update(files[name].encode())
    return h.hexdigest()


def encode_table(table: pa.Table, schema: pa.Schema) -> bytes:
    """Parquet bytes for a table already conformed to ``schema`` (deterministic for equal input)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=True)
    return buf.getvalue()


def write_part(out: str, index: int, table: pa.Table, schema: pa.Schema, table_name: str | None = None) -> FileInfo:
    """Conform ``table`` to ``schema`` and commit it atomically as part ``index`` of ``out``."""
    from .schemas import conform

    table = conform(table, schema)
    return commit_file(out, part_name(index, table_name), encode_table(table, schema), rows=table.num_rows)


def commit_file(out: str, name: str, data: bytes, rows: int | None = None) -> FileInfo:
    """Commit ``data`` atomically as the file ``name`` of the output folder ``out``; its
    :class:`FileInfo` for the run record (``rows``: of a part file)."""
    storage.write_bytes(storage.join(out, name), data)
    return FileInfo(name=name, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), rows=rows)


def list_parts(url: str, table: str | None = None) -> list[str]:
    """Relative names of the part files of the main table (or of side table ``table``)."""
    names = storage.listdir(storage.join(url, table) if table else url)
    return [f"{table}/{n}" if table else n for n in names if is_part(n)]


@dataclass(slots=True)
class Manifest:
    """A manifest folder opened for reading. ``kind`` comes from the part files' metadata."""

    url: str
    kind: str | None
    schema: pa.Schema
    parts: list[str]
    table_name: str | None = None

    def part_urls(self) -> list[str]:
        return [storage.join(self.url, p) for p in self.parts]

    def dataset(self) -> pads.Dataset:
        """A pyarrow dataset over the part files: lazy on local disk, loaded in memory when remote.

        Remote parts are not scanned through ``PyFileSystem(FSSpecHandler)``: Arrow's scanner
        threads calling back into Python file handles abort the interpreter at exit now and then
        (apache/arrow#34314, #39162).
        """
        import pyarrow.dataset as pads  # here, not at the top: it imports pandas (0.4 s)

        if storage.is_local(self.url):
            paths = [storage.local_path(u) for u in self.part_urls()]
            return pads.dataset(paths, schema=self.schema, format="parquet")
        return pads.dataset(self.table())

    def table(self, columns: list[str] | None = None) -> pa.Table:
        empty = self.schema.empty_table()
        if not self.parts:
            return empty if columns is None else empty.select(columns)
        return pa.concat_tables([read_part(u, columns) for u in self.part_urls()])

    def to_pandas(self, columns: list[str] | None = None):
        return self.table(columns).to_pandas()

    @property
    def num_rows(self) -> int:
        return sum(read_part_metadata(u).num_rows for u in self.part_urls())


def read_part(url: str, columns: list[str] | None = None) -> pa.Table:
    """One part file as a table (the whole object is fetched first when it is remote)."""
    try:
        if storage.is_local(url):
            return pq.read_table(storage.local_path(url), columns=columns)
        return pq.read_table(pa.BufferReader(storage.read_bytes(url)), columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{url} is not a readable Parquet file ({_short(exc)})") from exc


def read_part_metadata(url: str) -> pq.FileMetaData:
    try:
        with storage.open_url(url, "rb") as fh:
            return pq.ParquetFile(fh).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{url} is not a readable Parquet file ({_short(exc)})") from exc


def read_part_schema(url: str) -> pa.Schema:
    try:
        with storage.open_url(url, "rb") as fh:
            return pq.ParquetFile(fh).schema_arrow
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{url} is not a readable Parquet file ({_short(exc)})") from exc


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def same_columns(a: pa.Schema, b: pa.Schema) -> bool:
    return [(f.name, f.type) for f in a] == [(f.name, f.type) for f in b]


def check_version(url: str, schema: pa.Schema) -> None:
    """Refuse a part file of a typed manifest written in another manifest format than this wit's
    (:data:`~wit.manifests.schemas.SCHEMA_VERSION`), naming both: its columns may mean other things.
    An untyped part (no ``wit.kind``: a table a user wrote) carries no version and is not checked."""
    if kind_of(schema) is None:
        return
    got = version_of(schema)
    if got != SCHEMA_VERSION:
        wrote = f"manifest format {got}" if got else "a wit without manifest format versions"
        raise ManifestError(
            f"{url}: written by {wrote}; this wit reads manifest format {SCHEMA_VERSION} only."
            " Run the stage that wrote it again with this wit, into a new folder (or delete this one first)"
        )


def _column_change(got: pa.Schema, expected: pa.Schema) -> str:
    """How ``got``'s columns differ from ``expected``'s, in a few words."""
    want = {f.name: f.type for f in expected}
    have = {f.name: f.type for f in got}
    said = [f"lacks {', '.join(n for n in want if n not in have)}"] if set(want) - set(have) else []
    said += [f"has {', '.join(n for n in have if n not in want)} too"] if set(have) - set(want) else []
    said += [f"{n} is {have[n]}, not {t}" for n, t in want.items() if n in have and have[n] != t]
    return "; ".join(said) or "its columns are in another order"


def open_manifest(url: str, table: str | None = None, expect_kind: str | None = None) -> Manifest:
    """Open a manifest folder, checking every part file's schema against the first one's kind.

    Raises ManifestError with one line saying what is wrong: no such folder, no part files,
    an unreadable (e.g. truncated) part, a part of another kind or with other columns.
    """
    url = storage.normalize(url)
    if not storage.exists(url):
        raise ManifestError(f"{url}: no such manifest folder")
    if not storage.isdir(url):
        raise ManifestError(f"{url}: not a manifest folder (expected a folder of part-NNNNN.parquet files)")
    parts = list_parts(url, table)
    if not parts:
        raise ManifestError(f"{url}: not a manifest (no part-NNNNN.parquet files)")
    first = read_part_schema(storage.join(url, parts[0]))
    kind = kind_of(first)
    if expect_kind and kind != expect_kind:
        raise ManifestError(f"{url}: is a {kind or 'untyped'} manifest, expected {expect_kind}")
    schema = first
    if kind:
        try:
            expected = schema_for(kind)
        except ValueError:
            expected = None  # a custom kind (a test stage's): the first part defines the columns
        if expected is not None:
            schema = expected
    for i, p in enumerate(parts):
        s = first if i == 0 else read_part_schema(storage.join(url, p))
        check_version(f"{url}/{p}", s)
        if kind_of(s) != kind or not same_columns(s, schema):
            what = f"is a {kind_of(s) or 'untyped'} part" if kind_of(s) != kind else _column_change(s, schema)
            raise ManifestError(
                f"{url}/{p}: schema does not match the {kind or 'first part'}'s ({what});"
                " written by another wit? Run the stage that wrote it again into a new folder"
            )
    return Manifest(url=url, kind=kind, schema=schema, parts=parts, table_name=table)


def read_table(url: str, columns: list[str] | None = None, expect_kind: str | None = None) -> pa.Table:
    return open_manifest(url, expect_kind=expect_kind).table(columns)


def read_frame(url: str, columns: list[str] | None = None, expect_kind: str | None = None):
    return read_table(url, columns, expect_kind).to_pandas()


def current_digest(url: str) -> str:
    """Recompute a manifest's digest from the part files as they are now (reads every part)."""
    url = storage.normalize(url)
    files = {}
    for name in storage.listdir(url, recursive=True):
        if in_digest(name):
            files[name] = storage.sha256_url(storage.join(url, name))
    return digest_of(files)
