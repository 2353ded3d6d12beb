"""modelpress: compress trained PyTorch models for CPUs and edge devices, and store them model-aware.

    import modelpress
    from modelpress import GPTQConfig

    model = modelpress.load_model("minilm")        # or "smollm2", a .gguf file, a Hugging Face folder
    modelpress.compress(model, GPTQConfig(bits=4, group_size=64), calibration=modelpress.calibration_sentences(128))
    modelpress.save(model, "out/minilm-gptq")
    same = modelpress.load("out/minilm-gptq")      # a SentenceEncoder (encode) or a CausalLM (generate)

This module only re-exports: the one verb (`compress`), the configs it takes, recipes and
presets, checkpoints, exports (`export(model, "gguf", "model.gguf")`), the store, and the error base class.
"""

from modelpress._version import __version__
from modelpress.calibration import calibration_sentences
from modelpress.compress import compress
from modelpress.errors import ModelpressError
from modelpress.exports import export_model as export
from modelpress.formats.causal_lm import CausalLM
from modelpress.formats.checkpoint import load, save
from modelpress.formats.hf import SentenceEncoder, load_sentence_encoder
from modelpress.formats.models import load_model
from modelpress.nn.provenance import provenance
from modelpress.passes import (AWQConfig, DynamicInt8Config, GPTQConfig, GradualConfig, KMeansConfig, LowRankConfig,
                               MagnitudeConfig, PassConfig, PruneChannelsConfig, PruneFFNConfig, PruneHeadsConfig,
                               QATConfig, RangeSearch, RTNConfig, SimplifyConfig, SparseGPTConfig, WandaConfig,
                               WeightQuant)
from modelpress.presets import preset, preset_names
from modelpress.recipe import Recipe, Selector, Stage
from modelpress.store import Store

__all__ = [
    "__version__",
    # the verb, and what it takes: one config per technique (quantisers nest a WeightQuant), a recipe, a preset
    "compress", "calibration_sentences",
    "PassConfig", "WeightQuant", "RangeSearch",
    "RTNConfig", "DynamicInt8Config", "GPTQConfig", "AWQConfig", "QATConfig",  # quantisation
    "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "GradualConfig",  # pruning
    "PruneFFNConfig", "PruneHeadsConfig", "PruneChannelsConfig",  # structured pruning
    "KMeansConfig", "LowRankConfig", "SimplifyConfig",  # weight sharing, factorisation, graph simplification
    "Recipe", "Selector", "Stage", "preset", "preset_names",
    # models in and out
    "load", "load_model", "load_sentence_encoder", "save", "export", "provenance", "Store", "CausalLM", "SentenceEncoder",
    "ModelpressError",
]
