"""Progressive precision: float32 tensors stored as a bfloat16 plane and a low 16-bit plane; a load at bf16
reads the high planes only, a refinement the low planes only, and the result is bit-identical to a full load."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _tiny_lm import write_tiny_lm
from hostile._tiny_source import SENTENCES, write_tiny_source
from modelpress.codecs import NATIVE_AVAILABLE, Fans, Planes
from modelpress.errors import ConfigError, StoreError, UnsupportedError
from modelpress.formats.models import load_model
from modelpress.nn.generation import greedy_generate
from modelpress.regions import open_streamed
from modelpress.store import Store, planes


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=64))
def test_planes_join_back_every_float32_bit_pattern(bits):
    x = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
    hi, lo = planes.split(x)
    assert hi.dtype == torch.bfloat16 and lo.dtype == torch.int16
    assert torch.equal(planes.join(hi, lo).view(torch.int32), x.view(torch.int32))


def test_the_high_plane_is_the_value_rounded_to_bfloat16():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    hi, _ = planes.split(x)
    reference = x.to(torch.bfloat16)  # round to nearest even; ours rounds half up: equal but on exact ties
    ties = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert torch.equal(hi.float()[~ties], reference.float()[~ties])
    assert ((hi.float() - x).abs() <= x.abs() * 2.0 ** -8).all()


class Counting:
    """Counts the stored bytes the store's chunk reader lands."""

    def __init__(self, store: Store, monkeypatch):
        self.stored = 0
        land = store.reader.land

        def counted(row, out, scratch, check=True):
            self.stored += row.stored_size
            return land(row, out, scratch, check)

        monkeypatch.setattr(store.reader, "land", counted)


@pytest.fixture
def encoder_store(tmp_path):
    encoder = load_model(write_tiny_source(tmp_path / "src"))
    store = Store.init(tmp_path / "store")
    store.put(encoder, "enc", planes=["*"])
    yield store, encoder
    store.close()


def test_a_bf16_load_then_a_refinement_reads_each_plane_once_and_is_exact(encoder_store, monkeypatch):
    store, original = encoder_store
    version = store.version("enc")
    rows = store.catalog.chunks([c for t in version.tensors for c in t.chunks])
    stored = {t.name: sum(rows[c].stored_size for c in t.chunks) for t in version.tensors}
    total = sum(stored.values())
    high = sum(size for name, size in stored.items() if not name.endswith(planes.LO))
    counter = Counting(store, monkeypatch)
    model = store.load("enc", precision="bf16")
    assert counter.stored == high and high <= 0.55 * total
    coarse = model.encode(SENTENCES)
    cosine = torch.nn.functional.cosine_similarity(coarse, original.encode(SENTENCES)).mean()
    assert cosine >= 0.999
    assert store.refine(model, "enc") > 0
    assert counter.stored <= 1.02 * total  # each chunk read once
    exact = store.load("enc")
    for (name, a), (_, b) in zip(model.state_dict().items(), exact.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(model.encode(SENTENCES), original.encode(SENTENCES))


def test_get_joins_planes_under_the_tensors_own_names(encoder_store):
    store, original = encoder_store
    state = store.get("enc", names=["*word_embeddings.weight"])
    [(name, tensor)] = state.items()
    assert planes.base_name(name) is None and tensor.dtype == torch.float32
    assert torch.equal(tensor, original.state_dict()[name])
    widened = store.get("enc", names=["*word_embeddings.weight"], precision="bf16")[name]
    assert torch.equal(widened, original.state_dict()[name].to(torch.bfloat16).float()) or \
        (widened - tensor).abs().max() <= tensor.abs().max() * 2.0 ** -8


def test_an_unknown_precision_and_a_plane_shaped_name_are_refused(encoder_store, tmp_path):
    store, _ = encoder_store
    with pytest.raises(ConfigError, match="precision"):
        store.load("enc", precision="fp8")
    with pytest.raises(StoreError, match="plane"):
        store.put({"w@lo16": torch.zeros(2)}, "bad")
    with pytest.raises(UnsupportedError, match="planes"):
        open_streamed(store, "enc", memory="1GB")


def test_a_causal_lm_at_bf16_then_refined_gives_the_full_models_tokens(tmp_path):
    lm = load_model(write_tiny_lm("llama", tmp_path / "src"))
    store = Store.init(tmp_path / "store")
    store.put(lm, "tiny", planes=["*"])
    prompt = [1, 72, 101, 108, 108, 111]
    expected = greedy_generate(lm.model, prompt, 10).tokens
    model = store.load("tiny", precision="bf16")
    store.refine(model, "tiny")
    assert greedy_generate(model.model, prompt, 10).tokens == expected
    store.close()


def test_the_low_plane_is_coded_as_float_data(tmp_path):
    """A low plane whose bytes repeat (a float32 weight dequantised from a coarser grid, as SmolLM2's GGUF is)
    takes the float codecs' byte planes: the planar version is no larger (within 2%) than the whole tensor
    coded as float data. Stored whole, such a tensor is now coded as its float32 grid, smaller still: a
    planar layout pays for its bf16 loads there."""
    generator = torch.Generator().manual_seed(0)  # Q4_1's grid: w = d q + m, float16 d and m per 32 weights
    d = (torch.rand(64, 32, 1, generator=generator) * 0.01).to(torch.float16).float()
    m = (-torch.rand(64, 32, 1, generator=generator) * 0.08).to(torch.float16).float()
    grid = (d * torch.randint(0, 16, (64, 32, 32), generator=generator).float() + m).reshape(64, 1024)
    store = Store.init(tmp_path / "store")
    store.put({"w": grid}, "normal")
    store.put({"w": grid}, "planar", planes=["*"])

    def stored(name):
        version = store.version(name)
        rows = store.catalog.chunks([c for t in version.tensors for c in t.chunks])
        return {t.name: (sum(rows[c].stored_size for c in t.chunks), {rows[c].codec.name for c in t.chunks})
                for t in version.tensors}

    normal, planar = stored("normal"), stored("planar")
    assert planar["w" + planes.LO][1] <= {"fans", "planes"}
    as_floats = len((Fans(4) if NATIVE_AVAILABLE else Planes(4)).encode(memoryview(grid.numpy().tobytes())))
    assert sum(size for size, _ in planar.values()) <= 1.02 * as_floats
    assert normal["w"][1] == {"grid"} and normal["w"][0] < sum(size for size, _ in planar.values())
    assert torch.equal(store.get("planar")["w"], grid)
    store.close()
