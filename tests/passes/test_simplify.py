"""simplify(): BatchNorm folding and Dropout removal give the eval-mode outputs of the original;
BatchNorms that cannot fold are left alone; simplified models save and load into their original
skeleton; hostile 'simplified' records are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.nn.provenance import provenance
from modelpress.compress import compress
from modelpress.errors import FormatError
from modelpress.formats.checkpoint import MANIFEST, load, save
from modelpress.nn import CompressedConv2d
from modelpress.nn.simplified import simplified_record
from modelpress.passes.simplify import find_folds, simplify

X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def randomise(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm affines, then a few train-mode passes (dropout active) to move the running stats."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(X * 3 + 1)
    return model


def conv_net(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return randomise(nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=bias), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.3),
        nn.Conv2d(8, 4, 3, stride=2, bias=bias), nn.BatchNorm2d(4), nn.Flatten(), nn.Dropout(0.5),
        nn.Linear(4 * 2 * 2, 10, bias=bias), nn.BatchNorm1d(10), nn.AlphaDropout(0.1),
    ))


def eval_out(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_folded_outputs_equal_the_original(bias):
    model = conv_net(bias)
    reference = eval_out(copy.deepcopy(model))
    assert model.training  # simplified straight from training mode
    simplify(model)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
                   for m in model.modules())
    assert all(model[i].bias is not None for i in (0, 4, 8))  # a conv/linear without bias gains one
    torch.testing.assert_close(eval_out(model), reference, rtol=0, atol=1e-5)
    assert simplified_record(model) == {
        "identity": ["1", "10", "3", "5", "7", "9"],
        "bias_added": [] if bias else ["0", "4", "8"],
    }


def test_linear_batchnorm1d_folds():
    torch.manual_seed(0)
    model = randomise(nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.BatchNorm1d(32), nn.Dropout(0.2),
                                    nn.Linear(32, 5, bias=False), nn.BatchNorm1d(5)))
    reference = eval_out(copy.deepcopy(model))
    assert find_folds(model) == ({"2": "1", "5": "4"}, {})
    simplify(model)
    torch.testing.assert_close(eval_out(model), reference, rtol=0, atol=1e-5)


def test_batchnorm_without_affine_folds():
    torch.manual_seed(0)
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)))
    reference = eval_out(copy.deepcopy(model))
    simplify(model)
    torch.testing.assert_close(eval_out(model), reference, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- what must not fold


class Residual(nn.Module):
    """bn(conv(x)) + conv(x): the conv's output has a second user."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        h = self.conv(x)
        return self.bn(h) + h


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(x)


class ProducerTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


class AfterRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(F.relu(self.conv(x)))


NOT_FOLDED = [
    ("branching", Residual, "its producer's output has other users"),
    ("called-twice", Shared, "it is used more than once"),
    ("producer-called-twice", ProducerTwice, "its producer is used more than once"),
    ("after-relu", AfterRelu, "its input is not the output of a Conv2d or Linear layer"),
    ("module-relu", lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3)),
     "its input comes from a ReLU"),
    ("no-running-stats", lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)),
     "no running statistics"),
]


