"""Quantized optimizer state through the optimizers (``state_dtype="8bit"`` / ``"4bit"``,
issue 18): every class and precision mode bit for bit against a plain-torch reference
(``reference.QuantReference``: fp32 step, moments kept as the host codec's codes between
steps), state dicts in every direction, memory per param, composition with the rest of the
optimizer (GradScaler, clipping, maximize, tensor lr, AMSGrad, CUDA graphs), and errors.

Kernel-level checks (the codec, the launch on device tables) live in test_quant_kernel.py;
FSDP2 and DCP resharding in test_fsdp.py (fsdp_worker.py's ``fsdp2_quantized*``).

Cost: the interpreter pays ~50-100 ms per program of a quantized variant, about one per
small tensor per step, so the tests keep tensors few and small.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from helpers import PAIRS, bf16_subnormals
from reference import QuantReference
from tritonadam import quantize as Q
from tritonadam.kernels import launch_counts
from tritonadam.kernels.plan import rounding_key
from tritonadam.state import join_master, variant

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
QB = Q.QUANT_BLOCK
BITS = {"8bit": 8, "4bit": 4}
# Quantized state steps whole groups of 512 elements per program: 4096 is a multiple.
LAUNCH = {"block_size": 4096, "num_warps": 4}
SECOND = {"Adam": "exp_avg_sq", "AdamW": "exp_avg_sq", "Adamax": "exp_inf"}
KIND = {"Adam": "adam", "AdamW": "adam", "Adamax": "adamax"}
SIGNED = {"exp_avg": True, "exp_avg_sq": False, "exp_inf": False, "max_exp_avg_sq": False}
REF_SLOT = {"exp_avg": "m", "exp_avg_sq": "v", "exp_inf": "v", "max_exp_avg_sq": "vmax"}
BETAS = (0.9, 0.99)
EPS = 1e-8


def moment_keys(name: str, amsgrad: bool) -> tuple[str, ...]:
    return ("exp_avg", SECOND[name]) + (("max_exp_avg_sq",) if amsgrad and name != "Adamax" else ())


# ---- the order the kernel steps a param's elements ---------------------------------------


def _dense(t: torch.Tensor) -> bool:
    """The elements fill their memory span exactly once (any dim order)."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def kernel_order(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``value`` (shaped like ``p``) flat, in the order the kernel steps ``p``: memory
    order for a dense param, logical order for a non-dense one (stepped in a contiguous
    staging copy). On the CPU, where the reference runs."""
    value = value.detach().cpu()
    if not _dense(p):
        return value.reshape(-1).clone()
    out = torch.empty_strided(p.shape, p.stride(), dtype=value.dtype)
    out.copy_(value)
    return out.as_strided((p.numel(),), (1,))


def logical(flat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The inverse of ``kernel_order``: shaped like ``p``."""
    if not _dense(p):
        return flat.reshape(p.shape)
    out = torch.empty_strided(p.shape, p.stride(), dtype=flat.dtype)
    out.as_strided((p.numel(),), (1,)).copy_(flat)
    return out


# ---- params -------------------------------------------------------------------------------

# Odd sizes around the quantization block (64) and the launch block (4096), 0-dim and empty
# tensors, 2-D params with rows of 64 (blocks on row boundaries) and of 50.
ODD_SHAPES = [(), (1,), (7,), (63,), (65,), (4097,), (0,), (3, 64), (4, 50)]


def odd_params(dtype, device, seed=0, shapes=ODD_SHAPES, layouts=True) -> list[nn.Parameter]:
    """``shapes``, then (with ``layouts``) a transposed (dense, non-contiguous) param and a
    non-dense one (every other column of a buffer)."""
    gen = torch.Generator().manual_seed(seed)
    out = [nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(device)) for s in shapes]
    if layouts:
        out.append(nn.Parameter(torch.randn(70, 3, generator=gen).to(dtype).to(device).t()))
        out.append(nn.Parameter(torch.randn(6, 22, generator=gen).to(dtype).to(device)[:, ::2]))
        assert not out[-2].is_contiguous() and _dense(out[-2]) and not _dense(out[-1])
    return out


def make_grads(params, gen, scale=1.0):
    """Grads with the params' layout (as autograd gives them), of varying magnitude."""
    grads = []
    for p in params:
        g = torch.randn(p.shape, generator=gen) * scale * (1 + 10 * torch.rand((), generator=gen))
        grads.append(torch.empty_like(p, memory_format=torch.preserve_format).copy_(g.to(p.dtype)))
    return grads


def three_groups(params, lrs=(2e-3, 5e-3, 1e-3), wds=(0.1, 0.0, 0.03)):
    """Params dealt over three groups of different lr and weight decay."""
    return [{"params": params[i::3], "lr": lrs[i], "weight_decay": wds[i]} for i in range(3)]


class Refs:
    """One ``QuantReference`` per param of ``opt`` (in the optimizer's order, which keys the
    stochastic rounding's random stream), stepped on the CPU in the kernel's order."""

    def __init__(self, opt, name, bits, exact_codes=False):
        # exact_codes: codes and scales bit for bit on a GPU too, wherever the moments do
        # not read the params (decoupled or no weight decay). Their arithmetic is IEEE
        # there (FMA fusion off in tests) and the encoder settles each code with exact
        # comparisons after its approximate square root; only the update itself uses
        # approximate operations, and its params feed coupled weight decay alone.
        self.opt, self.name, self.bits, self.exact_codes = opt, name, bits, exact_codes
        self.entries = []
        index = 0
        for group in opt.param_groups:
            for p in group["params"]:
                ref = QuantReference(kernel_order(p, p), KIND[name], bits, master=opt.master_weights,
                                     amsgrad=group["amsgrad"] if name != "Adamax" else False,
                                     stochastic_rounding=opt.stochastic_rounding,
                                     key=rounding_key(opt.seed, index) if opt.stochastic_rounding else 0)
                self.entries.append((p, group, ref))
                index += 1

    def step(self, grads: dict, coefficient=None):
        """The reference step of each param with a grad in ``grads`` (param -> true grad),
        times the clip ``coefficient`` if any."""
        for p, group, ref in self.entries:
            g = grads.get(p)
            if g is None:
                continue
            g = kernel_order(g, p).to(p.dtype)
            if coefficient is not None:
                g = g.float() * coefficient
            lr = float(group["lr"])  # a tensor lr: the value the kernel reads now
            ref.update(g, lr, *BETAS, group["eps"], group["weight_decay"],
                       decoupled=group.get("decoupled_weight_decay", False), maximize=group["maximize"])

    def check(self, what=""):
        """Params, codes, scales and the master, bit for bit (on the CPU)."""
        for i, (p, group, ref) in enumerate(self.entries):
            if not p.numel() or p not in self.opt.state:
                continue
            where = f"{what} param {i} {tuple(p.shape)}"
            same_bits(p, logical(ref.p, p), where)
            state = self.opt.state[p]
            for key in moment_keys(self.name, group["amsgrad"] if self.name != "Adamax" else False):
                codes, scales = state[f"{key}_{self.bits}bit"], state[f"{key}_scales"]
                want_codes, want_scales = ref.q[REF_SLOT[key]]
                exact = self.exact_codes and (group.get("decoupled_weight_decay", False)
                                              or group["weight_decay"] == 0)
                same_codes(codes, scales, want_codes, want_scales, p.numel(), self.bits, SIGNED[key],
                           f"{where} {key}", exact=exact)
            if "master_param" in state:
                same_bits(state["master_param"], logical(ref.w, p), f"{where} master")
            if "master_param_remainder" in state:
                joined = join_master(p.detach().cpu(), state["master_param_remainder"].cpu())
                # joined on the CPU; exact or close by where the step ran
                same_bits(joined, logical(ref.w, p), f"{where} master", ran_on=p.device)


def same_bits(actual, expected, what="", ran_on=None):
    """Bit for bit where the step ran on the CPU; on a GPU (approximate exp/log in the
    bias corrections, the approximate sqrt of the quantized update, then codes that can
    land on the other side of a level) close. ``ran_on``: the device the optimizer stepped
    on, for a value brought to the CPU before the comparison (default: ``actual``'s)."""
    actual = actual.detach()
    if (actual.device if ran_on is None else torch.device(ran_on)).type == "cpu":
        assert actual.shape == expected.shape, what
        differ = actual != expected
        assert not differ.any(), f"{what}: {int(differ.sum())} of {actual.numel()} elements differ"
    else:
        torch.testing.assert_close(actual.cpu().float(), expected.float(), rtol=2e-2, atol=2e-3, msg=what)


def same_codes(codes, scales, want_codes, want_scales, numel, bits, signed, what="", exact=False):
    """Bit for bit on the CPU, or with ``exact`` on a GPU; else the decoded values close."""
    if codes.device.type == "cpu" or exact:
        assert codes.dtype == torch.uint8 and scales.dtype == BF16, what
        codes, scales = codes.cpu(), scales.cpu()
        differ = codes != want_codes
        assert not differ.any(), f"{what}: {int(differ.sum())} of {codes.numel()} codes differ"
        assert torch.equal(scales.view(torch.int16), want_scales.view(torch.int16)), f"{what}: scales"
    else:
        got = Q.dequantize(codes.cpu(), scales.cpu(), numel, bits, signed)
        want = Q.dequantize(want_codes, want_scales, numel, bits, signed)
        torch.testing.assert_close(got, want, rtol=0.15, atol=float(want_scales.float().abs().max()) * 0.15,
                                   msg=what)


