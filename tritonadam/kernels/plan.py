"""Device tables for multi-tensor launches, built once and reused while tensors stay put.

Per optimizer and device: one tensor table (pointers, sizes; stable between steps), one
grad-pointer array (re-copied only when grads move: ``zero_grad(set_to_none=True)``
re-allocates them, though the caching allocator mostly hands back the same addresses),
one scalar table the prepare kernel fills, and the group tables (hyper-parameter values,
re-copied only when a value changed; pointers to tensor hyper-parameters). Rows are
ordered by bucket, so a bucket is a range of rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import layout
from .variant import BucketKey

BLOCK_INDEX_BITS = layout.BLOCK_INDEX_BITS.value


@dataclass
class Bucket:
    """The rows of one update launch: a range of a device's tables sharing a key."""

    key: BucketKey
    device: torch.device
    lo: int  # first row in the device tables
    numels: np.ndarray  # int64, one per row
    _block_maps: dict = field(default_factory=dict)

    def block_map(self, block_size: int) -> tuple[torch.Tensor, int]:
        """(program -> (row, block) map on the device, number of programs), per block size."""
        cached = self._block_maps.get(block_size)
        if cached is None:
            # Every tensor gets at least one program: an empty one still has its scalars
            # read, which keeps the kernel free of special cases.
            # One program per entry, and the update kernel counts programs in int32 (grid
            # size, and a persistent grid's pid, which steps past the last entry by up to
            # its number of programs): refuse a launch it cannot address.
            entries = block_entries(self.lo, self.numels, block_size, min_blocks=1,
                                    max_entries=(1 << 31) - (1 << 16))
            cached = (torch.from_numpy(entries).to(self.device), len(entries))
            self._block_maps[block_size] = cached
        return cached


