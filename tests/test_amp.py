"""torch.amp.GradScaler and torch.compile with tritonadam (issue 5).

Device-generic: Triton's CPU interpreter by default, a GPU with TRITONADAM_TEST_DEVICE=cuda.

tritonadam sets ``_step_supports_amp_scaling = True``: GradScaler does not unscale the
grads itself but sets ``optimizer.grad_scale`` (None after a user ``unscale_``) and
``optimizer.found_inf`` before ``step()``. The kernel unscales on the fly and skips the
whole update (params, state, step counts) when ``found_inf`` is set, without a host sync;
a step it took leaves ``.grad`` unscaled, as torch's fused step does. The reference is ``torch.optim`` (``foreach=False``) driven by
a GradScaler of its own, which unscales that optimizer's grads in place.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tritonadam

LAUNCH = {"block_size": 16384, "num_warps": 4}
TOL = {"atol": 1e-6, "rtol": 1e-5}

VARIANTS = {
    # id: (our class, torch class, kwargs for both, param dtype, our extra kwargs)
    "AdamW": (tritonadam.AdamW, torch.optim.AdamW, {"weight_decay": 0.1}, torch.float32, {}),
    "Adam-amsgrad": (tritonadam.Adam, torch.optim.Adam, {"amsgrad": True}, torch.float32, {}),
    "Adamax": (tritonadam.Adamax, torch.optim.Adamax, {"weight_decay": 0.01}, torch.float32, {}),
    "AdamW-bf16-master": (tritonadam.AdamW, torch.optim.AdamW, {}, torch.bfloat16,
                          {"master_weights": True}),
    "Adam-fp16": (tritonadam.Adam, torch.optim.Adam, {"weight_decay": 0.01}, torch.float16, {}),
}


def make_model(device, dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    # Odd sizes; a 1-element bias: tensors of several shapes in one launch.
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 1)).to(device, dtype)


def batch(step: int, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(5, 7, generator=gen), torch.randn(5, 1, generator=gen)
    return x.to(device, dtype), y.to(device, dtype)


def backward(model, scaler, step, *, poison=None, dtype=torch.float32):
    """Scaled backward; ``poison`` = inf or nan written into one grad element."""
    x, y = batch(step, dtype, next(model.parameters()).device)
    loss = (model(x) - y).float().square().mean()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if poison is not None:
        model[0].weight.grad[1, 2] = poison
    return loss.detach()


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy({i: opt.state[p] for i, p in enumerate(model.parameters()) if p in opt.state})
    return params, state


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (torch.equal says NaN != NaN)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def assert_same(model, opt, before, what=""):
    params, state = before
    for i, (p, q) in enumerate(zip(model.parameters(), params)):
        assert same_bits(p.detach(), q), f"{what}: param {i} changed"
        for key, value in state.get(i, {}).items():
            assert same_bits(opt.state[p][key], value), f"{what}: state {i}.{key} changed"


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def unscaled(g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``g`` times GradScaler.unscale_'s factor (the fp32 reciprocal of the scale, taken in
    fp64), in fp32 (fp64 for fp64 grads) and rounded to ``g``'s dtype."""
    inv = (1.0 / scale.detach().cpu().double()).float()
    wide = torch.float64 if g.dtype == torch.float64 else torch.float32
    return (g.detach().cpu().to(wide) * inv.to(wide)).to(g.dtype)


