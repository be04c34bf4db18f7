"""What the autotuner needs from the kernels: variant keys, bytes per element, and
runners that launch one step on scratch buffers (never the user's tensors)."""
from __future__ import annotations

import threading
from typing import Callable

import torch

from .. import _env
from .launch import KERNELS, Hyper, launch
from .plan import build_bucket, dtype_name

# Hyper-parameters for timing runs: representative, and finite from the first step.
_TIMING_HYPER = {
    "adam": Hyper(1e-3, 0.9, 0.999, 1e-8, 0.0),
    "adamw": Hyper(1e-3, 0.9, 0.999, 1e-8, 1e-2, decoupled_weight_decay=True),
    "adamax": Hyper(2e-3, 0.9, 0.999, 1e-8, 0.0),
}


def _kind(optimizer: str) -> str:
    if optimizer not in _TIMING_HYPER:
        raise ValueError(f"optimizer must be one of {sorted(_TIMING_HYPER)}, got {optimizer!r}")
    return "adamax" if optimizer == "adamax" else "adam"


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def uses_master(param_dtype: torch.dtype, master_weights: bool) -> bool:
    return master_weights and param_dtype in (torch.float16, torch.bfloat16)


def variant_key(kind: str, *, decoupled: bool, amsgrad: bool, master: bool,
                param_dtype: torch.dtype, grad_dtype: torch.dtype) -> tuple:
    """What a tuned launch config depends on besides size: kernel variant and dtypes."""
    return (
        kind,
        f"decoupled={int(decoupled)}",
        f"amsgrad={int(amsgrad and kind == 'adam')}",
        f"master={int(master)}",
        f"p={dtype_name(param_dtype)}",
        f"g={dtype_name(grad_dtype)}",
        f"s={dtype_name(state_dtype(param_dtype))}",
    )


def autotune_key(*, optimizer: str, param_dtype: torch.dtype, grad_dtype: torch.dtype,
                 amsgrad: bool = False, master_weights: bool = False) -> tuple:
    """The key an optimizer step uses for this setup (``optimizer``: adam|adamw|adamax)."""
    return variant_key(
        _kind(optimizer), decoupled=optimizer == "adamw", amsgrad=amsgrad,
        master=uses_master(param_dtype, master_weights),
        param_dtype=param_dtype, grad_dtype=grad_dtype,
    )


def bytes_per_elem(*, optimizer: str = "adam", param_dtype: torch.dtype,
                   grad_dtype: torch.dtype, amsgrad: bool = False,
                   master_weights: bool = False) -> int:
    """Bytes one step reads and writes per element (DESIGN.md section 3).

    fp32: 28; bf16 params + fp32 state: 22; bf16 + fp32 master: 28; AMSGrad +8.
    """
    p, g = param_dtype.itemsize, grad_dtype.itemsize
    s = state_dtype(param_dtype).itemsize
    master = uses_master(param_dtype, master_weights)
    moments = 2 + (amsgrad and _kind(optimizer) == "adam")
    # param: read + write, or with a master copy only written (the master is read + written)
    return g + 2 * s * moments + (p + 2 * s if master else 2 * p)


def scaled_mix(numels: list[int], total: int) -> list[int]:
    """Tensor sizes for a scratch launch of about ``total`` elements shaped like a launch
    over ``numels``: the same sizes when they fit, else as many tensors of the same sizes as
    fit (the mix repeated or cut). Block boundaries, tails and the block -> tensor map
    then look like the real launch's, which a single tensor of ``total`` would not."""
    sizes = [int(n) for n in numels if n > 0] or [int(total)]
    out, i = [], 0
    room = int(total)
    while room > 0:
        n = min(sizes[i % len(sizes)], room)
        out.append(n)
        room -= n
        i += 1
    return out


class _CompileOnly:
    """Stands in for a kernel during one launch from the compiling thread: compiles it and
    launches nothing; other threads launching meanwhile get the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.thread, self.compiled = kernel, threading.get_ident(), None

    def __getitem__(self, grid):
        if threading.get_ident() != self.thread:
            return self.kernel[grid]

        def compile_only(*args, **kwargs):
            self.compiled = self.kernel.run(*args, grid=grid, warmup=True, **kwargs)

        return compile_only

    def __getattr__(self, name):
        return getattr(self.kernel, name)


_compile_lock = threading.Lock()  # one stand-in at a time, so swaps never nest


def compile_only(kind: str, launch_once: Callable[[], None]):
    """Call ``launch_once`` with the ``kind`` kernel compiling instead of launching; returns
    the compiled kernel (None in Triton's interpreter, which compiles nothing)."""
    with _compile_lock:
        real = KERNELS[kind]
        stand_in = KERNELS[kind] = _CompileOnly(real)
        try:
            launch_once()
        finally:
            KERNELS[kind] = real
    return stand_in.compiled


def make_scratch_runner(
    *,
    optimizer: str,
    param_dtype: torch.dtype,
    grad_dtype: torch.dtype,
    amsgrad: bool = False,
    master_weights: bool = False,
    config,
    numel: int | None = None,
    numels: list[int] | None = None,
    device: torch.device,
    hyper: Hyper | None = None,
) -> Callable[[], None]:
    """A callable launching one step of the kernel on fresh scratch buffers (for timing).

    ``numels``: the tensor sizes of the scratch launch (a bucket's size mix, see
    ``scaled_mix``); ``numel`` alone is one tensor. An in-place step timed on live tensors
    would apply the update several times, so the tuner only ever runs these.

    ``run.compile()`` compiles the launch without running it and returns the compiler's
    report, ``{"registers", "spills", "shared"}`` (per thread, per thread, bytes per
    program), or None where the compiler cannot say (Triton's interpreter).
    """
    if numels is None:
        if numel is None:
            raise TypeError("make_scratch_runner needs numel or numels")
        numels = [numel]
    kind = _kind(optimizer)
    if hyper is None:
        hyper = _TIMING_HYPER[optimizer]
    sdtype = state_dtype(param_dtype)
    p = [torch.randn(n, device=device).to(param_dtype) for n in numels]
    g = [torch.randn(n, device=device).to(grad_dtype) for n in numels]
    m = [torch.zeros(n, dtype=sdtype, device=device) for n in numels]
    v = [torch.zeros(n, dtype=sdtype, device=device) for n in numels]
    vmax = [torch.zeros_like(t) for t in v] if amsgrad and kind == "adam" else None
    w = [t.to(sdtype) for t in p] if uses_master(param_dtype, master_weights) else None
    step = [torch.ones((), dtype=torch.float32, device=device) for _ in numels]
    bucket = build_bucket(p, m, v, vmax, w, step, grad_dtype)
    bucket.set_grad_ptrs([t.data_ptr() for t in g])
    bucket.keep = (p, g, m, v, vmax, w, step)  # the table points at these

    def run() -> None:
        launch(kind, bucket, hyper, block_size=config.block_size, num_warps=config.num_warps,
               persistent=config.persistent, count=False)

    def compile() -> dict | None:
        if _env.interpret():
            return None
        kernel = compile_only(kind, run)
        kernel._init_handles()  # loads the binary: the driver reports registers and spills
        return {"registers": int(kernel.n_regs), "spills": int(kernel.n_spills),
                "shared": int(kernel.metadata.shared)}

    run.compile = compile
    run.numels, run.params = numels, p
    return run
