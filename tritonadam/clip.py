"""Fused gradient clipping (``clip_grad_norm_`` and ``max_grad_norm=``).

A clip measures the norm of the grads the next step will read, over the step cache's
device tables (one norm launch per grad dtype and one reduction launch; for sharded
DTensor grads, one reduction of this rank's partials, the all-reduce across ranks, then
the final one), and leaves the clip coefficient in a small
device buffer owned by the optimizer; the next step's prepare kernel multiplies every
tensor's grad multiplier by it. The clip never writes ``.grad``. CPU params that torch's
implementation steps (``tritonadam.host``) are measured with torch's norms and the
coefficient left in a CPU buffer, which that step applies. Everything about clipping
lives here: argument checks, that buffer and which grads its coefficient belongs to,
GradScaler's scale, the norm launches and the reduction across ranks.
"""
from __future__ import annotations

import math
import numbers
import operator
import weakref

import numpy as np
import torch
from torch import Tensor

from . import host
from .kernels import device_guard, layout
from .kernels.launch import launch_norm, launch_norm_reduce, norm_kind
from .kernels.plan import upload
from .step_cache import StepCache
from .state import LOW_PRECISION
from .tensors import GRAD, is_fsdp1_shard, local_tensor, on_device, split_dim
from .warn import warn

__all__ = ["Clipper", "check_max_norm", "fsdp1_clip_error", "grad_scaler_scale", "norm_order", "norm_reduction",
           "replicated"]

_VERSION = operator.attrgetter("_version")


def _versions(grads: list[Tensor], plain: bool) -> list[int] | None:
    """The grads' version counters; a DTensor's local shard's, which FSDP2 accumulates into
    directly. ``plain``: every grad a plain tensor (one C-level pass). None where one has
    none (an inference-mode tensor): in-place changes to those go unseen."""
    try:
        if plain:
            return list(map(_VERSION, grads))
        return list(map(_VERSION, map(local_tensor, grads)))
    except RuntimeError:
        return None


def _addresses(grads: list[Tensor], plain: bool) -> list[int]:
    """The grads' data pointers (a DTensor's local shard's): ``g.data = x`` keeps the grad
    object and its version counter, and changes only these."""
    return list(map(Tensor.data_ptr, grads if plain else map(local_tensor, grads)))


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
    """``max_norm`` as a float: a real number >= 0 (inf: measure, never clip), a Python
    number or a one-element real tensor as torch's ``clip_grad_norm_`` takes (its value
    read here, once: a GPU tensor's read waits for the GPU)."""
    if isinstance(max_norm, Tensor) and max_norm.numel() == 1 and not (
            max_norm.is_complex() or max_norm.dtype == torch.bool):
        if max_norm.is_cuda and torch.cuda.is_current_stream_capturing():
            raise TypeError("max_norm as a tensor is read on the host, which a CUDA graph capture "
                            "cannot wait for: pass it as a Python number")
        max_norm = max_norm.item()
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"max_norm must be a real number or a one-element real tensor, got "
                        f"{type(max_norm).__name__}")
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


def fsdp1_clip_error(how: str) -> NotImplementedError:
    """FSDP1's shards are plain tensors, each rank's slice of flattened params: a fused
    clip would measure this rank's slice alone."""
    todo = ("drop max_grad_norm= and call FSDP1's own model.clip_grad_norm_(max_norm) before "
            "step()" if how == "max_grad_norm" else "use FSDP1's own model.clip_grad_norm_(max_norm)")
    return NotImplementedError(
        f"{how}: these params are FSDP1 (FullyShardedDataParallel) shards, plain tensors whose "
        f"norm would be this rank's alone; {todo}")