def watch_grads(opt, model) -> list[str]:
    """Check, around every ``opt.step()``, what the step leaves in ``.grad``: the grads
    unscaled where GradScaler handed the step its scale and found no inf (as torch's fused
    step and GradScaler.unscale_ leave them), bit for bit as the step found them otherwise
    (a skipped step, a step after ``unscale_``, a step without a scaler). (Hooks, not a
    copy taken before ``scaler.step``: GradScaler's own inf check multiplies the grads by
    1.0 in place, which may change a NaN's bits.)"""
    errors: list[str] = []
    taken: list = []

    def pre(o, args, kwargs):
        scale, found_inf = getattr(o, "grad_scale", None), getattr(o, "found_inf", None)
        skipped = found_inf is not None and found_inf.item() != 0
        taken.append((grads(model), None if skipped else scale))

    def post(o, args, kwargs):
        before, scale = taken.pop()
        for i, (p, g) in enumerate(zip(model.parameters(), before)):
            want = g if scale is None else unscaled(g, scale)
            if not same_bits(p.grad.cpu(), want.cpu()):
                errors.append(f"grad {i}: step() left {p.grad.flatten()[:3]}, expected {want.flatten()[:3]}")

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    return errors


@pytest.mark.parametrize("poison", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_found_inf_skips_the_whole_step(variant, poison, device):
    ours_cls, _, kw, dtype, extra = VARIANTS[variant]
    if device.type == "cuda" and dtype == torch.bfloat16:
        pytest.skip("torch's GradScaler cannot check bf16 grads on CUDA "
                    "(_amp_foreach_non_finite_check_and_unscale_cuda has no BFloat16 kernel)")
    model = make_model(device, dtype)
    opt = ours_cls(model.parameters(), lr=1e-2, **kw, **extra, **LAUNCH)
    written = watch_grads(opt, model)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    for step in range(2):
        opt.zero_grad()
        backward(model, scaler, step, dtype=dtype)
        scaler.step(opt)
        scaler.update()
    assert all(opt.state[p]["step"].item() == 2 for p in model.parameters())

    opt.zero_grad()
    backward(model, scaler, 2, poison=poison, dtype=dtype)
    before = snapshot(model, opt)
    scaler.step(opt)
    assert_same(model, opt, before, f"{variant} skipped step")
    assert sum(v.item() for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values()) == 1
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # GradScaler cleans up
    scaler.update()
    assert scaler.get_scale() == 2.0**11

    # The next clean step goes through and counts as step 3.
    opt.zero_grad()
    backward(model, scaler, 3, dtype=dtype)
    before = snapshot(model, opt)
    scaler.step(opt)
    scaler.update()
    assert all(opt.state[p]["step"].item() == 3 for p in model.parameters())
    assert not torch.equal(next(model.parameters()), before[0][0])
    assert not written


@pytest.mark.parametrize("variant", [v for v in VARIANTS if VARIANTS[v][3] == torch.float32])
def test_gradscaler_parity_with_torch(variant, device):
    """8 steps with a growing scale that is not a power of two (so unscaling rounds) and
    an inf at step 4; params, state and scale follow torch.optim + GradScaler."""
    ours_cls, torch_cls, kw, dtype, extra = VARIANTS[variant]
    model = make_model(device)
    ref_model = copy.deepcopy(model)
    opt = ours_cls(model.parameters(), lr=1e-2, **kw, **LAUNCH)
    ref = torch_cls(ref_model.parameters(), lr=1e-2, **kw, foreach=False)
    written = watch_grads(opt, model)
    scalers = [torch.amp.GradScaler(device.type, init_scale=3000.0, growth_interval=2) for _ in range(2)]
    for step in range(8):
        poison = float("inf") if step == 4 else None
        for m, o, s in ((model, opt, scalers[0]), (ref_model, ref, scalers[1])):
            o.zero_grad()
            backward(m, s, step, poison=poison)
            s.step(o)
            s.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, **TOL)
            for key, value in ref.state[q].items():
                torch.testing.assert_close(opt.state[p][key].cpu(), value.cpu(), **TOL)
    assert scalers[0].get_scale() != 3000.0  # it grew and backed off along the way
    assert all(opt.state[p]["step"].item() == 7 for p in model.parameters())
    assert not written


