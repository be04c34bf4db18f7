"""The step cache: what an optimizer's step reuses while its tensors stay put.

``StepCache`` is built from the rows the gathering validated (params with grads, their
state), lays them out in device tables (one set per device, rows grouped into buckets of
equal dtypes and state format, across param groups), re-checks on every step what the
launches rely on, and launches: one prepare kernel per device (step counts, per-tensor
scalars) and one update kernel per bucket.

The per-step check is a handful of C-level passes over the tensors, no Python loop body
per tensor, run chunk by chunk of rows (``_Chunk``) so that a row's objects are read from
memory once: host time per step is a benchmarked figure. Anything that does not match
what the tables were built from sends the optimizer back to a full gathering, which
gives a precise error or builds a new cache.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from . import autotune, host
from .autotune import LaunchConfig
from .hyper import GroupHyper
from .kernels import Bucket, BucketKey, DeviceTables, Variant, device_guard, launch_prepare, launch_update
from .kernels.launch import fp_fusion, norm_config, norm_max_chunks
from .kernels.plan import NormPlan, group_pointer_row
from .kernels.scratch import make_scratch_runner, scaled_mix
from .tensors import GRAD, LOCAL, as_real, local_tensor, on_device, overlaps_itself
from .validate import check_grad

__all__ = ["DeviceLaunches", "Row", "StepCache", "param_meta"]

_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_LOW = 2**40  # an address below it may be an offset into a freed storage (StepCache._freed)


def _spec(g: Tensor):
    """A DTensor grad's sharding spec (mesh and placements), None for a plain tensor."""
    return getattr(g, "_spec", None)


def _placement(spec) -> tuple | None:
    return None if spec is None else (spec.mesh, tuple(spec.placements))


@dataclass
class Row:
    """One tensor a step launches on, validated by the gathering."""

    param: Tensor  # as the user sees it (may be a DTensor)
    grad: Tensor  # local grad, in the param's layout
    group: int  # index into param_groups
    key: BucketKey  # the launch it joins
    # exp_avg, the second moment (exp_avg_sq, or AdaMax's exp_inf), and AMSGrad's
    # max_exp_avg_sq: the tensors themselves, or their codes where they are quantized
    moments: tuple
    scales: tuple  # the quantized moments' scales, one per moment, else Nones
    step: Tensor
    master: Tensor | None = None  # fp32 master, or the int16 remainder of one
    rounding_key: int = 0  # Philox key of its stochastic rounding (kernels.plan.rounding_key)
    # Checked one by one on every step instead of by the C-level passes: non-contiguous
    # params (non-dense ones: the kernel steps a contiguous staging copy) and grads read
    # through a dense copy or not contiguous.
    revalidated: bool = False
    staging: Tensor | None = None
    param_meta: tuple = ()  # the local param's pointer, shape, strides, dtype, device


def param_meta(t: Tensor) -> tuple:
    """What a revalidated row's launch relies on about its (local) param."""
    return t.data_ptr(), t.shape, t.stride(), t.dtype, t.device


def _dict_versions():
    """CPython's per-dict version tag (any write to a dict changes it), through
    torch.compile's guard helpers; None where this torch or Python lacks it."""
    try:
        from torch._C._dynamo.guards import dict_version

        probe = {"k": 0}
        before = dict_version(probe)
        probe["k"] = 1
        return dict_version if dict_version(probe) != before else None
    except Exception:
        return None


_dict_version = _dict_versions()


def _kernel_view(t: Tensor | None) -> Tensor | None:
    """What the kernel addresses for a state tensor: its local shard, as real numbers."""
    return None if t is None else as_real(local_tensor(t))


def _local_alias(t: Tensor | None) -> Tensor | None:
    """A new tensor object over ``t``'s memory (its local shard for a DTensor): it keeps
    that memory alive even if ``t.data`` is later replaced."""
    return None if t is None else _kernel_view(t).detach()


