"""torch.optim's contract, checked with torch's own optimizer configurations.

PyTorch's ``TestOptimRenewed`` (test/test_optim.py) drives every optimizer through the
``OptimizerInfo`` entries in ``torch.testing._internal.common_optimizers.optim_db``: the
hyper-parameter configs of each optimizer (``optim_inputs_func``), the same configs with
the global flags (``foreach``/``fused``/``differentiable``) switched on, its LR scheduler
combinations, and the flags old state dicts lack. This module takes those inputs for
Adam, AdamW and Adamax from torch and checks the properties of that suite that a drop-in
replacement must keep, on tritonadam's classes. The checks are written here (none of
test_optim.py is copied).
"""
from __future__ import annotations

import copy
import os
import io

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

# torch's test helpers import expecttest, which GPU images often lack (CI installs it: the
# [test] extra): skip the module there, with the reason, rather than fail to collect it.
pytest.importorskip("expecttest", reason="torch's internal test helpers need expecttest")
from torch.testing._internal import common_optimizers as co  # noqa: E402

import tritonadam  # noqa: E402

NAMES = ["Adam", "AdamW", "Adamax"]
OURS = {name: getattr(tritonadam, name) for name in NAMES}
INFOS = {info.optim_cls.__name__: info for info in co.optim_db if info.optim_cls.__name__ in NAMES}


def configs(name, device, skip=("differentiable",)):
    """torch's configs for ``name``: each base config, then with each supported global flag
    on (what ``_get_optim_inputs_including_global_cliquey_kwargs`` gives torch's tests)."""
    return [
        inp.kwargs
        for inp in co._get_optim_inputs_including_global_cliquey_kwargs(
            str(device), torch.float32, INFOS[name], skip=skip
        )
    ]


def base_configs(name, device):
    return [inp.kwargs for inp in INFOS[name].optim_inputs_func(device=str(device))]


def linear_problem(device, contiguous=True, seed=0):
    """torch's test problem: loss = |weight @ inpt + bias|^2; strided views if not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = torch.randn(10, 5, generator=gen).to(device)
        bias = torch.randn(10, generator=gen).to(device)
    else:  # slice after the move: .to() would make a copy contiguous
        weight = torch.randn(10, 5, 2, generator=gen).to(device)[..., 0]
        bias = torch.randn(10, 2, generator=gen).to(device)[..., 0]
    inpt = torch.randn(5, generator=gen).to(device)
    return Parameter(weight), Parameter(bias), inpt


def loss_of(weight, bias, inpt):
    return (weight.mv(inpt) + bias).pow(2).sum()


def run_steps(opt, weight, bias, inpt, n, schedulers=()):
    for _ in range(n):
        opt.zero_grad()
        loss = loss_of(weight, bias, inpt)
        loss.backward()
        opt.step()
        for sched in schedulers:
            sched.step(loss.detach()) if isinstance(sched, ReduceLROnPlateau) else sched.step()


def assert_same(a, b, path="state_dict"):
    """Exact equality of nested state dicts (tensors bit for bit, with dtype and device)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.device == b.device, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def fresh(kwargs):
    """Deep copy of a config: tensor lr/betas must not carry mutations between runs."""
    return copy.deepcopy(kwargs)


