"""The `modelpress` command: a thin layer over the library (all logic lives there).

A user's mistake ends with one line on stderr naming the problem and the fix, and exit code 2;
no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from modelpress.errors import ModelpressError

__all__ = ["main"]

EXIT_USER_ERROR = 2


def _console():
    from rich.console import Console

    # Piped output (logs, CI) gets a wide fixed width so that tables are not cut to 80 columns.
    return Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 160)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, disable=not sys.stderr.isatty(), console=_stderr_console())


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _load_original(model: str):
    from modelpress.formats.hf import load_sentence_encoder

    return load_sentence_encoder(model)


def _eval_sentences(n: int):
    from modelpress.evaluate.corpus import corpus_splits

    return list(corpus_splits(n_eval=n, n_calib=1).evaluation)


def _evaluate(original, compressed, name: str, n_sentences: int, threads: int, latency: bool):
    from modelpress.evaluate.report import evaluate_encoder

    sentences = _eval_sentences(n_sentences)
    with _progress() as progress:
        task = progress.add_task("encoding evaluation sentences", total=2 * len(sentences))
        result = evaluate_encoder(
            original, compressed, sentences, name=name,
            latency_sentences=sentences[:512] if latency else None, threads=threads,
            advance=lambda k: progress.advance(task, k),
        )
    return result


def _render(evaluation, console, original_file_bytes: int | None, file_bytes: int | None) -> None:
    from rich.table import Table

    table = Table(title=f"modelpress report: {evaluation.name}", show_header=True)
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("compressed", justify="right")
    table.add_column("ratio", justify="right")
    if original_file_bytes and file_bytes:
        table.add_row("weights file", f"{original_file_bytes / 1e6:.1f} MB", f"{file_bytes / 1e6:.1f} MB",
                      f"{file_bytes / original_file_bytes:.1%}")
    table.add_row("tensor bytes", f"{evaluation.original_size.bytes / 1e6:.1f} MB",
                  f"{evaluation.size.bytes / 1e6:.1f} MB", f"{evaluation.size.bytes / evaluation.original_size.bytes:.1%}")
    table.add_row("bits per weight", f"{evaluation.original_size.bits_per_weight:.2f}",
                  f"{evaluation.size.bits_per_weight:.2f}", "")
    f = evaluation.fidelity
    table.add_row("mean cosine", "1", f"{f.mean_cosine:.4f}", "")
    table.add_row("1st-percentile cosine", "1", f"{f.p1_cosine:.4f}", "")
    table.add_row(f"overlap@10 ({f.n_queries} queries)", "1", f"{f.overlap_at_10:.3f}", "")
    if evaluation.latency is not None:
        table.add_row(f"latency, {evaluation.latency.n_sentences} sentences, {evaluation.latency.threads} threads",
                      f"{evaluation.original_latency.median_s:.2f} s", f"{evaluation.latency.median_s:.2f} s",
                      f"{evaluation.latency_ratio:.2f}x")
    console.print(table)


def _layers_table(model, console, limit: int | None = None) -> None:
    from rich.table import Table

    from modelpress.evaluate.size import size_report

    report = size_report(model)
    table = Table(title="layers", show_header=True)
    for col in ("tensor", "encoding", "shape", "params", "bytes", "bits/weight"):
        table.add_column(col, justify="right" if col in ("params", "bytes", "bits/weight") else "left")
    rows = sorted(report.layers, key=lambda r: -r.bytes)
    for row in rows[:limit] if limit else rows:
        table.add_row(row.name, row.encoding, "x".join(map(str, row.shape)), f"{row.params:,}", f"{row.bytes:,}",
                      f"{row.bits_per_weight:.2f}")
    if limit and len(rows) > limit:
        table.add_row(f"... {len(rows) - limit} smaller tensors", "", "", "", "", "")
    table.add_row("total", "", "", f"{report.params:,}", f"{report.bytes:,}", f"{report.bits_per_weight:.2f}")
    console.print(table)


def _calibration(n: int | None):
    """`--calibration N`: N corpus sentences (disjoint from the evaluation sentences), or none."""
    if n is None:
        return None
    from modelpress.calibration import calibration_sentences

    return calibration_sentences(n)


def cmd_compress(args) -> int:
    from modelpress.compress import compress, resolve_recipe
    from modelpress.errors import OutputExistsError
    from modelpress.evaluate.size import folder_bytes
    from modelpress.formats.checkpoint import WEIGHTS, save
    from modelpress.formats.hf import load_sentence_encoder

    console = _console()
    recipe = resolve_recipe(args.recipe)  # fail on a bad recipe before loading anything
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise OutputExistsError(f"output folder {str(out)!r} already exists: choose another --out or add --overwrite")
    with _stderr_console().status(f"loading {args.model}"):
        model = load_sentence_encoder(args.model)
    with _progress() as progress:
        task = progress.add_task(f"compressing with {recipe.name}", total=len(recipe.stages))
        compress(model, recipe, calibration=_calibration(args.calibration),
                 progress=lambda msg: progress.update(task, description=msg, advance=1))
    save(model, out, recipe, overwrite=args.overwrite)
    console.print(f"saved {recipe.name} model to {out}")
    if args.store:
        from modelpress.store import Store

        with Store.init(args.store) as store:
            name = args.name or f"{Path(str(args.model)).name}-{recipe.name}"
            vid = store.put(model, name, message=f"modelpress compress {args.model} --recipe {args.recipe}")
            console.print(f"stored as {name}@{vid[:12]} in {args.store} "
                          f"({store.stored_bytes(name, vid) / 1e6:.1f} MB in chunks)")
    original_bytes = folder_bytes(model.source)
    file_bytes = (out / WEIGHTS).stat().st_size
    if args.eval:
        original = _load_original(args.model)
        evaluation = _evaluate(original, model, recipe.name, args.sentences, args.threads, latency=True)
        _render(evaluation, console, original_bytes, file_bytes)
        if args.json:
            Path(args.json).write_text(json.dumps(evaluation.to_dict(), indent=1))
    else:
        console.print(f"weights: {original_bytes / 1e6:.1f} MB -> {file_bytes / 1e6:.1f} MB "
                      f"({file_bytes / original_bytes:.1%})")
    return 0


def cmd_eval(args) -> int:
    from modelpress.evaluate.size import folder_bytes
    from modelpress.formats.checkpoint import WEIGHTS, load

    console = _console()
    original = _load_original(args.original)
    with _stderr_console().status(f"loading {args.compressed}"):
        compressed = load(args.compressed)
    name = getattr(getattr(compressed, "modelpress_recipe", None), "name", Path(args.compressed).name)
    evaluation = _evaluate(original, compressed, name, args.sentences, args.threads, latency=not args.no_latency)
    _render(evaluation, console, folder_bytes(original.source), (Path(args.compressed) / WEIGHTS).stat().st_size)
    if args.json:
        Path(args.json).write_text(json.dumps(evaluation.to_dict(), indent=1))
    return 0


def cmd_inspect(args) -> int:
    from modelpress.formats.checkpoint import load, read_manifest

    console = _console()
    manifest = read_manifest(args.path)
    model = load(args.path)
    recipe = manifest.get("recipe") or {}
    console.print(f"[bold]{args.path}[/]: modelpress checkpoint v{manifest['format_version']}, "
                  f"recipe {recipe.get('name', '-')}, {len(manifest['modules'])} compressed modules")
    _layers_table(model, console, limit=None if args.all else 25)
    return 0


def cmd_presets(args) -> int:
    from modelpress.presets import PRESETS, preset

    console = _console()
    for name in PRESETS:
        console.print(f"[bold]{name}[/]")
        console.print(preset(name).to_yaml())
    return 0


def cmd_sensitivity(args) -> int:
    from modelpress.compress import resolve_recipe
    from modelpress.errors import ConfigError, OutputExistsError
    from modelpress.sensitivity import (MIN_SENTENCES, default_upgrades, layer_sensitivity, mixed_precision_recipe,
                                        plan_mixed_precision)

    console = _console()
    recipe = resolve_recipe(args.recipe)  # fail on bad arguments before loading anything
    if args.sentences < MIN_SENTENCES:
        raise ConfigError(f"--sentences {args.sentences} is too few: give at least {MIN_SENTENCES} "
                          "(overlap@10 needs 10 neighbours), e.g. 256")
    if args.budget is not None and not 0 < args.budget < 64:
        raise ConfigError(f"--budget {args.budget:g} is not valid: give bits per weight in (0, 64), e.g. 5")
    if args.write_recipe and args.budget is None:
        raise ConfigError("--write-recipe needs --budget BITS: the mixed-precision recipe is planned for a size budget")
    if args.write_recipe and Path(args.write_recipe).exists():
        raise OutputExistsError(f"{args.write_recipe!r} already exists: choose another --write-recipe path")
    with _stderr_console().status(f"loading {args.model}"):
        model = _load_original(args.model)
    sentences = _eval_sentences(args.sentences)
    with _progress() as progress:
        task = progress.add_task(f"measuring layers of {recipe.name}", total=None)
        rows = layer_sensitivity(model, recipe, sentences, calibration=_calibration(args.calibration),
                                 upgrades=default_upgrades if args.budget is not None else None,
                                 progress=lambda msg: progress.update(task, description=msg))
    _sensitivity_table(rows, console, recipe.name, len(sentences))
    if args.budget is not None:
        _print_plan(plan_mixed_precision(rows, budget_bits=args.budget), rows, args.budget, console)
    if args.write_recipe:
        Path(args.write_recipe).write_text(mixed_precision_recipe(rows, recipe, budget_bits=args.budget).to_yaml())
        console.print(f"wrote {args.write_recipe}")
    return 0


def _print_plan(plan, rows, budget: float, console) -> None:
    base_bits = 8.0 * sum(r.base.bytes for r in rows) / plan.params
    console.print(f"mixed precision within {budget:g} bits per weight: {len(plan.upgraded)} of {len(rows)} layers "
                  f"upgraded, {base_bits:.3f} -> {plan.bits_per_weight:.3f} bits per weight; summed single-layer "
                  f"damage {sum(r.damage for r in rows):.5f} -> {plan.damage:.5f}")
    for row, option in plan.choices:
        if option is not row.base:
            console.print(f"  {row.name}: {row.base.encoding} -> {option.encoding}")


def _sensitivity_table(rows, console, name: str, n_sentences: int) -> None:
    from rich.table import Table

    table = Table(title=f"each layer alone with {name}, most damaging first ({n_sentences} sentences)")
    for col in ("layer", "bits", "mean cos", "overlap@10", "bytes", "saved"):
        table.add_column(col, justify="left" if col in ("layer", "bits") else "right")
    for r in rows:
        table.add_row(r.name, r.base.encoding, f"{r.base.mean_cosine:.5f}", f"{r.base.overlap_at_10:.3f}",
                      f"{r.base.bytes:,}", f"{r.bytes_saved:,}")
    params = sum(r.params for r in rows)
    table.add_row("all layers", f"{8.0 * sum(r.base.bytes for r in rows) / params:.3f} bits/weight", "", "",
                  f"{sum(r.base.bytes for r in rows):,}", f"{sum(r.bytes_saved for r in rows):,}")
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress", description="Compress models for CPUs and edge devices.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model with a recipe or preset and save it")
    p.add_argument("model", help="a Hugging Face / sentence-transformers folder, or a bundled name (minilm)")
    p.add_argument("--recipe", default="int8", help="preset name (int8, w8a8, w8a8-smooth, int4, int3) or recipe YAML file")
    p.add_argument("--out", required=True, help="folder to write the compressed model to")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--eval", action="store_true", help="evaluate against the original and print the report")
    p.add_argument("--sentences", type=int, default=2000, help="evaluation sentences (default 2000)")
    p.add_argument("--threads", type=int, default=2, help="threads for latency measurement (default 2)")
    p.add_argument("--json", help="also write the evaluation as JSON to this file")
    p.add_argument("--calibration", type=int, metavar="N",
                   help="calibrate data-aware passes (gptq, awq, w8a8-smooth) on N corpus sentences, e.g. 128")
    p.add_argument("--store", help="also put the result into this store folder (created if missing)")
    p.add_argument("--name", help="model name in the store (default: <model>-<recipe>)")
    p.set_defaults(fn=cmd_compress)

    p = sub.add_parser("eval", help="compare a compressed model with its original")
    p.add_argument("original")
    p.add_argument("compressed")
    p.add_argument("--sentences", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--json")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("inspect", help="show what a compressed model holds, layer by layer")
    p.add_argument("path")
    p.add_argument("--all", action="store_true", help="list every tensor, not only the 25 largest")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("presets", help="print the built-in recipes as YAML")
    p.set_defaults(fn=cmd_presets)

    p = sub.add_parser("sensitivity", help="measure how much each layer alone loses under a recipe; plan mixed precision")
    p.add_argument("model", help="a Hugging Face / sentence-transformers folder, or a bundled name (minilm)")
    p.add_argument("--recipe", default="int4", help="preset name or recipe YAML file (default int4)")
    p.add_argument("--sentences", type=int, default=256, help="held-out evaluation sentences (default 256)")
    p.add_argument("--calibration", type=int, metavar="N", help="calibrate data-aware passes (gptq) on N sentences")
    p.add_argument("--budget", type=float, metavar="BITS",
                   help="plan mixed precision: bits per weight of the selected layers (above the recipe's own)")
    p.add_argument("--write-recipe", metavar="OUT.yaml", help="write the mixed-precision recipe (needs --budget)")
    p.set_defaults(fn=cmd_sensitivity)

    from modelpress.store_cli import add_store_commands

    add_store_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models come from folders
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ModelpressError as exc:
        print(f"modelpress: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("modelpress: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
