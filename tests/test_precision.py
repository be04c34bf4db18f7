"""Precision modes: the exact fp32 master in 2 bytes (``master_weights="remainder"``),
stochastic rounding, bf16 state; bit for bit against a plain-torch reference of the same
math, and their contract (state dicts across modes, reproducible random streams, memory
per param, clear errors for combinations that cannot work)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from helpers import LAUNCH, PAIRS, SHAPES, make_params, random_grads
from reference import Reference, assert_same_bits, stochastic_round
from tritonadam.kernels import rounding
from tritonadam.kernels.plan import rounding_key
from tritonadam.state import join_master, split_master

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)

MODES = {
    "remainder": dict(master_weights="remainder"),
    "sr": dict(stochastic_rounding=True),
    "bf16-state": dict(state_dtype=BF16),
    "sr+bf16-state": dict(stochastic_rounding=True, state_dtype=BF16),
    "master+bf16-state+sr": dict(master_weights=True, state_dtype=BF16, stochastic_rounding=True),
    "remainder+bf16-state": dict(master_weights="remainder", state_dtype=BF16),
}


def _reference(p, kind, mode, index, seed, amsgrad=False):
    return Reference(p, kind, master=mode.get("master_weights", False), amsgrad=amsgrad,
                     state_dtype=mode.get("state_dtype"),
                     stochastic_rounding=mode.get("stochastic_rounding", False),
                     key=rounding_key(seed, index))


# Every mode with every param dtype it accepts (the remainder refuses fp16: tested below).
_MODE_DTYPES = [pytest.param(mode, dtype, id=f"{mode}-{label}")
                for mode in MODES for dtype, label in ((BF16, "bf16"), (FP16, "fp16"), (FP32, "fp32"))
                if not (MODES[mode].get("master_weights") == "remainder" and dtype == FP16)]


@pytest.mark.parametrize("name", ["AdamW", "Adamax"])
@pytest.mark.parametrize("mode,dtype", _MODE_DTYPES)
def test_bitwise_against_the_reference(mode, dtype, name, device):
    """Params, moments (as stored) and master copies, bit for bit, over several steps, on
    sizes around the block, 0-dim and empty tensors."""
    kw = MODES[mode]
    params = make_params(SHAPES, dtype, device, seed=11)
    kind = "adamax" if name == "Adamax" else "adam"
    amsgrad = name == "AdamW"
    extra = {"amsgrad": True} if amsgrad else {}
    opt = PAIRS[name][0](params, **HYPER, **extra, **kw, seed=1234, **LAUNCH)
    refs = [_reference(p, kind, kw, i, 1234, amsgrad) for i, p in enumerate(params)]
    gen = torch.Generator().manual_seed(12)
    for _ in range(4):
        grads = random_grads(params, gen)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, r, g in zip(params, refs, grads):
            expected = r.update(g.cpu(), HYPER["lr"], *HYPER["betas"], HYPER["eps"], HYPER["weight_decay"],
                                decoupled=name == "AdamW")
            assert_same_bits(p, expected)
    second = "exp_inf" if name == "Adamax" else "exp_avg_sq"
    exported = opt.state_dict()["state"]
    for i, (p, r) in enumerate(zip(params, refs)):
        state = opt.state[p]
        assert state["exp_avg"].dtype == (kw.get("state_dtype") or FP32)
        assert_same_bits(state["exp_avg"], r.m)
        assert_same_bits(state[second], r.v)
        if r.master:
            assert_same_bits(exported[i]["master_param"], r.w)


def test_remainder_is_master_weights_bit_for_bit_over_hundreds_of_steps(device):
    """Params and masters alike after every one of 200 steps, exact ties included (the
    master modes round ties away from zero, the only rounding 16 bits can undo): the run
    meets masters whose low half is exactly 0x8000, and they split and join exactly."""
    a = make_params([(4097,), ()], BF16, device, seed=21)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    master = PAIRS["AdamW"][0](a, lr=1e-3, weight_decay=0.05, master_weights=True, **LAUNCH)
    remainder = PAIRS["AdamW"][0](b, lr=1e-3, weight_decay=0.05, master_weights="remainder", **LAUNCH)
    gen = torch.Generator().manual_seed(22)
    ties = 0
    for _ in range(200):
        for p, q, g in zip(a, b, random_grads(a, gen, scale=1e-3)):
            p.grad, q.grad = g, g.clone()
        master.step()
        remainder.step()
        for p, q in zip(a, b):
            assert torch.equal(p.view(torch.int16), q.view(torch.int16))
            low = remainder.state[q]["master_param_remainder"].to(torch.int32) & 0xFFFF
            ties += int((low == 0x8000).sum())
    assert ties > 0
    exported = remainder.state_dict()["state"]
    for i, p in enumerate(a):
        assert torch.equal(master.state[p]["master_param"].view(torch.int32),
                           exported[i]["master_param"].view(torch.int32))
    assert remainder.state[b[0]]["master_param_remainder"].dtype == torch.int16


def test_split_and_join_are_exact_for_every_bit_pattern():
    bits = torch.arange(-(2**31), 2**31, 4099, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    high, low = split_master(x)
    back = join_master(high, low)
    finite = ~torch.isnan(x)
    assert torch.equal(back[finite].view(torch.int32), x[finite].view(torch.int32))
    assert torch.isnan(back[~finite]).all() and torch.isnan(high[~finite].float()).all()
    # The bf16 half is a nearest neighbour: within half a bf16 unit in the last place.
    err = (high.double() - x.double()).abs()
    ulp = ((high.view(torch.int16).to(torch.int32) + 1).to(torch.int16).view(torch.bfloat16).double()
           - high.double()).abs()
    ok = finite & torch.isfinite(high.float()) & torch.isfinite(ulp)
    assert (err[ok] <= ulp[ok] / 2).all()


@triton.jit
def _join(param_ptr, remainder_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    joined = rounding.join_master(tl.load(param_ptr + offs), tl.load(remainder_ptr + offs))
    tl.store(out_ptr + offs, joined.to(tl.int32, bitcast=True))


def test_kernel_join_master_on_every_high_half(device):
    """The kernel's join (sign-extended remainder added to the high half, clamped at 0
    beside a +-0 high half) against the host's (borrow selected, the form the kernel had):
    every bf16 bit pattern, NaNs and both zeros included, with the remainders at and
    around every boundary (0, 0x7FFF, 0x8000, 0xFFFF) and random ones. (Both forms agree on
    all 2**32 pairs; that exhaustive check takes minutes in numpy.)"""
    gen = torch.Generator().manual_seed(5)
    lows = torch.cat([torch.tensor([0, 1, 2, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0x8002, 0xFFFE, 0xFFFF]),
                      torch.randint(0, 0x10000, (22,), generator=gen)])
    high = torch.arange(0x10000, dtype=torch.int32).repeat(len(lows))
    low = lows.to(torch.int32).repeat_interleave(0x10000)
    param = high.to(torch.int16).view(torch.bfloat16)
    remainder = low.to(torch.int16)
    out = torch.empty(high.numel(), dtype=torch.int32, device=device)
    _join[(len(lows),)](param.to(device), remainder.to(device), out, 0x10000)
    assert torch.equal(out.cpu(), join_master(param, remainder).view(torch.int32))


@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_remainder_master_of_params_set_by_hand_between_steps(state_dtype, device):
    """A bf16 param set by hand between steps (pruned to zero, re-initialised, clamped)
    leaves a remainder split from another value. The master the kernel joins from the pair
    is one the param is the rounding of; where a zeroed param met a rounded-up remainder
    (no split gives that pair) it borrowed across the sign bit: NaN params. Now the master
    of such a pair is that zero. The step equals an fp32-master step from the joined
    master, bit for bit."""
    extra = {} if state_dtype is None else {"state_dtype": state_dtype}
    a = make_params([(3000,), (5,)], BF16, device, seed=31)
    remainder = PAIRS["AdamW"][0](a, lr=1e-3, master_weights="remainder", **extra, **LAUNCH)
    gen = torch.Generator().manual_seed(32)
    for _ in range(3):
        for p, g in zip(a, random_grads(a, gen, scale=1e-2)):
            p.grad = g
        remainder.step()
    with torch.no_grad():
        a[0][:1000].zero_()
        a[0][1000:2000] = -0.0
        a[0][2000:].clamp_(-0.1, 0.1)
        a[1].mul_(3)
    lows = torch.cat([remainder.state[p]["master_param_remainder"].flatten() for p in a]).to(torch.int32) & 0xFFFF
    assert (lows[:2000] >= 0x8000).sum() > 500  # the pairs that borrowed into a NaN
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    master = PAIRS["AdamW"][0](b, lr=1e-3, master_weights=True, **extra, **LAUNCH)
    master.load_state_dict(remainder.state_dict())
    for p, q in zip(a, b):
        joined = join_master(p.detach().cpu(), remainder.state[p]["master_param_remainder"].cpu())
        assert torch.equal(split_master(joined)[0].view(torch.int16), p.detach().cpu().view(torch.int16))
        master.state[q]["master_param"] = joined.to(device)
    assert torch.equal(join_master(a[0][:2000].detach().cpu(), torch.full((2000,), -1, dtype=torch.int16))
                       .view(torch.int32) & 0x7FFFFFFF, torch.zeros(2000, dtype=torch.int32))
    for _ in range(2):
        for p, q, g in zip(a, b, random_grads(a, gen, scale=1e-2)):
            p.grad, q.grad = g, g.clone()
        remainder.step()
        master.step()
        for p, q in zip(a, b):
            assert not p.isnan().any()
            assert torch.equal(p.view(torch.int16), q.view(torch.int16))


# ---- stochastic rounding --------------------------------------------------------------


def test_stochastic_rounding_past_the_largest_fp16_rounds_to_nearest(device):
    """An fp16 param stepped past 65504 has no upper neighbour to round to: it rounds to
    nearest, as torch does (65504 below 65520, inf from it), in the kernel and the
    reference alike. The interpreter's toward-zero conversion made NaN of every one."""
    n = 1100  # a full block and a tail
    for target in (65510.0, 65519.0, 65530.0, 7e4, 1e6, -7e4, -65510.0):
        start = 65504.0 if target > 0 else -65504.0
        p = torch.nn.Parameter(torch.full((n,), start, dtype=FP16, device=device))
        # Adam's first step moves each element by lr, against its grad's sign.
        opt = PAIRS["Adam"][0]([p], lr=abs(target - start), stochastic_rounding=True, seed=3, **LAUNCH)
        p.grad = torch.full((n,), -1.0 if target > 0 else 1.0, dtype=FP16, device=device)
        opt.step()
        expected = torch.tensor(target).half().expand(n)
        assert torch.equal(p.detach().cpu(), expected), (target, p[:3])
        bits = np.arange(n) * 59 % 65536
        assert torch.equal(stochastic_round(torch.full((n,), target), bits, FP16), expected)


