"""Named recipes, reached one way: `preset(name)` gives the Recipe, `preset_names()` lists them
(`compress(model, "int4")` goes through `preset`). Every preset quantises the embedding tables
too: they are half of a small transformer's bytes (MiniLM: 11.9M of its 22.7M parameters)."""

from __future__ import annotations

from modelpress.errors import RecipeError
from modelpress.recipe import Recipe

__all__ = ["DEFAULT_PRESET", "preset", "preset_names"]


def _stage(pass_name: str, types: list[str], config: dict, optional: bool = False,
           overrides: dict | None = None) -> dict:
    """One recipe stage as plain data: `pass_name` on the modules of `types`."""
    stage = {"pass": pass_name, "targets": {"types": types}, "config": config}
    if overrides:
        stage["overrides"] = overrides
    if optional:  # a model without such layers (e.g. no embedding table) is fine
        stage["optional"] = True
    return stage


def _asymmetric_mse(bits: int, group_size: int) -> dict:
    return {"bits": bits, "symmetric": False, "group_size": group_size, "search": "mse"}


# Embeddings stay int8 weight-only in the W8A8 presets: a lookup has no matmul to speed up.
_INT8_EMBEDDINGS = _stage("rtn", ["Embedding"], {"bits": 8, "group_size": "channel"}, optional=True)
_SMOOTHED = ("*.attention.self.value", "*.attention.output.dense", "*.intermediate.dense")

_PRESETS: dict[str, list[dict]] = {  # each preset's stages as plain data; read through preset()
    # Weight-only int8 per output channel (per row for embeddings): near-lossless, 4x smaller.
    "int8": [_stage("rtn", ["Linear", "Embedding"], {"bits": 8, "group_size": "channel"})],
    # Dynamic int8 activations x int8 weights on fbgemm for Linear layers (faster on CPU).
    "w8a8": [_stage("dynamic_int8", ["Linear"], {"group_size": "channel"}), _INT8_EMBEDDINGS],
    # W8A8 with SmoothQuant (needs calibration; without it a sentence encoder is calibrated on
    # calibration_sentences(128)). Measured on MiniLM (benchmarks/results_awq_smoothquant.md): the
    # FFN output projections carry most of w8a8's loss; their inputs (GELU outputs) have a few
    # tokens with huge activations, which per-channel smoothing from calibration maxima does not
    # fix on held-out sentences but a range per token does. `activations: auto` gives a range per
    # token only where calibration shows such tokens (MiniLM: the FFN outputs of blocks 0-3), since
    # it costs two passes over x. The value projections, attention outputs (folded into the values)
    # and FFN inputs are smoothed with alpha 0.6; smoothing q and k as well gains nothing measurable
    # and costs two more input multiplies per block.
    "w8a8-smooth": [
        _stage("dynamic_int8", ["Linear"], {"group_size": "channel", "activations": "auto"},
               overrides={pattern: {"smooth_alpha": 0.6, "activations": "tensor"} for pattern in _SMOOTHED}),
        _INT8_EMBEDDINGS,
    ],
    # w8a8-smooth with a symmetric range per row (token) in every Linear layer ("row", nn/kernels.py
    # quantize_rows): measured on MiniLM, mean cosine 0.9968 (w8a8-smooth: 0.9964). Its arithmetic is
    # reproduced bit for bit by the ONNX export, layer by layer (exports/onnx_ops.py), where fbgemm's
    # per-call quantiser is not (a fused multiply-add no ONNX operator has): the preset to export to
    # ONNX Runtime (MiniLM: mean cosine 0.9998 to modelpress's own model).
    "w8a8-token": [
        _stage("dynamic_int8", ["Linear"], {"group_size": "channel", "activations": "row"},
               overrides={pattern: {"smooth_alpha": 0.6, "activations": "row"} for pattern in _SMOOTHED}),
        _INT8_EMBEDDINGS,
    ],
    # 4-bit asymmetric groups with error-minimising ranges, ~7x smaller. Linear layers carry the
    # fidelity loss (measured on MiniLM: g64 alone gives mean cosine 0.970, g32 0.978), so they use
    # groups of 32; embedding rows lose little at g64 (0.9975).
    "int4": [_stage("rtn", ["Linear"], _asymmetric_mse(4, 32)),
             _stage("rtn", ["Embedding"], _asymmetric_mse(4, 64), optional=True)],
    # 3-bit groups of 64: smaller still, with a visible fidelity cost (see benchmarks/RESULTS.md).
    "int3": [_stage("rtn", ["Linear", "Embedding"], _asymmetric_mse(3, 64))],
}

# Decoder LLMs (Llama-family causal LMs). A tied token embedding and output layer are one weight: the
# embedding stage quantises it once and the output layer holds the same encoding; an untied output
# layer gets the same 8 bits from the second stage (llama.cpp too keeps the output layer at 6-8 bits:
# every token's logits go through it). The Linear layers of the blocks take the rest.
_LM_OUTPUT = ["lm_head", "*.lm_head"]


def _llm_embeddings(group_size: int | str = "channel") -> list[dict]:
    """The tied embedding/output table (and an untied output layer) at symmetric 8 bits, a scale per row or per
    `group_size` columns."""
    config = {"bits": 8, "symmetric": True, "group_size": group_size}
    return [_stage("rtn", ["Embedding"], config),
            {**_stage("rtn", ["Linear"], config, optional=True),
             "targets": {"types": ["Linear"], "include": _LM_OUTPUT}}]


