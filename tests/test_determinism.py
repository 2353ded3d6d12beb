"""What conftest.py promises every test: seeded generators, a fixed thread count, derandomized
hypothesis, and a kernel choice that does not depend on timing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import settings

from modelpress.encodings import QuantScheme, quantize
from modelpress.encodings.quantized import PER_CHANNEL
from modelpress.nn import Kernel, select_kernel

SEED, FAST_THREADS, THREADS = 0, 1, 2  # as tests/conftest.py sets them (not imported: tests/store has a conftest too)


def test_generators_start_from_the_seed_in_every_test():
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(SEED)))
    assert random.random() == random.Random(SEED).random()
    assert np.random.rand() == np.random.RandomState(SEED).rand()


def test_a_test_that_draws_leaves_the_next_one_a_seeded_generator():
    torch.rand(1000)  # the test above (and any other) starts from the seed whatever ran before it
    random.random()
    np.random.rand(10)


def test_hypothesis_runs_the_derandomized_profile():
    assert settings.default.derandomize is True
    assert settings.default.database is None
    assert settings.default.deadline is None


def test_fast_tests_run_on_one_thread():
    assert torch.get_num_threads() == FAST_THREADS


def test_a_thread_change_is_undone_after_the_test():
    torch.set_num_threads(3)  # the next test still sees FAST_THREADS


def test_after_a_thread_change_the_count_is_back():
    assert torch.get_num_threads() == FAST_THREADS


@pytest.mark.slow
def test_slow_tests_run_on_the_ci_machines_two_threads():
    assert torch.get_num_threads() == THREADS


def test_auto_kernel_takes_the_first_eligible_candidate_not_the_fastest():
    enc = quantize(torch.randn(64, 128), QuantScheme(8, True, PER_CHANNEL))  # (QMATMUL is chosen by rule, untimed)
    assert select_kernel(enc, (Kernel.DENSE, Kernel.INT8_WEIGHT_MM), rows=8) is Kernel.DENSE
    assert select_kernel(enc, (Kernel.INT8_WEIGHT_MM, Kernel.DENSE), rows=8) is Kernel.INT8_WEIGHT_MM
