"""Malformed manifests and arrays end in the project's error, one line naming the problem: zero-size
dimensions, list-valued dtypes, numbers of thousands of digits, wrong types, NaN or infinity in
stored scales, zero points or biases."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_source import (_tiny_checkpoint_master, _tiny_source_master, edit_manifest, embeddings,  # noqa: F401
                          rewrite_weights, tiny_checkpoint, tiny_source)

from modelpress.compress import compress
from modelpress.errors import FormatError, ModelpressError
from modelpress.formats.checkpoint import load, save
from modelpress.formats.manifest import MANIFEST


def _first_module(checkpoint) -> str:
    return sorted(json.loads((checkpoint / MANIFEST).read_text())["modules"])[0]


def _load_fails(checkpoint, match: str | None = None, error=FormatError) -> str:
    with pytest.raises(error, match=match) as info:
        load(checkpoint)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("shape", [[0, 32], [32, 0], [0, 0], [0], []])
def test_zero_size_dimensions(tiny_checkpoint, shape):
    name = _first_module(tiny_checkpoint)
    edit_manifest(tiny_checkpoint, lambda m: m["modules"][name]["weight"].update(shape=shape))
    _load_fails(tiny_checkpoint)


@pytest.mark.parametrize("field, value", [
    ("shape", [[32], [32]]), ("shape", "32x32"), ("shape", [32.0, 32]), ("shape", [True, 32]), ("shape", {"a": 1}),
    ("bits", [8]), ("bits", "8"), ("bits", None), ("symmetric", [True]), ("group_size", [32]), ("group_size", -1),
    ("kind", ["quantized"]), ("kind", None),
])
def test_wrong_types_in_an_encoding(tiny_checkpoint, field, value):
    name = _first_module(tiny_checkpoint)
    edit_manifest(tiny_checkpoint, lambda m: m["modules"][name]["weight"].update({field: value}))
    _load_fails(tiny_checkpoint)


@pytest.mark.parametrize("edit", [
    lambda m, n: m["modules"][n].update(type=["linear"]),
    lambda m, n: m["modules"][n].update(kernel=["auto"]),
    lambda m, n: m["modules"][n].update(kernel=None),
    lambda m, n: m["modules"][n].update(weight=[1]),
    lambda m, n: m["modules"].update({n: [1, 2]}),
    lambda m, n: m.update(modules={"": m["modules"][n]}),
    lambda m, n: m.update(architecture=[]),
    lambda m, n: m.update(architecture={"kind": "unknown"}),
    lambda m, n: m.update(format=["modelpress.checkpoint"]),
    lambda m, n: m.update(shapes=[1]),
    lambda m, n: m.update(shapes={n: {"type": "linear", "size": [10**30, 1]}}),
    lambda m, n: m.update(entropy_coded=[1]),
    lambda m, n: m.update(entropy_coded={n: {"codec": "fans", "dtype": ["uint8"], "shape": [1], "symbol_bits": 8}}),
    lambda m, n: m.update(narrowed_floats={"dtype": ["float16"], "from": "float32", "names": []}),
    lambda m, n: m.update(narrowed_floats={"dtype": "float16", "from": "float32", "names": [["x"]]}),
])
def test_wrong_types_in_the_manifest(tiny_checkpoint, edit):
    name = _first_module(tiny_checkpoint)
    edit_manifest(tiny_checkpoint, lambda m: edit(m, name))
    _load_fails(tiny_checkpoint, error=ModelpressError)


@pytest.mark.parametrize("where", ["format_version", "shape", "group_size"])
def test_integers_of_5000_digits(tiny_checkpoint, where):
    name = _first_module(tiny_checkpoint)
    huge = "1" + "0" * 4999  # (Python itself refuses to convert ints of more than 4300 digits)
    manifest = json.loads((tiny_checkpoint / MANIFEST).read_text())
    if where == "format_version":
        manifest["format_version"] = "HUGE"
    else:
        manifest["modules"][name]["weight"][where] = ["HUGE", 32] if where == "shape" else "HUGE"
    (tiny_checkpoint / MANIFEST).write_text(json.dumps(manifest).replace('"HUGE"', huge))
    _load_fails(tiny_checkpoint, "integer of 5000 digits")


def _part(checkpoint, suffix: str) -> str:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "weights.safetensors"), "pt") as fh:
        return sorted(k for k in fh.keys() if k.endswith(suffix))[0]


@pytest.mark.parametrize("suffix", ["::scale", "::zero", ".bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scales_zero_points_and_biases_are_refused(tmp_path, tiny_source, suffix, value):
    from modelpress.formats.hf import load_sentence_encoder

    recipe = {"stages": [{"pass": "rtn", "targets": {"types": ["Linear"]}, "config": {"bits": 8, "symmetric": False}}]}
    checkpoint = save(compress(load_sentence_encoder(tiny_source), recipe), tmp_path / "asym")
    name = _part(checkpoint, suffix)

    def poison(tensors):
        flat = tensors[name].reshape(-1).clone()
        flat[0] = value
        tensors[name] = flat.reshape(tensors[name].shape)

    rewrite_weights(checkpoint, poison)
    message = _load_fails(checkpoint, "NaN or infinity")
    assert repr(name) in message


def test_nan_in_an_uncompressed_weight_still_loads(tiny_checkpoint):
    """Only parts no valid model holds non-finite are refused; a float weight is the model's own business."""
    name = "model.embeddings.LayerNorm.weight"

    def poison(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name][0] = float("nan")

    rewrite_weights(tiny_checkpoint, poison)
    assert torch.isnan(load(tiny_checkpoint).model.embeddings.LayerNorm.weight[0])


def test_stored_tensors_of_the_wrong_dtype_or_shape_are_refused(tiny_checkpoint):
    name = "model.embeddings.LayerNorm.bias"
    rewrite_weights(tiny_checkpoint, lambda t: t.update({name: t[name].double()}))
    _load_fails(tiny_checkpoint, f"tensor '{name}' is \\(32,\\) torch.float64, expected \\(32,\\) torch.float32")
    rewrite_weights(tiny_checkpoint, lambda t: t.update({name: t[name].float()[:16].contiguous()}))
    _load_fails(tiny_checkpoint, f"tensor '{name}' is \\(16,\\)")


def test_missing_and_unexpected_tensors_are_refused(tiny_checkpoint):
    rewrite_weights(tiny_checkpoint, lambda t: t.update({"extra.weight": torch.zeros(2)}))
    _load_fails(tiny_checkpoint, "unexpected \\['extra.weight'\\]")


def test_the_checkpoint_loads_when_nothing_is_wrong(tiny_checkpoint):
    assert torch.isfinite(embeddings(load(tiny_checkpoint))).all()
