"""state_dict / load_state_dict interchangeable with torch.optim in both directions."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import tritonadam

from helpers import LAUNCH, PAIRS, clone_params, make_params, random_grads

SHAPES = [(), (7,), (1025,), (3, 4)]


def _train(opt, params, gen, steps):
    for _ in range(steps):
        for p, g in zip(params, random_grads(params, gen)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_round_trip_with_torch_then_more_steps(name, direction, device):
    """Train 3 steps with one class, move the state to the other, train 3 more: the
    result equals 6 uninterrupted steps of torch.optim."""
    ours_cls, torch_cls = PAIRS[name]
    kw = {"weight_decay": 0.1} | ({"amsgrad": True} if name != "Adamax" else {})
    start = make_params(SHAPES, torch.float32, device, seed=3)
    uninterrupted = clone_params(start)
    baseline = torch_cls(uninterrupted, **kw, foreach=False)
    _train(baseline, uninterrupted, torch.Generator().manual_seed(4), 6)

    first_cls, second_cls = (torch_cls, ours_cls) if direction == "torch->ours" else (ours_cls, torch_cls)
    extra = lambda cls: LAUNCH if cls is ours_cls else {"foreach": False}  # noqa: E731
    params = clone_params(start)
    gen = torch.Generator().manual_seed(4)
    first = first_cls(params, **kw, **extra(first_cls))
    _train(first, params, gen, 3)
    saved = pickle.loads(pickle.dumps(first.state_dict()))
    second = second_cls(params, **kw, **extra(second_cls))
    second.load_state_dict(saved)
    assert second.param_groups[0].keys() == first.param_groups[0].keys()
    _train(second, params, gen, 3)
    for p, q in zip(params, uninterrupted):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_fp32_state_of_bf16_params_survives_load(device):
    """torch's load_state_dict casts state to the param dtype; ours keeps fp32 state."""
    params = make_params(SHAPES, torch.bfloat16, device, seed=5)
    opt = PAIRS["AdamW"][0](params, master_weights=True, **LAUNCH)
    _train(opt, params, torch.Generator().manual_seed(6), 2)
    saved = copy.deepcopy(opt.state_dict())
    restored_params = clone_params(params)
    restored = PAIRS["AdamW"][0](restored_params, master_weights=True, **LAUNCH)
    restored.load_state_dict(saved)
    for p, q in zip(params, restored_params):
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            a, b = opt.state[p][key], restored.state[q][key]
            assert b.dtype == torch.float32
            assert torch.equal(a, b)
        assert restored.state[q]["step"].dtype == torch.float32
        assert restored.state[q]["step"].device == q.device
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    _train(opt, params, g1, 2)
    _train(restored, restored_params, g2, 2)
    for p, q in zip(params, restored_params):
        assert torch.equal(p, q)


def test_bf16_state_from_torch_is_upcast(device):
    """torch.optim keeps bf16 state for bf16 params; loading it gives fp32 state."""
    params = make_params(SHAPES, torch.bfloat16, device, seed=8)
    theirs = torch.optim.Adam(clone_params(params), foreach=False)
    _train(theirs, theirs.param_groups[0]["params"], torch.Generator().manual_seed(9), 2)
    ours = PAIRS["Adam"][0](params, **LAUNCH)
    ours.load_state_dict(theirs.state_dict())
    for p in params:
        assert ours.state[p]["exp_avg"].dtype == torch.float32
    _train(ours, params, torch.Generator().manual_seed(10), 2)
    assert all(ours.state[p]["step"].item() == 4 for p in params)


