"""Host side of fused gradient clipping (``clip_grad_norm_`` and ``max_grad_norm=``).

A clip measures the norm of the grads the next step will read (the step cache launches
the norm kernels) and leaves the clip coefficient in a small device buffer owned by the
optimizer; the next step's prepare kernel multiplies every tensor's grad multiplier by
it. ``.grad`` is never written. Here: argument checks, that buffer and which grads its
coefficient belongs to, GradScaler's scale, and the process groups over which a sharded
(DTensor) norm is reduced.
"""
from __future__ import annotations

import math
import numbers
import operator
import weakref

import numpy as np
import torch
from torch import Tensor

from .kernels import layout
from .kernels.plan import upload

__all__ = ["ClipState", "check_max_norm", "grad_scaler_scale", "norm_order", "norm_reduction"]

_GRAD = operator.attrgetter("_grad")


def norm_order(norm_type) -> float:
    """torch's ``norm_type`` as a float, when the kernels compute that norm; else raise."""
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number or 'inf', got {norm_type!r}") from None
    if not (p == math.inf or (math.isfinite(p) and p > 0)):
        raise ValueError(
            f"tritonadam clips by norms of order p > 0 or inf, got norm_type={norm_type!r}; "
            "torch.nn.utils.clip_grad_norm_ computes the others (it clips .grad in place)"
        )
    return p


def check_max_norm(max_norm) -> float:
    """``max_norm`` as a float: a Python number >= 0 (inf: measure, never clip)."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"max_norm must be a Python number, got {type(max_norm).__name__}")
    value = float(max_norm)
    if not value >= 0.0:  # also refuses NaN
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    return value


def grad_scaler_scale(scaler, optimizer) -> Tensor | None:
    """The scale ``scaler`` multiplied ``optimizer``'s grads by, as a device tensor (no
    sync), or None when they are not scaled: scaler disabled, nothing scaled yet, or
    ``scaler.unscale_(optimizer)`` already divided them in place."""
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if not scaler.is_enabled():
        return None
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states.get(id(optimizer))
    if state is not None and state["stage"] is OptState.UNSCALED:
        return None
    return scaler._get_scale_async()  # GradScaler.get_scale() would sync


def norm_reduction(params: list[Tensor]):
    """(mesh, process groups) for the params' grads: the DTensor mesh the norm is
    returned on (None for plain tensors) and the groups of the mesh dims the grads are
    sharded over, whose partial sums (or maxima) are all-reduced, one dim after another.
    Replicated dims need nothing; plain tensors (single device, DDP) neither."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - builds without torch.distributed
        return None, []
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise NotImplementedError(
            "clip_grad_norm_: these params are FSDP1 (FullyShardedDataParallel) shards, plain "
            "tensors whose norm would be this rank's alone; use FSDP1's own "
            "model.clip_grad_norm_(max_norm)"
        )
    grads = [p.grad for p in params]
    kinds = {isinstance(g, DTensor) for g in grads}
    if kinds == {True, False}:
        raise NotImplementedError(
            "clip_grad_norm_: some grads are DTensors and some plain tensors, so the norm's "
            "reduction across ranks is ambiguous; use torch.nn.utils.clip_grad_norm_ here"
        )
    if kinds != {True}:
        return None, []
    layouts = set()
    for g in grads:
        if any(pl.is_partial() for pl in g.placements):
            raise NotImplementedError(
                "clip_grad_norm_: a grad has a Partial placement (not yet reduced); use "
                "torch.nn.utils.clip_grad_norm_ here"
            )
        layouts.add((g.device_mesh, tuple(i for i, pl in enumerate(g.placements) if pl.is_shard())))
    if len(layouts) != 1:
        raise NotImplementedError(
            "clip_grad_norm_: grads are sharded over different meshes or mesh dims (e.g. "
            "tensor parallelism next to FSDP); use torch.nn.utils.clip_grad_norm_ here"
        )
    (mesh, dims), = layouts
    return mesh, [mesh.get_group(d) for d in dims]


def replicated(norm: Tensor, mesh) -> Tensor:
    """The norm as torch's clip_grad_norm_ returns it for DTensor grads: a replicated
    DTensor on their mesh (``.full_tensor()`` and ``.item()`` work without communication)."""
    if mesh is None:
        return norm
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(norm, mesh, [Replicate()] * mesh.ndim, run_check=False)


class ClipState:
    """One optimizer's clip buffer on its device, and what its coefficient belongs to.

    A coefficient is *pending* from a clip until the next step consumes it. It belongs
    to the grads it measured: the same tensor objects. A clip or step that finds other
    grads (``zero_grad`` and a new backward) drops it, as torch's in-place clip would be
    lost with the grads it scaled. Identity is checked by ``id()`` (one C-level pass) and,
    since a freed grad's id can be reused, a weak reference to the first grad, which a
    new backward after ``zero_grad(set_to_none=True)`` always replaces.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffer = torch.zeros(layout.CLIP_COLUMNS.value, dtype=torch.float64, device=device)
        self._args: tuple | None = None
        self.pending = False
        self.scaled = False  # every pending clip folded in GradScaler's scale
        self._params: list[Tensor] = []
        self._grad_ids: list[int] = []
        self._first = None
        # The max_grad_norm path's output, one fixed tensor per norm dtype (graph-safe).
        self._auto_out: dict[torch.dtype, Tensor] = {}
        self.last_norm: Tensor | None = None
        self.mesh = None  # the DTensor mesh last_norm is returned on

    def set_args(self, max_norm: float, p: float) -> None:
        """max_norm and the norm's order in device memory, copied only on change."""
        args = (max_norm, p)
        if args != self._args:
            lo, hi = layout.CLIP_MAX_NORM.value, layout.CLIP_P.value + 1
            upload(self.buffer[lo:hi], np.array(args, dtype=np.float64))
            self._args = args

    def auto_out(self, dtype: torch.dtype) -> Tensor:
        out = self._auto_out.get(dtype)
        if out is None:
            out = self._auto_out[dtype] = torch.zeros((), dtype=dtype, device=self.device)
        return out

    def holds(self, params: list[Tensor]) -> bool:
        """Whether the pending coefficient belongs to these params' current grads."""
        if not self.pending or len(params) != len(self._params):
            return False
        grads = list(map(_GRAD, params))
        return (
            (params is self._params or all(map(operator.is_, params, self._params)))
            and list(map(id, grads)) == self._grad_ids
            and (not grads or self._first() is grads[0])
        )

    def set_pending(self, params: list[Tensor], scaled: bool) -> None:
        grads = list(map(_GRAD, params))
        self.pending = True
        self.scaled = scaled
        self._params = params
        self._grad_ids = list(map(id, grads))
        self._first = weakref.ref(grads[0]) if grads else None

    def clear(self) -> None:
        self.pending = False
        self._params = []
        self._grad_ids = []
        self._first = None
