"""Fidelity metrics against plain-Python references, on data whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from modelpress.errors import ConfigError, ModelpressError
from modelpress.evaluate.fidelity import Fidelity, cosine_similarities, fidelity, neighbour_overlap


def cosine_reference(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Row-wise cosine with a Python loop; 0 where a row is all zeros."""
    out = []
    for x, y in zip(a.tolist(), b.tolist()):
        nx, ny = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
        out.append(0.0 if nx == 0 or ny == 0 else sum(p * q for p, q in zip(x, y)) / (nx * ny))
    return out


def neighbours_reference(x: np.ndarray, query: int, k: int) -> set[int]:
    """The k rows most cosine-similar to row `query`, by sorting every other row."""
    others = [j for j in range(len(x)) if j != query]
    cos = {j: cosine_reference(x[query : query + 1], x[j : j + 1])[0] for j in others}
    return set(sorted(others, key=lambda j: -cos[j])[:k])


def overlap_reference(a: np.ndarray, b: np.ndarray, n_queries: int, k: int) -> float:
    shared = [len(neighbours_reference(a, q, k) & neighbours_reference(b, q, k)) for q in range(n_queries)]
    return sum(shared) / (k * n_queries)


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# Integer-valued rows: norms are 0 or at least 1, so the reference needs no epsilon.
small_matrices = st.tuples(st.integers(2, 12), st.integers(1, 6)).flatmap(
    lambda shape: arrays(np.float64, shape, elements=st.integers(-5, 5).map(float))
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_matches_loop_reference(seed):
    a, b = gaussian(20, 7, seed), gaussian(20, 7, seed + 100) * 3.0 + 0.5
    expected = torch.tensor(cosine_reference(a.numpy(), b.numpy()), dtype=torch.float64)
    torch.testing.assert_close(cosine_similarities(a, b), expected, rtol=0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(small_matrices, st.data())
def test_cosine_property_matches_reference_and_ignores_scale(a, data):
    b = data.draw(arrays(np.float64, a.shape, elements=st.integers(-5, 5).map(float)))
    A, B = torch.from_numpy(a), torch.from_numpy(b)
    cos = cosine_similarities(A, B)
    torch.testing.assert_close(cos, torch.tensor(cosine_reference(a, b), dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((cos.abs() <= 1 + 1e-12).all())
    torch.testing.assert_close(cosine_similarities(B, A), cos, rtol=0, atol=0)
    scale = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=len(a), max_size=len(a)))).double()
    torch.testing.assert_close(cosine_similarities(A * 2.0 ** scale[:, None], B), cos, rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(small_matrices, st.data())
def test_overlap_properties(a, data):
    n = a.shape[0]
    k = data.draw(st.integers(1, n - 1))
    q = data.draw(st.integers(1, n))
    b = data.draw(arrays(np.float64, a.shape, elements=st.integers(-5, 5).map(float)))
    A, B = torch.from_numpy(a), torch.from_numpy(b)
    assert neighbour_overlap(A, A, n_queries=q, k=k) == 1.0
    value = neighbour_overlap(A, B, n_queries=q, k=k)
    assert 0.0 <= value <= 1.0
    assert value * k * q == pytest.approx(round(value * k * q))  # a whole number of shared neighbours
    # Scaling a row by a power of two changes no normalised value, so no neighbour list changes.
    scale = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))).double()
    assert neighbour_overlap(A, A * 2.0 ** scale[:, None], n_queries=q, k=k) == 1.0


@pytest.mark.parametrize(("seed", "n_queries", "k"), [(0, 10, 3), (1, 40, 5), (2, 1, 1), (3, 40, 39)])
def test_overlap_matches_brute_force(seed, n_queries, k):
    a = gaussian(40, 6, seed)
    b = a + 0.3 * gaussian(40, 6, seed + 100)  # a noisy copy: partial overlap
    expected = overlap_reference(a.numpy(), b.numpy(), n_queries, k)
    assert 0.0 < expected
    assert neighbour_overlap(a, b, n_queries=n_queries, k=k) == pytest.approx(expected, abs=1e-12)


