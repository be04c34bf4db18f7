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

Quantized state (tritonadam's ``state_dtype="8bit"``/``"4bit"``) is emulated, not tolerated:
the sample is whole 64-element blocks (a block's scale is its absmax), and after every step
the reference stores each moment through ``tritonadam.quantize`` (the kernel's codec, bit
for bit), so it steps from the very values the kernel decodes. Where the kernel may store
another code than the reference (its fp32 arithmetic puts a value within a few ulps of a
rounding threshold the reference's float64 value is on the other side of; and with
stochastic rounding, either code around the value), the reference bounds how far the
stored moment can be from its own (:func:`stored_moment`: the codes at the ends of the
interval the value can be in, rounded down and up, at the lowest and highest scale the
block can have) and carries that bound through the next steps' updates (interval
arithmetic on ``m / (sqrt(v) + eps)``): each element's tolerance grows by the most the
params can move through it. Rounding to nearest, that is 0 except at the rare elements near
a threshold; stochastically, about one code step of the moments.

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
from .workloads import FLOAT_DTYPES, QUANT_STATES, Layout, Setup, torch_dtype

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
#: relative distance between a moment computed by the kernel in fp32 and the reference's
#: float64 value, at most: a few fp32 ulps (2**-24 each), with room
QUANT_REL = 1e-6
#: the quantized moments' bound on the params is first order: this much room on top
QUANT_SLACK_MARGIN = 1.25


@dataclass
class Sample:
    """Which elements are checked: ``(tensor index, flat element indices)`` plus their
    initial values and gradients as float64 on the CPU. ``block``: every pick is whole
    blocks of this many elements counted from each tensor's element 0 (quantized state),
    or None."""

    picks: list[tuple[int, torch.Tensor]]
    p0: torch.Tensor
    g: torch.Tensor
    block: int | None = None

    @property
    def segments(self) -> list[int]:
        """Elements per picked tensor, in the order of ``p0`` and ``g``."""
        return [len(idx) for _, idx in self.picks]


def choose_sample(params: list[torch.Tensor], per_tensor: int = 2048, max_tensors: int = 8,
                  seed: int = 0, block: int | None = None) -> Sample:
    """First, last, largest and a few random non-empty tensors; in each, the first and last
    64 elements and up to ``per_tensor`` random ones (so the end of a 2**31+ tensor is seen).

    ``block``: pick whole blocks of that many elements instead (the first, the last and up
    to ``per_tensor // 16`` random ones per tensor), as quantized state needs: a block's
    scale depends on all its elements."""
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
        if block:
            nb = -(-n // block)
            ids = torch.unique(torch.cat([torch.tensor([0, nb - 1]), torch.randint(
                0, nb, (min(per_tensor // 16, nb),), generator=gen)]))
            idx = (ids[:, None] * block + torch.arange(block)).reshape(-1)
            idx = idx[idx < n]  # the last block may be partial
        else:
            head = torch.arange(min(n, 64))
            tail = torch.arange(max(0, n - 64), n)
            rand = torch.randint(0, n, (min(per_tensor, n),), generator=gen)
            idx = torch.unique(torch.cat([head, tail, rand]))
        picks.append((i, idx))
    p0 = gather(params, picks)
    g = gather([p.grad for p in params], picks)
    return Sample(picks, p0, g, block)


def gather(tensors: list[torch.Tensor], picks) -> torch.Tensor:
    parts = []
    for i, idx in picks:
        flat = tensors[i].detach().reshape(-1)
        parts.append(flat[idx.to(flat.device)].to("cpu", torch.float64))
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(parts)


def reference(p0: torch.Tensor, g: torch.Tensor, steps: int, algo: str, hp: HyperParams,
              param: str, state: str, master: str | None, coef: float = 1.0,
              segments: list[int] | None = None, stochastic: bool = False) -> torch.Tensor:
    """``steps`` steps of torch's Adam / AdamW / Adamax on float64 values, rounding the
    stored tensors (param or master, moments) to their dtypes after every step; the grads
    scaled by the clip coefficient ``coef``. ``state`` "8bit"/"4bit": the moments stored
    through the quantized format, in blocks within ``segments`` (see
    :func:`reference_bounds`)."""
    return reference_bounds(p0, g, steps, algo, hp, param, state, master, coef, segments,
                            stochastic)[0]


def reference_bounds(p0: torch.Tensor, g: torch.Tensor, steps: int, algo: str, hp: HyperParams,
                     param: str, state: str, master: str | None, coef: float = 1.0,
                     segments: list[int] | None = None,
                     stochastic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference` and, per element, how far the params may be from it through the
    quantized moments a kernel may store differently (0 for dense state): see the module
    docstring. ``segments``: elements per tensor of ``p0``, each whole quantization blocks
    (``Sample.segments``); ``stochastic``: moments rounded stochastically."""
    f64 = torch.float64
    bits = QUANT_STATES.get(state)
    if bits and segments is None:
        raise ValueError(f"{state} state: the reference needs the sample's blocks (segments)")

    def rd(x, dt):
        return x.to(torch_dtype(dt)).to(f64)

    def store(x, dev, signed):
        if bits:
            return stored_moment(x, dev, bits, signed, segments, stochastic)
        return rd(x, state), torch.zeros_like(x)

    lr, (b1, b2), eps, wd = hp.lr, hp.betas, hp.eps, hp.weight_decay
    w = p0.clone()  # the weights being stepped: master if any, else the param
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    vmax = torch.zeros_like(w)
    # how far the stored moments may be from m, v, vmax; how far the params may be from w
    dm, dv, dx, slack = (torch.zeros_like(w) for _ in range(4))
    for t in range(1, steps + 1):
        grad = g * coef
        if algo == "adamw":
            w = w * (1 - lr * wd)
        elif wd:
            grad = grad + wd * w
        # Fused kernels (torch's and ours) update the moments in fp32 registers, use those
        # values for this step's update, and store them rounded: round after use.
        m = b1 * m + (1 - b1) * grad
        m_dev = b1 * dm
        bc1 = 1 - b1 ** t
        if algo == "adamax":
            v_lo = torch.maximum(b2 * (v - dv).clamp(min=0), grad.abs() + eps)
            v_hi = torch.maximum(b2 * (v + dv), grad.abs() + eps)
            v = torch.maximum(b2 * v, grad.abs() + eps)
            vv, vv_lo, vv_hi = v, v_lo, v_hi

            def update(m_, v_):
                return (lr / bc1) * m_ / v_
        else:
            fresh = (1 - b2) * grad * grad
            v_lo, v_hi = b2 * (v - dv).clamp(min=0) + fresh, b2 * (v + dv) + fresh
            v = b2 * v + fresh
            vv, vv_lo, vv_hi = v, v_lo, v_hi
            if hp.amsgrad:
                vv_lo = torch.maximum((vmax - dx).clamp(min=0), v_lo)
                vv_hi = torch.maximum(vmax + dx, v_hi)
                vmax = torch.maximum(vmax, v)
                vv = vmax
            bc2 = 1 - b2 ** t

            def update(m_, v_):
                return (lr / bc1) * m_ / (v_.sqrt() / bc2 ** 0.5 + eps)
        u = update(m, vv)
        if bits:  # the most the update can differ through the moments the kernel stored
            slack = slack + torch.stack([(update(m + sm * m_dev, v_) - u).abs()
                                         for sm in (-1, 1) for v_ in (vv_lo, vv_hi)]).amax(0)
        w = w - u
        if hp.amsgrad:
            vmax, dx = store(vmax, torch.maximum(vmax - vv_lo, vv_hi - vmax), False)
        m, dm = store(m, m_dev, True)
        v, dv = store(v, torch.maximum(v - v_lo, v_hi - v), False)
        w = rd(w, master or param)
    return rd(w, param), slack


def stored_moment(x: torch.Tensor, dev: torch.Tensor, bits: int, signed: bool,
                  segments: list[int], stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A moment stored in the quantized format: ``(value, bound)``, float64 like ``x``.

    ``value``: what rounding ``x`` to nearest stores (``tritonadam.quantize``, the kernel's
    codec), decoded. ``bound``: per element, the most what a kernel stores can differ from
    it when the value it stores may be anywhere within ``dev`` of ``x``, or a few fp32 ulps
    (``QUANT_REL``), rounded to nearest or (``stochastic``) to either code around it: the
    codec is monotone in the value and in the block's scale, so the extremes are the codes
    of the interval's ends, rounded down and up, at the lowest and highest scale its block
    can have. ``segments``: elements per tensor in ``x``, each whole blocks from its
    element 0."""
    from tritonadam import quantize as Q

    f32, qb = torch.float32, Q.QUANT_BLOCK
    # encode weights (2r + 1 for 16 random bits r): nearest, or the lowest and highest draw
    weights = (1.0, 131071.0) if stochastic else (65536.0,)
    values, bounds = [], []
    for part, d in zip(x.split(segments), dev.split(segments)):
        n = part.numel()
        codes, scales = Q.quantize(part, bits, signed)
        value = Q.dequantize(codes, scales, n, bits, signed).double()
        reach = d + QUANT_REL * part.abs()
        lo, hi = part - reach, part + reach
        if not signed:
            lo = lo.clamp(min=0)
        pad = (-n) % qb

        def blocks(t):
            return torch.cat([t, t.new_zeros(pad)]).reshape(-1, qb)

        mag_hi = torch.maximum(lo.abs(), hi.abs())
        mag_lo = torch.where(lo * hi > 0, torch.minimum(lo.abs(), hi.abs()), torch.zeros_like(lo))
        cands = []
        for mag in (mag_lo, mag_hi):
            amax = blocks(mag).amax(dim=1).to(f32)
            scale = Q.round_scale(amax.view(torch.int32).to(torch.int64))[:, None]
            inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones_like(scale)),
                              torch.zeros_like(scale))
            for end in (lo, hi):
                e = blocks(end).to(f32)
                for wt in weights:
                    c = Q.encode(e, scale, inv, wt, bits, signed)
                    cands.append(Q.decode(c, scale, bits, signed).reshape(-1)[:n].double())
        cands = torch.stack(cands)
        values.append(value)
        bounds.append(torch.maximum(value - cands.amin(0), cands.amax(0) - value).clamp(min=0))
    return torch.cat(values), torch.cat(bounds)


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
            moves: torch.Tensor | None = None, lr_tol: float = LR_TOL,
            slack: torch.Tensor | None = None) -> CheckResult:
    """``out`` against ``ref`` within the tolerance; ``moves``: for stochastic rounding,
    each element's chance that the first step lands it off the nearest value
    (:func:`off_nearest_chance`), for the statistical checks; ``slack``: per element, added
    to the tolerance (quantized moments: :func:`reference_bounds`)."""
    if out.numel() == 0:
        return CheckResult(True, 0.0, 0)
    rtol = RTOL_PER_STEP[param] * steps
    atol = lr_tol * lr * steps
    tol = atol + rtol * ref.abs().nan_to_num(0.0)
    if slack is not None:
        tol = tol + QUANT_SLACK_MARGIN * slack.nan_to_num(0.0)
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
    # tritonadam's quantized formats are emulated; other state (the peers' int8/int4
    # moments) is not: the reference keeps fp32 moments and the provider a looser lr_tol
    quant = layout.state in QUANT_STATES
    state = layout.state if layout.state in FLOAT_DTYPES or quant else "fp32"
    if quant and sample.block is None:
        raise ValueError(f"{layout.state} state is checked on whole blocks: choose_sample(block=...)")
    segments = sample.segments if quant else None
    ref, slack = reference_bounds(sample.p0, sample.g, steps, algo, hp, setup.param, state,
                                  setup.master, coef, segments, quant and layout.stochastic)
    moves = None
    if layout.stochastic and not setup.master:  # params rounded stochastically
        exact = reference(sample.p0, sample.g, 1, algo, hp, "fp64", "fp64", None, coef)
        moves = off_nearest_chance(exact, setup.param)
    res = compare(out, ref, steps, setup.param, hp.lr, moves, lr_tol, slack if quant else None)
    if quant:
        res.add(f"{layout.state} moments emulated" + (f", slack up to {float(slack.max()) / hp.lr:.2g} lr"
                                                      if float(slack.max()) > 0 else ""))
    if clip:
        err = abs(clip.returned - clip.norm) / (NORM_RTOL[setup.grad] * clip.norm)
        res.add(f"norm {err:.2g} of tol", "" if err <= 1 else
                f"total grad norm: got {clip.returned:.8g}, reference {clip.norm:.8g}")
    return res
