"""Timing: one timer, three figures per case; launch counts; GPU clocks, power, temperature.

Every case (a provider's optimizer over a workload) gets three figures, each the median over
interleaved rounds (every case of a group timed once per round, in turn) with its spread:

``device_ms``
    The GPU's time for the step alone. On CUDA each rep synchronises, writes fresh grads,
    then queues a sleep kernel (``torch.cuda._sleep``, sized from a calibration to outlast
    the host's enqueue of the step), the L2 flush, the start event, the step and the end
    event. The GPU is busy until every launch of the step is queued, so the events time the
    step's kernels back to back, with no host time in them. A rep where the sleep ran out
    before ``step()`` returned (the host was still enqueuing: a host sync in the step, or a
    full launch queue) is counted in ``sleep_short``, dropped, and the sleep doubled.
``host_ms``
    Wall-clock time of the ``step()`` call on the host (``time.perf_counter`` around it; not
    ``process_time``: time the call spends blocked counts too) with fresh grads every
    step: new grad tensors, at other addresses than the step before (the grad-pointer upload
    path), as ``zero_grad(set_to_none=True)`` and backward give, written on the device in
    the queue. The GPU is idle when the call starts, so nothing waits on a full queue.
``steady_ms``
    Time per step of back-to-back steps, each preceded by writing the grads in the queue
    (one copy kernel, as backward writes them): CUDA events around N (write, step) pairs,
    less N writes alone timed the same way, over N. What a training loop gets: the larger
    of host and device time, wherever they overlap. The grads stay at their addresses here
    (the caching allocator mostly hands them the same ones); the fresh-pointer path is in
    ``host_ms``.

On a CPU (torch's CPU providers, Triton's interpreter) a step is synchronous: all three
figures are wall-clock times of the same kind (``host_ms`` and ``device_ms`` are the
``step()`` call's wall time; ``steady_ms`` the loop's), labelled as such in the report.
"""
from __future__ import annotations

import math
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .interrupt import stop_if_requested

FLUSH_BYTES = 256 * 1024 * 1024
#: sleep before a timed step: this many times the case's host time, plus SLEEP_PAD_MS
SLEEP_FACTOR = 1.5
SLEEP_PAD_MS = 0.2
#: figure names, in the order reports show them
FIGURES = ("device", "host", "steady")


def _now() -> float:
    """The host clock host times are read from, in seconds (tests simulate it)."""
    return time.perf_counter()


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
class Figure:
    """One figure of one case: a value per round (the median of that round's reps)."""

    rounds: list[float] = field(default_factory=list)
    samples: int = 0

    def add_round(self, reps: list[float]) -> None:
        if reps:
            self.rounds.append(quantile(reps, 0.5))
            self.samples += len(reps)

    @property
    def median(self) -> float:
        return quantile(self.rounds, 0.5)

    @property
    def p20(self) -> float:
        return quantile(self.rounds, 0.2)

    @property
    def p80(self) -> float:
        return quantile(self.rounds, 0.8)

    def as_row(self, name: str) -> dict:
        """``{name}_ms``, ``{name}_p20``, ``{name}_p80`` (None when nothing was timed)."""
        if not self.rounds:
            return {f"{name}_ms": None, f"{name}_p20": None, f"{name}_p80": None}
        return {f"{name}_ms": self.median, f"{name}_p20": self.p20, f"{name}_p80": self.p80}


@dataclass
class TimingConfig:
    """``rep_ms``: time spent on each figure of a case, over all rounds, which sets the reps
    per round within ``[min_reps, max_reps]``; ``rounds``: interleaved rounds per group."""

    warmup_ms: float = 50.0
    rep_ms: float = 300.0
    min_reps: int = 1
    max_reps: int = 5
    rounds: int = 7
    flush: bool = True
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------- grads

