"""Device tables for multi-tensor launches, built once and reused while pointers hold.

A Bucket is the set of tensors one launch updates: same device, param dtype, grad dtype
and variant. Param, state and step pointers are stable between steps, so their table is
built once; grad pointers change whenever grads are re-allocated
(``zero_grad(set_to_none=True)``) and live in their own small table, re-copied only when
they change.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .common import TABLE_COLUMNS

_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPES[dtype]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@dataclass
class Bucket:
    device: torch.device
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    compute_dtype: torch.dtype
    master: bool
    amsgrad: bool
    numels: list[int]
    table: torch.Tensor  # int64 [n, TABLE_COLUMNS], on device
    counters: torch.Tensor  # int32 [n]: programs done with each tensor in this launch
    grads: torch.Tensor  # int64 [n]: grad pointers of the current step
    grad_ptrs: list = field(default_factory=list)
    keep: tuple = ()
    block_size: int = 0
    block_map: torch.Tensor | None = None
    num_blocks: int = 0
    _block_maps: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def set_block_size(self, block_size: int) -> None:
        """Point the launch at the block map for ``block_size`` (built once per size)."""
        if block_size == self.block_size:
            return
        cached = self._block_maps.get(block_size)
        if cached is None:
            numel = torch.tensor(self.numels, dtype=torch.int64)
            # Every tensor gets at least one program, so empty tensors still count a step.
            blocks = torch.clamp((numel + block_size - 1) // block_size, min=1)
            first = torch.cumsum(blocks, 0) - blocks
            block_map = torch.repeat_interleave(
                torch.arange(len(self.numels), dtype=torch.int32), blocks
            )
            cached = (first, block_map.to(self.device), int(blocks.sum()))
            self._block_maps[block_size] = cached
        first, self.block_map, self.num_blocks = cached
        self.table[:, TABLE_COLUMNS - 1].copy_(first)
        self.block_size = block_size

    def set_grad_ptrs(self, ptrs: list[int]) -> None:
        """Point the launch at this step's grads; copies to the device only on change.

        The caching allocator usually hands back the same addresses step after step,
        so the copy is rare.
        """
        if ptrs != self.grad_ptrs:
            host = torch.from_numpy(np.fromiter(ptrs, dtype=np.int64, count=len(ptrs)))
            # Pageable memory: non_blocking returns once the data is staged, so the host
            # buffer can go; no wait on the GPU.
            self.grads.copy_(host, non_blocking=True)
            self.grad_ptrs = ptrs


def build_bucket(
    params: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    second: list[torch.Tensor],
    max_second: list[torch.Tensor] | None,
    masters: list[torch.Tensor] | None,
    steps: list[torch.Tensor],
    grad_dtype: torch.dtype,
) -> Bucket:
    """A bucket over local (non-DTensor), dense tensors that share device and dtypes."""
    n = len(params)
    device = params[0].device
    rows = [
        [
            p.data_ptr(),
            m.data_ptr(),
            s.data_ptr(),
            _ptr(max_second[i] if max_second is not None else None),
            _ptr(masters[i] if masters is not None else None),
            st.data_ptr(),
            p.numel(),
            0,
        ]
        for i, (p, m, s, st) in enumerate(zip(params, exp_avgs, second, steps))
    ]
    table = torch.tensor(rows, dtype=torch.int64).reshape(n, TABLE_COLUMNS)
    return Bucket(
        device=device,
        param_dtype=params[0].dtype,
        grad_dtype=grad_dtype,
        compute_dtype=exp_avgs[0].dtype,
        master=masters is not None,
        amsgrad=max_second is not None,
        numels=[r[6] for r in rows],
        table=table.to(device),
        counters=torch.zeros(n, dtype=torch.int32, device=device),
        grads=torch.zeros(n, dtype=torch.int64, device=device),
    )
