"""Helpers for tests that put hazards in a file system (FIFOs, device nodes) where a regular file belongs."""

from __future__ import annotations

import os
import signal
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def no_hang(seconds: int = 30):
    """Fail (instead of hanging the run) if the body blocks, as a reader that opened a FIFO would."""
    def alarm(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def device_node(path: Path) -> None:
    """A character device with /dev/zero's numbers at `path` (the test is skipped without CAP_MKNOD)."""
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
