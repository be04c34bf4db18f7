"""differentiable=True against torch.optim's contract, around the step itself: state loaded
or given by hand stays in the autograd graph, every group is recorded under a
differentiable default, and what torch's implementation cannot step is refused before
anything is written."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import Parameter

import tritonadam

NAMES = ["Adam", "AdamW", "Adamax"]
OURS = {name: getattr(tritonadam, name) for name in NAMES}
TORCH = {name: getattr(torch.optim, name) for name in NAMES}
F64 = torch.float64


def _second(name: str) -> str:
    return "exp_inf" if name == "Adamax" else "exp_avg_sq"


@pytest.mark.parametrize("name", NAMES)
def test_loaded_moments_stay_in_the_graph(name):
    """load_state_dict keeps loaded moments that require grad in the graph, as torch.optim
    (which keeps the very tensors) does: a gradient through the next differentiable step
    reaches the grads of the steps before a save-and-load, and learned initial moments."""
    def reload(mod):
        gen = torch.Generator().manual_seed(0)
        g1 = torch.randn(5, dtype=F64, generator=gen, requires_grad=True)
        p = torch.randn(5, dtype=F64, generator=gen, requires_grad=True).clone()
        opt = getattr(mod, name)([p], lr=0.1, differentiable=True)
        p.grad = g1.clone()
        opt.step()
        opt.load_state_dict(opt.state_dict())
        p.grad = torch.randn(5, dtype=F64, generator=gen)
        opt.step()
        return torch.autograd.grad((opt.state[p]["exp_avg"].sum(), p.sum()), g1)

    def learned(mod):
        gen = torch.Generator().manual_seed(1)
        m0 = torch.rand(5, dtype=F64, generator=gen, requires_grad=True)
        v0 = torch.rand(5, dtype=F64, generator=gen, requires_grad=True)
        p = torch.randn(5, dtype=F64, generator=gen, requires_grad=True).clone()
        opt = getattr(mod, name)([p], lr=0.1, differentiable=True)
        sd = opt.state_dict()
        sd["state"] = {0: {"step": torch.tensor(3.0), "exp_avg": m0 * 1, _second(name): v0 * 1}}
        opt.load_state_dict(sd)
        p.grad = torch.randn(5, dtype=F64, generator=gen)
        opt.step()
        return torch.autograd.grad(p.sum(), (m0, v0))

    # (torch's Adamax cannot differentiate through two steps: its in-place exp_inf update)
    for case in (learned,) if name == "Adamax" else (reload, learned):
        ours, theirs = case(tritonadam), case(torch.optim)
        for a, b in zip(ours, theirs):
            assert a.abs().sum() > 0
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_state_given_in_another_layout_stays_in_the_graph(name):
    """State written into opt.state by hand (as torch's differentiable tests do) laid out
    unlike its param is re-laid out inside the graph: the gradient reaches the given
    tensors (it had been None: the copy was made under no_grad)."""
    grads = []
    for mod in (tritonadam, torch.optim):
        gen = torch.Generator().manual_seed(2)
        p = torch.randn(4, 3, dtype=F64, generator=gen, requires_grad=True).clone()
        m0 = torch.rand(4, 3, dtype=F64, generator=gen, requires_grad=True)
        v0 = torch.rand(4, 3, dtype=F64, generator=gen, requires_grad=True)
        opt = getattr(mod, name)([p], lr=0.1, differentiable=True)
        opt.state[p].update({"step": torch.tensor(3.0), "exp_avg": m0.t().contiguous().t(),
                             _second(name): v0.t().contiguous().t()})
        p.grad = torch.randn(4, 3, dtype=F64, generator=gen)
        opt.step()
        grads.append(torch.autograd.grad(p.sum(), (m0, v0)))
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_bias_correction_false_is_refused_where_torch_steps(name):
    """torch.optim's implementation has no bias_correction=False: refused for
    differentiable=True at construction, in an added group and in a group switched by hand
    (it had been ignored there, silently), before anything is written."""
    with pytest.raises(RuntimeError, match="no bias_correction=False"):
        OURS[name]([torch.randn(3, requires_grad=True).clone()], differentiable=True, bias_correction=False)
    p = Parameter(torch.randn(3))
    opt = OURS[name]([p], lr=0.1, bias_correction=False)
    with pytest.raises(RuntimeError, match="no bias_correction=False"):
        opt.add_param_group({"params": [Parameter(torch.randn(2))], "differentiable": True})
    p.grad = torch.randn(3)
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    opt.param_groups[0]["differentiable"] = True
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="no bias_correction=False"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


@pytest.mark.parametrize("name", NAMES)
def test_every_group_is_recorded_under_a_differentiable_default(name):
    """torch.optim's step takes its grad mode from the constructor's differentiable: a group
    set to differentiable=False in an optimizer built with True is recorded too (a non-leaf
    param's update is in the graph; a leaf gets torch's in-place error, nothing written)."""
    out = []
    for mod in (tritonadam, torch.optim):
        gen = torch.Generator().manual_seed(3)
        a = torch.randn(4, dtype=F64, generator=gen, requires_grad=True).clone()
        b = torch.randn(4, dtype=F64, generator=gen, requires_grad=True).clone()
        g = torch.randn(4, dtype=F64, generator=gen, requires_grad=True)
        opt = getattr(mod, name)([{"params": [a]}, {"params": [b], "differentiable": False}],
                                 lr=0.1, differentiable=True)
        a.grad = torch.randn(4, dtype=F64, generator=gen)
        b.grad = g * 1
        if name == "Adamax":  # torch's differentiable=False Adamax: an out= op, recorded
            with pytest.raises(RuntimeError, match="out=... arguments don't support automatic differentiation"):
                opt.step()
            continue
        opt.step()
        assert b.grad_fn is not None
        out.append((b.detach(), *torch.autograd.grad(b.sum(), g)))
    for x, y in zip(*out):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)
    a, leaf = torch.randn(4, requires_grad=True).clone(), Parameter(torch.randn(4))
    opt = OURS[name]([{"params": [a]}, {"params": [leaf], "differentiable": False}], differentiable=True)
    a.grad, leaf.grad = torch.randn(4), torch.randn(4)
    before = (a.detach().clone(), leaf.detach().clone())
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(leaf.detach(), before[1]) and not opt.state
    with pytest.raises(RuntimeError, match="differentiable=True steps with torch.optim's implementation"):
        OURS[name]([{"params": [a], "differentiable": False}], differentiable=True, master_weights=True)


@pytest.mark.parametrize(("param", "grad"), [(torch.float32, torch.float64), (torch.float16, torch.bfloat16),
                                             (torch.float32, torch.complex64)])
@pytest.mark.parametrize("name", NAMES)
def test_grad_dtypes_torch_refuses_are_refused(name, param, grad):
    """A grad of a dtype the param does not step with is refused in a differentiable group
    as on the kernel path (it had been cast silently: a complex grad lost its imaginary
    part), before anything is written."""
    p, q = Parameter(torch.randn(4).to(param)), Parameter(torch.randn(4).to(param))
    opt = OURS[name]([q, p], lr=0.1)
    opt.param_groups[0]["differentiable"] = True
    for t in (p, q):
        t.grad_dtype = None  # torch 2.13: a leaf's grad must otherwise have its dtype
    q.grad = torch.randn(4).to(param)
    p.grad = torch.randn(4).to(grad)
    before = (q.detach().clone(), p.detach().clone())
    with pytest.raises(RuntimeError, match="param steps with|params, each with a grad"):
        opt.step()
    assert torch.equal(q.detach(), before[0]) and torch.equal(p.detach(), before[1]) and not opt.state


@pytest.mark.parametrize("name", NAMES)
def test_a_step_count_that_requires_grad_is_refused_first(name):
    """torch's error for a ``step`` that requires grad, raised before any param is stepped
    (the leaf's in-place error had come after earlier params were written)."""
    a, b = torch.randn(3, requires_grad=True).clone(), torch.randn(3, requires_grad=True).clone()
    opt = OURS[name]([a, b], lr=0.1, differentiable=True)
    opt.state[b]["step"] = torch.tensor(1.0, requires_grad=True)
    a.grad, b.grad = torch.randn(3), torch.randn(3)
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="`requires_grad` is not supported for `step` in differentiable mode"):
        opt.step()
    assert torch.equal(a.detach(), before) and a not in opt.state


def test_a_group_switched_to_differentiable_after_a_clip_is_refused():
    """The fused clip's coefficient cannot reach torch.optim's implementation: a group
    switched to differentiable=True between clip_grad_norm_ and step is refused (it was
    stepped unclipped, silently), nothing written; zero_grad() drops the clip."""
    a, b = Parameter(torch.randn(3)), Parameter(torch.randn(3))
    opt = tritonadam.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.randn(3) * 30, torch.randn(3) * 40
    opt.clip_grad_norm_(1.0)
    opt.param_groups[1]["differentiable"] = True
    before = (a.detach().clone(), b.detach().clone())
    with pytest.raises(NotImplementedError, match="clip_grad_norm_ measured grads of params that differentiable"):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    assert all(st["step"] == 0 for st in opt.state.values())  # (the clip makes the state)
    opt.zero_grad()
    a.grad, b.grad = torch.randn(3), torch.randn(3)
    opt.step()
    assert set(opt.state) == {a, b}
    opt.param_groups[1]["differentiable"] = False
    opt.clip_grad_norm_(1.0)
    opt.param_groups[1]["differentiable"] = True
    b.grad.mul_(2.0)  # changed since the clip: new values, not the ones it measured
    opt.step()
    assert int(opt.state[b]["step"]) == 2


@pytest.mark.parametrize("differentiable", [False, True])
def test_loaded_leaves_that_require_grad_are_kept_as_torch_keeps_them(differentiable):
    """Moments that require grad come back from ``torch.load`` of a differentiable run's
    checkpoint as leaves: kept themselves (as torch.optim keeps the very tensors), not
    copied into the graph (a copy kept the loaded tensor alive beside it, and
    ``copy.deepcopy`` refused the optimizer and its state dict)."""
    for mod in (tritonadam, torch.optim):
        p = torch.randn(5, dtype=F64, requires_grad=True).clone() if differentiable \
            else Parameter(torch.randn(5, dtype=F64))
        opt = mod.Adam([p], lr=0.1, differentiable=differentiable)
        moments = {k: torch.rand(5, dtype=F64, requires_grad=True) for k in ("exp_avg", "exp_avg_sq")}
        opt.load_state_dict({"state": {0: {"step": torch.tensor(2.0), **moments}},
                             "param_groups": opt.state_dict()["param_groups"]})
        assert all(opt.state[p][k] is v for k, v in moments.items()), mod
        copy.deepcopy(opt.state_dict())
        if not differentiable:  # (a param in a graph is no leaf either)
            copy.deepcopy(opt)
