"""Plain launchers: device tables and flags in, kernel launches out.

Nothing here touches optimizer state dicts; ``tritonadam.step_cache`` builds the tables.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

from .. import _env
from .adam import _adam_kernel
from .layout import MASTER_FP32, QUANT_BLOCK, QUANT_MIN_FULL
from .norm import NORM_INF, NORM_L1, NORM_L2, NORM_P, _norm_kernel, _norm_reduce_kernel
from .plan import Bucket, DeviceTables, NormPlan, NormSpan
from .variant import BucketKey
from .prepare import _prepare_kernel

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
    torch.uint8: tl.uint8,
}

# Kernel launches issued by this process, per kernel: tests and the bench check that
# launches per step do not grow with the number of tensors or param groups.
launch_counts = {"prepare": 0, "update": 0, "norm": 0, "norm_reduce": 0}

# Tensors per program of the prepare kernel: a step touches each tensor's scalars once.
PREPARE_BLOCK = 256

# The norm reduction is one program: enough lanes to read every partial in a few trips.
NORM_REDUCE_BLOCK = 4096
NORM_REDUCE_WARPS = 16

# Elements per thread per iteration of the masked path (tails, misaligned tensors): as
# many as keep that path within the full-block path's registers (ptxas, sm_80/sm_90: one
# fp32 element spilled a little in one variant at 1024/8, two fp64 spill).
TAIL_ELEMS_PER_THREAD = {4: 2, 8: 1}

# Elements per thread per iteration of the full-block path with stochastic rounding: the
# random fields of every element stay live beside its data, and a 4096/8 block in one
# iteration (16 per thread) needed 128-166 registers (ptxas, sm_80/sm_90, triton 3.6/3.9).
SR_ELEMS_PER_THREAD = 8

# Elements per thread per iteration of the full-block path for fp64: at 2048/8 (eight
# per thread in one iteration) AMSGrad needed 137 registers on sm_90 and spilled on sm_80
# (the cubin triton builds, triton 3.9).
WIDE_ELEMS_PER_THREAD = 4


def fp_fusion() -> bool:
    """FMA contraction for every kernel launched here: on, unless ``TRITON_DEFAULT_FP_FUSION``
    or ``TRITON_FORCE_DISABLE_FP_FUSION`` says otherwise. Passed at each launch: triton 3.9
    warns when its default decides, and 3.10 turns that default off, which would change our
    kernels' bits and their speed (the quantized full path is issue-bound; docs/performance.md
    counts its instructions with fusion on)."""
    return _env.fp_fusion()


_PROGRAMS_PER_SM = 4
_sm_counts: dict = {}


# Elements per thread per iteration of a quantized variant's full path (cubin, sm_80 and
# sm_90, triton 3.9): 8 halves the per-row and per-iteration work per element (block
# absmax, scale, pointers: ~160 instructions a thread) against 4, and 2-byte arrays move
# in 16-byte accesses. With stochastic rounding (its Philox bits live too) 8 fits where
# they make the whole block (1024/4, 2048/8: 64-101 registers over the variants, sm_80
# and sm_90, triton 3.6 and 3.9; SR 8-bit at 1024/4 issues 155 instructions per element
# instead of 174), but in a loop over a larger block it took 95-128 (4096/8), so there
# it keeps 4 (at most 80).
QUANT_ELEMS_PER_THREAD = 8
QUANT_FEW_ELEMS_PER_THREAD = 4


def tail_sub_block(block_size: int, num_warps: int, compute_dtype=torch.float32,
                   quant: int = 0) -> int:
    """Elements per iteration of the masked path. The interpreter pays per iteration, not
    per register, so it takes a quarter block (still looping, so the loop is tested)."""
    if interpreted():
        return max(block_size // 4, 2 * QUANT_BLOCK.value if quant else 1)
    if quant:
        return min(block_size, QUANT_BLOCK.value * max(num_warps, 2))
    return min(block_size, 32 * num_warps * TAIL_ELEMS_PER_THREAD[compute_dtype.itemsize])


def full_sub_block(block_size: int, num_warps: int, stochastic_rounding: bool,
                   quant: int = 0, wide: bool = False, persistent: bool = False) -> int:
    """Elements per iteration of the full-block path: the whole block, except with
    stochastic rounding (at most ``SR_ELEMS_PER_THREAD`` per thread), quantized state
    (``QUANT_ELEMS_PER_THREAD``; ``QUANT_FEW_ELEMS_PER_THREAD`` with stochastic rounding
    in blocks of more, and for 8-bit codes with nearest rounding on a persistent grid) and
    fp64 (``WIDE_ELEMS_PER_THREAD``). A persistent grid's program is a call
    (kernels/adam.py: ``_program_call``) that keeps pid live beside the block: at 8
    elements per thread ptxas kept it on the stack in an 8-bit twin (bf16 AdamW at 4096/8,
    sm_90, triton 3.9: 64 registers and 8 bytes; at 4: 56, none), and at 4 in an 8-bit
    twin with stochastic rounding (bf16 remainder AdaMax at 2048/8, sm_90, triton 3.9: 64
    and 8; at 8, one iteration: none); 4-bit twins need no fewer. The interpreter takes
    half a block so the loop is tested."""
    if wide and not interpreted():
        return min(block_size, 32 * num_warps * WIDE_ELEMS_PER_THREAD)
    if quant:
        whole = block_size <= 32 * num_warps * QUANT_ELEMS_PER_THREAD
        few = (stochastic_rounding and not whole) or (persistent and quant == 8 and not stochastic_rounding)
        per_thread = QUANT_FEW_ELEMS_PER_THREAD if few else QUANT_ELEMS_PER_THREAD
        full = block_size // 2 if interpreted() else 32 * num_warps * per_thread
        return min(block_size, max(full, QUANT_MIN_FULL))
    if not stochastic_rounding:
        return block_size
    if interpreted():
        return max(block_size // 2, 1)
    return min(block_size, 32 * num_warps * SR_ELEMS_PER_THREAD)


def quant_vec(param_dtype, grad_dtype, master, full: int, num_warps: int) -> int:
    """Elements per access of a quantized variant's full path: 8 when params, grads and
    the master's remainder are 2 bytes wide (16-byte accesses), else 4; never more than a
    thread holds (the scale loads are laid out per thread's VEC elements)."""
    narrow = param_dtype.itemsize == 2 and grad_dtype.itemsize == 2 and int(master) != MASTER_FP32
    return min(8 if narrow else 4, max(full // (32 * num_warps), 1))


def interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter.

    Triton decides when a kernel is decorated, so ask the kernel itself: setting
    TRITON_INTERPRET after import has no effect.
    """
    return type(_adam_kernel).__name__ == "InterpretedFunction"


def persistent_programs(device: torch.device) -> int:
    """Programs in a persistent grid: a few per SM (2 on the CPU interpreter, for tests)."""
    if device.type != "cuda":
        return 2
    count = _sm_counts.get(device.index)
    if count is None:
        count = _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _PROGRAMS_PER_SM * count


def update_constexprs(key: BucketKey, *, block_size: int, num_warps: int, adamax: bool = False,
                      decoupled_wd: bool = False, coupled_wd: bool = False, found_inf: bool = False,
                      persistent: bool = False, unscale_grads: bool = False) -> dict:
    """The update kernel's constexpr arguments for one variant (torch dtypes as given);
    ``unscale_grads``: the step writes the grads back unscaled (GradScaler handed it its
    scale)."""
    quant = key.quant
    if quant and key.param_dtype == torch.float64:
        raise ValueError("quantized state is for float32, float16 and bfloat16 params")
    if quant and block_size % QUANT_MIN_FULL:
        raise ValueError(f"quantized state needs blocks of a multiple of {QUANT_MIN_FULL} elements, "
                         f"got {block_size}")
    cdtype = key.compute_dtype
    full = full_sub_block(block_size, num_warps, key.stochastic_rounding, quant,
                          wide=cdtype == torch.float64, persistent=persistent)
    flags = {
        "P_DTYPE": key.param_dtype,
        "G_DTYPE": key.grad_dtype,
        "CDTYPE": cdtype,
        "S_DTYPE": key.state_dtype,
        "ADAMAX": adamax,
        "AMSGRAD": key.amsgrad and not adamax,
        "MASTER": int(key.master),
        "DECOUPLED_WD": decoupled_wd,
        "COUPLED_WD": coupled_wd,
        "SR": key.stochastic_rounding,
        "HAS_FOUND_INF": found_inf,
        "PERSISTENT": persistent,
        "BLOCK": block_size,
        "SUB": tail_sub_block(block_size, num_warps, cdtype, quant),
        "FULL": full,
    }
    if quant:
        # Left out otherwise: the unquantized variants compile (and cache) as before.
        flags["QUANT"] = quant
        flags["QVEC"] = quant_vec(key.param_dtype, key.grad_dtype, key.master, full, num_warps)
    if unscale_grads:
        flags["UNSCALE_GRADS"] = True
    return flags


def norm_kind(norm_type: float) -> int:
    """The norm kernels' NORM constexpr for a norm order (checked by the caller)."""
    if norm_type == float("inf"):
        return NORM_INF.value
    return {1.0: NORM_L1.value, 2.0: NORM_L2.value}.get(norm_type, NORM_P.value)


def norm_config() -> tuple[int, int]:
    """(elements per block, warps) of the norm kernel: fixed, not tuned, so the norm's bits
    never depend on a tuning result. The interpreter pays per block, not per element."""
    return (16384, 4) if interpreted() else (4096, 8)


def norm_max_chunks() -> int:
    """Partials per norm launch at most (and programs): plenty to fill a GPU, while the
    one-program reduction still reads them all in a few trips. The interpreter pays per
    program: a few programs there, each looping over many blocks."""
    return 4 if interpreted() else 8192


def norm_constexprs(grad_dtype, norm: int, *, block_size: int, num_warps: int,
                    grad_scale: bool = False) -> dict:
    """The norm kernel's constexpr arguments for one variant (torch dtypes as given)."""
    cdtype = torch.float64 if grad_dtype == torch.float64 else torch.float32
    return {
        "G_DTYPE": grad_dtype,
        "CDTYPE": cdtype,
        "NORM": norm,
        "HAS_GRAD_SCALE": grad_scale,
        "BLOCK": block_size,
        "SUB": tail_sub_block(block_size, num_warps, cdtype),
    }


def tl_flags(flags: dict) -> dict:
    """Constexpr flags as a launch takes them: torch dtypes (as ``*_constexprs`` give them,
    which aot.py compiles from too) as Triton's."""
    return {k: TL_DTYPES.get(v, v) if isinstance(v, torch.dtype) else v for k, v in flags.items()}


def _quiet_discarded_branches():
    """numpy's floating-point warnings off, in the interpreter: it computes both sides of
    every ``tl.where`` with numpy, so a log of 0 in a side the select drops (the prepare
    kernel's ``1 - beta**t`` once ``beta**t`` underflows or at a count of 0, the p-norm of
    a zero element) makes numpy warn "divide by zero" or "invalid value", and inf or NaN
    grads make it warn where the GPU computes the same inf or NaN silently, as torch does.
    Compiled kernels evaluate nothing they discard; guarding the log inside them would
    cost registers on the GPU (the p-norm pass: 40 -> 63 on sm_90)."""
    return np.errstate(all="ignore") if interpreted() else contextlib.nullcontext()


def device_guard(device: torch.device):
    """Triton launches on the current device: switch to the tables' GPU if it is not."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch_prepare(tables: DeviceTables, *, grad_scale=None, found_inf=None, clip=None,
                   lr_tensors=False, beta_tensors=False, count=True, fusion=None) -> None:
    """Advance every tensor's step count and fill its scalar row (one launch); ``clip``:
    the clip buffer whose coefficient scales every grad. ``fusion`` (every launcher here):
    ``fp_fusion()`` as read by the caller, or None to read it now."""
    n = tables.num_rows
    with _quiet_discarded_branches():
        _prepare_kernel[(triton.cdiv(n, PREPARE_BLOCK),)](
            tables.table, tables.group_of, tables.groups, tables.group_ptrs, tables.scalars,
            grad_scale if grad_scale is not None else tables.scalars,
            found_inf if found_inf is not None else tables.scalars,
            clip if clip is not None else tables.scalars,
            n,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            HAS_CLIP=clip is not None,
            LR_TENSORS=lr_tensors,
            BETA_TENSORS=beta_tensors,
            BLOCK=PREPARE_BLOCK,
            num_warps=4, enable_fp_fusion=fp_fusion() if fusion is None else fusion,
        )
    if count:
        launch_counts["prepare"] += 1


def launch_update(tables: DeviceTables, bucket: Bucket, *, block_size: int, num_warps: int,
                  persistent: bool = False, adamax: bool = False, decoupled_wd: bool = False,
                  coupled_wd: bool = False, found_inf=None, unscale_grads: bool = False, count=True,
                  compile_only: bool = False, fusion=None):
    """Step every tensor of ``bucket`` with one launch of the update kernel
    (``unscale_grads``: write the grads back unscaled, by the prepare launch's 1/scale).

    ``compile_only``: compile this launch's kernel and return it, launching nothing (the
    tuner reads the compiler's report before timing).
    """
    block_map, num_blocks = bucket.block_map(block_size)
    programs = min(num_blocks, persistent_programs(tables.device)) if persistent else num_blocks
    flags = update_constexprs(
        bucket.key, block_size=block_size, num_warps=num_warps, adamax=adamax,
        decoupled_wd=decoupled_wd, coupled_wd=coupled_wd, found_inf=found_inf is not None,
        persistent=persistent, unscale_grads=unscale_grads,
    )
    flags = tl_flags(flags)
    args = (tables.table, tables.grads, tables.scalars, block_map,
            found_inf if found_inf is not None else tables.scalars, num_blocks)
    fusion = fp_fusion() if fusion is None else fusion
    if compile_only:
        return _adam_kernel.run(*args, grid=(programs,), warmup=True, num_warps=num_warps,
                                enable_fp_fusion=fusion, **flags)
    with _quiet_discarded_branches():
        _adam_kernel[(programs,)](*args, num_warps=num_warps, enable_fp_fusion=fusion, **flags)
    if count:
        launch_counts["update"] += 1


def launch_norm(tables: DeviceTables, plan: NormPlan, clip: torch.Tensor, *, norm: int,
                grad_scale=None, fusion=None) -> None:
    """Per-chunk partial norms of every grad on the tables' device: one launch per grad
    dtype, each writing its chunks' partials into its slice of ``plan.partials``
    (``grad_scale``: GradScaler's scale, which each grad is unscaled from first)."""
    block_size, num_warps = plan.block_size, plan.num_warps
    fusion = fp_fusion() if fusion is None else fusion
    for launch in plan.launches:
        flags = norm_constexprs(launch.grad_dtype, norm, block_size=block_size, num_warps=num_warps,
                                grad_scale=grad_scale is not None)
        flags = tl_flags(flags)
        with _quiet_discarded_branches():
            _norm_kernel[(launch.num_chunks,)](
                tables.table, tables.grads, launch.block_map, launch.partials, clip,
                grad_scale if grad_scale is not None else clip,
                launch.num_blocks, launch.chunk, num_warps=num_warps, enable_fp_fusion=fusion, **flags,
            )
        launch_counts["norm"] += 1


def launch_norm_reduce(plan: NormPlan | NormSpan, clip: torch.Tensor, out: torch.Tensor | None, *,
                       norm: int, reduce: bool, finalize: bool, compound=False,
                       check_finite=False, fusion=None) -> None:
    """One program: ``reduce`` adds the partials into ``plan.total``; ``finalize`` turns the
    total into the norm (written to ``out``) and the clip coefficient (into ``clip``). A
    ``NormSpan`` (one layout class's partials and total) is reduced the same way."""
    with _quiet_discarded_branches():
        _norm_reduce_kernel[(1,)](
            plan.partials, plan.num_partials, plan.total, out if out is not None else plan.total, clip,
            NORM=norm, REDUCE=reduce, FINALIZE=finalize, COMPOUND=compound, CHECK_FINITE=check_finite,
            OUT_DTYPE=TL_DTYPES[out.dtype] if out is not None else tl.float32,
            BLOCK=NORM_REDUCE_BLOCK, num_warps=NORM_REDUCE_WARPS,
            enable_fp_fusion=fp_fusion() if fusion is None else fusion,
        )
    launch_counts["norm_reduce"] += 1
