"""CPU params in a process whose kernels run on a GPU (FSDP's CPU offload, a CPU copy of a
model): torch.optim's own CPU implementation steps them on this optimizer's state
(tritonadam.host).

Under the interpreter the kernels step CPU params, so most tests here route the params
they mark to that path by patching ``validate.host_stepped``; the subprocess test at the
end runs the real thing, without the interpreter.
"""
import gc
import os
import subprocess
import sys
import warnings
import weakref

import pytest
import torch

import tritonadam
from tritonadam import host, validate
from tritonadam.state import join_master, split_master

from helpers import (LAUNCH, PAIRS, assert_backward_through_a_stepped_param_raises, clone_params,
                     make_params, random_grads)

SHAPES = [(7, 3), (5,), (), (0,), (33,)]


@pytest.fixture
def on_host(monkeypatch):
    """Params marked ``p.on_host = True`` are stepped on the host; the rest as before."""
    monkeypatch.setattr(validate, "host_stepped", lambda p: getattr(p, "on_host", False))

    def mark(params):
        for p in params:
            p.on_host = True
        return params

    return mark


def _odd_params(dtype, seed):
    """Params of odd shapes on the CPU, plus a transposed one and a non-dense view of a
    wider buffer (returned too: its other columns must never change)."""
    params = make_params(SHAPES, dtype, "cpu", seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    params.append(torch.nn.Parameter(torch.randn(4, 6, generator=gen).to(dtype).t()))
    buffer = torch.randn(8, 6, generator=gen).to(dtype)
    view = buffer[:, :3]  # non-dense: steps through its strides, never past them
    view.requires_grad_(True)
    return params + [view], buffer


def _torch_reference(cls, ours, ref, kwargs):
    """torch.optim stepping copies ``ref`` of ``ours`` as the host path steps ``ours``: its
    fused CPU kernel where every tensor is contiguous (real float params, Adam/AdamW,
    float32 step counts), its single-tensor loop for the rest."""
    fusable = [q for p, q in zip(ours, ref) if not p.is_complex() and p.is_contiguous()
               and cls is not torch.optim.Adamax]
    rest = [q for q in ref if all(q is not f for f in fusable)]
    out = []
    if fusable:
        out.append(cls(fusable, fused=True, **kwargs))
    if rest:
        out.append(cls(rest, foreach=False, **kwargs))
    return out


CONFIGS = [
    {},
    {"weight_decay": 0.1, "amsgrad": True},
    {"weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.95)},
    {"lr": "tensor", "eps": 1e-6},
]


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("config", range(len(CONFIGS)), ids=lambda i: f"config{i}")
def test_matches_torch_bit_for_bit(on_host, name, dtype, config):
    ours_cls, torch_cls = PAIRS[name]
    kwargs = dict(CONFIGS[config])
    if name == "Adamax":
        kwargs.pop("amsgrad", None)
    tensor_lr = kwargs.get("lr") == "tensor"
    params, buffer = _odd_params(dtype, seed=config)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    untouched = buffer[:, 3:].clone()
    lr = lambda: torch.tensor(0.01) if tensor_lr else kwargs.get("lr", 1e-3)  # noqa: E731
    ours = ours_cls(on_host(params), **{**kwargs, "lr": lr()})
    theirs = _torch_reference(torch_cls, params, ref, {**kwargs, "lr": lr()})
    gen = torch.Generator().manual_seed(100 + config)
    for _ in range(4):
        for p, q, g in zip(params, ref, random_grads(params, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        for opt in theirs:
            opt.step()
        for p, q in zip(params, ref):
            assert torch.equal(p, q)
            for key, value in ours.state[p].items():
                assert torch.equal(value, next(s[key] for o in theirs for k, s in o.state.items() if k is q))
    assert torch.equal(buffer[:, 3:], untouched)
    # The state is this optimizer's (and torch's) plain format: it loads into torch.optim.
    loaded = torch_cls(ref, foreach=False, **{**kwargs, "lr": lr()})
    loaded.load_state_dict(ours.state_dict())


def _steps_beside_fp32_torch(ours, theirs, params, wide, seed, steps=4):
    """Step ``ours`` and torch's fp32 ``theirs`` (over fp32 copies ``wide``) on the same
    grads, widened for torch; yields after each step for the caller's checks."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, w, g in zip(params, wide, random_grads(params, gen)):
            p.grad, w.grad = g, g.float()
        ours.step()
        theirs.step()
        yield


@pytest.mark.parametrize("dtype, master_weights", [
    (torch.bfloat16, False), (torch.bfloat16, True), (torch.bfloat16, "remainder"),
    (torch.float16, False), (torch.float16, True),
])
def test_low_precision_params_step_in_fp32(on_host, dtype, master_weights):
    """As the kernels step them: an fp32 step from the fp32 master (or from the param),
    rounded to nearest into the param; fp32 state. With master_weights="remainder" the
    param and its int16 remainder are the fp32 master exactly, step after step."""
    params = make_params([(9, 4), (17,)], dtype, "cpu", seed=5)
    wide = [torch.nn.Parameter(p.detach().float()) for p in params]
    ours = tritonadam.AdamW(on_host(params), lr=0.01, weight_decay=0.1, master_weights=master_weights)
    theirs = torch.optim.AdamW(wide, lr=0.01, weight_decay=0.1, fused=True)
    for _ in _steps_beside_fp32_torch(ours, theirs, params, wide, seed=6):
        for p, w in zip(params, wide):
            assert ours.state[p]["exp_avg"].dtype == torch.float32
            assert torch.equal(ours.state[p]["exp_avg_sq"], theirs.state[w]["exp_avg_sq"])
            if master_weights == "remainder":
                assert "master_param" not in ours.state[p]
                assert torch.equal(join_master(p, ours.state[p]["master_param_remainder"]), w)
                assert torch.equal(p, split_master(w)[0])  # ties away from zero, as the kernel
                continue
            if master_weights and dtype == torch.bfloat16:
                assert torch.equal(p, split_master(w)[0])  # ties away from zero, as the kernel
            else:
                assert torch.equal(p, w.detach().to(dtype))
            if master_weights:
                assert torch.equal(ours.state[p]["master_param"], w)
            else:
                w.data.copy_(p.float())  # without a master the param's rounding is kept


def test_bf16_param_from_its_fp32_master_rounds_ties_away_from_zero(on_host, device):
    """master_weights=True: a bf16 param halfway between two bf16 values of its master goes
    to the one farther from zero, on the host path as in the kernels (and as
    master_weights="remainder" rounds), where a plain .to(bfloat16) rounds to even."""
    kernel = make_params([(4,)], torch.bfloat16, device, seed=42)
    hosted = on_host(make_params([(4,)], torch.bfloat16, "cpu", seed=43))
    opt = tritonadam.AdamW(kernel + hosted, lr=0.0, weight_decay=0.0, master_weights=True)
    gen = torch.Generator().manual_seed(44)
    for _ in range(2):
        for p, g in zip(kernel + hosted, random_grads(kernel + hosted, gen)):
            p.grad = g
        opt.step()  # lr 0: the master stays as set
        ties = torch.tensor([1 + 2 ** -8, -(1 + 2 ** -8), 1 + 3 * 2 ** -8, 2 + 2 ** -7])
        for p in kernel + hosted:
            opt.state[p]["master_param"].copy_(ties)
    expected = torch.tensor([1.0078125, -1.0078125, 1.015625, 2.015625], dtype=torch.bfloat16)
    assert not torch.equal(ties.to(torch.bfloat16), expected)
    for p in kernel + hosted:
        assert torch.equal(p.detach().cpu(), expected), p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_moments_step_in_fp32_and_round_back(on_host, dtype):
    """state_dtype=torch.bfloat16: the moments are widened, stepped with the param in fp32,
    and rounded back to nearest (ties to even), as the kernels round them."""
    params = make_params([(9, 4), (17,)], dtype, "cpu", seed=18)
    wide = [torch.nn.Parameter(p.detach().float()) for p in params]
    ours = tritonadam.Adam(on_host(params), lr=0.01, amsgrad=True, state_dtype=torch.bfloat16)
    theirs = torch.optim.Adam(wide, lr=0.01, amsgrad=True, fused=True)
    for _ in _steps_beside_fp32_torch(ours, theirs, params, wide, seed=19):
        for p, w in zip(params, wide):
            assert torch.equal(p, w.detach().to(dtype))
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                mine, ref = ours.state[p][key], theirs.state[w][key]
                assert mine.dtype == torch.bfloat16
                assert torch.equal(mine, ref.to(torch.bfloat16))
                ref.copy_(mine.float())  # torch's next step reads what was kept
            w.data.copy_(p.float())


@pytest.mark.parametrize("init_scale", [2.0 ** 10, 3000.0])
@pytest.mark.parametrize("name", ["AdamW", "Adamax"])
def test_grad_scaler_unscales_and_skips(on_host, name, init_scale):
    """GradScaler's scale is taken out of the grads as torch takes it: divided in torch's
    fused AdamW step, multiplied by its fp32 reciprocal (GradScaler.unscale_) before
    torch's Adamax step (the two differ by an ulp for a scale not a power of two: the
    moments did, divided); a found inf skips the step, counts included. A step leaves the
    grads unscaled, as torch's fused step does."""
    params = make_params([(6, 5), (11,)], torch.float32, "cpu", seed=7)
    ref = clone_params(params)
    ours = getattr(tritonadam, name)(on_host(params), lr=0.01)
    theirs = torch.optim.AdamW(ref, lr=0.01, fused=True) if name == "AdamW" else \
        torch.optim.Adamax(ref, lr=0.01, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=init_scale) for _ in range(2)]
    gen = torch.Generator().manual_seed(8)
    for step in range(4):
        grads = random_grads(params, gen)
        if step == 2:
            grads[1][3] = float("inf")
        left = []
        for opt, ps, scaler in ((ours, params, scalers[0]), (theirs, ref, scalers[1])):
            loss = sum((p * g).sum() for p, g in zip(ps, grads))
            scaler.scale(loss).backward()
            before = [p.detach().clone() for p in ps]
            taken = [p.grad.clone() for p in ps]
            scaler.step(opt)
            if opt is ours:  # the grads left unscaled by unscale_'s fp32 1/scale; a skip leaves them
                inv = (1.0 / scaler._scale.double()).float()
                assert all(torch.equal(p.grad, g if step == 2 else g * inv) for p, g in zip(ps, taken))
            left.append([p.grad.clone() for p in ps])
            scaler.update()
            if step == 2:  # skipped
                assert all(torch.equal(p, b) for p, b in zip(ps, before))
            opt.zero_grad()
        if name == "AdamW" and init_scale == 2.0 ** 10:  # torch's fused step writes them back too
            assert all(torch.equal(a, b) for a, b in zip(*left))
        for p, q in zip(params, ref):
            assert torch.equal(p, q)
            assert ours.state[p].keys() == theirs.state[q].keys()
            for key, value in theirs.state[q].items():
                assert torch.equal(ours.state[p][key], value), (step, key)
    assert ours.state[params[0]]["step"].item() == 3


@pytest.mark.parametrize("options, match", [
    ({"state_dtype": "8bit"}, "state_dtype='8bit'"),
    ({"stochastic_rounding": True}, "stochastic_rounding=True"),
    ({"bias_correction": False}, "bias_correction=False"),
])
def test_what_needs_the_kernels_is_refused_before_anything_is_written(on_host, options, match):
    params = make_params([(6, 5), (11,)], torch.bfloat16, "cpu", seed=9)
    opt = tritonadam.AdamW(on_host(params), **options)
    gen = torch.Generator().manual_seed(10)
    for p, g in zip(params, random_grads(params, gen)):
        p.grad = g
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=match) as err:
        opt.step()
    assert "on the CPU" in str(err.value) or "CPU implementation" in str(err.value)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not any(opt.state.values())


# Complex grads are clipped by their 2-norm only.
CLIP_CASES = [(d, p) for d in (torch.float32, torch.float64) for p in (2.0, 1.0, float("inf"), 3.0)]
CLIP_CASES.append((torch.complex64, 2.0))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax"])
@pytest.mark.parametrize("dtype, norm_type", CLIP_CASES)
@pytest.mark.parametrize("how", ["explicit", "max_grad_norm"])
def test_fused_clip_matches_torch_clip_bit_for_bit(on_host, name, dtype, norm_type, how):
    """Every param stepped by torch's implementation: ``clip_grad_norm_`` and
    ``max_grad_norm=`` return torch's norm and step as torch's clip then torch's step do,
    bit for bit; ``.grad`` keeps its values."""
    ours_cls, torch_cls = PAIRS[name]
    params = on_host(_odd_params(dtype, seed=30)[0])
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kwargs = {"lr": 0.02, "weight_decay": 0.1}
    clip = {"max_grad_norm": 0.5, "grad_norm_type": norm_type} if how == "max_grad_norm" else {}
    ours = ours_cls(params, **kwargs, **clip)
    theirs = _torch_reference(torch_cls, params, ref, kwargs)
    gen = torch.Generator().manual_seed(31)
    clipped = []
    for step in range(4):
        grads = random_grads(params, gen, scale=1e-3 if step == 1 else 1.0)
        for p, q, g in zip(params, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        # torch's inf norm refuses empty grads (_foreach_norm has no identity for max)
        measured = [q for q in ref if q.numel() or norm_type != float("inf")]
        expected = torch.nn.utils.clip_grad_norm_(measured, 0.5, norm_type)
        norm = ours.clip_grad_norm_(0.5, norm_type) if how == "explicit" else None
        ours.step()
        for opt in theirs:
            opt.step()
        norm = norm if how == "explicit" else ours.last_grad_norm
        assert norm.dtype == dtype.to_real() and torch.equal(norm, expected), (step, norm, expected)
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
        assert all(torch.equal(p, q) for p, q in zip(params, ref)), step
        clipped.append(bool(expected > 0.5))
    assert any(clipped) and not all(clipped)


@pytest.mark.parametrize("how", ["explicit", "max_grad_norm"])
def test_fused_clip_of_complex_grads_takes_the_2_norm_only(on_host, how):
    """As the kernels' clip: other orders are refused for complex grads, nothing written."""
    params = on_host(make_params([(6, 5)], torch.complex64, "cpu", seed=39))
    opt = tritonadam.Adam(params, **({"max_grad_norm": 1.0, "grad_norm_type": 1.0} if how == "max_grad_norm" else {}))
    params[0].grad = torch.randn(6, 5, dtype=torch.complex64)
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match="2-norm only"):
        opt.clip_grad_norm_(1.0, norm_type=1.0) if how == "explicit" else opt.step()
    assert torch.equal(params[0], before) and not opt._clipper.pending


@pytest.mark.parametrize("init_scale", [2.0 ** 12, 3000.0])
@pytest.mark.parametrize("how", ["explicit", "max_grad_norm"])
def test_fused_clip_with_grad_scaler(on_host, how, init_scale):
    """The norm of the unscaled grads, and the step's grads, as torch's recipe (unscale_,
    clip, step) takes them, bit for bit for a scale not a power of two too (the step had
    divided the scale out: its moments an ulp off); a step GradScaler skips consumes the
    coefficient and writes nothing."""
    params = on_host(make_params([(6, 5), (11,), ()], torch.float32, "cpu", seed=32))
    ref = clone_params(params)
    ours = tritonadam.AdamW(params, lr=0.01, **({"max_grad_norm": 1.0} if how == "max_grad_norm" else {}))
    theirs = torch.optim.AdamW(ref, lr=0.01, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=init_scale) for _ in range(2)]
    gen = torch.Generator().manual_seed(33)
    for step in range(4):
        grads = random_grads(params, gen, scale=float(step + 1))
        if step == 2:
            grads[1][3] = float("inf")
        for ps, scaler in ((params, scalers[0]), (ref, scalers[1])):
            scaler.scale(sum((p * g).sum() for p, g in zip(ps, grads))).backward()
        before = [p.detach().clone() for p in params]
        if how == "explicit":
            norm = ours.clip_grad_norm_(1.0, scaler=scalers[0])
        scalers[0].step(ours)
        scalers[1].unscale_(theirs)
        expected = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        scalers[1].step(theirs)
        norm = norm if how == "explicit" else ours.last_grad_norm
        if step == 2:  # skipped: nothing written, and no coefficient left for the next step
            assert all(torch.equal(p, b) for p, b in zip(params, before))
            assert not ours._clipper.pending and not torch.isfinite(norm)
        else:
            assert torch.equal(norm, expected), (step, norm, expected)
        for scaler, opt in zip(scalers, (ours, theirs)):
            scaler.update()
            opt.zero_grad()
        assert all(torch.equal(p, q) for p, q in zip(params, ref)), step
        for p, q in zip(params, ref):
            for key, value in theirs.state[q].items():
                assert torch.equal(ours.state[p][key], value), (step, key)
    assert ours.state[params[0]]["step"].item() == 3