@pytest.mark.parametrize("poison", [None, float("inf")], ids=["finite", "inf"])
def test_unscale_first_then_clip_and_step(poison, device):
    """scaler.unscale_(opt) + clip_grad_norm_ before scaler.step: GradScaler then passes
    grad_scale=None (grads are already unscaled) and the step must not unscale again."""
    model = make_model(device)
    ref_model = copy.deepcopy(model)
    opt = tritonadam.AdamW(model.parameters(), lr=1e-2, **LAUNCH)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    written = watch_grads(opt, model)
    seen = []
    opt.register_step_pre_hook(
        lambda o, args, kwargs: seen.append((getattr(o, "grad_scale", "unset"), getattr(o, "found_inf", "unset")))
    )
    scalers = [torch.amp.GradScaler(device.type, init_scale=1024.0) for _ in range(2)]
    for step in range(4):
        for m, o, s in ((model, opt, scalers[0]), (ref_model, ref, scalers[1])):
            o.zero_grad()
            backward(m, s, step, poison=poison if step == 2 else None)
            s.unscale_(o)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            s.step(o)
            s.update()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, **TOL)
    assert [s[0] for s in seen] == [None] * 4
    assert all(torch.is_tensor(s[1]) for s in seen)
    assert not written
    expected = 3 if poison is not None else 4
    assert all(opt.state[p]["step"].item() == expected for p in model.parameters())
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for key, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key].cpu(), value.cpu(), **TOL)


def test_instance_can_opt_out_of_in_kernel_unscaling(device):
    """``opt._step_supports_amp_scaling = False`` on an instance (for frameworks that refuse
    gradient clipping with such optimizers, or detect skipped steps by whether step() ran):
    GradScaler then unscales .grad itself and skips step() on inf, like any optimizer."""
    model = make_model(device)
    ref_model = copy.deepcopy(model)
    opt = tritonadam.AdamW(model.parameters(), lr=1e-2, **LAUNCH)
    opt._step_supports_amp_scaling = False
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(hasattr(o, "grad_scale")))
    scalers = [torch.amp.GradScaler(device.type, init_scale=3000.0) for _ in range(2)]
    for step in range(4):
        for m, o, s in ((model, opt, scalers[0]), (ref_model, ref, scalers[1])):
            o.zero_grad()
            backward(m, s, step, poison=float("inf") if step == 1 else None)
            s.step(o)
            s.update()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, **TOL)
    assert calls == [False] * 3  # step() not called on the inf step; never given grad_scale
    assert all(opt.state[p]["step"].item() == 3 for p in model.parameters())


def test_the_opt_out_reads_the_same_through_a_subclassing_wrapper():
    """Lightning's ``LightningOptimizer`` subclasses the optimizer's class and forwards
    the attributes it lacks: the opt-out set on the optimizer (docs/integration.md's
    Lightning recipe) must read False through it, as torch's fused AdamW's does, and one
    set through it must reach the optimizer (it stayed on the wrapper's own dict)."""
    class Wrapped:
        def __init__(self, optimizer):
            self._optimizer = optimizer
            self.__class__ = type("Lightning" + type(optimizer).__name__, (type(self), type(optimizer)), {})

        def __getattr__(self, item):
            return getattr(self._optimizer, item)

    for make in (lambda ps: torch.optim.AdamW(ps, fused=True), tritonadam.AdamW):
        opt = make([nn.Parameter(torch.randn(3))])
        opt._step_supports_amp_scaling = False
        assert Wrapped(opt)._step_supports_amp_scaling is False, make
    opt = tritonadam.AdamW([nn.Parameter(torch.randn(3))])
    Wrapped(opt)._step_supports_amp_scaling = False
    assert opt._step_supports_amp_scaling is False


