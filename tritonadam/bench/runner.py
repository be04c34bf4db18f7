"""The bench loop: for each case (workload, dtype setup, provider, optionally clipping the
grads' norm before each step, and for tritonadam optionally a fixed launch config or first
use with an empty autotune cache), build, check, then time it in interleaved rounds with the
other cases of its group.

A *group* is the cases of one workload and setup in one phase; they share one set of grads
(:class:`~tritonadam.bench.timing.GradFeed`) and stay allocated together (split into
batches that fit in device memory), and every round times each of them once, in turn, so
that drift and noise hit them alike. Phases run most important first, so that a time budget
or a signal cuts the least useful ones: every provider at its default with clip + step, then
first use, then the config sweep (the configs nearest the default first), then the slow
providers. The default launch config is timed once: where tritonadam's own row ran it (with
autotuning off), the sweep reuses that row.
"""
from __future__ import annotations

import gc
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from . import check as checkmod
from . import tuning
from .interrupt import Interrupted, stop_if_requested
from .providers import (PROVIDERS, HyperParams, built_traffic, observed_layout, state_bytes,
                        tritonadam_held, with_clip)
from .timing import (FIGURES, FLUSH_BYTES, GpuMonitor, GradFeed, Subject, Timer, TimingConfig,
                     copy_bandwidth, count_kernel_launches)
from .workloads import DTYPE_BYTES, QUANT_STATES, SETUPS, Setup, Workload, torch_dtype

#: providers whose cases run after all others, so that a time budget drops them first
SLOW_PROVIDERS = ("torch-compile",)
PHASE_MAIN, PHASE_FIRST_USE, PHASE_SWEEP, PHASE_SLOW = range(4)


class Case(NamedTuple):
    workload: Workload
    setup: Setup
    provider: str
    config: object = None  # a LaunchConfig: tritonadam with this fixed config
    variant: str = ""  # "" | "first-use" | "fixed"
    clip: float | None = None  # clip + step: the grads' total norm clipped to this first


def phase_of(case: Case) -> int:
    if case.provider in SLOW_PROVIDERS:
        return PHASE_SLOW
    return {"first-use": PHASE_FIRST_USE, "fixed": PHASE_SWEEP}.get(case.variant, PHASE_MAIN)


@dataclass
class Options:
    device: torch.device
    providers: list[str]
    setups: list[str]
    workloads: list[Workload]
    #: per workload name, its own setups instead of ``setups``
    setups_for: dict[str, list[str]] = field(default_factory=dict)
    algo: str = "adamw"
    hp: HyperParams = field(default_factory=HyperParams)
    timing: TimingConfig = field(default_factory=TimingConfig)
    baseline: str = "torch-fused"
    check: bool = True
    check_steps: int = 2
    profile_launches: bool = True
    time_budget_s: float | None = None
    compile_max_tensors: int = 200
    check_only: tuple[str, ...] = ()  # providers checked on check-small but not timed
    check_workload: Workload | None = None
    check_setups: list[str] | None = None  # default: ``setups``
    clip_setups: list[str] = field(default_factory=list)  # also timed as clip + step
    max_norm: float = 1.0  # of clip + step cases
    seed: int = 0
    mem_fraction: float = 0.9
    copy_bytes: int | None = None
    progress: object = None  # callable(str) or None
    sweep: bool = False  # time tritonadam at each candidate launch config too
    sweep_max: int | None = None  # at most this many configs per workload (nearest the default)
    first_use: bool = False  # tritonadam's first step with an empty autotune cache, then tuned
    first_use_setups: list[str] | None = None  # default: every setup
    tuner_factory: Callable | None = None  # () -> Tuner for first use (tests inject a fake GPU)
    device_info: Callable | None = None  # (device) -> DeviceInfo for the sweep (tests)
    on_row: Callable | None = None  # (Runner) -> None after every finished group
    reuse_default: bool | None = None  # None: when autotuning is off
    monitor: bool = True  # sample GPU clocks, power and temperature
    budget_after_checks: bool = False  # the time budget counts from the end of the checks


