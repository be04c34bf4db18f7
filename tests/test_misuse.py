"""Bad input and misuse that real training code does by accident. torch's own error
cases raise as torch.optim does; what we cannot step gets a clear error. The kernels write
through raw pointers, so every step re-checks what a launch relies on, on the cached path
too: each case gets torch.optim's result or a clear error, and a raising step or load
leaves every param and state tensor bit for bit as it was. Each case runs on the first
step and after several cached steps. Cases that could corrupt memory run in a subprocess,
so a crash fails the test instead of killing the run.
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import textwrap
from collections import defaultdict

import pytest
import torch

import tritonadam
from helpers import LAUNCH, PAIRS, assert_backward_through_a_stepped_param_raises, make_params, random_grads

AFTER = [0, 3]  # good steps before the misuse: the first step, and the cached path


def _params(device, shapes=((4, 6), (24,), (5,)), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


def _steps(opt, params, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p, g in zip(params, random_grads(params, gen)):
            p.grad = g
        opt.step()


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in opt.state.items()})


def _assert_untouched(opt, params, snap):
    before_params, before_state = snap
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
    assert {id(p) for p in opt.state} == set(before_state)
    for p, s in opt.state.items():
        assert set(s) == set(before_state[id(p)])
        for k, v in s.items():
            assert torch.equal(v, before_state[id(p)][k]), k


def _fresh_grads(params, seed=7):
    for p, g in zip(params, random_grads(params, torch.Generator().manual_seed(seed))):
        p.grad = g


def _step_both(ours, theirs, params, ref, gen):
    """One step of ours and of torch.optim with the same fresh grads."""
    for p, q, g in zip(params, ref, random_grads(params, gen)):
        p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    theirs.step()


def _assert_like_torch(ours, theirs, params, ref, keys=("exp_avg", "exp_avg_sq", "step")):
    """Params and state as torch.optim's (compared on the CPU: torch keeps non-capturable
    step counts there, ours live on the param's device)."""
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        for k in keys:
            torch.testing.assert_close(ours.state[p][k].cpu(), theirs.state[q][k].cpu(),
                                       atol=1e-6, rtol=1e-5)


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [os.path.join(os.path.dirname(__file__), ".."), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


# ---- torch's own error cases ---------------------------------------------------------


def _error_cases():
    """torch's own error cases for each optimizer (its test helpers import expecttest,
    which GPU images often lack: there these are skipped, saying so)."""
    try:
        from torch.testing._internal import common_optimizers as common
    except ImportError as e:
        yield pytest.param(None, None, marks=pytest.mark.skip(reason=f"torch's test helpers: {e}"))
        return
    funcs = {"Adam": common.optim_error_inputs_func_adam, "AdamW": common.optim_error_inputs_func_adamw,
             "Adamax": common.optim_error_inputs_func_adamax}
    for name, func in funcs.items():
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
        if case.error_on.name == "STEP_ERROR":
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.randn_like(p)
            opt.step()


# ---- grads that do not fit their param --------------------------------------------


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


@pytest.mark.parametrize("after", AFTER)
@pytest.mark.parametrize("lazy", ["negated", "conjugated"])
def test_lazily_negated_or_conjugated_grads_step_by_value(lazy, after, device):
    """A grad carrying torch's lazy negation or conjugation bit (``torch._neg_view``,
    ``x.conj().imag``; autograd hands complex params conjugated grads) holds its values
    before negation: the kernels read that memory raw and stepped with the sign flipped.
    They step with the grad's values now; torch.optim steps a negated real grad the same
    (a conjugated one it refuses: its view_as_real cannot read it)."""
    dtype = torch.complex64 if lazy == "conjugated" else torch.float32
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype, generator=gen).to(device)) for s in ((6, 5), (7,))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = PAIRS["AdamW"][0](params, **LAUNCH)
    theirs = torch.optim.AdamW(ref, foreach=False)
    for i in range(after + 2):
        for p, q in zip(params, ref):
            g = torch.randn(p.shape, dtype=dtype, generator=gen).to(device)
            q.grad = g
            if i >= after:  # the same values, held lazily
                g = torch._neg_view(-g) if lazy == "negated" else g.conj().resolve_conj().conj()
                assert g.is_neg() or g.is_conj()
            p.grad = g
        ours.step()
        theirs.step()
    _assert_like_torch(ours, theirs, params, ref, keys=("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("after", [0, 2])
def test_param_whose_elements_share_memory_is_refused_before_anything_is_written(after, device):
    """``nn.Parameter(x.expand(5))``: the kernels stepped every other param and all state,
    then the copy back into the param raised torch's error. Refused first now, in torch's
    words."""
    good = torch.nn.Parameter(torch.randn(6, device=device))
    bad = torch.nn.Parameter(torch.randn(1, device=device).expand(5))
    opt = PAIRS["AdamW"][0]([good, bad], **LAUNCH)
    _steps(opt, [good], after)  # bad has no grad yet: cached steps of good alone
    good.grad, bad.grad = torch.randn(6, device=device), torch.randn(5, device=device)
    snap = _snapshot(opt, [good, bad])
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor refers to a single"):
        opt.step()
    _assert_untouched(opt, [good, bad], snap)


@pytest.mark.parametrize("at", ["new-address", "same-address"])
@pytest.mark.parametrize("after", [0, 2])
def test_lazily_negated_param_is_refused(after, at, device):
    params = _params(device)
    opt = PAIRS["AdamW"][0](params, **LAUNCH)
    _steps(opt, params, after)
    if at == "same-address":  # the cached check's layouts compare the bit, not just the address
        params[1].data = torch._neg_view(params[1].detach())
    else:
        params[1].data = torch._neg_view(-params[1].detach().clone())
    _fresh_grads(params)
    snap = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="lazily negated view.*resolve_neg"):
        opt.step()
    _assert_untouched(opt, params, snap)


@pytest.mark.parametrize("what", ["param", "grad"])
def test_wrapper_tensor_subclasses_are_refused_plainly(what, device):
    """A tensor subclass that keeps its data in inner tensors (torch's TwoTensor; torchao's
    float8 and NF4 weights are built the same way) has no memory the kernels could step:
    torch's own words were "Attempted to access the data pointer on an invalid python
    storage"."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    a = torch.randn(5, 3, device=device)
    good = torch.nn.Parameter(torch.randn(4, device=device))
    p = torch.nn.Parameter(two_tensor.TwoTensor(a, a.clone()) if what == "param" else a.clone())
    opt = PAIRS["AdamW"][0]([good, p], **LAUNCH)
    good.grad = torch.randn(4, device=device)
    ones = torch.ones(5, 3, device=device)
    p.grad = two_tensor.TwoTensor(ones, ones.clone()) if what == "param" else ones
    if what == "grad":
        p.grad.data = two_tensor.TwoTensor(ones, ones.clone())  # around the setter, as a hook might
    snap = _snapshot(opt, [good])
    with pytest.raises(RuntimeError, match=f"a {what} \\((Two)?Tensor\\) has no memory of its own: a tensor subclass"):
        opt.step()
    _assert_untouched(opt, [good], snap)


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


# ---- grads that do not fit their param --------------------------------------------


@pytest.mark.parametrize("after", AFTER)
@pytest.mark.parametrize("bad", ["shape", "reshaped", "numel", "dtype", "non-contiguous-view"])
def test_bad_grad_after_good_steps(bad, after, device):
    params = _params(device)
    opt = PAIRS["AdamW"][0](params, **LAUNCH)
    _steps(opt, params, after)
    _fresh_grads(params)
    snap = _snapshot(opt, params)
    g = params[1].grad
    if bad == "shape":  # the grad setter checks sizes; .data does not
        g.data = torch.randn(5, device=device)
        match = "grad of shape"
    elif bad == "reshaped":  # as many elements, another shape: torch's step raises
        g.data = torch.randn(4, 6, device=device)
        match = "grad of shape"
    elif bad == "numel":
        g.resize_(5)
        match = "grad of shape"
    elif bad == "dtype":
        g.data = torch.randn(24, device=device, dtype=torch.float64)
        match = "float32 param steps with float32, float16, bfloat16 grads, got float64"
    else:  # same shape, other memory order: stepped by value, as torch does
        g.data = torch.randn(48, device=device)[::2]
        match = None
    if match is None:
        ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
        theirs = torch.optim.AdamW(ref, foreach=False)
        theirs.load_state_dict(copy.deepcopy(opt.state_dict()))
        for p, q in zip(params, ref):
            q.grad = p.grad.clone()
        opt.step()
        theirs.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        return
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    _assert_untouched(opt, params, snap)


@pytest.mark.gpu
@pytest.mark.parametrize("after", AFTER)
def test_grad_on_another_gpu_is_refused(after):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    params = _params(torch.device("cuda:0"))
    opt = PAIRS["AdamW"][0](params)
    _steps(opt, params, after)
    _fresh_grads(params)
    snap = _snapshot(opt, params)
    params[1].grad.data = torch.randn(24, device="cuda:1")
    with pytest.raises(RuntimeError, match="grad on cuda:1 but param on cuda:0"):
        opt.step()
    _assert_untouched(opt, params, snap)


@pytest.mark.parametrize("what,kept,after", [("grad", 0, after) for after in AFTER]
                         + [("grad", 8, 0), ("param", 8, 0), ("param", 8, 2)])
def test_freed_or_shrunk_storage_is_refused_not_read(what, kept, after):
    """A grad whose storage was freed (null pointer, as FSDP-style resize_(0) leaves it)
    crashed the process; a param or grad whose storage was shrunk under it
    (``untyped_storage().resize_(n)`` with n below its span) was read and written past
    the storage's end when its state was gathered. Both are now a clear error. (A param
    that moves is gathered afresh.)"""
    out = _run_isolated(f"""
        import torch, tritonadam
        p = [torch.nn.Parameter(torch.randn(24)), torch.nn.Parameter(torch.randn(3))]
        opt = tritonadam.AdamW(p, block_size=1024, num_warps=4)
        for _ in range({after}):
            for q in p: q.grad = torch.randn_like(q)
            opt.step()
        for q in p: q.grad = torch.randn_like(q)
        seen = 24 if "{what}" == "grad" else {kept}  # p[0]'s elements still in its storage
        before = [p[0].detach()[:seen].clone(), p[1].detach().clone()]
        t = p[0].grad if "{what}" == "grad" else p[0].data
        t.untyped_storage().resize_({kept} * t.element_size())
        try:
            opt.step()
        except RuntimeError as e:
            assert "a {what} has no storage for its (24,) elements" in str(e), e
            assert torch.equal(p[0].detach()[:seen], before[0]) and torch.equal(p[1].detach(), before[1])
            print("refused")
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused" in out.stdout


