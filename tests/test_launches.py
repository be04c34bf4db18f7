"""Launches per step: one prepare launch per device plus one update launch per bucket
(device, param dtype, grad dtype, state layout), whatever the number of tensors or param
groups. Counted where Triton's interpreter launches a kernel, not by our own counters."""
from __future__ import annotations

import contextlib

import pytest
import torch
import triton.runtime.interpreter as interpreter

from helpers import PAIRS, random_grads
from reference import Reference, assert_same_bits
from tritonadam.kernels import launch_counts

LAUNCH = {"block_size": 16384, "num_warps": 4}


@contextlib.contextmanager
def interpreter_launches(options: list | None = None):
    """Kernel names of every launch Triton's interpreter runs inside the block; ``options``
    receives each launch's keyword arguments."""
    names = []
    run = interpreter.InterpretedFunction.run

    def counting(self, *args, **kwargs):
        names.append(self.fn.__name__)
        if options is not None:
            options.append(kwargs)
        return run(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = counting
    try:
        yield names
    finally:
        interpreter.InterpretedFunction.run = run


def _launches_per_step(opt, params, steps=3, clip=None, names_seen=None):
    """Launches of each step (``clip``: called with the optimizer just before it)."""
    gen = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(getattr(p, "grad_dtype", None) or p.dtype)
        before = sum(launch_counts.values())
        with interpreter_launches() as names:
            if clip is not None:
                clip(opt)
            opt.step()
        assert len(names) == sum(launch_counts.values()) - before
        counts.append(len(names))
        if names_seen is not None:
            names_seen.append(names)
    return counts


@pytest.fixture(autouse=True)
def _interpreter_only(device):
    if device.type != "cpu":
        pytest.skip("counts launches at Triton's interpreter")


@pytest.mark.parametrize("name", ["AdamW", "Adamax"])
def test_launches_do_not_grow_with_tensor_count(name, device):
    cls = PAIRS[name][0]
    one = [torch.nn.Parameter(torch.randn(64, device=device))]
    many = [torch.nn.Parameter(torch.randn(1 + i % 13, device=device)) for i in range(200)]
    assert _launches_per_step(cls(one, **LAUNCH), one) == [2, 2, 2]
    assert _launches_per_step(cls(many, **LAUNCH), many) == [2, 2, 2]


@pytest.mark.parametrize("groups", [1, 2, 48])
def test_launches_do_not_grow_with_param_groups(groups, device):
    """Layer-wise LR decay with 48 groups (distinct lr, weight decay on/off, betas, eps)
    steps in the same two launches as one group, and each group keeps its own values."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(7 + 5 * i, generator=gen).to(device)) for i in range(48)]
    refs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    per_group = [params[i::groups] for i in range(groups)]
    ref_groups = [refs[i::groups] for i in range(groups)]

    def options(i):
        return {"lr": 1e-3 * 0.9 ** i, "weight_decay": 0.0 if i % 2 else 0.1,
                "betas": (0.9 - 0.001 * i, 0.999), "eps": 1e-8 * (1 + i)}

    opt = PAIRS["AdamW"][0]([{"params": g, **options(i)} for i, g in enumerate(per_group)], **LAUNCH)
    ref = torch.optim.AdamW([{"params": g, **options(i)} for i, g in enumerate(ref_groups)],
                            foreach=False)
    assert _launches_per_step(opt, params) == [2, 2, 2]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, g in zip(refs, random_grads(refs, gen)):
            p.grad = g
        ref.step()
    for p, q in zip(params, refs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_one_update_launch_per_dtype_combination(device):
    """Four param dtypes in two groups: one prepare launch and four update launches
    (groups share launches); AMSGrad in one group adds a bucket (another state layout)."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    groups = [
        {"params": [torch.nn.Parameter(torch.randn(5 + i, device=device).to(dtypes[i % 4]))
                    for i in range(40)]},
        {"params": [torch.nn.Parameter(torch.randn(3, device=device))], "lr": 1e-2},
    ]
    opt = PAIRS["Adam"][0](groups, **LAUNCH)
    params = groups[0]["params"] + groups[1]["params"]
    assert _launches_per_step(opt, params) == [5, 5, 5]
    opt.param_groups[1]["amsgrad"] = True
    assert _launches_per_step(opt, params) == [6, 6, 6]


