"""The quantised peers of a sentence encoder that the benchmark compares modelpress against.

A compression result means little on its own: the benchmark puts it next to what a user would get
from the tools they already have, with one call each and default settings:

* PyTorch eager dynamic int8 (`torch.ao.quantization.quantize_dynamic` on every `nn.Linear`),
  per-tensor or per-channel weight scales, saved the way PyTorch saves it (`torch.save` of the
  state dict: a pickle, whose size is all we measure);
* ONNX Runtime dynamic int8 (`onnxruntime.quantization.quantize_dynamic`) of an ONNX export of
  the transformer, after ORT's recommended `quant_pre_process`; it also quantises the embedding
  `Gather`, which is why its files are about a quarter of the float model;
* the float ONNX export itself, so that a bad export cannot pass for a quantisation error.

Every peer encodes exactly as `SentenceEncoder.encode` does (sort by length, batches of 32, mean
pooling under the attention mask, L2 normalisation, input order), because each peer *is* a
`SentenceEncoder` around a different transformer; only the transformer differs between peers, so
latencies compare like with like. The encoder passed in is never modified.

Exports and ORT quantisations are cached in `workdir` under a key made from the weights, the
configs and the torch / onnxruntime versions, so a second call is cheap. Each artefact is built in a scratch folder
and renamed into place, so an interrupted run never leaves a half-written cache entry.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from modelpress.formats.hf import SentenceEncoder

__all__ = ["Peer", "ort_dynamic_int8", "ort_fp32", "torch_dynamic_int8"]

BATCH_SIZE = 32  # the batch size of SentenceEncoder.encode's default, used by every peer
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_OUTPUT = "last_hidden_state"
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 18  # the lowest opset the dynamo exporter emits natively
# Sentences of different lengths: the trace is padded (so the mask path is recorded), and the
# check after export uses another batch and sequence size than the trace.
_TRACE_SENTENCES = ["A short one.", "A somewhat longer sentence, so that the batch needs padding."]
_VERIFY_SENTENCES = [
    "Check the export.",
    "The exported graph must agree with the eager model for other batch and sequence sizes too.",
    "Three rows here.",
]
_EXPORT_TOLERANCE = 1e-3  # max |difference| of unpadded hidden states; a correct export gives ~1e-5


@dataclass
class Peer:
    """A peer's name, on-disk size, and encode function (sentences -> (N, C) float32 embeddings)."""

    name: str
    size_bytes: int  # bytes of the whole saved model, in the tool's own format
    encode: Callable[[list[str]], torch.Tensor]
    note: str = ""


# --------------------------------------------------------------------------------------- PyTorch


