"""Timing: CUDA events with warm-up, L2 flush and percentiles; host time; launch counts.

On a GPU each timed step is preceded by a synchronize and a write of a 256 MiB buffer (more
than any current L2), so every step starts from a cold cache and an idle device; CUDA events
bracket the step only. Because the device is idle when the step is launched, the event time
includes any time the GPU waits for the host to launch kernels: ``ms`` is the step's cost with
its host overhead, which is what a training loop sees when the host is the bottleneck.

Host time is the CPU wall time of the ``step()`` call itself (``time.perf_counter`` around
it, no synchronize inside), i.e. the time to enqueue the step's work.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

FLUSH_BYTES = 256 * 1024 * 1024


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method) of a non-empty list."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    """Per-step times in milliseconds: device (events, or wall on CPU) and host."""

    ms: list[float]
    host_ms: list[float]
    warmup: int = 0

    @property
    def reps(self) -> int:
        return len(self.ms)

    @property
    def median(self) -> float:
        return quantile(self.ms, 0.5)

    @property
    def p20(self) -> float:
        return quantile(self.ms, 0.2)

    @property
    def p80(self) -> float:
        return quantile(self.ms, 0.8)

    @property
    def host_median(self) -> float:
        return quantile(self.host_ms, 0.5)


@dataclass
class TimingConfig:
    warmup_ms: float = 50.0
    rep_ms: float = 300.0
    min_reps: int = 10
    max_reps: int = 200
    flush: bool = True
    extra: dict = field(default_factory=dict)


class Timer:
    """Times a zero-argument callable on one device."""

    def __init__(self, device: torch.device, config: TimingConfig):
        self.device = device
        self.config = config
        self._flush_buf = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush(self):
        if not (self.cuda and self.config.flush):
            return
        if self._flush_buf is None:
            self._flush_buf = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=self.device)
        self._flush_buf.zero_()

    def release(self):
        self._flush_buf = None

    def estimate_ms(self, fn: Callable[[], None], n: int = 3) -> float:
        """Mean wall time of ``n`` synchronised calls (for choosing the repetition count)."""
        self._sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self._sync()
        return (time.perf_counter() - t0) * 1e3 / n

    def time(self, fn: Callable[[], None], deadline: float | None = None) -> Timing:
        """Warm up for ``warmup_ms``, then time ``rep_ms`` worth of steps (within
        ``[min_reps, max_reps]``), stopping early (after ``min_reps``) past ``deadline``
        (a ``time.monotonic()`` value)."""
        cfg = self.config
        est = max(self.estimate_ms(fn, 2), 1e-3)
        warmup = max(1, min(100, int(cfg.warmup_ms / est)))
        for _ in range(warmup):
            fn()
        self._sync()
        reps = max(cfg.min_reps, min(cfg.max_reps, int(cfg.rep_ms / est)))
        host: list[float] = []
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            done = 0
            for i in range(reps):
                self._sync()
                self.flush()
                starts[i].record()
                t0 = time.perf_counter()
                fn()
                host.append((time.perf_counter() - t0) * 1e3)
                ends[i].record()
                done += 1
                if deadline is not None and i + 1 >= cfg.min_reps and time.monotonic() > deadline:
                    break
            self._sync()
            ms = [s.elapsed_time(e) for s, e in zip(starts[:done], ends[:done])]
        else:
            ms = []
            for i in range(reps):
                t0 = time.perf_counter()
                fn()
                host.append((time.perf_counter() - t0) * 1e3)
                ms.append(host[-1])
                if deadline is not None and i + 1 >= cfg.min_reps and time.monotonic() > deadline:
                    break
        return Timing(ms=ms, host_ms=host, warmup=warmup)


def copy_bandwidth(device: torch.device, nbytes: int, config: TimingConfig) -> dict:
    """Device-to-device ``copy_`` of ``nbytes``: GB/s counting bytes read plus written.

    This is the roofline the bench reports against: it is measured in the same run, on the
    same device, with the same timer (events, flushes between reps) as the optimizers.
    """
    n = max(nbytes // 4, 1)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device, TimingConfig(warmup_ms=config.warmup_ms, rep_ms=max(config.rep_ms, 100.0),
                                       min_reps=max(config.min_reps, 5), max_reps=100,
                                       flush=config.flush))
    t = timer.time(lambda: dst.copy_(src))
    moved = 2 * n * 4
    gbps = moved / (t.median * 1e-3) / 1e9
    timer.release()
    return {"bytes": moved, "ms": t.median, "ms_p20": t.p20, "ms_p80": t.p80, "reps": t.reps,
            "gbps": gbps}


def count_kernel_launches(fn: Callable[[], None], device: torch.device) -> int | None:
    """Kernels launched by one call of ``fn``, from ``torch.profiler`` CUDA activity.

    Counts device-side kernel records; memcpy and memset records are not kernels and are
    left out. Reads the raw Kineto records (``prof.events()`` builds a Python event tree:
    11 s for 155k records on this project's CPU machine, vs 0.25 s raw), falling back to
    ``prof.events()``. None when not on CUDA or when the profiler is unavailable.
    """
    if device.type != "cuda":
        return None
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        try:
            records = [(e.device_type(), e.name()) if callable(e.name) else (e.device_type(), e.name)
                       for e in prof.profiler.kineto_results.events()]
        except Exception:  # noqa: BLE001 - private attribute moved: take the slow path
            records = [(e.device_type, e.name) for e in prof.events()]
        n = 0
        for dtype, name in records:
            if dtype != DeviceType.CUDA:
                continue
            low = name.lower()
            if low.startswith("memcpy") or low.startswith("memset"):
                continue
            n += 1
        return n
    except Exception:  # noqa: BLE001 - the profiler is best-effort (CUPTI may be missing)
        return None
