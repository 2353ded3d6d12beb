"""Memory a model takes while it runs: the tensors it keeps, the process's resident set, and its
peak over a piece of work.

`resident_bytes(model)` counts every tensor storage reachable from the model once: parameters,
buffers, the arrays of encodings, and what prepared kernels keep (a decoded dense copy, packed
codes captured by a closure, fbgemm's packed weights), so a kernel that quietly holds an fp32 copy
of a 4-bit weight shows. Storages shared by several tensors (tied embeddings, views) count once.
The process figures come from Linux's /proc/self/status (VmRSS, VmHWM); the peak over a block of
work is measured by resetting the high-water mark first (`echo 5 > /proc/self/clear_refs`), and is
None where that is not possible, rather than a lifetime peak passed off as the block's.
"""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PeakRSS", "peak_rss", "resident_bytes", "rss_bytes"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_MAX_OBJECTS = 1_000_000  # a bound on the walk: a model reaching more objects than this is not plain data


def rss_bytes() -> int | None:
    """The process's resident set now (VmRSS), or None off Linux."""
    return _status_bytes("VmRSS")


@dataclass
class PeakRSS:
    """Resident set before a block of work and its highest point during it (None where unmeasurable)."""

    before_bytes: int | None = None
    peak_bytes: int | None = None

    @property
    def increase_bytes(self) -> int | None:
        """How far the block's peak rose above the resident set it started from."""
        if self.before_bytes is None or self.peak_bytes is None:
            return None
        return max(self.peak_bytes - self.before_bytes, 0)


@contextmanager
def peak_rss() -> Iterator[PeakRSS]:
    """`with peak_rss() as p: work()`: p.peak_bytes is the process's highest resident set during the block."""
    result = PeakRSS(before_bytes=rss_bytes())
    reset = _reset_high_water_mark()
    try:
        yield result
    finally:
        result.peak_bytes = _status_bytes("VmHWM") if reset else None


def _reset_high_water_mark() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage reachable from `model` (see the module's docstring)."""
    tensors = list(_reachable_tensors(model))  # all alive at once: no freed address is seen twice
    storages: dict[tuple[int, int], int] = {}
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    return sum(storages.values())


def _reachable_tensors(root: object) -> Iterator[torch.Tensor]:
    """Tensors reachable from `root` through modules, containers, closures and modelpress/torch objects."""
    seen: set[int] = set()
    stack = [root]
    while stack and len(seen) < _MAX_OBJECTS:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, torch.ScriptObject):
            yield from _script_object_tensors(obj)
        else:
            stack.extend(_children(obj))


def _children(obj: object) -> list:
    """What a walk for tensors looks into: plain containers, modules, closures, and our own objects."""
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, types.FunctionType):
        return [c.cell_contents for c in (obj.__closure__ or ()) if _cell_full(c)] + list(obj.__defaults__ or ())
    if isinstance(obj, types.MethodType):
        return [obj.__self__, obj.__func__]
    if isinstance(obj, functools.partial):
        return [obj.func, *obj.args, *obj.keywords.values()]
    if isinstance(obj, nn.Module) or type(obj).__module__.startswith("modelpress."):
        fields = dict(getattr(obj, "__dict__", {}))
        fields.update({s: getattr(obj, s) for s in getattr(type(obj), "__slots__", ()) if hasattr(obj, s)})
        return list(fields.values())
    return []


def _cell_full(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _script_object_tensors(obj: torch.ScriptObject) -> Iterator[torch.Tensor]:
    """The tensors a TorchScript object (fbgemm's packed Linear weights) gives up in its state."""
    getstate = getattr(obj, "__getstate__", None)
    if getstate is None:
        return
    try:
        state = getstate()
    except RuntimeError:
        return
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
