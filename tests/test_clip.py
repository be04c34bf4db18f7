"""Gradient-norm clipping fused into the step: ``opt.clip_grad_norm_`` and ``max_grad_norm=``.

The reference is ``torch.nn.utils.clip_grad_norm_`` (which scales ``.grad`` in place)
followed by ``torch.optim.AdamW(foreach=False)``; for fp16/bf16 params, the plain-torch
reference of tests/reference.py fed the grads times the coefficient torch's formula gives
for our norm (bit for bit). Ours must return the same total norm, never write ``.grad``,
and step to the same params. Launch counts are in test_launches.py, FSDP2 in
test_fsdp.py, CUDA graphs in test_cuda_graphs.py, compiled code in test_aot.py.

Device-generic: Triton's CPU interpreter by default, a GPU with TRITONADAM_TEST_DEVICE=cuda
(the ``device`` fixture). Random values are drawn on the CPU and moved, so both runs see
the same numbers. torch's references for plain params and grads run on the CPU from CPU
copies (one fixed oracle on every machine) and results are compared there; the GradScaler
tests, whose grads come from a model's backward, run torch's model on the same device as
ours so that both get the same grads bit for bit (as in test_amp.py).
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_map_only

import tritonadam
from reference import Reference, assert_same_bits

LAUNCH = {"block_size": 16384, "num_warps": 4}
TOL = {"atol": 1e-6, "rtol": 1e-5}
INF = float("inf")
# Odd sizes, several norm blocks (16384 elements in the interpreter, 4096 on a GPU) plus a
# tail, 0-dim and empty.
SHAPES = [(), (1,), (7,), (0,), (3, 5), (16384,), (40000,), (2, 0, 3), (4, 3, 50)]
FROZEN, SOMETIMES, MISALIGNED = 1, 2, 6  # no grad ever; no grad every other step; odd view


def _params(shapes, device, seed=0, dtypes=None):
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtypes or [torch.float32] * len(shapes)
    return [nn.Parameter(torch.randn(s, generator=gen).to(d).to(device)) for s, d in zip(shapes, dtypes)]


def _grad(shape, gen, scale, dtype=torch.float32, misaligned=False, device="cpu"):
    """Drawn on the CPU (``gen`` is a CPU generator), then moved to ``device``."""
    numel = math.prod(shape)
    if misaligned:
        # A view one element into its storage: the norm kernel's masked path, full blocks too.
        # Moved before slicing, so the view is misaligned on the device too.
        return (torch.randn(numel + 1, generator=gen) * scale).to(dtype).to(device)[1:].view(shape)
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)


def _cpu_params(params):
    """torch's reference params: CPU copies."""
    return [nn.Parameter(p.detach().cpu().clone()) for p in params]


def _cpu_grad(g):
    """A CPU copy of a grad for torch's reference (a copy on the CPU too: torch's clip
    scales it in place)."""
    return None if g is None else g.cpu().clone()


def _fresh_grads(params, ref, gen, scale, device):
    """New grads drawn on the CPU for ``params`` (moved to ``device``), and CPU copies of
    them for torch's reference params ``ref``."""
    for p, q in zip(params, ref):
        p.grad = _grad(p.shape, gen, scale, device=device)
        q.grad = _cpu_grad(p.grad)


def _assert_close(actual, expected, **kw):
    """torch.testing.assert_close, compared on the CPU (ours may live on the GPU)."""
    torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), **kw)


def _same_grads(params, before):
    return all(p.grad is None and b is None or torch.equal(p.grad, b) for p, b in zip(params, before))


