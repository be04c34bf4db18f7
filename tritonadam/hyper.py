"""Hyper-parameters: torch.optim's checks, and a param group's values as the kernels read
them (re-read every step: LR schedulers write ``group["lr"]``, OneCycle ``betas``)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .kernels.plan import group_row

__all__ = ["GroupHyper", "check_hyper", "group_hyper"]


def check_hyper(lr, betas, eps, weight_decay, *, tensor_values: bool = True) -> None:
    """torch.optim's checks, in its order and with its messages.

    ``tensor_values=False`` (every step) checks a tensor lr or beta for being one element
    but not its value: reading a GPU tensor would sync with the device.
    """
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if (tensor_values or not isinstance(lr, Tensor)) and not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i in (0, 1):
        beta = betas[i]
        if isinstance(beta, Tensor) and not tensor_values:
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        elif not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


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
    """``group``'s hyper-parameters, checked against torch.optim's bounds (a value changed
    by hand after construction steps as torch would, or fails clearly)."""
    lr = group["lr"]
    beta1, beta2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    try:
        check_hyper(lr, (beta1, beta2), eps, wd, tensor_values=False)
    except TypeError:  # a value set by hand to None or a string: torch's "'<=' not supported"
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