@pytest.mark.parametrize("how", ["added", "switched"])
def test_a_differentiable_group_made_later_is_unscaled_by_the_scaler(how, device):
    """torch.optim's implementation steps differentiable=True groups and neither unscales
    nor skips: with such a group added (add_param_group) or switched on by hand after
    construction, GradScaler must unscale and skip, as when built with it. Reference:
    torch.optim.AdamW, whose groups are all unscaled by its scaler."""
    results = []
    for cls in (tritonadam.AdamW, torch.optim.AdamW):
        model = make_model(device)
        head, body = list(model[2].parameters()), list(model[0].parameters())
        kw = LAUNCH if cls is tritonadam.AdamW else {"foreach": False}
        opt = cls(body if how == "added" else [{"params": body}, {"params": head}], lr=1e-2, **kw)
        if how == "added":
            opt.add_param_group({"params": head, "differentiable": True})
        else:
            opt.param_groups[1]["differentiable"] = True
        scaler = torch.amp.GradScaler(device.type, init_scale=1024.0)
        for step in range(3):
            opt.zero_grad()
            backward(model, scaler, step, poison=float("inf") if step == 1 else None)
            scaler.step(opt)
            scaler.update()
        results.append((model, opt))
    (ours, opt), (theirs, ref) = results
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, **TOL)
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item() == 2


def test_no_scaler(device):
    model = make_model(device)
    ref_model = copy.deepcopy(model)
    opt = tritonadam.AdamW(model.parameters(), lr=1e-2, **LAUNCH)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    written = watch_grads(opt, model)
    for step in range(4):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            backward(m, None, step)
            o.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, **TOL)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert not written


def test_disabled_scaler_is_a_plain_step(device):
    """GradScaler(enabled=False) calls step() straight through: no attributes set."""
    model = make_model(device)
    ref_model = copy.deepcopy(model)
    opt = tritonadam.AdamW(model.parameters(), lr=1e-2, **LAUNCH)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    for step in range(3):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            backward(m, scaler, step)
            scaler.step(o)
            scaler.update()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("with_scaler", [False, True], ids=["plain", "gradscaler+sched"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_train_step(backend, with_scaler, device):
    """A torch.compile'd function doing forward, backward, opt.step() (or scaler.step,
    scaler.update and an LR scheduler step) and zero_grad(): Dynamo must not trace into
    the Triton launch (step is marked torch._disable_dynamo, as torch.optim's) and the
    result must track the same function run eagerly."""
    torch._dynamo.reset()
    model = make_model(device)
    eager_model = copy.deepcopy(model)
    opt = tritonadam.AdamW(model.parameters(), lr=1e-2, **LAUNCH)
    eager_opt = tritonadam.AdamW(eager_model.parameters(), lr=1e-2, **LAUNCH)

    def extras(o):
        if not with_scaler:
            return None, None
        return (torch.amp.GradScaler(device.type, init_scale=1024.0, growth_interval=2),
                torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)))

    def train_step(m, o, scaler, sched, x, y):
        loss = (m(x) - y).square().mean()
        if scaler is None:
            loss.backward()
            o.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
            sched.step()
        o.zero_grad()
        return loss

    compiled = torch.compile(train_step, backend=backend)
    args, eager_args = extras(opt), extras(eager_opt)
    for step in range(4):
        x, y = batch(step, device=device)
        try:
            loss = compiled(model, opt, *args, x, y)
        except Exception as err:  # noqa: BLE001 - only a missing toolchain is skipped
            if backend == "inductor" and any(
                word in str(err).lower() for word in ("compiler", "cpp", "gcc", "c++", "invalidcxx")
            ):
                pytest.skip(f"inductor cannot build CPU kernels here: {str(err)[:200]}")
            raise
        eager_loss = train_step(eager_model, eager_opt, *eager_args, x, y)
        # Inductor may fuse the forward/backward differently from eager: not bitwise.
        torch.testing.assert_close(loss, eager_loss, **TOL)
        for p, q in zip(model.parameters(), eager_model.parameters()):
            torch.testing.assert_close(p, q, **TOL)
    assert all(opt.state[p]["step"].item() == 4 for p in model.parameters())
    if with_scaler:
        assert args[0].get_scale() == 4096.0 and opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    torch._dynamo.reset()


