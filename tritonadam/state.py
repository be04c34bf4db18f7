"""Optimizer state formats: one object per way a param's state is stored.

A param's state is its step count, its moments (``exp_avg`` and ``exp_avg_sq``, or
AdaMax's ``exp_inf``, plus AMSGrad's ``max_exp_avg_sq``), and depending on the options:

- moments stored in fp32 (the default; fp64 for fp64 params, complex for complex ones),
  in bf16 (``state_dtype=torch.bfloat16``), or blockwise-quantized (``state_dtype="8bit"``
  or ``"4bit"``: uint8 codes under ``<moment>_8bit``/``<moment>_4bit`` and a bf16 scale
  per block under ``<moment>_scales``, see ``tritonadam.quantize``); the math is fp32;
- ``master_weights=True``: an fp32 copy of each fp16/bf16 param (``master_param``);
- ``master_weights="remainder"``: for bf16 params, the low 16 bits of the fp32 master
  (``master_param_remainder``, int16) beside the param, which holds the high half rounded
  to nearest (ties away from zero): the exact fp32 master in 2 extra bytes, exported by
  ``state_dict()`` as the fp32 ``master_param`` it stands for;
- ``stochastic_rounding=True``: what is kept in 16 bits or fewer without a master copy
  (fp16/bf16 params, bf16 or quantized state) is rounded stochastically from counter-based random numbers keyed
  by ``rounding_seed`` (kept in each such param's state), the tensor, the element and the
  step count.

:class:`StatePolicy` holds an optimizer's options and gives each param its
:class:`ParamFormat`: which tensors it holds, how to create them and convert any other
format's (a state dict from torch.optim, another mode) into them, how to export them, and
the kernel variant and bytes they make. The optimizer never branches on a mode.
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import quantize
from .kernels.layout import QUANT_MIN_FULL
from .kernels.variant import STATE_BYTES, BucketKey, Master, Variant
from .tensors import in_layout, is_dense, is_fsdp1_shard, like, local_tensor, storage_problem

__all__ = [
    "LOW_PRECISION", "MASTER_KEY", "REMAINDER_KEY", "SEED_KEY", "DenseMoments", "ParamFormat", "StatePolicy",
    "check_loadable", "encoded_orders", "new_step_dtype", "record_orders",
    "localize_full_state", "master_follows_param", "saved_pairs",
    "export_full_state", "export_state", "join_master", "moment_keys", "restore_loaded", "split_master", "variant",
]

MASTER_KEY = "master_param"
REMAINDER_KEY = "master_param_remainder"
SEED_KEY = "rounding_seed"

LOW_PRECISION = (torch.float16, torch.bfloat16)
COMPLEX = (torch.complex64, torch.complex128)
_MASTER_KEYS = {Master.FP32: MASTER_KEY, Master.REMAINDER: REMAINDER_KEY}
# The dtype each master form is stepped in, then the others it is accepted in: a remainder
# exported for collectives (which have no int16) is int32, and state written straight
# from such an export (ZeroRedundancyOptimizer's load) holds it so until converted.
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
        f"tritonadam.{name}: state[{key!r}] has {problem}: the param changed after its "
        "optimizer state was created. Load a state dict that matches the params "
        "(`opt.load_state_dict(...)` also moves state to the params' device), or clear "
        "this param's state (`opt.state.pop(param)`) to restart it"
    )


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


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
    if value.shape != p.shape or lv.shape != lp.shape:
        return f"shape {tuple(value.shape)} for a param of shape {tuple(p.shape)}"
    if value.dtype not in dtypes:
        wanted = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"dtype {value.dtype} where a {p.dtype} param's state is {wanted}"
    if lv.device != lp.device:
        return f"device {lv.device} for a param on {lp.device}"
    return storage_problem(lv)


QUANTIZED = {"8bit": 8, "4bit": 4}
# The dtypes a dense moment may be stored in and still be converted to a quantized format.
_DENSE_ACCEPTS = (torch.float32, torch.bfloat16)


def codes_key(key: str, bits: int) -> str:
    """The state key of moment ``key``'s codes at ``bits`` bits (e.g. ``exp_avg_8bit``)."""
    return f"{key}_{bits}bit"


def scales_key(key: str) -> str:
    """The state key of moment ``key``'s block scales (``exp_avg_scales``)."""
    return f"{key}_scales"


def _quantized_bits(state: dict, key: str) -> int | None:
    """The bits of the quantized form of moment ``key`` that ``state`` holds, if any."""
    for bits in QUANTIZED.values():
        if codes_key(key, bits) in state:
            return bits
    return None


def _drop_forms(state: dict, key: str, keep: str | None = None) -> None:
    """Remove every stored form of moment ``key`` but ``keep`` ("dense", or a bit count)."""
    if keep != "dense":
        state.pop(key, None)
    for bits in QUANTIZED.values():
        if keep != bits:
            state.pop(codes_key(key, bits), None)
    if keep in (None, "dense"):
        state.pop(scales_key(key), None)


def _signed(key: str) -> bool:
    return key == "exp_avg"  # the others (second moments, their max) are never negative


def _memory_order(lp: Tensor, value: Tensor) -> Tensor:
    """``value`` (shaped like local param ``lp``) as a flat fp32 tensor in the order the
    kernel steps ``lp``'s elements: its memory order (a non-dense param is stepped
    through a contiguous staging copy: logical order)."""
    if not is_dense(lp):
        return value.detach().to(torch.float32).reshape(-1)
    out = torch.empty_strided(lp.shape, lp.stride(), dtype=torch.float32, device=value.device)
    out.copy_(value.detach())
    return out.as_strided((lp.numel(),), (1,))


def _logical(lp: Tensor, flat: Tensor) -> Tensor:
    """The inverse of ``_memory_order``: a tensor shaped (and strided) like ``lp``."""
    if not is_dense(lp):
        return flat.reshape(lp.shape)
    out = torch.empty_strided(lp.shape, lp.stride(), dtype=flat.dtype, device=flat.device)
    out.as_strided((lp.numel(),), (1,)).copy_(flat)
    return out


