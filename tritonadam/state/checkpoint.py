"""State dicts: export, the checks before a load, and what a load restores."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import quantize
from ..tensors import addressable, is_fake, local_tensor, split_dim
from .entries import (
    CODES_KEYS, MASTER_KEY, _MOMENT_KEYS, REMAINDER_KEY, SCALES_KEYS, SEED_KEY, moment_keys, _quantized_bits,
    scales_key,
    _seed_problem, _signed, placed_unlike, placement_problem, shape_of,
)
from .moments import _block_rows, _quantized_form, _shards_start_on_blocks
from .orders import logical_order, _record
from .policy import StatePolicy
from .steps import count_of, loaded_step_device, loaded_step_dtype, new_step_dtype


def _param_index(key, count: int) -> bool:
    """Whether a key of torch's ``state_dict()["state"]`` is a param's index. torch keeps
    entries of ``optimizer.state`` under keys that are not params (a hook's
    ``state["note"] = 1``) as they are, under the same key."""
    return type(key) is int and 0 <= key < count


def export_state(policy: "StatePolicy", params: list[Tensor], saved: dict) -> dict:
    """torch's ``state_dict()["state"]`` with each param's state in its format's exported
    form (``saved`` is keyed by the params' indices)."""
    return {i: policy.format(params[i]).export(params[i], value) if _param_index(i, len(params)) else value
            for i, value in saved.items()}


def export_full_state(policy: "StatePolicy", algorithm: str, param_groups: list[dict], saved: dict) -> dict:
    """torch's ``state_dict()["state"]`` with every moment at full precision under
    torch.optim's keys (see ``ParamFormat.export_full``)."""
    pairs = [(p, g) for g in param_groups for p in g["params"]]
    out = {}
    for i, value in saved.items():
        if _param_index(i, len(pairs)):
            p, group = pairs[i]
            value = policy.format(p).export_full(p, value, held_moments(algorithm, group, value))
            value.pop(SEED_KEY, None)
        out[i] = value
    return out


def held_moments(algorithm: str, group: dict, state: dict) -> tuple[str, ...]:
    """The moments of a param's ``state`` that a load converts and a full export decodes:
    those its ``group`` steps with, and one it keeps idle (``max_exp_avg_sq`` after
    amsgrad was switched off, which torch.optim keeps too). Left out, an idle one stayed
    in a checkpoint's form that ``state_dict()`` could not export, and was dropped from
    ``torch_state_dict()``."""
    keys = moment_keys(algorithm, group.get("amsgrad", False))
    return keys + tuple(k for k in moment_keys(algorithm, True) if k not in keys and (
        isinstance(state.get(k), Tensor) or _quantized_bits(state, k) is not None))


def check_loadable(name: str, algorithm: str, param_groups: list[dict], state_dict: dict, *,
                   alone: bool = False) -> None:
    """Raise unless every param state in ``state_dict`` is one these params can load.
    ``alone``: called on this rank only (rank 0's check before a broadcast, which shares
    its refusal): DTensor shards' values are read here without the all-reduce that keeps
    ranks alike."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        return  # torch's own check raises with its message
    saved_state = state_dict["state"]
    where = f"tritonadam.{name}.load_state_dict"
    values = _CodedValues(collective=not alone)
    for group, saved_group in zip(param_groups, saved_groups):
        if len(group["params"]) != len(saved_group["params"]):
            return  # torch's own check raises with its message
        amsgrad = saved_group.get("amsgrad", group.get("amsgrad", False))
        required = ["step", *moment_keys(algorithm, amsgrad)]
        # AMSGrad switched on after steps: a param not stepped since has no
        # max_exp_avg_sq yet (in no form: a part of one is a broken state), which its
        # next step makes (zeros) as the live optimizer does.
        optional = set(required) - {"step", *moment_keys(algorithm, False)}
        for saved_id, p in zip(saved_group["params"], group["params"]):
            state = saved_state.get(saved_id)
            if not state:
                continue
            switched = not any(str(k).startswith(tuple(optional)) for k in state)
            missing = [k for k in required if k not in state and not (switched and k in optional)
                       and (k == "step" or _quantized_bits(state, k) is None)]
            if missing:
                other = ("exp_inf" in state and "Adamax") or ("exp_avg_sq" in state and "Adam/AdamW")
                hint = f" (it looks like a state dict of {other})" if other and other != name else ""
                article = "an" if name[0] in "AEIOU" else "a"
                raise ValueError(f"{where}: the state of param {saved_id} lacks {missing}{hint}; "
                                 f"{article} {name} state has {required}")
            step = state["step"]
            if isinstance(step, Tensor) and step.numel() != 1:
                raise ValueError(f"{where}: state 'step' of param {saved_id} has {step.numel()} "
                                 "elements, expected one")
            if not (isinstance(step, (int, float)) or (isinstance(step, Tensor) and not step.is_complex()
                                                       and step.dtype != torch.bool and not step.is_meta)):
                raise ValueError(f"{where}: state 'step' of param {saved_id} is {step!r}, expected a "
                                 "number or a 1-element tensor")
            # The next step counts step + 1: at 0 its bias correction 1 - beta**0 is 0 and
            # every element turns NaN (torch.optim's step raises ZeroDivisionError), and
            # below 0 Adam's second-moment correction is negative, whose root is NaN (torch:
            # a complex number, an error). AdaMax steps such a count finitely, as torch's
            # does. NaN passes: it steps to NaN, as torch.optim's does. A tensor's value is
            # read with the codes' checks (one sync per device).
            adamax = algorithm == "adamax"
            message = (f"{where}: state 'step' of param {saved_id} is {{}}: the next step would "
                       f"count {'0' if adamax else '0 or fewer'} steps, whose bias correction "
                       f"1 - beta**steps is {'0' if adamax else '0 or below'}; expected a step "
                       "count >= 0 (the steps taken so far)")

            def refused(count):  # the next step's count: a number or a tensor
                return count == 0 if adamax else count <= 0

            if isinstance(step, Tensor) and type(local_tensor(step)) in (Tensor, torch.nn.Parameter):
                values.add_flag(message.format("-1" if adamax else "-1 or below"),
                                refused(local_tensor(step).detach() + 1), step)
            elif refused(float(step) + 1):  # a number, or a wrapper subclass (its own ops decide)
                raise ValueError(message.format(float(step) if isinstance(step, Tensor) else step))
            if SEED_KEY in state and _seed_problem(state[SEED_KEY]) is not None:
                seed = state[SEED_KEY]
                hint = ("; torch.optim's load_state_dict casts every state tensor to its param's "
                        "dtype, so this state dict went through torch.optim: remove "
                        f"{SEED_KEY!r} from each param's state to round with this optimizer's "
                        "seed") if isinstance(seed, Tensor) and seed.is_floating_point() else ""
                raise ValueError(f"{where}: state {SEED_KEY!r} of param {saved_id} "
                                 f"{_seed_problem(seed)}{hint}")
            for key, value in state.items():
                _check_entry(where, saved_id, p, key, value, state, values)
    values.check()


def _check_entry(where: str, saved_id, p: Tensor, key, value, state: dict, values: "_CodedValues") -> None:
    """Raise unless entry ``key`` of param ``p``'s saved ``state`` can be loaded (its value
    checks, for quantized codes and scales, are added to ``values``)."""
    if key in ("step", SEED_KEY):
        return
    if isinstance(value, Tensor) and value.is_meta and not local_tensor(p).is_meta:
        raise ValueError(f"{where}: state {key!r} of param {saved_id} is on the meta "
                         "device: it holds no values to load")
    expected = _saved_numel(key, p.numel())
    if not isinstance(value, Tensor):
        if expected is not None or key in _TENSOR_KEYS:
            hint = ("; a flattened state dict (flatten_optimizer_state_dict=True) holds "
                    "only the keys of the optimizer that saved it and loads into one with "
                    "the same state options (state_dtype, master_weights): to change "
                    "them, load its full form (full_state_dict=True)") if isinstance(value, dict) else ""
            raise ValueError(f"{where}: state {key!r} of param {saved_id} is a "
                             f"{type(value).__name__}, not a tensor{hint}")
        return
    if expected is not None:
        if value.numel() not in expected:
            raise ValueError(f"{where}: state {key!r} of param {saved_id} has {value.numel()} "
                             f"elements where a param of shape {tuple(p.shape)} needs "
                             f"{expected[0]} (or one per element, {expected[1]})")
        problem = _saved_quantized_problem(key, value, state, p)
        if problem is not None:
            raise ValueError(f"{where}: state {key!r} of param {saved_id} {problem}")
        if not value.is_meta:
            values.add(f"{where}: state {key!r} of param {saved_id}", key, value, state, p.numel())
        if (key in SCALES_KEYS and local_tensor(p) is not p and local_tensor(value) is not value
                and _block_rows(p, local_layout=False) is None and value.numel() != p.numel()
                and not _shards_start_on_blocks(p)):
            # Checked on global sizes: every rank refuses alike (no rank left waiting).
            raise ValueError(
                f"{where}: state {key!r} of param {saved_id} holds a scale per block of the "
                "whole param (a checkpoint of an unsharded model), split across the shards "
                "by the state dict's distribution: shards that start inside a block would "
                "read other blocks' scales. Save that checkpoint at full precision "
                "(`opt.torch_state_dict()`), or load it with `opt.load_state_dict` "
                "unsharded, which re-encodes each shard's blocks")
        return
    if key not in _TENSOR_KEYS:
        return  # an entry of the user's (a wrapper's count, ...): kept, as torch keeps it
    if value.shape != p.shape:
        raise ValueError(f"{where}: state {key!r} of param {saved_id} has shape "
                         f"{tuple(value.shape)}, but the param has shape {tuple(p.shape)}")
    if local_tensor(value) is not value and (problem := placement_problem(value, p)) is not None:
        raise ValueError(f"{where}: state {key!r} of param {saved_id} is {problem}")
    if key != REMAINDER_KEY and not (value.is_floating_point() or value.is_complex()):
        raise ValueError(f"{where}: state {key!r} of param {saved_id} has dtype "
                         f"{value.dtype}, expected a floating point tensor")
    if key == REMAINDER_KEY and MASTER_KEY not in state and (value.is_floating_point()
                                                              or value.is_complex()):
        # Beside a master the remainder is not read (the master is split anew).
        raise ValueError(f"{where}: state {key!r} of param {saved_id} has dtype {value.dtype}, "
                         "expected int16 or int32 (the low 16 bits of the fp32 master; "
                         "torch.optim's load_state_dict casts every state tensor to its "
                         "param's dtype, which loses them): load it with the checkpoint's "
                         f"{MASTER_KEY!r}, or remove {key!r} to start the master from the params")


class _CodedValues:
    """The value checks of quantized codes and scales, and of step counts given as tensors
    (check_loadable), run after every structural check: scales are block absmaxes (a
    negative one decodes a second moment below 0, and the step writes NaN into the params;
    a NaN or infinite one is a block that held NaN or inf, kept as torch.optim keeps such
    moments), and a code per element of a 4-bit moment is a nibble (8-bit codes renamed to a 4-bit key decode up to 256x too large; in block form
    their byte count already differs). Each reads values, so each is one flag on the
    tensor's device, read back together: one sync per device, and one all-reduce per
    device mesh for DTensor shards, so that every rank refuses alike."""

    def __init__(self, collective: bool):
        self.entries, self.flags, self.collective = [], {}, collective

    def add(self, where: str, key: str, value: Tensor, state: dict, numel: int) -> None:
        local = local_tensor(value)
        if key in SCALES_KEYS:
            bad = (local < 0).any()
            problem = "holds negative scales (each is a block's absmax, >= 0)"
        else:
            moment, bits = CODES_KEYS[key]
            scales = state[scales_key(moment)]
            if bits == 8 or _quantized_form(value, scales, numel, bits) != "elements":
                return
            bad = (local > 15).any()
            problem = ("holds codes above 15, which are not 4-bit codes (8-bit codes saved under a "
                       "4-bit key?): load a checkpoint under the keys it was saved with")
        self.add_flag(f"{where} {problem}", bad, value)

    def add_flag(self, message: str, bad: Tensor, value: Tensor) -> None:
        """Raise ``message`` at ``check`` if ``bad`` (a 0-dim bool tensor computed from
        ``value`` on its device) holds."""
        local = local_tensor(value)
        group = (local.device, value.device_mesh if local is not value and self.collective else None)
        self.flags.setdefault(group, []).append((len(self.entries), bad.reshape(())))
        self.entries.append(message)

    def check(self) -> None:
        for (device, mesh), flags in self.flags.items():
            found = torch.stack([bad for _, bad in flags]).to(torch.int32)
            if mesh is not None:
                from torch.distributed.tensor import DTensor, Partial

                # on the mesh's device: a checkpoint loaded to the CPU (map_location) holds CPU
                # shards of a GPU mesh, whose NCCL group reduces GPU tensors only
                found = DTensor.from_local(found.to(mesh.device_type), mesh, [Partial("max")] * mesh.ndim,
                                           run_check=False).full_tensor()
            for (index, _), bad in zip(flags, found.tolist()):
                if bad:
                    raise ValueError(self.entries[index])


# Keys whose value must be a tensor (besides quantized codes and scales).
_TENSOR_KEYS = frozenset({*_MOMENT_KEYS, MASTER_KEY, REMAINDER_KEY})


def _saved_quantized_problem(key: str, value: Tensor, state: dict, p: Tensor) -> str | None:
    """What is wrong with quantized codes or scales ``state[key]`` of param ``p`` besides
    their size, or None: codes must be uint8 and come with their scales in the same form
    (read together on load), a code and a scale per element laid out like the param."""
    numel = p.numel()
    if key in SCALES_KEYS:
        return None if value.is_floating_point() else f"has dtype {value.dtype}, expected bfloat16 scales"
    if value.dtype != torch.uint8:
        return f"has dtype {value.dtype}, expected uint8 codes"
    moment, bits = CODES_KEYS[key]
    sk = scales_key(moment)
    scales = state.get(sk)
    if sk in state and not isinstance(scales, Tensor):
        return f"comes with {sk!r} as a {type(scales).__name__}, not a tensor of block scales"
    if not isinstance(scales, Tensor):
        return f"comes without {sk!r}, the block scales its codes are read with"
    if _quantized_form(value, scales, numel, bits) is None:
        if value.numel() == scales.numel() == numel:
            return (f"has shape {tuple(value.shape)} and {sk!r} shape {tuple(scales.shape)}: a code and a "
                    "scale per element are laid out alike, like the param")
        return f"and {sk!r} hold {value.numel()} codes and {scales.numel()} scales: not one form"
    if _quantized_form(value, scales, numel, bits) == "elements":
        # Read back reshaped to the param's (local) shape, once placed like it
        # (``align_placements``: a DTensor placed otherwise on its mesh is redistributed).
        lp = local_tensor(p)
        for t in (value, scales):
            lt = local_tensor(t)
            problem = placement_problem(t, p) if lt is not t else None
            if problem is not None:
                return f"is {problem}"
            if t.shape != p.shape or (lt is not t and lt.shape != lp.shape and not placed_unlike(t, p)):
                return (f"holds a code per element in shape {shape_of(t)} for a param of shape "
                        f"{shape_of(p)}: per element, codes and scales are laid out like the param")
    elif unlike := [t for t in (value, scales) if placed_unlike(t, p)]:
        return (f"holds block codes or scales placed {tuple(unlike[0].placements)} for a param placed "
                f"{tuple(p.placements)}: blocks are counted from the start of each shard of the param")
    return None


def _saved_numel(key: str, numel: int) -> tuple[int, int] | None:
    """The elements a quantized moment's codes or scales may hold for a param of
    ``numel`` (block form, per-element form), or None when ``key`` is not one of theirs."""
    if key in SCALES_KEYS:
        return (quantize.num_scales(numel), numel)
    bits = _codes_bits(key)
    return None if bits is None else (quantize.code_bytes(numel, bits), numel)


def _codes_bits(key: str) -> int | None:
    """The bit width of a quantized moment's codes key (``exp_avg_8bit``), else None."""
    return CODES_KEYS.get(key, (None, None))[1]