def test_deepcopy_and_pickle_keep_options_and_do_not_alias(device):
    params = make_params(SHAPES, torch.float32, device, seed=11)
    opt = PAIRS["Adam"][0](params, master_weights=True, bias_correction=False, **LAUNCH)
    _train(opt, params, torch.Generator().manual_seed(12), 1)
    clone = copy.deepcopy(opt)
    assert (clone.master_weights, clone.bias_correction, clone.block_size) == (True, False, LAUNCH["block_size"])
    before = [s["exp_avg"].clone() for s in opt.state.values()]
    # Stepping the copy must not write into the original's state through cached pointers.
    cparams = clone.param_groups[0]["params"]
    _train(clone, cparams, torch.Generator().manual_seed(13), 1)
    for s, b in zip(opt.state.values(), before):
        assert torch.equal(s["exp_avg"], b)
    unpickled = pickle.loads(pickle.dumps(opt))
    assert unpickled.bias_correction is False


def test_state_dict_keys_match_torch(device):
    for name, (ours_cls, torch_cls) in PAIRS.items():
        params = make_params([(5,)], torch.float32, device)
        ref = clone_params(params)
        a, b = ours_cls(params, **LAUNCH), torch_cls(ref, foreach=False)
        _train(a, params, torch.Generator().manual_seed(0), 1)
        _train(b, ref, torch.Generator().manual_seed(0), 1)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["state"][0].keys() == sb["state"][0].keys(), name
        assert sa["param_groups"][0].keys() == sb["param_groups"][0].keys(), name