def test_state_dict_calls_inside_a_compiled_function_run_eagerly(device):
    """``load_state_dict``, ``state_dict``, ``torch_state_dict`` and ``add_param_group``
    are marked ``torch._disable_dynamo``, as torch.optim's are: called inside a compiled
    function they run eagerly, without Dynamo's warning about the frame inspection they
    do (it told users to file an issue with PyTorch), and the resumed steps are eager's."""
    import warnings

    torch._dynamo.reset()
    p = nn.Parameter(torch.randn(40, device=device))
    q = nn.Parameter(torch.randn(6, device=device))
    opt = tritonadam.AdamW([p], lr=1e-2, state_dtype="8bit", **LAUNCH)
    p.grad = torch.randn_like(p)
    opt.step()
    p.grad = None
    saved = copy.deepcopy(opt.state_dict())
    twin_p, twin_q = nn.Parameter(p.detach().clone()), nn.Parameter(q.detach().clone())
    twin = tritonadam.AdamW([twin_p], lr=1e-2, state_dtype="8bit", **LAUNCH)

    def resume(o, a, b, saved):
        o.load_state_dict(saved)
        o.add_param_group({"params": [b]})
        (a * a).sum().backward()
        (b * b).sum().backward()
        o.step()
        o.zero_grad()
        return o.state_dict(), o.torch_state_dict()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, got_full = torch.compile(resume, backend="eager")(opt, p, q, saved)
    resume(twin, twin_p, twin_q, saved)
    assert not [w for w in caught if "Dynamo" in str(w.message)], [str(w.message) for w in caught]
    assert torch.equal(p, twin_p) and torch.equal(q, twin_q)
    assert torch.equal(got["state"][0]["exp_avg_8bit"], twin.state_dict()["state"][0]["exp_avg_8bit"])
    assert torch.equal(got_full["state"][1]["exp_avg"], twin.torch_state_dict()["state"][1]["exp_avg"])
    torch._dynamo.reset()


def test_non_finite_values_step_without_warnings(device):
    """GradScaler skipping the very first step (an inf grad at the init scale: step count
    0), inf and NaN grads without a scaler, and a clip of a tiny norm order: the values are
    torch's, and nothing warns, as with torch (the interpreter computed discarded
    ``tl.where`` branches and non-finite values with numpy, which warned)."""
    import warnings

    def grads(n):
        g = torch.randn(n, generator=torch.Generator().manual_seed(n))
        g[1], g[2] = float("inf"), float("nan")
        return g.to(device)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = nn.Parameter(torch.ones(300, device=device))
        opt = tritonadam.AdamW([p], lr=1e-2, **LAUNCH)
        scaler = torch.amp.GradScaler(device.type)
        scaler.scale(torch.ones((), device=device))  # the scale lives on the device now
        p.grad = grads(300)
        scaler.step(opt)
        scaler.update()
        assert torch.equal(p.detach(), torch.ones_like(p)) and opt.state[p]["step"].item() == 0
        q = nn.Parameter(torch.ones(300, device=device))
        opt2 = tritonadam.Adam([q], lr=1e-2, weight_decay=0.1, **LAUNCH)
        q.grad = grads(300)
        opt2.clip_grad_norm_(1.0, norm_type=0.001)
        opt2.step()
    r = nn.Parameter(torch.ones(300))
    theirs = torch.optim.Adam([r], lr=1e-2, weight_decay=0.1, foreach=False)
    r.grad = grads(300).cpu()
    torch.nn.utils.clip_grad_norm_([r], 1.0, norm_type=0.001)
    theirs.step()
    assert torch.equal(q.detach().cpu().isnan(), r.detach().isnan())  # a NaN norm spreads in both


