"""The bench's timer: three figures per case (device, host, steady state), fresh grads,
interleaved rounds, and % of copy bandwidth from device time.

The CUDA path runs here against a simulated stream (a virtual host clock and GPU queue
standing in for ``torch.cuda``'s events, sleep and synchronize), so the logic that keeps
host time out of device time is checked on a CPU; the runner runs end to end on the CPU,
tritonadam in Triton's interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch

from tritonadam.bench import timing
from tritonadam.bench.timing import (Figure, GradFeed, Subject, Timer, TimingConfig,
                                     parse_smi_line, summarize_samples)

interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "") in ("", "0"),
                                      reason="runs the kernels in Triton's interpreter")


# ------------------------------------------------------------- a simulated CUDA stream

class FakeGpu:
    """One stream: work is queued at the host's time and runs after what is queued before."""

    def __init__(self):
        self.host = 0.0  # ms
        self.gpu = 0.0  # ms: when the queue drains

    def enqueue(self, ms: float) -> float:
        self.gpu = max(self.gpu, self.host) + ms
        return self.gpu

    def spend_host(self, ms: float):
        self.host += ms

    def sync(self):
        self.host = max(self.host, self.gpu)


@pytest.fixture
def fake_cuda(monkeypatch):
    g = FakeGpu()

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self, stream=None):
            self.t = g.enqueue(0.0)

        def query(self):
            return self.t <= g.host

        def synchronize(self):
            g.host = max(g.host, self.t)

        def elapsed_time(self, other):
            return other.t - self.t

    cycles_per_ms = 1_000_000
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: g.sync())
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: g.enqueue(cycles / cycles_per_ms))
    monkeypatch.setattr(Timer, "flush", lambda self: g.enqueue(0.05))
    monkeypatch.setattr(timing, "_now", lambda: g.host / 1e3)
    return g


class FakeFeed:
    """Grads that cost nothing: writing them is a short kernel."""

    def __init__(self, g: FakeGpu | None):
        self.g = g
        self.bufs = [torch.zeros(4), torch.zeros(4)]
        self.writes = 0

    def views(self, buf):
        return [buf[:2], buf[2:]]

    def write(self, buf):
        self.writes += 1
        if self.g is not None:
            self.g.enqueue(0.01)


def fake_step(g: FakeGpu, host_ms: float, device_ms: float, launches: int = 4):
    """A step that spends ``host_ms`` on the host, enqueuing ``launches`` kernels of
    ``device_ms`` in all as it goes."""

    def step():
        for _ in range(launches):
            g.spend_host(host_ms / launches)
            g.enqueue(device_ms / launches)

    return step


