"""Helpers for the store tests, and the store operations that the crash, fault and concurrency tests run as
processes.

    python _store_support.py put BASE DIR=POINT...         for each pair, a process that commits state("m", 2) to
                                                           the store BASE/DIR and dies at POINT; prints
                                                           {DIR: exit code}
    python _store_support.py gc BASE DIR=POINT...          the same for gc(grace=0) of the store BASE/DIR
    python _store_support.py writers STORE N COUNT OUTDIR  N processes, each putting COUNT versions and
                                                           dumping what it put to OUTDIR/writer<i>.json
    python _store_support.py stress STORE SECONDS OUTDIR   for SECONDS: 4 loader processes, 1 putting versions of
                                                           model "s" and 1 running gc(grace=0) in a loop; each
                                                           reports what it did and every exception it met to
                                                           OUTDIR/<role>.json (see `stress_role`)

The processes are forked from one interpreter that has imported torch once (no torch work happens
before the fork), so dozens of them cost one import. Points (the fault points are modelpress.fileio's:
every file creation, write, fsync, link, rename, unlink, mkdir and catalogue commit goes through one):
    fault:N    SIGKILL just before the Nth fault point
    torn:N     at the Nth write of data: half of the data written to the file, then SIGKILL
    after      SIGKILL once the operation returned
    (empty)    no kill
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


def killer(point: str) -> Callable[..., None]:
    """A fault injector that kills this process at `point` (see the module docstring)."""
    kind, _, n = point.partition(":")
    seen = [0]

    def injector(op: str, path: str, fd: int | None, data) -> None:
        if kind == "fault" or (kind == "torn" and op == "write" and data is not None):
            seen[0] += 1
            if seen[0] == int(n):
                if kind == "torn":
                    os.write(fd, bytes(memoryview(data).cast("B")[: len(data) // 2]))
                _die()

    return injector


def recorder(ops: list) -> Callable[..., None]:
    """A fault injector that only records (op, path, whether it carries data) at each fault point."""
    def injector(op: str, path: str, fd: int | None, data) -> None:
        ops.append((op, path, data is not None))
    return injector


def commit(root: str, model: str, step: int, point: str = "") -> str:
    from modelpress.fileio import inject_faults
    from modelpress.store import Store

    small_chunks()
    with Store(root) as store, inject_faults(killer(point)):
        vid = store.put(state(model, step), model, message=f"step {step}")
    if point == "after":
        _die()
    return vid


def collect(root: str, point: str = "") -> None:
    from modelpress.fileio import inject_faults
    from modelpress.store import Store

    with Store(root) as store, inject_faults(killer(point)):
        store.gc(grace=0)
    if point == "after":
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


def stress_role(root: str, role: str, deadline: float, out: str) -> None:
    """One process of the stress run, until `deadline` (time.time()): `put` commits state("s", i) for i = 0, 1, ...
    and appends each acknowledged version to its report; `gc` collects; `load<k>` reads the versions the
    catalogue lists, round robin, and compares every byte with what that step put. Every exception is recorded
    (the test asserts there are none), never raised."""
    import time
    import traceback

    from modelpress.store import Store

    small_chunks()
    report: dict = {"done": 0, "errors": [], "acked": {}}
    with Store(root) as store:
        step = 0
        while time.time() < deadline:
            try:
                if role == "put":
                    vid = store.put(state("s", step), "s", message=f"step {step}")
                    report["acked"][vid] = step
                    step += 1
                elif role == "gc":
                    store.gc(grace=0)
                else:
                    log = store.log("s") if any(m == "s" for m, _ in store.models()) else []
                    if not log:
                        continue
                    version = log[step % len(log)]
                    step += 1
                    want = state("s", int(version.message.split()[1]))
                    names = None if step % 3 else ["encoder.*"]
                    got = store.get("s", version.id, names=names, threads=1 + step % 2)
                    assert {k: digest(v) for k, v in got.items()} == {
                        k: digest(v) for k, v in want.items() if names is None or k.startswith("encoder.")}
                report["done"] += 1
            except BaseException as exc:  # recorded for the test, which fails on any
                if len(report["errors"]) < 5:
                    report["errors"].append(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")
                report["failed"] = report.get("failed", 0) + 1
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(report, fh)


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
    if mode in ("put", "gc"):
        base, pairs = Path(args[0]), dict(arg.split("=", 1) for arg in args[1:])
        work = functools.partial(commit, model="m", step=2) if mode == "put" else collect
        codes = in_processes({d: functools.partial(work, str(base / d), point=p) for d, p in pairs.items()})
    elif mode == "stress":
        import time

        root, seconds, outdir = args[0], float(args[1]), Path(args[2])
        until = time.time() + seconds
        roles = ["put", "gc"] + [f"load{i}" for i in range(4)]
        codes = in_processes({r: functools.partial(stress_role, root, r, until, str(outdir / f"{r}.json"))
                              for r in roles})
    elif mode == "writers":
        root, n, count, outdir = args[0], int(args[1]), int(args[2]), Path(args[3])
        codes = in_processes({str(i): functools.partial(writer, root, i, count, str(outdir / f"writer{i}.json"))
                              for i in range(n)})
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(codes))
