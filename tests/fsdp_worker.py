"""Worker side of tests/test_fsdp.py: scenarios run in 2 gloo processes on CPU.

Not collected by pytest (no ``test_`` prefix). ``test_fsdp.py`` starts ``entry`` in two
processes; each scenario raises AssertionError on a mismatch, which the spawner reports
with the rank's traceback. Several checks share one scenario because starting processes
and importing torch costs seconds on a 2-core machine.

Every comparison is against ``torch.optim`` (``foreach=False``) stepping an identical,
identically wrapped model on the same data.
"""
from __future__ import annotations

import os

# Before tritonadam or triton is imported: kernels run in Triton's CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

import copy  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import tritonadam  # noqa: E402
from tritonadam.state.moments import read_moment  # noqa: E402
from fast_interpreter import patch_language_once_per_launch  # noqa: E402

patch_language_once_per_launch()

LAUNCH = {"block_size": 16384, "num_warps": 4}
TOL = {"atol": 1e-6, "rtol": 1e-5}
PAIRS = {
    "AdamW": (tritonadam.AdamW, torch.optim.AdamW),
    "Adam": (tritonadam.Adam, torch.optim.Adam),
    "Adamax": (tritonadam.Adamax, torch.optim.Adamax),
}
# Per class: kwargs for both implementations (AMSGrad for Adam, so max_exp_avg_sq is
# a sharded state too).
KWARGS = {
    "AdamW": {"betas": (0.9, 0.95)},
    "Adam": {"amsgrad": True},
    "Adamax": {},
}


def entry(rank: int, world: int, store: str, scenario: str, tmpdir: str) -> None:
    """torch.multiprocessing.spawn target. World 0: one process without a process group."""
    torch.set_num_threads(1)
    if world == 0:
        SCENARIOS[scenario](rank, world, tmpdir)
        return
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        SCENARIOS[scenario](rank, world, tmpdir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---- model, data, optimizers ------------------------------------------------------------

class Net(nn.Module):
    """Shards of every kind over 2 ranks: uneven (11 -> 6/5, 9 -> 5/4, 3 -> 2/1 rows)
    and empty (``gain`` has dim0 = 1, so rank 1 holds a 0-element shard)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.l1 = nn.Linear(6, 9)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 9).reshape(1, 9))
        self.l2 = nn.Linear(9, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx).mean(1)
        return self.l2(torch.tanh(self.l1(h)) * self.gain)


def base_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int, rank: int):
    """Different data on each rank (so grads are really reduced), same on every run."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 11, (4, 5), generator=gen), torch.randint(0, 3, (4,), generator=gen)


def groups(model: nn.Module, lr: float = 1e-2) -> list[dict]:
    """Two param groups: decayed matrices, and undecayed vectors at another lr."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    other = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [
        {"params": decay, "weight_decay": 0.1},
        {"params": other, "weight_decay": 0.0, "lr": lr / 2},
    ]


def make_opt(name: str, ours: bool, model: nn.Module, lr: float = 1e-2):
    ours_cls, torch_cls = PAIRS[name]
    extra = LAUNCH if ours else {"foreach": False}
    return (ours_cls if ours else torch_cls)(groups(model, lr), lr=lr, **KWARGS[name], **extra)


def fsdp2(model: nn.Module, **kw) -> nn.Module:
    fully_shard(model.l1, **kw)
    fully_shard(model, **kw)
    return model


def fsdp1(model: nn.Module, use_orig_params: bool = True, per_linear: bool = True) -> nn.Module:
    """FSDP1 on the CPU; ``per_linear`` wraps each Linear as its own unit (several flat
    params, some views empty on a rank)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy({nn.Linear}) if per_linear else None
    return FSDP(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"), auto_wrap_policy=policy)


def train(model: nn.Module, opt, rank: int, steps, *, clip: float | None = None,
          fused_clip: bool = False) -> list[float]:
    """``clip``: torch's clip_grad_norm_, or with ``fused_clip`` tritonadam's."""
    losses = []
    for step in steps:
        idx, target = batch(step, rank)
        loss = nn.functional.cross_entropy(model(idx).float(), target)
        loss.backward()
        if clip is not None and fused_clip:
            opt.clip_grad_norm_(clip)
        elif clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def assert_close_dicts(a: dict, b: dict, what: str, exact: bool = False, **tol) -> None:
    assert a.keys() == b.keys(), (what, a.keys(), b.keys())
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs: {(a[k] - b[k]).abs().max()}"
        else:
            torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{what}: {k}: {m}", **(tol or TOL))


def assert_same_on_all_ranks(value, what: str) -> None:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    assert all(v == values[0] for v in values), f"{what}: ranks disagree: {values}"


def compare_states(ours_opt, ref_opt, ours_model, ref_model, what: str) -> None:
    """Local shards of every state tensor close to torch's; state keeps the param's type."""
    for (n, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
        s, r = ours_opt.state[p], ref_opt.state[q]
        assert s.keys() == r.keys(), (what, n, s.keys(), r.keys())
        for key in s:
            if key == "step":
                assert not isinstance(s[key], DTensor) and s[key].dtype == torch.float32
                assert s[key].item() == r[key].item(), (what, n, s[key], r[key])
                continue
            # State must stay a DTensor with the param's layout: full state dicts gather it.
            assert type(s[key]) is type(p), (what, n, key, type(s[key]))
            if isinstance(p, DTensor):
                assert s[key].placements == p.placements, (what, n, key)
                assert s[key].shape == p.shape, (what, n, key)
            torch.testing.assert_close(
                local(s[key]), local(r[key]), msg=lambda m, n=n, key=key: f"{what}: {n}.{key}: {m}",
                **TOL,
            )


# ---- scenarios ---------------------------------------------------------------------------

def fsdp2_parity(rank: int, world: int, tmpdir: str) -> None:
    """FSDP2 (nested fully_shard): Adam(amsgrad), AdamW and Adamax track torch.optim over
    6 steps with two param groups, gradient clipping (DTensor grads) and uneven and
    empty local shards; state stays a DTensor sharded like its param."""
    base = base_model()
    shapes = {n: local(p).shape for n, p in fsdp2(copy.deepcopy(base)).named_parameters()}
    assert shapes["gain"] == ((1, 9) if rank == 0 else (0, 9)), shapes  # an empty shard
    assert shapes["emb.weight"][0] == (6 if rank == 0 else 5), shapes  # uneven shards
    for name in PAIRS:
        ours_model, ref_model = fsdp2(copy.deepcopy(base)), fsdp2(copy.deepcopy(base))
        ours, ref = make_opt(name, True, ours_model), make_opt(name, False, ref_model)
        l1 = train(ours_model, ours, rank, range(6), clip=1.0)
        l2 = train(ref_model, ref, rank, range(6), clip=1.0)
        torch.testing.assert_close(l1, l2, **TOL)
        for (n, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
            assert isinstance(p, DTensor)
            torch.testing.assert_close(p.to_local(), q.to_local(), msg=lambda m, n=n: f"{name} {n}: {m}", **TOL)
        compare_states(ours, ref, ours_model, ref_model, f"fsdp2 {name}")


def fsdp2_mixed_precision(rank: int, world: int, tmpdir: str) -> None:
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): bf16 compute, fp32
    sharded params and grads; ours stays with torch. Then bf16-stored params with
    master_weights=True (fp32 master as a DTensor shard) stay close to the fp32 run, and
    survive a DCP round trip bit for bit (master and state stay fp32 DTensors)."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    base = base_model()
    ours_model = fsdp2(copy.deepcopy(base), mp_policy=policy)
    ref_model = fsdp2(copy.deepcopy(base), mp_policy=policy)
    ours, ref = make_opt("AdamW", True, ours_model), make_opt("AdamW", False, ref_model)
    l1 = train(ours_model, ours, rank, range(5))
    l2 = train(ref_model, ref, rank, range(5))
    torch.testing.assert_close(l1, l2, **TOL)
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.to_local(), q.to_local(), **TOL)
    compare_states(ours, ref, ours_model, ref_model, "bf16 policy")

    # bf16 storage + fp32 master copy: the forward sees the same bf16 values as above.
    bf16_model = fsdp2(copy.deepcopy(base).to(torch.bfloat16),
                       mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    master = tritonadam.AdamW(groups(bf16_model), lr=1e-2, betas=(0.9, 0.95),
                              master_weights=True, **LAUNCH)
    train(bf16_model, master, rank, range(5))
    ref_full = full_params(ref_model)
    for n, p in bf16_model.named_parameters():
        state = master.state[p]
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            assert isinstance(state[key], DTensor) and state[key].dtype == torch.float32, (n, key)
        full_master = state["master_param"].full_tensor()
        assert full_master.shape == ref_full[n].shape
        # bf16 grads vs fp32 grads: close, not equal.
        torch.testing.assert_close(full_master, ref_full[n], atol=3e-2, rtol=0)
        assert torch.equal(p.full_tensor(), full_master.to(torch.bfloat16))

    # DCP round trip of bf16 params + fp32 master/state: a fresh model and optimizer
    # restored from it continue bit for bit like the original.
    path = os.path.join(tmpdir, "dcp_master")
    msd, osd = get_state_dict(bf16_model, master)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    fresh = fsdp2(base_model(seed=7).to(torch.bfloat16), mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    fresh_opt = tritonadam.AdamW(groups(fresh), lr=1e-2, betas=(0.9, 0.95), master_weights=True, **LAUNCH)
    msd, osd = get_state_dict(fresh, fresh_opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    for p in fresh.parameters():
        state = fresh_opt.state[p]
        assert state["master_param"].dtype == torch.float32 and isinstance(state["master_param"], DTensor)
    train(bf16_model, master, rank, range(5, 7))
    train(fresh, fresh_opt, rank, range(5, 7))
    for (n, p), q in zip(bf16_model.named_parameters(), fresh.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), n
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            assert torch.equal(master.state[p][key].to_local(), fresh_opt.state[q][key].to_local()), (n, key)


def fsdp2_checkpoints(rank: int, world: int, tmpdir: str) -> None:
    """State dicts and checkpoints, FSDP2, ours and torch.optim in every direction.

    3 steps, save, 3 more steps = the uninterrupted run. A fresh model (other init)
    and fresh optimizer restored from the checkpoint and trained the same 3 steps must
    match the uninterrupted run: bit for bit when saved and loaded by the same class,
    to parity tolerance across classes. Ways to save/restore:
      dcp      get_state_dict -> dcp.save / dcp.load -> set_state_dict (sharded)
      full     get_*_state_dict(full_state_dict=True) -> set_*_state_dict (every rank)
      rank0    full + cpu_offload on rank 0 only -> set_*(broadcast_from_rank0=True)
    """
    name = "AdamW"
    base = base_model()
    runs = {}
    for ours in (True, False):
        model = fsdp2(copy.deepcopy(base))
        opt = make_opt(name, ours, model)
        train(model, opt, rank, range(3))
        tag = "ours" if ours else "torch"

        # Sharded state dict: DTensor values, like torch's.
        msd, osd = get_state_dict(model, opt)
        assert all(isinstance(v, DTensor) for k, s in osd["state"].items()
                   for key, v in s.items() if key != "step"), tag
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmpdir, f"dcp_{tag}"))

        # Full state dict: full tensors (not this rank's shard) on every rank.
        full_opts = StateDictOptions(full_state_dict=True)
        # deepcopy: in-memory state dicts alias live state (step counts, for one).
        full_osd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=full_opts))
        full_msd = {k: full(v).clone() for k, v in msd.items()}
        for pname, pstate in full_osd["state"].items():
            for key, v in pstate.items():
                assert not isinstance(v, DTensor), (tag, pname, key)
                if key != "step":
                    assert v.shape == full_msd[pname].shape, (tag, pname, key, v.shape)
        rank0_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        rank0_osd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=rank0_opts))
        if rank != 0:
            assert rank0_osd == {} or not rank0_osd.get("state"), "cpu_offload keeps rank 0 only"

        train(model, opt, rank, range(3, 6))
        runs[tag] = {
            "final": full_params(model),
            "full": (full_msd, full_osd),
            "rank0": (full_msd if rank == 0 else {}, rank0_osd if rank == 0 else {}),
        }

    # Full optimizer state dicts of the two implementations agree, key for key.
    o_full, t_full = runs["ours"]["full"][1], runs["torch"]["full"][1]
    assert o_full["state"].keys() == t_full["state"].keys()
    for pname in t_full["state"]:
        assert_close_dicts(o_full["state"][pname], t_full["state"][pname], f"full osd {pname}")
    assert [sorted(g) for g in o_full["param_groups"]] == [sorted(g) for g in t_full["param_groups"]]

    tol = {"atol": 1e-6, "rtol": 1e-5}
    for src in ("ours", "torch"):
        for dst_ours in (True, False):
            dst = "ours" if dst_ours else "torch"
            for how in ("dcp", "full", "rank0"):
                what = f"{src} -> {dst} via {how}"
                model = fsdp2(base_model(seed=123))  # other init: the load must overwrite it
                opt = make_opt(name, dst_ours, model, lr=0.5)  # and the group lrs
                if how == "dcp":
                    msd, osd = get_state_dict(model, opt)
                    sd = {"model": msd, "optim": osd}
                    dcp.load(sd, checkpoint_id=os.path.join(tmpdir, f"dcp_{src}"))
                    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
                else:
                    msd, osd = copy.deepcopy(runs[src][how])
                    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=how == "rank0")
                    set_model_state_dict(model, msd, options=opts)
                    set_optimizer_state_dict(model, opt, osd, options=opts)
                assert [g["lr"] for g in opt.param_groups] == [1e-2, 5e-3], what
                for p in model.parameters():
                    assert opt.state[p]["step"].item() == 3.0, what
                    if dst_ours:
                        for key in ("exp_avg", "exp_avg_sq"):
                            v = opt.state[p][key]
                            assert isinstance(v, DTensor) and v.placements == p.placements, (what, key)
                            assert v.dtype == torch.float32 and v.to_local().is_contiguous(), (what, key)
                train(model, opt, rank, range(3, 6))
                got = full_params(model)
                assert_close_dicts(got, runs[dst]["final"], what, exact=src == dst)
                assert_close_dicts(got, runs[src]["final"], what, **tol)


