"""What a placement costs on this machine: decode speed per codec and matmul speed, measured once per
process with a small probe, and the time per forward pass a plan implies.

The decode probe lands real chunks of the version (a few per codec: read, decode and hash-check, what
streaming does) into one buffer; the matmul probe times a batch-1 fp32 `F.linear` of a 1024 x 1024
weight (what a decode step runs). A pass costs its compute, and its streamed bytes at the decode
speed of their codecs; the ring overlaps the two, so the expected time is their maximum (the sum when
nothing overlaps is given too).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modelpress.formats.checkpoint import PART_SEPARATOR
from modelpress.store.reader import ChunkReader, Scratch
from modelpress.store.rows import ChunkRow

from modelpress.regions.plan import PlacementPlan

__all__ = ["Costs", "measure_costs", "expected_pass"]

_MATMUL: dict[int, float] = {}  # by thread count: GFLOP/s of the probe
_DECODE: dict[tuple[str, int], float] = {}  # by (codec, threads): raw MB/s


@dataclass(frozen=True)
class Costs:
    decode_mb_s: dict[str, float]  # raw MB/s landed per codec (read, decode, hash check; one thread)
    matmul_gflops: float  # batch-1 fp32 Linear


def _best(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def measure_costs(reader: ChunkReader, rows: list[ChunkRow], per_codec: int = 4) -> Costs:
    """Decode MB/s for each codec among `rows` (a few chunks each) and the matmul probe; memoised per process."""
    threads = torch.get_num_threads()
    if threads not in _MATMUL:
        weight, x = torch.randn(1024, 1024), torch.randn(1, 1024)
        F.linear(x, weight)
        _MATMUL[threads] = 2 * weight.numel() / _best(lambda: F.linear(x, weight), 20) / 1e9
    by_codec: dict[str, list[ChunkRow]] = {}
    for row in rows:
        by_codec.setdefault(row.codec.name, []).append(row)
    speeds = {}
    for name, group in sorted(by_codec.items()):
        key = (name, threads)
        if key not in _DECODE:
            sample = sorted(group, key=lambda r: -r.raw_size)[:per_codec]
            buffer = memoryview(bytearray(max(r.raw_size for r in sample)))
            scratch = Scratch()

            def land_all():
                for row in sample:
                    reader.land(row, buffer[:row.raw_size], scratch)

            land_all()  # warm: the page cache, the scratch buffer
            _DECODE[key] = sum(r.raw_size for r in sample) / _best(land_all, 3) / 1e6
        speeds[name] = _DECODE[key]
    return Costs(speeds, _MATMUL[threads])


def expected_pass(plan: PlacementPlan, costs: Costs, rows: dict[str, ChunkRow]) -> dict[str, float]:
    """Seconds per batch-1 forward pass (one generated token): compute, streaming, and both overlapped."""
    flops = sum(2 * math.prod(p.logical or p.shape) for p in plan.placements
                if "linear" in p.uses and (p.logical is not None or PART_SEPARATOR not in p.tensor))
    compute = flops / (costs.matmul_gflops * 1e9)
    stream = 0.0
    for unit in plan.units:
        for row in unit.chunks:
            stream += row.raw_size / (costs.decode_mb_s.get(row.codec.name, math.inf) * 1e6)
    return {"compute_s": compute, "stream_s": stream, "pass_s": max(compute, stream), "serial_s": compute + stream}
