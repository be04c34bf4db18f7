"""The step cache: what an optimizer's step reuses while its tensors stay put.

One object owns the launch path. ``StepCache`` is built from the tensors the optimizer
gathered and validated (params with grads, their state), lays them out in device tables
(one set per device, rows grouped into buckets of equal dtypes and state layout, across
param groups), re-checks on every step what the launches rely on, and launches: one
prepare kernel per device (step counts, per-tensor scalars) and one update kernel per
bucket.

The per-step check is a handful of C-level passes over the tensors, no Python loop body
per tensor: host time per step is a benchmarked figure. Anything that does not match
what the tables were built from sends the optimizer back to full validation, which gives
a precise error or rebuilds the cache.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from . import autotune
from .autotune import LaunchConfig
from .clip import norm_reduction
from .kernels import (
    Bucket,
    BucketKey,
    DeviceTables,
    autotune_key,
    bytes_per_elem,
    device_guard,
    launch_prepare,
    launch_update,
    make_scratch_runner,
)
from .kernels.layout import MASTER_FP32, MASTER_REMAINDER
from .kernels.scratch import scaled_mix
from .kernels.launch import launch_norm, launch_norm_reduce, norm_config, norm_kind, norm_max_chunks
from .kernels.plan import NormPlan

__all__ = ["GroupHyper", "Row", "StepCache", "group_hyper", "local_tensor"]

try:  # torch.distributed may be absent from some builds
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover
    DTensor = None

# The raw attribute: .grad's getter also checks for non-leaf access, at twice the cost.
_GRAD = operator.attrgetter("_grad")
_LOCAL = operator.attrgetter("_local_tensor")
_DTYPE = operator.attrgetter("dtype")


def local_tensor(t: Tensor) -> Tensor:
    """The tensor a kernel can address: a DTensor's local shard (FSDP2), else t itself."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor
    return t


def _as_real(t: Tensor | None) -> Tensor | None:
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


@dataclass
class Row:
    """One tensor a step launches on, validated by the optimizer."""

    param: Tensor  # as the user sees it (may be a DTensor)
    grad: Tensor  # local grad, in the param's layout
    group: int  # index into param_groups
    exp_avg: Tensor
    second: Tensor  # exp_avg_sq or exp_inf
    step: Tensor
    max_second: Tensor | None = None
    master: Tensor | None = None  # fp32 master, or the int16 remainder of one
    master_kind: int = 0  # kernels.layout.MASTER_*
    stochastic_rounding: bool = False
    key: int = 0  # Philox key of its stochastic rounding (kernels.plan.rounding_key)
    # Re-validated on every step instead of by the C-level passes: non-dense params (the
    # kernel steps a contiguous staging copy) and grads read through a dense copy.
    general: bool = False
    staging: Tensor | None = None
    param_meta: tuple = ()  # the local param's pointer, shape, strides, dtype, device


@dataclass(frozen=True)
class GroupHyper:
    values: tuple  # float64, in the order of kernels/layout.py's G_* columns
    pointers: tuple  # (address, is float64) of tensor lr, beta1, beta2; (0, 0) for floats
    lr_tensor: bool
    beta_tensors: bool

    @property
    def weight_decay(self) -> float:
        return self.values[6]

    @property
    def decoupled(self) -> bool:
        return self.values[7] != 0.0


def group_hyper(group: dict, kind: str, bias_correction: bool) -> GroupHyper:
    """One param group's hyper-parameters as the kernels read them.

    Re-read on every step (schedulers write ``group["lr"]``) and re-checked against
    torch.optim's constructor bounds, so a value changed by hand after construction
    steps as torch would or fails clearly. Tensor lr/betas are read by the kernel where
    they live (no host sync, CUDA-graph replays see in-place updates).
    """
    lr = group["lr"]
    beta1, beta2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    _check_group(lr, (beta1, beta2), eps, wd)
    values, pointers = [], []
    for value in (lr, beta1, beta2):
        if isinstance(value, Tensor):
            values.append(0.0)  # the kernel reads the tensor
            pointers += [value.data_ptr(), int(value.dtype == torch.float64)]
        else:
            values.append(float(value))
            pointers += [0, 0]
    decoupled = kind != "adamax" and bool(group.get("decoupled_weight_decay", False))
    values += [
        # 1 - beta in double, as torch.optim computes it from Python floats.
        1.0 - values[1], 1.0 - values[2], float(eps), float(wd), float(decoupled),
        -1.0 if group.get("maximize", False) else 1.0, float(bias_correction),
    ]
    return GroupHyper(tuple(values), tuple(pointers), isinstance(lr, Tensor),
                      isinstance(beta1, Tensor))