@pytest.mark.parametrize("lr", [1e-45, 1e-40, 3e-39, 1e-38])
def test_stochastic_rounding_of_fp32_subnormals_to_fp16(lr, device):
    """fp16 zeros stepped by an fp32 subnormal: far below fp16's smallest step (2**-24),
    so toward zero is +-0 and the step rounds up in magnitude with probability below
    2**-16. The interpreter's toward-zero conversion garbled fp32 subnormals (into values
    up to 6.1e-5)."""
    n = 1100
    p = torch.nn.Parameter(torch.zeros(n, dtype=FP16, device=device))
    opt = PAIRS["Adam"][0]([p], lr=lr, stochastic_rounding=True, seed=5, **LAUNCH)
    p.grad = torch.linspace(-1, 1, n).to(FP16).to(device)
    opt.step()
    assert p.detach().abs().max().item() <= 2.0 ** -24, p.detach().abs().max()
    x = -lr * torch.sign(p.grad.float().cpu())
    assert stochastic_round(x, np.arange(n) * 59 % 65536, FP16).abs().max().item() <= 2.0 ** -24


@pytest.mark.parametrize("dtype,lr", [(BF16, 1e-3), (FP16, 1e-4)], ids=["bf16", "fp16"])
def test_stochastic_rounding_is_unbiased(dtype, lr, device):
    """65,536 copies of one value take one step: the mean of the rounded results is the
    exact fp32 result within 5 standard deviations of a mean of independent roundings
    (ulp/2/sqrt(n)); round-to-nearest, for contrast, misses it by far more."""
    n = 1 << 16  # lr: the update is a quarter of a unit in the last place
    results = {}
    for sr in (True, False):
        p = torch.nn.Parameter(torch.full((n,), 0.75, device=device).to(dtype))
        p.grad = torch.full((n,), 0.5, device=device).to(dtype)
        opt = PAIRS["Adam"][0]([p], lr=lr, stochastic_rounding=sr, seed=7, block_size=16384, num_warps=4)
        opt.step()
        results[sr] = p.detach().double().cpu()
    exact = 0.75 - lr * (0.5 / (0.5 + 1e-8))
    below = results[False].max().item()  # nearest: every copy rounds the same way
    lo, hi = sorted({v for v in results[True].unique().tolist()})
    assert lo < exact < hi
    ulp = hi - lo
    bound = 5 * (ulp / 2) / np.sqrt(n)
    assert abs(results[True].mean().item() - exact) < bound
    assert abs(below - exact) > 10 * bound
    # The fraction rounded up is the distance to the lower neighbour in units of ulp.
    up = (results[True] == hi).double().mean().item()
    assert abs(up - (exact - lo) / ulp) < 5 * 0.5 / np.sqrt(n)


