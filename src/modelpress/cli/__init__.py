"""The `modelpress` command: a thin layer over the library (all logic lives there).

A user's mistake ends with one line on stderr naming the problem and the fix, and exit code 2;
no traceback. A stray MemoryError or RecursionError (every known cause is refused where it arises,
as a LimitExceededError) also ends in one line.
"""

from __future__ import annotations

import argparse
import os
import sys

from modelpress.cli.export_cmds import add_export_commands
from modelpress.cli.model_cmds import cmd_compress, cmd_eval, cmd_inspect, cmd_presets, cmd_sensitivity
from modelpress.cli.regions_cmds import add_regions_commands
from modelpress.cli.search_cmds import add_search_commands
from modelpress.cli.store_cmds import add_store_commands
from modelpress.errors import ModelpressError

__all__ = ["main", "build_parser", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpress", description="Compress models for CPUs and edge devices.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a model with a recipe or preset and save it")
    p.add_argument("model", help="a Hugging Face folder (sentence encoder or causal LM), a .gguf file, or a bundled "
                              "name (minilm, smollm2)")
    p.add_argument("--recipe", default="int8", help="preset name (int8, w8a8, w8a8-smooth, int4, int3) or recipe YAML file")
    p.add_argument("--out", required=True, help="folder to write the compressed model to")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--eval", action="store_true", help="evaluate against the original and print the report")
    p.add_argument("--sentences", type=int, default=2000, help="evaluation sentences of an encoder (default 2000)")
    p.add_argument("--windows", type=int, default=8,
                   help="perplexity windows of 512 tokens for a causal LM (default 8)")
    p.add_argument("--threads", type=int, default=2, help="threads for latency measurement (default 2; a causal LM "
                                                          "is also timed at 1)")
    p.add_argument("--json", help="also write the evaluation as JSON to this file")
    p.add_argument("--report", metavar="OUT.html", help="also write the HTML report of the checkpoint (with --eval: "
                                                        "and of its evaluation)")
    p.add_argument("--calibration", type=int, metavar="N",
                   help="calibrate data-aware passes (gptq, awq, w8a8-smooth) on N corpus sentences, e.g. 128")
    p.add_argument("--store", help="also put the result into this store folder (created if missing)")
    p.add_argument("--name", help="model name in the store (default: <model>-<recipe>)")
    p.set_defaults(fn=cmd_compress)

    p = sub.add_parser("eval", help="compare a compressed model with its original")
    p.add_argument("original", help="the model it was compressed from (folder, .gguf file or bundled name)")
    p.add_argument("compressed", help="the checkpoint folder")
    p.add_argument("--sentences", type=int, default=2000)
    p.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens for a causal LM")
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
    p.add_argument("model", help="a Hugging Face folder (sentence encoder or causal LM), a .gguf file, or a bundled "
                              "name (minilm, smollm2)")
    p.add_argument("--recipe", default="int4", help="preset name or recipe YAML file (default int4)")
    p.add_argument("--sentences", type=int, default=256,
                   help="held-out evaluation sentences of an encoder (default 256)")
    p.add_argument("--windows", type=int, default=2, help="dev-text windows of 512 tokens for a causal LM (default 2)")
    p.add_argument("--calibration", type=int, metavar="N", help="calibrate data-aware passes (gptq) on N sentences")
    p.add_argument("--budget", type=float, metavar="BITS",
                   help="plan mixed precision: bits per weight of the selected layers (above the recipe's own)")
    p.add_argument("--write-recipe", metavar="OUT.yaml", help="write the mixed-precision recipe (needs --budget)")
    p.set_defaults(fn=cmd_sensitivity)

    add_store_commands(sub)
    add_regions_commands(sub)
    add_search_commands(sub)
    add_export_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models come from folders
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ModelpressError as exc:
        print(f"modelpress: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (MemoryError, RecursionError) as exc:  # defence in depth: each known case is refused at its source
        what = "ran out of memory" if isinstance(exc, MemoryError) else "met input nested too deeply"
        print(f"modelpress: error: {what} ({type(exc).__name__}); free memory or check the input files, and "
              "report the command if they are valid", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("modelpress: interrupted", file=sys.stderr)
        return 130

