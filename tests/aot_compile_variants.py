"""Compile the kernels as a step launches them, for sm_80 and sm_90, and print what
test_aot.py checks (one JSON line per compile).

Run in its own process without TRITON_INTERPRET (the test session's interpreter mode
cannot compile for GPUs): ``python tests/aot_compile_variants.py``. The constexprs come
from the launcher's own ``update_constexprs``, so what compiles here is what launches.
"""
from __future__ import annotations

import json
import os
import re
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tritonadam.autotune.configs import DEFAULTS, GPU_DEFAULT, config_space  # noqa: E402
from tritonadam.kernels import aot  # noqa: E402
from tritonadam.kernels.launch import (  # noqa: E402
    NORM_REDUCE_BLOCK, NORM_REDUCE_WARPS, norm_config,
)

NORM_CONFIG = norm_config()  # the GPU config: this process does not interpret

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
REMAINDER = 2  # tritonadam.kernels.layout.MASTER_REMAINDER
NAMES = {BF16: "bf16", FP16: "fp16", FP32: "fp32", FP64: "fp64"}

# Every supported (param, grad) dtype pair, and each flag on and off somewhere (GradScaler's
# step: found_inf with unscale_grads, the grads written back unscaled; found_inf alone after
# the user's unscale_).
VARIANTS = [
    dict(param_dtype=FP32, decoupled_wd=True),
    dict(param_dtype=FP32, grad_dtype=BF16, coupled_wd=True, found_inf=True, unscale_grads=True),
    dict(param_dtype=FP32, grad_dtype=FP16, amsgrad=True),
    dict(param_dtype=BF16, decoupled_wd=True),
    dict(param_dtype=BF16, grad_dtype=FP32, master=True, decoupled_wd=True),
    dict(param_dtype=BF16, master=True, amsgrad=True, decoupled_wd=True, found_inf=True, unscale_grads=True),
    dict(param_dtype=FP16, master=True, coupled_wd=True, decoupled_wd=True),
    dict(param_dtype=FP16, grad_dtype=FP32, amsgrad=True, found_inf=True),
    dict(param_dtype=FP64, amsgrad=True, coupled_wd=True),
    dict(param_dtype=FP64, amsgrad=True, decoupled_wd=True, found_inf=True, unscale_grads=True),
    dict(param_dtype=FP32, adamax=True, coupled_wd=True),
    dict(param_dtype=BF16, adamax=True, master=True, found_inf=True, unscale_grads=True),
    dict(param_dtype=FP16, adamax=True),
    dict(param_dtype=FP64, adamax=True, found_inf=True),
    dict(param_dtype=BF16, master=True, decoupled_wd=True, persistent=True),
    dict(param_dtype=FP32, adamax=True, persistent=True),
    # Precision modes: exact master in 2 bytes, stochastic rounding, bf16 state.
    dict(param_dtype=BF16, master=REMAINDER, decoupled_wd=True),
    dict(param_dtype=BF16, grad_dtype=FP32, master=REMAINDER, amsgrad=True, found_inf=True, unscale_grads=True),
    dict(param_dtype=BF16, stochastic_rounding=True, decoupled_wd=True),
    dict(param_dtype=FP16, stochastic_rounding=True, coupled_wd=True, found_inf=True, unscale_grads=True),
    dict(param_dtype=FP32, state_dtype=BF16, decoupled_wd=True),
    dict(param_dtype=FP32, state_dtype=BF16, stochastic_rounding=True, decoupled_wd=True),
    dict(param_dtype=BF16, state_dtype=BF16, decoupled_wd=True),
    dict(param_dtype=BF16, state_dtype=BF16, stochastic_rounding=True, decoupled_wd=True),
    dict(param_dtype=BF16, state_dtype=BF16, stochastic_rounding=True, amsgrad=True),
    dict(param_dtype=BF16, grad_dtype=FP32, state_dtype=BF16, stochastic_rounding=True, amsgrad=True),
    dict(param_dtype=BF16, master=REMAINDER, state_dtype=BF16, stochastic_rounding=True,
         decoupled_wd=True),
    dict(param_dtype=BF16, master=True, state_dtype=BF16, stochastic_rounding=True, adamax=True),
    dict(param_dtype=FP16, master=True, state_dtype=BF16, persistent=True),
    # torch.optim.Adam(weight_decay=...) on an fp32 model, and fp16 AMSGrad AdamW: 8 bytes
    # of stack at sm_90's 1024/4 default until 2026-12-06 (a late scalar load kept its row
    # pointer alive; a 238-variant sweep of real steps found them).
    dict(param_dtype=FP32, coupled_wd=True),
    dict(param_dtype=FP16, amsgrad=True, decoupled_wd=True),
]
# Quantized state (8-bit and 4-bit blockwise moments): every optimizer, param dtype and
# master mode, stochastic rounding, AMSGrad, GradScaler's skip and a persistent grid.
QUANT_VARIANTS = [
    dict(param_dtype=FP32, quant=8, decoupled_wd=True),
    dict(param_dtype=FP32, quant=4, amsgrad=True, coupled_wd=True),
    dict(param_dtype=FP32, grad_dtype=BF16, quant=8, stochastic_rounding=True, found_inf=True, unscale_grads=True),
    dict(param_dtype=BF16, quant=8, stochastic_rounding=True, decoupled_wd=True),
    dict(param_dtype=BF16, quant=4, stochastic_rounding=True, decoupled_wd=True),
    dict(param_dtype=BF16, quant=8, master=REMAINDER, amsgrad=True, decoupled_wd=True, found_inf=True, unscale_grads=True),
    dict(param_dtype=BF16, quant=4, master=REMAINDER, decoupled_wd=True),
    dict(param_dtype=BF16, quant=4, master=REMAINDER, amsgrad=True, stochastic_rounding=True),
    dict(param_dtype=BF16, grad_dtype=FP32, quant=8, master=True, amsgrad=True, decoupled_wd=True),
    dict(param_dtype=FP16, quant=4, master=True, stochastic_rounding=True, amsgrad=True),
    dict(param_dtype=FP16, quant=8, stochastic_rounding=True, coupled_wd=True),
    dict(param_dtype=FP32, quant=4, adamax=True, coupled_wd=True),
    dict(param_dtype=BF16, quant=8, adamax=True, master=REMAINDER, stochastic_rounding=True),
    dict(param_dtype=FP16, quant=4, adamax=True, master=True, found_inf=True, unscale_grads=True),
    dict(param_dtype=BF16, quant=8, decoupled_wd=True, persistent=True),
    dict(param_dtype=FP32, quant=4, adamax=True, stochastic_rounding=True, persistent=True),
]
# Registers are bounded at 4096/8 (fp64: 2048/8, the same bytes per thread); the default
# config must keep 32 warps resident.
CONFIGS = [(4096, 8), (2048, 8), (GPU_DEFAULT.block_size, GPU_DEFAULT.num_warps)]
# Quantized persistent twins (the tuner's candidates with persistent=True) that once
# spilled, 8 bytes of stack at 64-96 registers: with the program inlined into the grid's
# loop (d3a9e93, sm_80/sm_90, triton 3.6/3.9), and the last five with it called but the
# codecs' persistent forms chosen otherwise (kernels/adam.py: _program_call). Each is
# compiled for both architectures: (variant, block, warps). Unquantized persistent twins
# keep the inlined loop and some spill (docs/performance.md): not compiled here.
PERSISTENT_TWINS = [
    (dict(param_dtype=BF16, quant=8, stochastic_rounding=True, decoupled_wd=True), 512, 2),
    (dict(param_dtype=BF16, quant=8, stochastic_rounding=True, decoupled_wd=True), 2048, 8),
    (dict(param_dtype=BF16, quant=4, stochastic_rounding=True, decoupled_wd=True), 1024, 8),
    (dict(param_dtype=BF16, quant=8, master=REMAINDER, amsgrad=True, decoupled_wd=True, found_inf=True, unscale_grads=True), 2048, 4),
    (dict(param_dtype=BF16, grad_dtype=FP32, quant=8, master=True, amsgrad=True, decoupled_wd=True), 2048, 4),
    (dict(param_dtype=FP16, quant=4, master=True, stochastic_rounding=True, amsgrad=True), 512, 4),
    (dict(param_dtype=FP16, quant=4, master=True, stochastic_rounding=True, amsgrad=True), 1024, 8),
    (dict(param_dtype=FP32, quant=4, adamax=True, coupled_wd=True), 1024, 2),
    (dict(param_dtype=BF16, quant=8, adamax=True, master=REMAINDER, stochastic_rounding=True), 512, 2),
    (dict(param_dtype=FP32, quant=4, adamax=True, stochastic_rounding=True), 1024, 2),
    (dict(param_dtype=BF16, quant=4, master=REMAINDER, decoupled_wd=True), 4096, 8),
    (dict(param_dtype=FP32, quant=4, amsgrad=True, coupled_wd=True), 2048, 4),
    (dict(param_dtype=BF16, grad_dtype=FP32, quant=8, master=True, amsgrad=True, decoupled_wd=True), 1024, 2),
    (dict(param_dtype=BF16, quant=8, stochastic_rounding=True, decoupled_wd=True), 4096, 8),
]
# The whole candidate space, on the heaviest variant of each width.
SPACE_VARIANTS = [
    dict(param_dtype=BF16, master=True, amsgrad=True, decoupled_wd=True, found_inf=True, unscale_grads=True),
    dict(param_dtype=BF16, quant=4, master=REMAINDER, amsgrad=True, stochastic_rounding=True),
    dict(param_dtype=BF16, state_dtype=BF16, stochastic_rounding=True, amsgrad=True),
    dict(param_dtype=FP64, amsgrad=True, coupled_wd=True),
]


