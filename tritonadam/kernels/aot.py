"""Ahead-of-time compilation of the kernels for a GPU target, with no GPU present.

The tests use it as a CPU-side check of code quality (every variant compiles for sm_80
and sm_90, the full-block path moves 4- and 8-byte data in 16-byte accesses, nothing spills, no ordered atomics
or fences in the update kernel, registers within bounds), and it is how the candidate
launch configs were derived. Handy for reading PTX:
``compile_update(arch=90, param_dtype=torch.bfloat16).asm["ptx"]``.

Needs compiled (not interpreted) kernels: run it in a process without ``TRITON_INTERPRET``.
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

from .adam import _adam_kernel
from .launch import (NORM_REDUCE_BLOCK, NORM_REDUCE_WARPS, TL_DTYPES, fp_fusion, norm_constexprs,
                     update_constexprs, tl_flags)
from .norm import _norm_kernel, _norm_reduce_kernel
from .prepare import _prepare_kernel
from .variant import BucketKey, Master, dtype_name

_POINTERS = {
    "table_ptr": "*i64",
    "grads_ptr": "*i64",
    "scalars_ptr": "*fp64",
    "block_map_ptr": "*i64",
    "found_inf_ptr": "*fp32",
    "grad_scale_ptr": "*fp32",
    "group_of_ptr": "*i32",
    "groups_ptr": "*fp64",
    "group_ptrs_ptr": "*i64",
    "clip_ptr": "*fp64",
    "partials_ptr": "*fp64",
    "total_ptr": "*fp64",
}


def compile_kernel(kernel, constexprs: dict, *, arch: int, num_warps: int, pointers: dict | None = None):
    """Compile any @triton.jit kernel: constexprs by name, pointer types of its pointer
    arguments by name (other arguments are i32)."""
    return _compile(kernel, constexprs, arch, num_warps, pointers)


def _compile(kernel, constexprs: dict, arch: int, num_warps: int, pointers: dict | None = None):
    if not hasattr(kernel, "params"):
        raise RuntimeError(
            "ahead-of-time compilation needs compiled kernels: run without TRITON_INTERPRET=1"
        )
    names = list(kernel.arg_names)
    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        else:
            signature[param.name] = {**_POINTERS, **(pointers or {})}.get(param.name, "i32")
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": fp_fusion()})


def update_variant(num_warps: int = 8, block_size: int = 4096, *, param_dtype=torch.float32, grad_dtype=None,
                   state_dtype=None, amsgrad=False, master=Master.NONE, stochastic_rounding=False, quant=0,
                   **flags) -> dict:
    """The update kernel's constexprs for one variant, as the launcher passes them.

    The bucket's dtypes and state (``state_dtype``: of the moments, default the compute
    dtype; ``quant``: 8 or 4 for blockwise-quantized moments instead; ``master``: a
    ``Master``, True meaning FP32), and the launcher's flags
    (``adamax``, ``decoupled_wd``, ``coupled_wd``, ``found_inf``, ``persistent``).
    """
    compute = torch.float64 if param_dtype == torch.float64 else torch.float32
    state = f"{quant}bit" if quant else dtype_name(state_dtype or compute)
    key = BucketKey(param_dtype, grad_dtype or param_dtype, state,
                    amsgrad and not flags.get("adamax", False), Master(int(master)), stochastic_rounding)
    return update_constexprs(key, block_size=block_size, num_warps=num_warps, **flags)


def compile_update(arch: int = 90, num_warps: int = 8, block_size: int = 4096, **variant):
    """Compile one variant of the update kernel for ``cuda:sm_<arch>`` (``variant``: as
    ``update_variant`` takes it)."""
    constexprs = update_variant(num_warps, block_size, **variant)
    return _compile(_adam_kernel, tl_flags(constexprs), arch, num_warps)


def compile_prepare(arch: int = 90, num_warps: int = 4, block: int = 256, **flags):
    constexprs = {"HAS_GRAD_SCALE": False, "HAS_FOUND_INF": False, "HAS_CLIP": False, "LR_TENSORS": False,
                  "BETA_TENSORS": False, "BLOCK": block, **flags}
    return _compile(_prepare_kernel, constexprs, arch, num_warps)


def compile_norm(arch: int = 90, num_warps: int = 8, block_size: int = 4096, *,
                 grad_dtype=torch.float32, norm: int = 2, grad_scale: bool = False):
    """Compile one variant of the norm kernel (``norm``: the launcher's NORM kind)."""
    constexprs = norm_constexprs(grad_dtype, norm, block_size=block_size, num_warps=num_warps,
                                 grad_scale=grad_scale)
    return _compile(_norm_kernel, tl_flags(constexprs), arch, num_warps)


def compile_norm_reduce(arch: int = 90, *, out_dtype=torch.float32, **flags):
    """Compile the norm reduction; ``flags``: its constexpr flags (NORM, REDUCE, ...)."""
    constexprs = {"NORM": 2, "REDUCE": True, "FINALIZE": True,
                  "COMPOUND": False, "CHECK_FINITE": False, "OUT_DTYPE": TL_DTYPES[out_dtype],
                  "BLOCK": NORM_REDUCE_BLOCK, **flags}
    norm_ptr = "*fp64" if out_dtype == torch.float64 else "*fp32"
    return _compile(_norm_reduce_kernel, constexprs, arch, NORM_REDUCE_WARPS, {"norm_ptr": norm_ptr})


def global_access_widths(ptx: str) -> dict[str, dict[int, int]]:
    """Global loads and stores in PTX, counted by access width in bytes."""
    widths = {"ld": {}, "st": {}}
    for op, vec, bits in re.findall(r"\b(ld|st)\.global(?:\.[a-z0-9_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        nbytes = int(vec or 1) * int(bits) // 8
        widths[op][nbytes] = widths[op].get(nbytes, 0) + 1
    return widths


def ordering_ops(ptx: str) -> list[str]:
    """Atomics with acquire/release order, fences and barriers across the GPU in PTX."""
    return re.findall(r"\b(?:atom|red)\.[^\s;]*(?:acq|rel|sc)[^\s;]*|\bfence\.[^\s;]+|\bmembar\.[^\s;]+", ptx)


def atomic_ops(ptx: str) -> list[str]:
    """Every atomic read-modify-write in PTX (float ones make sums order-dependent)."""
    return re.findall(r"\b(?:atom|red)\.[^\s;]+", ptx)


def shared_memory_ops(ptx: str) -> int:
    return len(re.findall(r"\b(?:ld|st)\.shared\b", ptx))


def shared_memory_ops_in_loops(ptx: str) -> int:
    """Shared-memory loads and stores inside a loop: between a backward branch and the
    label it jumps to (a reduction across warps there would cost a barrier per trip)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L\w+):", line))}
    spans = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L\w+);", line)
        if m and labels.get(m.group(1), i) < i:
            spans.append((labels[m.group(1)], i))
    return sum(
        1 for i, line in enumerate(lines)
        if re.search(r"\b(?:ld|st)\.shared\b", line) and any(a <= i <= b for a, b in spans)
    )


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spill bytes and shared memory that ``ptxas -v`` reports for ``ptx``."""
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
    text = out.stderr + out.stdout
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    smem = re.findall(r"(\d+) bytes smem", text)
    if not regs or not spills:
        raise RuntimeError(f"no register report from ptxas:\n{text}")
    return {
        "registers": max(int(r) for r in regs),
        "spill_stores": sum(int(s) for s, _ in spills),
        "spill_loads": sum(int(l) for _, l in spills),
        "shared_bytes": max((int(s) for s in smem), default=0),
    }


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """What Triton's bundled ``cuobjdump`` prints for ``cubin`` (``-sass``, ``-res-usage``)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """Registers and local memory (stack and spills, bytes per thread) of the cubin Triton
    built. ``ptxas_report`` runs ptxas on the PTX alone and misses the options Triton
    passes (triton 3.9 adds --regAllocOptLevel=2; there ptxas alone reported 64 registers
    and 8 bytes of spills where the kernel that runs has 72 and none)."""
    out = cuobjdump(cubin, "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"no resource usage from cuobjdump:\n{out}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(3))}


def resident_warps(registers: int, num_warps: int) -> int:
    """Warps per SM that fit on sm_80/sm_90: 64K registers per SM, allocated per warp in
    units of 256; at most 64 warps and 32 programs per SM (shared memory is unused)."""
    per_warp = -(-registers * 32 // 256) * 256
    programs = min(65536 // (per_warp * num_warps), 64 // num_warps, 32)
    return programs * num_warps
