"""Byte codecs: lossless bytes -> bytes transforms, each a small frozen dataclass behind one ABC,
registered by the name that chunk files and catalogues record (zarr v3's shape).

    raw      the bytes themselves
    aligned  the bytes themselves on a page boundary of the chunk file, with their XXH3-128 (mapped on load)
    zstd     one zstd frame
    planes   float byte planes (sign rotated to bit 0), each zstd-coded or raw
    fans     float byte planes coded with static rANS (C extension, where built)
    xor      an exact delta against a base chunk of the same size, stored as planes

This is the bottom layer of modelpress's data path: it imports nothing of modelpress but errors.
The store and checkpoints (formats/entropy.py) use it.
"""

from modelpress.codecs.base import ELEMENT_WIDTHS, Codec, codec_class, codec_from, codec_names, register

# (imported in this order, so that codec_names() lists them so: raw, aligned, zstd, planes, xor, fans, grid)
from modelpress.codecs.raw import ALIGNMENTS, DEFAULT_ALIGN, Aligned, Raw  # noqa: I001
from modelpress.codecs.zstd import Zstd
from modelpress.codecs.planes import Planes, Xor
from modelpress.codecs.fans import NATIVE_AVAILABLE, Fans
from modelpress.codecs.grid import Grid
from modelpress.codecs.choose import MIN_SAVING, choose, delta_codec, pays

__all__ = ["Codec", "register", "codec_class", "codec_from", "codec_names", "ELEMENT_WIDTHS", "MIN_SAVING",
           "pays", "choose", "delta_codec", "NATIVE_AVAILABLE", "Raw", "Aligned", "Zstd", "Planes", "Xor", "Fans", "Grid",
           "ALIGNMENTS", "DEFAULT_ALIGN"]
