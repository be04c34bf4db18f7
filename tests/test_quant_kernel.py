"""Blockwise 8-bit and 4-bit optimizer state: the host codec (tritonadam.quantize) on its
own, and the update kernel against a plain-torch step of the same math, bit for bit.

The kernel is launched directly through the device tables (as kernels/scratch.py does):
codes and scales in, codes and scales out. The reference (QuantReference) is
tests/reference.py's fp32 step with the moments kept as the host codec's codes between
steps, so every step checks the decode, the fp32 update, the block scales, the encode
(nearest or stochastic, with the kernel's Philox bits) and the param's rounding.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from reference import QuantReference, assert_same_bits
from tritonadam import quantize as Q
from tritonadam.kernels import quant
from tritonadam.kernels.launch import launch_prepare, launch_update
from tritonadam.kernels.plan import Bucket, DeviceTables, group_pointer_row, group_row, rounding_key
from tritonadam.kernels.variant import BucketKey, Master

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
QB = Q.QUANT_BLOCK
NONE, MASTER, REMAINDER = 0, 1, 2


def _levels(bits, signed):
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits


def _level_values(bits, signed):
    """Every code's normalized value, in fp64 (codes ascending)."""
    L = _levels(bits, signed)
    q = np.arange(0, L + 1) if signed else np.arange(1, L + 1)
    return q.astype(np.float64) ** 2 / L ** 2


def _moments(gen, n_blocks, signed, spread=1e4):
    """Blocks of QB values spanning ``spread`` in magnitude, as Adam moments do."""
    mag = torch.exp(torch.rand(n_blocks, QB, generator=gen, dtype=torch.float64) * np.log(spread)) / spread
    scale = torch.exp(torch.randn(n_blocks, 1, generator=gen, dtype=torch.float64) * 5)
    x = mag * scale
    if signed:
        x = x * torch.where(torch.rand(n_blocks, QB, generator=gen) < 0.5, -1.0, 1.0).double()
    return x.float().reshape(-1)


# ---- the host codec -----------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "positive"])
@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_takes_the_nearest_level(bits, signed):
    """Each value decodes to the nearer of the two codes around it (ties, and values
    within fp32 rounding of a midpoint, either way); scales are the block's absmax rounded
    up to bf16; the error per element is at most half the largest gap: 8-bit signed
    scale * 253 / 2 / 127**2 (0.78% of the scale), positive scale * 511 / 2 / 256**2 (0.39%);
    4-bit signed scale * 13 / 2 / 49 (13.3%), positive scale * 31 / 2 / 256 (6.1%)."""
    gen = torch.Generator().manual_seed(bits + signed)
    x = _moments(gen, 500, signed)
    codes, scales = Q.quantize(x, bits, signed)
    assert codes.dtype == torch.uint8 and scales.dtype == BF16
    assert codes.numel() == Q.code_bytes(x.numel(), bits) and scales.numel() == x.numel() // QB
    absmax = x.double().abs().reshape(-1, QB).amax(dim=1)
    s = scales.double()
    assert (s >= absmax).all() and (s <= absmax * (1 + 2 ** -7)).all()
    back = Q.dequantize(codes, scales, x.numel(), bits, signed).double()
    s_el = s.repeat_interleave(QB)
    levels = torch.from_numpy(_level_values(bits, signed))
    y = x.double().abs() / s_el
    above = torch.searchsorted(levels, y.clamp(max=1.0), right=True).clamp(1, len(levels) - 1)
    lo, hi = levels[above - 1] * s_el, levels[above] * s_el
    got = back.abs()
    near = torch.where((x.double().abs() - lo) <= (hi - x.double().abs()), lo, hi)
    mid = (lo + hi) / 2
    tie = (x.double().abs() - mid).abs() <= mid * 2 ** -22
    below = x.double().abs() < levels[0] * s_el  # under the lowest positive level
    ok = (got == near) | (tie & ((got == lo) | (got == hi))) | (below & (got == levels[0] * s_el))
    # Decoding rounds twice (the unit, then q^2 times it): within two fp32 roundings of
    # the level's value.
    ok = ok | ((got - near).abs() <= near * 2 ** -22)
    assert ok.all(), f"{int((~ok).sum())} of {x.numel()} not the nearest level"
    L = _levels(bits, signed)
    gap = (2 * L - 1) / L ** 2 if signed else (2 * L - 1) / L ** 2
    bound = s_el * gap / 2 * (1 + 2 ** -20)
    assert ((back - x.double()).abs() <= bound).all()
    if signed:
        assert (((back < 0) == (x < 0)) | (back == 0)).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_second_moment_never_decodes_to_zero_unless_its_block_is_zero(bits):
    gen = torch.Generator().manual_seed(3)
    x = _moments(gen, 64, False, spread=1e30)
    x[5 * QB: 6 * QB] = 0.0  # an all-zero block: scale 0, decodes to exactly 0
    x[7 * QB + 3] = 0.0  # a zero in a live block: decodes to the smallest level
    codes, scales = Q.quantize(x, bits, False)
    back = Q.dequantize(codes, scales, x.numel(), bits, False)
    live = scales.float().repeat_interleave(QB) > 0
    assert (back[live] > 0).all()
    assert torch.equal(back[~live], torch.zeros(int((~live).sum())))
    assert (~live).sum() == QB
    assert back[7 * QB + 3] == scales[7].float() * (1.0 / 4 ** bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_fresh_state_and_zeros_decode_to_zero(bits):
    for signed in (True, False):
        codes, scales = Q.quantize(torch.zeros(3 * QB + 5), bits, signed)
        assert (scales.float() == 0).all()
        back = Q.dequantize(codes, scales, 3 * QB + 5, bits, signed)
        assert torch.equal(back, torch.zeros_like(back))
    x = _moments(torch.Generator().manual_seed(4), 4, True)
    x[::3] = 0.0
    back = Q.dequantize(*Q.quantize(x, bits, True), x.numel(), bits, True)
    assert (back[::3] == 0).all()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "positive"])
