"""What a param's state dict holds: its keys, and the checks of one entry."""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.variant import QUANT_BITS, Master
from ..tensors import in_layout, is_dense, local_tensor, placed_unlike, sharded, storage_problem


MASTER_KEY = "master_param"
REMAINDER_KEY = "master_param_remainder"
SEED_KEY = "rounding_seed"

LOW_PRECISION = (torch.float16, torch.bfloat16)
COMPLEX = (torch.complex64, torch.complex128)
_MASTER_KEYS = {Master.FP32: MASTER_KEY, Master.REMAINDER: REMAINDER_KEY}
# The dtype each master form is stepped in, then the others it is accepted in: a remainder
# is exported as int32 (a state dict may travel by collective, and collectives have no
# int16), and state written straight from an export (ZeroRedundancyOptimizer's load) holds
# it so until converted.
_MASTER_DTYPES = {MASTER_KEY: (torch.float32,), REMAINDER_KEY: (torch.int16, torch.int32)}


_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "exp_inf", "max_exp_avg_sq")


def moment_keys(algorithm: str, amsgrad: bool) -> tuple[str, ...]:
    """The moments a param of ``algorithm`` steps with (torch.optim's state keys)."""
    if algorithm == "adamax":
        return ("exp_avg", "exp_inf")
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())


def _memory_format(lp: Tensor):
    """Dense params: state with the param's strides. Non-dense ones are stepped in a
    contiguous staging copy, and so is their state."""
    return torch.preserve_format if is_dense(lp) else torch.contiguous_format