class _GradMeta:
    """Checks that grads have the dtype, device, size and (contiguous) layout the tables
    were built with, in one C++ pass where torch offers one.

    torch.compile's tensor guards compare exactly these properties in C++, several times
    faster than a Python-level pass per property. They also compare what does not matter
    here (requires_grad, tensor type, thread-local dispatch state): a mismatch there falls
    back to the per-property passes, never to a wrong answer.
    """

    def __init__(self, grads: list[Tensor]) -> None:
        self._dtypes = list(map(_DTYPE, grads))
        self._shapes = list(map(_SHAPE, grads))
        self._devices = list(map(Tensor.get_device, grads))
        self._guards = _tensor_guards(grads) if all(map(Tensor.is_contiguous, grads)) else None

    def same(self, grads: list[Tensor]) -> bool:
        if self._guards is not None and self._guards.check(*grads):
            return True
        return (
            list(map(_DTYPE, grads)) == self._dtypes
            and list(map(_SHAPE, grads)) == self._shapes  # not the numel: `g.data = x` may reshape
            and list(map(Tensor.get_device, grads)) == self._devices
            and all(map(Tensor.is_contiguous, grads))
            # a lazily negated or conjugated grad (the guards compare these bits): its
            # memory holds the values before negation
            and not any(map(Tensor.is_neg, grads)) and not any(map(Tensor.is_conj, grads))
        )


class _LayoutMeta:
    """Checks that tensors keep the dtype, device, shape and strides the tables were built
    with (a view assigned to ``.data`` keeps the address and changes these), in one C++
    pass of torch.compile's tensor guards where torch offers them; a guard mismatch on
    what does not matter here (requires_grad) falls back to the exact comparison."""

    def __init__(self, tensors: list[Tensor]) -> None:
        self._meta = [_layout(t) for t in tensors]
        self._guards = _tensor_guards(tensors)

    def same(self, tensors: list[Tensor]) -> bool:
        if self._guards is not None and self._guards.check(*tensors):
            return True
        return [_layout(t) for t in tensors] == self._meta


def _layout(t: Tensor) -> tuple:
    return t.dtype, t.device, t.shape, t.stride(), t.is_neg(), t.is_conj()


def _tensor_guards(tensors: list[Tensor]):
    """torch.compile's C++ guards on these tensors' dtype, device, shape and strides, or
    None (no tensors, or absent or changed in this torch: the callers' passes do it)."""
    if not tensors:
        return None
    try:
        from torch._C._dynamo.guards import TensorGuards

        return TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                            dynamic_dims_strides=[list(t.stride()) for t in tensors])
    except Exception:
        return None


#: rows per chunk of the per-step check: a chunk's params, grads and state tensors (about
#: 5 of them a row, a few cache lines each) stay within a core's L2 cache between passes.
_CHUNK = 256


class _Chunk:
    """A run of consecutive rows whose per-step passes run one after the other (``StepCache.
    check``): its batch rows' params (as the user sees them, in batch order), their
    pointers and layouts with every state tensor's of the run, and its grads' metadata."""

    __slots__ = ("params", "grad_meta", "param_ptrs", "state", "state_ptrs", "laid_out", "layouts")

    def __init__(self, rows: list[Row]) -> None:
        batch = [r for r in rows if not r.revalidated]
        self.params = [r.param for r in batch]
        self.grad_meta = _GradMeta([r.grad for r in batch])
        local_params = [local_tensor(p) for p in self.params]
        self.param_ptrs = list(map(Tensor.data_ptr, local_params))
        # Every state tensor but the counts (one number each) has its layout compared.
        self.laid_out = [local_tensor(t) for r in rows for t in (*r.moments, *r.scales, r.master)
                         if t is not None]
        self.state = self.laid_out + [local_tensor(r.step) for r in rows]
        self.state_ptrs = list(map(Tensor.data_ptr, self.state))
        self.layouts = _LayoutMeta(local_params + self.laid_out)

    def in_place(self, params: list[Tensor]) -> bool:
        """Whether ``params`` (the local shards of ``self.params``) and the state tensors
        are where the tables point: the same address, and the same shape and strides (a
        tensor re-viewed under its address, ``p.data = p.data.t()``, keeps its pointer)."""
        # The layouts first: one C++ pass, which brings in most of what the pointers read.
        return (self.layouts.same(params + self.laid_out)
                and list(map(Tensor.data_ptr, params)) == self.param_ptrs
                and list(map(Tensor.data_ptr, self.state)) == self.state_ptrs)


@dataclass
class _Launch:
    bucket: Bucket
    groups: list[int]  # param groups with tensors in this bucket
    config: LaunchConfig | None = None
    wanted: tuple | None = None  # the launch options config was chosen for


