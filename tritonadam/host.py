"""Params on the CPU in a process whose kernels run on a GPU: FSDP2's ``CPUOffloadPolicy``,
FSDP1's ``CPUOffload(offload_params=True)``, a CPU copy of a model next to a GPU one.

Triton kernels cannot reach host memory, so torch.optim's own CPU implementation steps
these params on this optimizer's state: its fused CPU kernel (vectorized, multithreaded)
wherever the tensors allow it, else its single-tensor loop (complex params, AdaMax,
float64 step counts). fp16/bf16 params are stepped as the kernels step them: in fp32,
from the fp32 master when there is one (``master_weights="remainder"``: the master the
param and its int16 remainder stand for, split again exactly), and rounded to nearest
into the param (from an fp32 master, a bf16 param's ties go away from zero, as in the
kernels); bf16 moments (``state_dtype=torch.bfloat16``) likewise, in fp32 and
rounded back. Fused clipping (``clip_grad_norm_``, ``max_grad_norm=``) works as on the
GPU when every param with a grad is stepped here: the norm is torch's, the coefficient
scales the grads as this step reads them, and the clip writes no ``.grad`` (a step
GradScaler hands its scale leaves them unscaled, as the kernels do). The formats
only the kernels implement (stochastic rounding, quantized moments),
``bias_correction=False`` and a clip over CPU and GPU params together are refused before
anything is written.

Under Triton's interpreter (``TRITON_INTERPRET=1``) CPU params run the kernels instead:
that is how the kernels are tested without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .differentiable import torch_step
from .kernels.layout import CLIP_COEF
from .kernels.variant import Master
from .state import LOW_PRECISION, MASTER_KEY, REMAINDER_KEY, DenseMoments, ParamFormat, join_master, split_master
from .tensors import local_tensor, overlaps_itself

__all__ = ["HostRow", "check_format", "check_options", "mixed_clip_error", "step"]

# What torch's fused CPU kernel steps here (its _fused_adam_ / _fused_adamw_, with
# float32 step counts).
_FUSED_DTYPES = (torch.float32, torch.float64)
# Elements stepped per call into torch's implementation (``_chunks``): 64 MiB per fp32
# temporary, a few ms of its fused kernel.
CHUNK_NUMEL = 1 << 24


@dataclass
class HostRow:
    """One CPU param stepped by torch.optim's implementation, validated by the gathering."""

    param: Tensor  # as the user sees it (may be a DTensor with a CPU local tensor)
    grad: Tensor | None  # local grad, in the param's layout (None once stepped)
    group: int  # index into param_groups
    state: dict
    fmt: ParamFormat
    keys: tuple[str, ...]  # its moments' state keys


def _where(name: str) -> str:
    return (f"tritonadam.{name} steps params that live on the CPU (FSDP's CPU offload) with "
            "torch.optim's CPU implementation")


def check_format(name: str, fmt: ParamFormat, p: Tensor) -> None:
    """Raise if a CPU param's state format needs the kernels (nothing written)."""
    moments = fmt.moments
    problem = None
    if not isinstance(moments, DenseMoments):
        problem = f"state_dtype='{moments.bits}bit' (quantized moments)"
    elif fmt.stochastic:
        problem = "stochastic_rounding=True"
    if problem is not None:
        raise RuntimeError(
            f"{_where(name)}; {problem} needs the GPU kernels (got a {p.dtype} param of shape "
            f"{tuple(p.shape)} on the CPU). Move the params to the GPU, use the default state "
            f"(or master_weights=True) for CPU params, or step them with "
            f"torch.optim.{name}(..., fused=True)"
        )


def check_options(name: str, *, bias_correction: bool, clipping_with_gpu_params: bool) -> None:
    """Raise for optimizer options torch.optim's implementation does not have, and for a
    fused clip over CPU and GPU params at once."""
    if not bias_correction:
        raise RuntimeError(f"{_where(name)}, which has no bias_correction=False: move the params "
                           "to the GPU, or keep bias correction")
    if clipping_with_gpu_params:
        raise RuntimeError(mixed_clip_error(name))


def mixed_clip_error(name: str) -> str:
    return (
        f"{_where(name)}; fused clipping (clip_grad_norm_, max_grad_norm=) measures the grads "
        "of params on one device, and this optimizer has grads on the CPU and on the GPU: "
        "clip with torch.nn.utils.clip_grad_norm_ before step() (it clips .grad in place, "
        "which this optimizer then steps) and leave max_grad_norm unset, or use one optimizer "
        "per device"
    )


def _on_cpu(x):
    """A hyper-parameter where torch's CPU implementation reads it: a tensor one (an lr
    schedule's, maybe on the GPU) as a CPU tensor, which torch's own steps take as is."""
    return x.to("cpu") if isinstance(x, Tensor) and x.device.type != "cpu" else x


