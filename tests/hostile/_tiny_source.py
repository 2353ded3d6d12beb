"""A tiny sentence-transformers folder (BERT, 2 layers of width 32, word-piece vocabulary of 64), built in
a second: what the hostile source, checkpoint and CLI tests tamper with instead of the 90 MB MiniLM."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
         "the", "a", "model", "compress", "store", "weights", "small", "fast", "file", "folder", "hello", "world",
         "cat", "dog", "runs", "sits", "on", "mat", "is", "and", "of", "to", "in", "it", "##s", "##ed", "##ing"]
SENTENCES = ["the cat sits on the mat", "a dog runs fast", "compress the model weights", "hello world",
             "the store is small and fast", "a file in a folder"]


def tokenizer_json() -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from tokenizers.processors import TemplateProcessing

    tokenizer = Tokenizer(WordPiece({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.normalizer = BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = BertPreTokenizer()
    tokenizer.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer.to_str()


def write_tiny_source(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    """Write the folder (config.json, tokenizer.json, vocab.txt, modules.json, pooling and sentence-bert
    configs, model.safetensors) and return it."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(config.to_json_string())
    (folder / "tokenizer.json").write_text(tokenizer_json())
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                  "pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    return folder


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path: equal before and after means untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# -- fixtures (import them into a test module by name) ------------------------------------------------

@pytest.fixture(scope="session")
def _tiny_source_master(tmp_path_factory) -> Path:
    return write_tiny_source(tmp_path_factory.mktemp("tiny") / "source")


@pytest.fixture
def tiny_source(_tiny_source_master, tmp_path) -> Path:
    """A fresh copy of the tiny source folder, at tmp_path/src."""
    return Path(shutil.copytree(_tiny_source_master, tmp_path / "src"))


@pytest.fixture(scope="session")
def _tiny_checkpoint_master(_tiny_source_master, tmp_path_factory) -> Path:
    from modelpress.compress import compress
    from modelpress.formats.checkpoint import save
    from modelpress.formats.hf import load_sentence_encoder

    model = compress(load_sentence_encoder(_tiny_source_master), "int8")
    return save(model, tmp_path_factory.mktemp("tinyckpt") / "ckpt")


@pytest.fixture
def tiny_checkpoint(_tiny_checkpoint_master, tmp_path) -> Path:
    """A fresh copy of an int8 checkpoint of the tiny encoder, at tmp_path/ckpt."""
    return Path(shutil.copytree(_tiny_checkpoint_master, tmp_path / "ckpt"))


def embeddings(model) -> torch.Tensor:
    return model.encode(SENTENCES)


def edit_manifest(checkpoint: Path, edit) -> None:
    """Apply `edit(manifest)` to a checkpoint's manifest (the manifest itself carries no hash)."""
    manifest = json.loads((checkpoint / "modelpress.json").read_text())
    edit(manifest)
    (checkpoint / "modelpress.json").write_text(json.dumps(manifest))


def replace_file(checkpoint: Path, rel: str, data: bytes, rehash: bool = True) -> None:
    """Replace a checkpoint file; with `rehash`, also its sha256 in the manifest (a consistent forgery)."""
    (checkpoint / rel).write_bytes(data)
    if rehash:
        edit_manifest(checkpoint, lambda m: m["files"].update({rel: hashlib.sha256(data).hexdigest()}))


def rewrite_weights(checkpoint: Path, edit) -> None:
    """Apply `edit(tensors)` to a checkpoint's stored arrays and rehash: a consistent forgery."""
    from safetensors.torch import load, save

    tensors = dict(load((checkpoint / "weights.safetensors").read_bytes()))
    edit(tensors)
    replace_file(checkpoint, "weights.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))


def in_child(fn, memory_limit: int | None = None, timeout: float = 120) -> tuple[str, str]:
    """Run `fn()` in a forked child (address space capped at `memory_limit` more bytes, if given) and
    return ("ok" | "<ExceptionClass>" | "killed by signal N", message): a bomb that escaped the checks
    fails there, not in the test process."""
    import os
    import resource
    import signal
    import time

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        status = b"ok\n"
        try:
            if memory_limit is not None:
                with open("/proc/self/statm") as fh:
                    pages = int(fh.read().split()[0])
                limit = pages * resource.getpagesize() + memory_limit
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            fn()
        except BaseException as exc:  # reported to the parent
            status = f"{type(exc).__name__}\n{str(exc)[:2000]}".encode()
        finally:
            os.write(write, status)
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout
    while True:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            return "timed out", ""
        time.sleep(0.02)
    with os.fdopen(read, "rb") as fh:
        report = fh.read().decode()
    if os.WIFSIGNALED(code):
        return f"killed by signal {os.WTERMSIG(code)}", report
    kind, _, message = report.partition("\n")
    return kind, message


def with_deadline(fn, timeout: float = 60):
    """`fn()` in a thread with a deadline: a read that blocks (a FIFO) fails the test instead of hanging it."""
    import threading

    outcome: list = []

    def target():
        try:
            outcome.append((True, fn()))
        except BaseException as exc:  # (handed to the test)
            outcome.append((False, exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=timeout)
    assert outcome, f"{fn} blocked for {timeout} s"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
