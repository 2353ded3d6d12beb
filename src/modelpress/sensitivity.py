"""Per-layer sensitivity, and mixed precision from it.

`layer_sensitivity` answers "which layers does this recipe hurt?": for every layer the recipe
selects, it runs the model with THAT LAYER ALONE compressed (the others stay float) on held-out
sentences and scores the embeddings against the float model's (mean cosine, overlap@10). The
layer is compressed once, by `compress` on a copy of the model, and swapped into the float model
for its run and out again (the very same module object goes back, so the model ends as it
began). For a data-aware pass (GPTQ) the copy is compressed as `compress` always does it, so a
layer's result is the one the full recipe would give it (calibrated after the layers before it).

Runs are kept cheap in two ways: the float embeddings are computed once, and a layer inside the
model's repeated blocks (`encoder.layer.i`) re-runs only blocks i.. : the outputs of the blocks
before it are recorded in the reference run and replayed. Replay is used only after a check that
it reproduces the reference embeddings exactly; otherwise every run is a whole forward.

`mixed_precision_recipe` spends a size budget (bits per weight, or bytes, of the selected
layers' weights as stored) where it buys the most: starting from the recipe, it repeatedly takes
the measured upgrade (more bits, smaller groups) with the largest damage removed per extra byte
that still fits. Damage is 1 - mean cosine of the layer alone; summing it over layers is a first-
order estimate (small, independent errors add), which is what a greedy plan needs, not a promise.
The result is an ordinary Recipe: the chosen upgrades are per-layer `overrides`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from modelpress.calibration import find_blocks
from modelpress.compress import compress, resolve_recipe
from modelpress.encodings.packing import SUPPORTED_BITS
from modelpress.encodings.quantized import QuantizedTensor
from modelpress.errors import ConfigError, RecipeError, UnsupportedError
from modelpress.evaluate.fidelity import fidelity
from modelpress.passes.base import Target, config_to_dict
from modelpress.recipe import Recipe, Stage

__all__ = [
    "Measurement",
    "LayerSensitivity",
    "MixedPrecisionPlan",
    "layer_sensitivity",
    "default_upgrades",
    "plan_mixed_precision",
    "mixed_precision_recipe",
]

MIN_SENTENCES = 11  # overlap@10 needs 10 neighbours besides the query
MAX_QUERIES = 200  # overlap@10 queries, as in every modelpress evaluation

Upgrades = Callable[[dict[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class Measurement:
    """One layer compressed one way, alone in the float model, and what that did to the embeddings."""

    changes: dict[str, Any]  # config changes on top of the recipe's config for the layer ({} = as the recipe says)
    encoding: str  # "int4 asym g64", ...
    bytes: int  # the layer's weight as stored
    mean_cosine: float
    p1_cosine: float
    overlap_at_10: float

    @property
    def damage(self) -> float:
        return 1.0 - self.mean_cosine


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


def default_upgrades(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Halved groups, then the next supported bit width (8 bits per channel); [] for passes without bits."""
    bits, group = config.get("bits"), config.get("group_size")
    if not isinstance(bits, int) or group is None:
        return []
    upgrades = []
    if isinstance(group, int) and not isinstance(group, bool) and group >= 32 and group % 2 == 0:
        upgrades.append({"group_size": group // 2})
    wider = [b for b in SUPPORTED_BITS if b > bits]
    if wider:
        upgrades.append({"bits": wider[0], **({"group_size": "channel"} if wider[0] == 8 else {})})
    return upgrades


# ---------------------------------------------------------------------------------------------
# Measuring


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
    recipe = _as_recipe(recipe)
    sentences = _check_sentences(sentences)
    targets = _selected(model, recipe)
    changes = {t.name: (upgrades(config_to_dict(t.config)) if upgrades else []) for _, t in targets}
    stages = {t.name: stage for stage, t in targets}
    was_training = model.training
    model.eval()
    try:
        runner = _Runner(model, _batches(model, sentences, batch_size))
        variants = _variants(model, recipe, changes, stages, calibration)
        rows = []
        for i, (stage, target) in enumerate(targets):
            if progress:
                progress(f"layer {i + 1}/{len(targets)}: {target.name}")
            options = [{}] + changes[target.name]
            measured = [runner.measure(target.name, variants[k].get_submodule(target.name), options[k])
                        for k in range(len(options))]
            weight = target.module.weight
            rows.append(LayerSensitivity(target.name, stage, type(target.module).__name__, weight.numel(),
                                         weight.numel() * weight.element_size(), measured[0], tuple(measured[1:])))
    finally:
        model.train(was_training)
    return sorted(rows, key=lambda r: (-r.damage, -r.base.bytes, r.name))


def _variants(model: nn.Module, recipe: Recipe, changes: dict[str, list[dict[str, Any]]], stages: dict[str, int],
              calibration: Any) -> list[nn.Module]:
    """Compressed copies of the model: [0] by the recipe, [k] with every layer's k-th upgrade (layers
    with fewer upgrades stay as the recipe says there). Each layer is later taken from them one by one."""
    variants = [compress(copy.deepcopy(model), recipe, calibration=calibration)]
    for k in range(max((len(c) for c in changes.values()), default=0)):
        layer_changes = {name: (stages[name], c[k]) for name, c in changes.items() if len(c) > k}
        variants.append(compress(copy.deepcopy(model), _with_overrides(recipe, layer_changes), calibration))
    for variant in variants:
        _check_untouched(model, variant, list(changes))
    return variants


def _as_recipe(recipe: Recipe | Stage | str | dict) -> Recipe:
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


def _selected(model: nn.Module, recipe: Recipe) -> list[tuple[int, Target]]:
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


def _with_overrides(recipe: Recipe, layer_changes: dict[str, tuple[int, dict[str, Any]]]) -> Recipe:
    """`recipe` with each layer's config changed (name -> (stage index, changes on top of its config))."""
    stages = list(recipe.stages)
    for name, (index, changes) in layer_changes.items():
        stages[index] = _with_override(stages[index], name, changes)
    return Recipe(tuple(stages), name=recipe.name)


def _with_override(stage: Stage, name: str, changes: dict[str, Any]) -> Stage:
    """`stage` with one exact-name override, appended last, that makes layer `name`'s config its
    current one plus `changes` whatever other overrides match it. An earlier override with the
    same exact pattern is folded in (a YAML mapping cannot hold the pattern twice)."""
    target = {**config_to_dict(stage.config_for(name)), **changes}
    pattern = _exact_pattern(name)
    kept = dataclasses.replace(stage, overrides=tuple((p, c) for p, c in stage.overrides if p != pattern))
    current = config_to_dict(kept.config_for(name))
    diff = {k: v for k, v in target.items() if current.get(k) != v}
    out = dataclasses.replace(kept, overrides=kept.overrides + ((pattern, diff),)) if diff else kept
    out.config_for(name)  # an invalid change fails here, naming the override
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


def _exact_pattern(name: str) -> str:
    """An fnmatch pattern that matches `name` only: wildcard characters as one-character classes."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _batches(model: nn.Module, sentences: list[str], batch_size: int) -> list[tuple[list[int], dict]]:
    """(sentence indices, tokenised inputs) per batch, longest first (less padding), as `encode` does."""
    tokenize = getattr(model, "tokenize", None)
    if not callable(tokenize):
        raise ConfigError(f"sensitivity needs a sentence encoder with tokenize(), not a {type(model).__name__}: "
                          "load the model with load_sentence_encoder")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: give at least 1")
    order = sorted(range(len(sentences)), key=lambda i: (-len(sentences[i]), i))
    return [(idx, tokenize([sentences[i] for i in idx]))
            for idx in (order[s:s + batch_size] for s in range(0, len(order), batch_size))]


def _describe(module: nn.Module) -> tuple[str, int]:
    """A module's weight encoding and its bytes as stored."""
    enc = getattr(module, "encoding", None)
    if enc is None:
        w = module.weight
        return str(w.dtype).replace("torch.", ""), w.numel() * w.element_size()
    return (enc.scheme.describe() if isinstance(enc, QuantizedTensor) else enc.kind), enc.nbytes


class _Replay(nn.Module):
    """Stands in for a block: returns (a copy of) its recorded output for the batch being run."""

    def __init__(self, outputs: list[Any], runner: "_Runner"):
        super().__init__()
        self.outputs, self.runner = outputs, runner

    def forward(self, *args, **kwargs):
        return _copied(self.outputs[self.runner.batch])  # a copy: the caller may write into it in place


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v) for v in value)
    return value