def test_random_draws_differ_per_element_and_step_and_repeat_per_seed(device):
    def run(seed, steps=2):
        p = torch.nn.Parameter(torch.full((4096,), 1.0, device=device).to(BF16))
        opt = PAIRS["Adam"][0]([p], lr=1e-3, stochastic_rounding=True, seed=seed, **LAUNCH)
        out = []
        for _ in range(steps):
            p.grad = torch.full_like(p, 0.25)
            opt.step()
            out.append(p.detach().clone())
        return out

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed, same bits
    assert not torch.equal(a[0], c[0])  # another seed, other draws
    assert len(a[0].unique()) == 2  # copies of one value: rounded both ways
    first_up = a[0] == a[0].max()
    assert 0.05 < first_up.float().mean() < 0.95
    # The second step draws afresh: which copies round up changes.
    moved = a[1] != a[1].min()
    assert not torch.equal(first_up, moved)


def test_seed_comes_from_torch_manual_seed():
    p = [torch.nn.Parameter(torch.randn(3).to(BF16))]
    torch.manual_seed(3)
    a = PAIRS["AdamW"][0](p, stochastic_rounding=True)
    torch.manual_seed(3)
    b = PAIRS["AdamW"][0](p, stochastic_rounding=True)
    torch.manual_seed(4)
    c = PAIRS["AdamW"][0](p, stochastic_rounding=True)
    assert a.seed == b.seed != c.seed