class _BesideTorch:
    """fp32 host params and their clones, stepped by AdamW and torch's fused AdamW, with
    the same fresh grads each time."""

    def __init__(self, on_host, shapes, seed):
        self.params = on_host(make_params(shapes, torch.float32, "cpu", seed=seed))
        self.ref = clone_params(self.params)
        self.ours = tritonadam.AdamW(self.params, lr=0.01)
        self.theirs = torch.optim.AdamW(self.ref, lr=0.01, fused=True)
        self.gen = torch.Generator().manual_seed(seed + 1)

    def set_grads(self):
        for p, q, g in zip(self.params, self.ref, random_grads(self.params, self.gen)):
            p.grad, q.grad = g.clone(), g.clone()

    def step(self):
        self.ours.step()
        self.theirs.step()


@pytest.mark.parametrize("change", ["in-place", "data-swapped", "data-transposed"])
def test_host_grads_changed_between_clip_and_step_are_stepped_as_they_are(on_host, change):
    """As on the GPU (test_clip.py): the step after a clip reads the grads as they are
    then, also a grad laid out unlike its param, which the host rows read through a copy
    made at the clip's check: changed in place, given other memory under ``.data``
    (both drop the coefficient, with a warning) or re-viewed under its address (the same
    values: kept). max_norm is large (coefficient 1), so torch's in-place clip steps alike."""
    pair = _BesideTorch(on_host, [(4, 4), (5, 3)], seed=36)
    params, ref, ours = pair.params, pair.ref, pair.ours
    # torch's fused CPU AdamW steps a grad laid out unlike its param as if it were not
    # (torch 2.13: 2 * lr off in the first step); its for-loop is the reference here.
    theirs = torch.optim.AdamW(ref, lr=0.01, foreach=False)
    for step in range(3):
        grads = [torch.randn(4, 4, generator=pair.gen).t(), torch.randn(3, 5, generator=pair.gen).t()]
        for p, q, g in zip(params, ref, grads):
            p.grad, q.grad = g.clone().t().contiguous().t(), g.clone().t().contiguous().t()
        ours.clip_grad_norm_(1e9)
        torch.nn.utils.clip_grad_norm_(ref, 1e9)
        if step:
            for p, q in zip(params, ref):
                if change == "in-place":
                    p.grad.mul_(-0.5)
                    q.grad.mul_(-0.5)
                elif change == "data-swapped":
                    new = torch.randn(p.shape[::-1], generator=pair.gen).t()
                    p.grad.data, q.grad.data = new.clone().t().contiguous().t(), new.clone().t().contiguous().t()
                elif p.shape == (4, 4):
                    p.grad.data = p.grad.data.t()
                    q.grad.data = q.grad.data.t()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours.step()
        theirs.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: f"step {step}: {m}")
        dropped = [w for w in caught if "coefficient was dropped" in str(w.message)]
        assert len(dropped) == (step > 0 and change != "data-transposed"), [str(w.message) for w in caught]


