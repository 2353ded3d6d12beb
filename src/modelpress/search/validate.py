"""End-to-end validation of a candidate recipe, and the executors that validate many at once.

`Validator` holds a float model, its evaluation inputs (held-out sentences of an encoder, or token
windows of a causal LM) and the float model's outputs on them; `validate(recipe)` compresses a copy
with the recipe exactly as `compress` does and returns plain figures: bytes as stored (`size_report`
of the whole model), mean / 1st-percentile cosine and overlap@10 (encoders), or next-token KL and
perplexity (causal LMs). Figures are computed with a fixed number of intra-op threads, so the same
recipe gives the same figures in any process.

Executors run `validate` over candidates: `InlineExecutor` here, `ProcessExecutor` in spawned worker
processes (each builds the model once from a picklable factory, e.g. `functools.partial(load_model,
path)`), and `RayExecutor` on a Ray cluster (the optional `ray` extra). Each calls `on_result(id,
figures)` as candidates finish, so the run folder records them at once.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import math
import multiprocessing
from typing import Any, Callable, Sequence

import torch
from torch import nn

from modelpress.compress import compress
from modelpress.data.batches import tokenised_batches
from modelpress.errors import ConfigError
from modelpress.evaluate.fidelity import fidelity
from modelpress.evaluate.size import size_report
from modelpress.recipe import Recipe
from modelpress.search.lm_sensitivity import next_token_kl, next_token_log_probs
from modelpress.search.sensitivity import MAX_QUERIES

__all__ = ["EXECUTORS", "InlineExecutor", "ProcessExecutor", "RayExecutor", "Validator", "make_executor"]

EXECUTORS = ("process", "inline", "ray")
Factory = Callable[[], nn.Module]
OnResult = Callable[[str, dict[str, Any]], None]


class _Threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)


class Validator:
    """A float model, its evaluation inputs and reference outputs: validates candidate recipes end to end."""

    def __init__(self, model: nn.Module, inputs: Any, causal: bool, calibration: Any = None, threads: int = 1,
                 batch_size: int = 64):
        self.model, self.inputs, self.causal = model.eval(), inputs, causal
        self.calibration, self.threads, self.batch_size = calibration, threads, batch_size
        with _Threads(threads):
            self.reference = self._outputs(model)

    @torch.inference_mode()
    def _outputs(self, model: nn.Module) -> torch.Tensor:
        if self.causal:  # (n, T-1) log-probability of each next token, and (n, T, V) for the KL
            return torch.cat([next_token_log_probs(model(input_ids=self.inputs[i:i + 1], use_cache=False))
                              for i in range(len(self.inputs))])
        parts, order = [], []
        for idx, batch in tokenised_batches(model, list(self.inputs), self.batch_size, longest_first=True):
            parts.append(model(**batch).float())
            order += idx
        stacked = torch.cat(parts)
        out = torch.empty_like(stacked)
        out[torch.tensor(order)] = stacked
        return out

    def validate(self, recipe: Recipe | dict) -> dict[str, Any]:
        """Figures of the model compressed by `recipe` (see the module docstring)."""
        recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)
        with _Threads(self.threads):
            compressed = compress(copy.deepcopy(self.model), recipe, calibration=self.calibration).eval()
            got = self._outputs(compressed)
            figures: dict[str, Any] = {"bytes": size_report(compressed).bytes}
            if self.causal:
                ids = self.inputs[:, 1:]
                nll = -got[:, :-1].gather(-1, ids.unsqueeze(-1)).mean(dtype=torch.float64)
                figures.update(kl=next_token_kl(self.reference, got), perplexity=math.exp(float(nll)),
                               per_input=[next_token_kl(self.reference[i], got[i]) for i in range(len(got))])
            else:
                f = fidelity(self.reference, got, n_queries=min(MAX_QUERIES, len(got)))
                figures.update(mean_cosine=f.mean_cosine, p1_cosine=f.p1_cosine, overlap_at_10=f.overlap_at_10,
                               per_input=[round(float(c), 7) for c in
                                          torch.nn.functional.cosine_similarity(self.reference, got, dim=-1)])
        return figures

    def float_figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = {"bytes": size_report(self.model).bytes}
        if self.causal:
            nll = -self.reference[:, :-1].gather(-1, self.inputs[:, 1:].unsqueeze(-1)).mean(dtype=torch.float64)
            figures.update(kl=0.0, perplexity=math.exp(float(nll)))
        else:
            figures.update(mean_cosine=1.0, p1_cosine=1.0, overlap_at_10=1.0)
        return figures


class InlineExecutor:
    """Validates in this process, one candidate after another."""

    def __init__(self, validator_factory: Callable[[], Validator]):
        self._factory, self._validator = validator_factory, None

    def run(self, candidates: Sequence[tuple[str, dict]], on_result: OnResult) -> None:
        if candidates and self._validator is None:
            self._validator = self._factory()
        for cid, recipe in candidates:
            on_result(cid, self._validator.validate(recipe))

    def close(self) -> None:
        self._validator = None


_WORKER: dict[str, Validator] = {}


def _init_worker(factory: Factory, inputs: Any, causal: bool, calibration: Any, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["validator"] = Validator(factory(), inputs, causal, calibration, threads)


def _validate_in_worker(cid: str, recipe: dict) -> tuple[str, dict[str, Any]]:
    return cid, _WORKER["validator"].validate(recipe)


class ProcessExecutor:
    """Validates in `jobs` spawned worker processes; each builds the model once from `factory`."""

    def __init__(self, factory: Factory, inputs: Any, causal: bool, calibration: Any = None, jobs: int = 2,
                 threads: int = 1):
        if jobs < 1:
            raise ConfigError(f"--jobs {jobs} is not valid: give 1 or more worker processes")
        self.args, self.jobs = (factory, inputs, causal, calibration, threads), jobs

    def run(self, candidates: Sequence[tuple[str, dict]], on_result: OnResult) -> None:
        if not candidates:
            return
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=min(self.jobs, len(candidates)), mp_context=ctx,
                                    initializer=_init_worker, initargs=self.args) as pool:
            futures = [pool.submit(_validate_in_worker, cid, recipe) for cid, recipe in candidates]
            try:
                for future in cf.as_completed(futures):
                    on_result(*future.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def close(self) -> None:
        pass


class RayExecutor:
    """Validates on Ray actors (`ray.init()` joins the cluster RAY_ADDRESS names, or starts a local one)."""

    def __init__(self, factory: Factory, inputs: Any, causal: bool, calibration: Any = None, jobs: int = 2,
                 threads: int = 1, ray_module: Any = None):
        self.ray = ray_module or _import_ray()
        self.args, self.jobs = (factory, inputs, causal, calibration, threads), jobs

    def run(self, candidates: Sequence[tuple[str, dict]], on_result: OnResult) -> None:
        if not candidates:
            return
        ray = self.ray
        if not ray.is_initialized():
            ray.init(num_cpus=self.jobs, include_dashboard=False, log_to_driver=False)
        actor = ray.remote(num_cpus=1)(_RayWorker)
        workers = [actor.remote(*self.args) for _ in range(min(self.jobs, len(candidates)))]
        pending = {workers[i % len(workers)].validate.remote(cid, recipe): cid
                   for i, (cid, recipe) in enumerate(candidates)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                del pending[ref]
                on_result(*ray.get(ref))
        for w in workers:
            ray.kill(w)

    def close(self) -> None:
        pass


class _RayWorker:
    def __init__(self, factory: Factory, inputs: Any, causal: bool, calibration: Any, threads: int):
        torch.set_num_threads(threads)
        self.validator = Validator(factory(), inputs, causal, calibration, threads)

    def validate(self, cid: str, recipe: dict) -> tuple[str, dict[str, Any]]:
        return cid, self.validator.validate(recipe)


def _import_ray() -> Any:
    try:
        import ray  # noqa: PLC0415 - an optional extra: imported only when asked for
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'modelpress[ray]'") from None
    return ray


def make_executor(kind: str, factory: Factory, inputs: Any, causal: bool, calibration: Any = None, jobs: int = 2,
                  threads: int = 1, model: nn.Module | None = None):
    """An executor by name: 'process' (spawned workers, the default), 'inline' (this process), 'ray'."""
    if kind == "inline" or (kind == "process" and jobs == 1):
        return InlineExecutor(lambda: Validator(model if model is not None else factory(), inputs, causal,
                                                calibration, threads))
    if kind == "process":
        return ProcessExecutor(factory, inputs, causal, calibration, jobs, threads)
    if kind == "ray":
        return RayExecutor(factory, inputs, causal, calibration, jobs, threads)
    raise ConfigError(f"unknown executor {kind!r}: use one of {list(EXECUTORS)}")
