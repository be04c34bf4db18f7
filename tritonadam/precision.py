"""Precision modes: what each optimizer state tensor is stored as, and conversions
between the modes' state-dict forms.

- ``master_weights=True``: an fp32 copy of each fp16/bf16 param (``master_param``).
- ``master_weights="remainder"``: for bf16 params, the low 16 bits of the fp32 master
  (``master_param_remainder``, int16) beside the param, which holds the high half
  rounded to nearest (ties away from zero): the exact fp32 master in 2 extra bytes.
  ``state_dict()`` exports it as ``master_param`` (fp32), so checkpoints move freely
  between the two master modes and torch.optim.
- ``state_dtype=torch.bfloat16``: ``exp_avg`` and ``exp_avg_sq``/``exp_inf`` (and
  ``max_exp_avg_sq``) stored in bf16; the math stays fp32.
- ``stochastic_rounding=True``: whatever is stored in 16 bits without a master copy
  (fp16/bf16 params, bf16 state) is rounded stochastically, from counter-based random
  numbers: seed (``rounding_seed`` in each such param's state), the tensor, the element
  and the step count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels.layout import MASTER_FP32, MASTER_NONE, MASTER_REMAINDER

__all__ = ["Precision", "join_master", "split_master"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
_COMPLEX = (torch.complex64, torch.complex128)
MASTER_KEY = "master_param"
REMAINDER_KEY = "master_param_remainder"
SEED_KEY = "rounding_seed"


@dataclass(frozen=True)
class Precision:
    master_weights: bool | str = False  # False, True or "remainder"
    state_dtype: torch.dtype | None = None  # None: fp32 (fp64 for fp64 params)
    stochastic_rounding: bool = False

    @classmethod
    def checked(cls, master_weights, state_dtype, stochastic_rounding, name: str) -> "Precision":
        """The modes, or a ValueError saying which combination cannot work and why."""
        if master_weights not in (False, True, "remainder"):
            raise ValueError(f"Invalid master_weights: {master_weights!r} (False, True or 'remainder')")
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(
                f"Invalid state_dtype: {state_dtype!r} (None for float32, or torch.bfloat16)"
            )
        if not isinstance(stochastic_rounding, bool):
            raise ValueError(f"Invalid stochastic_rounding: {stochastic_rounding!r} (True or False)")
        if stochastic_rounding and master_weights and state_dtype != torch.bfloat16:
            raise ValueError(
                f"tritonadam.{name}: stochastic_rounding=True rounds what is kept in 16 bits "
                f"without a master copy (params, bf16 state); with master_weights={master_weights!r} "
                "and float32 state nothing is: drop one of the two, or add "
                "state_dtype=torch.bfloat16"
            )
        return cls(master_weights, state_dtype if state_dtype != torch.float32 else None,
                   stochastic_rounding)

    def check_param(self, p: Tensor, name: str) -> None:
        """Raise for a param these modes cannot step."""
        if self.master_weights == "remainder" and p.dtype == torch.float16:
            raise ValueError(
                f"tritonadam.{name}: master_weights='remainder' keeps the fp32 master of bf16 "
                "params in 2 extra bytes; float16 params cannot split that way: use "
                "master_weights=True for them"
            )
        if self.state_dtype is not None and (p.dtype == torch.float64 or p.dtype in _COMPLEX):
            raise ValueError(
                f"tritonadam.{name}: state_dtype={self.state_dtype} is for float32/16 and bfloat16 "
                f"params, got {p.dtype}"
            )

    def master(self, p: Tensor) -> int:
        """MASTER_NONE, MASTER_FP32 or MASTER_REMAINDER for param ``p``."""
        if not self.master_weights or p.dtype not in LOW_PRECISION:
            return int(MASTER_NONE)
        if self.master_weights == "remainder" and p.dtype == torch.bfloat16:
            return int(MASTER_REMAINDER)
        return int(MASTER_FP32)

    def moment_dtype(self, p: Tensor) -> torch.dtype:
        if p.dtype in _COMPLEX:
            return p.dtype  # complex state, as torch.optim keeps it
        if p.dtype == torch.float64:
            return torch.float64
        return self.state_dtype or torch.float32

    def rounds_stochastically(self, p: Tensor) -> bool:
        """Whether any of ``p``'s stored values are rounded stochastically."""
        if not self.stochastic_rounding:
            return False
        param_rounded = p.dtype in LOW_PRECISION and self.master(p) == MASTER_NONE
        return param_rounded or self.moment_dtype(p) == torch.bfloat16


def split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """(bf16 high half rounded to nearest, ties away from zero; int16 low half) of fp32
    ``master``: what ``master_weights="remainder"`` keeps, bit for bit as the kernel."""
    master = master.detach().to(torch.float32).contiguous()
    bits = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = torch.where(torch.isnan(master), bits | 0x400000, bits + 0x8000)
    high = ((rounded >> 16) & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.bfloat16)
    low = (bits & 0xFFFF).to(torch.int32).to(torch.int16)
    return high.view_as(master), low.view_as(master)


def join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master that ``split_master`` split, exactly."""
    high = param.detach().contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    low = remainder.detach().contiguous().to(torch.int64) & 0xFFFF
    high = torch.where(low >= 0x8000, high - 1, high) & 0xFFFF
    bits = ((high << 16) | low).to(torch.int32)  # wraps into the sign bit as intended
    return bits.view(torch.float32).view_as(param)
