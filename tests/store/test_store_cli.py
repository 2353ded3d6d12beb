"""`modelpress store ...`: each command on a store built with the Python API, and one-line errors with exit 2."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import modelpress
from _store_support import assert_identical
from modelpress.cli import main
from modelpress.store import Store
from modelpress.store.objects import chunk_path


@pytest.fixture
def built(tmp_path):
    """A store with model m: v1 (tagged good), then v2 (one tensor changed, one added); and a second model."""
    root = tmp_path / "store"
    a = torch.randn(16, 16)
    b = a.clone()
    b[0, 0] += 0.5
    with Store.init(root) as s:
        v1 = s.put({"a": a, "keep": torch.ones(4)}, "m", message="first", tags=("good",))
        v2 = s.put({"a": b, "keep": torch.ones(4), "extra": torch.arange(3)}, "m", message="second")
        s.put({"x": torch.zeros(2)}, "other")
    return root, v1, v2


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["store", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    assert err.startswith("modelpress: error: ") and err.count("\n") == 1, err
    return err


def test_init_creates_a_store_and_opens_an_existing_one(tmp_path, capsys):
    code, out, _ = run(capsys, "init", tmp_path / "new")
    assert code == 0 and "store ready" in out
    assert (tmp_path / "new" / "STORE").is_file() and (tmp_path / "new" / "catalog.sqlite").is_file()
    assert run(capsys, "init", tmp_path / "new")[0] == 0


def test_ls_lists_models_with_counts_and_latest(built, capsys):
    root, v1, v2 = built
    code, out, _ = run(capsys, "ls", root)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("m  2 version(s), latest " + v2[:12])
    assert lines[1].startswith("other  1 version(s)")


def test_log_lists_versions_newest_first(built, capsys):
    root, v1, v2 = built
    code, out, _ = run(capsys, "log", root, "m")
    assert code == 0
    first, second = out.splitlines()
    assert first.startswith(f"{v2[:12]} (latest)") and f"parent {v1[:12]}" in first and first.endswith("second")
    assert second.startswith(f"{v1[:12]} (good)") and "parent" not in second and second.endswith("first")


def test_diff_prints_what_changed(built, capsys):
    root, v1, v2 = built
    code, out, _ = run(capsys, "diff", root, "m", "good")
    assert code == 0
    lines = out.splitlines()
    assert lines[-1] == "2 of 3 tensors differ"
    assert any(line.startswith("changed  a") and "max|d| 0.5" in line for line in lines)
    assert any(line.startswith("added    extra") for line in lines)
    assert not any("keep" in line for line in lines)


def test_diff_json_is_machine_readable(built, capsys):
    root, v1, v2 = built
    code, out, _ = run(capsys, "diff", root, "m", v1[:8], v2, "--json")
    assert code == 0
    rows = {r["tensor"]: r for r in json.loads(out)}
    assert {k: r["status"] for k, r in rows.items()} == {"a": "changed", "extra": "added", "keep": "same"}
    assert rows["a"]["max_abs"] == pytest.approx(0.5, abs=1e-6) and rows["a"]["changed_chunks"] == 1


def test_tag_points_a_name_at_a_version(built, capsys):
    root, v1, v2 = built
    code, out, _ = run(capsys, "tag", root, "m", v1[:10], "release")
    assert code == 0 and out.strip() == f"m:release -> {v1[:12]}"
    with Store(root) as s:
        assert s.resolve("m", "release") == v1


def test_get_without_out_lists_the_tensors(built, capsys):
    root, v1, v2 = built
    code, out, _ = run(capsys, "get", root, "m", "good")
    assert code == 0
    assert f"m@{v1[:12]}" in out
    assert "float32" in out and "16x16" in out and "scalar" not in out
    assert "extra" not in out  # v1 has no `extra`


def test_verify_and_gc_on_a_healthy_store(built, capsys):
    root, _, _ = built
    code, out, _ = run(capsys, "verify", root)
    assert code == 0 and out.startswith("ok: ") and "chunks verified" in out
    (root / "tmp" / "junk.part").write_bytes(b"x")
    code, out, _ = run(capsys, "gc", root)  # the temporary is younger than the grace period: kept
    assert code == 0 and out.strip() == "removed 0 chunks (0.0 MB) and 0 temporaries"
    code, out, _ = run(capsys, "gc", root, "--grace", "0")
    assert code == 0 and out.strip() == "removed 0 chunks (0.0 MB) and 1 temporaries"
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it, as it does any bad option
        run(capsys, "gc", root, "--grace", "-1")
    assert exit_info.value.code == 2 and "not a number of seconds" in capsys.readouterr().err


def test_verify_on_a_corrupted_store_names_the_chunk_and_fails(built, capsys):
    root, v1, v2 = built
    with Store(root) as s:
        cid = next(t.chunks[0] for t in s.catalog.tensors(v2) if t.name == "a")
    path = chunk_path(root, cid)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", root)
    assert code == 2
    assert [line for line in out.splitlines() if line.startswith("corrupt")] == [
        f"corrupt chunk {cid}: chunk {cid[:12]}'s file does not match its recorded hash"]
    assert "1 corrupt and 0 missing chunks" in one_line_error(err)


def test_put_of_a_plain_module_checkpoint_explains_the_skeleton(built, tiny_net, tmp_path, capsys):
    root, _, _ = built
    ckpt = modelpress.save(modelpress.compress(tiny_net, "int8"), tmp_path / "ckpt")
    code, _, err = run(capsys, "put", root, ckpt, "tiny")
    assert code == 2 and "pass the uncompressed model" in one_line_error(err)


@pytest.mark.parametrize("argv, message", [
    (["ls", "{missing}"], "is not a modelpress store"),
    (["log", "{missing}", "m"], "is not a modelpress store"),
    (["verify", "{tmp}"], "is not a modelpress store"),
    (["init", "{tmp}"], "exists and is not empty"),
    (["log", "{root}", "ghost"], "model 'ghost' is not in the store"),
    (["get", "{root}", "ghost"], "model 'ghost' is not in the store"),
    (["get", "{root}", "m", "nope"], "model 'm' has no version or ref 'nope'"),
    (["diff", "{root}", "m", "nope"], "has no version or ref 'nope'"),
    (["diff", "{root}", "m", "good", "nope"], "has no version or ref 'nope'"),
    (["tag", "{root}", "m", "nope", "t"], "has no version or ref 'nope'"),
    (["tag", "{root}", "m", "latest", "../x"], "invalid tag name '../x'"),
    (["get", "{root}", "m", "latest", "--out", "{tmp}/out"], "holds a plain state dict"),
    (["put", "{root}", "{missing}", "m"], "does not exist"),
])
def test_errors_exit_2_with_one_line(built, tmp_path, capsys, argv, message):
    root, _, _ = built
    with Store(root) as s:
        before = [(v.id, v.tags) for v in s.log("m")]
    paths = {"root": str(root), "tmp": str(tmp_path), "missing": str(tmp_path / "missing")}
    code, out, err = run(capsys, *(a.format(**paths) for a in argv))
    assert code == 2
    assert message in one_line_error(err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "missing").exists()
    with Store(root) as s:  # a failed command changes nothing
        assert [(v.id, v.tags) for v in s.log("m")] == before


@pytest.mark.slow
def test_minilm_through_the_cli_round_trips(minilm, tmp_path, capsys):
    """The bundled sentence encoder: put (twice: the second adds nothing), ls, log, get --out, verify, gc."""
    root = tmp_path / "store"
    assert run(capsys, "init", root)[0] == 0
    code, out, err = run(capsys, "put", root, "minilm", "minilm", "-m", "fp32", "--tag", "base")
    assert code == 0, err
    assert run(capsys, "put", root, "minilm", "minilm", "-m", "again")[0] == 0
    assert run(capsys, "ls", root)[1].startswith("minilm  2 version(s)")
    code, out, _ = run(capsys, "log", root, "minilm")
    newest, oldest = out.splitlines()
    assert "+0.0 MB  again" in newest and "(base)" in oldest
    assert run(capsys, "get", root, "minilm", "base", "--out", tmp_path / "out")[0] == 0
    assert run(capsys, "verify", root)[1].startswith("ok: ")
    assert run(capsys, "gc", root)[1].startswith("removed 0 chunks")

    reloaded = modelpress.load(tmp_path / "out")
    assert_identical(reloaded.state_dict(), minilm.state_dict())
    with Store(root) as s:
        stored = s.load("minilm", "base")
        assert_identical(stored.state_dict(), copy.deepcopy(minilm).state_dict())
        sentences = ["the store keeps every bit", "a second sentence"]
        assert torch.equal(stored.encode(sentences), minilm.encode(sentences))


@pytest.mark.slow
def test_put_with_the_aligned_layout_loads_identically(minilm, tmp_path, capsys):
    root = tmp_path / "store"
    run(capsys, "init", root)
    code, _, err = run(capsys, "put", root, "minilm", "minilm", "--codec", "*.weight=aligned")
    assert code == 0, err
    with Store(root) as s:
        vid = s.resolve("minilm")
        codecs = {t.name: {s.catalog.chunk(c).codec.name for c in t.chunks} for t in s.catalog.tensors(vid)}
        assert all(c == {"aligned"} for name, c in codecs.items() if name.endswith(".weight"))
        assert any(c != {"aligned"} for name, c in codecs.items() if name.endswith(".bias"))
        assert_identical(s.load("minilm").state_dict(), copy.deepcopy(minilm).state_dict())