def element_order(lp: Tensor) -> tuple[int, ...]:
    """The order the kernel steps local param ``lp``'s elements in: its dims of more than
    one element, outermost first. Memory order for a dense param, logical order for
    another (stepped through a contiguous staging copy)."""
    dims = [d for d in range(lp.dim()) if lp.shape[d] > 1]
    if is_dense(lp):
        dims.sort(key=lambda d: -lp.stride(d))
    return tuple(dims)


def logical_order(lp: Tensor) -> tuple[int, ...]:
    """The element order of a contiguous tensor shaped like ``lp``: the order of every
    block-form codes tensor a state dict holds."""
    return tuple(d for d in range(lp.dim()) if lp.shape[d] > 1)


# Flat codes do not say which element order they were encoded in, and a param can be
# re-laid out under them without changing shape (``p.data = p.data.t().contiguous().t()``,
# ``model.to(memory_format=torch.channels_last)`` after steps): each element would then
# be stepped with another element's moments. So the order of every codes tensor the state
# holds is recorded while it lives (none recorded: the param's own). A state dict holds
# block-form codes in logical order only (``QuantizedMoments.export``), and loading records
# that order for them.
_ENCODED_IN: WeakIdKeyDictionary = WeakIdKeyDictionary()
# Nor which shape: a param reshaped to the same size (``p.data = p.data.t().contiguous()``)
# would step each element with another's moments, where dense moments are refused by
# their shape. So the (local) shape each codes tensor was encoded for is recorded too.
_ENCODED_SHAPE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _record(codes: Tensor, order: tuple[int, ...], shape) -> None:
    _ENCODED_IN[codes] = tuple(order)
    if shape is not None:
        _ENCODED_SHAPE[codes] = tuple(shape)


def encoded_orders(state: dict) -> list[tuple]:
    """(codes, order, shape) for every codes tensor of ``state`` with a recorded order:
    what a copy of the optimizer (``copy.deepcopy``, pickle) carries along, its tensors
    copied with the state's, for ``record_orders``."""
    return [(t, _ENCODED_IN[local_tensor(t)], _ENCODED_SHAPE.get(local_tensor(t)))
            for s in state.values() if isinstance(s, dict)
            for t in s.values() if isinstance(t, Tensor) and local_tensor(t) in _ENCODED_IN]


def record_orders(entries) -> None:
    for codes, order, *shape in entries:  # pickles of older versions hold (codes, order)
        _record(local_tensor(codes), order, shape[0] if shape else None)


