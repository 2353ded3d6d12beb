"""CompressedConv2d: exact against F.conv2d on the decoded weight, rtn and the presets on convs,
and checkpoints of conv layers (exact round trip, tampered geometry refused)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress
from modelpress.encodings import DenseTensor, QuantizedTensor, QuantScheme, quantize
from modelpress.errors import ConfigError, FormatError
from modelpress.formats.checkpoint import MANIFEST
from modelpress.nn import CompressedConv2d, CompressedLinear
from modelpress.presets import preset


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one intra-op thread is fastest, and immune to other jobs on shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# (in, out, kernel, stride, padding, dilation, groups, bias)
GEOMETRIES = {
    "3x3-pad1": (4, 8, 3, 1, 1, 1, 1, True),
    "3x3-stride2-nobias": (4, 8, 3, 2, 0, 1, 1, False),
    "5x5-pad2-stride2": (3, 6, 5, 2, 2, 1, 1, True),
    "rect-3x1-asym-pad": (4, 4, (3, 1), (1, 2), (1, 0), 1, 1, True),
    "dilated": (4, 8, 3, 1, 2, 2, 1, True),
    "grouped": (8, 12, 3, 1, 1, 1, 4, True),
    "depthwise": (8, 8, 3, 1, 1, 1, 8, False),
    "pointwise": (16, 8, 1, 1, 0, 1, 1, True),
    "same": (4, 8, 3, 1, "same", 1, 1, True),
    "valid": (4, 8, 3, 1, "valid", 1, 1, True),
}

SCHEMES = {
    "int8-sym-channel": QuantScheme(8, True, "channel"),
    "int4-asym-channel": QuantScheme(4, False, "channel"),
    "int3-asym-tensor": QuantScheme(3, False, "tensor"),
    "int2-asym-channel": QuantScheme(2, False, "channel"),
}


def make_conv(geometry: str, seed: int = 0) -> nn.Conv2d:
    cin, cout, k, stride, padding, dilation, groups, bias = GEOMETRIES[geometry]
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias)


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_equals_f_conv2d_on_the_decoded_weight(geometry, scheme):
    conv = make_conv(geometry)
    enc = quantize(conv.weight.data, scheme)
    layer = CompressedConv2d.from_conv(conv, enc)
    x = torch.randn(2, conv.in_channels, 9, 10, generator=gen(1))
    bias = None if conv.bias is None else conv.bias.data
    expected = F.conv2d(x, enc.decode(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    out = layer(x)
    assert torch.equal(out, expected)
    assert not torch.equal(out, conv(x).detach())  # the quantised weight really is used


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_dense_encoding_reproduces_nn_conv2d_exactly(geometry):
    conv = make_conv(geometry)
    layer = CompressedConv2d.from_conv(conv, DenseTensor(conv.weight.data.clone()))
    x = torch.randn(3, conv.in_channels, 8, 8, generator=gen(2))
    assert torch.equal(layer(x), conv(x).detach())
    assert (layer.in_channels, layer.out_channels, layer.kernel_size) == (conv.in_channels, conv.out_channels,
                                                                          conv.kernel_size)


def test_decodes_once_lazily_and_releases():
    conv = make_conv("3x3-pad1")
    layer = CompressedConv2d.from_conv(conv, quantize(conv.weight.data, QuantScheme(4, False)))
    assert layer._dense is None  # building is cheap: nothing decoded yet
    x = torch.randn(1, 4, 5, 5, generator=gen(3))
    first = layer(x)
    dense = layer._dense
    assert dense is not None and torch.equal(dense, layer.weight)
    layer(x)
    assert layer._dense is dense  # not decoded again
    layer.release()
    assert layer._dense is None and torch.equal(layer(x), first)


def test_weight_repr_and_no_trainable_state():
    conv = make_conv("grouped")
    enc = quantize(conv.weight.data, QuantScheme(4, False, 9))
    layer = CompressedConv2d.from_conv(conv, enc)
    assert torch.equal(layer.weight, enc.decode()) and layer.weight.shape == (12, 2, 3, 3)
    text = repr(layer)
    assert "8, 12, kernel_size=(3, 3)" in text and "groups=4" in text and "encoding=int4 asym g9" in text
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    assert torch.equal(layer.bias, conv.bias.data) and layer.bias.data_ptr() != conv.bias.data_ptr()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CompressedConv2d(DenseTensor(torch.zeros(8, 36))), "must be 4-D"),
        (lambda: CompressedConv2d(DenseTensor(torch.zeros(6, 1, 3, 3)), groups=4), "does not divide the 6 output"),
        (lambda: CompressedConv2d(DenseTensor(torch.zeros(6, 1, 3, 3)), groups=0), "groups must be a positive int"),
        (lambda: CompressedConv2d(DenseTensor(torch.zeros(6, 1, 3, 3)), padding="full"), "padding 'full'"),
        (lambda: CompressedConv2d(DenseTensor(torch.zeros(6, 1, 3, 3)), padding=-1), "padding must be"),
        (lambda: CompressedConv2d(DenseTensor(torch.zeros(6, 1, 3, 3)), stride=(1, 0)), "stride must be"),
        (lambda: CompressedConv2d(DenseTensor(torch.zeros(6, 1, 3, 3)), dilation=(1, 1, 1)), "dilation must be"),
        (lambda: CompressedConv2d(DenseTensor(torch.zeros(6, 1, 3, 3)), stride=2, padding="same"), "needs stride 1"),
        (lambda: CompressedConv2d(DenseTensor(torch.zeros(6, 1, 3, 3)), torch.zeros(5)), "bias has shape"),
        (lambda: CompressedConv2d.from_conv(nn.Conv2d(2, 2, 3, padding_mode="reflect"),
                                            DenseTensor(torch.zeros(2, 2, 3, 3))), "padding_mode 'reflect'"),
        (lambda: CompressedConv2d.from_conv(nn.Conv2d(2, 2, 3), DenseTensor(torch.zeros(2, 2, 1, 1))), "expects"),
    ],
)
def test_invalid_geometry_is_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


# ---------------------------------------------------------------- passes and presets on convs


class ConvNet(nn.Module):
    """Two convs (576 weights per output channel) and a head (64): every preset's group size divides."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(64, 64, 3, padding=1)
        self.body = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64, H, W) -> (B, 10)
        h = self.body(torch.relu(self.stem(x)))  # (B, 64, H, W)
        return self.head(h.mean((2, 3)))


