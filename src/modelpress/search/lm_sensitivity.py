"""Per-layer sensitivity of a causal LM: which layers does a recipe hurt, in next-token terms?

`lm_layer_sensitivity` is `layer_sensitivity` for decoder LLMs: each selected layer is compressed
once (by `compress` on a copy, so a data-aware pass gives it what the full recipe would), swapped
into the float model alone, and scored by the mean KL divergence of the model's next-token
distributions from the float model's, KL(P || Q) = sum_v P_v (log P_v - log Q_v), over every
position of fixed token windows (choose them from the `dev` text: a plan tuned on the text it is
reported on says nothing). The blocks before a changed layer replay their recorded outputs
(`replay.Runner`). The rows feed `mixed_precision_recipe` unchanged: their damage is the KL.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence

import torch
from torch import nn

from modelpress.encodings import Encoding
from modelpress.errors import ConfigError
from modelpress.nn.registry import is_compressed, kind_of
from modelpress.passes.base import Target
from modelpress.passes.config import config_to_dict
from modelpress.recipe import Recipe, Stage
from modelpress.search.replay import Runner
from modelpress.search.sensitivity import (LayerSensitivity, Measurement, Upgrades, as_recipe, compressed_variants,
                                           selected_targets)

__all__ = ["lm_layer_sensitivity", "next_token_kl", "next_token_log_probs"]


def next_token_log_probs(output: Any) -> torch.Tensor:
    """(B, T, V) log-probabilities of the next token from a causal LM's output (`.logits`, or logits)."""
    logits = output.logits if hasattr(output, "logits") else output
    return torch.log_softmax(logits.float(), dim=-1)


def next_token_kl(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean over positions of KL(P || Q) for log-probabilities (..., V) of the float (P) and compressed (Q) model."""
    if reference.shape != candidate.shape:
        raise ConfigError(f"log-probabilities of shapes {tuple(reference.shape)} and {tuple(candidate.shape)} "
                          "cannot be compared: score both models on the same windows")
    return float((reference.exp() * (reference - candidate)).sum(-1).mean(dtype=torch.float64))


def lm_layer_sensitivity(
    model: nn.Module,
    recipe: Recipe | Stage | str | dict,
    windows: torch.Tensor,
    calibration: Any = None,
    upgrades: Upgrades | None = None,
    groups: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[LayerSensitivity]:
    """Rows for every layer `recipe` selects (or every group of them), most damaged first (see the module docstring).

    `model` is a causal LM called as `model(input_ids=..., use_cache=False)`; `windows` (n, T) token
    ids, scored one window per forward. `upgrades(config_dict)` lists config changes to measure as
    well (e.g. `lambda c: [{"bits": 4}]` over a 3-bit recipe). `calibration` goes to `compress`.
    `groups` are name patterns (e.g. "model.layers.[0-9].mlp.*"): the selected layers a pattern
    matches first are measured compressed together, as one row named by the pattern, which
    `mixed_precision_recipe` then overrides as one (far fewer forwards than one row per layer).
    """
    recipe = as_recipe(recipe)
    windows = _check_windows(windows)
    targets = selected_targets(model, recipe)
    changes = {t.name: (upgrades(config_to_dict(t.config)) if upgrades else []) for _, t in targets}
    units = _units(targets, groups or [], changes)
    stages = {t.name: stage for stage, t in targets}
    was_training = model.training
    model.eval()
    try:
        batches = [([i], {"input_ids": windows[i:i + 1], "use_cache": False}) for i in range(len(windows))]
        runner = Runner(model, batches, output=next_token_log_probs)
        variants = compressed_variants(model, recipe, changes, stages, calibration)
        rows = []
        for i, (name, members) in enumerate(units):
            if progress:
                progress(f"{i + 1}/{len(units)}: {name}")
            options = [{}] + changes[members[0].name]
            measured = [_measure(runner, [m.name for m in members], variants[k], options[k])
                        for k in range(len(options))]
            weights = [m.module.weight for m in members]
            rows.append(LayerSensitivity(name, stages[members[0].name], type(members[0].module).__name__,
                                         sum(w.numel() for w in weights),
                                         sum(w.numel() * w.element_size() for w in weights),
                                         measured[0], tuple(measured[1:]), group=name != members[0].name))
    finally:
        model.train(was_training)
    return sorted(rows, key=lambda r: (-r.damage, -r.base.bytes, r.name))


def _units(targets: list[tuple[int, Target]], groups: Sequence[str],
           changes: dict[str, list[dict[str, Any]]]) -> list[tuple[str, list[Target]]]:
    """(row name, its layers): each layer with the first group pattern it matches, else alone."""
    if isinstance(groups, str) or not all(isinstance(g, str) for g in groups):
        raise ConfigError("groups must be a list of layer-name patterns, e.g. ['model.layers.[0-9].mlp.*']")
    units: dict[str, list[Target]] = {}
    for stage, target in targets:
        pattern = next((g for g in groups if fnmatch.fnmatchcase(target.name, g)), target.name)
        units.setdefault(pattern, []).append(target)
    for name, members in units.items():
        first = members[0].name
        if any(changes[m.name] != changes[first] for m in members):
            raise ConfigError(f"the layers of group {name!r} have different upgrades: group layers of one config")
    return list(units.items())


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if (not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point()
            or windows.numel() == 0):
        raise ConfigError("windows must be a (windows, tokens) tensor of token ids, e.g. "
                          "token_windows(ids, 512, 1024) of the dev text")
    if windows.shape[1] < 2:
        raise ConfigError(f"a window of {windows.shape[1]} token predicts nothing: give windows of 2 tokens or more")
    return windows.long()


def _decoded(module: nn.Module) -> nn.Module:
    """A compressed Linear as a float Linear of its decoded weight: the same numbers, and no kernel to choose
    (choosing one times it on the window, once per layer measured)."""
    if not (is_compressed(module) and isinstance(module.encoding, Encoding) and kind_of(module) == "linear"):
        return module
    weight = module.encoding.decode(torch.float32)  # (R, C)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
    return linear


def _measure(runner: Runner, names: list[str], variant: nn.Module, changes: dict[str, Any]) -> Measurement:
    """The layers `names` of `variant` swapped in together, alone, and the KL they add to the next-token
    distributions."""
    modules = {name: variant.get_submodule(name) for name in names}
    nbytes = 0
    for module in modules.values():
        enc = getattr(module, "encoding", None)
        nbytes += enc.nbytes if enc is not None else module.weight.numel() * module.weight.element_size()
    first = modules[names[0]]
    enc = getattr(first, "encoding", None)
    encoding = enc.describe() if enc is not None else str(first.weight.dtype).replace("torch.", "")
    kl = next_token_kl(runner.reference, runner.encode_with_all({n: _decoded(m) for n, m in modules.items()}))
    nan = float("nan")
    return Measurement(dict(changes), encoding, nbytes, nan, nan, nan, kl=kl)