def test_load_state_dict_pre_hooks_are_honoured(device):
    """A user pre-hook that rewrites the state dict (here: scales exp_avg) is what loads,
    fp32 precision included."""
    params = make_params([(9,)], torch.bfloat16, device, seed=14)
    opt = PAIRS["Adam"][0](params, **LAUNCH)
    _train(opt, params, torch.Generator().manual_seed(15), 1)
    saved = copy.deepcopy(opt.state_dict())
    target = PAIRS["Adam"][0](clone_params(params), **LAUNCH)

    def halve(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["exp_avg"] = state_dict["state"][0]["exp_avg"] / 3
        return state_dict

    target.register_load_state_dict_pre_hook(halve)
    target.load_state_dict(saved)
    (q,) = target.param_groups[0]["params"]
    assert target.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(target.state[q]["exp_avg"], saved["state"][0]["exp_avg"] / 3)


# ---- a moment in two forms: the one from outside wins ----------------------------------


def _moments(opt, p):
    full = opt.torch_state_dict() if hasattr(opt, "torch_state_dict") else opt.state_dict()
    index = next(i for i, q in enumerate(q for g in opt.param_groups for q in g["params"]) if q is p)
    return {k: v for k, v in full["state"][index].items() if k.startswith("exp_avg")}


@pytest.mark.parametrize("source, target", [
    ("torch", {"state_dtype": "8bit"}),
    ({}, {"state_dtype": "4bit", "amsgrad": True}),
    ({"state_dtype": "8bit"}, {"state_dtype": "4bit"}),
    ({"state_dtype": "8bit"}, {}),
    ({"state_dtype": "4bit"}, {"state_dtype": torch.bfloat16}),
], ids=["torch-8bit", "fp32-4bit", "8bit-4bit", "8bit-fp32", "4bit-bf16"])
def test_full_state_dict_loads_across_formats(source, target, device):
    """torch's full-state-dict loader (set_optimizer_state_dict(full_state_dict=True))
    adds the checkpoint's state keys beside the fresh state of the receiving optimizer, so
    a param's moment arrives in two forms. The checkpoint's is the one kept and converted
    (it had arrived as the receiver's fresh zeros: training went on silently from zero
    moments)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict)

    amsgrad = target.get("amsgrad", False)

    def build(options):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(70, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(device)
        if options == "torch":
            return model, torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=amsgrad)
        return model, tritonadam.AdamW(model.parameters(), lr=1e-2, amsgrad=amsgrad, **options)

    def train(model, opt, steps):
        for k in steps:
            x = torch.randn(5, 70, generator=torch.Generator().manual_seed(k)).to(device)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, opt = build(source)
    train(model, opt, range(3))
    saved = get_optimizer_state_dict(model, opt, options=options)
    model2, opt2 = build({k: v for k, v in target.items() if k != "amsgrad"})
    model2.load_state_dict(model.state_dict())
    set_optimizer_state_dict(model2, opt2, saved, options=options)
    bits = {"8bit": 8, "4bit": 4}.get(target.get("state_dtype"), 0) or {"8bit": 8, "4bit": 4}.get(
        source.get("state_dtype") if isinstance(source, dict) else None, 0)
    for p, q in zip(model.parameters(), model2.parameters()):
        want, got = _moments(opt, p), _moments(opt2, q)
        assert set(got) == set(want), (got.keys(), want.keys())
        for key in want:
            tol = {0: 1e-2, 8: 0.02, 4: 0.2}[bits] * want[key].abs().max().item()
            torch.testing.assert_close(got[key].float(), want[key].float(), atol=tol, rtol=0,
                                       msg=lambda m, key=key: f"{key}: {m}")
        assert opt2.state[q]["step"].item() == 3
    train(model2, opt2, range(3, 5))
    assert all(torch.isfinite(p).all() for p in model2.parameters())


def test_a_moment_assigned_by_hand_over_quantized_state_is_taken(device):
    """state["exp_avg"] = zeros (resetting momentum) in an 8-bit optimizer: the next step
    starts from it, and the state keeps one form (the checkpoint says what the step used)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(200).to(device))
    opt = tritonadam.AdamW([p], lr=1e-2, state_dtype="8bit")
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        p.grad = torch.randn(200, generator=gen).to(device)
        opt.step()
    opt.state[p]["exp_avg"] = torch.zeros_like(p)
    g = torch.randn(200, generator=gen).to(device)
    p.grad = g
    opt.step()
    assert "exp_avg" not in opt.state[p] and "exp_avg_8bit" in opt.state[p]
    m = opt.torch_state_dict()["state"][0]["exp_avg"]
    torch.testing.assert_close(m, 0.1 * g, atol=0.02 * (0.1 * g).abs().max().item(), rtol=0)
    assert "exp_avg" not in opt.state_dict()["state"][0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("order", ["model-first", "optimizer-first", "state-existed"])
def test_a_master_follows_params_loaded_after_it(order, dtype, device):
    """A checkpoint without a master (torch.optim's) makes the master from the params as
    they are at the load: with the model loaded after the optimizer, or into an optimizer
    that already had a master (a full state dict merged with it, as DCP's does), the
    step wrote the old params' master back over the loaded params. The first step after a
    load takes, where a param is no longer its master rounded, the param's value; the
    params then step from the loaded ones in every order."""
    base = make_params([(300,), (7, 5)], dtype, device, seed=1)
    loaded = make_params([(300,), (7, 5)], dtype, device, seed=2)  # the checkpoint's params
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in loaded]
    theirs = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        for q, g in zip(ref, random_grads(ref, gen)):
            q.grad = g
        theirs.step()
    with torch.no_grad():
        for p, q in zip(loaded, ref):
            p.copy_(q)  # the checkpoint: torch's fp32 state, the params rounded
    results = []
    for how in ("model-first", order):
        params = [torch.nn.Parameter(p.detach().clone()) for p in base]
        opt = tritonadam.AdamW(params, lr=1e-2, master_weights=True, **LAUNCH)
        if how == "state-existed":  # the optimizer's own state, merged under the checkpoint's
            for p, g in zip(params, random_grads(params, gen)):
                p.grad = g
            opt.step()
            sd = theirs.state_dict()
            for i, p in enumerate(params):
                sd["state"][i]["master_param"] = opt.state[p]["master_param"]
        else:
            sd = theirs.state_dict()

        def load_model():
            with torch.no_grad():
                for p, q in zip(params, loaded):
                    p.copy_(q)

        if how == "model-first":
            load_model()
            opt.load_state_dict(sd)
        else:
            opt.load_state_dict(sd)
            load_model()
        for p, g in zip(params, random_grads(params, torch.Generator().manual_seed(4))):
            p.grad = g
        opt.step()
        results.append(params)
    for a, b, c in zip(*results, loaded):
        assert torch.equal(a, b)
        assert (a.float() - c.float()).abs().max() < 0.05  # one lr-sized step from the loaded values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_master_written_into_the_state_follows_params_set_after_it(dtype, device):
    """ZeroRedundancyOptimizer.load_state_dict assigns each param's state itself, never
    calling the optimizer's load_state_dict, as code that writes ``opt.state`` by hand
    does: a master the optimizer has not seen takes, at the next step, the param's value
    wherever the param is no longer that master rounded (weights pruned after the load),
    bit for bit as through load_state_dict, where the step wrote the old master back over
    them. Where the params are their masters rounded (an ordinary resume), the run goes on
    bit for bit as the uninterrupted one."""
    params = make_params([(300,), (7, 5)], dtype, device, seed=5)
    run = tritonadam.AdamW(params, lr=1e-2, master_weights=True, **LAUNCH)
    gen = torch.Generator().manual_seed(6)
    for _ in range(2):
        for p, g in zip(params, random_grads(params, gen)):
            p.grad = g
        run.step()
    sd = copy.deepcopy(run.state_dict())
    states = {id(p): copy.deepcopy(run.state[p]) for p in params}
    grads = [random_grads(params, gen) for _ in range(2)]
    results = {}
    for how in ("load_state_dict", "by-hand", "by-hand-unchanged"):
        qs = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = tritonadam.AdamW(qs, lr=1e-2, master_weights=True, **LAUNCH)
        if how == "load_state_dict":
            opt.load_state_dict(copy.deepcopy(sd))
        else:
            for p, q in zip(params, qs):
                opt.state[q] = copy.deepcopy(states[id(p)])
        if how != "by-hand-unchanged":
            with torch.no_grad():
                for q in qs:
                    q.view(-1)[:20].zero_()  # the model's weights set after the optimizer's load
        for step_grads in grads:
            for q, g in zip(qs, step_grads):
                q.grad = g.clone()
            opt.step()
        results[how] = qs
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        run.step()
    for a, b, c, d in zip(results["by-hand"], results["load_state_dict"], results["by-hand-unchanged"], params):
        assert torch.equal(a, b)
        assert a.detach().view(-1)[:20].float().abs().max() < 0.05  # two lr-sized steps from 0
        assert torch.equal(c, d)