def fsdp1_parity(rank: int, world: int, tmpdir: str) -> None:
    """FSDP1 with use_orig_params=True: params are 1-D views of the flat shard, some
    empty; ours tracks torch.optim, and full optimizer state dicts move between the two
    (ours -> torch and torch -> ours) with training continuing identically.
    tritonadam's fused clipping refuses FSDP1 shards (their norm would be rank-local).
    Then DDP: ours tracks torch.optim, with torch's or its own fused clipping (DDP grads
    are whole, so the local norm is the global one), and params stay identical on every
    rank."""
    base = base_model()
    models, opts, finals, full_sds = {}, {}, {}, {}
    for name in ("AdamW", "Adam"):
        for ours in (True, False):
            tag = ("ours" if ours else "torch", name)
            model = fsdp1(copy.deepcopy(base))
            opt = make_opt(name, ours, model)
            train(model, opt, rank, range(4), clip=1.0)
            models[tag], opts[tag] = model, opt
        (o_model, o_opt), (t_model, t_opt) = [(models[(t, name)], opts[(t, name)]) for t in ("ours", "torch")]
        sizes = [p.numel() for p in o_model.parameters()]
        if rank == 1:
            assert 0 in sizes, sizes  # some flat views are empty on some rank
        for (n, p), q in zip(o_model.named_parameters(), t_model.parameters()):
            assert p.dim() == 1 or p.numel() == 0, (n, p.shape)
            torch.testing.assert_close(p, q, msg=lambda m, n=n: f"fsdp1 {name} {n}: {m}", **TOL)
        for p, q in zip(o_model.parameters(), t_model.parameters()):
            if q in t_opt.state:
                s, r = o_opt.state[p], t_opt.state[q]
                assert s.keys() == r.keys(), (s.keys(), r.keys())
                for key in r:
                    torch.testing.assert_close(s[key].float(), r[key].float(), **TOL)
        opts_full = StateDictOptions(full_state_dict=True)
        for tag in (("ours", name), ("torch", name)):
            full_sds[tag] = get_optimizer_state_dict(models[tag], opts[tag], options=opts_full)
        o_sd, t_sd = full_sds[("ours", name)], full_sds[("torch", name)]
        for pname in t_sd["state"]:
            for key, value in t_sd["state"][pname].items():
                torch.testing.assert_close(o_sd["state"][pname][key], value, **TOL)
                if key != "step":
                    assert value.shape == full(dict(base.named_parameters())[pname]).shape
        for tag in (("ours", name), ("torch", name)):
            train(models[tag], opts[tag], rank, range(4, 6))
            finals[tag] = [p.detach().clone() for p in models[tag].parameters()]

        # Cross loads: the other class's full state dict, then the same 2 steps.
        for src, dst in (("torch", "ours"), ("ours", "torch")):
            # Restore the params as of step 4 from a fresh run of the source class.
            src_model = fsdp1(copy.deepcopy(base))
            src_opt = make_opt(name, src == "ours", src_model)
            train(src_model, src_opt, rank, range(4), clip=1.0)
            sd = get_optimizer_state_dict(src_model, src_opt, options=opts_full)
            opt = make_opt(name, dst == "ours", src_model)
            set_optimizer_state_dict(src_model, opt, sd, options=opts_full)
            train(src_model, opt, rank, range(4, 6))
            for p, q, r in zip(src_model.parameters(), finals[(src, name)], finals[(dst, name)]):
                torch.testing.assert_close(p, q, **TOL)
                torch.testing.assert_close(p, r, **TOL)
    try:
        train(models[("ours", "AdamW")], opts[("ours", "AdamW")], rank, range(1), clip=1.0, fused_clip=True)
    except NotImplementedError as err:
        assert "model.clip_grad_norm_" in str(err), err
    else:
        raise AssertionError("fused clipping of FSDP1 shards did not raise")
    # The refusal writes nothing (the grads above are still there), and max_grad_norm is
    # refused when the optimizer is built, saying what to do instead.
    fsdp1_model = models[("ours", "AdamW")]
    fresh = make_opt("AdamW", True, fsdp1_model)
    try:
        fresh.clip_grad_norm_(1.0)
    except NotImplementedError as err:
        assert "model.clip_grad_norm_" in str(err) and not any(fresh.state.values()), (err, fresh.state)
    else:
        raise AssertionError("clip_grad_norm_ of FSDP1 shards did not raise")
    try:
        tritonadam.AdamW(fsdp1_model.parameters(), max_grad_norm=1.0)
    except NotImplementedError as err:
        assert "drop max_grad_norm= and call FSDP1's own model.clip_grad_norm_" in str(err), err
    else:
        raise AssertionError("max_grad_norm with FSDP1 shards was not refused")

    # DDP: full params and grads on every rank (averaged by DDP's all-reduce).
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = {ours: DDP(copy.deepcopy(base)) for ours in (True, False)}
    ddp_opts = {ours: make_opt("AdamW", ours, m) for ours, m in ddp.items()}
    for ours in (True, False):
        train(ddp[ours], ddp_opts[ours], rank, range(4), clip=1.0)
    for p, q in zip(ddp[True].parameters(), ddp[False].parameters()):
        torch.testing.assert_close(p, q, **TOL)
    assert_same_on_all_ranks([p.detach().tolist() for p in ddp[True].parameters()], "DDP params")
    fused = {ours: DDP(copy.deepcopy(base)) for ours in (True, False)}
    fused_opts = {ours: make_opt("AdamW", ours, m) for ours, m in fused.items()}
    for ours in (True, False):
        train(fused[ours], fused_opts[ours], rank, range(4), clip=0.3, fused_clip=ours)
    for p, q in zip(fused[True].parameters(), fused[False].parameters()):
        torch.testing.assert_close(p, q, **TOL)
    assert_same_on_all_ranks([p.detach().tolist() for p in fused[True].parameters()], "DDP params, fused clip")


def _scaled_run(model, opt, scaler, rank, *, unscale_first, clip=None, steps=4, inf_step=1):
    """GradScaler loop with an inf in rank 1's local grad shard only at ``inf_step``.
    Returns per step (param shards changed?, scale) as seen by this rank."""
    seen = []
    for step in range(steps):
        idx, target = batch(step, rank)
        loss = nn.functional.cross_entropy(model(idx), target)
        scaler.scale(loss).backward()
        if step == inf_step and rank == 1:
            g = next(local(p.grad) for p in model.parameters() if p.grad is not None and local(p.grad).numel())
            g.view(-1)[0] = float("inf")
        if unscale_first:
            scaler.unscale_(opt)
            if clip is not None:
                clip(model)
        before = [local(p).detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        changed = any(not torch.equal(local(p), b) for p, b in zip(model.parameters(), before) if b.numel())
        seen.append((changed, scaler.get_scale()))
        opt.zero_grad()
    return seen


def grad_scaler_fsdp(rank: int, world: int, tmpdir: str) -> None:
    """GradScaler with an inf/NaN in one rank's grad shard only (every rank must skip).

    FSDP2 + torch.amp.GradScaler, no unscale_ (the kernel unscales; DTensor grads make
    the scaler's inf check a collective) and with unscale_ + clipping; FSDP1 +
    ShardedGradScaler with unscale_ + FSDP.clip_grad_norm_ (its unscale_ all-reduces
    found_inf). Ours tracks torch.optim.AdamW; skip decisions and scales agree across ranks.
    """
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    base = base_model()
    cases = {
        "fsdp2": (fsdp2, lambda: torch.amp.GradScaler("cpu", init_scale=1024.0), False, None),
        "fsdp2+unscale_+clip": (fsdp2, lambda: torch.amp.GradScaler("cpu", init_scale=1024.0), True,
                                lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)),
        "fsdp1+unscale_+clip": (
            lambda m: fsdp1(m, per_linear=False),
            lambda: ShardedGradScaler("cpu", init_scale=1024.0), True, lambda m: m.clip_grad_norm_(1.0),
        ),
    }
    for what, (wrap, make_scaler, unscale_first, clip) in cases.items():
        runs = {}
        for ours in (True, False):
            model = wrap(copy.deepcopy(base))
            opt = make_opt("AdamW", ours, model)
            seen = _scaled_run(model, opt, make_scaler(), rank, unscale_first=unscale_first, clip=clip)
            assert [c for c, _ in seen] == [True, False, True, True], (what, ours, seen)
            assert_same_on_all_ranks(seen, f"{what} ours={ours}")
            runs[ours] = (model, opt, seen)
        assert runs[True][2] == runs[False][2], what
        for p, q in zip(runs[True][0].parameters(), runs[False][0].parameters()):
            torch.testing.assert_close(local(p), local(q), **TOL)
        states = [runs[True][1].state[p] for p in runs[True][0].parameters() if p in runs[True][1].state]
        assert states and all(s["step"].item() == 3 for s in states), what


def grad_scaler_fsdp1_without_unscale(rank: int, world: int, tmpdir: str) -> None:
    """FSDP1 + ShardedGradScaler and scaler.step(opt) without unscale_: GradScaler.step's
    inf check for optimizers with _step_supports_amp_scaling is rank-local (only
    ShardedGradScaler.unscale_ all-reduces found_inf), so a rank without the inf steps
    and grows its scale while the other skips and backs off. torch.optim.AdamW (which
    GradScaler unscales through ShardedGradScaler.unscale_) stays consistent."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from tritonadam.amp import ShardedGradScaler as AgreeingShardedGradScaler

    base = base_model()
    for ours in (False, True):
        model = fsdp1(copy.deepcopy(base), per_linear=False)
        opt = make_opt("AdamW", ours, model)
        scaler_cls = AgreeingShardedGradScaler if ours else ShardedGradScaler
        seen = _scaled_run(model, opt, scaler_cls("cpu", init_scale=1024.0), rank, unscale_first=False)
        assert_same_on_all_ranks(seen, f"fsdp1 ShardedGradScaler without unscale_, ours={ours}")
    # And the torch bug this class works around is still there (drop the class when not).
    model = fsdp1(copy.deepcopy(base), per_linear=False)
    seen = _scaled_run(model, make_opt("AdamW", True, model), ShardedGradScaler("cpu", init_scale=1024.0),
                       rank, unscale_first=False)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, seen)
    assert gathered[0] != gathered[1], "torch's ShardedGradScaler now agrees across ranks"


def fsdp2_precision_modes(rank: int, world: int, tmpdir: str) -> None:
    """bf16 params under FSDP2 (uneven and empty shards): master_weights="remainder"
    steps bit for bit like master_weights=True; its sharded state holds int16 DTensor
    remainders and exports an fp32 DTensor master, which a dcp checkpoint carries into a
    master_weights=True optimizer that continues bit for bit. Stochastic rounding with
    bf16 state keeps bf16 DTensor state and repeats itself run to run."""
    base = base_model().to(torch.bfloat16)

    def run(steps, **kw):
        model = fsdp2(copy.deepcopy(base))
        opt = tritonadam.AdamW(groups(model), lr=1e-2, **kw, seed=5, **LAUNCH)
        train(model, opt, rank, steps)
        return model, opt

    master_model, master = run(range(4), master_weights=True)
    rem_model, rem = run(range(4), master_weights="remainder")
    assert_close_dicts(full_params(master_model), full_params(rem_model), "remainder vs master", exact=True)
    for p in rem_model.parameters():
        r = rem.state[p]["master_param_remainder"]
        assert isinstance(r, DTensor) and r.dtype == torch.int16 and r.placements == p.placements
    msd, osd = get_state_dict(rem_model, rem)
    for pstate in osd["state"].values():
        assert isinstance(pstate["master_param_remainder"], DTensor)  # its own key, for flattened loads
        assert isinstance(pstate["master_param"], DTensor) and pstate["master_param"].dtype == torch.float32
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmpdir, "dcp_remainder"))
    train(master_model, master, rank, range(4, 6))

    restored_model = fsdp2(base_model(seed=1).to(torch.bfloat16))
    restored = tritonadam.AdamW(groups(restored_model), lr=1e-2, master_weights=True, **LAUNCH)
    msd2, osd2 = get_state_dict(restored_model, restored)
    loaded = {"model": msd2, "optim": osd2}
    dcp.load(loaded, checkpoint_id=os.path.join(tmpdir, "dcp_remainder"))
    set_state_dict(restored_model, restored, model_state_dict=loaded["model"],
                   optim_state_dict=loaded["optim"])
    train(restored_model, restored, rank, range(4, 6))
    assert_close_dicts(full_params(master_model), full_params(restored_model), "dcp remainder -> master",
                       exact=True)

    a_model, a = run(range(3), stochastic_rounding=True, state_dtype=torch.bfloat16)
    b_model, _ = run(range(3), stochastic_rounding=True, state_dtype=torch.bfloat16)
    assert_close_dicts(full_params(a_model), full_params(b_model), "stochastic rounding rerun", exact=True)
    for p in a_model.parameters():
        m = a.state[p]["exp_avg"]
        assert isinstance(m, DTensor) and m.dtype == torch.bfloat16 and m.placements == p.placements


# Formats whose state is not plain fp32 moments, with the param dtype each needs.
FSDP1_MODES = (
    (torch.float32, {"state_dtype": "8bit", "amsgrad": True}),
    (torch.bfloat16, {"state_dtype": "8bit", "master_weights": "remainder"}),
    (torch.bfloat16, {"state_dtype": "4bit", "stochastic_rounding": True, "seed": 7}),
    (torch.bfloat16, {"state_dtype": torch.bfloat16, "master_weights": True}),
    (torch.bfloat16, {"master_weights": "remainder"}),
)


def fsdp1_precision_state_dicts(rank: int, world: int, tmpdir: str) -> None:
    """FSDP1 with its default ``use_orig_params=False`` (the optimizer steps flat params)
    tracks torch.optim. With quantized moments, a remainder master or bf16 state, the
    optimizer steps flat params or 1-D views of them, some empty (``True``). FSDP1's
    optimizer state dicts all-gather every state tensor of a flat param element for
    element (with ``use_orig_params=True`` all in one dtype), so ours export each FSDP1
    shard's moments at fp32 under torch's keys and a master as fp32 ``master_param``:
    DCP's full state dicts and FSDP1's own ``FSDP.optim_state_dict`` then work, and a
    fresh model and optimizer restored from them continue bit for bit (the load
    re-encodes the same codes, the same remainder).

    Not used here, as torch.optim fails them too on this CPU/gloo job: DCP's sharded
    FSDP1 state dicts (``dcp.load`` on rank 1: "Missing key in checkpoint state_dict:
    optim.param_groups"), and ``FSDP.optim_state_dict`` with ``use_orig_params=True``
    (on CPU tensors it returns every key of a param as views of one buffer: its offload
    copy is a no-op there)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    internal = ("_8bit", "_4bit", "_scales", "master_param_remainder")
    full_opts = StateDictOptions(full_state_dict=True)
    full_shapes = {n: p.shape for n, p in base_model().named_parameters()}
    # FSDP1's default (flat params in the optimizer) tracks torch.optim too.
    flat = {}
    for ours in (True, False):
        model = fsdp1(base_model(), use_orig_params=False)
        assert all(getattr(p, "_is_flat_param", False) for p in model.parameters())
        opt = make_opt("AdamW", ours, model)
        train(model, opt, rank, range(3), clip=1.0)
        flat[ours] = list(model.parameters())
    for p, q in zip(flat[True], flat[False]):
        torch.testing.assert_close(p, q, msg=lambda m: f"FSDP1 flat params: {m}", **TOL)
    for orig in (False, True):
        for dtype, kw in FSDP1_MODES:
            what = f"FSDP1 use_orig_params={orig} {dtype} {kw}"

            def fresh(seed=0):
                model = fsdp1(base_model(seed).to(dtype), use_orig_params=orig)
                return model, tritonadam.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **kw)

            model, opt = fresh()
            train(model, opt, rank, range(3))
            at3 = [p.detach().clone() for p in model.parameters()]
            saved = {"full": copy.deepcopy(get_optimizer_state_dict(model, opt, options=full_opts))}
            if not orig:
                saved["legacy"] = copy.deepcopy(FSDP.optim_state_dict(model, opt))
            for how, osd in saved.items():
                assert osd["state"].keys() == full_shapes.keys(), (what, how, osd["state"].keys())
                for pname, pstate in osd["state"].items():
                    for key, v in pstate.items():
                        assert not key.endswith(internal), (what, how, pname, key)
                        if key not in ("step", "rounding_seed"):
                            assert v.dtype == torch.float32 and v.shape == full_shapes[pname], \
                                (what, how, pname, key, v.dtype, v.shape)
            train(model, opt, rank, range(3, 6))
            final = [p.detach().clone() for p in model.parameters()]

            for how, osd in saved.items():
                restored, ropt = fresh(seed=123)
                with torch.no_grad():
                    for p, q in zip(restored.parameters(), at3):
                        p.copy_(q)
                if how == "full":
                    set_optimizer_state_dict(restored, ropt, copy.deepcopy(osd), options=full_opts)
                else:
                    ropt.load_state_dict(FSDP.optim_state_dict_to_load(restored, ropt, copy.deepcopy(osd)))
                train(restored, ropt, rank, range(3, 6))
                for i, (p, q) in enumerate(zip(restored.parameters(), final)):
                    assert torch.equal(p, q), (what, how, i, (p.float() - q.float()).abs().max())


