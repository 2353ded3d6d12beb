"""The SQLite catalogue: models, immutable versions, their tensors and files, chunks, and refs.

WAL mode lets readers run while one writer commits; `busy_timeout` makes concurrent writers
(several processes) queue instead of failing. A version becomes visible only in the single
transaction that inserts its rows, after all its chunk files are on disk.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from modelpress.errors import FormatError
from modelpress.store.objects import ID_PATTERN

__all__ = ["Catalog", "VersionInfo", "TensorRecord", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id TEXT PRIMARY KEY, codec TEXT NOT NULL, params TEXT NOT NULL,
    raw_size INTEGER NOT NULL, stored_size INTEGER NOT NULL, base TEXT, file_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, parent TEXT, created REAL NOT NULL,
    message TEXT NOT NULL, manifest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tensors (
    version TEXT NOT NULL, name TEXT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    chunks TEXT NOT NULL, PRIMARY KEY (version, name));
CREATE TABLE IF NOT EXISTS files (
    version TEXT NOT NULL, path TEXT NOT NULL, chunk TEXT NOT NULL, PRIMARY KEY (version, path));
CREATE TABLE IF NOT EXISTS refs (
    model TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, PRIMARY KEY (model, name));
CREATE INDEX IF NOT EXISTS versions_by_model ON versions (model, created);
"""


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[str, ...]


@dataclass(frozen=True)
class VersionInfo:
    id: str
    model: str
    parent: str | None
    created: float
    message: str
    tags: tuple[str, ...] = ()


