"""Gathering a step's tensors: each param with a grad, validated with its state, then
state created or converted and the rows of a new step cache built.

Runs when the step cache no longer applies (first step, params or state changed, a bad
grad): everything is checked before anything is written, so an error leaves every param
and state as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import host, validate
from .kernels.plan import rounding_key
from .state import SEED_KEY, WRITTEN_KEYS, StatePolicy, moment_keys, new_step_dtype
from .step_cache import Row, StepCache, param_meta
from .tensors import as_real, check_no_shared_memory, is_dense, local_tensor, split_dim

__all__ = ["Gathered", "build", "init_group"]


@dataclass
class Gathered:
    """What a full gathering found, group by group; nothing written yet."""

    # (param, grad to step with, group index, whether its state must be prepared)
    pending: list = field(default_factory=list)
    inactive: list = field(default_factory=list)  # params without grads
    meta: list = field(default_factory=list)  # (param, group index): stepped shape-only
    # (param, grad, group index, whether its state must be prepared): CPU params stepped
    # by torch.optim's implementation where the kernels run on a GPU (tritonadam.host)
    host: list = field(default_factory=list)
    seen: dict = field(default_factory=dict)  # id(param) -> its group
    # False for a clip's gathering, which reads grads alone: what only a write needs
    # (params not inference tensors) is left to the step's check.
    for_step: bool = True


def init_group(name: str, algorithm: str, policy: StatePolicy, state: dict, index: int, group: dict,
               gathered: Gathered) -> None:
    """torch's per-group gather: validate each param with a grad and its state."""
    keys = moment_keys(algorithm, group.get("amsgrad", False))
    for p in group["params"]:
        if gathered.seen.setdefault(id(p), index) != index:
            # torch's add_param_group error, for params added to groups by hand
            raise ValueError("some parameters appear in more than one parameter group")
        if p.grad is None:
            gathered.inactive.append(p)
            continue
        policy.check_param(p, name)
        if local_tensor(p).is_meta and group.get("capturable") and not group.get("fused"):
            # torch.optim refuses these too (its capturable step asserts supported devices);
            # a meta count in a capturable group could never be read back or counted.
            raise RuntimeError(
                f"tritonadam.{name}: a param of shape {tuple(p.shape)} is on the meta device in "
                "a group with capturable=True, which steps on GPUs only; dry-run meta params in "
                "a group with capturable=False")
        if local_tensor(p).is_meta and not group.get("fused"):
            # torch.optim steps meta params shape-only (model-size dry runs): state
            # tensors on meta, nothing launched. With fused=True it refuses them, and so
            # does check_grad below, in torch's words. State of another device under a
            # meta param (a stepped param swapped onto meta) is refused as torch refuses it.
            _check_meta_state(name, p, state.get(p))
            gathered.meta.append((p, index))
            continue
        grad = validate.check_grad(name, p, p.grad, group.get("fused"))
        if gathered.for_step and local_tensor(p).is_inference() and not torch.is_inference_mode_enabled():
            # torch.optim's in-place ops raise this at the step; the kernels would write it
            # regardless, and a non-dense one's copy back would fail after the launch.
            raise RuntimeError(
                f"tritonadam.{name}: a param of shape {tuple(p.shape)} is an inference tensor "
                "(made under torch.inference_mode()), which cannot be updated in place outside "
                "it (torch.optim raises \"Inplace update to inference tensor outside "
                "InferenceMode\"); make the model outside inference_mode, or replace the param "
                "with a clone made outside it")
        fmt = policy.format(p)
        convert = fmt.check(p, state.get(p, {}), keys, name)
        if validate.host_stepped(p):
            host.check_format(name, fmt, p)
            gathered.host.append((p, grad, index, convert))
        else:
            gathered.pending.append((p, grad, index, convert))


def _check_meta_state(name: str, p: Tensor, state) -> None:
    if not isinstance(state, dict):
        return
    for key, value in state.items():
        if isinstance(value, Tensor) and value.dim() > 0 and not local_tensor(value).is_meta:
            raise RuntimeError(
                f"tritonadam.{name}: a param of shape {tuple(p.shape)} is on the meta device, "
                f"but its state[{key!r}] is on {value.device}; move the param back, or clear "
                "its state (`opt.state.pop(param)`) to restart it")