def saved_pairs(param_groups: list[dict], state_dict: dict) -> list:
    """(id in ``state_dict``, param) pairs, matched by position as torch's load matches them."""
    return [(saved_id, p) for group, saved in zip(param_groups, state_dict["param_groups"])
            for saved_id, p in zip(saved["params"], group["params"])]


def localize_full_state(name: str, param_groups: list[dict], state_dict: dict) -> dict:
    """``state_dict`` with each DTensor param's whole (unsharded) state tensors as this
    rank's part of them, before anything is loaded.

    torch's full-state-dict load (``set_optimizer_state_dict(full_state_dict=True)``)
    distributes only the keys the receiving optimizer holds; a checkpoint of other state
    options brings keys it does not hold (another moment format, another master form),
    and those arrive whole. A dense tensor shaped like the param is split as the param is;
    quantized codes are decoded whole when their scales came whole too (blocks count
    from the start of the whole tensor, not of each shard), else split like their scales
    where the blocks allow. What cannot be split is refused here, before torch's load
    writes anything."""
    saved_state = state_dict["state"]
    new_state = None
    for saved_id, p in saved_pairs(param_groups, state_dict):
        entry = saved_state.get(saved_id)
        if local_tensor(p) is p or not isinstance(entry, dict):
            continue
        whole = [k for k, v in entry.items()
                 if isinstance(v, Tensor) and v.dim() > 0 and local_tensor(v) is v and k != SEED_KEY]
        if whole:
            new_state = dict(saved_state) if new_state is None else new_state
            new_state[saved_id] = _localized(name, saved_id, p, entry, whole)
    return state_dict if new_state is None else {**state_dict, "state": new_state}


