"""Streaming a quantised model (llm-q4's layout: 4-bit g32 blocks, an 8-bit per-row tied table) under a
memory budget: its packed codes and scales pass through the ring and run on the packed-code kernel, the
tied table's codes are gathered by rows, and the tokens are the unbudgeted compressed model's."""

from __future__ import annotations

import pytest
import torch

import modelpress
from _tiny_lm import write_tiny_lm
from modelpress.formats.checkpoint import PART_SEPARATOR
from modelpress.formats.models import load_model
from modelpress.nn.generation import greedy_generate
from modelpress.nn.qmatmul import BLAS_MIN_ROWS, NATIVE_AVAILABLE, paths, use_path
from modelpress.recipe import Recipe
from modelpress.regions import Region, open_streamed, plan_version
from modelpress.regions.modules import GatherQEmbedding, StreamedQLinear
from modelpress.store import Store

PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119]
TABLE = "model.model.embed_tokens.weight"

# llm-q4's stages with RTN in place of GPTQ (no calibration): 4-bit symmetric groups of 32 in the blocks, the
# tied table (and so the output layer) 8-bit per row
Q4 = Recipe.from_dict({"name": "q4-rtn", "stages": [
    {"pass": "rtn", "targets": {"types": ["Linear"], "ignore": ["lm_head", "*.lm_head"]},
     "config": {"bits": 4, "symmetric": True, "group_size": 32}},
    {"pass": "rtn", "targets": {"types": ["Embedding"]}, "config": {"bits": 8, "group_size": "channel"}},
    {"pass": "rtn", "targets": {"types": ["Linear"], "include": ["lm_head", "*.lm_head"]}, "optional": True,
     "config": {"bits": 8, "group_size": "channel"}},
]})
ASYM = Recipe.from_dict({"name": "q4-asym", "stages": [
    {"pass": "rtn", "targets": {"types": ["Linear", "Embedding"]},
     "config": {"bits": 4, "symmetric": False, "group_size": 16}}]})


@pytest.fixture(scope="module")
def q4_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions-q4")
    lm = load_model(write_tiny_lm("llama", root / "src"))
    store = Store.init(root / "store")
    store.put(modelpress.compress(lm, Q4), "q4", chunk_bytes={"*": 1024})  # small row blocks: pieces, gathers
    store.put(modelpress.compress(load_model(root / "src"), ASYM), "asym", chunk_bytes={"*": 1024})
    yield store
    store.close()


def weights_bytes(store: Store, name: str) -> int:
    return sum(t.numel() * t.element_size() for t in store.get(name).values())


def full_tokens(store: Store, name: str, new_tokens: int, engine: str = "auto") -> tuple[int, ...]:
    return greedy_generate(store.load(name).model, PROMPT, new_tokens, engine=engine).tokens


@pytest.mark.skipif(not NATIVE_AVAILABLE, reason="AUTO runs the packed-code kernel only where it is built")
@pytest.mark.parametrize("engine", ["lean", "transformers"])
@pytest.mark.parametrize("name, fraction", [("q4", 0.25), ("q4", 0.5), ("asym", 0.5)])  # (asym: scales+zeros per 16)
def test_a_quantised_model_streams_with_the_tokens_of_the_unbudgeted_one(q4_store, name, engine, fraction):
    budget = int(weights_bytes(q4_store, name) * fraction)
    expected = full_tokens(q4_store, name, 12, engine)
    with open_streamed(q4_store, name, memory=budget, piece_bytes=2048) as run:
        got = run.generate(PROMPT, 12, engine=engine).tokens
        assert run.weight_bytes() <= budget and run.plan.weight_bytes() <= budget
        regions = run.plan.region_bytes()
        assert regions["streamed"] > 0
        assert run.ring.bytes_landed >= len(got) * run.plan.streamed_per_pass() > 0
        modules = list(run.model.modules())
        assert any(isinstance(m, StreamedQLinear) for m in modules)
    assert got == expected


