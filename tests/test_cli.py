"""The command line: user mistakes end in one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from modelpress.cli import EXIT_USER_ERROR, main


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("modelpress: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_missing_model_path(capsys, tmp_path):
    code, _, err = _run(capsys, "compress", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == EXIT_USER_ERROR
    _one_line_error(err, "does not exist", "bundled")


def test_folder_without_weights(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    code, _, err = _run(capsys, "compress", str(tmp_path / "m"), "--out", str(tmp_path / "o"))
    assert code == EXIT_USER_ERROR
    _one_line_error(err, "no model.safetensors", "pickle")


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    code, _, err = _run(capsys, "compress", str(tmp_path / "m"), "--out", str(tmp_path / "o"))
    assert code == EXIT_USER_ERROR
    _one_line_error(err, "no config.json")


def test_unknown_preset(capsys, tmp_path):
    code, _, err = _run(capsys, "compress", "minilm", "--recipe", "int5", "--out", str(tmp_path / "o"))
    assert code == EXIT_USER_ERROR
    _one_line_error(err, "unknown preset 'int5'", "int8")


@pytest.mark.parametrize(
    "recipe, fragments",
    [
        ("stages:\n  - pass: rtn\n    config: {bitz: 4}\n", ("unknown field(s) ['bitz']", "allowed fields")),
        ("stages:\n  - pass: rtn\n    config: {bits: 5}\n", ("unsupported bit width 5", "(2, 3, 4, 8)")),
        ("stages:\n  - pass: rtn\n    config: {search: best}\n", ("search='best'", "minmax")),
        ("stages:\n  - pass: gptq9\n", ("unknown pass 'gptq9'",)),
        ("stages: [\n", ("not valid YAML",)),
        ("version: 7\nstages:\n  - pass: rtn\n", ("recipe version 7",)),
    ],
)
def test_invalid_recipe_file(capsys, tmp_path, recipe, fragments):
    path = _write(tmp_path / "r.yaml", recipe)
    code, _, err = _run(capsys, "compress", "minilm", "--recipe", path, "--out", str(tmp_path / "o"))
    assert code == EXIT_USER_ERROR
    _one_line_error(err, *fragments)
    assert not (tmp_path / "o").exists()


def test_missing_recipe_file(capsys, tmp_path):
    code, _, err = _run(capsys, "compress", "minilm", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o"))
    assert code == EXIT_USER_ERROR
    _one_line_error(err, "does not exist")


@pytest.mark.slow
def test_group_size_that_does_not_divide_the_width(capsys, tmp_path):
    path = _write(tmp_path / "r.yaml", "stages:\n  - pass: rtn\n    targets: {types: [Linear]}\n"
                                       "    config: {bits: 4, symmetric: false, group_size: 100}\n")
    code, _, err = _run(capsys, "compress", "minilm", "--recipe", path, "--out", str(tmp_path / "o"))
    assert code == EXIT_USER_ERROR
    _one_line_error(err, "group size 100 does not divide the input width 384", "layer")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_compress_inspect_eval(capsys, tmp_path):
    out = str(tmp_path / "o")
    code, stdout, _ = _run(capsys, "compress", "minilm", "--recipe", "int4", "--out", out)
    assert code == 0 and "saved int4 model" in stdout
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir() if p.is_file()}
    code, stdout, err = _run(capsys, "compress", "minilm", "--recipe", "int4", "--out", out)
    assert code == EXIT_USER_ERROR and stdout == ""
    _one_line_error(err, f"--out {out!r} already exists", "--overwrite")
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir() if p.is_file()} == before
    code, stdout, _ = _run(capsys, "inspect", out)
    assert code == 0 and "int4 asym g32" in stdout and "word_embeddings" in stdout
    code, stdout, _ = _run(capsys, "eval", "minilm", out, "--sentences", "300", "--no-latency")
    assert code == 0 and "mean cosine" in stdout


def test_inspect_of_a_folder_that_is_not_a_checkpoint(capsys, tmp_path):
    code, _, err = _run(capsys, "inspect", str(tmp_path))
    assert code == EXIT_USER_ERROR
    _one_line_error(err, "not a modelpress checkpoint")


def test_the_installed_command_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "modelpress.cli", "compress", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USER_ERROR
    _one_line_error(proc.stderr, "does not exist")
