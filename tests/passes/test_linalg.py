"""The linear algebra the data-aware passes share: damped Cholesky factors with the retry loop, the output error."""

from __future__ import annotations

import pytest
import torch

from modelpress.errors import CalibrationError
from modelpress.passes.linalg import MAX_DAMP_RETRIES, damped_cholesky, inverse_cholesky, one_thread, output_error


def hessian(tokens: int, channels: int, seed: int = 0) -> torch.Tensor:
    X = torch.randn(tokens, channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X.T @ X  # (C, C): rank min(tokens, C)


def test_a_full_rank_hessian_is_factored_with_the_damping_asked_for():
    H = hessian(64, 8)
    L, damp = damped_cholesky(H.clone(), 0.01)
    expected = H + 0.01 * H.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    assert damp == 0.01 and torch.allclose(L @ L.T, expected, rtol=1e-10, atol=1e-10)
    U, damp = inverse_cholesky(H.clone(), 0.01)
    assert damp == 0.01 and torch.allclose(U.T @ U, torch.linalg.inv(expected), rtol=1e-8, atol=1e-10)
    assert torch.equal(U, torch.triu(U))


def test_a_singular_hessian_gets_more_damping_until_it_factors():
    H = torch.ones(6, 6, dtype=torch.float64)  # rank 1: no Cholesky factor without damping
    L, damp = damped_cholesky(H.clone(), 0.0)
    assert damp == 1e-4  # the first retry's floor
    assert torch.allclose(L @ L.T, H + 1e-4 * torch.eye(6, dtype=torch.float64), atol=1e-12)


def test_a_hessian_no_damping_can_fix_is_a_calibration_error():
    H = torch.full((4, 4), float("nan"), dtype=torch.float64)
    with pytest.raises(CalibrationError, match=rf"stays singular even with damping {0.01 * 10 ** MAX_DAMP_RETRIES:g}"):
        inverse_cholesky(H, 0.01)


def test_output_error_is_relative_to_the_layers_output():
    H = hessian(64, 8)
    W = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert output_error(W, W, H) == 0
    assert output_error(W, torch.zeros_like(W), H) == pytest.approx(1.0)
    assert output_error(W, 0.9 * W, H) == pytest.approx(0.01)


def test_one_thread_restores_the_callers_threads_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
