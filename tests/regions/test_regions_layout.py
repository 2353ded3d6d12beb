"""Layouts chosen by access: row blocks of a chosen size (put(chunk_bytes=...)), a cold lookup that reads only
the blocks of its rows, and the layout shown per tensor by `store get`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelpress.errors import StoreError
from modelpress.regions.modules import GatherEmbedding
from modelpress.store import Store, layout

ROWS, DIM = 16384, 64


@pytest.fixture(scope="module")
def table_store(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(ROWS, DIM, generator=g)
    store = Store.init(tmp_path_factory.mktemp("layout") / "store")
    store.put({"embed.weight": table, "other": torch.randn(100, DIM, generator=g)}, "t",
              chunk_bytes={"embed.*": 1024})
    yield store, table
    store.close()


def test_row_blocks_have_the_size_asked_for(table_store):
    store, table = table_store
    version = store.version("t")
    records = {t.name: t for t in version.tensors}
    rows = store.catalog.chunks(records["embed.weight"].chunks)
    assert {row.raw_size for row in rows.values()} == {1024}  # 4 rows of 256 bytes each
    assert len(records["embed.weight"].chunks) == ROWS * DIM * 4 // 1024
    assert len(records["other"].chunks) == 1  # the default 1 MiB blocks
    assert torch.equal(store.get("t", names=["embed.weight"])["embed.weight"], table)


@pytest.mark.parametrize("size", [0, 100, 1 << 30, "4k"])
def test_a_row_block_size_out_of_range_is_refused(tmp_path, size):
    store = Store.init(tmp_path / "store")
    with pytest.raises(StoreError, match="row-block size"):
        store.put({"w": torch.zeros(4, 4)}, "t", chunk_bytes={"*": size})
    store.close()


def test_a_cold_lookup_of_100_ids_reads_under_a_tenth_of_the_blocks(table_store):
    store, table = table_store
    record = next(t for t in store.version("t").tensors if t.name == "embed.weight")
    rows = store.catalog.chunks(record.chunks)
    gather = GatherEmbedding(store.reader, record.dtype, record.shape, [rows[c] for c in record.chunks])
    ids = torch.randint(0, ROWS, (4, 25), generator=torch.Generator().manual_seed(1))  # 100 ids
    out = gather(ids)
    assert torch.equal(out, F.embedding(ids, table))
    assert gather.chunks_read <= 0.10 * len(record.chunks)
    assert gather.chunks_read == len({int(i) // 4 for i in ids.reshape(-1)})  # exactly the blocks of its rows
    with pytest.raises(IndexError):
        gather(torch.tensor([ROWS]))


def test_store_get_shows_each_tensors_layout(table_store, capsys):
    from modelpress.cli import main

    store, _ = table_store
    assert main(["store", "get", str(store.root), "t"]) == 0
    out = capsys.readouterr().out
    assert "4096 row block(s) of 4 rows (1024 bytes)" in out


@pytest.mark.parametrize("shape, sizes, expected", [
    ((10, 4), [64, 64, 32], "3 row block(s) of 4 rows (64 bytes), raw"),
    ((10,), [40], "1 block(s) of 40 bytes (cut between elements), raw"),
    ((0, 4), [], "empty"),
])
def test_describe_layout(shape, sizes, expected):
    assert layout.describe("float32", shape, sizes, ["raw"] * len(sizes)) == expected


def test_store_put_takes_row_block_sizes_and_planes(tmp_path):
    from hostile._tiny_source import write_tiny_source
    from modelpress.cli import main
    from modelpress.store import planes

    source = write_tiny_source(tmp_path / "src")
    assert main(["store", "init", str(tmp_path / "store")]) == 0
    assert main(["store", "put", str(tmp_path / "store"), str(source), "enc", "--planes", "*word_embeddings*",
                 "--chunk-bytes", "*word_embeddings.weight*=1024"]) == 0
    with Store(tmp_path / "store") as store:
        records = {t.name: t for t in store.version("enc").tensors}
        name = next(n for n in records if n.endswith("word_embeddings.weight" + planes.HI))
        assert planes.base_name(name) + planes.LO in records
        rows = store.catalog.chunks(records[name].chunks)
        assert [rows[c].raw_size for c in records[name].chunks][:-1] == [1024] * (len(records[name].chunks) - 1)
    assert main(["store", "put", str(tmp_path / "store"), str(source), "enc", "--chunk-bytes", "oops"]) != 0
