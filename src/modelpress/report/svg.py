"""Plots as inline SVG text: scatter, heatmap, bars and histogram, with no script and no network.

Every mark a plot draws for a data point carries `class="pt"` (bars and heatmap cells too), so a test
or a reader can count them; every mark has a <title> (the browser's tooltip) with its values. Text is
escaped; numbers are formatted, never pasted raw.
"""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

__all__ = ["bars", "heatmap", "histogram", "scatter", "PALETTE"]

W, H = 640, 360  # plot size in px
L, R, T, B = 70, 20, 30, 50  # margins
PALETTE = {"quant": "#1f77b4", "sparse": "#2ca02c", "lowrank": "#d62728", "float": "#7f7f7f", "other": "#9467bd",
           "front": "#ff7f0e", "chosen": "#d62728"}


def _fmt(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.3g}"
    return f"{x:.4g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _frame(title: str, plot_id: str, body: list[str], width: int = W, height: int = H) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(plot_id)}" class="plot" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
            f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" class="title">{escape(title)}</text>'
            + "".join(body) + "</svg>")


def _axes(xlabel: str, ylabel: str, xs: tuple[float, float], ys: tuple[float, float], width: int = W,
          height: int = H) -> list[str]:
    out = [f'<line x1="{L}" y1="{height - B}" x2="{width - R}" y2="{height - B}" class="axis"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{height - B}" class="axis"/>',
           f'<text x="{(L + width - R) / 2:.0f}" y="{height - 10}" text-anchor="middle">{escape(xlabel)}</text>',
           f'<text x="14" y="{(T + height - B) / 2:.0f}" text-anchor="middle" '
           f'transform="rotate(-90 14 {(T + height - B) / 2:.0f})">{escape(ylabel)}</text>']
    for v in _ticks(*xs):
        x = _x(v, xs, width)
        out.append(f'<text x="{x:.1f}" y="{height - B + 16}" text-anchor="middle" class="tick">{_fmt(v)}</text>')
    for v in _ticks(*ys):
        y = _y(v, ys, height)
        out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_fmt(v)}</text>')
    return out


