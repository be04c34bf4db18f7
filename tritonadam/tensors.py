"""Tensor facts the launches rely on: local shards, memory layout and spans, shared memory.

The ground floor of the package: plain functions over tensors, used by the state
formats, the gathering of a step's tensors and the step cache alike.
"""
from __future__ import annotations

import contextlib
import math
import operator
import sys

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GRAD", "LOCAL", "as_real", "check_no_shared_memory", "in_layout", "is_dense", "is_fsdp1_shard",
    "like", "local_tensor", "on_device", "outside_inference_mode", "same_layout", "span", "storage_problem",
]

# DTensor's class once torch.distributed.tensor is loaded (by whoever made one: nothing is
# a DTensor before). Importing it here would load torch's symbolic-shapes stack, 2 s of
# import and a warnings filter, for every user.
DTensor = None


def _dtensor_class():
    global DTensor
    module = sys.modules.get("torch.distributed.tensor")
    if module is not None:
        DTensor = getattr(module, "DTensor", None)
    return DTensor

# The raw attribute: .grad's getter also checks for non-leaf access, at twice the cost.
# Its C descriptor called directly skips the attribute lookup through a Parameter's type
# (about a fifth of a pass over many params).
try:
    GRAD = torch._C.TensorBase.__dict__["_grad"].__get__
except (AttributeError, KeyError):  # pragma: no cover - older or changed torch
    GRAD = operator.attrgetter("_grad")
LOCAL = operator.attrgetter("_local_tensor")


@contextlib.contextmanager
def outside_inference_mode(written):
    """Make the tensors this package keeps (state, step tables, the clip's buffer,
    exported state) normal tensors under ``torch.inference_mode()`` too. An inference
    tensor cannot be updated in place outside inference mode, so one made by a step, clip
    or load there broke every later step, where torch.optim breaks only by creating its
    state there. Grad mode stays off, as inference mode had it. Not where a param the call
    writes (``written``: those with a grad or state) is an inference tensor itself (a
    model built under inference mode): it can be written only inside, and its state is
    made there, as torch.optim makes it. Yields whether it left inference mode."""
    if not torch.is_inference_mode_enabled() or any(local_tensor(p).is_inference() for p in written):
        yield False
        return
    with torch.inference_mode(False), torch.no_grad():
        yield True


def local_tensor(t: Tensor) -> Tensor:
    """The tensor a kernel can address: a DTensor's local shard (FSDP2), else t itself."""
    cls = DTensor or _dtensor_class()
    if cls is not None and isinstance(t, cls):
        return t._local_tensor
    return t


def split_dim(placement) -> int | None:
    """The tensor dim a DTensor placement splits across its mesh dim, or None (Replicate,
    Partial). ``Shard`` and ``_StridedShard`` alike: FSDP2 over tensor parallelism shards
    with ``_StridedShard``, which torch's ``is_shard()`` does not count as a shard."""
    return None if placement.is_replicate() or placement.is_partial() else placement.dim


def placed_unlike(t: Tensor, p: Tensor) -> bool:
    """Whether DTensor ``t`` holds other parts of its value than DTensor ``p`` on some
    rank: another mesh, or other placements along a mesh dim of more than one rank (on
    one rank, Partial, Shard and Replicate all hold the whole). Global metadata: every
    rank answers alike, where comparing local shapes can pass on one rank and fail on
    another. False unless both are DTensors."""
    if local_tensor(t) is t or local_tensor(p) is p:
        return False
    mesh = p.device_mesh
    if t.device_mesh != mesh:
        return True
    return any(a != b for dim, (a, b) in enumerate(zip(t.placements, p.placements)) if mesh.size(dim) > 1)


def sharded(p: Tensor) -> bool:
    """Whether DTensor ``p``'s ranks hold other parts of it (a placement other than
    Replicate along a mesh dim of more than one rank): told from global metadata."""
    if local_tensor(p) is p:
        return False
    mesh = p.device_mesh
    return any(not pl.is_replicate() for dim, pl in enumerate(p.placements) if mesh.size(dim) > 1)


