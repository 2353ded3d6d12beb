"""`modelpress plan | generate | encode`: run a stored model under a memory budget (regions/)."""

from __future__ import annotations

import json
import time

from rich.table import Table

from modelpress.cli.console import console as _console
from modelpress.errors import StoreError
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.hf import SentenceEncoder
from modelpress.nn.generation import greedy_generate
from modelpress.regions import Region, open_streamed, plan_version
from modelpress.regions.costs import expected_pass, measure_costs
from modelpress.store import Store

__all__ = ["add_regions_commands"]

_SHOWN = 25


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def cmd_plan(args) -> int:
    with Store(args.store) as store:
        plan = plan_version(store, args.model, args.memory, args.ref, reserve=args.reserve)
        rows = store.catalog.chunks([c for t in store.version(args.model, args.ref).tensors for c in t.chunks])
        streamed = [row for unit in plan.units for row in unit.chunks] or list(rows.values())
        costs = measure_costs(store.reader, streamed)
        cost = expected_pass(plan, costs, rows)
    out = _console()
    out.print(f"{args.model}@{args.ref} under {_mb(plan.budget)}: weight memory {_mb(plan.weight_bytes())} "
              f"(resident {_mb(plan.resident())}, ring {_mb(plan.ring_bytes)}, gather buffers {_mb(plan.gather_bytes)})"
              + (f", {_mb(plan.reserve)} reserved for the run's working memory" if plan.reserve else ""))
    regions = Table("region", "tensors", "bytes")
    for region in Region:
        count = sum(p.region is region for p in plan.placements)
        regions.add_row(region.value, str(count), _mb(plan.region_bytes()[region.value]))
    out.print(regions)
    shown = sorted(plan.placements, key=lambda p: -p.nbytes)
    table = Table("tensor", "shape", "dtype", "uses", "region", "bytes", "stored", "units")
    for p in shown if args.all else shown[:_SHOWN]:
        table.add_row(p.tensor, "x".join(map(str, p.shape)), p.dtype, ",".join(p.uses) or "-", p.region.value,
                      _mb(p.nbytes), _mb(p.stored), str(len(p.units)) if p.units else "-")
    out.print(table)
    if not args.all and len(shown) > _SHOWN:
        out.print(f"... and {len(shown) - _SHOWN} smaller tensors (--all lists them)")
    speeds = ", ".join(f"{name} {mb:.0f} MB/s" for name, mb in costs.decode_mb_s.items())
    out.print(f"measured here: decode (read + decode + hash, 1 thread) {speeds}; batch-1 matmul "
              f"{costs.matmul_gflops:.1f} GFLOP/s")
    out.print(f"per pass (one token): streams {_mb(plan.streamed_per_pass())}; expected compute "
              f"{cost['compute_s'] * 1e3:.1f} ms, streaming {cost['stream_s'] * 1e3:.1f} ms, overlapped "
              f"{cost['pass_s'] * 1e3:.1f} ms (serial {cost['serial_s'] * 1e3:.1f} ms)")
    return 0


def _run_full_or_streamed(store: Store, args):
    if args.memory is None:
        return None
    return open_streamed(store, args.model, args.memory, args.ref, readers=args.readers, reserve=args.reserve)


def cmd_generate(args) -> int:
    with Store(args.store) as store:
        run = _run_full_or_streamed(store, args)
        model = run.model if run is not None else store.load(args.model, args.ref)
        if not isinstance(model, CausalLM):
            raise StoreError(f"{args.model} is not a causal LM: use `modelpress encode`")
        ids = model.tokenizer.encode(args.prompt)
        eos = model.tokenizer.eos_token_id
        try:
            result = greedy_generate(model.model, ids, args.max_new_tokens, stop=() if eos is None else (eos,))
        finally:
            if run is not None:
                run.close()
    out = _console()
    out.print(model.tokenizer.decode(list(result.tokens), skip_special_tokens=True), markup=False)
    rate = result.decode_tokens_per_s
    line = f"{len(result.tokens)} tokens; prefill {result.prefill_s:.2f} s, decode " + (
        f"{rate:.2f} tok/s" if rate is not None else "-")
    if run is not None:
        line += (f"; weight memory {_mb(run.weight_bytes())} of {_mb(run.plan.budget)}, read "
                 f"{_mb(run.bytes_read())} from the store")
    _console().print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"tokens": list(result.tokens), "decode_tok_s": rate, "prefill_s": result.prefill_s,
                       "weight_bytes": run.weight_bytes() if run else None,
                       "bytes_read": run.bytes_read() if run else None}, fh)
    return 0


def cmd_encode(args) -> int:
    start = time.perf_counter()
    with Store(args.store) as store:
        run = _run_full_or_streamed(store, args)
        model = run.model if run is not None else store.load(args.model, args.ref)
        if not isinstance(model, SentenceEncoder):
            raise StoreError(f"{args.model} is not a sentence encoder: use `modelpress generate`")
        try:
            embeddings = model.encode(args.sentences)
        finally:
            if run is not None:
                run.close()
    out = _console()
    for sentence, row in zip(args.sentences, embeddings):
        out.print(f"{sentence[:40]!r}: [{', '.join(f'{v:.4f}' for v in row[:4].tolist())}, ...]", markup=False)
    line = f"{len(args.sentences)} embeddings of {embeddings.shape[-1]} in {time.perf_counter() - start:.2f} s"
    if run is not None:
        line += f"; weight memory {_mb(run.weight_bytes())} of {_mb(run.plan.budget)}"
    out.print(line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(embeddings.tolist(), fh)
    return 0


def add_regions_commands(sub) -> None:
    def command(name, fn, help_text):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help="model name in the store")
        p.add_argument("--store", required=True, help="the store folder")
        p.add_argument("--ref", default="latest", help="version or tag (default latest)")
        p.add_argument("--reserve", default="0", help="part of --memory left to the run's working memory (KV cache, "
                                                      "activations, objects), not to weights, e.g. 6MB (default 0)")
        p.set_defaults(fn=fn)
        return p

    p = command("plan", cmd_plan, "show where each tensor of a stored model lives under a memory budget, and the cost")
    p.add_argument("--memory", required=True, help="weight memory budget, e.g. 64MB, 1.5GB, 512MiB")
    p.add_argument("--all", action="store_true", help="list every tensor, not only the 25 largest")
    p = command("generate", cmd_generate, "greedy text from a stored causal LM, optionally under a memory budget")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--memory", help="stream weights from the store within this budget (e.g. 135MB)")
    p.add_argument("--readers", type=int, default=1, help="threads reading streamed weights ahead (default 1)")
    p.add_argument("--json", help="also write tokens and figures as JSON to this file")
    p = command("encode", cmd_encode, "embed sentences with a stored sentence encoder, optionally under a budget")
    p.add_argument("sentences", nargs="+")
    p.add_argument("--memory", help="stream weights from the store within this budget (e.g. 16MB)")
    p.add_argument("--readers", type=int, default=1, help="threads reading streamed weights ahead (default 1)")
    p.add_argument("--json", help="also write the embeddings as JSON to this file")