@pytest.mark.parametrize("mode,dtype", [("sr", BF16), ("sr", FP16), ("sr+bf16-state", BF16),
                                        ("remainder+bf16-state", BF16)])
def test_resume_continues_the_same_sequence(mode, dtype, device):
    """Save after 3 steps, load into a fresh optimizer (another seed, other params), take
    3 more: bit for bit the 6 uninterrupted steps, random draws included. The seed is one
    a 16-bit float cannot hold (torch's usual initial_seed() is 64-bit): torch's load casts
    every state tensor to its param's dtype, the per-param seed included (bf16 made it
    another seed, fp16 an inf that crashed the load)."""
    kw = MODES[mode]
    start = make_params([(5000,), (7, 3)], dtype, device, seed=31)
    whole = [torch.nn.Parameter(p.detach().clone()) for p in start]
    SEED = 67280421310721
    run = PAIRS["AdamW"][0](whole, **HYPER, **kw, seed=SEED, **LAUNCH)
    gens = [torch.Generator().manual_seed(32), torch.Generator().manual_seed(32)]
    for _ in range(6):
        for p, g in zip(whole, random_grads(whole, gens[0])):
            p.grad = g
        run.step()
    params = [torch.nn.Parameter(p.detach().clone()) for p in start]
    first = PAIRS["AdamW"][0](params, **HYPER, **kw, seed=SEED, **LAUNCH)
    for _ in range(3):
        for p, g in zip(params, random_grads(params, gens[1])):
            p.grad = g
        first.step()
    saved = copy.deepcopy(first.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = PAIRS["AdamW"][0](resumed_params, **HYPER, **kw, seed=12345, **LAUNCH)
    resumed.load_state_dict(saved)
    assert resumed.seed == SEED or not kw.get("stochastic_rounding")
    if kw.get("stochastic_rounding"):
        assert all(int(resumed.state[p]["rounding_seed"]) == SEED for p in resumed_params)
    for _ in range(3):
        for p, g in zip(resumed_params, random_grads(resumed_params, gens[1])):
            p.grad = g
        resumed.step()
    for p, q in zip(resumed_params, whole):
        assert torch.equal(p, q)


def test_state_written_by_hand_draws_with_its_own_seed(device):
    """State put into ``opt.state`` directly (ZeroRedundancyOptimizer loads each rank's
    shard so) keeps drawing with its ``rounding_seed``, not the optimizer's: bit for bit
    the uninterrupted run; a seed that is not an integer is refused, nothing written."""
    start = make_params([(5000,), (7, 3)], BF16, device, seed=33)
    whole = [torch.nn.Parameter(p.detach().clone()) for p in start]
    run = PAIRS["AdamW"][0](whole, **HYPER, stochastic_rounding=True, seed=7, **LAUNCH)
    gen = torch.Generator().manual_seed(34)
    grads = [random_grads(whole, gen) for _ in range(4)]
    for step in range(2):
        for p, g in zip(whole, grads[step]):
            p.grad = g.clone()
        run.step()
    params = [torch.nn.Parameter(p.detach().clone()) for p in whole]
    by_hand = PAIRS["AdamW"][0](params, **HYPER, stochastic_rounding=True, seed=12345, **LAUNCH)
    for p, q in zip(whole, params):
        by_hand.state[q] = copy.deepcopy(run.state[p])
    for step in range(2, 4):
        for ps, opt in ((whole, run), (params, by_hand)):
            for p, g in zip(ps, grads[step]):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(whole, params))
    assert all(int(by_hand.state[q]["rounding_seed"]) == 7 for q in params)
    by_hand.state[params[0]]["rounding_seed"] = torch.tensor(0.5)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="rounding_seed.*integer"):
        by_hand.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


