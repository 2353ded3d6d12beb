"""Calibration of a decoder LLM: text through the model's tokenizer in windows of the dev text, and the
block walk over a Llama (GQA attention, SwiGLU, RMSNorm, a key/value cache by default) giving the very
statistics of plain hooked whole-model forwards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from modelpress.calibration import DEFAULT_WINDOWS, calibration_windows, run_blockwise, text_windows
from modelpress.calibration.stats import real_tokens
from modelpress.data.text import reference_text
from modelpress.errors import CalibrationError
from _calibration_support import T, assert_stats_match, collect  # noqa: E402

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
from _tiny_decoders import tiny_decoder, windows  # noqa: E402

LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


class WordTokenizer:
    """A stand-in for a Hugging Face tokenizer: one id per whitespace-separated word (its length)."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [len(word) for word in text.split()]}


def test_text_windows_are_consecutive_token_windows_from_the_start():
    text = " ".join("x" * (1 + i % 7) for i in range(50))
    out = text_windows(WordTokenizer(), text, windows=3, window=10)
    ids = torch.tensor(WordTokenizer()(text)["input_ids"])
    assert [set(w) for w in out] == [{"input_ids"}] * 3
    assert torch.equal(torch.cat([w["input_ids"] for w in out], 1), ids[None, :30])
    assert all(w["input_ids"].shape == (1, 10) and w["input_ids"].dtype == torch.long for w in out)


def test_too_little_text_or_a_bad_count_is_our_error():
    with pytest.raises(CalibrationError, match="fewer than 6 windows of 10: ask for at most 5"):
        text_windows(WordTokenizer(), "a " * 55, windows=6, window=10)
    for count, window in [(0, 10), (True, 10), (2, 1)]:
        with pytest.raises(CalibrationError):
            text_windows(WordTokenizer(), "a " * 55, windows=count, window=window)


def test_calibration_windows_come_from_the_dev_text():
    out = calibration_windows(WordTokenizer(), windows=4, window=32)
    dev = torch.tensor(WordTokenizer()(reference_text("dev"))["input_ids"][:128])
    assert torch.equal(torch.cat([w["input_ids"][0] for w in out]), dev)


def llama_reference(model, names, batches):
    """Each layer's inputs from plain hooked whole-model forwards without a cache, as X (N, C)."""
    xs = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda module, args, n=n: xs[n].append(real_tokens(args[0], None))) for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(x).double() for n, x in xs.items()}


@pytest.mark.parametrize("sequential", [True, False])
def test_llama_block_walk_gives_the_statistics_of_whole_forwards(sequential):
    model, data = tiny_decoder(layers=3), windows(3)
    names = [f"model.layers.{i}.{n}" for i in range(3) for n in LLAMA_LINEARS] + ["lm_head"]
    assert model.config.use_cache is True  # the default: each forward would fill a key/value cache
    seen, order, log = collect(model, names, data, sequential=sequential)
    expected = llama_reference(model, names, data)
    for name in names:
        assert_stats_match(seen[name], expected[name])
    assert model.config.use_cache is True  # restored
    if sequential:  # q/k/v and gate/up read one input each: measured and handed over together
        assert order[:4] == [[f"model.layers.0.{n}" for n in group] for group in
                             (LLAMA_LINEARS[:3], LLAMA_LINEARS[3:4], LLAMA_LINEARS[4:6], LLAMA_LINEARS[6:])]
    assert log == []


def test_layers_after_a_processed_one_see_its_new_weights_not_a_cached_run():
    # The walk re-runs a block for each group of layers; with the model's key/value cache on, a
    # re-run would attend to the keys and values of the runs before (the float ones).
    model, data = tiny_decoder(layers=2), windows(2)
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in LLAMA_LINEARS]
    seen = {}

    def process(group):
        for t, stats in group:
            seen[t.name] = stats
            if t.name.endswith(("0.self_attn.k_proj", "0.self_attn.v_proj")):
                model.get_submodule(t.name).weight.data.mul_(-0.5)

    original = llama_reference(model, names, data)
    run_blockwise(model, [T(n) for n in names], data, process, [])
    changed = llama_reference(model, names, data)  # k and v of block 0 now changed
    for name in names:
        first = name.endswith(("0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj"))
        assert_stats_match(seen[name], original[name] if first else changed[name])


class CharTokenizer:
    """One id per character, inside the tiny models' vocabulary."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 96 for c in text]}


def test_a_causal_lm_carrying_its_tokenizer_is_calibrated_on_dev_windows_by_default():
    import modelpress
    from modelpress.passes.gptq import GPTQConfig

    config = {"model.layers.1.mlp.down_proj": GPTQConfig(bits=4, symmetric=True, group_size=32), "*": None}
    given = modelpress.compress(tiny_decoder(), config,
                                calibration=calibration_windows(CharTokenizer(), DEFAULT_WINDOWS))
    model = tiny_decoder()
    model.tokenizer = CharTokenizer()
    modelpress.compress(model, config)
    a, b = model.model.layers[1].mlp.down_proj.encoding, given.model.layers[1].mlp.down_proj.encoding
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert any("no calibration given, using 32 windows of the dev reference text" in line
               for line in modelpress.provenance(model).log)