class MLP(nn.Module):
    """Two linears. Rows of 128 elements sharded along dim 1 split each row's two blocks
    of 64 between the ranks; 130 hidden units split 65/65, so blocks straddle a shard
    boundary."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(inputs, hidden)
        self.down = nn.Linear(hidden, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _mlp_train(model, opt, rank, steps, clip=None, max_norm=0.5) -> None:
    for step in steps:
        x = torch.randn(8, model.up.in_features, generator=torch.Generator().manual_seed(10 * step + rank))
        model(x).pow(2).mean().backward()
        if clip == "torch":
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        elif clip == "fused":
            opt.clip_grad_norm_(max_norm)
        opt.step()
        opt.zero_grad()


def _tp_builders(world: int):
    """Models with DTensor params sharded along dim 1 as well as dim 0, replicated next to
    sharded: tensor parallelism, FSDP2 sharding matrices along dim 1, and both on a 2-D
    (dp, tp) mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))

    def tp(seed):  # down.weight (24, 128) Shard(1)
        torch.manual_seed(seed)
        model = MLP(24, 128)
        return parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})

    def fsdp_dim1(seed):  # up.weight (130, 128) Shard(1), down.weight (24, 130) Shard(1)
        torch.manual_seed(seed)
        model = MLP(128, 130)
        placement = lambda p: Shard(1) if p.dim() == 2 else Shard(0)  # noqa: E731
        fully_shard(model.up, shard_placement_fn=placement)
        return fully_shard(model, shard_placement_fn=placement)

    def fsdp_tp(seed):  # a (dp=1, tp=2) mesh: weights (Shard(0), Shard(k)), biases (Shard(0), Replicate())
        mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
        torch.manual_seed(seed)
        model = MLP(24, 128)
        parallelize_module(model, mesh2["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        return fully_shard(model, mesh=mesh2["dp"])

    return tp, fsdp_dim1, fsdp_tp


def _tp_opt(model, **kw):
    return tritonadam.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **kw)


def _full_list(model):
    return [p.full_tensor() for p in model.parameters()]


def _tp_clip(rank: int, world: int) -> None:
    """Fused clipping over TP's mix of sharded and replicated grads (each layout's total
    all-reduced over its own sharded dims): norms of order 1, 2, 3 and inf equal torch's
    over the same grads, and clipped training tracks torch's clip_grad_norm_."""
    tp, fsdp_dim1, fsdp_tp = _tp_builders(world)
    for build in (tp, fsdp_tp):
        model = build(0)
        opt = _tp_opt(model)
        model(torch.randn(8, 24, generator=torch.Generator().manual_seed(rank))).pow(2).mean().backward()
        grads = [p.grad for p in model.parameters()]
        assert len({g.placements for g in grads}) >= 2, [g.placements for g in grads]
        for norm_type in (2.0, 1.0, 3.0, math.inf):
            expected = torch.nn.utils.get_total_norm(grads, norm_type).full_tensor()
            got = opt.clip_grad_norm_(math.inf, norm_type)
            assert isinstance(got, DTensor), type(got)
            torch.testing.assert_close(got.full_tensor(), expected, rtol=1e-6, atol=0,
                                       msg=lambda m: f"{build.__name__} norm {norm_type}: {m}")
            assert_same_on_all_ranks(got.full_tensor().item(), f"{build.__name__} norm {norm_type}")
        two_norm = torch.nn.utils.get_total_norm(grads, 2.0).full_tensor().item()
        assert two_norm > 0.1, f"{build.__name__}: clipping at 0.1 below would not bind ({two_norm})"
        opt.zero_grad()

    for build in (tp, fsdp_dim1, fsdp_tp):
        what = build.__name__
        ref = build(0)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
        _mlp_train(ref, ref_opt, rank, range(4), clip="torch", max_norm=0.1)
        model = build(0)
        opt = _tp_opt(model)
        _mlp_train(model, opt, rank, range(4), clip="fused", max_norm=0.1)
        for p, q in zip(_full_list(model), _full_list(ref)):
            torch.testing.assert_close(p, q, msg=lambda m: f"{what}: {m}", **TOL)


def tensor_parallel(rank: int, world: int, tmpdir: str) -> None:
    """DTensor params sharded along dim 1 as well as dim 0, replicated next to sharded
    (``_tp_builders``). Ours tracks torch.optim; with 8-bit and 4-bit state a sharded DCP
    checkpoint (TP) and a full optimizer state dict (FSDP2) restore a fresh model and
    optimizer that continue bit for bit. Fused clipping covers them all (``_tp_clip``)."""
    from torch.distributed.tensor import Shard

    tp, fsdp_dim1, _ = _tp_builders(world)
    _tp_clip(rank, world)
    placements = {p.placements for p in tp(0).parameters()}
    assert {(Shard(0),), (Shard(1),)} < placements and len(placements) == 3, placements

    for build, bits, how in ((tp, "8bit", "dcp"), (fsdp_dim1, "4bit", "full")):
        what = f"{build.__name__} {bits} via {how}"
        clip = "fused" if build is fsdp_dim1 else None
        model = build(0)
        opt = _tp_opt(model, state_dtype=bits)
        _mlp_train(model, opt, rank, range(3), clip=clip)
        path = os.path.join(tmpdir, f"tp_{build.__name__}")
        full_opts = StateDictOptions(full_state_dict=True)
        if how == "dcp":
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        else:
            msd = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
            osd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=full_opts))
        _mlp_train(model, opt, rank, range(3, 5), clip=clip)
        restored = build(5)
        ropt = _tp_opt(restored, state_dtype=bits)
        if how == "dcp":
            msd2, osd2 = get_state_dict(restored, ropt)
            sd = {"model": msd2, "optim": osd2}
            dcp.load(sd, checkpoint_id=path)
            set_state_dict(restored, ropt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        else:
            set_model_state_dict(restored, msd, options=full_opts)
            set_optimizer_state_dict(restored, ropt, osd, options=full_opts)
        _mlp_train(restored, ropt, rank, range(3, 5), clip=clip)
        for p, q in zip(_full_list(restored), _full_list(model)):
            assert torch.equal(p, q), (what, (p - q).abs().max())


def fsdp_tp_2d(rank: int, world: int, tmpdir: str) -> None:
    """FSDP2 over tensor parallelism on a (dp=2, tp=2) mesh (4 ranks): FSDP2 shards the
    column-parallel weight's rows again, placed (_StridedShard(0), Shard(0)), which
    torch's ``is_shard()`` does not count. The fused clip left the dp dim out of those
    grads' reduction: a 2-norm of 0.15 or 0.17 (another on each dp rank) for torch's
    0.21. Now its norms of order 1, 2, 3 and inf equal torch's on every rank, clipped
    training (explicit and ``max_grad_norm``) tracks torch.optim under torch's clip, fp16
    with tritonadam.amp.ShardedGradScaler skips an inf on one rank everywhere, and an
    8-bit run resumes from a DCP checkpoint bit for bit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    assert world == 4, world
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh.get_coordinate()[0]  # the data: alike over a tp group, unlike over dp

    def build(seed):
        torch.manual_seed(seed)
        model = MLP(24, 128)
        parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        return fully_shard(model, mesh=mesh["dp"])

    model = build(0)
    assert "_StridedShard" in type(model.up.weight.placements[0]).__name__, model.up.weight.placements
    opt = _tp_opt(model)
    model(torch.randn(8, 24, generator=torch.Generator().manual_seed(dp))).pow(2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    for norm_type in (2.0, 1.0, 3.0, math.inf):
        expected = torch.nn.utils.get_total_norm(grads, norm_type).full_tensor()
        got = opt.clip_grad_norm_(math.inf, norm_type).full_tensor()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0, msg=lambda m: f"norm {norm_type}: {m}")
        assert_same_on_all_ranks(got.item(), f"norm {norm_type}")
    assert torch.nn.utils.get_total_norm(grads, 2.0).full_tensor().item() > 0.1  # clipping at 0.1 binds

    ref = build(0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    _mlp_train(ref, ref_opt, dp, range(3), clip="torch", max_norm=0.1)
    for how in ("explicit", "max_grad_norm"):
        model = build(0)
        opt = _tp_opt(model, **({"max_grad_norm": 0.1} if how == "max_grad_norm" else {}))
        _mlp_train(model, opt, dp, range(3), clip="fused" if how == "explicit" else None, max_norm=0.1)
        for p, q in zip(_full_list(model), _full_list(ref)):
            torch.testing.assert_close(p, q, msg=lambda m: f"{how}: {m}", **TOL)

    # fp16 with an inf in rank 0's shard alone, the first param a norm left out of tensor
    # parallelism: torch's DTensor inf check does not cross the tp dim there (ranks 1 and
    # 3 stepped, 0 and 2 skipped); tritonadam.amp.ShardedGradScaler (docs/integration.md)
    # skips on every rank.
    import tritonadam.amp

    torch.manual_seed(0)
    net = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64)).half()
    parallelize_module(net, mesh["tp"], {"1": ColwiseParallel(), "3": RowwiseParallel()})
    fully_shard(net, mesh=mesh["dp"])
    opt = tritonadam.AdamW(net.parameters(), lr=1e-2, **LAUNCH)
    scaler = tritonadam.amp.ShardedGradScaler("cpu", init_scale=256.0)
    scaler.scale(net(torch.randn(4, 64, generator=torch.Generator().manual_seed(dp)).half())
                 .float().pow(2).mean()).backward()
    if rank == 0:
        net[1].weight.grad.to_local().view(-1)[0] = float("inf")
    before = [p.to_local().clone() for p in net.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, p.to_local()) for a, p in zip(before, net.parameters())), "a rank stepped"
    assert_same_on_all_ranks(scaler.get_scale(), "scale after an inf on rank 0")
    assert scaler.get_scale() == 128.0

    model = build(0)
    opt = _tp_opt(model, state_dtype="8bit")
    _mlp_train(model, opt, dp, range(2))
    path = os.path.join(tmpdir, "fsdp_tp_2d")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    _mlp_train(model, opt, dp, range(2, 4))
    restored = build(5)
    ropt = _tp_opt(restored, state_dtype="8bit")
    msd2, osd2 = get_state_dict(restored, ropt)
    sd = {"model": msd2, "optim": osd2}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(restored, ropt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    _mlp_train(restored, ropt, dp, range(2, 4))
    for p, q in zip(_full_list(restored), _full_list(model)):
        assert torch.equal(p, q), (p - q).abs().max()


class Gain(nn.Module):
    """One (1, 9) param: over 2 ranks, rank 1 holds nothing of this model at all."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 9).reshape(1, 9))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return (idx.float().mean(1, keepdim=True) * self.gain)[:, :3]


def fsdp2_cpu_params(rank: int, world: int, tmpdir: str) -> None:
    """Run without the interpreter, as a GPU job whose params FSDP2 keeps on the CPU
    (CPUOffloadPolicy): the CPU DTensor params are stepped by torch.optim's CPU
    implementation on tritonadam's state. Adam(amsgrad)/AdamW match torch.optim's
    fused=True and Adamax its for-loop bit for bit over 4 steps (two param groups, torch's
    clip, uneven and empty shards); the full optimizer state dict carries the run to a
    fresh optimizer exactly; fused clipping (explicit and max_grad_norm=, 2- and inf-norm)
    gives torch's norm and steps, also over tensor parallelism's mixed layouts
    (``_tp_clip``); a format only the kernels have is refused on every rank with nothing
    written."""
    from tritonadam.kernels.launch import interpreted

    assert not interpreted(), "run with TRITON_INTERPRET=0"
    for name in PAIRS:
        torch_impl = {"foreach": False} if name == "Adamax" else {"fused": True}
        ref_model = fsdp2(base_model())
        ref = PAIRS[name][1](groups(ref_model), lr=1e-2, **KWARGS[name], **torch_impl)
        model = fsdp2(base_model())
        opt = PAIRS[name][0](groups(model), lr=1e-2, **KWARGS[name])
        train(ref_model, ref, rank, range(4), clip=0.5)
        train(model, opt, rank, range(4), clip=0.5)
        assert_close_dicts(full_params(model), full_params(ref_model), f"{name} cpu params", exact=True)
        saved = copy.deepcopy(get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True)))
        resumed_model = fsdp2(base_model())
        resumed_model.load_state_dict(model.state_dict())
        resumed = PAIRS[name][0](groups(resumed_model), lr=1e-2, **KWARGS[name])
        set_optimizer_state_dict(resumed_model, resumed, saved, options=StateDictOptions(full_state_dict=True))
        train(model, opt, rank, range(4, 6), clip=0.5)
        train(resumed_model, resumed, rank, range(4, 6), clip=0.5)
        assert_close_dicts(full_params(resumed_model), full_params(model), f"{name} resumed", exact=True)
    # Fused clipping of the CPU shards: torch's norm, reduced across ranks, then its step.
    for norm_type in (2.0, float("inf")):
        for how in ("explicit", "max_grad_norm"):
            ref_model = fsdp2(base_model())
            ref = torch.optim.AdamW(groups(ref_model), lr=1e-2, fused=True)
            model = fsdp2(base_model())
            kw = {"max_grad_norm": 0.05, "grad_norm_type": norm_type} if how == "max_grad_norm" else {}
            opt = tritonadam.AdamW(groups(model), lr=1e-2, **kw)
            for step in range(3):
                for m in (model, ref_model):
                    idx, target = batch(step, rank)
                    nn.functional.cross_entropy(m(idx).float(), target).backward()
                if norm_type == 2.0:
                    # in the optimizer's param order (its groups'), over which the fused clip
                    # sums: in module order the sum rounds otherwise, and the last bit differed
                    # on some machines (its matmuls' grads)
                    ordered = [p for g in ref.param_groups for p in g["params"]]
                    expected = torch.nn.utils.clip_grad_norm_(ordered, 0.05).full_tensor()
                else:  # torch's inf norm refuses the empty shards (no identity for max)
                    expected = torch.stack([p.grad.full_tensor().abs().max() for p in ref_model.parameters()]).max()
                    torch.nn.utils.clip_grads_with_norm_(ref_model.parameters(), 0.05, expected)
                norm = opt.clip_grad_norm_(0.05, norm_type) if how == "explicit" else None
                opt.step()
                ref.step()
                norm = (norm if how == "explicit" else opt.last_grad_norm).full_tensor()
                what = f"cpu params fused clip {how} p={norm_type} step {step}"
                assert expected > 0.05, (what, expected)
                assert_same_on_all_ranks(norm.view(torch.int32).item(), f"{what}: norm bits")
                assert torch.equal(norm, expected), (what, norm, expected)
                opt.zero_grad()
                ref.zero_grad()
            assert_close_dicts(full_params(model), full_params(ref_model), what, exact=True)
    _tp_clip(rank, world)  # the host path's clip over TP's mixed layouts
    model = fsdp2(base_model())
    opt = tritonadam.AdamW(model.parameters(), state_dtype="8bit")
    model(batch(0, rank)[0]).sum().backward()
    try:
        opt.step()
    except RuntimeError as e:
        assert "needs the GPU kernels" in str(e), e
    else:
        raise AssertionError("8-bit state on CPU params without the kernels was stepped")
    assert not any(opt.state.values())


