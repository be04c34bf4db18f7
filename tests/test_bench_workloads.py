"""The bench's arithmetic: byte formulas, shape profiles against published parameter counts,
size parsing, the float64 reference and the correctness comparison. CPU only, fast."""
import math

import pytest
import torch

from tritonadam.bench import check, workloads
from tritonadam.bench.providers import (PROVIDERS, HyperParams, built_traffic, observed_layout,
                                        state_bytes, tritonadam_held, tritonadam_modes,
                                        tritonadam_traffic, tritonadam_variant)
from tritonadam.bench.timing import quantile
from tritonadam.bench.workloads import (DTYPE_BYTES, PROFILES, QUANT_STATES, SETUPS, Layout,
                                        format_count, make_workload, parse_count,
                                        parse_workloads, traffic)

DENSE = [s for s in SETUPS if SETUPS[s].state not in QUANT_STATES]


def bytes_per_param(setup, algo="adamw", amsgrad=False):
    """tritonadam's bytes per param in ``setup``: the library's bytes model."""
    return tritonadam_traffic(SETUPS[setup], algo, amsgrad).bytes_per_param


# ------------------------------------------------------------------------- byte formulas

@pytest.mark.parametrize("setup,expected", [("fp32", 28), ("bf16", 22), ("fp16", 22),
                                            ("bf16-master", 28), ("bf16-remainder", 26),
                                            ("bf16-sr", 22), ("bf16-bf16state", 14),
                                            ("bf16-sr-bf16state", 14)])
def test_bytes_per_param_match_design(setup, expected):
    # README's precision modes table; AdaMax moves the same bytes as Adam;
    # Adam == AdamW.
    assert bytes_per_param(setup) == expected
    assert bytes_per_param(setup, "adam") == expected
    assert bytes_per_param(setup, "adamax") == expected
    # amsgrad reads and writes max_exp_avg_sq in the state dtype: +8 B in fp32, +4 in bf16
    assert bytes_per_param(setup, amsgrad=True) == expected + 2 * DTYPE_BYTES[SETUPS[setup].state]


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("algo,amsgrad", [("adamw", False), ("adam", True), ("adamax", False)])
def test_one_bytes_model_for_tritonadam(setup, algo, amsgrad):
    """tritonadam's rows take their bytes from the library (tritonadam.state.variant with the
    options the bench constructs the optimizer with); workloads.traffic, the formula of the
    other providers' rows, agrees with it item for item wherever both apply (dense state),
    and refuses tritonadam's quantized formats rather than guess their bytes."""
    from tritonadam.state import variant

    s = SETUPS[setup]
    ours = tritonadam_traffic(s, algo, amsgrad)
    assert ours.items == variant(algo, workloads.torch_dtype(s.param), workloads.torch_dtype(s.grad),
                                 amsgrad=amsgrad, **tritonadam_modes(s)).traffic()
    if s.state in QUANT_STATES:
        with pytest.raises(ValueError, match="tritonadam.state.variant"):
            traffic(s.layout, algo, amsgrad)
    else:
        assert traffic(s.layout, algo, amsgrad).items == ours.items
    # and the row of a built optimizer says the same (plus the passes around the step)
    from tritonadam.bench.runner import make_tensors

    w = make_workload("one-huge", 64)
    built = PROVIDERS["tritonadam"].build(make_tensors(w, s, torch.device("cpu"), 0), s, algo,
                                          HyperParams(amsgrad=amsgrad))
    assert built_traffic(built, algo, amsgrad) == ours


@pytest.mark.parametrize("setup,expected", [("fp32", 16), ("bf16", 12), ("fp16", 12),
                                            ("bf16-master", 16), ("bf16-remainder", 14),
                                            ("bf16-sr", 12), ("bf16-bf16state", 8),
                                            ("bf16-sr-bf16state", 8)])
def test_resident_bytes_match_readme(setup, expected):
    # param + grad + state per param, as README's precision-mode table states them
    assert tritonadam_held(SETUPS[setup]) == expected
    extra = DTYPE_BYTES[SETUPS[setup].state]
    assert tritonadam_held(SETUPS[setup], amsgrad=True) == expected + extra


