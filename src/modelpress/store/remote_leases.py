"""Push and gc markers: how a push and a remote gc that overlap never leave a ref naming a deleted chunk.

The race they close: a push lists the remote's chunks and skips one that is there but unreferenced (an
old version's, say); a gc that decided, before the push's record and ref landed, that the chunk was
unreachable then deletes it; the push's ref now names a version with a missing chunk. The chunk's age
cannot help (it is old), nor can the push's record (gc read the records before it landed).

The protocol (a Dekker-style handshake over the object store; each step a whole-object write or a listing):

    push:  write pushes/<token> (versions, chunk ids)        gc:  write gc/<token>
           list gc/: wait until every gc marker seen             list pushes/: read each marker, keep what it names
             there is gone (or stale)                            read refs, records, list chunks; delete
           list chunks, upload the missing ones, record, refs     delete gc/<token>
           delete pushes/<token>

A marker names the pushed versions and a base version already on the remote (gc keeps a named version's
record, the records it is coded against and every chunk they use), and the chunks no such record names:
together, every chunk the push may skip. A base record a gc removed before the marker was seen is noticed
once the push has waited for that gc (it is no longer listed): the push then names every chunk instead.
Each side writes its marker before it reads the other's, so of a push and a gc that overlap, at least
one sees the other. If gc sees the push's marker, it keeps every chunk the push may skip. If it does
not, gc wrote its marker before the push wrote its own, so the push sees gc's marker and lists the
chunks only after that gc has finished deleting. gc reads the push markers before the refs, so a push
that finished (ref moved, then marker deleted) before gc's marker read is seen through its ref.

Markers of killed processes expire: times come from the object store's own clock (each listing's
modification times), compared only with each other, plus the local monotonic clock for time elapsed.
- A gc marker is stale GC_LEASE after it was written; gc stops deleting GC_LEASE - LEASE_MARGIN after it
  began (its own clock), so a push that ignores a stale gc marker lists after that gc's last delete.
- A push marker is stale PUSH_LEASE after it was written; a push that has run PUSH_LEASE - LEASE_MARGIN
  announces itself again (a new marker, the wait, a new listing) before it moves a ref.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from modelpress.errors import ModelpressError, StoreError
from modelpress.safeparse import load_json
from modelpress.store.objects import ID_PATTERN
from modelpress.store.remote import Remote

__all__ = ["GC_LEASE", "PUSH_LEASE", "LEASE_MARGIN", "PushLease", "GcLease", "announce_push", "wait_for_gc",
           "begin_gc", "protected", "Protected", "stale_gc_markers", "MAX_MARKER"]

GC_LEASE = 900.0  # seconds a gc may delete for after it began
PUSH_LEASE = 3600.0  # seconds a push marker protects its chunks (as the store's GC_GRACE)
LEASE_MARGIN = 60.0  # network latency and the object store's one-second timestamps
MAX_MARKER = 64 << 20  # a push marker: 65 bytes per chunk id
_POLL = 1.0


@dataclass
class PushLease:
    key: str
    started: float  # time.monotonic() before the marker was written
    size: int = 0  # bytes of the marker (a push reports what it wrote)

    def expiring(self) -> bool:
        return time.monotonic() - self.started > PUSH_LEASE - LEASE_MARGIN


@dataclass
class GcLease:
    key: str
    started: float  # time.monotonic() before the marker was written
    written: float  # the marker's modification time, by the object store's clock

    def expired(self) -> bool:
        return time.monotonic() - self.started > GC_LEASE - LEASE_MARGIN


def _written(remote: Remote, prefix: str, key: str) -> float:
    for entry in remote.backend.list(prefix):
        if entry.key == key:
            return entry.modified
    raise StoreError(f"the marker {key} just written to {remote.url} is not listed; the object store does not "
                     "list what it stores: use another")


def announce_push(remote: Remote, versions, chunk_ids) -> PushLease:
    """Write this push's marker (the versions and chunks it may rely on), then wait for every gc that could have
    missed it."""
    key = f"pushes/{uuid.uuid4().hex}"
    started = time.monotonic()
    body = {"format": "modelpress.push", "versions": sorted(versions), "chunks": sorted(chunk_ids)}
    data = json.dumps(body, separators=(",", ":")).encode()
    remote.backend.put(key, [data])
    try:
        wait_for_gc(remote, _written(remote, "pushes", key))
    except BaseException:
        remote.backend.delete(key)
        raise
    return PushLease(key, started, len(data))


def wait_for_gc(remote: Remote, mine: float) -> None:
    """Wait until every gc marker listed now is gone or stale (GC_LEASE older than `mine`, a time on the object
    store's clock just after which it was listed)."""
    listed_at = time.monotonic()
    seen = {e.key: e.modified for e in remote.backend.list("gc")}
    while seen:
        elapsed = time.monotonic() - listed_at
        live = {e.key for e in remote.backend.list("gc")}
        seen = {k: t for k, t in seen.items() if k in live and mine + elapsed - t <= GC_LEASE}
        if seen and elapsed > GC_LEASE + LEASE_MARGIN:  # a marker dated in the future: the store's clock is wrong
            raise StoreError(f"push waited {elapsed:.0f} s for remote gc marker {min(seen)} on {remote.url}, longer "
                             "than a gc may run: if no gc is running there, remove that object and push again")
        if seen:
            time.sleep(_POLL)


def begin_gc(remote: Remote) -> GcLease:
    key = f"gc/{uuid.uuid4().hex}"
    started = time.monotonic()
    remote.backend.put(key, [json.dumps({"format": "modelpress.gc"}).encode()])
    return GcLease(key, started, _written(remote, "gc", key))


@dataclass
class Protected:
    """What the live push markers name, and the stale markers (of killed pushes) to remove."""
    chunks: set[str]
    versions: set[str]
    stale: list[str]


def _ids(body, field: str) -> list[str] | None:
    ids = body.get(field) if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(c, str) and ID_PATTERN.match(c) for c in ids):
        return None
    return ids


def protected(remote: Remote, lease: GcLease) -> Protected:
    """Read every push marker (after gc's own was written). A live marker that cannot be read stops gc: what it
    protects is unknown."""
    out = Protected(set(), set(), [])
    for entry in list(remote.backend.list("pushes")):
        if lease.written - entry.modified > PUSH_LEASE:
            out.stale.append(entry.key)
            continue
        try:
            body = load_json(remote.backend.get(entry.key, MAX_MARKER), f"push marker {entry.key}", MAX_MARKER)
        except FileNotFoundError:
            continue  # that push finished meanwhile: its ref (read after this) names its chunks
        except ModelpressError as exc:
            raise StoreError(f"remote gc removed nothing: push marker {entry.key} on {remote.url} is unreadable "
                             f"({exc}); remove it once no push is running, then run gc again") from None
        chunks, versions = _ids(body, "chunks"), _ids(body, "versions")
        if chunks is None or versions is None:
            raise StoreError(f"remote gc removed nothing: push marker {entry.key} on {remote.url} is not a list of "
                             "chunk and version ids; remove it once no push is running, then run gc again")
        out.chunks.update(chunks)
        out.versions.update(versions)
    return out


def stale_gc_markers(remote: Remote, lease: GcLease) -> list[str]:
    """gc markers of killed gcs (GC_LEASE older than this gc's)."""
    return [e.key for e in remote.backend.list("gc") if lease.written - e.modified > GC_LEASE]