def fsdp2_fused_clip(rank: int, world: int, tmpdir: str) -> None:
    """tritonadam's fused clipping under FSDP2 (uneven and empty shards; then a model of
    which rank 1 holds no element): ``clip_grad_norm_`` and ``max_grad_norm=``, 2-norm and
    inf-norm. The norm is global (one all-reduce of the partial), returned as a replicated
    DTensor with the same bits on every rank, and norm and params match one process
    training the unsharded model on both ranks' data with torch's clip_grad_norm_ and
    torch.optim.AdamW. Also with params FSDP2 leaves out (``ignored_params``: plain
    tensors whose grads the job all-reduces itself), counted once, as replicated; torch's
    clip refuses that mix."""
    from torch.distributed.tensor import Replicate

    for make in (base_model, Gain, "ignored"):
        base = make() if callable(make) else base_model()
        for norm_type, max_norm in ((2.0, 0.5), (float("inf"), 0.1)):
            for how in ("explicit", "max_grad_norm"):
                what = f"{getattr(make, '__name__', make)} {how} p={norm_type}"
                model = copy.deepcopy(base)
                ignored = [model.l2.weight, model.l2.bias] if make == "ignored" else []
                if make is Gain:
                    fully_shard(model)
                else:
                    fsdp2(model, **({"ignored_params": set(ignored)} if ignored else {}))
                kw = {"max_grad_norm": max_norm, "grad_norm_type": norm_type} if how != "explicit" else {}
                opt = tritonadam.AdamW(groups(model), lr=1e-2, betas=(0.9, 0.95), **kw, **LAUNCH)
                ref_model = copy.deepcopy(base)
                ref = torch.optim.AdamW(groups(ref_model), lr=1e-2, betas=(0.9, 0.95), foreach=False)
                clipped = []
                for step in range(4):
                    idx, target = batch(step, rank)
                    nn.functional.cross_entropy(model(idx).float(), target).backward()
                    for p in ignored:  # averaged as FSDP averages the others
                        dist.all_reduce(p.grad)
                        p.grad /= world
                    if how == "explicit":
                        norm = opt.clip_grad_norm_(max_norm, norm_type)
                    opt.step()
                    if how != "explicit":
                        norm = opt.last_grad_norm
                    opt.zero_grad()
                    # FSDP averages the ranks' grads: the mean of the ranks' losses here.
                    losses = [nn.functional.cross_entropy(ref_model(i).float(), t)
                              for i, t in (batch(step, r) for r in range(world))]
                    (sum(losses) / world).backward()
                    expected = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm, norm_type)
                    ref.step()
                    ref.zero_grad()

                    assert isinstance(norm, DTensor) and norm.placements == (Replicate(),), (what, norm)
                    value = norm.to_local()
                    assert_same_on_all_ranks(value.view(torch.int32).item(), f"{what}: norm bits")
                    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0,
                                               msg=lambda m: f"{what} step {step}: {m}")
                    clipped.append(bool(expected > max_norm))
                    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
                        torch.testing.assert_close(full(p.detach()), q.detach(), **TOL,
                                                   msg=lambda m, n=n: f"{what} step {step} {n}: {m}")
                assert any(clipped), f"{what}: max_norm never took effect"



# ---- quantized state (state_dtype="8bit"/"4bit", issue 18) -----------------------------------

QBITS = ("8bit", "4bit")


class QNet(nn.Module):
    """Params whose rows are whole quantization blocks of 64 elements (state exported as
    rows, resharded by DCP with the param): ``emb`` (11, 64), sharded 6/5 rows over 2 ranks;
    ``l1.weight`` (128, 64), 64/64; ``l2.weight`` (9, 128), 5/4; ``pos`` (1, 64), whose
    shard on rank 1 is empty. And params whose blocks depend on the shard (exported at full
    precision): ``l1.bias`` (128,), ``l2.bias`` (9,), ``gain`` (1, 9), empty on rank 1."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 64)
        self.l1 = nn.Linear(64, 128)
        self.l2 = nn.Linear(128, 9)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 9).reshape(1, 9))
        self.pos = nn.Parameter(torch.linspace(-0.2, 0.2, 64).reshape(1, 64))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx).mean(1) + self.pos
        return self.l2(torch.tanh(self.l1(h))) * self.gain


QALIGNED = {"emb.weight": 64, "l1.weight": 64, "l2.weight": 128, "pos": 64}  # name -> elements per row


def qbase(dtype=torch.float32, seed: int = 0) -> QNet:
    torch.manual_seed(seed)
    return QNet().to(dtype)


def qbatch(step: int, rank: int):
    gen = torch.Generator().manual_seed(2000 * step + rank)
    return torch.randint(0, 11, (4, 5), generator=gen), torch.randint(0, 9, (4,), generator=gen)


def qfsdp(model: nn.Module) -> nn.Module:
    fully_shard(model.l1)
    fully_shard(model)
    return model


def qopt(model: nn.Module, state_dtype: str, **kw):
    return tritonadam.AdamW(groups(model), lr=1e-2, betas=(0.9, 0.95), state_dtype=state_dtype, **kw, **LAUNCH)


def qtrain(model: nn.Module, opt, steps, ranks) -> None:
    """FSDP averages the ranks' grads: the loss is the mean over ``ranks``' batches (one
    rank's under FSDP, every rank's for a single-process model)."""
    for step in steps:
        losses = [nn.functional.cross_entropy(model(i).float(), t) for i, t in (qbatch(step, r) for r in ranks)]
        (sum(losses) / len(losses)).backward()
        opt.step()
        opt.zero_grad()


def qmoment(p: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    """Moment ``key`` of ``p``'s local shard at full precision (fp32, the local shape)."""
    lp = local(p)
    for bits in (8, 4):
        if f"{key}_{bits}bit" in state:
            flat = tritonadam.quantize.dequantize(local(state[f"{key}_{bits}bit"]).reshape(-1),
                                                  local(state[f"{key}_scales"]).reshape(-1), lp.numel(), bits,
                                                  key == "exp_avg")
            return flat.reshape(lp.shape)
    return local(state[key]).float()


