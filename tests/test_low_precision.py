"""fp16/bf16 params with fp32 state (and optional fp32 master weights), bit for bit.

The reference (tests/reference.py) runs the same fp32 math in plain torch and rounds
the param with torch's round-to-nearest-even each step; the kernel must give the same
bits. This catches the interpreter's truncating bf16 conversion, which would differ in
about half the elements.
"""
from __future__ import annotations

import pytest
import torch

from helpers import LAUNCH, PAIRS, SHAPES, bf16_subnormals, make_params, random_grads
from reference import Reference, assert_same_bits

CONFIGS = [
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=3e-3, betas=(0.5, 0.9), maximize=True, weight_decay=0.05)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True, bias_correction=False)),
    ("Adamax", dict(lr=2e-2, weight_decay=0.1)),
    ("Adamax", dict(lr=2e-2, maximize=True, bias_correction=False)),
]
STEPS = 5


def _run(name, kwargs, dtype, master, device, grad_dtype=None, shapes=SHAPES):
    cls = PAIRS[name][0]
    params = make_params(shapes, dtype, device, seed=11)
    if grad_dtype is not None:
        for p in params:
            p.grad_dtype = grad_dtype
    kind = "adamax" if name == "Adamax" else "adam"
    refs = [Reference(p, kind, master=master, amsgrad=kwargs.get("amsgrad", False)) for p in params]
    opt = cls(params, master_weights=master, **kwargs, **LAUNCH)
    hyper = dict(kwargs)
    bias_correction = hyper.pop("bias_correction", True)
    beta1, beta2 = hyper.pop("betas", (0.9, 0.999))
    hyper.pop("amsgrad", None)
    maximize = hyper.pop("maximize", False)
    lr = hyper.pop("lr")
    wd = hyper.pop("weight_decay", 1e-2 if name == "AdamW" else 0.0)
    gen = torch.Generator().manual_seed(12)
    for _ in range(STEPS):
        grads = random_grads(params, gen, dtype=grad_dtype)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, r, g in zip(params, refs, grads):
            expected = r.update(g.cpu(), lr, beta1, beta2, 1e-8, wd, decoupled=name == "AdamW",
                                maximize=maximize, bias_correction=bias_correction)
            assert p.dtype == dtype
            assert_same_bits(p, expected)
    for p, r in zip(params, refs):
        state = opt.state[p]
        assert state["exp_avg"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_same_bits(state["exp_avg"], r.m)
        if master and dtype in (torch.float16, torch.bfloat16):
            assert state["master_param"].dtype == torch.float32
            assert_same_bits(state["master_param"], r.w)
        else:
            assert "master_param" not in state
    return params


@pytest.mark.parametrize("dtype,master", [  # master weights apply to fp16/bf16 params only
    pytest.param(dtype, master, id=f"{dtype}-{'master' if master else 'no-master'}")
    for dtype in (torch.bfloat16, torch.float16, torch.float32) for master in (False, True)
    if not (dtype == torch.float32 and master)])
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_bitwise_against_rounded_reference(name, kwargs, dtype, master, device):
    _run(name, kwargs, dtype, master, device)


@pytest.mark.parametrize("master", [False, True], ids=["no-master", "master"])
def test_bf16_params_with_fp32_grads(master, device):
    if not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip("this torch cannot hold fp32 grads on bf16 params (no Tensor.grad_dtype)")
    _run("AdamW", dict(lr=1e-2, weight_decay=0.1), torch.bfloat16, master, device,
         grad_dtype=torch.float32, shapes=[(7,), (1025,), (3, 4)])


def test_master_weights_keep_small_updates(device):
    """With an fp32 master copy, updates below bf16's resolution still accumulate."""
    p = torch.nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16, device=device))
    q = torch.nn.Parameter(p.detach().clone())
    with_master = PAIRS["Adam"][0]([p], lr=1e-4, master_weights=True, **LAUNCH)
    without = PAIRS["Adam"][0]([q], lr=1e-4, **LAUNCH)
    for _ in range(60):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        with_master.step()
        without.step()
    assert torch.all(q == 1.0)  # 1e-4 steps vanish under bf16's 2**-8 spacing at 1.0
    assert torch.all(p < 1.0)
    assert torch.allclose(with_master.state[p]["master_param"], torch.full_like(p, 1 - 60e-4, dtype=torch.float32), atol=1e-5)


