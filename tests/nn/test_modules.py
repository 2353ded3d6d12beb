"""CompressedLinear and CompressedEmbedding as drop-in modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.encodings import DenseTensor, QuantScheme, quantize
from modelpress.errors import ConfigError
from modelpress.nn import CompressedEmbedding, CompressedLinear, EmbeddingKernel, Kernel


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def table(rows: int = 20, dim: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, dim, generator=gen(seed))


# ---------------------------------------------------------------- CompressedLinear


def test_from_linear_keeps_bias_and_matches_the_dense_layer_exactly():
    lin = nn.Linear(32, 12)
    layer = CompressedLinear.from_linear(lin, DenseTensor(lin.weight.data.clone()), Kernel.DENSE)
    assert (layer.in_features, layer.out_features) == (32, 12)
    assert isinstance(layer.bias, nn.Parameter) and not layer.bias.requires_grad
    assert torch.equal(layer.bias, lin.bias.data)
    assert layer.bias.data_ptr() != lin.bias.data_ptr()  # a copy, not a view of the old layer
    x = torch.randn(4, 32, generator=gen(1))
    assert torch.equal(layer(x), lin(x).detach())


def test_from_linear_without_bias():
    lin = nn.Linear(16, 8, bias=False)
    layer = CompressedLinear.from_linear(lin, quantize(lin.weight.data, QuantScheme(8)), "int8_mm")
    assert layer.bias is None
    x = torch.randn(3, 16, generator=gen(1))
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=0, atol=1e-5)


def test_weight_property_is_the_decoded_encoding():
    enc = quantize(table(12, 32), QuantScheme(4, False, 16))
    assert torch.equal(CompressedLinear(enc).weight, enc.decode())


def test_prepare_release_and_repr():
    enc = quantize(table(16, 32), QuantScheme(8))
    layer = CompressedLinear(enc, None, "int8_mm")
    assert "kernel=int8_mm" in repr(layer) and "encoding=int8 sym per-channel" in repr(layer)
    assert layer.prepare() is Kernel.INT8_WEIGHT_MM and layer.resolved_kernel is Kernel.INT8_WEIGHT_MM
    layer.release()
    assert layer.resolved_kernel is None and layer._runs == {}
    assert layer(torch.zeros(1, 32)).shape == (1, 16)
    assert layer.resolved_kernel is Kernel.INT8_WEIGHT_MM


@pytest.mark.parametrize("shape", [(4, 2, 2, 2), (32,)])
def test_linear_weight_must_be_2d(shape):
    with pytest.raises(ConfigError, match="a linear weight must be 2-D, got shape"):
        CompressedLinear(quantize(torch.randn(shape), QuantScheme(4, False)))


def test_compressed_linear_has_no_trainable_state():
    layer = CompressedLinear(quantize(table(16, 32), QuantScheme(8)), torch.ones(16))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []


# ---------------------------------------------------------------- CompressedEmbedding

EMBEDDING_ENCODINGS = {
    "int8-sym-channel": lambda: quantize(table(), QuantScheme(8, True, "channel")),
    "int8-asym-tensor": lambda: quantize(table(), QuantScheme(8, False, "tensor")),
    "int4-asym-g16": lambda: quantize(table(), QuantScheme(4, False, 16)),
    "int4-sym-g8": lambda: quantize(table(), QuantScheme(4, True, 8)),
    "int3-asym-g16": lambda: quantize(table(), QuantScheme(3, False, 16)),
    "int2-asym-channel": lambda: quantize(table(), QuantScheme(2, False, "channel")),
    "int3-sym-tensor": lambda: quantize(table(), QuantScheme(3, True, "tensor")),
}

IDS = {
    "1d": torch.tensor([0, 5, 19, 5]),
    "2d": torch.tensor([[1, 2, 3], [19, 0, 7]]),
    "scalar": torch.tensor(7),
    "int32": torch.tensor([3, 4, 3], dtype=torch.int32),
}


@pytest.mark.parametrize("kernel", ["gather", "dense", "auto"])
@pytest.mark.parametrize("make", EMBEDDING_ENCODINGS.values(), ids=EMBEDDING_ENCODINGS.keys())
@pytest.mark.parametrize("ids", IDS.values(), ids=IDS.keys())
def test_embedding_kernels_equal_f_embedding(kernel, make, ids):
    enc = make()
    emb = CompressedEmbedding(enc, kernel=kernel)
    out = emb(ids)
    assert torch.equal(out, F.embedding(ids, enc.decode()))
    assert out.shape == (*ids.shape, 32)


@pytest.mark.parametrize("kernel", ["gather", "dense"])
def test_embedding_with_padding_idx_matches_nn_embedding(kernel):
    base = nn.Embedding(20, 32, padding_idx=0)
    enc = quantize(base.weight.data, QuantScheme(4, False, 16))
    ids = torch.tensor([[0, 3, 0, 19]])
    emb = CompressedEmbedding.from_embedding(base, enc, kernel)
    assert emb.padding_idx == 0
    assert torch.equal(emb(ids), F.embedding(ids, enc.decode(), padding_idx=0))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("int8-sym-channel", EmbeddingKernel.GATHER), ("int4-asym-g16", EmbeddingKernel.GATHER),
     ("int8-asym-tensor", EmbeddingKernel.DENSE), ("int3-sym-tensor", EmbeddingKernel.DENSE)],
)
def test_auto_gathers_row_quantised_tables(name, expected):
    emb = CompressedEmbedding(EMBEDDING_ENCODINGS[name]())
    assert emb.kernel is EmbeddingKernel.AUTO and emb.resolved_kernel is expected
    assert f"kernel={expected.value}" in repr(emb)


def test_auto_uses_dense_for_a_dense_table():
    emb = CompressedEmbedding(DenseTensor(table()))
    assert emb.resolved_kernel is EmbeddingKernel.DENSE
    ids = torch.tensor([1, 2])
    assert torch.equal(emb(ids), F.embedding(ids, table()))


@pytest.mark.parametrize("kernel", ["gather", "dense"])
@pytest.mark.parametrize("bad", [[20], [0, 25], [-1], [[3, 20]]], ids=["end", "far", "negative", "nested"])
def test_out_of_range_ids_raise_index_error(kernel, bad):
    emb = CompressedEmbedding(EMBEDDING_ENCODINGS["int4-asym-g16"](), kernel=kernel)
    with pytest.raises(IndexError):
        emb(torch.tensor(bad))


def test_gather_error_names_the_valid_range():
    emb = CompressedEmbedding(EMBEDDING_ENCODINGS["int8-sym-channel"](), kernel="gather")
    with pytest.raises(IndexError, match=r"embedding index out of range \[0, 20\)"):
        emb(torch.tensor([20]))


def test_dense_table_is_cached_and_released():
    emb = CompressedEmbedding(EMBEDDING_ENCODINGS["int8-asym-tensor"](), kernel="dense")
    emb(torch.tensor([1]))
    assert emb._table is not None and torch.equal(emb._table, emb.weight)
    emb.release()
    assert emb._table is None


def test_gather_with_no_ids_is_empty():
    emb = CompressedEmbedding(EMBEDDING_ENCODINGS["int4-asym-g16"](), kernel="gather")
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, 32)


def test_dense_kernel_with_no_ids_is_empty():
    emb = CompressedEmbedding(EMBEDDING_ENCODINGS["int4-asym-g16"](), kernel="dense")
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, 32)


def test_gather_on_dense_table_is_refused_up_front():
    with pytest.raises(ConfigError):
        CompressedEmbedding(DenseTensor(table()), kernel="gather")


@pytest.mark.parametrize(
    "kwargs", [{"max_norm": 1.0}, {"sparse": True}, {"scale_grad_by_freq": True}], ids=["max_norm", "sparse", "scale_grad"]
)
def test_from_embedding_refuses_special_embeddings(kwargs):
    base = nn.Embedding(20, 32, **kwargs)
    with pytest.raises(ConfigError, match="max_norm, sparse or scale_grad_by_freq cannot be compressed"):
        CompressedEmbedding.from_embedding(base, quantize(base.weight.data, QuantScheme(8)))


def test_embedding_table_must_be_2d():
    with pytest.raises(ConfigError, match="an embedding table must be 2-D"):
        CompressedEmbedding(DenseTensor(torch.zeros(2, 3, 4)))


def test_unknown_embedding_kernel_name():
    with pytest.raises(ValueError):
        CompressedEmbedding(DenseTensor(table()), kernel="fast")
