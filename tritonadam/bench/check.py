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

Stochastic rounding lands on either neighbour of the exact value, under one ulp from it (the
per-step ``rtol`` is at least one ulp), so it passes that tolerance too; what it must also
be is unbiased and really random. So for it the sample must, on average, err neither toward
larger nor smaller magnitudes (a rounding stuck one way errs by about 0.2 of the tolerance)
and must leave elements off the round-to-nearest reference: at least half as many as the
first step alone is expected to (rounding to nearest leaves none).

A clip + step case scales the reference's grads by torch's coefficient
``min(1, max_norm / (norm + 1e-6))`` from the float64 norm of all grads (:func:`grad_norm`),
and the norm the first clip returned is checked against it. Adam's update hardly depends on
the grads' scale (eps aside), so the params alone would not show a missing coefficient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .providers import HyperParams
from .workloads import FLOAT_DTYPES, Layout, Setup, torch_dtype

#: relative tolerance per step by param dtype (two bf16/fp16 ulps at the value's exponent)
RTOL_PER_STEP = {"fp32": 1e-5, "bf16": 2.0 ** -7, "fp16": 2.0 ** -10}
#: relative tolerance of a clip's total norm by grad dtype: torch returns it in that dtype
#: (two bf16/fp16 ulps), and fp32 sums over millions of elements drift (torch on a CPU:
#: 1e-5 over 1M elements)
NORM_RTOL = {"fp32": 1e-4, "bf16": 2.0 ** -7, "fp16": 2.0 ** -10}
#: stochastic rounding: largest mean error toward larger magnitudes, in tolerances, judged
#: on at least SR_MIN_ELEMENTS (unbiased rounding: 0 give or take 0.02 over 100 elements);
#: elements off the round-to-nearest reference, judged where the first step is expected
#: to move at least SR_MIN_MOVES (at most a 1e-7 chance that half as many move)
SR_MAX_BIAS = 0.1
#: absolute tolerance per step as a fraction of lr (a provider with quantized state, whose
#: moments the reference cannot emulate, gets a looser one: see ``Built.check_lr_tol``)
LR_TOL = 0.05
SR_MIN_ELEMENTS = 100
SR_MIN_MOVES = 100


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
              param: str, state: str, master: str | None, coef: float = 1.0) -> torch.Tensor:
    """``steps`` steps of torch's Adam / AdamW / Adamax on float64 values, rounding the
    stored tensors (param or master, moments) to their dtypes after every step; the grads
    scaled by the clip coefficient ``coef``."""
    f64 = torch.float64

    def rd(x, dt):
        return x.to(torch_dtype(dt)).to(f64)

    lr, (b1, b2), eps, wd = hp.lr, hp.betas, hp.eps, hp.weight_decay
    w = p0.clone()  # the weights being stepped: master if any, else the param
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    vmax = torch.zeros_like(w)
    for t in range(1, steps + 1):
        grad = g * coef
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
    note: str = ""  # what was checked besides the tolerance, for the result text

    def add(self, note: str, failure: str = "") -> None:
        """Record one more thing checked: ``note`` for the text; ``failure``, if it failed."""
        self.note = f"{self.note}; {note}" if self.note else note
        if failure and self.ok:
            self.ok, self.detail = False, failure

    def text(self) -> str:
        if self.elements == 0:
            return "ok (no elements)"
        note = f"; {self.note}" if self.note else ""
        return ("ok" if self.ok else "FAIL") + f" ({self.worst:.2g} of tol{note})"


