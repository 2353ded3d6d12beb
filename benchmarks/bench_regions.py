"""Running models under a memory budget: modelpress streaming from its store vs accelerate's disk offload at
the same budget, and a plain full load, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_regions.py [--threads 2] [--new-tokens 32] [--readers 1,2]
        [--fraction 0.25] [--reserve 10MB] [--sentences 64] [--q4 gptq|rtn|skip] [--out FILE.md]

A check on a small setting (minutes): --new-tokens 4 --runs 1 --readers 1 --sentences 8 --q4 rtn

Rows (each in its own subprocess, so its memory is its own; `peak MB` is the growth of the process's peak
resident set (VmHWM) over the process with torch and transformers imported, the tokenizer library warmed
and torch's kernels warmed by a tiny random Llama (float and 4-bit, modelpress's engine and transformers'
generate), i.e. what loading and running the model adds; `+%` is that growth over the row's budget):

- SmolLM2 fp32, full load from the store (`Store.load`), decoded by modelpress.nn.generation;
- SmolLM2 fp32 streamed from the store under `--fraction` of its in-memory weights (`open_streamed`, chunks
  stored `aligned`, the tied table in 1 MiB row blocks), once per `--readers` count;
- SmolLM2 fp32 through accelerate's disk offload at the same budget (`device_map="auto"`,
  `max_memory={"cpu": budget}`, an offload folder), decoded by transformers' `generate`;
- SmolLM2 llm-q4 (4-bit g32 GPTQ, tied table and output layer 8-bit; `--q4 rtn`: the same layout by RTN,
  quick) full load, and streamed under `--fraction` of its in-memory weights (packed codes and scales through
  the ring, run by the packed-code kernel), beside accelerate's disk offload at that budget (accelerate has
  no CPU 4-bit format: it offloads the fp32 weights; the ratio is what a user with that much memory gets);
- streamed rows keep `--reserve` of their budget for the run's working memory (regions/streaming.py);
- `modelpress plan` of each streamed row, as printed (plan, per-region bytes, measured costs);
- MiniLM full load and streamed under 16 MB (`--encoder-memory`): encoding time of `--sentences`
  sentences and whether the embeddings are identical.

Decode tok/s: `--new-tokens` greedy tokens after a fixed prompt, the fastest of `--runs` runs after a
warm-up; every row's tokens are compared with its model's full load (`same tokens`). `read MB` is what
streaming read from the store over all runs (warm-up included). Run it on a quiet machine: decode speeds on a
shared one measure the neighbours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The three primary colours are"
SENTENCES = ["the store keeps every version once", "a model runs under a memory budget", "weights stream by layer",
             "hello world", "the cat sits on the mat", "compressed models answer fast"]

PRELUDE = r"""
import gc, json, sys, time, torch
import torch.nn.functional as F
import transformers.models.llama.modeling_llama
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast
from transformers import LlamaConfig, LlamaForCausalLM
import modelpress
from modelpress.nn.generation import greedy_generate
from modelpress.recipe import Recipe
torch.set_num_threads(ARGS["threads"])
F.linear(torch.randn(4, 576), torch.randn(1536, 576))
torch.manual_seed(0)  # torch's kernels warmed by a tiny random Llama, float and 4-bit, both engines
_tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
_ids = torch.tensor([[1, 2, 3]])
_tiny.generate(_ids, attention_mask=torch.ones_like(_ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
greedy_generate(_tiny, [1, 2, 3], 3)
greedy_generate(modelpress.compress(_tiny, Recipe.from_dict(ARGS["warm_recipe"])), [1, 2, 3], 3)
del _tiny

def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

def reset():
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return peak_kib()

def best_decode(run_once):
    run_once(2)  # warm-up
    best = None
    for _ in range(ARGS["runs"]):
        start = time.perf_counter(); one = run_once(1); t1 = time.perf_counter() - start
        start = time.perf_counter(); out = run_once(ARGS["new_tokens"]); tn = time.perf_counter() - start
        # the decode steps' rate: n tokens less the prefill's one; a busy machine can make tn - t1 meaningless
        rate = (ARGS["new_tokens"] - 1) / (tn - t1) if tn > t1 else ARGS["new_tokens"] / tn
        best = rate if best is None or rate > best else best
    return out, best
"""

MODELPRESS_LM = r"""
from modelpress.formats.causal_lm import causal_lm_tokenizer
from modelpress.nn.generation import greedy_generate
from modelpress.regions import open_streamed
from modelpress.store import Store
store = Store(ARGS["store"])
version = store.version(ARGS["name"])
causal_lm_tokenizer({r: bytes(store.reader.read(store.catalog.chunk(c))) for r, c in version.files.items()})
gc.collect()
before = reset()
result = {}
try:
    if ARGS["memory"]:
        run = open_streamed(store, ARGS["name"], ARGS["memory"], readers=ARGS["readers"], reserve=ARGS["reserve"])
        model = run.model
    else:
        run, model = None, store.load(ARGS["name"])
    ids = model.tokenizer.encode(ARGS["prompt"])
    tokens, rate = best_decode(lambda n: greedy_generate(model.model, ids, n).tokens)
    result = {"tokens": list(tokens), "tok_s": rate, "peak": (peak_kib() - before) * 1024,
              "read": run.bytes_read() if run else 0, "held": run.weight_bytes() if run else None}
    if run:
        run.close()
except Exception as exc:
    result = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(result))
"""

ACCELERATE_LM = r"""
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(ARGS["folder"])
gc.collect()
before = reset()
model = AutoModelForCausalLM.from_pretrained(ARGS["folder"], device_map="auto", offload_folder=ARGS["offload"],
                                             max_memory={"cpu": ARGS["memory"]}, torch_dtype=torch.float32)
ids = torch.tensor([tokenizer.encode(ARGS["prompt"])])
def run_once(n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
    return tuple(out[0, ids.shape[1]:].tolist())
tokens, rate = best_decode(run_once)
print(json.dumps({"tokens": list(tokens), "tok_s": rate, "peak": (peak_kib() - before) * 1024}))
"""

MODELPRESS_ENCODER = r"""
from modelpress.regions import open_streamed
from modelpress.store import Store
store = Store(ARGS["store"])
gc.collect()
before = reset()
try:
    if ARGS["memory"]:
        run = open_streamed(store, ARGS["name"], ARGS["memory"], readers=ARGS["readers"], reserve=ARGS["reserve"])
        model = run.model
    else:
        run, model = None, store.load(ARGS["name"])
    model.encode(ARGS["sentences"][:4])
    start = time.perf_counter()
    emb = model.encode(ARGS["sentences"])
    seconds = time.perf_counter() - start
    torch.save  # (nothing pickled: the embeddings go back as JSON)
    print(json.dumps({"emb": emb.tolist(), "s": seconds, "peak": (peak_kib() - before) * 1024,
                      "held": run.weight_bytes() if run else None, "read": run.bytes_read() if run else 0}))
    if run:
        run.close()
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


def worker(code: str, args: dict) -> dict:
    source = f"ARGS = {json.dumps(args)!r}\nimport json as _j\nARGS = _j.loads(ARGS)\n" + PRELUDE + code
    done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


Q4_RTN = {"name": "q4-rtn", "stages": [  # llm-q4's layout by RTN (no calibration): the kernel warm-up, --q4 rtn
    {"pass": "rtn", "targets": {"types": ["Linear"], "ignore": ["lm_head", "*.lm_head"]},
     "config": {"bits": 4, "symmetric": True, "group_size": 32}},
    {"pass": "rtn", "targets": {"types": ["Embedding"]}, "config": {"bits": 8, "group_size": "channel"}}]}


def prepare(folder: Path, q4: str) -> dict:
    """The stores (fp32 aligned, llm-q4) and a Hugging Face folder of the fp32 model for accelerate."""
    from modelpress.compress import compress
    from modelpress.formats.hf import load_sentence_encoder
    from modelpress.formats.models import load_model
    from modelpress.presets import preset
    from modelpress.recipe import Recipe
    from modelpress.store import Store

    lm = load_model("smollm2")
    lm.model.save_pretrained(folder / "hf", safe_serialization=True)
    lm.tokenizer.save_pretrained(folder / "hf")
    store = Store.init(folder / "store")
    blocks = {"*embed_tokens.weight": 1 << 20, "*word_embeddings.weight": 1 << 20}
    store.put(lm, "smol-fp32", codecs={"*": "aligned"}, chunk_bytes=blocks)
    sizes = {"smol-fp32": sum(t.numel() * t.element_size() for t in store.get("smol-fp32").values())}
    if q4 != "skip":
        q4_model = compress(lm, preset("llm-q4") if q4 == "gptq" else Recipe.from_dict(Q4_RTN))
        # the blocks laid out for streaming like the fp32 version (page-aligned raw chunks: no entropy decode per
        # token); the tied table keeps its row-block chunks, which lookups gather
        store.put(q4_model, "smol-q4", codecs={"*.layers.*": "aligned"}, chunk_bytes=blocks)
        sizes["smol-q4"] = sum(t.numel() * t.element_size() for t in store.get("smol-q4").values())
    encoder = load_sentence_encoder("minilm")
    store.put(encoder, "minilm", codecs={"*": "aligned"}, chunk_bytes=blocks)
    store.close()
    return sizes


def plan_text(store: Path, name: str, memory: int, reserve: str) -> str:
    """`modelpress plan` as a user runs it (its own process), for RESULTS.md."""
    command = ["modelpress", "plan", name, "--store", "STORE", "--memory", str(memory), "--reserve", reserve]
    done = subprocess.run([sys.executable, "-c", "import sys; from modelpress.cli import main; sys.exit(main())",
                           *command[1:3], "--store", str(store), *command[5:]], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COLUMNS": "160"})
    out = done.stdout if done.returncode == 0 else done.stderr
    return f"`{' '.join(command)}`\n\n```\n{out.rstrip()}\n```"


def _row(name: str, r: dict, budget: int | None, reference, accelerate: dict | None) -> str:
    if "error" in r:
        return f"| {name} | {r['error'][:120]} | | | | | |"
    same = "-" if reference is None else "yes" if r["tokens"] == reference else "NO"
    ratio = f"{r['tok_s'] / accelerate['tok_s']:.2f}x" if accelerate and "tok_s" in accelerate else "-"
    over = f"{100 * (r['peak'] / budget - 1):+.1f}%" if budget else "-"
    return (f"| {name} | {r['tok_s']:.2f} | {ratio} | {r['peak'] / 1e6:.1f} | {over} | {r.get('read', 0) / 1e6:.0f} "
            f"| {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--readers", default="1,2")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--reserve", default="10MB")
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--encoder-memory", default="16MB")
    parser.add_argument("--q4", choices=("gptq", "rtn", "skip"), default="gptq")
    parser.add_argument("--out")
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sizes = prepare(folder, args.q4)
        common = {"threads": args.threads, "new_tokens": args.new_tokens, "runs": args.runs, "prompt": PROMPT,
                  "store": str(folder / "store"), "readers": 1, "reserve": args.reserve, "warm_recipe": Q4_RTN}
        offload = {**common, "folder": str(folder / "hf"), "offload": str(folder / "offload")}
        plans = []
        models = [("fp32", "smol-fp32")] + ([("llm-q4", "smol-q4")] if args.q4 != "skip" else [])
        table = ["| row | decode tok/s | vs accelerate | peak MB | peak vs budget | read MB (all runs) | same tokens |",
                 "|---|---|---|---|---|---|---|"]
        for label, name in models:
            budget = int(sizes[name] * args.fraction)
            full = worker(MODELPRESS_LM, {**common, "name": name, "memory": None})
            accelerate = worker(ACCELERATE_LM, {**offload, "memory": budget})
            reference = full.get("tokens")
            table.append(_row(f"{label}: modelpress full load", full, None, reference, accelerate))
            for readers in [int(r) for r in args.readers.split(",")]:
                streamed = worker(MODELPRESS_LM, {**common, "name": name, "memory": budget, "readers": readers})
                table.append(_row(f"{label}: modelpress streamed, {budget / 1e6:.1f} MB, {readers} reader(s)",
                                  streamed, budget, reference, accelerate))
            table.append(_row(f"{label}: accelerate disk offload (fp32 weights), {budget / 1e6:.1f} MB", accelerate,
                              budget, reference if label == "fp32" else None, None))
            plans.append(plan_text(folder / "store", name, budget, args.reserve))
        lines.append(f"SmolLM2-135M, {args.threads} threads, budgets {args.fraction:g} of the in-memory weights "
                     f"(fp32 {sizes['smol-fp32'] / 1e6:.1f} MB"
                     + (f", llm-q4 {sizes['smol-q4'] / 1e6:.1f} MB ({args.q4})" if args.q4 != "skip" else "")
                     + f"), streamed rows reserve {args.reserve} for the run, {args.new_tokens} new tokens; `vs "
                     "accelerate`: decode tok/s over accelerate's at the same budget; `same tokens`: as the row's "
                     "full load (accelerate at llm-q4's budget runs the fp32 model: -)")
        lines += ["", *table]
        enc_common = {**common, "name": "minilm", "reserve": 0,
                      "sentences": [SENTENCES[i % len(SENTENCES)] + f" {i}" for i in range(args.sentences)]}
        full = worker(MODELPRESS_ENCODER, {**enc_common, "memory": None})
        streamed = worker(MODELPRESS_ENCODER, {**enc_common, "memory": args.encoder_memory})
        lines.append("")
        lines.append(f"MiniLM, {args.sentences} sentences")
        lines.append("")
        lines.append("| row | seconds | peak MB | identical embeddings |")
        lines.append("|---|---|---|---|")
        for name, r in (("full load", full), (f"streamed under {args.encoder_memory}", streamed)):
            if "error" in r:
                lines.append(f"| {name} | {r['error'][:120]} | | |")
                continue
            same = "yes" if r["emb"] == full.get("emb") else "NO"
            lines.append(f"| {name} | {r['s']:.2f} | {r['peak'] / 1e6:.1f} | {same} |")
        lines += ["", "Plans (`modelpress plan`, this machine's measured costs):", ""]
        for text in plans:
            lines += [text, ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(f"{time.strftime('%Y-%m-%d')} `{' '.join(sys.argv)}`\n\n{text}\n")


if __name__ == "__main__":
    main()
