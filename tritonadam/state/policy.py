"""An optimizer's state options, and the format they give each param."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.layout import QUANT_MIN_FULL
from ..kernels.variant import Master, Variant
from .entries import COMPLEX, LOW_PRECISION, QUANTIZED
from .moments import DenseMoments, QuantizedMoments
from .param_format import ParamFormat


@dataclass(frozen=True)
class StatePolicy:
    """An optimizer's state options, and the :class:`ParamFormat` each param gets."""

    master_weights: bool | str = False  # False, True or "remainder"
    state_dtype: torch.dtype | str | None = None  # None: fp32 (fp64 for fp64 params); "8bit", "4bit"
    stochastic_rounding: bool = False

    @classmethod
    def checked(cls, master_weights, state_dtype, stochastic_rounding, name: str) -> "StatePolicy":
        """The options, or a ValueError saying which combination cannot work and why."""
        if master_weights not in (False, True, "remainder"):
            raise ValueError(f"Invalid master_weights: {master_weights!r} (False, True or 'remainder')")
        if state_dtype not in (None, torch.float32, torch.bfloat16, *QUANTIZED):
            raise ValueError(
                f"Invalid state_dtype: {state_dtype!r} (None for float32, torch.bfloat16, "
                "or '8bit' / '4bit' for blockwise-quantized moments)"
            )
        if not isinstance(stochastic_rounding, bool):
            raise ValueError(f"Invalid stochastic_rounding: {stochastic_rounding!r} (True or False)")
        if stochastic_rounding and master_weights and state_dtype in (None, torch.float32):
            raise ValueError(
                f"tritonadam.{name}: stochastic_rounding=True rounds what is kept in 16 bits or "
                f"fewer without a master copy (params, bf16 or quantized state); with "
                f"master_weights={master_weights!r} and float32 state nothing is: drop one of the "
                "two, or add state_dtype=torch.bfloat16, '8bit' or '4bit'"
            )
        return cls(master_weights, state_dtype if state_dtype != torch.float32 else None,
                   stochastic_rounding)

    def check_block_size(self, block_size: int | None, name: str) -> None:
        """Quantized moments are stepped in whole groups of quantization blocks."""
        if block_size is not None and self.state_dtype in QUANTIZED and block_size % QUANT_MIN_FULL:
            raise ValueError(
                f"tritonadam.{name}: state_dtype={self.state_dtype!r} steps whole groups of "
                f"{QUANT_MIN_FULL} elements per program; use a block_size that is a multiple of "
                f"{QUANT_MIN_FULL}, or None (autotuned)"
            )

    def check_param(self, p: Tensor, name: str) -> None:
        """Raise for a param these options cannot step."""
        if self.master_weights == "remainder" and p.dtype == torch.float16:
            raise ValueError(
                f"tritonadam.{name}: master_weights='remainder' keeps the fp32 master of bf16 "
                "params in 2 extra bytes; float16 params cannot split that way: use "
                "master_weights=True for them"
            )
        if self.state_dtype is not None and (p.dtype == torch.float64 or p.dtype in COMPLEX):
            raise ValueError(
                f"tritonadam.{name}: state_dtype={self.state_dtype} is for float32/16 and bfloat16 "
                f"params, got {p.dtype}"
            )

    def idle_options(self, dtypes) -> list[str]:
        """Why each option that changes nothing for params of ``dtypes`` does (to warn)."""
        if not dtypes:
            return []
        idle = []
        if self.master_weights and not any(d in LOW_PRECISION for d in dtypes):
            idle.append(f"master_weights={self.master_weights!r} changes nothing for these params "
                        "(float32/float64 params are their own master) unless they are cast to "
                        "fp16/bf16 later (model.half() or model.bfloat16() after building the "
                        "optimizer, which it then follows) or fp16/bf16 params join later "
                        "(add_param_group, e.g. base layers unfrozen in a LoRA fine-tune: the "
                        "option is the optimizer's, set when it is built); otherwise drop it")
        if self.stochastic_rounding and not any(self.format_for(d).stochastic for d in dtypes):
            idle.append("stochastic_rounding=True changes nothing for these params (float32 params "
                        "with float32 state, and float64 or complex params, round nothing) unless "
                        "they are cast to fp16/bf16 later (model.half() or model.bfloat16() after "
                        "building the optimizer); otherwise drop it, or use it with "
                        "state_dtype=torch.bfloat16 or a quantized state_dtype")
        return idle

    def format(self, p: Tensor) -> ParamFormat:
        return self.format_for(p.dtype)

    @functools.lru_cache(maxsize=None)  # noqa: B019 - a few dtypes per (immutable) policy
    def format_for(self, dtype: torch.dtype) -> ParamFormat:
        if dtype in COMPLEX:
            moments = DenseMoments(dtype, (dtype,))  # complex state, as torch.optim keeps it
        elif dtype == torch.float64:
            moments = DenseMoments(torch.float64, (torch.float64,))
        elif self.state_dtype in QUANTIZED:
            moments = QuantizedMoments(QUANTIZED[self.state_dtype])
        else:
            moments = DenseMoments(self.state_dtype or torch.float32, (torch.float32, torch.bfloat16))
        master = Master.NONE
        if self.master_weights and dtype in LOW_PRECISION:
            master = Master.REMAINDER if self.master_weights == "remainder" else Master.FP32
        param_rounded = dtype in LOW_PRECISION and master == Master.NONE
        # fp64 and complex128 moments (name "float64") are stepped at their own precision:
        # flagging them would only split their launch off into a bucket of its own.
        moments_rounded = moments.name not in ("float32", "float64")
        stochastic = self.stochastic_rounding and (param_rounded or moments_rounded)
        return ParamFormat(moments, master, stochastic)


def variant(optimizer: str, param_dtype: torch.dtype, grad_dtype: torch.dtype | None = None, *,
            amsgrad: bool = False, master_weights=False, state_dtype=None,
            stochastic_rounding: bool = False) -> Variant:
    """The kernel variant ``tritonadam.<optimizer>`` ("adam", "adamw" or "adamax") with
    these constructor options steps a param of ``param_dtype`` with: what its launch is
    tuned by (``.autotune_key()``), the bytes one step moves per param (``.traffic()``,
    ``.bytes_per_elem()``) and the bytes of state kept per param
    (``.state_bytes_per_elem()``)."""
    policy = StatePolicy.checked(master_weights, state_dtype, stochastic_rounding, optimizer)
    policy.check_param(torch.empty(0, dtype=param_dtype), optimizer)
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}
    grad_dtype = grad_dtype or param_dtype
    key = policy.format_for(param_dtype).bucket_key(
        real.get(param_dtype, param_dtype), real.get(grad_dtype, grad_dtype), amsgrad and optimizer != "adamax")
    return Variant(optimizer, key)
