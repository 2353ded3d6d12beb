"""The joint search's measurements: every option of the space on every layer it applies to, alone in the
float model, with its exact bytes and its latency.

For each option the model is compressed once (a copy, every searched layer the option applies to, by
`compress`), and each layer of that copy is swapped into the float model alone and scored by
`replay.Runner` (blocks before the layer replay their recorded outputs): a sentence encoder by
1 - mean cosine of its embeddings against the float model's, a causal LM by the mean next-token KL.
Bytes are the encoding's own (`Encoding.nbytes`: codes, scales, zeros, indices, factors). Latency is
the compressed module itself, with the kernel it chose, timed on one fixed input (the median of a few
runs after a warm-up that lets it choose), once per (layer shape, encoding): a cost model that adds
up, not a promise about the whole model.

Options are measured one at a time (one compressed copy alive at once), and `on_option` is called with
each option's cells as soon as they are known, so a run folder can keep them and a resumed search
skip them (`done`).
"""

from __future__ import annotations

import copy
import fnmatch
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from modelpress.compress import compress
from modelpress.data.batches import tokenised_batches
from modelpress.errors import ConfigError, ModelpressError
from modelpress.evaluate.fidelity import fidelity
from modelpress.recipe import Recipe
from modelpress.search.lm_sensitivity import next_token_kl, next_token_log_probs
from modelpress.search.replay import Runner
from modelpress.search.sensitivity import MAX_QUERIES
from modelpress.search.space import Option, applies

__all__ = ["Cell", "LayerInfo", "OptionTable", "measure_table", "searchable_layers", "time_module"]

LATENCY_TOKENS = 32  # rows of the fixed input a layer is timed on
LATENCY_RUNS = 3


@dataclass(frozen=True)
class LayerInfo:
    """A searched layer, or a group of layers searched as one (`members`: every member takes the same option;
    `name` is then the group's pattern, `shape` its first member's)."""

    name: str
    kind: str  # the float module's class name
    shape: tuple[int, ...]
    params: int
    float_bytes: int
    members: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The model's layers this row stands for."""
        return self.members or (self.name,)


@dataclass(frozen=True)
class Cell:
    """One option on one layer, alone in the float model."""

    encoding: str
    bytes: int
    damage: float  # 1 - mean cosine (encoders) or next-token KL in nats (causal LMs)
    latency_s: float
    mean_cosine: float | None = None
    kl: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Cell":
        return cls(str(data["encoding"]), int(data["bytes"]), float(data["damage"]), float(data["latency_s"]),
                   data.get("mean_cosine"), data.get("kl"))


@dataclass
class OptionTable:
    layers: list[LayerInfo]
    options: list[Option]
    cells: dict[str, dict[str, Cell]]  # option label -> layer name -> cell (layers it applies to)
    float_cells: dict[str, Cell]  # layer name -> the layer left in float (always an option)

    def choices(self, layer: str) -> list[tuple[str, Cell]]:
        """(label, cell) of every option measured on `layer`, the float layer ("float") last."""
        out = [(o.label, self.cells[o.label][layer]) for o in self.options if layer in self.cells.get(o.label, {})]
        return out + [("float", self.float_cells[layer])]


def searchable_layers(model: nn.Module, options: Sequence[Option], include: Sequence[str] = ("*",),
                      ignore: Sequence[str] = (), groups: Sequence[str] = ()) -> list[LayerInfo]:
    """Every module with a weight that at least one option applies to, matched by `include` and not `ignore`.
    Layers matching a pattern of `groups` (the first that matches) form one row, searched as one layer: fewer
    rows to measure on a large model (e.g. one layer type over a range of blocks)."""
    out, seen = [], set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not name or not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in include) or any(fnmatch.fnmatchcase(name, p) for p in ignore):
            continue
        if any(applies(o, module) for o in options):
            seen.add(id(weight))
            out.append(LayerInfo(name, type(module).__name__, tuple(weight.shape), weight.numel(),
                                 weight.numel() * weight.element_size()))
    if not out:
        raise ConfigError("no layer of the model can take any option of the search space: check --include")
    return _grouped(out, groups) if groups else out


def _grouped(layers: list[LayerInfo], groups: Sequence[str]) -> list[LayerInfo]:
    rows: dict[str, list[LayerInfo]] = {}
    for info in layers:
        key = next((p for p in groups if fnmatch.fnmatchcase(info.name, p)), info.name)
        rows.setdefault(key, []).append(info)
    out = []
    for key, members in rows.items():
        if len(members) == 1 and key == members[0].name:
            out.append(members[0])
            continue
        kinds = {m.kind for m in members}
        if len(kinds) > 1:
            raise ConfigError(f"the group {key!r} holds layers of several kinds ({sorted(kinds)}): give a pattern "
                              "that matches one kind of layer")
        out.append(LayerInfo(key, members[0].kind, members[0].shape, sum(m.params for m in members),
                             sum(m.float_bytes for m in members), tuple(m.name for m in members)))
    return out


