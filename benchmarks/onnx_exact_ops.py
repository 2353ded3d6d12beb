"""What MiniLM's float operations would cost in ONNX Runtime if they had to give the same bits as modelpress.

    .venv/bin/python benchmarks/onnx_exact_ops.py [--threads 2] [--tokens 800]

A W8A8 export agrees with modelpress to the bit only if every activation quantiser sees the same float32 input
in both runtimes (onnx_divergence.py: attention, LayerNorm and GELU each start about a fifth of the
divergences). The ways to make a float operation reproducible across runtimes, timed here against ORT's own
kernel on one layer's shapes for a batch of 32 sentences of 25 tokens (`--tokens` rows):
- LayerNorm (rows x 384) and attention (32 x 12 heads x 25 x 32) in float64, rounded to float32 once: both
  runtimes then round the same exact-enough value;
- GELU (rows x 1536) by a table: the input on a 2^-9 grid (QuantizeLinear to uint16), Gather from 65,536
  precomputed values. ORT has no float64 Erf to do it the first way (the script reports that too).
Medians of `--runs` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=800)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def session(nodes, inputs, constants):
        graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  initializer=[numpy_helper.from_array(v, n) for n, v in constants.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def timed(nodes, inputs, constants) -> float | str:
        try:
            run = session(nodes, inputs, constants)
        except Exception as exc:  # noqa: BLE001 - an operator ORT lacks is a result here
            return f"not runnable ({str(exc).splitlines()[0][:90]})"
        rng = np.random.default_rng(0)
        feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in inputs}
        for _ in range(5):
            run.run(None, feeds)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            run.run(None, feeds)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    def cast(src, dst, to):
        return helper.make_node("Cast", [src], [dst], to=to)

    f64, m = TensorProto.DOUBLE, args.tokens
    one = {"k": np.float32(1.4142135), "one": np.float32(1.0), "half": np.float32(0.5)}
    gelu = [helper.make_node("Div", ["x", "k"], ["a"]), helper.make_node("Erf", ["a"], ["b"]),
            helper.make_node("Add", ["b", "one"], ["c"]), helper.make_node("Mul", ["x", "c"], ["d"]),
            helper.make_node("Mul", ["d", "half"], ["y"])]
    gelu64 = [cast("x", "x64", f64), *[helper.make_node(n.op_type, [i.replace("x", "x64") for i in n.input],
                                                        [o.replace("y", "y64") for o in n.output]) for n in gelu],
              cast("y64", "y", TensorProto.FLOAT)]
    table = [helper.make_node("QuantizeLinear", ["x", "step", "zero"], ["q"]), cast("q", "i", TensorProto.INT32),
             helper.make_node("Gather", ["table", "i"], ["y"])]
    table_constants = {"step": np.float32(2**-9), "zero": np.uint16(32768), "table": np.zeros(65536, np.float32)}
    norm = {"g": np.ones(384, np.float32), "b": np.zeros(384, np.float32)}
    norm64 = {k: v.astype(np.float64) for k, v in norm.items()}
    layer_norm = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-12)]
    layer_norm64 = [cast("x", "x64", f64),
                    helper.make_node("LayerNormalization", ["x64", "g", "b"], ["y64"], axis=-1, epsilon=1e-12),
                    cast("y64", "y", TensorProto.FLOAT)]
    heads = [("q", [32, 12, 25, 32]), ("k", [32, 12, 32, 25]), ("v", [32, 12, 25, 32])]
    attention = [helper.make_node("MatMul", ["q", "k"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                 helper.make_node("MatMul", ["p", "v"], ["y"])]
    attention64 = [cast("q", "q64", f64), cast("k", "k64", f64), cast("v", "v64", f64),
                   helper.make_node("MatMul", ["q64", "k64"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                   helper.make_node("MatMul", ["p", "v64"], ["y64"]), cast("y64", "y", TensorProto.FLOAT)]
    rows = [
        ("GELU", timed(gelu, [("x", [m, 1536])], one), "float64", timed(gelu64, [("x", [m, 1536])],
                                                                       {k: np.float64(v) for k, v in one.items()})),
        ("GELU", None, "table", timed(table, [("x", [m, 1536])], table_constants)),
        ("LayerNorm", timed(layer_norm, [("x", [m, 384])], norm), "float64",
         timed(layer_norm64, [("x", [m, 384])], norm64)),
        ("attention", timed(attention, heads, {}), "float64", timed(attention64, heads, {})),
    ]
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, {m} token rows, median ms per call")
    print("| operation | ORT's float32 kernel | reproducible way | its time |\n|---|---|---|---|")
    for op, own, way, exact in rows:
        fmt = (lambda v: f"{v:.3f}" if isinstance(v, float) else (v or "-"))
        print(f"| {op} | {fmt(own)} | {way} | {fmt(exact)} |")


if __name__ == "__main__":
    main()