@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased_in_the_value_domain(bits, signed):
    """Blocks whose first element fixes the scale at 1 and whose other 63 hold one value
    between two levels: the mean decoded value is the value within 5 standard deviations
    of a mean of independent roundings, and the fraction rounded up is the distance to the
    lower level in units of the gap; rounding to nearest misses by far more."""
    levels = _level_values(bits, signed)
    k = len(levels) // 3
    frac = 0.3
    value = np.float32(levels[k] + frac * (levels[k + 1] - levels[k]))
    blocks = 4096
    x = torch.full((blocks, QB), float(value))
    x[:, 0] = 1.0
    x = x.reshape(-1)
    rng = np.random.default_rng(0)
    random = torch.from_numpy(rng.integers(0, 1 << 16, x.numel()).astype(np.int64))
    codes, scales = Q.quantize(x, bits, signed, random=random)
    assert (scales.float() == 1.0).all()
    back = Q.dequantize(codes, scales, x.numel(), bits, signed).reshape(blocks, QB)[:, 1:].double()
    # The two codes' decoded values (fp32, as the codec rounds them).
    lo, hi = (Q.decode(torch.tensor([c]), torch.tensor(1.0), bits, signed) for c in (k, k + 1))
    assert set(back.unique().tolist()) == {float(lo), float(hi)}
    n = back.numel()
    exact = float(value)
    p = (exact - float(lo)) / (float(hi) - float(lo))
    sigma = (float(hi) - float(lo)) * np.sqrt(p * (1 - p) / n)
    assert abs(back.mean().item() - exact) < 5 * sigma
    up = (back == float(hi)).double().mean().item()
    assert abs(up - p) < 5 * np.sqrt(p * (1 - p) / n)
    nearest = Q.dequantize(*Q.quantize(x, bits, signed), x.numel(), bits, signed).reshape(blocks, QB)[:, 1:]
    assert abs(nearest.double().mean().item() - exact) > 50 * sigma