class _Runner:
    """Encodes fixed sentence batches with the model as it is now, replaying the blocks a change cannot reach."""

    def __init__(self, model: nn.Module, batches: list[tuple[list[int], dict]]):
        self.model, self.batches, self.batch = model, batches, 0
        found = find_blocks(model)
        self.blocks: nn.ModuleList | None = found[1] if found else None
        self.outputs: list[list[Any]] = []  # [block][batch]: recorded outputs
        self.before: dict[str, frozenset[int]] = {}  # module name -> blocks that finished before it first ran
        self.reference = self._record()
        if self.blocks is not None and not self._replay_is_exact():
            self.blocks, self.outputs, self.before = None, [], {}

    def measure(self, name: str, module: nn.Module, changes: dict[str, Any]) -> Measurement:
        """`module` swapped in for layer `name`, the embeddings scored, and the float layer put back."""
        original = self.model.get_submodule(name)
        self.model.set_submodule(name, module)
        try:
            got = self.encode(self.before.get(name, frozenset()))
        finally:
            self.model.set_submodule(name, original)
            if hasattr(module, "release"):
                module.release()  # drop its decoded copy: 40 of them would be a second float model
        f = fidelity(self.reference, got, n_queries=min(MAX_QUERIES, len(got)))
        encoding, nbytes = _describe(module)
        return Measurement(dict(changes), encoding, nbytes, f.mean_cosine, f.p1_cosine, f.overlap_at_10)

    @torch.inference_mode()
    def encode(self, replay: frozenset[int] = frozenset()) -> torch.Tensor:
        """(N, D) embeddings in sentence order; the blocks in `replay` return their recorded outputs.

        Exact for the blocks that finished before a changed layer first runs: their outputs
        cannot depend on it.
        """
        saved = {}
        if self.blocks is not None:
            for j in replay:
                saved[j], self.blocks[j] = self.blocks[j], _Replay(self.outputs[j], self)
        try:
            return self._run()
        finally:
            for j, block in saved.items():
                self.blocks[j] = block

    def _run(self, before_batch: Callable[[], None] | None = None) -> torch.Tensor:
        parts, order = [], []
        for self.batch, (idx, inputs) in enumerate(self.batches):
            if before_batch:
                before_batch()
            parts.append(self.model(**inputs).float())  # (B, D)
            order += idx
        stacked = torch.cat(parts)
        out = torch.empty_like(stacked)
        out[torch.tensor(order)] = stacked
        return out

    @torch.inference_mode()
    def _record(self) -> torch.Tensor:
        """The float embeddings; with blocks, also each block's output per batch and where each module runs."""
        if self.blocks is None:
            return self._run()
        self.outputs = [[] for _ in self.blocks]
        done: set[int] = set()  # blocks finished so far in the current forward

        def after_block(j):
            def hook(module, args, output):
                self.outputs[j].append(output)
                done.add(j)
            return hook

        def before_module(name):
            def hook(module, args):
                self.before[name] = self.before.get(name, frozenset(done)) & frozenset(done)
            return hook

        handles = [b.register_forward_hook(after_block(j)) for j, b in enumerate(self.blocks)]
        handles += [m.register_forward_pre_hook(before_module(n)) for n, m in self.model.named_modules() if n]
        try:
            return self._run(before_batch=done.clear)
        finally:
            for h in handles:
                h.remove()

    def _replay_is_exact(self) -> bool:
        """Whether every block ran once per forward, and replaying all blocks, and all but the last to
        finish, gives the reference embeddings bit for bit (a model can defeat replay by calling a
        block twice or by depending on more than a block's output, e.g. state a block keeps)."""
        if any(len(o) != len(self.batches) for o in self.outputs):
            return False
        every = frozenset(range(len(self.blocks)))
        try:
            return all(torch.equal(self.encode(r), self.reference) for r in (every, every - {len(self.blocks) - 1}))
        except (RuntimeError, TypeError, ValueError, IndexError, AttributeError):
            return False


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class MixedPrecisionPlan:
    """The upgrades chosen for a budget, with the size and estimated damage they lead to."""

    choices: tuple[tuple[LayerSensitivity, Measurement], ...]  # every layer, with the option chosen for it
    budget_bytes: int

    @property
    def params(self) -> int:
        return sum(r.params for r, _ in self.choices)

    @property
    def bytes(self) -> int:
        return sum(m.bytes for _, m in self.choices)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / max(self.params, 1)

    @property
    def damage(self) -> float:
        """Sum of the chosen options' single-layer damages: a first-order estimate of the whole."""
        return sum(m.damage for _, m in self.choices)

    @property
    def upgraded(self) -> dict[str, dict[str, Any]]:
        """Layer name -> the config changes chosen for it (layers kept as the recipe says are left out)."""
        return {r.name: m.changes for r, m in self.choices if m is not r.base}