@pytest.mark.parametrize(
    "name,kwargs,dtype,master",
    [
        ("AdamW", dict(lr=3e-3, weight_decay=0.1, amsgrad=True), torch.bfloat16, True),
        ("Adam", dict(lr=3e-3, betas=(0.8, 0.95)), torch.float16, False),
        ("Adamax", dict(lr=3e-3, weight_decay=0.01), torch.float32, False),
    ],
    ids=["AdamW-bf16-master-amsgrad", "Adam-fp16", "Adamax-fp32"],
)
def test_many_steps_stay_bitwise(name, kwargs, dtype, master, device):
    """200 steps on odd sizes: rounding errors must not creep in over a long run."""
    cls = PAIRS[name][0]
    params = make_params([(1,), (7,), (1025,), (3, 5)], dtype, device, seed=31)
    kind = "adamax" if name == "Adamax" else "adam"
    refs = [Reference(p, kind, master=master, amsgrad=kwargs.get("amsgrad", False)) for p in params]
    opt = cls(params, master_weights=master, **kwargs, **LAUNCH)
    beta1, beta2 = kwargs.get("betas", (0.9, 0.999))
    wd = kwargs.get("weight_decay", 0.0)
    gen = torch.Generator().manual_seed(32)
    for _ in range(200):
        grads = random_grads(params, gen, scale=0.1)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for r, g in zip(refs, grads):
            r.update(g.cpu(), kwargs["lr"], beta1, beta2, 1e-8, wd, decoupled=name == "AdamW")
    for p, r in zip(params, refs):
        assert_same_bits(p, r.p)
        assert_same_bits(opt.state[p]["exp_avg"], r.m)
        assert opt.state[p]["step"].item() == 200


@pytest.mark.parametrize("kw", [{}, {"master_weights": True}, {"master_weights": "remainder"},
                                {"state_dtype": torch.bfloat16}, {"state_dtype": torch.bfloat16, "amsgrad": True}],
                         ids=["bf16", "master", "remainder", "bf16-state", "bf16-state-amsgrad"])
def test_bf16_subnormals_are_widened_exactly(kw, device):
    """Every bf16 subnormal pattern (both signs) among the params, as the grads and so in
    bf16 state: widened to fp32 exactly, as torch and the GPU's conversion widen them.
    Triton's interpreter's own bf16 widening flushes or garbles them (0x0001 -> 0.0,
    0x0003 -> 0x00400000), so the kernels widen bf16 by the bit shift there."""
    gen = torch.Generator().manual_seed(31)
    patterns = bf16_subnormals()
    start = torch.cat([patterns, torch.randn(130, generator=gen).to(torch.bfloat16)])
    param = torch.nn.Parameter(start[torch.randperm(start.numel(), generator=gen)].to(device))
    amsgrad = kw.get("amsgrad", False)
    ref = Reference(param, "adam", master=kw.get("master_weights", False), amsgrad=amsgrad,
                    state_dtype=kw.get("state_dtype"))
    opt = PAIRS["AdamW"][0]([param], lr=1e-3, weight_decay=0.1, **kw, **LAUNCH)
    for _ in range(3):
        grad = patterns[torch.randint(0, patterns.numel(), (start.numel(),), generator=gen)]
        param.grad = grad.to(device)
        opt.step()
        assert_same_bits(param, ref.update(grad, 1e-3, 0.9, 0.999, 1e-8, 0.1, decoupled=True))
    state = opt.state[param]
    assert_same_bits(state["exp_avg"], ref.m)
    assert_same_bits(state["exp_avg_sq"], ref.v)
    assert ((ref.m.float() != 0) & (ref.m.float().abs() < 1.2e-38)).any()  # subnormal moments met
