"""Every error modelpress raises on purpose: one base, a small enumerated set of subclasses.

Each subclass also inherits the builtin that fits (ValueError, KeyError, FileNotFoundError, ...), so
callers that already catch those keep working. Every message says what failed, why, and what to do
about it, on one line, so the CLI can print it as is and exit non-zero without a traceback.
"""

from __future__ import annotations

__all__ = [
    "ModelpressError",
    "ConfigError",
    "RecipeError",
    "ModelNotFoundError",
    "FormatError",
    "IntegrityError",
    "CorruptChunkError",
    "NotRegularFileError",
    "LimitExceededError",
    "UnsupportedError",
    "CalibrationError",
    "OutputExistsError",
    "UnsafeOutputError",
    "StorageIOError",
    "StoreError",
    "VersionNotFoundError",
    "MissingChunkError",
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
    """A file modelpress reads is truncated, malformed, or from an unknown format version."""


class IntegrityError(FormatError):
    """Bytes do not match the hash recorded for them (bit rot, tampering, a partial copy)."""


class CorruptChunkError(IntegrityError):
    """A store chunk's bytes do not hash to its name, or its header disagrees with the catalogue."""


class NotRegularFileError(FormatError):
    """A FIFO, device, socket, folder or symbolic link stands where a regular file should be."""


class LimitExceededError(FormatError, MemoryError):
    """A declared size, nesting depth or allocation exceeds a sane limit or the memory available.

    Raised *before* the allocation or parse it guards, so no MemoryError or RecursionError escapes.
    """


class UnsupportedError(ModelpressError, NotImplementedError):
    """A layer or combination that modelpress cannot handle (yet)."""


class CalibrationError(ModelpressError, ValueError):
    """Calibration data is empty, malformed, or produces non-finite statistics."""


class OutputExistsError(ModelpressError, FileExistsError):
    """An output path already exists and overwriting was not asked for."""


class UnsafeOutputError(ModelpressError, ValueError):
    """An output path that modelpress refuses to write or replace (it holds a source, a store, or
    something modelpress did not write)."""


class StorageIOError(ModelpressError, OSError):
    """The operating system failed a read, write or fsync (disk full, I/O error); nothing already
    stored was changed."""


class StoreError(ModelpressError):
    """A store operation failed for a reason the user can act on."""


class VersionNotFoundError(StoreError, KeyError):
    """A model, version, ref or tensor name is not in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingChunkError(StoreError, FileNotFoundError):
    """A chunk the catalogue lists has no file in the store."""
