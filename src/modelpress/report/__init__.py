"""Reports people would rather look at than read: one self-contained HTML file (inline SVG plots, the JSON
behind them, no script, no network) of a search run, a compressed checkpoint or a store.

The files: svg.py (scatter, heatmap, bars, histogram as SVG text), page.py (the page and its embedded JSON),
search_report.py (a joint search run), other_reports.py (a checkpoint, a store).
"""

from modelpress.report.other_reports import model_report_html, store_data, store_report_html
from modelpress.report.search_report import search_report_html

__all__ = ["model_report_html", "search_report_html", "store_data", "store_report_html"]
