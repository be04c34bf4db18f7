"""A plain-torch fp32 (or fp64) Adam/AdaMax step in the kernels' exact op order.

Used to check fp16/bf16 params bit for bit: the reference keeps fp32 math, rounds the
param to its dtype with torch's own round-to-nearest-even after every step, and the
kernel must produce the same bits. The per-tensor scalars (bias corrections, step size,
decay factor) are computed in float64 with numpy, in the formula of the prepare kernel,
and rounded once to the compute dtype, so the comparison tests the elementwise update and
the rounding, where bugs live.
"""
from __future__ import annotations

import math

import numpy as np
import torch


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


class Reference:
    """State of one param stepped in high precision (the kernel's compute dtype)."""

    def __init__(self, param: torch.Tensor, kind: str, master: bool = False, amsgrad: bool = False):
        self.dtype = param.dtype
        self.cdtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        self.kind = kind
        self.master = master and param.dtype in (torch.float16, torch.bfloat16)
        self.amsgrad = amsgrad
        self.w = param.detach().to(self.cdtype).clone()
        self.p = param.detach().clone()
        self.m = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w)
        self.vmax = torch.zeros_like(self.w)
        self.step = 0

    def update(self, grad, lr, beta1, beta2, eps, weight_decay, decoupled=False,
               maximize=False, bias_correction=True):
        f = _np(self.cdtype)
        c = self.cdtype
        self.step += 1
        g = grad.detach().to(c)
        p = self.w if self.master else self.p.to(c)
        s = lambda x: torch.tensor(f(x), dtype=c)  # noqa: E731  a scalar in compute dtype
        w1, w2 = s(1.0 - beta1), s(1.0 - beta2)
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled:
                p = p * s(1.0 - lr * weight_decay)
            else:
                g = g + s(weight_decay) * p
        self.m = lerp(self.m, g, w1)
        if self.kind == "adam":
            self.v = self.v * s(beta2) + w2 * g * g
            vhat = self.v
            if self.amsgrad:
                self.vmax = torch.maximum(self.vmax, self.v)
                vhat = self.vmax
            # Correctly rounded sqrt, like the kernel's sqrt_rn: torch's fp32 CPU sqrt is
            # off by one ulp in ~0.6% of elements on this machine; through fp64 it is exact.
            denom = vhat.double().sqrt().to(c) if c == torch.float32 else vhat.sqrt()
            if bias_correction:
                bc1 = one_minus_pow(beta1, self.step)
                bc2_sqrt = f(np.sqrt(one_minus_pow(beta2, self.step)))
                step_size = f(lr / bc1)
                # A full tensor, not a 0-dim one: torch divides by a CPU scalar as a
                # multiply by its reciprocal, which is not IEEE division.
                denom = denom / torch.full_like(denom, float(bc2_sqrt))
            else:
                step_size = f(lr)
            denom = denom + s(eps)
            p = p - (s(step_size) * self.m) / denom
        else:
            self.v = torch.maximum(self.v * s(beta2), g.abs() + s(eps))
            clr = f(lr / one_minus_pow(beta1, self.step)) if bias_correction else f(lr)
            p = p - (s(clr) * self.m) / self.v
        if self.master:
            self.w = p
        self.p = p.to(self.dtype)
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
        torch.testing.assert_close(actual.cpu(), expected, rtol=eps, atol=eps * 1e-3)
