"""A remote: a modelpress store's chunks, version records and refs on object storage (S3 through s3fs, a
folder, or any fsspec file system). See docs/STORE_FORMAT.md, "Remotes".

    remote = Remote("s3://bucket/models")
    report = remote.push(store, "minilm-int4")        # only the chunks the remote lacks move
    report = remote.pull(store, "minilm-int4")        # each chunk checked before it lands locally
    Store.open("s3://bucket/models").get("minilm-int4")   # straight from the remote (remote_store.py)

This module holds what push, pull, verify and gc share: the marker, refs (read with their tag, written
by compare-and-swap), version records, the listing of the chunks present (one listing, not a request
per chunk) and the thread pool that moves chunks. The operations themselves live in remote_push.py,
remote_pull.py and remote_maint.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

from modelpress.errors import FormatError, StoreError, VersionNotFoundError
from modelpress import fileio
from modelpress.store.backend import LocalFolder, ObjectStore
from modelpress.store.objects import ID_PATTERN
from modelpress.store.remote_backend import open_backend
from modelpress.store.remote_records import (
    MARKER_KEY,
    MAX_CHAIN,
    MAX_RECORD,
    MAX_REF,
    REMOTE_VERSION,
    RemoteVersion,
    check_marker,
    decode_record,
    decode_ref,
    encode_ref,
    marker_bytes,
    ref_key,
    version_key,
)
from modelpress.store.writing import check_name

__all__ = ["Remote", "TransferReport", "TRANSFER_THREADS"]

TRANSFER_THREADS = 16  # chunks in flight at once (network latency, not CPU, bounds a transfer)
T = TypeVar("T")


@dataclass
class TransferReport:
    """What a push or pull moved: chunks and bytes sent (or fetched) and skipped because the other side had them."""
    chunks_sent: int = 0
    bytes_sent: int = 0
    chunks_skipped: int = 0
    bytes_skipped: int = 0
    record_bytes: int = 0  # version records, refs and push markers
    versions: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)  # "model@ref -> id" moved
    kept: list[str] = field(default_factory=list)  # refs left as they were, and why
    delta_bytes: int | None = None  # a push: the pushed versions' local delta over their parents, where local
    delta_rows: int = 0  # of which catalogue rows (the rest: chunk files)

    @property
    def total_bytes(self) -> int:
        return self.bytes_sent + self.record_bytes

    def line(self, verb: str) -> str:
        return (f"{verb} {self.chunks_sent} chunks ({self.bytes_sent} bytes) + {self.record_bytes} bytes of records, "
                f"refs and markers; skipped {self.chunks_skipped} chunks ({self.bytes_skipped} bytes) already there")

    def delta_line(self) -> str | None:
        """A push of children: what it sent against their local delta over their parents."""
        if not self.delta_bytes:
            return None
        return (f"local delta over the parent: {self.delta_bytes} bytes ({self.delta_bytes - self.delta_rows} of chunk "
                f"files, {self.delta_rows} of catalogue rows); this push sent {self.total_bytes} bytes "
                f"({100.0 * self.total_bytes / self.delta_bytes:.2f}% of it)")


class Remote:
    """One remote, opened from its URL (nothing about credentials is kept: the backend finds them)."""

    def __init__(self, url: str, backend: ObjectStore | None = None, threads: int = TRANSFER_THREADS):
        self.url = url
        self.backend = backend if backend is not None else open_backend(url)
        self.threads = threads
        self._records: dict[str, RemoteVersion] = {}

    # -- marker -----------------------------------------------------------------------------------

    def check(self) -> int:
        """Refuse a URL that holds no modelpress remote (an empty one is made one by `ensure`); its format version."""
        try:
            data = self.backend.get(MARKER_KEY, MAX_REF)
        except FileNotFoundError:
            raise StoreError(f"{self.url} holds no modelpress remote: push to it first (`modelpress store push`)"
                             ) from None
        return check_marker(data, self.url)

    def ensure(self) -> None:
        """Make the URL a remote of this format (write its marker) unless it is one; refuse one with another
        marker. A version 1 remote is marked version 2 first, so that an older modelpress (whose gc could not
        read the records a push now writes) refuses it rather than misreads it."""
        if isinstance(self.backend, LocalFolder) and not self.backend.root.is_dir():
            fileio.make_dirs(self.backend.root)
        if not self.backend.put_if_absent(MARKER_KEY, [marker_bytes()]):
            if self.check() != REMOTE_VERSION:
                self.backend.put(MARKER_KEY, [marker_bytes()])

    # -- refs and records -------------------------------------------------------------------------

    def refs(self, model: str | None = None) -> dict[tuple[str, str], str]:
        """(model, ref) -> version id of every ref on the remote (or of one model's)."""
        out = {}
        for entry in self.backend.list(f"refs/{model}" if model else "refs"):
            parts = entry.key.split("/")
            if len(parts) != 3:
                continue
            try:
                check_name(parts[1], "model")
                check_name(parts[2], "ref")
            except StoreError:
                continue  # not ours: a hostile or foreign key is never turned into a name
            vid = self.read_ref(parts[1], parts[2])
            if vid is not None:
                out[(parts[1], parts[2])] = vid
        return out

    def read_ref(self, model: str, ref: str) -> str | None:
        return self.tagged_ref(model, ref)[0]

    def tagged_ref(self, model: str, ref: str) -> tuple[str | None, str | None]:
        """(version id, tag) of a ref, (None, None) if there is none."""
        try:
            data, tag = self.backend.get_tagged(ref_key(model, ref), MAX_REF)
        except FileNotFoundError:
            return None, None
        return decode_ref(data, model, ref, self.url), tag

    def resolve(self, model: str, ref: str = "latest") -> str:
        """A version id from a ref, a full id or a unique prefix (>= 6 hex digits) of a version of `model`."""
        check_name(model, "model")
        vid = self.read_ref(model, ref) if _plain(ref) else None
        if vid is not None:
            return vid
        if len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref):
            found = [v for v in self.version_ids() if v.startswith(ref)]
            if len(found) == 1:
                if self.record(found[0]).version.info.model == model:
                    return found[0]
            elif len(found) > 1:
                raise VersionNotFoundError(f"version prefix {ref!r} is ambiguous on {self.url}: give more digits")
        raise VersionNotFoundError(f"model {model!r} has no ref or version {ref!r} on {self.url}: see "
                                   f"`modelpress store ls {self.url}`")

    def record(self, vid: str, _chain: tuple[str, ...] = (), fresh: bool = False) -> RemoteVersion:
        """A version record, checked (root hash, chunk rows), with the records it is coded against; a ref naming a
        missing one is a clear error. Records are immutable and named by their hash: each is read once
        (`fresh`: read again, with every record it is coded against, to see that they are all still there)."""
        if fresh:
            return Remote(self.url, self.backend, self.threads).record(vid)
        cached = self._records.get(vid)
        if cached is not None:
            return cached
        if vid in _chain or len(_chain) > MAX_CHAIN:
            raise FormatError(f"version record {_chain[0][:12]} on {self.url} is coded against a chain of more than "
                              f"{MAX_CHAIN} records or a loop; the remote is damaged")
        try:
            data = self.backend.get(version_key(vid), MAX_RECORD)
        except FileNotFoundError:
            raise FormatError(f"version {vid[:12]} is named on {self.url} but its record is missing; the remote is "
                              "damaged: re-push the model (or run `modelpress store remote verify`)") from None
        record = decode_record(data, vid, self.url, lambda base: self.record(base, _chain + (vid,)))
        self._records[vid] = record
        return record

    def version_ids(self) -> list[str]:
        return [e.key.split("/", 1)[1] for e in self.backend.list("versions")
                if ID_PATTERN.match(e.key.split("/", 1)[1])]

    def chunk_sizes(self) -> dict[str, int]:
        """Chunk id -> object size of every chunk on the remote: one listing (paged by the store), no per-chunk
        request."""
        out = {}
        for entry in self.backend.list("chunks"):
            name = entry.key.rsplit("/", 1)[-1]
            if ID_PATTERN.match(name) and entry.key == f"chunks/{name[:2]}/{name}":
                out[name] = entry.size
        return out

    def cas_ref(self, model: str, ref: str, vid: str, tag: str | None) -> bool:
        """Point a ref at `vid` if it still has `tag` (None: if it is still absent)."""
        return self.backend.put_if_match(ref_key(model, ref), encode_ref(vid), tag)

    # -- moving chunks ----------------------------------------------------------------------------

    def parallel(self, fn: Callable[[T], None], items: Iterable[T]) -> None:
        """Run `fn` on every item, `threads` at a time; the first failure stops what has not started and is raised."""
        items = list(items)
        if not items:
            return
        failures: list[BaseException] = []

        def guarded(item: T) -> None:
            if failures:
                return
            try:
                fn(item)
            except BaseException as exc:  # raised below, in the caller's thread
                failures.append(exc)

        with ThreadPoolExecutor(max_workers=min(self.threads, len(items))) as pool:
            list(pool.map(guarded, items))
        if failures:
            raise failures[0]


def _plain(ref: str) -> bool:
    try:
        check_name(ref, "ref")
    except StoreError:
        return False
    return True
