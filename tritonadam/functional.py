"""Group tensors into launch buckets, keep their device tables, launch the kernels.

``build_cache`` / ``StepCache.run`` are what the optimizer classes use; ``adam`` and
``adamax`` are stateless functional forms in the style of ``torch.optim.adam.adam``.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import autotune
from .autotune import LaunchConfig
from .kernels import Hyper, autotune_key, build_bucket, bytes_per_elem, launch, make_scratch_runner

__all__ = ["StepCache", "build_cache", "make_scratch_runner", "adam", "adamax", "local_tensor"]

try:  # torch.distributed may be absent from some builds
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover
    DTensor = None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel can address: a DTensor's local shard (FSDP2), else t itself."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor
    return t


class StepCache:
    """What one param group's step reuses while its tensors stay put.

    Holds the launch buckets (device tables point at these tensors, so the cache also
    keeps them alive: a freed and reused storage can never be written through a stale
    pointer) and what the optimizer checks each step to know the cache still applies.
    """

    def __init__(self, entries: list, keep: tuple) -> None:
        self.entries = entries  # [bucket, positions in the active list or None, config, key]
        self._keep = keep
        # Filled by the optimizer: see Optimizer._fast_grad_ptrs.
        self.generation = None
        self.params_list = None
        self.n_params = 0
        self.active: list[int] | None = None
        self.inactive: list[int] = []
        self.param_ptrs: list[int] = []
        self.grad_dtypes: list = []
        self.dtensor = False
        self.fast = False
        # (param, contiguous buffer) for non-dense params: the kernel steps the buffer.
        self.staged: list = []

    def run(
        self,
        kind: str,
        grad_ptrs: list[int],
        hyper: Hyper,
        *,
        block_size: int | None = None,
        num_warps: int | None = None,
        autotune_mode: str | None = None,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
        persistent: bool | None = None,
    ) -> None:
        wanted = (block_size, num_warps, autotune_mode, persistent)
        for entry in self.entries:
            bucket, idx, config, config_key = entry
            bucket.set_grad_ptrs(grad_ptrs if idx is None else [grad_ptrs[i] for i in idx])
            if config is None or config_key != wanted:
                config = _fixed_or_tuned(kind, bucket, hyper, *wanted)
                entry[2], entry[3] = config, wanted
            launch(kind, bucket, hyper, block_size=config.block_size, num_warps=config.num_warps,
                   grad_scale=grad_scale, found_inf=found_inf, persistent=config.persistent)


def build_cache(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    second: list[torch.Tensor],
    max_second: list[torch.Tensor] | None,
    masters: list[torch.Tensor | None],
    steps: list[torch.Tensor],
) -> StepCache:
    """Buckets over validated local tensors (no DTensors): one per (device, param dtype,
    grad dtype, master) combination, each stepped by one launch."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        groups.setdefault((p.device, p.dtype, g.dtype, masters[i] is not None), []).append(i)
    entries = []
    for (_, _, g_dtype, has_master), idx in groups.items():
        bucket = build_bucket(
            [params[i] for i in idx],
            [exp_avgs[i] for i in idx],
            [second[i] for i in idx],
            [max_second[i] for i in idx] if max_second is not None else None,
            [masters[i] for i in idx] if has_master else None,
            [steps[i] for i in idx],
            g_dtype,
        )
        entries.append([bucket, None if len(groups) == 1 else idx, None, None])
    return StepCache(entries, (params, exp_avgs, second, max_second, masters, steps))


def _fixed_or_tuned(kind, bucket, hyper, block_size, num_warps, autotune_mode,
                    persistent=None) -> LaunchConfig:
    if block_size is not None and num_warps is not None:
        return LaunchConfig(block_size, num_warps, bool(persistent))
    optimizer = "adamax" if kind == "adamax" else ("adamw" if hyper.decoupled_weight_decay else "adam")
    setup = dict(optimizer=optimizer, param_dtype=bucket.param_dtype, grad_dtype=bucket.grad_dtype,
                 amsgrad=bucket.amsgrad, master_weights=bucket.master)

    def make_runner(config: LaunchConfig, numel: int) -> Callable[[], None]:
        return make_scratch_runner(**setup, config=config, numel=numel, device=bucket.device,
                                   hyper=hyper)

    extra = {"mode": autotune_mode} if autotune_mode is not None else {}
    chosen = autotune.select_config(
        autotune_key(**setup), bucket.numel, bucket.device, make_runner,
        bytes_per_elem=bytes_per_elem(**setup), allow_persistent=True, **extra,
    )
    # What the user fixed wins; the rest comes from the choice.
    return LaunchConfig(
        block_size if block_size is not None else chosen.block_size,
        num_warps if num_warps is not None else chosen.num_warps,
        chosen.persistent if persistent is None else persistent,
    )


def _functional(kind, params, grads, exp_avgs, second, max_second, state_steps, masters,
                hyper, block_size, num_warps, grad_scale, found_inf):
    local = [local_tensor(t) for t in params]
    local_grads = [local_tensor(g) for g in grads]
    cache = build_cache(
        local, local_grads,
        [local_tensor(t) for t in exp_avgs], [local_tensor(t) for t in second],
        [local_tensor(t) for t in max_second] if max_second is not None else None,
        [local_tensor(t) if t is not None else None for t in masters]
        if masters is not None else [None] * len(local),
        list(state_steps),
    )
    cache.run(kind, [g.data_ptr() for g in local_grads], hyper, block_size=block_size,
              num_warps=num_warps, grad_scale=grad_scale, found_inf=found_inf)


def adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None,
    state_steps: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    bias_correction: bool = True,
    master_params: list[torch.Tensor | None] | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Functional Adam/AdamW step, in place, like ``torch.optim.adam.adam``.

    ``state_steps`` are 0-dim float32 tensors on the params' device; state tensors are
    fp32 (fp64 for fp64 params) with the params' layout. Inputs are not validated here:
    the optimizer classes do that.
    """
    hyper = Hyper(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize,
                  bias_correction)
    _functional("adam", params, grads, exp_avgs, exp_avg_sqs,
                max_exp_avg_sqs if amsgrad else None, state_steps, master_params,
                hyper, block_size, num_warps, grad_scale, found_inf)


def adamax(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_infs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    bias_correction: bool = True,
    master_params: list[torch.Tensor | None] | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Functional AdaMax step, in place, like ``torch.optim.adamax.adamax``."""
    hyper = Hyper(lr, beta1, beta2, eps, weight_decay, False, maximize, bias_correction)
    _functional("adamax", params, grads, exp_avgs, exp_infs, None, state_steps,
                master_params, hyper, block_size, num_warps, grad_scale, found_inf)
