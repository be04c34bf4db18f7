"""Choosing a launch config: modes, timing within a budget, the disk cache, and agreement
across the ranks of a distributed job.

The tuner only ever runs callables from ``make_runner(config, numel)``, which launch the
kernel on scratch buffers: it has no way to reach the user's tensors, so tuning cannot
apply an optimizer step twice (the trap of ``triton.autotune``, which times the real
launch with the real arguments: an in-place step, applied once per config tried).

The decision (docs/autotune.md): the architecture's default is the incumbent. After a
warm-up on it, each challenger is timed in pairs interleaved with it (D C, C D, D C, ...),
and each pair gives the ratio of the challenger's time to the default's. A first round
ranks every challenger on a few pairs; the best few are timed again on more pairs, and
only that second round decides, because the first round's best are partly its luckiest.
A challenger replaces the default only if its median ratio is faster by more than
``MIN_MARGIN`` plus the measured spread: the inter-quartile range of its own ratios, or of
the default's ratios to itself over the whole run if that is wider. Winners that the
fastest does not beat by as much are a tie, which goes to the one nearest the default.
The optimizer step is elementwise, so every config gives bit-identical results: only time
is at stake.
"""
from __future__ import annotations

import math
import statistics
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
    "MIN_MARGIN",
    "SCREEN_PAIRS",
    "CONFIRM_PAIRS",
    "CONFIRM_TOP",
    "Measurement",
    "TuneResult",
    "Choice",
    "Tuner",
    "ratio_text",
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
# Scratch buffers are capped at 8 GiB and a quarter of the free memory, for the two runners
# alive at once (the default's and one challenger's): tuning happens on the first step, when
# the user's model, activations and optimizer state are already resident.
DEFAULT_MAX_SCRATCH_BYTES = 8 << 30
_LIVE_RUNNERS = 2
DEFAULT_SCRATCH_FRACTION = 0.25
# Used for the memory cap when the caller does not say (the optimizer always does): more
# than a 16-bit or fp32 variant keeps per element (bf16 p + g, fp32 master, m, v, max_v =
# 20 B); fp64 with AMSGrad keeps 40.
_FALLBACK_BYTES_PER_ELEM = 32

# --- the decision rule (docs/autotune.md) ----------------------------------------------
# A challenger must be faster than the default by more than this, on top of the measured
# spread. On the first H200 run (bench/results/2026-11-30_h200_ecf1ade.all) the tuner's
# timings of configs that the bench then found equal on real workloads differed by
# 0.1-0.4% (1024/2 vs 1024/4 in bf16: 0.14%; 512/4 vs 1024/4 in fp32: 0.4%), and a
# difference on scratch buffers carried over to the real workloads only to within a point
# or more (1024/4 over 1024/8 in bf16: 3.3% on scratch, 2.5-3.0% on llama-layers and a 1B
# tensor; in fp32: 0.2% on scratch, 0% and 5.3% for real). The gains worth having there
# were 2.5-6%; below 2% a difference is within what scratch buffers cannot promise.
MIN_MARGIN = 0.02
# Pairs per challenger in the first round (ranking only) and in the confirmation round
# (deciding). Even counts: D C + C D cancels a linear drift within every two pairs. With
# these, 16 challengers and Gaussian noise of 0.2-5% on every timing (500 seeds each, the
# fake timer of tests/test_autotune.py), no equal or 1%-faster challenger ever won; a
# 3%-faster one won 500 of 500 times at 0.2% noise (H200-like), 255 at 0.5%; a 5%-faster
# one 500 at 0.5%, 456 at 1%. Noisier timings keep the default, as they should.
SCREEN_PAIRS = 2
CONFIRM_PAIRS = 8
# Challengers re-timed in the confirmation round: the best of the first round that were
# faster than the default at all. The budget keeps room for this many confirmations.
CONFIRM_TOP = 3
# Timing the default before anything counts: GPU clocks ramp up under load, and a config
# timed first pays for the ramp (the old tuner timed the default first, so the ramp counted
# against it). At least one timing, then until this much time has passed (bounded in
# calls, for a clock that does not move).
WARMUP_S = 0.2
WARMUP_MAX_TIMINGS = 20
# The default's ratios to itself (one pair of its timings to the next) estimate the noise
# of the whole run once there are this many.
MIN_NOISE_SAMPLES = 4