# ---- state dicts across modes and with torch.optim --------------------------------------


def _train(opt, params, gen, steps):
    for _ in range(steps):
        for p, g in zip(params, random_grads(params, gen)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("first,second", [
    ("remainder", "master"), ("master", "remainder"), ("remainder", "remainder"),
])
def test_master_modes_load_each_other_and_keep_stepping_alike(first, second, device):
    """A checkpoint of either master mode loads into the other; the fp32 master moves
    with it (never dropped), and training continues bit for bit as uninterrupted."""
    mode = {"master": True, "remainder": "remainder"}
    start = make_params([(3000,), (4, 5)], BF16, device, seed=41)
    whole = [torch.nn.Parameter(p.detach().clone()) for p in start]
    _train(PAIRS["AdamW"][0](whole, master_weights=True, **HYPER, **LAUNCH), whole,
           torch.Generator().manual_seed(42), 6)
    params = [torch.nn.Parameter(p.detach().clone()) for p in start]
    gen = torch.Generator().manual_seed(42)
    a = PAIRS["AdamW"][0](params, master_weights=mode[first], **HYPER, **LAUNCH)
    _train(a, params, gen, 3)
    saved = copy.deepcopy(a.state_dict())
    assert saved["state"][0]["master_param"].dtype == FP32
    # the remainder mode exports its remainder too, under its own key (flattened state
    # dicts are rebuilt from the receiver's keys)
    assert ("master_param_remainder" in saved["state"][0]) == (first == "remainder")
    b = PAIRS["AdamW"][0](params, master_weights=mode[second], **HYPER, **LAUNCH)
    b.load_state_dict(saved)
    _train(b, params, gen, 3)
    for p, q in zip(params, whole):
        assert torch.equal(p, q)


@pytest.mark.parametrize("order", ["optimizer-first", "newer-model-first", "pruned-model-first"])
def test_a_remainder_master_loads_under_params_in_either_order(order, device):
    """A checkpoint's fp32 master loads into the remainder mode in either load order: loaded
    before the params, it is the exact master once they are loaded (training goes on bit
    for bit as uninterrupted, and the state dict exports it); loaded after params newer
    than it (a model saved later, weights pruned before the save, a master torch.optim
    carried unchanged while it stepped the params), the loaded params win, as with
    ``master_weights=True``. The load wrote the stale master's high half over them."""
    start = make_params([(3000,), (4, 5)], BF16, device, seed=71)
    whole = [torch.nn.Parameter(p.detach().clone()) for p in start]
    gen = torch.Generator().manual_seed(72)
    a = PAIRS["AdamW"][0](whole, master_weights="remainder", **HYPER, **LAUNCH)
    _train(a, whole, gen, 3)
    saved = copy.deepcopy(a.state_dict())
    at_save = [p.detach().clone() for p in whole]
    if order == "optimizer-first":
        params = [torch.nn.Parameter(p.detach().clone()) for p in start]  # not yet loaded
        b = PAIRS["AdamW"][0](params, master_weights="remainder", **HYPER, **LAUNCH)
        b.load_state_dict(saved)
        with torch.no_grad():
            for p, q in zip(params, at_save):
                p.copy_(q)
        for i in range(len(params)):
            assert torch.equal(b.state_dict()["state"][i]["master_param"], saved["state"][i]["master_param"])
        _train(a, whole, copy.deepcopy(gen), 3)
        _train(b, params, gen, 3)
        for p, q in zip(params, whole):
            assert torch.equal(p, q)
        return
    newer = [p.clone() for p in at_save]
    if order == "pruned-model-first":
        newer[0][:1000] = 0
    else:
        _train(a, whole, gen, 2)
        newer = [p.detach().clone() for p in whole]
    params = [torch.nn.Parameter(p.clone()) for p in newer]  # the model loaded first
    b = PAIRS["AdamW"][0](params, master_weights="remainder", **HYPER, **LAUNCH)
    b.load_state_dict(saved)
    b.param_groups[0]["lr"] = 0.0
    for p, g in zip(params, random_grads(params, gen)):
        p.grad = g
    b.step()  # lr 0: nothing moves
    masters = b.state_dict()["state"]
    stale = 0
    for i, (p, q) in enumerate(zip(params, newer)):
        assert torch.equal(p.detach(), q)
        master, kept = masters[i]["master_param"], saved["state"][i]["master_param"]
        same = q == split_master(kept)[0]
        assert torch.equal(master[same], kept[same])
        # elsewhere the param is its master's rounding, within half a bf16 step of it
        assert torch.equal(split_master(master)[0][~same], q[~same])
        ulp = torch.finfo(BF16).eps * q[~same].float().abs().clamp_min(torch.finfo(torch.float32).tiny)
        assert ((master[~same] - q[~same].float()).abs() <= ulp / 2).all()
        stale += int((~same).sum())
    assert stale >= 1000


def test_remainder_checkpoint_loads_into_torch_and_back(device):
    """The exported master is what torch.optim keeps of it: torch casts every floating
    state of a bf16 param to bf16 on load (``exp_avg`` too), and the checkpoint it saves
    loads back into the remainder mode, master included."""
    params = make_params([(3000,), (4, 5)], BF16, device, seed=51)
    ours = PAIRS["AdamW"][0](params, master_weights="remainder", **HYPER, **LAUNCH)
    _train(ours, params, torch.Generator().manual_seed(52), 3)
    saved = copy.deepcopy(ours.state_dict())
    theirs = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], **HYPER)
    theirs.load_state_dict(copy.deepcopy(saved))
    kept = theirs.state_dict()["state"]
    again = PAIRS["AdamW"][0](params, master_weights="remainder", **HYPER, **LAUNCH)
    again.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for i, p in enumerate(params):
        assert torch.equal(kept[i]["master_param"], saved["state"][i]["master_param"].to(BF16))
        back = again.state_dict()["state"][i]["master_param"]
        assert back.dtype == FP32 and torch.equal(back, kept[i]["master_param"].float())
        assert torch.equal(p.detach(), kept[i]["master_param"])  # param = its master's high half
    _train(again, params, torch.Generator().manual_seed(53), 1)


