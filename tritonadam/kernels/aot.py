"""Ahead-of-time compilation of kernel variants for a GPU target, with no GPU present.

Used by the tests as a CPU-side check of code quality (every variant compiles for sm_80
and sm_90, the aligned path uses 16-byte accesses, nothing spills) and handy for
inspecting PTX: ``compile_variant("adam", arch=90, P_DTYPE=torch.bfloat16).asm["ptx"]``.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .launch import _TL, KERNELS

_POINTER_ARGS = {
    "table_ptr": "*i64",
    "grads_ptr": "*i64",
    "block_map_ptr": "*i32",
    "counters_ptr": "*i32",
    "lr_ptr": "*fp32",
    "beta1_ptr": "*fp32",
    "beta2_ptr": "*fp32",
    "grad_scale_ptr": "*fp32",
    "found_inf_ptr": "*fp32",
}

DEFAULT_FLAGS = {
    "P_DTYPE": torch.float32,
    "G_DTYPE": None,  # same as P_DTYPE
    "LR_IS_TENSOR": False,
    "BETAS_ARE_TENSORS": False,
    "HAS_WD": True,
    "DECOUPLED_WD": False,
    "AMSGRAD": False,
    "MAXIMIZE": False,
    "MASTER": False,
    "BIAS_CORRECTION": True,
    "HAS_GRAD_SCALE": False,
    "HAS_FOUND_INF": False,
    "PERSISTENT": False,
    "BLOCK": 4096,
}


def compile_variant(kind: str, arch: int = 90, num_warps: int = 8, **flags):
    """Compile one kernel variant for ``cuda:sm_<arch>``; returns Triton's compiled kernel."""
    kernel = KERNELS[kind]
    if not hasattr(kernel, "params"):
        raise RuntimeError(
            "ahead-of-time compilation needs compiled kernels: run without TRITON_INTERPRET=1"
        )
    values = {**DEFAULT_FLAGS, **flags}
    if values["G_DTYPE"] is None:
        values["G_DTYPE"] = values["P_DTYPE"]
    cdtype = torch.float64 if values["P_DTYPE"] == torch.float64 else torch.float32
    constexprs = {
        name: (_TL[v] if isinstance(v, torch.dtype) else v) for name, v in values.items()
    }
    constexprs["CDTYPE"] = _TL[cdtype]
    names = list(kernel.arg_names)
    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        else:
            signature[param.name] = _POINTER_ARGS.get(param.name, "i32" if param.name == "num_blocks" else "fp32")
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def global_access_widths(ptx: str) -> dict[str, dict[int, int]]:
    """Count global loads and stores in PTX by access width in bytes."""
    widths = {"ld": {}, "st": {}}
    for op, vec, bits in re.findall(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        nbytes = int(vec or 1) * int(bits) // 8
        widths[op][nbytes] = widths[op].get(nbytes, 0) + 1
    return widths


def ptxas_spills(ptx: str, arch: int) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) that ptxas reports for ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the ptxas Triton itself uses for this PTX version
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr + out.stdout)
    if not found:
        raise RuntimeError(f"no spill report from ptxas:\n{out.stderr}")
    return sum(int(s) for s, _ in found), sum(int(l) for _, l in found)
