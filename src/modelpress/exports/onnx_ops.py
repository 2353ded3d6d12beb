"""The ONNX form of each compressed module: stand-ins whose forward is modelpress's own computation and whose
`symbolic` (what torch.onnx's TorchScript exporter writes) is the same computation in ONNX operators.

    W8A8 Linear, a range per call    x [* 1/s] -> DynamicQuantizeLinear -> MatMulInteger(x_q, W_q^T, x_zp)
    (kernel dynamic_int8)            -> Cast float -> Mul(x_scale * w_scale) [-> Add bias]
                                     the pattern onnxruntime.quantization.quantize_dynamic writes, which ORT
                                     fuses into one DynamicQuantizeMatMul (u8 activations x s8 weights)
    W8A8 Linear, a range per token   m = max|x| per row; the above on x / m, its output * m [+ bias]
    (kernel dynamic_int8_token)      (the rule of nn/kernels.py: one range over the scaled rows)
    W8A8 Linear, a range per row     d = max|x_row| / 127 (ReduceMax/ReduceMin/Max/Div) -> QuantizeLinear(x, d
    (kernel dynamic_int8_row)        per row, zero point 128) -> MatMulIntegerToFloat(x_q, W_q^T, 1, w_scale,
                                     128) (com.microsoft) -> Mul(d) [-> Add bias]: modelpress's arithmetic
                                     operation for operation (nn/kernels.py quantize_rows), so ORT's
                                     output equals modelpress's bit for bit, layer by layer. The two kinds
                                     above follow fbgemm's grid but not its quantiser (a fused multiply-add
                                     by 1 / step): a value at a step's midpoint may take the other code.
    symmetric 4-bit Linear           com.microsoft MatMulNBits on our packed codes (reshaped, not repacked)
    other weight-only Linear         W = (codes - zero) * scale from the stored codes (Cast/Sub/Mul on
                                     initializers, folded by ORT at load), then MatMul: float activations
    quantised embedding table        Gather of the code rows and their scales, then (codes - zero) * scale

The weights are our codes: symmetric int8 codes q (midpoint 128) are written as q - 128 in int8, the
float16 scales as float32; nothing is re-quantised. Activation quantisation follows fbgemm's rule (full 8-bit
range when |q| <= 63, else 7-bit activations, fbgemm's reduce_range: written as ReduceMin/ReduceMax and
QuantizeLinear on 127 levels, since DynamicQuantizeLinear always takes 255).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.encodings import QuantizedTensor
from modelpress.encodings.scaled import ChannelScaledTensor
from modelpress.encodings.quantized import PER_TENSOR
from modelpress.errors import UnsupportedError
from modelpress.nn.kernels import ROW_ZERO_POINT, Kernel, row_levels

__all__ = ["OnnxDynamicLinear", "OnnxEmbedding", "OnnxNBitsLinear", "OnnxWeightOnlyLinear", "nbits_block",
           "onnx_stand_in"]


def _quantized(enc) -> tuple[QuantizedTensor, torch.Tensor | None]:
    """(the quantised weight, the input multiply 1/s of a channel-scaled one, or None)."""
    if isinstance(enc, ChannelScaledTensor):
        inner, inverse = _quantized(enc.inner)
        if inverse is not None:
            raise UnsupportedError("a channel-scaled weight inside another has no ONNX form")
        return inner, enc.input_scale.float()
    return enc, None


def _dequantized(g, codes, scale, zero, groups: int):
    """ONNX: (codes - zero) * scale over (R, G, gs) groups of a (R, C) code table (all initializers)."""
    shape = g.op("Constant", value_t=torch.tensor([0, groups, -1], dtype=torch.int64))
    flat = g.op("Constant", value_t=torch.tensor([0, -1], dtype=torch.int64))
    grouped = g.op("Reshape", g.op("Cast", codes, to_i=1), shape)  # (R, G, gs) float
    w = g.op("Mul", g.op("Sub", grouped, g.op("Unsqueeze", zero, g.op("Constant", value_t=torch.tensor([-1])))),
             g.op("Unsqueeze", scale, g.op("Constant", value_t=torch.tensor([-1]))))
    return g.op("Reshape", w, flat)


def _quantize_reduced(g, x, levels: int):
    """ONNX: x as uint8 on fbgemm's grid of `levels` steps over [min(x) ^ 0, max(x) v 0] (7-bit: 127 levels)."""
    zero = g.op("Constant", value_t=torch.tensor(0.0))
    lo = g.op("Min", g.op("ReduceMin", x, keepdims_i=0), zero)
    hi = g.op("Max", g.op("ReduceMax", x, keepdims_i=0), zero)
    step = g.op("Max", g.op("Div", g.op("Sub", hi, lo), g.op("Constant", value_t=torch.tensor(float(levels)))),
                g.op("Constant", value_t=torch.tensor(torch.finfo(torch.float32).tiny)))
    zp = g.op("Clip", g.op("Round", g.op("Div", g.op("Neg", lo), step)), zero,
              g.op("Constant", value_t=torch.tensor(float(levels))))
    zp = g.op("Cast", zp, to_i=2)  # uint8
    return g.op("QuantizeLinear", x, step, zp), step, zp


