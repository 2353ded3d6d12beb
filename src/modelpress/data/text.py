"""Running English prose from the Python language reference that every Python install ships
(`pydoc_data/topics.py`), for language-model perplexity and calibration without a download.

The source is a different text from the docstring corpus (modelpress.data.corpus), and it is cut
into two disjoint splits by topic: `dev` (for calibration and for choosing recipes) and `heldout`
(for the figures we report; never tune on it). Only prose paragraphs are kept: the grammar
productions and code examples of the reference are indented and are dropped. The file is parsed
with `ast` and its one dict literal read with `literal_eval`, never imported or executed.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
from pathlib import Path

from modelpress.errors import ConfigError

__all__ = ["SPLITS", "reference_text", "topics_file"]

SPLITS = ("dev", "heldout")
MAX_TOPICS_BYTES = 8 << 20
_UNDERLINE = re.compile(r"^[*=\-~^]{3,}\s*$")


def topics_file() -> Path:
    """Where this Python keeps the language reference's topics."""
    return Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"


def reference_text(split: str = "heldout") -> str:
    """The prose of every other topic of the language reference (sorted by name), joined by blank lines.

    `dev` takes topics 0, 2, 4, ...; `heldout` takes 1, 3, 5, ..., each paragraph only where it first appears. Each split holds about 40 topics
    and over 14,000 words (Python 3.11: about 20,000 tokens for a Llama tokenizer).
    """
    if split not in SPLITS:
        raise ConfigError(f"text split {split!r} is not one of {SPLITS}: use 'dev' to tune, 'heldout' to report")
    topics = _topics()
    seen: set[str] = set()
    kept = []
    for i, name in enumerate(sorted(topics)):  # some topics repeat others' paragraphs: each is kept once, first
        for paragraph in _prose(topics[name]):
            if paragraph not in seen:
                seen.add(paragraph)
                if i % 2 == SPLITS.index(split):
                    kept.append(paragraph)
    return "\n\n".join(kept)


@functools.lru_cache(maxsize=1)
def _topics() -> dict[str, str]:
    path = topics_file()
    try:
        if os.path.getsize(path) > MAX_TOPICS_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_TOPICS_BYTES} bytes: this Python's install is unusual")
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise ConfigError(f"cannot read the language reference at {path} ({exc}); reinstall Python's "
                          "standard library") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            if isinstance(topics, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in topics.items()):
                return topics
    raise ConfigError(f"{path} holds no topics dict; reinstall Python's standard library")


def _prose(topic: str) -> list[str]:
    """The topic's paragraphs that are prose: not indented (code, grammar), not headings."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", topic):
        lines = block.split("\n")
        if not block.strip() or lines[0].startswith(" ") or any(_UNDERLINE.match(line) for line in lines):
            continue
        paragraphs.append(" ".join(line.strip() for line in lines))
    return paragraphs