def qchunk(full_value: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full_value`` along dim 0, as FSDP2 cuts it (torch.chunk:
    ceil-sized chunks; ranks past the last chunk hold an empty shard)."""
    chunks = torch.chunk(full_value, world, dim=0)
    return chunks[rank] if rank < len(chunks) else full_value[:0]


def check_quantized_internal(model: nn.Module, opt, bits: int, what: str) -> None:
    """The optimizer keeps plain local flat tensors (never DTensors) of the local shard's
    size: codes uint8, scales bf16."""
    for n, p in model.named_parameters():
        state, lp = opt.state[p], local(p)
        for key in ("exp_avg", "exp_avg_sq"):
            codes, scales = state[f"{key}_{bits}bit"], state[f"{key}_scales"]
            assert type(codes) is torch.Tensor and type(scales) is torch.Tensor, (what, n, key)
            assert codes.dim() == 1 and codes.dtype == torch.uint8, (what, n, key, codes.shape)
            assert codes.numel() == tritonadam.quantize.code_bytes(lp.numel(), bits), (what, n, key)
            assert scales.dtype == torch.bfloat16
            assert scales.numel() == tritonadam.quantize.num_scales(lp.numel()), (what, n, key)
            assert key not in state, (what, n, key)


def check_exported(model: nn.Module, osd: dict, bits: int, full_sd: bool, what: str) -> None:
    """``get_optimizer_state_dict``: params whose rows are whole blocks export codes and
    scales shaped (rows, row * bits / 8) and (rows, row / 64) (DTensors sharded like the
    param, or full tensors); the others a code and a scale per element, shaped like the
    param; always under the keys the optimizer's state holds."""
    for n, p in model.named_parameters():
        state = osd["state"][n]
        assert isinstance(state["step"], torch.Tensor) and not isinstance(state["step"], DTensor)
        for key in ("exp_avg", "exp_avg_sq"):
            if n in QALIGNED:
                row = QALIGNED[n]
                want = {f"{key}_{bits}bit": ((p.shape[0], row * bits // 8), torch.uint8),
                        f"{key}_scales": ((p.shape[0], row // 64), torch.bfloat16)}
                assert key not in state, (what, n, sorted(state))
            else:
                want = {f"{key}_{bits}bit": (tuple(p.shape), torch.uint8),
                        f"{key}_scales": (tuple(p.shape), torch.bfloat16)}
                assert key not in state, (what, n, sorted(state))
            for k, (shape, dtype) in want.items():
                v = state[k]
                assert tuple(v.shape) == shape and v.dtype == dtype, (what, n, k, v.shape, v.dtype)
                if full_sd:
                    assert not isinstance(v, DTensor), (what, n, k)
                else:
                    assert isinstance(v, DTensor) and v.placements == p.placements, (what, n, k)


def qsnapshot(model: nn.Module, opt) -> list:
    out = []
    for p in model.parameters():
        state = {k: local(v).detach().clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        out.append((local(p).detach().clone(), state))
    return out


def assert_same_qsnapshot(a: list, b: list, what: str) -> None:
    for i, ((pa, sa), (pb, sb)) in enumerate(zip(a, b)):
        assert torch.equal(pa, pb), f"{what}: param {i} differs by {(pa.float() - pb.float()).abs().max()}"
        assert sa.keys() == sb.keys(), (what, i, sorted(sa), sorted(sb))
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (
                f"{what}: param {i} state {k!r} differs in {int((sa[k] != sb[k]).sum())} of {sa[k].numel()}")


QCONFIGS = {  # label -> (bits, param dtype, options)
    "8bit": (8, torch.float32, {}),
    "4bit": (4, torch.float32, {}),
    "8bit-bf16-remainder": (8, torch.bfloat16, {"master_weights": "remainder"}),
    "4bit-bf16-remainder": (4, torch.bfloat16, {"master_weights": "remainder"}),
}


def fsdp2_quantized(rank: int, world: int, tmpdir: str) -> None:
    """Quantized state under FSDP2 against one process stepping the whole params.

    Each step the single-process optimizer gets the very grads FSDP reduced (gathered):
    params whose shards start on a quantization block (rows of a multiple of 64 elements,
    and ``l1.bias``/``gain``, whose shards happen to fall on block boundaries) step bit for
    bit alike, codes included (each rank's codes are a slice of the whole tensor's); for
    ``l2.bias`` (shards 5/4: blocks counted from each shard's start) the two differ by
    quantization error. An independent single-process run (its own loss over both ranks'
    batches) stays within quantization error everywhere. State stays plain local flat
    tensors; ``get_optimizer_state_dict`` exports rows of codes (DTensor, or full) for
    aligned params and a code and a scale per element for the others; sharded and full
    state dicts round trip through ``set_optimizer_state_dict`` bit for bit.
    """
    ranks = range(world)
    observed = {}
    for label, (bits, dtype, kw) in QCONFIGS.items():
        base = qbase(dtype)
        model, whole = qfsdp(copy.deepcopy(base)), copy.deepcopy(base)
        opt, wopt = qopt(model, f"{bits}bit", **kw), qopt(whole, f"{bits}bit", **kw)
        for step in range(2):
            idx, target = qbatch(step, rank)
            nn.functional.cross_entropy(model(idx).float(), target).backward()
            for p, q in zip(model.parameters(), whole.parameters()):
                q.grad = full(p.grad).clone()
            opt.step()
            wopt.step()
            opt.zero_grad()
            wopt.zero_grad()
        check_quantized_internal(model, opt, bits, label)
        wp = dict(whole.named_parameters())
        for n, p in model.named_parameters():
            q = wp[n]
            mine = local(p).detach()
            theirs = qchunk(q.detach(), rank, world)
            if n == "l2.bias":  # blocks differ: quantization error
                diff = (full(p.detach()).float() - q.detach().float()).abs().max().item()
                moved = (q.detach().float() - base.state_dict()[n].float()).abs().max().item()
                observed[label] = (diff, moved)
                assert diff <= {8: 2e-4, 4: 5e-3}[bits], (label, n, diff)
                continue
            assert torch.equal(mine, theirs), (label, n, (mine.float() - theirs.float()).abs().max())
            for key in ("exp_avg", "exp_avg_sq"):
                ck = f"{key}_{bits}bit"
                lo = sum(local_numel for local_numel in _shard_numels(q, world)[:rank])
                codes = wopt.state[q][ck]
                start = lo * bits // 8  # lo is a multiple of 64
                stop = start + tritonadam.quantize.code_bytes(mine.numel(), bits)
                assert torch.equal(opt.state[p][ck], codes[start:stop]), (label, n, key)
        if label == "8bit":
            indep = copy.deepcopy(base)
            iopt = qopt(indep, f"{bits}bit", **kw)
            qtrain(indep, iopt, range(2), ranks)
            for n, p in model.named_parameters():
                torch.testing.assert_close(full(p.detach()), dict(indep.named_parameters())[n].detach(),
                                           atol=2e-4, rtol=0, msg=lambda m, n=n: f"independent {n}: {m}")
        if label not in ("4bit", "8bit-bf16-remainder"):
            continue  # state dicts: one config of each bit width
        # Exported state dicts, sharded and full.
        sharded = get_optimizer_state_dict(model, opt)
        check_exported(model, sharded, bits, False, label)
        full_osd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True)))
        check_exported(model, full_osd, bits, True, label)
        for n, q in whole.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                got = full_osd["state"][n]
                if n in QALIGNED:  # the whole tensor's codes, as rows
                    assert torch.equal(got[f"{key}_{bits}bit"].reshape(-1), wopt.state[q][f"{key}_{bits}bit"])
                elif n != "l2.bias":  # per element: decoded, what the whole tensor's codes decode to
                    decoded = tritonadam.quantize.dequantize_per_element(
                        got[f"{key}_{bits}bit"], got[f"{key}_scales"], bits, key == "exp_avg")
                    assert torch.equal(decoded, qmoment(q, wopt.state[q], key)), (label, n, key)
            if "master_weights" in kw:  # the remainder exported as the fp32 master it stands for
                master = full_osd["state"][n]["master_param"]
                assert master.dtype == torch.float32 and not isinstance(master, DTensor)
                high, _ = tritonadam.state.split_master(master)
                assert torch.equal(high, full(dict(model.named_parameters())[n].detach())), (label, n)
        # Round trips into fresh optimizers, then one more step of each: bit for bit.
        for how in ("sharded", "full"):
            options = StateDictOptions(full_state_dict=how == "full")
            source = sharded if how == "sharded" else full_osd
            fresh = qfsdp(qbase(dtype, seed=5))
            fresh.load_state_dict(model.state_dict()) if how == "sharded" else set_model_state_dict(
                fresh, {n: full(v) for n, v in model.state_dict().items()}, options=options)
            fopt = qopt(fresh, f"{bits}bit", **kw)
            set_optimizer_state_dict(fresh, fopt, copy.deepcopy(source) if how == "full" else source,
                                     options=options)
            assert_same_qsnapshot(qsnapshot(model, opt), qsnapshot(fresh, fopt), f"{label} {how} round trip")
        qtrain(model, opt, range(2, 3), [rank])
        qtrain(fresh, fopt, range(2, 3), [rank])
        assert_same_qsnapshot(qsnapshot(model, opt), qsnapshot(fresh, fopt), f"{label} after round trip")
    if rank == 0:
        print("fsdp2_quantized l2.bias (shards 5/4) vs single process, max |diff| and max move:",
              {k: (f"{d:.2e}", f"{m:.2e}") for k, (d, m) in observed.items()}, flush=True)


QDCP = {"8bit": QCONFIGS["8bit"], "4bit-bf16-remainder": QCONFIGS["4bit-bf16-remainder"]}
QDATA_RANKS = 2  # every run trains on the batches of 2 ranks (one process: their mean loss)
# Params after 3 more steps from a checkpoint saved on one world size and loaded on the
# other, against the uninterrupted run: blocks of unaligned params change with the shards,
# and grads are reduced in another order.
QRESHARD_ATOL = {8: 4e-4, 4: 6e-3}


# World 0: one process without a process group (DCP's no-distributed mode), an unsharded
# model whose optimizer exports the same forms as FSDP2's.
def _qmodel(world: int, dtype, seed: int = 0) -> nn.Module:
    return qfsdp(qbase(dtype, seed)) if world else qbase(dtype, seed)


def _qpaths(tmpdir: str, world: int, label: str) -> dict:
    stem = os.path.join(tmpdir, f"q_w{world}_{label}")
    return {"dcp": stem + "_dcp", "full": stem + "_full.pt", "final": stem + "_final.pt"}


def _qranks(rank: int, world: int) -> list[int]:
    return [rank] if world == QDATA_RANKS else list(range(QDATA_RANKS))


def _qsave(rank: int, world: int, tmpdir: str) -> None:
    """3 steps, dcp.save (and the full optimizer state dict, to check the load against),
    3 more steps: the uninterrupted run's final params."""
    for label, (bits, dtype, kw) in QDCP.items():
        paths = _qpaths(tmpdir, world, label)
        model = _qmodel(world, dtype)
        opt = qopt(model, f"{bits}bit", **kw)
        qtrain(model, opt, range(3), _qranks(rank, world))
        msd, osd = get_state_dict(model, opt)
        check_exported(model, osd, bits, world == 0, f"{label} saved on {world}")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=paths["dcp"])
        full_osd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True)))
        qtrain(model, opt, range(3, 6), _qranks(rank, world))
        final = full_params(model)
        if rank == 0:
            torch.save(full_osd, paths["full"])
            torch.save(final, paths["final"])
        if world:
            dist.barrier()


def _qload(rank: int, world: int, tmpdir: str, saved_world: int) -> None:
    """Load the checkpoint the other world size saved (resharded by DCP): each local shard's
    state is the saved one's rows (aligned params: the codes themselves; the others: their
    per-element codes and scales decoded and re-encoded in this shard's blocks); 3 more
    steps stay within quantization error of the uninterrupted run."""
    for label, (bits, dtype, kw) in QDCP.items():
        paths = _qpaths(tmpdir, saved_world, label)
        model = _qmodel(world, dtype, seed=9)  # other values: the load must overwrite them
        opt = qopt(model, f"{bits}bit", **kw)
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=paths["dcp"])
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        saved = torch.load(paths["full"], weights_only=True)["state"]
        check_quantized_internal(model, opt, bits, f"{label} loaded")
        for n, p in model.named_parameters():
            state, what = opt.state[p], f"{label} {saved_world}->{world} {n}"
            assert state["step"].item() == 3, what
            for key in ("exp_avg", "exp_avg_sq"):
                ck, sk = f"{key}_{bits}bit", f"{key}_scales"
                if n in QALIGNED:
                    want = tuple(qchunk(saved[n][k], rank, max(world, 1)).reshape(-1) for k in (ck, sk))
                else:  # a code and a scale per element: decoded, re-encoded in this shard's blocks
                    codes, scales = (qchunk(saved[n][k], rank, max(world, 1)).reshape(-1) for k in (ck, sk))
                    shard = tritonadam.quantize.dequantize_per_element(codes, scales, bits, key == "exp_avg")
                    want = tritonadam.quantize.requantize(shard, bits, key == "exp_avg")
                assert torch.equal(state[ck], want[0]), (what, key)
                assert torch.equal(state[sk].view(torch.int16), want[1].view(torch.int16)), (what, key)
            if "master_weights" in kw:
                master = tritonadam.state.join_master(local(p).detach(), local(state["master_param_remainder"]))
                assert torch.equal(master, qchunk(saved[n]["master_param"], rank, max(world, 1))), what
        qtrain(model, opt, range(3, 6), _qranks(rank, world))
        final = torch.load(paths["final"], weights_only=True)
        diffs = {n: (full(p.detach()).float() - final[n].float()).abs().max().item()
                 for n, p in model.named_parameters()}  # full(): a collective, on every rank
        if rank == 0:
            print(f"resharded {label} {saved_world}->{world}: max |diff| to the uninterrupted run",
                  {n: f"{d:.1e}" for n, d in diffs.items()}, flush=True)
        for n, p in model.named_parameters():
            torch.testing.assert_close(full(p.detach()).float(), final[n].float(), atol=QRESHARD_ATOL[bits], rtol=0,
                                       msg=lambda m, n=n: f"{label} {saved_world}->{world} {n}: {m}")


def fsdp2_quantized_flatten(rank: int, world: int, tmpdir: str) -> None:
    """See ``check_flattened_round_trip``."""
    check_flattened_round_trip(rank)


def fsdp2_quantized_dcp_save1(rank: int, world: int, tmpdir: str) -> None:
    """One rank saves a checkpoint (and its uninterrupted run) for 2 ranks to load."""
    assert world == 1
    _qsave(rank, world, tmpdir)


def fsdp2_quantized_dcp_world2(rank: int, world: int, tmpdir: str) -> None:
    """Two ranks load the checkpoint one rank saved, then save one for one rank to load."""
    assert world == 2
    _qload(rank, world, tmpdir, saved_world=1)
    _qsave(rank, world, tmpdir)


def fsdp2_quantized_dcp_load1(rank: int, world: int, tmpdir: str) -> None:
    """One rank loads the checkpoint 2 ranks saved."""
    assert world == 1
    _qload(rank, world, tmpdir, saved_world=2)


def quantized_dcp_alone(rank: int, world: int, tmpdir: str) -> None:
    """One process without a process group (an unsharded model) loads the checkpoint 2
    ranks saved, then saves one for 2 ranks to load: its optimizer exports the forms
    FSDP2's does (per element where blocks do not fall on rows), so DCP reads each into
    the other."""
    assert world == 0 and not dist.is_initialized()
    _qload(rank, world, tmpdir, saved_world=2)
    _qsave(rank, world, tmpdir)


def fsdp2_quantized_dcp_from_alone(rank: int, world: int, tmpdir: str) -> None:
    """Two ranks load the checkpoint one process without a process group saved, by DCP and
    as its full state dict."""
    assert world == 2
    _qload(rank, world, tmpdir, saved_world=0)
    _qload_full(rank, world, tmpdir, saved_world=0)


def _qload_full(rank: int, world: int, tmpdir: str, saved_world: int) -> None:
    """The full optimizer state dict the other world size saved, through
    ``set_optimizer_state_dict(full_state_dict=True)``, given to every rank and to rank 0
    alone (``broadcast_from_rank0``): torch scatters or broadcasts every state tensor the
    receiver holds before any load hook runs, so a state dict holds nothing gloo cannot
    move (one process exported the remainder master as int16 until 2026-12-06, and gloo
    failed with "Invalid scalar type"). Each shard gets the saved rows."""
    for label, (bits, dtype, kw) in QDCP.items():
        saved = torch.load(_qpaths(tmpdir, saved_world, label)["full"], weights_only=True)
        if "master_weights" in kw:
            assert all(e["master_param_remainder"].dtype == torch.int32 for e in saved["state"].values()), label
        for broadcast in (False, True):
            what = f"{label} {saved_world}->{world} full, broadcast_from_rank0={broadcast}"
            model = _qmodel(world, dtype, seed=9)
            opt = qopt(model, f"{bits}bit", **kw)
            # the checkpoint's params (the remainder is the low half under them)
            sd = {"model": get_state_dict(model, opt)[0]}
            dcp.load(sd, checkpoint_id=_qpaths(tmpdir, saved_world, label)["dcp"])
            set_model_state_dict(model, sd["model"])
            given = copy.deepcopy(saved) if rank == 0 or not broadcast else {}
            set_optimizer_state_dict(model, opt, given,
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast))
            full_state = opt.torch_state_dict()["state"]
            index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
            for n, p in model.named_parameters():
                i = index[id(p)]
                assert opt.state[p]["step"].item() == 3, (what, n)
                if "master_weights" in kw:
                    assert opt.state[p]["master_param_remainder"].dtype == torch.int16, (what, n)
                    assert torch.equal(local(full_state[i]["master_param"]),
                                       qchunk(saved["state"][n]["master_param"], rank, world)), (what, n)


