"""Launch configurations: what the kernels accept, the space the tuner searches, and the
built-in defaults used when tuning is off or impossible.

Everything here is pure data and arithmetic (no GPU needed), so the tests can check the
space, the pruning and the defaults table on CPU.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

__all__ = [
    "LaunchConfig",
    "DeviceInfo",
    "Provenance",
    "DefaultRow",
    "DEFAULTS",
    "INTERPRETER_DEFAULT",
    "GPU_DEFAULT",
    "MIN_BUCKET",
    "MAX_BUCKET",
    "MIN_RESIDENT_WARPS",
    "PERSISTENT_DISTANCE",
    "arch_default",
    "config_space",
    "candidate_configs",
    "space_hash",
    "space_id",
    "size_bucket",
    "bucket_numel",
    "is_known_config",
    "resident_warps",
    "report_prune_reason",
]


@dataclass(frozen=True, order=True)
class LaunchConfig:
    """How one multi-tensor launch is shaped.

    block_size: elements per program (a power of two); num_warps: warps per program.
    persistent: False = one program per block (the grid covers every block); True = a grid of
    ``launch._PROGRAMS_PER_SM`` (4) programs per SM that loop over blocks.
    """

    block_size: int
    num_warps: int
    persistent: bool = False

    def to_json(self) -> dict:
        return {"block_size": self.block_size, "num_warps": self.num_warps, "persistent": self.persistent}

    @staticmethod
    def from_json(obj) -> "LaunchConfig | None":
        """Parse a config read from disk; None for anything not exactly the expected shape.

        Strict on types on purpose: ``True`` is an int in Python and ``4096.0`` is not a
        block size we launch, and a hand-edited file must not smuggle either in.
        """
        if not isinstance(obj, dict):
            return None
        if set(obj) - {"block_size", "num_warps", "persistent"}:
            return None
        b, w, p = obj.get("block_size"), obj.get("num_warps"), obj.get("persistent", False)
        if type(b) is not int or type(w) is not int or type(p) is not bool:
            return None
        return LaunchConfig(b, w, p)

    def short(self) -> str:
        s = f"block={self.block_size} warps={self.num_warps}"
        return s + " persistent" if self.persistent else s


@dataclass(frozen=True)
class DeviceInfo:
    """What the tuner needs to know about a GPU. Injectable so CPU tests can pose as one.

    backend: "cuda" or "hip"; arch: "sm_90", "gfx942", ...; capability: "9.0" / "gfx942".
    The per-SM limits decide how many programs of a compiled config fit on one SM; the
    defaults are those of sm_80 and sm_90.
    """

    backend: str
    name: str
    arch: str
    capability: str
    num_sms: int | None = None
    warp_size: int = 32
    l2_bytes: int | None = None
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    shared_per_sm: int | None = None


# --- the search space -----------------------------------------------------------------

# From what ptxas reports for the update kernel (tests/aot_compile_variants.py, sm_80 and
# sm_90; docs/performance.md): at 4 to 16 elements per thread every variant compiles
# without spills (bf16 + master + AMSGrad: 52-126 registers); at 32 the fp32 variants need
# 166-233 registers (8-12 resident warps), at 64 all of them spill. Programs of 16 warps
# are capped at 128 registers and spill fp64 at 16 elements per thread, with nothing to
# gain for a streaming kernel over 8 warps. A block is at least 512 elements: below that a
# program moves too few bytes to cover its scheduling cost.
BLOCK_SIZES = tuple(2**k for k in range(9, 13))  # 512 .. 4096
MIN_ELEMS_PER_THREAD = 4  # one 16-byte vector of fp32 per thread and array
MAX_ELEMS_PER_THREAD = 16

_BACKENDS = {
    # NVIDIA: 32-thread warps, up to 1024 threads per program.
    "cuda": {"warp_size": 32, "num_warps": (1, 2, 4, 8)},
    # AMD: 64-thread wavefronts; more than 8 wavefronts per program rarely helps an
    # elementwise kernel and halves occupancy on CDNA, so the list stops at 8.
    "hip": {"warp_size": 64, "num_warps": (1, 2, 4, 8)},
}

# Bump when the pruning or ordering rules, or the tuner's decision rule (tuner.py: the
# incumbent default, its margin and rounds), change: it is part of the cache file identity,
# because a different rule could have produced a different choice.
# 3: the default is the incumbent and a challenger must beat it beyond noise; persistent
#    grids are ordered after every plain neighbour.
RULES_VERSION = 3

# How far a persistent grid is from a plain one, in the candidates' order (log2 steps of
# block or warps count 1 each). On the H200 run (2026-11-30) persistent grids lost to their
# plain twins by 1-22% on every workload that was not host-bound (llama-layers, a 1B
# tensor; bf16 and fp32) and never placed in the tuner's top two at 2^27, so the budget
# reaches them after every plain config one step away.
PERSISTENT_DISTANCE = 2.0

# A streaming kernel hides memory latency with loads in flight from several resident
# programs: a compiled candidate that leaves fewer warps than this on an SM, or spills, is
# not timed. Compiled for sm_80/sm_90 (docs/performance.md), every variant but fp64 keeps
# at least 16 warps resident across the space; fp64 at 16 elements per thread keeps 8.
MIN_RESIDENT_WARPS = 16

# Buckets are powers of two of the launch's element count, clamped: below 2**12 every config
# costs one launch latency, and from 2**27 up (128M elements, >2 GiB of optimizer traffic) the
# kernel is streaming at full bandwidth, so larger launches behave like 2**27.
MIN_BUCKET = 12
MAX_BUCKET = 27


def _backend_spec(backend: str) -> dict:
    try:
        return _BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown backend {backend!r}; expected one of {sorted(_BACKENDS)}") from None


def config_space(backend: str = "cuda") -> list[LaunchConfig]:
    """Every config the tuner may pick on ``backend``, plain and persistent grids, in a fixed
    order (sorted). The order and content are deterministic so their hash can name the
    cache file.
    """
    spec = _backend_spec(backend)
    out = []
    for block in BLOCK_SIZES:
        for warps in spec["num_warps"]:
            per_thread = block / (spec["warp_size"] * warps)
            if MIN_ELEMS_PER_THREAD <= per_thread <= MAX_ELEMS_PER_THREAD:
                out += [LaunchConfig(block, warps), LaunchConfig(block, warps, True)]
    return sorted(out)


def is_known_config(config: LaunchConfig, backend: str) -> bool:
    return config in set(config_space(backend))


def space_id(backend: str) -> str:
    """Short hash of the searched list and its rules (stored with each entry: entries tuned
    over another list are not reused)."""
    cfgs = [c.to_json() for c in config_space(backend)]
    blob = json.dumps(
        {"backend": backend, "configs": cfgs, "rules": RULES_VERSION, "min_resident_warps": MIN_RESIDENT_WARPS},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def space_hash(backend: str) -> str:
    """Hash of everything the tuner could search on ``backend`` (part of the cache identity)."""
    blob = json.dumps({"space": space_id(backend), "buckets": [MIN_BUCKET, MAX_BUCKET]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def size_bucket(numel: int) -> int:
    """The power-of-two bucket of a launch: ``numel`` rounded up to ``2**b``, b clamped to
    [MIN_BUCKET, MAX_BUCKET]."""
    n = int(numel)
    b = (n - 1).bit_length() if n > 1 else 0  # exact for huge ints, unlike log2
    return min(max(b, MIN_BUCKET), MAX_BUCKET)


def bucket_numel(bucket: int) -> int:
    """The representative launch size of a bucket (its upper edge), before memory capping."""
    return 2**bucket


def candidate_configs(
    backend: str,
    numel: int,
    *,
    num_sms: int | None = None,
    first: LaunchConfig | None = None,
) -> list[LaunchConfig]:
    """The configs worth timing for a launch of ``numel`` elements, most promising first.

    Pruned (configs that cannot win):
    - blocks larger than the launch rounded up to a power of two: the extra lanes are masked
      off and only cost registers;
    - with ``num_sms`` known, blocks that leave more than half the SMs without a program,
      unless no block fills them (then the smallest block stays);
    - persistent grids unless there are more than two waves of blocks (up to four, one
      launches as many programs as its plain twin, 4 per SM, and is kept all the same: the
      timing decides).

    Ordered by distance from ``first`` (the architecture default) in log2(block) and
    log2(warps), a persistent twin counting PERSISTENT_DISTANCE, so that a tuner that runs
    out of time has measured the default's nearest plain neighbours; ties keep the space's
    sorted order.
    """
    numel = max(int(numel), 1)
    space = config_space(backend)
    smallest = min(c.block_size for c in space)
    cap = max(smallest, 1 << (numel - 1).bit_length())
    kept = [c for c in space if c.block_size <= cap]
    if num_sms:
        need = max(num_sms // 2, 1)
        filled = [c for c in kept if math.ceil(numel / c.block_size) >= need]
        smallest_kept = min(c.block_size for c in kept)
        kept = filled or [c for c in kept if c.block_size == smallest_kept]
        kept = [c for c in kept if not c.persistent or math.ceil(numel / c.block_size) > 2 * num_sms]
    else:
        # Without the SM count we cannot tell one wave from many; keep only plain grids.
        kept = [c for c in kept if not c.persistent]
    if first is not None:
        fb, fw = math.log2(first.block_size), math.log2(first.num_warps)

        def distance(c: LaunchConfig) -> float:
            return abs(math.log2(c.block_size) - fb) + abs(math.log2(c.num_warps) - fw) + (
                PERSISTENT_DISTANCE if c.persistent != first.persistent else 0.0
            )

        kept = sorted(kept, key=distance)  # stable: ties stay in sorted order
    return kept


# --- built-in defaults ------------------------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    """Where a measured default came from: the GPU, the date (ISO), the exact command, the
    tritonadam commit it ran, and where its results are kept."""

    gpu: str
    date: str
    command: str
    commit: str = ""
    results: str = ""


@dataclass(frozen=True)
class DefaultRow:
    """One row of the defaults table.

    ``arch`` is "sm_90", "gfx942", ... or "*" (any GPU of the backend). ``min_bucket`` lets
    measured rows differ by launch size: the row with the largest ``min_bucket`` not above
    the launch's bucket wins. A row without ``provenance`` was not measured.
    """

    backend: str
    arch: str
    config: LaunchConfig
    min_bucket: int = 0
    provenance: Provenance | None = None
    note: str = ""

    @property
    def status(self) -> str:
        return "measured" if self.provenance is not None else "unmeasured default"


# The interpreter costs ~1-2 ms per program whatever the block size (measured on the
# 2-core CPU machine), so CPU runs use few large programs.
INTERPRETER_DEFAULT = LaunchConfig(block_size=16384, num_warps=4)
# 4 elements per thread: at most 52 registers for every variant but fp64 (ptxas, sm_80 and
# sm_90), so at least 32 warps stay resident per SM to cover memory latency; the tuner
# may trade occupancy for fewer, larger programs where that measures faster.
GPU_DEFAULT = LaunchConfig(block_size=1024, num_warps=8)
_HIP_DEFAULT = LaunchConfig(block_size=2048, num_warps=4)

_UNMEASURED = (
    "unmeasured default: no GPU measurement yet; chosen from the compiler's report "
    "(4 elements per thread, >= 32 resident warps per SM for every non-fp64 variant)"
)

# The first H200 run: bench/gpu_check.sh at commit ecf1ade (kernel source 37a15cbbad052e52,
# triton 3.6). Files: bench/results/2026-11-30_h200_ecf1ade.all. Every candidate was timed
# as a fixed config on the real workloads, twice for llama-layers bf16 (results.md and
# tuning.md), and the tuner timed 7 kernel variants on 2^27-element scratch launches
# (autotune-cache/, bench.log). 1024/4 against 1024/8, ms (p20-p80), bench timer:
#   llama-layers@400M bf16  2.224 (2.219-2.234) vs 2.282 (2.273-2.296)  -2.5%
#                           2.245 (2.226-2.277) vs 2.303 (2.287-2.322)  -2.5%  (second run)
#   llama-layers@400M fp32  2.791 (2.782-2.807) vs 2.947 (2.892-3.006)  -5.3%
#   one-huge@1B       bf16  5.357 (5.346-5.362) vs 5.524 (5.511-5.542)  -3.0%
#   one-huge@1B       fp32  6.702 (6.695-6.720) vs 6.692 (6.687-6.701)  +0.15%: equal
# and on the tuner's scratch launches -3.1 to -5.7% on the bf16/fp16/master/remainder/sr
# variants, -0.2% in fp32 (that tuner timed 1024/8 first, before the clocks had ramped up,
# so these lean against it; the bench figures do not). 1024/4 is never slower beyond the
# p20-p80 spread, and faster beyond it in 4 of the 5 rows. The old tuner's own winners,
# 1024/2 and 512/4, were within 1% of 1024/4 on scratch but 4-5% slower than it in fp32
# (1024/2: llama 2.912, 1B 7.022 ms) or 1.8% slower in bf16 (512/4: llama 2.265, 1B
# 5.454 ms). Those workloads are launches of 2^27 elements or more, so the row starts at
# that bucket.
_H200_RUN = Provenance(
    gpu="NVIDIA H200",
    date="2026-11-30",
    command=(
        "python -m tritonadam.bench --profiles llama-layers@400M,many-small,one-huge@1B --setups bf16,fp32 "
        "--clip bf16 --providers tritonadam,torch-fused,torch-foreach --autotune off --sweep --sweep-max 8 "
        "--time-budget 150 (bench/gpu_check.sh)"
    ),
    commit="ecf1ade",
    results="bench/results/2026-11-30_h200_ecf1ade.all (results.md, tuning.md, autotune-cache/)",
)
# The second H200 run timed device time apart from host time (bench schema 3): 10,000 x
# 4,096 (40.96M elements in one launch, size bucket 2^26: launches of more than 2^25
# elements), 1024/4, 1024/8 (the default then) and 2048/8 of the 18 configs as fixed
# configs, 5 interleaved rounds of one timed step each (2048/8: 1 round in bf16, none in
# bf16 state: the time budget), ms (p20-p80), 1024/4 against 1024/8:
#   fp32            0.3019 (0.2948-0.3020) vs 0.3132 (0.3048-0.3137)  -3.6%
#   bf16            0.2521 (0.2510-0.2526) vs 0.2696 (0.2672-0.2701)  -6.5%
#   bf16, bf16 state 0.1835 (0.1757-0.1840) vs 0.1896 (0.1828-0.1901)  -3.2%
# beyond the spread in the first two. The tuner's own pairs on 2^26-element scratch
# launches agree: first use picked 1024/4, 6.0% faster than 1024/8 over 8 pairs
# (tuning.log). Its bench row timed the same 1024/4 at 0.2657 ms, 5% off the core's
# 0.2521: one timed step per round leaves run-to-run noise near the size of the gain.
_H200_RUN2 = Provenance(
    gpu="NVIDIA H200",
    date="2026-12-04",
    command=(
        "python -m tritonadam.bench --profiles llama-layers@400M,many-small,one-huge@1B "
        "--setups fp32,bf16,bf16-bf16state --setups-for llama-layers@400M=core,bf16-remainder "
        "--clip bf16 --providers tritonadam,torch-fused,tritonadam-graph,torch-fused-graph "
        "--autotune off --sweep --sweep-max 3 --rounds 5 --rep-ms 100 --time-budget 155 "
        "(tritonadam/bench/gpu_check.sh)"
    ),
    commit="da36c0e",
    results="bench/results/2026-12-04_h200_da36c0e.results.json (and .all/: results.md, tuning.log)",
)
_SM90_SMALL = (
    "unmeasured default up to 2^25 elements: the first H200 run's figures for smaller launches "
    "came from the old tuner, which timed the default first (clock ramp-up against it) or "
    "pruned it at 2^16; kept until measured against it"
)

DEFAULTS: tuple[DefaultRow, ...] = (
    DefaultRow("cuda", "sm_80", GPU_DEFAULT, note=_UNMEASURED),
    DefaultRow("cuda", "sm_90", GPU_DEFAULT, note=_SM90_SMALL),
    DefaultRow(
        "cuda", "sm_90", LaunchConfig(1024, 4), min_bucket=26, provenance=_H200_RUN2,
        note="measured on an H200: 3.2-6.5% faster than 1024/8 on 10,000 x 4,096 (fp32, bf16, "
             "bf16 state; device time)",
    ),
    DefaultRow(
        "cuda", "sm_90", LaunchConfig(1024, 4), min_bucket=27, provenance=_H200_RUN,
        note="measured on an H200: 2.5-5.3% faster than 1024/8 on llama-layers@400M (bf16, fp32) "
             "and a 1B tensor (bf16), equal on the 1B tensor in fp32",
    ),
    DefaultRow("cuda", "sm_100", GPU_DEFAULT, note=_UNMEASURED),
    DefaultRow("cuda", "*", GPU_DEFAULT, note=_UNMEASURED),
    DefaultRow("hip", "gfx90a", _HIP_DEFAULT, note=_UNMEASURED),
    DefaultRow("hip", "gfx942", _HIP_DEFAULT, note=_UNMEASURED),
    DefaultRow("hip", "*", _HIP_DEFAULT, note=_UNMEASURED),
)


def arch_default(backend: str, arch: str, bucket: int | None = None) -> DefaultRow:
    """The defaults-table row for a GPU: exact architecture first, else the backend's "*"."""
    b = MAX_BUCKET if bucket is None else bucket
    for want in (arch, "*"):
        rows = [r for r in DEFAULTS if r.backend == backend and r.arch == want and r.min_bucket <= b]
        if rows:
            return max(rows, key=lambda r: r.min_bucket)
    return DefaultRow(backend, "*", GPU_DEFAULT, note=_UNMEASURED)