@pytest.mark.parametrize("call", ["step", "clip"])
@pytest.mark.parametrize("after", [0, 1, 3])
def test_grads_in_a_freed_flat_buffer_are_refused_not_read(call, after):
    """Grads that are views of one flat grad buffer (Megatron/DeepSpeed style), freed
    between steps: a view past the buffer's start then has its offset as its address,
    not null, and the cached step and clip read through it (a segfault here, an
    illegal address on a GPU). A reviewer's repro."""
    out = _run_isolated(f"""
        import torch, tritonadam
        p = [torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(48)),
             torch.nn.Parameter(torch.randn(5))]
        buf = torch.empty(68)
        opt = tritonadam.AdamW(p, block_size=1024, num_warps=4)
        for _ in range({after}):
            buf.normal_()
            p[0].grad, p[1].grad, p[2].grad = buf[4:20], buf[20:], torch.randn(5)
            opt.clip_grad_norm_(1.0)
            opt.step()
        buf.normal_()
        p[0].grad, p[1].grad, p[2].grad = buf[4:20], buf[20:], torch.randn(5)
        before = [q.detach().clone() for q in p]
        buf.untyped_storage().resize_(0)
        assert 0 < p[0].grad.data_ptr() < 2**40
        try:
            opt.clip_grad_norm_(1.0) if "{call}" == "clip" else opt.step()
        except RuntimeError as e:
            assert "a grad has no storage for its (16,) elements" in str(e), e
            assert all(torch.equal(q.detach(), b) for q, b in zip(p, before))
            print("refused")
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused" in out.stdout


@pytest.mark.parametrize("after", [1, 3])
def test_state_with_freed_storage_is_refused_not_written(after):
    """A state tensor whose memory was freed (``untyped_storage().resize_(0)``, as
    offloading code does) was written through on the cached path (torch.optim crashes
    too): every state tensor a launch writes is checked, each in its turn."""
    out = _run_isolated(f"""
        import torch, tritonadam
        cases = [(None, "exp_avg"), (None, "exp_avg_sq"), (None, "step"), ("8bit", "exp_avg_sq_8bit"),
                 ("8bit", "exp_avg_scales"), ("4bit", "exp_avg_4bit")]
        for state_dtype, key in cases:
            p = [torch.nn.Parameter(torch.randn(2000)), torch.nn.Parameter(torch.randn(3))]
            opt = tritonadam.AdamW(p, state_dtype=state_dtype, block_size=1024, num_warps=4)
            for _ in range({after}):
                for q in p: q.grad = torch.randn_like(q)
                opt.step()
            for q in p: q.grad = torch.randn_like(q)
            before = [q.detach().clone() for q in p]
            opt.state[p[0]][key].untyped_storage().resize_(0)
            try:
                opt.step()
            except RuntimeError as e:
                assert "no storage" in str(e) and key in str(e), e
                assert all(torch.equal(q.detach(), b) for q, b in zip(p, before))
                print("refused", key)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("refused") == 6, out.stdout


@pytest.mark.parametrize("pair", [("float32", "float64"), ("float16", "bfloat16"),
                                  ("bfloat16", "float16"), ("float64", "float32")])
def test_grad_dtype_pairs_outside_the_table_are_refused(pair, device):
    pdt, gdt = (getattr(torch, n) for n in pair)
    p = torch.nn.Parameter(torch.randn(8, device=device).to(pdt))
    p.grad_dtype = None  # allow any grad dtype, as mixed-precision code does
    p.grad = torch.randn(8, device=device).to(gdt)
    with pytest.raises(RuntimeError, match=f"{pair[0]} param steps with .* got {pair[1]}"):
        PAIRS["Adam"][0]([p], **LAUNCH).step()


# ---- params changed under their state ----------------------------------------------


@pytest.mark.parametrize("after", [1, 3])
@pytest.mark.parametrize("change,match", [
    ("bigger", "state\\['exp_avg'\\] has shape"),
    ("double", "state\\['exp_avg'\\] has dtype torch.float32 where a torch.float64 param"),
])
def test_param_replaced_under_its_state(change, match, after, device):
    params = _params(device)
    opt = PAIRS["AdamW"][0](params, **LAUNCH)
    _steps(opt, params, after)
    if change == "bigger":
        params[1].data = torch.randn(40, device=device)
    else:
        params[1].data = params[1].data.double()
    _fresh_grads(params)
    snap = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    _assert_untouched(opt, params, snap)
    assert "opt.state.pop(param)" in str(pytest.raises(RuntimeError, opt.step).value)


@pytest.mark.parametrize("after", [1, 3])
def test_param_storage_too_small_never_written_past_its_end(after):
    """State smaller than its param was written past its end before (SIGSEGV/SIGABRT)."""
    out = _run_isolated(f"""
        import torch, tritonadam
        p = [torch.nn.Parameter(torch.randn(16)) for _ in range(3)]
        opt = tritonadam.Adam(p, block_size=1024, num_warps=4)
        for _ in range({after}):
            for q in p: q.grad = torch.randn_like(q)
            opt.step()
        p[0].data = torch.randn(100000)
        for q in p: q.grad = torch.randn_like(q)
        try:
            opt.step()
        except RuntimeError as e:
            assert "has shape (16,) for a param of shape (100000,)" in str(e), e
            print("refused")
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused" in out.stdout


@pytest.mark.parametrize("after", [1, 3])
def test_column_major_param_steps_like_torch(after, device):
    """A param re-laid out under its state (same shape, other strides) is stepped as
    torch.optim steps it: element by element, by index."""
    params = _params(device, shapes=((16, 48),))
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = PAIRS["AdamW"][0](params, **LAUNCH)
    theirs = torch.optim.AdamW(ref, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for i in range(after + 3):
        if i == after:
            for p in params + ref:
                p.data = p.data.t().contiguous().t()
            assert not params[0].is_contiguous()
        _step_both(ours, theirs, params, ref, gen)
        torch.testing.assert_close(params[0], ref[0], atol=1e-6, rtol=1e-5)
    _assert_like_torch(ours, theirs, params, ref, keys=("exp_avg",))


# ---- state tensors moved or replaced between steps -----------------------------------


def test_state_moved_under_the_same_tensors_is_followed():
    """State-offloading code moves each state tensor with ``t.data = t.data.to(...)``: the
    same tensor objects, new storage. The cached tables pointed at the old storage
    (freed: a write after free), and the tensors the user holds were never updated."""
    out = _run_isolated("""
        import gc, torch, tritonadam
        gen = torch.Generator().manual_seed(0)
        p = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (24, 4096, 7)]
        q = [torch.nn.Parameter(x.detach().clone()) for x in p]
        ours = tritonadam.AdamW(p, block_size=1024, num_warps=4)
        theirs = torch.optim.AdamW(q, foreach=False)
        for i in range(6):
            for a, b in zip(p, q):
                g = torch.randn(a.shape, generator=gen)
                a.grad, b.grad = g.clone(), g.clone()
            if i == 3:  # offload and restore, as a memory-saving eval loop does
                for opt in (ours, theirs):
                    for s in opt.state.values():
                        for v in s.values():
                            v.data = v.data.clone()  # new storage; the old one is freed
                gc.collect()
                [torch.full((n,), float("nan")) for n in (24, 4096, 7)]  # reuse freed memory
            ours.step()
            theirs.step()
        for a, b in zip(p, q):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
            for k in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(ours.state[a][k], theirs.state[b][k], atol=1e-6, rtol=1e-5)
        print("followed")
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "followed" in out.stdout


@pytest.mark.parametrize("change", ["param-moved", "param-grown", "state-moved", "param-freed", "state-freed"])
def test_tensors_moved_between_a_clip_and_its_step_are_followed(change):
    """The step right after ``clip_grad_norm_`` reused the clip's check of params and
    state: a param or state tensor moved in between (``.data = ...``, a storage regrown;
    a step pre-hook reloading offloaded state) was written at its old address, and a
    storage freed in between was written after free (the process aborted). Now the step
    follows the move with the clip's coefficient (its grads are the ones measured), or
    refuses the freed memory."""
    out = _run_isolated(f"""
        import warnings, torch, tritonadam
        gen = torch.Generator().manual_seed(0)
        p = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (2000, 3)]
        q = [torch.nn.Parameter(x.detach().clone()) for x in p]
        ours = tritonadam.AdamW(p, lr=0.1, block_size=1024, num_warps=4)
        theirs = torch.optim.AdamW(q, lr=0.1, foreach=False)
        for i in range(3):
            for a, b in zip(p, q):
                g = torch.randn(a.shape, generator=gen)
                a.grad, b.grad = g.clone(), g.clone()
            if i < 2:
                ours.step(); theirs.step()
        warnings.simplefilter("error")  # a coefficient dropped would warn
        ours.clip_grad_norm_(0.5)
        torch.nn.utils.clip_grad_norm_(q, 0.5, foreach=False)
        change, before = "{change}", [x.detach().clone() for x in p]
        if change == "param-moved":
            p[0].data = p[0].data.clone()
        elif change == "param-grown":  # new memory, the same values
            p[0].untyped_storage().resize_(2 * p[0].untyped_storage().nbytes())
        elif change == "state-moved":
            for opt, x in ((ours, p[0]), (theirs, q[0])):
                opt.state[x]["exp_avg"].data = opt.state[x]["exp_avg"].data.clone()
        elif change == "param-freed":
            p[0].untyped_storage().resize_(0)
        else:
            ours.state[p[0]]["exp_avg_sq"].untyped_storage().resize_(0)
        try:
            ours.step()
        except RuntimeError as e:
            assert change.endswith("freed") and "no storage for its (2000,) elements" in str(e), e
            assert torch.equal(p[1].detach(), before[1])
            print("refused")
        else:
            theirs.step()
            for a, b in zip(p, q):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
                for k in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(ours.state[a][k], theirs.state[b][k], atol=1e-6, rtol=1e-5)
            print("followed")
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("refused" if change.endswith("freed") else "followed") in out.stdout


@pytest.mark.parametrize("after", [1, 3])
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "step", "step-float64"])
def test_state_tensor_replaced_in_its_dict_is_stepped(key, after, device):
    """Also a float32 step count replaced by a float64 one after cached steps: the kernel
    must read and advance it as float64 (its table row says which)."""
    key, dtype = ("step", torch.float64) if key == "step-float64" else (key, None)
    params = _params(device)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = PAIRS["AdamW"][0](params, **LAUNCH)
    theirs = torch.optim.AdamW(ref, foreach=False)
    gen = torch.Generator().manual_seed(4)
    for i in range(after + 2):
        if i == after:
            for opt, ps in ((ours, params), (theirs, ref)):
                s = opt.state[ps[1]]
                s[key] = s[key] * (1 if key == "step" else 0.5)  # a new tensor in the same dict
                if dtype is not None:
                    s[key] = s[key].to(dtype)
        _step_both(ours, theirs, params, ref, gen)
    _assert_like_torch(ours, theirs, params, ref)


@pytest.mark.parametrize("edit", ["entry", "reset-one"])
def test_state_edits_are_seen_without_dict_version_tags(edit, device, monkeypatch):
    """Where torch or Python lacks dict version tags, the check compares the dicts and
    their values by identity instead."""
    import tritonadam.step_cache as step_cache

    monkeypatch.setattr(step_cache, "_dict_version", None)
    params = _params(device)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = PAIRS["Adam"][0](params, **LAUNCH)
    theirs = torch.optim.Adam(ref, foreach=False)
    gen = torch.Generator().manual_seed(8)
    for i in range(5):
        if i == 3:
            for opt, ps in ((ours, params), (theirs, ref)):
                if edit == "entry":
                    opt.state[ps[2]]["exp_avg_sq"] = opt.state[ps[2]]["exp_avg_sq"] * 2
                else:
                    opt.state[ps[2]] = {}
        _step_both(ours, theirs, params, ref, gen)
    _assert_like_torch(ours, theirs, params, ref)


# ---- params that share memory --------------------------------------------------------


@pytest.mark.parametrize("how,after", [("same-data", 0), ("overlapping-views", 0),
                                       ("strided-views", 0), ("row-and-strided-column", 0),
                                       ("data-assigned", 0), ("data-assigned", 3)])
def test_params_sharing_memory_are_refused(how, after, device):
    """Two Parameter objects over one storage (weights tied by value) would be two rows
    of one launch updating the same memory concurrently on a GPU."""
    params = _params(device, shapes=((4, 6), (24,), (12,)))
    if how == "same-data":
        params[2] = torch.nn.Parameter(params[1].data[:12])
    elif how == "overlapping-views":
        base = torch.randn(30, device=device)
        params[1], params[2] = torch.nn.Parameter(base[:24]), torch.nn.Parameter(base[18:])
    elif how == "strided-views":  # every other column and every fourth: columns 0 and 4 shared
        base = torch.randn(3, 8, device=device)
        params[1], params[2] = torch.nn.Parameter(base[:, 0::2]), torch.nn.Parameter(base[:, 0::4])
    elif how == "row-and-strided-column":  # element (1, 1) in both
        base = torch.randn(3, 8, device=device)
        params[1], params[2] = torch.nn.Parameter(base[1]), torch.nn.Parameter(base[:, 1])
    opt = PAIRS["AdamW"][0](params, **LAUNCH)
    _steps(opt, params, after)
    if how == "data-assigned":
        params[2].data = params[1].data[6:18]
    _fresh_grads(params)
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match="share memory .* one nn.Parameter object"):
        opt.step()
    _assert_untouched(opt, params, snap)


@pytest.mark.parametrize("layout", ["flat", "interleaved", "strided-around-a-row"])
def test_disjoint_views_of_one_buffer_step_like_torch(layout, device):
    """Params that are disjoint views of one buffer are fine: a flattened-parameter layout,
    and views whose memory spans overlap without an element in common (a buffer's even
    and odd columns; a column, with a slice of a row between its elements)."""
    if layout == "flat":
        base = torch.randn(40, device=device)
        params = [torch.nn.Parameter(base[:16]), torch.nn.Parameter(base[16:40].view(4, 6))]
    elif layout == "interleaved":
        base = torch.randn(4, 6, device=device)
        params = [torch.nn.Parameter(base[:, 0::2]), torch.nn.Parameter(base[:, 1::2])]
    else:
        base = torch.randn(4, 8, device=device)
        params = [torch.nn.Parameter(base[:, 0]), torch.nn.Parameter(base[1, 2:6])]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = PAIRS["AdamW"][0](params, **LAUNCH)
    theirs = torch.optim.AdamW(ref, foreach=False)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        _step_both(ours, theirs, params, ref, gen)
    _assert_like_torch(ours, theirs, params, ref)
    assert params[0].data_ptr() == base.data_ptr()  # stepped in place


# ---- load_state_dict is all or nothing -----------------------------------------------


@pytest.mark.parametrize("bad", ["shape", "missing-step", "adamax-into-adamw", "step-numel", "step-string",
                                 "step-negative", "step-negative-number", "seed-two-elements", "seed-string", "moment-on-meta",
                                 "seed-through-torch", "scales-as-list", "remainder-through-torch"])
def test_bad_state_dict_is_refused_and_changes_nothing(bad, device):
    params = _params(device)
    opt = PAIRS["AdamW"][0](params, **({"state_dtype": "8bit"} if bad == "scales-as-list" else {}), **LAUNCH)
    _steps(opt, params, 2)
    sd = copy.deepcopy(opt.state_dict())
    if bad == "shape":
        sd["state"][2]["exp_avg"] = torch.zeros(3, device=device)
        match = "state 'exp_avg' of param 2 has shape \\(3,\\), but the param has shape \\(5,\\)"
    elif bad == "missing-step":
        del sd["state"][1]["step"]
        match = "lacks \\['step'\\]"
    elif bad == "step-numel":
        sd["state"][1]["step"] = torch.tensor([1.0, 2.0])
        match = "has 2 elements"
    elif bad == "step-string":
        sd["state"][1]["step"] = "3"
        match = "state 'step' of param 1 is '3', expected a number"
    elif bad in ("step-negative", "step-negative-number"):
        # -1 steps to a count of 0: bias correction 0, NaN params (torch.optim's
        # single-tensor step raises ZeroDivisionError there)
        sd["state"][1]["step"] = torch.tensor(-1.0) if bad == "step-negative" else -2
        match = ("state 'step' of param 1 is -(1 or below|2): the next step would count 0 or fewer "
                 "steps.*expected a step count >= 0")
    elif bad in ("seed-two-elements", "seed-string"):
        sd["state"][1]["rounding_seed"] = torch.tensor([3, 4]) if bad == "seed-two-elements" else "3"
        match = "state 'rounding_seed' of param 1 .* expected (one )?(an )?integer"
    elif bad == "seed-through-torch":  # torch.optim's load casts state tensors to the param dtype
        sd["state"][1]["rounding_seed"] = torch.tensor(2**40 + 5).to(torch.bfloat16)
        match = "went through torch.optim: remove 'rounding_seed'"
    elif bad == "remainder-through-torch":  # without its master: the low bits are lost
        shape = sd["state"][1]["exp_avg"].shape
        sd["state"][1]["master_param_remainder"] = torch.randint(-2**15, 2**15, shape).to(torch.bfloat16)
        match = "'master_param_remainder' of param 1 has dtype torch.bfloat16, expected int16 or int32"
    elif bad == "scales-as-list":
        sd["state"][1]["exp_avg_scales"] = sd["state"][1]["exp_avg_scales"].tolist()
        match = "comes with 'exp_avg_scales' as a list, not a tensor"
    elif bad == "moment-on-meta":
        sd["state"][1]["exp_avg"] = torch.empty(sd["state"][1]["exp_avg"].shape, device="meta")
        match = "state 'exp_avg' of param 1 is on the meta device"
    else:
        other = PAIRS["Adamax"][0](params, **LAUNCH)
        _steps(other, params, 1)
        sd = copy.deepcopy(other.state_dict())
        match = "state dict of Adamax"
    snap = _snapshot(opt, params)
    groups = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_untouched(opt, params, snap)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in groups]
    _steps(opt, params, 1)  # still steps


@pytest.mark.parametrize("name,step,refused", [("AdamW", -0.5, False), ("AdamW", -1.0, True),
                                               ("Adamax", -2.0, False), ("Adamax", -1.0, True)])
def test_negative_loaded_steps_refused_where_the_next_step_would_be_nan(name, step, refused, device):
    """A count whose next step counts 0 steps (or, for Adam, fewer) has a bias correction
    of 0 (or a negative one under a root): refused at the load. Others step as torch.optim's."""
    params = _params(device)
    ours, theirs = PAIRS[name]
    opt = ours(params, **LAUNCH)
    _steps(opt, params, 2)
    for as_tensor in (True, False):
        sd = copy.deepcopy(opt.state_dict())
        sd["state"][1]["step"] = torch.tensor(step) if as_tensor else step
        if refused:
            snap = _snapshot(opt, params)
            with pytest.raises(ValueError, match="expected a step count >= 0"):
                opt.load_state_dict(sd)
            _assert_untouched(opt, params, snap)
        else:
            ref = [p.detach().clone().requires_grad_() for p in params]
            torch_opt = theirs(ref, foreach=False)
            torch_opt.load_state_dict(sd)
            opt.load_state_dict(sd)
            grads = [torch.randn_like(p) for p in params]
            for p, r, g in zip(params, ref, grads):
                p.grad, r.grad = g.clone(), g.clone()
            opt.step()
            torch_opt.step()
            for p, r in zip(params, ref):
                assert torch.isfinite(p).all()
                torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)


# ---- group values changed after construction ----------------------------------------


@pytest.mark.parametrize("after", AFTER)
@pytest.mark.parametrize("key,value,match", [
    ("lr", "two-element", "Tensor lr must be 1-element"),
    ("betas", (0.9, "two-element"), "Tensor betas\\[1\\] must be 1-element"),
    ("weight_decay", None, "must be numbers .* weight_decay=None"),
    ("eps", "1e-8", "must be numbers .* eps='1e-8'"),
    ("lr", "1e-3", "must be numbers .* lr='1e-3'"),
    ("betas", (None, 0.999), "must be numbers .* betas=\\(None, 0.999\\)"),
])
def test_group_values_changed_by_hand_are_checked_each_step(key, value, match, after, device):
    params = _params(device)
    opt = PAIRS["AdamW"][0]([{"params": params[:2]}, {"params": params[2:], "lr": 1e-2}], **LAUNCH)
    _steps(opt, params, after)
    _fresh_grads(params)
    snap = _snapshot(opt, params)
    two = torch.tensor([1e-3, 2e-3], device=device)
    if value == "two-element":
        value = two
    elif key == "betas" and "two-element" in value:
        value = (value[0], two)
    typed = value is None or isinstance(value, str) or (isinstance(value, tuple) and None in value)
    opt.param_groups[1][key] = value
    with pytest.raises(TypeError if typed else ValueError, match=match):
        opt.step()
    _assert_untouched(opt, params, snap)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax"])
@pytest.mark.parametrize("key,value", [
    ("lr", -1e-3), ("betas", (-0.5, 0.999)), ("betas", (22.0, 0.999)), ("betas", (0.9, -0.5)),
    ("eps", -1e-8), ("weight_decay", -0.1),
])
def test_group_values_out_of_torchs_construction_bounds_step_as_torch(name, key, value, device):
    """torch.optim checks lr, betas, eps and weight_decay at construction only; a scheduler
    may write any number after it (torch's own test_cycle_lr_with_adam cycles beta1 up to
    22, a LambdaLR can drive lr below 0), and torch steps with it."""
    ours_cls, torch_cls = PAIRS[name]
    params = _params(device)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    extra = dict(weight_decay=0.01) if name != "AdamW" else {}
    ours = ours_cls([{"params": params[:2]}, {"params": params[2:]}], **LAUNCH, **extra)
    theirs = torch_cls([{"params": ref[:2]}, {"params": ref[2:]}], **extra)
    gen = torch.Generator().manual_seed(3)
    _step_both(ours, theirs, params, ref, gen)
    for opt in (ours, theirs):
        opt.param_groups[1][key] = value
    for _ in range(3):
        _step_both(ours, theirs, params, ref, gen)
    keys = ("exp_avg", "exp_inf", "step") if name == "Adamax" else ("exp_avg", "exp_avg_sq", "step")
    for p, q in zip(params, ref):  # a negative beta2 makes second moments negative: NaN, as torch's
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, equal_nan=True)
        for k in keys:
            torch.testing.assert_close(ours.state[p][k].cpu(), theirs.state[q][k].cpu(), atol=1e-6,
                                       rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("beta1", [1.0, -1.0])
def test_a_beta_of_one_steps_as_torchs_fused_step(beta1):
    """torch's default for-loop divides by 1 - 1**t = 0 in Python (ZeroDivisionError); its
    fused step divides lr by +0 and steps to inf of the update's sign: so does ours (the
    bias correction was -0, which stepped to the other infinity)."""
    params = _params("cpu")
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = tritonadam.AdamW(params, **LAUNCH), torch.optim.AdamW(ref, fused=True)
    gen = torch.Generator().manual_seed(3)
    _step_both(ours, theirs, params, ref, gen)
    for opt in (ours, theirs):
        opt.param_groups[0]["betas"] = (beta1, 0.999)
    _step_both(ours, theirs, params, ref, gen)
    for p, q in zip(params, ref):
        assert torch.isinf(q).any()
        torch.testing.assert_close(p, q, equal_nan=True)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_state_keeps_an_eps_set_negative_or_nan(bits):
    """A negative or NaN eps written after construction enters the quantized update as it
    is (it was taken as 0 there), as the dense update and torch take it."""
    torch.manual_seed(0)
    base = torch.randn(256)
    runs = {}
    for eps in (-3e-3, float("nan"), 0.0):
        p, q = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
        ours = tritonadam.AdamW([p], lr=0.1, state_dtype=f"{bits}bit", **LAUNCH)
        theirs = torch.optim.AdamW([q], lr=0.1)
        gen = torch.Generator().manual_seed(1)
        _step_both(ours, theirs, [p], [q], gen)
        for opt in (ours, theirs):
            opt.param_groups[0]["eps"] = eps
        _step_both(ours, theirs, [p], [q], gen)
        runs[eps] = p.detach().clone()
        if eps != eps:
            assert p.isnan().all() and q.isnan().all()
        elif bits == 8:
            torch.testing.assert_close(p, q, atol=5e-3, rtol=0)
    assert (runs[-3e-3] - runs[0.0]).abs().max() > 1e-3


def test_a_numpy_scalar_lr_steps_as_a_float():
    np = pytest.importorskip("numpy")
    for lr in (np.array(1e-3), np.float32(1e-3), np.float64(1e-3)):
        params = _params("cpu")
        ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
        ours, theirs = tritonadam.Adam(params, **LAUNCH), torch.optim.Adam(ref)
        for opt in (ours, theirs):
            opt.param_groups[0]["lr"] = lr
        _step_both(ours, theirs, params, ref, torch.Generator().manual_seed(3))
        _assert_like_torch(ours, theirs, params, ref)


# ---- the same param twice ------------------------------------------------------------


@pytest.mark.parametrize("after", AFTER)
@pytest.mark.parametrize("where", ["same-group", "other-group", "add_param_group"])
def test_a_param_listed_twice_is_refused(where, after, device):
    """Two rows of one launch would update the same memory concurrently on a GPU."""
    params = _params(device)
    opt = PAIRS["Adam"][0]([{"params": params[:2]}, {"params": params[2:]}], **LAUNCH)
    _steps(opt, params, after)
    _fresh_grads(params)
    snap = _snapshot(opt, params)
    if where == "same-group":
        opt.param_groups[0]["params"].append(params[0])
        match = "appears more than once in a param group"
    elif where == "other-group":
        opt.param_groups[1]["params"].append(params[0])
        match = "some parameters appear in more than one parameter group"
    else:
        with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
            opt.add_param_group({"params": [params[1]]})
        return
    with pytest.raises(ValueError, match=match):
        opt.step()
    _assert_untouched(opt, params, snap)


# ---- state and groups edited between steps, as torch.optim allows ---------------------


@pytest.mark.parametrize("edit,match", [pytest.param(edit, match, id=edit) for edit, match in [
    ("step-none", "state\\['step'\\] of a param of shape \\(24,\\) is a NoneType, not a step count"),
    ("step-two-elements", "is a float32 tensor of shape \\(2,\\), not a step count"),
    ("state-none", "the state of a param of shape \\(24,\\) is a NoneType, not a dict"),
    ("bf16-state-int16", "dtype torch.int16 where a torch.float32 param's state is float32 or bfloat16"),
    ("negated-moment", "state\\['exp_avg'\\] is a lazily negated or conjugated view"),
    ("exp_avg-none", "state\\['exp_avg'\\] of a param of shape \\(24,\\) is None, not a tensor"),
    ("exp_avg_sq-none", "state\\['exp_avg_sq'\\] of a param of shape \\(24,\\) is None, not a tensor"),
    ("exp_avg-none-beside-8bit-codes", "state\\['exp_avg'\\] of a param of shape \\(24,\\) is None"),
]])
def test_state_set_by_hand_to_what_is_not_state_says_what_is_wrong(edit, match, device):
    """These raised Python's own words (``float() argument must be ... NoneType``, ``'NoneType'
    object has no attribute 'items'``) or named only one of the dtypes a moment may have. A
    moment set to None was made anew as zeros while the step count went on (a wrong bias
    correction: twice torch's update for exp_avg_sq), where torch raises; beside 8-bit codes
    it was saved in state_dict(), which load_state_dict then refused."""
    params = _params(device)
    fmt = "8bit" if edit.endswith("8bit-codes") else torch.bfloat16
    opt = PAIRS["AdamW"][0](params, state_dtype=fmt, **LAUNCH)
    _steps(opt, params, 2)
    edited = (params[1].detach().clone(), dict(opt.state[params[1]]))
    if edit.startswith("exp_avg"):
        opt.state[params[1]][edit.split("-")[0]] = None
    elif edit == "step-none":
        opt.state[params[1]]["step"] = None
    elif edit == "step-two-elements":
        opt.state[params[1]]["step"] = torch.tensor([2.0, 2.0])
    elif edit == "state-none":
        opt.state[params[1]] = None
    elif edit == "negated-moment":  # the same values, held lazily
        opt.state[params[1]]["exp_avg"] = torch._neg_view(-opt.state[params[1]]["exp_avg"])
    else:
        opt.state[params[1]]["exp_avg"] = torch.zeros(24, dtype=torch.int16, device=device)
    _fresh_grads(params)
    others = [params[0], params[2]]
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in others]
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    for p, (value, state) in zip(others, before):
        assert torch.equal(p.detach(), value)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    assert torch.equal(params[1].detach(), edited[0])
    if edit.startswith("exp_avg"):
        state = opt.state[params[1]]
        assert all(state[k] is v for k, v in edited[1].items() if state[k] is not None)


