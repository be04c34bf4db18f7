"""What the autotuner times: runners that launch one update of a kernel variant on
scratch buffers (never the user's tensors)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .launch import interpreted, launch_prepare, launch_update
from .plan import Bucket, DeviceTables, group_pointer_row, group_row
from .variant import Master, Variant, code_bytes, num_scales

# Hyper-parameters for timing runs (lr, beta1, beta2, eps, weight decay): representative,
# and finite from the first step.
_TIMING_HYPER = {
    "adam": (1e-3, 0.9, 0.999, 1e-8, 0.0),
    "adamw": (1e-3, 0.9, 0.999, 1e-8, 1e-2),
    "adamax": (2e-3, 0.9, 0.999, 1e-8, 0.0),
}


def scaled_mix(numels: list[int], total: int) -> list[int]:
    """Tensor sizes for a scratch launch of about ``total`` elements shaped like a launch
    over ``numels``: the same sizes when they fit, else as many tensors of the same sizes as
    fit (the mix repeated or cut). Block boundaries, tails and the block -> tensor map
    then look like the real launch's, which a single tensor of ``total`` would not."""
    sizes = [int(n) for n in numels if n > 0] or [int(total)]
    out, i = [], 0
    room = int(total)
    while room > 0:
        n = min(sizes[i % len(sizes)], room)
        out.append(n)
        room -= n
        i += 1
    return out


def _moment(key, sizes: list[int], device) -> tuple[list, list]:
    """One moment of every scratch tensor: (data, scales) lists, scales None unless the
    moments are quantized. Quantized codes and scales start every tensor's on a 16-byte
    boundary, as the state formats allocate them (a tensor each)."""
    if not key.quant:
        return list(torch.split(torch.zeros(sum(sizes), dtype=key.state_dtype, device=device), sizes)), [None] * len(sizes)
    codes, scales = [], []
    for n in sizes:
        codes.append(torch.zeros(code_bytes(n, key.quant), dtype=torch.uint8, device=device))
        scales.append(torch.zeros(num_scales(n), dtype=torch.bfloat16, device=device))
    return codes, scales


def make_scratch_runner(variant: Variant, *, config, numels: list[int],
                        device: torch.device) -> Callable[[], None]:
    """A callable launching one update of ``variant`` on fresh scratch buffers (for timing).

    ``numels``: the tensor sizes of the scratch launch (a bucket's size mix, see
    ``scaled_mix``). An in-place step timed on live tensors would apply the update
    several times, so the tuner only ever runs these.

    ``run.compile()`` compiles without running it the heaviest launch that the tuned
    config serves and returns the compiler's report, ``{"registers", "spills",
    "shared"}`` (per thread, per thread, bytes per program), or None where the compiler
    cannot say (Triton's interpreter). A config tuned for ``variant.autotune_key()`` is
    launched with GradScaler's ``found_inf`` and scale (the grads written back unscaled)
    and with L2 weight decay (AdamW's groups beside Adam-style ones in one launch) too,
    which the timed launch has not: each takes
    registers, and a candidate that compiled clean as timed spilled with them (fp32 params
    with bf16 grads and L2 decay at 4096/8 persistent, sm_90: 8 bytes of stack, a 2026-12-05
    review). Pruning on the heaviest keeps such a config from being chosen.
    """
    key = variant.key
    device = torch.device(device)
    sizes = [int(n) for n in numels]
    total = sum(sizes)
    # One allocation per array, split into the launch's tensors: the launch sees the same
    # tensor boundaries (hence tails and alignment) as the real bucket.
    p = torch.randn(total, device=device).to(key.param_dtype)
    g = torch.randn(total, device=device).to(key.grad_dtype)
    moments = [_moment(key, sizes, device) for _ in range(2 + key.amsgrad)] + [([None] * len(sizes),) * 2]
    if key.master == Master.FP32:
        w = p.to(torch.float32)
    elif key.master == Master.REMAINDER:
        w = torch.zeros(total, dtype=torch.int16, device=device)
    else:
        w = None
    steps = torch.zeros(len(sizes), dtype=torch.float32, device=device)

    def parts(t):
        return list(torch.split(t, sizes)) if t is not None else [None] * len(sizes)

    m, v, vmax = moments[:3]
    rows = [
        DeviceTables.row(pi, (m[0][i], v[0][i], vmax[0][i]), (m[1][i], v[1][i], vmax[1][i]), wi, steps[i], i)
        for i, (pi, wi) in enumerate(zip(parts(p), parts(w)))
    ]
    tables = DeviceTables(device, rows, [0] * len(rows), 1)
    lr, beta1, beta2, eps, wd = _TIMING_HYPER[variant.algorithm]
    tables.set_groups(group_row(lr, beta1, beta2, eps, wd, decoupled=variant.decoupled, maximize=False,
                                bias_correction=True), group_pointer_row())
    tables.set_grad_ptrs(np.asarray([t.data_ptr() for t in parts(g)], dtype=np.int64))
    launch_prepare(tables, count=False)
    bucket = Bucket(key, device, 0, np.asarray(sizes, dtype=np.int64))
    flags = dict(block_size=config.block_size, num_warps=config.num_warps,
                 persistent=getattr(config, "persistent", False), adamax=variant.adamax,
                 decoupled_wd=variant.decoupled and wd != 0, coupled_wd=not variant.decoupled and wd != 0,
                 count=False)

    def run() -> None:
        launch_update(tables, bucket, **flags)

    def compile() -> dict | None:
        if interpreted():
            return None
        heaviest = dict(flags, coupled_wd=True, decoupled_wd=variant.decoupled)
        kernel = launch_update(tables, bucket, compile_only=True, found_inf=steps[:1], unscale_grads=True,
                               **heaviest)
        kernel._init_handles()  # loads the binary: the driver reports registers and spills
        return {"registers": int(kernel.n_regs), "spills": int(kernel.n_spills),
                "shared": int(kernel.metadata.shared)}

    run.compile = compile
    run.numels, run.params = sizes, parts(p)
    run.keep = (p, g, moments, w, steps)  # the tables point at these
    return run