def test_fused_clip_belongs_to_the_grads_it_measured(on_host):
    """As on the GPU: zero_grad, replaced grads or grads changed in place drop a pending
    coefficient (the last two with a warning); a second clip before the step measures the clipped grads and compounds;
    error_if_nonfinite raises torch's error and leaves the coefficient as it was."""
    pair = _BesideTorch(on_host, [(6, 5), (11,)], seed=34)
    params, ref, ours, theirs, set_grads = pair.params, pair.ref, pair.ours, pair.theirs, pair.set_grads

    def step_both():
        pair.step()
        assert all(torch.equal(p, q) for p, q in zip(params, ref))

    set_grads()
    ours.clip_grad_norm_(0.1)
    ours.zero_grad()
    set_grads()  # the clipped grads are gone: the step is torch's unclipped one
    step_both()
    ours.clip_grad_norm_(0.1)
    set_grads()  # replaced without zero_grad: likewise, warned (they could be copies)
    with pytest.warns(UserWarning, match="every grad clip_grad_norm_ measured was replaced"):
        step_both()
    ours.clip_grad_norm_(0.1)
    for p, q in zip(params, ref):  # zeroed in place and accumulated again: likewise, warned
        p.grad.zero_()
        p.grad.add_(q.grad)
    with pytest.warns(UserWarning, match="changed in place"):
        step_both()

    set_grads()
    first = ours.clip_grad_norm_(2.0)
    second = ours.clip_grad_norm_(1.0)
    torch.testing.assert_close(first, torch.nn.utils.clip_grad_norm_(ref, 2.0))
    torch.testing.assert_close(second, torch.nn.utils.clip_grad_norm_(ref, 1.0))
    ours.step()
    theirs.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        p.data.copy_(q)  # carry on from torch's bits

    set_grads()
    params[0].grad[0, 0] = ref[0].grad[0, 0] = float("nan")
    ours.clip_grad_norm_(0.1)  # a NaN coefficient, pending
    torch.nn.utils.clip_grad_norm_(ref, 0.1)  # NaN grads
    for clip in (lambda: ours.clip_grad_norm_(0.1, error_if_nonfinite=True),
                 lambda: torch.nn.utils.clip_grad_norm_(ref, 0.1, error_if_nonfinite=True)):
        with pytest.raises(RuntimeError, match="non-finite"):
            clip()
    pair.step()  # the pending coefficient applies: NaN params, as torch's
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)
    assert params[1].isnan().all()


