"""modelpress: compress trained PyTorch models for CPUs and edge devices, and store them model-aware.

    import modelpress
    model = modelpress.load_sentence_encoder("minilm")
    modelpress.compress(model, "int4")
    modelpress.save(model, "out/minilm-int4")
    same = modelpress.load("out/minilm-int4")
"""

from modelpress._version import __version__

from modelpress import passes as _passes  # noqa: F401  (registers the built-in passes)
from modelpress.compress import compress, resolve_recipe
from modelpress.errors import ModelpressError
from modelpress.formats.checkpoint import load, save
from modelpress.formats.hf import load_sentence_encoder
from modelpress.presets import PRESETS, preset
from modelpress.recipe import Recipe, Selector, Stage

__all__ = [
    "__version__",
    "compress",
    "load",
    "load_sentence_encoder",
    "save",
    "preset",
    "resolve_recipe",
    "PRESETS",
    "Recipe",
    "Selector",
    "Stage",
    "ModelpressError",
]
