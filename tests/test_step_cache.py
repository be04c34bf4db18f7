"""The step cache (tritonadam/step_cache.py): what its per-step check notices, what it
keeps between steps (never a grad: ``zero_grad(set_to_none=True)`` must free them), and
the clip-then-step path that confirms the clip's check instead of repeating it."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import tritonadam
from helpers import LAUNCH, PAIRS, make_params, random_grads
from tritonadam.kernels.plan import DeviceTables


def _setup(device, n=3):
    params = make_params([(40,), (7,), (3, 5)][:n], torch.float32, device, seed=1)
    opt = PAIRS["AdamW"][0](params, **LAUNCH)
    return params, opt


def _grads(params, seed):
    for p, g in zip(params, random_grads(params, torch.Generator().manual_seed(seed))):
        p.grad = g


@pytest.mark.parametrize("change", ["none", "param-data", "state-entry", "moment-data", "grad-dtype",
                                    "inactive-gains-grad", "param-swapped", "group-added", "option"])
def test_the_check_sees_what_changed_since_the_tables_were_built(change, device):
    params, opt = _setup(device)
    extra = torch.nn.Parameter(torch.randn(4, device=device))
    opt.add_param_group({"params": [extra]})
    _grads(params, 2)
    opt.step()
    cache = opt._cache
    _grads(params, 3)
    if change == "param-data":
        params[0].data = params[0].detach().clone()
    elif change == "state-entry":
        opt.state[params[1]]["exp_avg"] = opt.state[params[1]]["exp_avg"].clone()
    elif change == "moment-data":
        opt.state[params[1]]["exp_avg"].data = opt.state[params[1]]["exp_avg"].clone()
    elif change == "grad-dtype":
        params[2].grad.data = params[2].grad.to(torch.bfloat16)  # around the setter, as hooks do
    elif change == "inactive-gains-grad":
        extra.grad = torch.randn_like(extra)
    elif change == "param-swapped":
        opt.param_groups[0]["params"][1] = torch.nn.Parameter(torch.randn(7, device=device))
        opt.param_groups[0]["params"][1].grad = torch.randn(7, device=device)
    elif change == "group-added":
        opt.param_groups[1]["params"].append(torch.nn.Parameter(torch.randn(2, device=device)))
    elif change == "option":
        opt.param_groups[0]["amsgrad"] = True
    same = cache.check(opt.param_groups, opt.state, opt._options())
    assert same == (change == "none")
    opt.step()
    assert (opt._cache is cache) == (change == "none")


@pytest.mark.parametrize("path", ["build", "cached", "clip"])
def test_no_grad_outlives_its_step(path, device):
    """After the step and zero_grad(set_to_none=True), nothing of ours holds a grad: the
    first step's rows, the check's taken grads and a consumed clip all let them go."""
    params, opt = _setup(device)
    if path != "build":
        _grads(params, 4)
        opt.step()
        opt.zero_grad()
    _grads(params, 5)
    refs = [weakref.ref(p.grad) for p in params]
    if path == "clip":
        opt.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_clip_keeps_nothing_the_optimizer_let_go():
    """A clip's bookkeeping refers to the cache it measured weakly: after a clip and a step,
    a load_state_dict (a rollback to a checkpoint) frees the state it replaced, and params
    removed from the groups with their state are freed with their module, at once as with
    torch.optim (the clipper held the old cache, and through it every tensor its tables
    pointed at, until the next clip: forever for a run that stops clipping)."""
    def run(cls):
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
        opt = cls(model.parameters(), lr=0.1)
        for _ in range(2):
            model(torch.randn(4, 6)).square().sum().backward()
            if isinstance(opt, tritonadam.AdamW):
                opt.clip_grad_norm_(1.0)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        saved = copy.deepcopy(opt.state_dict())
        old_state = [weakref.ref(t) for st in opt.state.values() for t in st.values()]
        opt.load_state_dict(saved)
        del saved  # the loaded state may be its very tensors
        gc.collect()
        rolled_back = sum(r() is not None for r in old_state)
        last = model[1]
        opt.param_groups[0]["params"] = list(model[0].parameters())
        removed = [weakref.ref(p) for p in last.parameters()]
        removed += [weakref.ref(t) for p in last.parameters() for t in opt.state.pop(p).values()]
        del model[1], last
        gc.collect()
        return rolled_back, sum(r() is not None for r in removed)

    assert run(tritonadam.AdamW) == run(torch.optim.AdamW) == (0, 0)


def test_a_step_after_a_clip_confirms_its_check_instead_of_repeating_it(device, monkeypatch):
    params, opt = _setup(device)
    _grads(params, 6)
    opt.step()
    cache = opt._cache
    checks = []
    real = type(cache).check
    monkeypatch.setattr(type(cache), "check", lambda self, *a: checks.append(1) or real(self, *a))
    _grads(params, 7)
    opt.clip_grad_norm_(1.0)
    opt.step()
    assert len(checks) == 1  # the clip's; the step only confirmed it
    _grads(params, 8)
    opt.clip_grad_norm_(1.0)
    params[1].grad = torch.randn_like(params[1])  # replaced between the clip and the step
    opt.step()
    assert len(checks) == 3  # the clip's, then the step's own full check
    assert not opt._clipper.pending


@pytest.mark.parametrize("change", ["replaced", "none", "data-moved", "detached"])
def test_a_grad_changed_between_a_clip_and_the_step_is_checked_again(change, device, monkeypatch):
    """The step's confirmation sees a grad replaced, dropped or moved under ``.data``
    since the clip (then checks in full); a detached alias of the same grad is the same
    memory and needs no new check."""
    params, opt = _setup(device)
    _grads(params, 6)
    opt.step()
    checks = []
    real = type(opt._cache).check
    monkeypatch.setattr(type(opt._cache), "check", lambda self, *a: checks.append(1) or real(self, *a))
    _grads(params, 7)
    opt.clip_grad_norm_(1.0)
    before = params[1].detach().clone()
    if change == "replaced":
        params[1].grad = torch.randn_like(params[1])
    elif change == "none":
        params[1].grad = None
    elif change == "data-moved":
        params[1].grad.data = params[1].grad.detach().clone()
    else:
        params[1].grad = params[1].grad.detach()
    opt.step()
    assert len(checks) == (1 if change == "detached" else 2)
    if change == "none":
        assert torch.equal(params[1].detach(), before)  # no grad: not stepped
    else:
        assert not torch.equal(params[1].detach(), before)
    assert all(torch.isfinite(p).all() for p in params)


def test_a_transposed_alias_set_between_a_clip_and_the_step_is_checked_again(device, monkeypatch):
    """A square param's grad replaced by its own transpose: the same address, shape and
    dtype, another layout. The step checks in full and steps what the grad holds."""
    params = make_params([(4, 4), (7,)], torch.float32, device, seed=3)
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt, ref = (PAIRS["AdamW"][0](ps, **LAUNCH) for ps in (params, twins))
    for step in range(3):  # the first steps build the cache; the last takes the alias
        _grads(params, 20 + step)
        for p, t in zip(params, twins):
            t.grad = p.grad.clone()
        ref.clip_grad_norm_(1.0)
        if step == 2:
            twins[0].grad = twins[0].grad.t().contiguous()
        ref.step()
        checks = []
        if step == 2:
            real = type(opt._cache).check
            monkeypatch.setattr(type(opt._cache), "check", lambda self, *a: checks.append(1) or real(self, *a))
        opt.clip_grad_norm_(1.0)
        if step == 2:
            params[0].grad = params[0].grad.t()
        opt.step()
    assert len(checks) == 2  # the clip's, then the step's own
    for p, t in zip(params, twins):
        assert torch.equal(p.detach(), t.detach())


def test_grad_pointers_are_uploaded_only_when_grads_move(device, monkeypatch):
    params, opt = _setup(device)
    uploads = []
    real = DeviceTables.set_grad_ptrs
    monkeypatch.setattr(DeviceTables, "set_grad_ptrs", lambda self, ptrs: uploads.append(1) or real(self, ptrs))
    _grads(params, 9)
    opt.step()
    for p in params:  # the same grad tensors, written in place: nothing to upload
        p.grad.mul_(0.5)
    opt.step()
    assert len(uploads) == 1
    _grads(params, 10)  # new grad tensors
    opt.step()
    assert len(uploads) == 2


def test_the_check_sees_changes_in_every_chunk_of_rows(device):
    """The check runs chunk by chunk of rows (``step_cache._Chunk``, at most 256 rows each):
    after cached steps, a param re-viewed under its address, a param or moment given other
    memory, or a grad of another dtype is seen in the first, a middle and the last chunk;
    undone, the tables match again."""
    params = make_params([(2,)] * 600, torch.float32, device, seed=4)
    opt = PAIRS["AdamW"][0](params, **LAUNCH)
    for seed in (5, 6):
        _grads(params, seed)
        opt.step()
    cache = opt._cache
    assert len(cache._chunks) == 3

    def check():
        return cache.check(opt.param_groups, opt.state, opt._options())

    assert check()
    for i in (0, 300, 599):
        p, state = params[i], opt.state[params[i]]
        changes = {
            "param-data": (lambda: p.data, lambda t: setattr(p, "data", t), lambda t: t.clone()),
            "param-view": (lambda: p.data, lambda t: setattr(p, "data", t), lambda t: t.view(1, 2)),
            "moment-data": (lambda: state["exp_avg_sq"].data, lambda t: setattr(state["exp_avg_sq"], "data", t),
                            lambda t: t.clone()),
            "grad-dtype": (lambda: p.grad.data, lambda t: setattr(p.grad, "data", t),
                           lambda t: t.to(torch.float64)),
        }
        for name, (get, put, make) in changes.items():
            kept = get()
            put(make(kept))
            assert not check(), (i, name)
            put(kept)
            assert check(), (i, name)
    _grads(params, 7)
    opt.step()
    assert opt._cache is cache
