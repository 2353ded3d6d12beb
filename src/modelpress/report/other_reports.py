"""The HTML reports of a compressed checkpoint (bytes and bits per weight per layer, size by tensor kind, the
recipe) and of a store (models, versions, lineage, bytes added per version, what deduplication saves)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from modelpress.evaluate.size import size_report
from modelpress.formats.checkpoint import load
from modelpress.nn.provenance import provenance
from modelpress.report.page import page, table
from modelpress.report.svg import PALETTE, bars
from modelpress.store import Store

__all__ = ["model_report_html", "store_data", "store_report_html"]


def _kind(encoding: str) -> str:
    """'int4 asym g32' -> 'int4', 'float32' -> 'float32', 'sparse 2:4 ...' -> 'sparse'."""
    return encoding.split()[0] if encoding else "?"


def model_report_html(path: str | Path, skeleton: Any = None, evaluation: dict[str, Any] | None = None,
                      evaluation_rows: Sequence[Sequence[str]] = ()) -> str:
    """Report of a compressed checkpoint folder (`modelpress compress --out`); `skeleton` is the float model
    for checkpoints of plain modules (as `load` takes it). `evaluation` (an evaluation's `to_dict()`) and its
    rows (metric, original, compressed, ratio), from `compress --eval`, add an Evaluation section and go into
    the embedded JSON."""
    model = load(path, model=skeleton)
    sizes = size_report(model)
    layers = [{"name": s.name, "encoding": s.encoding, "shape": list(s.shape), "params": s.params, "bytes": s.bytes,
               "bits_per_weight": s.bits_per_weight} for s in sizes.layers]
    kinds: dict[str, int] = {}
    for s in sizes.layers:
        kinds[_kind(s.encoding)] = kinds.get(_kind(s.encoding), 0) + s.bytes
    big = sorted(layers, key=lambda r: -r["bytes"])[:60]
    recipe = provenance(model).recipe
    data = {"path": str(path), "bytes": sizes.bytes, "params": sizes.params, "bits_per_weight": sizes.bits_per_weight,
            "by_kind": kinds, "layers": layers, "recipe": recipe}
    if evaluation is not None:
        data["evaluation"] = evaluation
    sections = [
        ("Summary", table(("", ""), [("checkpoint", str(path)), ("bytes as held", f"{sizes.bytes:,}"),
                                     ("parameters", f"{sizes.params:,}"),
                                     ("bits per weight", f"{sizes.bits_per_weight:.3f}")])),
        ("Size by tensor kind", bars("plot-kinds", "MB by encoding", [(k, v / 1e6, PALETTE["quant"]) for k, v in
                                                                      sorted(kinds.items(), key=lambda kv: -kv[1])],
                                     "MB", horizontal_labels=True)),
        ("Bits per weight of the largest tensors",
         bars("plot-layers", f"the {len(big)} largest tensors", [(r["name"], r["bits_per_weight"], PALETTE["quant"])
                                                                  for r in big], "bits per weight")),
        ("Tensors", table(("tensor", "encoding", "shape", "bytes", "bits/weight"),
                          [(r["name"], r["encoding"], "x".join(map(str, r["shape"])), f"{r['bytes']:,}",
                            f"{r['bits_per_weight']:.3f}") for r in layers])),
    ]
    if evaluation_rows:
        sections.insert(1, ("Evaluation against the original", table(("metric", "original", "compressed", "ratio"),
                                                                      evaluation_rows)))
    return page(f"modelpress checkpoint: {Path(path).name}", sections, data)


def store_data(path: str | Path) -> dict[str, Any]:
    """Per model: its versions oldest first, each with parent, tags, stored bytes and bytes added over its parent."""
    out: dict[str, Any] = {"store": str(path), "models": []}
    with Store(path) as store:
        for name, _ in store.models():
            versions = []
            for v in reversed(store.log(name)):  # oldest first
                whole = store.stored_bytes(name, v.id)
                added = store.stored_bytes(name, v.id, exclusive_of=v.parent) if v.parent else whole
                versions.append({"id": v.id, "parent": v.parent, "created": v.created, "message": v.message,
                                 "tags": list(v.tags), "stored_bytes": whole, "added_bytes": added})
            logical = sum(v["stored_bytes"] for v in versions)
            added = sum(v["added_bytes"] for v in versions)
            out["models"].append({"name": name, "versions": versions, "logical_bytes": logical, "added_bytes": added,
                                  "dedup_ratio": logical / added if added else 1.0})
    return out


def store_report_html(path: str | Path) -> str:
    """Report of a store folder: versions, lineage, bytes added per version, deduplication."""
    data = store_data(path)
    items, rows, summary = [], [], []
    for m in data["models"]:
        ids = {v["id"]: i for i, v in enumerate(m["versions"])}
        summary.append((m["name"], len(m["versions"]), f"{m['logical_bytes']:,}", f"{m['added_bytes']:,}",
                        f"{m['dedup_ratio']:.2f}x"))
        for i, v in enumerate(m["versions"]):
            label = f"{m['name']}@{v['id'][:8]}"
            colour = PALETTE["quant"] if v["parent"] is None else PALETTE["sparse"]
            items.append((label, v["added_bytes"] / 1e6, colour))
            parent = "" if v["parent"] is None else f"{v['parent'][:12]} (#{ids.get(v['parent'], '?')})"
            rows.append((m["name"], f"#{i} {v['id'][:12]}", parent, ", ".join(v["tags"]),
                         time.strftime("%Y-%m-%d %H:%M", time.gmtime(v["created"])), f"{v['stored_bytes']:,}",
                         f"{v['added_bytes']:,}", v["message"]))
    sections = [
        ("Models", table(("model", "versions", "bytes if stored apart", "bytes stored", "dedup"), summary)),
        ("Bytes added per version", bars("plot-added", "MB each version adds over its parent", items, "MB")
         + f'<p class="note"><span style="color:{PALETTE["quant"]}">&#9632;</span> no parent '
           f'<span style="color:{PALETTE["sparse"]}">&#9632;</span> over its parent</p>'),
        ("Versions and lineage", table(("model", "version", "parent", "tags", "created (UTC)", "stored bytes",
                                        "added bytes", "message"), rows)),
    ]
    return page(f"modelpress store: {Path(path).name}", sections, data)
