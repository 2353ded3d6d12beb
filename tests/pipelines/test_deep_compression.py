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


MAX_LOSS = 0.02  # of test accuracy, on one seed: 2 points = 7 of the 360 test images (see the test's docstring)
SEED = 0


@pytest.mark.slow
@pytest.mark.parametrize("cls, plan", [(DigitsMLP, MLP_PLAN), (DigitsLeNet5, LENET5_PLAN)], ids=["mlp", "lenet5"])
def test_deep_compression_reaches_40x_losing_at_most_two_points(digits, tmp_path, cls, plan) -> None:
    """At least 40x smaller than fp32, and at most MAX_LOSS (2 points) of test accuracy lost on one seed.

    Measured with these plans, model and training seeds 0-9 and 40 dense epochs, on each float
    path the suite runs on: default (ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41), avx2
    (=avx2 ... AVX2) and avx512 (with VNNI and bf16; no variable set), 30 runs per model. Points
    of test accuracy lost from fp32 to the final stage (negative: gained):

        model    path     seeds 0..9                                                    worst  ratio
        MLP      default  -0.83 -0.56 +0.00 +0.56 -1.67 -0.83 +0.00 +0.28 -0.56 -0.28  +0.56  44.09-44.26x
        MLP      avx2     +0.00 -0.56 +0.00 -0.83 -1.39 -1.11 -0.28 +0.56 -0.56 -0.56  +0.56
        MLP      avx512   +0.28 -0.28 -0.28 -0.28 -1.39 -1.11 +0.00 +0.28 -0.28 -0.56  +0.28
        LeNet-5  default  -0.28 +0.00 +0.56 +0.00 +0.56 +0.28 +0.83 +0.28 +1.11 +0.00  +1.11  41.33-41.99x
        LeNet-5  avx2     -0.56 +0.00 -0.56 -0.56 +0.83 +1.11 +0.28 +0.28 +0.56 +0.28  +1.11
        LeNet-5  avx512   +0.56 +0.28 +0.56 -0.28 +1.11 +0.00 +0.56 +0.56 +0.56 +0.56  +1.11

    One test image is 0.28 points, so a run moves in steps of 0.28; the worst run lost 4 images
    (1.11 points) and the bound allows 7. The paper's "within half a point" holds for the mean
    over seeds (MLP gains 0.4 points, LeNet-5 loses 0.3), not for every run: that claim lives in
    benchmarks/results_deep_compression.md (benchmarks/bench_deep_compression.py, several seeds).
    The ratio depends on the float path only through a few bytes of entropy-coded indices.

    A broken pipeline misses the bound by far (seed 0, avx512): no retraining while pruning loses
    49.7 (MLP) and 48.9 points (LeNet-5), codebook entries permuted after clustering 85.6 and 90.0.
    Subtler faults stay within one run's noise (no centroid fine-tuning 0.3/0.6, 2-bit indices
    everywhere -0.3/1.7 points); test_each_stage_shrinks_the_model_and_the_result_reloads checks
    each stage's encodings exactly instead.
    """
    model = cls(SEED)
    train(model, digits, epochs=40, seed=SEED)
    dense = accuracy(model, digits)
    _, results = deep_compress(model, TrainingSet(digits.x_train, digits.y_train), plan, lambda: cls(None), tmp_path,
                               lambda m: accuracy(m, digits))
    final = results[-1]
    assert final.ratio(results[0].bytes) >= 40
    assert final.accuracy >= dense - MAX_LOSS, f"lost {100 * (dense - final.accuracy):.2f} points"
