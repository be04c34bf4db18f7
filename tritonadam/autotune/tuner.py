"""Choosing a launch config: modes, timing within a budget, the disk cache, and agreement
across the ranks of a distributed job.

The tuner only ever runs callables from ``make_runner(config, numel)``, which launch the
kernel on scratch buffers: it has no way to reach the user's tensors, so tuning cannot
apply an optimizer step twice (the ``triton.autotune`` trap, DESIGN.md section 6).
"""
from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import _env
from .cache import CacheIdentity, DiskCache, _now, entry_key
from .configs import (
    MIN_BUCKET,
    DeviceInfo,
    LaunchConfig,
    arch_default,
    bucket_numel,
    candidate_configs,
    config_space,
    report_prune_reason,
    resident_warps,
    size_bucket,
    space_hash,
    space_id,
)
from .device import default_config

__all__ = [
    "MODES",
    "DEFAULT_BUDGET_S",
    "DEFAULT_COMPILE_BUDGET_S",
    "Measurement",
    "TuneResult",
    "Choice",
    "Tuner",
    "resolve_mode",
]

MODES = ("off", "on", "cache-only")
# Boolean spellings as elsewhere in _env; anything else unknown is an error, not a guess.
_MODE_ALIASES = {
    "0": "off", "false": "off", "no": "off",
    "1": "on", "true": "on", "yes": "on",
    "cache_only": "cache-only",
}
DEFAULT_BUDGET_S = 10.0
# Compiling a config takes 0.5-11 s (more when it spills): it gets its own budget, spent
# before timing starts, so that the timing budget buys timings.
DEFAULT_COMPILE_BUDGET_S = 30.0
# A timed unit repeats a small launch until it moves about this many bytes, so that the
# GPU's work, not the event pair's resolution, decides its time (at most MAX_LAUNCHES_PER_TIMING).
TIMED_BYTES = 256 << 20
MAX_LAUNCHES_PER_TIMING = 100
# Scratch buffers are capped at 4 GiB and a quarter of the free memory: tuning happens on the
# first step, when the user's model, activations and optimizer state are already resident.
DEFAULT_MAX_SCRATCH_BYTES = 4 << 30
DEFAULT_SCRATCH_FRACTION = 0.25
# Used for the memory cap when the caller does not say: more than any Adam variant keeps
# per element (bf16 p + g, fp32 master, m, v, max_v = 20 B).
_FALLBACK_BYTES_PER_ELEM = 32

Runner = Callable[[], None]
MakeRunner = Callable[[LaunchConfig, int], Runner]


def resolve_mode(mode: str | None = None) -> str:
    """The effective mode: the ``mode`` argument, else ``TRITONADAM_AUTOTUNE``, else "on"."""
    raw = mode if mode is not None else _env.autotune_mode()
    if raw is None:
        return "on"
    m = str(raw).strip().lower()
    m = _MODE_ALIASES.get(m, m)
    if m not in MODES:
        src = "mode=" if mode is not None else "TRITONADAM_AUTOTUNE="
        raise ValueError(f"{src}{raw!r}: expected one of {', '.join(MODES)}")
    return m


@dataclass(frozen=True)
class Measurement:
    config: LaunchConfig
    time_ms: float | None  # None: the config failed (see error)
    error: str | None = None


@dataclass
class TuneResult:
    config: LaunchConfig
    time_ms: float
    gbps: float | None
    runner_up: Measurement | None
    default: Measurement | None
    measurements: list
    numel_timed: int
    considered: int
    complete: bool
    elapsed_s: float
    entry: dict = field(repr=False, default_factory=dict)


class _Repeat:
    """``fn`` run ``n`` times per call, as one timed unit; attributes read through to ``fn``."""

    def __init__(self, fn: Runner, n: int):
        self.fn, self.n = fn, n

    def __call__(self) -> None:
        for _ in range(self.n):
            self.fn()

    def __getattr__(self, name):
        return getattr(self.fn, name)


