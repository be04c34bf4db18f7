"""Element orders: quantized codes follow a param's memory order, exported state its
logical order, and each encoded tensor remembers which it holds."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..tensors import is_dense, local_tensor


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