def test_a_load_frees_the_state_it_replaces(device):
    """After load_state_dict the optimizer holds nothing of the state it replaced (as
    torch.optim: a resume into a trained optimizer must not keep two copies of the state
    until the next step)."""
    import gc
    import weakref

    params = make_params([(300,), (7, 5)], torch.bfloat16, device, seed=8)
    opt = tritonadam.AdamW(params, lr=1e-2, master_weights=True, **LAUNCH)
    for p, g in zip(params, random_grads(params, torch.Generator().manual_seed(9))):
        p.grad = g
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    old = [weakref.ref(t) for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    opt.load_state_dict(sd)
    del sd
    gc.collect()
    assert old and not any(r() is not None for r in old)


@pytest.mark.parametrize("event", ["none", "deepcopy", "pickle", "channels-last", "group-out-and-back",
                                   "state-tensors-replaced"])
def test_a_master_is_written_back_over_edits_where_nothing_was_loaded(event, device):
    """Between steps with no load, the next step writes the master back over a param's
    edits (README), whatever else changed: a deepcopy or pickle of the model and the
    optimizer (the copy steps as the original), a re-view that makes the optimizer convert
    the master, the param's group taken out for a step and put back, state tensors
    replaced in their dict (an offloader). Only a master the optimizer has not seen in
    its state dict (a load) follows the param."""
    import pickle

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(2, 3, 2, 2).to(torch.bfloat16).to(device))
    opt = tritonadam.AdamW([w], lr=1e-2, master_weights=True, **LAUNCH)
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        w.grad = torch.randn(w.shape, generator=gen).to(w.dtype).to(device)
        opt.step()
    master = opt.state[w]["master_param"].clone()
    if event == "group-out-and-back":
        other = torch.nn.Parameter(torch.randn(3, device=device))
        opt.add_param_group({"params": [other]})
        group = opt.param_groups.pop(0)
        other.grad = torch.randn(3, generator=gen).to(device)
        opt.step()
    with torch.no_grad():
        w.zero_()  # the user's edit
    if event == "deepcopy":
        w, opt = copy.deepcopy((w, opt))
    elif event == "pickle":
        w, opt = pickle.loads(pickle.dumps((w, opt)))
    elif event == "channels-last":
        w.data = w.data.to(memory_format=torch.channels_last)
    elif event == "group-out-and-back":
        opt.add_param_group(group)
    elif event == "state-tensors-replaced":
        st = opt.state[w]
        for k in list(st):
            st[k] = st[k].clone()
    w.grad = torch.zeros_like(w)
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    assert torch.equal(w, master.to(torch.bfloat16).to(memory_format=torch.channels_last if event == "channels-last"
                                                      else torch.contiguous_format))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float64, torch.complex128])
