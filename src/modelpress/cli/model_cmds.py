"""`modelpress compress | eval | inspect | presets | sensitivity`: thin commands over the library."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from rich.table import Table

from modelpress import fileio
from modelpress.calibration import calibration_sentences
from modelpress.cli.console import console as _console
from modelpress.cli.console import progress as _progress
from modelpress.cli.console import stderr_console as _stderr_console
from modelpress.compress import compress, resolve_recipe
from modelpress.data.corpus import corpus_splits
from modelpress.data.text import reference_text
from modelpress.errors import ConfigError, OutputExistsError, UnsafeOutputError
from modelpress.evaluate.llm import evaluate_causal_lm
from modelpress.evaluate.perplexity import token_windows
from modelpress.evaluate.report import evaluate_encoder, report_table
from modelpress.evaluate.size import folder_bytes, size_report
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.checkpoint import WEIGHTS, load, read_manifest, save
from modelpress.formats.models import is_gguf, load_model, resolve_source
from modelpress.nn.provenance import provenance
from modelpress.presets import preset, preset_names
from modelpress.report import model_report_html
from modelpress.search import (MIN_SENTENCES, default_upgrades, layer_sensitivity, lm_layer_sensitivity,
                               mixed_precision_recipe, plan_mixed_precision)
from modelpress.store import Store

__all__ = ["cmd_compress", "cmd_eval", "cmd_inspect", "cmd_presets", "cmd_sensitivity"]

SENSITIVITY_WINDOW = 512  # tokens per window of a causal LM's sensitivity measurement


def _load_original(model: str):
    """The float model a bundled name, .gguf file or model folder holds (a SentenceEncoder or a CausalLM)."""
    return load_model(resolve_source(model))


def _source_bytes(source: Path) -> int:
    """Bytes of a source's weights: the .gguf file, or a folder's safetensors files."""
    return source.stat().st_size if is_gguf(source) else folder_bytes(source)


def _evaluate_any(original, compressed, name: str, args, latency: bool):
    """The report of a compressed model against its original: perplexity, agreement and generation for a
    causal LM (evaluate_causal_lm), embedding fidelity for a sentence encoder."""
    if not isinstance(compressed, CausalLM):
        return _evaluate(original, compressed, name, args.sentences, args.threads, latency)
    threads = tuple(sorted({1, args.threads}))
    with _stderr_console().status("evaluating: perplexity, generation" + (", speed" if latency else "")) as status:
        return evaluate_causal_lm(original, compressed, compressed.tokenizer, windows=args.windows,
                                  threads=threads, measure_speed=latency, name=name,
                                  advance=lambda stage: status.update(f"evaluated {stage}"))


def _eval_sentences(n: int):
    return list(corpus_splits(n_eval=n, n_calib=1).evaluation)


def _evaluate(original, compressed, name: str, n_sentences: int, threads: int, latency: bool):
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
    console.print(report_table(evaluation, original_file_bytes, file_bytes))


def _layers_table(model, console, limit: int | None = None) -> None:
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

    return calibration_sentences(n)


def _output_file(path: str | None, what: str, protected: list) -> Path | None:
    """Check a report file the command will write (`--json`, `--write-recipe`) before any work is done."""
    if path is None:
        return None

    out = Path(path)
    real = Path(os.path.realpath(out))
    if out.is_symlink():
        raise UnsafeOutputError(f"{what} {path!r} is a symbolic link: give the real file")
    if out.is_dir():
        raise UnsafeOutputError(f"{what} {path!r} is a folder: give a file name, e.g. {str(out / 'report.json')!r}")
    if not real.parent.is_dir():
        raise UnsafeOutputError(f"{what} {path!r}: the folder {str(out.parent)!r} does not exist; create it first")
    for item in protected:
        guarded = Path(os.path.realpath(item))
        if real == guarded or guarded in real.parents:
            raise UnsafeOutputError(f"{what} {path!r} lies inside {str(item)!r}, which this command reads or writes: "
                                    "choose another path")
    return out


def _write_report(path: Path | None, text: str) -> None:
    if path is not None:

        fileio.write_file(path, text.encode("utf-8"))


def cmd_compress(args) -> int:
    console = _console()
    recipe = resolve_recipe(args.recipe)  # fail on a bad recipe, model path or --out before loading anything
    source = resolve_source(args.model)
    protected = [source, *([args.store] if args.store else [])]
    out = fileio.check_output_dir(args.out, args.overwrite, protected, "--out")
    report = _output_file(args.json, "--json", [*protected, out])
    html = _output_file(getattr(args, "report", None), "--report", [*protected, out])
    with _stderr_console().status(f"loading {args.model}"):
        model = load_model(source)
    with _progress() as progress:
        task = progress.add_task(f"compressing with {recipe.name}", total=len(recipe.stages))
        compress(model, recipe, calibration=_calibration(args.calibration),
                 progress=lambda msg: progress.update(task, description=msg, advance=1))
    save(model, out, recipe, overwrite=args.overwrite, protected=protected)
    console.print(f"saved {recipe.name} model to {out}")
    if args.store:

        with Store.init(args.store) as store:
            name = args.name or f"{Path(str(args.model)).name}-{recipe.name}"
            vid = store.put(model, name, message=f"modelpress compress {args.model} --recipe {args.recipe}")
            console.print(f"stored as {name}@{vid[:12]} in {args.store} "
                          f"({store.stored_bytes(name, vid) / 1e6:.1f} MB in chunks)")
    original_bytes = _source_bytes(source)
    file_bytes = (out / WEIGHTS).stat().st_size
    evaluation = None
    if args.eval:
        original = _load_original(str(source))
        evaluation = _evaluate_any(original, model, recipe.name, args, latency=True)
        _render(evaluation, console, original_bytes, file_bytes)
        _write_report(report, json.dumps(evaluation.to_dict(), indent=1))
    else:
        console.print(f"weights: {original_bytes / 1e6:.1f} MB -> {file_bytes / 1e6:.1f} MB "
                      f"({file_bytes / original_bytes:.1%})")
    if html is not None:  # the checkpoint's HTML report, with the evaluation when --eval measured one
        _write_report(html, model_report_html(
            out, evaluation=None if evaluation is None else evaluation.to_dict(),
            evaluation_rows=() if evaluation is None else evaluation.rows(original_bytes, file_bytes)))
        console.print(f"report: {html}")
    return 0


def cmd_eval(args) -> int:
    console = _console()
    report = _output_file(args.json, "--json", [resolve_source(args.original), args.compressed])
    original = _load_original(args.original)
    with _stderr_console().status(f"loading {args.compressed}"):
        compressed = load(args.compressed)
    if isinstance(original, CausalLM) != isinstance(compressed, CausalLM):
        raise ConfigError(f"{args.original!r} and {args.compressed!r} are not the same kind of model (a causal LM and "
                          "a sentence encoder): give the original the checkpoint was compressed from")
    name = provenance(compressed).recipe_name or Path(args.compressed).name
    evaluation = _evaluate_any(original, compressed, name, args, latency=not args.no_latency)
    _render(evaluation, console, _source_bytes(original.source), (Path(args.compressed) / WEIGHTS).stat().st_size)
    _write_report(report, json.dumps(evaluation.to_dict(), indent=1))
    return 0


def cmd_inspect(args) -> int:
    console = _console()
    manifest = read_manifest(args.path)
    model = load(args.path)
    recipe = manifest.get("recipe") or {}
    console.print(f"[bold]{args.path}[/]: modelpress checkpoint v{manifest['format_version']}, "
                  f"recipe {recipe.get('name', '-')}, {len(manifest['modules'])} compressed modules")
    _layers_table(model, console, limit=None if args.all else 25)
    return 0


def cmd_presets(args) -> int:
    console = _console()
    for name in preset_names():
        console.print(f"[bold]{name}[/]")
        console.print(preset(name).to_yaml())
    return 0


def cmd_sensitivity(args) -> int:
    console = _console()
    recipe = resolve_recipe(args.recipe)  # fail on bad arguments before loading anything
    if not 1 <= args.windows <= 64:
        raise ConfigError(f"--windows {args.windows} is not valid: give 1 to 64 windows of {SENSITIVITY_WINDOW} tokens")
    if args.sentences < MIN_SENTENCES:
        raise ConfigError(f"--sentences {args.sentences} is too few: give at least {MIN_SENTENCES} "
                          "(overlap@10 needs 10 neighbours), e.g. 256")
    if args.budget is not None and not 0 < args.budget < 64:
        raise ConfigError(f"--budget {args.budget:g} is not valid: give bits per weight in (0, 64), e.g. 5")
    if args.write_recipe and args.budget is None:
        raise ConfigError("--write-recipe needs --budget BITS: the mixed-precision recipe is planned for a size budget")
    if args.write_recipe and Path(args.write_recipe).exists():
        raise OutputExistsError(f"{args.write_recipe!r} already exists: choose another --write-recipe path")
    recipe_file = _output_file(args.write_recipe, "--write-recipe", [args.model])
    with _stderr_console().status(f"loading {args.model}"):
        model = _load_original(args.model)
    upgrades = default_upgrades if args.budget is not None else None
    with _progress() as progress:
        task = progress.add_task(f"measuring layers of {recipe.name}", total=None)
        advance = lambda msg: progress.update(task, description=msg)  # noqa: E731
        if isinstance(model, CausalLM):
            windows = _dev_windows(model, args.windows)
            rows = lm_layer_sensitivity(model, recipe, windows, calibration=_calibration(args.calibration),
                                        upgrades=upgrades, progress=advance)
        else:
            sentences = _eval_sentences(args.sentences)
            rows = layer_sensitivity(model, recipe, sentences, calibration=_calibration(args.calibration),
                                     upgrades=upgrades, progress=advance)
    if isinstance(model, CausalLM):
        _lm_sensitivity_table(rows, console, recipe.name, windows.numel())
    else:
        _sensitivity_table(rows, console, recipe.name, len(sentences))
    if args.budget is not None:
        _print_plan(plan_mixed_precision(rows, budget_bits=args.budget), rows, args.budget, console)
    if args.write_recipe:
        _write_report(recipe_file, mixed_precision_recipe(rows, recipe, budget_bits=args.budget).to_yaml())
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


def _dev_windows(model: CausalLM, n: int) -> torch.Tensor:
    """`n` windows of SENSITIVITY_WINDOW tokens of the dev text (never the heldout text reports use)."""
    ids = torch.tensor(model.tokenizer.encode(reference_text("dev"), add_special_tokens=False), dtype=torch.long)
    return token_windows(ids, window=SENSITIVITY_WINDOW, max_tokens=n * SENSITIVITY_WINDOW)


def _lm_sensitivity_table(rows, console, name: str, n_tokens: int) -> None:
    table = Table(title=f"each layer alone with {name}, most damaging first (next-token KL on {n_tokens} dev tokens)")
    for col in ("layer", "bits", "KL (nats)", "bytes", "saved"):
        table.add_column(col, justify="left" if col in ("layer", "bits") else "right")
    for r in rows:
        table.add_row(r.name, r.base.encoding, f"{r.base.kl:.5f}", f"{r.base.bytes:,}", f"{r.bytes_saved:,}")
    table.add_row("all layers", f"{8.0 * sum(r.base.bytes for r in rows) / sum(r.params for r in rows):.3f} "
                  "bits/weight", "", f"{sum(r.base.bytes for r in rows):,}", f"{sum(r.bytes_saved for r in rows):,}")
    console.print(table)


def _sensitivity_table(rows, console, name: str, n_sentences: int) -> None:
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
