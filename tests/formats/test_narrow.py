"""Plain float parameters stored in half precision: smaller files, exact widening, hostile entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from modelpress.errors import ConfigError, FormatError
from modelpress.formats.checkpoint import MANIFEST, WEIGHTS, load, save
from modelpress.formats.narrow import NARROW_KEY, narrow_floats, widen_floats


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 8))


@pytest.mark.parametrize("dtype, torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_narrowed_checkpoint_loads_the_rounded_parameters(tmp_path, dtype, torch_dtype) -> None:
    model = _model()
    wide = save(model, tmp_path / "wide")
    narrow = save(model, tmp_path / f"narrow-{dtype}", float_params=dtype)
    assert (narrow / WEIGHTS).stat().st_size < 0.6 * (wide / WEIGHTS).stat().st_size
    loaded = load(narrow, model=_model())
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert q.dtype == torch.float32, name
        assert torch.equal(q, p.to(torch_dtype).float()), name  # exactly the rounded values
    assert json.loads((narrow / MANIFEST).read_text())[NARROW_KEY]["dtype"] == dtype


def test_only_float32_tensors_are_narrowed() -> None:
    tensors = {"a": torch.randn(3), "b": torch.arange(3), "c": torch.randn(2, dtype=torch.float64)}
    out, entry = narrow_floats(tensors, set(tensors), "float16")
    assert entry["names"] == ["a"] and out["b"] is tensors["b"] and out["c"] is tensors["c"]
    assert out["a"].dtype == torch.float16


def test_unknown_dtype_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="float_params 'int8'"):
        narrow_floats({"a": torch.randn(2)}, {"a"}, "int8")


@pytest.mark.parametrize("entry, message", [
    ([1], "malformed"),
    ({"dtype": "float8", "from": "float32", "names": []}, "malformed"),
    ({"dtype": "float16", "from": "float64", "names": []}, "malformed"),
    ({"dtype": "float16", "from": "float32", "names": ["missing"]}, "does not hold"),
    ({"dtype": "float16", "from": "float32", "names": [3]}, "does not hold"),
    ({"dtype": "float16", "from": "float32", "names": ["wide"]}, "the file holds torch.float32"),
])
def test_hostile_entries_raise_format_error(entry, message) -> None:
    tensors = {"wide": torch.randn(2), "half": torch.randn(2).half()}
    with pytest.raises(FormatError, match=message):
        widen_floats(tensors, entry, Path("ckpt"))
