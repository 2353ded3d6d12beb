"""`push`: a local version onto a remote, sending only the chunks the remote lacks.

Order, so that a half-finished push is invisible, a killed one resumes, and a remote gc never deletes
what it relies on:
1. a push marker naming the versions it may rely on (its own and its parent's, whose record and chunks gc
   then keeps) and the chunks no such record names, then a wait for every remote gc that may have missed
   that marker (remote_leases.py: the handshake, and why it closes the race);
2. one listing of the remote's chunks (sizes included): a chunk there at its exact size is skipped;
3. the missing chunks, each read from the local store and checked against its recorded file hash
   (local damage is never spread), uploaded `threads` at a time; every upload is one atomic PUT (S3)
   or an atomic link (a folder), so a chunk is there whole or not at all;
4. the version record (named by the version's root hash, so writing it twice is harmless), coded against
   its parent's record where the remote holds it (remote_records.py);
5. each ref, by compare-and-swap: it moves only from what was read, and only forward (from an
   ancestor of the pushed version). A ref that another writer moved elsewhere meanwhile is a clear
   "fetch first" error; the versions of both writers stay on the remote;
6. last, the marker is removed.

A push killed at any point leaves chunks (and perhaps a record) that no ref names: readers never see
them, the next push skips them, and remote gc removes them after its grace period if nothing does.
"""

from __future__ import annotations

import threading

from modelpress.errors import CorruptChunkError, ModelpressError, StoreError
from modelpress.store.remote_leases import announce_push
from modelpress.store.objects import chunk_key, file_hash
from modelpress.store.remote import Remote, TransferReport
from modelpress.store.remote_records import RemoteVersion, encode_record, encode_ref, split_ref, version_key
from modelpress.store.rows import ChunkRow

__all__ = ["push", "local_ancestors", "FETCH_FIRST"]

FETCH_FIRST = "fetch first"
_CAS_TRIES = 8


def local_ancestors(store, vid: str, limit: int = 100_000) -> set[str]:
    """`vid` and every ancestor of it the local catalogue holds (the parent chain, as far as it is local)."""
    seen: set[str] = set()
    current: str | None = vid
    while current and current not in seen and len(seen) < limit:
        seen.add(current)
        row = store.catalog.one("SELECT parent FROM versions WHERE id=?", (current,))
        current = row[0] if row else None
    return seen


def _targets(store, spec: str | None) -> list[tuple[str, str, list[str]]]:
    """(model, version id, ref names to move) for each version to push."""
    if spec:
        model, ref = split_ref(spec)
        models = [(model, store.resolve(model, ref))]
    else:
        models = [(name, store.resolve(name, "latest")) for name, _ in store.models()]
    out = []
    for model, vid in models:
        names = [r[0] for r in store.catalog.rows("SELECT name FROM refs WHERE model=? AND version=? ORDER BY name",
                                                  (model, vid))]
        out.append((model, vid, names))
    return out


def _local_record(store, vid: str) -> RemoteVersion:
    version = store.catalog.version(vid).check()
    ids = sorted(store._chunks_of(version))
    rows = store.catalog.chunks(ids)
    chunks: dict[str, tuple[ChunkRow, str]] = {}
    for cid in ids:
        digest = store.catalog.file_hash(cid)
        if digest is None:
            raise CorruptChunkError(f"chunk {cid[:12]} has no file hash in the local catalogue: run "
                                    "`modelpress store verify`")
        chunks[cid] = (rows[cid], digest)
    return RemoteVersion(version, chunks)


def _upload(store, remote: Remote, record: RemoteVersion, ids: list[str], report: TransferReport) -> None:
    lock = threading.Lock()

    def send(cid: str) -> None:
        row, digest = record.chunks[cid]
        size = record.chunk_bytes(cid)
        data = store.backend.get(chunk_key(cid), size)
        if len(data) != size or file_hash(data) != digest:
            raise CorruptChunkError(f"local chunk {cid[:12]} does not match its recorded hash; nothing of it was "
                                    "sent: run `modelpress store verify`")
        remote.backend.put(chunk_key(cid), [data])
        with lock:
            report.chunks_sent += 1
            report.bytes_sent += size

    remote.parallel(send, ids)


def _missing(record: RemoteVersion, present: dict[str, int]) -> list[str]:
    return [cid for cid in record.chunks if present.get(cid) != record.chunk_bytes(cid)]


def _move_ref(store, remote: Remote, model: str, ref: str, vid: str, force: bool, report: TransferReport) -> None:
    ancestors = local_ancestors(store, vid)
    for _ in range(_CAS_TRIES):
        current, tag = remote.tagged_ref(model, ref)
        if current == vid:
            return
        if current is not None and current not in ancestors and not force:
            raise StoreError(f"{FETCH_FIRST}: {model}@{ref} on {remote.url} is at {current[:12]}, which "
                             f"{vid[:12]} does not descend from (another writer pushed meanwhile); your version is "
                             f"on the remote but no ref names it: pull (`modelpress store pull REMOTE {model}`), "
                             "put your change on top, and push again")
        if remote.cas_ref(model, ref, vid, tag):
            report.refs.append(f"{model}@{ref} -> {vid[:12]}")
            report.record_bytes += len(encode_ref(vid))
            return
    raise StoreError(f"{FETCH_FIRST}: {model}@{ref} on {remote.url} kept changing while this push tried to move it; "
                     "push again")


