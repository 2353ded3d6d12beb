"""GPTQ-format export: a GPTQ folder read and written back is the same tensors bit for bit; a modelpress RTN model
written as GPTQ unpacks (with the tests' own unpacker) to its codes, scales and zero points, and reads back to
the same codes and the same outputs. Models GPTQ cannot hold are refused with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _gptq_folder import Spec, unpack_fields, write_gptq_folder
from _tiny_lm import write_tiny_lm
from modelpress.compress import compress
from modelpress.encodings import InputPermutedTensor, QuantizedTensor, QuantScheme, quantize
from modelpress.errors import ConfigError, UnsupportedError
from modelpress.exports import export_model
from modelpress.exports.gptq import export_gptq, gptq_layer
from modelpress.formats.models import load_model
from modelpress.passes.quantize import RTNConfig

SPECS = [Spec(bits=2, sym=False), Spec(bits=3, sym=True, desc_act=True), Spec(bits=3, sym=False, v1=False),
         Spec(bits=4, sym=True), Spec(bits=4, sym=False, desc_act=True, v1=False), Spec(bits=8, group_size=-1),
         Spec(bits=8, sym=False, group_size=64), Spec(bits=4, sym=False, arch="qwen2"), Spec(bits=3, arch="gpt2")]


def _spec_id(s: Spec) -> str:
    return f"b{s.bits}-g{s.group_size}-{'sym' if s.sym else 'asym'}-{'v1' if s.v1 else 'v2'}-{s.arch}" + \
        ("-act" if s.desc_act else "")


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_a_gptq_folder_read_and_written_back_is_the_same_tensors(tmp_path, spec):
    write_gptq_folder(tmp_path / "src", spec)
    export_gptq(tmp_path / "src", tmp_path / "out", checkpoint_format="gptq" if spec.v1 else "gptq_v2")
    theirs = load_file(str(tmp_path / "src" / "model.safetensors"))
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    quantised = {k for k in theirs if k.rpartition(".")[2] in ("qweight", "qzeros", "scales", "g_idx")}
    assert quantised and quantised <= set(ours)
    for key in quantised:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    for key in set(theirs) - quantised:  # float16 in, float16 out: unchanged
        assert torch.equal(ours[key], theirs[key]), key
    settings = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert settings["bits"] == spec.bits and settings["group_size"] == spec.group_size
    assert settings["sym"] is (spec.sym and spec.bits >= 3) and settings["desc_act"] is spec.desc_act
    assert json.loads((tmp_path / "out" / "quantize_config.json").read_text())["bits"] == spec.bits


@pytest.mark.parametrize("quant, v1", [(dict(bits=4, symmetric=True, group_size=32), True),
                                       (dict(bits=4, symmetric=False, group_size=32), False),
                                       (dict(bits=3, symmetric=True, group_size="channel"), True),
                                       (dict(bits=2, symmetric=False, group_size=32), True),
                                       (dict(bits=8, symmetric=True, group_size="channel"), False)])
def test_a_modelpress_model_written_as_gptq_holds_its_codes_and_reads_back(tmp_path, quant, v1):
    lm = load_model(write_tiny_lm("llama", tmp_path / "float"))
    compress(lm, {"model.model.layers.*": RTNConfig(**quant)})
    with torch.no_grad():  # the float weights as a float16 folder holds them, so outputs can be compared exactly
        for p in lm.parameters():
            p.copy_(p.half().float())
    fmt = "gptq" if v1 else "gptq_v2"
    export_model(lm, "gptq", tmp_path / "out", checkpoint_format=fmt)
    files = load_file(str(tmp_path / "out" / "model.safetensors"))
    bits = quant["bits"]
    for name, module in lm.model.named_modules():
        if not name.startswith("model.layers.") or not isinstance(getattr(module, "encoding", None), QuantizedTensor):
            continue
        enc = module.encoding
        out_f, in_f = enc.shape
        q = unpack_fields(files[f"{name}.qweight"].numpy().T.copy(), bits, in_f)  # the tests' own unpacker
        assert np.array_equal(q, enc.int_codes().numpy())
        stored = unpack_fields(files[f"{name}.qzeros"].numpy(), bits, out_f)
        zero = (stored + int(v1)) % (1 << bits)
        assert np.array_equal(zero, enc.zero_points().numpy().T)
        assert torch.equal(files[f"{name}.scales"], enc.scale.t())
        g = in_f if quant["group_size"] == "channel" else quant["group_size"]
        assert np.array_equal(files[f"{name}.g_idx"].numpy(), np.arange(in_f) // g)
    again = load_model(tmp_path / "out")
    for name, module in lm.model.named_modules():
        if name.startswith("model.layers.") and isinstance(getattr(module, "encoding", None), QuantizedTensor):
            back = again.model.get_submodule(name).encoding
            assert torch.equal(back.codes, module.encoding.codes) and torch.equal(back.scale, module.encoding.scale)
            assert torch.equal(back.decode(), module.encoding.decode())
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, lm(ids).logits, atol=1e-5, rtol=1e-5)


def test_models_gptq_cannot_hold_are_refused_in_one_line(tmp_path):
    lm = load_model(write_tiny_lm("llama", tmp_path / "float"))
    with pytest.raises(UnsupportedError, match=r"layer 'model.layers.0.mlp.down_proj' is float") as info:
        export_gptq(lm, tmp_path / "a")
    assert "\n" not in str(info.value)
    compress(lm, {"model.model.layers.0.*": RTNConfig(bits=4, group_size=32),
                  "model.model.layers.1.*": RTNConfig(bits=8, group_size=32)})
    with pytest.raises(UnsupportedError, match=r"a GPTQ folder holds one bit width"):
        export_gptq(lm, tmp_path / "b")
    with pytest.raises(ConfigError, match=r"checkpoint format 'marlin'"):
        export_gptq(lm, tmp_path / "c", checkpoint_format="marlin")
    assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())


def test_a_fractional_zero_point_or_odd_width_has_no_gptq_form():
    enc = quantize(torch.randn(32, 64), QuantScheme(4, False, 32))
    half = QuantizedTensor(enc.codes, enc.scale, enc.zero + torch.tensor(0.5, dtype=torch.float16), enc.scheme,
                           enc.shape)
    assert gptq_layer(half) == "its zero points are not integers in [0, 2^bits)"
    narrow = quantize(torch.randn(12, 64), QuantScheme(3, True, 32))
    assert "does not fill 32-bit words" in gptq_layer(narrow)
    tensors, grid = gptq_layer(InputPermutedTensor(enc, torch.randperm(64)))
    assert grid == (4, 32, False) and sorted(np.bincount(tensors["g_idx"].numpy())) == [32, 32]


def test_cli_export_format_gptq(capsys, tmp_path):
    from modelpress.cli import main

    write_gptq_folder(tmp_path / "src", Spec(bits=4, sym=False, desc_act=True))
    assert main(["export", str(tmp_path / "src"), "--format", "gptq", "--out", str(tmp_path / "out"),
                 "--checkpoint-format", "gptq_v2"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["checkpoint_format"] \
        == "gptq_v2"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "src"), "--format", "hf", "--out", str(tmp_path / "hf"),
                 "--checkpoint-format", "gptq"]) != 0
    assert "--checkpoint-format apply to --format gptq only, not hf" in capsys.readouterr().err
