"""GPTQ-format folders in: codes, scales and zero points as packed by an independent packer (tests/_gptq_folder.py),
decoded weights equal to the format's formula, the model's output equal to a float model of those weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modelpress.encodings import InputPermutedTensor, QuantizedTensor
from modelpress.errors import FormatError, UnsupportedError
from modelpress.formats.checkpoint import load, save
from modelpress.formats.gptq import gptq_format
from modelpress.formats.models import load_model
from modelpress.nn.modules import CompressedLinear
from _gptq_folder import Spec, pack_fields, write_gptq_folder


def _check_layers(lm, truth, spec: Spec) -> None:
    mid = 1 << (spec.bits - 1)
    for name, layer in truth.items():
        module = lm.model.get_submodule(name)
        assert isinstance(module, CompressedLinear), name
        enc = module.encoding
        q, g_idx = layer.q, layer.g_idx
        gs = q.shape[1] if spec.group_size == -1 else spec.group_size
        if not np.array_equal(g_idx, np.arange(q.shape[1]) // gs):  # act order: columns permuted into runs
            assert isinstance(enc, InputPermutedTensor)
            order = enc.order.numpy()
            assert np.array_equal(np.sort(g_idx[order]), g_idx[order])  # groups are runs in the inner order
            enc, q = enc.inner, q[:, order]
        assert isinstance(enc, QuantizedTensor)
        assert enc.scheme.bits == spec.bits
        assert np.array_equal(enc.int_codes().numpy(), q)
        assert np.array_equal(enc.scale.numpy(), layer.s.T)  # float16 as stored
        symmetric = spec.sym and spec.bits >= 3
        assert enc.scheme.symmetric is symmetric
        if symmetric:
            assert enc.zero is None and np.all(layer.z == mid)
        else:
            assert enc.zero.dtype == torch.float16 and np.array_equal(enc.zero.numpy(), layer.z.T)
        ref = layer.reference()
        assert np.array_equal(module.encoding.decode().numpy().astype(np.float64), ref), name
        assert np.array_equal(ref.astype(np.float32).astype(np.float64), ref)  # the formula is exact in float32


def _float_twin(folder, truth):
    """transformers' own model of the folder's float tensors and the reference GPTQ weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "quantization_config"}
    fields["dtype"] = "float32"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields), attn_implementation="sdpa").eval()
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()
             if k.rpartition(".")[2] not in ("qweight", "qzeros", "scales", "g_idx")}
    for name, layer in truth.items():
        w = torch.from_numpy(layer.reference()).float()
        state[f"{name}.weight"] = w.t() if type(model.get_submodule(name)).__name__ == "Conv1D" else w  # (in, out)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}  # tied to the table
    model.tie_weights()
    return model


SPECS = [Spec(bits=b, sym=sym, v1=v1) for b in (2, 3, 4, 8) for sym in (True, False) for v1 in (True, False)]


def _spec_id(s: Spec) -> str:
    return f"b{s.bits}-{'sym' if s.sym else 'asym'}-{'v1' if s.v1 else 'v2'}"


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_codes_scales_zeros_as_packed(tmp_path, spec):
    truth = write_gptq_folder(tmp_path, spec)
    _check_layers(load_model(tmp_path), truth, spec)


@pytest.mark.parametrize("spec", [Spec(bits=4, desc_act=True), Spec(bits=3, sym=False, desc_act=True, v1=False),
                                  Spec(bits=2, sym=False, group_size=64, desc_act=True),
                                  Spec(bits=8, group_size=-1), Spec(bits=4, group_size=64, in_config_json=False),
                                  Spec(bits=4, sym=False, arch="qwen2"), Spec(bits=3, arch="gpt2")],
                         ids=["desc_act", "desc_act-b3-asym-v2", "desc_act-b2-g64", "per-channel-b8",
                              "quantize_config.json", "qwen2-bias", "gpt2-conv1d"])
def test_layouts_and_model_output(tmp_path, spec):
    truth = write_gptq_folder(tmp_path, spec)
    lm = load_model(tmp_path)
    _check_layers(lm, truth, spec)
    ids = torch.tensor([[1, 40, 77, 120, 3, 200, 9, 15]])
    with torch.no_grad():
        ours, theirs = lm(ids).logits, _float_twin(tmp_path, truth)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


