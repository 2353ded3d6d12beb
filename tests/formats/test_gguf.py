"""GGUF files in: a tiny Llama written by gguf's own writer loads as transformers loads it, and every
hostile variation of it (truncated, oversized counts, tensors outside the file or overlapping, unknown
types, a tensor left out) is our one-line error before transformers' reader sees it."""

from __future__ import annotations

import os
import struct

import pytest
import torch

from _tiny_lm import write_tiny_gguf
from modelpress.errors import FormatError, ModelpressError, NotRegularFileError, UnsupportedError
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.checkpoint import load, save
from modelpress.formats.gguf import check_gguf, load_gguf
from modelpress.formats.models import load_model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(params=["ours", "transformers"])
def reader(request, monkeypatch):
    """Both ways a GGUF file is dequantised: ours (plain Llama files) and transformers' reader (the others)."""
    if request.param == "transformers":
        monkeypatch.setattr("modelpress.formats.gguf.llama_config", lambda metadata, names: None)
    return request.param


def test_loads_as_transformers_loads_it(tiny_gguf, reader):
    from transformers import AutoModelForCausalLM

    lm = load_model(tiny_gguf)
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    ids = torch.tensor([lm.tokenizer.encode("hello world")])
    assert isinstance(lm, CausalLM) and lm.source == tiny_gguf
    assert torch.equal(lm(ids).logits, reference(ids).logits)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # no output.weight: tied
    assert set(lm.support_files) >= {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


def test_gguf_model_rebuilds_from_its_derived_files(tiny_gguf, tmp_path, reader):
    lm = load_gguf(tiny_gguf)
    ids = torch.tensor([lm.tokenizer.encode("the weights")])
    save(lm, tmp_path / "ck")
    again = load(tmp_path / "ck")
    assert torch.equal(again(ids).logits, lm(ids).logits)
    assert torch.equal(again.generate(ids, max_new_tokens=6, do_sample=False),
                       lm.generate(ids, max_new_tokens=6, do_sample=False))
    assert again.tokenizer.encode("the weights") == lm.tokenizer.encode("the weights")


def test_header_is_read(tiny_gguf):
    info = check_gguf(tiny_gguf)
    assert info.version == 3 and info.metadata["general.architecture"] == "llama"
    assert len(info.tensors) == 2 + 2 * 9  # embedding, final norm, 9 per block
    ends = sorted((t.offset, t.offset + t.nbytes) for t in info.tensors)
    assert ends[-1][1] <= tiny_gguf.stat().st_size and ends[0][0] == info.data_offset


def _first_tensor_fields(data: bytes) -> int:
    """Offset of the first tensor's n_dims field (the table starts with the token embedding)."""
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name)
    return at + 8 + len(name)


def _mutations(data: bytes):
    t = _first_tensor_fields(data)
    n_dims = struct.unpack_from("<I", data, t)[0]
    after_dims = t + 4 + 8 * n_dims

    def patch(offset: int, fmt: str, value) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, offset, value)
        return bytes(out)

    return {
        "bad magic": b"GGUX" + data[4:],
        "truncated header": data[:20],
        "truncated metadata": data[:200],
        "truncated tensor table": data[:t + 6],
        "truncated data": data[:-10],
        "tensor count": patch(8, "<Q", 1 << 60),
        "metadata count": patch(16, "<Q", 1 << 40),
        "key length": patch(24, "<Q", 1 << 62),
        "no dimensions": patch(t, "<I", 0),
        "many dimensions": patch(t, "<I", 9),
        "zero dimension": patch(t + 4, "<Q", 0),
        "unknown type": patch(after_dims, "<I", 9999),
        "offset past the end": patch(after_dims + 4, "<Q", 1 << 40),
        "unaligned offset": patch(after_dims + 4, "<Q", 3),
    }


@pytest.mark.parametrize("case", ["bad magic", "truncated header", "truncated metadata", "truncated tensor table",
                                  "truncated data", "tensor count", "metadata count", "key length", "no dimensions",
                                  "many dimensions", "zero dimension", "unknown type", "offset past the end",
                                  "unaligned offset"])
def test_hostile_header_is_refused(tiny_gguf, tmp_path, case):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_mutations(tiny_gguf.read_bytes())[case])
    with pytest.raises((FormatError, UnsupportedError)) as info:
        load_model(bad)
    assert "\n" not in str(info.value)


def test_overlapping_tensors_are_refused(tiny_gguf, tmp_path):
    data = bytearray(tiny_gguf.read_bytes())
    info = check_gguf(tiny_gguf)
    first, second = sorted(info.tensors, key=lambda t: t.offset)[:2]
    name = second.name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<Q", data, at + 4 + 8 * n_dims + 4, first.offset - info.data_offset)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="overlap"):
        check_gguf(bad)


def test_unsupported_version(tiny_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:4] + struct.pack("<I", 99) + tiny_gguf.read_bytes()[8:])
    with pytest.raises(UnsupportedError, match="version 99"):
        load_model(bad)


@pytest.mark.parametrize("drop", ["blk.1.ffn_up.weight", "output_norm.weight"])
def test_a_missing_tensor_is_refused_not_initialised_at_random(tmp_path, reader, drop):
    path = write_tiny_gguf(tmp_path / "holed.gguf", drop=drop)
    check_gguf(path)  # the file itself is well formed
    with pytest.raises(FormatError, match="do not match|more weights than the file"):
        load_gguf(path)


def test_links_and_fifos_are_refused(tiny_gguf, tmp_path):
    link = tmp_path / "link.gguf"
    link.symlink_to(tiny_gguf)
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    for path in (link, fifo):
        with pytest.raises(NotRegularFileError):
            load_model(path)


def test_a_model_transformers_cannot_build_is_our_error(tiny_gguf, tmp_path, reader):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data.replace(b"tokenizer.ggml.scores", b"tokenizer.ggml.score_", 1))  # a key it needs, renamed
    with pytest.raises(ModelpressError, match="transformers cannot (build|read)"):
        load_model(bad)