class _DynamicMatMul(torch.autograd.Function):
    """x (.., K) -> (.., N): dynamic uint8 activations (one range per call) x int8 weights, float out."""

    @staticmethod
    def forward(ctx, x, w_t, w_scale, w_ref, levels):  # tracing runs the float product (values not exported)
        return F.linear(x, w_ref)

    @staticmethod
    def symbolic(g, x, w_t, w_scale, w_ref, levels):
        if levels == 255:
            x_q, x_scale, x_zp = g.op("DynamicQuantizeLinear", x, outputs=3)
        else:
            x_q, x_scale, x_zp = _quantize_reduced(g, x, levels)
        acc = g.op("MatMulInteger", x_q, w_t, x_zp)  # int32 (.., N)
        scale = g.op("Mul", x_scale, w_scale)  # (N,)
        return g.op("Mul", g.op("Cast", acc, to_i=1), scale)


class _RowMatMul(torch.autograd.Function):
    """x (.., K) -> ((q W_q^T) s_w) d (.., N): nn/kernels.py's DYNAMIC_INT8_ROW product, bit for bit.

    d = max|x_row| / levels (ReduceMax, ReduceMin, Neg, Max, Div); q = QuantizeLinear(x, d per row, zero
    point 128) = round-half-to-even(x / d) + 128, one division per element as quantize_rows does;
    MatMulIntegerToFloat (com.microsoft: MatMulInteger of the uint8 codes, zero point 128, and the int8
    weight, Cast, * s_w in one op), * d: the float
    operations of modelpress's kernel in its order, each correctly rounded in both runtimes.
    """

    @staticmethod
    def forward(ctx, x, w_t, w_scale, w_ref, levels, zero):  # tracing runs the float product (values not exported)
        return F.linear(x, w_ref)

    @staticmethod
    def symbolic(g, x, w_t, w_scale, w_ref, levels, zero):
        def const(value, dtype=torch.float32):
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        m = g.op("Max", g.op("ReduceMax", x, axes_i=[-1], keepdims_i=1),
                 g.op("Neg", g.op("ReduceMin", x, axes_i=[-1], keepdims_i=1)))
        d = g.op("Div", g.op("Max", m, const(torch.finfo(torch.float32).tiny)), const(float(levels)))  # (.., 1)
        k, n = w_t.type().sizes()
        rows = g.op("Reshape", x, const([-1, k], torch.int64))  # (M, K): QuantizeLinear's scale per row
        d_rows = g.op("Reshape", d, const([-1], torch.int64))  # (M,)
        zp = const(zero, torch.uint8)
        q = g.op("QuantizeLinear", rows, d_rows, g.op("Expand", zp, g.op("Shape", d_rows)), axis_i=0)
        # float(q W_q^T with zero point 128) * (1 * s_w) in one contrib op (MatMulInteger, Cast and Mul by s_w,
        # which ORT leaves unfused here, cost 7% more on a MiniLM FFN layer; the same bits)
        y = g.op("com.microsoft::MatMulIntegerToFloat", q, w_t, const(1.0), w_scale, zp)  # (M, N)
        y.setType(x.type().with_sizes([None, n]))
        y = g.op("Mul", y, g.op("Reshape", d, const([-1, 1], torch.int64)))
        lead = g.op("Slice", g.op("Shape", x), const([0], torch.int64), const([-1], torch.int64))
        return g.op("Reshape", y, g.op("Concat", lead, const([n], torch.int64), axis_i=0))