@dataclass
class DeviceLaunches:
    """One device's tables and the update launches over them."""

    tables: DeviceTables
    launches: list[_Launch] = field(default_factory=list)
    rows: np.ndarray | None = None  # positions in the cache's row order; None: all, in order
    _norm_plan: NormPlan | None = None

    @property
    def buckets(self) -> list[Bucket]:
        return [item.bucket for item in self.launches]

    def norm_plan(self, classes: np.ndarray | None) -> NormPlan:
        """The norm launches over these tables, built on a clip's first use and kept with
        them (the same tensors, the same plan). ``classes``: each row's layout class in the
        cache's row order (``tritonadam.clip.norm_reduction``), or None."""
        if self._norm_plan is None:
            block_size, num_warps = norm_config()
            if classes is not None and self.rows is not None:
                classes = classes[self.rows]  # table order
            self._norm_plan = NormPlan(self.tables.device, self.buckets, block_size=block_size,
                                       num_warps=num_warps, max_chunks=norm_max_chunks(), classes=classes)
        return self._norm_plan


class StepCache:
    """Device tables and per-step checks for one optimizer's tensors."""

    def __init__(self, name: str, algorithm: str, rows: list[Row], group_lists: list[list],
                 inactive: list[Tensor], state: dict, options: tuple, host_rows: list | None = None,
                 meta: list | None = None) -> None:
        self.name = name
        # Meta params (stepped shape-only, no row) can become real in place
        # (`torch.utils.swap_tensors`, `to_empty` with swapping, DTensor params in
        # `Module._apply`) under the same objects: with any of them, every step gathers
        # afresh, which sees the change, as tables built without them never would.
        self._meta = meta or []
        # CPU params that torch.optim's implementation steps (tritonadam.host). No table
        # covers them: each step re-runs the gathering's checks on them one by one.
        self.host = host_rows or []
        self._host_meta = [param_meta(local_tensor(r.param)) for r in self.host]
        self.host_params = [r.param for r in self.host]
        self.algorithm = algorithm  # "adam" or "adamax"; per-group decay decides adamw
        # The optimizer's options that decide which state a param steps with.
        self.options = options
        # What the tables were built from, compared on every step.
        self._group_lens = [len(params) for params in group_lists]
        self._all_params = [p for params in group_lists for p in params]
        self._state = state
        # State edited between steps: a per-param dict replaced (identity), an entry
        # replaced in one (its version), or any state tensor moved or freed under the same
        # tensor object (``t.data = t.data.to(...)`` or ``untyped_storage().resize_(0)``,
        # as state-offloading code does): every pointer the launches write through.
        self._state_values = list(state.values())
        self._state_version = _dict_version(state) if _dict_version is not None else None
        # Only the dicts have versions; entries under keys that are not params (a hook's
        # ``state["note"] = 1``, which torch keeps and never reads) count by identity,
        # through the state's own version.
        self._state_dicts = [v for v in self._state_values if isinstance(v, dict)]
        self._state_versions = self._versions(self._state_dicts)
        # Every state tensor's pointer (step counts too), and the layout of each but the
        # counts (one number): one re-viewed under the same address (``v.data = v.data.t()``)
        # would be read in the layout it was checked in. Compared chunk by chunk of rows,
        # with the rows' params and grads (``_Chunk``).
        size = -(-len(rows) // -(-len(rows) // _CHUNK)) if rows else 1  # even chunks of at most _CHUNK
        self._chunks = [_Chunk(rows[lo:lo + size]) for lo in range(0, len(rows), size)]
        # State in an autograd graph (moments that differentiable=True steps computed from
        # grads that require grad, the group switched back since; a switch re-gathers):
        # bumped with the params, as torch's in-place updates bump it. Usually none.
        self._graph_state = [t for r in rows for t in (*r.moments, *r.scales, r.master, r.step)
                             if isinstance(t, Tensor) and t.requires_grad]
        self._inactive = inactive
        batch = [r for r in rows if not r.revalidated]
        self._revalidated = [r for r in rows if r.revalidated]
        self._batch_params = [r.param for r in batch]
        kinds = [local_tensor(p) is not p for p in self._batch_params]
        self._dtensor = True in kinds
        self._all_dtensor = all(kinds) and bool(kinds)
        # The DTensor rows' grad specs: a grad placed unlike its param (a Partial grad of a
        # replicated param) has the param's local shape, so only its spec tells it apart.
        self._dtensor_rows = [i for i, k in enumerate(kinds) if k]
        self._grad_specs = [_spec(r.param.grad) for r in (batch[i] for i in self._dtensor_rows)]
        self._grad_placements = list(map(_placement, self._grad_specs))
        grads = [r.grad for r in batch]
        self._empty = [i for i, g in enumerate(grads) if g.numel() == 0]
        self._grad_sizes = list(map(Tensor.element_size, grads))
        # Table order: batch-checked rows first (their grad pointers come from the C-level
        # pass), then revalidated ones; within a device, rows are sorted into buckets.
        self._order = batch + self._revalidated
        self._params = [r.param for r in self._order]
        # Params made under inference_mode (a gathering inside it accepts them): a step
        # outside it gathers afresh, which refuses them as torch.optim's in-place ops do.
        self._inference = any(local_tensor(p).is_inference() for p in self._params + self.host_params)
        # The tables hold raw pointers: keep what they point at alive, param storages
        # included (a detached alias survives ``p.data = ...``, so a stale row never
        # writes freed memory; the next check sees the new pointer and rebuilds).
        self._keep = [(self._kernel_param(r).detach(), *map(_local_alias, r.moments + r.scales),
                       _local_alias(r.master), _local_alias(r.step), r.staging) for r in self._order]
        self._hyper_staging: dict = {}
        # FMA fusion for this cache's launches, read from the environment once (as Triton
        # reads it once per compile), not at every launch: about 2 us a read.
        self.fusion = fp_fusion()
        self.devices: dict[torch.device, DeviceLaunches] = {}
        self._build_tables(len(group_lists))
        # This step's grads, as the last check took them: the batch rows' pointers, the
        # revalidated rows' grads (dense copies where needed), and every param's grad
        # object (``taken``, in ``params`` order) until the step has launched. Nothing
        # holds a grad beyond its step: ``zero_grad(set_to_none=True)`` must free them.
        self._grad_ptrs = list(map(Tensor.data_ptr, grads))
        self._revalidated_grads = [r.grad for r in self._revalidated]
        self._revalidated_dtypes = [r.grad.dtype for r in self._revalidated]
        self.taken: list[Tensor] | None = list(map(GRAD, self._params))
        self._revalidated_ptrs = self._taken_revalidated_ptrs()
        self.host_taken: list[Tensor] = list(map(GRAD, self.host_params))  # as ``taken``
        for row in self._order:
            row.grad = None
        self._uploaded: list[int] | None = None
        self.has_complex = any(p.is_complex() for p in self._params + self.host_params)
        self._bumped = self._params + self.host_params + self._graph_state  # what each launch bumps

    # ---- building -------------------------------------------------------------------

    @staticmethod
    def _kernel_param(row: Row) -> Tensor:
        return row.staging if row.staging is not None else as_real(local_tensor(row.param))

    def _build_tables(self, num_groups: int) -> None:
        by_device: dict[torch.device, dict[BucketKey, list[int]]] = {}
        for i, row in enumerate(self._order):
            device = self._kernel_param(row).device
            by_device.setdefault(device, {}).setdefault(row.key, []).append(i)
        for device, buckets in by_device.items():
            order = [i for idx in buckets.values() for i in idx]
            rows = [self._order[i] for i in order]
            table_rows = [DeviceTables.row(
                self._kernel_param(r), tuple(map(_kernel_view, r.moments)), tuple(map(_kernel_view, r.scales)),
                _kernel_view(r.master), local_tensor(r.step), r.rounding_key,
            ) for r in rows]
            numels = np.asarray([self._kernel_param(r).numel() for r in rows], dtype=np.int64)
            dev = DeviceLaunches(DeviceTables(device, table_rows, [r.group for r in rows], num_groups))
            lo = 0
            for key, idx in buckets.items():
                bucket = Bucket(key, device, lo, numels[lo:lo + len(idx)])
                dev.launches.append(_Launch(bucket, sorted({self._order[i].group for i in idx})))
                lo += len(idx)
            dev.rows = None if order == list(range(len(self._order))) else np.asarray(order, dtype=np.int64)
            self.devices[device] = dev

    # ---- the per-step check ---------------------------------------------------------

    def check(self, param_groups: list[dict], state: dict, options: tuple, grads_only: bool = False) -> bool:
        """Whether the cache still applies to this step; if so it takes this step's grads.

        False when anything differs from what the tables were built from: the param set,
        the state dicts, a grad gone or appeared, a param's storage or layout, a grad's
        dtype, size, device, layout or storage (a null pointer). The optimizer then
        gathers everything afresh.

        ``grads_only``: for ``clip_grad_norm_``, whose launches read grads alone: the
        params' and state tensors' addresses and layouts are left to the step that
        follows (``still_taken``), which compares them anyway (code between the two may
        move them), so each is compared once per clip + step.
        """
        if not self._same_structure(param_groups, state, options, tensors=not grads_only):
            return False
        passed = self._chunk_pass(grads_only)
        if passed is None:
            return False
        grads, local_grads, ptrs = passed
        if self._dtensor and not self._placed_as_taken(grads):
            return False
        if ptrs != self._grad_ptrs and self._freed(local_grads, ptrs):
            return False
        revalidated = self._revalidate(param_groups)
        if revalidated is None or (self.host and not self._recheck_host(param_groups, state)):
            return False
        self._grad_ptrs, self._revalidated_grads = ptrs, revalidated
        self.taken = grads + [GRAD(r.param) for r in self._revalidated] if self._revalidated else grads
        self._revalidated_ptrs = self._taken_revalidated_ptrs()
        return True

    def _chunk_pass(self, grads_only: bool = False) -> tuple[list, list, list] | None:
        """The batch rows' grads, their local tensors and addresses, where each grad has
        the dtype, size and layout the tables were built with and (unless ``grads_only``)
        every param and state tensor is where they point (``_Chunk.in_place``); else None.
        Chunk by chunk of rows, every pass over a chunk's grads, params and state while its
        objects are still in the CPU's caches (one pass each over all of them read most of
        them from memory again)."""
        grads, local_grads, ptrs = [], [], []
        local = self._locals
        for chunk in self._chunks:
            got = list(map(GRAD, chunk.params))
            try:
                got_local = local(got)
                got_ptrs = list(map(Tensor.data_ptr, got_local))
            except (AttributeError, RuntimeError, TypeError):  # a None or sparse grad
                return None
            if not chunk.grad_meta.same(got_local) or not (grads_only or chunk.in_place(local(chunk.params))):
                return None
            grads += got
            local_grads += got_local
            ptrs += got_ptrs
        return grads, local_grads, ptrs

    def taken_addresses(self) -> list[int]:
        """The addresses of the grads ``taken`` holds (local shards'), in its order."""
        return self._grad_ptrs + self._revalidated_ptrs

    def _taken_revalidated_ptrs(self) -> list[int]:
        """The addresses of the revalidated rows' grads as taken (not of their copies)."""
        n = len(self._batch_params)
        return [local_tensor(g).data_ptr() for g in self.taken[n:]]

    def _freed(self, local_grads: list, ptrs: list) -> bool:
        """Whether a non-empty grad's storage was freed (``untyped_storage().resize_(0)``):
        its address is then its offset into a null storage, small for a view near the
        start of a flat grad buffer, not null. Addresses the last check accepted are not
        looked at again; only addresses below 2**40 are candidates (no storage spans a
        terabyte, and allocations on x86-64 Linux and CUDA lie far above), so the offsets
        are read only where one is that low."""
        if min(ptrs, default=_LOW) >= _LOW:
            return False
        bases = list(map(operator.sub, ptrs, map(operator.mul, map(Tensor.storage_offset, local_grads),
                                                  self._grad_sizes)))
        return 0 in bases and [i for i, b in enumerate(bases) if b == 0] != [i for i in self._empty if bases[i] == 0]

    def _locals(self, tensors: list) -> list:
        """The batch rows' params or grads as the kernels address them: local shards of
        DTensors (one attribute read each where every row is one)."""
        if self._all_dtensor:
            return list(map(LOCAL, tensors))
        if self._dtensor:
            return list(map(local_tensor, tensors))
        return tensors

    def _placed_as_taken(self, grads: list) -> bool:
        """Whether the DTensor rows' grads have the mesh and placements the gathering
        accepted: the same spec objects (FSDP2 reuses one per param), else equal ones."""
        dgrads = grads if self._all_dtensor else [grads[i] for i in self._dtensor_rows]
        specs = list(map(_spec, dgrads))
        return (all(map(operator.is_, specs, self._grad_specs))
                or list(map(_placement, specs)) == self._grad_placements)

    def _same_structure(self, param_groups: list[dict], state: dict, options: tuple,
                        tensors: bool = True) -> bool:
        """Whether everything but this step's grads is as the tables were built from: the
        options, the state (its dicts and their entries), the groups' params, and no grad
        on a param that had none; with ``tensors``, no inference param outside inference
        mode. The storage, shape and strides of the params and state tensors are the
        chunks' (``_chunk_pass``)."""
        lists = [g["params"] for g in param_groups]
        return not (
            bool(self._meta)
            or tensors and self._inference and not torch.is_inference_mode_enabled()
            or options != self.options
            or state is not self._state
            or not self._same_state_dicts(state)
            or self._versions(self._state_dicts) != self._state_versions
            or list(map(len, lists)) != self._group_lens
            or not all(map(operator.is_, chain.from_iterable(lists), self._all_params))
            or any(map(operator.is_not, map(GRAD, self._inactive), repeat(None)))
        )

    def _revalidate(self, param_groups: list[dict]) -> list[Tensor] | None:
        """This step's grads of the revalidated rows, or None to gather afresh."""
        grads = []
        for row, dtype in zip(self._revalidated, self._revalidated_dtypes):
            g = row.param.grad
            if g is None or param_meta(local_tensor(row.param)) != row.param_meta:
                return None
            grad = check_grad(self.name, row.param, g, param_groups[row.group].get("fused"))
            if grad.dtype != dtype:
                return None
            grads.append(grad)
        return grads

    def _recheck_host(self, param_groups: list[dict], state: dict) -> bool:
        """The gathering's checks of each host row (torch's CPU code trusts shapes), and
        this step's grads into the rows; False to gather afresh (which says what is wrong)."""
        grads = []
        for row, meta in zip(self.host, self._host_meta):
            p = row.param
            if p.grad is None or param_meta(local_tensor(p)) != meta:
                return False
            try:
                grad = check_grad(self.name, p, p.grad, param_groups[row.group].get("fused"))
                if row.fmt.check(p, state.get(p, {}), row.keys, self.name):
                    return False  # state to create or convert
            except (RuntimeError, ValueError, TypeError):
                return False
            grads.append(grad)
        for row, grad in zip(self.host, grads):
            row.grad = grad
        self.host_taken = list(map(GRAD, self.host_params))
        return True

    def still_taken(self, param_groups: list[dict], state: dict, options: tuple) -> bool:
        """Whether every param still holds the very grad the last check took, at the same
        address, the revalidated params are where they were, and nothing else the tables
        were built from changed: what a step right after a clip checks instead of a full
        check (the clip's check validated these grads, and its coefficient belongs to them)."""
        taken = self.taken
        if taken is None or not self._same_structure(param_groups, state, options):
            return False
        # Everything the tables point at, compared again as ``check`` does: code between
        # the clip and the step (a step pre-hook reloading offloaded state, ``p.data =
        # ...``, a storage freed or regrown) moves params and state as well as grads. The
        # batch rows' grads: their addresses against the taken ones (a replaced grad or a
        # storage moved under ``.data`` shows a new address, a grad set to None a
        # TypeError) and their dtype, size and layout (``g.data = g.data.t()`` keeps the
        # object and the address, and no version bump tells the clip). An equal address
        # under another grad object is an alias of the taken grad (kept alive by ``taken``).
        passed = self._chunk_pass()
        if passed is None:
            return False
        grads, _, ptrs = passed
        n = len(grads)
        if not (ptrs == self._grad_ptrs
                and (not self._dtensor or all(map(operator.is_, grads, taken)) or self._placed_as_taken(grads))
                and all(map(operator.is_, map(GRAD, self.host_params), self.host_taken))):
            return False
        if self._revalidated:
            # The revalidated rows' grads: the same objects at the same addresses (a grad
            # given other memory under ``.data`` is another grad, which the coefficient
            # does not belong to), read again: a copy the clip's check made holds the
            # values at the clip, and a grad changed in place since (its coefficient
            # dropped for that) must be stepped as it is now.
            held = list(map(GRAD, self._params[n:]))
            if not all(map(operator.is_, held, taken[n:])) or \
                    [local_tensor(g).data_ptr() for g in held] != self._revalidated_ptrs:
                return False
            revalidated = self._revalidate(param_groups)
            if revalidated is None:
                return False
            self._revalidated_grads = revalidated
        # The host rows' params checked and their grads read again too, for the same reason
        # (the clip compares their addresses: a clip over host rows measures nothing else).
        return not self.host or self._recheck_host(param_groups, state)

    def release(self) -> None:
        """Forget this step's grads (the step launched, or they were zeroed)."""
        self.taken = None
        self._revalidated_grads = []
        self.host_taken = []
        for row in self.host:
            row.grad = None

    def _same_state_dicts(self, state: dict) -> bool:
        if self._state_version is not None:  # any entry set, popped or cleared changes it
            return _dict_version(state) == self._state_version
        return len(state) == len(self._state_values) and all(
            map(operator.is_, state.values(), self._state_values))

    @staticmethod
    def _versions(dicts: list) -> list:
        if _dict_version is not None:
            return list(map(_dict_version, dicts))
        # Without version tags: the dicts' values by identity (slower, same answer).
        return list(map(id, chain.from_iterable(map(dict.values, dicts))))

    @property
    def empty(self) -> bool:
        return not self._order and not self.host

    @property
    def params(self) -> list[Tensor]:
        """Every param the step launches on (the ones with grads), in table order."""
        return self._params

    # ---- launching ------------------------------------------------------------------

    def upload_grads(self) -> None:
        """Point every device's tables at the grads the last check took."""
        ptrs = self._grad_ptrs
        if self._revalidated_grads:
            ptrs = ptrs + list(map(Tensor.data_ptr, self._revalidated_grads))
        # The caching allocator mostly hands grads the same addresses step after step:
        # compare as a list (C level) and touch numpy and the device only on change.
        if ptrs == self._uploaded:
            return
        host = np.fromiter(ptrs, dtype=np.int64, count=len(ptrs))
        for device, dev in self.devices.items():
            with device_guard(device):
                dev.tables.set_grad_ptrs(host if dev.rows is None else host[dev.rows])
        self._uploaded = ptrs

    def count_meta_steps(self) -> None:
        """A dry run's step: torch.optim counts each meta param's step in its CPU count
        and computes nothing else."""
        for p in self._meta:
            step = self._state[p].get("step")
            if isinstance(step, Tensor) and not step.is_meta and step.numel() == 1:
                step.add_(1)
        if self._meta:  # written, as far as autograd can tell (torch's in-place ops bump them)
            torch.autograd.graph.increment_version(self._meta)

    def launch(self, param_groups: list[dict], hypers: list[GroupHyper], *, block_size=None,
               num_warps=None, autotune_mode=None, persistent=None, grad_scale=None, found_inf=None,
               clip=None) -> None:
        """Step every tensor with the grads the last check took: one prepare launch per
        device, one update launch per bucket.

        ``hypers``: every group's checked values; ``clip``: the clip buffer whose
        coefficient scales every grad, or None.
        """
        values = tuple(v for h in hypers for v in h.row)
        lr_tensors = any(h.lr is not None for h in hypers)
        # Either beta may be a tensor alone (OneCycleLR's cycle_momentum writes a float
        # beta1 beside a tensor beta2).
        beta_tensors = any(h.beta1 is not None or h.beta2 is not None for h in hypers)
        self.upload_grads()
        for row in self._revalidated:
            if row.staging is not None:
                row.staging.copy_(as_real(local_tensor(row.param)))
        wanted = (block_size, num_warps, autotune_mode, persistent)
        for device, dev in self.devices.items():
            tables = dev.tables
            with device_guard(device):
                tables.set_groups(values, self._group_pointers(device, hypers))
                scale = on_device(device, grad_scale)
                inf = on_device(device, found_inf)
                launch_prepare(tables, grad_scale=scale, found_inf=inf, clip=clip,
                               lr_tensors=lr_tensors, beta_tensors=beta_tensors, fusion=self.fusion)
                for item in dev.launches:
                    decoupled = coupled = False
                    for gi in item.groups:
                        h = hypers[gi]
                        if h.weight_decay != 0.0:
                            decoupled |= h.decoupled
                            coupled |= not h.decoupled
                    if item.config is None or item.wanted != wanted:
                        item.config = self._config(item.bucket, hypers, item.groups, *wanted)
                        item.wanted = wanted
                    launch_update(tables, item.bucket, block_size=item.config.block_size,
                                  num_warps=item.config.num_warps, persistent=item.config.persistent,
                                  adamax=self.algorithm == "adamax", decoupled_wd=decoupled,
                                  coupled_wd=coupled, found_inf=inf, unscale_grads=scale is not None,
                                  fusion=self.fusion)
        for row in self._revalidated:
            if row.staging is not None:
                as_real(local_tensor(row.param)).copy_(row.staging)
        if grad_scale is not None:
            self._unscaled_back()
        if self.host:
            host.step(self.algorithm, self.host, param_groups, grad_scale=grad_scale, found_inf=found_inf,
                      clip=clip)
        # The kernels wrote the params through raw pointers, which autograd does not see,
        # and the host path's writes miss it too (torch's fused CPU kernel does not bump;
        # a DTensor's writes land on its local tensor): bumped as torch.optim's in-place
        # ops bump them, a backward through a graph that saved a param before this step
        # raises instead of using the stepped values. One C call, ~0.2 us per param.
        torch.autograd.graph.increment_version(self._bumped)

    def _unscaled_back(self) -> None:
        """After a step GradScaler handed its scale: the kernels wrote each grad they read
        back unscaled (skipped with the step if ``found_inf`` is set), as torch's fused
        step does (torch's bumps no grad's version counter, nor do the kernels); a grad they
        read through a copy (another layout, a lazily negated view) gets the copy's
        values. A grad whose elements share memory (an expanded tensor, which torch's fused
        step refuses) keeps its scaled values."""
        for row, read in zip(self._revalidated, self._revalidated_grads):
            grad = row.param.grad
            if grad is None:
                continue
            held = local_tensor(grad)
            if (read.data_ptr() == held.data_ptr() and read.stride() == held.stride()) \
                    or read.shape != held.shape or overlaps_itself(held):
                continue
            with torch.no_grad():
                held.copy_(read)  # a skipped step left the copy as it was taken

    def _group_pointers(self, device, hypers: list[GroupHyper]) -> tuple:
        """The group pointer table: tensor hyper-parameters are read in place where they
        live on ``device`` as float32/float64; elsewhere (rare) through a staging copy
        next to the tables, refreshed each step (a CPU scalar: no GPU sync)."""
        rows = []
        for gi, h in enumerate(hypers):
            if h.lr is None and h.beta1 is None and h.beta2 is None:
                rows.append(group_pointer_row())
                continue
            read = [self._readable(device, gi, j, t) for j, t in enumerate((h.lr, h.beta1, h.beta2))]
            rows.append(group_pointer_row(*read))
        return tuple(v for row in rows for v in row)

    def _readable(self, device, gi: int, j: int, value: Tensor | None) -> Tensor | None:
        # A lazily negated view's memory holds the value before negation: staged (resolved).
        if value is None or (value.device == device and value.dtype in (torch.float32, torch.float64)
                             and not value.is_neg()):
            return value
        key = (device, gi, j)
        staged = self._hyper_staging.get(key)
        if staged is None:
            staged = self._hyper_staging[key] = torch.zeros((), dtype=torch.float64, device=device)
        staged.copy_(value.reshape(()), non_blocking=True)
        return staged

    def _config(self, bucket: Bucket, hypers: list[GroupHyper], groups: list[int], block_size,
                num_warps, autotune_mode, persistent) -> LaunchConfig:
        if block_size is not None and num_warps is not None:
            return LaunchConfig(block_size, num_warps, bool(persistent))
        if self.algorithm == "adamax":
            algorithm = "adamax"
        else:
            algorithm = "adamw" if any(hypers[gi].decoupled for gi in groups) else "adam"
        variant = Variant(algorithm, bucket.key)
        numels = [int(n) for n in bucket.numels]

        def make_runner(config: LaunchConfig, numel: int) -> Callable[[], None]:
            return make_scratch_runner(variant, config=config, numels=scaled_mix(numels, numel),
                                       device=bucket.device)

        extra = {"mode": autotune_mode} if autotune_mode is not None else {}
        chosen = autotune.select_config(
            variant.autotune_key(), sum(numels), bucket.device, make_runner,
            bytes_per_elem=variant.bytes_per_elem(), **extra,
        )
        return LaunchConfig(
            block_size if block_size is not None else chosen.block_size,
            num_warps if num_warps is not None else chosen.num_warps,
            chosen.persistent if persistent is None else persistent,
        )