# What a step GradScaler hands its scale leaves in .grad, in every precision mode and for
# grads the kernels read through a copy: (class, param dtype, grad dtype, options).
UNSCALE_MODES = {
    "fp32-maximize-fused-clip": (tritonadam.Adam, torch.float32, None, {"maximize": True, "max_grad_norm": 0.5}),
    "fp32-bf16-grads-explicit-clip": (tritonadam.AdamW, torch.float32, torch.bfloat16, {}),
    "bf16-8bit-remainder": (tritonadam.AdamW, torch.bfloat16, None,
                            {"state_dtype": "8bit", "master_weights": "remainder"}),
    "fp16-4bit-sr-amsgrad": (tritonadam.Adam, torch.float16, None,
                             {"state_dtype": "4bit", "stochastic_rounding": True, "amsgrad": True}),
    "bf16-fp32-grads-bf16-state-sr-adamax": (tritonadam.Adamax, torch.bfloat16, torch.float32,
                                              {"state_dtype": torch.bfloat16, "stochastic_rounding": True}),
    "fp16-master": (tritonadam.AdamW, torch.float16, None, {"master_weights": True}),
    "fp64": (tritonadam.AdamW, torch.float64, None, {}),
}


@pytest.mark.parametrize("mode", list(UNSCALE_MODES))
def test_a_step_leaves_the_grads_unscaled(mode, device):
    """torch's fused step writes each grad back unscaled when GradScaler hands it its scale
    (test_cuda's fused-optimizer GradScaler tests compare .grad after scaler.step): so does
    this step, bit for bit as GradScaler.unscale_ would have left them, in every precision
    mode, with a clip pending (the clip's coefficient is not written), for grads read
    through a copy (another layout than the param's, a strided view) and for a transposed
    param; a step the scaler skips leaves them as they were. A scale that is
    not a power of two, so unscaling rounds."""
    cls, dtype, grad_dtype, options = UNSCALE_MODES[mode]
    grad_dtype = grad_dtype or dtype
    if device.type == "cuda" and grad_dtype == torch.bfloat16:
        pytest.skip("torch's GradScaler cannot check bf16 grads on CUDA "
                    "(_amp_foreach_non_finite_check_and_unscale_cuda has no BFloat16 kernel)")
    gen = torch.Generator().manual_seed(11)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    params = [nn.Parameter(draw(*s).to(device)) for s in ((7, 3), (1000,), (5,))]
    params.append(nn.Parameter(draw(4, 6).to(device).t()))  # a transposed param
    for p in params:
        p.grad_dtype = grad_dtype  # torch refuses a grad of another dtype otherwise
    opt = cls(params, lr=1e-2, **options, **LAUNCH)
    scaler = torch.amp.GradScaler(device.type, init_scale=3000.0, growth_interval=1)
    for step in range(4):
        grads = [(draw(*p.shape).to(grad_dtype) * 3000).to(device) for p in params]
        if step == 2:
            grads[1][3] = float("inf")
        grads[0] = grads[0].t().contiguous().t()  # another layout than its param's
        wide = torch.stack([grads[2], torch.full_like(grads[2], 7.0)], 1)
        grads[2] = wide[:, 0]  # a strided view of a wider buffer, whose other half stays as it is
        for p, g in zip(params, grads):
            p.grad = g
        scaler.scale(torch.ones((), device=device))
        if "explicit-clip" in mode:
            opt.clip_grad_norm_(0.5, scaler=scaler)
        taken = [g.detach().clone() for g in grads]
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        for i, (p, g) in enumerate(zip(params, taken)):
            want = g if step == 2 else unscaled(g, torch.tensor(scale))
            assert p.grad is grads[i]
            assert same_bits(p.grad.cpu().contiguous(), want.cpu().contiguous()), (mode, step, i)
        assert (wide[:, 1] == 7.0).all()
    assert all(opt.state[p]["step"].item() == 3 for p in params)