def time_module(module: nn.Module, info: LayerInfo, runs: int = LATENCY_RUNS) -> float:
    """Median seconds of one forward of `module` on a fixed input of LATENCY_TOKENS rows, after a warm-up."""
    gen = torch.Generator().manual_seed(0)
    if info.kind == "Embedding":
        x = torch.randint(0, info.shape[0], (1, LATENCY_TOKENS), generator=gen)
    else:
        x = torch.randn(1, LATENCY_TOKENS, info.shape[1], generator=gen)
    times = []
    with torch.inference_mode():
        module(x)  # warm-up: a compressed module may choose its kernel here
        for _ in range(runs):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    if hasattr(module, "release"):
        module.release()
    return statistics.median(times)


def _score(runner: Runner, causal: bool, got: torch.Tensor) -> tuple[float, float | None, float | None]:
    if causal:
        kl = next_token_kl(runner.reference, got)
        return kl, None, kl
    cos = fidelity(runner.reference, got, n_queries=min(MAX_QUERIES, len(got))).mean_cosine
    return 1.0 - cos, cos, None


def _cell(runner: Runner, causal: bool, info: LayerInfo, variant: nn.Module, timings: dict[tuple, float]) -> Cell:
    """The row `info` of `variant` (every member) swapped into the float model alone, scored."""
    encodings, total, latency = [], 0, 0.0
    modules = {n: variant.get_submodule(n) for n in info.names}
    for name, module in modules.items():
        enc = getattr(module, "encoding", None)
        if enc is None:
            w = module.weight
            encoding, nbytes = str(w.dtype).replace("torch.", ""), w.numel() * w.element_size()
        else:
            encoding, nbytes = enc.describe(), int(enc.nbytes)
        key = (info.kind, tuple(module.weight.shape if enc is None else enc.shape), type(module).__name__, encoding)
        if key not in timings:  # timed once per shape and encoding
            timings[key] = time_module(module, _member(info, key[1]))
        encodings.append(encoding)
        total += nbytes
        latency += timings[key]
    damage, cos, kl = _score(runner, causal, runner.encode_with_all(modules))
    return Cell(encodings[0] if len(set(encodings)) == 1 else " | ".join(sorted(set(encodings))), total, damage,
                latency, cos, kl)


def _member(info: LayerInfo, shape: tuple[int, ...]) -> LayerInfo:
    return LayerInfo(info.name, info.kind, tuple(shape), 0, 0)


def make_runner(model: nn.Module, inputs: Any, causal: bool, batch_size: int = 64) -> Runner:
    """A Runner on sentences (an encoder) or on (n, T) token windows (a causal LM)."""
    if causal:
        batches = [([i], {"input_ids": inputs[i:i + 1], "use_cache": False}) for i in range(len(inputs))]
        return Runner(model, batches, output=next_token_log_probs)
    return Runner(model, tokenised_batches(model, list(inputs), batch_size, longest_first=True))


def measure_table(model: nn.Module, layers: Sequence[LayerInfo], options: Sequence[Option], runner: Runner,
                  causal: bool, calibration: Any = None, done: dict[str, dict[str, Cell]] | None = None,
                  on_option: Callable[[str, dict[str, Cell]], None] | None = None,
                  advance: Callable[[str], None] | None = None) -> OptionTable:
    """Measure every option on every layer it applies to (see the module docstring); options in `done` are
    taken as measured."""
    done = dict(done or {})
    floats, timings = {}, {}
    for info in layers:
        latency = 0.0
        for name in info.names:
            module = model.get_submodule(name)
            key = (info.kind, tuple(module.weight.shape), type(module).__name__, "float")
            if key not in timings:
                timings[key] = time_module(module, _member(info, key[1]))
            latency += timings[key]
        floats[info.name] = Cell("float32", info.float_bytes, 0.0, latency, None if causal else 1.0,
                                 0.0 if causal else None)
    cells: dict[str, dict[str, Cell]] = {}
    for option in options:
        rows = [i for i in layers if all(applies(option, model.get_submodule(n)) for n in i.names)]
        if option.label in done and set(done[option.label]) == {i.name for i in rows}:
            cells[option.label] = done[option.label]
        elif rows:
            variant = _compressed(model, option, [n for i in rows for n in i.names], calibration)
            cells[option.label] = {info.name: _cell(runner, causal, info, variant, timings) for info in rows}
            del variant
            if on_option:
                on_option(option.label, cells[option.label])
        if advance:
            advance(option.label)
    return OptionTable(list(layers), list(options), cells, floats)


def _compressed(model: nn.Module, option: Option, names: list[str], calibration: Any) -> nn.Module:
    try:
        return compress(copy.deepcopy(model), Recipe((option.stage(names),), name=option.label), calibration)
    except ModelpressError as exc:
        raise ConfigError(f"search option {option.label!r} failed on this model ({exc}); "
                          "drop it from the space") from exc
