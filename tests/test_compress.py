"""compress(model, what): one verb for a config, an ordered {pattern: config} map, a recipe, a preset or YAML;
each gives exactly what the equivalent YAML recipe gives, and the model keeps the recipe as plain data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modelpress
from modelpress import GPTQConfig, QATConfig, RTNConfig
from modelpress.errors import RecipeError
from modelpress.nn import CompressedEmbedding, CompressedLinear
from modelpress.recipe import is_pattern_map


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 32)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)) for _ in range(2)])
        self.head = nn.Linear(32, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


IDS = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(1))
CALIBRATION = [torch.randint(0, 40, (8, 12), generator=torch.Generator().manual_seed(2)) for _ in range(3)]


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def same_encodings(a: nn.Module, b: nn.Module) -> bool:
    ea = {n: m.encoding.arrays() for n, m in a.named_modules() if hasattr(m, "encoding")}
    eb = {n: m.encoding.arrays() for n, m in b.named_modules() if hasattr(m, "encoding")}
    return ea.keys() == eb.keys() and all(ea[n].keys() == eb[n].keys() and
                                          all(torch.equal(ea[n][k], eb[n][k]) for k in ea[n]) for n in ea)


def test_gptq_from_a_config_equals_gptq_from_yaml():
    by_config = modelpress.compress(Net(), GPTQConfig(bits=4, group_size=16), calibration=CALIBRATION)
    by_yaml = modelpress.compress(Net(), {"stages": [{"pass": "gptq", "config": {"bits": 4, "group_size": 16}}]},
                                  calibration=CALIBRATION)
    linears = {n for n, m in Net().named_modules() if isinstance(m, nn.Linear)}
    assert {n for n, m in by_config.named_modules() if isinstance(m, CompressedLinear)} == linears
    assert same_encodings(by_config, by_yaml) and same_state(by_config, by_yaml)
    assert modelpress.provenance(by_config).log == modelpress.provenance(by_yaml).log
    assert modelpress.provenance(by_config).recipe["stages"][0]["config"]["bits"] == 4
    with torch.no_grad():
        error = (by_config(IDS) - Net()(IDS)).norm() / Net()(IDS).norm()
    assert 0 < error < 0.1  # quantised (not float), and close


def test_a_pattern_map_gives_what_first_match_wins_means():
    model = modelpress.compress(Net(), {"head": None, "embed": RTNConfig(bits=8), "blocks.0.*": RTNConfig(bits=4),
                                        "*": GPTQConfig(bits=8, group_size=16)}, calibration=CALIBRATION)
    assert type(model.head) is nn.Linear  # ignored by None
    assert isinstance(model.embed, CompressedEmbedding) and model.embed.encoding.scheme.bits == 8
    assert {model.blocks[0][0].encoding.scheme.bits, model.blocks[0][2].encoding.scheme.bits} == {4}
    assert model.blocks[1][0].encoding.scheme.describe() == "int8 asym g16"  # GPTQ's (asymmetric, groups of 16)
    log = modelpress.provenance(model).log
    assert any(line.startswith("blocks.1.0: int8 asym g16 gptq") for line in log)
    assert not any(line.startswith(("head", "blocks.0.0: int8")) for line in log)


def test_a_pattern_map_equals_the_recipe_it_stands_for():
    configs = {"head": None, "blocks.*": RTNConfig(bits=4, group_size=16, symmetric=False, search="mse")}
    recipe = {"stages": [{"pass": "rtn", "targets": {"include": ["blocks.*"], "ignore": ["head"]},
                          "config": {"bits": 4, "group_size": 16, "symmetric": False, "search": "mse"}}]}
    a, b = modelpress.compress(Net(), configs), modelpress.compress(Net(), recipe)
    assert same_state(a, b) and same_encodings(a, b)


@pytest.mark.parametrize("configs, message", [
    ({"hed": None, "*": RTNConfig()}, r"pattern 'hed' matches no module name \(they look like 'embed'"),
    ({"nothing.*": RTNConfig()}, "pattern 'nothing.*' matches no module name"),
    ({"head": QATConfig(), "head*": RTNConfig()}, r"stage 1 \(rtn\) matched no module"),
])
def test_patterns_that_select_nothing_are_refused_before_anything_changes(configs, message):
    model = Net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RecipeError, match=message):
        modelpress.compress(model, configs)
    if "matches no module name" in message:
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recipe_dicts_are_not_pattern_maps():
    assert is_pattern_map({"*": RTNConfig(), "x": None})
    assert not is_pattern_map({"stages": [{"pass": "rtn"}]}) and not is_pattern_map({}) and not is_pattern_map(None)
    assert not is_pattern_map(RTNConfig())


def test_the_recipe_is_kept_as_plain_data_and_saved(tmp_path):
    model = modelpress.compress(Net(), RTNConfig(bits=4, group_size=16))
    recorded = modelpress.provenance(model)
    assert recorded.recipe == modelpress.Recipe.from_configs(RTNConfig(bits=4, group_size=16)).to_dict()
    assert recorded.recipe_name == "rtn" and len(recorded.log) == 6  # embed, 4 block Linears, head
    loaded = modelpress.load(modelpress.save(model, tmp_path / "m"), model=Net())
    assert modelpress.provenance(loaded).recipe == recorded.recipe
    assert modelpress.provenance(loaded).log == ()  # the log describes a run, not the checkpoint
    assert modelpress.provenance(Net()).recipe is None
