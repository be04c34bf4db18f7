"""State formats (tritonadam/state/): which tensors each param's state holds under each
option, conversions between formats, exports, and the bytes model the bench and the
autotuner share, counted against the tensors a step actually allocates."""
from __future__ import annotations

import pytest
import torch

from helpers import LAUNCH, PAIRS, make_params, random_grads
from tritonadam.kernels.variant import Master
from tritonadam.state import MASTER_KEY, REMAINDER_KEY, SEED_KEY, StatePolicy, moment_keys, variant

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

POLICIES = {
    "fp32": {},
    "master": dict(master_weights=True),
    "remainder": dict(master_weights="remainder"),
    "sr": dict(stochastic_rounding=True),
    "bf16-state": dict(state_dtype=BF16),
    "bf16-state+sr": dict(state_dtype=BF16, stochastic_rounding=True),
}


def _policy(options):
    return StatePolicy.checked(options.get("master_weights", False), options.get("state_dtype"),
                               options.get("stochastic_rounding", False), "AdamW")


@pytest.mark.parametrize("mode,dtype", [  # the remainder refuses fp16 (test_precision.py)
    pytest.param(mode, dtype, id=f"{mode}-{label}")
    for mode in POLICIES for dtype, label in ((FP32, "fp32"), (BF16, "bf16"), (FP16, "fp16"))
    if not (POLICIES[mode].get("master_weights") == "remainder" and dtype == FP16)])
def test_each_param_gets_the_format_its_options_and_dtype_call_for(mode, dtype):
    options = POLICIES[mode]
    fmt = _policy(options).format_for(dtype)
    low = dtype in (BF16, FP16)
    assert fmt.moments.dtype == options.get("state_dtype", FP32)
    expected_master = Master.NONE
    if low and options.get("master_weights"):
        expected_master = Master.REMAINDER if options["master_weights"] == "remainder" else Master.FP32
    assert fmt.master == expected_master
    rounded = (low and expected_master == Master.NONE) or options.get("state_dtype") == BF16
    assert fmt.stochastic == (options.get("stochastic_rounding", False) and rounded)
    assert _policy(options).format_for(FP64).moments.dtype == FP64  # fp64 keeps fp64 state


@pytest.mark.parametrize("mode", list(POLICIES))
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("algorithm,amsgrad", [("adamw", False), ("adam", True), ("adamax", False)])
def test_the_bytes_model_counts_what_a_step_allocates(mode, dtype, algorithm, amsgrad, device):
    """``variant(...).state_bytes_per_elem()`` is what the optimizer allocates per param
    (counted from its state tensors, step counts and seeds aside), and the bytes a step
    moves are the state's read and written plus the param and grad."""
    options = POLICIES[mode]
    if options.get("stochastic_rounding") and not (dtype == BF16 or options.get("state_dtype")):
        options = {}  # nothing would be rounded stochastically: the plain fp32 format
    cls = {"adamw": PAIRS["AdamW"][0], "adam": PAIRS["Adam"][0], "adamax": PAIRS["Adamax"][0]}[algorithm]
    params = make_params([(1000,), (24,)], dtype, device, seed=3)
    extra = {"amsgrad": True} if amsgrad else {}
    opt = cls(params, **options, **extra, **LAUNCH)
    for p, g in zip(params, random_grads(params, torch.Generator().manual_seed(4))):
        p.grad = g
    opt.step()
    numel = sum(p.numel() for p in params)
    kept = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
               if torch.is_tensor(v) and k not in ("step", SEED_KEY))
    v = variant(algorithm, dtype, amsgrad=amsgrad, **options)
    assert kept == v.state_bytes_per_elem() * numel
    state_io = sum(r + w for name, r, w in v.traffic() if name not in ("param", "grad"))
    p_bytes = dtype.itemsize
    param_io = p_bytes if v.key.master == Master.FP32 else 2 * p_bytes  # a master: the param is only written
    assert v.bytes_per_elem() == state_io + param_io + p_bytes  # + the grad, read


