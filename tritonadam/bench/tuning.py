"""The autotuner under measurement: the fixed configs a sweep times, how the tuned config
ranks among them, and what tuning costs the first step.

The runner times each fixed config as a tritonadam case like any other (``--sweep``); with
``--tuning`` it also measures first use: the optimizer's first step with an empty autotune
cache (a fresh temporary ``TRITONADAM_CACHE_DIR`` and a fresh in-process tuner), which tunes
within the budgets in force, against later steps. Everything but :func:`first_use` is pure
and tested on CPU with made-up numbers.
"""
from __future__ import annotations

import math
import os
import statistics
import time

NO_GPU_MESSAGE = (
    "tritonadam bench --tuning: tuning benchmarks need a GPU. First-use tuning only runs on a "
    "CUDA or ROCm device (the CPU and Triton's interpreter are never tuned), so there is "
    "nothing to measure here; nothing was run."
)

#: later steps timed (wall, synchronised) to compare with the first
LATER_STEPS = 5


def config_key(cfg) -> tuple | None:
    """A config as a hashable (block_size, num_warps, persistent), from a LaunchConfig or its JSON."""
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return (cfg.get("block_size"), cfg.get("num_warps"), bool(cfg.get("persistent")))
    return (cfg.block_size, cfg.num_warps, bool(cfg.persistent))


def config_text(cfg) -> str:
    """"4096/8", or "4096/8 persistent"."""
    k = config_key(cfg)
    if k is None:
        return "n/a"
    return f"{k[0]}/{k[1]}" + (" persistent" if k[2] else "")


def fixed_configs(backend: str, numel: int, *, num_sms: int | None = None, default=None) -> list:
    """The configs a sweep times for a launch of ``numel`` elements: the tuner's candidates
    at that size (the default first, then its neighbours), plus ``default`` at the end if
    the pruning dropped it (so the default's time is always known)."""
    from ..autotune import candidate_configs, size_bucket

    # a bucket's representative launch is its upper edge, 2**bucket (as the tuner times it)
    out = candidate_configs(backend, 1 << size_bucket(numel), num_sms=num_sms, first=default)
    if default is not None and default not in out:
        out.append(default)
    return out


def summarize(tuned_ms: float | None, fixed: list[dict], default=None, tuned=None) -> dict:
    """Best fixed config and ratios from a list of fixed timings.

    ``fixed``: ``{"config": LaunchConfig or its JSON, "ms": float | None}`` per config (None:
    it failed or was not timed). ``default``/``tuned``: the architecture default and the
    tuned config, to find their fixed timings. Returns ``best_fixed`` (the config's JSON),
    ``best_fixed_ms``, ``worst_fixed_ms``, ``default_ms``, ``tuned_fixed_ms`` (the tuned
    config timed as a fixed one), ``tuned_over_best`` (tuned ms / best fixed ms: 1.00 = the
    tuner found the best, above 1 = slower than the best fixed config), ``default_over_best``,
    ``tuned_rank`` (1 = the tuned config was the fastest fixed one), ``fixed_timed``,
    ``fixed_failed``.
    """
    ok = [f for f in fixed if _finite(f.get("ms"))]
    out = {"best_fixed": None, "best_fixed_ms": None, "worst_fixed_ms": None, "default_ms": None,
           "tuned_fixed_ms": None, "tuned_over_best": None, "default_over_best": None,
           "tuned_rank": None, "fixed_timed": len(ok), "fixed_failed": len(fixed) - len(ok)}
    if not ok:
        return out
    best = min(ok, key=lambda f: f["ms"])  # first of equal times: the tuner's order
    out["best_fixed"] = _as_json(best["config"])
    out["best_fixed_ms"] = best["ms"]
    out["worst_fixed_ms"] = max(f["ms"] for f in ok)
    by = {config_key(f["config"]): f["ms"] for f in ok}
    if default is not None:
        out["default_ms"] = by.get(config_key(default))
        if out["default_ms"] is not None:
            out["default_over_best"] = out["default_ms"] / best["ms"]
    if tuned is not None:
        t = by.get(config_key(tuned))
        out["tuned_fixed_ms"] = t
        if t is not None:
            out["tuned_rank"] = 1 + sum(1 for f in ok if f["ms"] < t)
    if _finite(tuned_ms):
        out["tuned_over_best"] = tuned_ms / best["ms"]
    return out


def first_step_overhead(first_ms: float | None, later_ms: list[float]) -> dict:
    """The first step's extra time over a later step (the median of ``later_ms``)."""
    later = statistics.median(later_ms) if later_ms else None
    extra = first_ms - later if _finite(first_ms) and later is not None else None
    return {"first_step_ms": first_ms, "later_step_ms": later, "extra_ms": extra}


def first_use(build, sync, cache_dir: str, tuner_factory, later_steps: int = LATER_STEPS):
    """Build an optimizer with ``build()`` and step it with an empty autotune cache.

    ``cache_dir`` (empty) becomes ``TRITONADAM_CACHE_DIR`` and a fresh tuner from
    ``tuner_factory()`` the process-wide one for the duration; both are restored on return.
    Returns (the optimizer, now holding the tuned choice, and a dict of what was measured:
    first/later step wall times, the tuned config and what the tuner recorded)."""
    from .. import autotune

    saved_dir = os.environ.get("TRITONADAM_CACHE_DIR")
    os.environ["TRITONADAM_CACHE_DIR"] = cache_dir
    tuner = tuner_factory()
    old = autotune.set_tuner(tuner)
    try:
        opt = build()

        def timed_step():
            sync()
            t = time.perf_counter()
            opt.step()
            sync()
            return (time.perf_counter() - t) * 1e3

        first_ms = timed_step()
        later = [timed_step() for _ in range(max(1, later_steps))]
        chosen = tuner.choices()
        tuned = next((c for c in chosen if c.source == "tuned"), chosen[0] if chosen else None)
        entries: dict = {}
        for path in tuner.cache.files():
            entries.update(tuner.cache.read(path).entries)
        measured = (next(iter(entries.values())).get("measured") or {}) if len(entries) == 1 else {}
    finally:
        autotune.set_tuner(old)
        if saved_dir is None:
            os.environ.pop("TRITONADAM_CACHE_DIR", None)
        else:
            os.environ["TRITONADAM_CACHE_DIR"] = saved_dir
    out = first_step_overhead(first_ms, later)
    out.update(tuner_budget_s=tuner.budget_s, compile_budget_s=tuner.compile_budget_s,
               launches_decided=len(chosen), tuned=tuned.config.to_json() if tuned else None,
               tuned_source=tuned.source if tuned else None, tune_s=measured.get("elapsed_s"),
               compile_s=measured.get("compile_s"), configs_timed=measured.get("configs_timed"),
               configs_pruned=measured.get("configs_pruned"),
               configs_considered=measured.get("configs_considered"),
               tune_complete=measured.get("complete"))
    return opt, out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _as_json(cfg):
    if cfg is None or isinstance(cfg, dict):
        return cfg
    return cfg.to_json()
