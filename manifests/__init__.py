"""The data layer of `wit`: storage by URL, manifest schemas, part files, run records, lineage, verify.

Everything above this package reads and writes data through it:

- ``storage``    fsspec by URL (local, file://, s3://, ...), atomic writes, one error type
- ``schemas``    the pyarrow schema of every manifest kind, as constants
- ``manifest``   part files, the manifest digest, reading a manifest back
- ``runrecord``  ``_run.json``, written last into every output folder
- ``stage``      the stage contract: partitions, per-partition commit markers, finalize
- ``tars``       reading tar shards (every stage's one reader; the image extensions)
- ``tarwrite``   writing tar shards (``wit shard``'s I/O engine, exported and re-keyed shards)
- ``lineage``    walk run records back to the sources
- ``verify``     recompute digests and shard sha256s; report changed, missing and extra files
- ``describe``   ``wit manifest show`` / ``diff``
- ``render``     what the dataset card, eval report and run report share: plot style, PNG bytes, HTML
"""

from .manifest import ManifestError, ManifestRef, open_manifest, read_frame, read_table
from .storage import StorageError

__all__ = ["ManifestError", "ManifestRef", "StorageError", "open_manifest", "read_frame", "read_table"]
