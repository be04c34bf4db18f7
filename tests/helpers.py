"""Shared builders for the optimizer tests."""
from __future__ import annotations

import copy

import pytest
import torch

import tritonadam

# Interpreter programs cost ~1 ms each whatever their size, so tests use big blocks;
# shape tests pick sizes around this block.
BLOCK = 1024
LAUNCH = {"block_size": BLOCK, "num_warps": 4}

PAIRS = {
    "Adam": (tritonadam.Adam, torch.optim.Adam),
    "AdamW": (tritonadam.AdamW, torch.optim.AdamW),
    "Adamax": (tritonadam.Adamax, torch.optim.Adamax),
}

# Odd sizes around the block, 0-dim and empty tensors, a 2-D and a 3-D param.
SHAPES = [(), (1,), (7,), (0,), (BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (4097,), (3, 5), (2, 0, 3), (4, 3, 50)]


def make_params(shapes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float32).to(dtype).to(device))
        for s in shapes
    ]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def kwargs_copy(kwargs):
    return {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in kwargs.items()}


def bf16_subnormals() -> torch.Tensor:
    """Every bf16 subnormal (exponent bits 0, mantissa 1..127), positive then negative: the
    values Triton's interpreter's own bf16 widening flushes or garbles."""
    low = torch.arange(1, 128, dtype=torch.int16)
    return torch.cat([low, low | torch.tensor(-32768, dtype=torch.int16)]).view(torch.bfloat16)


def random_grads(params, gen, dtype=None, scale=1.0):
    return [
        (torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale)
        .to(dtype or p.dtype)
        .to(p.device)
        for p in params
    ]


# torch.optim's own configurations of each optimizer, from torch's test helpers. Those
# import expecttest, which not every machine has (GPU images often lack it): there the
# configurations below, which cover the same options, stand in.
_FALLBACK_INPUTS = {
    "Adam": [("default", {}), ("weight_decay", {"weight_decay": 0.1}),
             ("amsgrad", {"amsgrad": True, "weight_decay": 0.1}),
             ("maximize", {"maximize": True, "weight_decay": 0.1, "amsgrad": True}),
             ("non-zero betas, lr", {"lr": 0.01, "betas": (0.8, 0.95)}),
             ("decoupled", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
             ("tensor lr", {"lr": "tensor"})],
    "AdamW": [("default", {}), ("weight_decay", {"weight_decay": 0.1}),
              ("amsgrad", {"amsgrad": True}), ("maximize", {"maximize": True, "amsgrad": True}),
              ("tensor lr", {"lr": "tensor", "weight_decay": 0.1})],
    "Adamax": [("default", {}), ("weight_decay", {"weight_decay": 0.1}),
               ("maximize", {"maximize": True, "weight_decay": 0.1}), ("lr", {"lr": 0.1})],
}


def optim_inputs(name: str, device: str, dtype: torch.dtype) -> list[tuple[str, dict]]:
    """(description, constructor kwargs) of torch.optim's configurations for ``name``."""
    try:
        from torch.testing._internal import common_optimizers as common
    except ImportError:
        return [(desc, {k: (torch.tensor(0.01, dtype=dtype, device=device) if v == "tensor" else v)
                        for k, v in kw.items()}) for desc, kw in _FALLBACK_INPUTS[name]]
    func = {"Adam": common.optim_inputs_func_adam, "AdamW": common.optim_inputs_func_adamw,
            "Adamax": common.optim_inputs_func_adamax}[name]
    return [(inp.desc, inp.kwargs) for inp in func(device, dtype)]


def assert_backward_through_a_stepped_param_raises(opt, w, x, gen, cached_steps=2):
    """The classic GAN mistake: ``backward(retain_graph=True)``, ``opt.step()``, backward
    again. torch's step bumps ``w``'s version counter, so the second backward refuses the
    stepped weight. Taken after ``cached_steps`` plain steps, so the step under test is a
    cached one."""
    for _ in range(cached_steps):
        w.grad = torch.randn(w.shape, generator=gen).to(w.device, w.dtype)
        opt.step()
    y = (torch.tanh(x @ w) @ w).sum()
    y.backward(retain_graph=True)
    before = w._version
    opt.step()
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
