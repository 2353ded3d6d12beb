"""Integer quantisation: schemes, the quantised encoding, and the pure quantise/dequantise maths.

A weight of shape (R, ...) is viewed as a matrix (R, C) with C = prod(...), each row split into
groups of `group_size` columns (one group per row for per-channel, one group in all for
per-tensor). Each group g has a scale s_g and (asymmetric only) a zero point z_g in code units:

    code = clamp(round(w / s_g + z_g), 0, 2^b - 1)          asymmetric (z_g may be fractional)
    code = clamp(round(w / s_g), -(2^(b-1) - 1), 2^(b-1) - 1) + 2^(b-1)   symmetric
    w_hat = (code - z_g) * s_g,   with z_g = 2^(b-1) for symmetric schemes

Symmetric schemes use the restricted range [-(2^(b-1)-1), 2^(b-1)-1] so that +x and -x are both
representable and the int8 codes feed fbgemm's kernels unchanged. Scales and zero points are
stored in float16, and codes are computed against the float16-rounded values so that what is
stored is exactly what was optimised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from modelpress.encodings.base import Encoding, check_shape, register_encoding, require_array
from modelpress.encodings.packing import SUPPORTED_BITS, pack_codes, packed_row_bytes, unpack_codes
from modelpress.encodings.views import as_matrix
from modelpress.errors import ConfigError, FormatError

__all__ = [
    "PER_TENSOR",
    "PER_CHANNEL",
    "QuantScheme",
    "QuantizedTensor",
    "grouped",
    "quantize",
    "quantize_with_params",
    "minmax_params",
]

# Named special cases of `group_size` (a positive value is a group of that many columns).
PER_TENSOR = -1
PER_CHANNEL = 0
_GRANULARITY_NAMES = {"tensor": PER_TENSOR, "channel": PER_CHANNEL}

PARAM_DTYPE = torch.float16


@dataclass(frozen=True)
class QuantScheme:
    """How a tensor is quantised: bit width, symmetry and granularity (one `group_size` parameter)."""

    bits: int = 8
    symmetric: bool = True
    group_size: int = PER_CHANNEL

    def __post_init__(self) -> None:
        if isinstance(self.group_size, str):
            if self.group_size not in _GRANULARITY_NAMES:
                raise ConfigError(
                    f"group_size {self.group_size!r} is not valid: use 'channel', 'tensor' or a positive integer"
                )
            object.__setattr__(self, "group_size", _GRANULARITY_NAMES[self.group_size])
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be true or false, got {self.symmetric!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"unsupported bit width {self.bits}: use one of {SUPPORTED_BITS}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < PER_TENSOR:
            raise ConfigError(
                f"group_size {self.group_size!r} is not valid: use 'channel', 'tensor' or a positive integer"
            )
        if self.symmetric and self.bits < 3:
            raise ConfigError("2-bit symmetric quantisation has only 3 levels: use symmetric: false for 2 bits")

    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def midpoint(self) -> int:
        """The code that decodes to zero in a symmetric scheme."""
        return 1 << (self.bits - 1)

    def group_columns(self, rows: int, columns: int) -> int:
        """Columns per group for an (rows, columns) matrix; checks that the group size divides."""
        if self.group_size == PER_TENSOR or self.group_size == PER_CHANNEL:
            return columns
        if columns % self.group_size:
            raise ConfigError(
                f"group size {self.group_size} does not divide the input width {columns}: "
                f"choose a divisor of {columns} (e.g. {math.gcd(columns, 128)}) or exclude this layer"
            )
        return self.group_size

    def describe(self) -> str:
        gran = {PER_TENSOR: "per-tensor", PER_CHANNEL: "per-channel"}.get(self.group_size, f"g{self.group_size}")
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {gran}"

    def to_dict(self) -> dict[str, Any]:
        gran = {PER_TENSOR: "tensor", PER_CHANNEL: "channel"}.get(self.group_size, self.group_size)
        return {"bits": self.bits, "symmetric": self.symmetric, "group_size": gran}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantScheme":
        allowed = {"bits", "symmetric", "group_size"}
        unknown = set(data) - allowed
        if unknown:
            raise ConfigError(f"unknown quantisation field(s) {sorted(unknown)}: allowed are {sorted(allowed)}")
        return cls(**data)


def grouped(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """(R, C) -> (R, G, gs), or (1, 1, R*C) per tensor."""
    rows, cols = w.shape
    if scheme.group_size == PER_TENSOR:
        return w.reshape(1, 1, -1)
    gs = scheme.group_columns(rows, cols)
    return w.reshape(rows, cols // gs, gs)


def minmax_params(wg: torch.Tensor, scheme: QuantScheme, shrink: float | torch.Tensor = 1.0):
    """Scale and zero (each (R, G, 1), float16-representable) covering each group's range times `shrink`."""
    if scheme.symmetric:
        amax = wg.abs().amax(-1, keepdim=True) * shrink
        scale = (amax / (scheme.midpoint - 1)).clamp_min(1e-8)
        scale = scale.to(PARAM_DTYPE).float().clamp_min(2**-24)
        zero = torch.full_like(scale, float(scheme.midpoint))
        return scale, zero
    lo = (wg.amin(-1, keepdim=True) * shrink).clamp_max(0)
    hi = (wg.amax(-1, keepdim=True) * shrink).clamp_min(0)
    scale = ((hi - lo) / scheme.qmax).clamp_min(1e-8).to(PARAM_DTYPE).float().clamp_min(2**-24)
    zero = torch.round(-lo / scale).clamp(scheme.qmin, scheme.qmax)
    return scale, zero


