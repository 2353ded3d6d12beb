"""The model's repeated blocks: finding them, checking they form a chain, and running them safely.

`find_blocks` picks the longest ModuleList of same-type modules (e.g. `encoder.layer`). A walk
catches block 0's inputs for every batch (a pre-hook that stops the forward there) and re-runs each
processed block to get the next block's inputs, which is only right when block i+1 consumes block
i's output (`blocks_chain` checks it on one real forward). Every forward is `guarded`: a batch the
model cannot take becomes a CalibrationError naming the batch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from modelpress.calibration.inputs import CalibrationBatch
from modelpress.calibration.stats import NonFinite
from modelpress.errors import CalibrationError, ModelpressError

__all__ = ["FORWARD_ERRORS", "StopForward", "blocks_chain", "capture_block_inputs", "find_blocks", "first_tensor",
           "forward", "guarded", "hidden_input", "run_block", "with_hidden"]

FORWARD_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's sequence of repeated blocks: the longest ModuleList of >= 2 same-type modules."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    return best


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A block's hidden-state input: its first positional argument, or `hidden_states`."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


def first_tensor(output: Any) -> torch.Tensor | None:
    """A block's hidden-state output: the tensor itself, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def blocks_chain(model: nn.Module, blocks: nn.ModuleList, batch: CalibrationBatch) -> bool:
    """Whether, on one real forward, each block runs once, in order, on the previous block's output."""
    seen: list[tuple[int, torch.Tensor | None, torch.Tensor | None]] = []
    handles = []
    for i, block in enumerate(blocks):
        def pre(module, args, kwargs, i=i):
            seen.append((i, hidden_input(args, kwargs), None))

        def post(module, args, kwargs, output, i=i):
            index, hidden, _ = seen[-1]
            seen[-1] = (index, hidden, first_tensor(output))

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        forward(model, batch, 0)
    finally:
        for h in handles:
            h.remove()
    if [i for i, _, _ in seen] != list(range(len(blocks))):
        return False
    for (_, _, out), (_, nxt, _) in zip(seen, seen[1:]):
        if out is None or nxt is None or not (out is nxt or (out.shape == nxt.shape and torch.equal(out, nxt))):
            return False
    return seen[0][1] is not None and seen[-1][2] is not None


class StopForward(Exception):
    """Raised by the catcher to end a forward once block 0's inputs are captured."""


def forward(model: nn.Module, batch: CalibrationBatch, index: int) -> Any:
    """One whole-model forward call; a batch the model cannot take becomes a CalibrationError."""
    return guarded(lambda: batch.run(model), index)


def run_block(block: nn.Module, inputs: tuple[tuple, dict], index: int) -> Any:
    """One block's forward on batch `index`'s captured inputs."""
    args, kwargs = inputs
    return guarded(lambda: block(*args, **kwargs), index)


def guarded(call: Callable[[], Any], index: int) -> Any:
    try:
        return call()
    except (StopForward, ModelpressError, NonFinite):
        raise
    except FORWARD_ERRORS as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CalibrationError(
            f"calibration batch {index} does not fit the model ({type(exc).__name__}: {first}); "
            "give inputs shaped as the model's forward expects, e.g. model.tokenize(sentences)"
        ) from exc


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[CalibrationBatch]):
    """Block 0's (args, kwargs) for every batch, stopping each forward at the block (the catcher)."""
    captured: list[tuple[tuple, dict]] = []

    def catch(module, args, kwargs):
        captured.append((args, kwargs))
        raise StopForward

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            try:
                forward(model, batch, i)
            except StopForward:
                continue
            raise CalibrationError(f"calibration batch {i} never reached the model's first block; "
                                   "give inputs that run the whole model")
    finally:
        handle.remove()
    return captured
