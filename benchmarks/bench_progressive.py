"""Progressive precision: a float32 version stored by planes, loaded at bfloat16, then refined to exact.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_progressive.py [--models minilm,smollm2]
        [--out benchmarks/results_progressive.md]

Per model: `Store.put(model, planes=["*"])`; the stored bytes of the version and of its high (`@bf16`) planes;
`Store.load(precision="bf16")` with the stored bytes it reads counted at the chunk reader; its fidelity on
held-out text (MiniLM: mean cosine of 1,000 held-out stdlib sentences' embeddings to fp32's; SmolLM2:
perplexity of 8 x 512 tokens of the `heldout` reference text, against fp32's); `Store.refine`, the bytes it
reads, and the refined weights compared bit for bit with a full load; the same weights stored whole (the
normal layout) and loaded, for what the planes cost. Times are wall seconds on this
machine (2 threads); the bytes and fidelities are exact anywhere.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from modelpress.data.corpus import corpus_splits
from modelpress.data.text import reference_text
from modelpress.evaluate.fidelity import fidelity
from modelpress.evaluate.perplexity import score_language_model, token_windows
from modelpress.formats.hf import load_sentence_encoder
from modelpress.formats.models import load_model, resolve_source
from modelpress.store import Store, planes


class Counting:
    """Stored bytes the store's chunk reader lands, by reading step."""

    def __init__(self, store: Store):
        self.stored = 0
        land = store.reader.land

        def counted(row, out, scratch, check=True):
            self.stored += row.stored_size
            return land(row, out, scratch, check)

        store.reader.land = counted


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _scorer(name: str, model):
    """(fidelity function of a loaded model, its label, the fp32 model's figure)."""
    if name == "minilm":
        sentences = list(corpus_splits(1000, 128).evaluation)
        reference = model.encode(sentences)
        return (lambda m: fidelity(reference, m.encode(sentences)).mean_cosine), "mean cosine to fp32", 1.0
    ids = torch.tensor(model.tokenizer.encode(reference_text("heldout"), add_special_tokens=False))
    windows = token_windows(ids, 512, 8 * 512)

    def perplexity(m) -> float:
        with torch.inference_mode():
            return score_language_model(m, windows).perplexity

    return perplexity, "held-out perplexity (8 x 512)", perplexity(model)


def measure(name: str) -> dict:
    model = load_sentence_encoder("minilm") if name == "minilm" else load_model(resolve_source(name))
    score, label, fp32 = _scorer(name, model)
    with tempfile.TemporaryDirectory() as tmp, Store.init(Path(tmp) / "store") as store:
        start = time.perf_counter()
        store.put(model, name, planes=["*"])
        put_s = time.perf_counter() - start
        version = store.version(name)
        rows = store.catalog.chunks([c for t in version.tensors for c in t.chunks])
        sizes = {t.name: sum(rows[c].stored_size for c in t.chunks) for t in version.tensors}
        total = sum(sizes.values())
        high = sum(size for tensor, size in sizes.items() if not tensor.endswith(planes.LO))
        codecs: dict[str, int] = {}
        for t in version.tensors:
            if t.name.endswith(planes.HI):
                for c in t.chunks:
                    codecs[rows[c].codec.name] = codecs.get(rows[c].codec.name, 0) + rows[c].stored_size
        counter = Counting(store)
        start = time.perf_counter()
        coarse = store.load(name, precision="bf16")
        bf16_s, bf16_read = time.perf_counter() - start, counter.stored
        coarse_figure = score(coarse)
        start = time.perf_counter()
        store.refine(coarse, name)
        refine_s, refine_read = time.perf_counter() - start, counter.stored - bf16_read
        start = time.perf_counter()
        full = store.load(name)
        full_s = time.perf_counter() - start
        exact = _states_equal(coarse, full)
        store.put(model, "whole")  # the same weights stored whole: what the planar layout costs over it
        whole = store.stored_bytes("whole")
        start = time.perf_counter()
        store.load("whole")
        whole_s = time.perf_counter() - start
    return {"model": name, "stored": total, "whole": whole, "whole_s": whole_s, "high": high, "high_codecs": codecs, "put_s": put_s,
            "bf16_read": bf16_read, "bf16_s": bf16_s, "label": label, "fp32": fp32, "bf16": coarse_figure,
            "refine_read": refine_read, "refine_s": refine_s, "full_s": full_s, "exact": exact}


def table(rows: list[dict]) -> str:
    lines = ["| model | stored MB (planar) | bf16 load reads | its codecs (high planes, MB) | fidelity at bf16 | "
             "refine reads | bf16 + refine vs stored | refined == full load | put / bf16 / refine / full load s | "
             "stored whole: MB, load s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        figure = (f"{r['bf16']:.6f} ({r['label']})" if r["model"] == "minilm" else
                  f"{r['bf16']:.4f} vs fp32 {r['fp32']:.4f} = {r['bf16'] / r['fp32']:.5f}x ({r['label']})")
        codecs = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sorted(r["high_codecs"].items()))
        lines.append(f"| {r['model']} | {r['stored'] / 1e6:.1f} | {r['bf16_read'] / 1e6:.1f} MB = "
                     f"{100 * r['bf16_read'] / r['stored']:.1f}% | {codecs} | {figure} | "
                     f"{r['refine_read'] / 1e6:.1f} MB | {(r['bf16_read'] + r['refine_read']) / r['stored']:.4f}x | "
                     f"{r['exact']} | {r['put_s']:.1f} / {r['bf16_s']:.2f} / {r['refine_s']:.2f} / {r['full_s']:.2f} | "
                     f"{r['whole'] / 1e6:.1f}, {r['whole_s']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name))
        print(rows[-1], flush=True)
    text = table(rows)
    print(text)
    if args.out:
        command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_progressive.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"# Progressive precision: bf16 loads of planar fp32 versions, then refinement\n\n"
                            f"`{command}`, {time.strftime('%Y-%m-%d')}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
