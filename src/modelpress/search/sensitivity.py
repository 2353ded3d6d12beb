"""Per-layer sensitivity: which layers does a recipe hurt?

`layer_sensitivity` runs the model with each selected layer ALONE compressed (the others stay
float) on held-out sentences and scores the embeddings against the float model's (mean cosine,
overlap@10). The layer is compressed once, by `compress` on a copy of the model, and swapped into
the float model for its run and out again (the very same module object goes back, so the model
ends as it began). For a data-aware pass (GPTQ) the copy is compressed as `compress` always does
it, so a layer's result is the one the full recipe would give it (calibrated after the layers
before it). Runs are kept cheap by `replay.Runner`: the float embeddings are computed once, and
blocks before a changed layer replay their recorded outputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from modelpress.compress import compress, resolve_recipe
from modelpress.data.batches import tokenised_batches
from modelpress.errors import ConfigError, RecipeError, UnsupportedError
from modelpress.evaluate.fidelity import fidelity
from modelpress.passes.base import Target
from modelpress.passes.config import config_to_dict
from modelpress.recipe import Recipe, Stage
from modelpress.search.overrides import with_overrides
from modelpress.search.replay import Runner

__all__ = ["LayerSensitivity", "MAX_QUERIES", "MIN_SENTENCES", "Measurement", "Upgrades", "as_recipe",
           "compressed_variants", "layer_sensitivity", "selected_targets"]

MIN_SENTENCES = 11  # overlap@10 needs 10 neighbours besides the query
MAX_QUERIES = 200  # overlap@10 queries, as in every modelpress evaluation

Upgrades = Callable[[dict[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class Measurement:
    """One layer compressed one way, alone in the float model, and what that did to the embeddings."""

    changes: dict[str, Any]  # config changes on top of the recipe's config for the layer ({} = as the recipe says)
    encoding: str  # "int4 asym g64", ...
    bytes: int  # the layer's weight as stored
    mean_cosine: float  # sentence encoders: of the embeddings (NaN for a causal LM)
    p1_cosine: float
    overlap_at_10: float
    kl: float | None = None  # causal LMs: mean KL(float || compressed) of the next-token distributions, nats

    @property
    def damage(self) -> float:
        """1 - mean cosine of a sentence encoder's embeddings; a causal LM's next-token KL divergence."""
        return self.kl if self.kl is not None else 1.0 - self.mean_cosine


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer of a sensitivity report: the recipe's compression of it, and the measured upgrades."""

    name: str
    stage: int  # index of the recipe stage that selects the layer
    kind: str  # the float module's class name
    params: int  # weight elements
    original_bytes: int  # the float weight's bytes
    base: Measurement
    upgrades: tuple[Measurement, ...] = ()

    @property
    def damage(self) -> float:
        return self.base.damage

    @property
    def bytes_saved(self) -> int:
        return self.original_bytes - self.base.bytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.base.bytes / max(self.params, 1)


def layer_sensitivity(
    model: nn.Module,
    recipe: Recipe | Stage | str | dict,
    sentences: Sequence[str],
    calibration: Any = None,
    upgrades: Upgrades | None = None,
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
) -> list[LayerSensitivity]:
    """Rows for every layer `recipe` selects, most damaged first (see the module docstring).

    `model` is a sentence encoder: `model.tokenize(list[str])` gives keyword inputs and
    `model(**inputs)` gives (B, D) embeddings. `upgrades(config_dict)` lists the config changes to
    measure as well, for `mixed_precision_recipe` (e.g. `default_upgrades`); none by default.
    `calibration` is passed to `compress` (GPTQ needs it).
    """
    recipe = as_recipe(recipe)
    sentences = _check_sentences(sentences)
    targets = selected_targets(model, recipe)
    changes = {t.name: (upgrades(config_to_dict(t.config)) if upgrades else []) for _, t in targets}
    stages = {t.name: stage for stage, t in targets}
    was_training = model.training
    model.eval()
    try:
        runner = Runner(model, tokenised_batches(model, sentences, batch_size, longest_first=True))
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