@pytest.mark.parametrize("reset", ["new-defaultdict", "clear", "pop-one", "empty-dict-one"])
def test_state_reset_by_hand_restarts_like_torch(reset, device):
    params = _params(device)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = PAIRS["AdamW"][0](params, **LAUNCH)
    theirs = torch.optim.AdamW(ref, foreach=False)
    gen = torch.Generator().manual_seed(5)

    def step():
        _step_both(ours, theirs, params, ref, gen)
        _assert_like_torch(ours, theirs, params, ref, keys=())

    for _ in range(3):
        step()
    for opt, ps in ((ours, params), (theirs, ref)):
        if reset == "new-defaultdict":
            opt.state = defaultdict(dict)
        elif reset == "clear":
            opt.state.clear()
        elif reset == "pop-one":
            opt.state.pop(ps[1])
        else:
            opt.state[ps[1]] = {}
    for _ in range(2):
        step()
    assert ours.state[params[1]]["step"].item() == theirs.state[ref[1]]["step"].item()


def test_param_swapped_in_a_group_is_stepped(device):
    params = _params(device)
    opt = PAIRS["Adam"][0](params, **LAUNCH)
    _steps(opt, params, 2)
    swapped = torch.nn.Parameter(torch.randn(24, device=device))
    opt.param_groups[0]["params"][1] = swapped
    before = swapped.detach().clone()
    _fresh_grads([params[0], swapped, params[2]])
    opt.step()
    assert not torch.equal(swapped.detach(), before)
    assert opt.state[swapped]["step"].item() == 1


