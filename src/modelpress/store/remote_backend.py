"""Remote object stores: a URL becomes an `ObjectStore` (backend.py) through fsspec.

- `file:///path` or a plain path: `LocalFolder` itself (atomic link/rename, compare-and-swap under flock).
- `s3://bucket/prefix`: s3fs. Every PUT is atomic on S3 (an object appears whole or not at all);
  `put_if_absent` and `put_if_match` are S3's conditional writes (`If-None-Match: *`, `If-Match: ETag`),
  made through s3fs's botocore client. Credentials and the endpoint come from the usual AWS variables
  (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL_S3`, ...) or the profile files; nothing about
  them is ever written into a store.
- any other fsspec protocol (`memory://` in tests): whole-object writes, conditional writes made
  atomic by a lock in this process only (good for tests, not for two machines).

Reads are bounded: `get(key, limit)` asks for at most limit + 1 bytes, so an object longer than its
record says is refused without reading it whole.
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import fsspec
import fsspec.asyn

from modelpress.errors import LimitExceededError, ModelpressError, StorageIOError, StoreError
from modelpress.store.backend import Entry, LocalFolder, ObjectStore, Parts, content_tag

__all__ = ["FsspecStore", "open_backend", "is_url"]


def is_url(text: str) -> bool:
    return isinstance(text, str) and "://" in text


def open_backend(url: str) -> ObjectStore:
    """The object store of a remote URL (see the module docstring)."""
    if not is_url(url) or url.startswith("file://"):
        root = Path(url[len("file://"):] if url.startswith("file://") else url)
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise StoreError(f"remote {url!r} is not a folder: give a folder (or an s3:// URL)")
        return LocalFolder(root)  # (created by the first push: Remote.ensure)
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        hint = "pip install 'modelpress[remote]'" if url.startswith("s3://") else "use s3://, file:// or a folder"
        raise StoreError(f"cannot open remote {url!r} ({exc}): {hint}") from None
    return FsspecStore(fs, path.rstrip("/"), url)


def _modified(info: dict[str, Any]) -> float:
    for name in ("LastModified", "mtime", "created"):
        value = info.get(name)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 error is a failed condition (412) or a conflicting concurrent conditional write (409)."""
    text = repr(exc) + repr(getattr(exc, "__cause__", ""))
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if hasattr(exc, "response") else ""
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or "PreconditionFailed" in text or \
        "ConditionalRequestConflict" in text or "412" in text


class FsspecStore(ObjectStore):
    """Objects under `root` of an fsspec file system; keys are `root/key`."""

    def __init__(self, fs, root: str, url: str):
        self.fs, self.root, self.url = fs, root, url
        self.s3 = type(fs).__name__ == "S3FileSystem"
        self._lock = threading.Lock()

    def _path(self, key: str) -> str:
        if not key or key[0] == "/" or "\0" in key or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"invalid object key {key!r}")
        return f"{self.root}/{key}"

    def _error(self, exc: Exception, action: str, key: str) -> Exception:
        if isinstance(exc, (FileNotFoundError, ModelpressError)):
            return exc
        return StorageIOError(f"remote {self.url}: {action} {key!r} failed ({type(exc).__name__}: {exc}); check the "
                              "network and credentials (AWS_* variables or a profile), then run the command again")

    def get(self, key: str, limit: int) -> bytes:
        try:
            data = self.fs.cat_file(self._path(key), start=0, end=limit + 1)
        except Exception as exc:
            raise self._error(exc, "reading", key) from None
        if len(data) > limit:
            raise LimitExceededError(f"remote object {key!r} is more than the {limit} bytes it may be; the remote "
                                     "is damaged: run `modelpress store remote verify`")
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            return self.fs.cat_file(self._path(key), start=start, end=start + length)
        except Exception as exc:
            raise self._error(exc, "reading", key) from None

    def put(self, key: str, parts: Parts) -> None:
        data = b"".join(bytes(p) for p in parts)
        try:
            self.fs.pipe_file(self._path(key), data)
        except Exception as exc:
            raise self._error(exc, "writing", key) from None

    def _s3_put(self, key: str, data: bytes, **condition: str) -> bool:
        bucket, _, name = self._path(key).partition("/")
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=name, Body=data, **condition)
        except Exception as exc:
            if _precondition_failed(exc):
                return False
            raise self._error(exc, "writing", key) from None
        self.fs.invalidate_cache(self._path(key))
        return True

    def put_if_absent(self, key: str, parts: Parts) -> bool:
        data = b"".join(bytes(p) for p in parts)
        if self.s3:
            return self._s3_put(key, data, IfNoneMatch="*")
        with self._lock:
            if self.fs.exists(self._path(key)):
                return False
            self.put(key, [data])
            return True

    def get_tagged(self, key: str, limit: int) -> tuple[bytes, str]:
        if not self.s3:
            with self._lock:
                data = self.get(key, limit)
            return data, content_tag(data)
        bucket, _, name = self._path(key).partition("/")

        async def fetch() -> tuple[bytes, str]:
            reply = await self.fs._call_s3("get_object", Bucket=bucket, Key=name, Range=f"bytes=0-{limit}")
            async with reply["Body"] as body:
                return await body.read(), reply["ETag"]
        try:
            data, etag = fsspec.asyn.sync(self.fs.loop, fetch)
        except Exception as exc:
            raise self._error(exc, "reading", key) from None
        if len(data) > limit:
            raise LimitExceededError(f"remote object {key!r} is more than the {limit} bytes it may be; the remote "
                                     "is damaged: run `modelpress store remote verify`")
        return data, etag

    def put_if_match(self, key: str, data: bytes, tag: str | None) -> bool:
        if self.s3:
            return self._s3_put(key, data, **({"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}))
        with self._lock:
            try:
                current = content_tag(self.get(key, max(len(data), 1 << 20)))
            except FileNotFoundError:
                current = None
            if current != tag:
                return False
            self.put(key, [data])
            return True

    def list(self, prefix: str) -> Iterator[Entry]:
        top = self._path(prefix)
        try:
            self.fs.invalidate_cache(top)
            found = self.fs.find(top, detail=True)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise self._error(exc, "listing", prefix) from None
        start = len(self.root) + 1
        for path, info in found.items():
            path = path.lstrip("/") if not self.root.startswith("/") else path
            if info.get("type", "file") == "file" and path.startswith(self.root + "/"):
                yield Entry(path[start:], int(info.get("size") or 0), _modified(info))

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._error(exc, "removing", key) from None

    def remove_stale_temporaries(self, older_than: float) -> int:
        return 0  # every write lands whole or not at all: nothing half-written to remove