@pytest.mark.parametrize("setup", list(SETUPS))
def test_state_memory_column_is_what_tritonadam_holds(setup):
    # the optimizer's real state bytes (the "state MiB" column, counted from the tensors it
    # allocated) are the library's state bytes per param, plus a step count (and a rounding
    # seed) per tensor; quantized moments are codes and a bf16 scale per 64 elements, which
    # the per-param figure counts exactly for whole blocks (100 here) and the tensors hold
    # for a partial last block too
    from tritonadam import quantize
    from tritonadam.bench.runner import make_tensors

    s = SETUPS[setup]
    for n in (6400, 5000):
        w = make_workload("one-huge", n)
        built = PROVIDERS["tritonadam"].build(make_tensors(w, s, torch.device("cpu"), 0), s, "adamw",
                                              HyperParams())
        built.step()
        fixed = 4 + (8 if s.stochastic else 0)
        master = 2 if s.remainder else 4 if s.master else 0
        bits = QUANT_STATES.get(s.state)
        moments = 2 * (quantize.state_bytes(n, bits) if bits else n * DTYPE_BYTES[s.state])
        assert state_bytes(built) == moments + n * master + fixed
        if n % quantize.QUANT_BLOCK == 0:
            assert state_bytes(built) == n * tritonadam_variant(s).state_bytes_per_elem() + fixed


# tritonadam's quantized setups by hand: (traffic, held) per param; a moment is 1 (8-bit) or
# 0.5 (4-bit) byte of codes + a 2-byte bf16 scale per 64 elements, read and written
QUANTIZED_BY_HAND = {
    "bf16-8bit-remainder": (2 + 2 + 2 + 2 + 2 + 4 * (1 + 2 / 64), 2 + 2 + 2 + 2 * (1 + 2 / 64)),
    "bf16-8bit-sr": (2 + 2 + 2 + 4 * (1 + 2 / 64), 2 + 2 + 2 * (1 + 2 / 64)),
    "bf16-4bit-remainder": (2 + 2 + 2 + 2 + 2 + 4 * (0.5 + 2 / 64), 2 + 2 + 2 + 2 * (0.5 + 2 / 64)),
    "bf16-4bit-sr": (2 + 2 + 2 + 4 * (0.5 + 2 / 64), 2 + 2 + 2 * (0.5 + 2 / 64)),
    "fp32-8bit": (4 + 4 + 4 + 4 * (1 + 2 / 64), 4 + 4 + 2 * (1 + 2 / 64)),
    "fp32-4bit": (4 + 4 + 4 + 4 * (0.5 + 2 / 64), 4 + 4 + 2 * (0.5 + 2 / 64)),
}


def test_quantized_setups_by_hand():
    assert {s for s in SETUPS if SETUPS[s].state in QUANT_STATES} == set(QUANTIZED_BY_HAND)
    assert QUANTIZED_BY_HAND["bf16-8bit-remainder"][0] == 14.125  # the figure
    for name, (moved, held) in QUANTIZED_BY_HAND.items():
        assert bytes_per_param(name) == moved, name
        assert tritonadam_held(SETUPS[name]) == held, name
        assert bytes_per_param(name, "adamax") == moved
        per_moment = 2 * (QUANT_STATES[SETUPS[name].state] / 8 + 2 / 64)
        assert bytes_per_param(name, amsgrad=True) == moved + per_moment


def test_quantized_core_setups_and_dense_twins():
    assert {"bf16-8bit-remainder", "bf16-4bit-sr", "fp32-8bit"} <= set(workloads.core_setups())
    twins = {s: workloads.dense_twin(SETUPS[s]).name for s in QUANTIZED_BY_HAND}
    assert twins == {"bf16-8bit-remainder": "bf16-remainder", "bf16-8bit-sr": "bf16-sr",
                     "bf16-4bit-remainder": "bf16-remainder", "bf16-4bit-sr": "bf16-sr",
                     "fp32-8bit": "fp32", "fp32-4bit": "fp32"}
    assert workloads.dense_twin(SETUPS["bf16"]) is None


def test_bytes_by_hand():
    # Written out tensor by tensor, independently of traffic(): (read, written) bytes.
    fp32 = {"p": (4, 4), "g": (4, 0), "m": (4, 4), "v": (4, 4)}
    bf16 = {"p": (2, 2), "g": (2, 0), "m": (4, 4), "v": (4, 4)}
    master = {"master": (4, 4), "g": (2, 0), "m": (4, 4), "v": (4, 4), "p": (0, 2)}
    remainder = {"p": (2, 2), "remainder": (2, 2), "g": (2, 0), "m": (4, 4), "v": (4, 4)}
    bf16_state = {"p": (2, 2), "g": (2, 0), "m": (2, 2), "v": (2, 2)}
    for setup, table in (("fp32", fp32), ("bf16", bf16), ("fp16", bf16), ("bf16-master", master),
                         ("bf16-remainder", remainder), ("bf16-sr", bf16),
                         ("bf16-bf16state", bf16_state), ("bf16-sr-bf16state", bf16_state)):
        t = traffic(SETUPS[setup].layout)
        assert t.bytes_per_param == sum(r + w for r, w in table.values())
        assert t.read == sum(r for r, _ in table.values())
        assert t.written == sum(w for _, w in table.values())


