"""Length-sorted tokenised batches: the one batching of calibration, sensitivity and SentenceEncoder.encode."""

from __future__ import annotations

import pytest
from torch import nn

from modelpress.data.batches import length_sorted, tokenised_batches
from modelpress.errors import ConfigError

SENTENCES = ["ccc", "a", "bbbb", "dd", "e", "ffff"]


def test_batches_are_sorted_by_length_with_ties_in_input_order():
    assert length_sorted(SENTENCES, 4) == [[1, 4, 3, 0], [2, 5]]
    assert length_sorted(SENTENCES, 4, longest_first=True) == [[2, 5, 0, 3], [1, 4]]
    assert length_sorted(SENTENCES, 100) == [[1, 4, 3, 0, 2, 5]] and length_sorted([], 3) == []


class Words(nn.Module):
    def tokenize(self, sentences):
        return {"sentences": list(sentences)}


def test_each_batch_is_tokenised_by_the_models_own_tokenize():
    got = tokenised_batches(Words(), SENTENCES, 4)
    assert got == [([1, 4, 3, 0], {"sentences": ["a", "e", "dd", "ccc"]}), ([2, 5], {"sentences": ["bbbb", "ffff"]})]


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_a_bad_batch_size_is_refused(batch_size):
    with pytest.raises(ConfigError, match=rf"batch_size={batch_size!r}: give a positive integer"):
        length_sorted(SENTENCES, batch_size)


def test_a_model_without_a_tokenizer_is_refused_with_the_one_message():
    with pytest.raises(ConfigError, match=r"^sentences need a model with a tokenizer .* not a Linear: give tokenised"):
        tokenised_batches(nn.Linear(2, 2), SENTENCES, 4)
