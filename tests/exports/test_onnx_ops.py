"""One compressed Linear at a time: the ONNX stand-in run by ONNX Runtime against modelpress's own kernel
(fbgemm) on the same input. The activation grid must be modelpress's: the test input has a few large tokens,
so a per-call range where modelpress keeps one per token (or 255 levels where it uses 127) is visibly off."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from modelpress import DynamicInt8Config, RTNConfig, compress
from modelpress.exports.onnx_ops import OnnxDynamicLinear, onnx_stand_in

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 48)

    def forward(self, x):
        return self.fc(x)


def _input() -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(3, 7, 64)  # (B, T, C)
    x[0, 2] *= 40  # a token with huge activations, as BERT's [SEP] after GELU
    return x


def _ort(module: nn.Module, x: torch.Tensor, trace: torch.Tensor | None = None) -> torch.Tensor:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(module, (x if trace is None else trace,), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], do_constant_folding=False,
                          dynamic_axes={"x": {0: "batch", 1: "sequence"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


CONFIGS = {
    "per-call, 7-bit weights": DynamicInt8Config(),
    "per-token, 7-bit weights": DynamicInt8Config(activations="token"),
    "per-call, 8-bit weights": DynamicInt8Config(weight_bits=8),
    "per-token, 8-bit weights": DynamicInt8Config(weight_bits=8, activations="token"),
    "per-row, 7-bit weights": DynamicInt8Config(activations="row"),
    "per-row, 8-bit weights": DynamicInt8Config(weight_bits=8, activations="row"),
    "weight-only int8": RTNConfig(bits=8),
    "weight-only int4 g16": RTNConfig(bits=4, symmetric=False, group_size=16),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stand_in_computes_what_modelpress_computes(name):
    torch.manual_seed(0)
    model = compress(One().eval(), {"fc": CONFIGS[name]})
    x = _input()
    with torch.no_grad():
        want = model(x)
        float_error = (want - nn.functional.linear(x, model.fc.encoding.decode(), model.fc.bias)).abs().max()
    model.fc = onnx_stand_in("fc", model.fc)
    got = _ort(model, x)
    err = (got - want).abs().max()
    scale = want.abs().max()
    assert err <= 2e-3 * scale, (name, err, scale)
    if isinstance(model.fc, OnnxDynamicLinear):  # activations quantised: the grids must agree, not just be close
        assert err <= 0.1 * float_error, (name, err, float_error)
        if model.fc.per_row:  # modelpress's per-row arithmetic is ONNX's, operation for operation
            assert torch.equal(got, want), (name, err)


@pytest.mark.parametrize("bits", [7, 8])
def test_per_row_stand_in_is_bit_exact_at_other_shapes(bits):
    """The per-row graph at batch and sequence sizes other than the trace's, with a huge token, an
    all-zero token and rows skewed positive (as after GELU): ORT's output equals modelpress's, bit for bit."""
    torch.manual_seed(0)
    model = compress(One().eval(), {"fc": DynamicInt8Config(weight_bits=bits, activations="row")})
    xs = [_input(), torch.randn(1, 2, 64), torch.nn.functional.gelu(torch.randn(5, 11, 64) * 3)]
    xs[1][0, 1] = 0
    with torch.no_grad():
        wants = [model(x) for x in xs]
    model.fc = onnx_stand_in("fc", model.fc)
    for x, want in zip(xs, wants):
        assert torch.equal(_ort(model, x, trace=xs[0]), want)


@pytest.mark.parametrize("bits, levels", [(7, 255), (8, 127)])
def test_activation_levels_follow_fbgemms_rule(bits, levels):
    model = compress(One().eval(), {"fc": DynamicInt8Config(weight_bits=bits)})
    assert OnnxDynamicLinear(model.fc).levels == levels
