"""Running a stored model under a memory budget: `open_streamed(store, name, memory=...)`.

    with open_streamed(store, "smollm2", memory="135MB") as run:
        out = run.generate(run.tokenizer.encode("The capital of France is"), new_tokens=32)
        run.weight_bytes()          # resident tensors + ring + gather buffers, never above the budget

The version's skeleton is built on the meta device from its support files, the placement plan (plan.py)
is made from its catalogue rows, and only the resident tensors are loaded (one arena, as `Store.load`
does). Streamed Linear layers become `StreamedLinear` (weights through the ring, prefetched by its reader
thread along the order learned on the first pass), gathered tables `GatherEmbedding`; quantised modules
(a 4-bit model's) become `StreamedQLinear` (packed codes and scales through the ring, run by the packed-code
kernel) and `GatherQEmbedding` when the resident module would run the same kernel on them (`_runs_streamed`).
Every chunk is checked against its hash as it lands. Greedy generation runs the lean engine of
nn/generation.py (or transformers' forward) over the model as it is: streaming changes where weights come
from, not what is computed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Sequence

import torch
from torch import nn

from modelpress.encodings.quantized import PER_CHANNEL, PER_TENSOR, QuantScheme
from modelpress.errors import ConfigError, StoreError, UnsupportedError
from modelpress.formats.causal_lm import CausalLM, causal_lm_from_files
from modelpress.formats.checkpoint import PART_SEPARATOR, rebuild, validate_manifest
from modelpress.formats.hf import SentenceEncoder, sentence_encoder_from_files
from modelpress.limits import MAX_SUPPORT_FILE_BYTES
from modelpress.nn.generation import Engine, Generation, greedy_generate
from modelpress.nn.modules import CompressedEmbedding, CompressedLinear
from modelpress.nn.qmatmul import NATIVE_AVAILABLE
from modelpress.store import layout, loader, planes
from modelpress.store.store import Store

from modelpress.regions.modules import GatherEmbedding, GatherQEmbedding, StreamedLinear, StreamedQLinear
from modelpress.regions.plan import PIECE_BYTES, PlacementPlan, Region, parse_memory, place, tensor_uses
from modelpress.regions.ring import Ring

__all__ = ["StreamedModel", "open_streamed", "plan_version"]


def _skeleton(manifest: dict, files: dict[str, bytes]) -> nn.Module:
    kind = manifest["architecture"].get("kind")
    if kind == "causal-lm":
        return causal_lm_from_files(files)
    if kind == "sentence-transformers":
        return sentence_encoder_from_files(files)
    raise StoreError(f"streaming runs causal LMs and sentence encoders; this version holds a {kind!r} model")


def _version_parts(store: Store, name: str, ref: str):
    version = store.version(name, ref)
    if version.manifest.get("format") == "modelpress.state_dict":
        raise StoreError(f"{name}@{ref} holds a plain state dict, not a model: nothing to run")
    where = store.root / "versions" / version.info.id
    manifest = validate_manifest(version.manifest, where)
    files_rows = store.catalog.chunks(version.files.values())
    files = {rel: bytes(store.reader.read(files_rows[cid], limit=MAX_SUPPORT_FILE_BYTES))
             for rel, cid in version.files.items()}
    rows = store.catalog.chunks([c for t in version.tensors for c in t.chunks])
    return version, where, manifest, files, rows


def _runs_streamed(entry: dict) -> QuantScheme | None:
    """The scheme of a compressed module whose quantised weight can run streamed (StreamedQLinear: the kernel
    the resident module runs is the packed-code kernel; GatherQEmbedding: a table quantised by rows), else None."""
    meta = entry.get("weight")
    if not isinstance(meta, dict) or meta.get("kind") != "quantized" or len(meta.get("shape", ())) != 2:
        return None
    try:
        scheme = QuantScheme.from_dict({k: meta[k] for k in ("bits", "symmetric", "group_size") if k in meta})
    except (ConfigError, TypeError):
        return None
    gs = scheme.group_size
    if entry.get("type") == "linear":
        kernel = entry.get("kernel", "auto")
        packed = kernel == "qmatmul" or (kernel == "auto" and NATIVE_AVAILABLE)  # what AUTO resolves to
        return scheme if packed and (gs == PER_CHANNEL or (gs > 0 and gs % 8 == 0)) else None
    if entry.get("type") == "embedding":
        return scheme if gs != PER_TENSOR else None
    return None


def _compressed(manifest: dict) -> tuple[dict[str, QuantScheme], dict[str, tuple[int, ...]], dict[str, str]]:
    """The compressed weights that can run streamed (weight name -> scheme, -> shape; a weight shared by tied
    modules only if every one of them can) and the ties between compressed modules (weight -> stored weight)."""
    modules = manifest.get("modules", {})
    ties = {f"{n}.weight": f"{e['tied_to']}.weight" for n, e in modules.items() if "tied_to" in e}
    schemes, shapes = {}, {}
    for name, entry in modules.items():
        if "tied_to" in entry:
            continue
        users = [entry] + [e for e in modules.values() if e.get("tied_to") == name]
        found = [_runs_streamed(e) for e in users]
        if all(found) and len(set(found)) == 1:
            schemes[f"{name}.weight"] = found[0]
            shapes[f"{name}.weight"] = tuple(entry["weight"]["shape"])
    return schemes, shapes, ties


def _plan(version, manifest: dict, skeleton: nn.Module, rows, memory, piece_bytes: int,
          reserve: int | str) -> PlacementPlan:
    _, shapes, ties = _compressed(manifest)
    uses = tensor_uses(skeleton, {**manifest.get("tied", {}), **ties})
    budget, kept = parse_memory(memory), parse_memory(reserve)
    if not 0 <= kept < budget:
        raise ConfigError(f"a reserve of {kept} bytes leaves no weight memory in a budget of {budget}: give less")
    plan = place(list(version.tensors), rows, uses, budget - kept, piece_bytes, shapes)
    return dataclasses.replace(plan, budget=budget, reserve=kept)


def plan_version(store: Store, name: str, memory: int | str, ref: str = "latest",
                 piece_bytes: int = PIECE_BYTES, reserve: int | str = 0) -> PlacementPlan:
    """The placement plan of a stored model under `memory` (see plan.py), without loading any weight;
    `reserve` bytes of it are left to the run's working memory (open_streamed)."""
    version, _, manifest, files, rows = _version_parts(store, name, ref)
    return _plan(version, manifest, _skeleton(manifest, files), rows, memory, piece_bytes, reserve)