OPTIMIZERS = {
    "AdamW": (tritonadam.AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "Adamax-maximize": (tritonadam.Adamax, torch.optim.Adamax, {"lr": 1e-2, "maximize": True}),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("norm_type", [2.0, INF, 3.0, 0.5], ids=["l2", "inf", "p3", "p0.5"])
def test_matches_torch_clip_and_step(norm_type, name, device, recwarn):
    """Several steps, alternating grads far above and far below max_norm, so clipping takes
    effect on some steps and not on others; a frozen param, one without a grad every other
    step, a misaligned grad, odd sizes and (finite norms; torch's inf norm refuses them)
    empty tensors. Nothing warns (the p-norm's log2 of a zero once made the interpreter's
    numpy warn)."""
    shapes = [s for s in SHAPES if norm_type != INF or math.prod(s) > 0]
    params = _params(shapes, device)
    ref = _cpu_params(params)
    ours_cls, torch_cls, kw = OPTIMIZERS[name]
    opt = ours_cls(params, **kw, **LAUNCH)
    torch_opt = torch_cls(ref, **kw, foreach=False)
    gen = torch.Generator().manual_seed(1)
    max_norm, clipped = 1.0, []
    for step in range(4):
        scale = 3.0 if step % 2 == 0 else 1e-4
        for i, (p, q) in enumerate(zip(params, ref)):
            has = i != FROZEN and not (i == SOMETIMES and step % 2)
            g = _grad(p.shape, gen, scale, misaligned=i == MISALIGNED, device=device) if has else None
            p.grad, q.grad = g, _cpu_grad(g)
        before = [None if p.grad is None else p.grad.clone() for p in params]
        norm = opt.clip_grad_norm_(max_norm, norm_type)
        expected = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
        assert norm.dtype == torch.float32 and norm.shape == () and opt.last_grad_norm is norm
        assert norm.device == params[0].device
        if norm_type == INF:
            assert torch.equal(norm.cpu(), expected)  # a max is exact
        else:
            # The root (power 1/p) multiplies the sum's relative error by 1/p: torch's sum
            # of fp32 per-tensor norms is the less exact one.
            _assert_close(norm, expected, rtol=2e-6 * max(1.0, 2.5 / norm_type), atol=0)
        assert _same_grads(params, before), "clip_grad_norm_ wrote .grad"
        clipped.append(bool(norm > max_norm))
        assert clipped[-1] == bool(expected > max_norm)
        opt.step()
        torch_opt.step()
        assert _same_grads(params, before), "step wrote .grad"
        for p, q in zip(params, ref):
            _assert_close(p, q, **TOL)
    # (p < 1 sums many small terms into a large norm: every step clips.)
    assert clipped == ([True, False, True, False] if norm_type >= 1 else [True] * 4)
    assert params[FROZEN] not in opt.state
    assert opt.state[params[SOMETIMES]]["step"].item() == 2
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]


def test_grads_read_through_copies_are_measured(device):
    """Rows the step reads through a copy: a non-dense param (strided, stepped in a
    staging copy) and a grad laid out unlike its param (read through a dense copy) are
    measured like the rest, and stepped like torch."""
    gen = torch.Generator().manual_seed(15)
    params = [nn.Parameter(torch.randn(6, 10, generator=gen).to(device)[:, ::2]),  # gaps: not dense
              nn.Parameter(torch.randn(4, 5, generator=gen).to(device)),
              nn.Parameter(torch.randn(300, generator=gen).to(device))]
    ref = _cpu_params(params)
    opt = tritonadam.AdamW(params, lr=1e-2, **LAUNCH)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for step in range(2):
        grads = [_grad((6, 5), gen, 3.0, device=device), _grad((5, 4), gen, 3.0, device=device).t(),
                 _grad((300,), gen, 3.0, device=device)]
        for p, q, g in zip(params, ref, grads):
            p.grad, q.grad = g, _cpu_grad(g)
        norm = opt.clip_grad_norm_(1.0)
        expected = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        _assert_close(norm, expected, rtol=2e-6, atol=0)
        assert norm > 1.0
        opt.step()
        torch_opt.step()
        for p, q in zip(params, ref):
            _assert_close(p, q, **TOL)


@pytest.mark.parametrize("change", ["in-place", "data-swapped", "data-transposed"])
def test_grads_changed_between_clip_and_step_are_stepped_as_they_are(change, device):
    """The step after a clip reads every grad as it is then, also where it reads one
    through a copy (a grad laid out unlike its param: the clip's check made the copy) or
    steps a non-contiguous param: a grad changed in place since (the coefficient dropped,
    with a warning), given other memory under ``.data`` (dropped, with a warning: the clip
    measured other values) or re-viewed under its address in another layout (``g.data =
    g.data.t()``: the same values, so the coefficient stays; no version bump tells) is
    stepped as torch steps it. max_norm is large (coefficient 1), so torch's in-place
    clip and the dropped coefficient step alike."""
    gen = torch.Generator().manual_seed(16)
    cl = torch.channels_last
    params = [nn.Parameter(torch.randn(4, 4, generator=gen).to(device)),
              nn.Parameter(torch.randn(5, 4, generator=gen).to(device)),
              nn.Parameter(torch.randn(3, 2, 2, 2, generator=gen).to(device).to(memory_format=cl)),
              nn.Parameter(torch.randn(300, generator=gen).to(device))]
    ref = _cpu_params(params)
    opt = tritonadam.AdamW(params, lr=1e-2, **LAUNCH)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for step in range(3):
        grads = [_grad((4, 4), gen, 3.0, device=device), _grad((4, 5), gen, 3.0, device=device).t(),
                 _grad((3, 2, 2, 2), gen, 3.0, device=device).to(memory_format=cl),
                 _grad((300,), gen, 3.0, device=device)]
        for p, q, g in zip(params, ref, grads):
            p.grad, q.grad = g, _cpu_grad(g)
        _assert_close(opt.clip_grad_norm_(1e9), torch.nn.utils.clip_grad_norm_(ref, 1e9), rtol=2e-6, atol=0)
        if step:  # the first step caches the tables; the later ones are the clips' fast path
            for i, (p, q) in enumerate(zip(params, ref)):
                if change == "in-place":
                    p.grad.mul_(-0.5)
                    q.grad.mul_(-0.5)
                elif change == "data-swapped" and i in (1, 2):  # rows checked one by one
                    new = torch.empty_like(p.grad).copy_(torch.randn(p.shape, generator=gen).to(device))
                    p.grad.data = new
                    q.grad.data = _cpu_grad(new)
                elif change == "data-transposed" and i == 0:  # a square grad re-viewed under its address
                    p.grad.data = p.grad.data.t()
                    q.grad.data = q.grad.data.t()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the same warning from the same line each step
            opt.step()
        torch_opt.step()
        for p, q in zip(params, ref):
            _assert_close(p, q, **TOL)
        dropped = [w for w in caught if "coefficient was dropped" in str(w.message)]
        assert len(dropped) == (step > 0 and change != "data-transposed"), [str(w.message) for w in caught]


@pytest.mark.parametrize("norm_type", [2.0, INF], ids=["l2", "inf"])
def test_mixed_dtypes_step_bit_for_bit(norm_type, device):
    """fp32, bf16 and fp16 params, fp32 grads on bf16/fp16 params, bf16 grads on an fp32
    param, master weights, a frozen param: the norm is the fp64 norm of all grads to fp32
    accuracy (exact for inf), and every param equals the reference fed ``g * coef``."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    pairs = [(f32, f32), (f32, bf16), (bf16, bf16), (bf16, f32), (f16, f16), (f16, f32), (bf16, bf16)]
    frozen = len(pairs) - 1
    shapes = [(33,), (5, 7), (16385,), (300,), (1,), (20000,), (9,)]
    params = _params(shapes, device, seed=3, dtypes=[p for p, _ in pairs])
    for p, (_, g) in zip(params, pairs):
        p.grad_dtype = g  # torch refuses a grad of another dtype otherwise
    kw = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    opt = tritonadam.AdamW(params, master_weights=True, **kw, **LAUNCH)
    refs = [Reference(p, "adam", master=True) for p in params]
    gen = torch.Generator().manual_seed(4)
    max_norm = 2.0
    for step in range(3):
        scale = 5.0 if step != 1 else 1e-3
        grads = [None if i == frozen else _grad(p.shape, gen, scale, g, device=device) for i, (p, (_, g)) in
                 enumerate(zip(params, pairs))]
        for p, g in zip(params, grads):
            p.grad = g
        norm = opt.clip_grad_norm_(max_norm, norm_type)
        flat = torch.cat([g.cpu().double().reshape(-1) for g in grads if g is not None])
        exact = flat.abs().max() if norm_type == INF else flat.norm()
        if norm_type == INF:
            assert norm.item() == exact.item()
        else:
            _assert_close(norm.double(), exact, rtol=1e-6, atol=0)
        assert (norm > max_norm) == (step != 1)
        coef = torch.clamp(max_norm / (norm.cpu() + 1e-6), max=1.0)  # torch's formula, fp32
        opt.step()
        for i, (p, r, g) in enumerate(zip(params, refs, grads)):
            if g is not None:
                expected = r.update(g.cpu().float() * coef, 1e-2, 0.9, 0.999, 1e-8, 0.1, decoupled=True)
                assert_same_bits(p, expected)
        assert params[frozen] not in opt.state


def test_norm_bits_are_deterministic_and_ignore_the_launch_config(device):
    """Many tensors of two grad dtypes (several chunks of blocks per launch): the same
    grads give the same norm bits on every call, whatever the optimizer's update launch
    config (block size, warps, persistent grid), for the 2-norm and a general p."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(int(n),) for n in torch.randint(1, 3000, (40,), generator=gen)] + [(50000,)]
    base = _params(shapes, device, seed=6, dtypes=[torch.float32, torch.bfloat16] * 20 + [torch.float32])
    grads = [_grad(p.shape, gen, 1.0, p.dtype, device=device) for p in base]
    configs = [LAUNCH, {"block_size": 1024, "num_warps": 2, "persistent": True}]
    flat = torch.cat([g.cpu().double().reshape(-1) for g in grads])
    for norm_type in (2.0, 3.0):
        seen = []
        for config in configs:
            params = [nn.Parameter(p.detach().clone()) for p in base]
            for p, g in zip(params, grads):
                p.grad = g
            opt = tritonadam.AdamW(params, **config)
            seen += [opt.clip_grad_norm_(INF, norm_type) for _ in range(2)]
        bits = {n.view(torch.int32).item() for n in seen}
        assert len(bits) == 1, f"norm_type {norm_type}: {[n.item() for n in seen]}"
        exact = flat.abs().pow(norm_type).sum().pow(1 / norm_type)
        _assert_close(seen[0].double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, INF], ids=["l2", "inf"])
