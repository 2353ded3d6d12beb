"""ONNX export of MiniLM run by ONNX Runtime, beside ORT's own dynamic int8 of the same model, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_onnx.py [--sentences 2000] [--threads 2] [--rounds 5]
        [--presets w8a8-token,w8a8-smooth,int8]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_onnx.py --part lm [--recipe llm-q4] [--windows 8]
        [--calibration 32]

Part `lm`: SmolLM2-135M-Instruct compressed by `--recipe` (GPTQ calibrated on `--calibration` dev windows),
exported to ONNX (4-bit layers as MatMulNBits) and scored by ONNX Runtime on `--windows` 512-token windows
of the heldout text, next to modelpress's own perplexity of the same model (exact figures).

For each modelpress preset: the model is compressed, saved, exported (`modelpress.export_model(..., "onnx", ...)`)
and run by ONNX Runtime. Reported per row: mean / 1st-percentile / minimum cosine of the ORT export to
modelpress's own model of the same weights (the export's exactness), mean and p1 cosine to fp32 PyTorch on
held-out sentences (fidelity), weights bytes (the .onnx file), and latency of encoding `--latency-sentences`
sentences in batches of 32 (every ORT model in whole rounds, interleaved; median ratio to ORT's per-channel
QInt8 of the fp32 export: ORT's own `quantize_dynamic(per_channel=True)` after `quant_pre_process`, built
by benchmarks/peers.py as in bench_quant.py), and the ratio to ORT's fp32 run of the same float export.
Cosines are exact figures; latencies need a quiet machine. w8a8-token is the preset whose W8A8 layers ORT
computes bit for bit as modelpress does (activations "row", nn/kernels.py quantize_rows).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelpress  # noqa: E402
from modelpress.data.corpus import corpus_splits  # noqa: E402
from modelpress.evaluate.fidelity import cosine_similarities, fidelity  # noqa: E402
from modelpress.exports import export_model  # noqa: E402
from modelpress.formats.hf import load_sentence_encoder  # noqa: E402
from modelpress.formats.st_encode import encode_sentences  # noqa: E402

BATCH = 32


def ort_encoder(encoder, path: Path, threads: int, optimise: bool = True):
    """encode(sentences) of the exported folder's model.onnx: its sentence_embedding output, batched as
    SentenceEncoder.encode batches (by length, 32 a batch)."""
    import peers

    session = peers._ort_session(path, threads, optimise)

    def forward(input_ids, attention_mask, token_type_ids):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                 "token_type_ids": token_type_ids.numpy()}
        return torch.from_numpy(session.run(["sentence_embedding"], feeds)[0])

    return lambda sentences: encode_sentences(encoder, forward, sentences, BATCH)


def build(encoder, workdir: Path, presets: list[str], threads: int):
    """(name, encode, bytes, modelpress's own encode or None, encode by the unoptimised graph or None) for ORT's
    own quantisation, ORT's fp32 and every export."""
    import peers

    ort_own = peers.ort_dynamic_int8(encoder, per_channel=True, weight_type="QInt8", workdir=workdir)
    onnx_file = next((workdir).glob(f"*{peers._ort_version()}-qint8-per-channel/model.onnx"))
    plain = peers.SentenceEncoder(peers._OrtTransformer(peers._ort_session(onnx_file, threads, optimise=False)),
                                  copy.deepcopy(encoder.tokenizer), encoder.config, encoder.support_files, encoder.source)
    rows = [(ort_own.name, ort_own.encode, onnx_file.stat().st_size, None, plain.encode)]
    fp32 = peers.ort_fp32(encoder, workdir)
    rows.append((fp32.name, fp32.encode, fp32.size_bytes, None, None))
    for name in presets:
        model = modelpress.compress(load_sentence_encoder("minilm"), name)
        run = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))  # ORT's own build is cached; ours is not
        checkpoint = modelpress.save(model, run / "checkpoint")
        folder = export_model(checkpoint, "onnx", run / "onnx")
        rows.append((f"modelpress {name} -> ONNX", ort_encoder(encoder, folder / "model.onnx", threads),
                     (folder / "model.onnx").stat().st_size, model.encode,
                     ort_encoder(encoder, folder / "model.onnx", threads, optimise=False)))
    return rows


def _cosines(a: torch.Tensor, b: torch.Tensor) -> str:
    """Mean / 1st percentile / minimum of the per-sentence cosines."""
    cos = cosine_similarities(a, b)
    return f"{cos.mean():.6f} / {torch.quantile(cos, 0.01):.6f} / {cos.min():.6f}"


