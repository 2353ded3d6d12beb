"""Fault injection into `save`: a kill -9, ENOSPC, EIO or a torn write at every fault point of a save
(fileio.fault_point runs before every write-side system call) never leaves a half-written checkpoint
under the final name; the checkpoint that was there before is byte-identical until the swap, and the
new one complete after it.

Kills run in a forked child whose injector SIGKILLs itself at the chosen point; raised faults run
in-process. The sweep covers every point of a save of a one-layer tiny sentence encoder (weights,
six support files, manifest, swap)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from _tiny_source import folder_digest, write_tiny_source

from modelpress import fileio
from modelpress.compress import compress
from modelpress.errors import StorageIOError
from modelpress.formats.checkpoint import load, save
from modelpress.formats.hf import load_sentence_encoder
from modelpress.formats.writer import STAGING_SUFFIX


@dataclass
class Scenario:
    new_model: object
    old: Path  # a checkpoint of the int8 model: what is at the output before the save
    old_digest: dict
    new_digest: dict  # what a complete save of the float model writes (saves are deterministic)
    ops: list  # the fault points of one save over an existing checkpoint: (op, file name)
    fresh_ops: list  # ... and of a save to a new path


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Scenario:
    base = tmp_path_factory.mktemp("faults")
    source = write_tiny_source(base / "src", layers=1)
    new_model = load_sentence_encoder(source)
    old = save(compress(load_sentence_encoder(source), "int8"), base / "old")
    reference = save(new_model, base / "reference")

    def record(path: Path, overwrite: bool) -> list:
        ops: list = []
        with fileio.inject_faults(lambda op, target, fd, data: ops.append((op, Path(target).name))):
            save(new_model, path, overwrite=overwrite)
        return ops

    shutil.copytree(old, base / "probe" / "out")
    ops = record(base / "probe" / "out", overwrite=True)
    fresh_ops = record(base / "fresh" / "out", overwrite=False)
    assert folder_digest(base / "probe" / "out") == folder_digest(reference)  # deterministic bytes
    return Scenario(new_model, old, folder_digest(old), folder_digest(reference), ops, fresh_ops)


def _commit(ops: list, name: str) -> int:
    """The index of the fault point just before the swap's rename (the commit point)."""
    return next(i for i, (op, target) in enumerate(ops) if op == "rename" and target == name)


def _state(out: Path, scenario: Scenario) -> str:
    if not out.exists():
        return "absent"
    digest = folder_digest(out)
    if digest == scenario.old_digest:
        return "old"
    if digest == scenario.new_digest:
        return "new"
    pytest.fail(f"a half-written folder is visible under the final name {out}: {sorted(digest)}")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


class _Fault:
    """An injector acting at the `at`-th fault point: kill, raise an errno, or tear the write first."""

    def __init__(self, at: int, action: str, code: int = errno.EIO):
        self.at, self.action, self.code, self.seen = at, action, code, 0
        self.after: list = []

    def __call__(self, op, path, fd, data):
        self.seen += 1
        if self.seen - 1 > self.at:
            self.after.append((op, Path(path).name))
        if self.seen - 1 != self.at:
            return
        if self.action.startswith("torn") and fd is not None and data is not None and len(data) > 1:
            os.write(fd, bytes(data[: len(data) // 2]))  # half of this write reaches the file
        if self.action.endswith("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(self.code, os.strerror(self.code))


def _save_in_child(scenario: Scenario, out: Path, fault: _Fault, overwrite: bool) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            with fileio.inject_faults(fault):
                save(scenario.new_model, out, overwrite=overwrite)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.slow  # kills a child at every fault point: runs in make test, not test-fast
@pytest.mark.parametrize("existing", [True, False], ids=["over-a-checkpoint", "new-path"])
def test_kill_at_every_fault_point(scenario, tmp_path, existing):
    ops = scenario.ops if existing else scenario.fresh_ops
    commit = _commit(ops, "out")
    for at, (op, target) in enumerate(ops):
        folder = tmp_path / f"k{at}"
        folder.mkdir()
        out = folder / "out"
        if existing:
            shutil.copytree(scenario.old, out)
        status = _save_in_child(scenario, out, _Fault(at, "kill"), overwrite=existing)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (at, op, target)
        want = ("old" if existing else "absent") if at <= commit else "new"
        assert _state(out, scenario) == want, (at, op, target)
        assert all(name.endswith(STAGING_SUFFIX) for name in _leftovers(folder)), _leftovers(folder)
        shutil.rmtree(folder)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_an_error_at_every_fault_point(scenario, tmp_path, code):
    commit = _commit(scenario.ops, "out")
    for at, (op, target) in enumerate(scenario.ops):
        out = tmp_path / f"e{at}" / "out"
        shutil.copytree(scenario.old, out)
        fault = _Fault(at, "raise", code)
        if op == "rmtree":  # removing the replaced folder after the swap: the save has succeeded
            with fileio.inject_faults(fault):
                save(scenario.new_model, out, overwrite=True)
            assert _state(out, scenario) == "new"
            continue
        with fileio.inject_faults(fault), pytest.raises(StorageIOError, match=os.strerror(code)):
            save(scenario.new_model, out, overwrite=True)
        assert _state(out, scenario) == ("old" if at <= commit else "new"), (at, op, target)
        assert _leftovers(out.parent) == [], (at, op, target, _leftovers(out.parent))  # staging and temporaries gone
        shutil.rmtree(out.parent)


def test_a_failed_fsync_is_never_retried(scenario, tmp_path):
    for at in [i for i, (op, _) in enumerate(scenario.ops) if op == "fsync"]:
        out = tmp_path / f"f{at}" / "out"
        shutil.copytree(scenario.old, out)
        fault = _Fault(at, "raise", errno.EIO)
        with fileio.inject_faults(fault), pytest.raises(StorageIOError):
            save(scenario.new_model, out, overwrite=True)
        failed = scenario.ops[at][1]
        assert [op for op, name in fault.after if name == failed] == [], fault.after  # not written or synced again
        assert _state(out, scenario) == "old"


@pytest.mark.slow  # kills a child at every fault point: runs in make test, not test-fast
@pytest.mark.parametrize("then", ["raise", "kill"])
def test_torn_writes(scenario, tmp_path, then):
    writes = [i for i, (op, _) in enumerate(scenario.ops) if op == "write"]
    for at in writes:
        out = tmp_path / f"t{at}" / "out"
        shutil.copytree(scenario.old, out)
        if then == "kill":
            status = _save_in_child(scenario, out, _Fault(at, "torn-kill"), overwrite=True)
            assert os.WIFSIGNALED(status)
        else:
            with fileio.inject_faults(_Fault(at, "torn-raise")), pytest.raises(StorageIOError):
                save(scenario.new_model, out, overwrite=True)
            assert _leftovers(out.parent) == []
        assert _state(out, scenario) == "old", at
        shutil.rmtree(out.parent)


def test_the_previous_checkpoint_still_loads_after_a_failed_save(scenario, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(scenario.old, out)
    before = load(out).encode(["hello world"])
    with fileio.inject_faults(_Fault(_commit(scenario.ops, "out"), "raise", errno.ENOSPC)), \
            pytest.raises(StorageIOError, match="No space left"):
        save(scenario.new_model, out, overwrite=True)
    assert (load(out).encode(["hello world"]) == before).all()
