"""Calibration capture: the one mechanism that feeds data-aware passes (GPTQ now; AWQ, SmoothQuant,
Wanda, SparseGPT, activation-aware SVD later) with statistics of their layers' inputs.

Calibration data is normalised into batches (`prepare_batches`): sentences are tokenised with
`model.tokenize`, dicts of tensors are keyword inputs, tensors (or tuples of tensors) positional
ones. The `attention_mask` of a batch, when it has one, marks the real tokens: padded positions
never enter a statistic.

`run_blockwise` walks the model's sequence of repeated blocks (e.g. `encoder.layer`):

    1. catch block 0's inputs (args and kwargs) for every batch with a pre-hook that stops the
       forward there (the "catcher");
    2. for block i: run it on every batch with hooks on its target layers, which accumulate each
       layer's `LayerStats`; hand the layers to the pass (which may replace them, e.g. quantise);
       layers are visited in execution order, in groups that share one input (q/k/v), and each
       group is measured after the groups before it were processed ("true sequential");
    3. re-run the processed block on every batch: its outputs are block i+1's inputs.

So memory is bounded by one block's activations for the calibration set, plus the statistics
of one group of layers; never all layers' activations. Target layers outside the blocks (a
pooler, or every layer of a model without repeated blocks) are measured afterwards by plain
whole-model forwards with hooks. A model whose blocks do not form a chain (block i+1 does not
consume block i's output) is measured layer by layer with whole-model forwards instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from modelpress._libc import libc
from modelpress.data.corpus import corpus_splits, stdlib_sentences
from modelpress.errors import CalibrationError, ModelpressError

__all__ = [
    "CalibrationBatch",
    "LayerStats",
    "ProcessFn",
    "calibration_sentences",
    "find_blocks",
    "prepare_batches",
    "real_tokens",
    "run_blockwise",
]

DEFAULT_BATCH_SIZE = 32  # sentences per tokenised batch
_FORWARD_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError)


def calibration_sentences(n: int = 128, seed: int = 0) -> list[str]:
    """`n` English sentences for calibration, disjoint from any evaluation set of the corpus.

    Evaluation takes the first sentences of the shuffled corpus (`corpus_splits(...).evaluation`);
    calibration takes the last `n`, so the two never overlap however many sentences an
    evaluation uses (short of the whole corpus).
    """
    total = len(stdlib_sentences(seed))
    if not 1 <= n < total:
        raise CalibrationError(f"calibration_sentences(n={n}): ask for between 1 and {total - 1} sentences")
    return list(corpus_splits(n_eval=total - n, n_calib=n, seed=seed).calibration)


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class LayerStats:
    """What data-aware passes learn about one layer's input x (C channels) over calibration tokens."""

    hessian: torch.Tensor | None  # (C, C) float32: sum over tokens of x x^T (None when not asked)
    abs_sum: torch.Tensor  # (C,) float64: sum over tokens of |x|
    abs_max: torch.Tensor  # (C,) float32: max over tokens of |x|
    tokens: int = 0
    # per token: max |x| over its batch / max |x| over the token, i.e. how much coarser one activation
    # range per call is for that token than a range of its own would be (one (N,) tensor per batch)
    range_ratios: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, channels: int, hessian: bool = True) -> "LayerStats":
        return cls(
            hessian=torch.zeros(channels, channels, dtype=torch.float32) if hessian else None,
            abs_sum=torch.zeros(channels, dtype=torch.float64),
            abs_max=torch.zeros(channels, dtype=torch.float32),
        )

    @property
    def token_range_ratio(self) -> float:
        """Median over tokens of range_ratios: 8 means a typical token loses 3 of its 8 bits to the call's range."""
        return float(torch.cat(self.range_ratios).median()) if self.range_ratios else 1.0

    @property
    def mean_abs(self) -> torch.Tensor:
        """(C,) mean |x| per input channel."""
        return self.abs_sum / max(self.tokens, 1)

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens x ((N, C), padding already removed)."""
        x = x.float()
        if not len(x):
            return
        batch_max = torch.linalg.vector_norm(x, float("inf"), dim=0)  # max |x| without an |x| copy
        if not torch.isfinite(batch_max).all():
            raise _NonFinite()
        self.abs_max = torch.maximum(self.abs_max, batch_max)
        token_max = torch.maximum(x.amax(1), x.amin(1).neg_())  # (N,) max |x|: two fast reductions, no |x| copy
        self.range_ratios.append(token_max.max() / token_max.clamp_min(torch.finfo(torch.float32).tiny))
        self.abs_sum += torch.linalg.vector_norm(x, 1, dim=0).double()
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)  # (C, C), accumulated in place: no (C, C) temporary
        self.tokens += len(x)


class _NonFinite(Exception):
    """Raised inside a hook; the runner turns it into a CalibrationError naming the layer and batch."""


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer input (..., C) as (N, C) rows, without padded positions where the mask lines up."""
    if mask is not None and not mask.all():
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask]  # (B, T, C) -> (N, C)
        elif x.dim() == 2 and x.shape[0] == mask.numel() and mask.numel() > 1:
            x = x[mask.reshape(-1)]  # (B*T, C) -> (N, C)
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class CalibrationBatch:
    """One forward call's inputs, and which of its token positions are real (not padding)."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None  # (B, T) bool

    def run(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)


def prepare_batches(model: nn.Module, calibration: Any, batch_size: int = DEFAULT_BATCH_SIZE) -> list[CalibrationBatch]:
    """Calibration data as forward-call batches: a list of sentences, of dicts of tensors, or of tensors."""
    if isinstance(calibration, (str, bytes)):
        raise CalibrationError("calibration is one string: give a list of sentences, e.g. calibration_sentences(128)")
    if isinstance(calibration, (torch.Tensor, dict)):
        calibration = [calibration]
    try:
        items = list(calibration)
    except TypeError:
        raise CalibrationError(
            f"calibration of type {type(calibration).__name__} is not supported: give a list of sentences, "
            "of input dicts (e.g. model.tokenize(...)) or of input tensors"
        ) from None
    if not items:
        raise CalibrationError("the calibration set is empty: give at least one sentence or input batch, "
                               "e.g. calibration_sentences(128)")
    kinds = {_kind(item, i) for i, item in enumerate(items)}
    if len(kinds) > 1:
        raise CalibrationError(f"calibration mixes {sorted(kinds)}: give only sentences, only dicts or only tensors")
    kind = kinds.pop()
    if kind == "sentences":
        batches = _tokenised(model, items, batch_size)
    elif kind == "dicts":
        batches = [CalibrationBatch(kwargs=dict(item), token_mask=_mask_of(item, i)) for i, item in enumerate(items)]
    else:
        batches = [CalibrationBatch(args=tuple(item) if isinstance(item, (tuple, list)) else (item,))
                   for item in items]
    for i, batch in enumerate(batches):
        _check_tensors(batch, i)
    return batches


def _kind(item: Any, index: int) -> str:
    if isinstance(item, str):
        return "sentences"
    if isinstance(item, dict):
        for key, value in item.items():
            if not isinstance(key, str) or not (value is None or isinstance(value, torch.Tensor)):
                raise CalibrationError(
                    f"calibration batch {index}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                    "give dicts of tensors such as model.tokenize(sentences)"
                )
        return "dicts"
    if isinstance(item, torch.Tensor):
        return "tensors"
    if isinstance(item, (tuple, list)) and item and all(isinstance(t, torch.Tensor) for t in item):
        return "tensors"
    raise CalibrationError(
        f"calibration item {index} is a {type(item).__name__}: give sentences (str), input dicts of tensors, "
        "or input tensors"
    )


def _tokenised(model: nn.Module, sentences: list[str], batch_size: int) -> list[CalibrationBatch]:
    """Sentences tokenised in batches of similar length (less padding), in a deterministic order."""
    tokenize = getattr(model, "tokenize", None)
    if not callable(tokenize):
        raise CalibrationError(
            f"calibration sentences need a model with a tokenizer (a SentenceEncoder), not a "
            f"{type(model).__name__}: give tokenised input batches (dicts of tensors) instead"
        )
    order = sorted(range(len(sentences)), key=lambda i: (len(sentences[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        inputs = tokenize([sentences[i] for i in order[start:start + batch_size]])
        batches.append(CalibrationBatch(kwargs=inputs, token_mask=_mask_of(inputs, len(batches))))
    return batches


def _mask_of(inputs: dict[str, Any], index: int) -> torch.Tensor | None:
    """The (B, T) bool mask of real tokens from an input dict's `attention_mask`, checked against `input_ids`."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return None
    ids = inputs.get("input_ids")
    if mask.dim() != 2 or (ids is not None and tuple(ids.shape) != tuple(mask.shape)):
        ids_shape = None if ids is None else tuple(ids.shape)
        raise CalibrationError(
            f"calibration batch {index}: attention_mask has shape {tuple(mask.shape)} but input_ids {ids_shape}: "
            "give a (batch, tokens) mask with the same shape as input_ids"
        )
    return mask.bool()