# --- what the compiler says -------------------------------------------------------------


def resident_warps(config: LaunchConfig, report: dict, info: DeviceInfo) -> int:
    """Warps of ``config`` that fit on one SM at once, from the compiler's report
    (``registers`` per thread, ``shared`` bytes per program) and the SM's limits.

    Registers are allocated per warp in units of 256 (sm_80/sm_90 allocation granularity).
    """
    warps = config.num_warps
    per_warp = math.ceil(max(int(report.get("registers") or 0), 1) * info.warp_size / 256) * 256
    programs = min(info.regs_per_sm // (per_warp * warps), info.max_warps_per_sm // warps)
    shared = int(report.get("shared") or 0)
    if shared and info.shared_per_sm:
        programs = min(programs, info.shared_per_sm // shared)
    return programs * warps


def report_prune_reason(config: LaunchConfig, report: dict | None, info: DeviceInfo) -> str | None:
    """Why a compiled candidate is not worth timing, or None. No report (the compiler could
    not say) prunes nothing."""
    if not report:
        return None
    if int(report.get("spills") or 0) > 0:
        return f"spills {report['spills']} registers"
    resident = resident_warps(config, report, info)
    if resident < MIN_RESIDENT_WARPS:
        return f"{resident} resident warps per SM < {MIN_RESIDENT_WARPS}"
    return None
