"""tensorfile: safetensors written byte for byte as the reference writer does, read back by the
reference reader, and hostile headers refused before any tensor is made."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as reference_load
from safetensors.torch import save as reference_save

from modelpress.errors import FormatError, LimitExceededError
from modelpress.formats.tensorfile import DTYPES, parse, serialise


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "fc.weight": torch.randn(3, 5),
        "fc.bias": torch.randn(3).to(torch.float16),
        "emb.weight::codes": torch.randint(0, 255, (7, 3), dtype=torch.uint8),
        "emb.weight::scale": torch.rand(7, 1).to(torch.bfloat16),
        "ids": torch.arange(6, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "i16": torch.tensor([-300], dtype=torch.int16),
        "i32": torch.tensor([1 << 20], dtype=torch.int32),
    }


def _bytes(parts) -> bytes:
    return b"".join(bytes(p) for p in parts)


def test_bytes_are_the_reference_writers():
    tensors = _tensors()
    metadata = {"format": "pt"}  # (with more keys the reference writes them in hash order, changing run to run)
    assert _bytes(serialise(tensors, metadata)) == reference_save(tensors, metadata=metadata)


def test_metadata_is_written_sorted_and_read_back_by_the_reference(tmp_path):
    from safetensors import safe_open

    metadata = {"writer": "modelpress", "format": "pt", "b": "c"}
    data = _bytes(serialise({"a": torch.ones(2)}, metadata))
    assert b'{"__metadata__":{"b":"c","format":"pt","writer":"modelpress"}' in data
    assert reference_load(data)["a"].tolist() == [1.0, 1.0]
    (tmp_path / "w.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as fh:
        assert fh.metadata() == metadata


def test_reference_reader_and_ours_read_the_same_tensors():
    tensors = _tensors()
    data = _bytes(serialise(tensors))
    for back in (reference_load(data), parse(bytearray(data), "t")):
        assert set(back) == set(tensors)
        for name, tensor in tensors.items():
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_parsed_tensors_are_views_of_the_buffer():
    data = bytearray(_bytes(serialise({"w": torch.ones(1000)})))
    w = parse(data, "t")["w"]
    data[-4:] = struct.pack("<f", 7.0)
    assert w[-1].item() == 7.0  # no second copy of the weights


def test_non_contiguous_tensors_are_written_as_their_values():
    view = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(parse(bytearray(_bytes(serialise({"v": view}))), "t")["v"], view)


def test_unsupported_dtype_is_refused():
    with pytest.raises(FormatError, match="cannot hold"):
        serialise({"c": torch.zeros(2, dtype=torch.complex64)})


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.tuples(st.sampled_from(sorted(DTYPES)),
                                                                   st.lists(st.integers(0, 4), max_size=3)), max_size=5))
def test_any_tensors_round_trip_through_both_readers(spec):
    tensors = {name: torch.zeros(shape, dtype=DTYPES[dtype]) for name, (dtype, shape) in spec.items()}
    data = _bytes(serialise(tensors))
    assert data == reference_save(tensors)
    back = parse(bytearray(data), "t")
    assert {k: (v.dtype, v.shape) for k, v in back.items()} == {k: (v.dtype, v.shape) for k, v in tensors.items()}


def _file(header: dict, data: bytes = b"", pad: bool = True) -> bytearray:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return bytearray(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("buffer, message", [
    (bytearray(b"\x01\x00"), "shorter than its 8-byte header length"),
    (bytearray(struct.pack("<Q", 1 << 60) + b"{}"), "header claims"),
    (bytearray(struct.pack("<Q", 4) + b"[1] "), "not a JSON object"),
    (bytearray(struct.pack("<Q", 4) + b"{{{{"), "not valid JSON"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "cover 8 bytes"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "cover 4 bytes"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlapping or with a hole"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "starts at 4"),
    (_file({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8), "does not fill"),
    (_file({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "invalid shape"),
    (_file({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4), "invalid shape"),
    (_file({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "dtype"),
    (_file({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype 'C64'"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4), "data_offsets"),
    (_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4), "data_offsets"),
    (_file({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "invalid header entry"),
    (_file({"__metadata__": {"k": 1}}), "__metadata__"),
    (_file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}), "cover 1 bytes of data, the file holds 0"),
])
def test_hostile_headers_are_refused(buffer, message):
    with pytest.raises(FormatError, match=message):
        parse(buffer, "w.safetensors")


def test_deep_header_is_refused_before_parsing():
    text = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(LimitExceededError, match="levels deep"):
        parse(bytearray(struct.pack("<Q", len(text)) + text), "w.safetensors")


def test_unaligned_tensor_is_copied_not_misread():
    buffer = _file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]}}, b"\x07" + struct.pack("<f", 1.5))
    back = parse(buffer, "t")
    assert back["a"].item() == 7 and back["b"].item() == 1.5