def _subject(g, host_ms, device_ms, static=False):
    params = [torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    return Subject(fake_step(g, host_ms, device_ms), params, FakeFeed(g), static_grads=static)


@pytest.mark.parametrize("host_ms,device_ms", [(0.3, 2.0), (5.0, 0.2), (2.0, 2.0)])
def test_device_time_excludes_host_time(fake_cuda, host_ms, device_ms):
    """The sleep queued before the step keeps the GPU busy while the host enqueues it: the
    events time the kernels alone, whether the step is device-bound or host-bound."""
    timer = Timer(torch.device("cuda"), TimingConfig(rounds=3, min_reps=2, max_reps=2, rep_ms=300))
    timer._cycles_per_ms = 1_000_000
    s = _subject(fake_cuda, host_ms, device_ms)
    timer.warm_up(s)
    assert s.sleep_ms > host_ms
    for _ in range(3):
        timer.round(s, timer.write_ms(s.feed))
    assert s.figures["device"].median == pytest.approx(device_ms)
    assert s.figures["host"].median == pytest.approx(host_ms)
    # back to back: the larger of the two per step, the grad write (0.01 ms) taken off
    assert s.figures["steady"].median == pytest.approx(max(host_ms, device_ms + 0.01) - 0.01, rel=0.05)
    assert s.sleep_short == 0 and len(s.figures["device"].rounds) == 3


def test_a_sleep_that_runs_out_is_caught_and_doubled(fake_cuda):
    """If the host is still enqueuing when the sleep ends, the GPU idled inside the timed
    window: the rep is dropped, counted, and the sleep doubled until it covers the step."""
    timer = Timer(torch.device("cuda"), TimingConfig(rounds=1, min_reps=3, max_reps=3))
    timer._cycles_per_ms = 1_000_000
    s = _subject(fake_cuda, 4.0, 1.0)
    s.sleep_ms = 0.5  # far too short for 4 ms of host time
    out = [timer.device_rep(s) for _ in range(5)]
    assert out[0][0] is None and s.sleep_short >= 3
    assert out[-1][0] == pytest.approx(1.0)  # once the sleep covers the enqueue
    assert s.sleep_ms >= 4.0


def test_without_the_sleep_the_old_timer_mixed_host_into_device_time(fake_cuda):
    """What the first GPU run measured: sync, flush, events around the step from an idle
    GPU gives host + device time for a host-bound step (the figure the issue named)."""
    g = fake_cuda
    step = fake_step(g, 5.0, 0.2)
    g.sync()
    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
    a.record()
    step()
    b.record()
    assert a.elapsed_time(b) == pytest.approx(5.0, rel=0.1)  # host time, not the 0.2 ms


def test_copy_bandwidth_uses_the_device_timer(fake_cuda):
    g = fake_cuda
    timer = Timer(torch.device("cuda"), TimingConfig())
    timer._cycles_per_ms = 1_000_000
    fig = timer.time_once(lambda: (g.spend_host(0.05), g.enqueue(0.25)), reps=5)
    assert fig.median == pytest.approx(0.25)


# ------------------------------------------------------------------------ on the CPU

def test_cpu_timer_gives_three_wall_clock_figures():
    timer = Timer(torch.device("cpu"), TimingConfig(warmup_ms=0, rep_ms=0, rounds=3, min_reps=2, max_reps=2))
    calls = []
    params = [torch.zeros(3, requires_grad=True)]
    feed = GradFeed([(3,)], torch.float32, torch.device("cpu"), seed=0)
    for p, g in zip(params, feed.views(feed.bufs[0])):
        p.grad = g
    s = Subject(lambda: calls.append(params[0].grad), params, feed)
    timer.warm_up(s)
    for _ in range(3):
        timer.round(s, timer.write_ms(feed))
    assert timer.kind == "cpu-wall"
    for name in timing.FIGURES:
        f = s.figures[name]
        assert len(f.rounds) == 3 and f.p20 <= f.median <= f.p80 and f.median >= 0
    assert s.figures["host"].samples == 3 * s.reps


def test_fresh_grads_are_new_tensors_at_new_addresses():
    feed = GradFeed([(4,), (2, 3), ()], torch.float32, torch.device("cpu"), seed=1)
    params = [torch.zeros(sh, requires_grad=True) for sh in feed.shapes]
    for p, g in zip(params, feed.views(feed.bufs[0])):
        p.grad = g
    s = Subject(lambda: None, params, feed)
    seen = [[p.grad for p in params]]
    for _ in range(3):
        s.fresh_grads()
        seen.append([p.grad for p in params])
    for before, after in zip(seen, seen[1:]):
        assert all(a is not b for a, b in zip(after, before))  # new tensor objects
        assert [a.data_ptr() for a in after[:2]] != [b.data_ptr() for b in before[:2]]  # moved
        for a, v in zip(after, feed.views(feed.g0)):  # written from the pristine values
            torch.testing.assert_close(a, v)
    # steady state and static grads: the same tensors, rewritten in place
    kept = [p.grad for p in params]
    kept[0].fill_(7.0)
    s.rewrite_grads()
    assert all(p.grad is k for p, k in zip(params, kept)) and float(kept[0][0]) != 7.0
    static = Subject(lambda: None, params, feed, static_grads=True)
    static.fresh_grads()
    assert all(p.grad is k for p, k in zip(params, kept))


def test_figure_spread_is_across_rounds():
    f = Figure()
    for reps in ([1.0, 9.0, 2.0], [3.0], [5.0, 5.0]):
        f.add_round(reps)
    assert f.rounds == [2.0, 3.0, 5.0] and f.samples == 6 and f.median == 3.0
    assert f.as_row("device") == {"device_ms": 3.0, "device_p20": pytest.approx(2.4),
                                  "device_p80": pytest.approx(4.2)}
    assert Figure().as_row("host") == {"host_ms": None, "host_p20": None, "host_p80": None}


def test_gpu_samples_parse_and_summarize():
    assert parse_smi_line("1980, 3201, 412.5, 47") == (1980.0, 3201.0, 412.5, 47.0)
    assert parse_smi_line("1980, 3201, [N/A], 47") == (1980.0, 3201.0, None, 47.0)
    assert parse_smi_line("garbage") is None
    out = summarize_samples([(0.0, (1000.0, 3000.0, 300.0, 40.0)), (1.0, (2000.0, 3000.0, None, 50.0)),
                             (2.0, (1500.0, 3000.0, 500.0, 45.0))])
    assert out["samples"] == 3 and out["sm_mhz"] == [1000.0, 1500.0, 2000.0]
    assert out["power_w"] == [300.0, 400.0, 500.0] and summarize_samples([]) is None
    assert timing.GpuMonitor(torch.device("cpu")).window(0, 1e9) is None


@interpreter_only
def test_runner_gives_three_figures_and_pct_copy_from_device_time():
    """The whole loop on the CPU, tritonadam in Triton's interpreter and torch beside it,
    with a copy bandwidth standing in for a GPU's: every row has the three figures, and
    % copy is bytes per step over *device* time against it."""
    from tritonadam.bench.providers import HyperParams
    from tritonadam.bench.runner import Options, Runner
    from tritonadam.bench.workloads import make_workload

    class WithCopy(Runner):
        def measure_copy(self):
            self.copy = {"gbps": 0.5, "bytes": 1, "ms": 1.0}

    opts = Options(device=torch.device("cpu"), providers=["tritonadam", "torch-fused"],
                   setups=["bf16", "bf16-bf16state"], workloads=[make_workload("many-small", 3 * 4096)],
                   hp=HyperParams(), timing=TimingConfig(warmup_ms=0, rep_ms=0, rounds=2, min_reps=1,
                                                         max_reps=1, flush=False),
                   check_workload=None, profile_launches=False, monitor=False)
    runner = WithCopy(opts).run()
    rows = {(r["setup"], r["provider"]): r for r in runner.rows}
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values()), runner.rows
    for r in rows.values():
        for name in ("device", "host", "steady"):
            assert r[f"{name}_ms"] > 0 and r[f"{name}_p20"] <= r[f"{name}_ms"] <= r[f"{name}_p80"]
        assert r["rounds"] == 2 and r["timer"] == "cpu-wall" and r["grads"] == "fresh"
        assert r["pct_copy"] == pytest.approx(100 * r["bytes_per_step"] / (r["device_ms"] * 1e-3) / 1e9 / 0.5)
        assert r["check"].startswith("ok")
    # equal work side by side: the bf16-state pair moves the same bytes, the bf16 pair not
    assert rows["bf16-bf16state", "tritonadam"]["same_bytes"] is True
    assert rows["bf16", "tritonadam"]["same_bytes"] is False
    assert rows["bf16", "tritonadam"]["bytes_per_param"] == 22 and rows["bf16", "torch-fused"]["bytes_per_param"] == 14
