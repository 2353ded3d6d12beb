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

from typing import Any, Callable

import torch
from torch import nn

from modelpress.errors import ConfigError
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
    progress: Callable[[str], None] | None = None,
) -> list[LayerSensitivity]:
    """Rows for every layer `recipe` selects, most damaged first (see the module docstring).

    `model` is a causal LM called as `model(input_ids=..., use_cache=False)`; `windows` (n, T) token
    ids, scored one window per forward. `upgrades(config_dict)` lists config changes to measure as
    well (e.g. `lambda c: [{"bits": 4}]` over a 3-bit recipe). `calibration` goes to `compress`.
    """
    recipe = as_recipe(recipe)
    windows = _check_windows(windows)
    targets = selected_targets(model, recipe)
    changes = {t.name: (upgrades(config_to_dict(t.config)) if upgrades else []) for _, t in targets}
    stages = {t.name: stage for stage, t in targets}
    was_training = model.training
    model.eval()
    try:
        batches = [([i], {"input_ids": windows[i:i + 1], "use_cache": False}) for i in range(len(windows))]
        runner = Runner(model, batches, output=next_token_log_probs)
        variants = compressed_variants(model, recipe, changes, stages, calibration)
        rows = []
        for i, (stage, target) in enumerate(targets):
            if progress:
                progress(f"layer {i + 1}/{len(targets)}: {target.name}")
            options = [{}] + changes[target.name]
            measured = [_measure(runner, target.name, variants[k].get_submodule(target.name), options[k])
                        for k in range(len(options))]
            weight = target.module.weight
            rows.append(LayerSensitivity(target.name, stage, type(target.module).__name__, weight.numel(),
                                         weight.numel() * weight.element_size(), measured[0], tuple(measured[1:])))
    finally:
        model.train(was_training)
    return sorted(rows, key=lambda r: (-r.damage, -r.base.bytes, r.name))


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point() or windows.numel() == 0:
        raise ConfigError("windows must be a (windows, tokens) tensor of token ids, e.g. "
                          "token_windows(ids, 512, 1024) of the dev text")
    if windows.shape[1] < 2:
        raise ConfigError(f"a window of {windows.shape[1]} token predicts nothing: give windows of 2 tokens or more")
    return windows.long()


def _measure(runner: Runner, name: str, module: nn.Module, changes: dict[str, Any]) -> Measurement:
    """`module` swapped in for layer `name` alone, and the KL it adds to the next-token distributions."""
    kl = next_token_kl(runner.reference, runner.encode_with(name, module))
    enc = getattr(module, "encoding", None)
    if enc is None:
        w = module.weight
        encoding, nbytes = str(w.dtype).replace("torch.", ""), w.numel() * w.element_size()
    else:
        encoding, nbytes = enc.describe(), enc.nbytes
    nan = float("nan")
    return Measurement(dict(changes), encoding, nbytes, nan, nan, nan, kl=kl)
