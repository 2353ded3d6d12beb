"""The SQLite catalogue: models, immutable versions, their tensors and files, chunks, and refs.

WAL mode lets readers run while one writer commits; `busy_timeout` makes concurrent writers
(several processes) queue instead of failing. A version becomes visible only in the single
transaction that inserts its rows, after all its chunk files are on disk. Every SQLite error
becomes one of modelpress's (a damaged page or a dropped table: FormatError naming the fix; a
full or failing disk: StorageIOError), and every row is checked as it is read (rows.py).
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from modelpress import fileio
from modelpress.errors import FormatError, StorageIOError, StoreError, VersionNotFoundError
from modelpress.store.rows import (
    ChunkRow,
    TensorRecord,
    Version,
    VersionInfo,
    chunk_row,
    file_row,
    is_id,
    json_column,
    tensor_row,
    version_info,
)

__all__ = ["Catalog", "SCHEMA_VERSION"]

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
_BATCH = 500  # ids per IN (...) query: under SQLite's oldest limit of 999 parameters
_COLUMNS = {  # each table's columns, in order (what `integrity` expects to find)
    "meta": ["key", "value"],
    "chunks": ["id", "codec", "params", "raw_size", "stored_size", "base", "file_hash"],
    "versions": ["id", "model", "parent", "created", "message", "manifest"],
    "tensors": ["version", "name", "dtype", "shape", "chunks"],
    "files": ["version", "path", "chunk"],
    "refs": ["model", "name", "version"],
}


class Catalog:
    def __init__(self, path: Path):
        self.path = path
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise FormatError(f"{path}: the catalogue is not a regular file; restore it from a backup")
        try:
            self.db = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=60000")
        except sqlite3.Error as exc:
            raise FormatError(f"{path}: not a usable SQLite catalogue ({exc}); restore it from a backup") from None

    def close(self) -> None:
        self.db.close()

    def _error(self, exc: sqlite3.Error) -> Exception:
        """The modelpress error for an SQLite one."""
        text = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
            return StoreError(f"{self.path}: the catalogue stayed locked by another process ({text}); try again")
        if "disk I/O error" in text or "full" in text or "unable to open" in text or "readonly" in text:
            return StorageIOError(f"{self.path}: the catalogue could not be read or written ({text}); nothing "
                                  "committed was changed: free space or fix the disk, then try again")
        return FormatError(f"{self.path}: the catalogue is damaged ({text}); run `modelpress store verify` and "
                           "restore catalog.sqlite from a backup")

    def rows(self, sql: str, args: Iterable[Any] = ()) -> list[tuple]:
        try:
            return self.db.execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def one(self, sql: str, args: Iterable[Any] = ()) -> tuple | None:
        found = self.rows(sql, args)
        return found[0] if found else None

    def create(self) -> None:
        with self.transaction():
            for statement in filter(str.strip, SCHEMA.split(";")):  # executescript would COMMIT early
                self.rows(statement)
            self.rows("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def check(self) -> None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.Error as exc:
            raise FormatError(f"{self.path}: not a modelpress catalogue ({exc}); restore it from a backup") from None
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise FormatError(f"{self.path}: catalogue schema {row and row[0]!r} is not supported "
                              f"(this modelpress reads {SCHEMA_VERSION}); upgrade modelpress")

    def integrity(self, thorough: bool = True) -> list[str]:
        """SQLite's own check of the file (integrity_check, or the cheaper quick_check) and of the tables this
        schema needs: the problems found, [] if none."""
        pragma = "integrity_check" if thorough else "quick_check"
        try:
            found = [str(r[0]) for r in self.db.execute(f"PRAGMA {pragma}").fetchall()]
            if found != ["ok"]:
                return found
            problems = []
            for table, columns in _COLUMNS.items():
                have = [r[1] for r in self.db.execute(f"PRAGMA table_info({table})").fetchall()]
                if have != columns:
                    problems.append(f"table {table} is missing" if not have else
                                    f"table {table} has columns {have}, expected {columns}")
            return problems
        except sqlite3.Error as exc:
            return [str(exc)]

    @contextmanager
    def transaction(self) -> Iterator["Catalog"]:
        """BEGIN IMMEDIATE ... COMMIT: one writer at a time, all or nothing."""
        self.rows("BEGIN IMMEDIATE")
        try:
            yield self
            fileio.fault_point("commit", self.path)
            self.rows("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(exc, OSError) and not isinstance(exc, (StorageIOError, StoreError, FileNotFoundError)):
                raise StorageIOError(f"committing to {self.path} failed ({exc}); nothing was committed: free space "
                                     "or fix the disk, then run the command again") from None
            raise

    # -- reads -----------------------------------------------------------------------------

    def resolve(self, model: str, ref: str) -> str:
        """A version id from a ref name, a full id, or a unique id prefix (>= 6 hex digits)."""
        row = self.one("SELECT version FROM refs WHERE model=? AND name=?", (model, ref))
        if row:
            vid = row[0]
            if not is_id(vid) or not self.one("SELECT 1 FROM versions WHERE id=? AND model=?", (vid, model)):
                raise FormatError(f"ref {ref!r} of model {model!r} points to no valid version; the catalogue is corrupt "
                                  f"(re-tag it with `modelpress store tag`)")
            return vid
        if isinstance(ref, str) and len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref):
            found = self.rows("SELECT id FROM versions WHERE model=? AND id LIKE ?", (model, ref + "%"))
            if len(found) == 1:
                return found[0][0]
            if len(found) > 1:
                raise VersionNotFoundError(f"version prefix {ref!r} of model {model!r} is ambiguous: give more digits")
        if not self.one("SELECT 1 FROM versions WHERE model=? LIMIT 1", (model,)):
            raise VersionNotFoundError(f"model {model!r} is not in the store: see `modelpress store ls`")
        raise VersionNotFoundError(f"model {model!r} has no version or ref {ref!r}: see `modelpress store log {model}`")

    def info(self, vid: str) -> VersionInfo:
        row = self.one("SELECT id, model, parent, created, message FROM versions WHERE id=?", (vid,))
        if row is None:
            raise VersionNotFoundError(f"version {vid[:12]} does not exist")
        tags = tuple(r[0] for r in self.rows("SELECT name FROM refs WHERE version=? ORDER BY name", (vid,)))
        return version_info(row, tags)

    def version(self, vid: str) -> Version:
        """A version's rows (not yet checked against its root hash: see Version.check; its tags are not read)."""
        row = self.one("SELECT id, model, parent, created, message, manifest FROM versions WHERE id=?", (vid,))
        if row is None:
            raise VersionNotFoundError(f"version {vid[:12]} does not exist")
        manifest = json_column(row[5], dict, f"version {vid[:12]}'s manifest")
        return Version(version_info(row[:5], ()), manifest, tuple(self.tensors(vid)), self.files(vid))

    def version_ids(self) -> list[str]:
        return [r[0] for r in self.rows("SELECT id FROM versions ORDER BY rowid")]

    def tensors(self, vid: str) -> list[TensorRecord]:
        return [tensor_row(vid, r) for r in self.rows(
            "SELECT name, dtype, shape, chunks FROM tensors WHERE version=? ORDER BY rowid", (vid,))]

    def files(self, vid: str) -> dict[str, str]:
        return dict(file_row(vid, r) for r in self.rows("SELECT path, chunk FROM files WHERE version=?", (vid,)))

    def chunk(self, cid: str) -> ChunkRow:
        """The checked row of one chunk."""
        return self.chunks([cid])[cid]

    def chunks(self, ids: Iterable[str]) -> dict[str, ChunkRow]:
        """The checked rows of many chunks, in a few queries (a load asks for every chunk of a version at once)."""
        wanted = list(dict.fromkeys(ids))
        found: dict[Any, tuple] = {}
        for start in range(0, len(wanted), _BATCH):
            batch = wanted[start:start + _BATCH]
            found.update((r[0], r[1:]) for r in self.rows(
                "SELECT id, codec, params, raw_size, stored_size, base FROM chunks WHERE id IN "
                f"({','.join('?' * len(batch))})", batch))
        memo: dict = {}
        out = {}
        for cid in wanted:
            if cid not in found:
                raise FormatError(f"chunk {str(cid)[:12]} is not in the catalogue; the store is corrupt: run "
                                  "`modelpress store verify`")
            out[cid] = chunk_row(cid, found[cid], memo)
        return out

    def file_hash(self, cid: str) -> str | None:
        row = self.one("SELECT file_hash FROM chunks WHERE id=?", (cid,))
        return row[0] if row and is_id(row[0]) else None

    def row_bytes(self, vid: str, chunk_ids: Iterable[str]) -> int:
        """Bytes of a version's rows (its version, tensor and file rows) and of the given chunks' rows, as UTF-8
        text plus 8 bytes per number: what the version's entry costs this catalogue, index and page slack aside."""
        text = "ifnull(length(CAST({} AS BLOB)), 0)"
        total = 0
        for table, columns, numbers, key in (("versions", ("id", "model", "parent", "message", "manifest"), 1, "id"),
                                             ("tensors", ("version", "name", "dtype", "shape", "chunks"), 0, "version"),
                                             ("files", ("version", "path", "chunk"), 0, "version")):
            expr = " + ".join(text.format(c) for c in columns)
            total += self.one(f"SELECT ifnull(sum({expr} + {8 * numbers}), 0) FROM {table} WHERE {key}=?", (vid,))[0]
        expr = " + ".join(text.format(c) for c in ("id", "codec", "params", "base", "file_hash"))
        for cid in chunk_ids:
            row = self.one(f"SELECT {expr} + 16 FROM chunks WHERE id=?", (cid,))
            total += row[0] if row else 0
        return total

    def has_chunk(self, cid: str) -> bool:
        return self.one("SELECT 1 FROM chunks WHERE id=?", (cid,)) is not None

    def log(self, model: str) -> list[VersionInfo]:
        """A model's versions, newest first (each row checked, its manifest parsed)."""
        found = self.rows("SELECT id, manifest FROM versions WHERE model=? ORDER BY created DESC, rowid DESC", (model,))
        for vid, text in found:
            json_column(text, dict, f"version {str(vid)[:12]}'s manifest")
        return [self.info(vid) for vid, _ in found]

    def models(self) -> list[tuple[str, int]]:
        return self.rows("SELECT model, COUNT(*) FROM versions GROUP BY model ORDER BY model")

    def all_chunk_ids(self) -> list[str]:
        return [r[0] for r in self.rows("SELECT id FROM chunks")]

    def closure(self, ids: Iterable[str]) -> set[str]:
        """`ids` and every chunk they rest on (the bases of deltas, and theirs)."""
        used = set(ids)
        frontier = list(used)
        while frontier:
            bases = set()
            for start in range(0, len(frontier), _BATCH):
                batch = frontier[start:start + _BATCH]
                bases.update(r[0] for r in self.rows(
                    f"SELECT base FROM chunks WHERE id IN ({','.join('?' * len(batch))}) AND base IS NOT NULL", batch))
            frontier = list(bases - used)
            used |= bases
        return used

    def listed_chunks(self) -> set[str]:
        """Every chunk id a version's tensors or files list (bases not included)."""
        used: set[str] = set()
        for (chunks,) in self.rows("SELECT chunks FROM tensors"):
            ids = json_column(chunks, list, "a tensor's chunk list")
            if not all(isinstance(c, str) for c in ids):  # opaque here: keys are formed (and checked) elsewhere
                raise FormatError("a tensor's chunk list holds a non-string; the catalogue is corrupt")
            used.update(ids)
        used.update(r[0] for r in self.rows("SELECT chunk FROM files"))
        return used

    def referenced_chunks(self) -> set[str]:
        """Every chunk some version needs, bases of deltas included."""
        return self.closure(self.listed_chunks())

    # -- writes (inside `transaction()`) -----------------------------------------------------

    def insert_chunk(self, row: ChunkRow, digest: str) -> None:
        self.rows("INSERT OR IGNORE INTO chunks VALUES (?,?,?,?,?,?,?)",
                  (row.id, row.codec.name, json.dumps(row.codec.params(), sort_keys=True), row.raw_size,
                   row.stored_size, row.base, digest))

    def insert_version(self, version: Version) -> bool:
        """False when the identical version already exists (nothing is inserted)."""
        info = version.info
        if self.one("SELECT 1 FROM versions WHERE id=?", (info.id,)):
            return False
        self.rows("INSERT INTO versions VALUES (?,?,?,?,?,?)", (info.id, info.model, info.parent, time.time(),
                                                                 info.message, json.dumps(version.manifest, sort_keys=True)))
        try:
            self.db.executemany("INSERT INTO tensors VALUES (?,?,?,?,?)", [
                (info.id, t.name, t.dtype, json.dumps(list(t.shape)), json.dumps(list(t.chunks)))
                for t in version.tensors])
            self.db.executemany("INSERT INTO files VALUES (?,?,?)", [(info.id, p, c) for p, c in version.files.items()])
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        return True

    def set_ref(self, model: str, name: str, vid: str) -> None:
        self.rows("INSERT OR REPLACE INTO refs VALUES (?,?,?)", (model, name, vid))

    def delete_chunks(self, ids: list[str]) -> None:
        for start in range(0, len(ids), _BATCH):
            batch = ids[start:start + _BATCH]
            self.rows(f"DELETE FROM chunks WHERE id IN ({','.join('?' * len(batch))})", batch)
