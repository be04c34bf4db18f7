"""The moments' formats: dense (fp32, fp64, complex or bf16) and blockwise-quantized."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import quantize
from ..tensors import in_layout, like, local_tensor, sharded, split_dim, storage_problem
from .entries import (
    _DENSE_ACCEPTS, QUANTIZED, codes_key, _describe, _drop_forms, _fit, _memory_format, _quantized_bits, scales_key,
    _signed, _stale, _tensor_problem, placed_unlike, placement_problem, shape_of,
)
from .orders import (
    _ENCODED_IN, _ENCODED_SHAPE, element_order, _laid_out, _logical, logical_order, _memory_order, _record,
)


def _quantized_problem(p: Tensor, key: str, state: dict, bits: int) -> str | None:
    """Why the quantized form of ``key`` cannot stand for ``p``'s moment, or None."""
    codes, scales = state.get(codes_key(key, bits)), state.get(scales_key(key))
    if not isinstance(codes, Tensor):
        return f"{_describe(codes)}, not uint8 codes"
    if not isinstance(scales, Tensor):
        return f"{codes_key(key, bits)} without {scales_key(key)}"
    lp = local_tensor(p)
    n = lp.numel()
    lc, ls = local_tensor(codes), local_tensor(scales)
    unlike = [t for t in (codes, scales) if placed_unlike(t, p)]
    if unlike:
        # Only a code and a scale per element, shaped like the param, can be
        # redistributed like it (``align_placements``); blocks have no element layout.
        for t in (codes, scales):
            if local_tensor(t) is t:
                return (f"codes of shape {shape_of(codes)} and scales of shape {shape_of(scales)} for a param of "
                        f"shape {shape_of(p)}: a DTensor beside a plain tensor; per element, both are placed "
                        "like the param")
            problem = placement_problem(t, p)
            if problem is not None:
                return problem
        if not codes.shape == scales.shape == p.shape:
            return (f"codes of shape {shape_of(codes)} and scales of shape {shape_of(scales)} placed "
                    f"{tuple(unlike[0].placements)} for a param of shape {shape_of(p)} placed "
                    f"{tuple(p.placements)}: only a code and a scale per element, shaped like the "
                    "param, can be placed otherwise")
    else:
        form = _quantized_form(lc, ls, n, bits)
        if form is None:
            return (f"{lc.numel()} code bytes and {ls.numel()} scales for a param of {n} elements, "
                    f"shape {shape_of(p)}")
        # A code per element is laid out like the param (read back reshaped to its local
        # shape): of the same size but another shape, or a transposed weight's, it steps
        # other elements' moments. Flat block codes have no shape to compare.
        if form == "elements" and (codes.shape != p.shape or lc.shape != lp.shape):
            return f"a code per element in shape {shape_of(codes)} for a param of shape {shape_of(p)}"
        if form == "elements" and sharded(p) and (lc is codes or ls is scales):
            # Plain codes of a DTensor param are its shard's blocks; per element, plain ones
            # are each rank's whole value, which a shape check alone passes only on a rank
            # whose shard happens to be the whole param.
            return (f"a code per element in a plain tensor of shape {tuple(lc.shape)} for a DTensor param of "
                    f"shape {shape_of(p)} placed {tuple(p.placements)}: place codes and scales like the param "
                    "(`torch.distributed.tensor.distribute_tensor(value, p.device_mesh, p.placements)`)")
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
    if codes.numel() == numel and scales.numel() == numel and codes.shape == scales.shape:
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
        return value.dtype != self.dtype or not in_layout(local_tensor(value), local_tensor(p)) \
            or placed_unlike(value, p)

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
            if placed_unlike(codes, p) or placed_unlike(scales, p):
                return True  # redistributed like the param, then encoded in blocks
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
        them where it splits the param, and DCP reshards them with it). Otherwise a code
        and a scale per element, laid out (and sharded) like the param, which a load into
        any sharding or layout reads right (3 bytes per element at either width: a uint8
        code, a bf16 scale): params whose blocks do not fall on rows (1-D and odd-row
        params, few elements in most models), sharded or not, and params whose codes
        follow other strides (transposed, channels-last)."""
        ck, sk = codes_key(key, self.bits), scales_key(key)
        codes, scales = saved[ck], saved[sk]
        lp = local_tensor(p)
        order = _ENCODED_IN.get(local_tensor(codes), element_order(lp))
        logical = order == logical_order(lp)
        if lp is p or all(split_dim(pl) is None for pl in p.placements):
            # One process, or a replicated DTensor (every rank holds the whole tensor, laid
            # out alike): its own layout decides, losslessly.
            rows = _block_rows(p) if logical else None
        else:
            # Shards: decided from the DTensor's global shape and placements alone. The
            # state dict's collectives gather each key's shards, so every rank must export
            # one form, and a shard's layout can look logical where another's does not (a
            # 1-row shard is contiguous whatever its strides). A shard whose codes follow
            # other strides (re-laid out by hand, which FSDP2 itself does not support) is
            # re-encoded in row order, within a quantization step.
            rows = _block_rows(p, local_layout=False)
            if rows is not None and not logical:
                values = _decoded(lp, key, local_tensor(codes), local_tensor(scales), self.bits)
                codes, scales = quantize.requantize(values.contiguous().reshape(-1), self.bits, _signed(key))
        if rows is None:
            # Blocks in another order than the param's indices (a transposed or
            # channels-last param) mean nothing to a param laid out otherwise at load;
            # blocks counted from a shard's start, or from the whole param's (which FSDP2
            # or DCP may shard at load), mean nothing to other shards. One process alone
            # exports this form too: DCP reads a checkpoint into tensors of the loading
            # optimizer's own export, so a form that depended on the process group would
            # not move between one process and FSDP2 shards.
            if lp is p and p.dim() == 0:
                # One code and one scale, shaped (1,) as the in-memory form (which they
                # equal: one element is one block): torch's full state dicts take 0-dim
                # tensors for scalars like ``step`` and fail to map them back by key.
                out[ck], out[sk] = codes, scales
                return
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


def _block_rows(p: Tensor, local_layout: bool = True) -> int | None:
    """Dim 0 of ``p`` when quantization blocks fall on its row boundaries (rows of a
    multiple of QUANT_BLOCK elements, sharded along dim 0 at most, and with
    ``local_layout`` a contiguous local tensor), else None."""
    if p.dim() == 0 or p.shape[0] == 0 or local_layout and not local_tensor(p).is_contiguous():
        return None
    per_row = p.numel() // p.shape[0]
    if per_row % quantize.QUANT_BLOCK:
        return None
    if local_tensor(p) is not p and any(split_dim(pl) not in (None, 0) or pl.is_partial() for pl in p.placements):
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
