"""GPU timing for the tuner: CUDA events, warm-up, L2 flush, median.

Kept apart from the tuner so tests can inject a fake timer (``timer(fn) -> ms``) and never
time anything on CPU, where Triton's interpreter makes timings meaningless.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch

__all__ = ["cuda_event_timer"]

# Flushing L2 between runs times the step as it runs in training, where the forward and
# backward passes have just evicted the optimizer's tensors. Twice L2 evicts it whatever the
# replacement policy; Triton's do_bench uses a fixed 256 MB.
_FLUSH_FALLBACK_BYTES = 256 * 1024 * 1024


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


def cuda_event_timer(
    fn: Callable[[], None],
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    max_reps: int = 1000,
    min_reps: int = 10,
    graph: bool = True,
) -> float:
    """Median milliseconds of one ``fn()`` on the current CUDA stream.

    Like ``triton.testing.do_bench``: the first call compiles and is not timed; a short
    estimate sizes the warm-up and the repetitions; each timed run follows an L2 flush and
    is bracketed by its own pair of events; the median resists the odd slow run.
    With ``graph`` the launches are replayed from a CUDA graph: a small launch takes less
    GPU time than the host needs to issue it (50-70 us), and the tuner compares GPU time.
    """
    device = torch.device("cuda", torch.cuda.current_device())
    fn()
    torch.cuda.synchronize()
    if graph:
        fn = _as_graph(fn)
    flush = _flush_buffer(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    # The estimate includes the flush, so it errs towards fewer repetitions.
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup = max(1, int(warmup_ms / estimate))
    n_rep = min(max(min_reps, int(rep_ms / estimate)), max_reps)
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    del flush
    return float(statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)))