def test_amsgrad_switched_on_after_steps(device):
    params = _params(device)
    opt = PAIRS["Adam"][0](params, **LAUNCH)
    _steps(opt, params, 2)
    opt.param_groups[0]["amsgrad"] = True
    _steps(opt, params, 1)
    for p in params:
        s = opt.state[p]
        assert torch.equal(s["max_exp_avg_sq"], s["exp_avg_sq"])  # started at zeros


# ---- our own options ----------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=1000), "Invalid block_size"),
    (dict(block_size=8), "Invalid block_size"),
    (dict(num_warps=3), "Invalid num_warps"),
    (dict(autotune="sometimes"), "Invalid autotune"),
    (dict(differentiable=True, master_weights=True), "differentiable=True steps with torch.optim"),
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(eps=-1.0), "Invalid epsilon"),
    (dict(block_size=2**40), "Invalid block_size"),
    (dict(block_size=2**17), "Invalid block_size"),
    (dict(block_size=True), "Invalid block_size"),
    (dict(num_warps=64), "Invalid num_warps"),
    (dict(master_weights="yes"), "Invalid master_weights"),
    (dict(bias_correction=None), "Invalid bias_correction"),
    (dict(persistent="sometimes"), "Invalid persistent"),
    # Equal to allowed values but of another type: Triton's CUDA backend refuses a float
    # num_warps at the launch, after the step counts had advanced.
    (dict(num_warps=4.0), "Invalid num_warps"),
    (dict(num_warps=True), "Invalid num_warps"),
    (dict(persistent=1), "Invalid persistent"),
    (dict(persistent=0.0), "Invalid persistent"),
])
def test_options_are_bounded_at_construction(kwargs, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        PAIRS["AdamW"][0]([torch.nn.Parameter(torch.randn(3))], **kwargs)


# ---- a drop-in leaves no trace -------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("options", [{}, {"stochastic_rounding": True}], ids=["defaults", "sr"])
def test_constructing_and_stepping_leave_torchs_random_stream_alone(name, options, device):
    """Seeding, then building the optimizer, gives the same random numbers as seeding
    alone: the stochastic-rounding seed is read from torch.initial_seed(), not drawn."""
    params = [torch.nn.Parameter(torch.randn(5, device=device).to(torch.bfloat16))]
    torch.manual_seed(1)
    before = torch.get_rng_state()
    opt = PAIRS[name][0](params, **options, **LAUNCH)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert torch.equal(torch.get_rng_state(), before)
    assert (opt.seed is None) == (not options)
    if options:
        assert opt.seed == 1  # reproducible from torch.manual_seed


def test_importing_leaves_the_process_as_it_was():
    """``import tritonadam`` loads no compiler stack: torch.optim's own decorator loads
    dynamo at the first step, not at import (loading it sets TORCHINDUCTOR_CACHE_DIR,
    creates a temp folder and adds warning filters)."""
    out = _run_isolated("""
        import os, sys, warnings
        import numpy, torch, triton, triton.language  # what tritonadam builds on: their own filters
        env, filters = dict(os.environ), list(warnings.filters)
        import tritonadam
        assert "torch._dynamo" not in sys.modules
        assert dict(os.environ) == env, set(os.environ) ^ set(env)
        assert list(warnings.filters) == filters
        print("clean")
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "clean" in out.stdout


def test_meta_params_step_shape_only_like_torch():
    """torch.optim steps meta params (model-size dry runs): state on meta, no error."""
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
        ref = torch.nn.Linear(3, 2)
    ours, theirs = PAIRS["AdamW"][0](model.parameters()), torch.optim.AdamW(ref.parameters())
    for _ in range(2):
        for p, q in zip(model.parameters(), ref.parameters()):
            p.grad, q.grad = torch.empty_like(p), torch.empty_like(q)
        ours.step()
        theirs.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert set(ours.state[p]) == set(theirs.state[q])
        assert ours.state[p]["exp_avg"].is_meta and ours.state[p]["exp_avg"].shape == p.shape
        assert p._version >= 2  # bumped each step, as torch's in-place ops bump it
        # the count on the CPU and counted, as torch's: a meta count holds no value
        step = ours.state[p]["step"]
        assert step.device.type == "cpu" and step.item() == theirs.state[q]["step"].item() == 2
    # so the dry run's state dict loads back, into it and into a fresh optimizer
    ours.load_state_dict(ours.state_dict())
    fresh = PAIRS["AdamW"][0](model.parameters())
    fresh.load_state_dict(ours.state_dict())
    fresh.step()
    assert all(fresh.state[p]["step"].item() == 3 for p in model.parameters())


@pytest.mark.parametrize("options", [{}, {"state_dtype": "8bit"}])
def test_meta_params_made_real_in_place_after_a_dry_run_are_not_left_unstepped(options):
    """A dry-run step on meta params, then the same Parameter objects made real in place
    (`torch.utils.swap_tensors`, as `to_empty` with swapping and `Module._apply` for
    DTensors do): the steps after it silently did nothing (tables built without the meta
    params were reused). torch raises (meta state under a real param); so must we, with the
    params untouched, and after the state is cleared the param trains."""
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    opt = PAIRS["AdamW"][0](model.parameters(), lr=0.1, **options, **LAUNCH)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    gen = torch.Generator().manual_seed(3)
    for p in list(model.parameters()):
        torch.utils.swap_tensors(p, torch.nn.Parameter(torch.randn(p.shape, generator=gen)))
        p.grad = torch.randn(p.shape, generator=gen)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="meta"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.state.clear()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_stepped_param_swapped_onto_meta_under_its_state_is_refused():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = PAIRS["AdamW"][0]([p], lr=0.1, **LAUNCH)
    p.grad = torch.randn(3, 4)
    opt.step()
    saved = copy.deepcopy(opt.state[p])
    torch.utils.swap_tensors(p, torch.nn.Parameter(torch.empty(3, 4, device="meta")))
    p.grad = torch.empty_like(p)
    with pytest.raises(RuntimeError, match=r"meta device, but its state\['exp_avg'\] is on cpu"):
        opt.step()
    assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())


@pytest.mark.parametrize("non_dense", [False, True])
def test_an_inference_tensor_param_is_refused_before_anything_is_written(non_dense):
    """torch.optim's in-place ops raise on a param made under inference_mode; the kernels
    stepped a dense one silently, and a non-dense one failed in its copy back, after the
    launch had advanced the state of params whose values it then never wrote."""
    gen = torch.Generator().manual_seed(4)
    good = torch.nn.Parameter(torch.randn(4, generator=gen))
    with torch.inference_mode():
        base = torch.randn(4, 6)
    bad = base[:, ::2] if non_dense else base
    later = torch.nn.Parameter(torch.randn(4, 6, generator=gen)[:, ::2])
    opt = PAIRS["AdamW"][0]([good, bad, later], lr=0.1, **LAUNCH)
    for t in (good, bad, later):
        t.grad = torch.randn(t.shape, generator=gen)
    before = [t.detach().clone() for t in (good, bad, later)]
    with pytest.raises(RuntimeError, match="inference tensor"):
        opt.step()
    assert all(torch.equal(t, b) for t, b in zip((good, bad, later), before))
    assert not opt.state


def test_inference_tensor_params_clip_outside_and_step_inside_inference_mode_as_torch():
    """A clip reads grads alone: params made under inference_mode are refused only by a
    step outside it, not by the clip, and a step inside it works as torch's does."""
    def run(cls, clip):
        gen = torch.Generator().manual_seed(6)
        with torch.inference_mode():
            p = torch.randn(6, generator=gen)
        opt = cls([p], lr=0.1, **(LAUNCH if cls is not torch.optim.AdamW else {}))
        p.grad = torch.randn(6, generator=gen) * 5
        norm = clip(opt, p)
        with torch.inference_mode():
            opt.step()
        return norm, p.clone()

    theirs = run(torch.optim.AdamW, lambda opt, p: torch.nn.utils.clip_grad_norm_([p], 1.0))
    ours = run(PAIRS["AdamW"][0], lambda opt, p: opt.clip_grad_norm_(1.0))
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])