def _localized(name: str, saved_id, p: Tensor, entry: dict, whole: list) -> dict:
    from torch.distributed.tensor import distribute_tensor

    def split(value: Tensor, placements) -> Tensor:  # this rank's part, without communication
        return distribute_tensor(value.detach().to(local_tensor(p).device), p.device_mesh, placements,
                                 src_data_rank=None)

    out = dict(entry)
    for k in whole:
        value, bits = entry[k], _codes_bits(k)
        if bits is None:
            if value.shape == p.shape and k not in SCALES_KEYS:
                out[k] = split(value, p.placements)
            continue  # scales go with their codes; another shape is check_loadable's to report
        key = CODES_KEYS[k][0]
        sk = scales_key(key)
        scales = entry.get(sk)
        if not isinstance(scales, Tensor):
            continue
        if local_tensor(scales) is scales:  # both whole: decoded whole, then split
            form = _quantized_form(value, scales, p.numel(), bits)
            if form == "blocks":
                dense = quantize.dequantize(value.reshape(-1), scales.reshape(-1), p.numel(), bits, _signed(key))
            elif form == "elements":
                dense = quantize.dequantize_per_element(value, scales, bits, _signed(key))
            else:
                continue
            out.pop(k), out.pop(sk)
            out[key] = split(dense.reshape(p.shape), p.placements)
            continue
        # The scales were split by torch (the receiver keeps scales of another bit width):
        # the codes are split the same way where that splits them at the same blocks.
        rows = scales.dim() == value.dim() == 2 and value.shape[0] == scales.shape[0] == p.shape[0] and all(
            split_dim(pl) in (None, 0) for pl in scales.placements)
        if value.shape == scales.shape == p.shape or rows:
            out[k] = split(value, scales.placements)
            continue
        raise ValueError(
            f"tritonadam.{name}.load_state_dict: state {k!r} of param {saved_id} holds the codes of the "
            "whole tensor in blocks that its shards do not start on, while its scales arrive split by "
            "torch: the checkpoint's quantized moments cannot be converted here. Load it into an "
            "optimizer with the state_dtype it was saved with (then train on, or save with "
            "torch_state_dict() to change formats)")
    return out