def test_torch_state_loads_into_precision_modes(device):
    """torch.optim's state (no master, moments in the param dtype) loads into every mode:
    the master starts as the param, moments convert to the mode's state dtype."""
    params = make_params([(1000,), (3, 3)], BF16, device, seed=61)
    theirs = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone().float()) for p in params], **HYPER)
    _train(theirs, theirs.param_groups[0]["params"], torch.Generator().manual_seed(62), 2)
    saved = theirs.state_dict()
    for kw in MODES.values():
        ours = PAIRS["AdamW"][0](params, **HYPER, **kw, **LAUNCH)
        ours.load_state_dict(copy.deepcopy(saved))
        for i, p in enumerate(params):
            state = ours.state[p]
            want = kw.get("state_dtype") or FP32
            assert state["exp_avg"].dtype == want
            assert torch.equal(state["exp_avg"], saved["state"][i]["exp_avg"].to(want))
            if kw.get("master_weights") == "remainder":
                assert torch.equal(ours.state_dict()["state"][i]["master_param"], p.detach().float())
        _train(ours, params, torch.Generator().manual_seed(63), 1)


def test_bf16_state_round_trips_through_fp32_state(device):
    params = make_params([(1000,)], FP32, device, seed=71)
    low = PAIRS["AdamW"][0](params, state_dtype=BF16, **HYPER, **LAUNCH)
    _train(low, params, torch.Generator().manual_seed(72), 2)
    full = PAIRS["AdamW"][0](params, **HYPER, **LAUNCH)
    full.load_state_dict(copy.deepcopy(low.state_dict()))
    assert full.state[params[0]]["exp_avg"].dtype == FP32
    assert torch.equal(full.state[params[0]]["exp_avg"], low.state[params[0]]["exp_avg"].float())
    back = PAIRS["AdamW"][0](params, state_dtype=BF16, **HYPER, **LAUNCH)
    back.load_state_dict(copy.deepcopy(full.state_dict()))
    assert torch.equal(back.state[params[0]]["exp_avg"], low.state[params[0]]["exp_avg"])