def step(algorithm: str, rows: list[HostRow], param_groups: list[dict], *,
         grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
         clip: Tensor | None = None) -> None:
    """One torch.optim step of every host row, group by group. GradScaler's ``found_inf``
    skips it (step counts unchanged, as in torch's fused step); its scale is taken out of
    the grads first, as torch takes it (see ``_step_rows``). ``clip``: the clip buffer (on
    the CPU) whose coefficient then multiplies each grad in the step's dtype, as torch's
    clip_grad_norm_ would have."""
    if not rows:
        return
    if found_inf is not None and found_inf.item():
        return
    scale = None if grad_scale is None else grad_scale.detach().to("cpu")
    if scale is not None:  # GradScaler.unscale_'s factor: the fp32 reciprocal, taken in fp64
        scale = (scale, scale.double().reciprocal().float())
    coef = None if clip is None else clip[CLIP_COEF.value]
    by_group: dict[int, list[HostRow]] = {}
    for row in rows:
        by_group.setdefault(row.group, []).append(row)
    for index, group_rows in by_group.items():
        _step_group(algorithm, param_groups[index], group_rows, scale, coef)


def _step_group(algorithm: str, group: dict, rows: list[HostRow], scale: tuple | None,
                coef: Tensor | None) -> None:
    # Tensor hyper-parameters where torch's CPU code reads them.
    group = {**group, "lr": _on_cpu(group["lr"]), "betas": tuple(map(_on_cpu, group["betas"]))}
    for chunk in _chunks(rows):
        _step_rows(algorithm, group, chunk, scale, coef)


def _chunks(rows: list[HostRow]):
    """Consecutive rows of at most CHUNK_NUMEL elements together (a larger one alone): the
    fp32 copies a step makes (of fp16/bf16 params and moments, of grads to unscale, clip or
    widen) exist for one chunk at a time, not for a whole group, which for an offloaded
    model would double its host memory. torch's steps are elementwise, so the bits do not
    depend on the chunking."""
    chunk, numel = [], 0
    for row in rows:
        n = row.grad.numel()
        if chunk and numel + n > CHUNK_NUMEL:
            yield chunk
            chunk, numel = [], 0
        chunk.append(row)
        numel += n
    if chunk:
        yield chunk


def _step_rows(algorithm: str, group: dict, rows: list[HostRow], scale: tuple | None,
               coef: Tensor | None) -> None:
    """``scale``: GradScaler's scale and its fp32 reciprocal, or None."""
    params, grads, states, writeback, masters, splits = [], [], [], [], [], []
    for row in rows:
        lp = local_tensor(row.param)
        target = lp
        if row.fmt.master == Master.FP32:
            target = local_tensor(row.state[MASTER_KEY])
            (masters if lp.dtype == torch.bfloat16 else writeback).append((lp, target))
        elif row.fmt.master == Master.REMAINDER:
            remainder = local_tensor(row.state[REMAINDER_KEY])
            target = join_master(lp, remainder)
            splits.append((lp, remainder, target))
        elif lp.dtype in LOW_PRECISION:
            target = lp.float()  # the kernels' fp32 step, rounded to nearest below
            writeback.append((lp, target))
        grad = row.grad if row.grad.dtype == target.dtype else row.grad.to(target.dtype)
        params.append(target)
        grads.append(grad)
        states.append(row.state)
    steps = [local_tensor(s["step"]) for s in states]
    moments, stored = [], []
    for key in rows[0].keys:  # one group: the same keys for every row
        column = []
        for s, target in zip(states, params):
            value = local_tensor(s[key])
            if value.dtype != target.dtype:  # bf16 moments: stepped in fp32, rounded back
                wide = value.to(target.dtype)
                stored.append((value, wide))
                value = wide
            column.append(value)
        moments.append(column)
    columns = [params, grads, *moments, steps]
    # torch's fused CPU kernel walks each tensor's memory linearly from its data pointer
    # (given a non-dense param it wrote past the view: torch 2.13), so it gets contiguous
    # tensors only; the single-tensor loop's ops follow strides.
    fusable = [algorithm == "adam" and p.dtype in _FUSED_DTYPES and t.dtype == torch.float32
               and all(c[i].is_contiguous() for c in columns[:-1])
               for i, (p, t) in enumerate(zip(params, steps))]
    for i, fused in enumerate(fusable):  # in the step's dtype, not in place (unscaled in place below)
        if scale is not None:
            # torch's fused step divides the scale out in its kernel; its other steps, and its
            # clip, see GradScaler.unscale_'s grads, multiplied by the reciprocal
            grads[i] = grads[i] / scale[0] if fused and coef is None else grads[i] * scale[1]
        if coef is not None:
            grads[i] = grads[i] * coef.to(grads[i].dtype)
    for fused in (True, False):
        picked = [i for i, f in enumerate(fusable) if f == fused]
        if picked:
            p, g, *m, t = ([c[i] for i in picked] for c in columns)
            torch_step(algorithm, group, p, g, m, t, fused=fused)
    if scale is not None:
        # The grads left unscaled, as the kernels leave them: times unscale_'s fp32 1/scale
        # (torch's fused step divides: the same for power-of-two scales), fp16/bf16 ones in
        # fp32 and rounded back.
        for row in rows:
            held = local_tensor(row.param.grad)
            if overlaps_itself(held):
                continue
            if held.dtype in LOW_PRECISION:
                held.copy_(held.float() * scale[1])
            else:
                held.mul_(scale[1])
    for lp, target in writeback + stored:
        lp.copy_(target)  # to nearest, ties to even, as the kernels round
    for lp, master in masters:
        # A bf16 param from its fp32 master: to nearest, ties away from zero, as the kernels
        # round it (the remainder's rounding, so master_weights=True and "remainder" agree).
        lp.copy_(split_master(master)[0])
    for lp, remainder, master in splits:
        high, low = split_master(master)
        lp.copy_(high)
        remainder.copy_(low)

