"""What the autotuner needs from the kernels: variant keys, bytes per element, and
runners that launch one step on scratch buffers (never the user's tensors)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

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


def _kind(optimizer: str) -> str:
    if optimizer not in _TIMING_HYPER:
        raise ValueError(f"optimizer must be one of {sorted(_TIMING_HYPER)}, got {optimizer!r}")
    return "adamax" if optimizer == "adamax" else "adam"


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


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
    """Bytes one step reads and writes per element.

    fp32: 28; bf16 params + fp32 state: 22; bf16 + fp32 master: 28; AMSGrad +8.
    """
    p, g = param_dtype.itemsize, grad_dtype.itemsize
    s = state_dtype(param_dtype).itemsize
    master = uses_master(param_dtype, master_weights)
    moments = 2 + (amsgrad and _kind(optimizer) == "adam")
    # param: read + write, or with a master copy only written (the master is read + written)
    return g + 2 * s * moments + (p + 2 * s if master else 2 * p)


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
) -> Callable[[], None]:
    """A callable launching one update on fresh scratch buffers (for timing).

    ``numels``: the tensor sizes of the bucket being tuned (its size mix decides how many
    programs are tails); ``numel`` alone means one tensor. An in-place step timed on live
    tensors would apply the update several times, so the tuner only ever runs these.
    """
    kind = _kind(optimizer)
    if numels is None:
        if numel is None:
            raise ValueError("make_scratch_runner needs numel or numels")
        numels = [numel]
    total = int(sum(numels))
    sdtype = state_dtype(param_dtype)
    adam_amsgrad = amsgrad and kind == "adam"
    master = uses_master(param_dtype, master_weights)
    # One allocation per array, split into the bucket's tensors: the launch sees the same
    # tensor boundaries (hence tails and alignment) as the real bucket.
    p = torch.randn(total, device=device).to(param_dtype)
    g = torch.randn(total, device=device).to(grad_dtype)
    m = torch.zeros(total, dtype=sdtype, device=device)
    v = torch.zeros(total, dtype=sdtype, device=device)
    vmax = torch.zeros(total, dtype=sdtype, device=device) if adam_amsgrad else None
    w = p.to(sdtype) if master else None
    steps = torch.zeros(len(numels), dtype=torch.float32, device=device)
    sizes = [int(n) for n in numels]

    def parts(t):
        return list(torch.split(t, sizes)) if t is not None else [None] * len(sizes)

    rows = [
        DeviceTables.row(pi, mi, vi, xi, wi, steps[i])
        for i, (pi, mi, vi, xi, wi) in enumerate(zip(parts(p), parts(m), parts(v), parts(vmax), parts(w)))
    ]
    tables = DeviceTables(torch.device(device), rows, [0] * len(rows), 1)
    lr, beta1, beta2, eps, wd, decoupled = _TIMING_HYPER[optimizer]
    group = (lr, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, wd, float(decoupled), 1.0, 1.0)
    assert len(group) == layout.GROUP_COLUMNS.value
    tables.set_groups(group, (0,) * 6)
    tables.set_grad_ptrs(np.asarray([t.data_ptr() for t in parts(g)], dtype=np.int64))
    launch_prepare(tables, count=False)
    bucket = Bucket(BucketKey(param_dtype, grad_dtype, adam_amsgrad, int(master)), torch.device(device), 0,
                    np.asarray(sizes, dtype=np.int64))
    keep = (p, g, m, v, vmax, w, steps)

    def run() -> None:
        launch_update(tables, bucket, block_size=config.block_size, num_warps=config.num_warps,
                      persistent=getattr(config, "persistent", False), adamax=kind == "adamax",
                      decoupled_wd=decoupled and wd != 0, coupled_wd=not decoupled and wd != 0,
                      count=False)

    run.keep = keep  # the tables point at these
    return run