# ---- memory per param and bad combinations ------------------------------------------------


@pytest.mark.parametrize("kw,state_bytes", [
    ({}, 8),
    (dict(master_weights=True), 12),
    (dict(master_weights="remainder"), 10),
    (dict(state_dtype=BF16), 4),
    (dict(stochastic_rounding=True, state_dtype=BF16), 4),
    (dict(master_weights="remainder", state_dtype=BF16), 6),
])
def test_state_bytes_per_param(kw, state_bytes, device):
    """Optimizer state per element of a bf16 param (the param and a bf16 grad add 4):
    with stochastic rounding and bf16 state, 2 + 2 + 2 + 2 = 8 bytes per param in all."""
    p = torch.nn.Parameter(torch.randn(1000, device=device).to(BF16))
    p.grad = torch.randn_like(p)
    opt = PAIRS["AdamW"][0]([p], **kw, **LAUNCH)
    opt.step()
    held = sum(t.numel() * t.element_size() for t in opt.state[p].values() if t.dim() > 0)
    assert held == state_bytes * p.numel()


@pytest.mark.parametrize("kw,match", [
    (dict(master_weights="fp32"), "Invalid master_weights"),
    (dict(state_dtype=FP16), "Invalid state_dtype"),
    (dict(stochastic_rounding=1), "Invalid stochastic_rounding"),
    (dict(master_weights=True, stochastic_rounding=True), "nothing is"),
    (dict(master_weights="remainder", stochastic_rounding=True), "nothing is"),
    (dict(seed=-1), "Invalid seed"),
    (dict(seed=2**64), "Invalid seed"),
])
def test_invalid_combinations_fail_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        PAIRS["AdamW"][0]([torch.nn.Parameter(torch.randn(3).to(BF16))], **kw)


@pytest.mark.parametrize("dtype,kw,match", [
    (FP16, dict(master_weights="remainder"), "use master_weights=True"),
    (torch.float64, dict(state_dtype=BF16), "state_dtype=torch.bfloat16 is for"),
])
def test_params_a_mode_cannot_step_are_refused(dtype, kw, match, device):
    p = torch.nn.Parameter(torch.randn(3, device=device).to(dtype))
    with pytest.raises(ValueError, match=match):
        PAIRS["AdamW"][0]([p], **kw)
    opt = PAIRS["AdamW"][0]([torch.nn.Parameter(torch.randn(3, device=device).to(BF16))], **kw)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [p]})


def test_modes_survive_deepcopy_and_pickle():
    import pickle

    p = [torch.nn.Parameter(torch.randn(3).to(BF16))]
    opt = PAIRS["AdamW"][0](p, master_weights="remainder", state_dtype=BF16, seed=77)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (clone.master_weights, clone.state_dtype, clone.seed) == ("remainder", BF16, 77)
