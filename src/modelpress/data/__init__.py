"""Data that code builds: deterministic English sentences from the standard library (no downloads)."""
