"""One base error for everything a user can get wrong; subclasses also inherit the builtin that fits.

Every message says what failed, why, and what to do about it, on one line, so the CLI can print
it as is and exit non-zero without a traceback.
"""

from __future__ import annotations

__all__ = [
    "ModelpressError",
    "ConfigError",
    "RecipeError",
    "ModelNotFoundError",
    "FormatError",
    "UnsupportedError",
    "CalibrationError",
    "OutputExistsError",
]


class ModelpressError(Exception):
    """Base of every error modelpress raises on purpose."""


class ConfigError(ModelpressError, ValueError):
    """A configuration value is out of range or inconsistent (bits, group size, sparsity...)."""


class RecipeError(ConfigError):
    """A recipe or preset could not be parsed or names something that does not exist."""


class ModelNotFoundError(ModelpressError, FileNotFoundError):
    """A model path is missing or holds no weights modelpress can read."""


class FormatError(ModelpressError, ValueError):
    """A file modelpress reads is truncated, tampered with, or from an unknown format version."""


class UnsupportedError(ModelpressError, NotImplementedError):
    """A layer or combination that modelpress cannot handle (yet)."""


class CalibrationError(ModelpressError, ValueError):
    """Calibration data is empty, malformed, or produces non-finite statistics."""


class OutputExistsError(ModelpressError, FileExistsError):
    """An output path already exists and overwriting was not asked for."""