class OnnxDynamicLinear(nn.Module):
    """A W8A8 CompressedLinear (per-call, per-token or per-row activation range) as ONNX operators."""

    def __init__(self, module: nn.Module):
        super().__init__()
        enc, inverse = _quantized(module.encoding)
        signed = enc.int_codes().to(torch.int16) - enc.scheme.midpoint  # (N, K)
        # fbgemm's rule (nn/kernels.py): weights beyond 7 bits get 7-bit activations, else the full 8 bits
        reduce_range = int(signed.abs().max()) > 63
        self.levels = 127 if reduce_range else 255
        self.row_levels = row_levels(reduce_range)  # per token: |q| <= 127 (63), zero point 128 (64)
        self.token_zero = ROW_ZERO_POINT // 2 if reduce_range else ROW_ZERO_POINT
        if enc.scheme.group_size == PER_TENSOR:
            w_scale = enc.scale.float().reshape(1).expand(enc.shape[0]).clone()
        else:
            w_scale = enc.scale.float().reshape(-1)
        self.per_token = module.kernel is Kernel.DYNAMIC_INT8_TOKEN
        self.per_row = module.kernel is Kernel.DYNAMIC_INT8_ROW
        self.register_buffer("w_t", signed.to(torch.int8).t().contiguous())  # (K, N)
        self.register_buffer("w_scale", w_scale)  # (N,)
        self.register_buffer("input_scale", inverse)
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().float(), requires_grad=False)
        self.w_ref = enc.decode(torch.float32)  # (N, K): what the traced forward multiplies by (not exported)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.per_row:
            y = _RowMatMul.apply(x, self.w_t, self.w_scale, self.w_ref, self.row_levels, self.token_zero)
        elif self.per_token:
            m = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg()).clamp_min(
                torch.finfo(torch.float32).tiny)  # (.., 1)
            y = _DynamicMatMul.apply(x * m.reciprocal(), self.w_t, self.w_scale, self.w_ref, self.levels) * m
        else:
            y = _DynamicMatMul.apply(x, self.w_t, self.w_scale, self.w_ref, self.levels)
        return y if self.bias is None else y + self.bias


class _Dequantized(torch.autograd.Function):
    """The (R, C) float weight from codes, scale and zero (R, G): folded to a constant by ORT at load."""

    @staticmethod
    def forward(ctx, codes, scale, zero, weight):
        return weight

    @staticmethod
    def symbolic(g, codes, scale, zero, weight):
        groups = scale.type().sizes()[1]
        return _dequantized(g, codes, scale, zero, groups)


def _code_table(enc: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (R, C), scale (R, G) float32, zero (R, G) float32), per-tensor scales spread to rows."""
    codes = enc.int_codes().contiguous()
    rows = codes.shape[0]
    scale, zero = enc.scale.float(), enc.zero_points().float()
    if enc.scheme.group_size == PER_TENSOR:
        scale, zero = scale.reshape(1, 1).expand(rows, 1).clone(), zero.reshape(1, 1).expand(rows, 1).clone()
    return codes, scale.contiguous(), zero.contiguous()


class OnnxWeightOnlyLinear(nn.Module):
    """A weight-only quantised CompressedLinear: the weight rebuilt from its codes, float activations."""

    def __init__(self, module: nn.Module):
        super().__init__()
        enc, inverse = _quantized(module.encoding)
        codes, scale, zero = _code_table(enc)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("input_scale", inverse)
        self.weight_ref = enc.decode(torch.float32)
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        w = _Dequantized.apply(self.codes, self.scale, self.zero, self.weight_ref)  # (N, K)
        return F.linear(x, w, self.bias)


class _GatherDequantized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, codes, scale, zero, table):
        return F.embedding(ids, table)

    @staticmethod
    def symbolic(g, ids, codes, scale, zero, table):
        groups = scale.type().sizes()[1]
        width = codes.type().sizes()[1]
        rows = [g.op("Gather", t, ids, axis_i=0) for t in (codes, scale, zero)]  # (.., C), (.., G), (.., G)
        lead = g.op("Shape", ids)
        grouped = g.op("Reshape", g.op("Cast", rows[0], to_i=1),
                       g.op("Concat", lead, g.op("Constant", value_t=torch.tensor([groups, width // groups])), axis_i=0))
        w = g.op("Mul", g.op("Sub", grouped, g.op("Unsqueeze", rows[2], g.op("Constant", value_t=torch.tensor([-1])))),
                 g.op("Unsqueeze", rows[1], g.op("Constant", value_t=torch.tensor([-1]))))
        return g.op("Reshape", w, g.op("Concat", lead, g.op("Constant", value_t=torch.tensor([width])), axis_i=0))


class OnnxEmbedding(nn.Module):
    """A quantised CompressedEmbedding: looked-up code rows dequantised (the table stays 8 bits or less)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        enc, inverse = _quantized(module.encoding)
        if inverse is not None:
            raise UnsupportedError("a channel-scaled embedding table has no ONNX form")
        codes, scale, zero = _code_table(enc)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.table_ref = enc.decode(torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _GatherDequantized.apply(ids, self.codes, self.scale, self.zero, self.table_ref)


def nbits_block(enc: QuantizedTensor) -> int | None:
    """MatMulNBits' block size for a weight it holds exactly (symmetric 4-bit, a group a power of two >= 16,
    or one scale per row spread over equal blocks), else None."""
    if not enc.scheme.symmetric or enc.scheme.bits != 4 or enc.scheme.group_size == PER_TENSOR:
        return None
    cols = enc.matrix_shape[1]
    group = enc.scheme.group_columns(*enc.matrix_shape)
    blocks = [b for b in (128, 64, 32, 16) if group % b == 0 and cols % b == 0]
    return blocks[0] if blocks else None


class _MatMulNBits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, scales, w_ref, n, k, block):
        return F.linear(x, w_ref)

    @staticmethod
    def symbolic(g, x, packed, scales, w_ref, n, k, block):
        y = g.op("com.microsoft::MatMulNBits", x, packed, scales, K_i=k, N_i=n, bits_i=4, block_size_i=block)
        sizes = x.type().varyingSizes()
        if sizes is not None:  # tell the exporter's shape inference what a contrib op gives: (.., N)
            y.setType(x.type().with_sizes([*sizes[:-1], n]))
        return y