def _span(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        pad = abs(lo) * 0.05 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _x(v: float, xs: tuple[float, float], width: int = W) -> float:
    return L + (v - xs[0]) / (xs[1] - xs[0]) * (width - L - R)


def _y(v: float, ys: tuple[float, float], height: int = H) -> float:
    return height - B - (v - ys[0]) / (ys[1] - ys[0]) * (height - T - B)


def scatter(plot_id: str, title: str, points: Sequence[dict], x: str, y: str, xlabel: str, ylabel: str,
            line_key: str | None = None) -> str:
    """One circle per point (dicts with keys `x`, `y`, optional `label`, `color`, `r`); points with a true
    `line_key` are also joined by a line in x order (a front)."""
    if not points:
        return _frame(title, plot_id, ['<text x="50%" y="50%" text-anchor="middle">no points</text>'])
    xs, ys = _span([p[x] for p in points]), _span([p[y] for p in points])
    body = _axes(xlabel, ylabel, xs, ys)
    if line_key:
        on = sorted((p for p in points if p.get(line_key)), key=lambda p: p[x])
        if len(on) > 1:
            path = " ".join(f"{_x(p[x], xs):.1f},{_y(p[y], ys):.1f}" for p in on)
            body.append(f'<polyline points="{path}" fill="none" stroke="{PALETTE["front"]}" stroke-width="1.5"/>')
    for p in points:
        tip = escape(p.get("label", "")) + f" ({_fmt(p[x])}, {_fmt(p[y])})"
        body.append(f'<circle class="pt" cx="{_x(p[x], xs):.1f}" cy="{_y(p[y], ys):.1f}" r="{p.get("r", 4)}" '
                    f'fill="{p.get("color", PALETTE["quant"])}" fill-opacity="0.8"><title>{tip}</title></circle>')
    return _frame(title, plot_id, body)


def _color(v: float, lo: float, hi: float) -> str:
    """Pale yellow (lo) to dark red (hi)."""
    t = 0.0 if hi <= lo else max(0.0, min(1.0, (v - lo) / (hi - lo)))
    return f"rgb({int(255 - 90 * t)},{int(245 - 200 * t)},{int(200 - 175 * t)})"


def heatmap(plot_id: str, title: str, rows: Sequence[str], cols: Sequence[str],
            values: dict[tuple[str, str], float], note: str = "") -> str:
    """One rect per known (row, col) value, coloured by log10 of the value; unknown cells stay blank."""
    cell_w, cell_h, left, top = max(12, min(40, 560 // max(len(cols), 1))), 12, 230, 110
    width = max(W, left + cell_w * len(cols) + 20)
    height = top + cell_h * len(rows) + 30
    logs = {k: math.log10(max(v, 1e-9)) for k, v in values.items()}
    lo, hi = (min(logs.values()), max(logs.values())) if logs else (0.0, 1.0)
    body = [f'<text x="{left}" y="36" class="tick">{escape(note)} colour: log10 damage, '
            f'{_fmt(10 ** lo)} (pale) to {_fmt(10 ** hi)} (dark red)</text>']
    for j, c in enumerate(cols):
        cx = left + j * cell_w + cell_w / 2
        body.append(f'<text x="{cx:.0f}" y="{top - 6}" transform="rotate(-60 {cx:.0f} {top - 6})" '
                    f'class="tick">{escape(c)}</text>')
    for i, r in enumerate(rows):
        y = top + i * cell_h
        body.append(f'<text x="{left - 4}" y="{y + cell_h - 2}" text-anchor="end" class="tick">{escape(r)}</text>')
        for j, c in enumerate(cols):
            if (r, c) in values:
                body.append(f'<rect class="pt" x="{left + j * cell_w}" y="{y}" width="{cell_w - 1}" '
                            f'height="{cell_h - 1}" fill="{_color(logs[(r, c)], lo, hi)}">'
                            f'<title>{escape(r)} / {escape(c)}: {_fmt(values[(r, c)])}</title></rect>')
    return _frame(title, plot_id, body, width, height)


def bars(plot_id: str, title: str, items: Sequence[tuple[str, float, str]], ylabel: str,
         horizontal_labels: bool = False) -> str:
    """One bar per (label, value, colour)."""
    if not items:
        return _frame(title, plot_id, ['<text x="50%" y="50%" text-anchor="middle">no data</text>'])
    width = max(W, L + R + 14 * len(items))
    height = H + (0 if horizontal_labels else 120)
    bottom = B if horizontal_labels else B + 120
    ys = (0.0, max(v for _, v, _ in items) * 1.05 or 1.0)
    step = (width - L - R) / len(items)
    body = [f'<line x1="{L}" y1="{height - bottom}" x2="{width - R}" y2="{height - bottom}" class="axis"/>',
            f'<text x="14" y="{height / 2:.0f}" text-anchor="middle" transform="rotate(-90 14 {height / 2:.0f})">'
            f'{escape(ylabel)}</text>']
    for v in _ticks(*ys):
        yv = height - bottom - v / ys[1] * (height - T - bottom)
        body.append(f'<text x="{L - 6}" y="{yv + 4:.1f}" text-anchor="end" class="tick">{_fmt(v)}</text>')
    for i, (label, value, colour) in enumerate(items):
        h = value / ys[1] * (height - T - bottom)
        x = L + i * step
        body.append(f'<rect class="pt" x="{x + 1:.1f}" y="{height - bottom - h:.1f}" width="{max(step - 2, 1):.1f}" '
                    f'height="{h:.1f}" fill="{colour}"><title>{escape(label)}: {_fmt(value)}</title></rect>')
        lx, ly = x + step / 2, height - bottom + 12
        rotate = "" if horizontal_labels else f' transform="rotate(-60 {lx:.1f} {ly})" text-anchor="end"'
        anchor = ' text-anchor="middle"' if horizontal_labels else ""
        body.append(f'<text x="{lx:.1f}" y="{ly}"{rotate}{anchor} class="tick">{escape(label)}</text>')
    return _frame(title, plot_id, body, int(width), height)


def histogram(plot_id: str, title: str, values: Sequence[float], xlabel: str, bins: int = 20) -> str:
    """Counts of `values` in `bins` equal bins, one bar per bin."""
    if not values:
        return _frame(title, plot_id, ['<text x="50%" y="50%" text-anchor="middle">no data</text>'])
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    items = [(f"{_fmt(lo + i * width)}", float(c), PALETTE["quant"]) for i, c in enumerate(counts)]
    return bars(plot_id, f"{title} ({len(values)} values, bins of {_fmt(width)} from {_fmt(lo)})", items,
                f"count; x: {xlabel}")
