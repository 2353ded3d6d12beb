"""The kmeans pass: sort-based 1-D k-means against a plain O(n k) Lloyd, clustering pruned layers
(zeros and positions kept), recipes that prune then cluster, save/load, and centroid fine-tuning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from modelpress.nn.provenance import provenance
from modelpress.compress import compress
from modelpress.encodings import ClusteredTensor, DenseTensor, SparseTensor
from modelpress.encodings.clustered import assign, kmeans_1d
from modelpress.errors import ConfigError, RecipeError, UnsupportedError
from modelpress.formats.checkpoint import load, save
from modelpress.nn import CompressedConv2d, CompressedLinear
from modelpress.passes.cluster import (
    ClusteredTrainable,
    KMeansConfig,
    convert_centroids,
    finetune_centroids,
    prepare_centroids,
)
from modelpress.recipe import Recipe

# ---------------------------------------------------------------- k-means against a plain reference


def reference_init(x: torch.Tensor, k: int, init: str, seed: int) -> torch.Tensor:
    xs = x.double().reshape(-1).sort().values
    n = xs.numel()
    if init == "linear":
        return torch.unique(torch.linspace(float(xs[0]), float(xs[-1]), k, dtype=torch.float64))
    if init == "density":
        return torch.unique(torch.stack([xs[round((j + 0.5) / k * (n - 1))] for j in range(k)]))
    return torch.unique(xs[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]])


def reference_kmeans(x: torch.Tensor, c: torch.Tensor, iterations: int) -> torch.Tensor:
    """Lloyd's algorithm as written, O(n k) per iteration: a value joins the centroid whose cell it lies in
    (the cells of sorted centroids end at the midpoints; a value on one joins the lower centroid), each
    centroid moves to the mean of its members, an empty cluster keeps its centroid."""
    x = x.double().reshape(-1)
    for _ in range(iterations):
        mid = (c[1:] + c[:-1]) / 2
        labels = (x[:, None] > mid[None, :]).sum(1)  # (n,): midpoints below each value
        new = c.clone()
        for j in range(len(c)):
            if (labels == j).any():
                new[j] = x[labels == j].mean()
        if torch.equal(new, c):
            break
        c = new
    return c


@settings(max_examples=80, deadline=None)
@given(arrays(np.int64, st.integers(1, 300), elements=st.integers(-800, 800)),
       st.integers(1, 6), st.sampled_from(["linear", "density", "random"]), st.integers(0, 40))
def test_sort_based_kmeans_matches_the_plain_reference(x, bits, init, iterations):
    x = torch.from_numpy(x) / 8  # eighths: every sum is exact, so both must agree bit for bit (ties included)
    k = 1 << bits
    ours = kmeans_1d(x, k, init, iterations, seed=7)
    ref = reference_kmeans(x, reference_init(x, k, init, 7), iterations)
    assert torch.equal(ours, ref)
    mid = (ours[1:] + ours[:-1]) / 2
    assert torch.equal(assign(x, ours), (x.double()[:, None] > mid[None, :]).sum(1))


def test_assign_is_the_nearest_centroid():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = torch.sort(torch.randn(37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).values
    assert torch.equal(assign(x, c), (x[:, None] - c[None, :]).abs().argmin(1))


def test_ties_at_a_midpoint_go_to_the_lower_centroid():
    c = torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64)
    assert assign(torch.tensor([1.0, 3.0, 0.999, 1.001]), c).tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_kmeans_on_a_large_tensor_matches_the_reference(init):
    x = torch.randn(5_000, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails, no exact ties
    ours = kmeans_1d(x, 16, init, 30, seed=3)
    torch.testing.assert_close(ours, reference_kmeans(x, reference_init(x, 16, init, 3), 30), rtol=1e-9, atol=1e-12)


def test_a_tiny_cluster_next_to_large_values_keeps_its_own_mean():
    # prefix sums would give the run {4e-116} a mean of 0 (lost to cancellation against -1): clamped into its run
    x = torch.tensor([-1.0, 4e-116, 0.0], dtype=torch.float64)
    assert kmeans_1d(x, 4, "density", 1).tolist() == [-1.0, 0.0, 4e-116]


# ---------------------------------------------------------------- the pass


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 6 * 6, 64)
        self.fc2 = nn.Linear(64, 10, bias=False)

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(1))

PRUNE_THEN_CLUSTER = {
    "name": "prune-cluster",
    "stages": [
        {"pass": "magnitude", "config": {"sparsity": 0.6}, "targets": {"types": ["Linear", "Conv2d"]}},
        {"pass": "kmeans", "config": {"bits": 4}, "overrides": {"conv": {"bits": 2}}},
    ],
}


def test_plain_layers_are_clustered_and_run_their_decoded_weight():
    m = net()
    ref = copy.deepcopy(m)
    compress(m, {"stages": [{"pass": "kmeans", "config": {"bits": 5}}]})
    assert isinstance(m.conv, CompressedConv2d) and isinstance(m.fc1, CompressedLinear)
    for name in ("conv", "fc1", "fc2"):
        enc = getattr(m, name).encoding
        assert isinstance(enc, ClusteredTensor) and enc.bits == 5 and enc.codebook.numel() <= 32
    torch.testing.assert_close(m.fc1.bias, ref.fc1.bias, rtol=0, atol=0)
    with torch.no_grad():
        h = F.relu(F.conv2d(X, m.conv.encoding.decode(), ref.conv.bias, padding=1)).flatten(1)
        expected = F.linear(F.relu(F.linear(h, m.fc1.encoding.decode(), ref.fc1.bias)), m.fc2.encoding.decode())
        torch.testing.assert_close(m(X), expected)
        rel = (m(X) - ref(X)).norm() / ref(X).norm()
    assert rel < 0.05  # 32 shared values per layer barely move a small net


def test_pruned_layers_keep_their_zeros_and_positions_exactly():
    m = compress(net(), {"stages": [PRUNE_THEN_CLUSTER["stages"][0]]})
    before = {n: getattr(m, n).encoding for n in ("conv", "fc1", "fc2")}
    compress(m, {"stages": [PRUNE_THEN_CLUSTER["stages"][1]]})
    for name, old in before.items():
        enc = getattr(m, name).encoding
        assert isinstance(enc, SparseTensor) and isinstance(enc.values, ClusteredTensor)
        assert enc.layout == old.layout and enc.nnz == old.nnz
        assert all(torch.equal(enc.positions[k], v) for k, v in old.positions.items())
        mask = old.mask()
        assert torch.equal(enc.decode()[~mask], torch.zeros(int((~mask).sum())))  # pruned stay exactly zero
        kept = enc.decode()[mask]
        assert len(torch.unique(kept)) <= (4 if name == "conv" else 16)
        assert float((kept - old.decode()[mask]).abs().max()) < float(old.decode()[mask].abs().max()) / 2


def test_prune_then_cluster_recipe_saves_and_loads_identically(tmp_path):
    skeleton = net()
    m = compress(net(), PRUNE_THEN_CLUSTER)
    assert provenance(m).recipe == Recipe.from_dict(PRUNE_THEN_CLUSTER).to_dict()
    path = save(m, tmp_path / "ckpt")
    loaded = load(path, model=skeleton)
    assert isinstance(loaded.fc1.encoding.values, ClusteredTensor)
    with torch.inference_mode():
        assert torch.equal(loaded(X), m(X))
    assert provenance(loaded).recipe == provenance(m).recipe


def test_quantised_layers_are_refused():
    m = compress(net(), {"stages": [{"pass": "magnitude", "config": {"pattern": "2:4", "bits": 4},
                                     "targets": {"include": ["fc1"]}}]})
    with pytest.raises(UnsupportedError, match=r"layer 'fc1' holds a sparse with quantized values weight.*"
                                               r"put the kmeans stage before quantisation or exclude the layer"):
        compress(m, {"stages": [{"pass": "kmeans"}]})
    assert isinstance(m.conv, nn.Conv2d)  # all or nothing: nothing was rewritten


def test_clustering_twice_is_refused():
    m = compress(net(), {"stages": [{"pass": "kmeans"}]})
    with pytest.raises(UnsupportedError, match="holds a clustered weight"):
        compress(m, {"stages": [{"pass": "kmeans"}]})


def test_a_dense_encoded_layer_is_clustered():
    m = net()
    m.fc2 = CompressedLinear(DenseTensor(m.fc2.weight.detach().clone()), None, "dense")
    compress(m, {"stages": [{"pass": "kmeans", "targets": {"include": ["fc2"]}}]})
    assert isinstance(m.fc2.encoding, ClusteredTensor) and m.fc2.kernel.value == "dense"


@pytest.mark.parametrize(("config", "message"), [
    ({"bits": 0}, "bits 0 is not valid for k-means"),
    ({"bits": 9}, "bits 9 is not valid"),
    ({"bits": True}, "bits True is not valid"),
    ({"init": "kmeans++"}, r"init='kmeans\+\+' is not valid; use one of \['linear', 'density', 'random'\]"),
    ({"iterations": -1}, "iterations -1 is not valid"),
    ({"seed": 1.5}, "seed 1.5 is not valid"),
    ({"version": 2}, "version 2 is not supported"),
    ({"k": 16}, r"unknown field\(s\) \['k'\]"),
])
def test_invalid_configs(config, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"stages": [{"pass": "kmeans", "config": config}]})


def test_config_defaults():
    cfg = KMeansConfig()
    assert (cfg.bits, cfg.init.value, cfg.iterations, cfg.seed) == (4, "linear", 30, 0)


# ---------------------------------------------------------------- fine-tuning the centroids


def clustered_net(sparse: bool) -> Net:
    recipe = PRUNE_THEN_CLUSTER if sparse else {"stages": [{"pass": "kmeans", "config": {"bits": 3}}]}
    return compress(net(), recipe)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "pruned"])
def test_centroid_gradient_is_the_sum_of_its_members_gradients(sparse):
    m = clustered_net(sparse)
    # reference: the same network with plain dense weights as leaves
    weights = {n: getattr(m, n).encoding.decode().requires_grad_(True) for n in ("conv", "fc1", "fc2")}
    h = F.relu(F.conv2d(X, weights["conv"], m.conv.bias, padding=1)).flatten(1)
    F.linear(F.relu(F.linear(h, weights["fc1"], m.fc1.bias)), weights["fc2"]).square().sum().backward()
    encodings = {n: getattr(m, n).encoding for n in weights}
    prepare_centroids(m)
    m(X).square().sum().backward()
    for name, enc in encodings.items():
        twin = getattr(m, name)
        assert isinstance(twin, ClusteredTrainable)
        part = enc.values if sparse else enc
        labels = part.labels().reshape(-1)
        grads = weights[name].grad[enc.mask()] if sparse else weights[name].grad.reshape(-1)
        expected = torch.stack([grads[labels == j].sum() for j in range(part.codebook.numel())])
        torch.testing.assert_close(twin.codebook.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "pruned"])
def test_finetuning_reaches_the_least_squares_codebook(sparse):
    # y = x W^T + b with inputs of very different scales: k-means (which minimises the weight error)
    # is not the best codebook for the outputs; with the assignments fixed the best one is a least-squares fit.
    torch.manual_seed(0)
    teacher = nn.Linear(32, 16)
    X = torch.randn(8, 32, 32) * torch.linspace(-3, 2, 32).exp()  # 8 batches of 32
    data = [(x, teacher(x).detach()) for x in X.unbind(0)]
    m = nn.Sequential(copy.deepcopy(teacher))
    prune = [{"pass": "magnitude", "config": {"sparsity": 0.5}}] if sparse else []
    compress(m, {"stages": prune + [{"pass": "kmeans", "config": {"bits": 2}}]})
    old = m[0].encoding
    part = old.values if sparse else old
    labels = torch.full((16 * 32,), -1)
    labels[old.mask().reshape(-1) if sparse else slice(None)] = part.labels().reshape(-1)
    x_all, y_all = X.reshape(-1, 32).double(), torch.cat([y for _, y in data]).double() - teacher.bias.detach().double()
    A = torch.stack([(x_all @ (labels.reshape(16, 32) == j).double().T).reshape(-1)  # output per unit centroid
                     for j in range(part.codebook.numel())], 1)
    best = torch.linalg.lstsq(A, y_all.reshape(-1, 1)).solution
    optimum = float((A @ best - y_all.reshape(-1, 1)).square().mean()) * len(data)

    def loss_fn(model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    start = sum(float(loss_fn(m, b)) for b in data)
    losses = finetune_centroids(m, loss_fn, data, epochs=5, lr=1e-2)
    end = sum(float(loss_fn(m, b)) for b in data)
    assert len(losses) == 40
    assert end - optimum < 0.25 * (start - optimum), (start, end, optimum)
    enc = m[0].encoding
    new_part = enc.values if sparse else enc
    assert torch.equal(new_part.indices, part.indices)  # assignments never change
    assert new_part.codebook.dtype == torch.float16 and not torch.equal(new_part.codebook, part.codebook)
    if sparse:
        assert torch.equal(enc.mask(), old.mask())
        assert torch.equal(enc.decode()[~old.mask()], torch.zeros(int((~old.mask()).sum())))


def test_finetuning_trains_only_codebooks_unless_asked(tmp_path):
    m = clustered_net(sparse=False)
    m.fc2 = nn.Linear(64, 10)  # a float layer: must not move
    frozen = {k: v.clone() for k, v in m.state_dict().items() if "bias" in k or k.startswith("fc2")}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    batch = [X]
    finetune_centroids(m, lambda model, x: model(x).square().mean(), batch, steps=3, lr=1e-2)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in frozen.items())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    finetune_centroids(m, lambda model, x: model(x).square().mean(), batch, steps=3, lr=1e-2, train_bias=True)
    assert not torch.equal(m.fc1.bias, frozen["fc1.bias"]) and torch.equal(m.fc2.weight, frozen["fc2.weight"])
    loaded = load(save(m, tmp_path / "ckpt"), model=net_with_float_fc2())
    with torch.inference_mode():
        assert torch.equal(loaded(X), m(X))


def net_with_float_fc2() -> Net:
    m = net()
    m.fc2 = nn.Linear(64, 10)
    return m


def test_steps_stop_early_and_epochs_repeat():
    m = clustered_net(sparse=False)
    calls = []

    def loss_fn(model, batch):
        calls.append(batch)
        return model(X).square().mean()

    assert len(finetune_centroids(m, loss_fn, [0, 1, 2], epochs=3, steps=5)) == 5
    assert calls == [0, 1, 2, 0, 1]


def test_a_failing_loss_leaves_the_model_as_it_was():
    m = clustered_net(sparse=True)
    modules = {n: getattr(m, n) for n in ("conv", "fc1", "fc2")}

    def loss_fn(model, batch):
        if batch == 1:
            raise RuntimeError("boom")
        return model(X).square().mean()

    with pytest.raises(RuntimeError, match="boom"):
        finetune_centroids(m, loss_fn, [0, 1], lr=1e-2)
    assert all(getattr(m, n) is mod for n, mod in modules.items())


def test_a_diverging_loss_is_reported():
    m = clustered_net(sparse=False)
    with pytest.raises(ConfigError, match="the loss became nan at step 0: lower the learning rate"):
        finetune_centroids(m, lambda model, b: model(X).sum() * float("nan"), [0])
    assert isinstance(m.fc1, CompressedLinear)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epochs": 0}, "epochs 0 is not valid"),
    ({"steps": -1}, "steps -1 is not valid"),
    ({"lr": 0}, "lr 0 is not valid"),
])
def test_invalid_finetune_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        finetune_centroids(clustered_net(False), lambda m, b: m(X).sum(), [0], **kwargs)


def test_no_clustered_layer_is_an_error():
    with pytest.raises(ConfigError, match="holds no clustered layer: apply a recipe with a kmeans stage first"):
        finetune_centroids(net(), lambda m, b: m(X).sum(), [0])
    with pytest.raises(ConfigError, match="call prepare_centroids"):
        convert_centroids(net())