class OnnxNBitsLinear(nn.Module):
    """A symmetric 4-bit CompressedLinear as ONNX Runtime's MatMulNBits (com.microsoft).

    MatMulNBits holds B as (N, K / block, block / 2) bytes, element j of a block in the low nibble of byte
    j / 2 when j is even and the high nibble when odd, a float scale per (row, block), and (no zero points
    given) the zero point 8: w = (q - 8) * scale. Our symmetric 4-bit codes are q with midpoint 8, packed
    two to a byte, low nibble first, row by row (encodings/packing.py): the same bytes, reshaped. A scale per
    group of several blocks is repeated for each block.
    """

    def __init__(self, module: nn.Module, block: int):
        super().__init__()
        enc, inverse = _quantized(module.encoding)
        rows, cols = enc.matrix_shape
        group = enc.scheme.group_columns(rows, cols)
        self.n, self.k, self.block = rows, cols, block
        self.register_buffer("packed", enc.codes.reshape(rows, cols // block, block // 2).contiguous())
        scales = enc.scale.float().repeat_interleave(group // block, dim=1)  # (N, K / block)
        self.register_buffer("scales", scales.reshape(-1).contiguous())
        self.register_buffer("input_scale", inverse)
        self.w_ref = enc.decode(torch.float32)
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        y = _MatMulNBits.apply(x, self.packed, self.scales, self.w_ref, self.n, self.k, self.block)
        return y if self.bias is None else y + self.bias


def onnx_stand_in(name: str, module: nn.Module) -> nn.Module:
    """The ONNX stand-in of a compressed module, or an error naming what ONNX cannot hold and what can."""
    enc, _ = _quantized(module.encoding) if isinstance(module.encoding, (QuantizedTensor, ChannelScaledTensor)) \
        else (module.encoding, None)
    if not isinstance(enc, QuantizedTensor):
        raise UnsupportedError(f"layer {name!r} holds a {enc.kind} weight, which the ONNX export does not write: "
                               "export a quantised model (int8, int4, w8a8, w8a8-smooth presets)")
    kind = type(module).__name__
    if kind == "CompressedEmbedding":
        return OnnxEmbedding(module)
    if kind != "CompressedLinear":
        raise UnsupportedError(f"layer {name!r} is a {kind}, which the ONNX export does not write yet: "
                               "leave it uncompressed (an ignore pattern in the recipe)")
    if module.kernel in (Kernel.DYNAMIC_INT8, Kernel.DYNAMIC_INT8_TOKEN, Kernel.DYNAMIC_INT8_ROW):
        return OnnxDynamicLinear(module)
    block = nbits_block(enc)
    return OnnxWeightOnlyLinear(module) if block is None else OnnxNBitsLinear(module, block)
