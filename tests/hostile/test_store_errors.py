"""Clear errors everywhere: a damaged catalogue page, a dropped table, catalogue rows of the wrong types, `store
init` on a file, a `lock` that is a folder, missing sub-folders, and `store get --out` aimed at the store itself
all end in one of modelpress's errors (the CLI: exit 2 and one line), never sqlite3's or an OSError, and
never destroy anything: afterwards (the damage repaired where it was the catalogue's) every version reads
back and the store verifies clean."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from _store_hostile import Victim, chunk_files, state, victim  # noqa: F401  (victim: the fixture)
from modelpress.cli import main
from modelpress.errors import FormatError, MissingChunkError, ModelpressError, NotRegularFileError, StoreError
from modelpress.store import Store

pytestmark = pytest.mark.slow  # 108 damaged-store cases, each on a fresh copy of a store: make test, not test-fast

OPERATIONS = {
    "get": lambda s: s.get("m"),
    "load": lambda s: s.load("enc"),
    "log": lambda s: s.log("m"),
    "put": lambda s: s.put(state("m", 5), "m"),
    "gc": lambda s: s.gc(grace=0),
    "diff": lambda s: s.diff("m", s.log("m")[-1].id, "latest"),
}


def _clear(call) -> ModelpressError | None:
    """Run `call`: it may succeed or raise a ModelpressError (returned); anything else fails the test."""
    try:
        call()
    except ModelpressError as exc:
        assert "\n" not in str(exc)
        return exc
    return None


def _outcome(root: Path, op: str) -> ModelpressError | None:
    def run():
        with Store(root) as s:
            OPERATIONS[op](s)
    return _clear(run)


# ---------------------------------------------------------------- the catalogue file damaged

def _root_page(root: Path, table: str) -> int:
    db = sqlite3.connect(root / "catalog.sqlite")
    (page,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()
    db.close()
    return page


def _garble_page(root: Path, page: int) -> None:
    path = root / "catalog.sqlite"
    data = bytearray(path.read_bytes())
    data[(page - 1) * 4096:page * 4096] = bytes(range(256)) * 16
    path.write_bytes(bytes(data))


DAMAGE = {
    "the tensors table's page garbled": lambda root: _garble_page(root, _root_page(root, "tensors")),
    "the chunks table's page garbled": lambda root: _garble_page(root, _root_page(root, "chunks")),
    "the versions table's page garbled": lambda root: _garble_page(root, _root_page(root, "versions")),
    "the last page garbled": lambda root: _garble_page(root, (root / "catalog.sqlite").stat().st_size // 4096),
}
DROPPED = ["tensors", "chunks", "files", "refs", "versions"]


@pytest.mark.parametrize("op", OPERATIONS)
@pytest.mark.parametrize("damage", list(DAMAGE) + [f"table {t} dropped" for t in DROPPED])
def test_a_damaged_catalogue_gives_a_clear_error_and_loses_nothing(victim, damage, op):
    backup = (victim.root / "catalog.sqlite").read_bytes()
    files_before = chunk_files(victim.root)
    if damage in DAMAGE:
        DAMAGE[damage](victim.root)
    else:
        victim.tamper(f"DROP TABLE {damage.split()[1]}")
    error = _outcome(victim.root, op)
    if op == "gc":
        assert isinstance(error, (StoreError, FormatError))  # gc works on no damaged catalogue
    assert chunk_files(victim.root) >= files_before  # nothing was removed on the strength of a damaged catalogue
    (victim.root / "catalog.sqlite").write_bytes(backup)
    victim.intact()


@pytest.mark.parametrize("damage", list(DAMAGE) + [f"table {t} dropped" for t in DROPPED])
def test_verify_reports_a_damaged_catalogue(victim, damage):
    if damage in DAMAGE:
        DAMAGE[damage](victim.root)
    else:
        victim.tamper(f"DROP TABLE {damage.split()[1]}")
    try:
        with Store(victim.root) as s:
            report = s.verify()
    except FormatError as exc:  # or the store does not even open: also a clear report
        assert "catalog" in str(exc)
        return
    assert not report.ok and report.catalogue
    assert all("\n" not in line for line in report.problems)


def test_verify_runs_sqlites_integrity_check(victim, monkeypatch):
    seen = []
    with Store(victim.root) as s:
        monkeypatch.setattr(s.catalog, "integrity", lambda thorough=True: seen.append(thorough) or ["row 3 missing"])
        report = s.verify()
    assert seen == [True] and report.catalogue == ("SQLite integrity check: row 3 missing",) and not report.ok


# ---------------------------------------------------------------- catalogue rows of the wrong types

ROWS = {
    "created as text": "UPDATE versions SET created='yesterday'",
    "message as a number": "UPDATE versions SET message=5",
    "model as a number": "UPDATE versions SET model=7",
    "parent not an id": "UPDATE versions SET parent='x'",
    "a version id as a number": "UPDATE versions SET id=12 WHERE model='a'",
    "a file path as a number": "UPDATE files SET path=3 WHERE path='vocab.txt'",
    "a file path climbing out": "UPDATE files SET path='../../x' WHERE path='vocab.txt'",
    "a file chunk as a blob": "UPDATE files SET chunk=x'00ff' WHERE path='vocab.txt'",
    "raw_size as a float": "UPDATE chunks SET raw_size=1.5",
    "stored_size as text": "UPDATE chunks SET stored_size='many'",
    "params as a blob": "UPDATE chunks SET params=x'7b7d'",
    "codec as a number": "UPDATE chunks SET codec=1",
    "file_hash as a number": "UPDATE chunks SET file_hash=0",
    "a ref to a number": "UPDATE refs SET version=1",
    "shape as a blob": "UPDATE tensors SET shape=x'5b315d'",
    "dtype as a number": "UPDATE tensors SET dtype=4",
}


@pytest.mark.parametrize("op", ["get", "load", "log", "gc", "verify"])
@pytest.mark.parametrize("case", ROWS)
def test_catalogue_rows_of_the_wrong_types_give_clear_errors(victim, case, op):
    victim.tamper(ROWS[case])
    if op == "verify":
        with Store(victim.root) as s:
            assert not _clear(s.verify)
    else:
        _outcome(victim.root, op)


# ---------------------------------------------------------------- store folders

def test_store_init_on_a_regular_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_bytes(b"precious")
    with pytest.raises(StoreError, match="not a folder"):
        Store.init(path)
    with pytest.raises(StoreError):
        Store.init(path / "below")
    assert main(["store", "init", str(path)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert path.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("kind", ["folder", "link", "fifo"])
def test_a_lock_that_is_not_a_file_stops_writers_and_gc_clearly(victim, tmp_path, kind):
    lock = victim.root / "lock"
    lock.unlink()
    if kind == "folder":
        lock.mkdir()
    elif kind == "link":
        (tmp_path / "elsewhere").write_bytes(b"")
        lock.symlink_to(tmp_path / "elsewhere")
    else:
        import os

        os.mkfifo(lock)
    with Store(victim.root) as s:
        for write in (lambda: s.put(state("m", 7), "m"), lambda: s.gc(grace=0)):
            with pytest.raises(NotRegularFileError, match="lock"):
                write()
        assert s.get("m")  # readers take no lock
    if kind == "folder":
        lock.rmdir()
    else:
        lock.unlink()
    victim.intact()
    with Store(victim.root) as s:  # writers recreate a missing lock
        s.put(state("m", 7), "m")
    assert lock.is_file()


def test_a_missing_tmp_folder_is_recreated(victim):
    shutil.rmtree(victim.root / "tmp")
    with Store(victim.root) as s:
        s.gc(grace=0)
        vid = s.put(state("m", 6), "m")
        assert s.get("m", vid)
    assert (victim.root / "tmp").is_dir()
    victim.intact()


def test_missing_chunks_are_reported_and_a_put_recreates_the_folder(victim):
    shutil.rmtree(victim.root / "chunks")
    with Store(victim.root) as s:
        with pytest.raises(MissingChunkError, match="missing from the store"):
            s.get("m")
        report = s.verify()
        assert set(report.missing) == set(s.catalog.all_chunk_ids()) and not report.corrupt
        assert s.gc(grace=0).chunks_removed == 0
        vid = s.put({"fresh": __import__("torch").arange(10)}, "fresh")
        assert s.get("fresh", vid)["fresh"].tolist() == list(range(10))


def test_an_old_store_with_a_cache_folder_opens_and_gc_removes_it(victim, tmp_path, capsys):
    (victim.root / "cache" / victim.vid("enc")).mkdir(parents=True)
    (victim.root / "cache" / victim.vid("enc") / "config.json").write_bytes(b'{"hidden_size": 8192}')
    assert main(["store", "get", str(victim.root), "enc", "--out", str(tmp_path / "out")]) == 0  # cache unused
    shutil.rmtree(victim.root / "cache")  # `rm -rf S/cache`, then get again
    assert main(["store", "get", str(victim.root), "enc", "--out", str(tmp_path / "out2")]) == 0
    (victim.root / "cache").mkdir()
    with Store(victim.root) as s:
        assert s.gc(grace=0).temporaries_removed == 1
    assert not (victim.root / "cache").exists()
    victim.intact()


def test_gc_removes_a_linked_cache_folder_but_not_what_it_points_to(victim, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    (victim.root / "cache").symlink_to(target, target_is_directory=True)
    with Store(victim.root) as s:
        s.gc(grace=0)
    assert not (victim.root / "cache").exists() and (target / "keep.txt").read_text() == "mine"
    victim.intact()


# ---------------------------------------------------------------- store get --out aimed at the store

@pytest.mark.parametrize("out", [".", "chunks", "tmp", "chunks/zz", "..", "catalog.sqlite"])
def test_store_get_never_writes_over_or_into_the_store(victim, capsys, out):
    target = (victim.root / out).resolve() if out != ".." else victim.root.parent
    before = chunk_files(victim.root)
    code = main(["store", "get", str(victim.root), "enc", "--out", str(target), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("modelpress: error: ") and err.count("\n") == 1, err
    assert chunk_files(victim.root) == before
    victim.intact()
