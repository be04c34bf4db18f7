"""``differentiable=True`` groups: stepped by torch.optim's own single-tensor
implementation on this optimizer's state, with autograd on, so the update can be
differentiated through (as in torch.optim). No kernel runs for them. ``torch_step``, the
call into torch's functional step, also steps the host path's CPU params (``host``)."""
from __future__ import annotations

import torch
from torch import Tensor

from .state import StatePolicy, moment_keys, new_step_dtype
from .validate import check_grad_dtype, sparse_grad_error

__all__ = ["inputs", "step", "torch_step"]


def inputs(name: str, group: dict, state: dict, *, grad_enabled: bool) -> tuple[list[Tensor], list[Tensor]]:
    """The group's params with grads and their grads, validated (nothing written).
    ``grad_enabled``: whether ``step`` will record the update (see there)."""
    params, grads = [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:  # before the leaf's error, as torch checks it first
            raise sparse_grad_error(name)
        # The grad dtypes the kernels take: torch's in-place updates refuse other pairs
        # midway through the group, where ``step`` would cast them silently.
        check_grad_dtype(name, p, p.grad)
        step = state.get(p, {}).get("step")
        if group.get("differentiable") and isinstance(step, Tensor) and step.requires_grad:
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
        if grad_enabled and p.is_leaf and p.requires_grad and not torch.is_inference_mode_enabled():
            # torch's own error, which its step raises after counting the step (under
            # inference mode nothing is recorded, and torch steps the leaf).
            raise RuntimeError(
                "a leaf Variable that requires grad is being used in an in-place operation. "
                f"(tritonadam.{name}, differentiable=True: autograd records the update of each "
                "param, so pass params that are not leaves, e.g. p.clone(), as torch.optim's "
                "differentiable tests do)"
            )
        params.append(p)
        grads.append(p.grad)
    return params, grads


def step(name: str, algorithm: str, policy: StatePolicy, state: dict, group: dict,
         params: list[Tensor], grads: list[Tensor], *, grad_enabled: bool) -> None:
    """One torch.optim step of ``group`` (``algorithm``: "adam" or "adamax"), with autograd
    on when ``grad_enabled``: the optimizer's ``differentiable`` default, which is what
    torch.optim's step sets the grad mode from (a group switched to differentiable=True
    by hand then steps without autograd, as in torch, instead of failing on its first
    in-place update of a leaf)."""
    if not params:
        return
    keys = moment_keys(algorithm, group.get("amsgrad", False))
    states = []
    with torch.set_grad_enabled(grad_enabled):
        # Recorded too: state given in another layout (or dtype) than the kernels keep is
        # re-laid out here, and a gradient through the step reaches the given tensors.
        for p in params:
            fmt = policy.format(p)
            if fmt.check(p, state.get(p, {}), keys, name):
                fmt.prepare(p, state[p], keys, None, new_step_dtype(group))
            states.append(state[p])
        # 16-bit params keep fp32 moments here too (torch.optim keeps them in the param's
        # dtype), whose in-place updates take grads of their own dtype: the cast is recorded.
        grads = [g if g.dtype == s[keys[0]].dtype else g.to(s[keys[0]].dtype) for g, s in zip(grads, states)]
        torch_step(algorithm, group, params, grads, [[s[k] for s in states] for k in keys],
                   [s["step"] for s in states], differentiable=bool(group.get("differentiable")))


def torch_step(algorithm: str, group: dict, params: list[Tensor], grads: list[Tensor],
               moments: list[list[Tensor]], steps: list[Tensor], *, fused: bool = False,
               differentiable: bool = False) -> None:
    """torch.optim's functional ``adam`` / ``adamax`` over these tensors with ``group``'s
    values (``moments``: one list per key, in ``moment_keys`` order). Also the host
    path's step (``tritonadam.host``)."""
    beta1, beta2 = group["betas"]
    common = dict(
        foreach=False, maximize=group["maximize"], differentiable=differentiable, capturable=False,
        has_complex=any(torch.is_complex(p) for p in params),
        eps=group["eps"], beta1=beta1, beta2=beta2, lr=group["lr"],
        weight_decay=group["weight_decay"],
    )
    if algorithm == "adamax":
        from torch.optim.adamax import adamax

        adamax(params, grads, *moments, steps, **common)
    else:
        from torch.optim.adam import adam

        amsgrad = group.get("amsgrad", False)
        adam(
            params, grads, moments[0], moments[1], moments[2] if amsgrad else [], steps,
            fused=fused, amsgrad=amsgrad,
            decoupled_weight_decay=group.get("decoupled_weight_decay", False), **common,
        )
