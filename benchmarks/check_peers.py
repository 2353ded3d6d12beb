"""Build every peer of the bundled MiniLM once and print its size, fidelity and speed.

A quick check of `peers.py` before the benchmark relies on it: each peer must load, encode, agree
with the float model about as well as expected, and the float ONNX export must match torch
(cosine > 0.9999), or the export is wrong. Run from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/check_peers.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from modelpress.formats.hf import load_sentence_encoder
from peers import Peer, ort_dynamic_int8, ort_fp32, torch_dynamic_int8

THREADS = 2
EXPORT_MIN_COSINE = 0.9999


def sentences(count: int) -> list[str]:
    """`count` fixed English sentences: the stdlib corpus if present, else a built-in list."""
    try:
        from modelpress.data.corpus import stdlib_sentences
    except ImportError:
        return _fallback_sentences(count)
    return stdlib_sentences()[:count]


def _fallback_sentences(count: int) -> list[str]:
    subjects = ["The old librarian", "A curious child", "Our new compiler", "The river", "Every committee",
                "A tired engineer", "The small dog", "This function", "The morning train", "A quiet student"]
    verbs = ["quickly reads", "carefully checks", "rarely mentions", "slowly crosses", "happily returns",
             "often ignores", "eventually finds"]
    objects = ["the long report before lunch.", "a missing key in the cache.", "the bridge near the station.",
               "every letter that arrives on Monday.", "the results of yesterday's experiment."]
    pool = [f"{s} {v} {o}" for o in objects for v in verbs for s in subjects]
    return pool[:count]


def best_time(encode, batch: list[str], repeats: int) -> float:
    """Best wall time of `repeats` encodes of `batch`, after one warm-up batch."""
    encode(batch[:32])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode(batch)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "modelpress-peers")
    parser.add_argument("--sentences", type=int, default=300, help="sentences to measure cosine on")
    parser.add_argument("--timed", type=int, default=256, help="sentences per timed encode")
    parser.add_argument("--repeats", type=int, default=3, help="timed encodes per peer (best is kept)")
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    encoder = load_sentence_encoder("minilm")
    texts = sentences(max(args.sentences, args.timed))
    evaluation, timed = texts[: args.sentences], texts[: args.timed]
    reference = encoder.encode(evaluation)

    builders = [
        ("torch per-tensor", lambda: torch_dynamic_int8(encoder, False, args.workdir)),
        ("torch per-channel", lambda: torch_dynamic_int8(encoder, True, args.workdir)),
        ("ORT fp32", lambda: ort_fp32(encoder, args.workdir)),
        ("ORT QInt8 per-tensor", lambda: ort_dynamic_int8(encoder, False, "QInt8", args.workdir)),
        ("ORT QInt8 per-channel", lambda: ort_dynamic_int8(encoder, True, "QInt8", args.workdir)),
        ("ORT QUInt8 per-channel", lambda: ort_dynamic_int8(encoder, True, "QUInt8", args.workdir)),
    ]
    fp32_size = (encoder.source / "model.safetensors").stat().st_size
    peers = [Peer("fp32 torch (SentenceEncoder)", fp32_size, lambda s: encoder.encode(s, batch_size=32))]
    build_times = [0.0]
    for _label, build in builders:
        start = time.perf_counter()
        peers.append(build())
        build_times.append(time.perf_counter() - start)

    print(f"{len(evaluation)} sentences for cosine, {len(timed)} timed, torch threads {torch.get_num_threads()}")
    print(f"{'peer':<40} {'size MB':>8} {'mean cos':>9} {'min cos':>8} {'encode s':>9} {'build s':>8}")
    failed = False
    for peer, build_s in zip(peers, build_times):
        emb = peer.encode(evaluation)
        if emb.shape != reference.shape or emb.dtype != torch.float32:
            print(f"{peer.name}: embeddings {tuple(emb.shape)} {emb.dtype}, expected {tuple(reference.shape)} float32")
            failed = True
            continue
        cos = (emb * reference).sum(1)
        seconds = best_time(peer.encode, timed, args.repeats)
        print(
            f"{peer.name:<40} {peer.size_bytes / 1e6:>8.1f} {cos.mean().item():>9.4f} {cos.min().item():>8.4f} "
            f"{seconds:>9.3f} {build_s:>8.1f}"
        )
        if peer.name == "ONNX Runtime fp32" and cos.min().item() < EXPORT_MIN_COSINE:
            print(f"  ONNX export disagrees with torch (min cosine < {EXPORT_MIN_COSINE}): the export is wrong")
            failed = True
    print()
    for peer in peers[1:]:
        print(f"{peer.name}: {peer.note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
