"""Correctness before timing: compare a provider's params after a few steps with a float64
reference, on a sample of elements of the very tensors that are then timed.

The step is elementwise, so the reference needs only the sampled elements' initial values
and gradients. It emulates the storage a provider really uses: params (or master weights)
and Adam's moments are rounded to their dtypes after every step, as the kernels do; the
math in between is float64.

Tolerance per element: ``|out - ref| <= atol + rtol * |ref|`` with ``rtol`` a couple of
units in the last place of the param dtype per step (float32: 1e-5 per step) and ``atol`` 5%
of one update (``lr``) per step (a few ulps of tiny values). That passes rounding-order
differences and catches a skipped update, a doubled one, or a wrong formula, which all move
params by a whole update (lr).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .providers import HyperParams
from .workloads import Layout, Setup, torch_dtype

#: relative tolerance per step by param dtype (two bf16/fp16 ulps at the value's exponent)
RTOL_PER_STEP = {"fp32": 1e-5, "bf16": 2.0 ** -7, "fp16": 2.0 ** -10}


@dataclass
class Sample:
    """Which elements are checked: ``(tensor index, flat element indices)`` plus their
    initial values and gradients as float64 on the CPU."""

    picks: list[tuple[int, torch.Tensor]]
    p0: torch.Tensor
    g: torch.Tensor


def choose_sample(params: list[torch.Tensor], per_tensor: int = 2048, max_tensors: int = 8,
                  seed: int = 0) -> Sample:
    """First, last, largest and a few random non-empty tensors; in each, the first and last
    64 elements and up to ``per_tensor`` random ones (so the end of a 2**31+ tensor is seen)."""
    gen = torch.Generator().manual_seed(seed)
    nonempty = [i for i, p in enumerate(params) if p.numel() > 0]
    if not nonempty:
        return Sample([], torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    chosen = [nonempty[0], nonempty[-1], max(nonempty, key=lambda i: params[i].numel())]
    if len(nonempty) > 3:
        extra = torch.randperm(len(nonempty), generator=gen)[: max_tensors - 3].tolist()
        chosen += [nonempty[j] for j in extra]
    chosen = sorted(set(chosen))
    picks = []
    for i in chosen:
        n = params[i].numel()
        head = torch.arange(min(n, 64))
        tail = torch.arange(max(0, n - 64), n)
        rand = torch.randint(0, n, (min(per_tensor, n),), generator=gen)
        idx = torch.unique(torch.cat([head, tail, rand]))
        picks.append((i, idx))
    p0 = gather(params, picks)
    g = gather([p.grad for p in params], picks)
    return Sample(picks, p0, g)


def gather(tensors: list[torch.Tensor], picks) -> torch.Tensor:
    parts = []
    for i, idx in picks:
        flat = tensors[i].detach().reshape(-1)
        parts.append(flat[idx.to(flat.device)].to("cpu", torch.float64))
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(parts)


def reference(p0: torch.Tensor, g: torch.Tensor, steps: int, algo: str, hp: HyperParams,
              param: str, state: str, master: str | None) -> torch.Tensor:
    """``steps`` steps of torch's Adam / AdamW / Adamax on float64 values, rounding the
    stored tensors (param or master, moments) to their dtypes after every step."""
    f64 = torch.float64

    def rd(x, dt):
        return x.to(torch_dtype(dt)).to(f64)

    lr, (b1, b2), eps, wd = hp.lr, hp.betas, hp.eps, hp.weight_decay
    w = p0.clone()  # the weights being stepped: master if any, else the param
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    vmax = torch.zeros_like(w)
    for t in range(1, steps + 1):
        grad = g
        if algo == "adamw":
            w = w * (1 - lr * wd)
        elif wd:
            grad = grad + wd * w
        # Fused kernels (torch's and ours) update the moments in fp32 registers, use those
        # values for this step's update, and store them rounded: round after use.
        m = b1 * m + (1 - b1) * grad
        bc1 = 1 - b1 ** t
        if algo == "adamax":
            v = torch.maximum(b2 * v, grad.abs() + eps)
            w = w - (lr / bc1) * m / v
        else:
            v = b2 * v + (1 - b2) * grad * grad
            vv = v
            if hp.amsgrad:
                vmax = torch.maximum(vmax, v)
                vv = vmax
                vmax = rd(vmax, state)
            bc2 = 1 - b2 ** t
            w = w - (lr / bc1) * m / (vv.sqrt() / bc2 ** 0.5 + eps)
        m, v = rd(m, state), rd(v, state)
        w = rd(w, master or param)
    return rd(w, param)


@dataclass
class CheckResult:
    ok: bool
    worst: float  # max |out - ref| / (atol + rtol |ref|): <= 1 passes
    elements: int
    detail: str = ""

    def text(self) -> str:
        if self.elements == 0:
            return "ok (no elements)"
        return ("ok" if self.ok else "FAIL") + f" ({self.worst:.2g} of tol)"


def compare(out: torch.Tensor, ref: torch.Tensor, steps: int, param: str, lr: float) -> CheckResult:
    if out.numel() == 0:
        return CheckResult(True, 0.0, 0)
    rtol = RTOL_PER_STEP[param] * steps
    atol = 0.05 * lr * steps
    bad_nan = torch.isnan(out) != torch.isnan(ref)
    err = (out - ref).abs().nan_to_num(0.0) / (atol + rtol * ref.abs().nan_to_num(0.0))
    err = torch.where(bad_nan, torch.full_like(err, float("inf")), err)
    worst = float(err.max())
    detail = ""
    if worst > 1:
        i = int(err.argmax())
        detail = f"element {i}: got {float(out[i]):.8g}, reference {float(ref[i]):.8g}"
    return CheckResult(worst <= 1.0, worst, out.numel(), detail)


def check_after_steps(sample: Sample, params: list[torch.Tensor], steps: int, algo: str,
                      hp: HyperParams, setup: Setup, layout: Layout) -> CheckResult:
    """Compare ``params`` (after ``steps`` steps) with the reference on the sample.

    The reference keeps the moments in the dtype the provider really uses
    (``layout.state``), so torch's bf16/fp16 state is checked against bf16/fp16 state.
    """
    out = gather(params, sample.picks)
    ref = reference(sample.p0, sample.g, steps, algo, hp, setup.param, layout.state, setup.master)
    return compare(out, ref, steps, setup.param, hp.lr)
