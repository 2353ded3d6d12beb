"""Pruning masks against plain Python references: counts, top-k per row and per matrix, N:M, one global
threshold, Wanda's scores."""

from __future__ import annotations

import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.passes.prune import global_masks, nm_mask, pruned_count, topk_mask, wanda_scores
from _prune_support import gen, reference_keep  # noqa: E402


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("total, sparsity, expect", [(10, 0.5, 5), (10, 0.25, 3), (10, 0.24, 2), (3, 0.5, 2),
                                                     (7, 0.0, 0), (4, 0.999, 4)])
def test_pruned_count_rounds_to_nearest(total, sparsity, expect):
    assert pruned_count(total, sparsity) == expect


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_topk_mask_matches_a_plain_sort(per_row, sparsity):
    scores = torch.randint(0, 6, (7, 12), generator=gen(1)).float()  # many ties
    mask = topk_mask(scores, sparsity, per_row)
    if per_row:
        expect = torch.stack([reference_keep(r, 12 - pruned_count(12, sparsity)) for r in scores])
    else:
        expect = reference_keep(scores.reshape(-1), 84 - pruned_count(84, sparsity)).reshape(7, 12)
    assert torch.equal(mask, expect)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_matches_a_plain_loop(n, m):
    scores = torch.randint(0, 5, (5, 4 * m), generator=gen(2)).float()
    mask = nm_mask(scores, n, m)
    for r in range(5):
        for g in range(4):
            assert torch.equal(mask[r, g * m:(g + 1) * m], reference_keep(scores[r, g * m:(g + 1) * m], n))
    assert (mask.reshape(5, 4, m).sum(-1) == n).all()


def test_nm_mask_refuses_a_width_it_does_not_divide():
    with pytest.raises(ConfigError, match="divisible by 4"):
        nm_mask(torch.rand(3, 10), 2, 4)


def test_global_masks_use_one_threshold():
    a, b = torch.rand(4, 8, generator=gen(0)), 3 * torch.rand(6, 5, generator=gen(1))
    ma, mb = global_masks([a, b], 0.6)
    flat = torch.cat([a.reshape(-1), b.reshape(-1)])
    assert torch.equal(torch.cat([ma.reshape(-1), mb.reshape(-1)]), reference_keep(flat, 62 - pruned_count(62, 0.6)))
    assert mb.float().mean() > ma.float().mean()  # the larger tensor keeps more


def test_wanda_scores_are_weight_times_input_norm():
    W = torch.randn(3, 4, generator=gen(0))
    X = torch.randn(50, 4, generator=gen(1)) * torch.tensor([1.0, 10.0, 0.1, 0.0])
    expect = torch.tensor([[abs(W[i, j].item()) * X[:, j].norm().item() for j in range(4)] for i in range(3)])
    torch.testing.assert_close(wanda_scores(W, (X * X).sum(0)), expect)