def test_layout_classes_each_reduce_their_own_grads(norm_type, device):
    """Tensor parallelism's reduction (tests/test_fsdp.py runs it on 2 ranks): with each
    table row given a layout class, every class gets its own launches and a contiguous
    span of partials, whose reduction is the norm of that class's grads alone (two grad
    dtypes, several chunks, empty tensors, classes interleaved across buckets); without
    classes the plan is the one it always was."""
    import numpy as np

    from tritonadam.kernels import layout
    from tritonadam.kernels.launch import launch_norm, launch_norm_reduce, norm_config, norm_kind
    from tritonadam.kernels.plan import NormPlan

    gen = torch.Generator().manual_seed(15)
    shapes = [(int(n),) for n in torch.randint(1, 40000, (12,), generator=gen)] + [(0,), (7, 3)]
    dtypes = [torch.float32, torch.bfloat16] * 7
    params = _params(shapes, device, seed=16, dtypes=dtypes)
    for p in params:
        p.grad = _grad(p.shape, gen, 1.0, p.dtype, device=device)
    opt = tritonadam.AdamW(params, **LAUNCH)
    cache = opt._ready()
    dev = cache.devices[params[0].device]  # keyed by the params' device: cuda:0, not cuda
    label = {id(p): i % 3 for i, p in enumerate(params)}  # classes 0, 1, 2 interleaved
    by_param = np.array([label[id(p)] for p in cache.params], dtype=np.int64)
    rows = by_param if dev.rows is None else by_param[dev.rows]
    block_size, num_warps = norm_config()
    kind = norm_kind(norm_type)
    buffer = torch.zeros(layout.CLIP_COLUMNS.value, dtype=torch.float64, device=device)
    cache.upload_grads()
    plain = NormPlan(device, dev.buckets, block_size=block_size, num_warps=num_warps, max_chunks=4)
    classed = NormPlan(device, dev.buckets, block_size=block_size, num_warps=num_warps, max_chunks=4,
                       classes=rows)
    assert len(plain.spans) == 1 and len(classed.spans) == 3
    assert [launch.grad_dtype for launch in plain.launches] == [torch.float32, torch.bfloat16]
    assert len(classed.launches) == 6  # per class, per grad dtype
    for plan in (plain, classed):
        launch_norm(dev.tables, plan, buffer, norm=kind)
        for span in plan.spans:
            launch_norm_reduce(span, buffer, None, norm=kind, reduce=True, finalize=False)
    assert classed.num_partials == sum(span.num_partials for span in classed.spans)
    for k, span in enumerate(classed.spans):
        mine = torch.cat([p.grad.detach().cpu().double().reshape(-1) for p in params if label[id(p)] == k])
        exact = mine.abs().max() if norm_type == INF else mine.pow(2).sum()
        _assert_close(span.total[0], exact, rtol=1e-6, atol=0)
    combine = torch.amax if norm_type == INF else torch.sum
    # Other chunks, other fp32 lane sums: equal to rounding.
    _assert_close(combine(classed.totals), plain.totals[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, INF], ids=["l2", "inf"])
def test_max_grad_norm_clips_in_step(norm_type, device):
    """``max_grad_norm=`` (trainers that only call step()): bit for bit what an explicit
    clip_grad_norm_ before each step gives; ``last_grad_norm`` is one fixed tensor holding
    the latest norm; the option survives a deepcopy."""
    shapes = [(30,), (16385,), (4, 5)]
    auto_params, explicit_params = _params(shapes, device, seed=7), _params(shapes, device, seed=7)
    auto = tritonadam.AdamW(auto_params, lr=1e-2, max_grad_norm=0.5, grad_norm_type=norm_type, **LAUNCH)
    explicit = tritonadam.AdamW(explicit_params, lr=1e-2, **LAUNCH)
    assert auto.last_grad_norm is None
    gen = torch.Generator().manual_seed(8)
    fixed = None
    for step in range(3):
        for p, q in zip(auto_params, explicit_params):
            p.grad = _grad(p.shape, gen, 2.0 if step != 1 else 1e-4, device=device)
            q.grad = p.grad.clone()
        auto.step()
        norm = explicit.clip_grad_norm_(0.5, norm_type)
        explicit.step()
        fixed = fixed if fixed is not None else auto.last_grad_norm
        assert auto.last_grad_norm is fixed
        assert torch.equal(fixed, norm)
        for p, q in zip(auto_params, explicit_params):
            assert torch.equal(p, q)
    copied = copy.deepcopy(auto)
    assert (copied.max_grad_norm, copied.grad_norm_type) == (0.5, norm_type)
    assert copied.last_grad_norm is None


def test_dropped_and_compounded_coefficients(device):
    """A coefficient belongs to the grads it measured: zero_grad(), or new grad tensors
    before the step, drop it (the step is unclipped, as torch's would be for grads its
    clip never saw; new tensors with a warning, as they may be copies that torch's
    in-place clip would have left clipped); when only some grads were replaced it is
    dropped with a warning (torch's in-place clip would have left the others clipped); a
    second clip of the same grads compounds, like a second in-place clip with torch. Grads
    given other memory (``p.grad.data = x``, which keeps their version counters) drop it
    too."""
    shapes = [(40,), (7, 3)]

    def run(script):
        params = _params(shapes, device, seed=9)
        opt = tritonadam.AdamW(params, lr=1e-2, **LAUNCH)
        gen = torch.Generator().manual_seed(10)
        grads = [_grad(p.shape, gen, 3.0, device=device) for p in params]
        norms = script(opt, params, grads)
        return params, norms

    def fresh(params, grads):
        for p, g in zip(params, grads):
            p.grad = g.clone()

    def torch_run(clips):  # on the CPU
        params = _params(shapes, "cpu", seed=9)
        opt = torch.optim.AdamW(params, lr=1e-2, foreach=False)
        gen = torch.Generator().manual_seed(10)
        fresh(params, [_grad(p.shape, gen, 3.0) for p in params])
        norms = [torch.nn.utils.clip_grad_norm_(params, m) for m in clips]
        opt.step()
        return params, norms

    def zero_grad_then_new(opt, params, grads):
        fresh(params, grads)
        opt.clip_grad_norm_(1e-3)
        opt.zero_grad()
        fresh(params, grads)
        opt.step()

    def replaced(opt, params, grads):
        fresh(params, grads)
        opt.clip_grad_norm_(1e-3)
        fresh(params, grads)  # a new backward after model.zero_grad(), or copies: new tensors
        with pytest.warns(UserWarning, match=r"every grad clip_grad_norm_ measured was replaced before the "
                                             r"step \(2 new grad tensors.*dropped") as record:
            opt.step()
        assert record[0].filename == __file__

    def one_replaced(opt, params, grads):
        fresh(params, grads)
        opt.clip_grad_norm_(1e-3)
        params[1].grad = grads[1].clone()  # one grad: torch would keep the other clipped
        with pytest.warns(UserWarning, match=r"1 of the 2 grads it measured was replaced\), so its coefficient was dropped") as record:
            opt.step()
        assert record[0].filename == __file__  # the user's line, not ours or torch's

    def in_place(opt, params, grads):  # model.zero_grad(set_to_none=False) and a backward
        fresh(params, grads)
        opt.clip_grad_norm_(1e-3)
        for p, g in zip(params, grads):
            p.grad.zero_()
            p.grad.add_(g)
        with pytest.warns(UserWarning, match=r"changed in place or given other memory after clip_grad_norm_ .* dropped") as record:
            opt.step()
        assert record[0].filename == __file__

    def data_replaced(opt, params, grads):  # other memory under the same grad objects
        fresh(params, grads)
        opt.clip_grad_norm_(1e-3)
        for p, g in zip(params, grads):
            p.grad.data = g.clone()  # keeps the grad's version counter
        with pytest.warns(UserWarning, match=r"changed in place or given other memory after clip_grad_norm_ .* dropped"):
            opt.step()

    def twice(opt, params, grads):
        fresh(params, grads)
        norms = [opt.clip_grad_norm_(2.0), opt.clip_grad_norm_(0.7)]
        opt.step()
        return norms

    unclipped, _ = torch_run([])
    for script in (zero_grad_then_new, replaced, one_replaced, in_place, data_replaced):
        with warnings.catch_warnings():
            if script in (zero_grad_then_new, replaced):  # every grad replaced, or zero_grad: no warning
                warnings.simplefilter("error")
            params, _ = run(script)
        for p, q in zip(params, unclipped):
            _assert_close(p, q, **TOL)
    params, norms = run(twice)
    expected_params, expected = torch_run([2.0, 0.7])
    _assert_close(torch.stack(norms), torch.stack(expected), rtol=2e-6, atol=0)
    assert norms[1].item() == pytest.approx(2.0, rel=1e-5)  # measured after the first clip
    for p, q in zip(params, expected_params):
        _assert_close(p, q, **TOL)


