"""`Store(path)`: the embedded, model-aware store (a folder with chunk files and a SQLite catalogue).

    store = Store.init("models.mpstore")
    vid = store.put(model, "minilm-int4", message="int4 preset")   # a compressed model or a state dict
    state = store.get("minilm-int4", names=["*.word_embeddings.*"])  # tensors as views of one arena
    model = store.load("minilm-int4")                               # the runnable model, rebuilt
    with store.open("minilm-int4") as lazy: lazy["model.pooler.dense.bias"]

The class is put together from its sections: writing.py (put, tag), reading.py (get, load, open,
diff, sizes) and maintenance.py (verify, gc); this file opens and creates stores.

Writes: chunk files first (atomic, fsynced), then one catalogue transaction makes the version
visible; a crash at any point leaves no partial version and loses nothing committed. Writers share
the `lock` file, gc takes it alone. Reads take no lock: versions are immutable and gc never removes
a chunk a version uses, so a reader always sees a whole version (or a clear error).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from modelpress import fileio
from modelpress.errors import FormatError, ModelpressError, StoreError, VersionNotFoundError
from modelpress.store.backend import LocalFolder
from modelpress.store.catalog import Catalog
from modelpress.store.maintenance import Maintenance
from modelpress.store.reader import ChunkReader
from modelpress.store.reading import Reading
from modelpress.store.remote_store import RemoteStore
from modelpress.store.rows import VersionInfo
from modelpress.store.writing import Writing

__all__ = ["Store", "STORE_FORMAT", "STORE_VERSION"]

MARKER = fileio.STORE_MARKER
STORE_FORMAT = "modelpress.store"
STORE_VERSION = 1
_FOLDERS = ("chunks", "tmp")  # (an old store's `cache/` is no longer used; gc removes it)


class _Open:
    """`Store.open(URL)` on the class: a remote opened for reading (remote_store.py), e.g.
    `Store.open("s3://bucket/models").get("minilm-int4")`; `store.open(model, ref)` on a store: lazy access
    to a version's tensors (reading.py)."""

    def __get__(self, obj, owner):
        if obj is None:
            return RemoteStore
        return Reading.open.__get__(obj, owner)


class Store(Writing, Reading, Maintenance):
    """A model-aware store in a local folder."""

    open = _Open()

    def __init__(self, path: str | Path):
        self.root = Path(path)
        marker = self.root / MARKER
        if not marker.is_file():
            raise StoreError(f"{str(self.root)!r} is not a modelpress store: create one with `modelpress store init PATH`")
        try:
            info = json.loads(fileio.read_file(marker, 4096, "store marker").decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise FormatError(f"{marker}: unreadable store marker; restore it from a backup") from None
        if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
            raise FormatError(f"{marker}: not a modelpress store marker")
        if info.get("version") != STORE_VERSION:
            raise FormatError(f"{marker}: store format {info.get('version')!r} is not supported "
                              f"(this modelpress reads {STORE_VERSION}); upgrade modelpress")
        for name in _FOLDERS:
            folder = self.root / name
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise StoreError(f"{folder} is a symbolic link or not a folder; a store's {name}/ must be a plain "
                                 "folder: move it away (gc and put recreate tmp/; restore chunks/ from a backup)")
        self.catalog = Catalog(self.root / "catalog.sqlite")
        try:
            self.catalog.check()
        except BaseException:
            self.catalog.close()
            raise
        self.backend = LocalFolder(self.root)
        self.reader = ChunkReader(self.backend, self.catalog.chunk)

    @classmethod
    def init(cls, path: str | Path) -> "Store":
        """Create an empty store (or open the one already there)."""
        root = Path(path)
        if (root / MARKER).is_file():
            return cls(root)
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise StoreError(f"{str(root)!r} exists and is not a folder: give a new or empty folder for the store")
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{str(root)!r} exists and is not empty: give a new or empty folder for the store")
        try:
            for sub in _FOLDERS:
                fileio.make_dirs(root / sub)
        except ModelpressError as exc:
            raise StoreError(f"cannot create a store at {str(root)!r}: {exc}") from None
        catalog = Catalog(root / "catalog.sqlite")
        try:
            catalog.create()
        finally:
            catalog.close()
        with fileio.locked(root / "lock", exclusive=True):
            pass
        fileio.write_file(root / MARKER, json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}).encode())
        return cls(root)

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        """Writers share the lock; gc takes it alone, so it never removes a chunk a writer is adding."""
        with fileio.locked(self.root / "lock", exclusive, "the store's lock file"):
            yield

    def resolve(self, model: str, ref: str = "latest") -> str:
        """A version id from a ref, a full id, or a unique prefix of one (VersionNotFoundError if none)."""
        return self.catalog.resolve(model, ref)

    def log(self, model: str) -> list[VersionInfo]:
        versions = self.catalog.log(model)
        if not versions:
            raise VersionNotFoundError(f"model {model!r} is not in the store: see `modelpress store ls`")
        return versions

    def models(self) -> list[tuple[str, int]]:
        return self.catalog.models()
