"""Matmul kernels that run an encoded weight, which encodings each accepts, and how AUTO chooses.

Kernel speed on CPUs is not what one would guess (on an AVX2 EPYC, PyTorch's weight-only int8
and int4 kernels are 10-30x slower than fp32 matmul, while fbgemm's dynamic int8 is faster).
`Kernel.QMATMUL` is modelpress's own (nn/qmatmul.py, nn/_qmatmul.c): it reads a quantised
weight's packed codes directly, so the weight stays compressed in memory, and for 1-row inputs
(decode) it reads 4-8x fewer bytes than an fp32 matmul. Weight-only kernels all compute the same
product as decode-then-matmul (tests prove it); `DYNAMIC_INT8`, `_TOKEN` and `_ROW` also
quantise activations, which changes the numbers, so they are never picked automatically, only
when a recipe asks for them.

AUTO decides by rules, not by timing where a rule exists, since a clock on a busy machine misleads
(on a loaded 2-core machine, timing 512-row inputs picked decode-per-call for 6 of MiniLM's 37
layers in 2 of 3 trials):
- a weight QMATMUL runs, where the C extension is built: QMATMUL, for every row count (inside it,
  a cost model picks its fused method for decode and its tiled one for prefill, per call);
- a `LowRankTensor`: LOW_RANK when r (R + C) < R C (fewer multiply-adds and fewer floats than the
  decoded weight), else decode-once dense;
- DECODE_PER_CALL is never timed against DENSE: it runs the same matmul plus a decode;
- what is left (sparse weights, other quantised ones, or no C extension) is timed on a
  (rows, in_features) input, candidates interleaved round by round so a burst of load slows them
  all alike, once per process, shape, row count and thread count.
"""

from __future__ import annotations

import math
import time
from enum import Enum
from typing import Callable

import torch
import torch.nn.functional as F

from modelpress.encodings import Encoding, LowRankTensor, QuantizedTensor
from modelpress.encodings.quantized import PER_CHANNEL, PER_TENSOR
from modelpress.encodings.scaled import ChannelScaledTensor
from modelpress.errors import ConfigError
from modelpress.nn.qmatmul import NATIVE_AVAILABLE, prepare_qmatmul, supports_qmatmul
from modelpress.nn.sparse import prepare_sparse_csr, supports_sparse_csr

__all__ = ["Kernel", "supports", "prepare", "select_kernel", "WEIGHT_ONLY_KERNELS", "ACTIVATION_KERNELS"]


class Kernel(str, Enum):
    AUTO = "auto"  # fastest measured weight-only kernel for this shape
    DENSE = "dense"  # decode once, keep a float copy, F.linear (fastest here; 4x int8's memory)
    DECODE_PER_CALL = "decode"  # decode at every call: least resident memory, slowest
    INT8_WEIGHT_MM = "int8_mm"  # torch.ops.aten._weight_int8pack_mm (int8 symmetric per-channel)
    INT4_WEIGHT_MM = "int4_mm"  # torch.ops.aten._weight_int4pack_mm_for_cpu (4-bit groups)
    DYNAMIC_INT8 = "dynamic_int8"  # fbgemm: activations quantised per call, int8 x int8 GEMM
    DYNAMIC_INT8_TOKEN = "dynamic_int8_token"  # the same, each token's activations on a range of its own
    DYNAMIC_INT8_ROW = "dynamic_int8_row"  # each row on a symmetric grid of its own, ONNX-exact (quantize_rows)
    SPARSE_CSR = "sparse_csr"  # torch.sparse CSR matmul of a SparseTensor weight (see nn/sparse.py)
    LOW_RANK = "low_rank"  # (x right^T) left^T with a LowRankTensor's factors decoded once to fp32
    QMATMUL = "qmatmul"  # packed codes read directly (nn/qmatmul.py): compressed in memory




WEIGHT_ONLY_KERNELS = (Kernel.DENSE, Kernel.INT8_WEIGHT_MM, Kernel.INT4_WEIGHT_MM, Kernel.DECODE_PER_CALL,
                       Kernel.SPARSE_CSR, Kernel.LOW_RANK, Kernel.QMATMUL)
# they change the numbers: never AUTO
ACTIVATION_KERNELS = (Kernel.DYNAMIC_INT8, Kernel.DYNAMIC_INT8_TOKEN, Kernel.DYNAMIC_INT8_ROW)


def _is_quant(enc: Encoding, bits: int) -> bool:
    return isinstance(enc, QuantizedTensor) and enc.scheme.bits == bits and len(enc.shape) == 2