@pytest.mark.parametrize("bad", [float("nan"), INF], ids=["nan", "inf"])
@pytest.mark.parametrize("zero", ["model.zero_grad(set_to_none=False)", "grad.zero_()"])
def test_a_skipped_steps_coefficient_ends_with_grads_zeroed_in_place(zero, bad, device):
    """"Skip the step when the norm is not finite", zeroing the grads in place: the next
    backward accumulates into the same grad tensors, and the next clip measures them
    afresh (it compounded the pending NaN or 0 coefficient into every later clip, so
    every later step was skipped, or stepped a zero update). As torch, without warnings."""
    def train(ours):
        torch.manual_seed(0)
        model = nn.Linear(4, 2).to(device if ours else "cpu")
        if ours:
            opt = tritonadam.AdamW(model.parameters(), lr=0.1, **LAUNCH)
            clip = lambda: opt.clip_grad_norm_(1.0)  # noqa: E731
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=False)
            clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # noqa: E731
        gen = torch.Generator().manual_seed(1)
        norms = []
        for it in range(4):
            x = torch.randn(3, 4, generator=gen)
            if it == 0:
                x[0, 0] = bad
            model(x.to(device if ours else "cpu")).square().sum().backward()
            norm = clip()
            norms.append(norm.item())
            if math.isfinite(norms[-1]):
                opt.step()
            if zero.startswith("model"):
                model.zero_grad(set_to_none=False)
            else:
                for p in model.parameters():
                    p.grad.zero_()
        return norms, list(model.parameters())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norms, params = train(ours=True)
    expected_norms, expected = train(ours=False)
    assert not math.isfinite(norms[0]) and all(math.isfinite(n) for n in norms[1:])
    torch.testing.assert_close(torch.tensor(norms[1:]), torch.tensor(expected_norms[1:]), rtol=1e-5, atol=0)
    for p, q in zip(params, expected):
        _assert_close(p, q, **TOL)


def _model(device, seed=0):
    torch.manual_seed(seed)  # built on the CPU, then moved: the same weights on every device
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 1)).to(device)


def _backward(model, scaler, step, poison=False):
    gen = torch.Generator().manual_seed(step)
    device = next(model.parameters()).device
    x, y = torch.randn(5, 7, generator=gen).to(device), torch.randn(5, 1, generator=gen).to(device)
    loss = (model(x) - y).square().mean() * 20  # grads well above max_norm
    scaler.scale(loss).backward()
    if poison:
        model[0].weight.grad[1, 2] = INF


@pytest.mark.parametrize("recipe", ["scaler-argument", "max_grad_norm", "unscale-first"])
def test_grad_scaler_recipes_match_torch(recipe, device):
    """fp16-style loss scaling with a scale that grows and an inf at step 2; reference:
    torch's recipe (unscale_, clip_grad_norm_, scaler.step) with torch.optim.AdamW.
      scaler-argument  clip_grad_norm_(..., scaler=scaler): the scale folds into the norm
      max_grad_norm    step() clips with the scale GradScaler hands it
      unscale-first    scaler.unscale_(opt) then clip_grad_norm_ (grads rewritten by torch)
    The norm is of the unscaled grads; the inf step is skipped on the device, scale backs off.
    torch's model, optimizer and scaler run on the same device as ours: the grads come from
    a backward, which must give both sides the same grads."""
    model, ref_model = _model(device), _model(device)
    extra = {"max_grad_norm": 0.5} if recipe == "max_grad_norm" else {}
    opt = tritonadam.AdamW(model.parameters(), lr=1e-2, **extra, **LAUNCH)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    scalers = [torch.amp.GradScaler(device.type, init_scale=3000.0, growth_interval=1) for _ in range(2)]
    for step in range(5):
        poison = step == 2
        for o in (opt, ref):
            o.zero_grad()
        _backward(ref_model, scalers[1], step, poison)
        scalers[1].unscale_(ref)
        expected = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
        scalers[1].step(ref)
        scalers[1].update()

        _backward(model, scalers[0], step, poison)
        before = [p.grad.clone() for p in model.parameters()]
        if recipe == "scaler-argument":
            norm = opt.clip_grad_norm_(0.5, scaler=scalers[0])
            assert _same_grads(model.parameters(), before)
        elif recipe == "unscale-first":
            scalers[0].unscale_(opt)
            norm = opt.clip_grad_norm_(0.5)
        scalers[0].step(opt)
        scalers[0].update()
        if recipe == "max_grad_norm":
            norm = opt.last_grad_norm
        if poison:
            assert norm.item() == INF and expected.item() == INF
        else:
            torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, **TOL)
    assert scalers[0].get_scale() != 3000.0
    assert all(opt.state[p]["step"].item() == 4 for p in model.parameters())


def test_clip_of_scaled_grads_is_refused(device):
    """clip_grad_norm_ without scaler= on grads GradScaler still scales would clip by a
    norm thousands of times too large: the step raises and writes nothing."""
    model = _model(device)
    opt = tritonadam.AdamW(model.parameters(), lr=1e-2, **LAUNCH)
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0)
    _backward(model, scaler, 0)
    opt.clip_grad_norm_(0.5)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="scaler.unscale_"):
        scaler.step(opt)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for state in opt.state.values():  # created by the clip, never stepped
        assert state["step"].item() == 0 and not state["exp_avg"].any()


