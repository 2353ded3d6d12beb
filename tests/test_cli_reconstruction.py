"""Reconstruction through the command line: a YAML recipe with FFN pruning, low rank and k-means."""

from __future__ import annotations

import pytest

from modelpress.cli import main
from modelpress.encodings import ClusteredTensor, LowRankTensor
from modelpress.formats.checkpoint import load

RECIPE = """\
version: 1
name: prune-lowrank-kmeans
stages:
  - pass: prune_ffn
    config: {ratio: 0.1, multiple_of: 64}
  - pass: lowrank
    targets: {include: ["*.attention.self.key"]}
    config: {budget: 0.9, activation_aware: true, bits: 4, group_size: 64}
  - pass: kmeans
    targets: {types: [Linear], ignore: ["*.attention.self.key"]}
    config: {bits: 5, init: density}
"""


@pytest.mark.slow
def test_prune_lowrank_kmeans_recipe_compresses_saves_loads_and_runs(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    code = main(["compress", "minilm", "--recipe", str(recipe), "--calibration", "32", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    model = load(out)
    key = model.model.encoder.layer[0].attention.self.key
    query = model.model.encoder.layer[0].attention.self.query
    assert isinstance(key.encoding, LowRankTensor) and isinstance(query.encoding, ClusteredTensor)
    assert model.model.encoder.layer[0].intermediate.dense.encoding.shape == (1344, 384)  # 1536 - 10%, to 64
    embeddings = model.encode(["a sentence to embed", "another one"])
    assert embeddings.shape == (2, 384) and bool(embeddings.isfinite().all())
    code = main(["inspect", str(out)])
    assert code == 0 and "lowrank" in capsys.readouterr().out