@pytest.mark.skipif(not NATIVE_AVAILABLE, reason="AUTO runs the packed-code kernel only where it is built")
def test_the_plan_lands_codes_with_their_scales_and_keeps_the_scales_of_pieces(q4_store):
    budget = int(weights_bytes(q4_store, "q4") * 0.25)
    plan = plan_version(q4_store, "q4", memory=budget, piece_bytes=2048)
    codes = plan.placement(TABLE + PART_SEPARATOR + "codes")
    assert codes.uses == ("embedding", "linear") and codes.region is Region.STREAMED and len(codes.units) > 1
    assert codes.logical == (codes.shape[0], 64) == codes.shape  # 8 bits: a byte per weight
    # the table's codes come in pieces (output layer) and by rows (lookups): its per-row scales stay resident
    assert plan.placement(TABLE + PART_SEPARATOR + "scale").region is Region.STORAGE
    streamed = [p for p in plan.placements if p.region is Region.STREAMED and p.tensor.endswith("::scale")]
    assert streamed, "a block's scales land with its codes"
    for p in streamed:
        unit = plan.units[p.units[0]]
        assert [part.name for part in unit.parts] == ["codes", "scale"]
        assert plan.placement(p.tensor.replace("::scale", "::codes")).units == p.units


@pytest.mark.skipif(not NATIVE_AVAILABLE, reason="AUTO runs the packed-code kernel only where it is built")
def test_streamed_quantised_layers_match_the_resident_ones_on_every_kernel_path(q4_store):
    budget = int(weights_bytes(q4_store, "q4") * 0.25)
    resident = q4_store.load("q4").model
    ids = torch.tensor([[0, 5, 100, 5, 42]])
    with open_streamed(q4_store, "q4", memory=budget, piece_bytes=2048, prefetch=False) as run:
        streamed = run.model.model
        layers = {n: m for n, m in streamed.named_modules() if isinstance(m, StreamedQLinear)}
        assert "lm_head" in layers and len(layers["lm_head"].pieces) > 1
        tables = [m for m in streamed.modules() if isinstance(m, GatherQEmbedding)]
        assert len(tables) == 1
        assert torch.equal(tables[0](ids), resident.get_input_embeddings()(ids))
        for path in paths():
            with use_path(path):
                for name, layer in layers.items():
                    reference = resident.get_submodule(name)
                    in_features = layer.in_features
                    for rows in (1, 3, 20):  # fused, tiled, BLAS tiles
                        xi = torch.randn(1, rows, in_features, generator=torch.Generator().manual_seed(rows))
                        got, want = layer(xi), reference(xi)
                        # the C kernel's rows do not depend on the rows computed with them; BLAS (many rows, or
                        # the PyTorch fallback) may sum a piece's dot products in another order
                        if len(layer.pieces) == 1 or (path != "torch" and rows < BLAS_MIN_ROWS):
                            assert torch.equal(got, want), (path, name, rows)
                        else:
                            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_compressed_module_the_packed_kernel_does_not_run_stays_resident(tmp_path):
    lm = load_model(write_tiny_lm("llama", tmp_path / "src"))
    per_tensor = Recipe.from_dict({"name": "pt", "stages": [{
        "pass": "rtn", "targets": {"types": ["Linear"], "include": ["*.mlp.*"]},
        "config": {"bits": 8, "group_size": "tensor"}}]})
    store = Store.init(tmp_path / "store")
    store.put(modelpress.compress(lm, per_tensor), "pt", chunk_bytes={"*": 1024})
    plan = plan_version(store, "pt", memory=int(weights_bytes(store, "pt") * 0.6), piece_bytes=2048)
    assert plan.region_bytes()["streamed"] > 0  # the float attention layers
    assert all(p.region is Region.STORAGE for p in plan.placements if PART_SEPARATOR in p.tensor)
    store.close()
