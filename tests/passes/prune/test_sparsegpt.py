"""SparseGPT (pure) against a plain OBS loop, against GPTQ at sparsity 0, and prune + quantise in one pass."""

from __future__ import annotations

import pytest
import torch

from modelpress.encodings import QuantizedTensor, QuantScheme, mse_params, quantize
from modelpress.errors import ConfigError
from modelpress.passes.gptq import gptq_quantize
from modelpress.passes.linalg import output_error
from modelpress.passes.prune import nm_mask, pruned_count, sparsegpt_prune, topk_mask, wanda_scores
from modelpress.encodings import RangeSearch
from _prune_support import correlated, gen, hessian, reference_keep  # noqa: E402


# ---------------------------------------------------------------- sparsegpt (pure)


def reference_sparsegpt(W, H, sparsity, nm, damp):
    """The plain OBS loop: one column at a time with the explicit inverse Hessian of the columns not yet
    processed; unstructured masks chosen per row at the start (one block), N:M masks group by group."""
    W, H = W.clone(), H.clone()
    R, C = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(C, dtype=H.dtype))
    diag, tmp = torch.zeros(C, dtype=H.dtype), Hinv.clone()  # the diagonal as the loop will see it
    for j in range(C):
        diag[j] = tmp[j, j]
        tmp = tmp - torch.outer(tmp[:, j], tmp[j, :]) / tmp[j, j]
    mask = torch.zeros(R, C, dtype=torch.bool)
    if nm is None:
        for r in range(R):
            mask[r] = reference_keep(W[r] ** 2 / diag, C - pruned_count(C, sparsity))
    for j in range(C):
        if nm is not None and j % nm[1] == 0:
            for r in range(R):
                mask[r, j:j + nm[1]] = reference_keep(W[r, j:j + nm[1]] ** 2 / diag[j:j + nm[1]], nm[0])
        q = torch.where(mask[:, j], W[:, j], 0.0)
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
        W[:, j] = q
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return W, mask


@pytest.mark.parametrize("sparsity, nm, block", [(0.5, None, 64), (0.3, None, 64), (0.5, (2, 4), 16),
                                                 (0.5, (4, 8), 64), (0.75, (1, 4), 8)])
def test_sparsegpt_equals_the_plain_obs_loop(sparsity, nm, block):
    X = correlated(c=64)
    W = torch.randn(10, 64, generator=gen(5), dtype=torch.float64)
    H = hessian(X)
    H[:, 7] = H[7, :] = 0  # a dead input
    got = sparsegpt_prune(W, H, sparsity, nm, damp=0.01, block_size=block)
    want, mask = reference_sparsegpt(W, H, sparsity, nm, 0.01)
    assert torch.equal(got.mask, mask)
    torch.testing.assert_close(got.weight, want, rtol=0, atol=1e-9)
    assert (got.weight[~got.mask] == 0).all()


@pytest.mark.parametrize("scheme", [QuantScheme(4, False, "channel"), QuantScheme(3, True, "channel"),
                                    QuantScheme(8, True, "channel")])
@pytest.mark.parametrize("search", [RangeSearch.MSE, RangeSearch.MINMAX])
def test_sparsegpt_at_sparsity_zero_is_gptq(scheme, search):
    X, W = correlated(c=64).float(), torch.randn(12, 64, generator=gen(6))
    H = hessian(X.double())
    got = sparsegpt_prune(W, H, 0.0, None, scheme, search, block_size=32)
    want = gptq_quantize(W, H, scheme, search, block_size=32)  # per row, ranges from the whole row: the same
    assert got.mask.all() and torch.equal(got.weight, want.weight)


def test_sparsegpt_beats_wanda_and_magnitude_on_correlated_inputs():
    X, W = correlated(c=64), torch.randn(16, 64, generator=gen(7), dtype=torch.float64)
    H = hessian(X)
    for sparsity, nm in ((0.5, None), (0.5, (2, 4))):
        pick = (lambda s: nm_mask(s, *nm)) if nm else (lambda s: topk_mask(s, sparsity, True))
        magnitude_err = output_error(W, W * pick(W.abs()), H)
        wanda_err = output_error(W, W * pick(wanda_scores(W, H.diagonal())), H)
        sparsegpt_err = output_error(W, sparsegpt_prune(W, H, sparsity, nm).weight, H)
        assert sparsegpt_err < 0.7 * wanda_err < 0.7 * magnitude_err, (sparsegpt_err, wanda_err, magnitude_err)


@pytest.mark.parametrize("nm, group_size", [(None, "channel"), (None, 16), ((2, 4), 32), ((4, 8), 16)])
def test_sparsegpt_prune_and_quantise_in_one_pass(nm, group_size):
    X, W = correlated(c=128).float(), torch.randn(16, 128, generator=gen(8))
    H = hessian(X.double())
    scheme = QuantScheme(4, False, group_size)
    result = sparsegpt_prune(W, H, 0.5, nm, scheme, block_size=64)
    enc = result.encoding(nm, scheme)
    assert isinstance(enc.values, QuantizedTensor) and enc.values.shape == (16, 64)
    assert torch.equal(enc.decode(), result.weight)  # what is stored is exactly what was optimised
    assert (result.mask.sum(1) == 64).all()
    plain = sparsegpt_prune(W, H, 0.5, nm, block_size=64)  # prune, then quantise the kept values by RTN
    kept = plain.weight[plain.mask].reshape(16, 64)
    two_step = torch.zeros_like(W).masked_scatter(plain.mask, quantize(kept, scheme, *mse_params(kept, scheme)).decode())
    assert torch.equal(result.mask, plain.mask)  # the first sweep fixes the mask
    assert output_error(W, result.weight, H) <= 1.01 * output_error(W, two_step, H)  # never worse, mostly better


def test_sparsegpt_groups_must_divide_the_kept_values():
    with pytest.raises(ConfigError, match="does not divide the 32 kept values"):
        sparsegpt_prune(torch.randn(4, 64), torch.eye(64), 0.5, None, QuantScheme(4, False, 64), block_size=16)
    result = sparsegpt_prune(torch.randn(4, 64), torch.eye(64), 0.5, None, QuantScheme(4, False, 32), block_size=16)
    assert result.scale.shape == (4, 1, 1)  # a group may span blocks


def test_sparsegpt_at_sparsity_zero_without_quantisation_changes_nothing():
    W = torch.randn(6, 32, generator=gen(9))
    assert torch.equal(sparsegpt_prune(W, hessian(correlated(c=32)), 0.0).weight, W)
