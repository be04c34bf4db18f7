"""What the autotuner needs from the kernels: variant keys, bytes per element, and
runners that launch one update on scratch buffers (never the user's tensors)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .. import _env
from . import layout
from .launch import launch_prepare, launch_update
from .plan import Bucket, BucketKey, DeviceTables

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}

# Hyper-parameters for timing runs (lr, beta1, beta2, eps, weight decay, decoupled):
# representative, and finite from the first step.
_TIMING_HYPER = {
    "adam": (1e-3, 0.9, 0.999, 1e-8, 0.0, False),
    "adamw": (1e-3, 0.9, 0.999, 1e-8, 1e-2, True),
    "adamax": (2e-3, 0.9, 0.999, 1e-8, 0.0, False),
}
_MASTER_NAMES = {int(layout.MASTER_NONE): "none", int(layout.MASTER_FP32): "fp32",
                 int(layout.MASTER_REMAINDER): "remainder"}


def _kind(optimizer: str) -> str:
    if optimizer not in _TIMING_HYPER:
        raise ValueError(f"optimizer must be one of {sorted(_TIMING_HYPER)}, got {optimizer!r}")
    return "adamax" if optimizer == "adamax" else "adam"


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def master_kind(param_dtype: torch.dtype, master_weights) -> int:
    """layout.MASTER_* for ``master_weights`` (False, True or "remainder")."""
    if not master_weights or param_dtype not in (torch.float16, torch.bfloat16):
        return int(layout.MASTER_NONE)
    if master_weights == "remainder" and param_dtype == torch.bfloat16:
        return int(layout.MASTER_REMAINDER)
    return int(layout.MASTER_FP32)


def variant_key(kind: str, *, decoupled: bool, amsgrad: bool, master, param_dtype: torch.dtype,
                grad_dtype: torch.dtype, state_dtype: torch.dtype | None = None,
                stochastic_rounding: bool = False) -> tuple:
    """What a tuned launch config depends on besides size: kernel variant and dtypes."""
    master = int(master)
    key = (
        kind,
        f"decoupled={int(decoupled)}",
        f"amsgrad={int(amsgrad and kind == 'adam')}",
        f"master={master if master < 2 else _MASTER_NAMES[master]}",
        f"p={dtype_name(param_dtype)}",
        f"g={dtype_name(grad_dtype)}",
        f"s={dtype_name(state_dtype or compute_dtype(param_dtype))}",
    )
    return key + (("sr=1",) if stochastic_rounding else ())


def autotune_key(*, optimizer: str, param_dtype: torch.dtype, grad_dtype: torch.dtype,
                 amsgrad: bool = False, master_weights=False, state_dtype=None,
                 stochastic_rounding: bool = False) -> tuple:
    """The key an optimizer step uses for this setup (``optimizer``: adam|adamw|adamax)."""
    return variant_key(
        _kind(optimizer), decoupled=optimizer == "adamw", amsgrad=amsgrad,
        master=master_kind(param_dtype, master_weights), param_dtype=param_dtype,
        grad_dtype=grad_dtype, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
    )


def bytes_per_elem(*, optimizer: str = "adam", param_dtype: torch.dtype,
                   grad_dtype: torch.dtype, amsgrad: bool = False, master_weights=False,
                   state_dtype: torch.dtype | None = None, **_ignored) -> int:
    """Bytes one step reads and writes per element.

    fp32: 28; bf16 params + fp32 state: 22; bf16 + fp32 master: 28; bf16 + remainder: 26;
    bf16 + bf16 state: 14; AMSGrad + one more moment.
    """
    p, g = param_dtype.itemsize, grad_dtype.itemsize
    s = (state_dtype or compute_dtype(param_dtype)).itemsize
    moments = 2 + (amsgrad and _kind(optimizer) == "adam")
    master = master_kind(param_dtype, master_weights)
    if master == layout.MASTER_FP32:
        param = p + 2 * 4  # the param is only written; the master is read and written
    elif master == layout.MASTER_REMAINDER:
        param = 2 * p + 2 * 2  # param and remainder, each read and written
    else:
        param = 2 * p
    return g + 2 * s * moments + param


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


def make_scratch_runner(
    *,
    optimizer: str,
    param_dtype: torch.dtype,
    grad_dtype: torch.dtype,
    amsgrad: bool = False,
    master_weights=False,
    state_dtype: torch.dtype | None = None,
    stochastic_rounding: bool = False,
    config,
    numel: int | None = None,
    numels: list[int] | None = None,
    device: torch.device,
) -> Callable[[], None]:
    """A callable launching one update on fresh scratch buffers (for timing).

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
    device = torch.device(device)
    sizes = [int(n) for n in numels]
    total = sum(sizes)
    cdtype = compute_dtype(param_dtype)
    sdtype = state_dtype or cdtype
    adam_amsgrad = amsgrad and kind == "adam"
    master = master_kind(param_dtype, master_weights)
    # One allocation per array, split into the launch's tensors: the launch sees the same
    # tensor boundaries (hence tails and alignment) as the real bucket.
    p = torch.randn(total, device=device).to(param_dtype)
    g = torch.randn(total, device=device).to(grad_dtype)
    m = torch.zeros(total, dtype=sdtype, device=device)
    v = torch.zeros(total, dtype=sdtype, device=device)
    vmax = torch.zeros(total, dtype=sdtype, device=device) if adam_amsgrad else None
    if master == layout.MASTER_FP32:
        w = p.to(torch.float32)
    elif master == layout.MASTER_REMAINDER:
        w = torch.zeros(total, dtype=torch.int16, device=device)
    else:
        w = None
    steps = torch.zeros(len(sizes), dtype=torch.float32, device=device)

    def parts(t):
        return list(torch.split(t, sizes)) if t is not None else [None] * len(sizes)

    rows = [
        DeviceTables.row(pi, mi, vi, xi, wi, steps[i], i)
        for i, (pi, mi, vi, xi, wi) in enumerate(zip(parts(p), parts(m), parts(v), parts(vmax), parts(w)))
    ]
    tables = DeviceTables(device, rows, [0] * len(rows), 1)
    lr, beta1, beta2, eps, wd, decoupled = _TIMING_HYPER[optimizer]
    group = (lr, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, wd, float(decoupled), 1.0, 1.0)
    tables.set_groups(group, (0,) * 6)
    tables.set_grad_ptrs(np.asarray([t.data_ptr() for t in parts(g)], dtype=np.int64))
    launch_prepare(tables, count=False)
    key = BucketKey(param_dtype, grad_dtype, adam_amsgrad, master, sdtype, stochastic_rounding)
    bucket = Bucket(key, device, 0, np.asarray(sizes, dtype=np.int64))
    flags = dict(block_size=config.block_size, num_warps=config.num_warps,
                 persistent=getattr(config, "persistent", False), adamax=kind == "adamax",
                 decoupled_wd=decoupled and wd != 0, coupled_wd=not decoupled and wd != 0,
                 count=False)

    def run() -> None:
        launch_update(tables, bucket, **flags)

    def compile() -> dict | None:
        if _env.interpret():
            return None
        kernel = launch_update(tables, bucket, compile_only=True, **flags)
        kernel._init_handles()  # loads the binary: the driver reports registers and spills
        return {"registers": int(kernel.n_regs), "spills": int(kernel.n_spills),
                "shared": int(kernel.metadata.shared)}

    run.compile = compile
    run.numels, run.params = sizes, parts(p)
    run.keep = (p, g, m, v, vmax, w, steps)  # the tables point at these
    return run
