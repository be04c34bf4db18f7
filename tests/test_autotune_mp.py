"""The autotune cache and tuner across processes: concurrent writers, and rank agreement
under torch.distributed (gloo, CPU)."""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import sys
import traceback

import pytest
import torch

from tritonadam.autotune import DeviceInfo, DiskCache, LaunchConfig, Tuner, entry_key
from tritonadam.autotune.cache import CacheIdentity
from tritonadam.autotune.configs import space_hash, space_id

FAKE_GPU = DeviceInfo(backend="cuda", name="Fake H100 80GB HBM3", arch="sm_90", capability="9.0", num_sms=132)
IDENT = CacheIdentity("cuda", FAKE_GPU.name, "9.0", "3.9.0", "deadbeef", space_hash("cuda"))
N_WRITERS = 8
PER_WRITER = 6


def _ctx(prefer_fork: bool):
    # fork is much faster (no re-import of torch) where it exists; the writers only do file I/O.
    if prefer_fork and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _entry(writer: int, i: int) -> tuple[str, dict]:
    key = ("adam", f"writer={writer}", f"i={i}")
    return entry_key(key, 20), {
        "key": list(key),
        "bucket": 20,
        "space": space_id("cuda"),
        "config": LaunchConfig(4096, 8).to_json(),
        "time_ms": 1.0 + writer + i / 10,
        "gbps": None,
        "default": {"config": LaunchConfig(1024, 8).to_json(), "time_ms": 2.0 + writer, "pairs": 24},
        "vs_default": {"ratio": 0.5, "spread": 0.01, "pairs": 8},
        "runner_up": None,
        "decision": {"kept_default": False, "reason": "faster", "min_margin": 0.02, "noise": None},
        "untimed": [],
    }


def _writer(directory: str, writer: int, barrier, errors) -> None:
    try:
        cache = DiskCache(directory)
        barrier.wait(timeout=60)
        for i in range(PER_WRITER):
            name, entry = _entry(writer, i)
            assert cache.store(IDENT, name, entry), "store failed"
    except BaseException:
        errors.put(f"writer {writer}: {traceback.format_exc()}")


def test_eight_processes_writing_one_cache(tmp_path):
    ctx = _ctx(prefer_fork=True)
    barrier, errors = ctx.Barrier(N_WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, barrier, errors)) for w in range(N_WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert errors.empty(), errors.get()
    path = DiskCache(tmp_path).path(IDENT)
    obj = json.loads(path.read_text())  # one whole, valid JSON file
    expected = dict(_entry(w, i) for w in range(N_WRITERS) for i in range(PER_WRITER))
    assert obj["entries"] == expected
    parsed = DiskCache(tmp_path).read(path, IDENT)
    assert parsed.problem is None and len(parsed.entries) == N_WRITERS * PER_WRITER
    assert not list(tmp_path.glob(".tmp-*"))  # no temp files left behind


KEYS = [("adam", "k0"), ("adamax", "k1"), ("adam", "k2")]
# Each rank's fake GPU disagrees about which config is fastest.
RANK_FAVOURITE = {0: LaunchConfig(4096, 8), 1: LaunchConfig(512, 2)}


def _rank(rank: int, world: int, init_file: str, cache_dir: str, results) -> None:
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        fav = RANK_FAVOURITE[rank]
        timed = []

        def timer(fn):
            timed.append(fn.config)
            return 1.0 if fn.config == fav else 2.0

        def make_runner(config, numel):
            run = lambda: None  # noqa: E731
            run.config = config
            return run

        def tuner(agreement, sub):
            return Tuner(
                timer=timer, cache=DiskCache(f"{cache_dir}/{sub}"), device_info=lambda d: FAKE_GPU,
                free_bytes=lambda d: None, time_any_device=True, stream=io.StringIO(), agreement=agreement,
            )

        cpu = torch.device("cpu")
        out = {}
        for agreement in ("store", "broadcast"):
            t = tuner(agreement, agreement)
            timed.clear()
            # Store agreement pairs nothing by call order, so rank 1 may walk the entries
            # backwards (then the ranks usually decide different entries); a broadcast needs
            # every rank to call in the same order.
            order = list(range(len(KEYS)))
            if agreement == "store" and rank == 1:
                order.reverse()
            got = {k: t.select(KEYS[k], 2**22, cpu, make_runner).to_json() for k in order}
            again = {k: t.select(KEYS[k], 2**22, cpu, make_runner).to_json() for k in order}  # memory: no communication
            sources = {k: c.source for k, c in zip(order, t.choices())}
            out[agreement] = ([got[k] for k in range(len(KEYS))], [again[k] for k in range(len(KEYS))],
                              len(timed), [sources[k] for k in range(len(KEYS))])
            dist.barrier()
        # Store agreement pairs nothing by call order: a rank that needs an entry no other
        # rank needs (an uneven shard in another bucket) decides it alone, without a hang.
        t = tuner("store", "uneven")
        timed.clear()
        extra = t.select(KEYS[0], 2**(20 + rank), cpu, make_runner).to_json()
        out["uneven"] = (extra, len(timed))
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, out))
    except BaseException:
        results.put((rank, traceback.format_exc()))


@pytest.mark.distributed
@pytest.mark.skipif(sys.platform == "win32", reason="gloo file init on Linux/macOS")
def test_ranks_agree_even_when_their_timings_disagree(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    ctx = _ctx(prefer_fork=False)  # spawn: a clean interpreter per rank, as torchrun gives
    results = ctx.Queue()
    world = 2
    procs = [
        ctx.Process(target=_rank, args=(r, world, str(tmp_path / "init"), str(tmp_path / "cache"), results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out = {}
    for _ in range(world):
        rank, res = results.get(timeout=120)
        assert not isinstance(res, str), res
        out[rank] = res
    for p in procs:
        p.join(timeout=60)
    for agreement in ("store", "broadcast"):
        got = [out[r][agreement][0] for r in range(world)]
        again = [out[r][agreement][1] for r in range(world)]
        ntimed = [out[r][agreement][2] for r in range(world)]
        sources = [out[r][agreement][3] for r in range(world)]
        assert got[0] == got[1] and again[0] == again[1] == got[0], agreement  # everyone runs one choice
        # Exactly one rank timed each entry, and the others took its choice. With store
        # agreement the first rank to reach an entry claims it, so different entries may be
        # decided by different ranks: each one holds its decider's favourite.
        assert sum(ntimed) > 0
        for k in range(len(KEYS)):
            deciders = [r for r in range(world) if sources[r][k] == "tuned"]
            assert len(deciders) == 1, (agreement, k, sources)
            (decider,) = deciders
            assert got[0][k] == RANK_FAVOURITE[decider].to_json(), (agreement, k, got[0], sources)
            taker = 1 - decider
            assert sources[taker][k] == f"rank {decider} ({agreement})", (agreement, k, sources)
    assert out[1]["broadcast"][2] == 0 and out[1]["broadcast"][3] == ["rank 0 (broadcast)"] * len(KEYS)
    assert out[0]["broadcast"][0] == [RANK_FAVOURITE[0].to_json()] * len(KEYS)
    for r in range(world):
        extra, ntimed = out[r]["uneven"]
        assert extra == RANK_FAVOURITE[r].to_json() and ntimed > 0
