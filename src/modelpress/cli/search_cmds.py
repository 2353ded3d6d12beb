"""`modelpress search | report`: the joint search over per-layer options under a budget, and the HTML report
of a search run, a compressed model or a store."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from rich.table import Table

from modelpress import fileio
from modelpress.calibration import calibration_sentences
from modelpress.cli.console import console as _console
from modelpress.cli.console import progress as _progress
from modelpress.data.corpus import corpus_splits
from modelpress.data.text import reference_text
from modelpress.errors import ConfigError
from modelpress.evaluate.perplexity import token_windows
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.models import load_model, resolve_source
from modelpress.report import model_report_html, search_report_html, store_report_html
from modelpress.search.joint import Budget, joint_search
from modelpress.search.runfolder import RunFolder
from modelpress.search.space import SPACE_NAMES, default_space
from modelpress.search.validate import EXECUTORS, make_executor

__all__ = ["add_search_commands", "cmd_report", "cmd_search", "dev_windows"]

REPORTED_SENTENCES = 2000  # `compress --eval` scores the first 2000 corpus sentences: the search never sees them
WINDOW = 512


def add_search_commands(sub) -> None:
    p = sub.add_parser("search", help="search bits, sparsity and rank per layer under a budget; Pareto front and recipe")
    p.add_argument("model", help="a Hugging Face folder, a .gguf file, or a bundled name (minilm, smollm2)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-mb", type=float, help="the whole model's bytes as stored, in MB (1e6 bytes)")
    budget.add_argument("--bits-per-weight", type=float, help="bits per weight of the searched layers")
    p.add_argument("--metric", choices=("cos", "ppl"), default="cos",
                   help="cos: embedding cosine of a sentence encoder; ppl: next-token KL / perplexity of a causal LM")
    p.add_argument("--out", required=True, help="the run folder (an unfinished run there is resumed)")
    p.add_argument("--space", choices=SPACE_NAMES, default="joint", help="the per-layer options (default joint)")
    p.add_argument("--options", metavar="LABEL,...",
                   help="search only these options of the space, by label (e.g. 'int3 g64,int4 g64,int8 ch')")
    p.add_argument("--candidates", type=int, default=12, help="allocations validated end to end (default 12)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes validating candidates (default 2)")
    p.add_argument("--executor", choices=EXECUTORS, default="process", help="process (default), inline or ray")
    p.add_argument("--sentences", type=int, default=256, help="sentences candidates are validated on (default 256)")
    p.add_argument("--sensitivity-sentences", type=int, default=128,
                   help="sentences each layer's options are measured on (default 128)")
    p.add_argument("--windows", type=int, default=2,
                   help="dev-text windows of a causal LM: the first half measure layers, the rest validate (default 2)")
    p.add_argument("--window", type=int, default=WINDOW, help="tokens per window (default 512)")
    p.add_argument("--include", action="append", help="search only layers matching this pattern (repeatable)")
    p.add_argument("--ignore", action="append", help="leave layers matching this pattern as they are (repeatable)")
    p.add_argument("--group", action="append", metavar="PATTERN",
                   help="search the layers matching this pattern as one row (repeatable), e.g. "
                        "'*.layers.1[0-9].mlp.up_proj'")
    p.add_argument("--calibration", type=int, metavar="N",
                   help="calibrate data-aware options (the gptq space) on N corpus sentences, e.g. 128")
    p.add_argument("--sensitivity-calibration", type=int, metavar="N",
                   help="calibrate the per-layer table's data-aware options on N corpus sentences instead (fewer: "
                        "a cheaper table; candidates still use --calibration)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", metavar="OUT.html", help="also write the HTML report of the run")
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("report", help="an HTML report (plots and the JSON behind them) of a search run or a checkpoint")
    p.add_argument("source", help="a search run folder (modelpress search --out) or a compressed checkpoint folder")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.set_defaults(fn=cmd_report)


def _load_original(model: str):
    return load_model(resolve_source(model))


def _factory(model: str):
    """A picklable builder of the float model for worker processes."""
    return functools.partial(load_model, resolve_source(model))


def _sentences(validate: int, sensitivity: int) -> tuple[list[str], list[str]]:
    """Corpus sentences after the REPORTED_SENTENCES that `compress --eval` reports on: (validation, sensitivity)."""
    splits = corpus_splits(n_eval=REPORTED_SENTENCES + validate, n_calib=sensitivity)
    return list(splits.evaluation[REPORTED_SENTENCES:]), list(splits.calibration)


def dev_windows(model: CausalLM, n: int, window: int = WINDOW) -> torch.Tensor:
    """`n` windows of `window` tokens of the dev text (never the heldout text `compress --eval` reports on)."""
    ids = torch.tensor(model.tokenizer.encode(reference_text("dev"), add_special_tokens=False), dtype=torch.long)
    return token_windows(ids, window=window, max_tokens=n * window)


def cmd_search(args) -> int:
    console = _console()
    options = default_space(args.space)
    if args.options:
        wanted = [w.strip() for w in args.options.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {o.label for o in options}]
        if unknown:
            raise ConfigError(f"--options {unknown[0]!r} is not in the {args.space} space: use labels of "
                              f"{[o.label for o in options]}")
        options = [o for o in options if o.label in wanted]
    budget = Budget(total_bytes=None if args.budget_mb is None else int(args.budget_mb * 1e6),
                    bits_per_weight=args.bits_per_weight)
    if args.budget_mb is not None and args.budget_mb <= 0:
        raise ConfigError(f"--budget-mb {args.budget_mb} is not a budget: give a positive size, e.g. 11.3")
    model = _load_original(args.model)
    causal = isinstance(model, CausalLM)
    if causal != (args.metric == "ppl"):
        raise ConfigError(f"--metric {args.metric} does not fit {args.model!r}: use --metric "
                          f"{'ppl' if causal else 'cos'} for a {'causal LM' if causal else 'sentence encoder'}")
    if causal:
        if args.windows < 2:
            raise ConfigError("--windows must be 2 or more: one to measure layers on, one to validate on")
        windows = dev_windows(model, args.windows, args.window)
        half = max(1, len(windows) // 2)
        inputs, sensitivity = windows[half:], windows[:half]
    else:
        inputs, sensitivity = _sentences(args.sentences, args.sensitivity_sentences)
    factory = _factory(args.model)
    calibration = calibration_sentences(args.calibration) if args.calibration else None
    table_calibration = calibration_sentences(args.sensitivity_calibration) if args.sensitivity_calibration else None
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def show(step: str, done: int, total: int) -> None:
            key = "validating" if step.startswith("validating") else "measuring"
            if key not in tasks:
                tasks[key] = progress.add_task(step, total=total)
            progress.update(tasks[key], description=step, completed=done, total=total)

        result = joint_search(
            model, args.model, inputs, options, budget, args.out,
            lambda: make_executor(args.executor, factory, inputs, causal, calibration, jobs=args.jobs,
                                  model=model),
            causal=causal, calibration=calibration, candidates=args.candidates, seed=args.seed,
            include=args.include or ["*"],
            ignore=args.ignore or [], progress=show, sensitivity_inputs=sensitivity,
            sensitivity_calibration=table_calibration, groups=args.group or [])
    _print_front(console, result.data)
    if result.chosen is None:
        console.print("no validated candidate fits the budget as stored: raise it or add candidates")
    else:
        console.print(f"chosen recipe: {Path(args.out) / 'chosen.yaml'} "
                      f"(modelpress compress {args.model} --recipe {Path(args.out) / 'chosen.yaml'} --out DIR)")
    if args.report:
        _write_html(args.report, search_report_html(result.data))
        console.print(f"report: {args.report}")
    return 0


def _print_front(console, data) -> None:
    quality = "KL (nats)" if data["metric"] == "ppl" else "mean cosine"
    table = Table(title=f"validated candidates (budget {data['budget_bytes']:,} bytes); * = Pareto front")
    for col in ("id", "bytes", quality, "latency (cost model)", "front", "chosen"):
        table.add_column(col)
    for p in data["candidates"]:
        q = p["kl"] if data["metric"] == "ppl" else p["mean_cosine"]
        table.add_row(p["id"], f"{p['bytes']:,}", f"{q:.5f}", f"{p['latency_s'] * 1e3:.2f} ms",
                      "*" if p.get("front") else "", "<-" if p["id"] == data["chosen"] else "")
    console.print(table)


def _write_html(path: str, html: str) -> None:
    fileio.write_file(Path(path), html.encode())


def cmd_report(args) -> int:
    source = Path(args.source)
    if (source / "search.json").is_file():
        html = search_report_html(RunFolder(source).result())
    elif source.is_dir():
        html = model_report_html(source)
    else:
        raise ConfigError(f"{args.source!r} is neither a search run folder nor a checkpoint folder: give one")
    _write_html(args.out, html)
    _console().print(f"report: {args.out} ({len(html.encode()) / 1e3:.0f} kB)")
    return 0


def cmd_store_report(args) -> int:
    html = store_report_html(args.store)
    _write_html(args.out, html)
    _console().print(f"report: {args.out} ({len(html.encode()) / 1e3:.0f} kB)")
    return 0