@pytest.mark.parametrize("how", ["explicit", "max_grad_norm"])
def test_fused_clip_over_kernel_and_host_params_is_refused(on_host, device, how):
    """One clip measures one device's grads: with params the kernels step too, it says what
    to do, and writes nothing (also when the cache was built by an unclipped step)."""
    kernel = make_params([(5, 7)], torch.float32, device, seed=36)
    hosted = on_host(make_params([(4, 9)], torch.float32, "cpu", seed=37))
    params = kernel + hosted
    gen = torch.Generator().manual_seed(38)

    def set_grads():
        for p, g in zip(params, random_grads(params, gen)):
            p.grad = g.to(p.device)

    opt = tritonadam.AdamW(params, lr=0.01, **({"max_grad_norm": 1.0} if how == "max_grad_norm" else {}))
    set_grads()
    with pytest.raises(RuntimeError, match="one optimizer per device") as err:
        opt.clip_grad_norm_(1.0) if how == "explicit" else opt.step()
    assert "torch.nn.utils.clip_grad_norm_" in str(err.value)
    assert not any(opt.state.values())
    if how == "explicit":
        opt.step()  # built without clipping
        set_grads()
        before = [p.detach().clone() for p in params]
        with pytest.raises(RuntimeError, match="one optimizer per device"):
            opt.clip_grad_norm_(1.0)
        assert not opt._clipper.pending
        opt.step()  # unclipped, as the refusal left it
        assert not any(torch.equal(p, b) for p, b in zip(params, before))