def test_config_json_drops_the_quantization_config_and_checkpoints_round_trip(tmp_path):
    spec = Spec(bits=3, sym=False, desc_act=True)
    truth = write_gptq_folder(tmp_path / "src", spec)
    lm = load_model(tmp_path / "src")
    config = json.loads(lm.support_files["config.json"])
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert {p.dtype for p in lm.parameters()} == {torch.float32}
    save(lm, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    _check_layers(again, truth, spec)
    ids = torch.tensor([[1, 5, 9, 100]])
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, again(ids).logits)


def test_store_put_and_load_keep_the_codes(tmp_path):
    from modelpress.store import Store

    spec = Spec(bits=4, sym=False, desc_act=True, v1=False)
    truth = write_gptq_folder(tmp_path / "src", spec)
    with Store.init(tmp_path / "store") as store:
        store.put(load_model(tmp_path / "src"), "tiny-gptq")
        _check_layers(store.load("tiny-gptq"), truth, spec)


def test_v1_all_ones_zero_fields_are_read_as_zero_with_a_warning(tmp_path):
    spec = Spec(bits=4, sym=False, v1=True, zero_zeros=True)
    truth = write_gptq_folder(tmp_path, spec)
    assert any((layer.z == 0).any() for layer in truth.values())
    with pytest.warns(UserWarning, match=r"stored as all ones, read as 0"):
        lm = load_model(tmp_path)
    _check_layers(lm, truth, spec)


def test_a_grouping_no_encoding_holds_is_loaded_as_exact_float_with_one_warning(tmp_path):
    spec = Spec(bits=4, desc_act=True)

    def scatter(tensors):  # layer 0's q_proj: every column in group 0 or 1, unevenly (a valid but odd g_idx)
        name = "model.layers.0.self_attn.q_proj"
        g = tensors[f"{name}.g_idx"].clone()
        g[:40], g[40:] = 0, 1
        tensors[f"{name}.g_idx"] = g

    truth = write_gptq_folder(tmp_path, spec, tamper=scatter)
    with pytest.warns(UserWarning, match=r"1 GPTQ layer\(s\) loaded as exact float.*q_proj.*group_size columns"):
        lm = load_model(tmp_path)
    layer = truth["model.layers.0.self_attn.q_proj"]
    layer.g_idx = np.where(np.arange(64) < 40, 0, 1)
    w = lm.model.get_submodule("model.layers.0.self_attn.q_proj").weight.detach()
    assert np.array_equal(w.numpy().astype(np.float64), layer.reference())


def test_packer_places_a_3_bit_field_across_two_words():
    values = np.zeros((1, 32), dtype=np.int64)
    values[0, 10] = 0b101  # bits 30..32 of the stream: two low bits in word 0, the high bit in word 1
    words = pack_fields(values, 3).view(np.uint32)
    assert words.tolist() == [[1 << 30, 1, 0]]


def test_gptq_format_reads_the_settings(tmp_path):
    write_gptq_folder(tmp_path, Spec(bits=3, group_size=64, sym=False, v1=False, desc_act=True))
    fmt = gptq_format(tmp_path)
    assert (fmt.bits, fmt.group_size, fmt.sym, fmt.v1, fmt.desc_act) == (3, 64, False, False, True)


# Hostile folders: one-line errors naming the problem.

def _edit(name, part, fn):
    def tamper(tensors):
        key = f"{name}.{part}"
        tensors[key] = fn(tensors[key])
    return tamper


