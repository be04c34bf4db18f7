"""A plain-torch fp32 (or fp64) Adam/AdaMax step in the kernels' exact op order.

Used to check fp16/bf16 params bit for bit: the reference keeps fp32 math, rounds the
param to its dtype with torch's own round-to-nearest-even after every step, and the
kernel must produce the same bits. The per-tensor scalars (bias corrections, step size,
decay factor) are computed in float64 with numpy, in the formula of the prepare kernel,
and rounded once to the compute dtype, so the comparison tests the elementwise update and
the rounding, where bugs live.
"""
from __future__ import annotations


import numpy as np
import torch

from tritonadam import quantize as Q


def _np(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def one_minus_pow(beta, step):
    """The prepare kernel's 1 - beta**step in float64 (Kahan's expm1 from exp and log)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.float64(step) * np.log(np.float64(beta))
        u = np.exp(x)
        um1 = u - 1.0
        if u == 1.0:
            expm1 = x
        elif um1 == -1.0:
            expm1 = np.float64(-1.0)
        else:
            expm1 = (um1 * x) / np.log(u)
    return -expm1


def lerp(start, end, weight):
    diff = end - start
    if weight < 0.5:
        return start + weight * diff
    return end - diff * (1.0 - weight)


def philox2x32(key: int, c0, c1, rounds: int = 10):
    """Philox-2x32 as the kernel's ``philox2x32``: two uint32 numpy arrays of random bits."""
    mask = np.uint64(0xFFFFFFFF)
    c0, c1 = (np.asarray(x, dtype=np.uint64) & mask for x in np.broadcast_arrays(c0, c1))
    k = np.uint64(key)
    for _ in range(rounds):
        prod = c0 * np.uint64(0xD256D193)  # fits in 64 bits: both factors < 2**32
        c0, c1 = ((prod >> np.uint64(32)) ^ k ^ c1) & mask, prod & mask
        k = (k + np.uint64(0x9E3779B9)) & mask
    return c0.astype(np.uint32), c1.astype(np.uint32)


def stochastic_round(x: torch.Tensor, bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's stochastic rounding of fp32 ``x`` with 16 random ``bits`` per element."""
    r = torch.from_numpy(bits.astype(np.int64)).reshape(x.shape)
    if dtype == torch.bfloat16:
        b = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        b = torch.where(torch.isnan(x), b | 0x400000, b + (r & 0xFFFF))
        return ((b >> 16) & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.bfloat16)
    lo = _toward_zero_fp16(x)
    hi = (lo.view(torch.int16).to(torch.int32) + 1).to(torch.int16).view(torch.float16)
    below = x.abs() - lo.float().abs()
    step = hi.float().abs() - lo.float().abs()
    uniform = (r & 0xFFFF).to(torch.float32) * (1.0 / 65536.0)
    return torch.where(x.abs() > 65504, x.to(torch.float16), torch.where(uniform * step < below, hi, lo))


def _toward_zero_fp16(x: torch.Tensor) -> torch.Tensor:
    nearest = x.to(torch.float16)
    away = nearest.float().abs() > x.abs()
    back = (nearest.view(torch.int16).to(torch.int32) - 1).to(torch.int16).view(torch.float16)
    return torch.where(away & torch.isfinite(x), back, nearest)


def round_master(x: torch.Tensor) -> torch.Tensor:
    """bf16 nearest, ties away from zero (the master modes' rounding)."""
    b = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.where(torch.isnan(x), b | 0x400000, b + 0x8000)
    return ((b >> 16) & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.bfloat16)


class Reference:
    """State of one param stepped in high precision (the kernel's compute dtype).

    ``master``: False, True or "remainder" (the same numbers as True); ``state_dtype``:
    moments stored in that dtype between steps; ``stochastic_rounding`` with the tensor's
    Philox ``key`` (``tritonadam.kernels.plan.rounding_key(seed, index in optimizer)``).
    """

    def __init__(self, param: torch.Tensor, kind: str, master=False, amsgrad: bool = False,
                 state_dtype=None, stochastic_rounding=False, key=0):
        self.dtype = param.dtype
        self.cdtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        self.kind = kind
        self.master = bool(master) and param.dtype in (torch.float16, torch.bfloat16)
        self.amsgrad = amsgrad
        self.sdtype = state_dtype or self.cdtype
        self.sr = stochastic_rounding
        self.key = key
        # Computed on the CPU whatever the param's device (GPU runs compare against it).
        self.w = param.detach().cpu().to(self.cdtype).clone()
        self.p = param.detach().cpu().clone()
        self.m = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w)
        self.vmax = torch.zeros_like(self.w)
        self.step = 0
        self.one_division = False  # QuantReference: the quantized kernel's update

    def _store(self, x, bits, dtype):
        if dtype in (torch.float32, torch.float64):
            return x.to(dtype)
        if self.sr:
            return stochastic_round(x, bits, dtype)
        return x.to(dtype)

    def update(self, grad, lr, beta1, beta2, eps, weight_decay, decoupled=False,
               maximize=False, bias_correction=True):
        f = _np(self.cdtype)
        c = self.cdtype
        self.step += 1
        g = grad.detach().to(c)
        p = self.w if self.master else self.p.to(c)
        m, v, vmax = self.m.to(c), self.v.to(c), self.vmax.to(c)
        s = lambda x: torch.tensor(f(x), dtype=c)  # noqa: E731  a scalar in compute dtype
        w1, w2 = s(1.0 - beta1), s(1.0 - beta2)
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled:
                p = p * s(1.0 - lr * weight_decay)
            else:
                g = g + s(weight_decay) * p
        m = lerp(m, g, w1)
        if self.kind == "adam":
            v = v * s(beta2) + w2 * g * g
            vhat = v
            if self.amsgrad:
                vmax = torch.maximum(vmax, v)
                vhat = vmax
            # Correctly rounded sqrt, like the kernel's sqrt_rn: torch's fp32 CPU sqrt is
            # off by one ulp in ~0.6% of elements on this machine; through fp64 it is exact.
            denom = vhat.double().sqrt().to(c) if c == torch.float32 else vhat.sqrt()
            bc1 = one_minus_pow(beta1, self.step) if bias_correction else 1.0
            bc2_sqrt = f(np.sqrt(one_minus_pow(beta2, self.step))) if bias_correction else f(1.0)
            step_size = s(lr / bc1)
            if self.one_division:
                # The quantized kernel's form: step_size bc2 m / (sqrt(v) + eps bc2).
                # eps bc2 at least 2**-126 for a positive eps (the kernel's _update says why)
                eps_bc2 = s(eps) * s(bc2_sqrt)
                if s(eps) > 0:  # eps as the kernel reads it (fp32: 1e-46 is 0)
                    eps_bc2 = torch.clamp_min(eps_bc2, 2.0**-126)
                p = p - ((step_size * s(bc2_sqrt)) * m) / (denom + eps_bc2)
            else:
                if bias_correction:
                    # A full tensor, not a 0-dim one: torch divides by a CPU scalar as a
                    # multiply by its reciprocal, which is not IEEE division.
                    denom = denom / torch.full_like(denom, float(bc2_sqrt))
                p = p - (step_size * m) / (denom + s(eps))
        else:
            v = torch.maximum(v * s(beta2), g.abs() + s(eps))
            clr = f(lr / one_minus_pow(beta1, self.step)) if bias_correction else f(lr)
            p = p - (s(clr) * m) / v
        bits = [None] * 4
        if self.sr:
            index = np.arange(p.numel(), dtype=np.uint64)
            r0, r1 = philox2x32(self.key, index, (index >> np.uint64(32) << np.uint64(24)) ^ np.uint64(self.step))
            bits = [r0, r1, r1 >> np.uint32(16), r0 >> np.uint32(16)]
        self.m = self._store(m, bits[1], self.sdtype)
        self.v = self._store(v, bits[2], self.sdtype)
        self.vmax = self._store(vmax, bits[3], self.sdtype)
        if self.master:
            self.w = p
            self.p = round_master(p) if self.dtype == torch.bfloat16 else p.to(self.dtype)
        else:
            self.p = self._store(p, bits[0], self.dtype)
        return self.p


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit on CPU (the interpreter evaluates the kernel with IEEE numpy ops, like
    this reference). On a GPU the per-tensor bias corrections come from the hardware's
    approximate exp/log, so allow one unit in the last place of the dtype there."""
    actual = actual.detach()
    if actual.device.type == "cpu":
        differ = actual != expected
        assert not differ.any(), f"{int(differ.sum())} of {actual.numel()} elements differ"
    else:
        eps = torch.finfo(expected.dtype).eps
        torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=eps, atol=eps * 1e-3)


class QuantReference(Reference):
    """The step above with the moments quantized between steps (the host codec,
    with the kernel's random bits: m the low 16 of r1, v the high 16, vmax the high 16 of
    r0)."""

    _SLOTS = (("m", True), ("v", False), ("vmax", False))

    def __init__(self, param, kind, bits, **kw):
        super().__init__(param, kind, **kw)
        self.bits = bits
        self.sdtype = self  # the moments' "dtype": routes them through _store below
        self.q = {name: Q.quantize(torch.zeros(param.numel()), bits, signed) for name, signed in self._SLOTS}
        self.one_division = True
        self._slot = 0

    def _store(self, x, bits, dtype):
        if dtype is not self:
            return super()._store(x, bits, dtype)
        name, signed = self._SLOTS[self._slot]
        self._slot = (self._slot + 1) % 3
        random = None
        if self.sr:
            random = torch.from_numpy((bits.astype(np.int64) & 0xFFFF).reshape(-1))
        self.q[name] = Q.quantize(x, self.bits, signed, random=random)
        return Q.dequantize(*self.q[name], x.numel(), self.bits, signed).reshape(x.shape)
