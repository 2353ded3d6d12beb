"""Saving and loading compressed models: exact round trips, no pickle, hostile files refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelpress
from modelpress.errors import FormatError, LimitExceededError, ModelNotFoundError, OutputExistsError
from modelpress.nn.provenance import provenance
from modelpress.formats.checkpoint import MANIFEST, WEIGHTS, load, read_manifest, save

IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])


@pytest.fixture(params=["int8", "w8a8", "int4", "int3"])
def saved(request, tiny_net, tmp_path):
    skeleton = copy.deepcopy(tiny_net)
    model = modelpress.compress(tiny_net, request.param)
    path = save(model, tmp_path / "ckpt")
    return model, skeleton, path


def test_round_trip_gives_bit_identical_outputs(saved):
    model, skeleton, path = saved
    loaded = load(path, model=skeleton)
    with torch.inference_mode():
        assert torch.equal(model(IDS), loaded(IDS))
    assert provenance(loaded).recipe == provenance(model).recipe


def test_plain_module_needs_its_skeleton(saved):
    _, _, path = saved
    with pytest.raises(FormatError, match="pass the uncompressed model"):
        load(path)


def _is_pickle_or_torch_zip(data: bytes) -> bool:
    # pickle protocol 2+ starts with PROTO (0x80) and a version byte; torch.save writes a zip.
    return (len(data) > 1 and data[0] == 0x80 and data[1] <= 5) or data[:4] == b"PK\x03\x04"


def test_no_file_written_is_a_pickle(saved):
    _, _, path = saved
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    assert {p.name for p in files} == {MANIFEST, WEIGHTS}
    for file in files:
        data = file.read_bytes()
        assert not _is_pickle_or_torch_zip(data), file
        assert b"\x80\x04\x95" not in data and b"\x80\x02c" not in data, file  # no embedded pickle either
    json.loads((Path(path) / MANIFEST).read_text())  # the manifest is plain JSON
    assert load_file(str(Path(path) / WEIGHTS))  # the weights are plain safetensors


def test_existing_output_is_not_overwritten(saved, tiny_net):
    _, _, path = saved
    before = (Path(path) / WEIGHTS).read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        save(tiny_net, path)
    assert (Path(path) / WEIGHTS).read_bytes() == before


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format="other"), "does not name the modelpress checkpoint format"),
        (lambda m: m.update(format_version=99), "format version 99 is not supported"),
        (lambda m: m["files"].update({WEIGHTS: "0" * 64}), "checksum does not match"),
        (lambda m: m["files"].update({"../../etc/passwd": "0" * 64}), "is not one a checkpoint holds"),
        (lambda m: m["files"].update({WEIGHTS: "0" * 63}), "no valid sha256"),
        (lambda m: m["files"].update({WEIGHTS: ["0" * 64]}), "no valid sha256"),
        (lambda m: m["files"].pop(WEIGHTS), "must list weights.safetensors"),
        (lambda m: m.pop("files"), "must list weights.safetensors"),
        (lambda m: m.update(files=[WEIGHTS]), "must list weights.safetensors"),
        (lambda m: m.update(format_version=True), "format version True is not supported"),
        (lambda m: m.update(architecture={"kind": ["module"]}), "architecture has no kind"),
        (lambda m: m.update(recipe=[1]), "recipe must be a mapping"),
        (lambda m: m.update(modules=[]), "modules or architecture is missing"),
        (lambda m: m["modules"].update({"no.such.layer": m["modules"]["up"]}), "does not exist in the model"),
        (lambda m: m["modules"]["up"].update(type="conv"), "invalid entry"),
        (lambda m: m["modules"]["up"]["weight"].update(shape=[1, 2, 3]), "corrupt"),
        (lambda m: m["modules"]["up"]["weight"].update(bits=5), "invalid parameters"),
        (lambda m: m["modules"]["up"]["weight"].update(kind="exotic"), "unknown encoding kind"),
        (lambda m: m["modules"]["up"].update(kernel="warp-drive"), "warp-drive"),
        (lambda m: m["modules"]["embed"].update(padding_idx=10**9), "padding_idx"),
    ],
)
def test_tampered_manifest_gives_clear_error(tiny_net, tmp_path, edit, message):
    skeleton = copy.deepcopy(tiny_net)
    path = save(modelpress.compress(tiny_net, "int8"), tmp_path / "ckpt")
    _edit_manifest(path, edit)
    with pytest.raises(FormatError, match=message):
        load(path, model=skeleton)


@pytest.mark.parametrize("cut", [0, 1, 10, 100])
def test_truncated_manifest_gives_clear_error(tiny_net, tmp_path, cut):
    path = save(modelpress.compress(tiny_net, "int8"), tmp_path / "ckpt")
    data = (path / MANIFEST).read_bytes()
    (path / MANIFEST).write_bytes(data[:cut])
    with pytest.raises(FormatError, match="not valid JSON|does not name"):
        read_manifest(path)


def test_oversized_manifest_is_refused_before_parsing(tiny_net, tmp_path):
    path = save(modelpress.compress(tiny_net, "int8"), tmp_path / "ckpt")
    with open(path / MANIFEST, "ab") as fh:
        fh.write(b" " * (16 * 2**20 + 1))
    with pytest.raises(LimitExceededError, match="more than the"):
        read_manifest(path)


def test_truncated_weights_give_clear_error(tiny_net, tmp_path):
    skeleton = copy.deepcopy(tiny_net)
    path = save(modelpress.compress(tiny_net, "int8"), tmp_path / "ckpt")
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="checksum does not match"):
        load(path, model=skeleton)


def test_weights_with_wrong_array_shape_are_refused_even_with_a_matching_hash(tiny_net, tmp_path):
    skeleton = copy.deepcopy(tiny_net)
    path = save(modelpress.compress(tiny_net, "int4"), tmp_path / "ckpt")
    tensors = load_file(str(path / WEIGHTS))
    tensors["up.weight::scale"] = tensors["up.weight::scale"][:, :1].contiguous()
    save_file(tensors, str(path / WEIGHTS))
    import hashlib

    digest = hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    _edit_manifest(path, lambda m: m["files"].update({WEIGHTS: digest}))
    with pytest.raises(FormatError, match="scale"):
        load(path, model=skeleton)


@pytest.mark.parametrize("name", [MANIFEST, WEIGHTS])
def test_missing_files_give_clear_error(tiny_net, tmp_path, name):
    skeleton = copy.deepcopy(tiny_net)
    path = save(modelpress.compress(tiny_net, "int8"), tmp_path / "ckpt")
    (path / name).unlink()
    with pytest.raises(ModelNotFoundError, match=name):
        load(path, model=skeleton)


def test_missing_folder_gives_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")