def build(name: str, algorithm: str, policy: StatePolicy, seed: int | None, param_groups: list[dict],
          state: dict, gathered: Gathered, options: tuple) -> StepCache:
    """Create missing state, convert what other formats left, and build the step cache."""
    pending = gathered.pending + gathered.host
    if len({id(p) for p, *_ in pending}) != len(pending):
        raise ValueError(
            f"tritonadam.{name}: a parameter appears more than once in a param group (torch.optim "
            "warns that this will become an error; one launch cannot update a tensor twice); list "
            "each parameter once, e.g. `model.parameters()`, which lists a tied weight once "
            "where per-module lists hold it under each module"
        )
    # Entries of the user's in a param's state (a wrapper's buffer, shared or not) are no
    # launch's business, as they are none of torch.optim's.
    check_no_shared_memory(name, [(p, {k: v for k, v in state.get(p, {}).items() if k in WRITTEN_KEYS})
                                  for p, *_ in pending])
    for p, index in gathered.meta:
        if not state.get(p):
            keys = moment_keys(algorithm, param_groups[index].get("amsgrad", False))
            policy.format(p).prepare(p, state[p], keys, seed, new_step_dtype(param_groups[index]))
    # A tensor's random stream: its index in the optimizer (as in state_dict), and for a
    # DTensor its shard, so shards of one param draw different numbers and its replicas
    # (HSDP, a tensor-parallel bias) the same ones.
    index_of = {id(p): i for i, p in enumerate(p for g in param_groups for p in g["params"])}
    host_rows = []
    for p, grad, index, convert in gathered.host:
        keys = moment_keys(algorithm, bool(param_groups[index].get("amsgrad", False)))
        fmt = policy.format(p)
        if convert:
            fmt.prepare(p, state[p], keys, seed, new_step_dtype(param_groups[index]))
        host_rows.append(host.HostRow(p, grad, index, state[p], fmt, keys))
    rows = []
    for p, grad, index, convert in gathered.pending:
        group = param_groups[index]
        amsgrad = bool(group.get("amsgrad", False))
        keys = moment_keys(algorithm, amsgrad)
        fmt = policy.format(p)
        if convert:
            fmt.prepare(p, state[p], keys, seed, new_step_dtype(group))
        stream = index_of[id(p)] ^ (_shard_id(p) * 0x27D4EB2F & 0xFFFFFFFF)
        # The param's own seed (prepare keeps it): state written in by hand (as
        # ZeroRedundancyOptimizer loads its shards) resumes the numbers it was drawn with.
        rows.append(_row(p, grad, index, state[p], fmt, keys, amsgrad,
                         rounding_key(int(state[p][SEED_KEY]), stream) if fmt.stochastic else 0))
    lists = [g["params"] for g in param_groups]
    return StepCache(name, algorithm, rows, lists, gathered.inactive, state, options, host_rows,
                     meta=[p for p, _ in gathered.meta])


def _row(p: Tensor, grad: Tensor, index: int, state: dict, fmt, keys, amsgrad: bool, key: int) -> Row:
    lp = local_tensor(p)
    # Non-dense params are stepped in a contiguous staging copy (of the real view).
    real = as_real(lp)
    staging = None if is_dense(lp) else torch.empty(real.shape, dtype=real.dtype, device=real.device)
    revalidated = (staging is not None or not lp.is_contiguous() or grad is not local_tensor(p.grad)
                   or not grad.is_contiguous())
    moments, master = fmt.tensors(state, keys)
    data = tuple(m[0] for m in moments) + (None,) * (3 - len(moments))
    scales = tuple(m[1] for m in moments) + (None,) * (3 - len(moments))
    kernel_param = staging if staging is not None else real
    return Row(
        param=p, grad=grad, group=index,
        key=fmt.bucket_key(kernel_param.dtype, as_real(grad).dtype, amsgrad),
        moments=data, scales=scales, step=state["step"], master=master, rounding_key=key, revalidated=revalidated, staging=staging,
        param_meta=param_meta(lp),
    )


def _shard_id(p: Tensor) -> int:
    """Which shard of ``p`` this rank holds: its coordinates along the mesh dims that
    shard it (replicating dims left out), 0 for a plain tensor."""
    if local_tensor(p) is p:
        return 0
    mesh = p.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:  # not in the mesh
        return 0
    shard = 0
    for dim, placement in enumerate(p.placements):
        if split_dim(placement) is not None:
            shard = shard * mesh.size(dim) + coord[dim]
    return shard
