"""Master copies of fp16/bf16 params: the fp32 copy, and its 2-byte remainder form."""
from __future__ import annotations

import torch
from torch import Tensor

from ..tensors import local_tensor
from .entries import MASTER_KEY, REMAINDER_KEY


def master_follows_param(p: Tensor, state: dict) -> None:
    """Where ``p`` (fp16/bf16) is no longer its fp32 master rounded, the master takes the
    param's value. Run at the first step after a load: a state dict without a master (from
    torch.optim) got one made from the params as they were then, and a params' load after
    the optimizer's (``set_optimizer_state_dict`` before ``set_model_state_dict``, or a
    full state dict merged with the optimizer's own earlier state) leaves the master of
    the old params, which the step would write back over the loaded ones. A param that is
    the master rounded to the other 16-bit dtype in every element (a bf16 model made fp16
    with ``model.half()``, a checkpoint of bf16 training loaded into an fp16 model) keeps
    it, as a dtype change under the same optimizer does; in some elements only, that is
    chance (newer weights that happen to equal it), and the param wins there too."""
    master, lp = state.get(MASTER_KEY), local_tensor(p)
    if not isinstance(master, Tensor) or lp.dtype not in (torch.bfloat16, torch.float16):
        return
    lm = local_tensor(master)
    if lm.shape != lp.shape or lm.dtype != torch.float32 or lm.device != lp.device:
        return
    other = torch.float16 if lp.dtype == torch.bfloat16 else torch.bfloat16
    stale = ~(_rounded_from(lm, lp, (lp.dtype,)) | _rounded_from(lm, lp, (other,)).all())
    # A master made under inference_mode (state set by hand) is written as the step's
    # kernels write it; torch refuses an in-place op on it outside that mode. no_grad inside:
    # ``inference_mode(False)`` turns grad mode back on (the master would record the copy).
    with torch.inference_mode(lm.is_inference()), torch.no_grad():
        lm.copy_(torch.where(stale, lp.float(), lm))  # no host sync: once, whatever it finds


def masters_follow_params(state: dict, known: dict, made=()) -> dict:
    """``master_follows_param`` for every param whose state dict holds an fp32 master and
    is not one of ``known`` (the state dicts with a master the last gathering saw, by id;
    none after a ``load_state_dict``). A state dict this optimizer has not
    seen was loaded without its ``load_state_dict``: written into ``opt.state`` by hand,
    or by ``ZeroRedundancyOptimizer.load_state_dict``, which assigns each param's state
    itself; the model's weights may have been set after it. The optimizer's own changes
    keep the dict (a master converted, moved or replaced in it), and so do a param's
    leaving and rejoining the groups: there the master is written back over the param's
    edits, as between any two steps. ``made``: params whose state the gathering just
    made (their masters are their values). Returns the dicts with a master now, for the
    next call (held: an id alone could be a freed dict's)."""
    made = set(map(id, made))
    seen = {}
    for p, st in state.items():
        if not isinstance(p, Tensor) or not isinstance(st, dict) or not isinstance(st.get(MASTER_KEY), Tensor):
            continue  # entries under other keys are the user's: kept, never read (as torch.optim)
        if known.get(id(st)) is not st and id(p) not in made:
            master_follows_param(p, st)
        seen[id(st)] = st
    return seen


def _adopt_master(lp: Tensor, state: dict) -> None:
    """A param that became float32 under a master (``model.float()`` after steps with
    ``master_weights``) is its own master now: it takes the master's value wherever it is
    still that master rounded to 16 bits (elsewhere it was set since, and is kept)."""
    if lp.dtype != torch.float32 or not (MASTER_KEY in state or REMAINDER_KEY in state):
        return
    if MASTER_KEY in state:
        master = local_tensor(state[MASTER_KEY])
    else:
        remainder = local_tensor(state[REMAINDER_KEY])
        if remainder.shape != lp.shape:
            return
        master = join_master(lp.to(torch.bfloat16), remainder.to(lp.device))
    if master.shape != lp.shape or master.dtype != torch.float32:
        return
    master = master.to(lp.device)
    rounded = _rounded_from(master, lp, (torch.bfloat16, torch.float16))
    with torch.no_grad():
        lp.copy_(torch.where(rounded, master, lp))


def _rounded_from(master: Tensor, value: Tensor, dtypes: tuple) -> Tensor:
    """Where ``value`` is fp32 ``master`` rounded to one of ``dtypes``: the step rounds bf16
    to nearest with ties away from zero, fp16 to nearest even, and a master made from a
    param rounds to it to nearest even either way."""
    hit = torch.zeros(value.shape, dtype=torch.bool, device=value.device)
    for dtype in dtypes:
        hit |= value == master.to(dtype).to(value.dtype)
        if dtype == torch.bfloat16:
            hit |= value == split_master(master)[0].view_as(master).to(value.dtype)
    return hit


def split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """(bf16 high half rounded to nearest, ties away from zero; int16 low half) of fp32
    ``master``: what ``master_weights="remainder"`` keeps, bit for bit as the kernel."""
    master = master.detach().to(torch.float32).contiguous()
    bits = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = torch.where(torch.isnan(master), bits | 0x400000, bits + 0x8000)
    high = ((rounded >> 16) & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.bfloat16)
    low = (bits & 0xFFFF).to(torch.int32).to(torch.int16)
    return high.view_as(master), low.view_as(master)


def join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master that ``split_master`` split, exactly."""
    high = param.detach().contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    low = remainder.detach().contiguous().to(torch.int64) & 0xFFFF
    low = torch.where(((high & 0x7FFF) == 0) & (low >= 0x8000), 0, low)  # kernels.rounding.join_master
    high = torch.where(low >= 0x8000, high - 1, high) & 0xFFFF
    bits = ((high << 16) | low).to(torch.int32)  # wraps into the sign bit as intended
    return bits.view(torch.float32).view_as(param)
