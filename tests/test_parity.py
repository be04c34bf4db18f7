"""Step-by-step parity with torch.optim over torch's own optimizer configurations."""
from __future__ import annotations

import pytest
import torch

from helpers import LAUNCH, PAIRS, SHAPES, clone_params, kwargs_copy, make_params, optim_inputs, random_grads
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-11)}
STEPS = 6


def _configs(device_type):
    for name in PAIRS:
        for dtype in (torch.float32, torch.float64):
            for desc, kwargs in optim_inputs(name, device_type, dtype):
                yield pytest.param(name, dtype, kwargs, id=f"{name}-{desc}-{str(dtype)[6:]}")


def _step_both(ours, theirs, params, ref, grads):
    """Both optimizers step the same grads (copies)."""
    for p, q, g in zip(params, ref, grads):
        p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    theirs.step()


def _state_keys(name, kwargs):
    if name == "Adamax":
        return ("exp_avg", "exp_inf")
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if kwargs.get("amsgrad") else ())


@pytest.mark.parametrize("name,dtype,kwargs", list(_configs("cpu")))
def test_matches_torch(name, dtype, kwargs, device):
    """Params and state equal torch.optim(foreach=False) over several steps.

    Includes a frozen param (never has a grad) and a param whose grad is None on some
    steps: it is skipped then and keeps its own step count.
    """
    ours_cls, torch_cls = PAIRS[name]
    params = make_params(SHAPES, dtype, device, seed=1)
    ref = clone_params(params)
    ours = ours_cls(params, **kwargs_copy(kwargs), **LAUNCH)
    theirs = torch_cls(ref, **kwargs_copy(kwargs), foreach=False)
    frozen, sometimes = 2, 4
    gen = torch.Generator().manual_seed(2)
    for step in range(STEPS):
        for i, (g, p, q) in enumerate(zip(random_grads(params, gen), params, ref)):
            has_grad = i != frozen and not (i == sometimes and step % 3 == 1)
            p.grad = g.clone() if has_grad else None
            q.grad = g.clone() if has_grad else None
        ours.step()
        theirs.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, **TOL[dtype])
    assert params[frozen] not in ours.state
    for p, q in zip(params, ref):
        if q not in theirs.state:
            continue
        s, t = ours.state[p], theirs.state[q]
        assert s["step"].item() == t["step"].item()
        assert s["step"].dtype == torch.float32
        for key in _state_keys(name, kwargs):
            assert s[key].dtype == dtype
            torch.testing.assert_close(s[key], t[key], **TOL[dtype])
    assert ours.state[params[sometimes]]["step"].item() == STEPS - 2


@pytest.mark.parametrize("name", list(PAIRS))
def test_param_groups_have_torch_keys(name):
    ours_cls, torch_cls = PAIRS[name]
    p = torch.nn.Parameter(torch.randn(3))
    assert ours_cls([p]).param_groups[0].keys() == torch_cls([p]).param_groups[0].keys()
    assert ours_cls.__name__ == name or (name == "Adamax" and ours_cls.__name__ == "Adamax")


@pytest.mark.parametrize("name", ["Adam", "Adamax"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_grads_propagate_like_torch(name, bad, device):
    ours_cls, torch_cls = PAIRS[name]
    params = make_params([(64,), (5,)], torch.float32, device, seed=3)
    ref = clone_params(params)
    kw = {"amsgrad": True} if name == "Adam" else {}
    ours, theirs = ours_cls(params, **kw, **LAUNCH), torch_cls(ref, **kw, foreach=False)
    gen = torch.Generator().manual_seed(4)
    for step in range(3):
        grads = random_grads(params, gen)
        if step == 1:
            grads[0][::7] = float(bad)
            grads[0][3] = -float(bad)
        _step_both(ours, theirs, params, ref, grads)
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("name", ["Adam", "Adamax"])
@pytest.mark.parametrize("state_dtype", [None, "8bit", "4bit"])
def test_nonfinite_param_without_weight_decay_keeps_its_moments_finite(name, state_dtype, device):
    """A group without weight decay (or with decoupled decay) launched with one that adds
    L2 decay to the grad: torch adds nothing there, so a param already NaN or inf leaves
    its moments finite. 0 * p would make them NaN, and with quantized state the block's
    scale too."""
    ours_cls, torch_cls = PAIRS[name]
    params = make_params([(300,), (33,), (65,)], torch.float32, device, seed=11)
    with torch.no_grad():
        params[0][::5] = float("nan")
        params[0][1::7] = float("inf")
        params[0][2::11] = -float("inf")
    ref = clone_params(params)

    def groups(ps):
        gs = [{"params": [ps[0]], "weight_decay": 0.0}, {"params": [ps[1]], "weight_decay": 0.25}]
        if name == "Adam":
            gs.append({"params": [ps[2]], "weight_decay": 0.1, "decoupled_weight_decay": True})
        else:
            gs.append({"params": [ps[2]], "weight_decay": 0.0})
        return gs

    fmt = {} if state_dtype is None else {"state_dtype": state_dtype}
    ours = ours_cls(groups(params), lr=0.01, **fmt, **LAUNCH)
    theirs = torch_cls(groups(ref), lr=0.01, foreach=False)
    gen = torch.Generator().manual_seed(12)
    for _ in range(3):
        _step_both(ours, theirs, params, ref, random_grads(params, gen))
    exported = ours.torch_state_dict()["state"]
    for i, (p, q) in enumerate(zip(params, ref)):
        assert torch.equal(p.isfinite(), q.isfinite())
        for key in _state_keys(name, {}):
            assert exported[i][key].isfinite().all(), (i, key)
            if state_dtype is None:
                torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], **TOL[torch.float32])
        if state_dtype is None:
            torch.testing.assert_close(p, q, equal_nan=True, **TOL[torch.float32])