def _held(value: Tensor, lp: Tensor, kept: set, own: set) -> Tensor:
    """What the optimizer keeps of a loaded state tensor of (local) param ``lp``. Its own
    state given back (``own``: the storages it held before the load; DCP loads into the
    tensors ``state_dict()`` gave it, views of them included, and
    ``opt.load_state_dict(opt.state_dict())``) is kept itself: a resume holds no second
    copy of the state. So is one on another device than the param (a checkpoint loaded to
    the CPU), which the conversion moves to the param's device anyway. Anything else is
    copied: the steps write their state in place, and the caller's state dict (a snapshot
    to roll back to, one loaded into two optimizers) stays as it was. torch.optim keeps
    such a tensor where no cast is needed, and steps it in place. A tensor whose memory
    another kept one shares (one tensor under two keys, views of one buffer) is copied
    too: the kernels would write the same memory twice. ``kept``: the storages kept so
    far, by device and address."""
    local = local_tensor(value)
    where = _storage_key(local)
    if value.requires_grad or where is None:
        # one that requires grad (moments a differentiable=True step computed, learned
        # initial moments) is kept itself, as torch.optim keeps it: a gradient through the
        # next differentiable step reaches it, and a leaf stays a leaf
        return value
    if where not in kept and (where in own or local.device != lp.device):
        kept.add(where)
        return value
    return value.detach().clone()