def supports(kernel: Kernel, enc: Encoding) -> bool:
    """The capability table: can `kernel` run this encoding?"""
    if kernel in (Kernel.DENSE, Kernel.DECODE_PER_CALL):
        return True
    if kernel in (Kernel.INT8_WEIGHT_MM, *ACTIVATION_KERNELS):
        if kernel in ACTIVATION_KERNELS and isinstance(enc, ChannelScaledTensor):
            enc = enc.inner  # its input multiply runs before the int8 GEMM (see _prepare_dynamic_int8)
        ok_gran = (PER_CHANNEL,) if kernel is Kernel.INT8_WEIGHT_MM else (PER_CHANNEL, PER_TENSOR)
        return _is_quant(enc, 8) and enc.scheme.symmetric and enc.scheme.group_size in ok_gran
    if kernel is Kernel.INT4_WEIGHT_MM:
        # torch packs int4 weights in tiles of 16 output channels
        return _is_quant(enc, 4) and enc.scheme.group_size in (32, 64, 128, 256) and enc.shape[0] % 16 == 0
    if kernel is Kernel.SPARSE_CSR:
        return supports_sparse_csr(enc)
    if kernel is Kernel.LOW_RANK:
        return isinstance(enc, LowRankTensor) and len(enc.shape) == 2
    if kernel is Kernel.QMATMUL:
        return supports_qmatmul(enc)
    return False


# A prepared kernel is a function x -> x @ W^T + b, holding whatever packed form the kernel wants.
Prepared = Callable[[torch.Tensor], torch.Tensor]


def _signed_int8(enc: QuantizedTensor) -> torch.Tensor:
    return (enc.int_codes().to(torch.int16) - enc.scheme.midpoint).to(torch.int8)


def prepare(kernel: Kernel, enc: Encoding, bias: torch.Tensor | None = None) -> Prepared:
    """Build the callable for `kernel` (packing or decoding the weight as that kernel wants)."""
    if not supports(kernel, enc):
        raise ConfigError(f"kernel {kernel.value!r} cannot run a {enc.meta()} weight: use kernel 'auto'")
    if kernel is Kernel.DENSE:
        weight = enc.decode(torch.float32).contiguous()
        return lambda x: F.linear(x, weight, bias)
    if kernel is Kernel.DECODE_PER_CALL:
        return lambda x: F.linear(x, enc.decode(x.dtype), bias)
    if kernel is Kernel.DYNAMIC_INT8:
        return _prepare_dynamic_int8(enc, bias)
    if kernel is Kernel.DYNAMIC_INT8_TOKEN:
        return _prepare_dynamic_int8_per_token(enc, bias)
    if kernel is Kernel.DYNAMIC_INT8_ROW:
        return _prepare_dynamic_int8_row(enc, bias)
    if kernel is Kernel.SPARSE_CSR:
        return prepare_sparse_csr(enc, bias)
    if kernel is Kernel.QMATMUL:
        return prepare_qmatmul(enc, bias)
    if kernel is Kernel.LOW_RANK:
        # canonical strides (a size-1 dimension's stride included): F.linear picks its BLAS call by
        # strides, and a factor sliced from an SVD must run exactly as its reloaded copy does
        left, right = (f.clone(memory_format=torch.contiguous_format)  # (R, r), (r, C)
                       for f in enc.factors(torch.float32))
        return lambda x: F.linear(F.linear(x, right), left, bias)
    matmul = _prepare_weight_only(kernel, enc)
    if bias is None:
        return matmul
    return lambda x: matmul(x).add_(bias)


def _prepare_weight_only(kernel: Kernel, enc: QuantizedTensor) -> Prepared:
    """PyTorch's weight-only int8/int4 CPU kernels (x @ W^T, no bias)."""
    if kernel is Kernel.INT8_WEIGHT_MM:
        w8 = _signed_int8(enc)
        scale = enc.scale.float().reshape(-1).contiguous()
        return lambda x: _flat(x, lambda x2: torch.ops.aten._weight_int8pack_mm(x2, w8, scale))
    if kernel is Kernel.INT4_WEIGHT_MM:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(enc.int_codes().to(torch.int32), 1)
        s = enc.scale.float().t()  # (G, N)
        z = enc.zero_points().t()  # (G, N): w = (q - z) s = (q - 8) s + (8 - z) s
        scale_zero = torch.stack([s, (8 - z) * s], -1).contiguous()  # (G, N, 2)
        gs = enc.scheme.group_size
        return lambda x: _flat(x, lambda x2: torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, gs, scale_zero))
    raise ConfigError(f"kernel {kernel.value!r} has no implementation: use kernel 'auto'")


def _flat(x: torch.Tensor, fn: Prepared) -> torch.Tensor:
    """Run a 2-D-only kernel on (..., K) input."""
    lead = x.shape[:-1]
    y = fn(x.reshape(-1, x.shape[-1]).contiguous())
    return y.reshape(*lead, y.shape[-1])