X = torch.randn(2, 64, 6, 6, generator=gen(5))


def with_conv_types(recipe: dict) -> dict:
    """A preset whose stages that select Linear also select Conv2d."""
    recipe = copy.deepcopy(recipe)
    for stage in recipe["stages"]:
        types = stage.get("targets", {}).get("types", [])
        if "Linear" in types:
            stage["targets"]["types"] = ["Conv2d", *types]
    return recipe


@pytest.mark.parametrize(("name", "min_cosine"), [("int8", 0.9999), ("int4", 0.99), ("int3", 0.95)])
def test_presets_compress_convs_when_their_selector_includes_them(name, min_cosine):
    model = ConvNet()
    with torch.no_grad():
        before = model(X)
    modelpress.compress(model, with_conv_types(preset(name).to_dict()))
    assert isinstance(model.stem, CompressedConv2d) and isinstance(model.body, CompressedConv2d)
    assert isinstance(model.head, CompressedLinear)
    reference = ConvNet()
    for conv in (model.stem, model.body):
        assert isinstance(conv.encoding, QuantizedTensor)
        assert conv.encoding.scheme == model.head.encoding.scheme  # the Linear stage's scheme
        assert conv.encoding.bits_per_weight < 9
    assert torch.equal(model.stem.bias, reference.stem.bias.data) and model.body.bias is None
    with torch.no_grad():
        after = model(X)
    assert F.cosine_similarity(after, before, dim=-1).min() > min_cosine


def test_presets_leave_convs_alone_by_default():
    model = modelpress.compress(ConvNet(), "int4")
    assert type(model.stem) is nn.Conv2d and isinstance(model.head, CompressedLinear)


def test_rtn_names_the_conv_whose_width_the_group_size_does_not_divide():
    model = nn.Sequential(nn.Conv2d(1, 8, 3))  # 9 weights per output channel
    recipe = {"stages": [{"pass": "rtn", "targets": {"types": ["Conv2d"]}, "config": {"bits": 4, "group_size": 32}}]}
    with pytest.raises(ConfigError, match=r"layer '0': group size 32 does not divide the input width 9"):
        modelpress.compress(model, recipe)


