"""SmolLM2-135M-Instruct compressed by modelpress, exported to GGUF, run by llama.cpp: its perplexity next to
modelpress's own of the same model, on the same tokens, with llama.cpp's own quantiser's files beside.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_gguf.py [--windows 8] [--threads 2]
        [--presets llm-q4,llm-int8] [--mixed 'token_embd.weight=Q5_0' ...] [--f32-check] [--llama Q4_0,Q8_0]
        [--decode] [--out FILE.md]

Needs the `llm` extra and the `bench-llm` extra (llama-cpp-python). Token preparation is bench_llm.py's
(`prepare_base`: the `heldout` text tokenised once, `--windows` windows of 512 tokens, no BOS; the chat
prompt; 16 dev windows to calibrate GPTQ/AWQ), and so are llama.cpp's scoring and decoding
(`llama_perplexity`, `llama_decode`): the rows here and there are comparable.

Rows: modelpress fp32 (the base dequantised); llama.cpp's F32 of the base and its own quantisations of it
(`--llama`); then for each preset, modelpress's perplexity of the compressed model and llama.cpp's of its
GGUF export (the two must agree where the export is exact), the file size, how the tensors went in
(exact / requantised) and llama.cpp's greedy chat answer to "What is the capital of France?" through the
file's own chat template. `--mixed` adds a row per preset: the same model exported with the given
per-tensor types (llama.cpp names; e.g. the tied embedding/output table requantised to a smaller type).
`--f32-check` adds one with every weight decoded to F32: where llama.cpp's perplexity of the quantised
file differs from modelpress's, this row tells the file (it matches modelpress) from llama.cpp's
arithmetic (its quantised dot products round the activations to 8 bits per block of 32).
Each llama.cpp row names the block types its file holds; with `--decode`, llama.cpp's decode speed on each of
our files is printed next to its speed on its own file of the same types (e.g. llm-q4's export and llama.cpp's
Q4_0 are both Q4_0 blocks with a Q8_0 tied table; llm-int8's export and its Q8_0 are all Q8_0): they should match.
Decode speeds (`--decode`) are figures only on a quiet machine:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_gguf.py --threads 2 --decode \
        --mixed 'blk.*.ffn_down.weight=Q6_K' --mixed 'token_embd.weight=Q5_0' --out benchmarks/results_gguf.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llm import CHAT_PROMPT, _quantize, llama_decode, llama_perplexity, prepare_base  # noqa: E402

from modelpress import compress, export  # noqa: E402
from modelpress.evaluate.perplexity import score_language_model  # noqa: E402
from modelpress.formats.gguf import check_gguf  # noqa: E402
from modelpress.formats.models import load_model  # noqa: E402


def chat(path: Path, threads: int) -> str:
    """llama.cpp's greedy answer to the chat prompt, through the chat template the file carries."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, verbose=False)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": CHAT_PROMPT}], max_tokens=32,
                                     temperature=0.0)
    return out["choices"][0]["message"]["content"].strip()


def file_types(path: Path) -> str:
    """The block types of a file's matrices with their counts ("Q4_0 x 210, Q8_0 x 1"): files with the same are
    the same format for llama.cpp (the same dot-product kernels)."""
    from gguf import GGMLQuantizationType

    counts: dict[str, int] = {}
    for t in check_gguf(path).tensors:
        if len(t.shape) == 2:
            kind = GGMLQuantizationType(t.ggml_type).name
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{k} x {n}" for k, n in sorted(counts.items()))


def llama_row(name: str, path: Path, tokens: dict, args, extra: dict | None = None) -> dict:
    ppl, count = llama_perplexity(path, tokens["windows"], args.threads)
    row = {"row": name, "llama_ppl": ppl, "tokens": count, "file_bytes": path.stat().st_size,
           "types": file_types(path), "chat": chat(path, args.threads), **(extra or {})}
    if args.decode:
        row.update(llama_decode(path, tokens["prompt"], args.new_tokens, args.runs, args.threads))
    print(json.dumps(row), file=sys.stderr)
    return row


