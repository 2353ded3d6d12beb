"""Integrity covers every file a load uses, and only regular files are read: a changed tokenizer,
config or vocabulary, a FIFO, a link or a device in a checkpoint is refused, never used."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _tiny_source import (_tiny_checkpoint_master, _tiny_source_master, edit_manifest, embeddings,  # noqa: F401
                          folder_digest, replace_file, tiny_checkpoint, tiny_source, with_deadline)

from modelpress.errors import FormatError, IntegrityError, ModelNotFoundError, NotRegularFileError
from modelpress.formats.checkpoint import load, read_manifest
from modelpress.formats.manifest import WEIGHTS


def test_every_file_of_the_checkpoint_is_hashed(tiny_checkpoint):
    listed = read_manifest(tiny_checkpoint)["files"]
    on_disk = {str(p.relative_to(tiny_checkpoint)) for p in tiny_checkpoint.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {"modelpress.json"}
    assert {"tokenizer.json", "config.json", "vocab.txt", WEIGHTS, "1_Pooling/config.json"} <= set(listed)


def test_swapping_two_vocabulary_ids_in_tokenizer_json_is_detected(tiny_checkpoint):
    tokenizer = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]  # silently changed the embeddings before
    before = folder_digest(tiny_checkpoint)
    replace_file(tiny_checkpoint, "tokenizer.json", json.dumps(tokenizer).encode(), rehash=False)
    with pytest.raises(IntegrityError, match="tokenizer.json: checksum does not match"):
        load(tiny_checkpoint)
    assert folder_digest(tiny_checkpoint).keys() == before.keys()


@pytest.mark.parametrize("rel", ["config.json", "vocab.txt", "1_Pooling/config.json", "modules.json", WEIGHTS])
def test_any_changed_file_is_detected(tiny_checkpoint, rel):
    data = bytearray((tiny_checkpoint / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    replace_file(tiny_checkpoint, rel, bytes(data), rehash=False)
    with pytest.raises(IntegrityError, match="checksum does not match"):
        load(tiny_checkpoint)


def test_a_listed_file_that_is_missing_is_reported(tiny_checkpoint):
    (tiny_checkpoint / "tokenizer.json").unlink()
    with pytest.raises(ModelNotFoundError, match="has no tokenizer.json"):
        load(tiny_checkpoint)


def test_files_the_manifest_does_not_list_are_never_read(tiny_checkpoint):
    reference = embeddings(load(tiny_checkpoint))
    edit_manifest(tiny_checkpoint, lambda m: m["files"].pop("1_Pooling/config.json"))
    (tiny_checkpoint / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (tiny_checkpoint / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    # without the (unlisted) pooling config the default, mean pooling, is used: the forged CLS one is not read
    assert torch.equal(embeddings(load(tiny_checkpoint)), reference)


def test_legacy_checkpoints_without_file_hashes_are_refused(tiny_checkpoint):
    def legacy(manifest):
        digest = manifest.pop("files")[WEIGHTS]
        manifest.update(weights_file=WEIGHTS, weights_sha256=digest)

    edit_manifest(tiny_checkpoint, legacy)
    with pytest.raises(FormatError, match="older modelpress .* compress the model again"):
        load(tiny_checkpoint)


@pytest.mark.parametrize("rel", ["tokenizer.json", WEIGHTS, "modelpress.json"])
def test_a_fifo_in_a_checkpoint_is_refused_without_blocking(tiny_checkpoint, rel):
    (tiny_checkpoint / rel).unlink()
    os.mkfifo(tiny_checkpoint / rel)
    with pytest.raises(NotRegularFileError, match="not a regular file"):
        with_deadline(lambda: load(tiny_checkpoint))


@pytest.mark.parametrize("rel", ["config.json", WEIGHTS, "modelpress.json"])
@pytest.mark.parametrize("target", ["/dev/zero", "copy"])
def test_a_symbolic_link_in_a_checkpoint_is_refused(tmp_path, tiny_checkpoint, rel, target):
    real = tmp_path / "real"
    real.write_bytes((tiny_checkpoint / rel).read_bytes())  # even a link to the right bytes
    (tiny_checkpoint / rel).unlink()
    (tiny_checkpoint / rel).symlink_to("/dev/zero" if target == "/dev/zero" else real)
    with pytest.raises(NotRegularFileError, match="symbolic link"):
        with_deadline(lambda: load(tiny_checkpoint))


def test_a_linked_subfolder_is_refused(tmp_path, tiny_checkpoint):
    (tiny_checkpoint / "1_Pooling").rename(tmp_path / "pooling")
    (tiny_checkpoint / "1_Pooling").symlink_to(tmp_path / "pooling")
    with pytest.raises(NotRegularFileError, match="1_Pooling is a symbolic link"):
        load(tiny_checkpoint)


def test_a_folder_in_place_of_a_file_is_refused(tiny_checkpoint):
    (tiny_checkpoint / "vocab.txt").unlink()
    (tiny_checkpoint / "vocab.txt").mkdir()
    with pytest.raises(NotRegularFileError, match="folder"):
        load(tiny_checkpoint)


def test_an_intact_checkpoint_still_loads(tiny_checkpoint, _tiny_checkpoint_master):
    assert torch.equal(embeddings(load(tiny_checkpoint)), embeddings(load(_tiny_checkpoint_master)))