def test_identical_inputs_are_perfect():
    a = gaussian(300, 16, 0)
    result = fidelity(a, a.clone())
    assert result.overlap_at_10 == 1.0
    assert result.mean_cosine == pytest.approx(1.0, abs=1e-12)
    assert result.min_cosine == pytest.approx(1.0, abs=1e-12)


def test_overlap_ignores_dtype_and_scale_of_candidate():
    a = gaussian(300, 16, 0)
    assert neighbour_overlap(a, (a * 7.0).double()) == 1.0


@pytest.mark.parametrize(
    "candidate",
    [
        lambda a: gaussian(*a.shape, seed=99),  # unrelated model
        lambda a: a[torch.randperm(len(a), generator=torch.Generator().manual_seed(0))],  # rows shuffled
    ],
    ids=["random", "permuted"],
)
def test_unrelated_candidate_has_low_overlap(candidate):
    a = gaussian(500, 32, 0)
    assert neighbour_overlap(a, candidate(a), n_queries=200, k=10) < 0.1  # chance is 10/499


def test_fidelity_fields_match_direct_computation():
    a = gaussian(250, 8, 0)
    b = a + 0.5 * gaussian(250, 8, 1)
    cos = torch.tensor(cosine_reference(a.numpy(), b.numpy()), dtype=torch.float64)
    result = fidelity(a, b, n_queries=50, k=10)
    assert result == Fidelity(
        mean_cosine=pytest.approx(cos.mean().item(), abs=1e-9),
        p1_cosine=pytest.approx(np.percentile(cos.numpy(), 1), abs=1e-9),
        min_cosine=pytest.approx(min(cos.tolist()), abs=1e-9),
        overlap_at_10=pytest.approx(overlap_reference(a.numpy(), b.numpy(), 50, 10), abs=1e-12),
        n_sentences=250,
        n_queries=50,
    )
    assert result.p1_cosine <= result.mean_cosine
    assert result.min_cosine <= result.p1_cosine


def test_to_dict_is_plain_numbers():
    a = gaussian(30, 4, 0)
    d = fidelity(a, a, n_queries=5, k=3).to_dict()
    assert list(d) == ["mean_cosine", "p1_cosine", "min_cosine", "overlap_at_10", "n_sentences", "n_queries"]
    assert all(type(v) in (float, int) for v in d.values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("function", [cosine_similarities, neighbour_overlap, fidelity])
def test_non_finite_candidate_is_refused(bad, function):
    a = gaussian(30, 4, 0)
    b = a.clone()
    b[7, 2] = bad
    with pytest.raises(ModelpressError, match="candidate embeddings hold 1 NaN/inf values"):
        function(a, b, **({} if function is cosine_similarities else {"n_queries": 5, "k": 3}))


def test_non_finite_reference_is_refused():
    a = gaussian(30, 4, 0)
    b = a.clone()
    a[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="reference embeddings hold 1 NaN/inf"):
        cosine_similarities(a, b)


@pytest.mark.parametrize(
    ("reference", "candidate", "message"),
    [
        (torch.ones(5, 3), torch.ones(5, 4), r"candidate embeddings have shape \(5, 4\)"),
        (torch.ones(5, 3), torch.ones(4, 3), r"candidate embeddings have shape \(4, 3\)"),
        (torch.ones(5), torch.ones(5), r"shape \(5,\): give a \(sentences, dim\) matrix"),
        (torch.ones(0, 3), torch.ones(0, 3), r"shape \(0, 3\)"),
    ],
)
def test_shapes_are_checked(reference, candidate, message):
    with pytest.raises(ConfigError, match=message):
        cosine_similarities(reference, candidate)


@pytest.mark.parametrize(
    ("n_queries", "k", "message"),
    [
        (5, 10, r"k=10 neighbours out of 10 sentences"),
        (5, 0, r"k=0"),
        (11, 3, r"n_queries=11 out of 10 sentences"),
        (0, 3, r"n_queries=0"),
    ],
)
def test_overlap_arguments_are_checked(n_queries, k, message):
    a = gaussian(10, 4, 0)
    with pytest.raises(ConfigError, match=message):
        neighbour_overlap(a, a, n_queries=n_queries, k=k)