def _check_group(lr, betas, eps, weight_decay) -> None:
    """torch.optim's checks, in its order and with its messages."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    elif not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i in (0, 1):
        if isinstance(betas[i], Tensor):
            if betas[i].numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        elif not 0.0 <= betas[i] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


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


def _local_alias(t: Tensor | None) -> Tensor | None:
    """A new tensor object over ``t``'s memory (its local shard for a DTensor): it keeps
    that memory alive even if ``t.data`` is later replaced."""
    return None if t is None else _as_real(local_tensor(t)).detach()


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
        self._numels = list(map(Tensor.numel, grads))
        self._devices = list(map(Tensor.get_device, grads))
        self._guards = None
        if grads and all(map(Tensor.is_contiguous, grads)):
            try:
                from torch._C._dynamo.guards import TensorGuards

                self._guards = TensorGuards(
                    *grads, dynamic_dims_sizes=[list(g.shape) for g in grads],
                    dynamic_dims_strides=[list(g.stride()) for g in grads],
                )
            except Exception:  # absent or changed in this torch: the passes below do it
                self._guards = None

    def same(self, grads: list[Tensor]) -> bool:
        if self._guards is not None and self._guards.check(*grads):
            return True
        return (
            list(map(_DTYPE, grads)) == self._dtypes
            and list(map(Tensor.numel, grads)) == self._numels
            and list(map(Tensor.get_device, grads)) == self._devices
            and all(map(Tensor.is_contiguous, grads))
        )


@dataclass
class _Launch:
    bucket: Bucket
    groups: list[int]  # param groups with tensors in this bucket
    config: LaunchConfig | None = None
    wanted: tuple | None = None


@dataclass
class _Device:
    tables: DeviceTables
    launches: list[_Launch] = field(default_factory=list)
    norm_plan: NormPlan | None = None  # built on the first clip


class StepCache:
    """Device tables and per-step checks for one optimizer's tensors."""

    def __init__(self, kind: str, rows: list[Row], group_lists: list[list], inactive: list[Tensor],
                 state: dict, layout: tuple) -> None:
        self.kind = kind
        # The optimizer's options that decide which state a param steps with.
        self.layout = layout
        # What the tables were built from, compared on every step.
        self._group_lens = [len(params) for params in group_lists]
        self._all_params = [p for params in group_lists for p in params]
        self._state = state
        # State edited between steps: a per-param dict replaced (identity), an entry
        # replaced in one (its version), or the moments moved under the same tensor
        # objects (``t.data = t.data.to(...)``, as state-offloading code does: each row's
        # exp_avg pointer stands for its state).
        self._state_values = list(state.values())
        self._state_version = _dict_version(state) if _dict_version is not None else None
        self._state_versions = self._versions(self._state_values)
        self._moments = [local_tensor(r.exp_avg) for r in rows]
        self._moment_ptrs = list(map(Tensor.data_ptr, self._moments))
        self._inactive = inactive
        fast = [r for r in rows if not r.general]
        self._general = [r for r in rows if r.general]
        self._fast_params = [r.param for r in fast]
        kinds = {local_tensor(p) is not p for p in self._fast_params}
        self._dtensor = True in kinds
        self._all_dtensor = kinds == {True}
        locals_ = [local_tensor(r.param) for r in fast]
        self._param_ptrs = list(map(Tensor.data_ptr, locals_))
        grads = [r.grad for r in fast]
        self._grad_meta = _GradMeta(grads)
        self._empty = [i for i, g in enumerate(grads) if g.numel() == 0]
        # Table order: fast rows first (their grad pointers come from the C-level pass),
        # then general ones; within a device, rows are sorted into buckets.
        self._order = fast + self._general
        self._params = [r.param for r in self._order]
        # The tables hold raw pointers: keep what they point at alive, param storages
        # included (a detached alias survives ``p.data = ...``, so a stale row never
        # writes freed memory; the next check sees the new pointer and rebuilds).
        self._keep = [(self._kernel_param(r).detach(), _local_alias(r.exp_avg), _local_alias(r.second),
                       _local_alias(r.max_second), _local_alias(r.master), _local_alias(r.step),
                       r.staging) for r in self._order]
        self._hyper_staging: dict = {}
        self._devices: dict[torch.device, _Device] = {}
        # Per device: the positions in self._order of its table rows (None: all, in order).
        self._rows_of: dict[torch.device, np.ndarray | None] = {}
        self._build_tables(len(group_lists))
        self._grad_ptrs = self._pointers_of([r.grad for r in self._order])
        self._uploaded: list[int] | None = None
        self._norm_reduction = None  # (mesh, process groups), found on the first clip
        self.has_complex = any(p.is_complex() for p in self._params)

    # ---- building -------------------------------------------------------------------

    def _kernel_param(self, row: Row) -> Tensor:
        return row.staging if row.staging is not None else _as_real(local_tensor(row.param))

    def _build_tables(self, num_groups: int) -> None:
        by_device: dict[torch.device, dict[BucketKey, list[int]]] = {}
        for i, row in enumerate(self._order):
            p = self._kernel_param(row)
            g = _as_real(row.grad)
            state_dtype = _as_real(local_tensor(row.exp_avg)).dtype
            key = BucketKey(p.dtype, g.dtype, row.max_second is not None, row.master_kind,
                            state_dtype, row.stochastic_rounding)
            by_device.setdefault(p.device, {}).setdefault(key, []).append(i)
        for device, buckets in by_device.items():
            order = [i for idx in buckets.values() for i in idx]
            table_rows = []
            for i in order:
                r = self._order[i]
                table_rows.append(DeviceTables.row(
                    self._kernel_param(r), _as_real(local_tensor(r.exp_avg)),
                    _as_real(local_tensor(r.second)),
                    _as_real(local_tensor(r.max_second)) if r.max_second is not None else None,
                    local_tensor(r.master) if r.master is not None else None, local_tensor(r.step),
                    r.key,
                ))
            tables = DeviceTables(device, table_rows, [self._order[i].group for i in order], num_groups)
            dev = _Device(tables)
            lo = 0
            for key, idx in buckets.items():
                numels = [table_rows[lo + j][5] for j in range(len(idx))]
                bucket = Bucket(key, device, lo, np.asarray(numels, dtype=np.int64))
                dev.launches.append(_Launch(bucket, sorted({self._order[i].group for i in idx})))
                lo += len(idx)
            self._devices[device] = dev
            same = order == list(range(len(self._order)))
            self._rows_of[device] = None if same else np.asarray(order, dtype=np.int64)

    @staticmethod
    def _pointers_of(grads: list[Tensor]) -> list[int]:
        return list(map(Tensor.data_ptr, grads))

    # ---- the per-step check ---------------------------------------------------------

    def check(self, param_groups: list[dict], state: dict, layout: tuple) -> list[int] | None:
        """This step's grad pointers (table order, fast rows) if the cache still applies.

        None when anything differs from what the tables were built from: the param set,
        the state dicts, a grad gone or appeared, a param's storage or layout, a grad's
        dtype, size, device, layout or storage (a null pointer). The optimizer then
        validates everything afresh.
        """
        lists = [g["params"] for g in param_groups]
        params = self._fast_params
        if (
            layout != self.layout
            or state is not self._state
            or not self._same_state_dicts(state)
            or self._versions(self._state_values) != self._state_versions
            or list(map(Tensor.data_ptr, self._moments)) != self._moment_ptrs
            or list(map(len, lists)) != self._group_lens
            or not all(map(operator.is_, chain.from_iterable(lists), self._all_params))
            or any(map(operator.is_not, map(_GRAD, self._inactive), repeat(None)))
        ):
            return None
        grads = list(map(_GRAD, params))
        try:
            if self._all_dtensor:
                grads = list(map(_LOCAL, grads))
                locals_ = list(map(_LOCAL, params))
            elif self._dtensor:
                grads = list(map(local_tensor, grads))
                locals_ = list(map(local_tensor, params))
            else:
                locals_ = params
            ptrs = list(map(Tensor.data_ptr, grads))
        except (AttributeError, RuntimeError, TypeError):  # a None or sparse grad
            return None
        # A param's layout changed under the same storage (a view assigned to .data)
        # shows in its grads' layout: autograd lays grads out like their params.
        if list(map(Tensor.data_ptr, locals_)) != self._param_ptrs or not self._grad_meta.same(grads):
            return None
        if 0 in ptrs and [i for i, ptr in enumerate(ptrs) if ptr == 0] != [
            i for i in self._empty if ptrs[i] == 0
        ]:
            return None  # a freed storage (null pointer) under a non-empty grad
        return ptrs

    def _same_state_dicts(self, state: dict) -> bool:
        if self._state_version is not None:  # any entry set, popped or cleared changes it
            return _dict_version(state) == self._state_version
        return len(state) == len(self._state_values) and all(
            map(operator.is_, state.values(), self._state_values))

    @staticmethod
    def _versions(dicts: list) -> list | None:
        if _dict_version is not None:
            return list(map(_dict_version, dicts))
        # Without version tags: the dicts' values by identity (slower, same answer).
        return list(map(id, chain.from_iterable(map(dict.values, dicts))))

    @property
    def general_rows(self) -> list[Row]:
        return self._general

    @property
    def empty(self) -> bool:
        return not self._order

    def fast_grad_ptrs(self) -> list[int]:
        """The fast rows' grad pointers the cache was built with."""
        return self._grad_ptrs[: len(self._fast_params)]

    @property
    def params(self) -> list[Tensor]:
        """Every param the step launches on (the ones with grads), in table order."""
        return self._params

    # ---- gradient norm ----------------------------------------------------------------

    @property
    def norm_device(self) -> torch.device:
        if len(self._devices) != 1:
            raise NotImplementedError(
                f"clip_grad_norm_ over params on several devices ({', '.join(map(str, self._devices))}) "
                "is not supported; use torch.nn.utils.clip_grad_norm_, or one optimizer per device"
            )
        return next(iter(self._devices))

    @property
    def norm_dtype(self) -> torch.dtype:
        """fp32, or fp64 if any grad is fp64: what torch's total norm promotes to, except
        that fp16/bf16 grads get an fp32 norm here (torch returns theirs in fp16/bf16)."""
        wide = any(item.bucket.grad_dtype == torch.float64
                   for dev in self._devices.values() for item in dev.launches)
        return torch.float64 if wide else torch.float32

    @property
    def norm_mesh(self):
        """The DTensor mesh the grads live on, or None for plain tensors."""
        return self._reduction()[0]

    def _reduction(self):
        if self._norm_reduction is None:
            self._norm_reduction = norm_reduction(self.params)
        return self._norm_reduction

    def grad_norm(self, fast_grad_ptrs: list[int], general_grads: list[Tensor], clip: Tensor,
                  out: Tensor, *, norm_type: float, grad_scale=None, compound=False,
                  check_finite=False) -> None:
        """Measure the grads the next step reads: their total norm into ``out`` and the clip
        coefficient into the clip buffer ``clip`` (whose max_norm and order are set).

        One norm launch per grad dtype and one reduction launch; for DTensor grads sharded
        over a mesh, the reduction is split around an all-reduce of this rank's partial
        total (every rank must call this, empty shards included, as for any collective).
        """
        device = self.norm_device
        dev = self._devices[device]
        _, groups = self._reduction()
        if dev.norm_plan is None:
            block_size, num_warps = norm_config()
            dev.norm_plan = NormPlan(device, [item.bucket for item in dev.launches], block_size=block_size,
                                     num_warps=num_warps, max_chunks=norm_max_chunks())
        plan = dev.norm_plan
        kind = norm_kind(norm_type)
        flags = dict(norm=kind, grad_scale=_on(device, grad_scale), compound=compound,
                     check_finite=check_finite)
        with device_guard(device):
            self._set_grads(fast_grad_ptrs, general_grads)
            launch_norm(dev.tables, plan, clip, norm=kind)
            if not groups:
                launch_norm_reduce(plan, clip, out, reduce=True, finalize=True, **flags)
                return
            import torch.distributed as dist

            launch_norm_reduce(plan, clip, None, norm=kind, reduce=True, finalize=False)
            op = dist.ReduceOp.MAX if norm_type == float("inf") else dist.ReduceOp.SUM
            for group in groups:
                dist.all_reduce(plan.total, op=op, group=group)
            launch_norm_reduce(plan, clip, out, reduce=False, finalize=True, **flags)

    # ---- launching ------------------------------------------------------------------

    def _set_grads(self, fast_grad_ptrs: list[int], general_grads: list[Tensor]) -> None:
        """Point every device's tables at this step's grads."""
        ptrs = fast_grad_ptrs + self._pointers_of(general_grads) if general_grads else fast_grad_ptrs
        # The caching allocator mostly hands grads the same addresses step after step:
        # compare as a list (C level) and touch numpy and the device only on change.
        if ptrs == self._uploaded:
            return
        host = np.fromiter(ptrs, dtype=np.int64, count=len(ptrs))
        for device, dev in self._devices.items():
            rows = self._rows_of[device]
            with device_guard(device):
                dev.tables.set_grad_ptrs(host if rows is None else host[rows])
        self._uploaded = ptrs

    def launch(self, fast_grad_ptrs: list[int], general_grads: list[Tensor], param_groups: list[dict],
               hypers: list[GroupHyper], *, block_size=None, num_warps=None, autotune_mode=None,
               persistent=None, grad_scale=None, found_inf=None, clip=None) -> None:
        """Step every tensor: one prepare launch per device, one update launch per bucket.

        ``general_grads``: this step's validated grads of the general rows, in order;
        ``hypers``: every group's checked values (``group_hyper``); ``clip``: the clip
        buffer whose coefficient scales every grad (see ``grad_norm``), or None.
        """
        values = tuple(v for h in hypers for v in h.values)
        pointers = tuple(p for h in hypers for p in h.pointers)
        lr_tensors = any(h.lr_tensor for h in hypers)
        beta_tensors = any(h.beta_tensors for h in hypers)
        self._set_grads(fast_grad_ptrs, general_grads)
        for row in self._general:
            if row.staging is not None:
                row.staging.copy_(_as_real(local_tensor(row.param)))
        wanted = (block_size, num_warps, autotune_mode, persistent)
        for device, dev in self._devices.items():
            tables = dev.tables
            with device_guard(device):
                tables.set_groups(values, self._device_pointers(device, param_groups, pointers))
                scale = _on(device, grad_scale)
                inf = _on(device, found_inf)
                launch_prepare(tables, grad_scale=scale, found_inf=inf, clip=clip,
                               lr_tensors=lr_tensors, beta_tensors=beta_tensors)
                for item in dev.launches:
                    if item.config is None or item.wanted != wanted:
                        item.config = self._config(item.bucket, param_groups, *wanted)
                        item.wanted = wanted
                    decoupled = coupled = False
                    for gi in item.groups:
                        h = hypers[gi]
                        if h.weight_decay != 0.0:
                            decoupled |= h.decoupled
                            coupled |= not h.decoupled
                    launch_update(tables, item.bucket, block_size=item.config.block_size,
                                  num_warps=item.config.num_warps, persistent=item.config.persistent,
                                  adamax=self.kind == "adamax", decoupled_wd=decoupled,
                                  coupled_wd=coupled, found_inf=inf)
        for row in self._general:
            if row.staging is not None:
                _as_real(local_tensor(row.param)).copy_(row.staging)

    def _device_pointers(self, device, param_groups, pointers) -> tuple:
        """Tensor hyper-parameters are read in place only where they live on ``device``;
        elsewhere their value is read once here (a CPU scalar: no GPU sync)."""
        if not any(pointers):
            return pointers
        out = list(pointers)
        for gi, group in enumerate(param_groups):
            for j, value in enumerate((group["lr"], *group["betas"])):
                if isinstance(value, Tensor) and (
                    value.device != device or value.dtype not in (torch.float32, torch.float64)
                ):
                    # Rare: a staging copy next to the tables, refreshed each step.
                    staged = self._staged_hyper(device, gi, j)
                    staged.copy_(value.reshape(()), non_blocking=True)
                    out[6 * gi + 2 * j] = staged.data_ptr()
                    out[6 * gi + 2 * j + 1] = 1
        return tuple(out)

    def _staged_hyper(self, device, gi: int, j: int) -> Tensor:
        key = (device, gi, j)
        if key not in self._hyper_staging:
            self._hyper_staging[key] = torch.zeros((), dtype=torch.float64, device=device)
        return self._hyper_staging[key]

    def _config(self, bucket: Bucket, param_groups, block_size, num_warps, autotune_mode,
                persistent) -> LaunchConfig:
        if block_size is not None and num_warps is not None:
            return LaunchConfig(block_size, num_warps, bool(persistent))
        decoupled = any(g.get("decoupled_weight_decay", False) for g in param_groups)
        optimizer = "adamax" if self.kind == "adamax" else ("adamw" if decoupled else "adam")
        master = {int(MASTER_FP32): True, int(MASTER_REMAINDER): "remainder"}.get(bucket.master, False)
        setup = dict(optimizer=optimizer, param_dtype=bucket.param_dtype, grad_dtype=bucket.grad_dtype,
                     amsgrad=bucket.amsgrad, master_weights=master, state_dtype=bucket.state_dtype,
                     stochastic_rounding=bucket.stochastic_rounding)
        numels = [int(n) for n in bucket.numels]

        def make_runner(config: LaunchConfig, numel: int) -> Callable[[], None]:
            return make_scratch_runner(**setup, config=config, numels=scaled_mix(numels, numel),
                                       device=bucket.device)

        extra = {"mode": autotune_mode} if autotune_mode is not None else {}
        chosen = autotune.select_config(
            autotune_key(**setup), sum(numels), bucket.device, make_runner,
            bytes_per_elem=bytes_per_elem(**setup), **extra,
        )
        return LaunchConfig(
            block_size if block_size is not None else chosen.block_size,
            num_warps if num_warps is not None else chosen.num_warps,
            chosen.persistent if persistent is None else persistent,
        )


def _on(device: torch.device, t: Tensor | None) -> Tensor | None:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)
