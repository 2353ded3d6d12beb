"""Gradual pruning during training: the cubic schedule, monotone masks, and 90% sparsity on the digits CNN."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import modelpress
from modelpress.encodings.sparse import SparseTensor
from modelpress.errors import ConfigError
from modelpress.passes import GradualConfig, GradualPruner
from modelpress.passes.prune import cubic_sparsity, pruned_count
from _prune_support import MLP, gen, linears  # noqa: E402


# ---------------------------------------------------------------- gradual pruning


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.9, 0.0, 10, 110) == 0.0
    assert cubic_sparsity(10, 0.9, 0.0, 10, 110) == 0.0
    assert cubic_sparsity(60, 0.9, 0.0, 10, 110) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert cubic_sparsity(110, 0.9, 0.0, 10, 110) == 0.9 == cubic_sparsity(500, 0.9, 0.0, 10, 110)
    values = [cubic_sparsity(t, 0.8, 0.1, 0, 50) for t in range(60)]
    assert values == sorted(values)


@pytest.mark.parametrize("fields, message", [
    ({"final_sparsity": 1.0}, "final_sparsity"),
    ({"initial_sparsity": 0.5, "final_sparsity": 0.3}, "exceeds"),
    ({"start_step": 10, "end_step": 10}, "after start_step"),
    ({"every": 0}, "every"),
    ({"importance": "random"}, "random"),
    ({"taylor_decay": 1.0}, "taylor_decay"),
])
def test_invalid_gradual_configs(fields, message):
    with pytest.raises(ConfigError, match=message):
        GradualConfig(**fields)


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "movement"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gradual_pruner_reaches_its_sparsity_with_monotone_masks(importance, scope):
    model = MLP()
    config = GradualConfig(final_sparsity=0.8, end_step=20, every=4, importance=importance, scope=scope)
    pruner = GradualPruner(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    previous = {n: m.clone() for n, m in pruner.masks.items()}
    for step in range(24):
        x = torch.randn(16, 32, generator=gen(step))
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        pruner.observe()
        optimizer.step()
        pruner.step(step)
        for n, m in pruner.masks.items():
            assert not (m & ~previous[n]).any()  # nothing pruned comes back
            assert (pruner.layers[n].weight[~m] == 0).all()
            previous[n] = m.clone()
    total = sum(m.numel() for m in pruner.masks.values())
    kept = sum(int(m.sum()) for m in pruner.masks.values())
    if scope == "global":
        assert kept == total - pruned_count(total, 0.8)
    else:
        assert all(int(m.sum()) == m.numel() - pruned_count(m.numel(), 0.8) for m in pruner.masks.values())
    x = torch.randn(4, 32, generator=gen(0))
    before = model(x)
    pruner.finalize()
    assert all(isinstance(m.encoding, SparseTensor) for m in linears(model).values())
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_gradual_pruner_refuses_unknown_layers():
    with pytest.raises(ConfigError, match="only Linear and Conv2d"):
        GradualPruner(MLP(), GradualConfig(), names=["layers.9"])


# ---------------------------------------------------------------- digits: 90% sparsity by gradual fine-tuning


def finetune_with_pruning(model, data, config: GradualConfig, epochs: int, seed: int, lr: float = 1e-3,
                          batch_size: int = 64) -> GradualPruner:
    """Adam on the digits training split, masks tightening on the pruner's schedule."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    pruner = GradualPruner(model, config)
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            pruner.observe()
            optimizer.step()
            pruner.step(step)
            step += 1
    model.eval()
    return pruner


@pytest.fixture
def one_thread():
    """Small convolutions run fastest on one thread (and the result must not depend on the count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    from digits import DigitsCNN, load_digits_data, train

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_digits_data()
        model = DigitsCNN()
        train(model, data, epochs=30)
    finally:
        torch.set_num_threads(previous)
    return model, data


@pytest.mark.slow
def test_digits_cnn_at_90_percent_sparsity_loses_at_most_half_a_point(digits, one_thread, tmp_path):
    from digits import accuracy

    model, data = digits
    base = accuracy(model, data)
    steps_per_epoch = -(-len(data.y_train) // 64)
    config = GradualConfig(final_sparsity=0.9, end_step=15 * steps_per_epoch, every=steps_per_epoch // 2,
                           importance="taylor")
    drops = []
    for seed in range(3):
        pruned = copy.deepcopy(model)
        pruner = finetune_with_pruning(pruned, data, config, epochs=30, seed=seed)
        pruner.finalize()
        total = sum(m.encoding.numel for m in pruned.modules() if hasattr(m, "encoding"))
        kept = sum(m.encoding.nnz for m in pruned.modules() if hasattr(m, "encoding"))
        assert kept == total - pruned_count(total, 0.9)
        drops.append(100 * (base - accuracy(pruned, data)))
    assert sorted(drops)[1] <= 0.5, drops  # the median of three fine-tuning runs (one image = 0.28 points)
    path = modelpress.save(pruned, tmp_path / "digits")
    loaded = modelpress.load(path, model=copy.deepcopy(model))
    assert accuracy(loaded, data) == accuracy(pruned, data)
    assert (path / "weights.safetensors").stat().st_size < 0.25 * 4 * total
