"""What a launch relies on about a param and its grad, checked with errors that say what
to do. Used when a step's tensors are gathered and, for the rows the step cache cannot
check in one C-level pass, on every step."""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels.launch import interpreted
from .tensors import (
    addressable, is_dense, local_tensor, overlaps_itself, placed_unlike, same_layout, storage_problem,
)

__all__ = ["COMPLEX_DTYPES", "PARAM_DTYPES", "check_grad", "check_grad_dtype", "host_stepped"]

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Complex params are stepped as torch.optim does: elementwise on view_as_real(param).
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
# The grad dtypes each param dtype steps with (README "Supported dtypes"): the param's
# own, or fp32 grads for fp16/bf16 params (fp32 grad accumulation), or a low-precision
# grad for fp32 params (autocast-style); the kernel widens to the compute dtype.
_GRAD_DTYPES = {
    torch.float32: (torch.float32, torch.float16, torch.bfloat16),
    torch.bfloat16: (torch.bfloat16, torch.float32),
    torch.float16: (torch.float16, torch.float32),
    torch.float64: (torch.float64,),
    torch.complex64: (torch.complex64,),
    torch.complex128: (torch.complex128,),
}


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def sparse_grad_error(name: str) -> RuntimeError:
    """torch.optim's error for a sparse grad, in its words (AdamW's are Adam's: it is
    Adam's subclass)."""
    return RuntimeError("Adamax does not support sparse gradients" if "adamax" in name.lower() else
                        "Adam does not support sparse gradients, please consider SparseAdam instead")


def check_grad_dtype(name: str, p: Tensor, g: Tensor) -> None:
    """Raise unless ``g``'s dtype is one a ``p.dtype`` param steps with (README's table)."""
    if torch.is_complex(p) or torch.is_complex(g):
        if p.dtype not in COMPLEX_DTYPES or g.dtype != p.dtype:
            raise RuntimeError(
                f"tritonadam.{name} steps complex64 and complex128 params, each with a grad "
                f"of its own dtype, got param {p.dtype} with grad {g.dtype}"
            )
    elif p.dtype not in PARAM_DTYPES or g.dtype not in PARAM_DTYPES:
        raise RuntimeError(
            f"tritonadam.{name} steps float32, float16, bfloat16 and float64 params and "
            f"grads, got param {p.dtype} with grad {g.dtype}"
        )
    elif g.dtype not in _GRAD_DTYPES[p.dtype]:
        allowed = ", ".join(map(_short, _GRAD_DTYPES[p.dtype]))
        raise RuntimeError(
            f"tritonadam.{name}: a {_short(p.dtype)} param steps with {allowed} grads, got "
            f"{_short(g.dtype)}; cast the grad (or the param) so the pair is one of README's "
            "supported dtypes"
        )


def check_grad(name: str, p: Tensor, g: Tensor, fused: bool | None = None) -> Tensor:
    """The grad to step ``p`` with, in the param's layout (a dense copy if needed), or
    raise. Nothing is written: ``.grad`` is never modified."""
    if g.is_sparse or g.layout != torch.strided:
        raise sparse_grad_error(name)
    check_grad_dtype(name, p, g)
    lp, lg = local_tensor(p), local_tensor(g)
    if lg.device != lp.device:
        raise RuntimeError(
            f"tritonadam.{name}: grad on {lg.device} but param on {lp.device}: "
            "params and their grads must be on the same device"
        )
    if lg is not g and lp is not p and placed_unlike(g, p):
        # A Partial grad's shards are addends of the grad, not the grad (tensor parallelism's
        # replicated params); torch's DTensor ops redistribute inside torch.optim's step.
        raise RuntimeError(
            f"tritonadam.{name}: a DTensor grad placed {tuple(g.placements)} for a param placed "
            f"{tuple(p.placements)}: each rank would step with its own local piece. Redistribute "
            "the grad as its param before the step: "
            "`p.grad = p.grad.redistribute(p.device_mesh, p.placements)`"
        )
    if lg.shape != lp.shape or g.shape != p.shape:
        raise RuntimeError(
            f"tritonadam.{name}: grad of shape {tuple(g.shape)} for param of shape "
            f"{tuple(p.shape)}"
        )
    check_device(name, p, fused)
    for what, t in (("param", lp), ("grad", lg)):
        if not addressable(t):
            raise RuntimeError(
                f"tritonadam.{name}: a {what} ({type(t).__name__}) has no memory of its own: a "
                "tensor subclass that holds its data in other tensors (as torchao's float8 and NF4 "
                "weights do), which the kernels cannot step. Step these params with torch.optim, "
                "or make them plain tensors"
            )
        problem = storage_problem(t)
        if problem:
            raise RuntimeError(
                f"tritonadam.{name}: a {what} has {problem}; step only tensors whose "
                "storage spans their elements"
            )
    # The kernels write each element once through its address: a param whose elements
    # share memory (``x.expand(...)``) would fail only in the copy back, after every other
    # param and all state had been stepped. torch's words, before anything is written.
    if overlaps_itself(lp):
        raise RuntimeError(
            f"tritonadam.{name}: unsupported operation: more than one element of the written-to "
            "tensor refers to a single memory location. Please clone() the tensor before "
            "performing the operation."
        )
    # A lazily negated or conjugated view (``x.conj().imag``, autograd's conj grads) holds
    # the values before negation: the kernels read and write raw memory.
    if lp.is_neg() or lp.is_conj():
        raise RuntimeError(
            f"tritonadam.{name}: a param is a lazily {'conjugated' if lp.is_conj() else 'negated'} "
            "view, which the kernels cannot write; make it a plain tensor: "
            "`p.data = p.data.resolve_conj().resolve_neg()`"
        )
    if lg.is_neg() or lg.is_conj():
        lg = lg.resolve_conj().resolve_neg()
    if not is_dense(lp):
        # Stepped through a contiguous staging copy; its state is contiguous too.
        return lg if lg.is_contiguous() else lg.contiguous()
    if not same_layout(lg, lp):
        return torch.empty_like(lp, dtype=lg.dtype).copy_(lg)
    return lg


def host_stepped(p: Tensor) -> bool:
    """Whether ``p`` is stepped by torch.optim's CPU implementation (``tritonadam.host``):
    a CPU param where the kernels run on a GPU. Under the interpreter the kernels step
    CPU params."""
    return local_tensor(p).device.type == "cpu" and not interpreted()


def check_device(name: str, p: Tensor, fused: bool | None = None) -> None:
    """Raise unless the kernels, or torch's CPU implementation for a CPU param, can step
    ``p`` where it lives (meta params are stepped shape-only, as torch.optim does, and
    never reach a launch)."""
    device = local_tensor(p).device
    supported = "cpu" if interpreted() else "cuda"  # torch calls ROCm devices cuda too
    if device.type == supported or host_stepped(p):
        return
    if interpreted():
        msg = (f"tritonadam.{name}: kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 "
               f"was set when tritonadam was imported), so params must be on the CPU, got one "
               f"on {device}")
    else:
        msg = (f"tritonadam.{name} runs Triton kernels, which need a CUDA or ROCm device (got "
               f"a param on {device}): move the model to the GPU, or for a slow CPU check set "
               "TRITON_INTERPRET=1 before importing tritonadam")
    if fused:
        # torch.optim's wording for fused=True, which its test-suite matches
        msg = ("`fused=True` requires all the params to be floating point Tensors of "
               f"supported devices: ['{supported}'] but {p.dtype} and {device.type}. " + msg)
    raise RuntimeError(msg)
