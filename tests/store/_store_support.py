"""Helpers for the store tests, and the store writers that the crash and concurrency tests run as processes.

    python _store_support.py crash BASE DIR=POINT...       for each pair, a process that commits state("m", 2)
                                                           to the store BASE/DIR and is SIGKILLed at kill
                                                           POINT; prints {DIR: exit code}
    python _store_support.py writers STORE N COUNT OUTDIR  N processes, each putting COUNT versions and
                                                           dumping what it put to OUTDIR/writer<i>.json

The processes are forked from one interpreter that has imported torch once (no torch work happens
before the fork), so a dozen writers cost one import. Kill points:
    chunk-write:N       after the Nth chunk file is written (moved into place)
    chunk-rename        inside the first chunk write: temp file written and fsynced, not yet moved into place
    before-transaction  every chunk file written, the catalogue transaction not begun
    insert-version      inside the transaction: version rows inserted, refs not yet set, no COMMIT
    set-ref             inside the transaction: `latest` set, no COMMIT
    after-commit        put() returned
    (empty)             no kill
Chunks are cut at SMALL_CHUNK bytes so that a commit writes many chunk files.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import zlib
from pathlib import Path
from typing import Callable

import blake3
import torch

SMALL_CHUNK = 2048


def state(model: str, step: int) -> dict[str, torch.Tensor]:
    """A deterministic state dict: a weight that drifts by 1e-4 noise per step (delta-friendly), a table
    shared by every model and step (deduplicated), a weight with one row changed per step, a per-step tensor."""
    base = torch.Generator().manual_seed(zlib.crc32(model.encode()))
    drift = torch.Generator().manual_seed(zlib.crc32(f"{model}/drift".encode()))
    weight = torch.randn(64, 32, generator=base)  # (64, 32) fp32: 4 chunks of 2 KiB
    for _ in range(step):
        weight = weight + 1e-4 * torch.randn(64, 32, generator=drift)
    rows = torch.randn(16, 64, generator=base).half()  # (16, 64) fp16: 1 chunk
    rows[step % 16] += 1
    return {
        "encoder.weight": weight,
        "encoder.rows": rows,
        "shared.table": torch.arange(1024, dtype=torch.int32).reshape(32, 32),
        f"step{step}.bias": torch.full((7,), float(step), dtype=torch.bfloat16),
    }


def digest(t: torch.Tensor) -> list:
    """What a reader must get back: dtype, shape and the BLAKE3 of the tensor's bytes."""
    return [str(t.dtype), list(t.shape), blake3.blake3(bits(t).numpy().tobytes()).hexdigest()]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes (NaN payloads and -0.0 included)."""
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(bits(got[name]), bits(t)), name


def chunk_files(root: Path) -> set[str]:
    return {p.name for p in (root / "chunks").glob("*/*")}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and mtime: proves nothing there was written."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def small_chunks() -> None:
    from modelpress.store import layout

    layout.split_rows = functools.partial(layout.split_rows, target=SMALL_CHUNK)
    layout.ALIGNED_CHUNK_BYTES = SMALL_CHUNK


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str) -> None:
    """Install the kill point (patches in this process only)."""
    from modelpress.store import objects, store
    from modelpress.store.catalog import Catalog

    if point.startswith("chunk-write:"):
        limit, original, calls = int(point.split(":")[1]), store.write_chunk, []

        def write_chunk(*args, **kwargs):
            result = original(*args, **kwargs)
            calls.append(1)
            if len(calls) == limit:
                _die()
            return result

        store.write_chunk = write_chunk
    elif point == "chunk-rename":
        class _Os:  # objects.py's own view of `os`: the file moves into place by replace() or link()
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                _die()

            link = replace

        objects.os = _Os()
    elif point == "before-transaction":
        version_id = store._version_id

        def _version_id(*args, **kwargs):
            vid = version_id(*args, **kwargs)
            _die()
            return vid

        store._version_id = _version_id
    elif point in ("insert-version", "set-ref"):
        name = point.replace("-", "_")
        original = getattr(Catalog, name)

        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            _die()
            return result

        setattr(Catalog, name, staticmethod(wrapped))
    elif point not in ("", "after-commit"):
        raise SystemExit(f"unknown kill point {point!r}")


def commit(root: str, model: str, step: int, point: str) -> None:
    from modelpress.store import Store

    small_chunks()
    _arm(point)
    with Store(root) as store:
        store.put(state(model, step), model, message=f"step {step}")
    if point == "after-commit":
        _die()


def writer(root: str, index: int, count: int, out: str) -> None:
    """COUNT versions of a model shared with another writer; every version has the shared table."""
    from modelpress.store import Store

    small_chunks()
    put = {}
    with Store(root) as store:
        for i in range(count):
            model = f"model{index % 2}"
            tensors = state(model, 0)
            tensors["writer.own"] = torch.full((16,), float(index))
            tensors["version.unique"] = torch.randn(8, 8, generator=torch.Generator().manual_seed(1000 * index + i))
            vid = store.put(tensors, model, message=f"writer {index} #{i}")
            put[vid] = {"model": model, "tensors": {k: digest(v) for k, v in tensors.items()}}
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(put, fh)


def run_forked(*args: str, timeout: float = 300) -> dict[str, int]:
    """Run this file with `args` in a fresh interpreter; the exit code of each forked process."""
    import subprocess

    done = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def in_processes(jobs: dict[str, Callable[[], None]]) -> dict[str, int]:
    """Run each job in a forked process, all at once; their exit codes (-9: SIGKILLed)."""
    import traceback

    pids = {}
    for key, job in jobs.items():
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                job()
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids[key] = pid
    return {key: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for key, pid in pids.items()}


if __name__ == "__main__":
    import modelpress.store  # noqa: F401  (import once, before forking)

    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "crash":
        base, pairs = Path(args[0]), dict(arg.split("=", 1) for arg in args[1:])
        codes = in_processes({d: functools.partial(commit, str(base / d), "m", 2, p) for d, p in pairs.items()})
    elif mode == "writers":
        root, n, count, outdir = args[0], int(args[1]), int(args[2]), Path(args[3])
        codes = in_processes({str(i): functools.partial(writer, root, i, count, str(outdir / f"writer{i}.json"))
                              for i in range(n)})
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(codes))