def test_torch_state_dict_keeps_the_moments_dtype_torch_keeps(dtype, device):
    """torch_state_dict() of complex and fp64 params: complex / fp64 moments, as torch.optim
    keeps them (casting to fp32 dropped the imaginary part, and fp64's low bits); torch.optim
    resumes from it as from its own state."""
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(6, 3, generator=gen, dtype=torch.float64).to(dtype).to(device) for _ in range(2)]
    params = [torch.nn.Parameter(b.clone()) for b in base]
    ref = [torch.nn.Parameter(b.clone()) for b in base]
    ours = tritonadam.Adam(params, lr=1e-2, amsgrad=True, **LAUNCH)
    theirs = torch.optim.Adam(ref, lr=1e-2, amsgrad=True, foreach=False)
    grads = [[torch.randn(6, 3, generator=gen, dtype=torch.float64).to(dtype).to(device) for _ in base]
             for _ in range(4)]
    for gs in grads[:2]:
        for o, ps in ((ours, params), (theirs, ref)):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            o.step()
    exported = ours.torch_state_dict()["state"]
    for i, q in enumerate(ref):
        for key, value in theirs.state[q].items():
            assert exported[i][key].dtype == value.dtype, key
            # torch keeps a non-capturable step count on the CPU, ours on the param's device
            assert exported[i][key].device == (q.device if key == "step" else value.device), key
            torch.testing.assert_close(exported[i][key].cpu(), value.cpu())
    resumed = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2,
                               amsgrad=True, foreach=False)
    resumed.load_state_dict(ours.torch_state_dict())
    rparams = [p for g in resumed.param_groups for p in g["params"]]
    for gs in grads[2:]:
        for o, ps in ((resumed, rparams), (theirs, ref)):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            o.step()
    for a, b in zip(rparams, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_amsgrad_switched_on_after_steps_round_trips_its_own_state_dict(state_dtype, device):
    """``group["amsgrad"] = True`` after steps: the live optimizer makes each param's
    max_exp_avg_sq (zeros) at its next step, so a state dict taken before that step has
    none; a fresh optimizer loads it (it refused: "lacks ['max_exp_avg_sq']"), making it
    as the live one does, and steps as the live one does, bit for bit."""
    params = make_params([(37,), (5, 7)], torch.float32, device, seed=8)
    opt = tritonadam.Adam(params, state_dtype=state_dtype, **LAUNCH)
    gen = torch.Generator().manual_seed(9)
    _train(opt, params, gen, 2)
    opt.param_groups[0]["amsgrad"] = True
    sd = copy.deepcopy(opt.state_dict())
    copies = clone_params(params)
    loaded = tritonadam.Adam(copies, state_dtype=state_dtype, **LAUNCH)
    loaded.load_state_dict(sd)
    assert loaded.param_groups[0]["amsgrad"]
    _train(opt, params, torch.Generator().manual_seed(10), 3)
    _train(loaded, copies, torch.Generator().manual_seed(10), 3)
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == loaded.state[q].keys()
        assert any(k.startswith("max_exp_avg_sq") for k in loaded.state[q])
        for key, value in opt.state[p].items():
            assert torch.equal(value, loaded.state[q][key]), key


def test_a_quantized_max_without_its_codes_is_refused(device):
    """The missing max_exp_avg_sq of an optimizer switched to AMSGrad loads (above); a
    quantized one cut in half (its scales without its codes) is a broken state: refused,
    as before, not reset to zeros."""
    params = make_params([(37,)], torch.float32, device, seed=8)
    opt = tritonadam.Adam(params, amsgrad=True, state_dtype="8bit", **LAUNCH)
    _train(opt, params, torch.Generator().manual_seed(9), 2)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["max_exp_avg_sq_8bit"]
    fresh = tritonadam.Adam(clone_params(params), amsgrad=True, state_dtype="8bit", **LAUNCH)
    with pytest.raises(ValueError, match=r"lacks \['max_exp_avg_sq'\]"):
        fresh.load_state_dict(sd)


@pytest.mark.parametrize("cast", [torch.float16, torch.float32])
@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_a_remainder_exports_its_master_after_the_model_is_cast(cast, state_dtype, device):
    """master_weights="remainder", then the model cast (model.half(), model.float()) before
    the next step: state_dict() and torch_state_dict() export the fp32 master the pair
    stands for, exactly (the cast param's bits were joined as a bf16 high half: a master
    off by up to the weights' size after half(); after float(), torch_state_dict() had no
    master at all)."""
    params = make_params([(8, 8), (65,)], torch.bfloat16, device, seed=81)
    opt = tritonadam.AdamW(params, lr=1e-2, master_weights="remainder", state_dtype=state_dtype, **LAUNCH)
    _train(opt, params, torch.Generator().manual_seed(82), 2)
    masters = [opt.state_dict()["state"][i]["master_param"].clone() for i in range(len(params))]
    for p in params:
        p.data = p.data.to(cast)
    for export in (opt.state_dict, opt.torch_state_dict):
        for i, master in enumerate(masters):
            assert torch.equal(export()["state"][i]["master_param"], master), (export.__name__, i)


@pytest.mark.parametrize("options", [{"master_weights": "remainder"}, {"state_dtype": "8bit"},
                                     {"state_dtype": torch.bfloat16}, {}])
def test_exports_of_state_its_param_no_longer_fits(options, device):
    """A param resized or reshaped under its state (p.data = ...; its next step refuses it):
    state_dict() exports the state as it is, as torch.optim does, and torch_state_dict()
    refuses what it would have to convert with what to do (both raised broadcasting errors);
    fp32 state, nothing to convert, exports as torch's."""
    dtype = torch.bfloat16 if "master_weights" in options else torch.float32
    for shape in ((10, 8), (4, 16)):
        (p,) = make_params([(8, 8)], dtype, device, seed=83)
        opt = tritonadam.AdamW([p], lr=1e-2, **options, **LAUNCH)
        _train(opt, [p], torch.Generator().manual_seed(84), 1)
        held = {k: v.clone() for k, v in opt.state[p].items()}
        p.data = torch.randn(shape, device=device).to(dtype)
        saved = opt.state_dict()["state"][0]
        for k, v in held.items():
            assert torch.equal(saved[k], v), k
        if options:
            with pytest.raises(RuntimeError, match=r"the param was resized or reshaped under it"):
                opt.torch_state_dict()
        else:
            assert torch.equal(opt.torch_state_dict()["state"][0]["exp_avg"], held["exp_avg"])


@pytest.mark.parametrize("master", [True, "remainder"])
def test_a_master_following_its_param_after_a_load_records_nothing(master, device):
    """The first step after a load brings a master to its param's value under no_grad: it
    ran under ``inference_mode(False)`` entered after ``no_grad()``, which turns grad mode
    back on, so the fp32 master recorded the copy from the param (requires_grad, a graph
    back to the Parameter) and ``copy.deepcopy`` of the optimizer or its state dict raised
    "Only Tensors created explicitly by the user"."""
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(64, generator=gen).to(torch.bfloat16).to(device))
    ref = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.randn(64, generator=gen).to(torch.bfloat16).to(device)
    ref.step()
    opt = tritonadam.Adam([w], lr=0.1, master_weights=master, **LAUNCH)
    for source in (ref, opt):  # torch.optim's checkpoint, then its own
        opt.load_state_dict(source.state_dict())
        w.grad = torch.randn(64, generator=gen).to(torch.bfloat16).to(device)
        opt.step()
        assert not any(t.requires_grad for t in opt.state[w].values() if torch.is_tensor(t))
        copy.deepcopy(opt)
        copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("state_dtype", ["8bit", "4bit"])
