"""One vocabulary for a kernel variant.

A :class:`BucketKey` is what one update launch shares (dtypes and how the state is
stored); a :class:`Variant` adds the algorithm. The launchers take them, and the
autotune key, the bytes a step moves, the scratch runners the tuner times and the bench's
byte counts are all computed from them, here and nowhere else.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .layout import QUANT_BLOCK

__all__ = ["ALGORITHMS", "BucketKey", "Master", "Variant", "code_bytes", "dtype_name", "num_scales"]

ALGORITHMS = ("adam", "adamw", "adamax")


class Master(enum.IntEnum):
    """The master copy of a 16-bit param (the update kernel's MASTER constexpr)."""

    NONE = 0
    FP32 = 1  # an fp32 copy, stepped; the param is written as its rounded copy
    REMAINDER = 2  # the bf16 param plus an int16 low half: the exact fp32 master


_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}
_DENSE_STATES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
QUANT_BITS = {"8bit": 8, "4bit": 4}
# Bytes per element of one stored moment, by state format: quantized moments hold their
# codes and a bf16 scale per QUANT_BLOCK elements.
STATE_BYTES = {"float32": 4, "bfloat16": 2, "float64": 8,
               **{name: bits / 8 + 2 / QUANT_BLOCK.value for name, bits in QUANT_BITS.items()}}
_MASTER_BYTES = {Master.FP32: 4, Master.REMAINDER: 2}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def code_bytes(numel: int, bits: int) -> int:
    """Bytes of a quantized moment's codes for ``numel`` elements (4-bit: two per byte)."""
    return numel if bits == 8 else (numel + 1) // 2


def num_scales(numel: int) -> int:
    """A quantized moment's scales for ``numel`` elements: one per started block."""
    return -(-numel // QUANT_BLOCK.value)


@dataclass(frozen=True)
class BucketKey:
    """What one update launch shares, whatever param group its tensors belong to.

    ``state``: how the moments are stored, as a format name (``"float32"``,
    ``"bfloat16"``, ``"float64"``, or blockwise-quantized ``"8bit"``, ``"4bit"``);
    complex params are stepped as their real views, so their key names real dtypes.
    """

    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    state: str = "float32"
    amsgrad: bool = False
    master: Master = Master.NONE
    stochastic_rounding: bool = False

    def __post_init__(self) -> None:
        if self.state not in STATE_BYTES:
            raise ValueError(f"unknown state format {self.state!r}; one of {sorted(STATE_BYTES)}")
        object.__setattr__(self, "master", Master(self.master))

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.param_dtype == torch.float64 else torch.float32

    @property
    def quant(self) -> int:
        """Bits per quantized moment (8 or 4), or 0 for moments stored as floats."""
        return QUANT_BITS.get(self.state, 0)

    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype the moments are stored in (uint8 codes for quantized ones)."""
        return torch.uint8 if self.quant else _DENSE_STATES[self.state]


@dataclass(frozen=True)
class Variant:
    """A kernel variant: the algorithm and what its launch shares."""

    algorithm: str  # "adam" (L2 weight decay), "adamw" (decoupled) or "adamax"
    key: BucketKey

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.algorithm == "adamax" and self.key.amsgrad:
            raise ValueError("AdaMax has no amsgrad variant")

    @property
    def adamax(self) -> bool:
        return self.algorithm == "adamax"

    @property
    def decoupled(self) -> bool:
        return self.algorithm == "adamw"

    def autotune_key(self) -> tuple:
        """What a tuned launch config depends on besides size (stable across releases:
        entries in users' autotune caches are found by it)."""
        k = self.key
        master = "remainder" if k.master == Master.REMAINDER else int(k.master)
        key = (
            "adamax" if self.adamax else "adam",
            f"decoupled={int(self.decoupled)}",
            f"amsgrad={int(k.amsgrad)}",
            f"master={master}",
            f"p={dtype_name(k.param_dtype)}",
            f"g={dtype_name(k.grad_dtype)}",
            f"s={k.state}",
        )
        return key + (("sr=1",) if k.stochastic_rounding else ())

    def traffic(self) -> tuple[tuple[str, float, float], ...]:
        """``(tensor, bytes read, bytes written)`` per element of one step.

        Without a master copy the step reads and writes the param; with an fp32 master it
        reads and writes the master and only writes the param; with a remainder it reads
        and writes the param and the remainder. The grad is read (a step GradScaler hands
        its scale also writes it back unscaled: + grad bytes, not counted here; the bench
        times no GradScaler step); each moment is read and written. Adam (L2 decay) and
        AdamW move the same bytes, and so does AdaMax (``exp_inf`` instead of
        ``exp_avg_sq``).
        """
        k = self.key
        p, g = k.param_dtype.itemsize, k.grad_dtype.itemsize
        items: list[tuple[str, float, float]] = []
        if k.master == Master.FP32:
            items += [("master", 4, 4), ("grad", g, 0), ("param", 0, p)]
        elif k.master == Master.REMAINDER:
            items += [("param", p, p), ("remainder", 2, 2), ("grad", g, 0)]
        else:
            items += [("param", p, p), ("grad", g, 0)]
        s = STATE_BYTES[k.state]
        items += [("exp_avg", s, s), ("exp_inf" if self.adamax else "exp_avg_sq", s, s)]
        if k.amsgrad:
            items.append(("max_exp_avg_sq", s, s))
        return tuple(items)

    def bytes_per_elem(self) -> float:
        """Bytes one step reads and writes per element: fp32 28; bf16 params + fp32
        state 22; + fp32 master 28; + remainder 26; bf16 state 14; AMSGrad + a moment."""
        return sum(r + w for _, r, w in self.traffic())

    def state_bytes_per_elem(self) -> float:
        """Bytes per element the optimizer keeps: moments and master copy."""
        k = self.key
        moments = 2 + k.amsgrad
        return moments * STATE_BYTES[k.state] + _MASTER_BYTES.get(k.master, 0)