def how(result) -> str:
    counts: dict[str, int] = {}
    for t in result.tensors:
        key = f"{t.ggml_type} {t.how}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def run(folder: Path, args) -> list[dict]:
    tokens = prepare_base(folder, args.windows, 512)
    windows = torch.tensor(tokens["windows"])
    base = load_model("smollm2")
    rows = [{"row": "modelpress fp32", "ppl": score_language_model(base, windows).perplexity}]
    del base
    f32 = folder / "llama-F32.gguf"
    _quantize(tokens["gguf"], f32, "ALL_F32", allow_requantize=True)
    rows.append(llama_row("llama.cpp F32 (its own)", f32, tokens, args))
    for kind in [k for k in args.llama.split(",") if k]:
        path = folder / f"llama-{kind}.gguf"
        _quantize(str(f32), path, f"MOSTLY_{kind}")
        rows.append(llama_row(f"llama.cpp {kind} (its own)", path, tokens, args))
    calibration = [{"input_ids": torch.tensor([w])} for w in tokens["calibration"]]
    for preset in [p for p in args.presets.split(",") if p]:
        lm = load_model("smollm2")
        compress(lm, preset, calibration=calibration)
        ours = score_language_model(lm, windows).perplexity
        result = export(lm, "gguf", folder / f"mp-{preset}.gguf")
        print(result.summary(), file=sys.stderr)
        rows.append(llama_row(f"modelpress {preset} -> GGUF", result.path, tokens, args,
                              {"ppl": ours, "tensors": how(result)}))
        for i, spec in enumerate(args.mixed or ()):
            types = dict(item.split("=", 1) for item in spec.split(","))
            mixed = export(lm, "gguf", folder / f"mp-{preset}-{i}.gguf", types=types)
            print(mixed.summary(), file=sys.stderr)
            rows.append(llama_row(f"modelpress {preset} -> GGUF, {spec}", mixed.path, tokens, args,
                                  {"ppl": ours, "tensors": how(mixed)}))
        if args.f32_check:  # the model's own decoded weights, all F32: llama.cpp's float compute of the same model
            f32_file = export(lm, "gguf", folder / f"mp-{preset}-f32.gguf", types={"*": "F32"})
            rows.append(llama_row(f"modelpress {preset} -> GGUF, all weights decoded to F32", f32_file.path, tokens,
                                  args, {"ppl": ours, "tensors": how(f32_file)}))
            f32_file.path.unlink()
        del lm
    return rows


def table(rows: list[dict]) -> str:
    fp32 = rows[0]["ppl"]
    lines = ["| row | modelpress ppl | llama.cpp ppl | llama.cpp / modelpress | x fp32 (llama.cpp) | file MB | "
             "tensors | types in the file | chat answer | decode tok/s |", "|" + "---|" * 10]
    for r in rows:
        ours, theirs = r.get("ppl"), r.get("llama_ppl")
        lines.append(" | ".join([
            f"| {r['row']}", f"{ours:.3f}" if ours else "", f"{theirs:.3f}" if theirs else "",
            f"{theirs / ours:.4f}" if ours and theirs else "", f"{theirs / fp32:.3f}x" if theirs else "",
            f"{r['file_bytes'] / 1e6:.1f}" if "file_bytes" in r else "", r.get("tensors", ""), r.get("types", ""),
            repr(r["chat"])[:60] if "chat" in r else "",
            f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "to be measured", ]) + " |")
    return "\n".join(lines)


def decode_pairs(rows: list[dict]) -> list[str]:
    """llama.cpp's decode speed on each of our files next to its own file of the same types (they should match)."""
    own = {r["types"]: r for r in rows if "(its own)" in r["row"] and "decode_tok_s" in r}
    lines = []
    for r in rows:
        match = own.get(r.get("types")) if "(its own)" not in r["row"] and "decode_tok_s" in r else None
        if match:
            ratio = r["decode_tok_s"] / match["decode_tok_s"]
            lines.append(f"llama.cpp decode on {r['row']}: {r['decode_tok_s']:.1f} tok/s; on {match['row']} "
                         f"({r['types']}): {match['decode_tok_s']:.1f} tok/s; ratio {ratio:.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--presets", default="llm-q4,llm-int8")
    parser.add_argument("--mixed", action="append", help="per-tensor GGUF types for an extra export of each preset, "
                                                         "e.g. 'token_embd.weight=Q5_0' (repeatable)")
    parser.add_argument("--f32-check", action="store_true", help="also export each preset's decoded weights as F32: "
                                                                 "llama.cpp's float compute of the very same model")
    parser.add_argument("--llama", default="Q4_0,Q8_0", help="llama.cpp's own types of the base, beside ('' for none)")
    parser.add_argument("--decode", action="store_true", help="also measure llama.cpp decode speed (quiet machine)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        rows = run(Path(tmp), args)
    text = (f"Run {datetime.date.today()} on {platform.processor() or platform.machine()}, {args.threads} threads; "
            f"perplexity on {args.windows} x 512 heldout tokens (the same ids for both runtimes).\n\n" + table(rows))
    pairs = decode_pairs(rows)
    if pairs:
        text += "\n\n" + "\n".join(pairs)
    print(text)
    if args.out:
        args.out.write_text(text + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
