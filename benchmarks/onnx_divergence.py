"""Where ONNX Runtime's run of a W8A8 export first departs from modelpress's own run of the same weights.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/onnx_divergence.py [--preset w8a8-token] [--sentences 400]
        [--unoptimised]

MiniLM is compressed with `--preset` (a preset whose Linear layers all take `row` activation ranges, so each
layer alone is bit-exact between the runtimes), saved and exported. Every input of an activation quantiser
(the tensor under each row-range ReduceMax of the graph) is added as a graph output; modelpress's side records
every `quantize_rows` input. Sentence by sentence (batch of one), the two are compared quantiser by
quantiser in the order the graph runs them; the first whose int8 row codes differ is counted, by the float
operation that produced its input. A sentence with none comes out exact to float rounding. Why it matters:
after the first code that differs, W8A8 layers amplify the difference (results_onnx.md).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelpress  # noqa: E402
import modelpress.nn.kernels as kernels  # noqa: E402
from modelpress.data.corpus import corpus_splits  # noqa: E402
from modelpress.exports import export_model  # noqa: E402
from modelpress.formats.hf import load_sentence_encoder  # noqa: E402


def quantiser_inputs(graph) -> list[tuple[str, str]]:
    """(tensor name, the kind of operation that made it) for each row quantiser's input, in graph order."""
    made_by = {out: node for node in graph.node for out in node.output}
    found: list[tuple[str, str]] = []
    for node in graph.node:
        if node.op_type == "ReduceMax" and node.input[0] not in {name for name, _ in found}:
            name = node.input[0]
            maker = made_by.get(name)
            kind = ("LayerNorm" if maker is not None and maker.op_type == "LayerNormalization"
                    else "GELU" if "act_fn" in name
                    else "attention" if "attention/self/Reshape" in name
                    else "LayerNorm x smoothing")  # the smoothing Mul after a LayerNorm (V and FFN1 inputs)
            found.append((name, kind))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="w8a8-token")
    parser.add_argument("--sentences", type=int, default=400)
    parser.add_argument("--unoptimised", action="store_true", help="ORT_DISABLE_ALL: the graph as written")
    args = parser.parse_args()
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = modelpress.save(modelpress.compress(load_sentence_encoder("minilm"), args.preset),
                                     Path(tmp) / "checkpoint")
        graph_file = export_model(checkpoint, "onnx", Path(tmp) / "onnx") / "model.onnx"
        proto = onnx.load(str(graph_file))
        model = modelpress.load(checkpoint)
    quantisers = quantiser_inputs(proto.graph)
    for name, _ in quantisers:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    if args.unoptimised:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    recorded: list[torch.Tensor] = []
    quantize_rows = kernels.quantize_rows

    def recording(x, levels):
        recorded.append(x.detach().clone())
        return quantize_rows(x, levels)

    kernels.quantize_rows = recording
    first: collections.Counter = collections.Counter()
    by_layer: collections.Counter = collections.Counter()
    sentences = list(corpus_splits(n_eval=args.sentences, n_calib=1).evaluation)
    try:
        for sentence in sentences:
            feeds = model.tokenize([sentence])
            recorded.clear()
            with torch.inference_mode():
                model.model(**feeds)
            # Q and K (and any layer sharing an input) quantise the same tensor: one quantiser in the graph
            ours = [x for i, x in enumerate(recorded) if i == 0 or not (x.shape == recorded[i - 1].shape
                                                                          and torch.equal(x, recorded[i - 1]))]
            theirs = session.run([name for name, _ in quantisers], {k: v.numpy() for k, v in feeds.items()})
            kind = "none"
            for index, ((_, op), mine, other) in enumerate(zip(quantisers, ours, theirs)):
                theirs_codes = quantize_rows(torch.from_numpy(other).reshape(mine.shape), 127)[0]
                if not torch.equal(quantize_rows(mine, 127)[0], theirs_codes):
                    kind = op
                    by_layer[index * 6 // len(quantisers)] += 1
                    break
            first[kind] += 1
    finally:
        kernels.quantize_rows = quantize_rows
    level = "unoptimised (ORT_DISABLE_ALL)" if args.unoptimised else "default optimisation"
    print(f"MiniLM {args.preset}, {len(sentences)} held-out sentences one at a time, ORT {ort.__version__} {level}")
    print("first quantiser whose codes differ, by the operation that made its input:")
    for kind, count in first.most_common():
        print(f"  {kind}: {count} ({100 * count / len(sentences):.0f}%)")
    print("by layer: " + ", ".join(f"{layer}: {by_layer[layer]}" for layer in range(6)))


if __name__ == "__main__":
    main()