def torch_dynamic_int8(encoder: SentenceEncoder, per_channel: bool, workdir: Path) -> Peer:
    """PyTorch dynamic int8 of every nn.Linear, per-tensor or per-channel, with the current engine."""
    engine = torch.backends.quantized.engine
    if engine not in ("x86", "fbgemm"):
        raise RuntimeError(
            f"torch quantized engine is {engine!r}; the peer is defined on x86/fbgemm: "
            "set torch.backends.quantized.engine = 'x86' first"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    peer_encoder = copy.deepcopy(encoder)
    peer_encoder.model.eval()
    with warnings.catch_warnings():
        # torch.ao.quantization and the quantized-tensor constructors are deprecated; they are
        # still the peer PyTorch users have, and no replacement gives the same kernels.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        peer_encoder.model = quantize_dynamic(peer_encoder.model, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
    scheme = "per-channel" if per_channel else "per-tensor"
    path = workdir / f"torch-dynamic-int8-{scheme}-{_fingerprint(encoder)}.pt"
    torch.save(peer_encoder.model.state_dict(), path)
    return Peer(
        name=f"PyTorch dynamic int8, {scheme}",
        size_bytes=path.stat().st_size,
        encode=functools.partial(peer_encoder.encode, batch_size=BATCH_SIZE),
        note=f"torch {torch.__version__}, engine {engine}; size of torch.save(state_dict)",
    )


# ----------------------------------------------------------------------------------- ONNX Runtime


def ort_fp32(encoder: SentenceEncoder, workdir: Path) -> Peer:
    """The float ONNX export run by ONNX Runtime: a check of the export, not a compression."""
    folder, exporter = _export_onnx(encoder, Path(workdir))
    return Peer(
        name="ONNX Runtime fp32",
        size_bytes=_folder_bytes(folder),
        encode=_ort_encode(encoder, folder / "model.onnx"),
        note=f"{exporter}; onnxruntime {_ort_version()}",
    )


def ort_dynamic_int8(encoder: SentenceEncoder, per_channel: bool, weight_type: str, workdir: Path) -> Peer:
    """ONNX Runtime dynamic int8 (weights `QInt8` or `QUInt8`) of the preprocessed ONNX export."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    types = {"QInt8": QuantType.QInt8, "QUInt8": QuantType.QUInt8}
    if weight_type not in types:
        raise ValueError(f"weight_type must be one of {sorted(types)}, not {weight_type!r}")
    workdir = Path(workdir)
    fp32_folder, exporter = _export_onnx(encoder, workdir)
    pre_folder = _preprocess_onnx(fp32_folder, workdir)
    scheme = "per-channel" if per_channel else "per-tensor"
    folder = workdir / f"{fp32_folder.name}-ort{_ort_version()}-{weight_type.lower()}-{scheme}"
    if not (folder / "model.onnx").is_file():
        with _building(folder) as scratch:
            quantize_dynamic(
                pre_folder / "model.onnx",
                scratch / "model.onnx",
                per_channel=per_channel,
                weight_type=types[weight_type],
            )
    return Peer(
        name=f"ONNX Runtime dynamic {weight_type}, {scheme}",
        size_bytes=_folder_bytes(folder),
        encode=_ort_encode(encoder, folder / "model.onnx"),
        note=f"{exporter}, quant_pre_process, quantize_dynamic defaults (MatMul and embedding Gather); "
        f"onnxruntime {_ort_version()}",
    )


class _OrtTransformer(nn.Module):
    """Stands in for the BertModel inside a SentenceEncoder: runs an ONNX Runtime session instead."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        (states,) = self.session.run([ONNX_OUTPUT], {k: v.numpy() for k, v in feeds.items()})
        return SimpleNamespace(last_hidden_state=torch.from_numpy(states))


def _ort_session(path: Path, threads: int | None = None, optimise: bool = True):
    """A CPU session with `threads` (default: torch's current intra-op thread count) and one inter-op thread;
    `optimise=False` runs the graph as written (no fused LayerNorm, GELU or attention kernels), the same
    weights through other float kernels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.inter_op_num_threads = 1
    if not optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_encode(encoder: SentenceEncoder, path: Path) -> Callable[[list[str]], torch.Tensor]:
    """encode() of a SentenceEncoder whose transformer is the ONNX model at `path`."""
    peer_encoder = SentenceEncoder(
        _OrtTransformer(_ort_session(path)), copy.deepcopy(encoder.tokenizer), encoder.config, encoder.support_files,
        encoder.source,
    )
    return functools.partial(peer_encoder.encode, batch_size=BATCH_SIZE)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# ------------------------------------------------------------------------------------ ONNX export


class _HiddenStates(nn.Module):
    """BertModel with positional inputs and one tensor out, the shape the ONNX exporters want."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


def _export_onnx(encoder: SentenceEncoder, workdir: Path) -> tuple[Path, str]:
    """The cached float ONNX export's folder, and which exporter made it.

    The TorchScript exporter (opset 17) is tried first; if it is missing, fails, or gives a graph
    that disagrees with the eager model, the dynamo exporter (opset 18) is used instead.
    """
    folder = workdir / f"encoder-{_fingerprint(encoder)}-onnx-fp32"
    info_file = folder / "export.json"
    if info_file.is_file():
        return folder, _exporter_of(info_file)
    module = _HiddenStates(copy.deepcopy(encoder.model)).eval()
    trace = encoder.tokenize(_TRACE_SENTENCES)
    args = tuple(trace[k] for k in ONNX_INPUTS)
    failures = []
    exporters = (
        ("TorchScript exporter", TORCHSCRIPT_OPSET, _export_torchscript),
        ("dynamo exporter", DYNAMO_OPSET, _export_dynamo),
    )
    for exporter, opset, export in exporters:
        with _building(folder) as scratch:
            try:
                export(module, args, scratch / "model.onnx", opset)
            except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError) as exc:
                failures.append(f"{exporter}: {type(exc).__name__}: {exc}")
                raise _Discard from None
            error = _export_error(module, encoder, scratch / "model.onnx")
            if error > _EXPORT_TOLERANCE:
                failures.append(f"{exporter}: hidden states differ from torch by up to {error:.3g}")
                raise _Discard
            info = {"exporter": f"{exporter}, opset {opset}", "max_abs_error": error, "torch": torch.__version__}
            (scratch / "export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        if info_file.is_file():
            return folder, _exporter_of(info_file)
    raise RuntimeError("ONNX export of the transformer failed:\n  " + "\n  ".join(failures))


def _exporter_of(info_file: Path) -> str:
    """The exporter recorded next to a cached export."""
    return json.loads(info_file.read_text(encoding="utf-8"))["exporter"]


def _export_torchscript(module: nn.Module, args: tuple, path: Path, opset: int) -> None:
    """torch.onnx.export with the TorchScript tracer, dynamic batch and sequence axes."""
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated; tracer warnings come from transformers' mask code
        # (shape comparisons that are constant for this model) and are checked by _export_error.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(ONNX_INPUTS),
            output_names=[ONNX_OUTPUT],
            dynamic_axes={name: axes for name in (*ONNX_INPUTS, ONNX_OUTPUT)},
            do_constant_folding=True,
        )