def test_per_element_codes_of_another_shape_are_refused(state_dtype):
    """A (5, 7) param's moments, exported a code per element (rows not a multiple of 64),
    loaded into a (7, 5) param: the same size, but the codes are laid out like the param
    and were read reshaped, each element stepping another's moments. Refused, nothing
    changed; the same checkpoint loads into a (5, 7) param."""
    torch.manual_seed(0)
    src = torch.nn.Parameter(torch.randn(5, 7))
    opt = tritonadam.AdamW([src], state_dtype=state_dtype)
    src.grad = torch.randn(5, 7)
    opt.step()
    sd = opt.state_dict()
    assert sd["state"][0][f"exp_avg_{state_dtype}"].shape == (5, 7)
    other = torch.nn.Parameter(torch.randn(7, 5))
    receiver = tritonadam.AdamW([other], state_dtype=state_dtype)
    with pytest.raises(ValueError, match=r"a code per element in shape \(5, 7\) for a param of shape \(7, 5\)"):
        receiver.load_state_dict(copy.deepcopy(sd))
    assert not receiver.state
    same = torch.nn.Parameter(src.detach().clone())
    tritonadam.AdamW([same], state_dtype=state_dtype).load_state_dict(sd)


@pytest.mark.parametrize("options", [{}, {"state_dtype": "8bit"}, {"master_weights": True, "dtype": torch.bfloat16},
                                     {"master_weights": "remainder", "state_dtype": "4bit", "dtype": torch.bfloat16}],
                         ids=["fp32", "8bit", "bf16-master", "bf16-remainder-4bit"])
