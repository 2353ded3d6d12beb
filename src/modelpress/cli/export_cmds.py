"""`modelpress export MODEL --format gguf --out PATH`: a thin command over modelpress.exports."""

from __future__ import annotations

from modelpress.cli.console import console as _console
from modelpress.errors import ConfigError
from modelpress.exports import FORMATS, export_model

__all__ = ["add_export_commands"]


def cmd_export(args) -> int:
    bad = [item for item in args.type or () if "=" not in item]
    if bad:
        raise ConfigError(f"--type {bad[0]!r} is not PATTERN=TYPE: write e.g. --type 'blk.*.ffn_down.weight=Q6_K'")
    options = {"overwrite": args.overwrite}
    if args.format == "gguf":
        options.update(types=dict(item.split("=", 1) for item in args.type or ()), float_type=args.float_type,
                       tokenizer_pre=args.tokenizer_pre, exact=args.exact)
    elif args.type or args.tokenizer_pre or args.exact:
        raise ConfigError(f"--type, --tokenizer-pre and --exact are GGUF options; drop them for --format {args.format}")
    result = export_model(args.model, args.format, args.out, **options)
    _console().print(result.summary())
    return 0


def add_export_commands(sub) -> None:
    p = sub.add_parser("export", help="write a model (a checkpoint, folder, .gguf file or bundled name) in a format "
                                      "another runtime reads")
    p.add_argument("model", help="a modelpress checkpoint folder (or any model `compress` takes)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="gguf: llama.cpp (Llama-family LMs)")
    p.add_argument("--out", required=True, help="the file (gguf) or folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--type", action="append", metavar="PATTERN=TYPE",
                   help="gguf: a block type for the tensors whose llama.cpp name matches (F32, F16, Q8_0, Q4_0, Q4_1, "
                        "Q6_K); requantises where it is not the tensor's own grid; repeatable")
    p.add_argument("--float-type", default="F16", choices=("F16", "F32"), help="gguf: what float matrices become")
    p.add_argument("--tokenizer-pre", help="gguf: llama.cpp's pre-tokenizer name, where it cannot be read off the "
                                           "tokenizer (llama-bpe, qwen2, ...)")
    p.add_argument("--exact", action="store_true", help="gguf: refuse any weight the file would not hold as it is "
                                                        "(no requantising, no narrowing)")
    p.set_defaults(fn=cmd_export)