def _prepare_dynamic_int8(enc: QuantizedTensor, bias: torch.Tensor | None) -> Prepared:
    """fbgemm's prepacked int8 GEMM; activations get a per-call uint8 range (full 8 bits).

    A channel-scaled weight (SmoothQuant/AWQ scale with no op to absorb it) multiplies x by its
    input scale first: one elementwise pass over x, before fbgemm quantises it.
    """
    if isinstance(enc, ChannelScaledTensor):
        run, inverse = _prepare_dynamic_int8(enc.inner, bias), enc.input_scale
        return lambda x: run(x.float() * inverse)  # (..., C) * (C,)
    packed, reduce_range = _pack_int8(enc, bias)
    return lambda x: _flat(x.float(), lambda x2: torch.ops.quantized.linear_dynamic(x2, packed, reduce_range))


def _pack_int8(enc: QuantizedTensor, bias: torch.Tensor | None):
    """(fbgemm's packed weight and bias, whether activations must keep to 7 bits)."""
    import warnings

    codes = _signed_int8(enc)
    scale = enc.scale.float().reshape(-1).double()
    with warnings.catch_warnings():  # the quantized-tensor constructor is deprecated; the op is not
        warnings.simplefilter("ignore")
        if enc.scheme.group_size == PER_TENSOR:
            qweight = torch._make_per_tensor_quantized_tensor(codes, float(scale[0]), 0)
        else:
            zeros = torch.zeros(codes.shape[0], dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(codes, scale, zeros, 0)
        packed = torch.ops.quantized.linear_prepack(qweight, bias)
    # reduce_range=True keeps u8*s8 pair sums inside int16 on AVX2 (no VNNI) when weights use all
    # 8 bits; with 7-bit weights (|q| <= 63) no saturation is possible, so activations keep 8 bits.
    reduce_range = bool(enc.int_codes().to(torch.int16).sub(enc.scheme.midpoint).abs().max() > 63)
    return packed, reduce_range


def _prepare_dynamic_int8_per_token(enc: QuantizedTensor, bias: torch.Tensor | None) -> Prepared:
    """fbgemm's int8 GEMM with a range per token instead of one per call.

    fbgemm gives all rows of x one activation range, so a single token with a huge activation (BERT's
    [CLS]/[SEP] rows after GELU) coarsens every other token's steps. Dividing each row by its own
    max |x| first puts every token on [-1, 1]; the row's factor is multiplied back into its output
    row, (x / m) W^T m = x W^T, before the bias is added. Measured on MiniLM's FFN output layers:
    mean cosine 0.9869 -> 0.9976. The scaled rows' range follows from each row's max and min, which
    finding m already took, so fbgemm is handed its activation step and zero point (its own rule:
    [min, max] widened to hold 0, over 255 levels, or 127 beside 8-bit weights) instead of scanning
    x for them again.
    """
    if isinstance(enc, ChannelScaledTensor):  # its input multiply first, as the per-call kernel does
        run, inverse = _prepare_dynamic_int8_per_token(enc.inner, bias), enc.input_scale
        return lambda x: run(x.float() * inverse)  # (..., C) * (C,)
    packed, reduce_range = _pack_int8(enc, None)
    levels = 127 if reduce_range else 255
    quantized = torch.ops.quantized
    linear_dynamic = quantized.linear_dynamic

    def gemm(top: float, bottom: float) -> Prepared:
        """(scaled x) W^T on fbgemm, for scaled activations spanning [bottom, top]."""
        step = (top - bottom) / levels or 1.0
        if not math.isfinite(step):  # inf or NaN in x: let fbgemm's own scan decide, as the per-call kernel does
            return lambda x2: quantized.linear_dynamic(x2, packed, reduce_range)
        zero = min(max(round(-bottom / step), 0), levels)
        return lambda x2: quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x2, step, zero, packed)

    def per_token(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.numel() == x.shape[-1]:  # one token (a decode step): its range is the call's, which fbgemm finds
            y = linear_dynamic(x.reshape(1, -1), packed, reduce_range)
            y = y.reshape(*x.shape[:-1], y.shape[-1])
            return y if bias is None else y.add_(bias)
        if x.numel() == 0:
            return F.linear(x, torch.zeros(enc.shape), bias)
        hi, lo = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)  # two reads of x; abs() would write a copy
        m = torch.maximum(hi, lo.neg()).clamp_min_(torch.finfo(torch.float32).tiny)  # max |x| per row, (..., 1)
        r = m.reciprocal()
        top, bottom = max(float((hi * r).max()), 0.0), min(float((lo * r).min()), 0.0)  # the scaled rows' range
        y = _flat(x * r, gemm(top, bottom))
        return y.mul_(m) if bias is None else torch.addcmul(bias, y, m)

    return per_token


ROW_ZERO_POINT = 128  # uint8 codes q + 128 (q + 64 beside 8-bit weights: 7 bits, fbgemm's reduce_range)


