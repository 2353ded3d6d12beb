"""Running fixed input batches through a model (sentence embeddings, or a causal LM's next-token
log-probabilities), replaying the blocks a change cannot reach.

A layer inside the model's repeated blocks (`encoder.layer.i`) can only change what blocks i..
compute: the outputs of the blocks before it are recorded in the reference run and replayed.
Replay is used only after a check that it reproduces the reference embeddings exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from modelpress.calibration import find_blocks

__all__ = ["Runner"]


class _Replay(nn.Module):
    """Stands in for a block: returns (a copy of) its recorded output for the batch being run."""

    def __init__(self, outputs: list[Any], runner: "Runner"):
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


class Runner:
    """Encodes fixed sentence batches with the model as it is now, replaying the blocks a change cannot reach."""

    def __init__(self, model: nn.Module, batches: list[tuple[list[int], dict]],
                 output: Callable[[Any], torch.Tensor] | None = None):
        """`output` turns what `model(**inputs)` returns into a (B, ...) tensor (default: it is one, e.g. a
        sentence encoder's (B, D) embeddings; a causal LM's next-token log-probabilities for example)."""
        self.model, self.batches, self.batch = model, batches, 0
        self.output = output or (lambda out: out)
        found = find_blocks(model)
        self.blocks: nn.ModuleList | None = found[1] if found else None
        self.outputs: list[list[Any]] = []  # [block][batch]: recorded outputs
        self.before: dict[str, frozenset[int]] = {}  # module name -> blocks that finished before it first ran
        self.reference = self._record()
        if self.blocks is not None and not self._replay_is_exact():
            self.blocks, self.outputs, self.before = None, [], {}

    def encode_with(self, name: str, module: nn.Module) -> torch.Tensor:
        """(N, D) embeddings with `module` swapped in for layer `name`; the original goes back afterwards."""
        original = self.model.get_submodule(name)
        self.model.set_submodule(name, module)
        try:
            return self.encode(self.before.get(name, frozenset()))
        finally:
            self.model.set_submodule(name, original)
            if hasattr(module, "release"):
                module.release()  # drop its decoded copy: 40 of them would be a second float model

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
            parts.append(self.output(self.model(**inputs)).float())  # (B, ...)
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
