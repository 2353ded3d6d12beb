"""Matrix views of weights and the one range fitting every pass uses."""

from __future__ import annotations

import pytest
import torch

from modelpress.encodings import (PER_TENSOR, QuantScheme, RangeSearch, as_matrix, fit_ranges, grouped, matrix_dims,
                                  mse_params, quantize, quantize_weight)
from modelpress.encodings.quantized import minmax_params


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (4, 2, 3, 3), (5, 0)])
def test_matrix_dims_is_the_shape_as_matrix_gives(shape):
    assert matrix_dims(shape) == tuple(as_matrix(torch.zeros(shape)).shape)


@pytest.mark.parametrize("group_size, expected", [(4, (3, 2, 4)), ("channel", (3, 1, 8)), ("tensor", (1, 1, 24))])
def test_grouped_cuts_rows_into_groups(group_size, expected):
    w = torch.arange(24.0).reshape(3, 8)
    g = grouped(w, QuantScheme(4, False, group_size))
    assert tuple(g.shape) == expected and torch.equal(g.reshape(-1), w.reshape(-1))


@pytest.mark.parametrize("scheme", [QuantScheme(4, False, 8), QuantScheme(8, True, "channel"),
                                    QuantScheme(3, False, PER_TENSOR)])
def test_fit_ranges_is_minmax_or_the_error_minimising_search(scheme):
    w = torch.randn(6, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    mm_scale, mm_zero = fit_ranges(w, scheme, RangeSearch.MINMAX)
    ref_scale, ref_zero = minmax_params(grouped(as_matrix(w), scheme), scheme)
    assert torch.equal(mm_scale, ref_scale) and torch.equal(mm_zero, ref_zero)
    mse_scale, mse_zero = fit_ranges(w, scheme, RangeSearch.MSE)
    ref_scale, ref_zero = mse_params(w, scheme)
    assert torch.equal(mse_scale, ref_scale) and torch.equal(mse_zero, ref_zero)
    error = {s: (quantize_weight(w, scheme, s).decode() - w).pow(2).sum() for s in RangeSearch}
    assert error[RangeSearch.MSE] <= error[RangeSearch.MINMAX]


def test_quantize_weight_with_a_narrower_code_range_keeps_codes_inside_it():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(8, True, "channel")
    assert torch.equal(quantize_weight(w, scheme, RangeSearch.MINMAX).codes, quantize(w, scheme).codes)
    narrow = quantize_weight(w, scheme, RangeSearch.MINMAX, max_code=63)
    assert (narrow.int_codes().int() - scheme.midpoint).abs().max() <= 63
    assert (narrow.decode() - w).abs().max() <= narrow.scale.float().max() / 2 + 1e-6
