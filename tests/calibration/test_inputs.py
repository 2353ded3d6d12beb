"""Calibration inputs: sentences, dicts and tensors become batches; malformed calibration data fails with one
line naming the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.calibration import calibration_sentences, prepare_batches, run_blockwise
from modelpress.errors import CalibrationError, ConfigError
from _calibration_support import ALL, BLOCK_LINEARS, T, TinyTransformer, collect, make_batches  # noqa: E402


# ---------------------------------------------------------------- inputs


class FakeEncoder(nn.Module):
    """A model with `tokenize`, like SentenceEncoder: one token per word, padded to the batch."""

    def __init__(self):
        super().__init__()
        self.inner = TinyTransformer()
        self.seen: list[list[str]] = []

    def tokenize(self, sentences):
        self.seen.append(list(sentences))
        width = max(len(s.split()) for s in sentences)
        ids = torch.zeros(len(sentences), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(sentences):
            words = s.split()
            ids[r, :len(words)] = torch.tensor([1 + sum(map(ord, w)) % 49 for w in words])
            mask[r, :len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids, attention_mask)


def test_sentences_are_tokenised_in_length_sorted_batches():
    model = FakeEncoder()
    sentences = [" ".join(["w"] * k) for k in (5, 1, 3, 2, 4)]
    batches = prepare_batches(model, sentences, batch_size=2)
    assert [len(b.token_mask) for b in batches] == [2, 2, 1]
    assert model.seen == [["w", "w w"], ["w w w", "w w w w"], ["w w w w w"]]
    seen, _, _ = collect(model, ["inner.layers.0.q"], sentences)
    assert seen["inner.layers.0.q"].tokens == 15


@pytest.mark.slow
def test_calibration_sentences_are_disjoint_from_evaluation_sentences():
    from modelpress.data.corpus import corpus_splits, stdlib_sentences

    sentences = calibration_sentences(64)
    assert len(sentences) == len(set(sentences)) == 64
    assert sentences == calibration_sentences(64)  # deterministic
    assert not set(sentences) & set(corpus_splits(n_eval=5000, n_calib=1).evaluation)
    assert set(calibration_sentences(8)) <= set(stdlib_sentences())
    assert calibration_sentences(8, seed=1) != calibration_sentences(8)


@pytest.mark.slow  # reads the corpus size: parses the whole stdlib
@pytest.mark.parametrize("n", [0, -1, 10**7])
def test_calibration_sentences_refuses_impossible_counts(n):
    with pytest.raises(CalibrationError, match=r"ask for between 1 and \d+ sentences"):
        calibration_sentences(n)


# ---------------------------------------------------------------- errors


def _error(model, names, calibration) -> str:
    with pytest.raises(CalibrationError) as info:
        collect(model, names, calibration)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("calibration", [[], (), iter([])])
def test_empty_calibration_set(calibration):
    assert "the calibration set is empty" in _error(TinyTransformer(), ["pooler"], calibration)


def test_missing_calibration_names_the_pass_and_the_fix():
    message = _error(TinyTransformer(), ["pooler"], None)
    assert "pass 'calibration' needs calibration data" in message and "--calibration 128" in message


@pytest.mark.parametrize(
    "calibration, fragment",
    [
        ("one sentence", "give a list of sentences"),
        (42, "calibration of type int is not supported"),
        ([{"input_ids": [[1, 2]]}], "entry 'input_ids' is a list, not a tensor"),
        ([3.5], "calibration item 0 is a float"),
        (["a sentence", torch.zeros(1, 3, dtype=torch.long)], "mixes"),
        ([{"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 4)}],
         "attention_mask has shape (2, 4) but input_ids (2, 5)"),
        ([{"input_ids": torch.zeros(2, 0, dtype=torch.long), "attention_mask": torch.ones(2, 0)}], "empty tensor"),
    ],
)
def test_malformed_calibration_data(calibration, fragment):
    assert fragment in _error(TinyTransformer(), ["pooler"], calibration)


def test_sentences_need_a_model_with_a_tokenizer():
    """The one error of tokenised batches (data/batches.py), the same as sensitivity's and encode's."""
    with pytest.raises(ConfigError, match=r"sentences need a model with a tokenizer .* not a TinyTransformer"):
        collect(TinyTransformer(), ["pooler"], ["a sentence"])


def test_inputs_of_the_wrong_shape():
    model = nn.Sequential(nn.Linear(8, 4))
    message = _error(model, ["0"], [torch.randn(3, 8), torch.randn(3, 5)])
    assert "calibration batch 1 does not fit the model (RuntimeError" in message
    assert "give inputs shaped as the model's forward expects" in message


def test_wrong_shapes_in_a_transformer_fail_before_any_block_is_processed():
    model = TinyTransformer()
    processed = []
    bad = {"input_ids": torch.zeros(2, 3, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3, 4)}
    with pytest.raises(CalibrationError, match="does not fit the model|attention_mask has shape"):
        run_blockwise(model, [T(n) for n in ALL], [bad], lambda g: processed.append(g), [])
    assert processed == []


def test_nan_inputs():
    model = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    assert "calibration batch 1 holds NaN or infinite values" in _error(model, ["0"], [torch.randn(2, 8), x])


def test_nan_activations_name_the_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    message = _error(model, ["0", "1"], [torch.randn(3, 8)])
    assert "the input of layer '1' holds NaN or infinite values on calibration batch 0" in message


def test_non_linear_targets_are_refused():
    model = nn.Sequential(nn.Conv1d(2, 2, 1))
    assert "is not a Linear layer" in _error(model, ["0"], [torch.randn(1, 2, 4)])


def test_a_batch_that_fails_inside_a_block_names_the_batch():
    # the catcher stops before block 0 runs, so this batch first fails in the block walk
    model = TinyTransformer()
    good = make_batches(1)[0]
    good = {"ids": good["input_ids"], "mask": good["attention_mask"]}  # names the checks do not know
    bad = {"ids": good["ids"][:, :6], "mask": good["mask"]}  # (3, 6) tokens, (3, 10) mask

    class Loose(nn.Module):  # does not check the mask itself, so the block does
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids, mask):
            h = self.inner.embed(ids)
            additive = (1.0 - mask[:, None, :].float()) * -1e9
            for layer in self.inner.layers:
                h = layer(h, attention_mask=additive)
            return h

    names = [f"inner.layers.0.{n}" for n in BLOCK_LINEARS]
    with pytest.raises(CalibrationError, match=r"calibration batch 1 does not fit the model \(RuntimeError"):
        run_blockwise(Loose(), [T(n) for n in names], [good, bad], lambda g: None, [])
