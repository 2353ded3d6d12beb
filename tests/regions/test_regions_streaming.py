"""Streaming a stored model under a memory budget: the same tokens and embeddings as a full load, weight
memory within the budget, every streamed chunk read through the ring."""

from __future__ import annotations

import pytest
import torch

from _tiny_lm import write_tiny_lm
from hostile._tiny_source import SENTENCES, write_tiny_source
from modelpress.errors import ConfigError
from modelpress.formats.models import load_model
from modelpress.nn.generation import greedy_generate
from modelpress.regions import Region, open_streamed, parse_memory, plan_version
from modelpress.store import Store

PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119]


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions-lm")
    lm = load_model(write_tiny_lm("llama", root / "src"))
    store = Store.init(root / "store")
    # small row blocks, so that the tied table is gathered block by block and the output layer streams in pieces
    store.put(lm, "tiny", chunk_bytes={"*": 4096})
    yield store
    store.close()


def full_tokens(store: Store, new_tokens: int, engine: str = "auto") -> tuple[int, ...]:
    model = store.load("tiny")
    return greedy_generate(model.model, PROMPT, new_tokens, engine=engine).tokens


def weights_bytes(store: Store) -> int:
    return sum(t.numel() * t.element_size() for t in store.get("tiny").values())


@pytest.mark.parametrize("engine", ["lean", "transformers"])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_streamed_generation_gives_the_tokens_of_the_full_model(lm_store, engine, fraction):
    budget = int(weights_bytes(lm_store) * fraction)
    expected = full_tokens(lm_store, 12, engine)
    with open_streamed(lm_store, "tiny", memory=budget, piece_bytes=8192) as run:
        got = run.generate(PROMPT, 12, engine=engine).tokens
        assert run.weight_bytes() <= budget
        assert run.plan.weight_bytes() <= budget
        streamed = run.plan.region_bytes()["streamed"]
        assert streamed > 0 and run.ring.bytes_landed >= streamed  # every streamed weight went through the ring
        assert run.bytes_read() > 0
    assert got == expected


@pytest.mark.parametrize("readers", [1, 3])
def test_the_ring_prefetches_along_the_learned_order(lm_store, readers):
    budget = int(weights_bytes(lm_store) * 0.1)
    with open_streamed(lm_store, "tiny", memory=budget, piece_bytes=8192, readers=readers) as run:
        tokens = run.generate(PROMPT, 6).tokens
        assert run.ring._cycle is not None and len(run.ring._cycle) == len(run.plan.units)
        assert run.ring.relearned == 0
        passes = len(tokens)  # prefill + one pass per later token
        assert run.ring.bytes_landed >= passes * run.plan.streamed_per_pass()
    with open_streamed(lm_store, "tiny", memory=budget, piece_bytes=8192, prefetch=False) as run:
        assert run.generate(PROMPT, 6).tokens == tokens


def test_a_generous_budget_keeps_everything_resident(lm_store):
    plan = plan_version(lm_store, "tiny", memory="1GB")
    assert {p.region for p in plan.placements} == {Region.COMPUTE}
    assert plan.ring_bytes == 0 and plan.streamed_per_pass() == 0


def test_a_budget_below_the_resident_minimum_is_refused(lm_store):
    with pytest.raises(ConfigError, match="cannot run this model"):
        plan_version(lm_store, "tiny", memory=2048)


def test_the_plan_puts_the_tied_table_in_the_store_and_streams_the_output_layer(lm_store):
    budget = int(weights_bytes(lm_store) * 0.1)  # under the table's size
    plan = plan_version(lm_store, "tiny", memory=budget, piece_bytes=8192)
    table = plan.placement("model.model.embed_tokens.weight")
    assert table.uses == ("embedding", "linear")
    assert table.region is Region.STREAMED and len(table.units) > 1  # the output layer in pieces
    assert plan.weight_bytes() <= budget
    # what is neither a Linear nor an Embedding weight is resident
    assert all(p.region is Region.COMPUTE for p in plan.placements if not p.uses)