def plan_mixed_precision(
    rows: Sequence[LayerSensitivity], budget_bits: float | None = None, budget_bytes: int | None = None
) -> MixedPrecisionPlan:
    """Greedy: repeatedly take the upgrade with the most damage removed per extra byte that fits the budget.

    The budget covers the weights of the rows' layers as stored (codes, scales, zeros): give it in
    bits per weight or in bytes, not both. An option that is both smaller and less damaged than
    the current one is always taken first.
    """
    limit = _budget_bytes(rows, budget_bits, budget_bytes)
    choice = {r.name: r.base for r in rows}
    total = sum(m.bytes for m in choice.values())
    if total > limit:
        raise ConfigError(
            f"the recipe alone needs {8.0 * total / sum(r.params for r in rows):.3f} bits per weight "
            f"({total:,} bytes), over the budget of {8.0 * limit / sum(r.params for r in rows):.3f}: "
            "raise the budget or start from a recipe with fewer bits"
        )
    while (step := _best_step(rows, choice, limit - total)) is not None:
        row, option = step
        total += option.bytes - choice[row.name].bytes
        choice[row.name] = option
    return MixedPrecisionPlan(tuple((r, choice[r.name]) for r in rows), limit)


def _budget_bytes(rows: Sequence[LayerSensitivity], budget_bits: float | None, budget_bytes: int | None) -> int:
    if not rows:
        raise ConfigError("no sensitivity rows to plan with: run layer_sensitivity first")
    if len({r.name for r in rows}) != len(rows):
        raise ConfigError("sensitivity rows name a layer twice: give the rows of one layer_sensitivity run")
    if (budget_bits is None) == (budget_bytes is None):
        raise ConfigError("give exactly one budget: budget_bits (bits per weight) or budget_bytes")
    if budget_bits is not None:
        if isinstance(budget_bits, bool) or not isinstance(budget_bits, (int, float)) or not 0 < budget_bits < 64:
            raise ConfigError(f"budget of {budget_bits!r} bits per weight is not valid: "
                              "give a number in (0, 64), e.g. 5")
        return math.floor(budget_bits * sum(r.params for r in rows) / 8)
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ConfigError(f"budget of {budget_bytes!r} bytes is not valid: give a positive integer")
    return budget_bytes


