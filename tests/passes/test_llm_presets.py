"""The LLM presets on a tiny Llama: a tied embedding and output layer stay one encoding through every
pass, the blocks' Linear layers take the preset's scheme, and GPTQ calibrated on token windows lands
closer to the float model than round-to-nearest in the same format."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modelpress
from modelpress.encodings import QuantScheme, RangeSearch, quantize_weight
from modelpress.nn.registry import is_compressed
from modelpress.passes.gptq import GPTQConfig
from modelpress.passes.quantize import RTNConfig
from modelpress.presets import preset
from modelpress.recipe import Stage

pytest.importorskip("transformers")
from _tiny_decoders import logits, tiny_decoder, windows  # noqa: E402

BLOCK = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]
INT8_ROWS = QuantScheme(8, True, "channel")


def block_linears(model: nn.Module) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(model.config.num_hidden_layers) for n in BLOCK]


def decoded_copy(model: nn.Module, compressed: nn.Module) -> nn.Module:
    """The float `model` with every weight replaced by the decoded weight `compressed` holds (the reference)."""
    import copy

    reference = copy.deepcopy(model)
    for name, module in compressed.named_modules():
        if is_compressed(module):
            reference.get_submodule(name).weight = nn.Parameter(module.encoding.decode(torch.float32))
    return reference


@pytest.mark.parametrize("tied", [True, False])
def test_llm_int8_keeps_a_tied_weight_one_encoding(tied):
    import copy

    model = tiny_decoder(tied=tied)
    embedding = model.model.embed_tokens.weight.detach().clone()
    output = model.lm_head.weight.detach().clone()
    compressed = modelpress.compress(copy.deepcopy(model), "llm-int8")
    emb, head = compressed.model.embed_tokens, compressed.lm_head
    assert is_compressed(emb) and is_compressed(head)
    assert (emb.encoding is head.encoding) == tied
    expected = quantize_weight(embedding, INT8_ROWS, RangeSearch.MINMAX)
    assert torch.equal(emb.encoding.codes, expected.codes) and torch.equal(emb.encoding.scale, expected.scale)
    if not tied:
        expected = quantize_weight(output, INT8_ROWS, RangeSearch.MINMAX)
        assert torch.equal(head.encoding.codes, expected.codes)
    for name in block_linears(compressed):
        assert compressed.get_submodule(name).encoding.scheme == INT8_ROWS
    ids = windows(1, seed=1)[0]["input_ids"]
    torch.testing.assert_close(logits(compressed, ids), logits(decoded_copy(model, compressed), ids),
                               rtol=1e-4, atol=1e-4)
    lines = "\n".join(modelpress.provenance(compressed).log)
    assert ("lm_head (one encoding)" in lines) == tied


def test_gptq_of_a_tied_output_layer_gives_the_embedding_the_same_encoding():
    model = tiny_decoder()
    modelpress.compress(model, {"lm_head": GPTQConfig(bits=4, symmetric=True, group_size=32), "*": None},
                        calibration=windows(4))
    assert model.lm_head.encoding is model.model.embed_tokens.encoding
    ids = windows(1, seed=1)[0]["input_ids"]
    table = model.lm_head.encoding.decode(torch.float32)
    torch.testing.assert_close(model.model.embed_tokens(ids), table[ids])


def test_llm_q4_is_symmetric_g32_in_the_blocks_and_8_bit_g32_for_the_tied_output():
    """Q4_0's grid in the blocks, Q8_0's (8-bit symmetric groups of 32) for the table: a GGUF holds all as it is."""
    model = tiny_decoder()
    modelpress.compress(model, "llm-q4", calibration=windows(8))
    for name in block_linears(model):
        assert model.get_submodule(name).encoding.scheme == QuantScheme(4, True, 32)
    assert model.lm_head.encoding is model.model.embed_tokens.encoding
    assert model.lm_head.encoding.scheme == QuantScheme(8, True, 32)


def test_llm_q4_gptq_beats_round_to_nearest_in_the_same_format():
    import copy

    model, calibration = tiny_decoder(layers=3), windows(16, length=32)
    held_out = torch.cat([w["input_ids"] for w in windows(4, length=32, seed=7)])
    reference = logits(model, held_out)
    gptq = modelpress.compress(copy.deepcopy(model), "llm-q4", calibration=calibration)
    rtn = preset("llm-q4")
    rtn_recipe = modelpress.Recipe((Stage.of(RTNConfig(bits=4, symmetric=True, group_size=32, search="mse"),
                                             rtn.stages[0].targets), *rtn.stages[1:]))
    rounded = modelpress.compress(copy.deepcopy(model), rtn_recipe)
    error = {name: (logits(m, held_out) - reference).pow(2).mean().item() for name, m in
             (("gptq", gptq), ("rtn", rounded))}
    assert error["gptq"] < 0.8 * error["rtn"], error


# ---------------------------------------------------------------- AWQ on Llama blocks


def test_awq_on_llama_folds_scales_into_rmsnorm_and_up_rows_and_beats_rtn():
    import copy

    from modelpress.encodings.scaled import ChannelScaledTensor
    from modelpress.errors import ConfigError
    from modelpress.passes.awq import AWQConfig

    model, calibration = tiny_decoder(layers=2), windows(16, length=32)
    with torch.no_grad():  # salient input channels, as trained LLMs have: what AWQ protects
        for block in model.model.layers:
            block.input_layernorm.weight[:4] *= 10
            block.post_attention_layernorm.weight[4:8] *= 10
            block.mlp.up_proj.weight[:8] *= 10
    held_out = torch.cat([w["input_ids"] for w in windows(4, length=32, seed=7)])
    reference = logits(model, held_out)
    quant = {"bits": 3, "symmetric": True, "group_size": 32, "search": "mse"}
    awq = modelpress.compress(copy.deepcopy(model), {"lm_head": None, "*": AWQConfig(**quant)},
                              calibration=calibration)
    rtn = modelpress.compress(copy.deepcopy(model), {"lm_head": None, "*": RTNConfig(**quant)})
    for i in range(2):
        block, float_block = awq.model.layers[i], model.model.layers[i]
        for norm in ("input_layernorm", "post_attention_layernorm"):  # q/k/v and gate/up scales went here
            assert not torch.equal(getattr(block, norm).weight, getattr(float_block, norm).weight)
        # grouped-query attention: o_proj keeps its scale as an input multiply; every other layer's is folded
        assert isinstance(block.self_attn.o_proj.encoding, ChannelScaledTensor)
        for name in ("q_proj", "k_proj", "v_proj"):
            assert not isinstance(getattr(block.self_attn, name).encoding, ChannelScaledTensor)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert not isinstance(getattr(block.mlp, name).encoding, ChannelScaledTensor)
    error = {name: (logits(m, held_out) - reference).pow(2).mean().item() for name, m in
             (("awq", awq), ("rtn", rtn))}
    assert error["awq"] < 0.8 * error["rtn"], error
    with pytest.raises(ConfigError, match="'lm_head' shares its weight with 'model.embed_tokens'"):
        modelpress.compress(copy.deepcopy(model), AWQConfig(**quant), calibration=calibration)



def test_gptq_with_awq_scales_folds_them_first_and_beats_gptq_alone():
    import copy

    model, calibration = tiny_decoder(layers=2), windows(16, length=32)
    with torch.no_grad():  # salient input channels, as trained LLMs have
        for block in model.model.layers:
            block.input_layernorm.weight[:4] *= 10
            block.post_attention_layernorm.weight[4:8] *= 10
            block.mlp.up_proj.weight[:8] *= 10
    held_out = torch.cat([w["input_ids"] for w in windows(4, length=32, seed=7)])
    reference = logits(model, held_out)
    quant = {"bits": 3, "symmetric": True, "group_size": 32}
    plain = modelpress.compress(copy.deepcopy(model), {"lm_head": None, "*": GPTQConfig(**quant)}, calibration)
    scaled = modelpress.compress(copy.deepcopy(model), {"lm_head": None, "*": GPTQConfig(**quant, awq_grid=10)},
                                 calibration)
    block, float_block = scaled.model.layers[0], model.model.layers[0]
    assert not torch.equal(block.input_layernorm.weight, float_block.input_layernorm.weight)
    assert not torch.equal(block.post_attention_layernorm.weight, float_block.post_attention_layernorm.weight)
    log = "\n".join(modelpress.provenance(scaled).log)
    assert "model.layers.0.self_attn.o_proj: no awq scale (grouped-query attention" in log
    error = {name: (logits(m, held_out) - reference).pow(2).mean().item() for name, m in
             (("plain", plain), ("scaled", scaled))}
    assert error["scaled"] < 0.9 * error["plain"], error


def test_llm_q3_takes_4_bits_where_its_plan_says_and_3_elsewhere():
    model = tiny_decoder(layers=12)
    modelpress.compress(model, "llm-q3", calibration=windows(2))
    four = {("[0-9]", n) for n in ("k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")}
    four |= {("1[0-9]", n) for n in ("k_proj", "v_proj", "o_proj", "up_proj", "down_proj")}
    for i in range(12):
        for name in BLOCK:
            scheme = model.get_submodule(f"model.layers.{i}.{name}").encoding.scheme
            expected = 4 if ("[0-9]" if i < 10 else "1[0-9]", name.split(".")[1]) in four else 3
            assert scheme == QuantScheme(expected, True, 32), (i, name)
    assert model.lm_head.encoding is model.model.embed_tokens.encoding


def test_llm_q3_plan_applies_under_modelpress_own_causal_lm_wrapper(tmp_path):
    """The CLI and the store load a causal LM as modelpress's CausalLM, whose blocks are `model.model.layers.*`:
    the plan's 4-bit layers must be found there too (its patterns once matched transformers' names only, and
    such a model silently took 3 bits everywhere: SmolLM2 at 1.43x fp32 perplexity instead of 1.105x)."""
    from _tiny_lm import write_tiny_lm
    from modelpress.formats.models import load_model

    model = load_model(write_tiny_lm("llama", tmp_path / "lm"))
    assert model.get_submodule("model.model.layers.0.self_attn.k_proj") is not None
    ids = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(0))
    modelpress.compress(model, "llm-q3", calibration=[{"input_ids": ids}])
    assert model.get_submodule("model.model.layers.0.self_attn.k_proj").encoding.scheme == QuantScheme(4, True, 32)
    assert model.get_submodule("model.model.layers.0.self_attn.q_proj").encoding.scheme == QuantScheme(3, True, 32)
