"""Conv channels of plain CNNs: followed through BatchNorm, activations, pooling and flattens by torch.fx;
what cannot be followed is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress
from modelpress.errors import ConfigError, UnsupportedError
from digits import DigitsCNN
from modelpress.passes.structured import channel_plan
from _structured_support import SmallCNN, assert_same, gen, params, randomise_batchnorm, stage  # noqa: E402


# ---------------------------------------------------------------- conv channels


def test_removing_unread_conv_channels_keeps_outputs_through_batchnorm_and_flatten():
    model = SmallCNN().eval()
    randomise_batchnorm(model.features[1])
    with torch.no_grad():
        model.features[3].weight[:, [1, 6]] = 0  # conv 2 never reads channels 1 and 6 of conv 1
        W = model.head.weight.view(5, 12, 16)
        W[:, [0, 4, 7, 9]] = 0  # the head never reads channels 0, 4, 7, 9 of conv 2
    x = torch.randn(4, 3, 8, 8, generator=gen(1))
    before, count = model(x), params(model)
    modelpress.compress(model, {"stages": [{"pass": "prune_channels", "config": {"ratio": 0.25},
                                            "targets": {"include": ["features.0"]}},
                                           {"pass": "prune_channels", "config": {"ratio": 0.34},
                                            "targets": {"include": ["features.3"]}}]})
    assert model.features[0].out_channels == 6 and model.features[1].num_features == 6
    assert model.features[3].in_channels == 6 and model.features[3].out_channels == 8
    assert model.head.in_features == 8 * 16
    assert params(model) < count
    assert_same(model(x), before)


def test_digits_cnn_channels_prune_through_functional_ops():
    model = DigitsCNN().eval()
    with torch.no_grad():
        model.fc1.weight.view(64, 32, 16)[:, :8] = 0  # channels 0-7 of conv2 feed nothing
    x = torch.randn(6, 1, 8, 8, generator=gen(2))
    before = model(x)
    modelpress.compress(model, {"stages": [{"pass": "prune_channels", "config": {"ratio": 0.25},
                                            "targets": {"include": ["conv2"]}}]})
    assert model.conv2.out_channels == 24 and model.fc1.in_features == 24 * 16
    assert_same(model(x), before)


class ViewCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(2, 6, 3, padding=1), nn.Linear(6 * 16, 3)

    def forward(self, x):
        h = F.avg_pool2d(torch.sigmoid(self.conv(x)), 2)
        return self.fc(h.view(h.size(0), -1))


def test_view_with_the_batch_size_counts_as_a_flatten():
    model = ViewCNN()
    with torch.no_grad():
        model.fc.weight.view(3, 6, 16)[:, [1, 4]] = 0
    x = torch.randn(2, 2, 8, 8, generator=gen(0))
    before = model(x)
    modelpress.compress(model, stage("prune_channels", ratio=0.34))
    assert model.conv.out_channels == 4 and model.fc.in_features == 64
    assert_same(model(x), before)


def test_channel_plan_follows_the_graph():
    import torch.fx

    model = SmallCNN()
    graph = torch.fx.symbolic_trace(model).graph
    plan = channel_plan(model, graph, "features.0")
    assert (plan.batchnorms, plan.convs, plan.linears) == (["features.1"], ["features.3"], [])
    assert channel_plan(model, graph, "features.3").linears == [("head", 16)]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + x)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=8)

    def forward(self, x):
        return self.b(self.a(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.b(self.a(x))
        return x


@pytest.mark.parametrize("model, target, error, message", [
    (Residual(), "a", UnsupportedError, "mixes it with another tensor"),
    (nn.Sequential(nn.Conv2d(3, 4, 1)), "0", UnsupportedError, "output"),
    (Grouped(), "a", UnsupportedError, "grouped convolution"),
    (Grouped(), "b", ConfigError, "groups=1"),
    (Untraceable(), "a", UnsupportedError, "cannot trace"),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 9 + 1, 2)), "0", UnsupportedError, "multiple"),
], ids=["residual", "model-output", "feeds-grouped", "is-grouped", "untraceable", "bad-flatten"])
def test_layers_that_cannot_be_structurally_pruned_are_refused(model, target, error, message):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message) as info:
        modelpress.compress(model, {"stages": [{"pass": "prune_channels", "config": {"ratio": 0.5},
                                                "targets": {"include": [target]}}]})
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing was changed


def test_conv_activation_importance_drops_silent_channels():
    model = SmallCNN().eval()
    with torch.no_grad():
        model.features[3].weight[[2, 5, 8]] = 0
        model.features[3].bias[[2, 5, 8]] = -5.0  # ReLU silences these channels
    calibration = [torch.randn(8, 3, 8, 8, generator=gen(i)) for i in range(2)]
    x = torch.randn(4, 3, 8, 8, generator=gen(3))
    before = model(x)
    modelpress.compress(model, {"stages": [{"pass": "prune_channels", "config": {"ratio": 0.25, "importance":
                                                                                "activation"},
                                            "targets": {"include": ["features.3"]}}]}, calibration=calibration)
    assert model.features[3].out_channels == 9
    assert_same(model(x), before)