class StreamedModel:
    """A stored model running under a memory budget (see the module docstring); close() stops its reader."""

    def __init__(self, model: nn.Module, plan: PlacementPlan, ring: Ring, tables: list[GatherEmbedding]):
        self.model, self.plan, self.ring, self.tables = model, plan, ring, tables

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def weight_bytes(self) -> int:
        """Bytes of weight memory held: resident tensors, the ring and the gather buffers (all preallocated)."""
        resident = self.plan.resident()
        return resident + self.ring.capacity + sum(t.buffer.numel() * 2 for t in self.tables)

    def bytes_read(self) -> int:
        """Stored bytes read so far by the ring and the gathers (each chunk hash-checked as it landed)."""
        return self.ring.stored_read + sum(t.stored_read for t in self.tables)

    def generate(self, prompt: torch.Tensor | Sequence[int], new_tokens: int, *, stop: Collection[int] = (),
                 engine: Engine | str = Engine.AUTO) -> Generation:
        if not isinstance(self.model, CausalLM):
            raise StoreError("generate() runs causal LMs; this is a sentence encoder: use encode()")
        return greedy_generate(self.model.model, prompt, new_tokens, stop=stop, engine=engine)

    def encode(self, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
        if not isinstance(self.model, SentenceEncoder):
            raise StoreError("encode() runs sentence encoders; this is a causal LM: use generate()")
        return self.model.encode(sentences, batch_size=batch_size)

    def close(self) -> None:
        self.ring.close()

    def __enter__(self) -> "StreamedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_streamed(store: Store, name: str, memory: int | str, ref: str = "latest", *, prefetch: bool = True,
                  piece_bytes: int = PIECE_BYTES, threads: int | None = None, readers: int = 1,
                  reserve: int | str = 0) -> StreamedModel:
    """The stored model `name@ref` ready to run with at most `memory` bytes of weights (see the module docstring).

    `reserve`: bytes of `memory` left to the run's working memory (the KV cache, activations, the model's
    Python objects and tokenizer), so that the weights get `memory - reserve` and the whole run stays near
    `memory`. `readers` threads land streamed units at once (the computation runs on torch's threads);
    `threads` load the resident tensors."""
    version, where, manifest, files, rows = _version_parts(store, name, ref)
    if any(planes.base_name(t.name) is not None for t in version.tensors):
        raise UnsupportedError(f"{name}@{ref} is stored by precision planes, which streaming does not read yet: "
                               "stream a version put without planes=")
    skeleton = _skeleton(manifest, files)
    plan = _plan(version, manifest, skeleton, rows, memory, piece_bytes, reserve)
    records = {t.name: t for t in version.tensors}
    resident = [records[p.tensor] for p in plan.placements if p.region in (Region.COMPUTE, Region.STORAGE)]
    tensors = loader.run(store.reader, loader.plan(resident, rows, store.backend.can_map), threads or os.cpu_count() or 1)
    for p in plan.placements:  # placeholders of no memory: the modules that use them are replaced below
        if p.region in (Region.STREAMED, Region.GATHERED):
            tensors[p.tensor] = torch.zeros((), dtype=layout.torch_dtype(p.dtype)).expand(p.shape)
    model = rebuild(manifest, tensors, files, where, skeleton)
    ring = Ring(store.reader, list(plan.units), plan.ring_bytes, prefetch, readers)
    schemes, _, ties = _compressed(manifest)
    chunks = {n: [rows[c] for c in r.chunks] for n, r in records.items()}
    tables = _replace_modules(model, plan, manifest.get("tied", {}), ring, store, chunks)
    tables += _replace_compressed(model, plan, schemes, ties, ring, store, chunks, tensors)
    return StreamedModel(model, plan, ring, tables)


