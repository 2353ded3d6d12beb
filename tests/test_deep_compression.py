"""The Deep Compression pipeline: stages shrink the stored bytes, the result reloads and runs."""

from __future__ import annotations

import pytest
import torch

from modelpress.pipelines.deep_compression import (DeepCompressionPlan, TrainingSet, deep_compress, fp32_bytes, recipe,
                                                   stored_bytes)
from modelpress.encodings.clustered import ClusteredTensor
from modelpress.encodings.sparse import SparseTensor
from modelpress.errors import ConfigError
from modelpress.formats.checkpoint import save
from digits import DigitsLeNet5, DigitsMLP, accuracy, load_digits_data, train
from modelpress.recipe import Recipe

MLP_PLAN = DeepCompressionPlan(sparsity={"fc1": 0.92, "fc2": 0.95, "fc3": 0.8}, bits={"fc1": 3, "fc2": 3, "fc3": 4},
                               centroid_lr=1e-4)
LENET5_PLAN = DeepCompressionPlan(
    sparsity={"conv1": 0.3, "conv2": 0.6, "fc1": 0.95, "fc2": 0.9, "fc3": 0.8},
    bits={"conv1": 6, "conv2": 5, "fc1": 3, "fc2": 3, "fc3": 4}, centroid_lr=1e-4)


@pytest.fixture(scope="module")
def digits():
    return load_digits_data()


def test_recipe_prunes_then_clusters_each_layer_with_its_own_settings() -> None:
    r = recipe(MLP_PLAN)
    assert [s.pass_name for s in r.stages] == ["magnitude", "kmeans"]
    assert r.stages[0].config_for("fc2").sparsity == 0.95
    assert r.stages[1].config_for("fc3").bits == 4
    assert Recipe.from_yaml(r.to_yaml()).to_dict() == r.to_dict()


def test_plan_must_cover_the_same_layers() -> None:
    with pytest.raises(ConfigError, match="both sparsity and bits"):
        DeepCompressionPlan(sparsity={"fc1": 0.9}, bits={"fc2": 4})
    with pytest.raises(ConfigError, match="names no layer"):
        DeepCompressionPlan(sparsity={}, bits={})


def test_stored_bytes_counts_the_arrays_and_the_framing(tmp_path) -> None:
    model = DigitsMLP()
    path = save(model, tmp_path / "m", entropy=False)
    payload, total = stored_bytes(path)
    assert payload == fp32_bytes(model) == 4 * sum(p.numel() for p in model.parameters())
    assert total > payload


def test_each_stage_shrinks_the_model_and_the_result_reloads(digits, tmp_path) -> None:
    plan = DeepCompressionPlan(sparsity=MLP_PLAN.sparsity, bits=MLP_PLAN.bits, prune_epochs=4, centroid_epochs=1)
    model = DigitsMLP()
    train(model, digits, epochs=4)
    final, results = deep_compress(model, TrainingSet(digits.x_train, digits.y_train), plan, lambda: DigitsMLP(None),
                                   tmp_path, lambda m: accuracy(m, digits))
    stages = [r.stage for r in results]
    assert stages == ["fp32", "pruned+clustered", "+centroid fine-tuning", "+entropy coding", "+float16 biases"]
    sizes = [r.bytes for r in results]
    assert sizes[0] == fp32_bytes(DigitsMLP())
    assert sizes[1] < sizes[0] / 10 and sizes[3] < sizes[2] and sizes[4] < sizes[3]
    for name, sparsity in plan.sparsity.items():  # every layer pruned to its sparsity, values clustered
        enc = getattr(final, name).encoding
        assert isinstance(enc, SparseTensor) and isinstance(enc.values, ClusteredTensor)
        assert enc.density == pytest.approx(1 - sparsity, abs=1e-3)
        assert len(enc.values.codebook) <= 2 ** plan.bits[name]
    assert results[-1].accuracy == accuracy(final, digits)
    x = digits.x_test[:16]
    assert torch.allclose(final(x), model(x), atol=1e-2)  # the checkpoint rounds biases to float16 only


@pytest.mark.slow
@pytest.mark.parametrize("cls, plan", [(DigitsMLP, MLP_PLAN), (DigitsLeNet5, LENET5_PLAN)], ids=["mlp", "lenet5"])
def test_deep_compression_reaches_40x_within_half_a_point(digits, tmp_path, cls, plan) -> None:
    model = cls(0)
    train(model, digits, epochs=40)
    dense = accuracy(model, digits)
    _, results = deep_compress(model, TrainingSet(digits.x_train, digits.y_train), plan, lambda: cls(None), tmp_path,
                               lambda m: accuracy(m, digits))
    final = results[-1]
    assert final.ratio(results[0].bytes) >= 40
    assert final.accuracy >= dense - 0.005
