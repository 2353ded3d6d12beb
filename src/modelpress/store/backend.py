"""Where chunk files live: a minimal key/bytes interface, and the local folder that implements it.

The store reads and writes chunks only through `ObjectStore` (keys such as `chunks/ab/ab12...`),
so that remotes (fsspec, S3) can implement the same few methods, and caching or logging can be
wrapper stores. Capability flags say what a backend can do beyond the minimum:

- `can_map`: `open(key)` gives a file descriptor (and the size) whose bytes can be read in place and mapped
  (the loader's fast paths: preadv into the arena, decoding from the page cache, mapping
  `aligned` payloads); without it the loader reads whole objects with `get`.
- `atomic_conditional_write`: `put_if_absent` is atomic (two writers can never both win).

Remotes (remote_backend.py) also use `get_tagged` / `put_if_match`, a compare-and-swap on one small
object (a ref): the write lands only if the object still has the tag (S3's ETag; here a BLAKE3 of
the bytes) that was read, or is still absent. LocalFolder does it under an exclusive flock of
`root/lock` with an atomic rename, so a folder (or a shared mount with working locks) is a remote too.

`LocalFolder` does every file operation through `modelpress.fileio` (regular files only, bounded
reads, atomic fsynced writes, fault points for tests).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import blake3

from modelpress import fileio
from modelpress.errors import ModelpressError, StorageIOError, StoreError

__all__ = ["Entry", "ObjectStore", "LocalFolder", "content_tag"]

Parts = Sequence[bytes | memoryview]


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    modified: float  # seconds since the epoch


class ObjectStore(ABC):
    """Keys to immutable byte strings."""

    can_map: ClassVar[bool] = False
    atomic_conditional_write: ClassVar[bool] = False

    @abstractmethod
    def get(self, key: str, limit: int) -> bytes:
        """The whole object, which must be at most `limit` bytes (LimitExceededError otherwise, before
        reading); FileNotFoundError if there is none."""

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """At most `length` bytes from `start` (fewer at the end of the object)."""

    @abstractmethod
    def put_if_absent(self, key: str, parts: Parts) -> bool:
        """Store the concatenated parts under `key` unless an object is there; False (nothing written) if one was."""

    @abstractmethod
    def put(self, key: str, parts: Parts) -> None:
        """Store the concatenated parts under `key`, atomically replacing any object there."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[Entry]:
        """Every object whose key starts with `prefix/` (no particular order)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object (nothing happens if there is none)."""

    @abstractmethod
    def remove_stale_temporaries(self, older_than: float) -> int:
        """Remove what writers that died left half-written, if at least `older_than` seconds old; how many."""

    def open(self, key: str) -> tuple[int, int]:
        """A read-only file descriptor of the object and its size (only where `can_map`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot map objects")

    def get_tagged(self, key: str, limit: int) -> tuple[bytes, str]:
        """The whole object (at most `limit` bytes) and its tag, for `put_if_match`; FileNotFoundError if none."""
        data = bytes(self.get(key, limit))
        return data, content_tag(data)

    def put_if_match(self, key: str, data: bytes, tag: str | None) -> bool:
        """Replace the object if it still has `tag` (None: only if there is none); False (nothing written) if not."""
        raise NotImplementedError(f"{type(self).__name__} has no compare-and-swap")


def content_tag(data: bytes) -> str:
    """The tag of an object where the store has no ETag of its own: the BLAKE3 of its bytes."""
    return blake3.blake3(data, max_threads=1).hexdigest()


class LocalFolder(ObjectStore):
    """Objects as files under `root` (key `a/b/c` is the file root/a/b/c); writes go through `root/tmp`."""

    can_map = True
    atomic_conditional_write = True  # link(2) fails when the name exists

    def __init__(self, root: Path, temporaries: str = "tmp"):
        self.root = Path(root)
        self.tmp = self.root / temporaries
        self._prefix = os.fspath(self.root) + "/"
        self._cas = threading.Lock()  # flock is per open file: threads of one process serialise here first

    def _path(self, key: str) -> str:
        """The file of a key (plain string work: a load forms one per chunk)."""
        if not key or key[0] == "/" or "\0" in key or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"invalid object key {key!r}")
        return self._prefix + key

    def _folder(self, folder: Path) -> None:
        """Make sure `folder` (inside root) is a real folder, creating it (and making that durable) if needed."""
        if folder.is_dir() and not folder.is_symlink():
            return
        if folder.is_symlink():
            raise StoreError(f"{folder} is a symbolic link; a store's folders must be plain folders: replace it "
                             "with a real folder")
        for above in reversed(folder.relative_to(self.root).parents):
            if (self.root / above).is_symlink():
                raise StoreError(f"{self.root / above} is a symbolic link; a store's folders must be plain folders")
        fileio.make_dirs(folder)
        fileio.fsync_dir(folder.parent)

    def get(self, key: str, limit: int) -> bytes:
        return fileio.read_buffer(self._path(key), limit, "chunk file")  # (a bytearray: no second copy)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        fd, _ = self.open(key)
        try:
            return os.pread(fd, length, start)
        except OSError as exc:
            raise StorageIOError(f"cannot read {key!r} ({exc.strerror})") from None
        finally:
            os.close(fd)

    def open(self, key: str) -> tuple[int, int]:
        return fileio.open_regular_sized(self._path(key), "chunk file")

    def _write(self, key: str, parts: Parts, replace: bool) -> bool:
        path = Path(self._path(key))
        self._folder(self.tmp)
        self._folder(path.parent)
        return fileio.publish(fileio.write_temp(self.tmp, path.name, parts), path, replace=replace)

    def put_if_absent(self, key: str, parts: Parts) -> bool:
        return self._write(key, parts, replace=False)

    def put(self, key: str, parts: Parts) -> None:
        self._write(key, parts, replace=True)

    def put_if_match(self, key: str, data: bytes, tag: str | None) -> bool:
        with self._cas, fileio.locked(self.root / "lock", exclusive=True, what="the remote's lock file"):
            try:
                current = content_tag(bytes(self.get(key, max(len(data), 1 << 20))))
            except FileNotFoundError:
                current = None
            if current != tag:
                return False
            self._write(key, [data], replace=True)
            return True

    def list(self, prefix: str) -> Iterator[Entry]:
        """Regular files and symbolic links (never followed) under root/prefix; folders that are links are skipped."""
        top = Path(self._path(prefix))
        if top.is_symlink() or not top.is_dir():
            return
        stack = [(top, prefix)]
        while stack:
            folder, key = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue  # removed meanwhile
            except OSError as exc:
                raise StorageIOError(f"cannot list {folder} ({exc.strerror})") from None
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    stack.append((Path(entry.path), f"{key}/{entry.name}"))
                elif stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
                    yield Entry(f"{key}/{entry.name}", info.st_size, info.st_mtime)

    def delete(self, key: str) -> None:
        try:
            fileio.remove_file(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if isinstance(exc, ModelpressError):
                raise
            raise StorageIOError(f"cannot remove {key!r} ({exc.strerror})") from None

    def remove_stale_temporaries(self, older_than: float) -> int:
        if self.tmp.is_symlink():
            raise StoreError(f"{self.tmp} is a symbolic link; a store's folders must be plain folders: replace it "
                             "with a real folder")
        if not self.tmp.is_dir():
            return 0
        cutoff, removed = time.time() - older_than, 0
        for entry in list(os.scandir(self.tmp)):
            try:
                info = entry.stat(follow_symlinks=False)
                if info.st_mtime > cutoff:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    fileio.remove_tree(entry.path)
                else:
                    fileio.remove_file(entry.path)  # a file, or a link itself (never what it points to)
            except FileNotFoundError:
                continue  # gone meanwhile
            except OSError as exc:
                if isinstance(exc, ModelpressError):
                    raise
                raise StorageIOError(f"cannot remove {entry.path} ({exc.strerror})") from None
            removed += 1
        return removed