class GradFeed:
    """The grads of one group of cases (one workload and setup), as backward writes them.

    ``g0`` holds every grad's values in one flat buffer (written once from the seed); two
    more flat buffers take turns holding a step's grads, rewritten from ``g0`` by one copy
    kernel in the queue before each step. Fresh grads are new view tensors of the next
    buffer, so every step sees new grad tensors at new addresses. Cases of a group share
    the feed (each steps its own params); a step that writes grads (torch's
    ``clip_grad_norm_``) writes a buffer that is rewritten before the next step reads it.
    """

    def __init__(self, shapes: list[tuple], dtype: torch.dtype, device: torch.device, seed: int):
        self.shapes = [tuple(s) for s in shapes]
        self.numels = [math.prod(s) for s in self.shapes]
        total = sum(self.numels)
        gen = torch.Generator(device=device).manual_seed(seed)
        self.g0 = torch.empty(total, dtype=dtype, device=device)
        for v in self.views(self.g0):
            if v.numel():
                v.normal_(generator=gen)
        self.bufs = [torch.empty_like(self.g0), torch.empty_like(self.g0)]
        for b in self.bufs:
            b.copy_(self.g0)

    @property
    def nbytes(self) -> int:
        return self.g0.numel() * self.g0.element_size()

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """New tensors, one per grad, viewing ``flat``."""
        return [t.view(s) for t, s in zip(flat.split(self.numels), self.shapes)]

    def write(self, buf: torch.Tensor) -> None:
        buf.copy_(self.g0)


class Subject:
    """What the timer steps: a case's ``step`` over ``params``, fed grads by ``feed``.

    ``static_grads``: the grads stay the same tensors, rewritten in place (a captured CUDA
    graph reads fixed addresses); otherwise every fresh step assigns new grad tensors,
    alternating between the feed's two buffers."""

    def __init__(self, step: Callable, params: list[torch.Tensor], feed: GradFeed,
                 static_grads: bool = False):
        self.step = step
        self.params = params
        self.feed = feed
        self.static_grads = static_grads
        self.current = 0  # the caller assigned views of feed.bufs[0] before building
        # what the timer learns and accumulates
        self.figures = {name: Figure() for name in FIGURES}
        self.steady_raw = Figure()
        self.sleep_ms = SLEEP_PAD_MS
        self.sleep_short = 0
        self.host_est = 0.0
        self.step_est = 0.0
        self.reps = 1
        self.steady_n = 2

    def assign(self, buf: torch.Tensor) -> None:
        for p, g in zip(self.params, self.feed.views(buf)):
            p.grad = g

    def fresh_grads(self) -> None:
        """New grads for the next step, written in the queue."""
        if self.static_grads:
            self.feed.write(self.feed.bufs[self.current])
            return
        self.current ^= 1
        buf = self.feed.bufs[self.current]
        self.feed.write(buf)
        self.assign(buf)

    def rewrite_grads(self) -> None:
        """The same grad tensors, rewritten in the queue (as backward into kept grads)."""
        self.feed.write(self.feed.bufs[self.current])


# --------------------------------------------------------------------------------- timer