def _launch(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()


# ---- 1. every class and mode bit for bit against the reference ---------------------------

# (id, class, bits, param dtype, master_weights, stochastic_rounding, maximize)
MATRIX = [
    ("Adam-amsgrad-8bit-fp32", "Adam", 8, FP32, False, False, False),
    ("Adam-amsgrad-4bit-bf16-remainder", "Adam", 4, BF16, "remainder", False, False),
    ("Adam-amsgrad-8bit-fp16-master-sr-maximize", "Adam", 8, FP16, True, True, True),
    ("AdamW-4bit-fp32-sr", "AdamW", 4, FP32, False, True, False),
    ("AdamW-8bit-bf16-sr", "AdamW", 8, BF16, False, True, False),
    ("AdamW-4bit-bf16-master", "AdamW", 4, BF16, True, False, False),
    ("AdamW-8bit-bf16-remainder-sr", "AdamW", 8, BF16, "remainder", True, False),
    ("Adamax-4bit-fp16-sr", "Adamax", 4, FP16, False, True, False),
    ("Adamax-8bit-bf16-master-sr", "Adamax", 8, BF16, True, True, True),
    ("Adamax-4bit-bf16-remainder", "Adamax", 4, BF16, "remainder", False, False),
]
STEPS = 10


def build(name, params, bits, *, master=False, sr=False, maximize=False, groups=True, **kw):
    amsgrad = {"amsgrad": True} if name == "Adam" else {}
    spec = three_groups(params) if groups else params
    return PAIRS[name][0](spec, betas=BETAS, maximize=maximize, master_weights=master,
                          stochastic_rounding=sr, state_dtype=f"{bits}bit", seed=1234, **amsgrad,
                          **{"eps": EPS, **LAUNCH, **kw})


@pytest.mark.parametrize("combo", MATRIX, ids=[c[0] for c in MATRIX])
def test_bit_for_bit_against_the_reference(combo, device):
    """10 steps of every odd shape (0-dim, 1, 7, 63, 65, 4097, empty, rows of 64 and of 50,
    a transposed and a non-dense param) dealt over three groups of different lr and weight
    decay: params, codes, scales and masters bit for bit, in one update launch per step
    (2 launches with the prepare launch)."""
    _, name, bits, dtype, master, sr, maximize = combo
    params = odd_params(dtype, device, seed=1)
    opt = build(name, params, bits, master=master, sr=sr, maximize=maximize)
    refs = Refs(opt, name, bits, exact_codes=True)
    gen = torch.Generator().manual_seed(2)
    before = dict(launch_counts)
    for _ in range(STEPS):
        grads = make_grads(params, gen)
        _launch(opt, params, grads)
        refs.step(dict(zip(params, grads)))
    assert launch_counts["prepare"] - before["prepare"] == STEPS
    assert launch_counts["update"] - before["update"] == STEPS
    refs.check(name)
    for p in params:
        assert opt.state[p]["step"].item() == STEPS


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_subnormal_grads_encode_like_the_reference(bits, device):
    """bf16 grads made of subnormals (every pattern, both signs; Triton's interpreter's own
    bf16 widening flushes or garbles them) beside normal ones, with a remainder master and
    stochastic rounding: params, codes, scales and masters bit for bit."""
    gen = torch.Generator().manual_seed(41)
    patterns = bf16_subnormals()
    params = odd_params(BF16, device, seed=42, shapes=[(1100,), (3, 64)], layouts=False)
    opt = build("AdamW", params, bits, master="remainder", sr=True)
    refs = Refs(opt, "AdamW", bits, exact_codes=True)
    for _ in range(3):
        grads = []
        for p in params:
            g = patterns[torch.randint(0, patterns.numel(), p.shape, generator=gen)]
            g[..., ::3] = torch.randn(g[..., ::3].shape, generator=gen).to(BF16) * 1e-30  # blocks of mixed size
            grads.append(g.to(device))
        _launch(opt, params, grads)
        refs.step(dict(zip(params, grads)))
    refs.check("subnormal grads")


@pytest.mark.parametrize("name", ["Adam", "Adamax"])
@pytest.mark.parametrize("bits", [8, 4])
def test_subnormal_and_overflowing_moments_encode_like_the_host_codec(bits, name, device):
    """Blocks whose largest moment is an fp32 subnormal (tiny grads): the scale, that
    moment rounded up to bf16, is a subnormal too and must be stored exactly (Triton's
    interpreter's fp32 -> bf16 conversion zeroed or garbled it: a second moment of 0,
    with a small eps an update ~1e10 too large). Below 2**-128 its inverse overflows, and
    a block whose second moment overflows (grads of 1e30) has an inf scale: codes the
    host codec (checkpoint loads) gives too. Params, codes and scales bit for bit."""
    gen = torch.Generator().manual_seed(43)
    sizes = torch.tensor([1e-19, 3e-20, 1e-21, 2e-22, 1e-38, 1e-40, 1.0, 1e30])
    params = odd_params(FP32, device, seed=44, shapes=[(len(sizes) * QB,), (QB + 5,)], layouts=False)
    opt = build(name, params, bits, groups=False)
    refs = Refs(opt, name, bits, exact_codes=True)
    for _ in range(3):
        grads = [(torch.randn(len(sizes), QB, generator=gen) * sizes[:, None]).reshape(-1).to(device),
                 (torch.randn(QB + 5, generator=gen) * 1e-19).to(device)]
        _launch(opt, params, grads)
        refs.step(dict(zip(params, grads)))
    refs.check("subnormal moments")
    if name == "Adam":  # AdaMax's exp_inf is at least eps
        scales = quantized(opt, params[0], "exp_avg_sq", bits)[1].float()
        assert (scales[:3] > 0).all() and (scales[:3] < 1.2e-38).all()


# ---- 2. the launch config does not change a bit --------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_results_do_not_depend_on_the_launch_config(bits, device):
    """The same 3 steps under three block sizes, warp counts and a persistent grid (a
    tensor over several launch blocks, its last block partial): params, codes, scales and
    remainders are the same bits (quantization blocks are counted from each tensor's
    element 0, never from the launch's blocks)."""
    results = []
    for config in (dict(block_size=512, num_warps=2), dict(block_size=4096, num_warps=8),
                   dict(block_size=1024, num_warps=4, persistent=True)):
        params = odd_params(BF16, device, seed=3, shapes=[(1100,), (3, 64), (65,)], layouts=False)
        opt = PAIRS["AdamW"][0](params, lr=1e-2, amsgrad=True, master_weights="remainder",
                                stochastic_rounding=True, state_dtype=f"{bits}bit", seed=5, **config)
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            _launch(opt, params, make_grads(params, gen))
        results.append(snapshot(opt, params))
    for other in results[1:]:
        assert_same_snapshot(results[0], other)


def snapshot(opt, params):
    """Every param and state tensor (CPU copies), by param index."""
    out = []
    for p in params:
        state = {k: v.detach().cpu().clone() for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}
        out.append((p.detach().cpu().clone(), state))
    return out


def _bits(t):
    return t.reshape(-1).contiguous().view(torch.uint8) if t.numel() else t.reshape(-1)


def assert_same_snapshot(a, b, what=""):
    assert len(a) == len(b)
    for i, ((pa, sa), (pb, sb)) in enumerate(zip(a, b)):
        assert torch.equal(_bits(pa), _bits(pb)), f"{what}: param {i} differs"
        assert sa.keys() == sb.keys(), (what, i, sa.keys(), sb.keys())
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, (what, i, key)
            assert torch.equal(_bits(sa[key]), _bits(sb[key])), f"{what}: param {i} state {key!r} differs"


# ---- 3. state dicts ------------------------------------------------------------------------


def layout_params(dtype, device, seed=0):
    """Rows of 64 (codes and scales exported as rows), rows of 128, a 3-D param with rows of
    192, rows of 50, 1-D, 0-dim and empty params (flat), and a transposed param with rows of
    64 (codes in memory order: exported per element)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 64), (2, 128), (2, 3, 64), (4, 50), (7,), (), (0,)]
    params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(device)) for s in shapes]
    params.append(nn.Parameter(torch.randn(64, 3, generator=gen).to(dtype).to(device).t()))
    return params


def exported_shapes(p, bits):
    """(codes shape, scales shape) that ``state_dict()`` gives a (plain) param."""
    n = p.numel()
    if p.dim() == 0:  # one code and one scale, as in memory
        return (1,), (1,)
    if p.is_contiguous() and p.shape[0] and (n // p.shape[0]) % QB == 0:
        row = n // p.shape[0]
        return (p.shape[0], row * bits // 8), (p.shape[0], row // QB)
    # blocks off the rows, or codes in memory order: a code and a scale per element
    return tuple(p.shape), tuple(p.shape)


def in_memory_order(p, flat):
    """``flat`` (one value per element of dense ``p``, in its memory order) indexed like ``p``."""
    out = torch.empty_like(p, dtype=flat.dtype, device=flat.device)
    out.as_strided((p.numel(),), (1,)).copy_(flat)
    return out


def full_moment(opt, p, key):
    """Moment ``key`` of ``p`` at full precision (fp32, shaped like ``p``, on the CPU) from
    the optimizer's own state, whatever its format."""
    state = opt.state[p]
    if key in state:
        return state[key].detach().float().cpu()
    for bits in (8, 4):
        if f"{key}_{bits}bit" in state:
            flat = Q.dequantize(state[f"{key}_{bits}bit"].cpu(), state[f"{key}_scales"].cpu(), p.numel(),
                                bits, SIGNED[key])
            return logical(flat, p)
    raise KeyError(key)


@pytest.mark.parametrize("name,bits", [("AdamW", 8), ("AdamW", 4), ("Adamax", 8)])
def test_state_dict_keys_dtypes_and_shapes(name, bits, device):
    """``state_dict()``: codes (uint8) and bf16 scales per moment, shaped (dim0, row) /
    (dim0, row * bits / 8) and (dim0, row / 64) for params whose rows are whole blocks, a
    code and a scale per element shaped like the param for the others (and a transposed
    one), holding the optimizer's codes and scales; the master as fp32 ``master_param``
    beside the remainder itself (the keys the state holds: flattened state dicts), the seed. ``torch_state_dict()``: torch.optim's keys, fp32 moments shaped like the
    params, the decoded codes exactly."""
    params = layout_params(BF16, device)
    amsgrad = {"amsgrad": True} if name != "Adamax" else {}
    opt = PAIRS[name][0](params, lr=1e-2, master_weights="remainder", stochastic_rounding=True,
                         state_dtype=f"{bits}bit", seed=9, **amsgrad, **LAUNCH)
    gen = torch.Generator().manual_seed(8)
    for _ in range(2):
        _launch(opt, params, make_grads(params, gen))
    keys = moment_keys(name, bool(amsgrad))
    sd = opt.state_dict()
    tsd = opt.torch_state_dict()
    assert sd["param_groups"] == tsd["param_groups"] == opt.state_dict()["param_groups"]
    for i, p in enumerate(params):
        saved, state = sd["state"][i], opt.state[p]
        expected_keys = {"step", "master_param", "master_param_remainder", "rounding_seed"}
        expected_keys |= {f"{k}_{bits}bit" for k in keys} | {f"{k}_scales" for k in keys}
        assert set(saved) == expected_keys, (i, sorted(saved))
        codes_shape, scales_shape = exported_shapes(p, bits)
        for key in keys:
            codes, scales = saved[f"{key}_{bits}bit"], saved[f"{key}_scales"]
            assert (codes.dtype, tuple(codes.shape)) == (torch.uint8, codes_shape), (i, key, codes.shape)
            assert (scales.dtype, tuple(scales.shape)) == (BF16, scales_shape), (i, key, scales.shape)
            live_codes, live_scales = state[f"{key}_{bits}bit"], state[f"{key}_scales"]
            if codes.shape == p.shape and scales.shape == p.shape:
                live_codes, live_scales = (in_memory_order(p, t) for t in Q.per_element(live_codes, live_scales, p.numel(), bits))
            assert torch.equal(codes.reshape(-1), live_codes.reshape(-1))
            assert torch.equal(scales.reshape(-1).view(torch.int16), live_scales.reshape(-1).view(torch.int16))
        master = saved["master_param"]
        assert master.dtype == FP32 and master.shape == p.shape
        assert torch.equal(master, join_master(p.detach(), state["master_param_remainder"]))
        assert torch.equal(saved["master_param_remainder"], state["master_param_remainder"])
        assert saved["step"].item() == 2 and int(saved["rounding_seed"]) == 9
        # The checkpoint torch.optim loads.
        full = tsd["state"][i]
        assert set(full) == {"step", "master_param", *keys}, (i, sorted(full))
        for key in keys:
            assert full[key].dtype == FP32 and full[key].shape == p.shape
            assert torch.equal(full[key].cpu(), full_moment(opt, p, key))
        assert torch.equal(full["master_param"], master)


def train(opt, params, gen, steps, **kw):
    for _ in range(steps):
        _launch(opt, params, make_grads(params, gen, **kw))


def resume_params(dtype, device, seed):
    """Rows of 64, 65 elements, 0-dim, and a transposed param (codes in memory order)."""
    gen = torch.Generator().manual_seed(seed)
    return odd_params(dtype, device, seed=seed, shapes=[(3, 64), (65,), ()], layouts=False) + [
        nn.Parameter(torch.randn(70, 3, generator=gen).to(dtype).to(device).t())]


@pytest.mark.parametrize("bits,mode", [
    (8, dict(master_weights="remainder", stochastic_rounding=True)),
    (4, dict(master_weights="remainder")),
    (4, dict(stochastic_rounding=True)),
], ids=["8bit-remainder-sr", "4bit-remainder", "4bit-sr"])
def test_save_load_continue_is_the_uninterrupted_run(bits, mode, device):
    """2 steps, ``state_dict()`` through pickle, loaded into a fresh optimizer (another
    seed), 2 more steps: params and every state tensor bit for bit those of 4 uninterrupted
    steps (random draws included)."""
    kw = dict(lr=5e-3, weight_decay=0.05, amsgrad=True, state_dtype=f"{bits}bit", **mode, **LAUNCH)
    whole = resume_params(BF16, device, seed=11)
    run = PAIRS["AdamW"][0](whole, seed=21, **kw)
    train(run, whole, torch.Generator().manual_seed(12), 4)

    params = resume_params(BF16, device, seed=11)
    gen = torch.Generator().manual_seed(12)
    first = PAIRS["AdamW"][0](params, seed=21, **kw)
    train(first, params, gen, 2)
    saved = pickle.loads(pickle.dumps(first.state_dict()))
    fresh = resume_params(BF16, device, seed=99)
    with torch.no_grad():
        for p, q in zip(fresh, params):
            p.copy_(q)  # a checkpoint restores the params too
    resumed = PAIRS["AdamW"][0](fresh, seed=4321, **kw)
    resumed.load_state_dict(saved)
    train(resumed, fresh, gen, 2)
    assert_same_snapshot(snapshot(run, whole), snapshot(resumed, fresh), "resumed")


RELAYOUTS = {
    # name: (shape, how the param starts, how it is re-laid out)
    "transposed": ((8, 96), lambda t: t, lambda t: t.t().contiguous().t()),
    "channels_last": ((4, 6, 3, 5), lambda t: t, lambda t: t.contiguous(memory_format=torch.channels_last)),
    "made_contiguous": ((96, 8), lambda t: t.t().contiguous().t(), lambda t: t.contiguous()),
}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("relayout", list(RELAYOUTS))
def test_a_param_relaid_out_under_its_codes_keeps_each_elements_moments(relayout, bits, device):
    """A param re-laid out between steps (same shape, other strides: ``p.data = ...``, a
    model moved to another memory format after steps) keeps each element's moments: the
    codes, flat in the old memory order, decode in it, and the next step re-encodes them in
    the new one: bit for bit what loading the moments at full precision into the re-laid
    out param gives. (Before, the codes were read in the new order: each element stepped
    with another element's moments.)"""
    shape, start, change = RELAYOUTS[relayout]
    kw = dict(lr=5e-3, amsgrad=True, master_weights="remainder", state_dtype=f"{bits}bit", **LAUNCH)

    def fresh():
        gen = torch.Generator().manual_seed(41)
        return [nn.Parameter(start(torch.randn(shape, generator=gen).to(BF16).to(device))),
                nn.Parameter(torch.randn(3, 70, generator=gen).to(BF16).to(device))]

    params = fresh()
    moved = PAIRS["AdamW"][0](params, **kw)
    gen = torch.Generator().manual_seed(42)
    train(moved, params, gen, 2)
    before = moved.torch_state_dict()
    params[0].data = change(params[0].data)
    assert params[0].stride() != before["state"][0]["exp_avg"].stride()
    after = moved.torch_state_dict()
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"):
        assert torch.equal(after["state"][0][key], before["state"][0][key]), key

    # The same moments loaded at full precision into the re-laid out param.
    loaded_params = fresh()
    with torch.no_grad():
        for p, q in zip(loaded_params, params):
            p.data = torch.empty_like(q, memory_format=torch.preserve_format).copy_(q)
    assert loaded_params[0].stride() == params[0].stride()
    loaded = PAIRS["AdamW"][0](loaded_params, **kw)
    loaded.load_state_dict(copy.deepcopy(before))
    # A checkpoint taken between the re-layout and the next step says the same.
    again_params = [nn.Parameter(p.detach().clone(memory_format=torch.preserve_format)) for p in loaded_params]
    again = PAIRS["AdamW"][0](again_params, **kw)
    again.load_state_dict(pickle.loads(pickle.dumps(moved.state_dict())))
    assert_same_snapshot(snapshot(loaded, loaded_params), snapshot(again, again_params), f"{relayout}: saved")
    # So do copies of the optimizer taken then (its params copied with it).
    copies = {"deepcopy": copy.deepcopy(moved), "pickle": pickle.loads(pickle.dumps(moved))}
    grads_from = gen.get_state()
    lockstep(moved, params, loaded, loaded_params, gen, 2)
    assert_same_snapshot(snapshot(moved, params), snapshot(loaded, loaded_params), relayout)
    for how, twin in copies.items():
        twin_params = [p for group in twin.param_groups for p in group["params"]]
        assert twin_params[0].stride() == params[0].stride()
        train(twin, twin_params, torch.Generator().set_state(grads_from), 2)
        assert_same_snapshot(snapshot(moved, params), snapshot(twin, twin_params), f"{relayout}: {how}")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("relayout", list(RELAYOUTS))
def test_a_checkpoint_loads_into_params_of_another_layout(relayout, bits, device):
    """``state_dict()`` taken with a param in one memory layout, loaded into the param laid
    out otherwise (a model saved in channels-last and loaded before ``.to(memory_format=
    ...)``, or the reverse): each element keeps its moments, bit for bit what the same
    state at full precision (``torch_state_dict()``) gives there; loaded into the same
    layout, training continues bit for bit. (Before, codes of a transposed or channels-last
    param were saved flat in its memory order and read in the loading param's.)"""
    shape, start, change = RELAYOUTS[relayout]
    cls = PAIRS["AdamW"][0]
    kw = dict(lr=5e-3, amsgrad=True, master_weights="remainder", state_dtype=f"{bits}bit", **LAUNCH)

    def fresh(layout):
        gen = torch.Generator().manual_seed(41)
        return [nn.Parameter(layout(start(torch.randn(shape, generator=gen).to(BF16).to(device)))),
                nn.Parameter(torch.randn(3, 70, generator=gen).to(BF16).to(device))]

    def restored(layout, sd):
        ps = fresh(layout)
        with torch.no_grad():
            for p, q in zip(ps, params):
                p.copy_(q)  # a checkpoint restores the params too
        o = cls(ps, **kw)
        o.load_state_dict(sd)
        return o, ps

    params = fresh(lambda t: t)
    opt = cls(params, **kw)
    gen = torch.Generator().manual_seed(42)
    train(opt, params, gen, 2)
    quantized = pickle.loads(pickle.dumps(opt.state_dict()))
    full = copy.deepcopy(opt.torch_state_dict())
    for where, layout in (("another layout", change), ("the same layout", lambda t: t)):
        loaded = [*restored(layout, quantized), *restored(layout, full)]
        assert loaded[1][0].stride() == fresh(layout)[0].stride()
        steps = torch.Generator().manual_seed(43)
        lockstep(*loaded, steps, 2)
        assert_same_snapshot(snapshot(*loaded[:2]), snapshot(*loaded[2:]), f"{relayout}: into {where}")
    # The same layout: the codes saved are the codes trained on.
    steps = torch.Generator().manual_seed(43)
    resumed, continued = restored(lambda t: t, quantized)
    lockstep(opt, params, resumed, continued, steps, 2)
    assert_same_snapshot(snapshot(opt, params), snapshot(resumed, continued), f"{relayout}: resumed")


def interop_params(device, seed):
    """fp32 params: rows of 64 (exported as rows), 65 elements, rows of 50 and a transposed
    param (codes in memory order: conversions must go through it)."""
    return odd_params(FP32, device, seed=seed, shapes=[(3, 64), (65,), (4, 50)], layouts=False) + [
        nn.Parameter(torch.randn(64, 5, generator=torch.Generator().manual_seed(seed)).to(device).t())]


def clones(params):
    return [nn.Parameter(p.detach().clone(memory_format=torch.preserve_format)) for p in params]


def quantized(opt, p, key, bits):
    state = opt.state[p]
    return state[f"{key}_{bits}bit"], state[f"{key}_scales"]


@pytest.mark.parametrize("bits", [8, 4])
def test_a_nan_block_stays_nan_whatever_its_scales_nan_bits(bits, device):
    """A block holding a NaN decodes to NaN, after a load too: the host encodes its scale
    as a positive quiet NaN (0x7FC0; torch's vectorised CPU conversion gives 0xFFFF), and the
    kernel reads a NaN scale with the sign bit as NaN on its masked path too (it read
    0xFFFF as 0: a fresh, zero moment, the NaN gone)."""
    x = torch.randn(72)
    x[5] = float("nan")
    assert Q.quantize(x, bits, True)[1].view(torch.int16)[0].item() == 0x7FC0
    assert Q.requantize(x, bits, True)[1].view(torch.int16)[0].item() == 0x7FC0
    gen = torch.Generator().manual_seed(61)
    for nan_bits in (0x7FC0, -1):  # -1: 0xFFFF
        # 72 elements: the masked path; 4160: full blocks, and a masked one
        params = [nn.Parameter(torch.randn(n, generator=gen).to(device)) for n in (72, 4160)]
        opt = PAIRS["AdamW"][0](params, lr=1e-2, state_dtype=f"{bits}bit", **LAUNCH)
        _launch(opt, params, make_grads(params, gen))
        for p in params:
            scales = opt.state[p]["exp_avg_scales"]
            scales.view(torch.int16)[0] = nan_bits
            scales.view(torch.int16)[-1] = nan_bits
        _launch(opt, params, make_grads(params, gen))
        for p in params:
            codes, scales = quantized(opt, p, "exp_avg", bits)
            m = Q.dequantize(codes.cpu(), scales.cpu(), p.numel(), bits, True)
            nan = m.isnan()
            assert nan[:QB].all() and nan[-(p.numel() % QB or QB):].all(), (nan_bits, p.numel())
            assert nan.sum().item() == QB + (p.numel() % QB or QB) - (QB if p.numel() <= QB else 0), nan_bits
    # A torch.optim state with a NaN moment loads into a NaN block, and steps as one.
    p = nn.Parameter(torch.randn(72, generator=gen).to(device))
    twin = nn.Parameter(p.detach().clone())
    ref = torch.optim.AdamW([twin], lr=1e-2)
    twin.grad = torch.randn(72, generator=gen).to(device)
    ref.step()
    sd = copy.deepcopy(ref.state_dict())
    sd["state"][0]["exp_avg"][3] = float("nan")
    opt = PAIRS["AdamW"][0]([p], lr=1e-2, state_dtype=f"{bits}bit", **LAUNCH)
    opt.load_state_dict(sd)
    _launch(opt, [p], make_grads([p], gen))
    m = Q.dequantize(*[t.cpu() for t in quantized(opt, p, "exp_avg", bits)], 72, bits, True)
    assert m[:QB].isnan().all() and not m[QB:].isnan().any()
    assert p.detach()[:QB].isnan().all() and not p.detach()[QB:].isnan().any()


def lockstep(a, pa, b, pb, gen, steps):
    """Both optimizers step the same grads."""
    for _ in range(steps):
        grads = make_grads(pa, gen)
        _launch(a, pa, grads)
        _launch(b, pb, [g.clone() for g in grads])


# Params after 5 more steps at lr 1e-2 from the same state: quantized moments move them
# by a fraction of an lr per step; without the loaded state (fresh moments) the first steps
# differ by about lr each.
CONTINUE_ATOL = {8: 2e-3, 4: 1.5e-2}


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_optim_state_dict_loads_and_continues(bits, device):
    """torch.optim.AdamW(amsgrad) trains 3 steps; its state dict loads into
    state_dtype="8bit"/"4bit": every moment's codes are the host codec's nearest encoding
    of torch's moment (in the param's memory order), steps carry over, and 5 more steps stay
    within quantization error of torch's own."""
    start = interop_params(device, seed=31)
    theirs_params = clones(start)
    theirs = torch.optim.AdamW(theirs_params, lr=1e-2, amsgrad=True, foreach=False)
    gen = torch.Generator().manual_seed(32)
    train(theirs, theirs_params, gen, 3)
    ours_params = clones(theirs_params)
    ours = PAIRS["AdamW"][0](ours_params, lr=1e-2, amsgrad=True, state_dtype=f"{bits}bit", **LAUNCH)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for p, q in zip(ours_params, theirs_params):
        assert ours.state[p]["step"].item() == 3 and "exp_avg" not in ours.state[p]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            codes, scales = Q.quantize(kernel_order(theirs.state[q][key], p), bits, SIGNED[key])
            got = quantized(ours, p, key, bits)
            assert torch.equal(got[0].cpu(), codes) and torch.equal(got[1].cpu().float(), scales.float()), key
    lockstep(ours, ours_params, theirs, theirs_params, gen, 5)
    for p, q in zip(ours_params, theirs_params):
        torch.testing.assert_close(p.detach(), q.detach(), atol=CONTINUE_ATOL[bits], rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_state_dict_loads_into_torch_optim(bits, device):
    """``torch_state_dict()`` (fp32 moments under torch's keys, the decoded codes exactly)
    loads into torch.optim.AdamW, which continues within quantization error of ours; the
    plain ``state_dict()`` would not do (codes, not moments)."""
    params = interop_params(device, seed=41)
    ours = PAIRS["AdamW"][0](params, lr=1e-2, amsgrad=True, state_dtype=f"{bits}bit", **LAUNCH)
    gen = torch.Generator().manual_seed(42)
    train(ours, params, gen, 3)
    tsd = copy.deepcopy(ours.torch_state_dict())
    theirs_params = clones(params)
    theirs = torch.optim.AdamW(theirs_params, lr=1e-2, amsgrad=True, foreach=False)
    theirs.load_state_dict(tsd)
    for p, q in zip(params, theirs_params):
        assert set(theirs.state[q]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(theirs.state[q][key].cpu(), full_moment(ours, p, key)), key
    lockstep(ours, params, theirs, theirs_params, gen, 5)
    for p, q in zip(params, theirs_params):
        torch.testing.assert_close(p.detach(), q.detach(), atol=CONTINUE_ATOL[bits], rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_an_idle_max_exp_avg_sq_loads_and_saves_again(bits, device):
    """amsgrad switched off after steps keeps max_exp_avg_sq in the state (as torch.optim
    does), and its checkpoint holds it too, per element for the transposed param. Loaded
    into params of either layout, it is converted with the moments in use: the receiver's
    state_dict() saves (it raised, the idle codes left per element), its value is the
    source's within a requantization, and amsgrad switched on again steps with it."""
    params = interop_params(device, seed=91)
    source = PAIRS["AdamW"][0](params, lr=1e-2, amsgrad=True, state_dtype=f"{bits}bit", **LAUNCH)
    gen = torch.Generator().manual_seed(92)
    train(source, params, gen, 2)
    source.param_groups[0]["amsgrad"] = False
    saved = copy.deepcopy(source.state_dict())
    assert saved["state"][3][f"max_exp_avg_sq_{bits}bit"].shape == params[3].shape  # per element
    for receiver in (clones(params), [nn.Parameter(p.detach().contiguous()) for p in params]):
        opt = PAIRS["AdamW"][0](receiver, lr=1e-2, state_dtype=f"{bits}bit", **LAUNCH)
        opt.load_state_dict(copy.deepcopy(saved))
        opt.state_dict()
        for p, q in zip(params, receiver):
            # the source's codes where the memory order is the same, else the nearest
            # codes of the saved values in the receiver's
            want = (quantized(source, p, "max_exp_avg_sq", bits) if q.stride() == p.stride() else
                    _expected_after_load(full_moment(source, p, "max_exp_avg_sq"), q, "max_exp_avg_sq", f"{bits}bit"))
            got = quantized(opt, q, "max_exp_avg_sq", bits)
            assert torch.equal(got[0].cpu(), want[0].cpu()) and torch.equal(got[1].cpu().float(), want[1].cpu().float())
        train(opt, receiver, gen, 1)
        opt.state_dict()
        opt.param_groups[0]["amsgrad"] = True
        train(opt, receiver, gen, 1)
        assert all(torch.isfinite(q.detach()).all() for q in receiver)
        opt.state_dict()


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "bf16"])
def test_torch_state_dict_keeps_an_idle_max_exp_avg_sq(fmt, device):
    """torch_state_dict() after amsgrad was switched off holds max_exp_avg_sq at fp32, the
    state's own values, as torch.optim's state_dict() keeps it (it was dropped for codes,
    and left in bf16 for bf16 state), so torch.optim loading it can switch amsgrad on again."""
    params = interop_params(device, seed=97)
    opt = PAIRS["AdamW"][0](params, lr=1e-2, amsgrad=True, state_dtype=FORMATS[fmt], **LAUNCH)
    gen = torch.Generator().manual_seed(98)
    train(opt, params, gen, 2)
    opt.param_groups[0]["amsgrad"] = False
    train(opt, params, gen, 1)
    tsd = copy.deepcopy(opt.torch_state_dict())
    for i, p in enumerate(params):
        got = tsd["state"][i]["max_exp_avg_sq"]
        assert got.dtype == torch.float32 and torch.equal(got.cpu(), full_moment(opt, p, "max_exp_avg_sq"))
    theirs_params = clones(params)
    theirs = torch.optim.AdamW(theirs_params, lr=1e-2, foreach=False)
    theirs.load_state_dict(tsd)
    theirs.param_groups[0]["amsgrad"] = True
    train(theirs, theirs_params, gen, 1)


FORMATS = {"8bit": "8bit", "4bit": "4bit", "fp32": None, "bf16": BF16}


def _expected_after_load(source_full: torch.Tensor, p, key, fmt):
    """What format ``fmt`` must hold for a moment whose full-precision value was
    ``source_full`` (fp32, shaped like ``p``): the nearest codes of its memory order, or the
    value in fp32 / rounded to bf16."""
    if fmt in BITS:
        return Q.quantize(kernel_order(source_full, p), BITS[fmt], SIGNED[key])
    return source_full.to(FORMATS[fmt])


@pytest.mark.parametrize("chain", [["8bit", "4bit", "fp32", "bf16", "8bit"], ["8bit", "bf16", "fp32", "4bit", "8bit"]],
                         ids=["8-4-fp32-bf16-8", "8-bf16-fp32-4-8"])
def test_every_format_loads_every_other(chain, device):
    """A checkpoint hops through 8-bit, 4-bit, fp32 and bf16 state (both ways round): at
    each load the receiving format holds the sender's moments converted (codes: nearest
    encoding of the decoded values in memory order; dense: the decoded values, in bf16
    rounded), and each receiver takes a step from it."""
    params = interop_params(device, seed=51)
    gen = torch.Generator().manual_seed(52)
    previous = None
    for fmt in chain:
        opt = PAIRS["Adam"][0](params, lr=1e-2, amsgrad=True, state_dtype=FORMATS[fmt], **LAUNCH)
        if previous is None:
            train(opt, params, gen, 2)
        else:
            before = {p: {k: full_moment(previous, p, k) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
                      for p in params}
            opt.load_state_dict(copy.deepcopy(previous.state_dict()))
            for p in params:
                for key, value in before[p].items():
                    want = _expected_after_load(value, p, key, fmt)
                    if fmt in BITS:
                        got = quantized(opt, p, key, BITS[fmt])
                        assert torch.equal(got[0].cpu(), want[0]), (fmt, key)
                        assert torch.equal(got[1].cpu().view(torch.int16), want[1].view(torch.int16)), (fmt, key)
                        assert not {k for k in opt.state[p] if k == key or k.endswith("bit") and
                                    not k.endswith(fmt)}, sorted(opt.state[p])
                    else:
                        got = opt.state[p][key]
                        assert got.dtype == want.dtype and got.shape == p.shape and got.stride() == p.stride()
                        assert torch.equal(got.cpu(), want), (fmt, key)
                        assert not [k for k in opt.state[p] if k.endswith(("bit", "_scales"))]
            train(opt, params, gen, 1)
        previous = opt
    assert all(previous.state[p]["step"].item() == len(chain) + 1 for p in params)


@pytest.mark.parametrize("bits", [8, 4])
def test_zeros_put_back_for_the_lowest_code_give_back_the_codes(bits):
    """FSDP1 drops the padding of its flat params from optimizer state dicts and refills it
    with 0 on load; a padding element's second moment had the lowest code, which the map
    without zero decodes to a small positive value. Those zeros re-quantize to the same
    codes and scales as the exported values (they had fallen back to plain quantization
    for the whole block, moving codes wherever its absmax sat on the second-highest level)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(Q.QUANT_BLOCK * 200, generator=gen) ** 2
    x[torch.rand(x.shape, generator=gen) < 0.05] = 0.0  # padding: never a grad
    codes, scales = Q.quantize(x, bits, False)
    exported = Q.dequantize(codes, scales, x.numel(), bits, False)
    back = Q.requantize(exported, bits, False)
    assert torch.equal(back[0], codes) and torch.equal(back[1].view(torch.int16), scales.view(torch.int16))
    refilled = torch.where(x == 0, 0.0, exported)
    assert (exported[x == 0] > 0).all()
    again = Q.requantize(refilled, bits, False)
    assert torch.equal(again[0], codes) and torch.equal(again[1].view(torch.int16), scales.view(torch.int16))
    # zeros beside values that no codes decode to: those blocks are quantized as usual
    genuine = refilled * 1.001
    for a, b in zip(Q.requantize(genuine, bits, False), Q.quantize(genuine, bits, False)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("bits", [8, 4])
def test_full_precision_round_trip_gives_back_the_codes(bits, device):
    """Moments exported at full precision (``torch_state_dict()``; DTensor shards whose
    blocks depend on the sharding) and loaded back: the same codes and scales, so a resumed
    run continues bit for bit. Plain re-quantization of the decoded values does not give
    them back for 8-bit second moments (a block whose absmax took the second-highest code
    decodes below its scale and would get a smaller one): ``quantize.requantize`` does;
    values that no codes decode to are quantized as usual."""
    params = interop_params(device, seed=43)
    opt = PAIRS["AdamW"][0](params, lr=1e-2, amsgrad=True, state_dtype=f"{bits}bit", **LAUNCH)
    gen = torch.Generator().manual_seed(44)
    train(opt, params, gen, 3)
    moved = 0
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            codes, scales = (t.cpu() for t in quantized(opt, p, key, bits))
            decoded = Q.dequantize(codes, scales, p.numel(), bits, SIGNED[key])
            again = Q.requantize(decoded, bits, SIGNED[key])
            assert torch.equal(again[0], codes) and torch.equal(again[1].view(torch.int16), scales.view(torch.int16))
            plain = Q.quantize(decoded, bits, SIGNED[key])
            moved += int((plain[1].float() != scales.float()).sum())
            genuine = decoded * 1.001  # no codes decode to these
            for a, b in zip(Q.requantize(genuine, bits, SIGNED[key]), Q.quantize(genuine, bits, SIGNED[key])):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert (moved > 0) == (bits == 8), moved
    again_params = clones(params)
    again = PAIRS["AdamW"][0](again_params, lr=1e-2, amsgrad=True, state_dtype=f"{bits}bit", **LAUNCH)
    again.load_state_dict(copy.deepcopy(opt.torch_state_dict()))
    assert_same_snapshot(snapshot(opt, params), snapshot(again, again_params), "loaded")
    lockstep(opt, params, again, again_params, gen, 2)
    assert_same_snapshot(snapshot(opt, params), snapshot(again, again_params), "continued")


def _break(saved: dict, how: str, bits: int) -> None:
    state = saved["state"][0]
    if how == "short codes":
        state[f"exp_avg_{bits}bit"] = state[f"exp_avg_{bits}bit"].reshape(-1)[:-1]
    elif how == "missing scales":
        del state["exp_avg_sq_scales"]
    elif how == "scales count":
        state["exp_avg_scales"] = torch.cat([state["exp_avg_scales"].reshape(-1)] * 2)
    elif how == "float codes":
        state[f"exp_avg_{bits}bit"] = state[f"exp_avg_{bits}bit"].float()
    elif how == "other bit width":
        state[f"exp_avg_{12 - bits}bit"] = state.pop(f"exp_avg_{bits}bit")
    elif how == "codes without moment":
        del state[f"exp_avg_{bits}bit"], state["exp_avg_scales"]
    elif how == "negative scales":
        state["exp_avg_sq_scales"] = -state["exp_avg_sq_scales"]
    # The transposed param (3) exports a code and a scale per element.
    elif how == "element scales reshaped":
        saved["state"][3]["exp_avg_scales"] = saved["state"][3]["exp_avg_scales"].reshape(-1)
    elif how == "element codes of 8 bits under the 4-bit key":
        saved["state"][3]["exp_avg_4bit"] = saved["state"][3].pop("exp_avg_8bit")


BREAKAGES = {
    "short codes": (r"'exp_avg_(8bit' of param 0 has 191|4bit' of param 0 has 95) elements "
                    r"where a param of shape \(3, 64\)"),
    "missing scales": "comes without 'exp_avg_sq_scales'",
    # 6 scales for 192 elements: neither one per block (3) nor one per element (192)
    "scales count": (r"'exp_avg_scales' of param 0 has 6 elements where a param of shape \(3, 64\) needs 3"
                     r"|'exp_avg_(8|4)bit' of param 0 and 'exp_avg_scales' hold (192|96) codes and 6 scales: not one form"),
    "float codes": "expected uint8 codes",
    # 8-bit codes under the 4-bit key read as one 4-bit code per element, without their scales
    "other bit width": (r"'exp_avg_(4|8)bit' of param 0 has (192|96) elements"
                        r"|'exp_avg_(4|8)bit' of param 0 and 'exp_avg_scales' hold (192|96) codes and 3 scales: not one form"),
    "codes without moment": r"lacks \['exp_avg'\]",
    # read as they were, each scale's sign flipped every second moment below 0: NaN params
    "negative scales": r"'exp_avg_sq_scales' of param 0 holds negative scales",
    # a code per element and a scale per element shaped otherwise: broadcast, half-loaded
    "element scales reshaped": r"'exp_avg_(8|4)bit' of param 3 has shape \(5, 64\) and 'exp_avg_scales' shape \(320,\)",
    # per element, both widths take a byte: 8-bit codes read as 4-bit ones up to 256x too large
    "element codes of 8 bits under the 4-bit key": r"'exp_avg_4bit' of param 3 holds codes above 15",
}


@pytest.mark.parametrize("how,bits", [(how, bits) for how in BREAKAGES for bits in (8, 4)
                                      if bits == 8 or "of 8 bits" not in how])
def test_malformed_quantized_state_is_refused_and_changes_nothing(how, bits, device):
    """A quantized state dict with codes of the wrong size (or another bit width's), scales
    missing, of the wrong count, negative, or shaped unlike their codes, float codes, or no
    form of a moment: a ValueError naming the entry, before anything changes (params,
    state, whichever format the receiver keeps)."""
    params = interop_params(device, seed=61)
    source = PAIRS["AdamW"][0](params, lr=1e-2, state_dtype=f"{bits}bit", **LAUNCH)
    gen = torch.Generator().manual_seed(62)
    train(source, params, gen, 1)
    saved = copy.deepcopy(source.state_dict())
    _break(saved, how, bits)
    for state_dtype in (f"{bits}bit", None):
        target_params = clones(params)
        target = PAIRS["AdamW"][0](target_params, lr=1e-2, state_dtype=state_dtype, **LAUNCH)
        train(target, target_params, gen, 1)
        before = snapshot(target, target_params)
        with pytest.raises(ValueError, match=BREAKAGES[how]):
            target.load_state_dict(copy.deepcopy(saved))
        assert_same_snapshot(before, snapshot(target, target_params), how)
        train(target, target_params, gen, 1)  # and it still steps


@pytest.mark.parametrize("sizes", [(65, 66), (66, 65)])
def test_one_process_checkpoint_of_odd_4bit_codes_is_refused_by_a_param_of_another_size(sizes, device):
    """One process exports a 1-D param's 4-bit codes per element, so a checkpoint of n
    elements loaded into a param of n + 1 (or the reverse) is refused, as 8-bit codes are:
    flat codes (two per byte) and block scales of 65 and 66 elements count the same, and
    loaded silently with a stale or made-up last element."""
    gen = torch.Generator().manual_seed(70)
    src = nn.Parameter(torch.randn(sizes[0], generator=gen).to(device))
    opt = PAIRS["AdamW"][0]([src], lr=1e-2, state_dtype="4bit", **LAUNCH)
    train(opt, [src], gen, 1)
    saved = opt.state_dict()
    assert tuple(saved["state"][0]["exp_avg_4bit"].shape) == (sizes[0],)
    dst = [nn.Parameter(torch.randn(sizes[1], generator=gen).to(device))]
    target = PAIRS["AdamW"][0](dst, lr=1e-2, state_dtype="4bit", **LAUNCH)
    train(target, dst, gen, 1)
    before = snapshot(target, dst)
    with pytest.raises(ValueError, match=rf"'exp_avg_4bit' of param 0 has {sizes[0]} elements where a param of "
                                         rf"shape \({sizes[1]},\) needs 33 \(or one per element, {sizes[1]}\)"):
        target.load_state_dict(copy.deepcopy(saved))
    assert_same_snapshot(before, snapshot(target, dst), "refused")


@pytest.mark.parametrize("target", [None, "4bit"])
def test_a_0dim_params_quantized_state_moves_through_torchs_full_state_dict(target, device):
    """A 0-dim param (CLIP's logit_scale) exports its code and scale shaped (1,): torch's
    full state dicts take 0-dim tensors for scalars like ``step`` and fail to map them back
    (``KeyError: 'state.s.exp_avg_8bit'`` into another state format)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(71)
            self.w = nn.Parameter(torch.randn(3, 4, generator=gen).to(device))
            self.s = nn.Parameter(torch.tensor(2.0).to(device))

    gen = torch.Generator().manual_seed(72)
    src = Net()
    opt = PAIRS["AdamW"][0](src.parameters(), lr=1e-2, state_dtype="8bit", **LAUNCH)
    train(opt, list(src.parameters()), gen, 2)
    full = StateDictOptions(full_state_dict=True)
    saved = get_optimizer_state_dict(src, opt, options=full)
    assert tuple(saved["state"]["s"]["exp_avg_8bit"].shape) == (1,)
    dst = Net()
    other = PAIRS["AdamW"][0](dst.parameters(), lr=1e-2, state_dtype=target, **LAUNCH)
    set_optimizer_state_dict(dst, other, saved, options=full)
    want = opt.torch_state_dict()["state"][1]
    got = other.torch_state_dict()["state"][1]
    assert got["exp_avg"].shape == () and got["step"].item() == 2
    for key in ("exp_avg", "exp_avg_sq"):
        if target is None:  # fp32 moments: the decoded values themselves
            assert torch.equal(got[key].cpu(), want[key].cpu()), key
        else:
            torch.testing.assert_close(got[key].cpu(), want[key].cpu(), rtol=0.2, atol=0)


@pytest.mark.parametrize("state_dtype", ["8bit", None])
def test_entries_of_the_users_named_like_codes_or_scales_are_kept(state_dtype, device):
    """A per-param entry of the user's (a wrapper's buffer) under a key that merely ends like
    codes' or scales' (``ema_8bit``, ``ema_scales``) is saved, loaded and kept as torch.optim
    keeps it: it was taken for a moment's codes or scales (the optimizer's own checkpoint
    refused at load; state_dict() raised KeyError with 8-bit state), and one tensor shared by
    every param's state is no launch's business (it was refused as shared memory)."""
    params = interop_params(device, seed=95)
    opt = PAIRS["AdamW"][0](params, lr=1e-2, state_dtype=state_dtype, **LAUNCH)
    gen = torch.Generator().manual_seed(96)
    train(opt, params, gen, 1)
    extra = {"ema_scales": torch.randn(5, generator=gen), "ema_8bit": torch.randn(7, generator=gen),
             "exp_avg_16bit": torch.randn(3, generator=gen)}
    for p in params:
        opt.state[p].update({k: v.to(device) for k, v in extra.items()})
    train(opt, params, gen, 1)
    saved = copy.deepcopy(opt.state_dict())
    receiver = clones(params)
    other = PAIRS["AdamW"][0](receiver, lr=1e-2, state_dtype=state_dtype, **LAUNCH)
    other.load_state_dict(saved)
    for q in receiver:
        for k, v in extra.items():
            assert torch.equal(other.state[q][k].cpu(), v), k
    lockstep(opt, params, other, receiver, gen, 2)
    for p, q in zip(params, receiver):
        assert torch.equal(p.detach(), q.detach())
    other.state_dict()


# ---- 4. memory per param -------------------------------------------------------------------

MEMORY = [  # (bits, options, bytes of state per param at most)
    (8, dict(master_weights="remainder"), 4.1),
    (8, dict(stochastic_rounding=True), 2.1),
    (4, dict(master_weights="remainder"), 3.1),
    (4, dict(stochastic_rounding=True), 1.1),
]


@pytest.mark.parametrize("bits,mode,limit", MEMORY, ids=["8bit-remainder", "8bit-sr", "4bit-remainder", "4bit-sr"])
def test_state_bytes_per_param(bits, mode, limit, device):
    """Bytes of the state tensors a bf16 model's optimizer holds (``opt.state``, step and
    seed excluded), per param: within the budget, and the bytes model's
    ``state_bytes_per_elem()`` exactly where every tensor is whole blocks; with partial
    blocks, each tensor's count is its codes (a 4-bit odd tensor's last byte half used)
    plus 2 bytes per started block, so it exceeds the model's by less than 2.5 bytes per
    moment per tensor."""
    model = variant("adamw", BF16, state_dtype=f"{bits}bit", **mode).state_bytes_per_elem()
    remainder = 2 if mode.get("master_weights") else 0
    assert model == pytest.approx(2 * (bits / 8 + 2 / QB) + remainder)
    for shapes in ([(4096,), (256, 64)], [(4096,), (64, 65), (1000,), (7,), ()]):
        params = [nn.Parameter(torch.randn(s).to(BF16).to(device)) for s in shapes]
        opt = PAIRS["AdamW"][0](params, state_dtype=f"{bits}bit", **mode, seed=1, **LAUNCH)
        _launch(opt, params, make_grads(params, torch.Generator().manual_seed(0)))
        held = {p: sum(t.numel() * t.element_size() for k, t in opt.state[p].items()
                       if k not in ("step", "rounding_seed")) for p in params}
        numel = sum(p.numel() for p in params)
        for p in params:
            n = p.numel()
            assert held[p] == 2 * (Q.code_bytes(n, bits) + 2 * Q.num_scales(n)) + remainder * n
            assert 0 <= held[p] - model * n < 2 * 2.5
        total = sum(held.values())
        assert total / numel <= limit
        if all(p.numel() % QB == 0 for p in params):
            assert total == model * numel


# ---- 5. composition ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_grad_scaler_skip_leaves_everything_untouched(bits, device):
    """fp16 params with an fp32 master under torch.amp.GradScaler: scaled grads are unscaled
    in the kernel (bit for bit the reference fed true grads); a step with an inf in one grad
    leaves params, masters, codes, scales and step counts bit for bit as they were, and the
    next step continues the reference."""
    params = odd_params(FP16, device, seed=71, shapes=[(3, 64), (65,), (7,)], layouts=False)
    opt = build("AdamW", params, bits, master=True, groups=False, lr=1e-2, weight_decay=0.1)
    refs = Refs(opt, "AdamW", bits)
    scaler = torch.amp.GradScaler(device.type, init_scale=256.0, growth_interval=1000)
    gen = torch.Generator().manual_seed(72)
    for step in range(5):
        grads = make_grads(params, gen)
        scale = scaler.get_scale()
        scaler.scale(torch.ones((), device=device))  # the scaler's scale lives from here
        for p, g in zip(params, grads):
            p.grad = g * scale  # a power of two: exact
        if step == 2:
            params[1].grad[3] = float("inf")
            before = snapshot(opt, params)
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert_same_snapshot(before, snapshot(opt, params), "skipped step")
            assert scaler.get_scale() == scale / 2
        else:
            refs.step(dict(zip(params, grads)))
    refs.check("GradScaler")
    assert all(opt.state[p]["step"].item() == 4 for p in params)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("how", ["clip_grad_norm_", "max_grad_norm"])
def test_fused_clipping_with_tensor_lr_and_maximize(how, bits, device):
    """Fused clipping (``clip_grad_norm_`` before the step, or ``max_grad_norm=``) with a
    tensor lr changed in place between steps and maximize: the norm is the grads' 2-norm
    computed by hand, and params and codes are bit for bit the reference fed the grads
    times torch's coefficient min(1, max_norm / (norm + 1e-6)), at the tensor's lr."""
    params = odd_params(BF16, device, seed=81, shapes=[(3, 64), (65,), ()], layouts=False)
    lr = torch.tensor(1e-2, device=device)
    max_norm = 3.0
    extra = {"max_grad_norm": max_norm} if how == "max_grad_norm" else {}
    opt = build("Adam", params, bits, master="remainder", maximize=True, groups=False, lr=lr,
                weight_decay=0.05, **extra)
    refs = Refs(opt, "Adam", bits)
    gen = torch.Generator().manual_seed(82)
    clipped = 0
    for step in range(5):
        lr.fill_(1e-2 / (step + 1))  # in place, as a capturable schedule does
        grads = make_grads(params, gen, scale=0.01 if step == 3 else 2.0)
        for p, g in zip(params, grads):
            p.grad = g
        if how == "clip_grad_norm_":
            norm = opt.clip_grad_norm_(max_norm)
            opt.step()
        else:
            opt.step()
            norm = opt.last_grad_norm
        by_hand = torch.cat([g.detach().cpu().double().reshape(-1) for g in grads]).norm()
        torch.testing.assert_close(norm.cpu().double(), by_hand, rtol=1e-6, atol=0)
        coefficient = torch.clamp(max_norm / (norm.cpu() + 1e-6), max=1.0)  # torch's formula, fp32
        clipped += bool(coefficient < 1)
        refs.step(dict(zip(params, grads)), coefficient=coefficient)
    assert 0 < clipped < 5
    refs.check(how)


@pytest.mark.parametrize("bits", [8, 4])
def test_params_without_grads_keep_their_state(bits, device):
    """``zero_grad()`` and params left without a grad on some steps: their params, codes,
    scales and step counts stay as they were while the others step, and they continue the
    reference when their grads come back."""
    params = odd_params(BF16, device, seed=91, shapes=[(3, 64), (65,), (7,), (4, 50)], layouts=False)
    opt = build("AdamW", params, bits, sr=True, groups=False, lr=1e-2)
    refs = Refs(opt, "AdamW", bits)
    gen = torch.Generator().manual_seed(92)
    for step in range(6):
        opt.zero_grad()
        active = params if step in (0, 5) else params[step % 2::2]
        grads = make_grads(active, gen)
        resting = [p for p in params if not any(p is q for q in active)]
        before = snapshot(opt, resting)
        _launch(opt, active, grads)
        assert_same_snapshot(before, snapshot(opt, resting), f"step {step}")
        refs.step(dict(zip(active, grads)))
    refs.check("inactive")
    assert [opt.state[p]["step"].item() for p in params] == [4, 4, 4, 4]


@pytest.mark.parametrize("eps", [1e-45, 1e-39, 0.0])
@pytest.mark.parametrize("bits", [8, 4])
def test_a_tiny_or_zero_eps_steps_zero_moments_as_torch_does(bits, eps, device):
    """Blocks whose grads are always 0 (moments 0, the denominator eps bc2 alone) beside
    live ones: with a subnormal eps bc2 they stay as they are (0 / eps bc2 = 0; on a GPU the
    update's approximate division would read the subnormal as 0 and give 0 / 0), with eps
    0 they turn NaN, as torch.optim.Adam's params do; live blocks step finitely."""
    n = 3 * QB
    torch_p = nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(3)))
    p = nn.Parameter(torch_p.detach().clone().to(device))
    opt = PAIRS["Adam"][0]([p], lr=1e-3, eps=eps, state_dtype=f"{bits}bit", **LAUNCH)
    torch_opt = torch.optim.Adam([torch_p], lr=1e-3, eps=eps)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        g = torch.cat([torch.zeros(2 * QB), torch.randn(QB, generator=gen)])
        p.grad, torch_p.grad = g.to(device), g.clone()
        opt.step()
        torch_opt.step()
    got, want = p.detach().cpu(), torch_p.detach()
    if eps > 0:
        assert torch.equal(got[:2 * QB], want[:2 * QB])  # unchanged in both
    else:
        assert got[:2 * QB].isnan().all() and want[:2 * QB].isnan().all()
    assert torch.isfinite(got[2 * QB:]).all()


@pytest.mark.parametrize("eps", [0.0, 1e-30])
@pytest.mark.parametrize("bits", [8, 4])
def test_subnormal_second_moments_step_with_a_tiny_or_zero_eps(bits, eps, device):
    """Grads of 1e-21 to 1e-18 (second moments fp32 subnormals, below 2**-126) and of 1
    with eps 0 or 1e-30: each element steps by about lr, as the reference's IEEE root gives.
    On a GPU the root of a subnormal read as 0 (sqrt.approx.ftz) stepped them to +-inf
    (eps 0) or by ~1e10 (kernels/adam.py: fast_sqrt)."""
    gen = torch.Generator().manual_seed(45)
    sizes = torch.tensor([1e-18, 1e-19, 1e-20, 3e-21, 1.0])
    params = odd_params(FP32, device, seed=46, shapes=[(len(sizes) * QB,), (QB + 5,)], layouts=False)
    opt = build("Adam", params, bits, groups=False, eps=eps, lr=1e-2)
    refs = Refs(opt, "Adam", bits, exact_codes=True)
    before = [p.detach().cpu().clone() for p in params]
    for _ in range(3):
        # magnitudes in [1, 2) x size: no square underflows to 0
        signs = torch.randint(0, 2, (len(sizes), QB), generator=gen) * 2 - 1
        grads = [(signs * (1 + torch.rand(len(sizes), QB, generator=gen)) * sizes[:, None]).reshape(-1).to(device),
                 ((1 + torch.rand(QB + 5, generator=gen)) * 3e-21).to(device)]
        _launch(opt, params, grads)
        refs.step(dict(zip(params, grads)))
    refs.check(f"subnormal second moments, eps {eps}")
    for p, p0 in zip(params, before):
        moved = (p.detach().cpu() - p0).abs()
        assert torch.isfinite(moved).all() and moved.max() < 0.1, moved.max()


@pytest.mark.parametrize("name", ["Adam", "Adamax"])
@pytest.mark.parametrize("bits", [8, 4])
def test_second_moment_never_decodes_to_zero(bits, name, device):
    """Blocks where most grads are exactly 0 (always, or after a first large step, so the
    second moment decays far below the block's largest): every element of a block with any
    nonzero grad decodes to a positive second moment (the positive map has no zero code;
    only an all-zero block, scale 0, decodes to 0; AdaMax's exp_inf is at least eps), so no
    update divides by ~eps."""
    n = 4 * QB
    p = nn.Parameter(torch.zeros(n, device=device))
    amsgrad = {"amsgrad": True} if name == "Adam" else {}
    opt = PAIRS[name][0]([p], lr=1e-3, state_dtype=f"{bits}bit", **amsgrad, **LAUNCH)
    gen = torch.Generator().manual_seed(5)
    live = torch.zeros(n, dtype=torch.bool)
    live[0:QB:7] = True  # block 0: a few live elements all along
    live[QB] = True  # block 1: one element, large at first, then 0 like the rest
    for step in range(12):
        g = torch.where(live, torch.randn(n, generator=gen), torch.zeros(n))
        if step == 0:
            g[QB + 1: 2 * QB] = 1e-3 * torch.randn(QB - 1, generator=gen)  # then zero for good
            g[QB] = 100.0
        elif step > 0:
            g[QB] = 0.0
        p.grad = g.to(device)
        opt.step()
        for key in ("exp_avg_sq", "max_exp_avg_sq") if name == "Adam" else ("exp_inf",):
            codes, scales = quantized(opt, p, key, bits)
            v = Q.dequantize(codes.cpu(), scales.cpu(), n, bits, False).reshape(-1, QB)
            assert (v[:2] > 0).all(), (step, key)
            if name == "Adamax":  # max(beta2 u, |g| + eps) >= eps: never 0 at all
                assert (v > 0).all(), (step, key)
            else:  # blocks that never had a grad: scale 0, exactly 0
                assert (v[2:] == 0).all() and (scales[2:].float() == 0).all(), (step, key)
        assert torch.isfinite(p).all()
        assert (p.detach()[2 * QB:] == 0).all()


def test_stochastic_rounding_repeats_from_the_seed(device):
    """Two runs from one seed (given, or torch.manual_seed's): the same codes, scales and
    params bit for bit; another seed: other codes (rounding draws differ)."""
    def run(bits, **seed):
        params = odd_params(BF16, device, seed=101, shapes=[(3, 64), (65,)], layouts=False)
        opt = PAIRS["AdamW"][0](params, lr=1e-2, stochastic_rounding=True, state_dtype=f"{bits}bit",
                                **seed, **LAUNCH)
        train(opt, params, torch.Generator().manual_seed(102), 2)
        return snapshot(opt, params)

    for bits in (8, 4):
        first = run(bits, seed=7)
        assert_same_snapshot(first, run(bits, seed=7), "same seed")
        torch.manual_seed(7)  # the default seed is torch's initial seed
        assert_same_snapshot(first, run(bits), "torch.manual_seed")
        other = run(bits, seed=8)
        for key in (f"exp_avg_{bits}bit", f"exp_avg_sq_{bits}bit"):
            assert not torch.equal(first[0][1][key], other[0][1][key]), key


# ---- 6. construction errors ----------------------------------------------------------------


@pytest.mark.parametrize("kw,dtype,error,match", [
    (dict(state_dtype="8bit"), torch.float64, ValueError,
     "state_dtype=8bit is for float32/16 and bfloat16 params, got torch.float64"),
    (dict(state_dtype="4bit"), torch.complex64, ValueError, "state_dtype=4bit is for float32/16 and bfloat16"),
    (dict(state_dtype="8bit", block_size=256), FP32, ValueError, "use a block_size that is a multiple of 512"),
    (dict(state_dtype="4bit", block_size=1024, num_warps=4, differentiable=True), FP32, RuntimeError,
     "differentiable=True steps with torch.optim's implementation, which has no master_weights, state_dtype"),
    (dict(state_dtype="2bit"), FP32, ValueError, "Invalid state_dtype: '2bit' .*'8bit' / '4bit'"),
    (dict(state_dtype="8-bit"), FP32, ValueError, "Invalid state_dtype: '8-bit'"),
    (dict(state_dtype=torch.int8), FP32, ValueError, "Invalid state_dtype: torch.int8"),
    (dict(state_dtype=8), FP32, ValueError, "Invalid state_dtype: 8 "),
], ids=["fp64", "complex", "block_size", "differentiable", "2bit", "8-bit", "int8", "int"])
@pytest.mark.parametrize("name", ["AdamW", "Adamax"])
def test_construction_errors(name, kw, dtype, error, match, device):
    """Options or params quantized state cannot serve: a clear error at construction (and,
    for a param, from add_param_group or a step after a param was slipped into a group by
    hand), leaving the params, groups and state as they were."""
    bad = nn.Parameter(torch.randn(3, 64).to(dtype).to(device))
    before = bad.detach().clone()
    with pytest.raises(error, match=match):
        PAIRS[name][0]([bad], **kw)
    assert torch.equal(bad.detach(), before)
    if dtype == FP32:
        return
    # The same param offered to a working optimizer: refused, nothing changes.
    good = odd_params(FP32, device, seed=5, shapes=[(3, 64)], layouts=False)
    opt = PAIRS[name][0](good, **kw, **LAUNCH)
    train(opt, good, torch.Generator().manual_seed(1), 1)
    snap = snapshot(opt, good)
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1 and bad not in opt.state
    opt.param_groups[0]["params"].append(bad)  # by hand
    bad.grad = torch.ones_like(bad)
    for p, g in zip(good, make_grads(good, torch.Generator().manual_seed(2))):
        p.grad = g
    with pytest.raises(error, match=match):
        opt.step()
    assert_same_snapshot(snap, snapshot(opt, good), "refused step")
    assert torch.equal(bad.detach(), before) and bad not in opt.state


def test_differentiable_group_added_later_is_refused(device):
    """Refused when added (as at construction), and when switched on by hand, before the
    step changes anything."""
    params = odd_params(FP32, device, seed=5, shapes=[(3, 64), (5,)], layouts=False)
    opt = PAIRS["AdamW"][0](params[:1], state_dtype="8bit", **LAUNCH)
    with pytest.raises(RuntimeError, match="differentiable=True"):
        opt.add_param_group({"params": params[1:], "differentiable": True})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[1:]})
    opt.param_groups[1]["differentiable"] = True
    for p, g in zip(params, make_grads(params, torch.Generator().manual_seed(1))):
        p.grad = g
    with pytest.raises(RuntimeError, match="differentiable=True"):
        opt.step()
    assert not opt.state


# ---- CUDA graphs (GPU only) -----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
@pytest.mark.parametrize("bits", [8, 4])
def test_captured_step_replays_like_eager(bits):
    """capturable=True with a device lr, bf16 params with the remainder master and stochastic
    rounding of params and codes: a captured step replayed 4 times (lr changed in place
    between replays) equals eager steps bit for bit, params, codes, scales and remainders
    (random draws advance on the device with the step count)."""
    shapes = [(3, 64), (65,), (), (4097,), (0,)]

    def make():
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=gen).to(BF16).cuda()) for s in shapes]
        lr = torch.tensor(1e-2, device="cuda")
        opt = PAIRS["AdamW"][0](params, lr=lr, capturable=True, amsgrad=True, master_weights="remainder",
                                stochastic_rounding=True, state_dtype=f"{bits}bit", seed=3, weight_decay=0.1,
                                **LAUNCH)  # a fixed config: no tuning (and no tuning cache) here
        return params, lr, opt

    def grads(step):
        gen = torch.Generator().manual_seed(100 + step)
        return [torch.randn(s, generator=gen).to(BF16).cuda() for s in shapes]

    params, lr, opt = make()
    eager_params, eager_lr, eager = make()
    for p in params:
        p.grad = torch.zeros_like(p)  # static grads: the capture records their addresses
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):  # warm-up: state, tables, autotuning
            for p, q, g in zip(params, eager_params, grads(step)):
                p.grad.copy_(g)
                q.grad = g.clone()
            opt.step()
            eager.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    before = snapshot(opt, params)
    with torch.cuda.graph(graph):
        opt.step()
    assert_same_snapshot(before, snapshot(opt, params), "capture ran the step")
    for i in range(4):
        for p, q, g in zip(params, eager_params, grads(3 + i)):
            p.grad.copy_(g)
            q.grad = g.clone()
        lr.fill_(1e-2 / (i + 2))
        eager_lr.fill_(1e-2 / (i + 2))
        graph.replay()
        eager.step()
        torch.cuda.synchronize()
        assert_same_snapshot(snapshot(eager, eager_params), snapshot(opt, params), f"replay {i}")
    assert all(opt.state[p]["step"].item() == 7 for p in params)