_LLM_EMBEDDINGS = _llm_embeddings()
_BLOCK_LINEARS = {"types": ["Linear"], "ignore": _LM_OUTPUT}


def _gptq(bits: int, group_size: int, overrides: dict | None = None) -> dict:
    """GPTQ of the blocks' Linear layers: symmetric groups with float16 scales, act-order with static groups."""
    config = {"bits": bits, "symmetric": True, "group_size": group_size, "search": "mse", "act_order": True}
    stage = _stage("gptq", ["Linear"], config, overrides=overrides)
    return {**stage, "targets": _BLOCK_LINEARS}


_PRESETS.update({
    # Weight-only int8 per output channel everywhere (target: perplexity within 1.002x of fp32).
    "llm-int8": [*_LLM_EMBEDDINGS, _stage("rtn", ["Linear"], {"bits": 8, "group_size": "channel"})],
    # Q4_0's format for the blocks (4-bit symmetric groups of 32, float16 scales), and Q8_0's for the
    # embedding/output table (8-bit symmetric groups of 32, float16 scales): every weight is a llama.cpp
    # block as it is, so the GGUF export is bit-exact. SmolLM2-135M, 8 x 512 heldout tokens: llama.cpp's
    # perplexity of the export 17.460 against ours 17.422 (+0.22%, its 8-bit activation blocks); with the
    # former per-row int8 table, requantised to Q8_0 on export, 17.551 against 17.432 (+0.68%).
    # The blocks come first: GPTQ's calibration forwards then run a float output layer, not a compressed
    # one whose kernel would first be chosen by timing it on a whole calibration window.
    "llm-q4": [_gptq(4, 32), *_llm_embeddings(32)],
    # 3-bit symmetric groups of 32 (float16 scales) with 4 bits where they buy the most, under a size
    # budget: 88 MB for the whole checkpoint of SmolLM2-135M (below llama.cpp's smallest files of it,
    # Q3_K_S/Q2_K at 88.2 MB), less 3.6 MB of support files and the 8-bit tied embedding/output layer.
    # No 4-bit group-32 blocks with a float minimum (the base model's own Q4_1 grid). The plan is
    # benchmarks/plan_llm_q3.py's, measured on the dev text only: each layer type over blocks 0-9, 10-19
    # and 20-29 at 3 and 4 bits alone (next-token KL), the budget spent greedily. A model with other
    # layer names takes 3 bits everywhere (the patterns match nothing). The patterns start with `*.` so that
    # they match the blocks under transformers' `model.` and under modelpress's CausalLM (`model.model.`).
    "llm-q3": [_gptq(3, 32, overrides={f"*.layers.{blocks}.{layer}": {"bits": 4} for blocks, layer in (
        ("[0-9]", "self_attn.k_proj"), ("[0-9]", "self_attn.v_proj"), ("[0-9]", "mlp.gate_proj"),
        ("[0-9]", "mlp.up_proj"), ("[0-9]", "mlp.down_proj"),
        ("1[0-9]", "self_attn.k_proj"), ("1[0-9]", "self_attn.v_proj"), ("1[0-9]", "self_attn.o_proj"),
        ("1[0-9]", "mlp.up_proj"), ("1[0-9]", "mlp.down_proj"),
        ("2[0-9]", "self_attn.k_proj"), ("2[0-9]", "self_attn.v_proj"), ("2[0-9]", "self_attn.o_proj"),
        ("2[0-9]", "mlp.up_proj"), ("2[0-9]", "mlp.down_proj"),
    )}), *_LLM_EMBEDDINGS],
})

# W8A8 for decoder LLMs: fbgemm's int8 x int8 GEMM in the blocks (calibration needed), the tied embedding
# and output layer int8 weight-only as above. LLM activations have outlier channels and outlier tokens:
# SmoothQuant scales move the channels' range into the weights (folded into the RMSNorms and up_proj's
# rows; o_proj's a multiply under grouped-query attention: passes/channel_scales.py) and each token gets
# its own range. Chosen on SmolLM2-135M's dev text (3 windows of 512, calibrated on 8 other dev windows),
# perplexity vs fp32: one range per call 2.62x, a range per token 1.125x, plus smoothing at alpha 0.5
# 1.043x, at 0.8 1.032x (7-bit activations beside 8-bit weights: 1.045x at 0.5). Heldout (8 windows):
# 1.036x. o_proj and down_proj carry most of what is left: weight-only int8 there gave 1.007x on dev.
_W8A8_BLOCKS = {"group_size": "channel", "activations": "token", "smooth_alpha": 0.8}
_PRESETS["llm-w8a8"] = [*_LLM_EMBEDDINGS, {**_stage("dynamic_int8", ["Linear"], _W8A8_BLOCKS),
                                           "targets": _BLOCK_LINEARS}]

DEFAULT_PRESET = "int8"


def preset_names() -> list[str]:
    """The preset names, the default first."""
    return list(_PRESETS)


def preset(name: str) -> Recipe:
    """The recipe of a named preset (a new Recipe each call: change it freely)."""
    if name not in _PRESETS:
        raise RecipeError(f"unknown preset {name!r}: use one of {sorted(preset_names())} or a recipe YAML file")
    return Recipe.from_dict({"name": name, "stages": _PRESETS[name]})
