"""Only regular files, and only bounded reads: a FIFO, a device, a folder or a symbolic link where a chunk file
should be (a tensor's, the chunk of tokenizer.json, a delta's base, a mapped aligned chunk) is refused with
NotRegularFileError by get, load, `store get` and verify (reported there), never read (no hang on a FIFO,
no endless read of /dev/zero); a chunk file longer than its row says is refused without being read; linked
chunks/ or tmp/ folders are refused. Afterwards, with the file put back, every version reads back and the
store verifies clean."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from _store_hostile import Victim, bits, state, victim  # noqa: F401  (victim: the fixture)
from fs_hazards import device_node, no_hang
from modelpress.cli import main
from modelpress.errors import CorruptChunkError, ModelpressError, NotRegularFileError, StoreError
from modelpress.store import Store
from modelpress.store.objects import chunk_id


KINDS = {
    "fifo": lambda p, outside: os.mkfifo(p),
    "link to /dev/zero": lambda p, outside: p.symlink_to("/dev/zero"),
    "device": lambda p, outside: device_node(p),
    "folder": lambda p, outside: p.mkdir(),
    "link to a copy of itself outside the store": lambda p, outside: p.symlink_to(outside),
}
WHERE = {  # which chunk, and what reads it: (model, tensor names) for get, or load of the encoder
    "a tensor's chunk": ("table", ("m", ["shared.table"])),
    "the chunk of tokenizer.json": ("tokenizer", None),
    "a delta's base chunk": ("base", ("m", ["encoder.weight"])),
    "an aligned chunk (mapped)": ("aligned", ("a", None)),
}


@contextmanager
def replaced(victim: Victim, what: str, kind: str, tmp_path: Path):
    """The chunk file swapped for `kind` for the body, then put back."""
    path = victim.path(what)
    original = path.read_bytes()
    outside = tmp_path / "outside.bin"
    outside.write_bytes(original)
    path.unlink()
    KINDS[kind](path, outside)
    try:
        yield path
    finally:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
        path.write_bytes(original)


def _read(victim: Victim, s: Store, reader) -> None:
    if reader is None:
        s.load("enc")
    else:
        model, names = reader
        s.get(model, names=names)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", WHERE)
def test_get_and_load_refuse_what_is_not_a_regular_file(victim, tmp_path, kind, where):
    what, reader = WHERE[where]
    with replaced(victim, what, kind, tmp_path), no_hang(), Store(victim.root) as s:
        with pytest.raises(NotRegularFileError, match=r"symbolic link|not a regular file|folder"):
            _read(victim, s, reader)
    victim.intact()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", WHERE)
def test_verify_reports_what_is_not_a_regular_file(victim, tmp_path, kind, where):
    what, _ = WHERE[where]
    cid = victim.chunks[what]
    with replaced(victim, what, kind, tmp_path), no_hang(), Store(victim.root) as s:
        report = s.verify()
        assert not report.ok and cid in report.corrupt
        assert any(cid in line and ("link" in line or "regular" in line or "folder" in line) for line in report.problems)
    victim.intact()


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "folder"])
def test_store_get_to_a_folder_refuses_a_fifo_for_tokenizer_json(victim, tmp_path, capsys, kind):
    with replaced(victim, "tokenizer", kind, tmp_path), no_hang():
        code = main(["store", "get", str(victim.root), "enc", "--out", str(tmp_path / "out")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and ("not a regular file" in err or "symbolic link" in err or "folder" in err), err
    assert not (tmp_path / "out").exists()
    victim.intact()


@pytest.mark.parametrize("what", ["table", "tokenizer", "aligned"])
def test_a_chunk_file_longer_than_its_row_is_refused_unread(victim, what):
    """A terabyte (sparse) file at a chunk's path: refused from its size alone, in no time."""
    path = victim.path(what)
    original = path.read_bytes()
    with open(path, "r+b") as fh:
        fh.truncate(1 << 40)
    with no_hang(20), Store(victim.root) as s:
        with pytest.raises(CorruptChunkError, match=victim.chunks[what][:12]):
            if what == "tokenizer":
                s.load("enc")
            else:
                s.get("a" if what == "aligned" else "m")
        assert victim.chunks[what] in s.verify().corrupt
    path.write_bytes(original)
    victim.intact()


@pytest.mark.parametrize("folder", ["chunks", "tmp"])
def test_linked_store_folders_are_refused(victim, tmp_path, folder):
    real = tmp_path / f"real-{folder}"
    (victim.root / folder).rename(real)
    (victim.root / folder).symlink_to(real, target_is_directory=True)
    with pytest.raises(StoreError, match="symbolic link"):
        Store(victim.root)
    (victim.root / folder).unlink()
    real.rename(victim.root / folder)
    victim.intact()


def test_a_linked_chunk_subfolder_is_never_written_through(victim, tmp_path):
    """chunks/<xx>/ linked elsewhere: a put that needs that folder refuses, writing nothing there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    new = state("new", 0)
    prefixes = {chunk_id(bits(t).numpy())[:2] for t in new.values()}  # (each tensor is one chunk here)
    for prefix in prefixes:
        sub = victim.root / "chunks" / prefix
        if sub.exists():
            (victim.root / "chunks" / f"moved-{prefix}").mkdir()
            for f in sub.iterdir():
                f.rename(victim.root / "chunks" / f"moved-{prefix}" / f.name)
            sub.rmdir()
        sub.symlink_to(outside, target_is_directory=True)
    with Store(victim.root) as s:
        with pytest.raises(ModelpressError, match="symbolic link"):
            s.put(new, "new")
    assert list(outside.iterdir()) == []
    for prefix in prefixes:
        (victim.root / "chunks" / prefix).unlink()
        moved = victim.root / "chunks" / f"moved-{prefix}"
        if moved.exists():
            moved.rename(victim.root / "chunks" / prefix)
    victim.intact()