class QAligned(nn.Module):
    """Only params whose rows are whole quantization blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 64)
        self.l1 = nn.Linear(64, 128, bias=False)
        self.l2 = nn.Linear(128, 9, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(self.emb(idx).mean(1))))


def check_flattened_round_trip(rank: int) -> None:
    """``StateDictOptions(flatten_optimizer_state_dict=True)``: torch unflattens by the
    loading optimizer's own state keys, and every key the state holds is exported under
    itself (codes and scales as rows where rows are whole blocks, else a code and a scale
    per element; the bf16 remainder master as itself, beside the fp32 master it stands
    for): the round trip is bit for bit for every param, and training continues so."""
    options = StateDictOptions(flatten_optimizer_state_dict=True)

    def one_group(model, bits, **kw):  # torch's unflattening fails on an empty param group
        return tritonadam.AdamW(model.parameters(), lr=1e-2, state_dtype=f"{bits}bit", **kw, **LAUNCH)

    cases = [(bits, make, torch.float32, {}) for bits in (8, 4) for make in (QAligned, QNet)]
    cases.append((8, QNet, torch.bfloat16, {"master_weights": "remainder"}))
    for bits, make, dtype, kw in cases:
        what = f"{bits}-bit {make.__name__} {dtype} {kw}"
        torch.manual_seed(0)
        model = qfsdp(make().to(dtype))
        opt = one_group(model, bits, **kw)
        qtrain(model, opt, range(2), [rank])
        flat = get_optimizer_state_dict(model, opt, options=options)
        assert all(k.startswith(("state.", "param_groups.")) for k in flat), sorted(flat)[:5]
        for n, p in model.named_parameters():
            for key in opt.state[p]:
                assert f"state.{n}.{key}" in flat, (what, n, key)
        torch.manual_seed(3)
        fresh = qfsdp(make().to(dtype))
        fopt = one_group(fresh, bits, **kw)
        qtrain(fresh, fopt, range(1), [rank])  # state of its own, overwritten by the load
        fresh.load_state_dict(model.state_dict())
        set_optimizer_state_dict(fresh, fopt, flat, options=options)
        assert_same_qsnapshot(qsnapshot(model, opt), qsnapshot(fresh, fopt), f"{what} flattened")
        qtrain(model, opt, range(2, 3), [rank])
        qtrain(fresh, fopt, range(2, 3), [rank])
        assert_same_qsnapshot(qsnapshot(model, opt), qsnapshot(fresh, fopt), f"{what} after")


def _shard_numels(p: torch.Tensor, world: int) -> list[int]:
    return [qchunk(p.detach(), r, world).numel() for r in range(world)]


def zero_redundancy(rank: int, world: int, tmpdir: str) -> None:
    """torch's ZeroRedundancyOptimizer (ZeRO-1 over DDP) with ours as its optimizer_class:
    each rank steps the params of its partition, ZeRO broadcasts them. Ours tracks torch.optim
    (AdamW, Adam with AMSGrad, Adamax; two param groups, clipping) through a checkpoint:
    ``consolidate_state_dict`` then ``state_dict`` on rank 0, loaded into a fresh ZeRO on
    every rank. ZeRO's load writes each rank's share straight into the local optimizer's
    state (step counts moved to the CPU), bypassing its ``load_state_dict``: our step takes
    that state as it finds it. With 8-bit and 4-bit state (and a bf16 model with a remainder
    master), ZeRO matches plain DDP with the same optimizer bit for bit, checkpoint included:
    a param's codes are the same whichever rank steps it."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    def checkpoint(opt):
        opt.consolidate_state_dict(to=0)
        sd = [opt.state_dict() if rank == 0 else None]
        dist.broadcast_object_list(sd, src=0)
        return sd[0]

    def zero(model, cls, **kw):
        return ZeroRedundancyOptimizer(groups(model), optimizer_class=cls, lr=1e-2, **kw)

    base = base_model()
    # A fused clip would measure each rank's partition: refused when ZeRO builds it.
    try:
        zero(DDP(copy.deepcopy(base)), tritonadam.AdamW, max_grad_norm=1.0)
    except NotImplementedError as err:
        assert "torch.nn.utils.clip_grad_norm_" in str(err), err
    else:
        raise AssertionError("max_grad_norm under ZeroRedundancyOptimizer was not refused")
    tritonadam.AdamW(groups(base), max_grad_norm=1.0)  # outside ZeRO: fine
    local = zero(DDP(copy.deepcopy(base)), tritonadam.AdamW).optim  # and its own clip
    for copied in (local, copy.deepcopy(local), pickle.loads(pickle.dumps(local))):
        try:
            copied.clip_grad_norm_(1.0)
        except NotImplementedError as err:
            assert "partition" in str(err) and "torch.nn.utils.clip_grad_norm_" in str(err), err
        else:
            raise AssertionError("clip_grad_norm_ of ZeroRedundancyOptimizer's local optimizer was not refused")
    for name, (ours_cls, torch_cls) in PAIRS.items():
        runs = {}
        for ours in (True, False):
            cls, extra = (ours_cls, LAUNCH) if ours else (torch_cls, {"foreach": False})
            model = DDP(copy.deepcopy(base))
            opt = zero(model, cls, **KWARGS[name], **extra)
            train(model, opt, rank, range(3), clip=1.0)
            sd = checkpoint(opt)
            opt = zero(model, cls, **KWARGS[name], **extra)
            opt.load_state_dict(copy.deepcopy(sd))
            train(model, opt, rank, range(3, 5), clip=1.0)
            runs[ours] = ([p.detach().clone() for p in model.parameters()], sd)
        (o_params, o_sd), (t_params, t_sd) = runs[True], runs[False]
        for p, q in zip(o_params, t_params):
            torch.testing.assert_close(p, q, msg=lambda m: f"ZeRO {name}: {m}", **TOL)
        assert_same_on_all_ranks([p.tolist() for p in o_params], f"ZeRO {name} params")
        if rank == 0:
            assert o_sd["state"].keys() == t_sd["state"].keys()
            for index, r in t_sd["state"].items():
                s = o_sd["state"][index]
                assert (s is None) == (r is None) and (r is None or s.keys() == r.keys()), (name, index)
                for key in r or {}:
                    torch.testing.assert_close(s[key], r[key], **TOL)

    for dtype, state_dtype, master in ((torch.float32, "8bit", False), (torch.float32, "4bit", False),
                                       (torch.bfloat16, "8bit", "remainder")):
        what = f"ZeRO {state_dtype} {dtype}"
        kw = dict(weight_decay=0.1, state_dtype=state_dtype, master_weights=master, **LAUNCH)
        zmodel, dmodel = (DDP(copy.deepcopy(base).to(dtype)) for _ in range(2))
        zopt = zero(zmodel, tritonadam.AdamW, **kw)
        dopt = tritonadam.AdamW(groups(dmodel), lr=1e-2, **kw)
        train(zmodel, zopt, rank, range(3))
        sd = checkpoint(zopt)
        local_keys = {k for state in zopt.optim.state.values() for k in state}
        assert {f"exp_avg_{state_dtype}", f"exp_avg_sq_{state_dtype}"} <= local_keys, (what, local_keys)
        zopt = zero(zmodel, tritonadam.AdamW, **kw)
        zopt.load_state_dict(sd)
        train(zmodel, zopt, rank, range(3, 5))
        train(dmodel, dopt, rank, range(5))
        for (n, p), q in zip(zmodel.named_parameters(), dmodel.parameters()):
            assert torch.equal(p, q), (what, n, (p.float() - q.float()).abs().max())
        assert_same_on_all_ranks([p.float().tolist() for p in zmodel.parameters()], f"{what} params")


def _xopt(model: nn.Module, options: dict):
    """An optimizer of ``options`` ({"torch": True} for torch.optim.AdamW)."""
    if options.get("torch"):
        return torch.optim.AdamW(groups(model), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    return tritonadam.AdamW(groups(model), lr=1e-2, betas=(0.9, 0.95), **options, **LAUNCH)


def _expected_moment(opt, p, key: str, options: dict) -> torch.Tensor:
    """What a receiver of ``options`` must hold for ``p``'s moment ``key`` from ``opt``:
    the source's local moment at full precision, in the receiver's format (quantized
    afresh from this shard's first element, as its step would)."""
    value = qmoment(p, opt.state[p], key)
    bits = {"8bit": 8, "4bit": 4}.get(options.get("state_dtype"))
    if bits is None:
        return value
    codes, scales = tritonadam.quantize.requantize(value.reshape(-1), bits, key == "exp_avg")
    return tritonadam.quantize.dequantize(codes, scales, value.numel(), bits, key == "exp_avg").reshape(value.shape)


def fsdp2_full_state_cross_options(rank: int, world: int, tmpdir: str) -> None:
    """torch's full optimizer state dict (``full_state_dict=True``) loaded into optimizers
    of other state options, given to every rank or to rank 0 alone
    (``broadcast_from_rank0=True``): the keys the receiver lacks arrive whole on the ranks
    given the checkpoint (torch distributes or broadcasts only the receiver's own; from
    rank 0 ours sends the rest), and each rank converts its part. Under FSDP2 with shards
    of every kind (rows of whole blocks, blocks split by the shards, empty shards), and on
    a replicated model (DDP), whose int16 remainder masters a process group's collectives
    move as int32."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    cases = [
        (qfsdp, torch.float32, {"state_dtype": "8bit"}, {}),
        (qfsdp, torch.float32, {"torch": True}, {"state_dtype": "8bit"}),
        (qfsdp, torch.float32, {"state_dtype": "8bit"}, {"state_dtype": "4bit"}),
        (qfsdp, torch.float32, {}, {"state_dtype": "4bit", "amsgrad": False}),
        (qfsdp, torch.bfloat16, {"state_dtype": "4bit", "master_weights": "remainder"}, {"master_weights": True}),
        (DDP, torch.bfloat16, {"master_weights": "remainder"}, {"master_weights": "remainder"}),
        (DDP, torch.float32, {"torch": True}, {"state_dtype": "8bit"}),
        (DDP, torch.bfloat16, {"master_weights": True}, {"state_dtype": "4bit", "master_weights": "remainder"}),
        # a seed (one value per param) that the receiver lacks, and one it takes over
        (qfsdp, torch.bfloat16, {"stochastic_rounding": True, "state_dtype": "8bit", "seed": 5}, {}),
        (qfsdp, torch.bfloat16, {"stochastic_rounding": True, "seed": 5},
         {"stochastic_rounding": True, "state_dtype": "4bit", "seed": 9}),
    ]
    everywhere = StateDictOptions(full_state_dict=True)
    from_rank0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for wrap, dtype, source, receiver in cases:
        model = wrap(qbase(dtype))
        opt = _xopt(model, source)
        qtrain(model, opt, range(2), [rank])
        saved = copy.deepcopy(get_optimizer_state_dict(model, opt, options=everywhere))
        saved_params = [local(p).detach().clone() for p in model.parameters()]
        if source.get("master_weights") == "remainder":  # collectives have no int16
            assert all(s["master_param_remainder"].dtype == torch.int32 for s in saved["state"].values())
        stepped = []
        for opts in (everywhere, from_rank0):
            what = f"{wrap.__name__} {source} -> {receiver}, broadcast_from_rank0={opts.broadcast_from_rank0}"
            fresh = _xopt(model, receiver)
            # Users' hooks that copy what they get: torch's load template and the loaded
            # dict pass through them (no stand-in seed may show there, nor survive a copy).
            hooked = []
            fresh.register_state_dict_post_hook(lambda o, sd: copy.deepcopy(sd))
            fresh.register_load_state_dict_pre_hook(lambda o, sd: hooked.append(copy.deepcopy(sd)) or hooked[-1])
            given = copy.deepcopy(saved) if rank == 0 or not opts.broadcast_from_rank0 else {}
            set_optimizer_state_dict(model, fresh, given, options=opts)
            seeds = [int(e["rounding_seed"]) for e in hooked[-1]["state"].values() if "rounding_seed" in e]
            assert seeds == ([source["seed"]] * len(seeds) if source.get("stochastic_rounding") else []), (what, seeds)
            for n, p in model.named_parameters():
                state = fresh.state[p]
                assert float(state["step"]) == 2, (what, n)
                assert ("rounding_seed" in state) == bool(receiver.get("stochastic_rounding")), (what, n)
                if source.get("stochastic_rounding") and receiver.get("stochastic_rounding"):
                    assert int(state["rounding_seed"]) == source["seed"], (what, n)
                for key in ("exp_avg", "exp_avg_sq"):
                    want = _expected_moment(opt, p, key, receiver)
                    assert torch.equal(qmoment(p, state, key), want), (
                        what, n, key, (qmoment(p, state, key) - want).abs().max())
                if source.get("master_weights") == "remainder":
                    joined = tritonadam.state.join_master(local(p), local(opt.state[p]["master_param_remainder"]))
                    if receiver.get("master_weights") is True:
                        assert torch.equal(local(state["master_param"]), joined), (what, n)
                    else:
                        remainder = local(state["master_param_remainder"])
                        assert remainder.dtype == torch.int16, (what, n)
                        assert torch.equal(tritonadam.state.join_master(local(p), remainder), joined), (what, n)
            qtrain(model, fresh, range(2, 3), [rank])  # and it steps
            stepped.append([local(p).detach().clone() for p in model.parameters()])
            with torch.no_grad():  # back to the checkpoint's params for the next load
                for p, q in zip(model.parameters(), saved_params):
                    local(p).copy_(q)
        for a, b in zip(*stepped):
            assert torch.equal(a, b), what
        assert_same_on_all_ranks([full(p).float().tolist() for p in model.parameters()], what)


def sr_replicas_agree(rank: int, world: int, tmpdir: str) -> None:
    """Stochastic rounding on replicated DTensor params (HSDP's replicate dim, a plain
    Replicate() param) with the same seed on every rank: replicas with equal grads stay
    bit for bit equal (their random streams were keyed by the global rank, and drifted
    apart), while the shards of a Shard(0) param still draw numbers of their own."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    for kw in (dict(stochastic_rounding=True), dict(state_dtype="8bit", stochastic_rounding=True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).bfloat16()
        fully_shard(model, mesh=init_device_mesh("cpu", (world, 1), mesh_dim_names=("rep", "shard")))
        opt = tritonadam.AdamW(model.parameters(), lr=1e-3, seed=7, **kw, **LAUNCH)
        for step in range(3):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).bfloat16()
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        for name, p in model.named_parameters():
            assert_same_on_all_ranks(local(p).float().tolist(), f"HSDP {name} {kw}")
        mesh = init_device_mesh("cpu", (world,))
        base = torch.randn(64 * world, generator=torch.Generator().manual_seed(1)).bfloat16()
        replicated = nn.Parameter(distribute_tensor(base.clone(), mesh, [Replicate()]))
        sharded = nn.Parameter(distribute_tensor(base.view(world, 64).clone(), mesh, [Shard(0)]))
        opt = tritonadam.AdamW([replicated, sharded], lr=1e-3, seed=7, **kw, **LAUNCH)
        for step in range(3):
            g = torch.randn(64 * world, generator=torch.Generator().manual_seed(10 + step)).bfloat16()
            replicated.grad = distribute_tensor(g.clone(), mesh, [Replicate()])
            # every shard the same grads and values: only the random numbers differ
            sharded.grad = distribute_tensor(g[:64].repeat(world, 1), mesh, [Shard(0)])
            opt.step()
        assert_same_on_all_ranks(local(replicated).float().tolist(), f"Replicate() {kw}")
        shards = [None] * world
        dist.all_gather_object(shards, local(sharded).float().tolist())
        assert shards[0] != shards[1], f"Shard(0) shards drew the same numbers {kw}"


