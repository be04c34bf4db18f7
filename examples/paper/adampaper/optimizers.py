"""The optimizers of the paper's figures, by name: tritonadam's (or, with ``impl="torch"``,
torch.optim's) Adam and AdaMax, and torch.optim's baselines."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import tritonadam
from torch.optim import Optimizer
from tritonadam import _env

LABELS = {
    "adam": "Adam",
    "adamax": "AdaMax",
    "sgd_nesterov": "SGD Nesterov",
    "adagrad": "AdaGrad",
    "rmsprop": "RMSProp",
    "adadelta": "AdaDelta",
}
IMPLS = ("tritonadam", "torch")
# Momentum is not tuned: 0.9 is the usual value and the paper does not give its own.
NESTEROV_MOMENTUM = 0.9


class Unavailable(ValueError):
    """The requested optimizer has no implementation in the chosen library."""


def interpreter_launch(params: Sequence[torch.Tensor]) -> dict[str, int]:
    """A fixed launch config for Triton's interpreter, where each program costs milliseconds
    whatever its size: one block as large as the largest tensor (within the kernels' range),
    and no autotuning."""
    largest = max(p.numel() for p in params)
    return {"block_size": min(65536, max(16, 1 << math.ceil(math.log2(largest)))), "num_warps": 4}


def build(name: str, params: Sequence[torch.Tensor], lr: float, impl: str = "tritonadam",
          betas: tuple[float, float] = (0.9, 0.999), bias_correction: bool = True) -> Optimizer:
    """Optimizer ``name`` (a key of LABELS) over ``params``; ``betas`` and
    ``bias_correction`` apply to Adam and AdaMax only."""
    params = list(params)
    if name in ("adam", "adamax"):
        if impl == "tritonadam":
            cls = tritonadam.Adam if name == "adam" else tritonadam.Adamax
            launch = interpreter_launch(params) if _env.interpret() else {}
            return cls(params, lr=lr, betas=betas, bias_correction=bias_correction, **launch)
        if impl != "torch":
            raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")
        if not bias_correction:
            raise Unavailable(f"torch.optim has no {LABELS[name]} without bias correction")
        cls = torch.optim.Adam if name == "adam" else torch.optim.Adamax
        return cls(params, lr=lr, betas=betas, foreach=False)
    if name == "sgd_nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=NESTEROV_MOMENTUM, nesterov=True)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(LABELS)}")


def inverse_sqrt_decay(optimizer: Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """α_t = α / √t, t counting steps from 1 (the paper's logistic-regression schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / math.sqrt(step + 1))
