"""`run_blockwise`: the calibration walk over a model, block by block, that data-aware passes call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from modelpress._libc import libc
from modelpress.calibration.blocks import (blocks_chain, capture_block_inputs, find_blocks, first_tensor, forward,
                                           run_block, with_hidden)
from modelpress.calibration.hooks import measure, probe
from modelpress.calibration.inputs import DEFAULT_BATCH_SIZE, CalibrationBatch, prepare_batches
from modelpress.calibration.stats import LayerStats
from modelpress.errors import CalibrationError

__all__ = ["ProcessFn", "release_free_memory", "run_blockwise"]

ProcessFn = Callable[[list[tuple[Any, LayerStats]]], None]


def run_blockwise(
    model: nn.Module,
    targets: Sequence[Any],
    calibration: Any,
    process: ProcessFn,
    log: list[str],
    pass_name: str = "calibration",
    hessian: bool = True,
    sequential: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> None:
    """Measure every target Linear's input statistics block by block and hand them to `process`.

    `targets` are objects with `.name` (as in `model.named_modules()`) - the passes' Targets.
    `process` receives one group of (target, stats) at a time, after the layers before it were
    processed; it may replace or change those modules in `model`. With `sequential=False` a
    block's layers are all measured in one forward, before any of them is processed. Layers no
    calibration token reaches are skipped and logged, never passed on.
    """
    if calibration is None:
        raise CalibrationError(
            f"pass {pass_name!r} needs calibration data: call compress(..., calibration=calibration_sentences(128)) "
            "or add --calibration 128 to `modelpress compress`"
        )
    batches = prepare_batches(model, calibration, batch_size)
    for t in targets:
        if not isinstance(model.get_submodule(t.name), nn.Linear):
            raise CalibrationError(f"layer {t.name!r} is not a Linear layer: calibration captures Linear inputs only")
    walk = _Walk(model, batches, {t.name: t for t in targets}, process, log, pass_name, hessian, sequential)
    was_training = {m: m.training for m in model.modules()}
    caches = _without_kv_cache(model)
    model.eval()
    try:
        with torch.no_grad():
            rest = walk.blocks([t.name for t in targets])
            if rest:
                walk.whole(rest)
    finally:
        for m, mode in was_training.items():
            m.train(mode)
        for config, use_cache in caches:
            config.use_cache = use_cache


def _without_kv_cache(model: nn.Module) -> list[tuple[Any, bool]]:
    """Turn off the key/value cache of a causal LM's config(s) for the walk; returns what to restore.

    With a cache, every forward appends its keys and values to a cache object that the catcher
    captures with block 0's inputs, so re-running a block (once per group of layers measured, then
    once for the next block's inputs) would attend to its own earlier runs.
    """
    configs = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if isinstance(getattr(config, "use_cache", None), bool):
            configs[id(config)] = config  # one config is often shared by the model and its inner model
    saved = [(c, c.use_cache) for c in configs.values()]
    for c, _ in saved:
        c.use_cache = False
    return saved


def release_free_memory() -> None:
    """Hand memory the allocator holds but no tensor uses back to the system (glibc's malloc_trim).

    Each block's Hessians, activations and GPTQ work buffers are freed when the block is done, but
    glibc keeps freed heap pages resident, and the next block's differently sized buffers land
    beside them: without this, peak resident memory during a calibrated pass grew by 124-207 MB
    from run to run on MiniLM (2x its 91 MB weights is the budget). No-op off glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim():
    return getattr(libc(), "malloc_trim", None)


@dataclass
class _Walk:
    """One calibration run over a model: its batches, its targets, and what to do with their statistics."""

    model: nn.Module
    batches: list[CalibrationBatch]
    targets: dict[str, Any]
    process: ProcessFn
    log: list[str]
    pass_name: str
    hessian: bool
    sequential: bool

    def blocks(self, names: list[str]) -> list[str]:
        """The block walk; returns the target names it did not handle (outside the blocks)."""
        found = find_blocks(self.model)
        if found is None:
            return names
        prefix, blocks = found
        inside = [[n for n in names if n.startswith(f"{prefix}.{i}.")] for i in range(len(blocks))]
        if not any(inside):
            return names
        if not blocks_chain(self.model, blocks, self.batches[0]):
            self.log.append(f"calibration: blocks {prefix!r} do not form a chain; measured with whole-model forwards")
            return names
        last = max(i for i, group in enumerate(inside) if group)
        inputs = capture_block_inputs(self.model, blocks[0], self.batches)  # [(args, kwargs)] per batch
        for i in range(last + 1):
            if inside[i]:
                self.block(blocks[i], inside[i], inputs)
            if i < last:  # the processed block's outputs are the next block's inputs
                inputs = [with_hidden(*x, first_tensor(run_block(blocks[i], x, j))) for j, x in enumerate(inputs)]
            release_free_memory()
        handled = {n for group in inside for n in group}
        return [n for n in names if n not in handled]

    def block(self, block: nn.Module, names: list[str], inputs: list[tuple[tuple, dict]]) -> None:
        """Measure and process one block's target layers, group by group in execution order."""
        layout = probe(names, self.linears(names), lambda: run_block(block, inputs[0], 0))
        self.skip(layout.unreached)
        parts = [[g] for g in layout.groups] if self.sequential else [layout.groups]
        for part in parts:
            runs = [(j, self.batches[j].token_mask, lambda j=j, x=x: run_block(block, x, j))
                    for j, x in enumerate(inputs)]
            # one group at a time: each forward can stop at the group's input
            self.measure_and_process(part, runs, stop=self.sequential and layout.once)
        release_kernels(block)

    def whole(self, names: list[str]) -> None:
        """Layers outside the blocks: measured together by whole-model forwards, then processed."""
        model, batches = self.model, self.batches
        layout = probe(names, self.linears(names), lambda: forward(model, batches[0], 0))
        self.skip(layout.unreached)
        runs = [(j, b.token_mask, lambda j=j, b=b: forward(model, b, j)) for j, b in enumerate(batches)]
        self.measure_and_process(layout.groups, runs, stop=False)
        release_kernels(model)

    def measure_and_process(self, groups: list[list[str]], runs, stop: bool) -> None:
        modules = self.linears([n for g in groups for n in g])  # the current (unprocessed) modules
        stats = measure(modules, groups, runs, self.hessian, stop)
        for group in groups:
            self.process([(self.targets[n], stats[n]) for n in group])

    def linears(self, names: Iterable[str]) -> dict[str, nn.Module]:
        return {n: self.model.get_submodule(n) for n in names}

    def skip(self, names: Iterable[str]) -> None:
        for name in names:
            self.log.append(f"{name}: skipped by {self.pass_name}: no calibration token reached it, it stays float")


def release_kernels(module: nn.Module) -> None:
    """Drop kernels (and decoded weight copies) that calibration forwards prepared in compressed modules."""
    for m in module.modules():
        release = getattr(m, "release", None)
        if callable(release) and m is not module:
            release()
