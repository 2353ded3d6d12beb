"""`Kernel.QMATMUL`: y = x W^T + b read straight from a QuantizedTensor's packed codes.

The weight stays as the encoding holds it (packed 2/3/4/8-bit codes, float16 scales and zero
points: the layout of `encodings/packing.py`); nothing is decoded ahead of time, so a compressed
model keeps its compressed size in memory. The C extension `_qmatmul` (built by setup.py where a
compiler exists) decodes eight weights at a time in registers, exactly as `QuantizedTensor.decode`
computes them, and multiplies them into the input rows: AVX2 + FMA where the CPU has them, else
portable C, on torch's thread count (or the count `kernel_threads` sets). Without the extension,
a PyTorch fallback decodes blocks of output rows (at most `_FALLBACK_BLOCK_FLOATS` floats at a
time) and multiplies each: the same product, slower, still without a float copy of the whole weight.

Method per call, by a cost model rather than a clock (a busy machine cannot mislead it), from the
number of input rows r:
- r <= FUSED_MAX_ROWS (decode): the C kernel's fused method. Per chunk of 8 weights it spends ~6
  vector ops unpacking codes for every pair of rows, plus one FMA per row: it reads the packed
  codes once and writes nothing but y, so it streams 4-8x fewer bytes than an fp32 matmul.
- r < BLAS_MIN_ROWS: its tiled method: each weight row is unpacked once into a float row in L1
  (~7 ops per chunk), then each row of x costs a load and an FMA per chunk, 3 rows at a time;
  cheaper than fused from 3 rows on.
- r >= BLAS_MIN_ROWS (prefill): blocks of `_TILE_FLOATS` weights are decoded by the C kernel (on
  its threads) into one reused float buffer (4 MiB, transient) and multiplied by PyTorch's BLAS (a
  weight of one block, as every encoder weight is, in a single product straight into y), which reaches far
  more of the CPU's peak on many rows than a hand-written loop; decoding is then ~1/r of the work.
  No float copy of a weight over 1M values exists at any time. Measured against decode-once dense
  (2 threads, quiet AVX-512 machine, 2026-12-07): 1.2-1.5x its time at 1024 rows, 1.2-2.1x at 64
  (blocks of 64K values, in L2, ran 1.6-2.4x): prefill pays for the memory it saves.
The fused and tiled methods give bit-identical outputs (the C file's header says why); the BLAS
method differs from them by float rounding only. The crossovers are op counts, not timings of
this machine: benchmarks/bench_qmatmul.py measures them on a quiet one.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy
import torch
import torch.nn.functional as F

from modelpress.encodings import Encoding, QuantizedTensor
from modelpress.encodings.quantized import PER_CHANNEL, PER_TENSOR
from modelpress.encodings.permuted import InputPermutedTensor
from modelpress.encodings.scaled import ChannelScaledTensor

try:
    from modelpress.nn import _qmatmul
except ImportError:  # installed without a C compiler: the PyTorch fallback runs instead
    _qmatmul = None

__all__ = ["NATIVE_AVAILABLE", "FUSED_MAX_ROWS", "BLAS_MIN_ROWS", "supports_qmatmul", "prepare_qmatmul", "paths",
           "use_path", "kernel_threads"]

NATIVE_AVAILABLE = _qmatmul is not None  # whether the C kernel was built here
FUSED, TILED = 0, 1  # the C kernel's methods
FUSED_MAX_ROWS = 2  # the cost model's crossovers (module docstring)
BLAS_MIN_ROWS = 16
_TILE_FLOATS = 1 << 20  # weights decoded per BLAS block (4 MiB of float32, transient)
_FALLBACK_BLOCK_FLOATS = 1 << 18  # the PyTorch fallback decodes at most this many weights at a time (1 MiB)
_PATHS = ("torch", "scalar", "avx2")  # the fallback, then the C extension's paths by level
# path None: the best path this machine runs (tests force others through use_path); threads None: torch's count
_state: dict = {"path": None, "threads": None}

Prepared = Callable[[torch.Tensor], torch.Tensor]


def supports_qmatmul(enc: Encoding) -> bool:
    """A 2-D quantised weight with a scale per row or per group of a multiple of 8 columns (or such a
    weight times per-input-channel scales no op absorbed: AWQ/SmoothQuant's ChannelScaledTensor, or such a weight
    with its input columns permuted: GPTQ act order's InputPermutedTensor)."""
    if isinstance(enc, (ChannelScaledTensor, InputPermutedTensor)):
        enc = enc.inner
    if not isinstance(enc, QuantizedTensor) or len(enc.shape) != 2 or min(enc.shape) < 1:
        return False
    gs = enc.scheme.group_size
    return gs == PER_CHANNEL or (gs != PER_TENSOR and gs % 8 == 0)


def paths() -> tuple[str, ...]:
    """The paths this machine can run, slowest first: 'torch', then the C extension's ('scalar', 'avx2')."""
    if not NATIVE_AVAILABLE:
        return ("torch",)
    return _PATHS[: 2 + _qmatmul.BEST_PATH]


def active_path() -> str:
    """The path calls take now."""
    return _state["path"] or paths()[-1]


@contextlib.contextmanager
def use_path(path: str) -> Iterator[None]:
    """Run every QMATMUL call inside the block on `path` (tests force each path this way)."""
    if path not in paths():
        raise ValueError(f"path {path!r} does not run here: use one of {paths()}")
    previous = _state["path"]
    _set_path(path)
    try:
        yield
    finally:
        _set_path(previous)


@contextlib.contextmanager
def kernel_threads(threads: int) -> Iterator[None]:
    """Run the C kernel on `threads` threads inside the block, whatever torch's own count is.

    Batch-1 decode runs best with torch on one thread and this kernel on all of them
    (nn/generation.py): torch's OpenMP workers, left spinning after each small op, otherwise take
    the cores this kernel's workers are waiting for.
    """
    if threads < 1:
        raise ValueError(f"threads={threads}: give at least 1")
    previous = _state["threads"]
    _state["threads"] = threads
    try:
        yield
    finally:
        _state["threads"] = previous


def _set_path(path: str | None) -> None:
    _state["path"] = path
    if NATIVE_AVAILABLE:  # the C extension's own switch: the level of its path, or its best
        level = _PATHS.index(path) - 1 if path not in (None, "torch") else _qmatmul.BEST_PATH
        _qmatmul._simd(level)


def prepare_qmatmul(enc: QuantizedTensor | ChannelScaledTensor | InputPermutedTensor,
                    bias: torch.Tensor | None = None) -> Prepared:
    """The callable x (..., K) -> (..., N) float32, holding only references to the encoding's arrays."""
    if isinstance(enc, InputPermutedTensor):  # x W^T = x[..., order] inner^T: one gather of x
        run_permuted, order = prepare_qmatmul(enc.inner, bias), enc.order
        return lambda x: run_permuted(x.index_select(-1, order))
    if isinstance(enc, ChannelScaledTensor):  # x W_eff^T = (x * input_scale) inner^T: one pass over x
        run_inner, input_scale = prepare_qmatmul(enc.inner, bias), enc.input_scale
        return lambda x: run_inner(x.float() * input_scale)  # (..., K) * (K,)
    out_f, in_f = enc.shape
    codes, scale = enc.codes.contiguous(), enc.scale.contiguous()
    zero = None if enc.zero is None else enc.zero.contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    arrays = (codes.numpy(), scale.numpy(), None if zero is None else zero.numpy(), None if b is None else b.numpy())
    shape = (out_f, in_f, enc.scheme.bits, enc.scheme.group_size)  # group_size 0 = per channel, as C reads it

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # training through this layer: a differentiable product
            return F.linear(x, enc.decode(x.dtype), None if b is None else b.to(x.dtype))
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        rows = x.numel() // in_f  # x (..., K) as (M, K): the C kernel reads the buffer, no reshape needed
        if _state["path"] == "torch" or not NATIVE_AVAILABLE:
            return _fallback(enc, x.reshape(rows, in_f), b).reshape(*x.shape[:-1], out_f)
        if rows >= BLAS_MIN_ROWS:
            return _blas_tiles(x.reshape(rows, in_f), arrays, shape, b).reshape(*x.shape[:-1], out_f)
        y = numpy.empty((*x.shape[:-1], out_f), numpy.float32)  # cheaper than torch.empty + .numpy() per call
        method = FUSED if rows <= FUSED_MAX_ROWS else TILED
        _qmatmul.gemm(x.numpy(), y, *arrays, rows, *shape, method, _state["threads"] or torch.get_num_threads())
        return torch.from_numpy(y)

    return run


def _blas_tiles(x: torch.Tensor, arrays: tuple, shape: tuple, bias: torch.Tensor | None) -> torch.Tensor:
    """Many rows: decode a block of weight rows at a time (C, on the kernel's threads), multiply it with
    BLAS (x (M, K)). A weight of one block (every weight up to 1M values) is one product straight into
    y; larger ones are multiplied block by block into y^T, whose blocks are contiguous."""
    codes, scale, zero, _ = arrays
    out_f, in_f, bits, gs = shape
    threads = _state["threads"] or torch.get_num_threads()
    step = max(1, _TILE_FLOATS // in_f)
    block = torch.empty(min(step, out_f), in_f)  # (T, K), reused
    if step >= out_f:
        _qmatmul.decode_rows(block.numpy(), codes, scale, zero, out_f, in_f, bits, gs, 0, out_f, threads)
        return x @ block.t() if bias is None else torch.addmm(bias, x, block.t())
    y_t = torch.empty(out_f, x.shape[0])  # (N, M): each block's rows are contiguous here
    for n0 in range(0, out_f, step):
        n1 = min(n0 + step, out_f)
        w = block[: n1 - n0]
        _qmatmul.decode_rows(w.numpy(), codes, scale, zero, out_f, in_f, bits, gs, n0, n1, threads)
        torch.mm(w, x.t(), out=y_t[n0:n1])
    y = y_t.t().contiguous()  # (M, N)
    return y if bias is None else y.add_(bias)


def _fallback(enc: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The portable kernel: decode a block of output rows at a time and multiply it (x (M, K))."""
    out_f, in_f = enc.shape
    y = torch.empty(x.shape[0], out_f)  # (M, N)
    step = max(1, _FALLBACK_BLOCK_FLOATS // in_f)
    for n0 in range(0, out_f, step):
        rows = torch.arange(n0, min(n0 + step, out_f))
        y[:, n0:n0 + len(rows)] = F.linear(x, enc.decode_rows(rows), None if bias is None else bias[rows])
    return y