def test_traffic_items_sum_and_describe():
    t = traffic(SETUPS["bf16-master"].layout)
    assert t.bytes_per_param == sum(r + w for _, r, w in t.items)
    assert t.describe().endswith("= 28 B")
    assert "param w2" in t.describe()


def test_substitute_layouts():
    # torch's bf16 setup keeps bf16 state: p 2+2, g 2, m 2+2, v 2+2
    assert traffic(Layout(param="bf16", grad="bf16", state="bf16")).bytes_per_param == 14
    # torch master-weight emulation: 28 B fp32 step + bf16->fp32 grad copy + fp32->bf16 copy
    b = DTYPE_BYTES
    lay = Layout(param="fp32", grad="fp32", state="fp32",
                 extra=(("grad copy", b["bf16"], b["fp32"]), ("param copy", b["fp32"], b["bf16"])))
    assert traffic(lay).bytes_per_param == 28 + 6 + 6


def test_traffic_rejects_bad_input():
    with pytest.raises(ValueError):
        traffic(SETUPS["fp32"].layout, "sgd")
    with pytest.raises(ValueError):
        traffic(SETUPS["fp32"].layout, "adamax", amsgrad=True)


def test_workload_bytes_per_step():
    w = make_workload("one-huge", 10_000_000)
    assert w.bytes_per_step(SETUPS["bf16"].layout) == 10_000_000 * 22


# ---------------------------------------------------------------------------- profiles

@pytest.mark.parametrize("name,published,tensors", [
    ("gpt2-124m", 124_439_808, 148),          # HF gpt2: 12 layers x 12 tensors + wte, wpe, ln_f x2
    ("tinyllama-1.1b", 1_100_048_384, 201),   # 22 layers x 9 + embeddings, norm, output
    ("llama2-7b", 6_738_415_616, 291),        # 32 layers x 9 + embeddings, norm, output
])
def test_profiles_match_published_counts(name, published, tensors):
    w = make_workload(name)
    assert PROFILES[name].published == published
    assert w.params == published
    assert w.tensors == tensors


def test_llama2_7b_published_dimensions():
    shapes = dict(make_workload("llama2-7b").shapes)
    assert shapes["tok_embeddings.weight"] == (32000, 4096)
    assert shapes["output.weight"] == (32000, 4096)          # untied
    assert shapes["layers.31.feed_forward.w1.weight"] == (11008, 4096)
    assert shapes["layers.0.attention_norm.weight"] == (4096,)
    assert "layers.32.attention.wq.weight" not in shapes


def test_gpt2_tied_and_shapes():
    shapes = dict(make_workload("gpt2-124m").shapes)
    assert shapes["wte"] == (50257, 768) and shapes["wpe"] == (1024, 768)
    assert shapes["h.11.attn.c_attn.weight"] == (768, 2304)
    assert not any("lm_head" in n for n in shapes)  # tied to wte


def test_llama_layers_profile():
    assert workloads.LLAMA2_7B_LAYER_PARAMS == 202_383_360
    # the whole 7B model is 32 of these layers plus embeddings, output and the final norm
    assert 32 * workloads.LLAMA2_7B_LAYER_PARAMS + 2 * 32000 * 4096 + 4096 == 6_738_415_616
    assert make_workload("llama-layers", 400_000_000).params == 2 * 202_383_360
    assert make_workload("llama-layers", 1).params == 202_383_360  # at least one layer
    assert make_workload("llama-layers", 400_000_000).tensors == 18


def test_many_small_and_one_huge():
    w = make_workload("many-small")  # the 10,000 x 4,096
    assert w.tensors == 10_000 and w.params == 40_960_000
    assert set(s for _, s in w.shapes) == {(4096,)}
    assert PROFILES["many-small"].default_sizes == (40_960_000,)
    assert make_workload("one-huge", 1_000_000_000).shapes == (("w", (1_000_000_000,)),)
    assert PROFILES["one-huge"].default_sizes == (10_000_000, 100_000_000, 1_000_000_000)


