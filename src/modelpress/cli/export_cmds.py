"""`modelpress export MODEL --format gguf|onnx|hf|gptq --out PATH`: a thin command over modelpress.exports."""

from __future__ import annotations

from modelpress.cli.console import console as _console
from modelpress.errors import ConfigError
from modelpress.exports import FORMATS, export_model

__all__ = ["add_export_commands", "cmd_export"]

_GGUF_ONLY = ("type", "tokenizer_pre", "exact", "overwrite")
_HF_ONLY = ("quantized",)
_GPTQ_ONLY = ("checkpoint_format",)


def cmd_export(args) -> int:
    home = {**dict.fromkeys(_GGUF_ONLY, ("gguf",)), **dict.fromkeys(_HF_ONLY, ("hf",)),
            **dict.fromkeys(_GPTQ_ONLY, ("gptq",)), "dtype": ("hf", "gptq")}
    misplaced = [name for name, fmts in home.items() if getattr(args, name) and args.format not in fmts]
    if misplaced:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in misplaced)
        new_folder = " (onnx, hf and gptq write a new folder: remove --out first to replace it)"
        hint = new_folder if "overwrite" in misplaced else ""
        raise ConfigError(f"{flags} apply to --format {' and '.join(home[misplaced[0]])} only, not {args.format}: "
                          f"leave them out{hint}")
    bad = [item for item in args.type or () if "=" not in item]
    if bad:
        raise ConfigError(f"--type {bad[0]!r} is not PATTERN=TYPE: write e.g. --type 'blk.*.ffn_down.weight=Q6_K'")
    options: dict = {}
    if args.format == "gguf":
        options = dict(types=dict(item.split("=", 1) for item in args.type or ()), float_type=args.float_type,
                       tokenizer_pre=args.tokenizer_pre, exact=args.exact, overwrite=args.overwrite)
    elif args.format == "hf":
        options = {"dtype": args.dtype or "float16", "quantized": args.quantized}
    elif args.format == "gptq":
        options = {"dtype": args.dtype or "float16", "checkpoint_format": args.checkpoint_format or "gptq"}
    result = export_model(args.model, args.format, args.out, **options)
    _console().print(result.summary() if hasattr(result, "summary") else f"wrote {result}")
    return 0


def add_export_commands(sub) -> None:
    p = sub.add_parser("export", help="write a model (a checkpoint, folder, .gguf file or bundled name) in a format "
                                      "another runtime reads")
    p.add_argument("model", help="a modelpress checkpoint folder (or any model `compress` takes)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS),
                   help="gguf: llama.cpp (Llama-family LMs); onnx: ONNX Runtime; hf: a Hugging Face folder "
                        "(safetensors + config) for transformers / sentence-transformers; gptq: a GPTQ-format folder "
                        "(AutoGPTQ / GPTQModel / transformers+optimum) of a GPTQ- or RTN-quantised causal LM")
    p.add_argument("--out", required=True, help="the file (gguf) or folder (onnx, hf: must not exist) to write")
    p.add_argument("--overwrite", action="store_true", help="gguf: replace --out if it exists")
    p.add_argument("--type", action="append", metavar="PATTERN=TYPE",
                   help="gguf: a block type for the tensors whose llama.cpp name matches (F32, F16, Q8_0, Q4_0, Q4_1, "
                        "Q5_0, Q5_1, Q4_K, Q6_K); requantises where it is not the tensor's own grid; a K-quant on rows "
                        "that are not whole 256-blocks falls back as llama.cpp does (Q4_K: Q5_0, Q6_K: Q8_0); "
                        "repeatable")
    p.add_argument("--float-type", default="F16", choices=("F16", "F32"), help="gguf: what float matrices become")
    p.add_argument("--tokenizer-pre", help="gguf: llama.cpp's pre-tokenizer name, where it cannot be read off the "
                                           "tokenizer (llama-bpe, qwen2, ...)")
    p.add_argument("--exact", action="store_true", help="gguf: refuse any weight the file would not hold as it is "
                                                        "(no requantising, no narrowing)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="hf, gptq: the dtype of the dequantised (float) weights (default float16; gptq: not float32)")
    p.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"],
                   help="gptq: v1 (zero points stored minus one, the default) or v2")
    p.add_argument("--quantized", action="store_true", help="hf: Linear weights in the compressed-tensors format "
                   "(symmetric 4/8-bit, bit-exact; transformers loads it with compressed-tensors installed)")
    p.set_defaults(fn=cmd_export)
