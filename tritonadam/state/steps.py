"""Step counts: their dtype and device, as torch.optim keeps them."""
from __future__ import annotations

import torch
from torch import Tensor

from ..tensors import local_tensor


# Step counts: float32, or float64 where torch.optim makes them so (the prepare kernel
# reads and writes either).
STEP_DTYPES = (torch.float32, torch.float64)


def _countable(step, lp: Tensor) -> bool:
    """Whether the kernels can count in ``step`` itself, as torch.optim's ``step_t += 1``
    does: a one-element float count beside the param (an A3C-style ``torch.zeros(1)``
    shared between processes keeps counting for all of them). Anything else is replaced
    by a new count of its value."""
    return (isinstance(step, Tensor) and step.dtype in STEP_DTYPES and step.numel() == 1
            and local_tensor(step) is step and step.device == step_device(lp) and not step.is_neg())


def count_of(value, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A new count holding ``value`` (a number or a one-element tensor), of the tensor's
    shape: torch.optim keeps a loaded ``torch.zeros(1)``'s shape, counts in it and saves
    it so."""
    shape = value.shape if isinstance(value, Tensor) else ()
    return torch.full(shape, float(value), dtype=dtype, device=device)


def step_device(lp: Tensor) -> torch.device:
    """Where a new count of local param ``lp`` lives: beside it (the kernels count in it),
    or on the CPU for a meta param, as torch.optim keeps it."""
    return torch.device("cpu") if lp.is_meta else lp.device


def new_step_dtype(group: dict) -> torch.dtype:
    """torch.optim's dtype for a new step count: float64 under a float64 default dtype,
    except with ``fused=True`` (torch's ``_get_scalar_dtype``), else float32."""
    if group.get("fused"):
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def loaded_step_dtype(value, group: dict) -> torch.dtype:
    """The dtype a loaded step count gets, as torch.optim gives it: a number becomes a new
    count (``__setstate__``); a tensor becomes float32 in capturable or fused groups
    (``load_state_dict``), else a float64 one is kept."""
    if not isinstance(value, Tensor):
        return new_step_dtype(group)
    if group.get("capturable") or group.get("fused"):
        return torch.float32
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def loaded_step_device(value, group: dict, param_device: torch.device) -> torch.device:
    """Where torch.optim leaves a loaded step count: on the param's device in capturable or
    fused groups, else where the state dict had it (a number: on the CPU). A count left
    elsewhere is moved to the param's device by the next step, where the kernels advance
    it without a host sync."""
    if group.get("capturable") or group.get("fused"):
        return param_device
    return value.device if isinstance(value, Tensor) else torch.device("cpu")
