"""The optimizers compared, by name, and how each is built.

Every entry gets the same hyper-parameters (lr, betas, eps, decoupled weight decay) and
steps the same model. Building one can fail for reasons that are not bugs here: a
library that is not installed, an option an installed version lacks, a library that
needs a GPU (flashoptim's quantization). Those runs are recorded as ``unavailable`` with
the exception's message and the sweep goes on.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.optim import Optimizer

FP32, BF16 = torch.float32, torch.bfloat16


@dataclass(frozen=True)
class HyperParams:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


@dataclass(frozen=True)
class Spec:
    name: str
    label: str  # what the table and the plot call it
    library: str  # torch, tritonadam, bitsandbytes, torchao, flashoptim
    param_dtype: torch.dtype
    state: str  # "fp32", "bf16", "8-bit", "4-bit" (the moments' storage)
    build: Callable[[Sequence[Tensor], HyperParams, int], Optimizer] = field(repr=False)
    note: str = ""

    @property
    def target(self) -> float | None:
        """The held-out loss gap to fp32 AdamW aimed at: 0.5% for 8-bit state, 2% for 4-bit."""
        return {"8-bit": 0.005, "4-bit": 0.02}.get(self.state)


def interpreter_launch(params: Sequence[Tensor]) -> dict:
    """tritonadam's launch config in Triton's interpreter (one block as large as the
    largest tensor, no autotuning: ``examples/paper``'s choice); on a GPU its defaults."""
    from tritonadam import _env

    if not _env.interpret():
        return {}
    from adampaper.optimizers import interpreter_launch as launch

    return launch(params)


def torch_adamw(params, hp: HyperParams, seed: int) -> Optimizer:
    return torch.optim.AdamW(params, lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay,
                             foreach=False)


def tritonadam_adamw(**options) -> Callable:
    def build(params, hp: HyperParams, seed: int) -> Optimizer:
        import tritonadam

        params = list(params)
        extra = {"seed": seed} if options.get("stochastic_rounding") else {}
        return tritonadam.AdamW(params, lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay,
                                **options, **extra, **interpreter_launch(params))
    return build


def bnb_adamw8bit(params, hp: HyperParams, seed: int) -> Optimizer:
    import bitsandbytes as bnb

    # min_8bit_size=0: every tensor 8-bit (its default keeps tensors under 4,096 elements fp32).
    return bnb.optim.AdamW8bit(params, lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay,
                               min_8bit_size=0)


def torchao_adamw(bits: int, **options) -> Callable:
    def build(params, hp: HyperParams, seed: int) -> Optimizer:
        from torchao import optim

        cls = optim.AdamW8bit if bits == 8 else optim.AdamW4bit
        return cls(params, lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay, **options)
    return build


def flashoptim_adamw(**options) -> Callable:
    def build(params, hp: HyperParams, seed: int) -> Optimizer:
        import flashoptim

        return flashoptim.FlashAdamW(params, lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay,
                                     **options)
    return build


TA = "tritonadam.AdamW"
REGISTRY: dict[str, Spec] = {s.name: s for s in [
    # fp32 params
    Spec("torch", "torch.optim.AdamW (reference)", "torch", FP32, "fp32", torch_adamw),
    Spec("ta-fp32", TA, "tritonadam", FP32, "fp32", tritonadam_adamw()),
    Spec("ta-bf16state", f"{TA} state_dtype=bf16", "tritonadam", FP32, "bf16",
         tritonadam_adamw(state_dtype=BF16)),
    Spec("ta-8bit", f'{TA} state_dtype="8bit"', "tritonadam", FP32, "8-bit", tritonadam_adamw(state_dtype="8bit")),
    Spec("ta-4bit", f'{TA} state_dtype="4bit"', "tritonadam", FP32, "4-bit", tritonadam_adamw(state_dtype="4bit")),
    Spec("bnb-8bit", "bitsandbytes AdamW8bit", "bitsandbytes", FP32, "8-bit", bnb_adamw8bit,
         note="min_8bit_size=0"),
    Spec("ao-8bit", "torchao AdamW8bit", "torchao", FP32, "8-bit", torchao_adamw(8)),
    Spec("ao-4bit", "torchao AdamW4bit", "torchao", FP32, "4-bit", torchao_adamw(4)),
    Spec("flash-8bit", "flashoptim FlashAdamW", "flashoptim", FP32, "8-bit",
         flashoptim_adamw(quantize=True, master_weight_bits=None)),
    # bf16 params
    Spec("ta-bf16-remainder", f'{TA} bf16 master_weights="remainder"', "tritonadam", BF16, "fp32",
         tritonadam_adamw(master_weights="remainder")),
    Spec("ta-bf16-remainder-8bit", f'{TA} bf16 "remainder" + "8bit"', "tritonadam", BF16, "8-bit",
         tritonadam_adamw(master_weights="remainder", state_dtype="8bit")),
    Spec("ta-bf16-remainder-4bit", f'{TA} bf16 "remainder" + "4bit"', "tritonadam", BF16, "4-bit",
         tritonadam_adamw(master_weights="remainder", state_dtype="4bit")),
    Spec("ao-8bit-bf16-sr", "torchao AdamW8bit bf16, stochastic rounding", "torchao", BF16, "8-bit",
         torchao_adamw(8, bf16_stochastic_round=True)),
    Spec("flash-bf16-8bit", "flashoptim FlashAdamW bf16, 24-bit master", "flashoptim", BF16, "8-bit",
         flashoptim_adamw(quantize=True, master_weight_bits=24)),
    # not in the default sweep
    Spec("ta-bf16-master", f"{TA} bf16 master_weights=True", "tritonadam", BF16, "fp32",
         tritonadam_adamw(master_weights=True)),
    Spec("ta-bf16-sr-bf16state", f"{TA} bf16 stochastic rounding + bf16 state", "tritonadam", BF16, "bf16",
         tritonadam_adamw(stochastic_rounding=True, state_dtype=BF16)),
    Spec("ao-4bit-bf16-sr", "torchao AdamW4bit bf16, stochastic rounding", "torchao", BF16, "4-bit",
         torchao_adamw(4, bf16_stochastic_round=True)),
    Spec("bnb-8bit-bf16", "bitsandbytes AdamW8bit bf16 (no master)", "bitsandbytes", BF16, "8-bit", bnb_adamw8bit,
         note="min_8bit_size=0"),
]}
DEFAULT = ["torch", "ta-fp32", "ta-bf16state", "ta-8bit", "ta-4bit", "bnb-8bit", "ao-8bit", "ao-4bit", "flash-8bit",
           "ta-bf16-remainder", "ta-bf16-remainder-8bit", "ta-bf16-remainder-4bit", "ao-8bit-bf16-sr",
           "flash-bf16-8bit"]
REFERENCE = "torch"
BF16_BASELINE = "ta-bf16-remainder"  # bf16 params, fp32 state, exact fp32 master: what bf16 rows lose to state
INSTALL = {"bitsandbytes": "pip install bitsandbytes==0.50.2", "torchao": "pip install torchao==0.18.0",
           "flashoptim": "pip install flashoptim==0.1.4"}


def set_lr(opt: Optimizer, lr: float) -> None:
    """Writes ``lr`` into every group; in place where the group holds a tensor (torchao
    keeps lr as a tensor and refuses a float written over it)."""
    for group in opt.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def build(spec: Spec, params: Sequence[Tensor], hp: HyperParams, seed: int) -> Optimizer:
    """The optimizer, or ``Unavailable`` saying why it cannot be built here."""
    try:
        return spec.build(list(params), hp, seed)
    except ModuleNotFoundError as e:
        hint = INSTALL.get(spec.library, "")
        raise Unavailable(f"{e.name} is not installed" + (f" ({hint}, or pip install -e '.[lowbit]')" if hint else ""))
    except Exception as e:  # an option this version does not have, a library that needs a GPU, ...
        raise Unavailable(f"{type(e).__name__}: {e}") from e


class Unavailable(RuntimeError):
    """An optimizer that cannot be built here (the message says why)."""
