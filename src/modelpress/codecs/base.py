"""The codec interface: one ABC, codecs as small frozen dataclasses, registered by the name files record.

A codec turns a chunk's raw bytes into its stored payload and back, losslessly. Its parameters
(an element width, an alignment, a check value) are the dataclass's fields: `params()` is what a
file records beside the name, and `from_params` rebuilds the codec from a file, checking every
field (files may be hostile), so a codec object is always valid. `decode_into` writes into a
caller-owned buffer of exactly the decoded size (a slice of a load arena): decoding never
allocates more than that output, whatever the payload says.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import functools
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from modelpress.errors import FormatError

__all__ = ["Codec", "register", "codec_class", "codec_from", "codec_names", "ELEMENT_WIDTHS", "check_width"]

ELEMENT_WIDTHS = (1, 2, 4, 8)  # element sizes (bytes) of the dtypes a store holds

_REGISTRY: dict[str, type["Codec"]] = {}
C = TypeVar("C", bound=type["Codec"])


@dataclass(frozen=True)
class Codec(ABC):
    """A bytes -> bytes codec with its parameters. Subclasses set the class attributes below."""

    name: ClassVar[str]
    verbatim: ClassVar[bool] = False  # the payload is the raw bytes themselves (a reader may copy or map it)
    delta: ClassVar[bool] = False  # decoding needs the raw bytes of a base chunk of the same size
    per_tensor: ClassVar[bool] = True  # a writer may ask for it by name for a tensor (False: chosen per chunk)
    page_aligned: ClassVar[bool] = False  # its payloads sit on page boundaries to be mapped: never stored as deltas

    @property
    def alignment(self) -> int:
        """The payload starts at a multiple of this many bytes in a chunk file (1: right after the header)."""
        return 1

    def params(self) -> dict[str, Any]:
        """The parameters a file records beside the codec's name."""
        return {name: getattr(self, name) for name in _field_names(type(self))}

    @classmethod
    def from_params(cls, params: Any) -> "Codec":
        """The codec a file describes; FormatError unless `params` are exactly this codec's, each valid."""
        names = _field_names(cls)
        if not isinstance(params, dict) or params.keys() != set(names):
            raise FormatError(f"codec {cls.name!r} takes parameters {sorted(names)}, the file gives {params!r}; "
                              "run `modelpress store verify`")
        return cls(**params)

    @classmethod
    def for_data(cls, raw: memoryview, width: int) -> "Codec":
        """This codec with the parameters to encode `raw`, whose elements are `width` bytes wide."""
        return cls()

    def check(self, raw: memoryview) -> bool | None:
        """A cheap integrity check of decoded bytes that the parameters carry (None: the codec has none)."""
        return None

    def declared_size(self, payload: memoryview) -> int | None:
        """The decoded size the payload itself states, read from its first bytes (None: it states none), so a
        reader can refuse a payload that disagrees with its catalogue row before allocating the output."""
        return None

    @abstractmethod
    def encode(self, raw: memoryview, base: memoryview | None = None) -> bytes:
        """The stored payload for `raw` (`base`: the base chunk's raw bytes, for a delta codec)."""

    @abstractmethod
    def decode_into(self, payload: memoryview, out: memoryview, base: memoryview | None = None) -> None:
        """Write the raw bytes into `out`, exactly len(out) bytes; FormatError if the payload does not
        decode to exactly that."""


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    """A codec's parameter names (its dataclass fields), looked up once per class: a load asks per chunk."""
    return tuple(f.name for f in fields(cls))


def check_width(codec: str, width: Any, allowed: tuple[int, ...] = ELEMENT_WIDTHS) -> None:
    if type(width) is not int or width not in allowed:
        raise FormatError(f"codec parameter width={width!r} is invalid for {codec}; expected one of {allowed}")


def register(cls: C) -> C:
    """Class decorator: make a codec known by its `name` (the name written in chunk files and catalogues)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"codec {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def codec_class(name: Any) -> type[Codec]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise FormatError(f"unknown codec {name!r} (known: {sorted(_REGISTRY)}); the store was written by a "
                          "newer modelpress: upgrade modelpress")
    return _REGISTRY[name]


def codec_from(name: Any, params: Any) -> Codec:
    """The codec a file or catalogue row names, with its parameters checked."""
    return codec_class(name).from_params(params)


def codec_names(per_tensor_only: bool = False) -> tuple[str, ...]:
    return tuple(n for n, c in _REGISTRY.items() if c.per_tensor or not per_tensor_only)