def test_hundreds_of_mixed_tensors_match_reference(device):
    """Many small tensors of mixed dtypes in one optimizer, each checked bit for bit."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    gen = torch.Generator().manual_seed(3)
    params = [
        torch.nn.Parameter(torch.randn(int(torch.randint(0, 300, (1,), generator=gen)), generator=gen)
                           .to(dtypes[i % 4]).to(device))
        for i in range(300)
    ]
    refs = [Reference(p, "adam", master=True) for p in params]
    opt = PAIRS["AdamW"][0](params, lr=1e-2, weight_decay=0.1, master_weights=True, **LAUNCH)
    for _ in range(3):
        grads = random_grads(params, gen)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, r, g in zip(params, refs, grads):
            expected = r.update(g.cpu(), 1e-2, 0.9, 0.999, 1e-8, 0.1, decoupled=True)
            if p.dtype == torch.float64:
                torch.testing.assert_close(p.detach().cpu(), expected, atol=1e-12, rtol=1e-11)
            else:
                assert_same_bits(p, expected)


@pytest.mark.parametrize("name", ["AdamW", "Adamax"])
def test_persistent_grid_gives_the_same_bits(name, device):
    """A persistent grid (a few programs looping over all blocks) computes exactly what one
    program per block does, step counts included, in the same launches."""
    cls = PAIRS[name][0]
    shapes = [(1,), (0,), (4097,), (3, 700), ()] * 3
    a = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(device))
         for i, s in enumerate(shapes)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    launch = {"block_size": 1024, "num_warps": 4}
    one_per_block = cls(a, master_weights=True, **launch)
    persistent = cls(b, master_weights=True, persistent=True, **launch)
    assert _launches_per_step(one_per_block, a) == [2, 2, 2]
    assert _launches_per_step(persistent, b) == [2, 2, 2]
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert persistent.state[q]["step"].item() == 3


@pytest.mark.parametrize("how", ["clip_grad_norm_", "max_grad_norm"])
def test_clipping_adds_a_norm_launch_per_grad_dtype_and_one_reduction(how, device):
    """Clip + step: one norm launch per grad dtype (across buckets and param groups), one
    reduction, then the step's prepare and update launches, whatever the number of
    tensors; the explicit call and the constructor option launch the same kernels."""
    f32, bf16 = torch.float32, torch.bfloat16
    clip = (lambda opt: opt.clip_grad_norm_(1.0)) if how == "clip_grad_norm_" else None
    extra = {"max_grad_norm": 1.0} if how == "max_grad_norm" else {}
    one = [torch.nn.Parameter(torch.randn(64, device=device))]
    many = [torch.nn.Parameter(torch.randn(1 + i % 13, device=device)) for i in range(60)]
    for params in (one, many):
        names = []
        opt = PAIRS["AdamW"][0](params, **extra, **LAUNCH)
        assert _launches_per_step(opt, params, steps=2, clip=clip, names_seen=names) == [4, 4]
        assert names[-1] == ["_norm_kernel", "_norm_reduce_kernel", "_prepare_kernel", "_adam_kernel"]

    # Grad dtypes fp32, bf16, fp64 over buckets (fp32, fp32), (bf16 master, fp32 grads),
    # (bf16 master, bf16), (fp64, fp64), in two param groups: 3 + 1 + 1 + 4.
    pairs = [(f32, f32), (bf16, f32), (bf16, bf16), (torch.float64, torch.float64)] * 2
    params = [torch.nn.Parameter(torch.randn(5 + i, device=device).to(p)) for i, (p, _) in enumerate(pairs)]
    for p, (_, g) in zip(params, pairs):
        p.grad_dtype = g
    groups = [{"params": params[::2]}, {"params": params[1::2], "lr": 1e-2}]
    opt = PAIRS["AdamW"][0](groups, master_weights=True, **extra, **LAUNCH)
    assert _launches_per_step(opt, params, steps=2, clip=clip) == [9, 9]


@pytest.mark.parametrize("env, force, fused", [(None, None, True), ("1", None, True), ("On", None, True),
                                               ("0", None, False), (None, "true", False)])
def test_every_launch_pins_fma_fusion(env, force, fused, monkeypatch, device):
    """Each of a step's kernels is launched with ``enable_fp_fusion`` given: on unless
    ``TRITON_DEFAULT_FP_FUSION`` (or ``TRITON_FORCE_DISABLE_FP_FUSION``) says otherwise, so
    triton 3.9 has no default to warn about and 3.10's (off) neither changes our kernels'
    bits nor slows them."""
    for name, value in (("TRITON_DEFAULT_FP_FUSION", env), ("TRITON_FORCE_DISABLE_FP_FUSION", force)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    params = [torch.nn.Parameter(torch.randn(37, 3, device=device)), torch.nn.Parameter(torch.randn(5, device=device))]
    opt = PAIRS["AdamW"][0](params, max_grad_norm=1.0, **LAUNCH)
    for p in params:
        p.grad = torch.randn_like(p)
    options = []
    with interpreter_launches(options) as names:
        opt.step()
    assert sorted(names) == ["_adam_kernel", "_norm_kernel", "_norm_reduce_kernel", "_prepare_kernel"]
    seen = [o.get("enable_fp_fusion", "missing") for o in options]
    assert all(value is fused for value in seen), list(zip(names, seen))


def test_cached_steps_do_not_read_the_fusion_setting_again(monkeypatch, device):
    """The setting is read when a step's tables are built (as Triton reads it per compile),
    not at each of a step's launches: a read of the environment costs about 2 us."""
    import tritonadam.kernels.launch as launch
    import tritonadam.step_cache as step_cache

    reads = []

    def fusion():
        reads.append(1)
        return True

    monkeypatch.setattr(launch, "fp_fusion", fusion)
    monkeypatch.setattr(step_cache, "fp_fusion", fusion)
    params = [torch.nn.Parameter(torch.randn(37, 3, device=device)), torch.nn.Parameter(torch.randn(5, device=device))]
    opt = PAIRS["AdamW"][0](params, max_grad_norm=1.0, **LAUNCH)
    gen = torch.Generator().manual_seed(0)
    options = []
    with interpreter_launches(options) as names:
        for step in range(3):
            for p, g in zip(params, random_grads(params, gen)):
                p.grad = g
            opt.step()
            if step == 0:
                assert reads == [1], "the first step builds the tables once"
                reads.clear()
    assert reads == [] and len(names) == 12
    assert all(o.get("enable_fp_fusion") is True for o in options)