@pytest.mark.parametrize("norm_type", [2.0, INF], ids=["l2", "inf"])
def test_error_if_nonfinite(norm_type, device):
    """error_if_nonfinite=True raises torch's error on an inf or NaN norm and leaves no
    coefficient (the next step is unclipped, as torch's raising clip leaves the grads);
    False returns the non-finite norm and the step does what torch's clip + step does
    (a NaN norm makes every grad NaN; an inf one makes inf grads NaN and the others 0)."""
    shapes = [(6,), (16385,)]

    def setup(grads, bad):  # grads: CPU tensors; ours get device copies, torch's CPU ones
        params = _params(shapes, device, seed=11)
        ref = _cpu_params(params)
        for p, q, g in zip(params, ref, grads):
            p.grad, q.grad = g.clone().to(device), g.clone()
        params[0].grad[2] = ref[0].grad[2] = bad
        return (params, tritonadam.AdamW(params, lr=1e-2, **LAUNCH),
                ref, torch.optim.AdamW(ref, lr=1e-2, foreach=False))

    for bad in (INF, float("nan")):
        ok = [_grad(s, torch.Generator().manual_seed(12), 3.0) for s in shapes]
        params, opt, ref, torch_opt = setup(ok, bad)
        with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
            torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type, error_if_nonfinite=True)
        with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
            opt.clip_grad_norm_(1.0, norm_type, error_if_nonfinite=True)
        params[0].grad[2] = ref[0].grad[2] = ok[0][2].item()  # in place: the grads the clip measured
        opt.step()
        torch_opt.step()
        for p, q in zip(params, ref):
            _assert_close(p, q, **TOL)

        params, opt, ref, torch_opt = setup(ok, bad)
        norm = opt.clip_grad_norm_(1.0, norm_type)
        expected = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
        assert torch.equal(norm.cpu(), expected) or norm.isnan() and expected.isnan()
        assert norm.isnan() == math.isnan(bad)
        opt.step()
        torch_opt.step()
        for p, q in zip(params, ref):
            _assert_close(p, q, equal_nan=True, **TOL)
        assert params[1].isnan().all() == math.isnan(bad)


def test_max_norm_as_a_tensor_clips_as_torch(device):
    """torch's clip_grad_norm_ takes max_norm as a one-element tensor too (so does
    max_grad_norm=): read once, the same clip."""
    ref = _params([(5,), (3, 4)], "cpu", seed=14)
    gen = torch.Generator().manual_seed(15)
    grads = [_grad(p.shape, gen, 3.0) for p in ref]
    for p, g in zip(ref, grads):
        p.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(ref, torch.tensor(0.5))
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    torch_opt.step()
    for how in ("call", "ctor"):
        params = _params([(5,), (3, 4)], device, seed=14)
        for p, g in zip(params, grads):
            p.grad = g.clone().to(device)
        max_norm = torch.tensor(0.5, dtype=torch.float64, device=device)
        if how == "call":
            opt = tritonadam.AdamW(params, lr=1e-2, **LAUNCH)
            _assert_close(opt.clip_grad_norm_(max_norm), expected, rtol=1e-6, atol=0)
        else:
            opt = tritonadam.AdamW(params, lr=1e-2, max_grad_norm=max_norm, **LAUNCH)
        opt.step()
        for p, q in zip(params, ref):
            _assert_close(p, q, **TOL)


@pytest.mark.parametrize("call,error,match", [
    (lambda o: o.clip_grad_norm_(-1.0), ValueError, "max_norm must be >= 0"),
    (lambda o: o.clip_grad_norm_(float("nan")), ValueError, "max_norm must be >= 0"),
    (lambda o: o.clip_grad_norm_(torch.ones(2, device=o.param_groups[0]["params"][0].device)), TypeError,
     "one-element real tensor"),
    (lambda o: o.clip_grad_norm_(1.0, 0), ValueError, "order p > 0 or inf"),
    (lambda o: o.clip_grad_norm_(1.0, -INF), ValueError, "order p > 0 or inf"),
    (lambda o: o.clip_grad_norm_(1.0, "fro"), ValueError, "norm_type"),
    (lambda o: o.clip_grad_norm_(1.0, foreach="yes"), ValueError, "foreach"),
    (lambda o: o.clip_grad_norm_(1.0, scaler=object()), TypeError, "GradScaler"),
    (lambda o: tritonadam.AdamW(o.param_groups[0]["params"], max_grad_norm=-2.0), ValueError, "max_norm"),
    (lambda o: tritonadam.Adam(o.param_groups[0]["params"], grad_norm_type=0.0), ValueError, "order p > 0"),
], ids=["negative", "nan", "2-element-tensor", "p=0", "p=-inf", "fro", "foreach", "scaler", "ctor-max", "ctor-p"])
def test_bad_arguments_are_refused_and_change_nothing(call, error, match, device):
    params = _params([(5,), (3, 4)], device, seed=13)
    opt = tritonadam.AdamW(params, lr=1e-2, **LAUNCH)
    gen = torch.Generator().manual_seed(14)
    for p in params:
        p.grad = _grad(p.shape, gen, 1.0, device=device)
    opt.step()
    for p in params:
        p.grad = _grad(p.shape, gen, 1.0, device=device)
    before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        call(opt)
    opt.step()  # nothing pending: unclipped, like torch.optim on the same grads
    # torch on the CPU, from CPU copies of the params and of our state (step counts included).
    ref = _cpu_params(before[0])
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    torch_opt.load_state_dict(tree_map_only(torch.Tensor, lambda t: t.cpu(), before[1]))
    for p, q in zip(params, ref):
        q.grad = _cpu_grad(p.grad)
    torch_opt.step()
    for p, q in zip(params, ref):
        _assert_close(p, q, **TOL)


def test_unsupported_cases_say_what_to_do(device):
    """Complex grads by a norm other than 2 (the kernels read their real view), and
    differentiable=True groups (stepped by torch.optim): clear errors naming torch's function."""
    z = nn.Parameter(torch.randn(4, dtype=torch.complex64).to(device))
    z.grad = torch.randn(4, dtype=torch.complex64).to(device)
    opt = tritonadam.Adam([z], **LAUNCH)
    with pytest.raises(ValueError, match="2-norm only"):
        opt.clip_grad_norm_(1.0, INF)
    norm = opt.clip_grad_norm_(INF)
    _assert_close(norm, torch.linalg.vector_norm(z.grad.cpu()), rtol=1e-6, atol=0)

    p, q = nn.Parameter(torch.randn(3).to(device)), nn.Parameter(torch.randn(3).to(device))
    p.grad, q.grad = torch.randn(3).to(device), torch.randn(3).to(device)
    opt = tritonadam.Adam([{"params": [p]}, {"params": [q], "differentiable": True}], **LAUNCH)
    with pytest.raises(NotImplementedError, match="torch.nn.utils.clip_grad_norm_"):
        opt.clip_grad_norm_(1.0)
    with pytest.raises(NotImplementedError, match="differentiable"):
        tritonadam.Adam([{"params": [p]}, {"params": [q], "differentiable": True}],
                        max_grad_norm=1.0, **LAUNCH).step()
    p.grad = None  # only the differentiable group has grads: still refused, not stepped unclipped
    before = q.detach().clone()
    with pytest.raises(NotImplementedError, match="differentiable"):
        tritonadam.Adam([{"params": [p]}, {"params": [q], "differentiable": True}],
                        max_grad_norm=1e-3, **LAUNCH).step()
    assert torch.equal(q.detach(), before)