def test_a_load_keeps_its_own_state_and_copies_the_rest(options, device):
    """Its own state given back (DCP loads into the tensors ``state_dict()`` gave, views
    of the codes included; ``opt.load_state_dict(opt.state_dict())``) is kept: a resume
    holds no second copy of the state (it had copied every tensor: 8 extra bytes per
    param for fp32 moments until the step). Anything else is copied, so the caller's state
    dict stays as it was (a snapshot, a dict loaded into two optimizers) and the step is
    that from a copy."""
    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    source = make_params([(4, 64), (9,)], dtype, device, seed=21)
    opt = PAIRS["AdamW"][0](source, lr=1e-2, **options, **LAUNCH)
    _train(opt, source, torch.Generator().manual_seed(22), 2)
    # The (4, 64) param's codes are exported as views of its own (rows of whole blocks);
    # a remainder is exported joined to its fp32 master, and split from it anew.
    held = {k: v.data_ptr() for k, v in opt.state[source[0]].items() if k != "master_param_remainder"}
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert {k: v.data_ptr() for k, v in opt.state[source[0]].items() if k in held} == held

    snapshot = copy.deepcopy(sd)
    pairs = [(clone_params(source), PAIRS["AdamW"][0]) for _ in range(2)]
    runs = []
    for params, cls in pairs:
        run = cls(params, lr=1e-2, **options, **LAUNCH)
        run.load_state_dict(sd)
        for p, i in zip(params, range(2)):
            assert all(v.data_ptr() != getattr(sd["state"][i].get(k), "data_ptr", lambda: -1)()
                       for k, v in run.state[p].items() if isinstance(v, torch.Tensor) and v.numel())
        runs.append(run)
    grads = random_grads(source, torch.Generator().manual_seed(23))
    for (params, _), run in zip(pairs, runs):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        run.step()
    assert all(torch.equal(a, b) for a, b in zip(*(params for params, _ in pairs)))
    for i, entry in sd["state"].items():
        for k, v in entry.items():
            assert torch.equal(v, snapshot["state"][i][k]) if isinstance(v, torch.Tensor) else v == snapshot["state"][i][k]