def _best_step(rows: Sequence[LayerSensitivity], choice: dict[str, Measurement], room: int):
    """The (row, option) with the largest damage removed per extra byte that fits in `room`, or None."""
    best, best_ratio = None, 0.0
    for row in rows:
        current = choice[row.name]
        for option in (row.base, *row.upgrades):
            gain, extra = current.damage - option.damage, option.bytes - current.bytes
            if gain <= 0 or extra > room:
                continue
            ratio = math.inf if extra <= 0 else gain / extra
            if best is None or ratio > best_ratio:
                best, best_ratio = (row, option), ratio
    return best


def mixed_precision_recipe(
    rows: Sequence[LayerSensitivity],
    recipe: Recipe | Stage | str | dict,
    budget_bits: float | None = None,
    budget_bytes: int | None = None,
    name: str | None = None,
) -> Recipe:
    """`recipe` (the one `rows` were measured with) plus per-layer overrides that fit the budget."""
    recipe = _as_recipe(recipe)
    for row in rows:
        if not 0 <= row.stage < len(recipe.stages):
            raise ConfigError(f"row {row.name!r} comes from stage {row.stage}, but the recipe has "
                              f"{len(recipe.stages)}: plan with the recipe the rows were measured with")
    plan = plan_mixed_precision(rows, budget_bits, budget_bytes)
    stage_of = {r.name: r.stage for r in rows}
    mixed = _with_overrides(recipe, {name: (stage_of[name], c) for name, c in plan.upgraded.items()})
    return Recipe(mixed.stages, name=name or f"{recipe.name}-mixed")