def _laid_out(lp: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """``lp``, or where codes were encoded in another element order, a tensor shaped like
    ``lp`` whose memory order is that one (for ``_logical``; holds no data)."""
    if order is None or order == element_order(lp):
        return lp
    dims = list(order) + [d for d in range(lp.dim()) if d not in order]
    inverse = sorted(range(len(dims)), key=dims.__getitem__)
    return torch.empty([lp.shape[d] for d in dims], dtype=torch.uint8, device="meta").permute(inverse)


def _quantized_problem(p: Tensor, key: str, state: dict, bits: int) -> str | None:
    """Why the quantized form of ``key`` cannot stand for ``p``'s moment, or None."""
    codes, scales = state.get(codes_key(key, bits)), state.get(scales_key(key))
    if not isinstance(codes, Tensor) or not isinstance(scales, Tensor):
        return f"{codes_key(key, bits)} without {scales_key(key)}"
    n = local_tensor(p).numel()
    lc, ls = local_tensor(codes), local_tensor(scales)
    if _quantized_form(lc, ls, n, bits) is None:
        return (f"{lc.numel()} code bytes and {ls.numel()} scales for a param of {n} elements "
                f"(shape {tuple(p.shape)})")
    if lc.dtype != torch.uint8 or not ls.is_floating_point():
        return f"codes of dtype {lc.dtype} and scales of dtype {ls.dtype} (uint8 and bfloat16)"
    if (lc.is_meta or ls.is_meta) and not local_tensor(p).is_meta:
        return "codes or scales on the meta device, which holds no values"
    return storage_problem(lc) or storage_problem(ls)


def _quantized_form(codes: Tensor, scales: Tensor, numel: int, bits: int) -> str | None:
    """"blocks" (flat or row-shaped codes and block scales), "elements" (a code and a
    scale per element, the form DTensor shards that split blocks export), or None."""
    if codes.numel() == quantize.code_bytes(numel, bits) and scales.numel() == quantize.num_scales(numel):
        return "blocks"
    if codes.numel() == numel and scales.numel() == numel:
        return "elements"
    return None


def _decoded(lp: Tensor, key: str, codes: Tensor, scales: Tensor, bits: int) -> Tensor:
    """The values ``codes`` and ``scales`` (local, either form) hold, shaped like ``lp``."""
    order = _ENCODED_IN.get(codes)
    codes, scales = codes.to(lp.device), scales.to(lp.device)
    if _quantized_form(codes, scales, lp.numel(), bits) == "blocks":
        flat = quantize.dequantize(codes.reshape(-1), scales.reshape(-1), lp.numel(), bits, _signed(key))
        return _logical(_laid_out(lp, order), flat)
    # Per element: laid out like the param (logical order), as exported.
    return quantize.dequantize_per_element(codes, scales, bits, _signed(key)).reshape(lp.shape)


def read_moment(p: Tensor, key: str, state: dict, form=None) -> Tensor | None:
    """Moment ``key`` of ``p`` at full precision, shaped like ``p``'s local tensor, from
    ``form`` ("dense" or a bit count), or whichever form ``state`` holds it in (None if
    none)."""
    lp = local_tensor(p)
    if form in (None, "dense") and isinstance(state.get(key), Tensor):
        return local_tensor(state[key]).detach()
    bits = _quantized_bits(state, key) if form is None else form
    if bits is None or bits == "dense":
        return None
    return _decoded(lp, key, local_tensor(state[codes_key(key, bits)]), local_tensor(state[scales_key(key)]), bits)


def _other_form(state: dict, key: str, own):
    """A stored form of moment ``key`` other than ``own`` ("dense" or a bit count), or
    None. A format's own state holds one form; a second one beside it came from outside,
    after: a state dict loaded through torch's full-state-dict path (which adds the
    source's keys beside the fresh state of the receiving optimizer), or a moment
    assigned by hand (``state["exp_avg"] = torch.zeros_like(p)`` to reset it). It is the
    one to keep."""
    if own != "dense" and isinstance(state.get(key), Tensor):
        return "dense"
    for bits in QUANTIZED.values():
        if bits != own and codes_key(key, bits) in state:
            return bits
    return None


def _check_other_form(p: Tensor, key: str, state: dict, form, name: str) -> None:
    """Raise if the other ``form`` of moment ``key`` cannot stand for ``p``'s moment."""
    if form == "dense":
        problem = _tensor_problem(p, key, state[key], _DENSE_ACCEPTS, name)
        if problem is not None:
            raise _stale(key, problem, name)
    else:
        problem = _quantized_problem(p, key, state, form)
        if problem is not None:
            raise _stale(codes_key(key, form), problem, name)


@dataclass(frozen=True)
class DenseMoments:
    """Moments stored as plain tensors shaped like the param, in ``dtype``."""

    dtype: torch.dtype
    accepts: tuple  # dtypes a stored moment may have and still be converted

    @property
    def name(self) -> str:
        """The kernel's name for this format (``BucketKey.state``)."""
        return {torch.complex64: "float32", torch.complex128: "float64"}.get(
            self.dtype, str(self.dtype).replace("torch.", ""))

    def check(self, p: Tensor, key: str, state: dict, name: str) -> bool:
        """Raise if moment ``key`` of ``state`` cannot be stepped with ``p``; True if it
        must be created or converted."""
        value = state.get(key)
        other = _other_form(state, key, "dense") if value is not None else None
        if other is not None:  # codes beside the dense moment: they are the newer
            _check_other_form(p, key, state, other, name)
            return True
        if value is None:
            bits = _quantized_bits(state, key)
            problem = None if bits is None else _quantized_problem(p, key, state, bits)
            if problem is not None:
                raise _stale(codes_key(key, bits), problem, name)
            return True
        problem = _tensor_problem(p, key, value, self.accepts, name)
        if problem is not None:
            raise _stale(key, problem, name)
        return value.dtype != self.dtype or not in_layout(local_tensor(value), local_tensor(p))

    def prepare(self, p: Tensor, key: str, state: dict) -> None:
        value = state.get(key)
        fmt = _memory_format(local_tensor(p))
        other = _other_form(state, key, "dense") if value is not None else None
        if value is None or other is not None:
            full = read_moment(p, key, state, other)
            if full is None:
                state[key] = torch.zeros_like(p, dtype=self.dtype, memory_format=fmt)
            else:
                state[key] = like(p, self.dtype, fmt, full)
        else:
            state[key] = _fit(p, value, self.dtype)
        _drop_forms(state, key, keep="dense")

    def kernel_tensors(self, state: dict, key: str) -> tuple[Tensor, None]:
        return state[key], None

    def export(self, p: Tensor, key: str, saved: dict, out: dict) -> None:
        out[key] = saved[key]

    def bytes_per_elem(self) -> float:
        return STATE_BYTES[self.name] * (2 if self.dtype.is_complex else 1)


@dataclass(frozen=True)
class QuantizedMoments:
    """Moments stored as blockwise-quantized codes (``<key>_8bit`` or ``<key>_4bit``,
    uint8, flat in the order the kernel steps the param's elements) and one bf16 scale
    per ``QUANT_BLOCK`` elements (``<key>_scales``); see ``tritonadam.quantize``."""

    bits: int

    @property
    def name(self) -> str:
        return f"{self.bits}bit"

    def check(self, p: Tensor, key: str, state: dict, name: str) -> bool:
        ck = codes_key(key, self.bits)
        other = _other_form(state, key, self.bits) if ck in state else None
        if other is not None:  # another form beside the codes: it is the newer
            _check_other_form(p, key, state, other, name)
            return True
        if ck in state:
            for k in (ck, scales_key(key)):  # named alone where its memory is gone
                t = state.get(k)
                problem = storage_problem(local_tensor(t)) if isinstance(t, Tensor) else None
                if problem is not None:
                    raise _stale(k, problem, name)
            problem = _quantized_problem(p, key, state, self.bits)
            if problem is not None:
                raise _stale(ck, problem, name)
            lp = local_tensor(p)
            shape = _ENCODED_SHAPE.get(local_tensor(state[ck]))
            if shape is not None and shape != tuple(lp.shape):
                raise _stale(ck, f"the codes of a param of shape {shape} for a param of shape "
                             f"{tuple(lp.shape)}", name)
            codes, scales = state[ck], state[scales_key(key)]
            order = element_order(lp)
            return not all(
                isinstance(t, Tensor) and t.device == lp.device and t.dim() == 1 and t.is_contiguous()
                for t in (codes, scales)
            ) or scales.dtype != torch.bfloat16 or _quantized_form(codes, scales, lp.numel(), self.bits) != "blocks" \
                or _ENCODED_IN.get(codes, order) != order
        DenseMoments(torch.float32, _DENSE_ACCEPTS).check(p, key, state, name)  # raises if it cannot be read
        return True  # no codes: quantized from the dense moment, or created

    def prepare(self, p: Tensor, key: str, state: dict) -> None:
        lp = local_tensor(p)
        ck, sk = codes_key(key, self.bits), scales_key(key)
        codes, scales = local_tensor(state.get(ck, lp)), local_tensor(state.get(sk, lp))
        order = element_order(lp)
        other = _other_form(state, key, self.bits) if ck in state else None
        if ck in state and other is None and _quantized_form(codes, scales, lp.numel(), self.bits) == "blocks" \
                and _ENCODED_IN.get(codes, order) == order:
            state[ck] = codes.detach().reshape(-1).to(lp.device).contiguous()
            state[sk] = scales.detach().reshape(-1).to(lp.device, torch.bfloat16).contiguous()
        else:
            full = read_moment(p, key, state, other)
            if full is None:  # a fresh moment: every scale 0 decodes to exactly 0
                codes = torch.zeros(quantize.code_bytes(lp.numel(), self.bits), dtype=torch.uint8, device=lp.device)
                scales = torch.zeros(quantize.num_scales(lp.numel()), dtype=torch.bfloat16, device=lp.device)
            else:
                # requantize: a moment that left as its decoded codes comes back as them.
                codes, scales = quantize.requantize(_memory_order(lp, full.to(lp.device)), self.bits, _signed(key))
            state[ck], state[sk] = codes, scales
        _record(state[ck], order, lp.shape)
        _drop_forms(state, key, keep=self.bits)

    def kernel_tensors(self, state: dict, key: str) -> tuple[Tensor, Tensor]:
        return state[codes_key(key, self.bits)], state[scales_key(key)]

    def export(self, p: Tensor, key: str, saved: dict, out: dict) -> None:
        """Under the keys the state holds them (torch's flattened state dicts rebuild a
        param's state from its optimizer's keys): codes and scales shaped by the param's
        rows where blocks fall on row boundaries (any sharding along dim 0 then splits
        them where it splits the param, and DCP reshards them with it); flat for other
        plain params whose codes count elements in logical order. Otherwise a code and a
        scale per element, laid out (and sharded) like the param: DTensor params whose
        blocks start at each shard (1-D and odd-shaped params, few elements), and params
        whose codes follow other strides (transposed, channels-last), which a load into
        any layout reads right (3 bytes per element at either width: a uint8 code, a bf16 scale)."""
        ck, sk = codes_key(key, self.bits), scales_key(key)
        codes, scales = saved[ck], saved[sk]
        lp = local_tensor(p)
        order = _ENCODED_IN.get(local_tensor(codes), element_order(lp))
        logical = order == logical_order(lp)
        rows = _block_rows(p) if logical else None
        if rows is None:
            if lp is p and logical and not _in_process_group():
                out[ck], out[sk] = codes, scales
            else:
                # Blocks in another order than the param's indices (a transposed or
                # channels-last param) mean nothing to a param laid out otherwise at load;
                # blocks counted from a shard's start (or, in a process group, from the
                # whole param's, which FSDP2 or DCP may shard) mean nothing to other shards.
                template = _laid_out(lp, order)
                e_codes, e_scales = quantize.per_element(codes, scales, lp.numel(), self.bits)
                out[ck] = like(p, torch.uint8, torch.contiguous_format, _logical(template, e_codes))
                out[sk] = like(p, torch.bfloat16, torch.contiguous_format, _logical(template, e_scales))
            return
        local_rows, global_rows = lp.shape[0] if lp.dim() else 1, rows
        per_row = lp.numel() // max(local_rows, 1) if local_rows else p.numel() // max(global_rows, 1)
        shapes = {ck: per_row // (8 // self.bits), sk: per_row // quantize.QUANT_BLOCK}
        for k, t in ((ck, codes), (sk, scales)):
            local = t.reshape(local_rows, shapes[k])
            out[k] = local if lp is p else _as_dtensor(p, local, (global_rows, shapes[k]))

    def bytes_per_elem(self) -> float:
        return STATE_BYTES[self.name]


def _block_rows(p: Tensor) -> int | None:
    """Dim 0 of ``p`` when quantization blocks fall on its row boundaries (rows of a
    multiple of QUANT_BLOCK elements, a contiguous local tensor, sharded along dim 0 at
    most), else None."""
    lp = local_tensor(p)
    if p.dim() == 0 or p.shape[0] == 0 or not lp.is_contiguous():
        return None
    per_row = p.numel() // p.shape[0]
    if per_row % quantize.QUANT_BLOCK:
        return None
    if lp is not p and any(pl.is_shard() and pl.dim != 0 or pl.is_partial() for pl in p.placements):
        return None
    return p.shape[0]


def _shards_start_on_blocks(p: Tensor) -> bool:
    """Whether every shard of DTensor ``p`` starts on a quantization block of the whole
    param (so block codes of the whole param split onto its shards right), told from its
    global shape and placements alone, the same on every rank: replicated, or sharded once
    along dim 0 in chunks of a whole number of blocks. Anything else is not claimed."""
    from torch.distributed.tensor import Shard

    sharded = [(dim, pl) for dim, pl in enumerate(p.placements) if not pl.is_replicate()]
    if not sharded:
        return True
    if len(sharded) > 1 or type(sharded[0][1]) is not Shard or sharded[0][1].dim != 0 or p.dim() == 0:
        return False
    rows = p.shape[0]
    chunk = -(-rows // p.device_mesh.size(sharded[0][0]))  # torch.chunk's split of dim 0
    return rows == 0 or chunk * (p.numel() // rows) % quantize.QUANT_BLOCK == 0


def _as_dtensor(p: Tensor, local: Tensor, shape: tuple) -> Tensor:
    from torch.distributed.tensor import DTensor

    stride = (shape[1], 1)
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


# Step counts: float32, or float64 where torch.optim makes them so (the prepare kernel
# reads and writes either).
STEP_DTYPES = (torch.float32, torch.float64)


def _countable(step, lp: Tensor) -> bool:
    """Whether the kernels can count in ``step`` itself, as torch.optim's ``step_t += 1``
    does: a one-element float count beside the param (an A3C-style ``torch.zeros(1)``
    shared between processes keeps counting for all of them). Anything else is replaced
    by a new count of its value."""
    return (isinstance(step, Tensor) and step.dtype in STEP_DTYPES and step.numel() == 1
            and local_tensor(step) is step and step.device == lp.device and not step.is_neg())


def new_step_dtype(group: dict) -> torch.dtype:
    """torch.optim's dtype for a new step count: float64 under a float64 default dtype,
    except with ``fused=True`` (torch's ``_get_scalar_dtype``), else float32."""
    if group.get("fused"):
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def loaded_step_dtype(value, group: dict) -> torch.dtype:
    """The dtype a loaded step count gets, as torch.optim gives it: a number becomes a new
    count (``__setstate__``); a tensor becomes float32 in capturable or fused groups
    (``load_state_dict``), else a float64 one is kept."""
    if not isinstance(value, Tensor):
        return new_step_dtype(group)
    if group.get("capturable") or group.get("fused"):
        return torch.float32
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def loaded_step_device(value, group: dict, param_device: torch.device) -> torch.device:
    """Where torch.optim leaves a loaded step count: on the param's device in capturable or
    fused groups, else where the state dict had it (a number: on the CPU). A count left
    elsewhere is moved to the param's device by the next step, where the kernels advance
    it without a host sync."""
    if group.get("capturable") or group.get("fused"):
        return param_device
    return value.device if isinstance(value, Tensor) else torch.device("cpu")


@dataclass(frozen=True)
class ParamFormat:
    """How one param's state is stored: its moments, its master copy, and whether any of
    its 16-bit values are rounded stochastically."""

    moments: DenseMoments
    master: Master = Master.NONE
    stochastic: bool = False

    @property
    def master_key(self) -> str | None:
        return _MASTER_KEYS.get(self.master)

    def check(self, p: Tensor, state: dict, keys: tuple[str, ...], name: str) -> bool:
        """Raise if ``state`` cannot be stepped with ``p``; True if it needs creating or
        converting.

        A param whose shape, dtype or device no longer matches its state (``p.data = ...``
        after steps, a model moved without its optimizer) gets an error saying what to
        do. What the formats can convert is converted instead: a layout change alone
        (same shape, other strides: torch.optim steps elementwise by index, so the state
        is re-laid out to the param's strides), moments in fp32 or bf16, a master copy in
        either form.
        """
        if not isinstance(state, dict):
            raise RuntimeError(
                f"tritonadam.{name}: the state of a param of shape {tuple(p.shape)} is a "
                f"{type(state).__name__}, not a dict; load a state dict, or clear this param's "
                "state (`opt.state.pop(param)`) to restart it")
        if not state:
            return True
        missing = [k for k in ("step",) + keys[:2]
                   if k not in state and (k == "step" or _quantized_bits(state, k) is None)]
        if missing:
            raise RuntimeError(
                f"tritonadam.{name}: the state of a param of shape {tuple(p.shape)} has "
                f"{sorted(state)} but lacks {missing}; load a complete state dict, or clear "
                "this param's state (`opt.state.pop(param)`) to restart it"
            )
        step = state["step"]
        if not (isinstance(step, numbers.Real) or isinstance(step, Tensor) and step.numel() == 1
                and not step.is_complex()):
            raise RuntimeError(
                f"tritonadam.{name}: state['step'] of a param of shape {tuple(p.shape)} is "
                f"{_describe(step)}, not a step count; set it to a number or a one-element tensor, "
                "or clear this param's state (`opt.state.pop(param)`) to restart it")
        if isinstance(step, Tensor) and storage_problem(local_tensor(step)) is not None:
            raise _stale("step", storage_problem(local_tensor(step)), name)
        convert = False
        for key in keys:
            convert |= self.moments.check(p, key, state, name)
        if SEED_KEY in state and _seed_problem(state[SEED_KEY]) is not None:
            raise RuntimeError(f"tritonadam.{name}: state[{SEED_KEY!r}] {_seed_problem(state[SEED_KEY])}; "
                               "set it to the integer seed of this param's stochastic rounding, or remove it "
                               "to use the optimizer's seed")
        for key, dtypes in _MASTER_DTYPES.items():
            if key in state:
                problem = _tensor_problem(p, key, state[key], dtypes, name)
                if problem is not None:
                    raise _stale(key, problem, name)
                convert |= state[key].dtype != dtypes[0] or not in_layout(local_tensor(state[key]), local_tensor(p))
        return convert or not self._complete(p, state)

    def _complete(self, p: Tensor, state: dict) -> bool:
        """Whether ``state`` holds exactly the entries this format keeps (besides the
        moments, which ``check`` looked at)."""
        step = state.get("step")
        return (
            _countable(step, local_tensor(p))
            and (MASTER_KEY in state) == (self.master == Master.FP32)
            and (REMAINDER_KEY in state) == (self.master == Master.REMAINDER)
            and (SEED_KEY in state) == self.stochastic
        )

    def prepare(self, p: Tensor, state: dict, keys: tuple[str, ...], seed: int | None,
                step_dtype: torch.dtype = torch.float32) -> None:
        """Create missing entries and convert what other formats store into this one.
        ``step_dtype``: a new step count's (``new_step_dtype``); an existing float32 or
        float64 count keeps its own.

        Converting a master can write the param (a remainder's param holds the master's
        high half): call under ``torch.no_grad()``.
        """
        lp = local_tensor(p)
        step = state.get("step", 0.0)
        if not _countable(step, lp):
            if isinstance(step, Tensor) and step.dtype in STEP_DTYPES:
                step_dtype = step.dtype
            state["step"] = torch.tensor(float(step), dtype=step_dtype, device=lp.device)
        for key in keys:
            self.moments.prepare(p, key, state)
        if self.master == Master.FP32:
            if MASTER_KEY not in state:
                if REMAINDER_KEY in state:
                    joined = join_master(lp, local_tensor(state[REMAINDER_KEY]))
                    state[MASTER_KEY] = like(p, torch.float32, _memory_format(lp), joined)
                else:
                    state[MASTER_KEY] = p.detach().to(torch.float32, memory_format=_memory_format(lp), copy=True)
            state[MASTER_KEY] = _fit(p, state[MASTER_KEY], torch.float32)
            state.pop(REMAINDER_KEY, None)
        elif self.master == Master.REMAINDER:
            if MASTER_KEY in state:
                # The exact pair for this master: the param becomes its high half.
                high, low = split_master(local_tensor(state.pop(MASTER_KEY)))
                lp.copy_(high)
                state[REMAINDER_KEY] = like(p, torch.int16, _memory_format(lp), low)
            elif REMAINDER_KEY not in state:
                state[REMAINDER_KEY] = torch.zeros_like(p, dtype=torch.int16, memory_format=_memory_format(lp))
            state[REMAINDER_KEY] = _fit(p, state[REMAINDER_KEY], torch.int16)
        else:
            _adopt_master(lp, state)
            state.pop(MASTER_KEY, None)
            state.pop(REMAINDER_KEY, None)
        if self.stochastic:
            own = state.get(SEED_KEY)  # kept: the seed this param's numbers were drawn with
            state[SEED_KEY] = torch.tensor(int(own) if own is not None else seed, dtype=torch.int64)
        else:
            state.pop(SEED_KEY, None)

    def export(self, p: Tensor, saved: dict) -> dict:
        """``saved`` (this param's entry of torch's state dict) as ``state_dict()`` gives
        it: every entry under the key the state holds it (torch's flattened state dicts
        rebuild a param's state from its optimizer's own keys), a remainder joined by the
        fp32 master it stands for, so the checkpoint loads into either master mode and
        into torch.optim whatever order params and state are loaded in; quantized
        moments as codes and scales, shaped so that DCP can reshard them
        (``QuantizedMoments.export``).

        An FSDP1 shard's state at full precision instead (``export_full``): FSDP1's
        optimizer state dicts (``FSDP.optim_state_dict``, DCP's ``get_optimizer_state_dict``)
        all-gather every state tensor of a flat param element for element with the
        shard, and with ``use_orig_params=True`` all of them in one dtype, which neither
        block codes and scales nor an int16 remainder beside an fp32 master are. Loading
        converts back: the same codes, the same remainder."""
        if is_fsdp1_shard(p):
            return self.export_full(p, saved, _MOMENT_KEYS)
        return self._export(p, saved)

    def _export(self, p: Tensor, saved: dict) -> dict:
        out = dict(saved)
        if isinstance(self.moments, QuantizedMoments):
            suffix = f"_{self.moments.bits}bit"
            for ck in [k for k in saved if k.endswith(suffix)]:
                key = ck[: -len(suffix)]
                out.pop(ck), out.pop(scales_key(key), None)
                self.moments.export(p, key, saved, out)
        if self.master == Master.REMAINDER and REMAINDER_KEY in saved:
            remainder = saved[REMAINDER_KEY]
            joined = join_master(local_tensor(p), local_tensor(remainder))
            out[MASTER_KEY] = like(p, torch.float32, torch.preserve_format, joined)
            if local_tensor(p) is not p or _in_process_group():
                # A state dict in a process group may travel by collective (a DTensor's full
                # state dict is gathered, a full one broadcast from rank 0), and neither
                # NCCL nor gloo has int16: the same values as int32.
                out[REMAINDER_KEY] = remainder.to(torch.int32)
        return out

    def exported_keys(self, p: Tensor, state: dict) -> set[str]:
        """The keys ``export`` gives this param's ``state`` (not an FSDP1 shard's)."""
        keys = set(state)
        if self.master == Master.REMAINDER and REMAINDER_KEY in state:
            keys.add(MASTER_KEY)
        return keys

    def export_full(self, p: Tensor, state: dict, keys: tuple[str, ...]) -> dict:
        """This param's state as torch.optim keeps it: every moment at full precision
        (fp32; fp64 for fp64 params, complex for complex ones, as torch keeps them) under
        torch's keys, the master as ``master_param``."""
        out = {k: v for k, v in self._export(p, state).items()
               if not (k.endswith("bit") or k.endswith("_scales") or k == REMAINDER_KEY)}
        dtype = p.dtype if p.dtype in (torch.float64, torch.complex64, torch.complex128) else torch.float32
        for key in keys:
            full = read_moment(p, key, state)
            if full is not None and not (isinstance(out.get(key), Tensor) and out[key].dtype == dtype):
                out[key] = like(p, dtype, torch.preserve_format, full)
        return out

    def tensors(self, state: dict, keys: tuple[str, ...]) -> tuple:
        """(data, scales or None) of each moment in ``keys`` order, and the master or None."""
        moments = tuple(self.moments.kernel_tensors(state, key) for key in keys)
        return moments, state[self.master_key] if self.master_key else None

    def bucket_key(self, param_dtype: torch.dtype, grad_dtype: torch.dtype, amsgrad: bool) -> BucketKey:
        """The launch this param's tensors join (dtypes of the real views for complex)."""
        return BucketKey(param_dtype, grad_dtype, self.moments.name, amsgrad, self.master, self.stochastic)


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


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
            value = policy.format(p).export_full(p, value, moment_keys(algorithm, group.get("amsgrad", False)))
            value.pop(SEED_KEY, None)
        out[i] = value
    return out


def check_loadable(name: str, algorithm: str, param_groups: list[dict], state_dict: dict) -> None:
    """Raise unless every param state in ``state_dict`` is one these params can load."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        return  # torch's own check raises with its message
    saved_state = state_dict["state"]
    where = f"tritonadam.{name}.load_state_dict"
    for group, saved_group in zip(param_groups, saved_groups):
        if len(group["params"]) != len(saved_group["params"]):
            return  # torch's own check raises with its message
        amsgrad = saved_group.get("amsgrad", group.get("amsgrad", False))
        required = ["step", *moment_keys(algorithm, amsgrad)]
        for saved_id, p in zip(saved_group["params"], group["params"]):
            state = saved_state.get(saved_id)
            if not state:
                continue
            missing = [k for k in required if k not in state and (k == "step" or _quantized_bits(state, k) is None)]
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
            if SEED_KEY in state and _seed_problem(state[SEED_KEY]) is not None:
                seed = state[SEED_KEY]
                hint = ("; torch.optim's load_state_dict casts every state tensor to its param's "
                        "dtype, so this state dict went through torch.optim: remove "
                        f"{SEED_KEY!r} from each param's state to round with this optimizer's "
                        "seed") if isinstance(seed, Tensor) and seed.is_floating_point() else ""
                raise ValueError(f"{where}: state {SEED_KEY!r} of param {saved_id} "
                                 f"{_seed_problem(seed)}{hint}")
            for key, value in state.items():
                if key in ("step", SEED_KEY):
                    continue
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
                    continue
                if expected is not None:
                    if value.numel() not in expected:
                        raise ValueError(f"{where}: state {key!r} of param {saved_id} has {value.numel()} "
                                         f"elements where a param of shape {tuple(p.shape)} needs "
                                         f"{expected[0]} (or one per element, {expected[1]})")
                    problem = _saved_quantized_problem(key, value, state, p.numel())
                    if problem is not None:
                        raise ValueError(f"{where}: state {key!r} of param {saved_id} {problem}")
                    if (key.endswith("_scales") and local_tensor(p) is not p and local_tensor(value) is not value
                            and _block_rows(p) is None and value.numel() != p.numel()
                            and not _shards_start_on_blocks(p)):
                        # Checked on global sizes: every rank refuses alike (no rank left waiting).
                        raise ValueError(
                            f"{where}: state {key!r} of param {saved_id} holds a scale per block of the "
                            "whole param (a checkpoint of an unsharded model), split across the shards "
                            "by the state dict's distribution: shards that start inside a block would "
                            "read other blocks' scales. Save that checkpoint at full precision "
                            "(`opt.torch_state_dict()`), or load it with `opt.load_state_dict` "
                            "unsharded, which re-encodes each shard's blocks")
                    continue
                if key not in _TENSOR_KEYS:
                    continue  # an entry of the user's (a wrapper's count, ...): kept, as torch keeps it
                if value.shape != p.shape:
                    raise ValueError(f"{where}: state {key!r} of param {saved_id} has shape "
                                     f"{tuple(value.shape)}, but the param has shape {tuple(p.shape)}")
                if key != REMAINDER_KEY and not (value.is_floating_point() or value.is_complex()):
                    raise ValueError(f"{where}: state {key!r} of param {saved_id} has dtype "
                                     f"{value.dtype}, expected a floating point tensor")


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


# Keys whose value must be a tensor (besides quantized codes and scales).
_TENSOR_KEYS = frozenset({*_MOMENT_KEYS, MASTER_KEY, REMAINDER_KEY})


def _saved_quantized_problem(key: str, value: Tensor, state: dict, numel: int) -> str | None:
    """What is wrong with quantized codes or scales ``state[key]`` besides their size, or
    None: codes must be uint8 and come with their scales in the same form (read together
    on load)."""
    if key.endswith("_scales"):
        return None if value.is_floating_point() else f"has dtype {value.dtype}, expected bfloat16 scales"
    if value.dtype != torch.uint8:
        return f"has dtype {value.dtype}, expected uint8 codes"
    sk = scales_key(key[: -len("_8bit")])  # "_8bit" and "_4bit" are as long
    scales = state.get(sk)
    if sk in state and not isinstance(scales, Tensor):
        return f"comes with {sk!r} as a {type(scales).__name__}, not a tensor of block scales"
    if not isinstance(scales, Tensor):
        return f"comes without {sk!r}, the block scales its codes are read with"
    if _quantized_form(value, scales, numel, int(key[-4])) is None:
        return f"and {sk!r} hold {value.numel()} codes and {scales.numel()} scales: not one form"
    return None


def _saved_numel(key: str, numel: int) -> tuple[int, int] | None:
    """The elements a quantized moment's codes or scales may hold for a param of
    ``numel`` (block form, per-element form), or None when ``key`` is not one of theirs."""
    if key.endswith("_scales"):
        return (quantize.num_scales(numel), numel)
    bits = _codes_bits(key)
    return None if bits is None else (quantize.code_bytes(numel, bits), numel)


def _codes_bits(key: str) -> int | None:
    """The bit width of a quantized moment's codes key (``exp_avg_8bit``), else None."""
    for bits in QUANTIZED.values():
        if key.endswith(f"_{bits}bit"):
            return bits
    return None


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
        whole = [k for k, v in entry.items() if isinstance(v, Tensor) and v.dim() > 0 and local_tensor(v) is v]
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
            if value.shape == p.shape and not k.endswith("_scales"):
                out[k] = split(value, p.placements)
            continue  # scales go with their codes; another shape is check_loadable's to report
        key = k[: -len("_8bit")]
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
            not pl.is_shard() or pl.dim == 0 for pl in scales.placements)
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


def restore_loaded(algorithm: str, policy: "StatePolicy", seed: int | None, param_groups: list[dict],
                   state_dict: dict, state: dict) -> int | None:
    """After torch's ``load_state_dict`` (which cast floating state to the param dtype):
    restore what ``state_dict`` held at full precision and convert it to these params'
    formats. Returns the rounding seed it held, if any."""
    saved_state = state_dict["state"]
    pairs = [
        (saved_id, p, group)
        for group, saved in zip(param_groups, state_dict["param_groups"])
        for saved_id, p in zip(saved["params"], group["params"])
    ]
    loaded_seed = None
    steps = {}
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
            elif isinstance(value, Tensor) and (key in _TENSOR_KEYS or key.endswith("_scales")
                                                or _codes_bits(key) is not None):
                dst[key] = value.detach().clone()  # converted to this format below
                if _codes_bits(key) is not None:
                    _record(local_tensor(dst[key]), logical_order(local_tensor(p)), local_tensor(p).shape)
    seed = loaded_seed if loaded_seed is not None else seed
    with torch.no_grad():  # converting a master can set the param to its high half
        for _, p, group in pairs:
            if state.get(p):
                policy.format(p).prepare(p, state[p], moment_keys(algorithm, group.get("amsgrad", False)), seed,
                                         new_step_dtype(group))
                if p in steps:
                    value = steps[p]
                    state[p]["step"] = torch.tensor(
                        float(value.item() if isinstance(value, Tensor) else value),
                        dtype=loaded_step_dtype(value, group),
                        device=loaded_step_device(value, group, local_tensor(p).device),
                    )
    return loaded_seed


@dataclass(frozen=True)
class StatePolicy:
    """An optimizer's state options, and the :class:`ParamFormat` each param gets."""

    master_weights: bool | str = False  # False, True or "remainder"
    state_dtype: torch.dtype | str | None = None  # None: fp32 (fp64 for fp64 params); "8bit", "4bit"
    stochastic_rounding: bool = False

    @classmethod
    def checked(cls, master_weights, state_dtype, stochastic_rounding, name: str) -> "StatePolicy":
        """The options, or a ValueError saying which combination cannot work and why."""
        if master_weights not in (False, True, "remainder"):
            raise ValueError(f"Invalid master_weights: {master_weights!r} (False, True or 'remainder')")
        if state_dtype not in (None, torch.float32, torch.bfloat16, *QUANTIZED):
            raise ValueError(
                f"Invalid state_dtype: {state_dtype!r} (None for float32, torch.bfloat16, "
                "or '8bit' / '4bit' for blockwise-quantized moments)"
            )
        if not isinstance(stochastic_rounding, bool):
            raise ValueError(f"Invalid stochastic_rounding: {stochastic_rounding!r} (True or False)")
        if stochastic_rounding and master_weights and state_dtype in (None, torch.float32):
            raise ValueError(
                f"tritonadam.{name}: stochastic_rounding=True rounds what is kept in 16 bits or "
                f"fewer without a master copy (params, bf16 or quantized state); with "
                f"master_weights={master_weights!r} and float32 state nothing is: drop one of the "
                "two, or add state_dtype=torch.bfloat16, '8bit' or '4bit'"
            )
        return cls(master_weights, state_dtype if state_dtype != torch.float32 else None,
                   stochastic_rounding)

    def check_block_size(self, block_size: int | None, name: str) -> None:
        """Quantized moments are stepped in whole groups of quantization blocks."""
        if block_size is not None and self.state_dtype in QUANTIZED and block_size % QUANT_MIN_FULL:
            raise ValueError(
                f"tritonadam.{name}: state_dtype={self.state_dtype!r} steps whole groups of "
                f"{QUANT_MIN_FULL} elements per program; use a block_size that is a multiple of "
                f"{QUANT_MIN_FULL}, or None (autotuned)"
            )

    def check_param(self, p: Tensor, name: str) -> None:
        """Raise for a param these options cannot step."""
        if self.master_weights == "remainder" and p.dtype == torch.float16:
            raise ValueError(
                f"tritonadam.{name}: master_weights='remainder' keeps the fp32 master of bf16 "
                "params in 2 extra bytes; float16 params cannot split that way: use "
                "master_weights=True for them"
            )
        if self.state_dtype is not None and (p.dtype == torch.float64 or p.dtype in COMPLEX):
            raise ValueError(
                f"tritonadam.{name}: state_dtype={self.state_dtype} is for float32/16 and bfloat16 "
                f"params, got {p.dtype}"
            )

    def idle_options(self, dtypes) -> list[str]:
        """Why each option that changes nothing for params of ``dtypes`` does (to warn)."""
        if not dtypes:
            return []
        idle = []
        if self.master_weights and not any(d in LOW_PRECISION for d in dtypes):
            idle.append(f"master_weights={self.master_weights!r} changes nothing for these params "
                        "(float32/float64 params are their own master); drop it, or use it with "
                        "fp16/bf16 params")
        if self.stochastic_rounding and not any(self.format_for(d).stochastic for d in dtypes):
            idle.append("stochastic_rounding=True changes nothing for these params (float32/float64 "
                        "params with float32 state round nothing); drop it, or use it with fp16/bf16 "
                        "params, state_dtype=torch.bfloat16 or a quantized state_dtype")
        return idle

    def format(self, p: Tensor) -> ParamFormat:
        return self.format_for(p.dtype)

    @functools.lru_cache(maxsize=None)  # noqa: B019 - a few dtypes per (immutable) policy
    def format_for(self, dtype: torch.dtype) -> ParamFormat:
        if dtype in COMPLEX:
            moments = DenseMoments(dtype, (dtype,))  # complex state, as torch.optim keeps it
        elif dtype == torch.float64:
            moments = DenseMoments(torch.float64, (torch.float64,))
        elif self.state_dtype in QUANTIZED:
            moments = QuantizedMoments(QUANTIZED[self.state_dtype])
        else:
            moments = DenseMoments(self.state_dtype or torch.float32, (torch.float32, torch.bfloat16))
        master = Master.NONE
        if self.master_weights and dtype in LOW_PRECISION:
            master = Master.REMAINDER if self.master_weights == "remainder" else Master.FP32
        param_rounded = dtype in LOW_PRECISION and master == Master.NONE
        stochastic = self.stochastic_rounding and (param_rounded or moments.name != "float32")
        return ParamFormat(moments, master, stochastic)


def variant(optimizer: str, param_dtype: torch.dtype, grad_dtype: torch.dtype | None = None, *,
            amsgrad: bool = False, master_weights=False, state_dtype=None,
            stochastic_rounding: bool = False) -> Variant:
    """The kernel variant ``tritonadam.<optimizer>`` ("adam", "adamw" or "adamax") with
    these constructor options steps a param of ``param_dtype`` with: what its launch is
    tuned by (``.autotune_key()``), the bytes one step moves per param (``.traffic()``,
    ``.bytes_per_elem()``) and the bytes of state kept per param
    (``.state_bytes_per_elem()``)."""
    policy = StatePolicy.checked(master_weights, state_dtype, stochastic_rounding, optimizer)
    policy.check_param(torch.empty(0, dtype=param_dtype), optimizer)
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}
    grad_dtype = grad_dtype or param_dtype
    key = policy.format_for(param_dtype).bucket_key(
        real.get(param_dtype, param_dtype), real.get(grad_dtype, grad_dtype), amsgrad and optimizer != "adamax")
    return Variant(optimizer, key)


def master_follows_param(p: Tensor, state: dict) -> None:
    """Where ``p`` (fp16/bf16) is no longer its fp32 master rounded, the master takes the
    param's value. Run at the first step after a load: a state dict without a master (from
    torch.optim) got one made from the params as they were then, and a params' load after
    the optimizer's (``set_optimizer_state_dict`` before ``set_model_state_dict``, or a
    full state dict merged with the optimizer's own earlier state) leaves the master of
    the old params, which the step would write back over the loaded ones."""
    master, lp = state.get(MASTER_KEY), local_tensor(p)
    if not isinstance(master, Tensor) or lp.dtype not in (torch.bfloat16, torch.float16):
        return
    lm = local_tensor(master)
    if lm.shape != lp.shape or lm.dtype != torch.float32 or lm.device != lp.device:
        return
    stale = ~_rounded_from(lm, lp, (lp.dtype,))
    with torch.no_grad():
        lm.copy_(torch.where(stale, lp.float(), lm))  # no host sync: once, whatever it finds


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