def test_formats_convert_into_each_other_through_load_state_dict(device):
    """A state saved under one option loads under every other: bf16 moments widen, fp32
    moments round, an fp32 master splits into the param's high half and a remainder
    (exactly), a remainder joins back, and the seed follows the stochastic rounding."""
    base = make_params([(300,), (7,)], BF16, device, seed=5)
    gen = torch.Generator().manual_seed(6)
    grads = [random_grads(base, gen) for _ in range(3)]
    states = {}
    for name, options in POLICIES.items():
        params = [torch.nn.Parameter(p.detach().clone()) for p in base]
        opt = PAIRS["AdamW"][0](params, seed=99, **options, **LAUNCH)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        states[name] = (params, opt)
    for src, (src_params, src_opt) in states.items():
        for dst, options in POLICIES.items():
            params = [torch.nn.Parameter(p.detach().clone()) for p in src_params]
            opt = PAIRS["AdamW"][0](params, **options, **LAUNCH)
            opt.load_state_dict(src_opt.state_dict())
            fmt = opt._policy.format_for(BF16)
            exported, loaded = src_opt.state_dict()["state"], opt.state_dict()["state"]
            for i, (p, q) in enumerate(zip(params, src_params)):
                state, before = opt.state[p], src_opt.state[q]
                assert set(state) == {"step", *moment_keys("adamw", False)} | (
                    {MASTER_KEY} if fmt.master == Master.FP32 else set()) | (
                    {REMAINDER_KEY} if fmt.master == Master.REMAINDER else set()) | (
                    {SEED_KEY} if fmt.stochastic else set())
                for key in ("exp_avg", "exp_avg_sq"):
                    assert state[key].dtype == fmt.moments.dtype
                    torch.testing.assert_close(state[key].float(), before[key].float(), rtol=2 ** -7, atol=0)
                if MASTER_KEY in exported[i] and fmt.master != Master.NONE:
                    # the master survives every master <-> master conversion bit for bit
                    assert torch.equal(loaded[i][MASTER_KEY], exported[i][MASTER_KEY])
            if fmt.stochastic and SEED_KEY in src_opt.state[src_params[0]]:
                assert opt.seed == 99


def test_a_remainder_written_as_int32_is_stepped_as_its_int16(device):
    """A process group's state dicts carry the remainder as int32 (collectives have no
    int16), and ZeroRedundancyOptimizer writes such an export straight into the state
    (without the fp32 master beside it here): the step converts it, bit for bit the same."""
    base = make_params([(300,), (5, 7)], BF16, device, seed=8)
    gen = torch.Generator().manual_seed(9)
    grads = [random_grads(base, gen) for _ in range(4)]
    runs = []
    for widen in (False, True):
        params = [torch.nn.Parameter(p.detach().clone()) for p in base]
        opt = PAIRS["AdamW"][0](params, master_weights="remainder", **LAUNCH)
        for i, gs in enumerate(grads):
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            if widen and i == 1:
                for p in params:
                    opt.state[p][REMAINDER_KEY] = opt.state[p][REMAINDER_KEY].to(torch.int32)
        assert all(opt.state[p][REMAINDER_KEY].dtype == torch.int16 for p in params)
        runs.append((params, [opt.state[p][REMAINDER_KEY] for p in params]))
    (pa, ra), (pb, rb) = runs
    for x, y in zip(pa + ra, pb + rb):
        assert torch.equal(x, y)


def test_a_state_the_param_outgrew_gets_an_error_that_says_what_to_do(device):
    params = make_params([(6,)], FP32, device)
    opt = PAIRS["AdamW"][0](params, **LAUNCH)
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    params[0].data = torch.randn(8, device=device)
    params[0].grad = torch.randn_like(params[0])
    with pytest.raises(RuntimeError, match=r"opt.state.pop\(param\)"):
        opt.step()


def test_variant_names_the_kernel_a_param_steps_with():
    v = variant("adamw", BF16, master_weights="remainder")
    assert v.key.master == Master.REMAINDER and v.key.state == "float32"
    assert v.bytes_per_elem() == 26 and v.state_bytes_per_elem() == 10
    assert v.autotune_key() == ("adam", "decoupled=1", "amsgrad=0", "master=remainder",
                                "p=bfloat16", "g=bfloat16", "s=float32")
    assert variant("adam", FP32).bytes_per_elem() == 28
    assert variant("adamax", BF16, state_dtype=BF16).bytes_per_elem() == 14
    assert variant("adam", BF16, FP32, amsgrad=True).bytes_per_elem() == 2 + 2 + 4 + 3 * 8
    with pytest.raises(ValueError, match="remainder"):
        variant("adamw", FP16, master_weights="remainder")