def fsdp2_unsharded_quantized_full_state(rank: int, world: int, tmpdir: str) -> None:
    """A full state dict of an unsharded model's 8-bit/4-bit state loaded into FSDP2
    through torch's set_optimizer_state_dict. Exported in a process group (DDP), a 1-D
    param's state is a code and a scale per element: it loads (one process exports the
    same). Flat block codes with a scale per block of the whole param (the in-memory form,
    and what one process saved before 2026-12-05): torch splits codes and scales
    along dim 0 apart, so a shard starting inside a block read other blocks' scales (rank
    1 off by its shard's largest moment, silently); refused on every rank, the params
    untouched. The documented route, ``opt.load_state_dict`` on the unsharded dict, loads
    and steps."""
    class Bias(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.randn(200, generator=torch.Generator().manual_seed(4)))

    from torch.distributed.tensor import distribute_tensor

    for bits in ("8bit", "4bit"):
        single = Bias()
        sopt = tritonadam.AdamW(single.parameters(), lr=1e-2, state_dtype=bits, **LAUNCH)
        for step in range(2):
            single.b.grad = torch.randn(200, generator=torch.Generator().manual_seed(10 + step))
            sopt.step()
        osd = get_optimizer_state_dict(single, sopt, options=StateDictOptions(full_state_dict=True))
        # In a process group (here, DDP) the export is a code and a scale per element, which
        # any sharding splits right: it loads through torch's API.
        assert osd["state"]["b"][f"exp_avg_{bits}"].numel() == 200
        assert osd["state"]["b"]["exp_avg_scales"].numel() == 200
        model = Bias()
        model.load_state_dict(single.state_dict())
        fully_shard(model)
        opt = tritonadam.AdamW(model.parameters(), lr=1e-2, state_dtype=bits, **LAUNCH)
        set_optimizer_state_dict(model, opt, copy.deepcopy(osd), options=StateDictOptions(full_state_dict=True))
        # each shard's moments re-encoded in its own blocks, exactly
        lo, n = local(model.b).numel() * rank, local(model.b).numel()
        for key in ("exp_avg", "exp_avg_sq"):
            saved = sopt.torch_state_dict()["state"][0][key][lo:lo + n]
            nb = int(bits[0])
            q = tritonadam.quantize
            expected = q.dequantize(*q.requantize(saved, nb, key == "exp_avg"), n, nb, key == "exp_avg")
            assert torch.equal(local(opt.torch_state_dict()["state"][0][key]), expected), (bits, key)
        # The in-memory form (as an older checkpoint of one process held it): flat block
        # codes with a scale per block of the whole param.
        for key in ("exp_avg", "exp_avg_sq"):
            osd["state"]["b"][f"{key}_{bits}"] = sopt.state[single.b][f"{key}_{bits}"].clone()
            osd["state"]["b"][f"{key}_scales"] = sopt.state[single.b][f"{key}_scales"].clone()
        assert osd["state"]["b"]["exp_avg_scales"].numel() == 4
        model = Bias()
        model.load_state_dict(single.state_dict())
        fully_shard(model)
        opt = tritonadam.AdamW(model.parameters(), lr=1e-2, state_dtype=bits, **LAUNCH)
        try:
            set_optimizer_state_dict(model, opt, copy.deepcopy(osd), options=StateDictOptions(full_state_dict=True))
        except ValueError as e:
            assert "scale per block" in str(e), e
            refused = True
        else:
            refused = False
        assert_same_on_all_ranks(refused, f"{bits}: refused")
        assert refused, bits
        assert torch.equal(model.b.full_tensor(), single.b.detach()), bits  # (torch's init step is lr 0)
        opt.load_state_dict(copy.deepcopy(sopt.state_dict()))
        g = torch.randn(200, generator=torch.Generator().manual_seed(12))
        model.b.grad = distribute_tensor(g, model.b.device_mesh, model.b.placements)
        opt.step()
        assert torch.isfinite(local(model.b)).all()

    # Shards that start on blocks of the whole param (1-D in halves of 8 blocks, 8 rows of
    # 96 elements: 12 blocks) and a Replicate() param: the block form splits right, and loads
    # exactly (it was refused too).
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate

    class Aligned(nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(5)
            self.a = nn.Parameter(torch.randn(512 * world, generator=gen))
            self.w = nn.Parameter(torch.randn(8 * world, 96, generator=gen))

    single = Aligned()
    sopt = tritonadam.AdamW(single.parameters(), lr=1e-2, state_dtype="8bit", **LAUNCH)
    for step in range(2):
        for p in single.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(20 + step))
        sopt.step()
    osd = get_optimizer_state_dict(single, sopt, options=StateDictOptions(full_state_dict=True))
    for name, p in single.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):  # as one process saves them
            osd["state"][name][f"{key}_8bit"] = sopt.state[p][f"{key}_8bit"].clone()
            osd["state"][name][f"{key}_scales"] = sopt.state[p][f"{key}_scales"].clone()
    model = Aligned()
    model.load_state_dict(single.state_dict())
    fully_shard(model)
    opt = tritonadam.AdamW(model.parameters(), lr=1e-2, state_dtype="8bit", **LAUNCH)
    set_optimizer_state_dict(model, opt, copy.deepcopy(osd), options=StateDictOptions(full_state_dict=True))
    exact = sopt.torch_state_dict()["state"]
    for i, p in enumerate(model.parameters()):
        n = local(p).numel()
        for key in ("exp_avg", "exp_avg_sq"):
            got = local(opt.torch_state_dict()["state"][i][key]).flatten()
            assert torch.equal(got, exact[i][key].flatten()[rank * n:(rank + 1) * n]), (i, key)
    mesh = init_device_mesh("cpu", (world,))
    rep = nn.Parameter(distribute_tensor(single.a.detach().clone(), mesh, [Replicate()]))
    ropt = tritonadam.AdamW([rep], lr=1e-2, state_dtype="8bit", **LAUNCH)
    one = {"state": {0: {"step": torch.tensor(2.0), **{k: v.clone() for k, v in sopt.state[single.a].items()
                                                       if k != "step"}}},
           "param_groups": [dict(sopt.state_dict()["param_groups"][0], params=[0])]}
    for k in ("exp_avg_8bit", "exp_avg_scales", "exp_avg_sq_8bit", "exp_avg_sq_scales"):
        one["state"][0][k] = distribute_tensor(one["state"][0][k], mesh, [Replicate()])
    ropt.load_state_dict(one)
    assert torch.equal(local(ropt.torch_state_dict()["state"][0]["exp_avg"]), exact[0]["exp_avg"])


def fsdp2_quantized_values_refused_everywhere(rank: int, world: int, tmpdir: str) -> None:
    """Negative second-moment scales (a block's absmax is never below 0; read as they are,
    the step writes NaN) in one rank's shard only: set_optimizer_state_dict refuses the
    checkpoint on every rank (the ranks' value checks are all-reduced), sharded and from
    rank 0 alone (rank 0 checks its own shard first, then every rank its own), with
    params untouched, and the optimizer steps on. The state too, sharded; broadcast from
    rank 0, torch copies the shards into the optimizer's own state tensors before its
    load_state_dict is called (docs/integration.md)."""
    for bits in ("8bit", "4bit"):
        model = qfsdp(qbase())
        opt = qopt(model, bits)
        qtrain(model, opt, range(2), [rank])
        for how in ("sharded", "from rank 0"):
            full_state = how == "from rank 0"
            sd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=full_state)))
            if full_state:  # the last element of the whole scales: in rank 1's shard
                for entry in sd["state"].values():
                    entry["exp_avg_sq_scales"].view(-1)[-1] *= -1
                if rank != 0:
                    sd = {}
            elif rank == 1:
                broken = [e for e in sd["state"].values() if local(e["exp_avg_sq_scales"]).numel()]
                assert broken, "rank 1 holds no scales"
                local(broken[0]["exp_avg_sq_scales"]).neg_()
            fresh = qopt(model, bits)
            qtrain(model, fresh, [5], [rank])  # a state of its own, to be left as it is
            before = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
            held = {n: {k: local(v).clone() for k, v in fresh.state[p].items()} for n, p in model.named_parameters()}
            try:
                set_optimizer_state_dict(model, fresh, sd, options=StateDictOptions(
                    full_state_dict=full_state, broadcast_from_rank0=full_state))
            except ValueError as e:
                assert "'exp_avg_sq_scales'" in str(e) and "negative scales" in str(e), e
                refused = True
            else:
                refused = False
            assert_same_on_all_ranks(refused, f"{bits} {how}: refused")
            assert refused, (bits, how)
            for n, p in model.named_parameters():
                assert torch.equal(full(p.detach()), before[n]), (bits, how, n)
                for k, v in held[n].items():
                    assert full_state or torch.equal(local(fresh.state[p][k]), v), (bits, how, n, k)
            qtrain(model, fresh, [6], [rank])
            assert all(torch.isfinite(local(p)).all() for p in model.parameters())


def fsdp2_full_size_state_refused_naming_the_shard(rank: int, world: int, tmpdir: str) -> None:
    """The unsharded param's state carried by hand onto its FSDP2 shard (as after
    accelerate's switch of the optimizer's params to the sharded ones): refused before
    anything is written, with a message that gives the shard's shape beside the global one
    (it had printed the global shape twice: "(70, 8) for a param of shape (70, 8)")."""
    for state_dtype in (None, "8bit"):
        torch.manual_seed(0)
        model = nn.Linear(8, 70, bias=False)
        fully_shard(model)
        p = model.weight
        opt = tritonadam.AdamW(model.parameters(), lr=1e-2, state_dtype=state_dtype, **LAUNCH)
        q = nn.Parameter(torch.randn(70, 8))
        unsharded = tritonadam.AdamW([q], lr=1e-2, state_dtype=state_dtype, **LAUNCH)
        q.grad = torch.randn(70, 8)
        unsharded.step()
        opt.state[p] = {k: v.clone() for k, v in unsharded.state[q].items()}
        model(torch.randn(4, 8)).sum().backward()
        before = local(p.detach()).clone()
        shard = tuple(local(p).shape)
        try:
            opt.step()
        except RuntimeError as e:
            message = str(e)
        else:
            raise AssertionError(f"{state_dtype}: full-size state on a shard was stepped")
        assert f"(70, 8) (a DTensor; this rank's shard {shard})" in message, message
        assert torch.equal(local(p.detach()), before)


