"""English sentences from the docstrings of the Python standard library, for evaluation and calibration.

Every Python install carries the corpus, so evaluation needs no download and gives the same
sentences on every machine with the same Python version. The sources are parsed with `ast`, never
imported: importing some stdlib modules has side effects (`antigravity` opens a web browser).
"""

from __future__ import annotations

import ast
import functools
import os
import random
import re
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from modelpress.errors import ConfigError

__all__ = ["CorpusSplits", "corpus_splits", "is_prose", "split_sentences", "stdlib_sentences"]

# Folders of the stdlib whose docstrings are test scaffolding, demos, or third-party code.
SKIPPED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
)
MAX_FILE_BYTES = 1_000_000
MIN_CHARS, MAX_CHARS, MIN_WORDS = 40, 300, 6
MIN_LETTER_FRACTION = 0.9  # letters and spaces, over all characters
FORBIDDEN = (">>>", "::", "{", "}", "=", "__", "://")

# A line of a docstring that is code, a doctest, a reST directive or field, a signature, or an underline.
_CODE_LINE = re.compile(
    r"""^(\s                           # indented: literal block, argument list, continuation
        | >>> | \.\.\.? | \$ | %      # doctest, directive, shell prompt
        | :\w                         # reST field (:param x:)
        | [\w.]+\(.*\)\s*(->.*)?$     # signature: name(args) -> result
        | [-=~^*+#]{3,}\s*$           # section underline
        )""",
    re.VERBOSE,
)
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
_ABBREVIATIONS = ("e.g.", "i.e.", "cf.", "vs.", "Mr.", "Dr.", "St.", "No.")


def stdlib_sentences(seed: int = 0) -> list[str]:
    """Every prose sentence of the stdlib docstrings, deduplicated, in an order fixed by `seed`."""
    sentences = list(_sorted_sentences())
    random.Random(seed).shuffle(sentences)
    return sentences


@dataclass(frozen=True)
class CorpusSplits:
    """Disjoint sentence sets: one to measure fidelity on, one to calibrate with."""

    evaluation: tuple[str, ...]
    calibration: tuple[str, ...]


def corpus_splits(n_eval: int = 2000, n_calib: int = 512, seed: int = 0) -> CorpusSplits:
    """The first `n_eval` shuffled sentences for evaluation and the next `n_calib` for calibration.

    Disjoint so that a model calibrated on some sentences is never scored on the same ones.
    """
    for name, n in (("n_eval", n_eval), ("n_calib", n_calib)):
        if n < 1:
            raise ConfigError(f"{name}={n} is too small: ask for at least 1 sentence")
    sentences = stdlib_sentences(seed)
    if n_eval + n_calib > len(sentences):
        raise ConfigError(
            f"n_eval + n_calib = {n_eval + n_calib} but the stdlib docstrings hold only "
            f"{len(sentences)} prose sentences: ask for at most {len(sentences)} in total"
        )
    return CorpusSplits(
        evaluation=tuple(sentences[:n_eval]),
        calibration=tuple(sentences[n_eval : n_eval + n_calib]),
    )


def is_prose(sentence: str) -> bool:
    """Whether a sentence reads as English prose rather than code, a signature, or a fragment."""
    if not MIN_CHARS <= len(sentence) <= MAX_CHARS:
        return False
    if not (sentence[0].isupper() and sentence.endswith(".")):
        return False
    if any(token in sentence for token in FORBIDDEN):
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters >= MIN_LETTER_FRACTION * len(sentence) and len(sentence.split()) >= MIN_WORDS


@functools.lru_cache(maxsize=1)
def _sorted_sentences() -> tuple[str, ...]:
    """All prose sentences, first spelling of each kept (case-insensitive), in sorted order."""
    seen: set[str] = set()
    unique = []
    for sentence in sorted({s for doc in _stdlib_docstrings() for s in split_sentences(doc)}):
        if is_prose(sentence) and sentence.casefold() not in seen:
            seen.add(sentence.casefold())
            unique.append(sentence)
    return tuple(unique)


def _stdlib_docstrings() -> Iterator[str]:
    """Module, class and function docstrings of every parseable stdlib source file."""
    for path in _stdlib_files(Path(sysconfig.get_paths()["stdlib"])):
        tree = _parse(path)
        if tree is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def _stdlib_files(root: Path) -> list[Path]:
    """`*.py` files under `root`, sorted, outside the skipped folders."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(files)


def _parse(path: Path) -> ast.Module | None:
    """The syntax tree of a source file, or None when it is too big, unreadable or unparseable."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        source = path.read_bytes()
        with warnings.catch_warnings():  # invalid escape sequences in old sources warn at parse time
            warnings.simplefilter("ignore")
            return ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError):
        return None


def split_sentences(docstring: str) -> list[str]:
    """Sentences of the prose paragraphs of a docstring; code lines end a paragraph and are dropped."""
    sentences = []
    for paragraph in _prose_paragraphs(docstring):
        sentences.extend(_rejoin_abbreviations(_SENTENCE_END.split(paragraph)))
    return sentences


def _prose_paragraphs(docstring: str) -> Iterator[str]:
    """Runs of consecutive non-blank, non-code lines, each joined into one line."""
    lines: list[str] = []
    for line in docstring.splitlines() + [""]:
        if line.strip() and not _CODE_LINE.match(line):
            lines.append(line.strip())
        elif lines:
            yield " ".join(lines)
            lines = []


def _rejoin_abbreviations(pieces: list[str]) -> list[str]:
    """Undo splits made after an abbreviation ("e.g. Foo") that does not end a sentence."""
    joined: list[str] = []
    for piece in pieces:
        if joined and joined[-1].endswith(_ABBREVIATIONS):
            joined[-1] = f"{joined[-1]} {piece}"
        else:
            joined.append(piece)
    return joined