def test_check_small_has_edge_cases():
    shapes = [s for _, s in make_workload("check-small").shapes]
    assert () in shapes and (0,) in shapes and (1,) in shapes and (4097,) in shapes


@pytest.mark.parametrize("text,n", [("4096", 4096), ("10M", 10_000_000), ("1.5B", 1_500_000_000),
                                    ("1_000", 1000), ("64k", 64_000), ("1G", 10**9)])
def test_parse_count(text, n):
    assert parse_count(text) == n


@pytest.mark.parametrize("text", ["", "abc", "1.5", "-3", "0", "10X", "1.2345K"])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError):
        parse_count(text)


@pytest.mark.parametrize("n", [1, 4096, 4097, 1000, 10_000_000, 40_960_000, 202_383_360,
                               404_766_720, 10**9, 1_100_048_384])
def test_format_count_round_trips(n):
    assert parse_count(format_count(n)) == n


def test_format_count_is_short():
    assert format_count(10**9) == "1B"
    assert format_count(40_960_000) == "40.96M"
    assert format_count(404_766_720) == "404766720"


def test_parse_workloads():
    ws = parse_workloads(["gpt2-124m", "one-huge@1M", "many-small"], None, cpu=True)
    assert [w.name for w in ws] == ["gpt2-124m", "one-huge@1M", "many-small@1M"]
    ws = parse_workloads(["one-huge"], [10, 20], cpu=False)
    assert [w.params for w in ws] == [10, 20]
    assert [w.name for w in parse_workloads(["one-huge"], None, cpu=False)] == [
        "one-huge@10M", "one-huge@100M", "one-huge@1B"]
    with pytest.raises(ValueError, match="fixed shapes"):
        parse_workloads(["gpt2-124m@1M"], None, cpu=True)
    with pytest.raises(ValueError, match="unknown profile"):
        parse_workloads(["gpt3"], None, cpu=True)


# ------------------------------------------------------------------- reference and check

def _torch_steps(algo, hp, p0, g, steps, dtype=torch.float64):
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax}[algo]
    p = p0.clone().to(dtype).requires_grad_(True)
    p.grad = g.clone().to(dtype)
    kw = dict(lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay, foreach=False)
    if algo != "adamax":
        kw["amsgrad"] = hp.amsgrad
    opt = cls([p], **kw)
    for _ in range(steps):
        opt.step()
    return p.detach()


@pytest.mark.parametrize("algo,amsgrad", [("adam", False), ("adamw", False), ("adamw", True),
                                          ("adam", True), ("adamax", False)])
