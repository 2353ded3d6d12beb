"""modelpress: compress trained PyTorch models for CPUs and edge devices, and store them model-aware."""

__version__ = "0.1.0"
