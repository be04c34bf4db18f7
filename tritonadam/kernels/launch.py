"""Plain launchers: tensors and scalars in, one kernel launch per bucket out.

Nothing here touches optimizer state dicts; ``tritonadam.functional`` builds the buckets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import triton.language as tl

from .adam import _adam_kernel
from .adamax import _adamax_kernel
from .plan import Bucket

KERNELS = {"adam": _adam_kernel, "adamax": _adamax_kernel}

_TL = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}

# Launches issued by this process, per kernel name: lets tests and the bench check that
# launches per step do not grow with the number of tensors.
launch_counts = {"adam": 0, "adamax": 0}


@dataclass(frozen=True)
class Hyper:
    """One step's hyper-parameters; lr and betas may be 1-element tensors.

    AMSGrad is not here: whether a bucket has a max_exp_avg_sq table decides it.
    """

    lr: float | torch.Tensor
    beta1: float | torch.Tensor
    beta2: float | torch.Tensor
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool = False
    maximize: bool = False
    bias_correction: bool = True


def _split(x: float, fp64: bool) -> tuple[float, float]:
    # Triton passes Python floats as fp32; fp64 steps get the rounding error as a 2nd fp32.
    hi = float(np.float32(x))
    return (hi, float(np.float32(x - hi))) if fp64 else (hi, 0.0)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


_PROGRAMS_PER_SM = 4
_sm_counts: dict = {}


def _persistent_programs(device: torch.device) -> int:
    """Programs in a persistent grid: a few per SM (2 on the CPU interpreter, for tests)."""
    if device.type != "cuda":
        return 2
    count = _sm_counts.get(device.index)
    if count is None:
        count = _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _PROGRAMS_PER_SM * count


def _on(device: torch.device, t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


def launch(
    kind: str,
    bucket: Bucket,
    hyper: Hyper,
    *,
    block_size: int,
    num_warps: int,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    persistent: bool = False,
    count: bool = True,
) -> None:
    """Step every tensor of ``bucket`` with one launch of the ``kind`` kernel.

    ``persistent``: a grid of a few programs per SM looping over the blocks, instead of one
    program per block.
    """
    device = bucket.device
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        # Triton launches on the current device and stream: switch for buckets on another GPU.
        with torch.cuda.device(device):
            return launch(kind, bucket, hyper, block_size=block_size, num_warps=num_warps,
                          grad_scale=grad_scale, found_inf=found_inf, persistent=persistent,
                          count=count)
    fp64 = bucket.compute_dtype == torch.float64
    bucket.set_block_size(block_size)

    lr_is_tensor = isinstance(hyper.lr, torch.Tensor)
    betas_are_tensors = isinstance(hyper.beta1, torch.Tensor)
    if lr_is_tensor:
        lr_t = _on(device, hyper.lr)
        lr = (0.0, 0.0)
    else:
        lr_t = bucket.table
        lr = _split(hyper.lr, fp64)
    if betas_are_tensors:
        b1_t, b2_t = _on(device, hyper.beta1), _on(device, hyper.beta2)
        b2 = w1 = w2 = lb1 = lb2 = (0.0, 0.0)
    else:
        b1_t = b2_t = bucket.table
        beta1, beta2 = float(hyper.beta1), float(hyper.beta2)
        b2 = _split(beta2, fp64)  # beta1 enters only as 1 - beta1 and log(beta1)
        w1, w2 = _split(1.0 - beta1, fp64), _split(1.0 - beta2, fp64)
        lb1, lb2 = _split(_log(beta1), fp64), _split(_log(beta2), fp64)
    eps = _split(hyper.eps, fp64)
    wd = _split(hyper.weight_decay, fp64)
    grad_scale = _on(device, grad_scale)
    found_inf = _on(device, found_inf)

    programs = min(bucket.num_blocks, _persistent_programs(device)) if persistent else bucket.num_blocks
    KERNELS[kind][(programs,)](
        bucket.table, bucket.grads, bucket.block_map, bucket.counters,
        *lr, lr_t, b1_t, *b2, b2_t, *w1, *w2, *lb1, *lb2, *eps, *wd,
        grad_scale if grad_scale is not None else bucket.table,
        found_inf if found_inf is not None else bucket.table,
        P_DTYPE=_TL[bucket.param_dtype],
        G_DTYPE=_TL[bucket.grad_dtype],
        CDTYPE=_TL[bucket.compute_dtype],
        LR_IS_TENSOR=lr_is_tensor,
        BETAS_ARE_TENSORS=betas_are_tensors,
        HAS_WD=hyper.weight_decay != 0,
        DECOUPLED_WD=hyper.decoupled_weight_decay,
        AMSGRAD=bucket.amsgrad,
        MAXIMIZE=hyper.maximize,
        MASTER=bucket.master,
        BIAS_CORRECTION=hyper.bias_correction,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        num_blocks=bucket.num_blocks,
        PERSISTENT=persistent,
        BLOCK=block_size,
        num_warps=num_warps,
    )
    if count:
        launch_counts[kind] += 1
