"""Running models under a memory budget: modelpress streaming from its store vs accelerate's disk offload at
the same budget, and a plain full load, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_regions.py [--threads 2] [--new-tokens 32] [--readers 1,2]
        [--fraction 0.25] [--sentences 64] [--skip-q4] [--out FILE.md]

Rows (each in its own subprocess, so its memory is its own; `peak MB` is the growth of the process's peak
resident set (VmHWM) over the process with torch and transformers imported and the tokenizer library
warmed, i.e. what loading and running the model adds):

- SmolLM2 fp32, full load from the store (`Store.load`), decoded by modelpress.nn.generation;
- SmolLM2 fp32 streamed from the store under `--fraction` of its in-memory weights (`open_streamed`, chunks
  stored `aligned`, the tied table in 1 MiB row blocks), once per `--readers` count;
- SmolLM2 fp32 through accelerate's disk offload at the same budget (`device_map="auto"`,
  `max_memory={"cpu": budget}`, an offload folder), decoded by transformers' `generate`;
- SmolLM2 llm-q4 (4-bit g32, lm_head 8-bit) full load, and streamed under `--fraction` of its in-memory
  weights (compressed modules are resident in their packed form, so a budget under them is refused and
  the row says so);
- MiniLM full load and streamed under 16 MB (`--encoder-memory`): encoding time of `--sentences`
  sentences and whether the embeddings are identical.

Decode tok/s: `--new-tokens` greedy tokens after a fixed prompt, the fastest of `--runs` runs after a
warm-up; every row's tokens are compared with the full fp32 load's (`same tokens`). `read MB` is what
streaming read from the store over all runs (warm-up included). Run it on a quiet machine: decode speeds on a shared one measure
the neighbours.
"""

from __future__ import annotations

import argparse
import json
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
torch.set_num_threads(ARGS["threads"])
F.linear(torch.randn(4, 576), torch.randn(1536, 576))

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
        rate = (ARGS["new_tokens"] - 1) / max(tn - t1, 1e-9)
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
        run = open_streamed(store, ARGS["name"], ARGS["memory"], readers=ARGS["readers"])
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
        run = open_streamed(store, ARGS["name"], ARGS["memory"], readers=ARGS["readers"])
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


def prepare(folder: Path, skip_q4: bool) -> dict:
    """The stores (fp32 aligned, llm-q4) and a Hugging Face folder of the fp32 model for accelerate."""
    from modelpress.compress import compress
    from modelpress.formats.hf import load_sentence_encoder
    from modelpress.formats.models import load_model
    from modelpress.presets import preset
    from modelpress.store import Store

    lm = load_model("smollm2")
    lm.model.save_pretrained(folder / "hf", safe_serialization=True)
    lm.tokenizer.save_pretrained(folder / "hf")
    store = Store.init(folder / "store")
    blocks = {"*embed_tokens.weight": 1 << 20, "*word_embeddings.weight": 1 << 20}
    store.put(lm, "smol-fp32", codecs={"*": "aligned"}, chunk_bytes=blocks)
    sizes = {"smol-fp32": sum(t.numel() * t.element_size() for t in store.get("smol-fp32").values())}
    if not skip_q4:
        q4 = compress(lm, preset("llm-q4"))
        store.put(q4, "smol-q4", chunk_bytes=blocks)
        sizes["smol-q4"] = sum(t.numel() * t.element_size() for t in store.get("smol-q4").values())
    encoder = load_sentence_encoder("minilm")
    store.put(encoder, "minilm", codecs={"*": "aligned"}, chunk_bytes=blocks)
    store.close()
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--readers", default="1,2")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--encoder-memory", default="16MB")
    parser.add_argument("--skip-q4", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sizes = prepare(folder, args.skip_q4)
        common = {"threads": args.threads, "new_tokens": args.new_tokens, "runs": args.runs, "prompt": PROMPT,
                  "store": str(folder / "store"), "readers": 1}
        budget = int(sizes["smol-fp32"] * args.fraction)
        rows = [("modelpress full load, fp32", worker(MODELPRESS_LM, {**common, "name": "smol-fp32", "memory": None}))]
        for readers in [int(r) for r in args.readers.split(",")]:
            rows.append((f"modelpress streamed, fp32, {readers} reader(s)", worker(
                MODELPRESS_LM, {**common, "name": "smol-fp32", "memory": budget, "readers": readers})))
        rows.append(("accelerate disk offload, fp32", worker(ACCELERATE_LM, {
            **common, "folder": str(folder / "hf"), "offload": str(folder / "offload"), "memory": budget})))
        if not args.skip_q4:
            q4_budget = int(sizes["smol-q4"] * args.fraction)
            rows.append(("modelpress full load, llm-q4", worker(MODELPRESS_LM, {**common, "name": "smol-q4",
                                                                                "memory": None})))
            rows.append((f"modelpress streamed, llm-q4 ({q4_budget / 1e6:.1f} MB)", worker(
                MODELPRESS_LM, {**common, "name": "smol-q4", "memory": q4_budget})))
        reference = rows[0][1].get("tokens")
        lines.append(f"SmolLM2-135M, {args.threads} threads, budget {budget / 1e6:.1f} MB "
                     f"({args.fraction:g} of {sizes['smol-fp32'] / 1e6:.1f} MB fp32), {args.new_tokens} new tokens")
        lines.append("")
        lines.append("| row | decode tok/s | peak MB | read MB (all runs) | same tokens |")
        lines.append("|---|---|---|---|---|")
        for name, r in rows:
            if "error" in r:
                lines.append(f"| {name} | {r['error'][:120]} | | | |")
                continue
            same = "-" if "q4" in name else ("yes" if r["tokens"] == reference else "NO")
            lines.append(f"| {name} | {r['tok_s']:.2f} | {r['peak'] / 1e6:.1f} | {r.get('read', 0) / 1e6:.0f} | {same} |")
        enc_common = {**common, "name": "minilm", "sentences": [SENTENCES[i % len(SENTENCES)] + f" {i}"
                                                                  for i in range(args.sentences)]}
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
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(f"{time.strftime('%Y-%m-%d')} `{' '.join(sys.argv)}`\n\n{text}\n")


if __name__ == "__main__":
    main()
