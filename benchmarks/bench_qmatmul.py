"""Micro-benchmark of the weight-only matmul kernels on SmolLM2-135M's Linear shapes.

For each shape (out x in) and row count (1 = a decode step, 64 = a prefill chunk), at 1 and 2
threads: modelpress's QMATMUL (packed codes read directly, nn/_qmatmul.c) at int8 per channel and
4-bit symmetric g32/g64 (576 is no multiple of 128), against F.linear on the fp32 weight and
PyTorch's own weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`). A decode step streams every layer's
weights from memory once, so each candidate cycles through enough copies of the layer (at least
`--stream-mb` of fp32 weights, beyond this CPU's 32 MiB L3) that no call finds its weight in
cache; `--stream-mb 0` times one hot copy instead. Candidates take turns call by call (interleaved
rounds) and the median of each is reported, so a burst of load from other jobs lands on all of
them alike; even so, only a quiet machine gives figures worth quoting.

    python benchmarks/bench_qmatmul.py [--rounds 50] [--threads 1 2] [--stream-mb 96] [--out results_qmatmul.md]

Every kernel's output is checked against decode-then-matmul before it is timed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

from modelpress.encodings import QuantScheme, quantize  # noqa: E402
from modelpress.nn import qmatmul  # noqa: E402
from modelpress.nn.kernels import Kernel, prepare  # noqa: E402

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): q/o, k/v, gate/up, down, lm_head
ROWS = (1, 64)
SCHEMES = {"int8": QuantScheme(8, True, "channel"), "q4 g32": QuantScheme(4, True, 32),
           "q4 g64": QuantScheme(4, True, 64)}


def candidates(weight: torch.Tensor) -> dict[str, tuple]:
    """name -> (callable x -> y, the weight it should equal when decoded)."""
    out = {"fp32 F.linear": (lambda x, w=weight: F.linear(x, w), weight)}
    for name, scheme in SCHEMES.items():
        enc = quantize(weight, scheme)
        out[f"qmatmul {name}"] = (prepare(Kernel.QMATMUL, enc), enc.decode())
        if scheme.bits == 8:
            out["torch int8pack_mm"] = (prepare(Kernel.INT8_WEIGHT_MM, enc), enc.decode())
        elif scheme.group_size == 32:
            out["torch int4pack_mm g32"] = (prepare(Kernel.INT4_WEIGHT_MM, enc), enc.decode())
    return out


def bench(shape: tuple[int, int], rows: int, threads: int, rounds: int, stream_mb: float) -> dict[str, float]:
    """Median seconds per call of every candidate, interleaved call by call, each call on the next copy."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    copies = max(1, math.ceil(stream_mb * 2**20 / (shape[0] * shape[1] * 4)))
    layers = [candidates(torch.randn(*shape, generator=gen) * 0.05) for _ in range(copies)]  # copy -> name -> (fn, W)
    x = torch.randn(rows, shape[1], generator=gen)
    for name, (fn, decoded) in layers[0].items():
        ref = F.linear(x, decoded)
        torch.testing.assert_close(fn(x), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    for kernels in layers:  # warm-up: first calls allocate
        for fn, _ in kernels.values():
            fn(x)
    times = {name: [] for name in layers[0]}
    for i in range(rounds):
        kernels = layers[i % copies]
        for name, (fn, _) in kernels.items():
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stream-mb", type=float, default=96.0, help="fp32 MB of copies cycled per shape (0: hot)")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    lines = [f"CPU: {cpu_name()}; C kernel path: {qmatmul.active_path()}; torch {torch.__version__}; "
             f"median of {args.rounds} interleaved calls, each on the next of copies holding >= {args.stream_mb:g} MB "
             "of fp32 weights; time in microseconds (x: speed-up over fp32 F.linear)", ""]
    for threads in args.threads:
        for rows in ROWS:
            results = {shape: bench(shape, rows, threads, args.rounds, args.stream_mb) for shape in SHAPES}
            names = list(next(iter(results.values())))
            lines.append(f"### {threads} thread(s), {rows} row(s)")
            lines.append("")
            lines.append("| kernel | " + " | ".join(f"{o}x{i}" for o, i in SHAPES) + " |")
            lines.append("|---|" + "---|" * len(SHAPES))
            for name in names:
                cells = []
                for shape in SHAPES:
                    t, base = results[shape][name], results[shape]["fp32 F.linear"]
                    cells.append(f"{t * 1e6:.0f} ({base / t:.2f}x)")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
            print("\n".join(lines[-len(names) - 4:]), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
