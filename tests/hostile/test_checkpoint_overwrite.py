"""Saving never destroys what modelpress did not write: the source model, a store, a link's target,
a folder of someone else's files. Each case asserts the error and that the data is untouched."""

from __future__ import annotations

import os

import pytest
import torch
from _tiny_source import (_tiny_checkpoint_master, _tiny_source_master, embeddings, folder_digest,  # noqa: F401
                          tiny_checkpoint, tiny_source)

from modelpress import fileio
from modelpress.errors import OutputExistsError, UnsafeOutputError
from modelpress.formats.checkpoint import load, save
from modelpress.formats.hf import load_sentence_encoder
from modelpress.formats.writer import STAGING_SUFFIX


@pytest.fixture
def encoder(tiny_source):
    return load_sentence_encoder(tiny_source)


def _refused(model, out, match, **kwargs):
    with pytest.raises((UnsafeOutputError, OutputExistsError), match=match):
        save(model, out, **kwargs)


def test_saving_over_the_source_folder_is_refused(encoder, tiny_source):
    before = folder_digest(tiny_source)
    _refused(encoder, tiny_source, "is, contains or lies inside", overwrite=True)
    assert folder_digest(tiny_source) == before
    assert torch.equal(embeddings(load_sentence_encoder(tiny_source)), embeddings(encoder))


def test_saving_over_a_folder_that_contains_the_source_is_refused(tmp_path, tiny_source):
    (tmp_path / "dir" / "inner").mkdir(parents=True)
    inner = tiny_source.rename(tmp_path / "dir" / "inner" / "model")
    (tmp_path / "dir" / "notes.txt").write_text("mine")
    model = load_sentence_encoder(inner)
    before = folder_digest(tmp_path / "dir")
    _refused(model, tmp_path / "dir", "is, contains or lies inside", overwrite=True)
    assert folder_digest(tmp_path / "dir") == before


def test_saving_inside_the_source_is_refused(encoder, tiny_source):
    _refused(encoder, tiny_source / "compressed", "is, contains or lies inside")
    assert not (tiny_source / "compressed").exists()


def test_protected_folders_are_refused(encoder, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for out in (store, store / "chunks", tmp_path):
        _refused(encoder, out, "is, contains or lies inside", overwrite=True, protected=[store])
    assert list(store.iterdir()) == []


def test_saving_into_a_store_is_refused(encoder, tmp_path):
    (tmp_path / "s" / "chunks").mkdir(parents=True)
    (tmp_path / "s" / fileio.STORE_MARKER).write_text("store")
    _refused(encoder, tmp_path / "s" / "chunks" / "m", "inside the modelpress store")
    _refused(encoder, tmp_path / "s", "inside the modelpress store", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["STORE", "chunks"]


def test_overwriting_a_folder_that_holds_a_store_is_refused(encoder, tiny_checkpoint):
    (tiny_checkpoint / "nested").mkdir()
    (tiny_checkpoint / "nested" / fileio.STORE_MARKER).write_text("store")
    before = folder_digest(tiny_checkpoint)
    _refused(encoder, tiny_checkpoint, "holds a modelpress store", overwrite=True)
    assert folder_digest(tiny_checkpoint) == before


def test_overwriting_a_folder_modelpress_did_not_write_is_refused(encoder, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    _refused(encoder, tmp_path / "photos", "not a modelpress output", overwrite=True)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_an_existing_checkpoint_needs_overwrite(encoder, tiny_checkpoint):
    before = folder_digest(tiny_checkpoint)
    _refused(encoder, tiny_checkpoint, "already exists")
    assert folder_digest(tiny_checkpoint) == before


@pytest.mark.parametrize("target", ["folder", "checkpoint", "dangling"])
def test_a_symbolic_link_is_never_followed(encoder, tmp_path, tiny_checkpoint, target):
    real = {"folder": tmp_path / "elsewhere", "checkpoint": tiny_checkpoint, "dangling": tmp_path / "nowhere"}[target]
    if target == "folder":
        real.mkdir()
        (real / "keep.txt").write_text("keep")
    before = folder_digest(real) if real.exists() else None
    (tmp_path / "link").symlink_to(real)
    _refused(encoder, tmp_path / "link", "symbolic link", overwrite=True)
    assert (tmp_path / "link").is_symlink() and (folder_digest(real) if real.exists() else None) == before
    assert target != "dangling" or not real.exists()


def test_a_path_under_a_regular_file_is_refused(encoder, tmp_path):
    (tmp_path / "file").write_text("data")
    _refused(encoder, tmp_path / "file" / "out", "which is a file")
    _refused(encoder, tmp_path / "file", "is a file, not a folder", overwrite=True)
    assert (tmp_path / "file").read_text() == "data"


@pytest.mark.parametrize("out", ["/proc/self/modelpress-out", "/sys/modelpress-out", "/dev/modelpress-out"])
def test_kernel_folders_are_refused(encoder, out):
    _refused(encoder, out, "system folder of the kernel")


def test_overwrite_replaces_a_checkpoint_atomically(encoder, tiny_checkpoint):
    old = load(tiny_checkpoint)
    save(encoder, tiny_checkpoint, overwrite=True)  # the float model over the int8 one
    assert torch.allclose(embeddings(load(tiny_checkpoint)), embeddings(encoder), atol=1e-6)
    assert not torch.equal(embeddings(old), embeddings(encoder))
    siblings = [p.name for p in tiny_checkpoint.parent.iterdir() if p.name.startswith(".")]
    assert siblings == [], siblings  # no staging or old folder left beside it


def test_overwriting_twice_in_a_row_works(encoder, tmp_path):
    for _ in range(2):  # what `make demo` does on every run
        save(encoder, tmp_path / "out", overwrite=True)
    assert torch.allclose(embeddings(load(tmp_path / "out")), embeddings(encoder), atol=1e-6)


def test_the_output_is_checked_before_any_work(encoder, tmp_path, monkeypatch):
    import modelpress.formats.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "describe", lambda *a, **k: pytest.fail("described before checking --out"))
    (tmp_path / "link").symlink_to(tmp_path)
    _refused(encoder, tmp_path / "link", "symbolic link", overwrite=True)


def test_check_output_dir_accepts_what_it_may_replace(tmp_path, tiny_checkpoint):
    assert fileio.check_output_dir(tmp_path / "new" / "deeper", overwrite=False) == tmp_path / "new" / "deeper"
    (tmp_path / "empty").mkdir()
    assert fileio.check_output_dir(tmp_path / "empty", overwrite=True) == tmp_path / "empty"
    assert fileio.check_output_dir(tiny_checkpoint, overwrite=True) == tiny_checkpoint
    via_link_parent = tmp_path / "parent-link"
    via_link_parent.symlink_to(tmp_path)  # a link above the output (e.g. ~/models -> /data) is fine
    assert fileio.check_output_dir(via_link_parent / "out", overwrite=False) == via_link_parent / "out"


def test_no_staging_folder_is_left_after_a_refused_or_failed_save(encoder, tmp_path, monkeypatch):
    import modelpress.formats.writer as writer

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(writer.fileio, "swap_in_dir", fail)
    with pytest.raises(RuntimeError, match="boom"):
        save(encoder, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(STAGING_SUFFIX)] == []
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == ["src"]  # (the source folder of the fixture)