# The norm kernel runs one fixed config (its bits must not depend on tuning): every grad
# dtype with the 2- and inf-norm, the 1-norm and a general p on both compute widths.
NORM_VARIANTS = (
    [dict(grad_dtype=d, norm=n) for d in (FP32, BF16, FP16, FP64) for n in (2, 3)]
    + [dict(grad_dtype=d, norm=n) for d in (FP32, FP64) for n in (1, 4)]
    # GradScaler's scale unscales each grad in the pass (clip_grad_norm_(scaler=), max_grad_norm)
    + [dict(grad_dtype=d, norm=n, grad_scale=True) for d, n in ((FP16, 2), (BF16, 4), (FP32, 3), (FP64, 2))]
)
REDUCE_VARIANTS = [
    {},
    dict(NORM=3, COMPOUND=True, CHECK_FINITE=True),
    dict(FINALIZE=False),
    dict(NORM=4, REDUCE=False, out_dtype=FP64),
]


@triton.jit
def _sum_per_trip(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """A control for the loop check: a cross-warp reduction on every trip of a loop."""
    total = 0.0
    i = 0
    while i < n:
        total += tl.sum(tl.load(x_ptr + i + tl.arange(0, BLOCK)), axis=0)
        i += BLOCK
    tl.store(out_ptr, total)


def _flags(flags):
    return {k: (NAMES[v] if isinstance(v, torch.dtype) else v) for k, v in flags.items()}


def _report(kind, flags, arch, block, warps, compiled):
    ptx = compiled.asm["ptx"]
    report = aot.ptxas_report(ptx, arch)
    used = aot.cubin_resources(compiled.asm["cubin"])
    report["registers"] = used["registers"]
    # Spills land in local memory; the cubin does not split them into stores and loads.
    report["spill_stores"] = report["spill_loads"] = used["local"] + used["stack"]
    if flags.get("quant"):
        # What the launcher passes: the full path's elements per iteration and access.
        constexprs = aot.update_variant(warps, block, **flags)
        report["full"], report["qvec"], report["sub"] = constexprs["FULL"], constexprs["QVEC"], constexprs["SUB"]
    print(json.dumps({
        "kernel": kind,
        "flags": _flags(flags),
        "arch": arch,
        "block": block,
        "num_warps": warps,
        "widths": aot.global_access_widths(ptx),
        "ordering": aot.ordering_ops(ptx),
        "shared_ops": aot.shared_memory_ops(ptx),
        "shared_ops_in_loops": aot.shared_memory_ops_in_loops(ptx),
        "atomics": aot.atomic_ops(ptx),
        # Cross-lane traffic: warp shuffles and warp reductions (redux, sm_80+).
        "shuffles": len(re.findall(r"\bshfl\.sync\b", ptx)),
        "warp_reductions": len(re.findall(r"\bredux\.sync\b", ptx)),
        # IEEE divisions (torch's bits) and approximate ones (kernels/adam.py: fast_div).
        "div_rn": len(re.findall(r"\bdiv\.rn\.f(?:32|64)\b", ptx)),
        "div_approx": len(re.findall(r"\bdiv\.approx\.ftz\.f32\b", ptx)),
        # Square roots that keep a subnormal operand (kernels/adam.py: fast_sqrt).
        "sqrt_subnormal": len(re.findall(r"\bsqrt\.approx\.f32\b", ptx)),
        "resident_warps": aot.resident_warps(report["registers"], warps),
        **report,
    }), flush=True)


def main():
    space = sorted({(c.block_size, c.num_warps) for c in config_space("cuda")})
    for arch in (80, 90):
        done = set()
        for flags in VARIANTS + QUANT_VARIANTS:
            for block, warps in CONFIGS:
                wide = flags["param_dtype"] == FP64
                if (block, wide) in ((4096, True), (2048, False)):
                    continue
                key = (tuple(sorted(_flags(flags).items())), block, warps)
                if key in done:
                    continue
                done.add(key)
                compiled = aot.compile_update(arch=arch, num_warps=warps, block_size=block, **flags)
                _report("update", flags, arch, block, warps, compiled)
        # The architecture's other defaults (sm_90: 1024/4 above 2^25 elements) launch every
        # variant untuned: each is compiled there too.
        defaults = sorted({(r.config.block_size, r.config.num_warps) for r in DEFAULTS
                           if r.backend == "cuda" and r.arch == f"sm_{arch}"} - set(CONFIGS))
        for flags in VARIANTS + QUANT_VARIANTS:
            for block, warps in defaults:
                compiled = aot.compile_update(arch=arch, num_warps=warps, block_size=block, **flags)
                _report("update-default", flags, arch, block, warps, compiled)
        for flags, block, warps in PERSISTENT_TWINS:
            twin = {**flags, "persistent": True}
            compiled = aot.compile_update(arch=arch, num_warps=warps, block_size=block, **twin)
            _report("update-persistent", twin, arch, block, warps, compiled)
        for flags in SPACE_VARIANTS:
            for block, warps in space:
                compiled = aot.compile_update(arch=arch, num_warps=warps, block_size=block, **flags)
                _report("update-space", flags, arch, block, warps, compiled)
        for flags in ({}, dict(HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, HAS_CLIP=True,
                               LR_TENSORS=True, BETA_TENSORS=True)):
            _report("prepare", flags, arch, 256, 4, aot.compile_prepare(arch=arch, **flags))
        block, warps = NORM_CONFIG
        for flags in NORM_VARIANTS:
            compiled = aot.compile_norm(arch=arch, num_warps=warps, block_size=block, **flags)
            _report("norm", flags, arch, block, warps, compiled)
        for flags in REDUCE_VARIANTS:
            compiled = aot.compile_norm_reduce(arch=arch, **flags)
            _report("norm-reduce", flags, arch, NORM_REDUCE_BLOCK, NORM_REDUCE_WARPS, compiled)
        control = aot.compile_kernel(_sum_per_trip, {"BLOCK": 4096}, arch=arch, num_warps=8,
                                     pointers={"x_ptr": "*fp32", "out_ptr": "*fp32"})
        _report("control", {}, arch, 4096, 8, control)


if __name__ == "__main__":
    main()
