"""Sane limits on what a file may declare, checked before anything is allocated or parsed.

Every size a file states (a shape, a decoded length, a header) is a request to allocate memory;
a hostile file can state anything. Readers check such a request here first, so that a bomb ends
in `LimitExceededError` (one clear line) instead of MemoryError, RecursionError or the OOM killer.
"""

from __future__ import annotations

from modelpress.errors import LimitExceededError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_NUMBER_DIGITS",
    "MAX_RECIPE_BYTES",
    "MAX_YAML_NODES",
    "MAX_SUPPORT_FILE_BYTES",
    "available_memory",
    "check_allocation",
]

MAX_JSON_BYTES = 16 << 20  # a manifest, config or catalogue field; ours are a few hundred KB at most
MAX_JSON_DEPTH = 64  # nesting of any JSON or YAML document we read (ours nest at most ~8 deep)
MAX_NUMBER_DIGITS = 32  # digits of an integer in JSON (shapes and sizes fit in 20; Python refuses > 4300 itself)
MAX_RECIPE_BYTES = 1 << 20  # a recipe file
MAX_YAML_NODES = 100_000  # nodes of a YAML document after alias expansion (an alias bomb grows past it)
MAX_SUPPORT_FILE_BYTES = 64 << 20  # config.json, tokenizer.json, vocab.txt ... (tokenizer.json of big vocabularies ~20 MB)
_HEADROOM = 0.9  # never plan to take more than this share of the memory the kernel says is available


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get without swapping (Linux MemAvailable), or None
    where that is not known (then only the caller's own caps apply)."""
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_allocation(nbytes: int, what: str, hint: str = "") -> None:
    """Refuse to allocate `nbytes` for `what` when the machine cannot hold it (or the number is absurd).

    Call it before allocating anything whose size came from a file. `hint` says what to do instead.
    """
    if not isinstance(nbytes, int) or nbytes < 0 or nbytes > 1 << 48:
        raise LimitExceededError(f"{what} declares an impossible size ({nbytes!r} bytes); the file is corrupt")
    free = available_memory()
    if free is not None and nbytes > _HEADROOM * free:
        raise LimitExceededError(
            f"{what} needs {nbytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB of memory is available"
            + (f": {hint}" if hint else "; free memory or load less"))