def test_kernel_and_host_params_in_one_optimizer(on_host, device):
    """Params on the device run the kernels, CPU ones torch's implementation, in one step;
    a checkpoint of both resumes exactly."""
    kernel = make_params([(5, 7), (1031,)], torch.float32, device, seed=12)
    hosted = on_host(make_params([(4, 9), (13,)], torch.float32, "cpu", seed=13))
    ref = clone_params(kernel + hosted)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.5}]  # noqa: E731
    ours = tritonadam.AdamW(groups(kernel + hosted), lr=0.01, **LAUNCH)
    theirs = torch.optim.AdamW(groups(ref), lr=0.01, foreach=False)
    gen = torch.Generator().manual_seed(14)

    def step(opt, params, grads):
        for p, g in zip(params, grads):
            p.grad = g.to(p.device)
        opt.step()

    for _ in range(3):
        grads = random_grads(ref, gen)
        step(ours, kernel + hosted, grads)
        step(theirs, ref, grads)
    for p, q in zip(kernel + hosted, ref):
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), atol=1e-6, rtol=1e-5)
    assert all(ours.state[p]["step"].device.type == "cpu" for p in hosted)
    saved = ours.state_dict()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in kernel + hosted]
    on_host(resumed_params[2:])
    resumed = tritonadam.AdamW(groups(resumed_params), lr=0.01, **LAUNCH)
    resumed.load_state_dict(saved)
    grads = random_grads(ref, gen)
    step(ours, kernel + hosted, grads)
    step(resumed, resumed_params, grads)
    for p, q in zip(kernel + hosted, resumed_params):
        assert torch.equal(p, q)


