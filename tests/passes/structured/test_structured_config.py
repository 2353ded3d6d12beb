"""Structured pruning configs and unit selection: the least important units go, kept counts round to multiples."""

from __future__ import annotations

import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.passes.structured import StructuredConfig, keep_units


# ---------------------------------------------------------------- unit selection and slicing


@pytest.mark.parametrize("ratio, expect", [(0.0, [0, 1, 2, 3, 4, 5]), (0.5, [1, 3, 5]), (0.3, [1, 2, 3, 5]),
                                           (0.99, [5])])
def test_keep_units_drops_the_least_important(ratio, expect):
    importance = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.2, 9.0])
    assert keep_units(importance, ratio).tolist() == expect


@pytest.mark.parametrize("n, ratio, multiple, kept", [(1536, 0.3, 16, 1072), (1536, 0.3, 1, 1075), (1536, 0.25, 64, 1152),
                                                     (10, 0.5, 16, 5), (40, 0.5, 16, 16)])
def test_keep_units_rounds_the_kept_count_down_to_a_multiple(n, ratio, multiple, kept):
    importance = torch.randperm(n).float()
    chosen = keep_units(importance, ratio, multiple)
    assert len(chosen) == kept
    assert set(chosen.tolist()) == set(torch.argsort(importance, descending=True)[:kept].tolist())


def test_multiple_of_must_be_positive():
    with pytest.raises(ConfigError, match="multiple_of 0 is not valid"):
        StructuredConfig(multiple_of=0)


@pytest.mark.parametrize("fields, message", [({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"),
                                             ({"ratio": True}, "ratio"), ({"importance": "random"}, "random"),
                                             ({"reconstruct": "yes"}, "reconstruct"),
                                             ({"version": 3}, "version")])
def test_invalid_configs(fields, message):
    with pytest.raises(ConfigError, match=message):
        StructuredConfig(**fields)