@triton.jit
def _encode_nearest(x_ptr, scale_ptr, out_ptr, n, BITS: tl.constexpr, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """The kernel's nearest encode, one element per lane with its own scale."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + offs, mask=mask, other=1.0)
    inv = tl.where(scale > 0, 1.0 / tl.where(scale > 0, scale, 1.0), 0.0)
    codes = quant.encode(x, quant.unit(scale, BITS, SIGNED), inv, 0.0, BITS, SIGNED, False)
    tl.store(out_ptr + offs, codes, mask=mask)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "positive"])
@pytest.mark.parametrize("bits", [8, 4])
def test_nearest_encode_on_and_beside_every_threshold(bits, signed):
    """The kernel settles a nearest code with one comparison (the threshold below the level
    nearest in the square-root domain) where the host counts two: on every threshold
    (exactly the fp32 product the codec compares with), one ulp below and one above, for
    several scales, both give the same code, the lower level on and below a threshold
    (ties down) and the upper one above it."""
    L = _levels(bits, signed)
    q0 = 0 if signed else 1
    scales = torch.tensor([1.0, 3.140625, 2.0 ** -20, 1.5e-30, 6.5e20])  # bf16 values
    q = torch.arange(q0, L, dtype=torch.float32)  # thresholds between q and q + 1
    s = scales.repeat_interleave(len(q))
    qq = q.repeat(len(scales))
    thr = Q._threshold(qq, 65536.0) * Q._unit(s, L)
    x = torch.cat([thr, torch.nextafter(thr, torch.zeros(())), torch.nextafter(thr, torch.full((), np.inf))])
    s = s.repeat(3)
    want_level = torch.cat([qq, qq, qq + 1])
    if signed:
        x, s, want_level = torch.cat([x, -x]), s.repeat(2), torch.cat([want_level, -want_level])
    n = x.numel()
    block = triton.next_power_of_2(n)
    out = torch.empty(n, dtype=torch.int32)
    _encode_nearest[(1,)](x, s, out, n, bits, signed, block)
    host = Q.encode(x, s, torch.where(s > 0, 1.0 / s, torch.zeros_like(s)), 65536.0, bits, signed)
    assert torch.equal(out.to(torch.float32), host)
    code = want_level if signed else want_level - q0
    assert torch.equal(host, code), int((host != code).sum())


@pytest.mark.parametrize("numel", [1, 2, 7, QB - 1, QB, QB + 1, 2 * QB + 3])
def test_four_bit_packing_of_any_length(numel):
    """Element 2i in the low nibble of byte i, 2i + 1 in the high one; an odd tensor's last
    high nibble is 0; and 4-bit codes are the 8-bit codec's arithmetic at 4 bits."""
    x = _moments(torch.Generator().manual_seed(numel), 3, True)[:numel]
    codes, scales = Q.quantize(x, 4, True)
    assert codes.numel() == (numel + 1) // 2 and scales.numel() == -(-numel // QB)
    if numel % 2:
        assert int(codes[-1]) >> 4 == 0
    back = Q.dequantize(codes, scales, numel, 4, True)
    # Decode one element at a time from its own nibble.
    nib = torch.stack([codes.long() & 15, codes.long() >> 4], 1).reshape(-1)[:numel]
    k = (nib ^ 8) - 8
    s = scales.float().repeat_interleave(QB)[:numel]
    mag = (k * k).float() * (s * (1.0 / 49))
    assert torch.equal(back, torch.where(k < 0, -mag, mag))


def test_a_nan_poisons_its_block_only():
    x = _moments(torch.Generator().manual_seed(9), 3, False)
    x[QB + 5] = float("nan")
    for bits in (8, 4):
        back = Q.dequantize(*Q.quantize(x, bits, False), x.numel(), bits, False)
        assert torch.isnan(back[QB:2 * QB]).all()
        assert torch.isfinite(back[:QB]).all() and torch.isfinite(back[2 * QB:]).all()


def test_state_bytes_within_budget():
    """Bytes per param of the optimizer state (both moments, codes and scales, and the
    master's remainder where kept), counted from the tensors a state would allocate."""
    n = 1 << 20
    moment = {b: Q.state_bytes(n, b) / n for b in (8, 4)}
    assert moment[8] == 1 + 2 / QB and moment[4] == 0.5 + 2 / QB
    budget = {(8, "remainder"): 4.1, (8, "sr"): 2.1, (4, "remainder"): 3.1, (4, "sr"): 1.1}
    for (bits, mode), limit in budget.items():
        total = 2 * moment[bits] + (2 if mode == "remainder" else 0)
        assert total <= limit, (bits, mode, total)


# ---- the kernel against the reference -------------------------------------------------------


HYPER = dict(lr=2e-3, beta1=0.9, beta2=0.99, eps=1e-8)


class Run:
    """A multi-tensor launch over ``params`` with quantized moments, and its reference."""

    def __init__(self, params, bits, *, kind="adam", decoupled=False, wd=0.0, amsgrad=False,
                 master=NONE, sr=False, grad_dtype=None, maximize=False, seed=5,
                 codes_offset=0):
        self.params, self.bits, self.kind = params, bits, kind
        self.decoupled, self.wd, self.maximize = decoupled, wd, maximize
        self.amsgrad = amsgrad and kind == "adam"
        self.grad_dtype = grad_dtype or params[0].dtype
        dtype = params[0].dtype
        self.state = []
        rows = []
        self.steps = torch.zeros(len(params))
        for i, p in enumerate(params):
            n = p.numel()
            st = {}
            for name in ("m", "v", "vmax"):
                if name == "vmax" and not self.amsgrad:
                    continue
                # codes_offset: the codes (and scales) as views at an odd byte offset.
                codes = torch.zeros(Q.code_bytes(n, bits) + codes_offset, dtype=torch.uint8)[codes_offset:]
                scales = torch.zeros(Q.num_scales(n) + codes_offset, dtype=BF16)[codes_offset:]
                st[name] = (codes, scales)
            if master == MASTER:
                st["w"] = p.detach().float().clone()
            elif master == REMAINDER:
                st["w"] = torch.zeros(n, dtype=torch.int16)
            self.state.append(st)
            vmax = st.get("vmax", (None, None))
            rows.append(DeviceTables.row(p, (st["m"][0], st["v"][0], vmax[0]), (st["m"][1], st["v"][1], vmax[1]),
                                         st.get("w"), self.steps[i], rounding_key(seed, i)))
        self.tables = DeviceTables(torch.device("cpu"), rows, [0] * len(rows), 1)
        b1, b2 = HYPER["beta1"], HYPER["beta2"]
        self.tables.set_groups(group_row(HYPER["lr"], b1, b2, HYPER["eps"], wd, decoupled=decoupled,
                                         maximize=maximize, bias_correction=True), group_pointer_row())
        key = BucketKey(dtype, self.grad_dtype, f"{bits}bit", self.amsgrad, Master(master), sr)
        self.bucket = Bucket(key, torch.device("cpu"), 0, np.asarray([p.numel() for p in params], dtype=np.int64))
        self.refs = [QuantReference(p, kind, bits, master=bool(master), amsgrad=self.amsgrad,
                                    stochastic_rounding=sr, key=rounding_key(seed, i))
                     for i, p in enumerate(params)]

    def step(self, grads, *, block_size=1024, num_warps=4, persistent=False, grad_scale=None,
             found_inf=None, reference=True):
        """One kernel step; ``grads`` are the true grads (scaled by ``grad_scale`` for the
        kernel, a power of two so unscaling is exact)."""
        kernel_grads = [(g * grad_scale if grad_scale is not None else g).to(self.grad_dtype) for g in grads]
        self._keep = kernel_grads
        self.tables.set_grad_ptrs(np.asarray([g.data_ptr() for g in kernel_grads], dtype=np.int64))
        scale_t = torch.tensor([float(grad_scale)]) if grad_scale is not None else None
        launch_prepare(self.tables, grad_scale=scale_t, found_inf=found_inf, count=False)
        launch_update(self.tables, self.bucket, block_size=block_size, num_warps=num_warps,
                      persistent=persistent, adamax=self.kind == "adamax",
                      decoupled_wd=self.decoupled and self.wd != 0,
                      coupled_wd=not self.decoupled and self.wd != 0, found_inf=found_inf, count=False)
        if reference:
            for r, g in zip(self.refs, grads):
                r.update(g.to(self.grad_dtype), HYPER["lr"], HYPER["beta1"], HYPER["beta2"], HYPER["eps"],
                         self.wd, decoupled=self.decoupled, maximize=self.maximize)

    def check(self):
        for p, st, r in zip(self.params, self.state, self.refs):
            assert_same_bits(p, r.p)
            for name in ("m", "v", "vmax"):
                if name not in st:
                    continue
                codes, scales = st[name]
                want_codes, want_scales = r.q[name]
                assert torch.equal(codes, want_codes), (name, p.numel(), int((codes != want_codes).sum()))
                assert torch.equal(scales.view(torch.int16), want_scales.view(torch.int16)), (name, p.numel())
            if "w" in st:
                if st["w"].dtype == FP32:
                    assert_same_bits(st["w"], r.w)
                else:
                    from tritonadam.state import join_master
                    assert_same_bits(join_master(p.detach(), st["w"]), r.w)

    def snapshot(self):
        return [p.detach().clone() for p in self.params] + [
            t.clone() for st in self.state for pair in st.values() for t in (pair if isinstance(pair, tuple) else (pair,))]


# Odd sizes around the quant block and the launch block, an empty tensor, several sizes
# in one launch (a bucket's mix).
SIZES = [1, 7, QB - 1, QB + 1, 0, 4097, 1000]


def _params(sizes, dtype, seed=1, offset=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        base = torch.randn(n + offset, generator=gen).to(dtype)
        out.append(base[offset:])
    return out


def _grads(params, gen, scale=1.0):
    return [torch.randn(p.numel(), generator=gen) * scale * (1 + 10 * torch.rand(1, generator=gen))
            for p in params]


# (name, bits, kind, decoupled, wd, amsgrad, master, sr, param dtype, grad dtype, maximize)
COMBOS = [
    ("adam-fp32", "adam", False, 0.0, False, NONE, False, FP32, None, False),
    ("adam-fp32-amsgrad-sr", "adam", False, 0.05, True, NONE, True, FP32, None, False),
    ("adamw-bf16-sr", "adam", True, 0.1, False, NONE, True, BF16, None, False),
    ("adamw-bf16-remainder-amsgrad", "adam", True, 0.1, True, REMAINDER, False, BF16, None, False),
    ("adamw-bf16-remainder-sr-fp32grad", "adam", True, 0.1, False, REMAINDER, True, BF16, FP32, False),
    ("adam-fp16-master-amsgrad-sr-maximize", "adam", False, 0.05, True, MASTER, True, FP16, None, True),
    ("adam-bf16-master", "adam", False, 0.0, False, MASTER, False, BF16, None, False),
    ("adamax-bf16", "adamax", False, 0.05, False, NONE, False, BF16, None, False),
    ("adamax-fp16-sr", "adamax", False, 0.0, False, NONE, True, FP16, None, True),
    ("adamax-fp32-sr-decoupled", "adamax", True, 0.1, False, NONE, True, FP32, BF16, False),
    ("adamax-bf16-remainder", "adamax", False, 0.0, False, REMAINDER, False, BF16, None, False),
]
STEPS = 20


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("combo", COMBOS, ids=[c[0] for c in COMBOS])
def test_kernel_matches_reference_bit_for_bit(combo, bits):
    """20 steps of a launch over odd sizes: params, masters, codes and scales after every
    step."""
    _, kind, decoupled, wd, amsgrad, master, sr, dtype, grad_dtype, maximize = combo
    run = Run(_params(SIZES, dtype), bits, kind=kind, decoupled=decoupled, wd=wd, amsgrad=amsgrad,
              master=master, sr=sr, grad_dtype=grad_dtype, maximize=maximize)
    gen = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        run.step(_grads(run.params, gen), block_size=4096)
        run.check()


@pytest.mark.parametrize("bits", [8, 4])
def test_results_do_not_depend_on_the_launch_config(bits):
    """The same steps under two block sizes and warp counts and a persistent grid: the
    same bits (blocks of QUANT_BLOCK never depend on the launch)."""
    results = []
    for cfg in (dict(block_size=1024, num_warps=4), dict(block_size=2048, num_warps=8),
                dict(block_size=512, num_warps=2, persistent=True)):
        run = Run(_params(SIZES, BF16), bits, decoupled=True, wd=0.1, amsgrad=True, sr=True)
        gen = torch.Generator().manual_seed(8)
        for _ in range(4):
            run.step(_grads(run.params, gen), reference=False, **cfg)
        results.append(run.snapshot())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("where", ["param", "codes"])
def test_misaligned_views_take_the_masked_path(where, bits):
    """A param (or its codes and scales) at an odd offset: every block goes through the
    masked path, with the same bits as the reference."""
    offset = 1
    params = _params([3 * QB + 5, 2048 + 64, 9], FP32, offset=offset if where == "param" else 0)
    if where == "param":
        assert all(p.data_ptr() % 16 for p in params if p.numel())
    run = Run(params, bits, decoupled=True, wd=0.1, amsgrad=True, sr=True,
              codes_offset=offset if where == "codes" else 0)
    gen = torch.Generator().manual_seed(10)
    for _ in range(6):
        run.step(_grads(run.params, gen), block_size=1024)
    run.check()


@pytest.mark.parametrize("bits", [8, 4])
def test_grad_scale_is_undone_and_found_inf_writes_nothing(bits):
    run = Run(_params(SIZES, BF16), bits, decoupled=True, wd=0.1, amsgrad=True, master=REMAINDER)
    gen = torch.Generator().manual_seed(11)
    flag = torch.zeros(1)
    for _ in range(3):
        run.step(_grads(run.params, gen), grad_scale=1024.0, found_inf=flag)
    run.check()
    before = run.snapshot()
    flag.fill_(1.0)
    run.step(_grads(run.params, gen), grad_scale=1024.0, found_inf=flag, reference=False)
    for a, b in zip(before, run.snapshot()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert (run.steps == 3).all()
    flag.zero_()
    run.step(_grads(run.params, gen), grad_scale=1024.0, found_inf=flag)
    run.check()


def test_first_step_from_fresh_state_matches_fp32_adam_moments():
    """From zero state the first step's moments are one quantization of fp32 Adam's: the
    decoded exp_avg is (1 - beta1) g rounded to the codec, v likewise, never 0 where g is."""
    params = _params([4097], FP32)
    run = Run(params, 8)
    g = _grads(params, torch.Generator().manual_seed(12))
    run.step(g)
    run.check()
    (m_codes, m_scales), (v_codes, v_scales) = run.state[0]["m"], run.state[0]["v"]
    m = Q.dequantize(m_codes, m_scales, 4097, 8, True)
    v = Q.dequantize(v_codes, v_scales, 4097, 8, False)
    want_m = g[0] * np.float32(1 - HYPER["beta1"])
    assert torch.allclose(m, want_m, rtol=1e-2, atol=float(m_scales.float().max()) * 1e-2)
    assert (v > 0).all()


# ---- launch shapes ------------------------------------------------------------------------


def test_quant_block_divides_every_launch_chunk_on_the_gpu(monkeypatch):
    """Every block of the config space, and every iteration of both paths under it, covers
    whole quant blocks (so blocks never depend on the launch config); the full path's
    iterations hold whole scale groups, the masked path's at least a row per warp."""
    from tritonadam.autotune.configs import config_space
    from tritonadam.kernels import aot, launch

    monkeypatch.setattr(launch, "interpreted", lambda: False)
    configs = {(c.block_size, c.num_warps) for backend in ("cuda", "hip") for c in config_space(backend)}
    assert configs
    for block, warps in configs:
        for dtype, master in ((FP32, NONE), (BF16, REMAINDER), (FP16, MASTER)):
            for sr in (False, True):
                for bits in (8, 4):
                    f = aot.update_variant(warps, block, param_dtype=dtype, master=master,
                                           stochastic_rounding=sr, quant=bits)
                    assert block % QB == 0 and f["FULL"] % QB == 0 and f["SUB"] % QB == 0
                    assert block % f["FULL"] == 0 and block % f["SUB"] == 0
                    rows, vec = f["FULL"] // QB, f["QVEC"]
                    assert vec in (4, 8) and rows % vec == 0, (block, warps, f)
                    assert f["FULL"] // (32 * warps) >= vec  # a thread holds its row's group
                    assert f["SUB"] // QB >= max(warps, 2), (block, warps, f)


def test_quantized_variants_refuse_what_they_cannot_step():
    from tritonadam.kernels.aot import update_variant

    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        update_variant(8, 1024, param_dtype=torch.float64, quant=8)
    with pytest.raises(ValueError, match="unknown state format '2bit'"):
        update_variant(8, 1024, quant=2)
    with pytest.raises(ValueError, match="multiple of 512"):
        update_variant(2, 256, quant=8)
    plain = update_variant(8, 1024)
    assert "QUANT" not in plain and "QVEC" not in plain  # the unquantized kernels as before
