"""The HTML report of a joint search run (search.json): the Pareto front, latency, per-layer sensitivity as
a heatmap, the chosen bits / sparsity / rank per layer, the size by tensor kind, the fidelity distribution,
and the JSON behind them."""

from __future__ import annotations

from typing import Any

from modelpress.report.page import MAX_REPORT_BYTES, page, table
from modelpress.report.svg import PALETTE, bars, heatmap, histogram, scatter

__all__ = ["search_report_html", "technique"]

_TECHNIQUE = {"rtn": "quant", "gptq": "quant", "magnitude": "sparse", "wanda": "sparse", "sparsegpt": "sparse",
              "lowrank": "lowrank"}


def technique(option: dict[str, Any] | None) -> str:
    return "float" if option is None else _TECHNIQUE.get(option["pass"], "other")


def _quality(data: dict[str, Any], point: dict[str, Any]) -> float:
    return point["kl"] if data["metric"] == "ppl" else point["mean_cosine"]


def search_report_html(data: dict[str, Any]) -> str:
    """The report page of a search result (RunFolder.result())."""
    ppl = data["metric"] == "ppl"
    qlabel = "next-token KL (nats, lower is better)" if ppl else "mean cosine (higher is better)"
    points = data["candidates"]
    chosen = next((p for p in points if p["id"] == data["chosen"]), None)
    options = {o["label"]: o for o in data["options"]}

    def colour(p):
        return PALETTE["chosen"] if p is chosen else PALETTE["front"] if p.get("front") else PALETTE["quant"]

    front_pts = [{"x": p["bytes"] / 1e6, "y": _quality(data, p), "label": p["id"], "color": colour(p),
                  "r": 6 if p is chosen else 4, "front": p.get("front_size_fidelity", False)} for p in points]
    latency_pts = [{"x": p["bytes"] / 1e6, "y": p["latency_s"] * 1e3, "label": p["id"], "color": colour(p),
                    "front": p.get("front", False)} for p in points]
    sections = [
        ("Summary", _summary(data, chosen)),
        ("Pareto front: size x fidelity", scatter("plot-front", f"{len(points)} validated candidates", front_pts,
                                                  "x", "y", "MB as stored", qlabel, line_key="front")
         + '<p class="note">Orange: on the front (size, fidelity, latency); red: the chosen recipe; the line joins '
           'the size-fidelity front.</p>'),
        ("Latency (cost model: the chosen kernels' layer timings, summed)",
         scatter("plot-latency", "size x latency", latency_pts, "x", "y", "MB as stored", "ms per 32 tokens")),
        ("Per-layer sensitivity", _heatmap(data)),
    ]
    if chosen is not None:
        sections += [("Chosen recipe: bits, sparsity and rank per layer", _per_layer(data, chosen, options)),
                     ("Size by tensor kind (chosen recipe)", _by_kind(data, chosen, options)),
                     ("Fidelity distribution (chosen recipe)",
                      histogram("plot-fidelity", "per-window KL" if ppl else "per-sentence cosine",
                                chosen.get("per_input", []), "KL (nats)" if ppl else "cosine"))]
    sections.append(("Candidates", _candidates(data, points)))
    embedded = _fit(data)
    return page(f"modelpress search: {data['run']['spec']['model']}", sections, embedded,
                note=f"budget {data['budget_bytes']:,} bytes as stored; {len(points)} candidates validated end to end")