def test_no_grads_returns_torchs_zero(device):
    """Also as the latest norm: a clip that finds no grads does not leave the last one."""
    p = nn.Parameter(torch.randn(3).to(device))
    opt = tritonadam.AdamW([p], max_grad_norm=1.0, **LAUNCH)
    p.grad = torch.full((3,), 2.0).to(device)
    opt.step()
    assert opt.last_grad_norm.item() == pytest.approx(12 ** 0.5)
    p.grad = None
    opt.step()
    assert opt.last_grad_norm.item() == 0.0
    p.grad = torch.full((3,), 2.0).to(device)
    opt.clip_grad_norm_(1.0)
    p.grad = None
    norm = opt.clip_grad_norm_(1.0)
    assert norm.item() == 0.0 and torch.nn.utils.clip_grad_norm_([p], 1.0).item() == 0.0
    assert opt.last_grad_norm.item() == 0.0


@pytest.mark.parametrize("change", ["grad-on-a-param-without", "param-removed", "amsgrad-on", "state-popped"])
def test_changes_between_clip_and_step_are_seen(change, device, recwarn):
    """The step right after clip_grad_norm_ reuses the clip's check only while nothing
    else changed: it steps as a step without the clip (max_norm inf: coefficient 1)
    would. A param that gets a grad after the clip is stepped (the coefficient dropped
    with a warning), a param taken out of its group is not (the coefficient kept for the
    others: test_params_regrouped_between_clip_and_step_stay_clipped), a group switched
    to AMSGrad steps with max_exp_avg_sq, state cleared by hand restarts."""
    params = _params([(5,), (4,), (3,)], device)
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    gen = torch.Generator().manual_seed(1)
    grads = [_grad(p.shape, gen, 1.0, device=device) for p in params]
    opt = tritonadam.AdamW(params, lr=1e-2, **LAUNCH)
    theirs = tritonadam.AdamW(ref, lr=1e-2, **LAUNCH)  # the same steps, never clipped
    for o, ps in ((opt, params), (theirs, ref)):  # one plain step: state to change
        for q, g in zip(ps, grads):
            q.grad = g.clone()
        o.step()
    for o, ps in ((opt, params), (theirs, ref)):
        for i, (q, g) in enumerate(zip(ps, grads)):
            q.grad = None if change == "grad-on-a-param-without" and i == 2 else g * 2
    norm = opt.clip_grad_norm_(INF)  # measures only: the coefficient is 1
    for o, ps in ((opt, params), (theirs, ref)):
        if change == "grad-on-a-param-without":
            ps[2].grad = grads[2].clone()
        elif change == "param-removed":
            o.param_groups[0]["params"].pop(1)
        elif change == "amsgrad-on":
            o.param_groups[0]["amsgrad"] = True
        else:
            o.state.pop(ps[0])
        o.step()
    assert norm.item() > 0
    for p, q in zip(params, ref):
        assert torch.equal(p, q)
        assert (p in opt.state) == (q in theirs.state)
        if q in theirs.state:
            assert opt.state[p].keys() == theirs.state[q].keys()
            for key, value in theirs.state[q].items():
                assert torch.equal(opt.state[p][key], value), key
    dropped = [w for w in recwarn if "coefficient was dropped" in str(w.message)]
    assert bool(dropped) == (change == "grad-on-a-param-without")


def _pop_param(group, p):
    group["params"].pop(next(i for i, q in enumerate(group["params"]) if q is p))


REGROUP = {
    "moved-to-another-group": lambda groups, ps: (_pop_param(groups[0], ps[1]), groups[1]["params"].append(ps[1])),
    "groups-reversed": lambda groups, ps: groups.reverse(),
    "group-removed": lambda groups, ps: groups.pop(1),
    "param-removed": lambda groups, ps: _pop_param(groups[0], ps[0]),
    "params-reordered": lambda groups, ps: groups[0]["params"].reverse(),
    "grad-set-to-none": lambda groups, ps: setattr(ps[0], "grad", None),
    # A grad the step no longer reads may change: the others stay clipped.
    "removed-param-grad-zeroed": lambda groups, ps: (_pop_param(groups[0], ps[2]), ps[2].grad.zero_()),
}


@pytest.mark.parametrize("change", list(REGROUP))
def test_params_regrouped_between_clip_and_step_stay_clipped(change, device, recwarn):
    """torch's clip scales every grad in place, wherever its param goes after: params moved
    to another group, groups reordered or removed between clip_grad_norm_ and step() step
    with their clipped grads, the coefficient of the norm over all of them (it was dropped,
    with a warning saying grads were replaced, and the step read them unclipped); so do
    the others when one param's grad is set to None, or a removed param's grad is zeroed."""
    params = _params([(5, 8), (9,), (33,), (4,)], device)
    ref = _cpu_params(params)
    gen = torch.Generator().manual_seed(3)

    def groups(ps):
        return [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.05}]

    opt = tritonadam.AdamW(groups(params), lr=1e-2, weight_decay=0.1, **LAUNCH)
    theirs = torch.optim.AdamW(groups(ref), lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(3):
        _fresh_grads(params, ref, gen, 2.0, device)
        norm = opt.clip_grad_norm_(0.5)
        expected = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        assert norm > 0.5
        if step == 2:
            REGROUP[change](opt.param_groups, params)
            REGROUP[change](theirs.param_groups, ref)
        opt.step()
        theirs.step()
        _assert_close(norm, expected, rtol=2e-6, atol=0)
        for p, q in zip(params, ref):
            _assert_close(p, q, **TOL)
            if q in theirs.state:
                _assert_close(opt.state[p]["exp_avg"], theirs.state[q]["exp_avg"], **TOL)
    assert not [w for w in recwarn if "coefficient was dropped" in str(w.message)]


def test_a_skipped_clip_then_regrouped_params_measure_afresh_without_a_warning(device, recwarn):
    """"Skip the step when the norm is not finite": grads zeroed in place and accumulated
    again are new values that the next clip measures, with nothing left clipped to warn
    about, whether or not the params were reordered in between (reordered, that clip
    warned that the step would read the grads unclipped, and then clipped them)."""
    params = _params([(5,), (4,), (3,)], device)
    ref = _cpu_params(params)
    opt = tritonadam.AdamW(params, lr=0.1, eps=1.0, **LAUNCH)
    theirs = torch.optim.AdamW(ref, lr=0.1, eps=1.0, foreach=False)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    assert not torch.isfinite(opt.clip_grad_norm_(0.5))
    for p in params:
        p.grad.zero_()
    opt.param_groups[0]["params"].reverse()
    theirs.param_groups[0]["params"].reverse()
    gen = torch.Generator().manual_seed(4)
    for p, q in zip(params, ref):
        g = _grad(p.shape, gen, 3.0, device=device)
        p.grad.add_(g)
        q.grad = _cpu_grad(g)
    norm = opt.clip_grad_norm_(0.5)
    opt.step()
    _assert_close(norm, torch.nn.utils.clip_grad_norm_(ref, 0.5), rtol=2e-6, atol=0)
    theirs.step()
    for p, q in zip(params, ref):
        _assert_close(p, q, **TOL)
    assert not [str(w.message) for w in recwarn if "clip_grad_norm_" in str(w.message)]


@pytest.mark.parametrize("recipe", ["scaler-argument", "max_grad_norm"])
def test_scaled_grads_are_unscaled_before_their_powers(recipe, device):
    """The p-th powers of grads GradScaler scales by 2**16 overflow fp32 at p = 8 (and at
    p = 4 once the scale grows): each grad is unscaled first, as scaler.unscale_ does, so
    the norm is torch's recipe's, not inf with every grad zeroed by its coefficient."""
    p = nn.Parameter(torch.zeros(4).to(device))
    q = nn.Parameter(torch.zeros(4))
    extra = {"max_grad_norm": 1.0, "grad_norm_type": 8.0} if recipe == "max_grad_norm" else {}
    opt = tritonadam.AdamW([p], lr=0.1, **extra, **LAUNCH)
    ref = torch.optim.AdamW([q], lr=0.1, foreach=False)
    scalers = [torch.amp.GradScaler(device.type), torch.amp.GradScaler("cpu")]  # init_scale 2**16
    scalers[0].scale(p.sum()).backward()
    scalers[1].scale(q.sum()).backward()
    scalers[1].unscale_(ref)
    expected = torch.nn.utils.clip_grad_norm_([q], 1.0, 8.0)
    norm = opt.clip_grad_norm_(1.0, 8.0, scaler=scalers[0]) if recipe == "scaler-argument" else None
    for s, o in zip(scalers, (opt, ref)):
        s.step(o)
        s.update()
    norm = opt.last_grad_norm if norm is None else norm
    _assert_close(norm, expected, rtol=1e-6, atol=0)
    _assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], **TOL)
    assert opt.state[p]["exp_avg"].abs().min() > 0