def test_cached_steps_recheck_every_host_row(on_host):
    """A step reuses the cache while nothing changed, and still checks each host row: a
    param changed under its state, a state tensor changed under its dict, or a grad of
    another shape gets the gathering's error, with nothing written."""
    pair = _BesideTorch(on_host, [(6, 5), (7,)], seed=16)
    params, ref, ours = pair.params, pair.ref, pair.ours

    def step():
        pair.set_grads()
        pair.step()

    step()
    cache = ours._cache
    for _ in range(3):
        step()
        assert ours._cache is cache
    assert all(torch.equal(p, q) for p, q in zip(params, ref))

    def refused(match):
        before = [p.detach().clone() for p in params]
        state = [{k: v.clone() for k, v in ours.state[p].items()} for p in params]
        with pytest.raises(RuntimeError, match=match):
            ours.step()
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        assert all(torch.equal(ours.state[p][k], v) for p, s in zip(params, state) for k, v in s.items())

    def cached():  # a good step rebuilds the cache after a refusal; the next one reuses it
        step()
        cache = ours._cache
        step()
        assert ours._cache is cache

    params[0].grad.data = torch.randn(5, 6)  # through .data: torch's grad setter checks shapes
    refused("grad of shape")
    cached()
    ours.state[params[1]]["exp_avg_sq"].data = torch.zeros(9)
    params[1].grad = torch.randn(7)
    refused(r"state\[.exp_avg_sq.\] has shape \(9,\)")
    ours.state[params[1]]["exp_avg_sq"].data = ours.state[params[1]]["exp_avg"].clone()
    cached()
    params[1].data = torch.randn(9)
    params[1].grad = torch.randn(9)
    refused("the param or this state tensor changed after the state was created")


