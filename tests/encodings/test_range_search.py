"""MSE range search: never worse than min-max per group, clearly better with outliers, and close
to an exhaustive search over clipping factors on tiny groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.encodings import PER_CHANNEL, PER_TENSOR, QuantScheme, mse_params, quantize

F32 = np.float32

SCHEMES = [QuantScheme(2, False), QuantScheme(3, False), QuantScheme(4, False), QuantScheme(8, False),
           QuantScheme(3, True), QuantScheme(4, True), QuantScheme(8, True)]


def group_sq_errors(w: torch.Tensor, decoded: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum of squared errors per group, in float64: (R, C) -> (R, G) (or (1, 1) per tensor)."""
    d = (w.double() - decoded.double()).pow(2)
    if group_size == PER_TENSOR:
        return d.sum().reshape(1, 1)
    gs = d.shape[1] if group_size == PER_CHANNEL else group_size
    return d.reshape(d.shape[0], -1, gs).sum(-1)


def errors(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE-search error, min-max error) per group."""
    scale, zero = mse_params(w, scheme)
    searched = quantize(w, scheme, scale, zero).decode()
    return group_sq_errors(w, searched, scheme.group_size), group_sq_errors(w, quantize(w, scheme).decode(), scheme.group_size)


def with_outliers(rows: int, cols: int, seed: int, n_outliers: int, magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    pos = torch.randint(0, rows * cols, (n_outliers,), generator=g)
    sign = torch.randint(0, 2, (n_outliers,), generator=g) * 2 - 1
    w.view(-1)[pos] = sign * magnitude
    return w


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([PER_TENSOR, PER_CHANNEL, 16, 32]),
    scheme=st.sampled_from(SCHEMES),
    seed=st.integers(0, 2**16),
    n_outliers=st.integers(0, 4),
    magnitude=st.floats(1.0, 50.0),
    offset=st.floats(-2.0, 2.0),
)
def test_never_worse_than_minmax_per_group(rows, groups, group_size, scheme, seed, n_outliers, magnitude, offset):
    scheme = QuantScheme(scheme.bits, scheme.symmetric, group_size)
    w = with_outliers(rows, 32 * groups, seed, n_outliers, magnitude) + offset
    searched, minmax = errors(w, scheme)
    # float64 re-summation of float32 terms may differ from the search's own float32 sums by ~1e-6
    assert bool((searched <= minmax * (1 + 1e-5) + 1e-9).all())


@pytest.mark.parametrize(
    ("scheme", "max_ratio"),
    [(QuantScheme(4, False), 0.8), (QuantScheme(4, True), 0.6), (QuantScheme(3, False), 0.6),
     (QuantScheme(3, True), 0.8), (QuantScheme(4, False, 256), 0.9)],
    ids=lambda v: v.describe() if isinstance(v, QuantScheme) else str(v),
)
def test_strictly_better_with_a_big_outlier(scheme, max_ratio):
    # 1023 Gaussian values and one at 6 sigma: min-max spends half its levels on the outlier.
    w = torch.randn(2, 1024, generator=torch.Generator().manual_seed(0))
    w[:, 17] = 6.0
    searched, minmax = errors(w, scheme)
    assert bool((searched < max_ratio * minmax).all())


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
@pytest.mark.parametrize("group_size", [PER_TENSOR, PER_CHANNEL, 16])
def test_parameters_have_stored_shape_and_precision(scheme, group_size):
    scheme = QuantScheme(scheme.bits, scheme.symmetric, group_size)
    w = with_outliers(3, 64, 1, 2, 8.0)
    scale, zero = mse_params(w, scheme)
    groups = {PER_TENSOR: (1, 1, 1), PER_CHANNEL: (3, 1, 1), 16: (3, 4, 1)}[group_size]
    assert scale.shape == groups and zero.shape == groups
    assert torch.equal(scale.half().float(), scale)  # float16-representable: what is stored is what was searched
    assert torch.equal(zero.half().float(), zero)
    assert bool((scale > 0).all())
    if scheme.symmetric:
        assert bool((zero == scheme.midpoint).all())
    else:
        assert bool(((zero >= 0) & (zero <= scheme.qmax)).all())


def test_all_zero_group_stays_zero():
    w = torch.zeros(2, 32)
    w[1] = torch.linspace(-1, 1, 32)
    scheme = QuantScheme(4, False, 16)
    assert torch.equal(quantize(w, scheme, *mse_params(w, scheme)).decode()[0], torch.zeros(32))


# ---------------------------------------------------------------- exhaustive reference on tiny groups


def shrink_errors(x: np.ndarray, bits: int, symmetric: bool, shrinks: np.ndarray) -> np.ndarray:
    """Squared error of min-max quantisation of one group `x` with the range scaled by each shrink
    factor (float16 scale, integer zero), written independently of the module in numpy."""
    x = x.astype(F32)[None, :]  # (1, n)
    f = shrinks.astype(F32)[:, None]  # (S, 1)
    qmax, mid = (1 << bits) - 1, 1 << (bits - 1)
    if symmetric:
        s = np.maximum(np.abs(x).max() * f / F32(mid - 1), F32(1e-8))
        s = np.maximum(s.astype(np.float16).astype(F32), F32(2.0**-24))
        c, z = np.clip(np.round(x / s), -(mid - 1), mid - 1) + mid, F32(mid)
    else:
        lo, hi = np.minimum(x.min() * f, 0), np.maximum(x.max() * f, 0)
        s = np.maximum((hi - lo) / F32(qmax), F32(1e-8))
        s = np.maximum(s.astype(np.float16).astype(F32), F32(2.0**-24))
        z = np.clip(np.round(-lo / s), 0, qmax)
        c = np.clip(np.round(x / s + z), 0, qmax)
    return (((c - z) * s - x).astype(np.float64) ** 2).sum(-1)


TINY = [QuantScheme(2, False), QuantScheme(3, False), QuantScheme(4, False), QuantScheme(3, True), QuantScheme(4, True)]


@pytest.mark.parametrize("scheme", TINY, ids=lambda s: s.describe())
@pytest.mark.parametrize("seed", range(8))
def test_no_worse_than_its_own_shrink_grid(scheme, seed):
    # Guaranteed by construction: mse_params keeps the best of min-max and the documented grid
    # linspace(1, 0.5, 20) of shrink factors, then only accepts refinements that lower the error.
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(seed))
    grid = np.array(torch.linspace(1.0, 0.5, 20).tolist())
    best_on_grid = shrink_errors(x.numpy()[0], scheme.bits, scheme.symmetric, grid).min()
    searched, minmax = errors(x, scheme)
    # the reference agrees with the module where they overlap (shrink 1 is plain min-max)
    assert shrink_errors(x.numpy()[0], scheme.bits, scheme.symmetric, np.array([1.0]))[0] == pytest.approx(
        minmax.item(), rel=1e-9
    )
    assert searched.item() <= best_on_grid * (1 + 1e-5) + 1e-12


@pytest.mark.parametrize("scheme", TINY, ids=lambda s: s.describe())
@pytest.mark.parametrize("seed", range(8))
def test_exhaustive_fine_grid_cannot_beat_it_by_much(scheme, seed):
    # An exhaustive search over 2001 clipping factors in [0.2, 1] (wider and 100x finer than the
    # search's own grid) is not guaranteed to lose, so allow it a 10% margin; over 800 random
    # 16-value groups the largest advantage measured was 4%. Deterministic seeds keep this stable.
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(seed))
    fine = shrink_errors(x.numpy()[0], scheme.bits, scheme.symmetric, np.linspace(0.2, 1.0, 2001)).min()
    searched, _ = errors(x, scheme)
    assert searched.item() <= 1.10 * fine