def test_an_inference_tensor_param_stepped_outside_after_a_cached_step_inside_is_refused():
    """The cache built by a step inside inference_mode is not reused by one outside it."""
    with torch.inference_mode():
        p = torch.randn(8)
    opt = PAIRS["AdamW"][0]([p], lr=0.1, **LAUNCH)
    p.grad = torch.randn(8)
    with torch.inference_mode():
        opt.step()
    before, saved = p.clone(), copy.deepcopy(opt.state[p])
    with pytest.raises(RuntimeError, match="inference tensor"):
        opt.step()
    assert torch.equal(p, before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())


def test_a_clip_of_meta_params_left_without_a_step_leaves_no_state_as_torch():
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    opt = PAIRS["AdamW"][0](model.parameters(), **LAUNCH)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.clip_grad_norm_(1.0)
    opt.zero_grad()
    opt.step()
    assert not opt.state


def test_meta_params_in_a_capturable_group_are_refused():
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    opt = PAIRS["AdamW"][0](model.parameters(), capturable=True, **LAUNCH)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    with pytest.raises(RuntimeError, match="meta device in a group with capturable=True"):
        opt.step()
    assert not opt.state


def test_a_refused_master_conversion_keeps_the_master():
    """bf16 params made under inference_mode, fp32 masters in their state, a remainder
    optimizer: converting the master writes the param, which torch refuses outside
    inference_mode; the master must survive the refusal (it was popped first)."""
    gen = torch.Generator().manual_seed(8)
    with torch.inference_mode():
        p = torch.randn(40, generator=gen).to(torch.bfloat16)
    master = p.float() + torch.randn(40, generator=gen) * 1e-3
    opt = PAIRS["AdamW"][0]([p], master_weights="remainder", **LAUNCH)
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(40), "exp_avg_sq": torch.zeros(40),
                    "master_param": master.clone()}
    p.grad = torch.randn(40, generator=gen).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="inference"):
        opt.clip_grad_norm_(1.0)
    assert torch.equal(opt.state[p]["master_param"], master)


def test_a_fake_tensor_param_is_refused_as_such():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p = torch.nn.Parameter(torch.randn(3, 4))
        opt = PAIRS["AdamW"][0]([p], lr=0.1, **LAUNCH)
        p.grad = torch.ones(3, 4)
        with pytest.raises(RuntimeError, match="FakeTensor .* meta device"):
            opt.step()


def test_shared_memory_error_names_both_tensors_plainly(device):
    base = torch.randn(4, 4, device=device)
    a, b = torch.nn.Parameter(base), torch.nn.Parameter(base[:2])
    opt = PAIRS["Adam"][0]([a, b], **LAUNCH)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    with pytest.raises(ValueError) as err:
        opt.step()
    assert "a param of shape (4, 4) and a param of shape (2, 4) share memory" in str(err.value)
    assert "of a param of a param" not in str(err.value)