def reloaded(obj, **load_kwargs):
    """``obj`` through ``torch.save`` and ``torch.load(**load_kwargs)``, in memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, **load_kwargs)


# ---- the update goes the right way ----------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "contiguous", [True, False]
)
def test_configs_go_right_direction(name, contiguous, device):
    for kwargs in base_configs(name, device):
        weight, bias, inpt = linear_problem(device, contiguous)
        before = loss_of(weight, bias, inpt).item()
        opt = OURS[name]([weight, bias], **fresh(kwargs), foreach=False)
        run_steps(opt, weight, bias, inpt, 10)
        after = loss_of(weight, bias, inpt).item()
        if kwargs.get("maximize", False):
            assert after > before, kwargs
        else:
            assert after < before, kwargs


@pytest.mark.parametrize("name", NAMES)
def test_lr_schedulers_go_right_direction(name, device):
    """Each of torch's scheduler combinations for this optimizer, on two param groups."""
    for make_schedulers in INFOS[name].scheduler_inputs:
        weight, bias, inpt = linear_problem(device)
        opt = OURS[name]([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        schedulers = [make(opt) for make in make_schedulers]
        before = loss_of(weight, bias, inpt).item()
        run_steps(opt, weight, bias, inpt, 10, schedulers)
        assert loss_of(weight, bias, inpt).item() < before


@pytest.mark.parametrize("name", NAMES)
def test_param_group_lr_and_weight_decay(name, device):
    """Per-group options: a group with lr=1e-28 stays put, a group without decay is not
    decayed (torch's test_param_groups_lr / _weight_decay)."""
    for kwargs in base_configs(name, device):
        weight, bias, inpt = linear_problem(device)
        still = Parameter(torch.randn(2, device=device))
        still_before = still.detach().clone()
        group = fresh(kwargs)
        group.setdefault("lr", 1e-3)
        no_decay = {**fresh(kwargs), "weight_decay": 0.0}
        opt = OURS[name](
            [dict(params=[weight], **group), dict(params=[bias], **no_decay), dict(params=[still])],
            lr=1e-28,
        )
        before = loss_of(weight, bias, inpt).item()
        for _ in range(10):
            opt.zero_grad()
            loss_of(weight, bias, inpt).backward()
            still.grad = torch.rand_like(still)
            opt.step()
        after = loss_of(weight, bias, inpt).item()
        assert (after > before) if kwargs.get("maximize", False) else (after < before), kwargs
        torch.testing.assert_close(still, still_before, rtol=0, atol=0)


# ---- flags and tensor hyper-parameters ------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("flag", ["foreach", "fused"])
def test_global_flags_do_not_change_the_step(name, flag, device):
    """foreach/fused select torch's implementations; here every step is the same kernel,
    so flag on and off must agree bit for bit (torch's *_matches_forloop tests)."""
    if flag not in INFOS[name].supported_impls:
        pytest.skip(f"torch.optim.{name} has no {flag} implementation")
    for kwargs in base_configs(name, device):
        results = []
        for value in (False, True):
            weight, bias, inpt = linear_problem(device)
            opt = OURS[name]([weight, bias], **fresh(kwargs), **{flag: value})
            run_steps(opt, weight, bias, inpt, 3)
            results.append((weight.detach(), bias.detach(), opt.state_dict()["state"]))
        assert_same(results[0], results[1])


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_matches_float_lr(name, device):
    for kwargs in configs(name, device):
        kwargs = fresh(kwargs)
        kwargs.pop("lr", None)
        weight, bias, inpt = linear_problem(device)
        weight_c = Parameter(weight.detach().clone())
        bias_c = Parameter(bias.detach().clone())
        opt = OURS[name]([weight, bias], lr=1e-3, **kwargs)
        try:
            opt_c = OURS[name]([weight_c, bias_c], lr=torch.tensor(1e-3), **kwargs)
        except ValueError as e:  # torch's rule for foreach without capturable
            assert "lr as a Tensor is not supported" in str(e)
            continue
        run_steps(opt, weight, bias, inpt, 3)
        run_steps(opt_c, weight_c, bias_c, inpt, 3)
        torch.testing.assert_close(weight, weight_c)
        torch.testing.assert_close(bias, bias_c)


# ---- no-op steps ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_without_grads_is_a_noop(name, device):
    params = [torch.randn(2, 3, device=device) for _ in range(2)]
    before = [p.clone() for p in params]
    for kwargs in configs(name, device):
        opt = OURS[name](params, **fresh(kwargs))
        assert opt.step(lambda: torch.tensor([1.0])).item() == 1.0
        assert len(opt.state) == 0
    for p, b in zip(params, before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("name", NAMES)
def test_zero_grads_leave_params_unchanged(name, device):
    param = Parameter(torch.randn(5, 1, device=device))
    before = param.detach().clone()
    for kwargs in configs(name, device):
        kwargs = fresh(kwargs)
        if kwargs.get("weight_decay", 0) != 0:
            continue
        if name == "AdamW":  # AdamW's default decay moves params by lr * 1e-2
            kwargs["lr"] = torch.tensor(1e-5) if torch.is_tensor(kwargs.get("lr")) else 1e-5
        opt = OURS[name]([param], **kwargs)
        param.grad = torch.zeros_like(param)
        opt.step()
        torch.testing.assert_close(param, before)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_filled_after_a_step(name, device):
    model = torch.nn.Linear(5, 5).to(device)
    for kwargs in base_configs(name, device):
        opt = OURS[name](model.parameters(), **fresh(kwargs))
        opt.zero_grad()
        model(torch.rand(2, 5, device=device)).sum().backward()
        opt.step()
        assert all(len(s) > 0 for s in opt.state.values())


# ---- state dicts ----------------------------------------------------------------------


def _conv_model(device):
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1)
    ).to(device)


def _conv_step(opt, model, inpt):
    opt.zero_grad()
    model(inpt).sum().backward()
    opt.step()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("named", [False, True], ids=["params", "named_params"])
def test_state_dict_deterministic(name, named, device):
    """A copy loaded from the state dict steps identically and saves an equal state dict;
    repeated groups serialise identically (torch's test_state_dict_deterministic)."""

    def maybe_named(params):
        return [(f"name{i}", p) for i, p in enumerate(params)] if named else params

    def strip(sd):
        sd = copy.deepcopy(sd)
        for group in sd["param_groups"]:
            group.pop("param_names", None)
        return sd

    for kwargs in configs(name, device):
        weight, bias, inpt = linear_problem(device)
        opt = OURS[name](maybe_named([weight, bias]), **fresh(kwargs))
        run_steps(opt, weight, bias, inpt, 3)
        weight_c, bias_c = Parameter(weight.detach().clone()), Parameter(bias.detach().clone())
        opt_c = OURS[name]([weight_c, bias_c], **fresh(kwargs))
        opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
        for _ in range(3):
            run_steps(opt, weight, bias, inpt, 1)
            run_steps(opt_c, weight_c, bias_c, inpt, 1)
            torch.testing.assert_close(weight, weight_c)
            torch.testing.assert_close(bias, bias_c)
        assert_same(strip(opt.state_dict()), strip(opt_c.state_dict()))
        opt_c.param_groups.extend(opt_c.param_groups)
        assert_same(
            strip(opt.state_dict())["param_groups"][-1],
            strip(opt_c.state_dict())["param_groups"][-1],
        )


@pytest.mark.parametrize("name", NAMES)
def test_load_older_and_nontensor_step_state_dicts(name, device):
    """State dicts without the flags torch added later (not_og_supported_flags), and with
    python-number steps, load and step."""
    inpt = torch.rand(1, 4, 16, 16, device=device)
    for kwargs in configs(name, device):
        model = _conv_model(device)
        opt = OURS[name](model.parameters(), **fresh(kwargs))
        for _ in range(2):
            _conv_step(opt, model, inpt)
        old = copy.deepcopy(opt.state_dict())
        for group in old["param_groups"]:
            for flag in INFOS[name].not_og_supported_flags:
                group.pop(flag, None)
        for p_state in old["state"].values():
            p_state["step"] = p_state["step"].item()
        opt.load_state_dict(old)
        _conv_step(opt, model, inpt)
        assert all(torch.is_tensor(s["step"]) and s["step"].item() == 3 for s in opt.state.values())


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("name", NAMES)
def test_step_counts_take_torchs_dtype(name, device, float64_default):
    """torch.optim makes step counts float64 under a float64 default dtype (float32 with
    fused=True), keeps a loaded float64 count unless capturable or fused, and turns a
    number into a new count (torch's test_set_default_dtype_works_with_foreach and
    test_state_dict_with_cuda_params). The counts keep counting in their dtype."""
    checked = set()
    for kwargs in configs(name, device):
        weight, bias, inpt = linear_problem(device)
        tweight, tbias = (Parameter(t.detach().clone()) for t in (weight, bias))
        ours, theirs = OURS[name]([weight, bias], **fresh(kwargs)), INFOS[name].optim_cls([tweight, tbias], **fresh(kwargs))
        run_steps(ours, weight, bias, inpt, 2)
        run_steps(theirs, tweight, tbias, inpt, 2)
        assert [s["step"].dtype for s in ours.state.values()] == [s["step"].dtype for s in theirs.state.values()], kwargs
        checked.add(ours.state[weight]["step"].dtype)
        torch.testing.assert_close(weight, tweight)
        for source in (theirs.state_dict(), ours.state_dict()):
            for as_number in (False, True):
                saved = copy.deepcopy(source)
                if as_number:
                    for s in saved["state"].values():
                        s["step"] = s["step"].item()
                loaded_ours = OURS[name]([weight, bias], **fresh(kwargs))
                loaded_theirs = INFOS[name].optim_cls([tweight, tbias], **fresh(kwargs))
                loaded_ours.load_state_dict(copy.deepcopy(saved))
                loaded_theirs.load_state_dict(copy.deepcopy(saved))
                want = [s["step"].dtype for s in loaded_theirs.state.values()]
                assert [s["step"].dtype for s in loaded_ours.state.values()] == want, (kwargs, as_number)
                run_steps(loaded_ours, weight, bias, inpt, 1)
                assert [(s["step"].dtype, s["step"].item()) for s in loaded_ours.state.values()] == [
                    (dtype, 3.0) for dtype in want]
    assert checked == {torch.float32, torch.float64} if name != "Adamax" else checked == {torch.float64}
    # Capturable groups (torch steps them on GPUs only; loading is the same anywhere): a
    # loaded tensor count becomes float32, a number a new (float64) count.
    for as_number in (False, True):
        weight, bias, inpt = linear_problem(device)
        source = OURS[name]([weight, bias])
        run_steps(source, weight, bias, inpt, 1)
        saved = copy.deepcopy(source.state_dict())
        saved["param_groups"][0]["capturable"] = True
        for s in saved["state"].values():
            s["step"] = 3.0 if as_number else torch.tensor(3.0, dtype=torch.float64)
        loaded_ours = OURS[name]([weight, bias], capturable=True)
        loaded_theirs = INFOS[name].optim_cls([Parameter(t.detach().clone()) for t in (weight, bias)],
                                              capturable=True)
        for opt in (loaded_ours, loaded_theirs):
            opt.load_state_dict(copy.deepcopy(saved))
        want = torch.float64 if as_number else torch.float32
        for opt in (loaded_ours, loaded_theirs):
            assert [s["step"].dtype for s in opt.state.values()] == [want, want], (type(opt), as_number)


def _on_cpu(saved):
    """A state dict as ``torch.load(..., map_location="cpu")`` gives it back."""
    return reloaded(saved, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
@pytest.mark.parametrize("name", NAMES)
def test_loaded_step_counts_keep_their_shape(name, shape, device):
    """A one-element step count of another shape (an older checkpoint's ``torch.zeros(1)``):
    torch.optim keeps the loaded tensor's shape, counts in it and saves it so. Ours keeps
    it too, through the load, the steps that move it beside the param and the state dict."""
    for kwargs in configs(name, device):
        weight, bias, inpt = linear_problem(device)
        source = OURS[name]([weight, bias], **fresh(kwargs))
        run_steps(source, weight, bias, inpt, 3)
        saved = _on_cpu(source.state_dict())
        for s in saved["state"].values():
            s["step"] = s["step"].reshape(shape)
        params = [Parameter(t.detach().clone()) for t in (weight, bias)]
        tparams = [Parameter(t.detach().clone()) for t in (weight, bias)]
        ours, theirs = OURS[name](params, **fresh(kwargs)), INFOS[name].optim_cls(tparams, **fresh(kwargs))
        ours.load_state_dict(copy.deepcopy(saved))
        theirs.load_state_dict(copy.deepcopy(saved))

        def steps(opt):
            return [(s["step"].shape, s["step"].dtype, s["step"].tolist()) for s in opt.state_dict()["state"].values()]

        assert steps(ours) == steps(theirs), kwargs
        run_steps(ours, *params, inpt, 2)
        run_steps(theirs, *tparams, inpt, 2)
        assert steps(ours) == steps(theirs) == [(torch.Size(shape), steps(theirs)[0][1], torch.full(shape, 5.0).tolist())] * 2, kwargs
        torch.testing.assert_close(params, tparams)


@pytest.mark.parametrize("name", NAMES)
def test_loaded_step_counts_stay_where_torch_leaves_them(name, device):
    """A checkpoint mapped to the CPU and loaded into an optimizer of (GPU) params: torch
    keeps each tensor step count where the state dict had it, and a number's new count on
    the CPU, unless the group is capturable or fused (torch's
    test_state_dict_with_cuda_params). Ours leaves them there too until the next step,
    which moves them to the params' device and steps like torch."""
    for kwargs in configs(name, device):
        weight, bias, inpt = linear_problem(device)
        source = OURS[name]([weight, bias], **fresh(kwargs))
        run_steps(source, weight, bias, inpt, 3)
        for as_number in (False, True):
            saved = _on_cpu(source.state_dict())
            if as_number:
                for s in saved["state"].values():
                    s["step"] = s["step"].item()
            before = copy.deepcopy(saved)
            params = [Parameter(t.detach().clone()) for t in (weight, bias)]
            tparams = [Parameter(t.detach().clone()) for t in (weight, bias)]
            ours, theirs = OURS[name](params, **fresh(kwargs)), INFOS[name].optim_cls(tparams, **fresh(kwargs))
            ours.load_state_dict(saved)
            theirs.load_state_dict(copy.deepcopy(saved))
            assert_same(saved, before)  # loading leaves the caller's dict as it was
            devices = [s["step"].device for s in theirs.state.values()]
            assert [s["step"].device for s in ours.state.values()] == devices, (kwargs, as_number)
            assert [s["step"].device for s in ours.state_dict()["state"].values()] == devices
            run_steps(ours, *params, inpt, 2)
            run_steps(theirs, *tparams, inpt, 2)
            assert [(s["step"].device, s["step"].item()) for s in ours.state.values()] == [
                (p.device, 5.0) for p in params], (kwargs, as_number)
            torch.testing.assert_close(params, tparams)


def test_loaded_step_count_device_follows_torchs_rule():
    """Where a loaded count goes (the device half of the test above, which a CPU-only run
    cannot tell apart): the param's device in capturable or fused groups, else the state
    dict's device, else (a number) the CPU."""
    from tritonadam.state import loaded_step_device

    gpu, cpu = torch.device("cuda", 1), torch.device("cpu")
    count = torch.tensor(3.0)
    assert loaded_step_device(count, {"capturable": False, "fused": None}, gpu) == cpu
    assert loaded_step_device(3.0, {}, gpu) == cpu
    assert loaded_step_device(count.to("meta"), {}, gpu) == torch.device("meta")
    for group in ({"capturable": True}, {"fused": True}):
        assert loaded_step_device(count, group, gpu) == gpu
        assert loaded_step_device(3.0, group, gpu) == gpu


@pytest.mark.parametrize("name", NAMES)
def test_named_state_dict_loads_into_either_kind(name, device):
    inpt = torch.rand(1, 4, 16, 16, device=device)
    for named0, named1 in [(True, False), (False, True)]:
        model = _conv_model(device)
        opt = OURS[name](model.named_parameters() if named0 else model.parameters())
        _conv_step(opt, model, inpt)
        opt2 = OURS[name](model.named_parameters() if named1 else model.parameters())
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        _conv_step(opt2, model, inpt)
        assert opt2.state_dict()["param_groups"][0]["param_names"] == [
            "0.weight", "0.bias", "1.weight", "1.bias"
        ]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_saves_and_loads_weights_only(name, device):
    for kwargs in configs(name, device):
        weight, bias, inpt = linear_problem(device)
        opt = OURS[name]([weight, bias], **fresh(kwargs))
        run_steps(opt, weight, bias, inpt, 2)
        sd = opt.state_dict()
        assert_same(reloaded(sd, weights_only=True), sd)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_keeps_public_attrs(name, device):
    params = [Parameter(torch.randn(2, 3, device=device)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for kwargs in configs(name, device):
        opt = OURS[name](params, **fresh(kwargs))
        opt.step()

        def public(obj):
            return {k for k in obj.__dict__ if not k.startswith("_")}

        assert public(opt) == public(copy.deepcopy(opt))


# ---- hooks ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_fire_in_order(name, device):
    data = []
    params = [torch.tensor([1.0, 1.0], device=device)]
    opt = OURS[name](params)
    other = torch.optim.SGD(params)
    handles = [
        register_optimizer_step_pre_hook(lambda *a: data.append(0)),
        register_optimizer_step_post_hook(lambda *a: data.append(5)),
        opt.register_step_pre_hook(lambda *a: data.append(1)),
        opt.register_step_post_hook(lambda *a: data.append(2)),
        other.register_step_pre_hook(lambda *a: data.append(1)),
        other.register_step_post_hook(lambda *a: data.append(2)),
    ]
    try:
        opt.step()
        other.step()
        opt.step()
    finally:
        for h in handles:
            h.remove()
    opt.step()
    assert data == [0, 1, 2, 5] * 3


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks(name, device):
    param = torch.rand(2, 3, device=device, requires_grad=True)
    opt = OURS[name]([param])

    def pre(optimizer):
        optimizer.state["test"] = 1

    def post(optimizer, state_dict):
        state_dict["ran_pre"] = state_dict["state"].pop("test", None) == 1
        return state_dict

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["ran_pre"] and "test" not in sd["state"]

    opt = OURS[name]([param])
    sd = opt.state_dict()

    def set_lr(value):
        def hook(optimizer, state_dict):
            state_dict = copy.deepcopy(state_dict)
            state_dict["param_groups"][0]["lr"] = value
            return state_dict
        return hook

    ran = []
    opt.register_load_state_dict_pre_hook(set_lr(0.002))
    opt.register_load_state_dict_pre_hook(set_lr(0.003), prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: ran.append(o.param_groups[0]["lr"]))
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002 and ran == [0.002]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("state_dtype", [None, "8bit", "remainder"])
def test_state_dict_hooks_see_and_keep_what_the_caller_gets(name, state_dtype, device):
    """Post-hooks run on the state as loaded (a hook that resets the moments on resume
    keeps them reset) and on the state dict as exported (a remainder's fp32 master there),
    as torch.optim's hooks see its state."""
    options = {"master_weights": "remainder"} if state_dtype == "remainder" else {"state_dtype": state_dtype}
    params = [Parameter(torch.randn(64, 3, generator=torch.Generator().manual_seed(3))
                                    .to(torch.bfloat16 if state_dtype == "remainder" else torch.float32)
                                    .to(device))]
    opt = OURS[name](params, lr=1e-2, **options)
    for seed in range(3):
        params[0].grad = torch.randn(params[0].shape, generator=torch.Generator().manual_seed(seed)).to(params[0])
        opt.step()
    seen = {}

    def post_save(optimizer, sd):
        seen["saved_keys"] = set(sd["state"][0])

    opt.register_state_dict_post_hook(post_save)
    sd = opt.state_dict()
    assert seen["saved_keys"] == set(sd["state"][0])
    if state_dtype == "remainder":
        assert {"master_param", "master_param_remainder"} <= seen["saved_keys"]

    def reset(optimizer):
        seen["loaded"] = {k: v.dtype for k, v in optimizer.state[params[0]].items()}
        for key, value in optimizer.state[params[0]].items():
            value.zero_()

    fresh_opt = OURS[name](params, lr=1e-2, **options)
    fresh_opt.register_load_state_dict_post_hook(reset)
    fresh_opt.load_state_dict(sd)
    assert seen["loaded"] == {k: v.dtype for k, v in opt.state[params[0]].items()}
    assert all(not v.any() for v in fresh_opt.state[params[0]].values())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("named", [False, True])
def test_param_group_added_from_a_generator_is_stepped(name, named, device):
    """``add_param_group({"params": head.parameters()})``: a generator, read once."""
    results = []
    for cls in (OURS[name], getattr(torch.optim, name)):
        torch.manual_seed(0)
        base, head = torch.nn.Linear(4, 4).to(device), torch.nn.Linear(4, 2).to(device)
        opt = cls(base.named_parameters() if named else base.parameters(), lr=0.1)
        opt.add_param_group({"params": head.named_parameters() if named else head.parameters(), "lr": 0.01})
        assert len(opt.param_groups[1]["params"]) == 2
        for _ in range(2):
            opt.zero_grad()
            head(base(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(device))).sum().backward()
            opt.step()
        results.append([p.detach().clone() for p in [*base.parameters(), *head.parameters()]])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tensor_beta", [0, 1])
def test_one_tensor_beta_beside_a_float_one_steps_like_torch(name, tensor_beta, device):
    """OneCycleLR's cycle_momentum writes a float beta1 beside a tensor beta2; either beta
    may be the tensor alone."""
    results = []
    for cls in (OURS[name], getattr(torch.optim, name)):
        weight, bias, inpt = linear_problem(device)
        opt = cls([weight, bias], lr=1e-2, betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=False)
        betas = [0.85, 0.98]  # set after construction, as the scheduler does (torch's
        betas[tensor_beta] = torch.tensor(betas[tensor_beta], device=device)  # constructor refuses it)
        opt.param_groups[0]["betas"] = tuple(betas)
        run_steps(opt, weight, bias, inpt, 4)
        results.append((weight, bias))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])  # torch's Adamax cannot step tensor betas
def test_learned_tensor_betas_stay_the_callers_tensors(name, device):
    """torch keeps 0-dim tensor betas as the very tensors given (and squeezes 1-element
    ones of more dims): learned betas that require grad stay graph leaves, so the
    optimizer, its state dict and a load of its own state dict can be copied. Stored as
    new views, they could not (deepcopy: "Only Tensors created explicitly by the user")."""
    b1, b2 = (torch.tensor(v, device=device, requires_grad=True) for v in (0.9, 0.999))
    flat = torch.tensor([[0.95]], device=device)
    for betas in ((b1, b2), (flat, b2)):
        results = []
        for cls in (OURS[name], getattr(torch.optim, name)):
            weight, bias, inpt = linear_problem(device)
            # torch's for-loop step: on a GPU its default foreach step refuses tensor betas
            # unless capturable
            opt = cls([weight, bias], lr=1e-2, betas=betas, foreach=False)
            run_steps(opt, weight, bias, inpt, 2)
            kept = opt.param_groups[0]["betas"]
            results.append(([kept[0] is betas[0], kept[1] is betas[1], kept[0].shape], (weight, bias)))
            copy.deepcopy(opt)
            copy.deepcopy(opt.state_dict())
            opt.load_state_dict(opt.state_dict())
            run_steps(opt, weight, bias, inpt, 1)
        assert results[0][0] == results[1][0]
        torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_state_under_keys_that_are_not_params_is_kept_like_torch(name, state_dtype, device):
    """``optimizer.state`` may hold entries under keys that are not params (torch's own
    state-dict pre-hook test sets ``state["test"] = 1``; training code keeps notes there).
    torch.optim never reads them in a step, keeps them under the same key in
    ``state_dict()`` and loads them back as they are; so must every export, copy and step
    here, also when such an entry changes between steps."""
    extra = {} if state_dtype is None else {"state_dtype": state_dtype}
    weight, bias, inpt = linear_problem(device, seed=3)
    ours_params = [weight, bias]
    torch_params = [Parameter(weight.detach().clone()), Parameter(bias.detach().clone())]
    ours = OURS[name](ours_params, lr=0.01, **extra)
    ref = getattr(torch.optim, name)(torch_params, lr=0.01, foreach=False)

    ours.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))  # torch's hook
    assert ours.state_dict()["state"] == {"test": 1}
    for opt, (w, b) in ((ours, ours_params), (ref, torch_params)):
        opt.state["note"] = 1  # neither a dict nor a param key
        opt.state["cfg"] = {"epoch": 3}
        run_steps(opt, w, b, inpt, 2)
        opt.state["note"] = 2  # changed between steps
        opt.state["cfg"]["epoch"] = 4
        run_steps(opt, w, b, inpt, 2)
    for p, q in zip(ours_params, torch_params):
        torch.testing.assert_close(p, q, atol=5e-3 if state_dtype else 1e-6, rtol=1e-5)

    expected = {"note": 2, "cfg": {"epoch": 4}, "test": 1}
    for sd in (ours.state_dict(), ours.torch_state_dict()):
        assert sd["state"].keys() == {0, 1, *expected}, sd["state"].keys()
        assert {k: sd["state"][k] for k in expected} == expected
    ref_sd = ref.state_dict()
    assert ref_sd["state"]["note"] == 2 and ref_sd["state"]["cfg"] == {"epoch": 4}
    for copied in (copy.deepcopy(ours), reloaded(ours, weights_only=False)):
        assert copied.state["note"] == 2 and copied.state["cfg"] == {"epoch": 4}

    # Loading: the entries come back under their keys, and the optimizer steps on.
    loaded = OURS[name]([Parameter(weight.detach().clone()), Parameter(bias.detach().clone())], lr=0.01, **extra)
    loaded.load_state_dict(ours.state_dict())
    assert loaded.state["note"] == 2 and loaded.state["cfg"] == {"epoch": 4}
    w, b = loaded.param_groups[0]["params"]
    run_steps(loaded, w, b, inpt, 1)
    run_steps(ours, weight, bias, inpt, 1)
    torch.testing.assert_close(w, weight, atol=0, rtol=0)
    torch.testing.assert_close(b, bias, atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("make_step", [lambda d: torch.zeros(1, device=d),
                                       lambda d: torch.tensor(0.0, dtype=torch.float64, device=d)],
                         ids=["zeros(1)", "float64"])
def test_step_counts_written_in_by_hand_are_counted_in_place(name, make_step, device):
    """A3C-style SharedAdam creates each param's state by hand (``state["step"] =
    torch.zeros(1)``, moments, ``share_memory_()``) and steps in worker processes: torch
    counts in that tensor (``step_t += 1``), so every worker and the parent see one count.
    The count was replaced by a new 0-d tensor, so each worker restarted the bias
    correction at step 1 and the parent's count never moved."""
    weight, bias, inpt = linear_problem(device, seed=5)
    results = []
    for cls in (OURS[name], INFOS[name].optim_cls):
        params = [Parameter(weight.detach().clone()), Parameter(bias.detach().clone())]
        opt = cls(params, lr=0.05)
        counts = []
        for p in params:
            state = opt.state[p]
            state["step"] = make_step(device)
            for key in moment_keys(name):
                state[key] = torch.zeros_like(p)
            counts.append(state["step"])
        run_steps(opt, *params, inpt, 3)
        assert all(opt.state[p]["step"] is c for p, c in zip(params, counts)), cls
        assert [c.tolist() for c in counts] == [make_step("cpu").add(3).tolist()] * 2
        results.append(params)
    torch.testing.assert_close(*results)


@pytest.mark.parametrize("name", NAMES)
def test_a_negative_view_step_count_counts_up(name, device):
    """A count whose negation is lazy (``_neg_view()``: its memory holds minus its value)
    cannot be counted in place by the kernels, which write memory: replaced by a count of
    its value, it steps and exports like torch's."""
    weight, bias, inpt = linear_problem(device, seed=8)
    results = []
    for cls in (OURS[name], INFOS[name].optim_cls):
        params = [Parameter(weight.detach().clone()), Parameter(bias.detach().clone())]
        opt = cls(params, lr=0.05, foreach=False)  # torch's foreach add refuses negated counts
        for p in params:
            opt.state[p]["step"] = torch.zeros(1, device=device)._neg_view()
            for key in moment_keys(name):
                opt.state[p][key] = torch.zeros_like(p)
        run_steps(opt, *params, inpt, 3)
        assert [float(s["step"]) for s in opt.state_dict()["state"].values()] == [3.0, 3.0], cls
        results.append(params)
    torch.testing.assert_close(*results)


def moment_keys(name):
    return ("exp_avg", "exp_inf") if name == "Adamax" else ("exp_avg", "exp_avg_sq")


def test_shared_step_counts_count_across_worker_processes(device):
    """The SharedAdam pattern itself: two worker processes (forked one after the other,
    so no races) step a model and optimizer state in shared memory; the parent sees 4
    steps counted, as with torch.optim."""
    if device.type != "cpu":
        pytest.skip("forks a process: CPU tensors only")
    import multiprocessing

    weight, bias, inpt = linear_problem(device, seed=6)
    results = []
    for cls in (tritonadam.Adam, torch.optim.Adam):
        params = [Parameter(weight.detach().clone().share_memory_()), Parameter(bias.detach().clone().share_memory_())]
        opt = cls(params, lr=0.05)
        for p in params:
            opt.state[p].update(step=torch.zeros(1), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            for value in opt.state[p].values():
                value.share_memory_()
        for _ in range(2):
            worker = multiprocessing.get_context("fork").Process(target=run_steps, args=(opt, *params, inpt, 2))
            worker.start()
            worker.join()
            assert worker.exitcode == 0
        assert [opt.state[p]["step"].item() for p in params] == [4.0, 4.0], cls
        results.append(params)
    torch.testing.assert_close(*results)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_extra_per_param_state_entries_load_like_torch(name, state_dtype, device):
    """Entries a wrapper keeps in a param's state beside the optimizer's (a 0-d count, a
    buffer of another shape, an integer tensor): torch.optim steps with them, saves them
    and loads them back. Ours refused its own checkpoint (and torch's) at load, taking
    them for its own state of the wrong shape or dtype."""
    extra = {} if state_dtype is None else {"state_dtype": state_dtype}
    weight, bias, inpt = linear_problem(device, seed=7)
    extras = {"ema_step": torch.tensor(3.0, device=device), "other": torch.randn(4, device=device),
              "counts": torch.arange(50, device=device).reshape(10, 5)}
    sources = []
    for cls, kw in ((OURS[name], extra), (INFOS[name].optim_cls, {})):
        opt = cls([weight, bias], lr=0.01, **kw)
        run_steps(opt, weight, bias, inpt, 1)
        opt.state[weight].update({k: v.clone() for k, v in extras.items()})
        sources.append((opt.state_dict(), getattr(opt, "torch_state_dict", opt.state_dict)()))
    for saved, torch_form in sources:
        params = [Parameter(weight.detach().clone()), Parameter(bias.detach().clone())]
        mirror = [Parameter(weight.detach().clone()), Parameter(bias.detach().clone())]
        ours, theirs = OURS[name](params, lr=0.01, **extra), INFOS[name].optim_cls(mirror, lr=0.01)
        ours.load_state_dict(copy.deepcopy(saved))
        theirs.load_state_dict(copy.deepcopy(torch_form))
        for key in extras:
            assert_same(ours.state[params[0]][key], theirs.state[mirror[0]][key], key)
        run_steps(ours, *params, inpt, 1)
        run_steps(theirs, *mirror, inpt, 1)
        for key in extras:  # torch casts them to the param's dtype at load
            assert_same(ours.state_dict()["state"][0][key], theirs.state_dict()["state"][0][key], key)


@pytest.mark.parametrize("how", ["plain", "differentiable, leaf", "differentiable, not a leaf"])
@pytest.mark.parametrize("name", NAMES)
def test_sparse_grads_raise_torchs_error(name, how, device):
    """torch.optim's exact words (AdamW's are Adam's; Adamax suggests no SparseAdam), in
    differentiable=True groups too (torch.optim's own code steps them here; their check
    had said "AdamW ..." and suggested SparseAdam to Adamax, and came after the error for
    a leaf, which torch raises after its sparse check)."""
    messages = []
    for cls in (OURS[name], INFOS[name].optim_cls):
        p = Parameter(torch.randn(4, 3, device=device))
        if how == "differentiable, not a leaf":
            p = p.clone()
        p.grad = torch.randn(4, 3, device=device).to_sparse()
        with pytest.raises(RuntimeError) as err:
            cls([p], differentiable=how != "plain").step()
        messages.append(str(err.value))
    assert messages[0] == messages[1]


# ---- complex params, differentiable=True, unsupported devices -----------------------


@pytest.mark.parametrize("name", NAMES)
def test_complex_matches_view_as_real(name, device):
    """torch's test_complex: a complex param steps like its view_as_real."""
    gen = torch.Generator().manual_seed(0)
    cplx = [torch.randn(10, 5, dtype=torch.complex64, generator=gen).to(device).requires_grad_(),
            torch.randn(10, 5, generator=gen).to(device).requires_grad_()]
    real = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
            for p in cplx]
    opt_c, opt_r = OURS[name](cplx), OURS[name](real)
    for _ in range(2):
        for pc, pr in zip(cplx, real):
            pr.grad = torch.randn(pr.shape, generator=gen).to(device)
            pc.grad = torch.view_as_complex(pr.grad) if pc.is_complex() else pr.grad.clone()
        opt_r.step()
        opt_c.step()
    for pc, pr in zip(cplx, real):
        assert torch.equal(torch.view_as_real(pc) if pc.is_complex() else pc, pr)


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_configs_construct_and_step(name, device):
    """torch's hook/printing/no-op tests include differentiable=True configs."""
    param = Parameter(torch.randn(5, 1, device=device)).clone()
    before = param.detach().clone()
    opt = OURS[name]([param], differentiable=True, weight_decay=0)
    assert "differentiable: True" in repr(opt)
    param.grad = torch.zeros_like(param)
    opt.step()
    assert torch.equal(param.detach(), before)  # zero grads, no weight decay: a no-op
    assert opt.state[param]["step"].item() == 1


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_set_on_a_group_by_hand_steps_as_torch(name):
    """torch.optim's step takes its grad mode from the constructor's ``differentiable``:
    a group switched to differentiable=True by hand on leaf params steps without autograd,
    as torch's does (ours had failed on the first in-place update, after counting the
    step). With differentiable=True in the constructor, leaf params get torch's error
    before anything is written (torch's own step counts the step first)."""
    gen = torch.Generator().manual_seed(4)
    params = [[Parameter(torch.randn(5, generator=gen)) for _ in range(3)]]
    params.append([Parameter(p.detach().clone()) for p in params[0]])
    opts = [cls([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1)
            for cls, ps in zip((OURS[name], getattr(torch.optim, name)), params)]
    for step in range(3):
        grads = [torch.randn(5, generator=gen) for _ in range(3)]
        for opt, ps in zip(opts, params):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            if step == 1:
                opt.param_groups[0]["differentiable"] = True
            opt.step()
        for p, q in zip(*params):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    leaf = Parameter(torch.randn(5, generator=gen))
    opt = OURS[name]([leaf], differentiable=True)
    leaf.grad = torch.randn(5, generator=gen)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place"):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("name", [n for n in NAMES if "fused" in INFOS[n].supported_impls])
def test_fused_step_on_meta_params_raises_torch_error(name, device):
    if device.type != "cpu":
        pytest.skip("meta params are only checked in interpreter runs")
    with torch.device("meta"):
        model = torch.nn.Linear(2, 3)
    opt = OURS[name](model.parameters(), fused=True)
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert "`fused=True` requires all the params to be floating point Tensors" in str(err.value)
    assert len(opt.state) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_differentiable_steps_16_bit_params_with_fp32_moments(name, dtype):
    """differentiable=True steps 16-bit params as torch.optim does (it had been refused):
    through torch's implementation, with the fp32 moments this optimizer keeps for them
    (torch.optim keeps them in the param's dtype), the grad's cast recorded. The first
    step is torch.optim's update of the same values at fp32, rounded once; the gradient
    of the stepped param w.r.t. the leaf it was made from is the fp32 one's, rounded."""
    gen = torch.Generator().manual_seed(5)
    leaf = torch.randn(9, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(9, generator=gen).to(dtype)
    ours = leaf.clone()
    opt = OURS[name]([ours], lr=0.1, weight_decay=0, differentiable=True)
    ours.grad = grad
    opt.step()
    assert {k: v.dtype for k, v in opt.state[ours].items() if k != "step"} == dict.fromkeys(
        ("exp_avg", "exp_inf" if name == "Adamax" else "exp_avg_sq"), torch.float32)
    leaf32 = leaf.detach().float().requires_grad_()
    theirs = leaf32.clone()
    ref = getattr(torch.optim, name)([theirs], lr=0.1, weight_decay=0, differentiable=True)
    theirs.grad = grad.float()
    ref.step()
    assert ours.dtype == dtype and torch.equal(ours.detach(), theirs.detach().to(dtype))
    (d_ours,) = torch.autograd.grad(ours.float().square().sum(), leaf)
    (d_theirs,) = torch.autograd.grad(theirs.to(dtype).float().square().sum(), leaf32)
    torch.testing.assert_close(d_ours.float(), d_theirs.to(dtype).float(), rtol=1e-2, atol=1e-2)
    for _ in range(2):  # and on, with weight decay
        opt.param_groups[0]["weight_decay"] = 0.1
        ours.grad = torch.randn(9, generator=gen).to(dtype)
        opt.step()
    assert ours.grad_fn is not None and torch.isfinite(ours.detach()).all()


@pytest.mark.parametrize("name", NAMES)
def test_state_in_a_graph_is_bumped_by_a_kernel_step(name):
    """Moments in the autograd graph (made from grads that require grad by differentiable=True
    steps, loaded into an optimizer that steps with the kernels, which keeps them in the
    graph as torch.optim does): a loss built from them, then a kernel step, then its
    backward raises "modified by an inplace operation", as with torch.optim, whose in-place
    updates bump the moments (the kernel wrote them unseen: the backward differentiated
    the new values)."""
    gen = torch.Generator().manual_seed(6)
    leaf = torch.randn(10, generator=gen, requires_grad=True)
    scale = torch.tensor(1.5, requires_grad=True)  # grads in the graph: so are the moments
    w = leaf.clone()
    opt = OURS[name]([w], lr=0.01, weight_decay=0.1, differentiable=True)
    for _ in range(2):
        w.grad = torch.randn(10, generator=gen) * scale
        opt.step()
    kernel_w = Parameter(w.detach().clone())
    kernel = OURS[name]([kernel_w], lr=0.01, weight_decay=0.1)
    kernel.load_state_dict(opt.state_dict())
    meta = (kernel.state[kernel_w]["exp_avg"] ** 2).sum()
    assert meta.requires_grad
    kernel_w.grad = torch.randn(10, generator=gen)
    kernel.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        meta.backward()


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_step_matches_torch(name):
    """differentiable=True steps through torch.optim's implementation: the update and the
    gradients through it (w.r.t. the param and the grad) equal torch.optim's."""
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    g0 = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    kwargs = {"lr": 0.1, "weight_decay": 0.1}

    def run(cls):
        p = p0.clone()
        p.grad = g0.clone()
        opt = cls([p], differentiable=True, **kwargs)
        opt.step()
        return p, torch.autograd.grad(p.sum(), (p0, g0))

    ours, d_ours = run(OURS[name])
    theirs, d_theirs = run(getattr(torch.optim, name))
    # torch's implementation does not unscale grads: GradScaler must do it, as for torch.optim.
    assert not OURS[name]([p0.clone()], differentiable=True)._step_supports_amp_scaling
    assert OURS[name]([Parameter(p0.detach().clone())])._step_supports_amp_scaling
    assert torch.equal(ours, theirs)
    for a, b in zip(d_ours, d_theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_of_a_non_dict_raises_torchs_error(name):
    """opt.add_param_group([p]) (a list, not a dict): torch's TypeError (the group's
    options check read param_group["params"] first: "list indices must be integers")."""
    messages = []
    for cls in (OURS[name], getattr(torch.optim, name)):
        opt = cls([Parameter(torch.randn(4))])
        with pytest.raises(TypeError) as err:
            opt.add_param_group([Parameter(torch.randn(3))])
        messages.append(str(err.value))
        assert len(opt.param_groups) == 1
    assert messages[0] == messages[1] == "param_group must be a dict, but got <class 'list'>"


def test_construction_warns_and_imports_no_more_than_torchs():
    """A fresh process: building and stepping ours raises no warning where torch.optim's
    raises none, and does not import torch.distributed.optim (which warns about torch.jit and takes seconds) to
    learn whether ZeroRedundancyOptimizer is building it."""
    import subprocess
    import sys

    code = (
        "import sys, warnings, torch, tritonadam\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for cls in (torch.optim.AdamW, tritonadam.AdamW, tritonadam.Adam, tritonadam.Adamax):\n"
        "        p = torch.nn.Parameter(torch.randn(5, 3))\n"
        "        opt = cls([p])\n"
        "        p.grad = torch.randn_like(p)\n"
        "        opt.step()\n"
        "assert not caught, [str(w.message) for w in caught][:3]\n"
        "assert 'torch.distributed.optim' not in sys.modules, 'torch.distributed.optim imported'\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