def test_inference_mode_grads_and_a_grad_added_between_clips(device):
    """Grads made under torch.inference_mode() have no version counter: clipped and stepped
    as other grads (in-place changes to them go unseen). A param that gets a grad between
    two clips drops the first coefficient with the warning, as before version counters."""
    def run(inference):
        params = _params([(50,), (3, 7)], device, seed=21)
        opt = tritonadam.AdamW(params, lr=1e-2, **LAUNCH)
        gen = torch.Generator().manual_seed(22)
        grads = [_grad(p.shape, gen, 3.0, device=device) for p in params]
        if inference:
            with torch.inference_mode():
                grads = [g.clone() for g in grads]
            assert grads[0].is_inference()
        for p, g in zip(params, grads):
            p.grad = g
        norm = opt.clip_grad_norm_(1.0)
        opt.step()
        return params, norm

    (a, na), (b, nb) = run(True), run(False)
    assert torch.equal(na, nb) and all(torch.equal(p, q) for p, q in zip(a, b))

    params = _params([(50,), (50,), (50,)], device, seed=23)
    opt = tritonadam.AdamW(params, lr=1e-2, **LAUNCH)
    gen = torch.Generator().manual_seed(24)
    for p in params[:2]:
        p.grad = _grad(p.shape, gen, 3.0, device=device)
    opt.clip_grad_norm_(1.0)
    params[2].grad = _grad(params[2].shape, gen, 3.0, device=device)
    with pytest.warns(UserWarning, match=r"1 param it did not measure got grads\), so its coefficient was "
                      r"dropped and this clip measures every grad afresh"):
        opt.clip_grad_norm_(1.0)


@pytest.mark.parametrize("event", ["grad-set-to-none", "zero-grad", "param-removed", "state-loaded"])
def test_a_clip_leaves_no_state_for_params_no_step_reads(event, device):
    """A clip's check makes the state its launches' tables point to, before any step:
    for a param whose grad is gone by the step (frozen, ``zero_grad()`` and a skipped
    step, taken out of the optimizer), that state is dropped, as torch.optim, which makes
    state at the step, has none (it kept step 0 and zero moments, and state_dict() had
    entries torch's has not). State loaded in between is the load's, and kept."""
    params = _params([(6,), (5,), (4,)], device)
    ref = _cpu_params(params)
    opt = tritonadam.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, **LAUNCH)
    theirs = torch.optim.Adam([{"params": ref[:2]}, {"params": ref[2:]}], lr=0.1, foreach=False)
    gen = torch.Generator().manual_seed(5)
    if event == "state-loaded":  # a checkpoint with state for every param
        donor = torch.optim.Adam([{"params": _cpu_params(params)[:2]}, {"params": _cpu_params(params)[2:]}])
        for p in donor.param_groups[0]["params"] + donor.param_groups[1]["params"]:
            p.grad = torch.ones_like(p)
        donor.step()
    _fresh_grads(params, ref, gen, 3.0, device)
    opt.clip_grad_norm_(1.0)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    for o, ps in ((opt, params), (theirs, ref)):
        if event == "grad-set-to-none":
            ps[1].grad = None
        elif event == "zero-grad":
            o.zero_grad()
        elif event == "param-removed":
            o.param_groups.pop(1)
        else:
            o.load_state_dict(donor.state_dict())
            ps[1].grad = None
        o.step()
    assert [i for i, p in enumerate(params) if p in opt.state] == [i for i, q in enumerate(ref) if q in theirs.state]
    assert sorted(opt.state_dict()["state"]) == sorted(theirs.state_dict()["state"])
    for p, q in zip(params, ref):
        _assert_close(p, q, **TOL)
        if q in theirs.state:
            _assert_close(opt.state[p]["exp_avg"], theirs.state[q]["exp_avg"], **TOL)
            assert opt.state[p]["step"].item() == theirs.state[q]["step"].item()


@pytest.mark.parametrize("grad_dropped", [False, True])
def test_a_deepcopy_between_clip_and_step_steps_clipped(grad_dropped, device):
    """``copy.deepcopy((params, opt))`` between clip_grad_norm_ and step: torch's copy of
    grads it clipped in place is clipped, and so is the copy's step here (the copy's clip
    coefficient was lost and it stepped the grads unclipped), also after one param's grad
    was set to None. Plain leaf tensors: an nn.Parameter's deepcopy leaves .grad behind."""
    gen = torch.Generator().manual_seed(6)
    ours = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in [(5, 7), (33,)]]
    ref = [p.detach().cpu().clone().requires_grad_() for p in ours]
    opt = tritonadam.Adam(ours, lr=0.1, **LAUNCH)
    theirs = torch.optim.Adam(ref, lr=0.1, foreach=False)
    for step in range(2):
        _fresh_grads(ours, ref, gen, 10.0, device)
        if step:
            opt.clip_grad_norm_(1.0)
            torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt.step()
        theirs.step()
    opt.clip_grad_norm_(1.0)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    if grad_dropped:
        ours[1].grad = ref[1].grad = None
    copies, opt_copy = copy.deepcopy((ours, opt))
    ref_copies, theirs_copy = copy.deepcopy((ref, theirs))
    for o in (opt_copy, theirs_copy, opt, theirs):
        o.step()
    for params, refs, o, t in ((copies, ref_copies, opt_copy, theirs_copy), (ours, ref, opt, theirs)):
        for p, q in zip(params, refs):
            _assert_close(p, q, **TOL)
            _assert_close(o.state[p]["exp_avg"], t.state[q]["exp_avg"], **TOL)


