"""Bounded, deterministic fuzzing of checkpoint manifests: every mutated manifest either loads a model
that gives the original embeddings or raises the project's error (never another exception)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _tiny_source import SENTENCES, write_tiny_source
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpress.compress import compress
from modelpress.errors import ModelpressError
from modelpress.formats.checkpoint import load, save
from modelpress.formats.hf import load_sentence_encoder
from modelpress.formats.manifest import MANIFEST

EDGE_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 1e308, -0.0, "", "x" * 300, [], {}, [0], [[]],
               {"kind": "quantized"}, "linear", "auto", "float16", "fans", [1, 2, 3], [2**40, 2**40]]
json_values = st.recursive(
    st.sampled_from(EDGE_VALUES) | st.integers(-(2**64), 2**64) | st.text(max_size=12)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def _paths(node, prefix=()) -> list[tuple]:
    """Every path into a JSON tree (keys and list indices), the root excluded."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    model = compress(load_sentence_encoder(write_tiny_source(base / "src", layers=1)), "int8")
    checkpoint = save(model, base / "ckpt", float_params="float16")
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    reference = load(checkpoint).encode(SENTENCES)
    return checkpoint, manifest, _paths(manifest), reference


mutation = st.tuples(st.integers(0, 10**6), st.sampled_from(["replace", "delete", "add"]), json_values,
                     st.text(max_size=8))


def _apply(manifest, paths, choice: int, action: str, value, new_key: str) -> None:
    path = paths[choice % len(paths)]
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "delete":
        del parent[key]
    elif action == "add" and isinstance(parent, dict):
        parent[new_key] = value
    elif action == "add":
        parent.append(value)
    else:
        parent[key] = value


@settings(max_examples=160, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@pytest.mark.slow  # the bounded fuzz run: make test, not test-fast
@given(st.lists(mutation, min_size=1, max_size=3))
def test_mutated_manifests_load_correctly_or_raise_our_error(target, tmp_path_factory, mutations):
    checkpoint, manifest, paths, reference = target
    mutated = json.loads(json.dumps(manifest))
    for choice, action, value, new_key in mutations:
        _apply(mutated, _paths(mutated) or paths, choice, action, value, new_key)
    folder = Path(tmp_path_factory.mktemp("case")) / "ckpt"
    shutil.copytree(checkpoint, folder)
    (folder / MANIFEST).write_text(json.dumps(mutated))
    try:
        model = load(folder)
    except ModelpressError:
        return
    finally:
        shutil.rmtree(folder.parent)
    embeddings = model.encode(SENTENCES)
    assert torch.allclose(embeddings, reference, atol=1e-5), f"a mutated manifest changed the model: {mutations}"


def test_the_unmutated_manifest_loads(target):
    checkpoint, _, _, reference = target
    assert torch.equal(load(checkpoint).encode(SENTENCES), reference)
