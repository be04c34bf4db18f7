"""What the autotuner needs from the kernels: variant keys, bytes per element, and
runners that launch one step on scratch buffers (never the user's tensors)."""
from __future__ import annotations

from typing import Callable

import torch

from .launch import Hyper, launch
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


def make_scratch_runner(
    *,
    optimizer: str,
    param_dtype: torch.dtype,
    grad_dtype: torch.dtype,
    amsgrad: bool = False,
    master_weights: bool = False,
    config,
    numel: int,
    device: torch.device,
    hyper: Hyper | None = None,
) -> Callable[[], None]:
    """A callable launching one step of the kernel on fresh scratch buffers (for timing).

    An in-place step timed on live tensors would apply the update several times, so the
    tuner only ever runs these.
    """
    kind = _kind(optimizer)
    if hyper is None:
        hyper = _TIMING_HYPER[optimizer]
    sdtype = state_dtype(param_dtype)
    p = torch.randn(numel, device=device).to(param_dtype)
    g = torch.randn(numel, device=device).to(grad_dtype)
    m = torch.zeros(numel, dtype=sdtype, device=device)
    v = torch.zeros(numel, dtype=sdtype, device=device)
    vmax = [torch.zeros_like(v)] if amsgrad and kind == "adam" else None
    w = [p.to(sdtype)] if uses_master(param_dtype, master_weights) else None
    step = torch.ones((), dtype=torch.float32, device=device)
    bucket = build_bucket([p], [m], [v], vmax, w, [step], grad_dtype)
    bucket.set_grad_ptrs([g.data_ptr()])
    bucket.keep = (p, g, m, v, vmax, w, step)  # the table points at these

    def run() -> None:
        launch(kind, bucket, hyper, block_size=config.block_size, num_warps=config.num_warps,
               persistent=getattr(config, "persistent", False), count=False)

    return run
