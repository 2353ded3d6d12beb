"""The model-aware store: content-addressed chunks, per-tensor codecs, versions with deltas, a SQLite catalogue."""

from modelpress.store.store import CorruptChunkError, GcReport, Store, StoreError, VerifyReport, VersionNotFoundError

__all__ = ["Store", "StoreError", "VersionNotFoundError", "CorruptChunkError", "VerifyReport", "GcReport"]
