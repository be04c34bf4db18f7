"""GPU timing for the tuner: CUDA events, warm-up, L2 flush, median.

Kept apart from the tuner so tests can inject a fake timer (``timer(fn) -> ms``) and never
time anything on CPU, where Triton's interpreter makes timings meaningless.

The tuner times each config many times, alternating with the default (see ``tuner.py``),
so one call here is short (``rep_ms``) and what a unit needs only once (its CUDA graph, the
estimate that sizes the repetitions, the first warm-up) is kept for the unit's lifetime.
"""
from __future__ import annotations

import statistics
import weakref
from typing import Callable

import torch

__all__ = ["cuda_event_timer"]

# Flushing L2 between runs times the step as it runs in training, where the forward and
# backward passes have just evicted the optimizer's tensors. Twice L2 evicts it whatever the
# replacement policy; Triton's do_bench uses a fixed 256 MB.
_FLUSH_FALLBACK_BYTES = 256 * 1024 * 1024

# unit -> (its graph's replay, or None to run it eagerly; estimated ms per run). Weak keys:
# the tuner drops a challenger's unit after its pairs, and its graph goes with it. (A value
# must not hold its key, or the entry never goes: hence None rather than the unit itself.)
_prepared: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _flush_buffer(device: torch.device) -> torch.Tensor:
    l2 = None
    try:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    except Exception:
        pass
    nbytes = 2 * l2 if l2 else _FLUSH_FALLBACK_BYTES
    return torch.empty(nbytes // 4, dtype=torch.int32, device=device)


def _as_graph(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn``'s launches captured once in a CUDA graph, replayed by the returned callable;
    ``fn`` itself where capture fails (then host launch time stays in the timings)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # capture needs one eager run on a side stream first
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - an uncapturable runner is still timeable eagerly
        torch.cuda.synchronize()
        return fn
    return graph.replay


def _prepare(fn, graph: bool, flush: torch.Tensor, warmup_ms: float):
    """First call for ``fn``: compile (one untimed run), capture, estimate, warm up.
    Returns (the graph's replay or None, estimated ms per run)."""
    fn()
    torch.cuda.synchronize()
    run = _as_graph(fn) if graph else fn
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        run()
    end.record()
    torch.cuda.synchronize()
    # The estimate includes the flush, so it errs towards fewer repetitions.
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        run()
    return (None if run is fn else run), estimate


def cuda_event_timer(
    fn: Callable[[], None],
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 20.0,
    max_reps: int = 500,
    min_reps: int = 5,
    graph: bool = True,
) -> float:
    """Median milliseconds of one ``fn()`` on the current CUDA stream.

    Like ``triton.testing.do_bench``: the first call for ``fn`` compiles (an untimed run),
    captures it, sizes the repetitions from a short estimate and warms up for ``warmup_ms``;
    every call then times about ``rep_ms`` of runs, each after an L2 flush and bracketed by
    its own pair of events, and returns their median (which resists the odd slow run).
    Later calls for the same ``fn`` object reuse what the first prepared.
    With ``graph`` the launches are replayed from a CUDA graph: a small launch takes less
    GPU time than the host needs to issue it (50-70 us), and the tuner compares GPU time.
    """
    device = torch.device("cuda", torch.cuda.current_device())
    flush = _flush_buffer(device)
    try:
        replay, estimate = _prepared[fn]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable, prepare every call
        replay, estimate = _prepare(fn, graph, flush, warmup_ms)
        try:
            _prepared[fn] = (replay, estimate)
        except TypeError:
            pass
        run = replay or fn
    else:
        run = replay or fn
        run()  # one untimed run after switching units: its first loads are not the steady state
    n_rep = min(max(min_reps, int(rep_ms / estimate)), max_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        flush.zero_()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    del flush
    return float(statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)))