def row_levels(reduce_range: bool) -> int:
    """The largest |q| of per-row activation codes: 127, or 63 where activations keep to 7 bits."""
    return 63 if reduce_range else 127


def quantize_rows(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, d): each row of x (..., K) on a symmetric grid of its own, x ~ q d, with q integers in
    [-levels, levels] (held as float32) and d = max|x_row| / levels, (..., 1).

    Each step is one correctly rounded float32 operation (max, division, round half to even), so ONNX
    Runtime computes the same q and d bit for bit (ReduceMax, ReduceMin, Max, Div, then QuantizeLinear
    with d per row: x / d, round half to even, + zero point; exports/onnx_ops.py). Rows are independent:
    no token's grid depends on another token (or on the padding beside it).
    """
    hi, lo = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)  # two reads of x; abs() would write a copy
    m = torch.maximum(hi, lo.neg()).clamp_min_(torch.finfo(torch.float32).tiny)  # max |x| per row
    d = m / levels
    return torch.div(x, d).round_(), d


def _prepare_dynamic_int8_row(enc: QuantizedTensor, bias: torch.Tensor | None) -> Prepared:
    """fbgemm's int8 GEMM with a symmetric range per row (token), rows independent of each other.

    Unlike DYNAMIC_INT8_TOKEN (whose scaled rows share one asymmetric grid), each row gets its own step,
    d = max|x_row| / 127, q = round(x / d) (quantize_rows); fbgemm multiplies the integer-valued q
    (handed over with activation step 1 and zero point 128, so that its own quantisation of q is exact)
    by the int8 weight and its per-channel scales, and d multiplies the output row before the bias is
    added: y = ((q W_q^T) s_w) d + b, in that order. The codes are computed here rather than by fbgemm,
    whose quantiser (a fused multiply-add by 1 / step) no ONNX operator reproduces, so the ONNX graph
    of this layer (exports/onnx_ops.py) computes the same codes and the same float outputs, bit for bit.
    """
    if isinstance(enc, ChannelScaledTensor):  # its input multiply first, as the per-call kernel does
        run, inverse = _prepare_dynamic_int8_row(enc.inner, bias), enc.input_scale
        return lambda x: run(x.float() * inverse)  # (..., C) * (C,)
    packed, reduce_range = _pack_int8(enc, None)
    levels = row_levels(reduce_range)
    zero = ROW_ZERO_POINT // 2 if reduce_range else ROW_ZERO_POINT
    gemm = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32

    def per_row(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.numel() == 0:
            return F.linear(x, torch.zeros(enc.shape), bias)
        q, d = quantize_rows(x, levels)
        y = _flat(q, lambda q2: gemm(q2, 1.0, zero, packed)).mul_(d)  # (q W^T) s_w, then * d: one rounding each
        return y if bias is None else y.add_(bias)

    return per_row


_TIMINGS: dict[tuple, Kernel] = {}


def _time(fn: Prepared, x: torch.Tensor) -> float:
    """One timed call of fn(x) (the caller interleaves candidates and keeps each one's best)."""
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def select_kernel(enc: Encoding, candidates: tuple[Kernel, ...] = WEIGHT_ONLY_KERNELS, rows: int = 1) -> Kernel:
    """The kernel AUTO runs this encoding with (the rules in the module docstring), for `rows`-row inputs."""
    eligible = [k for k in candidates if supports(k, enc)]
    if isinstance(enc, LowRankTensor):  # by arithmetic (module docstring): the cheaper of the two products
        preferred = (Kernel.LOW_RANK,) if enc.factored_is_cheaper else ()
        for kernel in preferred + (Kernel.DENSE,):
            if kernel in eligible:
                return kernel
    if Kernel.QMATMUL in eligible and NATIVE_AVAILABLE:
        return Kernel.QMATMUL
    if Kernel.DENSE in eligible and len(eligible) > 1:  # dominated: the same matmul plus a decode
        eligible = [k for k in eligible if k is not Kernel.DECODE_PER_CALL]
    if len(eligible) == 1:
        return eligible[0]
    key = (tuple(eligible), enc.meta().get("bits"), enc.meta().get("group_size"), tuple(enc.shape), rows,
           torch.get_num_threads(), round(getattr(enc, "density", 1.0), 2))  # sparse speed depends on density
    if key not in _TIMINGS:
        x = torch.randn(rows, enc.shape[-1])
        prepared = {k: prepare(k, enc) for k in eligible}
        for fn in prepared.values():
            fn(x)  # warm-up (first calls allocate and pack)
        best = dict.fromkeys(eligible, float("inf"))
        for _ in range(5):  # rounds: every candidate once per round, so load hits them all alike
            for k, fn in prepared.items():
                best[k] = min(best[k], _time(fn, x))
        _TIMINGS[key] = min(best, key=best.get)
    return _TIMINGS[key]
