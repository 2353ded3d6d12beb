"""Which codec a writer uses for a chunk when nobody asked for one, and when coding pays at all."""

from __future__ import annotations

from modelpress.codecs.base import Codec
from modelpress.codecs.fans import NATIVE_AVAILABLE, Fans
from modelpress.codecs.grid import Grid
from modelpress.codecs.planes import Planes, Xor
from modelpress.codecs.raw import Raw
from modelpress.codecs.zstd import Zstd

__all__ = ["MIN_SAVING", "pays", "choose", "delta_codec"]

MIN_SAVING = 0.02  # a coded form must save 2% over the raw bytes to be worth its decode time


def pays(coded: int, raw: int) -> bool:
    """Whether `coded` bytes save at least MIN_SAVING of `raw` bytes."""
    return coded <= (1 - MIN_SAVING) * raw


def choose(sample: memoryview, width: int, floating: bool) -> Codec:
    """The smallest candidate on a sample chunk, or `raw` when none pays for its decoding.

    Floats: `fans` where it is built (width 2 or 4) else `planes`, and `zstd`; anything else `zstd`.
    `fans` replaces `planes` where built: it is smaller on anything weight-sized, and on tiny chunks
    (a LayerNorm's 1.5 KB), where `planes` can win by a few bytes, it decodes some 20x faster
    (measured: 5 vs 109 us per chunk). float32 or bfloat16 whose groups of 32 lie on a 4- or 8-bit grid
    (weights dequantised from GGUF or GPTQ blocks) is offered `grid` too.
    """
    candidates: list[Codec] = [Zstd()]
    if floating:
        candidates.insert(0, Fans(width) if NATIVE_AVAILABLE and width in (2, 4) else Planes(width))
        grid = Grid.probe(sample, width)  # float32/bfloat16 on a quantisation grid (a dequantised checkpoint)
        if grid is not None:
            candidates.append(grid)
    sizes = {codec: len(codec.encode(sample)) for codec in candidates}
    best = min(sizes, key=sizes.get)
    return best if pays(sizes[best], len(sample)) else Raw()


def delta_codec(width: int) -> Codec:
    """The codec of a chunk stored as an exact delta against a base chunk (a parent version's)."""
    return Xor(width)