def test_loaded_tensors_that_share_memory_are_copied(device):
    """A hand-built state dict whose moments are one tensor (``z = torch.zeros_like(p)``
    under both keys), or a param's own tensor: kept as given, the kernels would write the
    same memory twice. Copied, the step is that of separate tensors."""
    params = make_params([(5, 7)], torch.float32, device, seed=24)
    grads = random_grads(params, torch.Generator().manual_seed(25))
    runs = []
    for shared in (True, False):
        ps = clone_params(params)
        opt = PAIRS["AdamW"][0](ps, lr=1e-2, **LAUNCH)
        z = torch.full_like(ps[0], 0.5).detach()
        sd = opt.state_dict()
        sd["state"] = {0: {"step": torch.tensor(3.0), "exp_avg": z if shared else z.clone(),
                           "exp_avg_sq": z if shared else z.clone()}}
        opt.load_state_dict(sd)
        st = opt.state[ps[0]]
        assert st["exp_avg"].data_ptr() != st["exp_avg_sq"].data_ptr()
        ps[0].grad = grads[0].clone()
        opt.step()
        runs.append((ps[0].detach().clone(), {k: st[k].clone() for k in ("exp_avg", "exp_avg_sq")}))
    (a, sa), (b, sb) = runs
    assert torch.equal(a, b) and all(torch.equal(sa[k], sb[k]) for k in sa)
    # a param's own memory under a state key: copied too
    ps = clone_params(params)
    opt = PAIRS["AdamW"][0](ps, lr=1e-2, **LAUNCH)
    sd = opt.state_dict()
    sd["state"] = {0: {"step": torch.tensor(1.0), "exp_avg": ps[0].detach(), "exp_avg_sq": ps[0].detach().abs()}}
    opt.load_state_dict(sd)
    assert opt.state[ps[0]]["exp_avg"].data_ptr() != ps[0].data_ptr()


def test_a_load_beside_state_without_ordinary_storage():
    """The load reads where the state it replaces and the given step count live: entries
    of the user's without ordinary storage (a sparse mask, a wrapper subclass) beside the
    moments, and a given count that is a wrapper subclass, load as with torch.optim."""
    from torch.testing._internal.two_tensor import TwoTensor

    for extra in (torch.eye(3).to_sparse(), TwoTensor(torch.ones(3), torch.ones(3))):
        p = torch.nn.Parameter(torch.randn(8))
        opt = tritonadam.AdamW([p], lr=1e-2, **LAUNCH)
        p.grad = torch.randn(8)
        opt.step()
        sd = copy.deepcopy(opt.state_dict())
        opt.state[p]["mask"] = extra
        opt.load_state_dict(sd)
        assert torch.equal(opt.state[p]["exp_avg"], sd["state"][0]["exp_avg"])
        sd["state"][0]["step"] = TwoTensor(torch.tensor(3.0), torch.tensor(3.0))
        opt.load_state_dict(sd)
        opt.step()
        assert float(opt.state[p]["step"]) == 4.0
