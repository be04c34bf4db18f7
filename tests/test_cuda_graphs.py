"""CUDA graphs and sync-free GradScaler steps (issue 5). GPU only.

Run on a GPU machine with ``TRITONADAM_TEST_DEVICE=cuda python -m pytest tests/test_cuda_graphs.py``
(tests/conftest.py turns on Triton's CPU interpreter otherwise, and interpreted kernels
cannot step CUDA tensors). On CPU-only machines every test here is skipped with a reason.

With ``capturable=True`` the step counts live on the GPU and a tensor ``lr`` is read by the
kernel through its pointer, so ``opt.step()`` can be captured once and replayed, with
the lr tensor updated in place between replays. The first eager steps build the device
tables (and, by default, autotune the launch): warm up before capturing, on a side
stream, as torch's CUDA-graph docs prescribe. During capture and replay the grads must be
the same (static) tensors: copy new grads into them, never ``zero_grad(set_to_none=True)``.
"""
from __future__ import annotations

import os

import pytest
import torch

import tritonadam

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        reason="TRITON_INTERPRET=1 runs kernels on the CPU: run with TRITONADAM_TEST_DEVICE=cuda",
    ),
]

SHAPES = [(), (1,), (7,), (0,), (1023,), (4097,), (64, 65), (3, 1000)]
LRS = [1e-2, 5e-3, 2e-3, 1e-3, 1e-2]


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in SHAPES]


def _grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen).cuda() for s in SHAPES]


@pytest.fixture(autouse=True)
def _tuning_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONADAM_CACHE_DIR", str(tmp_path / "tune"))


@pytest.mark.parametrize("launch", [{}, {"block_size": 1024, "num_warps": 4}], ids=["autotuned", "fixed"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_captured_step_replays_like_eager(launch, amsgrad):
    kw = {"betas": (0.9, 0.99), "weight_decay": 0.1, "amsgrad": amsgrad}
    params, eager_params, ref_params = _params(), _params(), _params()
    lr = torch.tensor(LRS[0], device="cuda")
    eager_lr = torch.tensor(LRS[0], device="cuda")
    opt = tritonadam.AdamW(params, lr=lr, capturable=True, **kw, **launch)
    eager = tritonadam.AdamW(eager_params, lr=eager_lr, capturable=True, **kw, **launch)
    ref = torch.optim.AdamW(ref_params, lr=LRS[0], foreach=False, **kw)

    # Static grads: capture records their addresses.
    for p in params:
        p.grad = torch.zeros_like(p)

    def set_grads(step):
        for p, q, r, g in zip(params, eager_params, ref_params, _grads(step)):
            p.grad.copy_(g)
            q.grad = g.clone()
            r.grad = g.clone()

    # Warm-up (builds device tables, state, autotuning) on a side stream.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):
            set_grads(step)
            opt.step()
            eager.step()
            ref.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    before = [p.detach().clone() for p in params]
    with torch.cuda.graph(graph):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b), "capturing must not run the step"

    for i, new_lr in enumerate(LRS):
        step = 3 + i
        set_grads(step)
        lr.fill_(new_lr)  # in place: the captured kernel reads it through its pointer
        eager_lr.fill_(new_lr)
        ref.param_groups[0]["lr"] = float(lr.item())
        graph.replay()
        eager.step()
        ref.step()
        for p, q, r in zip(params, eager_params, ref_params):
            assert torch.equal(p, q), f"replay {i} differs from the eager step"
            torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-5)
    for p, q in zip(params, eager_params):
        s = opt.state[p]
        assert s["step"].device.type == "cuda" and s["step"].item() == 3 + len(LRS)
        for key in s:
            assert torch.equal(s[key], eager.state[q][key]), key


def test_captured_step_with_tensor_betas_and_lr_scheduler_value():
    """Tensor betas and lr (both on the GPU) stay live through replays."""
    params, eager_params = _params(1), _params(1)
    lr, betas = torch.tensor(1e-2, device="cuda"), (torch.tensor(0.9, device="cuda"), torch.tensor(0.99, device="cuda"))
    e_lr, e_betas = lr.clone(), tuple(b.clone() for b in betas)
    opt = tritonadam.Adam(params, lr=lr, betas=betas, capturable=True)
    eager = tritonadam.Adam(eager_params, lr=e_lr, betas=e_betas, capturable=True)
    for p in params:
        p.grad = torch.zeros_like(p)

    def set_grads(step):
        for p, q, g in zip(params, eager_params, _grads(step)):
            p.grad.copy_(g)
            q.grad = g.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(2):
            set_grads(step)
            opt.step()
            eager.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(4):
        set_grads(2 + i)
        for t in (lr, e_lr):
            t.mul_(0.5)
        for t in (betas[0], e_betas[0]):
            t.fill_(0.9 - 0.05 * i)
        graph.replay()
        eager.step()
        for p, q in zip(params, eager_params):
            assert torch.equal(p, q), f"replay {i}"