def _replace_modules(model: nn.Module, plan: PlacementPlan, tied: dict[str, str], ring: Ring, store: Store,
                     chunks: dict) -> list[GatherEmbedding]:
    """Streamed Linear layers become StreamedLinear, streamed or gathered tables GatherEmbedding (one per
    stored table, shared by the names tied to it)."""
    tables: dict[str, GatherEmbedding] = {}
    for name, module in list(model.named_modules()):
        key = f"{name}.weight"
        stored = tied.get(key, key)
        try:
            p = plan.placement(stored)
        except KeyError:
            continue
        if p.region is Region.STREAMED and type(module) is nn.Linear:
            bias = module.bias
            model.set_submodule(name, StreamedLinear(ring, list(p.units), module.in_features, module.out_features,
                                                     None if bias is None else bias.data))
        elif p.region in (Region.STREAMED, Region.GATHERED) and type(module) is nn.Embedding:
            if stored not in tables:
                tables[stored] = GatherEmbedding(store.reader, p.dtype, p.shape, chunks[stored], module.padding_idx)
            model.set_submodule(name, tables[stored])
    return list(tables.values())



def _replace_compressed(model: nn.Module, plan: PlacementPlan, schemes: dict[str, QuantScheme], ties: dict[str, str],
                        ring: Ring, store: Store, chunks: dict, tensors: dict) -> list[GatherEmbedding]:
    """Quantised Linear layers whose codes stream become StreamedQLinear, quantised tables whose codes are read
    by rows GatherQEmbedding (one per stored table); the resident scales are the loaded ones."""
    tables: dict[str, GatherQEmbedding] = {}
    for name, module in list(model.named_modules()):
        key = f"{name}.weight"
        stored = ties.get(key, key)
        if stored not in schemes or not isinstance(module, (CompressedLinear, CompressedEmbedding)):
            continue
        codes = plan.placement(stored + PART_SEPARATOR + "codes")
        if codes.region not in (Region.STREAMED, Region.GATHERED):
            continue
        scale_p = plan.placement(stored + PART_SEPARATOR + "scale")
        resident = scale_p.region is not Region.STREAMED  # else the scales land with the codes
        scale = tensors[scale_p.tensor] if resident else None
        zero_name = stored + PART_SEPARATOR + "zero"
        zero = tensors.get(zero_name) if resident else None
        if isinstance(module, CompressedLinear):
            bias = module.bias
            model.set_submodule(name, StreamedQLinear(ring, list(codes.units), schemes[stored], module.in_features,
                                                      module.out_features, None if bias is None else bias.data,
                                                      scale, zero))
        else:
            if stored not in tables:
                tables[stored] = GatherQEmbedding(store.reader, schemes[stored], (module.num_embeddings,
                                                  module.embedding_dim), codes.shape, chunks[codes.tensor], scale, zero,
                                                  module.padding_idx)
            model.set_submodule(name, tables[stored])
    return list(tables.values())