def test_block_maps_of_huge_tensors_index_in_int64_and_launches_beyond_int32_are_refused():
    """A tensor of 2**31 elements and more: block indices stay below 2**32 and the kernels
    scale them to element offsets in int64 (checked in PTX and, with moved pointers, in
    the interpreter: the 2026-12-04 review's repro). A launch of 2**31 programs or more
    (the update kernel counts them in int32, and a persistent grid's pid steps past the last
    by up to its number of programs) is refused before any table is built."""
    import numpy as np
    from tritonadam.kernels.plan import Bucket, block_entries

    entries = block_entries(3, np.asarray([(1 << 31) + 1, 5], dtype=np.int64), 1024, min_blocks=1)
    assert len(entries) == (1 << 21) + 2
    assert int(entries[(1 << 21)] & 0xFFFFFFFF) * 1024 == 1 << 31  # the tail block of row 3
    assert int(entries[-1] >> 32) == 4
    bucket = Bucket(None, torch.device("cpu"), 0, np.asarray([1 << 35, 1 << 31], dtype=np.int64))
    with pytest.raises(ValueError, match=f"more than {(1 << 31) - (1 << 16)}: use a larger block_size"):
        bucket.block_map(16)



@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_stochastic_rounding_leaves_float64_params_unflagged(dtype, device):
    """fp64 moments are stepped at their own precision: with stochastic_rounding=True their
    launch is the plain one (no Philox draws, no bucket or compile of its own) and their
    state keeps no seed, while a bf16 param of the same optimizer is rounded; the fp64
    param steps exactly as without the option."""
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(37, generator=gen, dtype=dtype).to(device)
    grad = torch.randn(37, generator=gen, dtype=dtype).to(device)
    wide = torch.nn.Parameter(start.clone())
    narrow = torch.nn.Parameter(torch.randn(37, generator=gen).to(device, torch.bfloat16))
    opt = PAIRS["AdamW"][0]([wide, narrow], stochastic_rounding=True, seed=3, **LAUNCH)
    wide.grad, narrow.grad = grad.clone(), torch.randn_like(narrow)
    options = []
    with interpreter_launches(options) as names:
        opt.step()
    flags = sorted(o["SR"] for name, o in zip(names, options) if name == "_adam_kernel")
    assert flags == [False, True], (names, flags)
    assert "rounding_seed" not in opt.state[wide] and "rounding_seed" in opt.state[narrow]
    alone = torch.nn.Parameter(start.clone())
    plain = PAIRS["AdamW"][0]([alone], **LAUNCH)
    alone.grad = grad.clone()
    plain.step()
    assert torch.equal(alone, wide)
