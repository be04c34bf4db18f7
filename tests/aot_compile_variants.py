"""Compile every kernel variant for sm_80 and sm_90 and print what test_aot.py checks.

Run in its own process without TRITON_INTERPRET (the test suite's interpreter mode
cannot compile for GPUs): ``python tests/aot_compile_variants.py`` prints JSON lines.
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tritonadam.kernels.aot import compile_variant, global_access_widths, ptxas_spills  # noqa: E402

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
NAMES = {BF16: "bf16", FP16: "fp16", FP32: "fp32", FP64: "fp64"}

VARIANTS = (
    [("adam", dict(P_DTYPE=d)) for d in (FP32, BF16, FP16, FP64)]
    + [
        ("adam", dict(P_DTYPE=BF16, DECOUPLED_WD=True, AMSGRAD=True)),
        ("adam", dict(P_DTYPE=BF16, MASTER=True)),
        ("adam", dict(P_DTYPE=FP16, MASTER=True, AMSGRAD=True, DECOUPLED_WD=True)),
        ("adam", dict(P_DTYPE=BF16, G_DTYPE=FP32, MASTER=True)),
        ("adam", dict(P_DTYPE=FP32, MAXIMIZE=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True)),
        ("adam", dict(P_DTYPE=FP32, LR_IS_TENSOR=True, BETAS_ARE_TENSORS=True, AMSGRAD=True)),
        ("adam", dict(P_DTYPE=FP64, AMSGRAD=True, BIAS_CORRECTION=False, HAS_WD=False)),
        ("adam", dict(P_DTYPE=BF16, MASTER=True, DECOUPLED_WD=True, PERSISTENT=True)),
    ]
    + [("adamax", dict(P_DTYPE=d)) for d in (FP32, BF16, FP16, FP64)]
    + [
        ("adamax", dict(P_DTYPE=BF16, MASTER=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True)),
        ("adamax", dict(P_DTYPE=FP32, LR_IS_TENSOR=True, MAXIMIZE=True, BIAS_CORRECTION=False)),
        ("adamax", dict(P_DTYPE=FP16, PERSISTENT=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True)),
    ]
)


def launch_shape(flags):
    # fp64 moves twice the bytes per element: half the block keeps registers in check.
    return (2048 if flags["P_DTYPE"] == FP64 else 4096), 8


def main():
    for kind, flags in VARIANTS:
        block, warps = launch_shape(flags)
        for arch in (80, 90):
            compiled = compile_variant(kind, arch=arch, num_warps=warps, BLOCK=block, **flags)
            ptx = compiled.asm["ptx"]
            spill_st, spill_ld = ptxas_spills(ptx, arch)
            print(json.dumps({
                "kind": kind,
                "flags": {k: (NAMES[v] if isinstance(v, torch.dtype) else v) for k, v in flags.items()},
                "arch": arch,
                "block": block,
                "num_warps": warps,
                "widths": global_access_widths(ptx),
                "cubin_bytes": len(compiled.asm["cubin"]),
                "spill_stores": spill_st,
                "spill_loads": spill_ld,
            }), flush=True)


if __name__ == "__main__":
    main()