@pytest.mark.parametrize("dtype, options", [
    (torch.bfloat16, {"master_weights": "remainder"}),
    (torch.float16, {"state_dtype": torch.bfloat16, "max_grad_norm": 1.0}),
    (torch.float32, {"amsgrad": True, "max_grad_norm": 1.0}),
])
def test_a_group_steps_in_chunks_with_the_same_bits(on_host, monkeypatch, dtype, options):
    """The fp32 copies of a step (of low-precision params and moments, of grads to widen,
    unscale or clip) exist for one chunk of rows at a time: each call into torch's
    implementation gets at most host.CHUNK_NUMEL elements (or one larger row), and the
    result is the unchunked step's, bit for bit."""
    def run(chunk_numel):
        monkeypatch.setattr(host, "CHUNK_NUMEL", chunk_numel)
        params = on_host(_odd_params(dtype, seed=40)[0])
        opt = tritonadam.AdamW([{"params": params[:4]}, {"params": params[4:], "lr": 0.02}], lr=0.01,
                               **options)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
        gen = torch.Generator().manual_seed(41)
        for _ in range(3):
            grads = random_grads(params, gen)
            scaler.scale(sum((p.float() * g.float()).sum() for p, g in zip(params, grads))).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return params, opt

    calls = []
    real = host.torch_step
    monkeypatch.setattr(host, "torch_step", lambda algorithm, group, p, *rest, **kw: (
        calls.append([x.numel() for x in p]), real(algorithm, group, p, *rest, **kw))[1])
    chunked, opt = run(40)
    assert len(calls) >= 3 * 4 and all(sum(c) <= 40 or len(c) == 1 for c in calls), calls
    whole, ref = run(1 << 24)
    for p, q in zip(chunked, whole):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, ref.state[q][key]), key