def fsdp2_state_placed_unlike_the_param_is_redistributed(rank: int, world: int, tmpdir: str) -> None:
    """State tensors of a DTensor param placed otherwise on its mesh (a checkpoint of
    another sharding, or the state redistributed by hand): Shard(1) for a Shard(0) param
    and the reverse, Replicate for a Shard(0) one. torch.optim steps them right (DTensor
    ops redistribute their operands). They were read as if placed like the param: 8-bit
    codes per element stepped other elements' moments (0.16 off at lr=0.1), an fp32
    master under "remainder" failed the load with torch's raw size error, and a one-row
    param (rank 1's shard empty, rank 0's the whole) was stepped on rank 0 and refused on
    rank 1. Now they are redistributed like the param, on every rank alike, by hand and
    through load_state_dict: the step is bit for bit the untouched one, in every mode.
    What cannot be placed like the param is refused on every rank alike: block codes
    placed otherwise, state on another mesh, a plain tensor for a sharded param."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    modes = [
        ("Adam", torch.float32, {"state_dtype": "8bit"}),
        ("AdamW", torch.bfloat16, {"master_weights": "remainder"}),
        ("AdamW", torch.bfloat16, {"master_weights": True, "state_dtype": "4bit"}),
        ("AdamW", torch.bfloat16, {"master_weights": "remainder", "state_dtype": "8bit"}),
    ]

    def setup(mode, placement, rows=16):
        name, dtype, kwargs = mode
        torch.manual_seed(0)
        model = nn.Linear(32, rows, bias=False).to(dtype)
        fully_shard(model, shard_placement_fn=lambda p: placement)
        opt = PAIRS[name][0](model.parameters(), lr=0.1, **kwargs, **LAUNCH)
        for i in (10, 11):
            opt.zero_grad()
            gen = torch.Generator().manual_seed(i)
            model(torch.randn(3, 32, generator=gen).to(dtype)).float().square().sum().backward()
            if i == 10:
                opt.step()
        return model, opt

    def placed(v, placement):
        if not isinstance(v, DTensor):
            return v
        wide = v.to(torch.int32) if v.dtype == torch.int16 else v  # gloo moves no int16
        return distribute_tensor(wide.full_tensor(), v.device_mesh, [placement]).to(v.dtype)

    def put(model, opt, via_load, entry):  # the param's state: through a load, or by hand
        if via_load:
            sd = opt.state_dict()
            sd["state"][0] = entry
            opt.load_state_dict(sd)
        else:
            opt.state[model.weight] = entry

    cases = [(Shard(0), Shard(1), 16), (Shard(1), Shard(0), 16), (Shard(0), Replicate(), 16), (Shard(0), Replicate(), 1)]
    for mode in modes:
        for placement, other, rows in cases:
            model, opt = setup(mode, placement, rows)
            opt.step()
            untouched = model.weight.full_tensor()
            for via_load in (False, True):
                what = (mode, placement, other, rows, via_load)
                model, opt = setup(mode, placement, rows)
                moved = {k: placed(v, other) for k, v in opt.state_dict()["state"][0].items()}
                assert any(isinstance(v, DTensor) and v.placements != model.weight.placements
                           for v in moved.values()), what
                put(model, opt, via_load, moved)
                opt.step()
                assert torch.equal(model.weight.full_tensor(), untouched), what
                for k, v in opt.state[model.weight].items():
                    assert not isinstance(v, DTensor) or v.placements == model.weight.placements, (what, k)

    # Refused on every rank alike, with the param and the state untouched.
    def refused(model, opt, via_load, entry, needle, what):
        before = model.weight.full_tensor()
        held = dict(opt.state[model.weight])
        try:
            put(model, opt, via_load, entry)
            opt.step()
        except (RuntimeError, ValueError) as e:
            assert needle in str(e), (what, e)
            got = True
        else:
            got = False
        assert_same_on_all_ranks(got, f"{what}: refused")
        assert got, what
        assert torch.equal(model.weight.full_tensor(), before), what
        if via_load:
            assert all(opt.state[model.weight][k] is v for k, v in held.items()), what
        opt.state[model.weight] = held

    # Block codes (a param of 64-element rows exports a row per block row): placed
    # otherwise, each rank's blocks are other rows'.
    torch.manual_seed(0)
    model = nn.Linear(64, 4, bias=False)
    fully_shard(model)
    opt = tritonadam.Adam(model.parameters(), lr=0.1, state_dtype="8bit", **LAUNCH)
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert tuple(sd["state"][0]["exp_avg_8bit"].shape) == (4, 64), sd["state"][0]["exp_avg_8bit"].shape
    moved = {k: placed(v, Replicate()) for k, v in sd["state"][0].items()}
    refused(model, opt, True, moved, "blocks are counted from the start of each shard", "block codes, load")
    refused(model, opt, False, moved, "only a code and a scale per element", "block codes, by hand")
    # Another mesh: a 2-D one over the same ranks.
    mesh2 = init_device_mesh("cpu", (1, world))
    for mode in modes[:2]:
        model, opt = setup(mode, Shard(0))
        elsewhere = {k: distribute_tensor(v.full_tensor(), mesh2, [Replicate(), Shard(0)])
                     if isinstance(v, DTensor) else v
                     for k, v in opt.state_dict()["state"][0].items() if k != "master_param_remainder"}
        for via_load in (False, True):
            refused(model, opt, via_load, dict(elsewhere), "a DTensor on DeviceMesh", (mode, "other mesh", via_load))
    # A plain tensor for a sharded one-row param: rank 0's shard is the whole param, so a
    # shape check alone passed there and failed on rank 1. So for plain codes per element.
    model, opt = setup(("Adam", torch.float32, {}), Shard(0), rows=1)
    plain = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in opt.state[model.weight].items()}
    refused(model, opt, False, plain, "a plain tensor of shape (1, 32) for a DTensor param", "plain, by hand")
    model, opt = setup(modes[0], Shard(0), rows=1)
    plain = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in opt.state_dict()["state"][0].items()}
    refused(model, opt, False, plain, "exp_avg_8bit", "plain codes, by hand")
    # A DTensor sharded for a plain param (one FSDP2 leaves out): rank 0's (1, 32) part of
    # a one-row value passed as the whole, rank 1's (0, 32) did not.
    q = nn.Parameter(torch.randn(1, 32))
    plain_opt = tritonadam.AdamW([q], lr=0.1, **LAUNCH)
    q.grad = torch.ones(1, 32)
    plain_opt.step()
    sd = plain_opt.state_dict()
    sd["state"][0] = {k: distribute_tensor(v, model.weight.device_mesh, [Shard(0)]) if v.dim() else v
                      for k, v in sd["state"][0].items()}
    try:
        plain_opt.load_state_dict(sd)
    except ValueError as e:
        assert "for a param that is not a DTensor" in str(e), e
        got = True
    else:
        got = False
    assert_same_on_all_ranks(got, "sharded state of a plain param: refused")
    assert got
    # Codes placed otherwise beside plain scales: refused before any is redistributed.
    model, opt = setup(modes[0], Shard(0), rows=2)
    mixed = {k: (placed(v, Replicate()) if k.endswith("8bit") else v.full_tensor()) if isinstance(v, DTensor) else v
             for k, v in opt.state_dict()["state"][0].items()}
    refused(model, opt, False, mixed, "a DTensor beside a plain tensor", "codes beside plain scales")
    assert all(not isinstance(v, DTensor) or v.placements == (Replicate(),) for v in mixed.values())

    # What the step does not read is left as it is, even placed otherwise: a rank that
    # converts for a reason of its own (rank 0's shard re-laid out, rank 1's single row
    # still in layout) redistributed an idle max_exp_avg_sq alone and waited for rank 1.
    # A replicated step count (what torch.optim steps) is not split like the param.
    for count in ((), (1,)):
        for via_load in (False, True):
            model, opt = setup(("Adam", torch.float32, {}), Shard(0), rows=3)
            ref_model, ref_opt = setup(("Adam", torch.float32, {}), Shard(0), rows=3)
            p, st = model.weight, opt.state[model.weight]
            idle = distribute_tensor(st["exp_avg_sq"].full_tensor(), p.device_mesh, [Shard(1)])
            step = DTensor.from_local(st["step"].reshape(count).clone(), p.device_mesh, [Replicate()], run_check=False)
            if via_load:
                sd = opt.state_dict()
                sd["state"][0] = {**sd["state"][0], "max_exp_avg_sq": idle, "step": step}
                opt.load_state_dict(sd)
            else:
                st["max_exp_avg_sq"], st["step"] = idle, step
            lp = p._local_tensor
            lp.data = lp.data.t().contiguous().t()
            opt.step()
            ref_opt.step()
            what = ("idle and step", count, via_load)
            assert torch.equal(p.full_tensor(), ref_model.weight.full_tensor()), what
            # a load converts every moment it holds (idle ones too), on every rank
            assert opt.state[p]["max_exp_avg_sq"].placements == (p.placements if via_load else (Shard(1),)), what


def fsdp2_relaid_shards_export_one_form(rank: int, world: int, tmpdir: str) -> None:
    """A (3, 64) param sharded 2/1 rows, whose local shards are re-laid out column-major by
    hand after a step (same shape, other strides; FSDP2 itself does not support it). Rank
    0's shard is non-contiguous, rank 1's single row still counts as contiguous: each
    rank had picked its export form from its own layout (per element on rank 0, rows on
    rank 1), so the full state dict aborted in gloo's gather and dcp.save failed its plan.
    Every rank exports the row form now, the re-laid shard re-encoded in row order: the
    full state dict gathers, and its moments are the local ones within a quantization
    step. A replicated param laid out alike on every rank (transposed) keeps the lossless
    per-element form: a load gives back its codes bit for bit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    for bits in (8, 4):
        torch.manual_seed(0)
        model = nn.Linear(64, 3, bias=False)
        fully_shard(model)
        opt = tritonadam.AdamW(model.parameters(), lr=1e-2, state_dtype=f"{bits}bit", **LAUNCH)
        gen = torch.Generator().manual_seed(5)
        for step in range(2):
            full_grad = torch.randn(3, 64, generator=gen)
            p = model.weight
            p.grad = DTensor.from_local(qchunk(full_grad, rank, world).clone(), p.device_mesh, p.placements,
                                        run_check=False, shape=p.shape, stride=p.stride())
            opt.step()
            opt.zero_grad()
            if step == 0:
                lp = p._local_tensor
                lp.data = lp.data.t().contiguous().t()
        what = f"{bits}-bit relaid"
        osd = get_optimizer_state_dict(model, opt)
        for key in ("exp_avg", "exp_avg_sq"):
            codes, scales = osd["state"]["weight"][f"{key}_{bits}bit"], osd["state"]["weight"][f"{key}_scales"]
            assert tuple(codes.shape) == (3, 64 * bits // 8) and tuple(scales.shape) == (3, 1), (what, key)
        full_sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        state = full_sd["state"]["weight"]
        for key in ("exp_avg", "exp_avg_sq"):
            got = tritonadam.quantize.dequantize(state[f"{key}_{bits}bit"].reshape(-1), state[f"{key}_scales"].reshape(-1),
                                                 3 * 64, bits, key == "exp_avg").reshape(3, 64)
            # (decoded in the element order the codes were encoded in: the re-laid shard's)
            mine = read_moment(model.weight, key, opt.state[model.weight])
            scale = mine.abs().amax().clamp_min(1e-30)
            err = (qchunk(got, rank, world) - mine).abs().max() / scale
            assert err <= (0.02 if bits == 8 else 0.2), (what, key, float(err))

        mesh = init_device_mesh("cpu", (world,))
        models = []
        for _ in range(2):
            torch.manual_seed(1)
            m = nn.Linear(64, 3, bias=False)
            m.weight = nn.Parameter(distribute_tensor(m.weight.detach(), mesh, [Replicate()]))
            m.weight._local_tensor.data = m.weight._local_tensor.data.t().contiguous().t()
            models.append((m, tritonadam.AdamW(m.parameters(), lr=1e-2, state_dtype=f"{bits}bit", **LAUNCH)))
        (m, opt), (m2, opt2) = models
        p = m.weight
        p.grad = DTensor.from_local(torch.randn(3, 64, generator=gen), mesh, [Replicate()], run_check=False)
        opt.step()
        full_sd = get_optimizer_state_dict(m, opt, options=StateDictOptions(full_state_dict=True))
        assert tuple(full_sd["state"]["weight"][f"exp_avg_{bits}bit"].shape) == (3, 64), what
        set_optimizer_state_dict(m2, opt2, full_sd, options=StateDictOptions(full_state_dict=True))
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = read_moment(p, key, opt.state[p]), read_moment(m2.weight, key, opt2.state[m2.weight])
            assert torch.equal(a, b), (f"{bits}-bit replicated transposed", key)


SCENARIOS = {
    "fsdp2_quantized_values_refused_everywhere": fsdp2_quantized_values_refused_everywhere,
    "fsdp2_full_state_cross_options": fsdp2_full_state_cross_options,
    "fsdp2_precision_modes": fsdp2_precision_modes,
    "fsdp2_fused_clip": fsdp2_fused_clip,
    "fsdp2_cpu_params": fsdp2_cpu_params,
    "fsdp2_parity": fsdp2_parity,
    "fsdp2_mixed_precision": fsdp2_mixed_precision,
    "fsdp2_checkpoints": fsdp2_checkpoints,
    "fsdp1_parity": fsdp1_parity,
    "fsdp1_precision_state_dicts": fsdp1_precision_state_dicts,
    "grad_scaler_fsdp": grad_scaler_fsdp,
    "grad_scaler_fsdp1_without_unscale": grad_scaler_fsdp1_without_unscale,
    "fsdp2_quantized": fsdp2_quantized,
    "fsdp2_quantized_flatten": fsdp2_quantized_flatten,
    "fsdp2_quantized_dcp_save1": fsdp2_quantized_dcp_save1,
    "fsdp2_quantized_dcp_load1": fsdp2_quantized_dcp_load1,
    "fsdp2_quantized_dcp_world2": fsdp2_quantized_dcp_world2,
    "quantized_dcp_alone": quantized_dcp_alone,
    "fsdp2_quantized_dcp_from_alone": fsdp2_quantized_dcp_from_alone,
    "zero_redundancy": zero_redundancy,
    "tensor_parallel": tensor_parallel,
    "sr_replicas_agree": sr_replicas_agree,
    "fsdp2_unsharded_quantized_full_state": fsdp2_unsharded_quantized_full_state,
    "fsdp2_relaid_shards_export_one_form": fsdp2_relaid_shards_export_one_form,
    "fsdp2_state_placed_unlike_the_param_is_redistributed": fsdp2_state_placed_unlike_the_param_is_redistributed,
    "fsdp_tp_2d": fsdp_tp_2d,
    "fsdp2_full_size_state_refused_naming_the_shard": fsdp2_full_size_state_refused_naming_the_shard,
}


