"""Latency measurement: calls counted, threads pinned and restored, median reported."""

from __future__ import annotations

import time

import pytest
import torch

from modelpress.errors import ConfigError
from modelpress.evaluate import latency as latency_module
from modelpress.evaluate.latency import Latency, measure_latency, ratio


class RecordingEncoder:
    """A fake encoder that records each batch and the torch thread count it ran under."""

    def __init__(self, fail_on_call: int | None = None):
        self.batches: list[list[str]] = []
        self.threads: list[int] = []
        self.fail_on_call = fail_on_call

    def __call__(self, batch: list[str]) -> None:
        self.batches.append(batch)
        self.threads.append(torch.get_num_threads())
        if len(self.batches) == self.fail_on_call:
            raise RuntimeError("encoder failed")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.mark.parametrize(("repeats", "warmup"), [(1, 0), (3, 1), (5, 2)])
def test_calls_warmup_plus_repeats_with_the_whole_batch(repeats, warmup, restore_threads):
    encode = RecordingEncoder()
    result = measure_latency(encode, ("a", "b", "c"), threads=1, repeats=repeats, warmup=warmup)
    assert encode.batches == [["a", "b", "c"]] * (warmup + repeats)
    assert len(result.runs_s) == repeats
    assert result.n_sentences == 3


def test_threads_pinned_during_and_restored_after(restore_threads):
    torch.set_num_threads(3)
    encode = RecordingEncoder()
    result = measure_latency(encode, ["x"], threads=1, repeats=2, warmup=1)
    assert encode.threads == [1, 1, 1]
    assert result.threads == 1
    assert torch.get_num_threads() == 3


def test_threads_restored_when_encode_raises(restore_threads):
    torch.set_num_threads(3)
    with pytest.raises(RuntimeError, match="encoder failed"):
        measure_latency(RecordingEncoder(fail_on_call=2), ["x"], threads=1, repeats=3)
    assert torch.get_num_threads() == 3


class FakeClock:
    """A clock that moves only when a fake encoder "sleeps": the time of each call is known exactly."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class SleepingEncoder:
    """Call i takes durations[i] seconds (on `sleep`: a FakeClock's or the real time.sleep)."""

    def __init__(self, durations, sleep):
        self.durations = list(durations)
        self.sleep = sleep
        self.calls = 0

    def __call__(self, batch: list[str]) -> None:
        self.sleep(self.durations[self.calls])
        self.calls += 1


@pytest.mark.parametrize(
    ("durations", "warmup", "runs", "median"),
    [
        ([9.0, 5.0, 1.0, 3.0], 1, (5.0, 1.0, 3.0), 3.0),  # odd count: the middle run
        ([8.0, 7.0, 0.4, 0.1, 0.3, 0.2], 2, (0.4, 0.1, 0.3, 0.2), 0.25),  # even: the mean of the middle two
        ([2.0], 0, (2.0,), 2.0),
        ([0.0, 4.0, 4.0, 1.0, 100.0, 4.0], 1, (4.0, 4.0, 1.0, 100.0, 4.0), 4.0),  # one outlier leaves the median
    ],
)
def test_each_timed_call_is_bracketed_and_warmups_are_not(monkeypatch, restore_threads, durations, warmup, runs,
                                                            median):
    clock = FakeClock()
    monkeypatch.setattr(latency_module, "time", clock)
    encode = SleepingEncoder(durations, clock.sleep)
    result = measure_latency(encode, ["x", "y"], threads=1, repeats=len(durations) - warmup, warmup=warmup)
    assert encode.calls == len(durations)
    assert result.runs_s == pytest.approx(runs, abs=1e-9)  # differences of clock readings near 1000 s
    assert result.median_s == pytest.approx(median, abs=1e-9)
    assert (result.threads, result.n_sentences) == (1, 2)


def test_wall_clock_is_measured_not_cpu_time(restore_threads):
    # Sleeping costs no CPU: a timer of CPU time, or one started after the call, reads ~0 here.
    # time.sleep sleeps at least as long as asked, so each run is at least its sleep.
    sleeps = [0.0, 0.03, 0.01, 0.02]
    result = measure_latency(SleepingEncoder(sleeps, time.sleep), ["a"] * 8, threads=1, repeats=3, warmup=1)
    assert all(run >= asked for run, asked in zip(result.runs_s, sleeps[1:]))
    assert result.median_s >= 0.02


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": 0}, "threads=0"),
        ({"repeats": 0}, "repeats=0"),
        ({"warmup": -1}, "warmup=-1"),
        ({"sentences": []}, "no sentences"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message, restore_threads):
    arguments = {"encode": RecordingEncoder(), "sentences": ["x"]} | kwargs
    with pytest.raises(ConfigError, match=message):
        measure_latency(**arguments)
    assert torch.get_num_threads() == restore_threads


def test_ratio_is_a_over_b():
    slow = Latency(median_s=3.0, runs_s=(3.0,), threads=2, n_sentences=10)
    fast = Latency(median_s=1.5, runs_s=(1.5,), threads=2, n_sentences=10)
    assert ratio(slow, fast) == 2.0
    assert ratio(fast, slow) == 0.5


def test_ratio_refuses_different_batches_and_zero_time():
    a = Latency(median_s=1.0, runs_s=(1.0,), threads=2, n_sentences=10)
    with pytest.raises(ConfigError, match="timed 10 and 20 sentences"):
        ratio(a, Latency(median_s=1.0, runs_s=(1.0,), threads=2, n_sentences=20))
    with pytest.raises(ConfigError, match="median 0.0 s"):
        ratio(a, Latency(median_s=0.0, runs_s=(0.0,), threads=2, n_sentences=10))


@pytest.mark.parametrize(
    "kwargs",
    [{"runs_s": ()}, {"runs_s": (-1.0,)}, {"threads": 0}, {"n_sentences": 0}],
)
def test_latency_validates_fields(kwargs):
    fields = {"median_s": 1.0, "runs_s": (1.0,), "threads": 1, "n_sentences": 1} | kwargs
    with pytest.raises(ConfigError):
        Latency(**fields)
