"""Hyper-parameters: torch.optim's checks, and a param group's values as the kernels read
them (re-read every step: LR schedulers write ``group["lr"]``, OneCycle ``betas``)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .kernels.plan import group_row

__all__ = ["GroupHyper", "check_hyper", "group_hyper"]


def check_hyper(lr, betas, eps, weight_decay) -> None:
    """torch.optim's checks at construction, in its order and with its messages."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i in (0, 1):
        if not 0.0 <= betas[i] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _check_step_values(lr, betas, eps, weight_decay) -> None:
    """What a step needs of a group's values: numbers, or 1-element tensors (the kernels
    read one element of a tensor lr or beta; reading its value would sync with the device).
    Their ranges are torch.optim's business at construction only: after it, a scheduler
    may write any number (CyclicLR's beta1 of 22 in torch's own tests, a LambdaLR whose
    lr goes negative), and torch steps with it."""
    for name, x in (("lr", lr), ("betas[0]", betas[0]), ("betas[1]", betas[1]), ("eps", eps),
                    ("weight_decay", weight_decay)):
        if isinstance(x, Tensor):  # eps and weight_decay too, with differentiable=True
            if x.numel() != 1:
                raise ValueError(f"Tensor {name} must be 1-element")
        elif x is None or isinstance(x, (str, bytes)):
            raise TypeError(name)
        else:
            try:
                float(x)  # a number of any kind, numpy's 0-dim arrays too
            except (TypeError, ValueError):
                raise TypeError(name) from None


@dataclass(frozen=True)
class GroupHyper:
    """One param group's row of the group table, and its tensor hyper-parameters."""

    row: tuple  # float64 values in kernels.layout's G_* order (kernels.plan.group_row)
    lr: Tensor | None  # read by the kernel where it lives; None for a float
    beta1: Tensor | None
    beta2: Tensor | None
    weight_decay: float
    decoupled: bool


def group_hyper(group: dict, adamax: bool, bias_correction: bool) -> GroupHyper:
    """``group``'s hyper-parameters, as the kernels read them (a value changed after
    construction steps as torch would, or fails clearly)."""
    lr = group["lr"]
    beta1, beta2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    try:
        _check_step_values(lr, (beta1, beta2), eps, wd)
    except TypeError:  # a value set by hand to None or a string
        raise TypeError(
            f"a param group's lr, betas, eps and weight_decay must be numbers (lr and betas may "
            f"be 1-element tensors), got lr={lr!r}, betas={group['betas']!r}, eps={eps!r}, "
            f"weight_decay={wd!r}: set them as numbers (weight_decay=0 for none)"
        ) from None
    decoupled = not adamax and bool(group.get("decoupled_weight_decay", False))

    def value(x) -> float:
        return 0.0 if isinstance(x, Tensor) else float(x)  # the kernel reads a tensor

    def tensor(x) -> Tensor | None:
        return x if isinstance(x, Tensor) else None

    row = group_row(value(lr), value(beta1), value(beta2), float(eps), float(wd), decoupled=decoupled,
                    maximize=bool(group.get("maximize", False)), bias_correction=bias_correction)
    return GroupHyper(row, tensor(lr), tensor(beta1), tensor(beta2), float(wd), decoupled)