def is_fsdp1_shard(t: Tensor) -> bool:
    """A FullyShardedDataParallel (FSDP1) flat param or one of its original params: plain
    tensors that hold this rank's slice of a flattened model (FSDP1 marks them)."""
    return getattr(t, "_fsdp_flattened", False)


def as_real(t: Tensor | None) -> Tensor | None:
    """Complex tensors are stepped elementwise on their real view, as torch.optim does."""
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


def is_dense(t: Tensor) -> bool:
    """True when the elements fill their memory span exactly once (any dim order)."""
    if t.is_contiguous() or t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def overlaps_itself(t: Tensor) -> bool:
    """True when two of ``t``'s elements are one memory location (``x.expand(...)``): a
    write through it lands twice. torch's own test for in-place ops (its answer "too hard
    to tell", for odd strides, counts as no, as torch treats it)."""
    return torch._debug_has_internal_overlap(t) == 1


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Same memory order for every element (strides of size-1 dims do not matter)."""
    if a.numel() <= 1:
        return True
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def in_layout(value: Tensor, param: Tensor) -> bool:
    """Whether a (local) state tensor sits where the kernel steps it with ``param``: same
    device, same strides (a contiguous copy for non-dense params, which are staged)."""
    if value.device != param.device:
        return False
    return same_layout(value, param) if is_dense(param) else value.is_contiguous()


def like(p: Tensor, dtype: torch.dtype, fmt, local_value: Tensor) -> Tensor:
    """A tensor like param ``p`` (a DTensor for a DTensor) holding ``local_value``."""
    out = torch.empty_like(p, dtype=dtype, memory_format=fmt)
    local_tensor(out).copy_(local_value)
    return out


def span(t: Tensor) -> tuple[int, int]:
    """The bytes [lo, hi) a tensor's elements can touch (strides are never negative)."""
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    lo = t.data_ptr()
    return lo, lo + extent * t.element_size()


def addressable(t: Tensor) -> bool:
    """Whether ``t`` has memory of its own (a wrapper subclass's storage is invalid)."""
    try:
        t.untyped_storage().data_ptr()
    except RuntimeError:
        return False
    return True


def is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake as fake  # where asked: loads, error paths

    return fake(t)


def storage_problem(t: Tensor) -> str | None:
    """Why the memory a tensor's view spans cannot be read and written, or None: its
    storage was freed (``untyped_storage().resize_(0)``, as offloading code does) or
    shrunk under it. torch's own ops check this; the kernels read raw pointers."""
    if t.numel() == 0 or t.is_meta:
        return None
    storage = t.untyped_storage()
    lo, hi = span(t)
    if storage.data_ptr() == 0 and is_fake(t):
        return ("no memory: it is a FakeTensor (FakeTensorMode), which the kernels cannot "
                "step; for a shape-only dry run put the model on the meta device, whose params "
                "tritonadam steps shape-only as torch.optim does")
    if storage.data_ptr() == 0 or lo < storage.data_ptr() or hi > storage.data_ptr() + storage.nbytes():
        return (f"no storage for its {tuple(t.shape)} elements (its memory was freed, e.g. by "
                "`untyped_storage().resize_(0)`, or shrunk)")
    return None