def own_storages(state: dict) -> set:
    """``_storage_key`` of every state tensor in ``state`` (an optimizer's)."""
    return {_storage_key(local_tensor(v)) for st in state.values() if isinstance(st, dict)
            for v in st.values() if isinstance(v, Tensor)} - {None}


def _storage_key(t: Tensor):
    """(device, address) of local tensor ``t``'s memory, or None where it has none to
    share (meta, fake, empty or sparse tensors, wrapper subclasses)."""
    if t.is_meta or t.numel() == 0 or t.layout != torch.strided or is_fake(t) or not addressable(t):
        return None
    return t.device, t.untyped_storage().data_ptr()


def restore_loaded(algorithm: str, policy: "StatePolicy", seed: int | None, param_groups: list[dict],
                   state_dict: dict, state: dict, own: set = frozenset()) -> int | None:
    """After torch's ``load_state_dict`` (which cast floating state to the param dtype):
    restore what ``state_dict`` held at full precision and convert it to these params'
    formats (``own``: ``own_storages`` of the state the optimizer held before the load).
    Returns the rounding seed it held, if any."""
    saved_state = state_dict["state"]
    pairs = [
        (saved_id, p, group)
        for group, saved in zip(param_groups, state_dict["param_groups"])
        for saved_id, p in zip(saved["params"], group["params"])
    ]
    loaded_seed = None
    steps = {}
    kept = {_storage_key(local_tensor(p)) for _, p, _ in pairs} - {None}
    for saved_id, p, group in pairs:
        if saved_id not in saved_state or p not in state:
            continue
        src, dst = saved_state[saved_id], state[p]
        for key, value in src.items():
            if key == "step":
                steps[p] = value  # set after the conversion below, which makes counts anew
            elif key == SEED_KEY:
                loaded_seed = int(value)
                # torch's load cast it to the param's dtype (bf16 holds 1234 as 1232)
                dst[key] = value.detach().clone() if isinstance(value, Tensor) else value
            elif isinstance(value, Tensor) and (key in _TENSOR_KEYS or key in SCALES_KEYS
                                                or _codes_bits(key) is not None):
                dst[key] = _held(value, local_tensor(p), kept, own)  # converted to this format below
                if _codes_bits(key) is not None:
                    _record(local_tensor(dst[key]), logical_order(local_tensor(p)), local_tensor(p).shape)
    seed = loaded_seed if loaded_seed is not None else seed
    with torch.no_grad():  # converting a master can set the param to its high half
        for _, p, group in pairs:
            if state.get(p):
                policy.format(p).prepare(p, state[p], held_moments(algorithm, group, state[p]), seed,
                                         new_step_dtype(group))
                if p in steps:
                    value = steps[p]
                    dtype = loaded_step_dtype(value, group)
                    device = loaded_step_device(value, group, local_tensor(p).device)
                    if isinstance(value, Tensor) and local_tensor(value) is value and value.numel() == 1 \
                            and value.dtype == dtype \
                            and value.device == device and (where := _storage_key(value)) in own \
                            and where not in kept:
                        kept.add(where)
                        state[p]["step"] = value  # its own count given back
                    else:
                        state[p]["step"] = count_of(value, dtype, device)
    return loaded_seed
