"""QMATMUL's C entry points and thread pool: buffers that do not fit the declared shape are refused,
concurrent callers, changing thread counts and a forked child all get exact answers."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from modelpress.encodings import QuantizedTensor, QuantScheme, quantize
from modelpress.nn import CompressedLinear, Kernel, qmatmul

pytestmark = pytest.mark.skipif(not qmatmul.NATIVE_AVAILABLE, reason="the C extension is not built here")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def qenc(out_f: int, in_f: int, bits: int, symmetric: bool, group_size, seed: int = 0) -> QuantizedTensor:
    w = torch.randn(out_f, in_f, generator=gen(seed)) * 0.2 + (0 if symmetric else 0.03)
    return quantize(w, QuantScheme(bits, symmetric, group_size))


# ---------------------------------------------------------------- the C entry point refuses what does not fit


@pytest.mark.parametrize(("n0", "n1", "out_rows"), [(0, 9, 8), (-1, 2, 3), (3, 2, 0), (5, 10, 5), (0, 2, 3)])
def test_decode_rows_refuses_rows_outside_the_weight_or_a_wrong_buffer(n0, n1, out_rows):
    from modelpress.nn import _qmatmul

    enc = qenc(9, 64, 4, True, 32)
    with pytest.raises(ValueError):
        _qmatmul.decode_rows(torch.empty(out_rows, 64).numpy(), enc.codes.numpy(), enc.scale.numpy(), None,
                             9, 64, 4, 32, n0, n1)


@pytest.mark.parametrize("change", ["x", "y", "codes", "scale", "zero", "bias", "bits", "group", "method", "readonly"])
def test_gemm_refuses_buffers_that_do_not_match_the_shape(change):
    from modelpress.nn import _qmatmul

    enc = qenc(8, 64, 4, False, 32)
    args = {"x": torch.randn(2, 64).numpy(), "y": torch.empty(2, 8).numpy(), "codes": enc.codes.numpy(),
            "scale": enc.scale.numpy(), "zero": enc.zero.numpy(), "bias": torch.zeros(8).numpy()}
    numbers = {"M": 2, "N": 8, "K": 64, "bits": 4, "group": 32, "method": 0}
    if change in args:
        args[change] = args[change][:-1] if change != "x" else args[change][:, :-1].copy()
    elif change == "readonly":
        args["y"] = bytes(64)
    else:
        numbers[change] = {"bits": 5, "group": 12, "method": 2}[change]
    with pytest.raises((ValueError, TypeError)):
        _qmatmul.gemm(*args.values(), *numbers.values(), 1)


def test_concurrent_callers_get_right_answers():
    """Python threads calling at once: one gets the pool, the others run on their own thread."""
    torch.set_num_threads(2)
    enc = qenc(256, 512, 4, True, 32)
    layer = CompressedLinear(enc, None, Kernel.QMATMUL)
    xs = [torch.randn(3, 512, generator=gen(i)) for i in range(4)]
    expected = [layer(x) for x in xs]
    results = [None] * 4

    def work(i):
        for _ in range(20):
            results[i] = layer(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_starts_its_own_pool():
    torch.set_num_threads(2)
    enc = qenc(64, 128, 4, True, 32)
    layer = CompressedLinear(enc, None, Kernel.QMATMUL)
    x = torch.randn(2, 128, generator=gen(1))
    expected = layer(x)  # the parent's pool now has a worker
    pid = os.fork()
    if pid == 0:  # the child: the parent's worker does not exist here
        ok = torch.equal(layer(x), expected)
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in the kernel")
        time.sleep(0.01)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_thread_counts_changing_call_by_call():
    """The pool keeps workers started for more threads than a later call asks: every result stays exact."""
    enc = qenc(96, 128, 4, True, 32)
    layer = CompressedLinear(enc, None, Kernel.QMATMUL)
    x = torch.randn(2, 128, generator=gen(1))
    expected = layer(x)
    for i in range(300):
        torch.set_num_threads((4, 2, 3, 1, 2)[i % 5])
        assert torch.equal(layer(x), expected)