def check_no_shared_memory(name: str, entries: list) -> None:
    """Raise if two tensors a step writes share memory: two rows of one launch would
    update it concurrently on a GPU (the interpreter, running programs one after
    another, would hide it). ``entries``: (param, its state dict) pairs.

    Distinct Parameter objects over one storage come from tying weights by value
    (``nn.Parameter(other.data)``) or from hand-made views; torch.optim steps them one
    after the other, each with its own state.
    """
    tensors, owners, labels = [], [], []
    for i, (p, state) in enumerate(entries):
        tensors.append(local_tensor(p))
        owners.append(i)
        labels.append("param")
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors.append(local_tensor(value))
                owners.append(i)
                labels.append(f"state[{key!r}]")
    if len(tensors) < 2:
        return
    count = len(tensors)
    lo = np.fromiter(map(Tensor.data_ptr, tensors), dtype=np.int64, count=count)
    hi = lo + (np.fromiter(map(Tensor.numel, tensors), dtype=np.int64, count=count)
               * np.fromiter(map(Tensor.element_size, tensors), dtype=np.int64, count=count))
    for j in np.flatnonzero(~np.fromiter(map(Tensor.is_contiguous, tensors), dtype=bool, count=count)):
        hi[j] = span(tensors[j])[1]
    device = np.fromiter(map(Tensor.get_device, tensors), dtype=np.int64, count=count)
    for dev in np.unique(device):
        idx = np.flatnonzero((device == dev) & (hi > lo) & (lo != 0))
        idx = idx[np.argsort(lo[idx], kind="stable")]
        reach = np.maximum.accumulate(hi[idx])
        apart = lo[idx[1:]] >= reach[:-1]
        if apart.all():
            continue
        # Clusters of tensors whose byte spans overlap (in a chain), in address order.
        starts = np.flatnonzero(np.concatenate(([True], apart)))
        ends = np.append(starts[1:], idx.size)
        for first, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            pair = _sharing_pair([tensors[k] for k in idx[first:end]], int(lo[idx[first]]),
                                 int(reach[end - 1]))
            if pair is not None:
                _refuse_shared(name, entries, tensors, owners, labels, *idx[first:end][list(pair)])


def _sharing_pair(cluster: list[Tensor], base: int, end: int) -> tuple[int, int] | None:
    """Two tensors (indices into ``cluster``: tensors in address order whose byte spans,
    together [base, end), overlap in a chain) that share a byte, or None.

    Dense tensors cover their spans, so the first two share bytes. Strided views that do
    not (a buffer's even and odd columns) are counted byte by byte: element-disjoint ones
    are fine, as in torch.optim. Only params can be such views (state tensors are laid out
    densely), and non-dense params are stepped through staging copies written back one
    after another, so no launch writes two of them concurrently."""
    if all(map(is_dense, cluster)):
        return 0, 1
    # One mark per unit of memory: the largest that every element size and offset divide
    # (4 bytes for fp32 views of one buffer).
    unit = math.gcd(*(t.element_size() for t in cluster), *(t.data_ptr() - base for t in cluster))
    taken = torch.zeros((end - base) // unit, dtype=torch.bool, device=cluster[0].device)
    for i, t in enumerate(cluster):
        if _units(taken, t, base, unit).any():  # syncs; only for overlapping spans, at a gathering
            for k in range(i):  # which earlier tensor it shares with, for the error
                taken.zero_()
                _units(taken, cluster[k], base, unit).fill_(True)
                if _units(taken, t, base, unit).any():
                    return k, i
        _units(taken, t, base, unit).fill_(True)
    return None


def _units(marks: Tensor, t: Tensor, base: int, unit: int) -> Tensor:
    """The entries of ``marks`` (one per ``unit`` bytes from address ``base``) under ``t``."""
    size = t.element_size() // unit
    return marks.as_strided(tuple(t.shape) + (size,), tuple(s * size for s in t.stride()) + (1,),
                            (t.data_ptr() - base) // unit)


def _refuse_shared(name: str, entries: list, tensors: list, owners: list, labels: list,
                   earlier: int, later: int) -> None:
    a, b = sorted((earlier, later), key=lambda k: owners[k])
    what = [_describe(labels[k], entries[owners[k]][0]) for k in (a, b)]
    if owners[a] == owners[b]:
        what[1] = f"its {labels[b]}"
    raise ValueError(
        f"tritonadam.{name}: {what[0]} and {what[1]} share memory on {tensors[a].device}; "
        "one launch steps every tensor at once, so shared memory would be updated "
        "concurrently. Tie weights by sharing one nn.Parameter object (e.g. "
        "`decoder.weight = encoder.weight`), not by wrapping the same data in two, and "
        "give each param its own state tensors"
    )


def _describe(label: str, param: Tensor) -> str:
    shape = tuple(param.shape)
    if label == "param":
        return f"a param of shape {shape}"
    return f"the {label} of a param of shape {shape}"


def on_device(device: torch.device, t: Tensor | None) -> Tensor | None:
    """``t`` where a launch on ``device`` reads it (GradScaler's scale and found_inf may
    live elsewhere): moved without a host sync, or ``t`` itself when it is there."""
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)
