"""Deep Compression (Han et al., 2016) as one pipeline: prune -> share weights -> entropy-code.

The three stages, each measured on the saved-and-reloaded model (what would ship):

1. **prune** with retraining: magnitude pruning on a gradual cubic schedule while the network
   trains (`GradualPruner`), to a per-layer sparsity;
2. **share weights**: the recipe's `kmeans` stage clusters each layer's kept weights into
   2^bits float16 centroids, and the centroids are then fine-tuned by gradient (the paper's
   "trained quantisation": a centroid moves by the sum of its members' gradients);
3. **entropy-code** when saving: cluster indices and sparsity positions are rANS-coded
   (`formats/entropy.py`), and the plain float parameters (biases) are stored in float16.

The pruning and clustering are an ordinary recipe (`recipe()`): a `magnitude` stage with the
per-layer sparsities, then a refining `kmeans` stage with per-layer bits. Retraining between and
after them needs the training data, so it lives here rather than in a recipe.

Sizes are the bytes of the arrays as stored (values, positions, codebooks, biases), the unit of
the paper's tables; `file_bytes` adds the container's framing (the safetensors header and the
JSON manifest), which is a fixed cost of a few KB that matters only for toy-sized models.

The pipeline is generic over a classifier's training tensors (inputs and integer labels, trained
with cross-entropy) and takes the held-out score as a function; `demos/digits.py` (not installed)
has the small networks and data the tests and benchmarks run it on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.compress import compress
from modelpress.errors import ConfigError
from modelpress.formats.checkpoint import MANIFEST, WEIGHTS, load, save
from modelpress.passes.cluster import finetune_centroids
from modelpress.passes.prune import GradualConfig, GradualPruner
from modelpress.recipe import Recipe

__all__ = ["DeepCompressionPlan", "StageResult", "TrainingSet", "deep_compress", "describe_results", "fp32_bytes",
           "recipe", "stored_bytes"]

BATCH_SIZE = 64


@dataclass(frozen=True)
class TrainingSet:
    """A classifier's training tensors: inputs (N, ...) and integer class labels (N,)."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels) or not len(self.labels):
            raise ConfigError(f"the training set needs as many labels as inputs (at least one), got "
                              f"{len(self.inputs)} inputs and {len(self.labels)} labels")


@dataclass(frozen=True)
class DeepCompressionPlan:
    """Per-layer sparsity and index bits, and how long to retrain after each stage."""

    sparsity: dict[str, float]  # layer name -> fraction of its weights removed
    bits: dict[str, int]  # layer name -> k-means index bits (2^bits shared values)
    prune_epochs: int = 40  # retraining while the masks tighten (reached at 60% of it)
    prune_lr: float = 1e-3
    centroid_epochs: int = 8
    centroid_lr: float = 3e-4
    float_params: str | None = "float16"  # biases as stored
    seed: int = 0

    def __post_init__(self) -> None:
        if set(self.sparsity) != set(self.bits):
            raise ConfigError(f"the plan must give both sparsity and bits for every layer: "
                              f"sparsity has {sorted(self.sparsity)}, bits has {sorted(self.bits)}")
        if not self.sparsity:
            raise ConfigError("the plan names no layer: give sparsity and bits per Linear/Conv2d layer")


@dataclass(frozen=True)
class StageResult:
    stage: str
    accuracy: float  # the held-out score of the saved-and-reloaded model
    bytes: int  # arrays as stored
    file_bytes: int  # + safetensors header and JSON manifest

    def ratio(self, baseline: int) -> float:
        return baseline / self.bytes


def recipe(plan: DeepCompressionPlan) -> Recipe:
    """The prune + share stages as a recipe: magnitude (per-layer sparsity), then kmeans (per-layer bits)."""
    layers = sorted(plan.sparsity)
    first = layers[0]
    return Recipe.from_dict({
        "name": "deep-compression",
        "stages": [
            {"pass": "magnitude", "targets": {"include": layers},
             "config": {"sparsity": plan.sparsity[first], "layout": "bitmask"},  # coded: ~ entropy of positions
             "overrides": {name: {"sparsity": plan.sparsity[name]} for name in layers}},
            {"pass": "kmeans", "targets": {"include": layers},
             "config": {"bits": plan.bits[first]},
             "overrides": {name: {"bits": plan.bits[name]} for name in layers}},
        ],
    })


def fp32_bytes(model: nn.Module) -> int:
    """What the model's parameters and buffers cost in float32."""
    return sum(4 * t.numel() for t in model.state_dict().values() if t.is_floating_point())


