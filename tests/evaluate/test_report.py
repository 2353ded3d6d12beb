"""The one report table: the encoder evaluation's rows (as the CLI printed them before the table was
shared) and the size rows every report opens with."""

from __future__ import annotations

import io

from rich.console import Console

from modelpress.evaluate.fidelity import Fidelity
from modelpress.evaluate.latency import Latency
from modelpress.evaluate.report import Evaluation, report_table, size_rows
from modelpress.evaluate.size import LayerSize, SizeReport


def _size(nbytes: int, params: int = 1000) -> SizeReport:
    return SizeReport((LayerSize("w", "float32", (params,), params, nbytes),))


def _evaluation(latency: bool) -> Evaluation:
    return Evaluation(
        name="demo", size=_size(1000), original_size=_size(4000),
        fidelity=Fidelity(mean_cosine=0.99871, p1_cosine=0.98, min_cosine=0.9, overlap_at_10=0.9123, n_sentences=50,
                          n_queries=20),
        latency=Latency(0.5, (0.5,), 2, 8) if latency else None,
        original_latency=Latency(1.0, (1.0,), 2, 8) if latency else None,
    )


def test_size_rows():
    assert size_rows(_size(4000), _size(1000)) == [("tensor bytes", "0.0 MB", "0.0 MB", "25.0%"),
                                                   ("bits per weight", "32.00", "8.00", "")]
    rows = size_rows(_size(4000), _size(1000), 8_000_000, 2_000_000)
    assert rows[0] == ("weights file", "8.0 MB", "2.0 MB", "25.0%")


def test_encoder_rows():
    rows = _evaluation(latency=True).rows()
    assert ("mean cosine", "1", "0.9987", "") in rows
    assert ("overlap@10 (20 queries)", "1", "0.912", "") in rows
    assert rows[-1] == ("latency, 8 sentences, 2 threads", "1.00 s", "0.50 s", "0.50x")
    assert not any(r[0].startswith("latency") for r in _evaluation(latency=False).rows())


def test_report_table_renders_every_row():
    out = io.StringIO()
    Console(file=out, width=140).print(report_table(_evaluation(latency=True), 4_000_000, 1_000_000))
    text = out.getvalue()
    assert "modelpress report: demo" in text
    for metric in ("weights file", "tensor bytes", "bits per weight", "mean cosine", "1st-percentile cosine",
                   "overlap@10", "latency"):
        assert metric in text
