"""Wall-clock time to encode a batch of sentences, at a fixed CPU thread count.

The thread count is pinned because CPU latency depends on it more than on most compression
choices, and comparing an int8 model on 16 threads with a float model on 2 measures nothing.
The median of a few runs is reported, since a single run is at the mercy of the scheduler.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from modelpress.errors import ConfigError

__all__ = ["Latency", "measure_latency", "ratio"]


@dataclass(frozen=True)
class Latency:
    """Seconds per call of an encoder over one batch, each timed run kept."""

    median_s: float
    runs_s: tuple[float, ...]
    threads: int
    n_sentences: int

    def __post_init__(self) -> None:
        if not self.runs_s or any(t < 0 for t in self.runs_s):
            raise ConfigError(f"runs_s={self.runs_s!r}: give at least one non-negative run time")
        if self.threads < 1 or self.n_sentences < 1:
            raise ConfigError(
                f"threads={self.threads}, n_sentences={self.n_sentences}: both must be at least 1"
            )


def measure_latency(
    encode: Callable[[list[str]], object],
    sentences: Sequence[str],
    threads: int = 2,
    repeats: int = 3,
    warmup: int = 1,
) -> Latency:
    """Median seconds of `repeats` timed `encode(sentences)` calls after `warmup` untimed ones.

    torch runs on `threads` threads during the measurement; the caller's setting is restored after.
    """
    if threads < 1 or repeats < 1 or warmup < 0:
        raise ConfigError(
            f"threads={threads}, repeats={repeats}, warmup={warmup}: "
            "give threads >= 1, repeats >= 1 and warmup >= 0"
        )
    if not sentences:
        raise ConfigError("no sentences to encode: give at least one sentence to time")
    batch = list(sentences)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            encode(batch)
        runs = tuple(_seconds(encode, batch) for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)
    return Latency(median_s=statistics.median(runs), runs_s=runs, threads=threads, n_sentences=len(batch))


def ratio(a: Latency, b: Latency) -> float:
    """How many times longer `a` takes than `b` (below 1 means `a` is faster).

    Both must time the same number of sentences; thread counts may differ, to measure scaling.
    """
    if a.n_sentences != b.n_sentences:
        raise ConfigError(
            f"latencies timed {a.n_sentences} and {b.n_sentences} sentences: "
            "time both encoders on the same batch"
        )
    if b.median_s <= 0:
        raise ConfigError(f"latency b has median {b.median_s} s: time a batch large enough to measure")
    return a.median_s / b.median_s


def _seconds(encode: Callable[[list[str]], object], batch: list[str]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    encode(batch)
    return time.perf_counter() - start