def _fit(p: Tensor, value: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` as ``dtype`` where the kernel steps it with ``p`` (itself if it is)."""
    lp = local_tensor(p)
    if value.dtype == dtype and in_layout(local_tensor(value), lp):
        return value
    return torch.empty_like(p, dtype=dtype, memory_format=_memory_format(lp)).copy_(value)


def _stale(key: str, problem: str, name: str) -> RuntimeError:
    if problem.startswith("no storage"):
        return RuntimeError(
            f"tritonadam.{name}: state[{key!r}] has {problem}: the kernels would write through "
            "it. Give it memory again before the step (offloading code: restore it), load a "
            "state dict, or clear this param's state (`opt.state.pop(param)`) to restart it")
    return RuntimeError(
        f"tritonadam.{name}: state[{key!r}] has {problem}: the param or this state tensor "
        "changed after the state was created (a param cast, moved or resized, or a state "
        "tensor replaced by hand). Load a state dict that matches the params "
        "(`opt.load_state_dict(...)` also moves state to the params' device), or clear "
        "this param's state (`opt.state.pop(param)`) to restart it"
    )


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def shape_of(t: Tensor) -> str:
    """``t``'s shape, and for a DTensor its local shard's too (what the kernels step)."""
    local = local_tensor(t)
    if local is t:
        return str(tuple(t.shape))
    return f"{tuple(t.shape)} (a DTensor; this rank's shard {tuple(local.shape)})"


def placement_problem(value: Tensor, p: Tensor) -> str | None:
    """Why state tensor ``value`` cannot be placed like param ``p``, or None: it lies on
    another device mesh, or is a plain tensor where DTensor ``p`` is sharded, or a
    sharded DTensor where ``p`` is plain (each rank's local tensor would be taken for
    the whole value; on a rank whose part happens to be the whole it would pass a shape
    check that another rank fails). Global metadata only, so every rank answers alike."""
    if local_tensor(p) is p:
        if local_tensor(value) is not value and sharded(value):
            # each rank's shard passes a shape check only where it happens to be the whole
            return (f"a DTensor of shape {shape_of(value)} placed {tuple(value.placements)} for a param "
                    "that is not a DTensor: give it the whole value (`value.full_tensor()`)")
        return None
    if local_tensor(value) is not value and value.device_mesh != p.device_mesh:
        return f"a DTensor on {value.device_mesh} for a param on {p.device_mesh}"
    if local_tensor(value) is value and sharded(p):
        return (f"a plain tensor of shape {tuple(value.shape)} for a DTensor param of shape {shape_of(p)} "
                f"placed {tuple(p.placements)}: place it like the param "
                "(`torch.distributed.tensor.distribute_tensor(value, p.device_mesh, p.placements)`)")
    return None


def align_placements(p: Tensor, state: dict, keys: tuple[str, ...]) -> None:
    """Redistribute the state tensors of DTensor ``p`` that the step reads (moments
    ``keys`` in any stored form, the master) and that are placed unlike it on its mesh (a
    checkpoint of another sharding loaded with ``load_state_dict``, state set by hand):
    their local shards become the elements of ``p``'s, as torch.optim's DTensor ops
    redistribute their operands. Each of them makes ``ParamFormat.check`` convert on
    every rank (placements are global metadata), so every rank comes here and
    redistributes the same tensors in the same order; an entry the step does not read (a
    moment of another algorithm, the step count) is left as it is, since a rank that
    comes here for a reason of its own (its shard's layout) would redistribute it alone."""
    if local_tensor(p) is p:
        return
    read = {MASTER_KEY, REMAINDER_KEY, *keys, *(scales_key(k) for k in keys),
            *(codes_key(k, bits) for k in keys for bits in QUANTIZED.values())}
    for key in [k for k in state if k in read]:
        value = state[key]
        if isinstance(value, Tensor) and placed_unlike(value, p) and value.device_mesh == p.device_mesh:
            # neither gloo nor NCCL moves int16 (a remainder): as int32, the same values
            wide = value.to(torch.int32) if value.dtype == torch.int16 else value
            state[key] = wide.redistribute(p.device_mesh, p.placements).to(value.dtype)


def _tensor_problem(p: Tensor, key: str, value, dtypes: tuple, name: str) -> str | None:
    """Why ``value`` cannot stand for ``state[key]`` of ``p``, or None."""
    if not isinstance(value, Tensor):
        raise RuntimeError(f"tritonadam.{name}: state[{key!r}] is a {type(value).__name__}, not a tensor")
    lp, lv = local_tensor(p), local_tensor(value)
    if lv.is_neg() or lv.is_conj():  # its memory holds the values before negation
        raise RuntimeError(
            f"tritonadam.{name}: state[{key!r}] is a lazily negated or conjugated view, which the "
            f"kernels cannot read or write; make it a plain tensor: "
            f"`state[{key!r}] = state[{key!r}].resolve_conj().resolve_neg()`")
    problem = placement_problem(value, p)
    if problem is not None:
        return problem
    # placed unlike the param on its mesh, its shards are other elements: redistributed
    # like the param before the step reads them (``align_placements``)
    if value.shape != p.shape or lv.shape != lp.shape and not placed_unlike(value, p):
        return f"shape {shape_of(value)} for a param of shape {shape_of(p)}"
    if value.dtype not in dtypes:
        wanted = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"dtype {value.dtype} where a {p.dtype} param's state is {wanted}"
    if lv.device != lp.device:
        return f"device {lv.device} for a param on {lp.device}"
    return storage_problem(lv)


# The quantized formats by name, with their bits per code: the kernels' table (one for both).
QUANTIZED = QUANT_BITS
# The dtypes a dense moment may be stored in and still be converted to a quantized format.
_DENSE_ACCEPTS = (torch.float32, torch.bfloat16)


def codes_key(key: str, bits: int) -> str:
    """The state key of moment ``key``'s codes at ``bits`` bits (e.g. ``exp_avg_8bit``)."""
    return f"{key}_{bits}bit"


def scales_key(key: str) -> str:
    """The state key of moment ``key``'s block scales (``exp_avg_scales``)."""
    return f"{key}_scales"


# The keys of quantized codes and scales, with the moment (and bits) each belongs to.
# Matched whole, not by suffix: an entry of the user's under any other key (a wrapper's
# ``ema_scales``) is kept as it is, as torch.optim keeps it.
CODES_KEYS = {codes_key(k, bits): (k, bits) for k in _MOMENT_KEYS for bits in QUANTIZED.values()}
SCALES_KEYS = {scales_key(k): k for k in _MOMENT_KEYS}
# The entries a launch may write (the rest are the user's, read by no kernel).
WRITTEN_KEYS = frozenset({"step", *_MOMENT_KEYS, MASTER_KEY, REMAINDER_KEY, *CODES_KEYS, *SCALES_KEYS})


def _quantized_bits(state: dict, key: str) -> int | None:
    """The bits of the quantized form of moment ``key`` that ``state`` holds, if any."""
    for bits in QUANTIZED.values():
        if codes_key(key, bits) in state:
            return bits
    return None


def _drop_forms(state: dict, key: str, keep: str | int) -> None:
    """Remove every stored form of moment ``key`` but ``keep`` ("dense", or a bit count)."""
    if keep != "dense":
        state.pop(key, None)
    for bits in QUANTIZED.values():
        if keep != bits:
            state.pop(codes_key(key, bits), None)
    if keep == "dense":
        state.pop(scales_key(key), None)


def _signed(key: str) -> bool:
    return key == "exp_avg"  # the others (second moments, their max) are never negative


def _seed_problem(value) -> str | None:
    """What is wrong with a loaded stochastic-rounding seed, or None: it must be an
    integer in [0, 2**63), as a Python int or a 1-element integer tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool \
                or value.is_meta:
            return f"is a tensor of {value.numel()} element(s) of dtype {value.dtype}, expected one integer"
        value = int(value.item())
    elif isinstance(value, bool) or not isinstance(value, int):
        return f"is {value!r}, expected an integer"
    return None if 0 <= value < 2**63 else f"is {value}, expected an integer in [0, 2**63)"