def timed(rows, sentences: list[str], threads: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per row per round, rows taking turns round by round (one warm-up each)."""
    torch.set_num_threads(threads)
    for _, encode, *_ in rows:
        encode(sentences)
    times: dict[str, list[float]] = {name: [] for name, *_ in rows}
    for _ in range(rounds):
        for name, encode, *_ in rows:
            start = time.perf_counter()
            encode(sentences)
            times[name].append(time.perf_counter() - start)
    return times


def lm_part(args) -> None:
    """SmolLM2: modelpress's perplexity and ONNX Runtime's of the MatMulNBits export, same windows."""
    import numpy as np

    from modelpress.calibration import calibration_windows
    from modelpress.data.text import reference_text
    from modelpress.evaluate.perplexity import score_language_model, token_windows
    from modelpress.exports.onnx import onnx_bytes
    from modelpress.formats.models import load_model

    import onnxruntime as ort

    lm = load_model("smollm2")
    windows = token_windows(torch.tensor(lm.tokenizer(reference_text("heldout"))["input_ids"]), 512,
                            max_tokens=512 * args.windows)
    calibration = calibration_windows(lm.tokenizer, args.calibration) if args.calibration else None
    start = time.perf_counter()
    lm = modelpress.compress(lm, args.recipe, calibration=calibration)
    compress_s = time.perf_counter() - start
    with torch.inference_mode():
        ours = score_language_model(lm, windows)
    start = time.perf_counter()
    data = onnx_bytes(lm)
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def run(input_ids):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": np.ones(tuple(input_ids.shape), dtype=np.int64)}
        return torch.from_numpy(session.run(None, feeds)[0])

    theirs = score_language_model(run, windows)
    agree = float((ours.predictions == theirs.predictions).float().mean())
    print(f"Command: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_onnx.py --part lm --recipe {args.recipe} "
          f"--windows {args.windows} --calibration {args.calibration}\n")
    print(f"SmolLM2-135M-Instruct, {args.recipe}, heldout {windows.shape[0]} x 512 tokens; .onnx {len(data) / 1e6:.1f} MB "
          f"(compress {compress_s:.0f} s, export {export_s:.0f} s)\n")
    print("| runtime | perplexity | vs modelpress | top-1 agreement |\n|---|---|---|---|")
    print(f"| modelpress | {np.exp(ours.nll):.4f} | 1.0000 | 1.000 |")
    print(f"| ONNX Runtime {ort.__version__} (MatMulNBits) | {np.exp(theirs.nll):.4f} | "
          f"{np.exp(theirs.nll - ours.nll):.4f} | {agree:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["encoder", "lm"], default="encoder")
    parser.add_argument("--recipe", default="llm-q4", help="lm: the recipe SmolLM2 is compressed with")
    parser.add_argument("--windows", type=int, default=8, help="lm: heldout windows of 512 tokens")
    parser.add_argument("--calibration", type=int, default=32, help="lm: dev windows to calibrate GPTQ on")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--latency-sentences", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--presets", default="w8a8-token,w8a8-smooth,int8")
    parser.add_argument("--workdir", help="cache folder for ORT's exports (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "lm":
        return lm_part(args)
    encoder = load_sentence_encoder("minilm")
    sentences = list(corpus_splits(n_eval=args.sentences, n_calib=1).evaluation)
    reference = encoder.encode(sentences)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = build(encoder, workdir, args.presets.split(","), args.threads)
        times = timed(rows, sentences[: args.latency_sentences], args.threads, args.rounds)
        base = rows[0][0]
        print(f"Run on {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
        print(f"Command: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_onnx.py --sentences {args.sentences} "
              f"--threads {args.threads} --rounds {args.rounds} --presets {args.presets}\n")
        print("| model | .onnx MB | cos to modelpress (mean / p1 / min) | cos to itself, ORT unoptimised "
              "(mean / p1 / min) | mean cos to fp32 | p1 cos | latency s | vs ORT per-channel QInt8 | vs ORT fp32 |\n"
              "|---|---|---|---|---|---|---|---|---|")
        fp32_name = rows[1][0]
        for name, encode, size, own, unoptimised in rows:
            got = encode(sentences)
            f = fidelity(reference, got)
            exact = _cosines(own(sentences), got) if own is not None else "-"
            itself = _cosines(unoptimised(sentences), got) if unoptimised is not None else "-"
            ratios = [t / b for t, b in zip(times[name], times[base])]
            vs_fp32 = statistics.median(t / b for t, b in zip(times[name], times[fp32_name]))
            print(f"| {name} | {size / 1e6:.1f} | {exact} | {itself} | {f.mean_cosine:.4f} | {f.p1_cosine:.4f} | "
                  f"{statistics.median(times[name]):.3f} | {statistics.median(ratios):.2f}x "
                  f"[{min(ratios):.2f}-{max(ratios):.2f}] | {vs_fp32:.2f}x |")


if __name__ == "__main__":
    main()