@pytest.mark.parametrize("name", ["Adam", "Adamax"])
@pytest.mark.parametrize("wd", [1e-50, 1e-45, -0.0])
def test_weight_decay_is_zero_only_where_torch_finds_it_zero(name, wd, device):
    """torch tests ``weight_decay != 0`` on the group's value: 1e-50, which rounds to 0 in
    fp32, still adds 0 * p (NaN moments at a NaN or inf param), -0.0 adds nothing."""
    ours_cls, torch_cls = PAIRS[name]
    params = make_params([(40,), (7,)], torch.float32, device, seed=13)
    with torch.no_grad():
        params[0][::3] = float("nan")
        params[0][1::5] = float("inf")
    ref = clone_params(params)

    def groups(ps):
        return [{"params": [ps[0]], "weight_decay": wd}, {"params": [ps[1]], "weight_decay": 0.5}]

    ours = ours_cls(groups(params), lr=0.01, **LAUNCH)
    theirs = torch_cls(groups(ref), lr=0.01, foreach=False)
    gen = torch.Generator().manual_seed(14)
    for _ in range(2):
        _step_both(ours, theirs, params, ref, random_grads(params, gen))
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, equal_nan=True, **TOL[torch.float32])
        for key in _state_keys(name, {}):
            torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], equal_nan=True,
                                       **TOL[torch.float32])


@pytest.mark.parametrize("name", ["Adam", "Adamax"])
def test_a_group_without_weight_decay_keeps_its_grads_negative_zeros(name, device):
    """Launched with an L2-decay group, a group without decay adds nothing to its grads:
    a -0 grad stays -0 (with beta1 = 0, exp_avg takes the grad's zeros as torch's does;
    adding +0 made them +0)."""
    ours_cls, torch_cls = PAIRS[name]
    results = []
    for cls, extra in ((ours_cls, LAUNCH), (torch_cls, {"foreach": False})):
        a = torch.nn.Parameter(torch.ones(2, device=device))
        b = torch.nn.Parameter(torch.zeros(6, device=device))
        opt = cls([{"params": [a], "weight_decay": 0.01}, {"params": [b], "weight_decay": 0.0}],
                  lr=1e-3, betas=(0.0, 0.99), **extra)
        for g in ([-1.0, 1.0, -1.0, 1.0, -2.0, 3.0], [-0.0, 0.0, -0.0, 0.0, -0.0, 0.0]):
            a.grad = torch.ones(2, device=device)
            b.grad = torch.tensor(g, device=device)
            opt.step()
        results.append((opt.state[b]["exp_avg"].cpu(), b.detach().cpu()))
    (m, p), (want_m, want_p) = results
    assert torch.equal(m, want_m) and torch.equal(m.signbit(), want_m.signbit())
    assert torch.equal(p, want_p) and torch.equal(p.signbit(), want_p.signbit())


def test_lr_scheduler_and_closure(device):
    """Schedulers write lr into param_groups each step; the step reads it every time."""
    params = make_params([(33,), (8, 8)], torch.float32, device, seed=5)
    ref = clone_params(params)
    ours = PAIRS["AdamW"][0](params, lr=0.1, **LAUNCH)
    theirs = torch.optim.AdamW(ref, lr=0.1, foreach=False)
    s1 = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=0.1, total_steps=10)
    s2 = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=0.1, total_steps=10)
    x = torch.randn(8, device=device)
    for _ in range(5):
        def closure(ps=params):
            for p in ps:
                p.grad = None
            loss = (ps[0].sum() * 0.1 + (ps[1] @ x).pow(2).sum())
            loss.backward()
            return loss

        loss_a = ours.step(closure)
        loss_b = theirs.step(lambda: closure(ref))
        torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
        s1.step()
        s2.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert ours.param_groups[0]["betas"] == theirs.param_groups[0]["betas"]


def test_grads_are_never_written(device):
    params = make_params([(100,), (7,)], torch.float32, device, seed=6)
    opt = PAIRS["Adam"][0](params, weight_decay=0.1, maximize=True, **LAUNCH)
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        grads = random_grads(params, gen)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("betas", [(0.0, 0.95), (0.0, 0.0), (0.5, 0.0)])
def test_zero_betas_match_torch_and_warn_nothing(name, betas, device, recwarn):
    """A beta of 0 (no momentum, or no second-moment memory) makes beta**t underflow to
    0 from the second step: the bias corrections are exactly 1, as torch's, and nothing
    in the step warns (the interpreter's numpy once warned of a log(0))."""
    ours_cls, torch_cls = PAIRS[name]
    params = make_params(SHAPES, torch.float32, device, seed=3)
    ref = clone_params(params)
    ours = ours_cls(params, lr=1e-2, betas=betas, **LAUNCH)
    theirs = torch_cls(ref, lr=1e-2, betas=betas, foreach=False)
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        for g, p, q in zip(random_grads(params, gen), params, ref):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, **TOL[torch.float32])
    assert not [str(w.message) for w in recwarn], [str(w.message) for w in recwarn]
