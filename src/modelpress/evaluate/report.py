"""The evaluation of a compressed sentence encoder against its original: size, fidelity, latency,
and an optional task metric from a user callable; and the one table every evaluation renders to
(`report_table`: metric | original | compressed | ratio, from the evaluation's `rows()`), which the
causal-LM evaluation (evaluate/llm.py) shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from rich.table import Table

from modelpress.evaluate.fidelity import Fidelity, fidelity
from modelpress.evaluate.latency import Latency, measure_latency
from modelpress.evaluate.size import SizeReport, size_report

__all__ = ["Evaluation", "Row", "evaluate_encoder", "encode_with_progress", "report_table", "size_rows"]

Row = tuple[str, str, str, str]  # metric, original, compressed, ratio


@dataclass(frozen=True)
class Evaluation:
    name: str
    size: SizeReport
    original_size: SizeReport
    fidelity: Fidelity
    latency: Latency | None = None
    original_latency: Latency | None = None
    task: dict[str, float] = field(default_factory=dict)  # {"original": x, "compressed": y}
    file_bytes: int | None = None
    original_file_bytes: int | None = None

    @property
    def size_ratio(self) -> float:
        """Compressed bytes / original bytes (files when known, else tensor bytes)."""
        if self.file_bytes and self.original_file_bytes:
            return self.file_bytes / self.original_file_bytes
        return self.size.bytes / max(self.original_size.bytes, 1)

    @property
    def latency_ratio(self) -> float | None:
        if self.latency is None or self.original_latency is None:
            return None
        return self.latency.median_s / self.original_latency.median_s

    def rows(self, original_file_bytes: int | None = None, file_bytes: int | None = None) -> list[Row]:
        """The report's rows: size, fidelity and (when measured) latency."""
        rows = size_rows(self.original_size, self.size, original_file_bytes, file_bytes)
        f = self.fidelity
        rows += [("mean cosine", "1", f"{f.mean_cosine:.4f}", ""),
                 ("1st-percentile cosine", "1", f"{f.p1_cosine:.4f}", ""),
                 (f"overlap@10 ({f.n_queries} queries)", "1", f"{f.overlap_at_10:.3f}", "")]
        if self.latency is not None and self.original_latency is not None:
            rows.append((f"latency, {self.latency.n_sentences} sentences, {self.latency.threads} threads",
                         f"{self.original_latency.median_s:.2f} s", f"{self.latency.median_s:.2f} s",
                         f"{self.latency_ratio:.2f}x"))
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bytes": self.size.bytes,
            "original_bytes": self.original_size.bytes,
            "file_bytes": self.file_bytes,
            "original_file_bytes": self.original_file_bytes,
            "size_ratio": self.size_ratio,
            "bits_per_weight": self.size.bits_per_weight,
            "fidelity": self.fidelity.to_dict(),
            "latency_s": None if self.latency is None else self.latency.median_s,
            "original_latency_s": None if self.original_latency is None else self.original_latency.median_s,
            "latency_ratio": self.latency_ratio,
            "task": dict(self.task),
        }


class _Reported(Protocol):
    name: str

    def rows(self, original_file_bytes: int | None = None, file_bytes: int | None = None) -> list[Row]: ...


def report_table(evaluation: _Reported, original_file_bytes: int | None = None,
                 file_bytes: int | None = None) -> Table:
    """The report of any evaluation (encoder or causal LM) as one table: metric, original, compressed, ratio."""
    table = Table(title=f"modelpress report: {evaluation.name}", show_header=True)
    table.add_column("metric")
    for column in ("original", "compressed", "ratio"):
        table.add_column(column, justify="right")
    for row in evaluation.rows(original_file_bytes, file_bytes):
        table.add_row(*row)
    return table


def size_rows(original: SizeReport, compressed: SizeReport, original_file_bytes: int | None = None,
              file_bytes: int | None = None) -> list[Row]:
    """The rows every report opens with: the weights file (when known), tensor bytes and bits per weight."""
    rows: list[Row] = []
    if original_file_bytes and file_bytes:
        rows.append(("weights file", f"{original_file_bytes / 1e6:.1f} MB", f"{file_bytes / 1e6:.1f} MB",
                     f"{file_bytes / original_file_bytes:.1%}"))
    rows.append(("tensor bytes", f"{original.bytes / 1e6:.1f} MB", f"{compressed.bytes / 1e6:.1f} MB",
                 f"{compressed.bytes / max(original.bytes, 1):.1%}"))
    rows.append(("bits per weight", f"{original.bits_per_weight:.2f}", f"{compressed.bits_per_weight:.2f}", ""))
    return rows


def encode_with_progress(encoder, sentences: Sequence[str], advance: Callable[[int], None] | None = None,
                         chunk: int = 256) -> torch.Tensor:
    """encoder.encode over chunks, reporting progress; same result as one call (batches never span chunks
    differently in a way that changes values: each sentence is encoded independently of its batch-mates
    apart from padding, which the attention mask neutralises)."""
    parts = []
    for start in range(0, len(sentences), chunk):
        part = list(sentences[start:start + chunk])
        parts.append(encoder.encode(part))
        if advance:
            advance(len(part))
    return torch.cat(parts) if parts else torch.empty(0, 0)


def evaluate_encoder(
    original,
    compressed,
    sentences: Sequence[str],
    name: str = "compressed",
    latency_sentences: Sequence[str] | None = None,
    threads: int = 2,
    repeats: int = 3,
    task: Callable[[Any], float] | None = None,
    reference: torch.Tensor | None = None,
    advance: Callable[[int], None] | None = None,
) -> Evaluation:
    """Compare `compressed` against `original` on `sentences` (and time both on `latency_sentences`)."""
    ref = reference if reference is not None else encode_with_progress(original, sentences, advance)
    got = encode_with_progress(compressed, sentences, advance)
    lat = orig_lat = None
    if latency_sentences:
        batch = list(latency_sentences)
        orig_lat = measure_latency(original.encode, batch, threads=threads, repeats=repeats)
        lat = measure_latency(compressed.encode, batch, threads=threads, repeats=repeats)
    scores = {}
    if task is not None:
        scores = {"original": float(task(original)), "compressed": float(task(compressed))}
    return Evaluation(
        name=name,
        size=size_report(compressed),
        original_size=size_report(original),
        fidelity=fidelity(ref, got),
        latency=lat,
        original_latency=orig_lat,
        task=scores,
    )