def _check_tensors(batch: CalibrationBatch, index: int) -> None:
    tensors = list(batch.args) + [v for v in batch.kwargs.values() if v is not None]
    for t in tensors:
        if t.numel() == 0:
            raise CalibrationError(f"calibration batch {index} holds an empty tensor of shape {tuple(t.shape)}: "
                                   "give at least one token per batch")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CalibrationError(f"calibration batch {index} holds NaN or infinite values: "
                                   "clean the calibration inputs")


# ---------------------------------------------------------------------------------------------
# Finding the blocks


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's sequence of repeated blocks: the longest ModuleList of >= 2 same-type modules."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    return best


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A block's hidden-state input: its first positional argument, or `hidden_states`."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


def _first_tensor(output: Any) -> torch.Tensor | None:
    """A block's hidden-state output: the tensor itself, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _blocks_chain(model: nn.Module, blocks: nn.ModuleList, batch: CalibrationBatch) -> bool:
    """Whether, on one real forward, each block runs once, in order, on the previous block's output."""
    seen: list[tuple[int, torch.Tensor | None, torch.Tensor | None]] = []
    handles = []
    for i, block in enumerate(blocks):
        def pre(module, args, kwargs, i=i):
            seen.append((i, _hidden(args, kwargs), None))

        def post(module, args, kwargs, output, i=i):
            index, hidden, _ = seen[-1]
            seen[-1] = (index, hidden, _first_tensor(output))

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        _forward(model, batch, 0)
    finally:
        for h in handles:
            h.remove()
    if [i for i, _, _ in seen] != list(range(len(blocks))):
        return False
    for (_, _, out), (_, nxt, _) in zip(seen, seen[1:]):
        if out is None or nxt is None or not (out is nxt or (out.shape == nxt.shape and torch.equal(out, nxt))):
            return False
    return seen[0][1] is not None and seen[-1][2] is not None


