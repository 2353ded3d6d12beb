"""No bombs: sizes a store declares (catalogue raw sizes, shapes, the sizes payloads state, repeated chunk
listings) are checked against sane limits and the memory available *before* anything is allocated, so a
small container that declares a huge output ends in LimitExceededError (or CorruptChunkError when it
contradicts itself) with a few MB of memory used, never a MemoryError or the kernel's OOM killer; and a
legitimate repetition still loads. Every other version reads back and verifies afterwards."""

from __future__ import annotations

import json
import mmap
import os

import pytest
import torch
import zstandard

from _store_hostile import Victim, forge, victim  # noqa: F401  (victim: the fixture)
from modelpress import limits
from modelpress.codecs import Fans, Zstd
from modelpress.errors import CorruptChunkError, FormatError, LimitExceededError, ModelpressError
from modelpress.store import Store, loader
from modelpress.store.objects import MAX_CHUNK_RAW, chunk_id
from modelpress.store.rows import ChunkRow

FAKE = "f" * 64  # an id nothing hashes to: these containers are refused long before any hash is checked
MB = 1 << 20


def constant_fans(n: int, width: int = 4, value: int = 0x3F) -> bytes:
    """A fans payload of n elements whose every plane is constant: 6 + 2 * width bytes for any n."""
    return bytes([1, width]) + n.to_bytes(4, "little") + bytes([1, value]) * width


def zstd_of_zeros(size: int) -> bytes:
    """A zstd frame of `size` zero bytes (declaring its size), made without holding them in memory."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    block = bytes(MB)
    return b"".join(compressor.compress(block) for _ in range(size // MB)) + compressor.flush()


def _peak_kib() -> int:
    """This process's peak resident set since the last reset (VmHWM of /proc/self/status), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("/proc/self/status has no VmHWM line")