def test_reference_matches_torch_float64(algo, amsgrad):
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(2000, generator=gen, dtype=torch.float64)
    g = torch.randn(2000, generator=gen, dtype=torch.float64)
    hp = HyperParams(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    ref = check.reference(p0, g, 4, algo, hp, "fp64", "fp64", None)
    torch.testing.assert_close(ref, _torch_steps(algo, hp, p0, g, 4), rtol=1e-12, atol=1e-14)


def test_reference_matches_torch_fused_bf16_state():
    # torch's fused AdamW on bf16 params keeps bf16 state and rounds after use, as modelled
    gen = torch.Generator().manual_seed(2)
    p0 = (torch.randn(5000, generator=gen) * 0.02).to(torch.bfloat16)
    g = torch.randn(5000, generator=gen).to(torch.bfloat16)
    hp = HyperParams()
    p = p0.clone().requires_grad_(True)
    p.grad = g.clone()
    opt = torch.optim.AdamW([p], lr=hp.lr, betas=hp.betas, eps=hp.eps,
                            weight_decay=hp.weight_decay, fused=True)
    for _ in range(3):
        opt.step()
    ref = check.reference(p0.double(), g.double(), 3, "adamw", hp, "bf16", "bf16", None)
    res = check.compare(p.detach().double(), ref, 3, "bf16", hp.lr)
    assert res.ok, res.detail


def test_compare_catches_skipped_and_doubled_updates():
    gen = torch.Generator().manual_seed(3)
    hp = HyperParams()
    for dt in ("fp32", "bf16"):
        p0 = (torch.randn(4096, generator=gen) * 0.02).to(workloads.torch_dtype(dt)).double()
        g = torch.randn(4096, generator=gen).to(workloads.torch_dtype(dt)).double()
        ref2 = check.reference(p0, g, 2, "adamw", hp, dt, "fp32", None)
        assert check.compare(ref2, ref2, 2, dt, hp.lr).ok
        ref1 = check.reference(p0, g, 1, "adamw", hp, dt, "fp32", None)
        ref4 = check.reference(p0, g, 4, "adamw", hp, dt, "fp32", None)
        assert not check.compare(ref1, ref2, 2, dt, hp.lr).ok      # one update missing
        assert not check.compare(ref4, ref2, 2, dt, hp.lr).ok      # applied twice
        nan = ref2.clone()
        nan[5] = math.nan
        assert not check.compare(nan, ref2, 2, dt, hp.lr).ok


def _bf16_neighbours(x: torch.Tensor):
    """The bf16 values either side of float64 ``x``: (toward zero, away from zero), and
    where ``x`` lies between them (0: on the first)."""
    bits = x.to(torch.float32).view(torch.int32)
    low = (bits & ~0xFFFF).view(torch.float32).double()
    high = (bits + 0x10000 & ~0xFFFF).view(torch.float32).double()
    return low, high, ((x - low) / (high - low)).abs()


def test_stochastic_rounding_check():
    """Rounding to either neighbour with probability by distance passes; a rounding stuck
    one way, or rounding to nearest, fails, though both are within the tolerance."""
    gen = torch.Generator().manual_seed(5)
    hp = HyperParams()
    p0 = (torch.randn(20000, generator=gen) * 0.02).to(torch.bfloat16).double()
    g = torch.randn(20000, generator=gen).to(torch.bfloat16).double()
    exact = check.reference(p0, g, 1, "adamw", hp, "fp64", "fp32", None)
    nearest = check.reference(p0, g, 1, "adamw", hp, "bf16", "fp32", None)
    toward_zero, away, frac = _bf16_neighbours(exact)
    moves = check.off_nearest_chance(exact, "bf16")
    torch.testing.assert_close(moves, torch.minimum(frac, 1 - frac), rtol=0, atol=1e-9)
    stochastic = torch.where(torch.rand(20000, generator=gen, dtype=torch.float64) < frac, away,
                             toward_zero)
    res = check.compare(stochastic, nearest, 1, "bf16", hp.lr, moves)
    assert res.ok and "off nearest" in res.note, res.detail
    for stuck in (toward_zero, away, nearest):
        assert check.compare(stuck, nearest, 1, "bf16", hp.lr).ok  # the tolerance alone passes
        res = check.compare(stuck, nearest, 1, "bf16", hp.lr, moves)
        assert not res.ok and "stochastic rounding" in res.detail


def test_stochastic_rounding_check_with_updates_far_below_an_ulp():
    """Where the first step should move too few elements to tell, rounding that moves none
    is not judged on it (only on its bias)."""
    gen = torch.Generator().manual_seed(6)
    hp = HyperParams(lr=1e-9)
    p0 = (torch.randn(20000, generator=gen) * 0.02).to(torch.bfloat16).double()
    g = torch.randn(20000, generator=gen).to(torch.bfloat16).double()
    exact = check.reference(p0, g, 1, "adamw", hp, "fp64", "fp32", None)
    nearest = check.reference(p0, g, 1, "adamw", hp, "bf16", "fp32", None)
    moves = check.off_nearest_chance(exact, "bf16")
    assert float(moves.sum()) < check.SR_MIN_MOVES
    assert check.compare(nearest, nearest, 1, "bf16", hp.lr, moves).ok


def test_differing_elements_compares_bits():
    a = torch.tensor([1.0, 0.0, float("nan"), 3.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0, -0.0, float("nan"), 3.015625], dtype=torch.bfloat16)
    assert check.differing_elements([a, torch.tensor(2.0)], [a.clone(), torch.tensor(2.0)]) == 0
    assert check.differing_elements([a], [b]) == 2  # -0.0 and the next bf16 after 3


def test_remainder_check_catches_different_bits(monkeypatch):
    """tritonadam's remainder setup is checked bit for bit against master_weights=True; a
    twin that steps differently fails the check."""
    from dataclasses import replace

    from tritonadam.bench.runner import Options, Runner

    opts = Options(device=torch.device("cpu"), providers=["tritonadam"], setups=["bf16-remainder"],
                   workloads=[], check_workload=make_workload("check-small"))
    runner = Runner(opts)
    runner.run_checks()
    assert runner.checks[0]["ok"] and "bit for bit as master_weights=True" in runner.checks[0]["result"]
    plain = replace(SETUPS["bf16-remainder"], name="bf16 without a master", master=None, remainder=False)
    monkeypatch.setattr(PROVIDERS["tritonadam"], "exact_twin", lambda setup: plain)
    runner = Runner(opts)
    runner.run_checks()
    entry = runner.checks[0]
    assert entry["ok"] is False and "differ in their bits from bf16 without a master" in entry["detail"]


def test_stored_moment_is_the_codec_and_bounds_what_a_kernel_may_store():
    """The reference stores a quantized moment as tritonadam.quantize does (per tensor, in
    blocks from its element 0), and bounds what a kernel may store instead: nothing more
    than its codec's own result away from rounding thresholds, either code around the
    value when rounding stochastically, and any value within ``dev`` of the input."""
    from tritonadam import quantize as Q

    gen = torch.Generator().manual_seed(7)
    segs = [128, 64 * 3 + 10]  # two tensors, the second with a partial last block
    raw = torch.randn(sum(segs), generator=gen, dtype=torch.float64) * 1e-3
    for bits in (8, 4):
        for signed, x in ((True, raw), (False, raw * raw)):
            zero = torch.zeros_like(x)
            value, bound = check.stored_moment(x, zero, bits, signed, segs, False)
            codec = torch.cat([Q.dequantize(*Q.quantize(part, bits, signed), part.numel(), bits, signed)
                               for part in x.split(segs)]).double()
            assert torch.equal(value, codec)
            assert float((bound == 0).double().mean()) > 0.95  # ambiguous only near a threshold
            _, sr_bound = check.stored_moment(x, zero, bits, signed, segs, True)
            # either code around the value (but below the positive map's least code, only it)
            assert bool((sr_bound >= bound).all())
            assert bool(((sr_bound > 0) | (value > x)).all()) and float((sr_bound > 0).double().mean()) > 0.8
            for seed in range(5):  # every stochastic draw lands within the bound
                r = torch.randint(0, 65536, (x.numel(),), generator=torch.Generator().manual_seed(seed))
                drawn = torch.cat([Q.dequantize(*Q.quantize(part, bits, signed, random=rp),
                                                part.numel(), bits, signed)
                                   for part, rp in zip(x.split(segs), r.split(segs))]).double()
                assert bool(((drawn - value).abs() <= sr_bound * (1 + 1e-9)).all())
            dev = x.abs() * 0.3  # the value may be anywhere within dev: so may what is stored
            _, wide = check.stored_moment(x, dev, bits, signed, segs, False)
            for f in (0.7, 1.3):
                moved = torch.cat([Q.dequantize(*Q.quantize(part, bits, signed), part.numel(), bits, signed)
                                   for part in (x * f).split(segs)]).double()
                assert bool(((moved - value).abs() <= wide * (1 + 1e-9)).all())


@pytest.mark.parametrize("setup", ["fp32-8bit", "bf16-4bit-sr"])
def test_quantized_check_emulates_the_format(setup):
    """tritonadam's quantized state checked against a reference storing its moments in the
    same format passes (rounded to nearest: to float rounding); against another format or
    against fp32 moments it fails: the check sees the format, not only the update."""
    from dataclasses import replace

    from tritonadam.bench.runner import make_tensors

    s = SETUPS[setup]
    hp = HyperParams()
    params = make_tensors(make_workload("check-small"), s, torch.device("cpu"), 0)
    sample = check.choose_sample(params, block=64)
    assert all(len(idx) % 64 == 0 or idx[-1] == params[i].numel() - 1 for i, idx in sample.picks)
    built = PROVIDERS["tritonadam"].build(params, s, "adamw", hp)
    for _ in range(3):
        built.step()
    res = check.check_after_steps(sample, built.params, 3, "adamw", hp, s, built.layout)
    assert res.ok and f"{s.state} moments emulated" in res.note, res.detail
    if not s.stochastic:
        assert res.worst < 0.01  # the codec bit for bit: only float rounding is left
    other = "4bit" if s.state == "8bit" else "8bit"
    for state in (other, "fp32"):
        wrong = check.check_after_steps(sample, built.params, 3, "adamw", hp, s,
                                        replace(built.layout, state=state))
        assert not wrong.ok, state
    with pytest.raises(ValueError, match="whole blocks"):
        check.check_after_steps(check.choose_sample(params), built.params, 3, "adamw", hp, s,
                                built.layout)


@pytest.mark.parametrize("name", ["torch-fused", "torch-foreach", "torch-forloop", "torch-compile",
                                  "torch-fused-graph", "apex", "te"])
def test_providers_without_quantized_state_skip_it(name):
    """A row of torch (or apex, TE) in a quantized setup would repeat its row of the same
    setup with fp32 state: it is skipped, naming that setup."""
    args = (HyperParams(), make_workload("check-small"), torch.device("cuda"), {})
    for setup, twin in (("bf16-8bit-remainder", "bf16-remainder"), ("fp32-4bit", "fp32"),
                        ("bf16-4bit-sr", "bf16-sr")):
        why = PROVIDERS[name].unsupported(SETUPS[setup], "adamw", *args)
        assert why and f"has no {SETUPS[setup].state} state" in why and f"the {twin} setup" in why
    assert PROVIDERS[name].unsupported(SETUPS["fp32"], "adamw", *args) is None


def test_peers_run_the_quantized_setups_of_their_bits():
    args = (HyperParams(), make_workload("check-small"), torch.device("cuda"), {})
    runs = {name: {s for s in SETUPS if PROVIDERS[name].unsupported(SETUPS[s], "adamw", *args) is None}
            for name in ("torchao-8bit", "torchao-4bit", "bnb-8bit", "flashoptim")}
    eight = {"bf16-8bit-remainder", "bf16-8bit-sr", "fp32-8bit"}
    four = {"bf16-4bit-remainder", "bf16-4bit-sr", "fp32-4bit"}
    assert runs["torchao-8bit"] == runs["bnb-8bit"] == runs["flashoptim"] == {"bf16", "fp32"} | eight
    assert runs["torchao-4bit"] == {"bf16", "fp32"} | four
    assert "8-bit setups" in PROVIDERS["bnb-8bit"].unsupported(SETUPS["bf16-4bit-sr"], "adamw", *args)


def test_sample_covers_ends_and_empty_tensors():
    params = [torch.zeros(0), torch.arange(10.0), torch.arange(100_000.0), torch.tensor(3.0)]
    for p in params:
        p.grad = torch.ones_like(p)
    s = check.choose_sample(params, per_tensor=16)
    picked = dict(s.picks)
    assert 0 not in picked                                  # empty tensor skipped
    assert 99_999 in picked[2].tolist() and 0 in picked[2].tolist()
    assert s.p0.numel() == s.g.numel() == sum(len(i) for _, i in s.picks)


# ----------------------------------------------------------------------- torch providers

# torch's stand-in for each setup: bytes per param and what its label must say ("" for none)
TORCH_DOES = {
    "fp32": (28, ""),
    "bf16": (14, "bf16 state"),
    "bf16-master": (40, "torch has no master weights"),
    "bf16-remainder": (40, "torch has no master weights"),
    "bf16-sr": (14, "bf16 state: torch keeps Adam state in the param dtype, it cannot keep fp32 "
                    "state for bf16 params; rounded to nearest: torch has no stochastic rounding"),
    "bf16-bf16state": (14, ""),  # torch's own bf16 state: the same setup
    "bf16-sr-bf16state": (14, "rounded to nearest: torch has no stochastic rounding"),
}


@pytest.mark.parametrize("name", ["torch-fused", "torch-foreach", "torch-forloop"])
@pytest.mark.parametrize("setup", [s for s in DENSE if s != "fp16"])  # fp16 state overflows
def test_torch_providers_are_labelled_and_correct(name, setup):
    from tritonadam.bench.runner import make_tensors

    s = SETUPS[setup]
    w = make_workload("check-small")
    params = make_tensors(w, s, torch.device("cpu"), seed=0)
    sample = check.choose_sample(params)
    hp = HyperParams()
    built = PROVIDERS[name].build(params, s, "adamw", hp)
    for _ in range(2):
        built.step()
    observed_layout(built)
    res = check.check_after_steps(sample, built.params, 2, "adamw", hp, s, built.layout)
    assert res.ok, res.detail
    per, label = TORCH_DOES[setup]
    assert traffic(built.layout).bytes_per_param == per
    assert label in built.label and bool(label) == bool(built.label)
    assert not built.layout.stochastic and not built.layout.remainder
    if s.master:
        assert state_bytes(built) >= w.params * (4 + 4 + 8)  # master, its grads, m, v


@pytest.mark.parametrize("name,setup,why", [
    ("apex", "bf16-remainder", "2 bytes"), ("apex", "bf16-sr", "stochastic rounding"),
    ("te", "bf16-sr", "stochastic rounding"), ("te", "bf16-bf16state", "bf16 moments"),
    ("te", "bf16-sr-bf16state", "bf16 moments"),
])
def test_third_party_providers_skip_modes_they_lack(name, setup, why):
    args = (HyperParams(), make_workload("check-small"), torch.device("cuda"), {})
    assert why in PROVIDERS[name].unsupported(SETUPS[setup], "adamw", *args)
    # TransformerEngine keeps its fp32 master as a remainder itself
    assert PROVIDERS["te"].unsupported(SETUPS["bf16-remainder"], "adamw", *args) is None


@pytest.mark.parametrize("name", ["tritonadam", "torch-fused", "torch-foreach"])
@pytest.mark.parametrize("setup", ["fp32", "bf16", "bf16-master", "bf16-remainder"])
def test_clip_and_step(name, setup):
    """A clip + step case clips before every step, as each library's users do, returns the
    norm, and adds its passes over the grads: one read for tritonadam's norm, a read and a
    read + write for torch's clip_grad_norm_. Its result matches the clipped reference."""
    from tritonadam.bench.providers import with_clip
    from tritonadam.bench.runner import make_tensors

    s = SETUPS[setup]
    w = make_workload("check-small")
    params = make_tensors(w, s, torch.device("cpu"), seed=0)
    sample = check.choose_sample(params)
    norm = check.grad_norm(params)
    hp = HyperParams()
    prov = PROVIDERS[name]
    plain = traffic(prov.build(make_tensors(w, s, torch.device("cpu"), seed=0), s, "adamw", hp).layout)
    built = with_clip(prov, prov.build(params, s, "adamw", hp), s, 1.0)
    returned = [float(built.step()) for _ in range(2)]
    g = DTYPE_BYTES[s.grad]
    added = g if name == "tritonadam" else 3 * g
    assert traffic(built.layout).bytes_per_param == plain.bytes_per_param + added
    assert returned[0] == pytest.approx(norm, rel=1e-2)
    if name == "tritonadam":  # grads are never rewritten: the same norm every step
        assert returned[1] == returned[0]
        assert all(torch.equal(p.grad, p0.grad) for p, p0 in zip(
            params, make_tensors(w, s, torch.device("cpu"), seed=0)))
    else:  # torch's clip scaled them in place to the max norm
        assert returned[1] == pytest.approx(1.0, rel=1e-2)
    observed_layout(built)
    res = check.check_after_steps(sample, built.params, 2, "adamw", hp, s, built.layout,
                                  check.Clipped(1.0, norm, returned[0]))
    assert res.ok and "norm" in res.note, (res.detail, res.note)
    wrong = check.check_after_steps(sample, built.params, 2, "adamw", hp, s, built.layout,
                                    check.Clipped(1.0, norm, returned[0] * 1.05))
    assert not wrong.ok and "total grad norm" in wrong.detail


def test_reference_clip_matches_torch():
    """The clipped reference against torch's clip_grad_norm_ + AdamW in float64, with a max
    norm small enough that the coefficient changes the result through eps."""
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(3000, generator=gen, dtype=torch.float64)
    g = torch.randn(3000, generator=gen, dtype=torch.float64)
    hp = HyperParams(lr=1e-2)
    max_norm = 1e-8 * 3000 ** 0.5  # clipped grads of about eps
    p = p0.clone().requires_grad_(True)
    p.grad = g.clone()
    opt = torch.optim.AdamW([p], lr=hp.lr, betas=hp.betas, eps=hp.eps,
                            weight_decay=hp.weight_decay, foreach=False)
    torch.nn.utils.clip_grad_norm_([p], max_norm)
    opt.step()
    q = p0.clone()
    q.grad = g.clone()
    coef = check.clip_coef(max_norm, check.grad_norm([q]))
    ref = check.reference(p0, g, 1, "adamw", hp, "fp64", "fp64", None, coef)
    torch.testing.assert_close(ref, p.detach(), rtol=1e-12, atol=1e-14)
    unclipped = check.reference(p0, g, 1, "adamw", hp, "fp64", "fp64", None)
    assert not torch.allclose(unclipped, p.detach(), rtol=1e-3, atol=1e-3 * hp.lr)


def test_adamax_has_no_torch_fused():
    why = PROVIDERS["torch-fused"].unsupported(SETUPS["fp32"], "adamax", HyperParams(),
                                               make_workload("check-small"), torch.device("cpu"), {})
    assert why and "fused" in why


def test_quantile():
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    assert quantile([7.0], 0.8) == 7.0
    assert math.isnan(quantile([], 0.5))
