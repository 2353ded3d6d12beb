"""A reader of `fans` payloads written in plain Python from the Fans docstring (codecs/fans.py), so that the
spec and the C code cannot drift apart. Its checks are asserts: it is for payloads already known to decode."""

from __future__ import annotations

import bisect

import numpy as np

RAW, CONST, ORDER0, JOINT, LOW6 = range(5)


def _u32(b: bytes, pos: int) -> int:
    return int.from_bytes(b[pos:pos + 4], "little")


def _freq(b: bytes, pos: int) -> tuple[int, int]:
    v = b[pos]
    if v & 0x80:
        return ((v & 0x7F) << 8 | b[pos + 1]) + 1, pos + 2
    return v + 1, pos + 1


def _order0_table(b: bytes, pos: int) -> tuple[list[int], int]:
    k = b[pos]
    bins, nbytes = 1 << k, ((1 << k) + 7) // 8
    bitmap, pos = b[pos + 1:pos + 1 + nbytes], pos + 1 + nbytes
    u = [0] * bins
    for i in range(bins):
        if bitmap[i // 8] >> (i % 8) & 1:
            u[i], pos = _freq(b, pos)
    assert sum(u) == 1 << (4 + k)
    return [u[s >> (8 - k)] for s in range(256)], pos


def _joint_table(b: bytes, pos: int) -> tuple[list[int], int]:
    bitmap, pos = b[pos:pos + 32], pos + 32
    f = [0] * 1024
    for t in range(256):
        if bitmap[t // 8] >> (t % 8) & 1:
            mask, pos = b[pos], pos + 1
            for h in range(4):
                if mask >> h & 1:
                    f[t << 2 | h], pos = _freq(b, pos)
    assert sum(f) == 4096 and max(f) <= 2048
    return f, pos


def _rans(b: bytes, pos: int, freq: list[int], n: int) -> tuple[list[int], int]:
    length = _u32(b, pos)
    data, end = b[pos + 4:pos + 4 + length], pos + 4 + length
    states = [_u32(data, 4 * j) for j in range(32)]
    words = [int.from_bytes(data[i:i + 2], "little") for i in range(128, length, 2)]
    present = [s for s, f in enumerate(freq) if f]
    starts = list(np.cumsum([0] + [freq[s] for s in present[:-1]]))
    out, w = [], 0
    for i in range(n):
        x = states[i % 32]
        slot = x % 4096
        j = bisect.bisect_right(starts, slot) - 1
        s = present[j]
        x = freq[s] * (x >> 12) + slot - starts[j]
        if x < 1 << 15:
            x = x << 16 | words[w]
            w += 1
        states[i % 32] = x
        out.append(s)
    assert w == len(words) and states == [1 << 15] * 32
    return out, end


def reference_decode(payload: bytes, width: int) -> bytes:
    """Decode a fans payload following FansCodec's docstring, in plain Python."""
    assert payload[0] == 1 and payload[1] == width
    n, pos, planes, joint = _u32(payload, 2), 6, [], None
    for _ in range(width):
        mode, pos = payload[pos], pos + 1
        if mode == RAW:
            planes.append(list(payload[pos:pos + n]))
            pos += n
        elif mode == CONST:
            planes.append([payload[pos]] * n)
            pos += 1
        elif mode == ORDER0:
            freq, pos = _order0_table(payload, pos)
            symbols, pos = _rans(payload, pos, freq, n)
            planes.append(symbols)
        elif mode == JOINT:
            freq, pos = _joint_table(payload, pos)
            joint, pos = _rans(payload, pos, freq, n)
            planes.append([s >> 2 for s in joint])
        else:
            assert mode == LOW6 and joint is not None
            size = (6 * n + 7) // 8
            bits = int.from_bytes(payload[pos:pos + size], "little")
            planes.append([(joint[i] & 3) << 6 | (bits >> (6 * i)) & 63 for i in range(n)])
            pos += size
    assert pos == len(payload)
    out = bytearray()
    for i in range(n):
        y = 0
        for plane in planes:
            y = y << 8 | plane[i]
        if width > 1:
            y = y >> 1 | (y & 1) << (8 * width - 1)
        out += y.to_bytes(width, "little")
    return bytes(out)


def plane_modes(payload: bytes, width: int) -> list[int]:
    """The mode byte of each plane record."""
    n, pos, modes = _u32(payload, 2), 6, []
    for _ in range(width):
        mode = payload[pos]
        modes.append(mode)
        pos += 1
        if mode in (RAW, CONST, LOW6):
            pos += {RAW: n, CONST: 1, LOW6: (6 * n + 7) // 8}[mode]
        else:
            _, pos = (_order0_table if mode == ORDER0 else _joint_table)(payload, pos)
            pos += 4 + _u32(payload, pos)
    return modes
