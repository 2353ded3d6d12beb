"""The store's maintenance section: `verify` (what is damaged, exactly) and `gc` (what nothing needs).

verify runs SQLite's integrity check, recomputes every version's root hash, and reads every chunk
back through the chunk reader: whole file against its recorded hash, header against its row,
decoded bytes against the chunk's BLAKE3 id.

gc removes chunk rows no version needs, chunk files the catalogue does not know and writers'
leftover temporaries. It holds the store's lock alone (no put runs meanwhile), refuses to remove
anything while the catalogue fails its quick check or a version its root hash (a damaged catalogue
could make needed chunks look unused), and, as git's prune does, leaves files younger than a grace
period (`grace`, default GC_GRACE): a writer on a file system whose locks do not hold, or another
tool, may still be about to use them. Readers take no lock and need none: gc never removes a chunk
that a version uses, and versions are immutable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from modelpress import fileio
from modelpress.errors import FormatError, MissingChunkError, ModelpressError, StoreError

__all__ = ["Maintenance", "VerifyReport", "GcReport", "GC_GRACE"]

GC_GRACE = 3600.0  # seconds: unknown chunk files and temporaries younger than this are kept


@dataclass(frozen=True)
class VerifyReport:
    checked: int  # chunks read back
    corrupt: tuple[str, ...]  # chunk ids whose file, header, row or content is wrong
    missing: tuple[str, ...]  # chunk ids a version needs that have no file (or no row)
    versions: tuple[str, ...] = ()  # version ids whose rows fail their root hash or cannot be read
    catalogue: tuple[str, ...] = ()  # what SQLite's integrity check (or reading the catalogue) found
    problems: tuple[str, ...] = ()  # one line per finding, saying what is wrong

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.missing or self.versions or self.catalogue)


@dataclass(frozen=True)
class GcReport:
    chunks_removed: int
    bytes_removed: int
    temporaries_removed: int
    kept_young: int = 0  # unknown chunk files kept because they are younger than the grace period


class Maintenance:
    """verify() and gc(); mixed into Store (store.py)."""

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Recheck the catalogue, every version's root hash and every chunk (present, header consistent with its
        row, file and content matching their hashes)."""
        catalogue = [f"SQLite integrity check: {p}" for p in self.catalog.integrity(thorough=True)]
        problems = list(catalogue)
        versions, corrupt, missing = [], [], []
        try:
            vids = self.catalog.version_ids()
            ids = self.catalog.all_chunk_ids()
        except FormatError as exc:  # a dropped table, a damaged page
            catalogue.append(str(exc))
            return VerifyReport(0, (), (), (), tuple(catalogue), tuple(problems + [str(exc)]))
        for vid in vids:
            try:
                self.catalog.version(vid).check()
            except ModelpressError as exc:
                versions.append(vid)
                problems.append(f"version {vid}: {exc}")
        for cid in ids:
            try:
                row = self.catalog.chunk(cid)
                expected = self.catalog.file_hash(cid)
                if expected is None:
                    raise FormatError(f"chunk {cid[:12]} has no valid file hash in the catalogue")
                self.reader.read(row, expect_file=expected)
            except MissingChunkError as exc:
                missing.append(cid)
                problems.append(f"missing chunk {cid}: {exc}")
            except ModelpressError as exc:
                corrupt.append(cid)
                problems.append(f"corrupt chunk {cid}: {exc}")
            if progress:
                progress(1)
        try:
            unlisted = sorted(self.catalog.referenced_chunks() - set(ids))
        except FormatError as exc:
            catalogue.append(str(exc))
            problems.append(str(exc))
            unlisted = []
        missing += unlisted
        problems += [f"missing chunk {cid}: a version lists it, the catalogue has no row for it" for cid in unlisted]
        return VerifyReport(len(ids), tuple(corrupt), tuple(missing), tuple(versions), tuple(catalogue),
                            tuple(problems))

    def gc(self, grace: float = GC_GRACE) -> GcReport:
        """Remove chunks no version uses, chunk files the catalogue does not know and leftover temporaries (those
        younger than `grace` seconds are kept), and the `cache/` folder of older stores."""
        with self._lock(exclusive=True):
            self._check_before_gc()
            used = self.catalog.referenced_chunks()
            unused = [c for c in self.catalog.all_chunk_ids() if c not in used]
            if unused:
                with self.catalog.transaction() as catalog:
                    catalog.delete_chunks(unused)
            known = set(self.catalog.all_chunk_ids())
            removed = freed = kept = 0
            cutoff = time.time() - grace
            for entry in self.backend.list("chunks"):
                if entry.key.rsplit("/", 1)[-1] in known:
                    continue
                if entry.modified > cutoff:
                    kept += 1
                    continue
                self.backend.delete(entry.key)
                removed += 1
                freed += entry.size
            temporaries = self.backend.remove_stale_temporaries(grace) + self._remove_old_cache()
        return GcReport(removed, freed, temporaries, kept)

    def _check_before_gc(self) -> None:
        problems = self.catalog.integrity(thorough=False)
        if problems:
            raise StoreError(f"the catalogue fails SQLite's check ({problems[0]}); gc removed nothing: run "
                             "`modelpress store verify` and restore catalog.sqlite from a backup")
        for vid in self.catalog.version_ids():
            try:
                self.catalog.version(vid).check()
            except FormatError as exc:
                raise StoreError(f"gc removed nothing: {exc}") from None

    def _remove_old_cache(self) -> int:
        """Stores written before support files travelled as bytes kept them in `cache/`; nothing reads it now."""
        cache = self.root / "cache"
        if cache.is_symlink():
            fileio.remove_file(cache)  # the link itself, never what it points to
        elif cache.is_dir():
            fileio.remove_tree(cache)
        else:
            return 0
        return 1