@pytest.mark.parametrize("options, why", [
    # it names the way that needs the option at construction: bf16 layers added later
    # (a LoRA fine-tune unfreezing base layers of a bf16 model beside fp32 adapters)
    ({"master_weights": True}, "master_weights=True .* their own master.*add_param_group"),
    ({"master_weights": True, "state_dtype": "8bit"}, "master_weights=True .* their own master"),
    ({"stochastic_rounding": True}, "stochastic_rounding=True .* round nothing"),
    ({"master_weights": "remainder", "stochastic_rounding": False}, "master_weights='remainder'"),
])
def test_options_that_change_nothing_warn(options, why):
    with pytest.warns(UserWarning, match="nothing for these params") as record:
        PAIRS["AdamW"][0]([torch.nn.Parameter(torch.randn(3))], **options)
    messages = [str(w.message) for w in record if "nothing for these params" in str(w.message)]
    assert len(messages) == 1 and re.search(why, messages[0]), messages  # why, per option


def test_options_that_do_something_do_not_warn(recwarn):
    PAIRS["AdamW"][0]([torch.nn.Parameter(torch.randn(3)),
                       torch.nn.Parameter(torch.randn(3).to(torch.bfloat16))], master_weights=True)
    PAIRS["AdamW"][0]([torch.nn.Parameter(torch.randn(3))], stochastic_rounding=True,
                      state_dtype=torch.bfloat16)
    PAIRS["AdamW"][0]([torch.nn.Parameter(torch.randn(3))], stochastic_rounding=True,
                      state_dtype="4bit")  # the codes are rounded stochastically
    assert not [w for w in recwarn if "nothing for these params" in str(w.message)]


@pytest.mark.parametrize("switch, value", [("TRITONADAM_AUTOTUNE", "bogus"),
                                           ("TRITONADAM_AUTOTUNE_BUDGET", "10s"),
                                           ("TRITONADAM_AUTOTUNE_COMPILE_BUDGET", "inf")])
def test_a_bad_autotune_switch_fails_before_anything_changes(switch, value, monkeypatch, device):
    """A bad budget raised in the first-use tuning, after the step counts had advanced."""
    params = _params(device)
    monkeypatch.setenv(switch, value)
    with pytest.raises(ValueError, match=f"{switch}='{value}'"):
        PAIRS["AdamW"][0](params)
    monkeypatch.delenv(switch)
    opt = PAIRS["AdamW"][0](params)
    monkeypatch.setenv(switch, value)  # set after construction
    _fresh_grads(params)
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=f"{switch}='{value}'"):
        opt.step()
    _assert_untouched(opt, params, snap)
    assert not opt.state


def test_launch_options_as_numpy_integers_are_taken_as_ints(device):
    """An int from a config file or numpy (``np.int64(4)``) is an int: stepped as one."""
    np = pytest.importorskip("numpy")
    params = _params(device)
    opt = PAIRS["AdamW"][0](params, block_size=np.int64(1024), num_warps=np.int64(4))
    assert type(opt.block_size) is int and type(opt.num_warps) is int
    _steps(opt, params, 1)


@pytest.mark.parametrize("after", AFTER)
@pytest.mark.parametrize("attr, value, match", [
    ("max_grad_norm", -1.0, "max_norm must be >= 0"),
    ("block_size", 1000, "Invalid block_size"),
    ("master_weights", "yes", "Invalid master_weights"),
    ("state_dtype", "2bit", "Invalid state_dtype"),
])
def test_options_set_by_hand_are_checked_before_the_step(attr, value, match, after, device):
    """``opt.max_grad_norm = ...`` after construction: checked as the constructor checks
    it, at the next step, before anything is written."""
    params = _params(device)
    opt = PAIRS["AdamW"][0](params, **LAUNCH)
    _steps(opt, params, after)
    setattr(opt, attr, value)
    _fresh_grads(params)
    snap = _snapshot(opt, params)
    with pytest.raises((ValueError, RuntimeError), match=match):
        opt.step()
    _assert_untouched(opt, params, snap)


@pytest.mark.parametrize("attr, value", [("state_dtype", "8bit"), ("state_dtype", "4bit"),
                                         ("stochastic_rounding", True)])
def test_options_switched_by_hand_convert_the_state(attr, value, device):
    """A state option switched on the optimizer after steps takes effect at the next
    step as if the optimizer had been built with it and loaded the state: the moments are
    converted (quantized from the fp32 ones), stochastic rounding gets the default seed."""
    base = make_params([(300,), (5, 7)], torch.bfloat16, device, seed=2)
    gen = torch.Generator().manual_seed(3)
    grads = [random_grads(base, gen) for _ in range(4)]
    runs = []
    for switch in (True, False):
        params = [torch.nn.Parameter(p.detach().clone()) for p in base]
        opt = PAIRS["AdamW"][0](params, **LAUNCH)
        for i, gs in enumerate(grads):
            if i == 2:
                if switch:
                    setattr(opt, attr, value)
                else:  # the same through a new optimizer and the state dict
                    sd = opt.state_dict()
                    opt = PAIRS["AdamW"][0](params, **{attr: value}, **LAUNCH)
                    opt.load_state_dict(sd)
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        runs.append((params, opt))
    (a, opt_a), (b, opt_b) = runs
    assert opt_a.seed == opt_b.seed
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert set(opt_a.state[x]) == set(opt_b.state[y])
        for key, value in opt_a.state[x].items():
            assert torch.equal(value, opt_b.state[y][key]), key


@pytest.mark.parametrize("state_dtype", ["8bit", "4bit"])
def test_torch_form_state_written_into_quantized_state_is_converted(state_dtype, device):
    """ZeroRedundancyOptimizer's load writes a checkpoint's entries straight into the
    state: fp32 moments (from torch.optim.AdamW) in an 8-bit optimizer are quantized at the
    next step, as a load_state_dict of the same entries would."""
    params = _params(device)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.AdamW(ref, foreach=False)
    _steps(theirs, ref, 2)
    runs = []
    for by_hand in (True, False):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in ref]
        opt = PAIRS["AdamW"][0](ps, state_dtype=state_dtype, **LAUNCH)
        if by_hand:
            for p, q in zip(ps, ref):
                opt.state[p] = {k: v.clone() for k, v in theirs.state[q].items()}
        else:
            opt.load_state_dict(theirs.state_dict())
        _steps(opt, ps, 2, seed=5)
        runs.append((ps, opt))
    (a, opt_a), (b, opt_b) = runs
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert opt_a.state[x].keys() == opt_b.state[y].keys()
        assert f"exp_avg_{state_dtype}" in opt_a.state[x]


@pytest.mark.parametrize("master", [True, "remainder"])
def test_a_bf16_param_made_float32_keeps_its_master(master, device):
    """``model.float()`` after steps with a master copy: the fp32 param is its own master
    now and starts from the master, not from its bf16 rounding (the master's low bits
    were silently dropped). With an fp32 master an element set by hand since is kept (a
    remainder's param is the master's high half: it joins the remainder, as the next
    step in that mode would have read it)."""
    params = make_params([(300,), (5, 7)], torch.bfloat16, device, seed=4)
    opt = PAIRS["AdamW"][0](params, master_weights=master, **LAUNCH)
    _steps(opt, params, 3)
    masters = [s["master_param"].clone() for s in opt.state_dict()["state"].values()]
    for p in params:
        p.data = p.data.float()
    if master is True:
        with torch.no_grad():
            params[1][0, 0] = 5.0  # set by hand: kept
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    opt.step()
    assert torch.equal(params[0].detach(), masters[0])
    assert torch.equal(params[1].detach().flatten()[1:], masters[1].flatten()[1:])
    if master is True:
        assert params[1][0, 0].item() == 5.0
    assert "master_param" not in opt.state[params[0]] and "master_param_remainder" not in opt.state[params[0]]


def test_a_bf16_model_made_fp16_keeps_its_master_by_hand_or_through_a_load(device):
    """``model.half()`` after steps of bf16 params with an fp32 master: each fp16 param is
    still the master rounded to bf16, so the master stays, by hand as through a state dict
    loaded into a new optimizer (the load took the param for newer than the master, since
    it is not the master rounded to fp16, and restarted the master from it: the two
    diverged and the load lost the master's low bits)."""
    base = make_params([(300,), (5, 7)], torch.bfloat16, device, seed=6)
    runs = []
    for by_hand in (True, False):
        params = [torch.nn.Parameter(p.detach().clone()) for p in base]
        opt = PAIRS["AdamW"][0](params, master_weights=True, **LAUNCH)
        _steps(opt, params, 2)
        masters = [opt.state[p]["master_param"].clone() for p in params]
        for p in params:
            p.data = p.data.half()
        if not by_hand:
            sd = opt.state_dict()
            opt = PAIRS["AdamW"][0](params, master_weights=True, **LAUNCH)
            opt.load_state_dict(sd)
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        opt.step()  # the master unchanged: the param becomes the master rounded to fp16
        for p, m in zip(params, masters):
            assert torch.equal(opt.state[p]["master_param"], m)
            assert torch.equal(p.detach(), m.half())
        _steps(opt, params, 2, seed=7)
        runs.append((params, opt))
    (a, opt_a), (b, opt_b) = runs
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for key, value in opt_a.state[x].items():
            assert torch.equal(value, opt_b.state[y][key]), key


@pytest.mark.parametrize("dtype, scale", [(torch.float16, 1.0), (torch.bfloat16, 1e-5)])
def test_newer_weights_loaded_after_the_optimizer_win_where_they_equal_its_master_by_chance(dtype, scale, device):
    """fp16/bf16 params with a master; the optimizer's state loaded first (a torch.optim
    checkpoint: the master is made from the params then), newer weights after it. Some
    newer weights equal the old master rounded to the other 16-bit dtype (one in ~20
    here); they are newer all the same and win, as every other one does: only a whole
    tensor at that rounding (``model.half()``) keeps the master."""
    gen = torch.Generator().manual_seed(0)
    old = (torch.randn(4096, generator=gen) * scale).to(dtype)
    ref = torch.nn.Parameter(old.float())
    theirs = torch.optim.AdamW([ref], lr=1e-3 * scale, foreach=False)
    for _ in range(3):
        ref.grad = torch.randn(4096, generator=gen)
        theirs.step()
    new = ref.detach().to(dtype).to(device)
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    chance = (new != old.to(device)) & (new == old.float().to(other).to(dtype).to(device))
    assert chance.sum() > 100
    p = torch.nn.Parameter(old.to(device))
    opt = PAIRS["AdamW"][0]([p], master_weights=True, **LAUNCH)
    opt.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        p.copy_(new)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), new)
    assert torch.equal(opt.state[p]["master_param"], new.float())