@pytest.mark.parametrize(("make", "why"), [pytest.param(m, w, id=i) for i, m, w in NOT_FOLDED])
def test_batchnorm_that_cannot_fold_is_kept(make, why):
    torch.manual_seed(0)
    model = randomise(make())
    reference = eval_out(copy.deepcopy(model))
    folds, refused = find_folds(model)
    assert folds == {} and len(refused) == 1 and why in next(iter(refused.values()))
    simplify(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1
    torch.testing.assert_close(eval_out(model), reference, rtol=0, atol=1e-6)


def test_a_module_registered_under_two_names_is_not_folded():
    conv, bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
    model = nn.Sequential(conv, bn, nn.Sequential(conv, bn))  # the same objects twice
    folds, refused = find_folds(model)
    assert folds == {} and refused["1"] == "it is used more than once"


class Untraceable(nn.Module):
    """Data-dependent control flow stops torch.fx; its Sequential child still traces on its own."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = self.features(x)
        if h.sum() > 0:
            h = h * 2
        return self.head(h.flatten(1))


def test_untraceable_parent_falls_back_to_its_children():
    torch.manual_seed(0)
    model = randomise(Untraceable())
    reference = eval_out(copy.deepcopy(model))
    assert find_folds(model)[0] == {"features.1": "features.0"}
    simplify(model)
    assert isinstance(model.features[1], nn.Identity)
    torch.testing.assert_close(eval_out(model), reference, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- recipes


def test_a_recipe_starts_with_simplify_then_quantises(tmp_path):
    skeleton = conv_net(bias=False)
    model = copy.deepcopy(skeleton)
    reference = eval_out(copy.deepcopy(skeleton))
    compress(model, {"stages": [{"pass": "simplify"}, {"pass": "rtn", "targets": {"types": ["Conv2d", "Linear"]}}]})
    assert isinstance(model[0], CompressedConv2d) and model[0].bias is not None
    out = eval_out(model)
    assert (out - reference).norm() / reference.norm() < 0.02  # int8 after folding
    loaded = load(save(model, tmp_path / "ckpt"), model=skeleton)
    assert torch.equal(eval_out(loaded), out)
    assert any("folded into" in line for line in provenance(model).log)


def test_the_simplify_stage_folds_only_what_it_selects():
    model = conv_net()
    compress(model, {"stages": [{"pass": "simplify", "targets": {"include": ["1", "3"]}}]})
    assert isinstance(model[1], nn.Identity) and isinstance(model[3], nn.Identity)
    assert isinstance(model[5], nn.BatchNorm2d) and isinstance(model[7], nn.Dropout)


def test_a_batchnorm_after_a_compressed_conv_is_kept_and_logged():
    model = conv_net()
    compress(model, {"stages": [{"pass": "rtn", "targets": {"include": ["0"], "types": ["Conv2d"]}},
                                {"pass": "simplify", "targets": {"types": ["BatchNorm2d"]}}]})
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[5], nn.Identity)
    assert "1: BatchNorm kept, its input comes from a CompressedConv2d" in " ".join(provenance(model).log)


# ---------------------------------------------------------------- checkpoints


@pytest.fixture
def saved(tmp_path):
    skeleton = conv_net(bias=False)
    model = simplify(copy.deepcopy(skeleton))
    return model, skeleton, save(model, tmp_path / "ckpt")


def test_save_and_load_into_the_original_skeleton(saved):
    model, skeleton, path = saved
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["simplified"] == simplified_record(model)
    loaded = load(path, model=skeleton)
    assert torch.equal(eval_out(loaded), eval_out(model))
    assert simplified_record(loaded) == simplified_record(model)


def test_load_into_the_simplified_model_itself(saved):
    model, _, path = saved
    loaded = load(path, model=simplify(conv_net(bias=False)))
    assert torch.equal(eval_out(loaded), eval_out(model))


def test_an_unsimplified_model_writes_no_record(tmp_path):
    path = save(conv_net(), tmp_path / "plain")
    assert "simplified" not in json.loads((path / MANIFEST).read_text())


def rewrite(path, value) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    if value is None:
        del manifest["simplified"]
    else:
        manifest["simplified"] = value
    (path / MANIFEST).write_text(json.dumps(manifest))


HOSTILE = [
    ("not-a-mapping", ["1"], "'simplified' must be a mapping"),
    ("unknown-key", {"identity": [], "removed": []}, "'simplified' must be a mapping with only"),
    ("not-a-list", {"identity": "1"}, r"'simplified.identity' must be a list of distinct module names"),
    ("not-strings", {"identity": [1]}, "'simplified.identity' must be a list"),
    ("empty-name", {"identity": [""]}, "'simplified.identity' must be a list"),
    ("duplicates", {"bias_added": ["0", "0"]}, "'simplified.bias_added' must be a list"),
    ("too-long", {"identity": [f"m{i}" for i in range(100_001)]}, "'simplified.identity' must be a list"),
    ("unknown-module", {"identity": ["nope"]}, "simplified module 'nope' is not a BatchNorm or Dropout"),
    ("identity-on-a-conv", {"identity": ["0"]}, "simplified module '0' is not a BatchNorm or Dropout"),
    ("bias-on-a-batchnorm", {"bias_added": ["1"]}, "simplified module '1' is not a Conv2d or Linear"),
    ("bias-on-a-parent", {"bias_added": [""]}, "'simplified.bias_added' must be a list"),
    ("record-dropped", None, "tensors do not match the model"),
]


@pytest.mark.parametrize(("value", "message"), [pytest.param(v, m, id=i) for i, v, m in HOSTILE])
def test_hostile_records_are_refused(saved, value, message):
    _, skeleton, path = saved
    rewrite(path, value)
    with pytest.raises(FormatError, match=message):
        load(path, model=skeleton)


def test_the_store_round_trips_a_simplified_pruned_clustered_model(tmp_path):
    from modelpress.store import Store

    skeleton = conv_net(bias=False)
    model = compress(copy.deepcopy(skeleton), {"stages": [
        {"pass": "simplify"},
        {"pass": "magnitude", "config": {"sparsity": 0.5}, "targets": {"types": ["Conv2d", "Linear"]}},
        {"pass": "kmeans", "config": {"bits": 3}},
    ]})
    with Store.init(tmp_path / "store") as store:
        store.put(model, "net")
        loaded = store.load("net", skeleton=skeleton)
    assert torch.equal(eval_out(loaded), eval_out(model))
    assert simplified_record(loaded) == simplified_record(model)