Runner = Callable[[], None]
MakeRunner = Callable[[LaunchConfig, int], Runner]


def resolve_mode(mode: str | None = None) -> str:
    """The effective mode: the ``mode`` argument, else ``TRITONADAM_AUTOTUNE``, else "on".
    The budget switches are checked here too: the optimizer resolves the mode at
    construction and before a step writes anything, and a bad budget must fail there, not
    in a first-use tuning after the step counts advanced."""
    _env.autotune_budget_s()
    _env.autotune_compile_budget_s()
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
    """One config's timings in one round against the default.

    ``time_ms``: its median ms per launch over the round (None: it failed, see ``error``);
    ``default_ms``: the default's median over the same pairs; ``ratio``: the median of the
    pairs' time ratios config / default (below 1: faster); ``spread``: their inter-quartile
    range; ``round``: "screen" (first round) or "confirm". For the default itself,
    ``round`` is "default", ``ratio`` 1 and ``pairs`` counts its timings in every round.
    """

    config: LaunchConfig
    time_ms: float | None
    error: str | None = None
    ratio: float | None = None
    spread: float | None = None
    pairs: int = 0
    round: str = ""
    default_ms: float | None = None

    def to_json(self) -> dict:
        if self.time_ms is None:
            return {"config": self.config.to_json(), "error": self.error}
        return {
            "config": self.config.to_json(),
            "round": self.round,
            "pairs": self.pairs,
            "time_ms": self.time_ms,
            "default_ms": self.default_ms,
            "ratio": self.ratio,
            "spread": self.spread,
        }


@dataclass
class TuneResult:
    """What one tune measured and decided (``entry`` is what the disk cache stores).

    ``config``/``time_ms``: the choice and its median ms, from the same pairs as the
    default's; ``default``: the incumbent's measurement; ``vs_default``: the winning
    challenger's deciding measurement (None when the default stayed); ``runner_up``: the
    best challenger that did not win; ``measurements``: every round of every config, the
    failed ones included; ``untimed``: (config, why) for every candidate without a
    measurement (pruned, not compiled, out of budget); ``noise``: the inter-quartile range
    of the default's ratios to itself; ``reason``: the decision in words.
    """

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
    vs_default: Measurement | None = None
    untimed: list = field(default_factory=list)
    noise: float | None = None
    reason: str = ""


class _Repeat:
    """``fn`` run ``n`` times per call, as one timed unit of ``config``; other attributes
    read through to ``fn``. (An injected timer can tell configs apart by ``unit.config``.)"""

    def __init__(self, fn: Runner, n: int, config: LaunchConfig):
        self.fn, self.n, self.config = fn, n, config

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
    """One decision made in this process (see ``choices()``).

    ``default``/``default_ms``: the architecture default and its time from the same pairs
    as ``time_ms``; ``ratio``/``spread``/``pairs``: the chosen config against the default
    (None when the default was kept or nothing was timed); ``untimed``: candidates the
    tuning left untimed (pruned, out of budget).
    """

    key: tuple
    bucket: int
    device: str
    config: LaunchConfig
    source: str
    time_ms: float | None = None
    gbps: float | None = None
    runner_up: str | None = None
    default: LaunchConfig | None = None
    default_ms: float | None = None
    ratio: float | None = None
    spread: float | None = None
    pairs: int | None = None
    untimed: int = 0


