"""Full optimizer state dicts broadcast from rank 0.

``set_optimizer_state_dict(..., StateDictOptions(full_state_dict=True,
broadcast_from_rank0=True))`` gives only rank 0 the checkpoint; torch broadcasts to the
other ranks just the keys their optimizer holds. A checkpoint of other state options
(torch.optim's fp32 moments into 8-bit state, an fp32 master into a remainder, ...)
brings keys the receiver does not hold: rank 0 would load them and every other rank
keep its freshly initialized state, and the replicas drift apart without an error.
Inside that call (and only there: every rank is in it, so a collective is safe) rank 0
sends those keys to the others, who then load what rank 0 loads.
"""
from __future__ import annotations

import sys

from torch import Tensor

from .tensors import local_tensor


def broadcasting_from_rank0(depth: int = 8) -> bool:
    """Whether torch's ``set_optimizer_state_dict`` is loading a full state dict that only
    rank 0 was given (not through FSDP1, whose load gathers on its own). Nothing in the
    state dict says so: the caller's frame does."""
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "_load_optim_state_dict" and frame.f_globals.get("__name__") == \
                "torch.distributed.checkpoint.state_dict":
            info = frame.f_locals.get("info")
            return bool(getattr(info, "full_state_dict", False) and getattr(info, "broadcast_from_rank0", False)
                        and not getattr(info, "fsdp_modules", None))
    return False


def share_rank0_entries(state_dict: dict, own_keys, error: Exception | None) -> tuple[dict, Exception | None]:
    """``state_dict`` with the param state entries rank 0 holds beyond ``own_keys(saved_id)``
    (the keys this optimizer's own state dict has for that param, the same on every rank),
    and rank 0's ``error`` (a state dict rank 0 refused is refused everywhere). Collective
    over the default group, as torch's broadcast before it: call it on every rank."""
    import torch.distributed as dist

    rank = dist.get_rank()
    payload = None
    if rank == 0:
        extra = {}
        if error is None:
            for saved_id, entry in state_dict["state"].items():
                if not isinstance(entry, dict):
                    continue
                own = own_keys(saved_id)
                foreign = {k: _portable(v) for k, v in entry.items()
                           if k not in own and not (isinstance(v, Tensor) and local_tensor(v) is not v)}
                if foreign:
                    extra[saved_id] = foreign
        payload = (extra, error)
    box = [payload]
    dist.broadcast_object_list(box, src=0)
    extra, rank0_error = box[0]
    if rank0_error is not None:
        return state_dict, rank0_error
    if rank == 0 or not extra:
        return state_dict, error
    state = dict(state_dict["state"])
    for saved_id, foreign in extra.items():
        entry = state.get(saved_id)
        state[saved_id] = {**(entry if isinstance(entry, dict) else {}), **foreign}
    return {**state_dict, "state": state}, error


def _portable(value):
    """A state value as it can be pickled to another rank: tensors on the CPU (a CUDA
    tensor would unpickle onto rank 0's device index). Only whole tensors are sent (a
    full state dict's): a shard is rank 0's alone."""
    return value.detach().cpu() if isinstance(value, Tensor) else value