@pytest.mark.parametrize("text, expected", [("64MB", 64_000_000), ("1.5GB", 1_500_000_000), ("512MiB", 512 << 20),
                                            ("4096", 4096), (100, 100)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "64 parsecs", "-1MB", "MB"])
def test_parse_memory_refuses_what_is_not_a_size(text):
    with pytest.raises(ConfigError):
        parse_memory(text)


@pytest.fixture(scope="module")
def encoder_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions-enc")
    encoder = load_model(write_tiny_source(root / "src"))
    store = Store.init(root / "store")
    store.put(encoder, "enc", chunk_bytes={"*": 2048})
    yield store
    store.close()


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_streamed_encoding_gives_the_embeddings_of_the_full_load(encoder_store, fraction):
    full = encoder_store.load("enc")
    expected = full.encode(SENTENCES)
    total = sum(t.numel() * t.element_size() for t in encoder_store.get("enc").values())
    budget = int(total * fraction)
    with open_streamed(encoder_store, "enc", memory=budget, piece_bytes=4096) as run:
        first = run.encode(SENTENCES)
        second = run.encode(SENTENCES)  # the second pass runs on prefetched weights
        assert run.weight_bytes() <= budget
        assert run.plan.region_bytes()["streamed"] > 0
    assert torch.equal(first, expected)
    assert torch.equal(second, expected)


def test_a_damaged_streamed_chunk_is_refused(tmp_path):
    lm = load_model(write_tiny_lm("llama", tmp_path / "src"))
    store = Store.init(tmp_path / "store")
    store.put(lm, "tiny", chunk_bytes={"*": 4096})
    budget = int(sum(t.numel() * t.element_size() for t in store.get("tiny").values()) * 0.25)
    plan = plan_version(store, "tiny", memory=budget, piece_bytes=8192)
    victim = plan.units[-1].chunks[0]
    path = store.root / "chunks" / victim.id[:2] / victim.id
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    from modelpress.errors import IntegrityError
    with open_streamed(store, "tiny", memory=budget, piece_bytes=8192) as run, pytest.raises(IntegrityError):
        run.generate(PROMPT, 4)
    store.close()


def test_cli_plan_generate_and_encode(lm_store, encoder_store, capsys):
    from modelpress.cli import main

    budget = str(int(weights_bytes(lm_store) * 0.5))  # (the CLI streams weights whole: 4 MiB pieces)
    assert main(["plan", "tiny", "--store", str(lm_store.root), "--memory", budget, "--all"]) == 0
    out = capsys.readouterr().out
    assert "streamed" in out and "model.model.embed_tokens.weight" in out and "GFLOP/s" in out
    assert main(["generate", "tiny", "--store", str(lm_store.root), "--memory", budget, "Hello", "--max-new-tokens",
                 "5"]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", "tiny", "--store", str(lm_store.root), "Hello", "--max-new-tokens", "5"]) == 0
    full = capsys.readouterr().out
    assert streamed.splitlines()[0] == full.splitlines()[0] and "weight memory" in streamed
    assert main(["encode", "enc", "--store", str(encoder_store.root), "--memory", "40000", "hello world"]) == 0
    assert "1 embeddings" in capsys.readouterr().out
    assert main(["generate", "tiny", "--store", str(lm_store.root), "--memory", "100", "Hello"]) != 0


def test_a_reserve_of_the_budget_is_left_to_the_run(lm_store):
    budget = int(weights_bytes(lm_store) * 0.5)
    reserve = budget // 4
    plan = plan_version(lm_store, "tiny", memory=budget, piece_bytes=8192, reserve=reserve)
    assert plan.budget == budget and plan.reserve == reserve
    assert 0 < plan.weight_bytes() <= budget - reserve
    expected = full_tokens(lm_store, 6)
    with open_streamed(lm_store, "tiny", memory=budget, piece_bytes=8192, reserve=reserve) as run:
        assert run.weight_bytes() <= budget - reserve
        assert run.generate(PROMPT, 6).tokens == expected
    with pytest.raises(ConfigError, match="reserve"):
        plan_version(lm_store, "tiny", memory=budget, reserve=budget)
