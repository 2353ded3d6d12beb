"""Hooks that measure target layers: which run and share an input (`probe`), and their statistics (`measure`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from modelpress.calibration.blocks import StopForward
from modelpress.calibration.stats import LayerStats, NonFinite, real_tokens
from modelpress.errors import CalibrationError

__all__ = ["Layout", "Recorder", "measure", "probe"]


class Recorder:
    """Forward pre-hooks that add each watched layer's real input tokens to its LayerStats.

    With `stop`, the hook ends the forward once it has recorded (the layers after it are not
    needed); only used where every watched layer runs exactly once per forward.
    """

    def __init__(self, modules: dict[str, nn.Module], stats: dict[str, LayerStats], stop: bool = False):
        self.mask: torch.Tensor | None = None
        self.batch = 0
        self.stop = stop
        self.handles = [m.register_forward_pre_hook(self._hook(name, stats[name]), with_kwargs=True)
                        for name, m in modules.items()]

    def _hook(self, name: str, stats: LayerStats):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            try:
                stats.update(real_tokens(x.detach(), self.mask))
            except NonFinite:
                raise CalibrationError(
                    f"the input of layer {name!r} holds NaN or infinite values on calibration batch {self.batch}: "
                    "the model overflows on this data; check the inputs and run the model in float32"
                ) from None
            if self.stop:
                raise StopForward

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Layout:
    """Target layers of one forward, as seen by a probe run on one batch."""

    groups: list[list[str]]  # in execution order; the layers of a group read the same input tensor
    unreached: list[str]  # layers the forward never called
    once: bool  # every layer was called exactly once


def probe(names: list[str], modules: dict[str, nn.Module], call: Callable[[], Any]) -> Layout:
    """Run `call` once and see which target layers run, in which order, and which share an input."""
    order: list[tuple[str, torch.Tensor]] = []
    calls = dict.fromkeys(names, 0)
    handles = []
    for name in names:
        def hook(module, args, kwargs, name=name):
            calls[name] += 1
            if calls[name] == 1:
                order.append((name, args[0] if args else kwargs.get("input")))

        handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    for name, x in order:
        for group, seen in zip(groups, inputs):
            if x is seen:
                group.append(name)
                break
        else:
            groups.append([name])
            inputs.append(x)
    return Layout(groups, [n for n in names if calls[n] == 0], all(c == 1 for c in calls.values() if c))


def measure(
    modules: dict[str, nn.Module],
    groups: list[list[str]],
    runs: Iterable[tuple[int, torch.Tensor | None, Callable[[], Any]]],
    hessian: bool,
    stop: bool = False,
) -> dict[str, LayerStats]:
    """LayerStats for every layer of `groups` over `runs` ((batch index, token mask, forward call))."""
    stats: dict[str, LayerStats] = {}
    first = {}
    for group in groups:
        shared = LayerStats.empty(modules[group[0]].in_features, hessian)  # one input, one statistic
        for name in group:
            stats[name] = shared
        first[group[0]] = modules[group[0]]
    recorder = Recorder(first, stats, stop)
    try:
        for index, mask, call in runs:
            recorder.mask, recorder.batch = mask, index
            try:
                call()
            except StopForward:
                pass
    finally:
        recorder.remove()
    return stats
