"""Quantised Hugging Face folders in the compressed-tensors format: our codes written bit-exact (checked
against compressed-tensors' own packing and unpacking), loaded by transformers on CPU."""

from __future__ import annotations

import json
import pytest
import torch

from _tiny_lm import write_tiny_lm
from modelpress import RTNConfig, compress
from modelpress.cli import main
from modelpress.errors import UnsupportedError
from modelpress.exports import export_model
from modelpress.exports.hf import hf_files
from modelpress.formats.checkpoint import save
from modelpress.formats.models import load_model

transformers = pytest.importorskip("transformers")
ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

MIXED = {"model.model.layers.1.mlp.*": RTNConfig(bits=8, symmetric=True, group_size="channel"),
         "model.model.layers.*": RTNConfig(bits=4, symmetric=True, group_size=32)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    lm = compress(load_model(write_tiny_lm("llama", root / "src")), MIXED)
    return lm, save(lm, root / "ckpt")


def _ids(lm):
    return torch.tensor([lm.tokenizer.encode("hello world, packed in int32 words")])


def test_packing_is_compressed_tensors_own(mixed):
    from modelpress.exports.hf_compressed import compressed_tensors_state

    lm, _ = mixed
    state, _ = compressed_tensors_state(lm.model, torch.float32)
    for name, module in lm.model.named_modules():
        enc = getattr(module, "encoding", None)
        if enc is None:
            continue
        signed = (enc.int_codes().to(torch.int16) - enc.scheme.midpoint).to(torch.int8)  # (R, C)
        want = ct_helpers.pack_to_int32(signed, enc.scheme.bits)
        assert torch.equal(state[f"{name}.weight_packed"], want)
        shape = torch.Size(enc.matrix_shape)
        assert torch.equal(ct_helpers.unpack_from_int32(state[f"{name}.weight_packed"], enc.scheme.bits, shape), signed)


def test_transformers_loads_it_on_cpu_with_modelpress_logits(mixed, tmp_path):
    lm, ckpt = mixed
    out = export_model(ckpt, "hf", tmp_path / "ct", dtype="float32", quantized=True)
    config = json.loads((out / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    assert sorted((g["weights"]["num_bits"], g["weights"]["strategy"]) for g in groups.values()) == \
        [(4, "group"), (8, "channel")]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_ids(lm)).logits, lm(_ids(lm)).logits, atol=1e-5, rtol=0)


def test_float16_folder_matches_within_rounding(mixed, tmp_path):
    lm, ckpt = mixed
    out = export_model(ckpt, "hf", tmp_path / "ct16", quantized=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = loaded(input_ids=_ids(lm)).logits, lm(_ids(lm)).logits
    assert (got - want).abs().max() <= 8 * 2**-10 * want.abs().max()  # only the float16 embedding differs


@pytest.mark.parametrize("config", [RTNConfig(bits=4, symmetric=False, group_size=32),
                                    RTNConfig(bits=3, symmetric=True, group_size=32)], ids=["asymmetric", "3-bit"])
def test_what_it_cannot_hold_is_refused(tmp_path, config):
    lm = compress(load_model(write_tiny_lm("llama", tmp_path / "src")), {"model.model.layers.*": config})
    with pytest.raises(UnsupportedError, match="llm-q4"):
        hf_files(lm, quantized=True)


def test_cli_writes_it(mixed, tmp_path, capsys):
    _, ckpt = mixed
    assert main(["export", str(ckpt), "--format", "hf", "--quantized", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]["format"] == \
        "pack-quantized"
    capsys.readouterr()
    assert main(["export", str(ckpt), "--format", "onnx", "--quantized", "--out", str(tmp_path / "bad")]) == 2
    assert "apply to --format hf only" in capsys.readouterr().err


def test_tied_output_layer_stays_the_embedding_table(tmp_path):
    lm = compress(load_model(write_tiny_lm("llama", tmp_path / "src")), "llm-int8")
    out = export_model(save(lm, tmp_path / "ckpt"), "hf", tmp_path / "ct", dtype="float32", quantized=True)
    targets = [t for g in json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
               for t in g["targets"]]
    assert targets and not any("lm_head" in t for t in targets)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_ids(lm)).logits, lm(_ids(lm)).logits, atol=1e-5, rtol=0)