def compressed_variants(model: nn.Module, recipe: Recipe, changes: dict[str, list[dict[str, Any]]],
                        stages: dict[str, int], calibration: Any) -> list[nn.Module]:
    """Compressed copies of the model: [0] by the recipe, [k] with every layer's k-th upgrade (layers
    with fewer upgrades stay as the recipe says there). Each layer is later taken from them one by one."""
    variants = [compress(copy.deepcopy(model), recipe, calibration=calibration)]
    for k in range(max((len(c) for c in changes.values()), default=0)):
        layer_changes = {name: (stages[name], c[k]) for name, c in changes.items() if len(c) > k}
        variants.append(compress(copy.deepcopy(model), with_overrides(recipe, layer_changes), calibration))
    for variant in variants:
        _check_untouched(model, variant, list(changes))
    return variants


def as_recipe(recipe: Recipe | Stage | str | dict) -> Recipe:
    if isinstance(recipe, Stage):
        return Recipe((recipe,), name=recipe.pass_name)
    return resolve_recipe(recipe)


def _check_sentences(sentences: Sequence[str]) -> list[str]:
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise ConfigError("sentences must be a list of strings, e.g. corpus_splits(256).evaluation")
    if len(sentences) < MIN_SENTENCES:
        raise ConfigError(f"{len(sentences)} sentences are too few: give at least {MIN_SENTENCES} "
                          "(overlap@10 needs 10 neighbours besides the query), e.g. 256")
    return list(sentences)


def selected_targets(model: nn.Module, recipe: Recipe) -> list[tuple[int, Target]]:
    """(stage index, target) of every module the recipe rewrites, resolved as `compress` does."""
    taken: set[str] = set()
    out = []
    for index, stage in enumerate(recipe.stages):
        targets = stage.resolve(model, taken)
        if not targets and not stage.optional:
            raise RecipeError(f"stage {index} ({stage.pass_name}) matched no module: check its targets")
        for t in targets:
            if getattr(t.module, "weight", None) is None:
                raise ConfigError(f"layer {t.name!r} has no weight to measure: exclude it from the recipe")
        seen = {t.name for _, t in out}  # a refining stage may select a layer again: it is measured once
        out += [(index, t) for t in targets if t.name not in seen]
        taken.update(t.name for t in targets)
    if not out:
        raise RecipeError("the recipe selects no layer of this model: check its targets")
    return out


def _check_untouched(model: nn.Module, compressed: nn.Module, names: list[str]) -> None:
    """Refuse recipes that also change modules they do not select: a layer alone would then not be
    what the recipe makes of it (e.g. smoothing scales folded into a LayerNorm)."""
    prefixes = tuple(f"{n}." for n in names)
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    theirs = {k: v for k, v in compressed.state_dict().items() if not k.startswith(prefixes)}
    changed = sorted(k for k in ours.keys() | theirs.keys()
                     if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape
                     or not torch.equal(ours[k], theirs[k]))
    if changed:
        raise UnsupportedError(
            f"the recipe also changes {changed[0]!r}, which it does not select, so a layer cannot be measured "
            "alone: use a recipe whose passes only rewrite their own layers (e.g. without folded scales)"
        )


def _measure(runner: Runner, name: str, module: nn.Module, changes: dict[str, Any]) -> Measurement:
    """`module` swapped in for layer `name` alone, and what that did to the embeddings."""
    got = runner.encode_with(name, module)
    f = fidelity(runner.reference, got, n_queries=min(MAX_QUERIES, len(got)))
    enc = getattr(module, "encoding", None)
    if enc is None:
        w = module.weight
        encoding, nbytes = str(w.dtype).replace("torch.", ""), w.numel() * w.element_size()
    else:
        encoding, nbytes = enc.describe(), enc.nbytes
    return Measurement(dict(changes), encoding, nbytes, f.mean_cosine, f.p1_cosine, f.overlap_at_10)
