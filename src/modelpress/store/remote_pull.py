"""`pull` and `clone`: versions from a remote into a local store, fetching only the chunks it lacks.

Each fetched chunk is checked in memory before it is written anywhere: its object must be exactly the
size its record says, and it is read through the store's one chunk reader (reader.py), which checks
the head against the row, the whole file against its hash, decodes it (the base of a delta from the
local store or from what this pull already landed) and checks the decoded bytes' BLAKE3 against the
chunk's id. Only then is it written, through the store's own write path (writing.py: a temporary, an
atomic link, and at the commit the catalogue rows), and the version and refs land in one catalogue
transaction. A hostile remote can therefore make a pull fail, never change a local version; a pull
that fails or is killed leaves only verified chunk files without rows, which the next pull adopts
(read back and checked, not fetched again) and `gc` removes after its grace period otherwise.
"""

from __future__ import annotations

import threading
from pathlib import Path

from modelpress import limits
from modelpress.errors import ModelpressError, StoreError
from modelpress.store.backend import ObjectStore
from modelpress.store.objects import MAX_CHUNK_RAW, ChunkHeader, chunk_key, stored_bound
from modelpress.store.reader import ChunkReader
from modelpress.store.remote import Remote, TransferReport
from modelpress.store.remote_config import add_remote
from modelpress.store.remote_push import local_ancestors
from modelpress.store.remote_records import RemoteVersion, split_ref
from modelpress.store.rows import ChunkRow
from modelpress.store.store import Store

__all__ = ["pull", "clone"]


class _Arrived(ObjectStore):
    """One fetched chunk in memory, in front of the local store (where the bases of deltas are)."""

    def __init__(self, key: str, data: bytes, local: ObjectStore):
        self.key, self.data, self.local = key, data, local

    def get(self, key: str, limit: int) -> bytes:
        if key == self.key:
            return self.data
        return self.local.get(key, limit)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.data[start:start + length] if key == self.key else self.local.get_range(key, start, length)

    def put_if_absent(self, key, parts) -> bool:
        raise StoreError("a pulled chunk is read-only while it is checked")

    put = list = delete = remove_stale_temporaries = put_if_absent


def _targets(remote: Remote, spec: str | None) -> dict[str, list[tuple[str, str]]]:
    """Version id -> the (model, ref) pairs to point at it."""
    out: dict[str, list[tuple[str, str]]] = {}
    if spec:
        model, ref = split_ref(spec)
        vid = remote.resolve(model, ref)
        out[vid] = [(model, ref)] if remote.read_ref(model, ref) == vid else []
        return out
    for (model, ref), vid in sorted(remote.refs().items()):
        out.setdefault(vid, []).append((model, ref))
    if not out:
        raise StoreError(f"{remote.url} holds no refs: nothing to pull")
    return out


def _rounds(record: RemoteVersion, wanted: list[str]) -> list[list[str]]:
    """The chunks to fetch, bases before the deltas on them."""
    left, done, rounds = set(wanted), set(), []
    while left:
        ready = sorted(c for c in left if record.chunks[c][0].base not in left)
        if not ready:
            raise StoreError(f"version {record.id[:12]}'s deltas form a cycle on the remote; the remote is damaged")
        rounds.append(ready)
        left -= set(ready)
        done |= set(ready)
    return rounds