class Catalog:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.db = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=60000")
        except sqlite3.Error as exc:
            raise FormatError(f"{path}: not a usable SQLite catalogue ({exc}); restore it from a backup") from None

    def close(self) -> None:
        self.db.close()

    def create(self) -> None:
        with self.transaction():
            for statement in filter(str.strip, SCHEMA.split(";")):  # executescript would COMMIT early
                self.db.execute(statement)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def check(self) -> None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.Error as exc:
            raise FormatError(f"{self.path}: not a modelpress catalogue ({exc}); restore it from a backup") from None
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise FormatError(f"{self.path}: catalogue schema {row and row[0]!r} is not supported "
                              f"(this modelpress reads {SCHEMA_VERSION}); upgrade modelpress")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: one writer at a time, all or nothing."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- reads -----------------------------------------------------------------------------

    def resolve(self, model: str, ref: str) -> str:
        """A version id from a ref name, a full id, or a unique id prefix (>= 6 hex digits)."""
        row = self.db.execute("SELECT version FROM refs WHERE model=? AND name=?", (model, ref)).fetchone()
        if row:
            vid = row[0]
            if not isinstance(vid, str) or not ID_PATTERN.match(vid) or not self.db.execute(
                    "SELECT 1 FROM versions WHERE id=? AND model=?", (vid, model)).fetchone():
                raise FormatError(f"ref {ref!r} of model {model!r} points to no valid version; the catalogue is corrupt "
                                  f"(re-tag it with `modelpress store tag`)")
            return vid
        if len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref):
            rows = self.db.execute("SELECT id FROM versions WHERE model=? AND id LIKE ?", (model, ref + "%")).fetchall()
            if len(rows) == 1:
                return rows[0][0]
            if len(rows) > 1:
                raise KeyError(f"version prefix {ref!r} of model {model!r} is ambiguous: give more digits")
        known = self.db.execute("SELECT 1 FROM versions WHERE model=? LIMIT 1", (model,)).fetchone()
        if not known:
            raise KeyError(f"model {model!r} is not in the store: see `modelpress store ls`")
        raise KeyError(f"model {model!r} has no version or ref {ref!r}: see `modelpress store log {model}`")

    def version(self, vid: str) -> tuple[VersionInfo, dict[str, Any]]:
        row = self.db.execute("SELECT id, model, parent, created, message, manifest FROM versions WHERE id=?",
                              (vid,)).fetchone()
        if row is None:
            raise KeyError(f"version {vid[:12]} does not exist")
        tags = tuple(r[0] for r in self.db.execute("SELECT name FROM refs WHERE version=? ORDER BY name", (vid,)))
        manifest = _json(row[5], dict, f"version {vid[:12]}'s manifest")
        return VersionInfo(row[0], row[1], row[2], row[3], row[4], tags), manifest

    def tensors(self, vid: str) -> list[TensorRecord]:
        out = []
        for name, dtype, shape, chunks in self.db.execute(
                "SELECT name, dtype, shape, chunks FROM tensors WHERE version=? ORDER BY rowid", (vid,)):
            where = f"tensor {name!r} of version {vid[:12]}"
            shape_t, chunks_t = _json(shape, list, where + " shape"), _json(chunks, list, where + " chunks")
            if not isinstance(name, str) or not isinstance(dtype, str) or len(shape_t) > 16 or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape_t):
                raise FormatError(f"{where} has a corrupt catalogue row (name, dtype or shape)")
            if not all(isinstance(c, str) and ID_PATTERN.match(c) for c in chunks_t):
                raise FormatError(f"{where} lists an invalid chunk id; the catalogue is corrupt")
            out.append(TensorRecord(name, dtype, tuple(shape_t), tuple(chunks_t)))
        return out

    def files(self, vid: str) -> dict[str, str]:
        return dict(self.db.execute("SELECT path, chunk FROM files WHERE version=?", (vid,)).fetchall())

    def chunk(self, cid: str) -> tuple[str, dict[str, Any], int, int, str | None]:
        """(codec, params, raw_size, stored_size, base) of one chunk, checked."""
        row = self.db.execute("SELECT codec, params, raw_size, stored_size, base FROM chunks WHERE id=?",
                              (cid,)).fetchone()
        if row is None:
            raise FormatError(f"chunk {cid[:12]} is not in the catalogue; the store is corrupt")
        return _chunk_row(cid, row)

    def chunks(self, ids: list[str]) -> dict[str, tuple[str, dict[str, Any], int, int, str | None]]:
        """`chunk()` of many ids in a few queries (a load asks for every chunk of a version at once)."""
        wanted = list(dict.fromkeys(ids))
        rows = {}
        for start in range(0, len(wanted), _BATCH):
            batch = wanted[start:start + _BATCH]
            rows.update((r[0], r[1:]) for r in self.db.execute(
                f"SELECT id, codec, params, raw_size, stored_size, base FROM chunks WHERE id IN "
                f"({','.join('?' * len(batch))})", batch))
        for cid in wanted:
            if cid not in rows:
                raise FormatError(f"chunk {cid[:12]} is not in the catalogue; the store is corrupt")
        parsed: dict = {}  # most rows share a few params texts: parse each once (the dicts are only read)
        return {cid: _chunk_row(cid, rows[cid], parsed) for cid in wanted}

    def file_hash(self, cid: str) -> str | None:
        row = self.db.execute("SELECT file_hash FROM chunks WHERE id=?", (cid,)).fetchone()
        return row[0] if row and isinstance(row[0], str) else None

    def has_chunk(self, cid: str) -> bool:
        return self.db.execute("SELECT 1 FROM chunks WHERE id=?", (cid,)).fetchone() is not None

    def log(self, model: str) -> list[VersionInfo]:
        rows = self.db.execute("SELECT id FROM versions WHERE model=? ORDER BY created DESC, rowid DESC", (model,))
        return [self.version(r[0])[0] for r in rows.fetchall()]

    def models(self) -> list[tuple[str, int]]:
        return self.db.execute("SELECT model, COUNT(*) FROM versions GROUP BY model ORDER BY model").fetchall()

    def all_chunk_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM chunks")]

    def referenced_chunks(self) -> set[str]:
        """Every chunk a version needs, bases of deltas included."""
        used: set[str] = set()
        for (chunks,) in self.db.execute("SELECT chunks FROM tensors"):
            ids = _json(chunks, list, "a tensor's chunk list")
            if not all(isinstance(c, str) for c in ids):  # opaque here: paths are formed (and checked) elsewhere
                raise FormatError("a tensor's chunk list holds a non-string; the catalogue is corrupt")
            used.update(ids)
        used.update(r[0] for r in self.db.execute("SELECT chunk FROM files"))
        frontier = set(used)
        while frontier:
            placeholders = ",".join("?" * len(frontier))
            bases = {r[0] for r in self.db.execute(
                f"SELECT base FROM chunks WHERE id IN ({placeholders}) AND base IS NOT NULL", tuple(frontier))}
            frontier = bases - used
            used |= bases
        return used

    # -- writes (inside `transaction()`) -----------------------------------------------------

    @staticmethod
    def insert_chunk(db, cid: str, codec: str, params: dict, raw_size: int, stored_size: int, base: str | None,
                     digest: str) -> None:
        db.execute("INSERT OR IGNORE INTO chunks VALUES (?,?,?,?,?,?,?)",
                   (cid, codec, json.dumps(params, sort_keys=True), raw_size, stored_size, base, digest))

    @staticmethod
    def insert_version(db, vid: str, model: str, parent: str | None, message: str, manifest: dict,
                       tensors: list[TensorRecord], files: dict[str, str]) -> bool:
        """False when the identical version already exists (nothing is inserted)."""
        if db.execute("SELECT 1 FROM versions WHERE id=?", (vid,)).fetchone():
            return False
        db.execute("INSERT INTO versions VALUES (?,?,?,?,?,?)",
                   (vid, model, parent, time.time(), message, json.dumps(manifest, sort_keys=True)))
        db.executemany("INSERT INTO tensors VALUES (?,?,?,?,?)",
                       [(vid, t.name, t.dtype, json.dumps(list(t.shape)), json.dumps(list(t.chunks))) for t in tensors])
        db.executemany("INSERT INTO files VALUES (?,?,?)", [(vid, p, c) for p, c in files.items()])
        return True

    @staticmethod
    def set_ref(db, model: str, name: str, vid: str) -> None:
        db.execute("INSERT OR REPLACE INTO refs VALUES (?,?,?)", (model, name, vid))