def block_entries(lo: int, numels: np.ndarray, block_size: int, *, min_blocks: int,
                  max_entries: int | None = None) -> np.ndarray:
    """Block-map entries (row << 32 | block within the tensor) of rows lo, lo + 1, ...,
    with at least ``min_blocks`` entries per row (and at most ``max_entries`` in all)."""
    blocks = np.maximum((numels + block_size - 1) // block_size, min_blocks)
    if len(blocks) and int(blocks.max()) >= 1 << BLOCK_INDEX_BITS:
        raise ValueError(f"a tensor of {int(numels.max())} elements needs more than "
                         f"2**{BLOCK_INDEX_BITS} blocks of {block_size}")
    if max_entries is not None and int(blocks.sum()) > max_entries:
        raise ValueError(f"{int(numels.sum())} elements in one launch need {int(blocks.sum())} blocks of "
                         f"{block_size}, more than {max_entries}: use a larger block_size")
    rows = np.repeat(np.arange(lo, lo + len(numels), dtype=np.int64), blocks)
    first = np.repeat(np.cumsum(blocks) - blocks, blocks)
    within = np.arange(len(rows), dtype=np.int64) - first
    return (rows << BLOCK_INDEX_BITS) | within


@dataclass(frozen=True)
class NormLaunch:
    """One launch of the norm kernel: every grad of one dtype on a device."""

    grad_dtype: torch.dtype
    block_map: torch.Tensor  # int64 block-map entries on the device
    num_blocks: int
    chunk: int  # block-map entries summed into one partial, in order
    num_chunks: int  # programs, and partials written
    partials: torch.Tensor  # this launch's slice of NormPlan.partials


@dataclass(frozen=True)
class NormSpan:
    """The partials of one layout class of grads (sharded over the same mesh dims) and
    their total, reduced on their own so the total can be all-reduced over exactly those
    dims before the classes are combined. Read by the reduction kernel as a plan is."""

    partials: torch.Tensor  # a slice of NormPlan.partials
    num_partials: int
    total: torch.Tensor  # a 1-element slice of NormPlan.totals


class NormPlan:
    """The norm launches of one device's tables and the buffer of their partials.

    Partials are per chunk of block-map entries, and the chunk length depends only on the
    tensor sizes (at most ``max_chunks`` partials per launch): the partials, and so the
    norm's bits, do not depend on the GPU or on the optimizer's launch config. Empty
    tensors get no entries. The partials buffer is written in full by every norm pass.

    ``classes``: for grads of several layouts (tensor parallelism's sharded and replicated
    grads), each table row's class (0, 1, ...). Every class then gets its own launches
    per grad dtype, and its partials a contiguous span (``spans``), class after class.
    """

    def __init__(self, device: torch.device, buckets: list[Bucket], *, block_size: int,
                 num_warps: int, max_chunks: int, classes: np.ndarray | None = None) -> None:
        self.block_size = block_size
        self.num_warps = num_warps
        by_dtype: dict[torch.dtype, list[np.ndarray]] = {}
        for bucket in buckets:
            by_dtype.setdefault(bucket.key.grad_dtype, []).append(
                block_entries(bucket.lo, bucket.numels, block_size, min_blocks=0))
        all_entries = {dtype: np.concatenate(parts) for dtype, parts in by_dtype.items()}
        num_classes = 1 if classes is None else int(classes.max(initial=0)) + 1
        specs = []  # (class, dtype, entries, chunk, chunks)
        for k in range(num_classes):
            for dtype, entries in all_entries.items():
                if classes is not None:
                    entries = entries[classes[entries >> BLOCK_INDEX_BITS] == k]
                if len(entries) == 0:
                    continue
                chunk = -(-len(entries) // max_chunks)
                specs.append((k, dtype, entries, chunk, -(-len(entries) // chunk)))
        self.num_partials = sum(spec[4] for spec in specs)
        self.partials = torch.zeros(max(self.num_partials, 1), dtype=torch.float64, device=device)
        self.total = torch.zeros(1, dtype=torch.float64, device=device)
        self.totals = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.launches = []
        self.spans = []
        first = 0
        for k in range(num_classes):
            lo = first
            for _, dtype, entries, chunk, num_chunks in (spec for spec in specs if spec[0] == k):
                self.launches.append(NormLaunch(
                    dtype, torch.from_numpy(entries).to(device), len(entries), chunk, num_chunks,
                    self.partials[first:first + num_chunks]))
                first += num_chunks
            # An empty span still passes a pointer inside the buffer (nothing is read).
            partials = self.partials[lo:first] if first > lo else self.partials[:1]
            self.spans.append(NormSpan(partials, first - lo, self.totals[k:k + 1]))


def group_row(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, *,
              decoupled: bool, maximize: bool, bias_correction: bool) -> tuple[float, ...]:
    """One row of the group table (float64, in ``layout.G_*`` order). A tensor lr or beta
    is passed as 0.0: the prepare kernel reads the tensor through the group pointers."""
    row = [0.0] * layout.GROUP_COLUMNS.value
    row[layout.G_LR.value] = lr
    row[layout.G_BETA1.value] = beta1
    row[layout.G_BETA2.value] = beta2
    # 1 - beta in double, as torch.optim computes it from Python floats.
    row[layout.G_W1.value] = 1.0 - beta1
    row[layout.G_W2.value] = 1.0 - beta2
    row[layout.G_EPS.value] = eps
    row[layout.G_WD.value] = weight_decay
    row[layout.G_DECOUPLED.value] = float(decoupled)
    row[layout.G_SIGN.value] = -1.0 if maximize else 1.0
    row[layout.G_BIAS_CORRECTION.value] = float(bias_correction)
    return tuple(row)


def group_pointer_row(lr=None, beta1=None, beta2=None) -> tuple[int, ...]:
    """One row of the group pointer table: (address, 1 if float64) of each tensor
    hyper-parameter, in ``layout.GP_*`` order; (0, 0) where the value is a float."""
    row = [0] * layout.GROUP_POINTER_COLUMNS.value
    for col, t in ((layout.GP_LR, lr), (layout.GP_BETA1, beta1), (layout.GP_BETA2, beta2)):
        if t is not None:
            row[col.value] = t.data_ptr()
            row[col.value + 1] = int(t.dtype == torch.float64)
    return tuple(row)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class DeviceTables:
    """The tables of every tensor an optimizer steps on one device."""

    def __init__(self, device: torch.device, rows: list[list[int]], group_of: list[int],
                 num_groups: int) -> None:
        n = len(rows)
        self.device = device
        self.num_rows = n
        host = torch.tensor(rows, dtype=torch.int64, device="cpu").reshape(n, layout.TABLE_COLUMNS.value)
        self.table = host.to(device)
        self.grads = torch.zeros(n, dtype=torch.int64, device=device)
        self.scalars = torch.zeros(n, layout.SCALAR_COLUMNS.value, dtype=torch.float64, device=device)
        self.group_of = torch.tensor(group_of, dtype=torch.int32, device="cpu").to(device)
        self.groups = torch.zeros(num_groups, layout.GROUP_COLUMNS.value, dtype=torch.float64, device=device)
        self.group_ptrs = torch.zeros(num_groups, layout.GROUP_POINTER_COLUMNS.value, dtype=torch.int64,
                                      device=device)
        self._group_values = None
        self._group_pointers = None

    @staticmethod
    def row(param, moments: tuple, scales: tuple, master, step, key: int = 0) -> list[int]:
        """One tensor table row (``layout.COL_*``). ``moments``: (exp_avg, the second
        moment, max_exp_avg_sq or None); ``scales``: their scales where the moments are
        quantized (uint8 codes), else Nones; ``key``: the tensor's stochastic-rounding
        Philox key (``rounding_key``)."""
        row = [0] * layout.TABLE_COLUMNS.value
        row[layout.COL_PARAM.value] = param.data_ptr()
        row[layout.COL_NUMEL.value] = param.numel()
        row[layout.COL_MASTER.value] = _ptr(master)
        row[layout.COL_STEP.value] = step.data_ptr()
        row[layout.COL_STEP_FP64.value] = int(step.dtype == torch.float64)
        row[layout.COL_KEY.value] = key
        columns = ((layout.COL_EXP_AVG, layout.COL_EXP_AVG_SCALE), (layout.COL_SECOND, layout.COL_SECOND_SCALE),
                   (layout.COL_MAX, layout.COL_MAX_SCALE))
        for (data_col, scale_col), data, scale in zip(columns, moments, scales):
            row[data_col.value] = _ptr(data)
            row[scale_col.value] = _ptr(scale)
        return row

    def set_grad_ptrs(self, ptrs: np.ndarray) -> None:
        """Point the launches at this step's grads (int64, one per row)."""
        self._upload(self.grads, ptrs)

    def set_groups(self, values: tuple, pointers: tuple) -> None:
        """Group hyper-parameter values (float64 rows) and tensor pointers, on change."""
        if values != self._group_values:
            self._upload(self.groups, np.array(values, dtype=np.float64).reshape(self.groups.shape))
            self._group_values = values
        if pointers != self._group_pointers:
            self._upload(self.group_ptrs, np.array(pointers, dtype=np.int64).reshape(self.group_ptrs.shape))
            self._group_pointers = pointers

    def _upload(self, dst: torch.Tensor, host: np.ndarray) -> None:
        upload(dst, host)


def upload(dst: torch.Tensor, host: np.ndarray) -> None:
    """Copy host values into a device table, refusing during CUDA graph capture (a graph
    would bake in the copy's source)."""
    if dst.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "tritonadam: a hyper-parameter, clipping argument, grad or param moved while a CUDA "
            "graph is being captured; keep them fixed during capture (use tensor lr/betas to "
            "change them between replays)"
        )
    # Pageable memory: non_blocking returns once the data is staged, so the host
    # buffer can go; no wait on the GPU.
    dst.copy_(torch.from_numpy(host), non_blocking=True)


def rounding_key(seed: int, stream: int) -> int:
    """One Philox key per tensor: the seed's two halves and the tensor's stream (its index in
    the optimizer) mixed by odd multipliers, so distinct tensors draw independent streams."""
    mask = 0xFFFFFFFF
    return ((seed & mask) ^ (stream * 0x9E3779B9 & mask) ^ ((seed >> 32) * 0x85EBCA6B & mask)) & mask