@pytest.mark.parametrize("after", [1, 3])
@pytest.mark.parametrize("state_dtype", ["8bit", "4bit"])
@pytest.mark.parametrize("copied", [False, True])
def test_quantized_state_of_a_reshaped_param_is_refused(state_dtype, copied, after, device):
    """Flat codes of a (64, 3) param under a (3, 64) one of the same size: each element
    would take another's moments (dense moments are refused by their shape). A copy of the
    optimizer (deepcopy, pickle) remembers the shape too."""
    params = _params(device, shapes=((64, 3), (24,)))
    opt = PAIRS["AdamW"][0](params, state_dtype=state_dtype, **LAUNCH)
    _steps(opt, params, after)
    if copied:
        params, opt = copy.deepcopy((params, opt))
    params[0].data = params[0].data.t().contiguous()
    _fresh_grads(params)
    snap = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"codes of a param of shape \(64, 3\) for a param of shape \(3, 64\)"):
        opt.step()
    _assert_untouched(opt, params, snap)


@pytest.mark.parametrize("change", ["param-transposed", "state-transposed", "param-reshaped", "state-flattened"])
def test_tensors_re_viewed_under_the_same_address_are_seen(change, device):
    """``t.data = t.data.t()`` keeps the address: the cached path compared addresses only
    and stepped each element with another's grad or moments (grads set by hand in the old
    layout), or stepped a reshaped param torch refuses. Now as torch: the same result, or
    a clear error with nothing written."""
    params = _params(device, shapes=((4, 4), (3, 4)))
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = PAIRS["Adam"][0](params, **LAUNCH)
    theirs = torch.optim.Adam(ref, foreach=False)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        _step_both(ours, theirs, params, ref, gen)
    for opt, ps in ((ours, params), (theirs, ref)):
        with torch.no_grad():
            if change == "param-transposed":
                ps[0].data = ps[0].data.t()
            elif change == "state-transposed":
                opt.state[ps[0]]["exp_avg"].data = opt.state[ps[0]]["exp_avg"].data.t()
            elif change == "param-reshaped":
                ps[1].data = ps[1].data.view(4, 3)
            else:
                opt.state[ps[1]]["exp_avg"].data = opt.state[ps[1]]["exp_avg"].data.view(-1)
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    if change in ("param-reshaped", "state-flattened"):  # torch raises a size mismatch
        for i, (p, g) in enumerate(zip(params, grads)):
            if not (i == 1 and change == "param-reshaped"):  # its (3, 4) grad is left in place
                p.grad = g.contiguous()
        snap = _snapshot(ours, params)
        with pytest.raises(RuntimeError, match="shape"):
            ours.step()
        _assert_untouched(ours, params, snap)
        return
    for opt, ps in ((ours, params), (theirs, ref)):
        for p, g in zip(ps, grads):
            p.grad = g.to(device).contiguous()  # set by hand: not in the param's layout
        opt.step()
    _assert_like_torch(ours, theirs, params, ref)


# ---- global modes the caller left on -------------------------------------------------


def _inference_tensors(obj) -> list:
    found = []
    if isinstance(obj, torch.Tensor):
        found += [obj] if obj.is_inference() else []
    elif isinstance(obj, dict):
        for v in obj.values():
            found += _inference_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found += _inference_tensors(v)
    return found


@pytest.mark.parametrize("kw", [{}, {"state_dtype": "8bit", "master_weights": "remainder"}],
                         ids=["fp32", "bf16-8bit-remainder"])
def test_inference_mode_around_clip_step_and_load_leaves_a_working_optimizer(kw, device):
    """A clip, a step after a load, a load and exports under ``torch.inference_mode()``
    (logging a norm, an evaluation helper): what they made (state, step tables, the clip's
    buffer, exported state) were inference tensors, and every later step outside raised
    'Inplace update to inference tensor outside InferenceMode', where torch.optim goes on.
    A reviewer's repro. Now the run equals one without inference mode, bit for bit."""
    dtype = torch.bfloat16 if kw else torch.float32

    def run(inference):
        mode = torch.inference_mode if inference else torch.no_grad
        params = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params(device)]
        opt = PAIRS["AdamW"][0](params, lr=1e-2, **kw, **LAUNCH)
        gen = torch.Generator().manual_seed(3)
        for step in range(4):
            for p, g in zip(params, random_grads(params, gen)):
                p.grad = g
            if step == 0:
                with mode():
                    opt.clip_grad_norm_(float("inf"))  # a logged norm, the first use
            opt.clip_grad_norm_(1.0)
            if step == 2:  # resume: a load, then a step, under the mode
                with mode():
                    saved = opt.state_dict()
                    exported = opt.torch_state_dict()
                    assert not _inference_tensors(saved) and not _inference_tensors(exported)
                    opt = PAIRS["AdamW"][0](params, lr=1e-2, **kw, **LAUNCH)
                    opt.load_state_dict(saved)
                assert not _inference_tensors(opt.state)
                with mode():
                    opt.step()
                continue
            opt.step()
        return [p.detach() for p in params]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_a_meta_default_device_is_not_used_for_the_optimizers_own_tensors(device):
    """``torch.set_default_device("meta")`` (left on by code that builds models on meta):
    host tables made without a device went to the meta device and the step raised
    'Cannot copy out of meta tensor', where torch.optim steps. A reviewer's repro."""
    def run(default):
        params = _params(device)
        gen = torch.Generator().manual_seed(5)
        grads = [random_grads(params, gen) for _ in range(2)]
        torch.set_default_device(default)
        try:
            opt = PAIRS["AdamW"][0](params, lr=1e-2, **LAUNCH)
            for step in range(2):
                for p, g in zip(params, grads[step]):
                    p.grad = g
                opt.clip_grad_norm_(1.0)
                opt.step()
        finally:
            torch.set_default_device(None)
        return [p.detach() for p in params]

    for a, b in zip(run("meta"), run("cpu")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["Adam", "Adamax"])
def test_differentiable_groups_step_under_inference_mode_as_torch(name, device):
    """torch's own step of a ``differentiable`` group, under ``inference_mode``, records
    nothing (torch.optim's does not); leaving inference mode for the optimizer's own
    tensors recorded it (Adam) or raised (Adamax, tensor lr). A reviewer's repro."""
    results = []
    for cls in PAIRS[name]:
        p0 = torch.ones(3, dtype=torch.float64, device=device, requires_grad=True)
        lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        p = p0.clone()
        opt = cls([p], lr=lr, differentiable=True, **(LAUNCH if cls is PAIRS[name][0] else {}))
        p.grad = torch.full((3,), 0.5, dtype=torch.float64, device=device)
        with torch.inference_mode():
            opt.step()
        results.append((p.detach().clone(), type(p.grad_fn).__name__,
                        torch.autograd.grad(p.sum(), lr, allow_unused=True)[0]))
    (ours, ours_fn, ours_grad), (theirs, theirs_fn, theirs_grad) = results
    torch.testing.assert_close(ours, theirs)
    assert ours_fn == theirs_fn and ours_grad is None and theirs_grad is None


@pytest.mark.parametrize("kw", [{"master_weights": "remainder"}, {"state_dtype": "8bit", "master_weights": "remainder"},
                                {"non_dense": True}], ids=["remainder", "8bit-remainder", "non-dense"])
def test_inference_tensor_params_step_and_load_under_inference_mode(kw, device):
    """Params that are inference tensors (a model built under ``inference_mode``) are
    written inside it only: their step, state dict and load stay there, as torch.optim's
    do (leaving it to make the optimizer's own tensors raised on the param's in-place
    write, after a non-dense param's step had already been applied). A reviewer's repro."""
    kw = dict(kw)
    non_dense = kw.pop("non_dense", False)
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(4)
        base = torch.randn(8, 6, generator=gen).to(device)
        p = base[:, ::2] if non_dense else base.bfloat16()
        before = p.clone()
        opt = PAIRS["AdamW"][0]([p], lr=1e-2, **kw, **LAUNCH)
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(device)
        opt.step()
        saved = opt.state_dict()
        again = PAIRS["AdamW"][0]([p], lr=1e-2, **kw, **LAUNCH)
        again.load_state_dict(saved)
        again.step()
    assert p.is_inference() and not torch.equal(p, before)
    assert all(v.is_inference() for v in again.state[p].values() if isinstance(v, torch.Tensor) and v.dim())


def test_a_frozen_inference_param_leaves_the_others_stepping_outside_inference_mode(device):
    """One frozen param made under ``inference_mode`` (no grad, no state) beside trained
    ones: a clip or a load and step under inference mode made the optimizer's tables
    there as if that param were written, and every later step outside raised. It is not
    written, so only the params with grads or state decide. A reviewer's repro."""
    with torch.inference_mode():
        frozen = torch.ones(4, 4, device=device)
    def run(cls, clip):
        w = torch.nn.Parameter(torch.arange(3.0, device=device) / 10)
        opt = cls([w, frozen], lr=0.1, **(LAUNCH if cls is PAIRS["AdamW"][0] else {}))
        for step in range(3):
            w.grad = torch.full_like(w, 1.0 + step)
            with torch.inference_mode():
                clip(opt, w) if step == 0 else None
                if step == 1:
                    saved = opt.state_dict()
                    opt.load_state_dict(saved)
                    opt.step()
                    continue
            opt.param_groups[0]["lr"] = 0.05 * (step + 1)
            opt.step()
        return w.detach()
    ours = run(PAIRS["AdamW"][0], lambda opt, w: opt.clip_grad_norm_(0.1))
    theirs = run(PAIRS["AdamW"][1], lambda opt, w: torch.nn.utils.clip_grad_norm_([w], 0.1))
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name", ["Adam", "Adamax"])
def test_a_differentiable_leaf_steps_under_inference_mode_as_torch(name, device):
    """A leaf param that requires grad in a ``differentiable`` group: torch refuses the
    in-place update where autograd records it, and steps it under ``inference_mode``,
    where nothing is recorded; the refusal ignored inference mode. A reviewer's repro."""
    results = []
    for cls in PAIRS[name]:
        p = torch.ones(3, dtype=torch.float64, device=device, requires_grad=True)
        opt = cls([p], lr=0.1, differentiable=True, **(LAUNCH if cls is PAIRS[name][0] else {}))
        p.grad = torch.full((3,), 0.5, dtype=torch.float64, device=device)
        with torch.inference_mode():
            opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(*results)
    assert not torch.equal(results[0], torch.ones(3, dtype=torch.float64, device=device))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_stochastic_rounding_of_float64_params_warns_that_it_rounds_nothing(dtype):
    with pytest.warns(UserWarning, match="stochastic_rounding=True changes nothing .* float64 or complex"):
        PAIRS["AdamW"][0]([torch.nn.Parameter(torch.randn(3, dtype=dtype))], stochastic_rounding=True)