_BATCH = 500  # ids per IN (...) query: under SQLite's oldest limit of 999 parameters


def _chunk_row(cid: str, row: tuple, parsed: dict | None = None) -> tuple[str, dict[str, Any], int, int, str | None]:
    """A chunks row checked field by field (rows may be hostile); `parsed` memoises params texts."""
    codec, text, raw_size, stored_size, base = row
    if parsed is not None and isinstance(text, str) and text in parsed:
        params = parsed[text]
    else:
        params = _json(text, dict, f"chunk {cid[:12]}'s params")
        if parsed is not None and isinstance(text, str):
            parsed[text] = params
    if (not isinstance(codec, str) or isinstance(raw_size, bool) or not isinstance(raw_size, int)
            or not 0 <= raw_size <= 1 << 40 or isinstance(stored_size, bool) or not isinstance(stored_size, int)
            or not 0 <= stored_size <= 1 << 41
            or not (base is None or (isinstance(base, str) and ID_PATTERN.match(base) and base != cid))):
        raise FormatError(f"chunk {cid[:12]} has a corrupt catalogue row; run `modelpress store verify`")
    return codec, params, raw_size, stored_size, base


def _json(text: Any, kind: type, what: str) -> Any:
    """Parse a JSON column, insisting on the expected container type (rows may be hostile)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise FormatError(f"{what} is not valid JSON in the catalogue; the store is corrupt") from None
    if not isinstance(value, kind):
        raise FormatError(f"{what} has the wrong type in the catalogue; the store is corrupt")
    return value