def make_params(workload: Workload, setup: Setup, device: torch.device, seed: int):
    """Params ~ N(0, 0.02^2) in the param dtype (a usual init scale), without grads."""
    gen = torch.Generator(device=device).manual_seed(seed)
    pdt = torch_dtype(setup.param)
    params = []
    for _, shape in workload.shapes:
        p = torch.randn(shape, generator=gen, device=device, dtype=pdt).mul_(0.02)
        params.append(p.requires_grad_(True))
    return params


def make_tensors(workload: Workload, setup: Setup, device: torch.device, seed: int):
    """Params ~ N(0, 0.02^2) in the param dtype and grads ~ N(0, 1) in the grad dtype, each
    grad its own tensor (the correctness checks and launch counts)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    pdt, gdt = torch_dtype(setup.param), torch_dtype(setup.grad)
    params = []
    for _, shape in workload.shapes:
        p = torch.randn(shape, generator=gen, device=device, dtype=pdt).mul_(0.02)
        p.requires_grad_(True)
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=gdt)
        params.append(p)
    return params


def grad_bytes(workload: Workload, setup: Setup) -> int:
    return workload.params * DTYPE_BYTES[setup.grad]


def resident_estimate(workload: Workload, setup: Setup, amsgrad: bool) -> int:
    """Bytes one case needs on the device besides its group's grads, plus slack: the worst
    provider for this setup, of tritonadam (its bytes model: param and state) and torch
    (state in the param dtype; for master weights, its emulation keeps fp32 params, grads
    and state besides the model's params). Peers keep less than torch."""
    p = DTYPE_BYTES[setup.param]
    moments = 2 + (1 if amsgrad else 0)
    per = max(tritonadam_held(setup, amsgrad=amsgrad) - DTYPE_BYTES[setup.grad], p + moments * p)
    if setup.master:  # torch emulation: fp32 master + fp32 grads + fp32 m, v + model p
        per = max(per, p + 4 * (2 + moments))
    return int(workload.params * per * 1.05) + 64 * 2**20 + workload.tensors * 2048


def sample_block(setup: Setup) -> int | None:
    """Quantized state is checked on whole quantization blocks (their scale is their absmax)."""
    if setup.state not in QUANT_STATES:
        return None
    from ..quantize import QUANT_BLOCK

    return QUANT_BLOCK


def feed_estimate(workload: Workload, setup: Setup) -> int:
    """A group's grads: the pristine values and the two buffers fresh grads alternate in."""
    return 3 * grad_bytes(workload, setup)


def substituted(built, setup: Setup) -> bool:
    """True when the provider keeps its state in another dtype than the setup asks for
    (torch: state in the param dtype): a wrong result then comes from that dtype."""
    return built.layout.state != setup.state


def free_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    return free


def _fmt_gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


class _Timed(NamedTuple):
    row: dict
    subject: Subject
    built: object


class Runner:
    def __init__(self, opts: Options):
        self.opts = opts
        self.rows: list[dict] = []
        self.checks: list[dict] = []
        self.notes: list[str] = []
        self.copy: dict | None = None
        self.sweeps: list[dict] = []  # per (workload, setup): default config, configs considered
        self.interrupted = False
        self.t0 = time.monotonic()
        self.timer = Timer(opts.device, opts.timing)
        self.monitor: GpuMonitor | None = None
        self._reused: list[tuple[Case, Case]] = []  # (sweep case, the case whose row it reuses)
        self._failed: list = []  # cases whose timing raised

    # ------------------------------------------------------------------ helpers
    def _progress(self, text: str):
        if self.opts.progress:
            self.opts.progress(text)

    def _deadline(self) -> float | None:
        if self.opts.time_budget_s is None:  # 0 is a budget: nothing timed
            return None
        return self.t0 + self.opts.time_budget_s

    def _out_of_time(self) -> bool:
        d = self._deadline()
        return d is not None and time.monotonic() > d

    def _sync(self):
        if self.opts.device.type == "cuda":
            torch.cuda.synchronize(self.opts.device)

    def _cleanup(self):
        if self.opts.device.type == "cuda":  # device memory back before the next case
            gc.collect()
            torch.cuda.empty_cache()

    def _reuse_default(self) -> bool:
        o = self.opts
        if o.reuse_default is not None:
            return o.reuse_default
        from ..autotune import resolve_mode

        try:
            return resolve_mode(None) == "off"
        except ValueError:
            return False

    # ---------------------------------------------------------------- the run
    def cases(self) -> list[Case]:
        o = self.opts
        pairs = [(w, SETUPS[s]) for w in o.workloads for s in o.setups_for.get(w.name, o.setups)]
        main = [Case(w, s, p) for w, s in pairs for p in o.providers if p not in SLOW_PROVIDERS]
        clipped = [Case(w, s, p, clip=o.max_norm) for w, s in pairs if s.name in o.clip_setups
                   for p in o.providers]
        main += [c for c in clipped if c.provider not in SLOW_PROVIDERS]
        fu_setups = o.first_use_setups
        first = [Case(w, s, "tritonadam", variant="first-use") for w, s in pairs
                 if fu_setups is None or s.name in fu_setups] if o.first_use else []
        sweep: list[tuple[int, int, Case]] = []
        self._reused = []
        if o.sweep:
            reuse = "tritonadam" in o.providers and self._reuse_default()
            for k, (w, s) in enumerate(pairs):
                default = None
                for rank, cfg in enumerate(self.sweep_configs(w, s)):
                    case = Case(w, s, "tritonadam", cfg, "fixed")
                    if reuse and default is None and cfg == self._default_of(w, s):
                        default = cfg
                        self._reused.append((case, Case(w, s, "tritonadam")))
                        continue
                    sweep.append((rank, k, case))
        slow = [Case(w, s, p) for w, s in pairs for p in o.providers if p in SLOW_PROVIDERS]
        slow += [c for c in clipped if c.provider in SLOW_PROVIDERS]
        return main + first + [c for *_, c in sorted(sweep, key=lambda t: t[:2])] + slow

    def _device_info(self):
        from ..autotune import DeviceInfo, get_tuner

        o = self.opts
        if o.device_info is not None:
            return o.device_info(o.device)
        if o.device.type == "cuda":
            return get_tuner().device_info(o.device)
        return DeviceInfo("cuda", "cpu", "*", "-")

    def _default_of(self, w: Workload, s: Setup):
        from ..autotune import arch_default, size_bucket

        info = self._device_info()
        return arch_default(info.backend, info.arch, size_bucket(w.params)).config

    def sweep_configs(self, w: Workload, s: Setup) -> list:
        """The configs the sweep times for ``w``, recorded in ``self.sweeps``. On the CPU
        (interpreter) the CUDA space without SM-count pruning stands in for a GPU's."""
        from ..autotune import size_bucket

        o = self.opts
        info = self._device_info()
        default = self._default_of(w, s)
        cfgs = tuning.fixed_configs(info.backend, w.params, num_sms=info.num_sms, default=default)
        considered = len(cfgs)
        if o.sweep_max and len(cfgs) > o.sweep_max:
            cfgs = cfgs[: o.sweep_max]
            if default not in cfgs:
                cfgs[-1] = default
        self.sweeps.append({"workload": w.name, "setup": s.name, "default": default.to_json(),
                            "bucket": size_bucket(w.params), "considered": considered,
                            "swept": len(cfgs)})
        return cfgs

    def batches(self, cases: list[Case]) -> list[list[Case]]:
        """Consecutive cases of one phase, workload and setup, split so that each batch
        (its cases and their shared grads) fits in the device memory free now."""
        o = self.opts
        free = free_device_bytes(o.device)
        out: list[list[Case]] = []
        used = 0
        for case in cases:
            key = (phase_of(case), case.workload.name, case.setup.name)
            need = resident_estimate(case.workload, case.setup, o.hp.amsgrad)
            if out and (phase_of(out[-1][0]), out[-1][0].workload.name, out[-1][0].setup.name) == key:
                if free is None or used + need <= self._budget(free, case):
                    out[-1].append(case)
                    used += need
                    continue
            out.append([case])
            used = need
        return out

    def _budget(self, free: int, case: Case) -> int:
        flush = FLUSH_BYTES if self.opts.timing.flush else 0
        return int(free * self.opts.mem_fraction) - flush - feed_estimate(case.workload, case.setup)

    def run(self):
        o = self.opts
        try:
            if o.monitor:
                self.monitor = GpuMonitor(o.device)
            self.measure_copy()
            if o.budget_after_checks:
                self.t0, budget = time.monotonic(), o.time_budget_s
                o.time_budget_s = None
                self.run_checks()
                o.time_budget_s, self.t0 = budget, time.monotonic()
            else:
                self.run_checks()
            cases = self.cases()
            batches = self.batches(cases)
            done = 0
            for batch in batches:
                self.run_batch(batch, done, len(cases))
                done += len(batch)
                if o.on_row:
                    self._finish_rows()
                    o.on_row(self)
        except (Interrupted, KeyboardInterrupt):
            self.interrupted = True
            self.notes.append("interrupted: results below are the cases finished before the signal")
        finally:
            self.timer.release()
            if self.monitor is not None:
                self.monitor.close()
            self._cleanup()
        self._finish_rows()
        return self

    def _finish_rows(self):
        self.add_reused_rows()
        self.add_speedups()

    def measure_copy(self):
        o = self.opts
        if o.copy_bytes == 0:
            return
        dev = o.device
        if dev.type != "cuda":
            # A CPU memcpy is no roofline for CPU optimizers whose data may sit in cache,
            # and says nothing about a GPU: leave '% copy' empty.
            return
        free = free_device_bytes(dev) or 0
        nbytes = o.copy_bytes or min(1 << 30, max(free // 4, 1 << 20))
        self._progress(f"copy bandwidth: {nbytes / 2**20:.0f} MiB device-to-device copy_")
        try:
            t0 = time.monotonic()
            self.copy = copy_bandwidth(dev, nbytes, o.timing)
            if self.monitor is not None:
                self.copy["gpu"] = self.monitor.window(t0, time.monotonic())
        except Exception as e:  # noqa: BLE001 - report, don't die
            self.notes.append(f"copy bandwidth not measured: {type(e).__name__}: {e}")
        self._cleanup()

    # ------------------------------------------------------------------ checks
    def run_checks(self):
        """Correctness of each provider on small odd-sized tensors (``check-small``)."""
        o = self.opts
        if not o.check or o.check_workload is None:
            return
        names = [p for p in o.providers if p not in SLOW_PROVIDERS] + [
            p for p in o.check_only if p not in o.providers]
        for pname in names:
            prov = PROVIDERS[pname]
            why = prov.unavailable(o.device)
            for sname in o.check_setups or o.setups:
                s = SETUPS[sname]
                for clip in (None, o.max_norm) if sname in o.clip_setups else (None,):
                    entry = {"provider": pname, "workload": o.check_workload.name, "setup": sname,
                             "steps": o.check_steps}
                    if clip is not None:
                        entry["clip"] = clip
                    if why is None:
                        why_case = prov.unsupported(s, o.algo, o.hp, o.check_workload, o.device,
                                                    {"compile_max_tensors": o.compile_max_tensors,
                                                     "clip": clip})
                    else:
                        why_case = why
                    if why_case:
                        entry.update(result="skipped", reason=why_case)
                    elif self._out_of_time():
                        entry.update(result="skipped", reason="time budget spent (--time-budget)")
                    else:
                        stop_if_requested()
                        what = f"{pname} clip + step" if clip is not None else pname
                        self._progress(f"check {what} {sname} on {o.check_workload.name}")
                        self._check_one(entry, prov, s, clip)
                    self.checks.append(entry)

    def _check_one(self, entry: dict, prov, s: Setup, clip: float | None):
        """One correctness check on ``check-small``, recorded in ``entry``."""
        o = self.opts
        params = built = sample = None
        try:
            params = make_tensors(o.check_workload, s, o.device, o.seed)
            sample = checkmod.choose_sample(params, seed=o.seed, block=sample_block(s))
            norm = self._norm_before(params, clip, sample)
            built, returned = self._first_steps(prov, params, s, clip)
            observed_layout(built)
            res = self._check(sample, built, o.check_steps, s, clip, norm, returned)
            twin = prov.exact_twin(s) if clip is None else None
            if twin is not None:
                twin_params = make_tensors(o.check_workload, twin, o.device, o.seed)
                self._first_steps(prov, twin_params, twin, None)
                differ = checkmod.differing_elements(built.params, twin_params)
                if differ:
                    res.add(f"{differ} elements off {twin.name}",
                            f"{differ} elements differ in their bits from {twin.name}")
                else:
                    res.add(f"bit for bit as {twin.name}")
            entry.update(result=res.text(), ok=res.ok, worst=res.worst, elements=res.elements,
                         detail=res.detail, label=built.label)
            if not res.ok and substituted(built, s):
                entry.update(tolerated=True, result=not_counted(res, built.layout.state),
                             detail=torch_limit_note(prov.name, s, built.layout.state, res.detail))
        except (Interrupted, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001
            entry.update(result="error", ok=False, reason=f"{type(e).__name__}: {e}")
        finally:
            params = built = sample = None
            self._cleanup()

    def _build(self, prov, params, s: Setup, clip: float | None, **extra):
        """``prov``'s optimizer over ``params``, clipping first when ``clip`` is a max norm."""
        built = prov.build(params, s, self.opts.algo, self.opts.hp, **extra)
        return with_clip(prov, built, s, clip) if clip is not None else built

    def _first_steps(self, prov, params, s: Setup, clip: float | None, **extra):
        """Build and take the ``check_steps`` steps that precede the check and the timing;
        returns ``(built, what the first step returned)``."""
        built = self._build(prov, params, s, clip, **extra)
        returned = [built.step() for _ in range(self.opts.check_steps)][0]
        self._sync()
        return built, returned

    @staticmethod
    def _norm_before(params, clip: float | None, sample) -> float | None:
        """For a checked clip + step case, the grads' float64 norm before any step (torch's
        clip rewrites them)."""
        return checkmod.grad_norm(params) if clip is not None and sample is not None else None

    def _check(self, sample, built, steps: int, s: Setup, clip: float | None, norm, returned):
        """``built``'s params after ``steps`` steps (and those its build took) against the
        reference on ``sample``; ``norm``, ``returned``: a clip + step case's norms
        (``_norm_before``, first step's)."""
        o = self.opts
        clipped = checkmod.Clipped(clip, norm, float(returned)) if clip is not None else None
        return checkmod.check_after_steps(sample, built.params, steps + built.pre_steps, o.algo, o.hp,
                                          s, built.layout, clipped, lr_tol=built.check_lr_tol)

    def count_launches(self, timed: list) -> None:
        """Kernel launches per step of each provider's default case, from torch.profiler,
        on the live optimizer once its group's rounds are done (the profiler never runs
        while a group is timed)."""
        o = self.opts
        if not o.profile_launches or o.device.type != "cuda":
            return
        for t in timed:
            if t.row.get("variant"):
                continue
            if self._out_of_time():
                t.row["launches_error"] = "not counted: time budget spent"
                continue
            try:
                t.subject.rewrite_grads()
                t.row["launches"] = count_kernel_launches(t.subject.step, o.device)
            except (Interrupted, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001
                t.row["launches_error"] = f"{type(e).__name__}: {e}"

    # ------------------------------------------------------------------ rows
    def _base_row(self, case: Case) -> dict:
        w, s = case.workload, case.setup
        row = {"workload": w.name, "profile": w.profile, "params": w.params,
               "tensors": w.tensors, "setup": s.name, "provider": case.provider}
        if case.clip is not None:
            row["clip"] = case.clip
        if case.variant:
            row["variant"] = case.variant
        if case.config is not None:
            row["config"] = case.config.to_json()
        return row

    def _skip_row(self, case: Case, reason, status="skipped") -> dict:
        row = self._base_row(case)
        row.update(status=status, reason=reason)
        return row

    def _build_first_use(self, prov, params, s):
        """The optimizer after first use with an empty autotune cache; (built, measured, steps)."""
        o = self.opts
        box = {}

        def build():
            box["built"] = prov.build(params, s, o.algo, o.hp, autotune="on")
            return box["built"].optimizer

        from ..autotune import Tuner

        with tempfile.TemporaryDirectory(prefix="tritonadam-bench-first-use-") as cache_dir:
            _, measured = tuning.first_use(build, self._sync, cache_dir, o.tuner_factory or Tuner)
        return box["built"], measured, 1 + tuning.LATER_STEPS

    def _why_not(self, case: Case) -> str | None:
        o = self.opts
        prov = PROVIDERS[case.provider]
        return prov.unavailable(o.device) or prov.unsupported(
            case.setup, o.algo, o.hp, case.workload, o.device,
            {"compile_max_tensors": o.compile_max_tensors, "clip": case.clip})

    def prepare_case(self, case: Case, feed: GradFeed | None) -> tuple[dict, _Timed | None, GradFeed | None]:
        """Build and check one case. Returns its row, what the timer needs (None when the
        case is not timed: skipped, failed, error) and the group's grads (made here on the
        first case that needs them)."""
        o = self.opts
        w, s, pname = case.workload, case.setup, case.provider
        prov = PROVIDERS[pname]
        why = self._why_not(case)
        if why:
            return self._skip_row(case, why), None, feed
        need = resident_estimate(w, s, o.hp.amsgrad) + (FLUSH_BYTES if o.timing.flush else 0)
        if feed is None:
            need += feed_estimate(w, s)
        free = free_device_bytes(o.device)
        if free is not None and need > free * o.mem_fraction:
            return self._skip_row(case, f"needs about {_fmt_gib(need)}, {_fmt_gib(free)} free on "
                                        "the device"), None, feed
        row = self._base_row(case)
        params = built = sample = None
        try:
            if feed is None:
                feed = GradFeed([shape for _, shape in w.shapes], torch_dtype(s.grad), o.device,
                                o.seed + 1)
            params = make_params(w, s, o.device, o.seed)
            # The group's cases share the feed: a case before this one (torch's in-place
            # clip, in its untimed first steps) may have written its buffer. Each case's
            # check starts from the seed's grads, as its timed steps do.
            feed.write(feed.bufs[0])
            for p, g in zip(params, feed.views(feed.bufs[0])):
                p.grad = g
            sample = checkmod.choose_sample(params, seed=o.seed, block=sample_block(s)) if o.check else None
            norm = self._norm_before(params, case.clip, sample)
            self._sync()
            mem0 = None
            if o.device.type == "cuda":
                mem0 = torch.cuda.memory_allocated(o.device)
                torch.cuda.reset_peak_memory_stats(o.device)
            t_build = time.perf_counter()
            returned = None
            if case.variant == "first-use":
                built, measured, steps = self._build_first_use(prov, params, s)
                row.update(measured, config=measured["tuned"])
            else:
                extra = {"config": case.config} if case.config is not None else {}
                built, returned = self._first_steps(prov, params, s, case.clip, **extra)
                steps = o.check_steps
            self._sync()
            row["first_steps_s"] = time.perf_counter() - t_build
            if mem0 is not None:
                row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(o.device) - mem0
            observed_layout(built)
            row["label"] = built.label
            if sample is not None:
                res = self._check(sample, built, steps, s, case.clip, norm, returned)
                row.update(check=res.text(), check_ok=res.ok, check_worst=res.worst)
                if not res.ok:
                    if substituted(built, s):
                        # Not a bug in the provider: the dtype it had to use instead loses
                        # the result (fp16 state). Time it anyway, and say so.
                        row.update(check=not_counted(res, built.layout.state),
                                   check_tolerated=True,
                                   check_detail=torch_limit_note(pname, s, built.layout.state,
                                                                 res.detail))
                    else:
                        row.update(status="failed", reason=f"wrong result after {steps} "
                                                          f"steps: {res.detail}")
                        return row, None, feed
            else:
                row.update(check="not checked", check_ok=None)
            tr = built_traffic(built, o.algo, o.hp.amsgrad)
            row.update(bytes_per_param=tr.bytes_per_param, traffic=tr.describe(),
                       bytes_per_step=w.params * tr.bytes_per_param, state_bytes=state_bytes(built),
                       grads="static (rewritten in place)" if built.static_grads else "fresh")
            subject = Subject(built.step, params, feed, static_grads=built.static_grads)
            return row, _Timed(row, subject, built), feed
        except (Interrupted, KeyboardInterrupt):
            raise
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="skipped", reason=f"out of memory: {str(e).splitlines()[0]}")
        except Exception as e:  # noqa: BLE001 - one broken provider must not end the run
            row.update(status="error", reason=f"{type(e).__name__}: {e}")
        params = built = sample = None
        return row, None, feed

    def run_batch(self, batch: list[Case], done: int, total: int) -> None:
        """Build and check every case of ``batch``, then time them in interleaved rounds."""
        o = self.opts
        rows: list[dict] = []
        timed: list[_Timed] = []
        feed = None
        t_start = time.monotonic()
        write: list[float] = []
        try:
            for k, case in enumerate(batch):
                tag = f"[{done + k + 1}/{total}] {case_name(case)}"
                stop_if_requested()
                if self._out_of_time():
                    rows.append(self._skip_row(case, "time budget spent (--time-budget)"))
                    continue
                self._progress(tag)
                row, t, feed = self.prepare_case(case, feed)
                rows.append(row)
                if t is not None:
                    timed.append(t)
            if not timed:
                return
            deadline = self._deadline()
            timed = [t for t in timed if self._guarded(t, self.timer.warm_up, t.subject, deadline)]
            for r in range(o.timing.rounds):
                if not timed:
                    break
                if r and self._out_of_time():
                    self.notes.append(f"{batch[0].workload.name} {batch[0].setup.name}: {r} of "
                                      f"{o.timing.rounds} rounds (time budget)")
                    break
                self._progress(f"round {r + 1}/{o.timing.rounds}: {len(timed)} cases of "
                               f"{batch[0].workload.name} {batch[0].setup.name}")
                w_ms = self.timer.write_ms(feed)
                write.append(w_ms)
                timed = [t for t in timed if self._guarded(t, self.timer.round, t.subject, w_ms)]
            self.count_launches(timed)
        finally:
            gpu = self.monitor.window(t_start, time.monotonic()) if self.monitor else None
            for t in timed:
                self._finish_timed(t, write, gpu)
            self._failed = []
            for row in rows:
                if row.get("status") == "ok" and row.get("device_ms") is not None:
                    what = " clip + step" if row.get("clip") else ""
                    self._progress(f"{row['workload']} {row['setup']} {row['provider']}{what}: device "
                                   f"{row['device_ms']:.4g} ms, host {row['host_ms']:.4g} ms, "
                                   f"steady {row['steady_ms']:.4g} ms")
            self.rows.extend(rows)
            timed = []
            feed = None
            self._cleanup()

    def _guarded(self, t: _Timed, fn, *args) -> bool:
        """``fn(*args)`` for one case; an error ends that case (its row says why), not the run."""
        try:
            stop_if_requested()
            fn(*args)
            return True
        except (Interrupted, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001
            t.row.update(status="error", reason=f"while timing: {type(e).__name__}: {e}")
            self._failed.append(t)
            return False

    def _finish_timed(self, t: _Timed, write: list[float], gpu: dict | None) -> None:
        row, s = t.row, t.subject
        if row.get("status") == "error":
            return
        for name in FIGURES:
            row.update(s.figures[name].as_row(name))
        row.update(rounds=len(s.figures["host"].rounds), reps=s.reps, steady_n=s.steady_n,
                   sleep_short=s.sleep_short, steady_raw_ms=s.steady_raw.median if s.steady_raw.rounds else None,
                   grad_write_ms=sorted(write)[len(write) // 2] if write else None,
                   timer=self.timer.kind)
        if gpu:
            row["gpu"] = gpu
        if not s.figures["host"].rounds:
            row.update(status="skipped", reason="not timed: interrupted or out of time")
            return
        row["status"] = "ok"
        dev = row.get("device_ms")
        gbps = row["bytes_per_step"] / (dev * 1e-3) / 1e9 if dev else None
        row["gbps"] = gbps
        if self.copy and gbps is not None:
            row["pct_copy"] = 100.0 * gbps / self.copy["gbps"]
        if dev is None:
            row["device_note"] = ("no device time: the host was still enqueuing the step when "
                                  "the sleep before it ran out, at every rep")

    def add_reused_rows(self):
        """The sweep's default config: tritonadam's own row, where it ran that config."""
        if not self._reused:
            return
        have = {(r["workload"], r["setup"], r.get("variant"), _cfg_key(r.get("config"))) for r in self.rows}
        for sweep_case, source in self._reused:
            key = (sweep_case.workload.name, sweep_case.setup.name, "fixed",
                   _cfg_key(sweep_case.config.to_json()))
            if key in have:
                continue
            src = next((r for r in self.rows if r["workload"] == source.workload.name
                        and r["setup"] == source.setup.name and r["provider"] == "tritonadam"
                        and not r.get("variant") and not r.get("clip")), None)
            if src is None:
                continue
            row = dict(src, variant="fixed", config=sweep_case.config.to_json(),
                       reused_from="tritonadam (the default config, autotuning off)")
            row.pop("speedup", None)
            row.pop("speedup_steady", None)
            self.rows.append(row)
            have.add(key)

    def add_speedups(self):
        """Against the baseline's row of the same workload, setup and clip: on device time
        and steady-state time, with whether both move the same bytes per param."""
        base = {(r["workload"], r["setup"], r.get("clip")): r for r in self.rows
                if r["provider"] == self.opts.baseline and not r.get("variant") and r.get("status") == "ok"}
        for r in self.rows:
            b = base.get((r["workload"], r["setup"], r.get("clip")))
            if r.get("status") != "ok" or not b:
                continue
            if b.get("device_ms") and r.get("device_ms"):
                r["speedup"] = b["device_ms"] / r["device_ms"]
            if b.get("steady_ms") and r.get("steady_ms"):
                r["speedup_steady"] = b["steady_ms"] / r["steady_ms"]
            r["same_bytes"] = r.get("bytes_per_param") == b.get("bytes_per_param")


def _cfg_key(cfg):
    return tuning.config_key(cfg)


def not_counted(res, state: str) -> str:
    """A check result that misses the reference through the state a provider keeps."""
    return f"not counted ({res.worst:.2g} of tol with {state} state)"


def torch_limit_note(provider: str, setup: Setup, state: str, detail: str) -> str:
    """Why a provider keeping its state in another dtype than asked misses the reference,
    and that this is no failure of the run."""
    inf = "inf" in detail
    why = (f"{provider} keeps Adam state in the param dtype ({state}), not {setup.state}, and "
           f"computes in it")
    if inf and state == "fp16":
        why += ("; in fp16 eps=1e-8 rounds to 0 and exp_avg_sq underflows for small grads, so "
                "m / (sqrt(v) + eps) divides by 0")
    return (f"{why}: {detail}. This is the provider's own numerics with the state it keeps, "
            "not a tritonadam result, and does not fail the run")


def run(opts: Options) -> Runner:
    return Runner(opts).run()


def case_name(case: Case) -> str:
    what = case.provider
    if case.clip is not None:
        what += " clip + step"
    if case.variant == "first-use":
        what += " first use"
    elif case.config is not None:
        what += " " + tuning.config_text(case.config)
    return f"{case.workload.name} {case.setup.name} {what}"


def stderr_progress(tty: bool | None = None):
    """A progress printer: one rewritten line on a terminal, else a line per message."""
    tty = sys.stderr.isatty() if tty is None else tty
    width = [0]

    def show(text: str):
        if tty:
            pad = max(0, width[0] - len(text))
            sys.stderr.write("\r" + text + " " * pad)
            width[0] = len(text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def done():
        if tty and width[0]:
            sys.stderr.write("\r" + " " * width[0] + "\r")
            sys.stderr.flush()

    show.done = done
    return show
