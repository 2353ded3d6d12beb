"""Latency of several sentence encoders measured side by side, for ratios that survive a shared machine."""

from __future__ import annotations

import time
from typing import Callable

import torch

Encode = Callable[[list[str]], torch.Tensor]


def time_batch_interleaved(models: list[tuple[str, Encode]], sentences: list[str], threads: int,
                           rounds: int) -> dict[str, list[float]]:
    """Seconds per model per round, the models taking turns batch by batch.

    The sentences are cut into the batches `encode` itself would form (longest first, 32 each) and
    every model encodes batch i before any model starts batch i + 1: a burst of load from other jobs
    then lands on all models alike, instead of on whichever ran through it whole (with model-by-model
    rounds, per-round ratios on this machine swung by +-0.1). Only for PyTorch models: a runtime
    whose threads spin after each call (ONNX Runtime) would slow whichever model runs next.
    """
    ordered = sorted(sentences, key=len, reverse=True)
    batches = [ordered[i:i + 32] for i in range(0, len(ordered), 32)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _, encode in models:
            encode(batches[0])  # warm-up: first calls prepare kernels
        times: dict[str, list[float]] = {name: [] for name, _ in models}
        for _ in range(rounds):
            spent = dict.fromkeys(times, 0.0)
            for batch in batches:
                for name, encode in models:
                    start = time.perf_counter()
                    encode(batch)
                    spent[name] += time.perf_counter() - start
            for name in times:
                times[name].append(spent[name])
        return times
    finally:
        torch.set_num_threads(previous)
