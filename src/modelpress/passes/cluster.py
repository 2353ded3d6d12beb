"""k-means weight sharing (Deep Compression, Han et al. 2016) and fine-tuning of the shared values.

The `kmeans` pass replaces each selected layer's weights by <= 2^bits float16 centroids and
per-weight indices (`encodings.clustered`). It *refines*: after a pruning stage it picks up the
pruned layers (CompressedLinear / CompressedConv2d holding a SparseTensor of float kept values)
and clusters only the kept values, so the zeros stay exact and the positions are kept as they
are. Layers whose weights are already quantised or clustered are refused, not silently redone.

`finetune_centroids` is the paper's trained quantisation: each clustered layer's weight becomes
W = codebook[indices] (scattered into the kept positions of a sparse layer), so the gradient of
centroid j is the sum of dL/dW over the weights that share it, which autograd's indexing gives
for free; only the codebooks (and optionally the biases) train, the assignments never change.
`prepare_centroids` / `convert_centroids` are the two halves, for a training loop of one's own.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.encodings import DenseTensor, Encoding
from modelpress.encodings.clustered import ClusteredTensor, KMeansInit, cluster
from modelpress.encodings.packing import INDEX_BITS
from modelpress.encodings.sparse import SparseTensor
from modelpress.errors import ConfigError, UnsupportedError
from modelpress.nn import CompressedConv2d, CompressedLinear, TrainingModule, compressed_twin, install
from modelpress.passes.base import PassContext, Target, register_pass
from modelpress.passes.config import PassConfig, enum_value, pass_config

__all__ = [
    "KMeansConfig",
    "KMeansInit",
    "ClusteredTrainable",
    "cluster_encoding",
    "convert_centroids",
    "finetune_centroids",
    "prepare_centroids",
]


@pass_config
class KMeansConfig(PassConfig):
    """Share each layer's weights among 2^bits float16 centroids found by 1-D k-means."""

    bits: int = 4
    init: KMeansInit = KMeansInit.LINEAR
    iterations: int = 30  # Lloyd iterations (stops early once the centroids no longer move)
    seed: int = 0  # for init: random

    def validate(self) -> None:
        object.__setattr__(self, "init", enum_value(KMeansInit, self.init, "init"))
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in INDEX_BITS:
            raise ConfigError(f"bits {self.bits!r} is not valid for k-means: use an integer in 1..8 (2^bits centroids)")
        for name in ("iterations", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} {value!r} is not valid: use a non-negative integer")

    def describe(self) -> str:
        return f"k-means {1 << self.bits} centroids ({self.init.value} init)"


# ---------------------------------------------------------------------------------------------
# The pass


def cluster_encoding(name: str, weight: Encoding | torch.Tensor, cfg: KMeansConfig) -> Encoding:
    """The clustered form of a float weight, or of a sparse weight's float kept values (positions kept)."""
    def run(w: torch.Tensor) -> ClusteredTensor:
        try:
            return cluster(w, cfg.bits, cfg.init, cfg.iterations, cfg.seed)
        except ConfigError as exc:
            raise ConfigError(f"layer {name!r}: {exc}") from None

    if isinstance(weight, torch.Tensor):
        return run(weight.float())
    if isinstance(weight, DenseTensor):
        return run(weight.decode(torch.float32))
    if isinstance(weight, SparseTensor) and isinstance(weight.values, DenseTensor):
        return dataclasses.replace(weight, values=run(weight.values.decode(torch.float32)))
    what = f"sparse with {weight.values.kind} values" if isinstance(weight, SparseTensor) else weight.kind
    raise UnsupportedError(f"layer {name!r} holds a {what} weight: kmeans clusters float weights or the float kept "
                           "values of a pruned layer; put the kmeans stage before quantisation or exclude the layer")


def _weight_of(module: nn.Module) -> Encoding | torch.Tensor:
    return module.encoding if isinstance(module, (CompressedLinear, CompressedConv2d)) else module.weight.detach()


@register_pass("kmeans", KMeansConfig, (nn.Linear, nn.Conv2d, CompressedLinear, CompressedConv2d), refines=True)
def kmeans(model: nn.Module, targets: list[Target], context: PassContext) -> None:
    encodings = [(t, cluster_encoding(t.name, _weight_of(t.module), t.config)) for t in targets]  # all or nothing
    for t, enc in encodings:
        install(model, t.name, enc)  # a compressed layer keeps its kernel where that can run the clusters
        values = enc.values if isinstance(enc, SparseTensor) else enc
        where = f"{enc.nnz} kept values" if isinstance(enc, SparseTensor) else "all weights"
        context.log.append(f"{t.name}: {t.config.describe()} over {where}, {values.codebook.numel()} used, "
                           f"{enc.bits_per_weight:.2f} bits/weight")


# ---------------------------------------------------------------------------------------------
# Fine-tuning the centroids


