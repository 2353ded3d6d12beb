"""Hostile stores: tampered catalogue rows, chunk files, catalogue files, markers and folders give a clear
ModelpressError (FormatError / StoreError), never an unrelated exception, and nothing outside the store
folder is ever written or removed."""

from __future__ import annotations

import gc
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from _store_support import snapshot
from modelpress.codecs import NATIVE_AVAILABLE, Planes, Xor
from modelpress.errors import FormatError, IntegrityError, MissingChunkError, ModelpressError
from modelpress.store import Store, StoreError
from modelpress.store.objects import ChunkHeader, chunk_path

CHECKPOINT_MANIFEST = json.dumps({"format": "modelpress.checkpoint", "format_version": 1, "modules": {},
                                  "architecture": {"kind": "module", "class": "TinyNet"}, "recipe": None})


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One store (v1 then v2 of model m; in v2 tensor w is planes-coded, i zstd, s raw, f fans), copied by
    each test."""
    root = tmp_path_factory.mktemp("hostile") / "store"
    torch.manual_seed(0)
    codecs = {"w": "planes", "i": "zstd", "s": "raw", "f": "fans" if NATIVE_AVAILABLE else "planes"}
    with Store.init(root) as s:
        v1 = s.put({"w": torch.randn(64, 32), "i": torch.arange(32, dtype=torch.int32) // 4}, "m", codecs=codecs)
        v2 = s.put({"w": torch.randn(64, 32), "i": torch.arange(32, dtype=torch.int32) // 4, "s": torch.randn(3),
                    "f": torch.randn(16, 16)}, "m", codecs=codecs)
        chunks = {t.name: t.chunks[0] for t in s.catalog.tensors(v2)}
        assert {n: s.catalog.chunk(chunks[n]).codec.name for n in codecs} == codecs
    gc.collect()  # Store.init leaks a catalogue connection (see test_init_leaves_no_catalogue_open)
    _checkpoint(root)
    return root, {"v1": v1, "v2": v2, "chunks": chunks}


@pytest.fixture
def hostile(template, tmp_path):
    """A copy of the template store at tmp_path/store and a sentinel folder beside it.
    Returns (root, info, tamper); `info["untouched"]()` asserts that nothing beside the store changed."""
    (tmp_path / "sentinel").mkdir()
    (tmp_path / "sentinel" / "keep.txt").write_text("must survive")
    root = tmp_path / "store"
    shutil.copytree(template[0], root)

    def tamper(sql: str, *args) -> None:
        db = sqlite3.connect(root / "catalog.sqlite")
        db.execute("PRAGMA synchronous=OFF")  # test surgery: no need to wait for the disk
        with db:
            db.execute(sql, args)
        db.close()
        _checkpoint(root)

    before = _outside(tmp_path)

    def untouched() -> None:
        assert _outside(tmp_path) == before, "something outside the store was written or removed"
        assert (tmp_path / "sentinel" / "keep.txt").read_text() == "must survive"

    return root, {**template[1], "untouched": untouched}, tamper


def _outside(tmp_path: Path) -> dict:
    return {k: v for k, v in snapshot(tmp_path).items() if k != "store" and not k.startswith("store" + os.sep)}


def _checkpoint(root: Path) -> None:
    """Fold the WAL into catalog.sqlite so that file surgery sees every row."""
    db = sqlite3.connect(root / "catalog.sqlite")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def _clear(call) -> Exception | None:
    """Run `call`; an exception it raises must be a ModelpressError (returned), any other fails the test."""
    try:
        call()
    except ModelpressError as exc:
        return exc
    return None


# ---------------------------------------------------------------- tampered catalogue rows

ID = "{chunk}"  # replaced by the id of tensor w's chunk
W_ROW = {  # a column of tensor w's row, and its new value
    "chunk list names ../../etc/passwd": ("chunks", '["../../etc/passwd"]'),
    "chunk list not JSON": ("chunks", "["), "chunk list a string": ("chunks", '"abc"'),
    "chunk list of numbers": ("chunks", "[5]"), "chunk list of lists": ("chunks", "[[1]]"),
    "dtype unknown": ("dtype", "complex64"), "dtype of another size": ("dtype", "float64"),
    "shape larger than the chunks": ("shape", "[8, 8]"), "shape smaller than the chunks": ("shape", "[4, 4]"),
    "shape negative": ("shape", "[-8, 4]"), "shape null": ("shape", "null"),
    "shape of strings": ("shape", '["8", "4"]'), "shape of floats": ("shape", "[8.0, 4]"),
}
CHUNK_ROW = {  # a column of w's chunk's row, and its new value
    "chunk row id ../../etc/passwd": ("id", "../../etc/passwd"), "chunk row id with a slash": ("id", "ab/" + "c" * 61),
    "chunk params not JSON": ("params", "{bad"), "chunk codec unknown": ("codec", "evil"),
    "chunk raw_size oversized": ("raw_size", 10 ** 15), "chunk raw_size negative": ("raw_size", -5),
    "chunk raw_size text": ("raw_size", "x"), "chunk base not in the catalogue": ("base", "ab" * 32),
}
ROWS = {case: (f"UPDATE tensors SET {column}=? WHERE name='w'", value) for case, (column, value) in W_ROW.items()}
ROWS |= {case: (f"UPDATE chunks SET {column}=? WHERE id=?", value, ID) for case, (column, value) in CHUNK_ROW.items()}


def _row_cases():
    for case in ROWS:
        for op in ("get", "verify", "gc"):
            yield pytest.param(case, op, id=f"{case}-{op}")


@pytest.mark.parametrize("case, op", list(_row_cases()))
def test_tampered_catalogue_row_gives_a_clear_error(hostile, case, op):
    root, info, tamper = hostile
    sql, *args = ROWS[case]
    tamper(sql, *[info["chunks"]["w"] if a == ID else a for a in args])
    with Store(root) as s:
        if op == "get":
            with pytest.raises((FormatError, StoreError)):
                s.get("m", info["v2"])
        elif op == "verify":
            _clear(s.verify)
        else:
            _clear(s.gc)
    info["untouched"]()


@pytest.mark.parametrize("cid", ["../../sentinel/keep.txt", "ab/" + "c" * 61, "/etc/passwd", "A" * 64])
def test_hostile_chunk_ids_are_refused_before_any_path_is_formed(hostile, cid):
    root, info, tamper = hostile
    tamper("UPDATE chunks SET id=? WHERE id=?", cid, info["chunks"]["w"])
    tamper("UPDATE tensors SET chunks=? WHERE name='w'", json.dumps([cid]))
    with Store(root) as s:
        with pytest.raises(FormatError, match="invalid chunk id"):
            s.get("m", info["v2"], names=["w"])
        assert cid in s.verify().corrupt
        assert isinstance(_clear(lambda: s.gc(grace=0)), StoreError)  # gc refuses to work on such a catalogue
    info["untouched"]()


def test_a_version_whose_rows_were_deleted_fails_its_root_hash(hostile):
    root, info, tamper = hostile
    tamper("DELETE FROM tensors WHERE version=?", info["v1"])
    with Store(root) as s:
        with pytest.raises(IntegrityError, match="do not hash to its id"):
            s.get("m", info["v1"])
        report = s.verify()
        assert report.versions == (info["v1"],) and not report.corrupt and not report.catalogue
        with pytest.raises(StoreError, match="gc removed nothing"):
            s.gc(grace=0)  # v1's chunks look unused now: gc must not believe it
        assert s.get("m", info["v2"])  # the other version still reads
    info["untouched"]()



@pytest.mark.parametrize("op", ["get", "manifest"])
def test_a_dangling_ref_is_a_clear_error(hostile, op):
    root, info, tamper = hostile
    tamper("UPDATE refs SET version='ffff' WHERE name='latest'")
    with Store(root) as s:
        with pytest.raises(ModelpressError):
            getattr(s, op)("m")
    info["untouched"]()



@pytest.mark.parametrize("manifest, message", [("[]", "wrong type"), ("{", "manifest is not valid JSON")])
def test_a_manifest_that_is_not_a_json_object_is_a_format_error(hostile, manifest, message):
    root, info, tamper = hostile
    tamper("UPDATE versions SET manifest=? WHERE id=?", manifest, info["v2"])
    with Store(root) as s:
        for read in (lambda: s.load("m"), lambda: s.log("m")):
            with pytest.raises(FormatError, match=message):
                read()
    info["untouched"]()


# ---------------------------------------------------------------- hostile `files` rows (support files of a model)

@pytest.mark.parametrize("path", ["../escaped.txt", "../../escaped.txt", "/tmp/modelpress-escaped.txt",
                                  "a/../../escaped.txt", "..", "", "cache/../../../escaped.txt"])
def test_file_paths_that_escape_are_refused_and_nothing_is_written(hostile, path):
    root, info, tamper = hostile
    tamper("UPDATE versions SET manifest=? WHERE id=?", CHECKPOINT_MANIFEST, info["v2"])
    tamper("INSERT INTO files VALUES (?,?,?)", info["v2"], path, info["chunks"]["s"])
    with Store(root) as s:
        with pytest.raises(FormatError, match="escapes the store"):
            s.load("m")
    assert not Path("/tmp/modelpress-escaped.txt").exists()
    info["untouched"]()


def test_a_file_row_naming_a_hostile_chunk_is_refused(hostile):
    root, info, tamper = hostile
    tamper("UPDATE versions SET manifest=? WHERE id=?", CHECKPOINT_MANIFEST, info["v2"])
    tamper("INSERT INTO files VALUES (?,?,?)", info["v2"], "config.json", "../../sentinel/keep.txt")
    with Store(root) as s:
        with pytest.raises(FormatError):
            s.load("m")
    info["untouched"]()



def test_a_hostile_version_id_cannot_make_load_write_outside(hostile):
    root, info, tamper = hostile
    evil = "../../evil"
    tamper("UPDATE versions SET manifest=? WHERE id=?", CHECKPOINT_MANIFEST, info["v2"])
    for table, column in (("versions", "id"), ("tensors", "version"), ("refs", "version")):
        tamper(f"UPDATE {table} SET {column}=? WHERE {column}=?", evil, info["v2"])
    tamper("INSERT INTO files VALUES (?,?,?)", evil, "config.json", info["chunks"]["s"])
    with Store(root) as s:
        with pytest.raises(ModelpressError):
            s.load("m")
    info["untouched"]()  # fails if <store>/../evil appeared


# ---------------------------------------------------------------- hostile chunk files

def _rewrite(path: Path, fn) -> None:
    path.write_bytes(fn(path.read_bytes()))


def _with_header(header: dict):
    def fn(data: bytes) -> bytes:
        h = int.from_bytes(data[8:12], "little")
        body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        return data[:8] + len(body).to_bytes(4, "little") + body + data[12 + h:]
    return fn


def _header_of(data: bytes) -> dict:
    return json.loads(data[12:12 + int.from_bytes(data[8:12], "little")])


CHUNK_FILES = {
    "header length over 4096": lambda d: d[:8] + (5000).to_bytes(4, "little") + d[12:],
    "header length past the end": lambda d: d[:8] + (len(d)).to_bytes(4, "little") + d[12:],
    "header length 2**32-1": lambda d: d[:8] + b"\xff\xff\xff\xff" + d[12:],
    "header not JSON": lambda d: _with_header({})(d)[:12] + b"{" + _with_header({})(d)[13:],
    "header raw_size oversized": lambda d: _with_header({**_header_of(d), "raw_size": 1 << 41})(d),
    "header raw_size disagrees": lambda d: _with_header({**_header_of(d), "raw_size": 4})(d),
    "header codec disagrees": lambda d: _with_header(
        {**_header_of(d), "codec": "zstd" if _header_of(d)["codec"] == "raw" else "raw"})(d),
    "header names a base": lambda d: _with_header({**_header_of(d), "base": "ab" * 32})(d),
    "truncated to nothing": lambda d: b"",
    "truncated in the magic": lambda d: d[:5],
    "truncated after the length": lambda d: d[:12],
    "truncated in the header": lambda d: d[:20],
    "truncated to the header": lambda d: d[:12 + int.from_bytes(d[8:12], "little")],
    "truncated by one byte": lambda d: d[:-1],
    "one byte appended": lambda d: d + b"\x00",
    "payload replaced by zeros": lambda d: d[:12 + int.from_bytes(d[8:12], "little")] + bytes(
        len(d) - 12 - int.from_bytes(d[8:12], "little")),
    "another chunk's file": None,  # filled in by the test: a valid chunk file under the wrong name
}


def _chunk_file_cases():
    for case in CHUNK_FILES:
        for tensor, codec in (("w", "planes"), ("i", "zstd"), ("s", "raw"), ("f", "fans")):
            marks = []
            if codec == "fans":
                marks.append(pytest.mark.skipif(not NATIVE_AVAILABLE, reason="the fans C extension is not built"))
            yield pytest.param(case, tensor, id=f"{case}-{codec}", marks=marks)


@pytest.mark.parametrize("case, tensor", list(_chunk_file_cases()))
def test_hostile_chunk_file_is_refused_and_reported(hostile, case, tensor):
    root, info, _ = hostile
    cid = info["chunks"][tensor]
    path = chunk_path(root, cid)
    if CHUNK_FILES[case] is None:
        other = info["chunks"]["i" if tensor != "i" else "w"]
        path.write_bytes(chunk_path(root, other).read_bytes())
    else:
        _rewrite(path, CHUNK_FILES[case])
    with Store(root) as s:
        with pytest.raises(FormatError, match=cid[:12]):
            s.get("m", info["v2"], names=[tensor])
        report = s.verify()
        assert cid in report.corrupt and not report.missing
        s.gc()
        assert path.exists()  # gc never removes a chunk the catalogue knows, even a bad one
    info["untouched"]()


def test_missing_chunk_file_is_reported_missing(hostile):
    root, info, _ = hostile
    cid = info["chunks"]["w"]
    chunk_path(root, cid).unlink()
    with Store(root) as s:
        with pytest.raises(MissingChunkError, match=f"chunk {cid[:12]} is missing"):
            s.get("m", info["v2"])
        assert s.verify().missing == (cid,)
    info["untouched"]()



# (a folder, a FIFO, a device or a link in place of a chunk file: tests/hostile/test_store_files.py)


def test_a_delta_chunk_that_is_its_own_base_is_a_clear_error(hostile):
    root, info, tamper = hostile
    cid = info["chunks"]["w"]
    size = 64 * 32 * 4
    payload = Planes(4).encode(memoryview(bytes(size)))
    chunk_path(root, cid).write_bytes(ChunkHeader(Xor(4), size, cid).to_bytes() + payload)
    tamper("UPDATE chunks SET codec='xor', params=?, base=id WHERE id=?", '{"width": 4}', cid)
    with Store(root) as s:
        with pytest.raises(FormatError, match=cid[:12]):
            s.get("m", info["v2"])
        assert cid in s.verify().corrupt
    info["untouched"]()


# ---------------------------------------------------------------- catalogue file, marker, folder

def _catalogue(root: Path) -> Path:
    for suffix in ("-wal", "-shm"):
        Path(str(root / "catalog.sqlite") + suffix).unlink(missing_ok=True)
    return root / "catalog.sqlite"


def _other_database(p: Path) -> None:
    p.unlink()
    db = sqlite3.connect(p)
    db.execute("CREATE TABLE x (y)")
    db.close()


def _replace_with_dir(p: Path) -> None:
    p.unlink()
    p.mkdir()


CATALOGUES = {
    "missing": lambda p: p.unlink(),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(b"garbage " * 512),
    "truncated to 100 bytes": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "truncated to one page": lambda p: p.write_bytes(p.read_bytes()[:4096]),
    "truncated to half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "a directory": _replace_with_dir,
    "another sqlite database": lambda p: _other_database(p),
}
@pytest.mark.parametrize("case", list(CATALOGUES))
def test_a_broken_catalogue_file_is_a_format_error(hostile, case):
    root, info, _ = hostile
    CATALOGUES[case](_catalogue(root))
    with pytest.raises(FormatError, match="catalog"):
        Store(root).close()
    info["untouched"]()


def test_a_catalogue_of_another_schema_version_is_refused(hostile):
    root, info, tamper = hostile
    tamper("UPDATE meta SET value='2' WHERE key='schema_version'")
    with pytest.raises(FormatError, match="schema '2' is not supported"):
        Store(root)
    info["untouched"]()


MARKERS = {
    "missing": (lambda p: p.unlink(), StoreError, "not a modelpress store"),
    "a directory": (lambda p: (p.unlink(), p.mkdir()), StoreError, "not a modelpress store"),
    "binary garbage": (lambda p: p.write_bytes(b"\xff\xfe\x00\x01"), FormatError, "unreadable store marker"),
    "not JSON": (lambda p: p.write_text("{format: modelpress}"), FormatError, "unreadable store marker"),
    "a JSON list": (lambda p: p.write_text("[]"), FormatError, "not a modelpress store marker"),
    "another format": (lambda p: p.write_text('{"format": "zarr", "version": 1}'), FormatError, "not a modelpress"),
    "a newer version": (lambda p: p.write_text('{"format": "modelpress.store", "version": 2}'), FormatError,
                        "store format 2 is not supported"),
    "version as text": (lambda p: p.write_text('{"format": "modelpress.store", "version": "1"}'), FormatError,
                        "is not supported"),
}


@pytest.mark.parametrize("case", MARKERS)
def test_a_missing_or_hostile_marker_is_refused(hostile, case):
    root, info, _ = hostile
    change, error, message = MARKERS[case]
    change(root / "STORE")
    with pytest.raises(error, match=message):
        Store(root)
    info["untouched"]()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")

def test_init_leaves_no_catalogue_open(tmp_path):
    gc.disable()  # the leak ends whenever the cyclic GC happens to run: keep it from running mid-test
    try:
        Store.init(tmp_path / "s").close()
        held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")]
    finally:
        gc.enable()
        gc.collect()
    assert [p for p in held if str(tmp_path) in p] == []


def test_a_folder_that_is_not_a_store_is_refused_and_left_alone(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"x")
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match="is not a modelpress store"):
        Store(tmp_path)
    with pytest.raises(StoreError, match="is not a modelpress store"):
        Store(tmp_path / "does-not-exist")
    assert snapshot(tmp_path) == before



@pytest.mark.parametrize("where", ["chunks/zz", "tmp"])
def test_gc_never_deletes_through_a_symlink(hostile, tmp_path, where):
    root, info, _ = hostile
    victim = tmp_path / "sentinel"
    link = root / where
    if link.exists():
        link.rmdir()
    link.symlink_to(victim, target_is_directory=True)
    try:
        with Store(root) as s:  # a linked tmp/ is refused when the store is opened
            _clear(lambda: s.gc(grace=0))
    except StoreError as exc:
        assert where == "tmp" and "symbolic link" in str(exc)
    assert (victim / "keep.txt").exists()
    info["untouched"]()
