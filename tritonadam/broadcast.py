"""Full optimizer state dicts loaded through torch's ``set_optimizer_state_dict``.

Seeds: torch's full-state-dict load fails on a 0-dim entry (``rounding_seed``) that the
receiving optimizer's own state dict, its template, lacks; inside that load the template
gets stand-ins (``seed_stand_ins``), which ``load_state_dict`` drops again.

Broadcast from rank 0:

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

import torch
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


# A stand-in ``rounding_seed`` (see ``seed_stand_ins``): one object, recognized by identity.
NO_SEED = torch.tensor(-1, dtype=torch.int64, device="cpu")


def building_full_load_template(depth: int = 8) -> bool:
    """Whether torch's ``set_optimizer_state_dict`` is asking for this optimizer's state
    dict as the template of a full state dict's load (its full branch alone asks)."""
    frame, asker = sys._getframe(1), None
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return False
        if _in_torch_state_dict(frame):  # decorators' frames lie between torch's own
            if asker is not None:
                return frame.f_code.co_name == "_load_optim_state_dict"
            if frame.f_code.co_name != "_get_optim_state_dict":
                return False
            asker = frame
    return False


def _in_torch_state_dict(frame) -> bool:
    return frame.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict"


def seed_stand_ins(state: dict, key: str) -> dict:
    """``state`` (a state dict's ``"state"``) with a stand-in ``key`` in every param entry
    that has none. torch's full-state-dict load copies each 0-dim tensor of the incoming
    state into the template (``_distribute_state_dict``) and then rebuilds the template's
    keys alone: an incoming seed the template lacks (a checkpoint with stochastic rounding
    into an optimizer without it) raised KeyError inside torch. Stand-ins the load does not
    overwrite arrive at ``load_state_dict``, which drops them (``without_stand_ins``)."""
    return {i: {**entry, key: NO_SEED} if isinstance(entry, dict) and key not in entry else entry
            for i, entry in state.items()}


def without_stand_ins(state_dict: dict, key: str) -> dict:
    """``state_dict`` without the stand-ins ``seed_stand_ins`` put in (by identity)."""
    state = state_dict.get("state")
    if not isinstance(state, dict) or not any(
            isinstance(e, dict) and e.get(key) is NO_SEED for e in state.values()):
        return state_dict
    return {**state_dict, "state": {i: {k: v for k, v in e.items() if not (k == key and v is NO_SEED)}
                                    if isinstance(e, dict) else e for i, e in state.items()}}


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
