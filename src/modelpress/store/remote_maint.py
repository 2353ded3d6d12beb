"""Remote `verify` (what is damaged on a remote, exactly) and remote `gc` (what no ref needs).

verify reads every ref, every version record (root hash, chunk rows) and every chunk object a record
lists: its size from one listing, then (unless `quick`) its bytes through the chunk reader — whole
file against the recorded hash, decoded bytes against the chunk's BLAKE3 id.

gc keeps every version a ref reaches (following parents as far as the remote holds them), every
record a kept record is coded against (its parent's, and so on: remote_records.py), every
version record younger than the grace period (a push in flight writes its record before its ref),
every chunk those versions use, and every chunk object younger than the grace period (a push in
flight uploads chunks before its record), and every version and chunk a live push marker names; it
removes the rest. It writes its own marker first and reads the push markers before the refs
(remote_leases.py: the handshake that keeps a push in flight from losing a chunk it skipped, however
old). It refuses to remove anything while a ref, kept record or live push marker is unreadable (a
damaged one could make needed chunks look unused), and stops deleting when its lease runs out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from modelpress.errors import ModelpressError, StoreError
from modelpress.store.backend import ObjectStore
from modelpress.store.maintenance import GC_GRACE
from modelpress.store.objects import chunk_key
from modelpress.store.reader import ChunkReader
from modelpress.store.remote import Remote
from modelpress.store.remote_leases import GcLease, begin_gc, protected, stale_gc_markers
from modelpress.store.remote_records import RemoteVersion, version_key
from modelpress.store.rows import ChunkRow

__all__ = ["RemoteVerifyReport", "RemoteGcReport", "verify_remote", "gc_remote"]


@dataclass(frozen=True)
class RemoteVerifyReport:
    refs: int
    versions: int
    checked: int  # chunk objects checked
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class RemoteGcReport:
    chunks_removed: int
    bytes_removed: int
    versions_removed: int
    kept_young: int
    kept_for_pushes: int = 0  # unreferenced chunks a push in flight may rely on
    markers_removed: int = 0  # stale markers of killed pushes and gcs
    stopped: bool = False  # the lease ran out before every deletion: run gc again


def _records(remote: Remote, problems: list[str]) -> dict[str, RemoteVersion]:
    """Every version record a ref reaches (with its parents the remote holds); problems noted."""
    found: dict[str, RemoteVersion] = {}
    todo = []
    for entry in remote.backend.list("refs"):
        parts = entry.key.split("/")
        try:
            vid = remote.read_ref(parts[1], parts[2]) if len(parts) == 3 else None
        except ModelpressError as exc:
            problems.append(f"ref {entry.key}: {exc}")
            continue
        if vid is None:
            problems.append(f"ref {entry.key}: not a ref of this layout")
            continue
        todo.append((vid, True))
    while todo:
        vid, named = todo.pop()
        if vid in found:
            continue
        try:
            record = remote.record(vid)
        except ModelpressError as exc:
            if named:
                problems.append(f"version {vid}: {exc}")
            continue
        found[vid] = record
        if record.version.info.parent:
            todo.append((record.version.info.parent, False))  # history: kept if present, not required
    return found


def verify_remote(remote: Remote, quick: bool = False) -> RemoteVerifyReport:
    remote.check()
    problems: list[str] = []
    records = _records(remote, problems)
    sizes = remote.chunk_sizes()
    rows: dict[str, tuple[ChunkRow, str, int]] = {}
    for record in records.values():
        for cid, (row, digest) in record.chunks.items():
            rows[cid] = (row, digest, record.chunk_bytes(cid))
    checked = 0
    for cid, (row, digest, size) in sorted(rows.items()):
        if cid not in sizes:
            problems.append(f"missing chunk {cid}: a version uses it, the remote has no object for it")
            continue
        if sizes[cid] != size:
            problems.append(f"corrupt chunk {cid}: its object is {sizes[cid]} bytes, its record says {size}")
            continue
        checked += 1
        if quick:
            continue
        reader = ChunkReader(remote.backend, lambda c: rows[c][0])
        try:
            reader.read(row, expect_file=digest)
        except ModelpressError as exc:
            problems.append(f"corrupt chunk {cid}: {exc}")
    refs = sum(1 for _ in remote.backend.list("refs"))
    return RemoteVerifyReport(refs, len(records), checked, tuple(problems))


def gc_remote(remote: Remote, grace: float = GC_GRACE) -> RemoteGcReport:
    remote.check()
    lease = begin_gc(remote)
    try:
        return _collect(remote, grace, lease)
    finally:
        remote.backend.delete(lease.key)


def _collect(remote: Remote, grace: float, lease: GcLease) -> RemoteGcReport:
    pushes = protected(remote, lease)  # before the refs: see remote_leases.py
    problems: list[str] = []
    records = _records(remote, problems)
    if problems:
        raise StoreError(f"remote gc removed nothing: {problems[0]}; run `modelpress store remote verify`")
    cutoff = time.time() - grace
    backend: ObjectStore = remote.backend
    doomed_chunks = []
    kept = 0
    candidates = []
    for entry in list(backend.list("versions")):
        vid = entry.key.split("/", 1)[1]
        if vid in records:
            continue
        if entry.modified > cutoff or vid in pushes.versions:
            try:
                records[vid] = remote.record(vid)  # a push in flight: its chunks stay too
            except ModelpressError:
                pass
            kept += 1
            continue
        candidates.append((vid, entry.key))
    for record in list(records.values()):  # a kept record needs the records it is coded against
        for base in record.bases:
            records.setdefault(base, remote.record(base))
    doomed_versions = [version_key(vid) if len(vid) == 64 else key for vid, key in candidates if vid not in records]
    used = {cid for record in records.values() for cid in record.chunks}
    for_pushes = 0
    for entry in list(backend.list("chunks")):
        name = entry.key.rsplit("/", 1)[-1]
        if name in used:
            continue
        if name in pushes.chunks:
            for_pushes += 1
            continue
        if entry.modified > cutoff:
            kept += 1
            continue
        key = chunk_key(name) if entry.key == f"chunks/{name[:2]}/{name}" and len(name) == 64 else entry.key
        doomed_chunks.append((key, entry.size))
    removed = freed = versions_removed = 0
    for key in doomed_versions:
        if lease.expired():
            return RemoteGcReport(removed, freed, versions_removed, kept, for_pushes, 0, stopped=True)
        backend.delete(key)
        versions_removed += 1
    for key, size in doomed_chunks:
        if lease.expired():
            return RemoteGcReport(removed, freed, versions_removed, kept, for_pushes, 0, stopped=True)
        backend.delete(key)
        removed += 1
        freed += size
    markers = pushes.stale + [key for key in stale_gc_markers(remote, lease) if key != lease.key]
    for key in markers:
        backend.delete(key)
    return RemoteGcReport(removed, freed, versions_removed, kept, for_pushes, len(markers))
