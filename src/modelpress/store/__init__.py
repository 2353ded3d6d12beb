"""The model-aware store: content-addressed chunks, per-tensor codecs, versions with deltas, a SQLite catalogue."""

from modelpress.errors import CorruptChunkError, MissingChunkError, StoreError, VersionNotFoundError
from modelpress.store.maintenance import GC_GRACE, GcReport, VerifyReport
from modelpress.store.store import Store

__all__ = ["Store", "StoreError", "VersionNotFoundError", "CorruptChunkError", "MissingChunkError", "VerifyReport",
           "GcReport", "GC_GRACE"]
