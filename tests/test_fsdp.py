"""FSDP2, FSDP1 and distributed checkpoints with tritonadam (issue 5): 2 gloo processes on CPU.

Each test starts two ranks running one scenario of ``fsdp_worker.py`` (read its
docstrings for what is checked), forked from a server that imported it once. Select with
``-m distributed``; each takes 3-25 s on 2 cores.
"""
from __future__ import annotations

import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="needs torch.distributed with the gloo backend",
    ),
]

WORLD = 2
TIMEOUT_S = 240


def run_scenario(scenario: str, tmp_path, world: int = WORLD, *, start_method: str = "forkserver") -> None:
    """Run ``scenario`` on ``world`` gloo ranks (1: a single-rank job, e.g. to load a
    checkpoint saved by 2 ranks; 0: one process without a process group).

    Ranks fork from a server that imported torch and the worker once (per pytest process),
    instead of importing them afresh (2.3 s from start to entry per spawned rank, measured
    on 2 cores; 0.01 s from a started server). Each rank is still a
    fresh fork of an idle process: no state passes between scenarios. A scenario that needs
    another environment than the tests' (the server's, fixed when it started) spawns."""
    import fsdp_worker  # tests/ is on sys.path (rootdir conftest); the ranks import it too

    assert scenario in fsdp_worker.SCENARIOS
    if start_method == "forkserver":
        mp.set_forkserver_preload(["fsdp_worker"])
    store = tmp_path / f"store-{scenario}-{world}"  # a fresh rendezvous file per run
    context = mp.start_processes(
        fsdp_worker.entry,
        args=(world, str(store), scenario, str(tmp_path)),
        nprocs=max(world, 1),
        join=False,
        start_method=start_method,
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # join() raises ProcessRaisedException with the failing rank's traceback.
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{scenario}: ranks still running after {TIMEOUT_S} s (deadlock?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def test_fsdp2_parity_with_torch(tmp_path):
    """fully_shard: Adam(amsgrad)/AdamW/Adamax track torch.optim over 6 steps (two param
    groups, grad clipping, uneven and 0-element shards); state stays sharded DTensors."""
    run_scenario("fsdp2_parity", tmp_path)


def test_fsdp2_fused_clipping(tmp_path):
    """opt.clip_grad_norm_ and max_grad_norm= with uneven and empty shards (and a rank
    holding nothing): the global norm via one all-reduce, a replicated DTensor with the
    same bits on both ranks, norm and params equal to the single-process run with torch's
    clip_grad_norm_ + torch.optim.AdamW; with ``ignored_params`` too (plain grads beside
    DTensor ones, counted once), which torch's clip refuses."""
    run_scenario("fsdp2_fused_clip", tmp_path)


def test_fsdp2_cpu_params_without_the_interpreter(tmp_path, monkeypatch):
    """CPU params outside the interpreter (a GPU job with FSDP2's CPU offload): stepped by
    torch.optim's CPU implementation on our state, bit for bit as torch.optim, and
    resumable from a full optimizer state dict; fused clipping gives torch's norm and
    steps bit for bit, and over tensor parallelism's mixed layouts torch's norms of order
    1, 2, 3 and inf; 8-bit state refused on every rank."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the spawned ranks inherit it
    run_scenario("fsdp2_cpu_params", tmp_path, start_method="spawn")


def test_fsdp2_bf16_mixed_precision(tmp_path):
    """MixedPrecisionPolicy(bf16 params, fp32 reduce) tracks torch; bf16-stored params
    with master_weights keep fp32 DTensor state and stay close to the fp32 run."""
    run_scenario("fsdp2_mixed_precision", tmp_path)


def test_fsdp2_state_dicts_and_dcp_cross_loads(tmp_path):
    """get/set_optimizer_state_dict full and sharded, dcp.save/load, broadcast from rank
    0; checkpoints of torch.optim.AdamW load into tritonadam.AdamW and the reverse, and
    training continues identically (bitwise when the class does not change)."""
    run_scenario("fsdp2_checkpoints", tmp_path)
    assert (tmp_path / "dcp_ours" / ".metadata").exists()


def test_fsdp2_full_state_dicts_convert_between_state_options(tmp_path):
    """A full optimizer state dict of other state options (8-bit -> fp32, torch -> 8-bit,
    8-bit -> 4-bit, fp32 -> 4-bit, 4-bit + remainder -> fp32 master, stochastic rounding
    -> none and -> another seed and format) loads under FSDP2 on every rank, each rank
    converting its shard."""
    run_scenario("fsdp2_full_state_cross_options", tmp_path)


def test_fsdp2_precision_modes(tmp_path):
    """bf16 params under FSDP2: remainder == master bit for bit, sharded int16 remainders
    exported as an fp32 master that a dcp checkpoint carries into master_weights=True;
    stochastic rounding with bf16 state is sharded and reproducible."""
    run_scenario("fsdp2_precision_modes", tmp_path)


def test_fsdp1_use_orig_params_and_ddp(tmp_path):
    """FSDP1 use_orig_params=True (flat 1-D views, some empty): AdamW and Adam(amsgrad)
    track torch.optim; full optimizer state dicts move between the two classes. DDP:
    tracks torch.optim, identical params on every rank."""
    run_scenario("fsdp1_parity", tmp_path)


def test_fsdp1_state_dicts_of_every_format(tmp_path):
    """FSDP1's optimizer state dicts (DCP's, sharded and full, and FSDP.optim_state_dict)
    with quantized, bf16 and remainder state: moments exported at fp32, bit-exact resume."""
    run_scenario("fsdp1_precision_state_dicts", tmp_path)


def test_fsdp_over_tensor_parallel_on_a_2x2_mesh(tmp_path):
    """(dp=2, tp=2): the fused clip's norms are torch's on every rank also for the grads
    FSDP2 shards with _StridedShard (it had left their dp dim out), clipped training
    tracks torch.optim, and an 8-bit DCP checkpoint resumes bit for bit."""
    run_scenario("fsdp_tp_2d", tmp_path, world=4)


def test_tensor_parallel_and_dim1_shards(tmp_path):
    """DTensor params sharded along dim 1 and replicated (tensor parallelism alone and on a
    2-D mesh with FSDP2, FSDP2 with a shard_placement_fn): fused clipping's norms equal
    torch's, clipped parity with torch.optim, bit-exact quantized checkpoints."""
    run_scenario("tensor_parallel", tmp_path)


def test_stochastic_rounding_keeps_replicas_equal(tmp_path):
    """HSDP replicas and Replicate() params round with the same numbers on every rank;
    shards of one param with numbers of their own."""
    run_scenario("sr_replicas_agree", tmp_path)


def test_unsharded_quantized_full_state_into_fsdp2_is_refused_everywhere(tmp_path):
    """An unsharded model's 8-bit/4-bit full state dict through set_optimizer_state_dict:
    refused on every rank (torch splits codes and scales apart); load_state_dict loads it."""
    run_scenario("fsdp2_unsharded_quantized_full_state", tmp_path)


def test_quantized_values_of_one_shard_are_refused_everywhere(tmp_path):
    """Negative scales in one rank's shard of a DCP checkpoint: every rank refuses it
    (sharded, and broadcast from rank 0), nothing changed, and steps go on."""
    run_scenario("fsdp2_quantized_values_refused_everywhere", tmp_path)


def test_zero_redundancy_optimizer(tmp_path):
    """torch's ZeroRedundancyOptimizer over DDP with ours as its optimizer_class: tracks
    torch.optim through ZeRO's checkpoint round trip (which writes the local state by
    hand), and with quantized state matches plain DDP bit for bit."""
    run_scenario("zero_redundancy", tmp_path)


def test_grad_scaler_with_fsdp_skips_on_every_rank(tmp_path):
    """An inf in one rank's grad shard: every rank skips and backs off the scale, ours
    tracks torch.optim. FSDP2 + GradScaler (with and without unscale_ + clipping) and
    FSDP1 + ShardedGradScaler with unscale_ + clip_grad_norm_."""
    run_scenario("grad_scaler_fsdp", tmp_path)


def test_grad_scaler_fsdp1_without_unscale(tmp_path):
    """torch's ShardedGradScaler lets ranks disagree here (its inf check for optimizers that
    unscale in their step is rank-local); tritonadam.amp.ShardedGradScaler agrees, and so
    does torch's scaler with torch.optim.AdamW."""
    run_scenario("grad_scaler_fsdp1_without_unscale", tmp_path)


def test_fsdp2_quantized_state(tmp_path):
    """state_dtype="8bit"/"4bit" (fp32, and bf16 with the remainder master) under FSDP2:
    stepping the grads FSDP reduced, params whose shards start on quantization blocks step
    bit for bit like one process stepping the whole tensors (codes too); a param whose
    shards split blocks (5/4 elements) stays within quantization error. State is kept as
    plain local flat tensors; get_optimizer_state_dict exports rows of codes (DTensors, or
    full tensors) for params whose rows are whole blocks and a code and a scale per element for the others;
    sharded and full state dicts round trip through set_optimizer_state_dict bit for bit."""
    run_scenario("fsdp2_quantized", tmp_path)


def test_fsdp2_quantized_flattened_state_dicts(tmp_path):
    """StateDictOptions(flatten_optimizer_state_dict=True) round trips bit for bit, every
    param (rows of whole blocks, and shards that split blocks, exported per element) and
    the bf16 remainder master; training then continues bit for bit."""
    run_scenario("fsdp2_quantized_flatten", tmp_path)


def test_fsdp2_quantized_dcp_reshards_between_world_sizes(tmp_path):
    """dcp.save on 1 rank, load on 2 (and the reverse), and between 2 ranks and one process
    without a process group (both ways): each shard's state is the saved
    rows (codes of aligned params as they were, full-precision moments of the others
    re-encoded in the new blocks), the remainder master carried over, and training
    continues within quantization error of the uninterrupted run."""
    run_scenario("fsdp2_quantized_dcp_save1", tmp_path, world=1)
    run_scenario("fsdp2_quantized_dcp_world2", tmp_path, world=2)  # loads it, saves on 2 ranks
    run_scenario("fsdp2_quantized_dcp_load1", tmp_path, world=1)
    # One process without a process group loads the 2 ranks' checkpoint and saves one for them.
    run_scenario("quantized_dcp_alone", tmp_path, world=0)
    run_scenario("fsdp2_quantized_dcp_from_alone", tmp_path, world=2)
    assert (tmp_path / "q_w0_4bit-bf16-remainder_dcp" / ".metadata").exists()
    assert (tmp_path / "q_w2_8bit_dcp" / ".metadata").exists()
    assert (tmp_path / "q_w1_4bit-bf16-remainder_dcp" / ".metadata").exists()


@pytest.mark.parametrize("shape", [(2, 2), (2, 3)])
def test_random_streams_follow_shards_on_every_placement(shape):
    """A DTensor's stochastic-rounding stream is its shard: ranks holding different data of
    a param get different streams, replicas the same, on a 2-D mesh, FSDP2 over tensor
    parallelism's _StridedShard included (which torch does not count as is_shard(): its
    data-parallel shards drew the same numbers). One process, each rank in turn, a fake
    process group."""
    import itertools

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tritonadam.gather import _shard_id

    placements = {
        "S0,S1": (Shard(0), Shard(1)), "S0,S0": (Shard(0), Shard(0)), "R,S0": (Replicate(), Shard(0)),
        "S0,R": (Shard(0), Replicate()), "R,R": (Replicate(), Replicate()), "S1,S0": (Shard(1), Shard(0)),
        "strided,S0": (_StridedShard(0, split_factor=2), Shard(0)),
    }
    base = torch.arange(144, dtype=torch.float32).view(12, 12)
    seen = {name: [] for name in placements}
    for rank in range(shape[0] * shape[1]):
        dist.init_process_group("fake", rank=rank, world_size=shape[0] * shape[1], store=FakeStore())
        try:
            mesh = init_device_mesh("cpu", shape)
            for name, pl in placements.items():
                d = distribute_tensor(base.clone(), mesh, pl, src_data_rank=None)
                seen[name].append((_shard_id(d), d.to_local().flatten().tolist()))
        finally:
            dist.destroy_process_group()
    for name, rows in seen.items():
        for (id_a, data_a), (id_b, data_b) in itertools.combinations(rows, 2):
            assert (id_a == id_b) == (data_a == data_b), (name, id_a, id_b)


@pytest.mark.parametrize("after", ["steps", "clip"])
def test_a_grad_placed_unlike_its_param_after_cached_steps_is_refused(after):
    """The same refusal once the step cache holds the tables: a Partial grad of a replicated
    param has the param's local shape, dtype and layout, which is all the cached check
    compares of a grad but its spec. Also a grad wrapped anew between a clip and the step
    over the very memory the clip took. One process, rank 0 of a fake group of 4."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import tritonadam

    dist.init_process_group("fake", rank=0, world_size=4, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (2, 2))
        placed, partial = [Replicate(), Replicate()], [Replicate(), Partial()]
        p = torch.nn.Parameter(DTensor.from_local(torch.randn(2, 4), mesh, placed, run_check=False))
        opt = tritonadam.AdamW([p], lr=0.1)
        for _ in range(2):  # the second step runs on the cache
            p.grad = DTensor.from_local(torch.randn(2, 4), mesh, placed, run_check=False)
            opt.step()
        # Equal placements under a new spec object are the same layout: stepped.
        p.grad = DTensor.from_local(torch.randn(2, 4), mesh, list(placed), run_check=False)
        opt.step()
        before = [p.to_local().clone(), opt.state[p]["exp_avg"].to_local().clone()]
        local = torch.randn(2, 4)
        if after == "clip":
            p.grad = DTensor.from_local(local, mesh, placed, run_check=False)
            opt.clip_grad_norm_(1.0)
        p.grad = DTensor.from_local(local, mesh, partial, run_check=False)
        with pytest.raises(RuntimeError, match=r"a DTensor grad placed .* for a param placed .*p.grad.redistribute"):
            opt.step()
        after_ = [p.to_local(), opt.state[p]["exp_avg"].to_local()]
        assert all(torch.equal(a, b) for a, b in zip(before, after_))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("grad_placement", ["partial", "swapped-dims", "one-rank-dim"])
def test_grads_placed_unlike_their_params_are_refused(grad_placement):
    """A replicated param's grad left Partial (tensor parallelism) holds one addend per rank:
    each rank stepped with its own piece and the replicas drifted apart (torch's DTensor ops
    reduce it inside torch.optim's step). So do placements swapped between mesh dims, which
    keep the local shape. Refused with what to do, nothing written. Along a mesh dim of one
    rank every placement means the whole tensor: stepped. One process, rank 0 of a fake
    process group of 4."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import tritonadam

    dist.init_process_group("fake", rank=0, world_size=4, store=FakeStore())
    try:
        if grad_placement == "one-rank-dim":
            mesh = init_device_mesh("cpu", (4, 1))
            param_pl, grad_pl = [Shard(0), Replicate()], [Shard(0), Partial()]
        else:
            mesh = init_device_mesh("cpu", (2, 2))
            if grad_placement == "partial":
                param_pl, grad_pl = [Replicate(), Replicate()], [Replicate(), Partial()]
            else:  # a (4, 4) param's rows halved along dim 0 of the mesh, or along dim 1
                param_pl, grad_pl = [Shard(0), Replicate()], [Replicate(), Shard(0)]
        p = torch.nn.Parameter(DTensor.from_local(torch.randn(2, 4), mesh, param_pl, run_check=False))
        other = torch.nn.Parameter(DTensor.from_local(torch.randn(3), mesh, [Replicate()] * 2, run_check=False))
        opt = tritonadam.AdamW([p, other], lr=0.1)
        other.grad = DTensor.from_local(torch.randn(3), mesh, [Replicate()] * 2, run_check=False)
        opt.step()  # a first step: state to keep
        before = [t.to_local().clone() for t in (p, other)] + [opt.state[other]["exp_avg"].to_local().clone()]
        p.grad = DTensor.from_local(torch.randn(2, 4), mesh, grad_pl, run_check=False)
        other.grad = DTensor.from_local(torch.randn(3), mesh, [Replicate()] * 2, run_check=False)
        if grad_placement == "one-rank-dim":
            opt.step()
            assert not torch.equal(p.to_local(), before[0]) and p in opt.state
            return
        with pytest.raises(RuntimeError, match=r"a DTensor grad placed .* for a param placed .*p.grad.redistribute"):
            opt.step()
        after = [t.to_local() for t in (p, other)] + [opt.state[other]["exp_avg"].to_local()]
        assert all(torch.equal(a, b) for a, b in zip(before, after)) and p not in opt.state
    finally:
        dist.destroy_process_group()


def test_relaid_shards_export_one_form_on_every_rank(tmp_path):
    """Quantized state of shards re-laid out by hand: one export form on every rank (the
    full state dict gathers), within a quantization step of each rank's moments."""
    run_scenario("fsdp2_relaid_shards_export_one_form", tmp_path)


def test_full_size_state_on_a_shard_is_refused_naming_the_shard(tmp_path):
    """The unsharded param's state written onto its FSDP2 shard by hand: refused, params
    untouched, and the message gives the shard's shape, not the global one twice."""
    run_scenario("fsdp2_full_size_state_refused_naming_the_shard", tmp_path)


def test_state_placed_unlike_the_param_is_redistributed(tmp_path):
    """State of another placement than its DTensor param's (moments, codes per element,
    masters), by hand and through load_state_dict: redistributed like the param on every
    rank, the step bit for bit the untouched one (codes had stepped other elements'
    moments, a master failed the load, a one-row param was refused on one rank only);
    block codes placed otherwise, another mesh and a plain tensor for a sharded param
    are refused on every rank alike."""
    run_scenario("fsdp2_state_placed_unlike_the_param_is_redistributed", tmp_path)
