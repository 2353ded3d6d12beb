"""The compressed module registry: each type is built from the layer it replaces plus an encoding, described
in a manifest and rebuilt from one; training stand-ins convert like their float type and refuse to be saved."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from modelpress.encodings import DenseTensor, QuantScheme, quantize
from modelpress.errors import ConfigError, FormatError
from modelpress.nn import CompressedConv2d, CompressedEmbedding, CompressedLinear, EmbeddingKernel, Kernel
from modelpress.nn.registry import (COMPRESSED_TYPES, KEEP, TrainingModule, check_saveable, compressed_twin, install,
                                    is_compressed, kind_of, module_entry, module_from_entry, replaced_name)
from modelpress.passes.qat import QATConfig, QATConv2d, QATLinear


def float_layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(16, 8),
        "embedding": nn.Embedding(20, 16, padding_idx=3),
        "conv2d": nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1, groups=2, bias=False),
    }


def int8(weight: torch.Tensor):
    return quantize(weight.detach(), QuantScheme(8, True, "channel"))


def test_the_three_types_are_registered_under_their_manifest_names():
    assert COMPRESSED_TYPES == {"linear": CompressedLinear, "embedding": CompressedEmbedding, "conv2d": CompressedConv2d}
    assert {n: replaced_name(c.__name__) for n, c in COMPRESSED_TYPES.items()} == {
        "linear": "Linear", "embedding": "Embedding", "conv2d": "Conv2d"}
    assert replaced_name("Linear") is None and replaced_name("QATLinear") is None


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv2d"])
def test_the_twin_of_a_float_layer_computes_what_the_layer_computes_with_its_weight(kind):
    layer = float_layers()[kind]
    twin = compressed_twin(layer, DenseTensor(layer.weight.detach().clone()))
    assert type(twin) is COMPRESSED_TYPES[kind] and kind_of(twin) == kind_of(layer) == kind and is_compressed(twin)
    x = {"linear": torch.randn(3, 16), "embedding": torch.tensor([[0, 3, 19]]), "conv2d": torch.randn(2, 4, 9, 9)}[kind]
    with torch.no_grad():
        assert torch.equal(twin(x), layer(x))


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv2d"])
def test_a_manifest_entry_rebuilds_the_same_module(kind):
    layer = float_layers()[kind]
    twin = compressed_twin(layer, int8(layer.weight))
    entry = json.loads(json.dumps(module_entry(twin)))  # what a checkpoint writes and reads back
    assert entry["type"] == kind and entry["weight"] == twin.encoding.meta()
    rebuilt = module_from_entry("m", entry, twin.encoding, layer)
    assert type(rebuilt) is type(twin) and module_entry(rebuilt) == module_entry(twin)
    if kind != "embedding":  # biases come from the state dict: the rebuilt module holds a placeholder
        rebuilt.load_state_dict(twin.state_dict())
    x = {"linear": torch.randn(3, 16), "embedding": torch.tensor([[0, 3, 19]]), "conv2d": torch.randn(2, 4, 9, 9)}[kind]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), twin(x))


def test_entries_that_do_not_fit_the_skeleton_are_refused():
    layers = float_layers()
    linear = compressed_twin(layers["linear"], int8(layers["linear"].weight))
    entry = module_entry(linear)
    with pytest.raises(FormatError, match=r"module 'm' is a Embedding in the model, not a Linear"):
        module_from_entry("m", entry, linear.encoding, nn.Embedding(8, 16))
    with pytest.raises(FormatError, match=r"module 'm' weight has shape \(8, 16\), the model expects \(8, 4\)"):
        module_from_entry("m", entry, linear.encoding, nn.Linear(4, 8))
    with pytest.raises(FormatError, match="module 'm' has an invalid entry"):
        module_from_entry("m", {**entry, "type": "lstm"}, linear.encoding, layers["linear"])
    with pytest.raises(FormatError, match="module 'm': 'warp' is not a valid Kernel"):
        module_from_entry("m", {**entry, "kernel": "warp"}, linear.encoding, layers["linear"])
    conv = compressed_twin(layers["conv2d"], int8(layers["conv2d"].weight))
    with pytest.raises(FormatError, match="invalid groups 0"):
        module_from_entry("c", {**module_entry(conv), "groups": 0}, conv.encoding, layers["conv2d"])


def test_a_twin_keeps_the_source_bias_unless_given_one_and_checks_the_shape():
    layer = float_layers()["linear"]
    assert torch.equal(compressed_twin(layer, int8(layer.weight)).bias, layer.bias)
    assert compressed_twin(layer, int8(layer.weight), bias=None).bias is None
    assert torch.equal(compressed_twin(layer, int8(layer.weight), bias=torch.ones(8)).bias, torch.ones(8))
    with pytest.raises(ConfigError, match=r"encoded weight has shape \(8, 8\), the layer expects \(8, 16\)"):
        compressed_twin(layer, int8(torch.randn(8, 8)))
    with pytest.raises(ConfigError, match="a LayerNorm has no compressed form"):
        compressed_twin(nn.LayerNorm(4), DenseTensor(torch.ones(4)))
    assert KEEP is not None


def test_a_compressed_source_keeps_its_kernel_where_it_can_run_the_new_weight():
    layer = float_layers()["linear"]
    dense = compressed_twin(layer, DenseTensor(layer.weight.detach().clone()), Kernel.DENSE)
    assert compressed_twin(dense, int8(layer.weight)).kernel is Kernel.DENSE
    int8_mm = compressed_twin(layer, int8(layer.weight), Kernel.INT8_WEIGHT_MM)
    assert compressed_twin(int8_mm, DenseTensor(layer.weight.detach().clone())).kernel is Kernel.AUTO
    table = compressed_twin(float_layers()["embedding"], int8(float_layers()["embedding"].weight))
    gather = CompressedEmbedding(table.encoding, 3, EmbeddingKernel.GATHER)
    assert compressed_twin(gather, DenseTensor(torch.zeros(20, 16))).kernel is EmbeddingKernel.AUTO


def test_install_swaps_the_named_layer_and_names_it_in_errors():
    model = nn.Sequential(float_layers()["linear"], nn.ReLU())
    twin = install(model, "0", int8(model[0].weight), Kernel.DENSE)
    assert model[0] is twin and twin.kernel is Kernel.DENSE
    with pytest.raises(ConfigError, match=r"^layer '1': a ReLU has no compressed form"):
        install(model, "1", DenseTensor(torch.ones(1)))


def test_training_stand_ins_convert_like_their_float_type_and_cannot_be_saved():
    layers = float_layers()
    linear, conv = QATLinear(layers["linear"], QATConfig(bits=4)), QATConv2d(layers["conv2d"], QATConfig(bits=4))
    assert isinstance(linear, TrainingModule) and kind_of(linear) == "linear" and kind_of(conv) == "conv2d"
    assert type(linear.to_compressed()) is CompressedLinear and type(conv.to_compressed()) is CompressedConv2d
    assert conv.to_compressed().stride == (2, 2) and conv.to_compressed().groups == 2
    model = nn.Sequential(linear)
    with pytest.raises(ConfigError, match=r"module '0' is still in quantisation-aware training: call convert_qat"):
        check_saveable(model)
    check_saveable(nn.Sequential(linear.to_compressed()))  # converted: fine