class _LightningStyle:
    """A wrapper built as Lightning 2.x's ``LightningOptimizer`` is: an instance of a new
    subclass of the optimizer's class, forwarding the attributes it lacks."""

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self.__class__ = type("Lightning" + type(optimizer).__name__, (type(self), type(optimizer)), {})

    def step(self, closure=None):
        return self._optimizer.step(closure)

    def __getattr__(self, item):
        return getattr(self._optimizer, item)


class _FabricStyle:
    """As Fabric's ``_FabricOptimizer``: the same subclassing, over a copy of the
    optimizer's ``__dict__``."""

    def __init__(self, optimizer):
        self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in ("step", "__del__")}
        self.__class__ = type("Fabric" + type(optimizer).__name__, (type(self), type(optimizer)), {})
        self._optimizer = optimizer

    def step(self, closure=None):
        return self._optimizer.step(closure)


@pytest.mark.parametrize("wrapper", [_LightningStyle, _FabricStyle], ids=["lightning", "fabric"])
def test_clips_and_zero_grads_through_a_subclassing_wrapper_keep_the_state(wrapper, device):
    """``wrapped.zero_grad(); backward; wrapped.clip_grad_norm_(m); wrapped.step()`` with
    Lightning's and Fabric's wrappers, whose step is the optimizer's own and whose other
    methods are tritonadam's run on the wrapper: the state the first clip made was
    recorded on the wrapper, which the optimizer's step never cleared, and each later
    zero_grad deleted every param's state (step counts stuck at 1). Reference: torch's
    clip and torch.optim.AdamW through the same wrapper."""
    params = _params([(5, 7), (33,)], device, seed=8)
    ref = _cpu_params(params)
    opt = wrapper(tritonadam.AdamW(params, lr=0.1, **LAUNCH))
    theirs = wrapper(torch.optim.AdamW(ref, lr=0.1, foreach=False))
    gen = torch.Generator().manual_seed(9)
    for step in range(4):
        opt.zero_grad()
        theirs.zero_grad()
        _fresh_grads(params, ref, gen, 10.0, device)
        opt.clip_grad_norm_(1.0)
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt.step()
        theirs.step()
    for p, q in zip(params, ref):
        _assert_close(p, q, **TOL)
        _assert_close(opt.state[p]["exp_avg"], theirs.state[q]["exp_avg"], **TOL)
        assert opt.state[p]["step"].item() == theirs.state[q]["step"].item() == 4


def test_the_dropped_coefficients_warning_names_the_change_that_dropped_it(device):
    """A grad set to None keeps the coefficient; one changed in place drops it: the
    warning names the in-place change (it blamed the grad set to None)."""
    params = _params([(6,), (5,)], device)
    opt = tritonadam.Adam(params, lr=0.1, **LAUNCH)
    gen = torch.Generator().manual_seed(7)
    for p in params:
        p.grad = _grad(p.shape, gen, 3.0, device=device)
    opt.clip_grad_norm_(1.0)
    params[1].grad = None
    params[0].grad.mul_(2)
    with pytest.warns(UserWarning, match=r"changed in place or given other memory after clip_grad_norm_ .* dropped") as record:
        opt.step()
    assert not [w for w in record if "replaced" in str(w.message)]


@pytest.mark.parametrize("through", ["step", "zero_grad-kept"])
def test_a_seed_set_between_a_clip_and_the_first_step_rounds_that_step(through, device):
    """The clip makes the state the first step would make; opt.seed set after it rounds
    that step as without the clip (it rounded with the old seed, stamped on the state the
    clip made: 24 of 64 bf16 params apart)."""
    results = []
    for clip in (False, True):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(11)).bfloat16().to(device))
        opt = tritonadam.AdamW([p], lr=1e-3, state_dtype=torch.bfloat16, stochastic_rounding=True, seed=1,
                               **LAUNCH)
        p.grad = torch.randn(64, generator=torch.Generator().manual_seed(12)).bfloat16().to(device)
        if clip:
            opt.clip_grad_norm_(100.0)  # coefficient 1: the grads as they are
            if through == "zero_grad-kept":
                opt.zero_grad(set_to_none=False)  # the grad is kept (zeros)
                p.grad.copy_(torch.randn(64, generator=torch.Generator().manual_seed(12)).bfloat16())
        opt.seed = 2
        opt.step()
        results.append((p.detach().cpu(), int(opt.state[p]["rounding_seed"])))
    (plain, plain_seed), (clipped, clipped_seed) = results
    assert plain_seed == clipped_seed == 2
    assert torch.equal(plain, clipped)


@pytest.mark.parametrize("event", ["deepcopy", "failed-step", "empty-grad-scaler"])
def test_state_a_clip_made_is_tracked_until_a_step_completes(event, device):
    """Between clip_grad_norm_ and the first step, torch.optim has no state: a deepcopy
    tracks the state a clip made for the step's tables as the original does (the copy kept
    it for good), a step that raises leaves it tracked (the next step kept it for a param
    whose grad was gone), and a clip of an empty grad replaced since does not refuse a
    GradScaler step as a clip of scaled grads. (state_dict() lists it, as opt.state does:
    torch.distributed.checkpoint decides from opt.state whether to make state first.)"""
    shapes = [(0,)] if event == "empty-grad-scaler" else [(6,), (5,), (4,)]
    params = _params(shapes, device)
    opt = tritonadam.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, **LAUNCH)
    gen = torch.Generator().manual_seed(8)
    for p in params:
        p.grad = _grad(p.shape, gen, 3.0, device=device)
    opt.clip_grad_norm_(1.0)
    if event == "empty-grad-scaler":
        params[0].grad = _grad(params[0].shape, gen, 3.0, device=device)
        scaler = torch.amp.GradScaler(device.type, init_scale=4.0)
        scaler.scale(torch.ones((), device=device))
        scaler.step(opt)
        return
    if event == "deepcopy":
        params, opt = copy.deepcopy((params, opt))  # plain Parameters: the copy has no grads
        opt.zero_grad()
    else:
        good = params[0].grad.data
        params[0].grad.data = good.double()  # around the setter's check: the step refuses it
        with pytest.raises(RuntimeError, match="float64"):
            opt.step()
        params[0].grad.data = good
        params[1].grad = None
    opt.step()
    expected = [] if event == "deepcopy" else [0, 2]
    assert [i for i, p in enumerate(params) if p in opt.state] == expected
