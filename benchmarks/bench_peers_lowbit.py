"""Low-bit weight quantisation peers on the bundled all-MiniLM-L6-v2: modelpress MSE-RTN and GPTQ
against HQQ, torchao and optimum-quanto, at 4 and 3 bits with groups of 64, in one run.

    HF_HUB_OFFLINE=1 PYTHON benchmarks/bench_peers_lowbit.py [--sentences 1000] [--calibration 128] [--rounds 2]

PYTHON must see modelpress and the peers: `pip install -c constraints.txt '.[bench-lowbit]'` into
an environment of its own. Not the test environment: with hqq importable, transformers imports it
while loading any model, hqq's import raises a DeprecationWarning, and the test suite (warnings are
errors) fails on every MiniLM test. A peer that is not installed, or fails, gets a row that says why.

What is compared: every method quantises the 37 Linear layers of MiniLM (weights only, asymmetric,
groups of 64 input columns) and nothing else; the embedding tables stay float32 in every row, so
fidelity differences are the Linear quantisers' alone. Each peer's own dequantised weight
(`dequantize()`) replaces the float weight and the model runs in float32, as modelpress's decode-
once kernel does; so rows differ only in the weights each tool produced. Bits per weight are the
bytes each tool keeps for those weights (codes as it packs them, scales, zeros), over the Linear
weights' element count. Fidelity is against fp32 on `corpus_splits(N, 128).evaluation` held-out
sentences (the same split as bench_gptq.py); GPTQ calibrates on `calibration_sentences(128)`,
which the script checks are disjoint from them. Quantisation time is the wall time to quantise
all 37 layers (GPTQ: calibration capture included), median of `--rounds` interleaved rounds.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results_peers_lowbit.md"
BEGIN, END = "<!-- bench_peers_lowbit:begin -->", "<!-- bench_peers_lowbit:end -->"
GROUP_SIZE = 64

sys.path.insert(0, str(ROOT))
from machine import cpu_name  # noqa: E402


def linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------ methods
# Each takes (model, bits, calibration) and rewrites the model's Linear weights in place; it
# returns the bytes the tool stores for them. A method raises NotSupported for a bit width it lacks.


class NotSupported(Exception):
    pass


def modelpress_method(pass_name: str):
    def run(model, bits, calibration):
        import modelpress

        config = {"bits": bits, "symmetric": False, "group_size": GROUP_SIZE, "search": "mse"}
        recipe = {"name": pass_name, "stages": [{"pass": pass_name, "targets": {"types": ["Linear"]}, "config": config}]}
        modelpress.compress(model, recipe, calibration=calibration if pass_name == "gptq" else None)
        return sum(m.encoding.nbytes for _, m in model.named_modules() if hasattr(m, "encoding"))

    return run


def hqq_method(model, bits, calibration):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=GROUP_SIZE)  # axis=1: groups along input columns
    stored = 0
    for _, lin in linears(model):
        # float16 scales and zeros, as HQQ keeps them by default (and as modelpress does)
        q = HQQLinear.from_weights(lin.weight.data.clone(), None, config, compute_dtype=torch.float16, device="cpu")
        stored += tensor_bytes(q.W_q, q.meta["scale"], q.meta["zero"])
        lin.weight.data = q.dequantize().float().reshape(lin.weight.shape)
    return stored


def torchao_intx_method(model, bits, calibration):
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup, quantize_

    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(GROUP_SIZE),
                                  mapping_type=MappingType.ASYMMETRIC)
    stored = 0
    for _, lin in linears(model):
        holder = nn.Sequential(nn.Linear(lin.in_features, lin.out_features, bias=False))
        holder[0].weight.data = lin.weight.data.clone()
        quantize_(holder, config)
        w = holder[0].weight
        stored += tensor_bytes(w.qdata, w.scale, w.zero_point)  # codes kept one per int8 (unpacked)
        lin.weight.data = w.dequantize().float()
    return stored


def torchao_int4_method(model, bits, calibration):
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    if bits != 4:
        raise NotSupported("Int4WeightOnlyConfig is 4-bit only")
    holder = nn.Sequential(nn.Linear(384, 384, bias=False))
    quantize_(holder, Int4WeightOnlyConfig(group_size=GROUP_SIZE))  # raises on this CPU build (see results)
    raise NotSupported("quantize_ returned, but this benchmark has no path for its int4 tensor on CPU")


def quanto_method(group_size: int | None):
    def run(model, bits, calibration):
        from optimum.quanto import freeze, qint4, quantize

        if bits != 4:
            raise NotSupported("optimum-quanto has qint2 and qint4 weights, no 3-bit type")
        stored = 0
        for _, lin in linears(model):
            holder = nn.Sequential(nn.Linear(lin.in_features, lin.out_features, bias=False))
            holder[0].weight.data = lin.weight.data.clone()
            quantize(holder, weights=qint4)
            if group_size is not None:  # its API fixes 128 for these widths; the attribute is what it reads
                holder[0].weight_group_size = group_size
            freeze(holder)
            w = holder[0].weight
            stored += tensor_bytes(w._data._data, w._scale, w._shift)
            lin.weight.data = w.dequantize().float()
        return stored

    return run


METHODS = [
    ("modelpress MSE-RTN", modelpress_method("rtn")),
    ("modelpress GPTQ", modelpress_method("gptq")),
    ("HQQ", hqq_method),
    ("torchao IntxWeightOnly", torchao_intx_method),
    ("torchao Int4WeightOnly", torchao_int4_method),
    ("optimum-quanto qint4 g64 (group set by hand)", quanto_method(64)),
    ("optimum-quanto qint4 (its default group 128)", quanto_method(None)),
]
PEER_PACKAGES = {"HQQ": "hqq", "torchao": "torchao", "optimum-quanto": "optimum-quanto"}


def package_version(method: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for prefix, package in PEER_PACKAGES.items():
        if method.startswith(prefix):
            try:
                return f"{package} {version(package)}"
            except PackageNotFoundError:
                return f"{package} not installed"
    import modelpress

    return f"modelpress {modelpress.__version__}"


def per_query_overlap(reference: torch.Tensor, candidate: torch.Tensor, k: int = 10) -> torch.Tensor:
    """(N,) fraction of each sentence's k nearest neighbours (cosine, itself excluded) that both agree on:
    overlap@10 with every sentence as a query, kept per query for paired comparisons."""
    def neighbours(x):
        u = torch.nn.functional.normalize(x.double(), dim=1)
        scores = u @ u.T  # (N, N)
        scores.fill_diagonal_(float("-inf"))
        return scores.topk(k, dim=1).indices  # (N, k)

    a, b = neighbours(reference), neighbours(candidate)
    return (a[:, :, None] == b[:, None, :]).any(dim=2).double().mean(dim=1)


def paired(a: torch.Tensor, b: torch.Tensor) -> str:
    """Mean of a - b over sentences, with its standard error."""
    d = (a - b).double()
    return f"{d.mean().item():+.4f} +- {d.std().item() / len(d) ** 0.5:.4f}"


def one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------ run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved quantisation-timing rounds")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the results file alone")
    args = parser.parse_args()

    import modelpress
    from modelpress.calibration import calibration_sentences
    from modelpress.data.corpus import corpus_splits
    from modelpress.evaluate.fidelity import cosine_similarities, fidelity

    torch.set_num_threads(args.threads)
    evaluation = list(corpus_splits(args.sentences, args.calibration).evaluation)
    calibration = calibration_sentences(args.calibration)
    assert not set(evaluation) & set(calibration), "calibration sentences overlap the evaluation sentences"
    base = modelpress.load_sentence_encoder("minilm")
    reference = base.encode(evaluation)
    params = sum(m.weight.numel() for _, m in linears(base))
    load_start = os.getloadavg()[0]

    rows: dict[tuple[int, str], dict] = {}
    for round_ in range(args.rounds):
        for bits in [int(b) for b in args.bits.split(",")]:
            for name, method in METHODS:
                row = rows.setdefault((bits, name), {"bits": bits, "name": name, "version": package_version(name),
                                                      "times": []})
                if "error" in row:
                    continue
                model = copy.deepcopy(base)
                start = time.perf_counter()
                try:
                    stored = method(model, bits, calibration)
                except NotSupported as exc:
                    row["error"] = f"not supported: {exc}"
                    continue
                except Exception as exc:  # a peer that fails here gets a row with its error, not a crash
                    row["error"] = one_line(exc)
                    continue
                row["times"].append(time.perf_counter() - start)
                if round_ == 0:
                    got = model.encode(evaluation)
                    f = fidelity(reference, got, n_queries=min(200, len(evaluation)))
                    row.update(bits_per_weight=8.0 * stored / params, fidelity=f.to_dict(),
                               cosines=cosine_similarities(reference, got), overlaps=per_query_overlap(reference, got))
                    print(f"{bits}-bit {name:46s} {8.0 * stored / params:5.2f} b/w  cos {f.mean_cosine:.4f}  "
                          f"ov@10 {f.overlap_at_10:.3f}  {row['times'][-1]:6.1f} s", flush=True)
                del model
    text = render(list(rows.values()), args, params, load_start, os.getloadavg()[0])
    print(text)
    if not args.no_write:
        write(text)


def render(rows: list[dict], args, params: int, load_start: float, load_end: float) -> str:
    versions = sorted({r["version"] for r in rows if "not installed" not in r["version"]})
    lines = [
        f"Run {datetime.date.today()} on {cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
        f"{', '.join(versions)}; load average {load_start:.1f} at start, {load_end:.1f} at end (the machine is shared).",
        "",
        f"Command: `HF_HUB_OFFLINE=1 PYTHON benchmarks/bench_peers_lowbit.py --sentences {args.sentences} "
        f"--calibration {args.calibration} --threads {args.threads} --bits {args.bits} --rounds {args.rounds}` "
        "(PYTHON: an environment with modelpress and the `bench-lowbit` extra, see the script's docstring)",
        "",
        f"all-MiniLM-L6-v2, the 37 Linear layers ({params:,} weights) quantised by each tool, asymmetric, groups of "
        f"{GROUP_SIZE} unless the row says otherwise; embeddings stay float32 in every row. Fidelity against fp32 on "
        f"{args.sentences} held-out sentences (overlap@10 over the first {min(200, args.sentences)} as queries, as in "
        f"every modelpress benchmark, and over all of them); GPTQ calibrates on {args.calibration} other sentences. "
        "Bits per weight = the bytes each tool stores for the Linear weights (codes as it packs them, scales, "
        "zeros) x 8 / weights. Time = wall seconds to quantise the 37 layers, median of "
        f"{args.rounds} interleaved rounds [each round].",
        "",
        f"| bits | method | version | bits/weight stored | mean cos | p1 cos | overlap@10 | overlap@10, all "
        f"{args.sentences} queries | quantise s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['bits']} | {r['name']} | {r['version']} | - | - | - | - | - | {r['error']} |")
            continue
        f, times = r["fidelity"], r["times"]
        lines.append(
            f"| {r['bits']} | {r['name']} | {r['version']} | {r['bits_per_weight']:.2f} | {f['mean_cosine']:.4f} | "
            f"{f['p1_cosine']:.4f} | {f['overlap_at_10']:.3f} | {r['overlaps'].mean().item():.3f} | "
            f"{statistics.median(times):.1f} "
            f"[{', '.join(f'{t:.1f}' for t in times)}] |"
        )
    return "\n".join(lines + ["", *checks(rows)])


def checks(rows: list[dict]) -> list[str]:
    """The acceptance question: does modelpress 4-bit beat HQQ 4-bit at the same group size?"""
    by = {(r["bits"], r["name"]): r for r in rows if "error" not in r}
    out = []
    for bits in sorted({r["bits"] for r in rows}, reverse=True):
        hqq = by.get((bits, "HQQ"))
        for ours in ("modelpress MSE-RTN", "modelpress GPTQ"):
            mine = by.get((bits, ours))
            if hqq is None or mine is None:
                continue
            a, b = mine["fidelity"], hqq["fidelity"]
            cos, ov = a["mean_cosine"] > b["mean_cosine"], a["overlap_at_10"] > b["overlap_at_10"]
            verdict = "yes" if cos and ov else ("on mean cosine only" if cos else ("on overlap@10 only" if ov else "NO"))
            out.append(f"- {bits}-bit g{GROUP_SIZE}: {ours} beats HQQ on mean cosine ({a['mean_cosine']:.4f} vs "
                       f"{b['mean_cosine']:.4f}) and overlap@10 ({a['overlap_at_10']:.3f} vs {b['overlap_at_10']:.3f}): "
                       f"{verdict}. Paired differences over sentences (mean +- standard error): cosine "
                       f"{paired(mine['cosines'], hqq['cosines'])}, overlap@10 with every sentence as a query "
                       f"{paired(mine['overlaps'], hqq['overlaps'])}")
    return out


def write(text: str) -> None:
    """Replace the generated block of the results file, keeping the hand-written analysis around it."""
    old = RESULTS.read_text() if RESULTS.exists() else f"# Low-bit quantisation peers (MiniLM)\n\n{BEGIN}\n{END}\n"
    if BEGIN not in old or END not in old:
        old = f"{old.rstrip()}\n\n{BEGIN}\n{END}\n"
    head, rest = old.split(BEGIN, 1)
    RESULTS.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    main()