Q = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("tamper, match", [
    (_edit(Q, "qweight", lambda t: t[:-1].clone()), r"qweight is \(15, 64\) torch.int32, expected \(16, 64\)"),
    (_edit(Q, "qzeros", lambda t: t.to(torch.int64)), r"qzeros is .* torch.int64, expected"),
    (_edit(Q, "scales", lambda t: t.float()), r"scales is \(4, 64\) torch.float32, expected \(4, 64\) torch.float16"),
    (_edit(Q, "scales", lambda t: t[:2].clone()), r"scales is \(2, 64\)"),
    (_edit(Q, "g_idx", lambda t: t + 1), r"g_idx names a group outside \[0, 4\)"),
    (_edit(Q, "scales", lambda t: torch.full_like(t, float("inf"))), r"a scale is not finite"),
    (lambda ts: ts.pop(f"{Q}.qzeros"), r"qzeros is missing"),
    (lambda ts: ts.update({"model.norm.qweight": torch.zeros(2, 64, dtype=torch.int32)}),
     r"'model.norm' holds GPTQ tensors but config.json has no Linear layer there"),
])
def test_tampered_tensors_are_one_line_format_errors(tmp_path, tamper, match):
    write_gptq_folder(tmp_path, Spec(bits=4), tamper=tamper)
    with pytest.raises(FormatError, match=match) as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("extra, error, match", [
    ({"bits": 5}, FormatError, r"bits 5 is not a GPTQ width modelpress reads \(2, 3, 4, 8\)"),
    ({"bits": "4"}, FormatError, r"bits is '4', not a int"),
    ({"group_size": 0}, FormatError, r"group_size 0 is neither -1 nor positive"),
    ({"checkpoint_format": "marlin"}, UnsupportedError, r"format 'marlin' is not read"),
    ({"pack_dtype": "int16"}, UnsupportedError, r"pack_dtype 'int16' is not read"),
    ({"dynamic": {"-:.*q_proj": {}}}, UnsupportedError, r"per-module GPTQ settings \(dynamic\)"),
])
def test_bad_settings_are_one_line_errors(tmp_path, extra, error, match):
    write_gptq_folder(tmp_path, Spec(bits=4, extra=extra))
    with pytest.raises(error, match=match) as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


def test_truncated_weights_file_is_a_format_error(tmp_path):
    write_gptq_folder(tmp_path, Spec(bits=4))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match=r"cover .* bytes of data") as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


def test_a_pickle_is_never_read(tmp_path):
    write_gptq_folder(tmp_path, Spec(bits=4))
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_model(tmp_path)


def test_a_folder_quantised_by_another_method_is_not_read_as_gptq(tmp_path):
    write_gptq_folder(tmp_path, Spec(bits=4))
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "awq"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert gptq_format(tmp_path) is None


# The CLI takes a GPTQ folder wherever it takes a model folder.

def test_cli_store_put_and_compress_take_a_gptq_folder(capsys, tmp_path):
    from modelpress.cli import main
    from modelpress.store import Store

    spec = Spec(bits=4, sym=False, desc_act=True)
    truth = write_gptq_folder(tmp_path / "src", spec)

    def run(*argv) -> str:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    run("store", "init", tmp_path / "store")
    run("store", "put", tmp_path / "store", tmp_path / "src", "tiny-gptq")
    with Store(tmp_path / "store") as store:
        _check_layers(store.load("tiny-gptq"), truth, spec)

    recipe = tmp_path / "embed.yaml"  # the GPTQ layers stay as they are; only the float embedding is quantised
    recipe.write_text("version: 1\nname: embed-int8\nstages:\n- pass: rtn\n  config: {bits: 8}\n"
                      "  targets: {include: ['*'], types: [Embedding]}\n")
    run("compress", tmp_path / "src", "--recipe", recipe, "--out", tmp_path / "q")
    compressed = load(tmp_path / "q")
    _check_layers(compressed, truth, spec)
    assert isinstance(compressed.model.model.embed_tokens.encoding, QuantizedTensor)

    code = main(["compress", str(tmp_path / "src"), "--recipe", "llm-int8", "--out", str(tmp_path / "q8")])
    assert code != 0 and "modules are compressed already" in capsys.readouterr().err


def test_autogptq_weights_named_after_model_file_base_name(tmp_path):
    spec = Spec(bits=4, in_config_json=False, extra={"model_file_base_name": "gptq_model-4bit-32g"})
    truth = write_gptq_folder(tmp_path, spec)
    (tmp_path / "model.safetensors").rename(tmp_path / "gptq_model-4bit-32g.safetensors")
    _check_layers(load_model(tmp_path), truth, spec)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32,
                                                               "model_file_base_name": "../outside"}))
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_model(tmp_path)
