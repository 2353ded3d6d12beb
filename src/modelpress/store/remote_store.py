"""`Store.open(URL)`: a read-only store over a remote, loading versions straight from it.

    with Store.open("s3://bucket/models") as remote:
        state = remote.get("minilm-int4", names=["*.word_embeddings.*"])
        model = remote.load("minilm-int4")

It is the local store's reading section (reading.py) over a different catalogue and backend: the
version records it reads (each checked against its root hash) are put in a private in-memory SQLite
catalogue, and the chunks are fetched from the remote by the same loader as a local load — one arena
planned up front, `threads` parallel requests (each a bounded read of exactly one chunk object), and
every chunk hashed against its id as it lands. Only the chunks of the tensors asked for are fetched.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from modelpress.errors import ModelpressError, VersionNotFoundError
from modelpress.store.catalog import Catalog
from modelpress.store.reader import ChunkReader
from modelpress.store.reading import Reading
from modelpress.store.remote import TRANSFER_THREADS, Remote
from modelpress.store.rows import VersionInfo

__all__ = ["RemoteStore"]


class _CountingReader(ChunkReader):
    """The chunk reader, counting what it fetched (the bytes a remote load moved)."""

    def __init__(self, backend, rows):
        super().__init__(backend, rows)
        self.fetched = 0
        self._count = threading.Lock()

    def check(self, row, out, strong: bool = False) -> None:
        super().check(row, out, strong=True)  # a remote is an untrusted source: BLAKE3, never only XXH3

    def _whole(self, row):
        data, payload = super()._whole(row)
        with self._count:
            self.fetched += len(data)
        return data, payload


class RemoteStore(Reading):
    """A remote opened for reading: get(), load(), open(), manifest(), diff(), resolve(), log(), models()."""

    def __init__(self, url: str, threads: int = TRANSFER_THREADS, remote: Remote | None = None):
        self.remote = remote or Remote(url, threads=threads)
        self.remote.check()
        self.url, self.threads = url, threads
        self.root = Path(url.replace("://", "/"))  # names versions in messages only; nothing is written there
        self.catalog = Catalog(Path(":memory:"))
        self.catalog.create()
        self.backend = self.remote.backend
        self.reader = _CountingReader(self.backend, self.catalog.chunk)

    @property
    def bytes_fetched(self) -> int:
        """Bytes of chunk objects fetched so far (version records and refs not counted)."""
        return self.reader.fetched

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "RemoteStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def resolve(self, model: str, ref: str = "latest") -> str:
        vid = self.remote.resolve(model, ref)
        if not self.catalog.one("SELECT 1 FROM versions WHERE id=?", (vid,)):
            record = self.remote.record(vid)
            with self.catalog.transaction() as catalog:
                for row, digest in record.chunks.values():
                    catalog.insert_chunk(row, digest)
                catalog.insert_version(record.version)
        return vid

    def _materialise(self, records, threads: int | None) -> dict[str, torch.Tensor]:
        return super()._materialise(records, threads or max(self.threads, os.cpu_count() or 1))

    def models(self) -> list[tuple[str, int]]:
        """(model, number of versions its refs name) on the remote."""
        named: dict[str, set[str]] = {}
        for (model, _), vid in self.remote.refs().items():
            named.setdefault(model, set()).add(vid)
        return sorted((model, len(vids)) for model, vids in named.items())

    def stored_bytes(self, model: str, ref: str = "latest", exclusive_of: str | None = None) -> int:
        """As a store's; a parent that was never pushed counts as nothing shared."""
        if exclusive_of is not None:
            try:
                self.resolve(model, exclusive_of)
            except VersionNotFoundError:
                exclusive_of = None
        return super().stored_bytes(model, ref, exclusive_of)

    def log(self, model: str) -> list[VersionInfo]:
        """The version a model's `latest` names and its ancestors the remote holds, newest first."""
        out, vid = [], self.remote.resolve(model, "latest")
        while vid and len(out) < 10_000:
            try:
                record = self.remote.record(vid)
            except ModelpressError:  # an ancestor that was never pushed ends the history
                break
            out.append(record.version.info)
            vid = record.version.info.parent
        return out