def quantize_with_params(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme):
    """Codes (uint8-valued float) of grouped weights for given scale and zero."""
    if scheme.symmetric:
        lim = scheme.midpoint - 1
        return torch.clamp(torch.round(wg / scale), -lim, lim) + scheme.midpoint
    return torch.clamp(torch.round(wg / scale + zero), scheme.qmin, scheme.qmax)


def quantize(
    w: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
) -> "QuantizedTensor":
    """Round-to-nearest quantisation of `w`; min-max ranges unless scale/zero ((R, G, 1)) are given."""
    if not torch.isfinite(w).all():
        raise ConfigError("cannot quantise a tensor holding NaN or infinity: check the model's weights")
    m = as_matrix(w.detach().float())
    wg = grouped(m, scheme)
    if scale is None:
        scale, zero = minmax_params(wg, scheme)
    elif zero is None:
        zero = torch.full_like(scale, float(scheme.midpoint))
    scale = scale.to(PARAM_DTYPE).float()
    zero = zero.to(PARAM_DTYPE).float()
    codes = quantize_with_params(wg, scale, zero, scheme).to(torch.uint8).reshape(m.shape)
    return QuantizedTensor(
        codes=pack_codes(codes, scheme.bits),
        scale=scale.squeeze(-1).to(PARAM_DTYPE),
        zero=None if scheme.symmetric else zero.squeeze(-1).to(PARAM_DTYPE),
        scheme=scheme,
        tensor_shape=tuple(w.shape),
    )


@register_encoding
@dataclass(frozen=True, eq=False)
class QuantizedTensor(Encoding):
    """Packed integer codes with per-tensor, per-channel or per-group float16 scales (and zeros)."""

    kind = "quantized"
    codes: torch.Tensor  # (R, packed_row_bytes(C, bits)) uint8, see encodings.packing
    scale: torch.Tensor  # (R, G) float16; (1, 1) per tensor
    zero: torch.Tensor | None  # like scale, in code units; None for symmetric schemes
    scheme: QuantScheme
    tensor_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor_shape

    def describe(self) -> str:
        return self.scheme.describe()

    def int_codes(self) -> torch.Tensor:
        """(R, C) uint8 codes, unpacked."""
        rows, cols = self.matrix_shape
        return unpack_codes(self.codes, self.scheme.bits, cols)

    def zero_points(self) -> torch.Tensor:
        """(R, G) float zero points in code units (the midpoint for symmetric schemes)."""
        if self.zero is None:
            return torch.full(self.scale.shape, float(self.scheme.midpoint))
        return self.zero.float()

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.matrix_shape
        codes = self.int_codes().float()
        groups = self.scale.shape[-1] if self.scheme.group_size != PER_TENSOR else 1
        cg = codes.reshape(1 if self.scheme.group_size == PER_TENSOR else rows, groups, -1)  # (R, G, gs)
        w = (cg - self.zero_points().unsqueeze(-1)) * self.scale.float().unsqueeze(-1)
        return w.reshape(self.tensor_shape).to(dtype)

    def decode_rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode only rows `index` ((K,) long) as (K, C): an embedding lookup without the full table."""
        if self.scheme.group_size == PER_TENSOR:
            return self.decode(dtype).reshape(self.matrix_shape)[index]
        cols = self.matrix_shape[1]
        if index.numel() == 0:
            return torch.empty(0, cols, dtype=dtype)
        codes = unpack_codes(self.codes[index], self.scheme.bits, cols).float()  # (K, C)
        scale = self.scale[index].float().unsqueeze(-1)  # (K, G, 1)
        zero = self.zero_points()[index].unsqueeze(-1)
        w = (codes.reshape(len(index), scale.shape[1], -1) - zero) * scale
        return w.reshape(len(index), cols).to(dtype)

    def arrays(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        return out

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.tensor_shape), **self.scheme.to_dict()}

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> "QuantizedTensor":
        shape = check_shape(meta, cls.kind)
        try:
            scheme = QuantScheme.from_dict({k: meta[k] for k in ("bits", "symmetric", "group_size") if k in meta})
        except (ConfigError, TypeError) as exc:
            raise FormatError(f"quantized encoding has invalid parameters ({exc}); the file is corrupt") from None
        codes = require_array(arrays, "codes", cls.kind)
        scale = require_array(arrays, "scale", cls.kind)
        zero = arrays.get("zero")
        enc = cls(codes=codes, scale=scale, zero=zero, scheme=scheme, tensor_shape=shape)
        rows, cols = enc.matrix_shape
        if scheme.group_size == PER_TENSOR:
            groups, scale_rows = 1, 1
        else:
            try:
                groups, scale_rows = cols // scheme.group_columns(rows, cols), rows
            except ConfigError as exc:
                raise FormatError(f"quantized encoding is inconsistent ({exc})") from None
        expect = {
            "codes": ((rows, packed_row_bytes(cols, scheme.bits)), torch.uint8),
            "scale": ((scale_rows, groups), PARAM_DTYPE),
        }
        if not scheme.symmetric:
            expect["zero"] = ((scale_rows, groups), PARAM_DTYPE)
        elif zero is not None:
            raise FormatError("symmetric quantized encoding carries a zero array; the file is corrupt")
        for name, (want_shape, want_dtype) in expect.items():
            got = arrays.get(name)
            if got is None or tuple(got.shape) != want_shape or got.dtype != want_dtype:
                desc = "missing" if got is None else f"{tuple(got.shape)} {got.dtype}"
                raise FormatError(
                    f"quantized array {name!r} is {desc}, expected {want_shape} {want_dtype}; "
                    "the file is corrupt, re-save the model"
                )
        return enc