def norm_reduction(params: list[Tensor]):
    """(mesh, layouts, classes) for the params' grads: the DTensor mesh the norm is
    returned on (None for plain tensors); per layout class (grads sharded over the same
    mesh dims, in a fixed order), the process groups of those dims, whose partial sums (or
    maxima) are all-reduced one dim after another; and each param's class, or None when
    there is at most one class. Replicated dims need nothing: tensor parallelism's
    replicated grads (a class of their own) are counted once, as torch counts them.
    Plain tensors (single device, DDP) need no reduction; beside DTensor grads (params
    FSDP2 leaves out: ``ignored_params``, modules not sharded) they are replicated ones,
    counted once too, where torch's clip refuses the mix."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - builds without torch.distributed
        return None, [], None
    if any(map(is_fsdp1_shard, params)):
        raise fsdp1_clip_error("clip_grad_norm_")
    grads = [p.grad for p in params]
    if not any(isinstance(g, DTensor) for g in grads):
        return None, [], None
    meshes, dims = set(), []
    for g in grads:
        if not isinstance(g, DTensor):
            dims.append(())
            continue
        if any(pl.is_partial() for pl in g.placements):
            raise NotImplementedError(
                "clip_grad_norm_: a grad has a Partial placement (not yet reduced); use "
                "torch.nn.utils.clip_grad_norm_ here"
            )
        meshes.add(g.device_mesh)
        dims.append(tuple(i for i, pl in enumerate(g.placements) if split_dim(pl) is not None))
    if len(meshes) != 1:
        raise NotImplementedError(
            "clip_grad_norm_: grads live on different device meshes, whose norms cannot be "
            "reduced together (torch.nn.utils.clip_grad_norm_ refuses them too); build the "
            "model's fully_shard/replicate calls on one DeviceMesh (mesh=...)"
        )
    mesh, = meshes
    order = sorted(set(dims))  # the same on every rank: placements are global
    layouts = [[mesh.get_group(d) for d in layout] for layout in order]
    if len(order) == 1:
        return mesh, layouts, None
    index = {layout: k for k, layout in enumerate(order)}
    return mesh, layouts, np.fromiter((index[d] for d in dims), dtype=np.int64, count=len(dims))


def replicated(norm: Tensor, mesh) -> Tensor:
    """The norm as torch's clip_grad_norm_ returns it for DTensor grads: a replicated
    DTensor on their mesh (``.full_tensor()`` and ``.item()`` work without communication)."""
    if mesh is None:
        return norm
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(norm, mesh, [Replicate()] * mesh.ndim, run_check=False)


class Clipper:
    """One optimizer's fused clipping: its clip buffer and what the coefficient in it
    belongs to.

    A coefficient is *pending* from a clip until the next step consumes it. It belongs
    to the grads it measured: the same tensor objects, held (as the step cache holds
    them from its check to its launch) until the step, ``zero_grad`` or a clip that finds
    other grads lets them go. A clip or step that finds other grads (``zero_grad`` and a
    new backward) drops it, as torch's in-place clip would be lost with the grads it
    scaled.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.device: torch.device | None = None
        self.buffer: Tensor | None = None
        self._args: tuple | None = None
        self.pending = False
        self.scaled = False  # every pending clip folded in GradScaler's scale
        self._params: list[Tensor] = []
        self._grads: list[Tensor] = []
        self._versions: list[int] | None = []  # the grads' version counters when measured
        self._addresses: list[int] = []  # and their data pointers
        self._plain = True  # every grad measured a plain tensor (no DTensor)
        # The max_grad_norm path's output, one fixed tensor per norm dtype (graph-safe).
        self._auto_out: dict[torch.dtype, Tensor] = {}
        self.last_norm: Tensor | None = None
        self.mesh = None  # the DTensor mesh last_norm is returned on
        # (a weak reference to the cache, its (mesh, process groups)): a strong one kept the
        # last clip's cache, and through it every param and state tensor it pointed at,
        # alive after the optimizer had dropped it (a load_state_dict, params removed)
        self._reduction: tuple | None = None

    # ---- checks -------------------------------------------------------------------

    def check_supported(self, torch_groups: list[dict], p: float, *, complex_grads: bool) -> None:
        """Refuse what the fused clip does not cover (``torch_groups``: the groups torch.optim's
        implementation steps, differentiable=True ones)."""
        if any(q.grad is not None for g in torch_groups for q in g["params"]):
            raise NotImplementedError(
                f"tritonadam.{self.name}: fused clipping does not cover differentiable=True "
                "groups (torch.optim steps them); use torch.nn.utils.clip_grad_norm_"
            )
        if p != 2.0 and complex_grads:
            raise ValueError(
                f"tritonadam.{self.name}: complex grads are clipped by their 2-norm only (got "
                f"norm_type={p}); use torch.nn.utils.clip_grad_norm_"
            )

    def check_torch_stepped(self, params: list[Tensor]) -> None:
        """Refuse a step where torch.optim's implementation would read grads the pending
        coefficient belongs to (a group switched to differentiable=True after the clip):
        it steps them as they are, unclipped, where torch's in-place clip left them clipped."""
        if not (self.pending and params):
            return
        at = {id(p): i for i, p in enumerate(self._params)}
        where = [i for i in map(at.get, map(id, params)) if i is not None]
        where = [i for i in where if GRAD(self._params[i]) is self._grads[i]]
        if where and self._unchanged_in_place(where=where):  # else the step drops it anyway
            raise NotImplementedError(
                f"tritonadam.{self.name}: clip_grad_norm_ measured grads of params that "
                "differentiable=True now steps (torch.optim's implementation, which the fused "
                "clip does not cover); switch the group before clipping and use "
                "torch.nn.utils.clip_grad_norm_, or call opt.zero_grad() to drop the clip"
            )

    def before_step(self, cache: StepCache, grad_scale, *, holds: bool | None = None) -> None:
        """Drop a pending coefficient whose grads are gone; refuse one of scaled grads.
        ``holds``: whether it belongs to the current grads, if the caller knows."""
        if not self.pending:
            return
        params = _measured(cache)[0]
        if holds is None:
            holds = self.holds(params)
        else:  # still_taken compared the kernels' grads' addresses with the ones measured
            holds = holds and self._unchanged_in_place(addresses=_host_only(cache))
        if not holds:
            self._drop_stale(params)
            return
        if grad_scale is not None and not self.scaled:
            if not self.holds(params):  # the fast path's addresses: replaced empty grads
                self._drop_stale(params)
                return
            raise RuntimeError(
                f"tritonadam.{self.name}: clip_grad_norm_ measured grads that GradScaler still "
                "scales (this step got its scale), so it clipped by the norm of scaled grads. "
                "Call scaler.unscale_(opt) before clip_grad_norm_, pass clip_grad_norm_(..., "
                "scaler=scaler), or construct the optimizer with max_grad_norm=... and let "
                "step() clip"
            )

    # ---- measuring ----------------------------------------------------------------

    def clip(self, cache: StepCache, max_norm: float, p: float, *, grad_scale, check_finite: bool,
             auto: bool) -> Tensor:
        """Measure the norm of the grads ``cache`` took and leave the coefficient; returns
        the norm's local tensor (``auto``: the fixed one of the max_grad_norm path, which
        the very step that called it consumes)."""
        if grad_scale is not None and not (grad_scale.numel() == 1 and grad_scale.is_floating_point()):
            raise ValueError("the GradScaler scale must be a 1-element floating point tensor")
        device = self._norm_device(cache)
        if self.device != device:
            self.device, self._args, self._auto_out = device, None, {}
            self.buffer = torch.zeros(layout.CLIP_COLUMNS.value, dtype=torch.float64, device=device)
        params, taken = _measured(cache)
        compound = self.holds(params)
        if self.pending and not compound:
            # Grads changed only in place (zeroed and accumulated again after a skipped
            # step) are new values to measure: nothing left clipped to warn about.
            self._drop_stale(params, quiet=self._where(params) is not None, at_clip=True)
        dtype = self._norm_dtype(cache)
        out = self._auto(dtype) if auto else torch.empty((), dtype=dtype, device=device)
        mesh = self._mesh_and_layouts(cache)[0]
        self._set_args(max_norm, p)
        measure = self._measure_host if cache.host else self._measure
        measure(cache, device, out, p, grad_scale=grad_scale, compound=compound, check_finite=check_finite)
        if check_finite and not torch.isfinite(out).item():
            raise RuntimeError(
                f"The total norm of order {p} for gradients from `parameters` is non-finite, so "
                "it cannot be clipped. To disable this error and scale the gradients by the "
                "non-finite norm anyway, set `error_if_nonfinite=False`"
            )
        if auto:
            self.pending = True  # this very step consumes it: no need to remember the grads
        else:
            self._set_pending(params, taken, scaled=grad_scale is not None and (not compound or self.scaled),
                              addresses=None if _host_only(cache) else cache.taken_addresses())
        self.last_norm, self.mesh = out, mesh
        return out

    def _measure(self, cache: StepCache, device, out: Tensor, p: float, *, grad_scale, compound,
                 check_finite) -> None:
        """The norm into ``out`` and the coefficient into the buffer (whose max_norm and
        order are set). For DTensor grads sharded over a mesh, the reduction is split
        around an all-reduce of this rank's partial total (every rank must call this,
        empty shards included, as for any collective)."""
        dev = cache.devices[device]
        _, layouts, classes = self._mesh_and_layouts(cache)
        plan = dev.norm_plan(classes)
        kind = norm_kind(p)
        flags = dict(norm=kind, compound=compound, check_finite=check_finite, fusion=cache.fusion)
        with device_guard(device):
            cache.upload_grads()
            launch_norm(dev.tables, plan, self.buffer, norm=kind, grad_scale=on_device(device, grad_scale),
                        fusion=cache.fusion)
            if not any(layouts):
                launch_norm_reduce(plan, self.buffer, out, reduce=True, finalize=True, **flags)
                return
            import torch.distributed as dist

            op = dist.ReduceOp.MAX if p == math.inf else dist.ReduceOp.SUM
            if len(layouts) == 1:
                launch_norm_reduce(plan, self.buffer, None, norm=kind, reduce=True, finalize=False,
                                   fusion=cache.fusion)
                for group in layouts[0]:
                    dist.all_reduce(plan.total, op=op, group=group)
            else:
                # One total per layout class, all-reduced over its own sharded dims, then
                # combined in class order (the same on every rank).
                for span, groups in zip(plan.spans, layouts):
                    launch_norm_reduce(span, self.buffer, None, norm=kind, reduce=True,
                                       finalize=False, fusion=cache.fusion)
                    for group in groups:
                        dist.all_reduce(span.total, op=op, group=group)
                combine = torch.amax if p == math.inf else torch.sum
                combine(plan.totals, dim=0, keepdim=True, out=plan.total)
            launch_norm_reduce(plan, self.buffer, out, reduce=False, finalize=True, **flags)

    def _measure_host(self, cache: StepCache, device, out: Tensor, p: float, *, grad_scale, compound,
                      check_finite) -> None:
        """``_measure`` for the CPU grads that torch's implementation steps, in torch's
        ops: each grad's norm, then theirs, as torch.nn.utils.clip_grad_norm_ takes them.
        Each norm of a DTensor shard (FSDP2's CPU offload) is reduced across the ranks of
        its sharded mesh dims first, as torch reduces a partial norm (p-th powers summed,
        or maxima): all of one layout class in one all-reduce per dim. Then the
        reduction kernel's finalization."""
        _, layouts, classes = self._mesh_and_layouts(cache)
        dtype = out.dtype
        # As the norm kernel: each grad unscaled first, as GradScaler.unscale_ does.
        inv_scale = None if grad_scale is None else (1.0 / grad_scale.detach().to("cpu", torch.float64)).float()

        def unscaled(g: Tensor) -> Tensor:
            if inv_scale is None:
                return g
            return (g.float() if g.dtype in LOW_PRECISION else g) * inv_scale.to(torch.float64 if g.dtype ==
                                                                                 torch.float64 else torch.float32)

        # The grads as the user holds them (rows may hold copies in the param's layout,
        # whose sums run in another order); fp16/bf16 ones summed in fp32.
        norms = torch.stack([
            torch.linalg.vector_norm(unscaled(g), p, dtype=dtype if g.dtype in LOW_PRECISION else None).to(dtype)
            if g.numel() else torch.zeros((), dtype=dtype, device="cpu") for g in map(local_tensor, cache.host_taken)])
        if any(layouts):
            import torch.distributed as dist

            inf = p == math.inf
            powered = norms if inf or p == 1.0 else norms ** p
            for k, groups in enumerate(layouts):
                members = None if classes is None else torch.from_numpy(np.flatnonzero(classes == k))
                part = powered if members is None else powered[members]
                for group in groups:
                    dist.all_reduce(part, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
                if members is not None:
                    powered[members] = part
            norms = powered if inf or p == 1.0 else powered ** (1.0 / p)
        root = torch.linalg.vector_norm(norms, p)
        norm = root.to(dtype)
        coef = self.buffer[layout.CLIP_COEF.value] if compound else torch.ones((), dtype=torch.float64, device="cpu")
        if compound:
            norm = norm * coef.to(dtype)
        clip = torch.clamp(self._args[0] / (norm + 1e-6), max=1.0)  # torch's formula and op order
        out.copy_(norm)
        if not check_finite or torch.isfinite(norm).item():
            self.buffer[layout.CLIP_COEF.value] = coef * clip.double()

    def _norm_device(self, cache: StepCache) -> torch.device:
        if cache.host:
            if cache.params:  # grads on the CPU (stepped by torch) and on a device
                raise RuntimeError(host.mixed_clip_error(self.name))
            return torch.device("cpu")
        if len(cache.devices) != 1:
            raise NotImplementedError(
                f"clip_grad_norm_ over params on several devices ({', '.join(map(str, cache.devices))}) "
                "is not supported; use torch.nn.utils.clip_grad_norm_, or one optimizer per device"
            )
        return next(iter(cache.devices))

    @staticmethod
    def _norm_dtype(cache: StepCache) -> torch.dtype:
        """fp32, or fp64 if any grad is fp64: what torch's total norm promotes to, except
        that fp16/bf16 grads get an fp32 norm here (torch returns theirs in fp16/bf16)."""
        wide = any(b.key.grad_dtype == torch.float64 for dev in cache.devices.values() for b in dev.buckets)
        wide |= any(g.dtype in (torch.float64, torch.complex128) for g in cache.host_taken)
        return torch.float64 if wide else torch.float32

    def _mesh_and_layouts(self, cache: StepCache):
        if self._reduction is None or self._reduction[0]() is not cache:
            self._reduction = (weakref.ref(cache), norm_reduction(_measured(cache)[0]))
        return self._reduction[1]

    def mesh_of(self, cache: StepCache):
        """The DTensor mesh ``cache``'s grads live on, or None for plain tensors."""
        return self._mesh_and_layouts(cache)[0]

    def _set_args(self, max_norm: float, p: float) -> None:
        """max_norm and the norm's order in device memory, copied only on change."""
        args = (max_norm, p)
        if args != self._args:
            lo, hi = layout.CLIP_MAX_NORM.value, layout.CLIP_P.value + 1
            upload(self.buffer[lo:hi], np.array(args, dtype=np.float64))
            self._args = args

    def _auto(self, dtype: torch.dtype) -> Tensor:
        out = self._auto_out.get(dtype)
        if out is None:
            out = self._auto_out[dtype] = torch.zeros((), dtype=dtype, device=self.device)
        return out

    # ---- the pending coefficient ---------------------------------------------------

    def holds(self, params: list[Tensor]) -> bool:
        """Whether the pending coefficient belongs to these params' current grads: the same
        tensors, unchanged in place since (``zero_()``, ``model.zero_grad(set_to_none=False)``
        and a backward accumulating into them bump their version counters). The params may
        have been regrouped, reordered, dropped from the optimizer or left without a grad
        since (torch's in-place clip left each grad clipped wherever its param went); a
        param it did not measure has grads the coefficient does not belong to."""
        where = self._where(params)
        return where is not None and self._unchanged_in_place(where=where)

    def _where(self, params: list[Tensor]) -> list[int] | range | None:
        """For each of ``params``, the index of the grad the pending coefficient measured
        for it, where each still holds that grad object; else None (also for no params:
        a coefficient for none of the grads a step reads is not theirs)."""
        if not self.pending or not params:
            return None
        if self._same_params(params):
            where, grads = range(len(params)), self._grads
        else:
            at = {id(p): i for i, p in enumerate(self._params)}
            where = [at.get(id(p)) for p in params]
            if None in where:
                return None
            grads = [self._grads[i] for i in where]
        return where if all(map(operator.is_, map(GRAD, params), grads)) else None

    def _same_params(self, params: list[Tensor]) -> bool:
        """Whether ``params`` are the ones the pending coefficient measured, in order."""
        return len(params) == len(self._params) and (
            params is self._params or all(map(operator.is_, params, self._params)))

    def _unchanged_in_place(self, addresses: bool = True, where: list[int] | range | None = None) -> bool:
        """Whether the measured grads (those at ``where``, the ones a step reads; all by
        default) kept their memory and values."""
        grads, before = self._grads, (self._addresses, self._versions)
        if where is not None and len(where) != len(grads):
            grads = [grads[i] for i in where]
            before = tuple(None if b is None else [b[i] for i in where] for b in before)
        if addresses and _addresses(grads, self._plain) != before[0]:
            return False
        return before[1] is None or _versions(grads, self._plain) == before[1]

    def _set_pending(self, params: list[Tensor], grads: list[Tensor], scaled: bool,
                     addresses: list[int] | None = None) -> None:
        """``grads``: the params' grads, as the check before this clip took them;
        ``addresses``: theirs (local shards'), where that check read them already."""
        self.pending = True
        self.scaled = scaled
        self._params = params
        self._grads = grads
        self._plain = set(map(type, grads)) <= {Tensor}
        self._versions = _versions(grads, self._plain)
        self._addresses = _addresses(grads, self._plain) if addresses is None else addresses

    def copied(self, memo: dict) -> Clipper | None:
        """This clipper's pending coefficient for the copies of its params and grads in a
        deepcopy (``memo``), or None where nothing is pending, nothing it measured was
        copied with its grad, or a grad a step would read was replaced or changed in
        place since (as the original's step would drop it). A param left without a grad,
        or not copied, or copied without its grad (an nn.Parameter) is one the copy's
        step does not read."""
        if not self.pending:
            return None
        where, params, grads = [], [], []
        for i, (p, g) in enumerate(zip(self._params, self._grads)):
            grad = GRAD(p)
            if grad is None:
                continue
            if grad is not g:
                return None
            where.append(i)
            p_copy, g_copy = memo.get(id(p)), memo.get(id(g))
            if p_copy is not None and g_copy is not None:
                params.append(p_copy)
                grads.append(g_copy)
        if not params or not self._unchanged_in_place(where=where):
            return None
        new = Clipper(self.name)
        new.device, new.buffer, new._args = self.device, self.buffer.clone(), self._args
        new._set_pending(params, grads, self.scaled)
        return new

    def take(self) -> Tensor | None:
        """The buffer whose coefficient this step applies, or None; consumed either way."""
        if not self.pending:
            return None
        self.clear()
        return self.buffer

    def _drop_stale(self, params: list[Tensor], quiet: bool = False, at_clip: bool = False) -> None:
        """Drop a pending coefficient that no longer belongs to ``params``' grads, with a
        warning when some of the grads it measured are still there: torch's in-place clip
        would have left those clipped, and this step (or clip, ``at_clip``) reads them
        unclipped."""
        held = [i for i, (p, g) in enumerate(zip(self._params, self._grads)) if GRAD(p) is g]
        replaced = sum(1 for p in self._params if GRAD(p) is not None) - len(held)
        in_place = not self._unchanged_in_place(where=held)
        measured = {id(p) for p in self._params}
        gained = sum(1 for p in params if id(p) not in measured)
        total = len(self._params)
        nonempty = 0 if held else sum(1 for p in self._params if GRAD(p) is not None and GRAD(p).numel())
        self.clear()
        if quiet:
            return
        if not held:
            # Every grad replaced: a new backward (torch would step it unclipped too) or
            # copies (`p.grad = p.grad.float()`, which torch's in-place clip would have
            # left clipped): the step cannot tell which, and says what it does (empty
            # grads, which no coefficient changes, aside).
            if nonempty and not at_clip:
                warn(
                    f"tritonadam.{self.name}: every grad clip_grad_norm_ measured was replaced "
                    f"before the step ({nonempty} new grad tensor{'s' if nonempty > 1 else ''}: a new "
                    "backward, or copies such as p.grad = p.grad.float()), so its coefficient was "
                    "dropped and this step reads them unclipped (torch's in-place clip would have "
                    "left copies clipped). Call clip_grad_norm_ after the last change to .grad, "
                    "right before step(); opt.zero_grad() before a new backward drops it quietly"
                )
            return
        if in_place and not replaced and not gained:
            reads = "this clip measures them afresh" if at_clip else "this step reads them unclipped"
            warn(
                f"tritonadam.{self.name}: the grads were changed in place or given other memory "
                "after clip_grad_norm_ measured them (zero_(), zero_grad(set_to_none=False), "
                "another backward accumulating into them, .data = ..., model.float()), so its "
                f"coefficient was dropped and {reads}. Call clip_grad_norm_ after the last change "
                "to .grad, right before step()"
            )
            return
        what = []
        if replaced:
            what.append(f"{replaced} of the {total} grads it measured "
                        f"{'was' if replaced == 1 else 'were'} replaced")
        if gained:
            what.append(f"{gained} param{'s' if gained > 1 else ''} it did not measure got grads")
        if in_place:
            what.append("grads it measured were changed in place")
        reads = ("this clip measures every grad afresh, unclipped (torch's in-place clip would "
                 "have measured the unchanged ones clipped)" if at_clip else
                 "this step reads every grad unclipped (torch's in-place clip would have left "
                 "the unchanged ones clipped)")
        warn(
            f"tritonadam.{self.name}: the grads changed after clip_grad_norm_ measured them "
            f"({'; '.join(what)}), so its coefficient was dropped and {reads}. Call "
            "clip_grad_norm_ after the last change to .grad, right before step()"
        )

    def clear(self) -> None:
        self.pending = False
        self._params = []
        self._grads = []
        self._versions = []
        self._addresses = []

    def no_grads(self) -> Tensor:
        """A clip with no grads to measure: torch's value for it, the latest norm too."""
        self.last_norm, self.mesh = torch.tensor(0.0), None
        return self.last_norm

    def last_grad_norm(self) -> Tensor | None:
        if self.last_norm is None:
            return None
        return replicated(self.last_norm, self.mesh)


def _measured(cache: StepCache) -> tuple[list[Tensor], list[Tensor]]:
    """The params whose grads a clip of ``cache`` measures, and those grads as its last
    check took them: the kernels' params, or (when torch's implementation steps every
    param, on the CPU) the host rows'."""
    if _host_only(cache):
        return cache.host_params, cache.host_taken
    return cache.params, cache.taken


def _host_only(cache: StepCache) -> bool:
    """Whether torch's implementation steps every param of ``cache`` (on the CPU)."""
    return bool(cache.host) and not cache.params