def stored_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the stored arrays, bytes of the whole checkpoint's weights + manifest) of a saved model."""
    weights = path / WEIGHTS
    with open(weights, "rb") as fh:
        header = int.from_bytes(fh.read(8), "little")
    payload = weights.stat().st_size - 8 - header
    return payload, weights.stat().st_size + (path / MANIFEST).stat().st_size


Score = Callable[[nn.Module], float]


def _measure(stage: str, model: nn.Module, accuracy: Score, skeleton: Callable[[], nn.Module], folder: Path,
             **save_options: Any) -> tuple[StageResult, nn.Module]:
    """Save, reload into a fresh skeleton, and measure the reloaded model (what ships)."""
    path = save(model, folder / stage, overwrite=True, **save_options)
    loaded = load(path, model=skeleton())
    payload, total = stored_bytes(path)
    return StageResult(stage, accuracy(loaded), payload, total), loaded


def _prune_with_retraining(model: nn.Module, data: TrainingSet, plan: DeepCompressionPlan) -> None:
    """Train while each layer's magnitude mask tightens to its sparsity (cubic schedule); masks applied at the end."""
    n, batch_size = len(data.labels), BATCH_SIZE
    steps_per_epoch = math.ceil(n / batch_size)
    end = int(0.6 * plan.prune_epochs * steps_per_epoch)
    pruners = [GradualPruner(model, GradualConfig(final_sparsity=s, end_step=max(end, 1), every=steps_per_epoch,
                                                  scope="layer"), names=[name])
               for name, s in plan.sparsity.items() if s > 0]
    optimizer = torch.optim.Adam(model.parameters(), lr=plan.prune_lr)
    generator = torch.Generator().manual_seed(plan.seed)
    step = 0
    model.train()
    for _ in range(plan.prune_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(model(data.inputs[index]), data.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for pruner in pruners:
                pruner.step(step)
            step += 1
    for pruner in pruners:  # the schedule ended at its final sparsity; make sure the masks hold
        pruner.step(end)
    model.eval()


def _centroid_batches(data: TrainingSet, plan: DeepCompressionPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(plan.seed + 1)
    order = torch.randperm(len(data.labels), generator=generator)
    return [(data.inputs[order[i:i + BATCH_SIZE]], data.labels[order[i:i + BATCH_SIZE]])
            for i in range(0, len(order), BATCH_SIZE)]


def deep_compress(model: nn.Module, data: TrainingSet, plan: DeepCompressionPlan, skeleton: Callable[[], nn.Module],
                  workdir: Path, accuracy: Score) -> tuple[nn.Module, list[StageResult]]:
    """Run the three stages on a trained classifier; returns the final (reloaded) model and every stage's result.

    `data` is what it retrains on; `accuracy(model)` scores a reloaded model on held-out data (higher
    is better); `skeleton()` builds an untrained model of the same architecture (to reload checkpoints
    into). Training runs on one thread, so results repeat exactly.
    """
    workdir = Path(workdir)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = [_measure("fp32", model, accuracy, skeleton, workdir, entropy=False)[0]]
        _prune_with_retraining(model, data, plan)
        compress(model, recipe(plan))
        # a kmeans stage on its own would also do: the masks are zeros already, so magnitude keeps them
        results.append(_measure("pruned+clustered", model, accuracy, skeleton, workdir, entropy=False)[0])

        def loss_fn(m: nn.Module, batch) -> torch.Tensor:
            return F.cross_entropy(m(batch[0]), batch[1])

        model.train()
        finetune_centroids(model, loss_fn, _centroid_batches(data, plan), epochs=plan.centroid_epochs,
                           lr=plan.centroid_lr)
        model.eval()
        results.append(_measure("+centroid fine-tuning", model, accuracy, skeleton, workdir, entropy=False)[0])
        results.append(_measure("+entropy coding", model, accuracy, skeleton, workdir)[0])
        final, loaded = _measure("+float16 biases", model, accuracy, skeleton, workdir, float_params=plan.float_params)
        results.append(final)
        return loaded, results
    finally:
        torch.set_num_threads(previous)


def describe_results(results: list[StageResult], baseline_bytes: int) -> list[dict[str, Any]]:
    return [{"stage": r.stage, "accuracy": r.accuracy, "bytes": r.bytes, "file_bytes": r.file_bytes,
             "ratio": baseline_bytes / r.bytes} for r in results]