@pytest.mark.parametrize("options", [{}, {"master_weights": "remainder", "state_dtype": "8bit"},
                                     {"stochastic_rounding": True, "state_dtype": "4bit"}])
def test_a_backward_through_params_saved_before_the_step_raises_as_in_torch(options, device):
    """The classic GAN mistake, backward(retain_graph=True), step, backward again: torch's
    step bumps the params' version counters, so the second backward refuses the stepped
    weights; the kernels' raw-pointer writes must bump them too."""
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.nn.Parameter(torch.randn(4, 4, generator=gen).to(device, dtype))
        x = torch.randn(3, 4, generator=gen).to(device, dtype)
        opt = PAIRS["AdamW"][0]([w], lr=0.1, **options, **LAUNCH)
        for cached_steps in (0, 2):  # the first step's full check, then cached steps
            assert_backward_through_a_stepped_param_raises(opt, w, x, gen, cached_steps)


@pytest.mark.parametrize("after", AFTER)
@pytest.mark.parametrize("which", ["lr", "beta1", "beta2"])
def test_lazily_negated_tensor_hyperparameters_step_by_value(which, after, device):
    """A tensor lr or beta carrying torch's lazy negation bit (``x.conj().imag``,
    ``torch._neg_view``) holds minus its value in memory: the kernels read fp32 tensor
    hyperparameters in place, and stepped the wrong way. They read its value now: the same
    run as with a plain tensor, bit for bit."""
    runs = []
    for lazy in (False, True):
        params = _params(device)
        hyper = {"lr": torch.tensor(0.01), "betas": (torch.tensor(0.9), torch.tensor(0.99))}
        opt = PAIRS["AdamW"][0](params, **hyper, **LAUNCH)
        _steps(opt, params, after)
        value = {"lr": 0.02, "beta1": 0.8, "beta2": 0.95}[which]
        t = torch.tensor(-value, device=device)
        t = torch._neg_view(t) if lazy else -t
        assert t.is_neg() == lazy and t.item() == pytest.approx(value)
        group = opt.param_groups[0]
        if which == "lr":
            group["lr"] = t
        else:
            betas = list(group["betas"])
            betas[which == "beta2"] = t
            group["betas"] = tuple(betas)
        _steps(opt, params, 2, seed=2)
        runs.append(_snapshot(opt, params))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    for sa, sb in zip(runs[0][1].values(), runs[1][1].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("after", AFTER)
def test_group_params_replaced_by_an_iterator_are_stepped_every_time(after, device):
    """``group["params"] = filter(...)`` (or a generator) between steps: read into a list
    at the next step, as add_param_group reads one (the gathering read it up, then failed
    inside with a KeyError after making state; later steps raised "object of type
    'generator' has no len()"); torch.optim's first step reads it up and later ones step
    nothing. Containers read more than once (a set, an nn.ParameterList) are read as they
    are."""
    params, ref = _params(device), _params(device)
    opt, theirs = PAIRS["AdamW"][0](params, **LAUNCH), PAIRS["AdamW"][0](ref, **LAUNCH)
    _steps(opt, params, after)
    _steps(theirs, ref, after)
    opt.param_groups[0]["params"] = filter(lambda p: p.requires_grad, params)
    _steps(opt, params, 3, seed=2)
    _steps(theirs, ref, 3, seed=2)
    assert opt.param_groups[0]["params"] == params
    for p, q in zip(params, ref):
        assert torch.equal(p.detach(), q.detach())
    opt.param_groups[0]["params"] = torch.nn.ParameterList(params)
    theirs.param_groups[0]["params"] = set(ref)
    for opt_, ps in ((opt, params), (theirs, ref)):
        _fresh_grads(ps)
        opt_.clip_grad_norm_(1.0)
        opt_.step()
    for p, q in zip(params, ref):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("master", [True, "remainder"])
def test_entries_under_other_keys_that_hold_a_master_are_never_read(master, device):
    """State under keys that are not params is the user's, never read (torch.optim keeps
    it): a note dict holding a "master_param" tensor, or a state dict whose param ids were
    stringified on the way (JSON, YAML) and loaded as such entries, made the step fail
    inside (``'str' object has no attribute 'dtype'``) after making state. The step reads
    none of it: bit for bit the run without those entries."""
    runs = []
    for noted in (False, True):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, torch.bfloat16))
                  for s in ((24,), (5,))]
        opt = PAIRS["AdamW"][0](params, master_weights=master, **LAUNCH)
        _steps(opt, params, 2)
        if noted:
            sd = copy.deepcopy(opt.state_dict())
            sd["state"] = {str(k): v for k, v in sd["state"].items()}
            opt.load_state_dict(sd)  # every param's state is now under a str key
            opt.state["ema"] = {"master_param": torch.zeros(3, device=device)}
        else:
            opt.load_state_dict({**opt.state_dict(), "state": {}})
        _steps(opt, params, 2, seed=2)
        runs.append([p.detach().clone() for p in params])
        if noted:
            assert set(opt.state) >= {"0", "1", "ema"}
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_replaced_by_a_non_tensor_are_named_as_the_codes(bits, device):
    """Quantized codes set to None by hand beside their scales: the error names the codes
    (it said the scales were missing)."""
    params = _params(device)
    opt = PAIRS["AdamW"][0](params, state_dtype=f"{bits}bit", **LAUNCH)
    _steps(opt, params, 1)
    opt.state[params[0]][f"exp_avg_{bits}bit"] = None
    _fresh_grads(params)
    with pytest.raises(RuntimeError, match=rf"state\['exp_avg_{bits}bit'\] has a NoneType, not uint8 codes"):
        opt.step()


ADAMW = PAIRS["AdamW"][0]

# A group value of each optimizer-wide option other than the optimizer's (here the
# constructor's defaults plus LAUNCH).
_OTHER_GROUP_VALUES = [
    ("bias_correction", False), ("master_weights", True), ("state_dtype", "8bit"),
    ("state_dtype", torch.bfloat16), ("stochastic_rounding", True), ("seed", 3), ("block_size", 256),
    ("num_warps", 8), ("autotune", "off"), ("persistent", True), ("max_grad_norm", 1e-6),
    ("grad_norm_type", 1.0),
]


@pytest.mark.parametrize("key,value", _OTHER_GROUP_VALUES)
@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
def test_optimizer_wide_option_set_in_a_param_group_is_refused(key, value, where, device):
    """torch.optim keeps any key a group has; apex's FusedAdam reads bias_correction per
    group. tritonadam's options are the whole optimizer's: a group that asks for another
    value (8-bit state for the embeddings, no bias correction, a clip) was stepped with
    the optimizer's, silently. Refused at construction and at add_param_group."""
    params = _params(device, shapes=((4, 6), (24,)))
    wanted = {"params": params[1:], key: value}
    match = f"{key} is an option of the whole optimizer"
    if where == "constructor":
        with pytest.raises(ValueError, match=match):
            ADAMW([{"params": params[:1]}, wanted], **LAUNCH)
        return
    opt = ADAMW([{"params": params[:1]}], **LAUNCH)
    _steps(opt, params[:1], 2)
    snap = _snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(wanted)
    assert len(opt.param_groups) == 1
    _assert_untouched(opt, params, snap)


@pytest.mark.parametrize("key,value,options", [
    ("state_dtype", None, {"state_dtype": "8bit"}),  # full precision for these params
    ("max_grad_norm", None, {"max_grad_norm": 1.0}),  # no clip for these
    ("block_size", None, {"block_size": 1024}),
])
def test_a_group_none_that_means_another_value_is_refused(key, value, options, device):
    """None is a value of these options (fp32 state, no clip, a tuned launch): a group
    asking for it in an optimizer built with another was stepped with the optimizer's."""
    params = _params(device)
    with pytest.raises(ValueError, match=f"{key} is an option of the whole optimizer"):
        ADAMW([{"params": params[:1]}, {"params": params[1:], key: value}],
              **{"num_warps": 4, **options})


def test_group_values_equal_to_the_optimizers_pass(device):
    """ZeroRedundancyOptimizer copies its constructor's keywords into every group, raw:
    values that the constructor normalizes to the optimizer's (state_dtype=torch.float32
    is the default state, an int max_grad_norm, numpy ints, a seed left None for the one
    drawn from torch's) are the same option and pass."""
    np = pytest.importorskip("numpy")
    kw = dict(state_dtype=torch.float32, max_grad_norm=1000, grad_norm_type=2, bias_correction=True,
              seed=None, block_size=np.int64(LAUNCH["block_size"]), num_warps=np.int64(LAUNCH["num_warps"]))
    params = _params(device)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = ADAMW([{"params": params[:2], **kw}], **kw)
    ours.add_param_group({"params": params[2:], **kw})
    plain = ADAMW([{"params": ref[:2]}], **kw)
    plain.add_param_group({"params": ref[2:]})
    _steps(ours, params, 3)
    _steps(plain, ref, 3)
    for p, q in zip(params, ref):
        assert torch.equal(p, q)
    sr = dict(stochastic_rounding=True, state_dtype=torch.bfloat16, seed=None)
    opt = ADAMW([{"params": _params(device), **sr}], **sr, **LAUNCH)
    _steps(opt, [p for g in opt.param_groups for p in g["params"]], 2)


@pytest.mark.parametrize("how", ["loaded", "edited", "option set"])
def test_groups_loaded_or_edited_with_other_values_step_with_the_optimizers(how, device):
    """ZeroRedundancyOptimizer's checkpoint keeps its constructor's keywords in its groups,
    and ZeRO writes them into the optimizer's groups before every step: a run resumed
    with other options (8-bit state saved, bf16 state now; another block size on another
    GPU), or an option set on the optimizer by hand, steps with the optimizer's options,
    not refused at every step."""
    saved = {"state_dtype": "8bit", "block_size": 256, "seed": 1, "bias_correction": False}
    params = _params(device)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(state_dtype=torch.bfloat16, **LAUNCH)
    plain = ADAMW(ref, **kw)
    _steps(plain, ref, 2)
    if how == "option set":
        opt = ADAMW([{"params": params, "seed": 1}], **kw, seed=1, stochastic_rounding=True)
        opt.stochastic_rounding = False  # the group keeps ZeRO's seed=1
        opt.seed = None
    else:
        opt = ADAMW(params, **kw)
    if how == "loaded":
        sd = opt.state_dict()
        sd["param_groups"][0].update(saved)
        opt.load_state_dict(sd)
    elif how == "edited":
        opt.param_groups[0].update(saved)
    _steps(opt, params, 2)
    for p, q in zip(params, ref):
        assert torch.equal(p, q)