class Timer:
    """Times subjects on one device: warm-up, then one round of each figure at a time."""

    def __init__(self, device: torch.device, config: TimingConfig):
        self.device = device
        self.config = config
        self._flush_buf = None
        self._cycles_per_ms: float | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def kind(self) -> str:
        """How the figures are measured here, for the report."""
        return "cuda-events" if self.cuda else "cpu-wall"

    def sync(self):
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

    # -------------------------------------------------------------------- the sleep
    def cycles_per_ms(self) -> float:
        """GPU clock cycles ``torch.cuda._sleep`` spins per millisecond (measured once)."""
        if self._cycles_per_ms is None:
            cycles = 2_000_000
            best = math.inf
            for _ in range(3):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                self.sync()
                a.record()
                torch.cuda._sleep(cycles)
                b.record()
                self.sync()
                best = min(best, a.elapsed_time(b))
            self._cycles_per_ms = cycles / max(best, 1e-3)
        return self._cycles_per_ms

    def sleep(self, ms: float) -> None:
        torch.cuda._sleep(max(1, int(ms * self.cycles_per_ms())))

    # ---------------------------------------------------------------- single reps
    def host_rep(self, s: Subject) -> float:
        stop_if_requested()
        s.fresh_grads()
        self.sync()
        t0 = _now()
        s.step()
        return (_now() - t0) * 1e3

    def device_rep(self, s: Subject) -> tuple[float | None, float]:
        """(device ms or None when the sleep ran out, host ms of the call)."""
        stop_if_requested()
        s.fresh_grads()
        if not self.cuda:
            t0 = _now()
            s.step()
            ms = (_now() - t0) * 1e3
            return ms, ms
        self.sync()
        after_sleep = torch.cuda.Event()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        self.sleep(s.sleep_ms)
        after_sleep.record()
        self.flush()
        start.record()
        t0 = _now()
        s.step()
        host = (_now() - t0) * 1e3
        short = after_sleep.query()
        end.record()
        end.synchronize()
        if short:
            s.sleep_short += 1
            s.sleep_ms *= 2
            return None, host
        return start.elapsed_time(end), host

    def steady_loop(self, n: int, step: Callable | None, write: Callable) -> float:
        """ms for ``n`` back-to-back (write, step) pairs (``step`` None: writes alone)."""
        self.sync()
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                write()
                if step is not None:
                    step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = _now()
        for _ in range(n):
            write()
            if step is not None:
                step()
        return (_now() - t0) * 1e3

    # ----------------------------------------------------------------- per subject
    def warm_up(self, s: Subject, deadline: float | None = None) -> None:
        """Warm-up steps, then the case's estimates: host time, step time, the sleep that
        covers its enqueue, the reps per round and the steady loop's length."""
        cfg = self.config
        host, wall = [], []
        for _ in range(2):
            s.fresh_grads()
            self.sync()
            t0 = _now()
            s.step()
            t1 = _now()
            self.sync()
            host.append((t1 - t0) * 1e3)
            wall.append((_now() - t0) * 1e3)
        est = max(min(wall), 1e-3)
        for _ in range(max(0, min(100, int(cfg.warmup_ms / est)) - 2)):
            if deadline is not None and time.monotonic() > deadline:
                break
            stop_if_requested()
            s.fresh_grads()
            s.step()
        self.sync()
        s.host_est = min(host)
        s.step_est = est
        s.sleep_ms = SLEEP_FACTOR * max(host) + SLEEP_PAD_MS
        per_round = cfg.rep_ms / max(1, cfg.rounds)
        s.reps = max(cfg.min_reps, min(cfg.max_reps, int(per_round / est)))
        s.steady_n = max(3, min(50, int(per_round / est)))

    def round(self, s: Subject, write_ms: float) -> None:
        """One round of every figure for ``s``; ``write_ms``: this round's time of one grad
        write alone (subtracted from the steady loop)."""
        host = [self.host_rep(s) for _ in range(s.reps)]
        dev = []
        for _ in range(s.reps + 2):  # a couple of spares for reps whose sleep ran out
            ms, _h = self.device_rep(s)
            if ms is not None:
                dev.append(ms)
            if len(dev) >= s.reps:
                break
        raw = self.steady_loop(s.steady_n, s.step, s.rewrite_grads) / s.steady_n
        s.figures["host"].add_round(host)
        s.figures["device"].add_round(dev)
        s.figures["steady"].add_round([max(raw - write_ms, 0.0)])
        s.steady_raw.add_round([raw])

    def write_ms(self, feed: GradFeed, n: int = 10) -> float:
        """One grad write alone (the copy kernel before every steady step), ms."""
        buf = feed.bufs[0]
        return self.steady_loop(n, None, lambda: feed.write(buf)) / n

    def time_once(self, fn: Callable[[], None], reps: int = 5) -> Figure:
        """Device time of a single-kernel ``fn`` (a copy): the same sleep, flush, events;
        a figure with one round of ``reps``."""
        fig = Figure()
        if not self.cuda:
            out = []
            for _ in range(reps):
                t0 = _now()
                fn()
                out.append((_now() - t0) * 1e3)
            fig.add_round(out)
            return fig
        out = []
        fn()
        self.sync()
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            self.sync()
            self.sleep(SLEEP_PAD_MS)
            self.flush()
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        fig.add_round(out)
        return fig


