"""Every path a user can get wrong on the command line: one line naming the problem, exit code 2, and
nothing that was there before is touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _tiny_source import (_tiny_checkpoint_master, _tiny_source_master, embeddings, folder_digest,  # noqa: F401
                          tiny_checkpoint, tiny_source)

import modelpress.formats.hf as hf
from modelpress.cli import EXIT_USER_ERROR, main
from modelpress.nn.provenance import provenance
from modelpress.formats.checkpoint import load
from modelpress.formats.hf import load_sentence_encoder


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == EXIT_USER_ERROR
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("modelpress: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the source fails the test: the refusal must come before any work."""
    monkeypatch.setattr(hf, "build_sentence_encoder", lambda folder: pytest.fail("loaded before refusing"))


def test_out_that_contains_the_source_is_refused_and_the_source_survives(capsys, tmp_path, tiny_source, no_loading):
    (tmp_path / "dir" / "inner").mkdir(parents=True)
    source = tiny_source.rename(tmp_path / "dir" / "inner" / "model")
    (tmp_path / "dir" / "other.txt").write_text("other work")
    before = folder_digest(tmp_path / "dir")
    code, _, err = run(capsys, "compress", source, "--out", tmp_path / "dir", "--overwrite")
    one_line_error(code, err, "--out", "is, contains or lies inside", str(source))
    assert folder_digest(tmp_path / "dir") == before


@pytest.mark.parametrize("where", ["itself", "inside"])
def test_out_equal_to_or_inside_the_source_is_refused(capsys, tiny_source, no_loading, where):
    before = folder_digest(tiny_source)
    out = tiny_source if where == "itself" else tiny_source / "int8"
    code, _, err = run(capsys, "compress", tiny_source, "--out", out, "--overwrite")
    one_line_error(code, err, "is, contains or lies inside")
    assert folder_digest(tiny_source) == before


@pytest.mark.parametrize("kind", ["link to a folder", "link to the source", "dangling link"])
def test_out_that_is_a_symbolic_link_is_refused(capsys, tmp_path, tiny_source, no_loading, kind):
    target = {"link to a folder": tmp_path / "elsewhere", "link to the source": tiny_source,
              "dangling link": tmp_path / "nowhere"}[kind]
    if kind == "link to a folder":
        target.mkdir()
        (target / "keep.txt").write_text("keep")
    before = folder_digest(target) if target.exists() else None
    (tmp_path / "out").symlink_to(target)
    code, _, err = run(capsys, "compress", tiny_source, "--out", tmp_path / "out", "--overwrite")
    one_line_error(code, err, "symbolic link")
    assert (tmp_path / "out").is_symlink() and (folder_digest(target) if target.exists() else None) == before


def test_out_under_a_regular_file_is_refused(capsys, tmp_path, tiny_source, no_loading):
    (tmp_path / "notes").write_text("notes")
    code, _, err = run(capsys, "compress", tiny_source, "--out", tmp_path / "notes" / "out")
    one_line_error(code, err, "which is a file")
    assert (tmp_path / "notes").read_text() == "notes"


def test_out_in_proc_is_refused(capsys, tiny_source, no_loading):
    code, _, err = run(capsys, "compress", tiny_source, "--out", "/proc/self/out")
    one_line_error(code, err, "system folder of the kernel")


def test_out_that_modelpress_did_not_write_is_refused_even_with_overwrite(capsys, tmp_path, tiny_source, no_loading):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("years")
    code, _, err = run(capsys, "compress", tiny_source, "--out", tmp_path / "work", "--overwrite")
    one_line_error(code, err, "not a modelpress output")
    assert (tmp_path / "work" / "thesis.tex").read_text() == "years"


def test_existing_out_without_overwrite_is_refused(capsys, tiny_source, tiny_checkpoint, no_loading):
    before = folder_digest(tiny_checkpoint)
    code, _, err = run(capsys, "compress", tiny_source, "--out", tiny_checkpoint)
    one_line_error(code, err, "already exists", "--overwrite")
    assert folder_digest(tiny_checkpoint) == before


def test_store_equal_to_out_is_refused(capsys, tmp_path, tiny_source, no_loading):
    code, _, err = run(capsys, "compress", tiny_source, "--out", tmp_path / "o", "--store", tmp_path / "o")
    one_line_error(code, err, "is, contains or lies inside")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("json_path, message", [
    ("missing/report.json", "does not exist; create it first"),
    ("folder", "is a folder"),
    ("src/report.json", "lies inside"),
    ("link.json", "symbolic link"),
])
def test_bad_json_report_path_is_refused_before_loading(capsys, tmp_path, tiny_source, no_loading, json_path, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    code, _, err = run(capsys, "compress", tiny_source, "--out", tmp_path / "o", "--json", tmp_path / json_path)
    one_line_error(code, err, "--json", message)
    assert not (tmp_path / "o").exists() and not (tmp_path / "target.json").exists()


def test_compress_twice_with_overwrite_replaces_the_output(capsys, tmp_path, tiny_source):
    for recipe in ("int8", "w8a8"):  # `make demo` runs the same command again and again
        code, out, err = run(capsys, "compress", tiny_source, "--recipe", recipe, "--out", tmp_path / "o", "--overwrite")
        assert code == 0, err
        assert f"saved {recipe} model to {tmp_path / 'o'}" in out
    loaded = load(tmp_path / "o")
    assert provenance(loaded).recipe_name == "w8a8"
    assert torch.nn.functional.cosine_similarity(embeddings(loaded), embeddings(load_sentence_encoder(tiny_source))).min() > 0.95
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "src"]


def test_model_path_mistakes(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    for path, message in ((tmp_path / "nope", "does not exist"), (tmp_path / "file", "is a file"),
                          (tmp_path / "fifo", "is a file")):
        code, _, err = run(capsys, "compress", path, "--out", tmp_path / "o")
        one_line_error(code, err, message)


@pytest.mark.parametrize("command", ["inspect", "eval"])
def test_checkpoint_path_mistakes(capsys, tmp_path, tiny_source, command):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "nope", "does not exist"), (tmp_path / "file", "is a file, not a folder"),
                          (tmp_path / "empty", "not a modelpress checkpoint"), (tiny_source, "not a modelpress checkpoint")):
        argv = ("inspect", path) if command == "inspect" else ("eval", tiny_source, path, "--no-latency")
        code, _, err = run(capsys, *argv)
        one_line_error(code, err, message)


def test_write_recipe_into_a_missing_folder_is_refused_before_measuring(capsys, tmp_path, tiny_source, no_loading):
    code, _, err = run(capsys, "sensitivity", tiny_source, "--budget", "5", "--write-recipe", tmp_path / "no" / "r.yaml")
    one_line_error(code, err, "--write-recipe", "does not exist")


def test_a_stray_memory_error_is_one_line(capsys, tmp_path, monkeypatch):
    import modelpress.cli.model_cmds as commands

    def explode(args):
        raise MemoryError()

    monkeypatch.setattr(commands, "cmd_presets", explode)
    monkeypatch.setattr("modelpress.cli.cmd_presets", explode)
    code, _, err = run(capsys, "presets")
    one_line_error(code, err, "ran out of memory")


def test_paths_are_shown_as_given(capsys, tmp_path, tiny_source, no_loading):
    relative = Path(os.path.relpath(tiny_source))
    code, _, err = run(capsys, "compress", relative, "--out", relative / "x")
    one_line_error(code, err, repr(str(relative / "x")))
