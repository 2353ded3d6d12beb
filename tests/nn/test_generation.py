"""Greedy generation: both engines give transformers' own `generate` tokens, on every architecture
transformers runs (the lean engine on the Llama family), compressed modules and tied embeddings
included; the lean engine's logits are the model's own forward's at every step."""

from __future__ import annotations

import pytest
import torch

from modelpress.errors import ConfigError, UnsupportedError
from modelpress.nn.generation import Engine, greedy_generate, lean_supported

transformers = pytest.importorskip("transformers")

VOCAB = 101
ARCHITECTURES = ("llama", "qwen2", "mistral", "phi3", "gpt2")
LEAN = {"llama", "qwen2", "mistral"}


def tiny_causal_lm(kind: str, tied: bool = False, seed: int = 0):
    """A seeded 2-layer random causal LM of the given architecture (grouped-query heads where it has them)."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()
    config_type, model_type = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[kind]
    config = config_type(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    return model_type(config).eval()


def reference_tokens(model, prompt: torch.Tensor, n: int) -> list[int]:
    """transformers' own greedy generate, run for exactly n tokens."""
    out = model.generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, prompt.numel():].tolist()


def prompt(length: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_engines_give_transformers_tokens(kind):
    model, ids = tiny_causal_lm(kind), prompt()
    expected = reference_tokens(model, ids, 24)
    engines = [Engine.TRANSFORMERS, Engine.AUTO] + ([Engine.LEAN] if kind in LEAN else [])
    for engine in engines:
        result = greedy_generate(model, ids, 24, engine=engine)
        assert list(result.tokens) == expected, engine
    assert lean_supported(model, 36) == (kind in LEAN)
    assert greedy_generate(model, ids, 3).engine is (Engine.LEAN if kind in LEAN else Engine.TRANSFORMERS)


@pytest.mark.parametrize("kind", sorted(LEAN))
def test_lean_logits_are_the_models_own(kind):
    """Teacher-forced: each lean step's logits match a full forward over the sequence so far."""
    from modelpress.nn.generation import _LeanDecoder

    model, ids = tiny_causal_lm(kind, seed=1), prompt(20, seed=5)
    step = _LeanDecoder(model, 20)
    with torch.inference_mode():
        got = [step(ids[None, :8], 0)] + [step(ids[None, t:t + 1], t) for t in range(8, 20)]
        want = [model(input_ids=ids[None, :t + 1]).logits[:, -1] for t in range(7, 20)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_lean_runs_compressed_and_tied_models():
    """int8 and 4-bit Linear layers (CompressedLinear) and a tied output layer: same tokens as generate."""
    from modelpress import compress

    for recipe in ("int8", "int4"):
        model = tiny_causal_lm("llama", tied=True)
        compress(model, recipe)
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "CompressedLinear"
        ids = prompt()
        result = greedy_generate(model, ids, 16, engine=Engine.LEAN)
        assert list(result.tokens) == reference_tokens(model, ids, 16)


def test_stop_token_ends_the_continuation():
    model, ids = tiny_causal_lm("llama"), prompt()
    full = greedy_generate(model, ids, 16).tokens
    stop = full[5]
    first = full.index(stop)
    for engine in (Engine.LEAN, Engine.TRANSFORMERS):
        cut = greedy_generate(model, ids, 16, stop={stop}, engine=engine)
        assert cut.tokens == full[:first + 1]
        assert cut.decoded == first and cut.prompt_tokens == ids.numel()


def test_timings_and_throughput():
    result = greedy_generate(tiny_causal_lm("llama"), prompt(), 8)
    assert len(result.tokens) == 8 and result.decoded == 7
    assert result.prefill_s > 0 and result.decode_s > 0
    assert result.prefill_tokens_per_s == pytest.approx(12 / result.prefill_s)
    assert result.decode_tokens_per_s == pytest.approx(7 / result.decode_s)
    assert greedy_generate(tiny_causal_lm("llama"), prompt(), 1).decode_tokens_per_s is None


def test_lean_refuses_what_it_cannot_run():
    with pytest.raises(UnsupportedError, match="engine 'transformers'"):
        greedy_generate(tiny_causal_lm("gpt2"), prompt(), 4, engine="lean")
    mistral = tiny_causal_lm("mistral")
    mistral.config.sliding_window = 8  # a window shorter than the sequence changes attention: not ours
    assert not lean_supported(mistral, 20)
    assert greedy_generate(mistral, prompt(), 8).engine is Engine.TRANSFORMERS


@pytest.mark.parametrize("args, match", [
    (dict(prompt=[], new_tokens=4), "no tokens"),
    (dict(prompt=[5, 6], new_tokens=0), "at least one token"),
    (dict(prompt=[5, 6], new_tokens=2, engine="fast"), "unknown engine"),
])
def test_bad_arguments_are_config_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        greedy_generate(tiny_causal_lm("llama"), **args)


def test_decode_runs_torch_on_one_thread_where_the_packed_kernel_runs_the_matmuls():
    """A model whose Linear layers run on the packed kernel decodes with torch on one thread and the kernel
    on torch's count (restored after); a float model, or one thread, is left alone; the tokens do not change."""
    from modelpress import compress
    from modelpress.nn import qmatmul
    from modelpress.nn.generation import decode_threads, packed_share

    model, ids = tiny_causal_lm("llama", tied=True), prompt()
    assert packed_share(model) == 0.0
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with decode_threads(model):
            assert torch.get_num_threads() == 2 and qmatmul._state["threads"] is None
        compress(model, "int8")
        assert packed_share(model) == (1.0 if qmatmul.NATIVE_AVAILABLE else 0.0)
        if qmatmul.NATIVE_AVAILABLE:
            with decode_threads(model):
                assert torch.get_num_threads() == 1 and qmatmul._state["threads"] == 2
        assert torch.get_num_threads() == 2 and qmatmul._state["threads"] is None
        split = greedy_generate(model, ids, 16).tokens
        torch.set_num_threads(1)
        with decode_threads(model):
            assert qmatmul._state["threads"] is None
        assert greedy_generate(model, ids, 16).tokens == split == tuple(reference_tokens(model, ids, 16))
    finally:
        torch.set_num_threads(before)