def test_grads_are_not_held_after_the_step(on_host):
    params = on_host(make_params([(6, 5)], torch.float32, "cpu", seed=15))
    opt = tritonadam.Adam(params)
    params[0].grad = torch.randn(6, 5)
    held = weakref.ref(params[0].grad)
    opt.step()
    opt.zero_grad()
    gc.collect()
    assert held() is None


def test_cpu_params_without_the_interpreter_step_like_torch():
    """The real path: no interpreter, CPU params. fused=True AdamW steps bit for bit as
    torch.optim.AdamW(fused=True) does, and max_grad_norm= as torch's clip then that step;
    a format that needs the kernels says so."""
    code = (
        "import torch, tritonadam\n"
        "from tritonadam.kernels.launch import interpreted\n"
        "assert not interpreted()\n"
        "gen = torch.Generator().manual_seed(0)\n"
        "p = torch.nn.Parameter(torch.randn(37, 5, generator=gen)); q = torch.nn.Parameter(p.detach().clone())\n"
        "ours = tritonadam.AdamW([p], lr=0.01, weight_decay=0.1, amsgrad=True, fused=True)\n"
        "theirs = torch.optim.AdamW([q], lr=0.01, weight_decay=0.1, amsgrad=True, fused=True)\n"
        "for _ in range(3):\n"
        "    g = torch.randn(37, 5, generator=gen); p.grad, q.grad = g.clone(), g.clone()\n"
        "    ours.step(); theirs.step()\n"
        "assert torch.equal(p, q), (p - q).abs().max()\n"
        "ours = tritonadam.AdamW([p], lr=0.01, max_grad_norm=0.5)\n"
        "theirs = torch.optim.AdamW([q], lr=0.01, fused=True)\n"
        "for _ in range(3):\n"
        "    g = torch.randn(37, 5, generator=gen); p.grad, q.grad = g.clone(), g.clone()\n"
        "    norm = torch.nn.utils.clip_grad_norm_([q], 0.5)\n"
        "    ours.step(); theirs.step()\n"
        "    assert torch.equal(ours.last_grad_norm, norm) and norm > 0.5\n"
        "assert torch.equal(p, q), (p - q).abs().max()\n"
        "b = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16)); b.grad = torch.randn(8, dtype=torch.bfloat16)\n"
        "try:\n"
        "    tritonadam.AdamW([b], state_dtype='8bit').step()\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
        "print('stepped')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "stepped" in out.stdout
    assert "state_dtype='8bit'" in out.stdout and "needs the GPU kernels" in out.stdout
    assert "torch.optim.AdamW(..., fused=True)" in out.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_steps_bump_the_params_version_as_torch_does(on_host, dtype):
    """torch's fused CPU kernel leaves the version counter of a contiguous fp32 param as it
    was; the host path bumps it, as torch.optim's default step does, so a backward through
    a graph that saved the param before the step raises."""
    gen = torch.Generator().manual_seed(11)
    w = on_host([torch.nn.Parameter(torch.randn(4, 4, generator=gen).to(dtype))])[0]
    x = torch.randn(3, 4, generator=gen).to(dtype)
    opt = PAIRS["AdamW"][0]([w], lr=0.1, **LAUNCH)
    for cached_steps in (0, 2):  # the first step's full check, then cached steps
        assert_backward_through_a_stepped_param_raises(opt, w, x, gen, cached_steps)
