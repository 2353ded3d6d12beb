"""Fixtures of the search tests: one intra-op thread, and the sensitivity rows of the toy encoder (measured once)."""

from __future__ import annotations

import pytest
import torch

from _toy_encoder import RECIPE, toy_encoder, toy_sentences
from modelpress.search import LayerSensitivity, default_upgrades, layer_sensitivity


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy's matrices are tiny: on a shared machine a second thread only adds waiting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def rows() -> list[LayerSensitivity]:
    return layer_sensitivity(toy_encoder(), RECIPE, toy_sentences(), upgrades=default_upgrades, batch_size=16)