def compare(out: torch.Tensor, ref: torch.Tensor, steps: int, param: str, lr: float,
            moves: torch.Tensor | None = None, lr_tol: float = LR_TOL) -> CheckResult:
    """``out`` against ``ref`` within the tolerance; ``moves``: for stochastic rounding,
    each element's chance that the first step lands it off the nearest value
    (:func:`off_nearest_chance`), for the statistical checks."""
    if out.numel() == 0:
        return CheckResult(True, 0.0, 0)
    rtol = RTOL_PER_STEP[param] * steps
    atol = lr_tol * lr * steps
    tol = atol + rtol * ref.abs().nan_to_num(0.0)
    bad_nan = torch.isnan(out) != torch.isnan(ref)
    err = (out - ref).abs().nan_to_num(0.0) / tol
    err = torch.where(bad_nan, torch.full_like(err, float("inf")), err)
    worst = float(err.max())
    detail = note = ""
    if worst > 1:
        i = int(err.argmax())
        detail = f"element {i}: got {float(out[i]):.8g}, reference {float(ref[i]):.8g}"
    ok = worst <= 1.0
    if moves is not None and ok and out.numel() >= SR_MIN_ELEMENTS:
        bias = float((torch.sign(ref) * (out - ref) / tol).mean())
        moved, expected = int((out != ref).sum()), float(moves.sum())
        note = f"bias {bias:+.3f} of tol, {moved / out.numel():.0%} off nearest"
        if abs(bias) > SR_MAX_BIAS or (expected >= SR_MIN_MOVES and moved < expected / 2):
            ok = False
            detail = (f"stochastic rounding: mean error {bias:+.3f} of tol toward larger "
                      f"magnitudes (at most {SR_MAX_BIAS:g}); {moved} elements off the "
                      f"round-to-nearest reference, where the first step alone should move "
                      f"{expected:.0f}")
    return CheckResult(ok, worst, out.numel(), detail, note)


def off_nearest_chance(exact: torch.Tensor, param: str) -> torch.Tensor:
    """Per element, the chance that stochastic rounding of float64 ``exact`` to ``param``
    gives the neighbour that is not the nearest: its distance to the nearest over the gap."""
    dt = torch_dtype(param)
    nearest = exact.to(dt)
    away = exact - nearest.double()
    toward = torch.where(away > 0, float("inf"), float("-inf")).to(dt)
    gap = (torch.nextafter(nearest, toward).double() - nearest.double()).abs()
    return (away.abs() / gap).nan_to_num(0.0)


def grad_norm(params: list[torch.Tensor]) -> float:
    """The 2-norm of all grads as one vector, in float64, chunk by chunk (a float64 copy of
    a 1B-element grad would not fit beside it), with one sync."""
    total = None
    for p in params:
        for chunk in p.grad.detach().reshape(-1).split(1 << 24):
            part = chunk.double().square().sum()
            total = part if total is None else total + part
    return 0.0 if total is None else math.sqrt(float(total))


def differing_elements(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> int:
    """How many elements of ``xs`` differ from those of ``ys`` in their bits."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return sum(int((x.detach().reshape(-1).view(ints[x.element_size()])
                    != y.detach().reshape(-1).view(ints[y.element_size()])).sum())
               for x, y in zip(xs, ys, strict=True))


def clip_coef(max_norm: float, norm: float) -> float:
    """torch's clip coefficient, clamped to 1."""
    return min(1.0, max_norm / (norm + 1e-6))


class Clipped(NamedTuple):
    """A clip + step case's clipping: its ``max_norm``, the float64 ``norm`` of the grads
    before the first step (:func:`grad_norm`) and the norm the first clip ``returned``."""

    max_norm: float
    norm: float
    returned: float


def check_after_steps(sample: Sample, params: list[torch.Tensor], steps: int, algo: str,
                      hp: HyperParams, setup: Setup, layout: Layout,
                      clip: Clipped | None = None, lr_tol: float = LR_TOL) -> CheckResult:
    """Compare ``params`` (after ``steps`` steps) with the reference on the sample.

    The reference keeps the moments in the dtype the provider really uses
    (``layout.state``), so torch's bf16/fp16 state is checked against bf16/fp16 state, and
    rounds as it does (``layout.stochastic``). With ``clip``, the returned norm must match
    the float64 one within ``NORM_RTOL``.
    """
    out = gather(params, sample.picks)
    coef = clip_coef(clip.max_norm, clip.norm) if clip else 1.0
    state = layout.state if layout.state in FLOAT_DTYPES else "fp32"  # quantized: not emulated
    ref = reference(sample.p0, sample.g, steps, algo, hp, setup.param, state, setup.master, coef)
    moves = None
    if layout.stochastic and not setup.master:  # params rounded stochastically
        exact = reference(sample.p0, sample.g, 1, algo, hp, "fp64", state, None, coef)
        moves = off_nearest_chance(exact, setup.param)
    res = compare(out, ref, steps, setup.param, hp.lr, moves, lr_tol)
    if clip:
        err = abs(clip.returned - clip.norm) / (NORM_RTOL[setup.grad] * clip.norm)
        res.add(f"norm {err:.2g} of tol", "" if err <= 1 else
                f"total grad norm: got {clip.returned:.8g}, reference {clip.norm:.8g}")
    return res