def _send(store, remote: Remote, records, bases: dict[str, RemoteVersion], report: TransferReport) -> None:
    """Steps 2-4: one listing, the missing chunks, the version records (each coded against its parent's record
    where the remote holds it)."""
    present = remote.chunk_sizes()
    for model, record, refs in records:
        missing = _missing(record, present)
        for cid in record.chunks:
            if cid not in missing:
                report.chunks_skipped += 1
                report.bytes_skipped += record.chunk_bytes(cid)
        _upload(store, remote, record, missing, report)
        present.update((cid, record.chunk_bytes(cid)) for cid in missing)
        data = encode_record(record.version, record.chunks, bases.get(record.id))
        if remote.backend.put_if_absent(version_key(record.id), [data]):
            report.record_bytes += len(data)
        else:
            try:  # already there (an earlier push): sent nothing, if it still reads, with every record under it
                remote.record(record.id, fresh=True)
            except ModelpressError:  # damaged, or coded against a record since removed: ours replaces it
                remote.backend.put(version_key(record.id), [data])
                report.record_bytes += len(data)
        report.versions.append(f"{model}@{record.id[:12]}")


def _delta(store, records, report: TransferReport) -> None:
    """The local delta of every pushed version over its parent (where the parent is local), for the report: the chunk
    files the parent does not use and the version's catalogue rows (the local counterpart of its record)."""
    for model, record, _ in records:
        parent = record.version.info.parent
        if parent and store.catalog.one("SELECT 1 FROM versions WHERE id=?", (parent,)):
            files, rows = store.added_bytes(model, record.id, parent)
            report.delta_bytes = (report.delta_bytes or 0) + files + rows
            report.delta_rows += rows


def _remote_bases(remote: Remote, records) -> dict[str, RemoteVersion]:
    """Pushed version id -> the record on the remote that names most of its chunks: its own (an earlier push got
    that far), else its parent's, where there is a readable one."""
    bases = {}
    for _, record, _ in records:
        for vid in (record.id, record.version.info.parent):
            try:
                if vid:
                    bases[record.id] = remote.record(vid)
                    break
            except ModelpressError:
                pass  # not there (or damaged): the next, or none
    return bases


def _announce(remote: Remote, records, bases: dict[str, RemoteVersion]):
    """The push marker: the pushed versions and their bases (gc keeps a named version's record and chunks), and the
    pushed chunks no base already names."""
    versions = [r.id for _, r, _ in records] + sorted({b.id for b in bases.values()})
    chunks = {c for _, r, _ in records for c in r.chunks if r.id not in bases or c not in bases[r.id].chunks}
    return announce_push(remote, versions, chunks)


def _chains_gone(remote: Remote, bases: dict[str, RemoteVersion]) -> bool:
    """Whether any base record, or any record a base is itself coded against, is no longer on the remote (one
    listing: nothing is downloaded)."""
    present = {entry.key for entry in remote.backend.list("versions")}
    return any(version_key(vid) not in present for base in bases.values() for vid in (base.id, *base.bases))


def _retire(remote: Remote, lease, report: TransferReport) -> None:
    """A marker replaced by a newer one: deleted, and its bytes counted as sent."""
    remote.backend.delete(lease.key)
    report.record_bytes += lease.size


def _announce_with_bases(remote: Remote, records, report: TransferReport,
                         bases: dict[str, RemoteVersion] | None = None):
    """Step 1 (and its renewal). A base record a gc deleted before this push's marker could be seen protects
    nothing: if any record of a base's chain is gone once that gc is over, the marker is written again naming
    every chunk, and the records stand alone."""
    bases = _remote_bases(remote, records) if bases is None else bases
    lease = _announce(remote, records, bases)
    if bases and _chains_gone(remote, bases):
        old, bases = lease, {}
        lease = _announce(remote, records, bases)
        _retire(remote, old, report)
    return lease, bases


def push(store, remote: Remote, spec: str | None = None, force: bool = False) -> TransferReport:
    """Push `spec` (MODEL or MODEL@VERSION; every model's latest if None) with the local refs that name it."""
    report = TransferReport()
    targets = _targets(store, spec)
    remote.ensure()
    records = [(model, _local_record(store, vid), refs) for model, vid, refs in targets]
    lease, bases = _announce_with_bases(remote, records, report)
    try:
        _send(store, remote, records, bases, report)
        while lease.expiring():  # slower than a marker protects: announce again and check again what is there
            old = lease
            lease, bases = _announce_with_bases(remote, records, report, bases)
            _retire(remote, old, report)
            again = TransferReport()
            _send(store, remote, records, bases, again)
            report.chunks_sent += again.chunks_sent
            report.bytes_sent += again.bytes_sent
            report.record_bytes += again.record_bytes
        for model, record, refs in records:
            for ref in refs:
                _move_ref(store, remote, model, ref, record.id, force, report)
    finally:
        report.record_bytes += lease.size
        try:
            remote.backend.delete(lease.key)
        except (ModelpressError, OSError):
            pass  # left behind, a marker only keeps its chunks from gc until it is stale
    _delta(store, records, report)
    return report
