"""One self-contained HTML page: inline CSS, inline SVG plots, tables, and the JSON behind them in a
<script type="application/json"> element (data, never run). No script runs and nothing is fetched, so
the page opens offline and under any content-security policy."""

from __future__ import annotations

import json
from html import escape
from typing import Any, Sequence

__all__ = ["MAX_REPORT_BYTES", "page", "table"]

MAX_REPORT_BYTES = 2 << 20  # a report must stay small enough to mail: per-input lists are cut to fit

_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
svg.plot{border:1px solid #eee;margin:6px 0;background:#fff}svg text{font-size:11px;fill:#333}
svg text.title{font-size:13px;font-weight:600}svg text.tick{font-size:9px;fill:#555}
svg line.axis{stroke:#888;stroke-width:1}.note{color:#555;font-size:13px}details{margin-top:20px}"""


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _json_script(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # cannot close the element
    return f'<script type="application/json" id="report-data">{text}</script>'


def page(title: str, sections: Sequence[tuple[str, str]], data: Any, note: str = "") -> str:
    """The page: a title, (heading, html) sections, and `data` embedded as JSON."""
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>"]
    if note:
        parts.append(f'<p class="note">{escape(note)}</p>')
    for heading, html in sections:
        parts.append(f"<section><h2>{escape(heading)}</h2>{html}</section>")
    parts.append("<details><summary>the JSON behind this report (also in the element #report-data)</summary>"
                 '<p class="note">Read it with JSON.parse(document.getElementById("report-data").textContent).</p>'
                 "</details>")
    parts.append(_json_script(data))
    parts.append("</body></html>")
    return "".join(parts)