def _summary(data, chosen) -> str:
    spec, versions = data["run"]["spec"], data["run"].get("versions", {})
    rows = [("model", spec["model"]), ("metric", data["metric"]), ("budget", f"{data['budget_bytes']:,} bytes"),
            ("unsearched tensors", f"{data['fixed_bytes']:,} bytes"), ("searched layers", len(data["layers"])),
            ("options", ", ".join(o["label"] for o in data["options"])), ("seed", spec["seed"]),
            ("inputs", f"{spec['n_inputs']} (sha256 {spec['inputs_sha256'][:16]})"),
            ("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))]
    if chosen is not None:
        q = f"KL {chosen['kl']:.5f}, perplexity {chosen['perplexity']:.3f}" if data["metric"] == "ppl" else \
            f"mean cosine {chosen['mean_cosine']:.5f}, overlap@10 {chosen['overlap_at_10']:.3f}"
        rows.append(("chosen", f"{chosen['id']}: {chosen['bytes']:,} bytes, {q}"))
    else:
        rows.append(("chosen", "none: no validated candidate fits the budget"))
    return table(("", ""), rows)


def _heatmap(data) -> str:
    layers = [layer["name"] for layer in data["layers"]]
    cols = [o["label"] for o in data["options"] if o["label"] in data["table"]]
    values = {(name, label): cell["damage"] for label in cols for name, cell in data["table"][label].items()}
    note = "KL of each layer alone;" if data["metric"] == "ppl" else "1 - mean cosine of each layer alone;"
    return heatmap("plot-sensitivity", "damage of each option on each layer, alone in the float model",
                   layers, cols, values, note)


def _per_layer(data, chosen, options) -> str:
    cells, items, rows = data["table"], [], []
    floats = data["float_cells"]
    for layer in data["layers"]:
        label = chosen["choice"][layer["name"]]
        cell = floats[layer["name"]] if label == "float" else cells[label][layer["name"]]
        kind = technique(options.get(label))
        bpw = 8.0 * cell["bytes"] / max(layer["params"], 1)
        items.append((layer["name"], bpw, PALETTE[kind]))
        rows.append((layer["name"], label, cell["encoding"], f"{bpw:.3f}", f"{cell['damage']:.3g}"))
    legend = " ".join(f'<span style="color:{PALETTE[k]}">&#9632; {k}</span>'
                      for k in ("quant", "sparse", "lowrank", "float"))
    return (bars("plot-layers", "bits per weight of each layer as stored", items, "bits per weight")
            + f'<p class="note">{legend}</p>'
            + table(("layer", "option", "encoding", "bits/weight", "damage alone"), rows))


def _by_kind(data, chosen, options) -> str:
    kinds: dict[str, int] = {"unsearched tensors (norms, biases, ...)": data["fixed_bytes"]}
    for layer in data["layers"]:
        label = chosen["choice"][layer["name"]]
        cell = data["float_cells"][layer["name"]] if label == "float" else data["table"][label][layer["name"]]
        key = f"{layer['kind']} {technique(options.get(label))}"
        kinds[key] = kinds.get(key, 0) + cell["bytes"]
    items = [(k, v / 1e6, PALETTE["quant"]) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    return (bars("plot-kinds", "MB by tensor kind and technique", items, "MB", horizontal_labels=True)
            + table(("kind", "bytes"), [(k, f"{v:,}") for k, v in kinds.items()]))


def _candidates(data, points) -> str:
    ppl = data["metric"] == "ppl"
    rows = [(p["id"], f"{p['bytes']:,}", f"{_quality(data, p):.5f}",
             f"{p['perplexity']:.3f}" if ppl else f"{p['overlap_at_10']:.3f}", f"{p['estimated_damage']:.4g}",
             f"{p['latency_s'] * 1e3:.3f}", "yes" if p.get("front") else "", "chosen" if p["id"] == data["chosen"] else "")
            for p in points]
    return table(("id", "bytes", "KL" if ppl else "mean cosine", "perplexity" if ppl else "overlap@10",
                  "summed single-layer damage", "latency ms", "front", ""), rows)


def _fit(data: dict[str, Any]) -> dict[str, Any]:
    """The data, with per-input lists cut (except the chosen one's) when the page would pass MAX_REPORT_BYTES."""
    size = len(str(data))
    if size < MAX_REPORT_BYTES // 2:
        return data
    out = dict(data)
    out["candidates"] = [p if p["id"] == data["chosen"] else {k: v for k, v in p.items() if k != "per_input"}
                         for p in data["candidates"]]
    return out
