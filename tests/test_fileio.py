"""modelpress.fileio, the one I/O layer: reads take regular files only and never more than their bound; writes
are atomic under every fault (an error at each fault point, a torn write, a kill), a failed fsync is never
retried, publish(replace=False) lets the existing file win, swap_in_dir replaces a folder both ways (exchange
and the two-rename fallback), and the lock and folder helpers refuse what is not theirs."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from fs_hazards import device_node, no_hang
from modelpress import fileio
import modelpress.fileio.outputs  # noqa: F401  (patched below)
from modelpress.errors import LimitExceededError, NotRegularFileError, StorageIOError, UnsafeOutputError


# ---------------------------------------------------------------- reading: regular files, bounded

NOT_REGULAR = {
    "fifo": lambda p, tmp: os.mkfifo(p),
    "link to /dev/zero": lambda p, tmp: p.symlink_to("/dev/zero"),
    "link to a regular file": lambda p, tmp: ((tmp / "real").write_bytes(b"x"), p.symlink_to(tmp / "real")),
    "dangling link": lambda p, tmp: p.symlink_to(tmp / "nowhere"),
    "folder": lambda p, tmp: p.mkdir(),
    "device": lambda p, tmp: device_node(p),
}


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_only_regular_files_are_opened_and_nothing_blocks(tmp_path, kind):
    path = tmp_path / "f"
    NOT_REGULAR[kind](path, tmp_path)
    with no_hang():
        with pytest.raises(NotRegularFileError, match=r"symbolic link|not a regular file|folder") as info:
            fileio.read_file(path, 1 << 20, "test file")
        with pytest.raises(NotRegularFileError):
            fileio.open_regular(path, "test file")
    assert "test file" in str(info.value) and str(path) in str(info.value)


def test_a_missing_file_is_the_builtin_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        fileio.read_file(tmp_path / "none", 10, "test file")


def test_reads_are_bounded_before_a_byte_is_read(tmp_path):
    path = tmp_path / "huge"
    with open(path, "wb") as fh:
        fh.truncate(1 << 40)  # a sparse terabyte
    started = time.monotonic()
    with pytest.raises(LimitExceededError, match="1099511627776 bytes, more than the 4096"):
        fileio.read_file(path, 4096, "test file")
    assert time.monotonic() - started < 1


def test_read_file_returns_exactly_the_bytes(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(300_000)
    path.write_bytes(data)
    assert fileio.read_file(path, len(data), "test file") == data
    assert fileio.read_file(tmp_path / "f", 1 << 30, "test file") == data


# ---------------------------------------------------------------- writing: atomic under every fault

def _faulty(target: str, nth: int = 1, code: int = errno.EIO, torn: bool = False):
    calls = []

    def injector(op, path, fd, data):
        calls.append(op)
        if op == target and calls.count(op) == nth:
            if torn:
                os.write(fd, bytes(memoryview(data).cast("B")[: len(data) // 2]))
            raise OSError(code, os.strerror(code))

    injector.calls = calls
    return injector


FAULTS = [("write", 1), ("write", 2), ("write", 3), ("fsync", 1), ("rename", 1), ("fsync_dir", 1)]


@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "creating"])
@pytest.mark.parametrize("target, nth", FAULTS)
@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
def test_write_file_is_all_or_nothing_under_each_fault(tmp_path, existing, target, nth, code):
    path = tmp_path / "f"
    if existing:
        path.write_bytes(b"old contents")
    injector = _faulty(target, nth, code)
    with fileio.inject_faults(injector):
        if target == "fsync_dir":  # the new file is in place; only its durability is in doubt: still an error
            with pytest.raises(StorageIOError, match=os.strerror(code)):
                fileio.write_file(path, [b"new ", b"contents"])
            assert path.read_bytes() == b"new contents"
        else:
            with pytest.raises(StorageIOError, match=os.strerror(code)):
                fileio.write_file(path, [b"new ", b"contents"])
            assert (path.read_bytes() if path.exists() else None) == (b"old contents" if existing else None)
    assert [p.name for p in tmp_path.iterdir()] == (["f"] if existing or target == "fsync_dir" else [])
    if target == "fsync":
        assert injector.calls.count("fsync") == 1  # a failed fsync is never retried


def test_a_torn_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old contents")
    with fileio.inject_faults(_faulty("write", 2, torn=True)):
        with pytest.raises(StorageIOError):
            fileio.write_file(path, [b"new contents" * 100])
    assert path.read_bytes() == b"old contents" and [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.parametrize("nth", range(1, 8))  # six fault points: create, two writes, fsync, rename, fsync_dir
def test_a_kill_at_any_fault_point_leaves_the_old_file_or_the_whole_new_one(tmp_path, nth):
    path = tmp_path / "f"
    path.write_bytes(b"old contents")

    def kill(op, p, fd, data, seen=[]):
        seen.append(op)
        if len(seen) == nth:
            if data is not None:  # torn: half the data, then the kill
                os.write(fd, bytes(memoryview(data).cast("B")[: len(data) // 2]))
            os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:
        with fileio.inject_faults(kill):
            fileio.write_file(path, [b"new ", b"contents"])
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert path.read_bytes() in (b"old contents", b"new contents")
    assert os.waitstatus_to_exitcode(status) == (-signal.SIGKILL if nth <= 6 else 0)


def test_publish_without_replace_lets_the_existing_file_win(tmp_path):
    final = tmp_path / "f"
    final.write_bytes(b"first")
    tmp = fileio.write_temp(tmp_path, "f", [b"second"])
    assert fileio.publish(tmp, final, replace=False) is False
    assert final.read_bytes() == b"first" and not tmp.exists()
    tmp = fileio.write_temp(tmp_path, "g", [b"only"])
    assert fileio.publish(tmp, tmp_path / "g", replace=False) is True
    assert (tmp_path / "g").read_bytes() == b"only" and not tmp.exists()
    tmp = fileio.write_temp(tmp_path, "f", [b"third"])
    assert fileio.publish(tmp, final, replace=True) is True and final.read_bytes() == b"third"


def test_write_file_without_replace_reports_whether_it_wrote(tmp_path):
    assert fileio.write_file(tmp_path / "f", b"a", replace=False) is True
    assert fileio.write_file(tmp_path / "f", b"b", replace=False) is False
    assert (tmp_path / "f").read_bytes() == b"a" and [p.name for p in tmp_path.iterdir()] == ["f"]


# ---------------------------------------------------------------- swapping a folder in

def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "modelpress.json").write_text(text)
    return path


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2 exchange", "two renames"])
def test_swap_in_dir_replaces_an_existing_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fileio.outputs, "_exchange", lambda a, b: False)
    out = _folder(tmp_path / "out", "old")
    staging = _folder(tmp_path / ".out.new", "new")
    fileio.swap_in_dir(staging, out)
    assert (out / "modelpress.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_swap_in_dir_moves_a_folder_into_a_free_place(tmp_path):
    staging = _folder(tmp_path / ".out.new", "new")
    fileio.swap_in_dir(staging, tmp_path / "out")
    assert (tmp_path / "out" / "modelpress.json").read_text() == "new" and not staging.exists()


@pytest.mark.parametrize("exchange, nth", [(True, 1), (False, 1), (False, 2)],
                         ids=["the exchange", "the first of two renames", "the second of two renames"])
def test_a_failed_swap_keeps_the_old_folder(tmp_path, monkeypatch, exchange, nth):
    if not exchange:
        monkeypatch.setattr(fileio.outputs, "_exchange", lambda a, b: False)
    out = _folder(tmp_path / "out", "old")
    staging = _folder(tmp_path / ".out.new", "new")
    with fileio.inject_faults(_faulty("rename", nth)):
        with pytest.raises(StorageIOError):
            fileio.swap_in_dir(staging, out)
    assert (out / "modelpress.json").read_text() == "old" and (staging / "modelpress.json").read_text() == "new"


# ---------------------------------------------------------------- folders, removal, locks, the fault seam

def test_make_dirs_refuses_a_path_under_a_file_or_a_link(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UnsafeOutputError, match="not a folder|under a file"):
        fileio.make_dirs(tmp_path / "file" / "sub")
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(UnsafeOutputError, match="symbolic link"):
        fileio.make_dirs(tmp_path / "link")
    fileio.make_dirs(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_remove_tree_never_follows_a_link(tmp_path):
    keep = _folder(tmp_path / "keep", "mine")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "link").symlink_to(keep, target_is_directory=True)
    fileio.remove_tree(tree)
    assert not tree.exists() and (keep / "modelpress.json").read_text() == "mine"
    (tmp_path / "alias").symlink_to(keep, target_is_directory=True)
    with pytest.raises(UnsafeOutputError):
        fileio.remove_tree(tmp_path / "alias")
    assert keep.exists()


def test_remove_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        fileio.remove_file(tmp_path / "none")
    (tmp_path / "f").write_bytes(b"")
    with fileio.inject_faults(_faulty("unlink")):
        with pytest.raises(StorageIOError):
            fileio.remove_file(tmp_path / "f")
    assert (tmp_path / "f").exists()


def test_an_exclusive_lock_waits_for_a_shared_one(tmp_path):
    lock, order = tmp_path / "lock", []

    def shared():
        with fileio.locked(lock, exclusive=False):
            order.append("shared in")
            time.sleep(0.3)
            order.append("shared out")

    thread = threading.Thread(target=shared)
    thread.start()
    time.sleep(0.1)
    with fileio.locked(lock, exclusive=True):
        order.append("exclusive in")
    thread.join()
    assert order == ["shared in", "shared out", "exclusive in"] and lock.is_file()


@pytest.mark.parametrize("kind", ["folder", "link", "fifo"])
def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    lock = tmp_path / "lock"
    {"folder": lambda: lock.mkdir(), "link": lambda: lock.symlink_to(tmp_path / "x"),
     "fifo": lambda: os.mkfifo(lock)}[kind]()
    with no_hang(), pytest.raises(NotRegularFileError, match="lock"):
        with fileio.locked(lock, exclusive=True):
            pass
    assert not (tmp_path / "x").exists()


def test_fault_points_do_nothing_without_an_injector_and_injectors_nest(tmp_path):
    fileio.fault_point("write", tmp_path)
    outer, inner = [], []
    with fileio.inject_faults(lambda *a: outer.append(a[0])):
        fileio.fault_point("fsync", tmp_path)
        with fileio.inject_faults(lambda *a: inner.append(a[0])):
            fileio.fault_point("link", tmp_path)
        fileio.fault_point("unlink", tmp_path)
    fileio.fault_point("write", tmp_path)
    assert outer == ["fsync", "unlink"] and inner == ["link"]