def copy_bandwidth(device: torch.device, nbytes: int, config: TimingConfig, rounds: int = 5) -> dict:
    """Device-to-device ``copy_`` of ``nbytes``: GB/s counting bytes read plus written.

    The roofline every ``% copy`` is relative to: measured in the same run, on the same
    device, with the device-time timer (sleep, L2 flush, events) the optimizers get.
    """
    n = max(nbytes // 4, 1)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device, config)
    fig = Figure()
    for _ in range(rounds):
        one = timer.time_once(lambda: dst.copy_(src), reps=5)
        fig.add_round([one.median])
    moved = 2 * n * 4
    gbps = moved / (fig.median * 1e-3) / 1e9
    timer.release()
    return {"bytes": moved, "ms": fig.median, "ms_p20": fig.p20, "ms_p80": fig.p80,
            "reps": fig.samples * 5, "gbps": gbps, "timer": timer.kind}


# ------------------------------------------------------------------------- launch counts

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


# ------------------------------------------------------------------- clocks, power, heat

GPU_FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu")
_GPU_KEYS = ("sm_mhz", "mem_mhz", "power_w", "temp_c")


def summarize_samples(samples: list[tuple[float, tuple]]) -> dict | None:
    """min / median / max of each quantity over ``(time, values)`` samples."""
    if not samples:
        return None
    out: dict = {"samples": len(samples)}
    for i, key in enumerate(_GPU_KEYS):
        xs = [v[i] for _, v in samples if v[i] is not None]
        if xs:
            out[key] = [min(xs), quantile(xs, 0.5), max(xs)]
    return out


def parse_smi_line(line: str) -> tuple | None:
    """One ``--format=csv,noheader,nounits`` line of GPU_FIELDS as floats (None where
    nvidia-smi says '[N/A]')."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != len(GPU_FIELDS):
        return None
    vals = []
    for p in parts:
        try:
            vals.append(float(p))
        except ValueError:
            vals.append(None)
    return tuple(vals) if any(v is not None for v in vals) else None


class GpuMonitor:
    """Samples the GPU's SM and memory clocks, power draw and temperature in the background
    (``nvidia-smi -lms``), so each group of timed cases carries what the GPU ran at.

    Best-effort: without nvidia-smi (or on a CPU) it records nothing."""

    def __init__(self, device: torch.device, interval_ms: int = 250):
        self.samples: list[tuple[float, tuple]] = []
        self._proc = None
        self._thread = None
        if device.type != "cuda" or os.environ.get("TRITONADAM_BENCH_NO_SMI"):
            return
        idx = device.index if device.index is not None else torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:  # nvidia-smi numbers GPUs physically
            ids = [v.strip() for v in visible.split(",")]
            if idx < len(ids):
                idx = ids[idx]
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={','.join(GPU_FIELDS)}", "--format=csv,noheader,nounits",
                 f"--loop-ms={interval_ms}", f"--id={idx}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except Exception:  # noqa: BLE001 - no nvidia-smi
            self._proc = None
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self._proc.stdout:
            v = parse_smi_line(line)
            if v is not None:
                self.samples.append((time.monotonic(), v))

    def window(self, t0: float, t1: float) -> dict | None:
        return summarize_samples([s for s in list(self.samples) if t0 <= s[0] <= t1])

    def close(self):
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except Exception:  # noqa: BLE001
                self._proc.kill()
            self._proc = None