def _iqr(xs: list[float]) -> float:
    """Inter-quartile range (0 for fewer than two values)."""
    if len(xs) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q3 - q1


def ratio_text(ratio: float | None, spread: float | None, pairs: int | None) -> str:
    """"0.966 (IQR 0.004, 8 pairs)": a time ratio to the default, with its spread."""
    if ratio is None:
        return ""
    extra = ([f"IQR {spread:.3f}"] if spread is not None else []) + ([f"{pairs} pairs"] if pairs else [])
    return f"{ratio:.3f}" + (f" ({', '.join(extra)})" if extra else "")


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
    ``timer(unit) -> ms`` (one timing of ``unit()``, which runs ``unit.n`` launches of
    ``unit.config``; default: CUDA events, warm-up, median), ``clock() -> s`` (measures
    the budgets), ``cache`` (a DiskCache), ``device_info(device) -> DeviceInfo``,
    ``free_bytes(device) -> int | None``, ``source_hash`` (names the kernel source in the
    cache identity; default: a hash of ``tritonadam/kernels/*.py``). ``time_any_device=True``
    lets a CPU device be "timed" (only meaningful with a fake timer); by default CPU and
    Triton's interpreter never tune.

    Tuning an entry has two phases: compile every candidate (``make_runner(...).compile()``
    when the runner has it) within the compile budget and drop those the compiler's report
    rules out (spills, too few resident warps), then time the rest against the default
    within the budget (see the module's docstring). ``min_margin`` overrides MIN_MARGIN.
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
        min_margin: float = MIN_MARGIN,
    ):
        if agreement not in ("auto", "store", "broadcast"):
            raise ValueError(f"agreement={agreement!r}: expected 'auto', 'store' or 'broadcast'")
        if not 0 <= min_margin < 1:
            raise ValueError(f"min_margin={min_margin!r}: expected a fraction in [0, 1)")
        self.min_margin = float(min_margin)
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
        the scratch-memory budget shared by the two runners alive at once (rounded down to a
        power of two). 0 = not enough memory."""
        limit = self.max_scratch_bytes
        free = self._free_bytes(device) if self._free_bytes is not None else None
        if free is None and self._free_bytes is None and device.type == "cuda" and not self.time_any_device:
            from .device import free_bytes

            free = free_bytes(device)
        if free is not None:
            limit = min(limit, int(free * self.scratch_fraction))
        per = bytes_per_elem or _FALLBACK_BYTES_PER_ELEM
        cap = int(limit // (per * _LIVE_RUNNERS))
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
        def choice(cfg, source, **measured):
            return Choice(tuple(key), bucket, str(dev), cfg, source, **measured)

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
        cfg = _broadcast_config(dist, mine.config if mine is not None else None)
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
            self._say(f"{name}: {cfg.short()} (cache {self.cache.path(identity)})")
            return choice(cfg, "disk cache", **_choice_fields(entry))
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
        return choice(result.config, "tuned", **_choice_fields(result.entry))

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
        """Compile and prune the candidate configs for ``numel``'s bucket, time them against
        the default now (ignoring any cached choice), decide, and store the decision. None if
        not even the default could be timed.

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
        identity = self.identity(info)
        # The default is the incumbent even where the size rules would prune it: it is what
        # runs without tuning, so it is what a challenger has to beat.
        challengers = [c for c in candidate_configs(info.backend, rep, num_sms=info.num_sms, first=default) if c != default]
        cands = [default] + self._likeliest_first(challengers, identity, bucket)
        self._say(
            f"tuning {name} on {info.name}: the default {default.short()} against {len(challengers)} "
            f"challengers on {rep} scratch elements, budget {compile_budget:g} s compiling + {budget:g} s "
            "timing (pre-tune with `python -m tritonadam.autotune tune`, or TRITONADAM_AUTOTUNE=off)",
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
            todo = [c["config"] for c in compiled if c["pruned"] is None]
            duels = _Duels(self, make_runner, rep, bytes_per_elem, budget)
            # Ties go to the config nearest the default: the candidates' own order, not the
            # likeliest-first order (which follows what else was tuned on this GPU before).
            duels.run(todo, nearest=[default] + challengers)
        elapsed = self.clock() - start
        reached = {c["config"] for c in compiled} | {m.config for m in failed}
        untimed = (
            [(c["config"], f"pruned: {c['pruned']}") for c in compiled if c["pruned"] is not None]
            + [(c, "compile budget") for c in cands if c not in reached]
            + duels.untimed
        )
        failed = failed + duels.failed
        if duels.incumbent is None:
            self._say(f"{name}: not even the default could be timed; using it untuned", always=True)
            return None
        incumbent = duels.incumbent_measurement()
        winner, reason = duels.decide(self.min_margin, had_challengers=bool(challengers))
        if incumbent.config != default:
            why = next((m.error for m in failed if m.config == default), "failed")
            reason = f"the default {default.short()} failed ({why}), so {incumbent.config.short()} was the incumbent; " + reason
        chosen = winner or incumbent
        rep = duels.rep
        gbps = bytes_per_elem * rep / chosen.time_ms / 1e6 if bytes_per_elem else None
        result = TuneResult(
            config=chosen.config,
            time_ms=chosen.time_ms,
            gbps=gbps,
            runner_up=duels.runner_up(chosen.config),
            default=incumbent,
            measurements=duels.screened + duels.confirmed + failed,
            numel_timed=rep,
            considered=len(cands),
            complete=not any(why.endswith("budget") for _, why in untimed),
            elapsed_s=elapsed,
            vs_default=winner,
            untimed=untimed,
            noise=duels.noise,
            reason=reason,
        )
        result.entry = self._entry(
            key, bucket, info, result, duels, compiled, failed, bytes_per_elem=bytes_per_elem,
            budget=budget, compile_budget=compile_budget, compile_s=compile_s, how=how)
        self._announce(name, result, duels, compile_s)
        if store:
            self.cache.store(identity, name, result.entry)
        return result

    def _entry(self, key: tuple, bucket: int, info: DeviceInfo, result: TuneResult, duels: _Duels,
               compiled: list, failed: list, *, bytes_per_elem: float | None, budget: float,
               compile_budget: float, compile_s: float, how: str) -> dict:
        """The disk cache's record of one tune: the decision, every measurement and why
        each untimed candidate went untimed (docs/autotune.md has the fields)."""
        winner, runner_up, incumbent = result.vs_default, result.runner_up, result.default
        timed = {m.config for m in [incumbent] + duels.screened}
        return {
            "key": [str(k) for k in key],
            "bucket": bucket,
            "space": space_id(info.backend),
            "config": result.config.to_json(),
            "time_ms": result.time_ms,
            "gbps": result.gbps,
            "bytes_per_elem": bytes_per_elem,
            "numel_timed": result.numel_timed,
            "launches_per_timing": duels.launches,
            "default": {"config": incumbent.config.to_json(), "time_ms": incumbent.time_ms, "pairs": incumbent.pairs},
            "vs_default": (
                {"ratio": winner.ratio, "spread": winner.spread, "pairs": winner.pairs, "default_ms": winner.default_ms}
                if winner else None
            ),
            "runner_up": (
                {"config": runner_up.config.to_json(), "time_ms": runner_up.time_ms, "ratio": runner_up.ratio,
                 "spread": runner_up.spread, "pairs": runner_up.pairs, "round": runner_up.round}
                if runner_up else None
            ),
            "decision": {
                "kept_default": winner is None,
                "reason": result.reason,
                "min_margin": self.min_margin,
                "noise": result.noise,
                "screen_pairs": SCREEN_PAIRS,
                "confirm_pairs": CONFIRM_PAIRS,
                "confirm_top": CONFIRM_TOP,
            },
            "measurements": [m.to_json() for m in result.measurements],
            "untimed": [{"config": c.to_json(), "why": why} for c, why in result.untimed],
            "compiled": [dict(c, config=c["config"].to_json()) for c in compiled],
            "measured": {
                "at": _now(),
                "how": how,
                "timer": getattr(self.timer, "__name__", type(self.timer).__name__),
                "configs_timed": len(timed),
                "configs_failed": len({m.config for m in failed}),
                "configs_pruned": sum(1 for c in compiled if c["pruned"] is not None),
                "configs_untimed": len(result.untimed),
                "configs_considered": result.considered,
                "complete": result.complete,
                "budget_s": budget,
                "full_tune_s": round(duels.full_tune_s(), 3),
                "compile_budget_s": compile_budget,
                "compile_s": round(compile_s, 3),
                "timing_s": round(result.elapsed_s - compile_s, 3),
                "elapsed_s": round(result.elapsed_s, 3),
                "torch": torch.__version__,
            },
        }

    def _announce(self, name: str, result: TuneResult, duels: _Duels, compile_s: float) -> None:
        """One line on what a tune decided and what it cost."""
        winner, incumbent, chosen = result.vs_default, result.default, result
        timed = {m.config for m in [incumbent] + duels.screened}
        short = [why for _, why in result.untimed if why.endswith("budget")]
        self._say(
            f"{name}: {'picked' if winner else 'kept the default'} {chosen.config.short()} {chosen.time_ms:.4g} ms"
            + (f" ({result.gbps:.0f} GB/s)" if result.gbps else "")
            + (f", default {incumbent.config.short()} {incumbent.time_ms:.4g} ms" if winner else "")
            + f": {result.reason}; {len(timed)}/{result.considered} configs timed in {result.elapsed_s:.1f} s "
            f"({compile_s:.1f} s compiling)"
            + (
                f"; {len(short)} not timed for lack of budget (a full tune takes about "
                f"{duels.full_tune_s():.1f} s of timing)"
                if short else ""
            ),
            always=True,
        )

    def _likeliest_first(self, challengers: list, identity: CacheIdentity, bucket: int) -> list:
        """``challengers`` (nearest the default first) with the configs that beat the default
        in this GPU's other entries of this bucket or a neighbouring one moved to the front,
        most wins first: on one GPU the same few configs tend to win across kernel variants
        (on the H200 run, 1024/2, 1024/4 and 512/4 won all seven entries of 2^27)."""
        try:
            entries = self.cache.load(identity)
        except Exception:  # the order is a heuristic; never fail a tune over it
            entries = {}
        wins: dict = {}
        for e in entries.values():
            if abs(e["bucket"] - bucket) <= 1 and e["config"] != e["default"]["config"]:
                cfg = LaunchConfig.from_json(e["config"])
                wins[cfg] = wins.get(cfg, 0) + 1
        return sorted(challengers, key=lambda c: -wins.get(c, 0))  # stable: ties keep their order

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

    # -- what happened ------------------------------------------------------------------

    def choices(self) -> list[Choice]:
        with self._lock:
            return list(self._choices)


class _Duels:
    """The timing phase of one tune: warm up on the incumbent (the default), then time each
    challenger in pairs interleaved with it, within the budget.

    Two runners are alive at once: the incumbent's, for the whole phase, and one
    challenger's. ``run`` fills ``screened`` (first round, every challenger the budget
    allows, in the given order), ``confirmed`` (the best few again), ``failed`` and
    ``untimed``; ``noise`` is the inter-quartile range of the incumbent's ratios to itself.
    """

    def __init__(self, tuner: Tuner, make_runner: MakeRunner, rep: int, bytes_per_elem: float | None, budget: float):
        self.tuner, self.make_runner, self.bpe, self.budget = tuner, make_runner, bytes_per_elem, budget
        self.rep = rep
        self.launches = launches_per_timing(rep, bytes_per_elem)
        self.start = tuner.clock()
        self.incumbent: tuple | None = None  # (config, timed unit)
        self.warmup_s = 0.0
        self.last_warmup_ms: float | None = None
        self.default_ms: list[float] = []  # the incumbent's timings in every pair
        self.self_ratios: list[float] = []  # each of its timings over the one before, per challenger
        self.screened: list[Measurement] = []
        self.confirmed: list[Measurement] = []
        self.failed: list[Measurement] = []
        self.untimed: list[tuple] = []
        self.n_challengers = 0
        self.order: dict = {}  # config -> position in the candidates' order
        self._timings, self._timing_s = 0, 0.0
        self._setups, self._setup_s = 0, 0.0

    # -- costs ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.tuner.clock() - self.start

    def cost(self, pairs: int) -> float:
        """Estimated seconds to time one challenger on ``pairs`` pairs (from what this
        phase has spent so far on each timing and on building each runner)."""
        per_timing = self._timing_s / self._timings if self._timings else 0.0
        per_setup = self._setup_s / self._setups if self._setups else 0.0
        return 2 * pairs * per_timing + per_setup

    def full_tune_s(self) -> float:
        """Estimated seconds of timing for every challenger, confirmation included."""
        n = self.n_challengers
        return self.warmup_s + n * self.cost(SCREEN_PAIRS) + min(CONFIRM_TOP, n) * self.cost(CONFIRM_PAIRS)

    @property
    def noise(self) -> float | None:
        return _iqr(self.self_ratios) if len(self.self_ratios) >= MIN_NOISE_SAMPLES else None

    # -- timing ---------------------------------------------------------------------------

    def _time(self, unit: _Repeat) -> float:
        """One timing of ``unit``, in ms per launch."""
        t0 = self.tuner.clock()
        raw = float(self.tuner.timer(unit))
        self._timings += 1
        self._timing_s += self.tuner.clock() - t0
        if not math.isfinite(raw) or raw <= 0:
            raise ValueError(f"timer returned {raw!r}")
        return raw / unit.n

    def _seat(self, cfg: LaunchConfig) -> None:
        """Make ``cfg`` the incumbent: build its runner (halving the scratch size on
        out-of-memory) and warm up on it; nothing timed here counts."""
        runner, rep = self.tuner._runner(self.make_runner, cfg, self.rep)
        if rep != self.rep:
            self.rep, self.launches = rep, launches_per_timing(rep, self.bpe)
        unit = _Repeat(runner, self.launches, cfg)
        t0 = self.tuner.clock()
        for n in range(1, WARMUP_MAX_TIMINGS + 1):
            self.last_warmup_ms = self._time(unit)
            if self.tuner.clock() - t0 >= WARMUP_S:
                break
        self.warmup_s = self.tuner.clock() - t0
        self.incumbent = (cfg, unit)
        self.tuner._say(f"  {cfg.short()}: the incumbent, warmed up with {n} timings ({self.last_warmup_ms:.4g} ms last)")

    def _duel(self, cfg: LaunchConfig, pairs: int, round_: str) -> Measurement:
        """``pairs`` pairs of ``cfg`` against the incumbent, alternately D C and C D so
        that a drift in clocks or temperature falls on both sides alike."""
        t0 = self.tuner.clock()
        try:
            unit = _Repeat(self.make_runner(cfg, self.rep), self.launches, cfg)
        except Exception as e:  # out of memory included: every config is timed at one size
            return Measurement(cfg, None, f"{type(e).__name__}: {e}", round=round_)
        self._setups += 1
        self._setup_s += self.tuner.clock() - t0
        d_unit = self.incumbent[1]
        d: list[float] = []
        c: list[float] = []
        for i in range(pairs):
            if i % 2 == 0:
                d.append(self._time(d_unit))  # the incumbent's failure propagates: nothing to compare with
            try:
                c.append(self._time(unit))
            except Exception as e:
                return Measurement(cfg, None, f"{type(e).__name__}: {e}", round=round_)
            if i % 2 == 1:
                d.append(self._time(d_unit))
        ratios = [ci / di for ci, di in zip(c, d)]
        self.default_ms += d
        self.self_ratios += [b / a for a, b in zip(d, d[1:])]
        return Measurement(
            cfg, statistics.median(c), ratio=statistics.median(ratios), spread=_iqr(ratios),
            pairs=pairs, round=round_, default_ms=statistics.median(d),
        )

    def _record(self, m: Measurement, into: list) -> None:
        if m.time_ms is None:
            self.failed.append(m)
            self.tuner._say(f"  {m.config.short()}: failed ({m.error})")
            return
        into.append(m)
        self.tuner._say(
            f"  {m.config.short()} [{m.round}]: {m.time_ms:.4g} ms, default {m.default_ms:.4g} ms, "
            f"ratio {ratio_text(m.ratio, m.spread, m.pairs)}"
        )

    def run(self, todo: list, nearest: list | None = None) -> None:
        """Time ``todo`` (the incumbent first, then the challengers, likeliest first); ties
        go to the earliest in ``nearest`` (default: ``todo``'s order)."""
        rest = list(todo)
        self.order = {c: i for i, c in enumerate(todo if nearest is None else nearest)}
        while rest and self.incumbent is None:
            cfg = rest.pop(0)
            try:
                self._seat(cfg)
            except Exception as e:  # then the next candidate that runs is the incumbent
                self.failed.append(Measurement(cfg, None, f"{type(e).__name__}: {e}"))
                self.tuner._say(f"  {cfg.short()}: failed ({type(e).__name__}: {e})")
        self.n_challengers = len(rest)
        # Room is kept to confirm the best few, so the budget never ends with a first
        # round's lucky winner unconfirmed.
        n_confirm = min(CONFIRM_TOP, len(rest))
        for i, cfg in enumerate(rest):
            if self.elapsed() + self.cost(SCREEN_PAIRS) + n_confirm * self.cost(CONFIRM_PAIRS) > self.budget:
                self.untimed += [(c, "timing budget") for c in rest[i:]]
                self.tuner._say(
                    f"  timing budget of {self.budget:g} s: {len(rest) - i} of {len(rest)} challengers not "
                    f"timed (room kept to confirm {n_confirm})"
                )
                break
            self._record(self._duel(cfg, SCREEN_PAIRS, "screen"), self.screened)
        # Only a challenger that was faster at all goes on; the second round decides alone,
        # because the first round's best are partly its luckiest.
        promising = sorted((m for m in self.screened if m.ratio < 1.0), key=lambda m: m.ratio)[:CONFIRM_TOP]
        for m in promising:
            if self.elapsed() + self.cost(CONFIRM_PAIRS) > self.budget:
                self.untimed.append((m.config, "confirmation round: timing budget"))
                continue
            self._record(self._duel(m.config, CONFIRM_PAIRS, "confirm"), self.confirmed)

    def decide(self, min_margin: float, *, had_challengers: bool) -> tuple[Measurement | None, str]:
        """The winning challenger (None: keep the incumbent) and why, in words."""
        winner, reason = _pick(self.confirmed, self.noise, min_margin, self.order)
        if reason:
            return winner, reason
        if not self.n_challengers:
            return None, "no challenger to time" + (" (see untimed)" if had_challengers else " at this size")
        if not self.screened:
            return None, "no challenger was timed" + (" within the budget" if self.untimed else ": every one failed")
        if not any(m.ratio < 1.0 for m in self.screened):
            return None, "no challenger was faster than the default in the first round"
        return None, "no challenger faster in the first round could be confirmed"

    def runner_up(self, chosen: LaunchConfig) -> Measurement | None:
        """The closest other timed challenger, by the ratio of its latest round."""
        latest = {m.config: m for m in self.screened + self.confirmed}  # confirm overrides screen
        others = [m for c, m in latest.items() if c != chosen]
        return min(others, key=lambda m: m.ratio) if others else None

    def incumbent_measurement(self) -> Measurement:
        """The incumbent over every pair it was in (its last warm-up timing if none ran)."""
        cfg = self.incumbent[0]
        if not self.default_ms:
            return Measurement(cfg, self.last_warmup_ms, ratio=1.0, pairs=0, round="default")
        return Measurement(
            cfg, statistics.median(self.default_ms), ratio=1.0, spread=self.noise,
            pairs=len(self.default_ms), round="default", default_ms=statistics.median(self.default_ms),
        )


def _pick(
    confirmed: list[Measurement], noise: float | None, min_margin: float, order: dict | None = None
) -> tuple[Measurement | None, str]:
    """The confirmed challenger that beats the default beyond noise (None: keep the
    default), and why, in words ("" when nothing was confirmed).

    A challenger wins if ``1 - ratio > min_margin + spread``, its spread being the wider of
    its own ratios' inter-quartile range and the default's against itself (``noise``): even
    at the slow end of its spread it is faster than the default by the margin. Winners
    that the fastest one does not beat by as much are a tie, settled for the earliest in
    ``order`` (config -> position in the candidates' order: nearest the default first),
    by the same rule that keeps the default: on the H200, 1024/2 and 1024/4 timed within
    0.1% of each other on scratch buffers, and 1024/2 was then 4-5% slower in fp32 on
    real workloads.
    """
    def threshold(m: Measurement, *others: Measurement) -> float:
        return min_margin + max(m.spread, *(o.spread for o in others), noise or 0.0)

    winners = [m for m in confirmed if 1.0 - m.ratio > threshold(m)]
    if winners:
        best = min(winners, key=lambda m: m.ratio)
        tied = [m for m in winners if m.ratio - best.ratio <= threshold(m, best)]
        w = min(tied, key=lambda m: (order or {}).get(m.config, 0))
        why = (
            f"{w.config.short()} is {100 * (1 - w.ratio):.1f}% faster than the default over "
            f"{w.pairs} pairs, beyond the {100 * min_margin:g}% margin + {100 * (threshold(w) - min_margin):.1f}% spread"
        )
        if w is not best:
            why += f" ({best.config.short()}, {100 * (1 - best.ratio):.1f}% faster, is not faster than it beyond the same)"
        return w, why
    if not confirmed:
        return None, ""
    b = min(confirmed, key=lambda m: m.ratio)
    how = f"{100 * abs(1 - b.ratio):.1f}% {'faster' if b.ratio < 1 else 'slower'}"
    return None, (
        f"the closest, {b.config.short()}, is {how} over {b.pairs} pairs: "
        f"not beyond the {100 * min_margin:g}% margin + {100 * (threshold(b) - min_margin):.1f}% spread"
    )


def _choice_fields(entry: dict) -> dict:
    """A cache entry's measurements, as ``Choice`` fields."""
    ru = entry.get("runner_up")
    vs = entry.get("vs_default") or {}
    d = entry["default"]
    return {
        "time_ms": entry["time_ms"],
        "gbps": entry.get("gbps"),
        "runner_up": (
            f"{LaunchConfig.from_json(ru['config']).short()} {ratio_text(ru['ratio'], ru['spread'], ru['pairs'])}"
            if ru else None
        ),
        "default": LaunchConfig.from_json(d["config"]),
        "default_ms": d["time_ms"],
        "ratio": vs.get("ratio"),
        "spread": vs.get("spread"),
        "pairs": vs.get("pairs"),
        "untimed": len(entry.get("untimed") or ()),
    }


def _broadcast_config(dist, config: LaunchConfig | None) -> LaunchConfig:
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
