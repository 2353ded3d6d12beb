"""`modelpress export MODEL_DIR --format FMT --out PATH`: a thin command over modelpress.exports.

MINIMAL VERSION (branch wt-onnx-hf): the gguf helper's branch has the same command; the lead merges the two.
"""

from __future__ import annotations

from modelpress.cli.console import console
from modelpress.errors import ConfigError
from modelpress.exports import EXPORTERS, export_model

__all__ = ["add_export_commands", "cmd_export"]


def add_export_commands(sub) -> None:
    p = sub.add_parser("export", help="write a model for another runtime (ONNX Runtime, transformers)")
    p.add_argument("model", help="a modelpress checkpoint folder (or any model `compress` reads)")
    p.add_argument("--format", required=True, choices=sorted(EXPORTERS), help="onnx: ONNX Runtime; hf: a Hugging "
                   "Face folder (safetensors + config) for transformers / sentence-transformers")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="hf: the dtype of the dequantised weights (default float16)")
    p.add_argument("--quantized", action="store_true", help="hf: Linear weights in the compressed-tensors format "
                   "(symmetric 4/8-bit, bit-exact; transformers loads it with compressed-tensors installed)")
    p.set_defaults(fn=cmd_export)


def cmd_export(args) -> int:
    options = {} if args.dtype is None else {"dtype": args.dtype}
    if args.quantized:
        options["quantized"] = True
    if args.format != "hf" and options:
        raise ConfigError(f"--dtype and --quantized apply to --format hf only, not {args.format}: leave them out")
    path = export_model(args.model, args.format, args.out, **options)
    console().print(f"wrote {path}")
    return 0