def test_rtn_names_a_conv_with_an_unsupported_padding_mode():
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1, padding_mode="circular"))
    with pytest.raises(ConfigError, match=r"layer '0': conv padding_mode 'circular'"):
        modelpress.compress(model, {"stages": [{"pass": "rtn", "targets": {"types": ["Conv2d"]}}]})


# ---------------------------------------------------------------- checkpoints


class GeometryNet(nn.Module):
    """One conv of each geometry that keeps the spatial size, in sequence."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False)
        self.c = nn.Conv2d(8, 12, (3, 1), padding=(2, 0), dilation=(2, 1), groups=4)
        self.d = nn.Conv2d(12, 6, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.c(self.b(self.a(x))))


XG = torch.randn(2, 4, 7, 7, generator=gen(6))
RTN_CONVS = {"stages": [{"pass": "rtn", "targets": {"types": ["Conv2d"]},
                         "config": {"bits": 4, "symmetric": False, "search": "mse"}}]}


@pytest.mark.parametrize(
    "recipe",
    [RTN_CONVS, with_conv_types(preset("int8").to_dict()),
     {"stages": [{"pass": "rtn", "targets": {"types": ["Conv2d"]}, "config": {"bits": 2, "symmetric": False}}]}],
    ids=["int4-mse", "int8-preset", "int2"],
)
def test_save_load_round_trip_is_bit_identical(tmp_path, recipe):
    skeleton = GeometryNet()
    model = modelpress.compress(GeometryNet(), recipe)
    with torch.no_grad():
        expected = model(XG)
    path = modelpress.save(model, tmp_path / "ckpt")
    loaded = modelpress.load(path, model=skeleton)
    assert all(isinstance(getattr(loaded, n), CompressedConv2d) for n in "abcd")
    for n in "abcd":
        got, want = getattr(loaded, n), getattr(model, n)
        assert (got.stride, got.padding, got.dilation, got.groups) == (want.stride, want.padding, want.dilation,
                                                                      want.groups)
        for part, array in want.encoding.arrays().items():
            assert torch.equal(got.encoding.arrays()[part], array), (n, part)
    with torch.no_grad():
        assert torch.equal(loaded(XG), expected)
    entry = json.loads((Path(path) / MANIFEST).read_text())["modules"]["c"]
    assert {k: v for k, v in entry.items() if k != "weight"} == {
        "type": "conv2d", "kernel_size": [3, 1], "stride": [1, 1], "padding": [2, 0], "dilation": [2, 1],
        "groups": 4, "bias": True}


@pytest.mark.parametrize(
    ("module", "field", "value", "message"),
    [
        ("a", "kernel_size", [3, 1], "kernel_size"),
        ("a", "kernel_size", None, "kernel_size"),
        ("a", "groups", 0, "invalid groups"),
        ("a", "groups", True, "invalid groups"),
        ("a", "groups", "1", "invalid groups"),
        ("a", "groups", 2, "input channels"),  # 4 channels claimed as 2 groups of 4 would need 8
        ("a", "bias", False, "bias"),
        ("b", "bias", "no", "invalid groups"),
        ("a", "stride", [0, 1], "stride must be"),
        ("a", "stride", 2, "invalid stride"),
        ("a", "padding", [-1, 0], "padding must be"),
        ("a", "padding", "full", "padding 'full'"),
        ("a", "padding", {"x": 1}, "invalid padding"),
        ("a", "dilation", [1, 2**40], "dilation must be"),
        ("d", "padding", "same", "needs stride 1"),
        ("a", "type", "conv3d", "invalid entry"),
    ],
)
def test_tampered_conv_entries_are_refused(tmp_path, module, field, value, message):
    path = modelpress.save(modelpress.compress(GeometryNet(), RTN_CONVS), tmp_path / "ckpt")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["modules"][module][field] = value
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=message):
        modelpress.load(path, model=GeometryNet())


def test_conv_entry_on_a_linear_module_is_refused(tmp_path):
    path = modelpress.save(modelpress.compress(ConvNet(), with_conv_types(preset("int8").to_dict())), tmp_path / "ckpt")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["modules"]["head"] = manifest["modules"]["stem"] | {"weight": manifest["modules"]["head"]["weight"]}
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="'head' is a Linear in the model, not a Conv2d"):
        modelpress.load(path, model=ConvNet())