# ---------------------------------------------------------------------------------------------
# Running


class _Stop(Exception):
    """Raised by the catcher to end a forward once block 0's inputs are captured."""


ProcessFn = Callable[[list[tuple[Any, LayerStats]]], None]


def _forward(model: nn.Module, batch: CalibrationBatch, index: int) -> Any:
    """One whole-model forward call; a batch the model cannot take becomes a CalibrationError."""
    return _guarded(lambda: batch.run(model), index)


def _run_block(block: nn.Module, inputs: tuple[tuple, dict], index: int) -> Any:
    """One block's forward on batch `index`'s captured inputs."""
    args, kwargs = inputs
    return _guarded(lambda: block(*args, **kwargs), index)


def _guarded(call: Callable[[], Any], index: int) -> Any:
    try:
        return call()
    except (_Stop, ModelpressError, _NonFinite):
        raise
    except _FORWARD_ERRORS as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CalibrationError(
            f"calibration batch {index} does not fit the model ({type(exc).__name__}: {first}); "
            "give inputs shaped as the model's forward expects, e.g. model.tokenize(sentences)"
        ) from exc


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[CalibrationBatch]):
    """Block 0's (args, kwargs) for every batch, stopping each forward at the block (the catcher)."""
    captured: list[tuple[tuple, dict]] = []

    def catch(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            try:
                _forward(model, batch, i)
            except _Stop:
                continue
            raise CalibrationError(f"calibration batch {i} never reached the model's first block; "
                                   "give inputs that run the whole model")
    finally:
        handle.remove()
    return captured


class _Recorder:
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
            except _NonFinite:
                raise CalibrationError(
                    f"the input of layer {name!r} holds NaN or infinite values on calibration batch {self.batch}: "
                    "the model overflows on this data; check the inputs and run the model in float32"
                ) from None
            if self.stop:
                raise _Stop

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class _Layout:
    """Target layers of one forward, as seen by a probe run on one batch."""

    groups: list[list[str]]  # in execution order; the layers of a group read the same input tensor
    unreached: list[str]  # layers the forward never called
    once: bool  # every layer was called exactly once


def _probe(names: list[str], modules: dict[str, nn.Module], call: Callable[[], Any]) -> _Layout:
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
    return _Layout(groups, [n for n in names if calls[n] == 0], all(c == 1 for c in calls.values() if c))


def _measure(
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
    recorder = _Recorder(first, stats, stop)
    try:
        for index, mask, call in runs:
            recorder.mask, recorder.batch = mask, index
            try:
                call()
            except _Stop:
                pass
    finally:
        recorder.remove()
    return stats


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
    model.eval()
    try:
        with torch.no_grad():
            rest = walk.blocks([t.name for t in targets])
            if rest:
                walk.whole(rest)
    finally:
        for m, mode in was_training.items():
            m.train(mode)


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
        if not _blocks_chain(self.model, blocks, self.batches[0]):
            self.log.append(f"calibration: blocks {prefix!r} do not form a chain; measured with whole-model forwards")
            return names
        last = max(i for i, group in enumerate(inside) if group)
        inputs = _capture_block_inputs(self.model, blocks[0], self.batches)  # [(args, kwargs)] per batch
        for i in range(last + 1):
            if inside[i]:
                self.block(blocks[i], inside[i], inputs)
            if i < last:  # the processed block's outputs are the next block's inputs
                inputs = [_with_hidden(*x, _first_tensor(_run_block(blocks[i], x, j))) for j, x in enumerate(inputs)]
            release_free_memory()
        handled = {n for group in inside for n in group}
        return [n for n in names if n not in handled]

    def block(self, block: nn.Module, names: list[str], inputs: list[tuple[tuple, dict]]) -> None:
        """Measure and process one block's target layers, group by group in execution order."""
        layout = _probe(names, self.linears(names), lambda: _run_block(block, inputs[0], 0))
        self.skip(layout.unreached)
        parts = [[g] for g in layout.groups] if self.sequential else [layout.groups]
        for part in parts:
            runs = [(j, self.batches[j].token_mask, lambda j=j, x=x: _run_block(block, x, j))
                    for j, x in enumerate(inputs)]
            # one group at a time: each forward can stop at the group's input
            self.measure_and_process(part, runs, stop=self.sequential and layout.once)
        _release(block)

    def whole(self, names: list[str]) -> None:
        """Layers outside the blocks: measured together by whole-model forwards, then processed."""
        model, batches = self.model, self.batches
        layout = _probe(names, self.linears(names), lambda: _forward(model, batches[0], 0))
        self.skip(layout.unreached)
        runs = [(j, b.token_mask, lambda j=j, b=b: _forward(model, b, j)) for j, b in enumerate(batches)]
        self.measure_and_process(layout.groups, runs, stop=False)
        _release(model)

    def measure_and_process(self, groups: list[list[str]], runs, stop: bool) -> None:
        modules = self.linears([n for g in groups for n in g])  # the current (unprocessed) modules
        stats = _measure(modules, groups, runs, self.hessian, stop)
        for group in groups:
            self.process([(self.targets[n], stats[n]) for n in group])

    def linears(self, names: Iterable[str]) -> dict[str, nn.Module]:
        return {n: self.model.get_submodule(n) for n in names}

    def skip(self, names: Iterable[str]) -> None:
        for name in names:
            self.log.append(f"{name}: skipped by {self.pass_name}: no calibration token reached it, it stays float")


def _release(module: nn.Module) -> None:
    """Drop kernels (and decoded weight copies) that calibration forwards prepared in compressed modules."""
    for m in module.modules():
        release = getattr(m, "release", None)
        if callable(release) and m is not module:
            release()