def _export_dynamo(module: nn.Module, args: tuple, path: Path, opset: int) -> None:
    """torch.onnx.export through torch.export, dynamic batch and sequence dimensions."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"# The axis name", category=UserWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=list(ONNX_INPUTS),
            output_names=[ONNX_OUTPUT],
            dynamic_shapes={name: {0: batch, 1: sequence} for name in ONNX_INPUTS},
            external_data=False,
            verbose=False,
        )


@torch.inference_mode()
def _export_error(module: nn.Module, encoder: SentenceEncoder, path: Path) -> float:
    """Largest |ONNX - torch| over the unpadded hidden states of a batch unlike the trace's."""
    batch = encoder.tokenize(_VERIFY_SENTENCES)
    expected = module(*(batch[k] for k in ONNX_INPUTS))
    got = _OrtTransformer(_ort_session(path, threads=1))(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    return (got - expected)[mask].abs().max().item()


def _preprocess_onnx(fp32_folder: Path, workdir: Path) -> Path:
    """The cached output of ORT's quant_pre_process (symbolic shape inference + graph optimisation).

    ORT recommends it before quantize_dynamic and logs a warning when it is skipped. On this model
    it changes neither the quantised size nor the cosine (checked: 0.9930 with and without).
    """
    from onnxruntime.quantization import quant_pre_process

    folder = workdir / f"{fp32_folder.name}-ort{_ort_version()}-preprocessed"
    if not (folder / "model.onnx").is_file():
        with _building(folder) as scratch:
            # auto_merge: without it symbolic shape inference stops on transformers' attention-mask
            # subgraph ("Incomplete symbolic shape inference"); merging is ORT's documented remedy.
            quant_pre_process(fp32_folder / "model.onnx", scratch / "model.onnx", auto_merge=True)
    return folder


# --------------------------------------------------------------------------------------- caching


class _Discard(Exception):
    """Raised inside `_building` to drop the scratch folder without publishing it."""


class _building:
    """Context manager: a scratch folder next to `target`, renamed to `target` on success."""

    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        return self.scratch

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and not self.target.exists():
            os.replace(self.scratch, self.target)
        else:
            shutil.rmtree(self.scratch, ignore_errors=True)
        return exc_type is _Discard


def _folder_bytes(folder: Path) -> int:
    """Bytes of the model files in a cache folder (the .onnx and any external data)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != "export.json")


def _fingerprint(encoder: SentenceEncoder) -> str:
    """A short hash of the weights, the configs and torch's version: the cache key of an export."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps(encoder.model.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(repr(encoder.config).encode())
    digest.update(torch.__version__.encode())
    for name, tensor in encoder.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()