def _clustered_part(enc: Encoding) -> ClusteredTensor | None:
    if isinstance(enc, ClusteredTensor):
        return enc
    if isinstance(enc, SparseTensor) and isinstance(enc.values, ClusteredTensor):
        return enc.values
    return None


class ClusteredTrainable(TrainingModule):
    """A clustered Linear/Conv2d whose codebook is a float32 parameter: W = codebook[indices] (in the kept positions)."""

    not_saveable = "holds a trainable codebook: call convert_centroids(model) before saving"

    def __init__(self, module: CompressedLinear | CompressedConv2d, train_bias: bool = False):
        super().__init__()
        enc = module.encoding
        part = _clustered_part(enc)
        if part is None:
            raise ConfigError(f"{type(module).__name__} holds a {enc.kind} weight, not a clustered one")
        self.original = [module]  # in a list: not a submodule, so its parameters are not ours
        self.codebook = nn.Parameter(part.codebook.float().clone())  # (k,)
        self.labels = part.labels().reshape(-1)  # (nnz,) or (numel,)
        self.positions = enc.mask().reshape(-1).nonzero().squeeze(1) if isinstance(enc, SparseTensor) else None
        self.bias = None
        if module.bias is not None:
            self.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=train_bias)

    def weight(self) -> torch.Tensor:
        enc = self.original[0].encoding
        values = self.codebook[self.labels]  # (n,): dL/dcodebook[j] = sum of dL/dvalues over label j
        if self.positions is None:
            return values.reshape(enc.shape)
        dense = values.new_zeros(enc.numel)
        return dense.index_put((self.positions,), values).reshape(enc.shape)  # zeros stay zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.original[0]
        if isinstance(m, CompressedConv2d):
            return F.conv2d(x, self.weight(), self.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, self.weight(), self.bias)

    def to_compressed(self) -> nn.Module:
        """The compressed module with the trained codebook rounded to float16 (indices and positions unchanged)."""
        m = self.original[0]
        part = _clustered_part(m.encoding)
        codebook = self.codebook.detach().to(part.codebook.dtype)
        if not torch.isfinite(codebook).all():
            raise ConfigError("a trained codebook is not finite in float16: lower the learning rate")
        values = dataclasses.replace(part, codebook=codebook.contiguous())
        enc = dataclasses.replace(m.encoding, values=values) if isinstance(m.encoding, SparseTensor) else values
        bias = None if self.bias is None else self.bias.detach()
        return compressed_twin(m, enc, bias=bias)


def _clustered_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, (CompressedLinear, CompressedConv2d)) and _clustered_part(m.encoding) is not None]


def prepare_centroids(model: nn.Module, train_bias: bool = False) -> list[nn.Parameter]:
    """Swap every clustered layer of `model` for its trainable twin, in place; returns the parameters to train."""
    names = _clustered_names(model)
    if not names:
        raise ConfigError("the model holds no clustered layer: apply a recipe with a kmeans stage first")
    params: list[nn.Parameter] = []
    for name in names:
        twin = ClusteredTrainable(model.get_submodule(name), train_bias)
        model.set_submodule(name, twin)
        params.append(twin.codebook)
        if train_bias and twin.bias is not None:
            params.append(twin.bias)
    return params


def convert_centroids(model: nn.Module) -> nn.Module:
    """Write every trainable twin's codebook (float16-rounded) back into its encoding, in place."""
    names = [n for n, m in model.named_modules() if isinstance(m, ClusteredTrainable)]
    if not names:
        raise ConfigError("the model holds no trainable codebook: call prepare_centroids(model) first")
    new = {name: model.get_submodule(name).to_compressed() for name in names}  # all or nothing
    for name, module in new.items():
        model.set_submodule(name, module)
    return model


def _restore(model: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        if isinstance(m, ClusteredTrainable):
            model.set_submodule(name, m.original[0])


def finetune_centroids(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 1e-4,
    train_bias: bool = False,
) -> list[float]:
    """Train only the codebooks (and optionally biases) of the clustered layers; returns the loss per step.

    `loss_fn(model, batch)` returns a scalar loss; `batches` is read once per epoch (a list or a
    DataLoader), and `steps`, when given, stops earlier. Adam is used rather than the paper's SGD
    because a centroid's gradient is a sum over its members, so its scale grows with cluster size.
    The model's train/eval mode is left as it is. On any error the layers are left as they were.
    """
    for name, value in (("epochs", epochs), ("steps", steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} {value!r} is not valid: use a positive integer")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"lr {lr!r} is not valid: use a positive learning rate, e.g. 1e-4")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    losses: list[float] = []
    try:
        params = prepare_centroids(model, train_bias)
        optimizer = torch.optim.Adam(params, lr=lr)
        stream = itertools.chain.from_iterable(batches for _ in range(epochs))
        for batch in itertools.islice(stream, steps):
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise ConfigError(f"the loss became {float(loss.detach())} at step {len(losses)}: lower the learning rate")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        convert_centroids(model)
    except BaseException:
        _restore(model)
        raise
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return losses
