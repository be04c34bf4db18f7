"""The options tritonadam's optimizers add to torch.optim's, checked at construction with
errors (or, for options that would change nothing, a warning) that say what to do."""
from __future__ import annotations

import numbers

import torch

from . import autotune as autotune_module
from .clip import check_max_norm, norm_order
from .state import StatePolicy
from .warn import warn

__all__ = ["check_group_extras", "check_group_options", "checked_extras"]

_WARPS = (1, 2, 4, 8, 16, 32)
# The update kernel indexes a block with int32 offsets in one program; Triton caps a
# block at 2**20 elements, and beyond 2**16 every GPU config spills.
_MAX_BLOCK = 1 << 16
_AUTOTUNE_MODES = (None, *autotune_module.MODES)


def checked_extras(name: str, param_groups: list[dict], *, bias_correction, master_weights, state_dtype,
                   stochastic_rounding, seed, block_size, num_warps, autotune, persistent,
                   max_grad_norm, grad_norm_type, warn_idle: bool = True, recorded: bool = False) -> dict:
    """The options, normalized, or a ValueError naming the bad one (``warn_idle``: warn of
    options that change nothing for these params; ``recorded``: as for ``check_group_options``)."""
    if block_size is not None and (
        not isinstance(block_size, numbers.Integral) or isinstance(block_size, bool)
        or not 16 <= block_size <= _MAX_BLOCK or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"Invalid block_size: {block_size} (a power of two from 16 to {_MAX_BLOCK}, or None)"
        )
    # ``4.0 in (1, 2, 4, ...)`` and ``True in (True, False)`` hold: the types are checked
    # too (Triton's CUDA backend refuses a float num_warps, at the launch, mid-step).
    if num_warps is not None and (not isinstance(num_warps, numbers.Integral) or isinstance(num_warps, bool)
                                  or num_warps not in _WARPS):
        raise ValueError(f"Invalid num_warps: {num_warps!r} of type {type(num_warps).__name__} "
                         f"(an int, one of {_WARPS}, or None)")
    if autotune not in _AUTOTUNE_MODES:
        raise ValueError(f"Invalid autotune: {autotune!r} (one of {_AUTOTUNE_MODES})")
    autotune_module.resolve_mode(autotune)  # a bad TRITONADAM_AUTOTUNE fails here, not mid-step
    if persistent is not None and not isinstance(persistent, bool):
        raise ValueError(f"Invalid persistent: {persistent!r} (True, False or None)")
    if not isinstance(bias_correction, bool):
        raise ValueError(f"Invalid bias_correction: {bias_correction!r} (True or False)")
    policy = StatePolicy.checked(master_weights, state_dtype, stochastic_rounding, name)
    policy.check_block_size(block_size, name)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise ValueError(f"Invalid seed: {seed!r} (an int in [0, 2**63), or None)")
    if max_grad_norm is not None:
        max_grad_norm = check_max_norm(max_grad_norm)
    grad_norm_type = norm_order(grad_norm_type)
    for group in param_groups:
        check_group_options(name, group, policy, bias_correction=bias_correction, recorded=recorded)
    idle = policy.idle_options({p.dtype for g in param_groups for p in g["params"]})
    for why in idle if warn_idle else ():
        warn(f"tritonadam.{name}: {why}")
    # Only stochastic rounding draws random numbers. Its default seed is the one
    # torch.manual_seed set, read without drawing from the global generator (a drop-in
    # leaves torch's random stream as it found it); saved in the state of every param
    # rounded stochastically, so a resumed run draws the same numbers.
    if seed is None and stochastic_rounding:
        seed = torch.initial_seed() % 2**63
    return dict(bias_correction=bias_correction, master_weights=master_weights,
                state_dtype=policy.state_dtype, stochastic_rounding=stochastic_rounding, seed=seed,
                block_size=None if block_size is None else int(block_size),
                num_warps=None if num_warps is None else int(num_warps), autotune=autotune, persistent=persistent,
                max_grad_norm=max_grad_norm, grad_norm_type=grad_norm_type)


# The options above are the whole optimizer's. torch.optim keeps any key a param group
# has without reading it, so a group that sets one (as apex's FusedAdam takes
# bias_correction per group) would be stepped with the optimizer's value, silently.
_POLICY_KEYS = ("master_weights", "state_dtype", "stochastic_rounding")
_INTEGRAL_KEYS = ("seed", "block_size", "num_warps")
_GROUP_KEYS = frozenset(("bias_correction", *_POLICY_KEYS, *_INTEGRAL_KEYS, "autotune", "persistent",
                         "max_grad_norm", "grad_norm_type"))


def check_group_extras(name: str, group: dict, extras: dict) -> None:
    """Raise where a param ``group`` given to the constructor or ``add_param_group`` sets
    one of the optimizer-wide options (``extras``, as normalized by ``checked_extras``) to
    another value. A value the constructor normalizes to the optimizer's passes: torch's
    ZeroRedundancyOptimizer copies its constructor's keywords, raw, into every group
    (``state_dtype=torch.float32``, a numpy int, ``seed=None`` beside the seed drawn from
    ``torch.initial_seed()``). Groups are not checked at the step, nor when an option is
    set on the optimizer by hand: ZeRO's checkpoint keeps its keywords in its groups, and
    ZeRO writes its groups' values into the optimizer's before every step, so a run
    resumed (or an option set) with other values would be refused for good."""
    if _GROUP_KEYS.isdisjoint(group):
        return
    for key in _GROUP_KEYS.intersection(group):
        value, own = group[key], extras[key]
        if value is own or (key == "seed" and value is None):
            continue
        try:
            if key in _POLICY_KEYS:
                policy = {k: extras[k] for k in _POLICY_KEYS}
                policy[key] = value
                same = StatePolicy.checked(**policy, name=name) == StatePolicy(*(extras[k] for k in _POLICY_KEYS))
            elif key == "max_grad_norm":
                same = value is not None and own is not None and check_max_norm(value) == own
            elif key == "grad_norm_type":
                same = norm_order(value) == own
            elif key in _INTEGRAL_KEYS:
                same = (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                        and own is not None and int(value) == own)
            else:
                same = type(value) is type(own) and value == own
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ValueError(
                f"tritonadam.{name}: {key} is an option of the whole optimizer, not of a param "
                f"group (a group sets {key}={value!r}; the optimizer's is {own!r}), and a group's "
                f"value would be ignored. Pass {key}= to the constructor, and step params that "
                f"need another {key} with a second tritonadam optimizer"
            )


def check_group_options(name: str, group: dict, policy: StatePolicy, *, bias_correction: bool = True,
                        recorded: bool = False) -> None:
    """Raise for a param group these options cannot step (at construction, when a group is
    added, and before a step: groups can be edited by hand). ``recorded``: the optimizer's
    ``differentiable`` default is True, under which torch.optim's step records every
    group's update, so torch.optim's implementation steps every group."""
    if group.get("differentiable") or recorded:
        if policy != StatePolicy():
            raise RuntimeError(
                f"tritonadam.{name}: differentiable=True steps with torch.optim's implementation, "
                "which has no master_weights, state_dtype or stochastic_rounding"
            )
        if not bias_correction:
            raise RuntimeError(
                f"tritonadam.{name}: differentiable=True steps with torch.optim's implementation, "
                "which has no bias_correction=False; keep bias_correction=True for a "
                "differentiable step, or step these params with differentiable=False"
            )
    for p in group["params"]:
        if isinstance(p, tuple) and len(p) == 2:  # named params: (name, param)
            p = p[1]
        if isinstance(p, torch.Tensor):
            policy.check_param(p, name)

