"""Bad input: torch's errors for hyper-parameters, clear errors for what we cannot step,
and a failed step leaves params and state untouched."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    optim_error_inputs_func_adam,
    optim_error_inputs_func_adamax,
    optim_error_inputs_func_adamw,
)

from helpers import LAUNCH, PAIRS, make_params

ERRORS = {
    "Adam": optim_error_inputs_func_adam,
    "AdamW": optim_error_inputs_func_adamw,
    "Adamax": optim_error_inputs_func_adamax,
}


def _error_cases():
    for name, func in ERRORS.items():
        for case in func("cpu", torch.float32):
            yield pytest.param(name, case, id=f"{name}-{case.optimizer_error_input.desc}")


@pytest.mark.parametrize("name,case", list(_error_cases()))
def test_torch_error_inputs(name, case):
    """Each of torch's own error cases raises (or warns) as torch.optim does."""
    cls = PAIRS[name][0]
    inp = case.optimizer_error_input
    params = inp.params if inp.params is not None else [torch.nn.Parameter(torch.randn(2, 2))]
    if case.error_type is UserWarning or issubclass(case.error_type, Warning):
        with pytest.warns(case.error_type, match=case.error_regex):
            cls(params, **inp.kwargs)
        return
    with pytest.raises(case.error_type, match=case.error_regex):
        opt = cls(params, **inp.kwargs)
        if case.error_on == OptimizerErrorEnum.STEP_ERROR:
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.randn_like(p)
            opt.step()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=1000), "Invalid block_size"),
        (dict(block_size=8), "Invalid block_size"),
        (dict(num_warps=3), "Invalid num_warps"),
        (dict(autotune="sometimes"), "Invalid autotune"),
        (dict(differentiable=True, master_weights=True), "differentiable=True steps with torch.optim"),
        (dict(lr=-1.0), "Invalid learning rate"),
        (dict(eps=-1.0), "Invalid epsilon"),
    ],
)
def test_invalid_options(kwargs, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        PAIRS["Adam"][0]([torch.nn.Parameter(torch.randn(2))], **kwargs)


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()
    }


def _assert_untouched(opt, params, snap):
    before_params, before_state = snap
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
    assert {id(p) for p in opt.state} == set(before_state)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, before_state[id(p)][k])


@pytest.mark.parametrize("bad", ["sparse", "complex-grad", "shape"])
def test_bad_grad_raises_and_touches_nothing(bad, device):
    good = make_params([(5,), (1030,)], torch.float32, device)
    odd = torch.nn.Parameter(torch.randn(4, 3, device=device))
    opt = PAIRS["AdamW"][0]([{"params": good}, {"params": [odd], "lr": 1e-2}], **LAUNCH)
    for p in good:
        p.grad = torch.randn_like(p)
    opt.step()  # a first good step so there is state to protect
    snap = _snapshot(opt, good + [odd])
    for p in good:
        p.grad = torch.randn_like(p)
    if bad == "sparse":
        odd.grad = torch.randn(4, 3, device=device).to_sparse()
        match = "does not support sparse gradients"
    elif bad == "complex-grad":
        # The setter refuses a complex grad for a real param; a buggy hook might not.
        odd.grad = torch.randn_like(odd)
        odd.grad.data = torch.randn(4, 3, dtype=torch.complex64, device=device)
        match = "complex"
    else:
        # The grad setter checks shapes, so go around it as a buggy hook might.
        odd.grad = None
        odd.grad = torch.randn(4, 3, device=device)
        odd.grad.data = torch.randn(12, device=device)
        match = "grad of shape"
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    _assert_untouched(opt, good + [odd], snap)


def test_unsupported_dtype(device):
    p = torch.nn.Parameter(torch.randn(3, device=device).to(torch.float8_e4m3fn), requires_grad=False)
    p.grad = torch.zeros(3, device=device).to(torch.float8_e4m3fn)
    opt = PAIRS["Adam"][0]([p], **LAUNCH)
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16 and float64"):
        opt.step()


def test_non_dense_param_is_stepped_like_torch(device):
    """A strided view with gaps steps through a staging copy, like torch.optim steps it."""
    base = torch.randn(6, 4, device=device)
    p = torch.nn.Parameter(base[:, :2])
    q = torch.nn.Parameter(base[:, :2].clone())
    if p.is_contiguous():
        pytest.skip("this torch made the parameter contiguous")
    ours = PAIRS["Adam"][0]([p], weight_decay=0.1, **LAUNCH)
    theirs = torch.optim.Adam([q], weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        g = torch.randn(6, 2, generator=gen).to(device)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert p.stride() == (4, 1)


def test_transposed_grad_is_read_correctly(device):
    """A grad whose strides differ from the param's is stepped by value, not by memory."""
    p = torch.nn.Parameter(torch.randn(5, 3, device=device))
    q = torch.nn.Parameter(p.detach().clone())
    g = torch.randn(3, 5, device=device).t()  # same shape, other strides
    p.grad, q.grad = g, g.contiguous()
    a, b = PAIRS["Adam"][0]([p], **LAUNCH), PAIRS["Adam"][0]([q], **LAUNCH)
    a.step()
    b.step()
    assert torch.equal(p, q)
    assert torch.equal(p.grad, g)


def test_cpu_tensors_without_interpreter_say_what_to_do(tmp_path):
    code = (
        "import torch, tritonadam\n"
        "p = torch.nn.Parameter(torch.randn(3)); p.grad = torch.randn(3)\n"
        "tritonadam.Adam([p]).step()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "CUDA or ROCm device" in out.stderr and "TRITON_INTERPRET=1" in out.stderr


def test_cache_follows_changes_between_steps(device):
    """The per-group launch cache must notice what changed since it was built: a param
    whose storage moved (``p.data = ...``), a grad that is now non-contiguous or sparse,
    a grad that disappears or appears."""
    params = make_params([(6, 5), (9,)], torch.float32, device, seed=21)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = PAIRS["Adam"][0](params, **LAUNCH)
    theirs = torch.optim.Adam(ref, foreach=False)
    gen = torch.Generator().manual_seed(22)

    def step(grads):
        for p, q, g in zip(params, ref, grads):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        ours.step()
        theirs.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)

    rand = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    step([rand(6, 5), rand(9)])
    step([rand(6, 5), rand(9)])
    step([rand(5, 6).t(), rand(9)])  # non-contiguous grad
    step([None, rand(9)])  # a grad gone
    step([rand(6, 5), rand(9)])  # and back
    fresh = rand(9)
    params[1].data = fresh.clone()  # storage moved under the optimizer
    ref[1].data = fresh.clone()
    step([rand(6, 5), rand(9)])
    params[0].grad = rand(6, 5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        ours.step()
