"""Quantisation-aware training against post-training RTN on the digits CNN (Conv2d + Linear).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_qat.py [--seeds 0 1 2]

For each seed: train the fp32 DigitsCNN (38,282 parameters) on scikit-learn's 8x8 digits (1437
train / 360 test, fixed stratified split), then quantise every Conv2d and Linear weight with
post-training round-to-nearest (int8 symmetric min-max; int4 and int2 asymmetric with MSE range
search, all per output channel), and with QAT (the same int4 / int2 schemes, starting from the
RTN ranges, fine-tuned for a few epochs). Accuracy is on the 360 test images, reported as the
mean over seeds with the range; bytes are the weights.safetensors that modelpress.save writes
(biases stay fp32). Everything runs on one thread. The table goes to benchmarks/results_qat.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

import modelpress
from modelpress.encodings import QuantScheme, mse_params
from modelpress.formats.checkpoint import WEIGHTS
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demos"))  # demos/digits.py (not installed)
from digits import DigitsCNN, accuracy, load_digits_data, train  # noqa: E402
from modelpress.passes import QATConfig, convert_qat, prepare_qat

RESULTS = Path(__file__).resolve().parent / "results_qat.md"
FP32_EPOCHS, FP32_LR = 20, 3e-3
QAT_EPOCHS, QAT_LR = 5, 1e-3
RTN = {  # name: rtn config, applied to every Conv2d and Linear
    "RTN int8 (sym, min-max)": {"bits": 8, "symmetric": True, "search": "minmax"},
    "RTN int4 (asym, MSE)": {"bits": 4, "symmetric": False, "search": "mse"},
    "RTN int2 (asym, MSE)": {"bits": 2, "symmetric": False, "search": "mse"},
}
QAT = {
    "QAT int4 (asym, LSQ)": QATConfig(bits=4, symmetric=False),
    "QAT int2 (asym, LSQ)": QATConfig(bits=2, symmetric=False),
}


from machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

class PeerFakeQuant(nn.Module):
    """The peer: PyTorch's learnable per-channel fake quantiser (LSQ+ with integer zero points), same start."""

    def __init__(self, w: torch.Tensor, bits: int):
        super().__init__()
        scale, zero = mse_params(w, QuantScheme(bits, False))  # (R, 1, 1): the ranges RTN and QAT start from
        self.scale, self.zero = nn.Parameter(scale.reshape(-1)), nn.Parameter(zero.reshape(-1))
        self.qmax = 2**bits - 1
        self.grad_factor = 1.0 / math.sqrt(w[0].numel() * self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch._fake_quantize_learnable_per_channel_affine(w, self.scale, self.zero, 0, 0, self.qmax,
                                                                 self.grad_factor)


def peer_qat(base: nn.Module, bits: int, data, seed: int) -> tuple[float, float]:
    """Accuracy and seconds of the same fine-tune with PyTorch's fake quantiser on every Conv2d/Linear weight."""
    start = time.perf_counter()
    model = copy.deepcopy(base)
    for module in [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
        parametrize.register_parametrization(module, "weight", PeerFakeQuant(module.weight.detach(), bits))
    train(model, data, QAT_EPOCHS, QAT_LR, seed=100 + seed)
    return accuracy(model, data), time.perf_counter() - start


def weights_bytes(model: torch.nn.Module, workdir: Path, name: str) -> int:
    return (modelpress.save(model, workdir / name) / WEIGHTS).stat().st_size


def run_seed(seed: int, data, workdir: Path) -> dict[str, tuple[float, int, float]]:
    """variant -> (test accuracy, weights bytes, seconds of training or compression)."""
    out = {}
    base = DigitsCNN(seed)
    start = time.perf_counter()
    train(base, data, FP32_EPOCHS, FP32_LR, seed)
    out["fp32"] = (accuracy(base, data), weights_bytes(base, workdir, f"fp32-{seed}"), time.perf_counter() - start)
    for name, config in RTN.items():
        targets = {"types": ["Conv2d", "Linear"]}
        recipe = {"name": name, "stages": [{"pass": "rtn", "targets": targets, "config": config}]}
        seconds = float("inf")
        for _ in range(3):  # best of three: quantising takes milliseconds, so machine noise dominates one run
            start = time.perf_counter()
            model = modelpress.compress(copy.deepcopy(base), recipe)
            seconds = min(seconds, time.perf_counter() - start)
        out[name] = (accuracy(model, data), weights_bytes(model, workdir, f"{len(out)}-{seed}"), seconds)
    for name, config in QAT.items():
        start = time.perf_counter()
        model = prepare_qat(copy.deepcopy(base), config)
        train(model, data, QAT_EPOCHS, QAT_LR, seed=100 + seed)
        with torch.no_grad():
            fake_quant = model(data.x_test)
        convert_qat(model)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            assert torch.equal(model(data.x_test), fake_quant), "converted model differs from the QAT model"
        out[name] = (accuracy(model, data), weights_bytes(model, workdir, f"{len(out)}-{seed}"), seconds)
    for bits in (4, 2):
        acc, seconds = peer_qat(base, bits, data, seed)
        out[f"peer: PyTorch learnable fake-quant int{bits} (asym)"] = (acc, 0, seconds)
    return out


def table(results: dict[int, dict[str, tuple[float, int, float]]]) -> str:
    seeds = sorted(results)
    variants = list(results[seeds[0]])
    fp32_bytes = results[seeds[0]]["fp32"][1]
    lines = [
        f"| variant | test accuracy, mean over seeds {seeds} [min, max] | seed {seeds[0]} | weights bytes | vs fp32 | "
        "time (s, mean) |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        accs = [results[s][v][0] * 100 for s in seeds]
        size = results[seeds[0]][v][1]
        seconds = statistics.mean(results[s][v][2] for s in seeds)
        what = "train" if v == "fp32" else ("quantise" if v.startswith("RTN") else "fine-tune")
        stored = f"{size:,} | {fp32_bytes / size:.1f}x" if size else "not stored (fake-quant only) | -"
        lines.append(
            f"| {v} | {statistics.mean(accs):.2f}% [{min(accs):.2f}, {max(accs):.2f}] | {accs[0]:.2f}% | {stored} | "
            f"{seconds:.3f} ({what}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-write", action="store_true", help="print only; leave results_qat.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation (and noise on shared cores)
    data = load_digits_data()
    with tempfile.TemporaryDirectory() as tmp:
        results = {seed: run_seed(seed, data, Path(tmp)) for seed in args.seeds}
    body = table(results)
    header = (
        f"# QAT vs post-training RTN on the digits CNN\n\n"
        f"Generated by `benchmarks/bench_qat.py` on {datetime.date.today().isoformat()}, {cpu_name()}, "
        f"torch {torch.__version__}, one thread throughout.\n\n"
        f"DigitsCNN (conv 1->16 3x3, conv 16->32 3x3, max-pool, linear 512->64, linear 64->10; 38,282 parameters) "
        f"on scikit-learn's 8x8 digits (1437 train / 360 test, stratified, seed 0). fp32: Adam, {FP32_EPOCHS} "
        f"epochs, lr {FP32_LR}. Every Conv2d and Linear weight is quantised per output channel; QAT starts from "
        f"the MSE ranges RTN picks and fine-tunes weights and LSQ step sizes / zero points for {QAT_EPOCHS} "
        f"epochs at lr {QAT_LR}; the converted model's logits equal the QAT model's exactly (checked). "
        f"Bytes are weights.safetensors as modelpress.save writes it (header, fp32 biases and float16 scales "
        f"included). The peer rows fine-tune the same models the same way with PyTorch's own learnable "
        f"fake quantiser (`torch._fake_quantize_learnable_per_channel_affine`, LSQ+ with zero points rounded "
        f"to integers), from the same MSE ranges; PyTorch has no 2/4-bit storage for them. Times are wall "
        f"clock on a shared 2-core machine (quantise: best of 3).\n\n"
    )
    text = header + body + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