def peak_growth(fn) -> tuple[int, str]:
    """Run `fn` in a forked child: how far its peak resident memory grew (bytes), and how it ended. `fn` must not
    run torch kernels that use OpenMP threads (they do not survive a fork); the store's reads do not."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        outcome = "returned"
        # the peak of this address space (VmHWM), reset to the current size first: ru_maxrss may also carry a
        # peak the parent process recorded (in a full run, one that held a large model), hiding every allocation
        # below it
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = _peak_kib()
        try:
            fn()
        except BaseException as exc:  # reported to the parent, which asserts on it
            outcome = type(exc).__name__
        grown = (_peak_kib() - before) * 1024
        os.write(write_end, json.dumps([grown, outcome]).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        grown, outcome = json.loads(fh.read())
    os.waitpid(pid, 0)
    return grown, outcome


def test_peak_growth_sees_a_real_allocation():
    def allocate():  # fresh pages (a malloc may reuse memory a long session freed but kept); no torch kernels
        region = mmap.mmap(-1, 256 * MB)
        region.write(b"\x01" * (256 * MB))
        region.close()

    grown, outcome = peak_growth(allocate)
    assert outcome == "returned" and grown >= 200 * MB


def refused_before_allocation(victim: Victim, read, error: type, match: str | None = None) -> None:
    """`read(store)` ends in `error` while the peak memory grows by less than 64 MB; then the store's versions
    still read back and verify (verify reporting only the forged chunk)."""
    with Store(victim.root) as s:
        grown, outcome = peak_growth(lambda: read(s))
        assert outcome == error.__name__ and grown < 64 * MB, (outcome, grown)
        with pytest.raises(error, match=match):
            read(s)
    victim.intact((FAKE,))


def forge_tensor(victim: Victim, row: ChunkRow, payload: bytes, shape: tuple, listed: int = 1) -> None:
    forge(victim.root, "bomb", {"w": ("float32", shape, [row.id] * listed)}, {row.id: (row, payload)})


def forge_tokenizer(victim: Victim, row: ChunkRow, payload: bytes) -> None:
    """A version of the encoder whose tokenizer.json is the given chunk."""
    with Store(victim.root) as s:
        enc = s.version("enc")
    tensors = {t.name: (t.dtype, t.shape, t.chunks) for t in enc.tensors}
    forge(victim.root, "bomb", tensors, {row.id: (row, payload)}, {**enc.files, "tokenizer.json": row.id},
          enc.manifest)


def test_a_16_kb_zstd_chunk_declaring_a_gibibyte_is_refused_before_allocation(victim):
    payload = zstd_of_zeros(1 << 30)
    assert len(payload) < 64 * 1024 and Zstd().declared_size(memoryview(payload)) == 1 << 30
    forge_tensor(victim, ChunkRow(FAKE, Zstd(), 1 << 30, len(payload)), payload, (1 << 28,))
    refused_before_allocation(victim, lambda s: s.get("bomb"), LimitExceededError, f"more than the {MAX_CHUNK_RAW}")


@pytest.mark.parametrize("where", ["tensor", "tokenizer.json"])
def test_a_tiny_constant_plane_fans_payload_declaring_2_gib_is_refused_before_allocation(victim, where):
    payload = constant_fans(1 << 29)  # 14 bytes that decode to 2 GiB of one value
    row = ChunkRow(FAKE, Fans(4), 1 << 31, len(payload))
    if where == "tensor":
        forge_tensor(victim, row, payload, (1 << 29,))
        refused_before_allocation(victim, lambda s: s.get("bomb"), LimitExceededError)
    else:
        forge_tokenizer(victim, row, payload)
        refused_before_allocation(victim, lambda s: s.load("bomb"), LimitExceededError)


def test_a_support_file_over_its_cap_is_refused_before_allocation(victim):
    """Under the chunk cap but over the support-file cap (64 MiB): a tokenizer.json of 200 MB is no tokenizer."""
    payload = constant_fans(50 * MB, width=4)
    forge_tokenizer(victim, ChunkRow(FAKE, Fans(4), 200 * MB, len(payload)), payload)
    refused_before_allocation(victim, lambda s: s.load("bomb"), LimitExceededError)


@pytest.mark.parametrize("codec, payload", [(Fans(4), constant_fans(1 << 28)), (Zstd(), zstd_of_zeros(256 * MB))])
def test_a_payload_stating_another_size_than_its_row_is_refused_before_decoding(victim, codec, payload):
    """Row: 4 KiB. Payload: a header declaring 1 GiB (fans) or 256 MiB (zstd)."""
    forge_tensor(victim, ChunkRow(FAKE, codec, 4096, len(payload)), payload, (1024,))
    refused_before_allocation(victim, lambda s: s.get("bomb"), CorruptChunkError, "declares")


def test_one_chunk_listed_thousands_of_times_cannot_claim_more_memory_than_there_is(victim):
    """A 64 MiB chunk (a 14-byte payload) listed 4096 times: a 256 GiB tensor, refused from the catalogue alone."""
    payload = constant_fans(16 * MB)
    forge_tensor(victim, ChunkRow(FAKE, Fans(4), 64 * MB, len(payload)), payload, (4096, 16 * MB), listed=4096)
    refused_before_allocation(victim, lambda s: s.get("bomb"), LimitExceededError, "memory is available")


def test_one_chunk_listed_several_times_is_a_legitimate_repetition(victim):
    """The same rows three times (deduplicated to one chunk): loads as the three copies."""
    rows = torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    raw = memoryview(rows.numpy()).cast("B")
    cid = chunk_id(raw)
    payload = Zstd().encode(raw)
    forge(victim.root, "rep", {"w": ("float32", (48, 16), [cid] * 3)},
          {cid: (ChunkRow(cid, Zstd(), len(raw), len(payload)), payload)})
    with Store(victim.root) as s:
        assert torch.equal(s.get("rep")["w"], rows.repeat(3, 1))
    victim.intact()


@pytest.mark.parametrize("raw_size, shape, error", [
    ((1 << 40) + 1, (1 << 38,), FormatError),  # over the format's limit: a corrupt row
    (1 << 39, (1 << 37,), LimitExceededError),  # within the format, over any chunk a writer makes
    (4096, (1 << 40, 1 << 40), FormatError),  # a shape whose size the chunks do not hold
])
def test_absurd_sizes_are_refused_from_the_catalogue(victim, raw_size, shape, error):
    payload = constant_fans(1024)
    forge(victim.root, "bomb", {"w": ("float32", shape, [FAKE])}, {FAKE: (ChunkRow(FAKE, Fans(4), 4096, 20), payload)})
    victim.tamper("UPDATE chunks SET raw_size=? WHERE id=?", raw_size, FAKE)
    with Store(victim.root) as s:
        with pytest.raises(error):
            s.get("bomb")
    victim.intact((FAKE,))


def test_a_load_larger_than_free_memory_is_a_limit_error_not_a_memory_error(victim, monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda: 4096)
    with Store(victim.root) as s:
        with pytest.raises(LimitExceededError, match="ask for fewer tensors"):
            s.get("m")
        with pytest.raises(LimitExceededError):
            s.load("enc")
    monkeypatch.undo()
    victim.intact()


def test_a_failed_arena_allocation_is_a_limit_error(victim, monkeypatch):
    def no_memory(*args):
        raise MemoryError

    monkeypatch.setattr(loader, "Arena", no_memory)
    with Store(victim.root) as s:
        with pytest.raises(LimitExceededError) as info:
            s.get("m")
    assert isinstance(info.value, ModelpressError) and isinstance(info.value, MemoryError)
    monkeypatch.undo()
    victim.intact()