def _fetch_version(store: Store, remote: Remote, record: RemoteVersion, written: dict, report: TransferReport) -> None:
    lock = threading.Lock()
    wanted, have_rows = [], {}
    for cid, (row, _) in record.chunks.items():
        if store.catalog.has_chunk(cid) or cid in written:
            have_rows[cid] = True
            report.chunks_skipped += 1
            report.bytes_skipped += record.chunk_bytes(cid)
            continue
        adopted = store._adopt(cid, row.raw_size)  # a verified file an interrupted pull left
        if adopted is not None:
            written[cid] = adopted
            report.chunks_skipped += 1
            report.bytes_skipped += record.chunk_bytes(cid)
            continue
        wanted.append(cid)

    def row_of(cid: str) -> ChunkRow:
        if cid in written and isinstance(written[cid][0], ChunkRow):
            return written[cid][0]
        if cid in have_rows or store.catalog.has_chunk(cid):
            return store.catalog.chunk(cid)
        return record.chunks[cid][0]

    def fetch(cid: str) -> None:
        row, digest = record.chunks[cid]
        size = record.chunk_bytes(cid)
        if row.raw_size > MAX_CHUNK_RAW or row.stored_size > stored_bound(row.raw_size):
            raise StoreError(f"chunk {cid[:12]}'s record on {remote.url} gives impossible sizes; the remote is "
                             "damaged: run `modelpress store remote verify`")
        limits.check_allocation(size, f"chunk {cid[:12]}")
        key = chunk_key(cid)
        try:
            data = bytes(remote.backend.get(key, size))
        except FileNotFoundError:
            raise StoreError(f"chunk {cid[:12]} of version {record.id[:12]} is missing on {remote.url}; the remote "
                             "is damaged: re-push the model from a store that has it") from None
        except ModelpressError as exc:
            raise StoreError(f"chunk {cid[:12]} on {remote.url}: {exc}") from None
        if len(data) != size:
            raise StoreError(f"chunk {cid[:12]} on {remote.url} is {len(data)} bytes, its record says {size} "
                             "(truncated or replaced); nothing was pulled: re-push the model")
        reader = ChunkReader(_Arrived(key, data, store.backend), row_of)
        try:
            reader.read(row, expect_file=digest)
        except ModelpressError as exc:
            raise StoreError(f"chunk {cid[:12]} on {remote.url} is damaged ({exc}); nothing was pulled: re-push "
                             "the model") from None
        header, offset = ChunkHeader.parse(memoryview(data), f"chunk {cid[:12]}")
        store._write_chunk(cid, header, memoryview(data)[offset:], written)
        with lock:
            report.chunks_sent += 1
            report.bytes_sent += size

    for batch in _rounds(record, wanted):
        remote.parallel(fetch, batch)


def _set_refs(store: Store, catalog, vid: str, refs: list[tuple[str, str]], report: TransferReport) -> None:
    ancestors = local_ancestors(store, vid)
    for model, ref in refs:
        row = catalog.one("SELECT version FROM refs WHERE model=? AND name=?", (model, ref))
        if row is None or row[0] in ancestors:
            catalog.set_ref(model, ref, vid)
            report.refs.append(f"{model}@{ref} -> {vid[:12]}")
        elif row[0] != vid:
            report.kept.append(f"{model}@{ref} stays at {str(row[0])[:12]}: it does not lead to {vid[:12]} "
                               f"(tag the pulled version yourself: `modelpress store tag STORE {model} "
                               f"{vid[:12]} NAME`)")


def pull(store: Store, remote: Remote, spec: str | None = None) -> TransferReport:
    """Pull `spec` (MODEL or MODEL@REF; every ref of the remote if None) into `store`."""
    remote.check()
    report = TransferReport()
    targets = _targets(remote, spec)
    records = [remote.record(vid) for vid in targets]
    report.record_bytes = sum(record.size for record in records)
    for record in records:
        for model, _ in targets[record.id]:
            if record.version.info.model != model:
                raise StoreError(f"ref of {model!r} on {remote.url} names a version of {record.version.info.model!r}"
                                 "; the remote is damaged")
    with store._lock(exclusive=False):
        written: dict = {}
        for record in records:
            _fetch_version(store, remote, record, written, report)
        with store.catalog.transaction() as catalog:
            for cid, entry in written.items():
                settled = entry if isinstance(entry[0], ChunkRow) else store._settle(cid, *entry)
                if settled is not None:
                    catalog.insert_chunk(*settled)
            for record in records:
                if catalog.insert_version(record.version):
                    report.versions.append(f"{record.version.info.model}@{record.id[:12]}")
            for record in records:
                _set_refs(store, catalog, record.id, targets[record.id], report)
    return report


def clone(url: str, folder: str | Path, name: str = "origin") -> tuple[Store, TransferReport]:
    """A new store in `folder` holding every ref of the remote, with the remote configured as `name`."""
    remote = Remote(url)
    remote.check()
    store = Store.init(folder)
    try:
        if store.models():
            raise StoreError(f"{str(folder)!r} already holds a store with models: clone into a new folder")
        add_remote(store.root, name, url)
        report = pull(store, remote)
    except BaseException:
        store.close()
        raise
    return store, report