def launches_per_timing(numel: int, bytes_per_elem: float | None) -> int:
    """How many launches of ``numel`` elements one timing repeats (see TIMED_BYTES)."""
    moved = max(numel * (bytes_per_elem or _FALLBACK_BYTES_PER_ELEM), 1)
    return int(min(MAX_LAUNCHES_PER_TIMING, max(1, math.ceil(TIMED_BYTES / moved))))


@dataclass(frozen=True)
class Choice:
    """One decision made in this process (see ``choices()``)."""

    key: tuple
    bucket: int
    device: str
    config: LaunchConfig
    source: str
    time_ms: float | None = None
    gbps: float | None = None
    runner_up: str | None = None


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, (RuntimeError, MemoryError)) and "out of memory" in str(e).lower()


def _dist_world():
    """torch.distributed if a job with more than one rank is running, else None."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist if dist.get_world_size() > 1 else None


def _default_store():
    """The default process group's key-value store, or None (private torch API: guarded)."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:
        return False


class Tuner:
    """Picks and remembers launch configs.

    Every collaborator is injectable so the choice logic runs on CPU in tests:
    ``timer(fn) -> ms`` (default: CUDA events, warm-up, median), ``clock() -> s`` (measures
    the budgets), ``cache`` (a DiskCache), ``device_info(device) -> DeviceInfo``,
    ``free_bytes(device) -> int | None``, ``source_hash`` (names the kernel source in the
    cache identity; default: a hash of ``tritonadam/kernels/*.py``). ``time_any_device=True``
    lets a CPU device be "timed" (only meaningful with a fake timer); by default CPU and
    Triton's interpreter never tune.

    Tuning an entry has two phases: compile every candidate (``make_runner(...).compile()``
    when the runner has it) within the compile budget and drop those the compiler's report
    rules out (spills, too few resident warps), then time the rest within the budget.
    """

    def __init__(
        self,
        *,
        timer: Callable[[Runner], float] | None = None,
        clock: Callable[[], float] | None = None,
        budget_s: float | None = None,
        compile_budget_s: float | None = None,
        cache: DiskCache | None = None,
        source_hash: str | None = None,
        device_info: Callable[[torch.device], DeviceInfo] | None = None,
        free_bytes: Callable[[torch.device], int | None] | None = None,
        time_any_device: bool = False,
        verbose: bool | None = None,
        max_scratch_bytes: int = DEFAULT_MAX_SCRATCH_BYTES,
        scratch_fraction: float = DEFAULT_SCRATCH_FRACTION,
        stream=None,
        agreement: str = "auto",
        agreement_timeout_s: float | None = None,
    ):
        if agreement not in ("auto", "store", "broadcast"):
            raise ValueError(f"agreement={agreement!r}: expected 'auto', 'store' or 'broadcast'")
        self.agreement = agreement
        self.agreement_timeout_s = agreement_timeout_s
        self._timer = timer
        self.clock = clock if clock is not None else time.perf_counter
        self._budget_s = budget_s
        self._compile_budget_s = compile_budget_s
        self.cache = cache if cache is not None else DiskCache()
        self.source_hash = source_hash
        self._device_info = device_info
        self._free_bytes = free_bytes
        self.time_any_device = time_any_device
        self._verbose = verbose
        self.max_scratch_bytes = int(max_scratch_bytes)
        self.scratch_fraction = float(scratch_fraction)
        self._stream = stream
        self._memory: dict = {}
        self._choices: list[Choice] = []
        self._lock = threading.RLock()

    # -- small helpers ------------------------------------------------------------------

    @property
    def verbose(self) -> bool:
        return self._verbose if self._verbose is not None else _env.autotune_verbose()

    @property
    def budget_s(self) -> float:
        if self._budget_s is not None:
            return float(self._budget_s)
        env = _env.autotune_budget_s()
        return float(env) if env is not None else DEFAULT_BUDGET_S

    @property
    def compile_budget_s(self) -> float:
        if self._compile_budget_s is not None:
            return float(self._compile_budget_s)
        env = _env.autotune_compile_budget_s()
        return float(env) if env is not None else DEFAULT_COMPILE_BUDGET_S

    @property
    def timer(self) -> Callable[[Runner], float]:
        if self._timer is None:
            from .timing import cuda_event_timer

            self._timer = cuda_event_timer
        return self._timer

    def _say(self, msg: str, *, always: bool = False) -> None:
        if always or self.verbose:
            print(f"tritonadam.autotune: {msg}", file=self._stream or sys.stderr, flush=True)

    def can_time(self, device: torch.device) -> bool:
        if self.time_any_device:
            return True
        return device.type == "cuda" and not _env.interpret() and torch.cuda.is_available()

    def device_info(self, device: torch.device) -> DeviceInfo:
        if self._device_info is not None:
            return self._device_info(device)
        from .device import device_info

        return device_info(device)

    def identity(self, info: DeviceInfo) -> CacheIdentity:
        from .device import kernel_source_hash, triton_version

        return CacheIdentity(
            backend=info.backend,
            gpu=info.name,
            capability=info.capability,
            triton=triton_version(),
            kernel_source_hash=self.source_hash or kernel_source_hash(),
            config_space_hash=space_hash(info.backend),
        )

    def scratch_numel(self, bucket: int, device: torch.device, bytes_per_elem: float | None) -> int:
        """Elements of the scratch launch for ``bucket``: the bucket's upper edge, capped by
        the scratch-memory budget (rounded down to a power of two). 0 = not enough memory."""
        limit = self.max_scratch_bytes
        free = self._free_bytes(device) if self._free_bytes is not None else None
        if free is None and self._free_bytes is None and device.type == "cuda" and not self.time_any_device:
            from .device import free_bytes

            free = free_bytes(device)
        if free is not None:
            limit = min(limit, int(free * self.scratch_fraction))
        per = bytes_per_elem or _FALLBACK_BYTES_PER_ELEM
        cap = int(limit // per)
        if cap < 2**MIN_BUCKET:
            return 0
        cap = 1 << (cap.bit_length() - 1)
        return min(bucket_numel(bucket), cap)

    # -- the public entry points --------------------------------------------------------

    def select(
        self,
        key: tuple,
        numel: int,
        device: torch.device,
        make_runner: MakeRunner,
        *,
        mode: str | None = None,
        bytes_per_elem: float | None = None,
    ) -> LaunchConfig:
        """See ``tritonadam.autotune.select_config``."""
        mode = resolve_mode(mode)
        dev = device if isinstance(device, torch.device) else torch.device(device)
        bucket = size_bucket(numel)
        mkey = (mode, dev.type, dev.index, key, bucket)
        hit = self._memory.get(mkey)
        if hit is not None:
            return hit
        if numel <= 0 and (self.agreement != "broadcast" or _dist_world() is None):
            # Nothing is launched. (With broadcast agreement every rank must still take part.)
            return default_config(dev)
        with self._lock:
            hit = self._memory.get(mkey)
            if hit is not None:
                return hit
            choice, keep = self._select_slow(mode, key, bucket, dev, make_runner, bytes_per_elem)
            if keep:
                self._memory[mkey] = choice.config
            if keep or not self._choices or self._choices[-1] != choice:
                self._choices.append(choice)
            return choice.config

    def _select_slow(self, mode, key, bucket, dev, make_runner, bpe):
        def choice(cfg, source, time_ms=None, gbps=None, runner_up=None):
            return Choice(tuple(key), bucket, str(dev), cfg, source, time_ms, gbps, runner_up)

        if not self.can_time(dev):
            why = "Triton interpreter" if _env.interpret() else f"{dev.type} device"
            cfg = default_config(dev, bucket_numel(bucket))
            self._say(f"{entry_key(key, bucket)}: {cfg.short()} (built-in default; {why}: not timed)")
            return choice(cfg, f"default ({why}: not timed)"), True

        info = self.device_info(dev)
        row = arch_default(info.backend, info.arch, bucket)
        default = row.config
        name = entry_key(key, bucket)
        if _capturing(dev):
            # Timing, allocating and syncing are all illegal inside a CUDA graph capture.
            self._say(f"{name}: {default.short()} (default; CUDA graph capture in progress)")
            return choice(default, "default (inside CUDA graph capture)"), False
        if mode == "off":
            self._say(f"{name}: {default.short()} ({row.status} for {info.arch}; autotune off)")
            return choice(default, f"{row.status} (autotune off)"), True

        # A malformed budget variable raises here, not inside the fallbacks.
        _ = self.budget_s, self.compile_budget_s

        def decide():
            try:
                return self._decide(mode, key, bucket, dev, info, default, make_runner, bpe, choice)
            except Exception as e:  # never take the step down, and never leave ranks waiting
                self._say(f"{name}: {type(e).__name__}: {e}; using {default.short()}", always=True)
                return choice(default, "default (error while deciding)")

        dist = _dist_world()
        if dist is None:
            return decide(), True
        # One rank decides for everyone: timings differ from rank to rank (Megatron-LM saw 13
        # of 22 entries disagree across 8 ranks), and ranks must run the same code.
        store = _default_store() if self.agreement in ("auto", "store") else None
        if store is not None:
            return self._agree_via_store(store, dist, mode, name, info, default, decide, choice), True
        if self.agreement == "store":
            raise RuntimeError("tritonadam.autotune: agreement='store' but the process group has no store")
        rank = dist.get_rank()
        mine = decide() if rank == 0 else None
        cfg = _broadcast_config(dist, mine.config if mine is not None else None, dev)
        if rank == 0:
            return mine, True
        self._say(f"{name}: {cfg.short()} (from rank 0)")
        return choice(cfg, "rank 0 (broadcast)"), True

    def _agree_via_store(self, store, dist, mode, name, info, default, decide, choice):
        """The first rank to need an entry decides it and publishes it in the process group's
        key-value store; every other rank that needs it waits for that value.

        Unlike a broadcast, this pairs nothing by call order: a rank whose launch falls in
        another bucket (uneven FSDP shards) or that skips a launch cannot deadlock the job or
        receive another entry's config, and no GPU sync is added to the step.
        """
        skey = "/".join(("tritonadam/autotune/v2", mode, self.source_hash or "-", name))
        rank = dist.get_rank()
        if store.add(skey + "/claim", 1) == 1:
            mine = None
            try:
                mine = decide()
            finally:  # publish even if interrupted, so no rank waits for nothing
                cfg = mine.config if mine is not None else default
                store.set(skey, f"{cfg.block_size},{cfg.num_warps},{int(cfg.persistent)},{rank}")
            return mine
        import datetime

        timeout = self.agreement_timeout_s
        if timeout is None:
            timeout = max(600.0, 10 * self.budget_s + 120.0)
        self._say(f"{name}: waiting for the rank that claimed it")
        try:
            store.wait([skey], datetime.timedelta(seconds=timeout))
            block, warps, persistent, owner = (int(x) for x in store.get(skey).decode().split(","))
            cfg = LaunchConfig(block, warps, bool(persistent))
        except Exception as e:
            self._say(f"{name}: no config from the deciding rank ({type(e).__name__}: {e}); using {default.short()}", always=True)
            return choice(default, "default (no answer from the deciding rank)")
        if cfg not in set(config_space(info.backend)):
            self._say(f"{name}: rank {owner} published {cfg.short()}, not in this rank's space; using {default.short()}", always=True)
            return choice(default, "default (bad config from the deciding rank)")
        self._say(f"{name}: {cfg.short()} (from rank {owner})")
        return choice(cfg, f"rank {owner} (store)")

    def _decide(self, mode, key, bucket, dev, info, default, make_runner, bpe, choice):
        name = entry_key(key, bucket)
        identity = self.identity(info)
        space = space_id(info.backend)
        try:
            entry = self.cache.lookup(identity, name, space)
        except Exception as e:  # the cache must never take the optimizer down
            self._say(f"{name}: cache lookup failed ({type(e).__name__}: {e})", always=True)
            entry = None
        if entry is not None:
            cfg = LaunchConfig.from_json(entry["config"])
            ru = entry.get("runner_up")
            ru_s = LaunchConfig.from_json(ru["config"]).short() if ru else None
            self._say(f"{name}: {cfg.short()} (cache {self.cache.path(identity)})")
            return choice(cfg, "disk cache", entry.get("time_ms"), entry.get("gbps"), ru_s)
        if mode == "cache-only":
            self._say(f"{name}: {default.short()} (default; not in cache, cache-only mode)")
            return choice(default, "default (cache-only: not in cache)")
        try:
            result = self.tune(key, bucket_numel(bucket), dev, make_runner, bytes_per_elem=bpe, how="first use", _info=info)
        except Exception as e:
            self._say(f"{name}: tuning failed ({type(e).__name__}: {e}); using {default.short()}", always=True)
            result = None
        if result is None:
            return choice(default, "default (tuning failed)")
        ru = result.runner_up
        return choice(
            result.config, "tuned", result.time_ms, result.gbps,
            f"{ru.config.short()} {ru.time_ms:.4g} ms" if ru else None,
        )

    def tune(
        self,
        key: tuple,
        numel: int,
        device: torch.device,
        make_runner: MakeRunner,
        *,
        bytes_per_elem: float | None = None,
        budget_s: float | None = None,
        compile_budget_s: float | None = None,
        store: bool = True,
        how: str = "explicit",
        _info: DeviceInfo | None = None,
    ) -> TuneResult | None:
        """Compile, prune and time the candidate configs for ``numel``'s bucket now (ignoring
        any cached choice) and store the winner. None if no config could be timed.

        Not coordinated across ranks: ``select`` calls it on the deciding rank only.
        """
        dev = device if isinstance(device, torch.device) else torch.device(device)
        if not self.can_time(dev):
            raise RuntimeError(f"cannot time kernels on {dev} (tuning needs a CUDA or ROCm GPU)")
        info = _info or self.device_info(dev)
        bucket = size_bucket(numel)
        name = entry_key(key, bucket)
        default = arch_default(info.backend, info.arch, bucket).config
        budget = self.budget_s if budget_s is None else float(budget_s)
        compile_budget = self.compile_budget_s if compile_budget_s is None else float(compile_budget_s)
        rep = self.scratch_numel(bucket, dev, bytes_per_elem)
        if rep == 0:
            self._say(f"{name}: not enough free memory for scratch buffers; not tuned", always=True)
            return None
        cands = candidate_configs(info.backend, rep, num_sms=info.num_sms, first=default)
        self._say(
            f"tuning {name} on {info.name}: {len(cands)} configs on {rep} scratch elements, "
            f"budget {compile_budget:g} s compiling + {budget:g} s timing (pre-tune with "
            "`python -m tritonadam.autotune tune`, or TRITONADAM_AUTOTUNE=off)",
            always=True,
        )
        start = self.clock()
        # Scratch runners may draw random numbers (torch.randn buffers): restore the user's
        # RNG streams afterwards so a tuned run stays reproducible against an untuned one.
        rng_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if (
            dev.type == "cuda" and torch.cuda.is_available()
        ) else []
        with torch.random.fork_rng(devices=rng_devices, device_type="cuda"), torch.no_grad():
            compiled, failed, rep = self._compile_candidates(cands, make_runner, rep, compile_budget, info)
            compile_s = self.clock() - start
            timed_start = self.clock()
            todo = [c["config"] for c in compiled if c["pruned"] is None]
            measurements, rep, launches = self._time_candidates(todo, make_runner, rep, budget, bytes_per_elem)
        measurements = failed + measurements
        elapsed = self.clock() - start
        order = {c: j for j, c in enumerate(cands)}
        ok = sorted((m for m in measurements if m.time_ms is not None), key=lambda m: (m.time_ms, order[m.config]))
        if not ok:
            self._say(f"{name}: no config could be timed; using the default", always=True)
            return None
        best = ok[0]
        runner_up = ok[1] if len(ok) > 1 else None
        dflt = next((m for m in ok if m.config == default), None)
        gbps = bytes_per_elem * rep / best.time_ms / 1e6 if bytes_per_elem else None
        complete = len(measurements) - len(failed) == len(todo) and len(compiled) + len(failed) == len(cands)
        entry = {
            "key": [str(k) for k in key],
            "bucket": bucket,
            "space": space_id(info.backend),
            "config": best.config.to_json(),
            "time_ms": best.time_ms,
            "gbps": gbps,
            "bytes_per_elem": bytes_per_elem,
            "numel_timed": rep,
            "launches_per_timing": launches,
            "runner_up": {"config": runner_up.config.to_json(), "time_ms": runner_up.time_ms} if runner_up else None,
            "default": {"config": default.to_json(), "time_ms": dflt.time_ms if dflt else None},
            "compiled": [dict(c, config=c["config"].to_json()) for c in compiled],
            "measured": {
                "at": _now(),
                "how": how,
                "timer": getattr(self.timer, "__name__", type(self.timer).__name__),
                "configs_timed": len(ok),
                "configs_failed": sum(1 for m in measurements if m.time_ms is None),
                "configs_pruned": sum(1 for c in compiled if c["pruned"] is not None),
                "configs_considered": len(cands),
                "complete": complete,
                "budget_s": budget,
                "compile_budget_s": compile_budget,
                "compile_s": round(compile_s, 3),
                "timing_s": round(elapsed - (timed_start - start), 3),
                "elapsed_s": round(elapsed, 3),
                "torch": torch.__version__,
            },
        }
        result = TuneResult(
            config=best.config,
            time_ms=best.time_ms,
            gbps=gbps,
            runner_up=runner_up,
            default=dflt,
            measurements=measurements,
            numel_timed=rep,
            considered=len(cands),
            complete=complete,
            elapsed_s=elapsed,
            entry=entry,
        )
        vs = ""
        if dflt is not None and dflt.config != best.config:
            vs = f", default {dflt.config.short()} {dflt.time_ms:.4g} ms"
        self._say(
            f"{name}: picked {best.config.short()} {best.time_ms:.4g} ms"
            + (f" ({gbps:.0f} GB/s)" if gbps else "")
            + (f", runner-up {runner_up.config.short()} {runner_up.time_ms:.4g} ms" if runner_up else "")
            + vs
            + f"; {len(ok)}/{len(cands)} configs timed in {elapsed:.1f} s ({compile_s:.1f} s compiling)",
            always=True,
        )
        if store:
            self.cache.store(self.identity(info), name, entry)
        return result

    def _runner(self, make_runner, cfg, rep):
        """``make_runner(cfg, rep)``, halving ``rep`` on out-of-memory while it can.

        Returns (runner, rep); the caller keeps the smaller rep for every later config, so
        all timings of an entry are over the same size."""
        while True:
            try:
                return make_runner(cfg, rep), rep
            except Exception as e:
                if not _is_oom(e) or rep <= 2**MIN_BUCKET:
                    raise
                rep //= 2
                self._say(f"  out of memory; retrying with {rep} scratch elements")

    def _compile_candidates(self, cands, make_runner, rep, budget, info):
        """Compile each candidate, in order, until the compile budget is spent.

        Returns (compiled, failed, rep): ``compiled`` holds one record per compiled config
        (its report and why it is pruned, or None); ``failed`` the configs that did not
        compile, as failed measurements. The first candidate (the architecture default) is
        never pruned, so every entry records the default's time.
        """
        compiled: list[dict] = []
        failed: list[Measurement] = []
        start = self.clock()
        for i, cfg in enumerate(cands):
            if i > 0 and self.clock() - start >= budget:
                self._say(f"  compile budget of {budget:g} s spent; {len(cands) - i} configs not compiled")
                break
            runner = None
            try:
                runner, rep = self._runner(make_runner, cfg, rep)
                compile_fn = getattr(runner, "compile", None)
                report = compile_fn() if compile_fn is not None else None
            except Exception as e:
                failed.append(Measurement(cfg, None, f"{type(e).__name__}: {e}"))
                self._say(f"  {cfg.short()}: does not compile ({type(e).__name__}: {e})")
                continue
            finally:
                del runner
            record = {"config": cfg, "report": report, "pruned": None}
            if report:
                record["resident_warps"] = resident_warps(cfg, report, info)
                if i > 0:
                    record["pruned"] = report_prune_reason(cfg, report, info)
                self._say(
                    f"  {cfg.short()}: {report.get('registers')} registers, {report.get('spills')} spills, "
                    f"{report.get('shared')} B shared, {record['resident_warps']} warps/SM"
                    + (f": pruned ({record['pruned']})" if record["pruned"] else "")
                )
            compiled.append(record)
        return compiled, failed, rep

    def _time_candidates(self, cands, make_runner, rep, budget, bytes_per_elem):
        """Time ``cands`` in order within ``budget``; returns (measurements, rep, launches
        per timed unit)."""
        measurements: list[Measurement] = []
        costs: list[float] = []
        launches = launches_per_timing(rep, bytes_per_elem)
        start = self.clock()
        for i, cfg in enumerate(cands):
            elapsed = self.clock() - start
            if i > 0:
                # Stop before a config that would, at the average cost so far, overrun.
                mean = sum(costs) / len(costs) if costs else 0.0
                if elapsed >= budget or elapsed + mean > budget:
                    self._say(f"  budget of {budget:g} s reached after {elapsed:.2f} s; {len(cands) - i} configs not timed")
                    break
            t0 = self.clock()
            runner = None
            try:
                runner, new_rep = self._runner(make_runner, cfg, rep)
                if new_rep != rep and any(m.time_ms for m in measurements):
                    raise RuntimeError("out of memory at the size the other configs were timed at")
                if new_rep != rep:
                    rep, launches = new_rep, launches_per_timing(new_rep, bytes_per_elem)
                ms = float(self.timer(_Repeat(runner, launches))) / launches
                if not math.isfinite(ms) or ms <= 0:
                    raise ValueError(f"timer returned {ms!r}")
                measurements.append(Measurement(cfg, ms))
                gb = f", {bytes_per_elem * rep / ms / 1e6:.0f} GB/s" if bytes_per_elem else ""
                self._say(f"  {cfg.short()}: {ms:.4g} ms{gb}")
            except Exception as e:
                measurements.append(Measurement(cfg, None, f"{type(e).__name__}: {e}"))
                self._say(f"  {cfg.short()}: failed ({type(e).__name__}: {e})")
            finally:
                del runner
            costs.append(self.clock() - t0)
        return measurements, rep, launches

    # -- what happened ------------------------------------------------------------------

    def choices(self) -> list[Choice]:
        with self._lock:
            return list(self._choices)

    def forget(self) -> None:
        """Drop the in-memory choices (the disk cache stays)."""
        with self._lock:
            self._memory.clear()
            self._choices.clear()


def _broadcast_config(dist, config: LaunchConfig | None, device: torch.device) -> LaunchConfig:
    """Rank 0's config on every rank. A 4-int tensor rather than ``broadcast_object_list``:
    no pickling, and it works on gloo (CPU tensor) and NCCL (tensor on this rank's GPU)."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        tdev = torch.device("cuda", torch.cuda.current_device())
    else:
        tdev = torch.device("cpu")
    if config is not None:
        t = torch.tensor([1, config.block_size, config.num_warps, int(config.persistent)], dtype=torch.int64, device=tdev)
    else:
        t = torch.zeros(4, dtype=torch.int64, device=tdev)
    dist.broadcast(t, src=0)
    ok, block, warps, persistent = (int(x) for x in t.tolist())
    if not ok:
        raise RuntimeError("tritonadam.autotune: rank 0 sent no config")
    return LaunchConfig(block, warps, bool(persistent))