def test_gradscaler_step_does_not_sync():
    """GradScaler('cuda') -> grad_scale / found_inf on the device; the step itself must not
    synchronise with the host (no .item(), no nonzero) even when it skips."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    opt = tritonadam.AdamW(model.parameters(), lr=1e-3, block_size=1024, num_warps=4)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**14)
    x = torch.randn(16, 64, device="cuda")
    for step in range(4):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        if step == 2:
            model[0].weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        if step > 0:  # the first step builds tables and state
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
        changed = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert changed == (step != 2)
    assert all(opt.state[p]["step"].item() == 3 for p in model.parameters())


@pytest.mark.parametrize("how", ["clip_grad_norm_", "max_grad_norm"])
def test_captured_clip_and_step_replay_like_eager(how):
    """Fused clipping in the graph: the norm launches, the reduction writing the clip
    coefficient to device memory, and the step that reads it are captured together.
    Replays (grads alternately far above and below max_norm) equal eager clip + step bit
    for bit, norm included, and track torch's clip_grad_norm_ + AdamW."""
    kw = {"betas": (0.9, 0.99), "weight_decay": 0.1}
    extra = {"max_grad_norm": 1.0} if how == "max_grad_norm" else {}
    params, eager_params, ref_params = _params(), _params(), _params()
    lr = torch.tensor(LRS[0], device="cuda")
    eager_lr = torch.tensor(LRS[0], device="cuda")
    opt = tritonadam.AdamW(params, lr=lr, capturable=True, **extra, **kw)
    eager = tritonadam.AdamW(eager_params, lr=eager_lr, capturable=True, **extra, **kw)
    ref = torch.optim.AdamW(ref_params, lr=LRS[0], foreach=False, **kw)
    for p in params:
        p.grad = torch.zeros_like(p)

    def set_grads(step):
        scale = 5.0 if step % 2 == 0 else 1e-3
        for p, q, r, g in zip(params, eager_params, ref_params, _grads(step)):
            p.grad.copy_(g * scale)
            q.grad = g * scale
            r.grad = g * scale

    def clip_and_step(o):
        norm = o.clip_grad_norm_(1.0) if how == "clip_grad_norm_" else None
        o.step()
        return norm if norm is not None else o.last_grad_norm

    def torch_clip_and_step():
        norm = torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        ref.step()
        return norm

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):
            set_grads(step)
            clip_and_step(opt)
            clip_and_step(eager)
            torch_clip_and_step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    before = [p.detach().clone() for p in params]
    with torch.cuda.graph(graph):
        captured_norm = clip_and_step(opt)
    for p, b in zip(params, before):
        assert torch.equal(p, b), "capturing must not run the step"

    clipped = []
    for i, new_lr in enumerate(LRS):
        step = 3 + i
        set_grads(step)
        lr.fill_(new_lr)
        eager_lr.fill_(new_lr)
        ref.param_groups[0]["lr"] = new_lr
        graph.replay()
        eager_norm = clip_and_step(eager)
        torch_norm = torch_clip_and_step()
        assert torch.equal(captured_norm, eager_norm), f"replay {i}: norm differs from eager"
        torch.testing.assert_close(captured_norm, torch_norm, rtol=1e-5, atol=0)
        clipped.append(bool(torch_norm > 1.0))
        for p, q, r in zip(params, eager_params, ref_params):
            assert torch.equal(p, q), f"replay {i} differs from the eager step"
            torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-5)
    assert True in clipped and False in clipped


@pytest.mark.parametrize("how", ["scaler-argument", "max_grad_norm"])
def test_gradscaler_clip_and_step_do_not_sync(how):
    """Clipping with GradScaler's scale folded in (clip_grad_norm_(scaler=...) or
    max_grad_norm=) adds no host sync to the step, including the step skipped on inf."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    extra = {"max_grad_norm": 0.5} if how == "max_grad_norm" else {}
    opt = tritonadam.AdamW(model.parameters(), lr=1e-3, block_size=1024, num_warps=4, **extra)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**14)
    x = torch.randn(16, 64, device="cuda")
    for step in range(4):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        if step == 2:
            model[0].weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        if step > 0:  # the first step builds tables, state and the clip buffer
            torch.cuda.set_sync_debug_mode("error")
        try:
            if how == "scaler-argument":
                opt.clip_grad_norm_(0.5, scaler=scaler)
            scaler.step(opt)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
        changed = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert changed == (step != 2)
        assert torch.isfinite(opt.last_grad_norm).item() == (step != 2)
    assert all(opt.state[p]["step"].item() == 3 for p in model.parameters())
